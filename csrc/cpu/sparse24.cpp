// 2:4 semi-structured sparsity on CPU: mask, compress, decompress and the sparse x @ W^T product.
//
// Compressed layout (shared with fastprune/ops/sparse24.py, the CUDA module and the Triton kernels):
//   weight [out, in], in % 4 == 0, groups of 4 consecutive inputs, G = in / 4 groups per row.
//   values [out, in / 2] (weight's dtype): the 2 kept elements of each group, lower position first.
//   meta   [out, ceil(G / 2)] uint8: one 4-bit nibble per group, group 2b in the low nibble of byte b and
//          group 2b + 1 in the high nibble (0 when G is odd); nibble bits 0-1 = position of the first kept
//          element, bits 2-3 = position of the second. So the 32-bit word at meta byte 4c holds the
//          positions of values 16c .. 16c + 15 in consecutive 2-bit fields, which the SIMD kernels decode
//          with one variable shift.
// Selection: keep the 2 largest scores per group (score = given score or |w|, times act_norm[col] when
// given); NaN ranks above every number, equal scores keep the lower position.
//
// SIMD: no -march flag is passed to the build, so the AVX2 and AVX-512 kernels are compiled with function
// target attributes and chosen at run time (set_isa() lowers the choice so tests cover every path).

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <immintrin.h>

// GCC 12's AVX-512 headers trip these on their own _mm512_undefined_* helpers.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <algorithm>
#include <atomic>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

using at::Tensor;

enum Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

int detect_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return kAvx2;
  return kScalar;
}

std::atomic<int> g_isa{detect_isa()};

int64_t meta_cols(int64_t in) { return (in / 4 + 1) / 2; }

// Rows per parallel chunk: at least `min_elements` weights of `in` per row, and 16 rows. Waking a second thread
// costs microseconds (far more on a loaded machine, where a descheduled thread stalls the parallel region), so a
// small matrix (a sparsegpt group [rows, 4], a SmolLM2 k_proj) runs on one thread.
int64_t grain_rows(int64_t in, int64_t min_elements) {
  return std::max<int64_t>(16, min_elements / std::max<int64_t>(in, 1));
}
constexpr int64_t kSelectGrain = 1 << 16;  // weights per chunk for mask / compress / decompress

// ---------------------------------------------------------------- selection

// Scores as int32 keys in the selection order: numbers ascending with -0 == +0, every NaN above +inf.
inline int32_t order_key(float s) {
  s += 0.0f;  // -0 -> +0
  int32_t bits;
  std::memcpy(&bits, &s, 4);
  const int32_t key = bits ^ ((bits >> 31) & 0x7FFFFFFF);  // flip negatives so integer order = float order
  return (bits & 0x7FFFFFFF) > 0x7F800000 ? INT32_MAX : key;
}

// Nibble (first kept | second << 2) for each outcome of the 6 comparisons "position i ranks above position
// j" (i < j; bit order 01, 02, 03, 12, 13, 23). Equal keys rank the lower position first.
struct SelectTable {
  uint8_t nibble[64];
  SelectTable() {
    const int pairs[6][2] = {{0, 1}, {0, 2}, {0, 3}, {1, 2}, {1, 3}, {2, 3}};
    for (int bitsv = 0; bitsv < 64; ++bitsv) {
      int above[4] = {0, 0, 0, 0};  // how many positions rank above each one
      for (int k = 0; k < 6; ++k) ++above[(bitsv >> k) & 1 ? pairs[k][1] : pairs[k][0]];
      int kept[2] = {0, 0}, n = 0;
      for (int i = 0; i < 4 && n < 2; ++i)
        if (above[i] < 2) kept[n++] = i;
      nibble[bitsv] = static_cast<uint8_t>(kept[0] | (kept[1] << 2));
    }
  }
};
const SelectTable kSelect;

// The nibble of one group of 4 scores: the 2 highest keys, ties to the lower position. Branch-free.
inline uint8_t select_group(const float* s) {
  const int32_t k0 = order_key(s[0]), k1 = order_key(s[1]), k2 = order_key(s[2]), k3 = order_key(s[3]);
  const int bitsv = (k0 >= k1) | (k0 >= k2) << 1 | (k0 >= k3) << 2 | (k1 >= k2) << 3 | (k1 >= k3) << 4 |
                    (k2 >= k3) << 5;
  return kSelect.nibble[bitsv];
}

inline uint8_t group_nibble(const uint8_t* meta_row, int64_t g) {
  return (meta_row[g >> 1] >> ((g & 1) * 4)) & 0xF;
}

template <typename src_t>
void load_row(const src_t* src, int64_t n, bool absolute, float* dst) {
  for (int64_t k = 0; k < n; ++k) {
    const float v = static_cast<float>(src[k]);
    dst[k] = absolute ? std::fabs(v) : v;
  }
}

// Scores of one row as fp32: |w| or the given score, times act_norm per column when given.
void row_scores(const Tensor& w, const Tensor& score, const float* act, int64_t r, int64_t in, float* out) {
  const Tensor& src = score.defined() ? score : w;
  const bool absolute = !score.defined();
  switch (src.scalar_type()) {
    case at::kFloat:
      load_row(src.const_data_ptr<float>() + r * in, in, absolute, out);
      break;
    case at::kDouble:
      load_row(src.const_data_ptr<double>() + r * in, in, absolute, out);
      break;
    case at::kBFloat16:
      load_row(src.const_data_ptr<at::BFloat16>() + r * in, in, absolute, out);
      break;
    case at::kHalf:
      load_row(src.const_data_ptr<at::Half>() + r * in, in, absolute, out);
      break;
    default:
      TORCH_CHECK(false, "sparse24: unsupported score dtype ", src.scalar_type());
  }
  if (act != nullptr)
    for (int64_t k = 0; k < in; ++k) out[k] *= act[k];
}

