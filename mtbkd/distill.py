"""The MT-BKD pipeline: teachers -> MAP warm start -> SGLD posterior -> predictive and metrics.

A student is trained on the MT-BKD objective (MATH.md section 2): Adam to the posterior mode
first, then SGLD (MATH.md section 7) on the classifier head only, every ``thin``-th step after a
burn-in kept in a :class:`mtbkd.posterior.SampleStore`. With a validation split the MAP phase
stops early at its best validation NLL; with ``num_chains > 1`` further chains, each from its own
MAP warm start, are pooled (:func:`pool_chains`). The posterior predictive averages the samples'
probabilities (MATH.md section 8). Baselines run through the same loop and the same
checkpoints: cross-entropy only, average- and entropy-weighted forward-KL KD (MATH.md section 3),
single-teacher BKD for each teacher, MT-BKD at the mode and MT-BKD with SGLD; opt-in, ``avg_bkd``
(single-teacher BKD from the teachers' averaged prediction).

Two levels:

* :func:`distill` trains one student with one method (a user's ``nn.Module``, teacher logits or
  teacher modules evaluated once) and returns a :class:`DistillResult` (model, samples, predict).
* :func:`run_experiment` runs every method on a :class:`mtbkd.data.Dataset`, choosing each
  method's hyperparameters on a validation split of the training set (never the test set), and
  returns an :class:`ExperimentResult` that :mod:`mtbkd.report` turns into tables and figures.

Checkpoints (``checkpoint_dir``) are written every ``checkpoint_every`` epochs and at the end of
each phase: model, optimizer, data-order generator, torch's RNG (SGLD's noise seeds) and the
samples so far. A rerun with the same directory resumes from the last checkpoint and reproduces
the uninterrupted run's samples exactly; a finished phase is loaded instead of retrained. A
checkpoint written with other data, objective, optimizer settings or schedule is refused
(:class:`CheckpointMismatchError`), never resumed, and so is a damaged one
(:class:`CheckpointCorruptError`: zip CRCs of the ``.pt`` files and a SHA-256 of each samples
file are checked).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import itertools
import json
import math
import numbers
import os
import pickle
import time
import warnings
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtbkd import functional as mf
from mtbkd import validate
from mtbkd._files import file_sha256
from mtbkd.data import Dataset, stratified_split

__all__ = [
    "DistillConfig",
    "CheckpointCorruptError",
    "CheckpointError",
    "CheckpointMismatchError",
    "TrainingDivergedError",
    "Objective",
    "StudentMLP",
    "DistillResult",
    "MethodResult",
    "ExperimentResult",
    "PRESETS",
    "train_map",
    "train_sgld",
    "ChainSamples",
    "pool_chains",
    "more_chains",
    "distill",
    "train_teachers",
    "expert_groups",
    "evaluate_probs",
    "teacher_attribution",
    "weighting_diagnostic",
    "weighting_verdict",
    "teacher_mixtures",
    "average_teacher_logits",
    "check_methods",
    "run_experiment",
    "save_run",
    "load_run",
    "method_names",
]

BASE_METHODS = ("ce", "avg_kd", "entropy_kd", "bkd", "mtbkd_map", "mtbkd_sgld")
# opt-in methods (not in the default list): ``avg_bkd``, single-teacher BKD whose one teacher is
# the teachers' averaged prediction (:func:`average_teacher_logits`), the Bayesian counterpart
# of ``avg_kd``
EXTRA_METHODS = ("avg_bkd",)


@dataclass
class DistillConfig:
    """Hyperparameters of the pipeline. Defaults are the paper's schedule (MATH.md section 7):
    Adam 120 epochs at lr 3e-4, weight decay 1e-5, then 80 SGLD epochs on the head with the
    paper's step ``η·N = 8e-8 · 2,000``; :data:`PRESETS` size it to the built-in datasets. With a
    validation split (:func:`run_experiment` always has one; :func:`distill` when given
    ``validation``) the MAP phase stops early: the weights of its best validation-NLL epoch are
    kept, and SGLD starts from them.

    The ``*_grid`` fields list the values tried on the validation split (selected by validation
    NLL); an empty grid keeps the single value of the matching field. A grid is a mapping
    ``{key: [values]}`` (every combination is tried) or a list of such mappings (the union of
    their combinations, for regimes that do not mix: ``[{"concentration": [5, 20],
    "prior_weight": [0.1, 0.5]}, {"concentration": [0.01], "prior_weight": [250, 500]}]``).
    ``mtbkd_grid`` may also tune ``weights`` (``"entropy"`` / ``"uniform"``, the mixture's
    per-example teacher weights); the single-teacher BKDs ignore it (one teacher has weight 1).
    A field that every part of a grid tunes is not used by the pipeline (the grid's values are:
    ``prior_weight=7.0`` with the default ``mtbkd_grid`` changes nothing); :meth:`grid_tuning`
    names that grid. ``mtbkd distill --set`` refuses such a field; this class does not, so that a
    preset may hold both.
    """

    hidden: tuple[int, ...] = (128,)
    batch_size: int = 64
    map_epochs: int = 120
    map_lr: float = 3e-4
    weight_decay: float = 1e-5
    # MAP early stopping on a validation split (when one is given): keep the weights of the epoch
    # with the lowest validation NLL and stop after ``patience`` epochs without a new best
    # (0: run all ``map_epochs``); ``map_epochs`` is then the maximum
    early_stopping: bool = True
    patience: int = 20
    sgld_epochs: int = 80
    # SGLD step on the mean loss, η·num_data (the SGLD step is η = sgld_lr / num_data).
    sgld_lr: float = 1.6e-4
    sgld_temperature: float = 1.0
    # Precision of the Gaussian prior on the head's weights during SGLD; None: num_data ·
    # weight_decay, the prior whose mode the MAP warm start found (Adam's L2 on the mean loss)
    sgld_prior_precision: float | None = None
    sgld_precondition: bool = False
    num_samples: int = 100  # per chain
    burn_in: float = 0.1  # fraction of the SGLD steps
    # independent SGLD chains, each from its own MAP warm start (chain c uses seed + c for the
    # initialisation and the batch order); their samples are pooled, so the posterior predictive
    # averages over several modes instead of the neighbourhood of one
    num_chains: int = 1
    # MT-BKD / BKD objective (MATH.md section 2)
    temperature: float = 2.0
    concentration: float = 5.0
    prior_weight: float = 0.02
    hard_label_weight: float = 1.0
    weights: str = "entropy"
    # weighted-sum KD baselines (MATH.md section 3): CE + kd_weight · τ² · Σ_k w_k KL(p_k‖q)
    kd_temperature: float = 2.0
    kd_weight: float = 1.0
    # validation-split tuning
    mtbkd_grid: Grid = field(
        default_factory=lambda: {"concentration": (5.0, 20.0), "prior_weight": (0.02, 0.2)}
    )
    kd_grid: Grid = field(
        default_factory=lambda: {"kd_temperature": (2.0, 4.0), "kd_weight": (0.5, 1.0)}
    )
    sgld_grid: tuple[float, ...] = (1.6e-4, 1.6e-3)
    # SGLD prior precisions tried (absolute; empty: the single ``sgld_prior_precision``). A
    # stronger Gaussian prior on the head than the MAP's weight decay keeps the posterior from
    # drifting back to the over-fitted optimum that early stopping avoided.
    sgld_prior_grid: tuple[float, ...] = ()
    # how the objective's hyperparameters (``mtbkd_grid``) of the sampled methods are chosen:
    # False, by the validation NLL of the MAP fit, then SGLD for that fit only; True, every grid
    # point is sampled (its SGLD setting chosen on the first chain, then all chains pooled) and
    # the lowest validation NLL of the pooled posterior predictive, the predictive that is
    # reported, wins (about len(grid) times the SGLD runs)
    joint_selection: bool = False
    # False: the single-teacher BKDs reuse MT-BKD's chosen objective and SGLD setting instead of
    # searching the grids themselves (avg_bkd always searches its own)
    tune_bkd: bool = True
    # post-hoc temperature scaling of every method's predictive (off: the paper's predictive):
    # each sample's probabilities become softmax(log q / T), one T per method, fitted on the
    # validation split by NLL (mtbkd.metrics.fit_temperature) after every other choice is made
    calibrate: bool = False
    val_fraction: float = 0.2
    # cross-fitting (examples/cross_fit.py): test_folds >= 2 replaces the seed's random test split
    # of a dataset without test files of its own (digits, yeast, a one-folder npy directory) by
    # test_folds folds stratified by label, drawn with fold_seed (the same folds for every seed),
    # and tests on fold test_fold; 0: the usual split (mtbkd.data.test_split)
    test_folds: int = 0
    test_fold: int = 0
    fold_seed: int = 0
    # teachers trained by the pipeline when the dataset has none
    num_teachers: int = 3
    teacher_hidden: int = 64
    teacher_epochs: int = 300
    teacher_other_fraction: float = 0.08
    # cross-fitted teacher logits on the training rows (0: none). Ten folds: each row is scored by
    # teachers fitted on 90 % of the rows, nearly as strong as the teachers that score the
    # validation and test rows, so their calibrated soft labels are not the softer ones of
    # half-data teachers (two folds, the default before; docs/RESULTS.md: chosen by the distilled
    # methods' mean validation NLL over 2, 3, 5, 10 folds on digits, and 2 vs 10 on yeast)
    teacher_folds: int = 10
    # temperature-scale each teacher on its out-of-fold logits (needs teacher_folds >= 2)
    teacher_calibrate: bool = True
    seed: int = 0
    methods: tuple[str, ...] = BASE_METHODS
    progress: bool = True
    checkpoint_every: int = 10
    predict_chunk: int = 50
    # intra-op threads while training: the students are small, and more threads than free cores
    # slow such tiny kernels down by an order of magnitude on a busy machine (0 = leave torch's)
    num_threads: int = 1

    def __post_init__(self) -> None:
        """Checks every field by name (also run again when a run starts: the dataclass is mutable)
        and stores numbers as Python ints and floats (numpy's would not go into report.json)."""
        try:
            hidden = tuple(self.hidden)
            ok = bool(hidden) and all(
                validate._is_number(h) and math.isfinite(h) and int(h) == h and h >= 1
                for h in hidden
            )
        except TypeError:
            ok = False
        if not ok:
            raise ValueError(f"hidden must list positive integer layer widths, got {self.hidden!r}")
        self.hidden = tuple(int(h) for h in hidden)
        if isinstance(self.methods, str) or not all(isinstance(m, str) for m in self.methods):
            raise TypeError(f"methods must be a sequence of method names, got {self.methods!r}")
        self.methods = tuple(self.methods)
        if not self.methods:
            raise ValueError("methods names no method")
        self.sgld_grid = _number_list("sgld_grid", self.sgld_grid, positive=True)
        self.sgld_prior_grid = _number_list("sgld_prior_grid", self.sgld_prior_grid)
        for name in INT_FIELDS:  # a whole float (JSON's 64.0) is the integer, numpy's ints too
            v = getattr(self, name)
            if isinstance(v, float) and v.is_integer():
                setattr(self, name, int(v))
            elif isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise TypeError(f"{name} must be an integer, got {v!r}")
            else:
                setattr(self, name, int(v))
            if name != "seed" and abs(getattr(self, name)) >= 2**62:
                # (1e300 as a whole float: torch.split's overflow in the middle of training)
                raise ValueError(f"{name} must be below 2**62, got {v!r}")
        # torch's and numpy's generators take no more; chain c runs with seed + c
        if not 0 <= self.seed < 2**63 - max(self.num_chains - 1, 0):
            top = "2**63" if self.num_chains <= 1 else f"2**63 - {self.num_chains - 1}"
            raise ValueError(
                f"seed must lie in [0, {top}) (chain c of num_chains={self.num_chains} runs with "
                f"seed + c), got {self.seed}"
            )
        if self.num_threads > validate.MAX_THREADS:
            raise ValueError(f"num_threads must be at most {validate.MAX_THREADS} (0: torch's "
                             f"own), got {self.num_threads}")  # fmt: skip
        for name in (
            "batch_size",
            "num_samples",
            "num_chains",
            "checkpoint_every",
            "predict_chunk",
            "num_teachers",
            "teacher_hidden",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("map_epochs", "sgld_epochs", "patience", "teacher_epochs", "teacher_folds",
                     "num_threads"):  # fmt: skip
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be non-negative, got {getattr(self, name)}")
        for name in ("map_lr", "sgld_lr", "temperature", "concentration", "kd_temperature"):
            setattr(self, name, validate.check_positive(getattr(self, name), name))
        for name in ("weight_decay", "sgld_temperature", "prior_weight", "hard_label_weight",
                     "kd_weight"):  # fmt: skip
            setattr(self, name, validate.check_real(getattr(self, name), name, nonnegative=True))
        if self.sgld_prior_precision is not None:
            self.sgld_prior_precision = validate.check_real(
                self.sgld_prior_precision, "sgld_prior_precision", nonnegative=True
            )
        for name in ("teacher_other_fraction", "burn_in", "val_fraction"):  # ranges below
            setattr(self, name, validate.check_real(getattr(self, name), name))
        if self.teacher_folds == 1:
            raise ValueError("teacher_folds must be 0 (no cross-fitted teacher logits) or at "
                             "least 2, got 1")  # fmt: skip
        if self.teacher_folds == 0 and self.teacher_calibrate:  # was silently no calibration
            raise ValueError(
                "teacher_calibrate fits each teacher's temperature on its out-of-fold logits, "
                "which need teacher_folds >= 2: with teacher_folds=0 set teacher_calibrate=False"
            )
        if not 0.0 <= self.teacher_other_fraction <= 1.0:
            raise ValueError(
                f"teacher_other_fraction must lie in [0, 1], got {self.teacher_other_fraction}"
            )
        if self.sgld_epochs == 0 and any(_sampled(m) for m in self.methods):
            raise ValueError("sgld_epochs must be at least 1 for the sampled methods "
                             "(mtbkd_sgld, bkd, bkd_<name>, avg_bkd)")  # fmt: skip
        for name in ("early_stopping", "joint_selection", "tune_bkd", "teacher_calibrate",
                     "calibrate", "sgld_precondition", "progress"):  # fmt: skip
            if isinstance(getattr(self, name), np.bool_):  # numpy's, as SGLD takes them
                setattr(self, name, bool(getattr(self, name)))
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not isinstance(self.weights, str) or self.weights not in ("entropy", "uniform"):
            raise ValueError(f"weights must be 'entropy' or 'uniform', got {self.weights!r}")
        if not 0.0 <= self.burn_in < 1.0:
            raise ValueError(f"burn_in must lie in [0, 1), got {self.burn_in}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must lie in (0, 1), got {self.val_fraction}")
        if self.test_folds == 1 or self.test_folds < 0:
            raise ValueError(
                f"test_folds must be 0 (the usual test split) or at least 2, got {self.test_folds}"
            )
        for name in ("test_fold", "fold_seed"):  # without folds they would change nothing
            if self.test_folds == 0 and getattr(self, name) != 0:
                raise ValueError(
                    f"{name}={getattr(self, name)} needs test_folds (the number of folds)"
                )
        if self.test_folds and not 0 <= self.test_fold < self.test_folds:
            raise ValueError(
                f"test_fold must lie in 0..{self.test_folds - 1} (test_folds = "
                f"{self.test_folds}), got {self.test_fold}"
            )
        if self.fold_seed < 0:
            raise ValueError(f"fold_seed must be non-negative, got {self.fold_seed}")
        known = BASE_METHODS + EXTRA_METHODS
        unknown = [m for m in self.methods if m not in known and not m.startswith("bkd_")]
        if unknown:
            raise ValueError(f"unknown methods {unknown}; choose from {known} or bkd_<name>")
        twice = sorted({m for m in self.methods if self.methods.count(m) > 1})
        if twice:  # the report lists a method once, and a config that says twice is no record
            raise ValueError(f"methods lists {', '.join(map(repr, twice))} more than once")
        self.mtbkd_grid = _check_grid("mtbkd_grid", self.mtbkd_grid)
        self.kd_grid = _check_grid("kd_grid", self.kd_grid)
        for name, keys in GRID_KEYS.items():
            # across the parts of a list of grids, and against the fields a part leaves as
            # they are: each setting's checkpoint folder is named by its values to 6 digits
            base = {k: getattr(self, k) for k in sorted(keys)}
            points = _grid(base, getattr(self, name))
            _distinct_tags(name, [_tag(h) for h in points], "settings (with the fields)")

    def fold(self) -> tuple[int, int, int] | None:
        """The cross-fitting fold ``(test_fold, test_folds, fold_seed)`` that the data loaders
        take (:func:`mtbkd.data.test_split`), or None for the usual test split."""
        return (self.test_fold, self.test_folds, self.fold_seed) if self.test_folds else None

    def grid_tuning(self, name: str) -> str | None:
        """The grid (``mtbkd_grid`` / ``kd_grid``) whose every part tunes the field ``name``, so
        that the field's own value is never used by the pipeline; None if there is none."""
        for grid_name in ("mtbkd_grid", "kd_grid"):
            grid = getattr(self, grid_name)
            parts = _grid_parts(grid)
            if name in GRID_KEYS[grid_name] and parts and all(name in p for p in parts):
                return grid_name
        return None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        d["methods"] = list(self.methods)
        d["sgld_grid"] = list(self.sgld_grid)
        d["sgld_prior_grid"] = list(self.sgld_prior_grid)
        d["mtbkd_grid"] = _grid_json(self.mtbkd_grid)
        d["kd_grid"] = _grid_json(self.kd_grid)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DistillConfig:
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        return cls(**kw)  # __post_init__ turns the grids' lists into tuples


# Settings that change only speed, memory or display, not what a run computes: runs that differ
# only in these (and in the seed) are the same experiment (`--resume`, `mtbkd summarise`).
RUN_ONLY_FIELDS = ("seed", "progress", "num_threads", "predict_chunk", "checkpoint_every")
# Settings of the teachers the pipeline trains for a dataset without teachers of its own; with
# the dataset's own teachers (DeepLoc's, an own dataset's teacher_*.npy) they change nothing.
TEACHER_TRAINING_FIELDS = (
    "num_teachers",
    "teacher_hidden",
    "teacher_epochs",
    "teacher_other_fraction",
    "teacher_folds",
    "teacher_calibrate",
)


def experiment_settings(report: Mapping[str, Any]) -> dict[str, Any]:
    """The settings that decide what a finished run computed, from its ``report.json``
    dictionary: its ``config`` with every :class:`DistillConfig` field (a field added since the
    run was written takes its default), less :data:`RUN_ONLY_FIELDS`, and less
    :data:`TEACHER_TRAINING_FIELDS` where the dataset brought its own teachers (the report's
    ``teachers_trained``; of reports written before the key existed, DeepLoc's count as
    bringing their own, any other's as unknown: every field compared). Two runs whose settings
    are equal are the same experiment (``--resume``, ``mtbkd summarise``)."""
    raw = dict(report.get("config") or {})
    folds = raw.get("teacher_folds")
    if isinstance(folds, int) and not isinstance(folds, bool) and 0 <= folds < 2:
        # runs written before such configs were refused: 0 or 1 fold with teacher_calibrate on
        # meant no cross-fitting and no calibration, today's teacher_folds=0 without it
        raw["teacher_folds"], raw["teacher_calibrate"] = 0, False
    try:
        full = DistillConfig.from_dict(raw).to_dict()
    except (TypeError, ValueError):
        full = dict(raw)
    trained = report.get("teachers_trained")
    if trained is None and report.get("dataset") == "deeploc":
        trained = False
    drop = RUN_ONLY_FIELDS + (TEACHER_TRAINING_FIELDS if trained is False else ())
    return {k: v for k, v in full.items() if k not in drop}


INT_FIELDS = ("batch_size", "map_epochs", "patience", "sgld_epochs", "num_samples", "num_chains",
              "num_teachers", "teacher_hidden", "teacher_epochs", "teacher_folds", "seed",
              "checkpoint_every", "predict_chunk", "num_threads", "test_folds", "test_fold",
              "fold_seed")  # fmt: skip


def _sampled(method: str) -> bool:
    """Whether ``method`` samples a posterior with SGLD."""
    return method in ("mtbkd_sgld", "bkd", "avg_bkd") or method.startswith("bkd_")


# What each grid may tune: the objective's own hyperparameters (they name its checkpoints)
GRID_KEYS = {
    "mtbkd_grid": frozenset({"temperature", "concentration", "prior_weight", "weights"}),
    "kd_grid": frozenset({"kd_temperature", "kd_weight"}),
}
# the grid keys whose values are names, with the names allowed
GRID_CHOICES = {"weights": ("entropy", "uniform")}
# a grid: {key: values} (their product) or a list of them (the union of the products)
Grid = Mapping[str, Sequence[Any]] | Sequence[Mapping[str, Sequence[Any]]]


def _number_list(name: str, values: Any, positive: bool = False) -> tuple[float, ...]:
    """A config's list of finite numbers (positive, or non-negative) as floats; values that
    name one checkpoint folder (equal in ``%g``) are refused: their runs would share it."""
    if isinstance(values, (str, bytes)) or not isinstance(values, (list, tuple)):
        raise TypeError(f"{name} must be a list of numbers, got {values!r}")
    bound = "positive" if positive else "non-negative"
    for v in values:
        if (not validate._is_number(v) or not math.isfinite(v)
                or not (v > 0 or (v == 0 and not positive))):  # fmt: skip
            raise ValueError(f"{name} values must be {bound} finite numbers, got {v!r}")
    out = tuple(float(v) for v in values)
    _distinct_tags(name, out)
    return out


def _distinct_tags(name: str, values: Sequence[float | str], what: str = "values") -> None:
    tags = [_fmt(v) for v in values]
    same = sorted({t for t in tags if tags.count(t) > 1})
    if same:
        raise ValueError(f"{name} holds {what} that agree to 6 digits ({', '.join(same)}): give "
                         "each once (their runs would share one checkpoint folder)")  # fmt: skip


def _check_grid(name: str, grid: Any) -> dict[str, tuple] | list[dict[str, tuple]]:
    """``grid`` validated, its value lists as tuples: a mapping stays a mapping, a list or tuple
    of mappings (at least one) becomes a list."""
    if isinstance(grid, Mapping):
        parts, single = [grid], True
    elif isinstance(grid, (list, tuple)) and grid and all(isinstance(g, Mapping) for g in grid):
        parts, single = list(grid), False
    else:
        raise ValueError(
            f"{name} must be a mapping {{key: [values]}} or a non-empty list of them, got {grid!r}"
        )
    out = []
    for part in parts:
        checked = {}
        for key, values in part.items():
            if key not in GRID_KEYS[name]:
                raise ValueError(f"{name} may tune {sorted(GRID_KEYS[name])}, got {key!r}")
            if not isinstance(values, (list, tuple)) or not values:
                what = "names" if key in GRID_CHOICES else "numbers"
                raise ValueError(
                    f"{name}[{key!r}] must be a non-empty list of {what}, got {values!r}"
                )
            if key in GRID_CHOICES:
                bad = [v for v in values if v not in GRID_CHOICES[key]]
                if bad:
                    raise ValueError(
                        f"{name}[{key!r}] values must be among {list(GRID_CHOICES[key])}, got {bad}"
                    )
                checked[key] = tuple(values)
                continue
            ok = all(validate._is_number(v) and math.isfinite(v) for v in values)  # numpy's too
            if not ok:
                raise ValueError(
                    f"{name}[{key!r}] must be a non-empty list of numbers, got {values!r}"
                )
            low = 0.0 if key in ("prior_weight", "kd_weight") else None
            if any((v < low) if low is not None else not v > 0 for v in values):
                bound = "non-negative" if low is not None else "positive"
                raise ValueError(f"{name}[{key!r}] values must be {bound}, got {list(values)}")
            checked[key] = tuple(float(v) for v in values)
            _distinct_tags(f"{name}[{key!r}]", checked[key])
        out.append(checked)
    return out[0] if single else out


def _grid_parts(grid: Grid) -> list[Mapping[str, Sequence[Any]]]:
    """The mappings of a checked grid: itself, or the items of its list."""
    return [grid] if isinstance(grid, Mapping) else list(grid)


def _grid_json(grid: Grid) -> dict[str, list] | list[dict[str, list]]:
    """A checked grid with lists for tuples (JSON's form)."""
    parts = [{k: list(v) for k, v in part.items()} for part in _grid_parts(grid)]
    return parts[0] if isinstance(grid, Mapping) else parts


# Schedules sized to the built-in datasets (chosen on their validation splits).
PRESETS: dict[str, dict[str, Any]] = {
    "digits": {
        "hidden": (32,),
        "batch_size": 64,
        "map_epochs": 60,
        "map_lr": 3e-3,
        "weight_decay": 1e-4,
        # the fixed 60-epoch schedule: the demo's validation split (135 images) is small for
        # picking an epoch by its NLL (docs/RESULTS.md gives early stopping's numbers here)
        "early_stopping": False,
        "sgld_epochs": 40,
        "num_samples": 100,
        "num_chains": 3,
        "val_fraction": 0.3,
        "teacher_other_fraction": 0.1,
        "mtbkd_grid": {
            "temperature": (2.0, 4.0),
            "concentration": (5.0, 20.0),
            "prior_weight": (0.1, 0.5),
        },
        "sgld_grid": (1.6e-4, 1.6e-3, 1.6e-2),
    },
    "yeast": {
        "hidden": (32,),
        "batch_size": 64,
        "map_epochs": 80,
        "map_lr": 3e-3,
        "weight_decay": 1e-4,
        "sgld_epochs": 40,
        "num_samples": 100,
        # the pipeline's yeast teachers are weaker than the student: let the KD baselines, like
        # MT-BKD (prior weight 0.02), choose a light soft-label term on the validation split
        "kd_grid": {"kd_temperature": (2.0, 4.0), "kd_weight": (0.1, 0.5, 1.0)},
    },
    "deeploc": {
        "hidden": (64,),
        "batch_size": 64,
        "map_epochs": 100,  # at most: early stopping on the validation split
        "map_lr": 3e-4,
        "weight_decay": 1e-2,
        "sgld_epochs": 20,
        "num_samples": 100,
        "num_chains": 5,
        # two regimes of the mixture prior: a sharp Dirichlet (λ = 5, 20) at a light prior
        # weight, whose responsibilities follow the teacher nearest the student on each row; and a
        # flat one (λ = 0.01) at a heavy weight, whose responsibilities are the teacher weights,
        # so that with uniform weights the student is pulled toward the teachers' average (the
        # DeepLoc teachers are generalists whose average beats either; docs/RESULTS.md)
        "mtbkd_grid": [
            {
                "weights": ("entropy", "uniform"),
                "temperature": (1.0, 2.0),
                "concentration": (5.0, 20.0),
                "prior_weight": (0.1, 0.5),
            },
            {
                "weights": ("entropy", "uniform"),
                "temperature": (1.0, 2.0),
                "concentration": (0.01,),
                "prior_weight": (250.0, 500.0, 1000.0),
            },
        ],
        "kd_grid": {"kd_temperature": (1.0, 2.0), "kd_weight": (0.5, 1.0)},
        "sgld_grid": (1.6e-4, 1.6e-3, 1.6e-2),
        "sgld_prior_grid": (20.0, 200.0, 1000.0),
    },
}
SMOKE = {
    "map_epochs": 4,
    "sgld_epochs": 3,
    "num_samples": 10,
    "teacher_epochs": 40,
    "mtbkd_grid": {},
    "kd_grid": {},
    "sgld_grid": (),
    "sgld_prior_grid": (),
    "num_chains": 1,
    "tune_bkd": False,
}


# ----------------------------------------------------------------------------------------------
# Objectives and the student
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Objective:
    """One training loss: ``ce`` (cross-entropy), ``kd`` (CE + weighted-sum forward-KL KD,
    MATH.md section 3) or ``mtbkd`` (CE + the teacher-informed mixture prior, MATH.md section 2;
    one teacher is BKD). ``teachers`` indexes the teacher logits the loss uses."""

    kind: str
    teachers: tuple[int, ...] = ()
    weights: str = "entropy"
    temperature: float = 2.0
    concentration: float = 5.0
    prior_weight: float = 0.02
    hard_label_weight: float = 1.0
    kd_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in ("ce", "kd", "mtbkd"):
            raise ValueError(f"kind must be 'ce', 'kd' or 'mtbkd', got {self.kind!r}")
        if self.kind != "ce" and not self.teachers:
            raise ValueError(f"a {self.kind!r} objective needs at least one teacher")

    def __call__(self, logits: Tensor, teacher_logits: Tensor | None, labels: Tensor) -> Tensor:
        """Mean batch loss; ``teacher_logits`` ``[K, B, C]`` holds this objective's teachers."""
        if self.kind == "ce":
            return F.cross_entropy(logits, labels)
        if self.kind == "kd":
            return mf.multi_teacher_kd_loss(
                logits,
                teacher_logits,
                labels,
                temperature=self.temperature,
                weights=self.weights,
                hard_label_weight=self.hard_label_weight,
                soft_label_weight=self.kd_weight,
                scale_by_t2=True,
            )
        return mf.mtbkd_loss(
            logits,
            teacher_logits,
            labels,
            temperature=self.temperature,
            concentration=self.concentration,
            prior_weight=self.prior_weight,
            hard_label_weight=self.hard_label_weight,
            weights=self.weights,
        )

    def hparams(self) -> dict[str, float | str]:
        """The hyperparameters a grid may tune (they name the objective's checkpoints): for
        ``mtbkd`` with several teachers also ``weights``, which one teacher does not use."""
        if self.kind == "ce":
            return {}
        if self.kind == "kd":
            return {"kd_temperature": self.temperature, "kd_weight": self.kd_weight}
        h: dict[str, float | str] = {
            "temperature": self.temperature,
            "concentration": self.concentration,
            "prior_weight": self.prior_weight,
        }
        if len(self.teachers) > 1:
            h["weights"] = self.weights
        return h


class StudentMLP(nn.Module):
    """The pipeline's student: standardised inputs -> ``hidden`` ReLU layers (``body``) -> a
    linear classifier ``head`` (the part SGLD samples). The input standardisation is stored as
    buffers, so a saved student takes raw features; a feature whose ``std`` is at most 1e-6 of its
    mean's magnitude (constant on the training rows, to float32 rounding) is only centred. The
    bound is relative: a feature on a tiny scale (values near 1e-7) is standardised like any
    other (an absolute bound of 1e-6 had left one that carried all the signal unscaled, and the
    student at chance)."""

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        hidden: Sequence[int] = (128,),
        mean: Tensor | np.ndarray | None = None,
        std: Tensor | np.ndarray | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.num_classes, self.hidden = in_features, num_classes, tuple(hidden)
        mean = torch.zeros(in_features) if mean is None else torch.as_tensor(mean).float()
        std = torch.ones(in_features) if std is None else torch.as_tensor(std).float()
        self.register_buffer("input_mean", mean.clone())
        # a feature constant on the training rows keeps its unit scale (scikit-learn's
        # StandardScaler does the same): dividing by ~0 would turn any other value of it on a new
        # input into a huge activation and a confident, arbitrary prediction
        constant = std <= 1e-6 * mean.abs()  # std 0 of an all-zero feature included
        self.register_buffer("input_std", torch.where(constant, torch.ones_like(std), std))
        layers: list[nn.Module] = []
        d = in_features
        for h in self.hidden:
            layers += [nn.Linear(d, h), nn.ReLU()]
            d = h
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(d, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body((x - self.input_mean) / self.input_std))


def _head_of(model: nn.Module, head: str | None) -> tuple[str, nn.Module]:
    """``(qualified name, module)`` of the part SGLD samples: ``head``, else ``model.head``,
    else the last ``nn.Linear``."""
    if head is not None:
        return head, model.get_submodule(head)
    if isinstance(getattr(model, "head", None), nn.Module):
        return "head", model.head
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("the student has no nn.Linear to sample; pass head=<submodule name>")
    return linears[-1]


def _check_head(model: nn.Module, head: str | None) -> None:
    """``head`` names a submodule of ``model`` with parameters (None: the default choice)."""
    if head is not None and not isinstance(head, str):
        raise TypeError(f"head must be a submodule name or None, got {type(head).__name__}")
    try:
        name, mod = _head_of(model, head)
    except AttributeError:
        raise ValueError(f"head={head!r} names no submodule of the student") from None
    if not any(True for _ in mod.parameters()):
        raise ValueError(f"head={name!r} has no parameters to sample ({type(mod).__name__})")


# ----------------------------------------------------------------------------------------------
# Training loops with checkpoints
# ----------------------------------------------------------------------------------------------


@dataclass
class TrainData:
    """Training rows: features ``x`` ``[N, D]``, labels ``y`` ``[N]`` and the objective's
    teachers' logits ``t`` ``[K, N, C]`` (``None`` for cross-entropy)."""

    x: Tensor
    y: Tensor
    t: Tensor | None = None

    def __post_init__(self) -> None:
        n = self.x.shape[0]
        if self.y.shape != (n,):
            raise ValueError(f"labels must be [N] with N = {n}, got {tuple(self.y.shape)}")
        if self.t is not None and (self.t.dim() != 3 or self.t.shape[1] != n):
            raise ValueError(
                f"teacher logits must be [K, N, C] with N = {n} rows, got {tuple(self.t.shape)}"
            )


@contextlib.contextmanager
def _threads(n: int):
    old = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _save_atomic(obj: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _load_ckpt(path: Path) -> dict | None:
    """The checkpoint at ``path`` (None where there is none), its zip entries' CRCs checked
    first: ``torch.load`` does not check them, and a damaged checkpoint (one flipped bit) had
    been resumed from silently, its garbage weights carried into the results."""
    if not path.is_file():
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:  # truncated, not a zip file
        raise CheckpointCorruptError(_damaged(path, str(exc))) from None
    if bad is not None:
        raise CheckpointCorruptError(_damaged(path, f"its entry {bad} fails its CRC check"))
    try:
        state = torch.load(path, weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError) as exc:
        # a zip of something else, or a torch file holding more than tensors (a whole module)
        why = str(exc).strip().splitlines()
        raise CheckpointCorruptError(
            _damaged(path, f"not a checkpoint of this pipeline: {why[0] if why else exc}")
        ) from None
    missing = [k for k in _CKPT_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointCorruptError(
            _damaged(path, f"not a checkpoint of this pipeline: no {', '.join(missing)}")
        )
    return state


# what every checkpoint _run_epochs_seeded writes holds (since the first)
_CKPT_KEYS = ("epoch", "model", "optimizer", "generator", "rng", "seconds")


def _damaged(path: Path, why: str) -> str:
    return (
        f"checkpoint {path} is damaged ({why}): delete it and resume again (that phase of the "
        "run then starts over), or use another --out / checkpoint directory"
    )


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from: :class:`CheckpointMismatchError` or
    :class:`CheckpointCorruptError`."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint was written by a run with other data or settings than the one resuming it."""


class TrainingDivergedError(FloatingPointError):
    """The student's logits became NaN, +inf, or -inf in every class of a row during training (a
    step too large for the student, or the loss overflowed): the run stops rather than return a
    NaN model. A ``-inf`` logit alone is a class the student rules out (a mask), not a
    divergence."""


def _diverged(logits: Tensor) -> bool:
    """NaN or +inf logits, or a row of -inf only (one host synchronisation)."""
    bad = torch.isnan(logits).any() | torch.isposinf(logits).any()
    return bool(bad | torch.isneginf(logits).all(dim=-1).any())


class CheckpointCorruptError(CheckpointError):
    """A checkpoint file (or the samples file it names) is damaged: truncated, or its contents
    differ from what was written (the zip CRCs of a ``.pt``, the SHA-256 recorded for samples)."""


# The optimizer settings a checkpoint's run depends on (Adam's and SGLD's)
_OPTIM_KEYS = ("lr", "betas", "eps", "weight_decay", "amsgrad", "num_data", "temperature",
               "precondition", "alpha")  # fmt: skip


def _digest(*tensors: Tensor | None) -> str:
    h = hashlib.sha256()
    for t in tensors:
        if t is not None:
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            t = t.detach().cpu().contiguous()
            if t.dtype == torch.bfloat16:  # numpy has no bfloat16: its bytes, as they are
                t = t.view(torch.int16)
            h.update(t.numpy().tobytes())
    return h.hexdigest()


def _fingerprint(data, objective, optimizer, epochs, batch_size, seed, store, monitor) -> dict:
    """What a run of :func:`_run_epochs` depends on besides the starting weights: a checkpoint
    written by a run with other data, objective, optimizer or schedule must not be resumed."""
    fp = {
        # apart, so that a refusal can say which changed (checkpoints before the split: "data")
        "features": _digest(data.x, data.y),
        "teachers": _digest(data.t),
        "objective": repr(objective),
        "optimizer": type(optimizer).__name__,
        **{k: optimizer.defaults[k] for k in _OPTIM_KEYS if k in optimizer.defaults},
        "epochs": epochs,
        "batch_size": batch_size,
        "seed": seed,
    }
    if store is not None:
        st = store.store
        fp["samples"] = (st.burn_in, st.thin, st.max_samples, tuple(st.names))
    if monitor is not None:
        fp["validation"] = _digest(monitor.x, monitor.y)
        fp["patience"] = monitor.patience
    return fp


def _progress(total: int, desc: str, enabled: bool, unit: str = "ep"):
    from tqdm.auto import tqdm

    # disable=None: tqdm switches itself off when stderr is not a terminal (logs, CI)
    return tqdm(total=total, desc=desc, leave=False, disable=None if enabled else True, unit=unit)


def _run_epochs(
    model: nn.Module,
    data: TrainData,
    objective: Objective,
    optimizer: torch.optim.Optimizer,
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    checkpoint: Path | None,
    checkpoint_every: int,
    desc: str,
    progress: bool,
    store=None,
    store_path: Path | None = None,
    callback: Callable[[int], None] | None = None,
    monitor: _EarlyStopping | None = None,
) -> float:
    """Minibatch epochs of ``optimizer`` on ``objective``; returns the seconds spent (including
    those of earlier, interrupted runs). Resumes from ``checkpoint`` when it exists.
    ``monitor`` is called after every epoch and ends the run when it returns True; its state is
    checkpointed with the run's.

    torch's default generator (SGLD draws its noise seeds from it) is forked and seeded with
    ``seed``, so a run is reproducible whatever ran before it and the caller's RNG is untouched.
    """
    with _forked_rng():
        _manual_seed(seed)
        return _run_epochs_seeded(
            model,
            data,
            objective,
            optimizer,
            epochs=epochs,
            batch_size=batch_size,
            seed=seed,
            checkpoint=checkpoint,
            checkpoint_every=checkpoint_every,
            desc=desc,
            progress=progress,
            store=store,
            store_path=store_path,
            callback=callback,
            monitor=monitor,
        )


def _run_epochs_seeded(
    model,
    data,
    objective,
    optimizer,
    *,
    epochs,
    batch_size,
    seed,
    checkpoint,
    checkpoint_every,
    desc,
    progress,
    store,
    store_path,
    callback,
    monitor,
) -> float:
    gen = torch.Generator().manual_seed(seed)
    start, spent = 0, 0.0
    state = _load_ckpt(checkpoint) if checkpoint is not None else None
    fingerprint = None
    if checkpoint is not None:
        fingerprint = _fingerprint(
            data, objective, optimizer, epochs, batch_size, seed, store, monitor
        )
    saved = None if state is None else state.get("fingerprint", fingerprint)
    if saved is not None and "data" in saved and "features" not in saved:  # an older checkpoint
        fingerprint = {k: v for k, v in fingerprint.items() if k not in ("features", "teachers")}
        fingerprint["data"] = _digest(data.x, data.y, data.t)
    if saved is not None and saved != fingerprint:
        keys = sorted(k for k in {*saved, *fingerprint} if saved.get(k) != fingerprint.get(k))
        why = []
        if "features" in keys:
            why.append("the features or labels differ: another --sequence-encoder, or edited data")
        if "teachers" in keys or "data" in keys:
            why.append(
                "the teachers' logits differ: the dataset's teacher files changed or, where the "
                "pipeline trained the teachers, another thread count (num_threads) or another "
                "machine changed them by float rounding"
            )
        why = f" ({'; '.join(why)})" if why else ""
        raise CheckpointMismatchError(
            f"checkpoint {checkpoint} was written by a run with other settings (differing: "
            f"{', '.join(keys)}){why}: resume only with the same data and configuration, or use "
            "another checkpoint directory"
        )
    if state is not None:
        # load_state_dict copies every tensor of a matching shape before it raises on the
        # others: a refused checkpoint must leave the student as it was
        before = {k: v.detach().clone() for k, v in model.state_dict().items()}
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:  # another student (hidden, classes)
            model.load_state_dict(before)
            first = str(exc).strip().splitlines()
            raise CheckpointMismatchError(
                f"checkpoint {checkpoint} holds a student of other shapes (differing: model; "
                f"{first[-1].strip() if first else exc}): resume only with the same data and "
                "configuration, or use another checkpoint directory"
            ) from None
        if monitor is not None and "monitor" in state:
            monitor.load_state(state["monitor"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["rng"])
        # a run its monitor stopped early is finished: no epoch left to train
        start = epochs if state.get("stopped") else int(state["epoch"])
        spent = float(state["seconds"])
        if store is not None:
            store.load_state(store_path, state["store"])
    n = data.x.shape[0]
    t0 = time.perf_counter()
    with _progress(epochs, desc, progress) as bar:
        bar.update(start)
        for epoch in range(start, epochs):
            order = torch.randperm(n, generator=gen)
            for b, idx in enumerate(order.split(batch_size)):
                tb = data.t[:, idx] if data.t is not None else None
                logits = model(data.x[idx])
                if _diverged(logits):  # features and teachers were checked
                    raise TrainingDivergedError(
                        f"{desc}: the student's logits are NaN, +inf or -inf in a whole row at "
                        f"epoch {epoch + 1}, "
                        f"batch {b + 1}: training diverged; lower the learning rate (map_lr, or "
                        "sgld_lr for SGLD) or train the student in float32"
                    )
                loss = objective(logits, tb, data.y[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if store is not None:
                    store.collect()
            bar.update(1)
            done = epoch + 1
            stop = bool(monitor(done)) if monitor is not None else False
            post = {"loss": f"{float(loss.detach()):.4f}"}
            if monitor is not None:
                post["val_nll"] = f"{monitor.best_nll:.4f}"
            bar.set_postfix(post)
            if checkpoint is not None and (done % checkpoint_every == 0 or done == epochs or stop):
                ckpt = {
                    "epoch": done,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "generator": gen.get_state(),
                    "rng": torch.get_rng_state(),
                    "seconds": spent + time.perf_counter() - t0,
                    "store": store.state(store_path) if store is not None else {},
                    "stopped": stop,
                    "fingerprint": fingerprint,
                }
                if monitor is not None:
                    ckpt["monitor"] = monitor.state()
                _save_atomic(ckpt, checkpoint)
            if callback is not None:
                callback(done)
            if stop:
                break
    return spent + time.perf_counter() - t0


def _cuda_up() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def _forked_rng():
    """``torch.random.fork_rng`` of the CPU generator and, where CUDA is in use, every CUDA
    device's: the caller's random state is neither used nor changed (forking the CPU's alone left
    a CUDA caller's generator at the run's seed)."""
    devices = list(range(torch.cuda.device_count())) if _cuda_up() else []
    return torch.random.fork_rng(devices=devices)


def _manual_seed(seed: int) -> None:
    """``torch.manual_seed`` of the generators :func:`_forked_rng` forks: not a CUDA generator
    that is not in use yet (``torch.manual_seed`` queues a seed for it, applied when the caller
    starts CUDA later, outside the fork)."""
    torch.random.default_generator.manual_seed(seed)
    if _cuda_up():
        torch.cuda.manual_seed_all(seed)


def _train_mode(model: nn.Module) -> None:
    """``model.train()``, except the submodules whose parameters the caller froze (every one
    ``requires_grad=False``): they run in eval mode, so a frozen body's batch-norm statistics and
    dropout stay as they are (a frozen body is used, not trained)."""
    model.train()
    for m in _frozen_modules(model):
        m.eval()


def _frozen_modules(model: nn.Module) -> list[nn.Module]:
    """The submodules whose parameters the caller froze (every one ``requires_grad=False``)."""
    out = []
    for m in model.modules():
        params = list(m.parameters())
        if m is not model and params and not any(p.requires_grad for p in params):
            out.append(m)
    return out


@contextlib.contextmanager
def _one_value_batch_norms(model: nn.Module):
    """Yields a list that a forward inside the block fills with the names of the batch norms
    that would normalise one value per channel with that batch's own statistics in training
    (:func:`_train_mode`: not inside a frozen submodule, or without running statistics)."""
    frozen = {id(s) for m in _frozen_modules(model) for s in m.modules()}
    found: list[str] = []
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and (
            id(m) not in frozen or not m.track_running_stats
        ):

            def pre(mod, args, name=name):
                h = args[0]  # one value per channel in each row: a one-row batch has one
                if h.dim() >= 2 and h.numel() == h.shape[0] * h.shape[1]:
                    found.append(name or type(mod).__name__)

            hooks.append(m.register_forward_pre_hook(pre))
    try:
        yield found
    finally:
        for h in hooks:
            h.remove()


class _EarlyStopping:
    """Validation NLL after every epoch: keeps a copy of the best weights, asks to stop after
    ``patience`` epochs without improvement (never, for ``patience`` 0)."""

    def __init__(self, model: nn.Module, x: Tensor, y: Tensor, patience: int, chunk: int) -> None:
        self.model, self.x, self.y, self.patience, self.chunk = model, x, y, patience, chunk
        self.best_nll, self.best_epoch, self.best_state = math.inf, 0, None

    def __call__(self, epoch: int) -> bool:
        from mtbkd import metrics as M

        nll = float(M.nll(predict_probs(self.model, self.x, None, self.chunk), self.y))
        _train_mode(self.model)
        if nll < self.best_nll:
            self.best_nll, self.best_epoch = nll, epoch
            self.best_state = copy.deepcopy(self.model.state_dict())
        return self.patience > 0 and epoch - self.best_epoch >= self.patience

    def state(self) -> dict:
        return {"nll": self.best_nll, "epoch": self.best_epoch, "model": self.best_state}

    def load_state(self, state: dict) -> None:
        self.best_nll, self.best_epoch = float(state["nll"]), int(state["epoch"])
        self.best_state = state["model"]

    def restore(self) -> None:
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)


class _Samples:
    """The SampleStore of one SGLD run (the head's parameters, named as in the whole model so
    that :func:`mtbkd.posterior.predict` can swap them in) and its checkpointing."""

    def __init__(
        self, model: nn.Module, prefix: str, burn_in: int, thin: int, max_samples: int
    ) -> None:
        from mtbkd.posterior import SampleStore

        self.model = model
        head = model.get_submodule(prefix) if prefix else model
        # a float64 head's samples in float64 (float32 holds a bfloat16 or float32 one exactly)
        wide = any(p.dtype == torch.float64 for p in head.parameters())
        self.store = SampleStore(
            model,
            burn_in=burn_in,
            thin=thin,
            max_samples=max_samples,
            include=f"{prefix}.*" if prefix else None,
            dtype=torch.float64 if wide else torch.float32,
        )
        # the samples file of the checkpoint on disk (kept until a newer checkpoint replaces it)
        self._previous: str | None = None

    def collect(self) -> None:
        self.store.collect()

    def state(self, path: Path | None) -> dict:
        """Save the samples for a checkpoint about to be written, to a file of their own
        (``<stem>.<calls>.safetensors``, named by the collect() count): the checkpoint that is on
        disk until the new one replaces it keeps pointing at its own file, so an interruption
        between the two writes never pairs a checkpoint with another one's samples. Files older
        than the previous checkpoint's are removed."""
        if path is None:
            raise ValueError("a checkpointed SGLD run needs a samples path")
        target = path.with_name(f"{path.stem}.{self.store.calls}{path.suffix}")
        tmp = target.with_name(target.name + ".tmp")
        self.store.save(tmp)  # the file keeps the burn-in/thinning counters too
        digest = file_sha256(tmp)  # checked on resume: safetensors keeps no checksum
        os.replace(tmp, target)
        keep = {target.name, self._previous}
        for old in path.parent.glob(f"{path.stem}.*{path.suffix}"):
            if old.name not in keep:
                old.unlink(missing_ok=True)
        self._previous = target.name
        return {"samples": len(self.store), "file": target.name, "sha256": digest}

    def load_state(self, path: Path | None, state: dict) -> None:
        from mtbkd.posterior import SampleStore

        if path is not None and "file" in state:
            path = path.with_name(state["file"])
            self._previous = path.name
        if path is None or not path.is_file():
            raise CheckpointCorruptError(
                f"the checkpoint's samples file {path} is missing: delete the checkpoint beside it "
                "and resume again (that phase of the run then starts over), or use another --out "
                "/ checkpoint directory"
            )
        if "sha256" in state and file_sha256(path) != state["sha256"]:  # older ones lack it
            raise CheckpointCorruptError(
                _damaged(path, "its SHA-256 is not the one its checkpoint recorded")
            )
        from safetensors import SafetensorError

        try:
            store = SampleStore.load(path, self.model)
        # truncated (unreadable as safetensors), or its metadata damaged (a ValueError)
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointCorruptError(_damaged(path, f"{type(exc).__name__}: {exc}")) from None
        if len(store) != state["samples"]:
            raise CheckpointCorruptError(
                _damaged(path, f"it holds {len(store)} samples, its checkpoint {state['samples']}")
            )
        self.store = store


def train_map(
    model: nn.Module,
    data: TrainData,
    objective: Objective,
    config: DistillConfig,
    *,
    checkpoint_dir: str | Path | None = None,
    desc: str = "MAP",
    callback: Callable[[int], None] | None = None,
    validation: tuple[Tensor, Tensor] | None = None,
) -> float:
    """MAP warm start: Adam on the mean objective (MATH.md section 7's first phase). Returns the
    seconds spent; resumes from ``checkpoint_dir`` when a checkpoint is there.

    With ``validation`` ``(x, y)`` and ``config.early_stopping``, the model ends with the weights
    of the epoch of lowest validation NLL, and training stops ``config.patience`` epochs after
    it."""
    _train_mode(model)
    # the parameters the caller froze (requires_grad False, a pretrained body) stay frozen
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the student has no parameter that requires grad: nothing to train")
    opt = torch.optim.Adam(trainable, lr=config.map_lr, weight_decay=config.weight_decay)
    ckpt = None
    if checkpoint_dir is not None:
        Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
        ckpt = Path(checkpoint_dir) / "map.pt"
    monitor = None
    if validation is not None and config.early_stopping:
        vx, vy = validation
        vx, vy = torch.as_tensor(vx).to(_float_dtype(model)), torch.as_tensor(vy).long()
        if vx.dim() != 2 or vx.shape[0] != vy.shape[0] or vx.shape[1] != data.x.shape[1]:
            raise ValueError(
                f"validation must be (x [M, {data.x.shape[1]}], y [M]), got shapes "
                f"{tuple(vx.shape)} and {tuple(vy.shape)}"
            )
        monitor = _EarlyStopping(model, vx, vy, config.patience, config.predict_chunk)
    seconds = _run_epochs(
        model,
        data,
        objective,
        opt,
        epochs=config.map_epochs,
        batch_size=config.batch_size,
        seed=config.seed,
        checkpoint=ckpt,
        checkpoint_every=config.checkpoint_every,
        desc=desc,
        progress=config.progress,
        callback=callback,
        monitor=monitor,
    )
    if monitor is not None:
        monitor.restore()
    return seconds


def sgld_schedule(num_rows: int, config: DistillConfig) -> tuple[int, int, int]:
    """``(burn_in, thin, max_samples)`` in SGLD steps: after the burn-in, one sample every
    ``thin = (steps after burn-in) // num_samples`` steps (at least 1) until ``num_samples`` are
    kept (fewer steps after the burn-in than ``num_samples``: every step is kept, and a warning
    says how many). The integer ``thin`` can leave the last steps unsampled: with 144 steps
    after the burn-in and 100 samples, ``thin`` is 1 and the last 44 steps only move the chain."""
    steps = config.sgld_epochs * math.ceil(num_rows / config.batch_size)
    burn = int(config.burn_in * steps)
    if steps - burn < config.num_samples:
        warnings.warn(
            f"num_samples={config.num_samples}, but SGLD runs only {steps - burn} steps after its "
            f"burn-in ({config.sgld_epochs} epochs of {math.ceil(num_rows / config.batch_size)} "
            f"batches, burn_in {config.burn_in:g}): each chain keeps {steps - burn} samples. "
            "Raise sgld_epochs or lower num_samples",
            stacklevel=2,
        )
    thin = max(1, (steps - burn) // config.num_samples)
    return burn, thin, config.num_samples


def train_sgld(
    model: nn.Module,
    data: TrainData,
    objective: Objective,
    config: DistillConfig,
    *,
    sgld_lr: float | None = None,
    prior_precision: float | None = None,
    head: str | None = None,
    checkpoint_dir: str | Path | None = None,
    desc: str = "SGLD",
    callback: Callable[[int], None] | None = None,
):
    """SGLD on the student's head (MATH.md section 7) from its current (MAP) weights, the body
    frozen. Returns ``(store, seconds)``; resumes from ``checkpoint_dir`` without losing samples.
    ``sgld_lr`` / ``prior_precision`` override the config's ``sgld_lr`` /
    ``sgld_prior_precision``. The model ends (trained or not: an error too) with the
    ``requires_grad`` flags and the train / eval modes it came in with."""
    prefix, head_mod = _head_of(model, head)
    flags = [p.requires_grad for p in model.parameters()]  # restored at the end
    modes = [(m, m.training) for m in model.modules()]
    try:
        return _train_sgld(
            model, data, objective, config, sgld_lr, prior_precision, prefix, head_mod,
            checkpoint_dir, desc, callback,
        )  # fmt: skip
    finally:
        for p, flag in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(flag)
        for m, training in modes:
            m.training = training


def _train_sgld(
    model, data, objective, config, sgld_lr, prior_precision, prefix, head_mod, checkpoint_dir,
    desc, callback,
):  # fmt: skip
    from mtbkd.optim import SGLD

    lr = config.sgld_lr if sgld_lr is None else sgld_lr
    for p in model.parameters():
        p.requires_grad_(False)
    for p in head_mod.parameters():
        p.requires_grad_(True)
    # eval(): the frozen body must be deterministic (dropout / batch norm would move the features)
    model.eval()
    n = data.x.shape[0]
    prior = config.sgld_prior_precision if prior_precision is None else prior_precision
    if prior is None:
        prior = n * config.weight_decay
    opt = SGLD(
        head_mod.parameters(),
        lr=lr / n,
        num_data=n,
        temperature=config.sgld_temperature,
        weight_decay=prior,
        precondition=config.sgld_precondition,
    )
    burn, thin, max_samples = sgld_schedule(n, config)
    samples = _Samples(model, prefix, burn, thin, max_samples)
    ckpt = path = None
    if checkpoint_dir is not None:
        Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
        ckpt = Path(checkpoint_dir) / "sgld.pt"
        path = Path(checkpoint_dir) / "sgld_samples.safetensors"
    seconds = _run_epochs(
        model,
        data,
        objective,
        opt,
        epochs=config.sgld_epochs,
        batch_size=config.batch_size,
        seed=config.seed + 1,
        checkpoint=ckpt,
        checkpoint_every=config.checkpoint_every,
        desc=desc,
        progress=config.progress,
        store=samples,
        store_path=path,
        callback=callback,
    )
    return samples.store, seconds


class ChainSamples:
    """Posterior samples of several SGLD chains. Each chain keeps its own weights once (its MAP
    warm start's body, which SGLD does not move) and the :class:`~mtbkd.posterior.SampleStore`
    of its sampled head, so memory grows with the head samples, not with samples x model size.

    ``len()`` is the total number of samples; :meth:`predict` gives ``[S, N, C]`` with the chains'
    samples in order (chain 0 first)."""

    def __init__(self, chains: Sequence[tuple[Mapping[str, Tensor], Any]]) -> None:
        if not chains:
            raise ValueError("ChainSamples needs at least one chain")
        self.chains = [({k: v.detach().clone() for k, v in st.items()}, store)
                       for st, store in chains]  # fmt: skip

    def __len__(self) -> int:
        return sum(len(store) for _, store in self.chains)

    @torch.no_grad()
    def predict(self, model: nn.Module, x: Tensor, chunk: int = 50) -> Tensor:
        """Every chain's samples on ``x`` (``model`` is the architecture; its weights and its
        modules' train / eval modes are restored afterwards)."""
        from mtbkd.posterior import predict

        own = {k: v.clone() for k, v in model.state_dict().items()}
        modes = [(m, m.training) for m in model.modules()]  # given back, as predict() does
        model.eval()
        try:
            outs = []
            for state, store in self.chains:
                model.load_state_dict(state)
                outs.append(predict(model, store, x, chunk=chunk))
        finally:
            model.load_state_dict(own)
            for m, training in modes:
                m.training = training
        return torch.cat(outs)

    def save(self, out_dir: str | Path) -> list[str]:
        """``chain<c>_student.safetensors`` and ``chain<c>_samples.safetensors`` per chain;
        returns the file names."""
        from mtbkd._files import save_safetensors

        out, names = Path(out_dir), []
        for c, (state, store) in enumerate(self.chains):
            save_safetensors({k: v.contiguous() for k, v in state.items()},
                             out / f"chain{c}_student.safetensors")  # fmt: skip
            store.save(out / f"chain{c}_samples.safetensors")
            names += [f"chain{c}_student.safetensors", f"chain{c}_samples.safetensors"]
        return names

    @classmethod
    def load(cls, run_dir: str | Path, num_chains: int, model: nn.Module) -> ChainSamples:
        from safetensors.torch import load_file

        from mtbkd.posterior import SampleStore

        run, chains = Path(run_dir), []
        for c in range(num_chains):
            path = run / f"chain{c}_student.safetensors"
            if not path.is_file():
                raise FileNotFoundError(f"{run} lacks {path.name} (chain {c} of {num_chains})")
            chains.append(
                (
                    load_file(str(path)),
                    SampleStore.load(run / f"chain{c}_samples.safetensors", model),
                )
            )
        return cls(chains)


def pool_chains(chains: Sequence[tuple[nn.Module, Any]]) -> Any:
    """The samples of every chain as one :class:`ChainSamples` (each chain's model weights with
    its head samples); a single chain's store is returned as it is. :func:`predict_probs`
    evaluates either."""
    if len(chains) == 1:
        return chains[0][1]
    return ChainSamples([(model.state_dict(), store) for model, store in chains])


def _reinitialised(template: nn.Module, seed: int) -> nn.Module:
    """A copy of ``template`` with every layer's parameters drawn afresh under ``seed`` (layers
    with a ``reset_parameters`` method, as torch's own have; parameters of other modules, and
    layers whose parameters the caller froze, keep the template's values)."""
    model = copy.deepcopy(template)
    # everything inside a submodule the caller froze (a pretrained body) keeps its state in
    # every chain: its layers' weights, and the running statistics of a batch norm of no
    # parameters of its own (affine=False), whose reset_parameters() set them to 0 and 1
    frozen = {id(s) for m in _frozen_modules(model) for s in m.modules()}
    with _forked_rng():
        _manual_seed(seed)
        for m in model.modules():
            own = list(m.parameters(recurse=False))
            if (hasattr(m, "reset_parameters") and id(m) not in frozen
                    and all(p.requires_grad for p in own)):  # fmt: skip
                m.reset_parameters()
    return model


def more_chains(
    template: nn.Module,
    data: TrainData,
    objective: Objective,
    config: DistillConfig,
    *,
    sgld_lr: float | None = None,
    prior_precision: float | None = None,
    head: str | None = None,
    checkpoint_dir: str | Path | None = None,
    validation: tuple[Tensor, Tensor] | None = None,
    desc: str = "",
) -> tuple[list[tuple[nn.Module, Any]], float]:
    """Chains ``1 .. num_chains - 1``: for each, a fresh initialisation of ``template``'s
    architecture (seed ``config.seed + c``), its own MAP warm start and SGLD run. Returns the
    ``(model, store)`` pairs and the seconds spent; checkpoints under ``chain<c>/``."""
    chains, seconds = [], 0.0
    for c in range(1, config.num_chains):
        cfg = replace(config, seed=config.seed + c)
        model = _reinitialised(template, cfg.seed)
        ck = None if checkpoint_dir is None else Path(checkpoint_dir) / f"chain{c}"
        seconds += train_map(
            model, data, objective, cfg, checkpoint_dir=ck, desc=f"{desc} MAP chain {c}",
            validation=validation,
        )  # fmt: skip
        store, sec = train_sgld(
            model, data, objective, cfg, sgld_lr=sgld_lr, prior_precision=prior_precision,
            head=head, checkpoint_dir=ck, desc=f"{desc} SGLD chain {c}",
        )  # fmt: skip
        chains.append((model, store))
        seconds += sec
    return chains, seconds


# ----------------------------------------------------------------------------------------------
# Prediction and metrics
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def predict_probs(model: nn.Module, x: Tensor, store=None, chunk: int = 50) -> Tensor:
    """Per-sample class probabilities ``[S, N, C]`` (``S = 1`` without samples: the MAP)."""
    model.eval()
    if store is None:
        return torch.softmax(model(x).float(), dim=-1).unsqueeze(0)
    if isinstance(store, ChainSamples):
        return store.predict(model, x, chunk)
    from mtbkd.posterior import predict

    return predict(model, store, x, chunk=chunk)


ECE_FLOOR_DRAWS = 200


def evaluate_probs(probs: Tensor, labels: Tensor, level: float = 0.95) -> dict[str, float]:
    """The comparison table's metrics (MATH.md section 8) of sample probabilities ``[S, N, C]``:
    accuracy, NLL, ECE, Brier, mean deviance, ``level`` credible-set coverage and mean size, and
    the AUROC of the predictive entropy for telling wrong predictions from right ones; and two
    for reading the ECE (:func:`mtbkd.metrics.calibrated_ece`, :data:`ECE_FLOOR_DRAWS` draws):
    ``ece_floor``, the ECE a perfectly calibrated model with these predictions is expected to
    score on these rows (the mean of the draws), and ``ece_p``, ``(1 + the draws at or above
    the observed ECE) / (1 + draws)``, a p-value of "calibrated" (small: miscalibration the test
    rows can detect); and ``overconfidence``, the mean confidence minus the accuracy (its
    direction: below 0, under-confident)."""
    from mtbkd import metrics as M

    M._samples(probs)  # [S, N, C] (a [N, C] one sample), checked by name
    if probs.dim() == 2:
        probs = probs.unsqueeze(0)
    # in its own dtype: each metric checks the rows' sums to within that dtype's rounding (a cast
    # to float32 first held bfloat16 probabilities to float32's tolerance, and refused them)
    return _metrics_of_rows(_row_stats(probs, labels, level), labels)


def shift_auroc(probs: Tensor, shift_probs: Tensor) -> float:
    """AUROC of the predictive entropy (MATH.md section 8) for telling shifted inputs from test
    rows: sample probabilities ``[S, N, C]`` on the test rows and ``[S, M, C]`` on the shifted
    inputs (or ``[N, C]`` / ``[M, C]``). 0.5 is chance, 1 a perfect separation."""
    from mtbkd import metrics as M

    if probs.dim() == 2:
        probs = probs.unsqueeze(0)
    if shift_probs.dim() == 2:
        shift_probs = shift_probs.unsqueeze(0)
    if probs.shape[-1] != shift_probs.shape[-1]:
        raise ValueError(
            f"probs has {probs.shape[-1]} classes but shift_probs has {shift_probs.shape[-1]}"
        )
    h_in = M.predictive_entropy(probs)
    h_shift = M.predictive_entropy(shift_probs)
    shifted = torch.cat(
        [torch.zeros(len(h_in), dtype=torch.bool), torch.ones(len(h_shift), dtype=torch.bool)]
    )
    return float(M.auroc(torch.cat([h_in, h_shift]), shifted))


def _row_stats(probs: Tensor, labels: Tensor, level: float = 0.95) -> dict[str, Tensor]:
    """What :func:`evaluate_probs` needs of each row (its metrics are means over rows, or ECE and
    AUROC over per-row values), so that blocks of rows can be evaluated one at a time and
    concatenated: the predictive mean, the row NLL, mean deviance, credible-set coverage and
    size."""
    from mtbkd import metrics as M

    labels = M._labels(labels, probs.shape[-2], probs.shape[-1])  # integer, in range (no .long())
    sets = M.credible_set(probs, level)
    pbar = M.mean_probs(probs)  # float32 (float64 kept)
    if torch.finfo(probs.dtype).eps > torch.finfo(torch.float32).eps:
        # the mean of bfloat16 / float16 rows sums to 1 only to within their rounding, which the
        # metrics of the float32 mean below would hold to float32's tolerance: renormalised
        pbar = pbar / pbar.sum(-1, keepdim=True)
    return {
        "pbar": pbar,
        "nll": M.row_nll(probs, labels),
        "mean_deviance": M.mean_deviance(probs),
        "covered": sets.gather(-1, labels[:, None]).squeeze(-1),
        "set_size": sets.sum(-1),
    }


def ece_p_value(draws: Tensor, ece: float) -> float:
    """Monte Carlo p-value of an observed ECE against the ECEs ``draws`` of a calibrated model
    (:func:`mtbkd.metrics.calibrated_ece`): ``(1 + the draws at or above it) / (1 + draws)``,
    never 0, and at most alpha under calibration with probability alpha. A draw equal to ``ece``
    up to float32 rounding counts as at or above it: the two ECEs are summed in different orders,
    and an exact tie read a rounding step below lowered the p-value."""
    at_or_above = draws.double() >= ece - 1e-6 * max(abs(ece), 1e-12)
    return (1 + int(at_or_above.sum())) / (1 + draws.numel())


def _metrics_of_rows(stats: dict[str, Tensor], labels: Tensor) -> dict[str, float]:
    from mtbkd import metrics as M

    labels = M._labels(labels, *stats["pbar"].shape)
    pbar = stats["pbar"].unsqueeze(0)  # the metrics below only use the predictive mean
    wrong = stats["pbar"].argmax(-1) != labels
    unc = M.predictive_entropy(pbar)
    # undefined when every prediction is right (or wrong)
    auroc = float(M.auroc(unc, wrong)) if 0 < int(wrong.sum()) < len(labels) else float("nan")
    ece = float(M.ece(pbar, labels))
    # the ECE a calibrated model with these predictions would score on these rows (on the CPU,
    # with a fixed generator: the same numbers on every run and device)
    g = torch.Generator().manual_seed(0)
    floor = M.calibrated_ece(pbar.cpu(), ECE_FLOOR_DRAWS, generator=g)
    return {
        "accuracy": float(M.accuracy(pbar, labels)),
        "nll": float(stats["nll"].mean()),
        "ece": ece,
        # the direction of the miscalibration: mean confidence minus accuracy (< 0: under-)
        "overconfidence": float(
            stats["pbar"].max(-1).values.float().mean() - (~wrong).float().mean()
        ),
        "ece_floor": float(floor.mean()),
        "ece_p": ece_p_value(floor, ece),
        "brier": float(M.brier(pbar, labels)),
        "mean_deviance": float(stats["mean_deviance"].mean()),
        "coverage": float(stats["covered"].float().mean()),
        "set_size": float(stats["set_size"].float().mean()),
        "auroc_error": auroc,
    }


def _credible_rows(probs: Tensor, level: float = 0.95) -> Tensor:
    """Boolean membership ``[N, C]`` of each row's credible set."""
    from mtbkd import metrics as M

    return M.credible_set(probs, level)


@torch.no_grad()
def teacher_attribution(
    probs: Tensor, teacher_logits: Tensor, objective: Objective
) -> tuple[Tensor, Tensor]:
    """Per-example teacher weights and responsibilities ``[K, N]`` of an MT-BKD objective
    (MATH.md section 2: ``r_k = softmax_k(log w_k + C_k − L_k)``), the responsibilities averaged
    over the posterior samples ``probs`` ``[S, N, C]``. ``teacher_logits`` ``[K, N, C]``: every
    teacher; K is the objective's teachers (``objective.teachers``: one for ``bkd_<i>``, the
    average for ``avg_bkd``)."""
    if objective.kind != "mtbkd":
        raise ValueError(
            f"teacher_attribution needs an MT-BKD (or BKD) objective; a {objective.kind!r} "
            "objective has no responsibilities"
        )
    probs, teacher_logits = _as_tensor(probs), _as_tensor(teacher_logits)  # numpy's too
    if probs.dim() != 3:
        raise ValueError(f"probs must be [S, N, C], got shape {tuple(probs.shape)}")
    s, n, c = probs.shape
    if teacher_logits.dim() != 3 or tuple(teacher_logits.shape[1:]) != (n, c):
        raise ValueError(
            f"teacher_logits must be [K, N={n}, C={c}] (the rows and classes of probs), got "
            f"{tuple(teacher_logits.shape)}"
        )
    # the objective's own teachers (bkd_<i>: one; avg_bkd: the average, index K)
    idx, k_all = list(objective.teachers), teacher_logits.shape[0]
    if idx == [k_all]:
        teacher_logits = average_teacher_logits(teacher_logits)[None]
    elif max(idx) >= k_all:
        raise ValueError(f"the objective uses teachers {idx} but teacher_logits holds {k_all}")
    else:
        teacher_logits = teacher_logits[idx]
    k = teacher_logits.shape[0]
    logits = probs.clamp_min(1e-30).log().reshape(s * n, c).double()
    t = teacher_logits.double().unsqueeze(1).expand(k, s, n, c).reshape(k, s * n, c)
    _, stats = mf.mtbkd_loss(
        logits,
        t,
        None,
        temperature=objective.temperature,
        concentration=objective.concentration,
        prior_weight=objective.prior_weight,
        weights=objective.weights,
        reduction="none",
        return_stats=True,
    )
    w = stats.weights.reshape(k, s, n).mean(1).float()
    r = stats.responsibilities.reshape(k, s, n).mean(1).float()
    return w, r


# ----------------------------------------------------------------------------------------------
# One student, one method
# ----------------------------------------------------------------------------------------------


@dataclass
class DistillResult:
    """A trained student: ``model`` (for a point estimate its MAP weights; after SGLD the head
    holds the chain's last step, which need not be a kept sample: predict with ``store``), the
    posterior ``store`` (``None`` for a point estimate), the objective, the seconds spent, and the
    predictive ``temperature`` (1: none; :meth:`calibrate` fits one)."""

    model: nn.Module
    store: Any
    objective: Objective
    seconds: float
    map_seconds: float
    chunk: int = 50
    temperature: float = 1.0

    def predict(self, x: Tensor) -> Tensor:
        """Per-sample probabilities ``[S, N, C]``, tempered by :attr:`temperature`
        (:func:`mtbkd.metrics.temper`)."""
        from mtbkd import metrics as M

        x = _features_for(self.model, x, "x")
        probs = predict_probs(self.model, x, self.store, self.chunk)
        return probs if self.temperature == 1.0 else M.temper(probs, self.temperature)

    def calibrate(self, x: Tensor, y: Tensor) -> float:
        """Post-hoc temperature scaling: fit :attr:`temperature` on held-out rows ``(x, y)`` (a
        validation split, never the test rows) by the NLL of the untempered predictive's
        samples (:func:`mtbkd.metrics.fit_temperature`); returns it. Later :meth:`predict` and
        :meth:`evaluate` calls use it."""
        from mtbkd import metrics as M

        x = _features_for(self.model, x, "x")
        probs = predict_probs(self.model, x, self.store, self.chunk)
        self.temperature = M.fit_temperature(probs, _labels_for(y, probs.shape[-1], "y", len(x)))
        return self.temperature

    def evaluate(self, x: Tensor, y: Tensor) -> dict[str, float]:
        """The comparison table's metrics (:func:`evaluate_probs`) on ``(x, y)`` (labels as
        :func:`distill` takes them: integers, or floats of whole values)."""
        probs = self.predict(x)
        return evaluate_probs(probs, _labels_for(y, probs.shape[-1], "y", probs.shape[1]))


def _float_dtype(module: nn.Module) -> torch.dtype:
    """The dtype a module's inputs take: that of its first floating-point parameter (float32
    for a module without one)."""
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _logits_of(module: nn.Module, x: Tensor, name: str) -> Tensor:
    """``module(x)`` in eval mode without gradients (``x`` in the module's dtype), its training
    mode restored after; the output must be a logits tensor ``[N, C]``."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            out = module(x.to(_float_dtype(module)))
    finally:
        module.train(was_training)
    if not isinstance(out, Tensor):
        raise TypeError(
            f"{name} must return a logits tensor [N, C], got {type(out).__name__} (wrap a model "
            "that returns a tuple or an output object in a module that returns its logits)"
        )
    if out.dim() != 2 or out.shape[0] != x.shape[0]:
        raise ValueError(f"{name} must return logits [N={x.shape[0]}, C], got {tuple(out.shape)}")
    return out


def _teacher_tensor(teachers, x: Tensor) -> Tensor:
    if isinstance(teachers, Tensor):
        t = teachers
    elif isinstance(teachers, Mapping):
        t = _teacher_tensor(list(teachers.values()), x)
    else:
        outs = []
        for i, tch in enumerate(teachers):
            if isinstance(tch, nn.Module):  # evaluated once, then cached as logits
                outs.append(_logits_of(tch, x, f"teachers[{i}]"))
                continue
            try:
                o = _as_tensor(tch)
            except (TypeError, ValueError, RuntimeError) as exc:  # strings, ragged lists
                raise TypeError(
                    f"teachers[{i}] must be logits [N, C] (a tensor, an array, or a teacher "
                    f"module), got {type(tch).__name__} ({exc})"
                ) from None
            outs.append(_real_logits(o, f"teachers[{i}]"))
        if not outs:
            raise ValueError("teachers must hold at least one teacher")
        widths = [tuple(o.shape) for o in outs]
        if len(set(widths)) > 1:
            raise ValueError(f"every teacher must give logits of one shape [N, C], got {widths}")
        t = torch.stack([o.float() for o in outs])
    t = _real_logits(t, "teacher logits")
    if t.dim() != 3 or t.shape[1] != x.shape[0]:
        raise ValueError(
            f"teacher logits must be [K, N, C] with N = {x.shape[0]} rows (one per example), "
            f"got {tuple(t.shape)}"
        )
    t = t.float()  # checked after the cast: float64 logits beyond float32's range become inf
    if not torch.isfinite(t).all():
        raise ValueError("teacher logits have NaN or infinite values (or values beyond float32)")
    return t


def _real_logits(t: Tensor, name: str) -> Tensor:
    """``t`` if it holds real numbers: a complex tensor's ``.float()`` drops the imaginary part
    (a warning only) and a bool one becomes 0/1 "logits"."""
    if t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must hold real numbers, got dtype {t.dtype}")
    return t


METHOD_KINDS = ("ce", "avg_kd", "entropy_kd", "avg_bkd", "mtbkd_map", "mtbkd_sgld")


def _as_tensor(a) -> Tensor:
    """A tensor as it is (any device), anything else (a NumPy array, a list) as a CPU tensor."""
    return a if isinstance(a, Tensor) else torch.as_tensor(np.asarray(a))


def _features_for(model: nn.Module, x, name: str) -> Tensor:
    """``x`` (a tensor or an array) as the features ``[N, D]`` ``model`` takes: in the dtype of
    its parameters (float32 for a float32 model; integers and float64 arrays converted), cut
    from any autograd graph it came with (an encoder's output: the pipeline trains the student,
    not what made its features)."""
    x = _as_tensor(x).detach()
    if x.dim() != 2:
        raise ValueError(f"{name} must be [N, D], got shape {tuple(x.shape)}")
    if x.is_complex() or x.dtype == torch.bool:
        raise TypeError(f"{name} must hold real numbers, got dtype {x.dtype}")
    x = x.to(_float_dtype(model))
    d = _input_features(model)
    if d is not None and x.shape[1] != d:
        raise ValueError(f"{name} has {x.shape[1]} features; the student takes {d}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} has NaN or infinite features")
    return x


def _input_features(model: nn.Module) -> int | None:
    """How many features ``model`` takes, where that is certain: its ``in_features`` (an
    ``nn.Linear``'s, StudentMLP's), or that of the first layer of an ``nn.Sequential`` (nested
    ones followed), which its input reaches first; ``None`` for any other model, whose own
    forward may transform its input before any layer (its error then reports a mismatch)."""
    while isinstance(model, nn.Sequential) and len(model) > 0:
        model = model[0]
    if isinstance(model, nn.LazyLinear):
        return None
    d = getattr(model, "in_features", None)
    return d if isinstance(d, int) and not isinstance(d, bool) else None


def _labels_for(y, num_classes: int, name: str, rows: int) -> Tensor:
    """``y`` as class indices ``[N]`` in ``0..num_classes - 1``: integers, or floats of whole
    values (``np.loadtxt``'s and pandas' labels, which :mod:`mtbkd.data` takes too); a fractional
    label was truncated by ``.long()``, a label out of range failed deep inside torch or, -100,
    was skipped."""
    y = _as_tensor(y)
    if y.is_complex() or y.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer class indices, got dtype {y.dtype}")
    if tuple(y.shape) != (rows,):
        raise ValueError(f"{name} must be [N] with N = {rows} rows, got shape {tuple(y.shape)}")
    if y.is_floating_point():
        if rows and not bool((torch.isfinite(y) & (y == y.round())).all()):
            raise TypeError(f"{name} must hold integer class indices, got dtype {y.dtype} with "
                            "fractional or non-finite values")  # fmt: skip
        if rows and float(y.abs().max()) >= 2.0**62:
            raise ValueError(f"{name} has labels too large for class indices")
        y = y.double().long()
    if y.dtype in (torch.uint16, torch.uint32, torch.uint64):  # min/max fail on them
        y = y.long()
    if rows and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(
            f"{name} must lie in 0..{num_classes - 1} (the student's {num_classes} classes), "
            f"got {int(y.min())}..{int(y.max())}"
        )
    return y.long()


def distill(
    student: nn.Module,
    teachers: Tensor | Sequence[Tensor | nn.Module] | Mapping[str, Tensor | nn.Module] | None,
    x: Tensor,
    y: Tensor,
    config: DistillConfig | None = None,
    *,
    method: str = "mtbkd_sgld",
    head: str | None = None,
    checkpoint_dir: str | Path | None = None,
    validation: tuple[Tensor, Tensor] | None = None,
) -> DistillResult:
    """Train ``student`` (in place) on ``(x, y)`` with one method and return the result.

    ``teachers``: logits ``[K, N, C]`` aligned with ``x``, a sequence/mapping of ``[N, C]``
    logits, or teacher modules (evaluated once on ``x``). ``method``: ``ce``, ``avg_kd``,
    ``entropy_kd``, ``bkd_<i>`` (single-teacher BKD with teacher i, sampled), ``avg_bkd``
    (single-teacher BKD from the teachers' averaged prediction, :func:`average_teacher_logits`,
    sampled), ``mtbkd_map`` or ``mtbkd_sgld``. ``head`` names the submodule SGLD samples
    (default ``student.head`` or the last ``nn.Linear``). ``validation`` ``(x_val, y_val)``:
    held-out rows for the MAP phase's early stopping (``config.early_stopping``,
    ``config.patience``). With ``config.num_chains > 1`` a sampled method runs further chains
    from fresh initialisations of the student's architecture (:func:`more_chains`);
    ``result.store`` is then a :class:`ChainSamples` and ``result.predict`` pools them. With
    ``config.calibrate`` the predictive's temperature is fitted on ``validation`` (required then;
    :meth:`DistillResult.calibrate`) and ``result.predict`` applies it. For
    ``avg_bkd``, ``result.objective.teachers`` is ``(K,)``: the average appended after the K
    given teachers. Teachers given as a mapping may be named in ``bkd_<name>``.

    ``x`` (a tensor or an array) is cast to the dtype of the student's parameters (float64
    models work in float64, bfloat16 ones in bfloat16; a trainable float16 parameter is refused:
    Adam's eps rounds to 0 in float16 and its update to NaN). Training that makes the student's
    logits NaN, +inf, or -inf in a whole row stops with :class:`TrainingDivergedError`, naming
    the phase, epoch and batch (a ``-inf`` logit that masks a class is not a divergence).
    ``y`` must hold class indices of the student's classes (integers, or floats of whole
    values).
    Teacher modules run once, in eval mode without gradients on ``x`` cast to their own dtype,
    and get their training mode back. The student keeps the parameters it was given frozen
    (``requires_grad=False``: a pretrained body stays as it is, its submodules in eval mode while
    the rest trains, and further chains keep it rather than drawing it afresh; the MAP phase
    trains the other parameters, and SGLD samples the head, frozen or not) and ends in the
    train/eval mode and with the ``requires_grad`` flags it came in with (:meth:`DistillResult.
    predict` switches it to eval).
    """
    config = DistillConfig() if config is None else config
    if not isinstance(config, DistillConfig):
        raise TypeError(f"config must be a DistillConfig, got {type(config).__name__}")
    config.__post_init__()  # fields set after construction are checked too
    # a forked RNG: the caller's random state is neither used nor changed
    with _threads(config.num_threads), _forked_rng():
        return _distill(student, teachers, x, y, config, method, head, checkpoint_dir, validation)


def _distill(
    student, teachers, x, y, config, method, head, checkpoint_dir, validation
) -> DistillResult:
    if not isinstance(student, nn.Module):
        raise TypeError(f"student must be an nn.Module, got {type(student).__name__}")
    if not isinstance(method, str) or (method not in METHOD_KINDS
                                       and not method.startswith("bkd_")):  # fmt: skip
        raise ValueError(f"unknown method {method!r}: one of {', '.join(METHOD_KINDS)} or "
                         "bkd_<teacher>")  # fmt: skip
    x = _features_for(student, x, "x")
    if x.shape[0] == 0:
        raise ValueError("x has no rows")
    # the student's class count (eval mode, on two rows: a batch norm without running
    # statistics normalises by the batch's even in eval mode, which one row cannot give); the
    # same probe finds the batch norms that the last batch of each epoch, of one row, would
    # break in training (one value per channel and row: a BatchNorm2d, or a frozen body's batch
    # norm, trains on one row)
    one_row = x.shape[0] % config.batch_size == 1 and x.shape[0] > 1
    with _one_value_batch_norms(student) if one_row else contextlib.nullcontext([]) as broken:
        c = _logits_of(student, x[:2], "student").shape[-1]
    if broken:
        raise ValueError(
            f"batch_size={config.batch_size} leaves a last batch of one row of the "
            f"{x.shape[0]}, which the student's batch norm ({broken[0]}) cannot train on: "
            "choose another batch_size"
        )
    y = _labels_for(y, c, "y", x.shape[0])
    if validation is not None:
        if not isinstance(validation, Sequence) or len(validation) != 2:
            raise TypeError("validation must be a pair (x_val, y_val)")
        vx = _features_for(student, validation[0], "validation[0]")
        if vx.shape[1] != x.shape[1]:  # (a student of no readable in_features: checked here)
            raise ValueError(f"validation[0] has {vx.shape[1]} features; x has {x.shape[1]}")
        validation = (vx, _labels_for(validation[1], c, "validation[1]", vx.shape[0]))
    if config.calibrate and validation is None:
        raise ValueError(
            "config.calibrate fits the predictive's temperature on held-out rows: pass "
            "validation=(x_val, y_val)"
        )
    t = _teacher_tensor(teachers, x) if teachers is not None else None
    if t is not None and t.shape[-1] != c:
        raise ValueError(f"teachers have {t.shape[-1]} classes but the student outputs {c}")
    if t is not None:
        from mtbkd.data import _probability_like

        for i, ti in enumerate(t):  # as the dataset loaders refuse them
            kind = _probability_like(ti.detach().double().cpu().numpy())
            if kind is not None:
                raise ValueError(
                    f"teachers[{i}] looks like probabilities ({kind}), not logits: a softmax of "
                    "probabilities would flatten it; give log-probabilities (clipped away from 0)"
                )
    if method.startswith("bkd_") and isinstance(teachers, Mapping) and method[4:] in teachers:
        method = f"bkd_{list(teachers).index(method[4:])}"  # a teacher named by its key
    obj, sample = _objective_for(method, config, t.shape[0] if t is not None else 0)
    if method == "avg_bkd":  # its one teacher (index K) is the teachers' average
        t = torch.cat([t, average_teacher_logits(t)[None]])
    if sample and config.sgld_epochs < 1:
        raise ValueError(f"method {method!r} samples with SGLD: sgld_epochs must be at least 1")
    if sample:  # the part SGLD samples, before the MAP phase (a bad name failed after it)
        _check_head(student, head)
    for name, p in student.named_parameters():
        if p.dtype == torch.float16 and p.requires_grad:
            raise TypeError(
                f"student parameter {name!r} is float16, which the MAP phase's Adam cannot "
                "train: its eps (1e-8) rounds to 0 in float16, and an update of a parameter "
                "with a zero gradient to 0/0 = NaN; give the student float32 or bfloat16 "
                "parameters (torch.autocast runs float16 arithmetic on float32 weights)"
            )
    if validation is not None and len(validation[1]) == 0:
        raise ValueError("validation holds no rows: give (x_val, y_val) with at least one row")
    teach = t[list(obj.teachers)] if obj.teachers else None
    data = TrainData(x, y, teach)
    ck = Path(checkpoint_dir) if checkpoint_dir is not None else None
    _manual_seed(config.seed)
    was_training = student.training  # restored at the end, error or not (the phases switch it)
    flags = [p.requires_grad for p in student.parameters()]
    try:
        return _train_student(student, data, obj, sample, config, method, head, ck, validation)
    finally:
        student.train(was_training)
        for p, flag in zip(student.parameters(), flags, strict=True):
            p.requires_grad_(flag)


def _train_student(student, data, obj, sample, config, method, head, ck, validation):
    template = copy.deepcopy(student) if sample and config.num_chains > 1 else None
    map_s = train_map(
        student,
        data,
        obj,
        config,
        checkpoint_dir=ck,
        desc=f"{method} MAP",
        validation=validation,
    )
    store, sg_s = None, 0.0
    if sample:
        store, sg_s = train_sgld(
            student, data, obj, config, head=head, checkpoint_dir=ck, desc=f"{method} SGLD"
        )
        if config.num_chains > 1:
            extra, ex_s = more_chains(
                template, data, obj, config, head=head, checkpoint_dir=ck,
                validation=validation, desc=method,
            )  # fmt: skip
            store, sg_s = pool_chains([(student, store), *extra]), sg_s + ex_s
    result = DistillResult(student, store, obj, map_s + sg_s, map_s, config.predict_chunk)
    if config.calibrate:
        result.calibrate(*validation)
    return result


def _objective_for(method: str, config: DistillConfig, k: int) -> tuple[Objective, bool]:
    common = {
        "temperature": config.temperature,
        "concentration": config.concentration,
        "prior_weight": config.prior_weight,
        "hard_label_weight": config.hard_label_weight,
    }
    if method == "ce":
        return Objective("ce"), False
    if k == 0:
        raise ValueError(f"method {method!r} needs teachers")
    kd = {
        "temperature": config.kd_temperature,
        "kd_weight": config.kd_weight,
        "hard_label_weight": config.hard_label_weight,
    }
    if method == "avg_kd":
        return Objective("kd", tuple(range(k)), "uniform", **kd), False
    if method == "entropy_kd":
        return Objective("kd", tuple(range(k)), "entropy", **kd), False
    if method in ("mtbkd_map", "mtbkd_sgld"):
        obj = Objective("mtbkd", tuple(range(k)), config.weights, **common)
        return obj, method == "mtbkd_sgld"
    if method == "avg_bkd":
        _check_average(k)
        return Objective("mtbkd", (k,), config.weights, **common), True
    if method.startswith("bkd_"):
        if not method[4:].isdigit():
            raise ValueError(
                f"method {method!r} names no teacher: single-teacher BKD takes a teacher's "
                f"index, 'bkd_0' .. 'bkd_{k - 1}', or its key, 'bkd_<key>', where the teachers "
                "are given as a mapping"
            )
        i = int(method[4:])
        if not 0 <= i < k:
            raise ValueError(f"method {method!r}: teacher index out of range 0..{k - 1}")
        return Objective("mtbkd", (i,), config.weights, **common), True
    raise ValueError(f"unknown method {method!r}")


# ----------------------------------------------------------------------------------------------
# Teachers for datasets that ship none
# ----------------------------------------------------------------------------------------------


def expert_groups(num_classes: int, k: int) -> list[list[int]]:
    """Split the classes into ``k`` contiguous groups of near-equal size (each teacher's
    expertise)."""
    if not 1 <= k <= num_classes:
        raise ValueError(
            f"num_teachers must lie in 1..{num_classes} (the number of classes: each trained "
            f"teacher is an expert on a group of classes), got {k}; set --set num_teachers=N"
        )
    return [g.tolist() for g in np.array_split(np.arange(num_classes), k)]


def _teacher_name(group: list[int], num_classes: int) -> str:
    return "t" + "".join(map(str, group)) if num_classes <= 10 else f"t{group[0]}_{group[-1]}"


def train_teachers(
    x: Tensor, y: Tensor, num_classes: int, config: DistillConfig
) -> dict[str, nn.Module]:
    """``config.num_teachers`` MLP teachers with different expertise: teacher k sees every
    training example of its class group and only ``teacher_other_fraction`` of the others, so
    it is confident and right on its classes and biased elsewhere."""
    gen = torch.Generator().manual_seed(config.seed + 1000)
    out: dict[str, nn.Module] = {}
    mean, std = x.mean(0), x.std(0)
    for group in expert_groups(num_classes, config.num_teachers):
        inside = torch.isin(y, torch.tensor(group))
        keep = inside | (torch.rand(len(y), generator=gen) < config.teacher_other_fraction)
        _manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        model = StudentMLP(x.shape[1], num_classes, (config.teacher_hidden,), mean, std)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-4)
        xs, ys = x[keep], y[keep]
        for _ in range(config.teacher_epochs):
            loss = F.cross_entropy(model(xs), ys)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        model.eval()
        out[_teacher_name(group, num_classes)] = model
    return out


def teacher_logits(
    x_train: Tensor, y_train: Tensor, x_test: Tensor, num_classes: int, config: DistillConfig
) -> tuple[list[str], Tensor, Tensor]:
    """Train :func:`train_teachers` and cache their logits ``[K, N, C]`` on the training and
    test rows. With ``config.teacher_folds >= 2`` the training rows' logits are cross-fitted
    (each row scored by teachers trained on the other folds), so they show how a teacher
    generalises rather than how well it memorised the rows the student learns from."""
    with _forked_rng():
        full = train_teachers(x_train, y_train, num_classes, config)
        names = list(full)
        t_test = _teacher_tensor(list(full.values()), x_test)
        folds = config.teacher_folds
        if folds < 2:
            # no out-of-fold logits, nothing honest to calibrate on
            return names, _teacher_tensor(list(full.values()), x_train), t_test
        t_train = torch.empty(len(names), x_train.shape[0], num_classes)
        fold_of = (
            torch.randperm(
                x_train.shape[0], generator=torch.Generator().manual_seed(config.seed + 2000)
            )
            % folds
        )
        for f in range(folds):
            held = fold_of == f
            part = train_teachers(x_train[~held], y_train[~held], num_classes, config)
            t_train[:, held] = _teacher_tensor(list(part.values()), x_train[held])
    if config.teacher_calibrate:
        for k in range(len(names)):
            temp = fit_teacher_temperature(t_train[k], y_train)
            t_train[k] /= temp
            t_test[k] /= temp
    return names, t_train, t_test


def fit_teacher_temperature(logits: Tensor, labels: Tensor) -> float:
    """Temperature scaling of one teacher: the ``T`` in [0.05, 20] minimising
    ``NLL(softmax(logits / T))`` (golden-section search on ``log T``; the NLL is convex in
    ``1 / T``). Fitted on out-of-fold logits, it calibrates a teacher without touching the
    student's validation or test rows. (:func:`mtbkd.metrics.fit_temperature` does the same for a
    student's posterior predictive, from its samples' probabilities.)"""
    from mtbkd.metrics import _golden_min

    logits, labels = logits.double(), labels.long()

    def nll(log_t: float) -> float:
        return float(F.cross_entropy(logits / math.exp(log_t), labels))

    return math.exp(_golden_min(nll, math.log(0.05), math.log(20.0)))


def pool_digits(x: np.ndarray) -> np.ndarray:
    """8x8 digit images ``[N, 64]`` -> 2x2-average-pooled 4x4 images ``[N, 16]`` (the demo
    student's cheap view, as DeepLoc's student sees sequence statistics instead of the teachers'
    protein-language-model embeddings)."""
    return x.reshape(-1, 4, 2, 4, 2).mean(axis=(2, 4)).reshape(-1, 16)


def digits_demo_dataset(
    config: DistillConfig | None = None,
    seed: int = 0,
    student_fraction: float = 0.25,
    pooled: bool = False,
) -> Dataset:
    """scikit-learn digits set up as the demo's distillation problem: three MLP teachers with
    different class expertise (:func:`train_teachers`: each sees all training images of its
    classes and a tenth of the others; cross-fitted and temperature-scaled logits, see
    :func:`teacher_logits`) learn from the training split except the student's validation rows;
    the small student learns from a stratified ``student_fraction`` of it (its labelled transfer
    set, with the teachers' cached logits), on the 8x8 images or, with ``pooled``, their 4x4
    pooled version (:func:`pool_digits`). The validation rows that :func:`run_experiment` holds
    out of the student's rows (``config.val_fraction``, ``config.seed``) are held out of the
    teachers' training too: their logits, like the test rows', come from teachers that never saw
    them, so the hyperparameters are chosen on labels no model has trained on.
    """
    from mtbkd.data import load_digits

    config = config or DistillConfig()
    full = load_digits(seed, fold=config.fold())
    rows = np.arange(len(full.y_train))
    if student_fraction < 1.0:
        _, rows = stratified_split(full.y_train, student_fraction, seed + 7)
    # The student's validation rows (the split run_experiment draws from these rows with
    # config.val_fraction and config.seed) choose its hyperparameters: the teachers never train on
    # them, and score them as they score the test rows.
    _, val_local = stratified_split(full.y_train[rows], config.val_fraction, config.seed)
    val_rows = rows[val_local]
    keep = np.setdiff1d(np.arange(len(full.y_train)), val_rows)
    with _threads(config.num_threads):
        x_all, y_all = torch.from_numpy(full.x_train), torch.from_numpy(full.y_train)
        unseen = torch.cat([x_all[val_rows], torch.from_numpy(full.x_test)])
        names, t_keep, t_unseen = teacher_logits(
            x_all[keep], y_all[keep], unseen, full.num_classes, config
        )
        t_tr = torch.empty(len(names), len(full.y_train), full.num_classes)
        t_tr[:, keep] = t_keep
        t_tr[:, val_rows] = t_unseen[:, : len(val_rows)]
        t_tr, t_te = t_tr.numpy(), t_unseen[:, len(val_rows) :].numpy()
    view = pool_digits if pooled else (lambda a: a)
    feat = [f"pool{r}{c}" for r in range(4) for c in range(4)] if pooled else full.feature_names
    return Dataset(
        "digits",
        view(full.x_train[rows]),
        full.y_train[rows],
        view(full.x_test),
        full.y_test,
        full.class_names,
        {n: t_tr[i][rows] for i, n in enumerate(names)},
        {n: t_te[i] for i, n in enumerate(names)},
        feature_names=feat,
        x_shift=None if full.x_shift is None else view(full.x_shift),
        shift_name=full.shift_name,
        teachers_from_config=True,
    )


# ----------------------------------------------------------------------------------------------
# The comparison of every method
# ----------------------------------------------------------------------------------------------


@dataclass
class MethodResult:
    """One row of the comparison: test metrics, the validation-selected hyperparameters, the
    training seconds of the selected run, and the test probabilities ``[S, N, C]``."""

    name: str
    metrics: dict[str, float]
    seconds: float
    hparams: dict[str, float | str]
    probs: Tensor
    val_nll: float
    sampled: bool
    # probabilities [S, N_shift, C] on the dataset's shifted inputs, when it has them
    shift_probs: Tensor | None = None
    # with ``config.calibrate``: the test probabilities before temperature scaling (``probs``
    # and ``shift_probs`` are tempered by ``hparams["predictive_temperature"]``)
    raw_probs: Tensor | None = None

    @property
    def model_probs(self) -> Tensor:
        """The test probabilities of the trained student itself (before any post-hoc
        temperature scaling): what its training objective's responsibilities are taken of."""
        return self.raw_probs if self.raw_probs is not None else self.probs

    def row(self) -> dict[str, Any]:
        keys = (
            "accuracy",
            "nll",
            "ece",
            "brier",
            "mean_deviance",
            "coverage",
            "set_size",
            "auroc_error",
        )
        out = {"name": self.name, **{k: self.metrics[k] for k in keys}}
        for k in ("auroc_shift", "overconfidence", "ece_floor", "ece_p"):
            if k in self.metrics:
                out[k] = self.metrics[k]
        return {**out, "seconds": self.seconds}


@dataclass
class ExperimentResult:
    dataset: str
    class_names: list[str]
    teacher_names: list[str]
    methods: list[MethodResult]
    teachers: list[dict[str, Any]]
    labels: Tensor
    attribution: dict[str, Any] | None
    config: DistillConfig
    seconds: float
    # the MT-BKD SGLD student, its samples and objective (what save_run writes), when it ran
    student: nn.Module | None = None
    store: Any = None
    objective: Objective | None = None
    # each teacher's top class on each test row, [K, N] (where the teachers disagree: report.py)
    teacher_pred: Tensor | None = None
    # what the student sees, e.g. "2245 features (sequence encoder composition+unirep1900)"
    features: str = ""
    # weighting_diagnostic on the training rows: do the entropy weights pick the right teacher?
    train_weighting: dict[str, Any] | None = None
    # teacher_mixtures on the test rows: the teachers averaged and entropy-weighted
    teacher_mixtures: list[dict[str, Any]] | None = None
    # what the dataset's shifted inputs are (Dataset.shift_name), when it has them
    shift_name: str | None = None
    # SHA-256 of the test rows (features and labels): which seeds share one test set
    test_digest: str | None = None
    # SHA-256 of the files the data was read from (data.source_digest), set by the command line
    data_digest: str | None = None
    # whether the pipeline trained the teachers (the dataset had none): TEACHER_TRAINING_FIELDS
    teachers_trained: bool | None = None

    def method(self, name: str) -> MethodResult:
        for m in self.methods:
            if m.name == name:
                return m
        raise KeyError(name)


def _fmt(v: float | str) -> str:
    return v if isinstance(v, str) else f"{v:g}"


def format_hparams(hparams: dict) -> str:
    """``"k=v, ..."`` with each number in ``%g`` (``sgld_prior_precision=0.0237``), or
    ``"none"``."""
    return ", ".join(f"{k}={_fmt(v)}" for k, v in hparams.items()) or "none"


def method_names(config: DistillConfig, teacher_names: Sequence[str]) -> list[str]:
    """The methods of ``config.methods`` in order, ``bkd`` expanded to every teacher's BKD, each
    once; a ``bkd_<name>`` that names no teacher is an error."""
    known = [f"bkd_{t}" for t in teacher_names]
    unknown = [m for m in config.methods if m.startswith("bkd_") and m not in known]
    if unknown:
        raise ValueError(f"methods {unknown} name no teacher; the teachers' BKDs are {known}")
    out: list[str] = []
    for m in config.methods:
        for name in known if m == "bkd" else [m]:
            if name not in out:
                out.append(name)
    return out


def _grid(base: dict[str, Any], grid: Grid) -> list[dict[str, Any]]:
    """Every setting of ``grid`` over ``base`` (a mapping: the product of its lists; a list of
    mappings: the union of their products), in order, each once."""
    out: list[dict[str, Any]] = []
    for part in _grid_parts(grid):
        keys = list(part)
        for vals in itertools.product(*(part[k] for k in keys)):
            h = {**base, **dict(zip(keys, vals, strict=True))}
            if h not in out:
                out.append(h)
    return out


def _tag(h: Mapping[str, Any]) -> str:
    return "-".join(f"{k}{_fmt(v)}" for k, v in sorted(h.items())) or "default"


def _sgld_tag(obj: Objective, h: Mapping[str, float]) -> str:
    """Checkpoint folder of one SGLD setting of one objective."""
    return f"{_tag(obj.hparams())}/sgld{h['sgld_lr']:g}-prior{h['sgld_prior_precision']:g}"


class _Experiment:
    """State shared by the fits of one :func:`run_experiment` call."""

    def __init__(self, config, x_tr, y_tr, t_tr, x_val, y_val, x_te, y_te, base, ckpt_root, log):
        self.config, self.base, self.ckpt_root, self.log = config, base, ckpt_root, log
        self.x_tr, self.y_tr, self.t_tr = x_tr, y_tr, t_tr
        self.x_val, self.y_val, self.x_te, self.y_te = x_val, y_val, x_te, y_te
        self.x_shift: Tensor | None = None  # shifted inputs (no labels), when the dataset has them
        self.map_cache: dict[tuple, tuple[nn.Module, float, float]] = {}

    def _ckpt(self, *parts: str) -> Path | None:
        return None if self.ckpt_root is None else self.ckpt_root.joinpath(*parts)

    def data(self, obj: Objective) -> TrainData:
        t = self.t_tr[list(obj.teachers)] if obj.teachers else None
        return TrainData(self.x_tr, self.y_tr, t)

    def val_nll(self, model, store=None) -> float:
        from mtbkd import metrics as M

        probs = predict_probs(model, self.x_val, store, self.config.predict_chunk)
        return float(M.nll(probs, self.y_val))

    def fit_map(self, name: str, obj: Objective) -> tuple[nn.Module, float, float]:
        key = (obj,)
        if key not in self.map_cache:
            model = copy.deepcopy(self.base)
            sec = train_map(
                model,
                self.data(obj),
                obj,
                self.config,
                checkpoint_dir=self._ckpt(name, _tag(obj.hparams())),
                desc=f"{name} MAP",
                validation=(self.x_val, self.y_val),
            )
            self.map_cache[key] = (model, sec, self.val_nll(model))
        return self.map_cache[key]

    def select_map(
        self, name: str, objs: list[Objective]
    ) -> tuple[Objective, nn.Module, float, float]:
        best = None
        for obj in objs:
            model, sec, vnll = self.fit_map(name, obj)
            if best is None or vnll < best[3]:
                best = (obj, model, sec, vnll)
        return best

    def sgld_settings(self) -> list[dict[str, float]]:
        """The SGLD grid: every step size with every prior precision (validation-selected)."""
        c = self.config
        default = c.sgld_prior_precision
        if default is None:
            default = self.x_tr.shape[0] * c.weight_decay
        return [
            {"sgld_lr": lr, "sgld_prior_precision": pp}
            for lr in (c.sgld_grid or (c.sgld_lr,))
            for pp in (c.sgld_prior_grid or (default,))
        ]

    def select_sgld(
        self, name: str, obj: Objective, map_model: nn.Module, settings: list[dict[str, float]]
    ):
        best = None
        for h in settings:
            model = copy.deepcopy(map_model)
            tag = _sgld_tag(obj, h)
            store, sec = train_sgld(
                model,
                self.data(obj),
                obj,
                self.config,
                sgld_lr=h["sgld_lr"],
                prior_precision=h["sgld_prior_precision"],
                checkpoint_dir=self._ckpt(name, tag),
                desc=f"{name} SGLD",
            )
            vnll = self.val_nll(model, store)
            if best is None or vnll < best[4]:
                best = (dict(h), model, store, sec, vnll)
        return best

    def select_joint(self, name: str, objs: list[Objective], settings):
        """Every objective sampled as :meth:`sample` does (its SGLD setting chosen on the first
        chain, then all ``num_chains`` pooled); the objective whose pooled posterior predictive
        has the lowest validation NLL. Returns ``(objective, MAP model, MAP seconds, sampled)``
        with ``sampled`` as :meth:`sample` returns it."""
        best = None
        for obj in objs:
            map_model, map_sec, _ = self.fit_map(name, obj)
            sampled = self.sample(name, obj, map_model, settings)
            if best is None or sampled[4] < best[3][4]:
                best = (obj, map_model, map_sec, sampled)
        return best

    def sample(self, name: str, obj: Objective, map_model: nn.Module, settings):
        """SGLD with the validation-chosen settings (selected on the first chain), then the
        further chains of ``config.num_chains`` with the same settings, pooled. Returns
        ``(settings, model, store, seconds, validation NLL)``."""
        h, model, store, sec, vnll = self.select_sgld(name, obj, map_model, settings)
        if self.config.num_chains > 1:
            tag = _sgld_tag(obj, h)
            extra, ex_sec = more_chains(
                self.base, self.data(obj), obj, self.config, sgld_lr=h["sgld_lr"],
                prior_precision=h["sgld_prior_precision"], checkpoint_dir=self._ckpt(name, tag),
                validation=(self.x_val, self.y_val), desc=name,
            )  # fmt: skip
            store = pool_chains([(model, store), *extra])
            sec += ex_sec
            vnll = self.val_nll(model, store)
        return h, model, store, sec, vnll

    def result(self, name, model, store, seconds, hparams, vnll) -> MethodResult:
        from mtbkd import metrics as M

        chunk = self.config.predict_chunk
        probs = raw = predict_probs(model, self.x_te, store, chunk)
        shift_probs = None
        if self.x_shift is not None:
            shift_probs = predict_probs(model, self.x_shift, store, chunk)
        if self.config.calibrate:  # one temperature for the method, fitted on the validation rows
            temp = M.fit_temperature(predict_probs(model, self.x_val, store, chunk), self.y_val)
            hparams = {**hparams, "predictive_temperature": temp}
            probs = M.temper(raw, temp)
            if shift_probs is not None:
                shift_probs = M.temper(shift_probs, temp)
        metrics = evaluate_probs(probs, self.y_te)
        if shift_probs is not None:
            metrics["auroc_shift"] = shift_auroc(probs, shift_probs)
        shift = f"  auroc shift {metrics['auroc_shift']:.3f}" if shift_probs is not None else ""
        self.log(
            f"  {name:<14} acc {metrics['accuracy']:.3f}  nll {metrics['nll']:.3f}  "
            f"ece {metrics['ece']:.3f}{shift}  ({seconds:.1f}s; val nll {vnll:.3f}; "
            f"{format_hparams(hparams)})"
        )
        return MethodResult(
            name, metrics, seconds, hparams, probs, vnll, store is not None, shift_probs,
            raw if self.config.calibrate else None,
        )  # fmt: skip


def _split_dataset(dataset: Dataset, config: DistillConfig):
    tr, val = stratified_split(dataset.y_train, config.val_fraction, config.seed)
    if len(val) == 0:
        raise ValueError(
            f"the validation split is empty: {len(dataset.y_train)} training rows, and a class "
            "gives validation rows only when it has at least 2 (hyperparameters and early "
            "stopping need them; val_fraction holds out about "
            f"{config.val_fraction:g} of each class)"
        )
    x = torch.from_numpy(dataset.x_train)
    y = torch.from_numpy(dataset.y_train)
    return tr, val, x, y


def run_experiment(
    dataset: Dataset,
    config: DistillConfig | None = None,
    *,
    checkpoint_dir: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> ExperimentResult:
    """Every method of ``config.methods`` on ``dataset``: hyperparameters chosen by validation
    NLL on a stratified split of the training rows, metrics on the test rows."""
    config = DistillConfig() if config is None else config
    if not isinstance(config, DistillConfig):  # {} ran the defaults; a dict failed later
        raise TypeError(f"config must be a DistillConfig, got {type(config).__name__}")
    config.__post_init__()  # fields set after construction are checked too
    # a forked RNG: the caller's random state is neither used nor changed
    with _threads(config.num_threads), _forked_rng():
        return _run_experiment(dataset, config, checkpoint_dir, log)


def check_methods(dataset: Dataset, config: DistillConfig) -> None:
    """Refuse, before any training, methods the dataset's teachers cannot serve: a
    ``bkd_<name>`` naming no teacher, ``avg_bkd`` with fewer than two teachers (a dataset without
    teacher logits gets ``config.num_teachers`` trained ones); and training rows too few for a
    validation split."""
    if dataset.teachers_train:
        method_names(config, dataset.teacher_names)
    else:  # the names of the experts the pipeline will train
        groups = expert_groups(dataset.num_classes, config.num_teachers)
        method_names(config, [_teacher_name(g, dataset.num_classes) for g in groups])
    if "avg_bkd" in config.methods:
        _check_average(len(dataset.teachers_train) or config.num_teachers)
    _split_dataset(dataset, config)  # a validation split to choose on


def _check_average(k: int) -> None:
    if k < 2:
        raise ValueError(f"method 'avg_bkd' averages several teachers, got {k}")


def _run_experiment(dataset, config, checkpoint_dir, log) -> ExperimentResult:
    check_methods(dataset, config)
    t_start = time.perf_counter()
    _manual_seed(config.seed)
    tr, val, x_all, y_all = _split_dataset(dataset, config)
    x_tr, y_tr, x_val, y_val = x_all[tr], y_all[tr], x_all[val], y_all[val]
    x_te, y_te = torch.from_numpy(dataset.x_test), torch.from_numpy(dataset.y_test)
    c = dataset.num_classes
    if dataset.teachers_train:
        names = dataset.teacher_names
        t_all = torch.stack([torch.from_numpy(dataset.teachers_train[n]) for n in names])
        t_tr = t_all[:, tr]
        t_te = torch.stack([torch.from_numpy(dataset.teachers_test[n]) for n in names])
    else:
        log(f"training {config.num_teachers} teachers with different class expertise")
        names, t_tr, t_te = teacher_logits(x_tr, y_tr, x_te, c, config)
    teachers = []
    for i, n in enumerate(names):
        m = evaluate_probs(torch.softmax(t_te[i], -1).unsqueeze(0), y_te)
        per_class = [
            float((t_te[i].argmax(-1)[y_te == k] == k).float().mean())
            if (y_te == k).any()
            else float("nan")
            for k in range(c)
        ]
        teachers.append(
            {
                "name": n,
                "accuracy": m["accuracy"],
                "nll": m["nll"],
                "ece": m["ece"],
                "class_accuracy": per_class,
            }
        )
        log(f"  {'teacher ' + n:<26} test acc {m['accuracy']:.3f}  nll {m['nll']:.3f}")
    mixtures = teacher_mixtures(t_te, y_te)
    for m in mixtures:  # what the teachers know together
        log(f"  {'teachers ' + m['name']:<26} test acc {m['accuracy']:.3f}  nll {m['nll']:.3f}")
    _manual_seed(config.seed)
    base = StudentMLP(x_tr.shape[1], c, config.hidden, x_tr.mean(0), x_tr.std(0))
    ck = Path(checkpoint_dir) if checkpoint_dir is not None else None
    k = len(names)
    wanted = method_names(config, names)
    # avg_bkd's one teacher, index k, is the teachers' average (k >= 2: check_methods)
    t_ex = torch.cat([t_tr, average_teacher_logits(t_tr)[None]]) if "avg_bkd" in wanted else t_tr
    ex = _Experiment(config, x_tr, y_tr, t_ex, x_val, y_val, x_te, y_te, base, ck, log)
    if dataset.x_shift is not None:
        ex.x_shift = torch.from_numpy(dataset.x_shift)
    results: dict[str, MethodResult] = {}
    common = {
        "temperature": config.temperature,
        "concentration": config.concentration,
        "prior_weight": config.prior_weight,
        "hard_label_weight": config.hard_label_weight,
    }

    def kd_objs(weights: str) -> list[Objective]:
        base_h = {"kd_temperature": config.kd_temperature, "kd_weight": config.kd_weight}
        return [
            Objective(
                "kd",
                tuple(range(k)),
                weights,
                temperature=h["kd_temperature"],
                kd_weight=h["kd_weight"],
                hard_label_weight=config.hard_label_weight,
            )
            for h in _grid(base_h, config.kd_grid)
        ]

    def bayes_objs(teach: tuple[int, ...], grid) -> list[Objective]:
        """The grid's objectives on ``teach``; one teacher ignores ``weights`` (its weight is
        1), so settings that differ only there are one objective."""
        objs: list[Objective] = []
        for h in _grid({**common, "weights": config.weights}, grid):
            if len(teach) == 1:
                h["weights"] = config.weights
            obj = Objective("mtbkd", teach, **h)
            if obj not in objs:
                objs.append(obj)
        return objs

    sgld_settings = ex.sgld_settings()
    log(f"{dataset.name}: {len(tr)} train / {len(val)} validation / {len(y_te)} test rows")
    if "ce" in wanted:
        obj = Objective("ce")
        model, sec, vnll = ex.fit_map("ce", obj)
        results["ce"] = ex.result("ce", model, None, sec, {}, vnll)
    for name, w in (("avg_kd", "uniform"), ("entropy_kd", "entropy")):
        if name in wanted:
            obj, model, sec, vnll = ex.select_map(name, kd_objs(w))
            results[name] = ex.result(name, model, None, sec, obj.hparams(), vnll)
    mt_choice = mt_obj = None
    if "mtbkd_map" in wanted or "mtbkd_sgld" in wanted:
        mt_objs = bayes_objs(tuple(range(k)), config.mtbkd_grid)
        obj, model, sec, vnll = ex.select_map("mtbkd", mt_objs)
        mt_obj = obj
        if "mtbkd_map" in wanted:
            results["mtbkd_map"] = ex.result("mtbkd_map", model, None, sec, obj.hparams(), vnll)
        if "mtbkd_sgld" in wanted:
            if config.joint_selection:
                obj, model, sec, sampled = ex.select_joint("mtbkd", mt_objs, sgld_settings)
            else:
                sampled = ex.sample("mtbkd", obj, model, sgld_settings)
            sh, smodel, store, ssec, svnll = sampled
            h = {**obj.hparams(), **sh}
            results["mtbkd_sgld"] = ex.result("mtbkd_sgld", smodel, store, sec + ssec, h, svnll)
            mt_choice = (obj, smodel, store, sh)
            mt_obj = obj
    # single-teacher BKDs: each teacher, then avg_bkd's average (index k); with tune_bkd=False the
    # teachers' BKDs reuse MT-BKD's choice, avg_bkd always searches its own grid
    for name, i in [*((f"bkd_{n}", i) for i, n in enumerate(names)), ("avg_bkd", k)]:
        if name not in wanted:
            continue
        if config.tune_bkd or mt_choice is None or name == "avg_bkd":
            objs = bayes_objs((i,), config.mtbkd_grid)
            if config.joint_selection:
                obj, model, sec, sampled = ex.select_joint(name, objs, sgld_settings)
            else:
                obj, model, sec, vnll = ex.select_map(name, objs)
                sampled = ex.sample(name, obj, model, sgld_settings)
        else:  # one teacher's weight is 1 whatever the weighting: config.weights, as in the grid
            obj = replace(mt_choice[0], teachers=(i,), weights=config.weights)
            model, sec, vnll = ex.fit_map(name, obj)
            sampled = ex.sample(name, obj, model, [mt_choice[3]])
        sh, smodel, store, ssec, svnll = sampled
        results[name] = ex.result(name, smodel, store, sec + ssec, {**obj.hparams(), **sh}, svnll)
    ordered = [results[m] for m in wanted if m in results]
    attribution = None
    if k >= 2 and mt_obj is not None:  # the objective of mtbkd_sgld, else of mtbkd_map
        src = results.get("mtbkd_sgld") or results["mtbkd_map"]
        # the responsibilities of the student the objective trained (untempered)
        w, r = teacher_attribution(src.model_probs, t_te, mt_obj)
        attribution = _summarise_attribution(
            src.name, w, r, y_te, src.probs, dataset.class_names, names, mt_obj.weights
        )
    student, store, objective = (
        (mt_choice[1], mt_choice[2], mt_choice[0]) if mt_choice else (None, None, None)
    )
    return ExperimentResult(
        dataset.name,
        list(dataset.class_names),
        names,
        ordered,
        teachers,
        y_te,
        attribution,
        config,
        time.perf_counter() - t_start,
        student,
        store,
        objective,
        t_te.argmax(-1),
        dataset.features_text(),
        weighting_diagnostic(t_tr, y_tr, names),
        mixtures,
        dataset.shift_name if dataset.x_shift is not None else None,
        _digest(x_te, y_te),
        teachers_trained=dataset.teachers_from_config or not dataset.teachers_train,
    )


def average_teacher_logits(teacher_logits: Tensor) -> Tensor:
    """The teachers' averaged prediction as logits: ``log((1/K) Σ_k softmax(t_k))`` from
    ``[K, N, C]`` logits (computed in log space, so a class every teacher rules out with ``-inf``
    stays ``-inf``). ``avg_bkd`` distils from it: one Dirichlet prior centred on
    ``softmax(log p̄ / τ)``, the average of :func:`teacher_mixtures` (its ``average`` row) at
    τ = 1, where MT-BKD mixes K Dirichlet priors, each centred on one teacher."""
    t = torch.as_tensor(teacher_logits)
    if t.dim() != 3 or t.shape[0] < 1:
        raise ValueError(f"teacher_logits must be [K, N, C] with K >= 1, got {tuple(t.shape)}")
    return torch.logsumexp(torch.log_softmax(t, -1), 0) - math.log(t.shape[0])


def teacher_mixtures(teacher_logits: Tensor, labels: Tensor) -> list[dict[str, Any]]:
    """What the teachers know together, before any student: their probabilities averaged
    (``average``) and mixed per row with the entropy weights of MATH.md section 1
    (``entropy-weighted``), each with accuracy, NLL and ECE on ``labels``. Empty for one
    teacher."""
    t = torch.as_tensor(teacher_logits)
    if t.dim() != 3:
        raise ValueError(f"teacher_logits must be [K, N, C], got shape {tuple(t.shape)}")
    if t.shape[1] != len(labels):
        raise ValueError(f"teacher_logits has {t.shape[1]} rows but labels has {len(labels)}")
    labels = _labels_for(labels, t.shape[2], "labels", t.shape[1])  # numpy's, whole floats
    if t.shape[0] < 2:
        return []
    probs = torch.softmax(t.double(), -1)
    out = []
    for name, method in (("average", "uniform"), ("entropy-weighted", "entropy")):
        w = mf.teacher_weights(t.double(), method)  # [K, N]
        mixed = (w[..., None] * probs).sum(0)
        m = evaluate_probs(mixed.float().unsqueeze(0), labels)
        out.append({"name": name, "accuracy": m["accuracy"], "nll": m["nll"], "ece": m["ece"]})
    return out


def weighting_diagnostic(
    teacher_logits: Tensor, labels: Tensor, teacher_names: Sequence[str]
) -> dict[str, Any] | None:
    """Do the per-example entropy weights (MATH.md section 1) point to the right teacher where
    the teachers disagree? On the rows (of the training data: what MT-BKD learns from) where the
    teachers' top classes differ: each teacher's accuracy, the accuracy of the teacher with the
    highest weight on each row (the most confident one) and each teacher's mean weight.

    When the highest-weight teacher is right no more often than the best single teacher, the
    weighting carries no information a single-teacher BKD lacks, and the mixture has little to
    add. ``margin`` is the highest-weight teacher's accuracy minus the best teacher's
    (``best_teacher``) on these rows and ``margin_se`` the standard error of that paired
    difference (per row: right or not under each choice; None from a single disagreeing row), so
    that :func:`weighting_verdict` can tell a real edge from noise; ``margin_se_by_teacher``
    gives it against every teacher (a seed summary takes the margin against one teacher for all
    seeds). ``None`` with fewer than two teachers."""
    t = torch.as_tensor(teacher_logits)
    if t.dim() != 3:
        raise ValueError(f"teacher_logits must be [K, N, C], got shape {tuple(t.shape)}")
    if t.shape[0] < 2:
        return None
    from mtbkd import metrics as M

    labels = torch.as_tensor(labels)
    if t.shape[1] != len(labels) or t.shape[0] != len(teacher_names):
        raise ValueError(
            f"teacher_logits {tuple(t.shape)} must be [K={len(teacher_names)}, N={len(labels)}, C]"
        )
    labels = M._labels(labels, t.shape[1], t.shape[2])
    if t.is_floating_point() and not bool(torch.isnan(t).logical_not().all()):
        # argmax puts NaN on top: such rows counted as agreeing ("the teachers agree")
        raise ValueError("teacher_logits contain NaN")
    pred = t.argmax(-1)
    disagree = (pred != pred[:1]).any(0)
    n_dis = int(disagree.sum())
    out: dict[str, Any] = {"rows": len(labels), "disagree_rows": n_dis}
    if n_dis == 0:
        return {**out, "teacher_accuracy": None, "highest_weight_accuracy": None,
                "mean_weights": None, "best_teacher": None, "margin": None,
                "margin_se": None}  # fmt: skip
    w = mf.teacher_weights(t[:, disagree].double(), "entropy")
    right = (pred[:, disagree] == labels[disagree]).double()
    picked = right[w.argmax(0), torch.arange(n_dis)]
    acc = right.mean(1)
    best = int(acc.argmax())
    diff = picked - right[best]
    # the standard error of the paired difference against each teacher (None from one row: a
    # single row's difference has no spread to measure)
    se_by = {
        n: (float((picked - right[k]).std() / math.sqrt(n_dis)) if n_dis > 1 else None)
        for k, n in enumerate(teacher_names)
    }
    return {
        **out,
        "teacher_accuracy": {n: float(acc[k]) for k, n in enumerate(teacher_names)},
        "highest_weight_accuracy": float(picked.mean()),
        "mean_weights": {n: float(w[k].mean()) for k, n in enumerate(teacher_names)},
        "best_teacher": teacher_names[best],
        "margin": float(diff.mean()),
        "margin_se": se_by[teacher_names[best]],
        "margin_se_by_teacher": se_by,
    }


def weighting_verdict(margin: float, margin_se: float | None) -> str:
    """``"better"``, ``"tie"`` or ``"worse"``: the highest-weight teacher against the best single
    teacher (:func:`weighting_diagnostic`), a difference counted only beyond two standard errors
    (``"tie"`` without a standard error: ``margin_se`` None, from a single disagreeing row)."""
    if margin_se is None:
        return "tie"
    if margin > 0 and margin > 2 * margin_se:
        return "better"
    if margin < 0 and -margin > 2 * margin_se:
        return "worse"
    return "tie"


# a teacher is "followed" for a class when its mean responsibility there exceeds every other
# teacher's by at least this much; closer than that, no teacher stands out
FOLLOW_MARGIN = 0.05


def _summarise_attribution(
    method, w, r, labels, probs, class_names, teacher_names, weighting="entropy"
) -> dict:
    """Mean teacher weights and responsibilities per true class, and the teacher the student
    followed for each class (the largest mean responsibility, when it leads every other teacher's
    by at least :data:`FOLLOW_MARGIN`; the classes where none does are ``undecided``).
    ``weighting`` names the objective's teacher weights (``entropy`` / ``uniform``)."""
    c = len(class_names)
    mean_w, mean_r, followed, undecided = [], [], {}, []
    for k in range(c):
        rows = labels == k
        if not rows.any():
            mean_w.append([float("nan")] * w.shape[0])
            mean_r.append([float("nan")] * r.shape[0])
            continue
        mw, mr = w[:, rows].mean(1), r[:, rows].mean(1)
        mean_w.append(mw.tolist())
        mean_r.append(mr.tolist())
        top = torch.topk(mr, min(2, len(mr))).values
        if len(top) > 1 and float(top[0] - top[1]) < FOLLOW_MARGIN:
            undecided.append(class_names[k])
        else:
            followed[class_names[k]] = teacher_names[int(mr.argmax())]
    return {
        "method": method,
        "weighting": weighting,
        "classes": list(class_names),
        "teachers": list(teacher_names),
        "mean_weights": mean_w,
        "mean_responsibilities": mean_r,
        "followed": followed,
        "undecided": undecided,
        "weights": w,
        "responsibilities": r,
    }


# ----------------------------------------------------------------------------------------------
# Saved runs (for `mtbkd predict`)
# ----------------------------------------------------------------------------------------------


def save_run(result: ExperimentResult, out_dir: str | Path, dataset: Dataset) -> None:
    """Write the MT-BKD SGLD student (``student.safetensors``), its posterior samples
    (``samples.safetensors``; with several chains ``chain<c>_student.safetensors`` and
    ``chain<c>_samples.safetensors`` per chain instead), ``run.json`` (what ``predict`` needs,
    with ``predictive_temperature`` when the run was calibrated, ``config.calibrate``) and
    ``predictions.csv`` (the test rows with per-teacher weights and responsibilities)."""
    from mtbkd._files import save_safetensors

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    chosen = None
    for name in ("mtbkd_sgld", "mtbkd_map"):
        try:
            chosen = result.method(name)
            break
        except KeyError:
            continue
    if result.student is not None:
        obj, model, store = result.objective, result.student, result.store
        save_safetensors(
            {k: v.contiguous() for k, v in model.state_dict().items()},
            out / "student.safetensors",
        )
        # a rerun with another chain count must not leave the other layout's files behind
        _remove_files(out, _SAMPLE_FILES[2:])
        if isinstance(store, ChainSamples):
            store.save(out)
        else:
            store.save(out / "samples.safetensors")
        meta = {
            "dataset": result.dataset,
            "method": "mtbkd_sgld",
            "num_chains": len(store.chains) if isinstance(store, ChainSamples) else 1,
            "class_names": result.class_names,
            "teacher_names": result.teacher_names,
            "feature_kind": dataset.feature_kind,
            "feature_names": dataset.feature_names,
            "sequence_encoder": dataset.sequence_encoder,
            "in_features": model.in_features,
            "hidden": list(model.hidden),
            "num_classes": model.num_classes,
            "objective": {"kind": obj.kind, "weights": obj.weights, **obj.hparams()},
            "config": result.config.to_dict(),
        }
        temp = chosen.hparams.get("predictive_temperature") if chosen is not None else None
        if temp is not None:  # config.calibrate: predict tempers the samples as the report did
            meta["predictive_temperature"] = temp
        (out / "run.json").write_text(json.dumps(meta, indent=2))
    else:
        # what an earlier run into this folder may have left: predict would apply its posterior
        _remove_files(out, _SAMPLE_FILES)
    if chosen is not None:
        _write_predictions(
            out / "predictions.csv",
            chosen.probs,
            result.labels,
            result.attribution,
            result.teacher_names,
            class_names=result.class_names,
        )
    else:
        _remove_files(out, ("predictions.csv",))


# The files of save_run's sampled student (single chain, or one pair per chain)
_SAMPLE_FILES = ("run.json", "student.safetensors", "samples.safetensors",
                 "chain*_student.safetensors", "chain*_samples.safetensors")  # fmt: skip


def _remove_files(folder: Path, patterns: Sequence[str]) -> None:
    for pattern in patterns:
        for f in folder.glob(pattern):
            if f.is_file():
                f.unlink()


def _prediction_header(
    teacher_names, ids=None, class_names=None, labels: bool = False, attribution: bool = False
) -> list[str]:
    header = (["id"] if ids is not None else []) + [
        "pred",
        "confidence",
        "mean_deviance",
        "mutual_information",
        "credible_set",
    ]
    if class_names is not None:
        header.append("pred_class")
    if labels:
        header.append("label")
    if attribution:
        header += [f"weight_{t}" for t in teacher_names]
        header += [f"responsibility_{t}" for t in teacher_names]
    return header


def _prediction_rows(
    probs: Tensor, labels: Tensor | None, attribution=None, ids=None, class_names=None
) -> list[list[str]]:
    """The CSV rows of :func:`_write_predictions` for the rows of ``probs`` ``[S, N, C]``."""
    from mtbkd import metrics as M

    pbar = probs.mean(0)
    conf, pred = pbar.max(-1)
    md = M.mean_deviance(probs)
    mi = M.mutual_information(probs)
    sets = _credible_rows(probs)
    out = []
    for i in range(pbar.shape[0]):
        row = [ids[i]] if ids is not None else []
        members = ";".join(str(int(c)) for c in torch.nonzero(sets[i]).flatten())
        row += [
            str(int(pred[i])),
            f"{float(conf[i]):.6f}",
            f"{float(md[i]):.6f}",
            f"{float(mi[i]):.6f}",
            members,
        ]
        if class_names is not None:
            row.append(class_names[int(pred[i])])
        if labels is not None:
            row.append(str(int(labels[i])))
        if attribution is not None:
            row += [f"{float(v):.6f}" for v in attribution["weights"][:, i]]
            row += [f"{float(v):.6f}" for v in attribution["responsibilities"][:, i]]
        out.append(row)
    return out


def _write_predictions(
    path: Path,
    probs: Tensor,
    labels: Tensor | None,
    attribution,
    teacher_names,
    ids: Sequence[str] | None = None,
    class_names: Sequence[str] | None = None,
) -> None:
    """One CSV row per input: ``[id,] pred, confidence, mean_deviance, mutual_information,
    credible_set`` (class indices joined by ``;``), ``pred_class`` (the class name) when the
    class names are known, ``label`` when given, and each teacher's weight and responsibility
    when ``attribution`` is given."""
    import csv

    header = _prediction_header(
        teacher_names, ids, class_names, labels is not None, attribution is not None
    )
    with open(path, "w", newline="") as f:  # csv quotes a class name with a comma in it
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        w.writerows(_prediction_rows(probs, labels, attribution, ids, class_names))


def load_run(run_dir: str | Path):
    """``(meta, model, store)`` of a run saved by :func:`save_run`. ``predict_probs(model, x,
    store)`` gives the student's own predictive; a run made with ``config.calibrate`` reports
    (and :func:`predict_file` writes) it tempered by ``meta["predictive_temperature"]``
    (:func:`mtbkd.metrics.temper`)."""
    from safetensors.torch import load_file

    from mtbkd.posterior import SampleStore

    run = Path(run_dir)
    meta_path = run / "run.json"
    if not meta_path.is_file():
        if (run / "summary.json").is_file():
            raise FileNotFoundError(
                f"{run} holds a multi-seed run: pass one seed's folder, --run {run}/seed<k>"
            )
        if (run / "report.json").is_file():
            raise FileNotFoundError(
                f"{run} has no student to apply (no run.json): the student and its posterior "
                "samples are saved only when mtbkd_sgld is among the run's --methods"
            )
        raise FileNotFoundError(f"{run} is not a saved run (no run.json)")
    from safetensors import SafetensorError

    from mtbkd.report import read_json

    meta = read_json(meta_path)  # not JSON, or no object: an error naming the file
    need = ("in_features", "num_classes", "hidden", "feature_kind", "teacher_names", "config")
    missing = [k for k in need if k not in meta]
    if missing:
        raise ValueError(f"{meta_path} is damaged or not a run's (it lacks {', '.join(missing)})")
    chains = int(meta.get("num_chains", 1))
    files = ["student.safetensors"] + (
        [f"chain{c}_{part}.safetensors" for c in range(chains) for part in ("student", "samples")]
        if chains > 1
        else ["samples.safetensors"]
    )
    for name in files:
        if not (run / name).is_file():
            raise FileNotFoundError(f"{run} is not a complete saved run: {name} is missing")
    # a truncated file, or the student of another run: one line naming the file, no traceback
    where = run / files[0]
    try:
        model = StudentMLP(meta["in_features"], meta["num_classes"], meta["hidden"])
        model.load_state_dict(load_file(str(where)))
        model.eval()
        if chains > 1:
            where = run
            store = ChainSamples.load(run, chains, model)
        else:
            where = run / "samples.safetensors"
            store = SampleStore.load(where, model)
    except (SafetensorError, RuntimeError, ValueError, TypeError, KeyError, OSError) as exc:
        first = (str(exc).splitlines() or [""])[0]
        raise ValueError(
            f"{where} cannot be read as part of this run ({type(exc).__name__}: {first}): the "
            "run folder is damaged, or its files come from different runs"
        ) from None
    return meta, model, store


@contextlib.contextmanager
def _removed_on_error(path: Path):
    """Delete ``path`` (a partly written file) if the block raises."""
    try:
        yield
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def predict_file(
    run_dir: str | Path,
    input_path: str | Path,
    out_csv: str | Path,
    *,
    block_rows: int = 4096,
    progress: bool = False,
) -> dict:
    """Apply a saved run's posterior samples to the inputs of ``input_path`` and write one row
    per input to ``out_csv``; returns test metrics when the inputs carry labels. A run made with
    ``config.calibrate`` has its samples tempered by its ``predictive_temperature``, as in its
    report.

    The inputs go through in blocks of ``block_rows`` rows (with a progress bar over the blocks
    when ``progress``), so memory holds ``samples x block_rows x classes`` probabilities at a
    time, never those of the whole file; the CSV and the metrics do not depend on the block
    size (up to the float rounding of the student's matrix products)."""
    import csv

    from mtbkd import metrics as M
    from mtbkd.data import read_inputs

    if isinstance(block_rows, bool) or not isinstance(block_rows, numbers.Integral):
        raise TypeError(f"block_rows must be an integer, got {block_rows!r}")  # True was 1
    if block_rows < 1:
        raise ValueError(f"block_rows must be at least 1, got {block_rows}")
    block_rows = int(block_rows)
    meta, model, store = load_run(run_dir)
    x, labels, ids = read_inputs(
        input_path,
        meta["feature_kind"],
        meta.get("feature_names"),
        meta.get("sequence_encoder", "composition"),
        progress=progress,
        num_features=meta["in_features"],
    )
    if x.shape[1] != meta["in_features"]:
        raise ValueError(
            f"{input_path} has {x.shape[1]} features; the run's student takes {meta['in_features']}"
        )
    y = torch.from_numpy(labels).long() if labels is not None else None
    if y is not None and (int(y.min()) < 0 or int(y.max()) >= meta["num_classes"]):
        raise ValueError(f"{input_path} has labels outside 0..{meta['num_classes'] - 1}")
    classes = meta.get("class_names")
    chunk = meta["config"].get("predict_chunk", 50)
    # a run with config.calibrate: the samples tempered as in its report (older runs: none)
    temp = meta.get("predictive_temperature")
    n = x.shape[0]
    blocks = range(0, n, block_rows)
    stats = []
    out_csv = Path(out_csv)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    if out_csv.is_symlink():  # written through the link, as open() would
        out_csv = out_csv.resolve()
    # written beside it, then renamed over it: an interrupted run leaves no half file, and a
    # hard link of another file at out_csv keeps that file's contents
    part = out_csv.with_name(f".{out_csv.name}.{os.getpid()}.part")
    with (
        _removed_on_error(part),
        open(part, "w", newline="") as f,
        _progress(len(blocks), "predict", progress, unit="block") as bar,
    ):
        w = csv.writer(f, lineterminator="\n")
        w.writerow(_prediction_header(meta["teacher_names"], ids, classes, y is not None))
        for start in blocks:
            rows = slice(start, min(n, start + block_rows))
            probs = predict_probs(model, torch.from_numpy(x[rows]), store, chunk)
            if temp is not None:
                probs = M.temper(probs, temp)
            yb = y[rows] if y is not None else None
            idb = ids[rows] if ids is not None else None
            w.writerows(_prediction_rows(probs, yb, None, idb, classes))
            if yb is not None:
                stats.append(_row_stats(probs, yb))
            bar.update(1)
    with _removed_on_error(part):
        if out_csv.is_file():  # the file it replaces keeps its permissions
            import shutil

            shutil.copymode(out_csv, part)
        os.replace(part, out_csv)
    if y is None:
        return {}
    return _metrics_of_rows({k: torch.cat([b[k] for b in stats]) for k in stats[0]}, y)
