// Step 2 (inside the verification forward): attention of the N tree nodes over the prefix
// (all visible) and the tree block (visible where tree_mask[i, j]). GQA: query head h reads kv head
// h / (q_heads / kv_heads). Scores, softmax and the weighted sum are computed in float.
//
// Two implementations. The portable loop below is the reference (and the CUDA kernel's). On an x86-64
// CPU with AVX2/FMA, float32 and bfloat16 inputs whose head_dim is a multiple of 8 and whose elements
// are contiguous along head_dim take a vectorized path instead (tree_attention_detail): four keys'
// dot products at a time, the exponentials eight at a time (simd::exp8_nonpositive, ~2 ulp), the
// weighted sum of values with head_dim in registers. It sums in a different order, so it matches the
// reference to float rounding, not bit for bit. Each call covers the work units [pair_begin, pair_end)
// of batch * kv_heads * node_chunks, so a caller can split the work between threads: unit u is the
// (row, kv-head) pair p = u / node_chunks (p = b * kv_heads + hk) over the nodes of its node range
// u % node_chunks (node_chunks = 1, the default: the units are the pairs). A node's output does not
// depend on the range it is computed in, so any split gives the same bits; splitting the nodes lets
// more threads than batch * kv_heads work (a small GQA model has 3 kv heads).
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
#include <type_traits>
#include <vector>

#include "numeric.h"
#include "simd.h"
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

namespace tree_attention_detail {

// The visible keys of node i: the whole prefix [0, prefix), then tree slot tree_at + j where mask[i, j].
inline int64_t tree_slots(const uint8_t* mask, int64_t n, int64_t i, int64_t tree_at, int64_t* slots) {
  int64_t m = 0;
  for (int64_t j = 0; j < n; ++j)
    if (mask[i * n + j]) slots[m++] = tree_at + j;
  return m;
}

// The reference: one query row at a time, in the order the scores are written.
template <typename T>
void pair_scalar(const Strided4D<const T>& q, const Strided4D<const T>& k, const Strided4D<const T>& v,
                 const Strided4D<T>& out, const TreeAttentionShape& s, int64_t b, int64_t hk, int64_t prefix,
                 int64_t tree_at, const uint8_t* mask, float scale, float* lse, int64_t i0, int64_t i1) {
  const int64_t group = s.q_heads / s.kv_heads;
  std::vector<float> qf(s.head_dim), acc(s.head_dim), scores(static_cast<size_t>(prefix + s.num_nodes));
  std::vector<int64_t> slots(s.num_nodes);
  for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
    for (int64_t i = i0; i < i1; ++i) {
      for (int64_t d = 0; d < s.head_dim; ++d) qf[d] = to_float(q.at(b, h, i, d));
      const int64_t visible_tree = tree_slots(mask, s.num_nodes, i, tree_at, slots.data());
      auto key_at = [&](int64_t c) { return c < prefix ? c : slots[c - prefix]; };
      const int64_t count = prefix + visible_tree;
      float max_score = -INFINITY;
      for (int64_t c = 0; c < count; ++c) {
        float dot = 0.f;
        for (int64_t d = 0; d < s.head_dim; ++d) dot += qf[d] * to_float(k.at(b, hk, key_at(c), d));
        scores[c] = dot * scale;
        max_score = std::fmax(max_score, scores[c]);
      }
      float denom = 0.f;
      for (int64_t c = 0; c < count; ++c) denom += (scores[c] = std::exp(scores[c] - max_score));
      for (int64_t d = 0; d < s.head_dim; ++d) acc[d] = 0.f;
      for (int64_t c = 0; c < count; ++c)
        for (int64_t d = 0; d < s.head_dim; ++d) acc[d] += scores[c] * to_float(v.at(b, hk, key_at(c), d));
      const float inv = count > 0 ? 1.f / denom : 0.f;
      if (lse) lse[(b * s.q_heads + h) * s.num_nodes + i] = count > 0 ? max_score + std::log(denom) : -INFINITY;
      for (int64_t d = 0; d < s.head_dim; ++d) out.at(b, h, i, d) = from_float<T>(acc[d] * inv);
    }
  }
}

#ifdef TOKEN_RECYCLING_AVX2
// The four dot products whose eight-lane partial sums are a0..a3, as one 128-bit vector.
__attribute__((target("avx2,fma"))) inline __m128 reduce4(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
  // hadd(hadd(a0, a1), hadd(a2, a3)) holds each key's two half-sums in the two 128-bit lanes.
  const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}

// One query row (float, head_dim D a multiple of 8) against one key.
template <typename T>
__attribute__((target("avx2,fma"))) inline float dot_avx2(const float* qf, const T* key, int64_t D) {
  __m256 a = _mm256_setzero_ps();
  for (int64_t d = 0; d < D; d += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(qf + d), simd::load8(key + d), a);
  return simd::hsum(a);
}

