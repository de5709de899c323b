"""Cached teacher-only statistics for offline distillation (MATH.md sections 2 and 9).

When teacher logits are fixed per example (a distillation data set with stored teacher outputs),
everything MT-BKD needs from the teachers alone can be computed once: per row and teacher the
logsumexp at ``tau`` and at ``tau_w``, the entropy at ``tau_w`` (entropy weights) and
``L_k = sum_c lgamma(1 + lam softmax(t_k/tau)_c)``. With them the fused kernel skips its
teacher-only pass and becomes two-pass (statistics, then loss + gradient).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

from mtbkd import ops

__all__ = ["TeacherStats"]


def _check_positive(value: float, name: str) -> float:
    if isinstance(value, bool):  # True is not a temperature (the losses refuse it too)
        raise TypeError(f"{name} must be a real number, got bool")
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}") from None
    if not x > 0.0 or x == float("inf"):
        raise ValueError(f"{name} must be a finite positive number, got {value!r}")
    return x


class TeacherStats:
    """Per-row teacher statistics ``[K, ..., 4]`` of fixed teacher logits, for ``mtbkd_loss``.

    Columns (:data:`mtbkd.ops.TEACHER_STAT_COLUMNS`): ``lse(t_k/tau)``, ``lse(t_k/tau_w)``,
    ``H(softmax(t_k/tau_w))`` and ``L_k = sum_c lgamma(1 + lam softmax(t_k/tau)_c)`` (MATH.md
    section 2). Pass the object as ``mtbkd_loss(..., teacher_stats=stats)`` with the same
    ``temperature``, ``concentration`` and ``weight_temperature``; the loss then reads the teachers
    once less (MATH.md section 9: two passes instead of three).

    Args:
        teacher_logits: ``[K, ..., V]`` tensor or a sequence of K ``[..., V]`` tensors.
        temperature: tau of the loss the statistics will serve.
        concentration: lam of the loss.
        weight_temperature: tau_w of the entropy weights.
        check_finite: raise ``ValueError`` on NaN/inf teacher logits.

    ``stats[i]`` / ``stats[a:b]`` / ``stats[index_tensor]`` select along the first leading
    dimension (the examples of a cached data set), so a data loader can slice the statistics of
    its minibatch; ``stats.to(device)`` moves them. ``data`` is the ``[K, ..., 4]`` tensor
    (float32, float64 for float64 logits).

    Example::

        stats = mtbkd.TeacherStats(teacher_logits_of_dataset)           # once, [K, D, V]
        for idx in loader:                                             # idx: example indices
            loss = mtbkd.mtbkd_loss(model(x[idx]), teacher_logits_of_dataset[:, idx], y[idx],
                                    teacher_stats=stats[idx].to(device))
    """

    def __init__(
        self,
        teacher_logits: Tensor | Sequence[Tensor],
        temperature: float = 2.0,
        concentration: float = 5.0,
        weight_temperature: float = 1.0,
        *,
        check_finite: bool = True,
    ) -> None:
        self.temperature = _check_positive(temperature, "temperature")
        self.concentration = _check_positive(concentration, "concentration")
        self.weight_temperature = _check_positive(weight_temperature, "weight_temperature")
        teachers = self._teachers(teacher_logits)
        lead = teachers[0].shape[:-1]
        flat = [t.detach().reshape(-1, t.shape[-1]) for t in teachers]
        if flat[0].dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
            raise TypeError(f"teacher_logits must be a floating tensor, got {flat[0].dtype}")
        with torch.no_grad():
            data = ops.teacher_stats_op(
                flat, self.temperature, self.concentration, self.weight_temperature,
                bool(check_finite),
            )  # fmt: skip
        self.data: Tensor = data.reshape(len(teachers), *lead, 4)
        self.vocab_size: int = int(teachers[0].shape[-1])

    @staticmethod
    def _teachers(teacher_logits: Tensor | Sequence[Tensor]) -> list[Tensor]:
        if isinstance(teacher_logits, Tensor):
            if teacher_logits.dim() < 2:
                raise ValueError(
                    f"teacher_logits must be [K, ..., V], got shape {tuple(teacher_logits.shape)}"
                )
            teachers = list(teacher_logits.unbind(0))
        elif isinstance(teacher_logits, Sequence) and all(
            isinstance(t, Tensor) for t in teacher_logits
        ):
            teachers = list(teacher_logits)
        else:
            raise TypeError(
                "teacher_logits must be a tensor [K, ..., V] or a sequence of K tensors [..., V], "
                f"got {type(teacher_logits).__name__} (a SparseTeacher needs no cache: its "
                "losses use its stored log-probabilities)"
            )
        if not teachers:
            raise ValueError("teacher_logits must hold at least one teacher (got K = 0)")
        first = teachers[0]
        if first.dim() < 1 or first.shape[-1] == 0:
            raise ValueError("teacher_logits must have a non-empty vocabulary axis")
        for i, t in enumerate(teachers):
            if t.shape != first.shape or t.dtype != first.dtype or t.device != first.device:
                raise ValueError(
                    f"teacher_logits[{i}] must match teacher_logits[0] in shape, dtype and "
                    f"device; got {tuple(t.shape)} {t.dtype} {t.device} vs "
                    f"{tuple(first.shape)} {first.dtype} {first.device}"
                )
        return teachers

    @classmethod
    def from_data(
        cls,
        data: Tensor,
        temperature: float,
        concentration: float,
        weight_temperature: float,
        vocab_size: int,
    ) -> TeacherStats:
        """Wrap an existing ``[K, ..., 4]`` statistics tensor (e.g. loaded from disk)."""
        if not isinstance(data, Tensor) or data.dim() < 2 or data.shape[-1] != 4:
            raise ValueError("data must be a tensor [K, ..., 4]")
        if not data.is_floating_point():
            raise TypeError(f"data must be floating point, got {data.dtype}")
        obj = cls.__new__(cls)
        obj.temperature = _check_positive(temperature, "temperature")
        obj.concentration = _check_positive(concentration, "concentration")
        obj.weight_temperature = _check_positive(weight_temperature, "weight_temperature")
        obj.data = data
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, numbers.Integral) \
                or vocab_size < 1:  # fmt: skip
            raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
        obj.vocab_size = int(vocab_size)
        return obj

    def _like(self, data: Tensor) -> TeacherStats:
        return TeacherStats.from_data(
            data, self.temperature, self.concentration, self.weight_temperature, self.vocab_size
        )

    @property
    def num_teachers(self) -> int:
        return int(self.data.shape[0])

    @property
    def lead_shape(self) -> torch.Size:
        """Leading shape of the rows (``[...]`` of the ``[K, ..., V]`` logits)."""
        return self.data.shape[1:-1]

    @property
    def device(self) -> torch.device:
        return self.data.device

    def __len__(self) -> int:
        if self.data.dim() < 3:
            raise TypeError("len() of TeacherStats of a single row")
        return int(self.data.shape[1])

    def __getitem__(self, index) -> TeacherStats:
        if self.data.dim() < 3:
            raise IndexError("TeacherStats of a single row cannot be indexed")
        # Indexes the leading (row) dims like the logits' [...]: stats[i, j] is row (i, j); the
        # teachers' axis and the four statistics are always kept.
        parts = index if isinstance(index, tuple) else (index,)
        parts = tuple(
            p.to(self.data.device) if isinstance(p, Tensor) and p.device != self.data.device else p
            for p in parts
        )
        used = sum(
            p.dim() if isinstance(p, Tensor) and p.dtype == torch.bool else 1
            for p in parts
            if p is not None and p is not Ellipsis
        )
        lead = self.data.dim() - 2
        if used > lead:
            raise IndexError(
                f"too many indices for TeacherStats with {lead} leading dim(s): {index!r}"
            )
        return self._like(self.data[(slice(None), *parts, slice(None))])

    def to(self, *args, **kwargs) -> TeacherStats:
        """A copy on another device (``torch.Tensor.to`` arguments); a floating dtype is kept."""
        data = self.data.to(*args, **kwargs)
        if not data.is_floating_point():
            raise TypeError(f"TeacherStats data must stay floating point, got {data.dtype}")
        return self._like(data)

    def data_for(
        self,
        num_teachers: int,
        num_rows: int,
        temperature: float,
        concentration: float,
        weight_temperature: float,
        like: Tensor,
        lead: Sequence[int] | None = None,
    ) -> Tensor:
        """The ``[K, N, 4]`` tensor for a loss call, after checking that it fits that call.

        Raises ``ValueError`` if the loss's parameters or shapes differ from the cached ones
        (statistics at another temperature would silently give a wrong loss). ``lead``, the
        logits' leading shape, must equal the cached one unless either is flat (``[N]``): rows
        ``[B, T]`` against statistics ``[T, B]`` are the same count in another order.
        """
        for name, mine, theirs in (
            ("temperature", self.temperature, temperature),
            ("concentration", self.concentration, concentration),
            ("weight_temperature", self.weight_temperature, weight_temperature),
        ):
            if float(theirs) != mine:
                raise ValueError(
                    f"teacher_stats were computed with {name}={mine} but the loss uses {theirs}"
                )
        if self.num_teachers != num_teachers:
            raise ValueError(
                f"teacher_stats hold {self.num_teachers} teachers but the loss has {num_teachers}"
            )
        rows = self.data[0, ..., 0].numel()
        if rows != num_rows:
            raise ValueError(
                f"teacher_stats hold {rows} rows but the loss has {num_rows}; slice the cache "
                "with the minibatch's indices (stats[idx])"
            )
        if (
            lead is not None
            and len(lead) > 1
            and self.data.dim() > 3
            and tuple(lead) != tuple(self.lead_shape)
        ):
            raise ValueError(
                f"teacher_stats have leading shape {tuple(self.lead_shape)} but the logits have "
                f"{tuple(lead)}: the rows would not correspond (flatten both, or index the cache "
                "like the logits)"
            )
        if like.shape[-1] != self.vocab_size:
            raise ValueError(
                f"teacher_stats were computed for vocabulary size {self.vocab_size}, the logits "
                f"have {like.shape[-1]}"
            )
        acc = torch.float64 if like.dtype == torch.float64 else torch.float32
        return self.data.reshape(num_teachers, num_rows, 4).to(device=like.device, dtype=acc)

    @staticmethod
    def _checked_rows(n: int) -> list[int]:
        # the first and last rows and six between at golden-ratio fractions of n: spread over the
        # sequences and positions of a flattened [B, T] batch whatever B and T are (rows at n/3
        # and 2n/3 were all position 0 of a sequence when B was a multiple of 3, and position 0
        # of BOS-prefixed sequences has the same logits in every sequence)
        frac = [(j * 0.6180339887498949) % 1.0 for j in range(1, 7)]
        return sorted({0, n - 1, *(int(f * n) for f in frac)})

    @staticmethod
    def check_rows(
        data: Tensor,
        teachers: Sequence[Tensor],
        temperature: float,
        dtypes: Sequence[torch.dtype] = (),
        concentration: float | None = None,
        weight_temperature: float | None = None,
    ) -> None:
        """Spot-check ``data`` ``[K, N, 4]`` (from :meth:`data_for`) against the teacher logits
        ``K x [N, V]`` of the call: up to eight rows (the first, the last and six spread between)
        are recomputed from the logits, every column (``logsumexp(t / tau)``, and with
        ``concentration`` and ``weight_temperature`` given, as the losses give them, also
        ``logsumexp(t / tau_w)``, the entropy at ``tau_w`` and ``L_k``), and must match the cache.
        A cache whose rows are in another order than the logits (a loader that shuffled one and
        not the other), one built from other logits, or one wrapped by :meth:`from_data` with
        another ``concentration`` or ``weight_temperature`` than it was made with, gave a wrong
        loss silently. ``O(8 K V)`` work and one host synchronisation (the losses run it when
        ``check_finite``, never inside a ``torch.compile`` graph). The tolerance is the rounding
        of the coarsest of the logits' dtype, ``dtypes`` (the logits' dtypes before a cast) and
        the cache's own dtype, scaled by the sizes the rounding meets."""
        n = data.shape[1]
        if n == 0:
            return
        rows = torch.tensor(TeacherStats._checked_rows(n), device=data.device)
        t = torch.stack([x.index_select(0, rows) for x in teachers]).double()  # [K, r, V]
        cached = data[:, rows].double()  # [K, r, 4]
        full = concentration is not None and weight_temperature is not None
        tau = float(temperature)
        cols = [torch.logsumexp(t / tau, dim=-1)]
        # rounding of the logits (a cache made before a cast, or logits stored in bf16) moves
        # each column by first-order bounds in eps |t_c| over the entries that count (within 60 tau
        # of the row's maximum: a vocabulary padded with -1e9 or finfo.min must not widen the
        # tolerance to everything); that of a cache moved to a low-precision dtype, with its values
        eps = max(1e-6, *(torch.finfo(d).eps for d in (teachers[0].dtype, *dtypes)))
        tmax = t.amax(-1, keepdim=True)

        def size(scale: float) -> Tensor:
            live = t >= tmax - 60.0 * scale
            return torch.where(live, t.abs(), 0.0).amax(-1).nan_to_num(posinf=0.0, neginf=0.0)

        bounds = [1.0 + size(tau) / tau]  # lse: sum_c p_c dt_c / tau
        if full:
            from mtbkd import reference

            lam, tau_w = float(concentration), float(weight_temperature)
            p = torch.softmax(t / tau, dim=-1)
            entropy = reference.teacher_entropy(t, tau_w)
            lg = torch.lgamma(1.0 + lam * p)
            cols += [torch.logsumexp(t / tau_w, dim=-1), entropy, lg.sum(-1)]
            # H: |dH| <= max |d log p| (H + 1); L: sum_c lam p_c |digamma(1 + lam p_c)| |d log
            # p_c| with |d log p_c| <= ((|t_c| + sum_j p_j |t_j|) / tau + 1) eps: the logits'
            # rounding and p's own (its exponential and normaliser; a uniform teacher's logits of
            # 0 have none of the first, and with lam p = 1 every term of L is lgamma(2) = 0, which
            # left the tolerance at 0 and refused the very logits' cache), plus the float32
            # rounding of the cache's own sum over V terms
            at = torch.where(p > 0, t.abs(), 0.0)
            dlogp = (at + (p * at).sum(-1, keepdim=True)) / tau + 1.0
            psi = torch.special.digamma(1.0 + lam * p).abs()
            bound_h = (1.0 + 2.0 * size(tau_w) / tau_w) * (1.0 + entropy.abs())
            bounds += [1.0 + size(tau_w) / tau_w, bound_h, (lam * p * psi * dlogp).sum(-1)]
        own = torch.stack(cols, -1)
        mine = cached[..., : len(cols)]
        tol = eps * (4 * torch.stack(bounds, -1).nan_to_num(0.0, 0.0, 0.0)
                     + mine.abs().nan_to_num(0.0, 0.0, 0.0))  # fmt: skip
        if full:  # the float32 sum over V of the cache's own L_k
            tol[..., 3] += 1e-5 * lg.abs().sum(-1)
        # a NaN or inf in the cache is a mismatch too (a NaN compares False with anything)
        bad = ~((own - mine).abs() <= tol) & torch.isfinite(own)
        if bool(bad.any()):
            k, r, c = (int(i) for i in bad.nonzero()[0])
            raise ValueError(
                f"teacher_stats do not match teacher_logits (teacher {k}, row {int(rows[r])}, "
                f"column {ops.TEACHER_STAT_COLUMNS[c]}: cached {float(cached[k, r, c]):.6g}, the "
                f"logits give {float(own[k, r, c]):.6g}): the cache was computed from other "
                "logits or with another concentration / weight_temperature than it claims, or "
                "its rows are in another order (index it like the logits: stats[idx])"
            )

    def __repr__(self) -> str:
        return (
            f"TeacherStats(K={self.num_teachers}, rows={tuple(self.lead_shape)}, "
            f"V={self.vocab_size}, temperature={self.temperature}, "
            f"concentration={self.concentration}, weight_temperature={self.weight_temperature}, "
            f"dtype={self.data.dtype}, device={self.data.device})"
        )
