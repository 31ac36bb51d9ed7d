// 2:4 semi-structured sparsity on CUDA: mask, compress, decompress and a GEMV for decode (few tokens).
//
// Same layout and selection rule as csrc/cpu/sparse24.cpp (see the comment at its top): values [out, in/2],
// meta [out, ceil(in/8)] uint8 with one nibble per group (bits 0-1 first kept position, bits 2-3 second),
// group 2b in the low nibble of byte b; keep the 2 largest scores, NaN first, ties to the lower position.
//
// Bound with pybind11 over raw device pointers (uintptr_t), element counts, dtype codes (0 float32,
// 1 bfloat16, 2 float16) and a cudaStream_t passed as uintptr_t. Every function checks the element counts
// against the shape before launching, so a wrong buffer is an error, never an out-of-bounds write.

#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "common.cuh"

namespace {

constexpr int kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2;
constexpr int kMaxTokens = 8;        // GEMV handles up to this many tokens per launch
constexpr int kRowsPerBlock = 8;     // one warp per output row
constexpr int kGroupsPerLane = 4;    // loads issued per lane before use, to keep enough bytes in flight

constexpr CudaCheck check_cuda{"fastprune sparse24 CUDA"};

void require(bool ok, const std::string& msg) {
  if (!ok) throw std::invalid_argument("sparse24 CUDA: " + msg);
}

int64_t elem_size(int code) {
  require(code == kFloat32 || code == kBFloat16 || code == kFloat16,
          "dtype code must be 0 (float32), 1 (bfloat16) or 2 (float16), got " + std::to_string(code));
  return code == kFloat32 ? 4 : 2;
}

__host__ __device__ inline int64_t meta_cols(int64_t cols) { return (cols / 4 + 1) / 2; }

void check_shape(int64_t rows, int64_t cols) {
  require(rows >= 0 && cols >= 0, "negative shape");
  require(cols % 4 == 0, "in_features (" + std::to_string(cols) + ") must be divisible by 4 for 2:4 groups");
  require(rows < (int64_t{1} << 31) / kRowsPerBlock, "too many rows");
}

void check_numel(const char* name, int64_t numel, int64_t expected) {
  require(numel == expected, std::string(name) + " has " + std::to_string(numel) + " elements, expected " +
                                 std::to_string(expected));
}

__device__ __forceinline__ float load_float(const void* p, int code, int64_t i) {
  if (code == kFloat32) return static_cast<const float*>(p)[i];
  if (code == kBFloat16) return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
  return __half2float(static_cast<const __half*>(p)[i]);
}

__device__ __forceinline__ void copy_elem(void* dst, int64_t di, const void* src, int64_t si, int64_t esize) {
  if (esize == 4)
    static_cast<uint32_t*>(dst)[di] = static_cast<const uint32_t*>(src)[si];
  else
    static_cast<uint16_t*>(dst)[di] = static_cast<const uint16_t*>(src)[si];
}

// True when score a (position ia) ranks above b (position ib): NaN first, then larger, then lower position.
__device__ __forceinline__ bool ranks_above(float a, int ia, float b, int ib) {
  const bool an = isnan(a), bn = isnan(b);
  if (an || bn) return an && (!bn || ia < ib);
  return a > b || (a == b && ia < ib);
}

__device__ __forceinline__ uint8_t select_group(const float* s) {
  int kept[2] = {0, 0}, n = 0;
  for (int i = 0; i < 4; ++i) {
    int above = 0;
    for (int j = 0; j < 4; ++j) above += (j != i) && ranks_above(s[j], j, s[i], i);
    if (above < 2) kept[n++] = i;
  }
  return static_cast<uint8_t>(kept[0] | (kept[1] << 2));
}

// One thread per metadata byte (two groups): writes the mask and/or the values and metadata.
__global__ void select_kernel(const void* w, int wcode, const void* score, int scode, const float* act, bool* mask,
                              void* values, uint8_t* meta, int64_t rows, int64_t cols) {
  const int64_t mcols = meta_cols(cols), groups = cols / 4;
  const int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (idx >= rows * mcols) return;
  const int64_t r = idx / mcols, b = idx % mcols;
  const int64_t esize = wcode == kFloat32 ? 4 : 2;
  uint8_t byte = 0;
  for (int h = 0; h < 2; ++h) {
    const int64_t g = 2 * b + h;
    if (g >= groups) break;
    float s[4];
    for (int i = 0; i < 4; ++i) {
      const int64_t k = r * cols + 4 * g + i;
      s[i] = score ? load_float(score, scode, k) : fabsf(load_float(w, wcode, k));
      if (act) s[i] *= act[4 * g + i];
    }
    const uint8_t nib = select_group(s);
    byte |= nib << (4 * h);
    if (mask)
      for (int i = 0; i < 4; ++i) mask[r * cols + 4 * g + i] = (i == (nib & 3)) || (i == (nib >> 2));
    if (values) {
      copy_elem(values, r * (cols / 2) + 2 * g, w, r * cols + 4 * g + (nib & 3), esize);
      copy_elem(values, r * (cols / 2) + 2 * g + 1, w, r * cols + 4 * g + (nib >> 2), esize);
    }
  }
  if (meta) meta[idx] = byte;
}

// One thread per metadata byte: the two groups' 8 dense outputs, zeros where pruned.
__global__ void decompress_kernel(const void* values, const uint8_t* meta, void* dense, int64_t rows, int64_t cols,
                                  int64_t esize) {
  const int64_t mcols = meta_cols(cols), groups = cols / 4;
  const int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (idx >= rows * mcols) return;
  const int64_t r = idx / mcols, b = idx % mcols;
  const uint8_t byte = meta[idx];
  for (int h = 0; h < 2; ++h) {
    const int64_t g = 2 * b + h;
    if (g >= groups) break;
    const uint8_t nib = (byte >> (4 * h)) & 0xF;
    const int64_t base = r * cols + 4 * g;
    for (int i = 0; i < 4; ++i) {
      if (esize == 4)
        static_cast<uint32_t*>(dense)[base + i] = 0;
      else
        static_cast<uint16_t*>(dense)[base + i] = 0;
    }
    copy_elem(dense, base + (nib & 3), values, r * (cols / 2) + 2 * g, esize);
    copy_elem(dense, base + (nib >> 2), values, r * (cols / 2) + 2 * g + 1, esize);
  }
}

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half(v); }

