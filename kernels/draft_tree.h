// Step 1 of a decode step: fill the draft tree from the adjacency matrix.
// tokens[b, 0] = roots[b]; tokens[b, i] = matrix[tokens[b, parents[i]], ranks[i]].
#pragma once

#include <cstdint>

#include "status.h"

namespace token_recycling::kernels {

// matrix: [vocab, k] row-major (row stride k); roots: [batch]; parents, ranks: [num_nodes];
// tokens: [batch, num_nodes] row-major output.
template <typename MatrixT>
Status build_draft_tree(const MatrixT* matrix, int64_t vocab, int64_t k, const int64_t* roots, int64_t batch,
                        const int32_t* parents, const int32_t* ranks, int64_t num_nodes, int64_t* tokens) {
  Status s = CheckSizes({{"vocab", vocab}, {"k", k}, {"batch", batch}});
  if (!s.ok) return s;
  s = CheckTreeParents(parents, num_nodes, nullptr, nullptr);
  if (!s.ok) return s;
  for (int64_t i = 1; i < num_nodes; ++i) {
    if (ranks[i] < 0 || ranks[i] >= k) return OutOfRange("ranks", i, ranks[i], 0, k);
  }
  for (int64_t b = 0; b < batch; ++b) {
    if (roots[b] < 0 || roots[b] >= vocab) return OutOfRange("roots", b, roots[b], 0, vocab);
  }
  for (int64_t b = 0; b < batch; ++b) {
    int64_t* row = tokens + b * num_nodes;
    row[0] = roots[b];
    for (int64_t i = 1; i < num_nodes; ++i) {
      // The parent's token was checked when it was written, so the row index is in range.
      const int64_t next = static_cast<int64_t>(matrix[row[parents[i]] * k + ranks[i]]);
      if (next < 0 || next >= vocab) {
        return OutOfRange("matrix entry", row[parents[i]] * k + ranks[i], next, 0, vocab);
      }
      row[i] = next;
    }
  }
  return Status::Ok();
}

}  // namespace token_recycling::kernels
