"""Custom ops (``torch.ops.mtbkd.*``) and the choice of backend behind them.

Every fused operation is one ``torch.library.custom_op`` with a fake implementation (so
``torch.compile(fullgraph=True)`` traces through it) and, where differentiable, an autograd
formula. The op body picks a backend at run time:

* ``reference``: :mod:`mtbkd.reference` through autograd; always available, any device.
* ``cpu``: the C++ kernels of ``mtbkd._C`` (``torch.ops.mtbkd_C.*``), CPU tensors.
* ``triton``: :mod:`mtbkd.kernels`, CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``.
* ``cuda``: the CUDA C++ kernels of ``mtbkd._C``, CUDA tensors of a CUDA build.

``MTBKD_BACKEND=<name>`` forces one; a forced backend that cannot run on the given tensors raises
``RuntimeError`` instead of silently falling back. Backends register their implementation of an op
with :func:`register_impl`; all implementations of an op share the op's signature and semantics
(canonical shapes: student ``[N, V]`` contiguous, teachers a list of K contiguous ``[N, V]`` of the
student's dtype, labels ``[N]`` int64 or None, fixed weights ``[K, N]`` in the accumulation dtype).
"""

from __future__ import annotations

import importlib
import math
import os
import sys
import warnings
from collections.abc import Callable
from typing import Optional

import torch
from torch import Tensor

BACKENDS = ("reference", "cpu", "triton", "cuda")

# Weight modes shared by every kernel (MATH.md section 1).
WEIGHT_MODES = {"entropy": 0, "uniform": 1, "fixed": 2}
# Divergences of the weighted-sum KD family (MATH.md section 3).
DIVERGENCES = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2}
# Columns of a teacher-statistics row (see TeacherStats): logsumexp(t/tau), logsumexp(t/tau_w),
# entropy of softmax(t/tau_w), sum_c lgamma(1 + lam * softmax(t/tau)_c).
TEACHER_STAT_COLUMNS = ("lse_tau", "lse_w", "entropy_w", "lgamma_sum")

_IMPLS: dict[str, dict[str, Callable]] = {}