// ---------------------------------------------------------------- argument checks

bool is_weight_dtype(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf; }

// Calls f(scalar_t{}) for the three weight dtypes (the AT_DISPATCH macros would also instantiate double).
template <typename F>
void dispatch_weight(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: return f(float{});
    case at::kBFloat16: return f(at::BFloat16{});
    case at::kHalf: return f(at::Half{});
    default: TORCH_CHECK(false, "sparse24: unsupported dtype ", t);
  }
}

struct Scored {
  Tensor weight, score, act;
};

Scored check_scored(const char* op, const Tensor& weight, const std::optional<Tensor>& score,
                    const std::optional<Tensor>& act_norm) {
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-D [out, in], got ", weight.dim(), "-D");
  TORCH_CHECK(is_weight_dtype(weight.scalar_type()), op, ": weight must be float32, bfloat16 or float16, got ",
              weight.scalar_type());
  TORCH_CHECK(weight.size(1) % 4 == 0, op, ": in_features (", weight.size(1),
              ") must be divisible by 4 for 2:4 groups");
  Scored s{weight.contiguous(), Tensor(), Tensor()};
  if (score.has_value()) {
    TORCH_CHECK(score->sizes() == weight.sizes(), op, ": score shape ", score->sizes(),
                " must equal weight shape ", weight.sizes());
    TORCH_CHECK(at::isFloatingType(score->scalar_type()), op, ": score must be a floating tensor");
    s.score = score->contiguous();
  }
  if (act_norm.has_value()) {
    TORCH_CHECK(act_norm->dim() == 1 && act_norm->size(0) == weight.size(1), op,
                ": act_norm must be 1-D with in_features (", weight.size(1), ") entries, got shape ",
                act_norm->sizes());
    TORCH_CHECK(at::isFloatingType(act_norm->scalar_type()), op, ": act_norm must be a floating tensor");
    s.act = act_norm->to(at::kFloat).contiguous();
  }
  return s;
}

void check_compressed(const char* op, const Tensor& values, const Tensor& meta) {
  TORCH_CHECK(values.dim() == 2, op, ": values must be 2-D [out, in/2], got ", values.dim(), "-D");
  TORCH_CHECK(is_weight_dtype(values.scalar_type()), op, ": values must be float32, bfloat16 or float16, got ",
              values.scalar_type());
  TORCH_CHECK(values.size(1) % 2 == 0, op, ": values has ", values.size(1),
              " columns; 2:4 needs in_features divisible by 4 (values columns even)");
  TORCH_CHECK(meta.dim() == 2 && meta.scalar_type() == at::kByte, op, ": meta must be a 2-D uint8 tensor");
  const int64_t in = 2 * values.size(1);
  TORCH_CHECK(meta.size(0) == values.size(0) && meta.size(1) == meta_cols(in), op, ": meta shape ", meta.sizes(),
              " does not match values ", values.sizes(), " (expected [", values.size(0), ", ", meta_cols(in), "])");
}

// ---------------------------------------------------------------- mask / compress / decompress

Tensor sparse24_mask(const Tensor& weight, const std::optional<Tensor>& score,
                     const std::optional<Tensor>& act_norm) {
  Scored s = check_scored("sparse24_mask", weight, score, act_norm);
  const int64_t out = weight.size(0), in = weight.size(1);
  Tensor mask = at::empty({out, in}, weight.options().dtype(at::kBool));
  bool* m = mask.data_ptr<bool>();
  const float* act = s.act.defined() ? s.act.const_data_ptr<float>() : nullptr;
  at::parallel_for(0, out, grain_rows(in, kSelectGrain), [&](int64_t r0, int64_t r1) {
    std::vector<float> buf(in);
    for (int64_t r = r0; r < r1; ++r) {
      row_scores(s.weight, s.score, act, r, in, buf.data());
      for (int64_t g = 0; g < in / 4; ++g) {
        const uint8_t nib = select_group(buf.data() + 4 * g);
        bool* dst = m + r * in + 4 * g;
        for (int i = 0; i < 4; ++i) dst[i] = false;
        dst[nib & 3] = true;
        dst[nib >> 2] = true;
      }
    }
  });
  return mask;
}

template <typename scalar_t>
void compress_rows(const Scored& s, const float* act, int64_t r0, int64_t r1, int64_t in, scalar_t* values,
                   uint8_t* meta) {
  const scalar_t* w = s.weight.const_data_ptr<scalar_t>();
  const int64_t groups = in / 4, mcols = meta_cols(in);
  std::vector<float> buf(in);
  for (int64_t r = r0; r < r1; ++r) {
    row_scores(s.weight, s.score, act, r, in, buf.data());
    const scalar_t* wr = w + r * in;
    scalar_t* vr = values + r * (in / 2);
    uint8_t* mr = meta + r * mcols;
    std::memset(mr, 0, mcols);
    for (int64_t g = 0; g < groups; ++g) {
      const uint8_t nib = select_group(buf.data() + 4 * g);
      vr[2 * g] = wr[4 * g + (nib & 3)];
      vr[2 * g + 1] = wr[4 * g + (nib >> 2)];
      mr[g >> 1] |= nib << ((g & 1) * 4);
    }
  }
}

