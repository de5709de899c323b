"""bf16 gradient error of the fused losses against float64, per backend, side by side.

For each loss (MT-BKD, forward KL, reverse KL, JSD; K teachers; a mean over the rows whose label
is not ``-100``, one row in seven masked so the count is not a power of two), the gradient of a
bfloat16 student from every backend that runs here and from eager PyTorch (``mtbkd.reference``
under autograd on the bf16 tensors) is compared with the float64 gradient of the same bf16 inputs:

* ``max_rel_error``: max |grad - truth| / max |truth|, the measure of ``bench/bench_gpu.py``;
* ``not_nearest``: the elements farther from the truth than half a bf16 spacing (plus 2^-16 of
  the row's largest gradient, for float32 arithmetic): 0 when every element is the truth rounded
  to nearest, which no method that stores bf16 can beat.

    TRITON_INTERPRET=1 python bench/grad_rounding.py --out bench/results/grad-rounding-cpu.json

On CPU the Triton kernels run in Triton's interpreter (set ``TRITON_INTERPRET=1``; slow: a few
minutes at the default size). Prints a markdown table; ``--out`` also writes JSON; ``--check``
exits 1 if a fused backend failed or left an element farther than that from the truth.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import bench_gpu  # noqa: E402
from mtbkd import ops  # noqa: E402

LOSSES = ("mtbkd", "forward_kl", "reverse_kl", "jsd")


def half_ulp_bf16(x: torch.Tensor) -> torch.Tensor:
    """Half the spacing of bfloat16 numbers at |x| (8 significand bits; normal numbers)."""
    e = torch.floor(torch.log2(x.abs().clamp_min(2.0**-126)))
    return torch.pow(2.0, e - 8)


def errors(grad: torch.Tensor, truth: torch.Tensor) -> dict:
    err = (grad.double() - truth).abs()
    scale = float(truth.abs().max()) or 1.0
    slack = 2.0**-16 * truth.abs().amax(dim=1, keepdim=True)
    return {
        "max_rel_error": float(err.max()) / scale,
        "not_nearest": int((err > half_ulp_bf16(truth) + slack).sum()),
    }


def measure(method: str, loss: str, z, t, y) -> dict:
    fn = bench_gpu._reference_fn(loss) if method == "eager" else bench_gpu._fused(loss, method)
    a = z.detach().clone().requires_grad_(True)
    try:
        fn(a, t, y, None).backward()
    finally:
        os.environ.pop("MTBKD_BACKEND", None)
    b = z.detach().double().requires_grad_(True)
    bench_gpu._reference_fn(loss)(b, t.double(), y).backward()
    return errors(a.grad, b.grad)


def available(device: str) -> list[str]:
    status = ops.backend_status()
    names = [n for n in ("cpu", "triton", "cuda") if status[n] is None]
    if device == "cuda":
        names = [n for n in names if n != "cpu"]
    else:
        names = [n for n in names if n != "cuda"]
    return ["eager", *names]


def run(n: int, vocab: int, teachers: int, device: str, methods: list[str], seed: int = 0):
    z, t, y = bench_gpu.make_inputs(n, vocab, teachers, torch.bfloat16, device, seed)
    rows = []
    for loss in LOSSES:
        row = {"loss": loss}
        for m in methods:
            try:
                row[m] = measure(m, loss, z, t, y)
            except Exception as exc:  # one failing backend must not lose the others' numbers
                row[m] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        rows.append(row)
    return {"n": n, "vocab": vocab, "teachers": teachers, "device": device,
            "counted_rows": int((y != -100).sum()), "methods": methods, "rows": rows}  # fmt: skip


def table(res: dict) -> str:
    ms = res["methods"]
    head = "| loss | " + " | ".join(f"{m} max rel. error | {m} not nearest" for m in ms) + " |"
    lines = [head, "|---|" + "---:|" * (2 * len(ms))]
    for r in res["rows"]:
        cells = [
            f"{r[m]['max_rel_error']:.5f} | {r[m]['not_nearest']}" if "error" not in r[m]
            else f"{r[m]['error'][:60]} | -"
            for m in ms
        ]  # fmt: skip
        lines.append(f"| {r['loss']} | " + " | ".join(cells) + " |")
    total = res["n"] * res["vocab"]
    lines.append(
        f"\nN = {res['n']} ({res['counted_rows']} counted), V = {res['vocab']}, "
        f"K = {res['teachers']}, bf16, {res['device']}; {total} gradient elements per cell."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=bench_gpu.positive_int, default=256)
    p.add_argument("--vocab", type=bench_gpu.positive_int, default=8192)
    p.add_argument("--teachers", type=bench_gpu.positive_int, default=3)
    p.add_argument("--device", choices=["cpu", "cuda"],
                   default="cuda" if torch.cuda.is_available() else "cpu")  # fmt: skip
    p.add_argument("--methods", nargs="+", choices=["eager", *ops.BACKENDS],
                   help="eager and backends (default: all that run)")  # fmt: skip
    p.add_argument("--out", type=Path, help="also write the results as JSON")
    p.add_argument("--check", action="store_true",
                   help="exit 1 if a fused backend failed or rounded off nearest")  # fmt: skip
    a = p.parse_args(argv)
    why = None if a.out is None else bench_gpu.file_path_problem(a.out)
    if why:  # before measuring
        p.error(f"--out {a.out}: not a file path ({why})")
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here (torch.cuda.is_available() is False); "
                "use --device cpu")  # fmt: skip
    methods = a.methods or available(a.device)
    res = run(a.n, a.vocab, a.teachers, a.device, methods)
    print(table(res))
    if a.out is not None:
        bench_gpu.write_json(a.out, res)
    bad = [f"{r['loss']}/{m}" for r in res["rows"] for m in methods if m != "eager"
           and ("error" in r[m] or r[m]["not_nearest"] > 0)]  # fmt: skip
    if a.check and bad:
        print(f"not rounded once to nearest, or failed: {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
