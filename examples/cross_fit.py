"""Cross-fitted evaluation: every row of a dataset (a CSV folder, or the built-in digits and
yeast) is tested once, by students trained without it, and one table is measured over all rows
at once.

A single test split of a small dataset leaves the ECE column mostly noise (DeepLoc's 1,000 test
rows: a perfectly calibrated model would score about 0.034). Pooling folds tests on every row of
``train.csv`` and ``test.csv`` (DeepLoc: 3,500), which shrinks that noise about as one over the
square root of the rows.

    python examples/cross_fit.py --dataset deeploc --data-dir ../shared/data/deeploc \\
        --by Partition --seeds 0 --out runs/deeploc-crossfit
    python examples/cross_fit.py --dataset dir --data-dir MYDATA --folds 5 --out runs/x \\
        -- --methods ce,mtbkd_sgld
    python examples/cross_fit.py --dataset digits --folds 5 --seeds 0-4 --out runs/digits-cf

The data folder is in the CSV format of ``mtbkd distill`` (``train.csv``, ``test.csv`` and
``teacher_<name>_train.csv`` / ``teacher_<name>_test.csv``, row by row). Folds are the values of
a column (``--by``, left out of the folds' files; DeepLoc's ``Partition`` holds its homology
partitions, so no fold is tested on close homologues of its training rows) or ``--folds K``
folds stratified by label. Options
after ``--`` go to ``mtbkd distill`` unchanged (each fold still chooses its hyperparameters on a
validation split of its own training rows).

``--dataset digits`` / ``yeast`` take ``--folds K`` and no data folder: each fold's run is
``mtbkd distill --dataset digits --set test_folds=K --set test_fold=k --set fold_seed=S``, whose
pipeline tests on fold k of K label-stratified folds of all the dataset's rows
(mtbkd.data.test_split; the same folds for every seed) and trains on the others as it does on
its random split (digits: the teachers and the student, as ``mtbkd demo`` does).

Writes ``OUT/data/fold<k>/`` (each fold's CSV files; not for the built-in datasets),
``OUT/fold<k>/`` (each fold's ``mtbkd distill`` run, one ``seed<s>`` folder per seed),
``OUT/seed<s>/report.json`` and
``report.md`` (the pooled table of each seed: mtbkd.report.pool_folds) and
``OUT/summary.json`` / ``summary.md`` / ``seeds.png`` (over seeds, the differences with a
bootstrap over seeds and pooled rows). Rerunning the same command resumes: each fold's run is
continued with ``mtbkd distill --resume``, which reads finished seeds back and refuses a fold
whose data or settings changed.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import traceback
from pathlib import Path

import numpy as np

from mtbkd import cli, data, report

SPLITS = ("train", "test")
# mtbkd distill options that cross_fit.py gives each fold itself
OWN_OPTIONS = ("--seeds", "--seed", "--out", "--data-dir", "--dataset", "--resume")
# the DistillConfig fields that name a built-in dataset's fold (given by cross_fit.py too)
OWN_FIELDS = ("test_folds", "test_fold", "fold_seed")
# datasets that ship with a dependency: their folds are made by the pipeline itself
# (DistillConfig.test_folds), without data files
BUILT_IN = ("digits", "yeast")


def _teacher_lines(path: Path) -> list[str]:
    """A teacher file's rows as text (the numbers as given), without the blank and ``#`` lines
    that numpy's reader skips too."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise SystemExit(f"--data-dir: {path} is not UTF-8 text") from None
    return [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def load_pool(data_dir: Path) -> tuple[list[str], list[list[str]], dict[str, list[str]]]:
    """The header, the rows of train.csv then test.csv (test's columns put in train's order),
    and each teacher's logit lines in the same order; read as ``mtbkd distill`` reads them
    (mtbkd.data's CSV reader: names stripped, trailing blank lines skipped, a blank line among
    the data rows refused)."""
    header, rows = None, []
    teachers: dict[str, list[str]] = {}
    for split in SPLITS:
        path = data_dir / f"{split}.csv"
        if not path.is_file():
            raise SystemExit(f"--data-dir: {path} is missing (the CSV format: train.csv, test.csv)")
        try:
            h, r = data._read_csv(path)
        except ValueError as exc:
            raise SystemExit(f"--data-dir: {exc}") from None
        if header is not None:
            if sorted(h) != sorted(header):
                raise SystemExit(f"--data-dir: {path} has other columns than train.csv")
            order = [h.index(name) for name in header]  # matched by name, as mtbkd does
            r = [[row[i] for i in order] for row in r]
        else:
            header = h
        _labels(header, r, path)  # a bad label is reported against its own file
        rows += r
        names = sorted(p.name[len("teacher_") : -len(f"_{split}.csv")]
                       for p in data_dir.glob(f"teacher_*_{split}.csv"))  # fmt: skip
        if split == "test" and names != sorted(teachers):
            raise SystemExit(
                f"--data-dir: teachers of train ({sorted(teachers)}) and test ({names}) differ"
            )
        for name in names:
            path_t = data_dir / f"teacher_{name}_{split}.csv"
            lines = _teacher_lines(path_t)
            if len(lines) != len(r):
                raise SystemExit(
                    f"--data-dir: {path_t} has {len(lines)} rows, {split}.csv {len(r)}"
                )
            teachers.setdefault(name, []).extend(lines)
    if not teachers:
        raise SystemExit(f"--data-dir: {data_dir} has no teacher_<name>_train.csv")
    return header, rows, teachers


def _labels(header: list[str], rows: list[list[str]], where: Path) -> tuple[int, np.ndarray]:
    try:
        col = data._label_column(where, header)
        if col is None:
            raise ValueError(f"{where} needs a label column named one of {data._LABEL_COLUMNS}")
        return col, data._parse_labels(where, rows, col)
    except ValueError as exc:
        raise SystemExit(f"--data-dir: {exc}") from None


def assign_folds(
    header: list[str],
    rows: list[list[str]],
    by: str | None,
    folds: int | None,
    seed: int,
    where: Path = Path("train.csv"),
) -> tuple[np.ndarray, list[str]]:
    """Each row's fold index and the folds' names: the values of column ``by`` (sorted), or
    ``folds`` folds stratified by label (:func:`mtbkd.data.stratified_folds`: the folds' sizes
    differ by one at most)."""
    col, y = _labels(header, rows, where)
    if by is not None:
        if by not in header:
            raise SystemExit(f"--by: no column {by!r} in train.csv (columns: {header})")
        if header.index(by) == col:
            raise SystemExit(f"--by: {by!r} is the label column")
        values = [r[header.index(by)] for r in rows]
        names = sorted(set(values), key=lambda v: (len(v), v))
        if len(names) < 2:
            raise SystemExit(f"--by: column {by!r} has one value only; cross-fitting needs two")
        return np.array([names.index(v) for v in values]), [f"{by}={v}" for v in names]
    try:
        fold = data.stratified_folds(y, folds, seed, name="--folds")
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    return fold, [f"fold {k} of {folds}" for k in range(folds)]


def write_folds(out: Path, header, rows, teachers, fold: np.ndarray,
                classes: Path | None = None) -> list[Path]:  # fmt: skip
    """One CSV data folder per fold (its rows as test.csv, the others as train.csv, and the
    class names of ``classes``, a classes.txt, when given)."""
    dirs = []
    count = int(fold.max()) + 1
    # rewritten from scratch, so that no file of an earlier assignment (a teacher since removed,
    # classes.txt, a fold beyond the count) is read by mtbkd or hidden from --resume's data check
    for old in (out / "data").glob("fold*"):
        if old.is_dir():
            shutil.rmtree(old)
    for k in range(count):
        d = out / "data" / f"fold{k}"
        d.mkdir(parents=True)
        if classes is not None:
            shutil.copyfile(classes, d / "classes.txt")
        for split, keep in (("train", fold != k), ("test", fold == k)):
            idx = np.flatnonzero(keep)
            with open(d / f"{split}.csv", "w", newline="", encoding="utf-8") as f:
                w = csv.writer(f, lineterminator="\n")
                w.writerow(header)
                w.writerows(rows[i] for i in idx)
            for name, lines in teachers.items():
                text = "".join(lines[i] + "\n" for i in idx)
                (d / f"teacher_{name}_{split}.csv").write_text(text, encoding="utf-8")
        dirs.append(d)
    return dirs


def _spelled_out(extra: list[str]) -> list[str]:
    """``extra`` with each abbreviated long option written in full, as ``mtbkd distill``'s
    parser reads it (argparse takes a unique prefix: ``--ou`` is ``--out``)."""
    from mtbkd.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    known = [o for o in sub.choices["distill"]._option_string_actions if o.startswith("--")]
    out = []
    for a in extra:
        name, eq, value = a.partition("=")
        if name.startswith("--") and name not in known:
            match = [o for o in known if o.startswith(name)]
            if len(match) == 1:
                a = match[0] + eq + value
        out.append(a)
    return out


def _own_fields(extra: list[str]) -> list[str]:
    """The fold fields that ``--set FIELD=VALUE`` options after ``--`` would set."""
    given = []
    for i, a in enumerate(extra):
        if a == "--set" and i + 1 < len(extra):
            value = extra[i + 1]
        elif a.startswith("--set="):
            value = a[len("--set=") :]
        else:
            continue
        field = value.split("=")[0].strip()
        if field in OWN_FIELDS:
            given.append(f"--set {field}")
    return given


def built_in_folds(dataset: str, folds: int, seed: int) -> tuple[int, list[str], np.ndarray]:
    """A built-in dataset's row count, fold names and fold sizes (the pipeline draws the same
    folds from the same labels: :func:`mtbkd.data.test_split`)."""
    ds = data.load_dataset(dataset, seed=0)
    y = np.concatenate([ds.y_train, ds.y_test])  # fold sizes depend on the class counts only
    try:
        fold = data.stratified_folds(y, folds, seed, name="--folds")
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    return len(y), [f"fold {k} of {folds}" for k in range(folds)], np.bincount(fold, None, folds)


def check_out(ap: argparse.ArgumentParser, out: Path) -> None:
    """``--out``: a folder (or one to make) that can be written to and holds nothing but an
    earlier cross-fit of this script (its ``data/``, ``fold<k>/`` or ``summary.json`` with
    ``folds``): another run's or summary's files would be overwritten or mixed in."""
    cli._check_out_folder("distill", out, prog="cross_fit")
    single, multi, pooled = cli._run_contents(out)
    summary = cli._read_json(out / "summary.json")
    ours = (out / "data").is_dir() or (out / "fold0").is_dir() or summary.get("folds") is not None
    if single or (multi and not ours) or (pooled and not ours):
        found = single + multi + ["summary.json"] * (pooled and not ours)
        ap.error(f"--out: {out} holds another run or summary ({', '.join(found[:4])}): choose a "
                 "folder of its own")  # fmt: skip


def run_distill(argv: list[str]) -> int:
    """``mtbkd ARGV`` in this process, and its exit status: a refusal's message, or an error's
    traceback, goes to stderr as the command's own process would print it. (A process per fold
    would pay seconds of imports each; every run seeds itself from its settings, so the folds'
    results do not depend on what ran before them in the process.)"""
    try:
        return cli.main(argv) or 0
    except SystemExit as exc:
        if isinstance(exc.__context__, KeyboardInterrupt):  # Ctrl-C: this script's own message
            raise KeyboardInterrupt from None
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr, flush=True)
            return 1
        return exc.code or 0
    except Exception:
        traceback.print_exc()
        return 1


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", choices=["deeploc", "dir", *BUILT_IN], default="dir")
    ap.add_argument("--data-dir", type=Path, help="the CSV data folder (not for digits, yeast)")
    group = ap.add_mutually_exclusive_group(required=True)
    group.add_argument("--by", help="the column whose values are the folds (DeepLoc: Partition)")
    group.add_argument("--folds", type=int, help="K folds stratified by label")
    ap.add_argument("--seeds", default="0", help="as for mtbkd distill, e.g. 0-2")
    ap.add_argument("--fold-seed", type=int, default=0, help="the random order of --folds")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--no-figures", action="store_true")
    args = ap.parse_args(argv)
    built_in = args.dataset in BUILT_IN
    if built_in and args.data_dir is not None:
        ap.error(f"--data-dir: --dataset {args.dataset} ships with its package; give no folder")
    if built_in and args.by is not None:
        ap.error(f"--by: --dataset {args.dataset} has no group column; use --folds K")
    if not built_in and args.data_dir is None:
        ap.error(f"--data-dir is required for --dataset {args.dataset}")
    if args.folds is not None and args.folds < 2:
        ap.error(f"--folds: cross-fitting needs 2 folds or more, got {args.folds}")
    if args.fold_seed < 0:
        ap.error(f"--fold-seed: expected a non-negative integer, got {args.fold_seed}")
    spelled = _spelled_out(extra)
    ours = sorted({a.split("=")[0] for a in spelled} & set(OWN_OPTIONS)) + _own_fields(spelled)
    if ours:
        ap.error(f"after --: {', '.join(ours)}: set by cross_fit.py itself (give its own "
                 "--seeds / --out / --data-dir / --dataset / --folds / --fold-seed)")  # fmt: skip
    check_out(ap, args.out)
    try:
        seeds = report.parse_seeds(args.seeds)
    except ValueError as exc:
        ap.error(f"--seeds: {exc}")
    # held while the folds run: a second command into OUT is refused before it rewrites OUT/data
    existed = args.out.exists()
    lock = cli._lock_folder("distill", args.out, prog="cross_fit")
    try:
        run_folds(args, extra, seeds, built_in)
    except SystemExit:
        if not existed:  # refused before any fold ran (bad data): no empty folder left behind
            cli._remove_if_empty(args.out)
        raise
    finally:
        if lock is not None:
            os.close(lock)


