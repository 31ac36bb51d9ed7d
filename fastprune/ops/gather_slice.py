"""gather_slice: keep chosen rows and/or columns of several weights, writing new contiguous tensors in one call.

Surgery cuts a layer with one call per coupled group, e.g. q/k/v rows + o columns, or gate/up rows + down
columns. Each tensor has its own (optional) row and column index; 1-D tensors (biases) take rows only.
"""

from collections.abc import Sequence

import torch
from torch import Tensor

from fastprune.ops import _native


def reference_gather_slice(
    tensors: Sequence[Tensor], rows: Sequence[Tensor | None], cols: Sequence[Tensor | None]
) -> list[Tensor]:
    """Plain PyTorch: ``t[rows][:, cols]`` for each tensor, as a new contiguous tensor."""
    out = []
    for t, r, c in zip(tensors, rows, cols, strict=True):
        if r is not None:
            t = t.index_select(0, r)
        if c is not None:
            t = t.index_select(1, c)
        out.append(t.contiguous().clone() if r is None and c is None else t.contiguous())
    return out


def _check_args(tensors: Sequence[Tensor], rows: Sequence[Tensor | None], cols: Sequence[Tensor | None]) -> None:
    torch._check(len(tensors) == len(rows) == len(cols), lambda: "gather_slice: one row and col entry per tensor")
    for i, (t, r, c) in enumerate(zip(tensors, rows, cols, strict=True)):
        torch._check(t.dim() in (1, 2), lambda i=i: f"gather_slice: tensor {i} must be 1-D or 2-D")
        torch._check(
            c is None or t.dim() == 2, lambda i=i: f"gather_slice: tensor {i} is 1-D and cannot take column indices"
        )
        for name, idx in (("rows", r), ("cols", c)):
            if idx is None:
                continue
            torch._check(idx.dim() == 1, lambda i=i, n=name: f"gather_slice: {n} of tensor {i} must be 1-D")
            torch._check(
                idx.dtype in (torch.int32, torch.int64),
                lambda i=i, n=name: f"gather_slice: {n} of tensor {i} must be int32 or int64",
            )
            torch._check(
                idx.device == t.device, lambda i=i, n=name: f"gather_slice: {n} of tensor {i} is on another device"
            )


def _check_bounds(tensors: Sequence[Tensor], rows: Sequence[Tensor | None], cols: Sequence[Tensor | None]) -> None:
    for i, (t, r, c) in enumerate(zip(tensors, rows, cols, strict=True)):
        for dim, idx in ((0, r), (1, c)):
            if idx is None or idx.numel() == 0:
                continue
            lo, hi = int(idx.min()), int(idx.max())
            if lo < 0 or hi >= t.shape[dim]:
                raise IndexError(
                    f"gather_slice: index {hi if hi >= t.shape[dim] else lo} out of range for dim {dim} "
                    f"of tensor {i} with size {t.shape[dim]}"
                )


@torch.library.custom_op("fastprune::gather_slice", mutates_args=())
def _gather_slice_op(tensors: list[Tensor], rows: list[Tensor | None], cols: list[Tensor | None]) -> list[Tensor]:
    _check_bounds(tensors, rows, cols)
    if tensors and tensors[0].device.type == "cpu" and _native.cpu_extension("gather_slice"):
        return torch.ops.fastprune_cpu.gather_slice(tensors, rows, cols)
    return reference_gather_slice(tensors, rows, cols)


@_gather_slice_op.register_fake
def _(tensors, rows, cols):
    _check_args(tensors, rows, cols)
    out = []
    for t, r, c in zip(tensors, rows, cols, strict=True):
        shape = list(t.shape)
        if r is not None:
            shape[0] = r.shape[0]
        if c is not None:
            shape[1] = c.shape[0]
        out.append(t.new_empty(shape))
    return out


def gather_slice(
    tensors: Sequence[Tensor],
    rows: Sequence[Tensor | None] | None = None,
    cols: Sequence[Tensor | None] | None = None,
) -> list[Tensor]:
    """Return ``t[rows[i]][:, cols[i]]`` for every tensor as new contiguous tensors (None keeps that dim whole)."""
    tensors = list(tensors)
    rows = list(rows) if rows is not None else [None] * len(tensors)
    cols = list(cols) if cols is not None else [None] * len(tensors)
    _check_args(tensors, rows, cols)
    return _gather_slice_op(tensors, rows, cols)
