// block_influence: streaming sum over tokens of cos(x_t, y_t) between a layer's input and output hidden states
// (shape [..., D]), reading each tensor once and making no normalised copies.
//
// Per token the dot product and both squared norms are accumulated together in fp32 lanes (flushed into fp64
// every kFlush elements); the cosine itself and the running sum are fp64. The cosine follows
// F.cosine_similarity's rule: dot / (max(|x|, eps) * max(|y|, eps)) with eps = 1e-8, so a token whose x or y is
// all zeros contributes exactly 0.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "simd.h"

namespace {

constexpr double kEps = 1e-8;  // F.cosine_similarity's default eps
// Elements per fp32 run before flushing into fp64 (each of the 16 lanes adds kFlush / 16 values).
constexpr int64_t kFlush = 4096;
// Below this many elements per thread, threading costs more than it saves.
constexpr int64_t kMinWorkPerThread = 1 << 17;
// fp16 values converted to fp32 per tile (two tiles live on the stack).
constexpr int64_t kHalfTile = 512;
// Leading (token) dimensions handled after coalescing.
constexpr int kMaxTokenDims = 8;

// Dot product and squared norms of one token.
struct Dots {
  double xy = 0.0;
  double xx = 0.0;
  double yy = 0.0;
};

// Dots over n contiguous elements.
template <typename T>
FP_INLINE Dots token_dots(const T* __restrict x, const T* __restrict y, int64_t n) {
  Dots out;
  for (int64_t start = 0; start < n; start += kFlush) {
    const int64_t stop = std::min(n, start + kFlush);
    f32x8 d0 = {}, d1 = {}, a0 = {}, a1 = {}, b0 = {}, b1 = {};  // two chains each, to hide add latency
    int64_t j = start;
    for (; j + 16 <= stop; j += 16) {
      f32x8 x0, x1, y0, y1;
      load16(x + j, x0, x1);
      load16(y + j, y0, y1);
      d0 += x0 * y0;
      d1 += x1 * y1;
      a0 += x0 * x0;
      a1 += x1 * x1;
      b0 += y0 * y0;
      b1 += y1 * y1;
    }
    out.xy += hsum(d0 + d1);
    out.xx += hsum(a0 + a1);
    out.yy += hsum(b0 + b1);
    for (; j < stop; ++j) {
      const float xv = static_cast<float>(x[j]);
      const float yv = static_cast<float>(y[j]);
      out.xy += xv * yv;
      out.xx += xv * xv;
      out.yy += yv * yv;
    }
  }
  return out;
}

// fp16: the fp32 sums over tiles converted to fp32.
FP_INLINE Dots token_dots(const at::Half* __restrict x, const at::Half* __restrict y, int64_t n) {
  const HalfToFloat convert = half_to_float();
  alignas(64) float xf[kHalfTile], yf[kHalfTile];
  Dots out;
  for (int64_t start = 0; start < n; start += kHalfTile) {
    const int64_t len = std::min(kHalfTile, n - start);
    convert(x + start, xf, len);
    convert(y + start, yf, len);
    const Dots tile = token_dots(xf, yf, len);
    out.xy += tile.xy;
    out.xx += tile.xx;
    out.yy += tile.yy;
  }
  return out;
}

// cos(x, y) over n contiguous elements, with F.cosine_similarity's eps rule.
template <typename T>
FP_INLINE double token_cosine(const T* __restrict x, const T* __restrict y, int64_t n) {
  const Dots d = token_dots(x, y, n);
  return d.xy / (std::max(std::sqrt(d.xx), kEps) * std::max(std::sqrt(d.yy), kEps));
}

// Where token n starts in x and y: leading dims with their own strides, walked like an odometer.
struct TokenLayout {
  int ndim = 0;
  int64_t sizes[kMaxTokenDims] = {};
  int64_t x_strides[kMaxTokenDims] = {};
  int64_t y_strides[kMaxTokenDims] = {};
};

// Sum of cosines of tokens [begin, end).
template <typename T>
FP_INLINE double range_sum(const T* x, const T* y, int64_t d, const TokenLayout& layout, int64_t begin,
                           int64_t end) {
  int64_t index[kMaxTokenDims] = {};
  int64_t x_off = 0, y_off = 0;
  int64_t rest = begin;
  for (int k = layout.ndim - 1; k >= 0; --k) {
    index[k] = rest % layout.sizes[k];
    rest /= layout.sizes[k];
    x_off += index[k] * layout.x_strides[k];
    y_off += index[k] * layout.y_strides[k];
  }
  double sum = 0.0;
  for (int64_t t = begin; t < end; ++t) {
    sum += token_cosine(x + x_off, y + y_off, d);
    for (int k = layout.ndim - 1; k >= 0; --k) {  // advance to the next token
      x_off += layout.x_strides[k];
      y_off += layout.y_strides[k];
      if (++index[k] < layout.sizes[k]) break;
      x_off -= layout.sizes[k] * layout.x_strides[k];
      y_off -= layout.sizes[k] * layout.y_strides[k];
      index[k] = 0;
    }
  }
  return sum;
}

// Leading dims of x and y (same sizes), size-1 dims dropped and neighbours merged where both layouts allow.
TokenLayout token_layout(const at::Tensor& x, const at::Tensor& y) {
  std::vector<int64_t> sizes, xs, ys;
  for (int64_t k = 0; k + 1 < x.dim(); ++k) {
    if (x.size(k) == 1) continue;
    if (!sizes.empty() && xs.back() == x.stride(k) * x.size(k) && ys.back() == y.stride(k) * y.size(k)) {
      sizes.back() *= x.size(k);
      xs.back() = x.stride(k);
      ys.back() = y.stride(k);
      continue;
    }
    sizes.push_back(x.size(k));
    xs.push_back(x.stride(k));
    ys.push_back(y.stride(k));
  }
  TORCH_CHECK(sizes.size() <= static_cast<size_t>(kMaxTokenDims), "block_influence: at most ", kMaxTokenDims,
              " non-mergeable leading dims are supported, got ", sizes.size());
  TokenLayout layout;
  layout.ndim = static_cast<int>(sizes.size());
  for (int k = 0; k < layout.ndim; ++k) {
    layout.sizes[k] = sizes[k];
    layout.x_strides[k] = xs[k];
    layout.y_strides[k] = ys[k];
  }
  return layout;
}

// Sum of cos(x_t, y_t) over all tokens, split over threads in fixed chunks.
template <typename T>
double cosine_sum(const at::Tensor& x, const at::Tensor& y, int64_t tokens, const TokenLayout& layout) {
  const int64_t d = x.size(-1);
  const int64_t chunks =
      std::max<int64_t>(1, std::min<int64_t>({tokens, tokens * d / kMinWorkPerThread, at::get_num_threads()}));
  const T* xp = x.const_data_ptr<T>();
  const T* yp = y.const_data_ptr<T>();
  std::vector<double> partial(static_cast<size_t>(chunks), 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    for (int64_t c = chunk_begin; c < chunk_end; ++c) {
      partial[c] = run_best<range_sum<T>>(xp, yp, d, layout, tokens * c / chunks, tokens * (c + 1) / chunks);
    }
  });
  double sum = 0.0;
  for (double p : partial) sum += p;  // in chunk order: the result does not depend on thread timing
  return sum;
}

