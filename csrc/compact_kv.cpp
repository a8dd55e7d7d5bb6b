#include "../kernels/compact_kv.h"

#include <vector>

#include "checks.h"
#include "ops.h"

namespace token_recycling {

// Shared by the CPU and CUDA adapters: every cache tensor is [B, H, S, D] with one B, S, dtype, device.
void check_compact_kv_inputs(at::TensorList caches, const at::Tensor& prefix_len, const at::Tensor& accepted_nodes,
                             const at::Tensor& accept_len) {
  constexpr const char* op = "compact_kv";
  TORCH_CHECK_VALUE(!caches.empty(), op, ": caches is empty");
  const at::Tensor& first = caches[0];
  for (size_t i = 0; i < caches.size(); ++i) {
    const at::Tensor& c = caches[i];
    TORCH_CHECK_VALUE(c.dim() == 4, op, ": caches[", i, "] must be [B, H, S, D], got shape ", c.sizes());
    TORCH_CHECK_VALUE(c.size(0) == first.size(0) && c.size(2) == first.size(2), op, ": caches[", i,
                      "] has shape ", c.sizes(), " but caches[0] has ", first.sizes(), " (B and S must agree)");
    TORCH_CHECK_TYPE(c.scalar_type() == first.scalar_type(), op, ": caches[", i, "] is ", c.scalar_type(),
                     " but caches[0] is ", first.scalar_type());
    check_device(c, first.device(), op, "caches[i]");
  }
  check_dtype(prefix_len, {at::kLong}, op, "prefix_len");
  check_dtype(accepted_nodes, {at::kLong}, op, "accepted_nodes");
  check_dtype(accept_len, {at::kLong}, op, "accept_len");
  check_dim(prefix_len, 1, op, "prefix_len");
  check_dim(accepted_nodes, 2, op, "accepted_nodes");
  check_dim(accept_len, 1, op, "accept_len");
  const int64_t B = first.size(0);
  check_size(prefix_len, 0, B, op, "prefix_len", "batch of the caches");
  check_size(accepted_nodes, 0, B, op, "accepted_nodes", "batch of the caches");
  check_size(accept_len, 0, B, op, "accept_len", "batch of the caches");
  check_device(prefix_len, first.device(), op, "prefix_len");
  check_device(accepted_nodes, first.device(), op, "accepted_nodes");
  check_device(accept_len, first.device(), op, "accept_len");
}

namespace {
template <typename T>
kernels::Status run(at::TensorList caches, const int64_t* prefix, const int64_t* nodes, int64_t width,
                    const int64_t* len) {
  std::vector<kernels::KvTensor<T>> views;
  for (const at::Tensor& c : caches) {
    views.push_back({static_cast<T*>(c.data_ptr()), c.size(1), c.size(3), c.stride(0), c.stride(1), c.stride(2),
                     c.stride(3)});
  }
  return kernels::compact_kv(views.data(), static_cast<int64_t>(views.size()), caches[0].size(0),
                             caches[0].size(2), prefix, nodes, width, len);
}
}  // namespace

void compact_kv_cpu(at::TensorList caches, const at::Tensor& prefix_len, const at::Tensor& accepted_nodes,
                    const at::Tensor& accept_len) {
  check_compact_kv_inputs(caches, prefix_len, accepted_nodes, accept_len);
  const auto p = prefix_len.contiguous(), a = accepted_nodes.contiguous(), n = accept_len.contiguous();
  const int64_t* pp = p.data_ptr<int64_t>();
  const int64_t* ap = a.data_ptr<int64_t>();
  const int64_t* np = n.data_ptr<int64_t>();
  kernels::Status s;
  // Compaction moves bytes: dispatch on element size, not on dtype.
  switch (caches[0].element_size()) {
    case 1: s = run<uint8_t>(caches, pp, ap, a.size(1), np); break;
    case 2: s = run<uint16_t>(caches, pp, ap, a.size(1), np); break;
    case 4: s = run<uint32_t>(caches, pp, ap, a.size(1), np); break;
    case 8: s = run<uint64_t>(caches, pp, ap, a.size(1), np); break;
    default: TORCH_CHECK_TYPE(false, "compact_kv: unsupported element size ", caches[0].element_size());
  }
  throw_if_error(s, "compact_kv");
}

}  // namespace token_recycling
