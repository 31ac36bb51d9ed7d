// head_taylor: per-group sums of |w*g| (first-order Taylor) and (w*g)^2 (Fisher) over a weight and its gradient,
// grouped along rows (dim 0) or columns (dim 1), without materialising w*g.
//
// The work is split in two: a streaming pass computes per-unit sums (one per row for dim 0, one per column for
// dim 1) reading each input once, then a tiny serial pass adds units into groups. Products and short runs of
// additions are fp32 (the product of two 16-bit floats is exact in fp32); runs are flushed into fp64 so long rows
// and tall columns do not lose precision.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "simd.h"

namespace {

// Elements per fp32 run before flushing into fp64 (each of the 16 lanes adds kFlush / 16 values).
constexpr int64_t kFlush = 4096;
// Rows accumulated in fp32 per column before flushing into fp64.
constexpr int64_t kRowBlock = 128;
// Below this many elements per thread, threading costs more than it saves.
constexpr int64_t kMinWorkPerThread = 1 << 17;
// fp16 values converted to fp32 per tile (two tiles live on the stack).
constexpr int64_t kHalfTile = 512;

FP_INLINE f32x8 abs8(const f32x8& v) { return reinterpret_cast<f32x8>(reinterpret_cast<u32x8>(v) & 0x7FFFFFFFu); }

struct Sums {
  double abs = 0.0;
  double sq = 0.0;
};

// Sum of |w*g| and (w*g)^2 over n contiguous elements.
template <typename T>
FP_INLINE Sums row_sums(const T* __restrict w, const T* __restrict g, int64_t n) {
  Sums out;
  for (int64_t start = 0; start < n; start += kFlush) {
    const int64_t stop = std::min(n, start + kFlush);
    f32x8 a0 = {}, a1 = {}, s0 = {}, s1 = {};  // two chains each, to hide add latency
    int64_t j = start;
    for (; j + 16 <= stop; j += 16) {
      f32x8 w0, w1, g0, g1;
      load16(w + j, w0, w1);
      load16(g + j, g0, g1);
      const f32x8 p0 = w0 * g0;
      const f32x8 p1 = w1 * g1;
      a0 += abs8(p0);
      a1 += abs8(p1);
      s0 += p0 * p0;
      s1 += p1 * p1;
    }
    out.abs += hsum(a0 + a1);
    out.sq += hsum(s0 + s1);
    for (; j < stop; ++j) {
      const float p = static_cast<float>(w[j]) * static_cast<float>(g[j]);
      out.abs += std::fabs(p);
      out.sq += p * p;
    }
  }
  return out;
}

// fp16: the fp32 sums over tiles converted to fp32.
FP_INLINE Sums row_sums(const at::Half* __restrict w, const at::Half* __restrict g, int64_t n) {
  const HalfToFloat convert = half_to_float();
  alignas(64) float wf[kHalfTile], gf[kHalfTile];
  Sums out;
  for (int64_t start = 0; start < n; start += kHalfTile) {
    const int64_t len = std::min(kHalfTile, n - start);
    convert(w + start, wf, len);
    convert(g + start, gf, len);
    const Sums tile = row_sums(wf, gf, len);
    out.abs += tile.abs;
    out.sq += tile.sq;
  }
  return out;
}

// Adds |w*g| and (w*g)^2 of one row into per-column fp32 accumulators.
template <typename T>
FP_INLINE void add_row(const T* __restrict w, const T* __restrict g, int64_t n, float* __restrict a,
                       float* __restrict s) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const f32x8 p = load8(w + j) * load8(g + j);
    const f32x8 na = load8(a + j) + abs8(p);
    const f32x8 ns = load8(s + j) + p * p;
    std::memcpy(a + j, &na, sizeof(na));
    std::memcpy(s + j, &ns, sizeof(ns));
  }
  for (; j < n; ++j) {
    const float p = static_cast<float>(w[j]) * static_cast<float>(g[j]);
    a[j] += std::fabs(p);
    s[j] += p * p;
  }
}

// fp16: tiles converted to fp32 first.
FP_INLINE void add_row(const at::Half* __restrict w, const at::Half* __restrict g, int64_t n, float* __restrict a,
                       float* __restrict s) {
  const HalfToFloat convert = half_to_float();
  alignas(64) float wf[kHalfTile], gf[kHalfTile];
  for (int64_t start = 0; start < n; start += kHalfTile) {
    const int64_t len = std::min(kHalfTile, n - start);
    convert(w + start, wf, len);
    convert(g + start, gf, len);
    add_row(wf, gf, len, a + start, s + start);
  }
}

