// CUDA kernels of the fused multi-teacher losses (MATH.md sections 1-3); see loss_kernels.cuh.
//
// Layout: one 256-thread block per row; thread j reads classes j, j + 256, ... (coalesced), keeps
// its own online-softmax state, and the block merges the states (warp shuffles, then one value
// per warp through shared memory; every warp finishes the merge, so all threads hold the result
// without another barrier). The same math as the Triton kernels (kernels/losses.py), which the
// tests check against the float64 reference:
//
//   online logsumexp with a linear sum: state (m, s, a) = (max x, sum e^(x-m), sum e^(x-m) v);
//     merging rescales by e^(m_i - m); the MT-BKD cross term uses v = z/tau under p_k,
//     reverse KL v = (z - t_k)/tau under q (one student frame shared by all teachers).
//   online entropy: (m, s, b) with b = sum e^(x-m) (x-m); H = log s - b/s; rescaling to a new max
//     m': b' = e^(m-m') (b + (m - m') s).
//   MT-BKD: C_k = lam (E_pk[z/tau] - lse(z/tau)), L_k = sum_c lgamma(1 + lam p_kc),
//     l_k = log w_k + C_k - L_k, prior = -lgamma(V+lam) - logsumexp_k l_k, r = softmax_k l,
//     dL/dz = beta_h (softmax(z) - onehot(y)) + beta_p (lam/tau) (q - sum_k r_k p_k).
//   KD: forward KL grad (q - sum_k w_k p_k)/tau; reverse KL q (log q - sum_k w_k (log p_k + D_k))/tau;
//     JSD (1 - beta) q (log q - sum_k w_k (log m_k + KL(q||m_k)))/tau, m_k = beta p_k + (1-beta) q.
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
// produces, as Triton's tl.exp), full precision for float64.
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

// Online logsumexp with a linear sum: m = max x, s = sum e^(x - m), a = sum e^(x - m) v.
template <class A>
__device__ __forceinline__ void lse_push(A& m, A& s, A& a, A x, A v) {
  if (x > m) {
    const A f = (m == ninf<A>()) ? A(0) : fexp(m - x);
    s = s * f + A(1);
    a = a * f + v;
    m = x;
  } else {
    const A e = fexp(x - m);
    if (e > A(0)) {
      s += e;
      a += e * v;
    }
  }
}

template <class A>
__device__ __forceinline__ void lse_merge(A& m, A& s, A& a, A m2, A s2, A a2) {
  const A mm = m > m2 ? m : m2;
  if (mm == ninf<A>()) return;
  const A f1 = (m == ninf<A>()) ? A(0) : fexp(m - mm);
  const A f2 = (m2 == ninf<A>()) ? A(0) : fexp(m2 - mm);
  s = s * f1 + s2 * f2;
  a = a * f1 + a2 * f2;
  m = mm;
}

// Online entropy sums: m = max x, s = sum e^(x - m), b = sum e^(x - m) (x - m).
template <class A>
__device__ __forceinline__ void ent_push(A& m, A& s, A& b, A x) {
  if (x > m) {
    if (s > A(0)) {
      const A f = fexp(m - x);
      b = f * (b + (m - x) * s);
      s = s * f;
    }
    s += A(1);
    m = x;
  } else {
    const A e = fexp(x - m);
    if (e > A(0)) {
      s += e;
      b += e * (x - m);
    }
  }
}

template <class A>
__device__ __forceinline__ void ent_merge(A& m, A& s, A& b, A m2, A s2, A b2) {
  const A mm = m > m2 ? m : m2;
  if (mm == ninf<A>()) return;
  A nb = A(0), ns = A(0);
  if (s > A(0)) {
    const A f = fexp(m - mm);
    nb += f * (b + (m - mm) * s);
    ns += f * s;
  }
  if (s2 > A(0)) {
    const A f = fexp(m2 - mm);
    nb += f * (b2 + (m2 - mm) * s2);
    ns += f * s2;
  }
  m = mm;
  s = ns;
  b = nb;
}

