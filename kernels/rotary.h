// Rotary position embedding as transformers' Llama and Qwen2 code applies it to q and k:
//
//   out = x * cos + rotate_half(x) * sin,   rotate_half(x) = cat(-x[..., d/2:], x[..., :d/2])
//
// in one pass instead of seven tensor operations per tensor. Each product and the sum round as
// torch's elementwise operations do (computed in float32; for bfloat16 each of the two products and
// the sum rounded to nearest even), so the result is the same bit for bit. The float32 sum of two
// products must not be contracted into a fused multiply-add (one rounding fewer than torch's): the
// function turns contraction off for GCC and Clang, whatever -march a build uses.
//
// x: [batch, heads, tokens, dim] with strides (sb, sh, st) and contiguous elements (q and k as
// view(...).transpose(1, 2) leave them); cos, sin: [batch, tokens, dim] contiguous (shared by every
// head); out: [batch, heads, tokens, dim] contiguous. dim must be even. T: float or bfloat16.
#pragma once

#include <cstdint>
#include <string>
#include <type_traits>

#include "numeric.h"
#include "status.h"

namespace token_recycling::kernels {

#if defined(__GNUC__) && !defined(__clang__)
#define TR_NO_FP_CONTRACT __attribute__((optimize("fp-contract=off")))
#else
#define TR_NO_FP_CONTRACT
#endif

template <typename T>
TR_NO_FP_CONTRACT inline Status rotary_embedding(const T* x, int64_t batch, int64_t heads, int64_t tokens, int64_t dim,
                                                 int64_t sb, int64_t sh, int64_t st, const T* cos, const T* sin,
                                                 T* out) {
#if defined(__clang__)
#pragma clang fp contract(off)
#endif
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, bfloat16>, "T: float or bfloat16");
  Status s = CheckSizes({{"batch", batch}, {"heads", heads}, {"tokens", tokens}, {"dim", dim}});
  if (!s.ok) return s;
  if (dim % 2 != 0) return Status::Error("dim must be even, got " + std::to_string(dim));
  const int64_t half = dim / 2;
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t t = 0; t < tokens; ++t) {
        const T* xr = x + b * sb + h * sh + t * st;
        const T* c = cos + (b * tokens + t) * dim;
        const T* sn = sin + (b * tokens + t) * dim;
        T* o = out + ((b * heads + h) * tokens + t) * dim;
        for (int64_t d = 0; d < dim; ++d) {
          const float rotated = d < half ? -to_float(xr[d + half]) : to_float(xr[d - half]);
          const T a = from_float<T>(to_float(xr[d]) * to_float(c[d]));
          const T r = from_float<T>(rotated * to_float(sn[d]));
          o[d] = from_float<T>(to_float(a) + to_float(r));
        }
      }
  return Status::Ok();
}

#undef TR_NO_FP_CONTRACT

}  // namespace token_recycling::kernels
