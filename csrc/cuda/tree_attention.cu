#include "../../kernels/cuda/tree_attention.cuh"

#include <algorithm>

#include "../ops.h"
#include "launch.h"

namespace token_recycling {

namespace {
template <typename T>
cudaError_t run(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                const kernels::TreeAttentionShape& shape, const int64_t* prefix, int64_t uniform_prefix,
                int64_t tree_start, const at::Tensor& mask, float scale, float* lse, kc::DeviceError* err,
                cudaStream_t stream) {
  kc::TreeAttentionArgs<T> a{static_cast<const T*>(q.data_ptr()), static_cast<const T*>(k.data_ptr()),
                             static_cast<const T*>(v.data_ptr()), static_cast<T*>(out.data_ptr()),
                             q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                             v.stride(0), v.stride(1), v.stride(2), shape, prefix, uniform_prefix,
                             reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>()), scale, lse, tree_start,
                             mask.dim() == 3 ? mask.size(1) * mask.size(2) : 0};
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  // The plan's key range: exact for a host prefix; for a prefix on the device (the CUDA-graph step) the
  // keys' whole length, a static cache's capacity, read without a sync. The kernel then splits each
  // row's live keys over the planned chunks, and the chunks past them exit at once.
  const int64_t key_len = tree_start >= 0 ? tree_start + shape.num_nodes
                         : prefix == nullptr ? uniform_prefix + shape.num_nodes : shape.seq;
  const kc::TreeAttentionPlan plan = kc::plan_tree_attention<T>(shape, key_len, sms);
  at::Tensor workspace;
  if (plan.workspace_bytes > 0) {
    workspace = at::empty({static_cast<int64_t>(plan.workspace_bytes)}, q.options().dtype(at::kByte));
  }
  return kc::tree_attention<T>(a, plan, plan.workspace_bytes > 0 ? workspace.data_ptr() : nullptr, err, stream);
}
}  // namespace

// prefix_len may be on the GPU (the kernel checks it; one read-back waits for the stream) or on the
// CPU (checked here; when all rows share one prefix nothing waits for the GPU).
namespace {
// Writes out [B, Hq, N, D] and, when lse is given, lse [B, Hq, N] (float, contiguous).
void tree_attention_into(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& prefix_len,
                         const at::Tensor& tree_mask, double scale, int64_t tree_start, at::Tensor& out, float* lse,
                         const char* op) {
  check_tree_attention_inputs(q, k, v, prefix_len, tree_mask, op, tree_start);
  const int64_t N = q.size(2), D = q.size(3);
  TORCH_CHECK_VALUE(N <= kc::kTreeAttentionMaxNodes, op, ": at most ", kc::kTreeAttentionMaxNodes,
                    " tree nodes on CUDA, got ", N);
  TORCH_CHECK_VALUE(kc::tree_attention_supports_head_dim(D), op, ": head_dim must be 64, 80, 96, 128 or 256 on CUDA, got ", D);
  const c10::cuda::CUDAGuard guard(q.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const kernels::TreeAttentionShape shape{q.size(0), q.size(1), k.size(1), N, k.size(2), D};
  if (out.numel() == 0) return;
  // The kernel reads rows of head_dim contiguously.
  const auto q_rows = q.stride(3) == 1 ? q : q.contiguous();
  const auto k_rows = k.stride(3) == 1 ? k : k.contiguous();
  const auto v_rows = v.stride(3) == 1 ? v : v.contiguous();
  const auto mask = tree_mask.contiguous();

  const int64_t* device_prefix = nullptr;
  int64_t uniform = 0;
  at::Tensor prefix;
  if (prefix_len.is_cpu()) {
    prefix = prefix_len.contiguous();
    const int64_t* pp = prefix.data_ptr<int64_t>();
    throw_if_error(kernels::CheckTreeAttentionShape(shape, pp, tree_start), op);
    uniform = pp[0];
    if (std::any_of(pp, pp + shape.batch, [&](int64_t x) { return x != uniform; })) {
      prefix = prefix.pin_memory().to(q.device(), /*non_blocking=*/true);
      device_prefix = prefix.data_ptr<int64_t>();
    }
  } else {
    prefix = prefix_len.contiguous();
    device_prefix = prefix.data_ptr<int64_t>();
  }
  const auto record = device_error_record(q.device());
  const float sc = static_cast<float>(scale);
  cudaError_t e;
  switch (q.scalar_type()) {
    case at::kFloat: e = run<float>(q_rows, k_rows, v_rows, out, shape, device_prefix, uniform, tree_start, mask, sc, lse, as_error_record(record), stream); break;
    case at::kHalf: e = run<kernels::float16>(q_rows, k_rows, v_rows, out, shape, device_prefix, uniform, tree_start, mask, sc, lse, as_error_record(record), stream); break;
    default: e = run<kernels::bfloat16>(q_rows, k_rows, v_rows, out, shape, device_prefix, uniform, tree_start, mask, sc, lse, as_error_record(record), stream); break;
  }
  if (prefix_len.is_cpu()) {
    C10_CUDA_CHECK(e);  // every value the kernel could object to was checked above
  } else {
    finish_checked(e, record, stream, kc::describe_tree_attention_error, op);
  }
}
}  // namespace

at::Tensor tree_attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const at::Tensor& prefix_len, const at::Tensor& tree_mask, double scale,
                               int64_t tree_start) {
  auto out = at::empty(q.sizes(), q.options());
  tree_attention_into(q, k, v, prefix_len, tree_mask, scale, tree_start, out, nullptr, "tree_attention");
  return out;
}

std::tuple<at::Tensor, at::Tensor> tree_attention_lse_cuda(const at::Tensor& q, const at::Tensor& k,
                                                           const at::Tensor& v, const at::Tensor& prefix_len,
                                                           const at::Tensor& tree_mask, double scale,
                                                           int64_t tree_start) {
  auto out = at::empty(q.sizes(), q.options());
  auto lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  tree_attention_into(q, k, v, prefix_len, tree_mask, scale, tree_start, out, lse.data_ptr<float>(), "tree_attention_lse");
  return {out, lse};
}

}  // namespace token_recycling
