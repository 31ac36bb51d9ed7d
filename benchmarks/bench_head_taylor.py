"""head_taylor benchmarks: the kernel vs a memcpy of the bytes it reads, the reference and the torch idiom.

Run: ``python -m pytest -q -s benchmarks/bench_head_taylor.py``. LLM-sized weights (4096x4096 q/o_proj,
4096x11008 down_proj, 11008x4096 gate/up_proj) grouped along each dim: 128-wide head groups along a 4096 dim,
single channels along an 11008 dim. Per case, the numbers of ``conftest.streaming_numbers``: ``time_s`` is
``head_taylor_accumulate_`` into existing scores, as scoring calls it; ``gbps`` counts weight + grad;
``x_reference`` is over ``reference_head_taylor`` (fp64) and ``x_idiom`` over the plain torch idiom
``p = w * g; p.abs().view(...).sum(...)`` plus ``p.square().view(...).sum(...)`` (fp32 sums).

On a GPU the CUDA and Triton backends are both timed (``cuda_s``, ``triton_s``): the dispatch prefers the CUDA
module, a choice that these numbers must confirm.
"""

import importlib

import pytest
import torch
from conftest import DEVICES, gpu_backend_times, streaming_numbers

from fastprune.ops import head_taylor_accumulate_, reference_head_taylor

ht = importlib.import_module("fastprune.ops.head_taylor")

# (weight, shape, dim, group_size): what scoring reduces in a Llama-7B-sized layer, both dims of each shape.
LAYERS = [
    ("q_proj rows per head", (4096, 4096), 0, 128),
    ("o_proj cols per head", (4096, 4096), 1, 128),
    ("down_proj cols per channel", (4096, 11008), 1, 1),
    ("down_proj rows per hidden channel", (4096, 11008), 0, 1),
    ("gate_proj rows per channel", (11008, 4096), 0, 1),
    ("gate_proj cols per head-sized group", (11008, 4096), 1, 128),
]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MIN_X_IDIOM = 1.5
ROUNDS = 15


def idiom(w: torch.Tensor, g: torch.Tensor, dim: int, group_size: int) -> torch.Tensor:
    """What one writes without fastprune: materialise w*g, then one reduction per score."""
    p = w * g
    if dim == 0:
        grouped, axes = p.view(-1, group_size * p.shape[1]), 1
    else:
        grouped, axes = p.view(p.shape[0], -1, group_size), (0, 2)
    taylor = grouped.abs().sum(axes, dtype=torch.float32)
    fisher = grouped.square().sum(axes, dtype=torch.float32)
    return torch.stack((taylor, fisher))


def cases():
    for layer in LAYERS:
        for dtype in ("fp32", "bf16"):
            yield (*layer, dtype)
    for layer in LAYERS[:2]:
        yield (*layer, "fp16")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("name", "shape", "dim", "group_size", "dtype"), list(cases()))
def test_head_taylor(benchmark, results, device, name, shape, dim, group_size, dtype):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=gen).to(device=device, dtype=DTYPES[dtype])
    g = (torch.randn(shape, generator=gen) * 1e-3).to(device=device, dtype=DTYPES[dtype])
    scores = torch.zeros(2, shape[dim] // group_size, device=device)
    call = lambda: head_taylor_accumulate_(scores, w, g, dim=dim, group_size=group_size)  # noqa: E731
    numbers = streaming_numbers(
        benchmark,
        call,
        idiom=lambda: idiom(w, g, dim, group_size),
        reference=lambda: reference_head_taylor(w, g, dim=dim, group_size=group_size),
        nbytes=w.nbytes + g.nbytes,
        device=device,
        rounds=ROUNDS,
        min_x_idiom=MIN_X_IDIOM,
    )
    numbers["backend"] = ht._pick_backend(torch.device(device))
    if device == "cuda":
        numbers.update(gpu_backend_times(lambda backend: ht._BACKENDS[backend](scores, w, g, dim, group_size)))
    case = f"{name} {shape[0]}x{shape[1]} dim{dim} gs{group_size} {dtype}"
    results.add("head_taylor", case, device=device, **numbers)
