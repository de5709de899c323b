// extern "C" entry points of the emulated CUDA kernels of the Bayesian student
// (csrc/cuda/bayes_kernels.cu) for tests/test_cuda_emulated_bayes.py (ctypes). Each fills the
// params struct from plain arguments exactly as the torch wrappers in csrc/bayes_ops.cpp
// (MTBKD_WITH_CUDA part) do, launches only where they launch, and returns the launcher's
// cudaError_t. Shapes, dtypes and the output allocation are the caller's (the Python side mirrors
// the wrappers: contiguous tensors, the KL sum one double zeroed beforehand, the incoming KL
// gradient one double).
#include <stdint.h>

#include "cuda/bayes_kernels.cuh"

using namespace mtbkd::cuda;

extern "C" {

// reparameterize_fwd_cuda (backward = 0: a = mu) and reparameterize_bwd_cuda (backward = 1:
// a = grad); seed and offset are the ops' int64 arguments, cast as the wrappers cast them.
int emu_reparameterize(int dtype, int backward, int64_t n, const void* a, const void* rho,
                       void* out, int64_t seed, int64_t offset) {
  ReparamParams p{a,
                  rho,
                  out,
                  n,
                  static_cast<uint64_t>(seed),
                  static_cast<uint64_t>(offset),
                  DType(dtype),
                  backward != 0};
  return launch_reparameterize(p, nullptr);
}

// gaussian_kl_cuda: kl_sum is the wrapper's zeroed double.
int emu_gaussian_kl(int dtype, int64_t n, const void* mu, const void* rho, double prior_mu,
                    double prior_sigma, double* kl_sum) {
  KLParams p{mu, rho, nullptr, nullptr, nullptr, kl_sum, n, prior_mu, prior_sigma, DType(dtype)};
  return launch_gaussian_kl(p, nullptr);
}

// gaussian_kl_bwd_cuda: dmu / drho null where not asked for; no launch when neither is.
int emu_gaussian_kl_bwd(int dtype, int64_t n, const double* grad, const void* mu,
                        const void* rho, void* dmu, void* drho, double prior_mu,
                        double prior_sigma) {
  KLParams p{mu, rho, dmu, drho, grad, nullptr, n, prior_mu, prior_sigma, DType(dtype)};
  if (dmu == nullptr && drho == nullptr) return 0;
  return launch_gaussian_kl(p, nullptr);
}

// reparameterize_kl_fwd_cuda: kl_sum is the wrapper's zeroed double.
int emu_reparameterize_kl_fwd(int dtype, int64_t n, const void* mu, const void* rho, void* w,
                              double* kl_sum, int64_t seed, int64_t offset, double prior_mu,
                              double prior_sigma) {
  ReparamKLParams p{mu,
                    rho,
                    nullptr,
                    nullptr,
                    w,
                    nullptr,
                    kl_sum,
                    n,
                    static_cast<uint64_t>(seed),
                    static_cast<uint64_t>(offset),
                    prior_mu,
                    prior_sigma,
                    DType(dtype)};
  return launch_reparameterize_kl(p, nullptr);
}

// reparameterize_kl_bwd_cuda: dmu / drho null where not asked for; no launch when neither is.
int emu_reparameterize_kl_bwd(int dtype, int64_t n, const void* grad, const double* grad_kl,
                              const void* mu, const void* rho, void* dmu, void* drho, int64_t seed,
                              int64_t offset, double prior_mu, double prior_sigma) {
  ReparamKLParams p{mu,
                    rho,
                    grad,
                    grad_kl,
                    dmu,
                    drho,
                    nullptr,
                    n,
                    static_cast<uint64_t>(seed),
                    static_cast<uint64_t>(offset),
                    prior_mu,
                    prior_sigma,
                    DType(dtype)};
  if (dmu == nullptr && drho == nullptr) return 0;
  return launch_reparameterize_kl(p, nullptr);
}

// sgld_step_cuda: tensor j is (params[j], grads[j], square_avgs[j] or null, numel[j]) in Philox
// stream j; all of one dtype.
int emu_sgld_step(int dtype, int count, void* const* params, const void* const* grads,
                  void* const* square_avgs, const int64_t* numel, double lr, double num_data,
                  double temperature, double weight_decay, int64_t seed, int precondition,
                  double alpha, double eps) {
  if (count == 0) return 0;
  SgldTensor tensors[256];
  if (count > 256) return 1;
  for (int j = 0; j < count; ++j) {
    tensors[j] = SgldTensor{params[j], grads[j], precondition ? square_avgs[j] : nullptr,
                            numel[j], static_cast<uint32_t>(j)};
  }
  const SgldHyper h{lr,
                    num_data,
                    temperature,
                    weight_decay,
                    static_cast<uint64_t>(seed),
                    precondition != 0,
                    alpha,
                    eps};
  return launch_sgld(tensors, count, h, DType(dtype), nullptr);
}

}  // extern "C"