def register_impl(op: str, backend: str, fn: Callable | None = None):
    """Register ``fn`` as ``backend``'s implementation of ``op`` (usable as a decorator)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")

    def deco(f: Callable) -> Callable:
        _IMPLS.setdefault(op, {})[backend] = f
        return f

    return deco(fn) if fn is not None else deco


# ----------------------------------------------------------------------------------------------
# Backend availability
# ----------------------------------------------------------------------------------------------

_C_ERROR: str | None = None
try:  # the compiled extension registers torch.ops.mtbkd_C.*
    _C = importlib.import_module("mtbkd._C")
except ImportError as exc:  # pragma: no cover - exercised only without a build
    _C = None
    _C_ERROR = (
        f"mtbkd._C could not be imported ({exc}): not built, or built for another torch; in a "
        "clone, build it with `pip install --no-build-isolation -e .`"
    )


def _triton_interpreted() -> bool:
    """Whether the Triton kernels run in the interpreter (and so on CPU tensors).

    ``triton.jit`` reads ``TRITON_INTERPRET`` when a kernel is defined: once :mod:`mtbkd.kernels`
    is imported, setting the variable no longer turns its kernels into interpreted ones.
    """
    kernels = sys.modules.get("mtbkd.kernels")
    return os.environ.get("TRITON_INTERPRET") == "1" and getattr(kernels, "INTERPRET", True)


def _triton_status() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton is not importable ({exc})"
    try:
        importlib.import_module("mtbkd.kernels")
    except Exception as exc:  # a triton of another version can fail in other ways than import
        return f"mtbkd.kernels failed to import ({type(exc).__name__}: {exc})"
    if not torch.cuda.is_available() and not _triton_interpreted():
        if os.environ.get("TRITON_INTERPRET") == "1":
            return (
                "no CUDA device, and TRITON_INTERPRET=1 was set after mtbkd.kernels was imported "
                "(set it before the first use of the triton backend)"
            )
        return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels in Triton's interpreter)"
    return None


def _cuda_status() -> str | None:
    if _C is None:
        return _C_ERROR
    if not getattr(_C, "has_cuda", lambda: False)():
        return "mtbkd._C was built without CUDA kernels (needs a CUDA build of torch and nvcc)"
    if not torch.cuda.is_available():
        return "no CUDA device"
    return None


_STATUS = {"reference": lambda: None, "cpu": lambda: _C_ERROR, "triton": _triton_status,
           "cuda": _cuda_status}  # fmt: skip


def backend_status() -> dict[str, str | None]:
    """``{backend: None if available else the reason why not}``."""
    return {name: status() for name, status in _STATUS.items()}


_FALLBACK_WARNED: set[str] = set()


def _fallback(device_type: str, why: str) -> str:
    """The reference backend, said once per device type: it is plain PyTorch, far slower and
    hungrier for memory than the fused kernels it stands in for."""
    if device_type not in _FALLBACK_WARNED:
        _FALLBACK_WARNED.add(device_type)
        warnings.warn(
            f"mtbkd: no fused backend for {device_type} tensors ({why}); the reference backend "
            "(plain PyTorch, slower, more memory) runs instead. `mtbkd info` lists the backends",
            RuntimeWarning,
            stacklevel=3,
        )
    return "reference"


def _load_backend(backend: str) -> None:
    # Backends living in optional modules register themselves on import.
    if backend == "triton":
        importlib.import_module("mtbkd.kernels")
    elif backend == "cuda":
        importlib.import_module("mtbkd.cuda_backend")


def select_backend(device: torch.device, op: str | None = None) -> str:
    """The backend that runs ``op`` on tensors of ``device`` (honours ``MTBKD_BACKEND``)."""
    forced = os.environ.get("MTBKD_BACKEND", "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"MTBKD_BACKEND must be one of {BACKENDS}, got {forced!r}")
        if forced == "cpu" and device.type != "cpu":
            raise RuntimeError(f"MTBKD_BACKEND=cpu cannot run on {device.type} tensors")
        if forced == "cuda" and device.type != "cuda":
            raise RuntimeError(f"MTBKD_BACKEND=cuda cannot run on {device.type} tensors")
        if forced == "triton" and device.type == "cpu" and not _triton_interpreted():
            raise RuntimeError(
                "MTBKD_BACKEND=triton cannot run on CPU tensors unless TRITON_INTERPRET=1 is set "
                "(before mtbkd.kernels is imported)"
            )
        reason = _STATUS[forced]()  # only its own: a broken triton must not stop the others
        if reason is not None:
            raise RuntimeError(f"MTBKD_BACKEND={forced} is not available: {reason}")
        _load_backend(forced)
        return forced
    if device.type == "cuda":
        reasons = []
        for name in ("triton", "cuda"):
            reason = _STATUS[name]()
            if reason is None:
                _load_backend(name)
                if op is None or name in _IMPLS.get(op, {}):
                    return name
                reason = f"no {op} kernel"
            reasons.append(f"{name}: {reason}")
        return _fallback("cuda", "; ".join(reasons))
    if device.type == "cpu":
        return "cpu" if _C is not None else _fallback("cpu", _C_ERROR)
    return "reference"


def _impl(op: str, t: Tensor) -> Callable:
    backend = select_backend(t.device, op)
    impls = _IMPLS.get(op, {})
    if backend not in impls:
        raise RuntimeError(f"backend {backend!r} has no implementation of mtbkd::{op}")
    return impls[backend]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------
# The ops' argument contract, checked in each op's body before a backend is chosen, so that every
# backend refuses the same calls with the same message (the C++ kernels check the same again);
# metadata and numbers only: no tensor is read, no host synchronisation.
# ----------------------------------------------------------------------------------------------

_LOGIT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _positive_option(value: float, name: str) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value}")


def _check_logits_2d(x: Tensor, name: str, shape: str) -> None:
    if x.dtype not in _LOGIT_DTYPES:
        raise TypeError(f"{name} must be float32, float64, bfloat16 or float16, got {x.dtype}")
    if x.dim() != 2 or x.shape[1] == 0:
        raise ValueError(f"{name} must {shape} with V > 0, got {tuple(x.shape)}")


def _check_teacher_set(teachers: list[Tensor], n: int | None = None, v: int | None = None,
                       dtype: torch.dtype | None = None, device=None) -> None:  # fmt: skip
    if len(teachers) == 0:
        raise ValueError("teacher_logits must hold at least one teacher (K >= 1)")
    t0 = teachers[0]
    if dtype is None:
        _check_logits_2d(t0, "teacher_logits", "be K tensors of shape [N, V]")
        n, v, dtype, device = t0.shape[0], t0.shape[1], t0.dtype, t0.device
    for k, t in enumerate(teachers):
        if t.device != device:
            raise ValueError(f"teacher_logits[{k}] must be on {device}, got {t.device}")
        if t.dtype != dtype:
            raise TypeError(f"teacher_logits[{k}] has dtype {t.dtype} but the logits have dtype "
                            f"{dtype}")  # fmt: skip
        if tuple(t.shape) != (n, v):
            raise ValueError(f"teacher_logits[{k}] must have shape [{n}, {v}], got "
                             f"{tuple(t.shape)}")  # fmt: skip


def _check_loss_op(student, teachers, labels, fixed_weights, weight_mode, temperature,
                   weight_temperature) -> None:  # fmt: skip
    _check_logits_2d(student, "student_logits", "have shape [N, V]")
    n, v = student.shape
    _check_teacher_set(teachers, n, v, student.dtype, student.device)
    if labels is not None:
        if labels.dtype != torch.int64:
            raise TypeError(f"labels must be int64, got {labels.dtype}")
        if labels.device != student.device:
            raise ValueError(f"labels must be on {student.device}, got {labels.device}")
        if tuple(labels.shape) != (n,):
            raise ValueError(f"labels must have shape [{n}], got {tuple(labels.shape)}")
    if weight_mode not in (0, 1, 2):
        raise ValueError(f"weight_mode must be 0 (entropy), 1 (uniform) or 2 (fixed), got "
                         f"{weight_mode}")  # fmt: skip
    if weight_mode == 2:
        k = len(teachers)
        w = fixed_weights
        if w is None:
            raise ValueError("weight_mode 2 (fixed) needs fixed_weights")
        if w.device != student.device:
            raise ValueError(f"weights must be on {student.device}, got {w.device}")
        if not w.is_floating_point():
            raise TypeError(f"weights must be a floating-point tensor, got {w.dtype}")
        if tuple(w.shape) not in ((k,), (k, n)):
            raise ValueError(f"weights must have shape [K] or [K, N] = [{k}, {n}], got "
                             f"{tuple(w.shape)}")  # fmt: skip
    _positive_option(temperature, "temperature")
    _positive_option(weight_temperature, "weight_temperature")


# ----------------------------------------------------------------------------------------------
# mtbkd::mtbkd_loss_fwd  (MATH.md section 2)
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("mtbkd::mtbkd_loss_fwd", mutates_args=())
def mtbkd_loss_fwd(
    student: Tensor,
    teachers: list[Tensor],
    labels: Optional[Tensor],
    fixed_weights: Optional[Tensor],
    teacher_stats: Optional[Tensor],
    temperature: float,
    concentration: float,
    prior_weight: float,
    hard_label_weight: float,
    weight_mode: int,
    weight_temperature: float,
    ignore_index: int,
    check_finite: bool,
    grad_scale: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Per-row MT-BKD loss and its gradient in one fused forward.

    Returns ``(loss [N], grad [N, V], weights [K, N], responsibilities [K, N], entropy [K, N],
    prior [N], ce [N])``; ``grad`` is ``grad_scale · dL_i/dz_i`` (student dtype), everything else
    is float32 (float64 for float64 input); masked rows are 0 everywhere. ``grad_scale``, a
    one-element tensor on the student's device (None: 1), is the gradient the caller expects to
    reach each row's loss (``1 / count`` for a mean): folded in before the gradient is rounded to
    the student's dtype, the backward then multiplies by ``grad_output / grad_scale``, exactly 1
    for that mean, so a bf16 gradient is rounded once, not twice.

    Where that factor is exactly 1 on CPU and the graph is freed after the backward, the
    backward returns this ``grad`` output itself, not a copy (no ``[N, V]`` allocation):
    ``.backward()`` copies it into ``.grad`` while the caller still holds ``grad``, but
    ``torch.autograd.grad`` returns it as it is, so clone one of the two before changing either
    in place. The functional losses and loss modules drop ``grad``: nothing is shared there.
    """
    _check_loss_op(student, teachers, labels, fixed_weights, weight_mode, temperature,
                   weight_temperature)  # fmt: skip
    _positive_option(concentration, "concentration")
    if teacher_stats is not None:
        k, n = len(teachers), student.shape[0]
        if teacher_stats.device != student.device or tuple(teacher_stats.shape) != (k, n, 4):
            raise ValueError(f"teacher_stats must have shape [K, N, 4] = [{k}, {n}, 4] on "
                             f"{student.device}, got {tuple(teacher_stats.shape)} on "
                             f"{teacher_stats.device}")  # fmt: skip
    return _impl("mtbkd_loss_fwd", student)(
        student, teachers, labels, fixed_weights, teacher_stats, temperature, concentration,
        prior_weight, hard_label_weight, weight_mode, weight_temperature, ignore_index,
        check_finite, grad_scale,
    )  # fmt: skip


