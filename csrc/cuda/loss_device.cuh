// Device-side building blocks shared by the CUDA loss kernels (internal to csrc/cuda/*.cu):
// element I/O, the accumulation type's math (lgamma1p as in kernels/losses.py), online-softmax
// states with their merges, block-wide merges, per-row weights and the dtype / teacher-count
// dispatch. Framework-free; see loss_kernels.cuh for the public launchers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>
#include <stdint.h>

#include "common.h"
#include "loss_kernels.cuh"

namespace mtbkd {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFullMask = 0xffffffffu;

// ---- element types ----------------------------------------------------------------------------

template <class T>
struct IO;

template <>
struct IO<float> {
  using Acc = float;
  __device__ static float load(const float* p) { return __ldg(p); }
  __device__ static void store(float* p, float x) { *p = x; }
};

template <>
struct IO<double> {
  using Acc = double;
  __device__ static double load(const double* p) { return __ldg(p); }
  __device__ static void store(double* p, double x) { *p = x; }
};

template <>
struct IO<__nv_bfloat16> {
  using Acc = float;
  __device__ static float load(const __nv_bfloat16* p) { return __bfloat162float(*p); }
  __device__ static void store(__nv_bfloat16* p, float x) { *p = __float2bfloat16_rn(x); }
};

template <>
struct IO<__half> {
  using Acc = float;
  __device__ static float load(const __half* p) { return __half2float(*p); }
  __device__ static void store(__half* p, float x) { *p = __float2half_rn(x); }
};

// ---- math of the accumulation type -------------------------------------------------------------

template <class A>
__device__ __forceinline__ A ninf() {
  return -static_cast<A>(INFINITY);
}

// exp on the hot loops: the SFU exponential for float32 (about 2 ulp for the arguments a softmax
// produces, as Triton's tl.exp), called explicitly, full precision for float64. setup.py builds
// with -ftz=false and without --use_fast_math (which would make every other expf/logf an
// approximation too). Without flush-to-zero, ex2.approx.f32 keeps denormal results (ptxas
// computes 2^(x/2) squared below 2^-126), so a nearly one-hot teacher's entropy stays a nonzero
// denormal sum as in the CPU kernels (vexp_denormal) and does not fall back to the 1/K weights.
// float64 calls stay out of line: the float64 kernels are the exact-comparison path, not the fast
// one, and inlining their long exp/log sequences into every unrolled teacher loop multiplies
// ptxas time.
__device__ __noinline__ double exp_f64(double x) { return exp(x); }
__device__ __noinline__ double log_f64(double x) { return log(x); }
__device__ __forceinline__ float fexp(float x) { return __expf(x); }
__device__ __forceinline__ double fexp(double x) { return exp_f64(x); }
__device__ __forceinline__ float flog_fast(float x) { return __logf(x); }
__device__ __forceinline__ double flog_fast(double x) { return log_f64(x); }
// Per-row scalars (log of a row sum) go through double: exact to float32 under any fast-math flag.
__device__ __forceinline__ float flog(float x) { return static_cast<float>(log_f64(x)); }
__device__ __forceinline__ double flog(double x) { return log_f64(x); }
__device__ __noinline__ double log1p_f64(double x) { return log1p(x); }
__device__ __forceinline__ float flog1p(float x) { return static_cast<float>(log1p_f64(x)); }
__device__ __forceinline__ double flog1p(double x) { return log1p_f64(x); }

// log1p(x) = 2 atanh(u), u = x / (2 + x) <= 1/5 for x in [0, 1/2]: relative accuracy for tiny x.
template <class A>
__device__ __forceinline__ A log1p_small(A x) {
  const A u = x / (A(2) + x);
  const A u2 = u * u;
  A s;
  if (sizeof(A) == 8) {
    s = u2 * A(1.0 / 25) + A(1.0 / 23);
    s = s * u2 + A(1.0 / 21);
    s = s * u2 + A(1.0 / 19);
    s = s * u2 + A(1.0 / 17);
    s = s * u2 + A(1.0 / 15);
    s = s * u2 + A(1.0 / 13);
  } else {
    s = A(1.0 / 13);
  }
  s = s * u2 + A(1.0 / 11);
  s = s * u2 + A(1.0 / 9);
  s = s * u2 + A(1.0 / 7);
  s = s * u2 + A(1.0 / 5);
  s = s * u2 + A(1.0 / 3);
  s = s * u2 + A(1);
  return A(2) * u * s;
}

// lgamma(2 + u), |u| <= 1/2: (1 - gamma) u + sum_{k>=2} (-1)^k (zeta(k) - 1) u^k / k, 13 terms
// for float32, 27 for float64 (terms shrink like 4^-k). Exactly 0 at u = 0.
template <class A>
__device__ __forceinline__ A lgamma2p(A u) {
  A s;
  if (sizeof(A) == 8) {
    s = u * A(-2.7595228851242331e-10) + A(5.7313672416788620e-10);
    s = s * u + A(-1.1921401405860912e-9);
    s = s * u + A(2.4836745438024783e-9);
    s = s * u + A(-5.1834750419700467e-9);
    s = s * u + A(1.0838659214896954e-8);
    s = s * u + A(-2.2711094608943165e-8);
    s = s * u + A(4.7698101693639806e-8);
    s = s * u + A(-1.0043224823968100e-7);
    s = s * u + A(2.1207184805554666e-7);
    s = s * u + A(-4.4924691987645660e-7);
    s = s * u + A(9.5514121304074198e-7);
    s = s * u + A(-2.0392157538013662e-6);
    s = s * u + A(4.3748667899074878e-6);
    s = s * u + A(-9.4394882752683959e-6);
  } else {
    s = A(-9.4394882752683959e-6);
  }
  s = s * u + A(2.0507212775670692e-5);
  s = s * u + A(-4.4926236738133142e-5);
  s = s * u + A(9.9457512781808534e-5);
  s = s * u + A(-2.2315475845357938e-4);
  s = s * u + A(5.0966952474304242e-4);
  s = s * u + A(-1.1927539117032610e-3);
  s = s * u + A(2.8905103307415233e-3);
  s = s * u + A(-7.3855510286739853e-3);
  s = s * u + A(2.0580808427784548e-2);
  s = s * u + A(-6.7352301053198095e-2);
  s = s * u + A(3.2246703342411322e-1);
  s = s * u + A(4.2278433509846714e-1);
  return s * u;
}

// lgamma(1 + x), x >= 0 (x = lam p): x < 1/2 as lgamma(2 + x) - log1p(x); 1 + x < 8 by the
// recurrence down to lgamma(2 + u), u = (x - 1) - n (exact near the zero at x = 1); else Stirling.
// The same function as kernels/losses.py::_lgamma1p.
template <class A>
__device__ __forceinline__ A lgamma1p_inline(A x) {
  const A y = A(1) + x;
  if (x < A(0.5)) return lgamma2p(x) - log1p_small(x);
  if (y < A(8)) {
    const A n = floor(y - A(1.5));
    A prod = A(1);
    for (int j = 1; j <= 6; ++j) prod *= (A(j) <= n) ? y - A(j) : A(1);
    return lgamma2p((x - A(1)) - n) + flog(prod);
  }
  const A r = A(1) / (y * y);
  A c;
  if (sizeof(A) == 8) {
    c = r * A(-2.9550653594771242e-2) + A(6.4102564102564103e-3);
    c = c * r + A(-1.9175269175269175e-3);
    c = c * r + A(8.4175084175084175e-4);
    c = c * r + A(-5.9523809523809524e-4);
  } else {
    c = r * A(-5.9523809523809524e-4);
  }
  c = c * r + A(7.9365079365079365e-4);
  c = c * r + A(-2.7777777777777778e-3);
  c = c * r + A(8.3333333333333333e-2);
  return (y - A(0.5)) * flog(y) - y + A(0.91893853320467274) + c / y;
}

__device__ __forceinline__ float lgamma1p(float x) { return lgamma1p_inline(x); }
__device__ __noinline__ double lgamma1p(double x) { return lgamma1p_inline(x); }

// ---- online states and their merges ----------------------------------------------------------
//
// Every normaliser is kept as the raw running maximum m of its logits x and the sum
// s = sum e^((x - m) scale) (scale = 1/tau > 0): a log-probability is (x - m) scale - log s, never
// x scale - lse with one rounded lse = m scale + log s (at logits of 1e4, or tau = 0.05, that single
// float32 number is off by ~1e-3). x - m is exact near the maximum, where the probabilities are.

// Logits of -inf (a class ruled out, with check_finite off): a linear factor x - offset (or an
// offset shift) is clamped at -kFar, where every exponential is exactly 0, so e * (x - offset) is
// 0 (or a large finite number, like the CPU kernels' clamp) instead of 0 * -inf = NaN.
template <class A>
__device__ __forceinline__ A clamp_far(A x) {
  return x > A(-1e30) ? x : A(-1e30);  // NaN (-inf - -inf of an empty frame) -> -1e30 too
}

// Online logsumexp of x * scale: m = max x, s = sum e^((x - m) scale).
template <class A>
__device__ __forceinline__ void lse_push(A& m, A& s, A x, A scale) {
  if (x > m) {
    s = s * fexp((m - x) * scale) + A(1);  // m = -inf: e^(-inf) = 0
    m = x;
  } else {
    const A e = fexp((x - m) * scale);
    if (e > A(0)) s += e;  // x = m = -inf gives NaN: skipped
  }
}

template <class A>
__device__ __forceinline__ void lse_merge(A& m, A& s, A m2, A s2, A scale) {
  const A mm = m > m2 ? m : m2;
  if (mm == ninf<A>()) return;
  const A f1 = s > A(0) ? fexp((m - mm) * scale) : A(0);
  const A f2 = s2 > A(0) ? fexp((m2 - mm) * scale) : A(0);
  s = s * f1 + s2 * f2;
  m = mm;
}

// Online entropy sums of softmax(x * scale): m = max x, r = sum e^((x - m) scale) - 1 (the sum
// without one entry at the maximum, kept apart so that log1p(r) keeps a nearly one-hot teacher's
// small sum that 1 + r would round away; -1 while empty), b = sum e^((x - m) scale) (x - m);
// H = log1p(r) - b scale / (1 + r). Rescaling to a new max m': the whole old sum joins the rest,
// r' = e^((m - m') scale) (1 + r), b' = e^((m - m') scale) (b + (m - m') (1 + r)).
template <class A>
__device__ __forceinline__ void ent_push(A& m, A& r, A& b, A x, A scale) {
  if (x > m) {
    if (r >= A(0)) {
      const A f = fexp((m - x) * scale);
      b = f * (b + (m - x) * (r + A(1)));
      r = (r + A(1)) * f;
    } else {
      r = A(0);
    }
    m = x;
  } else {
    const A e = fexp((x - m) * scale);
    if (e > A(0)) {
      r += e;
      b += e * (x - m);
    }
  }
}

// The part with the larger maximum keeps its rest; the other's whole sum 1 + r2 joins it.
template <class A>
__device__ __forceinline__ void ent_merge(A& m, A& r, A& b, A m2, A r2, A b2, A scale) {
  const A mm = m > m2 ? m : m2;
  if (mm == ninf<A>()) return;
  A nb = A(0), t1 = A(0), t2 = A(0);
  if (r >= A(0)) {
    const A f = fexp((m - mm) * scale);
    nb += f * (b + (m - mm) * (r + A(1)));
    t1 = f * (r + A(1));
  }
  if (r2 >= A(0)) {
    const A f = fexp((m2 - mm) * scale);
    nb += f * (b2 + (m2 - mm) * (r2 + A(1)));
    t2 = f * (r2 + A(1));
  }
  // a tie adds both rests and one of the tops, in an order that does not depend on which part
  // is first: the lanes of a warp merge in opposite roles and must end with equal states
  r = m2 > m ? r2 + t1 : (m > m2 ? r + t2 : (r + r2) + A(1));
  m = mm;
  b = nb;
}

template <class A>
__device__ __forceinline__ A entropy_of(A r, A b, A scale) {
  return flog1p(r) - b * scale / (r + A(1));
}

// K online logsumexps (teachers at tau).
template <class A, int KT>
struct LseK {
  A m[KT], s[KT];
  __device__ void init() {
#pragma unroll
    for (int k = 0; k < KT; ++k) m[k] = ninf<A>(), s[k] = A(0);
  }
  __device__ void merge(const LseK& o, A scale) {
#pragma unroll
    for (int k = 0; k < KT; ++k) lse_merge(m[k], s[k], o.m[k], o.s[k], scale);
  }
};

// K online entropies (teachers at tau_w).
template <class A, int KT>
struct EntK {
  A m[KT], r[KT], b[KT];  // see ent_push
  __device__ void init() {
#pragma unroll
    for (int k = 0; k < KT; ++k) m[k] = ninf<A>(), r[k] = A(-1), b[k] = A(0);
  }
  __device__ void merge(const EntK& o, A scale) {
#pragma unroll
    for (int k = 0; k < KT; ++k) ent_merge(m[k], r[k], b[k], o.m[k], o.r[k], o.b[k], scale);
  }
};

// The student's two softmaxes, sharing the raw max m: s = sum e^((z - m)/tau) and, for the
// cross-entropy, s1 = sum e^(z - m). Pushes one logit; returns the max before it.
template <class A>
__device__ __forceinline__ A student_push(A& m, A& s, A& s1, A z, A inv_tau, bool with_s1) {
  const A m_old = m;
  if (z > m) {
    s = s * fexp((m - z) * inv_tau) + A(1);
    if (with_s1) s1 = s1 * fexp(m - z) + A(1);
    m = z;
  } else {
    const A e = fexp((z - m) * inv_tau);
    if (e > A(0)) {
      s += e;
      if (with_s1) s1 += fexp(z - m);
    }
  }
  return m_old;
}

// Weighted-sum KD: the student at tau (and 1), with the reverse KL's sums of K teachers
//   R_k = sum e_s x_k,  x_k = (z - m) - (t_k - b_k),  e_s = e^((z - m)/tau),
// b_k = teacher k's logit at the column of the student's max m (-kFar for -inf). x_k is 0 at
// that column and small where q is, so nothing large cancels in D_k or in the gradient
// q (x_k - R_k / S) / tau^2. Moving the frame by delta = m' - m, db = b' - b:
// R' = e^(-delta/tau) (R - S (delta - db)). A merge keeps the frame of the part with the larger
// max (a's on a tie) and moves only the other one's, so a one-hot student's R_k stays exactly 0.
template <class A, int KT>
struct KDStudent {
  A m, s, s1;
  A r[KT], b[KT];
  __device__ void init() {
    m = ninf<A>();
    s = s1 = A(0);
#pragma unroll
    for (int k = 0; k < KT; ++k) r[k] = b[k] = A(0);
  }
  // Move a nonempty state (s > 0) to the frame (m2 >= m, b2[]).
  __device__ void move_to(A m2, const A* b2, A inv_tau, bool rev, bool with_s1) {
    const A delta = m2 - m;
    const A sc = delta > A(0) ? fexp(-delta * inv_tau) : A(1);
    if (rev) {
#pragma unroll
      for (int k = 0; k < KT; ++k) {
        const A db = b2[k] - b[k];
        if (delta > A(0) || db != A(0)) r[k] = sc > A(0) ? sc * (r[k] - s * (delta - db)) : A(0);
        b[k] = b2[k];
      }
    }
    s *= sc;
    if (with_s1) s1 *= delta > A(0) ? fexp(-delta) : A(1);
    m = m2;
  }
  // Push column z with the teachers' logits t[] (t[k] for k >= K unused: pass anything finite).
  __device__ void push(A z, const A* t, A inv_tau, bool rev, bool with_s1) {
    if (z > m) {
      A bn[KT];
#pragma unroll
      // b_k is the teacher's logit itself, however low (a teacher row of finfo.min: clamping
      // -3.4e38 to -1e30 put 3e38 into x_k); only -inf takes -kFar
      for (int k = 0; k < KT; ++k) bn[k] = rev ? (t[k] == ninf<A>() ? A(-1e30) : t[k]) : A(0);
      if (s > A(0)) {
        move_to(z, bn, inv_tau, rev, with_s1);
      } else {
        m = z;
#pragma unroll
        for (int k = 0; k < KT; ++k) b[k] = bn[k];
      }
      s += A(1);  // the new top column: x_k = 0 adds nothing to R_k
      if (with_s1) s1 += A(1);
    } else {
      const A d = z - m;
      const A e = fexp(d * inv_tau);
      if (e > A(0)) {
        s += e;
        if (with_s1) s1 += fexp(d);
        if (rev) {
#pragma unroll
          for (int k = 0; k < KT; ++k) r[k] += e * (d - clamp_far(t[k] - b[k]));
        }
      }
    }
  }
  __device__ void merge(const KDStudent& o, A inv_tau, bool rev, bool with_s1) {
    const bool keep = !(o.m > m);
    KDStudent lo = keep ? o : *this;  // the part whose frame moves
    if (!keep) *this = o;
    if (lo.s > A(0)) lo.move_to(m, b, inv_tau, rev, with_s1);
    s += lo.s;
    s1 += lo.s1;
#pragma unroll
    for (int k = 0; k < KT; ++k) r[k] += lo.r[k];
  }
};

// MT-BKD statistics: the student (m, s, s1 as KDStudent) and per teacher its raw max mt, sum
// st = sum e^((t - mt)/tau) and cross term cr = sum e^((t - mt)/tau) (z - m), relative to both
// running maxima (C_k = lam (cr / st / tau - log s)): a new student max m' adds (m - m') st, a new
// teacher max rescales like st.
template <class A, int KT>
struct MTBKDStats {
  A m, s, s1;
  A mt[KT], st[KT], cr[KT];
  __device__ void init() {
    m = ninf<A>();
    s = s1 = A(0);
#pragma unroll
    for (int k = 0; k < KT; ++k) mt[k] = ninf<A>(), st[k] = cr[k] = A(0);
  }
  // The cross terms follow the student max from m_old to m (>= m_old). From an empty frame
  // (m_old = -inf: only -inf logits so far) nothing moves: their factors are already -kFar, as
  // in the CPU kernels (a -inf student logit under a tiny p_k gives one large finite C_k).
  __device__ void shift_cross(A m_old) {
    if (m > m_old && m_old > ninf<A>()) {
      const A delta = clamp_far(m_old - m);
#pragma unroll
      for (int k = 0; k < KT; ++k)
        if (st[k] > A(0)) cr[k] += delta * st[k];
    }
  }
  __device__ void merge(const MTBKDStats& o_in, A inv_tau, bool with_s1) {
    MTBKDStats o = o_in;
    const A mm = m > o.m ? m : o.m;
    const A m_old = m;
    m = mm;
    shift_cross(m_old);
    o.m = mm;
    o.shift_cross(o_in.m);
    const A f1 = s > A(0) ? fexp((m_old - mm) * inv_tau) : A(0);
    const A f2 = o.s > A(0) ? fexp((o_in.m - mm) * inv_tau) : A(0);
    s = s * f1 + o.s * f2;
    if (with_s1) {
      const A g1 = s1 > A(0) ? fexp(m_old - mm) : A(0);
      const A g2 = o.s1 > A(0) ? fexp(o_in.m - mm) : A(0);
      s1 = s1 * g1 + o.s1 * g2;
    }
#pragma unroll
    for (int k = 0; k < KT; ++k) {
      const A mk = mt[k] > o.mt[k] ? mt[k] : o.mt[k];
      const A h1 = st[k] > A(0) ? fexp((mt[k] - mk) * inv_tau) : A(0);
      const A h2 = o.st[k] > A(0) ? fexp((o.mt[k] - mk) * inv_tau) : A(0);
      st[k] = st[k] * h1 + o.st[k] * h2;
      cr[k] = cr[k] * h1 + o.cr[k] * h2;
      mt[k] = mk;
    }
  }
};

template <class A, int N>
struct SumN {
  A x[N];
  __device__ void init() {
#pragma unroll
    for (int i = 0; i < N; ++i) x[i] = A(0);
  }
  __device__ void merge(const SumN& o) {
#pragma unroll
    for (int i = 0; i < N; ++i) x[i] += o.x[i];
  }
};

// Block-wide merge of a state made only of A fields; every thread returns the merged state.
// `args` are passed on to S::merge (scales, flags).
constexpr int kSmemBytes = kWarps * 4 * 8 * 8 + 64;  // room for kWarps states of 32 doubles

template <class A, class S, class... Args>
__device__ __forceinline__ S warp_merge(S v, Args... args) {
  constexpr int kFields = static_cast<int>(sizeof(S) / sizeof(A));
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    S o;
    const A* src = reinterpret_cast<const A*>(&v);
    A* dst = reinterpret_cast<A*>(&o);
#pragma unroll
    for (int i = 0; i < kFields; ++i) dst[i] = __shfl_xor_sync(kFullMask, src[i], off);
    v.merge(o, args...);
  }
  return v;
}

