#include "../../kernels/cuda/verify_greedy.cuh"

#include "../ops.h"
#include "launch.h"

namespace token_recycling {

std::tuple<at::Tensor, at::Tensor, at::Tensor> verify_greedy_cuda(const at::Tensor& tokens,
                                                                  const at::Tensor& predictions,
                                                                  const at::Tensor& parents) {
  check_verify_greedy_inputs(tokens, predictions, parents);
  const c10::cuda::CUDAGuard guard(tokens.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t B = tokens.size(0), N = tokens.size(1);
  const auto t = tokens.contiguous(), pr = predictions.contiguous(), p = parents.contiguous();
  const auto state = at::empty({std::max<int64_t>(B, 1), N}, parents.options());
  auto accept_len = at::empty({B}, tokens.options());
  auto bonus = at::empty({B}, tokens.options());
  // The kernel writes paths N wide; the result is as wide as the deepest tree + 1 (known afterwards).
  auto paths = at::empty({B, N}, tokens.options());
  const auto record = device_error_record(tokens.device());
  const cudaError_t e = kc::verify_greedy(t.data_ptr<int64_t>(), pr.data_ptr<int64_t>(), p.data_ptr<int32_t>(),
                                          parents.dim() == 2 ? N : 0, B, N, state.data_ptr<int32_t>(),
                                          accept_len.data_ptr<int64_t>(), paths.data_ptr<int64_t>(),
                                          bonus.data_ptr<int64_t>(), as_error_record(record), stream);
  const std::optional<kc::DeviceError> done = finish_checked(e, record, stream, kc::describe_verify_greedy_error, "verify_greedy");
  // Deferred checks: the depth is not read back, so the result keeps all N columns (-1 past each path).
  const int64_t width = std::max<int64_t>(1, done ? done->result + 1 : N);
  auto accepted = width <= N ? paths.narrow(1, 0, width).contiguous() : at::full({B, width}, -1, tokens.options());
  return {accept_len, accepted, bonus};
}

}  // namespace token_recycling
