"""gather_slice: keep chosen rows and/or columns of several weights, as new contiguous tensors, in one call.

Surgery cuts a layer with one call per coupled group, e.g. q/k/v rows + o columns, or gate/up rows + down
columns. Each tensor has its own (optional) row and column index; 1-D tensors (biases) take rows only.
Indices are int32 or int64, may repeat or be unsorted, and may be empty (giving an empty dim).

Backends (``_BACKENDS``, private; tests and benchmarks call them directly by name):

- ``"cpu"``: C++ kernel (``csrc/cpu/gather_slice.cpp``), all tensors in one parallel pass.
- ``"cuda"``: CUDA kernel (``csrc/cuda/gather_slice.cu``), all tensors in one launch.
- ``"triton"``: Triton kernel (``kernels/gather_slice.py``), one launch per tensor; CPU tensors need
  ``TRITON_INTERPRET=1``.
- ``"reference"``: plain PyTorch.

``gather_slice(..., out=...)`` writes into given tensors instead (op ``fastprune::gather_slice_out``); it also
lets benchmarks time the copy apart from allocating fresh output memory, which costs page faults.

Dispatch (``_pick_backend``): CPU -> Triton when ``TRITON_INTERPRET=1`` (tests), else C++, else the reference.
CUDA -> the CUDA module, else Triton, else the reference. The CUDA module is preferred over Triton without a
measurement: no GPU was available when they were written, so the choice must be confirmed by running
``benchmarks/bench_gather_slice.py`` on a GPU (both backends are timed there).
"""

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from fastprune.ops import _native

Indices = Sequence[Tensor | None]
Outputs = Sequence[Tensor] | None


def reference_gather_slice(tensors: Sequence[Tensor], rows: Indices, cols: Indices) -> list[Tensor]:
    """Plain PyTorch: ``t[rows][:, cols]`` for each tensor, as a new contiguous tensor."""
    out = []
    for t, r, c in zip(tensors, rows, cols, strict=True):
        if r is not None:
            t = t.index_select(0, r)
        if c is not None:
            t = t.index_select(1, c)
        out.append(t.contiguous().clone() if r is None and c is None else t.contiguous())
    return out


def _check_args(tensors: Sequence[Tensor], rows: Indices, cols: Indices) -> None:
    torch._check(len(tensors) == len(rows) == len(cols), lambda: "gather_slice: one row and col entry per tensor")
    for i, (t, r, c) in enumerate(zip(tensors, rows, cols, strict=True)):
        torch._check(t.dim() in (1, 2), lambda i=i: f"gather_slice: tensor {i} must be 1-D or 2-D")
        torch._check(
            t.device == tensors[0].device,
            lambda i=i: f"gather_slice: tensor {i} is on another device than tensor 0",
        )
        torch._check(
            c is None or t.dim() == 2,
            lambda i=i: f"gather_slice: tensor {i} is 1-D and cannot take column indices",
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
                idx.device == t.device,
                lambda i=i, n=name: f"gather_slice: {n} of tensor {i} is on another device",
            )


def _check_bounds(tensors: Sequence[Tensor], rows: Indices, cols: Indices) -> None:
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


def _run_reference(tensors: Sequence[Tensor], rows: Indices, cols: Indices, out: Outputs = None) -> list[Tensor]:
    _check_bounds(tensors, rows, cols)
    result = reference_gather_slice(tensors, rows, cols)
    if out is None:
        return result
    for o, r in zip(out, result, strict=True):
        o.copy_(r)
    return list(out)


def _run_cpu(tensors: Sequence[Tensor], rows: Indices, cols: Indices, out: Outputs = None) -> list[Tensor]:
    # The C++ kernel checks every index itself (IndexError) before writing anything.
    _native.require_cpu_extension("gather_slice")
    if out is None:
        return list(torch.ops.fastprune_cpu.gather_slice(list(tensors), list(rows), list(cols)))
    torch.ops.fastprune_cpu.gather_slice_out(list(tensors), list(rows), list(cols), list(out))
    return list(out)


def _run_cuda(tensors: Sequence[Tensor], rows: Indices, cols: Indices, out: Outputs = None) -> list[Tensor]:
    # The CUDA kernel checks the indices on the device and the module raises IndexError after the launch:
    # one stream synchronisation instead of a min/max round trip per index tensor.
    module = _native.require_cuda_module("gather_slice")
    outputs = _outputs(tensors, rows, cols, out)
    jobs, keep = [], []  # keep: contiguous copies alive until the kernel has run
    for t, r, c, o in zip(tensors, rows, cols, outputs, strict=True):
        src = t if t.dim() == 1 or t.shape[1] <= 1 or t.stride(1) == 1 else t.contiguous()
        r, c = _contiguous(r), _contiguous(c)
        keep += [src, r, c]
        jobs.append(
            [
                src.data_ptr(),
                o.data_ptr(),
                0 if r is None else r.data_ptr(),
                0 if c is None else c.data_ptr(),
                _index_code(r),
                _index_code(c),
                t.element_size(),
                t.shape[0],
                t.shape[1] if t.dim() == 2 else 1,
                src.stride(0),
                o.shape[0],
                o.shape[1] if o.dim() == 2 else 1,
            ]
        )
    if jobs:
        device = tensors[0].device
        workspace = torch.empty(module.workspace_bytes(len(jobs)), dtype=torch.uint8, device=device)
        index, stream = _native.cuda_device_index(device), _native.cuda_stream(device)
        module.gather_slice(jobs, workspace.data_ptr(), workspace.numel(), index, stream)
    return outputs


