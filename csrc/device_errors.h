// Deferred device-error checks: one host sync per decode step (docs/gpu.md, "One host sync per step").
//
// A CUDA op checks on the host what lives there (shapes, dtypes, host prefix lengths) and leaves the
// values only the GPU holds (token ids, tree order, device prefix lengths) to its kernels, which write
// a DeviceError record (kernels/cuda/device_error.cuh). By default the op reads that record back at
// once (it waits for the GPU) and raises the CPU kernel's ValueError. With deferred checks on for a
// device, its ops instead OR their record into the device's accumulated record (first error wins,
// tagged with the op) and return without waiting; the caller reads it once per step:
// take_device_errors (a device-side copy, then cleared: no wait) goes into the step's one small copy
// to the host, and raise_device_errors raises for that host copy. The CPU ops check synchronously and
// need nothing of this (for a CPU device the switch is a no-op and the record always empty).
#pragma once

#include <ATen/ATen.h>

#include <string>

namespace token_recycling {

constexpr int64_t kDeviceErrorWords = 6;  // sizeof(kernels::cuda::DeviceError) / 8: the record as int64 [6]

// The CUDA build's implementation (csrc/cuda/device_errors.cu registers it when the library loads).
struct DeferredErrorBackend {
  virtual ~DeferredErrorBackend() = default;
  virtual bool set_deferred(const c10::Device& device, bool enable) = 0;
  virtual at::Tensor take(const c10::Device& device) = 0;
  // The message of the op that reported the error in a host record, "" when it holds none.
  virtual std::string describe(const int64_t* record) = 0;
};
void register_deferred_error_backend(DeferredErrorBackend* backend);

// Turns deferral on or off for `device`; returns whether it was on.
bool set_deferred_device_errors(c10::Device device, bool enable);
// The accumulated record of `device` as int64 [6] on that device, and the record cleared (no wait).
at::Tensor take_device_errors(c10::Device device);
// Raises the reporting op's ValueError when `record` (int64 [6], a host copy) holds an error.
void raise_device_errors(const at::Tensor& record);

}  // namespace token_recycling
