"""The CPU kernels of the Bayesian ops have three code paths, chosen at compile time by the
instruction set (``-march=native`` unless ``MTBKD_CPU_FLAGS`` says otherwise): AVX-512, AVX2 and
portable lane loops. The suite runs only the one this machine compiles; the other two are at
least compiled here, each with the path macros it must select."""

from __future__ import annotations

import platform
import shutil
import subprocess
from pathlib import Path

import pytest
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "csrc" / "cpu" / "bayes_kernels.cpp"

# flags -> (MTBKD_SLEEF, MTBKD_AVX2): SLEEF's vector functions on both SIMD paths, the AVX2 tile
# code only where AVX-512 is absent
PATHS = {
    "-march=skylake-avx512": (True, False),
    "-mavx2 -mfma -mf16c": (True, True),
    "-march=x86-64": (False, False),
}


@pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64"),
    reason=f"the three paths are x86-64 code; this machine is {platform.machine()}",
)
@pytest.mark.parametrize("flags", list(PATHS))
def test_every_cpu_path_of_the_bayesian_kernels_compiles(flags):
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("needs a C++ compiler")
    base = [cxx, "-std=c++17", "-w", *flags.split(), f"-I{ROOT / 'csrc'}"]
    base += [f"-I{p}" for p in cpp_extension.include_paths()]
    macros = subprocess.run(
        [*base, "-E", "-dM", str(SOURCE)], capture_output=True, text=True, timeout=120
    )
    assert macros.returncode == 0, macros.stderr[-4000:]
    lines = macros.stdout.splitlines()
    defined = {line.split()[1] for line in lines if line.startswith("#define")}
    sleef, avx2 = PATHS[flags]
    assert ("MTBKD_SLEEF" in defined) == sleef
    assert ("MTBKD_AVX2" in defined) == avx2
    proc = subprocess.run(
        [*base, "-O1", "-fsyntax-only", str(SOURCE)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
