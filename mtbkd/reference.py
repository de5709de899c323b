"""The pure-PyTorch oracle of every mtbkd op, written from ``docs/MATH.md`` sections 1-4.

Plain autograd, no fusion, no tricks beyond log-space arithmetic: this module is the definition of
correct that every kernel (C++, Triton, CUDA) is tested against, usually in float64. Inputs are the
canonical 2-D shapes the kernels see: student logits ``[N, V]``, teacher logits ``[K, N, V]``
(a tensor or a sequence of K ``[N, V]`` tensors), labels ``[N]``.

Functions return per-row quantities (``reduction`` is applied by :func:`reduce_rows`), so the same
code serves the loss, its gradient (through autograd) and the interpretability statistics.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "teacher_entropy",
    "teacher_weights",
    "mtbkd_loss",
    "multi_teacher_kd_loss",
    "MTBKDRows",
    "reduce_rows",
]


def _stack(teacher_logits: Tensor | Sequence[Tensor]) -> Tensor:
    if isinstance(teacher_logits, Tensor):
        return teacher_logits
    return torch.stack(list(teacher_logits))


def _acc_dtype(x: Tensor) -> torch.dtype:
    # MATH.md: reduced precision is computed in fp32, float64 stays float64.
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def teacher_entropy(teacher_logits: Tensor | Sequence[Tensor], temperature: float = 1.0) -> Tensor:
    """Teacher entropies ``[K, ...]``: ``H_k = -sum_c p_kc log p_kc``, ``p_k = softmax(t_k/T)``."""
    t = _stack(teacher_logits)
    x = t.to(_acc_dtype(t)) / temperature
    u = x - x.amax(-1, keepdim=True)
    e = torch.exp(u)
    # log p_c = u_c - log S with log S = log1p(S - 1), S - 1 summed without the top entry: a nearly
    # one-hot teacher's entropy is mostly that small sum, which S = 1 + R would round away.
    rest = e.scatter(-1, u.argmax(-1, keepdim=True), 0.0).sum(-1, keepdim=True)
    p = e / (1.0 + rest)
    log_p = u - torch.log1p(rest)
    # 0 log 0 = 0; a NaN (a NaN or +inf logit) stays NaN, as in the kernels
    return -torch.where(p == 0, torch.zeros_like(p), p * log_p).sum(-1)


def teacher_weights(
    teacher_logits: Tensor | Sequence[Tensor],
    method: str | Tensor = "entropy",
    temperature: float = 1.0,
) -> Tensor:
    """Per-row teacher weights ``w [K, ...]`` (MATH.md section 1); no gradient flows through."""
    t = _stack(teacher_logits).detach()
    k = t.shape[0]
    dt = _acc_dtype(t)
    lead = t.shape[1:-1]
    if isinstance(method, Tensor):
        w = method.detach().to(dt)
        w = w.reshape(k, *([1] * len(lead))) if w.dim() == 1 else w.reshape(k, *lead)
        w = w.expand(k, *lead)
        return w / w.sum(0, keepdim=True)
    if method == "uniform" or k == 1:
        return torch.full((k, *lead), 1.0 / k, dtype=dt, device=t.device)
    if method != "entropy":
        raise ValueError(f"method must be 'entropy', 'uniform' or a Tensor, got {method!r}")
    h = teacher_entropy(t, temperature)
    total = h.sum(0, keepdim=True)
    w_tilde = 1.0 - h / total
    w = w_tilde / w_tilde.sum(0, keepdim=True)
    # Every teacher one-hot: sum of entropies is 0, fall back to uniform.
    return torch.where(total > 0, w, torch.full_like(w, 1.0 / k))


class MTBKDRows(NamedTuple):
    """Per-row outputs of :func:`mtbkd_loss` (masked rows are 0)."""

    loss: Tensor  # [N]
    weights: Tensor  # [K, N]
    responsibilities: Tensor  # [K, N]
    entropy: Tensor  # [K, N]  teacher entropy at the weighting temperature
    prior: Tensor  # [N]
    ce: Tensor  # [N]


def _row_mask(labels: Tensor | None, n: int, ignore_index: int, device) -> Tensor:
    if labels is None:
        return torch.ones(n, dtype=torch.bool, device=device)
    return labels != ignore_index


def _neutral_masked_rows(z: Tensor, t: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Zeros in the rows ``mask`` leaves out: they count for nothing (MATH.md section 4), and
    their logits (padding: -inf or NaN) must not reach the gradient through a discarded branch."""
    keep = mask[:, None]
    return torch.where(keep, z, 0.0), torch.where(keep[None], t, 0.0)


