"""Fused linear-head multi-teacher losses for large vocabularies: no ``[N, V]`` logits kept alive.

A language-model distillation step computes ``z = h Wᵀ (+ b)`` for the student and for every
teacher, then the loss. With V = 128k and N = 2048 tokens each logits tensor is 1 GiB in fp32.
Here rows are processed in chunks of ``chunk_size``: per chunk the head matmuls, one fused loss op
(``torch.ops.mtbkd.mtbkd_loss_fwd`` / ``multi_teacher_kd_fwd``, which returns the per-row loss and
``G = dL_i/dz``), then ``grad_hidden = G W``, ``grad_W += Gᵀ h`` and ``grad_b += Σ_i G_i`` in fp32
(fp64 for fp64 input). The student's and the teacher heads' chunk logits are written into buffers
allocated once per call, and the reduction's scale is applied to the small operands
(``[chunk, H]``), never as an extra pass over ``G``. The gradients are computed in the forward
and only scaled by ``grad_output`` in the backward (for ``reduction="none"`` the backward
recomputes the chunks with per-row scales instead of storing anything ``[N, V]``). Loss math:
MATH.md sections 2-4; with :class:`mtbkd.SparseTeacher` teachers, section 5.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mtbkd import functional as F
from mtbkd import ops, validate
from mtbkd.losses import MTBKDLoss, MultiTeacherKDLoss

__all__ = [
    "FusedLinearMTBKDLoss",
    "FusedLinearMultiTeacherKDLoss",
    "fused_linear_mtbkd_loss",
    "fused_linear_multi_teacher_kd_loss",
    "auto_chunk_size",
]

# Working-set budget of one chunk (student logits, K teacher logits, the gradient, fp32 copies).
# 512 MiB gives 256-row chunks at V=128256, K=2, at ~23 % of eager's peak memory. Measured there on
# 2 CPU cores (N=2048, H=576, forward+backward, side by side): 128-row chunks 12.0 s, 256-row
# 10.1 s, 512-row 9.3 s, the head matmuls alone 9.5 s. A larger ``chunk_size`` buys the last
# ~8 % for twice the working set.
CHUNK_BYTES = 512 * 2**20


def auto_chunk_size(n: int, v: int, k: int, budget_bytes: int = CHUNK_BYTES) -> int:
    """Rows per chunk with ``rows · V · (K + 2) · 4 B ≲ budget``; a multiple of 8 if possible."""
    rows = budget_bytes // max(v * (k + 2) * 4, 1)
    if rows >= 8:
        rows -= rows % 8
    return int(max(1, min(rows, max(n, 1))))


# ----------------------------------------------------------------------------------------------
# Teacher specifications: dense logits, a linear head, or sparse top-k outputs, sliced per chunk
# ----------------------------------------------------------------------------------------------


class _Head:
    """A teacher given as ``(hidden [N, H_k], weight [V_k, H_k], bias [V_k] | None)``."""

    def __init__(self, hidden: Tensor, weight: Tensor, bias: Tensor | None, v: int,
                 name: str = "teachers", check: bool = True) -> None:  # fmt: skip
        self.hidden, self.weight = hidden, weight[:v]
        self.bias = None if bias is None else bias[:v]
        # check: a narrowing cast of the head's logits that overflows to +inf is an error, to
        # -inf stays finite (check_finite), as for logits (_Dense)
        self.name, self.check = name, check

    def logits(self, rows: slice, dtype: torch.dtype, out: Tensor | None = None) -> Tensor:
        h = self.hidden[rows]
        if out is not None and self.reuses(dtype):
            # into a buffer reused by every chunk: no fresh [c, V] allocation (and, on CPU, no
            # fresh page faults) per chunk
            o = out[: h.shape[0]]
            if self.bias is None:
                return torch.mm(h, self.weight.t(), out=o)
            return torch.addmm(self.bias, h, self.weight.t(), out=o)
        z = h @ self.weight.t() if self.bias is None else torch.addmm(self.bias, h, self.weight.t())
        if self.check and z.dtype != dtype:  # a narrowing cast, as for logits (_Dense)
            return validate.check_cast_overflow(z, z.to(dtype), self.name).contiguous()
        return z.to(dtype).contiguous()

    def reuses(self, dtype: torch.dtype) -> bool:
        """Whether :meth:`logits` can write a chunk of ``dtype`` into a buffer."""
        return self.hidden.dtype == self.weight.dtype == dtype and (
            self.bias is None or self.bias.dtype == dtype
        )


class _Dense:
    """A teacher given as logits ``[N, V_k]`` (a padded vocabulary is sliced to V)."""

    def __init__(self, logits: Tensor, v: int, name: str = "teachers", check: bool = True) -> None:
        self.t = logits[:, :v]
        # check: a cast that overflows to +inf is an error, to -inf stays finite (check_finite)
        self.name, self.check = name, check

    def logits(self, rows: slice, dtype: torch.dtype, out: Tensor | None = None) -> Tensor:
        src = self.t[rows]
        z = src.to(dtype).contiguous()
        if self.check and z.dtype != src.dtype:  # only narrowing casts, one reduction (validate)
            z = validate.check_cast_overflow(src, z, self.name)
        return z

    def reuses(self, dtype: torch.dtype) -> bool:
        return False  # a row slice of the logits themselves: nothing to compute into a buffer


def _is_sparse(x: Any) -> bool:
    from mtbkd.sparse import SparseTeacher

    return isinstance(x, SparseTeacher)


def _check_matrix(x: Any, name: str, dim: int) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() != dim:
        raise ValueError(f"{name} must have {dim} dimensions, got shape {tuple(x.shape)}")
    return x


def _parse_teachers(
    teachers: Any, n: int, v: int, device: torch.device, check_finite: bool = True
) -> list:
    """Validate ``teachers`` and wrap each one so that ``logits(rows, dtype)`` gives a chunk."""
    if _is_sparse(teachers):
        teachers = [teachers]
    if isinstance(teachers, Tensor):
        _check_matrix(teachers, "teachers", teachers.dim())
        if teachers.dim() != 3:
            raise ValueError(
                f"teachers must be [K, N, V] (or a sequence of teachers), got shape "
                f"{tuple(teachers.shape)}"
            )
        teachers = list(teachers.unbind(0))
    if not isinstance(teachers, Sequence) or isinstance(teachers, (str, bytes)):
        raise TypeError(
            "teachers must be a tensor [K, N, V], or a sequence of teacher logits [N, V_k], "
            f"(hidden, weight, bias) heads or SparseTeacher outputs; got {type(teachers).__name__}"
        )
    if len(teachers) == 0:
        raise ValueError("teachers must hold at least one teacher (got K = 0)")
    kinds = {_is_sparse(t) for t in teachers}
    if len(kinds) > 1:
        raise TypeError("teachers: sparse (SparseTeacher) and dense teachers cannot be mixed")
    out: list = []
    for i, t in enumerate(teachers):
        name = f"teachers[{i}]"
        if _is_sparse(t):
            if t.indices.shape[0] != n or t.indices.dim() != 2:
                raise ValueError(
                    f"{name} must be a SparseTeacher with indices [N={n}, k], got "
                    f"{tuple(t.indices.shape)}"
                )
            if t.indices.device != device:
                raise ValueError(
                    f"{name} is on {t.indices.device} but student_hidden is on {device}"
                )
            out.append(t)
            continue
        if isinstance(t, Tensor):
            _check_matrix(t, name, 2)
            if t.shape[0] != n:
                raise ValueError(f"{name} has {t.shape[0]} rows but student_hidden has {n}")
            if t.shape[1] < v:
                raise ValueError(
                    f"{name} has vocabulary size {t.shape[1]} but student_weight has {v} rows "
                    "(a teacher vocabulary must cover the student's)"
                )
            if t.device != device:
                raise ValueError(f"{name} is on {t.device} but student_hidden is on {device}")
            out.append(_Dense(t.detach(), v, name, check_finite))
            continue
        if not isinstance(t, Sequence) or len(t) not in (2, 3):
            raise TypeError(
                f"{name} must be logits [N, V_k], a SparseTeacher or a tuple (hidden, weight, "
                f"bias or None); got {type(t).__name__}"
            )
        hid = _check_matrix(t[0], f"{name} hidden", 2)
        w = _check_matrix(t[1], f"{name} weight", 2)
        b = t[2] if len(t) == 3 else None
        if hid.shape[0] != n:
            raise ValueError(f"{name} hidden has {hid.shape[0]} rows but student_hidden has {n}")
        if w.shape[1] != hid.shape[1]:
            raise ValueError(
                f"{name} weight has hidden size {w.shape[1]} but its hidden states have "
                f"{hid.shape[1]}"
            )
        if w.shape[0] < v:
            raise ValueError(
                f"{name} weight has vocabulary size {w.shape[0]} but student_weight has {v} rows "
                "(a teacher vocabulary must cover the student's)"
            )
        if b is not None:
            _check_matrix(b, f"{name} bias", 1)
            if b.shape[0] != w.shape[0]:
                raise ValueError(f"{name} bias has {b.shape[0]} entries but its weight has "
                                 f"{w.shape[0]} rows")  # fmt: skip
            b = b.detach()
        for x, what in ((w, "weight"), (b, "bias")):
            if x is not None and x.dtype != hid.dtype:  # before: torch's "m1 and m2" error
                raise TypeError(
                    f"{name} {what} has dtype {x.dtype} but its hidden states have {hid.dtype}"
                )
        for x, what in ((hid, "hidden"), (w, "weight"), (b, "bias")):
            if x is not None and x.device != device:
                raise ValueError(
                    f"{name} {what} is on {x.device} but student_hidden is on {device}"
                )
        out.append(_Head(hid.detach(), w.detach(), b, v, name, check_finite))
    return out


# ----------------------------------------------------------------------------------------------
# One chunk: logits, the fused loss op, the per-row gradient dL_i/dz_i
# ----------------------------------------------------------------------------------------------


def _chunk_op(kind: str, opts: dict, z: Tensor, teachers: list, rows: slice, labels, fixed,
              bufs: list):  # fmt: skip
    """Per-row loss ``[c]``, gradient ``G [c, V]`` (unscaled) and the op's other outputs.
    ``bufs[k]`` (or None) is a ``[chunk, V]`` buffer teacher k's head writes its logits into."""
    lab = None if labels is None else labels[rows]
    fw = None if fixed is None else fixed[:, rows].contiguous()
    if _is_sparse(teachers[0]):
        from mtbkd import sparse

        return sparse.chunk_loss_and_grad(kind, opts, z, [t.rows(rows) for t in teachers], lab, fw)
    t_chunk = [t.logits(rows, z.dtype, b) for t, b in zip(teachers, bufs)]
    if kind == "mtbkd":
        out = ops.mtbkd_loss_fwd(
            z, t_chunk, lab, fw, None, opts["temperature"], opts["concentration"],
            opts["prior_weight"], opts["hard_label_weight"], opts["mode"],
            opts["weight_temperature"], opts["ignore_index"], opts["check_finite"],
        )  # fmt: skip
        return out[0], out[1], out[2:]
    out = ops.multi_teacher_kd_fwd(
        z, t_chunk, lab, fw, opts["divergence"], opts["beta"], opts["temperature"], opts["mode"],
        opts["weight_temperature"], opts["hard_label_weight"], opts["soft_label_weight"],
        opts["soft_scale"], opts["ignore_index"], opts["check_finite"],
    )  # fmt: skip
    return out[0], out[1], out[2:]


