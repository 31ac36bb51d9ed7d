"""Everything that needs a GPU, in one command: ``make gpu-check`` (``python benchmarks/gpu_check.py``).

1. build the CUDA extension (and the C++ one) for this GPU's architecture, strictly (a failed build is an error);
2. the CUDA and Triton tests of every kernel family (tests/ops);
3. the kernel benchmarks on the GPU, including torch's ``to_sparse_semi_structured`` beside fastprune's 2:4 path;
4. the study's GPU rows: one Llama-3-8B-shaped layer in fp16 and bf16 (dense, structured, 2:4 by fastprune and by
   torch) and SmolLM2's latency rows (dense, structured, 2:4).

Each step runs in its own process with a time limit, and a failed step does not stop the others. Results go to
``benchmarks/results/`` named after the GPU: ``<gpu>.{json,md}`` (kernels), ``study-<gpu>-{layers,models}.*``, and
``gpu-check-<gpu>.{json,md}`` (what ran, how long, pass/fail, the tail of each step's output). Nothing is
downloaded: it runs with the Python it is started with (its own torch + CUDA and transformers), offline. About 6-8
minutes on one H100/H200. ``--dry-run`` runs what a CPU machine can (the tests' collection, the layer study at a
small size on the CPU) and lists the rest, writing nothing into ``benchmarks/results``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


@dataclass
class Step:
    name: str
    command: list[str]
    timeout_s: int
    env: dict[str, str] = field(default_factory=dict)
    needs_gpu: bool = True
    status: str = "not run"
    seconds: float = 0.0
    output_tail: str = ""


def environment() -> dict:
    """What this machine runs: versions, the GPU and its compute capability, nvcc."""
    info = {"python": platform.python_version(), "host": platform.node()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_cuda"] = torch.version.cuda
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        if info["gpu"]:
            major, minor = torch.cuda.get_device_capability(0)
            info["capability"] = f"{major}{minor}"
    except ImportError as exc:
        info["torch"] = f"not importable: {exc}"
        info["gpu"] = None
    from importlib.metadata import PackageNotFoundError, version

    for package in ("transformers", "triton", "gguf"):
        try:
            info[package] = version(package)
        except PackageNotFoundError:
            info[package] = None
    try:
        out = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout
        info["nvcc"] = (re.findall(r"release [\d.]+", out) or ["?"])[0]
    except OSError:
        info["nvcc"] = None
    return info


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")


def plan(env: dict, dry_run: bool, scratch: Path) -> list[Step]:
    py = sys.executable
    arch = env.get("capability") or "90"
    out = ["--out", str(scratch)] if dry_run else []
    return [
        Step(
            "build",
            [py, "setup.py", "build_ext", "--inplace", "-j", str(min(16, os.cpu_count() or 2))],
            480,
            {
                "FASTPRUNE_STRICT_BUILD": "1",
                "FASTPRUNE_CUDA": "1",  # build the CUDA modules (setup.py's default builds them where a GPU is seen)
                "FASTPRUNE_CUDA_ARCHS": arch,
                "MAX_JOBS": str(os.cpu_count() or 2),
            },
        ),
        Step(
            "tests (CUDA, Triton)",
            [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/ops", "-k", "cuda or triton or gpu"],
            240,
            needs_gpu=False,  # without a GPU they are skipped: this checks that they collect
        ),
        Step(
            "kernel benchmarks",
            [
                py,
                "-m",
                "pytest",
                "-q",
                "-s",
                "-p",
                "no:cacheprovider",
                *sorted(_benchmarks()),
                "-k",
                "cuda",
                "--benchmark-disable-gc",
            ],
            240,
        ),
        Step(
            "study: Llama-3-8B-shaped layer",
            [
                py,
                "benchmarks/study.py",
                "--skip-models",
                "--suffix=-layers",
                *(["--quick", "--device", "cpu"] if dry_run else ["--device", "cuda"]),
                *out,
            ],
            150,
            needs_gpu=False,
        ),
        Step(
            "study: SmolLM2 latency",
            [
                py,
                "benchmarks/study.py",
                "--skip-layers",
                "--skip-quality",
                "--skip-gguf",
                "--gpu-rows",
                "--device",
                "cuda",
                "--suffix=-models",
            ],
            360,  # it builds the structured and 2:4 models on the CPU first
        ),
    ]


def _benchmarks() -> list[str]:
    """The kernel benchmarks: the pytest-benchmark files (bench_cnn.py is a script of its own, for a CPU venv)."""
    files = (ROOT / "benchmarks").glob("bench_*.py")
    return [str(p.relative_to(ROOT)) for p in files if "def test_" in p.read_text()]


def _environment(step: Step) -> dict[str, str]:
    """The step's variables over this process's, with this tree first on the path: the scripts import the
    fastprune they sit in, whatever fastprune (if any) the Python has installed."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, **step.env}


def run(step: Step) -> None:
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            step.command,
            cwd=ROOT,
            env=_environment(step),
            capture_output=True,
            text=True,
            timeout=step.timeout_s,
        )
        step.status = "passed" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
        output = proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        step.status = f"timed out after {step.timeout_s} s"
        output = (exc.stdout or b"").decode(errors="replace") + (exc.stderr or b"").decode(errors="replace")
    step.seconds = round(time.perf_counter() - t0, 1)
    step.output_tail = output[-3000:]


def summary_markdown(env: dict, steps: list[Step], dry_run: bool) -> str:
    lines = [f"# gpu-check on {env.get('gpu') or 'a machine without a GPU (dry run)'}", ""]
    lines += [f"- {k}: {v}" for k, v in env.items()]
    lines += ["", "| step | status | seconds |", "|---|---|---|"]
    lines += [f"| {s.name} | {s.status} | {s.seconds} |" for s in steps]
    for s in steps:
        if s.status.startswith(("failed", "timed")):
            lines += ["", f"## {s.name}: {s.status}", "", "```", " ".join(s.command), s.output_tail, "```"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="run only what works without a GPU; write no results")
    args = p.parse_args(argv)
    env = environment()
    dry_run = args.dry_run or not env.get("gpu")
    if dry_run and not args.dry_run:
        print("no CUDA GPU visible to torch: running as --dry-run")
    scratch = Path(tempfile.mkdtemp(prefix="fastprune-gpu-check-"))
    steps = plan(env, dry_run, scratch)
    t0 = time.perf_counter()
    for step in steps:
        if dry_run and step.needs_gpu:
            step.status = "skipped (needs a GPU)"
        else:
            print(f"[{time.perf_counter() - t0:5.0f} s] {step.name}: {' '.join(step.command)}", flush=True)
            run(step)
        print(f"[{time.perf_counter() - t0:5.0f} s] {step.name}: {step.status}", flush=True)
    report = {
        "environment": env,
        "dry_run": dry_run,
        "wall_s": round(time.perf_counter() - t0),
        "steps": [asdict(s) for s in steps],
    }
    target = scratch if dry_run else RESULTS
    stem = f"gpu-check-{safe_name(env.get('gpu') or 'dry-run')}"
    (target / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    (target / f"{stem}.md").write_text(summary_markdown(env, steps, dry_run))
    print(summary_markdown(env, steps, dry_run))
    print(f"wrote {target / stem}.md")
    return 0 if all(s.status in ("passed", "skipped (needs a GPU)") for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
