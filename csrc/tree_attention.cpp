#include "../kernels/tree_attention.h"

#include <ATen/Parallel.h>

#include "checks.h"
#include "ops.h"

namespace token_recycling {

// Shared by the CPU and CUDA adapters of tree_attention and tree_attention_lse (op: the one called).
void check_tree_attention_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& prefix_len, const at::Tensor& tree_mask, const char* op,
                                 int64_t tree_start) {
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
  TORCH_CHECK_VALUE(k.sizes() == v.sizes(), op, ": k and v must have one shape, got ", k.sizes(), " and ",
                    v.sizes());
  const int64_t B = q.size(0), N = q.size(2), D = q.size(3);
  check_size(k, 0, B, op, "k", "batch of q");
  check_size(k, 3, D, op, "k", "head_dim of q");
  TORCH_CHECK_VALUE(k.size(1) > 0 && q.size(1) % k.size(1) == 0, op, ": q heads (", q.size(1),
                    ") must be a multiple of kv heads (", k.size(1), ")");
  check_size(prefix_len, 0, B, op, "prefix_len", "batch of q");
  // One tree for every row [N, N], or one per row [B, N, N].
  const bool per_row = tree_mask.dim() == 3;
  TORCH_CHECK_VALUE((tree_mask.dim() == 2 || per_row) && tree_mask.size(-1) == N && tree_mask.size(-2) == N &&
                        (!per_row || tree_mask.size(0) == B),
                    op, ": tree_mask must be [N, N] or [B, N, N] with N = ", N, " (nodes in q) and B = ", B,
                    ", got ", tree_mask.sizes());
  TORCH_CHECK_VALUE(tree_start >= -1, op, ": tree_start must be >= 0 (the slot of tree node 0 in every row), or -1 "
                    "(right after each row's prefix), got ", tree_start);
  TORCH_CHECK_VALUE(tree_start <= k.size(2) - N, op, ": tree_start = ", tree_start, " does not fit: the ", N,
                    " tree nodes must lie within the ", k.size(2), " keys");
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
void run(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out, const int64_t* prefix,
         const uint8_t* mask, int64_t mask_stride_b, float scale, float* lse, int64_t tree_start, const char* op) {
  const kernels::TreeAttentionShape shape{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3)};
  // The threads split the (row, kv head) pairs, each cut into node ranges where the pairs alone
  // would leave a thread idle (kernels::tree_attention_node_chunks; the same bits either way).
  const int64_t chunks =
      kernels::tree_attention_node_chunks(shape.batch * shape.kv_heads, shape.num_nodes, at::get_num_threads());
  const auto call = [&](int64_t begin, int64_t end) {
    return kernels::tree_attention<T>(view<const T>(q), view<const T>(k), view<const T>(v), view<T>(out), shape,
                                      prefix, mask, scale, lse, tree_start, mask_stride_b, begin, end,
                                      /*vectorized=*/true, chunks);
  };
  // The sizes are checked once (an empty range), then the threads split the work units.
  throw_if_error(call(0, 0), op);
  at::parallel_for(0, shape.batch * shape.kv_heads * chunks, 1, [&](int64_t begin, int64_t end) {
    const auto s = call(begin, end);
    TORCH_INTERNAL_ASSERT(s.ok, s.message);  // checked above: the ranges are inside [0, units)
  });
}

void run_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& prefix_len,
             const at::Tensor& tree_mask, double scale, int64_t tree_start, at::Tensor& out, float* lse,
             const char* op) {
  const auto p = prefix_len.contiguous();
  const auto m = tree_mask.contiguous();
  const int64_t* pp = p.data_ptr<int64_t>();
  const uint8_t* mp = reinterpret_cast<const uint8_t*>(m.data_ptr<bool>());
  const float sc = static_cast<float>(scale);
  const int64_t ms = m.dim() == 3 ? m.size(1) * m.size(2) : 0;
  switch (q.scalar_type()) {
    case at::kFloat: run<float>(q, k, v, out, pp, mp, ms, sc, lse, tree_start, op); break;
    case at::kHalf: run<kernels::float16>(q, k, v, out, pp, mp, ms, sc, lse, tree_start, op); break;
    default: run<kernels::bfloat16>(q, k, v, out, pp, mp, ms, sc, lse, tree_start, op); break;
  }
}
}  // namespace

at::Tensor tree_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const at::Tensor& prefix_len, const at::Tensor& tree_mask, double scale,
                              int64_t tree_start) {
  check_tree_attention_inputs(q, k, v, prefix_len, tree_mask, "tree_attention", tree_start);
  auto out = at::empty(q.sizes(), q.options());
  run_cpu(q, k, v, prefix_len, tree_mask, scale, tree_start, out, nullptr, "tree_attention");
  return out;
}

std::tuple<at::Tensor, at::Tensor> tree_attention_lse_cpu(const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& v, const at::Tensor& prefix_len,
                                                          const at::Tensor& tree_mask, double scale,
                                                          int64_t tree_start) {
  check_tree_attention_inputs(q, k, v, prefix_len, tree_mask, "tree_attention_lse", tree_start);
  auto out = at::empty(q.sizes(), q.options());
  auto lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  run_cpu(q, k, v, prefix_len, tree_mask, scale, tree_start, out, lse.data_ptr<float>(), "tree_attention_lse");
  return {out, lse};
}

}  // namespace token_recycling
