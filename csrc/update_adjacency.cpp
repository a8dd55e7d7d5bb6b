#include "../kernels/update_adjacency.h"

#include "checks.h"
#include "ops.h"

namespace token_recycling {

// Shared by the CPU and CUDA adapters.
void check_update_adjacency_inputs(const at::Tensor& matrix, const at::Tensor& tokens, const at::Tensor& candidates) {
  constexpr const char* op = "update_adjacency";
  check_dtype(matrix, {at::kInt, at::kLong}, op, "matrix");
  check_dtype(tokens, {at::kLong}, op, "tokens");
  check_dtype(candidates, {at::kInt, at::kLong}, op, "candidates");
  check_dim(matrix, 2, op, "matrix");
  check_dim(tokens, 2, op, "tokens");
  check_dim(candidates, 3, op, "candidates");
  check_size(candidates, 0, tokens.size(0), op, "candidates", "batch of tokens");
  check_size(candidates, 1, tokens.size(1), op, "candidates", "nodes of tokens");
  check_size(candidates, 2, matrix.size(1), op, "candidates", "k, the matrix's columns");
  TORCH_CHECK_VALUE(matrix.is_contiguous(), op, ": matrix must be contiguous (it is updated in place)");
  check_device(tokens, matrix.device(), op, "tokens");
  check_device(candidates, matrix.device(), op, "candidates");
}

void update_adjacency_cpu(at::Tensor& matrix, const at::Tensor& tokens, const at::Tensor& candidates) {
  constexpr const char* op = "update_adjacency";
  check_update_adjacency_inputs(matrix, tokens, candidates);
  const auto t = tokens.contiguous();
  const auto c = candidates.contiguous();
  const int64_t V = matrix.size(0), k = matrix.size(1);
  kernels::Status s;
  auto run = [&](auto* m) {
    if (c.scalar_type() == at::kInt) {
      s = kernels::update_adjacency(m, V, k, t.data_ptr<int64_t>(), c.data_ptr<int32_t>(), t.numel());
    } else {
      s = kernels::update_adjacency(m, V, k, t.data_ptr<int64_t>(), c.data_ptr<int64_t>(), t.numel());
    }
  };
  if (matrix.scalar_type() == at::kInt) run(matrix.data_ptr<int32_t>());
  else run(matrix.data_ptr<int64_t>());
  throw_if_error(s, op);
}

}  // namespace token_recycling