// y[t, r] = sum over row r's kept values of value * x[t, position] (+ bias[r]), one warp per row. Lane l
// reads groups l, l + 32, ...: a warp's loads of values and metadata are contiguous, and the x it gathers
// lie in one window that stays in L1. Reads about 56% of the bytes of a dense bf16 GEMV.
template <typename T>
__global__ void gemv_kernel(const T* __restrict__ x, const T* __restrict__ values, const uint8_t* __restrict__ meta,
                            const T* __restrict__ bias, T* __restrict__ y, int tokens, int64_t rows, int64_t cols) {
  const int lane = threadIdx.x % 32;
  const int64_t r = blockIdx.x * static_cast<int64_t>(kRowsPerBlock) + threadIdx.x / 32;
  if (r >= rows) return;
  const int64_t groups = cols / 4, mcols = meta_cols(cols);
  const T* v = values + r * (cols / 2);
  const uint8_t* m = meta + r * mcols;
  float acc[kMaxTokens];
#pragma unroll
  for (int t = 0; t < kMaxTokens; ++t) acc[t] = 0.f;
  for (int64_t g0 = lane; g0 < groups; g0 += 32 * kGroupsPerLane) {
    float w0[kGroupsPerLane], w1[kGroupsPerLane];
    int p0[kGroupsPerLane], p1[kGroupsPerLane];
#pragma unroll
    for (int u = 0; u < kGroupsPerLane; ++u) {
      const int64_t g = g0 + 32 * u;
      const bool live = g < groups;
      const uint8_t nib = live ? (__ldg(m + g / 2) >> (4 * (g % 2))) & 0xF : 0;
      w0[u] = live ? to_f32(v[2 * g]) : 0.f;
      w1[u] = live ? to_f32(v[2 * g + 1]) : 0.f;
      p0[u] = live ? static_cast<int>(4 * g + (nib & 3)) : 0;
      p1[u] = live ? static_cast<int>(4 * g + (nib >> 2)) : 0;
    }
#pragma unroll
    for (int t = 0; t < kMaxTokens; ++t) {
      if (t >= tokens) break;
      const T* xt = x + t * cols;
#pragma unroll
      for (int u = 0; u < kGroupsPerLane; ++u)
        acc[t] += w0[u] * to_f32(__ldg(xt + p0[u])) + w1[u] * to_f32(__ldg(xt + p1[u]));
    }
  }
#pragma unroll
  for (int t = 0; t < kMaxTokens; ++t) {
    if (t >= tokens) break;
    float s = acc[t];
    for (int off = 16; off > 0; off /= 2) s += __shfl_xor_sync(0xffffffffu, s, off);
    if (lane == 0) y[t * rows + r] = from_float<T>(s + (bias ? to_f32(bias[r]) : 0.f));
  }
}

