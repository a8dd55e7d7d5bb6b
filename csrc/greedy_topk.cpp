#include "../kernels/greedy_topk.h"

#include "checks.h"
#include "ops.h"

namespace token_recycling {

at::Tensor greedy_topk_cpu(const at::Tensor& logits, int64_t k) {
  constexpr const char* op = "greedy_topk";
  check_dtype(logits, {at::kFloat, at::kBFloat16, at::kHalf}, op, "logits");
  TORCH_CHECK_VALUE(logits.dim() >= 1, op, ": logits must be [..., vocab], got a 0-D tensor");
  const int64_t vocab = logits.size(-1);
  TORCH_CHECK_VALUE(k >= 1 && k <= vocab && k <= kernels::kGreedyTopkMaxK, op, ": k must be in [1, min(vocab = ",
                    vocab, ", ", kernels::kGreedyTopkMaxK, ")], got ", k);
  const auto flat = logits.reshape({-1, vocab}).contiguous();  // a no-op for a forward's logits
  const int64_t rows = flat.size(0);
  auto sizes = logits.sizes().vec();
  sizes.back() = k;
  auto ids = at::empty(sizes, logits.options().dtype(at::kLong));
  int64_t* out = ids.data_ptr<int64_t>();
  kernels::Status s;
  switch (flat.scalar_type()) {
    case at::kFloat:
      s = kernels::greedy_topk(flat.data_ptr<float>(), rows, vocab, vocab, k, out);
      break;
    case at::kBFloat16:
      s = kernels::greedy_topk(reinterpret_cast<const kernels::bfloat16*>(flat.data_ptr()), rows, vocab, vocab, k, out);
      break;
    default:
      s = kernels::greedy_topk(reinterpret_cast<const kernels::float16*>(flat.data_ptr()), rows, vocab, vocab, k, out);
  }
  throw_if_error(s, op);
  return ids;
}

}  // namespace token_recycling