def _chunk_error(exc: ValueError, start: int, rows: slice, z: Tensor, teachers: list) -> ValueError:
    """The fused op's error on a chunk, in the caller's terms: rows of the whole input, and the
    arguments the logits came from (the op names its own, ``student_logits`` and
    ``teacher_logits``, and cannot tell which teacher)."""
    import re

    text = str(exc)
    if text.startswith("student_logits"):
        return validate.in_rows(
            exc, start, ("student_logits", "student_hidden @ student_weight.T (+ student_bias)")
        )
    if _is_sparse(teachers[0]):  # the sparse checks name the unfused loss's arguments
        return validate.in_rows(exc, start, [
            ("student_logits has V", "student_weight has V"),
            ("student_logits", "student_hidden @ student_weight.T (+ student_bias)"),
            ("teacher_logits", "teachers"),
        ])  # fmt: skip
    found = re.match(r"teacher_logits contains NaN or inf \(row (\d+)\)", text)
    if found and not _is_sparse(teachers[0]):
        row = int(found.group(1))
        for t in teachers:  # the error path only: recompute the chunk's teacher logits
            try:
                bad = not bool(torch.isfinite(t.logits(rows, z.dtype)[row]).all())
            except ValueError:
                bad = True
            if bad:
                what = t.name if isinstance(t, _Dense) else f"{t.name} (hidden @ weight.T + bias)"
                return validate.in_rows(exc, start, ("teacher_logits", what))
    return validate.in_rows(exc, start)


