// SIMD pieces shared by the streaming CPU kernels (block_influence, head_taylor): 8 x fp32 vectors, loads of
// fp32 / bf16 / fp16 into them, fp16 -> fp32 conversion, and the run-time choice between the baseline and the
// AVX2+FMA code.
//
// The hot loops are written with GCC vector extensions (8 x fp32), which compile to SSE2 pairs on the baseline
// ISA (setup.py passes no -march) and to single AVX2 instructions in the AVX2+FMA variant chosen at run time.
// Auto-vectorisation proved fragile here (GCC turned one of these reductions into in-order scalar adds).
// FP_INLINE forces the shared bodies into each variant so they get that variant's ISA. fp16 goes through
// small fp32 tiles converted by F16C where the CPU has it (a branch-free bit-level decode otherwise, about 3x
// slower): intrinsics cannot be inlined into the shared bodies, whose ISA is not fixed where they are written.
//
// Everything here has internal linkage: each extension module keeps its own copy, as it would if the code
// stood in its .cpp file.
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#define FP_INLINE inline __attribute__((always_inline))
#if defined(__x86_64__) && defined(__GNUC__)
#define FP_MULTIVERSION 1
#define FP_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define FP_TARGET_F16C __attribute__((target("avx,f16c")))
#include <immintrin.h>
#endif
#pragma GCC diagnostic ignored "-Wpsabi"  // 32-byte vectors only live inside always-inlined functions

namespace {

#ifdef FP_MULTIVERSION
// FASTPRUNE_CPU_BASELINE=1 keeps to the baseline code paths, so that tests can check them on any CPU.
bool baseline_only() {
  const char* v = std::getenv("FASTPRUNE_CPU_BASELINE");
  return v != nullptr && std::strcmp(v, "1") == 0;
}

bool cpu_has_avx2() {
  static const bool ok = !baseline_only() && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}

bool cpu_has_f16c() {
  static const bool ok = !baseline_only() && __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
  return ok;
}
#endif

// Body(args...) compiled for the baseline ISA and, where FP_MULTIVERSION, for AVX2+FMA; run_best runs the best
// one this CPU supports. Body must be FP_INLINE so that each variant compiles it with its own ISA.
template <auto Body, typename... Args>
auto run_baseline(const Args&... args) {
  return Body(args...);
}

#ifdef FP_MULTIVERSION
template <auto Body, typename... Args>
FP_TARGET_AVX2 auto run_avx2(const Args&... args) {
  return Body(args...);
}
#endif

template <auto Body, typename... Args>
auto run_best(const Args&... args) {
#ifdef FP_MULTIVERSION
  if (cpu_has_avx2()) return run_avx2<Body>(args...);
#endif
  return run_baseline<Body>(args...);
}

using f32x8 = float __attribute__((vector_size(32)));
using u32x8 = uint32_t __attribute__((vector_size(32)));
using i32x8 = int32_t __attribute__((vector_size(32)));
using u16x8 = uint16_t __attribute__((vector_size(16)));

FP_INLINE f32x8 load8(const float* p) {
  f32x8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

FP_INLINE u32x8 load8_bits_high(const void* p) {  // 8 x 16-bit values placed in the top half of 32-bit lanes
  u16x8 h;
  std::memcpy(&h, p, sizeof(h));
  return __builtin_convertvector(h, u32x8) << 16;
}

FP_INLINE f32x8 load8(const at::BFloat16* p) { return reinterpret_cast<f32x8>(load8_bits_high(p)); }

// 16 values as two vectors, in an order that only reductions may use: contiguous halves for fp32; even and
// odd elements for bf16 (two values per 32-bit lane: a mask and a shift, no widening).
FP_INLINE void load16(const float* p, f32x8& a, f32x8& b) {
  a = load8(p);
  b = load8(p + 8);
}

FP_INLINE void load16(const at::BFloat16* p, f32x8& a, f32x8& b) {
  u32x8 pairs;
  std::memcpy(&pairs, p, sizeof(pairs));
  a = reinterpret_cast<f32x8>(pairs << 16);
  b = reinterpret_cast<f32x8>(pairs & 0xFFFF0000u);
}

FP_INLINE f32x8 load8(const at::Half* p) {
  // IEEE half -> float on integer lanes: rebias normal numbers by scaling, rebuild subnormals with a magic
  // number, and pick between them with a lane mask (no branches).
  const u32x8 w = load8_bits_high(p);
  const u32x8 sign = w & 0x80000000u;
  const u32x8 two_w = w + w;
  const f32x8 normal = reinterpret_cast<f32x8>((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const f32x8 denormal = reinterpret_cast<f32x8>((two_w >> 17) | (126u << 23)) - 0.5f;
  // all ones where two_w >> 1 < 2^26 (a subnormal); a shift, not a compare, which SSE2 would scalarise
  const u32x8 is_denormal = reinterpret_cast<u32x8>((reinterpret_cast<i32x8>(two_w >> 1) - (1 << 26)) >> 31);
  return reinterpret_cast<f32x8>(sign | (reinterpret_cast<u32x8>(denormal) & is_denormal) |
                                 (reinterpret_cast<u32x8>(normal) & ~is_denormal));
}

FP_INLINE double hsum(const f32x8& v) {
  double s = 0.0;
  for (int k = 0; k < 8; ++k) s += v[k];
  return s;
}

// fp16 -> fp32 of n values, one function per ISA (see the top of the file).
void half_to_float_generic(const at::Half* src, float* dst, int64_t n) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const f32x8 v = load8(src + j);
    std::memcpy(dst + j, &v, sizeof(v));
  }
  for (; j < n; ++j) dst[j] = static_cast<float>(src[j]);
}

#ifdef FP_MULTIVERSION
FP_TARGET_F16C void half_to_float_f16c(const at::Half* src, float* dst, int64_t n) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    _mm256_storeu_ps(dst + j, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + j))));
  }
  for (; j < n; ++j) dst[j] = static_cast<float>(src[j]);
}
#endif

using HalfToFloat = void (*)(const at::Half*, float*, int64_t);

HalfToFloat half_to_float() {
#ifdef FP_MULTIVERSION
  if (cpu_has_f16c()) return half_to_float_f16c;
#endif
  return half_to_float_generic;
}

}  // namespace