std::tuple<Tensor, Tensor> sparse24_compress(const Tensor& weight, const std::optional<Tensor>& score,
                                             const std::optional<Tensor>& act_norm) {
  Scored s = check_scored("sparse24_compress", weight, score, act_norm);
  const int64_t out = weight.size(0), in = weight.size(1);
  Tensor values = at::empty({out, in / 2}, weight.options());
  Tensor meta = at::empty({out, meta_cols(in)}, weight.options().dtype(at::kByte));
  const float* act = s.act.defined() ? s.act.const_data_ptr<float>() : nullptr;
  dispatch_weight(weight.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    scalar_t* v = values.data_ptr<scalar_t>();
    uint8_t* m = meta.data_ptr<uint8_t>();
    at::parallel_for(0, out, grain_rows(in, kSelectGrain),
                     [&](int64_t r0, int64_t r1) { compress_rows<scalar_t>(s, act, r0, r1, in, v, m); });
  });
  return {values, meta};
}

Tensor sparse24_decompress(const Tensor& values_in, const Tensor& meta_in) {
  check_compressed("sparse24_decompress", values_in, meta_in);
  const Tensor values = values_in.contiguous(), meta = meta_in.contiguous();
  const int64_t out = values.size(0), in = 2 * values.size(1), mcols = meta_cols(in);
  Tensor dense = at::zeros({out, in}, values.options());
  dispatch_weight(values.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* v = values.const_data_ptr<scalar_t>();
    const uint8_t* m = meta.const_data_ptr<uint8_t>();
    scalar_t* d = dense.data_ptr<scalar_t>();
    at::parallel_for(0, out, grain_rows(in, kSelectGrain), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        for (int64_t g = 0; g < in / 4; ++g) {
          const uint8_t nib = group_nibble(m + r * mcols, g);
          d[r * in + 4 * g + (nib & 3)] = v[r * (in / 2) + 2 * g];
          d[r * in + 4 * g + (nib >> 2)] = v[r * (in / 2) + 2 * g + 1];
        }
      }
    });
  });
  return dense;
}

// ---------------------------------------------------------------- matmul: shared pieces

// One operand set of y = x @ W^T + bias, with x already in fp32.
template <typename scalar_t>
struct Problem {
  const scalar_t* values;  // [out, in / 2]
  const uint8_t* meta;     // [out, mcols]
  const float* x;          // [tokens, in] fp32
  const float* bias;       // [out] fp32 or nullptr
  scalar_t* y;             // [tokens, out]
  int64_t tokens, out, in, mcols;
};

template <typename scalar_t>
inline __attribute__((always_inline)) float dot_group_tail(const scalar_t* v, const uint8_t* m, const float* x,
                                                           int64_t g0, int64_t g1) {
  float acc = 0.f;
  for (int64_t g = g0; g < g1; ++g) {
    const uint8_t nib = group_nibble(m, g);
    acc += static_cast<float>(v[2 * g]) * x[4 * g + (nib & 3)];
    acc += static_cast<float>(v[2 * g + 1]) * x[4 * g + (nib >> 2)];
  }
  return acc;
}

// ---------------------------------------------------------------- GEMV (few tokens): AVX-512

__attribute__((target("avx512f"))) inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
__attribute__((target("avx512f"))) inline __m512 load16(const at::BFloat16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
__attribute__((target("avx512f"))) inline __m512 load16(const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// Software prefetch into L2, this many bytes of values ahead, in the AVX-512 GEMV: one core alone does not
// keep enough DRAM reads in flight. Measured with the weights cold (DRAM) on the benchmark CPU, 4096x4096:
// fp32 1.29 -> 0.83 ms, bf16 0.91 -> 0.76 ms, fp16 0.87 -> 0.66 ms (4 KiB into L1 gained less).
constexpr int64_t kPrefetchBytes = 16384;

// One step of dot_rows_avx512: 16 kept values of each of NR rows (chunk c) times NT tokens, into acc.
template <typename scalar_t, int NR, int NT>
__attribute__((target("avx512f"), always_inline)) inline void gemv_step_avx512(
    const scalar_t* v, int64_t vstride, const uint8_t* m, int64_t mstride, const float* x, int64_t xstride,
    int64_t c, __m512 (&acc)[NR][NT]) {
  const __m512i shifts = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i base = _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28);
  __m512 xa[NT], xb[NT];
  for (int t = 0; t < NT; ++t) {
    xa[t] = _mm512_loadu_ps(x + t * xstride + 32 * c);
    xb[t] = _mm512_loadu_ps(x + t * xstride + 32 * c + 16);
  }
  for (int r = 0; r < NR; ++r) {
    _mm_prefetch(reinterpret_cast<const char*>(v + r * vstride + 16 * c) + kPrefetchBytes, _MM_HINT_T1);
    if (c % 4 == 0)
      _mm_prefetch(reinterpret_cast<const char*>(m + r * mstride + 4 * c) + kPrefetchBytes / 4, _MM_HINT_T1);
    uint32_t word;  // the 16 values' positions, 2 bits each
    std::memcpy(&word, m + r * mstride + 4 * c, 4);
    const __m512i pos = _mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32(word), shifts), _mm512_set1_epi32(3));
    const __m512i idx = _mm512_add_epi32(pos, base);
    const __m512 w = load16(v + r * vstride + 16 * c);
    for (int t = 0; t < NT; ++t) acc[r][t] = _mm512_fmadd_ps(w, _mm512_permutex2var_ps(xa[t], idx, xb[t]), acc[r][t]);
  }
}

