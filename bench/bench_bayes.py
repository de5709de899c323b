"""Benchmarks of the Bayesian student (issue 4 targets; MATH.md sections 6-8), CPU.

1. Reparameterised sampling, forward+backward, for a 4096x4096 layer: the fused Philox op
   (``mtbkd.ops.reparameterize``) vs eager (``torch.randn_like`` + softplus + mul + add through
   autograd) and ``torch.compile`` of the eager code (full run only). Peak extra memory of each,
   in a fresh process, in units of one weight-sized tensor.
1b. One training step of a Bayesian linear layer (sample the weight and bias, ``x W^T + b``, the
   closed-form KL to the prior, backward), batch 128: ``mtbkd.nn.BayesLinear`` with its KL from
   the forward's sampling pass (``record_kl``, "fused") and from ``kl()``, an op of its own
   ("fused_separate_kl"), vs the same step in eager PyTorch, ``torch.compile`` of it (full run
   only) and bayesian-torch's ``LinearReparameterization`` (when installed; ``make setup``
   installs it). Every method does the same matmuls, so the layer is where a library's sampling
   cost shows side by side.
1c. The same step for a Bayesian 3x3 convolution (``mtbkd.nn.BayesConv2d``, padding 1) on a batch
   of feature maps, against eager, ``torch.compile`` and bayesian-torch's
   ``Conv2dReparameterization``: the convolution's own arithmetic dominates there, so the ratios
   show what sampling and the KL add to it.
2. One SGLD step over a model's parameters: the fused op vs a Python loop over the parameters.
3. The predictive over 100 posterior samples: ``mtbkd.posterior.predict`` (functional_call +
   vmap, chunks sized automatically) vs a loop that loads each sample into the model and runs it.

Every ratio compares methods timed in the same run, interleaved (``common.time_interleaved``).
``run(quick)`` returns the results dict and, given ``out_dir``, writes JSON, markdown and a PNG.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import mtbkd.ops
from mtbkd import posterior
from mtbkd.bayes_ops import reparameterize
from mtbkd.optim import SGLD
from mtbkd.posterior import SampleStore, predict

try:
    from bench import common
except ImportError:  # run as a script or from a child process with bench/ on sys.path
    import common

# ---------------------------------------------------------------------------------------------
# 1. Sampling forward+backward
# ---------------------------------------------------------------------------------------------


# torch.compile baselines: "compiled" with the default settings, in which inductor generates its
# own random numbers on CPU (slow there), and "compiled_eager_rng" with fallback_random=True
# (eager's generator, as in every other method): both, so that neither flatters the fused op
COMPILED = ("compiled", "compiled_eager_rng")


def _compile(fn, method: str):
    options = {"fallback_random": True} if method == "compiled_eager_rng" else None
    return torch.compile(fn, fullgraph=True, options=options)


def _sampling_inputs(rows: int, cols: int):
    torch.manual_seed(0)
    mu = (torch.randn(rows, cols) * 0.02).requires_grad_(True)
    rho = torch.full((rows, cols), -5.0).requires_grad_(True)
    g = torch.randn(rows, cols)
    return mu, rho, g


def _fused_sample(mu, rho):
    return reparameterize(mu, rho)  # default path, NaN/inf check included


def _eager_sample(mu, rho):
    return mu + F.softplus(rho) * torch.randn_like(mu)


def sampling_method(method: str, rows: int, cols: int):
    """``fn(mu, rho, g) -> (dmu, drho)``: one forward+backward of ``method``."""
    if method in ("fused", "eager", *COMPILED):
        sample = {"fused": _fused_sample, "eager": _eager_sample}.get(method)
        if method in COMPILED:
            sample = _compile(_eager_sample, method)

        def fb(mu, rho, g):
            w = sample(mu, rho)
            return torch.autograd.grad(w, (mu, rho), g)

        return fb
    raise ValueError(method)


def sampling_memory_probe(method: str, rows: int, cols: int, backward: bool) -> int:
    """Child-process entry: peak extra RSS of one forward (+backward) of ``method``."""
    fn = sampling_method(method, rows, cols)
    fn(*_sampling_inputs(64, 64))  # warm-up: lazy imports and op registration are not the method's
    mu, rho, g = _sampling_inputs(rows, cols)
    sample = {"fused": _fused_sample, "eager": _eager_sample}.get(method, _eager_sample)
    if method in COMPILED:
        fn(mu, rho, g)
        # the forward-only graph (inputs without grad) is compiled here too, not in the
        # measured region (compilation's ~32 MB of temporaries would count as the method's)
        sample = _compile(_eager_sample, method)
        with torch.no_grad():
            sample(mu.detach(), rho.detach())
    common.reset_peak_rss()
    before = common.current_rss_bytes()
    if backward:
        out = fn(mu, rho, g)
    else:
        with torch.no_grad():
            out = sample(mu.detach(), rho.detach())
    peak = common.peak_rss_bytes() - before
    del out
    return peak


def bench_sampling(rows: int, cols: int, repeats: int, methods: list[str], memory: bool) -> dict:
    mu, rho, g = _sampling_inputs(rows, cols)
    fns = {m: sampling_method(m, rows, cols) for m in methods}
    fb = common.time_interleaved(
        {m: (lambda f=f: f(mu, rho, g)) for m, f in fns.items()}, repeats=repeats
    )
    fwd_fns = {"fused": _fused_sample, "eager": _eager_sample}
    with torch.no_grad():
        fwd = common.time_interleaved(
            {m: (lambda f=f: f(mu, rho)) for m, f in fwd_fns.items() if m in methods},
            repeats=repeats,
        )
    weight_mb = rows * cols * 4 / 2**20
    row = {"rows": rows, "cols": cols, "dtype": "float32", "weight_mb": weight_mb,
           "backend": mtbkd.ops.select_backend(torch.device("cpu"), "reparameterize"),
           "methods": {}}  # fmt: skip
    for m in methods:
        entry = {"forward_backward": fb[m]}
        if m in fwd:
            entry["forward"] = fwd[m]
        if memory:
            for key, bwd in (("peak_extra_fwd_bwd", True), ("peak_extra_fwd", False)):
                b = common.peak_extra_memory(
                    "bench_bayes", "sampling_memory_probe",
                    {"method": m, "rows": rows, "cols": cols, "backward": bwd},
                )  # fmt: skip
                entry[key + "_mb"] = b / 2**20
                entry[key + "_weights"] = b / 2**20 / weight_mb
        row["methods"][m] = entry
    base = row["methods"]["fused"]
    for m in methods:
        if m != "fused":
            e = row["methods"][m]
            e["fused_speedup_fwd_bwd"] = (
                e["forward_backward"]["median_ms"] / base["forward_backward"]["median_ms"]
            )
            if "forward" in e:
                e["fused_speedup_fwd"] = e["forward"]["median_ms"] / base["forward"]["median_ms"]
    return row


# ---------------------------------------------------------------------------------------------
# 1b. A Bayesian linear layer's training step
# ---------------------------------------------------------------------------------------------

LAYER_PRIOR_SIGMA = 1.0


def _eager_kl(mu, rho):
    s = F.softplus(rho)
    return (math.log(LAYER_PRIOR_SIGMA) - torch.log(s)
            + (s * s + mu * mu) / (2 * LAYER_PRIOR_SIGMA**2) - 0.5).sum()  # fmt: skip


def _eager_layer_step(wmu, wrho, bmu, brho, x):
    w = wmu + F.softplus(wrho) * torch.randn_like(wmu)
    b = bmu + F.softplus(brho) * torch.randn_like(bmu)
    y = F.linear(x, w, b)
    return y.square().mean() + (_eager_kl(wmu, wrho) + _eager_kl(bmu, brho)) / 50_000


def _step_method(method: str, x: torch.Tensor, make_layer, make_bayesian_torch, eager_step):
    """``fn() -> grads``: one training step (forward with KL, backward) of ``method``'s layer on
    ``x``: ``make_layer()`` builds the mtbkd layer (whose initial parameters the eager and
    compiled steps copy), ``make_bayesian_torch()`` bayesian-torch's, ``eager_step(wmu, wrho,
    bmu, brho, x)`` is the loss in plain torch ops."""
    if method == "fused":  # the KL from the forward's own sampling pass
        from mtbkd.nn import record_kl

        layer = make_layer()

        def step():
            with record_kl(layer) as rec:
                y = layer(x)
            loss = y.square().mean() + rec.kl / 50_000
            return torch.autograd.grad(loss, list(layer.parameters()))

        return step
    if method == "fused_separate_kl":  # the KL in an op of its own, after the forward
        layer = make_layer()

        def step():
            loss = layer(x).square().mean() + layer.kl() / 50_000
            return torch.autograd.grad(loss, list(layer.parameters()))

        return step
    if method == "bayesian_torch":
        layer = make_bayesian_torch()

        def step():
            y, kl = layer(x)
            loss = y.square().mean() + kl / 50_000
            return torch.autograd.grad(loss, list(layer.parameters()))

        return step
    if method in ("eager", *COMPILED):
        ref = make_layer()
        params = [p.detach().clone().requires_grad_(True) for p in
                  (ref.weight_mu, ref.weight_rho, ref.bias_mu, ref.bias_rho)]  # fmt: skip
        f = _compile(eager_step, method) if method in COMPILED else eager_step

        def step():
            return torch.autograd.grad(f(*params, x), params)

        return step
    raise ValueError(method)


def _timed_steps(fns: dict, repeats: int) -> dict:
    """The steps timed side by side, each with its time over the fused step's."""
    t = common.time_interleaved(fns, repeats=repeats)
    base = t["fused"]["median_ms"]
    return {m: {**t[m], "fused_speedup": t[m]["median_ms"] / base} for m in t}