def _run_triton(tensors: Sequence[Tensor], rows: Indices, cols: Indices, out: Outputs = None) -> list[Tensor]:
    _native.require_triton()
    from fastprune.kernels.gather_slice import gather_slice_into

    _check_bounds(tensors, rows, cols)
    outputs = _outputs(tensors, rows, cols, out)
    for t, r, c, o in zip(tensors, rows, cols, outputs, strict=True):
        gather_slice_into(t, _contiguous(r), _contiguous(c), o)
    return outputs


def _outputs(tensors: Sequence[Tensor], rows: Indices, cols: Indices, out: Outputs) -> list[Tensor]:
    if out is not None:
        return list(out)
    return [_new_output(t, r, c) for t, r, c in zip(tensors, rows, cols, strict=True)]


def _new_output(t: Tensor, r: Tensor | None, c: Tensor | None) -> Tensor:
    shape = list(t.shape)
    if r is not None:
        shape[0] = r.shape[0]
    if c is not None:
        shape[1] = c.shape[0]
    return t.new_empty(shape)


def _contiguous(idx: Tensor | None) -> Tensor | None:
    return None if idx is None else idx.contiguous()


def _index_code(idx: Tensor | None) -> int:
    """How the CUDA module reads an index: 0 = none, 4 = int32, 8 = int64."""
    return 0 if idx is None else idx.element_size()


# Each backend: (tensors, rows, cols, out=None) -> outputs, written into ``out`` when given (checked already).
_BACKENDS: dict[str, Callable[..., list[Tensor]]] = {
    "reference": _run_reference,
    "cpu": _run_cpu,
    "cuda": _run_cuda,
    "triton": _run_triton,
}


def _pick_backend(device: torch.device) -> str:
    return _native.pick_backend("gather_slice", device)


@torch.library.custom_op("fastprune::gather_slice", mutates_args=())
def _gather_slice_op(tensors: list[Tensor], rows: list[Tensor | None], cols: list[Tensor | None]) -> list[Tensor]:
    if not tensors:
        return []
    return _BACKENDS[_pick_backend(tensors[0].device)](tensors, rows, cols)


@_gather_slice_op.register_fake
def _(tensors, rows, cols):
    _check_args(tensors, rows, cols)
    return [_new_output(t, r, c) for t, r, c in zip(tensors, rows, cols, strict=True)]


def _setup_context(ctx, inputs, output) -> None:
    tensors, rows, cols = inputs
    ctx.shapes = [t.shape for t in tensors]
    ctx.rows, ctx.cols = rows, cols


def _backward(ctx, grads):
    # The gradient of a gather is a scatter-add: repeated indices sum their gradients.
    out = []
    for shape, r, c, g in zip(ctx.shapes, ctx.rows, ctx.cols, grads, strict=True):
        if c is not None:
            g = g.new_zeros(g.shape[0], shape[1]).index_add_(1, c, g)
        if r is not None:
            g = g.new_zeros(shape[0], *g.shape[1:]).index_add_(0, r, g)
        out.append(g)
    return out, _no_grad(ctx.rows), _no_grad(ctx.cols)


def _no_grad(indices: list[Tensor | None]):
    # torch.library matches the structure of the inputs: a list holding a None counts as one leaf.
    return None if any(i is None for i in indices) else [None] * len(indices)


_gather_slice_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("fastprune::gather_slice_out", mutates_args=("out",))
def _gather_slice_out_op(
    tensors: list[Tensor], rows: list[Tensor | None], cols: list[Tensor | None], out: list[Tensor]
) -> None:
    if not tensors:
        return
    for i, o in enumerate(out):
        for t in tensors:
            if o.numel() and t.numel() and o.untyped_storage().data_ptr() == t.untyped_storage().data_ptr():
                raise ValueError(f"gather_slice: output {i} shares memory with an input tensor")
    _BACKENDS[_pick_backend(tensors[0].device)](tensors, rows, cols, out)


def _check_out(tensors: Sequence[Tensor], rows: Indices, cols: Indices, out: Sequence[Tensor]) -> None:
    torch._check(len(out) == len(tensors), lambda: "gather_slice: one output per tensor")
    for i, (t, r, c, o) in enumerate(zip(tensors, rows, cols, out, strict=True)):
        expected = _new_output(t, r, c).shape
        torch._check(
            o.shape == expected,
            lambda i=i, s=tuple(o.shape), e=tuple(expected): f"gather_slice: output {i} has shape {s}, not {e}",
        )
        torch._check(o.dtype == t.dtype, lambda i=i: f"gather_slice: output {i} has another dtype than tensor {i}")
        torch._check(o.device == t.device, lambda i=i: f"gather_slice: output {i} is on another device")
        torch._check(o.is_contiguous(), lambda i=i: f"gather_slice: output {i} must be contiguous")


def gather_slice(
    tensors: Sequence[Tensor],
    rows: Indices | None = None,
    cols: Indices | None = None,
    *,
    out: Sequence[Tensor] | None = None,
) -> list[Tensor]:
    """Return ``t[rows[i]][:, cols[i]]`` for each tensor, as a new contiguous tensor (None: whole dim).

    With ``out`` (contiguous tensors of the result shapes, sharing no memory with the inputs), write the
    results there instead and return them: e.g. straight into a preallocated buffer of a model being saved.
    """
    tensors = list(tensors)
    rows = list(rows) if rows is not None else [None] * len(tensors)
    cols = list(cols) if cols is not None else [None] * len(tensors)
    _check_args(tensors, rows, cols)
    if out is None:
        return _gather_slice_op(tensors, rows, cols)
    out = list(out)
    _check_out(tensors, rows, cols, out)
    _gather_slice_out_op(tensors, rows, cols, out)
    return out
