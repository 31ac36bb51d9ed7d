"""Triton head_taylor: per-row or per-column sums of |w*g| and (w*g)^2, never materialising w*g.

The public entry point is ``fastprune.ops.head_taylor``; this module is its Triton backend. It returns
per-unit sums (one per row for dim 0, one per column for dim 1); the caller adds units into groups.
Products and in-program sums are fp32; programs' partial sums are added in fp64 by the caller's torch ops.
"""

import torch
import triton
import triton.language as tl

# Tile sizes. Not tuned on a GPU (none was available when written): confirm with
# benchmarks/bench_head_taylor.py.
_ROW_BLOCK = 1024  # columns per step of a row-sum program
_COL_BLOCK_C = 128  # columns per column-sum program
_COL_BLOCK_R = 8  # rows per step of a column-sum program
_ROWS_PER_PROGRAM = 256  # rows reduced by one column-sum program before its partial goes out


@triton.jit
def _row_sums_kernel(w, g, out, rows, cols, w_stride, g_stride, BLOCK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    acc_abs = tl.zeros([BLOCK], dtype=tl.float32)
    acc_sq = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, cols, BLOCK):
        c = start + tl.arange(0, BLOCK)
        mask = c < cols
        p = tl.load(w + r * w_stride + c, mask=mask, other=0).to(tl.float32) * tl.load(
            g + r * g_stride + c, mask=mask, other=0
        ).to(tl.float32)
        acc_abs += tl.abs(p)
        acc_sq += p * p
    tl.store(out + r, tl.sum(acc_abs, axis=0))
    tl.store(out + rows + r, tl.sum(acc_sq, axis=0))


@triton.jit
def _col_sums_kernel(
    w,
    g,
    out,
    rows,
    cols,
    w_stride,
    g_stride,
    ROWS_PER_PROGRAM: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    c = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    chunk = tl.program_id(1).to(tl.int64)
    mask_c = c < cols
    row_end = tl.minimum(chunk * ROWS_PER_PROGRAM + ROWS_PER_PROGRAM, rows)
    acc_abs = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    acc_sq = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    for start in range(0, ROWS_PER_PROGRAM, BLOCK_R):
        r = chunk * ROWS_PER_PROGRAM + start + tl.arange(0, BLOCK_R)
        mask = (r < row_end)[:, None] & mask_c[None, :]
        p = tl.load(w + r[:, None] * w_stride + c[None, :], mask=mask, other=0).to(tl.float32) * tl.load(
            g + r[:, None] * g_stride + c[None, :], mask=mask, other=0
        ).to(tl.float32)
        acc_abs += tl.abs(p)
        acc_sq += p * p
    base = out + chunk * 2 * cols
    tl.store(base + c, tl.sum(acc_abs, axis=0), mask=mask_c)
    tl.store(base + cols + c, tl.sum(acc_sq, axis=0), mask=mask_c)


def unit_sums(w: torch.Tensor, g: torch.Tensor, dim: int) -> torch.Tensor:
    """fp64 ``[2, units]``: sums of |w*g| and (w*g)^2 per row (dim 0) or column (dim 1) of 2-D ``w``, ``g``.

    Both must have unit column stride (any row stride).
    """
    rows, cols = w.shape
    if w.numel() == 0:
        return torch.zeros(2, w.shape[dim], dtype=torch.float64, device=w.device)
    if dim == 0:
        out = torch.empty(2, rows, dtype=torch.float32, device=w.device)
        block = min(_ROW_BLOCK, triton.next_power_of_2(cols))
        _row_sums_kernel[(rows,)](w, g, out, rows, cols, w.stride(0), g.stride(0), BLOCK=block)
        return out.double()
    chunks = triton.cdiv(rows, _ROWS_PER_PROGRAM)
    partial = torch.empty(chunks, 2, cols, dtype=torch.float32, device=w.device)
    block_c = min(_COL_BLOCK_C, triton.next_power_of_2(cols))
    _col_sums_kernel[(triton.cdiv(cols, block_c), chunks)](
        w,
        g,
        partial,
        rows,
        cols,
        w.stride(0),
        g.stride(0),
        ROWS_PER_PROGRAM=_ROWS_PER_PROGRAM,
        BLOCK_R=_COL_BLOCK_R,
        BLOCK_C=block_c,
    )
    return partial.double().sum(0)