@mtbkd_loss_fwd.register_fake
def _(student, teachers, labels, fixed_weights, teacher_stats, *args):
    n, _ = student.shape
    k = len(teachers)
    acc = _acc_dtype(student.dtype)
    row = student.new_empty((n,), dtype=acc)
    kn = student.new_empty((k, n), dtype=acc)
    # The gradient is contiguous on every backend, whatever the student's strides.
    grad = student.new_empty(student.shape)
    return row, grad, kn, kn.clone(), kn.clone(), row.clone(), row.clone()


# ----------------------------------------------------------------------------------------------
# mtbkd::multi_teacher_kd_fwd  (MATH.md section 3)
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("mtbkd::multi_teacher_kd_fwd", mutates_args=())
def multi_teacher_kd_fwd(
    student: Tensor,
    teachers: list[Tensor],
    labels: Optional[Tensor],
    fixed_weights: Optional[Tensor],
    divergence: int,
    beta: float,
    temperature: float,
    weight_mode: int,
    weight_temperature: float,
    hard_label_weight: float,
    soft_label_weight: float,
    soft_scale: float,
    ignore_index: int,
    check_finite: bool,
    grad_scale: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row weighted-sum KD loss and gradient: ``(loss [N], grad [N, V], weights [K, N])``.

    ``soft_scale`` is ``s(tau)`` (``tau**2`` or 1); ``divergence`` indexes :data:`DIVERGENCES`;
    ``grad`` is ``grad_scale · dL_i/dz_i``, as in :func:`mtbkd_loss_fwd` (and, as there, the
    gradient ``torch.autograd.grad`` returns may be this ``grad`` itself).
    """
    _check_loss_op(student, teachers, labels, fixed_weights, weight_mode, temperature,
                   weight_temperature)  # fmt: skip
    if divergence not in (0, 1, 2):
        raise ValueError(f"divergence must be 0 (forward_kl), 1 (reverse_kl) or 2 (jsd), got "
                         f"{divergence}")  # fmt: skip
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must lie in [0, 1], got {beta}")
    return _impl("multi_teacher_kd_fwd", student)(
        student, teachers, labels, fixed_weights, divergence, beta, temperature, weight_mode,
        weight_temperature, hard_label_weight, soft_label_weight, soft_scale, ignore_index,
        check_finite, grad_scale,
    )  # fmt: skip


@multi_teacher_kd_fwd.register_fake
def _(student, teachers, *args):
    n, _ = student.shape
    acc = _acc_dtype(student.dtype)
    return (
        student.new_empty((n,), dtype=acc),
        student.new_empty(student.shape),
        student.new_empty((len(teachers), n), dtype=acc),
    )


# ----------------------------------------------------------------------------------------------
# mtbkd::teacher_weights and mtbkd::teacher_stats (teacher-only statistics)
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("mtbkd::teacher_weights", mutates_args=())
def teacher_weights_op(
    teachers: list[Tensor], weight_mode: int, weight_temperature: float, check_finite: bool
) -> tuple[Tensor, Tensor]:
    """Entropy or uniform teacher weights per row: ``(weights [K, N], entropy [K, N])``."""
    _check_teacher_set(teachers)
    if weight_mode not in (0, 1):
        raise ValueError(f"teacher_weights computes weight_mode 0 (entropy) or 1 (uniform), got "
                         f"{weight_mode}")  # fmt: skip
    _positive_option(weight_temperature, "weight_temperature")
    return _impl("teacher_weights", teachers[0])(
        teachers, weight_mode, weight_temperature, check_finite
    )


@teacher_weights_op.register_fake
def _(teachers, *args):
    k, n = len(teachers), teachers[0].shape[0]
    acc = _acc_dtype(teachers[0].dtype)
    w = teachers[0].new_empty((k, n), dtype=acc)
    return w, w.clone()


@torch.library.custom_op("mtbkd::teacher_stats", mutates_args=())
def teacher_stats_op(
    teachers: list[Tensor],
    temperature: float,
    concentration: float,
    weight_temperature: float,
    check_finite: bool,
) -> Tensor:
    """Cached teacher-only statistics ``[K, N, 4]`` (columns :data:`TEACHER_STAT_COLUMNS`)."""
    _check_teacher_set(teachers)
    _positive_option(temperature, "temperature")
    _positive_option(concentration, "concentration")
    _positive_option(weight_temperature, "weight_temperature")
    return _impl("teacher_stats", teachers[0])(
        teachers, temperature, concentration, weight_temperature, check_finite
    )


@teacher_stats_op.register_fake
def _(teachers, *args):
    k, n = len(teachers), teachers[0].shape[0]
    return teachers[0].new_empty((k, n, 4), dtype=_acc_dtype(teachers[0].dtype))


# ----------------------------------------------------------------------------------------------
# Autograd of both losses: the gradient was computed in the forward; the backward scales it.
# Rounding: a mean's 1 / count reaches the forward as grad_scale and is folded into the gradient
# before it is rounded to the student's dtype; the backward scales by grad_output / grad_scale,
# exactly 1 for that mean, so a bf16 gradient is rounded once (the dense losses of
# mtbkd.functional pass it, except for float16, whose range a loss scaler needs). On CPU a
# factor of exactly 1 in every row skips the scaling: the saved gradient is the result.
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("mtbkd::scale_grad", mutates_args=())
def scale_grad(grad: Tensor, grad_rows: Tensor) -> Tensor:
    """``grad * grad_rows[:, None]`` computed in fp32 (fp64) and rounded once to ``grad.dtype``."""
    return _impl("scale_grad", grad)(grad, grad_rows)


@scale_grad.register_fake
def _(grad, grad_rows):
    return grad.new_empty(grad.shape)  # contiguous on every backend


def _setup_loss_ctx(ctx, inputs, output):
    # inputs: (student, teachers, *scalars-and-optionals, grad_scale), filled with the defaults
    # (grad_scale None when not given). The gradient was computed in the forward, already
    # multiplied by grad_scale.
    ctx.num_teachers = len(inputs[1])
    ctx.save_for_backward(output[1], inputs[-1])
    ctx.mark_non_differentiable(*output[1:])
    # Otherwise autograd fills a zero [N, V] gradient for the non-differentiable grad output.
    ctx.set_materialize_grads(False)


def refuse_double_backward() -> None:
    """In a backward whose gradient was computed in the forward (a constant here): under
    ``create_graph=True`` a second-order term (a gradient penalty) would silently vanish."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            "mtbkd's fused losses do not support double backward (create_graph=True); the "
            "float64 formulas of mtbkd.reference are plain autograd and do"
        )