// Scores of RB query rows (float, head_dim D a multiple of 8, row stride D) against the prefix keys
// [0, prefix), times scale, into scores[r * ld + c]: per eight dimensions, four keys and RB rows are
// loaded once for 4 * RB FMAs (a small matrix product, the keys shared by every row of the kv head).
template <int RB, typename T>
__attribute__((target("avx2,fma"))) inline void prefix_scores_avx2(const float* qf, int64_t D, const T* k,
                                                                   int64_t k_stride, int64_t prefix, float scale,
                                                                   float* scores, int64_t ld) {
  int64_t c = 0;
  for (; c + 4 <= prefix; c += 4) {
    __m256 acc[RB][4];
    for (int r = 0; r < RB; ++r)
      for (int j = 0; j < 4; ++j) acc[r][j] = _mm256_setzero_ps();
    const T* kc = k + c * k_stride;
    for (int64_t d = 0; d < D; d += 8) {
      __m256 qv[RB];
      for (int r = 0; r < RB; ++r) qv[r] = _mm256_loadu_ps(qf + r * D + d);
      for (int j = 0; j < 4; ++j) {
        const __m256 kv = simd::load8(kc + j * k_stride + d);
        for (int r = 0; r < RB; ++r) acc[r][j] = _mm256_fmadd_ps(qv[r], kv, acc[r][j]);
      }
    }
    for (int r = 0; r < RB; ++r)
      _mm_storeu_ps(scores + r * ld + c,
                    _mm_mul_ps(reduce4(acc[r][0], acc[r][1], acc[r][2], acc[r][3]), _mm_set1_ps(scale)));
  }
  for (; c < prefix; ++c) {
    const T* kc = k + c * k_stride;
    for (int r = 0; r < RB; ++r) scores[r * ld + c] = dot_avx2(qf + r * D, kc, D) * scale;
  }
}

