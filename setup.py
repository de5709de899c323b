"""Builds ``mtbkd._C``: the C++ CPU kernels (always), the CUDA kernels (with a CUDA torch + nvcc).

Install with ``pip install --no-build-isolation -e .`` so the extension compiles against the torch
already in the environment (an isolated build would download another torch).
Environment: ``MTBKD_CPU_FLAGS`` overrides the CPU code-generation flags (default ``-march=native``,
since the extension is always compiled on the machine that runs it); ``MTBKD_NO_CUDA=1`` skips CUDA;
``TORCH_CUDA_ARCH_LIST`` picks the GPU targets (default: the visible GPUs, else ``8.0;9.0``);
``MTBKD_DEBUG_INFO=1`` keeps the debug information (``-g``) that Python's own compiler flags ask
for, which the build otherwise drops (``-g0``): with torch's headers it doubled the C++ compile
time (about 200 s of CPU time against 100 s) for an extension that is optimised with ``-O3``.
"""

import glob
import os
import shlex

from setuptools import setup

try:
    from torch.utils import cpp_extension
except ImportError as exc:  # an isolated build environment has no torch
    raise SystemExit(
        "mtbkd compiles against the torch already installed: install torch first, then run "
        "`pip install --no-build-isolation -e .`"
    ) from exc

ROOT = os.path.dirname(os.path.abspath(__file__))


def _rel(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


cpu_flags = shlex.split(os.environ.get("MTBKD_CPU_FLAGS", "-march=native"))
sources = _rel("csrc/*.cpp") + _rel("csrc/cpu/*.cpp")
# after Python's CFLAGS on the command line, so -g0 overrides their -g
debug_info = [] if os.environ.get("MTBKD_DEBUG_INFO") == "1" else ["-g0"]
cxx = ["-O3", "-std=c++17", "-fopenmp", *debug_info, *cpu_flags]
define_macros = []
with_cuda = (
    os.environ.get("MTBKD_NO_CUDA") != "1"
    and cpp_extension.CUDA_HOME is not None
    and __import__("torch").version.cuda is not None
)
if with_cuda:
    import torch

    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        # torch derives the targets from the visible GPUs; with none (a build host, a CI runner)
        # its list is empty and the build fails with an IndexError: build for A100 and H100/H200
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    # nvcc compiles the framework-free kernels (*.cu); the torch-facing wrappers in csrc/cuda/*.cpp
    # (argument checks, allocation, TORCH_LIBRARY_IMPL) are host code for the C++ compiler.
    sources += _rel("csrc/cuda/*.cu") + _rel("csrc/cuda/*.cpp")
    define_macros.append(("MTBKD_WITH_CUDA", "1"))
    Ext = cpp_extension.CUDAExtension
    # No --use_fast_math: it turns every expf/logf/sinf and division into its approximation, and
    # the sampling kernels' softplus, sigmoid and Box-Muller normals then missed the CPU and the
    # reference by 15 float32 ulps and more (measured on an H200). The loss kernels' hot loops
    # call the fast intrinsics explicitly (loss_device.cuh). Denormals are kept (-ftz=false, also
    # nvcc's default): a nearly one-hot teacher's entropy can be a float32 denormal (flushed to 0
    # it would switch the entropy weights to 1/K).
    nvcc = ["-O3", "-std=c++17", "-ftz=false", "-lineinfo"]
    extra = {"cxx": cxx, "nvcc": nvcc}
else:
    Ext = cpp_extension.CppExtension
    extra = {"cxx": cxx}

# The wheel's _C is built against this torch; its C++ interface is not stable across versions, so
# the wheel asks for the same one (a public version: a local +cpu / +cu130 tag is not required).
TORCH_PIN = "torch==" + __import__("torch").__version__.split("+")[0]
# the other runtime dependencies (tests/test_packaging.py reads this list)
RUNTIME = ["numpy", "safetensors", "tqdm"]

setup(
    install_requires=[TORCH_PIN, *RUNTIME],
    ext_modules=[
        Ext(
            name="mtbkd._C",
            sources=sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=define_macros,
            extra_compile_args=extra,
            extra_link_args=["-fopenmp"],
        )
    ],
    # ninja is BuildExtension's default (without it, torch falls back to a serial build);
    # with_options(use_ninja=True) would pass use_ninja to setuptools' Command, which
    # setuptools 77.0.x rejects (TypeError: unexpected keyword argument 'use_ninja'; fixed in 78)
    cmdclass={"build_ext": cpp_extension.BuildExtension},
)
