"""The ``cuda`` backend: the CUDA C++ kernels of ``mtbkd._C`` (``csrc/cuda/``).

``csrc/cuda/loss_ops_cuda.cpp`` registers CUDA implementations of the ``torch.ops.mtbkd_C.*`` ops
(``TORCH_LIBRARY_IMPL(mtbkd_C, CUDA, ...)``) whose schemas ``csrc/ops.cpp`` defines: the same
signatures and semantics as the custom ops in :mod:`mtbkd.ops`, so each implementation here only
forwards its arguments (the dispatcher picks the CUDA kernel from the tensors' device). Imported by
:func:`mtbkd.ops._load_backend` when the ``cuda`` backend is chosen; only usable in a CUDA build
(``mtbkd._C.has_cuda()``) on CUDA tensors. At most 8 teachers (``MTBKD_BACKEND=triton`` takes any
number).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mtbkd.ops import register_impl

OPS = ("mtbkd_loss_fwd", "multi_teacher_kd_fwd", "teacher_weights", "teacher_stats", "scale_grad")


def _forward(op: str) -> Callable:
    def impl(*args):
        return getattr(torch.ops.mtbkd_C, op)(*args)

    impl.__name__ = f"_cuda_{op}"
    impl.__doc__ = f"``torch.ops.mtbkd_C.{op}`` on CUDA tensors (csrc/cuda/loss_ops_cuda.cpp)."
    return impl


for _op in OPS:
    register_impl(_op, "cuda", _forward(_op))
