"""Hugging Face ``transformers`` integration: a ``Trainer`` that distils from several teachers
with the fused-linear MT-BKD / multi-teacher KD losses (no full ``[B, T, V]`` logits).

Needs the optional extra ``llm`` (``pip install mtbkd[llm]``); importing this module imports
``transformers``, importing :mod:`mtbkd` does not.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

try:
    from transformers import Trainer
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "mtbkd.integrations.transformers needs the `transformers` package "
        "(pip install 'mtbkd[llm]')"
    ) from exc

from mtbkd.fused_linear import fused_linear_from

__all__ = ["MultiTeacherDistillationTrainer", "hidden_and_head"]


def hidden_and_head(
    model: nn.Module, inputs: dict[str, Any]
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Last hidden states ``[B, T, H]`` of a causal LM and its output head ``(weight, bias)``,
    computed without the head's matmul (the body of the model only)."""
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise ValueError(
            f"{type(model).__name__} has no linear output head (get_output_embeddings)"
        )
    config = getattr(model, "config", None)
    for attr in ("final_logit_softcapping", "logit_scale"):
        if getattr(config, attr, None) not in (None, 1.0):
            raise ValueError(
                f"{type(model).__name__} transforms its logits ({attr}); the fused-linear loss "
                "needs logits = hidden @ weight.T + bias"
            )
    body = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if body is None or body is model:
        raise ValueError(f"cannot find the body (base model) of {type(model).__name__}")
    keep = ("input_ids", "attention_mask", "position_ids", "inputs_embeds")
    out = body(**{k: v for k, v in inputs.items() if k in keep and v is not None}, use_cache=False)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return hidden, head.weight, getattr(head, "bias", None)


class MultiTeacherDistillationTrainer(Trainer):
    """``Trainer`` whose loss is a multi-teacher distillation loss on a causal LM.

    ``compute_loss`` runs every teacher without gradients, takes the last hidden states and
    output heads of the teachers and of the student, and calls the fused-linear form of ``loss``
    (:class:`mtbkd.MTBKDLoss` or :class:`mtbkd.MultiTeacherKDLoss`, same options) on the shifted
    labels (``ignore_index`` = -100 masks padding). The loss is ``Σ rows / num_items_in_batch``
    when the Trainer passes ``num_items_in_batch`` (exact gradient accumulation), else the mean.

    Teachers share the student's tokenizer; their vocabularies may be padded beyond the
    student's (sliced), their hidden sizes may differ.
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        *args: Any,
        teachers: Sequence[nn.Module] = (),
        loss: nn.Module | None = None,
        chunk_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        if len(teachers) == 0:
            raise ValueError("teachers must hold at least one teacher model")
        if loss is None:
            from mtbkd.losses import MTBKDLoss

            loss = MTBKDLoss()
        self.distill_loss = fused_linear_from(loss, chunk_size=chunk_size)
        if self.distill_loss.reduction != "mean":
            raise ValueError("loss must use reduction='mean' (the Trainer's accumulation needs it)")
        super().__init__(model, *args, **kwargs)
        self.teachers = list(teachers)
        for t in self.teachers:
            t.eval()
            t.requires_grad_(False)
        # The loss reads num_items_in_batch (counted over the shifted labels) and divides by it.
        self.model_accepts_loss_kwargs = True
        self._loss_shifts_labels = True

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        labels = inputs.pop("labels", None)
        if labels is None:
            labels = inputs["input_ids"].masked_fill(
                inputs.get("attention_mask", torch.ones_like(inputs["input_ids"])) == 0, -100
            )
        ignore = self.distill_loss.ignore_index
        # Row t predicts token t+1; the last position has no target.
        shifted = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), ignore)], dim=1)
        student = self.accelerator.unwrap_model(model)
        hidden, weight, bias = hidden_and_head(student, inputs)
        teacher_heads = []
        with torch.no_grad():
            for t in self.teachers:
                dev = next(t.parameters()).device
                if dev != hidden.device:
                    t.to(hidden.device)
                th, tw, tb = hidden_and_head(t, inputs)
                teacher_heads.append((th.reshape(-1, th.shape[-1]), tw, tb))
        loss = self.distill_loss(
            hidden.reshape(-1, hidden.shape[-1]), weight, teacher_heads, shifted.reshape(-1),
            bias, num_items_in_batch=num_items_in_batch,
        )  # fmt: skip
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # As Trainer.compute_loss: the gradient is averaged over processes later.
            loss = loss * self.accelerator.num_processes
        return (loss, {"loss": loss}) if return_outputs else loss
