// Step 5 on the GPU, same contract as ../update_adjacency.h. Two launches: the first checks every
// value and, for each token, keeps the largest flat index that carries it (atomicMax into `last`);
// the second writes only those winners, so duplicate tokens resolve to the last occurrence exactly
// as on the CPU, and nothing is written when any value was bad.
#pragma once

#include <algorithm>
#include <cstdint>

#include "device_error.cuh"

namespace token_recycling::kernels::cuda {

enum UpdateAdjacencyErrorCode : int32_t { kAdjTokens = kFirstOpCode, kAdjCandidates };

// last[token] = 1 + the largest i with tokens[i] == token (0: none). Items [0, count) are tokens,
// [count, count + count * k) candidates.
template <typename CandT>
__global__ void __launch_bounds__(256)
    update_adjacency_resolve(int64_t vocab, int64_t k, const int64_t* tokens, const CandT* candidates, int64_t count,
                             unsigned* last, DeviceError* err) {
  const int64_t total = count + count * k;
  for (int64_t e = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; e < total; e += int64_t{gridDim.x} * blockDim.x) {
    if (e < count) {
      const int64_t t = tokens[e];
      if (t < 0 || t >= vocab) report(err, kAdjTokens, e, t, 0, vocab);
      else atomicMax(last + t, static_cast<unsigned>(e + 1));
    } else {
      const int64_t c = static_cast<int64_t>(candidates[e - count]);
      if (c < 0 || c >= vocab) report(err, kAdjCandidates, e - count, c, 0, vocab);
    }
  }
}

template <typename MatrixT, typename CandT>
__global__ void __launch_bounds__(256)
    update_adjacency_write(MatrixT* matrix, int64_t vocab, int64_t k, const int64_t* tokens, const CandT* candidates,
                           int64_t count, const unsigned* last, const DeviceError* err) {
  if (err->code != 0) return;  // the resolve launch found a bad value: write nothing
  for (int64_t e = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; e < count * k; e += int64_t{gridDim.x} * blockDim.x) {
    const int64_t i = e / k;
    const int64_t t = tokens[i];
    if (t < 0 || t >= vocab || last[t] != static_cast<unsigned>(i + 1)) continue;
    matrix[t * k + e % k] = static_cast<MatrixT>(candidates[e]);
  }
}

// matrix [vocab, k] row-major (updated in place), tokens [count], candidates [count, k];
// last: scratch of vocab unsigned ints. count must be below 2^32 - 1. All device pointers.
template <typename MatrixT, typename CandT>
cudaError_t update_adjacency(MatrixT* matrix, int64_t vocab, int64_t k, const int64_t* tokens, const CandT* candidates,
                             int64_t count, unsigned* last, DeviceError* err, cudaStream_t stream) {
  cudaError_t e = clear_error(err, stream);
  if (e == cudaSuccess && vocab > 0) e = cudaMemsetAsync(last, 0, sizeof(unsigned) * vocab, stream);
  if (e != cudaSuccess) return e;
  const unsigned blocks = std::min(blocks_for(count + count * k, 256), 1024u);  // the kernels loop over the rest
  e = launch(update_adjacency_resolve<CandT>, dim3(blocks), dim3(256), 0, stream, vocab, k, tokens, candidates, count,
             last, err);
  if (e != cudaSuccess) return e;
  return launch(update_adjacency_write<MatrixT, CandT>, dim3(blocks), dim3(256), 0, stream, matrix, vocab, k, tokens,
                candidates, count, static_cast<const unsigned*>(last), static_cast<const DeviceError*>(err));
}

inline Status describe_update_adjacency_error(const DeviceError& e) {
  switch (e.code) {
    case 0: return Status::Ok();
    case kAdjTokens: return OutOfRange("tokens", e.index, e.value, e.lo, e.hi);
    case kAdjCandidates: return OutOfRange("candidates", e.index, e.value, e.lo, e.hi);
    default: return Status::Error("unknown device error code " + std::to_string(e.code));
  }
}

}  // namespace token_recycling::kernels::cuda
