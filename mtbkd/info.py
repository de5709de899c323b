"""``mtbkd.info()``: versions and which backends can run here, and why not."""

from __future__ import annotations

import platform

import torch


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
        "backends": {
            name: ("available" if reason is None else f"unavailable: {reason}")
            for name, reason in ops.backend_status().items()
        },
        "default_backend": {"cpu": _safe_select("cpu"), "cuda": _safe_select("cuda")},
        "unirep_weights": _unirep_status(),
    }


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
