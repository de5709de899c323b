"""Functional API: multi-teacher losses that replace ``F.kl_div`` / ``F.cross_entropy`` in a loop.

Shapes: student logits ``[..., V]``; teachers a tensor ``[K, ..., V]`` or a sequence of K tensors
``[..., V]``; labels ``[...]`` (integer, ``ignore_index`` masks the whole row). Any floating dtype
the kernels support (float32, float64, bfloat16, float16); results are float32 unless the input is
float64. Teacher logits are constants: no gradient flows into them.

Each call runs one fused custom op (``torch.ops.mtbkd.*``) that computes the per-row loss and its
gradient in the forward pass; the backward only scales the saved gradient. For ``reduction="mean"``
of a bfloat16 (or float32 / float64) student and dense teachers the forward already folds the
mean's ``1 / count`` into the gradient before rounding it to the student's dtype, so it is rounded
once, as eager PyTorch's (the backward's factor is then exactly 1); not for float16, whose range
loss scaling needs (see ``_grad_scale``). Where every row's factor is exactly 1 (a mean or sum
with ``grad_output`` 1), the tensors are on the CPU and the backward does not keep the graph
(``retain_graph=True`` copies), the backward hands the saved gradient on without a copy: it
becomes the student's ``.grad`` unless something else still holds it, so one ``[N, V]`` tensor is
allocated per step instead of two (see docs/BENCHMARKS.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from mtbkd import ops, validate

if TYPE_CHECKING:
    from mtbkd.teacher_stats import TeacherStats

__all__ = ["teacher_weights", "mtbkd_loss", "multi_teacher_kd_loss", "MTBKDStats"]


class MTBKDStats(NamedTuple):
    """Per-row statistics of :func:`mtbkd_loss` (no gradient; masked rows are 0).

    ``weights`` and ``responsibilities`` are ``[K, ...]``: the prior's mixture weights ``w_k`` and
    the posterior responsibilities ``r_k = softmax_k(log w_k + C_k - L_k)`` (which teacher the
    student follows); ``entropy`` ``[K, ...]`` is each teacher's entropy at the weighting
    temperature; ``prior`` and ``ce`` ``[...]`` are the unweighted prior and cross-entropy terms.
    """

    weights: Tensor
    responsibilities: Tensor
    entropy: Tensor
    prior: Tensor
    ce: Tensor


def _weight_mode(weights, k: int, lead, student: Tensor) -> tuple[int, Tensor | None]:
    if isinstance(weights, Tensor):
        return ops.WEIGHT_MODES["fixed"], validate.fixed_weights(weights, k, lead, student)
    if not isinstance(weights, str) or weights not in ("entropy", "uniform"):
        raise ValueError(f"weights must be 'entropy', 'uniform' or a Tensor, got {weights!r}")
    return ops.WEIGHT_MODES[weights], None


def _mean_divisor(n: int, labels: Tensor | None, reduction: str, ignore_index: int,
                  num_items_in_batch, dtype: torch.dtype, device) -> Tensor | None:  # fmt: skip
    """The 0-d denominator of a ``mean`` over ``n`` rows (None for ``sum`` / ``none``). It stays
    a tensor: no host synchronisation."""
    if num_items_in_batch is not None:  # checked whatever the reduction (a bad one was ignored)
        divisor = validate.items_divisor(num_items_in_batch, dtype, device)
        return divisor if reduction == "mean" else None
    if reduction != "mean":
        return None
    if labels is None:
        return torch.full((), max(n, 1), dtype=dtype, device=device)
    return (labels != ignore_index).sum().clamp_min(1).to(dtype)


def _grad_scale(divisor: Tensor | None, student: Tensor) -> Tensor | None:
    """What the mean's backward hands each row, ``1 / divisor``, computed as autograd computes it
    (``grad / divisor`` with ``grad = 1``): the fused ops fold it into their gradient before its
    rounding to the student's dtype, and the backward's remaining factor is then exactly 1.

    Not for float16: its narrow exponent range would store a gradient divided by the count as
    subnormals or zeros, which loss scaling (a GradScaler's x 65536 in the backward) cannot
    undo; float16 keeps the unscaled gradient and the backward's second rounding."""
    if divisor is None or student.dtype == torch.float16:
        return None
    return torch.ones_like(divisor) / divisor


def _reduce(rows: Tensor, labels: Tensor | None, lead, reduction: str, ignore_index: int,
            num_items_in_batch, divisor: Tensor | None = None) -> Tensor:  # fmt: skip
    if reduction == "none":
        return rows.reshape(lead)
    total = rows.sum()
    if reduction == "sum":
        return total
    if divisor is None:
        divisor = _mean_divisor(rows.numel(), labels, reduction, ignore_index,
                                num_items_in_batch, total.dtype, total.device)  # fmt: skip
    return total / divisor


def _sparse_args(args: dict) -> dict:
    # The call's own arguments (locals() at the top of the loss), for the sparse-teacher path.
    return {k: v for k, v in args.items() if not k.startswith("_")}


def teacher_weights(
    teacher_logits: Tensor | Sequence[Tensor],
    method: str | Tensor = "entropy",
    temperature: float = 1.0,
    *,
    check_finite: bool = True,
) -> Tensor:
    """Per-row teacher weights ``[K, ...]`` (MATH.md section 1), summing to 1 over teachers.

    ``entropy``: ``w_k ∝ 1 - H_k / Σ_j H_j`` with ``H_k`` the entropy of
    ``softmax(t_k / temperature)``
    (a confident teacher weighs more); ``uniform``: ``1/K``; a tensor ``[K]``, ``[K, ...]`` or
    ``[K, N]`` (the rows flattened): non-negative weights renormalised per row. No gradient flows
    through the weights. NaN/inf logits raise unless ``check_finite=False``. Dense logits only:
    the losses report a :class:`~mtbkd.SparseTeacher`'s weights (``return_stats=True``).
    """
    temperature, check_finite = validate.plain(temperature), validate.plain(check_finite)
    validate.check_positive(temperature, "temperature")
    validate.check_flags(check_finite=check_finite)
    from mtbkd import sparse as _sparse

    if _sparse.is_sparse(teacher_logits):
        raise TypeError(
            "teacher_logits must be dense logits [K, ..., V] or a sequence of K tensors, got a "
            "SparseTeacher (the losses accept it and report its weights with return_stats=True)"
        )
    if isinstance(teacher_logits, Tensor):
        validate.check_logits(teacher_logits, "teacher_logits")
        if teacher_logits.dim() < 2:
            raise ValueError(
                f"teacher_logits must be [K, ..., V], got shape {tuple(teacher_logits.shape)}"
            )
        first = teacher_logits[0]
    elif isinstance(teacher_logits, Sequence) and not isinstance(teacher_logits, str):
        if len(teacher_logits) == 0:
            raise ValueError("teacher_logits must hold at least one teacher (got K = 0)")
        first = teacher_logits[0]
        validate.check_logits(first, "teacher_logits[0]")  # before it stands in for a student
    else:
        raise TypeError(
            "teacher_logits must be a tensor [K, ..., V] or a sequence of K tensors [..., V], "
            f"got {type(teacher_logits).__name__}"
        )
    # with check_finite: a finite value beyond a narrower dtype's range refused by name, a
    # finfo(float32).min mask kept finite, as the losses do
    _, teachers, _, lead = validate.canonical_inputs(
        first, teacher_logits, None, check_finite, student_name="teacher_logits[0]"
    )
    k = len(teachers)
    if isinstance(method, Tensor):
        return validate.fixed_weights(method, k, lead, first, "method", "teacher_logits").reshape(
            k, *lead
        )
    if not isinstance(method, str) or method not in ("entropy", "uniform"):
        raise ValueError(f"method must be 'entropy', 'uniform' or a Tensor, got {method!r}")
    w, _ = ops.teacher_weights_op(
        teachers, ops.WEIGHT_MODES[method], float(temperature), bool(check_finite)
    )
    return w.reshape(k, *lead)


def mtbkd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor | Sequence[Tensor],
    labels: Tensor | None = None,
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
    teacher_stats: TeacherStats | None = None,
    check_finite: bool = True,
) -> Tensor | tuple[Tensor, MTBKDStats]:
    """MT-BKD loss with a teacher-informed Dirichlet mixture prior (MATH.md sections 2 and 4).

    Row loss ``β_h·CE(z, y) + β_p·(−lgamma(V+λ) − logsumexp_k(log w_k + C_k − L_k))`` with
    ``C_k = λ Σ_c p_kc^τ log q_c^τ`` and ``L_k = Σ_c lgamma(1 + λ p_kc^τ)``: the negative log of
    ``Σ_k w_k Dir(q^τ; 1 + λ p_k^τ)``, the mixture inside the log.

    Args:
        student_logits: ``[..., V]``.
        teacher_logits: ``[K, ..., V]`` tensor or a sequence of K ``[..., V]`` tensors.
        labels: optional ``[...]`` class indices; without them the CE term is dropped.
        temperature: τ for the softened student and teachers (paper code: 2).
        concentration: Dirichlet concentration λ (paper code: 5). With several teachers it
            has two roles: the gradient pulls ``q^τ`` toward ``Σ_k r_k p_k^τ`` at strength
            ``β_p·λ/τ``, and λ also sets how sharply the responsibilities ``r`` pick a teacher:
            near the weights ``w`` for small λ (the weighted average of the teachers), one-hot on
            the teacher nearest the student in ``KL(p_k‖q^τ)`` for large λ. With one teacher only
            the product ``β_p·λ`` matters.
        prior_weight: β_p (paper code: 0.02).
        hard_label_weight: β_h (only with labels); 0 drops the cross-entropy term (the labels
            then only mask rows), so a ``-inf`` logit at a label gives no ``0·inf``.
        weights: ``"entropy"`` (paper), ``"uniform"`` or a tensor ``[K]`` / ``[K, ...]`` /
            ``[K, N]`` (the rows flattened).
        weight_temperature: τ_w of the entropy weights.
        ignore_index: label value that masks a whole row (no term, zero gradient).
        reduction: ``"mean"`` over unmasked rows, ``"sum"`` or ``"none"`` (shape ``[...]``).
        num_items_in_batch: replaces the mean's denominator (gradient accumulation).
        return_stats: also return :class:`MTBKDStats` (weights, responsibilities, entropies...).
        teacher_stats: a :class:`mtbkd.TeacherStats` cache of these teachers (offline distillation):
            the kernel then skips the teacher-only passes.
        check_finite: raise ``ValueError`` on NaN/inf logits (checked inside the kernel).
    """
    validate.check_no_func_transform("mtbkd_loss")
    temperature, concentration, prior_weight, hard_label_weight, weight_temperature = map(
        validate.plain,
        (temperature, concentration, prior_weight, hard_label_weight, weight_temperature),
    )
    ignore_index, num_items_in_batch, return_stats, check_finite = map(
        validate.plain, (ignore_index, num_items_in_batch, return_stats, check_finite)
    )
    # --- sparse top-k teachers (MATH.md section 5): mtbkd/sparse.py (issue 6) ---
    from mtbkd import sparse as _sparse

    if _sparse.is_sparse(teacher_logits):
        return _sparse.sparse_mtbkd_loss(**_sparse_args(locals()))
    # --- end sparse ---
    validate.check_mtbkd_options(
        temperature,
        concentration,
        weight_temperature,
        prior_weight,
        hard_label_weight,
        reduction,
    )
    validate.check_flags(check_finite=check_finite, return_stats=return_stats)
    ignore_index = validate.check_ignore_index(ignore_index)
    student, teachers, flat_labels, lead = validate.canonical_inputs(
        student_logits, teacher_logits, labels, bool(check_finite), ignore_index=ignore_index
    )
    k = len(teachers)
    mode, fixed = _weight_mode(weights, k, lead, student)
    stats_data = None
    if teacher_stats is not None:
        from mtbkd.teacher_stats import TeacherStats

        if not isinstance(teacher_stats, TeacherStats):
            raise TypeError(
                f"teacher_stats must be a mtbkd.TeacherStats, got {type(teacher_stats).__name__}"
            )
        stats_data = teacher_stats.data_for(
            k, student.shape[0], temperature, concentration, weight_temperature, student, lead
        )
        # (values to read: not inside a compiled graph, not meta or fake tensors)
        if check_finite and validate.has_values(stats_data):
            given = teacher_logits if isinstance(teacher_logits, Sequence) else [teacher_logits]
            dtypes = [x.dtype for x in given if isinstance(x, Tensor)]
            TeacherStats.check_rows(stats_data, teachers, float(temperature),
                                    [*dtypes, teacher_stats.data.dtype], float(concentration),
                                    float(weight_temperature))  # fmt: skip
    acc = ops._acc_dtype(student.dtype)
    divisor = _mean_divisor(len(student), flat_labels, reduction, ignore_index,
                            num_items_in_batch, acc, student.device)  # fmt: skip
    loss_rows, _, w, resp, ent, prior, ce = ops.mtbkd_loss_fwd(
        student, teachers, flat_labels, fixed, stats_data, float(temperature),
        float(concentration), float(prior_weight), float(hard_label_weight), mode,
        float(weight_temperature), ignore_index, bool(check_finite),
        _grad_scale(divisor, student),
    )  # fmt: skip
    loss = _reduce(loss_rows, flat_labels, lead, reduction, ignore_index, num_items_in_batch,
                   divisor)  # fmt: skip
    if not return_stats:
        return loss
    stats = MTBKDStats(
        weights=w.reshape(k, *lead),
        responsibilities=resp.reshape(k, *lead),
        entropy=ent.reshape(k, *lead),
        prior=prior.reshape(lead),
        ce=ce.reshape(lead),
    )
    return loss, stats