def _keep_stats(stats: list | None, rest: tuple, rows: slice, n: int) -> list:
    """Copy a chunk's statistics ``[..., c]`` into ``[..., N]`` tensors (made at the first)."""
    if stats is None:
        stats = [x.new_empty((*x.shape[:-1], n)) for x in rest]
    for out, x in zip(stats, rest, strict=True):
        out[..., rows] = x
    return stats


def _run_chunks(kind, opts, hidden, weight, bias, teachers, labels, fixed, chunk, row_scale,
                want_grads, keep_stats=True):  # fmt: skip
    """Loss rows ``[N]`` and, when ``want_grads``, gradients with each row's G scaled by
    ``row_scale`` (a scalar or ``[N]`` tensor); with ``keep_stats``, the ops' other outputs
    (statistics ``[..., c]`` per chunk) copied into ``[..., N]`` tensors allocated at the first
    chunk, returned as a list of one such tuple (none for N = 0). Keeping each chunk's small
    tensors instead grew the process by one ``[chunk, V]`` per chunk under glibc's allocator
    (the long-lived tensors pinned the heap between the chunks' freed logits)."""
    n, v = hidden.shape[0], weight.shape[0]
    acc = _acc(hidden.dtype)
    loss_rows = torch.empty(n, dtype=acc, device=hidden.device)
    stats: list[Tensor] | None = None
    gh = gw = gb = None
    if want_grads:
        # an fp16 grad_hidden stays in the accumulation dtype until the backward has applied
        # grad_output: an fp16 copy at the reduced scale (1/N) underflows, which loss scaling
        # (GradScaler) cannot undo; bfloat16 has float32's range and keeps its own dtype
        gh_dtype = acc if hidden.dtype == torch.float16 else hidden.dtype
        gh = torch.empty(hidden.shape, dtype=gh_dtype, device=hidden.device)
        gw = torch.zeros(weight.shape, dtype=acc, device=weight.device)
        gb = None if bias is None else torch.zeros(v, dtype=acc, device=weight.device)
    wt = weight.t()
    # The student's and the heads' chunk logits go into buffers allocated once, not per chunk.
    rows_max = min(chunk, n)
    sparse = _is_sparse(teachers[0])
    zbuf = torch.empty(rows_max, v, dtype=hidden.dtype, device=hidden.device)
    bufs = [torch.empty_like(zbuf) if not sparse and t.reuses(hidden.dtype) else None
            for t in teachers]  # fmt: skip
    # One fp32 copy of a low-precision head (the size of grad_W) instead of one per chunk.
    w_acc = weight if weight.dtype == acc or not want_grads else weight.to(acc)
    for start in range(0, n, chunk):
        rows = slice(start, min(start + chunk, n))
        h = hidden[rows]
        z = zbuf[: h.shape[0]]
        if bias is None:
            torch.mm(h, wt, out=z)
        else:
            torch.addmm(bias, h, wt, out=z)
        try:
            r, g, rest = _chunk_op(kind, opts, z, teachers, rows, labels, fixed, bufs)
        except ValueError as exc:  # the kernels number the rows of the chunk
            raise _chunk_error(exc, start, rows, z, teachers) from None
        loss_rows[rows] = r
        if keep_stats:
            stats = _keep_stats(stats, rest, rows, n)
        del rest
        if not want_grads:
            continue
        g = g.to(acc)
        # The scale goes on the small operands ([c, H] and [c]), never through G ([c, V]):
        # Σ_i s_i G_i h_i = Gᵀ (s ⊙ h), (s ⊙ G) W = s ⊙ (G W), Σ_i s_i G_i = Gᵀ s.
        s = row_scale[rows, None] if isinstance(row_scale, Tensor) and row_scale.dim() else \
            row_scale  # fmt: skip
        gh[rows] = ((g @ w_acc) * s).to(gh.dtype)  # one rounding per row
        gw.addmm_(g.t(), h.to(acc) * s)
        if gb is not None:
            gb += (g.t() @ s).reshape(-1) if isinstance(s, Tensor) and s.dim() else g.sum(0) * s
    return loss_rows, [] if stats is None else [stats], gh, gw, gb


