// CPU kernels of the Bayesian student: fused reparameterised sampling (MATH.md section 6), the
// Gaussian-prior KL with its gradient, and the (p)SGLD step (section 7).
//
// Every kernel works on tiles of kTile elements that start at a multiple of 4, so a tile owns
// whole Philox counters: the tile's normals are generated into a stack buffer (L1-resident) and
// consumed at once. No eps-sized tensor ever exists; the backward regenerates the same normals.
// Vector transcendentals come from SLEEF (shipped inside libtorch_cpu) when the compiler targets
// AVX-512 or AVX2, else from libm one element at a time.
#include "cpu/bayes_kernels.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <type_traits>

#include "philox.h"

#if (defined(__AVX512F__) || defined(__AVX2__)) && __has_include(<sleef.h>)
#include <immintrin.h>
#include <sleef.h>
#define MTBKD_SLEEF 1
#endif

#ifndef MTBKD_PHILOX_V
#define MTBKD_PHILOX_V 4  // independent 16-lane Philox states per AVX-512 iteration
#endif

// AVX2 machines (no AVX-512: AMD Zen 1-3, Intel before Skylake-SP and its client chips) run the
// same tile arithmetic on 8 lanes; without it they fell back to the portable lane loops, and a
// BayesLinear step took as long as torch.compile's of a plain layer (bench bayes: compile's step
// 0.93-1.09x the fused step's time before this path, 1.22x with it).
#if defined(MTBKD_SLEEF) && !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
#define MTBKD_AVX2 1
#ifndef MTBKD_PHILOX_V8
#define MTBKD_PHILOX_V8 2  // independent 8-lane Philox states per AVX2 iteration (16 registers)
#endif
#endif

