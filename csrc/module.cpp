// The Python module mtbkd._C. Kernels register themselves as torch.ops.mtbkd_C.* (TORCH_LIBRARY
// fragments in ops.cpp and the other API files); this file only answers build questions.
// cpu/capability.h first: it defines the CPU_CAPABILITY_* macros the loss kernels are compiled
// with (from the compiler target), so cpu_capability() below reports what they really use.
#include "cpu/capability.h"

// pybind11 alone, not <torch/extension.h>: nothing here touches a tensor, and torch's whole C++
// API made this file the slowest of the build (45 s of the extension's 100 s of compiling,
// measured on one core; 9 s with pybind11 alone).
#include <pybind11/pybind11.h>

#include <string>

PYBIND11_MODULE(_C, m) {
  m.doc() = "mtbkd native kernels (registered as torch.ops.mtbkd_C.*)";
  m.def("has_cuda", []() {
#ifdef MTBKD_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
  m.def("cpu_capability", []() {
#if defined(CPU_CAPABILITY_AVX512)
    return std::string("avx512");
#elif defined(CPU_CAPABILITY_AVX2)
    return std::string("avx2");
#else
    return std::string("default");
#endif
  });
}