class _FusedLinearLoss(torch.autograd.Function):
    """Loss and gradients in the forward; the backward scales them by ``grad_output``."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, kind, opts, teachers, labels, fixed, chunk, reduction,
                num_items, fn_ctx):  # fmt: skip
        need = (hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
        ctx.need = need
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        acc = _acc(hidden.dtype)
        keep = fn_ctx["want_stats"]
        if reduction == "none":
            # Per-row grad_output is known only in the backward: recompute the chunks there.
            rows, extras, *_ = _run_chunks(kind, opts, hidden, weight, bias, teachers, labels,
                                           fixed, chunk, None, False, keep)  # fmt: skip
            ctx.recompute = (kind, opts, teachers, labels, fixed, chunk)
            ctx.versions = _versions(teachers, labels, fixed)
            ctx.save_for_backward(hidden, weight, bias)
            fn_ctx["stats"] = extras
            return rows
        scale = _mean_scale(reduction, labels, hidden.shape[0], opts["ignore_index"], num_items,
                            acc, hidden.device)  # fmt: skip
        rows, extras, gh, gw, gb = _run_chunks(kind, opts, hidden, weight, bias, teachers, labels,
                                               fixed, chunk, scale, any(need), keep)  # fmt: skip
        ctx.recompute = None
        fn_ctx["stats"] = extras
        ctx.save_for_backward(gh, gw, gb)
        return rows.sum() * scale

    @staticmethod
    def backward(ctx, grad_out):
        from mtbkd.ops import refuse_double_backward

        refuse_double_backward()  # the gradients were computed in the forward: constants here
        need = ctx.need
        if ctx.recompute is None:
            gh, gw, gb = ctx.saved_tensors
            go = grad_out.to(_acc(ctx.dtypes[0]))
            dh = (gh.to(go.dtype) * go).to(ctx.dtypes[0]) if need[0] else None
        else:
            hidden, weight, bias = ctx.saved_tensors
            kind, opts, teachers, labels, fixed, chunk = ctx.recompute
            for name, t, version in ctx.versions:  # as autograd refuses for saved tensors
                if t._version != version:
                    raise RuntimeError(
                        f"{name}, which the backward of a reduction='none' fused loss reads "
                        "again, has been modified by an inplace operation since the forward: "
                        "keep it unchanged until backward(), or pass a copy"
                    )
            go = torch.ones((), dtype=_acc(hidden.dtype), device=hidden.device)
            # autocast off as in the forward (see _finish): a backward called inside an autocast
            # region must not recompute the chunks in another precision
            with torch.no_grad(), no_autocast(hidden.device.type):
                _, _, dh, gw, gb = _run_chunks(kind, opts, hidden, weight, bias, teachers,
                                               labels, fixed, chunk, grad_out.to(go.dtype),
                                               True, False)  # fmt: skip
            dh = dh.to(ctx.dtypes[0])
        dw = (gw * go).to(ctx.dtypes[1]) if need[1] else None
        db = (gb * go).to(ctx.dtypes[2]) if need[2] else None
        return (dh if need[0] else None, dw, db) + (None,) * 9


def _versions(teachers: list, labels: Tensor | None, fixed: Tensor | None) -> list:
    """``(name, tensor, version)`` of every input a ``reduction="none"`` backward reads again
    (autograd's check covers only the saved hidden states and head)."""
    out = [("labels", labels), ("weights", fixed)]
    for t in teachers:
        if isinstance(t, _Dense):
            out.append((t.name, t.t))
        elif isinstance(t, _Head):
            out += [(f"{t.name} hidden", t.hidden), (f"{t.name} weight", t.weight),
                    (f"{t.name} bias", t.bias)]  # fmt: skip
        else:  # a SparseTeacher
            out += [("teachers (indices)", t.indices), ("teachers (logprobs)", t.logprobs)]
    # inference tensors (teachers run under torch.inference_mode) have no version counter, and
    # cannot be changed in place outside inference mode anyway
    return [(name, x, x._version) for name, x in out
            if isinstance(x, Tensor) and not x.is_inference()]  # fmt: skip


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _mean_scale(reduction, labels, n, ignore_index, num_items, acc, device):
    """The factor that turns the row sum into the reduced loss (MATH.md section 4)."""
    if reduction == "sum":
        return torch.ones((), dtype=acc, device=device)
    if num_items is not None:
        return 1.0 / validate.items_divisor(num_items, acc, device)
    if labels is None:
        return torch.full((), 1.0 / max(n, 1), dtype=acc, device=device)
    # The count stays a tensor: no host synchronisation on GPU.
    return 1.0 / (labels != ignore_index).sum().clamp_min(1).to(acc)


# ----------------------------------------------------------------------------------------------
# Public functional API
# ----------------------------------------------------------------------------------------------


def _prepare(student_hidden, student_weight, teachers, labels, student_bias, chunk_size,
             check_finite=True):  # fmt: skip
    hidden = _check_matrix(student_hidden, "student_hidden", student_hidden.dim()
                           if isinstance(student_hidden, Tensor) else 2)  # fmt: skip
    if hidden.dim() < 1:
        raise ValueError("student_hidden must be [N, H] (or [..., H])")
    lead = hidden.shape[:-1]
    hidden = hidden.reshape(lead.numel(), hidden.shape[-1])  # (-1 fails for H = 0)
    if not lead:  # one row [H]: its teachers' rows are in that leading shape too ([V], [K, V])
        teachers = _one_row_teachers(teachers)
    weight = _check_matrix(student_weight, "student_weight", 2)
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"student_weight has hidden size {weight.shape[1]} (shape {tuple(weight.shape)}) but "
            f"student_hidden has {hidden.shape[1]}"
        )
    if weight.dtype != hidden.dtype:
        raise TypeError(f"student_weight has dtype {weight.dtype} but student_hidden has "
                        f"{hidden.dtype}")  # fmt: skip
    if weight.device != hidden.device:
        raise ValueError(f"student_weight is on {weight.device} but student_hidden is on "
                         f"{hidden.device}")  # fmt: skip
    n, v = hidden.shape[0], weight.shape[0]
    if student_bias is not None:
        _check_matrix(student_bias, "student_bias", 1)
        if student_bias.shape[0] != v:
            raise ValueError(f"student_bias has {student_bias.shape[0]} entries but "
                             f"student_weight has {v} rows")  # fmt: skip
        if student_bias.dtype != hidden.dtype or student_bias.device != hidden.device:
            raise TypeError("student_bias must have student_hidden's dtype and device")
    if isinstance(teachers, Tensor) and teachers.dim() > 3:
        _check_lead(teachers.shape[1:-1], lead, "teachers")
        teachers = teachers.reshape(teachers.shape[0], -1, teachers.shape[-1])
    elif isinstance(teachers, Sequence) and not isinstance(teachers, (str, bytes)):
        teachers = [_flatten_teacher(t, lead, f"teachers[{i}]") for i, t in enumerate(teachers)]
    elif _is_sparse(teachers) and teachers.indices.dim() > 2:
        _check_lead(teachers.indices.shape[:-1], lead, "teachers")
        teachers = teachers.flatten()
    tlist = _parse_teachers(teachers, n, v, hidden.device, bool(check_finite))
    if labels is not None:
        if not isinstance(labels, Tensor):
            raise TypeError(f"labels must be a torch.Tensor or None, got {type(labels).__name__}")
        if labels.dtype.is_floating_point or labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(f"labels must be an integer tensor, got dtype {labels.dtype}")
        if labels.shape != lead:
            raise ValueError(f"labels must have shape {tuple(lead)} (student_hidden without its "
                             f"last dim), got {tuple(labels.shape)}")  # fmt: skip
        if labels.device != hidden.device:
            raise ValueError(
                f"labels is on {labels.device} but student_hidden is on {hidden.device}"
            )
        labels = labels.reshape(-1).to(dtype=torch.int64).contiguous()
    chunk = validate.check_chunk_size(chunk_size) or auto_chunk_size(n, v, len(tlist))
    return hidden, weight, tlist, labels, lead, n, chunk