def _graph_kept() -> bool:
    """Whether the running backward keeps the graph (``retain_graph=True``), so that its saved
    tensors will be read again. True where this torch cannot say."""
    keep = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if keep is None else bool(keep())


def _all_ones_on_cpu(rows: Tensor, grad: Tensor) -> bool:
    """Whether every row factor of the backward is exactly 1, asked only where reading it is
    free: CPU tensors with values (no GPU synchronisation, nothing traced by torch.compile or a
    torch.func transform, no fake tensors)."""
    if rows.device.type != "cpu" or grad.device.type != "cpu":
        return False
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return False
    from torch._guards import detect_fake_mode

    if detect_fake_mode((rows, grad)) is not None:
        return False
    return bool((rows == 1).all())


def _loss_backward(ctx, grad_loss, *unused):
    grad, grad_scale = ctx.saved_tensors
    # One entry per input as autograd was given them (ctx.needs_input_grad has that structure):
    # the dispatcher leaves out a trailing argument at its default (grad_scale None), which
    # setup_context's inputs, filled with the defaults, still hold.
    num_rest = len(ctx.needs_input_grad) - 2
    if grad_loss is None:  # the loss itself was not used
        return (None, [None] * ctx.num_teachers) + (None,) * num_rest
    refuse_double_backward()
    rows = grad_loss.to(_acc_dtype(grad.dtype))
    if grad_scale is not None:
        # The forward folded grad_scale into the gradient before rounding it to the student's
        # dtype; for the mean it was built for, this factor is exactly 1 and the bf16 gradient is
        # the float32 one rounded once (scaling the saved bf16 rows by 1 / count rounded again).
        s = grad_scale.reshape(()).to(rows.dtype)
        # s = 0 (a mean over an infinite item count): the forward's gradient is 0, and so is the
        # loss's; 0 / 0 must not make it NaN (a NaN grad_output still does).
        rows = rows / torch.where(s != 0, s, torch.ones_like(s))
    if not _graph_kept() and _all_ones_on_cpu(rows, grad):
        # The common case (a mean or sum reduction, grad_output 1, the graph freed after this
        # backward): the gradient is the saved one, handed on without a copy. No [N, V]
        # allocation: on CPU a fresh one costs a page fault per 4 KB, as long as the gradient
        # pass itself. AccumulateGrad may take it as .grad, sharing its storage with the saved
        # tensor; that is safe only because the graph, and with it the saved tensor, is freed
        # after this backward. Under retain_graph=True a later in-place change of .grad
        # (zero_grad(set_to_none=False), a second accumulation) would change the saved
        # gradient that the next backward reads, so there it is copied.
        grad_student = grad
    else:
        # Out of place: the saved gradient is also an output of the op, which a caller may hold.
        grad_student = scale_grad(grad, rows.contiguous())
    return (grad_student, [None] * ctx.num_teachers) + (None,) * num_rest


