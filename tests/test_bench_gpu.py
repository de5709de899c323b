"""``bench/bench_gpu.py`` (the GPU benchmark of ``bench/gpu_check.sh``) runs end to end in its CPU
dry-run mode: tiny shapes, Triton in the interpreter, results JSON and PNG written."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

from mtbkd import ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench_module():
    spec = importlib.util.spec_from_file_location(
        "bench_gpu", os.path.join(ROOT, "bench", "bench_gpu.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_byte_model_matches_math_section_9():
    bench = _bench_module()
    assert bench.passes_bytes("forward_kl", 8, 10, 3, 2) == (2 * 3 + 3) * 80 * 2
    assert bench.passes_bytes("mtbkd_cached", 8, 10, 3, 2) == (2 * 3 + 3) * 80 * 2
    assert bench.passes_bytes("jsd", 8, 10, 3, 2) == (3 * 3 + 4) * 80 * 2
    assert bench.passes_bytes("mtbkd", 8, 10, 1, 4) == (3 + 4) * 80 * 4


@pytest.mark.skipif(ops.backend_status()["triton"] is not None, reason="triton unavailable")
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_dry_run_writes_results(tmp_path, monkeypatch):
    bench = _bench_module()
    out = tmp_path / "gpu-dry"
    rc = bench.main(["--dry-run", "--out", str(out), "--losses", "mtbkd_cached", "jsd",
                     "--methods", "triton", "eager"])  # fmt: skip
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert [r["loss"] for r in res["runs"]] == ["mtbkd_cached", "jsd"]
    jsd = res["runs"][1]["methods"]
    assert jsd["triton"]["median_ms"] > 0 and jsd["eager"]["median_ms"] > 0
    assert "speedup_of" in jsd["eager"]
    # float32 inputs: both gradients agree with float64 to float32 rounding
    assert jsd["triton"]["grad_rel_error"] < 1e-5 and jsd["eager"]["grad_rel_error"] < 1e-5
    assert set(res["targets"]) == {"triton", "cuda"}
    assert (out / "time.png").stat().st_size > 0 and (out / "bandwidth.png").stat().st_size > 0
    assert "MTBKD_BACKEND" not in os.environ