// Dot products of NR compressed rows (vstride / mstride apart) with NT tokens of x (xstride apart) into
// out[NR][NT]. 16 kept values per step: their 32 candidate inputs sit in two registers and a two-source
// permute picks the kept ones; the NR rows share those x loads, which matters once x outgrows L1. U sets of
// sums keep at least 4 FMA chains in flight (one chain waits on the FMA latency every step).
template <typename scalar_t, int NR, int NT>
__attribute__((target("avx512f"), always_inline)) inline void dot_rows_avx512(const scalar_t* v, int64_t vstride,
                                                                               const uint8_t* m,
                                                       int64_t mstride, const float* x, int64_t xstride,
                                                       int64_t in, float* out) {
  constexpr int U = NR * NT >= 4 ? 1 : 4 / (NR * NT);
  __m512 acc[U][NR][NT];
  for (int u = 0; u < U; ++u)
    for (int r = 0; r < NR; ++r)
      for (int t = 0; t < NT; ++t) acc[u][r][t] = _mm512_setzero_ps();
  const int64_t chunks = in / 32;
  int64_t c = 0;
  for (; c + U <= chunks; c += U)
    for (int u = 0; u < U; ++u) gemv_step_avx512<scalar_t, NR, NT>(v, vstride, m, mstride, x, xstride, c + u, acc[u]);
  for (; c < chunks; ++c) gemv_step_avx512<scalar_t, NR, NT>(v, vstride, m, mstride, x, xstride, c, acc[0]);
  for (int r = 0; r < NR; ++r)
    for (int t = 0; t < NT; ++t) {
      __m512 sum = acc[0][r][t];
      for (int u = 1; u < U; ++u) sum = _mm512_add_ps(sum, acc[u][r][t]);
      out[r * NT + t] = _mm512_reduce_add_ps(sum) +
                        dot_group_tail(v + r * vstride, m + r * mstride, x + t * xstride, chunks * 8, in / 4);
    }
}

// ---------------------------------------------------------------- GEMV: AVX2

__attribute__((target("avx2,fma,f16c"))) inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
__attribute__((target("avx2,fma,f16c"))) inline __m256 load8(const at::BFloat16* p) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}
__attribute__((target("avx2,fma,f16c"))) inline __m256 load8(const at::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

__attribute__((target("avx2,fma,f16c"))) inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// As dot_rows_avx512 with 8 kept values per step: AVX2 permutes one register, so two permutes and a blend.
template <typename scalar_t, int NR, int NT>
__attribute__((target("avx2,fma,f16c"), always_inline)) inline void dot_rows_avx2(const scalar_t* v, int64_t vstride,
                                                                                   const uint8_t* m,
                                                           int64_t mstride, const float* x, int64_t xstride,
                                                           int64_t in, float* out) {
  const __m256i shifts = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
  const __m256i base = _mm256_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12);
  const __m256i three = _mm256_set1_epi32(3);
  __m256 acc[NR][NT];
  for (int r = 0; r < NR; ++r)
    for (int t = 0; t < NT; ++t) acc[r][t] = _mm256_setzero_ps();
  const int64_t chunks = in / 16;
  for (int64_t c = 0; c < chunks; ++c) {
    for (int r = 0; r < NR; ++r) {
      uint16_t word;
      std::memcpy(&word, m + r * mstride + 2 * c, 2);
      const __m256i idx =
          _mm256_add_epi32(_mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(word), shifts), three), base);
      const __m256 w = load8(v + r * vstride + 8 * c);
      for (int t = 0; t < NT; ++t) {
        const float* xc = x + t * xstride + 16 * c;
        const __m256 lo = _mm256_permutevar8x32_ps(_mm256_loadu_ps(xc), idx);
        const __m256 hi = _mm256_permutevar8x32_ps(_mm256_loadu_ps(xc + 8), idx);
        acc[r][t] = _mm256_fmadd_ps(w, _mm256_blend_ps(lo, hi, 0xF0), acc[r][t]);
      }
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int t = 0; t < NT; ++t)
      out[r * NT + t] =
          hsum8(acc[r][t]) + dot_group_tail(v + r * vstride, m + r * mstride, x + t * xstride, chunks * 4, in / 4);
}

// Rows per step once the tokens' x (fp32) outgrows L1: the rows then share each x load. While x fits L1, one
// row at a time is faster (fewer concurrent streams): measured on the benchmark CPU, 4096x11008 bf16 GEMV
// 2.9 -> 1.9 ms with 4 rows, 4096x4096 0.47 -> 0.55 ms.
constexpr int64_t kGemvRows = 4;
constexpr int64_t kGemvL1Bytes = 24 * 1024;

// Short rows also go 4 at a time: a row's fixed costs (its 4 sums reduced, the tail, the store) weigh on 18
// steps of a 576-wide row as much as the steps themselves.
constexpr int64_t kGemvShortRow = 1024;

template <typename scalar_t>
bool gemv_shares_x(const Problem<scalar_t>& p) {
  return p.in <= kGemvShortRow ||
         p.in * static_cast<int64_t>(sizeof(float)) * std::min<int64_t>(p.tokens, 4) > kGemvL1Bytes;
}

// y for rows [r, r + nr) and tokens [t0, t0 + nt) from their dot products acc[row][token] (+ bias).
template <typename scalar_t>
inline __attribute__((always_inline)) void store_rows(const Problem<scalar_t>& p, int64_t r, int64_t nr, int64_t t0,
                                                      int64_t nt, const float* acc) {
  for (int64_t i = 0; i < nr; ++i)
    for (int64_t t = 0; t < nt; ++t)
      p.y[(t0 + t) * p.out + r + i] = static_cast<scalar_t>(acc[i * nt + t] + (p.bias ? p.bias[r + i] : 0.f));
}

