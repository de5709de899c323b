"""Vocabulary-parallel multi-teacher losses over ``torch.distributed`` (MATH.md sections 1-4).

Tensor-parallel language models shard the output head over the vocabulary: rank r holds the
logit columns ``[vocab_start, vocab_start + width)`` of the student and of every teacher. The
losses here take those shards and never gather a full row. Every quantity of MATH.md is a
log-sum-exp or a sum over the vocabulary, so each rank reduces its shard to a few numbers per row
and teacher, and three all-reduces over the group combine them:

1. ``MAX`` of the per-row maxima of every softmax (student at ``τ`` and at 1, teachers at ``τ``
   and at ``τ_w``): ``O(N·K)`` floats;
2. ``SUM`` of the shifted sums ``Σ exp(x − M)``, the cross terms ``Σ exp(x − M)(y − M')``, the
   entropy terms and the label logit ``z_y`` (owned by one rank, 0 elsewhere): ``O(N·K)`` floats;
3. ``SUM`` of the terms that need the normalised distributions: the lgamma sums ``L_k`` of MT-BKD
   (or the JSD mixture terms): ``O(N·K)`` floats.

Then every rank holds the same per-row loss and computes the gradient of its own columns, in the
forward (as the single-process fused ops do); the backward only scales it. Communication per call
is at most ``(8K + 5)·N`` floats per rank plus 11 integers of metadata, independent of the
vocabulary size (``return_stats`` with non-entropy weights adds two reductions of ``4K·N``); the
backward communicates nothing. Before any of that, one small
all-gather of fixed-size shape metadata lets every rank check that the shards tile ``[0, V)`` and
agree on rows, teachers, dtype, labels and options (a fingerprint of the scalar options), so a
rank with bad input makes *every* rank raise a ``ValueError`` instead of leaving the others blocked
in a collective or silently mixing two losses.

Data parallelism (DDP, FSDP) needs nothing from this module: the teacher weights ``w_ik`` of
MATH.md section 1 depend on row i alone, so a rank's rows get exactly the weights they would get
in one process and no cross-rank reduction of weights or statistics exists. Only the mean's
denominator spans ranks: with masked rows, pass ``num_items_in_batch = global_unmasked / world``
so that DDP's gradient averaging reproduces the single-process mean exactly.

The collectives go through :func:`all_reduce` and :func:`all_gather_into_tensor` of this module,
so that tests (and users measuring traffic) can wrap them.
"""

from __future__ import annotations

import math
import numbers
import zlib
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from mtbkd import functional, ops, validate
from mtbkd.functional import MTBKDStats

__all__ = [
    "vocab_parallel_mtbkd_loss",
    "vocab_parallel_multi_teacher_kd_loss",
    "vocab_parallel_fused_linear_mtbkd_loss",
    "vocab_parallel_fused_linear_multi_teacher_kd_loss",
    "all_reduce",
    "all_gather_into_tensor",
]

_DTYPES = {torch.float64: 1, torch.float32: 2, torch.bfloat16: 3, torch.float16: 4}
# Fixed-length shape metadata each rank contributes before any statistic is exchanged.
_META = ("error", "rows", "teachers", "width", "vocab_start", "vocab_size", "has_labels",
         "dtype", "label_sum", "label_crc", "options")  # fmt: skip


def _tensor_crc(t: Tensor) -> int:
    """CRC-32 of a tensor's values (one host transfer): the ranks' labels or fixed weights must be
    the same tensor, which sums alone did not tell ([1, 2, 3] and [2, 0, 4] had the same sum and
    position-weighted sum)."""
    return zlib.crc32(t.detach().reshape(-1).cpu().numpy().tobytes())


def _label_fingerprint(labels: Tensor | None, n: int) -> list[int]:
    if labels is None or n == 0:
        return [0, 0]
    lab = labels.detach().to(torch.int64)
    return [int(lab.sum()), _tensor_crc(lab)]


def _check_items(num_items_in_batch) -> None:
    """``num_items_in_batch`` checked before the ranks agree (inside their error handling), as
    the mean would check it after the collectives: one rank's bad tensor raised there alone, and
    left the other ranks out of step (waiting in the next call's collectives)."""
    if num_items_in_batch is not None:  # whatever the reduction, as in the other losses
        device = (num_items_in_batch.device if isinstance(num_items_in_batch, Tensor)
                  else torch.device("cpu"))  # fmt: skip
        validate.items_divisor(num_items_in_batch, torch.float32, device)


def all_reduce(tensor: Tensor, op: dist.ReduceOp, group: dist.ProcessGroup | None) -> None:
    """In-place ``torch.distributed.all_reduce``: the one reduction the losses call."""
    dist.all_reduce(tensor, op=op, group=group)


def all_gather_into_tensor(output: Tensor, tensor: Tensor, group: dist.ProcessGroup | None) -> None:
    """``output[r] = tensor`` of rank r, by ``torch.distributed.all_gather``."""
    # all_gather (not all_gather_into_tensor) works on every backend, gloo included.
    dist.all_gather(list(output.unbind(0)), tensor, group=group)


# ----------------------------------------------------------------------------------------------
# Validation: local checks, then one all-gather of metadata so that every rank agrees to fail
# ----------------------------------------------------------------------------------------------


