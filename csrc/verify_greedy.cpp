#include "../kernels/verify_greedy.h"

#include "checks.h"
#include "ops.h"

namespace token_recycling {

// Shared by the CPU and CUDA adapters.
void check_verify_greedy_inputs(const at::Tensor& tokens, const at::Tensor& predictions, const at::Tensor& parents) {
  constexpr const char* op = "verify_greedy";
  check_dtype(tokens, {at::kLong}, op, "tokens");
  check_dtype(predictions, {at::kLong}, op, "predictions");
  check_dtype(parents, {at::kInt}, op, "parents");
  check_dim(tokens, 2, op, "tokens");
  check_dim(predictions, 2, op, "predictions");
  TORCH_CHECK_VALUE(predictions.sizes() == tokens.sizes(), op, ": predictions must have the shape of tokens ",
                    tokens.sizes(), ", got ", predictions.sizes());
  TORCH_CHECK_VALUE(parents.dim() == 1 || (parents.dim() == 2 && parents.size(0) == tokens.size(0)), op,
                    ": parents must be [N] (one tree) or [B, N] (one tree per row), got shape ", parents.sizes());
  check_size(parents, parents.dim() - 1, tokens.size(1), op, "parents", "one parent per tree node");
  check_device(predictions, tokens.device(), op, "predictions");
  check_device(parents, tokens.device(), op, "parents");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> verify_greedy_cpu(const at::Tensor& tokens,
                                                                 const at::Tensor& predictions,
                                                                 const at::Tensor& parents) {
  constexpr const char* op = "verify_greedy";
  check_verify_greedy_inputs(tokens, predictions, parents);
  const int64_t B = tokens.size(0), N = tokens.size(1);
  const auto t = tokens.contiguous(), pr = predictions.contiguous(), p = parents.contiguous();
  // The path is at most max_depth + 1 long; compute max depth over all rows' trees.
  int64_t width = 1;
  {
    const int32_t* par = p.data_ptr<int32_t>();
    std::vector<int32_t> depth(N);
    const int64_t trees = parents.dim() == 2 ? B : 1;
    for (int64_t b = 0; b < trees; ++b) {
      int64_t max_depth = 0;
      throw_if_error(kernels::CheckTreeParents(par + b * N, N, depth.data(), &max_depth), op);
      width = std::max(width, max_depth + 1);
    }
  }
  auto accept_len = at::empty({B}, tokens.options());
  auto accepted = at::empty({B, width}, tokens.options());
  auto bonus = at::empty({B}, tokens.options());
  throw_if_error(kernels::verify_greedy(t.data_ptr<int64_t>(), pr.data_ptr<int64_t>(), p.data_ptr<int32_t>(),
                                        parents.dim() == 2 ? N : 0, B, N, width, accept_len.data_ptr<int64_t>(),
                                        accepted.data_ptr<int64_t>(), bonus.data_ptr<int64_t>()),
                 op);
  return {accept_len, accepted, bonus};
}

}  // namespace token_recycling
