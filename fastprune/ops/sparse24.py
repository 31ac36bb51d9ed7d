"""sparse24: 2:4 semi-structured sparsity: choose, compress, decompress, and multiply by activations.

Layout, shared by every backend. A weight ``[out, in]`` (``in % 4 == 0``) is cut into groups of 4 consecutive
inputs; each group keeps 2 elements.

- ``values`` ``[out, in/2]``, the weight's dtype: the kept elements of each group, lower position first.
- ``meta`` ``[out, ceil(in/8)]`` uint8: one 4-bit nibble per group (bits 0-1: position 0..3 of the first kept
  element, bits 2-3: of the second); group ``2b`` is the low nibble of byte ``b``, group ``2b+1`` the high
  one (0 when the group count is odd). 4 bits per group: the metadata adds 1/8 byte per weight.

Selection: in each group keep the 2 largest scores. The score is ``score`` (same shape as the weight, any
float dtype) or ``|weight|`` by default, times ``act_norm[col]`` when that 1-D per-input-column tensor is
given: ``act_norm = ||X||_2`` per input feature gives Wanda's ``|W| * ||X||``. NaN ranks above every number
and equal scores keep the lower position, so the mask is deterministic and always exactly 2 of 4.

Backends per op (``_BACKENDS[op][name]``, private; tests and benchmarks call them by name):

- ``"cpu"``: C++ (``csrc/cpu/sparse24.cpp``): AVX-512 / AVX2 kernels chosen at run time; the product runs a
  GEMV below 16 tokens and a register-blocked GEMM from 16 tokens.
- ``"cuda"``: CUDA (``csrc/cuda/sparse24.cu``): mask, compress, decompress, and a GEMV for up to 8 tokens;
  more tokens multiply the decompressed weight with cuBLAS (``F.linear``).
- ``"triton"``: Triton (``kernels/sparse24.py``): decompress and the GEMV (decompress + ``F.linear`` past 8
  tokens on a GPU); CPU tensors need ``TRITON_INTERPRET=1``.
- ``"reference"``: plain PyTorch.

Dispatch (``_pick_backend``): CPU -> Triton when ``TRITON_INTERPRET=1`` (tests) and the op has a Triton
kernel, else C++, else the reference. CUDA -> the CUDA module, else Triton, else the reference. The CUDA
module is preferred over Triton without a measurement: no GPU was available when they were written, so the
choice must be confirmed by running ``benchmarks/bench_sparse24.py`` on a GPU (both are timed there, next to
dense cuBLAS and the vendor 2:4 path ``to_vendor_sparse``).
"""

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from fastprune.ops import _native
from fastprune.ops._checks import FLOAT_DTYPES, direct_call_ok, no_dispatch_hooks

_GPU_GEMV_MAX_TOKENS = 8  # CUDA and Triton GEMV kernels; more tokens go to decompress + cuBLAS


