"""sparse24: every backend against plain-PyTorch references, plus layout, tie-breaking, opcheck, gradients and
bad arguments.

Tolerances. Mask, compress and decompress only select and move elements: every backend must match the
reference exactly in every dtype (atol = rtol = 0), and decompress(compress(w)) == where(mask, w, 0) exactly.
The product is compared with a float64 product of the same inputs rounded once to the dtype; backends sum in
fp32 and round once, so they may differ by the fp32 summation error (atol = 1e-5 * sqrt(in)) plus one unit in
the last place of the output dtype (rtol): fp32 1e-5, bf16 2^-7 = 7.8e-3, fp16 2^-10 = 9.8e-4 (rounded to
1e-3).
"""

import importlib
import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F
from kernel_testing import INTERPRETING, interpreted_only, needs_gpu, needs_triton, run_tests_in_subprocess

from fastprune.ops import (
    Sparse24Linear,
    sparse24_compress,
    sparse24_decompress,
    sparse24_mask,
    sparse24_matmul,
)

s24 = importlib.import_module("fastprune.ops.sparse24")


def reference_mask(w: torch.Tensor, score: torch.Tensor | None = None, act_norm=None) -> torch.Tensor:
    """Keep, per group of 4, the first 2 after stable sorts by score (descending), then NaN first."""
    s = (w.abs().double() if score is None else score.double()) * (1 if act_norm is None else act_norm.double())
    groups = s.view(s.shape[0], s.shape[1] // 4, 4)
    nan = groups.isnan()
    order = torch.sort(torch.where(nan, math.inf, groups), dim=-1, descending=True, stable=True).indices
    nan_sorted = nan.gather(-1, order).to(torch.int8)
    order = order.gather(-1, torch.sort(nan_sorted, dim=-1, descending=True, stable=True).indices)
    return torch.zeros(groups.shape, dtype=torch.bool).scatter_(-1, order[..., :2], True).view(w.shape)


def reference_product(x, w_dense, bias=None) -> torch.Tensor:
    """float64 ``x @ W^T + bias`` of the given (already rounded) inputs, rounded once to x's dtype."""
    y = x.double() @ w_dense.double().t()
    if bias is not None:
        y = y + bias.double()
    return y.to(x.dtype)


DTYPES = [torch.float32, torch.bfloat16, torch.float16]
RTOL = {torch.float32: 1e-5, torch.bfloat16: 2**-7, torch.float16: 1e-3}
# Odd row counts, 1 group, odd group counts (a half-used metadata byte), widths across SIMD chunk boundaries.
SHAPES = [(5, 12), (123, 124), (1, 4), (1, 8), (7, 36), (33, 100), (16, 64), (17, 132)]

CPU_BUILT = importlib.util.find_spec("fastprune._cpu_sparse24") is not None
CUDA_BUILT = importlib.util.find_spec("fastprune._cuda_sparse24") is not None
needs_cpu_ext = pytest.mark.skipif(not CPU_BUILT, reason="C++ CPU kernels not built")


def assert_product_close(y: torch.Tensor, expected: torch.Tensor, in_features: int) -> None:
    torch.testing.assert_close(
        y, expected, atol=1e-5 * math.sqrt(max(in_features, 1)), rtol=RTOL[y.dtype], check_device=False
    )


def make_weight(shape, dtype, seed=0, ties=False) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if ties:  # few distinct magnitudes: most groups hold equal scores, so tie-breaking decides
        return torch.randint(-2, 3, shape, generator=gen).to(dtype)
    return torch.randn(shape, generator=gen).to(dtype)


def sample_scores(kind: str, shape, seed=1):
    """(score, act_norm) for one selection mode."""
    gen = torch.Generator().manual_seed(seed)
    score = torch.rand(shape, generator=gen) if kind in ("score", "both") else None
    act = torch.rand(shape[1], generator=gen) * 4 if kind in ("act_norm", "both") else None
    if kind == "score_bf16":
        score = torch.rand(shape, generator=gen).to(torch.bfloat16)
    return score, act


@pytest.fixture(params=[0, 1, 2], ids=["scalar", "avx2", "avx512"])
def cpu_isa(request):
    """Cap the C++ kernels' SIMD level (skipping levels this CPU lacks); restored afterwards."""
    ext = importlib.import_module("fastprune._cpu_sparse24")
    if request.param > ext.detect_isa():
        pytest.skip("this CPU lacks the instruction set")
    ext.set_isa(request.param)
    yield request.param
    ext.set_isa(ext.detect_isa())


BACKENDS = ["reference", pytest.param("cpu", marks=needs_cpu_ext)]


# ---------------------------------------------------------------------------------------------- layout


def test_layout_of_a_known_weight():
    w = torch.tensor([[1.0, 3.0, 2.0, 0.0, -5.0, 0.5, 0.25, 4.0, 0.0, 0.0, 7.0, 1.0]])
    values, meta = sparse24_compress(w)
    # Groups keep positions (1, 2), (0, 3), (2, 3): nibbles 1 | 2 << 2 = 9, 0 | 3 << 2 = 12, 2 | 3 << 2 = 14.
    assert values.tolist() == [[3.0, 2.0, -5.0, 4.0, 7.0, 1.0]]
    assert meta.dtype == torch.uint8 and meta.tolist() == [[9 | 12 << 4, 14]]
    assert s24.meta_columns(12) == 2


def test_ties_keep_the_lower_position_and_nan_ranks_first():
    w = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0, -2.0, 2.0, 2.0, 3.0, math.nan, 3.0, 9.0, -0.0, 0.0, 0.0, 0.0]])
    expected = [[True, True, False, False, False, True, True, False, False, True, False, True, True, True]]
    expected[0] += [False, False]
    for backend in ["reference"] + (["cpu"] if CPU_BUILT else []):
        mask = s24._BACKENDS["mask"][backend](w, None, None)
        assert mask.tolist() == expected, backend


