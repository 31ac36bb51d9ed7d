// gather_slice on CPU: keep chosen rows and/or columns of several tensors, writing contiguous tensors (new
// ones: op gather_slice; given ones: op gather_slice_out).
//
// All tensors of one call are cut in one parallel pass over (tensor, block of output rows) work items of about
// equal size, so a call holding a 4096x11008 weight and a bias balances across threads. Elements are copied as
// raw bytes, so the kernels only depend on the element size.
//
// - Row gather: one copy per output row.
// - Outputs larger than the caches are written with non-temporal stores, and new ones of several MiB are
//   advised to use transparent huge pages (see new_output).
// - Column gather: the kept columns are cut into chunks of one 64-byte output vector. For a chunk whose sources
//   fit a 128-byte window (true for sorted indices that keep at least half the columns, which is what pruning
//   produces), one AVX-512 two-source permute assembles the chunk from two loads; the window start and the
//   permute lanes (one byte each) are computed once per call, not per row. Other chunks, and CPUs without
//   AVX-512, use a scalar gather. AVX-512 is chosen at run time: no -march flag is needed at build time.
// - Every index is checked before any output is allocated or written.

#include <torch/extension.h>

#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define FASTPRUNE_X86 1
#endif

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace {

constexpr int64_t kVecBytes = 64;            // one AVX-512 register: the output chunk of the column gather
constexpr int64_t kItemBytes = 64 * 1024;    // output bytes per work item: small enough to balance two threads
constexpr int64_t kSerialBytes = 256 * 1024; // below this, threads cost more than they save
constexpr int64_t kHugePageBytes = 2 * 1024 * 1024;
constexpr int64_t kStreamBytes = 8 * 1024 * 1024; // outputs from this size on bypass the caches

// A 16-byte element, so that every torch dtype is a raw copy of one of these types.
struct Bytes16 {
  uint64_t lo, hi;
};

// How one tensor is cut. Byte strides and offsets, so that the copy loops need only the element size.
struct TensorJob {
  const char* src = nullptr;
  char* dst = nullptr;
  int64_t esz = 0;           // element size in bytes
  int64_t out_rows = 0;
  int64_t out_cols = 0;      // elements per output row
  int64_t src_row_bytes = 0; // stride between source rows, in bytes
  std::vector<int64_t> rows; // source row of each output row; empty = all rows in order
  std::vector<int32_t> cols; // source column of each output column; empty = all columns in order
  // Column-gather chunks (out_cols / lanes of them): the source column that starts the chunk's 128-byte
  // window, or -1 when the chunk must be gathered element by element; and the permute lane (< 2 * lanes) of
  // each output element.
  std::vector<int64_t> window;
  std::vector<uint8_t> lane;
  bool stream = false; // write with non-temporal stores (see store_chunk)
};

struct WorkItem {
  int64_t job;
  int64_t row_begin;
  int64_t row_end;
};

bool cpu_has_avx512() {
#ifdef FASTPRUNE_X86
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
  return has;
#else
  return false;
#endif
}

// Copy one index tensor (int32 or int64, any stride) into a vector, checking every value against `size`.
template <typename Out>
std::vector<Out> checked_indices(const at::Tensor& idx, int64_t size, int64_t tensor, int64_t dim) {
  const char* name = dim == 0 ? "rows" : "cols";
  TORCH_CHECK_VALUE(idx.dim() == 1, "gather_slice: ", name, " of tensor ", tensor, " must be 1-D, got ", idx.dim(),
                    "-D");
  TORCH_CHECK_TYPE(idx.scalar_type() == at::kLong || idx.scalar_type() == at::kInt, "gather_slice: ", name,
                   " of tensor ", tensor, " must be int32 or int64, got ", idx.scalar_type());
  TORCH_CHECK(idx.device().is_cpu(), "gather_slice: ", name, " of tensor ", tensor, " must be on the CPU");
  const at::Tensor c = idx.contiguous();
  const int64_t n = c.numel();
  std::vector<Out> out(n);
  auto check = [&](int64_t v, int64_t j) {
    TORCH_CHECK_INDEX(v >= 0 && v < size, "gather_slice: index ", v, " at position ", j, " of ", name,
                      " is out of range for dim ", dim, " of tensor ", tensor, " with size ", size);
    return static_cast<Out>(v);
  };
  if (c.scalar_type() == at::kLong) {
    const int64_t* p = c.data_ptr<int64_t>();
    for (int64_t j = 0; j < n; ++j) out[j] = check(p[j], j);
  } else {
    const int32_t* p = c.data_ptr<int32_t>();
    for (int64_t j = 0; j < n; ++j) out[j] = check(p[j], j);
  }
  return out;
}

// Precompute the permute windows of a column gather (see TensorJob::window).
void plan_column_windows(TensorJob& job, int64_t src_cols) {
  const int64_t lanes = kVecBytes / job.esz;
  const int64_t chunks = job.out_cols / lanes; // a partial last chunk is gathered element by element
  job.window.assign(chunks, -1);
  job.lane.assign(chunks * lanes, 0);
  if (!cpu_has_avx512() || job.esz < 2 || job.esz > 8 || src_cols < 2 * lanes) return;
  for (int64_t k = 0; k < chunks; ++k) {
    const int32_t* c = job.cols.data() + k * lanes;
    const auto [lo, hi] = std::minmax_element(c, c + lanes);
    // Keep the two loads inside the source row: start at the lowest index, or earlier near the row's end.
    const int64_t start = std::min<int64_t>(*lo, src_cols - 2 * lanes);
    if (*hi - start >= 2 * lanes) continue;
    job.window[k] = start;
    for (int64_t j = 0; j < lanes; ++j) job.lane[k * lanes + j] = static_cast<uint8_t>(c[j] - start);
  }
}

// Return a new contiguous tensor of `sizes`, asking Linux for transparent huge pages when it is large: the
// output is fresh memory, and faulting it in 4 KiB pages costs more than the copy itself.
at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor out = at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const int64_t nbytes = out.nbytes();
  if (nbytes >= 4 * kHugePageBytes) {
    const auto begin = reinterpret_cast<uintptr_t>(out.data_ptr());
    const uintptr_t first = (begin + kHugePageBytes - 1) & ~uintptr_t(kHugePageBytes - 1);
    const uintptr_t last = (begin + nbytes) & ~uintptr_t(kHugePageBytes - 1);
    if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE); // a hint: ignore errors
  }
