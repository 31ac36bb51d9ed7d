// What the CUDA modules share: CUDA error checks, the error raised without a GPU, the device guard, the stream
// handle passed from Python, and fp32 values of the three weight dtypes.
//
// Everything here has internal linkage: each module keeps its own copy, as it would if the code stood in its
// .cu file.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace {

// check_cuda(err, what) throws std::runtime_error("<prefix>: <what>: <CUDA's message>") unless err is
// cudaSuccess. Each module defines one with its own prefix.
struct CudaCheck {
  const char* prefix;

  void operator()(cudaError_t err, const char* what) const {
    if (err != cudaSuccess)
      throw std::runtime_error(std::string(prefix) + ": " + what + ": " + cudaGetErrorString(err));
  }
};

void require_gpu() {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess || count == 0) {
    cudaGetLastError();  // clear the sticky error of a failed query
    throw std::runtime_error(std::string("fastprune: no CUDA GPU is available (") +
                             (err != cudaSuccess ? cudaGetErrorString(err) : "no device") +
                             "); use CPU tensors or the PyTorch reference");
  }
}

// Makes `device` current for the launch and restores the caller's device afterwards.
class DeviceGuard {
 public:
  DeviceGuard(int device, const CudaCheck& check_cuda) {
    check_cuda(cudaGetDevice(&previous_), "cudaGetDevice");
    check_cuda(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceGuard() { cudaSetDevice(previous_); }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

// The cudaStream_t that Python passes as an integer (torch.cuda.current_stream().cuda_stream).
inline cudaStream_t as_stream(uintptr_t handle) { return reinterpret_cast<cudaStream_t>(handle); }

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }

}  // namespace