def _check_lead(teacher_lead: torch.Size, lead: torch.Size, name: str) -> None:
    """A teacher of several leading dimensions pairs its rows with the student's by position:
    its leading shape must be student_hidden's (a [T, B] teacher against a [B, T] student paired
    the wrong rows). A teacher of one leading dimension, or a flattened student ``[N, H]``, pairs
    the rows flattened in order: checked by count."""
    if len(lead) > 1 and teacher_lead != lead:
        raise ValueError(
            f"{name} has leading shape {tuple(teacher_lead)} but student_hidden has "
            f"{tuple(lead)} (the rows must be in the same order; or flatten both to [N, ...])"
        )


def _one_row_teachers(teachers: Any) -> Any:
    """The teachers of a one-row student ``[H]`` given without a row dimension (a stack
    ``[K, V]``, logits ``[V]``, a head's hidden state ``[H_k]``, a SparseTeacher ``[k]``) with one
    added; teachers that have it already are returned as they are."""

    def one(t: Any) -> Any:
        if isinstance(t, Tensor) and t.dim() == 1:
            return t[None]
        if _is_sparse(t) and t.indices.dim() == 1:
            return type(t)(t.indices[None], t.logprobs[None], t.vocab_size)
        if isinstance(t, (tuple, list)) and t and isinstance(t[0], Tensor) and t[0].dim() == 1:
            return (t[0][None], *t[1:])
        return t

    if isinstance(teachers, Tensor):
        return teachers[:, None] if teachers.dim() == 2 else teachers
    if isinstance(teachers, Sequence) and not isinstance(teachers, (str, bytes)):
        return [one(t) for t in teachers]
    return one(teachers)


