"""pytest-benchmark suite of the Bayesian student on CPU (small sizes by default).

Run: ``.venv/bin/pytest bench/test_bench_bayes.py --benchmark-only`` (``MTBKD_BENCH_FULL=1`` for the
4096x4096 layer of issue 4). ``mtbkd bench --suite bayes`` (``bench.bench_bayes.run``) is the full
side-by-side suite with memory, JSON and PNG.
"""

import importlib.util
import os

import pytest
import torch

from bench.bench_bayes import (
    _classifier,
    _filled_store,
    _loop_predict,
    _loop_sgld_step,
    _sampling_inputs,
    _sgld_params,
    layer_method,
    sampling_method,
)
from mtbkd.optim import SGLD
from mtbkd.posterior import predict

FULL = os.environ.get("MTBKD_BENCH_FULL") == "1"
ROWS, COLS = (4096, 4096) if FULL else (512, 1024)


@pytest.mark.parametrize("method", ["fused", "eager"])
def test_sampling_forward_backward(benchmark, method):
    mu, rho, g = _sampling_inputs(ROWS, COLS)
    fn = sampling_method(method, ROWS, COLS)
    benchmark.group = f"sampling {ROWS}x{COLS}"
    dmu, drho = benchmark(fn, mu, rho, g)
    assert torch.isfinite(drho).all() and dmu.shape == mu.shape


LAYER_METHODS = ["fused", "eager"] + (
    ["bayesian_torch"] if importlib.util.find_spec("bayesian_torch") else []
)


@pytest.mark.parametrize("method", LAYER_METHODS)
def test_bayes_linear_step(benchmark, method):
    d = 4096 if FULL else 1024
    step = layer_method(method, d, d, 128)
    benchmark.group = f"Bayesian linear step {d}x{d}, batch 128"
    grads = benchmark(step)
    assert len(grads) == 4 and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("method", ["fused", "loop"])
def test_sgld_step(benchmark, method):
    sizes = [(1024, 784), (1024,), (1024, 1024), (1024,), (10, 1024), (10,)]
    params = _sgld_params(sizes)
    benchmark.group = "sgld step"
    if method == "fused":
        benchmark(SGLD(params, lr=1e-6, num_data=50_000).step)
    else:
        benchmark(_loop_sgld_step, params, 1e-6, 50_000)
    assert all(torch.isfinite(p).all() for p in params)


@pytest.mark.parametrize("method", ["batched", "loop"])
def test_predictive(benchmark, method):
    model = _classifier(784, 256, 10)
    store = _filled_store(model, "4.*", 100)
    x = torch.randn(500, 784)
    benchmark.group = "predictive S=100 (head samples)"
    if method == "batched":
        probs = benchmark(predict, model, store, x, 25)
    else:
        probs = benchmark(_loop_predict, model, store, x)
    assert probs.shape == (100, 500, 10)
