"""Source generation and build of the host emulation of the CUDA kernels (``emu.h``), shared by
``tests/test_cuda_emulated.py`` (the loss kernels) and ``tests/test_cuda_emulated_bayes.py`` (the
Bayesian kernels); see the former's docstring for the approach and its limits.

A ``.cu`` file becomes host C++ by two textual edits only: every ``__shared__`` array becomes a
function-``static`` one (one block runs at a time), and every launch
``kernel<<<grid, block, 0, stream>>>(args);`` becomes
``emu_launch(grid, block, [&] { kernel(args); });``. Anything the edits cannot handle raises a
``GeneratorError`` naming the file. :func:`build_library` compiles the generated units with a
harness (``extern "C"`` entry points) into one shared library per content hash of all of it
(sources, headers, harness, flags, compiler) under ``build/cuda-emu/<hash>/`` (git-ignored).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EMU = ROOT / "tests" / "cuda_emu"
CUDA = ROOT / "csrc" / "cuda"
CXXFLAGS = ["-std=c++20", "-O1", "-pthread", "-fPIC", "-w"]
BUILD = ROOT / "build" / "cuda-emu"

# ---- source generation ---------------------------------------------------------------------------

_LAUNCH = re.compile(
    r"(?P<kernel>\b\w+(?:<[^<>;{}]*>)?)\s*<<<(?P<config>[^;]*?)>>>\s*\((?P<args>.*?)\)\s*;", re.S
)
_SHARED = re.compile(r"\b__shared__\s+(?P<align>(?:alignas\s*\([^()]*\)\s*)?)")
_GLOBAL = re.compile(r"__global__\s+void\s+(?:__launch_bounds__\s*\([^()]*\)\s*)?(\w+)\s*\(")


class GeneratorError(RuntimeError):
    pass


def _split_top(text: str) -> list[str]:
    """Split at the commas outside parentheses."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return [*parts, cur.strip()]


def emulation_source(name: str, text: str) -> str:
    """Host C++ of one .cu file: static shared arrays, launches through emu_launch."""
    if re.search(r"\bextern\s+__shared__", text):
        raise GeneratorError(f"csrc/cuda/{name}: dynamic (extern) shared memory is not emulated")
    launched: set[str] = set()

    def launch(m: re.Match) -> str:
        config = _split_top(m.group("config"))
        if not 2 <= len(config) <= 4 or (len(config) > 2 and config[2] != "0"):
            raise GeneratorError(
                f"csrc/cuda/{name}: launch of {m.group('kernel')} with <<<{m.group('config')}>>>:"
                " only <<<grid, block[, 0[, stream]]>>> is emulated"
            )
        launched.add(m.group("kernel").split("<")[0])
        return f"emu_launch({config[0]}, {config[1]}, [&] {{ {m.group('kernel')}({m.group('args')}); }});"  # noqa: E501

    out, n_launch = _LAUNCH.subn(launch, text)
    out, n_shared = _SHARED.subn(lambda m: m.group("align") + "static ", out)
    if n_launch == 0:
        raise GeneratorError(f"csrc/cuda/{name}: no kernel<<<...>>>(...); launch found")
    if n_shared == 0:
        raise GeneratorError(f"csrc/cuda/{name}: no __shared__ array found")
    for token in ("<<<", ">>>", "__shared__"):
        if token in out:
            line = out[: out.index(token)].count("\n") + 1
            raise GeneratorError(f"csrc/cuda/{name}:{line}: {token} left after the rewrite")
    missing = set(_GLOBAL.findall(text)) - launched
    if missing:
        raise GeneratorError(f"csrc/cuda/{name}: __global__ kernels never launched: {missing}")
    return f'#line 1 "{CUDA / name}"\n' + out


def generate(sources: Sequence[str]) -> dict[str, str]:
    """The host C++ of each of the named files of csrc/cuda."""
    return {name: emulation_source(name, (CUDA / name).read_text()) for name in sources}


# ---- build ---------------------------------------------------------------------------------------

_PROBE = """#include <ucontext.h>
#include <cmath>
inline int probe_v = 1;
int main() { _Float16 h = static_cast<_Float16>(1.5f); ucontext_t c; getcontext(&c);
  return static_cast<float>(h) == 1.5f && std::isfinite(1.0) ? 0 : probe_v; }
"""


