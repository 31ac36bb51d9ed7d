// block_influence on CUDA: sum over tokens of cos(x_t, y_t) for x, y viewed as [tokens, D] (unit hidden stride,
// any token stride), each read once. One warp per token (grid-stride): lanes stride along the hidden dim
// (coalesced) accumulating the dot product and both squared norms in fp32, a warp shuffle reduces them, lane 0
// adds the token's cosine (fp64) to its running sum, and each block adds its sum into the fp64 output with one
// atomic. The cosine follows F.cosine_similarity: dot / (max(|x|, eps) * max(|y|, eps)), eps = 1e-8.
// Not tuned on a GPU (none was available when written): benchmarks/bench_block_influence.py times it.

#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>

#include "common.cuh"

namespace py = pybind11;

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kMaxBlocks = 8192;  // grid-stride beyond this: enough warps in flight for any GPU
constexpr double kEps = 1e-8;

constexpr CudaCheck check_cuda{"fastprune block_influence"};

template <typename T>
__global__ void cosine_sum_kernel(const T* __restrict__ x, const T* __restrict__ y, double* __restrict__ out,
                                  int64_t tokens, int64_t d, int64_t x_stride, int64_t y_stride) {
  __shared__ double block_sums[kWarps];
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  double sum = 0.0;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * kWarps + warp; t < tokens;
       t += static_cast<int64_t>(gridDim.x) * kWarps) {
    const T* xt = x + t * x_stride;
    const T* yt = y + t * y_stride;
    float dot = 0.0f, xx = 0.0f, yy = 0.0f;
    for (int64_t j = lane; j < d; j += 32) {
      const float xv = to_f32(xt[j]);
      const float yv = to_f32(yt[j]);
      dot += xv * yv;
      xx += xv * xv;
      yy += yv * yv;
    }
    for (int offset = 16; offset > 0; offset /= 2) {
      dot += __shfl_down_sync(0xffffffffu, dot, offset);
      xx += __shfl_down_sync(0xffffffffu, xx, offset);
      yy += __shfl_down_sync(0xffffffffu, yy, offset);
    }
    if (lane == 0) sum += dot / (fmax(sqrt(static_cast<double>(xx)), kEps) * fmax(sqrt(static_cast<double>(yy)), kEps));
  }
  if (lane == 0) block_sums[warp] = sum;
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0.0;
    for (int k = 0; k < kWarps; ++k) total += block_sums[k];
    atomicAdd(out, total);
  }
}

template <typename T>
void launch(uintptr_t out, uintptr_t x, uintptr_t y, int64_t tokens, int64_t d, int64_t x_stride,
            int64_t y_stride, cudaStream_t stream) {
  const auto blocks = static_cast<unsigned>(std::min<int64_t>((tokens + kWarps - 1) / kWarps, kMaxBlocks));
  cosine_sum_kernel<T><<<blocks, kThreads, 0, stream>>>(reinterpret_cast<const T*>(x), reinterpret_cast<const T*>(y),
                                                        reinterpret_cast<double*>(out), tokens, d, x_stride,
                                                        y_stride);
  check_cuda(cudaGetLastError(), "launching the kernel");
}

// out: one float64 the sum is added to; x, y: [tokens, d] with unit hidden stride and token strides x_stride,
// y_stride (in elements); dtype: 0 float32, 1 bfloat16, 2 float16.
void cosine_sum(uintptr_t out, uintptr_t x, uintptr_t y, int64_t tokens, int64_t d, int64_t x_stride,
                int64_t y_stride, int dtype, int device, uintptr_t stream_handle) {
  require_gpu();
  if (dtype < 0 || dtype > 2) throw std::invalid_argument("fastprune block_influence: unknown dtype code");
  if (tokens < 0 || d < 0) throw std::invalid_argument("fastprune block_influence: negative size");
  if (x_stride < 0 || y_stride < 0) throw std::invalid_argument("fastprune block_influence: negative token stride");
  if (out == 0) throw std::invalid_argument("fastprune block_influence: null output pointer");
  if (tokens == 0 || d == 0) return;  // every cosine is 0
  if (x == 0 || y == 0) throw std::invalid_argument("fastprune block_influence: null input pointer");
  const DeviceGuard guard(device, check_cuda);
  const cudaStream_t stream = as_stream(stream_handle);
  switch (dtype) {
    case 0:
      launch<float>(out, x, y, tokens, d, x_stride, y_stride, stream);
      break;
    case 1:
      launch<__nv_bfloat16>(out, x, y, tokens, d, x_stride, y_stride, stream);
      break;
    default:
      launch<__half>(out, x, y, tokens, d, x_stride, y_stride, stream);
  }
}

}  // namespace

PYBIND11_MODULE(FASTPRUNE_MODULE_NAME, m) {
  m.doc() = "fastprune block_influence CUDA kernel (raw device pointers; see fastprune/ops/block_influence.py)";
  m.def("cosine_sum", &cosine_sum, py::arg("out"), py::arg("x"), py::arg("y"), py::arg("tokens"), py::arg("d"),
        py::arg("x_stride"), py::arg("y_stride"), py::arg("dtype"), py::arg("device"), py::arg("stream"),
        "Add the sum over tokens of cos(x_t, y_t) into the float64 at out.");
}