// K online logsumexps with linear sums (teachers at tau; or the student with K linear sums).
template <class A, int KT>
struct LseK {
  A m[KT], s[KT], a[KT];
  __device__ void init() {
#pragma unroll
    for (int k = 0; k < KT; ++k) m[k] = ninf<A>(), s[k] = A(0), a[k] = A(0);
  }
  __device__ void merge(const LseK& o) {
#pragma unroll
    for (int k = 0; k < KT; ++k) lse_merge(m[k], s[k], a[k], o.m[k], o.s[k], o.a[k]);
  }
};

// The student at tau with one linear sum per teacher (reverse KL: sum e^(z/tau - m)(z - t_k)/tau).
template <class A, int KT>
struct StudentK {
  A m, s, a[KT];
  __device__ void init() {
    m = ninf<A>();
    s = A(0);
#pragma unroll
    for (int k = 0; k < KT; ++k) a[k] = A(0);
  }
  __device__ void merge(const StudentK& o) {
    const A mm = m > o.m ? m : o.m;
    if (mm == ninf<A>()) return;
    const A f1 = (m == ninf<A>()) ? A(0) : fexp(m - mm);
    const A f2 = (o.m == ninf<A>()) ? A(0) : fexp(o.m - mm);
    s = s * f1 + o.s * f2;
#pragma unroll
    for (int k = 0; k < KT; ++k) a[k] = a[k] * f1 + o.a[k] * f2;
    m = mm;
  }
};

template <class A, int KT>
struct EntK {
  A m[KT], s[KT], b[KT];
  __device__ void init() {
#pragma unroll
    for (int k = 0; k < KT; ++k) m[k] = ninf<A>(), s[k] = A(0), b[k] = A(0);
  }
  __device__ void merge(const EntK& o) {
#pragma unroll
    for (int k = 0; k < KT; ++k) ent_merge(m[k], s[k], b[k], o.m[k], o.s[k], o.b[k]);
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
constexpr int kSmemBytes = kWarps * 3 * 8 * 8 + 64;  // room for kWarps states of 24 doubles

template <class A, class S>
__device__ __forceinline__ S warp_merge(S v) {
  constexpr int kFields = static_cast<int>(sizeof(S) / sizeof(A));
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    S o;
    const A* src = reinterpret_cast<const A*>(&v);
    A* dst = reinterpret_cast<A*>(&o);
#pragma unroll
    for (int i = 0; i < kFields; ++i) dst[i] = __shfl_xor_sync(kFullMask, src[i], off);
    v.merge(o);
  }
  return v;
}

template <class A, class S>
__device__ __forceinline__ S block_merge(S v, unsigned char* smem_raw) {
  static_assert(sizeof(S) * kWarps <= kSmemBytes, "shared scratch too small");
  S* smem = reinterpret_cast<S*>(smem_raw);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  v = warp_merge<A>(v);
  __syncthreads();  // readers of the previous merge are done with the scratch
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  if (lane < kWarps) {
    v = smem[lane];
  } else {
    v.init();
  }
  return warp_merge<A>(v);
}

template <class A>
__device__ __forceinline__ bool finite(A x) {
  return isfinite(x);
}

// Row-level scalar helpers shared by both losses.
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
    mtbkd::entropy_weights(h, K, w);
  }
}

// ---- MT-BKD ------------------------------------------------------------------------------------

