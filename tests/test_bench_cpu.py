"""The CPU benchmark suites' own machinery: the correctness check before timing, the byte
counts, the interleaved timing and what a result file records (a review of the benchmarks)."""

import json
import os
import sys
import types
from pathlib import Path

import pytest
import torch

from bench import bench_loss, common


def test_the_loss_benchmark_checks_agreement_before_timing(monkeypatch):
    z, t, y = bench_loss.make_inputs(40, 300, 3, torch.float32)
    for loss in bench_loss.LOSSES:
        got = bench_loss.check_agreement(loss, z, t, y)
        assert got["loss_rel_err"] < 1e-5 and got["grad_rel_err"] < 1e-5
    real = bench_loss.make_method

    def wrong(method, loss):  # a "fused" method whose loss is 10 % off
        fn = real(method, loss)
        return (lambda a, b, c: 1.1 * fn(a, b, c)) if method == "fused" else fn

    monkeypatch.setattr(bench_loss, "make_method", wrong)
    with pytest.raises(RuntimeError, match="fused mtbkd differs from the eager reference"):
        bench_loss.check_agreement("mtbkd", z, t, y)


def test_byte_counts_include_the_backward_and_the_required_bytes():
    e, b = 8 * 10, 4
    assert bench_loss.traffic_bytes("mtbkd", 8, 10, 3, torch.float32) == (3 * 3 + 4 + 2) * e * b
    assert (
        bench_loss.traffic_bytes("forward_kl", 8, 10, 3, torch.float32) == (2 * 3 + 3 + 2) * e * b
    )
    assert bench_loss.required_bytes(8, 10, 3, torch.bfloat16) == (3 + 2) * e * 2
    # a backward that hands the saved gradient on makes no pass of its own
    assert bench_loss.traffic_bytes("mtbkd", 8, 10, 3, torch.float32, backward_pass=False) == (
        (3 * 3 + 4) * e * b
    )


@pytest.mark.parametrize("loss", bench_loss.LOSSES)
def test_backward_pass_is_measured_not_assumed(loss):
    # the fused CPU backward of a mean hands its saved gradient on (mtbkd.ops); the eager
    # reference's autograd computes a new one; a mean scaled afterwards (grad_output 3) makes the
    # fused backward scale into a copy
    z, t, y = bench_loss.make_inputs(16, 40, 3, torch.float32)
    fused = bench_loss.make_method("fused", loss)
    assert bench_loss.backward_hands_on_gradient(fused, z, t, y)
    assert not bench_loss.backward_hands_on_gradient(bench_loss.make_method("eager", loss), z, t, y)
    assert not bench_loss.backward_hands_on_gradient(lambda a, b, c: 3.0 * fused(a, b, c), z, t, y)
    row = bench_loss.bench_config(loss, 16, 40, 3, "float32", 1, ["fused", "eager"], False)
    assert row["backward_hands_on_gradient"] is True
    assert row["bytes_fwd_bwd"] == bench_loss.traffic_bytes(
        loss, 16, 40, 3, torch.float32, backward_pass=False
    )


def test_interleaved_timing_runs_every_method_each_round_in_a_shuffled_order():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    out = common.time_interleaved(fns, repeats=6, warmup=0)
    assert set(out) == set("abc") and all(v["repeats"] == 6 for v in out.values())
    rounds = [tuple(calls[i : i + 3]) for i in range(0, 18, 3)]
    assert all(sorted(r) == list("abc") for r in rounds) and len(set(rounds)) > 1


def test_result_files_say_what_produced_them():
    m = common.machine()
    for key in (
        "cpu",
        "threads",
        "torch",
        "commit",
        "uncommitted_changes",
        "command",
        "load_average",
    ):
        assert key in m
    assert m["commit"] is None or len(m["commit"]) == 40


# ---------------------------------------------------------------------------------------------
# Result files: `mtbkd bench --out`, matplotlib optional, atomic writes, plots, provenance
# (an audit of the benchmark CLI). The suites run on stubbed measurements: seconds, not minutes.
# ---------------------------------------------------------------------------------------------

MACH = {"cpu": "Test CPU 9000", "threads": 1, "torch": "9.9", "commit": "0123456789abcdef",
        "uncommitted_changes": True}  # fmt: skip


def _timing(ms=1.0):
    return {"median_ms": ms, "p20_ms": ms, "p80_ms": ms, "repeats": 1}