mtbkd_loss_fwd.register_autograd(_loss_backward, setup_context=_setup_loss_ctx)
multi_teacher_kd_fwd.register_autograd(_loss_backward, setup_context=_setup_loss_ctx)


# ----------------------------------------------------------------------------------------------
# The reference backend: mtbkd.reference through autograd (any device, any float dtype)
# ----------------------------------------------------------------------------------------------


def _ref_checks(student, teachers, labels, ignore_index, check_finite):
    from mtbkd import validate

    if labels is not None:
        validate.check_label_range(labels, student.shape[-1], ignore_index)
    if check_finite:
        mask = None if labels is None else labels != ignore_index
        validate.check_finite(student, "student_logits", mask)
        for t in teachers:
            validate.check_finite(t, "teacher_logits", mask)


def _ref_weights_arg(fixed_weights, weight_mode):
    if weight_mode == WEIGHT_MODES["fixed"]:
        return fixed_weights
    return "entropy" if weight_mode == WEIGHT_MODES["entropy"] else "uniform"


def _grad_of(rows: Tensor, z: Tensor, dtype: torch.dtype, grad_scale: Tensor | None) -> Tensor:
    (g,) = torch.autograd.grad(rows.sum(), z)
    if grad_scale is not None:  # before the rounding to dtype, as the kernels
        g = g * grad_scale.reshape(()).to(g.dtype)
    return g.to(dtype).contiguous()


