// torch-facing wrapper of the CUDA loss kernels: argument checks, output allocation, the current
// stream, and TORCH_LIBRARY_IMPL(mtbkd_C, CUDA) for the ops whose schemas csrc/ops.cpp defines
// (torch.ops.mtbkd_C.*; the same signatures and semantics as the custom ops in mtbkd/ops.py).
// Compiled by setup.py only in CUDA builds (MTBKD_WITH_CUDA), by the host C++ compiler, as
// csrc/bayes_ops.cpp: nvcc compiles only the framework-free kernels (loss_kernels.cu, ...), which
// know nothing of torch. The checks are MTBKD_CHECK* (torch_check.h: messages formatted without
// iostreams).
//
// No host synchronisation: label-range and finiteness findings stay in a per-row status tensor
// and are turned into an asynchronous device assertion (at::_assert_async), as PyTorch does for
// out-of-range targets of cross_entropy.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "loss_kernels.cuh"
#include "torch_check.h"

namespace mtbkd {
namespace {

using at::Tensor;

at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

cuda::DType kernel_dtype(const Tensor& x, const char* name) {
  switch (x.scalar_type()) {
    case at::kFloat:
      return cuda::DType::kFloat32;
    case at::kDouble:
      return cuda::DType::kFloat64;
    case at::kBFloat16:
      return cuda::DType::kBFloat16;
    case at::kHalf:
      return cuda::DType::kFloat16;
    default:
      MTBKD_CHECK_TYPE(false, name, " must be float32, float64, bfloat16 or float16, got ",
                       x.scalar_type());
  }
  return cuda::DType::kFloat32;
}

void check_positive(double v, const char* name) {
  MTBKD_CHECK_VALUE(std::isfinite(v) && v > 0, name, " must be a positive finite number, got ", v);
}

void check_launch(cudaError_t err, const char* op) {
  MTBKD_CHECK(err == cudaSuccess, "mtbkd_C::", op, " CUDA launch failed: ", cudaGetErrorString(err));
}

// K contiguous teachers [N, V] of one dtype on `device`, as kernel pointers.
struct Teachers {
  std::vector<Tensor> owned;
  cuda::TeacherPtrs ptrs{};
  int k = 0;
};

Teachers canonical_teachers(const std::vector<Tensor>& teachers, int64_t N, int64_t V,
                            at::ScalarType dtype, const at::Device& device) {
  MTBKD_CHECK_VALUE(!teachers.empty(), "teacher_logits must hold at least one teacher (K >= 1)");
  MTBKD_CHECK_VALUE(teachers.size() <= static_cast<size_t>(cuda::kMaxTeachers),
                    "the cuda backend takes at most ", cuda::kMaxTeachers, " teachers, got ",
                    teachers.size(), " (MTBKD_BACKEND=triton takes any number)");
  Teachers out;
  out.k = static_cast<int>(teachers.size());
  for (size_t k = 0; k < teachers.size(); ++k) {
    const Tensor& t = teachers[k];
    MTBKD_CHECK_VALUE(t.device() == device, "teacher_logits[", k, "] is on ", t.device(),
                      " but expected ", device);
    MTBKD_CHECK_TYPE(t.scalar_type() == dtype, "teacher_logits[", k, "] has dtype ",
                     t.scalar_type(), " but the logits have dtype ", dtype);
    MTBKD_CHECK_VALUE(t.dim() == 2 && t.size(0) == N && t.size(1) == V, "teacher_logits[", k,
                      "] must have shape [", N, ", ", V, "], got ", t.sizes());
    out.owned.push_back(t.contiguous());
    out.ptrs.ptr[k] = out.owned.back().data_ptr();
  }
  for (int k = out.k; k < cuda::kMaxTeachers; ++k) out.ptrs.ptr[k] = out.ptrs.ptr[0];
  return out;
}

struct LossInputs {
  Tensor student, labels, fixed_weights;
  Teachers teachers;
  int64_t N = 0, V = 0;
};

LossInputs check_loss_inputs(const Tensor& student, const std::vector<Tensor>& teachers,
                             const std::optional<Tensor>& labels,
                             const std::optional<Tensor>& fixed_weights, int64_t weight_mode,
                             double temperature, double weight_temperature) {
  MTBKD_CHECK_VALUE(student.is_cuda(), "student_logits must be a CUDA tensor, got ",
                    student.device());
  kernel_dtype(student, "student_logits");
  MTBKD_CHECK_VALUE(student.dim() == 2 && student.size(1) > 0,
                    "student_logits must have shape [N, V] with V > 0, got ", student.sizes());
  check_positive(temperature, "temperature");
  check_positive(weight_temperature, "weight_temperature");
  MTBKD_CHECK_VALUE(weight_mode >= 0 && weight_mode <= 2, "weight_mode must be 0, 1 or 2, got ",
                    weight_mode);
  LossInputs in;
  in.N = student.size(0);
  in.V = student.size(1);
  in.student = student.contiguous();
  in.teachers = canonical_teachers(teachers, in.N, in.V, student.scalar_type(), student.device());
  if (labels.has_value()) {
    const Tensor& y = *labels;
    MTBKD_CHECK_VALUE(y.device() == student.device(), "labels must be on ", student.device());
    MTBKD_CHECK_TYPE(y.scalar_type() == at::kLong, "labels must be int64, got ", y.scalar_type());
    MTBKD_CHECK_VALUE(y.dim() == 1 && y.size(0) == in.N, "labels must have shape [", in.N,
                      "], got ", y.sizes());
    in.labels = y.contiguous();
  }
  if (weight_mode == 2) {
    MTBKD_CHECK_VALUE(fixed_weights.has_value(), "fixed_weights are required with weight_mode 2");
    Tensor w = *fixed_weights;
    // As csrc/ops.cpp: floating point only (integer weights are refused, not converted), and
    // [K] is expanded to every row.
    MTBKD_CHECK_TYPE(w.is_floating_point(), "weights must be a floating-point tensor, got ",
                     w.scalar_type());
    if (w.dim() == 1) {
      MTBKD_CHECK_VALUE(w.size(0) == in.teachers.k,
                        "weights must have shape [K] or [K, N] with K = ", in.teachers.k,
                        ", got ", w.sizes());
      w = w.unsqueeze(1).expand({in.teachers.k, in.N});
    }
    MTBKD_CHECK_VALUE(w.dim() == 2 && w.size(0) == in.teachers.k && w.size(1) == in.N,
                      "fixed_weights must have shape [K, N] = [", in.teachers.k, ", ", in.N,
                      "], got ", w.sizes());
    in.fixed_weights =
        w.to(student.device(), acc_dtype(student.scalar_type())).contiguous();
  }
  return in;
}

void assert_status(const Tensor& status, int64_t V, const char* op) {
  if (!status.defined()) return;
  const std::string msg = std::string("mtbkd_C::") + op + ": labels out of range [0, " +
                          std::to_string(V) +
                          ") (other than ignore_index) or non-finite student_logits/"
                          "teacher_logits in an unmasked row";
  at::_assert_async(status.eq(0).all(), msg);
}

// ---- mtbkd_C::mtbkd_loss_fwd --------------------------------------------------------------------

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> mtbkd_loss_fwd_cuda(
    const Tensor& student, const std::vector<Tensor>& teachers,
    const std::optional<Tensor>& labels, const std::optional<Tensor>& fixed_weights,
    const std::optional<Tensor>& teacher_stats, double temperature, double concentration,
    double prior_weight, double hard_label_weight, int64_t weight_mode, double weight_temperature,
    int64_t ignore_index, bool check_finite, const std::optional<Tensor>& grad_scale) {
  LossInputs in = check_loss_inputs(student, teachers, labels, fixed_weights, weight_mode,
                                    temperature, weight_temperature);
  check_positive(concentration, "concentration");
  const c10::cuda::CUDAGuard guard(student.device());
  const auto acc = acc_dtype(student.scalar_type());
  const Tensor gs = grad_scale_arg(grad_scale, student, acc);
  const int64_t K = in.teachers.k;
  Tensor stats;
  if (teacher_stats.has_value()) {
    stats = *teacher_stats;
    MTBKD_CHECK_VALUE(stats.dim() == 3 && stats.size(0) == K && stats.size(1) == in.N &&
                          stats.size(2) == 4,
                      "teacher_stats must have shape [K, N, 4] = [", K, ", ", in.N, ", 4], got ",
                      stats.sizes());
    stats = stats.to(student.device(), acc).contiguous();
  }
  const auto opts = student.options().dtype(acc);
  Tensor loss = at::empty({in.N}, opts), prior = at::empty({in.N}, opts),
         ce = at::empty({in.N}, opts);
  Tensor weights = at::empty({K, in.N}, opts), resp = at::empty({K, in.N}, opts),
         entropy = at::empty({K, in.N}, opts);
  Tensor grad = at::empty_like(in.student);
  Tensor status;
  if (in.labels.defined() || check_finite) {
    status = at::empty({in.N}, student.options().dtype(at::kInt));
  }
  cuda::MTBKDParams p{};
  p.dtype = kernel_dtype(student, "student_logits");
  p.n = in.N;
  p.v = in.V;
  p.k = in.teachers.k;
  p.student = in.student.data_ptr();
  p.teachers = in.teachers.ptrs;
  p.labels = in.labels.defined() ? in.labels.data_ptr<int64_t>() : nullptr;
  p.fixed_weights = in.fixed_weights.defined() ? in.fixed_weights.data_ptr() : nullptr;
  p.teacher_stats = stats.defined() ? stats.data_ptr() : nullptr;
  p.loss = loss.data_ptr();
  p.grad = grad.data_ptr();
  p.weights = weights.data_ptr();
  p.resp = resp.data_ptr();
  p.entropy = entropy.data_ptr();
  p.prior = prior.data_ptr();
  p.ce = ce.data_ptr();
  p.status = status.defined() ? status.data_ptr<int32_t>() : nullptr;
  p.grad_scale = gs.defined() ? gs.data_ptr() : nullptr;
  p.inv_tau = 1.0 / temperature;
  p.inv_tau_w = 1.0 / weight_temperature;
  p.lam = concentration;
  p.prior_weight = prior_weight;
  p.hard_label_weight = hard_label_weight;
  p.lgamma_v_lam = std::lgamma(static_cast<double>(in.V) + concentration);
  p.weight_mode = static_cast<int>(weight_mode);
  p.ignore_index = ignore_index;
  p.check_finite = check_finite;
  check_launch(cuda::launch_mtbkd_loss_fwd(p, c10::cuda::getCurrentCUDAStream()), "mtbkd_loss_fwd");
  assert_status(status, in.V, "mtbkd_loss_fwd");
  return {loss, grad, weights, resp, entropy, prior, ce};
}

// ---- mtbkd_C::multi_teacher_kd_fwd --------------------------------------------------------------

std::tuple<Tensor, Tensor, Tensor> multi_teacher_kd_fwd_cuda(
    const Tensor& student, const std::vector<Tensor>& teachers,
    const std::optional<Tensor>& labels, const std::optional<Tensor>& fixed_weights,
    int64_t divergence, double beta, double temperature, int64_t weight_mode,
    double weight_temperature, double hard_label_weight, double soft_label_weight,
    double soft_scale, int64_t ignore_index, bool check_finite,
    const std::optional<Tensor>& grad_scale) {
  LossInputs in = check_loss_inputs(student, teachers, labels, fixed_weights, weight_mode,
                                    temperature, weight_temperature);
  MTBKD_CHECK_VALUE(divergence >= 0 && divergence <= 2, "divergence must be 0, 1 or 2, got ",
                    divergence);
  // Checked for every divergence, as csrc/ops.cpp does (not only where jsd reads it).
  MTBKD_CHECK_VALUE(beta >= 0.0 && beta <= 1.0, "beta must lie in [0, 1], got ", beta);
  if (divergence == 2) {
    // The endpoints are forward and reverse KL exactly (log 0 never reaches the kernel).
    if (beta == 0.0) divergence = 0;
    if (beta == 1.0) divergence = 1;
  }
  const c10::cuda::CUDAGuard guard(student.device());
  const auto acc = acc_dtype(student.scalar_type());
  const Tensor gs = grad_scale_arg(grad_scale, student, acc);
  const auto opts = student.options().dtype(acc);
  Tensor loss = at::empty({in.N}, opts);
  Tensor weights = at::empty({static_cast<int64_t>(in.teachers.k), in.N}, opts);
  Tensor grad = at::empty_like(in.student);
  Tensor status;
  if (in.labels.defined() || check_finite) {
    status = at::empty({in.N}, student.options().dtype(at::kInt));
  }
  cuda::KDParams p{};
  p.dtype = kernel_dtype(student, "student_logits");
  p.n = in.N;
  p.v = in.V;
  p.k = in.teachers.k;
  p.student = in.student.data_ptr();
  p.teachers = in.teachers.ptrs;
  p.labels = in.labels.defined() ? in.labels.data_ptr<int64_t>() : nullptr;
  p.fixed_weights = in.fixed_weights.defined() ? in.fixed_weights.data_ptr() : nullptr;
  p.loss = loss.data_ptr();
  p.grad = grad.data_ptr();
  p.weights = weights.data_ptr();
  p.status = status.defined() ? status.data_ptr<int32_t>() : nullptr;
  p.grad_scale = gs.defined() ? gs.data_ptr() : nullptr;
  p.divergence = static_cast<int>(divergence);
  p.inv_tau = 1.0 / temperature;
  p.inv_tau_w = 1.0 / weight_temperature;
  p.beta = beta;
  p.one_m_beta = 1.0 - beta;  // in double: A(1) - A(beta) loses digits as beta -> 1
  p.log_beta = divergence == 2 ? std::log(beta) : 0.0;
  p.log_1mbeta = divergence == 2 ? std::log1p(-beta) : 0.0;
  p.hard_label_weight = hard_label_weight;
  p.soft_weight = soft_label_weight * soft_scale;
  p.weight_mode = static_cast<int>(weight_mode);
  p.ignore_index = ignore_index;
  p.check_finite = check_finite;
  check_launch(cuda::launch_multi_teacher_kd_fwd(p, c10::cuda::getCurrentCUDAStream()),
               "multi_teacher_kd_fwd");
  assert_status(status, in.V, "multi_teacher_kd_fwd");
  return {loss, grad, weights};
}

// ---- teacher-only ops ------------------------------------------------------------------------

cuda::TeacherParams teacher_params(const std::vector<Tensor>& teachers, Teachers& owned,
                                   bool check_finite) {
  MTBKD_CHECK_VALUE(!teachers.empty(), "teacher_logits must hold at least one teacher (K >= 1)");
  const Tensor& t0 = teachers[0];
  MTBKD_CHECK_VALUE(t0.is_cuda(), "teacher_logits must be CUDA tensors, got ", t0.device());
  MTBKD_CHECK_VALUE(t0.dim() == 2 && t0.size(1) > 0,
                    "teacher_logits must be K tensors of shape [N, V] with V > 0, got ",
                    t0.sizes());
  cuda::TeacherParams p{};
  p.dtype = kernel_dtype(t0, "teacher_logits");
  owned = canonical_teachers(teachers, t0.size(0), t0.size(1), t0.scalar_type(), t0.device());
  p.n = t0.size(0);
  p.v = t0.size(1);
  p.k = owned.k;
  p.teachers = owned.ptrs;
  p.check_finite = check_finite;
  return p;
}

std::tuple<Tensor, Tensor> teacher_weights_cuda(const std::vector<Tensor>& teachers,
                                                int64_t weight_mode, double weight_temperature,
                                                bool check_finite) {
  MTBKD_CHECK_VALUE(weight_mode == 0 || weight_mode == 1,
                    "weight_mode must be 0 (entropy) or 1 (uniform) for teacher_weights, got ",
                    weight_mode);
  check_positive(weight_temperature, "weight_temperature");
  Teachers owned;
  cuda::TeacherParams p = teacher_params(teachers, owned, check_finite);
  const c10::cuda::CUDAGuard guard(teachers[0].device());
  const auto opts = teachers[0].options().dtype(acc_dtype(teachers[0].scalar_type()));
  Tensor w = at::empty({p.k, p.n}, opts), h = at::empty({p.k, p.n}, opts);
  Tensor status;
  if (check_finite) status = at::empty({p.n}, teachers[0].options().dtype(at::kInt));
  p.stats = false;
  p.weights = w.data_ptr();
  p.entropy = h.data_ptr();
  p.out = nullptr;
  p.status = status.defined() ? status.data_ptr<int32_t>() : nullptr;
  p.inv_tau = 1.0;
  p.inv_tau_w = 1.0 / weight_temperature;
  p.lam = 1.0;
  p.weight_mode = static_cast<int>(weight_mode);
  check_launch(cuda::launch_teacher_stats(p, c10::cuda::getCurrentCUDAStream()),
               "teacher_weights");
  assert_status(status, p.v, "teacher_weights");
  return {w, h};
}

Tensor teacher_stats_cuda(const std::vector<Tensor>& teachers, double temperature,
                          double concentration, double weight_temperature, bool check_finite) {
  check_positive(temperature, "temperature");
  check_positive(concentration, "concentration");
  check_positive(weight_temperature, "weight_temperature");
  Teachers owned;
  cuda::TeacherParams p = teacher_params(teachers, owned, check_finite);
  const c10::cuda::CUDAGuard guard(teachers[0].device());
  const auto opts = teachers[0].options().dtype(acc_dtype(teachers[0].scalar_type()));
  Tensor out = at::empty({p.k, p.n, 4}, opts);
  Tensor status;
  if (check_finite) status = at::empty({p.n}, teachers[0].options().dtype(at::kInt));
  p.stats = true;
  p.weights = nullptr;
  p.entropy = nullptr;
  p.out = out.data_ptr();
  p.status = status.defined() ? status.data_ptr<int32_t>() : nullptr;
  p.inv_tau = 1.0 / temperature;
  p.inv_tau_w = 1.0 / weight_temperature;
  p.lam = concentration;
  p.weight_mode = 0;
  check_launch(cuda::launch_teacher_stats(p, c10::cuda::getCurrentCUDAStream()), "teacher_stats");
  assert_status(status, p.v, "teacher_stats");
  return out;
}

// ---- elementwise ops ---------------------------------------------------------------------------

Tensor scale_grad_cuda(const Tensor& grad, const Tensor& grad_rows) {
  MTBKD_CHECK_VALUE(grad.is_cuda() && grad_rows.device() == grad.device(),
                    "grad and grad_rows must be on the same CUDA device");
  MTBKD_CHECK_VALUE(grad.dim() == 2 && grad_rows.dim() == 1 && grad_rows.size(0) == grad.size(0),
                    "grad must be [N, V] and grad_rows [N], got ", grad.sizes(), " and ",
                    grad_rows.sizes());
  MTBKD_CHECK_TYPE(grad_rows.is_floating_point(), "grad_rows must be floating point, got ",
                   grad_rows.scalar_type());
  const cuda::DType dtype = kernel_dtype(grad, "grad");
  const c10::cuda::CUDAGuard guard(grad.device());
  Tensor g = grad.contiguous();
  // In grad's accumulation type, as csrc/ops.cpp: float32 grad_rows must not round a float64
  // gradient to float32 precision, float64 ones not widen a float32 gradient's product.
  Tensor rows = grad_rows.to(acc_dtype(grad.scalar_type())).contiguous();
  Tensor out = at::empty_like(g);
  cuda::ScaleGradParams p{};
  p.dtype = dtype;
  p.rows_double = rows.scalar_type() == at::kDouble;
  p.n = g.size(0);
  p.v = g.size(1);
  p.grad = g.data_ptr();
  p.rows = rows.data_ptr();
  p.out = out.data_ptr();
  check_launch(cuda::launch_scale_grad(p, c10::cuda::getCurrentCUDAStream()), "scale_grad");
  return out;
}

Tensor lgamma1p_cuda(const Tensor& x) {
  MTBKD_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
                   "x must be float32 or float64, got ", x.scalar_type());
  const c10::cuda::CUDAGuard guard(x.device());
  Tensor xc = x.contiguous();
  Tensor out = at::empty_like(xc);
  cuda::Lgamma1pParams p{};
  p.is_double = xc.scalar_type() == at::kDouble;
  p.numel = xc.numel();
  p.x = xc.data_ptr();
  p.out = out.data_ptr();
  check_launch(cuda::launch_lgamma1p(p, c10::cuda::getCurrentCUDAStream()), "lgamma1p");
  return out;
}

}  // namespace
}  // namespace mtbkd

TORCH_LIBRARY_IMPL(mtbkd_C, CUDA, m) {
  m.impl("mtbkd_loss_fwd", &mtbkd::mtbkd_loss_fwd_cuda);
  m.impl("multi_teacher_kd_fwd", &mtbkd::multi_teacher_kd_fwd_cuda);
  m.impl("teacher_weights", &mtbkd::teacher_weights_cuda);
  m.impl("teacher_stats", &mtbkd::teacher_stats_cuda);
  m.impl("scale_grad", &mtbkd::scale_grad_cuda);
  m.impl("lgamma1p", &mtbkd::lgamma1p_cuda);
}