template <class In, int KT>
__global__ void __launch_bounds__(kThreads) mtbkd_kernel(const MTBKDParams p) {
  using A = typename IO<In>::Acc;
  __shared__ alignas(16) unsigned char smem[kSmemBytes];
  const int64_t row = blockIdx.x;
  const int64_t V = p.v, N = p.n;
  const int K = p.k;
  const int tid = threadIdx.x;
  const In* z = static_cast<const In*>(p.student) + row * V;
  const In* t[KT];
#pragma unroll
  for (int k = 0; k < KT; ++k) t[k] = static_cast<const In*>(p.teachers.ptr[k < K ? k : 0]) + row * V;
  In* grad = static_cast<In*>(p.grad) + row * V;
  A* loss = static_cast<A*>(p.loss);
  A* prior_out = static_cast<A*>(p.prior);
  A* ce_out = static_cast<A*>(p.ce);
  A* w_out = static_cast<A*>(p.weights);
  A* r_out = static_cast<A*>(p.resp);
  A* h_out = static_cast<A*>(p.entropy);
  const A inv_tau = A(p.inv_tau), inv_tw = A(p.inv_tau_w), lam = A(p.lam);

  int32_t status = 0;
  int64_t y = 0;
  bool valid = true;
  if (p.labels != nullptr) {
    y = p.labels[row];
    valid = y != p.ignore_index;
    if (valid && (y < 0 || y >= V)) {
      status |= kStatusLabel;
      y = 0;
    }
  }
  if (!valid) {  // the whole block takes this branch: no barrier is skipped by part of it
    for (int64_t c = tid; c < V; c += kThreads) IO<In>::store(grad + c, A(0));
    if (tid == 0) {
      loss[row] = prior_out[row] = ce_out[row] = A(0);
      for (int k = 0; k < K; ++k) w_out[k * N + row] = r_out[k * N + row] = h_out[k * N + row] = A(0);
      if (p.status != nullptr) p.status[row] = 0;
    }
    return;
  }
  const bool has_labels = p.labels != nullptr;
  const bool cached = p.teacher_stats != nullptr;

  // ---- statistics pass ----
  A lse_t[KT], h[KT], lg[KT];
  if (cached) {
    const A* st = static_cast<const A*>(p.teacher_stats);
#pragma unroll
    for (int k = 0; k < KT; ++k) {
      lse_t[k] = (k < K) ? st[(k * N + row) * 4 + 0] : A(0);
      h[k] = (k < K) ? st[(k * N + row) * 4 + 2] : A(0);
      lg[k] = (k < K) ? st[(k * N + row) * 4 + 3] : A(0);
    }
  }
  StudentK<A, 1> stu, one;  // student at tau, student at temperature 1 (cross-entropy)
  stu.init();
  one.init();
  LseK<A, KT> tch;  // teachers at tau, linear sum z/tau (cross term)
  tch.init();
  EntK<A, KT> ent;  // teachers at tau_w
  ent.init();
  SumN<A, KT> cross;  // cached: sum_c p_kc z_c / tau directly
  cross.init();
  bool bad_s = false, bad_t = false;
  for (int64_t c = tid; c < V; c += kThreads) {
    const A zc = IO<In>::load(z + c);
    if (p.check_finite) bad_s |= !finite(zc);
    const A zs = zc * inv_tau;
    lse_push(stu.m, stu.s, stu.a[0], zs, A(0));
    if (has_labels) lse_push(one.m, one.s, one.a[0], zc, A(0));
#pragma unroll
    for (int k = 0; k < KT; ++k) {
      if (k < K) {
        const A tc = IO<In>::load(t[k] + c);
        if (p.check_finite) bad_t |= !finite(tc);
        if (cached) {
          const A pk = fexp(tc * inv_tau - lse_t[k]);
          if (pk > A(0)) cross.x[k] += pk * zs;
        } else {
          lse_push(tch.m[k], tch.s[k], tch.a[k], tc * inv_tau, zs);
          ent_push(ent.m[k], ent.s[k], ent.b[k], tc * inv_tw);
        }
      }
    }
  }
  if (__syncthreads_or(bad_s)) status |= kStatusStudent;
  if (__syncthreads_or(bad_t)) status |= kStatusTeacher;
  stu = block_merge<A>(stu, smem);
  if (has_labels) one = block_merge<A>(one, smem);
  const A lse_s = stu.m + flog(stu.s);
  A cmean[KT];
  if (cached) {
    cross = block_merge<A>(cross, smem);
#pragma unroll
    for (int k = 0; k < KT; ++k) cmean[k] = cross.x[k];
  } else {
    tch = block_merge<A>(tch, smem);
    ent = block_merge<A>(ent, smem);
#pragma unroll
    for (int k = 0; k < KT; ++k) {
      const bool on = k < K;
      lse_t[k] = on ? tch.m[k] + flog(tch.s[k]) : A(0);
      cmean[k] = on ? tch.a[k] / tch.s[k] : A(0);
      h[k] = on ? flog(ent.s[k]) - ent.b[k] / ent.s[k] : A(0);
    }
    // ---- L_k pass (needs the full lse of each teacher) ----
    SumN<A, KT> lgs;
    lgs.init();
    for (int64_t c = tid; c < V; c += kThreads) {
#pragma unroll
      for (int k = 0; k < KT; ++k) {
        if (k < K) {
          const A pk = fexp(IO<In>::load(t[k] + c) * inv_tau - lse_t[k]);
          lgs.x[k] += lgamma1p(lam * pk);
        }
      }
    }
    lgs = block_merge<A>(lgs, smem);
#pragma unroll
    for (int k = 0; k < KT; ++k) lg[k] = lgs.x[k];
  }

  // ---- per-row scalars ----
  A w[KT], ell[KT], r[KT];
  row_weights<A, KT>(p.weight_mode, K, h, p.fixed_weights, N, row, w);
#pragma unroll
  for (int k = 0; k < KT; ++k) {
    ell[k] = (k < K && w[k] > A(0)) ? flog(w[k]) + lam * (cmean[k] - lse_s) - lg[k] : ninf<A>();
  }
  const A lse_ell = mtbkd::logsumexp_softmax(ell, K, r);
  const A prior = -A(p.lgamma_v_lam) - lse_ell;
  A lse1 = A(0), ce = A(0);
  if (has_labels) {
    lse1 = one.m + flog(one.s);
    ce = lse1 - IO<In>::load(z + y);
  }
  const A beta_h = A(p.hard_label_weight);
  const A coef = A(p.prior_weight) * lam * inv_tau;

  // ---- loss + gradient pass ----
  for (int64_t c = tid; c < V; c += kThreads) {
    const A zc = IO<In>::load(z + c);
    const A q = fexp(zc * inv_tau - lse_s);
    A mix = A(0);
#pragma unroll
    for (int k = 0; k < KT; ++k) {
      if (k < K) mix += r[k] * fexp(IO<In>::load(t[k] + c) * inv_tau - lse_t[k]);
    }
    A g = coef * (q - mix);
    if (has_labels) g += beta_h * (fexp(zc - lse1) - (c == y ? A(1) : A(0)));
    IO<In>::store(grad + c, g);
  }
  if (tid == 0) {
    loss[row] = A(p.prior_weight) * prior + (has_labels ? beta_h * ce : A(0));
    prior_out[row] = prior;
    ce_out[row] = ce;
    for (int k = 0; k < K; ++k) {
      w_out[k * N + row] = w[k];
      r_out[k * N + row] = r[k];
      h_out[k * N + row] = h[k];
    }
    if (p.status != nullptr) p.status[row] = status;
  }
}