def multi_teacher_kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor | Sequence[Tensor],
    labels: Tensor | None = None,
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
) -> Tensor:
    """Weighted-sum multi-teacher KD (MATH.md sections 3 and 4).

    Row loss ``β_h·CE(z, y) + β_s·s(τ)·Σ_k w_k·D(p_k^τ, q^τ)`` with ``s(τ) = τ²`` if
    ``scale_by_t2``. ``divergence``: ``"forward_kl"`` KL(p‖q), ``"reverse_kl"`` KL(q‖p) or ``"jsd"``
    (generalised JSD with mixture ``m = β p + (1−β) q``; β = 0 is forward KL, β = 1 reverse KL).
    Average-teacher KD is ``weights="uniform"``, entropy-weighted KD the default. Pure KD unless
    ``hard_label_weight`` is set (no silent hard/soft mix). Other arguments as in
    :func:`mtbkd_loss`.
    """
    validate.check_no_func_transform("multi_teacher_kd_loss")
    beta, temperature, weight_temperature, hard_label_weight, soft_label_weight = map(
        validate.plain,
        (beta, temperature, weight_temperature, hard_label_weight, soft_label_weight),
    )
    ignore_index, num_items_in_batch, scale_by_t2, check_finite = map(
        validate.plain, (ignore_index, num_items_in_batch, scale_by_t2, check_finite)
    )
    # --- sparse top-k teachers (MATH.md section 5): mtbkd/sparse.py (issue 6) ---
    from mtbkd import sparse as _sparse

    if _sparse.is_sparse(teacher_logits):
        return _sparse.sparse_multi_teacher_kd_loss(**_sparse_args(locals()))
    # --- end sparse ---
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
    ignore_index = validate.check_ignore_index(ignore_index)
    student, teachers, flat_labels, lead = validate.canonical_inputs(
        student_logits, teacher_logits, labels, bool(check_finite), ignore_index=ignore_index
    )
    mode, fixed = _weight_mode(weights, len(teachers), lead, student)
    scale = float(temperature) ** 2 if scale_by_t2 else 1.0
    acc = ops._acc_dtype(student.dtype)
    divisor = _mean_divisor(len(student), flat_labels, reduction, ignore_index,
                            num_items_in_batch, acc, student.device)  # fmt: skip
    loss_rows, _, _ = ops.multi_teacher_kd_fwd(
        student, teachers, flat_labels, fixed, ops.DIVERGENCES[divergence], float(beta),
        float(temperature), mode, float(weight_temperature), float(hard_label_weight),
        float(soft_label_weight), scale, ignore_index,
        bool(check_finite), _grad_scale(divisor, student),
    )  # fmt: skip
    return _reduce(loss_rows, flat_labels, lead, reduction, ignore_index, num_items_in_batch,
                   divisor)  # fmt: skip
