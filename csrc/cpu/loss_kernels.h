// CPU kernels of the fused multi-teacher losses (MATH.md sections 1-3): plain parameter structs
// and raw pointers; csrc/ops.cpp does every check, allocation and dtype dispatch.
//
// T is the storage dtype of the logits and of the gradient (float, double, c10::BFloat16,
// c10::Half); A is the accumulation dtype (double for double, float otherwise). All arrays are
// contiguous: student [N, V], teachers K pointers to [N, V], labels [N] (int64), fixed weights
// [K, N], cached teacher statistics [K, N, 4], per-row outputs [N], per-teacher outputs [K, N].
#pragma once

#include <stdint.h>

namespace mtbkd {
namespace cpu {

// What the kernels found wrong with the data; ops.cpp turns it into a ValueError after the
// parallel loop. Rows are the first offending row seen (-1: none).
struct KernelStatus {
  int64_t bad_label_row = -1;
  int64_t bad_label_value = 0;
  int64_t nonfinite_student_row = -1;
  int64_t nonfinite_teacher_row = -1;
};

template <class T, class A>
struct LossParams {
  int64_t N = 0;
  int64_t V = 0;
  int K = 0;
  const T* student = nullptr;
  const T* const* teachers = nullptr;
  const int64_t* labels = nullptr;   // nullptr: no hard labels, every row counts
  int64_t ignore_index = -100;
  const A* fixed_weights = nullptr;  // [K, N], used when weight_mode == 2
  const A* teacher_stats = nullptr;  // [K, N, 4] cache (MT-BKD only), or nullptr
  int weight_mode = 0;               // 0 entropy, 1 uniform, 2 fixed
  double temperature = 1.0;
  double weight_temperature = 1.0;
  double hard_label_weight = 0.0;
  // MT-BKD (section 2)
  double concentration = 5.0;
  double prior_weight = 0.02;
  // weighted-sum KD (section 3)
  int divergence = 0;  // 0 forward KL, 1 reverse KL, 2 JSD
  double beta = 0.5;
  double one_m_beta = 0.5;  // 1 - beta, from the host in double (float32 loses digits as beta -> 1)
  double soft_coef = 1.0;  // soft_label_weight * soft_scale
  // Multiplies the gradient (not the loss): the op's grad_scale, folded into the gradient's
  // coefficients so a reduced-precision gradient is rounded once, already scaled.
  double grad_scale = 1.0;
  bool check_finite = true;
  // outputs (per-row / per-teacher ones may be nullptr where an op does not return them)
  A* loss = nullptr;
  T* grad = nullptr;
  A* weights = nullptr;
  A* resp = nullptr;
  A* entropy = nullptr;
  A* prior = nullptr;
  A* ce = nullptr;
};

// MATH.md section 2: loss, grad, weights, responsibilities, entropy, prior, ce.
template <class T, class A>
KernelStatus mtbkd_loss_kernel(const LossParams<T, A>& p);

// MATH.md section 3: loss, grad, weights.
template <class T, class A>
KernelStatus multi_teacher_kd_kernel(const LossParams<T, A>& p);

// MATH.md section 1: weights [K, N] (mode 0 entropy, 1 uniform) and entropy [K, N].
template <class T, class A>
KernelStatus teacher_weights_kernel(int64_t N, int64_t V, int K, const T* const* teachers,
                                    int weight_mode, double weight_temperature, bool check_finite,
                                    A* weights, A* entropy);

// [K, N, 4]: lse(t / tau), lse(t / tau_w), entropy of softmax(t / tau_w),
// sum_c lgamma(1 + lam softmax(t / tau)_c).
template <class T, class A>
KernelStatus teacher_stats_kernel(int64_t N, int64_t V, int K, const T* const* teachers,
                                  double temperature, double concentration,
                                  double weight_temperature, bool check_finite, A* stats);

// out[i, :] = grad[i, :] * rows[i], in A, rounded once to T.
template <class T, class A>
void scale_grad_kernel(int64_t N, int64_t V, const T* grad, const A* rows, T* out);

// lgamma(1 + x) elementwise with the kernels' vectorised implementation (a test hook).
template <class A>
void lgamma1p_kernel(int64_t n, const A* x, A* out);

}  // namespace cpu
}  // namespace mtbkd