def layer_method(method: str, d_in: int, d_out: int, batch: int):
    """``fn() -> grads``: one training step of a ``d_in -> d_out`` Bayesian linear layer on a
    batch of ``batch`` rows."""
    from mtbkd.nn import BayesLinear

    def bayesian_torch():
        from bayesian_torch.layers import LinearReparameterization

        return LinearReparameterization(d_in, d_out, prior_variance=LAYER_PRIOR_SIGMA**2)

    torch.manual_seed(0)
    x = torch.randn(batch, d_in)
    return _step_method(method, x, lambda: BayesLinear(d_in, d_out, prior_sigma=LAYER_PRIOR_SIGMA),
                        bayesian_torch, _eager_layer_step)  # fmt: skip


def bench_layer(d_in: int, d_out: int, batch: int, repeats: int, methods: list[str]) -> dict:
    fns = {m: layer_method(m, d_in, d_out, batch) for m in methods}
    return {"d_in": d_in, "d_out": d_out, "batch": batch,
            "methods": _timed_steps(fns, repeats)}  # fmt: skip


def _eager_conv_step(wmu, wrho, bmu, brho, x):
    w = wmu + F.softplus(wrho) * torch.randn_like(wmu)
    b = bmu + F.softplus(brho) * torch.randn_like(bmu)
    y = F.conv2d(x, w, b, padding=1)
    return y.square().mean() + (_eager_kl(wmu, wrho) + _eager_kl(bmu, brho)) / 50_000


