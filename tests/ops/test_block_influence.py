"""block_influence: every backend against an fp64 cosine reference, plus opcheck, accumulation, bad arguments.

Tolerance on the cosine sum, the same for every dtype (fp32, bf16, fp16): atol = 1e-5 per token, rtol = 1e-5.
Inputs convert exactly to fp32, so 16-bit inputs lose nothing before the sums; per token the dot product and
squared norms are fp32 runs flushed into fp64 (about 1e-7 relative error per cosine). The count is exact.
"""

import importlib
import importlib.util

import pytest
import torch
import torch.nn.functional as F
from kernel_testing import BASELINE, INTERPRETING, interpreted_only, needs_gpu, needs_triton, run_tests_in_subprocess
from torch._subclasses.fake_tensor import FakeTensorMode

from fastprune.ops import block_influence, block_influence_accumulate_, reference_block_influence

bi = importlib.import_module("fastprune.ops.block_influence")


def reference(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """fp64 (sum over tokens of x.y / (max(|x|, 1e-8) * max(|y|, 1e-8)), number of tokens)."""
    x, y = x.double(), y.double()
    cos = (x * y).sum(-1) / (x.norm(dim=-1).clamp_min(1e-8) * y.norm(dim=-1).clamp_min(1e-8))
    return torch.tensor([cos.sum().item(), float(cos.numel())], dtype=torch.float64)


def assert_matches(got: torch.Tensor, expected: torch.Tensor) -> None:
    assert got.dtype == torch.float64 and got.shape == (2,)
    assert got[1].item() == expected[1].item()
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-5 * max(1.0, expected[1].item()))


DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# A single token and element, odd widths, a hidden dim longer than one fp32 run (4096), many short tokens,
# SmolLM2's width, 3-D hidden states, and empty token or hidden dims.
SHAPES = [
    (1, 1),
    (5,),
    (7, 13),
    (2, 7, 33),
    (3, 1, 130),
    (4, 5000),
    (300, 17),
    (2, 9, 576),
    (0, 8),
    (4, 0),
    (2, 3, 0),
]
LAYOUTS = [
    "contiguous",
    "sliced_tokens",
    "transposed_tokens",
    "wide_rows",
    "hidden_strided",
    "mixed",
    "broadcast",
]

CPU_BUILT = importlib.util.find_spec("fastprune._cpu_block_influence") is not None
CUDA_BUILT = importlib.util.find_spec("fastprune._cuda_block_influence") is not None
needs_cpu_ext = pytest.mark.skipif(not CPU_BUILT, reason="C++ CPU kernels not built")
needs_cuda_module = pytest.mark.skipif(not CUDA_BUILT, reason="CUDA module not built (no nvcc at build time)")


def with_layout(t: torch.Tensor, layout: str, partner: bool, gen: torch.Generator) -> torch.Tensor:
    """A tensor of ``t``'s shape in another memory layout, as forward hooks may hand it."""
    if layout == "contiguous" or (layout == "mixed" and not partner):
        return t
    if layout == "sliced_tokens" and t.dim() >= 2:  # x[:, :-1]-style: token dims that do not merge
        extra = torch.randn(*t.shape[:-2], 1, t.shape[-1], generator=gen).to(t.dtype)
        return torch.cat([t, extra], -2)[..., :-1, :]
    if layout == "transposed_tokens" and t.dim() >= 3:  # [T, B, D] storage seen as [B, T, D]
        return t.transpose(0, 1).contiguous().transpose(0, 1)
    if layout in ("wide_rows", "mixed"):  # hidden slice of a wider buffer: token stride > D
        return torch.cat([t, torch.full_like(t, 3.0)], -1)[..., : t.shape[-1]]
    if layout == "hidden_strided":  # no unit stride along the hidden dim
        return torch.stack([t, torch.full_like(t, 3.0)], -1)[..., 0]
    if layout == "broadcast" and t.dim() >= 2 and t.shape[-2]:  # one token repeated: token stride 0
        return t[..., :1, :].expand(t.shape)
    return t  # the layout does not apply to this shape