def check_grad_scale(grad_scale: Tensor | None, student: Tensor) -> None:
    """``grad_scale`` of the loss ops: None, or a one-element floating-point tensor on the
    student's device (its value is not read: no host synchronisation)."""
    if grad_scale is None:
        return
    if not isinstance(grad_scale, Tensor) or grad_scale.numel() != 1:
        raise ValueError("grad_scale must be None or a one-element tensor")
    if not grad_scale.is_floating_point():
        raise TypeError(f"grad_scale must be a floating-point tensor, got {grad_scale.dtype}")
    if grad_scale.device != student.device:
        raise ValueError(
            f"grad_scale must be on the student's device ({student.device}), got "
            f"{grad_scale.device}"
        )


def _autograd_enabled():
    """Re-enable autograd inside a custom op body (the dispatcher excludes it below Autograd)."""
    include = torch._C._dispatch_tls_local_include_set()
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in _AUTOGRAD_KEYS:
        exclude = exclude.remove(key)
    return torch._C._ForceDispatchKeyGuard(include, exclude)


def _grad_input(student: Tensor) -> Tensor:
    """The student in the accumulation dtype as a leaf that autograd differentiates.

    Call under ``torch.inference_mode(False)``: a loss called under ``torch.inference_mode()``
    still returns its gradient, and an inference tensor cannot require grad (a copy can).
    """
    z = student.detach().to(_acc_dtype(student.dtype))
    return (z.clone() if z.is_inference() else z).requires_grad_(True)


