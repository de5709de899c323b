// torch-facing API of the fused loss kernels: schemas (torch.ops.mtbkd_C.*), argument checks,
// output allocation, dtype dispatch, and the translation of kernel findings into ValueErrors.
// The semantics are those of the custom ops in mtbkd/ops.py (same argument order); the kernels
// themselves (cpu/loss_kernels.cpp) know nothing of torch.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cmath>
#include <string>
#include <tuple>
#include <vector>

#include "cpu/loss_kernels.h"
#include "torch_check.h"

namespace mtbkd {
namespace {

using at::Tensor;

at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

void check_logits_dtype(const Tensor& x, const char* name) {
  const auto t = x.scalar_type();
  MTBKD_CHECK_TYPE(t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf,
                   name, " must be float32, float64, bfloat16 or float16, got ", t);
}

void check_positive(double v, const char* name) {
  MTBKD_CHECK_VALUE(std::isfinite(v) && v > 0, name, " must be a positive finite number, got ", v);
}

// Canonical inputs of both losses and of the teacher-only ops: student [N, V] (optional), K >= 1
// teachers [N, V] of one dtype on the CPU. Returns contiguous teachers.
std::vector<Tensor> canonical_teachers(const std::vector<Tensor>& teachers, int64_t N, int64_t V,
                                       at::ScalarType dtype) {
  MTBKD_CHECK_VALUE(!teachers.empty(), "teacher_logits must hold at least one teacher (K >= 1)");
  std::vector<Tensor> out;
  out.reserve(teachers.size());
  for (size_t k = 0; k < teachers.size(); ++k) {
    const Tensor& t = teachers[k];
    MTBKD_CHECK_VALUE(t.device().is_cpu(), "teacher_logits[", k, "] must be a CPU tensor, got ",
                      t.device());
    MTBKD_CHECK_TYPE(t.scalar_type() == dtype, "teacher_logits[", k, "] has dtype ",
                     t.scalar_type(), " but the logits have dtype ", dtype);
    MTBKD_CHECK_VALUE(t.dim() == 2 && t.size(0) == N && t.size(1) == V, "teacher_logits[", k,
                      "] must have shape [", N, ", ", V, "], got ", t.sizes());
    out.push_back(t.contiguous());
  }
  return out;
}

std::vector<Tensor> check_teacher_set(const std::vector<Tensor>& teachers) {
  MTBKD_CHECK_VALUE(!teachers.empty(), "teacher_logits must hold at least one teacher (K >= 1)");
  const Tensor& t0 = teachers[0];
  check_logits_dtype(t0, "teacher_logits");
  MTBKD_CHECK_VALUE(t0.dim() == 2 && t0.size(1) > 0,
                    "teacher_logits must be K tensors of shape [N, V] with V > 0, got ",
                    t0.sizes());
  return canonical_teachers(teachers, t0.size(0), t0.size(1), t0.scalar_type());
}

struct LossInputs {
  Tensor student;
  std::vector<Tensor> teachers;
  std::vector<const void*> teacher_ptrs;
  Tensor labels;         // undefined if none
  Tensor fixed_weights;  // [K, N] in the accumulation dtype, or undefined
  int64_t N = 0, V = 0;
  int K = 0;
};

LossInputs check_loss_inputs(const Tensor& student, const std::vector<Tensor>& teachers,
                             const std::optional<Tensor>& labels,
                             const std::optional<Tensor>& fixed_weights, int64_t weight_mode,
                             double temperature, double weight_temperature) {
  LossInputs in;
  check_logits_dtype(student, "student_logits");
  MTBKD_CHECK_VALUE(student.device().is_cpu(), "student_logits must be a CPU tensor, got ",
                    student.device());
  MTBKD_CHECK_VALUE(student.dim() == 2 && student.size(1) > 0,
                    "student_logits must have shape [N, V] with V > 0, got ", student.sizes());
  in.N = student.size(0);
  in.V = student.size(1);
  in.student = student.contiguous();
  in.teachers = canonical_teachers(teachers, in.N, in.V, student.scalar_type());
  in.K = static_cast<int>(in.teachers.size());
  for (const auto& t : in.teachers) in.teacher_ptrs.push_back(t.data_ptr());
  if (labels.has_value()) {
    const Tensor& y = *labels;
    MTBKD_CHECK_TYPE(y.scalar_type() == at::kLong, "labels must be int64, got ", y.scalar_type());
    MTBKD_CHECK_VALUE(y.device().is_cpu(), "labels must be a CPU tensor, got ", y.device());
    MTBKD_CHECK_VALUE(y.dim() == 1 && y.size(0) == in.N, "labels must have shape [", in.N,
                      "], got ", y.sizes());
    in.labels = y.contiguous();
  }
  MTBKD_CHECK_VALUE(weight_mode >= 0 && weight_mode <= 2,
                    "weight_mode must be 0 (entropy), 1 (uniform) or 2 (fixed), got ", weight_mode);
  if (weight_mode == 2) {
    MTBKD_CHECK_VALUE(fixed_weights.has_value(), "weight_mode 2 (fixed) needs fixed_weights");
    Tensor w = *fixed_weights;
    MTBKD_CHECK_VALUE(w.device().is_cpu(), "weights must be a CPU tensor, got ", w.device());
    MTBKD_CHECK_TYPE(w.is_floating_point(), "weights must be a floating-point tensor, got ",
                     w.scalar_type());
    if (w.dim() == 1) {
      MTBKD_CHECK_VALUE(w.size(0) == in.K, "weights must have shape [K] or [K, N] with K = ",
                        in.K, ", got ", w.sizes());
      w = w.unsqueeze(1).expand({in.K, in.N});
    }
    MTBKD_CHECK_VALUE(w.dim() == 2 && w.size(0) == in.K && w.size(1) == in.N,
                      "weights must have shape [K, N] = [", in.K, ", ", in.N, "], got ",
                      w.sizes());
    in.fixed_weights = w.to(acc_dtype(student.scalar_type())).contiguous();
  }
  check_positive(temperature, "temperature");
  check_positive(weight_temperature, "weight_temperature");
  return in;
}

// grad_scale (a CPU tensor here: reading it costs no synchronisation) as the kernels' factor.
double host_grad_scale(const std::optional<Tensor>& grad_scale, const Tensor& student) {
  const Tensor s = grad_scale_arg(grad_scale, student, acc_dtype(student.scalar_type()));
  return s.defined() ? s.to(at::kDouble).item<double>() : 1.0;
}

void raise_on_status(const cpu::KernelStatus& s, int64_t V, int64_t ignore_index) {
  MTBKD_CHECK_VALUE(s.bad_label_row < 0, "labels: value ", s.bad_label_value, " at row ",
                    s.bad_label_row, " is out of range [0, ", V, ") and is not ignore_index (",
                    ignore_index, ")");
  MTBKD_CHECK_VALUE(s.nonfinite_student_row < 0, "student_logits contains NaN or inf (row ",
                    s.nonfinite_student_row,
                    "); pass check_finite=False to skip this check");
  MTBKD_CHECK_VALUE(s.nonfinite_teacher_row < 0, "teacher_logits contains NaN or inf (row ",
                    s.nonfinite_teacher_row,
                    "); pass check_finite=False to skip this check");
}

// Storage dtype T and accumulation dtype A of a dispatch.
template <class T_, class A_>
struct Types {
  using T = T_;
  using A = A_;
};

// Run f(Types<T, A>{}) for the logits dtype.
template <class F>
void dispatch_logits(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat:
      return f(Types<float, float>{});
    case at::kDouble:
      return f(Types<double, double>{});
    case at::kBFloat16:
      return f(Types<c10::BFloat16, float>{});
    case at::kHalf:
      return f(Types<c10::Half, float>{});
    default:
      MTBKD_CHECK_TYPE(false, "unsupported logits dtype ", t);
  }
}

// ---- mtbkd_C::mtbkd_loss_fwd ---------------------------------------------------------------

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> mtbkd_loss_fwd_cpu(
    const Tensor& student, const std::vector<Tensor>& teachers,
    const std::optional<Tensor>& labels, const std::optional<Tensor>& fixed_weights,
    const std::optional<Tensor>& teacher_stats, double temperature, double concentration,
    double prior_weight, double hard_label_weight, int64_t weight_mode, double weight_temperature,
    int64_t ignore_index, bool check_finite, const std::optional<Tensor>& grad_scale) {
  LossInputs in = check_loss_inputs(student, teachers, labels, fixed_weights, weight_mode,
                                    temperature, weight_temperature);
  check_positive(concentration, "concentration");
  const auto acc = acc_dtype(student.scalar_type());
  const double gs = host_grad_scale(grad_scale, student);
  Tensor stats;
  if (teacher_stats.has_value()) {
    stats = *teacher_stats;
    MTBKD_CHECK_VALUE(stats.device().is_cpu(), "teacher_stats must be a CPU tensor");
    MTBKD_CHECK_VALUE(stats.dim() == 3 && stats.size(0) == in.K && stats.size(1) == in.N &&
                          stats.size(2) == 4,
                      "teacher_stats must have shape [K, N, 4] = [", in.K, ", ", in.N,
                      ", 4], got ", stats.sizes());
    stats = stats.to(acc).contiguous();
  }
  const auto opts = student.options().dtype(acc);
  Tensor loss = at::empty({in.N}, opts), prior = at::empty({in.N}, opts),
         ce = at::empty({in.N}, opts);
  Tensor weights = at::empty({in.K, in.N}, opts), resp = at::empty({in.K, in.N}, opts),
         entropy = at::empty({in.K, in.N}, opts);
  Tensor grad = at::empty_like(in.student);
  cpu::KernelStatus status;
  dispatch_logits(student.scalar_type(), [&](auto types) {
    using T = typename decltype(types)::T;
    using A = typename decltype(types)::A;
    cpu::LossParams<T, A> p;
    p.N = in.N;
    p.V = in.V;
    p.K = in.K;
    p.student = in.student.data_ptr<T>();
    p.teachers = reinterpret_cast<const T* const*>(in.teacher_ptrs.data());
    p.labels = in.labels.defined() ? in.labels.data_ptr<int64_t>() : nullptr;
    p.ignore_index = ignore_index;
    p.fixed_weights = in.fixed_weights.defined() ? in.fixed_weights.data_ptr<A>() : nullptr;
    p.teacher_stats = stats.defined() ? stats.data_ptr<A>() : nullptr;
    p.weight_mode = static_cast<int>(weight_mode);
    p.temperature = temperature;
    p.weight_temperature = weight_temperature;
    p.hard_label_weight = hard_label_weight;
    p.concentration = concentration;
    p.prior_weight = prior_weight;
    p.grad_scale = gs;
    p.check_finite = check_finite;
    p.loss = loss.data_ptr<A>();
    p.grad = grad.data_ptr<T>();
    p.weights = weights.data_ptr<A>();
    p.resp = resp.data_ptr<A>();
    p.entropy = entropy.data_ptr<A>();
    p.prior = prior.data_ptr<A>();
    p.ce = ce.data_ptr<A>();
    status = cpu::mtbkd_loss_kernel<T, A>(p);
  });
  raise_on_status(status, in.V, ignore_index);
  return {loss, grad, weights, resp, entropy, prior, ce};
}

// ---- mtbkd_C::multi_teacher_kd_fwd ------------------------------------------------------------

std::tuple<Tensor, Tensor, Tensor> multi_teacher_kd_fwd_cpu(
    const Tensor& student, const std::vector<Tensor>& teachers,
    const std::optional<Tensor>& labels, const std::optional<Tensor>& fixed_weights,
    int64_t divergence, double beta, double temperature, int64_t weight_mode,
    double weight_temperature, double hard_label_weight, double soft_label_weight,
    double soft_scale, int64_t ignore_index, bool check_finite,
    const std::optional<Tensor>& grad_scale) {
  LossInputs in = check_loss_inputs(student, teachers, labels, fixed_weights, weight_mode,
                                    temperature, weight_temperature);
  const double gs = host_grad_scale(grad_scale, student);
  MTBKD_CHECK_VALUE(divergence >= 0 && divergence <= 2,
                    "divergence must be 0 (forward_kl), 1 (reverse_kl) or 2 (jsd), got ",
                    divergence);
  MTBKD_CHECK_VALUE(beta >= 0.0 && beta <= 1.0, "beta must lie in [0, 1], got ", beta);
  const auto opts = student.options().dtype(acc_dtype(student.scalar_type()));
  Tensor loss = at::empty({in.N}, opts);
  Tensor weights = at::empty({in.K, in.N}, opts);
  Tensor grad = at::empty_like(in.student);
  cpu::KernelStatus status;
  dispatch_logits(student.scalar_type(), [&](auto types) {
    using T = typename decltype(types)::T;
    using A = typename decltype(types)::A;
    cpu::LossParams<T, A> p;
    p.N = in.N;
    p.V = in.V;
    p.K = in.K;
    p.student = in.student.data_ptr<T>();
    p.teachers = reinterpret_cast<const T* const*>(in.teacher_ptrs.data());
    p.labels = in.labels.defined() ? in.labels.data_ptr<int64_t>() : nullptr;
    p.ignore_index = ignore_index;
    p.fixed_weights = in.fixed_weights.defined() ? in.fixed_weights.data_ptr<A>() : nullptr;
    p.weight_mode = static_cast<int>(weight_mode);
    p.temperature = temperature;
    p.weight_temperature = weight_temperature;
    p.hard_label_weight = hard_label_weight;
    p.divergence = static_cast<int>(divergence);
    p.beta = beta;
    p.one_m_beta = 1.0 - beta;
    p.soft_coef = soft_label_weight * soft_scale;
    p.grad_scale = gs;
    p.check_finite = check_finite;
    p.loss = loss.data_ptr<A>();
    p.grad = grad.data_ptr<T>();
    p.weights = weights.data_ptr<A>();
    status = cpu::multi_teacher_kd_kernel<T, A>(p);
  });
  raise_on_status(status, in.V, ignore_index);
  return {loss, grad, weights};
}

// ---- teacher-only ops ---------------------------------------------------------------------------

std::tuple<Tensor, Tensor> teacher_weights_cpu(const std::vector<Tensor>& teachers,
                                               int64_t weight_mode, double weight_temperature,
                                               bool check_finite) {
  std::vector<Tensor> ts = check_teacher_set(teachers);
  MTBKD_CHECK_VALUE(weight_mode == 0 || weight_mode == 1,
                    "teacher_weights computes weight_mode 0 (entropy) or 1 (uniform), got ",
                    weight_mode);
  check_positive(weight_temperature, "weight_temperature");
  const int64_t N = ts[0].size(0), V = ts[0].size(1);
  const int K = static_cast<int>(ts.size());
  std::vector<const void*> ptrs;
  for (const auto& t : ts) ptrs.push_back(t.data_ptr());
  const auto opts = ts[0].options().dtype(acc_dtype(ts[0].scalar_type()));
  Tensor weights = at::empty({K, N}, opts), entropy = at::empty({K, N}, opts);
  cpu::KernelStatus status;
  dispatch_logits(ts[0].scalar_type(), [&](auto types) {
    using T = typename decltype(types)::T;
    using A = typename decltype(types)::A;
    status = cpu::teacher_weights_kernel<T, A>(
        N, V, K, reinterpret_cast<const T* const*>(ptrs.data()), static_cast<int>(weight_mode),
        weight_temperature, check_finite, weights.data_ptr<A>(), entropy.data_ptr<A>());
  });
  raise_on_status(status, V, 0);
  return {weights, entropy};
}

Tensor teacher_stats_cpu(const std::vector<Tensor>& teachers, double temperature,
                         double concentration, double weight_temperature, bool check_finite) {
  std::vector<Tensor> ts = check_teacher_set(teachers);
  check_positive(temperature, "temperature");
  check_positive(concentration, "concentration");
  check_positive(weight_temperature, "weight_temperature");
  const int64_t N = ts[0].size(0), V = ts[0].size(1);
  const int K = static_cast<int>(ts.size());
  std::vector<const void*> ptrs;
  for (const auto& t : ts) ptrs.push_back(t.data_ptr());
  Tensor stats =
      at::empty({K, N, 4}, ts[0].options().dtype(acc_dtype(ts[0].scalar_type())));
  cpu::KernelStatus status;
  dispatch_logits(ts[0].scalar_type(), [&](auto types) {
    using T = typename decltype(types)::T;
    using A = typename decltype(types)::A;
    status = cpu::teacher_stats_kernel<T, A>(N, V, K,
                                             reinterpret_cast<const T* const*>(ptrs.data()),
                                             temperature, concentration, weight_temperature,
                                             check_finite, stats.data_ptr<A>());
  });
  raise_on_status(status, V, 0);
  return stats;
}

// ---- scale_grad (the backward) and the lgamma1p test hook ----------------------------------------------------

// out[i, :] = grad[i, :] * grad_rows[i], computed in the accumulation type and rounded once: the
// backward of both losses (the gradient was computed in the forward).
Tensor scale_grad_cpu(const Tensor& grad, const Tensor& grad_rows) {
  check_logits_dtype(grad, "grad");
  MTBKD_CHECK_VALUE(grad.device().is_cpu() && grad_rows.device().is_cpu(),
                    "grad and grad_rows must be CPU tensors");
  MTBKD_CHECK_VALUE(grad.dim() == 2, "grad must have shape [N, V], got ", grad.sizes());
  MTBKD_CHECK_VALUE(grad_rows.dim() == 1 && grad_rows.size(0) == grad.size(0),
                    "grad_rows must have shape [", grad.size(0), "], got ", grad_rows.sizes());
  MTBKD_CHECK_TYPE(grad_rows.is_floating_point(), "grad_rows must be floating point, got ",
                   grad_rows.scalar_type());
  const Tensor g = grad.contiguous();
  const Tensor rows = grad_rows.to(acc_dtype(grad.scalar_type())).contiguous();
  Tensor out = at::empty_like(g);
  dispatch_logits(g.scalar_type(), [&](auto types) {
    using T = typename decltype(types)::T;
    using A = typename decltype(types)::A;
    cpu::scale_grad_kernel<T, A>(g.size(0), g.size(1), g.data_ptr<T>(), rows.data_ptr<A>(),
                                 out.data_ptr<T>());
  });
  return out;
}

Tensor lgamma1p_cpu(const Tensor& x) {
  MTBKD_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
                   "lgamma1p takes float32 or float64, got ", x.scalar_type());
  MTBKD_CHECK_VALUE(x.device().is_cpu(), "lgamma1p takes a CPU tensor");
  const Tensor xc = x.contiguous();
  Tensor out = at::empty_like(xc);
  if (x.scalar_type() == at::kFloat)
    cpu::lgamma1p_kernel<float>(xc.numel(), xc.data_ptr<float>(), out.data_ptr<float>());
  else
    cpu::lgamma1p_kernel<double>(xc.numel(), xc.data_ptr<double>(), out.data_ptr<double>());
  return out;
}

}  // namespace
}  // namespace mtbkd