def meta_columns(in_features: int) -> int:
    """Bytes of metadata per row for ``in_features`` inputs (one nibble per group of 4)."""
    return (in_features // 4 + 1) // 2


# ---------------------------------------------------------------------------------------------- reference


def reference_sparse24_mask(weight: Tensor, score: Tensor | None = None, act_norm: Tensor | None = None) -> Tensor:
    """Plain PyTorch: bool mask keeping the 2 highest-scoring of every 4 consecutive inputs."""
    _check_weight("sparse24_mask", weight, score, act_norm)
    s = _scores(weight, score, act_norm).view(weight.shape[0], weight.shape[1] // 4, 4)
    si, sj = s.unsqueeze(-1), s.unsqueeze(-2)  # [..., i, 1] and [..., 1, j]: does j rank above i?
    pos = torch.arange(4, device=weight.device)
    j_first = pos[None, :] < pos[:, None]
    ni, nj = si.isnan(), sj.isnan()
    above = (sj > si) | ((sj == si) & j_first) | (nj & ~ni) | (nj & ni & j_first)
    return (above.sum(-1) < 2).view(weight.shape)


def reference_sparse24_compress(
    weight: Tensor, score: Tensor | None = None, act_norm: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Plain PyTorch: (values [out, in/2], meta [out, ceil(in/8)] uint8) of the 2:4-masked weight."""
    mask = reference_sparse24_mask(weight, score, act_norm)
    out, groups = weight.shape[0], weight.shape[1] // 4
    # A stable sort of "not kept" puts the two kept positions first, in increasing order.
    pos = torch.argsort((~mask).view(out, groups, 4).to(torch.int8), dim=-1, stable=True)[..., :2]
    values = weight.view(out, groups, 4).gather(-1, pos).reshape(out, 2 * groups)
    nib = (pos[..., 0] | (pos[..., 1] << 2)).to(torch.uint8)
    if groups % 2:
        nib = F.pad(nib, (0, 1))
    meta = (nib[:, 0::2] | (nib[:, 1::2] << 4)).contiguous()
    return values.contiguous(), meta


def reference_sparse24_decompress(values: Tensor, meta: Tensor) -> Tensor:
    """Plain PyTorch: the dense [out, in] weight, zeros where pruned."""
    _check_compressed("sparse24_decompress", values, meta)
    out, groups = values.shape[0], values.shape[1] // 2
    dense = values.new_zeros(out, groups, 4)
    dense = dense.scatter(-1, _positions(meta, groups), values.reshape(out, groups, 2))
    return dense.view(out, 4 * groups)


def reference_sparse24_matmul(x: Tensor, values: Tensor, meta: Tensor, bias: Tensor | None = None) -> Tensor:
    """Plain PyTorch: ``F.linear(x, decompress(values, meta), bias)``."""
    _check_matmul(x, values, meta, bias)
    return F.linear(x, reference_sparse24_decompress(values, meta), bias)


def _scores(weight: Tensor, score: Tensor | None, act_norm: Tensor | None) -> Tensor:
    s = weight.abs().float() if score is None else score.float()
    return s if act_norm is None else s * act_norm.float()


def _positions(meta: Tensor, groups: int) -> Tensor:
    """[out, groups, 2] int64 kept positions (0..3) from the packed metadata."""
    m = meta.to(torch.int64)
    nib = torch.stack((m & 15, m >> 4), dim=-1).reshape(meta.shape[0], 2 * meta.shape[1])[:, :groups]
    return torch.stack((nib & 3, nib >> 2), dim=-1)


def _gather_kept(dense: Tensor, meta: Tensor) -> Tensor:
    """A dense [out, in] tensor's entries at the kept positions, as [out, in/2] (decompress's adjoint)."""
    out, groups = dense.shape[0], dense.shape[1] // 4
    return dense.reshape(out, groups, 4).gather(-1, _positions(meta, groups)).reshape(out, 2 * groups)


# ---------------------------------------------------------------------------------------------- checks


def _check_float_matrix(op: str, name: str, t: Tensor, shape: str) -> None:
    torch._check(t.dim() == 2, lambda: f"{op}: {name} must be 2-D {shape}, got {t.dim()}-D")
    torch._check(t.dtype in FLOAT_DTYPES, lambda: f"{op}: {name} must be float32, bfloat16 or float16, got {t.dtype}")


def _check_weight(op: str, weight: Tensor, score: Tensor | None, act_norm: Tensor | None) -> None:
    _check_float_matrix(op, "weight", weight, "[out, in]")
    torch._check(
        weight.shape[1] % 4 == 0,
        lambda: f"{op}: in_features ({weight.shape[1]}) must be divisible by 4 for 2:4 groups",
    )
    if score is not None:
        torch._check(
            score.shape == weight.shape,
            lambda: f"{op}: score shape {tuple(score.shape)} must equal weight shape {tuple(weight.shape)}",
        )
        torch._check(score.dtype.is_floating_point, lambda: f"{op}: score must be a floating tensor")
        torch._check(score.device == weight.device, lambda: f"{op}: score is on another device than weight")
    if act_norm is not None:
        torch._check(
            act_norm.dim() == 1 and act_norm.shape[0] == weight.shape[1],
            lambda: (
                f"{op}: act_norm must be 1-D with in_features ({weight.shape[1]}) entries, "
                f"got shape {tuple(act_norm.shape)}"
            ),
        )
        torch._check(act_norm.dtype.is_floating_point, lambda: f"{op}: act_norm must be a floating tensor")
        torch._check(act_norm.device == weight.device, lambda: f"{op}: act_norm is on another device than weight")


def _check_compressed(op: str, values: Tensor, meta: Tensor) -> None:
    _check_float_matrix(op, "values", values, "[out, in/2]")
    torch._check(
        values.shape[1] % 2 == 0,
        lambda: f"{op}: values has {values.shape[1]} columns; 2:4 needs in_features divisible by 4",
    )
    torch._check(meta.dim() == 2 and meta.dtype == torch.uint8, lambda: f"{op}: meta must be a 2-D uint8 tensor")
    expected = (values.shape[0], meta_columns(2 * values.shape[1]))
    torch._check(
        tuple(meta.shape) == expected,
        lambda: (
            f"{op}: meta shape {tuple(meta.shape)} does not match values {tuple(values.shape)} (expected {expected})"
        ),
    )
    torch._check(meta.device == values.device, lambda: f"{op}: meta is on another device than values")


def _check_matmul(x: Tensor, values: Tensor, meta: Tensor, bias: Tensor | None) -> None:
    _check_compressed("sparse24_matmul", values, meta)
    torch._check(x.dim() >= 1, lambda: "sparse24_matmul: x must have at least 1 dim")
    torch._check(
        x.shape[-1] == 2 * values.shape[1],
        lambda: f"sparse24_matmul: x has {x.shape[-1]} features, the compressed weight has {2 * values.shape[1]}",
    )
    torch._check(
        x.dtype == values.dtype,
        lambda: f"sparse24_matmul: x dtype {x.dtype} must equal values dtype {values.dtype}",
    )
    torch._check(x.device == values.device, lambda: "sparse24_matmul: x is on another device than values")
    if bias is not None:
        torch._check(
            bias.dim() == 1 and bias.shape[0] == values.shape[0],
            lambda: f"sparse24_matmul: bias must be 1-D with {values.shape[0]} entries, got {tuple(bias.shape)}",
        )
        torch._check(bias.dtype == x.dtype, lambda: "sparse24_matmul: bias dtype must equal x dtype")
        torch._check(bias.device == x.device, lambda: "sparse24_matmul: bias is on another device than x")


# ---------------------------------------------------------------------------------------------- backends


def _cpu_ops():
    _native.require_cpu_extension("sparse24")
    return torch.ops.fastprune_cpu


def _cuda():
    return _native.require_cuda_module("sparse24")


def _triton():
    _native.require_triton()
    from fastprune.kernels import sparse24

    return sparse24


def _buffer(t: Tensor | None) -> tuple[int, int]:
    """(data pointer, element count), as the CUDA module takes a tensor; (0, 0) for none."""
    return (0, 0) if t is None else (t.data_ptr(), t.numel())


def _cuda_select(weight: Tensor, score: Tensor | None, act_norm: Tensor | None, mask: bool):
    """Run the CUDA mask (``mask=True``) or compress kernel; score and act_norm in dtypes it reads."""
    w = weight.contiguous()
    s = None if score is None else (score if score.dtype in FLOAT_DTYPES else score.float()).contiguous()
    a = None if act_norm is None else act_norm.float().contiguous()
    rows, cols = w.shape
    codes = _native.CUDA_DTYPE_CODES
    inputs = [*_buffer(w), codes[w.dtype], *_buffer(s), 0 if s is None else codes[s.dtype], *_buffer(a)]
    stream = _native.cuda_stream(w.device)
    with torch.cuda.device(w.device):
        if mask:
            out = torch.empty(rows, cols, dtype=torch.bool, device=w.device)
            _cuda().mask(*inputs, *_buffer(out), rows, cols, stream)
            return out
        values = w.new_empty(rows, cols // 2)
        meta = torch.empty(rows, meta_columns(cols), dtype=torch.uint8, device=w.device)
        _cuda().compress(*inputs, *_buffer(values), *_buffer(meta), rows, cols, stream)
        return values, meta


def _cuda_decompress(values: Tensor, meta: Tensor) -> Tensor:
    values, meta = values.contiguous(), meta.contiguous()
    rows, cols = values.shape[0], 2 * values.shape[1]
    out = values.new_empty(rows, cols)
    code, stream = _native.CUDA_DTYPE_CODES[values.dtype], _native.cuda_stream(values.device)
    with torch.cuda.device(values.device):
        _cuda().decompress(*_buffer(values), *_buffer(meta), *_buffer(out), rows, cols, code, stream)
    return out


def _cuda_matmul(x: Tensor, values: Tensor, meta: Tensor, bias: Tensor | None) -> Tensor:
    if x.shape[0] > _GPU_GEMV_MAX_TOKENS:
        return F.linear(x, _cuda_decompress(values, meta), bias)
    x, values, meta = x.contiguous(), values.contiguous(), meta.contiguous()
    b = None if bias is None else bias.contiguous()
    rows, cols = values.shape[0], 2 * values.shape[1]
    y = x.new_empty(x.shape[0], rows)
    code, stream = _native.CUDA_DTYPE_CODES[x.dtype], _native.cuda_stream(x.device)
    with torch.cuda.device(x.device):
        _cuda().gemv(
            *_buffer(x),
            *_buffer(values),
            *_buffer(meta),
            *_buffer(b),
            *_buffer(y),
            x.shape[0],
            rows,
            cols,
            code,
            stream,
        )
    return y


def _triton_matmul(x: Tensor, values: Tensor, meta: Tensor, bias: Tensor | None) -> Tensor:
    if x.is_cuda and x.shape[0] > _GPU_GEMV_MAX_TOKENS:
        return F.linear(x, _triton().decompress(values, meta), bias)
    return _triton().gemv(x, values, meta, bias)


# Each op's backends: mask/compress (weight, score, act_norm), decompress (values, meta),
# matmul (x [tokens, in], values, meta, bias) -> [tokens, out]. Arguments are checked already.
_BACKENDS: dict[str, dict[str, Callable]] = {
    "mask": {
        "reference": reference_sparse24_mask,
        "cpu": lambda w, s, a: _cpu_ops().sparse24_mask(w, s, a),
        "cuda": lambda w, s, a: _cuda_select(w, s, a, mask=True),
    },
    "compress": {
        "reference": reference_sparse24_compress,
        "cpu": lambda w, s, a: tuple(_cpu_ops().sparse24_compress(w, s, a)),
        "cuda": lambda w, s, a: _cuda_select(w, s, a, mask=False),
    },
    "decompress": {
        "reference": reference_sparse24_decompress,
        "cpu": lambda v, m: _cpu_ops().sparse24_decompress(v, m),
        "cuda": _cuda_decompress,
        "triton": lambda v, m: _triton().decompress(v, m),
    },
    "matmul": {
        "reference": reference_sparse24_matmul,
        "cpu": lambda x, v, m, b: _cpu_ops().sparse24_matmul(x, v, m, b),
        "cuda": _cuda_matmul,
        "triton": _triton_matmul,
    },
}


def _pick_backend(op: str, device: torch.device) -> str:
    return _native.pick_backend("sparse24", device, triton="triton" in _BACKENDS[op])


# ---------------------------------------------------------------------------------------------- custom ops


@torch.library.custom_op("fastprune::sparse24_mask", mutates_args=())
def _mask_op(weight: Tensor, score: Tensor | None, act_norm: Tensor | None) -> Tensor:
    _check_weight("sparse24_mask", weight, score, act_norm)
    return _BACKENDS["mask"][_pick_backend("mask", weight.device)](weight, score, act_norm)


@_mask_op.register_fake
def _(weight, score, act_norm):
    _check_weight("sparse24_mask", weight, score, act_norm)
    return weight.new_empty(weight.shape, dtype=torch.bool)


@torch.library.custom_op("fastprune::sparse24_compress", mutates_args=())
def _compress_op(weight: Tensor, score: Tensor | None, act_norm: Tensor | None) -> tuple[Tensor, Tensor]:
    _check_weight("sparse24_compress", weight, score, act_norm)
    return _BACKENDS["compress"][_pick_backend("compress", weight.device)](weight, score, act_norm)


@_compress_op.register_fake
def _(weight, score, act_norm):
    _check_weight("sparse24_compress", weight, score, act_norm)
    rows, cols = weight.shape
    return weight.new_empty(rows, cols // 2), weight.new_empty(rows, meta_columns(cols), dtype=torch.uint8)


@torch.library.custom_op("fastprune::sparse24_decompress", mutates_args=())
def _decompress_op(values: Tensor, meta: Tensor) -> Tensor:
    _check_compressed("sparse24_decompress", values, meta)
    return _BACKENDS["decompress"][_pick_backend("decompress", values.device)](values, meta)


@_decompress_op.register_fake
def _(values, meta):
    _check_compressed("sparse24_decompress", values, meta)
    return values.new_empty(values.shape[0], 2 * values.shape[1])


def _decompress_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[1])


def _decompress_backward(ctx, grad):
    (meta,) = ctx.saved_tensors
    return _gather_kept(grad, meta), None


_decompress_op.register_autograd(_decompress_backward, setup_context=_decompress_setup)


def _matmul(x: Tensor, values: Tensor, meta: Tensor, bias: Tensor | None) -> Tensor:
    if x.device.type == "cpu" and _cpu_kernel_ready(x):
        # The C++ op takes x [..., in] and checks every argument itself, with the same messages; checking in
        # Python too would cost as much as the product of a SmolLM2-sized matrix.
        return _cpu_matmul_overload()(x, values, meta, bias)
    _check_matmul(x, values, meta, bias)
    y = _BACKENDS["matmul"][_pick_backend("matmul", x.device)](x.reshape(-1, x.shape[-1]), values, meta, bias)
    return y.view(*x.shape[:-1], values.shape[0])


def _cpu_kernel_ready(x: Tensor) -> bool:
    """Whether an inference call on this CPU tensor may go straight to the C++ product (see ``_matmul``)."""
    return _cpu_backend() and direct_call_ok(x)


@functools.cache
def _cpu_backend() -> bool:
    """Whether CPU products run the C++ kernels in this process (TRITON_INTERPRET is read once, as triton does)."""
    return _native.cpu_extension("sparse24") and not _native.use_triton_on_cpu()


@functools.cache
def _cpu_matmul_overload():
    """The C++ op's overload, looked up once (``torch.ops`` attribute lookups cost microseconds per call)."""
    return torch.ops.fastprune_cpu.sparse24_matmul.default


@torch.library.custom_op("fastprune::sparse24_matmul", mutates_args=())
def _matmul_op(x: Tensor, values: Tensor, meta: Tensor, bias: Tensor | None) -> Tensor:
    return _matmul(x, values, meta, bias)


@_matmul_op.register_fake
def _(x, values, meta, bias):
    _check_matmul(x, values, meta, bias)
    return x.new_empty(*x.shape[:-1], values.shape[0])


def _matmul_setup(ctx, inputs, output) -> None:
    x, values, meta, bias = inputs
    ctx.save_for_backward(x, values, meta)
    ctx.has_bias = bias is not None


def _matmul_backward(ctx, grad):
    # The mask is fixed: values get the dense weight gradient at the kept positions only.
    x, values, meta = ctx.saved_tensors
    g2 = grad.reshape(-1, grad.shape[-1])
    grad_x = grad_values = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = grad @ _decompress_op(values, meta)
    if ctx.needs_input_grad[1]:
        grad_values = _gather_kept(g2.t() @ x.reshape(-1, x.shape[-1]), meta)
    if ctx.has_bias and ctx.needs_input_grad[3]:
        grad_bias = g2.sum(0)
    return grad_x, grad_values, None, grad_bias


_matmul_op.register_autograd(_matmul_backward, setup_context=_matmul_setup)


# ---------------------------------------------------------------------------------------------- public API


def sparse24_mask(weight: Tensor, score: Tensor | None = None, *, act_norm: Tensor | None = None) -> Tensor:
    """Bool mask of ``weight`` [out, in] keeping the 2 highest scores of every 4 consecutive inputs."""
    return _mask_op(weight, score, act_norm)


def sparse24_compress(
    weight: Tensor, score: Tensor | None = None, *, act_norm: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """2:4-prune ``weight`` [out, in] and return ``(values [out, in/2], meta [out, ceil(in/8)] uint8)``."""
    return _compress_op(weight, score, act_norm)


def sparse24_decompress(values: Tensor, meta: Tensor, in_features: int | None = None) -> Tensor:
    """The dense [out, in] weight of a compressed one, zeros where pruned (``in_features`` is checked)."""
    if in_features is not None:
        torch._check(
            in_features == 2 * values.shape[1],
            lambda: (
                f"sparse24_decompress: in_features {in_features} does not match values "
                f"({values.shape[1]} columns hold {2 * values.shape[1]} inputs)"
            ),
        )
    return _decompress_op(values, meta)


def sparse24_matmul(x: Tensor, values: Tensor, meta: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x [..., in] @ W^T (+ bias)`` for a 2:4-compressed ``W`` (``nn.Linear`` semantics, fp32 sums)."""
    if _plain_inference(x, values, meta, bias):
        return _matmul(x, values, meta, bias)
    return _matmul_op(x, values, meta, bias)


_PLAIN_TYPES = (Tensor, torch.nn.Parameter)


def _plain_inference(x: Tensor, values: Tensor, meta: Tensor, bias: Tensor | None) -> bool:
    """Whether a call may skip the custom op: eager, no gradient to record, plain tensors or parameters.

    Decoding one token calls the product once per linear layer (210 times for SmolLM2), and the op's dispatch
    costs about as much as the kernel on such a small matrix.
    """
    if torch.is_grad_enabled() and (
        x.requires_grad or values.requires_grad or (bias is not None and bias.requires_grad)
    ):
        return False
    return (
        type(x) in _PLAIN_TYPES
        and type(values) in _PLAIN_TYPES
        and type(meta) in _PLAIN_TYPES
        and (bias is None or type(bias) in _PLAIN_TYPES)
        and direct_call_ok(x)
    )


def vendor_sparse_available(device: torch.device | str) -> bool:
    """True where ``torch.sparse.to_sparse_semi_structured`` runs: a CUDA GPU of compute capability 8.0+."""
    device = torch.device(device)
    return (
        device.type == "cuda"
        and torch.cuda.is_available()
        and hasattr(torch.sparse, "to_sparse_semi_structured")
        and torch.cuda.get_device_capability(device) >= (8, 0)
    )


def to_vendor_sparse(values: Tensor, meta: Tensor) -> Tensor:
    """The weight as torch's semi-structured sparse tensor (vendor 2:4 kernels), for ``F.linear(x, w)``."""
    if not vendor_sparse_available(values.device):
        raise RuntimeError("sparse24: torch's semi-structured sparsity needs a CUDA GPU of compute capability 8.0+")
    return torch.sparse.to_sparse_semi_structured(sparse24_decompress(values, meta))


class Sparse24Linear(torch.nn.Module):
    """``nn.Linear`` with a 2:4-compressed weight: ``values`` train, the mask (``meta``) stays fixed."""

    def __init__(self, values: Tensor, meta: Tensor, bias: Tensor | None = None):
        super().__init__()
        _check_compressed("Sparse24Linear", values, meta)
        self.in_features, self.out_features = 2 * values.shape[1], values.shape[0]
        self.values = torch.nn.Parameter(values)
        self.register_buffer("meta", meta)
        self.register_parameter("bias", None if bias is None else torch.nn.Parameter(bias))  # in _parameters
        # Set by run_dense: the masked dense weight, for shapes where the dense product is the faster one.
        self.register_buffer("dense_cache", None, persistent=False)
        self._dense_of: tuple[int, int, int] | None = None

    @classmethod
    def from_linear(
        cls, linear: torch.nn.Linear, score: Tensor | None = None, *, act_norm: Tensor | None = None
    ) -> "Sparse24Linear":
        """2:4-prune a linear layer's weight (by ``|W|``, a score, or Wanda's ``act_norm``)."""
        values, meta = sparse24_compress(linear.weight.detach(), score, act_norm=act_norm)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(values, meta, bias)

    def run_dense(self, enabled: bool = True) -> None:
        """Compute inference products (no gradient) with the masked dense weight instead of the 2:4 kernel: the
        same outputs up to fp32 summation order, at the cost of a dense copy of the weight. For small matrices,
        where the kernel's fixed cost per call exceeds what skipping half the weights saves (see
        ``fastprune.sparsity.modules.pick_faster_products``). Training still runs through the 2:4 values."""
        self.dense_cache = self.dense_weight().detach().contiguous() if enabled else None
        self._dense_of = self._weight_state() if enabled else None

    def _weight_state(self) -> tuple[int, int, int]:
        return self.values.data_ptr(), self.values._version, self.meta._version

    @property
    def runs_dense(self) -> bool:
        return self.dense_cache is not None

    def forward(self, x: Tensor) -> Tensor:
        # Decoding calls every layer once per token (210 times for SmolLM2), so inference takes the shortest way
        # to the C++ kernel (which checks its arguments itself): the Python around it must stay below the cost
        # of a SmolLM2-sized product. Parameters and buffers are read from their dicts, as nn.Module's
        # __getattr__ costs most of a microsecond per name.
        params, dense = self._parameters, self._buffers["dense_cache"]
        if torch.is_grad_enabled():
            return sparse24_matmul(x, params["values"], self.meta, params["bias"])
        if dense is not None:
            if self._dense_of != self._weight_state():
                self.run_dense()  # the values changed (training, load_state_dict, .to()): rebuild the copy
                dense = self._buffers["dense_cache"]
            return F.linear(x, dense, params["bias"])
        if type(x) is Tensor and x.is_cpu and _cpu_backend() and no_dispatch_hooks():
            return _cpu_matmul_overload()(x, params["values"], self._buffers["meta"], params["bias"])
        return sparse24_matmul(x, params["values"], self._buffers["meta"], params["bias"])

    def dense_weight(self) -> Tensor:
        """The dense [out, in] weight with zeros where pruned."""
        return sparse24_decompress(self.values, self.meta)

    def extra_repr(self) -> str:
        dense = ", runs dense" if self.runs_dense else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}{dense}"
