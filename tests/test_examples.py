"""The example programs in examples/ run as documented (they must not rot)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(args: list[str], timeout: int = 300) -> str:
    proc = subprocess.run(
        args, capture_output=True, text=True, timeout=timeout, cwd=EXAMPLES.parent
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout


def _cross_fit_module():
    sys.path.insert(0, str(EXAMPLES))
    try:
        import cross_fit
    finally:
        sys.path.pop(0)
    return cross_fit


def _refusal(argv: list[str], capfd) -> str:
    """What ``python examples/cross_fit.py ARGV`` writes to stderr as it refuses ``argv`` with a
    nonzero exit status. Run in this process (a process of its own costs seconds of imports): the
    SystemExit the script's process would exit with, its message (which Python would print to
    stderr) or argparse's error on stderr, and the stderr of any `mtbkd distill` fold process."""
    capfd.readouterr()
    with pytest.raises(SystemExit) as exc:
        _cross_fit_module().main(argv)
    code = exc.value.code
    assert code not in (0, None), code
    return capfd.readouterr().err + (code if isinstance(code, str) else "")


def test_quickstart():
    out = _run([sys.executable, str(EXAMPLES / "quickstart.py")])
    accs = [float(a) for a in re.findall(r"train acc ([0-9.]+)", out)]
    assert accs and accs[-1] > accs[0], out


def test_pipeline_own_model():
    out = _run([sys.executable, str(EXAMPLES / "pipeline_own_model.py")])
    # the example's two teachers are each right on half of the classes: the student must follow
    # the right one per class
    rows = re.findall(r"class (\d): responsibilities \[([0-9.]+), ([0-9.]+)\]", out)
    assert len(rows) == 4, out
    assert all(float(a) > 0.5 for c, a, b in rows if int(c) < 2)
    assert all(float(b) > 0.5 for c, a, b in rows if int(c) >= 2)


def test_compare_runs_refuses_an_unknown_reference(tmp_path):
    # a --reference that is none of the merged methods wrote a summary without the differences
    base, variant = (str(EXAMPLES.parent / "results" / d)
                     for d in ("deeploc-5seeds", "deeploc-5seeds-composition"))  # fmt: skip
    args = [sys.executable, str(EXAMPLES / "compare_runs.py"), base, variant, "--tag", "comp"]
    out = _run(args + ["--out", str(tmp_path / "ok")])
    assert "mtbkd_sgld_comp minus each method" in out
    proc = subprocess.run(args + ["--reference", "mtbkd_sgdl_comp", "--out", str(tmp_path / "x")],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode != 0
    assert "--reference 'mtbkd_sgdl_comp' is none of the merged methods" in proc.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_torchrun_vocab_parallel():
    # `python -m torch.distributed.run` is what the `torchrun` script runs
    out = _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                str(EXAMPLES / "torchrun_vocab_parallel.py"), "--check"])  # fmt: skip
    m = re.search(r"check: vocab-parallel (\S+)\s+single-process (\S+)", out)
    assert m is not None, out
    assert abs(float(m.group(1)) - float(m.group(2))) <= 1e-4 * abs(float(m.group(2)))


def _csv_dataset(root: Path) -> Path:
    """A CSV dataset of the user's own with a group column and two teachers (3 classes)."""
    import numpy as np

    rng = np.random.default_rng(0)
    d = root / "data"
    d.mkdir()
    for split, n in (("train", 90), ("test", 30)):
        y = np.arange(n) % 3
        x = rng.normal(size=(n, 4)) + y[:, None]
        lines = ["f0,f1,f2,f3,group,label"] + [
            ",".join([f"{v:.5f}" for v in x[i]] + [str(i % 4), str(y[i])]) for i in range(n)
        ]
        (d / f"{split}.csv").write_text("\n".join(lines) + "\n")
        for t in "ab":
            logits = 2.0 * np.eye(3)[y] + rng.normal(size=(n, 3))
            np.savetxt(d / f"teacher_{t}_{split}.csv", logits, delimiter=",")
    return d


