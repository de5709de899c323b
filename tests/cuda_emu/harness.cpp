// extern "C" entry points of the emulated CUDA kernels for tests/test_cuda_emulated.py (ctypes).
// Each fills the kernel's params struct from plain arguments exactly as the torch wrappers of
// csrc/cuda/loss_ops_cuda.cpp do (derived constants included) and returns the launcher's
// cudaError_t. Shapes, dtypes and argument checks are the caller's (the Python side mirrors the
// wrappers: contiguous tensors, outputs in the accumulation type, status only with labels or
// check_finite).
#include <math.h>

#include "loss_kernels.cuh"

using namespace mtbkd::cuda;

namespace {
TeacherPtrs teacher_ptrs(const void* const* teachers, int k) {
  TeacherPtrs t{};
  for (int i = 0; i < kMaxTeachers; ++i) t.ptr[i] = teachers[i < k ? i : 0];
  return t;
}
}  // namespace

extern "C" {

int emu_mtbkd_loss_fwd(int dtype, int64_t n, int64_t v, int k, const void* student,
                       const void* const* teachers, const int64_t* labels,
                       const void* fixed_weights, const void* teacher_stats, void* loss,
                       void* grad, void* weights, void* resp, void* entropy, void* prior, void* ce,
                       int32_t* status, const void* grad_scale, double temperature,
                       double concentration, double prior_weight, double hard_label_weight,
                       int weight_mode, double weight_temperature, int64_t ignore_index,
                       int check_finite) {
  MTBKDParams p{};
  p.dtype = DType(dtype);
  p.n = n;
  p.v = v;
  p.k = k;
  p.student = student;
  p.teachers = teacher_ptrs(teachers, k);
  p.labels = labels;
  p.fixed_weights = fixed_weights;
  p.teacher_stats = teacher_stats;
  p.loss = loss;
  p.grad = grad;
  p.weights = weights;
  p.resp = resp;
  p.entropy = entropy;
  p.prior = prior;
  p.ce = ce;
  p.status = status;
  p.grad_scale = grad_scale;
  p.inv_tau = 1.0 / temperature;
  p.inv_tau_w = 1.0 / weight_temperature;
  p.lam = concentration;
  p.prior_weight = prior_weight;
  p.hard_label_weight = hard_label_weight;
  p.lgamma_v_lam = ::lgamma(static_cast<double>(v) + concentration);
  p.weight_mode = weight_mode;
  p.ignore_index = ignore_index;
  p.check_finite = check_finite != 0;
  return launch_mtbkd_loss_fwd(p, nullptr);
}

int emu_multi_teacher_kd_fwd(int dtype, int64_t n, int64_t v, int k, const void* student,
                             const void* const* teachers, const int64_t* labels,
                             const void* fixed_weights, void* loss, void* grad, void* weights,
                             int32_t* status, const void* grad_scale, int divergence, double beta,
                             double temperature, int weight_mode, double weight_temperature,
                             double hard_label_weight, double soft_label_weight,
                             double soft_scale, int64_t ignore_index, int check_finite) {
  if (divergence == 2) {
    if (beta == 0.0) divergence = 0;
    if (beta == 1.0) divergence = 1;
  }
  KDParams p{};
  p.dtype = DType(dtype);
  p.n = n;
  p.v = v;
  p.k = k;
  p.student = student;
  p.teachers = teacher_ptrs(teachers, k);
  p.labels = labels;
  p.fixed_weights = fixed_weights;
  p.loss = loss;
  p.grad = grad;
  p.weights = weights;
  p.status = status;
  p.grad_scale = grad_scale;
  p.divergence = divergence;
  p.inv_tau = 1.0 / temperature;
  p.inv_tau_w = 1.0 / weight_temperature;
  p.beta = beta;
  p.one_m_beta = 1.0 - beta;
  p.log_beta = divergence == 2 ? ::log(beta) : 0.0;
  p.log_1mbeta = divergence == 2 ? ::log1p(-beta) : 0.0;
  p.hard_label_weight = hard_label_weight;
  p.soft_weight = soft_label_weight * soft_scale;
  p.weight_mode = weight_mode;
  p.ignore_index = ignore_index;
  p.check_finite = check_finite != 0;
  return launch_multi_teacher_kd_fwd(p, nullptr);
}

int emu_teacher_weights(int dtype, int64_t n, int64_t v, int k, const void* const* teachers,
                        int weight_mode, double weight_temperature, int check_finite,
                        void* weights, void* entropy, int32_t* status) {
  TeacherParams p{};
  p.dtype = DType(dtype);
  p.n = n;
  p.v = v;
  p.k = k;
  p.teachers = teacher_ptrs(teachers, k);
  p.check_finite = check_finite != 0;
  p.stats = false;
  p.weights = weights;
  p.entropy = entropy;
  p.out = nullptr;
  p.status = status;
  p.inv_tau = 1.0;
  p.inv_tau_w = 1.0 / weight_temperature;
  p.lam = 1.0;
  p.weight_mode = weight_mode;
  return launch_teacher_stats(p, nullptr);
}

int emu_teacher_stats(int dtype, int64_t n, int64_t v, int k, const void* const* teachers,
                      double temperature, double concentration, double weight_temperature,
                      int check_finite, void* out, int32_t* status) {
  TeacherParams p{};
  p.dtype = DType(dtype);
  p.n = n;
  p.v = v;
  p.k = k;
  p.teachers = teacher_ptrs(teachers, k);
  p.check_finite = check_finite != 0;
  p.stats = true;
  p.weights = nullptr;
  p.entropy = nullptr;
  p.out = out;
  p.status = status;
  p.inv_tau = 1.0 / temperature;
  p.inv_tau_w = 1.0 / weight_temperature;
  p.lam = concentration;
  p.weight_mode = 0;
  return launch_teacher_stats(p, nullptr);
}

int emu_scale_grad(int dtype, int rows_double, int64_t n, int64_t v, const void* grad,
                   const void* rows, void* out) {
  ScaleGradParams p{};
  p.dtype = DType(dtype);
  p.rows_double = rows_double != 0;
  p.n = n;
  p.v = v;
  p.grad = grad;
  p.rows = rows;
  p.out = out;
  return launch_scale_grad(p, nullptr);
}

int emu_lgamma1p(int is_double, int64_t numel, const void* x, void* out) {
  Lgamma1pParams p{};
  p.is_double = is_double != 0;
  p.numel = numel;
  p.x = x;
  p.out = out;
  return launch_lgamma1p(p, nullptr);
}

}  // extern "C"
