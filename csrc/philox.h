// Philox 4x32-10 counter-based random numbers, shared by the CPU and CUDA kernels (host and
// device). Framework-free: no torch headers.
//
// The stream is the one of Triton's `tl.randn4x(seed, offset)` (triton/language/random.py), so
// the C++ CPU, CUDA and Triton kernels and the pure-PyTorch reference draw the same numbers:
//
//   key     = (lo32(seed), hi32(seed))
//   counter = (lo32(c), hi32(c), stream, 0)            c: 64-bit counter, stream: 32-bit
//   x0..x3  = Philox4x32 with 10 rounds (key bumped after every round)
//   u_j     = (x_j as int32, mapped to |.|-ish by x < 0 ? -x-1 : x) * 4.6566127342e-10f  in [0, 1)
//   (n0, n1) = Box-Muller(u0, u1), (n2, n3) = Box-Muller(u2, u3)
//   Box-Muller(a, b) = sqrt(-2 log max(a, 1e-7)) * (cos(2 pi b), sin(2 pi b))
//
// Element i of a tensor sampled at (seed, offset) takes normal i % 4 of counter offset + i / 4
// (stream 0), so a tensor of n elements consumes ceil(n / 4) counters (MATH.md section 6).
// Transcendentals differ between libraries by an ulp or so; the integer stream is bit-exact.
#pragma once

#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define MTBKD_HD __host__ __device__ __forceinline__
#else
#define MTBKD_HD inline
#endif

namespace mtbkd {
namespace philox {

constexpr uint32_t kKeyA = 0x9E3779B9u;    // key bump (golden ratio)
constexpr uint32_t kKeyB = 0xBB67AE85u;    // key bump (sqrt(3) - 1)
constexpr uint32_t kRoundA = 0xD2511F53u;  // multiplies counter word 0
constexpr uint32_t kRoundB = 0xCD9E8D57u;  // multiplies counter word 2
constexpr int kRounds = 10;
constexpr float kUniformScale = 4.6566127342e-10f;  // largest s with (2^31 - 1) * s < 1 in fp32
constexpr float kTwoPi = 6.283185307179586f;
constexpr float kMinUniform = 1.0e-7f;

struct Uint4 {
  uint32_t x, y, z, w;
};

// One Philox round on (c0, c1, c2, c3) with key (k0, k1); the caller bumps the key.
MTBKD_HD void round(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3, uint32_t k0,
                    uint32_t k1) {
  const uint64_t p0 = static_cast<uint64_t>(kRoundA) * c0;
  const uint64_t p2 = static_cast<uint64_t>(kRoundB) * c2;
  const uint32_t n0 = static_cast<uint32_t>(p2 >> 32) ^ c1 ^ k0;
  const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
  c1 = static_cast<uint32_t>(p2);
  c3 = static_cast<uint32_t>(p0);
  c0 = n0;
  c2 = n2;
}

// Philox4x32-10 of counter (c, stream) under key seed.
MTBKD_HD Uint4 philox4x32(uint64_t seed, uint64_t c, uint32_t stream) {
  uint32_t c0 = static_cast<uint32_t>(c), c1 = static_cast<uint32_t>(c >> 32), c2 = stream,
           c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int r = 0; r < kRounds; ++r) {
    round(c0, c1, c2, c3, k0, k1);
    k0 += kKeyA;
    k1 += kKeyB;
  }
  return Uint4{c0, c1, c2, c3};
}

// uint32 -> float in [0, 1), Triton's uint_to_uniform_float (~x == -x - 1 without overflow).
MTBKD_HD float to_uniform(uint32_t x) {
  int32_t s = static_cast<int32_t>(x);
  s = s < 0 ? ~s : s;
  return static_cast<float>(s) * kUniformScale;
}

// Box-Muller: (n0, n1) = sqrt(-2 log max(a, 1e-7)) * (cos(2 pi b), sin(2 pi b)).
MTBKD_HD void box_muller(float a, float b, float& n0, float& n1) {
  a = a < kMinUniform ? kMinUniform : a;
  // fmaxf: an approximate logf (--use_fast_math makes it __logf; setup.py does not use it) can
  // be slightly positive near a = 1 (about 4e-7), and the square root NaN
  const float r = sqrtf(fmaxf(-2.0f * logf(a), 0.0f));
  const float th = kTwoPi * b;
#if defined(__CUDA_ARCH__)
  float s, c;
  sincosf(th, &s, &c);
#else
  const float s = sinf(th), c = cosf(th);
#endif
  n0 = r * c;
  n1 = r * s;
}

// The four standard normals of counter c in stream `stream` (scalar path; the CPU kernels
// vectorise the same arithmetic over lanes).
MTBKD_HD void normal4(uint64_t seed, uint64_t c, uint32_t stream, float out[4]) {
  const Uint4 x = philox4x32(seed, c, stream);
  box_muller(to_uniform(x.x), to_uniform(x.y), out[0], out[1]);
  box_muller(to_uniform(x.z), to_uniform(x.w), out[2], out[3]);
}

}  // namespace philox
}  // namespace mtbkd
