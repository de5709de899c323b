"""The CPU benchmark suites' own machinery: the correctness check before timing, the byte
counts, the interleaved timing and what a result file records (a review of the benchmarks)."""

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