// out[r, d0 + 8 j] += sum over c in [0, prefix) of w[r * ld + c] * v[c, d0 + 8 j] for RB rows and
// NB vectors of eight dimensions: RB * NB accumulators in registers, each value vector loaded once.
template <int RB, int NB, typename T>
__attribute__((target("avx2,fma"))) inline void prefix_values_avx2(const float* w, int64_t ld, const T* v,
                                                                   int64_t v_stride, int64_t prefix, int64_t d0,
                                                                   float* acc, int64_t D) {
  __m256 a[RB][NB];
  for (int r = 0; r < RB; ++r)
    for (int j = 0; j < NB; ++j) a[r][j] = _mm256_loadu_ps(acc + r * D + d0 + 8 * j);
  for (int64_t c = 0; c < prefix; ++c) {
    const T* vc = v + c * v_stride + d0;
    __m256 vv[NB];
    for (int j = 0; j < NB; ++j) vv[j] = simd::load8(vc + 8 * j);
    for (int r = 0; r < RB; ++r) {
      const __m256 wr = _mm256_set1_ps(w[r * ld + c]);
      for (int j = 0; j < NB; ++j) a[r][j] = _mm256_fmadd_ps(wr, vv[j], a[r][j]);
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int j = 0; j < NB; ++j) _mm256_storeu_ps(acc + r * D + d0 + 8 * j, a[r][j]);
}

template <int RB, typename T>
__attribute__((target("avx2,fma"))) inline void prefix_values_rows(const float* w, int64_t ld, const T* v,
                                                                   int64_t v_stride, int64_t prefix, float* acc,
                                                                   int64_t D) {
  int64_t d0 = 0;
  for (; d0 + 32 <= D; d0 += 32) prefix_values_avx2<RB, 4, T>(w, ld, v, v_stride, prefix, d0, acc, D);
  for (; d0 < D; d0 += 8) prefix_values_avx2<RB, 1, T>(w, ld, v, v_stride, prefix, d0, acc, D);
}

// One kv head of one row: its R = group * N query rows (row r: node r / group, query head
// hk * group + r % group). The prefix, which every row sees, goes through the blocked products
// above; each row's few visible tree keys one at a time.
template <typename T>
__attribute__((target("avx2,fma"))) void pair_avx2(const Strided4D<const T>& q, const Strided4D<const T>& k,
                                                   const Strided4D<const T>& v, const Strided4D<T>& out,
                                                   const TreeAttentionShape& s, int64_t b, int64_t hk,
                                                   int64_t prefix, int64_t tree_at, const uint8_t* mask,
                                                   float scale, float* lse, int64_t i0, int64_t i1) {
  // rows r = (i - i0) * group + (h - hk * group): the query heads of kv head hk at nodes [i0, i1)
  const int64_t group = s.q_heads / s.kv_heads, D = s.head_dim, n = s.num_nodes, R = group * (i1 - i0);
  const int64_t ld = (prefix + n + 7) / 8 * 8;  // each row's scores, padded to whole vectors
  std::vector<float> qf(R * D), acc(R * D, 0.f), scores(R * ld, -INFINITY), denoms(R);
  std::vector<int64_t> slots((i1 - i0) * n), visible(n);  // node i's visible tree slots at (i - i0) * n
  for (int64_t i = i0; i < i1; ++i) visible[i] = tree_slots(mask, n, i, tree_at, slots.data() + (i - i0) * n);
  for (int64_t r = 0; r < R; ++r)
    for (int64_t d = 0; d < D; ++d) qf[r * D + d] = to_float(q.at(b, hk * group + r % group, i0 + r / group, d));
  const T* kb = &k.at(b, hk, 0, 0);
  const T* vb = &v.at(b, hk, 0, 0);
  int64_t r = 0;
  for (; r + 3 <= R; r += 3) prefix_scores_avx2<3, T>(qf.data() + r * D, D, kb, k.stride_s, prefix, scale, scores.data() + r * ld, ld);
  for (; r < R; ++r) prefix_scores_avx2<1, T>(qf.data() + r * D, D, kb, k.stride_s, prefix, scale, scores.data() + r * ld, ld);
  for (r = 0; r < R; ++r) {  // tree keys, then the softmax weights of the row
    const int64_t i = i0 + r / group;
    float* row = scores.data() + r * ld;
    for (int64_t j = 0; j < visible[i]; ++j)
      row[prefix + j] = dot_avx2(qf.data() + r * D, kb + slots[(i - i0) * n + j] * k.stride_s, D) * scale;
    __m256 mx = _mm256_set1_ps(-INFINITY);
    for (int64_t c = 0; c < ld; c += 8) mx = _mm256_max_ps(mx, _mm256_loadu_ps(row + c));
    const float max_score = simd::hmax(mx);
    if (prefix + visible[i] == 0) {  // sees no key: weights 0, zero output and lse -inf (as the reference)
      for (int64_t c = 0; c < ld; ++c) row[c] = 0.f;
      denoms[r] = 0.f;
      continue;
    }
    const __m256 mv = _mm256_set1_ps(max_score);
    __m256 den = _mm256_setzero_ps();
    for (int64_t c = 0; c < ld; c += 8) {  // the padding (-inf) weighs 0
      const __m256 e = simd::exp8_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(row + c), mv));
      _mm256_storeu_ps(row + c, e);
      den = _mm256_add_ps(den, e);
    }
    denoms[r] = simd::hsum(den);
    if (lse) {
      const int64_t h = hk * group + r % group;
      lse[(b * s.q_heads + h) * n + i] = max_score + std::log(denoms[r]);
    }
  }
  for (r = 0; r + 3 <= R; r += 3) prefix_values_rows<3, T>(scores.data() + r * ld, ld, vb, v.stride_s, prefix, acc.data() + r * D, D);
  for (; r < R; ++r) prefix_values_rows<1, T>(scores.data() + r * ld, ld, vb, v.stride_s, prefix, acc.data() + r * D, D);
  for (r = 0; r < R; ++r) {
    const int64_t i = i0 + r / group, h = hk * group + r % group;
    float* a = acc.data() + r * D;
    const float* w = scores.data() + r * ld + prefix;
    for (int64_t j = 0; j < visible[i]; ++j) {
      const T* vj = vb + slots[(i - i0) * n + j] * v.stride_s;
      const __m256 wj = _mm256_set1_ps(w[j]);
      for (int64_t d = 0; d < D; d += 8) _mm256_storeu_ps(a + d, _mm256_fmadd_ps(wj, simd::load8(vj + d), _mm256_loadu_ps(a + d)));
    }
    if (denoms[r] == 0.f) {
      if (lse) lse[(b * s.q_heads + h) * n + i] = -INFINITY;
      for (int64_t d = 0; d < D; ++d) out.at(b, h, i, d) = from_float<T>(0.f);
      continue;
    }
    const float inv = 1.f / denoms[r];
    for (int64_t d = 0; d < D; ++d) out.at(b, h, i, d) = from_float<T>(a[d] * inv);
  }
}
#endif

template <typename T>
bool takes_avx2(const Strided4D<const T>& q, const Strided4D<const T>& k, const Strided4D<const T>& v,
                const TreeAttentionShape& s) {
#ifdef TOKEN_RECYCLING_AVX2
  // (head_dim 0 or no nodes: nothing to vectorize, and the portable loop never forms a pointer to k or v)
  return (std::is_same_v<T, float> || std::is_same_v<T, bfloat16>) && s.head_dim > 0 && s.num_nodes > 0 &&
         s.head_dim % 8 == 0 && q.stride_d == 1 &&
         k.stride_d == 1 && v.stride_d == 1 && simd::cpu_has_avx2_fma();
#else
  (void)q, (void)k, (void)v, (void)s;
  return false;
#endif
}

}  // namespace tree_attention_detail