// ---- weighted-sum KD ---------------------------------------------------------------------------

template <class A>
__device__ __forceinline__ A log_add_exp(A a, A b) {
  const A m = a > b ? a : b;
  if (m == ninf<A>()) return m;
  return m + flog_fast(fexp(a - m) + fexp(b - m));
}

template <class In, int KT>
__global__ void __launch_bounds__(kThreads) kd_kernel(const KDParams p) {
  using A = typename IO<In>::Acc;
  __shared__ alignas(16) unsigned char smem[kSmemBytes];
  const int64_t row = blockIdx.x;
  const int64_t V = p.v, N = p.n;
  const int K = p.k;
  const int tid = threadIdx.x;
  const In* z = static_cast<const In*>(p.student) + row * V;
  const In* t[KT];
#pragma unroll
  for (int k = 0; k < KT; ++k) t[k] = static_cast<const In*>(p.teachers.ptr[k < K ? k : 0]) + row * V;
  In* grad = static_cast<In*>(p.grad) + row * V;
  A* loss = static_cast<A*>(p.loss);
  A* w_out = static_cast<A*>(p.weights);
  const A inv_tau = A(p.inv_tau), inv_tw = A(p.inv_tau_w);
  const int div = p.divergence;

  int32_t status = 0;
  int64_t y = 0;
  bool valid = true;
  if (p.labels != nullptr) {
    y = p.labels[row];
    valid = y != p.ignore_index;
    if (valid && (y < 0 || y >= V)) {
      status |= kStatusLabel;
      y = 0;
    }
  }
  if (!valid) {
    for (int64_t c = tid; c < V; c += kThreads) IO<In>::store(grad + c, A(0));
    if (tid == 0) {
      loss[row] = A(0);
      for (int k = 0; k < K; ++k) w_out[k * N + row] = A(0);
      if (p.status != nullptr) p.status[row] = 0;
    }
    return;
  }
  const bool has_labels = p.labels != nullptr;
  const bool need_h = p.weight_mode == 0 && K > 1;

  // ---- statistics pass ----
  StudentK<A, KT> stu;  // student at tau; a[k] = sum e^(z/tau - m) (z - t_k)/tau (reverse KL)
  stu.init();
  StudentK<A, 1> one;
  one.init();
  LseK<A, KT> tch;
  tch.init();
  EntK<A, KT> ent;
  ent.init();
  bool bad_s = false, bad_t = false;
  for (int64_t c = tid; c < V; c += kThreads) {
    const A zc = IO<In>::load(z + c);
    if (p.check_finite) bad_s |= !finite(zc);
    const A zs = zc * inv_tau;
    if (has_labels) lse_push(one.m, one.s, one.a[0], zc, A(0));
    A ts[KT];
#pragma unroll
    for (int k = 0; k < KT; ++k) {
      ts[k] = A(0);
      if (k < K) {
        const A tc = IO<In>::load(t[k] + c);
        if (p.check_finite) bad_t |= !finite(tc);
        ts[k] = tc * inv_tau;
        lse_push(tch.m[k], tch.s[k], tch.a[k], ts[k], A(0));
        if (need_h) ent_push(ent.m[k], ent.s[k], ent.b[k], tc * inv_tw);
      }
    }
    // Student push with K linear sums (only reverse KL uses them; the others add zeros).
    if (zs > stu.m) {
      const A f = (stu.m == ninf<A>()) ? A(0) : fexp(stu.m - zs);
      stu.s = stu.s * f + A(1);
#pragma unroll
      for (int k = 0; k < KT; ++k) stu.a[k] = stu.a[k] * f + ((div == 1 && k < K) ? zs - ts[k] : A(0));
      stu.m = zs;
    } else {
      const A e = fexp(zs - stu.m);
      if (e > A(0)) {
        stu.s += e;
        if (div == 1) {
#pragma unroll
          for (int k = 0; k < KT; ++k) stu.a[k] += (k < K) ? e * (zs - ts[k]) : A(0);
        }
      }
    }
  }
  if (__syncthreads_or(bad_s)) status |= kStatusStudent;
  if (__syncthreads_or(bad_t)) status |= kStatusTeacher;
  stu = block_merge<A>(stu, smem);
  if (has_labels) one = block_merge<A>(one, smem);
  tch = block_merge<A>(tch, smem);
  if (need_h) ent = block_merge<A>(ent, smem);
  const A lse_s = stu.m + flog(stu.s);
  A lse_t[KT], h[KT], w[KT], dk[KT];
#pragma unroll
  for (int k = 0; k < KT; ++k) {
    const bool on = k < K;
    lse_t[k] = on ? tch.m[k] + flog(tch.s[k]) : A(0);
    h[k] = (on && need_h) ? flog(ent.s[k]) - ent.b[k] / ent.s[k] : A(0);
    // reverse KL: D_k = E_q[(z - t_k)/tau] - lse(z/tau) + lse(t_k/tau)
    dk[k] = (on && div == 1) ? stu.a[k] / stu.s - lse_s + lse_t[k] : A(0);
  }
  row_weights<A, KT>(p.weight_mode, K, h, p.fixed_weights, N, row, w);
  A lse1 = A(0), ce = A(0);
  if (has_labels) {
    lse1 = one.m + flog(one.s);
    ce = lse1 - IO<In>::load(z + y);
  }
  const A beta = A(p.beta), log_beta = A(p.log_beta), log_1mbeta = A(p.log_1mbeta);

  // ---- JSD: divergence pass (KL(q || m_k) is needed by every gradient element) ----
  SumN<A, KT + 1> sums;  // x[k] = KL(q || m_k) (JSD); x[KT] = sum_k w_k D_k (forward KL, JSD)
  sums.init();
  if (div == 2) {
    for (int64_t c = tid; c < V; c += kThreads) {
      const A logq = IO<In>::load(z + c) * inv_tau - lse_s;
      const A q = fexp(logq);
#pragma unroll
      for (int k = 0; k < KT; ++k) {
        if (k < K) {
          const A logp = IO<In>::load(t[k] + c) * inv_tau - lse_t[k];
          const A pk = fexp(logp);
          const A logm = log_add_exp(log_beta + logp, log_1mbeta + logq);
          const A klq = q > A(0) ? q * (logq - logm) : A(0);
          const A klp = pk > A(0) ? pk * (logp - logm) : A(0);
          sums.x[k] += klq;
          sums.x[KT] += w[k] * (beta * klp + (A(1) - beta) * klq);
        }
      }
    }
    sums = block_merge<A>(sums, smem);
  }

  // ---- gradient pass (forward KL also sums its divergence here) ----
  const A soft_w = A(p.soft_weight), beta_h = A(p.hard_label_weight);
  A wd = A(0);  // sum_k w_k D_k of reverse KL
#pragma unroll
  for (int k = 0; k < KT; ++k) wd += w[k] * dk[k];
  A fwd = A(0);
  for (int64_t c = tid; c < V; c += kThreads) {
    const A zc = IO<In>::load(z + c);
    const A logq = zc * inv_tau - lse_s;
    const A q = fexp(logq);
    A gs = A(0);
    if (div == 0) {
      A mix = A(0);
#pragma unroll
      for (int k = 0; k < KT; ++k) {
        if (k < K) {
          const A logp = IO<In>::load(t[k] + c) * inv_tau - lse_t[k];
          const A pk = fexp(logp);
          mix += w[k] * pk;
          if (pk > A(0)) fwd += w[k] * pk * (logp - logq);
        }
      }
      gs = (q - mix) * inv_tau;
    } else if (div == 1) {
      if (q > A(0)) {
        A inner = logq - wd;
#pragma unroll
        for (int k = 0; k < KT; ++k) {
          if (k < K) inner -= w[k] * (IO<In>::load(t[k] + c) * inv_tau - lse_t[k]);
        }
        gs = q * inner * inv_tau;
      }
    } else {
      if (q > A(0)) {
        A inner = logq;
#pragma unroll
        for (int k = 0; k < KT; ++k) {
          if (k < K) {
            const A logp = IO<In>::load(t[k] + c) * inv_tau - lse_t[k];
            const A logm = log_add_exp(log_beta + logp, log_1mbeta + logq);
            inner -= w[k] * (logm + sums.x[k]);
          }
        }
        gs = (A(1) - beta) * q * inner * inv_tau;
      }
    }
    A g = soft_w * gs;
    if (has_labels) g += beta_h * (fexp(zc - lse1) - (c == y ? A(1) : A(0)));
    IO<In>::store(grad + c, g);
  }
  A divsum = wd;
  if (div == 0) {
    SumN<A, 1> f;
    f.x[0] = fwd;
    f = block_merge<A>(f, smem);
    divsum = f.x[0];
  } else if (div == 2) {
    divsum = sums.x[KT];
  }
  if (tid == 0) {
    loss[row] = soft_w * divsum + (has_labels ? beta_h * ce : A(0));
    for (int k = 0; k < K; ++k) w_out[k * N + row] = w[k];
    if (p.status != nullptr) p.status[row] = status;
  }
}