namespace mtbkd {
namespace cpu {
namespace {

constexpr int64_t kTile = 1024;     // elements per tile (multiple of 4 and of the SIMD width)
constexpr int kLanes = 64;          // Philox counters generated together
constexpr int64_t kGrainTiles = 64;  // tiles per parallel task: threads only pay off past 64k
constexpr float kSoftplusThreshold = 20.0f;  // torch's softplus: x > 20 -> x

// ---- vector math on float arrays (in place); SLEEF u10 (1 ulp) or libm ---------------------

#if defined(MTBKD_SLEEF) && defined(__AVX512F__)
constexpr int kW = 16;
#define MTBKD_VEC_UNARY(name, sleef_fn, std_fn)                           \
  inline void name(float* x, int64_t n) {                                 \
    int64_t i = 0;                                                        \
    for (; i + kW <= n; i += kW) _mm512_storeu_ps(x + i, sleef_fn(_mm512_loadu_ps(x + i))); \
    for (; i < n; ++i) x[i] = std_fn(x[i]);                               \
  }
MTBKD_VEC_UNARY(v_exp, Sleef_expf16_u10, std::exp)
MTBKD_VEC_UNARY(v_log, Sleef_logf16_u10, std::log)
MTBKD_VEC_UNARY(v_log1p, Sleef_log1pf16_u10, std::log1p)
inline void v_sincos(const float* th, float* s, float* c, int64_t n) {
  int64_t i = 0;
  for (; i + kW <= n; i += kW) {
    const Sleef___m512_2 r = Sleef_sincosf16_u10(_mm512_loadu_ps(th + i));
    _mm512_storeu_ps(s + i, r.x);
    _mm512_storeu_ps(c + i, r.y);
  }
  for (; i < n; ++i) s[i] = std::sin(th[i]), c[i] = std::cos(th[i]);
}
#elif defined(MTBKD_SLEEF)
constexpr int kW = 8;
#define MTBKD_VEC_UNARY(name, sleef_fn, std_fn)                           \
  inline void name(float* x, int64_t n) {                                 \
    int64_t i = 0;                                                        \
    for (; i + kW <= n; i += kW) _mm256_storeu_ps(x + i, sleef_fn(_mm256_loadu_ps(x + i))); \
    for (; i < n; ++i) x[i] = std_fn(x[i]);                               \
  }
MTBKD_VEC_UNARY(v_exp, Sleef_expf8_u10, std::exp)
MTBKD_VEC_UNARY(v_log, Sleef_logf8_u10, std::log)
MTBKD_VEC_UNARY(v_log1p, Sleef_log1pf8_u10, std::log1p)
inline void v_sincos(const float* th, float* s, float* c, int64_t n) {
  int64_t i = 0;
  for (; i + kW <= n; i += kW) {
    const Sleef___m256_2 r = Sleef_sincosf8_u10(_mm256_loadu_ps(th + i));
    _mm256_storeu_ps(s + i, r.x);
    _mm256_storeu_ps(c + i, r.y);
  }
  for (; i < n; ++i) s[i] = std::sin(th[i]), c[i] = std::cos(th[i]);
}
#else
inline void v_exp(float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = std::exp(x[i]);
}
inline void v_log(float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = std::log(x[i]);
}
inline void v_log1p(float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = std::log1p(x[i]);
}
inline void v_sincos(const float* th, float* s, float* c, int64_t n) {
  for (int64_t i = 0; i < n; ++i) s[i] = std::sin(th[i]), c[i] = std::cos(th[i]);
}
#endif

// softplus(r) and sigmoid(r) of a float tile, in place into sp / sig (either may be null).
inline void softplus_sigmoid(const float* r, float* sp, float* sig, int64_t n) {
  if (sp != nullptr) {
    for (int64_t i = 0; i < n; ++i) sp[i] = std::min(r[i], kSoftplusThreshold);
    v_exp(sp, n);
    v_log1p(sp, n);
    for (int64_t i = 0; i < n; ++i) sp[i] = r[i] > kSoftplusThreshold ? r[i] : sp[i];
  }
  if (sig != nullptr) {
    // exp(-r) overflows to inf for r < -88, giving the correct limit 1 / (1 + inf) = 0.
    for (int64_t i = 0; i < n; ++i) sig[i] = -r[i];
    v_exp(sig, n);
    for (int64_t i = 0; i < n; ++i) sig[i] = 1.0f / (1.0f + sig[i]);
  }
}

template <typename T>
inline void load_float(const T* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

inline double softplus_d(double r) { return r > 20.0 ? r : std::log1p(std::exp(r)); }
inline double sigmoid_d(double r) { return 1.0 / (1.0 + std::exp(-r)); }

// Runs fn(tile_begin, tile_len) over the tiles of [0, n) in parallel.
template <typename Fn>
void for_each_tile(int64_t n, const Fn& fn) {
  const int64_t tiles = (n + kTile - 1) / kTile;
  at::parallel_for(0, tiles, kGrainTiles, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t * kTile;
      fn(b, std::min(kTile, n - b));
    }
  });
}

}  // namespace

namespace {

// Portable path: lane loops the compiler vectorises, SLEEF/libm for the transcendentals.
void philox_normals_generic(uint64_t seed, uint64_t counter, uint32_t stream, int64_t groups,
                            float* out) {
  alignas(64) uint32_t x0[kLanes], x1[kLanes], x2[kLanes], x3[kLanes];
  // a: the Box-Muller radius inputs (u0 then u2 of each lane), b: the angle inputs (u1, u3).
  alignas(64) float a[2 * kLanes], b[2 * kLanes], s[2 * kLanes], c[2 * kLanes];
  for (int64_t g0 = 0; g0 < groups; g0 += kLanes) {
    const int m = static_cast<int>(std::min<int64_t>(kLanes, groups - g0));
    for (int l = 0; l < kLanes; ++l) {
      const uint64_t ctr = counter + static_cast<uint64_t>(g0 + l);
      x0[l] = static_cast<uint32_t>(ctr);
      x1[l] = static_cast<uint32_t>(ctr >> 32);
      x2[l] = stream;
      x3[l] = 0;
    }
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int r = 0; r < philox::kRounds; ++r) {
      // Lane loop of independent rounds: the compiler vectorises the 32x32->64 products.
      for (int l = 0; l < kLanes; ++l) philox::round(x0[l], x1[l], x2[l], x3[l], k0, k1);
      k0 += philox::kKeyA;
      k1 += philox::kKeyB;
    }
    for (int l = 0; l < kLanes; ++l) {
      a[l] = std::max(philox::to_uniform(x0[l]), philox::kMinUniform);
      b[l] = philox::kTwoPi * philox::to_uniform(x1[l]);
      a[kLanes + l] = std::max(philox::to_uniform(x2[l]), philox::kMinUniform);
      b[kLanes + l] = philox::kTwoPi * philox::to_uniform(x3[l]);
    }
    v_log(a, 2 * kLanes);
    v_sincos(b, s, c, 2 * kLanes);
    for (int l = 0; l < 2 * kLanes; ++l) a[l] = std::sqrt(-2.0f * a[l]);
    float* o = out + 4 * g0;
    for (int l = 0; l < m; ++l) {
      o[4 * l + 0] = a[l] * c[l];
      o[4 * l + 1] = a[l] * s[l];
      o[4 * l + 2] = a[kLanes + l] * c[kLanes + l];
      o[4 * l + 3] = a[kLanes + l] * s[kLanes + l];
    }
  }
}

#if defined(MTBKD_SLEEF) && defined(__AVX512F__)
// AVX-512 path, 16 counters (64 normals) per iteration. The 32x32 -> 64-bit Philox products use
// vpmuludq on the even and odd lanes separately (vpmullq would be 3x slower).
inline void mulhilo16(__m512i a, __m512i x, __m512i& hi, __m512i& lo) {
  const __mmask16 odd = 0xAAAA;
  const __m512i pe = _mm512_mul_epu32(a, x);
  const __m512i po = _mm512_mul_epu32(a, _mm512_srli_epi64(x, 32));
  hi = _mm512_mask_blend_epi32(odd, _mm512_srli_epi64(pe, 32), po);
  lo = _mm512_mask_blend_epi32(odd, pe, _mm512_slli_epi64(po, 32));
}

inline __m512 uniform16(__m512i x) {
  // Triton's mapping: x as int32, negatives to -x - 1 (= x ^ sign mask), times 4.6566127342e-10.
  const __m512i s = _mm512_xor_si512(x, _mm512_srai_epi32(x, 31));
  return _mm512_mul_ps(_mm512_cvtepi32_ps(s), _mm512_set1_ps(philox::kUniformScale));
}

inline void box_muller16(__m512 a, __m512 b, __m512& n0, __m512& n1) {
  a = _mm512_max_ps(a, _mm512_set1_ps(philox::kMinUniform));
  const __m512 r = _mm512_sqrt_ps(_mm512_mul_ps(_mm512_set1_ps(-2.0f), Sleef_logf16_u35(a)));
  const Sleef___m512_2 sc = Sleef_sincosf16_u35(_mm512_mul_ps(_mm512_set1_ps(philox::kTwoPi), b));
  n0 = _mm512_mul_ps(r, sc.y);
  n1 = _mm512_mul_ps(r, sc.x);
}

// Interleaves 64-bit pairs of floats (unpacklo/hi_pd on float data).
template <bool kHigh>
inline __m512 unpack64(__m512 a, __m512 b) {
  const __m512d x = _mm512_castps_pd(a), y = _mm512_castps_pd(b);
  return _mm512_castpd_ps(kHigh ? _mm512_unpackhi_pd(x, y) : _mm512_unpacklo_pd(x, y));
}

// Writes the 64 V normals of counters [counter, counter + 16 V) in element order. V independent
// 16-lane Philox states are advanced together so their multiply latencies overlap.
template <int V>
inline void philox_normals16(uint64_t seed, uint64_t counter, uint32_t stream, float* out) {
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m512i c0[V], c1[V], c2[V], c3[V];
  for (int v = 0; v < V; ++v) {
    const uint64_t c = counter + 16 * static_cast<uint64_t>(v);
    c0[v] = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(c))), iota);
    c1[v] = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(c >> 32)));
    c2[v] = _mm512_set1_epi32(static_cast<int>(stream));
    c3[v] = _mm512_setzero_si512();
  }
  const __m512i ma = _mm512_set1_epi32(static_cast<int>(philox::kRoundA));
  const __m512i mb = _mm512_set1_epi32(static_cast<int>(philox::kRoundB));
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int r = 0; r < philox::kRounds; ++r) {
    const __m512i key0 = _mm512_set1_epi32(static_cast<int>(k0));
    const __m512i key1 = _mm512_set1_epi32(static_cast<int>(k1));
    for (int v = 0; v < V; ++v) {
      __m512i hi_a, lo_a, hi_b, lo_b;
      mulhilo16(ma, c0[v], hi_a, lo_a);
      mulhilo16(mb, c2[v], hi_b, lo_b);
      c0[v] = _mm512_ternarylogic_epi32(hi_b, c1[v], key0, 0x96);  // three-way xor
      c2[v] = _mm512_ternarylogic_epi32(hi_a, c3[v], key1, 0x96);
      c1[v] = lo_b;
      c3[v] = lo_a;
    }
    k0 += philox::kKeyA;
    k1 += philox::kKeyB;
  }
  for (int v = 0; v < V; ++v) {
    __m512 n0, n1, n2, n3;
    box_muller16(uniform16(c0[v]), uniform16(c1[v]), n0, n1);
    box_muller16(uniform16(c2[v]), uniform16(c3[v]), n2, n3);
    // 4 x 16 -> 16 x 4 transpose: counter l's normals to o[4 l .. 4 l + 3].
    const __m512 t0 = _mm512_unpacklo_ps(n0, n1), t1 = _mm512_unpackhi_ps(n0, n1);
    const __m512 t2 = _mm512_unpacklo_ps(n2, n3), t3 = _mm512_unpackhi_ps(n2, n3);
    const __m512 u0 = unpack64<false>(t0, t2), u1 = unpack64<true>(t0, t2);
    const __m512 u2 = unpack64<false>(t1, t3), u3 = unpack64<true>(t1, t3);
    const __m512 s0 = _mm512_shuffle_f32x4(u0, u1, _MM_SHUFFLE(1, 0, 1, 0));
    const __m512 s1 = _mm512_shuffle_f32x4(u2, u3, _MM_SHUFFLE(1, 0, 1, 0));
    const __m512 s2 = _mm512_shuffle_f32x4(u0, u1, _MM_SHUFFLE(3, 2, 3, 2));
    const __m512 s3 = _mm512_shuffle_f32x4(u2, u3, _MM_SHUFFLE(3, 2, 3, 2));
    float* o = out + 64 * v;
    _mm512_storeu_ps(o + 0, _mm512_shuffle_f32x4(s0, s1, _MM_SHUFFLE(2, 0, 2, 0)));
    _mm512_storeu_ps(o + 16, _mm512_shuffle_f32x4(s0, s1, _MM_SHUFFLE(3, 1, 3, 1)));
    _mm512_storeu_ps(o + 32, _mm512_shuffle_f32x4(s2, s3, _MM_SHUFFLE(2, 0, 2, 0)));
    _mm512_storeu_ps(o + 48, _mm512_shuffle_f32x4(s2, s3, _MM_SHUFFLE(3, 1, 3, 1)));
  }
}

// softplus with torch's threshold: r > 20 -> r, else log1p(e^r) by Kahan's trick
// log1p(x) = log(1 + x) * x / ((1 + x) - 1), exact where 1 + x rounds to 1. A NaN r gives NaN
// (min_ps would drop it and return softplus(20)). e = exp(min(r, 20)) and u = 1 + e are left for
// softplus_sigmoid16.
inline __m512 softplus16(__m512 r, __m512& e, __m512& u) {
  const __m512 one = _mm512_set1_ps(1.0f), thr = _mm512_set1_ps(kSoftplusThreshold);
  e = Sleef_expf16_u10(_mm512_min_ps(r, thr));
  u = _mm512_add_ps(one, e);
  const __m512 d = _mm512_sub_ps(u, one);
  __m512 l = _mm512_mul_ps(Sleef_logf16_u35(u), _mm512_div_ps(e, d));
  l = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(d, _mm512_setzero_ps(), _CMP_EQ_OQ), l, e);
  // r > 20 or r NaN: r itself
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(r, thr, _CMP_NLE_UQ), l, r);
}

