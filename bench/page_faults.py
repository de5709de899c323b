"""What fresh ``[N, V]`` tensors cost on CPU: a fused loss's forward+backward with 4 KB pages and
with PyTorch's transparent huge pages, side by side.

Each step allocates the loss's gradient (``N * V`` elements in the student's dtype); the first
write to each 4 KB page of it is a page fault, kernel time that on a virtual machine is a large
part of the step (MT-BKD, 2048 x 32000 x 3 float32, 2 threads: 228 ms of kernel and 670 ms of
user CPU time per 483 ms step).
PyTorch backs CPU allocations of 2 MB and more with huge pages when
``THP_MEM_ALLOC_ENABLE=1`` is set before it starts (and the kernel's THP setting is ``madvise``
or ``always``; ``mtbkd info`` prints it), so each setting runs in a fresh process, interleaved
round by round; every process reports the median step time, the minor page faults and the
kernel (``sys``) and user CPU time per step::

    python bench/page_faults.py --n 2048 --vocab 32000 --teachers 3 --dtype float32 bfloat16

Prints a markdown table; ``--out`` also writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NUMBERS = ("ms", "minor_faults", "sys_ms", "user_ms", "threads")
SETTINGS = {
    "4 KB pages": {"THP_MEM_ALLOC_ENABLE": "0"},
    "huge pages": {"THP_MEM_ALLOC_ENABLE": "1"},
}


def measure(loss: str, n: int, v: int, k: int, dtype: str, steps: int) -> dict:
    """In this process: ``steps`` fused forward+backward steps (after two warm-up steps)."""
    import torch

    sys.path.insert(0, str(ROOT))
    from bench.bench_loss import fused_fn, make_inputs

    z, t, y = make_inputs(n, v, k, getattr(torch, dtype))
    fn = fused_fn(loss)

    def step():
        zz = z.detach().requires_grad_(True)
        fn(zz, t, y).backward()
        return zz.grad

    for _ in range(2):
        step()
    times = []
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "ms": 1e3 * statistics.median(times),
        "minor_faults": (r1.ru_minflt - r0.ru_minflt) / steps,
        "sys_ms": 1e3 * (r1.ru_stime - r0.ru_stime) / steps,
        "user_ms": 1e3 * (r1.ru_utime - r0.ru_utime) / steps,
        "threads": torch.get_num_threads(),
        "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE"),
    }


def _child(args: list[str], env: dict) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", *args]
    out = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(losses, n, v, k, dtypes, steps, rounds) -> dict:
    """Every (loss, dtype) under both page settings, ``rounds`` fresh processes each, the
    settings alternating; per setting the median over rounds of each process's median."""
    rows = []
    for loss in losses:
        for dtype in dtypes:
            got = {name: [] for name in SETTINGS}
            for r in range(rounds):
                order = list(SETTINGS) if r % 2 == 0 else list(SETTINGS)[::-1]
                for name in order:
                    a = ["--loss", loss, "--n", str(n), "--vocab", str(v), "--teachers", str(k),
                         "--dtype", dtype, "--steps", str(steps)]  # fmt: skip
                    got[name].append(_child(a, SETTINGS[name]))
            row = {"loss": loss, "dtype": dtype, "shape": [n, v, k]}
            for name, runs in got.items():
                row[name] = {key: statistics.median(x[key] for x in runs) for key in NUMBERS}
                row[name]["THP_MEM_ALLOC_ENABLE"] = runs[0]["THP_MEM_ALLOC_ENABLE"]
            row["speedup"] = row["4 KB pages"]["ms"] / row["huge pages"]["ms"]
            rows.append(row)
    return {"rows": rows, "steps": steps, "rounds": rounds}


def table(res: dict) -> str:
    head = ("| loss | dtype | N×V×K | setting | fwd+bwd ms | minor faults / step | sys ms / step "
            "| user ms / step |")  # fmt: skip
    lines = [head, "|---|---|---|---|---:|---:|---:|---:|"]
    for r in res["rows"]:
        shape = "×".join(str(x) for x in r["shape"])
        for name in SETTINGS:
            m = r[name]
            lines.append(
                f"| {r['loss']} | {r['dtype']} | {shape} | {name} | {m['ms']:.1f} | "
                f"{m['minor_faults']:.0f} | {m['sys_ms']:.1f} | {m['user_ms']:.1f} |"
            )
        lines.append(f"| | | | huge pages' speed-up | {r['speedup']:.2f}x | | | |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--loss", nargs="+", default=["mtbkd", "forward_kl"],
                    choices=["mtbkd", "forward_kl"])  # fmt: skip
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--teachers", type=int, default=3)
    ap.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"],
                    choices=["float32", "bfloat16", "float16", "float64"])  # fmt: skip
    ap.add_argument("--steps", type=int, default=7, help="timed steps per process")
    ap.add_argument("--rounds", type=int, default=3, help="fresh processes per setting")
    ap.add_argument("--out", type=Path, default=None,
                    help="also write the results as JSON here (its folder is made)")  # fmt: skip
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    for name in ("n", "vocab", "teachers", "steps", "rounds"):
        if getattr(a, name) < 1:
            ap.error(f"--{name} must be at least 1")
    if a.child:
        print(json.dumps(measure(a.loss[0], a.n, a.vocab, a.teachers, a.dtype[0], a.steps)))
        return 0
    sys.path.insert(0, str(ROOT))
    from bench.bench_gpu import file_path_problem

    why = None if a.out is None else file_path_problem(a.out)
    if why:  # before measuring
        ap.error(f"--out {a.out}: not a file path ({why})")
    res = run(a.loss, a.n, a.vocab, a.teachers, a.dtype, a.steps, a.rounds)
    from mtbkd.info import huge_pages_status

    res["kernel_setting"] = huge_pages_status(environ={})
    print(table(res))
    print(f"\nHuge pages here without the variable: {res['kernel_setting']}")
    if a.out is not None:
        sys.path.insert(0, str(ROOT))
        from bench.bench_gpu import write_json

        write_json(a.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
