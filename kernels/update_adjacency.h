// Step 5 (recycle): every forwarded token's row of the adjacency matrix takes the model's top-k
// predictions at that position. Duplicate tokens: the last occurrence in row-major (b, n) order wins.
#pragma once

#include <cstdint>

#include "status.h"

namespace token_recycling::kernels {

// matrix: [vocab, k] row-major; tokens: [count] (batch * num_nodes, row-major);
// candidates: [count, k] row-major. All values are checked before anything is written.
template <typename MatrixT, typename CandT>
Status update_adjacency(MatrixT* matrix, int64_t vocab, int64_t k, const int64_t* tokens,
                        const CandT* candidates, int64_t count) {
  Status s = CheckSizes({{"vocab", vocab}, {"k", k}, {"count", count}});
  if (!s.ok) return s;
  for (int64_t i = 0; i < count; ++i) {
    if (tokens[i] < 0 || tokens[i] >= vocab) return OutOfRange("tokens", i, tokens[i], 0, vocab);
  }
  for (int64_t i = 0; i < count * k; ++i) {
    const int64_t c = static_cast<int64_t>(candidates[i]);
    if (c < 0 || c >= vocab) return OutOfRange("candidates", i, c, 0, vocab);
  }
  // Sequential writes in (b, n) order: the last occurrence of a token is the one that stays.
  for (int64_t i = 0; i < count; ++i) {
    MatrixT* row = matrix + tokens[i] * k;
    const CandT* cand = candidates + i * k;
    for (int64_t j = 0; j < k; ++j) row[j] = static_cast<MatrixT>(cand[j]);
  }
  return Status::Ok();
}

}  // namespace token_recycling::kernels
