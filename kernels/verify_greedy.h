// Step 3: find the longest draft path that equals the model's own greedy choices.
// A node matches when every node on its root path (root excluded) has
// tokens[node] == predictions[parent(node)]. The accepted path ends at the deepest matching node
// (ties: the smallest node index); the bonus token is the prediction at that node.
#pragma once

#include <cstdint>
#include <vector>

#include "status.h"

namespace token_recycling::kernels {

// tokens, predictions: [batch, num_nodes]; parents: [num_nodes] shared by all rows, or
// [batch, num_nodes] when parents_batch_stride == num_nodes (0 means shared).
// Outputs: accept_len [batch]; accepted_nodes [batch, path_width] (padded with -1), bonus [batch].
// path_width must be at least the tree's max depth + 1. Every tree is checked before anything is
// written (a shared tree even when batch == 0, as the CUDA kernel does).
inline Status verify_greedy(const int64_t* tokens, const int64_t* predictions, const int32_t* parents,
                            int64_t parents_batch_stride, int64_t batch, int64_t num_nodes, int64_t path_width,
                            int64_t* accept_len, int64_t* accepted_nodes, int64_t* bonus) {
  Status s = CheckSizes({{"batch", batch}, {"num_nodes", num_nodes}, {"path_width", path_width}});
  if (!s.ok) return s;
  if (parents_batch_stride != 0 && parents_batch_stride != num_nodes) {
    return Status::Error("parents_batch_stride = " + std::to_string(parents_batch_stride) +
                         " must be 0 (one tree for every row) or num_nodes = " + std::to_string(num_nodes) +
                         " (one tree per row)");
  }
  std::vector<int32_t> depth(num_nodes);
  std::vector<uint8_t> match(num_nodes);
  const int64_t trees = parents_batch_stride == 0 ? 1 : batch;
  for (int64_t t = 0; t < trees; ++t) {
    int64_t max_depth = 0;
    s = CheckTreeParents(parents + t * parents_batch_stride, num_nodes, depth.data(), &max_depth);
    if (!s.ok) return s;
    if (max_depth + 1 > path_width) {
      return Status::Error("accepted_nodes has width " + std::to_string(path_width) +
                           " but the tree is " + std::to_string(max_depth) + " deep (need max_depth + 1)");
    }
  }
  for (int64_t b = 0; b < batch; ++b) {
    const int32_t* par = parents + b * parents_batch_stride;
    if (parents_batch_stride != 0) {  // this row's tree (checked above); a shared tree's depths are set
      for (int64_t i = 1; i < num_nodes; ++i) depth[i] = depth[par[i]] + 1;
    }
    const int64_t* tok = tokens + b * num_nodes;
    const int64_t* pred = predictions + b * num_nodes;
    match[0] = 1;
    int64_t best = 0;
    for (int64_t i = 1; i < num_nodes; ++i) {
      const int32_t p = par[i];
      match[i] = match[p] && tok[i] == pred[p];
      if (match[i] && depth[i] > depth[best]) best = i;
    }
    int64_t* path = accepted_nodes + b * path_width;
    const int64_t len = depth[best] + 1;
    for (int64_t j = len; j < path_width; ++j) path[j] = -1;
    for (int64_t node = best, j = len - 1; j >= 0; --j, node = par[node]) path[j] = node;
    accept_len[b] = len;
    bonus[b] = pred[best];
  }
  return Status::Ok();
}

}  // namespace token_recycling::kernels
