// CUDA kernel of the weighted-sum multi-teacher KD family (MATH.md section 3); one block per
// row, forward KL / reverse KL in two passes, JSD in three. See loss_kernels.cu for the layout.
#include "loss_device.cuh"

namespace mtbkd {
namespace cuda {
namespace {

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

template <class In, int KT>
struct KDLaunch {
  static void run(const KDParams& p, cudaStream_t s) {
    kd_kernel<In, KT><<<static_cast<unsigned>(p.n), kThreads, 0, s>>>(p);
  }
};

}  // namespace

cudaError_t launch_multi_teacher_kd_fwd(const KDParams& p, cudaStream_t stream) {
  if (p.divergence < 0 || p.divergence > 2) return cudaErrorInvalidValue;
  return by_dtype<KDLaunch>(p, stream);
}

}  // namespace cuda
}  // namespace mtbkd