// The row loops, one function per ISA with its dot products inlined: on SmolLM2-sized rows (576 inputs, 18
// steps of 16 kept values) a call into the SIMD code per row, and back out for the tail, cost more than the row
// (perf put three quarters of a 576x576 GEMV on the instructions around those calls).
#define FASTPRUNE_GEMV_ROWS(NAME, TARGET, DOT)                                                                  \
  template <typename scalar_t>                                                                                \
  TARGET void NAME(const Problem<scalar_t>& p, int64_t r0, int64_t r1) {                                      \
    const bool share_x = gemv_shares_x(p);                                                                    \
    const int64_t vs = p.in / 2, ms = p.mcols;                                                                \
    float acc[kGemvRows * 4];                                                                                 \
    for (int64_t r = r0; r < r1;) {                                                                           \
      const int64_t nr = share_x && r + kGemvRows <= r1 ? kGemvRows : 1;                                      \
      const scalar_t* v = p.values + r * vs;                                                                  \
      const uint8_t* m = p.meta + r * ms;                                                                     \
      for (int64_t t0 = 0; t0 < p.tokens; t0 += 4) {                                                          \
        const int64_t nt = std::min<int64_t>(4, p.tokens - t0);                                               \
        const float* x = p.x + t0 * p.in;                                                                     \
        if (nr == kGemvRows) {                                                                                \
          switch (nt) {                                                                                       \
            case 4: DOT<scalar_t, kGemvRows, 4>(v, vs, m, ms, x, p.in, p.in, acc); break;                     \
            case 3: DOT<scalar_t, kGemvRows, 3>(v, vs, m, ms, x, p.in, p.in, acc); break;                     \
            case 2: DOT<scalar_t, kGemvRows, 2>(v, vs, m, ms, x, p.in, p.in, acc); break;                     \
            default: DOT<scalar_t, kGemvRows, 1>(v, vs, m, ms, x, p.in, p.in, acc);                          \
          }                                                                                                   \
        } else {                                                                                              \
          switch (nt) {                                                                                       \
            case 4: DOT<scalar_t, 1, 4>(v, vs, m, ms, x, p.in, p.in, acc); break;                             \
            case 3: DOT<scalar_t, 1, 3>(v, vs, m, ms, x, p.in, p.in, acc); break;                             \
            case 2: DOT<scalar_t, 1, 2>(v, vs, m, ms, x, p.in, p.in, acc); break;                             \
            default: DOT<scalar_t, 1, 1>(v, vs, m, ms, x, p.in, p.in, acc);                                   \
          }                                                                                                   \
        }                                                                                                     \
        store_rows(p, r, nr, t0, nt, acc);                                                                    \
      }                                                                                                       \
      r += nr;                                                                                                \
    }                                                                                                         \
  }

FASTPRUNE_GEMV_ROWS(gemv_rows_avx512, __attribute__((target("avx512f"))), dot_rows_avx512)
FASTPRUNE_GEMV_ROWS(gemv_rows_avx2, __attribute__((target("avx2,fma,f16c"))), dot_rows_avx2)
#undef FASTPRUNE_GEMV_ROWS

template <typename scalar_t>
void gemv_rows_scalar(const Problem<scalar_t>& p, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t t = 0; t < p.tokens; ++t) {
      const float dot = dot_group_tail(p.values + r * (p.in / 2), p.meta + r * p.mcols, p.x + t * p.in, 0, p.in / 4);
      store_rows(p, r, 1, t, 1, &dot);
    }
}

// Rows [r0, r1) for every token (up to 4 tokens per pass over the rows' weights).
template <typename scalar_t>
void gemv_rows(const Problem<scalar_t>& p, int isa, int64_t r0, int64_t r1) {
  if (isa == kAvx512) return gemv_rows_avx512(p, r0, r1);
  if (isa == kAvx2) return gemv_rows_avx2(p, r0, r1);
  gemv_rows_scalar(p, r0, r1);
}

// ---------------------------------------------------------------- GEMM (many tokens)
//
// Rows are taken 16 at a time (one AVX-512 register) and their compressed weights are packed per input block
// into pv / pi: for every group, the 16 rows' first kept value, their second kept value, and the two
// positions as int32. A permute of a token's inputs then hands each row its kept input, so one FMA does 16
// useful multiply-adds (a dense GEMM needs twice as many FMAs) while 12 tokens' sums stay in registers.
// Input blocks (kBlockGroups) are the outer loop so a block of x stays in L2 while every row block of the
// thread uses it; sums live in a per-thread [row block][token][16] buffer for kTokenBlock tokens at a time.
// At 512 tokens on the benchmark CPU: 1.4-1.6x dense fp32 torch.mm (one permute per FMA caps it below 2x), 5x
// dense fp16, but 0.6x dense bf16, which oneDNN runs with AVX512-BF16 dot products (2 multiply-adds per lane).

constexpr int64_t kRows = 16;
constexpr int64_t kBlockGroups = 128;
constexpr int64_t kTokenBlock = 512;

// pv: [groups][2][kRows] fp32 values, pi: [groups][2][kRows] int32 4 * (group % 4) + position, for groups
// [g0, g1) counted from g0; rows past r1 are zero.
template <typename scalar_t>
void pack_rows_scalar(const Problem<scalar_t>& p, int64_t r0, int64_t r1, int64_t g0, int64_t g1, float* pv,
                      int32_t* pi) {
  for (int64_t r = 0; r < kRows; ++r) {
    const bool live = r0 + r < r1;
    const scalar_t* v = p.values + (r0 + r) * (p.in / 2);
    const uint8_t* m = p.meta + (r0 + r) * p.mcols;
    for (int64_t i = 0; i < g1 - g0; ++i) {
      const uint8_t nib = live ? group_nibble(m, g0 + i) : 0;
      pv[i * 2 * kRows + r] = live ? static_cast<float>(v[2 * (g0 + i)]) : 0.f;
      pv[i * 2 * kRows + kRows + r] = live ? static_cast<float>(v[2 * (g0 + i) + 1]) : 0.f;
      pi[i * 2 * kRows + r] = 4 * (i % 4) + (nib & 3);
      pi[i * 2 * kRows + kRows + r] = 4 * (i % 4) + (nib >> 2);
    }
  }
}

