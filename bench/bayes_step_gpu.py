"""One training step of a Bayesian linear layer on a GPU, every way it can run there.

``mtbkd.nn.BayesLinear`` (under ``mtbkd.nn.record_kl`` its forward samples the weights and sums
their KL in one pass, ``mtbkd.bayes_ops.reparameterize_kl``, and one backward pass writes both
gradients) on the Triton
and on the CUDA backend, against the same step in eager PyTorch (``randn_like`` + softplus,
closed-form KL, autograd) and that eager code under ``torch.compile`` with eager's random
generator (``fallback_random=True``, the fair comparison; inductor's own generator draws other
numbers). The step: sample weight and bias, ``x w^T + b``, ``mean(y^2) + KL / 50,000``, backward
to mu and rho. Time per step: median of CUDA-synchronised rounds, methods interleaved; the
compiled baseline is timed last, beside the best mtbkd backend again (its compilation is slow:
the rows before it are printed first).

    python bench/bayes_step_gpu.py [--size 4096] [--batch 128] [--dtype float32|bfloat16]
    python bench/bayes_step_gpu.py --dry-run      # tiny sizes on CPU: the script's own check

``bench/gpu_check.sh`` runs it and appends the table to its summary. Prints one markdown table;
``--json FILE`` also writes the numbers.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_bayes as BB  # noqa: E402  (the eager step and the compile options of the CPU suite)
from bench_gpu import file_path_problem, positive_int, write_json  # noqa: E402

from mtbkd import ops  # noqa: E402
from mtbkd.nn import BayesLinear, record_kl  # noqa: E402

METHODS = ("triton", "cuda", "eager", "compiled_eager_rng")


def make_step(method: str, size: int, batch: int, dtype: torch.dtype, device: str):
    """``fn() -> grads`` of one training step, or the reason it cannot run here."""
    torch.manual_seed(0)
    x = torch.randn(batch, size, device=device, dtype=dtype)
    layer = BayesLinear(size, size, prior_sigma=BB.LAYER_PRIOR_SIGMA).to(device=device, dtype=dtype)
    params = list(layer.parameters())
    if method in ("triton", "cuda"):
        why = ops.backend_status()[method]
        if why is not None:
            return why

        def step():
            before = os.environ.get("MTBKD_BACKEND")
            os.environ["MTBKD_BACKEND"] = method
            try:
                with record_kl(layer) as rec:  # the KL from the forward's sampling pass
                    y = layer(x)
                loss = y.float().square().mean() + rec.kl / 50_000
                return torch.autograd.grad(loss, params)
            finally:
                if before is None:
                    del os.environ["MTBKD_BACKEND"]
                else:
                    os.environ["MTBKD_BACKEND"] = before

        return step
    fn = BB._eager_layer_step
    if method == "compiled_eager_rng":
        fn = BB._compile(BB._eager_layer_step, method)
    plain = [p.detach().clone().requires_grad_(True) for p in params]
    return lambda: torch.autograd.grad(fn(*plain, x), plain)


def measure(fns: dict, rounds: int, device: str) -> dict[str, float]:
    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    for fn in fns.values():  # warm-up: compilation, autotuning, allocator
        fn()
        fn()
    sync()
    times: dict[str, list[float]] = {m: [] for m in fns}
    for _ in range(rounds):
        for m, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[m].append(time.perf_counter() - t0)
    return {m: 1e3 * statistics.median(v) for m, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bayes_step_gpu.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=positive_int, default=4096, help="in = out features")
    ap.add_argument("--batch", type=positive_int, default=128)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--rounds", type=positive_int, default=20)
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU (no GPU needed)")
    ap.add_argument("--json", type=Path, default=None,
                    help="also write the numbers to this file (its folder is made)")  # fmt: skip
    a = ap.parse_args(argv)
    why = None if a.json is None else file_path_problem(a.json)
    if why:  # before measuring
        ap.error(f"--json {a.json}: not a file path ({why})")
    device = "cpu" if a.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        ap.error("no CUDA device (torch.cuda.is_available() is False); --dry-run runs on CPU")
    size, batch, rounds = (64, 8, 2) if a.dry_run else (a.size, a.batch, a.rounds)
    dtype = getattr(torch, a.dtype)
    fns, skipped = {}, {}
    for m in a.methods:
        if a.dry_run and (m == "cuda" or (m == "triton" and not ops._triton_interpreted())):
            skipped[m] = "CPU dry run" + ("" if m == "cuda" else " without TRITON_INTERPRET=1")
            continue
        got = make_step(m, size, batch, dtype, device)
        if isinstance(got, str):
            skipped[m] = got
        else:
            fns[m] = got
    # The fast methods first, their rows printed at once; then torch.compile (its compilation is
    # the slow part: a time limit there still leaves the rows above), timed against the best
    # mtbkd backend again, side by side.
    name = torch.cuda.get_device_name(0) if device == "cuda" else "CPU dry run"
    print(f"BayesLinear {size}x{size} training step, batch {batch}, {a.dtype}, {name} "
          f"(median of {rounds} rounds):\n\n| method | ms | time / best mtbkd backend |\n"
          "|---|---|---|", flush=True)  # fmt: skip
    slow = "compiled_eager_rng"
    ms = measure({m: f for m, f in fns.items() if m != slow}, rounds, device)
    best = min((m for m in ("triton", "cuda") if m in ms), key=ms.get, default=None)

    def row(m: str, t: float, base: float | None) -> None:
        print(f"| {m} | {t:.3f} | {f'{t / base:.2f}x' if base else '-'} |", flush=True)

    for m in a.methods:
        if m in ms:
            row(m, ms[m], ms[best] if best else None)
        elif m in skipped:
            print(f"| {m} | not run: {skipped[m]} | - |", flush=True)
    if slow in fns:
        pair = measure({slow: fns[slow], **({best: fns[best]} if best else {})}, rounds, device)
        ms[slow] = pair[slow]
        row(slow, pair[slow], pair.get(best))
    if a.json:
        write_json(a.json, {"size": size, "batch": batch, "dtype": a.dtype, "device": name,
                            "ms": ms, "skipped": skipped})  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