def sample_inputs(shape, dtype, layout="contiguous", device="cpu", seed=0):
    """Correlated x and y (cosines near 0.7: sums that are not cancellation noise)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen)
    y = x + torch.randn(shape, generator=gen)
    return (
        with_layout(x.to(dtype), layout, False, gen).to(device),
        with_layout(y.to(dtype), layout, True, gen).to(device),
    )


def check_backend(backend, shape, dtype, layout="contiguous", device="cpu"):
    x, y = sample_inputs(shape, dtype, layout, device)
    accum = torch.tensor([0.25, 2.0], dtype=torch.float64, device=device)
    bi._BACKENDS[backend](accum, x, y)
    assert_matches(accum.cpu() - torch.tensor([0.25, 2.0], dtype=torch.float64), reference(x.cpu(), y.cpu()))


# ---------------------------------------------------------------------------------------------- correctness


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_backend(dtype, shape):
    check_backend("reference", shape, dtype)
    x, y = sample_inputs(shape, dtype)
    assert_matches(reference_block_influence(x, y), reference(x, y))


@needs_cpu_ext
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_backend(dtype, shape, layout):
    check_backend("cpu", shape, dtype, layout)


@needs_cpu_ext
def test_cpu_backend_walks_views_in_place():
    """Token-strided views are read where they are: no contiguous copy, even for non-mergeable token dims."""
    x, y = sample_inputs((3, 10, 64), torch.float32)
    xv, yv = x[:, 1:], y[:, :-1]
    assert not xv.is_contiguous() and not yv.is_contiguous()
    assert_matches(block_influence(xv, yv), reference(xv, yv))


@needs_cpu_ext
def test_cpu_backend_many_threads_agree():
    x, y = sample_inputs((1501, 300), torch.bfloat16)  # enough work for 3 threads
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            assert_matches(block_influence(x, y), reference(x, y))
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_cpu_ext)])
def test_zero_and_tiny_vectors(backend):
    check_zero_and_tiny_vectors(backend)


def check_zero_and_tiny_vectors(backend: str) -> None:
    """The documented rule: dot / (max(|x|, 1e-8) * max(|y|, 1e-8)); zero tokens give 0 and still count."""
    x = torch.tensor([[0.0, 0.0], [1.0, 2.0], [0.0, 0.0], [1e-10, 0.0], [3e-9, 4e-9], [1.0, 1.0]])
    y = torch.tensor([[1.0, 1.0], [0.0, 0.0], [0.0, 0.0], [1.0, 0.0], [3.0, 4.0], [2.0, 2.0]])
    accum = torch.zeros(2, dtype=torch.float64)
    bi._BACKENDS[backend](accum, x, y)
    expected = F.cosine_similarity(x.double(), y.double(), dim=-1).sum().item()  # 0 + 0 + 0 + 0.01 + 0.5 + 1
    assert expected == pytest.approx(1.51)
    assert accum[0].item() == pytest.approx(expected, rel=1e-6) and accum[1].item() == 6


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_cpu_ext)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_extreme_16bit_values(backend, dtype):
    check_extreme_16bit_values(backend, dtype)


def check_extreme_16bit_values(backend: str, dtype: torch.dtype) -> None:
    """Subnormal and large 16-bit values convert exactly (the fp16 path decodes the bits itself)."""
    info = torch.finfo(dtype)
    big = min(info.max, 2.0**40)  # squares of bf16's max would overflow fp32
    x = torch.tensor([[info.smallest_normal / 4] * 16 + [1.0], [big, -big / 8] * 8 + [1.0]], dtype=dtype)
    y = torch.tensor([[info.smallest_normal / 2] * 17, [big / 4, big] * 8 + [0.0]], dtype=dtype)
    accum = torch.zeros(2, dtype=torch.float64)
    bi._BACKENDS[backend](accum, x, y)
    assert_matches(accum, reference(x, y))


@needs_cpu_ext
@pytest.mark.skipif(BASELINE, reason="this process already runs the baseline code: the tests run directly")
def test_cpu_baseline_isa():
    """The C++ kernels' baseline-ISA code (SSE2, bit-level fp16 decode) against the reference."""
    run_tests_in_subprocess(__file__, "cpu_backend or extreme", FASTPRUNE_CPU_BASELINE="1")