#endif
  return out;
}

template <typename T>
void gather_elements(const char* src, char* dst, const int32_t* cols, int64_t n) {
  const T* s = reinterpret_cast<const T*>(src);
  T* d = reinterpret_cast<T*>(dst);
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    const T a = s[cols[j]], b = s[cols[j + 1]], c = s[cols[j + 2]], e = s[cols[j + 3]];
    d[j] = a;
    d[j + 1] = b;
    d[j + 2] = c;
    d[j + 3] = e;
  }
  for (; j < n; ++j) d[j] = s[cols[j]];
}

template <typename T>
void gather_row_scalar(const TensorJob& job, const char* src, char* dst) {
  gather_elements<T>(src, dst, job.cols.data(), job.out_cols);
}

#ifdef FASTPRUNE_X86
// One output chunk: two loads of the 128-byte source window and a two-source permute.
template <int64_t ESZ>
__attribute__((target("avx512f,avx512bw"))) inline __m512i permute_chunk(const char* window, const uint8_t* lane) {
  const __m512i a = _mm512_loadu_si512(window);
  const __m512i b = _mm512_loadu_si512(window + kVecBytes);
  if constexpr (ESZ == 2) {
    const __m512i idx = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(lane)));
    return _mm512_permutex2var_epi16(a, idx, b);
  } else if constexpr (ESZ == 4) {
    const __m512i idx = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(lane)));
    return _mm512_permutex2var_epi32(a, idx, b);
  } else {
    const __m512i idx = _mm512_cvtepu8_epi64(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(lane)));
    return _mm512_permutex2var_epi64(a, idx, b);
  }
}