inline __m512 softplus16(__m512 r) {
  __m512 e, u;
  return softplus16(r, e, u);
}

// softplus16(r) and sigmoid(r) = e / (1 + e) from the same exponential (at the threshold
// e / (1 + e) already rounds to 1, as sigmoid(r > 20) does in float); a NaN r gives NaN for both.
inline void softplus_sigmoid16(__m512 r, __m512& sp, __m512& sig) {
  __m512 e, u;
  sp = softplus16(r, e, u);
  sig = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(r, r, _CMP_UNORD_Q), _mm512_div_ps(e, u), r);
}

inline __m512 sigmoid16(__m512 r) {
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 e = Sleef_expf16_u10(_mm512_sub_ps(_mm512_setzero_ps(), r));
  return _mm512_div_ps(one, _mm512_add_ps(one, e));
}

inline __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1u);
}

// NaN or +-inf lanes (vfpclassps categories QNaN | SNaN | +inf | -inf).
inline __mmask16 non_finite16(__m512 x) { return _mm512_fpclass_ps_mask(x, 0x99); }
#elif defined(MTBKD_AVX2)
// AVX2 path: the AVX-512 arithmetic above on 8 lanes, with vector masks (all-ones lanes) for the
// mask registers and masked loads / stores for a tile's last, partial vector only.
inline void mulhilo8(__m256i a, __m256i x, __m256i& hi, __m256i& lo) {
  const __m256i pe = _mm256_mul_epu32(a, x);
  const __m256i po = _mm256_mul_epu32(a, _mm256_srli_epi64(x, 32));
  hi = _mm256_blend_epi32(_mm256_srli_epi64(pe, 32), po, 0xAA);
  lo = _mm256_blend_epi32(pe, _mm256_slli_epi64(po, 32), 0xAA);
}

inline __m256 uniform8(__m256i x) {
  const __m256i s = _mm256_xor_si256(x, _mm256_srai_epi32(x, 31));
  return _mm256_mul_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(philox::kUniformScale));
}

inline void box_muller8(__m256 a, __m256 b, __m256& n0, __m256& n1) {
  a = _mm256_max_ps(a, _mm256_set1_ps(philox::kMinUniform));
  const __m256 r = _mm256_sqrt_ps(_mm256_mul_ps(_mm256_set1_ps(-2.0f), Sleef_logf8_u35(a)));
  const Sleef___m256_2 sc = Sleef_sincosf8_u35(_mm256_mul_ps(_mm256_set1_ps(philox::kTwoPi), b));
  n0 = _mm256_mul_ps(r, sc.y);
  n1 = _mm256_mul_ps(r, sc.x);
}

// unpack64 on 8 lanes.
template <bool kHigh>
inline __m256 unpack64x8(__m256 a, __m256 b) {
  const __m256d x = _mm256_castps_pd(a), y = _mm256_castps_pd(b);
  return _mm256_castpd_ps(kHigh ? _mm256_unpackhi_pd(x, y) : _mm256_unpacklo_pd(x, y));
}

// The 32 V normals of counters [counter, counter + 8 V) in element order (V states together).
template <int V>
inline void philox_normals8(uint64_t seed, uint64_t counter, uint32_t stream, float* out) {
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  __m256i c0[V], c1[V], c2[V], c3[V];
  for (int v = 0; v < V; ++v) {
    const uint64_t c = counter + 8 * static_cast<uint64_t>(v);
    c0[v] = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(c))), iota);
    c1[v] = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(c >> 32)));
    c2[v] = _mm256_set1_epi32(static_cast<int>(stream));
    c3[v] = _mm256_setzero_si256();
  }
  const __m256i ma = _mm256_set1_epi32(static_cast<int>(philox::kRoundA));
  const __m256i mb = _mm256_set1_epi32(static_cast<int>(philox::kRoundB));
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int r = 0; r < philox::kRounds; ++r) {
    const __m256i key0 = _mm256_set1_epi32(static_cast<int>(k0));
    const __m256i key1 = _mm256_set1_epi32(static_cast<int>(k1));
    for (int v = 0; v < V; ++v) {
      __m256i hi_a, lo_a, hi_b, lo_b;
      mulhilo8(ma, c0[v], hi_a, lo_a);
      mulhilo8(mb, c2[v], hi_b, lo_b);
      c0[v] = _mm256_xor_si256(_mm256_xor_si256(hi_b, c1[v]), key0);
      c2[v] = _mm256_xor_si256(_mm256_xor_si256(hi_a, c3[v]), key1);
      c1[v] = lo_b;
      c3[v] = lo_a;
    }
    k0 += philox::kKeyA;
    k1 += philox::kKeyB;
  }
  for (int v = 0; v < V; ++v) {
    __m256 n0, n1, n2, n3;
    box_muller8(uniform8(c0[v]), uniform8(c1[v]), n0, n1);
    box_muller8(uniform8(c2[v]), uniform8(c3[v]), n2, n3);
    // 4 x 8 -> 8 x 4 transpose: counter l's normals to o[4 l .. 4 l + 3]; u_j holds counters j
    // (low 128 bits) and j + 4 (high 128 bits).
    const __m256 t0 = _mm256_unpacklo_ps(n0, n1), t1 = _mm256_unpackhi_ps(n0, n1);
    const __m256 t2 = _mm256_unpacklo_ps(n2, n3), t3 = _mm256_unpackhi_ps(n2, n3);
    const __m256 u0 = unpack64x8<false>(t0, t2), u1 = unpack64x8<true>(t0, t2);
    const __m256 u2 = unpack64x8<false>(t1, t3), u3 = unpack64x8<true>(t1, t3);
    float* o = out + 32 * v;
    _mm256_storeu_ps(o + 0, _mm256_permute2f128_ps(u0, u1, 0x20));
    _mm256_storeu_ps(o + 8, _mm256_permute2f128_ps(u2, u3, 0x20));
    _mm256_storeu_ps(o + 16, _mm256_permute2f128_ps(u0, u1, 0x31));
    _mm256_storeu_ps(o + 24, _mm256_permute2f128_ps(u2, u3, 0x31));
  }
}

// softplus8 / softplus_sigmoid8 / sigmoid8: softplus16 / softplus_sigmoid16 / sigmoid16 on 8
// lanes (min_ps returns its second operand for a NaN r as _mm512_min_ps does; the blends put the
// NaN back).
inline __m256 softplus8(__m256 r, __m256& e, __m256& u) {
  const __m256 one = _mm256_set1_ps(1.0f), thr = _mm256_set1_ps(kSoftplusThreshold);
  e = Sleef_expf8_u10(_mm256_min_ps(r, thr));
  u = _mm256_add_ps(one, e);
  const __m256 d = _mm256_sub_ps(u, one);
  __m256 l = _mm256_mul_ps(Sleef_logf8_u35(u), _mm256_div_ps(e, d));
  l = _mm256_blendv_ps(l, e, _mm256_cmp_ps(d, _mm256_setzero_ps(), _CMP_EQ_OQ));
  return _mm256_blendv_ps(l, r, _mm256_cmp_ps(r, thr, _CMP_NLE_UQ));
}

inline __m256 softplus8(__m256 r) {
  __m256 e, u;
  return softplus8(r, e, u);
}

inline __m256 is_nan8(__m256 x) { return _mm256_cmp_ps(x, x, _CMP_UNORD_Q); }

