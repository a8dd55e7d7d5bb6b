// AVX2/FMA and AVX-512 building blocks shared by the CPU kernels' vectorized paths (skinny_linear.h,
// tree_attention.h). Each function is compiled for its instruction set on its own (target attribute),
// so the library still builds for, and runs on, any x86-64 CPU: callers check cpu_has_avx2_fma() or
// cpu_has_avx512_bf16() first and otherwise take a narrower or the portable path. Off x86-64 (or
// without GCC/Clang) TOKEN_RECYCLING_AVX2 is not defined and only the portable paths exist.
#pragma once

#include "numeric.h"

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define TOKEN_RECYCLING_AVX2 1
#include <immintrin.h>
#endif

namespace token_recycling::kernels::simd {

#ifdef TOKEN_RECYCLING_AVX2
inline bool cpu_has_avx2_fma() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}

// AVX-512F/BW/VL plus AVX512-BF16 (bf16 pair dot products, vdpbf16ps): Intel since Cooper Lake and
// Sapphire Rapids, AMD since Zen 4. One level, so a kernel has one AVX-512 variant, not several.
#define TOKEN_RECYCLING_AVX512_TARGET "avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma"
inline bool cpu_has_avx512_bf16() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
  return ok;
}

__attribute__((target("avx2,fma"))) inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

__attribute__((target("avx2,fma"))) inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

// Eight values as float32: a load, or for bf16 a widening (bf16 is the top half of a float32).
__attribute__((target("avx2,fma"))) inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
__attribute__((target("avx2,fma"))) inline __m256 load8(const bfloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// Sixteen values as float32, the lanes past `mask` zero (a masked load never touches memory there).
__attribute__((target(TOKEN_RECYCLING_AVX512_TARGET))) inline __m512 load16(const float* p, __mmask16 mask) {
  return _mm512_maskz_loadu_ps(mask, p);
}
__attribute__((target(TOKEN_RECYCLING_AVX512_TARGET))) inline __m512 load16(const bfloat16* p, __mmask16 mask) {
  const __m256i h = _mm256_maskz_loadu_epi16(mask, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// e^x for eight floats x <= 0 (softmax weights after subtracting the row maximum). x = n ln2 + r with
// |r| <= ln2 / 2 (ln2 split in two parts so n ln2 is exact), e^r by its degree-7 Taylor polynomial
// (relative error < 2e-7 on that interval, about 2 ulp after rounding), then scaled by 2^n through the
// exponent bits. Below -87 (where e^x is under float's normal range) the result is 0; NaN stays NaN.
__attribute__((target("avx2,fma"))) inline __m256 exp8_nonpositive(__m256 x) {
  const __m256 tiny = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_LT_OQ);
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);  // ln2's high part: n * it is exact
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.4286068202862268e-06f), r);     // and its low part
  __m256 p = _mm256_set1_ps(1.0f / 5040.0f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(tiny, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}
#endif

}  // namespace token_recycling::kernels::simd
