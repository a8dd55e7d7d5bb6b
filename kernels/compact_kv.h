// Step 4: keep the accepted path's keys and values, in path order, right after the prefix.
// For every cache tensor, row b, head h, j < accept_len[b]:
//   cache[b, h, prefix_len[b] + j, :] <- cache[b, h, prefix_len[b] + accepted_nodes[b, j], :]
// All reads of a (tensor, b, h) happen before its writes, so any permutation is safe.
#pragma once

#include <cstdint>
#include <vector>

#include "status.h"

namespace token_recycling::kernels {

// One cache tensor [batch, heads, seq, dim] with arbitrary element strides.
template <typename T>
struct KvTensor {
  T* data;
  int64_t heads, dim;
  int64_t stride_b, stride_h, stride_s, stride_d;
};

// Checks the index inputs of compact_kv against the cache length (shared by the CPU and CUDA paths).
// accepted_nodes: [batch, path_width].
inline Status CheckCompactIndices(int64_t batch, int64_t seq, const int64_t* prefix_len,
                                  const int64_t* accepted_nodes, int64_t path_width, const int64_t* accept_len) {
  Status s = CheckSizes({{"batch", batch}, {"seq", seq}, {"path_width", path_width}});
  if (!s.ok) return s;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t p = prefix_len[b], n = accept_len[b];
    if (p < 0 || p > seq) return OutOfRange("prefix_len", b, p, 0, seq + 1);
    if (n < 0 || n > path_width) return OutOfRange("accept_len", b, n, 0, path_width + 1);
    if (p + n > seq) {
      return Status::Error("prefix_len[" + std::to_string(b) + "] + accept_len[" + std::to_string(b) +
                           "] = " + std::to_string(p + n) + " exceeds the cache length " + std::to_string(seq));
    }
    for (int64_t j = 0; j < n; ++j) {
      const int64_t node = accepted_nodes[b * path_width + j];
      if (node < 0 || node >= seq - p) {  // (p + node could overflow)
        return OutOfRange("accepted_nodes", b * path_width + j, node, 0, seq - p);
      }
    }
  }
  return Status::Ok();
}

// T only needs to be copyable: callers dispatch on element size (uint16_t for fp16/bf16, ...).
template <typename T>
Status compact_kv(const KvTensor<T>* tensors, int64_t num_tensors, int64_t batch, int64_t seq,
                  const int64_t* prefix_len, const int64_t* accepted_nodes, int64_t path_width,
                  const int64_t* accept_len) {
  Status s = CheckCompactIndices(batch, seq, prefix_len, accepted_nodes, path_width, accept_len);
  if (!s.ok) return s;
  s = CheckSizes({{"num_tensors", num_tensors}});
  for (int64_t t = 0; s.ok && t < num_tensors; ++t) s = CheckSizes({{"heads", tensors[t].heads}, {"dim", tensors[t].dim}});
  if (!s.ok) return s;
  std::vector<T> staged;
  for (int64_t t = 0; t < num_tensors; ++t) {
    const KvTensor<T>& c = tensors[t];
    for (int64_t b = 0; b < batch; ++b) {
      const int64_t n = accept_len[b];
      const int64_t* nodes = accepted_nodes + b * path_width;
      if (n == 0 || c.dim == 0) continue;  // nothing moves (and an empty tensor may have no data)
      staged.resize(static_cast<size_t>(n * c.dim));
      for (int64_t h = 0; h < c.heads; ++h) {
        T* base = c.data + b * c.stride_b + h * c.stride_h + prefix_len[b] * c.stride_s;
        for (int64_t j = 0; j < n; ++j) {
          const T* src = base + nodes[j] * c.stride_s;
          for (int64_t d = 0; d < c.dim; ++d) staged[j * c.dim + d] = src[d * c.stride_d];
        }
        for (int64_t j = 0; j < n; ++j) {
          T* dst = base + j * c.stride_s;
          for (int64_t d = 0; d < c.dim; ++d) dst[d * c.stride_d] = staged[j * c.dim + d];
        }
      }
    }
  }
  return Status::Ok();
}

}  // namespace token_recycling::kernels