inline void softplus_sigmoid8(__m256 r, __m256& sp, __m256& sig) {
  __m256 e, u;
  sp = softplus8(r, e, u);
  sig = _mm256_blendv_ps(_mm256_div_ps(e, u), r, is_nan8(r));
}

inline __m256 sigmoid8(__m256 r) {
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 e = Sleef_expf8_u10(_mm256_sub_ps(_mm256_setzero_ps(), r));
  return _mm256_div_ps(one, _mm256_add_ps(one, e));
}

// All-ones in the first min(left, 8) lanes.
inline __m256i tail_mask8(int64_t left) {
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::min<int64_t>(left, 8))), iota);
}

// Loads / stores the min(left, 8) floats at p; the lanes past them load as 0 and are not stored.
inline __m256 load8(const float* p, int64_t left) {
  return left >= 8 ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, tail_mask8(left));
}
inline void store8(float* p, int64_t left, __m256 v) {
  if (left >= 8)
    _mm256_storeu_ps(p, v);
  else
    _mm256_maskstore_ps(p, tail_mask8(left), v);
}
// v in the first min(left, 8) lanes, 0 in the others.
inline __m256 keep8(__m256 v, int64_t left) {
  return left >= 8 ? v : _mm256_and_ps(v, _mm256_castsi256_ps(tail_mask8(left)));
}

// NaN or +-inf lanes: x * 0 is NaN exactly there.
inline __m256 non_finite8(__m256 x) { return is_nan8(_mm256_mul_ps(x, _mm256_setzero_ps())); }
inline bool any8(__m256 m) { return _mm256_movemask_ps(m) != 0; }

inline float reduce_add8(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}
#endif

}  // namespace

void philox_normals(uint64_t seed, uint64_t counter, uint32_t stream, int64_t groups,
                    float* out) {
  int64_t g = 0;
#if defined(MTBKD_SLEEF) && defined(__AVX512F__)
  constexpr int kV = MTBKD_PHILOX_V;
  for (; g + 16 * kV <= groups; g += 16 * kV) {
    const uint64_t c = counter + static_cast<uint64_t>(g);
    // The vector path adds to the low counter word only: fall back across a 2^32 carry.
    if (static_cast<uint32_t>(c) > 0xFFFFFFFFu - (16u * kV - 1u)) break;
    philox_normals16<kV>(seed, c, stream, out + 4 * g);
  }
  for (; g + 16 <= groups; g += 16) {
    const uint64_t c = counter + static_cast<uint64_t>(g);
    if (static_cast<uint32_t>(c) > 0xFFFFFFFFu - 15u) break;
    philox_normals16<1>(seed, c, stream, out + 4 * g);
  }
#elif defined(MTBKD_AVX2)
  constexpr int kV = MTBKD_PHILOX_V8;
  for (; g + 8 * kV <= groups; g += 8 * kV) {
    const uint64_t c = counter + static_cast<uint64_t>(g);
    if (static_cast<uint32_t>(c) > 0xFFFFFFFFu - (8u * kV - 1u)) break;
    philox_normals8<kV>(seed, c, stream, out + 4 * g);
  }
  for (; g + 8 <= groups; g += 8) {
    const uint64_t c = counter + static_cast<uint64_t>(g);
    if (static_cast<uint32_t>(c) > 0xFFFFFFFFu - 7u) break;
    philox_normals8<1>(seed, c, stream, out + 4 * g);
  }
#endif
  if (g < groups) philox_normals_generic(seed, counter + static_cast<uint64_t>(g), stream,
                                         groups - g, out + 4 * g);
}

namespace {

// w = mu + softplus(rho) eps of a float tile (reduced-precision inputs as float copies); the
// code reparameterize_kl's tile uses for its w too, so both ops give the same sample.
inline void sample_tile(const float* mu, const float* rho, const float* eps, float* w,
                        int64_t len) {
#if defined(MTBKD_SLEEF) && defined(__AVX512F__)
  for (int64_t i = 0; i < len; i += 16) {
    const __mmask16 m = tail_mask(len - i);
    const __m512 x = _mm512_maskz_loadu_ps(m, mu + i);
    const __m512 r = _mm512_maskz_loadu_ps(m, rho + i);
    _mm512_mask_storeu_ps(w + i, m, _mm512_fmadd_ps(softplus16(r), _mm512_loadu_ps(eps + i), x));
  }
#elif defined(MTBKD_AVX2)
  for (int64_t i = 0; i < len; i += 8) {
    const __m256 x = load8(mu + i, len - i), r = load8(rho + i, len - i);
    store8(w + i, len - i, _mm256_fmadd_ps(softplus8(r), _mm256_loadu_ps(eps + i), x));
  }
#else
  alignas(64) float sp[kTile];
  softplus_sigmoid(rho, sp, nullptr, len);
  for (int64_t i = 0; i < len; ++i) w[i] = mu[i] + sp[i] * eps[i];
#endif
}

}  // namespace

template <typename T>
int reparameterize_fwd(const T* mu, const T* rho, T* w, int64_t n, uint64_t seed,
                       uint64_t offset, bool check_finite) {
  std::atomic<int> flags{0};
  for_each_tile(n, [&](int64_t b, int64_t len) {
    alignas(64) float eps[kTile];
    philox_normals(seed, offset + static_cast<uint64_t>(b / 4), 0, (len + 3) / 4, eps);
    if constexpr (std::is_same_v<T, double>) {
      for (int64_t i = 0; i < len; ++i)
        w[b + i] = mu[b + i] + softplus_d(rho[b + i]) * static_cast<double>(eps[i]);
#if defined(MTBKD_SLEEF) && defined(__AVX512F__)
    } else if constexpr (std::is_same_v<T, float>) {
      // One pass over the tile in registers: load, softplus, fma, store, finiteness flags.
      __mmask16 bad_mu = 0, bad_rho = 0;
      for (int64_t i = 0; i < len; i += 16) {
        const __mmask16 m = tail_mask(len - i);
        const __m512 x = _mm512_maskz_loadu_ps(m, mu + b + i);
        const __m512 r = _mm512_maskz_loadu_ps(m, rho + b + i);
        const __m512 y = _mm512_fmadd_ps(softplus16(r), _mm512_loadu_ps(eps + i), x);
        _mm512_mask_storeu_ps(w + b + i, m, y);
        bad_mu |= non_finite16(x);
        bad_rho |= non_finite16(r);
      }
      if (check_finite && (bad_mu | bad_rho))
        flags.fetch_or((bad_mu ? 1 : 0) | (bad_rho ? 2 : 0));
      return;
#elif defined(MTBKD_AVX2)
    } else if constexpr (std::is_same_v<T, float>) {
      __m256 bad_mu = _mm256_setzero_ps(), bad_rho = _mm256_setzero_ps();
      for (int64_t i = 0; i < len; i += 8) {
        const __m256 x = load8(mu + b + i, len - i), r = load8(rho + b + i, len - i);
        store8(w + b + i, len - i, _mm256_fmadd_ps(softplus8(r), _mm256_loadu_ps(eps + i), x));
        bad_mu = _mm256_or_ps(bad_mu, non_finite8(x));
        bad_rho = _mm256_or_ps(bad_rho, non_finite8(r));
      }
      if (check_finite && (any8(bad_mu) || any8(bad_rho)))
        flags.fetch_or((any8(bad_mu) ? 1 : 0) | (any8(bad_rho) ? 2 : 0));
      return;
#endif
    } else {
      // float copies through the same tile code as reparameterize_kl's (the same w, bit for bit)
      alignas(64) float m[kTile], r[kTile], out[kTile];
      load_float(mu + b, m, len);
      load_float(rho + b, r, len);
      sample_tile(m, r, eps, out, len);
      for (int64_t i = 0; i < len; ++i) w[b + i] = static_cast<T>(out[i]);
    }
    if (check_finite) {
      // x * 0 is NaN exactly when x is NaN or inf; counting keeps the loop vectorisable. In the
      // input's own precision for float64 (a finite 1e300 is inf as a float).
      using C = std::conditional_t<std::is_same_v<T, double>, double, float>;
      int bad_mu = 0, bad_rho = 0;
      for (int64_t i = 0; i < len; ++i) {
        const C zm = static_cast<C>(mu[b + i]) * C(0);
        const C zr = static_cast<C>(rho[b + i]) * C(0);
        bad_mu += zm != zm;
        bad_rho += zr != zr;
      }
      if (bad_mu + bad_rho > 0) flags.fetch_or((bad_mu > 0 ? 1 : 0) | (bad_rho > 0 ? 2 : 0));
    }
  });
  return flags.load();
}

