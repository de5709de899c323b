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
#include "loss_device.cuh"

namespace mtbkd {
namespace cuda {
namespace {

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

template <class In, int KT>
struct MTBKDLaunch {
  static void run(const MTBKDParams& p, cudaStream_t s) {
    mtbkd_kernel<In, KT><<<static_cast<unsigned>(p.n), kThreads, 0, s>>>(p);
  }
};

}  // namespace

cudaError_t launch_mtbkd_loss_fwd(const MTBKDParams& p, cudaStream_t stream) {
  return by_dtype<MTBKDLaunch>(p, stream);
}

}  // namespace cuda
}  // namespace mtbkd
