// Framework-free inline code shared by the CPU and CUDA loss kernels (MATH.md sections 1-3).
//
// Nothing here includes a torch header: the CPU kernels instantiate these templates with
// at::vec::Vectorized (see cpu/vec_ops.h) or with plain float/double, the CUDA kernels with
// float/double on the device, and csrc/tests/ runs them standalone under ctest.
//
// Contents
//   SimdOps<T>        the handful of element-wise operations the generic math needs (scalar here;
//                     the Vectorized specialisations live in cpu/vec_ops.h)
//   StudentAcc/TeacherAcc and shift_student/shift_teacher/merge_row_stats
//                     blocked online softmax: per-block sums taken relative to the block's maxima
//                     are merged into the row's running sums, together with the cross terms
//   exp_f32           a vectorisable float32 exp (~1 ulp) for the kernels' hot loops
//   entropy_weight / mixture helpers
//                     the per-row scalar algebra after the statistics pass
#pragma once

#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define MTBKD_HD __host__ __device__ __forceinline__
#else
#define MTBKD_HD inline
#endif

namespace mtbkd {

// ---------------------------------------------------------------------------------------------
// Element-wise operations used by generic math (lgamma1p.h). A SIMD type specialises SimdOps with
// the same static members; `Mask` is whatever `lt` returns and `select` consumes.
// ---------------------------------------------------------------------------------------------
template <class T>
struct SimdOps;

template <>
struct SimdOps<float> {
  using Mask = bool;
  MTBKD_HD static float splat(double c) { return static_cast<float>(c); }
  MTBKD_HD static float fma(float a, float b, float c) { return ::fmaf(a, b, c); }
  MTBKD_HD static Mask lt(float a, float b) { return a < b; }
  MTBKD_HD static float select(Mask m, float a, float b) { return m ? a : b; }
  MTBKD_HD static bool all(Mask m) { return m; }
  MTBKD_HD static float floor(float a) { return ::floorf(a); }
  // NaN in a propagates, like at::vec::minimum / maximum
  MTBKD_HD static float min(float a, float b) { return (a < b || a != a) ? a : b; }
  MTBKD_HD static float max(float a, float b) { return (a > b || a != a) ? a : b; }
  MTBKD_HD static float log(float a) { return ::logf(a); }
  MTBKD_HD static float round(float a) { return ::rintf(a); }
  // 2^n for an integral-valued n in [-126, 127]; 0 for n = -127 (an exponent field of 0)
  MTBKD_HD static float pow2i(float n) {
    return n != n ? n : n < -126.5f ? 0.0f : ::ldexpf(1.0f, static_cast<int>(n));
  }
};

template <>
struct SimdOps<double> {
  using Mask = bool;
  MTBKD_HD static double splat(double c) { return c; }
  MTBKD_HD static double fma(double a, double b, double c) { return ::fma(a, b, c); }
  MTBKD_HD static Mask lt(double a, double b) { return a < b; }
  MTBKD_HD static double select(Mask m, double a, double b) { return m ? a : b; }
  MTBKD_HD static bool all(Mask m) { return m; }
  MTBKD_HD static double floor(double a) { return ::floor(a); }
  // NaN in a propagates, like at::vec::minimum / maximum
  MTBKD_HD static double min(double a, double b) { return (a < b || a != a) ? a : b; }
  MTBKD_HD static double max(double a, double b) { return (a > b || a != a) ? a : b; }
  MTBKD_HD static double log(double a) { return ::log(a); }
  MTBKD_HD static double round(double a) { return ::rint(a); }
  MTBKD_HD static double pow2i(double n) {
    return n == n ? ::ldexp(1.0, static_cast<int>(n)) : n;
  }
};

// Scalar exp/log/lgamma of the accumulation type (float on the fast path, double when the
// inputs are float64, which must stay float64 end to end).
MTBKD_HD float scalar_exp(float x) { return ::expf(x); }
MTBKD_HD double scalar_exp(double x) { return ::exp(x); }
MTBKD_HD float scalar_log(float x) { return ::logf(x); }
MTBKD_HD double scalar_log(double x) { return ::log(x); }
MTBKD_HD float scalar_log1p(float x) { return ::log1pf(x); }
MTBKD_HD double scalar_log1p(double x) { return ::log1p(x); }

template <class T>
MTBKD_HD T neg_infinity() {
  return -static_cast<T>(INFINITY);
}

// ---------------------------------------------------------------------------------------------
// exp for float32 lanes, written once for every SimdOps type. The loss kernels take 2 + 2K
// exponentials per class in their statistics pass; an inlined polynomial keeps them in registers
// (a call into a vector math library spills every live accumulator around each call).
// exp(x) = 2^n exp(r), n = round(x / ln 2), r = x - n ln 2 (Cody-Waite: ln 2 = hi + lo, hi with
// few mantissa bits so n * hi is exact), exp(r) = 1 + r + r^2 P(r), |r| <= ln(2)/2, P of degree 5
// interpolating (e^r - 1 - r) / r^2 at Chebyshev nodes (relative error 6.5e-8 in float32 ~ 1 ulp).
// Arguments are clamped to [-127 ln 2, 127.5 ln 2]: n = -127 builds an exponent field of 0, so
// exp(x) is exactly 0 for x <= -88.03 (and for -inf; results in the denormal range come out
// denormal or 0); exp saturates at 2.4e38 from x = 88.376 on (the kernels only take exponentials
// of arguments <= 0, measured from a maximum). NaN stays NaN.
// ---------------------------------------------------------------------------------------------
template <class T>
MTBKD_HD T exp_f32(T x) {
  using O = SimdOps<T>;
  x = O::max(O::min(x, O::splat(88.3762626)), O::splat(-88.0296919));
  const T n = O::round(x * O::splat(1.44269504088896341));
  T r = O::fma(n, O::splat(-0.693359375), x);
  r = O::fma(n, O::splat(2.12194440054690583e-4), r);
  T p = O::splat(1.9890980869750325563e-4);
  p = O::fma(p, r, O::splat(1.393364103198670115e-3));
  p = O::fma(p, r, O::splat(8.3333109344488684687e-3));
  p = O::fma(p, r, O::splat(4.1666465006040048761e-2));
  p = O::fma(p, r, O::splat(1.6666666681614255706e-1));
  p = O::fma(p, r, O::splat(5.000000001345772715e-1));
  const T er = O::fma(p, r * r, r) + O::splat(1.0);
  return er * O::pow2i(n);
}

// ---------------------------------------------------------------------------------------------
// Blocked online softmax with cross terms (MATH.md sections 1-3).
//
// For a row we need, with student logits z, teacher logits t_k, d = z - m and u_k = t_k - o_k
// measured from running offsets m (student) and o_k (teacher k, usually its running maximum):
//   S  = sum e_s            e_s = exp(d / tau)          student normaliser at tau
//   S1 = sum exp(d)                                     student normaliser at temperature 1 (CE)
//   A_k = sum e_k           e_k = exp(u_k / tau)        teacher normaliser at tau
//   B_k = sum e_k d                                     E_{p_k}[z]           (cross term C_k)
//   F_k = sum e_k u_k                                   E_{p_k}[t_k]         (forward KL)
//   E_k = sum e_s x_k       x_k = d - (t_k - b_k)      E_q[x_k]             (reverse KL)
//         with b_k the teacher's logit at the column of the student's offset m (its maximum)
//   Aw_k = sum ew_k         ew_k = exp(u_k / tau_w)     teacher normaliser at tau_w
//   Dw_k = sum ew_k u_k                                 E_{p~_k}[t_k]        (entropy H_k)
// Moving an offset by delta rescales the exponentials by exp(-delta / temperature) and shifts the
// linear factor by -delta (E_k's by -(delta - the change of b_k)); the shift_* functions apply
// exactly that, so two partial sums taken relative to different maxima (two blocks of a row)
// merge without error growth. Everything is measured from a maximum so the sums never overflow, and the entropy and
// cross terms come out as differences of O(1) quantities (no cancellation for large logits).
// ---------------------------------------------------------------------------------------------
template <class T>
struct StudentAcc {
  T m;   // offset (running maximum of z); -inf while empty
  T S;   // sum exp(d / tau)
  T S1;  // sum exp(d)
};

template <class T>
struct TeacherAcc {
  T o;   // offset (running maximum of t_k, or a fixed tau * lse when cached); -inf while empty
  T A;   // sum e_k
  T B;   // sum e_k d
  T F;   // sum e_k u_k
  T E;   // sum e_s ((z - m) - (t_k - b))
  T Aw;  // sum ew_k
  T Dw;  // sum ew_k u_k
  T b;   // t_k at the column of the student's offset m (reverse KL; 0 while unused)
  // A - 1 and Aw - 1 without rounding them through A: the sums without one entry at the maximum
  // (where e = 1), so that log A = log1p(R) keeps the small sum of a nearly one-hot teacher that
  // A itself rounds away (its entropy). Only where o is the running maximum (not with cached
  // offsets); -1 while empty.
  T R;
  T Rw;
};

// The clamp of linear factors (x - offset >= -kFarShift) in frame shifts, as the CPU kernels'
// kFar: where an exponential is exactly 0.
constexpr double kFarShift = 1e30;

template <class T>
MTBKD_HD StudentAcc<T> empty_student() {
  return StudentAcc<T>{neg_infinity<T>(), T(0), T(0)};
}

template <class T>
MTBKD_HD TeacherAcc<T> empty_teacher() {
  return TeacherAcc<T>{neg_infinity<T>(), T(0), T(0), T(0), T(0), T(0), T(0), T(0), T(-1), T(-1)};
}

// Move the student frame to the offset new_m >= s.m and the teachers' logits frame[k].b at its
// column (frame: the teacher sums of the part whose frame is kept); B_k and E_k depend on both.
// E_k only moves where the frame does, so a part that holds the row's maximum keeps its sum as is
// (a one-hot student's E_k stays exactly 0).
template <class T>
MTBKD_HD void shift_student(StudentAcc<T>& s, TeacherAcc<T>* tk, int K, T new_m,
                            const TeacherAcc<T>* frame, T inv_tau) {
  if (s.m == neg_infinity<T>()) {  // empty: every sum is still 0
    s.m = new_m;
    for (int k = 0; k < K; ++k) tk[k].b = frame[k].b;
    return;
  }
  if (!(new_m >= s.m)) return;  // new_m is NaN (the NaN check reports it)
  const T delta = new_m - s.m;
  const T sc = delta > T(0) ? scalar_exp(-delta * inv_tau) : T(1);
  // the linear factors z - new_m are clamped at -kFar, as in the blocks (a part whose logits
  // all lie below -1e30, beside one of ordinary logits: delta ~ 3e38 would overflow B)
  const T dl = delta < T(kFarShift) ? delta : T(kFarShift);
  for (int k = 0; k < K; ++k) {
    if (delta > T(0)) tk[k].B -= dl * tk[k].A;
    const T db = frame[k].b - tk[k].b;
    // sc = 0: the part's student mass is gone, and so is E (not 0 * inf)
    if (delta > T(0) || db != T(0))
      tk[k].E = sc > T(0) ? sc * (tk[k].E - s.S * (delta - db)) : T(0);
    tk[k].b = frame[k].b;
  }
  s.S *= sc;
  s.S1 *= delta > T(0) ? scalar_exp(-delta) : T(1);
  s.m = new_m;
}

// Move teacher k's offset to new_o >= t.o (E_k does not depend on it).
template <class T>
MTBKD_HD void shift_teacher(TeacherAcc<T>& t, T new_o, T inv_tau, T inv_tau_w) {
  if (!(new_o > t.o)) return;
  if (t.o == neg_infinity<T>()) {
    t.o = new_o;
    return;
  }
  const T delta = new_o - t.o;
  const T sc = scalar_exp(-delta * inv_tau);
  const T scw = scalar_exp(-delta * inv_tau_w);
  t.B *= sc;
  t.F = sc > T(0) ? sc * (t.F - delta * t.A) : T(0);  // (not 0 * inf for delta ~ 3e38)
  t.A *= sc;
  t.Dw = scw > T(0) ? scw * (t.Dw - delta * t.Aw) : T(0);
  t.Aw *= scw;
  t.o = new_o;
}

// R and Rw of two parts' teacher sums, both moved to their common offset: the part that holds the
// maximum (a's on a tie) keeps its rest; the other one's whole sum joins it. Call before A and Aw
// are added.
template <class T>
MTBKD_HD void merge_rest(TeacherAcc<T>& a, const TeacherAcc<T>& b, bool keep_a) {
  a.R = keep_a ? a.R + b.A : b.R + a.A;
  a.Rw = keep_a ? a.Rw + b.Aw : b.Rw + a.Aw;
}

// Merge partial row statistics b into a (both complete for their part of the row).
template <class T>
MTBKD_HD void merge_row_stats(StudentAcc<T>& sa, TeacherAcc<T>* ta, StudentAcc<T>& sb,
                              TeacherAcc<T>* tb, int K, T inv_tau, T inv_tau_w) {
  // the frame of the part with the larger maximum is kept (a's on a tie)
  const bool keep_a = !(sb.m > sa.m);
  const T m = keep_a ? sa.m : sb.m;
  const TeacherAcc<T>* frame = keep_a ? ta : tb;
  shift_student(keep_a ? sb : sa, keep_a ? tb : ta, K, m, frame, inv_tau);
  for (int k = 0; k < K; ++k) {
    const bool keep_ta = !(tb[k].o > ta[k].o);
    const T o = keep_ta ? ta[k].o : tb[k].o;
    shift_teacher(ta[k], o, inv_tau, inv_tau_w);
    shift_teacher(tb[k], o, inv_tau, inv_tau_w);
    merge_rest(ta[k], tb[k], keep_ta);
    ta[k].A += tb[k].A;
    ta[k].B += tb[k].B;
    ta[k].F += tb[k].F;
    ta[k].E += tb[k].E;
    ta[k].Aw += tb[k].Aw;
    ta[k].Dw += tb[k].Dw;
  }
  sa.S += sb.S;
  sa.S1 += sb.S1;
}

// H = log Aw - Dw / (Aw tau_w): the entropy of softmax(t / tau_w) from its online sums; both
// terms are >= 0, so nothing cancels. log Aw is taken as log1p(Rw) (Rw = Aw - 1 kept apart, see
// TeacherAcc): a nearly one-hot teacher's entropy is mostly that small sum, which Aw rounds.
template <class T>
MTBKD_HD T entropy_from_sums(T Aw, T Rw, T Dw, T inv_tau_w) {
  return scalar_log1p(Rw) - Dw * inv_tau_w / Aw;
}

// ---------------------------------------------------------------------------------------------
// Per-row scalar algebra (MATH.md sections 1 and 2)
// ---------------------------------------------------------------------------------------------

// Entropy weights w_k = (1 - H_k / sum H) / sum_j (1 - H_j / sum H); uniform when K = 1 or every
// teacher is one-hot (sum H = 0). Written as the reference does, so the rounding matches.
template <class T>
MTBKD_HD void entropy_weights(const T* H, int K, T* w) {
  T total = T(0);
  for (int k = 0; k < K; ++k) total += H[k];
  if (K == 1 || !(total > T(0))) {
    for (int k = 0; k < K; ++k) w[k] = T(1) / T(K);
    return;
  }
  T norm = T(0);
  for (int k = 0; k < K; ++k) {
    w[k] = T(1) - H[k] / total;
    norm += w[k];
  }
  for (int k = 0; k < K; ++k) w[k] /= norm;
}

// log-sum-exp over K terms that may be -inf (a teacher with weight 0 drops out of the mixture);
// writes the softmax into r (responsibilities). Returns -inf if every term is -inf.
template <class T>
MTBKD_HD T logsumexp_softmax(const T* ell, int K, T* r) {
  T mx = neg_infinity<T>();
  for (int k = 0; k < K; ++k) mx = ell[k] > mx ? ell[k] : mx;
  if (mx == neg_infinity<T>()) {
    for (int k = 0; k < K; ++k) r[k] = T(0);
    return mx;
  }
  T sum = T(0);
  for (int k = 0; k < K; ++k) {
    r[k] = ell[k] == neg_infinity<T>() ? T(0) : scalar_exp(ell[k] - mx);
    sum += r[k];
  }
  for (int k = 0; k < K; ++k) r[k] /= sum;
  return mx + scalar_log(sum);
}

}  // namespace mtbkd