template <typename T>
void reparameterize_bwd(const T* grad, const T* rho, T* drho, int64_t n, uint64_t seed,
                        uint64_t offset) {
  for_each_tile(n, [&](int64_t b, int64_t len) {
    alignas(64) float eps[kTile];
    philox_normals(seed, offset + static_cast<uint64_t>(b / 4), 0, (len + 3) / 4, eps);
    if constexpr (std::is_same_v<T, double>) {
      for (int64_t i = 0; i < len; ++i)
        drho[b + i] = grad[b + i] * static_cast<double>(eps[i]) * sigmoid_d(rho[b + i]);
#if defined(MTBKD_SLEEF) && defined(__AVX512F__)
    } else if constexpr (std::is_same_v<T, float>) {
      for (int64_t i = 0; i < len; i += 16) {
        const __mmask16 m = tail_mask(len - i);
        const __m512 g = _mm512_maskz_loadu_ps(m, grad + b + i);
        const __m512 r = _mm512_maskz_loadu_ps(m, rho + b + i);
        const __m512 y = _mm512_mul_ps(_mm512_mul_ps(g, _mm512_loadu_ps(eps + i)), sigmoid16(r));
        _mm512_mask_storeu_ps(drho + b + i, m, y);
      }
#elif defined(MTBKD_AVX2)
    } else if constexpr (std::is_same_v<T, float>) {
      for (int64_t i = 0; i < len; i += 8) {
        const __m256 g = load8(grad + b + i, len - i), r = load8(rho + b + i, len - i);
        const __m256 y = _mm256_mul_ps(_mm256_mul_ps(g, _mm256_loadu_ps(eps + i)), sigmoid8(r));
        store8(drho + b + i, len - i, y);
      }
#endif
    } else {
      alignas(64) float r[kTile], sig[kTile];
      load_float(rho + b, r, len);
      softplus_sigmoid(r, nullptr, sig, len);
      for (int64_t i = 0; i < len; ++i)
        drho[b + i] = static_cast<T>(static_cast<float>(grad[b + i]) * eps[i] * sig[i]);
    }
  });
}

// ---- Gaussian-prior KL (MATH.md section 6) ------------------------------------------------
// KL_i = log s0 - log s + (s^2 + d^2) / (2 s0^2) - 1/2, s = softplus(rho), d = mu - m0;
// dKL/dmu = d / s0^2, dKL/drho = (s / s0^2 - 1 / s) sigmoid(rho). Below rho = -20, s = e^rho
// (1 - e^rho / 2 + ...) heads for the denormals (0 below rho = -104 in float): the KL takes
// log s = rho - s / 2 and its gradient sigmoid(rho) / s = 1 - s / 2 there, instead of
// log 0 = -inf and (1 / 0) * 0 = NaN. The forward sums the terms; the backward recomputes s and
// sigmoid(rho) and writes the gradient already scaled by the incoming one (nothing stored).
namespace {

struct KLConst {
  float m0, iv, c0;  // prior mean, 1 / s0^2, log s0 - 1/2
};

#if defined(MTBKD_SLEEF) && defined(__AVX512F__)
// dKL/drho = (s / s0^2 - 1 / s) sigmoid(rho) of 16 lanes, one division and one fused
// multiply-subtract (not (s^2 / s0^2 - 1) (sigmoid / s): s^2 / s0^2 overflowed float32 at
// s0 = 1e-18 and s >= 18, an inf gradient where the scalar and Triton paths are finite);
// 1 - s / 2 stands for sigmoid(rho) / s below rho = -20. sig gets sigmoid(r).
inline __m512 kl_grad_rho16(__m512 r, __m512 iv, __m512& sig) {
  const __m512 one = _mm512_set1_ps(1.0f), half = _mm512_set1_ps(0.5f);
  __m512 s;
  softplus_sigmoid16(r, s, sig);
  const __m512 plain = _mm512_mul_ps(_mm512_fmsub_ps(s, iv, _mm512_div_ps(one, s)), sig);
  const __m512 small = _mm512_sub_ps(_mm512_mul_ps(_mm512_mul_ps(s, sig), iv),
                                     _mm512_fnmadd_ps(half, s, one));  // 1 - s / 2
  const __m512 lo = _mm512_set1_ps(-kSoftplusThreshold);
  const __m512 dr = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(r, lo, _CMP_LT_OQ), plain, small);
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(r, r, _CMP_UNORD_Q), dr, r);
}
#elif defined(MTBKD_AVX2)
// kl_grad_rho16 on 8 lanes.
inline __m256 kl_grad_rho8(__m256 r, __m256 iv, __m256& sig) {
  const __m256 one = _mm256_set1_ps(1.0f), half = _mm256_set1_ps(0.5f);
  __m256 s;
  softplus_sigmoid8(r, s, sig);
  const __m256 plain = _mm256_mul_ps(_mm256_fmsub_ps(s, iv, _mm256_div_ps(one, s)), sig);
  const __m256 small = _mm256_sub_ps(_mm256_mul_ps(_mm256_mul_ps(s, sig), iv),
                                     _mm256_fnmadd_ps(half, s, one));  // 1 - s / 2
  const __m256 lo = _mm256_set1_ps(-kSoftplusThreshold);
  const __m256 dr = _mm256_blendv_ps(plain, small, _mm256_cmp_ps(r, lo, _CMP_LT_OQ));
  return _mm256_blendv_ps(dr, r, is_nan8(r));
}

// The KL term of 8 lanes from x = mu, r = rho and s = softplus(r) (kl_tile_sum's arithmetic).
inline __m256 kl_term8(__m256 x, __m256 r, __m256 s, __m256 m0, __m256 iv, __m256 c0) {
  const __m256 half = _mm256_set1_ps(0.5f), lo = _mm256_set1_ps(-kSoftplusThreshold);
  const __m256 d = _mm256_sub_ps(x, m0);
  const __m256 ls = _mm256_blendv_ps(Sleef_logf8_u10(s), _mm256_fnmadd_ps(half, s, r),
                                     _mm256_cmp_ps(r, lo, _CMP_LT_OQ));  // r - s / 2 below -20
  const __m256 q = _mm256_fmadd_ps(s, s, _mm256_mul_ps(d, d));
  const __m256 term = _mm256_fmadd_ps(_mm256_mul_ps(half, q), iv, _mm256_sub_ps(c0, ls));
  return _mm256_blendv_ps(term, r, is_nan8(r));
}
#endif