@needs_triton
@pytest.mark.skipif(INTERPRETING, reason="this process already interprets Triton: the tests run directly")
def test_triton_interpreted():
    """Run this file's ``interpreted`` tests in a fresh process with TRITON_INTERPRET=1."""
    run_tests_in_subprocess(__file__, "interpreted", TRITON_INTERPRET="1")


@interpreted_only
@pytest.mark.parametrize("layout", ["contiguous", "sliced_tokens", "wide_rows", "hidden_strided", "broadcast"])
@pytest.mark.parametrize("shape", [(1, 1), (5,), (7, 13), (2, 7, 33), (3, 1, 130), (2, 1500), (2, 3, 0), (0, 8)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_interpreted_triton_backend(dtype, shape, layout):
    check_backend("triton", shape, dtype, layout)


@interpreted_only
def test_interpreted_zero_and_extreme_values():
    check_zero_and_tiny_vectors("triton")
    for dtype in (torch.bfloat16, torch.float16):
        check_extreme_16bit_values("triton", dtype)


@interpreted_only
def test_interpreted_dispatch_and_opcheck():
    assert bi._pick_backend(torch.device("cpu")) == "triton"
    x, y = sample_inputs((2, 5, 24), torch.float16)
    assert_matches(block_influence(x, y), reference(x, y))
    torch.library.opcheck(torch.ops.fastprune.block_influence.default, (x, y))
    torch.library.opcheck(torch.ops.fastprune.block_influence_accumulate_.default, (torch.zeros(2).double(), x, y))


@needs_gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [*SHAPES, (4096, 4096), (1, 512, 576)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_backends(backend, dtype, shape, layout):
    if backend == "cuda" and not CUDA_BUILT:
        pytest.skip("CUDA module not built")
    check_backend(backend, shape, dtype, layout, device="cuda")


def test_public_api_from_a_forward_hook():
    """Block Influence of a layer = 1 - sum / count, accumulated over batches by a forward hook."""
    layer = torch.nn.Linear(16, 16)
    accum = torch.zeros(2, dtype=torch.float64)
    hook = layer.register_forward_hook(lambda _m, args, out: block_influence_accumulate_(accum, args[0], out))
    batches = [torch.randn(2, 5, 16), torch.randn(3, 4, 16)]
    for batch in batches:
        layer(batch)  # the output requires grad: the op takes it as a statistic, not a differentiable input
    hook.remove()
    expected = sum(reference(b, layer(b).detach()) for b in batches)
    assert_matches(accum, expected)
    assert 0.0 < 1 - accum[0] / accum[1] < 2.0


def test_functional_result():
    x, y = sample_inputs((3, 4, 40), torch.bfloat16)
    got = block_influence(x, y)
    assert_matches(got, reference(x, y))
    assert got.dtype == torch.float64 and not got.requires_grad


# ------------------------------------------------------------------------------------ op registration


def test_opcheck():
    x, y = sample_inputs((2, 5, 24), torch.float32)
    torch.library.opcheck(torch.ops.fastprune.block_influence.default, (x, y))
    torch.library.opcheck(torch.ops.fastprune.block_influence.default, (x[:, 1:], y[:, :-1]))
    torch.library.opcheck(torch.ops.fastprune.block_influence_accumulate_.default, (torch.zeros(2).double(), x, y))


def test_compiles_with_fake_tensors():
    x, y = sample_inputs((2, 5, 24), torch.float32)

    def both(x, y):
        accum = block_influence(x, y)
        block_influence_accumulate_(accum, x, y)
        return accum

    compiled = torch.compile(both, fullgraph=True, backend="eager")
    assert_matches(compiled(x, y) / 2, reference(x, y))


def test_public_api_under_fake_tensor_mode():
    """Eager calls skip the op's dispatch; anything traced (here fake tensors) must go through the op."""
    with FakeTensorMode():
        x, y = torch.empty(3, 5, 8, dtype=torch.float16), torch.empty(3, 5, 8, dtype=torch.float16)
        accum = block_influence(x, y)
        block_influence_accumulate_(accum, x, y)
    assert accum.shape == (2,) and accum.dtype == torch.float64


# ---------------------------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    ("x", "y", "match"),
    [
        (torch.randn(4, 6), torch.randn(4, 5), "same shape"),
        (torch.randn(4, 6), torch.randn(6, 4), "same shape"),
        (torch.randn(4, 6), torch.randn(4, 6).half(), "same dtype"),
        (torch.randn(4, 6).double(), torch.randn(4, 6).double(), "dtype must be"),
        (torch.ones(4, 6, dtype=torch.int64), torch.ones(4, 6, dtype=torch.int64), "dtype must be"),
        (torch.tensor(1.0), torch.tensor(1.0), "at least 1-D"),
    ],
)
def test_bad_arguments_raise(x, y, match):
    with pytest.raises(RuntimeError, match=match):
        block_influence(x, y)
    with pytest.raises(RuntimeError, match=match):
        block_influence_accumulate_(torch.zeros(2, dtype=torch.float64), x, y)


@pytest.mark.parametrize(
    ("accum", "match"),
    [
        (torch.zeros(2), "must be float64"),
        (torch.zeros(3).double(), r"shape \(2,\)"),
        (torch.zeros(1, 2).double(), r"shape \(2,\)"),
    ],
)
def test_bad_accum_raises(accum, match):
    with pytest.raises(RuntimeError, match=match):
        block_influence_accumulate_(accum, torch.randn(4, 6), torch.randn(4, 6))


def test_non_tensor_raises():
    with pytest.raises(TypeError, match="y must be a Tensor"):
        block_influence(torch.randn(4, 6), (torch.randn(4, 6),))


@needs_cpu_ext
@pytest.mark.parametrize(
    ("accum", "x", "y", "match"),
    [
        (torch.zeros(2).double(), torch.randn(4, 6), torch.randn(4, 5), "same shape"),
        (torch.zeros(2).double(), torch.randn(4, 6), torch.randn(4, 6).half(), "same dtype"),
        (torch.zeros(2).double(), torch.randn(4, 6).double(), torch.randn(4, 6).double(), "dtype must be"),
        (torch.zeros(2).double(), torch.tensor(1.0), torch.tensor(1.0), "at least 1-D"),
        (torch.zeros(2), torch.randn(4, 6), torch.randn(4, 6), "float64 CPU tensor"),
        (torch.zeros(3).double(), torch.randn(4, 6), torch.randn(4, 6), "float64 CPU tensor"),
    ],
)
def test_cpu_kernel_rejects_bad_arguments(accum, x, y, match):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.fastprune_cpu.block_influence_accumulate_(accum, x, y)


@needs_cpu_ext
def test_cpu_kernel_rejects_too_many_token_dims():
    x = torch.randn([3] * 10 + [2])[(slice(0, 2),) * 10]  # ten token dims, no two of which merge
    with pytest.raises(RuntimeError, match="non-mergeable leading dims"):
        torch.ops.fastprune_cpu.block_influence_accumulate_(torch.zeros(2).double(), x, x)


@needs_cuda_module
def test_cuda_module_imports_and_says_no_gpu():
    module = importlib.import_module("fastprune._cuda_block_influence")
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="unknown dtype"):
            module.cosine_sum(1, 1, 1, 1, 1, 1, 1, 7, 0, 0)
    else:
        with pytest.raises(RuntimeError, match="no CUDA GPU is available"):
            module.cosine_sum(0, 0, 0, 0, 0, 0, 0, 0, 0, 0)


@needs_gpu
@needs_cuda_module
def test_cuda_module_rejects_bad_sizes():
    module = importlib.import_module("fastprune._cuda_block_influence")
    out = torch.zeros(1, dtype=torch.float64, device="cuda")
    x = torch.randn(4, 6, device="cuda")
    with pytest.raises(ValueError, match="negative size"):
        module.cosine_sum(out.data_ptr(), x.data_ptr(), x.data_ptr(), -1, 6, 6, 6, 0, 0, 0)
    with pytest.raises(ValueError, match="negative token stride"):
        module.cosine_sum(out.data_ptr(), x.data_ptr(), x.data_ptr(), 4, 6, -6, 6, 0, 0, 0)
