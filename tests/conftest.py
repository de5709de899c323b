"""Test configuration: Triton runs in its interpreter when no GPU is present (TRITON_INTERPRET=1
must be set before triton is imported), and helpers shared by the test modules."""

import os

# Under pytest-xdist (`make test` runs `-n 2`) the workers share the machine's cores: each gets its
# share of them as OpenMP / BLAS threads, set before torch and numpy start their thread pools and
# inherited by the tests' subprocesses. Two workers of two threads each on two cores spun in
# OpenMP's barriers: half again as much CPU time, 9 minutes of wall time against 5.5 (measured on
# a busy machine). A serial run, or an OMP_NUM_THREADS of one's own, is left alone;
# tests/test_cpu_threads.py runs the C++ kernels on several threads whatever the setting.
_XDIST_THREADS = None
if os.environ.get("PYTEST_XDIST_WORKER") and "OMP_NUM_THREADS" not in os.environ:
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    _workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1)
    _XDIST_THREADS = max(1, (_cores or 1) // max(1, _workers))
    os.environ["OMP_NUM_THREADS"] = str(_XDIST_THREADS)

import pytest  # noqa: E402
import torch  # noqa: E402

if _XDIST_THREADS is not None:  # in case a plugin imported torch before this file was read
    torch.set_num_threads(_XDIST_THREADS)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _no_forced_backend(monkeypatch):
    # Tests choose backends explicitly; a developer's MTBKD_BACKEND must not leak into them.
    monkeypatch.delenv("MTBKD_BACKEND", raising=False)


@pytest.fixture
def device() -> str:
    return DEVICE