def conv_layer_method(method: str, channels: int, batch: int, size: int):
    """``fn() -> grads``: one training step of a ``channels -> channels`` 3x3 Bayesian
    convolution (padding 1) on ``[batch, channels, size, size]`` inputs."""
    from mtbkd.nn import BayesConv2d

    def bayesian_torch():
        from bayesian_torch.layers import Conv2dReparameterization

        return Conv2dReparameterization(channels, channels, 3, padding=1,
                                        prior_variance=LAYER_PRIOR_SIGMA**2)  # fmt: skip

    torch.manual_seed(0)
    x = torch.randn(batch, channels, size, size)
    return _step_method(
        method, x,
        lambda: BayesConv2d(channels, channels, 3, padding=1, prior_sigma=LAYER_PRIOR_SIGMA),
        bayesian_torch, _eager_conv_step,
    )  # fmt: skip


def bench_conv_layer(channels: int, batch: int, size: int, repeats: int,
                     methods: list[str]) -> dict:  # fmt: skip
    fns = {m: conv_layer_method(m, channels, batch, size) for m in methods}
    return {"channels": channels, "batch": batch, "size": size,
            "methods": _timed_steps(fns, repeats)}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# 2. SGLD step
# ---------------------------------------------------------------------------------------------


def _sgld_params(sizes: list[tuple[int, ...]]):
    torch.manual_seed(1)
    params = [nn.Parameter(torch.randn(s) * 0.02) for s in sizes]
    for p in params:
        p.grad = torch.randn_like(p)
    return params


