// Storage types for half-precision values without any framework: bit-compatible with
// torch's at::Half / at::BFloat16 and CUDA's __half / __nv_bfloat16. Math happens in float.
#pragma once

#include <cstdint>
#include <cstring>

namespace token_recycling::kernels {

struct float16 { uint16_t bits; };
struct bfloat16 { uint16_t bits; };

inline float bits_to_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t float_to_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

inline float to_float(float x) { return x; }
inline float to_float(bfloat16 x) { return bits_to_float(static_cast<uint32_t>(x.bits) << 16); }
inline float to_float(float16 x) {
  const uint32_t sign = (x.bits & 0x8000u) << 16;
  uint32_t exp = (x.bits >> 10) & 0x1f, man = x.bits & 0x3ffu;
  if (exp == 0x1f) return bits_to_float(sign | 0x7f800000u | (man << 13));  // inf / nan
  if (exp == 0) {
    if (man == 0) return bits_to_float(sign);
    // Subnormal half: normalise into a float.
    int e = -1;
    do { man <<= 1; ++e; } while ((man & 0x400u) == 0);
    return bits_to_float(sign | static_cast<uint32_t>(127 - 15 - e) << 23 | ((man & 0x3ffu) << 13));
  }
  return bits_to_float(sign | (exp + 112) << 23 | (man << 13));
}

template <typename T> T from_float(float x);
template <> inline float from_float<float>(float x) { return x; }
template <> inline bfloat16 from_float<bfloat16>(float x) {
  uint32_t u = float_to_bits(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return {static_cast<uint16_t>((u >> 16) | 0x40)};  // quiet nan
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return {static_cast<uint16_t>(u >> 16)};
}
template <> inline float16 from_float<float16>(float x) {
  const uint32_t u = float_to_bits(x);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t absu = u & 0x7fffffffu;
  if (absu > 0x7f800000u) return {static_cast<uint16_t>(sign | 0x7e00u)};   // nan
  if (absu >= 0x477ff000u) return {static_cast<uint16_t>(sign | 0x7c00u)};  // overflows to inf
  if (absu < 0x38800000u) {  // result is subnormal or zero: round abs(x) * 2^24 to an integer
    const float scaled = bits_to_float(absu) * 16777216.0f;
    uint32_t m = static_cast<uint32_t>(scaled);
    const float frac = scaled - static_cast<float>(m);
    if (frac > 0.5f || (frac == 0.5f && (m & 1u))) ++m;
    return {static_cast<uint16_t>(sign | m)};
  }
  uint32_t r = absu - (112u << 23);  // rebias the exponent
  r += 0xfffu + ((r >> 13) & 1u);    // round to nearest even on the 13 dropped bits
  return {static_cast<uint16_t>(sign | (r >> 13))};
}

}  // namespace token_recycling::kernels