unsigned blocks_for(int64_t n, int threads) { return static_cast<unsigned>((n + threads - 1) / threads); }

// mask / compress: score_ptr 0 means |weight|; act_ptr (float32, cols entries) 0 means none.
void select(uintptr_t weight, int64_t weight_numel, int wcode, uintptr_t score, int64_t score_numel, int scode,
            uintptr_t act, int64_t act_numel, uintptr_t mask, int64_t mask_numel, uintptr_t values,
            int64_t values_numel, uintptr_t meta, int64_t meta_numel, int64_t rows, int64_t cols, uintptr_t stream) {
  require_gpu();
  check_shape(rows, cols);
  elem_size(wcode);
  check_numel("weight", weight_numel, rows * cols);
  if (score) {
    elem_size(scode);
    check_numel("score", score_numel, rows * cols);
  }
  if (act) check_numel("act_norm", act_numel, cols);
  if (mask) check_numel("mask", mask_numel, rows * cols);
  if (values) check_numel("values", values_numel, rows * cols / 2);
  if (meta) check_numel("meta", meta_numel, rows * meta_cols(cols));
  const int64_t n = rows * meta_cols(cols);
  if (n == 0) return;
  require(weight != 0, "null weight pointer");
  select_kernel<<<blocks_for(n, 256), 256, 0, as_stream(stream)>>>(
      reinterpret_cast<const void*>(weight), wcode, reinterpret_cast<const void*>(score), scode,
      reinterpret_cast<const float*>(act), reinterpret_cast<bool*>(mask), reinterpret_cast<void*>(values),
      reinterpret_cast<uint8_t*>(meta), rows, cols);
  check_cuda(cudaGetLastError(), "select kernel launch");
}

void mask(uintptr_t weight, int64_t weight_numel, int wcode, uintptr_t score, int64_t score_numel, int scode,
          uintptr_t act, int64_t act_numel, uintptr_t out, int64_t out_numel, int64_t rows, int64_t cols,
          uintptr_t stream) {
  require(out != 0 || rows * cols == 0, "null mask pointer");
  select(weight, weight_numel, wcode, score, score_numel, scode, act, act_numel, out, out_numel, 0, 0, 0, 0, rows,
         cols, stream);
}

void compress(uintptr_t weight, int64_t weight_numel, int wcode, uintptr_t score, int64_t score_numel, int scode,
              uintptr_t act, int64_t act_numel, uintptr_t values, int64_t values_numel, uintptr_t meta,
              int64_t meta_numel, int64_t rows, int64_t cols, uintptr_t stream) {
  require((values != 0 && meta != 0) || rows * cols == 0, "null values or meta pointer");
  select(weight, weight_numel, wcode, score, score_numel, scode, act, act_numel, 0, 0, values, values_numel, meta,
         meta_numel, rows, cols, stream);
}