// A 2-D view with unit column stride: element (i, j) of w is w[i * w_stride + j].
template <typename T>
struct Matrix {
  const T* w;
  const T* g;
  int64_t rows;
  int64_t cols;
  int64_t w_stride;
  int64_t g_stride;
};

// Rows [begin, end): out_abs[i], out_sq[i] = sums over row i.
template <typename T>
FP_INLINE void sum_rows(const Matrix<T>& m, int64_t begin, int64_t end, double* out_abs, double* out_sq) {
  for (int64_t i = begin; i < end; ++i) {
    const Sums r = row_sums(m.w + i * m.w_stride, m.g + i * m.g_stride, m.cols);
    out_abs[i] = r.abs;
    out_sq[i] = r.sq;
  }
}

// Rows [begin, end) added into per-column fp32 accumulators fa, fs.
template <typename T>
FP_INLINE void add_rows(const Matrix<T>& m, int64_t begin, int64_t end, float* fa, float* fs) {
  for (int64_t i = begin; i < end; ++i) {
    add_row(m.w + i * m.w_stride, m.g + i * m.g_stride, m.cols, fa, fs);
  }
}

int64_t num_chunks(int64_t units, int64_t elements) {
  const int64_t by_work = std::max<int64_t>(1, elements / kMinWorkPerThread);
  return std::max<int64_t>(1, std::min<int64_t>({units, by_work, at::get_num_threads()}));
}

// out_abs[i], out_sq[i] = sums over row i.
template <typename T>
void unit_sums_rows(const Matrix<T>& m, double* out_abs, double* out_sq) {
  const int64_t grain = std::max<int64_t>(1, kMinWorkPerThread / std::max<int64_t>(1, m.cols));
  at::parallel_for(0, m.rows, grain,
                   [&](int64_t begin, int64_t end) { run_best<sum_rows<T>>(m, begin, end, out_abs, out_sq); });
}

// out_abs[j], out_sq[j] = sums over column j. Threads take row ranges with private accumulators.
template <typename T>
void unit_sums_cols(const Matrix<T>& m, double* out_abs, double* out_sq) {
  const int64_t chunks = num_chunks(m.rows, m.rows * m.cols);
  const int64_t c = m.cols;
  std::vector<double> partial(static_cast<size_t>(chunks * 2 * c), 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    std::vector<float> acc(static_cast<size_t>(2 * c));
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      double* da = partial.data() + chunk * 2 * c;
      double* ds = da + c;
      const int64_t row_begin = m.rows * chunk / chunks;
      const int64_t row_end = m.rows * (chunk + 1) / chunks;
      for (int64_t r0 = row_begin; r0 < row_end; r0 += kRowBlock) {
        std::fill(acc.begin(), acc.end(), 0.0f);
        run_best<add_rows<T>>(m, r0, std::min(row_end, r0 + kRowBlock), acc.data(), acc.data() + c);
        for (int64_t j = 0; j < c; ++j) {
          da[j] += acc[j];
          ds[j] += acc[c + j];
        }
      }
    }
  });
  for (int64_t j = 0; j < c; ++j) {
    double a = 0.0, s = 0.0;
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      a += partial[chunk * 2 * c + j];
      s += partial[chunk * 2 * c + c + j];
    }
    out_abs[j] = a;
    out_sq[j] = s;
  }
}

// Per-unit sums (rows for dim 0, columns for dim 1) of a 2-D tensor pair with unit column stride.
template <typename T>
void unit_sums(const at::Tensor& w, const at::Tensor& g, int64_t dim, double* out_abs, double* out_sq) {
  const Matrix<T> m{w.const_data_ptr<T>(), g.const_data_ptr<T>(), w.size(0), w.size(1), w.stride(0), g.stride(0)};
  if (dim == 0) {
    unit_sums_rows(m, out_abs, out_sq);
  } else {
    unit_sums_cols(m, out_abs, out_sq);
  }
}

bool unit_col_stride(const at::Tensor& t) { return t.size(1) <= 1 || t.stride(1) == 1; }

bool unit_row_stride(const at::Tensor& t) { return t.size(0) <= 1 || t.stride(0) == 1; }