def _flatten_teacher(t: Any, lead: torch.Size, name: str) -> Any:
    """One teacher of a sequence with its leading dimensions flattened to rows."""
    if isinstance(t, Tensor) and t.dim() > 2:
        _check_lead(t.shape[:-1], lead, name)
        return t.reshape(-1, t.shape[-1])
    if isinstance(t, (tuple, list)) and len(t) >= 1 and isinstance(t[0], Tensor) and t[0].dim() > 2:
        _check_lead(t[0].shape[:-1], lead, f"{name} hidden")
        return (t[0].reshape(t[0].shape[:-1].numel(), t[0].shape[-1]), *t[1:])
    if _is_sparse(t) and t.indices.dim() > 2:
        _check_lead(t.indices.shape[:-1], lead, name)
        return t.flatten()
    return t


def no_autocast(device_type: str):
    """A context with autocast off on ``device_type`` (nothing on a device autocast does not
    know, such as ``meta``)."""
    import contextlib

    if not torch.amp.is_autocast_available(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)


def autocast_cast(*tensors):
    """The float32 ones of ``tensors`` (None passes) cast to the autocast dtype of their device,
    as autocast casts ``F.linear``'s inputs, when autocast is on there; else unchanged."""
    dev = next(x.device.type for x in tensors if x is not None)
    if not (torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev)):
        return tensors
    low = torch.get_autocast_dtype(dev)
    return tuple(x.to(low) if x is not None and x.dtype == torch.float32 else x for x in tensors)


def _autocast_inputs(hidden, weight, bias, tlist):
    """Under autocast, the head's inputs as autocast gives ``F.linear`` them: float32 hidden
    states, weights and biases (the student's, differentiably, and the teacher heads') cast to the
    autocast dtype, so the chunks' matmuls run where the unfused ``lm_head(h)`` would, in every
    reduction and for every gradient (the chunk loop itself then runs with autocast off: it
    had rounded only ``grad_hidden`` of a mean or sum to bfloat16)."""
    for t in tlist:
        if isinstance(t, _Head):
            t.hidden, t.weight, t.bias = autocast_cast(t.hidden, t.weight, t.bias)
    return autocast_cast(hidden, weight, bias)


def _finish(kind, opts, hidden, weight, bias, tlist, labels, fixed, chunk, lead, reduction,
            num_items, return_stats):  # fmt: skip
    kd = "mtbkd" if kind == "mtbkd" else "multi_teacher_kd"
    validate.check_no_func_transform(f"fused_linear_{kd}_loss")
    if reduction != "mean" and num_items is not None:  # checked whatever the reduction
        validate.items_divisor(num_items, _acc(hidden.dtype), hidden.device)
    if not torch.is_grad_enabled():  # evaluation: the forward computes no head gradient then
        hidden, weight = hidden.detach(), weight.detach()
        bias = None if bias is None else bias.detach()
    hidden, weight, bias = _autocast_inputs(hidden, weight, bias, tlist)
    fn_ctx: dict = {"want_stats": bool(return_stats)}
    with no_autocast(hidden.device.type):
        out = _FusedLinearLoss.apply(hidden, weight, bias, kind, opts, tlist, labels, fixed, chunk,
                                     reduction, num_items, fn_ctx)  # fmt: skip
    if reduction == "none":
        out = out.reshape(lead)
    if not return_stats:
        return out
    extras = fn_ctx["stats"]
    k = len(tlist)
    if not extras:  # N = 0: no chunk ran; the statistics are empty, as the plain loss's
        acc = _acc(hidden.dtype)
        extras = [[hidden.new_zeros((k, 0) if j < 3 else (0,), dtype=acc) for j in range(5)]]
    w, resp, ent, prior, ce = (torch.cat([e[j] for e in extras], dim=-1) for j in range(5))
    stats = F.MTBKDStats(
        weights=w.reshape(k, *lead), responsibilities=resp.reshape(k, *lead),
        entropy=ent.reshape(k, *lead), prior=prior.reshape(lead), ce=ce.reshape(lead),
    )  # fmt: skip
    return out, stats