// Non-temporal stores for outputs larger than the caches: they skip reading each destination line before
// writing it, which is a third of the memory traffic of a copy. They need 64-byte aligned destinations.
template <bool STREAM>
__attribute__((target("avx512f,avx512bw"))) inline void store_chunk(char* dst, __m512i v) {
  if constexpr (STREAM)
    _mm512_stream_si512(reinterpret_cast<__m512i*>(dst), v);
  else
    _mm512_storeu_si512(dst, v);
}

template <typename T, bool STREAM>
__attribute__((target("avx512f,avx512bw"))) void gather_row_avx512(const TensorJob& job, const char* src,
                                                                    char* dst) {
  constexpr int64_t esz = sizeof(T);
  constexpr int64_t lanes = kVecBytes / esz;
  const int64_t chunks = static_cast<int64_t>(job.window.size());
  const int64_t* window = job.window.data();
  const uint8_t* lane = job.lane.data();
  for (int64_t k = 0; k < chunks; ++k) {
    char* d = dst + k * kVecBytes;
    if (window[k] >= 0) {
      store_chunk<STREAM>(d, permute_chunk<esz>(src + window[k] * esz, lane + k * lanes));
    } else {
      gather_elements<T>(src, d, job.cols.data() + k * lanes, lanes);
    }
  }
  const int64_t done = chunks * lanes;
  gather_elements<T>(src, dst + done * esz, job.cols.data() + done, job.out_cols - done);
}

// A whole row (a multiple of 64 bytes) with non-temporal stores.
__attribute__((target("avx512f,avx512bw"))) void stream_row(const char* src, char* dst, int64_t bytes) {
  for (int64_t b = 0; b < bytes; b += kVecBytes) store_chunk<true>(dst + b, _mm512_loadu_si512(src + b));
}
#endif

// Non-temporal stores are weakly ordered: fence them before the output is handed to another thread.
void fence_streams() {
#ifdef FASTPRUNE_X86
  _mm_sfence();
#endif
}

void copy_row(const TensorJob& job, const char* src, char* dst) {
#ifdef FASTPRUNE_X86
  if (job.stream) return stream_row(src, dst, job.out_cols * job.esz);
#endif
  std::memcpy(dst, src, job.out_cols * job.esz);
}

template <typename T>
void copy_rows(const TensorJob& job, int64_t row_begin, int64_t row_end) {
  const int64_t row_bytes = job.out_cols * job.esz;
  void (*gather_row)(const TensorJob&, const char*, char*) = gather_row_scalar<T>;
#ifdef FASTPRUNE_X86
  if constexpr (sizeof(T) >= 2 && sizeof(T) <= 8) {
    if (!job.window.empty() && cpu_has_avx512())
      gather_row = job.stream ? gather_row_avx512<T, true> : gather_row_avx512<T, false>;
  }
#endif
  for (int64_t r = row_begin; r < row_end; ++r) {
    const int64_t src_row = job.rows.empty() ? r : job.rows[r];
    const char* src = job.src + src_row * job.src_row_bytes;
    char* dst = job.dst + r * row_bytes;
    if (!job.cols.empty()) {
      gather_row(job, src, dst);
    } else if (job.out_cols == 1) { // a 1-D tensor: one element per row
      *reinterpret_cast<T*>(dst) = *reinterpret_cast<const T*>(src);
    } else {
      copy_row(job, src, dst);
    }
  }
}

void run_item(const TensorJob& job, const WorkItem& item) {
  switch (job.esz) {
    case 1: return copy_rows<uint8_t>(job, item.row_begin, item.row_end);
    case 2: return copy_rows<uint16_t>(job, item.row_begin, item.row_end);
    case 4: return copy_rows<uint32_t>(job, item.row_begin, item.row_end);
    case 8: return copy_rows<uint64_t>(job, item.row_begin, item.row_end);
    default: return copy_rows<Bytes16>(job, item.row_begin, item.row_end);
  }
}

