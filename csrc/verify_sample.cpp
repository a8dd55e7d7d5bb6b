#include "../kernels/verify_sample.h"

#include "checks.h"
#include "ops.h"

namespace token_recycling {

// Shared by the CPU and CUDA adapters.
void check_verify_sample_inputs(const at::Tensor& tokens, const at::Tensor& parents, const at::Tensor& probs,
                                const at::Tensor& uniforms) {
  constexpr const char* op = "verify_sample";
  check_dtype(tokens, {at::kLong}, op, "tokens");
  check_dtype(parents, {at::kInt}, op, "parents");
  check_dtype(probs, {at::kFloat}, op, "probs");
  check_dtype(uniforms, {at::kDouble}, op, "uniforms");
  check_dim(tokens, 2, op, "tokens");
  check_dim(probs, 3, op, "probs");
  check_dim(uniforms, 2, op, "uniforms");
  TORCH_CHECK_VALUE(parents.dim() == 1 || (parents.dim() == 2 && parents.size(0) == tokens.size(0)), op,
                    ": parents must be [N] (one tree) or [B, N] (one tree per row), got shape ", parents.sizes());
  check_size(parents, parents.dim() - 1, tokens.size(1), op, "parents", "one parent per tree node");
  TORCH_CHECK_VALUE(probs.size(0) == tokens.size(0) && probs.size(1) == tokens.size(1), op,
                    ": probs must be [B, N, V] with [B, N] the shape of tokens ", tokens.sizes(), ", got ",
                    probs.sizes());
  TORCH_CHECK_VALUE(uniforms.sizes() == tokens.sizes(), op, ": uniforms must have the shape of tokens ",
                    tokens.sizes(), ", got ", uniforms.sizes());
  TORCH_CHECK_VALUE(probs.size(2) >= 1 && probs.size(2) <= kernels::kVerifySampleMaxVocab, op,
                    ": probs.size(2) (the vocabulary) must be 1 to ", kernels::kVerifySampleMaxVocab, ", got ",
                    probs.size(2));
  check_device(parents, tokens.device(), op, "parents");
  check_device(probs, tokens.device(), op, "probs");
  check_device(uniforms, tokens.device(), op, "uniforms");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> verify_sample_cpu(const at::Tensor& tokens, const at::Tensor& parents,
                                                                 const at::Tensor& probs, const at::Tensor& uniforms) {
  constexpr const char* op = "verify_sample";
  check_verify_sample_inputs(tokens, parents, probs, uniforms);
  const int64_t B = tokens.size(0), N = tokens.size(1), V = probs.size(2);
  const auto t = tokens.contiguous(), p = parents.contiguous(), pr = probs.contiguous(), u = uniforms.contiguous();
  int64_t width = 1;  // the deepest tree + 1, over every row's tree
  {
    std::vector<int32_t> depth(N);
    for (int64_t b = 0; b < (parents.dim() == 2 ? B : 1); ++b) {
      int64_t max_depth = 0;
      throw_if_error(kernels::CheckTreeParents(p.data_ptr<int32_t>() + b * N, N, depth.data(), &max_depth), op);
      width = std::max(width, max_depth + 1);
    }
  }
  auto accept_len = at::empty({B}, tokens.options());
  auto accepted = at::empty({B, width}, tokens.options());
  auto bonus = at::empty({B}, tokens.options());
  throw_if_error(kernels::verify_sample(t.data_ptr<int64_t>(), p.data_ptr<int32_t>(), parents.dim() == 2 ? N : 0,
                                        pr.data_ptr<float>(), u.data_ptr<double>(), B, N, V, width,
                                        accept_len.data_ptr<int64_t>(), accepted.data_ptr<int64_t>(),
                                        bonus.data_ptr<int64_t>()),
                 op);
  return {accept_len, accepted, bonus};
}

}  // namespace token_recycling
