"""head_taylor: per-group Taylor (sum |w*g|) and Fisher (sum (w*g)^2) scores of a weight and its gradient.

The weight is split along ``dim`` (0 = rows, 1 = columns; 1-D tensors such as biases take dim 0 only) into
consecutive groups of ``group_size``: q_proj rows by head_dim give per-head scores, o_proj columns by head_dim
the same heads from the other side, gate/up rows and down columns with group_size 1 per-channel scores.
Scores are float32 ``[2, n_groups]`` (row 0 Taylor, row 1 Fisher). No backend materialises ``w*g``: products
are formed in fp32 (exact for 16-bit inputs), summed in fp32 over short runs and in fp64 across runs, and
rounded to fp32 once per call. ``head_taylor_accumulate_`` adds into a running score across calibration
batches.

Backends (``_BACKENDS``, private; tests and benchmarks call them directly by name), each adding into scores:

- ``"cpu"``: C++ kernel (``csrc/cpu/head_taylor.cpp``), one parallel pass; reads strided rows and transposed
  weights in place. AVX2/F16C code is picked at run time; ``FASTPRUNE_CPU_BASELINE=1`` keeps to the
  baseline-ISA code (tests check it).
- ``"cuda"``: CUDA kernel (``csrc/cuda/head_taylor.cu``), one launch per call.
- ``"triton"``: Triton kernel (``kernels/head_taylor.py``); CPU tensors need ``TRITON_INTERPRET=1``.
- ``"reference"``: plain PyTorch in fp64 (materialises ``w*g``).

Dispatch (``_pick_backend``): CPU -> Triton when ``TRITON_INTERPRET=1`` (tests), else C++, else the reference.
CUDA -> the CUDA module, else Triton, else the reference. The CUDA module is preferred over Triton without a
measurement: no GPU was available when they were written, so the choice must be confirmed by running
``benchmarks/bench_head_taylor.py`` on a GPU (both backends are timed there).
"""

from collections.abc import Callable

import torch
from torch import Tensor

from fastprune.ops import _native
from fastprune.ops._checks import FLOAT_DTYPES, check, check_tensors, direct_call_ok


def _check_args(weight: Tensor, grad: Tensor, dim: int, group_size: int) -> None:
    # Messages close over plain values only (no tensors), so that torch.compile can trace the checks.
    w_shape, g_shape, w_dtype, g_dtype, ndim = (
        tuple(weight.shape),
        tuple(grad.shape),
        weight.dtype,
        grad.dtype,
        weight.dim(),
    )
    check(
        w_shape == g_shape,
        lambda: f"head_taylor: weight and grad must have the same shape, got {w_shape} and {g_shape}",
    )
    check(
        w_dtype == g_dtype,
        lambda: f"head_taylor: weight and grad must have the same dtype, got {w_dtype} and {g_dtype}",
    )
    check(w_dtype in FLOAT_DTYPES, lambda: f"head_taylor: dtype must be float32, bfloat16 or float16, got {w_dtype}")
    check(weight.device == grad.device, lambda: "head_taylor: weight and grad are on different devices")
    check(ndim in (1, 2), lambda: f"head_taylor: weight must be 1-D or 2-D, got {ndim}-D")
    check(
        dim in (0, 1) and dim < ndim,
        lambda: f"head_taylor: dim must be 0{' or 1' if ndim == 2 else ' for a 1-D tensor'}, got {dim}",
    )
    check(group_size >= 1, lambda: f"head_taylor: group_size must be >= 1, got {group_size}")
    size = w_shape[dim]
    check(
        size % group_size == 0,
        lambda: f"head_taylor: size {size} along dim {dim} is not divisible by group_size {group_size}",
    )


def _check_scores(scores: Tensor, weight: Tensor, dim: int, group_size: int) -> None:
    n_groups = weight.shape[dim] // group_size
    shape, dtype = tuple(scores.shape), scores.dtype
    check(dtype == torch.float32, lambda: f"head_taylor_accumulate_: scores must be float32, got {dtype}")
    check(
        shape == (2, n_groups),
        lambda: f"head_taylor_accumulate_: scores must have shape (2, {n_groups}), got {shape}",
    )
    s_device, w_device = scores.device, weight.device
    check(
        s_device == w_device,
        lambda: f"head_taylor_accumulate_: scores are on {s_device}, weight on {w_device}",
    )


