// CUDA kernels of the Bayesian student (MATH.md sections 6 and 7): framework-free, a params struct
// and a launcher per operation taking raw pointers and a cudaStream_t. The torch-facing wrapper is
// in csrc/bayes_ops.cpp (compiled with MTBKD_WITH_CUDA).
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

namespace mtbkd {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };

// Forward (backward = false): out = a + softplus(rho) * eps, a = mu.
// Backward (backward = true): out = a * eps * sigmoid(rho), a = the incoming gradient.
// eps: normal i % 4 of Philox counter offset + i / 4 (csrc/philox.h); all arrays contiguous, of
// one dtype, n elements.
struct ReparamParams {
  const void* a;
  const void* rho;
  void* out;
  int64_t n;
  uint64_t seed;
  uint64_t offset;
  DType dtype;
  bool backward;
};
cudaError_t launch_reparameterize(const ReparamParams& p, cudaStream_t stream);

// Forward (kl_sum non-null): kl_sum (one double, zeroed by the caller) += the sum of the
// Gaussian-prior KL terms. Backward (kl_sum null): with g = *grad (one double on the device),
// dmu = g (mu - m0) / s0^2 and drho = g (s / s0^2 - 1 / s) sigmoid(rho), each written when
// non-null, recomputed from mu and rho.
struct KLParams {
  const void* mu;
  const void* rho;
  void* dmu;
  void* drho;
  const double* grad;
  double* kl_sum;
  int64_t n;
  double prior_mu;
  double prior_sigma;
  DType dtype;
};
cudaError_t launch_gaussian_kl(const KLParams& p, cudaStream_t stream);

// Sampling and the Gaussian-prior KL in one pass (mtbkd::reparameterize_kl).
// Forward (kl_sum non-null): w = mu + softplus(rho) * eps, and kl_sum (one double, zeroed by the
// caller) += the sum of the KL terms. Backward (kl_sum null): with gk = *grad_kl,
// dmu = grad + gk (mu - m0) / s0^2 and drho = grad * eps * sigmoid(rho) + gk dKL/drho, each
// written when non-null. eps as in ReparamParams.
struct ReparamKLParams {
  const void* mu;
  const void* rho;
  const void* grad;
  const double* grad_kl;
  void* w_or_dmu;
  void* drho;
  double* kl_sum;
  int64_t n;
  uint64_t seed;
  uint64_t offset;
  double prior_mu;
  double prior_sigma;
  DType dtype;
};
cudaError_t launch_reparameterize_kl(const ReparamKLParams& p, cudaStream_t stream);

// One tensor of an SGLD step; square_avg (float, double for double params) only with
// precondition. `stream` is the tensor's Philox stream (its index in the step).
struct SgldTensor {
  void* param;
  const void* grad;
  void* square_avg;
  int64_t n;
  uint32_t stream;
};
struct SgldHyper {
  double lr;
  double num_data;
  double temperature;
  double weight_decay;
  uint64_t seed;
  bool precondition;
  double alpha;
  double eps;
};
// Updates all `count` tensors (one dtype) with as few launches as the parameter space allows
// (up to kSgldTensorsPerLaunch tensors per launch).
constexpr int kSgldTensorsPerLaunch = 24;
cudaError_t launch_sgld(const SgldTensor* tensors, int count, const SgldHyper& h, DType dtype,
                        cudaStream_t stream);

}  // namespace cuda
}  // namespace mtbkd
