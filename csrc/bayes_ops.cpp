// torch.ops.mtbkd_C.* of the Bayesian student: argument checks, dtype dispatch and registration of
// the CPU kernels (csrc/cpu/bayes_kernels.cpp) and, in CUDA builds, the CUDA kernels
// (csrc/cuda/bayes_kernels.cu). Semantics: MATH.md sections 6 and 7; the Python custom ops of
// mtbkd/bayes_ops.py call these with already validated, contiguous tensors.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

#include "cpu/bayes_kernels.h"
#include "torch_check.h"

#ifdef MTBKD_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "cuda/bayes_kernels.cuh"
#endif

namespace {

using at::Tensor;

void check_pair(const Tensor& a, const Tensor& b, const char* name_a, const char* name_b) {
  MTBKD_CHECK(a.sizes() == b.sizes(), name_a, " and ", name_b, " must have the same shape, got ",
              a.sizes(), " and ", b.sizes());
  MTBKD_CHECK(a.scalar_type() == b.scalar_type(), name_a, " and ", name_b,
              " must have the same dtype, got ", a.scalar_type(), " and ", b.scalar_type());
  MTBKD_CHECK(a.device() == b.device(), name_a, " and ", name_b,
              " must be on the same device");
  MTBKD_CHECK(a.is_contiguous() && b.is_contiguous(), name_a, " and ", name_b,
              " must be contiguous");
  MTBKD_CHECK(at::isFloatingType(a.scalar_type()), name_a, " must be a floating tensor, got ",
              a.scalar_type());
}

Tensor philox_normal(int64_t seed, int64_t offset, int64_t stream, int64_t n) {
  MTBKD_CHECK(n >= 0, "n must be non-negative");
  // Whole counters only: round n up to a multiple of 4 and trim.
  Tensor out = at::empty({(n + 3) / 4 * 4}, at::TensorOptions().dtype(at::kFloat));
  mtbkd::cpu::philox_normals(static_cast<uint64_t>(seed), static_cast<uint64_t>(offset),
                             static_cast<uint32_t>(stream), (n + 3) / 4, out.data_ptr<float>());
  return out.narrow(0, 0, n);
}

void raise_non_finite(int flags) {
  MTBKD_CHECK_VALUE(!(flags & 1), "mu contains non-finite values (NaN or inf)");
  MTBKD_CHECK_VALUE(!(flags & 2), "rho contains non-finite values (NaN or inf)");
}

Tensor reparameterize_fwd_cpu(const Tensor& mu, const Tensor& rho, int64_t seed, int64_t offset,
                              bool check_finite) {
  check_pair(mu, rho, "mu", "rho");
  Tensor w = at::empty_like(mu);
  int flags = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, mu.scalar_type(), "reparam_fwd", [&] {
    flags = mtbkd::cpu::reparameterize_fwd<scalar_t>(
        mu.const_data_ptr<scalar_t>(), rho.const_data_ptr<scalar_t>(),
        w.mutable_data_ptr<scalar_t>(), mu.numel(), static_cast<uint64_t>(seed),
        static_cast<uint64_t>(offset), check_finite);
  });
  raise_non_finite(flags);
  return w;
}

Tensor reparameterize_bwd_cpu(const Tensor& grad, const Tensor& rho, int64_t seed,
                              int64_t offset) {
  check_pair(grad, rho, "grad", "rho");
  Tensor drho = at::empty_like(rho);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, rho.scalar_type(), "reparam_bwd", [&] {
    mtbkd::cpu::reparameterize_bwd<scalar_t>(grad.const_data_ptr<scalar_t>(),
                                             rho.const_data_ptr<scalar_t>(),
                                             drho.mutable_data_ptr<scalar_t>(), rho.numel(),
                                             static_cast<uint64_t>(seed),
                                             static_cast<uint64_t>(offset));
  });
  return drho;
}

