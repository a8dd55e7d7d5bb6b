// Step 2 on the GPU, same contract as ../tree_attention.h: N tree nodes (N <= 256) attend to the
// whole prefix and to the tree nodes their mask row allows; GQA; float/float16/bfloat16 in, float
// accumulation; head_dim 64, 80, 96, 128 or 256.
//
// For one (b, kv head) the G = q_heads / kv_heads query heads share K and V, so their G * N rows are
// one matrix of query rows. A block takes a tile of those rows and a chunk of key positions
// [0, tree_at + N) (the tree sits at tree_at: right after the prefix, or at tree_start for every row,
// the keys between the prefix and tree_start then being skipped by the mask); within the chunk it walks key
// tiles with an online softmax (flash-attention style). With several chunks (long prefixes,
// flash-decoding style) each block leaves an unnormalised partial (O, max, sum) and a second launch
// merges them by log-sum-exp. 16-bit inputs use tensor cores (wmma, P rounded to the input type as
// in flash attention); float inputs use plain float math.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>

#include "../tree_attention.h"
#include "device_error.cuh"

namespace token_recycling::kernels::cuda {

enum TreeAttentionErrorCode : int32_t { kAttnPrefix = kFirstOpCode, kAttnPrefixTreeStart };

constexpr int64_t kTreeAttentionMaxNodes = 256;
constexpr bool tree_attention_supports_head_dim(int64_t d) { return d == 64 || d == 80 || d == 96 || d == 128 || d == 256; }

// Arguments with element strides; q, k, v are contiguous along head_dim. out is [B, Hq, N, D] contiguous.
template <typename T>
struct TreeAttentionArgs {
  const T *q, *k, *v;
  T* out;
  int64_t q_stride_b, q_stride_h, q_stride_s;
  int64_t k_stride_b, k_stride_h, k_stride_s;
  int64_t v_stride_b, v_stride_h, v_stride_s;
  TreeAttentionShape shape;   // batch, q_heads, kv_heads, num_nodes, seq (k/v length), head_dim
  const int64_t* prefix_len;  // device [batch], or null: every row has uniform_prefix (checked by the caller)
  int64_t uniform_prefix;
  const uint8_t* tree_mask;   // device [N, N] bytes, non-zero = visible (row b's at tree_mask + b * mask_stride_b)
  float scale;
  float* lse = nullptr;       // optional device [B, Hq, N]: log of each row's softmax denominator (-inf: no key)
  int64_t tree_start = -1;    // >= 0: tree node 0 of every row at this slot (prefix_len[b] <= tree_start); -1: at prefix_len[b]
  int64_t mask_stride_b = 0;  // 0: one tree for every row; N * N: one per row
};

// Tile sizes for one element type and head_dim.
template <typename T, int D>
struct TreeAttentionConfig {
  static constexpr bool kTensorCores = !std::is_same_v<T, float>;
  static constexpr int kWarps = 4, kThreads = 32 * kWarps;
  static constexpr int kRowsPerWarp = kTensorCores ? 16 : 8;
  static constexpr int kRows = kWarps * kRowsPerWarp;                 // query rows per block
  static constexpr int kKeys = (kTensorCores && D <= 128) ? 64 : 32;  // keys per tile
  static constexpr int kMaskWords = kTreeAttentionMaxNodes / 32;
  // Leading dimensions in elements, padded against bank conflicts; wmma needs multiples of 16 bytes.
  static constexpr int kLdKV = kTensorCores ? D + 8 : D + 1;
  static constexpr int kLdQ = kLdKV;
  static constexpr int kLdS = kKeys + 4;  // float scores; the 16-bit P overwrites each row in place
  static constexpr int kLdP = kTensorCores ? 2 * kLdS : kLdS;
  static constexpr int kLdO = D + 4;