TORCH_LIBRARY_FRAGMENT(mtbkd_C, m) {
  m.def(
      "mtbkd_loss_fwd(Tensor student, Tensor[] teachers, Tensor? labels, Tensor? fixed_weights, "
      "Tensor? teacher_stats, float temperature, float concentration, float prior_weight, "
      "float hard_label_weight, int weight_mode, float weight_temperature, int ignore_index, "
      "bool check_finite, Tensor? grad_scale=None) -> (Tensor loss, Tensor grad, "
      "Tensor weights, Tensor resp, "
      "Tensor entropy, Tensor prior, Tensor ce)");
  m.def(
      "multi_teacher_kd_fwd(Tensor student, Tensor[] teachers, Tensor? labels, "
      "Tensor? fixed_weights, int divergence, float beta, float temperature, int weight_mode, "
      "float weight_temperature, float hard_label_weight, float soft_label_weight, "
      "float soft_scale, int ignore_index, bool check_finite, Tensor? grad_scale=None) "
      "-> (Tensor loss, Tensor grad, Tensor weights)");
  m.def(
      "teacher_weights(Tensor[] teachers, int weight_mode, float weight_temperature, "
      "bool check_finite) -> (Tensor weights, Tensor entropy)");
  m.def(
      "teacher_stats(Tensor[] teachers, float temperature, float concentration, "
      "float weight_temperature, bool check_finite) -> Tensor");
  m.def("scale_grad(Tensor grad, Tensor grad_rows) -> Tensor");
  // lgamma(1 + x) with the kernels' vectorised implementation, for accuracy tests.
  m.def("lgamma1p(Tensor x) -> Tensor");
}

TORCH_LIBRARY_IMPL(mtbkd_C, CPU, m) {
  m.impl("mtbkd_loss_fwd", &mtbkd::mtbkd_loss_fwd_cpu);
  m.impl("multi_teacher_kd_fwd", &mtbkd::multi_teacher_kd_fwd_cpu);
  m.impl("teacher_weights", &mtbkd::teacher_weights_cpu);
  m.impl("teacher_stats", &mtbkd::teacher_stats_cpu);
  m.impl("scale_grad", &mtbkd::scale_grad_cpu);
  m.impl("lgamma1p", &mtbkd::lgamma1p_cpu);
}
