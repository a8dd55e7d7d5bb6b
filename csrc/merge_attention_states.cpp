#include "../kernels/merge_attention_states.h"

#include "checks.h"
#include "ops.h"

namespace token_recycling {

// Shared by the CPU and CUDA adapters.
void check_merge_attention_states_inputs(const at::Tensor& out_a, const at::Tensor& lse_a, const at::Tensor& out_b,
                                         const at::Tensor& lse_b) {
  constexpr const char* op = "merge_attention_states";
  check_dtype(out_a, {at::kFloat, at::kHalf, at::kBFloat16}, op, "out_a");
  TORCH_CHECK_TYPE(out_b.scalar_type() == out_a.scalar_type(), op, ": out_a and out_b must share a dtype, got ",
                   out_a.scalar_type(), " and ", out_b.scalar_type());
  check_dtype(lse_a, {at::kFloat}, op, "lse_a");
  check_dtype(lse_b, {at::kFloat}, op, "lse_b");
  check_dim(out_a, 4, op, "out_a");
  check_dim(lse_a, 3, op, "lse_a");
  TORCH_CHECK_VALUE(out_b.sizes() == out_a.sizes(), op, ": out_a and out_b must have one shape, got ", out_a.sizes(),
                    " and ", out_b.sizes());
  TORCH_CHECK_VALUE(lse_a.sizes() == out_a.sizes().slice(0, 3), op, ": lse_a must be [B, H, N] = ",
                    out_a.sizes().slice(0, 3), ", got ", lse_a.sizes());
  TORCH_CHECK_VALUE(lse_b.sizes() == lse_a.sizes(), op, ": lse_b must be [B, H, N] = ", lse_a.sizes(), ", got ",
                    lse_b.sizes());
  for (const at::Tensor* t : {&lse_a, &out_b, &lse_b}) check_device(*t, out_a.device(), op, "lse_a/out_b/lse_b");
}

namespace {
template <typename T>
kernels::Strided4D<T> view(const at::Tensor& t) {
  return {static_cast<T*>(t.data_ptr()), t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

template <typename T>
kernels::Status run(const at::Tensor& a, const at::Tensor& la, const at::Tensor& b, const at::Tensor& lb,
                    at::Tensor& out, at::Tensor& lse) {
  const kernels::MergeShape shape{a.size(0), a.size(1), a.size(2), a.size(3)};
  return kernels::merge_attention_states<T>(view<const T>(a), la.data_ptr<float>(), view<const T>(b),
                                            lb.data_ptr<float>(), view<T>(out), lse.data_ptr<float>(), shape);
}
}  // namespace

std::tuple<at::Tensor, at::Tensor> merge_attention_states_cpu(const at::Tensor& out_a, const at::Tensor& lse_a,
                                                              const at::Tensor& out_b, const at::Tensor& lse_b) {
  check_merge_attention_states_inputs(out_a, lse_a, out_b, lse_b);
  auto out = at::empty(out_a.sizes(), out_a.options());
  auto lse = at::empty(lse_a.sizes(), lse_a.options());
  const auto la = lse_a.contiguous(), lb = lse_b.contiguous();
  kernels::Status s;
  switch (out_a.scalar_type()) {
    case at::kFloat: s = run<float>(out_a, la, out_b, lb, out, lse); break;
    case at::kHalf: s = run<kernels::float16>(out_a, la, out_b, lb, out, lse); break;
    default: s = run<kernels::bfloat16>(out_a, la, out_b, lb, out, lse); break;
  }
  throw_if_error(s, "merge_attention_states");
  return {out, lse};
}

}  // namespace token_recycling
