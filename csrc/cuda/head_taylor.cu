// head_taylor on CUDA: per-unit sums of |w*g| and (w*g)^2 (one unit per row for dim 0, per column for dim 1),
// never materialising w*g. The Python side passes raw pointers to a 2-D weight/grad pair with unit column stride
// and a zeroed float64 [2, units] output, and adds units into groups afterwards.
//
// dim 0: one block per row (grid-stride), threads stride along the row (coalesced), a block reduction writes
// the row's two sums. dim 1: one thread per column over a chunk of rows (a warp reads consecutive columns),
// and the chunk's fp32 sums are added into the fp64 output with atomics (few chunks per column: low contention).
// Products and per-thread runs are fp32 (exact products for 16-bit inputs); everything that crosses threads is
// fp64. Not tuned on a GPU (none was available when written): benchmarks/bench_head_taylor.py times it.

#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>

#include "common.cuh"

namespace py = pybind11;

namespace {

constexpr int kThreads = 256;
constexpr int kMaxRowBlocks = 65535;
constexpr int64_t kMinRowsPerChunk = 128;  // rows per column-sum block (more when the grid would be too tall)
constexpr int64_t kMaxGridY = 65535;

constexpr CudaCheck check_cuda{"fastprune head_taylor"};

// Sums a and s over the block; the result is valid in thread 0.
__device__ __forceinline__ void block_sum2(float& a, float& s) {
  __shared__ float shared[2][kThreads / 32];
  for (int offset = 16; offset > 0; offset /= 2) {
    a += __shfl_down_sync(0xffffffffu, a, offset);
    s += __shfl_down_sync(0xffffffffu, s, offset);
  }
  const int warp = threadIdx.x / 32;
  if (threadIdx.x % 32 == 0) {
    shared[0][warp] = a;
    shared[1][warp] = s;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    a = 0.0f;
    s = 0.0f;
    for (int k = 0; k < kThreads / 32; ++k) {
      a += shared[0][k];
      s += shared[1][k];
    }
  }
  __syncthreads();  // shared is reused by the next row
}

template <typename T>
__global__ void row_sums_kernel(const T* __restrict__ w, const T* __restrict__ g, double* __restrict__ out,
                                int64_t rows, int64_t cols, int64_t w_stride, int64_t g_stride) {
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* wr = w + r * w_stride;
    const T* gr = g + r * g_stride;
    float a = 0.0f, s = 0.0f;
    for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
      const float p = to_f32(wr[j]) * to_f32(gr[j]);
      a += fabsf(p);
      s += p * p;
    }
    block_sum2(a, s);
    if (threadIdx.x == 0) {
      out[r] = a;
      out[rows + r] = s;
    }
  }
}

template <typename T>
__global__ void col_sums_kernel(const T* __restrict__ w, const T* __restrict__ g, double* __restrict__ out,
                                int64_t rows, int64_t cols, int64_t w_stride, int64_t g_stride,
                                int64_t rows_per_chunk) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= cols) return;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * rows_per_chunk;
  const int64_t r1 = r0 + rows_per_chunk < rows ? r0 + rows_per_chunk : rows;
  float a = 0.0f, s = 0.0f;
  for (int64_t r = r0; r < r1; ++r) {
    const float p = to_f32(w[r * w_stride + c]) * to_f32(g[r * g_stride + c]);
    a += fabsf(p);
    s += p * p;
  }
  atomicAdd(out + c, static_cast<double>(a));
  atomicAdd(out + cols + c, static_cast<double>(s));
}

template <typename T>
void launch(uintptr_t out, uintptr_t w, uintptr_t g, int64_t rows, int64_t cols, int64_t w_stride,
            int64_t g_stride, int dim, cudaStream_t stream) {
  auto* o = reinterpret_cast<double*>(out);
  const auto* wp = reinterpret_cast<const T*>(w);
  const auto* gp = reinterpret_cast<const T*>(g);
  if (dim == 0) {
    const auto blocks = static_cast<unsigned>(std::min<int64_t>(rows, kMaxRowBlocks));
    row_sums_kernel<T><<<blocks, kThreads, 0, stream>>>(wp, gp, o, rows, cols, w_stride, g_stride);
  } else {
    const int64_t rows_per_chunk = std::max(kMinRowsPerChunk, (rows + kMaxGridY - 1) / kMaxGridY);
    const dim3 grid(static_cast<unsigned>((cols + kThreads - 1) / kThreads),
                    static_cast<unsigned>((rows + rows_per_chunk - 1) / rows_per_chunk));
    col_sums_kernel<T><<<grid, kThreads, 0, stream>>>(wp, gp, o, rows, cols, w_stride, g_stride, rows_per_chunk);
  }
  check_cuda(cudaGetLastError(), "launching the kernel");
}

// out: zeroed float64 [2, units] with out_numel elements (units = rows for dim 0, cols for dim 1); w, g: 2-D with
// unit column stride and row strides w_stride, g_stride (in elements); dtype: 0 float32, 1 bfloat16, 2 float16.
void unit_sums(uintptr_t out, int64_t out_numel, uintptr_t w, uintptr_t g, int64_t rows, int64_t cols,
               int64_t w_stride, int64_t g_stride, int dim, int dtype, int device, uintptr_t stream_handle) {
  require_gpu();
  if (dim != 0 && dim != 1) throw std::invalid_argument("fastprune head_taylor: dim must be 0 or 1");
  if (dtype < 0 || dtype > 2) throw std::invalid_argument("fastprune head_taylor: unknown dtype code");
  if (rows < 0 || cols < 0) throw std::invalid_argument("fastprune head_taylor: negative size");
  if (out_numel != 2 * (dim == 0 ? rows : cols))
    throw std::invalid_argument("fastprune head_taylor: output must hold 2 x (rows for dim 0, cols for dim 1)");
  if (w_stride < 0 || g_stride < 0) throw std::invalid_argument("fastprune head_taylor: negative row stride");
  if (rows == 0 || cols == 0) return;
  if (out == 0 || w == 0 || g == 0) throw std::invalid_argument("fastprune head_taylor: null pointer");
  const DeviceGuard guard(device, check_cuda);
  const cudaStream_t stream = as_stream(stream_handle);
  switch (dtype) {
    case 0:
      launch<float>(out, w, g, rows, cols, w_stride, g_stride, dim, stream);
      break;
    case 1:
      launch<__nv_bfloat16>(out, w, g, rows, cols, w_stride, g_stride, dim, stream);
      break;
    default:
      launch<__half>(out, w, g, rows, cols, w_stride, g_stride, dim, stream);
  }
}

}  // namespace

PYBIND11_MODULE(FASTPRUNE_MODULE_NAME, m) {
  m.doc() = "fastprune head_taylor CUDA kernel (raw device pointers; see fastprune/ops/head_taylor.py)";
  m.def("unit_sums", &unit_sums, py::arg("out"), py::arg("out_numel"), py::arg("w"), py::arg("g"), py::arg("rows"),
        py::arg("cols"), py::arg("w_stride"), py::arg("g_stride"), py::arg("dim"), py::arg("dtype"),
        py::arg("device"), py::arg("stream"),
        "Add per-row (dim 0) or per-column (dim 1) sums of |w*g| and (w*g)^2 into a zeroed float64 [2, units].");
}
