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
