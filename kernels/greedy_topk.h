// Steps 3 and 5 (verify, recycle) read one thing from each forwarded position's logits: its top-k
// token ids. Ranked by logit, ties by the lower id, NaN above every number (torch's argmax and topk
// rank NaN first too), so ids[0] is exactly the token greedy decoding picks (torch.argmax: the first
// index of the maximum) and ids[0..k) are what recycling writes into the adjacency matrix.
// One pass per row with a sorted buffer of k: an element enters only when it beats the k-th, so the
// common case is one compare per logit (torch needs one pass for topk and another for argmax's rule).
#pragma once

#include <cmath>
#include <cstdint>
#include <string>

#include "numeric.h"
#include "status.h"

namespace token_recycling::kernels {

constexpr int64_t kGreedyTopkMaxK = 64;  // the buffer lives on the stack; k is the matrix's width (8)

// Whether (a, ia) ranks before (b, ib): NaN first, then the larger value, then the lower id.
inline bool ranks_before(float a, int64_t ia, float b, int64_t ib) {
  const bool na = std::isnan(a), nb = std::isnan(b);
  if (na != nb) return na;
  if (!na && a != b) return a > b;
  return ia < ib;
}

// logits: [rows, vocab], row r at logits + r * row_stride (elements); ids: [rows, k] row-major, written.
template <typename T>
Status greedy_topk(const T* logits, int64_t rows, int64_t vocab, int64_t row_stride, int64_t k, int64_t* ids) {
  Status s = CheckSizes({{"rows", rows}, {"vocab", vocab}, {"row_stride", row_stride}, {"k", k}});
  if (!s.ok) return s;
  if (k < 1 || k > kGreedyTopkMaxK || k > vocab) {
    return Status::Error("k = " + std::to_string(k) + " must be in [1, min(vocab = " + std::to_string(vocab) +
                         ", " + std::to_string(kGreedyTopkMaxK) + ")]");
  }
  if (rows > 1 && row_stride < vocab) {
    return Status::Error("row_stride = " + std::to_string(row_stride) + " is less than vocab = " +
                         std::to_string(vocab) + " (rows would overlap)");
  }
  float val[kGreedyTopkMaxK];
  int64_t idx[kGreedyTopkMaxK];
  for (int64_t r = 0; r < rows; ++r) {
    const T* x = logits + r * row_stride;
    int64_t filled = 0;
    auto offer = [&](int64_t i) {
      const float v = to_float(x[i]);
      if (filled == k) {
        // Not above the k-th: out (a tie loses to the k-th's lower id). NaN on either side fails
        // the compare and goes to the full rule.
        if (v <= val[k - 1] || !ranks_before(v, i, val[k - 1], idx[k - 1])) return;
      } else {
        ++filled;
      }
      int64_t j = filled - 1;  // insertion: shift worse entries down, drop the old k-th
      while (j > 0 && ranks_before(v, i, val[j - 1], idx[j - 1])) {
        val[j] = val[j - 1];
        idx[j] = idx[j - 1];
        --j;
      }
      val[j] = v;
      idx[j] = i;
    };
    int64_t i = 0;
    for (; i < vocab && filled < k; ++i) offer(i);
    // Blocks none of whose elements can enter (all <= the k-th, no NaN) are skipped after one
    // branch-free pass the compiler vectorizes; a block with a candidate is offered element by element.
    constexpr int64_t kBlock = 32;
    for (; i + kBlock <= vocab; i += kBlock) {
      const float kth = val[k - 1];
      int any = 0;
      for (int64_t j = 0; j < kBlock; ++j) any |= !(to_float(x[i + j]) <= kth);
      if (any) {
        for (int64_t j = 0; j < kBlock; ++j) offer(i + j);
      }
    }
    for (; i < vocab; ++i) offer(i);
    for (int64_t j = 0; j < k; ++j) ids[r * k + j] = idx[j];
  }
  return Status::Ok();
}

}  // namespace token_recycling::kernels