Tensor gaussian_kl_cpu(const Tensor& mu, const Tensor& rho, double prior_mu, double prior_sigma) {
  check_pair(mu, rho, "mu", "rho");
  MTBKD_CHECK(prior_sigma > 0, "prior_sigma must be positive, got ", prior_sigma);
  const auto acc = mu.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  double kl = 0.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, mu.scalar_type(), "gaussian_kl", [&] {
    kl = mtbkd::cpu::gaussian_kl<scalar_t>(mu.const_data_ptr<scalar_t>(),
                                           rho.const_data_ptr<scalar_t>(), mu.numel(), prior_mu,
                                           prior_sigma);
  });
  return at::scalar_tensor(kl, mu.options().dtype(acc));
}

// The incoming gradient of the KL: one floating-point number on mu's device.
void check_kl_grad(const Tensor& grad, const Tensor& mu, const char* name = "grad") {
  MTBKD_CHECK(grad.numel() == 1 && at::isFloatingType(grad.scalar_type()), name,
              " must be a floating-point tensor of one element, got ", grad.scalar_type(),
              " of shape ", grad.sizes());
  MTBKD_CHECK(grad.device() == mu.device(), name, " must be on mu's device ", mu.device(),
              ", got ", grad.device());
}

std::tuple<Tensor, Tensor> gaussian_kl_bwd_cpu(const Tensor& grad, const Tensor& mu,
                                               const Tensor& rho, double prior_mu,
                                               double prior_sigma, bool mu_grad, bool rho_grad) {
  check_pair(mu, rho, "mu", "rho");
  check_kl_grad(grad, mu);
  MTBKD_CHECK(prior_sigma > 0, "prior_sigma must be positive, got ", prior_sigma);
  Tensor dmu = mu_grad ? at::empty_like(mu) : at::empty({0}, mu.options());
  Tensor drho = rho_grad ? at::empty_like(rho) : at::empty({0}, rho.options());
  const double g = grad.item<double>();
  if (mu_grad || rho_grad) {
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kBFloat16, at::kHalf, mu.scalar_type(), "gaussian_kl_bwd", [&] {
          mtbkd::cpu::gaussian_kl_bwd<scalar_t>(
              g, mu.const_data_ptr<scalar_t>(), rho.const_data_ptr<scalar_t>(),
              mu_grad ? dmu.mutable_data_ptr<scalar_t>() : nullptr,
              rho_grad ? drho.mutable_data_ptr<scalar_t>() : nullptr, mu.numel(), prior_mu,
              prior_sigma);
        });
  }
  return {dmu, drho};
}

std::tuple<Tensor, Tensor> reparameterize_kl_fwd_cpu(const Tensor& mu, const Tensor& rho,
                                                      int64_t seed, int64_t offset,
                                                      double prior_mu, double prior_sigma,
                                                      bool check_finite) {
  check_pair(mu, rho, "mu", "rho");
  MTBKD_CHECK(prior_sigma > 0, "prior_sigma must be positive, got ", prior_sigma);
  const auto acc = mu.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  Tensor w = at::empty_like(mu);
  int flags = 0;
  double kl = 0.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, mu.scalar_type(), "reparam_kl_fwd", [&] {
        flags = mtbkd::cpu::reparameterize_kl_fwd<scalar_t>(
            mu.const_data_ptr<scalar_t>(), rho.const_data_ptr<scalar_t>(),
            w.mutable_data_ptr<scalar_t>(), mu.numel(), static_cast<uint64_t>(seed),
            static_cast<uint64_t>(offset), prior_mu, prior_sigma, check_finite, &kl);
      });
  raise_non_finite(flags);
  return {w, at::scalar_tensor(kl, mu.options().dtype(acc))};
}