// ---- teacher-only statistics ---------------------------------------------------------------

template <class In, int KT>
__global__ void __launch_bounds__(kThreads) teacher_kernel(const TeacherParams p) {
  using A = typename IO<In>::Acc;
  __shared__ alignas(16) unsigned char smem[kSmemBytes];
  const int64_t row = blockIdx.x;
  const int64_t V = p.v, N = p.n;
  const int K = p.k;
  const int tid = threadIdx.x;
  const In* t[KT];
#pragma unroll
  for (int k = 0; k < KT; ++k) t[k] = static_cast<const In*>(p.teachers.ptr[k < K ? k : 0]) + row * V;
  const A inv_tau = A(p.inv_tau), inv_tw = A(p.inv_tau_w), lam = A(p.lam);
  LseK<A, KT> tch;
  tch.init();
  EntK<A, KT> ent;
  ent.init();
  bool bad = false;
  for (int64_t c = tid; c < V; c += kThreads) {
#pragma unroll
    for (int k = 0; k < KT; ++k) {
      if (k < K) {
        const A tc = IO<In>::load(t[k] + c);
        if (p.check_finite) bad |= !finite(tc);
        if (p.stats) lse_push(tch.m[k], tch.s[k], tch.a[k], tc * inv_tau, A(0));
        ent_push(ent.m[k], ent.s[k], ent.b[k], tc * inv_tw);
      }
    }
  }
  const int32_t status = __syncthreads_or(bad) ? kStatusTeacher : 0;
  ent = block_merge<A>(ent, smem);
  A h[KT];
#pragma unroll
  for (int k = 0; k < KT; ++k) h[k] = (k < K) ? flog(ent.s[k]) - ent.b[k] / ent.s[k] : A(0);
  if (p.stats) {
    tch = block_merge<A>(tch, smem);
    A lse_t[KT];
#pragma unroll
    for (int k = 0; k < KT; ++k) lse_t[k] = (k < K) ? tch.m[k] + flog(tch.s[k]) : A(0);
    SumN<A, KT> lgs;
    lgs.init();
    for (int64_t c = tid; c < V; c += kThreads) {
#pragma unroll
      for (int k = 0; k < KT; ++k) {
        if (k < K) lgs.x[k] += lgamma1p(lam * fexp(IO<In>::load(t[k] + c) * inv_tau - lse_t[k]));
      }
    }
    lgs = block_merge<A>(lgs, smem);
    if (tid == 0) {
      A* out = static_cast<A*>(p.out);
      for (int k = 0; k < K; ++k) {
        A* o = out + (k * N + row) * 4;
        o[0] = lse_t[k];
        o[1] = ent.m[k] + flog(ent.s[k]);
        o[2] = h[k];
        o[3] = lgs.x[k];
      }
    }
  } else if (tid == 0) {
    A w[KT];
    row_weights<A, KT>(p.weight_mode, K, h, nullptr, N, row, w);
    for (int k = 0; k < K; ++k) {
      static_cast<A*>(p.weights)[k * N + row] = w[k];
      static_cast<A*>(p.entropy)[k * N + row] = h[k];
    }
  }
  if (tid == 0 && p.status != nullptr) p.status[row] = status;
}

