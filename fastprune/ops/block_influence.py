"""block_influence: streaming sum of per-token cosines between a layer's input and output hidden states.

``x`` and ``y`` have shape ``[..., D]`` (any leading dims are tokens). Each call gives float64 ``[2]`` =
(sum over tokens of cos(x_t, y_t), number of tokens); ``block_influence_accumulate_`` adds that into a
running ``[2]``, so Block Influence of a layer is ``1 - sum / count`` after the calibration batches (sums and
counts merge across batches and processes). The kernels read each tensor once and make no normalised
copies; 16-bit inputs are accumulated in fp32 per token and the cosines summed in fp64.

Zero vectors: cos is ``dot / (max(|x|, eps) * max(|y|, eps))`` with ``eps = 1e-8``, exactly
``F.cosine_similarity``'s rule, so a token whose x or y is all zeros contributes 0 (its dot product is 0) and
still counts as a token. An empty hidden dim (D = 0) likewise gives cos 0 per token.

Backends (``_BACKENDS``, private; tests and benchmarks call them directly by name), each adding into accum:

- ``"cpu"``: C++ kernel (``csrc/cpu/block_influence.cpp``), one parallel pass; walks strided views (hooks may
  hand them) in place when the hidden dim has unit stride. AVX2/F16C code is picked at run time;
  ``FASTPRUNE_CPU_BASELINE=1`` keeps to the baseline-ISA code (tests check it).
- ``"cuda"``: CUDA kernel (``csrc/cuda/block_influence.cu``), one launch per call.
- ``"triton"``: Triton kernel (``kernels/block_influence.py``); CPU tensors need ``TRITON_INTERPRET=1``.
- ``"reference"``: ``F.cosine_similarity`` in fp64.

The CUDA and Triton backends view the tokens as one ``[tokens, D]`` matrix: token dims that do not merge into
one stride (e.g. ``x[:, :-1]``) are copied once first.

Dispatch (``_pick_backend``): CPU -> Triton when ``TRITON_INTERPRET=1`` (tests), else C++, else the reference.
CUDA -> the CUDA module, else Triton, else the reference. The CUDA module is preferred over Triton without a
measurement: no GPU was available when they were written, so the choice must be confirmed by running
``benchmarks/bench_block_influence.py`` on a GPU (both backends are timed there).
"""

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from fastprune.ops import _native
from fastprune.ops._checks import FLOAT_DTYPES, check, check_tensors, direct_call_ok

EPS = 1e-8  # F.cosine_similarity's default; see the module docstring for the zero-vector rule


def _check_args(x: Tensor, y: Tensor) -> None:
    # Messages close over plain values only (no tensors), so that torch.compile can trace the checks.
    x_shape, y_shape, x_dtype, y_dtype = tuple(x.shape), tuple(y.shape), x.dtype, y.dtype
    check(
        x_shape == y_shape,
        lambda: f"block_influence: x and y must have the same shape, got {x_shape} and {y_shape}",
    )
    check(
        x_dtype == y_dtype,
        lambda: f"block_influence: x and y must have the same dtype, got {x_dtype} and {y_dtype}",
    )
    check(
        x_dtype in FLOAT_DTYPES,
        lambda: f"block_influence: dtype must be float32, bfloat16 or float16, got {x_dtype}",
    )
    check(x.device == y.device, lambda: "block_influence: x and y are on different devices")
    check(len(x_shape) >= 1, lambda: "block_influence: x and y need a hidden dimension (at least 1-D)")


def _check_accum(accum: Tensor, x: Tensor) -> None:
    shape, dtype, a_device, x_device = tuple(accum.shape), accum.dtype, accum.device, x.device
    check(dtype == torch.float64, lambda: f"block_influence_accumulate_: accum must be float64, got {dtype}")
    check(shape == (2,), lambda: f"block_influence_accumulate_: accum must have shape (2,), got {shape}")
    check(
        a_device == x_device,
        lambda: f"block_influence_accumulate_: accum is on {a_device}, x on {x_device}",
    )


def _tokens(x: Tensor) -> int:
    return math.prod(x.shape[:-1])


def reference_block_influence(x: Tensor, y: Tensor) -> Tensor:
    """Plain PyTorch: float64 ``[2]`` = (fp64 sum of ``F.cosine_similarity(x, y, dim=-1)``, token count)."""
    _check_args(x, y)
    cos_sum = F.cosine_similarity(x.double(), y.double(), dim=-1, eps=EPS).sum()
    return torch.stack((cos_sum, cos_sum.new_tensor(float(_tokens(x)))))