def test_signed_and_infinite_scores():
    inf, nan = math.inf, math.nan
    score = torch.tensor([[-0.0, 0.0, -1.0, -inf, inf, nan, inf, 1.0, -inf, -inf, -inf, -inf, -3, -1, -2, -4]])
    expected = [[True, True, False, False, True, True, False, False, True, True, False, False]]
    expected[0] += [False, True, True, False]
    w = torch.ones(1, 16)
    for backend in ["reference"] + (["cpu"] if CPU_BUILT else []):
        assert s24._BACKENDS["mask"][backend](w, score, None).tolist() == expected, backend
    assert reference_mask(w, score).tolist() == expected


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ties", [False, True])
def test_reference_mask_matches_sort_definition(dtype, ties):
    w = make_weight((9, 24), dtype, ties=ties)
    w[0, :4] = math.nan
    w[1, 1] = math.nan
    assert torch.equal(s24.reference_sparse24_mask(w), reference_mask(w))
    score, act = sample_scores("both", w.shape)
    assert torch.equal(s24.reference_sparse24_mask(w, score, act), reference_mask(w, score, act.float()))


# ---------------------------------------------------------------------------------------------- backends


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["abs", "score", "act_norm", "both", "score_bf16"])
def test_mask_and_compress_match_reference(backend, shape, dtype, kind):
    w = make_weight(shape, dtype, ties=kind == "abs")
    score, act = sample_scores(kind, shape)
    mask = s24._BACKENDS["mask"][backend](w, score, act)
    values, meta = s24._BACKENDS["compress"][backend](w, score, act)
    ref_values, ref_meta = s24.reference_sparse24_compress(w, score, act)
    assert mask.dtype == torch.bool and torch.equal(mask, reference_mask(w, score, act))
    assert values.dtype == dtype and torch.equal(values, ref_values)
    assert torch.equal(meta, ref_meta)
    assert (mask.view(shape[0], -1, 4).sum(-1) == 2).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_is_exact(backend, shape, dtype):
    w = make_weight(shape, dtype, seed=3)
    w[0, 0] = math.nan
    values, meta = s24.reference_sparse24_compress(w)
    dense = s24._BACKENDS["decompress"][backend](values, meta)
    expected = torch.where(s24.reference_sparse24_mask(w), w, torch.zeros((), dtype=dtype))
    assert dense.dtype == dtype and dense.shape == w.shape
    assert torch.equal(dense.isnan(), expected.isnan())
    assert torch.equal(torch.nan_to_num(dense), torch.nan_to_num(expected))


