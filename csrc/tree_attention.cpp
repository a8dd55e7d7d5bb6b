#include "../kernels/tree_attention.h"

#include "checks.h"
#include "ops.h"

namespace token_recycling {

// Shared by the CPU and CUDA adapters of tree_attention and tree_attention_lse (op: the one called).
void check_tree_attention_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& prefix_len, const at::Tensor& tree_mask, const char* op) {
  check_dtype(q, {at::kFloat, at::kHalf, at::kBFloat16}, op, "q");
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
                   ": q, k, v must share a dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
                   v.scalar_type());
  check_dtype(prefix_len, {at::kLong}, op, "prefix_len");
  check_dtype(tree_mask, {at::kBool}, op, "tree_mask");
  check_dim(q, 4, op, "q");
  check_dim(k, 4, op, "k");
  check_dim(v, 4, op, "v");
  check_dim(prefix_len, 1, op, "prefix_len");
  check_dim(tree_mask, 2, op, "tree_mask");
  TORCH_CHECK_VALUE(k.sizes() == v.sizes(), op, ": k and v must have one shape, got ", k.sizes(), " and ",
                    v.sizes());
  const int64_t B = q.size(0), N = q.size(2), D = q.size(3);
  check_size(k, 0, B, op, "k", "batch of q");
  check_size(k, 3, D, op, "k", "head_dim of q");
  TORCH_CHECK_VALUE(k.size(1) > 0 && q.size(1) % k.size(1) == 0, op, ": q heads (", q.size(1),
                    ") must be a multiple of kv heads (", k.size(1), ")");
  check_size(prefix_len, 0, B, op, "prefix_len", "batch of q");
  TORCH_CHECK_VALUE(tree_mask.size(0) == N && tree_mask.size(1) == N, op, ": tree_mask must be [N, N] with N = ",
                    N, " (nodes in q), got ", tree_mask.sizes());
  for (const at::Tensor* t : {&k, &v, &tree_mask}) check_device(*t, q.device(), op, "k/v/tree_mask");
  // prefix_len may also stay on the CPU: the CUDA adapter then checks it without waiting for the GPU.
  TORCH_CHECK_VALUE(prefix_len.device() == q.device() || prefix_len.is_cpu(), op,
                    ": prefix_len must be on the CPU or on q's device (", q.device(), "), got ", prefix_len.device());
}

namespace {
template <typename T>
kernels::Strided4D<T> view(const at::Tensor& t) {
  return {static_cast<T*>(t.data_ptr()), t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

template <typename T>
kernels::Status run(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                    const int64_t* prefix, const uint8_t* mask, float scale, float* lse) {
  const kernels::TreeAttentionShape shape{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3)};
  return kernels::tree_attention<T>(view<const T>(q), view<const T>(k), view<const T>(v), view<T>(out), shape,
                                    prefix, mask, scale, lse);
}

void run_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& prefix_len,
             const at::Tensor& tree_mask, double scale, at::Tensor& out, float* lse, const char* op) {
  const auto p = prefix_len.contiguous();
  const auto m = tree_mask.contiguous();
  const int64_t* pp = p.data_ptr<int64_t>();
  const uint8_t* mp = reinterpret_cast<const uint8_t*>(m.data_ptr<bool>());
  const float sc = static_cast<float>(scale);
  kernels::Status s;
  switch (q.scalar_type()) {
    case at::kFloat: s = run<float>(q, k, v, out, pp, mp, sc, lse); break;
    case at::kHalf: s = run<kernels::float16>(q, k, v, out, pp, mp, sc, lse); break;
    default: s = run<kernels::bfloat16>(q, k, v, out, pp, mp, sc, lse); break;
  }
  throw_if_error(s, op);
}
}  // namespace

at::Tensor tree_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const at::Tensor& prefix_len, const at::Tensor& tree_mask, double scale) {
  check_tree_attention_inputs(q, k, v, prefix_len, tree_mask);
  auto out = at::empty(q.sizes(), q.options());
  run_cpu(q, k, v, prefix_len, tree_mask, scale, out, nullptr, "tree_attention");
  return out;
}

std::tuple<at::Tensor, at::Tensor> tree_attention_lse_cpu(const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& v, const at::Tensor& prefix_len,
                                                          const at::Tensor& tree_mask, double scale) {
  check_tree_attention_inputs(q, k, v, prefix_len, tree_mask, "tree_attention_lse");
  auto out = at::empty(q.sizes(), q.options());
  auto lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  run_cpu(q, k, v, prefix_len, tree_mask, scale, out, lse.data_ptr<float>(), "tree_attention_lse");
  return {out, lse};
}

}  // namespace token_recycling
