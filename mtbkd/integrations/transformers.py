"""Hugging Face ``transformers`` integration: a ``Trainer`` that distils from several teachers
with the fused-linear MT-BKD / multi-teacher KD losses (no full ``[B, T, V]`` logits).

Needs the optional extra ``llm`` (``pip install mtbkd[llm]``); importing this module imports
``transformers``, importing :mod:`mtbkd` does not.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:
    from transformers import Trainer
    from transformers.modeling_outputs import CausalLMOutput
    from transformers.utils import logging
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "mtbkd.integrations.transformers needs the `transformers` package "
        "(pip install 'mtbkd[llm]')"
    ) from exc

from mtbkd.fused_linear import fused_linear_from

__all__ = ["MultiTeacherDistillationTrainer", "hidden_and_head"]

logger = logging.get_logger(__name__)

# Inputs forwarded to the models (the student and every teacher).
_MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "inputs_embeds")
# Non-linear transforms of the logits that the one-position check may not see on small logits.
_SOFTCAP_ATTRS = ("final_logit_softcapping", "logits_soft_cap")
# Known rescalings of the logits (named in the check's error message).
_SCALE_ATTRS = ("logits_scaling", "lm_head_multiplier", "logit_scale", "output_multiplier")
# Magnitude of the probe logits the check feeds the head: far beyond any tanh soft-cap.
_PROBE = 1e3


def _unwrap(model: nn.Module) -> nn.Module:
    # DistributedDataParallel, DataParallel and DeepSpeed's engine keep the model in `.module`.
    while not hasattr(model, "get_output_embeddings") and isinstance(
        getattr(model, "module", None), nn.Module
    ):
        model = model.module
    return model


def _configs(module: nn.Module) -> list[Any]:
    config = getattr(module, "config", None)
    configs = [] if config is None else [config]
    for name in ("text_config", "decoder"):
        sub = getattr(config, name, None)
        if sub is not None and not isinstance(sub, (bool, int, str)):
            configs.append(sub)
    get_text = getattr(config, "get_text_config", None)
    if callable(get_text):
        try:
            configs.append(get_text())
        except Exception:  # noqa: BLE001 - only a source of attributes to check
            pass
    return configs


def _config_values(module: nn.Module, attrs: Sequence[str], neutral: Sequence[Any]) -> list[str]:
    found = []
    for config in _configs(module):
        for attr in attrs:
            value = getattr(config, attr, None)
            if value not in neutral and f"{attr}={value}" not in found:
                found.append(f"{attr}={value}")
    return found


# what compute_loss reads of a batch; other model inputs (pixel_values, ...) would be dropped
_BATCH_KEYS = frozenset({"input_ids", "attention_mask", "position_ids", "labels", "shift_labels",
                         "token_type_ids", "special_tokens_mask",
                         # flags some Trainer versions add to a batch (no model input)
                         "num_items_in_batch", "skip_logits", "return_loss"})  # fmt: skip


def _check_inputs(inputs: dict[str, Any]) -> None:
    if inputs.get("inputs_embeds") is not None:
        raise ValueError(
            "inputs_embeds: the teachers embed tokens with their own tables, so the distillation "
            "trainer needs input_ids (the student's embeddings would be fed to every teacher)"
        )
    types = inputs.get("token_type_ids")
    if isinstance(types, Tensor) and bool((types != 0).any()):
        raise ValueError(
            "token_type_ids: the batch has segment ids other than 0, which the distillation "
            "trainer does not forward (it feeds input_ids, attention_mask and position_ids); "
            "all-zero token_type_ids, as tokenizers give single texts, are dropped"
        )
    other = sorted(k for k in inputs if k not in _BATCH_KEYS and k != "inputs_embeds")
    if other:
        raise ValueError(
            f"the batch has inputs the distillation trainer does not forward: {other} (it feeds "
            "input_ids, attention_mask and position_ids to the student and the teachers; "
            "multimodal inputs are not supported)"
        )


def _check_teacher_vocab(teacher: nn.Module, i: int, v: int) -> None:
    """Teacher ``i`` must embed and predict every token of the student's ``v``."""
    base = _unwrap(teacher)
    for what, get in (("input embeddings", "get_input_embeddings"),
                      ("output head", "get_output_embeddings")):  # fmt: skip
        layer = getattr(base, get, lambda: None)()
        rows = getattr(getattr(layer, "weight", None), "shape", (None,))[0]
        if rows is not None and rows < v:
            raise ValueError(
                f"teachers[{i}]'s {what} cover {rows} tokens but the student's vocabulary has "
                f"{v}: a teacher needs the student's tokenizer (or a superset of it)"
            )


