"""Triton 2:4 kernels: decompress, and the product with few tokens (GEMV, decode).

The public entry points are in ``fastprune.ops.sparse24``; this module is their Triton backend. Layout (see
``csrc/cpu/sparse24.cpp``): values [out, in/2], meta [out, ceil(in/8)] uint8, one nibble per group of 4
inputs (bits 0-1 first kept position, bits 2-3 second), group 2b in the low nibble of byte b.
"""

import torch
import triton
import triton.language as tl

# Tile sizes: not tuned on a GPU (none was available when written); confirm with
# benchmarks/bench_sparse24.py.
_DECOMPRESS_ROWS = 16
_DECOMPRESS_COLS = 128
_GEMV_ROWS = 16
_GEMV_GROUPS = 64
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _decompress_kernel(values, meta, out, rows, cols, mcols, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
    c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]
    live = (r < rows) & (c < cols)
    g = c // 4
    byte = tl.load(meta + r * mcols + g // 2, mask=live, other=0).to(tl.int32)
    nib = (byte >> ((g % 2) * 4).to(tl.int32)) & 15
    pos = (c % 4).to(tl.int32)
    first = pos == (nib & 3)
    second = pos == (nib >> 2)
    # A position named twice takes the second value, as in the C++ and CUDA kernels.
    src = r * (cols // 2) + 2 * g + second.to(tl.int64)
    v = tl.load(values + src, mask=live & (first | second), other=0)
    tl.store(out + r * cols + c, v, mask=live)


@triton.jit
def _gemv_kernel(
    x,
    values,
    meta,
    bias,
    y,
    rows,
    cols,
    mcols,
    HAS_BIAS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    # Program (row block, token): fp32 sums of value * x[position] over the rows' groups.
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    t = tl.program_id(1).to(tl.int64)
    live_r = r < rows
    groups = cols // 4
    acc = tl.full([BLOCK_R], 0.0, tl.float32)  # tl.zeros is a jit helper the interpreter cannot call
    for g0 in range(0, groups, BLOCK_G):
        g = g0 + tl.arange(0, BLOCK_G)[None, :]
        live = live_r[:, None] & (g < groups)
        byte = tl.load(meta + r[:, None] * mcols + g // 2, mask=live, other=0).to(tl.int32)
        nib = (byte >> ((g % 2) * 4).to(tl.int32)) & 15
        v = values + r[:, None] * (cols // 2) + 2 * g
        v0 = tl.load(v, mask=live, other=0).to(tl.float32)
        v1 = tl.load(v + 1, mask=live, other=0).to(tl.float32)
        xg = x + t * cols + 4 * g
        x0 = tl.load(xg + (nib & 3), mask=live, other=0).to(tl.float32)
        x1 = tl.load(xg + (nib >> 2), mask=live, other=0).to(tl.float32)
        acc += tl.sum(v0 * x0 + v1 * x1, axis=1)
    if HAS_BIAS:
        acc += tl.load(bias + r, mask=live_r, other=0).to(tl.float32)
    tl.store(y + t * rows + r, acc.to(y.dtype.element_ty), mask=live_r)


def _check_compressed(values: torch.Tensor, meta: torch.Tensor) -> None:
    if values.dim() != 2 or values.dtype not in _DTYPES:
        raise RuntimeError("sparse24 (triton): values must be a 2-D float32, bfloat16 or float16 tensor")
    if values.shape[1] % 2:
        raise RuntimeError(
            f"sparse24 (triton): values has {values.shape[1]} columns; 2:4 needs in_features divisible by 4"
        )
    expected = (values.shape[0], (values.shape[1] // 2 + 1) // 2)
    if meta.dtype != torch.uint8 or tuple(meta.shape) != expected:
        raise RuntimeError(
            f"sparse24 (triton): meta must be uint8 of shape {list(expected)}, got {meta.dtype} {list(meta.shape)}"
        )


def decompress(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """Dense [out, in] weight with zeros where pruned."""
    _check_compressed(values, meta)
    values, meta = values.contiguous(), meta.contiguous()
    rows, cols = values.shape[0], 2 * values.shape[1]
    out = torch.empty(rows, cols, dtype=values.dtype, device=values.device)
    if out.numel():
        grid = (triton.cdiv(rows, _DECOMPRESS_ROWS), triton.cdiv(cols, _DECOMPRESS_COLS))
        _decompress_kernel[grid](values, meta, out, rows, cols, meta.shape[1], _DECOMPRESS_ROWS, _DECOMPRESS_COLS)
    return out


def gemv(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y [tokens, out] = x [tokens, in] @ W^T (+ bias), one program per block of rows and token."""
    _check_compressed(values, meta)
    rows, cols = values.shape[0], 2 * values.shape[1]
    if x.dim() != 2 or x.shape[1] != cols:
        raise RuntimeError(f"sparse24 (triton): x has {x.shape[-1]} features, the compressed weight has {cols}")
    if x.dtype != values.dtype:
        raise RuntimeError(f"sparse24 (triton): x dtype {x.dtype} must equal values dtype {values.dtype}")
    if bias is not None and tuple(bias.shape) != (rows,):
        raise RuntimeError(f"sparse24 (triton): bias must be 1-D with {rows} entries, got {list(bias.shape)}")
    if bias is not None and bias.dtype != x.dtype:
        raise RuntimeError("sparse24 (triton): bias dtype must equal x dtype")
    x, values, meta = x.contiguous(), values.contiguous(), meta.contiguous()
    y = torch.empty(x.shape[0], rows, dtype=x.dtype, device=x.device)
    if y.numel():
        grid = (triton.cdiv(rows, _GEMV_ROWS), x.shape[0])
        _gemv_kernel[grid](
            x,
            values,
            meta,
            bias.contiguous() if bias is not None else x,  # placeholder pointer, never read without HAS_BIAS
            y,
            rows,
            cols,
            meta.shape[1],
            bias is not None,
            _GEMV_ROWS,
            _GEMV_GROUPS,
        )
    return y
