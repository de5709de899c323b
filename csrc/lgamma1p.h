// lgamma(1 + x) for x >= 0, accurate to float32 and vectorisable (framework-free).
//
// The MT-BKD prior needs L_k = sum_c lgamma(1 + lam * p_kc) (MATH.md section 2) over the whole
// vocabulary: the one transcendental per element and teacher that no online trick removes. Most
// x = lam * p are tiny (p ~ 1/V), where lgamma(1 + x) ~ -gamma x: a plain lgamma(1.0f + x) loses
// x's low bits when forming 1 + x (relative error ~ 6e-8 / x), and it is not vectorised.
//
// Ranges (chosen so that every sum below adds terms of one sign, hence no cancellation):
//   x in [0, 1)   lgamma(1 + x) = x (1 - x) Q(2x - 1): Q is smooth on [0, 1] (the nearest
//                 singularity of lgamma(1 + x) is x = -1), and the factor x (1 - x) carries both
//                 zeros exactly, so the relative accuracy holds near x = 0 and x = 1.
//   x in [1, 9)   recurrence down to [2, 3): with n = floor(x), u = x - n,
//                 lgamma(1 + x) = lgamma(2 + u) + log((2 + u)(3 + u)...(n + u)),
//                 lgamma(2 + u) = u R(2u - 1), which is 0 exactly at x = 1.
//   x >= 9        Stirling's series in y = 1 + x with three correction terms (error < 1e-10).
// Q (degree 9) and R (degree 7) interpolate at Chebyshev nodes, computed with mpmath at 90
// digits; their relative error is < 5e-9, far below float32's 6e-8. Evaluation in float32 adds a
// few ulp. The common case (every lane below 1) takes one polynomial and two multiplies.
//
// T is float or a SIMD type with a SimdOps<T> specialisation (common.h, cpu/vec_ops.h).
// float64 kernels use std::lgamma / SLEEF instead: these polynomials are fitted for float32.
#pragma once

#include "common.h"

namespace mtbkd {

namespace lgamma1p_detail {

// Q(t) = lgamma(1 + x) / (x (1 - x)), x = (t + 1) / 2, monomial coefficients in t, degree 0 first.
constexpr double kQ[10] = {
    -0.483128952280385482662,   0.0729799484940324699174,   -0.0157277634650791105947,
    0.003913534145648777688,    -0.00105050610919833567401, 0.000294762858716007048449,
    -0.0000832186248664851651869, 0.0000245135657188396200321, -0.00000955759631328889529787,
    0.00000290524285288940045281};

// R(t) = lgamma(2 + u) / u, u = (t + 1) / 2.
constexpr double kR[8] = {
    0.569365742162317346171,    0.133790899482868102747,  -0.0112014995625875696858,
    0.0013596321113173995584,   -0.000193255506191660571529, 0.0000299998924130949313912,
    -0.00000522800740514770351644, 8.91020218151381544443e-7};

constexpr double kHalfLog2Pi = 0.918938533204672741780;

template <class T, int N>
MTBKD_HD T horner(T t, const double (&c)[N]) {
  using O = SimdOps<T>;
  T acc = O::splat(c[N - 1]);
  for (int i = N - 2; i >= 0; --i) acc = O::fma(acc, t, O::splat(c[i]));
  return acc;
}

// x in [0, 1]
template <class T>
MTBKD_HD T small_range(T x) {
  using O = SimdOps<T>;
  const T one = O::splat(1.0);
  const T t = O::fma(x, O::splat(2.0), O::splat(-1.0));
  return x * (one - x) * horner(t, kQ);
}

}  // namespace lgamma1p_detail

template <class T>
MTBKD_HD T lgamma1p(T x) {
  using O = SimdOps<T>;
  using namespace lgamma1p_detail;
  const T one = O::splat(1.0);
  const auto is_small = O::lt(x, one);
  const T small = small_range(O::min(x, one));
  if (O::all(is_small)) return small;

  // Middle range, evaluated on a clamped copy so that other lanes stay harmless.
  // 9 - 2^-20: the largest float below 9, so that floor(xm) <= 8
  const T xm = O::max(O::min(x, O::splat(8.999999046325684)), one);
  const T n = O::floor(xm);
  const T u = xm - n;
  const T lg2u = u * horner(O::fma(u, O::splat(2.0), O::splat(-1.0)), kR);
  T prod = one;
  for (int i = 2; i <= 8; ++i) {
    // factor (i + u) when i <= n, i.e. i < n + 1/2
    const auto take = O::lt(O::splat(i - 0.5), n);
    prod = prod * O::select(take, u + O::splat(static_cast<double>(i)), one);
  }
  const T middle = lg2u + O::log(prod);

  // Stirling: (y - 1/2) log y - y + log(2 pi)/2 + 1/(12 y) - 1/(360 y^3) + 1/(1260 y^5).
  const T y = O::max(x, O::splat(9.0)) + one;
  const T r = one / y;
  const T r2 = r * r;
  const T series =
      r * O::fma(r2, O::fma(r2, O::splat(1.0 / 1260.0), O::splat(-1.0 / 360.0)),
                 O::splat(1.0 / 12.0));
  const T large = O::fma(y - O::splat(0.5), O::log(y), O::splat(kHalfLog2Pi) - y) + series;

  T res = O::select(O::lt(x, O::splat(9.0)), middle, large);
  res = O::select(is_small, small, res);
  // +inf maps to +inf (Stirling would give inf - inf); NaN stays NaN since lt(NaN, .) is false.
  return O::select(O::lt(x, O::splat(static_cast<double>(INFINITY))), res, x);
}

}  // namespace mtbkd
