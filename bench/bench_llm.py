"""``mtbkd bench --suite llm``: fused-linear losses vs eager (head matmuls + fused loss) at LLM
vocabulary sizes.

Methods, measured side by side in one run (CPU, float32):

* ``fused``: :class:`mtbkd.FusedLinearMTBKDLoss` / ``FusedLinearMultiTeacherKDLoss`` with the
  teachers given as ``(hidden, weight, None)`` heads: rows in chunks, no ``[N, V]`` logits alive;
* ``eager``: ``z = h Wᵀ`` and ``t_k = h_k W_kᵀ`` materialised, then the fused loss op
  (:func:`mtbkd.mtbkd_loss`), autograd through the matmul;
* ``matmuls``: the same head matmuls and nothing else (K + 1 forward products, then
  ``grad_hidden`` and ``grad_W``, ``2·N·H·V·(K + 3)`` flops): the floor that any fused-linear loss
  on this machine stands on, since it cannot skip them. ``fused / matmuls`` says how close to that
  limit the fused path is, and GFLOP/s the rate each method reaches.

Reported per configuration: forward+backward time (median, p20, p80), peak extra resident memory
of one forward+backward in a fresh process, and the ratios fused/eager. Issue 6's targets at
N=2048, V=128256, K=2: fused memory ≤ 25 % of eager, time ≤ 1.3x.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import mtbkd
from mtbkd import fused_linear

try:  # run as a script or as part of `mtbkd bench`
    from bench import common
except ImportError:  # pragma: no cover
    import common

LOSSES = ("mtbkd", "forward_kl")


def make_inputs(n: int, h: int, v: int, k: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hid = torch.randn(n, h, generator=g)
    w = torch.randn(v, h, generator=g) * h**-0.5
    teachers = [(torch.randn(n, h, generator=g), torch.randn(v, h, generator=g) * 2 * h**-0.5,
                 None) for _ in range(k)]  # fmt: skip
    y = torch.randint(0, v, (n,), generator=g)
    y[::7] = -100  # some masked rows, as in padded batches
    return hid, w, teachers, y


def make_method(method: str, loss: str, chunk_size: int | None = None):
    if method == "fused":
        fn = (fused_linear.FusedLinearMTBKDLoss(chunk_size=chunk_size) if loss == "mtbkd" else
              fused_linear.FusedLinearMultiTeacherKDLoss(divergence="forward_kl",
                                                         chunk_size=chunk_size))  # fmt: skip
        return lambda h, w, teachers, y: fn(h, w, teachers, y)
    if method == "eager":

        def eager(h, w, teachers, y):
            z = h @ w.t()
            with torch.no_grad():
                t = [th @ tw.t() for th, tw, _ in teachers]
            if loss == "mtbkd":
                return mtbkd.mtbkd_loss(z, t, y)
            return mtbkd.multi_teacher_kd_loss(z, t, y, divergence="forward_kl")

        return eager
    if method == "matmuls":

        def matmuls(h, w, teachers, y):
            with torch.no_grad():
                z = h @ w.t()
                for th, tw, _ in teachers:
                    th @ tw.t()
                z @ w, z.t() @ h  # grad_hidden and grad_W with z standing in for dL/dz
            return z

        return matmuls
    raise ValueError(f"unknown method {method!r}")


def flops(n: int, h: int, v: int, k: int) -> float:
    """Multiply-adds x 2 of the head matmuls of one forward+backward: K + 1 products forward,
    grad_hidden and grad_W backward."""
    return 2.0 * n * h * v * (k + 3)


def _fwd_bwd(fn, hid, w, teachers, y):
    h = hid.detach().requires_grad_(True)
    ww = w.detach().requires_grad_(True)
    fn(h, ww, teachers, y).backward()
    return h.grad, ww.grad


def memory_probe(method: str, loss: str, n: int, h: int, v: int, k: int,
                 chunk_size: int | None = None) -> int:  # fmt: skip
    """Child-process entry: peak extra RSS of one forward+backward (after a small warm-up)."""
    fn = make_method(method, loss, chunk_size)
    _fwd_bwd(fn, *make_inputs(8, h, 64, k))  # first-call costs are not the method's memory
    inputs = make_inputs(n, h, v, k)
    common.reset_peak_rss()
    before = common.current_rss_bytes()
    _fwd_bwd(fn, *inputs)
    return common.peak_rss_bytes() - before


def bench_config(loss, n, h, v, k, repeats, with_memory=True, chunk_size=None):
    inputs = make_inputs(n, h, v, k)
    methods = ("fused", "eager")
    fns = {m: make_method(m, loss, chunk_size) for m in methods}
    calls = {m: (lambda f=f: _fwd_bwd(f, *inputs)) for m, f in fns.items()}
    floor = make_method("matmuls", loss)
    calls["matmuls"] = lambda: floor(*inputs)
    fb = common.time_interleaved(calls, repeats=repeats)
    row = {
        "loss": loss, "N": n, "H": h, "V": v, "K": k, "dtype": "float32",
        "backend": mtbkd.ops.select_backend(torch.device("cpu"), "mtbkd_loss_fwd"),
        "chunk_size": chunk_size or fused_linear.auto_chunk_size(n, v, k), "methods": {},
    }  # fmt: skip
    for m in methods:
        entry = {"forward_backward": fb[m]}
        if with_memory:
            kw = {"method": m, "loss": loss, "n": n, "h": h, "v": v, "k": k,
                  "chunk_size": chunk_size}  # fmt: skip
            peak = common.peak_extra_memory("bench_llm", "memory_probe", kw)
            entry["peak_extra_mb"] = peak / 2**20
        row["methods"][m] = entry
    row["methods"]["matmuls"] = {"forward_backward": fb["matmuls"]}
    for entry in row["methods"].values():
        entry["gflops"] = flops(n, h, v, k) / entry["forward_backward"]["median_ms"] / 1e6
    f, e = row["methods"]["fused"], row["methods"]["eager"]
    row["time_ratio_fused_over_eager"] = (
        f["forward_backward"]["median_ms"] / e["forward_backward"]["median_ms"]
    )
    row["time_ratio_fused_over_matmuls"] = (
        f["forward_backward"]["median_ms"] / fb["matmuls"]["median_ms"]
    )
    if with_memory:
        row["memory_ratio_fused_over_eager"] = f["peak_extra_mb"] / max(e["peak_extra_mb"], 1e-9)
    return row


def table(results: dict) -> str:
    lines = [
        "| loss | N×H×V×K | fused ms | eager ms | matmuls ms | time fused/eager | "
        "fused/matmuls | fused GFLOP/s | fused MB | eager MB | memory fused/eager |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["configs"]:
        m = r["methods"]
        lines.append(
            f"| {r['loss']} | {r['N']}×{r['H']}×{r['V']}×{r['K']} | "
            f"{m['fused']['forward_backward']['median_ms']:.0f} | "
            f"{m['eager']['forward_backward']['median_ms']:.0f} | "
            f"{m['matmuls']['forward_backward']['median_ms']:.0f} | "
            f"{r['time_ratio_fused_over_eager']:.2f} | "
            f"{r['time_ratio_fused_over_matmuls']:.2f} | "
            f"{m['fused']['gflops']:.0f} | "
            f"{m['fused'].get('peak_extra_mb', float('nan')):.0f} | "
            f"{m['eager'].get('peak_extra_mb', float('nan')):.0f} | "
            f"{r.get('memory_ratio_fused_over_eager', float('nan')):.2f} |"
        )
    backends = [results.get("backend"), *(r.get("backend") for r in results["configs"])]
    lines.append("\n" + common.provenance(results["machine"], backends))
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    plt = common.pyplot()
    if plt is None:  # matplotlib is an optional extra (common.save_suite says so)
        return
    rows = results["configs"]
    labels = [f"{r['loss']}\nV={r['V']} K={r['K']}" for r in rows]
    x = range(len(rows))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for ax, key, unit in ((axes[0], "peak_extra_mb", "peak extra MB"),
                          (axes[1], None, "forward+backward ms (median)")):  # fmt: skip
        shown = ("fused", "eager") if key else ("fused", "eager", "matmuls")
        width = 0.8 / len(shown)
        for j, m in enumerate(shown):
            vals = [r["methods"][m].get(key, 0) if key else
                    r["methods"][m]["forward_backward"]["median_ms"] for r in rows]  # fmt: skip
            label = "matmuls only (the floor)" if m == "matmuls" else m
            ax.bar([i + (j - (len(shown) - 1) / 2) * width for i in x], vals, width, label=label)
        ax.set_xticks(list(x), labels, fontsize=7)
        ax.set_ylabel(unit)
        ax.legend()
    r0 = rows[0]
    fig.suptitle(f"fused-linear vs eager, N={r0['N']}, H={r0['H']} (lower is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(quick: bool = False, out_dir: Path | str | None = None) -> dict:
    """Run the suite; write JSON, a markdown table and a PNG to ``out_dir`` (bench/results)."""
    from tqdm import tqdm

    out_dir = common.results_dir(out_dir, quick)
    n, h = (256, 64) if quick else (2048, 576)
    vocabs = (8192,) if quick else (49152, 128256)
    # Quick sizes fit in one automatic chunk; small chunks keep the comparison meaningful.
    chunk = 32 if quick else None
    repeats = 2 if quick else 3
    results = {
        "suite": "llm", "quick": quick, "machine": common.machine(),
        "backend": mtbkd.ops.select_backend(torch.device("cpu"), "mtbkd_loss_fwd"),
        "configs": [],
    }  # fmt: skip
    jobs = [(loss, v, k) for loss in LOSSES for v in vocabs for k in (1, 2)]
    # The forward-KL family at the largest vocabulary and K = 2 only.
    jobs = [j for j in jobs if j[0] == "mtbkd" or (j[1] == vocabs[-1] and j[2] == 2)]
    for loss, v, k in tqdm(jobs, desc="bench llm", unit="config"):
        results["configs"].append(bench_config(loss, n, h, v, k, repeats, chunk_size=chunk))
    md = table(results)
    path, _ = common.save_suite("llm", results, md, out_dir, plot)
    print(md)
    print(f"results: {path}")
    return results


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    run(quick=a.quick, out_dir=a.out)
