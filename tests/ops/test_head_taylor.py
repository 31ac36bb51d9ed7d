"""head_taylor: every backend against a per-group fp64 reference, plus opcheck, accumulation, bad arguments.

Tolerance, the same for every dtype (fp32, bf16, fp16): rtol = 1e-5, atol = 1e-6. Inputs convert exactly to
fp32 and the product of two 16-bit floats is exact in fp32, so 16-bit inputs lose nothing before the sums;
fp32 products round once (2^-24), and sums run in fp32 for at most a few hundred terms per lane before fp64.
"""

import importlib
import importlib.util

import pytest
import torch
from kernel_testing import BASELINE, INTERPRETING, interpreted_only, needs_gpu, needs_triton, run_tests_in_subprocess
from torch._subclasses.fake_tensor import FakeTensorMode

from fastprune.ops import head_taylor, head_taylor_accumulate_, reference_head_taylor

ht = importlib.import_module("fastprune.ops.head_taylor")


def reference(w: torch.Tensor, g: torch.Tensor, dim: int, group_size: int) -> torch.Tensor:
    """Per group of ``group_size`` along ``dim``: (sum |w*g|, sum (w*g)^2) in fp64, as float32 [2, groups]."""
    p = w.double() * g.double()
    groups = p.split(group_size, dim) if p.shape[dim] else ()
    sums = [torch.stack((c.abs().sum(), c.square().sum())) for c in groups]
    return torch.stack(sums, 1).float() if sums else torch.zeros(2, 0)


DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {"rtol": 1e-5, "atol": 1e-6}
# (shape, dim, group_size): heads by rows and columns, per channel, odd sizes, a single element, empty dims,
# biases, rows longer than one fp32 run (4096), more rows than one fp32 block per column (128).
CASES = [
    ((1, 1), 0, 1),
    ((1, 1), 1, 1),
    ((7, 13), 0, 7),
    ((7, 13), 1, 13),
    ((7, 13), 0, 1),
    ((7, 13), 1, 1),
    ((36, 53), 0, 4),
    ((53, 36), 1, 9),
    ((64, 257), 1, 257),
    ((64, 257), 0, 16),
    ((300, 70), 1, 7),
    ((9, 5000), 0, 3),
    ((130,), 0, 13),
    ((1,), 0, 1),
    ((0, 8), 0, 1),
    ((0, 8), 1, 4),
    ((8, 0), 0, 2),
]
LAYOUTS = ["contiguous", "row_strided", "transposed", "col_strided", "mixed"]

CPU_BUILT = importlib.util.find_spec("fastprune._cpu_head_taylor") is not None
CUDA_BUILT = importlib.util.find_spec("fastprune._cuda_head_taylor") is not None
needs_cpu_ext = pytest.mark.skipif(not CPU_BUILT, reason="C++ CPU kernels not built")
needs_cuda_module = pytest.mark.skipif(not CUDA_BUILT, reason="CUDA module not built (no nvcc at build time)")


def with_layout(t: torch.Tensor, layout: str, partner: bool) -> torch.Tensor:
    """The same values in another memory layout (``partner``: the second tensor of a "mixed" pair)."""
    if layout == "contiguous" or (layout == "mixed" and not partner):
        return t
    if t.dim() == 1:  # a bias slice: every other element of a buffer
        return torch.stack([t, torch.full_like(t, 9.0)], 1)[:, 0]
    if layout == "row_strided":  # a slice of a wider tensor: unit column stride, row stride > columns
        return torch.cat([t, torch.full_like(t, 9.0)], 1)[:, : t.shape[1]]
    if layout in ("transposed", "mixed"):
        return t.t().contiguous().t()
    return torch.stack([t, torch.full_like(t, 9.0)], 2)[:, :, 0]  # col_strided: no unit stride at all


def sample_inputs(shape, dtype, layout="contiguous", device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen).to(dtype)
    g = (torch.randn(shape, generator=gen) * 1e-2).to(dtype)
    return with_layout(w, layout, False).to(device), with_layout(g, layout, True).to(device)