def _check_index(value, what: str) -> None:
    """``vocab_start`` / ``vocab_size``: a Python or numpy integer, never a bool."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{what} must be an int, got {type(value).__name__}")


class _Inputs:
    """Canonical local inputs: student ``[N, W]``, teachers ``[K, N, W]`` (acc dtype), labels."""

    def __init__(self, student_shard, teacher_shard, labels, vocab_start, vocab_size,
                 ignore_index, check_finite):  # fmt: skip
        for value, what in ((vocab_start, "vocab_start"), (vocab_size, "vocab_size")):
            _check_index(value, what)
        if (
            isinstance(student_shard, Tensor)
            and student_shard.dim()
            and not student_shard.shape[-1]
        ):
            raise ValueError("student_shard has width 0: every rank needs at least one "
                             "vocabulary column")  # fmt: skip
        student, teachers, flat_labels, lead = validate.canonical_inputs(
            student_shard, teacher_shard, labels, bool(check_finite), ignore_index=ignore_index
        )
        width = student.shape[1]
        if vocab_start < 0 or vocab_start + width > vocab_size:
            raise ValueError(
                f"vocab_start={vocab_start} with a shard of width {width} does not fit in "
                f"vocab_size={vocab_size}"
            )
        if flat_labels is not None:
            validate.check_label_range(flat_labels, vocab_size, ignore_index)
        mask = None if flat_labels is None else flat_labels != ignore_index
        if check_finite:
            validate.check_finite(student, "student_shard", mask)
            for t in teachers:
                validate.check_finite(t, "teacher_shard", mask)
        self.original = student
        self.acc = torch.float64 if student.dtype == torch.float64 else torch.float32
        self.z = student.to(self.acc)
        self.t = torch.stack(teachers).to(self.acc)
        self.labels = flat_labels
        self.lead = lead
        self.mask = mask
        self.width = width
        # (weight mode, fixed weights [K, N] or None), set by _prepare inside its error handling
        self.weight_spec: tuple[str, Tensor | None] | None = None

    def metadata(self, vocab_start: int, vocab_size: int) -> list[int]:
        k, n, w = self.t.shape
        # labels must be the same (global) tensor on every rank
        return [0, n, k, w, int(vocab_start), int(vocab_size), int(self.labels is not None),
                _DTYPES.get(self.original.dtype, 0),
                *_label_fingerprint(self.labels, n)]  # fmt: skip


def _world(group) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is not initialised: call torch.distributed.init_process_group "
            "(torchrun sets the environment for it) before the vocab-parallel losses"
        )
    return dist.get_rank(group), dist.get_world_size(group)


def _options_key(options: dict) -> int:
    """A fingerprint of the loss options (CRC-32 of their repr; ``hash`` differs between
    processes): ranks passing different options would run different collectives or mix two losses.
    """

    def norm(key, value):
        if isinstance(value, Tensor):
            if key == "weights":  # fixed weights: their values' CRC, one host transfer
                try:
                    crc = _tensor_crc(value.to(torch.float64))
                except (RuntimeError, NotImplementedError) as exc:  # a meta tensor, ...: the
                    raise ValueError(f"weights: {exc}") from None  # ranks are told, not hung
                return (tuple(value.shape), crc)
            return "tensor"  # a num_items_in_batch tensor is never read on the host
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            return float(value)  # 2 and 2.0 agree
        return value

    return zlib.crc32(repr(sorted((k, norm(k, v)) for k, v in options.items())).encode())


def _agree(name: str, local: list[int] | None, error: Exception | None, device, group) -> None:
    """All-gather the metadata; raise the same ``ValueError`` on every rank if anything is off."""
    rank, world = _world(group)
    mine = torch.tensor(local if local is not None else [1] + [0] * (len(_META) - 1),
                        dtype=torch.int64, device=device)  # fmt: skip
    table = torch.empty(world, len(_META), dtype=torch.int64, device=device)
    all_gather_into_tensor(table, mine, group)
    rows = table.tolist()
    if error is not None:
        raise error
    bad = [r for r in range(world) if rows[r][0] != 0]
    if bad:
        raise ValueError(f"{name}: invalid inputs on rank(s) {bad} (see the error on those ranks)")
    col = {key: [row[i] for row in rows] for i, key in enumerate(_META)}
    agreed = (("rows", "number of rows N"), ("teachers", "number of teachers K"),
              ("vocab_size", "vocab_size"), ("has_labels", "presence of labels"),
              ("dtype", "dtype"), ("label_sum", "labels"), ("label_crc", "labels"),
              ("options", "options (fingerprints; also the leading shape of the rows, and for "
                          "the fused-linear losses the hidden size H)"))  # fmt: skip
    for key, what in agreed:
        if len(set(col[key])) != 1:
            raise ValueError(
                f"{name}: ranks disagree on the {what}: {col[key]} (rank order); every rank must "
                "pass the same rows, teachers, dtype, global labels and options"
            )
    by_rank = list(zip(col["vocab_start"], col["width"], strict=True))
    vocab = col["vocab_size"][0]
    end = 0
    for start, width, r in sorted((s, w, r) for r, (s, w) in enumerate(by_rank)):
        if start != end:
            raise ValueError(
                f"{name}: the vocabulary shards (vocab_start, width) by rank {by_rank} do not "
                f"tile [0, {vocab}) (rank {r} starts at {start}, expected {end})"
            )
        end = start + width
    if end != col["vocab_size"][0]:
        raise ValueError(
            f"{name}: the vocabulary shards cover [0, {end}) but vocab_size is "
            f"{col['vocab_size'][0]}"
        )
    return col


def _shard_names(exc: Exception) -> Exception:
    """``exc`` of the shared input checks, which name the plain losses' arguments, in these
    functions' own: ``student_shard`` and ``teacher_shard``."""
    import re

    text = re.sub(r"\bstudent_logits\b", "student_shard", str(exc))
    text = re.sub(r"\bteacher_logits\b", "teacher_shard", text)
    return type(exc)(text)


def _prepare(name, student_shard, teacher_shard, labels, vocab_start, vocab_size, group,
             ignore_index, check_finite, option_checks, weights, options) -> _Inputs:  # fmt: skip
    _world(group)
    error: Exception | None = None
    inputs = meta = None
    try:
        option_checks()
        validate.check_ignore_index(ignore_index)  # 2.5 was taken as a label value
        _check_items(options["num_items_in_batch"])
        inputs = _Inputs(student_shard, teacher_shard, labels, vocab_start, vocab_size,
                         ignore_index, check_finite)  # fmt: skip
        inputs.weight_spec = _weight_spec(weights, inputs.t.shape[0], inputs.lead, inputs.original)
        # the leading shape too: [2, 3] and [3, 2] rows would be combined row by row
        key = _options_key(dict(options, lead=tuple(inputs.lead)))
        meta = inputs.metadata(vocab_start, vocab_size) + [key]
    except (TypeError, ValueError) as exc:
        error = _shard_names(exc)
    device = student_shard.device if isinstance(student_shard, Tensor) else torch.device("cpu")
    if dist.get_backend(group) == "nccl" and device.type != "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    _agree(name, meta, error, device, group)
    assert inputs is not None
    return inputs


# ----------------------------------------------------------------------------------------------
# Shard statistics: helpers over the last (vocabulary) axis
# ----------------------------------------------------------------------------------------------


def _exp_shift(x: Tensor, m: Tensor) -> Tensor:
    """``exp(x − M)`` with ``M`` the global row maximum (broadcast over the vocabulary axis)."""
    return torch.exp(x - m.unsqueeze(-1))


def _xlogx_like(e: Tensor, d: Tensor) -> Tensor:
    # e * d with 0 * (±inf or NaN) = 0: a probability that is 0 (a logit of -inf, or underflowed)
    # contributes nothing, as 0 log 0 = 0.
    return torch.where(e > 0, e * d, torch.zeros((), dtype=e.dtype, device=e.device))


def _add_entropy_terms(stage: _Stage, b: Tensor, m_b: Tensor) -> None:
    """The entropy sums of ``softmax(b)`` on this shard, shifted by the global row maxima ``m_b``.

    ``S = Σ exp(b − M)`` goes as the sum ``k:r_b`` of the entries below the maximum and the count
    ``k:n_b`` of those at it, so that :func:`_entropy_of` can take ``log S = log1p(S − 1)`` without
    rounding ``S`` (a nearly one-hot teacher's entropy is mostly the small sum that ``S`` rounds
    away); ``k:e_b = Σ exp(b − M)(b − M)``.
    """
    db = b - m_b.unsqueeze(-1)
    eb = torch.exp(db)
    top = db == 0
    stage.add(
        "k:r_b", torch.where(top, torch.zeros((), dtype=eb.dtype, device=eb.device), eb).sum(-1)
    )
    stage.add("k:n_b", top.sum(-1).to(eb.dtype))
    stage.add("k:e_b", _xlogx_like(eb, db).sum(-1))


