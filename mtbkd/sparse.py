"""Sparse top-k teachers for offline distillation (MATH.md section 5).

Inference servers return, per token, a teacher's top-k log-probabilities; storing those instead
of ``[N, V]`` logits takes ``k (4 + 4)`` bytes a row (0.26 % of dense fp32 at k = 64, V = 49152).
A :class:`SparseTeacher` ``(indices [..., k], logprobs [..., k])`` is accepted wherever teacher
logits are (:func:`mtbkd.mtbkd_loss`, :func:`mtbkd.multi_teacher_kd_loss`, the losses and the
fused-linear losses).

The tail-bucket convention (what :func:`bucketize` computes), per row:

* **Support.** ``U`` = the union of the K teachers' top-k indices. Each class of ``U`` is one
  bucket; the classes outside ``U`` form one **tail bucket**. With one teacher (or teachers that
  share their support) ``U`` is that support and this is exactly MATH.md's tail bucket.
* **Student.** Bucket ``c ∈ U`` has the student's probability ``q_c``; the tail bucket
  ``1 − Σ_{c∈U} q_c`` (its logit ``logsumexp`` over the complement, computed directly, not by
  subtraction).
* **Teachers.** Teacher k knows ``p_kc`` on its own support ``S_k`` and the remaining mass
  ``r_k = 1 − Σ_{c∈S_k} p_kc``, not how ``r_k`` splits over the other ``V − |S_k|`` classes. It is
  spread uniformly over them (the maximum-entropy completion consistent with what the teacher
  reported): ``p_kc = r_k / (V − |S_k|)`` for ``c ∈ U \\ S_k`` and the tail bucket gets
  ``r_k (V − |U|) / (V − |S_k|)``. Teachers with equal supports get exactly their tail ``r_k``.
* **Temperature** is applied to the bucketed distributions (their log-probabilities are the
  bucket logits).
* **Negligible tail.** When every teacher's tail-bucket mass is below ``tail_threshold``
  (default 1e-6 of the total, i.e. rounding), or ``U`` covers the vocabulary, the row has no
  tail bucket: the student is then compared on ``U`` alone, and a student tail of exactly 0 never
  gives an infinite loss. With k = V this makes the loss equal to the dense loss. The price: on
  such a row the soft term does not see the student's own mass outside ``U`` (a uniform student
  over 1,000 classes against a confident top-8 teacher: forward KL 0.33 against the dense 5.16);
  the hard-label term, on the full distribution, does.
* **Hard labels.** The cross-entropy term uses the student's full distribution (exact), not the
  buckets.

Rows have different numbers of buckets (duplicates in the union); the padding buckets get
probability 0 for the student and every teacher, which changes no divergence, weight or gradient.
MT-BKD's prior constant ``−lgamma(B + λ)`` is corrected to each row's real bucket count B.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

__all__ = [
    "SparseTeacher",
    "topk_teacher",
    "bucketize",
    "is_sparse",
    "save_sparse_teachers",
    "load_sparse_teachers",
    "SparseTeacherData",
    "sparse_mtbkd_loss",
    "sparse_multi_teacher_kd_loss",
]

# Log-probability given to padding buckets: exp of it is exactly 0 in fp32 and fp64, and every
# term p·log q with p = 0 stays 0 (a finite value, unlike -inf).
_PAD = 1.0e4
# The smallest probability a teacher bucket has after the temperature: a bucket of mass 0 (a
# confident top-1 teacher leaves none for another teacher's classes) is 0 to within 1e-30, and
# reverse KL stays finite (about 69 times the student's mass there, whatever τ).
_LOG_FLOOR = math.log(1e-30)


def _log_mass(mass: Tensor, temperature: float) -> Tensor:
    """``log(mass)`` of a teacher bucket, floored at ``log(1e-30) · τ``: after division by τ
    its probability is at least 1e-30 (a floor on the raw mass, 1e-30 before τ, became 1e-3 of
    mass after τ = 10, and 1e-60 after τ = 0.5)."""
    floor = _LOG_FLOOR * float(temperature)
    return mass.clamp_min(torch.finfo(mass.dtype).tiny).log().clamp_min(floor)


# A row whose top-k probabilities sum above this (5 % over 1: far beyond the rounding of fp16
# log-probabilities) holds logits, not log-probabilities
_MASS_LIMIT = math.log(1.05)


class SparseTeacher:
    """A teacher's top-k output: ``indices [..., k]`` (int, distinct within a row, in
    ``[0, V)``: checked by the losses) and ``logprobs [..., k]`` (float), log-probabilities at
    temperature 1 (MATH.md section 5; a row whose probabilities sum above 1.05 is an error: those
    are logits). No gradient flows into it. ``vocab_size``: the size V of the vocabulary the
    top-k was taken over, when known (:func:`topk_teacher` and :func:`load_sparse_teachers` of a
    file that recorded it set it); the losses then refuse a student of a larger V, whose tail
    bucket would be spread over classes the teacher never scored (a larger ``vocab_size`` is a
    vocabulary padded beyond the student's, as dense teachers may be)."""

    def __init__(self, indices: Tensor, logprobs: Tensor, vocab_size: int | None = None) -> None:
        if not isinstance(indices, Tensor) or not isinstance(logprobs, Tensor):
            raise TypeError("SparseTeacher(indices, logprobs) takes two tensors")
        if indices.dtype.is_floating_point or indices.dtype == torch.bool or indices.is_complex():
            raise TypeError(f"indices must be an integer tensor, got dtype {indices.dtype}")
        if not logprobs.is_floating_point():
            raise TypeError(f"logprobs must be a floating-point tensor, got dtype {logprobs.dtype}")
        if indices.shape != logprobs.shape or indices.dim() < 1 or indices.shape[-1] == 0:
            raise ValueError(
                "indices and logprobs must have the same non-empty shape [..., k], got "
                f"{tuple(indices.shape)} and {tuple(logprobs.shape)}"
            )
        if indices.device != logprobs.device:
            raise ValueError(f"indices is on {indices.device} but logprobs is on {logprobs.device}")
        if vocab_size is not None and (
            isinstance(vocab_size, bool)
            or not isinstance(vocab_size, numbers.Integral)
            or vocab_size < 1
        ):
            raise ValueError(f"vocab_size must be a positive int or None, got {vocab_size!r}")
        if indices.dtype in (torch.uint16, torch.uint32, torch.uint64):
            # (few torch ops take these: torch.where and max failed on them later) as the signed
            # dtype that holds them; uint64 beyond int64's range reads negative, refused later
            indices = indices.to(torch.int32 if indices.dtype == torch.uint16 else torch.int64)
        self.indices = indices.detach()
        self.logprobs = logprobs.detach()
        self.vocab_size = None if vocab_size is None else int(vocab_size)

    @property
    def k(self) -> int:
        return self.indices.shape[-1]

    @property
    def shape(self) -> torch.Size:
        """The leading (row) shape."""
        return self.indices.shape[:-1]

    @property
    def device(self) -> torch.device:
        return self.indices.device

    @property
    def nbytes(self) -> int:
        return (self.indices.numel() * self.indices.element_size()
                + self.logprobs.numel() * self.logprobs.element_size())  # fmt: skip

    def flatten(self) -> SparseTeacher:
        """``[N, k]`` rows."""
        return SparseTeacher(self.indices.reshape(-1, self.k), self.logprobs.reshape(-1, self.k),
                             self.vocab_size)  # fmt: skip

    def rows(self, rows: slice) -> SparseTeacher:
        return SparseTeacher(self.indices[rows], self.logprobs[rows], self.vocab_size)

    def to(self, device: torch.device | str) -> SparseTeacher:
        return SparseTeacher(self.indices.to(device), self.logprobs.to(device), self.vocab_size)

    def __repr__(self) -> str:
        v = "" if self.vocab_size is None else f", vocab_size={self.vocab_size}"
        return f"SparseTeacher(shape={tuple(self.shape)}, k={self.k}{v}, device={self.device})"


def is_sparse(teacher_logits: Any) -> bool:
    """Whether ``teacher_logits`` is a :class:`SparseTeacher` or a sequence of them."""
    if isinstance(teacher_logits, SparseTeacher):
        return True
    if isinstance(teacher_logits, Sequence) and not isinstance(teacher_logits, (str, bytes)):
        return len(teacher_logits) > 0 and any(isinstance(t, SparseTeacher) for t in teacher_logits)
    return False


def topk_teacher(logits: Tensor, k: int) -> SparseTeacher:
    """The top-``k`` log-probabilities of ``log_softmax(logits)`` (temperature 1) per row, with
    ``vocab_size`` = V of ``logits``."""
    if not isinstance(logits, Tensor) or not logits.is_floating_point():
        raise TypeError("logits must be a floating-point tensor")
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= logits.shape[-1]:
        raise ValueError(f"k must be an integer in [1, V={logits.shape[-1]}], got {k!r}")
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logp = torch.log_softmax(logits.detach().to(acc), dim=-1)
    vals, idx = logp.topk(k, dim=-1)
    return SparseTeacher(idx, vals, logits.shape[-1])


def _as_list(teachers: SparseTeacher | Sequence[SparseTeacher]) -> list[SparseTeacher]:
    if isinstance(teachers, SparseTeacher):
        return [teachers]
    out = list(teachers)
    if len(out) == 0:
        raise ValueError("teacher_logits must hold at least one teacher (got K = 0)")
    for i, t in enumerate(out):
        if not isinstance(t, SparseTeacher):
            raise TypeError(
                f"teacher_logits[{i}] is a {type(t).__name__}: sparse (SparseTeacher) and dense "
                "teachers cannot be mixed (convert dense ones with mtbkd.topk_teacher)"
            )
    return out


def bucketize(
    student_logits: Tensor,
    sparse_teachers: SparseTeacher | Sequence[SparseTeacher],
    *,
    tail_threshold: float = 1e-6,
    return_counts: bool = False,
    temperature: float = 1.0,
    floor_temperature: float | None = None,
):
    """Bucketed logits ``(student [N, B], [K × teacher [N, B]])`` (MATH.md section 5).

    ``B = Σ_k k_k + 1`` (the union of supports, padded, plus the tail bucket); see the module
    docstring for the convention. The student's bucket logits are differentiable functions of
    ``student_logits`` (autograd); teachers' are constants. Both are float32 (float64 for float64
    input). With ``return_counts`` also the number of real buckets per row ``[N]``.
    ``temperature``: the largest temperature the buckets will be divided by. Padding sits
    ``1e4 · max(1, temperature)`` below, of mass 0 after it (a fixed -1e4 became real mass at a
    large τ). A teacher bucket of mass 0 gets ``log(1e-30) · floor_temperature`` (default
    ``temperature``), a probability of 1e-30 after division by ``floor_temperature`` (``0^(1/τ)
    = 0`` to within that; the log of a raw floor of 1e-30 became 1e-3 after τ = 10), which keeps
    reverse KL finite at about 69 nats a unit of the student's mass there. The losses pass
    ``max(τ, τ_w)``, so that after division by either temperature the bucket holds at most
    1e-30 (neither the divergence nor the entropy weights see mass there), except for reverse
    KL, whose value there is the floor's own: it gets its divergence's τ, so that it does not
    depend on the weights' temperature (after division by a larger τ_w the bucket then holds
    ``1e-30^(τ / τ_w)``, 1e-3 at τ = 0.1, τ_w = 1, which the entropy weights do see).
    """
    from mtbkd import validate

    validate.check_positive(temperature, "temperature")
    if floor_temperature is not None:
        validate.check_positive(floor_temperature, "floor_temperature")
    z2 = student_logits
    if z2.dim() != 2:
        raise ValueError(f"student_logits must be [N, V], got shape {tuple(z2.shape)}")
    teachers = _as_list(sparse_teachers)
    n, v = z2.shape
    acc = torch.float64 if z2.dtype == torch.float64 else torch.float32
    idx_list = []
    for i, t in enumerate(teachers):
        if t.indices.dim() != 2 or t.indices.shape[0] != n:
            raise ValueError(f"teacher_logits[{i}] must have indices [N={n}, k], got "
                             f"{tuple(t.indices.shape)}")  # fmt: skip
        if t.device != z2.device:
            raise ValueError(f"teacher_logits[{i}] is on {t.device} but student_logits is on "
                             f"{z2.device}")  # fmt: skip
        if t.k > v:
            raise ValueError(f"teacher_logits[{i}] has k = {t.k} > V = {v}")
        if t.vocab_size is not None and t.vocab_size < v:  # the tail's spread would be wrong
            # (a larger one is a vocabulary padded beyond the student's, as for dense teachers:
            # the index check above keeps its top-k off the padding)
            raise ValueError(
                f"teacher_logits[{i}] is the top-k of a vocabulary of {t.vocab_size} classes but "
                f"student_logits has V = {v}: the student has classes the teacher never scored"
            )
        idx = t.indices.to(torch.int64)
        if n and validate.has_values(idx) and bool(((idx < 0) | (idx >= v)).any()):
            raise ValueError(
                f"teacher_logits[{i}] has indices outside [0, V={v}) (a teacher "
                "vocabulary padded beyond the student's must not put mass there)"
            )
        idx_list.append(idx)
    z = z2.to(acc)
    pad = _PAD * max(1.0, float(temperature))
    floor_t = float(temperature if floor_temperature is None else floor_temperature)
    union, _ = torch.cat(idx_list, dim=-1).sort(dim=-1)  # [N, W]
    dup = torch.zeros_like(union, dtype=torch.bool)
    dup[:, 1:] = union[:, 1:] == union[:, :-1]
    real = ~dup
    n_union = real.sum(-1)  # [N]
    outside = v - n_union  # classes in the tail bucket

    # Teachers: look every union class up in each (sorted) support.
    t_buckets, tail_mass = [], []
    for i, (t, idx) in enumerate(zip(teachers, idx_list, strict=True)):
        s_idx, order = idx.sort(dim=-1)
        if (
            n
            and t.k > 1
            and validate.has_values(s_idx)
            and bool((s_idx[:, 1:] == s_idx[:, :-1]).any())
        ):
            raise ValueError(
                f"teacher_logits[{i}] lists a class twice in one row (its mass would be counted "
                "twice and the tail bucket would lose it)"
            )
        s_lp = t.logprobs.to(acc).gather(-1, order)
        pos = torch.searchsorted(s_idx, union).clamp_max(t.k - 1)
        found = s_idx.gather(-1, pos) == union
        mass = torch.logsumexp(s_lp, dim=-1)
        over = mass > _MASS_LIMIT
        if n and validate.has_values(over) and bool(over.any()):
            row = int(over.nonzero()[0, 0])
            raise ValueError(
                f"teacher_logits[{i}] log-probabilities sum to {float(mass[row].exp()):.4g} > 1 "
                f"in row {row}: a SparseTeacher takes log-probabilities (log_softmax over the "
                "whole vocabulary, then the top k), not logits"
            )
        rest = (-torch.expm1(mass)).clamp_min(0.0)  # r_k
        unknown = v - t.k
        fill = rest / unknown if unknown > 0 else torch.zeros_like(rest)
        lp_u = torch.where(found, s_lp.gather(-1, pos), _log_mass(fill, floor_t)[:, None])
        tail_mass.append(fill * outside.to(acc))
        t_buckets.append((torch.where(real, lp_u, -pad), tail_mass[-1]))
    keep = (torch.stack(tail_mass).amax(0) >= tail_threshold) & (outside > 0)  # [N]

    # Student: gathered logits and the complement's logsumexp (exact, no 1 - Σq cancellation).
    z_max = z.detach().amax(-1, keepdim=True) if v else z.new_zeros(n, 1)
    z_u = torch.where(real, z.gather(-1, union), z_max - pad)
    # An extra column keeps logsumexp finite (and its gradient defined) where the complement is
    # empty or the tail is dropped; it is -inf (no contribution) where the tail is kept.
    col = torch.where(keep, float("-inf"), 0.0).to(acc)[:, None]
    zc = torch.cat([z, col], dim=-1)
    zc = zc.scatter(-1, union, float("-inf"))
    # a kept tail whose student logits are all -inf (e.g. masked vocabulary, check_finite=False)
    # has mass exactly 0: its logit is -inf, and logsumexp (whose backward is NaN over an all -inf
    # row) runs on zeros there instead
    empty = ~torch.isfinite(zc).any(-1)
    lse = torch.logsumexp(torch.where(empty[:, None], 0.0, zc), dim=-1)
    z_tail = torch.where(keep & ~empty, lse,
                         torch.where(keep, float("-inf"), z_max[:, 0] - pad))  # fmt: skip
    student = torch.cat([z_u, z_tail[:, None]], dim=-1)
    teacher_out = [
        torch.cat([lp, torch.where(keep, _log_mass(m, floor_t), -pad)[:, None]], dim=-1)
        .contiguous()
        for lp, m in t_buckets
    ]  # fmt: skip
    if return_counts:
        return student, teacher_out, n_union + keep.to(n_union.dtype)
    return student, teacher_out


# ----------------------------------------------------------------------------------------------
# Losses on sparse teachers: the dense fused ops on the buckets, exact CE on the full student
# ----------------------------------------------------------------------------------------------


def _sparse_rows(kind: str, opts: dict, z: Tensor, teachers: list[SparseTeacher],
                 labels: Tensor | None, fixed: Tensor | None):  # fmt: skip
    """Per-row loss ``[N]`` (differentiable in ``z [N, V]``) and the op's statistics."""
    from mtbkd import ops

    ignore = opts["ignore_index"]
    if labels is not None:
        from mtbkd import validate

        if validate.has_values(labels):  # (meta and fake tensors: shapes only)
            validate.check_label_range(labels, z.shape[-1], ignore)
        # A masked row (padding) counts for nothing (MATH.md section 4) whatever its teacher
        # outputs hold (a padded batch's indices 0 or -1): a valid placeholder replaces them.
        keep = (labels != ignore)[:, None]
        teachers = [t if t.k > z.shape[-1] else SparseTeacher(
            torch.where(keep, t.indices, torch.arange(t.k, device=z.device)),
            torch.where(keep, t.logprobs, -math.log(t.k)), t.vocab_size,
        ) for t in teachers]  # fmt: skip
    tau = max(opts["temperature"], opts["weight_temperature"])
    # An empty teacher bucket's floor: below 1e-30 after division by both temperatures, so that
    # neither the divergence nor the entropy weights see mass there, except for reverse KL,
    # whose value at an empty bucket (about 69 nats per unit of the student's mass) is the
    # floor's own and is kept at the divergence's temperature (its entropy weights, at a larger
    # weight_temperature, then see 1e-30^(temperature / weight_temperature) there)
    reverse = kind != "mtbkd" and opts["divergence"] == ops.DIVERGENCES["reverse_kl"]
    floor_t = opts["temperature"] if reverse else tau
    zb, tb, counts = bucketize(z, teachers, return_counts=True, temperature=tau,
                               floor_temperature=floor_t)  # fmt: skip
    # Labels only mask rows for the bucketed op; the hard-label term is computed on z below.
    # (a kept row's placeholder label must differ from ignore_index, or every row would be masked)
    placeholder = 1 if ignore == 0 else 0
    lab_mask = None if labels is None else torch.where(labels == ignore, ignore, placeholder)
    if kind == "mtbkd":
        out = ops.mtbkd_loss_fwd(
            zb, tb, lab_mask, fixed, None, opts["temperature"], opts["concentration"],
            opts["prior_weight"], 0.0, opts["mode"], opts["weight_temperature"], ignore,
            opts["check_finite"],
        )  # fmt: skip
        rows, extras = out[0], list(out[2:])
        lam = opts["concentration"]
        # -lgamma(B + λ) of the padded width -> of the row's real bucket count.
        corr = math.lgamma(zb.shape[-1] + lam) - torch.lgamma(counts.to(rows.dtype) + lam)
    else:
        out = ops.multi_teacher_kd_fwd(
            zb, tb, lab_mask, fixed, opts["divergence"], opts["beta"], opts["temperature"],
            opts["mode"], opts["weight_temperature"], 0.0, opts["soft_label_weight"],
            opts["soft_scale"], ignore, opts["check_finite"],
        )  # fmt: skip
        rows, extras, corr = out[0], list(out[2:]), None
    mask = None if labels is None else labels != ignore
    if corr is not None:
        corr = corr if mask is None else torch.where(mask, corr, 0.0)
        rows = rows + opts["prior_weight"] * corr
        extras[3] = extras[3] + corr  # the unweighted prior statistic
    if labels is not None:
        safe = torch.where(mask, labels, 0)
        ce = -torch.log_softmax(z.to(rows.dtype), dim=-1).gather(-1, safe[:, None])[:, 0]
        ce = torch.where(mask, ce, 0.0)
        if opts["hard_label_weight"] != 0:  # no 0 * inf for a -inf logit at the label
            rows = rows + opts["hard_label_weight"] * ce
        if kind == "mtbkd":
            extras[4] = ce.detach()
    return rows, extras


def chunk_loss_and_grad(kind: str, opts: dict, z: Tensor, teachers: list[SparseTeacher],
                        labels: Tensor | None, fixed: Tensor | None):  # fmt: skip
    """For the fused-linear losses: per-row loss ``[c]``, ``G = d(Σ rows)/dz`` and statistics."""
    # Under torch.inference_mode() too (evaluation): z, made there, is an inference tensor,
    # which autograd cannot record; a copy made with inference mode off can.
    with torch.inference_mode(False), torch.enable_grad():
        zz = z.detach()
        zz = (zz.clone() if zz.is_inference() else zz).requires_grad_(True)
        rows, extras = _sparse_rows(kind, opts, zz, teachers, labels, fixed)
        (g,) = torch.autograd.grad(rows.sum(), zz)
    return rows.detach(), g, tuple(e.detach() for e in extras)


def _prepare(student_logits, teacher_logits, labels, weights):
    from mtbkd import functional as F
    from mtbkd import validate

    validate.check_logits(student_logits, "student_logits")
    lead, v = student_logits.shape[:-1], student_logits.shape[-1]
    teachers = _as_list(teacher_logits)
    for i, t in enumerate(teachers):
        if t.shape != lead:
            raise ValueError(f"teacher_logits[{i}] has leading shape {tuple(t.shape)} but "
                             f"student_logits has {tuple(lead)}")  # fmt: skip
    teachers = [t.flatten() for t in teachers]
    z = student_logits.reshape(-1, v)
    flat = None
    if labels is not None:
        _, _, flat, _ = validate.canonical_inputs(student_logits, [student_logits.detach()], labels)
    mode, fixed = F._weight_mode(weights, len(teachers), lead, z)
    return z, teachers, flat, lead, mode, fixed


def sparse_mtbkd_loss(student_logits: Tensor, teacher_logits, labels: Tensor | None = None, *,
                      temperature: float = 2.0, concentration: float = 5.0,
                      prior_weight: float = 0.02, hard_label_weight: float = 1.0,
                      weights: str | Tensor = "entropy", weight_temperature: float = 1.0,
                      ignore_index: int = -100, reduction: str = "mean",
                      num_items_in_batch: int | Tensor | None = None, return_stats: bool = False,
                      teacher_stats=None, check_finite: bool = True):  # fmt: skip
    """:func:`mtbkd.mtbkd_loss` with :class:`SparseTeacher` teachers (MATH.md sections 2, 5)."""
    from mtbkd import functional as F
    from mtbkd import validate

    if teacher_stats is not None:
        raise ValueError("teacher_stats cannot be used with sparse (SparseTeacher) teachers")
    validate.check_mtbkd_options(
        temperature,
        concentration,
        weight_temperature,
        prior_weight,
        hard_label_weight,
        reduction,
    )
    validate.check_flags(check_finite=check_finite, return_stats=return_stats)
    z, teachers, flat, lead, mode, fixed = _prepare(student_logits, teacher_logits, labels, weights)
    opts = {
        "temperature": float(temperature), "concentration": float(concentration),
        "prior_weight": float(prior_weight), "hard_label_weight": float(hard_label_weight),
        "mode": mode, "weight_temperature": float(weight_temperature),
        "ignore_index": validate.check_ignore_index(ignore_index),
        "check_finite": bool(check_finite),
    }  # fmt: skip
    rows, (w, resp, ent, prior, ce) = _sparse_rows("mtbkd", opts, z, teachers, flat, fixed)
    loss = F._reduce(rows, flat, lead, reduction, ignore_index, num_items_in_batch)
    if not return_stats:
        return loss
    k = len(teachers)
    return loss, F.MTBKDStats(
        weights=w.reshape(k, *lead), responsibilities=resp.reshape(k, *lead),
        entropy=ent.reshape(k, *lead), prior=prior.detach().reshape(lead), ce=ce.reshape(lead),
    )  # fmt: skip


def sparse_multi_teacher_kd_loss(student_logits: Tensor, teacher_logits,
                                 labels: Tensor | None = None, *, divergence: str = "forward_kl",
                                 beta: float = 0.5, temperature: float = 1.0,
                                 weights: str | Tensor = "entropy", weight_temperature: float = 1.0,
                                 hard_label_weight: float = 0.0, soft_label_weight: float = 1.0,
                                 scale_by_t2: bool = False, ignore_index: int = -100,
                                 reduction: str = "mean",
                                 num_items_in_batch: int | Tensor | None = None,
                                 check_finite: bool = True) -> Tensor:  # fmt: skip
    """:func:`mtbkd.multi_teacher_kd_loss` with :class:`SparseTeacher` teachers (sections 3, 5)."""
    from mtbkd import functional as F
    from mtbkd import ops, validate

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
    z, teachers, flat, lead, mode, fixed = _prepare(student_logits, teacher_logits, labels, weights)
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
    rows, _ = _sparse_rows("kd", opts, z, teachers, flat, fixed)
    return F._reduce(rows, flat, lead, reduction, ignore_index, num_items_in_batch)


# ----------------------------------------------------------------------------------------------
# Datasets of sparse teacher outputs (safetensors)
# ----------------------------------------------------------------------------------------------


class SparseTeacherData(NamedTuple):
    """What :func:`load_sparse_teachers` returns."""

    teachers: list[SparseTeacher]
    tensors: dict[str, Tensor]  # the ``extra`` tensors saved beside them (e.g. input_ids)
    metadata: dict[str, str]


def save_sparse_teachers(
    path: str | Path,
    teachers: SparseTeacher | Sequence[SparseTeacher],
    *,
    extra: Mapping[str, Tensor] | None = None,
    metadata: Mapping[str, str] | None = None,
    logprob_dtype: torch.dtype | None = None,
) -> Path:
    """Write K sparse teachers (and ``extra`` tensors such as the token ids) to a safetensors
    file. Indices are stored as int32 (vocabularies < 2^31), log-probabilities in their dtype or
    ``logprob_dtype``."""
    from mtbkd._files import save_safetensors

    teachers = _as_list(teachers)
    if logprob_dtype is not None and (
        not isinstance(logprob_dtype, torch.dtype) or not logprob_dtype.is_floating_point
    ):
        raise TypeError(f"logprob_dtype must be a floating-point torch.dtype or None, got "
                        f"{logprob_dtype!r}")  # fmt: skip
    reserved = [k for k in (metadata or {}) if str(k).startswith("mtbkd.")]
    if reserved:  # read back as the teachers' own (a vocab_size of another vocabulary)
        raise ValueError(f"metadata keys starting with 'mtbkd.' are the file's own, got {reserved}")
    tensors: dict[str, Tensor] = {}
    seen: set[int] = set()

    def own(x: Tensor) -> Tensor:
        # safetensors refuses tensors that share memory: a teacher passed twice, or two built on
        # one tensor, get a copy each after the first
        x = x.contiguous().cpu()
        ptr = x.untyped_storage().data_ptr()
        if x.numel() and ptr in seen:
            x = x.clone()
        seen.add(x.untyped_storage().data_ptr())
        return x

    from mtbkd import validate

    for i, t in enumerate(teachers):
        idx = t.indices
        if idx.numel() and int(idx.max()) < 2**31 and int(idx.min()) >= -(2**31):
            idx = idx.to(torch.int32)
        lp = t.logprobs
        if logprob_dtype is not None:
            # a masked class's log-probability (about -1e9) became -inf in float16, which the
            # losses then refused: the narrowing cast keeps it finite, as the dense losses' does
            lp = validate.check_cast_overflow(lp, lp.to(logprob_dtype), f"teacher {i} logprobs",
                                              "logprob_dtype")  # fmt: skip
        tensors[f"teacher{i}.indices"] = own(idx)
        tensors[f"teacher{i}.logprobs"] = own(lp)
    for name, x in (extra or {}).items():
        if name.startswith("teacher"):
            raise ValueError(f"extra tensor names must not start with 'teacher', got {name!r}")
        tensors[name] = own(x.detach())
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    meta["mtbkd.num_teachers"] = str(len(teachers))
    for i, t in enumerate(teachers):
        if t.vocab_size is not None:
            meta[f"mtbkd.teacher{i}.vocab_size"] = str(t.vocab_size)
    path = Path(path)
    save_safetensors(tensors, path, metadata=meta)
    return path


def load_sparse_teachers(path: str | Path, device: torch.device | str = "cpu") -> SparseTeacherData:
    """Read a file written by :func:`save_sparse_teachers`."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta = dict(f.metadata() or {})
            if "mtbkd.num_teachers" not in meta:
                raise ValueError(
                    f"{path} is not a sparse-teacher file (no mtbkd.num_teachers metadata)"
                )
            k = meta.pop("mtbkd.num_teachers")
            if not k.isdigit() or int(k) < 1:
                raise ValueError(f"{path} is damaged (mtbkd.num_teachers is {k!r})")
            k = int(k)
            names = list(f.keys())
            missing = [f"teacher{i}.{part}" for i in range(k) for part in ("indices", "logprobs")
                       if f"teacher{i}.{part}" not in names]  # fmt: skip
            if missing:
                raise ValueError(f"{path} is damaged: it records {k} teachers but lacks "
                                 f"{', '.join(missing)}")  # fmt: skip
            sizes = [meta.pop(f"mtbkd.teacher{i}.vocab_size", None) for i in range(k)]
            teachers = [
                SparseTeacher(
                    f.get_tensor(f"teacher{i}.indices"),
                    f.get_tensor(f"teacher{i}.logprobs"),
                    None if sizes[i] is None else int(sizes[i]),
                )  # fmt: skip
                for i in range(k)
            ]
            extra = {n: f.get_tensor(n) for n in names if not n.startswith("teacher")}
    except (SafetensorError, OSError) as exc:  # truncated, or not a safetensors file at all
        if isinstance(exc, FileNotFoundError):
            raise
        raise ValueError(f"{path} is not a readable safetensors file ({exc})") from None
    return SparseTeacherData(teachers, extra, meta)
