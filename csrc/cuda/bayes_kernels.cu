// CUDA kernels of the Bayesian student: fused reparameterised sampling (MATH.md section 6), the
// Gaussian-prior KL and its gradient (recomputed in the backward), and a multi-tensor (p)SGLD
// step (section 7).
//
// One thread owns one Philox counter, i.e. the 4 consecutive elements 4c .. 4c+3 whose normals
// that counter produces (csrc/philox.h), so eps is made in registers and never stored; the
// backward regenerates it. Arithmetic in float (double for double tensors), rounded once.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda/bayes_kernels.cuh"
#include "philox.h"

namespace mtbkd {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T from_acc(typename Acc<T>::type x);
template <>
__device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <>
__device__ __forceinline__ double from_acc<double>(double x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <>
__device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }

__device__ __forceinline__ float softplus(float r) { return r > 20.0f ? r : log1pf(expf(r)); }
__device__ __forceinline__ double softplus(double r) { return r > 20.0 ? r : log1p(exp(r)); }
__device__ __forceinline__ float sigmoid(float r) { return 1.0f / (1.0f + expf(-r)); }
__device__ __forceinline__ double sigmoid(double r) { return 1.0 / (1.0 + exp(-r)); }

template <typename T>
__global__ void reparam_kernel(const T* __restrict__ a, const T* __restrict__ rho,
                               T* __restrict__ out, int64_t n, uint64_t seed, uint64_t offset,
                               bool backward) {
  using C = typename Acc<T>::type;
  const int64_t counters = (n + 3) / 4;
  for (int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; c < counters;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float eps[4];
    philox::normal4(seed, offset + static_cast<uint64_t>(c), 0, eps);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t i = 4 * c + j;
      if (i < n) {
        const C r = to_acc(rho[i]);
        const C x = to_acc(a[i]);
        const C e = static_cast<C>(eps[j]);
        out[i] = from_acc<T>(backward ? x * e * sigmoid(r) : x + softplus(r) * e);
      }
    }
  }
}

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}

// Adds the block's sum of every thread's acc to *out (one atomic per block).
__device__ __forceinline__ void block_sum_to(double acc, double* out) {
  __shared__ double partial[kThreads / 32];
  acc = warp_sum(acc);
  if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = acc;
  __syncthreads();
  if (threadIdx.x < 32) {
    acc = threadIdx.x < (blockDim.x >> 5) ? partial[threadIdx.x] : 0.0;
    acc = warp_sum(acc);
    if (threadIdx.x == 0) atomicAdd(out, acc);
  }
}

// The KL term and dKL/drho of one element. Below rho = -20, s = e^rho (1 - e^rho / 2 + ...)
// heads for the denormals (0 below -104 in float): log s = rho - s / 2 and
// sigmoid(rho) / s = 1 - s / 2 there (not log 0, 0 / 0).
template <typename C>
__device__ __forceinline__ C kl_term(C x, C r, C s, C m0, C iv, C c0) {
  const C d = x - m0, half = static_cast<C>(0.5);
  const C log_s = r < static_cast<C>(-20) ? r - half * s : log(s);
  return c0 - log_s + half * (s * s + d * d) * iv;
}

template <typename C>
__device__ __forceinline__ C kl_grad_rho(C r, C s, C sig, C iv) {
  const C one = static_cast<C>(1), half = static_cast<C>(0.5);
  return r < static_cast<C>(-20) ? s * sig * iv - (one - half * s) : (s * iv - one / s) * sig;
}

template <typename T>
__global__ void kl_kernel(const T* __restrict__ mu, const T* __restrict__ rho,
                          double* __restrict__ kl_sum, int64_t n, double prior_mu,
                          double inv_var0, double log_s0) {
  using C = typename Acc<T>::type;
  const C m0 = static_cast<C>(prior_mu), iv = static_cast<C>(inv_var0);
  const C c0 = static_cast<C>(log_s0) - static_cast<C>(0.5);
  double acc = 0.0;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const C r = to_acc(rho[i]);
    acc += static_cast<double>(kl_term(to_acc(mu[i]), r, softplus(r), m0, iv, c0));
  }
  block_sum_to(acc, kl_sum);
}

template <typename T>
__global__ void kl_grad_kernel(const T* __restrict__ mu, const T* __restrict__ rho,
                               T* __restrict__ dmu, T* __restrict__ drho,
                               const double* __restrict__ grad, int64_t n, double prior_mu,
                               double inv_var0) {
  using C = typename Acc<T>::type;
  const C m0 = static_cast<C>(prior_mu), iv = static_cast<C>(inv_var0);
  const C g = static_cast<C>(*grad);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (dmu != nullptr) dmu[i] = from_acc<T>(g * ((to_acc(mu[i]) - m0) * iv));
    if (drho != nullptr) {
      const C r = to_acc(rho[i]);
      drho[i] = from_acc<T>(g * kl_grad_rho(r, softplus(r), sigmoid(r), iv));
    }
  }
}

