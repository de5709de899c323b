// Stand-in for cuda_fp16.h, for the host emulation: GCC's _Float16 (IEEE binary16; conversions
// from float round to nearest even, as __float2half_rn).
#pragma once
struct __half {
  _Float16 x;
};
inline float __half2float(__half h) { return float(h.x); }
inline __half __float2half_rn(float f) { return __half{static_cast<_Float16>(f)}; }