def _loop_sgld_step(params, lr: float, num_data: float, temperature: float = 1.0) -> None:
    # The textbook implementation: a Python loop, one randn_like buffer per parameter.
    scale = math.sqrt(2 * lr * temperature)
    with torch.no_grad():
        for p in params:
            p.add_(p.grad, alpha=-lr * num_data)
            p.add_(torch.randn_like(p), alpha=scale)


def bench_sgld(sizes: list[tuple[int, ...]], repeats: int) -> dict:
    lr, num_data = 1e-6, 50_000
    fused_params = _sgld_params(sizes)
    loop_params = _sgld_params(sizes)
    opt = SGLD(fused_params, lr=lr, num_data=num_data)
    times = common.time_interleaved(
        {"fused": opt.step, "loop": lambda: _loop_sgld_step(loop_params, lr, num_data)},
        repeats=repeats,
    )
    n = sum(math.prod(s) for s in sizes)
    return {
        "num_tensors": len(sizes), "num_params": n, "methods": times,
        "fused_speedup": times["loop"]["median_ms"] / times["fused"]["median_ms"],
        # Bytes: read theta and grad, write theta (fused); the loop also writes and reads noise.
        "fused_gbs": 12 * n / (times["fused"]["median_ms"] / 1e3) / 1e9,
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------
# 3. Predictive over posterior samples
# ---------------------------------------------------------------------------------------------


def _classifier(d_in: int, hidden: int, classes: int) -> nn.Module:
    torch.manual_seed(2)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, classes)).eval()  # fmt: skip


def _filled_store(model: nn.Module, include: str | None, samples: int) -> SampleStore:
    store = SampleStore(model, include=include, max_samples=samples)
    saved = {k: v.detach().clone() for k, v in model.named_parameters()}
    with torch.no_grad():
        for _ in range(samples):
            for name, p in model.named_parameters():
                if include is None or name.startswith(include.rstrip("*")):
                    p.copy_(saved[name] + 0.01 * torch.randn_like(p))
            store.collect()
        for name, p in model.named_parameters():
            p.copy_(saved[name])
    return store


def _loop_predict(model: nn.Module, store: SampleStore, x: torch.Tensor) -> torch.Tensor:
    # The per-sample loop users write: load each sample's tensors into the model, run it.
    params = dict(model.named_parameters())
    out = []
    with torch.no_grad():
        for s in range(len(store)):
            for name, value in store.sample(s).items():
                params[name].copy_(value)
            out.append(torch.softmax(model(x).float(), -1))
    return torch.stack(out)