// Sampling and KL in one pass: a thread owns one Philox counter (4 elements) as in
// reparam_kernel; the forward adds the KL terms of its elements to a block sum.
template <typename T>
__global__ void reparam_kl_fwd_kernel(const T* __restrict__ mu, const T* __restrict__ rho,
                                      T* __restrict__ w, double* __restrict__ kl_sum, int64_t n,
                                      uint64_t seed, uint64_t offset, double prior_mu,
                                      double inv_var0, double log_s0) {
  using C = typename Acc<T>::type;
  const C m0 = static_cast<C>(prior_mu), iv = static_cast<C>(inv_var0);
  const C c0 = static_cast<C>(log_s0) - static_cast<C>(0.5);
  const int64_t counters = (n + 3) / 4;
  double acc = 0.0;
  for (int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; c < counters;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float eps[4];
    philox::normal4(seed, offset + static_cast<uint64_t>(c), 0, eps);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t i = 4 * c + j;
      if (i < n) {
        const C r = to_acc(rho[i]);
        const C x = to_acc(mu[i]);
        const C s = softplus(r);
        w[i] = from_acc<T>(x + s * static_cast<C>(eps[j]));
        acc += static_cast<double>(kl_term(x, r, s, m0, iv, c0));
      }
    }
  }
  block_sum_to(acc, kl_sum);
}

template <typename T>
__global__ void reparam_kl_bwd_kernel(const T* __restrict__ grad, const double* __restrict__ gkp,
                                      const T* __restrict__ mu, const T* __restrict__ rho,
                                      T* __restrict__ dmu, T* __restrict__ drho, int64_t n,
                                      uint64_t seed, uint64_t offset, double prior_mu,
                                      double inv_var0) {
  using C = typename Acc<T>::type;
  const C m0 = static_cast<C>(prior_mu), iv = static_cast<C>(inv_var0);
  const C gk = static_cast<C>(*gkp);
  const int64_t counters = (n + 3) / 4;
  for (int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; c < counters;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float eps[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (drho != nullptr) philox::normal4(seed, offset + static_cast<uint64_t>(c), 0, eps);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t i = 4 * c + j;
      if (i < n) {
        const C g = to_acc(grad[i]);
        if (dmu != nullptr) dmu[i] = from_acc<T>(g + gk * ((to_acc(mu[i]) - m0) * iv));
        if (drho != nullptr) {
          const C r = to_acc(rho[i]);
          const C sig = sigmoid(r);
          const C dr = kl_grad_rho(r, softplus(r), sig, iv);
          drho[i] = from_acc<T>(g * static_cast<C>(eps[j]) * sig + gk * dr);
        }
      }
    }
  }
}

// The tensors of one launch and the first block of each (prefix sums of their block counts).
struct SgldBatch {
  SgldTensor t[kSgldTensorsPerLaunch];
  int64_t first_block[kSgldTensorsPerLaunch + 1];
  int count;
};

constexpr int64_t kCountersPerBlock = kThreads;  // one counter (4 elements) per thread

template <typename T>
__global__ void sgld_kernel(const SgldBatch batch, SgldHyper h) {
  using C = typename Acc<T>::type;
  const int64_t b = blockIdx.x;
  int k = 0;
  while (k + 1 < batch.count && batch.first_block[k + 1] <= b) ++k;
  const SgldTensor& ten = batch.t[k];
  const int64_t c = (b - batch.first_block[k]) * kCountersPerBlock + threadIdx.x;
  if (4 * c >= ten.n) return;
  float xi[4];
  philox::normal4(h.seed, static_cast<uint64_t>(c), ten.stream, xi);
  T* __restrict__ param = static_cast<T*>(ten.param);
  const T* __restrict__ grad = static_cast<const T*>(ten.grad);
  C* __restrict__ sq = static_cast<C*>(ten.square_avg);
  const C lr = static_cast<C>(h.lr), nd = static_cast<C>(h.num_data);
  const C wd = static_cast<C>(h.weight_decay), alpha = static_cast<C>(h.alpha);
  const C damp = static_cast<C>(h.eps);
  const C noise = static_cast<C>(sqrt(2.0 * h.lr * h.temperature));
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int64_t i = 4 * c + j;
    if (i >= ten.n) break;
    const C th = to_acc(param[i]);
    const C gu = nd * to_acc(grad[i]) + wd * th;  // grad of U (MATH.md section 7)
    C next;
    if (h.precondition) {
      const C gm = gu / nd;
      const C v = alpha * sq[i] + (static_cast<C>(1) - alpha) * gm * gm;
      sq[i] = v;
      const C g_pre = static_cast<C>(1) / (damp + sqrt(v));
      next = th - lr * g_pre * gu + noise * sqrt(g_pre) * static_cast<C>(xi[j]);
    } else {
      next = th - lr * gu + noise * static_cast<C>(xi[j]);
    }
    param[i] = from_acc<T>(next);
  }
}

