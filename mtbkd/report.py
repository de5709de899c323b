"""Reports of a pipeline run: the comparison table (text, markdown, JSON) and PNG figures.

``report.json`` is machine-readable: ``{"dataset": ..., "methods": [{"name", "accuracy", "nll",
"ece", "brier", "mean_deviance", "coverage", "set_size", "auroc_error", "seconds"}, ...]}`` plus
context (teachers, the validation-selected hyperparameters, which teacher the student followed
for which class). Figures: a reliability diagram, the uncertainty of right versus wrong
predictions, and the mean teacher weights and responsibilities per class (MATH.md sections 2, 8).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mtbkd.distill import FOLLOW_MARGIN, ExperimentResult, format_hparams, weighting_verdict

__all__ = [
    "COLUMNS",
    "SHIFT_COLUMN",
    "columns",
    "report_dict",
    "format_table",
    "calibration_sentence",
    "seed_calibration_sentence",
    "temperature_sentence",
    "predictive_temperatures",
    "markdown_table",
    "followed_sentences",
    "write_report",
    "reliability_curve",
    "paired_bootstrap",
    "format_bootstrap",
    "save_per_row",
    "teacher_disagreement",
    "weighting_sentence",
    "load_per_row",
    "pool_folds",
    "parse_seeds",
    "summarise_seeds",
    "format_seed_summary",
    "write_seed_summary",
]

BOOTSTRAP_METRICS = ("nll", "ece", "accuracy")

# (key, header, format) of the table's columns, in report.json's order.
COLUMNS = (
    ("accuracy", "acc", "{:.3f}"),
    ("nll", "NLL", "{:.3f}"),
    ("ece", "ECE", "{:.3f}"),
    ("brier", "Brier", "{:.3f}"),
    ("mean_deviance", "MD", "{:.3f}"),
    ("coverage", "cov95", "{:.3f}"),
    ("set_size", "size95", "{:.2f}"),
    ("auroc_error", "AUROC", "{:.3f}"),
    ("seconds", "time s", "{:.1f}"),
)
# the column of datasets with shifted inputs (Dataset.x_shift), before the time
SHIFT_COLUMN = ("auroc_shift", "AUROC shift", "{:.3f}")


def columns(rows: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """:data:`COLUMNS`, with :data:`SHIFT_COLUMN` when a row has ``auroc_shift``."""
    out = list(COLUMNS)
    if any(r.get(SHIFT_COLUMN[0]) is not None for r in rows):
        out.insert(len(out) - 1, SHIFT_COLUMN)
    return out


def _clean(x: Any) -> Any:
    # JSON has no NaN: an undefined metric (e.g. AUROC without errors) becomes null.
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def report_dict(result: ExperimentResult) -> dict[str, Any]:
    """The content of ``report.json``."""
    att = None
    if result.attribution is not None:
        a = result.attribution
        att = {
            k: a[k]
            for k in (
                "method",
                "classes",
                "teachers",
                "mean_weights",
                "mean_responsibilities",
                "followed",
            )
        }
        att["weighting"] = a.get("weighting", "entropy")
        att["undecided"] = list(a.get("undecided", []))
    return _clean(
        {
            "dataset": result.dataset,
            "features": result.features,
            "shift": result.shift_name,
            "methods": [m.row() for m in result.methods],
            "hyperparameters": {m.name: m.hparams for m in result.methods},
            "validation_nll": {m.name: m.val_nll for m in result.methods},
            "teachers": result.teachers,
            "teacher_mixtures": result.teacher_mixtures,
            "classes": result.class_names,
            "attribution": att,
            "teacher_disagreement": teacher_disagreement(result),
            "train_weighting": result.train_weighting,
            "paired_bootstrap": paired_bootstrap(result),
            "config": result.config.to_dict(),
            "total_seconds": result.seconds,
            "data_sha256": result.data_digest,
            "test_sha256": result.test_digest,
            "teachers_trained": result.teachers_trained,
        }
    )


def teacher_disagreement(result: ExperimentResult) -> dict[str, Any] | None:
    """Every method on the test rows where the teachers' top classes differ and on those where
    they agree (``None`` with fewer than two teachers): the rows a mixture of teachers could help
    on most. ``rows`` / ``disagree_rows`` count them; ``teacher_accuracy`` is each teacher's
    accuracy on the disagreeing rows; ``methods`` maps each method to the accuracy and NLL of its
    predictive on the ``agree`` and ``disagree`` rows (``None`` where there are no such rows)."""
    pred = result.teacher_pred
    if pred is None or pred.shape[0] < 2:
        return None
    labels = result.labels.long()
    if pred.shape[1] != len(labels):
        raise ValueError(
            f"teacher_pred covers {pred.shape[1]} rows, the test set has {len(labels)}"
        )
    disagree = (pred != pred[:1]).any(0)

    def part(nll: Tensor, correct: Tensor, rows: Tensor) -> dict[str, float] | None:
        if not rows.any():
            return None
        return {"accuracy": float(correct[rows].mean()), "nll": float(nll[rows].mean())}

    methods = {}
    for m in result.methods:
        nll, correct, _, _ = _per_row(m.probs, labels)
        methods[m.name] = {
            "agree": part(nll, correct, ~disagree),
            "disagree": part(nll, correct, disagree),
        }
    right = pred[:, disagree] == labels[disagree]
    return {
        "rows": len(labels),
        "disagree_rows": int(disagree.sum()),
        "teacher_accuracy": {
            t: (float(right[k].double().mean()) if disagree.any() else None)
            for k, t in enumerate(result.teacher_names)
        },
        "methods": methods,
    }


def _verdict_words(d: dict[str, Any], margin, se, extra: str) -> str:
    """The verdict clause of the weighting diagnostic (a report's, or the mean over seeds)."""
    if margin is None:  # a report written before the margin was recorded
        top = d["highest_weight_accuracy"]
        top = top["mean"] if isinstance(top, dict) else top
        best = max(v["mean"] if isinstance(v, dict) else v for v in d["teacher_accuracy"].values())
        verdict, edge = ("better" if top > best else "tie"), ""
    elif se is None:  # one disagreeing row, or older seed reports: no standard error to judge by
        return (
            f"{margin:+.3f} over the best single teacher (`{d['best_teacher']}`{extra}) with no "
            "standard error to judge that margin by (a seed with one disagreeing row, or reports "
            "written before mtbkd recorded it per teacher): whether the weighting points to the "
            "right teacher more often than a single teacher is undecided here"
        )
    else:
        verdict = weighting_verdict(margin, se)
        edge = f" (`{d['best_teacher']}`: {margin:+.3f} ± {se:.3f} s.e.{extra})"
    if verdict == "better":
        return (
            "so the weighting points to the right teacher more often than any single teacher "
            f"does{edge}"
        )
    what = "no more often than" if verdict == "tie" else "less often than"
    return (
        f"{what} the best single teacher{edge}: on these teachers the weighting carries no "
        "information a single-teacher BKD lacks"
    )


def weighting_sentence(d: dict[str, Any] | None) -> list[str]:
    """The markdown lines that state :func:`mtbkd.distill.weighting_diagnostic`'s result."""
    if not d or not d.get("disagree_rows"):
        return []
    each = ", ".join(f"`{n}` {a:.3f}" for n, a in d["teacher_accuracy"].items())
    verdict = _verdict_words(d, d.get("margin"), d.get("margin_se"), "")
    top = d["highest_weight_accuracy"]
    return [
        f"On the {d['disagree_rows']} of {d['rows']} training rows where the teachers disagree, "
        f"the teacher with the highest entropy weight is right on {top:.3f} of them (each "
        f"teacher: {each}), {verdict}.",
        "",
    ]


def _disagreement_markdown(d: dict[str, Any]) -> list[str]:
    n, k = d["rows"], d["disagree_rows"]
    teach = ", ".join(f"`{t}` {a:.3f}" for t, a in d["teacher_accuracy"].items() if a is not None)
    lines = [
        "## Where the teachers disagree",
        "",
        f"The teachers' top classes differ on {k} of {n} test rows ({100 * k / n:.1f} %)"
        + (f"; teacher accuracy there: {teach}." if teach else "."),
        "",
        "| method | acc (agree) | NLL (agree) | acc (disagree) | NLL (disagree) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, parts in d["methods"].items():
        cells = []
        for key in ("agree", "disagree"):
            p = parts[key]
            cells += ["n/a", "n/a"] if p is None else [f"{p['accuracy']:.3f}", f"{p['nll']:.3f}"]
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    return lines + [""]


def _per_row(probs: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per test row: NLL of the posterior predictive (:func:`mtbkd.metrics.row_nll`, the rows of
    the table's NLL), correctness, confidence and ECE bin."""
    from mtbkd import metrics as M

    nll = M.row_nll(probs, labels).double()
    conf, pred = M.mean_probs(probs).double().max(-1)
    return _with_bins(nll, (pred == labels).double(), conf)


def _per_row_of_stats(stats: dict[str, Tensor], labels: Tensor):
    """:func:`_per_row` from the row statistics of :func:`mtbkd.distill._row_stats` (their NLL
    and predictive mean), without computing them again."""
    conf, pred = stats["pbar"].double().max(-1)
    return _with_bins(stats["nll"].double(), (pred == labels).double(), conf)


def _with_bins(nll: Tensor, correct: Tensor, conf: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from mtbkd import metrics as M

    edges = torch.arange(1, M.ECE_BINS, dtype=torch.float32) / M.ECE_BINS
    return nll, correct, conf, torch.bucketize(conf.float(), edges, right=False)


PER_ROW_FILE = "per_row.safetensors"
# the per-row statistics (mtbkd.distill._row_stats) kept besides NLL, correctness and confidence
_ROW_STATS = ("pbar", "mean_deviance", "covered", "set_size")


def save_per_row(result: ExperimentResult, path: str | Path) -> None:
    """Each method's per-test-row NLL, correctness and confidence (float64) and the labels, to a
    safetensors file: what :func:`summarise_seeds` needs to resample test rows across seeds; and
    the predictive mean, mean deviance and 95 % credible-set coverage and size of each row, from
    which :func:`pool_folds` recomputes every metric of the table over the rows of several runs."""
    from mtbkd._files import save_safetensors
    from mtbkd.distill import _row_stats

    tensors = {"labels": result.labels.long().contiguous()}
    for m in result.methods:
        stats = _row_stats(m.probs, result.labels)
        nll, correct, conf, _ = _per_row_of_stats(stats, result.labels)
        tensors[f"{m.name}.nll"] = nll.contiguous()
        tensors[f"{m.name}.correct"] = correct.contiguous()
        tensors[f"{m.name}.conf"] = conf.contiguous()
        # the rest of what the table's metrics need of each row (pool_folds)
        for key in _ROW_STATS:
            tensors[f"{m.name}.{key}"] = stats[key].contiguous()
    meta = {"test_sha256": result.test_digest} if result.test_digest else None
    save_safetensors(tensors, path, metadata=meta)


def read_json(path: str | Path) -> dict[str, Any]:
    """A run's JSON file (``report.json``, ``summary.json``) as a dict; a damaged one (not JSON,
    or not an object) is a ``ValueError`` naming the file."""
    try:
        d = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is damaged (not JSON: {exc})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path} is damaged (a JSON {type(d).__name__}, not an object)")
    return d


def _load_tensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """A safetensors file's tensors and metadata; a damaged (truncated) one is a ``ValueError``
    naming the file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{path} is damaged ({type(exc).__name__}: {exc})") from None


def load_per_row(path: str | Path) -> dict[str, Any] | None:
    """``{"labels": Tensor, method: (nll, correct, conf, bin)}`` from :func:`save_per_row`'s file,
    or ``None`` when it is absent (a run folder written before it existed)."""
    if not Path(path).is_file():
        return None
    t, meta = _load_tensors(Path(path))
    digest = meta.get("test_sha256")
    out: dict[str, Any] = {"labels": t.pop("labels")}
    if digest:
        out["test_sha256"] = digest
    for key in t:
        name = key.rsplit(".", 1)[0]
        if name not in out and f"{name}.nll" in t:
            out[name] = _with_bins(t[f"{name}.nll"], t[f"{name}.correct"], t[f"{name}.conf"])
    return out


def _load_row_stats(path: Path) -> dict[str, Any]:
    """The labels and each method's :data:`_ROW_STATS` (plus ``nll``) from a per-row file."""
    if not path.is_file():
        raise ValueError(f"{path.parent} has no {PER_ROW_FILE} (not a finished run folder)")
    t, _ = _load_tensors(path)
    names = [k[: -len(".nll")] for k in t if k.endswith(".nll")]
    old = [n for n in names if f"{n}.pbar" not in t]
    if old:
        raise ValueError(
            f"{path} has no per-row predictive for {old}: it was written by an older mtbkd; "
            "rerun that fold"
        )
    return {
        "labels": t["labels"],
        "methods": {n: {k: t[f"{n}.{k}"] for k in ("nll",) + _ROW_STATS} for n in names},
    }


def _check_fold_settings(dirs: list[Path], reps: list[dict[str, Any]]) -> None:
    """Folds of one cross-fit: the same settings but the test fold (as ``mtbkd summarise``
    compares seeds), and, where the configs record folds (``test_folds``), each fold once. Folds
    drawn with another ``fold_seed`` or count overlap (a third of their rows at 3 folds), and
    their test digests differ: they had been pooled, rows counted twice."""
    from mtbkd.distill import experiment_settings

    if not all(rep.get("config") for rep in reps):  # reports of hand-made folds: not known
        return
    settings = [experiment_settings(rep) for rep in reps]
    for d, st in zip(dirs[1:], settings[1:], strict=True):
        keys = sorted(k for k in {*st, *settings[0]}
                      if k != "test_fold" and st.get(k) != settings[0].get(k))  # fmt: skip
        if keys:
            raise ValueError(
                f"run_dirs: {d} and {dirs[0]} ran with other settings ({', '.join(keys)}): the "
                "folds of one cross-fit differ in test_fold alone"
            )
    if settings[0].get("test_folds"):
        folds = [st.get("test_fold") for st in settings]
        twice = sorted({f for f in folds if folds.count(f) > 1})
        if twice:
            raise ValueError(f"run_dirs: test_fold {twice[0]} is pooled twice: each fold once")


def pool_folds(
    run_dirs: list[str | Path], dataset: str | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Cross-fitting: one table over the test rows of several runs whose test sets are disjoint
    parts of one dataset (folds: each run trained without the rows it was tested on), so that
    every metric is measured on all of those rows at once: the ECE's sampling noise shrinks
    about as one over the square root of the rows (``ece_floor``).

    ``run_dirs``: the runs' output folders (one seed each: ``report.json`` and
    ``per_row.safetensors``), with the same dataset, methods and classes and different test
    rows. Every metric of the table is recomputed from the pooled rows by the code that made each
    run's table (``ece_floor`` and ``ece_p`` too; not the shift AUROC, whose shifted rows are not
    kept); ``seconds`` is summed over the folds and ``validation_nll`` averaged. Returns
    ``(report, per_row)``: a ``report.json``-like dictionary (with ``folds`` and ``rows``) and
    :func:`load_per_row`'s dictionary of the pooled rows, which :func:`summarise_seeds` takes
    for several seeds of the same folds. ``dataset``: the pooled report's dataset name, needed
    when the runs' names differ (a folder dataset is named after its folder)."""
    import hashlib

    from mtbkd.distill import _metrics_of_rows

    dirs = [Path(d) for d in run_dirs]
    if len(dirs) < 2:
        raise ValueError(f"run_dirs: cross-fitting pools two runs or more, got {len(dirs)}")
    reps, stats = [], []
    for d in dirs:
        if not (d / "report.json").is_file():
            raise ValueError(f"{d} has no report.json (not a finished run folder)")
        reps.append(read_json(d / "report.json"))
        stats.append(_load_row_stats(d / PER_ROW_FILE))
    names = [m["name"] for m in reps[0]["methods"]]
    digests: dict[str, Path] = {}
    for d, rep, st in zip(dirs, reps, stats, strict=True):
        if dataset is None and rep["dataset"] != reps[0]["dataset"]:
            raise ValueError(
                f"run_dirs: {d} is on dataset {rep['dataset']!r}, {dirs[0]} on "
                f"{reps[0]['dataset']!r} (pass dataset= to name the pooled one)"
            )
        if [m["name"] for m in rep["methods"]] != names or sorted(st["methods"]) != sorted(names):
            raise ValueError(f"run_dirs: {d} ran other methods than {dirs[0]}")
        width = st["methods"][names[0]]["pbar"].shape[-1]
        if width != stats[0]["methods"][names[0]]["pbar"].shape[-1]:
            raise ValueError(f"run_dirs: {d} has {width} classes, {dirs[0]} another number")
        if bool(predictive_temperatures(rep.get("hyperparameters") or {})) != bool(
            predictive_temperatures(reps[0].get("hyperparameters") or {})
        ):
            raise ValueError(
                f"run_dirs: {d} and {dirs[0]} differ in post-hoc calibration (config.calibrate)"
            )
        digest = rep.get("test_sha256")
        if digest is not None and digest in digests:
            raise ValueError(
                f"run_dirs: {d} and {digests[digest]} were tested on the same rows; folds must "
                "have disjoint test sets"
            )
        if digest is not None:
            digests[digest] = d
    _check_fold_settings(dirs, reps)
    labels = torch.cat([st["labels"] for st in stats])
    methods, per_row = [], {"labels": labels}
    for n in names:
        cat = {k: torch.cat([st["methods"][n][k] for st in stats]) for k in ("nll",) + _ROW_STATS}
        row = {"name": n, **_metrics_of_rows(cat, labels)}
        row["seconds"] = sum(
            float(next(m for m in rep["methods"] if m["name"] == n).get("seconds") or 0.0)
            for rep in reps
        )
        methods.append(row)
        per_row[n] = _per_row_of_stats(cat, labels)
    if all(rep.get("test_sha256") for rep in reps):
        joined = "".join(rep["test_sha256"] for rep in reps).encode()
        per_row["test_sha256"] = hashlib.sha256(joined).hexdigest()
    val = {
        n: float(sum(v) / len(v))
        for n in names
        if len(v := [(r.get("validation_nll") or {}).get(n) for r in reps]) == len(reps)
        and all(x is not None for x in v)
    }
    temps: dict[str, list[float]] = {}
    for rep in reps:
        for n, t in predictive_temperatures(rep.get("hyperparameters") or {}).items():
            temps.setdefault(n, []).append(t)
    rep_out = {
        "dataset": reps[0]["dataset"] if dataset is None else dataset,
        "folds": len(dirs),
        "rows": len(labels),
        "methods": methods,
        "validation_nll": val,
        # the mean post-hoc temperature over the folds, for calibrated runs
        "hyperparameters": {
            n: {"predictive_temperature": sum(v) / len(v)} for n, v in temps.items()
        },
    }
    return _clean(rep_out), per_row


# index entries (resamples x test rows) a bootstrap draws and evaluates at once: its memory is
# ~50 bytes per entry, so ~100 MiB whatever the number of test rows (one resample at least)
_BOOTSTRAP_CHUNK = 1 << 21


def _resampled_in_chunks(per_rows: list, n: int, resamples: int, gen: torch.Generator):
    """:func:`_resampled` of each of ``per_rows`` (per-row data of ``n`` test rows) over the same
    ``resamples`` row resamples, ``[resamples]`` per metric: ``torch.randint(0, n, (resamples,
    n), generator=gen)``, drawn and evaluated a chunk of resamples at a time. The chunks take
    the generator's numbers in the order of one whole draw (a CPU generator fills a tensor in
    order), and each resample's metrics depend only on its own row, so the results are
    bit-identical to one ``[resamples, n]`` draw."""
    step = max(1, _BOOTSTRAP_CHUNK // max(n, 1))
    parts: list[dict[str, list[Tensor]]] = [{} for _ in per_rows]
    for start in range(0, resamples, step):
        idx = torch.randint(0, n, (min(step, resamples - start), n), generator=gen)
        for part, rows in zip(parts, per_rows, strict=True):
            for k, v in _resampled(rows, idx).items():
                part.setdefault(k, []).append(v)
    return [{k: torch.cat(v) for k, v in part.items()} for part in parts]


def _resampled(per_row, idx: Tensor) -> dict[str, Tensor]:
    """NLL, ECE and accuracy over every resample ``idx [B, N]`` of the test rows."""
    from mtbkd import metrics as M

    nll, correct, conf, bins = per_row
    n = idx.shape[1]
    keys = (bins[idx] + M.ECE_BINS * torch.arange(len(idx))[:, None]).flatten()
    gap = torch.bincount(keys, (correct - conf)[idx].flatten(), minlength=len(idx) * M.ECE_BINS)
    return {
        "nll": nll[idx].mean(1),
        "ece": gap.view(len(idx), M.ECE_BINS).abs().sum(1) / n,
        "accuracy": correct[idx].mean(1),
    }


def paired_bootstrap(
    result: ExperimentResult,
    reference: str = "mtbkd_sgld",
    resamples: int = 1000,
    seed: int = 0,
) -> dict[str, Any] | None:
    """Paired bootstrap over the test rows: for every other method, the difference
    ``reference - method`` of NLL, ECE and accuracy on the test rows (``diff``: the table's
    numbers, not the mean over resamples, which for the ECE is biased), with the 95 % percentile
    interval of that difference on the same resampled rows and the fraction of resamples where
    the reference is better. A difference whose interval contains 0 is within the test set's
    sampling noise. ``None`` when the reference method did not run or ran alone."""
    from mtbkd.metrics import _positive_int

    resamples = _positive_int(resamples, "resamples")
    try:
        ref = result.method(reference)
    except KeyError:
        return None
    if len(result.methods) < 2:  # nothing to compare with: no empty table
        return None
    labels = result.labels
    gen = torch.Generator().manual_seed(seed)
    others = [m for m in result.methods if m.name != reference]
    per_rows = [_per_row(ref.probs, labels)] + [_per_row(m.probs, labels) for m in others]
    # every method on the same resamples of the test rows, a chunk of resamples at a time
    boot = _resampled_in_chunks(per_rows, len(labels), resamples, gen)
    every = torch.arange(len(labels))[None]  # the test set itself, as one "resample"
    ref_m, ref_all = boot[0], _resampled(per_rows[0], every)
    out: dict[str, Any] = {"reference": reference, "resamples": resamples, "methods": {}}
    for m, rows, other in zip(others, per_rows[1:], boot[1:], strict=True):
        other_all = _resampled(rows, every)
        row = {}
        for key in BOOTSTRAP_METRICS:
            d = ref_m[key] - other[key]
            lo, hi = torch.quantile(d, torch.tensor([0.025, 0.975], dtype=d.dtype)).tolist()
            better = (d > 0) if key == "accuracy" else (d < 0)
            row[key] = {
                "diff": float(ref_all[key][0] - other_all[key][0]),
                "low": lo,
                "high": hi,
                "p_better": float(better.double().mean()),
            }
        out["methods"][m.name] = row
    return out


def _aligned(header: list[str], body: list[list[str]], markdown: bool) -> list[str]:
    """Lines of a table: markdown, or plain text with the first column left-aligned, the others
    right-aligned and a rule under the header."""
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
        return lines + ["| " + " | ".join(r) + " |" for r in body]
    widths = [max(len(x[i]) for x in [header] + body) for i in range(len(header))]
    lines = []
    for j, line in enumerate([header] + body):
        cells = zip(line, widths, strict=True)
        lines.append(
            "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(cells))
        )
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return lines


def _diff_cell(diff, low, high, p_better=None, wins: str | None = None) -> str:
    """``+0.012 [-0.003, +0.027]  [wins]  [P(better)]``; no interval where it is unknown."""
    cell = f"{diff:+.3f}"
    if low is not None and high is not None:
        cell += f" [{low:+.3f}, {high:+.3f}]"
    if wins is not None:
        cell += f"  {wins}"
    if p_better is not None:
        cell += f"  {p_better:.2f}"
    return cell


def _versus_rows(methods: dict[str, Any], markdown: bool, cell) -> list[list[str]]:
    """One table row per compared method: its name, then ``cell`` of each difference."""
    return [
        [f"`{name}`" if markdown else name] + [cell(row[k]) for k in BOOTSTRAP_METRICS]
        for name, row in methods.items()
    ]


def format_bootstrap(boot: dict[str, Any] | None, markdown: bool = False) -> str:
    """The paired-bootstrap differences as a table (plain text, or markdown)."""
    if not boot:
        return ""
    ref = boot["reference"]
    header = ["vs method"] + [f"Δ{k} [95 % CI]  P(better)" for k in BOOTSTRAP_METRICS]
    rows = _versus_rows(
        boot["methods"],
        markdown,
        lambda r: _diff_cell(r["diff"], r["low"], r["high"], r["p_better"]),
    )
    if markdown:
        return "\n".join(_aligned(header, rows, True))
    title = f"{ref} minus each method, paired bootstrap over test rows ({boot['resamples']}):"
    return "\n".join([title] + _aligned(header, rows, False))


def _cells(row: dict[str, Any], cols: list[tuple[str, str, str]]) -> list[str]:
    out = []
    for key, _, fmt in cols:
        v = row.get(key)
        out.append(
            "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else fmt.format(v)
        )
    return out


def format_table(rows: list[dict[str, Any]]) -> str:
    """Aligned plain-text table of ``report.json``'s ``methods`` rows."""
    cols = columns(rows)
    header = ["method"] + [h for _, h, _ in cols]
    body = [[r["name"]] + _cells(r, cols) for r in rows]
    return "\n".join(_aligned(header, body, False))


def markdown_table(rows: list[dict[str, Any]]) -> str:
    cols = columns(rows)
    header = ["method"] + [h for _, h, _ in cols]
    body = [[f"`{r['name']}`"] + _cells(r, cols) for r in rows]
    return "\n".join(_aligned(header, body, True))


ECE_ALPHA = 0.05  # the p-value under which calibration_sentence calls a method miscalibrated


def _finite(values) -> list[float]:
    """The values that are numbers (JSON's null and NaN left out)."""
    return [v for v in values if v is not None and math.isfinite(v)]


def _direction(row: dict[str, Any]) -> str:
    """``mean confidence 0.040 above accuracy`` from a row's ``overconfidence`` (a report's
    number, or a summary's spread over seeds: its mean); empty without it. The overall
    direction only: ECE also counts deviations of opposite signs in different bins."""
    v = row.get("overconfidence")
    v = _finite([v.get("mean") if isinstance(v, dict) else v])
    if not v:
        return ""
    return f"mean confidence {abs(v[0]):.3f} {'above' if v[0] > 0 else 'below'} accuracy"


def calibration_sentence(
    rows: list[dict[str, Any]], num_rows: int | None = None, markdown: bool = False
) -> list[str]:
    """What the ECE column can resolve on this test set, from the rows' ``ece_floor`` /
    ``ece_p`` (:func:`mtbkd.distill.evaluate_probs`): the range of ECE a perfectly calibrated
    model with each method's predictions would score, and which methods' ECE lies beyond that
    noise (``ece_p`` < :data:`ECE_ALPHA`). Empty when no row has them (a report written before
    they existed)."""
    have = [r for r in rows if r.get("ece_floor") is not None and r.get("ece_p") is not None]
    if not have:
        return []
    q = "`" if markdown else ""
    floors = [r["ece_floor"] for r in have]
    lo, hi = f"{min(floors):.3f}", f"{max(floors):.3f}"
    span = lo if lo == hi else f"{lo}-{hi}"
    where = f"these {num_rows} test rows" if num_rows else "these test rows"
    bad = [r for r in have if r["ece_p"] < ECE_ALPHA]
    good = [r for r in have if r["ece_p"] >= ECE_ALPHA]
    text = (
        "ECE resolution: a perfectly calibrated model with each method's predictions would be "
        f"expected to score ECE {span} on {where} (labels drawn from its own predictive, "
        f"{q}ece_floor{q}). "
    )
    if bad:
        text += (
            f"Miscalibration the test rows can detect (p < {ECE_ALPHA:g}, {q}ece_p{q}: how rarely "
            "a calibrated model scores the method's ECE or more): "
            + ", ".join(
                f"{q}{r['name']}{q} ("
                + ", ".join(x for x in (f"p = {r['ece_p']:.3g}", _direction(r)) if x)
                + ")"
                for r in bad
            )
            + ". "
        )
    if good:
        who = "the other methods'" if bad else "every method's"
        text += (
            f"{who[0].upper()}{who[1:]} ECE is within that noise (p ≥ {ECE_ALPHA:g}): these test "
            "rows cannot tell them from calibrated."
        )
    return [text.strip()]


def followed_sentences(attribution: dict[str, Any] | None) -> list[str]:
    """One sentence per teacher: the classes for which the student followed it (largest mean
    responsibility over the test rows of that class, ahead of every other teacher's by
    :data:`mtbkd.distill.FOLLOW_MARGIN`), and one for the classes where no teacher stands out."""
    if attribution is None:
        return []
    by_teacher: dict[str, list[str]] = {t: [] for t in attribution["teachers"]}
    for cls, teacher in attribution["followed"].items():
        by_teacher[teacher].append(cls)
    out = []
    for t, classes in by_teacher.items():
        if classes:
            out.append(f"The student followed teacher `{t}` for classes {', '.join(classes)}.")
        else:
            out.append(f"The student followed teacher `{t}` for no class.")
    undecided = attribution.get("undecided") or []
    if undecided:
        out.append(
            f"No teacher stands out (mean responsibilities within {FOLLOW_MARGIN:g} of each "
            f"other) for classes {', '.join(undecided)}."
        )
    named = {*attribution["followed"], *undecided}
    empty = [c for c in attribution.get("classes") or [] if c not in named]
    if empty:  # (they were named in neither sentence)
        out.append(f"Classes {', '.join(empty)} have no test rows: no teacher is read for them.")
    return out


def _shift_rows(result: ExperimentResult) -> int:
    return next((m.shift_probs.shape[1] for m in result.methods if m.shift_probs is not None), 0)


def temperature_sentence(
    temps: dict[str, float], markdown: bool = False, seeds: int = 0
) -> list[str]:
    """The post-hoc temperatures of a calibrated run (``config.calibrate``; ``temps``: method
    name to its ``predictive_temperature``, the mean over ``seeds`` seeds when given). Empty
    when the run was not calibrated."""
    if not temps:
        return []
    q = "`" if markdown else ""
    over = f" (mean over {seeds} seeds)" if seeds else ""
    return [
        f"Post-hoc temperature scaling ({q}calibrate{q}): each method's predictive is tempered "
        "by one temperature fitted on the validation split after its hyperparameters were "
        f"chosen, T{over} = "
        + ", ".join(f"{q}{n}{q} {t:.2f}" for n, t in temps.items())
        + " (T < 1 sharpens an under-confident predictive, T > 1 softens an over-confident one); "
        "the validation NLL is the untempered one that chose the hyperparameters."
    ]


def predictive_temperatures(hyperparameters: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Method name to its ``predictive_temperature``, for the methods that have one."""
    return {
        n: h["predictive_temperature"]
        for n, h in hyperparameters.items()
        if h.get("predictive_temperature") is not None
    }


def _markdown(result: ExperimentResult, rep: dict[str, Any], figures: list[str]) -> str:
    lines = [f"# MT-BKD report: {result.dataset}", ""]
    if result.features:
        lines += [f"Student input: {result.features}.", ""]
    lines += [markdown_table(rep["methods"]), ""]
    cal = calibration_sentence(rep["methods"], len(result.labels), markdown=True)
    lines += [*cal, ""] if cal else []
    temp = temperature_sentence(predictive_temperatures(rep["hyperparameters"]), markdown=True)
    lines += [*temp, ""] if temp else []
    lines += [
        "acc: accuracy of the posterior-mean prediction; NLL, ECE (15 bins), Brier of the "
        "posterior predictive; MD: mean deviance (the paper's uncertainty score, nats); cov95 / "
        "size95: coverage and mean size of the 95 % credible sets; AUROC: predictive entropy "
        "as a detector of wrong predictions; "
        + (
            f"AUROC shift: predictive entropy as a detector of shifted inputs ({result.shift_name}"
            f", {_shift_rows(result)} rows) among the test rows; "
            if result.shift_name
            else ""
        )
        + "time: training seconds of the selected run. "
        "Hyperparameters chosen by validation NLL on a split of the training set.",
        "",
        *(
            [
                f"## {rep['paired_bootstrap']['reference']} against each method",
                "",
                "Differences (`" + rep["paired_bootstrap"]["reference"] + "` minus the method) "
                "on the test rows, with 95 % intervals from bootstrap resamples of the test rows "
                "(the same for both) and the fraction of resamples in which it is better (lower "
                "NLL / ECE, higher accuracy). "
                "An interval that contains 0 is within the sampling noise of the test set "
                "(for ECE, which resampling raises, and by more for the better calibrated of "
                "the two, the percentile interval sits off-centre, mostly toward 0: "
                "conservative).",
                "",
                format_bootstrap(rep["paired_bootstrap"], markdown=True),
                "",
            ]
            if rep.get("paired_bootstrap")
            else []
        ),
        *(
            _disagreement_markdown(rep["teacher_disagreement"])
            if rep.get("teacher_disagreement")
            else []
        ),
        *weighting_sentence(rep.get("train_weighting")),
        "## Teachers (test set)",
        "",
        "| teacher | acc | NLL | ECE |",
        "|---|---:|---:|---:|",
    ]
    for t in result.teachers:
        lines.append(f"| `{t['name']}` | {t['accuracy']:.3f} | {t['nll']:.3f} | {t['ece']:.3f} |")
    for t in result.teacher_mixtures or []:
        lines.append(f"| *{t['name']}* | {t['accuracy']:.3f} | {t['nll']:.3f} | {t['ece']:.3f} |")
    if result.teacher_mixtures:
        lines += [
            "",
            "*average*: the teachers' probabilities averaged; *entropy-weighted*: mixed per row "
            "with the entropy weights of MATH.md section 1 (MT-BKD's `weights='entropy'`). What "
            "the teachers know together, before any student.",
        ]
    lines += ["", "## Selected hyperparameters", ""]
    val = rep.get("validation_nll") or {}
    for name, h in rep["hyperparameters"].items():
        hs = format_hparams(h)
        v = val.get(name)
        lines.append(f"- `{name}`: {hs}" + ("" if v is None else f" (validation NLL {v:.3f})"))
    if result.attribution is not None:
        a = result.attribution
        lines += ["", f"## Which teacher the student followed ({a['method']})", ""]
        lines += followed_sentences(a)
        lines += [
            "",
            "| class | "
            + " | ".join(f"w `{t}`" for t in a["teachers"])
            + " | "
            + " | ".join(f"r `{t}`" for t in a["teachers"])
            + " |",
            "|---|" + "---:|" * (2 * len(a["teachers"])),
        ]
        for cls, w, r in zip(
            a["classes"], a["mean_weights"], a["mean_responsibilities"], strict=True
        ):
            vals = [f"{v:.2f}" if math.isfinite(v) else "n/a" for v in list(w) + list(r)]
            lines.append(f"| {cls} | " + " | ".join(vals) + " |")
        lines += [
            "",
            f"w: prior mixture weight ({a.get('weighting', 'entropy')} weights, teachers only); "
            "r: posterior "
            "responsibility (which teacher's Dirichlet component explains the student's "
            "prediction), averaged over the test rows of each class and the samples.",
        ]
    if figures:
        lines += ["", "## Figures", ""] + [f"![{f}]({f})" for f in figures]
    return "\n".join(lines) + "\n"


def reliability_curve(probs: Tensor, labels: Tensor, n_bins: int = 15):
    """``(confidence, accuracy, count)`` per bin of 15 equal-width right-closed bins on the
    posterior-mean confidence (MATH.md section 8's ECE binning)."""
    from mtbkd import metrics as M

    pbar = M.mean_probs(probs)  # the samples averaged in fp32 (fp64 kept), as by the ECE
    labels = M._labels(labels, pbar.shape[0], pbar.shape[1])
    conf, pred = pbar.max(-1)
    conf = conf.float()
    correct = (pred == labels).float()
    idx = M._ece_bins(conf, M._positive_int(n_bins, "n_bins"))  # the ECE's bins
    # sums in fp64, as by the ECE (fp32 sums over a million rows round visibly)
    count = torch.bincount(idx, minlength=n_bins).double()
    csum = torch.bincount(idx, weights=conf.double(), minlength=n_bins)
    asum = torch.bincount(idx, weights=correct.double(), minlength=n_bins)
    safe = count.clamp_min(1)
    return (csum / safe).float(), (asum / safe).float(), count.float()


def _figures(result: ExperimentResult, out: Path, boot: dict[str, Any] | None = None) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mtbkd import metrics as M

    names = [m.name for m in result.methods]
    curves = ("ce", "entropy_kd", "avg_kd", "mtbkd_map", "mtbkd_sgld", "avg_bkd")
    focus = [n for n in curves if n in names]
    files = []
    y = result.labels

    # reliability curves above, the number of test rows per confidence bin below (a bin's
    # accuracy is only as sure as its count)
    fig, (ax, axc) = plt.subplots(
        2, 1, figsize=(5.2, 6.4), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    ax.plot([0, 1], [0, 1], "k:", lw=1, label="perfect calibration")
    edges = torch.linspace(0, 1, 16).numpy()
    for n in focus:
        conf, acc, count = reliability_curve(result.method(n).probs, y)
        keep = count >= 5  # bins of a handful of rows are noise
        (line,) = ax.plot(
            conf[keep].numpy(),
            acc[keep].numpy(),
            "o-",
            ms=3,
            label=f"{n} (ECE {result.method(n).metrics['ece']:.3f})",
        )
        axc.stairs(count.numpy(), edges, color=line.get_color(), lw=1.2)
    ax.set_ylabel("accuracy")
    ax.set_title(f"Reliability diagram, {result.dataset} test set")
    ax.legend(fontsize=8, loc="upper left")
    axc.set_yscale("symlog", linthresh=10)
    axc.set_ylabel("rows per bin")
    axc.set_xlabel("confidence (posterior-mean max probability)")
    fig.tight_layout()
    fig.savefig(out / "reliability.png", dpi=110)
    plt.close(fig)
    files.append("reliability.png")

    shown = [n for n in ("ce", "mtbkd_sgld") if n in names] or names[:1]
    fig, axes = plt.subplots(1, len(shown), figsize=(5 * len(shown), 3.8), squeeze=False)
    for ax, n in zip(axes[0], shown, strict=True):
        mres = result.method(n)
        probs = mres.probs
        unc = M.predictive_entropy(probs)
        right = probs.mean(0).argmax(-1) == y
        groups = [(unc[right], "right"), (unc[~right], "wrong")]
        if mres.shift_probs is not None:  # the shifted inputs, a third histogram
            groups.append((M.predictive_entropy(mres.shift_probs), "shifted"))
        top = max(float(g.max()) for g, _ in groups if len(g))
        bins = torch.linspace(0, top + 1e-6, 30).numpy()
        for vals, what in groups:
            if len(vals):  # a density of no rows is undefined
                ax.hist(vals.numpy(), bins=bins, alpha=0.5, density=True,
                        label=f"{what} ({len(vals)})")  # fmt: skip
        auroc = mres.metrics["auroc_error"]
        title = f"{n}: AUROC {auroc:.3f}" if math.isfinite(auroc) else n
        if "auroc_shift" in mres.metrics:
            title += f", shift {mres.metrics['auroc_shift']:.3f}"
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("predictive entropy (nats)")
        ax.set_ylabel("density")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "uncertainty.png", dpi=110)
    plt.close(fig)
    files.append("uncertainty.png")

    a = result.attribution
    if a is not None:
        import numpy as np

        classes, teachers = a["classes"], a["teachers"]
        w, r = np.array(a["mean_weights"]), np.array(a["mean_responsibilities"])
        # at most 40 inches wide (900 classes made a 69,520-pixel PNG in a minute), the class
        # names thinned to at most 60 beyond that
        width_in = min(max(6, 0.7 * len(classes) + 2), 40)
        fig, axes = plt.subplots(2, 1, figsize=(width_in, 6), sharex=True)
        xs = np.arange(len(classes))
        width = 0.8 / len(teachers)
        for ax, vals, title in (
            (axes[0], w, f"prior weight w_k ({a.get('weighting', 'entropy')} weights)"),
            (axes[1], r, "responsibility r_k (followed teacher)"),
        ):
            for j, t in enumerate(teachers):
                ax.bar(xs + (j - (len(teachers) - 1) / 2) * width, vals[:, j], width, label=t)
            ax.set_ylim(0, 1)
            ax.set_ylabel("mean over test rows")
            ax.set_title(title, fontsize=10)
        axes[0].legend(fontsize=8, ncol=len(teachers))
        step = -(-len(classes) // 60)
        axes[1].set_xticks(xs[::step])
        axes[1].set_xticklabels(
            classes[::step],
            rotation=30 if len(classes) > 10 or max(len(c) for c in classes) > 3 else 0,
            ha="right",
            fontsize=8,
        )
        axes[1].set_xlabel("true class")
        fig.suptitle(f"Teachers per class, {a['method']} on {result.dataset}", fontsize=11)
        fig.tight_layout()
        fig.savefig(out / "teachers.png", dpi=110)
        plt.close(fig)
        files.append("teachers.png")

    if boot and boot["methods"]:
        others = list(boot["methods"])
        cols = len(BOOTSTRAP_METRICS)
        size = (4.2 * cols, 0.45 * len(others) + 1.6)
        fig, axes = plt.subplots(1, cols, figsize=size, sharey=True, squeeze=False)
        pos = list(range(len(others)))[::-1]
        for ax, key in zip(axes[0], BOOTSTRAP_METRICS, strict=True):
            rows = [boot["methods"][n][key] for n in others]
            d = [r["diff"] for r in rows]
            better = [(r["high"] < 0) if key != "accuracy" else (r["low"] > 0) for r in rows]
            worse = [(r["low"] > 0) if key != "accuracy" else (r["high"] < 0) for r in rows]
            colors = ["tab:green" if b else "tab:red" if w else "tab:gray"
                      for b, w in zip(better, worse, strict=True)]  # fmt: skip
            ax.axvline(0.0, color="k", lw=0.8)
            for p_, x_, r, c in zip(pos, d, rows, colors, strict=True):
                # the interval need not contain the test set's difference (the ECE's is biased)
                mid, half = (r["low"] + r["high"]) / 2, (r["high"] - r["low"]) / 2
                ax.errorbar(mid, p_, xerr=half, fmt="none", ecolor=c, capsize=3)
                ax.plot(x_, p_, "o", color=c, ms=4)
            ax.set_title(f"Δ{key} ({'higher' if key == 'accuracy' else 'lower'} is better)")
            ax.set_yticks(pos, others)
        fig.suptitle(
            f"{boot['reference']} minus each method, 95 % paired-bootstrap intervals "
            "(green: better, red: worse, grey: within noise)",
            fontsize=9,
        )
        fig.tight_layout()
        fig.savefig(out / "comparison.png", dpi=110)
        plt.close(fig)
        files.append("comparison.png")
    return files


def write_report(result: ExperimentResult, out_dir: str | Path, figures: bool = True) -> dict:
    """Write ``report.json``, ``report.md``, ``per_row.safetensors`` (:func:`save_per_row`) and
    (with ``figures``) the PNGs to ``out_dir``; returns the report dictionary."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rep = report_dict(result)
    save_per_row(result, out / PER_ROW_FILE)
    files = _figures(result, out, rep.get("paired_bootstrap")) if figures else []
    (out / "report.md").write_text(_markdown(result, rep, files))
    # report.json last, and atomically: a --seeds --resume counts a seed as done when it exists
    tmp = out / "report.json.tmp"
    tmp.write_text(json.dumps(rep, indent=2))
    tmp.replace(out / "report.json")
    return rep


# ---------------------------------------------------------------------------------------------
# Several seeds: the same experiment repeated with other validation splits and initialisations


# seeds go to numpy, torch and the pipeline's derived seeds (seed + chain, seed + 2000)
MAX_SEED = 2**31 - 1
MAX_SEEDS = 10_000  # runs in one --seeds list


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"``, ``"0-4"`` or a mix (``"0-2,7"``) as a list of distinct seeds, in order;
    each in ``0..MAX_SEED``, at most :data:`MAX_SEEDS` of them."""
    seeds: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part[1:]:
                lo, hi = (int(x) for x in part.split("-", 1))
                if hi < lo:
                    raise ValueError
                bounds = (lo, hi)
            else:
                bounds = (int(part), int(part))
        except ValueError:
            raise ValueError(
                f"seeds: {text!r} is not a list like '0,1,2' or a range like '0-4'"
            ) from None
        if bounds[0] < 0 or bounds[1] > MAX_SEED:
            raise ValueError(f"seeds: {part!r} is outside 0..{MAX_SEED}")
        if len(seeds) + bounds[1] - bounds[0] + 1 > MAX_SEEDS:
            raise ValueError(f"seeds: {text!r} names more than {MAX_SEEDS} seeds")
        seeds.extend(range(bounds[0], bounds[1] + 1))
    if not seeds:
        raise ValueError(f"seeds: {text!r} names no seed")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds: {text!r} names a seed twice")
    return seeds


def format_seeds(seeds: list[int]) -> str:
    """Seeds as ``--seeds`` takes them: runs of consecutive seeds as ranges (``[0, 1, 2, 7]`` ->
    ``"0-2,7"``); :func:`parse_seeds` reads it back."""
    parts, start = [], None
    ordered = list(seeds)
    for i, s in enumerate(ordered):
        start = s if start is None else start
        if i + 1 == len(ordered) or ordered[i + 1] != s + 1:
            parts.append(f"{start}-{s}" if s > start else str(s))
            start = None
    return ",".join(parts)


def _t_quantile(df: int) -> float | None:
    try:
        from scipy.stats import t  # scikit-learn's dependency; optional here
    except ImportError:
        return None
    return float(t.ppf(0.975, df))


def _spread(values: list[float]) -> dict[str, Any]:
    v = torch.tensor(values, dtype=torch.float64)
    ok = torch.isfinite(v)
    n = int(ok.sum())
    mean = float(v[ok].mean()) if n else float("nan")
    std = float(v[ok].std()) if n > 1 else float("nan")
    return {"mean": mean, "std": std, "values": values}


def _same_data_files(a: dict, b: dict) -> bool:
    """Whether two reports were run on the same data files (their ``data_sha256``, recorded for
    ``--data-dir`` datasets): then their dataset names, the folders' names, may differ."""
    da, db = a.get("data_sha256"), b.get("data_sha256")
    return da is not None and da == db


def summarise_seeds(
    reports: list[dict[str, Any]],
    seeds: list[int],
    reference: str = "mtbkd_sgld",
    per_row: list[dict[str, Any] | None] | None = None,
    resamples: int = 1000,
    bootstrap_seed: int = 0,
) -> dict[str, Any]:
    """Summary of one experiment repeated over ``seeds`` (``reports``: each seed's
    ``report.json`` dictionary, in the order of ``seeds``).

    ``methods``: per method and metric of the table, and its ``validation_nll`` (what the
    hyperparameters were chosen by, from each report's ``validation_nll``), the mean, the
    standard deviation over seeds and the per-seed values. ``versus``: per method other than
    ``reference``, the per-seed difference ``reference - method`` of NLL, ECE and accuracy, its
    mean, standard deviation, a 95 % Student-t interval over seeds (``None`` with one seed, or
    without scipy) and in how many seeds the reference was better (lower NLL / ECE, higher
    accuracy). Seeds change the validation split and every initialisation (and the test split,
    for datasets split per seed: ``shared_test_rows``, known from ``per_row``); over a shared test
    set that interval measures only how much the comparison depends on the training run.

    ``teacher_disagreement`` (when every report has one): the mean ± sd over seeds of the
    fraction of test rows where the teachers disagree and of each method's accuracy and NLL there
    and on the agreeing rows.

    ``train_weighting`` (when every report has one, with the same teachers): the mean ± sd over
    seeds of each report's weighting diagnostic (:func:`mtbkd.distill.weighting_diagnostic`).

    With ``per_row`` (each seed's :func:`load_per_row`) every difference also gets a two-level
    paired bootstrap (``boot_low``, ``boot_high``, ``p_better``): each of ``resamples`` draws
    resamples the seeds and, independently, the test rows (the same rows for every method; for
    every seed too when all seeds share one test set, ``shared_test_rows``), and averages
    ``reference - method`` over the drawn seeds on the drawn rows, so its interval covers both
    the training run's randomness and the test set's sampling noise."""
    from mtbkd.metrics import _positive_int

    resamples = _positive_int(resamples, "resamples")
    if len(reports) != len(seeds) or not reports:
        raise ValueError(
            f"reports: expected one report per seed ({len(seeds)}), got {len(reports)}"
        )
    names = [m["name"] for m in reports[0]["methods"]]
    for s, rep in zip(seeds, reports, strict=True):
        if rep["dataset"] != reports[0]["dataset"] and not _same_data_files(rep, reports[0]):
            raise ValueError(
                f"reports: seed {s} is on dataset {rep['dataset']!r}, seed {seeds[0]} on "
                f"{reports[0]['dataset']!r}"
            )
        if [m["name"] for m in rep["methods"]] != names:
            raise ValueError(f"reports: seed {s} ran other methods than seed {seeds[0]}")
    # tempered and untempered predictives must not be averaged together (--resume of a run
    # with --calibrate given or dropped)
    calibrated = [s for s, rep in zip(seeds, reports, strict=True)
                  if predictive_temperatures(rep.get("hyperparameters") or {})]  # fmt: skip
    if calibrated and len(calibrated) != len(seeds):
        plain = [s for s in seeds if s not in calibrated]
        raise ValueError(
            f"reports: seeds {calibrated} were calibrated (config.calibrate) and seeds {plain} "
            "were not; summarise runs made with the same setting (rerun the others in a new "
            "--out)"
        )
    keys = [k for k, _, _ in columns([m for rep in reports for m in rep["methods"]])]

    def values(name: str, key: str) -> list[float]:
        out = []
        for rep in reports:
            v = next(m for m in rep["methods"] if m["name"] == name).get(key)
            out.append(float("nan") if v is None else float(v))
        return out

    def val_nll(name: str) -> list[float]:
        out = [(rep.get("validation_nll") or {}).get(name) for rep in reports]
        return [float("nan") if v is None else float(v) for v in out]

    # ECE's resolution (evaluate_probs' ece_floor / ece_p), when the reports have it
    keys += [
        k
        for k in ("overconfidence", "ece_floor", "ece_p")
        if any(m.get(k) is not None for rep in reports for m in rep["methods"])
    ]
    methods = [
        {
            "name": n,
            **{k: _spread(values(n, k)) for k in keys},
            "validation_nll": _spread(val_nll(n)),
        }
        for n in names
    ]
    # one seed cannot tell whether the test rows change with the seed
    shared = _shared_test_rows(per_row) if len(seeds) > 1 else None
    versus = None
    if reference in names and len(names) > 1:  # alone, it has nothing to be compared with
        versus = {"reference": reference, "methods": {}}
        ref = {k: values(reference, k) for k in BOOTSTRAP_METRICS}
        for n in names:
            if n == reference:
                continue
            row = {}
            for k in BOOTSTRAP_METRICS:
                d = [a - b for a, b in zip(ref[k], values(n, k), strict=True)]
                sp = _spread(d)
                # a seed whose report lacks the metric (null) counts in neither the mean nor the
                # interval's degrees of freedom
                n_ok = sum(math.isfinite(x) for x in d)
                tq = _t_quantile(n_ok - 1) if n_ok > 1 else None
                half = None
                if tq is not None and math.isfinite(sp["std"]):
                    half = tq * sp["std"] / math.sqrt(n_ok)
                wins = sum((x > 0) if k == "accuracy" else (x < 0) for x in d)
                row[k] = {
                    "diff": sp["mean"],
                    "std": sp["std"],
                    "low": None if half is None else sp["mean"] - half,
                    "high": None if half is None else sp["mean"] + half,
                    "wins": int(wins),
                    "runs": n_ok,
                    "values": d,
                }
            versus["methods"][n] = row
        boot = _seed_bootstrap(
            per_row, names, reference, len(seeds), resamples, bootstrap_seed, shared
        )
        if len(seeds) > 1 and _t_quantile(1) is None:
            versus["no_interval"] = "scipy, which gives the Student-t quantile, is not installed"
        if boot is not None:
            versus["resamples"] = resamples
            versus["shared_test_rows"] = shared
            for n, row in versus["methods"].items():
                for k in BOOTSTRAP_METRICS:
                    row[k].update(boot[n][k])
    disagreement = _seed_disagreement(reports, names)
    # the post-hoc temperatures of calibrated runs (config.calibrate), per method over seeds
    temps: dict[str, list[float]] = {}
    for rep in reports:
        for n, t in predictive_temperatures(rep.get("hyperparameters") or {}).items():
            temps.setdefault(n, []).append(t)
    return _clean(
        {
            "dataset": reports[0]["dataset"],
            "seeds": list(seeds),
            "predictive_temperature": {n: _spread(v) for n, v in temps.items()} or None,
            # whether every seed was tested on the same rows (None: no per-row data to tell)
            "shared_test_rows": shared,
            "methods": methods,
            "versus": versus,
            "teacher_disagreement": disagreement,
            "train_weighting": _seed_weighting(reports),
        }
    )


def _seed_weighting(reports: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Across seeds, the mean ± sd of each report's ``train_weighting`` (the weighting
    diagnostic on the training rows; ``None`` unless every report has one with disagreeing rows
    and the same teachers)."""
    parts = [rep.get("train_weighting") for rep in reports]
    if any(p is None or not p.get("disagree_rows") for p in parts):
        return None
    teachers = list(parts[0]["teacher_accuracy"])
    if any(list(p["teacher_accuracy"]) != teachers for p in parts):
        return None
    out = {
        "disagree_fraction": _spread([p["disagree_rows"] / p["rows"] for p in parts]),
        "highest_weight_accuracy": _spread([p["highest_weight_accuracy"] for p in parts]),
        "teacher_accuracy": {
            n: _spread([p["teacher_accuracy"][n] for p in parts]) for n in teachers
        },
    }
    if all(p.get("margin") is not None for p in parts):
        # the best teacher of the seeds' mean accuracy; each seed's margin against that teacher
        best = max(teachers, key=lambda n: out["teacher_accuracy"][n]["mean"])
        out["best_teacher"] = best
        out["margin"] = _spread(
            [p["highest_weight_accuracy"] - p["teacher_accuracy"][best] for p in parts]
        )
        # one seed's standard error of the margin against `best`, averaged: the seeds share most
        # training rows, so their errors are not independent and shrinking by sqrt(seeds) would
        # overstate certainty. A report's own margin_se is against its own best teacher; reports
        # written before margin_se_by_teacher give it only where that teacher is `best`.
        ses = [
            (p.get("margin_se_by_teacher") or {}).get(best,
                p["margin_se"] if p.get("best_teacher") == best else None)
            for p in parts
        ]  # fmt: skip
        out["margin_se"] = None if None in ses else sum(ses) / len(ses)
    return out


def _seed_disagreement(reports: list[dict[str, Any]], names: list[str]) -> dict[str, Any] | None:
    """Across seeds, the mean ± sd of each report's ``teacher_disagreement`` numbers: the
    fraction of disagreeing test rows and every method's accuracy and NLL on the disagreeing and
    agreeing rows (``None`` unless every report has the table)."""
    parts = [rep.get("teacher_disagreement") for rep in reports]
    if any(p is None for p in parts):
        return None

    def get(p: dict[str, Any], name: str, part: str, key: str) -> float:
        v = p["methods"].get(name, {}).get(part)
        return float("nan") if v is None else float(v[key])

    return {
        "disagree_fraction": _spread([p["disagree_rows"] / p["rows"] for p in parts]),
        "methods": {
            n: {
                f"{part}_{key}": _spread([get(p, n, part, key) for p in parts])
                for part in ("disagree", "agree")
                for key in ("accuracy", "nll")
            }
            for n in names
        },
    }


def _shared_test_rows(per_row: list[dict[str, Any] | None] | None) -> bool | None:
    """Whether every seed was tested on the same rows (``None``: no per-row data to tell)."""
    if not per_row or any(p is None for p in per_row):
        return None
    digests = [p.get("test_sha256") for p in per_row]
    if all(digests):  # the test rows' features and labels (the labels alone can coincide)
        return len(set(digests)) == 1
    return all(torch.equal(p["labels"], per_row[0]["labels"]) for p in per_row)


def _seed_bootstrap(per_row, names, reference, num_seeds, resamples, seed, shared):
    """The two-level paired bootstrap of :func:`summarise_seeds` (``None`` without per-row data
    for every seed); ``shared``: :func:`_shared_test_rows`."""
    if per_row is None or any(p is None for p in per_row):
        return None
    if len(per_row) != num_seeds:
        raise ValueError(f"per_row: expected one entry per seed ({num_seeds}), got {len(per_row)}")
    for i, p in enumerate(per_row):
        missing = [n for n in names if n not in p]
        if missing:
            raise ValueError(f"per_row: seed number {i} has no per-row data for {missing}")
    labels = per_row[0]["labels"]
    gen = torch.Generator().manual_seed(seed)
    # metric of every method on every seed for every row resample (drawn a chunk at a time)
    if shared:  # one test set: the same row resample for every seed
        flat = _resampled_in_chunks(
            [p[n] for p in per_row for n in names], len(labels), resamples, gen
        )
        by_seed = [flat[i * len(names) : (i + 1) * len(names)] for i in range(num_seeds)]
    else:  # each seed its own test set (e.g. digits, split per seed): resampled independently
        by_seed = [
            _resampled_in_chunks([p[n] for n in names], len(p["labels"]), resamples, gen)
            for p in per_row
        ]
    pick = torch.randint(0, num_seeds, (resamples, num_seeds), generator=gen)
    # [S, B] per method and metric
    stats = {
        n: {k: torch.stack([seed_stats[j][k] for seed_stats in by_seed]) for k in BOOTSTRAP_METRICS}
        for j, n in enumerate(names)
    }
    out: dict[str, Any] = {}
    for n in names:
        if n == reference:
            continue
        out[n] = {}
        for k in BOOTSTRAP_METRICS:
            d = stats[reference][k] - stats[n][k]  # [S, B]
            drawn = d.T.gather(1, pick).mean(1)  # [B]: mean over the drawn seeds
            lo, hi = torch.quantile(drawn, torch.tensor([0.025, 0.975], dtype=drawn.dtype))
            better = (drawn > 0) if k == "accuracy" else (drawn < 0)
            out[n][k] = {
                "boot_low": float(lo),
                "boot_high": float(hi),
                "p_better": float(better.double().mean()),
            }
    return out


def _pm(stat: dict[str, Any], fmt: str) -> str:
    """``mean ± sd``; a mean over fewer seeds than the table's (reports written before the
    number existed) says over how many: ``0.700 (1/2 seeds)``."""
    mean, std = stat["mean"], stat["std"]
    if mean is None:
        return "n/a"
    values = stat.get("values") or []
    have = sum(v is not None and math.isfinite(v) for v in values)
    part = f" ({have}/{len(values)} seeds)" if have < len(values) else ""
    if std is None:
        return fmt.format(mean) + part
    return f"{fmt.format(mean)} ± {fmt.format(std)}{part}"


def seed_calibration_sentence(summary: dict[str, Any], markdown: bool = False) -> list[str]:
    """:func:`calibration_sentence` over seeds: the range of the methods' mean ``ece_floor`` and,
    per method, the seeds whose ECE lies beyond that noise (``ece_p`` < :data:`ECE_ALPHA`).
    Empty when the summary has no ``ece_p`` (reports written before it existed)."""
    have = [
        m
        for m in summary["methods"]
        if _finite(m.get("ece_p", {}).get("values", []))
        and _finite([m.get("ece_floor", {}).get("mean")])  # a floor of 0 (certain rows) counts
    ]
    if not have:
        return []
    q = "`" if markdown else ""
    floors = [m["ece_floor"]["mean"] for m in have]
    lo, hi = f"{min(floors):.3f}", f"{max(floors):.3f}"
    counts = []
    for m in have:
        ps = _finite(m["ece_p"]["values"])
        flagged = sum(p < ECE_ALPHA for p in ps)
        direction = f" ({_direction(m)} on average)" if flagged and _direction(m) else ""
        counts.append(f"{q}{m['name']}{q} {flagged}/{len(ps)}{direction}")
    shared = summary.get("shared_test_rows")
    rows = "the test rows" + (" (the same in every seed)" if shared else "")
    return [
        f"ECE resolution: on {rows}, a perfectly calibrated model with each method's predictions "
        f"would be expected to score ECE {lo if lo == hi else f'{lo}-{hi}'} ({q}ece_floor{q}, "
        "labels drawn from its own predictive; mean over seeds). Seeds in which a method's ECE "
        f"is beyond that noise (p < {ECE_ALPHA:g}, {q}ece_p{q}; about 1 in "
        f"{round(1 / ECE_ALPHA)} calibrated method-seed pairs is flagged by chance): "
        + ", ".join(counts)
        + "."
    ]


def format_seed_summary(summary: dict[str, Any], markdown: bool = False) -> str:
    """The across-seed means ± standard deviations, then (when the reference method ran) its
    per-seed differences to every other method, as plain text or markdown."""
    n = len(summary["seeds"])
    cols = columns(summary["methods"])
    if any(m.get("validation_nll", {}).get("mean") is not None for m in summary["methods"]):
        # the validation split's NLL (what selected the hyperparameters) beside the test NLL
        cols.insert(2, ("validation_nll", "val NLL", "{:.3f}"))
    header = ["method"] + [h for _, h, _ in cols]
    body = [
        [f"`{m['name']}`" if markdown else m["name"]]
        + [_pm(m.get(k, {"mean": None, "std": None}), fmt) for k, _, fmt in cols]
        for m in summary["methods"]
    ]
    lines = [] if markdown else [f"{summary['dataset']}: mean ± sd over {n} seed{'s' * (n != 1)}"]
    lines += _aligned(header, body, markdown)
    cal = seed_calibration_sentence(summary, markdown)
    lines += ["", *cal] if cal else []
    temps = summary.get("predictive_temperature") or {}
    runs = max((len(t["values"]) for t in temps.values()), default=0)
    temp = temperature_sentence({k: t["mean"] for k, t in temps.items()}, markdown, seeds=runs)
    lines += ["", *temp] if temp else []
    v = summary.get("versus")
    if v:
        boot = "resamples" in v
        lines += [""]
        if not markdown:
            lines.append(
                f"{v['reference']} minus each method, mean over seeds "
                + (
                    f"[95 % interval of a paired bootstrap over seeds and test rows "
                    f"({v['resamples']})], seeds where it is better, P(better)"
                    if boot
                    else "[95 % t-interval over seeds], seeds where it is better"
                    if not v.get("no_interval")
                    else f"(no interval: {v['no_interval']}), seeds where it is better"
                )
            )
        header = ["vs method"] + [f"Δ{k}" for k in BOOTSTRAP_METRICS]

        def cell(r: dict[str, Any]) -> str:
            lo, hi = (r["boot_low"], r["boot_high"]) if boot else (r["low"], r["high"])
            p = r["p_better"] if boot else None
            return _diff_cell(r["diff"], lo, hi, p, f"{r['wins']}/{r['runs']}")

        lines += _aligned(header, _versus_rows(v["methods"], markdown, cell), markdown)
    return "\n".join(lines)


def _seed_figure(summary: dict[str, Any], out: Path) -> str:
    """Top row: every seed's metric per method (dots) and the mean (bar). Bottom row (when the
    reference ran): the per-seed paired differences ``reference - method``, which take out what
    a seed does to every method alike."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ("nll", "ece", "accuracy")
    versus = summary.get("versus")
    ref = versus["reference"] if versus else None
    names = [m["name"] for m in summary["methods"]]
    rows = 2 if versus else 1
    fig, axes = plt.subplots(
        rows,
        len(keys),
        figsize=(4.2 * len(keys), rows * (0.42 * len(names) + 1.4)),
        squeeze=False,
    )

    def strip(ax, labels, series, means, color_of):
        pos = list(range(len(labels)))[::-1]
        for p_, label, vals, mean in zip(pos, labels, series, means, strict=True):
            vals = _finite(vals)
            ax.plot(vals, [p_] * len(vals), "o", color=color_of(label), alpha=0.5, ms=4)
            if mean is not None:
                ax.plot([mean], [p_], "|", color="k", ms=14, mew=2)
        ax.set_yticks(pos, labels)
        ax.grid(axis="x", alpha=0.3)

    for ax, key in zip(axes[0], keys, strict=True):
        strip(
            ax,
            names,
            [m[key]["values"] for m in summary["methods"]],
            [m[key]["mean"] for m in summary["methods"]],
            lambda n: "tab:blue" if n == ref else "tab:gray",
        )
        ax.set_title(f"{key} ({'higher' if key == 'accuracy' else 'lower'} is better)")
    if versus:
        others = list(versus["methods"])
        for ax, key in zip(axes[1], keys, strict=True):
            rows_ = [versus["methods"][n][key] for n in others]
            ax.axvline(0.0, color="k", lw=0.8)
            strip(
                ax,
                others,
                [r["values"] for r in rows_],
                [r["diff"] for r in rows_],
                lambda n: "tab:blue",
            )
            if "resamples" in versus:  # the seeds x rows bootstrap interval, under the dots
                pos = list(range(len(others)))[::-1]
                for p_, r in zip(pos, rows_, strict=True):
                    ax.plot([r["boot_low"], r["boot_high"]], [p_ - 0.22] * 2, color="tab:orange",
                            lw=2.5, solid_capstyle="butt")  # fmt: skip
            ax.xaxis.set_major_locator(plt.MaxNLocator(5))
            ax.set_title(f"Δ{key} = {ref} − method", fontsize=9)
            ax.set_xlabel(f"{'> 0' if key == 'accuracy' else '< 0'}: {ref} better", fontsize=8)
    boot_note = (
        "; orange: 95 % bootstrap interval over seeds and test rows"
        if versus and "resamples" in versus
        else ""
    )
    n_seeds = len(summary["seeds"])
    fig.suptitle(
        f"{summary['dataset']}: each seed (dots) and the mean (bar), {n_seeds} "
        f"seed{'s' * (n_seeds != 1)}{boot_note}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(out / "seeds.png", dpi=110)
    plt.close(fig)
    return "seeds.png"


def _test_fold(run: Path) -> tuple[int, int] | None:
    """``(test_fold, test_folds)`` of a finished run folder's config, or None when it is no
    cross-fitting fold (or its report is unreadable)."""
    try:
        config = json.loads((Path(run) / "report.json").read_text()).get("config") or {}
    except (OSError, ValueError):
        return None
    if not config.get("test_folds"):
        return None
    return int(config.get("test_fold", 0)), int(config["test_folds"])


def sequence_encoder_of(report: dict) -> str | None:
    """The sequence encoder a run's student read its features from, as its report's
    ``features`` names it (``"... (sequence encoder composition+unirep1900)"``); None where it
    names none (data that are no sequences, or a report of before the key existed)."""
    import re

    found = re.search(r"\(sequence encoder ([^)]+)\)", str(report.get("features") or ""))
    return found.group(1) if found else None


def _encoder_or_old(report: dict) -> str | None:
    """:func:`sequence_encoder_of`, and ``composition`` for a DeepLoc report written before
    reports kept ``features`` (the only encoder then)."""
    enc = sequence_encoder_of(report)
    if enc is None and "features" not in report and report.get("dataset") == "deeploc":
        return "composition"
    return enc


def gather_seed_runs(
    run_dirs: list[str | Path], *, name: str = "run_dirs"
) -> tuple[list[dict[str, Any]], list[dict[str, Any] | None], list[int], dict[int, Path]]:
    """The seeds of several runs of one experiment, for one :func:`summarise_seeds` over all of
    them (``mtbkd summarise``): for example ``--seeds 0-4`` and ``--seeds 5-9`` run apart.

    ``run_dirs``: output folders of ``mtbkd demo`` / ``mtbkd distill``, each a ``--seeds`` run
    (``summary.json`` and ``seed<k>/``) or a single run (``report.json``). Every seed must be
    finished and appear once, and every run must be the same experiment: the same dataset (and
    data files' SHA-256, student features) and the same settings, except the seed and what
    changes only speed or display (:func:`mtbkd.distill.experiment_settings`; a field that a
    report written by an older mtbkd lacks is taken at its default, as ``--resume`` does).
    Anything else is refused, naming the folders and the first settings that differ, and so are
    folders that are not single experiments: a summary made by ``mtbkd summarise`` (name its
    runs instead) and a cross-fit's pooled seeds (``examples/cross_fit.py``; their reports keep
    no settings: give that script more ``--seeds``). ``name``: how errors name ``run_dirs``.
    Returns ``(reports, per_row, seeds, folders)`` in the order of the seeds: each seed's
    ``report.json``, its :func:`load_per_row` (``None`` where the folder keeps none; the
    bootstrap of :func:`summarise_seeds` needs every seed's) and the folder it was read from."""
    from mtbkd.distill import experiment_settings

    dirs = [Path(d) for d in run_dirs]
    if not dirs:
        raise ValueError(f"{name}: name at least one run folder")
    folders: dict[int, Path] = {}
    for d in dirs:
        if (d / "summary.json").is_file():
            summary = read_json(d / "summary.json")
            if summary.get("pooled_from") is not None:
                raise ValueError(
                    f"{name}: {d} is a summary made by `mtbkd summarise` (of "
                    f"{', '.join(summary['pooled_from'])}, relative to it): name those runs"
                )
            if summary.get("compared_from") is not None:
                raise ValueError(
                    f"{name}: {d} is a comparison made by examples/compare_runs.py (of "
                    f"{', '.join(summary['compared_from'])}, two settings), not a run"
                )
            found = {int(s): d / f"seed{s}" for s in summary.get("seeds") or []}
        elif (d / "report.json").is_file():
            config = read_json(d / "report.json").get("config") or {}
            seed = config.get("seed")
            if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
                raise ValueError(f"{name}: {d}/report.json records no seed (a non-negative "
                                 f"integer) in its config, got {seed!r}")  # fmt: skip
            found = {seed: d}
        else:
            raise ValueError(
                f"{name}: {d} is not the output folder of a finished run (no summary.json or "
                "report.json)"
            )
        for s, f in found.items():
            if s in folders and folders[s].resolve() == f.resolve():
                raise ValueError(f"{name}: {d} is named twice (its seed {s} at {f})")
            if s in folders:
                folds = [_test_fold(folders[s]), _test_fold(f)]
                if None not in folds and folds[0] != folds[1]:
                    raise ValueError(
                        f"{name}: {folders[s]} and {f} are cross-fitting folds (test_fold "
                        f"{folds[0][0]} of {folds[0][1]} and {folds[1][0]} of {folds[1][1]}), "
                        "each tested on other rows, not seeds of one experiment: "
                        "examples/cross_fit.py pools a cross-fit's folds (mtbkd.report.pool_folds)"
                    )
                raise ValueError(f"{name}: seed {s} is in both {folders[s]} and {f}")
            if not (f / "report.json").is_file():
                if not f.is_dir():  # summary.json without its seed folders
                    raise ValueError(
                        f"{name}: {d} has a summary.json but no folder seed{s}: a comparison "
                        "made by examples/compare_runs.py (older ones do not say so), or a run "
                        "whose seed folders were removed: name the runs themselves"
                    )
                raise ValueError(f"{name}: {f} has no report.json (seed {s} is not finished)")
            folders[s] = f
    if not folders:
        raise ValueError(f"{name}: {', '.join(map(str, dirs))} hold no seed")
    seeds = sorted(folders)
    reports = [read_json(folders[s] / "report.json") for s in seeds]
    for s, rep in zip(seeds, reports, strict=True):
        where = folders[s] / "report.json"
        if rep.get("folds") is not None or not rep.get("config"):
            raise ValueError(
                f"{name}: {where} keeps no settings (config)"
                + (
                    ": it is a cross-fit's pooled table (examples/cross_fit.py); to add seeds "
                    "to a cross-fit, rerun that script with more --seeds and the same --out"
                    if rep.get("folds") is not None
                    else ""
                )
            )
        missing = [k for k in ("dataset", "methods") if k not in rep]
        if missing:
            raise ValueError(f"{name}: {where} has no {' or '.join(missing)} (not a run report)")

    own = {rep.get("teachers_trained") for rep in reports}
    digests = {rep.get("data_sha256") for rep in reports} - {None}
    if False in own and True not in own and len(digests) <= 1:
        # the same data files (or reports written before their digest was kept), whose teachers
        # one report says were given: so were the others' (reports written before
        # teachers_trained existed say nothing of it)
        compared = [{**rep, "teachers_trained": False} for rep in reports]
    else:
        compared = reports
    first, base = folders[seeds[0]], experiment_settings(compared[0])
    enc0 = _encoder_or_old(reports[0])
    for s, rep, cmp in zip(seeds[1:], reports[1:], compared[1:], strict=True):
        where = f"{name}: {folders[s]} and {first}"
        for key in ("dataset", "data_sha256", "features"):
            a, b = rep.get(key), reports[0].get(key)
            if key == "dataset" and _same_data_files(rep, reports[0]):
                continue  # a copy of the data in a folder of another name (the name of a dir run)
            if a is not None and b is not None and a != b:
                raise ValueError(
                    f"{where} differ in {key} ({a!r} against {b!r}): not one experiment"
                )
        enc = _encoder_or_old(rep)
        if enc and enc0 and enc != enc0:  # (a report of before features were kept, too)
            raise ValueError(
                f"{where} differ in the sequence encoder ({enc!r} against {enc0!r}): not one "
                "experiment"
            )
        this = experiment_settings(cmp)
        keys = list(base) + [k for k in this if k not in base]  # in the config's order
        differ = [k for k in keys if this.get(k) != base.get(k)]
        if differ:
            shown = "; ".join(f"{k}: {this.get(k)!r} against {base.get(k)!r}" for k in differ[:4])
            more = "; ..." if len(differ) > 4 else ""
            raise ValueError(f"{where} were run with other settings ({shown}{more})")
    per_row = [load_per_row(folders[s] / PER_ROW_FILE) for s in seeds]
    return reports, per_row, seeds, {s: folders[s] for s in seeds}


def test_rows_phrase(shared: bool | None) -> str:
    """What a seed summary's seeds do to the test rows (``summary["shared_test_rows"]``)."""
    return {
        True: "the test rows are the same in every seed",
        False: "the test split changes too (this dataset's test rows are drawn per seed)",
        None: "the test rows change too where the dataset's test split is drawn per seed",
    }[shared]


def write_seed_summary(
    summary: dict[str, Any], out_dir: str | Path, figures: bool = True, intro: str | None = None
) -> None:
    """Write ``summary.json``, ``summary.md`` and (with ``figures``) ``seeds.png`` to ``out_dir``
    (each seed's own run folder is ``out_dir/seed<k>``). ``intro``: the whole paragraph under
    the title, in place of the one of the pipeline's ``--seeds`` runs (what the seeds change,
    that the table is a mean ± sd over seeds, where each seed's report is)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    files = [_seed_figure(summary, out)] if figures else []
    seeds = ", ".join(str(s) for s in summary["seeds"])
    shared = summary.get("shared_test_rows")
    test = test_rows_phrase(shared)
    lines = [
        f"# MT-BKD over {len(summary['seeds'])} seed{'s' * (len(summary['seeds']) != 1)}: "
        f"{summary['dataset']}",
        "",
        intro
        or f"Seeds {seeds}: each changes the validation split and every initialisation; {test}. "
        "Mean ± standard deviation over seeds; the full report of each seed is in "
        "`seed<k>/report.md`.",
        "",
        format_seed_summary(summary, markdown=True),
        "",
    ]
    if summary.get("versus"):
        lines += [
            f"Δ: `{summary['versus']['reference']}` minus the method, per seed, averaged; k/n: "
            "the seeds in which it is better (lower NLL / ECE, higher accuracy). "
            + (
                "Interval: 95 % of a paired bootstrap that resamples both the seeds and the test "
                f"rows ({summary['versus']['resamples']} draws), so it covers the training run's "
                "randomness and the test set's sampling noise; the last number is the fraction "
                "of draws in which it is better. An interval that contains 0 is within that "
                "noise (ECE: a percentile interval, off-centre, mostly toward 0, because "
                "resampling raises the better calibrated method's ECE more; see mtbkd's "
                "docs/RESULTS.md)."
                if "resamples" in summary["versus"]
                else f"No interval: {summary['versus']['no_interval']}."
                if summary["versus"].get("no_interval")
                else "Interval: 95 % Student-t over seeds (the spread between seeds; it leaves "
                "out the sampling noise of a test set shared by the seeds)."
            ),
            "",
        ]
    d = summary.get("teacher_disagreement")
    if d:
        frac = d["disagree_fraction"]
        lines += [
            "## Where the teachers disagree",
            "",
            f"The teachers' top classes differ on {_pm(frac, '{:.3f}')} of the test rows (mean "
            "± sd over seeds); every method's accuracy and NLL on the rows where they agree "
            "and on those where they differ:",
            "",
        ]
        cols = [  # in the order of each seed's report.md
            (f"{part}_{key}", f"{'acc' if key == 'accuracy' else 'NLL'} ({part})")
            for part in ("agree", "disagree")
            for key in ("accuracy", "nll")
        ]
        body = [
            [f"`{n}`"] + [_pm(row[k], "{:.3f}") for k, _ in cols] for n, row in d["methods"].items()
        ]
        lines += _aligned(["method"] + [h for _, h in cols], body, True) + [""]
    w = summary.get("train_weighting")
    if w:
        each = ", ".join(f"`{n}` {_pm(v, '{:.3f}')}" for n, v in w["teacher_accuracy"].items())
        margin = w.get("margin")
        verdict = _verdict_words(
            w, None if margin is None else margin["mean"], w.get("margin_se"), ", mean over seeds"
        )
        frac, top = (
            _pm(w["disagree_fraction"], "{:.3f}"),
            _pm(w["highest_weight_accuracy"], "{:.3f}"),
        )
        lines += [
            f"On the training rows where the teachers disagree ({frac} of them), the teacher "
            f"with the highest entropy weight is right on {top} (each teacher: {each}; mean ± "
            f"sd over seeds), {verdict}.",
            "",
        ]
    lines += [f"![{f}]({f})" for f in files]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
