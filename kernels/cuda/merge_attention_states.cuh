// merge_attention_states on the GPU, same contract as ../merge_attention_states.h: one thread per
// output element (row, d); the row's weights come from its two lse values (read by every thread of
// the row: two floats, cached). Nothing to validate on the device: the shapes are checked on the
// host and every index is derived from them.
#pragma once

#include <cmath>
#include <cstdint>

#include "device.cuh"

namespace token_recycling::kernels::cuda {

template <typename T>
struct MergeArgs {
  const T* a;
  const T* b;
  T* out;
  int64_t a_strides[4], b_strides[4], out_strides[4];
  const float* lse_a;  // [batch, heads, rows] contiguous
  const float* lse_b;
  float* lse_out;
  int64_t batch, heads, rows, head_dim;
};

template <typename T>
__global__ void __launch_bounds__(256) merge_attention_states_kernel(MergeArgs<T> p) {
  using D = typename device_type<T>::type;
  const int64_t total = p.batch * p.heads * p.rows * p.head_dim;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t d = e % p.head_dim, row = e / p.head_dim;
    const int64_t r = row % p.rows, h = (row / p.rows) % p.heads, x = row / (p.rows * p.heads);
    const float la = p.lse_a[row], lb = p.lse_b[row];
    const float m = fmaxf(la, lb);
    float wa = 0.f, wb = 0.f, lse = m;
    if (m != -INFINITY && !isnan(m)) {
      const float ea = __expf(la - m), eb = __expf(lb - m), s = ea + eb;
      wa = ea / s;
      wb = eb / s;
      lse = m + __logf(s);
    }
    const D* a = reinterpret_cast<const D*>(p.a);
    const D* b = reinterpret_cast<const D*>(p.b);
    D* out = reinterpret_cast<D*>(p.out);
    const float va = wa == 0.f ? 0.f : wa * to_float(a[x * p.a_strides[0] + h * p.a_strides[1] + r * p.a_strides[2] + d * p.a_strides[3]]);
    const float vb = wb == 0.f ? 0.f : wb * to_float(b[x * p.b_strides[0] + h * p.b_strides[1] + r * p.b_strides[2] + d * p.b_strides[3]]);
    out[x * p.out_strides[0] + h * p.out_strides[1] + r * p.out_strides[2] + d * p.out_strides[3]] = from_float<D>(va + vb);
    if (d == 0) p.lse_out[row] = lse;
  }
}

template <typename T>
cudaError_t merge_attention_states(const MergeArgs<T>& args, cudaStream_t stream) {
  const int64_t total = args.batch * args.heads * args.rows * args.head_dim;
  if (total == 0) return cudaSuccess;
  const int64_t blocks = (total + 255) / 256;
  return launch(merge_attention_states_kernel<T>, dim3(blocks_for(blocks < 65535 * 8 ? blocks : 65535 * 8, 1)),
                dim3(256), 0, stream, args);
}

}  // namespace token_recycling::kernels::cuda