// Both kept values of one group for 16 rows (4-byte gathers; rows outside `live` read as zero).
__attribute__((target("avx512f"))) inline void gather_pair(const float* v, __m512i offs, __mmask16 live, __m512* v0,
                                                          __m512* v1) {
  *v0 = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), live, offs, v, 4);
  *v1 = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), live, offs, v + 1, 4);
}
__attribute__((target("avx512f"))) inline void gather_pair(const at::BFloat16* v, __m512i offs, __mmask16 live,
                                                          __m512* v0, __m512* v1) {
  const __m512i w = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), live, offs, v, 2);
  *v0 = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  *v1 = _mm512_castsi512_ps(_mm512_and_si512(w, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
}
__attribute__((target("avx512f"))) inline void gather_pair(const at::Half* v, __m512i offs, __mmask16 live, __m512* v0,
                                                          __m512* v1) {
  const __m512i w = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), live, offs, v, 2);
  *v0 = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(w));
  *v1 = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(w, 16)));
}

// pack_rows_scalar for a multiple of 8 groups with gathers down the 16 rows: one 32-bit metadata word
// holds 8 groups' positions.
template <typename scalar_t>
__attribute__((target("avx512f"))) void pack_rows_avx512(const Problem<scalar_t>& p, int64_t r0, int64_t r1,
                                                        int64_t g0, int64_t g1, float* pv, int32_t* pi) {
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __mmask16 live = static_cast<__mmask16>((1u << std::min<int64_t>(kRows, r1 - r0)) - 1);
  const __m512i voffs = _mm512_mullo_epi32(lane, _mm512_set1_epi32(static_cast<int>(p.in / 2)));
  const __m512i moffs = _mm512_mullo_epi32(lane, _mm512_set1_epi32(static_cast<int>(p.mcols)));
  const __m512i three = _mm512_set1_epi32(3);
  const scalar_t* v = p.values + r0 * (p.in / 2);
  const uint8_t* m = p.meta + r0 * p.mcols;
  for (int64_t i = 0; i < g1 - g0; i += 8) {
    const __m512i word = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), live, moffs, m + (g0 + i) / 2, 1);
    for (int64_t k = 0; k < 8; ++k) {
      __m512 v0, v1;
      gather_pair(v + 2 * (g0 + i + k), voffs, live, &v0, &v1);
      const __m512i base = _mm512_set1_epi32(static_cast<int>(4 * (k % 4)));
      const __m512i p0 = _mm512_and_si512(_mm512_srli_epi32(word, static_cast<unsigned>(4 * k)), three);
      const __m512i p1 = _mm512_and_si512(_mm512_srli_epi32(word, static_cast<unsigned>(4 * k + 2)), three);
      float* dv = pv + (i + k) * 2 * kRows;
      int32_t* di = pi + (i + k) * 2 * kRows;
      _mm512_storeu_ps(dv, v0);
      _mm512_storeu_ps(dv + kRows, v1);
      _mm512_storeu_si512(di, _mm512_add_epi32(p0, base));
      _mm512_storeu_si512(di + kRows, _mm512_add_epi32(p1, base));
    }
  }
}

template <typename scalar_t>
void pack_rows(const Problem<scalar_t>& p, int isa, int64_t r0, int64_t r1, int64_t g0, int64_t g1, float* pv,
               int32_t* pi) {
  int64_t gv = g0;
  if (isa == kAvx512) {
    gv = g0 + (g1 - g0) / 8 * 8;
    pack_rows_avx512(p, r0, r1, g0, gv, pv, pi);
  }
  pack_rows_scalar(p, r0, r1, gv, g1, pv + (gv - g0) * 2 * kRows, pi + (gv - g0) * 2 * kRows);
}

// acc[t][16] += the packed rows times tokens x[t] over ng groups (x points at the block's first input).
// Every 4 groups, each token's 16 inputs are loaded once and a full-width permute gives each row its kept
// input (pi holds 4 * (group % 4) + position); 12 tokens keep 24 registers busy (12 inputs, 12 sums).
template <int NT>
__attribute__((target("avx512f"))) void micro_avx512(const float* pv, const int32_t* pi, int64_t ng, const float* x,
                                                    int64_t xstride, float* acc) {
  __m512 a[NT], xv[NT];
  for (int t = 0; t < NT; ++t) a[t] = _mm512_loadu_ps(acc + t * kRows);
  for (int64_t q = 0; q < ng; q += 4) {
    const int64_t n = std::min<int64_t>(4, ng - q);
    const __mmask16 live = static_cast<__mmask16>((1u << (4 * n)) - 1);  // never read past the row's end
    for (int t = 0; t < NT; ++t) xv[t] = _mm512_maskz_loadu_ps(live, x + t * xstride + 4 * q);
    for (int64_t i = q; i < q + n; ++i) {
      const __m512 v0 = _mm512_loadu_ps(pv + i * 2 * kRows), v1 = _mm512_loadu_ps(pv + i * 2 * kRows + kRows);
      const __m512i i0 = _mm512_loadu_si512(pi + i * 2 * kRows), i1 = _mm512_loadu_si512(pi + i * 2 * kRows + kRows);
      for (int t = 0; t < NT; ++t) {
        a[t] = _mm512_fmadd_ps(v0, _mm512_permutexvar_ps(i0, xv[t]), a[t]);
        a[t] = _mm512_fmadd_ps(v1, _mm512_permutexvar_ps(i1, xv[t]), a[t]);
      }
    }
  }
  for (int t = 0; t < NT; ++t) _mm512_storeu_ps(acc + t * kRows, a[t]);
}