std::tuple<Tensor, Tensor> reparameterize_kl_bwd_cpu(const Tensor& grad, const Tensor& grad_kl,
                                                      const Tensor& mu, const Tensor& rho,
                                                      int64_t seed, int64_t offset,
                                                      double prior_mu, double prior_sigma,
                                                      bool mu_grad, bool rho_grad) {
  check_pair(mu, rho, "mu", "rho");
  check_pair(grad, rho, "grad", "rho");
  check_kl_grad(grad_kl, mu, "grad_kl");
  MTBKD_CHECK(prior_sigma > 0, "prior_sigma must be positive, got ", prior_sigma);
  Tensor dmu = mu_grad ? at::empty_like(mu) : at::empty({0}, mu.options());
  Tensor drho = rho_grad ? at::empty_like(rho) : at::empty({0}, rho.options());
  const double gk = grad_kl.item<double>();
  if (mu_grad || rho_grad) {
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kBFloat16, at::kHalf, mu.scalar_type(), "reparam_kl_bwd", [&] {
          mtbkd::cpu::reparameterize_kl_bwd<scalar_t>(
              grad.const_data_ptr<scalar_t>(), gk, mu.const_data_ptr<scalar_t>(),
              rho.const_data_ptr<scalar_t>(),
              mu_grad ? dmu.mutable_data_ptr<scalar_t>() : nullptr,
              rho_grad ? drho.mutable_data_ptr<scalar_t>() : nullptr, mu.numel(),
              static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), prior_mu, prior_sigma);
        });
  }
  return {dmu, drho};
}

void check_sgld_lists(const std::vector<Tensor>& params, const std::vector<Tensor>& grads,
                      const std::vector<Tensor>& square_avgs, bool precondition) {
  MTBKD_CHECK(params.size() == grads.size(), "params and grads must have the same length");
  MTBKD_CHECK(!precondition || square_avgs.size() == params.size(),
              "square_avgs must have one tensor per parameter when precondition=True");
  for (size_t j = 0; j < params.size(); ++j) {
    check_pair(params[j], grads[j], "params[j]", "grads[j]");
    if (precondition) {
      const auto acc = params[j].scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
      MTBKD_CHECK(square_avgs[j].scalar_type() == acc && square_avgs[j].is_contiguous() &&
                      square_avgs[j].numel() == params[j].numel() &&
                      square_avgs[j].device() == params[j].device(),
                  "square_avgs[j] must be a contiguous ", acc, " tensor shaped like params[j]");
    }
  }
}

void sgld_step_cpu(at::TensorList params_in, at::TensorList grads_in,
                   at::TensorList square_avgs_in, double lr, double num_data,
                   double temperature, double weight_decay, int64_t seed, bool precondition,
                   double alpha, double eps) {
  const std::vector<Tensor> params = params_in.vec(), grads = grads_in.vec(),
                            square_avgs = square_avgs_in.vec();
  check_sgld_lists(params, grads, square_avgs, precondition);
  const mtbkd::cpu::SgldParams p{lr,           num_data, temperature, weight_decay,
                                 static_cast<uint64_t>(seed), precondition, alpha, eps};
  for (size_t j = 0; j < params.size(); ++j) {
    const Tensor& th = params[j];
    MTBKD_CHECK(th.device().is_cpu(), "params must be CPU tensors");
    const auto stream = static_cast<uint32_t>(j);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, th.scalar_type(), "sgld", [&] {
      using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      acc_t* sq = precondition ? square_avgs[j].mutable_data_ptr<acc_t>() : nullptr;
      mtbkd::cpu::sgld_step<scalar_t, acc_t>(th.mutable_data_ptr<scalar_t>(),
                                             grads[j].const_data_ptr<scalar_t>(), sq, th.numel(),
                                             p, stream);
    });
  }
}

#ifdef MTBKD_WITH_CUDA

mtbkd::cuda::DType cuda_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return mtbkd::cuda::DType::kFloat32;
    case at::kDouble:
      return mtbkd::cuda::DType::kFloat64;
    case at::kBFloat16:
      return mtbkd::cuda::DType::kBFloat16;
    case at::kHalf:
      return mtbkd::cuda::DType::kFloat16;
    default:
      MTBKD_CHECK(false, "unsupported dtype ", t);
  }
}

void check_cuda(cudaError_t err) { MTBKD_CHECK(err == cudaSuccess, cudaGetErrorString(err)); }

