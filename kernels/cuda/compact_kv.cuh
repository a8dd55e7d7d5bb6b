// Step 4 on the GPU, same contract as ../compact_kv.h, for every layer's keys and values in one
// copy launch (after a small launch that checks the indices). A block owns one (tensor, b, h): it
// stages the accepted rows in shared memory, a slice of head_dim at a time, before writing any of
// them, so any permutation is safe. Rows move as 16-byte vectors when the tensor allows it.
#pragma once

#include <cstdint>

#include "../compact_kv.h"
#include "device_error.cuh"

namespace token_recycling::kernels::cuda {

enum CompactErrorCode : int32_t { kCompactPrefix = kFirstOpCode, kCompactAcceptLen, kCompactFit, kCompactNodes };

// The staging buffer holds at least one 16-byte unit per accepted row.
constexpr int64_t kCompactSmemBytes = 48 * 1024;
constexpr int64_t kCompactMaxPathWidth = kCompactSmemBytes / 16;

// The checks of CheckCompactIndices (../compact_kv.h), one thread per row b.
__global__ void __launch_bounds__(256)
    compact_kv_check(int64_t batch, int64_t seq, const int64_t* prefix_len, const int64_t* accepted_nodes,
                     int64_t path_width, const int64_t* accept_len, DeviceError* err) {
  for (int64_t b = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; b < batch; b += int64_t{gridDim.x} * blockDim.x) {
    const int64_t p = prefix_len[b], n = accept_len[b];
    if (p < 0 || p > seq) {
      report(err, kCompactPrefix, b, p, 0, seq + 1);
    } else if (n < 0 || n > path_width) {
      report(err, kCompactAcceptLen, b, n, 0, path_width + 1);
    } else if (p + n > seq) {
      report(err, kCompactFit, b, p + n, 0, seq);
    } else {
      for (int64_t j = 0; j < n; ++j) {
        const int64_t node = accepted_nodes[b * path_width + j];
        if (node < 0 || node >= seq - p) {  // (p + node could overflow)
          report(err, kCompactNodes, b * path_width + j, node, 0, seq - p);
          break;
        }
      }
    }
  }
}

// Moves n rows (row j <- row nodes[j]) of `dim` units of type U; rows are stride_s units apart,
// elements stride_d units apart. Every thread of the block calls it with the same arguments.
template <typename U>
__device__ void compact_rows(U* base, const int64_t* nodes, int64_t n, int64_t dim, int64_t stride_s, int64_t stride_d,
                             int64_t smem_bytes) {
  U* stage = dynamic_smem<U>();
  const int64_t chunk = smem_bytes / (n * static_cast<int64_t>(sizeof(U)));  // >= 1: n <= path width
  for (int64_t d0 = 0; d0 < dim; d0 += chunk) {
    const int64_t width = dim - d0 < chunk ? dim - d0 : chunk;
    for (int64_t e = threadIdx.x; e < n * width; e += blockDim.x) {
      const int64_t j = e / width, d = d0 + e % width;
      stage[e] = base[nodes[j] * stride_s + d * stride_d];
    }
    __syncthreads();
    for (int64_t e = threadIdx.x; e < n * width; e += blockDim.x) {
      const int64_t j = e / width, d = d0 + e % width;
      base[j * stride_s + d * stride_d] = stage[e];
    }
    __syncthreads();
  }
}

// Grid: x over heads, y over rows b, z over tensors (each loops when the grid is smaller).
template <typename T>
__global__ void __launch_bounds__(128)
    compact_kv_copy(const KvTensor<T>* tensors, int64_t num_tensors, int64_t batch, int64_t seq,
                    const int64_t* prefix_len, const int64_t* accepted_nodes, int64_t path_width,
                    const int64_t* accept_len, int64_t smem_bytes, const DeviceError* err) {
  if (err->code != 0) return;  // the check launch found a bad index: move nothing
  for (int64_t t = blockIdx.z; t < num_tensors; t += gridDim.z) {
    const KvTensor<T> c = tensors[t];
    for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
      const int64_t p = prefix_len[b], n = accept_len[b];
      const int64_t* nodes = accepted_nodes + b * path_width;
      // Checked by compact_kv_check; checked again (by every thread alike) so no access can stray.
      bool ok = p >= 0 && n > 0 && n <= path_width && p + n <= seq;
      for (int64_t j = 0; ok && j < n; ++j) ok = nodes[j] >= 0 && nodes[j] < seq - p;
      if (!ok) continue;
      const int64_t es = sizeof(T);
      const bool vec = c.stride_d == 1 && aligned16(c.data, c.dim * es, c.stride_b * es, c.stride_h * es, c.stride_s * es);
      for (int64_t h = blockIdx.x; h < c.heads; h += gridDim.x) {
        T* base = c.data + b * c.stride_b + h * c.stride_h + p * c.stride_s;
        if (vec) {
          const int64_t per = 16 / es;
          compact_rows(reinterpret_cast<uint4*>(base), nodes, n, c.dim / per, c.stride_s / per, 1, smem_bytes);
        } else {
          compact_rows(base, nodes, n, c.dim, c.stride_s, c.stride_d, smem_bytes);
        }
      }
    }
  }
}