def _entropy_of(sums: dict) -> Tensor:
    """``H = log S − Σ exp(b − M)(b − M) / S`` from the reduced :func:`_add_entropy_terms`."""
    rest = sums["k:r_b"] + (sums["k:n_b"] - 1.0)  # S - 1, exact where S = 1 + tiny would round
    return torch.log1p(rest) - sums["k:e_b"] / (1.0 + rest)


def _label_logit(z: Tensor, labels: Tensor | None, vocab_start: int) -> Tensor:
    """``z_{i, y_i}`` where this rank owns ``y_i``, else 0 (summed over ranks it is ``z_y``)."""
    n, w = z.shape
    if labels is None:
        return z.new_zeros(n)
    local = labels - vocab_start
    owned = (local >= 0) & (local < w)
    picked = z.gather(1, local.clamp(0, max(w - 1, 0)).unsqueeze(1)).squeeze(1)
    return torch.where(owned, picked, torch.zeros_like(picked))


def _onehot_local(z: Tensor, labels: Tensor, vocab_start: int) -> Tensor:
    n, w = z.shape
    local = labels - vocab_start
    cols = torch.arange(w, device=z.device)
    return (cols.unsqueeze(0) == local.unsqueeze(1)).to(z.dtype)


def _weights(mode, fixed, entropy: Tensor | None, k: int, n: int, like: Tensor) -> Tensor:
    """MATH.md section 1 from the (already global) entropies ``[K, N]``."""
    if mode == "fixed":
        return fixed
    if mode == "uniform" or k == 1:
        return torch.full((k, n), 1.0 / k, dtype=like.dtype, device=like.device)
    assert entropy is not None
    total = entropy.sum(0, keepdim=True)
    w_tilde = 1.0 - entropy / total
    w = w_tilde / w_tilde.sum(0, keepdim=True)
    return torch.where(total > 0, w, torch.full_like(w, 1.0 / k))


def _weight_spec(weights, k: int, lead, like: Tensor):
    if isinstance(weights, Tensor):
        return "fixed", validate.fixed_weights(weights, k, lead, like)
    if not isinstance(weights, str) or weights not in ("entropy", "uniform"):
        raise ValueError(f"weights must be 'entropy', 'uniform' or a Tensor, got {weights!r}")
    return weights, None