Tensor reparameterize_fwd_cuda(const Tensor& mu, const Tensor& rho, int64_t seed,
                               int64_t offset, bool check_finite) {
  // The Python op checks finiteness on CUDA tensors (one fused torch reduction) when asked.
  (void)check_finite;
  check_pair(mu, rho, "mu", "rho");
  const c10::cuda::CUDAGuard guard(mu.device());
  Tensor w = at::empty_like(mu);
  mtbkd::cuda::ReparamParams p{mu.const_data_ptr(), rho.const_data_ptr(), w.mutable_data_ptr(),
                               mu.numel(), static_cast<uint64_t>(seed),
                               static_cast<uint64_t>(offset), cuda_dtype(mu.scalar_type()),
                               false};
  check_cuda(mtbkd::cuda::launch_reparameterize(p, c10::cuda::getCurrentCUDAStream()));
  return w;
}

Tensor reparameterize_bwd_cuda(const Tensor& grad, const Tensor& rho, int64_t seed,
                               int64_t offset) {
  check_pair(grad, rho, "grad", "rho");
  const c10::cuda::CUDAGuard guard(rho.device());
  Tensor drho = at::empty_like(rho);
  mtbkd::cuda::ReparamParams p{grad.const_data_ptr(), rho.const_data_ptr(),
                               drho.mutable_data_ptr(), rho.numel(), static_cast<uint64_t>(seed),
                               static_cast<uint64_t>(offset), cuda_dtype(rho.scalar_type()),
                               true};
  check_cuda(mtbkd::cuda::launch_reparameterize(p, c10::cuda::getCurrentCUDAStream()));
  return drho;
}

Tensor gaussian_kl_cuda(const Tensor& mu, const Tensor& rho, double prior_mu, double prior_sigma) {
  check_pair(mu, rho, "mu", "rho");
  MTBKD_CHECK(prior_sigma > 0, "prior_sigma must be positive, got ", prior_sigma);
  const c10::cuda::CUDAGuard guard(mu.device());
  const auto acc = mu.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  Tensor sum = at::zeros({}, mu.options().dtype(at::kDouble));
  mtbkd::cuda::KLParams p{mu.const_data_ptr(),
                          rho.const_data_ptr(),
                          nullptr,
                          nullptr,
                          nullptr,
                          sum.mutable_data_ptr<double>(),
                          mu.numel(),
                          prior_mu,
                          prior_sigma,
                          cuda_dtype(mu.scalar_type())};
  check_cuda(mtbkd::cuda::launch_gaussian_kl(p, c10::cuda::getCurrentCUDAStream()));
  return sum.to(acc);
}

std::tuple<Tensor, Tensor> gaussian_kl_bwd_cuda(const Tensor& grad, const Tensor& mu,
                                                const Tensor& rho, double prior_mu,
                                                double prior_sigma, bool mu_grad, bool rho_grad) {
  check_pair(mu, rho, "mu", "rho");
  check_kl_grad(grad, mu);
  MTBKD_CHECK(prior_sigma > 0, "prior_sigma must be positive, got ", prior_sigma);
  const c10::cuda::CUDAGuard guard(mu.device());
  Tensor dmu = mu_grad ? at::empty_like(mu) : at::empty({0}, mu.options());
  Tensor drho = rho_grad ? at::empty_like(rho) : at::empty({0}, rho.options());
  // read by the kernel on the device: no host synchronisation
  const Tensor g = grad.reshape({}).to(at::kDouble);
  mtbkd::cuda::KLParams p{mu.const_data_ptr(),
                          rho.const_data_ptr(),
                          mu_grad ? dmu.mutable_data_ptr() : nullptr,
                          rho_grad ? drho.mutable_data_ptr() : nullptr,
                          g.const_data_ptr<double>(),
                          nullptr,
                          mu.numel(),
                          prior_mu,
                          prior_sigma,
                          cuda_dtype(mu.scalar_type())};
  if (mu_grad || rho_grad)
    check_cuda(mtbkd::cuda::launch_gaussian_kl(p, c10::cuda::getCurrentCUDAStream()));
  return {dmu, drho};
}

