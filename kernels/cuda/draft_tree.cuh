// Step 1 on the GPU, same contract as ../draft_tree.h. One launch for the batch: a block per row
// fills the row level by level; a node is written as soon as its parent's token is there.
#pragma once

#include <cstdint>

#include "device_error.cuh"

namespace token_recycling::kernels::cuda {

enum DraftTreeErrorCode : int32_t { kDraftRanks = kFirstOpCode, kDraftRoots, kDraftMatrixEntry };

// tokens[b, i] == -1 means "not written yet" (a written token is in [0, vocab)). Each node has one
// writer and a token never changes once written, so reading a parent that another thread writes
// during the same round yields either -1 (retry next round) or the final value.
template <typename MatrixT>
__global__ void __launch_bounds__(256)
    build_draft_tree_kernel(const MatrixT* matrix, int64_t vocab, int64_t k, const int64_t* roots, int64_t batch,
                            const int32_t* parents, const int32_t* ranks, int64_t num_nodes, int64_t* tokens,
                            DeviceError* err) {
  if (num_nodes < 1) {
    if (blockIdx.x == 0 && threadIdx.x == 0) report(err, kTreeEmpty, 0, 0, 0, 0);
    return;
  }
  for (int64_t i = threadIdx.x; i < num_nodes; i += blockDim.x) {
    if (check_parent(err, parents, i) && i > 0 && (ranks[i] < 0 || ranks[i] >= k)) {
      report(err, kDraftRanks, i, ranks[i], 0, k);
    }
  }
  for (int64_t b = blockIdx.x; b < batch; b += gridDim.x) {
    int64_t* row = tokens + b * num_nodes;
    for (int64_t i = threadIdx.x; i < num_nodes; i += blockDim.x) {
      int64_t value = -1;
      if (i == 0) {
        value = roots[b];
        if (value < 0 || value >= vocab) {
          report(err, kDraftRoots, b, value, 0, vocab);
          value = -1;
        }
      }
      store_shared_state(row + i, value);
    }
    bool progress = true;
    while (__syncthreads_or(progress)) {  // one round per tree level; stops when nothing moved
      progress = false;
      for (int64_t i = 1 + threadIdx.x; i < num_nodes; i += blockDim.x) {
        if (load_shared_state(row + i) != -1) continue;
        const int64_t p = parents[i], r = ranks[i];
        if (p < 0 || p >= i || r < 0 || r >= k) continue;  // reported above
        const int64_t parent_token = load_shared_state(row + p);
        if (parent_token < 0) continue;  // not written yet
        const int64_t flat = parent_token * k + r;
        const int64_t next = static_cast<int64_t>(matrix[flat]);
        if (next < 0 || next >= vocab) {
          report(err, kDraftMatrixEntry, flat, next, 0, vocab);
          continue;
        }
        store_shared_state(row + i, next);
        progress = true;
      }
    }
  }
}

// matrix [vocab, k] row-major, roots [batch], parents/ranks [num_nodes], tokens [batch, num_nodes]:
// all device pointers. Errors land in *err (device memory), read with read_error().
template <typename MatrixT>
cudaError_t build_draft_tree(const MatrixT* matrix, int64_t vocab, int64_t k, const int64_t* roots, int64_t batch,
                             const int32_t* parents, const int32_t* ranks, int64_t num_nodes, int64_t* tokens,
                             DeviceError* err, cudaStream_t stream) {
  cudaError_t e = clear_error(err, stream);
  if (e != cudaSuccess) return e;
  const unsigned threads = num_nodes <= 64 ? 64 : (num_nodes <= 128 ? 128 : 256);
  return launch(build_draft_tree_kernel<MatrixT>, dim3(blocks_for(batch, 1)), dim3(threads), 0, stream, matrix,
                vocab, k, roots, batch, parents, ranks, num_nodes, tokens, err);
}

inline Status describe_draft_tree_error(const DeviceError& e) {
  switch (e.code) {
    case 0: return Status::Ok();
    case kDraftRanks: return OutOfRange("ranks", e.index, e.value, e.lo, e.hi);
    case kDraftRoots: return OutOfRange("roots", e.index, e.value, e.lo, e.hi);
    case kDraftMatrixEntry: return OutOfRange("matrix entry", e.index, e.value, e.lo, e.hi);
    default: return describe_tree_error(e);
  }
}

}  // namespace token_recycling::kernels::cuda
