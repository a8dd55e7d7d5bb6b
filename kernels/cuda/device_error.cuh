// How a CUDA kernel reports bad input: it never traps and never touches memory outside the ranges
// it was given. On a bad value it records what was wrong in a DeviceError (the first report wins)
// and skips the access; the host reads the record with one small copy and turns it into the same
// message the CPU kernel gives (status.h). When several values are bad, which one is named is not
// specified.
#pragma once

#include <cstdint>
#include <string>

#include "../status.h"
#include "device.cuh"

namespace token_recycling::kernels::cuda {

struct DeviceError {
  int32_t code;  // 0: no error; otherwise the op's reason code
  int32_t op;    // in an accumulated record (merge_error): which op reported it (the adapter's op id)
  int64_t index, value, lo, hi;
  int64_t result;  // a value the host needs back with the record (verify_greedy: the deepest tree depth)
};

__device__ __forceinline__ void report(DeviceError* e, int32_t code, int64_t index, int64_t value, int64_t lo,
                                       int64_t hi) {
  if (atomicCAS(&e->code, 0, code) == 0) {
    e->index = index;
    e->value = value;
    e->lo = lo;
    e->hi = hi;
  }
}

inline cudaError_t clear_error(DeviceError* e, cudaStream_t stream) {
  return cudaMemsetAsync(e, 0, sizeof(DeviceError), stream);
}

// Deferred checks (csrc/device_errors.h): an op's record ORed into a record accumulated over many ops,
// without waiting for the GPU. The first error merged wins; `op` tags which op reported it.
// (A template only so that every translation unit may include this header.)
template <typename Record>
__global__ void merge_error_kernel(Record* into, const Record* from, int32_t op) {
  if (threadIdx.x != 0 || blockIdx.x != 0 || from->code == 0) return;
  if (atomicCAS(&into->code, 0, from->code) == 0) {
    into->op = op;
    into->index = from->index;
    into->value = from->value;
    into->lo = from->lo;
    into->hi = from->hi;
    into->result = from->result;
  }
}

inline cudaError_t merge_error(DeviceError* into, const DeviceError* from, int32_t op, cudaStream_t stream) {
  return launch(merge_error_kernel<DeviceError>, dim3(1), dim3(32), 0, stream, into, from, op);  // one warp; thread 0 works
}

// Waits for the stream and copies the record to the host.
inline cudaError_t read_error(const DeviceError* device_record, DeviceError* host_record, cudaStream_t stream) {
  cudaError_t e = cudaMemcpyAsync(host_record, device_record, sizeof(DeviceError), cudaMemcpyDeviceToHost, stream);
  return e != cudaSuccess ? e : cudaStreamSynchronize(stream);
}

// Reason codes shared by the ops that take a tree as parent indices (CheckTreeParents in status.h).
enum TreeErrorCode : int32_t { kTreeEmpty = 1, kTreeRoot = 2, kTreeOrder = 3, kFirstOpCode = 16 };

__device__ __forceinline__ bool check_parent(DeviceError* err, const int32_t* parents, int64_t i) {
  const int64_t p = parents[i];
  if (i == 0) {
    if (p == -1) return true;
    report(err, kTreeRoot, 0, p, -1, 0);
    return false;
  }
  if (p >= 0 && p < i) return true;
  report(err, kTreeOrder, i, p, 0, i);
  return false;
}

// The CPU kernels' messages for the tree codes; an empty Status message for any other code.
inline Status describe_tree_error(const DeviceError& e) {
  switch (e.code) {
    case kTreeEmpty: return Status::Error("tree has no nodes (the root is node 0)");
    case kTreeRoot:
      return Status::Error("parents[0] must be -1 (node 0 is the root), got " + std::to_string(e.value));
    case kTreeOrder:
      return Status::Error("parents[" + std::to_string(e.index) + "] = " + std::to_string(e.value) +
                           " breaks topological order (need 0 <= parents[i] < i)");
    default: return Status::Error("");
  }
}

}  // namespace token_recycling::kernels::cuda
