"""Stochastic-gradient Langevin dynamics, the posterior sampler of MT-BKD (MATH.md section 7)."""

from __future__ import annotations

import hashlib
import numbers
import sys
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.optim import Optimizer

from mtbkd import validate
from mtbkd.bayes_ops import _SEED_LIMIT, _sgld_step_op, new_seed

__all__ = ["SGLD"]


_NUMBERS = ("lr", "num_data", "temperature", "weight_decay", "alpha", "eps")


def _check_hyperparameters(group: dict[str, Any], at_step: bool = False) -> None:
    # numpy scalars (np.float32 is not a float; np.int64(len(dataset))) and one-element tensors
    # (a tensor lr, as torch.optim takes) become Python numbers in the group
    for key in _NUMBERS:
        v = group.get(key)
        if (
            isinstance(v, Tensor)
            and v.numel() == 1
            and not v.is_complex()
            and v.dtype != torch.bool
        ):
            group[key] = v.item()
        elif isinstance(v, numbers.Real) and not isinstance(v, (bool, int, float)):
            group[key] = float(v)
    # a string such as "False" is truthy: it must not turn pSGLD on in silence
    pre = group.get("precondition")
    if isinstance(pre, np.bool_):
        group["precondition"] = pre = bool(pre)
    if not isinstance(pre, bool):
        raise TypeError(f"precondition must be a bool, got {type(pre).__name__} {pre!r}")
    # at a step, lr may have been decayed to 0 by a scheduler (a step that moves nothing)
    if at_step:
        validate.check_real(group["lr"], "lr", nonnegative=True)
    else:
        validate.check_positive(group["lr"], "lr")
    validate.check_positive(group["num_data"], "num_data")
    validate.check_real(group["temperature"], "temperature", nonnegative=True)
    validate.check_real(group["weight_decay"], "weight_decay", nonnegative=True)
    validate.check_positive(group["eps"], "eps")
    validate.check_real(group["alpha"], "alpha")
    if not 0.0 <= group["alpha"] < 1.0:
        raise ValueError(f"alpha must be in [0, 1), got {group['alpha']}")


