// gather_slice on CUDA: keep chosen rows and/or columns of several tensors in one kernel launch.
//
// The Python side allocates the outputs and a workspace and passes raw pointers; this module copies one Job
// per tensor into the workspace, launches one grid over every tensor's blocks of output rows, and checks
// every index on the device: a bad index is never read, its element is written as zero, and an IndexError is
// raised after the launch (one stream synchronisation per call).
//
// Threads run along the contiguous output row, so stores are coalesced; when a row's bytes allow it, each
// thread writes 16 bytes (several 2- or 4-byte elements), and a row gather also reads 16 bytes at a time.

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "common.cuh"

namespace py = pybind11;

namespace {

constexpr int kThreads = 256;
constexpr int64_t kBlockBytes = 64 * 1024; // output bytes per block
constexpr int kFields = 12;                // per tensor, in the order of the Python side's job lists

struct Job {
  const char* src;
  char* dst;
  const void* rows; // row indices (has_rows), may be null when there are none
  const void* cols; // column indices (has_cols)
  int64_t src_rows, src_cols, src_stride; // stride between source rows, in elements
  int64_t out_rows, out_cols;
  int64_t first_block, rows_per_block;
  int32_t esz;
  int32_t has_rows, has_cols; // 0: keep that dim whole
  int32_t rows_int64, cols_int64;
  int32_t vec; // elements per thread store: 16 / esz when rows are 16-byte aligned, else 1
  int32_t vec_src; // row gather whose source rows are 16-byte aligned: read 16 bytes at a time too
};

struct Workspace {
  int32_t bad_index; // set by the kernel when an index is out of range
  int32_t pad;
};

struct alignas(16) Bytes16 {
  uint64_t lo, hi;
};

constexpr CudaCheck check_cuda{"fastprune gather_slice"};

__device__ __forceinline__ int64_t load_index(const void* p, int32_t is64, int64_t j) {
  return is64 ? static_cast<const int64_t*>(p)[j] : static_cast<const int32_t*>(p)[j];
}

// Source row of output row r, or -1 (and the error flag) when the index is out of range.
__device__ __forceinline__ int64_t source_row(const Job& job, int64_t r, int32_t* bad) {
  if (!job.has_rows) return r;
  const int64_t s = load_index(job.rows, job.rows_int64, r);
  if (s < 0 || s >= job.src_rows) {
    atomicExch(bad, 1);
    return -1;
  }
  return s;
}

// The source columns of output group g (VEC consecutive output columns), read once and reused for every row
// of the block; -1 marks an out-of-range index (its element is written as zero).
template <int VEC>
__device__ __forceinline__ void load_group(const Job& job, int64_t g, int32_t (&col)[VEC], int32_t* bad) {
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    const int64_t j = g * VEC + k;
    int64_t c = job.has_cols ? load_index(job.cols, job.cols_int64, j) : j;
    if (c < 0 || c >= job.src_cols) {
      atomicExch(bad, 1);
      c = -1;
    }
    col[k] = static_cast<int32_t>(c); // src_cols < 2^31 (checked on the host)
  }
}

// Write output group g of one row; src_row is null when the row index is out of range.
template <typename T, int VEC>
__device__ __forceinline__ void write_group(const Job& job, const T* src_row, T* dst_row, int64_t g,
                                            const int32_t (&col)[VEC]) {
  if constexpr (VEC == 1) {
    dst_row[g] = (src_row && col[0] >= 0) ? src_row[col[0]] : T{};
  } else {
    union {
      Bytes16 packed;
      T v[VEC];
    } u;
    if (job.vec_src && src_row) {
      u.packed = reinterpret_cast<const Bytes16*>(src_row)[g];
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) u.v[k] = (src_row && col[k] >= 0) ? src_row[col[k]] : T{};
    }
    reinterpret_cast<Bytes16*>(dst_row)[g] = u.packed;
  }
}

