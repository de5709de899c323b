// CUDA kernels of the fused multi-teacher losses (MATH.md sections 1-3); see loss_kernels.cuh.
//
// Layout: one 256-thread block per row; thread j reads classes j, j + 256, ... (coalesced), keeps
// its own online-softmax state, and the block merges the states (warp shuffles, then one value
// per warp through shared memory; every warp finishes the merge, so all threads hold the result
// without another barrier). The same math as the Triton kernels (kernels/losses.py), which the
// tests check against the float64 reference:
//
//   every normaliser is a raw row max m and a sum s = sum e^((x - m)/tau), kept apart: log q =
//     (z - m)/tau - log s (never z/tau - lse with one rounded float32 lse; see loss_device.cuh);
//     merging rescales by e^((m_i - m)/tau); linear sums are measured from the running maxima.
//   online entropy: (m, r, b) with r = sum e^((x-m)/tau_w) - 1 kept apart (see ent_push) and
//   b = sum e^((x-m)/tau_w) (x-m); H = log1p(r) - b/((1 + r) tau_w);
//     rescaling to a new max m': r' = e^((m-m')/tau_w) (1 + r),
//     b' = e^((m-m')/tau_w) (b + (m - m') (1 + r)).
//   MT-BKD: C_k = lam (E_pk[z - m]/tau - log s), L_k = sum_c lgamma(1 + lam p_kc),
//     l_k = log w_k + C_k - L_k, prior = -lgamma(V+lam) - logsumexp_k l_k, r = softmax_k l,
//     dL/dz = beta_h (softmax(z) - onehot(y)) + beta_p (lam/tau) (q sum_k r_k - sum_k r_k p_k).
//   KD: forward KL grad (q sum_k w_k - sum_k w_k p_k)/tau; reverse KL
//     q sum_k w_k (x_k - E_q[x_k])/tau^2, x_k = (z - max z) - (t_k - b_k), b_k = t_k at argmax z;
//     JSD (1 - beta) q (log q - sum_k w_k (log m_k + KL(q||m_k)))/tau, m_k = beta p_k + (1-beta) q.
//   Teachers of weight 0 are skipped in every weighted sum (as the CPU kernels do).
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
  // The cached statistics give H_k and L_k; the teacher's normaliser is recomputed online (its
  // cached lse, one float32 m / tau + log s, would carry ~1e-3 at logits of 1e4 into p_k).
  MTBKDStats<A, KT> sts;  // student at tau (and 1), teachers at tau with their cross terms
  sts.init();
  EntK<A, KT> ent;  // teachers at tau_w
  ent.init();
  bool bad_s = false, bad_t = false, degenerate = false;
  for (int64_t c = tid; c < V; c += kThreads) {
    const A zc = IO<In>::load(z + c);
    if (p.check_finite) bad_s |= !finite(zc);
    degenerate |= no_distribution(zc);
    const A m_old = student_push(sts.m, sts.s, sts.s1, zc, inv_tau, has_labels);
    sts.shift_cross(m_old);
    const A d = clamp_far(zc - sts.m);  // z - m of this column in the (new) student frame
#pragma unroll
    for (int k = 0; k < KT; ++k) {
      if (k < K) {
        const A tc = IO<In>::load(t[k] + c);
        if (p.check_finite) bad_t |= !finite(tc);
        degenerate |= no_distribution(tc);
        if (tc > sts.mt[k]) {
          const A f = fexp((sts.mt[k] - tc) * inv_tau);
          sts.st[k] = sts.st[k] * f + A(1);
          sts.cr[k] = sts.cr[k] * f + d;
          sts.mt[k] = tc;
        } else {
          const A e = fexp((tc - sts.mt[k]) * inv_tau);
          if (e > A(0)) {
            sts.st[k] += e;
            sts.cr[k] += e * d;
          }
        }
        if (!cached) ent_push(ent.m[k], ent.r[k], ent.b[k], tc, inv_tw);
      }
    }
  }
  if (__syncthreads_or(bad_s)) status |= kStatusStudent;
  if (__syncthreads_or(bad_t)) status |= kStatusTeacher;
  degenerate = __syncthreads_or(degenerate) != 0;
  sts = block_merge<A>(sts, smem, inv_tau, has_labels);
  // no distribution (a NaN or +inf logit, or a row of -inf alone; check_finite off): NaN, as the
  // CPU kernel gives (with one teacher the prior had made the loss +inf, the gradient finite).
  // Every thread holds the merged sums: the whole block takes the branch.
