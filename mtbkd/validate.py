"""Argument checks shared by the public API: clear errors that name the offending argument.

Checks that need the data (label range, NaN/inf) run inside the kernels' statistics pass; the
functions here that read data serve the reference backend and user-given weight tensors.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

REDUCTIONS = ("mean", "sum", "none")
# torch.set_num_threads takes more, and torch.set_num_threads(10**6) crashed the process
MAX_THREADS = 1024


def _is_finite(value: float) -> bool:
    # Comparisons, not math.isfinite: under torch.compile a float option that changes between
    # calls becomes a symbolic float (automatic dynamic), which comparisons guard on and
    # math.isfinite cannot trace (a graph break, an error with fullgraph=True). NaN fails both.
    return -math.inf < value < math.inf


def plain(value):
    """A numpy scalar (``np.float32(2.0)``, ``np.int64(-100)``, ``np.bool_(False)``, or a 0-d
    array) as the Python number it holds, anything else as it is. Under ``torch.compile`` dynamo
    traces a numpy scalar as a 0-d array, which the ``numbers.Real`` checks refuse
    (``fullgraph=True`` failed on numpy options); its ``.item()`` is traced to a constant."""
    if type(value).__module__ == "numpy" and getattr(value, "shape", None) == ():
        return value.item()
    return value


def _is_number(value) -> bool:
    """A real number option: a Python int or float, or a numpy (or other ``numbers.Real``)
    scalar such as ``np.float32(2.0)``; never a bool (``True`` is not a temperature)."""
    return not isinstance(value, bool) and isinstance(value, (int, float, numbers.Real))


def check_positive(value: float, name: str) -> float:
    if not _is_number(value):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not _is_finite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value}")
    return float(value)


# 1 / s0^2 of a Gaussian prior must stay a finite float32 (the kernels hold it in fp32); below this
# every backend would overflow differently, and such a prior pins the weights anyway
MIN_PRIOR_SIGMA = 1e-18


def check_prior_sigma(value: float, name: str = "prior_sigma") -> float:
    value = check_positive(value, name)
    if value < MIN_PRIOR_SIGMA:
        raise ValueError(f"{name} must be at least {MIN_PRIOR_SIGMA:g} (1 / {name}^2 must be a "
                         f"finite float32), got {value}")  # fmt: skip
    return value


def check_real(value: float, name: str, *, nonnegative: bool = False) -> float:
    if not _is_number(value):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not _is_finite(value) or (nonnegative and value < 0):
        kind = "a non-negative finite" if nonnegative else "a finite"
        raise ValueError(f"{name} must be {kind} number, got {value}")
    return float(value)


def check_chunk_size(chunk_size: int | None) -> int | None:
    """``chunk_size`` of the fused-linear losses: a positive int, or None (chosen automatically)."""
    if chunk_size is not None and (
        isinstance(chunk_size, bool)
        or not isinstance(chunk_size, numbers.Integral)
        or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    return None if chunk_size is None else int(chunk_size)  # np.int64(2) as 2


def check_reduction(reduction: str) -> str:
    if reduction not in REDUCTIONS:
        hint = (" ('mean' is a mean over rows, nn.KLDivLoss's 'batchmean')"
                if reduction == "batchmean" else "")  # fmt: skip
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}{hint}")
    return reduction


def check_mtbkd_options(
    temperature, concentration, weight_temperature, prior_weight, hard_label_weight, reduction
) -> None:
    """The scalar options of every MT-BKD loss entry point (MATH.md section 2)."""
    check_positive(temperature, "temperature")
    check_positive(concentration, "concentration")
    check_positive(weight_temperature, "weight_temperature")
    check_real(prior_weight, "prior_weight", nonnegative=True)
    check_real(hard_label_weight, "hard_label_weight", nonnegative=True)
    check_reduction(reduction)


def check_kd_options(
    divergence, beta, temperature, weight_temperature, hard_label_weight, soft_label_weight,
    reduction,
) -> None:  # fmt: skip
    """The scalar options of every weighted-sum KD entry point (MATH.md section 3)."""
    from mtbkd.ops import DIVERGENCES

    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {tuple(DIVERGENCES)}, got {divergence!r}")
    check_real(beta, "beta")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must lie in [0, 1], got {beta}")
    check_positive(temperature, "temperature")
    check_positive(weight_temperature, "weight_temperature")
    check_real(hard_label_weight, "hard_label_weight", nonnegative=True)
    check_real(soft_label_weight, "soft_label_weight", nonnegative=True)
    check_reduction(reduction)


def check_no_func_transform(name: str) -> None:
    """The fused losses compute their gradient in the forward (custom ops, an autograd.Function):
    torch.func transforms cannot run them; say so instead of torch's message about a missing
    ``setup_context``/batching rule (which the caller can do nothing about)."""
    if not torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active():
        raise RuntimeError(
            f"{name} does not support torch.func transforms (grad, vmap, jacrev, ...): use "
            "loss.backward() / torch.autograd.grad, or transform the float64 formulas of "
            "mtbkd.reference, which are plain autograd"
        )


def check_logits(x: Tensor, name: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.layout != torch.strided:  # a sparse tensor failed later in a reshape
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {x.layout}: "
                        "call .to_dense() first")  # fmt: skip
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(
            f"{name} must have a non-empty last (class) dimension, got {tuple(x.shape)}"
        )


def _narrowing(src: torch.dtype, dst: torch.dtype) -> bool:
    """Whether a cast ``src -> dst`` loses range: fp32 -> fp16, fp64 -> fp32, and fp32 -> bf16
    too (bf16's largest value is 0.4 % below fp32's: ``finfo(float32).min`` becomes -inf)."""
    return torch.finfo(dst).max < torch.finfo(src).max


def has_values(t: Tensor) -> bool:
    """Whether ``t``'s values can be read: not a meta or fake tensor (shapes only), and not
    inside a ``torch.compile`` graph (``fullgraph=True`` cannot branch on data)."""
    if torch.compiler.is_compiling() or t.device.type == "meta":
        return False
    from torch._guards import detect_fake_mode

    return detect_fake_mode((t,)) is None


def check_cast_overflow(
    src: Tensor, cast: Tensor, name: str, into: str = "the student", keep: Tensor | None = None
) -> Tensor:
    """``cast`` (``src`` cast to a narrower dtype, that of ``into``), checked: a finite positive
    logit beyond its range became +inf, an error naming ``name`` and ``into``; a finite negative
    one that became -inf (as ``finfo(float32).min`` masking does in fp16 / bf16) is set to the
    dtype's lowest finite value, so that masking stays finite and passes the losses' finiteness
    check. One reduction of the cast and a host synchronisation, only for narrowing casts;
    inside a ``torch.compile`` graph only the masking (an elementwise select, no
    synchronisation) and no +inf check (the losses run it when ``check_finite``). ``keep``
    (``src.shape[:-1]``, bool): the rows that count; a row a label masks counts for nothing, and
    may overflow (as its NaN or inf passes the finiteness check)."""
    if not _narrowing(src.dtype, cast.dtype) or not cast.numel():
        return cast
    if not has_values(src):
        # no host synchronisation in a graph: the masking only, from the source (inductor keeps
        # the cast's values in fp32 inside a kernel, so its -inf is not there to test); nor
        # values to read on the meta device or under FakeTensorMode
        lo = torch.finfo(cast.dtype).min
        return torch.where(torch.isfinite(src), src.clamp_min(lo), src).to(cast.dtype)
    lo, hi = torch.aminmax(cast)
    lo, hi = torch.stack([lo, hi]).tolist()
    if hi == float("inf"):
        new = torch.isposinf(cast) & torch.isfinite(src)
        if keep is not None:
            new &= keep.unsqueeze(-1)
        if bool(new.any()):
            raise ValueError(
                f"{name} ({src.dtype}) has finite values beyond the range of {into}'s "
                f"{cast.dtype} (max {torch.finfo(cast.dtype).max:g}; found "
                f"{float(src[new][0]):g}): the teachers are computed in {into}'s dtype, "
                f"so give {into} a wider dtype or clamp the teacher logits"
            )
    if lo == float("-inf"):
        new = torch.isneginf(cast) & torch.isfinite(src)
        cast = torch.where(new, torch.finfo(cast.dtype).min, cast)
    return cast


def canonical_inputs(
    student_logits: Tensor,
    teacher_logits: Tensor | Sequence[Tensor],
    labels: Tensor | None,
    check_finite: bool = False,
    *,
    student_name: str = "student_logits",
    ignore_index: int | None = None,
) -> tuple[Tensor, list[Tensor], Tensor | None, torch.Size]:
    """Flatten to the kernels' shapes: student ``[N, V]``, K teachers ``[N, V]``, labels ``[N]``.
    ``student_name`` is what the errors call the first argument (:func:`mtbkd.teacher_weights`
    passes its first teacher there).

    Returns ``(student, teachers, labels, leading_shape)``. Teachers of another floating dtype are
    cast to the student's (a copy; with ``check_finite``, a finite logit that overflows to +inf
    in a narrowing cast is an error, and one that overflows to -inf stays finite,
    :func:`check_cast_overflow`, which leaves out the rows whose label is ``ignore_index``); a
    ``[K, ..., V]`` tensor is split into views without a copy.
    """
    check_logits(student_logits, "student_logits")
    lead, v = student_logits.shape[:-1], student_logits.shape[-1]
    if isinstance(teacher_logits, Tensor):
        check_logits(teacher_logits, "teacher_logits")
        if teacher_logits.dim() != student_logits.dim() + 1:
            raise ValueError(
                "teacher_logits must be [K, *student_logits.shape] (or a sequence of K tensors "
                f"shaped like student_logits); got {tuple(teacher_logits.shape)} for student "
                f"{tuple(student_logits.shape)}"
            )
        teachers = list(teacher_logits.unbind(0))
    elif isinstance(teacher_logits, Sequence):
        teachers = list(teacher_logits)
        for i, t in enumerate(teachers):
            check_logits(t, f"teacher_logits[{i}]")
    else:
        raise TypeError(
            "teacher_logits must be a tensor [K, ..., V] or a sequence of K tensors [..., V], "
            f"got {type(teacher_logits).__name__}"
        )
    if len(teachers) == 0:
        raise ValueError("teacher_logits must hold at least one teacher (got K = 0)")
    keep = None  # the rows a label does not mask (labels of a wrong shape fail below)
    if (ignore_index is not None and isinstance(labels, Tensor) and labels.shape == lead
            and labels.device == student_logits.device
            and not (labels.is_floating_point() or labels.is_complex())):  # fmt: skip
        keep = labels != ignore_index
    out = []
    for i, t in enumerate(teachers):
        if t.shape[-1] != v:
            raise ValueError(
                f"teacher_logits[{i}] has vocabulary size {t.shape[-1]} but {student_name} has {v}"
            )
        if t.shape[:-1] != lead:
            raise ValueError(
                f"teacher_logits[{i}] has leading shape {tuple(t.shape[:-1])} but {student_name} "
                f"has {tuple(lead)}"
            )
        if t.device != student_logits.device:
            raise ValueError(
                f"teacher_logits[{i}] is on {t.device} but {student_name} is on "
                f"{student_logits.device}"
            )
        t = t.detach()
        if t.dtype != student_logits.dtype:
            cast = t.to(student_logits.dtype)
            if check_finite:
                into = "the student" if student_name == "student_logits" else student_name
                cast = check_cast_overflow(t, cast, f"teacher_logits[{i}]", into, keep)
            t = cast
        out.append(t.reshape(-1, v).contiguous())
    student = student_logits.reshape(-1, v)
    if not student.is_contiguous():
        student = student.contiguous()
    if labels is not None:
        if not isinstance(labels, Tensor):
            raise TypeError(f"labels must be a torch.Tensor or None, got {type(labels).__name__}")
        if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
            raise TypeError(f"labels must be an integer tensor, got dtype {labels.dtype}")
        if labels.shape != lead:
            raise ValueError(
                f"labels must have shape {tuple(lead)} (student_logits without its last dim), "
                f"got {tuple(labels.shape)}: the class dimension is the last one (a "
                "CrossEntropyLoss-style [N, C, d] input takes logits.movedim(1, -1))"
            )
        if labels.device != student_logits.device:
            raise ValueError(
                f"labels is on {labels.device} but student_logits is on {student_logits.device}"
            )
        labels = labels.reshape(-1).to(torch.int64).contiguous()
    return student, out, labels, lead


def check_label_range(labels: Tensor, num_classes: int, ignore_index: int) -> None:
    """Every label is ``ignore_index`` or in ``[0, num_classes)`` (reads the data)."""
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
    if bool(bad.any()):
        value = int(labels[bad][0])
        raise ValueError(
            f"labels must lie in [0, {num_classes}) or equal ignore_index={ignore_index}; "
            f"found {value}"
        )


def check_finite(x: Tensor, name: str, row_mask: Tensor | None) -> None:
    """No NaN/inf in the rows that count (reads the data)."""
    bad = ~torch.isfinite(x).all(-1)
    if row_mask is not None:
        bad &= row_mask
    if bool(bad.any()):
        raise ValueError(
            f"{name} contains NaN or inf (row {int(bad.nonzero()[0, 0])}); "
            "pass check_finite=False to skip this check"
        )


def check_weights_option(weights) -> None:
    """A loss module's ``weights`` at construction: ``"entropy"``, ``"uniform"`` or a finite,
    non-negative tensor (its shape is checked against the teachers at each call)."""
    if isinstance(weights, str):
        if weights not in ("entropy", "uniform"):
            raise ValueError(f"weights must be 'entropy', 'uniform' or a Tensor, got {weights!r}")
        return
    if not isinstance(weights, Tensor):
        raise TypeError(f"weights must be a str or a Tensor, got {type(weights).__name__}")
    w = weights.detach()
    if w.dtype == torch.bool or w.is_complex():  # integers are fine, as in fixed_weights
        raise TypeError(f"weights must be a real (floating or integer) tensor, got {w.dtype}")
    if not has_values(w):  # built on the meta device or under FakeTensorMode
        return
    w = w.double()
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise ValueError("weights must be a finite, non-negative tensor")


def fixed_weights(
    weights: Tensor,
    k: int,
    lead: torch.Size,
    like: Tensor,
    name: str = "weights",
    like_name: str = "student_logits",
) -> Tensor:
    """User teacher weights ``[K]``, ``[K, *lead]`` or ``[K, N]`` (the rows flattened, MATH.md
    section 1) -> row-normalised ``[K, N]`` (acc dtype). ``name`` / ``like_name``: the arguments
    the errors name."""
    n = 1
    for s in lead:
        n *= s
    if weights.is_complex() or weights.dtype == torch.bool:
        raise TypeError(f"{name} must be a real tensor, got dtype {weights.dtype}")
    if weights.dim() == 0 or weights.shape[0] != k:
        raise ValueError(f"{name} must have shape [K={k}], [K={k}, *{tuple(lead)}] or "
                         f"[K={k}, N={n}], got {tuple(weights.shape)}")  # fmt: skip
    if weights.dim() > 1 and weights.shape[1:] != lead and tuple(weights.shape[1:]) != (n,):
        raise ValueError(
            f"{name} must have shape [K={k}], [K={k}, *{tuple(lead)}] or [K={k}, N={n}], "
            f"got {tuple(weights.shape)}"
        )
    if weights.device != like.device:
        raise ValueError(f"{name} is on {weights.device} but {like_name} is on {like.device}")
    acc = torch.float64 if like.dtype == torch.float64 else torch.float32
    # float64 weights (and integers, and any weights of a float64 loss) stay float64 until each
    # row is divided by its largest weight: finite weights such as 1e300 (float64) or 3e38
    # (float32, whose sum overflowed to inf) then normalise like any other
    narrow = (torch.float32, torch.float16, torch.bfloat16)
    wide = torch.float32 if acc == torch.float32 and weights.dtype in narrow else torch.float64
    w = weights.detach().to(wide).reshape(k, -1).expand(k, n)
    # Data checks read the values (a host synchronisation); a torch.compile graph skips them
    # (fullgraph=True cannot branch on data), so check the weights once outside it; meta and
    # fake tensors have no values to check
    if has_values(w):
        if not bool(torch.isfinite(w).all()):
            raise ValueError(f"{name} must be finite")
        if bool((w < 0).any()):
            raise ValueError(f"{name} must be non-negative")
        if bool((w.amax(0) == 0).any()):
            raise ValueError(f"{name}: a row has all teacher weights equal to zero")
    w = (w / w.amax(0, keepdim=True)).to(acc)
    return (w / w.sum(0, keepdim=True)).contiguous()


def in_rows(exc: ValueError, start: int, rename=None) -> ValueError:
    """``exc`` from a chunk of rows that begins at row ``start``: its ``row i`` made rows of the
    whole input (the kernels number the rows of the chunk they were given), and arguments
    renamed (``rename``: one ``(inner name, caller's name)`` pair or a sequence of them)."""
    import re

    text = re.sub(r"\brow (\d+)", lambda m: f"row {int(m.group(1)) + start}", str(exc))
    pairs = [rename] if rename and isinstance(rename[0], str) else list(rename or ())
    for inner, outer in pairs:
        text = re.sub(rf"\b{re.escape(inner)}\b", outer, text)
    return ValueError(text)


def check_flags(**flags) -> None:
    """Each keyword a bool (numpy's too): ``scale_by_t2="no"`` was taken as true."""
    for name, value in flags.items():
        if isinstance(value, bool):
            continue
        if type(value).__module__ == "numpy" and getattr(value, "dtype", None) is not None:
            if value.dtype.kind == "b" and value.shape == ():
                continue
        raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")


def check_ignore_index(value) -> int:
    """``ignore_index``: an integer (a float such as 1.5 was silently truncated)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        if isinstance(value, Tensor) and value.numel() == 1 and not value.is_floating_point():
            return int(value)
        raise TypeError(f"ignore_index must be an integer, got {value!r}")
    if not -(2**63) <= int(value) < 2**63:  # a bare OverflowError in the op
        raise ValueError(f"ignore_index must fit in int64, got {value}")
    return int(value)


def items_divisor(num_items, dtype: torch.dtype, device) -> Tensor:
    """``num_items_in_batch`` as the 0-d divisor of a ``mean`` (MATH.md section 4).

    A number must be positive. A tensor (what Hugging Face trainers pass) must hold one element;
    its value is not read on the host (no synchronisation): 0, a batch whose rows are all masked,
    divides by 1 (the loss is 0, never NaN); a negative or infinite count (or one the cast to
    ``dtype`` makes 0 or inf) makes the loss NaN, loudly wrong.
    Values below 1 are kept (a global count divided by the world size can be 0.5).
    """
    if isinstance(num_items, Tensor):
        if num_items.numel() != 1:
            raise ValueError(
                "num_items_in_batch must be a number or a one-element tensor, got shape "
                f"{tuple(num_items.shape)}"
            )
        if num_items.dtype == torch.bool or num_items.is_complex():  # False read as a count of 0
            raise TypeError(f"num_items_in_batch must be a real count, got a {num_items.dtype} "
                            "tensor")  # fmt: skip
        src = num_items.detach().to(device=device).reshape(())
        n = src.to(dtype)
        # a count that is inf, or that the cast makes inf or 0 (1e-50 in float32), is NaN too
        ok = (n > 0) & torch.isfinite(n)
        return torch.where(ok, n, torch.where(src == 0, 1.0, float("nan")).to(dtype))
    if isinstance(num_items, bool) or not isinstance(num_items, numbers.Real):
        raise TypeError(
            f"num_items_in_batch must be a number or a tensor, got {type(num_items).__name__}"
        )
    if not (num_items > 0 and _is_finite(num_items)):  # inf made every loss 0
        raise ValueError(f"num_items_in_batch must be positive and finite, got {num_items}")
    info = torch.finfo(dtype)
    if not info.tiny <= float(num_items) <= info.max:  # 1e39: torch's overflow error; 1e-50: inf
        raise ValueError(
            f"num_items_in_batch must lie in [{info.tiny:.3g}, {info.max:.3g}] (the range of the "
            f"loss dtype {dtype}), got {num_items}"
        )
    return torch.full((), float(num_items), dtype=dtype, device=device)