int grid_for(int64_t work) {
  const int64_t blocks = (work + kThreads - 1) / kThreads;
  // Grid-stride loops: enough blocks to fill any current GPU, never more than needed.
  return static_cast<int>(blocks < 65536 ? (blocks > 0 ? blocks : 1) : 65536);
}

template <typename T>
cudaError_t reparam_typed(const ReparamParams& p, cudaStream_t stream) {
  reparam_kernel<T><<<grid_for((p.n + 3) / 4), kThreads, 0, stream>>>(
      static_cast<const T*>(p.a), static_cast<const T*>(p.rho), static_cast<T*>(p.out), p.n,
      p.seed, p.offset, p.backward);
  return cudaGetLastError();
}

template <typename T>
cudaError_t kl_typed(const KLParams& p, cudaStream_t stream) {
  const double inv_var0 = 1.0 / (p.prior_sigma * p.prior_sigma);
  if (p.kl_sum != nullptr) {
    kl_kernel<T><<<grid_for(p.n), kThreads, 0, stream>>>(
        static_cast<const T*>(p.mu), static_cast<const T*>(p.rho), p.kl_sum, p.n, p.prior_mu,
        inv_var0, log(p.prior_sigma));
  } else {
    kl_grad_kernel<T><<<grid_for(p.n), kThreads, 0, stream>>>(
        static_cast<const T*>(p.mu), static_cast<const T*>(p.rho), static_cast<T*>(p.dmu),
        static_cast<T*>(p.drho), p.grad, p.n, p.prior_mu, inv_var0);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t reparam_kl_typed(const ReparamKLParams& p, cudaStream_t stream) {
  const double inv_var0 = 1.0 / (p.prior_sigma * p.prior_sigma);
  const int grid = grid_for((p.n + 3) / 4);
  if (p.kl_sum != nullptr) {
    reparam_kl_fwd_kernel<T><<<grid, kThreads, 0, stream>>>(
        static_cast<const T*>(p.mu), static_cast<const T*>(p.rho), static_cast<T*>(p.w_or_dmu),
        p.kl_sum, p.n, p.seed, p.offset, p.prior_mu, inv_var0, log(p.prior_sigma));
  } else {
    reparam_kl_bwd_kernel<T><<<grid, kThreads, 0, stream>>>(
        static_cast<const T*>(p.grad), p.grad_kl, static_cast<const T*>(p.mu),
        static_cast<const T*>(p.rho), static_cast<T*>(p.w_or_dmu), static_cast<T*>(p.drho), p.n,
        p.seed, p.offset, p.prior_mu, inv_var0);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t sgld_typed(const SgldTensor* tensors, int count, const SgldHyper& h,
                       cudaStream_t stream) {
  for (int start = 0; start < count; start += kSgldTensorsPerLaunch) {
    SgldBatch batch{};
    batch.count = 0;
    batch.first_block[0] = 0;
    for (int j = start; j < count && batch.count < kSgldTensorsPerLaunch; ++j) {
      const int k = batch.count++;
      batch.t[k] = tensors[j];
      const int64_t counters = (tensors[j].n + 3) / 4;
      const int64_t blocks = (counters + kCountersPerBlock - 1) / kCountersPerBlock;
      batch.first_block[k + 1] = batch.first_block[k] + blocks;
    }
    const int64_t blocks = batch.first_block[batch.count];
    if (blocks == 0) continue;
    if (blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
    sgld_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(batch, h);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

// fn(T{}) for the element type T of dtype (the launchers' one switch).
template <typename Fn>
cudaError_t by_dtype(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat32:
      return fn(float{});
    case DType::kFloat64:
      return fn(double{});
    case DType::kBFloat16:
      return fn(__nv_bfloat16{});
    case DType::kFloat16:
      return fn(__half{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch_reparameterize(const ReparamParams& p, cudaStream_t stream) {
  if (p.n == 0) return cudaSuccess;
  return by_dtype(p.dtype, [&](auto t) { return reparam_typed<decltype(t)>(p, stream); });
}

cudaError_t launch_gaussian_kl(const KLParams& p, cudaStream_t stream) {
  if (p.n == 0) return cudaSuccess;
  return by_dtype(p.dtype, [&](auto t) { return kl_typed<decltype(t)>(p, stream); });
}

cudaError_t launch_reparameterize_kl(const ReparamKLParams& p, cudaStream_t stream) {
  if (p.n == 0) return cudaSuccess;
  return by_dtype(p.dtype, [&](auto t) { return reparam_kl_typed<decltype(t)>(p, stream); });
}

cudaError_t launch_sgld(const SgldTensor* tensors, int count, const SgldHyper& h, DType dtype,
                        cudaStream_t stream) {
  return by_dtype(dtype,
                  [&](auto t) { return sgld_typed<decltype(t)>(tensors, count, h, stream); });
}

}  // namespace cuda
}  // namespace mtbkd