_AUTOGRAD_KEYS = [
    getattr(torch._C.DispatchKey, name)
    for name in ("ADInplaceOrView", "AutogradOther", "AutogradCPU", "AutogradCUDA",
                 "AutogradFunctionality")
    if hasattr(torch._C.DispatchKey, name)
]  # fmt: skip


@register_impl("mtbkd_loss_fwd", "reference")
def _ref_mtbkd_loss_fwd(
    student, teachers, labels, fixed_weights, teacher_stats, temperature, concentration,
    prior_weight, hard_label_weight, weight_mode, weight_temperature, ignore_index, check_finite,
    grad_scale=None,
):  # fmt: skip
    from mtbkd import reference

    _ref_checks(student, teachers, labels, ignore_index, check_finite)
    check_grad_scale(grad_scale, student)
    # teacher_stats only saves work; the reference always recomputes from the logits.
    with _autograd_enabled(), torch.inference_mode(False), torch.enable_grad():
        z = _grad_input(student)
        out = reference.mtbkd_loss(
            z, torch.stack(teachers), labels, temperature=temperature,
            concentration=concentration, prior_weight=prior_weight,
            hard_label_weight=hard_label_weight,
            weights=_ref_weights_arg(fixed_weights, weight_mode),
            weight_temperature=weight_temperature, ignore_index=ignore_index,
        )  # fmt: skip
        grad = _grad_of(out.loss, z, student.dtype, grad_scale)
    return (
        out.loss.detach(), grad, out.weights.detach(), out.responsibilities, out.entropy,
        out.prior, out.ce,
    )  # fmt: skip


