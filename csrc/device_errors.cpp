// The deferred-check ops (see device_errors.h); the CUDA part lives in cuda/device_errors.cu.
#include "device_errors.h"

#include <atomic>

namespace token_recycling {

namespace {
std::atomic<DeferredErrorBackend*> backend{nullptr};
}

void register_deferred_error_backend(DeferredErrorBackend* b) { backend.store(b); }

namespace {
// The backend for a device that is not the CPU; raises for devices without deferred checks.
DeferredErrorBackend* backend_for(const c10::Device& device, const char* op) {
  TORCH_CHECK_VALUE(device.is_cuda(), op, ": device ", device, " has no deferred checks (CPU or CUDA only)");
  DeferredErrorBackend* b = backend.load();
  TORCH_CHECK_VALUE(b != nullptr, op, ": device ", device,
                    " has no deferred checks in this build (token-recycling was built without CUDA)");
  return b;
}
}  // namespace

bool set_deferred_device_errors(c10::Device device, bool enable) {
  if (device.is_cpu()) return false;  // CPU ops raise at once: nothing to defer
  return backend_for(device, "set_deferred_device_errors")->set_deferred(device, enable);
}

at::Tensor take_device_errors(c10::Device device) {
  if (device.is_cpu()) return at::zeros({kDeviceErrorWords}, at::TensorOptions().dtype(at::kLong));
  return backend_for(device, "take_device_errors")->take(device);
}

void raise_device_errors(const at::Tensor& record) {
  constexpr const char* op = "raise_device_errors";
  TORCH_CHECK_TYPE(record.scalar_type() == at::kLong, op, ": record must be int64, got ", record.scalar_type());
  TORCH_CHECK_VALUE(record.dim() == 1 && record.size(0) == kDeviceErrorWords, op, ": record must be [",
                    kDeviceErrorWords, "] (what take_device_errors returns), got ", record.sizes());
  TORCH_CHECK_VALUE(record.is_cpu(), op, ": record must be the host copy (on the CPU), got ", record.device());
  const auto host = record.contiguous();
  const int64_t* r = host.data_ptr<int64_t>();
  if (static_cast<int32_t>(r[0] & 0xffffffff) == 0) return;  // DeviceError::code, the low half of word 0
  DeferredErrorBackend* b = backend.load();
  const std::string message = b != nullptr ? b->describe(r) : std::string();
  TORCH_CHECK_VALUE(false, message.empty() ? std::string("a device check failed (code ") +
                                                 std::to_string(static_cast<int32_t>(r[0] & 0xffffffff)) +
                                                 "; no op in this process reported it)"
                                           : message,
                    " (found by a deferred device check, read by raise_device_errors)");
}

}  // namespace token_recycling