def compiler() -> tuple[str, str]:
    """g++ and its version line, or a skip naming what is missing."""
    cxx = os.environ.get("MTBKD_EMU_CXX") or shutil.which("g++")
    if cxx is None:
        pytest.skip("the CUDA emulation needs g++ (none on PATH)")
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    return cxx, version.splitlines()[0] if version else "?"


def build_library(
    tmp: Path, generated: Mapping[str, str], harness: Path, defines: Sequence[str] = ()
) -> Path:
    """``libemu.so`` of the generated units (``{name.cu: host C++}``) and ``harness``, compiled
    with ``emu.h`` force-included and ``-D`` of each of ``defines``; built once per content hash
    (a lock file serialises pytest-xdist workers), the 6 most recent other builds kept."""
    cxx, version = compiler()
    includes = [EMU / "shim", CUDA, ROOT / "csrc"]
    inputs = [EMU / "emu.h", harness, *sorted((EMU / "shim").glob("*.h"))]
    inputs += sorted(CUDA.glob("*.cuh")) + sorted((ROOT / "csrc").glob("*.h"))
    flags = [*CXXFLAGS, *(f"-D{d}" for d in defines)]
    h = hashlib.sha256(f"{version}\n{flags}\n".encode())
    for name in sorted(generated):
        h.update(f"{name}\n{generated[name]}".encode())
    for path in inputs:
        h.update(f"{path.parent.name}/{path.name}\n".encode() + path.read_bytes())
    out = BUILD / h.hexdigest()[:16]
    lib = out / "libemu.so"
    BUILD.mkdir(parents=True, exist_ok=True)
    with open(BUILD / ".lock", "w") as lock:  # pytest-xdist workers build it once
        fcntl.flock(lock, fcntl.LOCK_EX)
        if lib.is_file():
            return lib
        probe = tmp / "probe.cpp"
        probe.write_text(_PROBE)
        proc = subprocess.run([cxx, *CXXFLAGS, str(probe), "-o", str(tmp / "probe")],
                              capture_output=True, text=True)  # fmt: skip
        if proc.returncode != 0:
            pytest.skip(
                f"{version} cannot build the CUDA emulation (needs C++20, <ucontext.h> and"
                f" _Float16: GCC >= 12 on x86-64): {proc.stderr.strip()[-300:]}"
            )
        work = tmp / "build"
        work.mkdir()
        units = []
        for name, text in generated.items():
            (work / name.replace(".cu", ".cpp")).write_text(text)
            units.append(work / name.replace(".cu", ".cpp"))
        units.append(harness)
        cflags = [*flags, "-include", str(EMU / "emu.h")] + [f"-I{p}" for p in includes]
        t0 = time.perf_counter()
        procs = [
            subprocess.Popen(
                [cxx, *cflags, "-c", str(u), "-o", str(work / f"{u.stem}.o")],
                stderr=subprocess.PIPE,
                text=True,
            )  # fmt: skip
            for u in units
        ]
        errors = [(u.name, p.communicate()[1]) for u, p in zip(units, procs) if p.wait() != 0]
        assert not errors, "\n".join(f"{n}:\n{e[-4000:]}" for n, e in errors)
        objs = [str(work / f"{u.stem}.o") for u in units]
        proc = subprocess.run([cxx, "-shared", "-pthread", *objs, "-o", str(work / "libemu.so")],
                              capture_output=True, text=True)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-4000:]
        out.mkdir(exist_ok=True)
        os.replace(work / "libemu.so", lib)
        (out / "build-seconds.txt").write_text(f"{time.perf_counter() - t0:.1f}\n")
        for name, text in generated.items():  # for reading compiler errors and gdb sessions
            (out / name.replace(".cu", ".cpp")).write_text(text)
        stale = sorted((p for p in BUILD.iterdir() if p.is_dir() and p != out),
                       key=lambda p: p.stat().st_mtime)  # fmt: skip
        for old in stale[:-6]:
            shutil.rmtree(old, ignore_errors=True)
    return lib
