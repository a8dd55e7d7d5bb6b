#include "../kernels/skinny_linear.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <optional>
#include <string>
#include <vector>

#include "checks.h"
#include "ops.h"

namespace token_recycling {

namespace {

// One weight of a call: [out, in] (W: float or bf16) and its float32 bias (or null), writing output
// columns [column, column + out) of y.
struct Part {
  const void* w;
  int64_t out, w_stride, column;
  const float* bias;
};

// x rows [n, in] (X: float32, or bf16 with bf16 weights; row elements contiguous) times each part's
// weight into its columns of y [n, y_stride] (Y: float32, or bf16 rounded once from the float32 sums).
// The kernel works on four weight rows at a time; a part's rows are grouped in fours from its own first
// row, so every output is computed as one call of skinny_linear on that weight alone computes it. The
// sizes and strides are checked once (an empty output range), then the threads split the groups of
// all parts, 16 groups at least per thread: so a key or value projection of a small model (192 rows)
// splits too, which took 9-16 us on one thread and 7-11 us on two at 4-8 rows of x (2-vCPU Zen 4).
template <typename W, typename X, typename Y>
void run(const char* op, const at::Tensor& xc, int64_t n, int64_t in, const std::vector<Part>& parts, Y* yp,
         int64_t y_stride, bool vectorized) {
  const X* xp = reinterpret_cast<const X*>(xc.data_ptr());
  const int64_t x_stride = n > 1 ? xc.stride(0) : in;
  std::vector<int64_t> first_group(parts.size() + 1, 0);  // part i owns groups [first_group[i], first_group[i + 1])
  for (size_t i = 0; i < parts.size(); ++i) {
    const auto& p = parts[i];
    throw_if_error(kernels::skinny_linear(xp, n, x_stride, static_cast<const W*>(p.w), p.out, in, p.w_stride,
                                          p.bias, yp + p.column, y_stride, 0, 0, vectorized), op);
    first_group[i + 1] = first_group[i] + (p.out + 3) / 4;
  }
  at::parallel_for(0, first_group.back(), 16, [&](int64_t begin, int64_t end) {
    for (size_t i = 0; i < parts.size(); ++i) {
      const int64_t lo = std::max(begin, first_group[i]), hi = std::min(end, first_group[i + 1]);
      if (lo >= hi) continue;
      const auto& p = parts[i];
      const int64_t g = first_group[i];
      const auto s = kernels::skinny_linear(xp, n, x_stride, static_cast<const W*>(p.w), p.out, in, p.w_stride,
                                            p.bias, yp + p.column, y_stride, 4 * (lo - g),
                                            std::min(4 * (hi - g), p.out), vectorized);
      TORCH_INTERNAL_ASSERT(s.ok, s.message);  // checked above: the ranges are inside [0, out)
    }
  });
}

// x [..., in] as rows [n, in]: rows may be strided (not overlapping: an expanded x is copied); the
// elements of a row must be contiguous.
at::Tensor rows_of(const at::Tensor& x, int64_t n, int64_t in) {
  const auto x2 = x.dim() == 2 ? x : x.reshape({n, in});
  return x2.stride(1) == 1 && (n <= 1 || x2.stride(0) >= in) ? x2 : x2.contiguous();
}

// x [..., in] times each weight [out_i, in] (+ bias_i) into y [..., sum out_i], the weights' outputs
// side by side in their order. Every argument is checked, naming it as the op's schema does.
at::Tensor linear_cat(const char* op, const at::Tensor& x, const std::vector<at::Tensor>& weights,
                      const std::vector<std::optional<at::Tensor>>& biases, bool vectorized, bool one) {
  TORCH_CHECK_VALUE(!weights.empty(), op, ": weights must hold at least one weight, got none");
  check_dtype(weights[0], {at::kFloat, at::kBFloat16}, op, one ? "weight" : "weights[0]");
  const auto dtype = weights[0].scalar_type();
  check_dtype(x, {dtype}, op, "x");
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": x must have at least 1 dimension (its last is in_features), got a scalar");
  const int64_t in = x.size(-1);
  std::vector<at::Tensor> kept;  // contiguous weights and float32 biases, alive for the call
  std::vector<Part> parts;
  int64_t total = 0;
  for (size_t i = 0; i < weights.size(); ++i) {
    const std::string name = one ? std::string("weight") : "weights[" + std::to_string(i) + "]";
    const std::string bias_name = one ? std::string("bias") : "biases[" + std::to_string(i) + "]";
    const auto& weight = weights[i];
    check_dtype(weight, {at::kFloat, at::kBFloat16}, op, name.c_str());
    TORCH_CHECK_TYPE(weight.scalar_type() == dtype, op, ": ", name, " must have the dtype of the first weight (",
                      dtype, "), got ", weight.scalar_type());
    check_dim(weight, 2, op, name.c_str());
    check_size(weight, 1, in, op, name.c_str(), "in_features, x.size(-1)");
    check_device(weight, x.device(), op, name.c_str());
    const int64_t out = weight.size(0);
    const auto wc = weight.stride(1) == 1 && (out <= 1 || weight.stride(0) >= in) ? weight : weight.contiguous();
    kept.push_back(wc);
    const float* bp = nullptr;
    if (biases[i].has_value()) {
      const auto& bias = *biases[i];
      check_dtype(bias, {dtype}, op, bias_name.c_str());
      check_dim(bias, 1, op, bias_name.c_str());
      check_size(bias, 0, out, op, bias_name.c_str(), "out_features, weight.size(0)");
      check_device(bias, x.device(), op, bias_name.c_str());
      kept.push_back(bias.to(at::kFloat).contiguous());
      bp = kept.back().data_ptr<float>();
    }
    parts.push_back({wc.data_ptr(), out, out > 1 ? wc.stride(0) : in, total, bp});
    total += out;
  }
  // A bf16 x goes to the kernel as it is, and the kernel writes a bf16 y, each output rounded once from
  // its float32 sum, as torch's bf16 linear accumulates in float32.
  int64_t n = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) n *= x.size(d);
  const auto xc = rows_of(x, n, in);
  auto out_shape = x.sizes().vec();
  out_shape.back() = total;
  auto y = at::empty(out_shape, x.options());
  if (dtype == at::kBFloat16) {
    run<kernels::bfloat16, kernels::bfloat16>(op, xc, n, in, parts,
                                              reinterpret_cast<kernels::bfloat16*>(y.data_ptr()), total, vectorized);
  } else {
    run<float, float>(op, xc, n, in, parts, y.data_ptr<float>(), total, vectorized);
  }
  return y;
}

}  // namespace

at::Tensor skinny_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                             bool vectorized) {
  return linear_cat("skinny_linear", x, {weight}, {bias}, vectorized, true);
}

at::Tensor skinny_linear_cat_cpu(const at::Tensor& x, at::TensorList weights, at::TensorList biases, bool vectorized) {
  constexpr const char* op = "skinny_linear_cat";
  TORCH_CHECK_VALUE(biases.empty() || biases.size() == weights.size(), op, ": biases must be empty or hold one "
                    "bias per weight (", weights.size(), "), got ", biases.size());
  std::vector<std::optional<at::Tensor>> b(weights.size());
  for (size_t i = 0; i < biases.size(); ++i) b[i] = biases[i];
  return linear_cat(op, x, weights.vec(), b, vectorized, false);
}

bool skinny_linear_vectorized() { return kernels::skinny_linear_vectorized(); }

}  // namespace token_recycling