@register_impl("multi_teacher_kd_fwd", "reference")
def _ref_multi_teacher_kd_fwd(
    student, teachers, labels, fixed_weights, divergence, beta, temperature, weight_mode,
    weight_temperature, hard_label_weight, soft_label_weight, soft_scale, ignore_index,
    check_finite, grad_scale=None,
):  # fmt: skip
    from mtbkd import reference

    _ref_checks(student, teachers, labels, ignore_index, check_finite)
    check_grad_scale(grad_scale, student)
    name = {v: k for k, v in DIVERGENCES.items()}[divergence]
    with _autograd_enabled(), torch.inference_mode(False), torch.enable_grad():
        z = _grad_input(student)
        loss, w = reference.multi_teacher_kd_loss(
            z, torch.stack(teachers), labels, divergence=name, beta=beta,
            temperature=temperature, weights=_ref_weights_arg(fixed_weights, weight_mode),
            weight_temperature=weight_temperature, hard_label_weight=hard_label_weight,
            soft_label_weight=soft_label_weight * soft_scale, scale_by_t2=False,
            ignore_index=ignore_index,
        )  # fmt: skip
        grad = _grad_of(loss, z, student.dtype, grad_scale)
    return loss.detach(), grad, w.detach()


@register_impl("teacher_weights", "reference")
def _ref_teacher_weights(teachers, weight_mode, weight_temperature, check_finite):
    from mtbkd import reference

    if check_finite:
        from mtbkd import validate

        for t in teachers:
            validate.check_finite(t, "teacher_logits", None)
    t = torch.stack(teachers)
    w = reference.teacher_weights(t, _ref_weights_arg(None, weight_mode), weight_temperature)
    return w, reference.teacher_entropy(t, weight_temperature)


@register_impl("teacher_stats", "reference")
def _ref_teacher_stats(teachers, temperature, concentration, weight_temperature, check_finite):
    from mtbkd import reference

    if check_finite:
        from mtbkd import validate

        for t in teachers:
            validate.check_finite(t, "teacher_logits", None)
    t = torch.stack(teachers).to(_acc_dtype(teachers[0].dtype))
    lse_tau = torch.logsumexp(t / temperature, -1)
    lse_w = torch.logsumexp(t / weight_temperature, -1)
    entropy_w = reference.teacher_entropy(t, weight_temperature)
    p = torch.exp(t / temperature - lse_tau[..., None])
    # in float64: 1 + lam p rounds in float32 for small lam p (the kernels use lgamma1p)
    lgamma_sum = torch.lgamma(1.0 + concentration * p.double()).sum(-1).to(p.dtype)
    return torch.stack([lse_tau, lse_w, entropy_w, lgamma_sum], dim=-1)


@register_impl("scale_grad", "reference")
def _ref_scale_grad(grad, grad_rows):
    acc = _acc_dtype(grad.dtype)  # as the kernels: in the gradient's accumulation dtype
    return (grad.to(acc) * grad_rows.to(acc)[:, None]).to(grad.dtype).contiguous()


# The Bayesian-student ops (MATH.md sections 6-7) live in their own module; re-exported here.
from mtbkd.bayes_ops import gaussian_kl, reparameterize, reparameterize_kl  # noqa: E402,F401

# ----------------------------------------------------------------------------------------------
# CPU backend: the C++ kernels of mtbkd._C (csrc/ops.cpp, csrc/cpu/loss_kernels.cpp), registered
# as torch.ops.mtbkd_C.<op> with the same signature and semantics as the op here.
# ----------------------------------------------------------------------------------------------


def _cpu_impl(op: str) -> Callable:
    def impl(*args):
        return getattr(torch.ops.mtbkd_C, op)(*args)

    impl.__name__ = f"_cpu_{op}"
    return impl


for _op in ("mtbkd_loss_fwd", "multi_teacher_kd_fwd", "teacher_weights", "teacher_stats",
            "scale_grad"):  # fmt: skip
    register_impl(_op, "cpu", _cpu_impl(_op))