@needs_cpu_ext
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_large_rows(dtype):
    w = make_weight((40, 4096), dtype, seed=4)
    values, meta = s24._BACKENDS["compress"]["cpu"](w, None, None)
    ref_values, ref_meta = s24.reference_sparse24_compress(w)
    assert torch.equal(values, ref_values) and torch.equal(meta, ref_meta)
    assert torch.equal(
        s24._BACKENDS["decompress"]["cpu"](values, meta), s24.reference_sparse24_decompress(values, meta)
    )


MATMUL_CASES = [  # (out, in, tokens): GEMV below 16 tokens, GEMM from 16; tails of every SIMD width
    (5, 12, 1),
    (123, 124, 3),
    (1, 4, 2),
    (33, 100, 7),
    (17, 132, 16),
    (40, 196, 29),
    (16, 256, 12),
    (3, 36, 70),
]


def matmul_inputs(out, in_features, tokens, dtype, seed=0, bias=True):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out, in_features, generator=gen).to(dtype)
    values, meta = s24.reference_sparse24_compress(w)
    x = torch.randn(tokens, in_features, generator=gen).to(dtype)
    b = torch.randn(out, generator=gen).to(dtype) if bias else None
    return x, values, meta, b


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", MATMUL_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matmul_matches_reference(backend, case, dtype):
    out, in_features, tokens = case
    x, values, meta, bias = matmul_inputs(out, in_features, tokens, dtype)
    expected = reference_product(x, s24.reference_sparse24_decompress(values, meta), bias)
    y = s24._BACKENDS["matmul"][backend](x, values, meta, bias)
    assert y.shape == (tokens, out) and y.dtype == dtype
    assert_product_close(y, expected, in_features)


@needs_cpu_ext
# (47, 1600, 4) and (7, 6400, 1): x outgrows L1, so rows go 4 at a time, with leftover rows.
@pytest.mark.parametrize(
    "case",
    [(5, 12, 1), (123, 124, 3), (33, 100, 15), (17, 132, 16), (40, 196, 29), (47, 1600, 4), (7, 6400, 1)],
)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_cpu_matmul_every_simd_level(cpu_isa, case, dtype, bias):
    out, in_features, tokens = case
    x, values, meta, b = matmul_inputs(out, in_features, tokens, dtype, bias=bias)
    expected = reference_product(x, s24.reference_sparse24_decompress(values, meta), b)
    assert_product_close(s24._BACKENDS["matmul"]["cpu"](x, values, meta, b), expected, in_features)


@needs_cpu_ext
@pytest.mark.parametrize("tokens", [1, 64])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_matmul_llm_width(cpu_isa, tokens, dtype):
    x, values, meta, b = matmul_inputs(48, 4096, tokens, dtype, seed=5)
    expected = reference_product(x, s24.reference_sparse24_decompress(values, meta), b)
    assert_product_close(s24._BACKENDS["matmul"]["cpu"](x, values, meta, b), expected, 4096)


@pytest.mark.parametrize("dtype", DTYPES)
def test_public_matmul_batch_dims_and_non_contiguous(dtype):
    gen = torch.Generator().manual_seed(6)
    w = torch.randn(36, 20, generator=gen).to(dtype)
    values, meta = sparse24_compress(w.t().contiguous().t().contiguous())
    values_nc = values.t().contiguous().t()  # column-major view
    meta_nc = torch.cat([meta, meta], dim=1)[:, : meta.shape[1]]  # row stride != width
    assert not values_nc.is_contiguous() and not meta_nc.is_contiguous()
    x = torch.randn(2, 40, 3, generator=gen).to(dtype)[:, ::2].transpose(1, 2)  # [2, 3, 20], strided
    dense = s24.reference_sparse24_decompress(values, meta)
    y = sparse24_matmul(x, values_nc, meta_nc)
    assert y.shape == (2, 3, 36)
    assert_product_close(y, reference_product(x.reshape(-1, 20), dense).view(2, 3, 36), 20)
    y1 = sparse24_matmul(x[0, 0], values, meta)  # 1-D x, like F.linear
    assert y1.shape == (36,)
    assert_product_close(y1, reference_product(x[0, 0:1], dense)[0], 20)
    assert sparse24_matmul(x[:, :0], values, meta).shape == (2, 0, 36)


