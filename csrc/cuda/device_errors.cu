// The CUDA side of deferred device-error checks (../device_errors.h): turning deferral on allocates
// the device's accumulated record (once; its address never changes, so CUDA graphs that captured ops
// keep reporting into it), take() copies it out and clears it on the current stream (no wait), and
// describe() gives the reporting op's own message for a host copy.
#include <cstring>

#include "../device_errors.h"
#include "launch.h"

namespace token_recycling {

namespace {

static_assert(sizeof(kc::DeviceError) == kDeviceErrorWords * sizeof(int64_t), "record layout");

int checked_index(const c10::Device& device, const char* op) {
  TORCH_CHECK_VALUE(device.is_cuda(), op, ": expected a CUDA device, got ", device);
  const int i = device.has_index() ? device.index() : c10::cuda::current_device();
  TORCH_CHECK_VALUE(i >= 0 && i < DeferredErrors::kMaxDevices, op, ": device index ", i, " out of range");
  return i;
}

struct CudaDeferredErrors final : DeferredErrorBackend {
  bool set_deferred(const c10::Device& device, bool enable) override {
    const int i = checked_index(device, "set_deferred_device_errors");
    DeferredErrors& d = deferred_errors();
    const std::lock_guard<std::mutex> lock(d.mutex);
    if (enable && !d.accumulated[i].defined()) {
      const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(i));
      d.accumulated[i] = at::zeros({static_cast<int64_t>(sizeof(kc::DeviceError))},
                                   at::TensorOptions().dtype(at::kByte).device(at::kCUDA, i));
    }
    return d.on[i].exchange(enable);
  }

  at::Tensor take(const c10::Device& device) override {
    const int i = checked_index(device, "take_device_errors");
    DeferredErrors& d = deferred_errors();
    const std::lock_guard<std::mutex> lock(d.mutex);
    const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(i));
    if (!d.accumulated[i].defined()) {
      return at::zeros({kDeviceErrorWords}, at::TensorOptions().dtype(at::kLong).device(at::kCUDA, i));
    }
    at::Tensor out = d.accumulated[i].view(at::kLong).clone();
    d.accumulated[i].zero_();
    return out;
  }

  std::string describe(const int64_t* record) override {
    kc::DeviceError e{};
    std::memcpy(&e, record, sizeof(e));
    if (e.code == 0) return "";
    DeferredErrors& d = deferred_errors();
    std::pair<std::string, DescribeError> entry;
    {
      const std::lock_guard<std::mutex> lock(d.mutex);
      if (e.op < 1 || static_cast<size_t>(e.op) > d.ops.size()) return "";
      entry = d.ops[static_cast<size_t>(e.op) - 1];
    }
    return entry.first + ": " + entry.second(e).message;
  }
};

[[maybe_unused]] const bool registered = [] {
  static CudaDeferredErrors instance;
  register_deferred_error_backend(&instance);
  return true;
}();

}  // namespace

}  // namespace token_recycling
