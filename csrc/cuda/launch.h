// What every CUDA adapter does around its kernels: the device guard and current stream, a device
// error record from torch's allocator, and one read-back that turns a kernel's report into the
// ValueError the CPU adapter raises for the same input.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../../kernels/cuda/device_error.cuh"
#include "../checks.h"

namespace token_recycling {

namespace kc = kernels::cuda;

// Device memory for one kc::DeviceError; the kernels' launchers clear it.
inline at::Tensor device_error_record(const at::Device& device) {
  return at::empty({static_cast<int64_t>(sizeof(kc::DeviceError))}, at::TensorOptions().dtype(at::kByte).device(device));
}
inline kc::DeviceError* as_error_record(const at::Tensor& record) {
  return reinterpret_cast<kc::DeviceError*>(record.data_ptr());
}

// Raises RuntimeError for a CUDA error and ValueError for a kernel's report; returns the record.
// Waits for the stream: call once per op, after its last launch.
inline kc::DeviceError finish_checked(cudaError_t launched, const at::Tensor& record, cudaStream_t stream,
                                      kernels::Status (*describe)(const kc::DeviceError&), const char* op) {
  C10_CUDA_CHECK(launched);
  kc::DeviceError host{};
  C10_CUDA_CHECK(kc::read_error(as_error_record(record), &host, stream));
  throw_if_error(describe(host), op);
  return host;
}

}  // namespace token_recycling
