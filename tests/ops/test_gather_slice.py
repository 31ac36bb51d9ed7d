"""gather_slice: every backend against a plain-indexing reference, plus opcheck, gradients and bad arguments.

A gather copies elements, so every backend must match the reference exactly in every dtype (fp32, bf16, fp16:
atol = rtol = 0).
"""

import importlib
import importlib.util

import pytest
import torch
from kernel_testing import needs_gpu, needs_triton

from fastprune.ops import gather_slice

gs = importlib.import_module("fastprune.ops.gather_slice")


def reference(t: torch.Tensor, rows: torch.Tensor | None, cols: torch.Tensor | None) -> torch.Tensor:
    """``t[rows][:, cols]`` by plain indexing."""
    if rows is not None:
        t = t[rows.long()]
    if cols is not None:
        t = t[:, cols.long()]
    return t.contiguous()


DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Odd widths, widths below and above one 64-byte vector (16 fp32 / 32 bf16 lanes), a single row or column.
SHAPES = [(1, 1), (1, 40), (7, 13), (37, 53), (33, 100), (64, 257), (5, 130)]
MODES = ["rows", "cols", "both", "none", "empty_rows", "empty_cols", "single", "repeat_unsorted", "full"]

CPU_BUILT = importlib.util.find_spec("fastprune._cpu_gather_slice") is not None
CUDA_BUILT = importlib.util.find_spec("fastprune._cuda_gather_slice") is not None
needs_cpu_ext = pytest.mark.skipif(not CPU_BUILT, reason="C++ CPU kernels not built")