// True when tree_attention(..., vectorized=true) takes the AVX2/FMA path for these inputs on this CPU.
template <typename T>
bool tree_attention_vectorized(const Strided4D<const T>& q, const Strided4D<const T>& k,
                               const Strided4D<const T>& v, const TreeAttentionShape& s) {
  return tree_attention_detail::takes_avx2(q, k, v, s);
}

// How many node ranges to split each (row, kv head) pair into for `threads` threads: the fewest (at
// most num_nodes) that make the work units a multiple of the threads or at least four per thread, so
// no thread idles while another finishes a pair (3 kv heads on 2 threads would leave one thread a
// third of the work idle).
inline int64_t tree_attention_node_chunks(int64_t pairs, int64_t num_nodes, int64_t threads) {
  if (threads <= 1 || pairs <= 0 || num_nodes <= 1) return 1;
  int64_t c = 1;
  for (; c < num_nodes; ++c)
    if ((pairs * c) % threads == 0 || pairs * c >= 4 * threads) break;
  return c;
}

// tree_mask: [num_nodes, num_nodes] row-major bytes (non-zero = visible), row b's at
// tree_mask + b * mask_stride_b. out: [batch, q_heads, num_nodes, head_dim]
// view. A node that sees no key at all gets a zero output. lse (optional): [batch, q_heads, num_nodes]
// contiguous, the natural log of each row's softmax denominator of the scaled scores (-inf: no key),
// what merge_attention_states.h needs to combine this with attention over other keys.
// pair_begin, pair_end: the work units computed by this call (default: all): with node_chunks = 1
// the (row b, kv head hk) pairs p = b * kv_heads + hk; with node_chunks = C > 1, unit u is pair
// u / C over nodes [c * N / C, (c + 1) * N / C), c = u % C (the top comment). node_chunks must be
// 1..N. vectorized = false forces the portable reference loop.
template <typename T>
Status tree_attention(const Strided4D<const T>& q, const Strided4D<const T>& k, const Strided4D<const T>& v,
                      const Strided4D<T>& out, const TreeAttentionShape& s, const int64_t* prefix_len,
                      const uint8_t* tree_mask, float scale, float* lse = nullptr, int64_t tree_start = -1,
                      int64_t mask_stride_b = 0, int64_t pair_begin = 0, int64_t pair_end = -1,
                      bool vectorized = true, int64_t node_chunks = 1) {
  Status st = CheckTreeAttentionShape(s, prefix_len, tree_start);
  if (!st.ok) return st;
  if (node_chunks < 1 || (node_chunks > 1 && node_chunks > s.num_nodes)) {
    return Status::Error("node_chunks = " + std::to_string(node_chunks) + " is not in [1, max(num_nodes, 1) = " +
                         std::to_string(s.num_nodes > 1 ? s.num_nodes : 1) + "]");
  }
  const int64_t units = s.batch * s.kv_heads * node_chunks;
  if (pair_end < 0) pair_end = units;
  if (pair_begin < 0 || pair_begin > pair_end || pair_end > units) {
    return Status::Error("pair range [" + std::to_string(pair_begin) + ", " + std::to_string(pair_end) +
                         ") is not inside [0, batch * kv_heads * node_chunks = " + std::to_string(units) + ")");
  }
  const bool fast = vectorized && tree_attention_detail::takes_avx2(q, k, v, s);
  for (int64_t u = pair_begin; u < pair_end; ++u) {
    const int64_t p = u / node_chunks, c = u % node_chunks;
    const int64_t i0 = c * s.num_nodes / node_chunks, i1 = (c + 1) * s.num_nodes / node_chunks;
    const int64_t b = p / s.kv_heads, hk = p % s.kv_heads;
    const int64_t prefix = prefix_len[b];
    const int64_t tree_at = tree_start >= 0 ? tree_start : prefix;  // slot of tree node 0
    const uint8_t* mask = tree_mask + b * mask_stride_b;
#ifdef TOKEN_RECYCLING_AVX2
    if constexpr (std::is_same_v<T, float> || std::is_same_v<T, bfloat16>) {
      if (fast) {
        tree_attention_detail::pair_avx2<T>(q, k, v, out, s, b, hk, prefix, tree_at, mask, scale, lse, i0, i1);
        continue;
      }
    }
#endif
    (void)fast;
    tree_attention_detail::pair_scalar<T>(q, k, v, out, s, b, hk, prefix, tree_at, mask, scale, lse, i0, i1);
  }
  return Status::Ok();
}

}  // namespace token_recycling::kernels