def _fixed(weights, k, lead, hidden):
    mode, fixed = ops.WEIGHT_MODES.get(weights if isinstance(weights, str) else "fixed"), None
    if isinstance(weights, Tensor):
        # [K], [K, *lead] (student_hidden's leading shape) or [K, N] (the rows flattened)
        # (fixed_weights takes all three; given the flattened rows, its error had left out
        # the [K, *lead] form)
        fixed = validate.fixed_weights(weights, k, lead, hidden, like_name="student_hidden")
    elif not isinstance(weights, str) or weights not in ("entropy", "uniform"):
        raise ValueError(f"weights must be 'entropy', 'uniform' or a Tensor, got {weights!r}")
    return mode, fixed


def fused_linear_mtbkd_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    teachers: Tensor | Sequence[Any],
    labels: Tensor | None = None,
    student_bias: Tensor | None = None,
    *,
    temperature: float = 2.0,
    concentration: float = 5.0,
    prior_weight: float = 0.02,
    hard_label_weight: float = 1.0,
    weights: str | Tensor = "entropy",
    weight_temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: int | Tensor | None = None,
    return_stats: bool = False,
    check_finite: bool = True,
    chunk_size: int | None = None,
):
    """:func:`mtbkd.functional.mtbkd_loss` of ``z = student_hidden @ student_weightᵀ (+ bias)``
    without materialising ``z`` (MATH.md sections 2 and 4), in row chunks of ``chunk_size``
    (default :func:`auto_chunk_size`: a working set of about :data:`CHUNK_BYTES`; larger chunks
    are a little faster for proportionally more memory).

    ``teachers``: teacher logits ``[K, N, V]`` or a sequence whose items are logits ``[N, V_k]``,
    heads ``(hidden [N, H_k], weight [V_k, H_k], bias | None)`` or :class:`mtbkd.SparseTeacher`
    (V_k ≥ V; a padded teacher vocabulary is sliced to the student's V). With ``student_hidden``
    ``[..., H]``, each teacher's rows (``N`` above) are the flattened rows or ``student_hidden``'s
    leading shape itself; another leading shape (``[T, B]`` for ``[B, T]``) is refused (a
    flattened ``student_hidden`` ``[N, H]`` takes any teacher of N rows, flattened); one row
    ``[H]`` also takes teachers without a row dimension (``[K, V]``, ``[V]``, ``[H_k]``). Gradients
    flow to ``student_hidden``, ``student_weight`` and ``student_bias`` only. With
    ``reduction="none"`` the backward recomputes the chunks from the teachers and labels: one
    changed in place between the forward and ``backward()`` is refused (``RuntimeError``), as
    autograd refuses a changed saved tensor.
    """
    validate.check_mtbkd_options(
        temperature,
        concentration,
        weight_temperature,
        prior_weight,
        hard_label_weight,
        reduction,
    )
    validate.check_flags(check_finite=check_finite, return_stats=return_stats)
    hidden, weight, tlist, labels, lead, n, chunk = _prepare(
        student_hidden, student_weight, teachers, labels, student_bias, chunk_size, check_finite
    )
    mode, fixed = _fixed(weights, len(tlist), lead, hidden)
    opts = {
        "temperature": float(temperature), "concentration": float(concentration),
        "prior_weight": float(prior_weight), "hard_label_weight": float(hard_label_weight),
        "mode": mode, "weight_temperature": float(weight_temperature),
        "ignore_index": validate.check_ignore_index(ignore_index),
        "check_finite": bool(check_finite),
    }  # fmt: skip
    return _finish("mtbkd", opts, hidden, weight, student_bias, tlist, labels, fixed, chunk, lead,
                   reduction, num_items_in_batch, return_stats)  # fmt: skip


def fused_linear_multi_teacher_kd_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    teachers: Tensor | Sequence[Any],
    labels: Tensor | None = None,
    student_bias: Tensor | None = None,
    *,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    weights: str | Tensor = "entropy",
    weight_temperature: float = 1.0,
    hard_label_weight: float = 0.0,
    soft_label_weight: float = 1.0,
    scale_by_t2: bool = False,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: int | Tensor | None = None,
    check_finite: bool = True,
    chunk_size: int | None = None,
) -> Tensor:
    """:func:`mtbkd.functional.multi_teacher_kd_loss` of ``z = student_hidden @ student_weightᵀ
    (+ bias)`` without materialising ``z`` (MATH.md sections 3 and 4); arguments as in
    :func:`fused_linear_mtbkd_loss`.
    """
    validate.check_kd_options(
        divergence,
        beta,
        temperature,
        weight_temperature,
        hard_label_weight,
        soft_label_weight,
        reduction,
    )
    validate.check_flags(check_finite=check_finite, scale_by_t2=scale_by_t2)
    hidden, weight, tlist, labels, lead, n, chunk = _prepare(
        student_hidden, student_weight, teachers, labels, student_bias, chunk_size, check_finite
    )
    mode, fixed = _fixed(weights, len(tlist), lead, hidden)
    opts = {
        "divergence": ops.DIVERGENCES[divergence], "beta": float(beta),
        "temperature": float(temperature), "mode": mode,
        "weight_temperature": float(weight_temperature),
        "hard_label_weight": float(hard_label_weight),
        "soft_label_weight": float(soft_label_weight),
        "soft_scale": float(temperature) ** 2 if scale_by_t2 else 1.0,
        "ignore_index": validate.check_ignore_index(ignore_index),
        "check_finite": bool(check_finite),
    }  # fmt: skip
    return _finish("kd", opts, hidden, weight, student_bias, tlist, labels, fixed, chunk, lead,
                   reduction, num_items_in_batch, False)  # fmt: skip