def _loss_row(loss, n, v, k, dtype, methods):
    row = {"loss": loss, "N": n, "V": v, "K": k, "dtype": dtype, "backend": "cpu",
           "backward_hands_on_gradient": True, "methods": {}}  # fmt: skip
    for i, m in enumerate(methods):
        row["methods"][m] = {"forward": _timing(), "forward_backward": _timing(1.0 + i),
                             "gbs_fwd_bwd": 1.0, "copy_bound_fraction": 0.5,
                             "peak_extra_mb": 10.0, "fused_speedup_fwd_bwd": 1.0 + i}  # fmt: skip
    return row


def _stub_suites(monkeypatch):
    """Replace every measurement of the three CPU suites by a constant; the suites' run(), result
    files, tables and plots stay real. Returns the suite modules."""
    from bench import bench_bayes, bench_llm

    monkeypatch.setattr(common, "copy_bandwidth_gbs", lambda *a, **k: 10.0)
    monkeypatch.setattr(common, "machine", lambda: dict(MACH))
    monkeypatch.setattr(
        bench_loss,
        "bench_config",
        lambda loss, n, v, k, d, reps, ms, mem, bw: _loss_row(loss, n, v, k, d, ms),
    )

    def llm_row(loss, n, h, v, k, repeats, chunk_size=None):
        ms = {m: {"forward_backward": _timing(), "gflops": 1.0, "peak_extra_mb": 1.0}
              for m in ("fused", "eager", "matmuls")}  # fmt: skip
        ratios = ("time_ratio_fused_over_eager", "time_ratio_fused_over_matmuls",
                  "memory_ratio_fused_over_eager")  # fmt: skip
        return {"loss": loss, "N": n, "H": h, "V": v, "K": k, "backend": "cpu", "chunk_size": 32,
                "methods": ms, **dict.fromkeys(ratios, 1.0)}  # fmt: skip

    monkeypatch.setattr(bench_llm, "bench_config", llm_row)
    sampling = {"rows": 2, "cols": 2, "backend": "cpu", "methods": {
        "fused": {"forward_backward": _timing(), "forward": _timing()},
        "eager": {"forward_backward": _timing(), "forward": _timing(),
                  "fused_speedup_fwd_bwd": 1.0}}}  # fmt: skip
    layer = {"d_in": 2, "d_out": 2, "batch": 1,
             "methods": {"fused": {**_timing(), "fused_speedup": 1.0}}}  # fmt: skip
    sgld = {"num_tensors": 1, "num_params": 1, "methods": {"fused": _timing(), "loop": _timing()},
            "fused_speedup": 1.0, "fused_gbs": 1.0}  # fmt: skip
    pred = [{"sampled": "all parameters", "samples": 2, "N": 2, "chunk": 1, "batched_speedup": 1.0,
             "methods": {"batched": _timing(), "loop": _timing()}}]  # fmt: skip
    monkeypatch.setattr(bench_bayes, "bench_sampling", lambda *a, **k: sampling)
    monkeypatch.setattr(bench_bayes, "bench_layer", lambda *a, **k: layer)
    conv = {"channels": 2, "batch": 1, "size": 2,
            "methods": {"fused": {**_timing(), "fused_speedup": 1.0}}}  # fmt: skip
    monkeypatch.setattr(bench_bayes, "bench_conv_layer", lambda *a, **k: conv)
    monkeypatch.setattr(bench_bayes, "bench_sgld", lambda *a, **k: sgld)
    monkeypatch.setattr(bench_bayes, "bench_predictive", lambda *a, **k: pred)
    return {"loss": bench_loss, "bayes": bench_bayes, "llm": bench_llm}


def _cli_suites(monkeypatch, mods):
    # `mtbkd bench` imports the suites as top-level modules (bench/ on sys.path): the stubbed ones
    for suite, mod in mods.items():
        monkeypatch.setitem(sys.modules, f"bench_{suite}", mod)