template <class A, class S, class... Args>
__device__ __forceinline__ S block_merge(S v, unsigned char* smem_raw, Args... args) {
  static_assert(sizeof(S) * kWarps <= kSmemBytes, "shared scratch too small");
  S* smem = reinterpret_cast<S*>(smem_raw);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  v = warp_merge<A>(v, args...);
  __syncthreads();  // readers of the previous merge are done with the scratch
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  if (lane < kWarps) {
    v = smem[lane];
  } else {
    v.init();
  }
  return warp_merge<A>(v, args...);
}

template <class A>
__device__ __forceinline__ bool finite(A x) {
  return isfinite(x);
}

// A NaN or +inf logit (check_finite off) leaves its row no distribution: the row is NaN, as on
// the CPU and Triton backends. The online sums cannot show it: they skip a NaN term (its e > 0
// test fails) and clamp far terms, so each kernel looks for one itself; a row of -inf alone
// shows as an empty sum (s = 0) after the merge.
template <class A>
__device__ __forceinline__ bool no_distribution(A x) {
  return !(x < -ninf<A>());  // NaN or +inf
}

template <class A>
__device__ __forceinline__ A qnan() {
  return static_cast<A>(NAN);
}

// Row-level scalar helpers shared by both losses. Writes w[0..KT): 0 for k >= K (the teacher loops
// run to KT with the rest masked, and a stale w[k] there would be 0 * NaN in a weighted sum).
template <class A, int KT>
__device__ __forceinline__ void row_weights(int weight_mode, int K, const A* h, const void* fw,
                                            int64_t n, int64_t row, A* w) {
  if (weight_mode == 2) {
    const A* f = static_cast<const A*>(fw);
    A total = A(0);
#pragma unroll
    for (int k = 0; k < KT; ++k) {
      w[k] = (k < K) ? f[k * n + row] : A(0);
      total += w[k];
    }
#pragma unroll
    for (int k = 0; k < KT; ++k) w[k] /= total;
  } else if (weight_mode == 1 || K == 1) {
#pragma unroll
    for (int k = 0; k < KT; ++k) w[k] = (k < K) ? A(1) / A(K) : A(0);
  } else {
#pragma unroll
    for (int k = 0; k < KT; ++k) w[k] = A(0);
    mtbkd::entropy_weights(h, K, w);  // writes w[0..K)
  }
}

// ---- dispatch --------------------------------------------------------------------------------

// Teacher counts are compiled for KT in {1, 4, 8}; K <= KT runs with the rest masked.
template <template <class, int> class Launch, class In, class P>
void by_k(const P& p, cudaStream_t s) {
  if (p.k <= 1) {
    Launch<In, 1>::run(p, s);
  } else if (p.k <= 4) {
    Launch<In, 4>::run(p, s);
  } else {
    Launch<In, 8>::run(p, s);
  }
}

template <template <class, int> class Launch, class P>
cudaError_t by_dtype(const P& p, cudaStream_t s) {
  if (p.k < 1 || p.k > kMaxTeachers || p.n < 0 || p.n > 0x7fffffffLL || p.v < 1) {
    return cudaErrorInvalidValue;
  }
  if (p.n == 0) return cudaSuccess;
  switch (p.dtype) {
    case DType::kFloat32:
      by_k<Launch, float>(p, s);
      break;
    case DType::kFloat64:
      by_k<Launch, double>(p, s);
      break;
    case DType::kBFloat16:
      by_k<Launch, __nv_bfloat16>(p, s);
      break;
    case DType::kFloat16:
      by_k<Launch, __half>(p, s);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace
}  // namespace cuda
}  // namespace mtbkd