def _check_causal(module: nn.Module) -> None:
    """Refuse a model ``transformers`` knows as a masked LM and not as a causal one: its position
    ``t`` predicts token ``t`` from both sides (it sees the token it is scored on)."""
    from transformers.models.auto import modeling_auto as auto

    name = type(module).__name__
    masked = set(getattr(auto, "MODEL_FOR_MASKED_LM_MAPPING_NAMES", {}).values())
    causal = set(getattr(auto, "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", {}).values())
    if name in masked and name not in causal:
        raise ValueError(
            f"{name} is a masked language model: its logits at position t predict token t from "
            "both sides, not token t + 1; distillation here needs causal LMs (student and "
            "teachers)"
        )


def hidden_and_head(
    model: nn.Module,
    inputs: dict[str, Any],
    *,
    module: nn.Module | None = None,
    check: bool = True,
    return_outputs: bool = False,
) -> tuple[Tensor, Tensor, Tensor | None] | tuple[Tensor, Tensor, Tensor | None, Any]:
    """Hidden states ``[B, T, H]`` that a causal LM feeds its output head, and the head's
    ``(weight, bias)``, without the head's ``[B, T, V]`` matmul; with ``return_outputs=True``
    also the model's outputs (their logits are the last position's only).

    ``model`` is called as it is (so a ``DistributedDataParallel``, DeepSpeed or PEFT wrapper
    runs its own forward) on the ``input_ids`` / ``attention_mask`` / ``position_ids`` /
    ``inputs_embeds`` of ``inputs``; a forward pre-hook on the output head
    (``get_output_embeddings()`` of ``module``, by default ``model`` without its ``.module``
    wrappers) records the head's input and lets the head compute the last position only.

    ``check=True`` refuses a model ``transformers`` registers as a masked LM only (BERT's
    ``BertForMaskedLM``: position ``t`` predicts token ``t``) and verifies that the model's
    logits are ``hidden @ weight.T + bias``: it rejects
    a configured logit soft-cap (``final_logit_softcapping``, also under ``text_config``), an
    adapter on the head (LoRA on ``lm_head``), and feeds the head a probe (the last position
    scaled to logits of magnitude 1000) whose logits must match ``probe @ weight.T + bias``,
    which catches rescaled logits (Granite's ``logits_scaling``, Falcon-H1's
    ``lm_head_multiplier``, Cohere's ``logit_scale``), soft-caps and sliced vocabularies.
    It costs one host synchronisation.
    """
    module = _unwrap(model) if module is None else module
    head = module.get_output_embeddings()
    name = type(module).__name__
    if head is None or not isinstance(getattr(head, "weight", None), Tensor):
        raise ValueError(f"{name} has no linear output head (get_output_embeddings)")
    if hasattr(head, "base_layer"):  # a PEFT tuner layer (LoRA ...) wraps the head
        raise ValueError(
            f"the output head of {name} is wrapped by an adapter ({type(head).__name__}); the "
            "fused-linear loss needs logits = hidden @ weight.T + bias: do not target the head "
            "(lm_head) with LoRA (modules_to_save is fine), or merge the adapter first"
        )
    weight, bias = head.weight, getattr(head, "bias", None)
    if check:
        _check_causal(module)
        softcap = _config_values(module, _SOFTCAP_ATTRS, (None, 0, 0.0))
        if softcap:
            raise ValueError(
                f"{name} soft-caps its logits ({', '.join(softcap)}); the fused-linear loss needs "
                "logits = hidden @ weight.T + bias"
            )
    captured: list[Tensor] = []
    probe: list[Tensor] = []

    def pre_hook(mod, args, kwargs):
        h = args[0] if args else kwargs["input"]
        captured.append(h)
        last = h[..., -1:, :]  # the head computes one position: no [B, T, V] logits
        if check:
            with torch.no_grad():
                top = F.linear(last, weight, bias).abs().amax().float().clamp_min(1e-3)
            last = last * (_PROBE / top).to(last.dtype)
            with torch.no_grad():
                probe.append(F.linear(last, weight, bias))
        if args:
            return (last, *args[1:]), kwargs
        return args, {**kwargs, "input": last}

    handle = head.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        kept = {k: v for k, v in inputs.items() if k in _MODEL_INPUTS and v is not None}
        out = model(**kept, use_cache=False)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise ValueError(
            f"{name} called its output head {len(captured)} times in one forward; expected once"
        )
    hidden = captured[0]
    if hidden.shape[-1] != weight.shape[-1]:
        raise ValueError(
            f"the output head of {name} has in-features {weight.shape[-1]} (weight "
            f"{tuple(weight.shape)}) but receives hidden states of size {hidden.shape[-1]}"
        )
    if check:
        logits = out.logits if hasattr(out, "logits") else out[0]
        ref = probe[0]
        if logits.shape != ref.shape:
            raise ValueError(
                f"{name} returns logits of shape {tuple(logits.shape)} where its output head "
                f"gives {tuple(ref.shape)}; the fused-linear loss needs logits = "
                "hidden @ weight.T + bias"
            )
        ref, logits = ref.float(), logits.detach().float()
        err = (logits - ref).abs().amax()
        if bool(torch.isfinite(ref).all()) and not bool(err <= 1e-2 * ref.abs().amax()):
            scale = _config_values(module, _SCALE_ATTRS, (None, 1, 1.0))
            raise ValueError(
                f"{name} transforms its logits after the output head "
                f"({', '.join(scale) or 'rescaled or capped'}: max |logits - hidden @ weight.T "
                f"- bias| = {float(err):.4g} on logits of magnitude {_PROBE:g}); the "
                "fused-linear loss needs logits = hidden @ weight.T + bias"
            )
    if not return_outputs:
        return hidden, weight, bias
    if check:  # the head ran on the probe: the last position's own logits replace its output
        last = F.linear(hidden[..., -1:, :], weight, bias)
        if hasattr(out, "logits"):
            out.logits = last
        else:
            out = (last, *out[1:])
    return hidden, weight, bias, out


