"""pytest-benchmark suite of the fused CPU losses vs the eager reference (small sizes by default).

Run: ``.venv/bin/pytest bench/test_bench_loss.py --benchmark-only`` (set ``MTBKD_BENCH_FULL=1`` for
N=2048, V=32000, K=3). ``mtbkd bench --suite loss`` is the complete side-by-side suite with
memory, bandwidth, JSON and PNG.
"""

import os

import pytest
import torch

import mtbkd
from bench.bench_loss import _fwd_bwd, eager_fn, fused_fn, make_inputs

FULL = os.environ.get("MTBKD_BENCH_FULL") == "1"
N, V, K = (2048, 32000, 3) if FULL else (256, 8192, 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("loss", ["mtbkd", "forward_kl"])
@pytest.mark.parametrize("method", ["fused", "eager"])
def test_forward_backward(benchmark, method, loss, dtype):
    z, t, y = make_inputs(N, V, K, dtype)
    fn = fused_fn(loss) if method == "fused" else eager_fn(loss)
    benchmark.group = f"{loss}-{dtype}"
    benchmark.extra_info["backend"] = mtbkd.ops.select_backend(torch.device("cpu"))
    grad = benchmark(_fwd_bwd, fn, z, t, y)
    assert torch.isfinite(grad).all()