@pytest.mark.parametrize("dtype", DTYPES)
def test_public_mask_compress_non_contiguous(dtype):
    w = make_weight((24, 16), dtype, seed=7).t()  # [16, 24], column-major
    score = torch.rand(24, 32)[:, ::2].t()
    act = torch.rand(48)[::2]
    assert torch.equal(sparse24_mask(w, score, act_norm=act), reference_mask(w, score, act))
    values, meta = sparse24_compress(w, score, act_norm=act)
    ref = s24.reference_sparse24_compress(w.contiguous(), score.contiguous(), act.contiguous())
    assert torch.equal(values, ref[0]) and torch.equal(meta, ref[1])
    assert torch.equal(sparse24_decompress(values, meta, 24), s24.reference_sparse24_decompress(*ref))


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_cpu_ext)])
def test_empty_shapes(backend):
    for op, args in (
        ("mask", (torch.zeros(0, 8), None, None)),
        ("compress", (torch.zeros(3, 0), None, None)),
        ("decompress", (torch.zeros(0, 4), torch.zeros(0, 1, dtype=torch.uint8))),
        ("matmul", (torch.zeros(0, 8), torch.zeros(3, 4), torch.zeros(3, 1, dtype=torch.uint8), None)),
        ("matmul", (torch.zeros(2, 0), torch.zeros(3, 0), torch.zeros(3, 0, dtype=torch.uint8), None)),
    ):
        result = s24._BACKENDS[op][backend](*args)
        assert all(t.numel() == 0 or not t.any() for t in (result if isinstance(result, tuple) else (result,)))
    y = s24._BACKENDS["matmul"][backend](
        torch.ones(2, 0), torch.zeros(3, 0), torch.zeros(3, 0, dtype=torch.uint8), None
    )
    assert y.shape == (2, 3) and not y.any()


def test_wanda_act_norm_changes_the_choice():
    w = torch.tensor([[1.0, 1.1, 1.2, 1.3]])
    assert sparse24_mask(w).tolist() == [[False, False, True, True]]
    assert sparse24_mask(w, act_norm=torch.tensor([10.0, 10.0, 1.0, 1.0])).tolist() == [[True, True, False, False]]
    assert sparse24_mask(w, score=torch.tensor([[4.0, 0.0, 3.0, 0.0]])).tolist() == [[True, False, True, False]]


# ------------------------------------------------------------------------------------------ opcheck, autograd


def _opcheck_samples():
    x, values, meta, bias = matmul_inputs(9, 20, 3, torch.float32)
    w = make_weight((9, 20), torch.float32)
    score, act = sample_scores("both", w.shape)
    return [
        ("sparse24_mask", (w, None, None)),
        ("sparse24_mask", (w, score, act)),
        ("sparse24_compress", (w, None, act)),
        ("sparse24_decompress", (values.clone().requires_grad_(), meta)),
        ("sparse24_matmul", (x.clone().requires_grad_(), values.clone().requires_grad_(), meta, bias)),
        ("sparse24_matmul", (x[0].clone(), values, meta, None)),
        (
            "sparse24_matmul",
            (x.view(3, 1, 20).clone().requires_grad_(), values, meta, bias.clone().requires_grad_()),
        ),
    ]


@pytest.mark.parametrize("name,args", _opcheck_samples(), ids=lambda v: v if isinstance(v, str) else "")
def test_opcheck(name, args):
    torch.library.opcheck(getattr(torch.ops.fastprune, name).default, args)