// As micro_avx512 for one half (8 rows) of the block, 2 groups (8 inputs) per load and 4 tokens at a time
// (AVX2 has 16 registers); vpermps reads the low 3 bits of pi, i.e. 4 * (group % 2) + position.
template <int NT>
__attribute__((target("avx2,fma,f16c"))) void micro_avx2(const float* pv, const int32_t* pi, int64_t ng,
                                                         const float* x, int64_t xstride, float* acc) {
  __m256 a[NT], xv[NT];
  for (int t = 0; t < NT; ++t) a[t] = _mm256_loadu_ps(acc + t * kRows);
  for (int64_t q = 0; q < ng; q += 2) {
    const int64_t n = std::min<int64_t>(2, ng - q);
    const __m256i live = _mm256_setr_epi32(-1, -1, -1, -1, n > 1 ? -1 : 0, n > 1 ? -1 : 0, n > 1 ? -1 : 0,
                                           n > 1 ? -1 : 0);
    for (int t = 0; t < NT; ++t) xv[t] = _mm256_maskload_ps(x + t * xstride + 4 * q, live);
    for (int64_t i = q; i < q + n; ++i) {
      const __m256 v0 = _mm256_loadu_ps(pv + i * 2 * kRows), v1 = _mm256_loadu_ps(pv + i * 2 * kRows + kRows);
      const __m256i i0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pi + i * 2 * kRows));
      const __m256i i1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pi + i * 2 * kRows + kRows));
      for (int t = 0; t < NT; ++t) {
        a[t] = _mm256_fmadd_ps(v0, _mm256_permutevar8x32_ps(xv[t], i0), a[t]);
        a[t] = _mm256_fmadd_ps(v1, _mm256_permutevar8x32_ps(xv[t], i1), a[t]);
      }
    }
  }
  for (int t = 0; t < NT; ++t) _mm256_storeu_ps(acc + t * kRows, a[t]);
}

void micro_scalar(const float* pv, const int32_t* pi, int64_t ng, const float* x, int64_t xstride, int64_t nt,
                  float* acc) {
  for (int64_t t = 0; t < nt; ++t)
    for (int64_t i = 0; i < ng; ++i) {
      const float* xq = x + t * xstride + 4 * (i & ~int64_t{3});
      for (int64_t r = 0; r < kRows; ++r) {
        const int64_t o = i * 2 * kRows + r;
        acc[t * kRows + r] += pv[o] * xq[pi[o]] + pv[o + kRows] * xq[pi[o + kRows]];
      }
    }
}

template <int NT>
void micro_avx512_upto(int64_t nt, const float* pv, const int32_t* pi, int64_t ng, const float* x, int64_t xs,
                       float* acc) {
  if constexpr (NT > 1) {
    if (nt < NT) return micro_avx512_upto<NT - 1>(nt, pv, pi, ng, x, xs, acc);
  }
  micro_avx512<NT>(pv, pi, ng, x, xs, acc);
}

template <int NT>
void micro_avx2_upto(int64_t nt, const float* pv, const int32_t* pi, int64_t ng, const float* x, int64_t xs,
                     float* acc) {
  if constexpr (NT > 1) {
    if (nt < NT) return micro_avx2_upto<NT - 1>(nt, pv, pi, ng, x, xs, acc);
  }
  micro_avx2<NT>(pv, pi, ng, x, xs, acc);
  micro_avx2<NT>(pv + 8, pi + 8, ng, x, xs, acc + 8);
}

constexpr int64_t kTokensAvx512 = 12;
constexpr int64_t kTokensAvx2 = 4;

// acc[t][16] for tokens [0, nt) of x over one packed input block.
void micro(int isa, const float* pv, const int32_t* pi, int64_t ng, const float* x, int64_t xstride, int64_t nt,
           float* acc) {
  const int64_t step = isa == kAvx512 ? kTokensAvx512 : isa == kAvx2 ? kTokensAvx2 : nt;
  for (int64_t t = 0; t < nt; t += step) {
    const int64_t n = std::min(step, nt - t);
    if (isa == kAvx512)
      micro_avx512_upto<kTokensAvx512>(n, pv, pi, ng, x + t * xstride, xstride, acc + t * kRows);
    else if (isa == kAvx2)
      micro_avx2_upto<kTokensAvx2>(n, pv, pi, ng, x + t * xstride, xstride, acc + t * kRows);
    else
      micro_scalar(pv, pi, ng, x + t * xstride, xstride, n, acc + t * kRows);
  }
}