std::tuple<Tensor, Tensor> reparameterize_kl_fwd_cuda(const Tensor& mu, const Tensor& rho,
                                                       int64_t seed, int64_t offset,
                                                       double prior_mu, double prior_sigma,
                                                       bool check_finite) {
  // As reparameterize_fwd_cuda: the Python op checks finiteness on CUDA tensors when asked.
  (void)check_finite;
  check_pair(mu, rho, "mu", "rho");
  MTBKD_CHECK(prior_sigma > 0, "prior_sigma must be positive, got ", prior_sigma);
  const c10::cuda::CUDAGuard guard(mu.device());
  const auto acc = mu.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  Tensor w = at::empty_like(mu);
  Tensor sum = at::zeros({}, mu.options().dtype(at::kDouble));
  mtbkd::cuda::ReparamKLParams p{mu.const_data_ptr(),
                                 rho.const_data_ptr(),
                                 nullptr,
                                 nullptr,
                                 w.mutable_data_ptr(),
                                 nullptr,
                                 sum.mutable_data_ptr<double>(),
                                 mu.numel(),
                                 static_cast<uint64_t>(seed),
                                 static_cast<uint64_t>(offset),
                                 prior_mu,
                                 prior_sigma,
                                 cuda_dtype(mu.scalar_type())};
  check_cuda(mtbkd::cuda::launch_reparameterize_kl(p, c10::cuda::getCurrentCUDAStream()));
  return {w, sum.to(acc)};
}

std::tuple<Tensor, Tensor> reparameterize_kl_bwd_cuda(const Tensor& grad, const Tensor& grad_kl,
                                                       const Tensor& mu, const Tensor& rho,
                                                       int64_t seed, int64_t offset,
                                                       double prior_mu, double prior_sigma,
                                                       bool mu_grad, bool rho_grad) {
  check_pair(mu, rho, "mu", "rho");
  check_pair(grad, rho, "grad", "rho");
  check_kl_grad(grad_kl, mu, "grad_kl");
  MTBKD_CHECK(prior_sigma > 0, "prior_sigma must be positive, got ", prior_sigma);
  const c10::cuda::CUDAGuard guard(mu.device());
  Tensor dmu = mu_grad ? at::empty_like(mu) : at::empty({0}, mu.options());
  Tensor drho = rho_grad ? at::empty_like(rho) : at::empty({0}, rho.options());
  const Tensor gk = grad_kl.reshape({}).to(at::kDouble);  // read on the device
  mtbkd::cuda::ReparamKLParams p{mu.const_data_ptr(),
                                 rho.const_data_ptr(),
                                 grad.const_data_ptr(),
                                 gk.const_data_ptr<double>(),
                                 mu_grad ? dmu.mutable_data_ptr() : nullptr,
                                 rho_grad ? drho.mutable_data_ptr() : nullptr,
                                 nullptr,
                                 mu.numel(),
                                 static_cast<uint64_t>(seed),
                                 static_cast<uint64_t>(offset),
                                 prior_mu,
                                 prior_sigma,
                                 cuda_dtype(mu.scalar_type())};
  if (mu_grad || rho_grad)
    check_cuda(mtbkd::cuda::launch_reparameterize_kl(p, c10::cuda::getCurrentCUDAStream()));
  return {dmu, drho};
}

void sgld_step_cuda(at::TensorList params_in, at::TensorList grads_in,
                    at::TensorList square_avgs_in, double lr, double num_data,
                    double temperature, double weight_decay, int64_t seed, bool precondition,
                    double alpha, double eps) {
  const std::vector<Tensor> params = params_in.vec(), grads = grads_in.vec(),
                            square_avgs = square_avgs_in.vec();
  check_sgld_lists(params, grads, square_avgs, precondition);
  if (params.empty()) return;
  MTBKD_CHECK(params[0].is_cuda(), "params must be CUDA tensors, got ", params[0].device());
  const c10::cuda::CUDAGuard guard(params[0].device());
  std::vector<mtbkd::cuda::SgldTensor> tensors;
  for (size_t j = 0; j < params.size(); ++j) {
    MTBKD_CHECK(params[j].scalar_type() == params[0].scalar_type(),
                "the CUDA SGLD step needs one dtype for all parameters");
    // A list mixing devices dispatches here (CUDA outranks CPU): a CPU or other-GPU tensor's
    // pointer would reach the kernel (an illegal memory access, not an error).
    MTBKD_CHECK(params[j].device() == params[0].device(),
                "the CUDA SGLD step needs all parameters on one device, got ", params[0].device(),
                " and ", params[j].device());
    tensors.push_back({params[j].mutable_data_ptr(), grads[j].const_data_ptr(),
                       precondition ? square_avgs[j].mutable_data_ptr() : nullptr,
                       params[j].numel(), static_cast<uint32_t>(j)});
  }
  const mtbkd::cuda::SgldHyper h{lr,           num_data, temperature, weight_decay,
                                 static_cast<uint64_t>(seed), precondition, alpha, eps};
  check_cuda(mtbkd::cuda::launch_sgld(tensors.data(), static_cast<int>(tensors.size()), h,
                                      cuda_dtype(params[0].scalar_type()),
                                      c10::cuda::getCurrentCUDAStream()));
}