def run_folds(args: argparse.Namespace, extra: list[str], seeds: list[int],
              built_in: bool) -> None:  # fmt: skip
    """Write the folds' data (CSV datasets), run ``mtbkd distill`` on each fold, pool them."""
    if built_in:
        n_rows, names, sizes = built_in_folds(args.dataset, args.folds, args.fold_seed)
        fold_args = [
            ["--set", f"test_folds={args.folds}", "--set", f"test_fold={k}",
             "--set", f"fold_seed={args.fold_seed}"]
            for k in range(args.folds)
        ]  # fmt: skip
    else:
        header, rows, teachers = load_pool(args.data_dir)
        fold, names = assign_folds(header, rows, args.by, args.folds, args.fold_seed,
                                   args.data_dir / "train.csv")  # fmt: skip
        if args.by is not None:  # a group id is no feature (a numeric CSV would take it for one)
            col = header.index(args.by)
            header = header[:col] + header[col + 1 :]
            rows = [r[:col] + r[col + 1 :] for r in rows]
        classes = args.data_dir / "classes.txt"
        data_dirs = write_folds(args.out, header, rows, teachers, fold,
                                classes if classes.is_file() else None)  # fmt: skip
        n_rows, sizes = len(rows), np.bincount(fold, None, len(names))
        fold_args = [["--data-dir", str(d)] for d in data_dirs]
    runs = []
    for k, more in enumerate(fold_args):
        run = args.out / f"fold{k}"
        runs.append(run)
        n_test = int(sizes[k])
        print(f"=== {names[k]}: {n_rows - n_test} training rows, {n_test} test rows ===",
              flush=True)  # fmt: skip
        cmd = ["distill", "--dataset", args.dataset, *more,
               "--seeds", args.seeds, "--out", str(run)] + extra  # fmt: skip
        if run.exists():  # finished seeds are read back, after mtbkd checks data and settings
            cmd.append("--resume")
        try:
            rc = run_distill(cmd)
        except KeyboardInterrupt:
            raise SystemExit(
                f"\ncross_fit: interrupted during {names[k]}; rerun the same command to resume"
            ) from None
        if rc != 0:
            raise SystemExit(f"mtbkd distill failed on {names[k]} (its output folder: {run})")
    reports, per_row = [], []
    for s in seeds:
        name = args.dataset if args.dataset != "dir" else args.data_dir.resolve().name
        try:
            rep, rows_s = report.pool_folds([run / f"seed{s}" for run in runs], dataset=name)
        except ValueError as exc:
            raise SystemExit(f"cross_fit: {exc}") from None
        if rep["rows"] != n_rows:
            raise SystemExit(f"cross_fit: the folds' runs tested {rep['rows']} rows, the data "
                             f"has {n_rows}")  # fmt: skip
        rep["fold_names"] = names
        reports.append(rep)
        per_row.append(rows_s)
        sub = args.out / f"seed{s}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / "report.json").write_text(json.dumps(rep, indent=2))
        (sub / "report.md").write_text(
            f"# Cross-fitted: {rep['dataset']}, seed {s}\n\n"
            f"{rep['rows']} rows over {rep['folds']} folds ({', '.join(names)}); each fold's "
            "students were trained without its rows.\n\n"
            + report.markdown_table(rep["methods"]) + "\n\n"
            + "\n".join(report.calibration_sentence(rep["methods"], rep["rows"], markdown=True))
            + "\n"
            + "".join(f"\nPost-hoc temperature of `{n}` (mean over the folds): "
                      f"{h['predictive_temperature']:.3f}\n"
                      for n, h in rep["hyperparameters"].items())
        )  # fmt: skip
    summary = report.summarise_seeds(reports, seeds, per_row=per_row)
    summary["folds"] = names
    intro = (
        f"Cross-fitted over {len(names)} folds ({', '.join(names)}): every one of the "
        f"{reports[0]['rows']} rows is tested once, by students trained without it "
        "(`examples/cross_fit.py`); each metric is measured over all rows at once. Seeds "
        f"{', '.join(map(str, seeds))}: each changes every fold's validation split and "
        "initialisation. Mean ± standard deviation over seeds; the pooled table of each seed is "
        "in `seed<k>/report.md`, each fold's run in `fold<k>/`. The bootstrap resamples single "
        "rows (not the folds' groups)."
    )
    report.write_seed_summary(summary, args.out, figures=not args.no_figures, intro=intro)
    print(report.format_seed_summary(summary))
    print(args.out)


if __name__ == "__main__":
    main()
