// Step 2 (inside the verification forward): attention of the N tree nodes over the prefix
// (all visible) and the tree block (visible where tree_mask[i, j]). GQA: query head h reads kv head
// h / (q_heads / kv_heads). Scores, softmax and the weighted sum are computed in float.
//
// Where the tree block sits: by default right after each row's prefix, at [prefix_len[b],
// prefix_len[b] + N). With tree_start >= 0 it sits at [tree_start, tree_start + N) in every row and
// row b sees the prefix [0, prefix_len[b]) (prefix_len[b] <= tree_start; keys in between are never
// attended): a batch of rows of different lengths whose trees were appended at one cache length.
// The tree mask is one [N, N] for every row (mask_stride_b = 0) or one per row ([B, N, N],
// mask_stride_b = N * N).
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "numeric.h"
#include "status.h"

namespace token_recycling::kernels {

// A [batch, heads, len, dim] tensor view with element strides.
template <typename T>
struct Strided4D {
  T* data;
  int64_t stride_b, stride_h, stride_s, stride_d;
  T& at(int64_t b, int64_t h, int64_t s, int64_t d) const {
    return data[b * stride_b + h * stride_h + s * stride_s + d * stride_d];
  }
};

struct TreeAttentionShape {
  int64_t batch, q_heads, kv_heads, num_nodes, seq, head_dim;
};

inline Status CheckTreeAttentionShape(const TreeAttentionShape& s, const int64_t* prefix_len,
                                      int64_t tree_start = -1) {
  Status st = CheckSizes({{"batch", s.batch}, {"q_heads", s.q_heads}, {"num_nodes", s.num_nodes}, {"seq", s.seq},
                          {"head_dim", s.head_dim}});
  if (!st.ok) return st;
  if (s.kv_heads <= 0 || s.q_heads % s.kv_heads != 0) {
    return Status::Error("q_heads (" + std::to_string(s.q_heads) + ") must be a multiple of kv_heads (" +
                         std::to_string(s.kv_heads) + ")");
  }
  if (tree_start >= 0 && tree_start > s.seq - s.num_nodes) {
    return Status::Error("tree_start = " + std::to_string(tree_start) + " does not fit: need tree_start + num_nodes (" +
                         std::to_string(s.num_nodes) + ") <= kv length (" + std::to_string(s.seq) + ")");
  }
  if (tree_start < -1) return Status::Error("tree_start must be >= 0, or -1 (after each row's prefix)");
  for (int64_t b = 0; b < s.batch; ++b) {
    if (tree_start >= 0 && (prefix_len[b] < 0 || prefix_len[b] > tree_start)) {
      return Status::Error("prefix_len[" + std::to_string(b) + "] = " + std::to_string(prefix_len[b]) +
                           " does not fit: need 0 <= prefix_len <= tree_start (" + std::to_string(tree_start) + ")");
    }
    if (prefix_len[b] < 0 || prefix_len[b] > s.seq - s.num_nodes) {  // (prefix_len + num_nodes could overflow)
      return Status::Error("prefix_len[" + std::to_string(b) + "] = " + std::to_string(prefix_len[b]) +
                           " does not fit: need 0 <= prefix_len and prefix_len + num_nodes (" +
                           std::to_string(s.num_nodes) + ") <= kv length (" + std::to_string(s.seq) + ")");
    }
  }
  return Status::Ok();
}

// tree_mask: [num_nodes, num_nodes] row-major bytes (non-zero = visible), row b's at
// tree_mask + b * mask_stride_b. out: [batch, q_heads, num_nodes, head_dim]
// view. A node that sees no key at all gets a zero output. lse (optional): [batch, q_heads, num_nodes]
// contiguous, the natural log of each row's softmax denominator of the scaled scores (-inf: no key),
// what merge_attention_states.h needs to combine this with attention over other keys.
template <typename T>
Status tree_attention(const Strided4D<const T>& q, const Strided4D<const T>& k, const Strided4D<const T>& v,
                      const Strided4D<T>& out, const TreeAttentionShape& s, const int64_t* prefix_len,
                      const uint8_t* tree_mask, float scale, float* lse = nullptr, int64_t tree_start = -1,
                      int64_t mask_stride_b = 0) {
  Status st = CheckTreeAttentionShape(s, prefix_len, tree_start);
  if (!st.ok) return st;
  const int64_t group = s.q_heads / s.kv_heads;
  std::vector<float> qf(s.head_dim), acc(s.head_dim), scores;
  for (int64_t b = 0; b < s.batch; ++b) {
    const int64_t prefix = prefix_len[b];
    const int64_t tree_at = tree_start >= 0 ? tree_start : prefix;  // slot of tree node 0
    const uint8_t* mask = tree_mask + b * mask_stride_b;
    scores.resize(static_cast<size_t>(prefix + s.num_nodes));
    for (int64_t h = 0; h < s.q_heads; ++h) {
      const int64_t hk = h / group;
      for (int64_t i = 0; i < s.num_nodes; ++i) {
        for (int64_t d = 0; d < s.head_dim; ++d) qf[d] = to_float(q.at(b, h, i, d));
        float max_score = -INFINITY;
        auto score_at = [&](int64_t pos) {
          float dot = 0.f;
          for (int64_t d = 0; d < s.head_dim; ++d) dot += qf[d] * to_float(k.at(b, hk, pos, d));
          return dot * scale;
        };
        // Keys visible to node i: the whole prefix, then tree nodes j with tree_mask[i, j].
        int64_t count = 0;
        for (int64_t pos = 0; pos < prefix; ++pos) scores[count++] = score_at(pos);
        for (int64_t j = 0; j < s.num_nodes; ++j) {
          if (mask[i * s.num_nodes + j]) scores[count++] = score_at(tree_at + j);
        }
        for (int64_t c = 0; c < count; ++c) max_score = std::fmax(max_score, scores[c]);
        float denom = 0.f;
        for (int64_t c = 0; c < count; ++c) denom += (scores[c] = std::exp(scores[c] - max_score));
        for (int64_t d = 0; d < s.head_dim; ++d) acc[d] = 0.f;
        int64_t c = 0;
        auto accumulate = [&](int64_t pos) {
          const float w = scores[c++];
          for (int64_t d = 0; d < s.head_dim; ++d) acc[d] += w * to_float(v.at(b, hk, pos, d));
        };
        for (int64_t pos = 0; pos < prefix; ++pos) accumulate(pos);
        for (int64_t j = 0; j < s.num_nodes; ++j) {
          if (mask[i * s.num_nodes + j]) accumulate(tree_at + j);
        }
        const float inv = count > 0 ? 1.f / denom : 0.f;
        if (lse) lse[(b * s.q_heads + h) * s.num_nodes + i] = count > 0 ? max_score + std::log(denom) : -INFINITY;
        for (int64_t d = 0; d < s.head_dim; ++d) out.at(b, h, i, d) = from_float<T>(acc[d] * inv);
      }
    }
  }
  return Status::Ok();
}

}  // namespace token_recycling::kernels
