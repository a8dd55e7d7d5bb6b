// The verification forward's linear layers on the CPU: y = x @ w^T + bias for a few rows of x.
//
// A decode step forwards a handful of tokens (the root, a chain, a small tree). For so few rows a
// linear layer is bound by reading its weights, yet BLAS's general matrix product packs the weights
// first, which for two to a dozen rows costs more than the multiplication. This kernel streams each
// weight row once and multiplies it by every row of x while it sits in L1, prefetching the next rows
// meanwhile, so a forward of a few tokens costs about what torch's one-token forward does
// (bench/RESULTS.md, "What a verification forward costs").
//
// x: [n, in] (row stride x_stride, elements contiguous); w: [out, in] (row stride w_stride); bias:
// [out] or null; y: [n, out] (row stride y_stride). Only output features [o_begin, o_end) are written,
// so a caller can split the work between threads. bias is float32; the weights are float32 or
// bfloat16 (W), and x is float32, or bfloat16 with bfloat16 weights (X; a bf16 model's activations
// as they are). Accumulated in float32: within a few ulps of BLAS, summed in a different order. y is
// float32, or bfloat16 (Y), each output then rounded once from its float32 sum, as torch's bf16
// linear rounds it (a bf16 model's forward needs no float32 copy and no conversion after).
//
// Paths, the widest this CPU has (vectorized = false forces the portable one, avx512 = false stops at
// AVX2, so tests and benchmarks can reach each path on one machine):
// - AVX512-BF16 (with AVX-512F/BW/VL): 16 float32 lanes; bf16 x bf16 by vdpbf16ps, 32 products per
//   instruction. It does not outrun 16-lane float32 FMAs in products per second, but it halves the
//   bytes and instructions per product, which is what a few rows of a streamed weight are bound by
//   (bench/RESULTS.md, "What a verification forward costs"). That instruction treats bf16
//   denormals (|v| < 1.2e-38) as zero; every other product and sum is as exact as float32
//   arithmetic, summed in another order.
// - AVX2/FMA: 8 float32 lanes, a bf16 value widened in registers.
// - portable loops: the reference for both.
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
template <typename W, typename X, typename Y>
inline void rows_scalar(const X* x, int64_t n, int64_t x_stride, const W* w, int64_t in,
                        int64_t w_stride, const float* bias, Y* y, int64_t y_stride, int64_t o_begin,
                        int64_t o_end) {
  for (int64_t o = o_begin; o < o_end; ++o) {
    const W* wr = w + o * w_stride;
    for (int64_t i = 0; i < n; ++i) {
      const X* xr = x + i * x_stride;
      float s = 0.f;
      for (int64_t k = 0; k < in; ++k) s += to_float(wr[k]) * to_float(xr[k]);
      y[i * y_stride + o] = from_float<Y>(s + (bias ? bias[o] : 0.f));
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
// The prefetches go to L2 (_MM_HINT_T1), not L1: on a Zen 4 with this path forced, one row of x
// against SmolLM2's [1536, 576] layers streamed at 18.5 GB/s instead of 10.4 (one thread).
template <int R, int C, typename W, typename X, typename Y>
__attribute__((target("avx2,fma"))) inline void tile(const W* const* w, const W* next, int64_t w_stride,
                                                     const X* const* x, int64_t in, const float* bias, Y* y,
                                                     int64_t y_stride, int64_t o) {
  __m256 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= in; k += 8) {
    __m256 xv[C];
    for (int c = 0; c < C; ++c) xv[c] = load8(x[c] + k);
    for (int r = 0; r < R; ++r) {
      if (next) _mm_prefetch(reinterpret_cast<const char*>(next + r * w_stride + k), _MM_HINT_T1);
      const __m256 wv = load8(w[r] + k);
      for (int c = 0; c < C; ++c) acc[r][c] = _mm256_fmadd_ps(wv, xv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) {
      float s = hsum(acc[r][c]);
      for (int64_t kk = k; kk < in; ++kk) s += to_float(w[r][kk]) * to_float(x[c][kk]);
      y[c * y_stride + o + r] = from_float<Y>(s + (bias ? bias[o + r] : 0.f));
    }
}

// R weight rows (from o) against every row of x, in blocks of 3 rows of x (4 rows: 3 + 1), while the R
// rows sit in L1. The first block reads the weights from memory, so it takes as many rows as the
// registers allow: with weights streamed from DRAM (a whole model's), 3 + 1 beat 2 + 2 by 15-20% for
// 4 rows (the 2 + 2 split had been chosen on a cache-resident benchmark).
// next_too: rows [o + R, o + 2R) come next (inside the caller's range): prefetch them meanwhile.
template <int R, typename W, typename X, typename Y>
__attribute__((target("avx2,fma"))) inline void weight_rows(const X* x, int64_t n, int64_t x_stride,
                                                            const W* w, int64_t in, int64_t w_stride,
                                                            const float* bias, Y* y, int64_t y_stride,
                                                            int64_t o, bool next_too) {
  const W* wr[R];
  for (int r = 0; r < R; ++r) wr[r] = w + (o + r) * w_stride;
  const W* next = next_too ? w + (o + R) * w_stride : nullptr;
  for (int64_t i = 0; i < n;) {
    const int64_t left = n - i;
    const int c = left >= 3 ? 3 : static_cast<int>(left);
    const X* xr[3] = {x + i * x_stride, x + (i + (c > 1 ? 1 : 0)) * x_stride,
                          x + (i + (c > 2 ? 2 : 0)) * x_stride};  // unused slots repeat a row in range
    Y* yi = y + i * y_stride;
    if (c == 3) tile<R, 3>(wr, next, w_stride, xr, in, bias, yi, y_stride, o);
    else if (c == 2) tile<R, 2>(wr, next, w_stride, xr, in, bias, yi, y_stride, o);
    else tile<R, 1>(wr, next, w_stride, xr, in, bias, yi, y_stride, o);
    i += c;
  }
}

template <typename W, typename X, typename Y>
__attribute__((target("avx2,fma"))) inline void rows_avx2(const X* x, int64_t n, int64_t x_stride,
                                                           const W* w, int64_t in, int64_t w_stride,
                                                           const float* bias, Y* y, int64_t y_stride,
                                                           int64_t o_begin, int64_t o_end) {
  int64_t o = o_begin;
  for (; o + 4 <= o_end; o += 4) weight_rows<4>(x, n, x_stride, w, in, w_stride, bias, y, y_stride, o, o + 8 <= o_end);
  for (; o < o_end; ++o) weight_rows<1>(x, n, x_stride, w, in, w_stride, bias, y, y_stride, o, o + 2 <= o_end);
}

// The lane sums of 16 vectors in one vector, in four halving rounds (15 adds instead of 16 separate
// reductions' 64 operations, a visible share of a cached layer's time at 4-8 rows next to
// _mm512_reduce_add_ps per accumulator): lane 4q + m holds the sum of v[4m + q].
//   round 1: v[2i], v[2i+1] -> u[i], 128-bit quarters [v2i, v2i, v2i+1, v2i+1] (partial sums)
//   round 2: u[2j], u[2j+1] -> w[j], quarters [v4j, v4j+1, v4j+2, v4j+3], each quarter 4 partial sums
//   round 3: w[0], w[1] -> x0 (and w[2], w[3] -> x1): quarter q = [v_q, v_4+q, v_q, v_4+q] partial sums
//   round 4: x0, x1 -> quarter q = [v_q, v_4+q, v_8+q, v_12+q], whole sums
__attribute__((target(TOKEN_RECYCLING_AVX512_TARGET))) inline __m512 sum16(const __m512* v) {
  __m512 u[8], w[4];
  for (int i = 0; i < 8; ++i)
    u[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  for (int j = 0; j < 4; ++j)
    w[j] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * j], u[2 * j + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(u[2 * j], u[2 * j + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 x0 = _mm512_add_ps(_mm512_unpacklo_ps(w[0], w[1]), _mm512_unpackhi_ps(w[0], w[1]));
  const __m512 x1 = _mm512_add_ps(_mm512_unpacklo_ps(w[2], w[3]), _mm512_unpackhi_ps(w[2], w[3]));
  return _mm512_add_ps(_mm512_shuffle_ps(x0, x1, _MM_SHUFFLE(1, 0, 1, 0)),
                       _mm512_shuffle_ps(x0, x1, _MM_SHUFFLE(3, 2, 3, 2)));
}

// Loops over a tile's registers must unroll completely, or the accumulators live in memory.
#define TR_UNROLL _Pragma("GCC unroll 16")

// The AVX-512 tile: R weight rows times C rows of x, 64 bytes of each weight row per step (16 floats,
// or 32 bf16 values), the last step masked (masked-off lanes load zero and touch no memory). bf16 x
// bf16 multiplies by vdpbf16ps: lane j accumulates the products of elements 2j and 2j + 1.
// next: R weight rows a caller takes later (PREFETCH_ROWS past these; or null), prefetched into L2
// at the same offsets while these are multiplied. Into L2, not L1, and 16 rows ahead rather than
// the next R: one thread then streamed SmolLM2's weights at 20-31 GB/s for one to four rows of x
// (a plain sum reads memory at about 30 GB/s), where prefetches into L1 of the next rows gave
// 10-11 GB/s (C++ harness, 2-vCPU Zen 4).
template <int R, int C, typename W, typename X, typename Y>
__attribute__((target(TOKEN_RECYCLING_AVX512_TARGET))) inline void tile512(
    const W* const* w, const W* next, int64_t w_stride, const X* const* x, int64_t in, const float* bias, Y* y,
    int64_t y_stride, int64_t o) {
  constexpr bool pairs = std::is_same_v<W, bfloat16> && std::is_same_v<X, bfloat16>;
  constexpr int64_t step = pairs ? 32 : 16;
  __m512 acc[R][C];
  TR_UNROLL for (int r = 0; r < R; ++r)
    TR_UNROLL for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t k = 0; k < in; k += step) {
    const int64_t left = in - k;
    if constexpr (pairs) {
      const __mmask32 m = left >= 32 ? ~__mmask32{0} : static_cast<__mmask32>((uint64_t{1} << left) - 1);
      __m512bh xv[C];
      TR_UNROLL for (int c = 0; c < C; ++c) xv[c] = (__m512bh)_mm512_maskz_loadu_epi16(m, x[c] + k);
      TR_UNROLL for (int r = 0; r < R; ++r) {
        if (next) _mm_prefetch(reinterpret_cast<const char*>(next + r * w_stride + k), _MM_HINT_T1);
        const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(m, w[r] + k);
        TR_UNROLL for (int c = 0; c < C; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], wv, xv[c]);
      }
    } else {
      const __mmask16 m = left >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
      __m512 xv[C];
      TR_UNROLL for (int c = 0; c < C; ++c) xv[c] = simd::load16(x[c] + k, m);
      TR_UNROLL for (int r = 0; r < R; ++r) {
        if (next) _mm_prefetch(reinterpret_cast<const char*>(next + r * w_stride + k), _MM_HINT_T1);
        const __m512 wv = simd::load16(w[r] + k, m);
        TR_UNROLL for (int c = 0; c < C; ++c) acc[r][c] = _mm512_fmadd_ps(wv, xv[c], acc[r][c]);
      }
    }
  }
  if constexpr (R * C >= 8) {  // the sums of up to 16 accumulators at once (sum16), not one by one
    __m512 v[16];
    TR_UNROLL for (int i = 0; i < 16; ++i) v[i] = i < R * C ? acc[i / C][i % C] : _mm512_setzero_ps();
    alignas(64) float sums[16];
    _mm512_store_ps(sums, sum16(v));
    TR_UNROLL for (int i = 0; i < R * C; ++i) {
      const int r = i / C, c = i % C;
      y[c * y_stride + o + r] = from_float<Y>(sums[4 * (i % 4) + i / 4] + (bias ? bias[o + r] : 0.f));
    }
  } else {
    TR_UNROLL for (int r = 0; r < R; ++r)
      TR_UNROLL for (int c = 0; c < C; ++c)
        y[c * y_stride + o + r] = from_float<Y>(_mm512_reduce_add_ps(acc[r][c]) + (bias ? bias[o + r] : 0.f));
  }
}

inline constexpr int64_t PREFETCH_ROWS = 16;  // how far ahead of a tile's first weight row to prefetch

// R weight rows (from o) against every row of x in blocks of up to CM rows (R * CM <= 16
// accumulators), while the R rows sit in L1. next_too: rows [o + PREFETCH_ROWS, o + PREFETCH_ROWS + R)
// are inside the caller's range: prefetch them meanwhile.
template <int R, int CM, typename W, typename X, typename Y>
__attribute__((target(TOKEN_RECYCLING_AVX512_TARGET))) inline void weight_rows512(
    const X* x, int64_t n, int64_t x_stride, const W* w, int64_t in, int64_t w_stride, const float* bias, Y* y,
    int64_t y_stride, int64_t o, bool next_too) {
  static_assert(CM >= 1 && CM <= 4 && R * CM <= 16, "at most 16 accumulators");
  const W* wr[R];
  for (int r = 0; r < R; ++r) wr[r] = w + (o + r) * w_stride;
  const W* next = next_too ? w + (o + PREFETCH_ROWS) * w_stride : nullptr;
  for (int64_t i = 0; i < n;) {
    const int c = n - i >= CM ? CM : static_cast<int>(n - i);
    const X* xr[4];
    for (int j = 0; j < 4; ++j) xr[j] = x + (i + (j < c ? j : 0)) * x_stride;  // unused slots repeat a row in range
    Y* yi = y + i * y_stride;
    if constexpr (CM >= 4) {
      if (c == 4) tile512<R, 4>(wr, next, w_stride, xr, in, bias, yi, y_stride, o);
    }
    if constexpr (CM >= 3) {
      if (c == 3) tile512<R, 3>(wr, next, w_stride, xr, in, bias, yi, y_stride, o);
    }
    if constexpr (CM >= 2) {
      if (c == 2) tile512<R, 2>(wr, next, w_stride, xr, in, bias, yi, y_stride, o);
    }
    if (c == 1) tile512<R, 1>(wr, next, w_stride, xr, in, bias, yi, y_stride, o);
    i += c;
  }
}

// The widest tile the rows of x allow, so that each weight row read from memory feeds 16
// accumulators: 16 weight rows for one row of x, 8 for two, else 4 in blocks of up to 4 rows of x
// (a tile of 4 weight rows and 1 row of x left the loads waiting on 4 separate reductions).
template <typename W, typename X, typename Y>
__attribute__((target(TOKEN_RECYCLING_AVX512_TARGET))) inline void rows_avx512(
    const X* x, int64_t n, int64_t x_stride, const W* w, int64_t in, int64_t w_stride, const float* bias, Y* y,
    int64_t y_stride, int64_t o_begin, int64_t o_end) {
  int64_t o = o_begin;
  const auto ahead = [&](int64_t r) { return o + PREFETCH_ROWS + r <= o_end; };
  if (n == 1) {
    for (; o + 16 <= o_end; o += 16) weight_rows512<16, 1>(x, n, x_stride, w, in, w_stride, bias, y, y_stride, o, ahead(16));
  } else if (n == 2) {
    for (; o + 8 <= o_end; o += 8) weight_rows512<8, 2>(x, n, x_stride, w, in, w_stride, bias, y, y_stride, o, ahead(8));
  }
  for (; o + 4 <= o_end; o += 4) weight_rows512<4, 4>(x, n, x_stride, w, in, w_stride, bias, y, y_stride, o, ahead(4));
  for (; o < o_end; ++o) weight_rows512<1, 4>(x, n, x_stride, w, in, w_stride, bias, y, y_stride, o, false);
}

using simd::cpu_has_avx2_fma;
using simd::cpu_has_avx512_bf16;
#endif

}  // namespace skinny_detail

// True when skinny_linear(..., vectorized=true) takes a vectorized path (AVX2/FMA or wider) on this CPU.
inline bool skinny_linear_vectorized() {
#ifdef TOKEN_RECYCLING_AVX2
  return skinny_detail::cpu_has_avx2_fma();
#else
  return false;
#endif
}

// The path skinny_linear(..., vectorized=true) takes on this CPU: "avx512-bf16", "avx2" or "portable".
inline const char* skinny_linear_path() {
#ifdef TOKEN_RECYCLING_AVX2
  if (skinny_detail::cpu_has_avx512_bf16()) return "avx512-bf16";
  if (skinny_detail::cpu_has_avx2_fma()) return "avx2";
#endif
  return "portable";
}

// W: float or bfloat16 weights; X: float x, or bfloat16 x with bfloat16 weights; Y: float y, or
// bfloat16 y (each output rounded once from its float32 sum, bias included, to nearest even).
template <typename W, typename X, typename Y>
inline Status skinny_linear(const X* x, int64_t n, int64_t x_stride, const W* w, int64_t out_features,
                            int64_t in_features, int64_t w_stride, const float* bias, Y* y, int64_t y_stride,
                            int64_t o_begin, int64_t o_end, bool vectorized = true, bool avx512 = true) {
  static_assert(std::is_same_v<W, float> || std::is_same_v<W, bfloat16>, "weights: float or bfloat16");
  static_assert(std::is_same_v<X, float> || (std::is_same_v<X, bfloat16> && std::is_same_v<W, bfloat16>),
                "x: float, or bfloat16 with bfloat16 weights");
  static_assert(std::is_same_v<Y, float> || std::is_same_v<Y, bfloat16>, "y: float or bfloat16");
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
  if (vectorized && avx512 && skinny_detail::cpu_has_avx512_bf16()) {
    skinny_detail::rows_avx512(x, n, x_stride, w, in_features, w_stride, bias, y, y_stride, o_begin, o_end);
    return Status::Ok();
  }
  if (vectorized && skinny_detail::cpu_has_avx2_fma()) {
    skinny_detail::rows_avx2(x, n, x_stride, w, in_features, w_stride, bias, y, y_stride, o_begin, o_end);
    return Status::Ok();
  }
#endif
  skinny_detail::rows_scalar(x, n, x_stride, w, in_features, w_stride, bias, y, y_stride, o_begin, o_end);
  return Status::Ok();
}

}  // namespace token_recycling::kernels
