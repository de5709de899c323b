// at::vec::Vectorized adapters for the framework-free math of common.h / lgamma1p.h, plus the
// load/store helpers the CPU loss kernels share. Include first in a kernel file (it selects the
// SIMD capability before ATen's vector headers are seen).
#pragma once

#include "cpu/capability.h"

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>
#include <type_traits>

#include "common.h"
#include "lgamma1p.h"

namespace mtbkd {

template <class A>
struct VecSimdOps {
  using V = at::vec::Vectorized<A>;
  using Mask = V;  // lanes of all ones / all zeros, as Vectorized comparisons return
  static V splat(double c) { return V(static_cast<A>(c)); }
  static V fma(const V& a, const V& b, const V& c) { return at::vec::fmadd(a, b, c); }
  static Mask lt(const V& a, const V& b) { return a < b; }
  static V select(const Mask& m, const V& a, const V& b) { return V::blendv(b, a, m); }
  static bool all(const Mask& m) { return m.zero_mask() == 0; }
  static V floor(const V& a) { return a.floor(); }
  static V min(const V& a, const V& b) { return at::vec::minimum(a, b); }
  static V max(const V& a, const V& b) { return at::vec::maximum(a, b); }
  static V log(const V& a) { return a.log(); }
  static V round(const V& a) { return a.round(); }
  // 2^n for integral n in [-126, 127] (float) / [-1022, 1023] (double): build the exponent field
  // (n = -127 / -1023 gives the field 0, i.e. exactly 0, which exp_f32 relies on).
  static V pow2i(const V& n) {
    using I = std::conditional_t<std::is_same_v<A, float>, int32_t, int64_t>;
    constexpr int kMant = std::is_same_v<A, float> ? 23 : 52;
    constexpr I kBias = std::is_same_v<A, float> ? 127 : 1023;
    const auto bits = (at::vec::convert_to_int_of_same_size(n) + at::vec::Vectorized<I>(kBias))
                      << at::vec::Vectorized<I>(kMant);
    return at::vec::cast<A>(bits);
  }
};

template <>
struct SimdOps<at::vec::Vectorized<float>> : VecSimdOps<float> {};
template <>
struct SimdOps<at::vec::Vectorized<double>> : VecSimdOps<double> {};

namespace cpu {

template <class A>
using Vec = at::vec::Vectorized<A>;

// exp of the accumulation type: float32 uses exp_f32 (common.h, inlined, ~1 ulp); float64 uses
// SLEEF's 1-ulp exp (exported by libtorch_cpu) under AVX2 / AVX-512, ATen's element-wise fallback
// otherwise. log is only needed off the hot path (and in JSD): SLEEF / ATen for both.
inline Vec<float> vexp(const Vec<float>& x) { return exp_f32(x); }
inline Vec<double> vexp(const Vec<double>& x) { return x.exp(); }
// exp that keeps float32's denormal range (exp_f32 is 0 below -88.03; torch keeps values down to
// about -103.9): exp(x/2)^2. For the entropy weights, where a nearly one-hot teacher's entropy
// can be a denormal that must not read as exactly 0 (MATH.md section 1's 1/K rule is for Σ H = 0).
inline Vec<float> vexp_denormal(const Vec<float>& x) {
  const Vec<float> h = exp_f32(x * Vec<float>(0.5f));
  return h * h;
}
inline Vec<double> vexp_denormal(const Vec<double>& x) { return x.exp(); }
template <class A>
inline Vec<A> vlog(const Vec<A>& x) {
  return x.log();
}

// lgamma(1 + x), x >= 0: the float32 polynomial/recurrence/Stirling scheme of lgamma1p.h; float64
// uses SLEEF's lgamma (1 + x rounds below float64's needs only for x < 1e-16, where the term
// contributes nothing measurable to a sum over the vocabulary).
inline Vec<float> vlgamma1p(const Vec<float>& x) { return lgamma1p(x); }
inline Vec<double> vlgamma1p(const Vec<double>& x) { return (Vec<double>(1.0) + x).lgamma(); }

template <class A>
inline A hsum(const Vec<A>& v) {
  return at::vec::vec_reduce_all<A>([](Vec<A>& a, Vec<A>& b) { return a + b; }, v);
}
template <class A>
inline A hmax(const Vec<A>& v) {
  return at::vec::vec_reduce_all<A>([](Vec<A>& a, Vec<A>& b) { return at::vec::maximum(a, b); },
                                    v);
}

}  // namespace cpu
}  // namespace mtbkd