template <typename T, int VEC>
__device__ void copy_rows(const Job& job, int64_t r0, int64_t r1, int32_t* bad) {
  const int64_t groups = job.out_cols / VEC;
  const T* src = reinterpret_cast<const T*>(job.src);
  T* dst = reinterpret_cast<T*>(job.dst);
  // Each thread owns fixed output groups and walks down the block's rows, so it reads its column indices once;
  // at each step the threads of a warp write adjacent groups of one row (coalesced stores).
  int64_t first_g = threadIdx.x, g_step = kThreads, first_r = r0, r_step = 1;
  if (groups < kThreads) {
    // Narrow rows (biases, heavily cut weights): spread the threads over several rows at once.
    r_step = kThreads / groups;
    first_r = r0 + threadIdx.x / groups;
    first_g = threadIdx.x % groups;
    g_step = groups;
    if (threadIdx.x / groups >= r_step) return;
  }
  for (int64_t g = first_g; g < groups; g += g_step) {
    int32_t col[VEC];
    load_group<VEC>(job, g, col, bad);
    for (int64_t r = first_r; r < r1; r += r_step) {
      const int64_t sr = source_row(job, r, bad);
      write_group<T, VEC>(job, sr < 0 ? nullptr : src + sr * job.src_stride, dst + r * job.out_cols, g, col);
    }
  }
}

template <typename T>
__device__ void copy_job(const Job& job, int64_t r0, int64_t r1, int32_t* bad) {
  constexpr int kVec = 16 / sizeof(T);
  if (kVec > 1 && job.vec == kVec)
    copy_rows<T, kVec>(job, r0, r1, bad);
  else
    copy_rows<T, 1>(job, r0, r1, bad);
}

__global__ void gather_slice_kernel(const Job* jobs, int n_jobs, int32_t* bad) {
  // Find this block's tensor: the last job whose first block is <= blockIdx.x (jobs are few).
  int lo = 0, hi = n_jobs - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (jobs[mid].first_block <= static_cast<int64_t>(blockIdx.x))
      lo = mid;
    else
      hi = mid - 1;
  }
  const Job job = jobs[lo];
  const int64_t r0 = (static_cast<int64_t>(blockIdx.x) - job.first_block) * job.rows_per_block;
  const int64_t r1 = min(job.out_rows, r0 + job.rows_per_block);
  switch (job.esz) {
    case 1: copy_job<uint8_t>(job, r0, r1, bad); break;
    case 2: copy_job<uint16_t>(job, r0, r1, bad); break;
    case 4: copy_job<uint32_t>(job, r0, r1, bad); break;
    case 8: copy_job<uint64_t>(job, r0, r1, bad); break;
    default: copy_job<Bytes16>(job, r0, r1, bad); break;
  }
}

bool aligned16(uintptr_t p) { return p % 16 == 0; }

Job make_job(const std::vector<int64_t>& f, size_t i) {
  if (f.size() != kFields)
    throw std::invalid_argument("fastprune gather_slice: job " + std::to_string(i) + " needs " +
                                std::to_string(kFields) + " fields");
  Job job{};
  job.src = reinterpret_cast<const char*>(static_cast<uintptr_t>(f[0]));
  job.dst = reinterpret_cast<char*>(static_cast<uintptr_t>(f[1]));
  job.rows = reinterpret_cast<const void*>(static_cast<uintptr_t>(f[2]));
  job.cols = reinterpret_cast<const void*>(static_cast<uintptr_t>(f[3]));
  const int64_t rows_code = f[4], cols_code = f[5], esz = f[6];
  job.src_rows = f[7];
  job.src_cols = f[8];
  job.src_stride = f[9];
  job.out_rows = f[10];
  job.out_cols = f[11];
  const std::string at = " (tensor " + std::to_string(i) + ")";
  if (esz != 1 && esz != 2 && esz != 4 && esz != 8 && esz != 16)
    throw std::invalid_argument("fastprune gather_slice: element size must be 1, 2, 4, 8 or 16" + at);
  if ((rows_code != 0 && rows_code != 4 && rows_code != 8) || (cols_code != 0 && cols_code != 4 && cols_code != 8))
    throw std::invalid_argument("fastprune gather_slice: index code must be 0 (none), 4 (int32) or 8 (int64)" + at);
  job.has_rows = rows_code != 0;
  job.has_cols = cols_code != 0;
  if ((!job.has_rows && job.rows) || (!job.has_cols && job.cols))
    throw std::invalid_argument("fastprune gather_slice: an index pointer without an index code" + at);
  if (job.src_rows < 0 || job.src_cols < 0 || job.src_stride < 0 || job.out_rows < 0 || job.out_cols < 0)
    throw std::invalid_argument("fastprune gather_slice: negative size or stride" + at);
  if (job.src_cols > INT32_MAX || job.out_cols > INT32_MAX)
    throw std::invalid_argument("fastprune gather_slice: more than 2^31 - 1 columns" + at);
  if ((!job.has_rows && job.out_rows != job.src_rows) || (!job.has_cols && job.out_cols != job.src_cols))
    throw std::invalid_argument("fastprune gather_slice: output size differs from an unindexed source size" + at);
  // An empty source may have a null pointer: then every index is out of range, and nothing is read.
  const bool writes = job.out_rows * job.out_cols > 0;
  if ((writes && !job.dst) || (job.src_rows * job.src_cols > 0 && !job.src) ||
      (writes && ((job.has_rows && !job.rows) || (job.has_cols && !job.cols))))
    throw std::invalid_argument("fastprune gather_slice: null pointer" + at);
  job.esz = static_cast<int32_t>(esz);
  job.rows_int64 = rows_code == 8;
  job.cols_int64 = cols_code == 8;
  const int64_t row_bytes = job.out_cols * esz;
  job.vec = (esz < 16 && row_bytes % 16 == 0 && aligned16(reinterpret_cast<uintptr_t>(job.dst))) ? 16 / esz : 1;
  job.vec_src = job.vec > 1 && !job.has_cols && aligned16(reinterpret_cast<uintptr_t>(job.src)) &&
                (job.src_stride * esz) % 16 == 0;
  job.rows_per_block = row_bytes > 0 ? std::max<int64_t>(1, kBlockBytes / row_bytes) : 1;
  return job;
}

