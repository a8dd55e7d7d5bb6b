#include "../kernels/draft_tree.h"

#include "checks.h"
#include "ops.h"

namespace token_recycling {

// Shared by the CPU and CUDA adapters.
void check_build_draft_tree_inputs(const at::Tensor& matrix, const at::Tensor& roots, const at::Tensor& parents,
                                   const at::Tensor& ranks) {
  constexpr const char* op = "build_draft_tree";
  check_dtype(matrix, {at::kInt, at::kLong}, op, "matrix");
  check_dtype(roots, {at::kLong}, op, "roots");
  check_dtype(parents, {at::kInt}, op, "parents");
  check_dtype(ranks, {at::kInt}, op, "ranks");
  check_dim(matrix, 2, op, "matrix");
  check_dim(roots, 1, op, "roots");
  check_dim(parents, 1, op, "parents");
  check_dim(ranks, 1, op, "ranks");
  check_size(ranks, 0, parents.size(0), op, "ranks", "one rank per tree node, like parents");
  TORCH_CHECK_VALUE(matrix.size(1) > 0, op, ": matrix has k = 0 columns");
  for (const at::Tensor* t : {&roots, &parents, &ranks}) check_device(*t, matrix.device(), op, "roots/parents/ranks");
}

at::Tensor build_draft_tree_cpu(const at::Tensor& matrix, const at::Tensor& roots, const at::Tensor& parents,
                                const at::Tensor& ranks) {
  constexpr const char* op = "build_draft_tree";
  check_build_draft_tree_inputs(matrix, roots, parents, ranks);
  const auto m = matrix.contiguous();
  const auto r = roots.contiguous(), p = parents.contiguous(), rk = ranks.contiguous();
  auto tokens = at::empty({roots.size(0), parents.size(0)}, roots.options());
  kernels::Status s;
  if (m.scalar_type() == at::kInt) {
    s = kernels::build_draft_tree(m.data_ptr<int32_t>(), m.size(0), m.size(1), r.data_ptr<int64_t>(), r.size(0),
                                  p.data_ptr<int32_t>(), rk.data_ptr<int32_t>(), p.size(0), tokens.data_ptr<int64_t>());
  } else {
    s = kernels::build_draft_tree(m.data_ptr<int64_t>(), m.size(0), m.size(1), r.data_ptr<int64_t>(), r.size(0),
                                  p.data_ptr<int32_t>(), rk.data_ptr<int32_t>(), p.size(0), tokens.data_ptr<int64_t>());
  }
  throw_if_error(s, op);
  return tokens;
}

}  // namespace token_recycling