// Sum of a float tile's KL terms in float (at most kTile of them). NaN in rho or mu gives NaN.
inline float kl_tile_sum(const float* mu, const float* rho, int64_t len, const KLConst& k) {
#if defined(MTBKD_SLEEF) && defined(__AVX512F__)
  const __m512 m0 = _mm512_set1_ps(k.m0), iv = _mm512_set1_ps(k.iv), c0 = _mm512_set1_ps(k.c0);
  const __m512 half = _mm512_set1_ps(0.5f), lo = _mm512_set1_ps(-kSoftplusThreshold);
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < len; i += 16) {
    const __mmask16 m = tail_mask(len - i);
    const __m512 r = _mm512_maskz_loadu_ps(m, rho + i);
    const __m512 d = _mm512_sub_ps(_mm512_maskz_loadu_ps(m, mu + i), m0);
    const __m512 s = softplus16(r);
    const __mmask16 tiny = _mm512_cmp_ps_mask(r, lo, _CMP_LT_OQ);
    const __m512 ls = _mm512_mask_blend_ps(tiny, Sleef_logf16_u10(s),
                                           _mm512_fnmadd_ps(half, s, r));  // r - s / 2
    const __m512 q = _mm512_fmadd_ps(s, s, _mm512_mul_ps(d, d));
    __m512 term = _mm512_fmadd_ps(_mm512_mul_ps(half, q), iv, _mm512_sub_ps(c0, ls));
    // softplus16's min drops a NaN rho (and gives softplus(20)): put it back
    term = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(r, r, _CMP_UNORD_Q), term, r);
    acc = _mm512_mask_add_ps(acc, m, acc, term);
  }
  return _mm512_reduce_add_ps(acc);
#elif defined(MTBKD_AVX2)
  const __m256 m0 = _mm256_set1_ps(k.m0), iv = _mm256_set1_ps(k.iv), c0 = _mm256_set1_ps(k.c0);
  __m256 acc = _mm256_setzero_ps();
  for (int64_t i = 0; i < len; i += 8) {
    const __m256 x = load8(mu + i, len - i), r = load8(rho + i, len - i);
    acc = _mm256_add_ps(acc, keep8(kl_term8(x, r, softplus8(r), m0, iv, c0), len - i));
  }
  return reduce_add8(acc);
#else
  alignas(64) float sp[kTile], ls[kTile];
  softplus_sigmoid(rho, sp, nullptr, len);
  std::copy(sp, sp + len, ls);
  v_log(ls, len);
  float part = 0.0f;
  for (int64_t i = 0; i < len; ++i) {
    const float l = rho[i] < -kSoftplusThreshold ? rho[i] - 0.5f * sp[i] : ls[i];
    const float d = mu[i] - k.m0;
    part += k.c0 - l + 0.5f * (sp[i] * sp[i] + d * d) * k.iv;
  }
  return part;
#endif
}

// g times the KL's gradient of a float tile; dmu or drho may be null (not wanted).
inline void kl_tile_grad(const float* mu, const float* rho, float* dmu, float* drho, int64_t len,
                         float g, const KLConst& k) {
#if defined(MTBKD_SLEEF) && defined(__AVX512F__)
  const __m512 m0 = _mm512_set1_ps(k.m0);
  const __m512 gv = _mm512_set1_ps(g), iv = _mm512_set1_ps(k.iv);
  for (int64_t i = 0; i < len; i += 16) {
    const __mmask16 m = tail_mask(len - i);
    if (dmu != nullptr) {
      // g (mu - m0) / s0^2, g and 1 / s0^2 multiplied in that order as the scalar path does
      const __m512 d = _mm512_sub_ps(_mm512_maskz_loadu_ps(m, mu + i), m0);
      _mm512_mask_storeu_ps(dmu + i, m, _mm512_mul_ps(gv, _mm512_mul_ps(d, iv)));
    }
    if (drho != nullptr) {
      __m512 sig;
      const __m512 dr = kl_grad_rho16(_mm512_maskz_loadu_ps(m, rho + i), iv, sig);
      _mm512_mask_storeu_ps(drho + i, m, _mm512_mul_ps(gv, dr));
    }
  }
#elif defined(MTBKD_AVX2)
  const __m256 m0 = _mm256_set1_ps(k.m0);
  const __m256 gv = _mm256_set1_ps(g), iv = _mm256_set1_ps(k.iv);
  for (int64_t i = 0; i < len; i += 8) {
    if (dmu != nullptr) {
      const __m256 d = _mm256_sub_ps(load8(mu + i, len - i), m0);
      store8(dmu + i, len - i, _mm256_mul_ps(gv, _mm256_mul_ps(d, iv)));
    }
    if (drho != nullptr) {
      __m256 sig;
      const __m256 dr = kl_grad_rho8(load8(rho + i, len - i), iv, sig);
      store8(drho + i, len - i, _mm256_mul_ps(gv, dr));
    }
  }
#else
  if (dmu != nullptr)
    for (int64_t i = 0; i < len; ++i) dmu[i] = g * ((mu[i] - k.m0) * k.iv);
  if (drho != nullptr) {
    alignas(64) float sp[kTile], sig[kTile];
    softplus_sigmoid(rho, sp, sig, len);
    for (int64_t i = 0; i < len; ++i) {
      const float dr = rho[i] < -kSoftplusThreshold ? sp[i] * sig[i] * k.iv - (1.0f - 0.5f * sp[i])
                                                    : (sp[i] * k.iv - 1.0f / sp[i]) * sig[i];
      drho[i] = g * dr;
    }
  }
#endif
}

inline KLConst kl_const(double prior_mu, double prior_sigma) {
  return {static_cast<float>(prior_mu), static_cast<float>(1.0 / (prior_sigma * prior_sigma)),
          static_cast<float>(std::log(prior_sigma)) - 0.5f};
}

inline double kl_term_d(double m, double r, double prior_mu, double inv_var0, double log_s0) {
  const double s = softplus_d(r), d = m - prior_mu;
  const double ls = r < -kSoftplusThreshold ? r - 0.5 * s : std::log(s);
  return log_s0 - ls + 0.5 * (s * s + d * d) * inv_var0 - 0.5;
}

inline double kl_grad_rho_d(double r, double inv_var0) {
  const double s = softplus_d(r), sig = sigmoid_d(r);
  return r < -kSoftplusThreshold ? s * sig * inv_var0 - (1.0 - 0.5 * s)
                                 : (s * inv_var0 - 1.0 / s) * sig;
}

// ---- Sampling and KL in one pass (mtbkd::reparameterize_kl) ---------------------------------
// Forward: w = mu + s eps and the tile's KL sum from the same loads of mu and rho (and the same
// s). Bit 1 / 2 of *bad: mu / rho held NaN or inf.
inline float reparam_kl_tile(const float* mu, const float* rho, const float* eps, float* w,
                             int64_t len, const KLConst& k, int* bad) {
#if defined(MTBKD_SLEEF) && defined(__AVX512F__)
  const __m512 m0 = _mm512_set1_ps(k.m0), iv = _mm512_set1_ps(k.iv), c0 = _mm512_set1_ps(k.c0);
  const __m512 half = _mm512_set1_ps(0.5f), lo = _mm512_set1_ps(-kSoftplusThreshold);
  __m512 acc = _mm512_setzero_ps();
  __mmask16 bad_mu = 0, bad_rho = 0;
  for (int64_t i = 0; i < len; i += 16) {
    const __mmask16 m = tail_mask(len - i);
    const __m512 x = _mm512_maskz_loadu_ps(m, mu + i);
    const __m512 r = _mm512_maskz_loadu_ps(m, rho + i);
    const __m512 s = softplus16(r);
    _mm512_mask_storeu_ps(w + i, m, _mm512_fmadd_ps(s, _mm512_loadu_ps(eps + i), x));
    const __m512 d = _mm512_sub_ps(x, m0);
    const __mmask16 tiny = _mm512_cmp_ps_mask(r, lo, _CMP_LT_OQ);
    const __m512 ls = _mm512_mask_blend_ps(tiny, Sleef_logf16_u10(s), _mm512_fnmadd_ps(half, s, r));
    const __m512 q = _mm512_fmadd_ps(s, s, _mm512_mul_ps(d, d));
    __m512 term = _mm512_fmadd_ps(_mm512_mul_ps(half, q), iv, _mm512_sub_ps(c0, ls));
    term = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(r, r, _CMP_UNORD_Q), term, r);
    acc = _mm512_mask_add_ps(acc, m, acc, term);
    bad_mu |= non_finite16(x);
    bad_rho |= non_finite16(r);
  }
  *bad = (bad_mu ? 1 : 0) | (bad_rho ? 2 : 0);
  return _mm512_reduce_add_ps(acc);
