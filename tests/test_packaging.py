"""The package as users install it: a wheel built from this tree holds every module and runs on its own.

The wheel here is built without the native kernels (``FASTPRUNE_NATIVE=0``, seconds instead of minutes); the full
wheel with kernels is built, installed into a fresh virtual environment and run by ``make check-install``.
"""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from tinymodels import byte_tokenizer, tiny_decoder

ROOT = Path(__file__).resolve().parent.parent
#: Source directories and where their files land in the wheel.
PACKAGE_DIRS = {ROOT / "fastprune": "fastprune", ROOT / "kernels": "fastprune/kernels"}
BUILD_OUTPUTS = {".so", ".pyc", ".pyd", ".o"}
#: What a clean clone does not have (a stale build/ would hand its old files to the wheel).
NOT_IN_A_CLONE = (".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__", "*.so", "runs", ".*_cache")


def source_files() -> set[str]:
    """Every file of the package directories (build outputs aside), as the wheel should name it."""
    names = set()
    for src, dest in PACKAGE_DIRS.items():
        for path in src.rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix not in BUILD_OUTPUTS:
                names.add(f"{dest}/{path.relative_to(src).as_posix()}")
    return names


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    tree = out / "src"
    shutil.copytree(ROOT, tree, ignore=shutil.ignore_patterns(*NOT_IN_A_CLONE))
    env = {**os.environ, "FASTPRUNE_NATIVE": "0"}
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q", "-w", str(out), str(tree)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    (whl,) = out.glob("fastprune-*.whl")
    return whl


def test_wheel_holds_every_file_of_the_source_tree(wheel):
    with zipfile.ZipFile(wheel) as z:
        packaged = {n for n in z.namelist() if n.startswith("fastprune/")}
    assert source_files() - packaged == set(), "missing from the wheel"
    assert packaged - source_files() == set(), "in the wheel but not in the source tree"
    assert "fastprune/recovery/trainer.py" in packaged and "fastprune/kernels/gather_slice.py" in packaged


def test_wheel_installed_alone_imports_and_its_entry_point_prunes(wheel, tmp_path):
    target = tmp_path / "site"
    install = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)]
    done = subprocess.run(install, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    model = tmp_path / "tiny"
    tiny_decoder(heads=6, kv_heads=2, channels=48).save_pretrained(model)
    byte_tokenizer().save_pretrained(model)
    # Only the installed copy on the path (dependencies come from this environment), run from outside the tree.
    env = {**os.environ, "PYTHONPATH": str(target)}
    where = subprocess.run(
        [sys.executable, "-c", "import fastprune, fastprune.recovery.trainer; print(fastprune.__file__)"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert where.returncode == 0, where.stderr[-3000:]
    assert Path(where.stdout.strip()).is_relative_to(target)
    out = tmp_path / "pruned"
    cli = [str(target / "bin" / "fastprune"), "prune", "--model", str(model), "--calibration", "pydoc:calibration"]
    cli += ["--samples", "4", "--seq-len", "64", "--channel-ratio", "0.25", "--round-to", "1", "--no-eval"]
    cli += ["--out", str(out)]
    done = subprocess.run(cli, env=env, cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "plan.json").is_file() and (out / "config.json").is_file()
    assert json.loads((out / "config.json").read_text())["intermediate_size"] == 36
