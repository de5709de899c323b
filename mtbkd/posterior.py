"""Posterior samples of chosen parameters and the batched predictive (MATH.md sections 7-8).

:class:`SampleStore` copies the chosen parameters (e.g. only a classifier head, as the paper's
SGLD phase does) into one preallocated ``[max_samples, D]`` buffer after optimizer steps, with
burn-in and thinning, and saves/loads it with safetensors (no pickle). :func:`predict` evaluates
the model under every sample with ``torch.func.functional_call`` + ``torch.vmap``, a chunk of
samples at a time, giving per-sample probabilities ``[S, N, C]``.
"""

from __future__ import annotations

import fnmatch
import json
import numbers
import os
from collections.abc import Iterable, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from mtbkd.validate import check_flags

__all__ = ["SampleStore", "predict"]

_FORMAT = "mtbkd.SampleStore/1"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def _select(
    source: nn.Module | Mapping[str, Tensor], include: str | Iterable[str] | None
) -> dict[str, Tensor]:
    if isinstance(source, nn.Module):
        # every name of a tied parameter (an LM head tied to its embedding) may be selected;
        # the tensor is stored once, under the first selected name
        named = dict(source.named_parameters(remove_duplicate=include is None))
    elif isinstance(source, Mapping):
        named = dict(source)
    else:
        raise TypeError(
            f"module_or_params must be an nn.Module or a name -> tensor mapping, "
            f"got {type(source).__name__}"
        )
    if include is not None:
        patterns = [include] if isinstance(include, str) else list(include)
        named = {k: v for k, v in named.items() if any(fnmatch.fnmatchcase(k, p) for p in patterns)}
    if isinstance(source, nn.Module):
        named = {k: named[k] for k in _one_name_each(named, named)}
    if not named:
        raise ValueError("no parameters selected: check module_or_params and include")
    for k, v in named.items():
        if not isinstance(v, Tensor) or not v.is_floating_point():
            raise TypeError(f"parameter {k!r} must be a floating-point tensor")
    return named


def _module_ref(source) -> nn.Module | None:
    # a plain reference (a store already holds the module's tensors): pickles and deep-copies
    # along with the module
    return source if isinstance(source, nn.Module) else None


def _lookup(module: nn.Module, name: str) -> Tensor | None:
    for get in (module.get_parameter, module.get_buffer):
        try:
            return get(name)
        except AttributeError:
            pass
    return None


