#include "../../kernels/cuda/update_adjacency.cuh"

#include "../ops.h"
#include "launch.h"

namespace token_recycling {

void update_adjacency_cuda(at::Tensor& matrix, const at::Tensor& tokens, const at::Tensor& candidates) {
  constexpr const char* op = "update_adjacency";
  check_update_adjacency_inputs(matrix, tokens, candidates);
  const int64_t count = tokens.numel();
  TORCH_CHECK_VALUE(count < int64_t{0xffffffff}, op, ": at most 2^32 - 2 tokens per call on CUDA, got ", count);
  const c10::cuda::CUDAGuard guard(matrix.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto t = tokens.contiguous(), c = candidates.contiguous();
  const int64_t V = matrix.size(0), k = matrix.size(1);
  // Per vocabulary row: 1 + the last flat index that writes it (the kernel clears it).
  const auto last = at::empty({std::max<int64_t>(V, 1)}, matrix.options().dtype(at::kInt));
  const auto record = device_error_record(matrix.device());
  auto run = [&](auto* m) {
    auto* scratch = reinterpret_cast<unsigned*>(last.data_ptr<int32_t>());
    if (c.scalar_type() == at::kInt) {
      return kc::update_adjacency(m, V, k, t.data_ptr<int64_t>(), c.data_ptr<int32_t>(), count, scratch,
                                  as_error_record(record), stream);
    }
    return kc::update_adjacency(m, V, k, t.data_ptr<int64_t>(), c.data_ptr<int64_t>(), count, scratch,
                                as_error_record(record), stream);
  };
  const cudaError_t e = matrix.scalar_type() == at::kInt ? run(matrix.data_ptr<int32_t>()) : run(matrix.data_ptr<int64_t>());
  finish_checked(e, record, stream, kc::describe_update_adjacency_error, op);
}

}  // namespace token_recycling