#elif defined(MTBKD_AVX2)
  const __m256 m0 = _mm256_set1_ps(k.m0), iv = _mm256_set1_ps(k.iv), c0 = _mm256_set1_ps(k.c0);
  __m256 acc = _mm256_setzero_ps();
  __m256 bad_mu = _mm256_setzero_ps(), bad_rho = _mm256_setzero_ps();
  for (int64_t i = 0; i < len; i += 8) {
    const __m256 x = load8(mu + i, len - i), r = load8(rho + i, len - i);
    const __m256 s = softplus8(r);
    store8(w + i, len - i, _mm256_fmadd_ps(s, _mm256_loadu_ps(eps + i), x));
    acc = _mm256_add_ps(acc, keep8(kl_term8(x, r, s, m0, iv, c0), len - i));
    bad_mu = _mm256_or_ps(bad_mu, non_finite8(x));
    bad_rho = _mm256_or_ps(bad_rho, non_finite8(r));
  }
  *bad = (any8(bad_mu) ? 1 : 0) | (any8(bad_rho) ? 2 : 0);
  return reduce_add8(acc);
#else
  alignas(64) float sp[kTile];
  softplus_sigmoid(rho, sp, nullptr, len);
  int bm = 0, br = 0;
  for (int64_t i = 0; i < len; ++i) {
    w[i] = mu[i] + sp[i] * eps[i];
    const float zm = mu[i] * 0.0f, zr = rho[i] * 0.0f;  // NaN exactly for NaN and inf
    bm += zm != zm;
    br += zr != zr;
  }
  *bad = (bm > 0 ? 1 : 0) | (br > 0 ? 2 : 0);
  return kl_tile_sum(mu, rho, len, k);
#endif
}

// Backward of both outputs: dmu = g + gk (mu - m0) / s0^2 and
// drho = (g eps + gk (s / s0^2 - 1 / s)) sigmoid(rho) (tiny-rho form below -20); either output
// may be null (eps is then not generated when drho is null).
inline void reparam_kl_grad_tile(const float* g, const float* mu, const float* rho,
                                 const float* eps, float* dmu, float* drho, int64_t len,
                                 float gk, const KLConst& k) {
#if defined(MTBKD_SLEEF) && defined(__AVX512F__)
  const __m512 m0 = _mm512_set1_ps(k.m0), gkv = _mm512_set1_ps(gk), iv = _mm512_set1_ps(k.iv);
  for (int64_t i = 0; i < len; i += 16) {
    const __mmask16 m = tail_mask(len - i);
    const __m512 gw = _mm512_maskz_loadu_ps(m, g + i);
    if (dmu != nullptr) {
      const __m512 d = _mm512_sub_ps(_mm512_maskz_loadu_ps(m, mu + i), m0);
      _mm512_mask_storeu_ps(dmu + i, m, _mm512_fmadd_ps(gkv, _mm512_mul_ps(d, iv), gw));
    }
    if (drho != nullptr) {
      __m512 sig;
      const __m512 dr = kl_grad_rho16(_mm512_maskz_loadu_ps(m, rho + i), iv, sig);
      const __m512 sample = _mm512_mul_ps(_mm512_mul_ps(gw, _mm512_loadu_ps(eps + i)), sig);
      _mm512_mask_storeu_ps(drho + i, m, _mm512_fmadd_ps(gkv, dr, sample));
    }
  }
#elif defined(MTBKD_AVX2)
  const __m256 m0 = _mm256_set1_ps(k.m0), gkv = _mm256_set1_ps(gk), iv = _mm256_set1_ps(k.iv);
  for (int64_t i = 0; i < len; i += 8) {
    const __m256 gw = load8(g + i, len - i);
    if (dmu != nullptr) {
      const __m256 d = _mm256_sub_ps(load8(mu + i, len - i), m0);
      store8(dmu + i, len - i, _mm256_fmadd_ps(gkv, _mm256_mul_ps(d, iv), gw));
    }
    if (drho != nullptr) {
      __m256 sig;
      const __m256 dr = kl_grad_rho8(load8(rho + i, len - i), iv, sig);
      const __m256 sample = _mm256_mul_ps(_mm256_mul_ps(gw, _mm256_loadu_ps(eps + i)), sig);
      store8(drho + i, len - i, _mm256_fmadd_ps(gkv, dr, sample));
    }
  }
#else
  alignas(64) float dm[kTile], dr[kTile];
  kl_tile_grad(mu, rho, dmu != nullptr ? dm : nullptr, drho != nullptr ? dr : nullptr, len, gk,
               k);
  if (dmu != nullptr)
    for (int64_t i = 0; i < len; ++i) dmu[i] = g[i] + dm[i];
  if (drho != nullptr) {
    alignas(64) float sig[kTile];
    softplus_sigmoid(rho, nullptr, sig, len);
    for (int64_t i = 0; i < len; ++i) drho[i] = g[i] * eps[i] * sig[i] + dr[i];
  }
#endif
}

}  // namespace

template <typename T>
double gaussian_kl(const T* mu, const T* rho, int64_t n, double prior_mu, double prior_sigma) {
  const double inv_var0 = 1.0 / (prior_sigma * prior_sigma), log_s0 = std::log(prior_sigma);
  const KLConst k = kl_const(prior_mu, prior_sigma);
  return at::parallel_reduce(
      0, (n + kTile - 1) / kTile, kGrainTiles, 0.0,
      [&](int64_t t0, int64_t t1, double acc) {
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t b = t * kTile, len = std::min(kTile, n - b);
          if constexpr (std::is_same_v<T, double>) {
            for (int64_t i = 0; i < len; ++i)
              acc += kl_term_d(mu[b + i], rho[b + i], prior_mu, inv_var0, log_s0);
          } else if constexpr (std::is_same_v<T, float>) {
            acc += kl_tile_sum(mu + b, rho + b, len, k);  // float partial sums of a tile
          } else {
            alignas(64) float m[kTile], r[kTile];
            load_float(mu + b, m, len);
            load_float(rho + b, r, len);
            acc += kl_tile_sum(m, r, len, k);
          }
        }
        return acc;
      },
      [](double x, double y) { return x + y; });
}

template <typename T>
void gaussian_kl_bwd(double grad, const T* mu, const T* rho, T* dmu, T* drho, int64_t n,
                     double prior_mu, double prior_sigma) {
  const double inv_var0 = 1.0 / (prior_sigma * prior_sigma);
  const KLConst k = kl_const(prior_mu, prior_sigma);
  const float g = static_cast<float>(grad);
  for_each_tile(n, [&](int64_t b, int64_t len) {
    if constexpr (std::is_same_v<T, double>) {
      for (int64_t i = 0; i < len; ++i) {
        const double r = rho[b + i];
        if (dmu != nullptr) dmu[b + i] = grad * ((mu[b + i] - prior_mu) * inv_var0);
        if (drho != nullptr) drho[b + i] = grad * kl_grad_rho_d(r, inv_var0);
      }
    } else if constexpr (std::is_same_v<T, float>) {
      kl_tile_grad(mu + b, rho + b, dmu == nullptr ? nullptr : dmu + b,
                   drho == nullptr ? nullptr : drho + b, len, g, k);
    } else {
      // reduced precision: in float, each gradient rounded once
      alignas(64) float m[kTile], r[kTile], dm[kTile], dr[kTile];
      if (dmu != nullptr) load_float(mu + b, m, len);
      if (drho != nullptr) load_float(rho + b, r, len);
      kl_tile_grad(m, r, dmu == nullptr ? nullptr : dm, drho == nullptr ? nullptr : dr, len, g, k);
      if (dmu != nullptr)
        for (int64_t i = 0; i < len; ++i) dmu[b + i] = static_cast<T>(dm[i]);
      if (drho != nullptr)
        for (int64_t i = 0; i < len; ++i) drho[b + i] = static_cast<T>(dr[i]);
    }
  });
}

