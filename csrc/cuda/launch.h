// What every CUDA adapter does around its kernels: the device guard and current stream, a device
// error record from torch's allocator, and one read-back that turns a kernel's report into the
// ValueError the CPU adapter raises for the same input; or, with deferred checks on for the device
// (../device_errors.h), no read-back: the record is ORed into the device's accumulated record.
#pragma once

#include <array>
#include <atomic>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

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

using DescribeError = kernels::Status (*)(const kc::DeviceError&);

// Deferred checks, per device: whether they are on, the accumulated record, and the ops that may
// report into it (op id = index + 1). Never destroyed: captured CUDA graphs keep the record's address.
struct DeferredErrors {
  static constexpr int kMaxDevices = 64;
  std::array<std::atomic<bool>, kMaxDevices> on{};
  std::array<at::Tensor, kMaxDevices> accumulated;
  std::vector<std::pair<std::string, DescribeError>> ops;
  std::mutex mutex;
};
inline DeferredErrors& deferred_errors() {
  static DeferredErrors* d = new DeferredErrors();
  return *d;
}
inline int32_t deferred_op_id(const char* op, DescribeError describe) {
  DeferredErrors& d = deferred_errors();
  const std::lock_guard<std::mutex> lock(d.mutex);
  for (size_t i = 0; i < d.ops.size(); ++i) {
    if (d.ops[i].first == op && d.ops[i].second == describe) return static_cast<int32_t>(i + 1);
  }
  d.ops.emplace_back(op, describe);
  return static_cast<int32_t>(d.ops.size());
}
// The accumulated record of `device` while its checks are deferred, else nullptr.
inline kc::DeviceError* deferred_record(const at::Device& device) {
  DeferredErrors& d = deferred_errors();
  const int i = device.index();
  if (i < 0 || i >= DeferredErrors::kMaxDevices || !d.on[i].load()) return nullptr;
  return as_error_record(d.accumulated[i]);  // allocated before `on` was set, never freed
}

// Raises RuntimeError for a CUDA error and ValueError for a kernel's report; returns the record.
// Waits for the stream: call once per op, after its last launch. With deferred checks on for the
// device, merges the record into the accumulated one instead, waits for nothing and returns nullopt
// (what the record would have carried back, such as verify_greedy's depth, is not known).
inline std::optional<kc::DeviceError> finish_checked(cudaError_t launched, const at::Tensor& record,
                                                     cudaStream_t stream, DescribeError describe, const char* op) {
  C10_CUDA_CHECK(launched);
  if (kc::DeviceError* into = deferred_record(record.device())) {
    C10_CUDA_CHECK(kc::merge_error(into, as_error_record(record), deferred_op_id(op, describe), stream));
    return std::nullopt;
  }
  kc::DeviceError host{};
  C10_CUDA_CHECK(kc::read_error(as_error_record(record), &host, stream));
  throw_if_error(describe(host), op);
  return host;
}

}  // namespace token_recycling
