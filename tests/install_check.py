"""Install the built wheel the way a user does and run the CLI from there (``make check-install``; CI runs it).

A fresh virtual environment gets the CPU torch pin and the wheel (its other dependencies from the package index),
nothing else: the source tree is neither installed nor on the path. The installed ``fastprune`` command then prunes
a tiny random Llama (written here by the development environment) and the result must reload there.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tinymodels import byte_tokenizer, tiny_decoder

#: Run inside the fresh environment: where fastprune comes from, which native kernels loaded, and the reload.
PROBE = """
import sys, fastprune, torch
from fastprune.ops import _native
from transformers import AutoModelForCausalLM
assert fastprune.__file__.startswith(sys.prefix), fastprune.__file__
native = [f for f in ("gather_slice", "head_taylor", "block_influence", "sparse24") if _native.cpu_extension(f)]
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
print(f"fastprune from {fastprune.__file__}; C++ kernels: {', '.join(native) or 'none'}; "
      f"reloaded intermediate_size={model.config.intermediate_size}")
assert model.config.intermediate_size == 36
"""


def run(cmd: list[str], **kwargs) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, **kwargs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("wheel", type=Path, help="the fastprune wheel to install")
    parser.add_argument("--torch", default="torch==2.13.0", help="torch requirement installed first (CPU build)")
    args = parser.parse_args()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fastprune-install-") as tmp:
        tmp = Path(tmp)
        venv = tmp / "venv"
        run([sys.executable, "-m", "venv", str(venv)])
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        # torch first and pinned, so the wheel's dependency range cannot pull a CUDA build.
        run([*pip, args.torch])
        run([*pip, str(args.wheel.resolve()), args.torch])
        model = tmp / "tiny"
        tiny_decoder(heads=6, kv_heads=2, channels=48).save_pretrained(model)
        byte_tokenizer().save_pretrained(model)
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        out = tmp / "pruned"
        prune = [str(venv / "bin" / "fastprune"), "prune", "--model", str(model), "--calibration", "pydoc:calibration"]
        prune += ["--samples", "4", "--seq-len", "64", "--channel-ratio", "0.25", "--round-to", "1"]
        prune += ["--eval-windows", "2", "--eval-seq-len", "64", "--rounds", "1", "--out", str(out)]
        run(prune, cwd=tmp, env=env)
        run([str(venv / "bin" / "python"), "-c", PROBE, str(out)], cwd=tmp, env=env)
    print(f"install check passed in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