template <typename T, typename Acc>
void sgld_step(T* param, const T* grad, Acc* square_avg, int64_t n, const SgldParams& p,
               uint32_t stream) {
  using C = std::conditional_t<std::is_same_v<T, double>, double, float>;
  const C lr = static_cast<C>(p.lr), nd = static_cast<C>(p.num_data);
  const C wd = static_cast<C>(p.weight_decay), alpha = static_cast<C>(p.alpha);
  const C damp = static_cast<C>(p.eps);
  const C noise_scale = static_cast<C>(std::sqrt(2.0 * p.lr * p.temperature));
  for_each_tile(n, [&](int64_t b, int64_t len) {
    alignas(64) float xi[kTile];
    philox_normals(p.seed, static_cast<uint64_t>(b / 4), stream, (len + 3) / 4, xi);
    for (int64_t i = 0; i < len; ++i) {
      const C th = static_cast<C>(param[b + i]);
      const C gu = nd * static_cast<C>(grad[b + i]) + wd * th;  // grad of U (MATH.md 7)
      if (p.precondition) {
        const C gm = gu / nd;  // RMSprop statistics on the mean-loss scale
        const C v = alpha * static_cast<C>(square_avg[b + i]) + (1 - alpha) * gm * gm;
        square_avg[b + i] = static_cast<Acc>(v);
        const C g_pre = 1 / (damp + std::sqrt(v));
        param[b + i] = static_cast<T>(th - lr * g_pre * gu +
                                      noise_scale * std::sqrt(g_pre) * static_cast<C>(xi[i]));
      } else {
        param[b + i] = static_cast<T>(th - lr * gu + noise_scale * static_cast<C>(xi[i]));
      }
    }
  });
}

template <typename T>
int reparameterize_kl_fwd(const T* mu, const T* rho, T* w, int64_t n, uint64_t seed,
                          uint64_t offset, double prior_mu, double prior_sigma, bool check_finite,
                          double* kl) {
  const double inv_var0 = 1.0 / (prior_sigma * prior_sigma), log_s0 = std::log(prior_sigma);
  const KLConst k = kl_const(prior_mu, prior_sigma);
  std::atomic<int> flags{0};
  *kl = at::parallel_reduce(
      0, (n + kTile - 1) / kTile, kGrainTiles, 0.0,
      [&](int64_t t0, int64_t t1, double acc) {
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t b = t * kTile, len = std::min(kTile, n - b);
          alignas(64) float eps[kTile];
          philox_normals(seed, offset + static_cast<uint64_t>(b / 4), 0, (len + 3) / 4, eps);
          int bad = 0;
          if constexpr (std::is_same_v<T, double>) {
            int bm = 0, br = 0;
            for (int64_t i = 0; i < len; ++i) {
              const double m = mu[b + i], r = rho[b + i];
              w[b + i] = m + softplus_d(r) * static_cast<double>(eps[i]);
              acc += kl_term_d(m, r, prior_mu, inv_var0, log_s0);
              const double zm = m * 0.0, zr = r * 0.0;
              bm += zm != zm;
              br += zr != zr;
            }
            bad = (bm > 0 ? 1 : 0) | (br > 0 ? 2 : 0);
          } else if constexpr (std::is_same_v<T, float>) {
            acc += reparam_kl_tile(mu + b, rho + b, eps, w + b, len, k, &bad);
          } else {
            alignas(64) float m[kTile], r[kTile], out[kTile];
            load_float(mu + b, m, len);
            load_float(rho + b, r, len);
            acc += reparam_kl_tile(m, r, eps, out, len, k, &bad);
            for (int64_t i = 0; i < len; ++i) w[b + i] = static_cast<T>(out[i]);
          }
          if (check_finite && bad != 0) flags.fetch_or(bad);
        }
        return acc;
      },
      [](double x, double y) { return x + y; });
  return flags.load();
}

template <typename T>
void reparameterize_kl_bwd(const T* grad, double grad_kl, const T* mu, const T* rho, T* dmu,
                           T* drho, int64_t n, uint64_t seed, uint64_t offset, double prior_mu,
                           double prior_sigma) {
  const double inv_var0 = 1.0 / (prior_sigma * prior_sigma);
  const KLConst k = kl_const(prior_mu, prior_sigma);
  const float gk = static_cast<float>(grad_kl);
  for_each_tile(n, [&](int64_t b, int64_t len) {
    alignas(64) float eps[kTile];
    if (drho != nullptr)
      philox_normals(seed, offset + static_cast<uint64_t>(b / 4), 0, (len + 3) / 4, eps);
    if constexpr (std::is_same_v<T, double>) {
      for (int64_t i = 0; i < len; ++i) {
        const double g = grad[b + i];
        if (dmu != nullptr) dmu[b + i] = g + grad_kl * ((mu[b + i] - prior_mu) * inv_var0);
        if (drho != nullptr) {
          const double r = rho[b + i];
          drho[b + i] = g * static_cast<double>(eps[i]) * sigmoid_d(r) +
                        grad_kl * kl_grad_rho_d(r, inv_var0);
        }
      }
    } else if constexpr (std::is_same_v<T, float>) {
      reparam_kl_grad_tile(grad + b, mu + b, rho + b, eps, dmu == nullptr ? nullptr : dmu + b,
                           drho == nullptr ? nullptr : drho + b, len, gk, k);
    } else {
      alignas(64) float g[kTile], m[kTile], r[kTile], dm[kTile], dr[kTile];
      load_float(grad + b, g, len);
      load_float(mu + b, m, len);
      load_float(rho + b, r, len);
      reparam_kl_grad_tile(g, m, r, eps, dmu == nullptr ? nullptr : dm,
                           drho == nullptr ? nullptr : dr, len, gk, k);
      if (dmu != nullptr)
        for (int64_t i = 0; i < len; ++i) dmu[b + i] = static_cast<T>(dm[i]);
      if (drho != nullptr)
        for (int64_t i = 0; i < len; ++i) drho[b + i] = static_cast<T>(dr[i]);
    }
  });
}

#define MTBKD_INSTANTIATE(T)                                                                  \
  template int reparameterize_fwd<T>(const T*, const T*, T*, int64_t, uint64_t, uint64_t, bool);  \
  template void reparameterize_bwd<T>(const T*, const T*, T*, int64_t, uint64_t, uint64_t);   \
  template double gaussian_kl<T>(const T*, const T*, int64_t, double, double);                \
  template void gaussian_kl_bwd<T>(double, const T*, const T*, T*, T*, int64_t, double, double); \
  template int reparameterize_kl_fwd<T>(const T*, const T*, T*, int64_t, uint64_t, uint64_t,     \
                                        double, double, bool, double*);                          \
  template void reparameterize_kl_bwd<T>(const T*, double, const T*, const T*, T*, T*, int64_t,  \
                                         uint64_t, uint64_t, double, double);
MTBKD_INSTANTIATE(float)
MTBKD_INSTANTIATE(double)
MTBKD_INSTANTIATE(c10::BFloat16)
MTBKD_INSTANTIATE(c10::Half)
#undef MTBKD_INSTANTIATE

template void sgld_step<float, float>(float*, const float*, float*, int64_t, const SgldParams&,
                                      uint32_t);
template void sgld_step<double, double>(double*, const double*, double*, int64_t,
                                        const SgldParams&, uint32_t);
template void sgld_step<c10::BFloat16, float>(c10::BFloat16*, const c10::BFloat16*, float*,
                                              int64_t, const SgldParams&, uint32_t);
template void sgld_step<c10::Half, float>(c10::Half*, const c10::Half*, float*, int64_t,
                                          const SgldParams&, uint32_t);

}  // namespace cpu
}  // namespace mtbkd