// ---- elementwise ---------------------------------------------------------------------------------

template <class In, class R>
__global__ void scale_grad_kernel(const In* __restrict__ g, const R* __restrict__ rows,
                                  In* __restrict__ out, int64_t n, int64_t v) {
  const int64_t total = n * v;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const R x = static_cast<R>(IO<In>::load(g + i)) * rows[i / v];
    IO<In>::store(out + i, static_cast<typename IO<In>::Acc>(x));
  }
}

template <class A>
__global__ void lgamma1p_kernel(const A* __restrict__ x, A* __restrict__ out, int64_t numel) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < numel;
       i += int64_t(gridDim.x) * blockDim.x) {
    out[i] = lgamma1p(x[i]);
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

template <class In, int KT>
struct MTBKDLaunch {
  static void run(const MTBKDParams& p, cudaStream_t s) {
    mtbkd_kernel<In, KT><<<static_cast<unsigned>(p.n), kThreads, 0, s>>>(p);
  }
};

template <class In, int KT>
struct KDLaunch {
  static void run(const KDParams& p, cudaStream_t s) {
    kd_kernel<In, KT><<<static_cast<unsigned>(p.n), kThreads, 0, s>>>(p);
  }
};

template <class In, int KT>
struct TeacherLaunch {
  static void run(const TeacherParams& p, cudaStream_t s) {
    teacher_kernel<In, KT><<<static_cast<unsigned>(p.n), kThreads, 0, s>>>(p);
  }
};

int elementwise_blocks(int64_t total) {
  const int64_t blocks = (total + 255) / 256;
  return static_cast<int>(blocks < 65536 ? (blocks > 0 ? blocks : 1) : 65536);
}

template <class In>
void scale_grad_typed(const ScaleGradParams& p, cudaStream_t s) {
  const int blocks = elementwise_blocks(p.n * p.v);
  if (p.rows_double) {
    scale_grad_kernel<In, double><<<blocks, 256, 0, s>>>(
        static_cast<const In*>(p.grad), static_cast<const double*>(p.rows),
        static_cast<In*>(p.out), p.n, p.v);
  } else {
    scale_grad_kernel<In, float><<<blocks, 256, 0, s>>>(
        static_cast<const In*>(p.grad), static_cast<const float*>(p.rows),
        static_cast<In*>(p.out), p.n, p.v);
  }
}

}  // namespace

