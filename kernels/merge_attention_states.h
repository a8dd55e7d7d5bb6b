// Merges two partial attentions of the same queries over disjoint key sets (e.g. the prefix and the
// tree block) by their log-sum-exps: with m = max(lse_a, lse_b), w_x = exp(lse_x - m),
//   out = (w_a * out_a + w_b * out_b) / (w_a + w_b),   lse = m + log(w_a + w_b).
// lse is the natural log of the softmax denominator of the scaled scores; -inf means "saw no key"
// (its output is ignored; when both are -inf the row's output is zero and its lse -inf).
#pragma once

#include <cmath>
#include <cstdint>

#include "numeric.h"
#include "status.h"
#include "tree_attention.h"  // Strided4D

namespace token_recycling::kernels {

struct MergeShape {
  int64_t batch, heads, rows, head_dim;
};

// The weights of a and b for one row, and the merged lse.
inline void merge_weights(float lse_a, float lse_b, float* w_a, float* w_b, float* lse) {
  const float m = std::fmax(lse_a, lse_b);
  if (m == -INFINITY || std::isnan(m)) {
    *w_a = *w_b = 0.f;
    *lse = m;
    return;
  }
  const float ea = std::exp(lse_a - m), eb = std::exp(lse_b - m), s = ea + eb;
  *w_a = ea / s;
  *w_b = eb / s;
  *lse = m + std::log(s);
}

// lse_a, lse_b, lse_out: [batch, heads, rows] contiguous float; outputs as strided views.
template <typename T>
Status merge_attention_states(const Strided4D<const T>& a, const float* lse_a, const Strided4D<const T>& b,
                              const float* lse_b, const Strided4D<T>& out, float* lse_out, const MergeShape& s) {
  for (int64_t x = 0; x < s.batch; ++x) {
    for (int64_t h = 0; h < s.heads; ++h) {
      for (int64_t r = 0; r < s.rows; ++r) {
        const int64_t row = (x * s.heads + h) * s.rows + r;
        float wa, wb, lse;
        merge_weights(lse_a[row], lse_b[row], &wa, &wb, &lse);
        lse_out[row] = lse;
        for (int64_t d = 0; d < s.head_dim; ++d) {
          const float va = wa == 0.f ? 0.f : wa * to_float(a.at(x, h, r, d));
          const float vb = wb == 0.f ? 0.f : wb * to_float(b.at(x, h, r, d));
          out.at(x, h, r, d) = from_float<T>(va + vb);
        }
      }
    }
  }
  return Status::Ok();
}

}  // namespace token_recycling::kernels
