// Host stand-in for CUDA's <cuda_fp16.h>, for the host check only (see ../shim.h): an IEEE
// binary16 storage type and the two conversions group_norm.cu uses, rounding to nearest
// even like the device intrinsics (subnormals, overflow to infinity and NaN included).
// check.cpp tests these conversions against known bit patterns before running the kernels.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

struct __half {
  uint16_t bits;
};

inline float __half2float(__half h) {
  const uint32_t sign = (uint32_t)(h.bits & 0x8000u) << 16;
  const uint32_t e = (h.bits >> 10) & 0x1fu, m = h.bits & 0x3ffu;
  uint32_t x;
  if (e == 0) {
    const float f = std::ldexp((float)m, -24);  // zero or subnormal: exact
    return sign ? -f : f;
  }
  if (e == 31) x = sign | 0x7f800000u | (m << 13);  // infinity / NaN
  else x = sign | ((e + 112) << 23) | (m << 13);
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}

inline __half __float2half_rn(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
  const uint32_t a = x & 0x7fffffffu;
  if (a > 0x7f800000u) return {(uint16_t)(sign | 0x7e00u)};  // NaN
  if (a >= 0x477ff000u) return {(uint16_t)(sign | 0x7c00u)};  // >= 65520 rounds to infinity
  if (a < 0x38800000u) {                                      // below 2^-14: subnormal half
    float af;
    std::memcpy(&af, &a, 4);
    // af * 2^24 is exact; nearbyint rounds half to even in the default rounding mode.
    return {(uint16_t)(sign | (uint16_t)std::nearbyint(af * 16777216.0f))};
  }
  const uint32_t r = a - (112u << 23);  // rebias the exponent from 127 to 15
  uint32_t h = r >> 13;
  const uint32_t rem = r & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
  return {(uint16_t)(sign | h)};
}
