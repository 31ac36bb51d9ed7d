"""block_influence benchmarks: the kernel vs a memcpy of the bytes it reads, the reference, the torch idiom.

Run: ``python -m pytest -q -s benchmarks/bench_block_influence.py``. Hidden states of LLM-sized layers (4096
tokens x 4096 hidden), SmolLM2's (512 x 576, and a batch of 8 such sequences), and a token-strided view as a
forward hook may hand it (``h[:, 1:]``). Per case, the numbers of ``conftest.streaming_numbers``: ``time_s`` is
``block_influence_accumulate_`` into an existing accumulator, as the scoring hooks call it; ``gbps`` counts
x + y; ``x_reference`` is over ``reference_block_influence`` (fp64) and ``x_idiom`` over the plain torch idiom
``F.cosine_similarity(x, y, dim=-1).sum()``.

On a GPU the CUDA and Triton backends are both timed (``cuda_s``, ``triton_s``): the dispatch prefers the CUDA
module, a choice that these numbers must confirm.
"""

import importlib

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICES, gpu_backend_times, streaming_numbers

from fastprune.ops import block_influence_accumulate_, reference_block_influence

bi = importlib.import_module("fastprune.ops.block_influence")

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
    numbers = streaming_numbers(
        benchmark,
        call,
        idiom=lambda: idiom(x, y),
        reference=lambda: reference_block_influence(x, y),
        nbytes=2 * x.numel() * x.element_size(),
        device=device,
        rounds=ROUNDS,
        min_x_idiom=MIN_X_IDIOM,
    )
    numbers["backend"] = bi._pick_backend(torch.device(device))
    if device == "cuda":
        numbers.update(gpu_backend_times(lambda backend: bi._BACKENDS[backend](accum, x, y)))
    shown = "x".join(map(str, x.shape))
    results.add("block_influence", f"{name} {shown} {dtype}", device=device, **numbers)
