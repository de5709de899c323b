"""An ablation across two multi-seed runs: put the methods of a variant run (for example
``--set joint_selection=true``) next to those of the base run, seed by seed, and summarise them
with the same two-level bootstrap as ``--seeds`` (mtbkd.report.summarise_seeds).

    mtbkd distill --dataset deeploc --data-dir DATA --seeds 0-4 --out base
    mtbkd distill --dataset deeploc --data-dir DATA --seeds 0-4 --out joint \\
        --methods mtbkd_map,mtbkd_sgld --set joint_selection=true
    python examples/compare_runs.py base joint --tag joint --out ablation

The variant's methods (or those named by ``--methods``) are renamed ``<name>_<tag>``; the
reference of the differences is the variant's ``mtbkd_sgld`` (``--reference`` to change it).
Both runs must have used the same seeds.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from mtbkd import cli, report


def merge(
    base: Path, variant: Path, tag: str, only: list[str] | None = None
) -> tuple[list[dict], list[dict], list[int]]:
    summaries = []
    for run in (base, variant):
        if not (run / "summary.json").is_file():
            raise SystemExit(f"{run} is not the output folder of a --seeds run (no summary.json)")
        summary = json.loads((run / "summary.json").read_text())
        # (comparisons written before compared_from existed have no seed folders at all)
        no_seeds = not any((run / f"seed{s}").is_dir() for s in summary.get("seeds") or [])
        if "pooled_from" in summary or "folds" in summary or "compared_from" in summary or no_seeds:
            raise SystemExit(
                f"{run} is a summary made by `mtbkd summarise`, examples/cross_fit.py or "
                "examples/compare_runs.py (it has no seed folders), not a --seeds run: compare "
                "the runs it summarises"
            )
        summaries.append(summary)
    seeds = summaries[0]["seeds"]
    if summaries[1]["seeds"] != seeds:
        raise SystemExit(f"{base} and {variant} were run with different seeds")
    if summaries[0]["dataset"] != summaries[1]["dataset"]:
        raise SystemExit(f"{base} is on {summaries[0]['dataset']!r} but {variant} on "
                         f"{summaries[1]['dataset']!r}")  # fmt: skip
    reports, rows = [], []
    for s in seeds:
        for run in (base, variant):
            if not (run / f"seed{s}" / "report.json").is_file():
                raise SystemExit(f"{run}/seed{s} has no report.json (seed {s} is not finished)")
        a = json.loads((base / f"seed{s}" / "report.json").read_text())
        b = json.loads((variant / f"seed{s}" / "report.json").read_text())
        pa = report.load_per_row(base / f"seed{s}" / report.PER_ROW_FILE)
        pb = report.load_per_row(variant / f"seed{s}" / report.PER_ROW_FILE)
        if pa is not None and pb is not None and not pa["labels"].equal(pb["labels"]):
            raise SystemExit(f"{base} and {variant} were tested on other rows in seed {s}")
        if only is not None:
            missing = sorted(set(only) - {m["name"] for m in b["methods"]})
            if missing:
                raise SystemExit(f"--methods: {', '.join(missing)} not in {variant}, seed {s}")
            b["methods"] = [m for m in b["methods"] if m["name"] in only]
        methods = list(a["methods"]) + [{**m, "name": f"{m['name']}_{tag}"} for m in b["methods"]]
        val = {**a.get("validation_nll", {})}
        val.update({f"{k}_{tag}": v for k, v in b.get("validation_nll", {}).items()})
        # the chosen hyperparameters (with --calibrate, the predictive temperatures) of both
        kept = {m["name"] for m in b["methods"]}
        hp = {**(a.get("hyperparameters") or {})}
        hp.update({f"{k}_{tag}": v for k, v in (b.get("hyperparameters") or {}).items()
                   if k in kept})  # fmt: skip
        reports.append({"dataset": a["dataset"], "methods": methods, "validation_nll": val,
                        "hyperparameters": hp})  # fmt: skip
        if pa is None or pb is None:
            rows.append(None)  # an older run folder: t-intervals only
        else:
            rows.append({**pa, **{f"{m['name']}_{tag}": pb[m["name"]] for m in b["methods"]}})
    return reports, rows, seeds


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("base", type=Path, help="output folder of the base --seeds run")
    ap.add_argument("variant", type=Path, help="output folder of the variant --seeds run")
    ap.add_argument("--tag", required=True, help="suffix for the variant's method names")
    ap.add_argument("--reference", default=None, help="default: mtbkd_sgld_<tag>")
    ap.add_argument("--out", type=Path, required=True, help="folder for summary.json/.md/png")
    ap.add_argument(
        "--methods",
        default=None,
        help="comma-separated methods of the variant to include (default: all of them; leave "
        "out those the variant did not change)",
    )
    args = ap.parse_args()
    here = Path(os.path.abspath(args.out))
    for run in (args.base, args.variant):
        a = Path(os.path.abspath(run))
        if a == here or here in a.parents or a in here.parents:
            raise SystemExit(
                f"--out {args.out} is, holds or lies inside the run {run}, whose summary it "
                "would overwrite or mix with: choose a folder of its own"
            )
    cli._check_out_folder("summarise", args.out, prog="compare_runs")
    # never over a run, or over a summary other than an earlier comparison of this script
    single, multi, pooled = cli._run_contents(args.out)
    if single or multi or (pooled and not cli._read_json(args.out / "summary.json").get(
            "compared_from")):  # fmt: skip
        raise SystemExit(f"--out {args.out} holds a run or another summary "
                         f"({', '.join((single + multi)[:4]) or 'summary.json'}): choose a folder "
                         "of its own")  # fmt: skip
    only = None
    if args.methods is not None:
        only = [m.strip() for m in args.methods.split(",") if m.strip()]
        if not only:
            raise SystemExit("--methods names no method")
    reports, rows, seeds = merge(args.base, args.variant, args.tag, only)
    ref = args.reference or f"mtbkd_sgld_{args.tag}"
    names = [m["name"] for m in reports[0]["methods"]]
    if ref not in names:
        raise SystemExit(f"--reference {ref!r} is none of the merged methods: {', '.join(names)}")
    summary = report.summarise_seeds(reports, seeds, reference=ref, per_row=rows)
    base, variant = (os.path.relpath(os.path.abspath(r), here) for r in (args.base, args.variant))
    summary["compared_from"] = [base, variant]  # not pooled_from: two settings, not one
    intro = (
        f"Seeds {', '.join(map(str, seeds))}: the methods of `{base}` beside those of the "
        f"variant `{variant}` (renamed `<name>_{args.tag}`), folders relative to this one. Mean "
        "± standard deviation over seeds; each seed's full report is `seed<k>/report.md` in the "
        "run folder it came from."
    )
    report.write_seed_summary(summary, args.out, intro=intro)
    print(report.format_seed_summary(summary))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
