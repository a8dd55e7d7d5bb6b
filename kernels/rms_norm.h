// The elementwise tail of an RMS norm, as transformers' Llama and Qwen2 code computes it:
//
//   h = x.to(float32); variance = h.pow(2).mean(-1, keepdim=True)      (the caller's, see below)
//   out = weight * (h * rsqrt(variance + eps)).to(x.dtype)
//
// done in one pass per row instead of five tensor operations. Each step rounds as torch's does, so the
// result is the same bit for bit: variance + eps and the reciprocal square root in float32 (torch's
// rsqrt is 1 / sqrt, both correctly rounded), the product in float32, then for bfloat16 one rounding
// to nearest even, and weight times it computed in float32 and rounded to bfloat16 again. The variance
// comes from the caller: its sum runs in the reduction order of the caller's framework, which this
// kernel does not repeat. rms_norm_squares writes the float32 squares that sum reads (h * h, as torch's
// pow(2) computes them), so the caller makes one call of its framework's sum, divided by dim as mean
// divides (csrc/lean_ops.cpp: ATen's sum).
//
// x: [rows, dim] (row stride x_stride, elements contiguous); variance: [rows] float32; weight: [dim];
// out: [rows, dim] contiguous. T: float or bfloat16 (x, weight and out alike).
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "numeric.h"
#include "status.h"

namespace token_recycling::kernels {

namespace rms_norm_detail {
inline Status check_rows(int64_t rows, int64_t dim, int64_t x_stride) {
  Status s = CheckSizes({{"rows", rows}, {"dim", dim}});
  if (!s.ok) return s;
  if (rows > 1 && x_stride < dim) {
    return Status::Error("x row stride " + std::to_string(x_stride) + " < dim " + std::to_string(dim));
  }
  return Status::Ok();
}
}  // namespace rms_norm_detail

// squares[r, d] = float(x[r, d]) * float(x[r, d]): squares [rows, dim] contiguous float32.
template <typename T>
inline Status rms_norm_squares(const T* x, int64_t rows, int64_t dim, int64_t x_stride, float* squares) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, bfloat16>, "T: float or bfloat16");
  Status s = rms_norm_detail::check_rows(rows, dim, x_stride);
  if (!s.ok) return s;
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * x_stride;
    float* o = squares + r * dim;
    for (int64_t d = 0; d < dim; ++d) {
      const float h = to_float(xr[d]);
      o[d] = h * h;
    }
  }
  return Status::Ok();
}

template <typename T>
inline Status rms_norm_apply(const T* x, int64_t rows, int64_t dim, int64_t x_stride, const float* variance,
                             const T* weight, float eps, T* out) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, bfloat16>, "T: float or bfloat16");
  Status s = rms_norm_detail::check_rows(rows, dim, x_stride);
  if (!s.ok) return s;
  for (int64_t r = 0; r < rows; ++r) {
    const float scale = 1.0f / std::sqrt(variance[r] + eps);
    const T* xr = x + r * x_stride;
    T* o = out + r * dim;
    for (int64_t d = 0; d < dim; ++d) {
      const T normed = from_float<T>(to_float(xr[d]) * scale);
      o[d] = from_float<T>(to_float(weight[d]) * to_float(normed));
    }
  }
  return Status::Ok();
}

}  // namespace token_recycling::kernels
