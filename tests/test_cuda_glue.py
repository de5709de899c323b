"""The torch-facing CUDA wrappers (host C++ that setup.py compiles only in CUDA builds) compile
here too, without a CUDA torch: ``g++ -fsyntax-only -DMTBKD_WITH_CUDA`` against this torch's
headers and the CUDA toolkit's. ``make cmake-check`` compiles the kernels themselves with nvcc; a
GPU machine builds and runs both (``bench/gpu_check.sh``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parents[1]
GLUE = ["csrc/bayes_ops.cpp"]
GLUE += sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("csrc/cuda/*.cpp"))


def _cuda_include() -> str | None:
    for home in (cpp_extension.CUDA_HOME, os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and Path(home, "include", "cuda_runtime_api.h").is_file():
            return str(Path(home, "include"))
    return None


def test_the_cuda_wrappers_are_host_code_and_checks_format_without_iostreams():
    # nvcc compiles only the framework-free kernels (params struct, launcher); the wrappers'
    # checks are MTBKD_CHECK* (csrc/torch_check.h): a TORCH_CHECK whose message held a number
    # crashed the process on a GPU machine whose toolchain linked a static libstdc++ copy.
    assert GLUE[1:], "csrc/cuda/ holds no host-compiled wrapper"
    for path in ROOT.glob("csrc/cuda/*.cu"):
        assert "TORCH_CHECK" not in path.read_text(), f"{path.name}: checks belong in the .cpp"
    for path in [*ROOT.glob("csrc/*.cpp"), *ROOT.glob("csrc/cuda/*.cpp")]:
        text = path.read_text()
        assert "TORCH_CHECK" not in text, f"{path.name}: use MTBKD_CHECK* (csrc/torch_check.h)"


@pytest.mark.parametrize("source", GLUE)
def test_cuda_wrapper_compiles_without_a_cuda_torch(source, tmp_path):
    cxx = shutil.which("c++") or shutil.which("g++")
    cuda_include = _cuda_include()
    if cxx is None or cuda_include is None:
        pytest.skip("needs a C++ compiler and the CUDA toolkit's headers")
    # A CPU wheel ships c10/cuda's headers but not the one its CMake build generates; its single
    # macro only marks the shared-library build.
    shim = tmp_path / "c10" / "cuda" / "impl"
    shim.mkdir(parents=True)
    (shim / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    includes = [tmp_path, *cpp_extension.include_paths(), cuda_include, ROOT / "csrc"]
    cmd = [cxx, "-fsyntax-only", "-std=c++17", "-w", "-DMTBKD_WITH_CUDA"]
    cmd += [f"-I{p}" for p in includes] + [str(ROOT / source)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
