// CUDA helpers shared by the .cu files: error checks that become Python exceptions.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace semmim {

inline void cuda_check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("semmim._C CUDA error in ") + what + ": " +
                             cudaGetErrorString(err));
  }
}

// Fails with a clear message on machines without a GPU or driver, before any launch.
inline void cuda_require_device(const char* what) {
  int n = 0;
  const cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess || n == 0) {
    throw std::runtime_error(std::string("semmim._C: ") + what +
                             " needs a CUDA GPU, but none is usable here (" +
                             (err != cudaSuccess ? cudaGetErrorString(err) : "0 devices") + ")");
  }
}

inline cudaStream_t as_stream(std::uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

}  // namespace semmim