def _cross_entropy(z: Tensor, labels: Tensor | None, mask: Tensor) -> Tensor:
    if labels is None:
        return torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
    logq = torch.log_softmax(z, dim=-1)
    safe = torch.where(mask, labels, torch.zeros_like(labels))
    return -logq.gather(-1, safe[:, None]).squeeze(-1)


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
) -> MTBKDRows:
    """Per-row MT-BKD loss ``beta_h * ce + beta_p * prior`` (MATH.md section 2), by autograd.

    ``prior_i = -lgamma(V + lam) - logsumexp_k (log w_k + C_k - L_k)`` with
    ``C_k = lam * sum_c p_kc log q_c`` and ``L_k = sum_c lgamma(1 + lam * p_kc)``.
    """
    dt = _acc_dtype(student_logits)
    z = student_logits.to(dt)
    t = _stack(teacher_logits).detach().to(dt)
    n, v = z.shape
    lam = concentration
    mask = _row_mask(labels, n, ignore_index, z.device)
    z, t = _neutral_masked_rows(z, t, mask)

    w = teacher_weights(t, weights, weight_temperature).to(dt)  # [K, N]
    h = teacher_entropy(t, weight_temperature)
    logq = torch.log_softmax(z / temperature, dim=-1)  # [N, V]
    p = torch.softmax(t / temperature, dim=-1)  # [K, N, V]
    # C_k  [K, N]; a column ruled out everywhere (-inf logits) has p = 0 and adds 0 (0 log 0)
    cross = lam * torch.where(p > 0, p * logq, 0.0).sum(-1)
    lg = torch.lgamma(1.0 + lam * p).sum(-1)  # L_k  [K, N]
    ell = torch.log(w) + cross - lg
    prior = -math.lgamma(v + lam) - torch.logsumexp(ell, dim=0)
    resp = torch.softmax(ell, dim=0)
    ce = _cross_entropy(z, labels, mask)
    # beta_h = 0 drops the term (a -inf student logit at the label would give 0 * inf = NaN)
    hard = (
        hard_label_weight * ce
        if labels is not None and hard_label_weight != 0
        else torch.zeros_like(ce)
    )
    loss = hard + prior_weight * prior
    zero = torch.zeros((), dtype=dt, device=z.device)
    m = mask[None, :]
    return MTBKDRows(
        loss=torch.where(mask, loss, zero),
        weights=torch.where(m, w, zero),
        responsibilities=torch.where(m, resp, zero).detach(),
        entropy=torch.where(m, h, zero).detach(),
        prior=torch.where(mask, prior, zero).detach(),
        ce=torch.where(mask, ce, zero).detach(),
    )


def _kl(logp: Tensor, logq: Tensor) -> Tensor:
    """``KL(p || q)`` over the last axis from log-probabilities (0 log 0 = 0)."""
    p = logp.exp()
    live = p != 0  # a NaN p (a NaN or +inf logit, check_finite off) stays NaN
    # the operands are masked too: -inf - (-inf) in the discarded branch would make the
    # product's gradient 0 * NaN where a class is ruled out for both
    zero = torch.zeros_like(p)
    diff = torch.where(live, logp, zero) - torch.where(live, logq, zero)
    return torch.where(live, p * diff, zero).sum(-1)


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
) -> tuple[Tensor, Tensor]:
    """Per-row weighted-sum multi-teacher KD (MATH.md section 3): ``(loss [N], weights [K, N])``.

    ``L_i = beta_h * ce_i + beta_s * s(tau) * sum_k w_k D(p_k^tau, q^tau)``.
    """
    dt = _acc_dtype(student_logits)
    z = student_logits.to(dt)
    t = _stack(teacher_logits).detach().to(dt)
    n = z.shape[0]
    mask = _row_mask(labels, n, ignore_index, z.device)
    z, t = _neutral_masked_rows(z, t, mask)
    w = teacher_weights(t, weights, weight_temperature).to(dt)
    logq = torch.log_softmax(z / temperature, dim=-1)[None]  # [1, N, V]
    logp = torch.log_softmax(t / temperature, dim=-1)  # [K, N, V]
    # a teacher of weight 0 drops out of the sum (as in MT-BKD, section 2): its divergence is
    # taken against the student itself (0, with a finite gradient) so that 0 * inf is never formed
    logp = torch.where((w > 0)[..., None], logp, logq.expand_as(logp))
    if divergence == "forward_kl" or (divergence == "jsd" and beta == 0.0):
        d = _kl(logp, logq)
    elif divergence == "reverse_kl" or (divergence == "jsd" and beta == 1.0):
        d = _kl(logq.expand_as(logp), logp)
    elif divergence == "jsd":
        parts = torch.stack([logp + math.log(beta), logq.expand_as(logp) + math.log(1.0 - beta)])
        # a class both rule out: m = 0 there (logsumexp of two -inf has a NaN gradient)
        out = torch.isneginf(parts).all(0)
        logm = torch.where(out, -math.inf, torch.logsumexp(parts.masked_fill(out, 0.0), dim=0))
        d = beta * _kl(logp, logm) + (1.0 - beta) * _kl(logq.expand_as(logp), logm)
    else:
        raise ValueError(
            f"divergence must be 'forward_kl', 'reverse_kl' or 'jsd', got {divergence!r}"
        )
    scale = temperature**2 if scale_by_t2 else 1.0
    soft = soft_label_weight * scale * (w * d).sum(0)
    ce = _cross_entropy(z, labels, mask)
    loss = soft + (hard_label_weight * ce if labels is not None and hard_label_weight != 0 else 0.0)
    zero = torch.zeros((), dtype=dt, device=z.device)
    return torch.where(mask, loss, zero), torch.where(mask[None, :], w, zero)


def reduce_rows(
    rows: Tensor,
    labels: Tensor | None,
    reduction: str,
    ignore_index: int = -100,
    num_items_in_batch: int | Tensor | None = None,
) -> Tensor:
    """Reduce per-row losses (MATH.md section 4): ``mean``, ``sum`` or ``none``.

    ``mean`` divides by the number of unmasked rows, or by ``num_items_in_batch`` when given.
    """
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    if isinstance(num_items_in_batch, Tensor):  # a one-element count, in the rows' precision
        return total / num_items_in_batch.reshape(()).to(rows.dtype)
    if num_items_in_batch is not None:
        return total / num_items_in_batch
    count = rows.numel() if labels is None else (labels != ignore_index).sum()
    return total / torch.clamp(torch.as_tensor(count, device=rows.device), min=1).to(rows.dtype)