@pytest.mark.parametrize("tokens", [1, 20])
def test_matmul_gradients_match_reference(tokens):
    x, values, meta, bias = matmul_inputs(11, 24, tokens, torch.float32)
    grad = torch.randn(tokens, 11)
    leaves = [t.clone().requires_grad_() for t in (x, values, bias)]
    sparse24_matmul(leaves[0], leaves[1], meta, leaves[2]).backward(grad)
    ref_leaves = [t.clone().requires_grad_() for t in (x, values, bias)]
    s24.reference_sparse24_matmul(ref_leaves[0], ref_leaves[1], meta, ref_leaves[2]).backward(grad)
    for got, ref in zip(leaves, ref_leaves, strict=True):
        torch.testing.assert_close(got.grad, ref.grad, atol=1e-5, rtol=1e-5)


def test_decompress_gradient_is_gather():
    _, values, meta, _ = matmul_inputs(6, 16, 1, torch.float32)
    leaf = values.clone().requires_grad_()
    grad = torch.randn(6, 16)
    sparse24_decompress(leaf, meta).backward(grad)
    ref = values.clone().requires_grad_()
    s24.reference_sparse24_decompress(ref, meta).backward(grad)
    assert torch.equal(leaf.grad, ref.grad)


def test_sparse24_linear():
    torch.manual_seed(8)
    linear = torch.nn.Linear(20, 7)
    layer = Sparse24Linear.from_linear(linear)
    assert (layer.in_features, layer.out_features) == (20, 7)
    dense = torch.where(sparse24_mask(linear.weight.detach()), linear.weight.detach(), 0)
    assert torch.equal(layer.dense_weight(), dense)
    x = torch.randn(4, 20)
    torch.testing.assert_close(layer(x), F.linear(x, dense, linear.bias), atol=1e-5, rtol=1e-5)
    layer(x).sum().backward()
    assert layer.values.grad.shape == (7, 10) and layer.bias.grad.shape == (7,)
    assert "meta" in dict(layer.named_buffers()) and "in_features=20" in repr(layer)


def test_sparse24_linear_run_dense_follows_the_values():
    """The dense copy gives the masked dense product, is not saved, and is rebuilt whenever values or mask change."""
    torch.manual_seed(9)
    layer = Sparse24Linear.from_linear(torch.nn.Linear(24, 5))
    x = torch.randn(3, 24)
    layer.run_dense()
    assert layer.runs_dense and "runs dense" in repr(layer) and "dense_cache" not in layer.state_dict()
    with torch.no_grad():
        assert torch.equal(layer(x), F.linear(x, layer.dense_weight(), layer.bias))
    loss = layer(x).square().sum()  # with a gradient: the 2:4 product, whose gradient reaches values
    loss.backward()
    torch.optim.SGD(layer.parameters(), lr=0.5).step()
    other = Sparse24Linear.from_linear(torch.nn.Linear(24, 5))
    for change in (None, lambda: layer.load_state_dict(other.state_dict())):
        if change is not None:
            change()
        with torch.no_grad():
            expected = F.linear(x, sparse24_decompress(layer.values, layer.meta), layer.bias)
            assert torch.equal(layer(x), expected)
    assert torch.equal(layer.meta, other.meta)
    layer.run_dense(False)
    assert not layer.runs_dense
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- bad arguments


BAD_WEIGHT = [  # (weight, score, act_norm, message)
    (torch.randn(5, 10), None, None, "divisible by 4"),
    (torch.randn(2, 3, 4), None, None, "2-D"),
    (torch.randint(0, 3, (4, 8)), None, None, "float32, bfloat16 or float16"),
    (torch.randn(4, 8), torch.randn(4, 4), None, "score shape"),
    (torch.randn(4, 8), None, torch.randn(7), "act_norm"),
]


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_cpu_ext)])
@pytest.mark.parametrize("op", ["mask", "compress"])
@pytest.mark.parametrize("bad", BAD_WEIGHT, ids=lambda b: b[3])
def test_bad_weight_args(backend, op, bad):
    weight, score, act, message = bad
    with pytest.raises(RuntimeError, match=message):
        s24._BACKENDS[op][backend](weight, score, act)
    public = sparse24_mask if op == "mask" else sparse24_compress
    with pytest.raises(RuntimeError, match=message):
        public(weight, score, act_norm=act)


def _good():
    return matmul_inputs(6, 16, 2, torch.float32)


