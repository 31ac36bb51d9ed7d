"""Triton block_influence: per-token cosine between hidden states x and y, each read once.

The public entry point is ``fastprune.ops.block_influence``; this module is its Triton backend. One program
per token accumulates the dot product and both squared norms in fp32 and writes the token's cosine; the
caller sums the cosines in fp64.
"""

import torch
import triton
import triton.language as tl

# Hidden-dim elements per step. Not tuned on a GPU (none was available when written): confirm with
# benchmarks/bench_block_influence.py.
_BLOCK = 1024
_EPS = 1e-8  # F.cosine_similarity's default eps


@triton.jit
def _token_cosine_kernel(x, y, out, d, x_stride, y_stride, EPS: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    dot = tl.zeros([BLOCK], dtype=tl.float32)
    xx = tl.zeros([BLOCK], dtype=tl.float32)
    yy = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, d, BLOCK):
        k = start + tl.arange(0, BLOCK)
        mask = k < d
        xv = tl.load(x + t * x_stride + k, mask=mask, other=0).to(tl.float32)
        yv = tl.load(y + t * y_stride + k, mask=mask, other=0).to(tl.float32)
        dot += xv * yv
        xx += xv * xv
        yy += yv * yv
    x_norm = tl.maximum(tl.sqrt(tl.sum(xx, axis=0)), EPS)
    y_norm = tl.maximum(tl.sqrt(tl.sum(yy, axis=0)), EPS)
    tl.store(out + t, tl.sum(dot, axis=0) / (x_norm * y_norm))


def token_cosines(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """fp32 ``[tokens]``: cos(x_t, y_t) of 2-D ``x``, ``y`` (unit hidden stride, any token stride)."""
    tokens, d = x.shape
    out = torch.zeros(tokens, dtype=torch.float32, device=x.device)
    if tokens == 0 or d == 0:
        return out
    block = min(_BLOCK, triton.next_power_of_2(d))
    _token_cosine_kernel[(tokens,)](x, y, out, d, x.stride(0), y.stride(0), EPS=_EPS, BLOCK=block)
    return out
