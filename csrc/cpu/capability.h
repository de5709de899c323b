// Selects ATen's SIMD specialisations (at::vec::Vectorized) for this translation unit from what the
// compiler targets: setup.py passes -march=native (MTBKD_CPU_FLAGS overrides it), so __AVX512F__ /
// __AVX2__ say which instructions are safe. Include before any ATen header.
//
// The inline namespace at::vec::CPU_CAPABILITY is named after the capability (AVX512 / AVX2), as in
// ATen's own per-capability kernels, so translation units compiled with and without this header
// never share an inline function name with different bodies (no ODR clash inside mtbkd._C).
#pragma once

#if !defined(CPU_CAPABILITY_AVX512) && !defined(CPU_CAPABILITY_AVX2) && \
    !defined(CPU_CAPABILITY_DEFAULT)
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && \
    defined(__AVX512VL__) && defined(__FMA__)
#define CPU_CAPABILITY_AVX512 1
#ifndef CPU_CAPABILITY
#define CPU_CAPABILITY AVX512
#endif
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define CPU_CAPABILITY_AVX2 1
#ifndef CPU_CAPABILITY
#define CPU_CAPABILITY AVX2
#endif
#endif
#endif