def _as_tokens(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """``[tokens, D]`` views with unit hidden stride (copies only what cannot be viewed so)."""
    d = x.shape[-1]
    x2, y2 = x.reshape(-1, d), y.reshape(-1, d)
    return (
        x2 if d <= 1 or x2.stride(1) == 1 else x2.contiguous(),
        y2 if d <= 1 or y2.stride(1) == 1 else y2.contiguous(),
    )


def _add(accum: Tensor, cos_sum: Tensor | float, tokens: int) -> None:
    accum[0] += cos_sum
    accum[1] += tokens


def _run_reference(accum: Tensor, x: Tensor, y: Tensor) -> None:
    accum.add_(reference_block_influence(x, y))


def _run_cpu(accum: Tensor, x: Tensor, y: Tensor) -> None:
    _native.require_cpu_extension("block_influence")
    torch.ops.fastprune_cpu.block_influence_accumulate_(accum, x, y)


def _run_cuda(accum: Tensor, x: Tensor, y: Tensor) -> None:
    module = _native.require_cuda_module("block_influence")
    cos_sum = torch.zeros(1, dtype=torch.float64, device=x.device)  # the kernel adds into it (fp64 atomics)
    if x.numel() > 0:
        x2, y2 = _as_tokens(x, y)
        module.cosine_sum(
            cos_sum.data_ptr(),
            x2.data_ptr(),
            y2.data_ptr(),
            x2.shape[0],
            x2.shape[1],
            x2.stride(0),
            y2.stride(0),
            _native.CUDA_DTYPE_CODES[x.dtype],
            _native.cuda_device_index(x.device),
            _native.cuda_stream(x.device),
        )
    _add(accum, cos_sum[0], _tokens(x))


def _run_triton(accum: Tensor, x: Tensor, y: Tensor) -> None:
    _native.require_triton()
    from fastprune.kernels.block_influence import token_cosines

    cos_sum = token_cosines(*_as_tokens(x, y)).double().sum() if x.numel() > 0 else 0.0
    _add(accum, cos_sum, _tokens(x))


_BACKENDS: dict[str, Callable[[Tensor, Tensor, Tensor], None]] = {
    "reference": _run_reference,
    "cpu": _run_cpu,
    "cuda": _run_cuda,
    "triton": _run_triton,
}


def _pick_backend(device: torch.device) -> str:
    return _native.pick_backend("block_influence", device)


def _accumulate(accum: Tensor, x: Tensor, y: Tensor) -> None:
    _BACKENDS[_pick_backend(x.device)](accum, x, y)


def _sums(x: Tensor, y: Tensor) -> Tensor:
    accum = torch.zeros(2, dtype=torch.float64, device=x.device)
    _accumulate(accum, x, y)
    return accum


@torch.library.custom_op("fastprune::block_influence_accumulate_", mutates_args=("accum",))
def _block_influence_accumulate_op(accum: Tensor, x: Tensor, y: Tensor) -> None:
    _accumulate(accum, x, y)


@_block_influence_accumulate_op.register_fake
def _(accum, x, y):
    _check_args(x, y)
    _check_accum(accum, x)


@torch.library.custom_op("fastprune::block_influence", mutates_args=())
def _block_influence_op(x: Tensor, y: Tensor) -> Tensor:
    return _sums(x, y)


@_block_influence_op.register_fake
def _(x, y):
    _check_args(x, y)
    return x.new_empty((2,), dtype=torch.float64)


def block_influence(x: Tensor, y: Tensor) -> Tensor:
    """float64 ``[2]``: (sum over tokens of cos(x_t, y_t) along the last dim, number of tokens)."""
    check_tensors("block_influence", x=x, y=y)
    _check_args(x, y)
    # The result is a statistic, not differentiable: detach so hooks may pass activations that require grad.
    x, y = x.detach(), y.detach()
    return _sums(x, y) if direct_call_ok(x, y) else _block_influence_op(x, y)


def block_influence_accumulate_(accum: Tensor, x: Tensor, y: Tensor) -> None:
    """Add ``block_influence(x, y)`` into the float64 ``[2]`` tensor ``accum`` in place."""
    check_tensors("block_influence", accum=accum, x=x, y=y)
    _check_args(x, y)
    _check_accum(accum, x)
    x, y = x.detach(), y.detach()
    if direct_call_ok(accum, x, y):
        _accumulate(accum, x, y)
    else:
        _block_influence_accumulate_op(accum, x, y)
