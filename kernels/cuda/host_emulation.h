// A small host emulation of the CUDA features device.cuh exposes, for checking kernel logic on a
// machine without a GPU (never for speed). A launch runs blocks one after another; a block's threads
// are real host threads, so barriers, shuffles, votes and atomics behave as on a GPU, and a missing
// barrier can show up as a wrong result. __shared__ becomes `static`: one copy, shared by the
// block's threads (blocks never overlap). A wmma fragment holds the whole 16x16 tile, and only lane 0
// computes it (kernels never look inside fragments, and lane 0 stores them), to keep this fast.
// Device memory is host memory; streams are ignored; every call completes before it returns.
// Build with -fno-strict-aliasing: kernels move data as 16-byte uint4 vectors, a CUDA idiom.
#pragma once

#if defined(__CUDACC__)
#error "host_emulation.h is for plain C++ builds; nvcc uses CUDA itself"
#endif

#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#include "../numeric.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __restrict__ __restrict
#define __launch_bounds__(...)

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint4 { unsigned x, y, z, w; };

using cudaError_t = int;
using cudaStream_t = void*;
constexpr cudaError_t cudaSuccess = 0;
constexpr cudaError_t cudaErrorInvalidValue = 1;
enum cudaMemcpyKind { cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost, cudaMemcpyDeviceToDevice };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount };

inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace token_recycling::kernels::cuda::emulation {

struct Warp {
  std::barrier<> barrier{32};
  uint64_t exchange[32];
};

struct Block {
  explicit Block(unsigned threads, size_t smem_bytes)
      : barrier(threads), smem(smem_bytes + 128, 0xff) {  // 0xff bytes read as NaN: unset memory shows
    for (unsigned w = 0; w < (threads + 31) / 32; ++w) warps.push_back(std::make_unique<Warp>());
  }
  std::barrier<> barrier;
  std::vector<std::unique_ptr<Warp>> warps;
  std::vector<unsigned char> smem;
  std::atomic<int> vote{0};
};

inline thread_local Block* current_block = nullptr;

inline unsigned char* block_smem() {
  auto p = reinterpret_cast<uintptr_t>(current_block->smem.data());
  return reinterpret_cast<unsigned char*>((p + 127) & ~uintptr_t{127});
}
inline unsigned lane() { return threadIdx.x % 32; }
inline Warp& warp() { return *current_block->warps[threadIdx.x / 32]; }

template <typename T> T relaxed_load(const T* p) { return std::atomic_ref<T>(*const_cast<T*>(p)).load(std::memory_order_relaxed); }
template <typename T> void relaxed_store(T* p, T v) { std::atomic_ref<T>(*p).store(v, std::memory_order_relaxed); }

// Runs blocks in order; in each, blockDim.x threads run the kernel (1-D blocks, a multiple of 32).
// The same host threads serve every block of the launch; each block gets fresh barriers.
template <typename... Params, typename... Args>
cudaError_t launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t, Args... args) {
  if (block.y != 1 || block.z != 1 || block.x == 0 || block.x % 32 != 0) return cudaErrorInvalidValue;
  const uint64_t blocks = uint64_t{grid.x} * grid.y * grid.z;
  std::barrier<> between_blocks(block.x);
  std::unique_ptr<Block> state;
  std::vector<std::thread> threads;
  for (unsigned t = 0; t < block.x; ++t) {
    threads.emplace_back([&, t] {
      threadIdx = dim3(t, 0, 0);
      blockDim = block;
      gridDim = grid;
      for (uint64_t i = 0; i < blocks; ++i) {
        if (t == 0) state = std::make_unique<Block>(block.x, smem);
        between_blocks.arrive_and_wait();
        blockIdx = dim3(static_cast<unsigned>(i % grid.x), static_cast<unsigned>(i / grid.x % grid.y),
                        static_cast<unsigned>(i / grid.x / grid.y));
        current_block = state.get();
        kernel(static_cast<Params>(args)...);
        // An exited thread no longer holds up the block's barriers (as on the GPU).
        warp().barrier.arrive_and_drop();
        current_block->barrier.arrive_and_drop();
        between_blocks.arrive_and_wait();
      }
    });
  }
  for (auto& th : threads) th.join();
  return cudaSuccess;
}

}  // namespace token_recycling::kernels::cuda::emulation

// ----------------------------------------------------------------------------- synchronisation
inline void __syncthreads() { token_recycling::kernels::cuda::emulation::current_block->barrier.arrive_and_wait(); }
inline int __syncthreads_or(int predicate) {
  auto* b = token_recycling::kernels::cuda::emulation::current_block;
  b->barrier.arrive_and_wait();  // earlier readers of the vote are done
  if (predicate) b->vote.fetch_or(1);
  b->barrier.arrive_and_wait();
  const int result = b->vote.load();
  b->barrier.arrive_and_wait();
  if (threadIdx.x == 0) b->vote.store(0);
  return result;
}
inline void __syncwarp(unsigned = 0xffffffffu) { token_recycling::kernels::cuda::emulation::warp().barrier.arrive_and_wait(); }

