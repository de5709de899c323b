"""``bench/bench_gpu.py`` (the GPU benchmark of ``bench/gpu_check.sh``) runs end to end in its CPU
dry-run mode: tiny shapes, Triton in the interpreter, results JSON and PNG written."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

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
def test_dry_run_writes_results(tmp_path):
    # In a process of its own, with Triton's interpreter and no GPU visible: Triton chooses
    # interpreted or compiled kernels when they are defined, so on a CUDA machine this process's
    # kernels (compiled) would be launched on the dry run's CPU tensors.
    out = tmp_path / "gpu-dry"
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("MTBKD_BACKEND", None)
    script = os.path.join(ROOT, "bench", "bench_gpu.py")
    argv = [sys.executable, script, "--dry-run", "--out", str(out), "--losses", "mtbkd_cached",
            "jsd", "--methods", "triton", "eager"]  # fmt: skip
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert [r["loss"] for r in res["runs"]] == ["mtbkd_cached", "jsd"]
    jsd = res["runs"][1]["methods"]
    assert jsd["triton"]["median_ms"] > 0 and jsd["eager"]["median_ms"] > 0
    assert "speedup_of" in jsd["eager"]
    # float32 inputs: both gradients agree with float64 to float32 rounding
    assert jsd["triton"]["grad_rel_error"] < 1e-5 and jsd["eager"]["grad_rel_error"] < 1e-5
    assert set(res["targets"]) == {"triton", "cuda"}
    if importlib.util.find_spec("matplotlib") is None:  # a GPU machine may lack it
        assert res["plots"].startswith("matplotlib not installed")
    else:
        assert (out / "time.png").stat().st_size > 0 and (out / "bandwidth.png").stat().st_size > 0
