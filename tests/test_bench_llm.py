"""The LLM benchmark (bench/bench_llm.py): its fused and eager methods compute the same gradients,
its matmul floor does the flops it is credited with, and a quick run writes the table, JSON and
PNG with every column."""

from __future__ import annotations

import json

import pytest
import torch

from bench import bench_llm as B


@pytest.mark.parametrize("loss", B.LOSSES)
def test_fused_and_eager_compute_the_same_gradients(loss):
    inputs = B.make_inputs(40, 8, 96, 2)
    fused = B._fwd_bwd(B.make_method("fused", loss, chunk_size=16), *inputs)
    eager = B._fwd_bwd(B.make_method("eager", loss), *inputs)
    for a, b in zip(fused, eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_matmul_floor_shapes_and_flops():
    hid, w, teachers, y = B.make_inputs(12, 8, 30, 3)
    z = B.make_method("matmuls", "mtbkd")(hid, w, teachers, y)
    assert z.shape == (12, 30)
    # 3 teachers: 4 forward products and 2 backward ones of 2·N·H·V flops each
    assert B.flops(12, 8, 30, 3) == 6 * 2 * 12 * 8 * 30
    with pytest.raises(ValueError, match="unknown method"):
        B.make_method("nope", "mtbkd")


def test_quick_run_writes_every_column(tmp_path, monkeypatch):
    # one small configuration, no memory probes (they start child processes)
    row = B.bench_config("mtbkd", 64, 16, 256, 2, repeats=1, with_memory=False, chunk_size=16)
    assert set(row["methods"]) == {"fused", "eager", "matmuls"}
    for entry in row["methods"].values():
        assert entry["gflops"] > 0 and entry["forward_backward"]["median_ms"] > 0
    ratio = row["methods"]["fused"]["forward_backward"]["median_ms"] / \
        row["methods"]["matmuls"]["forward_backward"]["median_ms"]  # fmt: skip
    assert row["time_ratio_fused_over_matmuls"] == pytest.approx(ratio)
    results = {"configs": [row], "machine": {"threads": 1}, "backend": "cpu"}
    md = B.table(results)
    assert "fused/matmuls" in md and md.count("\n| mtbkd |") == 1
    B.plot(results, tmp_path / "llm.png")
    assert (tmp_path / "llm.png").stat().st_size > 0
    json.dumps(results)  # machine-readable as written