// Check one tensor and its indices and describe how to cut it; allocates nothing.
TensorJob plan_tensor(const at::Tensor& t, const std::optional<at::Tensor>& rows,
                      const std::optional<at::Tensor>& cols, int64_t i, at::Tensor& source) {
  TORCH_CHECK_VALUE(t.dim() == 1 || t.dim() == 2, "gather_slice: tensor ", i, " must be 1-D or 2-D, got ", t.dim(),
                    "-D");
  TORCH_CHECK(t.device().is_cpu(), "gather_slice: tensor ", i, " must be on the CPU, got ", t.device());
  TORCH_CHECK(t.layout() == at::kStrided && !t.is_quantized(), "gather_slice: tensor ", i,
              " must be a dense tensor");
  const int64_t esz = t.element_size();
  TORCH_CHECK_TYPE(esz == 1 || esz == 2 || esz == 4 || esz == 8 || esz == 16, "gather_slice: tensor ", i,
                   " has an unsupported dtype ", t.scalar_type());
  TORCH_CHECK_VALUE(!cols.has_value() || t.dim() == 2, "gather_slice: tensor ", i,
                    " is 1-D and cannot take column indices");
  TensorJob job;
  job.esz = esz;
  const int64_t src_rows = t.size(0);
  const int64_t src_cols = t.dim() == 2 ? t.size(1) : 1;
  if (rows.has_value()) job.rows = checked_indices<int64_t>(*rows, src_rows, i, 0);
  if (cols.has_value()) {
    TORCH_CHECK_VALUE(src_cols <= INT32_MAX, "gather_slice: tensor ", i, " is too wide for column indices");
    job.cols = checked_indices<int32_t>(*cols, src_cols, i, 1);
  }
  job.out_rows = rows.has_value() ? static_cast<int64_t>(job.rows.size()) : src_rows;
  job.out_cols = cols.has_value() ? static_cast<int64_t>(job.cols.size()) : src_cols;
  // Rows may be strided (a 1-D tensor's elements too), but the elements of a row must be adjacent.
  source = (t.dim() == 2 && t.stride(1) != 1 && src_cols > 1) ? t.contiguous() : t;
  job.src_row_bytes = source.stride(0) * esz;
  if (!job.cols.empty()) plan_column_windows(job, src_cols);
  return job;
}

// Every tensor of one call, checked and planned; `sources` keeps contiguous copies alive during the pass.
struct Call {
  std::vector<TensorJob> jobs;
  std::vector<at::Tensor> sources;
};

Call plan_call(at::TensorList tensors, const c10::List<std::optional<at::Tensor>>& rows,
               const c10::List<std::optional<at::Tensor>>& cols) {
  const int64_t n = static_cast<int64_t>(tensors.size());
  TORCH_CHECK_VALUE(static_cast<int64_t>(rows.size()) == n && static_cast<int64_t>(cols.size()) == n,
                    "gather_slice: got ", n, " tensors but ", rows.size(), " row and ", cols.size(),
                    " column entries (one each per tensor)");
  Call call;
  call.sources.resize(n);
  call.jobs.reserve(n);
  for (int64_t i = 0; i < n; ++i)
    call.jobs.push_back(plan_tensor(tensors[i], rows.get(i), cols.get(i), i, call.sources[i]));
  return call;
}

std::vector<int64_t> output_sizes(const at::Tensor& t, const TensorJob& job) {
  if (t.dim() == 2) return {job.out_rows, job.out_cols};
  return {job.out_rows};
}