#endif  // MTBKD_WITH_CUDA

}  // namespace

TORCH_LIBRARY_FRAGMENT(mtbkd_C, m) {
  m.def("philox_normal(int seed, int offset, int stream, int n) -> Tensor");
  m.def(
      "reparameterize_fwd(Tensor mu, Tensor rho, int seed, int offset, bool check_finite)"
      " -> Tensor");
  m.def("reparameterize_bwd(Tensor grad, Tensor rho, int seed, int offset) -> Tensor");
  m.def(
      "gaussian_kl(Tensor mu, Tensor rho, float prior_mu, float prior_sigma) -> Tensor");
  m.def(
      "gaussian_kl_bwd(Tensor grad, Tensor mu, Tensor rho, float prior_mu, float prior_sigma, "
      "bool mu_grad, bool rho_grad) -> (Tensor, Tensor)");
  m.def(
      "reparameterize_kl_fwd(Tensor mu, Tensor rho, int seed, int offset, float prior_mu, "
      "float prior_sigma, bool check_finite) -> (Tensor, Tensor)");
  m.def(
      "reparameterize_kl_bwd(Tensor grad, Tensor grad_kl, Tensor mu, Tensor rho, int seed, "
      "int offset, float prior_mu, float prior_sigma, bool mu_grad, bool rho_grad)"
      " -> (Tensor, Tensor)");
  m.def(
      "sgld_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] square_avgs, float lr, "
      "float num_data, float temperature, float weight_decay, int seed, bool precondition, "
      "float alpha, float eps) -> ()");
  // A factory without tensor inputs dispatches on CompositeExplicitAutograd.
  m.impl("philox_normal", c10::DispatchKey::CompositeExplicitAutograd, TORCH_FN(philox_normal));
}

TORCH_LIBRARY_IMPL(mtbkd_C, CPU, m) {
  m.impl("reparameterize_fwd", TORCH_FN(reparameterize_fwd_cpu));
  m.impl("reparameterize_bwd", TORCH_FN(reparameterize_bwd_cpu));
  m.impl("gaussian_kl", TORCH_FN(gaussian_kl_cpu));
  m.impl("gaussian_kl_bwd", TORCH_FN(gaussian_kl_bwd_cpu));
  m.impl("reparameterize_kl_fwd", TORCH_FN(reparameterize_kl_fwd_cpu));
  m.impl("reparameterize_kl_bwd", TORCH_FN(reparameterize_kl_bwd_cpu));
  m.impl("sgld_step_", TORCH_FN(sgld_step_cpu));
}

#ifdef MTBKD_WITH_CUDA
TORCH_LIBRARY_IMPL(mtbkd_C, CUDA, m) {
  m.impl("reparameterize_fwd", TORCH_FN(reparameterize_fwd_cuda));
  m.impl("reparameterize_bwd", TORCH_FN(reparameterize_bwd_cuda));
  m.impl("gaussian_kl", TORCH_FN(gaussian_kl_cuda));
  m.impl("gaussian_kl_bwd", TORCH_FN(gaussian_kl_bwd_cuda));
  m.impl("reparameterize_kl_fwd", TORCH_FN(reparameterize_kl_fwd_cuda));
  m.impl("reparameterize_kl_bwd", TORCH_FN(reparameterize_kl_bwd_cuda));
  m.impl("sgld_step_", TORCH_FN(sgld_step_cuda));
}
#endif
