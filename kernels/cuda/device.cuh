// The few CUDA features the kernels in this folder use, in one place. Under nvcc they are CUDA's
// own; under a plain C++ compiler they come from host_emulation.h, which runs a kernel's threads as
// host threads, so the kernels' logic can be checked against the CPU kernels on a machine without a
// GPU (bench/cpp/cuda_check.cpp). Element types at the API are the framework-free float16/bfloat16
// of numeric.h; device_type<T> maps them to __half/__nv_bfloat16 inside the kernels.
#pragma once

#include <cstddef>
#include <cstdint>

#include "../numeric.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>
#define TR_SHARED_ALIGN __align__(128)
#else
#include "host_emulation.h"
#endif

namespace token_recycling::kernels::cuda {

namespace wmma = nvcuda::wmma;

#if defined(__CUDACC__)
template <typename T> struct device_type { using type = T; };
template <> struct device_type<float16> { using type = __half; };
template <> struct device_type<bfloat16> { using type = __nv_bfloat16; };

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// The block's dynamic shared memory, 128-byte aligned (wmma needs 32-byte aligned tiles).
template <typename T>
__device__ __forceinline__ T* dynamic_smem() {
  extern __shared__ TR_SHARED_ALIGN unsigned char tr_dynamic_smem[];
  return reinterpret_cast<T*>(tr_dynamic_smem);
}

// Loads and stores of a value that other threads of the block may write during the same step:
// one aligned access, never cached in a register.
template <typename T> __device__ __forceinline__ T load_shared_state(const T* p) { return *const_cast<const volatile T*>(p); }
template <typename T> __device__ __forceinline__ void store_shared_state(T* p, T v) { *const_cast<volatile T*>(p) = v; }

// Launches kernel<<<grid, block, smem, stream>>>(args...); opts in to more than 48 KiB of shared memory.
template <typename... Params, typename... Args>
cudaError_t launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, Args... args) {
  if (smem > 48 * 1024) {
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (e != cudaSuccess) return e;
  }
  kernel<<<grid, block, smem, stream>>>(static_cast<Params>(args)...);
  return cudaGetLastError();
}
#else
template <typename T> struct device_type { using type = T; };
inline float to_float(float x) { return x; }
inline float to_float(float16 x) { return kernels::to_float(x); }
inline float to_float(bfloat16 x) { return kernels::to_float(x); }
template <typename T> inline T from_float(float x) { return kernels::from_float<T>(x); }

template <typename T> T* dynamic_smem() { return reinterpret_cast<T*>(emulation::block_smem()); }
template <typename T> T load_shared_state(const T* p) { return emulation::relaxed_load(p); }
template <typename T> void store_shared_state(T* p, T v) { emulation::relaxed_store(p, v); }
using emulation::launch;
#endif

// Whether every row that starts at p plus a multiple of these byte strides is 16-byte aligned.
template <typename... Strides>
__host__ __device__ __forceinline__ bool aligned16(const void* p, Strides... byte_strides) {
  return ((reinterpret_cast<uintptr_t>(p) | ... | static_cast<uintptr_t>(byte_strides)) % 16) == 0;
}

// Grid sizes: blocks for n items of per_block each, at least one, at most CUDA's x limit.
inline unsigned blocks_for(int64_t n, int64_t per_block) {
  const int64_t b = (n + per_block - 1) / per_block;
  return static_cast<unsigned>(b < 1 ? 1 : (b > 0x7fffffff ? 0x7fffffff : b));
}

}  // namespace token_recycling::kernels::cuda