def test_cross_fit(tmp_path, capfd):
    import json

    d = _csv_dataset(tmp_path)
    out = tmp_path / "cf"
    args = [sys.executable, str(EXAMPLES / "cross_fit.py"), "--data-dir", str(d), "--by", "group",
            "--out", str(out), "--no-figures", "--", "--smoke", "--methods", "ce,mtbkd_sgld",
            "--no-progress", "--no-figures"]  # fmt: skip
    printed = _run(args)
    assert printed.strip().splitlines()[-1] == str(out)
    # four folds (the group's values), each tested on its own rows, without the group column
    sizes = []
    for k in range(4):
        test = (out / "data" / f"fold{k}" / "test.csv").read_text().splitlines()
        train = (out / "data" / f"fold{k}" / "train.csv").read_text().splitlines()
        assert test[0] == train[0] == "f0,f1,f2,f3,label"
        sizes.append(len(test) - 1)
        assert len(train) - 1 + sizes[-1] == 120
        teacher = (out / "data" / f"fold{k}" / "teacher_a_test.csv").read_text().splitlines()
        assert len(teacher) == sizes[-1]
    # group i % 4 of 90 and 30 rows
    assert sizes == [23 + 8, 23 + 8, 22 + 7, 22 + 7]
    rep = json.loads((out / "seed0" / "report.json").read_text())
    assert rep["rows"] == 120 and rep["folds"] == 4 and rep["dataset"] == "data"
    assert [m["name"] for m in rep["methods"]] == ["ce", "mtbkd_sgld"]
    # the pooled accuracy is the row-weighted mean of the folds' accuracies
    folds = [json.loads((out / f"fold{k}" / "seed0" / "report.json").read_text())
             for k in range(4)]  # fmt: skip
    mean = sum(f["methods"][0]["accuracy"] * n for f, n in zip(folds, sizes)) / 120
    assert abs(rep["methods"][0]["accuracy"] - mean) < 1e-6
    summary = (out / "summary.md").read_text()
    assert "Cross-fitted over 4 folds (group=0, group=1, group=2, group=3)" in summary
    assert "on these 120 test rows" in (out / "seed0" / "report.md").read_text()
    # run again: each fold's finished seed is read back, the pooled numbers are the same
    again = _run(args)
    assert again.count("seed 0: finished earlier, read from") == 4
    assert json.loads((out / "seed0" / "report.json").read_text()) == rep
    # a teacher dropped from the data: no file of it is left in the folds (so --resume sees
    # other data)
    for split in ("train", "test"):
        (d / f"teacher_b_{split}.csv").rename(tmp_path / f"b_{split}.csv")
    assert "was run on other data" in _refusal(args[2:], capfd)
    assert sorted(p.name for p in (out / "data" / "fold0").iterdir()) == [
        "teacher_a_test.csv", "teacher_a_train.csv", "test.csv", "train.csv"]  # fmt: skip
    for split in ("train", "test"):
        (tmp_path / f"b_{split}.csv").rename(d / f"teacher_b_{split}.csv")
    # other folds into the same folder: mtbkd distill --resume refuses the changed data
    stderr = _refusal([*args[2:4], "--folds", "2", *args[6:]], capfd)
    assert "mtbkd distill failed on fold 0 of 2" in stderr
    assert "was run on other data" in stderr


