// Device memory for the CUDA checks and benchmarks (host memory under the host emulation).
#pragma once

#include <cstdio>
#include <cstdlib>
#include <vector>

#include "../../kernels/cuda/device.cuh"

namespace bench {

inline void cuda_ok(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "CUDA error in %s: %s\n", what, cudaGetErrorString(e));
    std::exit(3);
  }
}

template <typename T>
class DeviceBuffer {
 public:
  explicit DeviceBuffer(size_t n) : n_(n) { cuda_ok(cudaMalloc(reinterpret_cast<void**>(&ptr_), bytes()), "cudaMalloc"); }
  explicit DeviceBuffer(const std::vector<T>& host) : DeviceBuffer(host.size()) { upload(host); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() { cudaFree(ptr_); }

  void upload(const std::vector<T>& host) {
    if (!host.empty()) cuda_ok(cudaMemcpy(ptr_, host.data(), sizeof(T) * host.size(), cudaMemcpyHostToDevice), "upload");
  }
  std::vector<T> download() const {
    std::vector<T> host(n_);
    if (n_ > 0) cuda_ok(cudaMemcpy(host.data(), ptr_, sizeof(T) * n_, cudaMemcpyDeviceToHost), "download");
    return host;
  }
  T* get() const { return ptr_; }
  size_t bytes() const { return sizeof(T) * (n_ > 0 ? n_ : 1); }

 private:
  T* ptr_ = nullptr;
  size_t n_;
};

}  // namespace bench
