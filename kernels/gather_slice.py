"""Triton gather_slice: one launch per tensor, each program copies a tile of output rows x columns.

The public entry point is ``fastprune.ops.gather_slice``; this module is its Triton backend. The source is
read through its strides (no contiguous copy). The caller checks the indices; an out-of-range one is masked
(its element reads as zero) so that no program reads outside the source.
"""

import torch
import triton
import triton.language as tl

# Elements per program. Not tuned on a GPU (none was available when written): confirm with
# benchmarks/bench_gather_slice.py.
_TILE_ELEMENTS = 4096
_MAX_BLOCK_COLS = 256


@triton.jit
def _gather_slice_kernel(
    src,
    dst,
    rows,
    cols,
    src_rows,
    src_cols,
    stride_row,
    stride_col,
    out_rows,
    out_cols,
    HAS_ROWS: tl.constexpr,
    HAS_COLS: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    out_r = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    out_c = tl.program_id(1).to(tl.int64) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    mask_r = out_r < out_rows
    mask_c = out_c < out_cols
    if HAS_ROWS:  # noqa: SIM108 (constexpr branches)
        src_r = tl.load(rows + out_r, mask=mask_r, other=0).to(tl.int64)
    else:
        src_r = out_r
    if HAS_COLS:  # noqa: SIM108
        src_c = tl.load(cols + out_c, mask=mask_c, other=0).to(tl.int64)
    else:
        src_c = out_c
    ok_r = mask_r & (src_r >= 0) & (src_r < src_rows)
    ok_c = mask_c & (src_c >= 0) & (src_c < src_cols)
    values = tl.load(
        src + src_r[:, None] * stride_row + src_c[None, :] * stride_col,
        mask=ok_r[:, None] & ok_c[None, :],
        other=0,
    )
    tl.store(dst + out_r[:, None] * out_cols + out_c[None, :], values, mask=mask_r[:, None] & mask_c[None, :])


def gather_slice_into(t: torch.Tensor, rows: torch.Tensor | None, cols: torch.Tensor | None, out: torch.Tensor) -> None:
    """Write ``t[rows][:, cols]`` into the contiguous ``out`` (1-D ``t`` takes rows only)."""
    src_rows = t.shape[0]
    src_cols = t.shape[1] if t.dim() == 2 else 1
    out_rows = out.shape[0]
    out_cols = out.shape[1] if out.dim() == 2 else 1
    if out.numel() == 0:
        return
    block_cols = min(_MAX_BLOCK_COLS, triton.next_power_of_2(out_cols))
    block_rows = max(1, min(_TILE_ELEMENTS // block_cols, triton.next_power_of_2(out_rows)))
    grid = (triton.cdiv(out_rows, block_rows), triton.cdiv(out_cols, block_cols))
    _gather_slice_kernel[grid](
        t,
        out,
        rows if rows is not None else t,  # a placeholder pointer, never read when the flag is off
        cols if cols is not None else t,
        src_rows,
        src_cols,
        t.stride(0),
        t.stride(1) if t.dim() == 2 else 0,
        out_rows,
        out_cols,
        HAS_ROWS=rows is not None,
        HAS_COLS=cols is not None,
        BLOCK_ROWS=block_rows,
        BLOCK_COLS=block_cols,
    )