void check_args(const at::Tensor& x, const at::Tensor& y) {
  TORCH_CHECK(x.device().is_cpu() && y.device().is_cpu(), "block_influence: x and y must be CPU tensors");
  TORCH_CHECK(x.scalar_type() == y.scalar_type(), "block_influence: x and y must have the same dtype, got ",
              x.scalar_type(), " and ", y.scalar_type());
  TORCH_CHECK(x.sizes() == y.sizes(), "block_influence: x and y must have the same shape, got ", x.sizes(), " and ",
              y.sizes());
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
              "block_influence: dtype must be float32, bfloat16 or float16, got ", dt);
  TORCH_CHECK(x.dim() >= 1, "block_influence: x and y need a hidden dimension (at least 1-D)");
}

// (sum over tokens of cos(x_t, y_t), number of tokens) as a float64 [2] tensor.
at::Tensor block_influence(const at::Tensor& x_in, const at::Tensor& y_in) {
  check_args(x_in, y_in);
  const int64_t d = x_in.size(-1);
  int64_t tokens = 1;
  for (int64_t k = 0; k + 1 < x_in.dim(); ++k) tokens *= x_in.size(k);
  // The hidden dim is walked with unit stride; anything else is copied once.
  const at::Tensor x = (d <= 1 || x_in.stride(-1) == 1) ? x_in : x_in.contiguous();
  const at::Tensor y = (d <= 1 || y_in.stride(-1) == 1) ? y_in : y_in.contiguous();
  double sum = 0.0;
  if (d > 0 && tokens > 0) {
    const TokenLayout layout = token_layout(x, y);
    switch (x.scalar_type()) {
      case at::kFloat:
        sum = cosine_sum<float>(x, y, tokens, layout);
        break;
      case at::kBFloat16:
        sum = cosine_sum<at::BFloat16>(x, y, tokens, layout);
        break;
      default:  // kHalf; check_args rejected everything else
        sum = cosine_sum<at::Half>(x, y, tokens, layout);
    }
  }
  at::Tensor out = at::empty({2}, at::TensorOptions().dtype(at::kDouble));
  out.data_ptr<double>()[0] = sum;
  out.data_ptr<double>()[1] = static_cast<double>(tokens);
  return out;
}

void block_influence_accumulate_(at::Tensor& accum, const at::Tensor& x, const at::Tensor& y) {
  TORCH_CHECK(accum.device().is_cpu() && accum.scalar_type() == at::kDouble && accum.dim() == 1 &&
                  accum.size(0) == 2,
              "block_influence_accumulate_: accum must be a float64 CPU tensor of shape [2], got ",
              accum.scalar_type(), " ", accum.sizes());
  accum.add_(block_influence(x, y));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {}

TORCH_LIBRARY_FRAGMENT(fastprune_cpu, m) {
  m.def("block_influence_accumulate_(Tensor(a!) accum, Tensor x, Tensor y) -> ()");
}

TORCH_LIBRARY_IMPL(fastprune_cpu, CPU, m) {
  m.impl("block_influence_accumulate_", &block_influence_accumulate_);
}
