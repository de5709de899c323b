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