cudaError_t launch_mtbkd_loss_fwd(const MTBKDParams& p, cudaStream_t stream) {
  return by_dtype<MTBKDLaunch>(p, stream);
}

cudaError_t launch_multi_teacher_kd_fwd(const KDParams& p, cudaStream_t stream) {
  if (p.divergence < 0 || p.divergence > 2) return cudaErrorInvalidValue;
  return by_dtype<KDLaunch>(p, stream);
}

cudaError_t launch_teacher_stats(const TeacherParams& p, cudaStream_t stream) {
  return by_dtype<TeacherLaunch>(p, stream);
}

cudaError_t launch_scale_grad(const ScaleGradParams& p, cudaStream_t stream) {
  if (p.n < 0 || p.v < 0) return cudaErrorInvalidValue;
  if (p.n == 0 || p.v == 0) return cudaSuccess;
  switch (p.dtype) {
    case DType::kFloat32:
      scale_grad_typed<float>(p, stream);
      break;
    case DType::kFloat64:
      scale_grad_typed<double>(p, stream);
      break;
    case DType::kBFloat16:
      scale_grad_typed<__nv_bfloat16>(p, stream);
      break;
    case DType::kFloat16:
      scale_grad_typed<__half>(p, stream);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t launch_lgamma1p(const Lgamma1pParams& p, cudaStream_t stream) {
  if (p.numel <= 0) return p.numel == 0 ? cudaSuccess : cudaErrorInvalidValue;
  const int blocks = elementwise_blocks(p.numel);
  if (p.is_double) {
    lgamma1p_kernel<double><<<blocks, 256, 0, stream>>>(static_cast<const double*>(p.x),
                                                        static_cast<double*>(p.out), p.numel);
  } else {
    lgamma1p_kernel<float><<<blocks, 256, 0, stream>>>(static_cast<const float*>(p.x),
                                                       static_cast<float*>(p.out), p.numel);
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace mtbkd