void decompress(uintptr_t values, int64_t values_numel, uintptr_t meta, int64_t meta_numel, uintptr_t out,
                int64_t out_numel, int64_t rows, int64_t cols, int code, uintptr_t stream) {
  require_gpu();
  check_shape(rows, cols);
  const int64_t esize = elem_size(code);
  check_numel("values", values_numel, rows * cols / 2);
  check_numel("meta", meta_numel, rows * meta_cols(cols));
  check_numel("out", out_numel, rows * cols);
  const int64_t n = rows * meta_cols(cols);
  if (n == 0) return;
  require(values != 0 && meta != 0 && out != 0, "null pointer");
  decompress_kernel<<<blocks_for(n, 256), 256, 0, as_stream(stream)>>>(
      reinterpret_cast<const void*>(values), reinterpret_cast<const uint8_t*>(meta), reinterpret_cast<void*>(out),
      rows, cols, esize);
  check_cuda(cudaGetLastError(), "decompress kernel launch");
}

template <typename T>
void launch_gemv(uintptr_t x, uintptr_t values, uintptr_t meta, uintptr_t bias, uintptr_t y, int tokens,
                 int64_t rows, int64_t cols, cudaStream_t stream) {
  gemv_kernel<T><<<blocks_for(rows, kRowsPerBlock), 32 * kRowsPerBlock, 0, stream>>>(
      reinterpret_cast<const T*>(x), reinterpret_cast<const T*>(values), reinterpret_cast<const uint8_t*>(meta),
      reinterpret_cast<const T*>(bias), reinterpret_cast<T*>(y), tokens, rows, cols);
}

void gemv(uintptr_t x, int64_t x_numel, uintptr_t values, int64_t values_numel, uintptr_t meta, int64_t meta_numel,
          uintptr_t bias, int64_t bias_numel, uintptr_t y, int64_t y_numel, int64_t tokens, int64_t rows,
          int64_t cols, int code, uintptr_t stream) {
  require_gpu();
  check_shape(rows, cols);
  const int64_t esize = elem_size(code);
  require(tokens >= 0 && tokens <= kMaxTokens,
          "gemv takes 0.." + std::to_string(kMaxTokens) + " tokens, got " + std::to_string(tokens));
  require(cols < (int64_t{1} << 31), "in_features too large");
  check_numel("x", x_numel, tokens * cols);
  check_numel("values", values_numel, rows * cols / 2);
  check_numel("meta", meta_numel, rows * meta_cols(cols));
  if (bias) check_numel("bias", bias_numel, rows);
  check_numel("y", y_numel, tokens * rows);
  if (tokens == 0 || rows == 0) return;
  require(x != 0 && values != 0 && meta != 0 && y != 0, "null pointer");
  const cudaStream_t s = as_stream(stream);
  const int nt = static_cast<int>(tokens);
  if (code == kFloat32)
    launch_gemv<float>(x, values, meta, bias, y, nt, rows, cols, s);
  else if (code == kBFloat16)
    launch_gemv<__nv_bfloat16>(x, values, meta, bias, y, nt, rows, cols, s);
  else
    launch_gemv<__half>(x, values, meta, bias, y, nt, rows, cols, s);
  check_cuda(cudaGetLastError(), "gemv kernel launch");
}

}  // namespace

PYBIND11_MODULE(FASTPRUNE_MODULE_NAME, m) {
  m.doc() = "fastprune 2:4 sparsity CUDA kernels over raw device pointers";
  m.attr("MAX_GEMV_TOKENS") = kMaxTokens;
  m.def("mask", &mask, "2:4 keep-mask of a weight (bool out).");
  m.def("compress", &compress, "2:4 compress a weight into values + metadata.");
  m.def("decompress", &decompress, "Dense weight from 2:4 values + metadata.");
  m.def("gemv", &gemv, "y = x @ W^T (+ bias) for up to MAX_GEMV_TOKENS tokens of a 2:4 compressed W.");
}
