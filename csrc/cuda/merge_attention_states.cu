#include "../../kernels/cuda/merge_attention_states.cuh"

#include "../ops.h"
#include "launch.h"

namespace token_recycling {

namespace {
template <typename T>
kc::MergeArgs<T> args(const at::Tensor& a, const at::Tensor& la, const at::Tensor& b, const at::Tensor& lb,
                      at::Tensor& out, at::Tensor& lse) {
  kc::MergeArgs<T> p{static_cast<const T*>(a.data_ptr()), static_cast<const T*>(b.data_ptr()),
                     static_cast<T*>(out.data_ptr()), {}, {}, {}, la.data_ptr<float>(), lb.data_ptr<float>(),
                     lse.data_ptr<float>(), a.size(0), a.size(1), a.size(2), a.size(3)};
  for (int i = 0; i < 4; ++i) {
    p.a_strides[i] = a.stride(i);
    p.b_strides[i] = b.stride(i);
    p.out_strides[i] = out.stride(i);
  }
  return p;
}
}  // namespace

// No device-side checks: shapes are checked here, so this op never waits for the GPU.
std::tuple<at::Tensor, at::Tensor> merge_attention_states_cuda(const at::Tensor& out_a, const at::Tensor& lse_a,
                                                               const at::Tensor& out_b, const at::Tensor& lse_b) {
  check_merge_attention_states_inputs(out_a, lse_a, out_b, lse_b);
  const c10::cuda::CUDAGuard guard(out_a.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto out = at::empty(out_a.sizes(), out_a.options());
  auto lse = at::empty(lse_a.sizes(), lse_a.options());
  const auto la = lse_a.contiguous(), lb = lse_b.contiguous();
  cudaError_t e;
  switch (out_a.scalar_type()) {
    case at::kFloat: e = kc::merge_attention_states<float>(args<float>(out_a, la, out_b, lb, out, lse), stream); break;
    case at::kHalf:
      e = kc::merge_attention_states<kernels::float16>(args<kernels::float16>(out_a, la, out_b, lb, out, lse), stream);
      break;
    default:
      e = kc::merge_attention_states<kernels::bfloat16>(args<kernels::bfloat16>(out_a, la, out_b, lb, out, lse), stream);
      break;
  }
  C10_CUDA_CHECK(e);
  return {out, lse};
}

}  // namespace token_recycling
