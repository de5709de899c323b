"""``mtbkd.info()``: versions and which backends can run here, and why not."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

_THP_FILE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def info() -> dict:
    """Versions of mtbkd, torch, triton and Python; every backend's availability with the reason."""
    from mtbkd import __version__, ops

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cpu_capability = None
    if ops._C is not None:
        cpu_capability = ops._C.cpu_capability()
    return {
        "mtbkd": __version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "python": platform.python_version(),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "cpu_capability": cpu_capability,
        "cpu_huge_pages": huge_pages_status(),
        "backends": {
            name: ("available" if reason is None else f"unavailable: {reason}")
            for name, reason in ops.backend_status().items()
        },
        "default_backend": {"cpu": _safe_select("cpu"), "cuda": _safe_select("cuda")},
        "unirep_weights": _unirep_status(),
    }


def huge_pages_status(thp_file: Path = _THP_FILE, environ=None) -> str:
    """Whether PyTorch backs large CPU tensors with 2 MB pages (transparent huge pages).

    A fused loss allocates its ``[N, V]`` gradient once a step; with 4 KB pages the first touch
    of each page is a fault, which on a virtual machine is a large part of a step's time.
    PyTorch asks for huge pages when ``THP_MEM_ALLOC_ENABLE=1`` is set before it starts (it reads
    the variable once) and the kernel's setting is ``madvise``; with ``always`` the kernel uses
    them anyway, with ``never`` not at all. ``bench/page_faults.py`` measured loss steps
    1.2-1.5x faster with them on a 2-core virtual machine, and once a bfloat16 MT-BKD step
    slower, which a later run did not reproduce (docs/BENCHMARKS.md): measure on your machine.
    """
    environ = os.environ if environ is None else environ
    try:
        text = thp_file.read_text()
    except OSError:
        return "n/a (no transparent huge pages here)"
    mode = text[text.index("[") + 1 : text.index("]")] if "[" in text and "]" in text else "?"
    if mode == "always":
        return "on (kernel THP: always)"
    if mode == "madvise":
        if environ.get("THP_MEM_ALLOC_ENABLE") == "1":
            return "on (THP_MEM_ALLOC_ENABLE=1, kernel THP: madvise)"
        return (
            "off (kernel THP: madvise; THP_MEM_ALLOC_ENABLE=1 before Python starts turns them on "
            "for large tensors: measure with bench/page_faults.py first)"
        )
    return f"off (kernel THP: {mode})"


def _unirep_status() -> str:
    """Whether DeepLoc's default student features (UniRep embeddings) can be computed here."""
    from mtbkd import unirep

    try:
        return f"available ({unirep.weights_path(1900).parent.parent})"
    except (ImportError, FileNotFoundError) as exc:
        return f"unavailable: {exc}"


def _safe_select(device: str) -> str:
    from mtbkd import ops

    if device == "cuda" and not torch.cuda.is_available():
        return "n/a (no CUDA device)"
    try:
        return ops.select_backend(torch.device(device))
    except (RuntimeError, ValueError) as exc:
        return f"error: {exc}"


def format_info(d: dict) -> str:
    lines = [f"{k}: {v}" for k, v in d.items() if k not in ("backends", "default_backend")]
    lines.append("backends:")
    lines += [f"  {k}: {v}" for k, v in d["backends"].items()]
    lines.append(
        "default backend: " + ", ".join(f"{k} -> {v}" for k, v in d["default_backend"].items())
    )
    return "\n".join(lines)