def test_cross_fit_runs_each_fold_in_process_with_the_commands_exit_status(monkeypatch, capfd):
    # what `mtbkd distill` would have exited with in a process of its own, and printed to stderr
    cross_fit = _cross_fit_module()
    seen = []

    def fake_main(argv, outcome):
        seen.append(argv)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    for outcome, status, says in (
        (0, 0, ""),
        (None, 0, ""),
        (SystemExit("mtbkd distill: --resume: was run on other data"), 1, "was run on other"),
        (SystemExit(2), 2, ""),
        (RuntimeError("a bug"), 1, "RuntimeError: a bug"),
    ):  # fmt: skip
        monkeypatch.setattr(cross_fit.cli, "main", lambda argv, o=outcome: fake_main(argv, o))
        capfd.readouterr()
        assert cross_fit.run_distill(["distill", "--seeds", "0"]) == status
        err = capfd.readouterr().err
        assert says in err if says else err == ""
    assert seen == [["distill", "--seeds", "0"]] * 5
    monkeypatch.setattr(cross_fit.cli, "main", lambda argv: fake_main(argv, KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):  # left to main's message: rerun to resume
        cross_fit.run_distill(["distill"])

    def interrupted(argv):  # what cli.main makes of Ctrl-C: a message telling to add --resume,
        try:  # which cross_fit.py refuses after --: its own message says to rerun the command
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise SystemExit("mtbkd distill: interrupted; ... with --resume") from None

    monkeypatch.setattr(cross_fit.cli, "main", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cross_fit.run_distill(["distill"])


def test_cross_fit_stratified_folds_and_refusals(tmp_path, capfd):
    import numpy as np

    d = _csv_dataset(tmp_path)
    cross_fit = _cross_fit_module()
    header, rows, teachers = cross_fit.load_pool(d)
    assert len(rows) == 120 and all(len(v) == 120 for v in teachers.values())
    fold, names = cross_fit.assign_folds(header, rows, None, 5, seed=0)
    labels = [r[-1] for r in rows]
    for k in range(5):  # 40 rows of each class -> 8 per class in every fold
        assert (
            sorted(labels[i] for i in range(120) if fold[i] == k)
            == ["0"] * 8 + ["1"] * 8 + ["2"] * 8
        )
    assert names[0] == "fold 0 of 5"
    # small classes: each class continues where the previous one stopped (sizes differ by one)
    small = [["x", str(c)] for c in range(6) for _ in range(3)]
    fold, _ = cross_fit.assign_folds(["x", "label"], small, None, 5, seed=1)
    assert sorted(np.bincount(fold, minlength=5).tolist()) == [3, 3, 4, 4, 4]
    # test.csv's columns in another order: matched by name, the header stays train.csv's
    lines = [ln.split(",") for ln in (d / "test.csv").read_text().splitlines()]
    (d / "test.csv").write_text("\n".join(",".join([r[-1]] + r[:-1]) for r in lines) + "\n")
    header, rows = cross_fit.load_pool(d)[:2]
    assert header[-1] == "label" and [r[-1] for r in rows[90:93]] == ["0", "1", "2"]
    # read as mtbkd reads CSV files: a trailing blank row and spaces around the names
    text = (d / "train.csv").read_text().replace("group,label", "group, label") + "\n"
    (d / "train.csv").write_text(text)
    assert len(cross_fit.load_pool(d)[1]) == 120
    base = ["--data-dir", str(d), "--out", str(tmp_path / "x")]
    for extra, says in (
        (["--by", "Partition"], "--by: no column 'Partition'"),
        (["--folds", "1"], "--folds: cross-fitting needs 2 folds or more"),
        (["--by", "label"], "--by: 'label' is the label column"),
        (["--folds", "2", "--seeds", "x"], "--seeds:"),
        (["--folds", "2", "--", "--seeds", "1"], "after --: --seeds: set by cross_fit.py"),
    ):
        stderr = _refusal(base + extra, capfd)
        assert says in stderr, stderr
    (d / "teacher_b_test.csv").unlink()
    assert "teachers of train" in _refusal(base + ["--folds", "3"], capfd)
    assert not (tmp_path / "x").exists()


def test_cross_fit_built_in_dataset(tmp_path, capfd):
    import json

    out = tmp_path / "cf"
    args = [sys.executable, str(EXAMPLES / "cross_fit.py"), "--dataset", "digits", "--folds", "2",
            "--fold-seed", "3", "--out", str(out), "--no-figures", "--", "--smoke", "--methods",
            "ce,mtbkd_map", "--no-progress", "--no-figures"]  # fmt: skip
    printed = _run(args)
    assert printed.strip().splitlines()[-1] == str(out)
    assert "=== fold 0 of 2: 898 training rows, 899 test rows ===" in printed
    rep = json.loads((out / "seed0" / "report.json").read_text())
    assert rep["rows"] == 1797 and rep["folds"] == 2 and rep["dataset"] == "digits"
    for k in range(2):  # each fold is an ordinary run, its fold in its settings
        fold = json.loads((out / f"fold{k}" / "seed0" / "report.json").read_text())
        assert (fold["config"]["test_folds"], fold["config"]["test_fold"]) == (2, k)
        assert fold["config"]["fold_seed"] == 3
    assert not (out / "data").exists()  # no data files: the pipeline loads the folds itself
    again = _run(args)  # resumed: every fold's finished seed read back
    assert again.count("seed 0: finished earlier, read from") == 2
    # other folds into the same folder: mtbkd distill --resume refuses the changed settings
    other = [a if a != "3" else "4" for a in args]
    assert "was written with other settings (fold_seed" in _refusal(other[2:], capfd)
    base = ["--out", str(tmp_path / "x")]
    for extra, says in (
        (["--dataset", "yeast", "--folds", "2", "--data-dir", str(tmp_path)],
         "--data-dir: --dataset yeast ships with its package"),
        (["--dataset", "digits", "--by", "Partition"], "--by: --dataset digits has no group"),
        (["--dataset", "dir", "--folds", "2"], "--data-dir is required for --dataset dir"),
        (["--dataset", "digits", "--folds", "2", "--", "--set", "test_fold=1"],
         "after --: --set test_fold: set by cross_fit.py"),
        (["--dataset", "digits", "--folds", "2000"], "--folds: 2000 folds of 1797 rows"),
        # mtbkd's parser takes unique prefixes: --ou is --out, --resu is --resume
        (["--dataset", "digits", "--folds", "2", "--", "--ou", "y"], "after --: --out: set by"),
        (["--dataset", "digits", "--folds", "2", "--", "--resu"], "after --: --resume: set by"),
    ):  # fmt: skip
        stderr = _refusal(base + extra, capfd)
        assert says in stderr, stderr
    assert not (tmp_path / "x").exists()


def test_cross_fit_and_compare_runs_never_write_into_another_run(tmp_path, capfd):
    # an audit: --out naming a --seeds run had its seed reports and summary overwritten, and a
    # refused second cross-fit had already rewritten the first one's OUT/data
    from mtbkd import cli

    seeds_run = tmp_path / "seeds_run"
    (seeds_run / "seed0").mkdir(parents=True)
    (seeds_run / "summary.json").write_text('{"seeds": [0]}')
    single = tmp_path / "single"
    single.mkdir()
    (single / "report.json").write_text("{}")
    for out in (seeds_run, single):
        says = _refusal(["--dataset", "digits", "--folds", "2", "--out", str(out)], capfd)
        assert "holds another run or summary" in says, says
        proc = subprocess.run(
            [sys.executable, str(EXAMPLES / "compare_runs.py"), "a", "b", "--tag", "t", "--out",
             str(out)], capture_output=True, text=True, timeout=300)  # fmt: skip
        assert proc.returncode != 0 and "holds a run or another summary" in proc.stderr
    afile = tmp_path / "afile"
    afile.write_text("x")
    says = _refusal(["--dataset", "digits", "--folds", "2", "--out", str(afile / "sub")], capfd)
    assert "is a file, not a folder" in says
    # another cross-fit writing to OUT: refused before OUT/data is touched
    busy = tmp_path / "busy"
    held = cli._lock_folder("test", busy)
    try:
        d = _csv_dataset(tmp_path)
        says = _refusal(["--dataset", "dir", "--data-dir", str(d), "--folds", "2", "--out",
                         str(busy)], capfd)  # fmt: skip
        assert "another mtbkd run is writing to" in says
        assert not (busy / "data").exists()
    finally:
        import os

        os.close(held)


def test_compare_runs_names_an_older_comparison_as_a_summary(tmp_path):
    # session 32: comparisons written before compared_from existed (14 under results/) were
    # read as --seeds runs whose seed 0 "is not finished"
    base, older = (str(EXAMPLES.parent / "results" / d)
                   for d in ("digits-5seeds", "digits-5seeds-joint-selection"))  # fmt: skip
    args = [sys.executable, str(EXAMPLES / "compare_runs.py"), base, older, "--tag", "x"]
    proc = subprocess.run(args + ["--out", str(tmp_path / "o")], capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode != 0
    assert "is not finished" not in proc.stderr and "not a --seeds run" in proc.stderr
