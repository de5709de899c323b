"""Predictive summaries and uncertainty metrics of posterior samples (MATH.md section 8).

Inputs are per-sample probabilities ``[S, N, C]`` (S posterior samples, N rows, C classes) or
already averaged ``[N, C]`` (treated as one sample). ``p_bar = mean_s q^(s)``. All metrics are
computed in fp32 (fp64 inputs stay fp64); sums over rows that could round (the ECE's bin sums)
are accumulated in fp64 and cast back. ``accuracy``, ``nll``, ``brier`` and ``ece`` return
0-d tensors; ``predictive_entropy``, ``expected_entropy``, ``mutual_information`` and
``mean_deviance`` return ``[N]``; ``calibrated_ece`` returns ``[draws]``. ``temper`` and
``fit_temperature`` are post-hoc temperature scaling of such a predictive on held-out rows.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "mean_probs",
    "accuracy",
    "nll",
    "row_nll",
    "brier",
    "ece",
    "calibrated_ece",
    "temper",
    "fit_temperature",
    "predictive_entropy",
    "expected_entropy",
    "mutual_information",
    "mean_deviance",
    "credible_threshold",
    "credible_set",
    "credible_set_summary",
    "CredibleSetSummary",
    "auroc",
]

ECE_BINS = 15


def _samples(probs: Tensor, name: str = "probs") -> Tensor:
    # [S, N, C] in fp32 (fp64 kept); [N, C] becomes one sample.
    if not isinstance(probs, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(probs).__name__}")
    if not probs.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {probs.dtype}")
    if probs.dim() not in (2, 3) or probs.shape[-1] == 0 or probs.shape[-2] == 0:
        raise ValueError(f"{name} must have shape [S, N, C] or [N, C] with N, C > 0, "
                         f"got {tuple(probs.shape)}")  # fmt: skip
    if probs.dim() == 3 and probs.shape[0] == 0:
        raise ValueError(f"{name} holds no samples (S = 0)")
    if not bool(torch.isfinite(probs).all()):
        raise ValueError(f"{name} contains non-finite values (NaN or inf)")
    if bool((probs < 0).any()):
        raise ValueError(f"{name} contains negative probabilities")
    q = probs if probs.dim() == 3 else probs.unsqueeze(0)
    q = q if q.dtype == torch.float64 else q.float()
    # logits, log-probabilities or unnormalised scores passed by mistake would give metrics that
    # look plausible and mean nothing: every row must sum to 1 up to the rounding of its dtype
    # (rounding moves the row's sum by at most eps / 2 relative, plus half a subnormal step per
    # value below the normal range: fp16 softmax over 256k classes; at least 1e-3)
    fi = torch.finfo(probs.dtype)
    tol = max(1e-3, 2.0 * fi.eps) + 0.5 * probs.shape[-1] * fi.tiny * fi.eps
    err = (q.sum(-1, dtype=torch.float64) - 1.0).abs()
    if bool((err > tol).any()):
        s, n = divmod(int(err.flatten().argmax()), q.shape[1])
        at = f"sample {s}, row {n}" if probs.dim() == 3 else f"row {n}"
        raise ValueError(f"{name} must be probabilities whose rows sum to 1 (within {tol:.1e}); "
                         f"{at} sums to {float(q[s, n].sum(dtype=torch.float64)):.6g}"
                         " (pass softmax(logits), not logits or log-probabilities)")  # fmt: skip
    return q


def _labels(labels: Tensor, n: int, c: int) -> Tensor:
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got dtype {labels.dtype}")
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape [{n}], got {tuple(labels.shape)}")
    if labels.dtype in (torch.uint16, torch.uint32, torch.uint64):
        labels = labels.long()  # few ops take these dtypes (uint64 beyond int64's range: < 0)
    if n and (int(labels.min()) < 0 or int(labels.max()) >= c):
        raise ValueError(f"labels must be in [0, {c}), got values in "
                         f"[{int(labels.min())}, {int(labels.max())}]")  # fmt: skip
    return labels.long()


def _entropy(p: Tensor) -> Tensor:
    return -torch.special.xlogy(p, p).sum(-1)  # 0 log 0 = 0


def mean_probs(probs: Tensor) -> Tensor:
    """``p_bar = (1/S) sum_s q^(s)``, ``[N, C]``."""
    return _samples(probs).mean(0)


def accuracy(probs: Tensor, labels: Tensor) -> Tensor:
    """Fraction of rows with ``argmax_c p_bar = y``."""
    p = mean_probs(probs)
    y = _labels(labels, p.shape[0], p.shape[1])
    return (p.argmax(-1) == y).to(p.dtype).mean()


def nll(probs: Tensor, labels: Tensor) -> Tensor:
    """``-mean_i log p_bar[i, y_i]`` via ``logsumexp_s log q^(s) - log S`` (never a mean of logs).

    A probability of exactly 0 is floored 1 nat below the log of the smallest subnormal number of
    the compute dtype (fp32 for fp16, bf16 and fp32 input: ``-log p >= 104.28``; fp64 for fp64
    input: ``745.44``), so its NLL is large but finite and above that of any positive probability.
    """
    return row_nll(probs, labels).mean()


def row_nll(probs: Tensor, labels: Tensor) -> Tensor:
    """Per row ``[N]``: ``-log p_bar[i, y_i]``, the terms :func:`nll` averages (an exact 0 floored
    as there)."""
    q = _samples(probs)
    y = _labels(labels, q.shape[1], q.shape[2])
    qy = q.gather(-1, y.view(1, -1, 1).expand(q.shape[0], -1, 1)).squeeze(-1)  # [S, N]
    # only an exact 0 is floored, below the log of the smallest subnormal (as _log_probs64): a
    # subnormal probability has a finite, exact log, and 0 must score worse than any of them
    fi = torch.finfo(q.dtype)
    logq = torch.where(qy > 0, torch.log(qy), math.log(fi.tiny) + math.log(fi.eps) - 1.0)
    return -(torch.logsumexp(logq, dim=0) - math.log(q.shape[0]))


def brier(probs: Tensor, labels: Tensor) -> Tensor:
    """``mean_i sum_c (p_bar_ic - 1[c = y_i])^2``."""
    p = mean_probs(probs)
    y = _labels(labels, p.shape[0], p.shape[1])
    onehot = torch.nn.functional.one_hot(y, p.shape[1]).to(p.dtype)
    return ((p - onehot) ** 2).sum(-1).mean()


def _ece_bins(conf: Tensor, n_bins: int) -> Tensor:
    """The bin of each fp32 confidence: right-closed ``((b-1)/B, b/B]`` with fp32 edges ``b / B``,
    a confidence of 0 in the first bin."""
    edges = torch.arange(1, n_bins, dtype=torch.float32, device=conf.device) / n_bins
    # bucketize(right=False) gives i with edges[i-1] < x <= edges[i]: right-closed bins.
    return torch.bucketize(conf, edges, right=False)


def _positive_int(value, name: str) -> int:
    # any integer type (numpy's too), not a bool
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def ece(probs: Tensor, labels: Tensor, n_bins: int = ECE_BINS) -> Tensor:
    """``sum_b (n_b / N) |acc_b - conf_b|`` over equal-width bins of ``conf = max_c p_bar``.

    Bins are right-closed, ``((b-1)/B, b/B]``, and a confidence of 0 falls in the first bin
    (MATH.md section 8); bin edges are the fp32 numbers ``b / B``, and a row's bin is chosen on
    its fp32 confidence. The bin sums are accumulated in fp64 (fp32 sums of a million rows or
    more round by far more than the ECE itself), the result is returned in fp32 (fp64 kept).
    ``n_bins``: any positive integer (numpy's too).
    """
    n_bins = _positive_int(n_bins, "n_bins")
    p = mean_probs(probs)
    y = _labels(labels, p.shape[0], p.shape[1])
    conf, pred = p.max(-1)
    idx = _ece_bins(conf.float(), n_bins)
    # |acc_b - conf_b| n_b / N = |sum_{i in b} (correct_i - conf_i)| / N (empty bins add 0); the
    # terms are exact in fp64 for fp32 confidences (the arithmetic of mtbkd.report's bootstrap)
    gap = torch.bincount(idx, weights=(pred == y).double() - conf.double(), minlength=n_bins)
    return (gap.abs().sum() / conf.numel()).to(p.dtype)


def calibrated_ece(
    probs: Tensor,
    draws: int = 200,
    n_bins: int = ECE_BINS,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The :func:`ece` a perfectly calibrated model with these predictions would score on this
    many rows, ``[draws]``: the ECE against labels drawn from ``p_bar`` itself (consistency
    resampling). Top-label ECE only sees whether the prediction is right, which for a label
    drawn from ``p_bar`` happens with probability ``conf = max_c p_bar``, so each draw takes
    ``correct ~ Bernoulli(conf)`` per row.

    ECE is biased upward: even a calibrated model scores above 0 on a finite test set. The mean
    of the draws estimates the ECE a calibrated model is expected to score (a calibrated model
    scores below it about half the time: not a lower bound); by the normal approximation it is
    about ``(1/N) sum_b sqrt(2/pi * sum_{i in b} conf_i (1 - conf_i))``, which overstates it for
    bins of a few rows or of confidences near 1. ``(1 + #{draws >= observed ECE}) / (1 + draws)``
    is a Monte Carlo p-value of the hypothesis that a model is calibrated (what
    :func:`mtbkd.distill.evaluate_probs` reports as ``ece_p``). ``generator``: the random stream
    (default: torch's global one; on the device of ``probs``). ``draws`` and ``n_bins``: any
    positive integers (numpy's too). Bin sums in fp64, as in :func:`ece`; returns fp32.
    """
    draws = _positive_int(draws, "draws")
    n_bins = _positive_int(n_bins, "n_bins")
    conf = mean_probs(probs).max(-1).values.float()
    n = conf.numel()
    idx = _ece_bins(conf, n_bins)  # the bins of :func:`ece`
    conf_sum = torch.bincount(idx, weights=conf.double(), minlength=n_bins)
    out = torch.empty(draws, dtype=torch.float32, device=conf.device)
    chunk = max(1, min(draws, (1 << 22) // n))  # at most ~4 M Bernoulli draws at once
    for start in range(0, draws, chunk):
        d = min(chunk, draws - start)
        correct = torch.bernoulli(conf.clamp(0, 1).expand(d, n), generator=generator)
        # counts in fp64: exact (fp32 stops counting at 2^24 rows in a bin)
        acc_sum = torch.zeros(d, n_bins, dtype=torch.float64, device=conf.device)
        acc_sum.index_add_(1, idx, correct.double())
        out[start : start + d] = ((acc_sum - conf_sum).abs().sum(-1) / n).float()
    return out


def _log_probs64(q: Tensor) -> Tensor:
    """``log q`` in fp64, an exact 0 floored just below the log of the smallest fp64 subnormal,
    so that it stays below every positive probability (an fp32 subnormal is normal in fp64)."""
    q = q.double()
    info = torch.finfo(torch.float64)
    floor = math.log(info.tiny) + math.log(info.eps) - 1.0
    return torch.where(q > 0, torch.log(q), floor)


def temper(probs: Tensor, temperature: float) -> Tensor:
    """Each sample's probabilities at ``temperature``: ``softmax_c(log q^(s)_c / T)``, which is
    ``softmax(z / T)`` for a sample with logits ``z``. ``T > 1`` softens every sample, ``T < 1``
    sharpens it, ``T = 1`` returns ``probs`` as they are; the inverse of ``temper(., T)`` is
    ``temper(., 1 / T)`` (up to float rounding, for probabilities that stay representable).
    Computed in fp64 (an exact 0 stays below every positive probability), returned with the
    shape of ``probs`` (``[S, N, C]`` or ``[N, C]``) in fp32 (fp64 kept), so that every summary
    of the samples (mutual information, mean deviance, credible sets) is taken of the tempered
    samples. A tempered probability below the smallest subnormal of that dtype (fp32: 1.4e-45)
    becomes 0, and :func:`nll` floors it as any 0 (fp32: 104.28 nats); pass fp64 probabilities
    to keep such tails. With several samples, tempering can change which class their mean ranks
    first, so accuracy may move too."""
    t = _check_temperature(temperature, "temperature")
    q = _samples(probs)
    out = q if t == 1.0 else torch.softmax(_log_probs64(q) / t, dim=-1).to(q.dtype)
    return out if probs.dim() == 3 else out.squeeze(0)


def _check_temperature(value, name: str) -> float:
    if isinstance(value, Tensor) and value.numel() == 1 and value.is_floating_point():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be positive and finite, got {value!r}")
    return float(value)


def fit_temperature(
    probs: Tensor, labels: Tensor, bounds: tuple[float, float] = (0.05, 20.0)
) -> float:
    """Post-hoc temperature scaling (Guo et al., 2017) of a posterior predictive: the ``T`` in
    ``bounds`` that minimises :func:`nll` of ``temper(probs, T)`` on held-out rows ``(probs,
    labels)``, the posterior samples' probabilities ``[S, N, C]`` (or ``[N, C]``, one sample:
    classic temperature scaling of a point estimate). Every sample is tempered by the same ``T``
    and then averaged, so ``T < 1`` corrects an under-confident predictive, such as the pool of
    several chains of a student trained on softened targets, and ``T > 1`` an over-confident
    one. Golden-section search on ``log T`` (60 steps, in fp64): the NLL is convex in ``1 / T``
    for one sample; for a pool of samples it may in principle have more than one minimum, and
    the search finds one of them. A ``T`` at a bound means that the optimum lies beyond it. Fit
    it on rows that neither trained the model nor test it (a validation split)."""
    if not isinstance(bounds, (tuple, list)) or len(bounds) != 2:
        raise ValueError(f"bounds must be a pair (low, high), got {bounds!r}")
    lo, hi = (_check_temperature(b, "bounds") for b in bounds)
    if not lo < hi:
        raise ValueError(f"bounds must be (low, high) with low < high, got {bounds!r}")
    q = _samples(probs)
    logq = _log_probs64(q)
    y = _labels(labels, logq.shape[1], logq.shape[2]).to(logq.device)
    idx = y.view(1, -1, 1).expand(logq.shape[0], -1, 1)
    # the NLL of temper's output as nll computes it: a tempered probability that rounds to 0 in
    # the output dtype (below half its smallest subnormal) is floored as nll floors a 0, so that
    # a row whose label has probability 0 (log q = -745 in fp64) weighs what it weighs in nll,
    # a constant, and does not pull T up by -745 / T
    fi = torch.finfo(q.dtype)
    cut = math.log(fi.tiny * fi.eps) - math.log(2.0)
    floor = math.log(fi.tiny) + math.log(fi.eps) - 1.0

    def loss(log_t: float) -> float:
        # -log mean_s softmax(log q / T)[y], per row, via logsumexp over samples
        lp = torch.log_softmax(logq / math.exp(log_t), dim=-1).gather(-1, idx).squeeze(-1)
        lp = torch.where(lp < cut, floor, lp)
        return float(-(torch.logsumexp(lp, dim=0) - math.log(lp.shape[0])).mean())

    return math.exp(_golden_min(loss, math.log(lo), math.log(hi)))


def _golden_min(f, lo: float, hi: float, steps: int = 60) -> float:
    """The minimiser of a unimodal ``f`` on ``[lo, hi]`` by golden-section search."""
    g = (math.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = f(a), f(b)
    for _ in range(steps):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = f(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = f(b)
    return (lo + hi) / 2


def predictive_entropy(probs: Tensor) -> Tensor:
    """``H[p_bar]`` per row (nats), ``[N]``."""
    return _entropy(mean_probs(probs))


def expected_entropy(probs: Tensor) -> Tensor:
    """``E_s H[q^(s)]`` per row (nats), ``[N]`` (aleatoric part)."""
    return _entropy(_samples(probs)).mean(0)


def mutual_information(probs: Tensor) -> Tensor:
    """``H[p_bar] - E_s H[q^(s)]`` per row, clamped at 0 (epistemic part), ``[N]``."""
    q = _samples(probs)
    return (_entropy(q.mean(0)) - _entropy(q).mean(0)).clamp_min(0.0)


def mean_deviance(probs: Tensor) -> Tensor:
    """The paper's uncertainty score ``MD = (2/S) sum_s H[q^(s)]`` per row (nats), ``[N]``."""
    return 2.0 * _entropy(_samples(probs)).mean(0)


def credible_threshold(probs: Tensor, level: float = 0.95) -> Tensor:
    """Per-row threshold ``u`` with ``(1/S) sum_s sum_c q_c^(s) 1[q_c^(s) >= u] = level``.

    The left side is a step function of ``u``, falling from 1 (``u = 0``) to 0 as ``u`` passes
    ``max q``, that changes only at the samples' values; ``u`` is the largest of them at which
    it is still ``>= level``: exactly one of the probabilities, found by sorting each row's
    ``S * C`` values and summing them in fp64 from the largest down, ``[N]`` in the dtype of
    ``probs`` (fp32, fp64 kept). ``level`` is taken of the row's own total (1 up to float
    rounding), so ``level = 1`` gives the smallest positive probability and never takes in the
    classes of probability 0. ``level``: a real number (numpy's too, not a bool) in ``(0, 1]``.
    """
    return _threshold(_samples(probs), _check_level(level))


def _threshold(q: Tensor, level: float) -> Tensor:
    s, n, c = q.shape
    out = torch.empty(n, dtype=q.dtype, device=q.device)
    rows = max(1, (1 << 22) // (s * c))  # a few tens of MB of sort and cumsum at a time
    for a in range(0, n, rows):
        v = q[:, a : a + rows].transpose(0, 1).reshape(-1, s * c)
        v = v.sort(dim=-1, descending=True).values
        mass = v.double().cumsum(-1)  # mass[j] = S x the mass at u = v[j] (and its ties)
        first = torch.searchsorted(mass, level * mass[:, -1:]).clamp_max(s * c - 1)
        out[a : a + rows] = v.gather(-1, first).squeeze(-1)
    return out


def _check_level(level) -> float:
    if isinstance(level, Tensor) and level.numel() == 1 and level.is_floating_point():
        level = level.item()  # a one-element tensor, as the temperatures take it
    if isinstance(level, bool) or not isinstance(level, numbers.Real):
        raise TypeError(f"level must be a real number in (0, 1], got {level!r} "
                        f"({type(level).__name__})")  # fmt: skip
    if not 0.0 < level <= 1.0:  # NaN fails too
        raise ValueError(f"level must be in (0, 1], got {level!r}")
    return float(level)


def credible_set(probs: Tensor, level: float = 0.95) -> Tensor:
    """The deviance-based credible set ``{c : p_bar_c >= u}`` as a boolean mask ``[N, C]``, ``u``
    the :func:`credible_threshold` of the samples (MATH.md section 8).

    The threshold is taken of the individual samples and the set of their mean, so the set can
    be empty: where the samples disagree, each can be sure of a different class while their
    mean is sure of none (two samples, each 0.97 on a different class: ``u = 0.97``, ``p_bar =
    [0.5, 0.5]``, no class reaches ``u``). That is the contract's definition, kept as it is:
    such a row adds size 0 to the mean set size and counts as not covered in
    :func:`credible_set_summary` (its label is not in the set), so disagreement among the
    samples lowers the coverage and the size rather than widening the set.
    """
    q = _samples(probs)
    u = _threshold(q, _check_level(level)).double()
    # p_bar in fp64 and compared within its rounding ((S + 2) ulps), so that the class at the
    # threshold stays in: S identical samples give the set of one (an fp32 mean of S copies of u
    # can round a step below u)
    s = q.shape[0]
    pbar = q.sum(0, dtype=torch.float64) / s
    return pbar >= u.unsqueeze(-1) * (1.0 - (s + 2) * torch.finfo(torch.float64).eps)


class CredibleSetSummary(NamedTuple):
    coverage: Tensor  # fraction of rows whose label is in the set
    mean_size: Tensor  # mean number of classes in the set


def credible_set_summary(probs: Tensor, labels: Tensor, level: float = 0.95) -> CredibleSetSummary:
    """Coverage and mean size of the ``level`` credible sets (MATH.md section 8)."""
    sets = credible_set(probs, level)
    y = _labels(labels, sets.shape[0], sets.shape[1])
    covered = sets.gather(-1, y.view(-1, 1)).squeeze(-1)
    return CredibleSetSummary(covered.float().mean(), sets.sum(-1).float().mean())


def auroc(scores: Tensor, positives: Tensor) -> Tensor:
    """Area under the ROC curve of ``scores`` for telling ``positives`` from the other rows.

    Equals ``P(score_pos > score_neg) + P(tie) / 2`` (Mann-Whitney, average ranks for ties).
    Typical use: an uncertainty score against ``prediction != label`` (misclassification) or
    against ``is_shifted`` (in- versus out-of-distribution).
    """
    if not isinstance(scores, Tensor) or not isinstance(positives, Tensor):
        raise TypeError("scores and positives must be torch.Tensors")
    if scores.dim() != 1 or positives.shape != scores.shape:
        raise ValueError(f"scores and positives must be 1-d of one length, got "
                         f"{tuple(scores.shape)} and {tuple(positives.shape)}")  # fmt: skip
    if not bool(torch.isfinite(scores.double()).all()):
        raise ValueError("scores contains non-finite values (NaN or inf)")
    if positives.dtype != torch.bool and not bool(((positives == 0) | (positives == 1)).all()):
        raise ValueError("positives must be boolean or hold only 0 and 1 (0.2 is not a label)")
    pos = positives.bool()
    n_pos = int(pos.sum())
    n_neg = pos.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("positives must contain both positive and negative rows")
    s = scores.double()
    _, inverse, counts = torch.unique(s, sorted=True, return_inverse=True, return_counts=True)
    # Rank of a tie group = mean of the 1-based positions it occupies in sorted order.
    ends = torch.cumsum(counts, 0).double()
    avg_rank = ends - (counts.double() - 1) / 2
    rank_sum = avg_rank[inverse][pos].sum()
    u = rank_sum - n_pos * (n_pos + 1) / 2
    return (u / (n_pos * n_neg)).float()
