#include <limits>

#include "../kernels/graft_chain.h"

#include "checks.h"
#include "ops.h"

namespace token_recycling {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> graft_chain_cpu(const at::Tensor& tree_tokens,
                                                                                       const at::Tensor& parents,
                                                                                       const at::Tensor& chain,
                                                                                       const at::Tensor& chain_len) {
  constexpr const char* op = "graft_chain";
  check_dtype(tree_tokens, {at::kLong}, op, "tree_tokens");
  check_dtype(parents, {at::kInt}, op, "parents");
  check_dtype(chain, {at::kLong}, op, "chain");
  check_dtype(chain_len, {at::kLong}, op, "chain_len");
  check_dim(tree_tokens, 2, op, "tree_tokens");
  check_dim(parents, 1, op, "parents");
  check_dim(chain, 2, op, "chain");
  check_dim(chain_len, 1, op, "chain_len");
  check_size(parents, 0, tree_tokens.size(1), op, "parents", "one parent per tree node");
  check_size(chain, 0, tree_tokens.size(0), op, "chain", "batch of tree_tokens");
  check_size(chain_len, 0, tree_tokens.size(0), op, "chain_len", "one length per row");
  for (const at::Tensor* t : {&parents, &chain, &chain_len}) {
    check_device(*t, tree_tokens.device(), op, "parents/chain/chain_len");
  }
  const int64_t B = tree_tokens.size(0), N = tree_tokens.size(1), C = chain.size(1), M = N + C;
  TORCH_CHECK_VALUE(N >= 1, op, ": the tree has no nodes (tree_tokens.size(1) = 0; node 0 is the root)");
  TORCH_CHECK_VALUE(M <= std::numeric_limits<int32_t>::max(), op, ": ", M, " nodes do not fit int32 parents");

  const auto t = tree_tokens.contiguous(), p = parents.contiguous();
  const auto c = chain.contiguous(), cl = chain_len.contiguous();
  auto tokens = at::empty({B, M}, tree_tokens.options());
  auto out_parents = at::empty({B, M}, parents.options());
  auto depths = at::empty({B, M}, tree_tokens.options());
  auto mask = at::empty({B, M, M}, tree_tokens.options().dtype(at::kBool));
  auto num_nodes = at::empty({B}, tree_tokens.options());
  throw_if_error(kernels::graft_chain(t.data_ptr<int64_t>(), p.data_ptr<int32_t>(), B, N, c.data_ptr<int64_t>(),
                                      cl.data_ptr<int64_t>(), C, tokens.data_ptr<int64_t>(),
                                      out_parents.data_ptr<int32_t>(), depths.data_ptr<int64_t>(),
                                      mask.data_ptr<bool>(), num_nodes.data_ptr<int64_t>()),
                 op);
  return {tokens, out_parents, depths, mask, num_nodes};
}

}  // namespace token_recycling