def make_indices(n: int, mode: str, dim: int, gen: torch.Generator, dtype=torch.int64) -> torch.Tensor | None:
    """Indices into a dim of size ``n`` for one test mode (None = keep the dim whole)."""
    if mode == "none" or (mode == "rows" and dim == 1) or (mode == "cols" and dim == 0):
        return None
    if mode == "empty_rows":
        idx = torch.empty(0, dtype=torch.long) if dim == 0 else None
    elif mode == "empty_cols":
        idx = torch.empty(0, dtype=torch.long) if dim == 1 else None
    elif mode == "single":
        idx = torch.randint(0, n, (1,), generator=gen)
    elif mode == "repeat_unsorted":
        idx = torch.randint(0, n, (n + 3,), generator=gen)
    elif mode == "full":
        idx = torch.arange(n)
    else:  # keep about 3/4, sorted: what pruning produces
        idx = torch.randperm(n, generator=gen)[: max(1, 3 * n // 4)].sort().values
    return None if idx is None else idx.to(dtype)


def sample_inputs(device: str, dtype: torch.dtype, shape: tuple[int, int], mode: str, seed: int = 0):
    """One call's (tensors, rows, cols): a weight, its strided and transposed views and a bias."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen).to(dtype)
    rows = make_indices(shape[0], mode, 0, gen)
    cols = make_indices(shape[1], mode, 1, gen, dtype=torch.int32)
    wide = torch.randn(shape[0], 2 * shape[1], generator=gen).to(dtype)
    bias_store = torch.randn(2 * shape[0], generator=gen).to(dtype)
    tensors = [w, wide[:, ::2], wide[:, 1::2].t().contiguous().t(), bias_store[::2]]
    rows_list = [rows, rows, rows, rows]
    cols_list = [cols, cols, cols, None]
    tensors = [t.to(device) for t in tensors]
    to_dev = [None if i is None else i.to(device) for i in rows_list]
    return tensors, to_dev, [None if i is None else i.to(device) for i in cols_list]


def check_backend(
    backend: str, device: str, dtype: torch.dtype, shape: tuple[int, int], mode: str, into: bool = False
) -> None:
    """Compare one backend with the reference; ``into``: write into preallocated outputs (``out=``)."""
    tensors, rows, cols = sample_inputs(device, dtype, shape, mode)
    given = [torch.full_like(reference(t, r, c), 7) for t, r, c in zip(tensors, rows, cols, strict=True)]
    out = gs._BACKENDS[backend](tensors, rows, cols, given if into else None)
    assert len(out) == len(tensors)
    if into:
        assert all(o is g for o, g in zip(out, given, strict=True))
    for o, t, r, c in zip(out, tensors, rows, cols, strict=True):
        expected = reference(t, r, c)
        assert o.is_contiguous() and o.dtype == t.dtype and o.device == t.device
        torch.testing.assert_close(o, expected, atol=0, rtol=0)
        if o.numel():
            assert o.data_ptr() != t.data_ptr()


@pytest.fixture(scope="module")
def triton_interpreted():
    """Run Triton kernels on CPU tensors: TRITON_INTERPRET=1 must be set when the kernel module is loaded."""
    kernels = importlib.import_module("fastprune.kernels.gather_slice")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        importlib.reload(kernels)
        yield
    importlib.reload(kernels)


# ---------------------------------------------------------------------------------------------- correctness


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_backend(dtype, shape, mode):
    check_backend("reference", "cpu", dtype, shape, mode)


@needs_cpu_ext
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", [*SHAPES, (40, 4096), (9, 1111)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_backend(dtype, shape, mode):
    check_backend("cpu", "cpu", dtype, shape, mode)


@pytest.mark.parametrize(
    "backend",
    ["reference", pytest.param("cpu", marks=needs_cpu_ext), pytest.param("triton", marks=needs_triton)],
)
@pytest.mark.parametrize("mode", ["both", "none", "empty_cols"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_backends_write_into_given_outputs(request, backend, dtype, mode):
    if backend == "triton":
        request.getfixturevalue("triton_interpreted")
    check_backend(backend, "cpu", dtype, (33, 100), mode, into=True)


@needs_cpu_ext
@pytest.mark.parametrize("dtype", [torch.float64, torch.int8, torch.complex128, torch.bool])
def test_cpu_backend_other_element_sizes(dtype):
    gen = torch.Generator().manual_seed(1)
    w = (torch.randn(19, 70, generator=gen) * 50).to(dtype)
    rows = torch.randint(0, 19, (11,), generator=gen)
    cols = torch.randperm(70, generator=gen)[:40].sort().values
    for r, c in ((rows, cols), (rows, None), (None, cols)):
        torch.testing.assert_close(gs._BACKENDS["cpu"]([w], [r], [c])[0], reference(w, r, c), atol=0, rtol=0)


@needs_cpu_ext
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_backend_large_streamed(dtype):
    """Outputs of several MiB take the non-temporal store path; pruning-like and scattered column sets."""
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(1024, 4096, generator=gen).to(dtype)
    rows = torch.randperm(1024, generator=gen)[:768].sort().values
    sorted_cols = torch.randperm(4096, generator=gen)[:3072].sort().values
    scattered = torch.randperm(4096, generator=gen)[:3072]  # no 128-byte window fits: the scalar chunks
    for r, c in ((None, sorted_cols), (rows, None), (rows, sorted_cols), (None, scattered)):
        torch.testing.assert_close(gs._BACKENDS["cpu"]([w], [r], [c])[0], reference(w, r, c), atol=0, rtol=0)


@pytest.mark.parametrize(
    "backend",
    ["reference", pytest.param("cpu", marks=needs_cpu_ext), pytest.param("triton", marks=needs_triton)],
)
def test_strided_indices(request, backend):
    if backend == "triton":
        request.getfixturevalue("triton_interpreted")
    w = torch.randn(20, 30)
    rows, cols = (torch.arange(40) % 20)[::3], torch.arange(30, dtype=torch.int32)[1::2]
    assert not rows.is_contiguous() and not cols.is_contiguous()
    torch.testing.assert_close(gs._BACKENDS[backend]([w], [rows], [cols])[0], reference(w, rows, cols), atol=0, rtol=0)


@needs_triton
@pytest.mark.parametrize("mode", ["rows", "cols", "both", "none", "empty_rows", "repeat_unsorted"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_backend_interpreted(triton_interpreted, dtype, mode):
    check_backend("triton", "cpu", dtype, (37, 53), mode)


@needs_triton
def test_dispatch_uses_triton_when_interpreting(triton_interpreted):
    assert gs._pick_backend(torch.device("cpu")) == "triton"
    tensors, rows, cols = sample_inputs("cpu", torch.float32, (7, 13), "both")
    for o, t, r, c in zip(gather_slice(tensors, rows, cols), tensors, rows, cols, strict=True):
        torch.testing.assert_close(o, reference(t, r, c), atol=0, rtol=0)


@needs_gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", [*SHAPES, (40, 4096)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_backends(backend, dtype, shape, mode):
    if backend == "cuda" and not CUDA_BUILT:
        pytest.skip("CUDA module not built")
    check_backend(backend, "cuda", dtype, shape, mode)
    check_backend(backend, "cuda", dtype, shape, mode, into=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_public_gather_slice_layer_group(dtype):
    """One call cutting a layer: q/k/v rows (+ biases) and o columns, as surgery does."""
    gen = torch.Generator().manual_seed(3)
    hidden, head_dim = 48, 8
    q, k, v, o = (torch.randn(hidden, hidden, generator=gen).to(dtype) for _ in range(4))
    bq = torch.randn(hidden, generator=gen).to(dtype)
    keep = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in (0, 2, 5)])  # 3 of 6 heads
    out = gather_slice([q, k, v, bq, o], rows=[keep, keep, keep, keep, None], cols=[None, None, None, None, keep])
    for got, t, r, c in zip(out, [q, k, v, bq, o], [keep] * 4 + [None], [None] * 4 + [keep], strict=True):
        torch.testing.assert_close(got, reference(t, r, c), atol=0, rtol=0)
    assert gather_slice([]) == []
    full = gather_slice([q])[0]
    torch.testing.assert_close(full, q, atol=0, rtol=0)
    assert full.data_ptr() != q.data_ptr()
    given = [torch.empty_like(o) for o in out]
    assert gather_slice([q, k, v, bq, o], [keep] * 4 + [None], [None] * 4 + [keep], out=given) == given
    for got, expected in zip(given, out, strict=True):
        torch.testing.assert_close(got, expected, atol=0, rtol=0)


# ------------------------------------------------------------------------------ op registration, autograd


def test_opcheck():
    tensors, rows, cols = sample_inputs("cpu", torch.float32, (7, 13), "both")
    torch.library.opcheck(torch.ops.fastprune.gather_slice.default, (tensors, rows, cols))
    grads = [t.clone().requires_grad_() for t in tensors]
    torch.library.opcheck(torch.ops.fastprune.gather_slice.default, (grads, rows, cols))
    out = [torch.empty_like(reference(t, r, c)) for t, r, c in zip(tensors, rows, cols, strict=True)]
    torch.library.opcheck(torch.ops.fastprune.gather_slice_out.default, (tensors, rows, cols, out))


def test_gradients_scatter_add():
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(6, 9, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, generator=gen, requires_grad=True)
    rows = torch.tensor([4, 1, 1, 0])  # a repeated row: its gradients add up
    cols = torch.tensor([8, 2, 3], dtype=torch.int32)
    torch.autograd.gradcheck(lambda a, c: tuple(gather_slice([a, c], [rows, rows], [cols, None])), (w, b))


def test_compiles_with_fake_tensors():
    tensors, rows, cols = sample_inputs("cpu", torch.float32, (7, 13), "both")
    compiled = torch.compile(lambda t, r, c: gather_slice(t, r, c), fullgraph=True, backend="eager")
    for o, t, r, c in zip(compiled(tensors, rows, cols), tensors, rows, cols, strict=True):
        torch.testing.assert_close(o, reference(t, r, c), atol=0, rtol=0)
    given = [torch.empty_like(reference(t, r, c)) for t, r, c in zip(tensors, rows, cols, strict=True)]
    into = torch.compile(lambda t, r, c, o: gather_slice(t, r, c, out=o), fullgraph=True, backend="eager")
    into(tensors, rows, cols, given)
    for o, t, r, c in zip(given, tensors, rows, cols, strict=True):
        torch.testing.assert_close(o, reference(t, r, c), atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------- bad arguments


CPU_BACKENDS = ["reference", pytest.param("cpu", marks=needs_cpu_ext)]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("bad", [13, -1])
@pytest.mark.parametrize("dim", [0, 1])
def test_out_of_range_index_raises(backend, bad, dim):
    w = torch.randn(13, 13)
    idx = torch.tensor([0, bad, 2])
    rows, cols = (idx, None) if dim == 0 else (None, idx)
    with pytest.raises(IndexError, match="out of range"):
        gs._BACKENDS[backend]([w], [rows], [cols])


@needs_triton
@pytest.mark.parametrize("bad", [13, -1])
def test_triton_out_of_range_index_raises(triton_interpreted, bad):
    with pytest.raises(IndexError, match="out of range"):
        gs._BACKENDS["triton"]([torch.randn(13, 13)], [None], [torch.tensor([bad])])


@needs_gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_out_of_range_index_raises(backend):
    if backend == "cuda" and not CUDA_BUILT:
        pytest.skip("CUDA module not built")
    w = torch.randn(13, 13, device="cuda")
    with pytest.raises(IndexError, match="out of range"):
        gs._BACKENDS[backend]([w], [torch.tensor([0, 13], device="cuda")], [None])


@pytest.mark.parametrize(
    ("tensors", "rows", "cols", "match"),
    [
        ([torch.randn(2, 3, 4)], None, None, "1-D or 2-D"),
        ([torch.randn(5)], None, [torch.tensor([0])], "cannot take column indices"),
        ([torch.randn(5, 5)], [torch.tensor([0.0])], None, "int32 or int64"),
        ([torch.randn(5, 5)], [torch.tensor([[0]])], None, "must be 1-D"),
        ([torch.randn(5, 5)], [None, None], None, "one row and col entry per tensor"),
    ],
)
def test_bad_arguments_raise(tensors, rows, cols, match):
    with pytest.raises(RuntimeError, match=match):
        gather_slice(tensors, rows, cols)


def test_bad_outputs_raise():
    w, rows = torch.randn(6, 5), torch.tensor([0, 2])
    bad = [
        (torch.empty(3, 5), RuntimeError, "has shape"),
        (torch.empty(2, 5, dtype=torch.float16), RuntimeError, "another dtype"),
        (torch.empty(5, 2).t(), RuntimeError, "contiguous"),
        (w[:2], ValueError, "shares memory"),
    ]
    for out, error, match in bad:
        with pytest.raises(error, match=match):
            gather_slice([w], [rows], out=[out])
    with pytest.raises(RuntimeError, match="one output per tensor"):
        gather_slice([w], [rows], out=[])


@needs_cpu_ext
def test_cpu_kernel_rejects_bad_outputs():
    w, rows = torch.randn(6, 5), [torch.tensor([0, 2])]
    with pytest.raises(ValueError, match="expected"):
        torch.ops.fastprune_cpu.gather_slice_out([w], rows, [None], [torch.empty(3, 5)])
    with pytest.raises(TypeError, match="dtype"):
        torch.ops.fastprune_cpu.gather_slice_out([w], rows, [None], [torch.empty(2, 5, dtype=torch.int32)])
    with pytest.raises(RuntimeError, match="single memory location"):
        torch.ops.fastprune_cpu.gather_slice_out([w], rows, [None], [w[1:3]])


@needs_cpu_ext
@pytest.mark.parametrize(
    ("tensors", "rows", "cols", "error", "match"),
    [
        ([torch.randn(2, 3, 4)], [None], [None], ValueError, "1-D or 2-D"),
        ([torch.randn(5)], [None], [torch.tensor([0])], ValueError, "cannot take column indices"),
        ([torch.randn(5, 5)], [torch.tensor([0.0])], [None], TypeError, "int32 or int64"),
        ([torch.randn(5, 5)], [torch.tensor([[0]])], [None], ValueError, "must be 1-D"),
        ([torch.randn(5, 5)], [None, None], [None], ValueError, "one each per tensor"),
        ([torch.randn(5, 5)], [torch.tensor([1, 9])], [None], IndexError, "index 9 at position 1"),
    ],
)
def test_cpu_kernel_rejects_bad_arguments(tensors, rows, cols, error, match):
    with pytest.raises(error, match=match):
        torch.ops.fastprune_cpu.gather_slice(tensors, rows, cols)


@needs_cpu_ext
def test_cpu_kernel_checks_every_index_before_writing():
    """A bad index in the last tensor fails the whole call, before any output exists."""
    good = torch.randn(64, 64)
    with pytest.raises(IndexError, match="tensor 1"):
        torch.ops.fastprune_cpu.gather_slice([good, good], [None, torch.tensor([0, 64])], [torch.arange(32), None])


@pytest.mark.skipif(not CUDA_BUILT, reason="CUDA module not built (no nvcc at build time)")
@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the no-GPU error cannot happen")
def test_cuda_module_imports_and_says_no_gpu():
    module = importlib.import_module("fastprune._cuda_gather_slice")
    assert module.workspace_bytes(2) > module.workspace_bytes(1) > 0
    with pytest.raises(RuntimeError, match="no CUDA GPU is available"):
        module.gather_slice([[0] * 12], 0, 0, 0, 0)


def test_unknown_device_type_falls_back_to_reference():
    assert gs._pick_backend(torch.device("meta")) == "reference"