def _reference_sums(weight: Tensor, grad: Tensor, dim: int, group_size: int) -> Tensor:
    p = weight.double() * grad.double()
    if dim == 1:
        p = p.t()
    p = p.reshape(p.shape[0] // group_size, group_size * p[0].numel() if p.shape[0] else 0)
    return torch.stack((p.abs().sum(1), p.square().sum(1)))


def reference_head_taylor(weight: Tensor, grad: Tensor, *, dim: int, group_size: int) -> Tensor:
    """Plain PyTorch (fp64): float32 ``[2, n_groups]``, per group sum |w*g| and sum (w*g)^2 along ``dim``."""
    _check_args(weight, grad, dim, group_size)
    return _reference_sums(weight, grad, dim, group_size).float()


def _as_matrix(weight: Tensor, grad: Tensor, dim: int) -> tuple[Tensor, Tensor, int]:
    """2-D views with unit column stride (1-D becomes one row; transposed storage is walked as stored)."""
    if weight.dim() == 1:  # a bias: the columns of one row (strided ones are copied: they are small)
        return weight.contiguous().unsqueeze(0), grad.contiguous().unsqueeze(0), 1

    def unit(t: Tensor, d: int) -> bool:
        return t.shape[d] <= 1 or t.stride(d) == 1

    if unit(weight, 1) and unit(grad, 1):
        return weight, grad, dim
    if unit(weight, 0) and unit(grad, 0):
        return weight.t(), grad.t(), 1 - dim
    return weight.contiguous(), grad.contiguous(), dim


def _add_unit_sums(scores: Tensor, unit_sums: Tensor, group_size: int) -> None:
    """Add fp64 per-unit sums [2, units] into the fp32 scores as per-group sums (rounded once)."""
    scores.add_(unit_sums.view(2, -1, group_size).sum(2))


def _run_reference(scores: Tensor, weight: Tensor, grad: Tensor, dim: int, group_size: int) -> None:
    scores.add_(_reference_sums(weight, grad, dim, group_size))


def _run_cpu(scores: Tensor, weight: Tensor, grad: Tensor, dim: int, group_size: int) -> None:
    _native.require_cpu_extension("head_taylor")
    torch.ops.fastprune_cpu.head_taylor_accumulate_(scores, weight, grad, dim, group_size)


def _run_cuda(scores: Tensor, weight: Tensor, grad: Tensor, dim: int, group_size: int) -> None:
    module = _native.require_cuda_module("head_taylor")
    w, g, unit_dim = _as_matrix(weight, grad, dim)
    unit_sums = torch.zeros(2, w.shape[unit_dim], dtype=torch.float64, device=w.device)
    module.unit_sums(
        unit_sums.data_ptr(),
        unit_sums.numel(),
        w.data_ptr(),
        g.data_ptr(),
        w.shape[0],
        w.shape[1],
        w.stride(0),
        g.stride(0),
        unit_dim,
        _native.CUDA_DTYPE_CODES[w.dtype],
        _native.cuda_device_index(w.device),
        _native.cuda_stream(w.device),
    )
    _add_unit_sums(scores, unit_sums, group_size)


def _run_triton(scores: Tensor, weight: Tensor, grad: Tensor, dim: int, group_size: int) -> None:
    _native.require_triton()
    from fastprune.kernels.head_taylor import unit_sums

    w, g, unit_dim = _as_matrix(weight, grad, dim)
    _add_unit_sums(scores, unit_sums(w, g, unit_dim), group_size)


_BACKENDS: dict[str, Callable[[Tensor, Tensor, Tensor, int, int], None]] = {
    "reference": _run_reference,
    "cpu": _run_cpu,
    "cuda": _run_cuda,
    "triton": _run_triton,
}


def _pick_backend(device: torch.device) -> str:
    return _native.pick_backend("head_taylor", device)


def _accumulate(scores: Tensor, weight: Tensor, grad: Tensor, dim: int, group_size: int) -> None:
    _BACKENDS[_pick_backend(weight.device)](scores, weight, grad, dim, group_size)


def _scores(weight: Tensor, grad: Tensor, dim: int, group_size: int) -> Tensor:
    scores = weight.new_zeros((2, weight.shape[dim] // group_size), dtype=torch.float32)
    _accumulate(scores, weight, grad, dim, group_size)
    return scores


@torch.library.custom_op("fastprune::head_taylor_accumulate_", mutates_args=("scores",))
def _head_taylor_accumulate_op(scores: Tensor, weight: Tensor, grad: Tensor, dim: int, group_size: int) -> None:
    _accumulate(scores, weight, grad, dim, group_size)


@_head_taylor_accumulate_op.register_fake
def _(scores, weight, grad, dim, group_size):
    _check_args(weight, grad, dim, group_size)
    _check_scores(scores, weight, dim, group_size)


@torch.library.custom_op("fastprune::head_taylor", mutates_args=())
def _head_taylor_op(weight: Tensor, grad: Tensor, dim: int, group_size: int) -> Tensor:
    return _scores(weight, grad, dim, group_size)


@_head_taylor_op.register_fake
def _(weight, grad, dim, group_size):
    _check_args(weight, grad, dim, group_size)
    return weight.new_empty((2, weight.shape[dim] // group_size), dtype=torch.float32)


def head_taylor(weight: Tensor, grad: Tensor, *, dim: int, group_size: int) -> Tensor:
    """Per group of ``group_size`` along ``dim``: (sum |w*g|, sum (w*g)^2) as float32 ``[2, n_groups]``."""
    check_tensors("head_taylor", weight=weight, grad=grad)
    _check_args(weight, grad, dim, group_size)
    # Scores are not differentiable: detach so a Parameter can be passed as it is.
    weight, grad = weight.detach(), grad.detach()
    if direct_call_ok(weight, grad):
        return _scores(weight, grad, dim, group_size)
    return _head_taylor_op(weight, grad, dim, group_size)


def head_taylor_accumulate_(scores: Tensor, weight: Tensor, grad: Tensor, *, dim: int, group_size: int) -> None:
    """Add ``head_taylor(weight, grad, dim=dim, group_size=group_size)`` into float32 ``scores`` in place."""
    check_tensors("head_taylor", scores=scores, weight=weight, grad=grad)
    _check_args(weight, grad, dim, group_size)
    _check_scores(scores, weight, dim, group_size)
    weight, grad = weight.detach(), grad.detach()
    if direct_call_ok(scores, weight, grad):
        _accumulate(scores, weight, grad, dim, group_size)
    else:
        _head_taylor_accumulate_op(scores, weight, grad, dim, group_size)