int64_t workspace_bytes(int64_t n_jobs) {
  return static_cast<int64_t>(sizeof(Workspace) + n_jobs * sizeof(Job));
}

// jobs: per tensor [src, dst, rows, cols, rows_code, cols_code, esz, src_rows, src_cols, src_stride, out_rows,
// out_cols]; workspace: device memory of workspace_bytes(len(jobs)) bytes; stream: a cudaStream_t.
void gather_slice(const std::vector<std::vector<int64_t>>& fields, uintptr_t workspace, int64_t workspace_size,
                  int device, uintptr_t stream_handle) {
  require_gpu();
  if (fields.empty()) return;
  if (workspace == 0 || workspace_size < workspace_bytes(static_cast<int64_t>(fields.size())))
    throw std::invalid_argument("fastprune gather_slice: workspace is too small");
  std::vector<Job> jobs;
  int64_t blocks = 0;
  for (size_t i = 0; i < fields.size(); ++i) {
    Job job = make_job(fields[i], i);
    job.first_block = blocks;
    if (job.out_cols > 0) blocks += (job.out_rows + job.rows_per_block - 1) / job.rows_per_block;
    jobs.push_back(job);
  }
  if (blocks > 0x7fffffff) throw std::invalid_argument("fastprune gather_slice: too many blocks for one launch");
  check_cuda(cudaSetDevice(device), "cudaSetDevice");
  const cudaStream_t stream = as_stream(stream_handle);
  auto* ws = reinterpret_cast<Workspace*>(workspace);
  auto* dev_jobs = reinterpret_cast<Job*>(workspace + sizeof(Workspace));
  check_cuda(cudaMemsetAsync(ws, 0, sizeof(Workspace), stream), "clearing the workspace");
  // From pageable memory: the copy is staged before cudaMemcpyAsync returns, so `jobs` may go away after it.
  check_cuda(cudaMemcpyAsync(dev_jobs, jobs.data(), jobs.size() * sizeof(Job), cudaMemcpyHostToDevice, stream),
             "copying the job table");
  if (blocks > 0) {
    gather_slice_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        dev_jobs, static_cast<int>(jobs.size()), &ws->bad_index);
    check_cuda(cudaGetLastError(), "launching the kernel");
  }
  int32_t bad = 0;
  check_cuda(cudaMemcpyAsync(&bad, &ws->bad_index, sizeof(bad), cudaMemcpyDeviceToHost, stream), "reading flags");
  check_cuda(cudaStreamSynchronize(stream), "running the kernel");
  if (bad) throw py::index_error("fastprune gather_slice: an index is out of range");
}

} // namespace

PYBIND11_MODULE(FASTPRUNE_MODULE_NAME, m) {
  m.doc() = "fastprune gather_slice CUDA kernel (raw device pointers; see fastprune/ops/gather_slice.py)";
  m.def("workspace_bytes", &workspace_bytes, py::arg("n_tensors"), "Device workspace bytes for one call.");
  m.def("gather_slice", &gather_slice, py::arg("jobs"), py::arg("workspace"), py::arg("workspace_size"),
        py::arg("device"), py::arg("stream"), "Gather rows/columns of every tensor in one launch.");
}