// Row blocks [b0, b1) (16 rows each) for all tokens.
template <typename scalar_t>
void gemm_rows(const Problem<scalar_t>& p, int isa, int64_t b0, int64_t b1) {
  const int64_t groups = p.in / 4, nt_max = std::min(kTokenBlock, p.tokens);
  std::vector<float> acc((b1 - b0) * nt_max * kRows);
  std::vector<float> pv(kBlockGroups * 2 * kRows);
  std::vector<int32_t> pi(kBlockGroups * 2 * kRows);
  for (int64_t t0 = 0; t0 < p.tokens; t0 += kTokenBlock) {
    const int64_t nt = std::min(kTokenBlock, p.tokens - t0);
    std::fill(acc.begin(), acc.end(), 0.f);
    for (int64_t g0 = 0; g0 < groups; g0 += kBlockGroups) {
      const int64_t g1 = std::min(groups, g0 + kBlockGroups);
      for (int64_t b = b0; b < b1; ++b) {
        pack_rows(p, isa, b * kRows, std::min(p.out, (b + 1) * kRows), g0, g1, pv.data(), pi.data());
        micro(isa, pv.data(), pi.data(), g1 - g0, p.x + t0 * p.in + 4 * g0, p.in, nt,
              acc.data() + (b - b0) * nt_max * kRows);
      }
    }
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * kRows, nr = std::min(kRows, p.out - r0);
      for (int64_t t = 0; t < nt; ++t) {
        const float* a = acc.data() + ((b - b0) * nt_max + t) * kRows;
        scalar_t* yt = p.y + (t0 + t) * p.out + r0;
        for (int64_t r = 0; r < nr; ++r) yt[r] = static_cast<scalar_t>(a[r] + (p.bias ? p.bias[r0 + r] : 0.f));
      }
    }
  }
}

// Weights per GEMV chunk (rows x in): a second thread pays off from about this much work.
constexpr int64_t kGemvGrain = 1 << 17;

// Below this many tokens re-reading x per row (GEMV) beats packing it (GEMM); measured on the benchmark CPU.
constexpr int64_t kGemmMinTokens = 16;

Tensor sparse24_matmul(const Tensor& x_in, const Tensor& values_in, const Tensor& meta_in,
                       const std::optional<Tensor>& bias_in) {
  check_compressed("sparse24_matmul", values_in, meta_in);
  // x [..., in] -> y [..., out], as nn.Linear: a layer's caller passes [batch, tokens, in] without reshaping.
  TORCH_CHECK(x_in.dim() >= 1, "sparse24_matmul: x must have at least 1 dim");
  TORCH_CHECK(x_in.scalar_type() == values_in.scalar_type(), "sparse24_matmul: x dtype ", x_in.scalar_type(),
              " must equal values dtype ", values_in.scalar_type());
  const int64_t out = values_in.size(0), in = 2 * values_in.size(1);
  TORCH_CHECK(x_in.size(-1) == in, "sparse24_matmul: x has ", x_in.size(-1), " features, the compressed weight has ",
              in);
  int64_t tokens = 1;
  for (int64_t d = 0; d + 1 < x_in.dim(); ++d) tokens *= x_in.size(d);
  std::vector<int64_t> y_sizes(x_in.sizes().begin(), x_in.sizes().end());
  y_sizes.back() = out;
  Tensor bias;
  if (bias_in.has_value()) {
    TORCH_CHECK(bias_in->dim() == 1 && bias_in->size(0) == out, "sparse24_matmul: bias must be 1-D with ", out,
                " entries, got shape ", bias_in->sizes());
    TORCH_CHECK(bias_in->scalar_type() == x_in.scalar_type(), "sparse24_matmul: bias dtype must equal x dtype");
    bias = bias_in->to(at::kFloat).contiguous();
  }
  const Tensor values = values_in.contiguous(), meta = meta_in.contiguous();
  Tensor y = at::empty(y_sizes, x_in.options());
  if (tokens == 0 || out == 0) return y;
  const int isa = g_isa.load();
  const bool gemm = tokens >= kGemmMinTokens;
  dispatch_weight(values.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const Tensor xf = x_in.to(at::kFloat).contiguous();  // [tokens, in] in memory
    const Problem<scalar_t> p{values.const_data_ptr<scalar_t>(),
                              meta.const_data_ptr<uint8_t>(),
                              xf.const_data_ptr<float>(),
                              bias.defined() ? bias.const_data_ptr<float>() : nullptr,
                              y.data_ptr<scalar_t>(),
                              tokens,
                              out,
                              in,
                              meta_cols(in)};
    if (gemm)
      at::parallel_for(0, (out + kRows - 1) / kRows, 1, [&](int64_t b0, int64_t b1) { gemm_rows(p, isa, b0, b1); });
    else
      at::parallel_for(0, out, grain_rows(in, kGemvGrain), [&](int64_t r0, int64_t r1) { gemv_rows(p, isa, r0, r1); });
  });
  return y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def(
      "set_isa", [](int isa) { g_isa.store(std::max(0, std::min(isa, detect_isa()))); },
      "Cap the SIMD level of the matmul kernels (0 scalar, 1 AVX2, 2 AVX-512); for tests.");
  m.def("get_isa", [] { return g_isa.load(); }, "SIMD level the matmul kernels use (0 scalar, 1 AVX2, 2 AVX-512).");
  m.def("detect_isa", &detect_isa, "Best SIMD level this CPU supports.");
}

TORCH_LIBRARY_FRAGMENT(fastprune_cpu, m) {
  m.def("sparse24_mask(Tensor weight, Tensor? score, Tensor? act_norm) -> Tensor");
  m.def("sparse24_compress(Tensor weight, Tensor? score, Tensor? act_norm) -> (Tensor, Tensor)");
  m.def("sparse24_decompress(Tensor values, Tensor meta) -> Tensor");
  m.def("sparse24_matmul(Tensor x, Tensor values, Tensor meta, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastprune_cpu, CPU, m) {
  m.impl("sparse24_mask", &sparse24_mask);
  m.impl("sparse24_compress", &sparse24_compress);
  m.impl("sparse24_decompress", &sparse24_decompress);
  m.impl("sparse24_matmul", &sparse24_matmul);
}
