"""The ``mtbkd`` command: ``info``, ``bench`` (and the pipeline's ``demo``/``distill``/``predict``)."""

from __future__ import annotations

import argparse
import json
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
            "mtbkd bench needs the repository's bench/ folder (install with `pip install -e .` "
            "from a clone)"
        )
    return here


def _cmd_bench(args: argparse.Namespace) -> int:
    import importlib

    bench = _bench_dir()
    sys.path.insert(0, str(bench))
    modules = {"loss": "bench_loss", "bayes": "bench_bayes", "llm": "bench_llm"}
    suites = list(modules) if args.suite == "all" else [args.suite]
    out = Path(args.out) if args.out else bench / "results"
    for suite in suites:
        try:
            mod = importlib.import_module(modules[suite])
        except ModuleNotFoundError as exc:
            print(f"suite {suite!r} is not available: {exc}", file=sys.stderr)
            return 2
        mod.run(quick=args.quick, out_dir=out)
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
    p.add_argument("--out", default=None, help="output folder (default bench/results)")
    p.set_defaults(func=_cmd_bench)

    _add_pipeline_commands(sub)
    return parser


def _add_pipeline_commands(sub) -> None:
    """``demo``, ``distill`` and ``predict``: the end-to-end MT-BKD pipeline (mtbkd.distill)."""


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
