"""block_influence benchmarks: the kernel vs a memcpy of the bytes it reads, the reference, the torch idiom.

Run: ``python -m pytest -q -s benchmarks/bench_block_influence.py``. Hidden states of LLM-sized layers (4096
tokens x 4096 hidden), SmolLM2's (512 x 576, and a batch of 8 such sequences), and a token-strided view as a
forward hook may hand it (``h[:, 1:]``). Per case:

- ``time_s``: ``block_influence_accumulate_`` into an existing accumulator (pytest-benchmark median), as the
  scoring hooks call it;
- ``gbps``: bytes read (x + y) per second;
- ``pct_memcpy``: a copy of the same bytes into an existing buffer, as a percentage of ``time_s`` (a copy also
  writes them, so a pure streaming read can exceed 100%);
- ``x_reference`` / ``x_idiom``: speedup over ``reference_block_influence`` (fp64) and over the plain torch
  idiom ``F.cosine_similarity(x, y, dim=-1).sum()``;
- ``bar`` / ``meets_bar``: the issue's bar (>= 1.5x the idiom) and whether this run met it;
- ``load_1min``: the machine's load average when the case ran (other work on a shared machine skews times).

On a GPU the CUDA and Triton backends are both timed (``cuda_s``, ``triton_s``): the dispatch prefers the CUDA
module, a choice that these numbers must confirm.
"""

import importlib
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import memcpy_time, time_fn

from fastprune.ops import block_influence_accumulate_, reference_block_influence

bi = importlib.import_module("fastprune.ops.block_influence")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# (name, shape of the stored hidden states, token slice applied to them)
STATES = [
    ("llm 4096 tokens", (4096, 4096), None),
    ("smollm2 512 tokens", (512, 576), None),
    ("smollm2 8x512 tokens", (8, 512, 576), None),
    ("smollm2 8x512 tokens h[:, 1:] view", (8, 513, 576), slice(1, None)),
]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MIN_X_IDIOM = 1.5
ROUNDS = 15


def idiom(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """What one writes without fastprune."""
    return F.cosine_similarity(x, y, dim=-1).sum()


def cases():
    for state in STATES:
        for dtype in ("fp32", "bf16"):
            yield (*state, dtype)
    yield (*STATES[0], "fp16")
    yield (*STATES[1], "fp16")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("name", "shape", "tokens", "dtype"), list(cases()))
def test_block_influence(benchmark, results, device, name, shape, tokens, dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen)
    y = (x + 0.5 * torch.randn(shape, generator=gen)).to(device=device, dtype=DTYPES[dtype])
    x = x.to(device=device, dtype=DTYPES[dtype])
    if tokens is not None:
        x, y = x[:, tokens], y[:, tokens]
    accum = torch.zeros(2, dtype=torch.float64, device=device)
    call = lambda: block_influence_accumulate_(accum, x, y)  # noqa: E731
    nbytes = 2 * x.numel() * x.element_size()
    copy_s = memcpy_time(nbytes, device)
    benchmark.pedantic(call, rounds=ROUNDS, warmup_rounds=2, iterations=1)
    kernel_s = benchmark.stats.stats.median
    idiom_s = time_fn(lambda: idiom(x, y), device, reps=5)
    reference_s = time_fn(lambda: reference_block_influence(x, y), device, reps=3)
    numbers = {
        "time_s": kernel_s,
        "gbps": nbytes / kernel_s / 1e9,
        "pct_memcpy": 100 * copy_s / kernel_s,
        "x_reference": reference_s / kernel_s,
        "x_idiom": idiom_s / kernel_s,
        "memcpy_s": copy_s,
        "idiom_s": idiom_s,
        "in_mb": nbytes / 2**20,
        "backend": bi._pick_backend(torch.device(device)),
        "load_1min": os.getloadavg()[0],  # the machine may be shared: numbers under load are noisy
        "bar": f">={MIN_X_IDIOM:g}x idiom",
        "meets_bar": idiom_s / kernel_s >= MIN_X_IDIOM,
    }
    if device == "cuda":
        for backend in ("cuda", "triton"):
            try:
                numbers[f"{backend}_s"] = time_fn(lambda b=backend: bi._BACKENDS[b](accum, x, y), device)
            except RuntimeError as exc:  # a backend that is not built
                numbers[f"{backend}_s"] = f"unavailable: {exc}"
    shown = "x".join(map(str, x.shape))
    results.add("block_influence", f"{name} {shown} {dtype}", device=device, **numbers)