@pytest.mark.parametrize("where", ["proc", "read-only"])
def test_bench_refuses_an_unwritable_out_before_any_suite_runs(tmp_path, monkeypatch, capsys,
                                                               where):  # fmt: skip
    # found by an audit: only the nearest existing ancestor was checked to be a folder, so
    # `--out /proc/x` passed, the whole benchmark ran, and the run crashed when it wrote
    from mtbkd import cli

    if where == "proc":
        if not os.path.isdir("/proc/self"):
            pytest.skip("no /proc")
        out = "/proc/mtbkd-bench-x"
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes to read-only folders")
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        out = str(ro / "sub")
    ran = []
    fake = types.ModuleType("bench_loss")
    fake.run = lambda quick, out_dir: ran.append(out_dir)
    monkeypatch.setitem(sys.modules, "bench_loss", fake)
    with pytest.raises(SystemExit, match="mtbkd bench: --out .* is not a folder it can write to"):
        cli.main(["bench", "--suite", "loss", "--quick", "--out", out])
    assert ran == []


def test_bench_refuses_an_empty_out_and_probes_a_new_folder(tmp_path, monkeypatch):
    # `--out ""` was falsy: the run fell back to bench/results, over the committed results
    from mtbkd import cli

    ran = []
    fake = types.ModuleType("bench_loss")

    def run(quick, out_dir):
        ran.append(Path(out_dir))
        assert Path(out_dir).is_dir() and not list(Path(out_dir).iterdir())  # probe removed
        (Path(out_dir) / "latest-loss.json").write_text("{}")

    fake.run = run
    monkeypatch.setitem(sys.modules, "bench_loss", fake)
    with pytest.raises(SystemExit, match="--out is empty"):
        cli.main(["bench", "--suite", "loss", "--quick", "--out", ""])
    assert ran == []
    out = tmp_path / "new" / "folder"
    assert cli.main(["bench", "--suite", "loss", "--quick", "--out", str(out)]) == 0
    assert ran == [out] and (out / "latest-loss.json").exists()
    # a run that wrote nothing leaves no folder it made behind
    fake.run = lambda quick, out_dir: None
    assert cli.main(["bench", "--suite", "loss", "--out", str(tmp_path / "empty" / "x")]) == 0
    assert not (tmp_path / "empty").exists()
    with pytest.raises(ValueError, match="empty"):
        common.results_dir("", quick=True)


