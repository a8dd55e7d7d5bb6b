// Step 3 under sampling: walk the draft tree with the model's own samples. Drafts are deterministic,
// so this is exact: at a node, draw the next token from the model's distribution at that node; if a
// child of the node holds that token (the smallest index when several do), move there and draw
// again; otherwise the drawn token is the bonus and the walk stops. Every emitted token is then a
// fresh sample from the target distribution given its own context, whatever the tree held.
//
// The draw is inverse-CDF sampling, made exact and order-independent so that every backend (and the
// torch reference) picks the same token: each weight becomes an integer, q[v] = ceil(p[v] / pmax *
// 2^32) for p[v] > 0 (else 0), and the token is the smallest v with q[0] + ... + q[v] > floor(u * Q),
// Q = sum of q. Integer sums do not depend on the order of addition; the division, scaling and ceil
// are exact IEEE double operations. Relative to p, q moves each token's probability by less than
// 2^-32 of the largest one (below float32's own rounding of a softmax) and never drops a token with
// p > 0 or adds one with p == 0.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "status.h"

namespace token_recycling::kernels {

// Vocabularies up to 2^20 keep Q <= 2^52: exact in a double.
constexpr int64_t kVerifySampleMaxVocab = int64_t{1} << 20;

inline uint64_t sample_weight(float p, float pmax) {
  return p > 0.0f ? static_cast<uint64_t>(std::ceil(static_cast<double>(p) / static_cast<double>(pmax) * 4294967296.0))
                  : 0;
}

// floor(u * total), kept below total (u < 1, but u * total may round up to total).
inline uint64_t sample_target(double u, uint64_t total) {
  const uint64_t t = static_cast<uint64_t>(std::floor(u * static_cast<double>(total)));
  return t < total ? t : total - 1;
}

namespace detail {
inline std::string node_name(const char* what, int64_t b, int64_t node) {
  return std::string(what) + "[" + std::to_string(b) + ", " + std::to_string(node) + "]";
}

// One draw from row p[0, vocab) with uniform u.
inline Status sample_row(const float* p, int64_t vocab, double u, int64_t b, int64_t node, int64_t draw,
                         int64_t* token) {
  if (!(u >= 0.0 && u < 1.0)) {
    return Status::Error(node_name("uniforms", b, draw) + " = " + std::to_string(u) + " is outside [0, 1)");
  }
  float pmax = 0.0f;
  for (int64_t v = 0; v < vocab; ++v) {
    if (!(p[v] >= 0.0f) || std::isinf(p[v])) {
      return Status::Error(node_name("probs", b, node) + " holds a negative or non-finite weight at token " +
                           std::to_string(v));
    }
    if (p[v] > pmax) pmax = p[v];
  }
  if (pmax == 0.0f) return Status::Error(node_name("probs", b, node) + " has no positive weight");
  uint64_t total = 0;
  for (int64_t v = 0; v < vocab; ++v) total += sample_weight(p[v], pmax);
  const uint64_t target = sample_target(u, total);
  uint64_t run = 0;
  for (int64_t v = 0; v < vocab; ++v) {
    run += sample_weight(p[v], pmax);
    if (run > target) {
      *token = v;
      return Status::Ok();
    }
  }
  *token = vocab - 1;  // unreachable: run reaches total > target
  return Status::Ok();
}
}  // namespace detail

// tokens [batch, num_nodes]; parents [num_nodes] shared (parents_batch_stride 0) or [batch, num_nodes]
// (stride num_nodes); probs [batch, num_nodes, vocab] non-negative finite weights (need not sum to 1;
// only the rows of visited nodes are read and checked); uniforms [batch, num_nodes] in [0, 1):
// uniforms[b, d] drives the walk's d-th draw (at the visited node of depth d), so the draws a row
// uses are always its first accept_len uniforms, whatever the tree: a caller that consumes exactly
// those from a seeded stream gets output that depends on the seed alone, not on the drafts.
// Outputs as verify_greedy: accept_len [batch] (root included), accepted_nodes [batch, path_width]
// padded with -1, bonus [batch] (the token drawn at the last visited node).
inline Status verify_sample(const int64_t* tokens, const int32_t* parents, int64_t parents_batch_stride,
                            const float* probs, const double* uniforms, int64_t batch, int64_t num_nodes,
                            int64_t vocab, int64_t path_width, int64_t* accept_len, int64_t* accepted_nodes,
                            int64_t* bonus) {
  if (vocab < 1 || vocab > kVerifySampleMaxVocab) {
    return Status::Error("probs has vocabulary size " + std::to_string(vocab) + ", need 1 to " +
                         std::to_string(kVerifySampleMaxVocab));
  }
  std::vector<int32_t> depth(num_nodes);
  for (int64_t b = 0; b < batch; ++b) {
    const int32_t* par = parents + b * parents_batch_stride;
    if (b == 0 || parents_batch_stride != 0) {
      int64_t max_depth = 0;
      Status s = CheckTreeParents(par, num_nodes, depth.data(), &max_depth);
      if (!s.ok) return s;
      if (max_depth + 1 > path_width) {
        return Status::Error("accepted_nodes has width " + std::to_string(path_width) +
                             " but the tree is " + std::to_string(max_depth) + " deep (need max_depth + 1)");
      }
    }
    const int64_t* tok = tokens + b * num_nodes;
    int64_t* path = accepted_nodes + b * path_width;
    int64_t node = 0, len = 0, drawn = 0;
    while (true) {
      path[len++] = node;
      Status s = detail::sample_row(probs + (b * num_nodes + node) * vocab, vocab, uniforms[b * num_nodes + len - 1],
                                    b, node, len - 1, &drawn);
      if (!s.ok) return s;
      int64_t next = -1;
      for (int64_t i = node + 1; i < num_nodes && next < 0; ++i) {
        if (par[i] == node && tok[i] == drawn) next = i;
      }
      if (next < 0) break;
      node = next;
    }
    for (int64_t j = len; j < path_width; ++j) path[j] = -1;
    accept_len[b] = len;
    bonus[b] = drawn;
  }
  return Status::Ok();
}

}  // namespace token_recycling::kernels
