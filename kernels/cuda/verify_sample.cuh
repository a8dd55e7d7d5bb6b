// Sampling verification on the GPU, same contract and same draws as ../verify_sample.h. One block per
// row; the walk is sequential (one visited node after another, at most the tree depth + 1), and each
// visited node's draw is spread over the block: every thread takes a contiguous chunk of the
// vocabulary for the row maximum and the integer weight sums, then thread 0 finds the chunk and the
// token where the running sum passes the target. Integer sums make the result independent of how the
// vocabulary is split, so it equals the CPU's token for token.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>

#include "../verify_sample.h"
#include "device_error.cuh"

namespace token_recycling::kernels::cuda {

enum VerifySampleErrorCode : int32_t {
  kSampleUniform = kFirstOpCode,  // index: b, value: the double's bits, lo: draw (depth)
  kSampleWeight,                  // index: b, value: node, lo: token
  kSampleNoWeight,                // index: b, value: node
  kSampleVocab,                   // value: vocab
};

constexpr unsigned kVerifySampleThreads = 256;

// The same integer weight as kernels::sample_weight (kept in one line so the two read alike).
__device__ __forceinline__ unsigned long long sample_weight_device(float p, float pmax) {
  return p > 0.0f ? static_cast<unsigned long long>(::ceil(static_cast<double>(p) / static_cast<double>(pmax) * 4294967296.0))
                  : 0ull;
}

__device__ __forceinline__ bool finite_non_negative(float x) { return x >= 0.0f && x <= 3.4028234663852886e38f; }

// depth: scratch [max(batch, 1), num_nodes]; accepted_nodes [batch, num_nodes] padded with -1.
__global__ void __launch_bounds__(kVerifySampleThreads)
    verify_sample_kernel(const int64_t* tokens, const int32_t* parents, int64_t parents_batch_stride,
                         const float* probs, const double* uniforms, int64_t batch, int64_t num_nodes, int64_t vocab,
                         int32_t* depth, int64_t* accept_len, int64_t* accepted_nodes, int64_t* bonus,
                         DeviceError* err) {
  __shared__ float chunk_max[kVerifySampleThreads];
  __shared__ unsigned long long chunk_sum[kVerifySampleThreads];
  __shared__ int64_t next_node, drawn_token;
  const unsigned t = threadIdx.x, threads = blockDim.x;
  const int64_t rows = (batch == 0 && parents_batch_stride == 0) ? 1 : batch;
  if (rows == 0) return;
  if (num_nodes < 1 || vocab < 1 || vocab > kVerifySampleMaxVocab) {
    if (blockIdx.x == 0 && t == 0) {
      if (num_nodes < 1) report(err, kTreeEmpty, 0, 0, 0, 0);
      else report(err, kSampleVocab, 0, vocab, 1, kVerifySampleMaxVocab + 1);
    }
    return;
  }
  const int64_t chunk = (vocab + threads - 1) / threads;
  for (int64_t b = blockIdx.x; b < rows; b += gridDim.x) {
    const int32_t* par = parents + b * parents_batch_stride;
    bool bad = false;
    for (int64_t i = t; i < num_nodes; i += threads) bad |= !check_parent(err, par, i);
    if (__syncthreads_or(bad)) continue;  // reported; this row's outputs are not written
    if (t == 0) {  // depths in index order (parents come first): the deepest node sizes the result
      int32_t* d = depth + b * num_nodes;
      int64_t deepest = 0;
      d[0] = 0;
      for (int64_t i = 1; i < num_nodes; ++i) {
        d[i] = d[par[i]] + 1;
        if (d[i] > deepest) deepest = d[i];
      }
      atomicMax(reinterpret_cast<unsigned long long*>(&err->result), static_cast<unsigned long long>(deepest));
    }
    if (b >= batch) continue;
    const int64_t* tok = tokens + b * num_nodes;
    int64_t* path = accepted_nodes + b * num_nodes;
    int64_t node = 0, len = 0;
    bool ok = true;
    while (true) {
      if (t == 0) path[len] = node;
      ++len;
      const double u = uniforms[b * num_nodes + len - 1];  // the walk's (len-1)-th draw
      if (!(u >= 0.0 && u < 1.0)) {  // the same value for every thread: all leave together
        int64_t bits;
        memcpy(&bits, &u, sizeof bits);
        if (t == 0) report(err, kSampleUniform, b, bits, len - 1, 0);
        ok = false;
        break;
      }
      const float* p = probs + (b * num_nodes + node) * vocab;
      const int64_t lo = static_cast<int64_t>(t) * chunk, hi = lo + chunk < vocab ? lo + chunk : vocab;
      float m = 0.0f;
      int64_t bad_token = -1;
      for (int64_t v = lo; v < hi; ++v) {
        const float x = p[v];
        if (!finite_non_negative(x)) {
          bad_token = v;
          break;
        }
        m = x > m ? x : m;
      }
      if (bad_token >= 0) report(err, kSampleWeight, b, node, bad_token, 0);
      chunk_max[t] = m;
      if (__syncthreads_or(bad_token >= 0)) {
        ok = false;
        break;
      }
      float pmax = 0.0f;
      for (unsigned j = 0; j < threads; ++j) pmax = chunk_max[j] > pmax ? chunk_max[j] : pmax;
      if (pmax == 0.0f) {
        if (t == 0) report(err, kSampleNoWeight, b, node, 0, 0);
        ok = false;
        break;
      }
      unsigned long long s = 0;
      for (int64_t v = lo; v < hi; ++v) s += sample_weight_device(p[v], pmax);
      chunk_sum[t] = s;
      __syncthreads();
      if (t == 0) {
        unsigned long long total = 0;
        for (unsigned j = 0; j < threads; ++j) total += chunk_sum[j];
        unsigned long long target = static_cast<unsigned long long>(::floor(u * static_cast<double>(total)));
        if (target >= total) target = total - 1;
        unsigned long long run = 0;
        unsigned c = 0;
        while (c + 1 < threads && run + chunk_sum[c] <= target) run += chunk_sum[c++];
        int64_t v = static_cast<int64_t>(c) * chunk, drawn = vocab - 1;
        for (const int64_t end = v + chunk < vocab ? v + chunk : vocab; v < end; ++v) {
          run += sample_weight_device(p[v], pmax);
          if (run > target) {
            drawn = v;
            break;
          }
        }
        int64_t next = -1;
        for (int64_t i = node + 1; i < num_nodes && next < 0; ++i) {
          if (par[i] == node && tok[i] == drawn) next = i;  // the first child holding it
        }
        drawn_token = drawn;
        next_node = next;
      }
      __syncthreads();
      if (next_node < 0) break;
      node = next_node;
    }
    if (ok) {
      for (int64_t j = len + t; j < num_nodes; j += threads) path[j] = -1;
      if (t == 0) {
        accept_len[b] = len;
        bonus[b] = drawn_token;
      }
    }
    __syncthreads();  // drawn_token and next_node are rewritten by the next row
  }
}

// tokens [batch, num_nodes]; parents [num_nodes] (stride 0) or [batch, num_nodes] (stride num_nodes);
// probs [batch, num_nodes, vocab]; uniforms [batch, num_nodes]; depth: scratch [max(batch, 1),
// num_nodes]; accepted_nodes [batch, num_nodes], padded with -1: its first max_depth + 1 columns are
// the result. After read_error(), err->result holds the deepest depth of the trees.
inline cudaError_t verify_sample(const int64_t* tokens, const int32_t* parents, int64_t parents_batch_stride,
                                 const float* probs, const double* uniforms, int64_t batch, int64_t num_nodes,
                                 int64_t vocab, int32_t* depth, int64_t* accept_len, int64_t* accepted_nodes,
                                 int64_t* bonus, DeviceError* err, cudaStream_t stream) {
  cudaError_t e = clear_error(err, stream);
  if (e != cudaSuccess) return e;
  return launch(verify_sample_kernel, dim3(blocks_for(batch, 1)), dim3(kVerifySampleThreads), 0, stream, tokens,
                parents, parents_batch_stride, probs, uniforms, batch, num_nodes, vocab, depth, accept_len,
                accepted_nodes, bonus, err);
}

// The CPU kernel's messages (verify_sample.h) for this kernel's reports.
inline Status describe_verify_sample_error(const DeviceError& e) {
  const auto at = [&](int64_t b, int64_t node) {
    return "[" + std::to_string(b) + ", " + std::to_string(node) + "]";
  };
  switch (e.code) {
    case 0: return Status::Ok();
    case kSampleUniform: {
      double u;
      std::memcpy(&u, &e.value, sizeof u);
      return Status::Error("uniforms" + at(e.index, e.lo) + " = " + std::to_string(u) +
                           " is outside [0, 1)");
    }
    case kSampleWeight:
      return Status::Error("probs" + at(e.index, e.value) + " holds a negative or non-finite weight at token " +
                           std::to_string(e.lo));
    case kSampleNoWeight: return Status::Error("probs" + at(e.index, e.value) + " has no positive weight");
    case kSampleVocab:
      return Status::Error("probs has vocabulary size " + std::to_string(e.value) + ", need 1 to " +
                           std::to_string(kVerifySampleMaxVocab));
    default: return describe_tree_error(e);
  }
}

}  // namespace token_recycling::kernels::cuda
