"""``bench/bench_gpu.py`` (the GPU benchmark of ``bench/gpu_check.sh``) runs end to end in its CPU
dry-run mode: tiny shapes, Triton in the interpreter, results JSON and PNG written."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from mtbkd import ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench_module(name: str = "bench_gpu"):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "bench", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_byte_model_matches_math_section_9():
    # MATH.md section 9's forward passes, plus 2 E b for the backward's scaling of the saved
    # gradient (a review found it left out); and the (K+2) E b any fused loss must move
    bench = _bench_module()
    assert bench.passes_bytes("forward_kl", 8, 10, 3, 2) == (2 * 3 + 3 + 2) * 80 * 2
    assert bench.passes_bytes("mtbkd_cached", 8, 10, 3, 2) == (2 * 3 + 3 + 2) * 80 * 2
    assert bench.passes_bytes("jsd", 8, 10, 3, 2) == (3 * 3 + 4 + 2) * 80 * 2
    assert bench.passes_bytes("mtbkd", 8, 10, 1, 4) == (3 + 4 + 2) * 80 * 4
    assert bench.required_bytes(8, 10, 3, 2) == (3 + 2) * 80 * 2


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


def test_peak_memory_counts_the_measured_steps_gradient(monkeypatch):
    # A fake CUDA meter: besides the inputs, the device holds the gradient of the student logits
    # and, while that gradient is written, a method's temporaries. The warm-up step's gradient
    # was left in the base, so every method's peak came out one [N, V] gradient short.
    bench = _bench_module()
    import torch

    z, t, y = bench.make_inputs(16, 256, 2, torch.float32, "cpu")
    grad, temp = z.numel() * z.element_size(), 3 * z.numel() * z.element_size()
    meter = {"z": None, "peak": 0}

    def live(*_):
        zz = meter["z"]
        return 0 if zz is None or zz.grad is None else zz.grad.nbytes

    def method(zz, t, y, stats):
        meter["z"] = zz
        meter["peak"] = max(meter["peak"], live() + temp + grad)
        return (zz * 2).sum()

    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", live)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: max(meter["peak"], live()))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: meter.update(peak=live()))
    cpu_quantiles = bench._quantiles_ms  # do_bench needs a GPU: time on the CPU path
    monkeypatch.setattr(bench, "_quantiles_ms", lambda fn, dev, reps: cpu_quantiles(fn, "cpu", 1))
    entry = bench.measure(method, z, t, y, None, "cuda", nbytes=1, reps=1)
    assert entry["peak_extra_mb"] * 2**20 == temp + grad


@pytest.mark.parametrize(
    "script, argv",
    [("bench_gpu", ["--n", "0"]), ("bench_gpu", ["--vocab", "-1"]),
     ("bench_gpu", ["--teachers", "0"]), ("bench_gpu", ["--budget-s", "nan"]),
     ("sweep_triton_tiles", ["--k", "0"]), ("sweep_triton_tiles", ["--blocks", "0"]),
     ("sweep_triton_tiles", ["--warps", "-2"]), ("sweep_triton_tiles", ["--v", "x"])],
)  # fmt: skip
def test_gpu_scripts_refuse_bad_sizes_before_measuring(script, argv, tmp_path, monkeypatch,
                                                       capsys):  # fmt: skip
    # an audit (thirtieth session): 0 rows put an error in every cell, 0 teachers or a negative
    # size raised a traceback after the copy-bandwidth measurement on the device
    mod = _bench_module(script)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on the GPU machine
    monkeypatch.setattr(mod, "run" if script == "bench_gpu" else "sweep",
                        lambda *a, **k: pytest.fail("it ran"))  # fmt: skip
    with pytest.raises(SystemExit) as exc:
        mod.main(["--out", str(tmp_path), *argv])
    assert exc.value.code == 2 and f"argument {argv[0]}" in capsys.readouterr().err


def test_unknown_method_is_refused(tmp_path, capsys):
    # a misspelt method was dropped silently: the run measured nothing and exited 0
    bench = _bench_module()
    with pytest.raises(SystemExit) as exc:
        bench.main(["--dry-run", "--out", str(tmp_path / "out"), "--methods", "triton", "eagr"])
    assert exc.value.code == 2 and "invalid choice: 'eagr'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(ops.backend_status()["triton"] is not None, reason="triton unavailable")
def test_tile_sweep_dry_run_measures_every_tile_and_names_the_best(tmp_path):
    # bench/sweep_triton_tiles.py (the data behind kernels/losses.py's _block) in its CPU dry run:
    # every (BLOCK, num_warps) pair is launched through the public API, the heuristic's own tile
    # is recorded, and the heuristic is restored afterwards.
    # without TRITON_INTERPRET from the caller: the dry run sets it (it had measured no tile,
    # each one's error in tiles.json, and exited 0)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    env.pop("MTBKD_BACKEND", None)
    env.pop("TRITON_INTERPRET", None)
    script = os.path.join(ROOT, "bench", "sweep_triton_tiles.py")
    argv = [sys.executable, script, "--dry-run", "--out", str(tmp_path), "--k", "3",
            "--losses", "forward_kl", "--blocks", "16", "32"]  # fmt: skip
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "tiles.json").read_text())
    (run,) = res["runs"]
    assert run["loss"] == "forward_kl" and run["K"] == 3
    assert [(t["block"], t["warps"]) for t in run["tiles"]] == [(16, 4), (32, 4)]
    assert all(t["median_ms"] > 0 for t in run["tiles"])
    assert run["best"]["median_ms"] == min(t["median_ms"] for t in run["tiles"])
    # the heuristic's tile for V = 50, K = 3 (KP = 4), bf16: 64 columns over one warp
    assert run["heuristic"] == [64, 1]
    assert "best BLOCK=" in proc.stdout


@pytest.mark.skipif(ops.backend_status()["triton"] is not None, reason="triton unavailable")
def test_tile_heuristic_gives_each_thread_16_bytes_per_row():
    from mtbkd.kernels import losses

    # H200 sweep (bench/results/gpu-2026-11-30-h200): bf16, K = 3 (KP = 4) at V = 128256 ran
    # 2.2x faster over 1024 columns x 4 warps than over 8 warps
    assert losses._block(128256, 4, 2) == (1024, 4)
    assert losses._block(128256, 1, 2) == (2048, 8)  # K = 1 unchanged (measured at 59 %)
    assert losses._block(128256, 4, 4) == (1024, 8)  # float32: 4 elements per thread
    assert losses._block(128256, 4, 8) == (1024, 16)  # float64: 2
    assert losses._block(37, 1, 2) == (64, 1)  # a tiny row: one warp
    # nine rows of 512 (K = 5..8): 4 warps keep a thread's share at 36 elements (2 warps: 72)
    assert losses._block(128256, 8, 2) == (512, 4)
    assert losses._block(128256, 16, 2) == (256, 4)  # K = 9..16: 17 rows of 256


def test_grad_rounding_reports_each_backend_and_finds_no_double_rounding(tmp_path, capsys):
    grad_rounding = _bench_module("grad_rounding")

    out = tmp_path / "rounding.json"
    assert grad_rounding.main(["--n", "15", "--vocab", "37", "--teachers", "2",
                               "--device", "cpu", "--methods", "eager", "cpu", "reference",
                               "--out", str(out)]) == 0  # fmt: skip
    res = json.loads(out.read_text())
    assert [r["loss"] for r in res["rows"]] == list(grad_rounding.LOSSES)
    assert res["counted_rows"] == 12  # rows 0, 7 and 14 masked
    for r in res["rows"]:
        for m in ("eager", "cpu", "reference"):
            assert 0.0 < r[m]["max_rel_error"] < 2.0**-7, (r["loss"], m, r[m])
        # the fused backends round each element once, to nearest
        assert r["cpu"]["not_nearest"] == 0 and r["reference"]["not_nearest"] == 0, r
    assert "| mtbkd |" in capsys.readouterr().out
    small = ["--n", "8", "--vocab", "11", "--device", "cpu", "--methods", "eager", "cpu"]
    assert grad_rounding.main([*small, "--check"]) == 0
    # --check fails on a fused backend off nearest, or failing; eager is only the comparison
    real = grad_rounding.measure

    def off(method, *args):
        if method == "cpu":
            return {**real(method, *args), "not_nearest": 1}
        return real(method, *args)

    grad_rounding.measure = off
    assert grad_rounding.main([*small, "--check"]) == 1
    assert grad_rounding.main(small) == 0  # without --check only the table

    def broken(method, *args):
        if method == "cpu":
            raise RuntimeError("no kernel")
        return real(method, *args)

    grad_rounding.measure = broken
    assert grad_rounding.main([*small, "--check"]) == 1
    assert "RuntimeError: no kernel" in capsys.readouterr().out  # the others' numbers remain


def test_grad_rounding_counts_elements_not_rounded_to_nearest():
    grad_rounding = _bench_module("grad_rounding")

    truth = torch.tensor([[1.0 + 2.0**-9 + 2.0**-12, 3.0, -0.7]], dtype=torch.float64)
    nearest = truth.to(torch.bfloat16)
    assert grad_rounding.errors(nearest, truth)["not_nearest"] == 0
    wrong = nearest.clone()
    assert nearest[0, 0] == 1.0
    wrong[0, 0] = 1.0 + 2.0**-7  # the next bf16 number: 2^-7 - 2^-9 - 2^-12 away, over half 2^-7
    assert grad_rounding.errors(wrong, truth)["not_nearest"] == 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--n", "0"], "argument --n: must be a positive integer, got 0"),
        (["--n", "-5"], "argument --n: must be a positive integer, got -5"),
        (["--teachers", "0"], "argument --teachers: must be a positive integer, got 0"),
        (["--vocab", "x"], "argument --vocab: 'x' is not an integer"),
        (["--methods", "eager", "bogus"], "argument --methods: invalid choice: 'bogus'"),
        (["--device", "cuda"], "--device cuda: no CUDA device here"),
    ],
)
def test_grad_rounding_refuses_bad_arguments(argv, message, monkeypatch, capsys):
    # found by an audit: --n 0 and --teachers 0 put an error in every cell and exited 0, --n -5
    # raised a traceback, --device cuda without CUDA a raw RuntimeError, --methods bogus ran
    grad_rounding = _bench_module("grad_rounding")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(grad_rounding, "run", lambda *a, **k: pytest.fail("it ran"))
    with pytest.raises(SystemExit) as exc:
        grad_rounding.main(["--device", "cpu", *argv])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_gradient_error_target_is_labelled_with_the_dtype_it_was_measured_in():
    # found by an audit: targets() said "bf16 gradient error <= eager's" of every run, a float32
    # (or --dry-run) run's included
    bench = _bench_module()

    def run(dtype, fused_err):
        return {"loss": "jsd", "N": 8, "V": 37, "K": 2, "dtype": dtype, "methods": {
            "triton": {"median_ms": 1.0, "grad_rel_error": fused_err},
            "eager": {"median_ms": 2.0, "grad_rel_error": 1e-3}}}  # fmt: skip

    res = {"copy_bandwidth_gbs": 1.0, "config": {"dtype": "float32"},
           "runs": [run("float32", 1e-4)]}  # fmt: skip
    got = bench.targets(res)
    assert got["triton"]["fp32 gradient error <= eager's"] is True
    assert not any(k.startswith("bf16") for k in got["triton"])
    assert got["cuda"]["fp32 gradient error <= eager's"] is None  # not measured
    res = {"copy_bandwidth_gbs": 1.0, "config": {"dtype": "bfloat16"},
           "runs": [run("bfloat16", 1e-2), run("float32", 1e-4)]}  # fmt: skip
    got = bench.targets(res)["triton"]
    assert got["bf16 gradient error <= eager's"] is False
    assert got["fp32 gradient error <= eager's"] is True


def test_bayes_step_dry_run_times_every_method_that_can_run(tmp_path, capsys):
    # bench/bayes_step_gpu.py (gpu_check.sh's BayesLinear step on the device) at tiny sizes on CPU:
    # the Triton backend in its interpreter, the CUDA one said not run, the baselines measured
    bayes_step_gpu = _bench_module("bayes_step_gpu")
    out = tmp_path / "new" / "step.json"  # its folder is made
    assert bayes_step_gpu.main(["--dry-run", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| cuda | not run: CPU dry run | - |" in table
    got = json.loads(out.read_text())
    expected = {"eager", "compiled_eager_rng"} | (
        {"triton"} if ops._triton_interpreted() else set()
    )
    assert set(got["ms"]) == expected and all(v > 0 for v in got["ms"].values())
    with pytest.raises(SystemExit):
        bayes_step_gpu.main(["--size", "0", "--dry-run"])


@pytest.mark.parametrize(
    "script, flag", [("grad_rounding", "--out"), ("page_faults", "--out"),
                     ("bayes_step_gpu", "--json")],
)  # fmt: skip
@pytest.mark.parametrize("where", ["folder", "under a file"])
def test_bench_scripts_refuse_a_bad_output_path_before_measuring(script, flag, where, tmp_path,
                                                                 monkeypatch, capsys):  # fmt: skip
    # session 32: a folder, or a path two levels under a file, failed only when the results were
    # written, after the whole measurement (a traceback, and a stray .tmp file)
    mod = _bench_module(script)
    monkeypatch.setattr(mod, "run", lambda *a, **k: pytest.fail("it measured"), raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on the GPU machine
    (tmp_path / "afile").write_text("")
    target = tmp_path if where == "folder" else tmp_path / "afile" / "sub" / "x.json"
    argv = [flag, str(target)] + (["--device", "cpu"] if script == "grad_rounding" else [])
    with pytest.raises(SystemExit) as exc:
        mod.main(argv)
    assert exc.value.code == 2 and "not a file path" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_dated_result_files_of_one_day_do_not_replace_each_other(tmp_path):
    # a second run of the day had replaced the first one's file (every machine here is "vm")
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import common

    first = common.write_results("bayes", {"machine": {"commit": "aaa"}}, tmp_path)
    second = common.write_results("bayes", {"machine": {"commit": "bbb"}}, tmp_path)
    assert first != second
    assert json.loads(first.read_text())["machine"]["commit"] == "aaa"
    assert json.loads((tmp_path / "latest-bayes.json").read_text())["machine"]["commit"] == "bbb"