BAD_COMPRESSED = [  # (x, values, meta, bias, message) built from good inputs
    lambda x, v, m, b: (x, v[:, :7], m, b, "divisible by 4"),
    lambda x, v, m, b: (x, v, m[:, :1], b, "meta"),
    lambda x, v, m, b: (x, v, m[:5], b, "meta"),
    lambda x, v, m, b: (x, v, m.to(torch.int32), b, "uint8"),
    lambda x, v, m, b: (x, v.to(torch.float64), m, b, "float32, bfloat16 or float16"),
    lambda x, v, m, b: (x[:, :12], v, m, b, "features"),
    lambda x, v, m, b: (x.half(), v, m, b, "dtype"),
    lambda x, v, m, b: (x, v, m, b[:5], "bias"),
    lambda x, v, m, b: (x, v, m, b.half(), "bias dtype"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("make", BAD_COMPRESSED, ids=lambda f: "")
def test_bad_matmul_args(backend, make):
    x, values, meta, bias, message = make(*_good())
    with pytest.raises(RuntimeError, match=message):
        s24._BACKENDS["matmul"][backend](x, values, meta, bias)
    with pytest.raises(RuntimeError, match=message):
        sparse24_matmul(x, values, meta, bias)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("make", BAD_COMPRESSED[:5], ids=lambda f: "")
def test_bad_decompress_args(backend, make):
    _, values, meta, _, message = make(*_good())
    with pytest.raises(RuntimeError, match=message):
        s24._BACKENDS["decompress"][backend](values, meta)
    with pytest.raises(RuntimeError, match=message):
        sparse24_decompress(values, meta)


def test_decompress_checks_in_features():
    _, values, meta, _ = _good()
    with pytest.raises(RuntimeError, match="in_features 12"):
        sparse24_decompress(values, meta, 12)


# ---------------------------------------------------------------------------------------------- triton


@needs_triton
@pytest.mark.skipif(INTERPRETING, reason="this process already interprets Triton: the tests run directly")
def test_triton_interpreted():
    """Run this file's ``interpreted`` tests in a fresh process with TRITON_INTERPRET=1."""
    run_tests_in_subprocess(__file__, "interpreted", TRITON_INTERPRET="1")


@interpreted_only
@pytest.mark.parametrize("shape", [(5, 12), (1, 4), (7, 36), (17, 132)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_interpreted_decompress(dtype, shape):
    values, meta = s24.reference_sparse24_compress(make_weight(shape, dtype, seed=3))
    dense = s24._BACKENDS["decompress"]["triton"](values, meta)
    assert torch.equal(dense, s24.reference_sparse24_decompress(values, meta))


@interpreted_only
@pytest.mark.parametrize("case", [(5, 12, 1), (1, 4, 2), (33, 100, 3), (17, 260, 2)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_interpreted_matmul(dtype, case, bias):
    out, in_features, tokens = case
    x, values, meta, b = matmul_inputs(out, in_features, tokens, dtype, bias=bias)
    expected = reference_product(x, s24.reference_sparse24_decompress(values, meta), b)
    assert_product_close(s24._BACKENDS["matmul"]["triton"](x, values, meta, b), expected, in_features)


@interpreted_only
def test_interpreted_dispatch_picks_triton():
    assert s24._pick_backend("matmul", torch.device("cpu")) == "triton"
    assert s24._pick_backend("decompress", torch.device("cpu")) == "triton"
    assert s24._pick_backend("compress", torch.device("cpu")) != "triton"  # no Triton kernel for it
    x, values, meta, bias = matmul_inputs(9, 20, 2, torch.bfloat16)
    expected = reference_product(x, s24.reference_sparse24_decompress(values, meta), bias)
    assert_product_close(sparse24_matmul(x.view(2, 1, 20), values, meta, bias).view(2, 9), expected, 20)


@interpreted_only
@pytest.mark.parametrize("make", BAD_COMPRESSED, ids=lambda f: "")
def test_interpreted_bad_args(make):
    x, values, meta, bias, message = make(*_good())
    with pytest.raises(RuntimeError, match=message):
        s24._BACKENDS["matmul"]["triton"](x, values, meta, bias)
    if BAD_COMPRESSED.index(make) < 5:
        with pytest.raises(RuntimeError, match=message):
            s24._BACKENDS["decompress"]["triton"](values, meta)


# ---------------------------------------------------------------------------------------------- CUDA


@pytest.mark.skipif(not CUDA_BUILT, reason="CUDA module not built (no nvcc at build time)")
@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the no-GPU error cannot happen")
def test_cuda_module_imports_and_says_no_gpu():
    module = importlib.import_module("fastprune._cuda_sparse24")
    assert module.MAX_GEMV_TOKENS == s24._GPU_GEMV_MAX_TOKENS
    calls = [
        lambda: module.mask(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4, 0),
        lambda: module.compress(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4, 0),
        lambda: module.decompress(0, 0, 0, 0, 0, 0, 0, 4, 0, 0),
        lambda: module.gemv(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 4, 0, 0),
    ]
    for call in calls:
        with pytest.raises(RuntimeError, match="no CUDA GPU"):
            call()


@needs_gpu
@pytest.mark.parametrize("backend", ["cuda", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_backends(backend, dtype):
    for shape in SHAPES + [(64, 4096)]:
        w = make_weight(shape, dtype, seed=9).cuda()
        score, act = sample_scores("both", shape)
        ref_values, ref_meta = s24.reference_sparse24_compress(w.cpu(), score, act)
        if backend == "cuda":
            score, act = score.cuda(), act.cuda()
            assert torch.equal(s24._BACKENDS["mask"]["cuda"](w, score, act).cpu(), reference_mask(w.cpu(), score, act))
            values, meta = s24._BACKENDS["compress"]["cuda"](w, score, act)
            assert torch.equal(values.cpu(), ref_values) and torch.equal(meta.cpu(), ref_meta)
        values, meta = ref_values.cuda(), ref_meta.cuda()
        dense = s24._BACKENDS["decompress"][backend](values, meta)
        assert torch.equal(dense.cpu(), s24.reference_sparse24_decompress(ref_values, ref_meta))
        for tokens in (1, 3, 8, 9, 64):
            x = torch.randn(tokens, shape[1], dtype=dtype, device="cuda")
            bias = torch.randn(shape[0], dtype=dtype, device="cuda")
            y = s24._BACKENDS["matmul"][backend](x, values, meta, bias)
            expected = reference_product(x.cpu(), dense.cpu(), bias.cpu())
            # Past 8 tokens: cuBLAS on the decompressed weight, which may sum in lower precision.
            rtol = RTOL[dtype] if tokens <= 8 else 2 * RTOL[dtype] + 1e-3
            torch.testing.assert_close(y.cpu(), expected, atol=1e-4 * math.sqrt(shape[1]), rtol=rtol)


@needs_gpu
def test_gpu_bad_args_raise():
    x, values, meta, bias = (t.cuda() for t in _good())
    for make in BAD_COMPRESSED:
        bx, bv, bm, bb, message = make(x, values, meta, bias)
        with pytest.raises((RuntimeError, ValueError), match=message):
            sparse24_matmul(bx, bv, bm, bb)
    module = importlib.import_module("fastprune._cuda_sparse24")
    with pytest.raises(ValueError, match="divisible by 4"):
        module.decompress(values.data_ptr(), values.numel(), meta.data_ptr(), meta.numel(), 0, 0, 6, 18, 0, 0)
    with pytest.raises(ValueError, match="elements"):
        module.decompress(values.data_ptr(), values.numel(), meta.data_ptr(), 1, 0, 0, 6, 16, 0, 0)


@needs_gpu
def test_gpu_vendor_path():
    if not s24.vendor_sparse_available("cuda"):
        pytest.skip("torch semi-structured sparsity unavailable on this GPU")
    w = torch.randn(128, 128, dtype=torch.float16, device="cuda")
    values, meta = sparse24_compress(w)
    x = torch.randn(32, 128, dtype=torch.float16, device="cuda")
    y = F.linear(x, s24.to_vendor_sparse(values, meta))
    torch.testing.assert_close(y, F.linear(x, sparse24_decompress(values, meta)), atol=1e-2, rtol=1e-2)
