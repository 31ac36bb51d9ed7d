"""Shared benchmark plumbing: timing, a same-size memcpy baseline, the numbers every suite records, and the
results file.

Every suite records rows with ``results.add(family, case, **numbers)``; at the end of the session the rows are
merged into ``benchmarks/results/<device>.json`` (keyed by family and case, so suites can run separately) and
rendered to ``<device>.md``.
"""

import json
import os
import platform
import re
import statistics
import subprocess
import time
from pathlib import Path

import pytest
import torch

RESULTS_DIR = Path(__file__).parent / "results"
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def device_name(device: str = "cpu") -> str:
    """A file-name-safe description of the machine the numbers come from."""
    if device.startswith("cuda") and torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
    else:
        name = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        name = f"{name} x{torch.get_num_threads()}threads"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-")


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_fn(fn, device: str = "cpu", warmup: int = 2, reps: int = 10, min_time: float = 0.2) -> float:
    """Median wall time of ``fn()`` in seconds (synchronised on CUDA), at least ``reps`` runs or ``min_time``."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    start = time.perf_counter()
    while len(times) < reps or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
        if len(times) >= 1000:
            break
    return statistics.median(times)


def memcpy_time(nbytes: int, device: str = "cpu") -> float:
    """Time to copy ``nbytes`` into an existing buffer: the bandwidth ceiling a kernel is compared with."""
    src = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    return time_fn(lambda: dst.copy_(src), device)


def streaming_numbers(
    benchmark, call, idiom, reference, nbytes: int, device: str, rounds: int, min_x_idiom: float
) -> dict:
    """Time a kernel that streams ``nbytes`` of input once, and the row of numbers its suite records.

    - ``time_s``: ``call()`` (pytest-benchmark median over ``rounds``);
    - ``gbps``: bytes read per second;
    - ``pct_memcpy``: a copy of the same bytes into an existing buffer, as a percentage of ``time_s`` (a copy also
      writes them, so a pure streaming read can exceed 100%);
    - ``x_reference`` / ``x_idiom``: speedup over ``reference()`` and over ``idiom()``, the plain torch code;
    - ``bar`` / ``meets_bar``: the issue's bar (``>= min_x_idiom`` times the idiom) and whether this run met it;
    - ``load_1min``: the machine's load average when the case ran (other work on a shared machine skews times).
    """
    copy_s = memcpy_time(nbytes, device)
    benchmark.pedantic(call, rounds=rounds, warmup_rounds=2, iterations=1)
    kernel_s = benchmark.stats.stats.median
    idiom_s = time_fn(idiom, device, reps=5)
    reference_s = time_fn(reference, device, reps=3)
    return {
        "time_s": kernel_s,
        "gbps": nbytes / kernel_s / 1e9,
        "pct_memcpy": 100 * copy_s / kernel_s,
        "x_reference": reference_s / kernel_s,
        "x_idiom": idiom_s / kernel_s,
        "memcpy_s": copy_s,
        "idiom_s": idiom_s,
        "in_mb": nbytes / 2**20,
        "load_1min": os.getloadavg()[0],  # the machine may be shared: numbers under load are noisy
        "bar": f">={min_x_idiom:g}x idiom",
        "meets_bar": idiom_s / kernel_s >= min_x_idiom,
    }


def gpu_backend_times(run_backend) -> dict:
    """``cuda_s`` / ``triton_s``: times of ``run_backend("cuda")`` and ``run_backend("triton")``.

    The dispatch prefers the CUDA module over Triton without a measurement; these numbers must confirm it.
    A backend that is not built is recorded as ``unavailable: <why>``.
    """
    numbers = {}
    for backend in ("cuda", "triton"):
        try:
            numbers[f"{backend}_s"] = time_fn(lambda b=backend: run_backend(b), "cuda")
        except RuntimeError as exc:  # a backend that is not built
            numbers[f"{backend}_s"] = f"unavailable: {exc}"
    return numbers


def _git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
        ).stdout.strip()
    except OSError:
        return "unknown"


class Results:
    def __init__(self):
        self.rows: dict[str, dict] = {}  # device -> {family -> {case -> numbers}}

    def add(self, family: str, case: str, device: str = "cpu", **numbers) -> None:
        dev = device_name(device)
        self.rows.setdefault(dev, {}).setdefault(family, {})[case] = numbers
        shown = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in numbers.items())
        print(f"\n[{family}] {case}: {shown}")

    def write(self) -> None:
        RESULTS_DIR.mkdir(exist_ok=True)
        for dev, families in self.rows.items():
            path = RESULTS_DIR / f"{dev}.json"
            data = json.loads(path.read_text()) if path.exists() else {"families": {}}
            data["device"] = dev
            data["versions"] = {"torch": torch.__version__, "python": platform.python_version()}
            try:
                import triton

                data["versions"]["triton"] = triton.__version__
            except ImportError:
                pass
            data["commit"] = _git_commit()
            data["threads"] = torch.get_num_threads()
            for family, cases in families.items():
                data["families"].setdefault(family, {}).update(cases)
            path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
            path.with_suffix(".md").write_text(_markdown(data))


def _markdown(data: dict) -> str:
    lines = [
        f"# Kernel benchmarks on {data['device']}",
        "",
        f"commit {data['commit']}, versions {data['versions']}",
        "",
    ]
    for family, cases in sorted(data["families"].items()):
        cols = sorted({k for numbers in cases.values() for k in numbers})
        lines += [f"## {family}", "", "| case | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for case, numbers in sorted(cases.items()):
            cells = [
                f"{numbers[c]:.4g}" if isinstance(numbers.get(c), float) else str(numbers.get(c, "")) for c in cols
            ]
            lines.append(f"| {case} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


@pytest.fixture(scope="session")
def results():
    r = Results()
    yield r
    r.write()
