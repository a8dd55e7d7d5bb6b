// The verification forward's linear layers on the CPU: y = x @ w^T + bias for a few rows of x.
//
// A decode step forwards a handful of tokens (the root, a chain, a small tree). For so few rows a
// linear layer is bound by reading its weights, yet BLAS's general matrix product packs the weights
// first and, on the 2-core AVX2 machine this project measures on, a 2-row float32 product costs about
// 1.7x a 1-row one. This kernel streams each weight row once and multiplies it by every row of x while
// it sits in L1, prefetching the next rows meanwhile, so a forward of 1..4 tokens costs about what
// torch's one-token forward does.
//
// x: [n, in] (row stride x_stride, elements contiguous); w: [out, in] (row stride w_stride); bias:
// [out] or null; y: [n, out] (row stride y_stride). Only output features [o_begin, o_end) are written,
// so a caller can split the work between threads. x, bias and y are float32; the weights are float32
// or bfloat16 (W = float or bfloat16: a bf16 weight is widened to float32 in registers, so the
// weights stream at half the bytes). Accumulated in float32: within a few ulps of BLAS, summed in a
// different order. (A bf16 model's caller widens x and rounds y, as torch's bf16 linear does.)
#pragma once

#include <cstdint>
#include <string>
#include <type_traits>

#include "numeric.h"
#include "simd.h"
#include "status.h"

