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
  const bool rev = div == 1;

  // ---- statistics pass ----
  KDStudent<A, KT> stu;  // student at tau (and 1); reverse KL: R_k, b_k (see KDStudent)
  stu.init();
  LseK<A, KT> tch;  // teachers at tau
  tch.init();
  EntK<A, KT> ent;  // teachers at tau_w
  ent.init();
  bool bad_s = false, bad_t = false, degenerate = false;
  for (int64_t c = tid; c < V; c += kThreads) {
    const A zc = IO<In>::load(z + c);
    if (p.check_finite) bad_s |= !finite(zc);
    degenerate |= no_distribution(zc);
    A tc[KT];
#pragma unroll
    for (int k = 0; k < KT; ++k) {
      tc[k] = A(0);
      if (k < K) {
        tc[k] = IO<In>::load(t[k] + c);
        if (p.check_finite) bad_t |= !finite(tc[k]);
        degenerate |= no_distribution(tc[k]);
        lse_push(tch.m[k], tch.s[k], tc[k], inv_tau);
        if (need_h) ent_push(ent.m[k], ent.r[k], ent.b[k], tc[k], inv_tw);
      }
    }
    stu.push(zc, tc, inv_tau, rev, has_labels);
  }
  if (__syncthreads_or(bad_s)) status |= kStatusStudent;
  if (__syncthreads_or(bad_t)) status |= kStatusTeacher;
  degenerate = __syncthreads_or(degenerate) != 0;
  stu = block_merge<A>(stu, smem, inv_tau, rev, has_labels);
  tch = block_merge<A>(tch, smem, inv_tau);
  // no distribution (a NaN or +inf logit, or a row of -inf alone; check_finite off): NaN, as the
  // CPU kernel gives (log 0 had made the loss -inf, which reads as the best loss there is)
#pragma unroll
  for (int k = 0; k < KT; ++k) degenerate |= k < K && !(tch.s[k] > A(0));
  if (degenerate || !(stu.s > A(0))) {  // uniform: every thread holds the merged sums
    for (int64_t c = tid; c < V; c += kThreads) IO<In>::store(grad + c, qnan<A>());
    if (tid == 0) {
      loss[row] = qnan<A>();
      for (int k = 0; k < K; ++k) w_out[k * N + row] = qnan<A>();
      if (p.status != nullptr) p.status[row] = status;
    }
    return;
  }
  if (need_h) ent = block_merge<A>(ent, smem, inv_tw);
  const A mz = stu.m;
  const A lss = flog(stu.s);  // log q = (z - mz) / tau - lss
  A mt[KT], lst[KT], h[KT], w[KT], mean[KT];  // log p_k = (t_k - mt_k) / tau - lst_k
#pragma unroll
  for (int k = 0; k < KT; ++k) {
    const bool on = k < K;
    mt[k] = on ? tch.m[k] : A(0);
    lst[k] = on ? flog(tch.s[k]) : A(0);
    h[k] = (on && need_h) ? entropy_of(ent.r[k], ent.b[k], inv_tw) : A(0);
    mean[k] = (on && rev) ? stu.r[k] / stu.s : A(0);  // E_q[x_k]
  }
  row_weights<A, KT>(p.weight_mode, K, h, p.fixed_weights, N, row, w);  // w[k >= K] = 0
  A wsum = A(0);
