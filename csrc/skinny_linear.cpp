#include "../kernels/skinny_linear.h"

#include <ATen/Parallel.h>

#include <algorithm>

#include "checks.h"
#include "ops.h"

namespace token_recycling {

namespace {

// x rows [n, in] (X: float32, or bf16 with bf16 weights; row elements contiguous) times weight [out, in]
// (W: float or bf16) into y [n, out] (Y: float32, or bf16 rounded once from the float32 sums).
template <typename W, typename X, typename Y>
void run(const at::Tensor& xc, int64_t n, const at::Tensor& wc, const float* bp, Y* yp, bool vectorized) {
  constexpr const char* op = "skinny_linear";
  const int64_t out = wc.size(0), in = wc.size(1);
  const X* xp = reinterpret_cast<const X*>(xc.data_ptr());
  const W* wp = reinterpret_cast<const W*>(wc.data_ptr());
  const int64_t x_stride = n > 1 ? xc.stride(0) : in, w_stride = out > 1 ? wc.stride(0) : in;
  // The sizes and strides are checked once (an empty output range), then the threads split the output
  // features in groups of four (the kernel works on four weight rows at a time), 16 groups at least per
  // thread: so a key or value projection of a small model (192 rows) splits too, which took 9-16 us on
  // one thread and 7-11 us on two at 4-8 rows of x (2-vCPU Zen 4).
  throw_if_error(kernels::skinny_linear(xp, n, x_stride, wp, out, in, w_stride, bp, yp, out, 0, 0, vectorized), op);
  at::parallel_for(0, (out + 3) / 4, 16, [&](int64_t begin, int64_t end) {
    const auto s = kernels::skinny_linear(xp, n, x_stride, wp, out, in, w_stride, bp, yp, out, 4 * begin,
                                          std::min(4 * end, out), vectorized);
    TORCH_INTERNAL_ASSERT(s.ok, s.message);  // checked above: the ranges are inside [0, out)
  });
}

}  // namespace

at::Tensor skinny_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                             bool vectorized) {
  constexpr const char* op = "skinny_linear";
  check_dtype(weight, {at::kFloat, at::kBFloat16}, op, "weight");
  check_dtype(x, {weight.scalar_type()}, op, "x");
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": x must have at least 1 dimension (its last is in_features), got a scalar");
  check_dim(weight, 2, op, "weight");
  check_size(weight, 1, x.size(-1), op, "weight", "in_features, x.size(-1)");
  check_device(weight, x.device(), op, "weight");
  const bool bf16 = weight.scalar_type() == at::kBFloat16;
  at::Tensor b;
  if (bias.has_value()) {
    check_dtype(*bias, {weight.scalar_type()}, op, "bias");
    check_dim(*bias, 1, op, "bias");
    check_size(*bias, 0, weight.size(0), op, "bias", "out_features, weight.size(0)");
    check_device(*bias, x.device(), op, "bias");
    b = bias->to(at::kFloat).contiguous();
  }
  // x [..., in] as rows [n, in]: rows may be strided (not overlapping: an expanded x is copied); the
  // elements of a row must be contiguous. A bf16 x goes to the kernel as it is, and the kernel writes a
  // bf16 y, each output rounded once from its float32 sum, as torch's bf16 linear accumulates in float32.
  const int64_t out = weight.size(0), in = x.size(-1);
  int64_t n = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) n *= x.size(d);
  const auto x2 = x.dim() == 2 ? x : x.reshape({n, in});
  const auto xc = x2.stride(1) == 1 && (n <= 1 || x2.stride(0) >= in) ? x2 : x2.contiguous();
  const auto wc = weight.stride(1) == 1 && (out <= 1 || weight.stride(0) >= in) ? weight : weight.contiguous();
  auto out_shape = x.sizes().vec();
  out_shape.back() = out;
  auto y = at::empty(out_shape, x.options());
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  if (bf16) {
    run<kernels::bfloat16, kernels::bfloat16>(xc, n, wc, bp, reinterpret_cast<kernels::bfloat16*>(y.data_ptr()),
                                              vectorized);
  } else {
    run<float, float>(xc, n, wc, bp, y.data_ptr<float>(), vectorized);
  }
  return y;
}

bool skinny_linear_vectorized() { return kernels::skinny_linear_vectorized(); }

}  // namespace token_recycling
