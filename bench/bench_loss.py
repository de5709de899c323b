"""``mtbkd bench --suite loss``: fused multi-teacher losses vs eager and compiled references.

Methods, measured side by side in one run (CPU):

* ``fused``: ``mtbkd.functional`` (the default backend: the C++ kernels when built);
* ``eager``: ``mtbkd.reference`` under autograd (what a user writes in plain PyTorch);
* ``compiled``: ``torch.compile`` of that reference.

For each: forward and forward+backward times (median, p20, p80), peak extra memory of one
forward+backward (measured in a fresh process), and two byte counts:

* the bytes of this design's passes: MATH.md section 9's ``(3K+4)·N·V·b`` for MT-BKD without
  cached teacher statistics, ``(2K+3)·N·V·b`` for the forward-KL family, plus ``2·N·V·b`` for the
  backward (the saved gradient read, scaled by ``grad_output`` and written) where it makes that
  pass -> ``gbs_fwd_bwd``. Whether it does is measured (``backward_hands_on_gradient``): on CPU,
  with this benchmark's mean, the backward hands the saved gradient on as the input's ``.grad``
  and moves none of it;
* the bytes any fused forward+backward must move, ``(K+2)·N·V·b`` (K+1 logit tensors read, one
  gradient written) -> ``copy_bound_fraction``: the time that many bytes take at the copy
  bandwidth measured in the same run, over the measured time (1 = at the memory limit).

On CPU one row of the inputs fits in the L2 cache, so the kernels' re-reads rarely reach main
memory and they are compute-bound: read ``gbs_fwd_bwd`` there as bytes per second of work, not
as a memory-traffic measurement. Before timing, the fused loss and gradient are checked against
the eager reference on the first rows of the same inputs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import mtbkd
from mtbkd import reference

try:  # run as a script or as part of `mtbkd bench`
    from bench import common
except ImportError:  # pragma: no cover
    import common

LOSSES = ("mtbkd", "forward_kl")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def make_inputs(n: int, v: int, k: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(n, v, generator=g) * 2).to(dtype)
    t = (torch.randn(k, n, v, generator=g) * 3).to(dtype)
    y = torch.randint(0, v, (n,), generator=g)
    y[::7] = -100  # some masked rows, as in padded batches
    return z, t, y


def fused_fn(loss: str):
    if loss == "mtbkd":
        return lambda z, t, y: mtbkd.mtbkd_loss(z, t, y)
    return lambda z, t, y: mtbkd.multi_teacher_kd_loss(z, t, y, divergence="forward_kl")


def eager_fn(loss: str):
    if loss == "mtbkd":

        def f(z, t, y):
            return reference.reduce_rows(reference.mtbkd_loss(z, t, y).loss, y, "mean")

    else:

        def f(z, t, y):
            rows, _ = reference.multi_teacher_kd_loss(z, t, y, divergence="forward_kl")
            return reference.reduce_rows(rows, y, "mean")

    return f


def make_method(method: str, loss: str):
    if method == "fused":
        return fused_fn(loss)
    if method == "eager":
        return eager_fn(loss)
    if method == "compiled":
        return torch.compile(eager_fn(loss), dynamic=False)
    raise ValueError(f"unknown method {method!r}")


def traffic_bytes(
    loss: str, n: int, v: int, k: int, dtype: torch.dtype, backward_pass: bool = True
) -> int:
    """Bytes of this design's forward+backward passes: MATH.md section 9 (without cached teacher
    statistics) plus, where the backward makes that pass (``backward_pass``), its read of the
    saved gradient and write of the scaled copy."""
    e, b = n * v, torch.finfo(dtype).bits // 8
    passes = 3 * k + 4 if loss in ("mtbkd", "jsd") else 2 * k + 3  # three passes: MATH.md 9
    return (passes + (2 if backward_pass else 0)) * e * b


def backward_hands_on_gradient(fn, z, t, y) -> bool:
    """Whether ``fn``'s backward hands the gradient its forward saved on as the input's ``.grad``
    (``mtbkd.ops`` does on CPU when every row's factor is exactly 1, as for a mean), instead of
    writing a scaled copy: measured, by comparing the ``.grad``'s memory with the tensors of the
    input's shape that autograd saved. A saved tensor freed during the backward may leave its
    address to the new ``.grad``, so the first values must match too."""
    saved = []

    def pack(x):
        if x.shape == z.shape:
            # the address and a few values only: holding x would force a copy
            saved.append((x.data_ptr(), x.detach().reshape(-1)[:64].clone()))
        return x

    zz = z.detach().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        loss = fn(zz, t, y)
    loss.backward()
    g = zz.grad
    head = g.reshape(-1)[:64]
    return any(ptr == g.data_ptr() and torch.equal(vals, head) for ptr, vals in saved)


def required_bytes(n: int, v: int, k: int, dtype: torch.dtype) -> int:
    """What any fused forward+backward must move: K+1 logit tensors read, one gradient written."""
    return (k + 2) * n * v * (torch.finfo(dtype).bits // 8)


def check_agreement(loss: str, z, t, y, rows: int = 32) -> dict:
    """The fused loss and gradient against the eager reference on the first ``rows`` rows (a
    benchmark of a wrong result would mean nothing); raises if they differ."""
    z, t, y = z[:rows], t[:, :rows], y[:rows]
    out = {m: _fwd_bwd_with_loss(make_method(m, loss), z, t, y) for m in ("fused", "eager")}
    (lf, gf), (le, ge) = out["fused"], out["eager"]
    low = z.dtype in (torch.float16, torch.bfloat16)
    loss_err = abs(float(lf) - float(le)) / max(abs(float(le)), 1e-12)
    grad_err = float(
        (gf.float() - ge.float()).abs().max() / ge.float().abs().max().clamp_min(1e-30)
    )
    tol = 2e-2 if low else 1e-4
    if not (loss_err <= tol and grad_err <= tol):
        raise RuntimeError(f"fused {loss} differs from the eager reference ({z.dtype}): relative "
                           f"loss error {loss_err:.2e}, gradient error {grad_err:.2e}")  # fmt: skip
    return {"rows": rows, "loss_rel_err": loss_err, "grad_rel_err": grad_err}


def _fwd_bwd_with_loss(fn, z, t, y):
    zz = z.detach().requires_grad_(True)
    loss = fn(zz, t, y)
    loss.backward()
    return loss.detach(), zz.grad


def _fwd_bwd(fn, z, t, y):
    return _fwd_bwd_with_loss(fn, z, t, y)[1]


def memory_probe(method: str, loss: str, n: int, v: int, k: int, dtype: str) -> int:
    """Child-process entry: peak extra RSS of one forward+backward (after a warm-up call)."""
    torch.set_num_threads(torch.get_num_threads())
    z, t, y = make_inputs(n, v, k, DTYPES[dtype])
    fn = make_method(method, loss)
    if method == "compiled":  # compile first: only the run itself is measured
        _fwd_bwd(fn, z, t, y)
    else:  # first-call costs (lazy imports, op registration) are not the method's memory
        _fwd_bwd(fn, *make_inputs(4, v, k, DTYPES[dtype]))
    common.reset_peak_rss()
    before = common.current_rss_bytes()
    _fwd_bwd(fn, z, t, y)
    return common.peak_rss_bytes() - before


def bench_config(loss, n, v, k, dtype_name, repeats, methods, with_memory, copy_gbs=None):
    dtype = DTYPES[dtype_name]
    z, t, y = make_inputs(n, v, k, dtype)
    agreement = check_agreement(loss, z, t, y)
    fns = {m: make_method(m, loss) for m in methods}
    fwd = common.time_interleaved(
        {m: (lambda f=f: f(z, t, y)) for m, f in fns.items()}, repeats=repeats
    )
    fb = common.time_interleaved(
        {m: (lambda f=f: _fwd_bwd(f, z, t, y)) for m, f in fns.items()}, repeats=repeats
    )
    handed_on = backward_hands_on_gradient(fns["fused"], z, t, y)
    nbytes = traffic_bytes(loss, n, v, k, dtype, backward_pass=not handed_on)
    need = required_bytes(n, v, k, dtype)
    row = {
        "loss": loss, "N": n, "V": v, "K": k, "dtype": dtype_name,
        "backend": mtbkd.ops.select_backend(torch.device("cpu"), "mtbkd_loss_fwd"),
        "backward_hands_on_gradient": handed_on,
        "bytes_fwd_bwd": nbytes, "bytes_required": need, "agreement": agreement, "methods": {},
    }  # fmt: skip
    for m in methods:
        entry = {"forward": fwd[m], "forward_backward": fb[m]}
        seconds = fb[m]["median_ms"] / 1e3
        entry["gbs_fwd_bwd"] = nbytes / seconds / 1e9
        if copy_gbs:
            entry["copy_bound_fraction"] = need / (copy_gbs * 1e9) / seconds
        if with_memory:
            entry["peak_extra_mb"] = (
                common.peak_extra_memory(
                    "bench_loss",
                    "memory_probe",
                    {"method": m, "loss": loss, "n": n, "v": v, "k": k, "dtype": dtype_name},
                )  # fmt: skip
                / 2**20
            )
        row["methods"][m] = entry
    base = row["methods"]["fused"]
    for m in methods:
        if m != "fused":
            e = row["methods"][m]
            e["fused_speedup_fwd"] = e["forward"]["median_ms"] / base["forward"]["median_ms"]
            e["fused_speedup_fwd_bwd"] = (
                e["forward_backward"]["median_ms"] / base["forward_backward"]["median_ms"]
            )
            if with_memory:
                e["fused_memory_ratio"] = e["peak_extra_mb"] / max(base["peak_extra_mb"], 1e-9)
    grad_mb = n * v * torch.finfo(dtype).bits / 8 / 2**20
    row["gradient_mb"] = grad_mb
    return row


def table(results: dict) -> str:
    """Markdown table of the main configurations (the README's)."""
    lines = [
        "| loss | dtype | N×V×K | fused fwd+bwd ms | eager ms | compiled ms | vs eager | "
        "vs compiled | fused GB/s (its passes) | fused time at copy bound | "
        "peak extra MB fused / eager / compiled |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["main"]:
        m = r["methods"]
        mem = " / ".join(  # the header's three, "-" for one not run (--quick: no compiled)
            f"{m[x]['peak_extra_mb']:.0f}" if "peak_extra_mb" in m.get(x, {}) else "-"
            for x in ("fused", "eager", "compiled")
        )
        lines.append(
            f"| {r['loss']} | {r['dtype']} | {r['N']}×{r['V']}×{r['K']} | "
            f"{m['fused']['forward_backward']['median_ms']:.1f} | "
            f"{m['eager']['forward_backward']['median_ms']:.1f} | "
            + (
                f"{m['compiled']['forward_backward']['median_ms']:.1f} | "
                if "compiled" in m
                else "- | "
            )
            + f"{m['eager']['fused_speedup_fwd_bwd']:.1f}x | "
            + (f"{m['compiled']['fused_speedup_fwd_bwd']:.1f}x | " if "compiled" in m else "- | ")
            + f"{m['fused']['gbs_fwd_bwd']:.1f} | "
            + f"{100 * m['fused'].get('copy_bound_fraction', float('nan')):.0f} % | {mem} |"
        )
    mach = results["machine"]
    lines.append(
        f"\nCopy bandwidth measured in the same run: {results['copy_bandwidth_gbs']:.1f} GB/s. "
        "GB/s counts the bytes of the kernels' own passes (MATH.md section 9, plus the backward's "
        f"2·N·V·b where it copies the saved gradient: {_backward_note(results['main'])}); "
        "'time at copy bound' is the time (K+2)·N·V·b bytes take at the copy "
        "bandwidth over the measured time (100 % = the memory limit). On CPU the kernels are "
        "compute-bound (a row fits in L2)."
    )
    lines.append("\n" + common.provenance(mach, (r.get("backend") for r in results["main"])))
    return "\n".join(lines)


def _backward_note(rows: list[dict]) -> str:
    flags = {r["backward_hands_on_gradient"] for r in rows}
    if flags == {True}:
        return "here it hands it on, no such pass"
    return "here it does" if flags == {False} else "in some rows here"


def plot(results: dict, path: Path) -> None:
    plt = common.pyplot()
    if plt is None:  # matplotlib is an optional extra (common.save_suite says so)
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    ax = axes[0]
    labels = [f"{r['loss']}\n{r['dtype']}" for r in results["main"]]
    # only the methods that ran: a --quick run has no "compiled", drawn before as zero bars
    methods = [m for m in ("fused", "eager", "compiled")
               if any(m in r["methods"] for r in results["main"])]  # fmt: skip
    width = 0.8 / max(1, len(methods))
    for j, m in enumerate(methods):
        xs, vals = [], []
        for i, r in enumerate(results["main"]):
            if m in r["methods"]:
                xs.append(i + (j - (len(methods) - 1) / 2) * width)
                vals.append(r["methods"][m]["forward_backward"]["median_ms"])
        ax.bar(xs, vals, width, label=m)
    x = range(len(labels))
    ax.set_xticks(list(x), labels)
    ax.set_ylabel("forward+backward ms (median)")
    r0 = results["main"][0]
    ax.set_title(f"N={r0['N']}, V={r0['V']}, K={r0['K']} (lower is better)")
    ax.legend()
    ax = axes[1]
    for loss in LOSSES:
        pts = [r for r in results["sweep"] if r["loss"] == loss]
        for k in sorted({r["K"] for r in pts}):
            s = sorted((r for r in pts if r["K"] == k), key=lambda r: r["V"])
            speedup = [r["methods"]["eager"]["fused_speedup_fwd_bwd"] for r in s]
            ax.plot([r["V"] for r in s], speedup,
                    marker="o", label=f"{loss} K={k}")  # fmt: skip
    ax.set_xscale("log")
    vs = sorted({r["V"] for r in results["sweep"]})
    ax.set_xticks(vs, [str(v) for v in vs])
    ax.minorticks_off()
    ax.set_xlabel("V")
    ax.set_ylabel("speed-up of fused over eager (fwd+bwd)")
    ax.set_title("Sweep over V and K")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(quick: bool = False, out_dir: Path | str | None = None) -> dict:
    """Run the suite; write JSON, a markdown table and a PNG to ``out_dir`` (bench/results)."""
    from tqdm import tqdm

    out_dir = common.results_dir(out_dir, quick)
    n, v, k = (128, 4096, 3) if quick else (2048, 32000, 3)
    repeats = 2 if quick else 5
    methods = ["fused", "eager"] if quick else ["fused", "eager", "compiled"]
    results = {
        "suite": "loss", "quick": quick, "machine": common.machine(),
        "copy_bandwidth_gbs": common.copy_bandwidth_gbs(), "main": [], "sweep": [],
    }  # fmt: skip
    jobs = [("main", loss, n, v, k, d) for loss in LOSSES for d in DTYPES]
    sweep_n = 64 if quick else 512
    for loss in LOSSES:
        for sv in [1271, 4096] if quick else [1271, 8192, 32000, 50257]:
            for sk in [1, 3] if quick else [1, 2, 3, 4]:
                jobs.append(("sweep", loss, sweep_n, sv, sk, "float32"))
    for part, loss, nn_, vv, kk, d in tqdm(jobs, desc="bench loss", unit="config"):
        mem = part == "main"
        ms = methods if part == "main" else ["fused", "eager"]
        results[part].append(
            bench_config(loss, nn_, vv, kk, d, repeats, ms, mem, results["copy_bandwidth_gbs"])
        )
    results["load_average_end"] = common.load_average()
    md = table(results)
    path, _ = common.save_suite("loss", results, md, out_dir, plot)
    print(md)
    print(f"results: {path}")
    return results


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    run(quick=a.quick, out_dir=a.out)