# ----------------------------------------------------------------------------------------------
# nn.Modules
# ----------------------------------------------------------------------------------------------


class FusedLinearMTBKDLoss(MTBKDLoss):
    """:class:`mtbkd.MTBKDLoss` fused with the student's output head (no ``[N, V]`` logits).

    Example::

        loss_fn = mtbkd.FusedLinearMTBKDLoss(temperature=2.0)
        loss = loss_fn(h, lm_head.weight, [(h_t1, head_t1.weight, None), t2_logits], labels)
    """

    def __init__(self, *, chunk_size: int | None = None, **options: Any) -> None:
        super().__init__(**options)
        self.chunk_size = validate.check_chunk_size(chunk_size)

    def forward(  # type: ignore[override]
        self,
        student_hidden: Tensor,
        student_weight: Tensor,
        teachers: Tensor | Sequence[Any],
        labels: Tensor | None = None,
        student_bias: Tensor | None = None,
        *,
        num_items_in_batch: int | Tensor | None = None,
        return_stats: bool = False,
    ):
        return fused_linear_mtbkd_loss(
            student_hidden, student_weight, teachers, labels, student_bias,
            temperature=self.temperature, concentration=self.concentration,
            prior_weight=self.prior_weight, hard_label_weight=self.hard_label_weight,
            weights=self.weights, weight_temperature=self.weight_temperature,
            ignore_index=self.ignore_index, reduction=self.reduction,
            num_items_in_batch=num_items_in_batch, return_stats=return_stats,
            check_finite=self.check_finite, chunk_size=self.chunk_size,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return super().extra_repr() + f", chunk_size={self.chunk_size}"


class FusedLinearMultiTeacherKDLoss(MultiTeacherKDLoss):
    """:class:`mtbkd.MultiTeacherKDLoss` fused with the student's output head."""

    def __init__(self, *, chunk_size: int | None = None, **options: Any) -> None:
        super().__init__(**options)
        self.chunk_size = validate.check_chunk_size(chunk_size)

    def forward(  # type: ignore[override]
        self,
        student_hidden: Tensor,
        student_weight: Tensor,
        teachers: Tensor | Sequence[Any],
        labels: Tensor | None = None,
        student_bias: Tensor | None = None,
        *,
        num_items_in_batch: int | Tensor | None = None,
    ) -> Tensor:
        return fused_linear_multi_teacher_kd_loss(
            student_hidden, student_weight, teachers, labels, student_bias,
            divergence=self.divergence, beta=self.beta, temperature=self.temperature,
            weights=self.weights, weight_temperature=self.weight_temperature,
            hard_label_weight=self.hard_label_weight, soft_label_weight=self.soft_label_weight,
            scale_by_t2=self.scale_by_t2, ignore_index=self.ignore_index,
            reduction=self.reduction, num_items_in_batch=num_items_in_batch,
            check_finite=self.check_finite, chunk_size=self.chunk_size,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return super().extra_repr() + f", chunk_size={self.chunk_size}"


def fused_linear_from(loss: nn.Module, chunk_size: int | None = None) -> nn.Module:
    """The fused-linear twin of an MTBKDLoss / MultiTeacherKDLoss (same options).

    A loss that is already fused is returned as it is, or, when ``chunk_size`` is given and
    differs from its own, as a new one with that chunk size.
    """
    chunk_size = validate.check_chunk_size(chunk_size)
    if isinstance(loss, (FusedLinearMTBKDLoss, FusedLinearMultiTeacherKDLoss)):
        if chunk_size is None or chunk_size == loss.chunk_size:
            return loss
    if isinstance(loss, MTBKDLoss):
        names = ("temperature", "concentration", "prior_weight", "hard_label_weight", "weights",
                 "weight_temperature", "ignore_index", "reduction", "check_finite")  # fmt: skip
        return FusedLinearMTBKDLoss(chunk_size=chunk_size,
                                    **{k: getattr(loss, k) for k in names})  # fmt: skip
    if isinstance(loss, MultiTeacherKDLoss):
        names = ("divergence", "beta", "temperature", "weights", "weight_temperature",
                 "hard_label_weight", "soft_label_weight", "scale_by_t2", "ignore_index",
                 "reduction", "check_finite")  # fmt: skip
        return FusedLinearMultiTeacherKDLoss(chunk_size=chunk_size,
                                             **{k: getattr(loss, k) for k in names})  # fmt: skip
    raise TypeError(
        "loss must be an mtbkd.MTBKDLoss or mtbkd.MultiTeacherKDLoss (or a fused-linear one), "
        f"got {type(loss).__name__}"
    )