def _dtensor_type() -> type | None:
    """``torch.distributed.tensor.DTensor`` if something imported it (FSDP2 does), else None:
    a parameter can only be a DTensor once that module is loaded, and importing it costs time."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def _shard_key(p: Tensor) -> tuple[int, ...]:
    """Where a DTensor ``p``'s local data sits among the shards of its parameter: the mesh
    coordinates along the mesh dimensions that shard it (none along replicated dimensions, so
    replicas, as along HSDP's replicate dimension, draw the same noise and stay identical)."""
    coordinate = p.device_mesh.get_coordinate()
    key = []
    for dim, placement in enumerate(p.placements):
        if placement.is_partial():
            raise ValueError("SGLD steps a parameter sharded or replicated over the mesh, not one "
                             f"with a partial placement ({p.placements})")  # fmt: skip
        if placement.is_shard():
            key += [dim, coordinate[dim]]
    return tuple(key)


def _shard_seed(seed: int, index: int, key: tuple[int, ...]) -> int:
    """The Philox seed of the local shard of a DTensor parameter: a hash of the step's seed, the
    parameter's place among the bucket's (``index``, the same on every rank) and the shard's
    coordinates (``key``). The shards of a parameter, and the parameters, draw independent noise
    (with one seed and one stream, equal-sized shards would get the very same normals); replicas
    of a shard draw the same."""
    digest = hashlib.blake2b(repr((seed, index, key)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % _SEED_LIMIT


def _is_dtensor(t: Tensor) -> bool:
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(t, dtensor)


def _local(t: Tensor) -> Tensor:
    """A DTensor's local shard (updated in place, it updates the DTensor); any other tensor."""
    return t.to_local() if _is_dtensor(t) else t


class SGLD(Optimizer):
    """SGLD: ``theta <- theta - lr * grad_U + sqrt(2 lr T) xi``, ``xi ~ N(0, I)`` (MATH.md 7).

    The potential is ``U = sum_i L_i`` over the ``num_data`` training examples, estimated from a
    minibatch: **call ``backward()`` on the mean minibatch loss**; the step uses
    ``grad_U = num_data * p.grad + weight_decay * p`` (``weight_decay`` is the precision of a
    Gaussian prior ``N(0, 1 / weight_decay)`` on the parameters). ``temperature`` ``T`` = 1
    samples the exact posterior. The paper's ``-e1 N grad + e2 xi`` is ``lr = e1``,
    ``e2 = sqrt(2 e1)``.

    ``precondition=True`` is pSGLD (Li et al., 2016): an RMSprop preconditioner
    ``V <- alpha V + (1 - alpha) (grad_U / num_data)^2``, ``G = 1 / (eps + sqrt(V))``, step
    ``theta <- theta - lr G grad_U + sqrt(2 lr T G) xi`` (the correction term Gamma is dropped,
    as in the paper's experiments). That term is not always small: ``V``, an average over about
    ``1 / (1 - alpha)`` steps, follows the chain's own position, and without the term the chain
    settles wider than the posterior when the gradient noise is low. On a 1-D Gaussian posterior
    with full-batch gradients (an audit, 2,000 chains) the sampled variance was 1.54x the exact
    one at the default ``alpha = 0.99``, 1.11x at 0.999 and 1.02x at 0.9999; with minibatch
    gradients, 1.12x at 0.99. Use ``alpha >= 0.999``, or plain SGLD, where the spread matters.

    Under ``torch.compile`` with inductor, the per-step seed comes from inductor's own random
    generator: reproducible under ``torch.manual_seed``, but other noise than eager mode unless
    ``torch._inductor.config.fallback_random = True``.

    The noise of all parameters of a group is generated inside one fused kernel call (Philox,
    keyed by a seed drawn from torch's default generator and the parameter's index), so a run is
    reproducible under ``torch.manual_seed`` and no noise tensor is allocated. On CPU the C++ op
    updates every tensor of the group in one call; Triton launches one fused kernel per tensor;
    the CUDA C++ op updates all tensors of the group in one launch.

    Data-parallel training: under ``DistributedDataParallel`` call ``torch.manual_seed`` with
    the same seed on every rank, so the replicas draw the same noise and stay identical. FSDP2's
    ``fully_shard`` parameters (DTensors) are stepped shard by shard, each on its own rank, one op
    call per parameter, its seed a hash of the step's seed, the parameter's place in its bucket
    and the shard's mesh coordinates: the shards of a parameter draw independent noise, replicas
    of a shard the same, and every rank draws the same seeds from torch's generator (the same
    ``torch.manual_seed`` on every rank again). The deterministic part of the step equals one
    process's exactly; the noise is a different draw from the same distribution.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float,
        num_data: int | float,
        temperature: float = 1.0,
        weight_decay: float = 0.0,
        precondition: bool = False,
        alpha: float = 0.99,
        eps: float = 1e-5,
    ) -> None:
        defaults = {"lr": lr, "num_data": num_data, "temperature": temperature,
                    "weight_decay": weight_decay, "precondition": precondition,
                    "alpha": alpha, "eps": eps}  # fmt: skip
        _check_hyperparameters(defaults)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As :meth:`torch.optim.Optimizer.add_param_group`; the group's own hyperparameters are
        checked like the constructor's (a negative ``lr`` or ``temperature`` made NaN noise)."""
        merged = {**self.defaults, **param_group}
        _check_hyperparameters(merged)
        param_group.update({k: merged[k] for k in (*_NUMBERS, "precondition") if k in param_group})
        params = param_group.get("params")
        if not isinstance(params, (Tensor, set)) and isinstance(params, Iterable):
            param_group["params"] = params = list(params)  # a generator, read once
        for i, p in enumerate([params] if isinstance(params, Tensor) else params or []):
            name = ""
            if isinstance(p, tuple) and len(p) == 2:  # (name, tensor), as named_parameters()
                name, p = f" ({p[0]!r})", p[1]
            if isinstance(p, Tensor) and not p.is_floating_point():  # complex: in the C++ op
                raise TypeError(
                    f"SGLD samples real floating-point parameters; parameter {i}{name} of group "
                    f"{len(self.param_groups)} has dtype {p.dtype}"
                )
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One (p)SGLD step over every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Every group is checked before any parameter moves: a bad group (edited since by a
        # scheduler or by hand: a negative lr made NaN noise; a sparse gradient) is refused
        # with the earlier groups untouched, so that a retried step does not step them twice
        # (and so are the parameters' gradients and square_avgs: a checkpoint's square_avg of
        # another shape was refused only when the op reached it, after the earlier groups moved)
        plans = []
        for gi, group in enumerate(self.param_groups):
            _check_hyperparameters(group, at_step=True)
            # One fused call per (device, dtype): the CUDA op takes one dtype per launch. The
            # buckets, and so the seeds drawn from torch's generator, are alike on every rank.
            buckets: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
            for i, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("SGLD does not support sparse gradients")
                self._check_tensors(f"parameter {i} of group {gi}", p, group["precondition"])
                buckets.setdefault((p.device, p.dtype), []).append(p)
            plans.append((group, buckets))
        for group, buckets in plans:
            for params in buckets.values():
                self._step_bucket(group, params)
        return loss

    def _check_tensors(self, where: str, p: Tensor, precondition: bool) -> None:
        """Refuse, before any parameter moves, a gradient or a ``square_avg`` that the fused op
        would refuse midway: another shape (a checkpoint of another model, or a shard of
        another layout), dtype or device."""
        local, grad = _local(p), _local(p.grad)
        if grad.shape != local.shape or grad.dtype != p.dtype or grad.device != p.device:
            raise ValueError(
                f"SGLD: {where} is a {p.dtype} tensor of local shape {tuple(local.shape)} on "
                f"{p.device}, its gradient a {grad.dtype} one of shape {tuple(grad.shape)} on "
                f"{grad.device}"
            )
        sq = self.state[p].get("square_avg") if precondition else None
        if sq is None:
            return
        acc = torch.float64 if p.dtype == torch.float64 else torch.float32
        sq_local = _local(sq)
        if sq_local.shape != local.shape or sq.dtype != acc or sq.device != p.device:
            raise ValueError(
                f"SGLD: {where} of local shape {tuple(local.shape)} on {p.device} has a "
                f"square_avg of shape {tuple(sq_local.shape)}, {sq.dtype} on {sq.device} "
                f"({acc} of the parameter's shape and device needed: a checkpoint of another "
                "model, or sharded another way?)"
            )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As :meth:`torch.optim.Optimizer.load_state_dict`, but the pSGLD ``square_avg`` keeps
        its fp32 (fp64 for fp64 parameters) accumulation dtype and value: the base class casts
        every floating-point state to the parameter's dtype, bf16 / fp16 included."""
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        if len(ids) == len(params):  # (else the base class refuses it, naming the groups)
            # before anything is loaded: a refused checkpoint leaves the optimizer as it was
            for i, p in zip(ids, params, strict=True):
                saved = state_dict["state"].get(i, {}).get("square_avg")
                if saved is not None and tuple(saved.shape) != tuple(p.shape):
                    # (a DTensor's shape is the global one)
                    raise ValueError(
                        f"SGLD.load_state_dict: square_avg of shape {tuple(saved.shape)} for "
                        f"a parameter of shape {tuple(p.shape)} (parameter {i} of the state)"
                    )
        super().load_state_dict(state_dict)
        for i, p in zip(ids, params, strict=True):
            saved = state_dict["state"].get(i, {}).get("square_avg")
            if saved is not None:
                acc = torch.float64 if p.dtype == torch.float64 else torch.float32
                value = saved.detach().to(device=p.device, dtype=acc).clone()
                if _is_dtensor(p) and not _is_dtensor(value):
                    # a single-process checkpoint into FSDP2 parameters: shard it like them
                    # (a collective: every rank loads)
                    from torch.distributed.tensor import distribute_tensor

                    value = distribute_tensor(value, p.device_mesh, p.placements)
                self.state[p]["square_avg"] = value

    def _step_bucket(self, group: dict[str, Any], params: list[Tensor]) -> None:
        precondition = group["precondition"]
        seed = new_seed()
        plain: list[tuple] = []
        for index, p in enumerate(params):
            state = self.state[p]
            if precondition and "square_avg" not in state:
                acc = torch.float64 if p.dtype == torch.float64 else torch.float32
                # zeros_like keeps a DTensor's sharding (the state is checkpointed like p's)
                state["square_avg"] = torch.zeros_like(
                    p, dtype=acc, memory_format=torch.contiguous_format
                )
            sq = _local(state["square_avg"]) if precondition else None  # (step() checked them)
            local, grad = _local(p), _local(p.grad)
            if local is p:
                plain.append((p, grad, sq))
            else:  # an FSDP2 shard: a call of its own, its seed keyed by the shard
                seed_p = _shard_seed(seed, index, _shard_key(p))
                self._update(group, [(local, grad, sq)], seed_p)
        # every plain tensor in one fused call, keyed by the step's seed (as without FSDP)
        self._update(group, plain, seed)
        for p in params:  # counted once stepped: a step the op refused is not counted
            self.state[p]["step"] = self.state[p].get("step", 0) + 1

    @staticmethod
    def _update(group: dict[str, Any], items: list[tuple], seed: int) -> None:
        """One fused op call over ``(param, grad, square_avg or None)`` triples."""
        if not items:
            return
        precondition = group["precondition"]
        targets, grads, square_avgs, copy_back = [], [], [], []
        for p, grad, sq in items:
            # The kernels need contiguous memory; a non-contiguous parameter goes via a copy.
            t = p if p.is_contiguous() else p.contiguous()
            if t is not p:
                copy_back.append((p, t))
            targets.append(t)
            grads.append(grad.contiguous())
            if precondition:
                square_avgs.append(sq)
        # the op itself (its body checks tensors and numbers for every backend): step() has
        # checked the group, which the public sgld_step_ would check once more
        _sgld_step_op(
            targets, grads, square_avgs if precondition else [], float(group["lr"]),
            float(group["num_data"]), float(group["temperature"]), float(group["weight_decay"]),
            seed, bool(precondition), float(group["alpha"]), float(group["eps"]),
        )  # fmt: skip
        for p, t in copy_back:
            p.copy_(t)
