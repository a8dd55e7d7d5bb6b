#include "../../kernels/cuda/compact_kv.cuh"

#include <cstring>
#include <vector>

#include "../ops.h"
#include "launch.h"

namespace token_recycling {

namespace {
template <typename T>
cudaError_t run(at::TensorList caches, const int64_t* prefix, const int64_t* nodes, int64_t width, const int64_t* len,
                kc::DeviceError* err, cudaStream_t stream) {
  std::vector<kernels::KvTensor<T>> views;
  for (const at::Tensor& c : caches) {
    views.push_back({static_cast<T*>(c.data_ptr()), c.size(1), c.size(3), c.stride(0), c.stride(1), c.stride(2),
                     c.stride(3)});
  }
  // The views go to the GPU through pinned memory, so the copy does not wait for the stream.
  const int64_t bytes = static_cast<int64_t>(sizeof(kernels::KvTensor<T>) * views.size());
  auto host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.data_ptr(), views.data(), bytes);
  const auto device = host.to(caches[0].device(), /*non_blocking=*/true);
  return kc::compact_kv(static_cast<const kernels::KvTensor<T>*>(device.data_ptr()), views.data(),
                        static_cast<int64_t>(views.size()), caches[0].size(0), caches[0].size(2), prefix, nodes, width,
                        len, err, stream);
}
}  // namespace

void compact_kv_cuda(at::TensorList caches, const at::Tensor& prefix_len, const at::Tensor& accepted_nodes,
                     const at::Tensor& accept_len) {
  constexpr const char* op = "compact_kv";
  check_compact_kv_inputs(caches, prefix_len, accepted_nodes, accept_len);
  TORCH_CHECK_VALUE(accepted_nodes.size(1) <= kc::kCompactMaxPathWidth, op, ": accepted_nodes is ",
                    accepted_nodes.size(1), " wide; on CUDA at most ", kc::kCompactMaxPathWidth);
  const c10::cuda::CUDAGuard guard(caches[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto p = prefix_len.contiguous(), a = accepted_nodes.contiguous(), n = accept_len.contiguous();
  const int64_t* pp = p.data_ptr<int64_t>();
  const int64_t* ap = a.data_ptr<int64_t>();
  const int64_t* np = n.data_ptr<int64_t>();
  const auto record = device_error_record(caches[0].device());
  kc::DeviceError* err = as_error_record(record);
  cudaError_t e;
  // Compaction moves bytes: dispatch on element size, not on dtype.
  switch (caches[0].element_size()) {
    case 1: e = run<uint8_t>(caches, pp, ap, a.size(1), np, err, stream); break;
    case 2: e = run<uint16_t>(caches, pp, ap, a.size(1), np, err, stream); break;
    case 4: e = run<uint32_t>(caches, pp, ap, a.size(1), np, err, stream); break;
    case 8: e = run<uint64_t>(caches, pp, ap, a.size(1), np, err, stream); break;
    default: TORCH_CHECK_TYPE(false, op, ": unsupported element size ", caches[0].element_size());
  }
  finish_checked(e, record, stream, kc::describe_compact_kv_error, op);
}

}  // namespace token_recycling