  static constexpr size_t align(size_t x) { return (x + 127) / 128 * 128; }
  static constexpr size_t kKBytes = align(sizeof(T) * kKeys * kLdKV);
  static constexpr size_t kSBytes = align(sizeof(float) * kRows * kLdS);
  static constexpr size_t kQBytes = align(sizeof(T) * kRows * kLdQ);
  // Tensor cores keep Q in registers, so Q is staged in the score buffer; float reads Q from here.
  static constexpr size_t kSQBytes = kTensorCores ? (kSBytes > kQBytes ? kSBytes : kQBytes) : kSBytes + kQBytes;
  static constexpr size_t kOBytes = align(sizeof(float) * kRows * kLdO);
  static constexpr size_t kOffK = 0, kOffV = kKBytes, kOffS = 2 * kKBytes;
  static constexpr size_t kOffQ = kTensorCores ? kOffS : kOffS + kSBytes;
  static constexpr size_t kOffO = kOffS + kSQBytes;
  static constexpr size_t kOffStats = kOffO + kOBytes;  // max, sum, per row
  static constexpr size_t kOffMask = kOffStats + align(2 * sizeof(float) * kRows);
  static constexpr size_t kSmemBytes = kOffMask + align(sizeof(uint32_t) * kRows * kMaskWords);
};

// How the key positions are split, and the float workspace the split needs. The grid has `chunks`
// chunks per (row tile, b, kv head); each block finds its own key range from its row's live keys
// (tree_attention_chunk), so a plan sized for more keys than a row has (a static cache's capacity
// when the prefix is on the device, or the longest row of a batch) splits the live keys all the same,
// and the chunks past them do no work.
struct TreeAttentionPlan {
  int64_t chunks = 1, chunk_len = 0;  // chunk_len: at key_len, the longest row planned for
  size_t workspace_bytes = 0;
};

constexpr int64_t kTreeAttentionMinChunk = 256;  // keys; shorter chunks cost more in loading Q and merging than they save

inline int tree_attention_rows_per_block(bool is_float) { return is_float ? 32 : 64; }
inline int tree_attention_keys_per_tile(bool is_float, int64_t d) { return (!is_float && d <= 128) ? 64 : 32; }

// The key range [*begin, *end) of chunk `chunk` (of `chunks`) for a row whose keys end at key_end
// (its tree's end): the live keys split evenly, in whole tiles of `keys` keys, into at most `chunks`
// chunks of at least kTreeAttentionMinChunk keys. Chunks past the live keys are empty (*begin >= *end).
// At key_end = the plan's key_len this is the plan's own split (chunk_len, chunks).
__host__ __device__ inline void tree_attention_chunk(int64_t chunks, int64_t keys, int64_t key_end, int64_t chunk,
                                                     int64_t* begin, int64_t* end) {
  int64_t live = key_end > kTreeAttentionMinChunk ? (key_end + kTreeAttentionMinChunk - 1) / kTreeAttentionMinChunk : 1;
  if (live > chunks) live = chunks;
  if (live < 1) live = 1;
  int64_t len = ((key_end + live - 1) / live + keys - 1) / keys * keys;
  if (len < keys) len = keys;
  *begin = chunk * len;
  *end = *begin + len < key_end ? *begin + len : key_end;
}

// key_len: an upper bound of the tree's end over the batch (the kv length, or the uniform prefix / tree_start + N).
template <typename T>
TreeAttentionPlan plan_tree_attention(const TreeAttentionShape& s, int64_t key_len, int num_sms) {
  constexpr bool is_float = std::is_same_v<T, float>;
  const int64_t keys = tree_attention_keys_per_tile(is_float, s.head_dim);
  const int64_t rows = s.q_heads / s.kv_heads * s.num_nodes;
  const int64_t tiles = (rows + tree_attention_rows_per_block(is_float) - 1) / tree_attention_rows_per_block(is_float);
  const int64_t blocks = s.batch * s.kv_heads * tiles;
  constexpr int64_t kMinChunk = kTreeAttentionMinChunk;
  TreeAttentionPlan plan;
  const int64_t wanted = blocks > 0 ? (4 * static_cast<int64_t>(num_sms) + blocks - 1) / blocks : 1;
  const int64_t most = key_len > kMinChunk ? (key_len + kMinChunk - 1) / kMinChunk : 1;
  plan.chunks = wanted < 1 ? 1 : (wanted > most ? most : wanted);
  plan.chunk_len = ((key_len + plan.chunks - 1) / plan.chunks + keys - 1) / keys * keys;
  if (plan.chunk_len < keys) plan.chunk_len = keys;
  plan.chunks = (key_len + plan.chunk_len - 1) / plan.chunk_len;
  if (plan.chunks < 1) plan.chunks = 1;
  if (plan.chunks > 1) {
    const int64_t out_rows = s.batch * s.q_heads * s.num_nodes;
    plan.workspace_bytes = sizeof(float) * plan.chunks * out_rows * (s.head_dim + 2);
  }
  return plan;
}

namespace detail {

__device__ __forceinline__ float warp_max(float x) {
  for (int o = 16; o > 0; o /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
__device__ __forceinline__ float warp_sum(float x) {
  for (int o = 16; o > 0; o /= 2) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// Copies `rows` rows of D elements (row r from row_ptr(r), null = zeros) into shared memory with
// leading dimension LD, as 16-byte vectors when `vec` (all rows 16-byte aligned).
template <typename T, int D, int LD, typename RowPtr>
__device__ __forceinline__ void load_rows(T* dst, int rows, bool vec, RowPtr row_ptr) {
  constexpr int kPer = 16 / sizeof(T);
  static_assert(D % kPer == 0, "head_dim rows are whole 16-byte vectors");
  if (vec) {
    for (int u = threadIdx.x; u < rows * (D / kPer); u += blockDim.x) {
      const int r = u / (D / kPer), c = (u % (D / kPer)) * kPer;
      const T* src = row_ptr(r);
      uint4 value = {0u, 0u, 0u, 0u};
      if (src != nullptr) value = *reinterpret_cast<const uint4*>(src + c);
      if constexpr ((LD * sizeof(T)) % 16 == 0) {
        *reinterpret_cast<uint4*>(dst + r * LD + c) = value;
      } else {
        const T* parts = reinterpret_cast<const T*>(&value);
        for (int i = 0; i < kPer; ++i) dst[r * LD + c + i] = parts[i];
      }
    }
  } else {
    for (int e = threadIdx.x; e < rows * D; e += blockDim.x) {
      const int r = e / D, c = e % D;
      const T* src = row_ptr(r);
      dst[r * LD + c] = src != nullptr ? src[c] : from_float<T>(0.f);
    }
  }
}

// Q rows of a warp as wmma operands, kept in registers for the whole key loop (tensor cores only).
template <typename T, int D, bool kTensorCores>
struct QueryFragments {};
template <typename T, int D>
struct QueryFragments<T, D, true> {
  wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> f[D / 16];
};

}  // namespace detail

// Grid: x = row tile (fastest, so blocks reading the same keys run together), chunk, (b, kv head).
template <typename T, int D>
__global__ void __launch_bounds__(128)
    tree_attention_kernel(TreeAttentionArgs<T> a, int64_t chunks, float* partial, DeviceError* err) {
  using C = TreeAttentionConfig<T, D>;
  const T* __restrict__ q = a.q;
  const T* __restrict__ k = a.k;
  const T* __restrict__ v = a.v;
  T* __restrict__ out = a.out;
  const TreeAttentionShape& s = a.shape;
  const int64_t group = s.q_heads / s.kv_heads, rows_total = group * s.num_nodes, N = s.num_nodes;
  const int64_t tiles = (rows_total + C::kRows - 1) / C::kRows;
  const int64_t tile = blockIdx.x % tiles;
  const int64_t chunk = (blockIdx.x / tiles) % chunks;
  const int64_t bh = blockIdx.x / tiles / chunks;
  const int64_t b = bh / s.kv_heads, hk = bh % s.kv_heads;
  const int64_t prefix = a.prefix_len != nullptr ? a.prefix_len[b] : a.uniform_prefix;
  const int64_t tree_at = a.tree_start >= 0 ? a.tree_start : prefix;  // slot of tree node 0 (tree_start checked by the host)
  // A uniform prefix is every row's: name row 0, as the CPU kernel (first bad row) does, whichever block reports.
  const int64_t bad_row = a.prefix_len != nullptr ? b : 0;
  if (a.tree_start >= 0 && (prefix < 0 || prefix > a.tree_start)) {  // (tree_start + N <= seq)
    if (tile == 0 && chunk == 0 && threadIdx.x == 0) report(err, kAttnPrefixTreeStart, bad_row, prefix, 0, a.tree_start);
    return;
  }
  if (prefix < 0 || prefix > s.seq - N) {  // (prefix + N could overflow)
    if (tile == 0 && chunk == 0 && threadIdx.x == 0) report(err, kAttnPrefix, bad_row, prefix, N, s.seq);
    return;
  }
  const int64_t key_end_all = tree_at + N;
  const uint8_t* tree_mask = a.tree_mask + b * a.mask_stride_b;
  // This block's keys, split by this row's live keys (not the plan's key_len: see TreeAttentionPlan).
  int64_t key_begin = 0, key_end = 0;
  tree_attention_chunk(chunks, C::kKeys, key_end_all, chunk, &key_begin, &key_end);
  const int64_t row0 = tile * C::kRows;
  const int64_t out_rows = s.batch * s.q_heads * N;
  if (key_begin >= key_end_all) {  // a chunk past the live keys (chunks > 1): an empty partial, for the merge to skip
    float* part_stats = partial + chunks * out_rows * D;
    for (int r = threadIdx.x; r < C::kRows; r += blockDim.x) {
      const int64_t row = row0 + r;
      if (row >= rows_total) break;
      const int64_t out_row = (b * s.q_heads + hk * group + row / N) * N + row % N;
      part_stats[2 * (chunk * out_rows + out_row)] = -INFINITY;
      part_stats[2 * (chunk * out_rows + out_row) + 1] = 0.f;
    }
    return;
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wrow0 = warp * C::kRowsPerWarp;  // this warp's first row in the tile

  unsigned char* smem = dynamic_smem<unsigned char>();
  T* Ks = reinterpret_cast<T*>(smem + C::kOffK);
  T* Vs = reinterpret_cast<T*>(smem + C::kOffV);
  float* S = reinterpret_cast<float*>(smem + C::kOffS);
  T* P = reinterpret_cast<T*>(smem + C::kOffS);  // tensor cores: 16-bit P over each row of S
  T* Qs = reinterpret_cast<T*>(smem + C::kOffQ);
  float* O = reinterpret_cast<float*>(smem + C::kOffO);
  float* row_max = reinterpret_cast<float*>(smem + C::kOffStats);
  float* row_sum = row_max + C::kRows;
  uint32_t* mask_bits = reinterpret_cast<uint32_t*>(smem + C::kOffMask);

  // Query row r of the tile is (query head hk * group + r / N, node r % N).
  constexpr int64_t es = sizeof(T);
  const bool q_vec = aligned16(q, a.q_stride_b * es, a.q_stride_h * es, a.q_stride_s * es);
  detail::load_rows<T, D, C::kLdQ>(Qs, C::kRows, q_vec, [&](int r) -> const T* {
    const int64_t row = row0 + r;
    if (row >= rows_total) return nullptr;
    return q + b * a.q_stride_b + (hk * group + row / N) * a.q_stride_h + (row % N) * a.q_stride_s;
  });
  for (int e = threadIdx.x; e < C::kRows * D; e += blockDim.x) O[(e / D) * C::kLdO + e % D] = 0.f;
  for (int r = threadIdx.x; r < C::kRows; r += blockDim.x) {
    row_max[r] = -INFINITY;
    row_sum[r] = 0.f;
  }
  // The tree-mask rows of this tile's nodes, as bits: warp w fills its own rows.
  if (key_end > tree_at) {
    for (int rr = 0; rr < C::kRowsPerWarp; ++rr) {
      const int64_t row = row0 + wrow0 + rr;
      const int64_t node = row % N;
      for (int64_t word = 0; word < (N + 31) / 32; ++word) {
        const int64_t j = word * 32 + lane;
        const bool bit = row < rows_total && j < N && tree_mask[node * N + j] != 0;
        const unsigned bits = __ballot_sync(0xffffffffu, bit);
        if (lane == 0) mask_bits[(wrow0 + rr) * C::kMaskWords + word] = bits;
      }
    }
  }
  __syncthreads();

  detail::QueryFragments<T, D, C::kTensorCores> q_frag;
  if constexpr (C::kTensorCores) {
    for (int kk = 0; kk < D / 16; ++kk) wmma::load_matrix_sync(q_frag.f[kk], Qs + wrow0 * C::kLdQ + kk * 16, C::kLdQ);
    __syncthreads();  // Q shares its buffer with S
  }

  const T* k_head = k + b * a.k_stride_b + hk * a.k_stride_h;
  const T* v_head = v + b * a.v_stride_b + hk * a.v_stride_h;
  const bool k_vec = aligned16(k, a.k_stride_b * es, a.k_stride_h * es, a.k_stride_s * es);
  const bool v_vec = aligned16(v, a.v_stride_b * es, a.v_stride_h * es, a.v_stride_s * es);

  for (int64_t key0 = key_begin; key0 < key_end; key0 += C::kKeys) {
    const int64_t valid = key_end - key0 < C::kKeys ? key_end - key0 : C::kKeys;
    detail::load_rows<T, D, C::kLdKV>(Ks, C::kKeys, k_vec, [&](int r) -> const T* {
      return r < valid ? k_head + (key0 + r) * a.k_stride_s : nullptr;
    });
    detail::load_rows<T, D, C::kLdKV>(Vs, C::kKeys, v_vec, [&](int r) -> const T* {
      return r < valid ? v_head + (key0 + r) * a.v_stride_s : nullptr;
    });
    __syncthreads();

    // S = Q K^T for this warp's rows.
    if constexpr (C::kTensorCores) {
      for (int n = 0; n < C::kKeys / 16; ++n) {
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
        wmma::fill_fragment(acc, 0.f);
        for (int kk = 0; kk < D / 16; ++kk) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> kf;
          wmma::load_matrix_sync(kf, Ks + n * 16 * C::kLdKV + kk * 16, C::kLdKV);
          wmma::mma_sync(acc, q_frag.f[kk], kf, acc);
        }
        wmma::store_matrix_sync(S + wrow0 * C::kLdS + n * 16, acc, C::kLdS, wmma::mem_row_major);
      }
    } else {
      for (int key = lane; key < C::kKeys; key += 32) {
        float acc[C::kRowsPerWarp] = {};
        for (int d = 0; d < D; ++d) {
          const float kd = to_float(Ks[key * C::kLdKV + d]);
          for (int rr = 0; rr < C::kRowsPerWarp; ++rr) acc[rr] += to_float(Qs[(wrow0 + rr) * C::kLdQ + d]) * kd;
        }
        for (int rr = 0; rr < C::kRowsPerWarp; ++rr) S[(wrow0 + rr) * C::kLdS + key] = acc[rr];
      }
    }
    __syncwarp();

    // Online softmax over this tile, row by row: P = exp(S * scale - new max), O *= exp(old - new max).
    for (int rr = 0; rr < C::kRowsPerWarp; ++rr) {
      const int r = wrow0 + rr;
      float score[C::kKeys / 32];
      float tile_max = -INFINITY;
      for (int c = 0; c < C::kKeys / 32; ++c) {
        const int col = lane + 32 * c;
        const int64_t pos = key0 + col;
        bool visible = pos < key_end;
        if (visible && pos >= tree_at) {
          const int64_t j = pos - tree_at;  // tree node, < N
          visible = (mask_bits[r * C::kMaskWords + j / 32] >> (j % 32)) & 1u;
        } else if (visible && pos >= prefix) {
          visible = false;  // between the row's prefix and the common tree slot
        }
        score[c] = visible ? S[r * C::kLdS + col] * a.scale : -INFINITY;
        tile_max = fmaxf(tile_max, score[c]);
      }
      tile_max = detail::warp_max(tile_max);
      const float old_max = row_max[r];
      const float new_max = fmaxf(old_max, tile_max);
      const float alpha = new_max == -INFINITY ? 1.f : expf(old_max - new_max);
      float tile_sum = 0.f;
      for (int c = 0; c < C::kKeys / 32; ++c) {
        score[c] = score[c] == -INFINITY ? 0.f : expf(score[c] - new_max);
        tile_sum += score[c];
      }
      tile_sum = detail::warp_sum(tile_sum);
      __syncwarp();  // every lane has read row r of S (and the row's stats) before P and stats overwrite them
      for (int c = 0; c < C::kKeys / 32; ++c) {
        if constexpr (C::kTensorCores) P[r * C::kLdP + lane + 32 * c] = from_float<T>(score[c]);
        else S[r * C::kLdS + lane + 32 * c] = score[c];
      }
      if (lane == 0) {
        row_max[r] = new_max;
        row_sum[r] = row_sum[r] * alpha + tile_sum;
      }
      for (int d = lane; d < D; d += 32) O[r * C::kLdO + d] *= alpha;
    }
    __syncwarp();

    // O += P V for this warp's rows.
    if constexpr (C::kTensorCores) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> p_frag[C::kKeys / 16];
      for (int kk = 0; kk < C::kKeys / 16; ++kk) wmma::load_matrix_sync(p_frag[kk], P + wrow0 * C::kLdP + kk * 16, C::kLdP);
      for (int n = 0; n < D / 16; ++n) {
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
        wmma::load_matrix_sync(acc, O + wrow0 * C::kLdO + n * 16, C::kLdO, wmma::mem_row_major);
        for (int kk = 0; kk < C::kKeys / 16; ++kk) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> vf;
          wmma::load_matrix_sync(vf, Vs + kk * 16 * C::kLdKV + n * 16, C::kLdKV);
          wmma::mma_sync(acc, p_frag[kk], vf, acc);
        }
        wmma::store_matrix_sync(O + wrow0 * C::kLdO + n * 16, acc, C::kLdO, wmma::mem_row_major);
      }
    } else {
      for (int rr = 0; rr < C::kRowsPerWarp; ++rr) {
        const int r = wrow0 + rr;
        for (int d = lane; d < D; d += 32) {
          float acc = O[r * C::kLdO + d];
          for (int key = 0; key < C::kKeys; ++key) acc += S[r * C::kLdS + key] * to_float(Vs[key * C::kLdKV + d]);
          O[r * C::kLdO + d] = acc;
        }
      }
    }
    __syncthreads();  // K and V are reloaded next
  }

  // Write this warp's rows: the final output, or the chunk's partial for the merge.
  for (int rr = 0; rr < C::kRowsPerWarp; ++rr) {
    const int r = wrow0 + rr;
    const int64_t row = row0 + r;
    if (row >= rows_total) break;
    const int64_t out_row = (b * s.q_heads + hk * group + row / N) * N + row % N;
    if (chunks == 1) {
      const float sum = row_sum[r];
      const float inv = sum > 0.f ? 1.f / sum : 0.f;  // a row that sees no key gets zeros
      for (int d = lane; d < D; d += 32) out[out_row * D + d] = from_float<T>(O[r * C::kLdO + d] * inv);
      if (a.lse != nullptr && lane == 0) a.lse[out_row] = sum > 0.f ? row_max[r] + logf(sum) : -INFINITY;
    } else {
      float* part_o = partial + (chunk * out_rows + out_row) * D;
      for (int d = lane; d < D; d += 32) part_o[d] = O[r * C::kLdO + d];
      if (lane == 0) {
        float* part_stats = partial + chunks * out_rows * D;
        part_stats[2 * (chunk * out_rows + out_row)] = row_max[r];
        part_stats[2 * (chunk * out_rows + out_row) + 1] = row_sum[r];
      }
    }
  }
}

// One warp per output row: out = sum_c e^(m_c - M) O_c / sum_c e^(m_c - M) l_c.
template <typename T, int D>
__global__ void __launch_bounds__(128)
    tree_attention_merge(const float* __restrict__ partial, int64_t chunks, int64_t out_rows, T* __restrict__ out,
                         float* __restrict__ lse) {
  const int64_t row = blockIdx.x * int64_t{4} + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= out_rows) return;
  const float* stats = partial + chunks * out_rows * D;
  float m = -INFINITY;
  for (int64_t c = 0; c < chunks; ++c) m = fmaxf(m, stats[2 * (c * out_rows + row)]);
  float sum = 0.f;
  if (m != -INFINITY) {
    for (int64_t c = 0; c < chunks; ++c) {
      const float mc = stats[2 * (c * out_rows + row)];
      if (mc != -INFINITY) sum += expf(mc - m) * stats[2 * (c * out_rows + row) + 1];
    }
  }
  const float inv = sum > 0.f ? 1.f / sum : 0.f;
  if (lse != nullptr && lane == 0) lse[row] = sum > 0.f ? m + logf(sum) : -INFINITY;
  for (int d = lane; d < D; d += 32) {
    float acc = 0.f;
    for (int64_t c = 0; c < chunks; ++c) {
      const float mc = stats[2 * (c * out_rows + row)];
      if (mc != -INFINITY) acc += expf(mc - m) * partial[(c * out_rows + row) * D + d];
    }
    out[row * D + d] = from_float<T>(acc * inv);
  }
}

template <typename T, int D>
cudaError_t launch_tree_attention(const TreeAttentionArgs<T>& args, const TreeAttentionPlan& plan, float* workspace,
                                  DeviceError* err, cudaStream_t stream) {
  using Dev = typename device_type<T>::type;
  using C = TreeAttentionConfig<Dev, D>;
  const TreeAttentionShape& s = args.shape;
  const int64_t rows = s.q_heads / s.kv_heads * s.num_nodes;
  const int64_t blocks = (rows + C::kRows - 1) / C::kRows * plan.chunks * s.batch * s.kv_heads;
  if (blocks == 0) return cudaSuccess;
  if (blocks > 0x7fffffff) return cudaErrorInvalidValue;
  TreeAttentionArgs<Dev> a;
  static_assert(sizeof(TreeAttentionArgs<Dev>) == sizeof(TreeAttentionArgs<T>));
  std::memcpy(static_cast<void*>(&a), &args, sizeof(a));  // same layout; element types are bit-compatible
  cudaError_t e = launch(tree_attention_kernel<Dev, D>, dim3(static_cast<unsigned>(blocks)), dim3(C::kThreads),
                         C::kSmemBytes, stream, a, plan.chunks, workspace, err);
  if (e != cudaSuccess || plan.chunks == 1) return e;
  const int64_t out_rows = s.batch * s.q_heads * s.num_nodes;
  return launch(tree_attention_merge<Dev, D>, dim3(blocks_for(out_rows, 4)), dim3(128), 0, stream,
                static_cast<const float*>(workspace), plan.chunks, out_rows, a.out, a.lse);
}

// Runs the plan from plan_tree_attention(); workspace: plan.workspace_bytes of device memory.
// Rows of a bad prefix_len are reported in *err (with the CPU kernel's message); bad sizes, a
// tree_start outside [-1, seq - num_nodes] or a mask stride other than 0 or N * N return
// cudaErrorInvalidValue before anything is launched.
template <typename T>
cudaError_t tree_attention(const TreeAttentionArgs<T>& args, const TreeAttentionPlan& plan, void* workspace,
                           DeviceError* err, cudaStream_t stream) {
  cudaError_t e = clear_error(err, stream);
  if (e != cudaSuccess) return e;
  // Sizes and tree_start are host values, checked before any launch (a bad one: nothing is written).
  const TreeAttentionShape& s = args.shape;
  if (s.batch < 0 || s.q_heads < 0 || s.num_nodes < 0 || s.seq < 0 || s.head_dim < 0 ||
      s.num_nodes > kTreeAttentionMaxNodes || s.kv_heads <= 0 || s.q_heads % s.kv_heads != 0 ||
      args.tree_start < -1 || args.tree_start > s.seq - s.num_nodes ||
      (args.mask_stride_b != 0 && args.mask_stride_b != s.num_nodes * s.num_nodes)) {
    return cudaErrorInvalidValue;
  }
  float* ws = static_cast<float*>(workspace);
  switch (args.shape.head_dim) {
    case 64: return launch_tree_attention<T, 64>(args, plan, ws, err, stream);
    case 80: return launch_tree_attention<T, 80>(args, plan, ws, err, stream);
    case 96: return launch_tree_attention<T, 96>(args, plan, ws, err, stream);
    case 128: return launch_tree_attention<T, 128>(args, plan, ws, err, stream);
    case 256: return launch_tree_attention<T, 256>(args, plan, ws, err, stream);
    default: return cudaErrorInvalidValue;
  }
}

inline Status describe_tree_attention_error(const DeviceError& e) {
  switch (e.code) {
    case 0: return Status::Ok();
    case kAttnPrefix:
      return Status::Error("prefix_len[" + std::to_string(e.index) + "] = " + std::to_string(e.value) +
                           " does not fit: need 0 <= prefix_len and prefix_len + num_nodes (" + std::to_string(e.lo) +
                           ") <= kv length (" + std::to_string(e.hi) + ")");
    case kAttnPrefixTreeStart:  // the CPU kernel's message (../tree_attention.h)
      return Status::Error("prefix_len[" + std::to_string(e.index) + "] = " + std::to_string(e.value) +
                           " does not fit: need 0 <= prefix_len <= tree_start (" + std::to_string(e.hi) + ")");
    default: return Status::Error("unknown device error code " + std::to_string(e.code));
  }
}

}  // namespace token_recycling::kernels::cuda
