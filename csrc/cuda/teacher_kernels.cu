// CUDA kernels of the teacher-only statistics (weights, TeacherStats cache), the backward's
// gradient scaling and the elementwise lgamma(1 + x) used by accuracy tests.
#include "loss_device.cuh"

namespace mtbkd {
namespace cuda {
namespace {

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
  LseK<A, KT> tch;  // at tau: raw max and sum (lse = m / tau + log s only as an output)
  tch.init();
  EntK<A, KT> ent;  // at tau_w
  ent.init();
  bool bad = false;
  unsigned nodist = 0;  // bit k: teacher k has a NaN or +inf logit (check_finite off)
  for (int64_t c = tid; c < V; c += kThreads) {
#pragma unroll
    for (int k = 0; k < KT; ++k) {
      if (k < K) {
        const A tc = IO<In>::load(t[k] + c);
        if (p.check_finite) bad |= !finite(tc);
        if (no_distribution(tc)) nodist |= 1u << k;
        if (p.stats) lse_push(tch.m[k], tch.s[k], tc, inv_tau);
        ent_push(ent.m[k], ent.r[k], ent.b[k], tc, inv_tw);
      }
    }
  }
  const int32_t status = __syncthreads_or(bad) ? kStatusTeacher : 0;
  // such a teacher's statistics are NaN, as on the CPU (the online sums skip a NaN term); its
  // NaN entropy gives the row uniform weights there and here (row_weights)
  bool dead[KT];
#pragma unroll
  for (int k = 0; k < KT; ++k) dead[k] = __syncthreads_or((nodist >> k) & 1u) != 0;
  ent = block_merge<A>(ent, smem, inv_tw);
  A h[KT];
#pragma unroll
  for (int k = 0; k < KT; ++k)
    h[k] = (k < K) ? (dead[k] ? qnan<A>() : entropy_of(ent.r[k], ent.b[k], inv_tw)) : A(0);
  if (p.stats) {
    tch = block_merge<A>(tch, smem, inv_tau);
    A lst[KT];  // log p_k = (t - m_k) / tau - lst_k
#pragma unroll
    for (int k = 0; k < KT; ++k) lst[k] = (k < K) ? flog(tch.s[k]) : A(0);
    SumN<A, KT> lgs;
    lgs.init();
    for (int64_t c = tid; c < V; c += kThreads) {
#pragma unroll
      for (int k = 0; k < KT; ++k) {
        if (k < K) {
          const A pk = fexp((IO<In>::load(t[k] + c) - tch.m[k]) * inv_tau - lst[k]);
          lgs.x[k] += lgamma1p(lam * pk);
        }
      }
    }
    lgs = block_merge<A>(lgs, smem);
    if (tid == 0) {
      A* out = static_cast<A*>(p.out);
#pragma unroll
      for (int k = 0; k < KT; ++k) {
        if (k >= K) continue;
        A* o = out + (k * N + row) * 4;
        o[0] = dead[k] ? qnan<A>() : tch.m[k] * inv_tau + lst[k];
        o[1] = dead[k] ? qnan<A>() : ent.m[k] * inv_tw + flog1p(ent.r[k]);
        o[2] = h[k];
        o[3] = dead[k] ? qnan<A>() : lgs.x[k];
      }
    }
  } else if (tid == 0) {
    A w[KT];
    row_weights<A, KT>(p.weight_mode, K, h, nullptr, N, row, w);
#pragma unroll
    for (int k = 0; k < KT; ++k) {
      if (k >= K) continue;
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
