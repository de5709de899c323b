"""The Bayesian-layer benchmark's baselines (bench/bench_bayes.py, section 1b) compute the same
training step as mtbkd.nn.BayesLinear, so their timings compare like with like."""

from __future__ import annotations

import pytest
import torch


def test_bayes_layer_baselines_compute_the_same_step():
    # the eager baseline of the layer benchmark is the same objective as BayesLinear's
    from bench import bench_bayes as B
    from mtbkd.bayes_ops import gaussian_kl

    mu, rho = torch.randn(7, 5, dtype=torch.float64), torch.randn(7, 5, dtype=torch.float64)
    assert float(B._eager_kl(mu, rho)) == pytest.approx(float(gaussian_kl(mu, rho)), rel=1e-10)
    for m in ("fused", "eager"):
        grads = B.layer_method(m, 16, 8, 4)()
        assert [g.shape for g in grads] == [(8, 16), (8, 16), (8,), (8,)]
    res = B.bench_layer(16, 8, 4, repeats=2, methods=["fused", "eager"])
    assert res["methods"]["fused"]["fused_speedup"] == 1.0
    assert "Bayesian linear layer" in B.table({**_bayes_stub(), "layer": [res]})


def _bayes_stub():
    t = {"median_ms": 1.0, "p20_ms": 1.0, "p80_ms": 1.0}
    return {
        "sampling": [],
        "bayesian_torch": None,
        "sgld": {"num_tensors": 1, "num_params": 1, "methods": {"fused": t, "loop": t},
                 "fused_speedup": 1.0, "fused_gbs": 1.0},
        "predictive": [],
        "copy_bandwidth_gbs": 1.0,
        "machine": {"threads": 1},
    }  # fmt: skip


def test_bayes_conv_baselines_compute_the_same_step(monkeypatch):
    # the conv benchmark's eager step is BayesConv2d's objective: the same gradients for the same
    # kernel sample (the layer's fused sample, then the eager formula with its eps)
    from bench import bench_bayes as B
    from mtbkd.nn import BayesConv2d

    for m in ("fused", "eager"):
        grads = B.conv_layer_method(m, 4, 2, 5)()
        assert [g.shape for g in grads] == [(4, 4, 3, 3), (4, 4, 3, 3), (4,), (4,)]
    torch.manual_seed(0)
    layer = BayesConv2d(3, 3, 3, padding=1, posterior_rho_init=-1.0).double()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    p = [q.detach().clone().requires_grad_(True) for q in layer.parameters()]
    torch.manual_seed(7)
    loss = layer(x).square().mean() + layer.kl() / 50_000
    g_layer = torch.autograd.grad(loss, list(layer.parameters()))
    # the same eps through the eager step: randn_like patched to hand out the layer's draws
    torch.manual_seed(7)
    from mtbkd.bayes_ops import counters_used, new_seed, philox_normal

    seed = new_seed()
    eps = iter([philox_normal(seed, 0, p[0].numel()).double().view_as(p[0]),
                philox_normal(seed, counters_used(p[0].numel()), 3).double()])  # fmt: skip
    monkeypatch.setattr(torch, "randn_like", lambda t: next(eps))
    g_eager = torch.autograd.grad(B._eager_conv_step(*p, x), p)
    monkeypatch.undo()
    for a, b in zip(g_layer, g_eager):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    res = B.bench_conv_layer(4, 2, 5, repeats=2, methods=["fused", "eager"])
    assert res["methods"]["fused"]["fused_speedup"] == 1.0
    assert "Bayesian 3x3 convolution" in B.table({**_bayes_stub(), "conv_layer": [res]})
