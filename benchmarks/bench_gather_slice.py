"""gather_slice benchmarks: the kernel vs a memcpy of the output bytes, the reference and the torch idiom.

Run: ``python -m pytest -q -s benchmarks/bench_gather_slice.py``. Indices keep 75% of the rows/columns, random
and sorted (what pruning produces). Per case:

- ``time_s``: ``gather_slice`` (pytest-benchmark median), returning fresh outputs like every real call;
- ``into_s``: ``gather_slice(..., out=...)`` into existing outputs: the copy alone, without the page faults of
  fresh memory (outputs over 32 MiB are new pages from the OS on every call: that costs about as much as the
  copy, and several times more in a VM that reports freed pages to its host);
- ``gbps``: bytes read + written (2x the output) per second of ``time_s``;
- ``pct_memcpy`` / ``pct_memcpy_into``: a copy of the output's bytes into an existing buffer, as a percentage
  of ``time_s`` / ``into_s``;
- ``pct_clone``: a copy into a fresh buffer (same page faults as the kernel), as a percentage of ``time_s``;
- ``x_reference`` / ``x_idiom``: speedup over ``reference_gather_slice`` and over indexing (``W[:, idx]``);
- ``bar`` / ``meets_bar`` / ``meets_bar_into``: the issue's bar for this case, and whether ``time_s`` /
  ``into_s`` met it in this run.

On a GPU the CUDA and Triton backends are both timed into existing outputs (``cuda_s``, ``triton_s``): the
dispatch prefers the CUDA module, a choice that these numbers must confirm.
"""

import importlib

import pytest
import torch
from conftest import DEVICES, gpu_backend_times, memcpy_time, time_fn

from fastprune.ops import gather_slice, reference_gather_slice

gs = importlib.import_module("fastprune.ops.gather_slice")

KEEP = 0.75
SHAPES = [(4096, 4096), (4096, 11008)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# The bars: (min speedup over the idiom, min % of memcpy) per device and mode.
BARS = {
    "cpu": {"cols": (2.0, 50.0), "rows": (None, 70.0)},
    "cuda": {mode: (None, 80.0) for mode in ("cols", "rows", "both")},
}
ROUNDS = 15


def kept(n: int, gen: torch.Generator, device: str) -> torch.Tensor:
    """75% of ``range(n)``, random and sorted."""
    return torch.randperm(n, generator=gen)[: int(n * KEEP)].sort().values.to(device)


def idiom(tensors, rows, cols):
    """What one writes without fastprune: plain advanced indexing, one tensor at a time."""
    out = []
    for t, r, c in zip(tensors, rows, cols, strict=True):
        if r is not None:
            t = t[r]
        if c is not None:
            t = t[:, c]
        out.append(t.contiguous())
    return out


def record(benchmark, results, device: str, case: str, mode: str, tensors, rows, cols) -> None:
    """Time the kernel and the baselines on the same inputs and record one results row."""
    call = lambda: gather_slice(tensors, rows, cols)  # noqa: E731
    out = call()
    out_bytes = sum(o.nbytes for o in out)
    copy_s = memcpy_time(out_bytes, device)
    fresh = torch.empty(out_bytes, dtype=torch.uint8, device=device)
    clone_s = time_fn(lambda: fresh.clone(), device)
    benchmark.pedantic(call, rounds=ROUNDS, warmup_rounds=2, iterations=1)
    kernel_s = benchmark.stats.stats.median
    into_s = time_fn(lambda: gather_slice(tensors, rows, cols, out=out), device)
    reference_s = time_fn(lambda: reference_gather_slice(tensors, rows, cols), device, reps=5)
    idiom_s = time_fn(lambda: idiom(tensors, rows, cols), device, reps=5)
    numbers = {
        "time_s": kernel_s,
        "gbps": 2 * out_bytes / kernel_s / 1e9,
        "into_s": into_s,
        "pct_memcpy": 100 * copy_s / kernel_s,
        "pct_memcpy_into": 100 * copy_s / into_s,
        "pct_clone": 100 * clone_s / kernel_s,
        "x_reference": reference_s / kernel_s,
        "x_idiom": idiom_s / kernel_s,
        "memcpy_s": copy_s,
        "out_mb": out_bytes / 2**20,
        "backend": gs._pick_backend(torch.device(device)),
    }
    if mode in BARS[device]:
        min_x, min_pct = BARS[device][mode]
        numbers["bar"] = f">={min_pct:g}% memcpy" + (f", >={min_x:g}x idiom" if min_x else "")
        fast_enough = min_x is None or numbers["x_idiom"] >= min_x
        numbers["meets_bar"] = numbers["pct_memcpy"] >= min_pct and fast_enough
        numbers["meets_bar_into"] = numbers["pct_memcpy_into"] >= min_pct and fast_enough
    if device == "cuda":
        numbers.update(gpu_backend_times(lambda backend: gs._BACKENDS[backend](tensors, rows, cols, out)))
    results.add("gather_slice", case, device=device, **numbers)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("mode", ["cols", "rows", "both"])
def test_single_weight(benchmark, results, device, dtype, shape, mode):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=gen).to(device=device, dtype=DTYPES[dtype])
    rows = kept(shape[0], gen, device) if mode in ("rows", "both") else None
    cols = kept(shape[1], gen, device) if mode in ("cols", "both") else None
    case = f"{mode} {shape[0]}x{shape[1]} {dtype}"
    record(benchmark, results, device, case, mode, [w], [rows], [cols])


@pytest.mark.parametrize("device", DEVICES)
def test_mlp_channels(benchmark, results, device):
    """A Llama-7B-sized MLP: gate/up rows and down columns, one call."""
    gen = torch.Generator().manual_seed(1)
    gate, up = (torch.randn(11008, 4096, generator=gen).to(device, torch.bfloat16) for _ in range(2))
    down = torch.randn(4096, 11008, generator=gen).to(device, torch.bfloat16)
    keep = kept(11008, gen, device)
    record(
        benchmark,
        results,
        device,
        "mlp gate/up rows + down cols bf16",
        "group",
        [gate, up, down],
        [keep, keep, None],
        [None, None, keep],
    )


@pytest.mark.parametrize("device", DEVICES)
def test_attention_heads(benchmark, results, device):
    """A Llama-7B-sized attention block: 24 of 32 heads of q/k/v rows and o columns, one call."""
    gen = torch.Generator().manual_seed(2)
    q, k, v, o = (torch.randn(4096, 4096, generator=gen).to(device, torch.bfloat16) for _ in range(4))
    heads = torch.randperm(32, generator=gen)[:24].sort().values
    keep = (heads[:, None] * 128 + torch.arange(128)).flatten().to(device)
    record(
        benchmark,
        results,
        device,
        "attention 24/32 heads q/k/v rows + o cols bf16",
        "group",
        [q, k, v, o],
        [keep, keep, keep, None],
        [None, None, None, keep],
    )
