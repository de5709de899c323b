// CUDA kernels of the fused multi-teacher losses (MATH.md sections 1-3): framework-free.
//
// Each launcher takes one plain params struct (raw pointers, sizes, the loss constants) and a
// stream, checks nothing that needs the host (the torch wrapper loss_ops_cuda.cpp does the argument
// checks), launches without synchronising and returns cudaGetLastError(). One thread block handles
// one row: a statistics pass with the K + 1 online softmaxes, the lgamma pass (MT-BKD without
// cached teacher statistics), the JSD divergence pass, then the loss + gradient pass; all per-row
// reductions stay in the block (no N x V buffer).
//
// Element types: float32, float64, bfloat16, float16 logits; accumulation in float32 (float64 for
// float64 logits). Per-row outputs (`loss`, `weights`, ...) use the accumulation type; `grad` the
// logits' type, rounded once (round to nearest even).
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

namespace mtbkd {
namespace cuda {

// Teachers are passed as separate pointers (no stacking copy); the wrapper rejects more.
constexpr int kMaxTeachers = 8;

enum class DType : int { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };

// Bits of the per-row status word (0 = fine), the same as the Triton and CPU kernels report.
constexpr int32_t kStatusLabel = 1;    // label outside [0, V) and not ignore_index
constexpr int32_t kStatusStudent = 2;  // NaN/inf student logit in an unmasked row
constexpr int32_t kStatusTeacher = 4;  // NaN/inf teacher logit in an unmasked row

struct TeacherPtrs {
  const void* ptr[kMaxTeachers];
};

// mtbkd::mtbkd_loss_fwd (MATH.md section 2).
struct MTBKDParams {
  DType dtype;
  int64_t n;  // rows
  int64_t v;  // classes
  int k;      // teachers, 1..kMaxTeachers
  const void* student;            // [N, V] dtype
  TeacherPtrs teachers;           // K x [N, V] dtype, contiguous
  const int64_t* labels;          // [N] or nullptr
  const void* fixed_weights;      // [K, N] acc, or nullptr (weight_mode != fixed)
  const void* teacher_stats;      // [K, N, 4] acc, or nullptr
  void* loss;                     // [N] acc
  void* grad;                     // [N, V] dtype
  void* weights;                  // [K, N] acc
  void* resp;                     // [K, N] acc
  void* entropy;                  // [K, N] acc
  void* prior;                    // [N] acc
  void* ce;                       // [N] acc
  int32_t* status;                // [N] or nullptr (no labels and no finiteness check)
  const void* grad_scale;         // [1] acc, or nullptr (1): multiplies the gradient, not the loss
  double inv_tau, inv_tau_w, lam, prior_weight, hard_label_weight, lgamma_v_lam;
  int weight_mode;                // 0 entropy, 1 uniform, 2 fixed
  int64_t ignore_index;
  bool check_finite;
};

// mtbkd::multi_teacher_kd_fwd (MATH.md section 3).
struct KDParams {
  DType dtype;
  int64_t n, v;
  int k;
  const void* student;
  TeacherPtrs teachers;
  const int64_t* labels;
  const void* fixed_weights;
  void* loss;     // [N] acc
  void* grad;     // [N, V] dtype
  void* weights;  // [K, N] acc
  int32_t* status;
  const void* grad_scale;  // [1] acc, or nullptr (1): multiplies the gradient, not the loss
  int divergence;  // 0 forward KL, 1 reverse KL, 2 JSD with 0 < beta < 1 (endpoints mapped)
  double inv_tau, inv_tau_w, beta, one_m_beta, log_beta, log_1mbeta, hard_label_weight, soft_weight;
  int weight_mode;
  int64_t ignore_index;
  bool check_finite;
};

// mtbkd::teacher_weights (stats == false) and mtbkd::teacher_stats (stats == true).
struct TeacherParams {
  DType dtype;
  int64_t n, v;
  int k;
  TeacherPtrs teachers;
  bool stats;
  void* weights;  // [K, N] acc (weights mode)
  void* entropy;  // [K, N] acc (weights mode)
  void* out;      // [K, N, 4] acc (stats mode)
  int32_t* status;
  double inv_tau, inv_tau_w, lam;
  int weight_mode;
  bool check_finite;
};

// mtbkd::scale_grad: out = grad * rows[:, None] in the rows' type, rounded once to grad's type.
struct ScaleGradParams {
  DType dtype;  // of grad and out
  bool rows_double;
  int64_t n, v;
  const void* grad;
  const void* rows;
  void* out;
};

// lgamma(1 + x) elementwise (float32 or float64), for accuracy tests of the device function.
struct Lgamma1pParams {
  bool is_double;
  int64_t numel;
  const void* x;
  void* out;
};

cudaError_t launch_mtbkd_loss_fwd(const MTBKDParams& p, cudaStream_t stream);
cudaError_t launch_multi_teacher_kd_fwd(const KDParams& p, cudaStream_t stream);
cudaError_t launch_teacher_stats(const TeacherParams& p, cudaStream_t stream);
cudaError_t launch_scale_grad(const ScaleGradParams& p, cudaStream_t stream);
cudaError_t launch_lgamma1p(const Lgamma1pParams& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace mtbkd