#pragma unroll
  for (int k = 0; k < KT; ++k) degenerate |= k < K && !(sts.st[k] > A(0));
  if (degenerate || !(sts.s > A(0))) {
    for (int64_t c = tid; c < V; c += kThreads) IO<In>::store(grad + c, qnan<A>());
    if (tid == 0) {
      loss[row] = prior_out[row] = ce_out[row] = qnan<A>();
      for (int k = 0; k < K; ++k)
        w_out[k * N + row] = r_out[k * N + row] = h_out[k * N + row] = qnan<A>();
      if (p.status != nullptr) p.status[row] = status;
    }
    return;
  }
  const A mz = sts.m;
  const A lss = flog(sts.s);  // log q = (z - mz) / tau - lss
  A mt[KT], lst[KT], cterm[KT];  // log p_k = (t_k - mt_k) / tau - lst_k
#pragma unroll
  for (int k = 0; k < KT; ++k) {
    const bool on = k < K;
    mt[k] = on ? sts.mt[k] : A(0);
    lst[k] = on ? flog(sts.st[k]) : A(0);
    // C_k = lam (E_pk[z - mz] / tau - log S): two non-positive terms, no cancellation
    cterm[k] = on ? lam * (sts.cr[k] / sts.st[k] * inv_tau - lss) : A(0);
  }
  A h[KT], lg[KT];
  if (cached) {
    const A* st = static_cast<const A*>(p.teacher_stats);
#pragma unroll
    for (int k = 0; k < KT; ++k) {
      h[k] = (k < K) ? st[(k * N + row) * 4 + 2] : A(0);
      lg[k] = (k < K) ? st[(k * N + row) * 4 + 3] : A(0);
    }
  } else {
    ent = block_merge<A>(ent, smem, inv_tw);
#pragma unroll
    for (int k = 0; k < KT; ++k) h[k] = k < K ? entropy_of(ent.r[k], ent.b[k], inv_tw) : A(0);
    // ---- L_k pass (needs the full normaliser of each teacher) ----
    SumN<A, KT> lgs;
    lgs.init();
    for (int64_t c = tid; c < V; c += kThreads) {
#pragma unroll
      for (int k = 0; k < KT; ++k) {
        if (k < K) {
          const A pk = fexp((IO<In>::load(t[k] + c) - mt[k]) * inv_tau - lst[k]);
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
    ell[k] = (k < K && w[k] > A(0)) ? flog(w[k]) + cterm[k] - lg[k] : ninf<A>();
    r[k] = A(0);
  }
  const A lse_ell = mtbkd::logsumexp_softmax(ell, K, r);  // writes r[0..K)
  const A prior = -A(p.lgamma_v_lam) - lse_ell;
  A ls1 = A(0), ce = A(0);
  if (has_labels) {
    ls1 = flog(sts.s1);
    ce = (mz - IO<In>::load(z + y)) + ls1;
  }
  const A beta_h = A(p.hard_label_weight);
  const A coef = A(p.prior_weight) * lam * inv_tau;
  // The gradient's coefficients carry grad_scale (the loss does not): rounded once to In.
  const A gscale = p.grad_scale != nullptr ? *static_cast<const A*>(p.grad_scale) : A(1);
  const A coef_g = coef * gscale, beta_hg = beta_h * gscale;
  // q sum_k r_k - sum_k r_k p_k: zero for q = p_k however sum_k r_k rounds
  A rsum = A(0);
#pragma unroll
  for (int k = 0; k < KT; ++k) rsum += r[k];

  // ---- loss + gradient pass ----
  for (int64_t c = tid; c < V; c += kThreads) {
    const A zc = IO<In>::load(z + c);
    const A q = fexp((zc - mz) * inv_tau - lss);
    A mix = A(0);
#pragma unroll
    for (int k = 0; k < KT; ++k) {
      if (k < K && r[k] > A(0))
        mix += r[k] * fexp((IO<In>::load(t[k] + c) - mt[k]) * inv_tau - lst[k]);
    }
    A g = coef_g * (q * rsum - mix);
    if (has_labels) g += beta_hg * (fexp((zc - mz) - ls1) - (c == y ? A(1) : A(0)));
    IO<In>::store(grad + c, g);
  }
  if (tid == 0) {
    loss[row] = A(p.prior_weight) * prior + (has_labels && beta_h != A(0) ? beta_h * ce : A(0));
    prior_out[row] = prior;
    ce_out[row] = ce;
#pragma unroll
    for (int k = 0; k < KT; ++k) {
      if (k >= K) continue;
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