template <typename T>
inline T __shfl_xor_sync(unsigned, T value, int lane_mask) {
  static_assert(sizeof(T) <= 8);
  auto& w = token_recycling::kernels::cuda::emulation::warp();
  const unsigned me = token_recycling::kernels::cuda::emulation::lane();
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  w.barrier.arrive_and_wait();
  w.exchange[me] = bits;
  w.barrier.arrive_and_wait();
  bits = w.exchange[me ^ static_cast<unsigned>(lane_mask)];
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}
inline unsigned __ballot_sync(unsigned, int predicate) {
  auto& w = token_recycling::kernels::cuda::emulation::warp();
  w.barrier.arrive_and_wait();
  w.exchange[token_recycling::kernels::cuda::emulation::lane()] = predicate ? 1 : 0;
  w.barrier.arrive_and_wait();
  unsigned bits = 0;
  for (unsigned l = 0; l < 32; ++l) bits |= static_cast<unsigned>(w.exchange[l]) << l;
  return bits;
}

// ----------------------------------------------------------------------------- atomics
inline int atomicCAS(int* p, int expected, int desired) {
  std::atomic_ref<int>(*p).compare_exchange_strong(expected, desired);
  return expected;
}
template <typename T>
inline T atomicMax(T* p, T v) {
  std::atomic_ref<T> a(*p);
  T old = a.load();
  while (old < v && !a.compare_exchange_weak(old, v)) {
  }
  return old;
}

// ----------------------------------------------------------------------------- runtime
inline cudaError_t cudaMemsetAsync(void* p, int value, size_t n, cudaStream_t = nullptr) {
  std::memset(p, value, n);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t n, cudaMemcpyKind, cudaStream_t = nullptr) {
  std::memcpy(dst, src, n);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpy(void* dst, const void* src, size_t n, cudaMemcpyKind kind) {
  return cudaMemcpyAsync(dst, src, n, kind);
}
inline cudaError_t cudaMalloc(void** p, size_t n) {
  *p = std::malloc(n > 0 ? n : 1);
  return *p != nullptr ? cudaSuccess : cudaErrorInvalidValue;
}
inline cudaError_t cudaFree(void* p) { std::free(p); return cudaSuccess; }
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr, int) { *v = 4; return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "invalid value"; }

// ----------------------------------------------------------------------------- wmma
namespace nvcuda::wmma {
struct row_major {};
struct col_major {};
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  float v[16][16];  // the whole tile, in float, in every lane
};

namespace detail {
inline float as_float(float x) { return x; }
inline float as_float(token_recycling::kernels::float16 x) { return token_recycling::kernels::to_float(x); }
inline float as_float(token_recycling::kernels::bfloat16 x) { return token_recycling::kernels::to_float(x); }
}  // namespace detail

inline bool computing_lane() { return token_recycling::kernels::cuda::emulation::lane() == 0; }

template <typename Use, typename T, typename Layout, typename P>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const P* p, unsigned ldm) {
  token_recycling::kernels::cuda::emulation::warp().barrier.arrive_and_wait();
  if (!computing_lane()) return;
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c)
      f.v[r][c] = detail::as_float(std::is_same_v<Layout, col_major> ? p[c * ldm + r] : p[r * ldm + c]);
}
template <typename T>
inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, T>& f, const float* p, unsigned ldm, layout_t layout) {
  token_recycling::kernels::cuda::emulation::warp().barrier.arrive_and_wait();
  if (!computing_lane()) return;
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) f.v[r][c] = layout == mem_col_major ? p[c * ldm + r] : p[r * ldm + c];
}
template <typename T>
inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, T>& f, unsigned ldm, layout_t layout) {
  auto& w = token_recycling::kernels::cuda::emulation::warp();
  w.barrier.arrive_and_wait();
  if (computing_lane()) {
    for (int r = 0; r < 16; ++r)
      for (int c = 0; c < 16; ++c) (layout == mem_col_major ? p[c * ldm + r] : p[r * ldm + c]) = f.v[r][c];
  }
  w.barrier.arrive_and_wait();
}
template <typename Use, typename T, typename Layout>
inline void fill_fragment(fragment<Use, 16, 16, 16, T, Layout>& f, float value) {
  if (!computing_lane()) return;
  for (auto& row : f.v)
    for (float& x : row) x = value;
}
template <typename TA, typename LA, typename TB, typename LB, typename TC>
inline void mma_sync(fragment<accumulator, 16, 16, 16, TC>& d, const fragment<matrix_a, 16, 16, 16, TA, LA>& a,
                     const fragment<matrix_b, 16, 16, 16, TB, LB>& b, const fragment<accumulator, 16, 16, 16, TC>& c) {
  if (!computing_lane()) return;
  float out[16][16];
  for (int r = 0; r < 16; ++r)
    for (int n = 0; n < 16; ++n) {
      float acc = c.v[r][n];
      for (int k = 0; k < 16; ++k) acc += a.v[r][k] * b.v[k][n];
      out[r][n] = acc;
    }
  std::memcpy(d.v, out, sizeof(out));
}
}  // namespace nvcuda::wmma
