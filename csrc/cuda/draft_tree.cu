#include "../../kernels/cuda/draft_tree.cuh"

#include "../ops.h"
#include "launch.h"

namespace token_recycling {

at::Tensor build_draft_tree_cuda(const at::Tensor& matrix, const at::Tensor& roots, const at::Tensor& parents,
                                 const at::Tensor& ranks) {
  check_build_draft_tree_inputs(matrix, roots, parents, ranks);
  const c10::cuda::CUDAGuard guard(matrix.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto m = matrix.contiguous();
  const auto r = roots.contiguous(), p = parents.contiguous(), rk = ranks.contiguous();
  auto tokens = at::empty({roots.size(0), parents.size(0)}, roots.options());
  const auto record = device_error_record(matrix.device());
  auto run = [&](const auto* data) {
    return kc::build_draft_tree(data, m.size(0), m.size(1), r.data_ptr<int64_t>(), r.size(0), p.data_ptr<int32_t>(),
                                rk.data_ptr<int32_t>(), p.size(0), tokens.data_ptr<int64_t>(),
                                as_error_record(record), stream);
  };
  const cudaError_t e = m.scalar_type() == at::kInt ? run(m.data_ptr<int32_t>()) : run(m.data_ptr<int64_t>());
  finish_checked(e, record, stream, kc::describe_draft_tree_error, "build_draft_tree");
  return tokens;
}

}  // namespace token_recycling