class MultiTeacherDistillationTrainer(Trainer):
    """``Trainer`` whose loss is a multi-teacher distillation loss on a causal LM.

    ``compute_loss`` runs every teacher without gradients and the student through the model the
    Trainer passes (the ``DistributedDataParallel`` / DeepSpeed wrapper, so gradients are
    all-reduced), records the hidden states each output head receives (:func:`hidden_and_head`)
    and calls the fused-linear form of ``loss`` (:class:`mtbkd.MTBKDLoss` or
    :class:`mtbkd.MultiTeacherKDLoss`, same options) on the shifted labels: row ``t`` predicts
    token ``t + 1``; ``-100`` and the loss's ``ignore_index`` mask rows; without ``labels`` the
    targets are ``input_ids`` with ``attention_mask == 0`` masked; ``shift_labels`` (already
    shifted) is used as it is. The loss is ``Σ rows / num_items_in_batch`` where this Trainer
    counts ``num_items_in_batch`` itself (the shifted targets of the accumulated micro-batches,
    summed over processes with ``average_tokens_across_devices``), so gradient accumulation is
    exact on every ``transformers`` version; else the mean. A mixture-of-experts student that
    returns a router load-balancing loss (``output_router_logits=True``) adds
    ``router_aux_loss_coef · aux_loss`` as its own loss does, averaged over the accumulated
    micro-batches and over processes. ``label_smoothing_factor`` and ``compute_loss_func`` are
    refused (``ValueError``): the loss is ``loss``.

    Teachers share the student's tokenizer; their vocabularies may be padded beyond the
    student's (sliced), their hidden sizes may differ. The first batch checks every model's
    logits are ``hidden @ weight.T + bias`` (see :func:`hidden_and_head`).

    Evaluation: ``evaluate()`` reports the distillation loss (per-batch mean) and forms no
    logits unless predictions are needed (``compute_metrics``, ``predict()``), in which case
    ``compute_loss(..., return_outputs=True)`` returns the student's ``[B, T, V]`` logits
    (``CausalLMOutput(loss, logits)``, as the stock ``Trainer``; reduce them with
    ``preprocess_logits_for_metrics``). FSDP, DeepSpeed ZeRO-3 and tensor / context / sequence
    parallelism are not supported (``ValueError``); ``DataParallel`` (several GPUs in one
    process) runs the student on one GPU: launch with ``torchrun`` / ``accelerate`` for DDP.
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
        if isinstance(teachers, nn.Module) or not isinstance(teachers, Sequence):
            raise TypeError(
                "teachers must be a sequence of models (teachers=[teacher]), got "
                f"{type(teachers).__name__}"
            )
        if len(teachers) == 0:
            raise ValueError("teachers must hold at least one teacher model")
        if loss is None:
            from mtbkd.losses import MTBKDLoss

            loss = MTBKDLoss()
        self.distill_loss = fused_linear_from(loss, chunk_size=chunk_size)
        if self.distill_loss.reduction != "mean":
            raise ValueError("loss must use reduction='mean' (the Trainer's accumulation needs it)")
        super().__init__(model, *args, **kwargs)
        for what, used in (("label_smoothing_factor", self.args.label_smoothing_factor != 0),
                           ("compute_loss_func", self.compute_loss_func is not None)):  # fmt: skip
            if used:
                raise ValueError(
                    f"MultiTeacherDistillationTrainer does not use {what}: its loss is the "
                    "distillation loss `loss` (set hard_label_weight there)"
                )
        unsupported = self._unsupported_parallelism()
        if unsupported:
            raise ValueError(
                f"MultiTeacherDistillationTrainer does not support {unsupported}: the fused-linear "
                "loss reads the output head's full weight outside the model's forward; use DDP "
                "(torchrun / accelerate launch)"
            )
        self.teachers = list(teachers)
        for t in self.teachers:
            t.eval()
            t.requires_grad_(False)
        # The loss reads num_items_in_batch (counted below over the shifted targets).
        self.model_accepts_loss_kwargs = True
        self._checked: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # logits checked
        self._warned_data_parallel = False

    def _unsupported_parallelism(self) -> str | None:
        if getattr(self, "is_fsdp_enabled", False) or getattr(self, "is_fsdp_xla_enabled", False):
            return "FSDP"
        if getattr(self, "is_distributed_loading_by_transformers", False):
            return "a model sharded at load time (from_pretrained(distributed_config=...))"
        if getattr(self, "is_deepspeed_enabled", False):
            try:
                from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

                if is_deepspeed_zero3_enabled():
                    return "DeepSpeed ZeRO-3"
            except ImportError:  # pragma: no cover - depends on the version
                pass
        for kind in ("tp", "cp", "sp"):
            size = getattr(self, f"get_{kind}_size", None)
            if callable(size) and size() > 1:
                return f"{kind.upper()} parallelism ({kind}_size={size()})"
        return None

    def _targets(self, inputs: dict[str, Any]) -> Tensor:
        """The label of each row (row t predicts token t + 1), ``ignore_index`` where masked."""
        ignore = self.distill_loss.ignore_index
        shifted = inputs.get("shift_labels")
        if shifted is None:
            labels = inputs.get("labels")
            if labels is None:
                ids = inputs["input_ids"]
                mask = inputs.get("attention_mask")
                labels = ids if mask is None else ids.masked_fill(mask == 0, ignore)
            pad = labels.new_full((labels.shape[0], 1), ignore)
            shifted = torch.cat([labels[:, 1:], pad], dim=1)
        if ignore != -100:  # the Trainer's collators mask with -100
            shifted = shifted.masked_fill(shifted == -100, ignore)
        return shifted

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> Tensor | None:
        """The number of rows the loss sums over in ``batch_samples`` (the micro-batches of one
        optimizer step), summed over processes with ``average_tokens_across_devices``; at
        least 1. Counted here rather than by the Trainer, whose count depends on its version."""
        try:
            ignore = self.distill_loss.ignore_index
            n = sum((self._targets(b) != ignore).sum() for b in batch_samples)
        except (KeyError, TypeError, AttributeError, IndexError):
            return None
        if not isinstance(n, Tensor):  # no batches
            return None
        n = n.to(device)
        if getattr(self.args, "average_tokens_across_devices", False) and self.args.world_size > 1:
            n = self.accelerator.gather(n).sum()
        return n.clamp_min(1)

    def get_batch_samples(self, epoch_iterator, num_batches, device=None):
        # Every version of the Trainer fetches an optimizer step's micro-batches here.
        batch_samples = list(itertools.islice(epoch_iterator, num_batches))
        device = self.args.device if device is None else device
        return batch_samples, self._get_num_items_in_batch(batch_samples, device)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The distillation loss; with ``return_outputs=True`` also
        ``CausalLMOutput(loss=loss, logits=student logits [B, T, V])``."""
        if isinstance(model, nn.DataParallel):
            # The hidden-state capture needs one replica: run the whole batch on one device.
            if not self._warned_data_parallel:
                logger.warning(
                    "MultiTeacherDistillationTrainer runs the student on one GPU under "
                    "DataParallel; launch with torchrun / accelerate for DDP on several GPUs"
                )
                self._warned_data_parallel = True
            model = model.module
        student = self.accelerator.unwrap_model(model)
        _check_inputs(inputs)
        shifted = self._targets(inputs)
        check = student not in self._checked
        hidden, weight, bias, out = hidden_and_head(model, inputs, module=student, check=check,
                                                    return_outputs=True)  # fmt: skip
        self._checked.add(student)
        if hidden.shape[:-1] != shifted.shape:
            raise ValueError(
                f"the student's hidden states have shape {tuple(hidden.shape)} but the labels "
                f"{tuple(shifted.shape)} (a PEFT prompt-learning method adds virtual tokens?)"
            )
        teacher_heads = []
        with torch.no_grad():
            for i, t in enumerate(self.teachers):
                _check_teacher_vocab(t, i, weight.shape[0])
                dev = next(t.parameters()).device
                if dev != hidden.device:
                    t.to(hidden.device)
                th, tw, tb = hidden_and_head(t, inputs, check=t not in self._checked)
                self._checked.add(t)
                teacher_heads.append((th.reshape(-1, th.shape[-1]), tw, tb))
        loss = self.distill_loss(
            hidden.reshape(-1, hidden.shape[-1]), weight, teacher_heads,
            shifted.reshape(-1).to(hidden.device), bias, num_items_in_batch=num_items_in_batch,
        )  # fmt: skip
        if getattr(self.args, "average_tokens_across_devices", False) and (
            num_items_in_batch is not None
        ):
            # As Trainer.compute_loss: the gradient is averaged over processes later.
            loss = loss * self.accelerator.num_processes
        aux = getattr(out, "aux_loss", None)  # an MoE router's load-balancing loss
        coef = getattr(student, "router_aux_loss_coef", getattr(student, "aux_loss_coef", None))
        if isinstance(aux, Tensor) and coef:
            if num_items_in_batch is not None:  # the Trainer does not divide this loss
                aux = aux / getattr(self, "current_gradient_accumulation_steps", 1)
            loss = loss + coef * aux.to(loss.device, loss.dtype)
        if not return_outputs:
            return loss
        return loss, CausalLMOutput(loss=loss, logits=F.linear(hidden, weight, bias))

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation: the distillation loss (per-batch mean); the student's logits and the
        labels unless ``prediction_loss_only``."""
        inputs = self._prepare_inputs(inputs)
        names = self.label_names or ["labels"]
        labels = None
        if all(inputs.get(k) is not None for k in names):
            labels = tuple(inputs[k].detach() for k in names)
            labels = labels[0] if len(labels) == 1 else labels
        with torch.no_grad(), self.compute_loss_context_manager():
            if prediction_loss_only:
                return self.compute_loss(model, inputs).detach(), None, None
            loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
        return loss.detach(), outputs.logits.detach(), labels