#pragma unroll
  for (int k = 0; k < KT; ++k) wsum += w[k];
  A ls1 = A(0), ce = A(0);
  if (has_labels) {
    ls1 = flog(stu.s1);
    ce = (mz - IO<In>::load(z + y)) + ls1;
  }
  const A beta = A(p.beta), omb = A(p.one_m_beta);  // 1 - beta formed on the host in double
  const A log_beta = A(p.log_beta), log_1mbeta = A(p.log_1mbeta);

  // ---- JSD: divergence pass (KL(q || m_k) is needed by every gradient element) ----
  SumN<A, KT + 1> sums;  // x[k] = KL(q || m_k) (JSD); x[KT] = sum_k w_k D_k (JSD)
  sums.init();
  if (div == 2) {
    for (int64_t c = tid; c < V; c += kThreads) {
      const A logq = (IO<In>::load(z + c) - mz) * inv_tau - lss;
      const A q = fexp(logq);
#pragma unroll
      for (int k = 0; k < KT; ++k) {
        if (k < K && w[k] > A(0)) {
          const A logp = (IO<In>::load(t[k] + c) - mt[k]) * inv_tau - lst[k];
          const A pk = fexp(logp);
          const A logm = log_add_exp(log_beta + logp, log_1mbeta + logq);
          // == 0, not > 0: a NaN (a NaN or +inf logit, check_finite off) stays NaN
          const A klq = q == A(0) ? A(0) : q * (logq - logm);
          const A klp = pk == A(0) ? A(0) : pk * (logp - logm);
          sums.x[k] += klq;
          sums.x[KT] += w[k] * (beta * klp + omb * klq);
        }
      }
    }
    sums = block_merge<A>(sums, smem);
  }

  // ---- gradient pass (forward KL also sums its divergence here) ----
  const A soft_w = A(p.soft_weight), beta_h = A(p.hard_label_weight);
  // The gradient's coefficients carry grad_scale (the loss does not): rounded once to In.
  const A gscale = p.grad_scale != nullptr ? *static_cast<const A*>(p.grad_scale) : A(1);
  const A soft_wg = soft_w * gscale, beta_hg = beta_h * gscale;
  // reverse KL: D_k = (E_q[x_k] - (b_k - mt_k)) / tau - log S + log S_k, with b_k the teacher's
  // logit at the student's max: every term is small where q is (no offset rounds)
  A wd = A(0);
#pragma unroll
  for (int k = 0; k < KT; ++k) {
    if (rev && k < K && w[k] > A(0))
      wd += w[k] * ((mean[k] - (stu.b[k] - mt[k])) * inv_tau - lss + lst[k]);
  }
  const A inv_tau2 = inv_tau * inv_tau;
  A fwd = A(0);
  for (int64_t c = tid; c < V; c += kThreads) {
    const A zc = IO<In>::load(z + c);
    const A dz = zc - mz;
    const A logq = dz * inv_tau - lss;
    const A q = fexp(logq);
    A gs = A(0);
    if (div == 0) {
      // -inf student logits: log q clamped like the CPU's (a large finite divergence, not inf)
      const A logq_far = clamp_far(dz) * inv_tau - lss;
      A mix = A(0);
#pragma unroll
      for (int k = 0; k < KT; ++k) {
        if (k < K && w[k] > A(0)) {
          const A logp = (IO<In>::load(t[k] + c) - mt[k]) * inv_tau - lst[k];
          const A pk = fexp(logp);
          mix += w[k] * pk;
          if (!(pk == A(0))) fwd += w[k] * pk * (logp - logq_far);  // a NaN pk stays NaN
        }
      }
      gs = (q * wsum - mix) * inv_tau;
    } else if (div == 1) {
      // q sum_k w_k (x_k - E_q[x_k]) / tau^2: x_k is 0 at the student's top column, so a
      // confident student's gradient is no difference of large numbers (exactly 0 if one-hot)
      if (q > A(0)) {
        A inner = A(0);
#pragma unroll
        for (int k = 0; k < KT; ++k) {
          if (k < K && w[k] > A(0)) {
            const A x = dz - clamp_far(IO<In>::load(t[k] + c) - stu.b[k]);
            inner += w[k] * (x - mean[k]);
          }
        }
        gs = q * inner * inv_tau2;
      }
    } else {
      if (q > A(0)) {
        A inner = logq;
#pragma unroll
        for (int k = 0; k < KT; ++k) {
          if (k < K && w[k] > A(0)) {
            const A logp = (IO<In>::load(t[k] + c) - mt[k]) * inv_tau - lst[k];
            const A logm = log_add_exp(log_beta + logp, log_1mbeta + logq);
            inner -= w[k] * (logm + sums.x[k]);
          }
        }
        gs = omb * q * inner * inv_tau;
      }
    }
    A g = soft_wg * gs;
    if (has_labels) g += beta_hg * (fexp(dz - ls1) - (c == y ? A(1) : A(0)));
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
    loss[row] = soft_w * divsum + (has_labels && beta_h != A(0) ? beta_h * ce : A(0));
#pragma unroll
    for (int k = 0; k < KT; ++k)
      if (k < K) w_out[k * N + row] = w[k];
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