def bench_predictive(n: int, d_in: int, hidden: int, classes: int, samples: int,
                     repeats: int) -> list[dict]:  # fmt: skip
    rows = []
    x = torch.randn(n, d_in)
    for include, label in (("4.*", "head only (the paper's SGLD phase)"), (None, "all parameters")):
        model = _classifier(d_in, hidden, classes)
        store = _filled_store(model, include, samples)
        times = common.time_interleaved(
            {"batched": lambda m=model, s=store: predict(m, s, x),
             "loop": lambda m=model, s=store: _loop_predict(m, s, x)},
            repeats=repeats,
        )  # fmt: skip
        a = predict(model, store, x)
        b = _loop_predict(model, store, x)
        rows.append({
            "sampled": label, "samples": samples, "N": n,
            "chunk": posterior._auto_chunk(store, dict(model.named_parameters()), a),
            "model": f"MLP {d_in}-{hidden}-{hidden}-{classes}", "methods": times,
            "batched_speedup": times["loop"]["median_ms"] / times["batched"]["median_ms"],
            "max_abs_diff": float((a - b).abs().max()),
        })  # fmt: skip
    return rows


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def table(results: dict) -> str:
    lines = ["### Sampling forward+backward (fp32)", "",
             "| layer | method | fwd+bwd ms (p20-p80) | fwd ms | fused speed-up | "
             "peak extra fwd / fwd+bwd (weights) |", "|---|---|---|---|---|---|"]  # fmt: skip
    for r in results["sampling"]:
        for m, e in r["methods"].items():
            fb = e["forward_backward"]
            fwd = f"{e['forward']['median_ms']:.1f}" if "forward" in e else "-"
            sp = f"{e['fused_speedup_fwd_bwd']:.2f}x" if "fused_speedup_fwd_bwd" in e else "1"
            mem = (f"{e.get('peak_extra_fwd_weights', float('nan')):.2f} / "
                   f"{e.get('peak_extra_fwd_bwd_weights', float('nan')):.2f}")  # fmt: skip
            lines.append(
                f"| {r['rows']}x{r['cols']} | {m} | {fb['median_ms']:.1f} "
                f"({fb['p20_ms']:.1f}-{fb['p80_ms']:.1f}) | {fwd} | {sp} | {mem} |"
            )
    lines += ["", "### Bayesian linear layer: one training step (sample, matmul, KL, backward)",
              "", "| layer | batch | method | ms (p20-p80) | time / fused |",
              "|---|---|---|---|---|"]  # fmt: skip
    for r in results.get("layer", []):
        for m, e in r["methods"].items():
            lines.append(
                f"| {r['d_in']}x{r['d_out']} | {r['batch']} | {m} | {e['median_ms']:.1f} "
                f"({e['p20_ms']:.1f}-{e['p80_ms']:.1f}) | {e['fused_speedup']:.2f}x |"
            )
    if results.get("conv_layer"):
        lines += ["", "### Bayesian 3x3 convolution: one training step (sample, conv, KL, "
                  "backward)", "", "| channels | batch x maps | method | ms (p20-p80) | "
                  "time / fused |", "|---|---|---|---|---|"]  # fmt: skip
        for r in results["conv_layer"]:
            for m, e in r["methods"].items():
                lines.append(
                    f"| {r['channels']} -> {r['channels']} | {r['batch']} x {r['size']}x"
                    f"{r['size']} | {m} | {e['median_ms']:.1f} ({e['p20_ms']:.1f}-"
                    f"{e['p80_ms']:.1f}) | {e['fused_speedup']:.2f}x |"
                )
    if results.get("bayesian_torch") is not None:
        lines.append(f"\nbayesian-torch: {results['bayesian_torch']}")
    s = results["sgld"]
    lines += ["", "### SGLD step", "",
              f"{s['num_tensors']} tensors, {s['num_params']:,} parameters: fused "
              f"{s['methods']['fused']['median_ms']:.2f} ms vs Python loop "
              f"{s['methods']['loop']['median_ms']:.2f} ms ({s['fused_speedup']:.2f}x, fused "
              f"{s['fused_gbs']:.1f} GB/s)."]  # fmt: skip
    lines += [
        "",
        "### Predictive over posterior samples",
        "",
        "| sampled | S | N | samples per chunk (automatic) | batched ms | loop ms | speed-up |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results["predictive"]:
        lines.append(
            f"| {r['sampled']} | {r['samples']} | {r['N']} | {r['chunk']} | "
            f"{r['methods']['batched']['median_ms']:.1f} | "
            f"{r['methods']['loop']['median_ms']:.1f} | {r['batched_speedup']:.2f}x |"
        )
    mach = results["machine"]
    lines.append(f"\nCopy bandwidth: {results['copy_bandwidth_gbs']:.1f} GB/s. `compiled`: "
                 "torch.compile with its defaults (inductor generates the random numbers); "
                 "`compiled_eager_rng`: with `fallback_random=True` (eager's generator, as the "
                 "other methods). `fused`: the layer's KL from its forward's sampling pass "
                 "(`mtbkd.nn.record_kl`); `fused_separate_kl`: from `layer.kl()`, an op of its "
                 "own. bayesian-torch's layer returns its KL as a mean, not a sum, "
                 "and starts at rho = -3: the same work, another loss value.")  # fmt: skip
    backends = [results.get("backend"), *(r.get("backend") for r in results["sampling"])]
    lines.append("\n" + common.provenance(mach, backends))
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    plt = common.pyplot()
    if plt is None:  # matplotlib is an optional extra (common.save_suite says so)
        return
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))
    r = results["sampling"][0]
    names = list(r["methods"])
    axes[0].bar(names, [r["methods"][m]["forward_backward"]["median_ms"] for m in names],
                color=["C0", "C1", "C2", "C3"][: len(names)])  # fmt: skip
    axes[0].set_ylabel("ms (median)")
    axes[0].set_title(f"sampling fwd+bwd, {r['rows']}x{r['cols']}")
    if results.get("layer"):
        lr = results["layer"][0]
        ln = list(lr["methods"])
        axes[3].bar([n.replace("_", "-") for n in ln],
                    [lr["methods"][m]["median_ms"] for m in ln],
                    color=[f"C{i}" for i in range(len(ln))])  # fmt: skip
        axes[3].set_title(f"Bayesian layer step, {lr['d_in']}x{lr['d_out']}, batch {lr['batch']}")
    s = results["sgld"]
    axes[1].bar(
        ["fused", "loop"],
        [s["methods"]["fused"]["median_ms"], s["methods"]["loop"]["median_ms"]],
        color=["C0", "C1"],
    )
    axes[1].set_title(f"SGLD step, {s['num_params']:,} params")
    labels = [p["sampled"].split(" (")[0] for p in results["predictive"]]
    xs = range(len(labels))
    axes[2].bar(
        [i - 0.2 for i in xs],
        [p["methods"]["batched"]["median_ms"] for p in results["predictive"]],
        0.4,
        label="batched",
    )
    axes[2].bar(
        [i + 0.2 for i in xs],
        [p["methods"]["loop"]["median_ms"] for p in results["predictive"]],
        0.4,
        label="loop",
    )
    axes[2].set_xticks(list(xs), labels)
    axes[2].set_title(f"predictive, S={results['predictive'][0]['samples']}")
    axes[2].legend()
    for ax in axes:
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("mtbkd Bayesian student (lower is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(quick: bool = False, out_dir: Path | str | None = None) -> dict:
    """Run the suite; with ``out_dir`` write JSON, markdown and ``latest-bayes.png`` there."""
    rows, cols = (1024, 1024) if quick else (4096, 4096)
    repeats = 3 if quick else 7
    methods = ["fused", "eager"] if quick else ["fused", "eager", *COMPILED]
    bt = importlib.util.find_spec("bayesian_torch") is not None
    layer_methods = ["fused", "fused_separate_kl", *methods[1:]] + (
        ["bayesian_torch"] if bt else []
    )
    d = 1024 if quick else 4096
    results = {
        "suite": "bayes", "quick": quick, "machine": common.machine(),
        "copy_bandwidth_gbs": common.copy_bandwidth_gbs(),
        "bayesian_torch": None if bt else "not installed (baseline skipped)",
        "backend": mtbkd.ops.select_backend(torch.device("cpu"), "reparameterize"),
        "sampling": [bench_sampling(rows, cols, repeats, methods, memory=True)],
        "layer": [bench_layer(d, d, 128, repeats, layer_methods)],
        "conv_layer": [bench_conv_layer(128 if quick else 512, 4 if quick else 8, 8,
                                        repeats, [m for m in layer_methods
                                                  if m != "fused_separate_kl"])],
    }  # fmt: skip
    sizes = ([(1024, 784), (1024,), (1024, 1024), (1024,), (10, 1024), (10,)] if quick else
             [(4096, 1024), (4096,), (4096, 4096), (4096,), (1024, 4096), (1024,), (10, 1024),
              (10,)])  # fmt: skip
    results["sgld"] = bench_sgld(sizes, repeats)
    results["predictive"] = bench_predictive(
        n=200 if quick else 2000, d_in=784, hidden=128 if quick else 512, classes=10,
        samples=100, repeats=repeats,
    )  # fmt: skip
    results["load_average_end"] = common.load_average()  # after the last measurement
    s = results["sampling"][0]["methods"]
    results["targets"] = {
        "sampling_fwd_bwd_speedup_vs_eager": s["eager"]["fused_speedup_fwd_bwd"],
        "sampling_fwd_bwd_target_2x_met": s["eager"]["fused_speedup_fwd_bwd"] >= 2.0,
        "sampling_fwd_peak_extra_weights": s["fused"].get("peak_extra_fwd_weights"),
        "predictive_speedup_head_only": results["predictive"][0]["batched_speedup"],
        "predictive_target_3x_met": results["predictive"][0]["batched_speedup"] >= 3.0,
    }  # fmt: skip
    md = table(results)
    if out_dir is not None:
        out_dir = common.results_dir(out_dir, quick)
        path, png = common.save_suite("bayes", results, md, out_dir, plot)
        results["files"] = [str(path)] + ([str(png)] if png is not None else [])
    print(md)
    if out_dir is not None:
        print(f"results: {results['files'][0]}")  # as the loss and llm suites end
    return results


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    run(quick=a.quick, out_dir=a.out)
