// CPU kernels of the Bayesian student (MATH.md sections 6 and 7) on raw pointers. The torch-facing
// checks, dtype dispatch and registration live in csrc/bayes_ops.cpp.
#pragma once

#include <stdint.h>

namespace mtbkd {
namespace cpu {

// Writes the 4 * groups normals of Philox counters [counter, counter + groups) of `stream` to
// out (normal j of counter counter + g goes to out[4 g + j]); see csrc/philox.h.
void philox_normals(uint64_t seed, uint64_t counter, uint32_t stream, int64_t groups, float* out);

// w = mu + softplus(rho) * eps, eps the normals of (seed, offset); T in {float, double,
// c10::BFloat16, c10::Half}, computed in float (double for double), rounded once. With
// check_finite, returns a bit mask of the inputs holding NaN or inf (1: mu, 2: rho), else 0.
template <typename T>
int reparameterize_fwd(const T* mu, const T* rho, T* w, int64_t n, uint64_t seed,
                       uint64_t offset, bool check_finite);

// drho = grad * eps * sigmoid(rho), eps regenerated from (seed, offset).
template <typename T>
void reparameterize_bwd(const T* grad, const T* rho, T* drho, int64_t n, uint64_t seed,
                        uint64_t offset);

// sum_i log(s0 / s_i) + (s_i^2 + (mu_i - m0)^2) / (2 s0^2) - 1/2 with s_i = softplus(rho_i),
// in float per tile of 1024 terms (double for double), tiles summed in double.
template <typename T>
double gaussian_kl(const T* mu, const T* rho, int64_t n, double prior_mu, double prior_sigma);

// grad times the gradient of that sum, recomputed from mu and rho: dmu (when non-null) =
// grad (mu - m0) / s0^2, drho (when non-null) = grad (s / s0^2 - 1 / s) sigmoid(rho); in float
// (double for double), rounded once.
template <typename T>
void gaussian_kl_bwd(double grad, const T* mu, const T* rho, T* dmu, T* drho, int64_t n,
                     double prior_mu, double prior_sigma);

// reparameterize_fwd and gaussian_kl in one pass: writes w, stores the KL sum in *kl, returns
// reparameterize_fwd's flags.
template <typename T>
int reparameterize_kl_fwd(const T* mu, const T* rho, T* w, int64_t n, uint64_t seed,
                          uint64_t offset, double prior_mu, double prior_sigma, bool check_finite,
                          double* kl);

// The backward of both outputs of that pass in one pass: dmu = grad + grad_kl (mu - m0) / s0^2,
// drho = grad eps sigmoid(rho) + grad_kl dKL/drho; dmu or drho may be null (not written).
template <typename T>
void reparameterize_kl_bwd(const T* grad, double grad_kl, const T* mu, const T* rho, T* dmu,
                           T* drho, int64_t n, uint64_t seed, uint64_t offset, double prior_mu,
                           double prior_sigma);

struct SgldParams {
  double lr;           // eta
  double num_data;     // N: grad_U = N * grad + weight_decay * theta
  double temperature;  // T
  double weight_decay;
  uint64_t seed;
  bool precondition;  // pSGLD (RMSprop preconditioner)
  double alpha;       // RMSprop decay
  double eps;         // RMSprop damping
};

// One (p)SGLD step in place on param (MATH.md section 7); noise from Philox stream `stream`
// (the parameter's index in the step) under p.seed. square_avg (same element type as the
// accumulation: float, or double for double params) is read and updated when p.precondition.
template <typename T, typename Acc>
void sgld_step(T* param, const T* grad, Acc* square_avg, int64_t n, const SgldParams& p,
               uint32_t stream);

}  // namespace cpu
}  // namespace mtbkd