class _Stage:
    """Packs named ``[..., N]`` statistics into one buffer for a single collective."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.parts: list[Tensor] = []

    def add(self, name: str, value: Tensor) -> None:
        self.names.append(name)
        self.parts.append(value if value.dim() == 2 else value.unsqueeze(0))

    def reduce(self, op, group) -> dict[str, Tensor]:
        sizes = [p.shape[0] for p in self.parts]
        buf = torch.cat(self.parts, 0).contiguous()
        all_reduce(buf, op, group)
        out = {}
        for name, piece in zip(self.names, buf.split(sizes, 0), strict=True):
            # "k:" statistics are per teacher [K, N]; the others per row [N].
            out[name] = piece if name.startswith("k:") else piece[0]
        return out


class _ScaleByRows(torch.autograd.Function):
    """Rows in, rows out; the gradient of the student shard was computed in the forward."""

    @staticmethod
    def forward(ctx, student: Tensor, rows: Tensor, grad: Tensor) -> Tensor:
        ctx.save_for_backward(grad)
        ctx.student_dtype = student.dtype
        ctx.student_shape = student.shape
        return rows.clone()

    @staticmethod
    def backward(ctx, grad_rows: Tensor):
        ops.refuse_double_backward()  # the gradient was computed in the forward: a constant here
        (grad,) = ctx.saved_tensors
        scaled = grad * grad_rows.to(grad.dtype).unsqueeze(-1)
        return scaled.to(ctx.student_dtype).reshape(ctx.student_shape), None, None


def _finish(student_shard: Tensor, inputs: _Inputs, rows: Tensor, grad: Tensor, reduction,
            ignore_index, num_items_in_batch) -> Tensor:  # fmt: skip
    zero = torch.zeros((), dtype=rows.dtype, device=rows.device)
    if inputs.mask is not None:
        rows = torch.where(inputs.mask, rows, zero)
        grad = torch.where(inputs.mask.unsqueeze(-1), grad, zero)
    if student_shard.requires_grad and torch.is_grad_enabled():
        rows = _ScaleByRows.apply(student_shard, rows, grad)
    return functional._reduce(rows, inputs.labels, inputs.lead, reduction, ignore_index,
                              num_items_in_batch)  # fmt: skip


# ----------------------------------------------------------------------------------------------
# MT-BKD (MATH.md section 2)
# ----------------------------------------------------------------------------------------------


def vocab_parallel_mtbkd_loss(
    student_shard: Tensor,
    teacher_shard: Tensor | Sequence[Tensor],
    labels: Tensor | None = None,
    *,
    vocab_start: int,
    vocab_size: int,
    group: dist.ProcessGroup | None = None,
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
) -> Tensor | tuple[Tensor, MTBKDStats]:
    """:func:`mtbkd.mtbkd_loss` on vocabulary shards (MATH.md sections 2, 4); equal on all ranks.

    Row loss ``β_h·CE + β_p·(−lgamma(V+λ) − logsumexp_k(log w_k + C_k − L_k))`` assembled from
    per-shard statistics with three all-reduces of ``O(N·K)`` floats; no full row is gathered.

    Args:
        student_shard: ``[..., W]``, the student's logit columns ``[vocab_start, vocab_start + W)``
            of this rank (ranks may hold different widths; together they tile ``[0, vocab_size)``).
        teacher_shard: ``[K, ..., W]`` or a sequence of K ``[..., W]``: the same columns of the
            teachers.
        labels: ``[...]`` *global* class indices, identical on every rank (or None).
        vocab_start: first global column of this rank's shard.
        vocab_size: the full vocabulary size V.
        group: process group over which the vocabulary is sharded (default: the world). Give it a
            ``timeout`` at creation: a rank that never arrives fails the others in bounded time.
        return_stats: also return :class:`mtbkd.MTBKDStats` (same on every rank).
        Other options as in :func:`mtbkd.mtbkd_loss`.

    Returns the reduced loss (identical on every rank); its backward writes the gradient of this
    rank's ``student_shard`` only. In a tensor-parallel model the gradient with respect to the
    replicated hidden states is then summed over the group by the model's sharded head, as usual.
    """
    name = "vocab_parallel_mtbkd_loss"

    def option_checks() -> None:
        validate.check_mtbkd_options(
            temperature,
            concentration,
            weight_temperature,
            prior_weight,
            hard_label_weight,
            reduction,
        )
        validate.check_flags(check_finite=check_finite, return_stats=return_stats)

    options = dict(temperature=temperature, concentration=concentration,
                   prior_weight=prior_weight, hard_label_weight=hard_label_weight, weights=weights,
                   weight_temperature=weight_temperature, ignore_index=ignore_index,
                   reduction=reduction, num_items_in_batch=num_items_in_batch,
                   return_stats=return_stats)  # fmt: skip
    inputs = _prepare(name, student_shard, teacher_shard, labels, vocab_start, vocab_size, group,
                      ignore_index, check_finite, option_checks, weights, options)  # fmt: skip
    z, t, lab = inputs.z, inputs.t, inputs.labels
    k, n, _ = t.shape
    mode, fixed = inputs.weight_spec
    tau, lam, tau_w = float(temperature), float(concentration), float(weight_temperature)
    # Python floats: a numpy float32 option kept a float64 gradient's coefficients in float32
    prior_weight, hard_label_weight = float(prior_weight), float(hard_label_weight)
    need_entropy = mode == "entropy" and k > 1
    with torch.no_grad():
        u = z / tau  # student at τ
        a = t / tau  # teachers at τ
        b = t / tau_w if need_entropy else None

        # 1. MAX of the row maxima of every softmax.
        s1 = _Stage()
        s1.add("m_u", u.amax(-1))
        if lab is not None:
            s1.add("m_z", z.amax(-1))
        s1.add("k:m_a", a.amax(-1))
        if b is not None:
            s1.add("k:m_b", b.amax(-1))
        mx = s1.reduce(dist.ReduceOp.MAX, group)

        # 2. SUM of the shifted exponential sums and the cross / entropy / label terms.
        eu = _exp_shift(u, mx["m_u"])
        ea = _exp_shift(a, mx["k:m_a"])
        s2 = _Stage()
        s2.add("s_u", eu.sum(-1))
        s2.add("k:s_a", ea.sum(-1))
        # C_k: Σ_c p_kc (u_c − M_u), shifted so that the sum stays well conditioned.
        s2.add("k:x", _xlogx_like(ea, (u - mx["m_u"].unsqueeze(-1)).unsqueeze(0)).sum(-1))
        if lab is not None:
            s2.add("s_z", _exp_shift(z, mx["m_z"]).sum(-1))
            s2.add("z_y", _label_logit(z, lab, vocab_start))
        if b is not None:
            _add_entropy_terms(s2, b, mx["k:m_b"])
        sm = s2.reduce(dist.ReduceOp.SUM, group)

        log_s_u = sm["s_u"].log()
        lse_a = mx["k:m_a"] + sm["k:s_a"].log()
        cross = lam * (sm["k:x"] / sm["k:s_a"] - log_s_u)  # C_k  [K, N]
        entropy = None
        if b is not None:
            entropy = _entropy_of(sm)

        # 3. SUM of the lgamma sums over the normalised teacher distributions.
        p = torch.exp(a - lse_a.unsqueeze(-1))  # [K, N, W]
        s3 = _Stage()
        s3.add("k:lg", torch.lgamma(1.0 + lam * p).sum(-1))
        lg = s3.reduce(dist.ReduceOp.SUM, group)["k:lg"]

        w = _weights(mode, fixed, entropy, k, n, z)
        ell = torch.log(w) + cross - lg
        prior = -math.lgamma(vocab_size + lam) - torch.logsumexp(ell, 0)
        resp = torch.softmax(ell, 0)
        q_tau = torch.exp(u - (mx["m_u"] + log_s_u).unsqueeze(-1))
        if prior_weight != 0:
            grad = (prior_weight * lam / tau) * (q_tau - (resp.unsqueeze(-1) * p).sum(0))
            rows = prior_weight * prior
        else:  # no 0 * inf (nor 0 * NaN) for an infinite prior: the term is absent
            grad, rows = torch.zeros_like(z), torch.zeros_like(prior)
        ce = torch.zeros_like(prior)
        if lab is not None:
            lse_z = mx["m_z"] + sm["s_z"].log()
            ce = lse_z - sm["z_y"]
            if hard_label_weight != 0:  # no 0 * inf for a -inf logit at the label
                rows = rows + hard_label_weight * ce
            q1 = torch.exp(z - lse_z.unsqueeze(-1))
            grad = grad + hard_label_weight * (q1 - _onehot_local(z, lab, vocab_start))
    loss = _finish(student_shard, inputs, rows, grad, reduction, ignore_index, num_items_in_batch)
    if not return_stats:
        return loss
    lead = inputs.lead
    keep = inputs.mask
    if keep is None:
        keep = torch.ones(n, dtype=torch.bool, device=rows.device)
    zero = torch.zeros((), dtype=rows.dtype, device=rows.device)
    if entropy is None:
        entropy = _entropy_only(inputs, tau_w, group)
    stats = MTBKDStats(
        weights=torch.where(keep, w, zero).reshape(k, *lead),
        responsibilities=torch.where(keep, resp, zero).reshape(k, *lead),
        entropy=torch.where(keep, entropy, zero).reshape(k, *lead),
        prior=torch.where(keep, prior, zero).reshape(lead),
        ce=torch.where(keep, ce, zero).reshape(lead),
    )
    return loss, stats


def _entropy_only(inputs: _Inputs, tau_w: float, group) -> Tensor:
    """Teacher entropies at ``τ_w`` for the statistics when the weights did not need them."""
    with torch.no_grad():
        b = inputs.t / tau_w
        s1 = _Stage()
        s1.add("k:m_b", b.amax(-1))
        m = s1.reduce(dist.ReduceOp.MAX, group)["k:m_b"]
        s2 = _Stage()
        _add_entropy_terms(s2, b, m)
        return _entropy_of(s2.reduce(dist.ReduceOp.SUM, group))


# ----------------------------------------------------------------------------------------------
# Weighted-sum KD family (MATH.md section 3)
# ----------------------------------------------------------------------------------------------


def vocab_parallel_multi_teacher_kd_loss(
    student_shard: Tensor,
    teacher_shard: Tensor | Sequence[Tensor],
    labels: Tensor | None = None,
    *,
    vocab_start: int,
    vocab_size: int,
    group: dist.ProcessGroup | None = None,
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
    """:func:`mtbkd.multi_teacher_kd_loss` on vocabulary shards (MATH.md sections 3 and 4).

    Row loss ``β_h·CE + β_s·s(τ)·Σ_k w_k·D(p_k^τ, q^τ)`` from per-shard statistics: two
    all-reduces of ``O(N·K)`` floats for forward/reverse KL, three for the generalised JSD (its
    mixture needs the normalised distributions). Arguments as in
    :func:`vocab_parallel_mtbkd_loss` and :func:`mtbkd.multi_teacher_kd_loss`.
    """
    name = "vocab_parallel_multi_teacher_kd_loss"

    def option_checks() -> None:
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

    options = dict(divergence=divergence, beta=beta, temperature=temperature, weights=weights,
                   weight_temperature=weight_temperature, hard_label_weight=hard_label_weight,
                   soft_label_weight=soft_label_weight, scale_by_t2=scale_by_t2,
                   ignore_index=ignore_index, reduction=reduction,
                   num_items_in_batch=num_items_in_batch)  # fmt: skip
    inputs = _prepare(name, student_shard, teacher_shard, labels, vocab_start, vocab_size, group,
                      ignore_index, check_finite, option_checks, weights, options)  # fmt: skip
    z, t, lab = inputs.z, inputs.t, inputs.labels
    k, n, _ = t.shape
    mode, fixed = inputs.weight_spec
    tau, tau_w = float(temperature), float(weight_temperature)
    # Python floats: a numpy float32 option kept a float64 gradient's coefficients in float32
    beta, hard_label_weight = float(beta), float(hard_label_weight)
    kind = divergence
    if divergence == "jsd" and beta in (0.0, 1.0):
        kind = "forward_kl" if beta == 0.0 else "reverse_kl"
    coef = float(soft_label_weight) * (tau**2 if scale_by_t2 else 1.0)
    need_entropy = mode == "entropy" and k > 1
    with torch.no_grad():
        u = z / tau
        a = t / tau
        b = t / tau_w if need_entropy else None

        s1 = _Stage()
        s1.add("m_u", u.amax(-1))
        if lab is not None:
            s1.add("m_z", z.amax(-1))
        s1.add("k:m_a", a.amax(-1))
        if b is not None:
            s1.add("k:m_b", b.amax(-1))
        mx = s1.reduce(dist.ReduceOp.MAX, group)

        du = u - mx["m_u"].unsqueeze(-1)  # [N, W]
        da = a - mx["k:m_a"].unsqueeze(-1)  # [K, N, W]
        eu, ea = torch.exp(du), torch.exp(da)
        s2 = _Stage()
        s2.add("s_u", eu.sum(-1))
        s2.add("k:s_a", ea.sum(-1))
        if kind == "forward_kl":
            s2.add("k:pa", _xlogx_like(ea, da).sum(-1))  # Σ e^{a−M}(a − M)
            s2.add("k:pu", _xlogx_like(ea, du.unsqueeze(0)).sum(-1))  # Σ e^{a−M}(u − M_u)
        elif kind == "reverse_kl":
            s2.add("qu", _xlogx_like(eu, du).sum(-1))  # Σ e^{u−M_u}(u − M_u)
            s2.add("k:qa", _xlogx_like(eu.unsqueeze(0).expand_as(da), da).sum(-1))
        if lab is not None:
            s2.add("s_z", _exp_shift(z, mx["m_z"]).sum(-1))
            s2.add("z_y", _label_logit(z, lab, vocab_start))
        if b is not None:
            _add_entropy_terms(s2, b, mx["k:m_b"])
        sm = s2.reduce(dist.ReduceOp.SUM, group)

        log_s_u, log_s_a = sm["s_u"].log(), sm["k:s_a"].log()
        logq = du - log_s_u.unsqueeze(-1)  # [N, W]
        logp = da - log_s_a.unsqueeze(-1)  # [K, N, W]
        q = torch.exp(logq)
        entropy = None
        if b is not None:
            entropy = _entropy_of(sm)
        w = _weights(mode, fixed, entropy, k, n, z)
        w_col = w.unsqueeze(-1)

        def weighted(terms: Tensor, by: Tensor) -> Tensor:
            # Σ_k w_k·term_k, a teacher of weight 0 left out (its term may be infinite)
            return torch.where(by > 0, by * terms, 0.0).sum(0)

        if kind == "forward_kl":
            # KL(p‖q) = Σ p (a − M_a) − log S_a − Σ p (u − M_u) + log S_u
            div = (sm["k:pa"] - sm["k:pu"]) / sm["k:s_a"] - log_s_a + log_s_u
            p = torch.exp(logp)
            grad = (coef / tau) * (q - (w_col * p).sum(0))
        elif kind == "reverse_kl":
            div = (sm["qu"] - sm["k:qa"]) / sm["s_u"] - log_s_u + log_s_a
            per = _xlogx_like(q.unsqueeze(0), logq.unsqueeze(0) - logp - div.unsqueeze(-1))
            grad = (coef / tau) * weighted(per, w_col)
        else:
            # Generalised JSD: m_k = β p_k + (1−β) q needs the normalised p and q (stage 3).
            p = torch.exp(logp)
            logm = torch.logaddexp(logp + math.log(beta), logq.unsqueeze(0) + math.log(1.0 - beta))
            s3 = _Stage()
            s3.add("k:kp", _xlogx_like(p, logp - logm).sum(-1))
            s3.add("k:kq", _xlogx_like(q.unsqueeze(0).expand_as(p), logq.unsqueeze(0) - logm)
                   .sum(-1))  # fmt: skip
            js = s3.reduce(dist.ReduceOp.SUM, group)
            div = beta * js["k:kp"] + (1.0 - beta) * js["k:kq"]
            # dD/dq_c = (1−β) log(q_c/m_c); through softmax(z/τ): (q/τ)(g − Σ q g).
            g = (1.0 - beta) * (logq.unsqueeze(0) - logm)
            per = _xlogx_like(q.unsqueeze(0), g - ((1.0 - beta) * js["k:kq"]).unsqueeze(-1))
            grad = (coef / tau) * weighted(per, w_col)
        if coef != 0:
            rows = coef * weighted(div, w)
        else:  # no 0 * inf for an infinite divergence: the soft term is absent
            grad, rows = torch.zeros_like(z), torch.zeros_like(div[0])
        if lab is not None:
            lse_z = mx["m_z"] + sm["s_z"].log()
            if hard_label_weight != 0:  # no 0 * inf for a -inf logit at the label
                rows = rows + hard_label_weight * (lse_z - sm["z_y"])
            q1 = torch.exp(z - lse_z.unsqueeze(-1))
            grad = grad + hard_label_weight * (q1 - _onehot_local(z, lab, vocab_start))
    return _finish(student_shard, inputs, rows, grad, reduction, ignore_index, num_items_in_batch)


# ----------------------------------------------------------------------------------------------
# Fused linear head, sharded over the vocabulary (MATH.md sections 2-4)
# ----------------------------------------------------------------------------------------------
#
# Rank r holds the rows [lo, hi) of the student's output head W and the same columns of the
# teachers' logits; the hidden states h [N, H] are replicated. Rows are processed in chunks:
# z_c = h_c W_rᵀ (+ b_r) is only [c, hi − lo], the vocab-parallel loss above turns it into the
# per-row loss and its local gradient shard G_c = dL/dz_c, then
#   grad_W_r += G_cᵀ h_c,  grad_b_r += Σ_i G_c,i  (local: nothing to communicate),
#   grad_h_c  = G_c W_r    (a PARTIAL sum over this rank's columns).
# The full grad_h = Σ_r G_r W_r is one SUM all-reduce of [N, H] in the backward, as the
# "copy to the tensor-parallel region" of a column-parallel head does. That all-reduce is
# O(N·H) floats, not O(N·K); everything else stays O(N·K) per chunk.


def _fused_meta(hidden: Tensor, teachers: list[Tensor], labels: Tensor | None, weight: Tensor,
                vocab_start: int, vocab_size: int) -> list[int]:  # fmt: skip
    # Same layout as _Inputs.metadata, so that _agree checks rows, teachers, tiling and labels.
    n = hidden.shape[0]
    return [0, n, len(teachers), weight.shape[0], int(vocab_start), int(vocab_size),
            int(labels is not None), _DTYPES.get(hidden.dtype, 0),
            *_label_fingerprint(labels, n)]  # fmt: skip


def _fused_inputs(student_hidden, student_weight_shard, teacher_logits_shard, labels,
                  student_bias_shard, vocab_start, vocab_size, chunk_size):  # fmt: skip
    """Local checks and canonical shapes: hidden ``[N, H]``, teachers K × ``[N, W]``, labels."""
    from mtbkd import fused_linear as FL

    for value, what in ((vocab_start, "vocab_start"), (vocab_size, "vocab_size")):
        _check_index(value, what)
    if not isinstance(student_hidden, Tensor):
        raise TypeError(f"student_hidden must be a torch.Tensor, got "
                        f"{type(student_hidden).__name__}")  # fmt: skip
    if student_hidden.dim() < 1:
        raise ValueError("student_hidden must be [N, H] (or [..., H])")
    FL._check_matrix(student_hidden, "student_hidden", student_hidden.dim())
    lead = student_hidden.shape[:-1]
    hidden = student_hidden.reshape(-1, student_hidden.shape[-1])
    n = hidden.shape[0]
    weight = FL._check_matrix(student_weight_shard, "student_weight_shard", 2)
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"student_weight_shard has hidden size {weight.shape[1]} but "
                         f"student_hidden has {hidden.shape[1]}")  # fmt: skip
    if weight.dtype != hidden.dtype or weight.device != hidden.device:
        raise TypeError("student_weight_shard must have student_hidden's dtype and device")
    width = weight.shape[0]
    if width == 0:
        raise ValueError("student_weight_shard has 0 rows: every rank needs at least one "
                         "vocabulary row of the head")  # fmt: skip
    if vocab_start < 0 or vocab_start + width > vocab_size:
        raise ValueError(f"vocab_start={vocab_start} with a head shard of {width} rows does not "
                         f"fit in vocab_size={vocab_size}")  # fmt: skip
    if student_bias_shard is not None:
        FL._check_matrix(student_bias_shard, "student_bias_shard", 1)
        if student_bias_shard.shape[0] != width:
            raise ValueError(f"student_bias_shard has {student_bias_shard.shape[0]} entries but "
                             f"student_weight_shard has {width} rows")  # fmt: skip
        if student_bias_shard.dtype != hidden.dtype or student_bias_shard.device != hidden.device:
            raise TypeError("student_bias_shard must have student_hidden's dtype and device")
    if isinstance(teacher_logits_shard, Tensor):
        if teacher_logits_shard.dim() != len(lead) + 2:
            raise ValueError(
                f"teacher_logits_shard must be [K, ..., W] with ... = {tuple(lead)}, got shape "
                f"{tuple(teacher_logits_shard.shape)}"
            )
        raw = list(teacher_logits_shard.unbind(0))
    elif isinstance(teacher_logits_shard, Sequence) and not isinstance(
        teacher_logits_shard, (str, bytes)
    ):
        raw = list(teacher_logits_shard)
    else:
        raise TypeError("teacher_logits_shard must be a tensor [K, ..., W] or a sequence of "
                        f"[..., W] tensors, got {type(teacher_logits_shard).__name__}")  # fmt: skip
    if not raw:
        raise ValueError("teacher_logits_shard must hold at least one teacher (got K = 0)")
    teachers = []
    for i, t in enumerate(raw):
        FL._check_matrix(t, f"teacher_logits_shard[{i}]", t.dim() if isinstance(t, Tensor) else 2)
        if t.shape != (*lead, width):
            raise ValueError(f"teacher_logits_shard[{i}] must have shape {(*lead, width)} "
                             f"(rows of student_hidden, this rank's head rows), got "
                             f"{tuple(t.shape)}")  # fmt: skip
        if t.device != hidden.device:
            raise ValueError(f"teacher_logits_shard[{i}] is on {t.device} but student_hidden is "
                             f"on {hidden.device}")  # fmt: skip
        teachers.append(t.detach().reshape(n, width))
    if labels is not None:
        if not isinstance(labels, Tensor):
            raise TypeError(f"labels must be a torch.Tensor or None, got {type(labels).__name__}")
        if labels.dtype.is_floating_point or labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(f"labels must be an integer tensor, got dtype {labels.dtype}")
        if labels.shape != lead:
            raise ValueError(f"labels must have shape {tuple(lead)} (student_hidden without its "
                             f"last dim), got {tuple(labels.shape)}")  # fmt: skip
        if labels.device != hidden.device:  # as the single-process fused loss
            raise ValueError(
                f"labels is on {labels.device} but student_hidden is on {hidden.device}"
            )
        labels = labels.reshape(-1).to(dtype=torch.int64)
    chunk = validate.check_chunk_size(chunk_size) or FL.auto_chunk_size(n, width, len(teachers))
    return hidden, weight, teachers, labels, lead, chunk


class _ShardedHead:
    """The chunk loop of one call: per-row loss, stats and the (scaled) gradients of the head."""

    def __init__(self, loss_fn, opts: dict, hidden, weight, bias, teachers, labels, chunk,
                 vocab_start, vocab_size, group) -> None:  # fmt: skip
        self.loss_fn, self.opts = loss_fn, opts
        self.hidden, self.weight, self.bias = hidden, weight, bias
        self.teachers, self.labels, self.chunk = teachers, labels, chunk
        self.where = {"vocab_start": vocab_start, "vocab_size": vocab_size, "group": group}
        self.acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32

    def _teacher_rows(self, t: Tensor, rows: slice) -> Tensor:
        """A chunk of a teacher in the student's dtype, as every other loss takes its teachers
        (float32 teachers of a bfloat16 student rounded to bfloat16; before, the chunk reached
        the loss in float32, next to logits computed in the accumulation dtype, and kept its
        precision: 5e-5 of the loss in an audit's example). A finite logit that overflows to
        -inf in the cast is kept at the dtype's lowest value (``finfo(float32).min`` masking); one
        that overflows to +inf stays +inf, which the loss's finiteness check refuses on every
        rank (an error raised here, on one rank, would leave the others in a collective)."""
        src, dtype = t[rows], self.hidden.dtype
        if src.dtype == dtype or not validate._narrowing(src.dtype, dtype):
            return src.to(dtype)
        lo = torch.finfo(dtype).min
        return torch.where(torch.isfinite(src), src.clamp_min(lo), src).to(dtype)

    def run(self, row_scale: Tensor | None, want_grads: bool, want_stats: bool = False):
        """Loss rows ``[N]``, stats per chunk and, when ``want_grads``, ``(gh_partial, gW, gb)``
        with each row's gradient scaled by ``row_scale`` (a scalar or ``[N]`` tensor)."""
        hidden, weight, bias, acc = self.hidden, self.weight, self.bias, self.acc
        n = hidden.shape[0]
        loss_rows = torch.zeros(n, dtype=acc, device=hidden.device)
        stats: list = []
        gh = gw = gb = None
        if want_grads:
            gh = torch.zeros(hidden.shape, dtype=acc, device=hidden.device)
            gw = torch.zeros(weight.shape, dtype=acc, device=weight.device)
            gb = None if bias is None else torch.zeros(weight.shape[0], dtype=acc,
                                                       device=weight.device)  # fmt: skip
            w_acc = weight.to(acc)
        wt = weight.t()
        for start in range(0, n, self.chunk):
            rows = slice(start, min(start + self.chunk, n))
            h = hidden[rows]
            # The loss works in the accumulation dtype anyway; G then needs no extra rounding.
            z = (h @ wt if bias is None else torch.addmm(bias, h, wt)).to(acc)
            t_chunk = [self._teacher_rows(t, rows) for t in self.teachers]
            lab = None if self.labels is None else self.labels[rows]
            kw = dict(self.where, reduction="none", **self.opts)
            if isinstance(kw["weights"], Tensor):
                kw["weights"] = kw["weights"][:, rows]
            if want_stats:
                kw["return_stats"] = True
            try:  # the loss numbers the rows of its chunk, and names its own arguments
                if not want_grads:
                    with torch.no_grad():
                        out = self.loss_fn(z, t_chunk, lab, **kw)
                else:
                    leaf = z.detach().requires_grad_(True)
                    with torch.enable_grad():
                        out = self.loss_fn(leaf, t_chunk, lab, **kw)
            except ValueError as exc:  # named as the fused function's caller named them
                inner = self.loss_fn.__name__
                raise validate.in_rows(exc, start, [
                    ("teacher_shard", "teacher_logits_shard"),
                    ("student_shard",
                     "student_hidden @ student_weight_shard.T (+ student_bias_shard)"),
                    (inner, inner.replace("vocab_parallel_", "vocab_parallel_fused_linear_", 1)),
                ]) from None  # fmt: skip
            if want_grads:
                r = out[0] if want_stats else out
                scale = row_scale[rows] if row_scale.dim() else row_scale.expand(r.shape[0])
                # The vocab-parallel backward only scales the G it computed in its forward.
                (g,) = torch.autograd.grad(r, leaf, grad_outputs=scale.to(r.dtype))
                del leaf, z
                gh[rows] = g @ w_acc
                gw.addmm_(g.t(), h.to(acc))
                if gb is not None:
                    gb += g.sum(0)
            r = out[0] if want_stats else out
            loss_rows[rows] = r.detach()
            if want_stats:
                stats.append(out[1])
        return loss_rows, stats, gh, gw, gb


class _VocabParallelFusedLinear(torch.autograd.Function):
    """Loss and head gradients in the forward; the backward scales them and all-reduces grad_h."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, head: _ShardedHead, reduction, scale, want_stats,
                fn_ctx):  # fmt: skip
        need = (hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
        ctx.need, ctx.head = need, head
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        if reduction == "none":
            # The per-row grad_output is known only in the backward: recompute the chunks there.
            rows, stats, *_ = head.run(None, False, want_stats)
            ctx.recompute = True
            fn_ctx["stats"] = stats
            return rows
        # no gradients under no_grad (inside forward grad mode is always off: the caller's)
        rows, stats, gh, gw, gb = head.run(scale, any(need) and fn_ctx["grad"], want_stats)
        ctx.recompute = False
        fn_ctx["stats"] = stats
        ctx.save_for_backward(gh, gw, gb)
        return rows.sum() * scale

    @staticmethod
    def backward(ctx, grad_out):
        ops.refuse_double_backward()  # the gradients were computed in the forward
        head, need = ctx.head, ctx.need
        if ctx.recompute:
            go = torch.ones((), dtype=head.acc, device=grad_out.device)
            from mtbkd import fused_linear as FL

            with torch.no_grad(), FL.no_autocast(grad_out.device.type):
                _, _, gh, gw, gb = head.run(grad_out.to(head.acc), True)
        else:
            gh, gw, gb = ctx.saved_tensors
            go = grad_out.to(head.acc)
        dh = dw = db = None
        if need[0]:
            dh = gh * go
            # Partial over this rank's vocabulary columns: the sum over the group is grad_h.
            all_reduce(dh, dist.ReduceOp.SUM, head.where["group"])
            dh = dh.to(ctx.dtypes[0])
        if need[1]:
            dw = (gw * go).to(ctx.dtypes[1])
        if need[2]:
            db = (gb * go).to(ctx.dtypes[2])
        return dh, dw, db, None, None, None, None, None


def _fused_call(name, loss_fn, opts, student_hidden, student_weight_shard, teacher_logits_shard,
                labels, student_bias_shard, vocab_start, vocab_size, group, chunk_size,
                reduction, num_items_in_batch, return_stats, option_checks):  # fmt: skip
    from mtbkd import fused_linear as FL

    _world(group)
    error: Exception | None = None
    parsed = meta = None
    try:
        option_checks()
        validate.check_ignore_index(opts["ignore_index"])
        parsed = _fused_inputs(student_hidden, student_weight_shard, teacher_logits_shard,
                               labels, student_bias_shard, vocab_start, vocab_size,
                               chunk_size)  # fmt: skip
        # built aside and kept only when complete: a check below that raises must leave meta
        # None, or _agree would gather a row of another width (gloo's size error, or a hang)
        row = _fused_meta(parsed[0], parsed[2], parsed[3], parsed[1], vocab_start, vocab_size)
        if isinstance(opts["weights"], Tensor):  # its shape checked before its fingerprint
            opts = dict(opts, weights=_flat_weights(opts["weights"], len(parsed[2]), parsed[4]))
        # checked here, not after the agreement: one rank's error there left the others
        # waiting in the chunk loop's collectives
        _check_items(num_items_in_batch)
        row.append(_options_key(dict(opts, chunk_size=chunk_size, reduction=reduction,
                                     num_items_in_batch=num_items_in_batch,
                                     return_stats=return_stats,
                                     # grad_h's all-reduce needs one H on every rank
                                     hidden_size=parsed[0].shape[1],
                                     lead=tuple(parsed[4]))))  # fmt: skip
        meta = row
    except (TypeError, ValueError) as exc:
        error = exc
    device = student_hidden.device if isinstance(student_hidden, Tensor) else torch.device("cpu")
    if dist.get_backend(group) == "nccl" and device.type != "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    # Agree before the chunk loop: every rank then runs the same number of chunk collectives.
    col = _agree(name, meta, error, device, group)
    assert parsed is not None
    hidden, weight, teachers, flat_labels, lead, chunk = parsed
    if chunk_size is None:
        chunk = FL.auto_chunk_size(hidden.shape[0], max(col["width"]), len(teachers))
    # under autocast: the head's float32 inputs cast as autocast casts F.linear's, the chunks then
    # run with autocast off (as fused_linear's), also in a backward called inside autocast
    hidden, weight, bias = FL.autocast_cast(hidden, weight, student_bias_shard)
    head = _ShardedHead(loss_fn, opts, hidden, weight, bias, teachers, flat_labels,
                        chunk, vocab_start, vocab_size, group)  # fmt: skip
    scale = None
    if reduction != "none":
        scale = FL._mean_scale(reduction, flat_labels, hidden.shape[0], opts["ignore_index"],
                               num_items_in_batch, head.acc, hidden.device)  # fmt: skip
    fn_ctx: dict = {"grad": torch.is_grad_enabled()}
    with FL.no_autocast(hidden.device.type):
        out = _VocabParallelFusedLinear.apply(hidden, weight, bias, head, reduction, scale,
                                              return_stats, fn_ctx)  # fmt: skip
    if reduction == "none":
        out = out.reshape(lead)
    if not return_stats:
        return out
    parts = fn_ctx["stats"]
    k = len(teachers)

    def cat(field: str) -> Tensor:
        if not parts:  # N = 0: no chunk ran; empty statistics, as the single-process loss's
            rows = (k, 0) if field in ("weights", "responsibilities", "entropy") else (0,)
            return torch.zeros(rows, dtype=head.acc, device=hidden.device)
        return torch.cat([getattr(s, field) for s in parts], dim=-1)

    stats = MTBKDStats(
        weights=cat("weights").reshape(k, *lead),
        responsibilities=cat("responsibilities").reshape(k, *lead),
        entropy=cat("entropy").reshape(k, *lead), prior=cat("prior").reshape(lead),
        ce=cat("ce").reshape(lead),
    )  # fmt: skip
    return out, stats


def vocab_parallel_fused_linear_mtbkd_loss(
    student_hidden: Tensor,
    student_weight_shard: Tensor,
    teacher_logits_shard: Tensor | Sequence[Tensor],
    labels: Tensor | None = None,
    *,
    vocab_start: int,
    vocab_size: int,
    student_bias_shard: Tensor | None = None,
    group: dist.ProcessGroup | None = None,
    chunk_size: int | None = None,
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
) -> Tensor | tuple[Tensor, MTBKDStats]:
    """:func:`vocab_parallel_mtbkd_loss` of ``z_r = h W_rᵀ (+ b_r)`` without an ``[N, W]`` logits
    tensor for all rows (MATH.md sections 2 and 4): the head is sharded over the vocabulary.

    Args:
        student_hidden: ``[..., H]`` hidden states, replicated (identical) on every rank.
        student_weight_shard: ``[W, H]``, rows ``[vocab_start, vocab_start + W)`` of the head.
        teacher_logits_shard: ``[K, ..., W]`` or K tensors ``[..., W]``: the same columns of the
            teachers' logits.
        labels: ``[...]`` global class indices, identical on every rank (or None).
        vocab_start, vocab_size, group: as in :func:`vocab_parallel_mtbkd_loss`.
        student_bias_shard: ``[W]`` or None.
        chunk_size: rows per chunk (default: :func:`mtbkd.fused_linear.auto_chunk_size` of W).
        Other options as in :func:`mtbkd.mtbkd_loss`; a fixed ``weights`` tensor is ``[K, N]``
        with ``N`` the flattened rows.

    Returns the loss (identical on every rank). The backward writes this rank's weight and bias
    shard gradients and the full ``student_hidden`` gradient: the partial sums ``G_r W_r`` are
    all-reduced over ``group`` there (``N·H`` floats, the one communication that is not
    ``O(N·K)``), so every rank must run the backward and the model must not sum it again.
    """
    name = "vocab_parallel_fused_linear_mtbkd_loss"

    def option_checks() -> None:
        validate.check_mtbkd_options(
            temperature,
            concentration,
            weight_temperature,
            prior_weight,
            hard_label_weight,
            reduction,
        )
        validate.check_flags(check_finite=check_finite, return_stats=return_stats)

    opts = dict(temperature=temperature, concentration=concentration, prior_weight=prior_weight,
                hard_label_weight=hard_label_weight, weights=weights,
                weight_temperature=weight_temperature, ignore_index=ignore_index,
                check_finite=check_finite)  # fmt: skip
    return _fused_call(name, vocab_parallel_mtbkd_loss, opts,
                       student_hidden, student_weight_shard, teacher_logits_shard, labels,
                       student_bias_shard, vocab_start, vocab_size, group, chunk_size, reduction,
                       num_items_in_batch, return_stats, option_checks)  # fmt: skip


def vocab_parallel_fused_linear_multi_teacher_kd_loss(
    student_hidden: Tensor,
    student_weight_shard: Tensor,
    teacher_logits_shard: Tensor | Sequence[Tensor],
    labels: Tensor | None = None,
    *,
    vocab_start: int,
    vocab_size: int,
    student_bias_shard: Tensor | None = None,
    group: dist.ProcessGroup | None = None,
    chunk_size: int | None = None,
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
    """:func:`vocab_parallel_multi_teacher_kd_loss` of ``z_r = h W_rᵀ (+ b_r)`` in row chunks
    (MATH.md sections 3 and 4); arguments and communication as in
    :func:`vocab_parallel_fused_linear_mtbkd_loss`.
    """
    name = "vocab_parallel_fused_linear_multi_teacher_kd_loss"

    def option_checks() -> None:
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

    opts = dict(divergence=divergence, beta=beta, temperature=temperature, weights=weights,
                weight_temperature=weight_temperature, hard_label_weight=hard_label_weight,
                soft_label_weight=soft_label_weight, scale_by_t2=scale_by_t2,
                ignore_index=ignore_index, check_finite=check_finite)  # fmt: skip
    return _fused_call(name, vocab_parallel_multi_teacher_kd_loss, opts,
                       student_hidden, student_weight_shard, teacher_logits_shard, labels,
                       student_bias_shard, vocab_start, vocab_size, group, chunk_size, reduction,
                       num_items_in_batch, False, option_checks)  # fmt: skip


def _flat_weights(weights: Tensor, k: int, lead: torch.Size) -> Tensor:
    """A fixed weight tensor ``[K]``, ``[K, *lead]`` or ``[K, N]`` (as the other losses take
    it) as ``[K, N]``, so that chunks slice its rows."""
    n = math.prod(lead)
    if tuple(weights.shape) == (k,):
        return weights[:, None].expand(k, n)
    if tuple(weights.shape) in ((k, *lead), (k, n)):
        return weights.reshape(k, n)
    raise ValueError(f"weights must have shape [K={k}], [K={k}, *{tuple(lead)}] or "
                     f"[K={k}, N={n}] (teachers, rows of student_hidden), got "
                     f"{tuple(weights.shape)}")  # fmt: skip