// Write every tensor's output in one parallel pass over work items of about kItemBytes each.
void run_call(Call& call, const std::vector<at::Tensor>& outputs) {
  std::vector<WorkItem> items;
  int64_t total_bytes = 0;
  for (int64_t i = 0; i < static_cast<int64_t>(call.jobs.size()); ++i) {
    TensorJob& job = call.jobs[i];
    job.src = static_cast<const char*>(call.sources[i].data_ptr());
    job.dst = static_cast<char*>(outputs[i].data_ptr());
    const int64_t row_bytes = job.out_cols * job.esz;
    if (row_bytes == 0 || job.out_rows == 0) continue;
    total_bytes += job.out_rows * row_bytes;
    job.stream = cpu_has_avx512() && job.out_rows * row_bytes >= kStreamBytes && row_bytes % kVecBytes == 0 &&
                 reinterpret_cast<uintptr_t>(job.dst) % kVecBytes == 0;
    const int64_t rows_per_item = std::max<int64_t>(1, kItemBytes / row_bytes);
    for (int64_t r = 0; r < job.out_rows; r += rows_per_item)
      items.push_back({i, r, std::min(job.out_rows, r + rows_per_item)});
  }
  const int64_t n_items = static_cast<int64_t>(items.size());
  const int64_t grain = total_bytes < kSerialBytes ? n_items + 1 : 1; // parallel_for runs ranges < grain inline
  at::parallel_for(0, n_items, grain, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) run_item(call.jobs[items[k].job], items[k]);
    fence_streams();
  });
}

std::vector<at::Tensor> gather_slice_cpu(at::TensorList tensors, c10::List<std::optional<at::Tensor>> rows,
                                         c10::List<std::optional<at::Tensor>> cols) {
  Call call = plan_call(tensors, rows, cols);
  std::vector<at::Tensor> outputs;
  for (size_t i = 0; i < tensors.size(); ++i)
    outputs.push_back(new_output(output_sizes(tensors[i], call.jobs[i]), tensors[i].options()));
  run_call(call, outputs);
  return outputs;
}

void gather_slice_out_cpu(at::TensorList tensors, c10::List<std::optional<at::Tensor>> rows,
                          c10::List<std::optional<at::Tensor>> cols, at::TensorList out) {
  Call call = plan_call(tensors, rows, cols);
  TORCH_CHECK_VALUE(out.size() == tensors.size(), "gather_slice: got ", tensors.size(), " tensors but ", out.size(),
                    " outputs");
  std::vector<at::Tensor> outputs(out.begin(), out.end());
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& o = outputs[i];
    const std::vector<int64_t> sizes = output_sizes(tensors[i], call.jobs[i]);
    TORCH_CHECK_VALUE(o.sizes() == at::IntArrayRef(sizes), "gather_slice: output ", i, " has shape ", o.sizes(),
                      ", expected ", at::IntArrayRef(sizes));
    TORCH_CHECK_TYPE(o.scalar_type() == tensors[i].scalar_type(), "gather_slice: output ", i, " has dtype ",
                     o.scalar_type(), ", expected ", tensors[i].scalar_type());
    TORCH_CHECK(o.device().is_cpu() && o.is_contiguous(), "gather_slice: output ", i,
                " must be a contiguous CPU tensor");
    // Writing while reading the same memory would corrupt the result, not the process; refuse it anyway.
    for (size_t j = 0; j < tensors.size(); ++j) at::assert_no_overlap(o, tensors[j]);
    for (size_t j = 0; j < i; ++j) at::assert_no_overlap(o, outputs[j]);
  }
  run_call(call, outputs);
}

} // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {}

TORCH_LIBRARY_FRAGMENT(fastprune_cpu, m) {
  m.def("gather_slice(Tensor[] tensors, Tensor?[] rows, Tensor?[] cols) -> Tensor[]");
  m.def("gather_slice_out(Tensor[] tensors, Tensor?[] rows, Tensor?[] cols, Tensor(a!)[] out) -> ()");
}

TORCH_LIBRARY_IMPL(fastprune_cpu, CPU, m) {
  m.impl("gather_slice", &gather_slice_cpu);
  m.impl("gather_slice_out", &gather_slice_out_cpu);
}