// tensors: device array of num_tensors views (host_tensors: the same views readable on the host, for
// the grid size). prefix_len, accept_len [batch], accepted_nodes [batch, path_width] on the device.
// T only needs the element size (uint8_t, uint16_t, uint32_t, uint64_t). path_width must not exceed
// kCompactMaxPathWidth.
template <typename T>
cudaError_t compact_kv(const KvTensor<T>* tensors, const KvTensor<T>* host_tensors, int64_t num_tensors, int64_t batch,
                       int64_t seq, const int64_t* prefix_len, const int64_t* accepted_nodes, int64_t path_width,
                       const int64_t* accept_len, DeviceError* err, cudaStream_t stream) {
  if (path_width > kCompactMaxPathWidth) return cudaErrorInvalidValue;
  cudaError_t e = clear_error(err, stream);
  if (e != cudaSuccess || batch == 0) return e;
  e = launch(compact_kv_check, dim3(blocks_for(batch, 256)), dim3(256), 0, stream, batch, seq, prefix_len,
             accepted_nodes, path_width, accept_len, err);
  if (e != cudaSuccess || num_tensors == 0 || path_width == 0) return e;
  int64_t max_heads = 0, max_row_bytes = 16;
  for (int64_t t = 0; t < num_tensors; ++t) {
    const KvTensor<T>& c = host_tensors[t];
    if (c.heads > max_heads) max_heads = c.heads;
    const int64_t row = (c.dim * static_cast<int64_t>(sizeof(T)) + 15) / 16 * 16;
    if (row > max_row_bytes) max_row_bytes = row;
  }
  if (max_heads == 0) return cudaSuccess;
  const int64_t smem = path_width * max_row_bytes < kCompactSmemBytes ? path_width * max_row_bytes : kCompactSmemBytes;
  const dim3 grid(static_cast<unsigned>(max_heads < 65535 ? max_heads : 65535), static_cast<unsigned>(batch < 65535 ? batch : 65535),
                  static_cast<unsigned>(num_tensors < 65535 ? num_tensors : 65535));
  return launch(compact_kv_copy<T>, grid, dim3(128), static_cast<size_t>(smem), stream, tensors, num_tensors, batch,
                seq, prefix_len, accepted_nodes, path_width, accept_len, smem, static_cast<const DeviceError*>(err));
}

inline Status describe_compact_kv_error(const DeviceError& e) {
  switch (e.code) {
    case 0: return Status::Ok();
    case kCompactPrefix: return OutOfRange("prefix_len", e.index, e.value, e.lo, e.hi);
    case kCompactAcceptLen: return OutOfRange("accept_len", e.index, e.value, e.lo, e.hi);
    case kCompactFit:
      return Status::Error("prefix_len[" + std::to_string(e.index) + "] + accept_len[" + std::to_string(e.index) +
                           "] = " + std::to_string(e.value) + " exceeds the cache length " + std::to_string(e.hi));
    case kCompactNodes: return OutOfRange("accepted_nodes", e.index, e.value, e.lo, e.hi);
    default: return Status::Error("unknown device error code " + std::to_string(e.code));
  }
}

}  // namespace token_recycling::kernels::cuda
