"""``nn.Module`` forms of the functional losses, to put where a distillation loop calls
``nn.KLDivLoss`` / ``nn.CrossEntropyLoss``: ``loss_fn(student_logits, teacher_logits, labels)``.

Conventions that differ from those two: the class (vocabulary) dimension is the last one,
``[..., V]`` (a ``CrossEntropyLoss`` input ``[N, C, d1, ...]`` takes ``x.movedim(1, -1)``; without
labels a ``[N, C, d]`` student would be read as ``d`` classes); ``reduction="mean"`` is a mean
over rows, ``nn.KLDivLoss``'s ``"batchmean"`` (its ``"mean"`` also divides by V); teachers are
constants, cast to the student's dtype (under ``torch.autocast`` a float32 teacher is rounded to
a bfloat16 student's dtype before its softmax, where plain PyTorch would keep it float32).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from mtbkd import functional as F

__all__ = ["MTBKDLoss", "MultiTeacherKDLoss"]


def _set_weights(module: nn.Module, weights: str | Tensor) -> None:
    # A fixed weight tensor is a buffer: it moves with .to() / .cuda(). Not persistent: it comes
    # from the constructor, and checkpoints of models that hold the loss stay loadable.
    module._buffers.pop("weights", None)
    module.__dict__.pop("weights", None)
    if isinstance(weights, Tensor):
        module.register_buffer("weights", weights.detach(), persistent=False)
    else:
        object.__setattr__(module, "weights", weights)


def _changed(module: nn.Module, **defaults) -> str:
    """``", name=value"`` for each option away from its default: two losses that compute
    differently never print alike (before: T² scaling, the hard-label mix and ignore_index)."""
    out = [f"{k}={getattr(module, k)!r}" for k, v in defaults.items() if getattr(module, k) != v]
    return "".join(", " + o for o in out)


class _WeightsOption(nn.Module):
    """``weights`` may be reassigned between a string and a tensor (a buffer). A numpy scalar
    option (``np.float32(2.0)``) is kept as the Python number it holds: under ``torch.compile``
    dynamo reads a numpy attribute as a 0-d array, and ``fullgraph=True`` failed on it."""

    def __setattr__(self, name: str, value) -> None:
        if name == "weights":
            _set_weights(self, value)
        else:
            super().__setattr__(name, F.validate.plain(value))

    def _apply(self, fn, recurse=True):
        # A fixed weights tensor follows .to(device) / .cuda(), but keeps its dtype through
        # .half() / .to(dtype) (a model.half() holding the loss): the loss casts the weights
        # itself, and a half-precision copy had rounded them (1e5 -> 99840 in bfloat16) or
        # overflowed them to inf, a ValueError at the next call.
        before = self._buffers.get("weights")
        out = super()._apply(fn, recurse)
        after = self._buffers.get("weights")
        if before is not None and after is not None and after.dtype != before.dtype:
            self._buffers["weights"] = before.to(after.device)
        return out

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # Checkpoints saved while the buffer was persistent (before cfd54af) hold "weights": the
        # weights come from the constructor, so that copy is dropped, not an unexpected key.
        state_dict.pop(prefix + "weights", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class MTBKDLoss(_WeightsOption):
    """MT-BKD loss with a teacher-informed Dirichlet mixture prior.

    See :func:`mtbkd.functional.mtbkd_loss` for the math and the options.

    Example::

        loss_fn = mtbkd.MTBKDLoss(temperature=2.0, concentration=5.0, prior_weight=0.02)
        loss = loss_fn(student_logits, torch.stack([t1, t2, t3]), labels)
        loss.backward()
    """

    def __init__(
        self,
        *,
        temperature: float = 2.0,
        concentration: float = 5.0,
        prior_weight: float = 0.02,
        hard_label_weight: float = 1.0,
        weights: str | Tensor = "entropy",
        weight_temperature: float = 1.0,
        ignore_index: int = -100,
        reduction: str = "mean",
        check_finite: bool = True,
    ) -> None:
        super().__init__()
        self.temperature = temperature
        self.concentration = concentration
        self.prior_weight = prior_weight
        self.hard_label_weight = hard_label_weight
        self.weights = weights
        self.weight_temperature = weight_temperature
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.check_finite = check_finite
        # Validate once at construction, like torch's losses do for their options.
        F.validate.check_mtbkd_options(
            temperature, concentration, weight_temperature, prior_weight, hard_label_weight,
            reduction,
        )  # fmt: skip
        F.validate.check_flags(check_finite=check_finite)
        F.validate.check_ignore_index(ignore_index)
        F.validate.check_weights_option(weights)

    def forward(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor | Sequence[Tensor],
        labels: Tensor | None = None,
        *,
        num_items_in_batch: int | Tensor | None = None,
        return_stats: bool = False,
        teacher_stats=None,
    ):
        return F.mtbkd_loss(
            student_logits, teacher_logits, labels, temperature=self.temperature,
            concentration=self.concentration, prior_weight=self.prior_weight,
            hard_label_weight=self.hard_label_weight, weights=self.weights,
            weight_temperature=self.weight_temperature, ignore_index=self.ignore_index,
            reduction=self.reduction, num_items_in_batch=num_items_in_batch,
            return_stats=return_stats, teacher_stats=teacher_stats,
            check_finite=self.check_finite,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, concentration={self.concentration}, "
            f"prior_weight={self.prior_weight}, hard_label_weight={self.hard_label_weight}, "
            f"weights={self.weights!r}, reduction={self.reduction!r}"
            + _changed(self, weight_temperature=1.0, ignore_index=-100, check_finite=True)
        )


class MultiTeacherKDLoss(_WeightsOption):
    """Weighted-sum multi-teacher KD (see :func:`mtbkd.functional.multi_teacher_kd_loss`).

    ``MultiTeacherKDLoss(weights="uniform")`` is average-teacher KD; the default
    (``weights="entropy"``, ``divergence="forward_kl"``) is entropy-weighted KD.
    """

    def __init__(
        self,
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
        check_finite: bool = True,
    ) -> None:
        super().__init__()
        # Validate once at construction, like MTBKDLoss (the same checks as each call's).
        F.validate.check_kd_options(
            divergence, beta, temperature, weight_temperature, hard_label_weight,
            soft_label_weight, reduction,
        )  # fmt: skip
        F.validate.check_flags(check_finite=check_finite, scale_by_t2=scale_by_t2)
        F.validate.check_ignore_index(ignore_index)
        F.validate.check_weights_option(weights)
        self.divergence = divergence
        self.beta = beta
        self.temperature = temperature
        self.weights = weights
        self.weight_temperature = weight_temperature
        self.hard_label_weight = hard_label_weight
        self.soft_label_weight = soft_label_weight
        self.scale_by_t2 = scale_by_t2
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.check_finite = check_finite

    def forward(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor | Sequence[Tensor],
        labels: Tensor | None = None,
        *,
        num_items_in_batch: int | Tensor | None = None,
    ) -> Tensor:
        return F.multi_teacher_kd_loss(
            student_logits, teacher_logits, labels, divergence=self.divergence, beta=self.beta,
            temperature=self.temperature, weights=self.weights,
            weight_temperature=self.weight_temperature,
            hard_label_weight=self.hard_label_weight, soft_label_weight=self.soft_label_weight,
            scale_by_t2=self.scale_by_t2, ignore_index=self.ignore_index,
            reduction=self.reduction, num_items_in_batch=num_items_in_batch,
            check_finite=self.check_finite,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return (
            f"divergence={self.divergence!r}, beta={self.beta}, temperature={self.temperature}, "
            f"weights={self.weights!r}, reduction={self.reduction!r}"
            + _changed(
                self,
                weight_temperature=1.0,
                hard_label_weight=0.0,
                soft_label_weight=1.0,
                scale_by_t2=False,
                ignore_index=-100,
                check_finite=True,
            )  # fmt: skip
        )