class SampleStore:
    """Collects posterior samples of chosen parameters into one preallocated buffer.

    Args:
        module_or_params: a module (its parameters, filtered by ``include``) or a mapping
            ``name -> tensor``. Names must be those of the model later given to :func:`predict`
            (e.g. ``SampleStore(model, include="head.*")``).
        burn_in: calls to :meth:`collect` ignored at the start.
        thin: after burn-in keep every ``thin``-th call.
        max_samples: buffer rows. When full, further samples are dropped, or, with
            ``reservoir=True``, replace stored ones so that the store stays a uniform random
            subset of every kept sample (reservoir sampling on torch's default generator).
        dtype: ``torch.float32`` (default: a float64 model's samples are rounded to it),
            ``torch.bfloat16`` (halves the memory) or ``torch.float64`` (exact for float64).
        device: where the buffer lives (default: the parameters' device).
        include: ``fnmatch`` pattern(s) on parameter names.

    Given a module, :meth:`collect` reads the tensors the module holds under the recorded names
    at each call, so a parameter replaced since (``load_state_dict(..., assign=True)``) is
    followed; one removed or reshaped raises ``RuntimeError``.

    Given a module, only its parameters are stored, not its buffers: a model with BatchNorm then
    predicts every sample with the running statistics it holds at prediction time, not those
    that went with the sample. To store them too, give a mapping of the floating state:
    ``SampleStore({k: v for k, v in model.state_dict().items() if v.is_floating_point()})``.
    """

    def __init__(
        self,
        module_or_params: nn.Module | Mapping[str, Tensor],
        burn_in: int = 0,
        thin: int = 1,
        max_samples: int = 500,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        include: str | Iterable[str] | None = None,
        reservoir: bool = False,
    ) -> None:
        ints = []
        for name, v, lo in (("burn_in", burn_in, 0), ("thin", thin, 1),
                            ("max_samples", max_samples, 1)):  # fmt: skip
            # numpy integers as torch and SGLD take them (np.int64(len(dataset))), not bools
            if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Integral) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
            ints.append(int(v))
        burn_in, thin, max_samples = ints
        if isinstance(reservoir, np.bool_):
            reservoir = bool(reservoir)
        if dtype not in _DTYPES.values():
            raise TypeError(
                f"dtype must be torch.float32, torch.bfloat16 or torch.float64, got {dtype}"
            )
        params = _select(module_or_params, include)
        self._module = _module_ref(module_or_params)
        self.names = list(params)
        self.shapes = [tuple(params[k].shape) for k in self.names]
        self._params: list[Tensor] | None = [params[k] for k in self.names]
        sizes = [p.numel() for p in self._params]
        self._bounds = [0]
        for s in sizes:
            self._bounds.append(self._bounds[-1] + s)
        self.burn_in, self.thin, self.max_samples = burn_in, thin, max_samples
        if not isinstance(reservoir, bool):  # "no" was taken as True
            raise TypeError(f"reservoir must be True or False, got {reservoir!r}")
        self.reservoir = reservoir
        dev = torch.device(device) if device is not None else self._params[0].device
        # a normal tensor even when made under torch.inference_mode(): collect() writes into it
        # outside inference mode later (an inference tensor refuses that)
        with torch.inference_mode(False):
            self.buffer = torch.empty((max_samples, self._bounds[-1]), dtype=dtype, device=dev)
        self.count = 0  # samples stored
        self.calls = 0  # collect() calls seen
        self.kept = 0  # samples offered after burn-in and thinning

    @property
    def numel(self) -> int:
        """Elements per sample (``D``)."""
        return self._bounds[-1]

    def __len__(self) -> int:
        return self.count

    @torch.no_grad()
    def collect(self) -> bool:
        """Record the current parameter values if burn-in and thinning say so; True if stored."""
        if self._params is None:
            raise RuntimeError("this store was loaded without a module: it cannot collect")
        self._rebind()
        # the counters move only once the sample is in the buffer: a copy that fails (a meta
        # module, a parameter on a lost device) leaves no row of garbage counted as a sample
        calls = self.calls + 1
        after = calls - self.burn_in
        if after <= 0 or (after - 1) % self.thin != 0:
            self.calls = calls
            return False
        kept = self.kept + 1
        if self.count < self.max_samples:
            row = self.count
        elif self.reservoir:
            row = int(torch.randint(0, kept, ()).item())
            if row >= self.max_samples:
                self.calls, self.kept = calls, kept
                return False
        else:
            self.calls, self.kept = calls, kept
            return False
        dst = self.buffer[row]
        for p, a, b in zip(self._params, self._bounds[:-1], self._bounds[1:]):
            dst[a:b].copy_(p.detach().reshape(-1))
        self.calls, self.kept = calls, kept
        self.count = max(self.count, row + 1)
        return True

    def _rebind(self) -> None:
        # The module's parameters may have been replaced since (load_state_dict(assign=True),
        # a swapped submodule): collect what the module holds now, never a stale tensor.
        module = self._module
        if module is None:
            return
        for i, (name, shape) in enumerate(zip(self.names, self.shapes)):
            t = _lookup(module, name)
            if t is self._params[i]:
                continue
            if t is None:
                raise RuntimeError(f"the module no longer has parameter {name!r} recorded in "
                                   "this store (was a layer replaced?)")  # fmt: skip
            if tuple(t.shape) != shape:
                raise RuntimeError(f"parameter {name!r} of the module now has shape "
                                   f"{tuple(t.shape)}, the store {shape}")  # fmt: skip
            self._params[i] = t

    def samples(self) -> Tensor:
        """The stored samples ``[S, D]`` (a view of the buffer)."""
        return self.buffer[: self.count]

    def stacked(self, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        """``name -> [S, *shape]`` (views of the buffer unless ``dtype`` asks for a cast)."""
        s = self.samples()
        out = {}
        for name, shape, a, b in zip(self.names, self.shapes, self._bounds[:-1], self._bounds[1:]):
            t = s[:, a:b].view(self.count, *shape)
            out[name] = t if dtype is None else t.to(dtype)
        return out

    def sample(self, i: int) -> dict[str, Tensor]:
        """Sample ``i`` as ``name -> tensor`` (views)."""
        if not -self.count <= i < self.count:
            raise IndexError(f"sample index {i} out of range for {self.count} samples")
        return {k: v[i] for k, v in self.stacked().items()}

    def save(self, path: str | os.PathLike) -> None:
        """Write the stored samples and their layout to a safetensors file."""
        from mtbkd._files import save_safetensors

        meta = {
            "format": _FORMAT,
            "names": json.dumps(self.names),
            "shapes": json.dumps(self.shapes),
            "burn_in": str(self.burn_in),
            "thin": str(self.thin),
            "max_samples": str(self.max_samples),
            "calls": str(self.calls),
            "kept": str(self.kept),
            "reservoir": str(int(self.reservoir)),
        }
        save_safetensors({"samples": self.samples().contiguous().cpu()}, path, metadata=meta)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        module: nn.Module | Mapping[str, Tensor] | None = None,
        device: torch.device | str | None = None,
    ) -> SampleStore:
        """Read a store written by :meth:`save`.

        With ``module`` the names and shapes are checked against its parameters and the store
        can keep collecting from them; without, it only serves :func:`predict`.
        """
        from safetensors import safe_open

        with safe_open(os.fspath(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            if meta.get("format") != _FORMAT:
                raise ValueError(f"{os.fspath(path)!r} is not a SampleStore file")
            samples = f.get_tensor("samples")
        store = cls.__new__(cls)
        try:  # damaged metadata: one ValueError naming the file (a KeyError or a JSON error)
            names = json.loads(meta["names"])
            shapes = [tuple(s) for s in json.loads(meta["shapes"])]
            store.burn_in, store.thin = int(meta["burn_in"]), int(meta["thin"])
            max_samples = int(meta["max_samples"])
            store.calls, store.kept = int(meta["calls"]), int(meta["kept"])
            store._bounds = [0]
            for shape in shapes:
                store._bounds.append(store._bounds[-1] + int(torch.Size(shape).numel()))
        except (KeyError, ValueError, TypeError) as exc:
            raise ValueError(f"{os.fspath(path)!r}: damaged SampleStore metadata "
                             f"({type(exc).__name__}: {exc})") from None  # fmt: skip
        store.names, store.shapes = names, shapes
        if samples.dim() != 2 or samples.shape[1] != store._bounds[-1]:
            raise ValueError(f"samples tensor of shape {tuple(samples.shape)} does not match "
                             f"the recorded parameter shapes")  # fmt: skip
        store.max_samples = max(max_samples, samples.shape[0])
        store.reservoir = bool(int(meta["reservoir"]))
        store._params = None
        store._module = _module_ref(module)
        if module is not None:
            if isinstance(module, nn.Module):  # a store of a state_dict may hold buffers too
                module = _named_state(module)
            if isinstance(module, Mapping):  # e.g. a state_dict: only the store's names matter
                module = {k: v for k, v in module.items() if k in set(names)}
                if not module:
                    raise ValueError(f"module has no parameter {names[0]!r} recorded in the store")
            params = _select(module, None)
            for name, shape in zip(names, shapes):
                if name not in params:
                    raise ValueError(f"module has no parameter {name!r} recorded in the store")
                if tuple(params[name].shape) != shape:
                    raise ValueError(f"parameter {name!r} has shape "
                                     f"{tuple(params[name].shape)}, the store {shape}")  # fmt: skip
            store._params = [params[n] for n in names]
            if device is None:
                device = store._params[0].device
        with torch.inference_mode(False):  # (as in __init__)
            store.buffer = torch.empty((store.max_samples, store._bounds[-1]),
                                       dtype=samples.dtype,
                                       device="cpu" if device is None else device)  # fmt: skip
            store.buffer[: samples.shape[0]].copy_(samples)
        store.count = samples.shape[0]
        return store


#: ``predict(chunk=None)``: samples per vmapped chunk are capped so that the chunk's sampled
#: parameters take at most ``PREDICT_PARAM_BYTES`` and its outputs at most
#: ``PREDICT_OUTPUT_BYTES``; below ``PREDICT_MIN_CHUNK`` samples it makes one plain call per
#: sample. A sampled head is fastest in one chunk (the unsampled body runs once per chunk); with
#: every parameter sampled each sample's matmuls are a loop's, and batching them only adds memory
#: traffic (docs/BENCHMARKS.md).
PREDICT_PARAM_BYTES = 8 * 2**20
PREDICT_MIN_CHUNK = 8
PREDICT_OUTPUT_BYTES = 256 * 2**20


def predict(
    model: nn.Module,
    store: SampleStore,
    inputs: Tensor,
    chunk: int | None = None,
    *,
    probabilities: bool = True,
) -> Tensor:
    """Per-sample predictions ``[S, N, C]`` of ``model(inputs)`` under every stored sample.

    The sampled parameters replace the model's through ``torch.func.functional_call``, vmapped
    over ``chunk`` samples at a time (memory ``~ chunk x`` one forward), not a Python loop over
    state dicts; parameters that are not sampled (a network's body when only its head is) are
    used once per chunk. ``chunk=None`` sizes the chunks from the bytes of one sample's
    parameters and outputs (:data:`PREDICT_PARAM_BYTES`, :data:`PREDICT_OUTPUT_BYTES`): a sampled
    head goes in one or few chunks; a fully sampled network, whose samples share nothing, is run
    one sample per call. ``chunk=1`` is always one plain call per sample, and so is any ``chunk``
    for a model with a sampling Bayesian layer (:class:`mtbkd.nn.BayesLayer`; each sample draws
    its own weights from its stored posterior; vmap cannot batch the layer's seed). Returns
    softmax probabilities in fp32 (logits when ``probabilities=False``). Sampled buffers (a store
    made from a ``state_dict``) replace the model's too. Put the model in ``eval()`` mode first if
    it has dropout or batch norm (in training mode every sample draws its own dropout masks and
    batch norm uses, and updates, the statistics of ``inputs``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(store, SampleStore):
        raise TypeError(f"store must be a SampleStore, got {type(store).__name__}")
    if not isinstance(inputs, Tensor):  # a tuple failed inside the model
        raise TypeError(f"inputs must be one torch.Tensor (model(inputs)), got "
                        f"{type(inputs).__name__}: wrap a model of several inputs in a module "
                        "that takes one")  # fmt: skip
    if chunk is not None and (isinstance(chunk, (bool, np.bool_))
                              or not isinstance(chunk, numbers.Integral) or chunk < 1):  # fmt: skip
        raise ValueError(f"chunk must be a positive int or None, got {chunk!r}")
    chunk = None if chunk is None else int(chunk)
    check_flags(probabilities=probabilities)
    if len(store) == 0:
        raise ValueError("store holds no samples: call store.collect() after optimizer steps")
    # a store made from a state_dict may hold buffers (batch norm's running statistics) too
    params = _named_state(model)
    missing = [n for n in store.names if n not in params]
    if missing:
        raise ValueError(f"model has no parameters named {missing} (nor buffers): the store's "
                         f"names must be relative to the model given to predict")  # fmt: skip
    for name, shape in zip(store.names, store.shapes, strict=True):
        if tuple(params[name].shape) != shape:
            raise ValueError(f"model parameter {name!r} has shape {tuple(params[name].shape)}, "
                             f"the store's samples {shape}")  # fmt: skip
    ref = params[store.names[0]]

    def run(sample: dict[str, Tensor], x: Tensor) -> Tensor:
        out = torch.func.functional_call(model, sample, (x,), strict=False)
        if not isinstance(out, Tensor):
            raise TypeError(f"model must return a tensor of logits [N, C], got "
                            f"{type(out).__name__}")  # fmt: skip
        if out.dim() < 2:  # a softmax over the rows of [N] would be silently wrong
            raise ValueError(f"model must return logits [N, C] (a class dimension last), got "
                             f"shape {tuple(out.shape)}")  # fmt: skip
        return torch.softmax(out.float(), dim=-1) if probabilities else out

    # "different": dropout in training mode draws its own mask per sample, as one call per sample
    batched = torch.vmap(run, in_dims=(0, None), randomness="different")
    # one name per tensor: functional_call ties a tied parameter's other names to it, and
    # refuses two values for them (a state_dict store of a tied model holds every name)
    samples = store.stacked()
    stacked = {k: samples[k] for k in _one_name_each(store.names, params)}
    out: Tensor | None = None
    size = chunk
    if _draws_host_seeds(model):  # a sampling Bayesian layer reads a fresh seed on the host per
        size = 1  # forward, which vmap cannot batch: one plain call (and draw) per sample
    if size is None:  # automatic: one sample on one row gives the output's size per row
        # in eval mode: a training-mode batch norm fails on one row and would update its statistics
        modes = [(m, m.training) for m in model.modules()]
        model.eval()
        try:
            with torch.no_grad():
                probe = run({k: v[0].to(device=ref.device, dtype=params[k].dtype)
                             for k, v in stacked.items()}, inputs[:1])  # fmt: skip
        finally:
            for m, mode in modes:
                m.training = mode
        shape = (len(store), inputs.shape[0], *probe.shape[1:])
        size = _auto_chunk(store, params, torch.empty(shape, dtype=probe.dtype, device="meta"))
    with torch.no_grad():
        s0 = 0
        while s0 < len(store):
            # a copy: a training-mode batch norm updates its sampled running statistics in
            # place, which must not write into the store (to() without copy may be a view)
            part = {k: v[s0 : s0 + size].to(device=ref.device, dtype=params[k].dtype, copy=True)
                    for k, v in stacked.items()}  # fmt: skip
            if size == 1:  # one sample: a plain call (vmap over one sample is slower)
                res = run({k: v[0] for k, v in part.items()}, inputs).unsqueeze(0)
            else:
                res = batched(part, inputs)
            if out is None:  # one [S, ...] result, filled chunk by chunk (no final cat)
                out = res.new_empty((len(store), *res.shape[1:]))
            out[s0 : s0 + res.shape[0]] = res
            s0 += res.shape[0]
    return out


def _one_name_each(names: Iterable[str], tensor_of: Mapping[str, Tensor]) -> list[str]:
    """``names`` without the later names of a tensor already named (a tied parameter)."""
    seen: set[int] = set()
    out = []
    for name in names:
        if id(tensor_of[name]) not in seen:
            seen.add(id(tensor_of[name]))
            out.append(name)
    return out


def _named_state(model: nn.Module) -> dict[str, Tensor]:
    """Every name of ``model``'s buffers and parameters, a tied parameter's second name too."""
    return {
        **dict(model.named_buffers(remove_duplicate=False)),
        **dict(model.named_parameters(remove_duplicate=False)),
    }


def _draws_host_seeds(model: nn.Module) -> bool:
    """Whether ``model`` holds a Bayesian layer (:class:`mtbkd.nn.BayesLayer`) that samples its
    weights in the forward (not frozen, ``mode="reparameterize"``): its Philox seed is read with
    ``.item()``, which ``torch.vmap`` refuses."""
    from mtbkd.nn import BayesLayer

    return any(
        isinstance(m, BayesLayer) and not m.frozen and m.mode == "reparameterize"
        for m in model.modules()
    )


def _auto_chunk(store: SampleStore, params: Mapping[str, Tensor], out: Tensor) -> int:
    param_bytes = sum(params[k].element_size() * params[k].numel() for k in store.names)
    out_bytes = out[0].element_size() * out[0].numel()
    fit = min(PREDICT_PARAM_BYTES // max(param_bytes, 1), PREDICT_OUTPUT_BYTES // max(out_bytes, 1))
    # Fewer than PREDICT_MIN_CHUNK samples per chunk share too little to beat one call per sample
    # (and a batched matmul of an odd number of samples leaves a core idle on two)
    return 1 if fit < PREDICT_MIN_CHUNK else min(len(store), int(fit))
