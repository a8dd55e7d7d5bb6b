// Step 3 on the GPU, same contract as ../verify_greedy.h. One block per row: nodes are resolved
// level by level (depth and "whole path matches"), then the deepest matching node wins, ties to the
// smallest index.
#pragma once

#include <cstdint>

#include "device_error.cuh"

namespace token_recycling::kernels::cuda {

// state[b, i]: -1 until resolved, then (depth << 1) | matches. Written once by one thread (see
// draft_tree.cuh for why reading it during a round is safe).
__global__ void __launch_bounds__(256)
    verify_greedy_kernel(const int64_t* tokens, const int64_t* predictions, const int32_t* parents,
                         int64_t parents_batch_stride, int64_t batch, int64_t num_nodes, int32_t* state,
                         int64_t* accept_len, int64_t* accepted_nodes, int64_t* bonus, DeviceError* err) {
  __shared__ unsigned long long best_key;  // (depth << 32) | (0xffffffff - node): max = deepest, then smallest
  __shared__ unsigned max_depth;
  // With batch == 0 a shared tree is still checked (as on the CPU) by a block with no row.
  const int64_t rows = (batch == 0 && parents_batch_stride == 0) ? 1 : batch;
  if (num_nodes < 1) {
    if (rows > 0 && blockIdx.x == 0 && threadIdx.x == 0) report(err, kTreeEmpty, 0, 0, 0, 0);
    return;
  }
  for (int64_t b = blockIdx.x; b < rows; b += gridDim.x) {
    const bool has_row = b < batch;
    const int32_t* par = parents + b * parents_batch_stride;
    int32_t* st = state + b * num_nodes;
    if (threadIdx.x == 0) {
      best_key = 0;
      max_depth = 0;
    }
    bool bad = false;
    for (int64_t i = threadIdx.x; i < num_nodes; i += blockDim.x) {
      bad |= !check_parent(err, par, i);
      store_shared_state(st + i, i == 0 ? 1 : -1);  // the root: depth 0, matches
    }
    if (__syncthreads_or(bad)) continue;  // reported; this row's outputs are not written
    bool progress = true;
    while (__syncthreads_or(progress)) {
      progress = false;
      for (int64_t i = 1 + threadIdx.x; i < num_nodes; i += blockDim.x) {
        if (load_shared_state(st + i) != -1) continue;
        const int64_t p = par[i];  // checked: 0 <= p < i
        const int32_t sp = load_shared_state(st + p);
        if (sp == -1) continue;
        const bool match = (sp & 1) && has_row && tokens[b * num_nodes + i] == predictions[b * num_nodes + p];
        store_shared_state(st + i, static_cast<int32_t>((((sp >> 1) + 1) << 1) | (match ? 1 : 0)));
        progress = true;
      }
    }
    for (int64_t i = threadIdx.x; i < num_nodes; i += blockDim.x) {
      const int32_t s = st[i];
      atomicMax(&max_depth, static_cast<unsigned>(s >> 1));
      if (s & 1) {
        atomicMax(&best_key, (static_cast<unsigned long long>(s >> 1) << 32) | (0xffffffffull - static_cast<unsigned long long>(i)));
      }
    }
    __syncthreads();
    if (threadIdx.x == 0) atomicMax(reinterpret_cast<unsigned long long*>(&err->result), static_cast<unsigned long long>(max_depth));
    if (has_row) {
      const int64_t best = static_cast<int64_t>(0xffffffffull - (best_key & 0xffffffffull));
      const int64_t len = static_cast<int64_t>(best_key >> 32) + 1;
      int64_t* path = accepted_nodes + b * num_nodes;
      for (int64_t j = len + threadIdx.x; j < num_nodes; j += blockDim.x) path[j] = -1;
      if (threadIdx.x == 0) {
        accept_len[b] = len;
        bonus[b] = predictions[b * num_nodes + best];
        int64_t node = best;
        for (int64_t j = len - 1; j >= 0; --j) {
          path[j] = node;
          if (j > 0) node = par[node];
        }
      }
    }
    __syncthreads();  // best_key and max_depth are reset for the next row
  }
}

// tokens, predictions [batch, num_nodes]; parents [num_nodes] (parents_batch_stride 0) or
// [batch, num_nodes] (stride num_nodes); state: scratch [max(batch, 1), num_nodes];
// accepted_nodes [batch, num_nodes], padded with -1: its first max_depth + 1 columns are the result.
// After read_error(), err->result holds the deepest depth of the trees (the CPU's path width - 1).
inline cudaError_t verify_greedy(const int64_t* tokens, const int64_t* predictions, const int32_t* parents,
                                 int64_t parents_batch_stride, int64_t batch, int64_t num_nodes, int32_t* state,
                                 int64_t* accept_len, int64_t* accepted_nodes, int64_t* bonus, DeviceError* err,
                                 cudaStream_t stream) {
  if (batch < 0 || num_nodes < 0 || (parents_batch_stride != 0 && parents_batch_stride != num_nodes)) {
    return cudaErrorInvalidValue;
  }
  cudaError_t e = clear_error(err, stream);
  if (e != cudaSuccess) return e;
  const unsigned threads = num_nodes <= 64 ? 64 : (num_nodes <= 128 ? 128 : 256);
  return launch(verify_greedy_kernel, dim3(blocks_for(batch, 1)), dim3(threads), 0, stream, tokens, predictions,
                parents, parents_batch_stride, batch, num_nodes, state, accept_len, accepted_nodes, bonus, err);
}

inline Status describe_verify_greedy_error(const DeviceError& e) {
  return e.code == 0 ? Status::Ok() : describe_tree_error(e);
}

}  // namespace token_recycling::kernels::cuda
