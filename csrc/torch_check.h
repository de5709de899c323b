// Argument checks of the torch-facing wrappers, with messages formatted without iostreams.
//
// TORCH_CHECK(cond, "got ", n) formats its message with a std::ostringstream instantiated in the
// extension itself. A toolchain that links a static copy of libstdc++ into the extension (seen on
// a GPU machine: Python 3.12, torch 2.11, CUDA 13; mtbkd/_C held ostream::_M_insert<long> and the
// locale caches) leaves that copy's numeric formatting reading locale state it never set up: the
// first check that failed with a number in its message killed the process (SIGSEGV) instead of
// raising. MTBKD_CHECK* build the message from std::to_string / snprintf (the C library) and give
// TORCH_CHECK one std::string, which it passes through untouched; the text is the same as
// TORCH_CHECK's (%g is iostream's default float format; sizes print as [2, 3]).
#pragma once

#include <ATen/ATen.h>

#include <cstdio>
#include <optional>
#include <string>
#include <type_traits>

namespace mtbkd {
namespace check_detail {

inline void append(std::string& s, const char* x) { s += x; }
inline void append(std::string& s, const std::string& x) { s += x; }
inline void append(std::string& s, bool x) { s += x ? "1" : "0"; }  // iostream without boolalpha
inline void append(std::string& s, char x) { s += x; }
inline void append(std::string& s, c10::ScalarType x) { s += c10::toString(x); }
inline void append(std::string& s, const c10::Device& x) { s += x.str(); }
inline void append(std::string& s, c10::IntArrayRef x) {
  s += '[';
  for (size_t i = 0; i < x.size(); ++i) {
    if (i > 0) s += ", ";
    s += std::to_string(x[i]);
  }
  s += ']';
}
template <class T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
void append(std::string& s, T x) {
  s += std::to_string(x);
}
template <class T, std::enable_if_t<std::is_floating_point_v<T>, int> = 0>
void append(std::string& s, T x) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g", static_cast<double>(x));
  s += buf;
}

}  // namespace check_detail

template <class... Args>
std::string check_message(const Args&... args) {
  std::string s;
  (check_detail::append(s, args), ...);
  return s;
}

}  // namespace mtbkd

#define MTBKD_CHECK(cond, ...) TORCH_CHECK(cond, ::mtbkd::check_message(__VA_ARGS__))
#define MTBKD_CHECK_VALUE(cond, ...) TORCH_CHECK_VALUE(cond, ::mtbkd::check_message(__VA_ARGS__))
#define MTBKD_CHECK_TYPE(cond, ...) TORCH_CHECK_TYPE(cond, ::mtbkd::check_message(__VA_ARGS__))

namespace mtbkd {

// The optional grad_scale argument of the loss ops (the factor the op folds into its gradient):
// one floating-point element on the student's device, returned as a contiguous [1] tensor of the
// accumulation dtype `acc`, or an undefined tensor when absent. Its value is not read here.
inline at::Tensor grad_scale_arg(const std::optional<at::Tensor>& grad_scale,
                                 const at::Tensor& student, at::ScalarType acc) {
  if (!grad_scale.has_value()) return at::Tensor();
  const at::Tensor& s = *grad_scale;
  MTBKD_CHECK_VALUE(s.numel() == 1, "grad_scale must hold one element, got shape ", s.sizes());
  MTBKD_CHECK_TYPE(s.is_floating_point(), "grad_scale must be a floating-point tensor, got ",
                   s.scalar_type());
  MTBKD_CHECK_VALUE(s.device() == student.device(), "grad_scale must be on the student's device (",
                    student.device(), "), got ", s.device());
  return s.reshape({1}).to(acc).contiguous();
}

}  // namespace mtbkd