def check_backend(backend, shape, dim, group_size, dtype, layout="contiguous", device="cpu"):
    w, g = sample_inputs(shape, dtype, layout, device)
    expected = reference(w.cpu(), g.cpu(), dim, group_size)
    scores = torch.full_like(expected, 0.5, device=device)
    ht._BACKENDS[backend](scores, w, g, dim, group_size)
    torch.testing.assert_close(scores.cpu(), expected + 0.5, **TOL)


# ---------------------------------------------------------------------------------------------- correctness


@pytest.mark.parametrize(("shape", "dim", "group_size"), CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_backend(dtype, shape, dim, group_size):
    check_backend("reference", shape, dim, group_size, dtype)
    w, g = sample_inputs(shape, dtype)
    torch.testing.assert_close(
        reference_head_taylor(w, g, dim=dim, group_size=group_size), reference(w, g, dim, group_size), **TOL
    )


@needs_cpu_ext
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(("shape", "dim", "group_size"), CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_backend(dtype, shape, dim, group_size, layout):
    check_backend("cpu", shape, dim, group_size, dtype, layout)


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
@pytest.mark.parametrize("layout", ["contiguous", "row_strided", "transposed", "mixed"])
@pytest.mark.parametrize(
    ("shape", "dim", "group_size"),
    [
        ((7, 13), 0, 7),
        ((7, 13), 1, 1),
        ((300, 70), 1, 7),
        ((36, 53), 0, 4),
        ((3, 2100), 0, 1),
        ((130,), 0, 13),
        ((0, 8), 1, 4),
    ],
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_interpreted_triton_backend(dtype, shape, dim, group_size, layout):
    check_backend("triton", shape, dim, group_size, dtype, layout)


@interpreted_only
def test_interpreted_dispatch_picks_triton():
    assert ht._pick_backend(torch.device("cpu")) == "triton"
    w, g = sample_inputs((12, 10), torch.bfloat16)
    torch.testing.assert_close(head_taylor(w, g, dim=0, group_size=4), reference(w, g, 0, 4), **TOL)


@interpreted_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_interpreted_extreme_16bit_values(dtype):
    check_extreme_16bit_values("triton", dtype)


@interpreted_only
def test_interpreted_opcheck():
    w, g = sample_inputs((12, 20), torch.float16)
    torch.library.opcheck(torch.ops.fastprune.head_taylor_accumulate_.default, (torch.zeros(2, 3), w, g, 0, 4))
    torch.library.opcheck(torch.ops.fastprune.head_taylor.default, (w, g, 1, 5))


@needs_gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(("shape", "dim", "group_size"), [*CASES, ((4096, 1024), 0, 128), ((1024, 4096), 1, 1)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_backends(backend, dtype, shape, dim, group_size, layout):
    if backend == "cuda" and not CUDA_BUILT:
        pytest.skip("CUDA module not built")
    check_backend(backend, shape, dim, group_size, dtype, layout, device="cuda")


def check_extreme_16bit_values(backend: str, dtype: torch.dtype) -> None:
    """Subnormal, tiny and large 16-bit values convert exactly (the fp16 path decodes the bits itself).

    The largest value is fp16's max but only 2^60 for bf16, whose max would overflow (w*g)^2 in fp32.
    """
    info = torch.finfo(dtype)
    big = min(info.max, 2.0**60)
    values = [info.smallest_normal / 4, info.smallest_normal, info.tiny * 3, 1.0, -2.5, big / 2**20, big]
    w = torch.tensor(values * 5, dtype=dtype)[:32]
    g = torch.tensor([1.0, -1.0, 0.5, 2.0**-10] * 8, dtype=dtype)
    for dim, group_size in ((0, 4), (0, 1)):
        scores = torch.zeros(2, 32 // group_size)
        ht._BACKENDS[backend](scores, w, g, dim, group_size)
        torch.testing.assert_close(scores, reference(w, g, dim, group_size), **TOL)


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_cpu_ext)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_extreme_16bit_values(backend, dtype):
    check_extreme_16bit_values(backend, dtype)


@needs_cpu_ext
def test_cpu_backend_many_threads_agree():
    """The thread count changes only how rows are split."""
    w, g = sample_inputs((1026, 700), torch.float32)  # enough work for 3 threads
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            torch.testing.assert_close(head_taylor(w, g, dim=1, group_size=7), reference(w, g, 1, 7), **TOL)
            torch.testing.assert_close(head_taylor(w, g, dim=0, group_size=27), reference(w, g, 0, 27), **TOL)
    finally:
        torch.set_num_threads(before)


def test_public_api_scores_heads_of_a_layer():
    """Per-head scores of q_proj rows and o_proj columns, per-channel gate rows, from Parameters and grads."""
    gen = torch.Generator().manual_seed(5)
    hidden, head_dim, inter = 48, 8, 40
    q = torch.nn.Parameter(torch.randn(hidden, hidden, generator=gen))
    o = torch.nn.Parameter(torch.randn(hidden, hidden, generator=gen))
    gate = torch.nn.Parameter(torch.randn(inter, hidden, generator=gen))
    for p in (q, o, gate):
        p.grad = torch.randn(p.shape, generator=gen)
    for param, dim, group_size in ((q, 0, head_dim), (o, 1, head_dim), (gate, 0, 1)):
        got = head_taylor(param, param.grad, dim=dim, group_size=group_size)
        assert got.shape == (2, param.shape[dim] // group_size) and got.dtype == torch.float32
        assert not got.requires_grad
        torch.testing.assert_close(got, reference(param.detach(), param.grad, dim, group_size), **TOL)


def test_accumulate_sums_batches():
    scores = torch.zeros(2, 6)
    expected = torch.zeros(2, 6)
    for seed in range(3):
        w, g = sample_inputs((24, 12), torch.bfloat16, seed=seed)
        head_taylor_accumulate_(scores, w, g, dim=0, group_size=4)
        expected += reference(w, g, 0, 4)
    torch.testing.assert_close(scores, expected, **TOL)


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_cpu_ext)])
def test_accumulate_into_strided_scores(backend):
    w, g = sample_inputs((24, 12), torch.float32)
    store = torch.zeros(2, 12)
    ht._BACKENDS[backend](store[:, ::2], w, g, 0, 4)
    torch.testing.assert_close(store[:, ::2], reference(w, g, 0, 4), **TOL)
    assert store[:, 1::2].abs().sum() == 0


# ------------------------------------------------------------------------------------ op registration


def test_opcheck():
    w, g = sample_inputs((12, 20), torch.float32)
    torch.library.opcheck(torch.ops.fastprune.head_taylor.default, (w, g, 1, 5))
    torch.library.opcheck(torch.ops.fastprune.head_taylor.default, (w[:, :10], g[:, :10].t().contiguous().t(), 0, 3))
    torch.library.opcheck(torch.ops.fastprune.head_taylor_accumulate_.default, (torch.zeros(2, 4), w, g, 1, 5))


def test_compiles_with_fake_tensors():
    w, g = sample_inputs((12, 20), torch.float32)

    def both(w, g):
        scores = head_taylor(w, g, dim=1, group_size=5)
        head_taylor_accumulate_(scores, w, g, dim=1, group_size=5)
        return scores

    compiled = torch.compile(both, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(w, g), 2 * reference(w, g, 1, 5), **TOL)


def test_public_api_under_fake_tensor_mode():
    """Eager calls skip the op's dispatch; anything traced (here fake tensors) must go through the op."""
    with FakeTensorMode():
        w, g = torch.empty(12, 20, dtype=torch.bfloat16), torch.empty(12, 20, dtype=torch.bfloat16)
        scores = head_taylor(w, g, dim=1, group_size=5)
        head_taylor_accumulate_(scores, w, g, dim=1, group_size=5)
    assert scores.shape == (2, 4) and scores.dtype == torch.float32


# ---------------------------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    ("w", "g", "dim", "group_size", "match"),
    [
        (torch.randn(4, 6), torch.randn(6, 4), 0, 1, "same shape"),
        (torch.randn(4, 6), torch.randn(4, 6, dtype=torch.float16), 0, 1, "same dtype"),
        (
            torch.randn(4, 6, dtype=torch.float64),
            torch.randn(4, 6, dtype=torch.float64),
            0,
            1,
            "dtype must be",
        ),
        (torch.ones(4, 6, dtype=torch.int32), torch.ones(4, 6, dtype=torch.int32), 0, 1, "dtype must be"),
        (torch.randn(2, 3, 4), torch.randn(2, 3, 4), 0, 1, "1-D or 2-D"),
        (torch.randn(8), torch.randn(8), 1, 1, "for a 1-D tensor"),
        (torch.randn(4, 6), torch.randn(4, 6), 2, 1, "dim must be 0 or 1"),
        (torch.randn(4, 6), torch.randn(4, 6), -1, 1, "dim must be 0 or 1"),
        (torch.randn(4, 6), torch.randn(4, 6), 0, 0, "group_size must be >= 1"),
        (torch.randn(4, 6), torch.randn(4, 6), 1, 4, "not divisible by group_size 4"),
    ],
)
def test_bad_arguments_raise(w, g, dim, group_size, match):
    with pytest.raises(RuntimeError, match=match):
        head_taylor(w, g, dim=dim, group_size=group_size)
    with pytest.raises(RuntimeError, match=match):
        head_taylor_accumulate_(torch.zeros(2, 1), w, g, dim=dim, group_size=group_size)


@pytest.mark.parametrize(
    ("scores", "match"),
    [
        (torch.zeros(2, 3), r"shape \(2, 2\)"),
        (torch.zeros(2), r"shape \(2, 2\)"),
        (torch.zeros(2, 2, dtype=torch.float64), "must be float32"),
    ],
)
def test_bad_scores_raise(scores, match):
    with pytest.raises(RuntimeError, match=match):
        head_taylor_accumulate_(scores, torch.randn(4, 6), torch.randn(4, 6), dim=0, group_size=2)


def test_non_tensor_raises():
    with pytest.raises(TypeError, match="grad must be a Tensor"):
        head_taylor(torch.randn(4, 6), None, dim=0, group_size=2)


@needs_cpu_ext
@pytest.mark.parametrize(
    ("scores", "w", "g", "dim", "group_size", "match"),
    [
        (torch.zeros(2, 2), torch.randn(4, 6), torch.randn(4, 5), 0, 2, "same shape"),
        (torch.zeros(2, 2), torch.randn(4, 6), torch.randn(4, 6).half(), 0, 2, "same dtype"),
        (torch.zeros(2, 2), torch.randn(4, 6).double(), torch.randn(4, 6).double(), 0, 2, "dtype must be"),
        (torch.zeros(2, 2), torch.randn(2, 2, 2), torch.randn(2, 2, 2), 0, 1, "1-D or 2-D"),
        (torch.zeros(2, 2), torch.randn(4), torch.randn(4), 1, 2, "out of range"),
        (torch.zeros(2, 2), torch.randn(4, 6), torch.randn(4, 6), 0, 0, "group_size must be >= 1"),
        (torch.zeros(2, 1), torch.randn(4, 6), torch.randn(4, 6), 1, 4, "not divisible"),
        (torch.zeros(2, 3), torch.randn(4, 6), torch.randn(4, 6), 0, 2, "scores must have shape"),
        (torch.zeros(2, 2).double(), torch.randn(4, 6), torch.randn(4, 6), 0, 2, "float32 CPU tensor"),
    ],
)
def test_cpu_kernel_rejects_bad_arguments(scores, w, g, dim, group_size, match):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.fastprune_cpu.head_taylor_accumulate_(scores, w, g, dim, group_size)


@needs_cuda_module
def test_cuda_module_imports_and_says_no_gpu():
    module = importlib.import_module("fastprune._cuda_head_taylor")
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="dim must be 0 or 1"):
            module.unit_sums(0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0)
    else:
        with pytest.raises(RuntimeError, match="no CUDA GPU is available"):
            module.unit_sums(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)


@needs_gpu
@needs_cuda_module
def test_cuda_module_rejects_bad_sizes():
    module = importlib.import_module("fastprune._cuda_head_taylor")
    out = torch.zeros(2, 4, dtype=torch.float64, device="cuda")
    w = torch.randn(4, 6, device="cuda")
    args = [out.data_ptr(), 6, w.data_ptr(), w.data_ptr(), 4, 6, 6, 6, 0, 0, 0, 0]  # out_numel 6 != 2 * 4
    with pytest.raises(ValueError, match="output must hold"):
        module.unit_sums(*args)
    args[1], args[9] = 8, 7
    with pytest.raises(ValueError, match="unknown dtype"):
        module.unit_sums(*args)