void check_args(const at::Tensor& weight, const at::Tensor& grad, int64_t dim, int64_t group_size) {
  TORCH_CHECK(weight.device().is_cpu() && grad.device().is_cpu(), "head_taylor: weight and grad must be CPU tensors");
  TORCH_CHECK(weight.scalar_type() == grad.scalar_type(), "head_taylor: weight and grad must have the same dtype, got ",
              weight.scalar_type(), " and ", grad.scalar_type());
  TORCH_CHECK(weight.sizes() == grad.sizes(), "head_taylor: weight and grad must have the same shape, got ",
              weight.sizes(), " and ", grad.sizes());
  const auto dt = weight.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
              "head_taylor: dtype must be float32, bfloat16 or float16, got ", dt);
  TORCH_CHECK(weight.dim() == 1 || weight.dim() == 2, "head_taylor: weight must be 1-D or 2-D, got ", weight.dim(),
              "-D");
  TORCH_CHECK(dim == 0 || (dim == 1 && weight.dim() == 2), "head_taylor: dim must be 0",
              weight.dim() == 2 ? " or 1" : " for a 1-D tensor", ", got ", dim);
  TORCH_CHECK(group_size >= 1, "head_taylor: group_size must be >= 1, got ", group_size);
  TORCH_CHECK(weight.size(dim) % group_size == 0, "head_taylor: size ", weight.size(dim), " along dim ", dim,
              " is not divisible by group_size ", group_size);
}

// Per-group sums as a [2, n_groups] float64 tensor.
at::Tensor group_sums(const at::Tensor& weight_in, const at::Tensor& grad_in, int64_t dim, int64_t group_size) {
  check_args(weight_in, grad_in, dim, group_size);
  const int64_t n_groups = weight_in.size(dim) / group_size;
  at::Tensor w = weight_in;
  at::Tensor g = grad_in;
  if (w.dim() == 1) {  // a bias: its elements are the columns of a single row
    w = w.unsqueeze(0);
    g = g.unsqueeze(0);
    dim = 1;
  }
  if (!(unit_col_stride(w) && unit_col_stride(g))) {
    if (unit_row_stride(w) && unit_row_stride(g)) {  // transposed storage: walk it as stored
      w = w.t();
      g = g.t();
      dim = 1 - dim;
    } else {
      w = w.contiguous();
      g = g.contiguous();
    }
  }
  const int64_t units = w.size(dim);
  std::vector<double> unit_abs(static_cast<size_t>(units)), unit_sq(static_cast<size_t>(units));
  switch (w.scalar_type()) {
    case at::kFloat:
      unit_sums<float>(w, g, dim, unit_abs.data(), unit_sq.data());
      break;
    case at::kBFloat16:
      unit_sums<at::BFloat16>(w, g, dim, unit_abs.data(), unit_sq.data());
      break;
    default:  // kHalf; check_args rejected everything else
      unit_sums<at::Half>(w, g, dim, unit_abs.data(), unit_sq.data());
  }
  at::Tensor out = at::zeros({2, n_groups}, at::TensorOptions().dtype(at::kDouble));
  double* o = out.data_ptr<double>();
  for (int64_t u = 0; u < units; ++u) {
    o[u / group_size] += unit_abs[u];
    o[n_groups + u / group_size] += unit_sq[u];
  }
  return out;
}

void head_taylor_accumulate_(at::Tensor& scores, const at::Tensor& weight, const at::Tensor& grad, int64_t dim,
                             int64_t group_size) {
  TORCH_CHECK(scores.device().is_cpu() && scores.scalar_type() == at::kFloat,
              "head_taylor_accumulate_: scores must be a float32 CPU tensor, got ", scores.scalar_type());
  TORCH_CHECK(weight.dim() >= 1 && dim >= 0 && dim < weight.dim(), "head_taylor_accumulate_: dim ", dim,
              " out of range for a ", weight.dim(), "-D weight");
  TORCH_CHECK(group_size >= 1, "head_taylor_accumulate_: group_size must be >= 1, got ", group_size);
  const int64_t n_groups = weight.size(dim) / group_size;
  TORCH_CHECK(scores.dim() == 2 && scores.size(0) == 2 && scores.size(1) == n_groups,
              "head_taylor_accumulate_: scores must have shape [2, ", n_groups, "], got ", scores.sizes());
  scores.add_(group_sums(weight, grad, dim, group_size));  // fp64 sum, rounded once into fp32
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {}

TORCH_LIBRARY_FRAGMENT(fastprune_cpu, m) {
  m.def("head_taylor_accumulate_(Tensor(a!) scores, Tensor weight, Tensor grad, int dim, int group_size) -> ()");
}

TORCH_LIBRARY_IMPL(fastprune_cpu, CPU, m) {
  m.impl("head_taylor_accumulate_", &head_taylor_accumulate_);
}