namespace token_recycling::kernels {

namespace skinny_detail {

// The portable version (the reference for the vectorized one, and the path on other CPUs).
template <typename W>
inline void rows_scalar(const float* x, int64_t n, int64_t x_stride, const W* w, int64_t in,
                        int64_t w_stride, const float* bias, float* y, int64_t y_stride, int64_t o_begin,
                        int64_t o_end) {
  for (int64_t o = o_begin; o < o_end; ++o) {
    const W* wr = w + o * w_stride;
    for (int64_t i = 0; i < n; ++i) {
      const float* xr = x + i * x_stride;
      float s = 0.f;
      for (int64_t k = 0; k < in; ++k) s += to_float(wr[k]) * xr[k];
      y[i * y_stride + o] = s + (bias ? bias[o] : 0.f);
    }
  }
}

#ifdef TOKEN_RECYCLING_AVX2
using simd::hsum;
using simd::load8;

// R weight rows times C rows of x: R*C accumulators; per 8 inputs, C loads of x and R of w feed R*C FMAs.
// next: the first of the R weight rows the caller takes after these (row stride w_stride; or null):
// they are prefetched at the same offsets while these are multiplied, so the memory system streams
// the next rows during the arithmetic instead of after it. Prefetching a few lines ahead within the current rows (before: 64 elements)
// left DRAM idle while the FMAs ran; with the next rows prefetched, a whole model's weights streamed
// from DRAM took 30-40% less time for 1-4 rows of x (C++ harness, SmolLM2-135M's 210 layers).
template <int R, int C, typename W>
__attribute__((target("avx2,fma"))) inline void tile(const W* const* w, const W* next, int64_t w_stride,
                                                     const float* const* x, int64_t in, const float* bias, float* y,
                                                     int64_t y_stride, int64_t o) {
  __m256 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= in; k += 8) {
    __m256 xv[C];
    for (int c = 0; c < C; ++c) xv[c] = _mm256_loadu_ps(x[c] + k);
    for (int r = 0; r < R; ++r) {
      if (next) _mm_prefetch(reinterpret_cast<const char*>(next + r * w_stride + k), _MM_HINT_T0);
      const __m256 wv = load8(w[r] + k);
      for (int c = 0; c < C; ++c) acc[r][c] = _mm256_fmadd_ps(wv, xv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) {
      float s = hsum(acc[r][c]);
      for (int64_t kk = k; kk < in; ++kk) s += to_float(w[r][kk]) * x[c][kk];
      y[c * y_stride + o + r] = s + (bias ? bias[o + r] : 0.f);
    }
}

// R weight rows (from o) against every row of x, in blocks of 3 rows of x (4 rows: 3 + 1), while the R
// rows sit in L1. The first block reads the weights from memory, so it takes as many rows as the
// registers allow: with weights streamed from DRAM (a whole model's), 3 + 1 beat 2 + 2 by 15-20% for
// 4 rows (the 2 + 2 split had been chosen on a cache-resident benchmark).
// next_too: rows [o + R, o + 2R) come next (inside the caller's range): prefetch them meanwhile.
template <int R, typename W>
__attribute__((target("avx2,fma"))) inline void weight_rows(const float* x, int64_t n, int64_t x_stride,
                                                            const W* w, int64_t in, int64_t w_stride,
                                                            const float* bias, float* y, int64_t y_stride,
                                                            int64_t o, bool next_too) {
  const W* wr[R];
  for (int r = 0; r < R; ++r) wr[r] = w + (o + r) * w_stride;
  const W* next = next_too ? w + (o + R) * w_stride : nullptr;
  for (int64_t i = 0; i < n;) {
    const int64_t left = n - i;
    const int c = left >= 3 ? 3 : static_cast<int>(left);
    const float* xr[3] = {x + i * x_stride, x + (i + (c > 1 ? 1 : 0)) * x_stride,
                          x + (i + (c > 2 ? 2 : 0)) * x_stride};  // unused slots repeat a row in range
    float* yi = y + i * y_stride;
    if (c == 3) tile<R, 3>(wr, next, w_stride, xr, in, bias, yi, y_stride, o);
    else if (c == 2) tile<R, 2>(wr, next, w_stride, xr, in, bias, yi, y_stride, o);
    else tile<R, 1>(wr, next, w_stride, xr, in, bias, yi, y_stride, o);
    i += c;
  }
}

template <typename W>
__attribute__((target("avx2,fma"))) inline void rows_avx2(const float* x, int64_t n, int64_t x_stride,
                                                           const W* w, int64_t in, int64_t w_stride,
                                                           const float* bias, float* y, int64_t y_stride,
                                                           int64_t o_begin, int64_t o_end) {
  int64_t o = o_begin;
  for (; o + 4 <= o_end; o += 4) weight_rows<4>(x, n, x_stride, w, in, w_stride, bias, y, y_stride, o, o + 8 <= o_end);
  for (; o < o_end; ++o) weight_rows<1>(x, n, x_stride, w, in, w_stride, bias, y, y_stride, o, o + 2 <= o_end);
}

using simd::cpu_has_avx2_fma;
#endif

}  // namespace skinny_detail

// True when skinny_linear(..., vectorized=true) takes the AVX2/FMA path on this CPU.
inline bool skinny_linear_vectorized() {
#ifdef TOKEN_RECYCLING_AVX2
  return skinny_detail::cpu_has_avx2_fma();
#else
  return false;
#endif
}

template <typename W>  // float or bfloat16 weights
inline Status skinny_linear(const float* x, int64_t n, int64_t x_stride, const W* w, int64_t out_features,
                            int64_t in_features, int64_t w_stride, const float* bias, float* y, int64_t y_stride,
                            int64_t o_begin, int64_t o_end, bool vectorized = true) {
  static_assert(std::is_same_v<W, float> || std::is_same_v<W, bfloat16>, "weights: float or bfloat16");
  Status s = CheckSizes({{"n", n}, {"out_features", out_features}, {"in_features", in_features},
                         {"o_begin", o_begin}});
  if (!s.ok) return s;
  if (n > 1 && x_stride < in_features) return Status::Error("x row stride " + std::to_string(x_stride) + " < in_features " + std::to_string(in_features));
  if (out_features > 1 && w_stride < in_features) return Status::Error("weight row stride " + std::to_string(w_stride) + " < in_features " + std::to_string(in_features));
  if (n > 1 && y_stride < out_features) return Status::Error("y row stride " + std::to_string(y_stride) + " < out_features " + std::to_string(out_features));
  if (o_end < o_begin || o_end > out_features) {
    return Status::Error("output range [" + std::to_string(o_begin) + ", " + std::to_string(o_end) +
                         ") is not inside [0, " + std::to_string(out_features) + ")");
  }
  if (n == 0 || o_end == o_begin) return Status::Ok();
#ifdef TOKEN_RECYCLING_AVX2
  if (vectorized && skinny_detail::cpu_has_avx2_fma()) {
    skinny_detail::rows_avx2(x, n, x_stride, w, in_features, w_stride, bias, y, y_stride, o_begin, o_end);
    return Status::Ok();
  }
#endif
  skinny_detail::rows_scalar(x, n, x_stride, w, in_features, w_stride, bias, y, y_stride, o_begin, o_end);
  return Status::Ok();
}

}  // namespace token_recycling::kernels