def test_every_suite_finishes_without_matplotlib(tmp_path, monkeypatch, capsys):
    # found by an audit: plot() imported matplotlib (an optional extra) after the JSON and the
    # markdown were written: a traceback, no table printed, `--suite all` stopped after the
    # first suite, and an earlier run's latest-*.png stood beside the new results
    from mtbkd import cli

    mods = _stub_suites(monkeypatch)
    _cli_suites(monkeypatch, mods)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises
    for suite in mods:
        (tmp_path / f"latest-{suite}.png").write_bytes(b"an earlier run's plot")
    assert cli.main(["bench", "--suite", "all", "--quick", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert printed.count(common.NO_PNG) == 3 and printed.count("Test CPU 9000") == 3
    for suite in mods:
        assert not (tmp_path / f"latest-{suite}.png").exists()
        assert json.loads((tmp_path / f"latest-{suite}.json").read_text())["plots"] == common.NO_PNG
        assert common.NO_PNG in (tmp_path / f"latest-{suite}.md").read_text()
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*"))


def test_every_suite_writes_its_png_with_matplotlib(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    mods = _stub_suites(monkeypatch)
    for suite, mod in mods.items():
        mod.run(quick=True, out_dir=tmp_path)
        assert (tmp_path / f"latest-{suite}.png").stat().st_size > 0
        assert "plots" not in json.loads((tmp_path / f"latest-{suite}.json").read_text())


def test_result_files_are_replaced_atomically(tmp_path, monkeypatch):
    # a failing write (disk full, killed) leaves the previous file whole, and no temporary file
    path = tmp_path / "latest-loss.json"
    common.write_atomic(path, "old")
    assert path.read_text() == "old"
    # with the mode open() gives (mkstemp's 0600 had made results unreadable to other users)
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    assert path.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777
    plain.unlink()

    def fail(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(common.os, "replace", fail)
    with pytest.raises(OSError, match="No space"):
        common.write_atomic(path, "new")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == [path.name]


def test_loss_plot_draws_only_the_methods_that_ran(tmp_path, monkeypatch):
    # found by an audit: a --quick run (no torch.compile) drew "compiled" as zero-height bars
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    figs = []
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: figs.append(self))
    main = [_loss_row(loss, 8, 16, 2, "float32", ["fused", "eager"]) for loss in bench_loss.LOSSES]
    main[1]["methods"].pop("eager")  # a row without a method: no bar there either
    sweep = [_loss_row("mtbkd", 8, v, 1, "float32", ["fused", "eager"]) for v in (16, 32)]
    bench_loss.plot({"main": main, "sweep": sweep}, tmp_path / "p.png")
    ax = figs[0].axes[0]
    assert ax.get_legend_handles_labels()[1] == ["fused", "eager"]
    heights = [b.get_height() for c in ax.containers for b in c]
    assert len(heights) == 3 and min(heights) > 0


def test_every_cpu_suite_ends_its_markdown_with_what_produced_it(tmp_path, monkeypatch):
    # latest-llm.md ended with "2 threads; backend cpu." only: no CPU model, commit, dirty flag
    mods = _stub_suites(monkeypatch)
    monkeypatch.setattr(common, "save_suite", lambda *a, **k: (tmp_path / "x.json", None))
    line = common.provenance(MACH, ["cpu"])
    for part in ("Test CPU 9000", "1 threads", "torch 9.9", "commit 0123456789 (uncommitted "
                 "changes)", "fused column: mtbkd's cpu backend"):  # fmt: skip
        assert part in line
    for suite, mod in mods.items():
        results = mod.run(quick=True, out_dir=tmp_path)
        assert mod.table(results).splitlines()[-1] == line, suite
    assert common.provenance({}, [None]).endswith(
        "commit unknown; fused column: mtbkd's unknown backend."
    )
    off = {**MACH, "cpu_huge_pages": "off (kernel THP: madvise; THP_MEM_ALLOC_ENABLE=1 ...)"}
    assert "1 threads, huge pages off, torch" in common.provenance(off, ["cpu"])
    assert "huge pages on," in common.provenance({**MACH, "cpu_huge_pages": "on (x)"}, ["cpu"])


def test_machine_records_the_huge_page_status():
    from mtbkd.info import huge_pages_status

    assert common.machine()["cpu_huge_pages"] == huge_pages_status()


def test_page_faults_runs_both_page_settings_in_fresh_processes(tmp_path, capsys):
    from bench import page_faults
    from mtbkd.info import huge_pages_status

    out = tmp_path / "new" / "pf.json"  # a folder made for it (it crashed after measuring)
    # 320 x 32000 float32: a 41 MB gradient a step, 10,000 pages of 4 KB (glibc serves blocks
    # up to 32 MB from its heap once freed, without new faults: smaller ones would show none)
    args = ["--loss", "mtbkd", "--n", "320", "--vocab", "32000", "--teachers", "2",
            "--dtype", "float32", "--steps", "2", "--rounds", "1", "--out", str(out)]  # fmt: skip
    assert page_faults.main(args) == 0
    printed = capsys.readouterr().out
    assert "| mtbkd | float32 | 320×32000×2 | huge pages |" in printed
    (row,) = json.loads(out.read_text())["rows"]
    small, huge = row["4 KB pages"], row["huge pages"]
    assert small["THP_MEM_ALLOC_ENABLE"] == "0" and huge["THP_MEM_ALLOC_ENABLE"] == "1"
    assert small["ms"] > 0 and huge["ms"] > 0
    if "kernel THP: madvise" in huge_pages_status(environ={}):
        assert small["minor_faults"] > 5000, small
        assert huge["minor_faults"] < 0.25 * small["minor_faults"], (small, huge)
    with pytest.raises(SystemExit):
        page_faults.main(["--steps", "0"])


def test_entropy_precision_answers_help_without_measuring(capsys, monkeypatch):
    # found by an audit: it had no options parser, so --help ran the measurement
    from bench import entropy_precision

    monkeypatch.setattr(entropy_precision, "worst_error", lambda *a: pytest.fail("measured"))
    with pytest.raises(SystemExit) as exc:
        entropy_precision.main(["--help"])
    assert exc.value.code == 0 and "usage:" in capsys.readouterr().out


def test_quick_results_are_refused_in_the_committed_results_folder(monkeypatch):
    # session 32: --quick --out bench/results replaced the committed latest-*.json / .md with
    # smoke numbers that nothing marked as such
    from pathlib import Path

    from mtbkd import cli

    committed = Path(__file__).resolve().parents[1] / "bench" / "results"
    before = sorted(p.name for p in committed.iterdir())
    with pytest.raises(SystemExit, match="--quick results do not go into"):
        cli.main(["bench", "--suite", "loss", "--quick", "--out", str(committed)])
    assert sorted(p.name for p in committed.iterdir()) == before
