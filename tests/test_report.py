"""Tables, report.json and figures (mtbkd.report) of a hand-made experiment result."""

from __future__ import annotations

import dataclasses
import json
import math
import types

import pytest
import torch

from mtbkd import distill, report
from mtbkd import metrics as M

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


def _result(perfect: bool = False) -> distill.ExperimentResult:
    g = torch.Generator().manual_seed(0)
    n, c = 40, 3
    labels = torch.arange(n) % c
    methods = []
    for name, s in (("ce", 1), ("mtbkd_map", 1), ("mtbkd_sgld", 5)):
        logits = torch.randn(s, n, c, generator=g) + 1.0 * torch.nn.functional.one_hot(labels, c)
        if perfect:
            logits = 20.0 * torch.nn.functional.one_hot(labels, c).float().expand(s, n, c)
        probs = torch.softmax(logits, -1)
        methods.append(
            distill.MethodResult(
                name,
                distill.evaluate_probs(probs, labels),
                1.5,
                {"prior_weight": 0.1},
                probs,
                0.3,
                s > 1,
            )
        )
    w = torch.full((2, n), 0.5)
    r = torch.stack([(labels == 0).float() * 0.8 + 0.1, 1 - ((labels == 0).float() * 0.8 + 0.1)])
    att = distill._summarise_attribution(
        "mtbkd_sgld", w, r, labels, methods[-1].probs, ["x", "y", "z"], ["first", "second"]
    )
    teachers = [
        {
            "name": "first",
            "accuracy": 0.9,
            "nll": 0.3,
            "ece": 0.05,
            "class_accuracy": [1.0, 0.8, 0.9],
        },
        {
            "name": "second",
            "accuracy": 0.8,
            "nll": 0.5,
            "ece": 0.07,
            "class_accuracy": [0.7, 0.9, 0.8],
        },
    ]
    return distill.ExperimentResult(
        "toy",
        ["x", "y", "z"],
        ["first", "second"],
        methods,
        teachers,
        labels,
        att,
        distill.DistillConfig(),
        4.5,
    )


def test_report_json_schema_and_followed_teachers():
    rep = report.report_dict(_result())
    assert rep["dataset"] == "toy"
    assert [m["name"] for m in rep["methods"]] == ["ce", "mtbkd_map", "mtbkd_sgld"]
    for m in rep["methods"]:
        assert list(m) == KEYS
        assert all(isinstance(m[k], float) for k in KEYS[1:])
    assert rep["attribution"]["followed"] == {"x": "first", "y": "second", "z": "second"}
    json.dumps(rep, allow_nan=False)
    sentences = report.followed_sentences(rep["attribution"])
    assert sentences == [
        "The student followed teacher `first` for classes x.",
        "The student followed teacher `second` for classes y, z.",
    ]


def test_undefined_auroc_becomes_null():
    res = _result(perfect=True)
    assert res.methods[0].metrics["accuracy"] == 1.0
    rep = report.report_dict(res)
    assert rep["methods"][0]["auroc_error"] is None
    json.dumps(rep, allow_nan=False)
    assert "n/a" in report.format_table(rep["methods"])


def test_tables_list_every_method():
    rows = report.report_dict(_result())["methods"]
    text = report.format_table(rows)
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["method", "acc", "NLL"] and len(lines) == 2 + len(rows)
    md = report.markdown_table(rows)
    assert md.count("\n") == 1 + len(rows) and "| `mtbkd_sgld` |" in md


def test_reliability_curve_by_hand():
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.5, 0.5]])
    labels = torch.tensor([0, 1, 1, 0])
    conf, acc, count = report.reliability_curve(probs, labels, n_bins=2)
    # bins (0, 0.5] and (0.5, 1]: {0.5 (right)} and {0.9 (right), 0.6 (wrong), 0.7 (right)}
    assert count.tolist() == [1, 3]
    assert conf.tolist() == pytest.approx([0.5, (0.9 + 0.6 + 0.7) / 3])
    assert acc.tolist() == pytest.approx([1.0, 2 / 3])


def test_reliability_curve_bins_as_the_ece_does():
    # fp16 samples averaged in their own precision fell into another bin than the ECE's
    a, b = 1638 / 2048, 1639 / 2048
    q = torch.tensor([[[a, 1 - a]], [[b, 1 - b]]], dtype=torch.float16)
    y = torch.tensor([0])
    conf, acc, count = report.reliability_curve(q, y)
    assert int(count.argmax()) == 12  # (12/15, 13/15]: the ECE's bin of 0.800049
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float16, torch.bfloat16):
        q = torch.softmax(2 * torch.randn(4, 500, 3, generator=g), -1).to(dtype)
        y = torch.randint(0, 3, (500,), generator=g)
        conf, acc, count = report.reliability_curve(q, y)
        implied = float(((acc - conf).abs().double() * count.double()).sum() / 500)
        assert implied == pytest.approx(float(M.ece(q, y)), abs=1e-6)
    with pytest.raises(ValueError, match="labels must have shape"):
        report.reliability_curve(q, y[:3])


def test_write_report_files(tmp_path):
    rep = report.write_report(_result(), tmp_path)
    assert json.loads((tmp_path / "report.json").read_text())["methods"] == rep["methods"]
    md = (tmp_path / "report.md").read_text()
    assert "The student followed teacher `first` for classes x." in md
    assert "- `mtbkd_sgld`: prior_weight=0.1 (validation NLL 0.300)" in md
    for png in ("reliability.png", "uncertainty.png", "teachers.png", "comparison.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"![{png}]({png})" in md
    assert "*average*" not in md  # no mixtures given: no rows for them
    result = _result()
    result.teacher_mixtures = [{"name": "average", "accuracy": 0.5, "nll": 0.75, "ece": 0.125}]
    rep = report.write_report(result, tmp_path / "mix")
    assert rep["teacher_mixtures"] == result.teacher_mixtures
    assert "| *average* | 0.500 | 0.750 | 0.125 |" in (tmp_path / "mix" / "report.md").read_text()


def test_teacher_disagreement_by_hand(tmp_path):
    res = _result()
    assert report.teacher_disagreement(res) is None  # no teacher predictions given
    labels = res.labels
    odd = torch.arange(len(labels)) % 2 == 1
    wrong = (labels + 1) % 3
    # teacher `first` always right; `second` wrong on the odd rows: they disagree exactly there
    res.teacher_pred = torch.stack([labels, torch.where(odd, wrong, labels)])
    d = report.teacher_disagreement(res)
    assert d["rows"] == len(labels) and d["disagree_rows"] == int(odd.sum())
    assert d["teacher_accuracy"] == {"first": 1.0, "second": 0.0}
    for m in res.methods:
        p_true = m.probs.double().mean(0).gather(1, labels[:, None]).squeeze(1)
        pred = m.probs.double().mean(0).argmax(1)
        for key, rows in (("agree", ~odd), ("disagree", odd)):
            got = d["methods"][m.name][key]
            assert got["nll"] == pytest.approx(float(-p_true[rows].log().mean()))
            assert got["accuracy"] == pytest.approx(float((pred == labels)[rows].double().mean()))
    md = report.write_report(res, tmp_path, figures=False)["teacher_disagreement"]
    assert md == d
    text = (tmp_path / "report.md").read_text()
    assert f"differ on {int(odd.sum())} of {len(labels)} test rows" in text
    assert "| `mtbkd_sgld` |" in text.split("## Where the teachers disagree")[1]
    # all teachers agree: no disagreeing rows, reported as such (no NaN)
    res.teacher_pred = torch.stack([labels, labels])
    d = report.teacher_disagreement(res)
    assert d["disagree_rows"] == 0 and d["methods"]["ce"]["disagree"] is None
    assert d["teacher_accuracy"] == {"first": None, "second": None}
    json.dumps(report.report_dict(res), allow_nan=False)
    res.teacher_pred = torch.stack([labels[:-1], labels[:-1]])
    with pytest.raises(ValueError, match="teacher_pred"):
        report.teacher_disagreement(res)


def test_paired_bootstrap_differences():
    res = _result()
    boot = report.paired_bootstrap(res, resamples=400)
    assert boot["reference"] == "mtbkd_sgld" and set(boot["methods"]) == {"ce", "mtbkd_map"}
    ref = res.method("mtbkd_sgld").metrics
    for name, row in boot["methods"].items():
        full = res.method(name).metrics
        for key in ("nll", "accuracy"):  # means of per-row quantities: unbiased under resampling
            r = row[key]
            assert r["low"] <= r["diff"] <= r["high"]
            # the share of the 400 resamples in which the reference is better: near 1 where the
            # whole interval says better (lower NLL / ECE, higher accuracy), near 0 where it says
            # worse (here the reference is clearly better than mtbkd_map in NLL and accuracy)
            better, worse = (r["low"] > 0, r["high"] < 0)
            if key != "accuracy":
                better, worse = worse, better
            if better:
                assert r["p_better"] > 0.95, (name, key, r)
            if worse:
                assert r["p_better"] < 0.05, (name, key, r)
            assert r["diff"] == pytest.approx(ref[key] - full[key], abs=0.05)
    # the checks above bite on these inputs; and ECE, lower is better: clearly worse than CE's
    assert boot["methods"]["mtbkd_map"]["nll"]["p_better"] > 0.95
    assert (
        boot["methods"]["ce"]["ece"]["low"] > 0 and boot["methods"]["ce"]["ece"]["p_better"] < 0.05
    )
    # a method against an identical copy of itself: every difference is exactly 0
    twin = dataclasses.replace(res.method("ce"), name="twin")
    res.methods.append(twin)
    row = report.paired_bootstrap(res, reference="ce", resamples=50)["methods"]["twin"]
    assert all(row[k]["diff"] == row[k]["low"] == row[k]["high"] == 0 for k in row)
    assert report.paired_bootstrap(res, reference="absent") is None
    text = report.format_bootstrap(report.paired_bootstrap(res, resamples=50))
    assert "mtbkd_sgld minus each method" in text and "twin" in text
    assert report.format_bootstrap(None) == ""
    # mtbkd_sgld alone: nothing to compare (before: empty tables in report.md and the summary)
    alone = dataclasses.replace(res, methods=[res.method("mtbkd_sgld")])
    assert report.paired_bootstrap(alone) is None
    md = report._markdown(alone, report.report_dict(alone), [])
    assert "against each method" not in md
    reps = [_seed_report({"mtbkd_sgld": (0.5, 1.2, 0.04)}) for _ in range(2)]
    s = report.summarise_seeds(reps, [0, 1])
    assert s["versus"] is None and "vs method" not in report.format_seed_summary(s, markdown=True)


def test_paired_bootstrap_difference_is_the_tables():
    # the printed Δ is the difference of the table's own numbers, the ECE's too: its mean over
    # resamples is biased (on these 40 rows by far more than the table's rounding)
    res = _result()
    boot = report.paired_bootstrap(res, resamples=200)
    ref = res.method("mtbkd_sgld").metrics
    for name, row in boot["methods"].items():
        full = res.method(name).metrics
        for key in report.BOOTSTRAP_METRICS:
            assert row[key]["diff"] == pytest.approx(ref[key] - full[key], abs=1e-6), (name, key)


# --- several seeds -------------------------------------------------------------------------


def test_parse_seeds():
    assert report.parse_seeds("0-4") == [0, 1, 2, 3, 4]
    assert report.parse_seeds("3, 1,7-8") == [3, 1, 7, 8]
    assert report.parse_seeds("5") == [5]
    for bad in ("", "a", "4-2", "1,1", "0-2,2"):
        with pytest.raises(ValueError, match="seeds"):
            report.parse_seeds(bad)


def _seed_report(values: dict[str, tuple[float, float, float]], dataset: str = "toy") -> dict:
    rows = []
    for name, (acc, nll, ece) in values.items():
        rows.append({k: 1.0 for k in KEYS[1:]} | {"name": name, "accuracy": acc, "nll": nll,
                                                 "ece": ece})  # fmt: skip
    return {"dataset": dataset, "methods": rows}


def test_summarise_seeds_by_hand():
    reps = [
        _seed_report({"ce": (0.50, 1.30, 0.05), "mtbkd_sgld": (0.55, 1.20, 0.04)}),
        _seed_report({"ce": (0.60, 1.10, 0.03), "mtbkd_sgld": (0.58, 1.00, 0.05)}),
        _seed_report({"ce": (0.52, 1.20, 0.04), "mtbkd_sgld": (0.56, 1.15, 0.02)}),
    ]
    s = report.summarise_seeds(reps, [0, 1, 2])
    assert s["dataset"] == "toy" and s["seeds"] == [0, 1, 2]
    ce = s["methods"][0]
    assert ce["name"] == "ce" and ce["nll"]["values"] == [1.30, 1.10, 1.20]
    assert ce["nll"]["mean"] == pytest.approx(1.2) and ce["nll"]["std"] == pytest.approx(0.1)
    row = s["versus"]["methods"]["ce"]
    assert s["versus"]["reference"] == "mtbkd_sgld" and list(s["versus"]["methods"]) == ["ce"]
    assert row["nll"]["values"] == pytest.approx([-0.10, -0.10, -0.05])
    assert row["nll"]["diff"] == pytest.approx(-0.25 / 3) and row["nll"]["wins"] == 3
    assert row["accuracy"]["wins"] == 2 and row["ece"]["wins"] == 2  # ties do not count
    # the 95 % t-interval with 2 degrees of freedom (t = 4.303)
    half = 4.3027 * row["nll"]["std"] / 3**0.5
    assert row["nll"]["low"] == pytest.approx(row["nll"]["diff"] - half, rel=1e-4)
    assert row["nll"]["high"] == pytest.approx(row["nll"]["diff"] + half, rel=1e-4)
    text = report.format_seed_summary(s)
    assert "mean ± sd over 3 seeds" in text and "1.200 ± 0.100" in text and "3/3" in text
    assert "val NLL" not in text  # these reports carry no validation NLL
    md = report.format_seed_summary(s, markdown=True)
    assert "| `ce` |" in md and "| vs method |" in md
    json.dumps(s, allow_nan=False)
    # the validation NLL each report carries (the selection criterion) is summarised too
    for rep, v in zip(reps, ((1.25, 1.15), (1.05, 0.95), (1.15, 1.25)), strict=True):
        rep["validation_nll"] = {"ce": v[0], "mtbkd_sgld": v[1]}
    s = report.summarise_seeds(reps, [0, 1, 2])
    mt = s["methods"][1]["validation_nll"]
    assert mt["values"] == [1.15, 0.95, 1.25] and mt["mean"] == pytest.approx(3.35 / 3)
    header = report.format_seed_summary(s).splitlines()[1]
    assert header.split()[:4] == ["method", "acc", "NLL", "val"]
    assert "1.117 ± 0.153" in report.format_seed_summary(s)


def test_summarise_seeds_interval_counts_only_seeds_with_the_metric():
    reps = [
        _seed_report({"ce": (0.50, 1.30, 0.05), "mtbkd_sgld": (0.55, 1.20, 0.04)}),
        _seed_report({"ce": (0.60, 1.10, 0.03), "mtbkd_sgld": (0.58, 1.00, 0.05)}),
        _seed_report({"ce": (0.52, 1.20, 0.04), "mtbkd_sgld": (0.56, 1.15, 0.02)}),
    ]
    reps[2]["methods"][1]["nll"] = None  # a report.json null
    row = report.summarise_seeds(reps, [0, 1, 2])["versus"]["methods"]["ce"]["nll"]
    assert row["runs"] == 2 and row["wins"] == 2
    assert row["diff"] == pytest.approx(-0.10)
    half = 12.706 * row["std"] / 2**0.5  # t with 1 degree of freedom, not 2
    assert row["high"] == pytest.approx(row["diff"] + half, rel=1e-4)


def test_per_row_nll_is_the_tables_and_reliability_bins_reduced_precision():
    labels = torch.tensor([1, 0, 1])
    probs = torch.tensor([[[1.0, 0.0], [0.3, 0.7], [0.6, 0.4]]])  # p(label) = 0 on row 0
    nll, correct, conf, _ = report._per_row(probs, labels)
    assert nll.mean().item() == pytest.approx(distill.evaluate_probs(probs, labels)["nll"])
    assert correct.tolist() == [0.0, 0.0, 0.0] and conf.tolist() == pytest.approx([1, 0.7, 0.6])
    # confidences just above a bin edge in bf16 / fp16 go in the bin above it (bins are
    # right-closed), as in the ECE: 0.06689 > 1/15 is in bin 1, 0.73340 > 11/15 in bin 11
    for dtype, c, expected in (
        (torch.bfloat16, 0.06689453125, 1),
        (torch.float16, 0.7333984375, 11),
    ):
        p = torch.full((1, 20), (1 - c) / 19)  # probabilities: the other classes share 1 - c
        p[0, 0] = c
        p = p.to(dtype)
        assert p[0, 0].item() == c and int(p.argmax()) == 0
        _, _, count = report.reliability_curve(p, torch.tensor([0]))
        assert int(count.argmax()) == expected


def test_float_labels_are_an_error_not_truncated():
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
    with pytest.raises(TypeError, match="integer tensor"):
        distill.evaluate_probs(probs, torch.tensor([0.9, 1.7]))
    with pytest.raises(TypeError, match="integer class indices, got dtype torch.float32 with fr"):
        distill.teacher_mixtures(torch.zeros(2, 2, 2), torch.tensor([0.9, 1.7]))
    with pytest.raises(TypeError, match="integer tensor"):
        distill.weighting_diagnostic(torch.zeros(2, 2, 2), torch.tensor([0.9, 1.7]), ["a", "b"])


def test_summarise_one_seed_and_bad_input():
    s = report.summarise_seeds([_seed_report({"ce": (0.5, 1.3, 0.05)})], [4])
    assert s["versus"] is None and s["methods"][0]["nll"]["std"] is None  # JSON null, not NaN
    assert "1.300" in report.format_seed_summary(s)
    one = _seed_report({"ce": (0.5, 1.3, 0.05), "mtbkd_sgld": (0.5, 1.2, 0.04)})
    s = report.summarise_seeds([one], [0])
    assert s["versus"]["methods"]["ce"]["nll"]["low"] is None  # no interval from one seed
    with pytest.raises(ValueError, match="one report per seed"):
        report.summarise_seeds([one], [0, 1])
    with pytest.raises(ValueError, match="dataset"):
        report.summarise_seeds([one, _seed_report({"ce": (0.5, 1.3, 0.05)}, "other")], [0, 1])
    with pytest.raises(ValueError, match="other methods"):
        report.summarise_seeds([one, _seed_report({"ce": (0.5, 1.3, 0.05)})], [0, 1])


def test_write_seed_summary_files(tmp_path):
    reps = [
        _seed_report({"ce": (0.5, 1.3 + 0.1 * i, 0.05), "mtbkd_sgld": (0.5, 1.2, 0.04)})
        for i in range(2)
    ]
    s = report.summarise_seeds(reps, [0, 1])
    report.write_seed_summary(s, tmp_path)
    assert json.loads((tmp_path / "summary.json").read_text()) == s
    md = (tmp_path / "summary.md").read_text()
    assert md.startswith("# MT-BKD over 2 seeds: toy") and "![seeds.png](seeds.png)" in md
    assert (tmp_path / "seeds.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert s["shared_test_rows"] is None and "where the dataset's test split is drawn" in md
    assert s["teacher_disagreement"] is None and "Where the teachers disagree" not in md
    # each seed's teacher-disagreement table, averaged over the seeds
    for i, rep in enumerate(reps):
        rep["teacher_disagreement"] = {
            "rows": 100,
            "disagree_rows": 10 + 10 * i,
            "methods": {
                "ce": {"agree": {"accuracy": 0.9, "nll": 0.2}, "disagree": None},
                "mtbkd_sgld": {
                    "agree": {"accuracy": 0.9, "nll": 0.3 + 0.1 * i},
                    "disagree": {"accuracy": 0.5, "nll": 1.0 + 0.2 * i},
                },
            },
        }
    s = report.summarise_seeds(reps, [0, 1])
    d = s["teacher_disagreement"]
    assert d["disagree_fraction"]["mean"] == pytest.approx(0.15)
    assert d["methods"]["mtbkd_sgld"]["disagree_nll"]["mean"] == pytest.approx(1.1)
    assert d["methods"]["mtbkd_sgld"]["agree_nll"]["values"] == pytest.approx([0.3, 0.4])
    assert d["methods"]["ce"]["disagree_nll"]["mean"] is None  # no such rows: null, not NaN
    json.dumps(s, allow_nan=False)
    report.write_seed_summary(s, tmp_path / "dis", figures=False)
    md = (tmp_path / "dis" / "summary.md").read_text().split("## Where the teachers disagree")[1]
    assert "0.150 ± 0.071 of the test rows" in md
    # the agreeing rows first, as in each seed's report.md
    assert "| `mtbkd_sgld` | 0.900 ± 0.000 | 0.350 ± 0.071 | 0.500 ± 0.000 | 1.100 ± 0.141 |" in md
    assert "| `ce` | 0.900 ± 0.000 | 0.200 ± 0.000 | n/a | n/a |" in md
    assert s["train_weighting"] is None and "highest entropy weight" not in md
    # the weighting diagnostic of the training rows, averaged over the seeds
    for i, rep in enumerate(reps):
        rep["train_weighting"] = {
            "rows": 200,
            "disagree_rows": 20 + 20 * i,
            "teacher_accuracy": {"a": 0.4, "b": 0.5 + 0.1 * i},
            "highest_weight_accuracy": 0.5 + 0.2 * i,
            "mean_weights": {"a": 0.5, "b": 0.5},
        }
    s = report.summarise_seeds(reps, [0, 1])
    w = s["train_weighting"]
    assert w["disagree_fraction"]["mean"] == pytest.approx(0.15)
    assert w["highest_weight_accuracy"]["values"] == pytest.approx([0.5, 0.7])
    assert w["teacher_accuracy"]["b"]["mean"] == pytest.approx(0.55)
    report.write_seed_summary(s, tmp_path / "w", figures=False)
    md = (tmp_path / "w" / "summary.md").read_text()
    assert "highest entropy weight is right on 0.600 ± 0.141" in md
    assert "more often than any single teacher" in md
    reps[1]["train_weighting"]["highest_weight_accuracy"] = 0.5  # mean 0.5 < b's 0.55
    report.write_seed_summary(report.summarise_seeds(reps, [0, 1]), tmp_path / "w2", figures=False)
    assert "no information a single-teacher BKD" in (tmp_path / "w2" / "summary.md").read_text()
    reps[1]["train_weighting"]["teacher_accuracy"] = {"c": 0.4, "b": 0.5}  # other teachers
    assert report.summarise_seeds(reps, [0, 1])["train_weighting"] is None
    for rep in reps:
        del rep["teacher_disagreement"], rep["train_weighting"]
    # what the summary says of the test rows follows the per-row labels of the seeds
    for case, (labels, says) in enumerate(
        (
            (((0, 1, 0, 1), (0, 1, 0, 1)), "the test rows are the same in every seed"),
            (((0, 1, 0, 1), (1, 0, 0, 1)), "the test split changes too"),
        )
    ):
        rows = [_per_row_seed({"ce": [1.0] * 4, "mtbkd_sgld": [0.9] * 4}, lab) for lab in labels]
        s = report.summarise_seeds(reps, [0, 1], per_row=rows, resamples=20)
        report.write_seed_summary(s, tmp_path / f"case{case}", figures=False)
        assert says in (tmp_path / f"case{case}" / "summary.md").read_text()
    # one seed cannot tell (before: "the same in every seed"), and "1 seed" is singular
    s = report.summarise_seeds(reps[:1], [0], per_row=rows[:1], resamples=20)
    assert s["shared_test_rows"] is None
    report.write_seed_summary(s, tmp_path / "one", figures=False)
    text = (tmp_path / "one" / "summary.md").read_text()
    assert "same in every seed" not in text and "# MT-BKD over 1 seed:" in text
    assert "mean ± sd over 1 seed\n" in report.format_seed_summary(s) + "\n"


def test_per_row_file_round_trip(tmp_path):
    res = _result()
    report.save_per_row(res, tmp_path / "p.safetensors")
    back = report.load_per_row(tmp_path / "p.safetensors")
    assert torch.equal(back["labels"], res.labels.long())
    for m in res.methods:
        nll, correct, conf, bins = back[m.name]
        assert float(nll.mean()) == pytest.approx(m.metrics["nll"], abs=1e-6)  # metrics: fp32
        assert float(correct.mean()) == pytest.approx(m.metrics["accuracy"])
        # the ECE of the stored rows, through the bootstrap's own binning, is the report's
        whole = report._resampled(back[m.name], torch.arange(len(nll))[None])
        assert float(whole["ece"][0]) == pytest.approx(m.metrics["ece"], abs=1e-6)
    assert report.load_per_row(tmp_path / "absent.safetensors") is None
    report.write_report(res, tmp_path / "run", figures=False)
    assert (tmp_path / "run" / report.PER_ROW_FILE).is_file()


def _per_row_seed(nll: dict[str, list[float]], labels=(0, 1, 0, 1)) -> dict:
    out = {"labels": torch.tensor(labels)}
    for name, v in nll.items():
        t = torch.tensor(v, dtype=torch.float64)
        out[name] = report._with_bins(t, torch.ones_like(t), torch.full_like(t, 0.9))
    return out


def test_seed_bootstrap_covers_seeds_and_rows():
    reps = [_seed_report({"ce": (0.5, 1.0, 0.05), "mtbkd_sgld": (0.5, 0.9, 0.05)})] * 3
    # the reference is better on every row of every seed: every draw says so
    rows = [_per_row_seed({"ce": [1.0, 2.0, 1.5, 1.2], "mtbkd_sgld": [0.9, 1.9, 1.4, 1.1]})] * 3
    s = report.summarise_seeds(reps, [0, 1, 2], per_row=rows, resamples=200)
    r = s["versus"]["methods"]["ce"]["nll"]
    assert s["versus"]["resamples"] == 200 and s["versus"]["shared_test_rows"] is True
    assert r["p_better"] == 1.0 and r["boot_low"] == pytest.approx(-0.1)
    assert r["boot_high"] == pytest.approx(-0.1)
    assert "P(better)" in report.format_seed_summary(s) and "1.00" in report.format_seed_summary(s)
    # better on one seed, worse on another: the interval straddles 0
    rows = [
        _per_row_seed({"ce": [1.0, 1.0, 1.0, 1.0], "mtbkd_sgld": [0.5, 0.5, 0.5, 0.5]}),
        _per_row_seed({"ce": [1.0, 1.0, 1.0, 1.0], "mtbkd_sgld": [1.5, 1.5, 1.5, 1.5]}),
    ]
    s = report.summarise_seeds(reps[:2], [0, 1], per_row=rows, resamples=400)
    r = s["versus"]["methods"]["ce"]["nll"]
    assert r["boot_low"] == pytest.approx(-0.5) and r["boot_high"] == pytest.approx(0.5)
    assert 0.1 < r["p_better"] < 0.4  # strictly better only when seed 0 is drawn twice
    # seeds with their own test sets are resampled independently
    rows = [_per_row_seed({"ce": [1.0] * 4, "mtbkd_sgld": [0.5] * 4}, labels=lab)
            for lab in ((0, 1, 0, 1), (1, 1, 0, 0))]  # fmt: skip
    s = report.summarise_seeds(reps[:2], [0, 1], per_row=rows, resamples=50)
    assert s["versus"]["shared_test_rows"] is False and s["shared_test_rows"] is False
    # no per-row data for a seed (an older run folder): the t-interval only
    s = report.summarise_seeds(reps[:2], [0, 1], per_row=[rows[0], None])
    assert "resamples" not in s["versus"] and "p_better" not in s["versus"]["methods"]["ce"]["nll"]
    with pytest.raises(ValueError, match="no per-row data"):
        report.summarise_seeds(reps[:2], [0, 1], per_row=[rows[0], {"labels": rows[0]["labels"]}])
    with pytest.raises(ValueError, match="one entry per seed"):
        report.summarise_seeds(reps[:2], [0, 1], per_row=[rows[0]])


def test_seed_bootstrap_resamples_a_shared_test_set_once_for_every_seed():
    # seeds tested on the same rows: one row resample serves every seed, so the test set's noise
    # is not averaged away over seeds. Four like seeds; reference - ce is -1 on two of the four
    # rows, 0 on the others: a draw is minus the fraction of such rows among 4 drawn, -1 and 0
    # each with probability (1/2)^4 = 1/16 > 2.5 % (under 0.3 % if each seed drew its own rows)
    reps = [_seed_report({"ce": (0.5, 1.0, 0.05), "mtbkd_sgld": (0.5, 0.5, 0.05)})] * 4
    rows = [_per_row_seed({"ce": [1.0, 1.0, 1.0, 1.0], "mtbkd_sgld": [0.0, 0.0, 1.0, 1.0]})] * 4
    s = report.summarise_seeds(reps, [0, 1, 2, 3], per_row=rows, resamples=1000)
    r = s["versus"]["methods"]["ce"]["nll"]
    assert s["versus"]["shared_test_rows"] is True
    assert (r["boot_low"], r["boot_high"]) == (-1.0, 0.0)


def test_test_rows_are_shared_only_when_their_digests_agree():
    # found by a bug hunt: a dataset sorted by class, split per seed, gave the same label
    # sequence in every seed and was reported as one shared test set
    reps = [_seed_report({"ce": (0.5, 1.0, 0.05), "mtbkd_sgld": (0.5, 0.5, 0.05)})] * 2
    rows = [_per_row_seed({"ce": [1.0, 1.0, 1.0, 1.0], "mtbkd_sgld": [0.0, 0.0, 1.0, 1.0]})] * 2
    digests = [{**rows[0], "test_sha256": "a"}, {**rows[1], "test_sha256": "b"}]
    s = report.summarise_seeds(reps, [0, 1], per_row=digests, resamples=200)
    assert s["shared_test_rows"] is False
    same = [{**r, "test_sha256": "a"} for r in rows]
    assert report.summarise_seeds(reps, [0, 1], per_row=same, resamples=200)["shared_test_rows"]
    # older per-row files without the digest: the labels decide, as before
    assert report.summarise_seeds(reps, [0, 1], per_row=rows, resamples=200)["shared_test_rows"]


def test_paired_bootstrap_interval_is_the_central_95_percent():
    # reference - ce NLL is 1 on 20 of 40 rows and 0 on the others: a resample's difference is
    # Binomial(40, 1/2) / 40, whose 2.5 % and 97.5 % quantiles are 14/40 and 26/40 (P(X <= 13)
    # = 1.9 %, P(X <= 14) = 4.0 %; the 5 % quantile would be 15/40)
    labels = torch.zeros(40, dtype=torch.long)
    p_ce = torch.full((1, 40, 2), 0.5)
    p_ref = torch.full((1, 40, 2), 0.5)
    p_ref[0, 20:, 0] = 0.5 * math.exp(-1.0)  # NLL log 2 + 1 on the last 20 rows
    p_ref[0, 20:, 1] = 1 - p_ref[0, 20:, 0]
    methods = [types.SimpleNamespace(name=n, probs=p) for n, p in (("ce", p_ce), ("ref", p_ref))]
    res = types.SimpleNamespace(
        labels=labels,
        methods=methods,
        method=lambda name: next(m for m in methods if m.name == name),
    )
    row = report.paired_bootstrap(res, reference="ref", resamples=4000)["methods"]["ce"]["nll"]
    assert row["diff"] == pytest.approx(0.5, abs=1e-5)
    assert row["low"] == pytest.approx(14 / 40, abs=1e-5)
    assert row["high"] == pytest.approx(26 / 40, abs=1e-5)


def test_weighting_diagnostic_by_hand():
    # 4 rows, 3 classes, labels 0. Rows 0-2: the teachers disagree; row 3: both say class 0.
    sharp, flat = 6.0, 1.0
    a = torch.tensor([[sharp, 0, 0], [0, flat, 0], [0, sharp, 0], [sharp, 0, 0]])
    b = torch.tensor([[0, flat, 0], [sharp, 0, 0], [0, 0, flat], [sharp, 0, 0]])
    y = torch.zeros(4, dtype=torch.long)
    d = distill.weighting_diagnostic(torch.stack([a, b]), y, ["a", "b"])
    assert d["rows"] == 4 and d["disagree_rows"] == 3
    # a is right on row 0, b on row 1; row 2: both wrong
    assert d["teacher_accuracy"] == pytest.approx({"a": 1 / 3, "b": 1 / 3})
    # the confident teacher is the right one on rows 0 and 1, a wrong one on row 2
    assert d["highest_weight_accuracy"] == pytest.approx(2 / 3)
    w = distill.mf.teacher_weights(torch.stack([a, b])[:, :3].double())  # the disagreeing rows
    assert d["mean_weights"]["a"] == pytest.approx(float(w[0].mean()))
    # the paired difference against the best teacher (a, first of the tied): per row 0, 1, 0
    assert d["best_teacher"] == "a" and d["margin"] == pytest.approx(1 / 3)
    assert d["margin_se"] == pytest.approx((1 / 3) ** 0.5 / 3**0.5)  # sd sqrt(1/3), 3 rows
    # three rows cannot tell +0.333 from noise (the standard error is 0.333)
    text = " ".join(report.weighting_sentence(d))
    assert "0.667" in text and "no more often than the best single teacher (`a`: +0.333" in text
    assert distill.weighting_verdict(1 / 3, 1 / 3) == "tie"
    # beyond two standard errors either way
    sure = dict(d, margin=0.4, margin_se=0.1)
    assert "more often than any single teacher" in " ".join(report.weighting_sentence(sure))
    worse = " ".join(report.weighting_sentence(dict(d, margin=-0.4, margin_se=0.1)))
    assert "less often than the best single teacher" in worse
    assert "no information a single-teacher BKD lacks" in worse
    assert [distill.weighting_verdict(m, 0.1) for m in (0.21, 0.2, -0.2, -0.21)] == [
        "better", "tie", "tie", "worse"
    ]  # fmt: skip
    # a report written before the margin was recorded: the plain comparison of accuracies
    old = {k: v for k, v in d.items() if k not in ("margin", "margin_se", "best_teacher")}
    assert "more often than any single teacher" in " ".join(report.weighting_sentence(old))
    old["highest_weight_accuracy"] = 1 / 3
    assert "no information a single-teacher BKD lacks" in " ".join(report.weighting_sentence(old))
    # one disagreeing row: no standard error, and no verdict beyond a tie
    one = distill.weighting_diagnostic(torch.stack([a, b])[:, :1], y[:1], ["a", "b"])
    assert one["disagree_rows"] == 1 and one["margin"] == 0.0 and one["margin_se"] is None
    # a right but unsure, b wrong and sure: the weighting picks b on the only row
    pair = torch.stack([torch.tensor([[2.0, 0, 0]]), torch.tensor([[0, 6.0, 0]])])
    flip = distill.weighting_diagnostic(pair, y[:1], ["a", "b"])
    assert flip["margin"] == -1.0 and flip["margin_se"] is None
    assert distill.weighting_verdict(flip["margin"], flip["margin_se"]) == "tie"
    text = " ".join(report.weighting_sentence(flip))
    # (session 32: without a standard error the sentence says undecided, not a tie)
    assert "-1.000 over the best single teacher (`a`) with no standard error" in text
    assert "undecided here" in text and "no more often than" not in text
    # the standard error against each teacher
    assert d["margin_se_by_teacher"]["a"] == pytest.approx(d["margin_se"])
    # per row against b (right on row 1): picked - right_b = 1, 0, 0
    assert d["margin_se_by_teacher"]["b"] == pytest.approx((1 / 3) ** 0.5 / 3**0.5)
    # one teacher, no disagreement, bad shapes
    assert distill.weighting_diagnostic(a[None], y, ["a"]) is None
    same = distill.weighting_diagnostic(torch.stack([a, a]), y, ["a", "a2"])
    assert same["disagree_rows"] == 0 and same["highest_weight_accuracy"] is None
    assert report.weighting_sentence(same) == []
    with pytest.raises(ValueError, match="must be"):
        distill.weighting_diagnostic(torch.stack([a, b]), y[:3], ["a", "b"])
    with pytest.raises(ValueError, match=r"must be \[K, N, C\]"):
        distill.weighting_diagnostic(a, y, ["a"])


def test_seed_summary_weighting_margin(tmp_path):
    # each seed's margin is taken against the teacher best on the seeds' mean (b), and the
    # verdict uses one seed's standard error (the seeds share training rows)
    reps = []
    for i, (top, se) in enumerate(((0.60, 0.02), (0.64, 0.04))):
        rep = _seed_report({"ce": (0.5, 1.3 + 0.1 * i, 0.05), "mtbkd_sgld": (0.5, 1.2, 0.04)})
        rep["train_weighting"] = {
            "rows": 100, "disagree_rows": 40,
            "teacher_accuracy": {"a": 0.3 + 0.3 * i, "b": 0.5},  # a: 0.3, 0.6 (mean 0.45)
            "highest_weight_accuracy": top, "mean_weights": {"a": 0.5, "b": 0.5},
            "best_teacher": ["b", "a"][i], "margin": top - [0.5, 0.6][i],
            "margin_se": [se, 0.05][i], "margin_se_by_teacher": {"a": 0.05, "b": se},
        }  # fmt: skip
        reps.append(rep)
    w = report.summarise_seeds(reps, [0, 1])["train_weighting"]
    assert w["best_teacher"] == "b"
    assert w["margin"]["values"] == pytest.approx([0.10, 0.14])
    assert w["margin_se"] == pytest.approx(0.03)
    report.write_seed_summary(report.summarise_seeds(reps, [0, 1]), tmp_path, figures=False)
    md = (tmp_path / "summary.md").read_text()
    edge = "(`b`: +0.120 ± 0.030 s.e., mean over seeds)"
    assert f"more often than any single teacher does {edge}" in md
    reps[1]["train_weighting"]["margin_se_by_teacher"]["b"] = 0.11  # mean 0.065: within 2 se
    report.write_seed_summary(report.summarise_seeds(reps, [0, 1]), tmp_path, figures=False)
    md = (tmp_path / "summary.md").read_text()
    assert "no more often than the best single teacher (`b`: +0.120 ± 0.065 s.e." in md
    # reports without the standard error against every teacher: seed 1's own (0.05) is against
    # a, not b, and is not borrowed for b (it had been: a verdict from another comparison)
    for rep in reps:
        del rep["train_weighting"]["margin_se_by_teacher"]
    summary = report.summarise_seeds(reps, [0, 1])
    assert summary["train_weighting"]["margin_se"] is None
    report.write_seed_summary(summary, tmp_path, figures=False)
    md = (tmp_path / "summary.md").read_text()
    assert "+0.120 over the best single teacher (`b`, mean over seeds) with no standard" in md
    reps[1]["train_weighting"]["best_teacher"] = "b"  # its own margin_se is then against b
    reps[1]["train_weighting"]["margin_se"] = 0.04
    assert report.summarise_seeds(reps, [0, 1])["train_weighting"]["margin_se"] == 0.03


def test_shift_column_in_tables_report_and_summary(tmp_path):
    plain = report.report_dict(_result())
    assert "AUROC shift" not in report.format_table(plain["methods"]) and plain["shift"] is None
    res = _result()
    g = torch.Generator().manual_seed(1)
    for m in res.methods:
        m.shift_probs = torch.softmax(torch.randn(m.probs.shape[0], 9, 3, generator=g), -1)
        m.metrics["auroc_shift"] = distill.shift_auroc(m.probs, m.shift_probs)
    res.shift_name = "noise"
    rep = report.write_report(res, tmp_path / "run")
    assert rep["shift"] == "noise"
    assert [list(m)[-5:] for m in rep["methods"]] == [
        ["auroc_shift", "overconfidence", "ece_floor", "ece_p", "seconds"]
    ] * 3
    header = report.format_table(rep["methods"]).splitlines()[0]
    assert header.split()[-4:] == ["AUROC", "shift", "time", "s"]
    md = (tmp_path / "run" / "report.md").read_text()
    assert "| AUROC shift |" in md
    assert "AUROC shift: predictive entropy as a detector of shifted inputs (noise, 9 rows)" in md
    summary = report.summarise_seeds([rep, rep], [0, 1])
    row = summary["methods"][0]
    assert row["auroc_shift"]["mean"] == pytest.approx(rep["methods"][0]["auroc_shift"])
    assert "AUROC shift" in report.format_seed_summary(summary)
    # seeds without shifted inputs have no such column
    assert "AUROC shift" not in report.format_seed_summary(report.summarise_seeds([plain], [0]))


def test_report_json_is_written_last(tmp_path, monkeypatch):
    # a --seeds --resume run counts a seed as done when its report.json exists
    def broken(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "_figures", broken)
    with pytest.raises(KeyboardInterrupt):
        report.write_report(_result(), tmp_path)
    assert not (tmp_path / "report.json").exists()


def test_attribution_names_no_teacher_where_the_responsibilities_are_close():
    # class x: 0.9 / 0.1 (followed), y: 0.52 / 0.48 and z: 0.48 / 0.52 (within FOLLOW_MARGIN):
    # no teacher stands out there; the weighting of the objective is reported with them
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    r0 = torch.tensor([0.9, 0.9, 0.52, 0.52, 0.48, 0.48])
    att = distill._summarise_attribution(
        "mtbkd_sgld", torch.full((2, 6), 0.5), torch.stack([r0, 1 - r0]), labels,
        torch.full((1, 6, 3), 1 / 3), ["x", "y", "z"], ["first", "second"], "uniform",
    )  # fmt: skip
    assert att["followed"] == {"x": "first"} and att["undecided"] == ["y", "z"]
    assert report.followed_sentences(att) == [
        "The student followed teacher `first` for classes x.",
        "The student followed teacher `second` for no class.",
        "No teacher stands out (mean responsibilities within 0.05 of each other) for classes y, z.",
    ]
    res = _result()
    res.attribution = att
    rep = report.report_dict(res)
    assert rep["attribution"]["weighting"] == "uniform"
    assert rep["attribution"]["undecided"] == ["y", "z"]
    assert "w: prior mixture weight (uniform weights" in report._markdown(res, rep, [])


def test_calibration_sentence_names_what_the_test_rows_can_detect():
    rows = [
        {"name": "ce", "ece": 0.06, "ece_floor": 0.0312, "ece_p": 1 / 201, "overconfidence": -0.04},
        {"name": "bkd", "ece": 0.04, "ece_floor": 0.0334, "ece_p": 0.21},
        {"name": "mtbkd_sgld", "ece": 0.03, "ece_floor": 0.0331, "ece_p": 0.62},
    ]
    (text,) = report.calibration_sentence(rows, 1000, markdown=True)
    assert "ECE 0.031-0.033 on these 1000 test rows" in text
    assert "`ce` (p = 0.00498, mean confidence 0.040 below accuracy)" in text
    assert "`bkd`" not in text
    assert "The other methods' ECE is within that noise" in text
    (text,) = report.calibration_sentence(rows[1:], 1000)
    assert "Every method's ECE is within that noise" in text and "Miscalibration" not in text
    (text,) = report.calibration_sentence(rows[:1])
    assert (
        "ce (p = 0.00498, mean confidence 0.040 below accuracy)" in text
        and "within that noise" not in text
    )
    # reports written before ece_floor / ece_p existed: nothing to say
    assert report.calibration_sentence([{"name": "ce", "ece": 0.06}]) == []
    # the seed report's markdown and the results' own numbers
    res = _result()
    md = report._markdown(res, report.report_dict(res), [])
    assert "ECE resolution:" in md and f"these {len(res.labels)} test rows" in md


def test_seed_summary_counts_the_seeds_beyond_the_ece_noise():
    reps = [
        _seed_report({"ce": (0.5, 1.3, 0.06), "mtbkd_sgld": (0.5, 1.2, 0.04)}) for _ in range(3)
    ]
    for rep, p_ce in zip(reps, (0.01, 0.2, 0.0), strict=True):
        for m, p in zip(rep["methods"], (p_ce, 0.5), strict=True):
            m["ece_floor"], m["ece_p"] = 0.03 + 0.001 * (m["name"] == "ce"), p
            m["overconfidence"] = 0.02 if m["name"] == "ce" else -0.01
    s = report.summarise_seeds(reps, [0, 1, 2])
    assert s["methods"][0]["ece_p"]["values"] == [0.01, 0.2, 0.0]
    md = report.format_seed_summary(s, markdown=True)
    assert (
        "on the test rows, a perfectly" in md
        and "ECE 0.030-0.031 (`ece_floor`" in md
        and "`ce` 2/3 (mean confidence 0.020 above accuracy on average), `mtbkd_sgld` 0/3." in md
    )
    # a floor of 0 (a method certain of every row) is a floor like any other
    for rep in reps:
        rep["methods"][0]["ece_floor"] = 0.0
    md = report.format_seed_summary(report.summarise_seeds(reps, [0, 1, 2]), markdown=True)
    assert "ECE 0.000-0.030 (`ece_floor`" in md and "`ce` 2/3" in md
    for rep in reps:  # older reports: no sentence, no columns
        for m in rep["methods"]:
            del m["ece_floor"], m["ece_p"], m["overconfidence"]
    s = report.summarise_seeds(reps, [0, 1, 2])
    assert "ece_p" not in s["methods"][0] and "ECE resolution" not in report.format_seed_summary(s)


def test_calibrated_runs_say_so_with_their_temperatures():
    # one calibrated report: the sentence in report.md, with each method's temperature
    res = _result()
    for m, t in zip(res.methods, (0.8, 1.25, 0.5, 2.0, 1.0, 0.9, 1.1, 1.3), strict=False):
        m.hparams = {**m.hparams, "predictive_temperature": t}
    rep = report.report_dict(res)
    temps = report.predictive_temperatures(rep["hyperparameters"])
    assert temps[res.methods[0].name] == 0.8 and len(temps) == len(res.methods)
    md = report._markdown(res, rep, [])
    first = res.methods[0].name
    assert "Post-hoc temperature scaling (`calibrate`)" in md and f"`{first}` 0.80" in md
    assert "Post-hoc" not in report._markdown(_result(), report.report_dict(_result()), [])
    # over seeds: the mean temperature per method; uncalibrated seeds say nothing
    reps = [_seed_report({"ce": (0.5, 1.3, 0.06), "mtbkd_sgld": (0.5, 1.2, 0.04)}) for _ in "ab"]
    plain = report.summarise_seeds(reps, [0, 1])
    assert plain["predictive_temperature"] is None
    assert "Post-hoc" not in report.format_seed_summary(plain, markdown=True)
    for rep, t in zip(reps, (0.6, 0.8), strict=True):
        rep["hyperparameters"] = {"ce": {"predictive_temperature": 1.5},
                                  "mtbkd_sgld": {"predictive_temperature": t}}  # fmt: skip
    s = report.summarise_seeds(reps, [0, 1])
    assert s["predictive_temperature"]["mtbkd_sgld"]["values"] == [0.6, 0.8]
    text = report.format_seed_summary(s)
    assert "T (mean over 2 seeds) = ce 1.50, mtbkd_sgld 0.70" in text
    # a calibrated seed and a plain one are never averaged together
    del reps[1]["hyperparameters"]
    with pytest.raises(ValueError, match=r"seeds \[0\] were calibrated .* seeds \[1\] were not"):
        report.summarise_seeds(reps, [0, 1])


def _fold_result(seed: int, n: int, labels_shift: int = 0) -> distill.ExperimentResult:
    """A toy run of two methods on ``n`` test rows of its own (a cross-fitting fold)."""
    g = torch.Generator().manual_seed(seed)
    labels = (torch.arange(n) + labels_shift) % 3
    onehot = torch.nn.functional.one_hot(labels, 3)
    methods = []
    for name, s in (("ce", 1), ("mtbkd_sgld", 4)):
        probs = torch.softmax(2.0 * torch.randn(s, n, 3, generator=g) + 1.5 * onehot, -1)
        methods.append(distill.MethodResult(name, distill.evaluate_probs(probs, labels),
                                            2.0 + seed, {}, probs, 0.1, s > 1))  # fmt: skip
    res = _result()
    return dataclasses.replace(res, methods=methods, labels=labels, attribution=None,
                               test_digest=f"rows-{seed}")  # fmt: skip


def test_pool_folds_recomputes_every_metric_over_the_pooled_rows(tmp_path):
    folds = [_fold_result(0, 30), _fold_result(1, 25, 1), _fold_result(2, 17, 2)]
    dirs = []
    for k, res in enumerate(folds):
        report.write_report(res, tmp_path / f"fold{k}", figures=False)
        dirs.append(tmp_path / f"fold{k}")
    rep, per_row = report.pool_folds(dirs)
    assert rep["folds"] == 3 and rep["rows"] == 72 and rep["dataset"] == "toy"
    labels = torch.cat([r.labels for r in folds])
    assert torch.equal(per_row["labels"], labels)
    for k, name in enumerate(("ce", "mtbkd_sgld")):
        # what a single run over all 72 rows would report (the predictive of each row is its
        # fold's; a method's sample counts are equal across folds here)
        whole = distill.evaluate_probs(torch.cat([r.methods[k].probs for r in folds], 1), labels)
        got = rep["methods"][k]
        assert got["name"] == name
        assert 0 < whole["accuracy"] < 1  # the AUROC is defined
        for key, value in whole.items():
            assert got[key] == pytest.approx(value, abs=1e-6), key
        assert got["seconds"] == pytest.approx(2.0 + 3.0 + 4.0)
        # the per-row data gives the same ECE through the bootstrap's binning
        whole_rows = report._resampled(per_row[name], torch.arange(72)[None])
        assert float(whole_rows["ece"][0]) == pytest.approx(got["ece"], abs=1e-6)
    # three folds of the same seeds' runs -> summarise_seeds with the seeds x rows bootstrap
    s = report.summarise_seeds([rep, rep], [0, 1], per_row=[per_row, per_row], resamples=20)
    assert s["shared_test_rows"] is True and s["versus"]["resamples"] == 20


def test_pool_folds_refusals(tmp_path):
    a, b = _fold_result(0, 20), _fold_result(1, 20)
    report.write_report(a, tmp_path / "a", figures=False)
    report.write_report(b, tmp_path / "b", figures=False)
    with pytest.raises(ValueError, match="two runs or more"):
        report.pool_folds([tmp_path / "a"])
    with pytest.raises(ValueError, match="no report.json"):
        report.pool_folds([tmp_path / "a", tmp_path / "nothing"])
    # the same fold twice
    with pytest.raises(ValueError, match="the same rows"):
        report.pool_folds([tmp_path / "a", tmp_path / "a"])
    # other methods
    c = dataclasses.replace(_fold_result(2, 20), test_digest="rows-c")
    c.methods = c.methods[:1]
    report.write_report(c, tmp_path / "c", figures=False)
    with pytest.raises(ValueError, match="other methods"):
        report.pool_folds([tmp_path / "a", tmp_path / "c"])
    # other dataset names need a name for the pooled report
    d = dataclasses.replace(_fold_result(3, 20), dataset="other", test_digest="rows-d")
    report.write_report(d, tmp_path / "d", figures=False)
    with pytest.raises(ValueError, match="pass dataset="):
        report.pool_folds([tmp_path / "a", tmp_path / "d"])
    assert report.pool_folds([tmp_path / "a", tmp_path / "d"], dataset="x")[0]["dataset"] == "x"
    # a per-row file of an older mtbkd (no predictive per row)
    from safetensors.torch import load_file, save_file

    old = tmp_path / "b" / report.PER_ROW_FILE
    save_file({k: v for k, v in load_file(str(old)).items() if not k.endswith(".pbar")}, str(old))
    with pytest.raises(ValueError, match="older mtbkd; rerun that fold"):
        report.pool_folds([tmp_path / "a", tmp_path / "b"])
    # ... which load_per_row still reads
    assert set(report.load_per_row(old)) >= {"labels", "ce", "mtbkd_sgld"}


def _spy_resampled(monkeypatch) -> list[int]:
    """Record the number of index entries of every call of report._resampled."""
    sizes: list[int] = []
    inner = report._resampled

    def spy(per_row, idx):
        sizes.append(idx.numel())
        return inner(per_row, idx)

    monkeypatch.setattr(report, "_resampled", spy)
    return sizes


def test_paired_bootstrap_resamples_in_chunks_with_the_same_numbers(monkeypatch):
    # found by an audit: the bootstrap built [resamples, N] index and value tensors (~23 KB per
    # test row at 1000 resamples: 1.8 GiB at N = 80,000); it now resamples a few at a time,
    # drawing the same indices from the same generator, so the numbers are bit-identical
    res = _result()
    n, resamples = len(res.labels), 103
    whole = report.paired_bootstrap(res, resamples=resamples, seed=4)
    # the unchunked computation, spelled out: one [resamples, N] draw of the seed's generator
    idx = torch.randint(0, n, (resamples, n), generator=torch.Generator().manual_seed(4))
    ref = report._resampled(report._per_row(res.method("mtbkd_sgld").probs, res.labels), idx)
    for name, row in whole["methods"].items():
        other = report._resampled(report._per_row(res.method(name).probs, res.labels), idx)
        for key in report.BOOTSTRAP_METRICS:
            d = ref[key] - other[key]
            lo, hi = torch.quantile(d, torch.tensor([0.025, 0.975], dtype=d.dtype)).tolist()
            better = (d > 0) if key == "accuracy" else (d < 0)
            assert (row[key]["low"], row[key]["high"]) == (lo, hi), (name, key)
            assert row[key]["p_better"] == float(better.double().mean())
    for per_chunk in (1, 7, 64):
        monkeypatch.setattr(report, "_BOOTSTRAP_CHUNK", per_chunk * n, raising=False)
        sizes = _spy_resampled(monkeypatch)
        assert report.paired_bootstrap(res, resamples=resamples, seed=4) == whole
        assert max(sizes) == per_chunk * n, per_chunk  # never more than a chunk at once
        monkeypatch.undo()


def test_seed_bootstrap_resamples_in_chunks_with_the_same_numbers(monkeypatch):
    reps = [_seed_report({"ce": (0.5, 1.0, 0.05), "mtbkd_sgld": (0.5, 0.9, 0.05)})] * 3
    g = torch.Generator().manual_seed(0)

    def rows(labels):
        t = len(labels)
        out = {"labels": torch.tensor(labels)}
        for name in ("ce", "mtbkd_sgld"):
            nll = torch.rand(t, generator=g, dtype=torch.float64)
            right = (torch.rand(t, generator=g) < 0.7).double()
            conf = 0.5 + 0.5 * torch.rand(t, generator=g, dtype=torch.float64)
            out[name] = report._with_bins(nll, right, conf)
        return out

    shared = [rows([0, 1] * 15)] * 3
    own = [rows([0, 1] * 15), rows([1, 0] * 15), rows([0, 0, 1] * 10)]
    for per_row in (shared, own):
        whole = report.summarise_seeds(reps, [0, 1, 2], per_row=per_row, resamples=90)
        for per_chunk in (1, 8):
            monkeypatch.setattr(report, "_BOOTSTRAP_CHUNK", per_chunk * 30, raising=False)
            sizes = _spy_resampled(monkeypatch)
            s = report.summarise_seeds(reps, [0, 1, 2], per_row=per_row, resamples=90)
            assert s == whole
            assert max(sizes) == per_chunk * 30
            monkeypatch.undo()


def test_bootstrap_ece_agrees_with_metrics_ece_on_a_million_rows():
    # found by an audit: metrics.ece summed its bins in float32 (ECE 8e-3 instead of ~1e-8 here)
    # while the bootstrap summed in float64: the table's ECE and the bootstrap's disagreed
    from mtbkd import metrics as M

    n = 1_000_000
    conf = torch.full((n,), 0.95)
    probs = torch.stack([conf, 1 - conf], 1)
    labels = torch.zeros(n, dtype=torch.long)
    labels[: n // 20] = 1  # exactly 95 % right
    whole = report._resampled(report._per_row(probs, labels), torch.arange(n)[None])
    assert float(whole["ece"][0]) == pytest.approx(0.95 - float(conf[0]), abs=1e-9)
    assert float(whole["ece"][0]) == pytest.approx(M.ece(probs, labels).item(), abs=1e-9)


# ---------------------------------------------------------------------------------------------
# Session 32: an audit of the reports and summaries (each test failed on the code before)
# ---------------------------------------------------------------------------------------------


def _weighting_report(best: str, accuracy: dict[str, float], top: float, se: float) -> dict:
    """A report written before ``margin_se_by_teacher`` existed (results/digits-5seeds)."""
    return {
        "dataset": "toy",
        "methods": [{"name": "mtbkd_sgld", "accuracy": 0.9, "nll": 0.3, "ece": 0.02}],
        "train_weighting": {
            "rows": 200,
            "disagree_rows": 50,
            "teacher_accuracy": accuracy,
            "highest_weight_accuracy": top,
            "mean_weights": {n: 1 / len(accuracy) for n in accuracy},
            "best_teacher": best,
            "margin": top - accuracy[best],
            "margin_se": se,
        },
    }


def test_a_weighting_margin_without_a_standard_error_is_undecided_not_a_tie(tmp_path):
    # every seed's margin +0.2 or more at s.e. ~0.07, but the seeds' best teachers differ: no
    # standard error against the pooled best, which the summary called a tie ("carries no
    # information a single-teacher BKD lacks"), the reverse of each seed's own verdict
    reports = [
        _weighting_report("b", {"a": 0.60, "b": 0.66}, 0.91, 0.065),
        _weighting_report("a", {"a": 0.69, "b": 0.54}, 0.92, 0.057),
        _weighting_report("a", {"a": 0.71, "b": 0.52}, 0.88, 0.075),
    ]
    summary = report.summarise_seeds(reports, [0, 1, 2])
    assert summary["train_weighting"]["margin_se"] is None
    report.write_seed_summary(summary, tmp_path, figures=False)
    text = (tmp_path / "summary.md").read_text()
    assert "carries no information" not in text and "no more often than" not in text
    assert "+0.237 over the best single teacher (`a`, mean over seeds) with no standard" in text
    assert "is undecided here" in text


def test_no_t_interval_is_promised_without_scipy(monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "scipy", None)
    monkeypatch.setitem(sys.modules, "scipy.stats", None)

    def methods(a, b):
        return [
            {"name": "ce", "accuracy": a, "nll": 0.5, "ece": 0.05},
            {"name": "mtbkd_sgld", "accuracy": b, "nll": 0.4, "ece": 0.03},
        ]

    reports = [{"dataset": "toy", "methods": methods(0.8 + s / 100, 0.85 + s / 90)}
               for s in range(3)]  # fmt: skip
    summary = report.summarise_seeds(reports, [0, 1, 2])
    assert summary["versus"]["methods"]["ce"]["accuracy"]["low"] is None
    text = report.format_seed_summary(summary)
    report.write_seed_summary(summary, tmp_path, figures=False)
    md = (tmp_path / "summary.md").read_text()
    assert "t-interval" not in text and "Interval: 95 % Student-t" not in md
    assert "no interval: scipy" in text and "No interval: scipy" in md


@pytest.mark.parametrize("resamples", [0, -5, True, 2.0])
def test_bootstrap_resamples_must_be_a_positive_int(resamples):
    with pytest.raises(ValueError, match="resamples must be a positive integer"):
        report.paired_bootstrap(_result(), resamples=resamples)
    reports = [{"dataset": "toy", "methods": [{"name": "ce", "accuracy": 0.8, "nll": 0.5,
                                               "ece": 0.05}]}] * 2  # fmt: skip
    with pytest.raises(ValueError, match="resamples must be a positive integer"):
        report.summarise_seeds(reports, [0, 1], resamples=resamples)


def test_a_damaged_config_seed_is_named_not_a_traceback(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "report.json").write_text(
        json.dumps({"config": {"seed": None}, "dataset": "toy", "methods": []})
    )
    with pytest.raises(ValueError, match="records no seed .* got None"):
        report.gather_seed_runs([folder])


def test_a_mean_over_fewer_seeds_than_the_table_says_is_marked():
    # seed 0 written before validation_nll existed: seed 1's value alone looked like a mean
    reports = [
        {"dataset": "toy", "methods": [{"name": "ce", "accuracy": 0.8, "nll": 0.5, "ece": 0.05}]},
        {"dataset": "toy", "methods": [{"name": "ce", "accuracy": 0.8, "nll": 0.6, "ece": 0.05}],
         "validation_nll": {"ce": 0.7}},
    ]  # fmt: skip
    text = report.format_seed_summary(report.summarise_seeds(reports, [0, 1]))
    row = next(line for line in text.splitlines() if line.startswith("ce"))
    assert "0.700 (1/2 seeds)" in row


def test_a_summary_without_its_seed_folders_is_named_as_such(tmp_path):
    # an older examples/compare_runs.py output (no compared_from): "seed 0 is not finished"
    (tmp_path / "summary.json").write_text(json.dumps({"seeds": [0, 1], "dataset": "toy"}))
    with pytest.raises(ValueError, match="has a summary.json but no folder seed0"):
        report.gather_seed_runs([tmp_path])


def test_summarise_without_matplotlib_is_refused_before_writing(tmp_path, monkeypatch):
    import sys

    from mtbkd import cli

    runs = []
    for seed in (0, 1):
        folder = tmp_path / f"r{seed}"
        folder.mkdir()
        methods = [{"name": "ce", "accuracy": 0.8, "nll": 0.5 + seed / 10, "ece": 0.05}]
        (folder / "report.json").write_text(
            json.dumps({"dataset": "toy", "config": {"seed": seed}, "methods": methods})
        )
        runs.append(str(folder))
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match="matplotlib.*--no-figures"):
        cli.main(["summarise", *runs, "--out", str(out)])
    assert not out.exists()
    cli.main(["summarise", *runs, "--out", str(out), "--no-figures"])
    assert (out / "summary.md").is_file()


def test_a_run_named_twice_is_said_so(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "report.json").write_text(
        json.dumps({"config": {"seed": 0}, "dataset": "toy", "methods": []})
    )
    # it said "seed 0 is in both run and run"
    with pytest.raises(ValueError, match="is named twice"):
        report.gather_seed_runs([folder, tmp_path / "run" / "."])


def test_the_teacher_figure_of_many_classes_stays_a_sane_size(tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image

    result = _result()
    k, c = 2, 300
    attribution = {
        "method": "mtbkd_sgld", "teachers": ["a", "b"], "classes": [f"c{i}" for i in range(c)],
        "mean_weights": [[0.5] * k] * c, "mean_responsibilities": [[0.5] * k] * c,
    }  # fmt: skip
    result = dataclasses.replace(result, attribution=attribution)
    files = report._figures(result, tmp_path)
    assert "teachers.png" in files
    with Image.open(tmp_path / "teachers.png") as image:
        assert image.width <= 40 * 110 + 10  # 40 inches at 110 dpi (it grew with the classes)


def test_pool_folds_refuses_overlapping_folds_and_other_settings(tmp_path):
    # session 32: fold 0 of 3 drawn with fold_seed 0 and fold 0 of 3 with fold_seed 1 share a
    # third of their rows (their digests differ), and folds of other settings were pooled too
    def cfg(**kw):
        return distill.DistillConfig(progress=False, **kw)

    runs = {
        "a": dataclasses.replace(_fold_result(0, 20), config=cfg(test_folds=3, test_fold=0)),
        "b": dataclasses.replace(_fold_result(1, 20, 1),
                                 config=cfg(test_folds=3, test_fold=0, fold_seed=1)),
        "c": dataclasses.replace(_fold_result(2, 20, 2),
                                 config=cfg(test_folds=3, test_fold=1, map_epochs=7)),
        "d": dataclasses.replace(_fold_result(3, 20, 1), config=cfg(test_folds=3, test_fold=0)),
        "e": dataclasses.replace(_fold_result(4, 20, 2), config=cfg(test_folds=3, test_fold=1)),
    }  # fmt: skip
    for name, res in runs.items():
        report.write_report(res, tmp_path / name, figures=False)
    with pytest.raises(ValueError, match="other settings \\(fold_seed\\)"):
        report.pool_folds([tmp_path / "a", tmp_path / "b"])
    with pytest.raises(ValueError, match="other settings \\(map_epochs\\)"):
        report.pool_folds([tmp_path / "a", tmp_path / "c"])
    with pytest.raises(ValueError, match="test_fold 0 is pooled twice"):
        report.pool_folds([tmp_path / "a", tmp_path / "d"])
    rep, _ = report.pool_folds([tmp_path / "a", tmp_path / "e"])
    assert rep["rows"] == 40


def test_weighting_diagnostic_refuses_nan_logits():
    # argmax puts NaN on top: a NaN row counted as one where the teachers agree
    y = torch.tensor([0, 1, 2, 0])
    t = torch.tensor([[[9.0, 0, 0], [0, 9, 0], [0, 0, 9], [9, 0, 0]],
                      [[9.0, 0, 0], [0, 9, 0], [0, 0, 9], [0, 9, 0]]])  # fmt: skip
    t[:, 0, 0] = float("nan")
    for rows in (4, 3):
        with pytest.raises(ValueError, match="NaN"):
            distill.weighting_diagnostic(t[:, :rows], y[:rows], ["a", "b"])


def test_classes_without_test_rows_are_named_in_the_followed_sentences():
    # they were named neither as followed nor as undecided
    att = {"teachers": ["a", "b"], "classes": ["0", "1", "2"], "followed": {"0": "a"},
           "undecided": ["1"]}  # fmt: skip
    text = " ".join(report.followed_sentences(att))
    assert "Classes 2 have no test rows" in text
    att["followed"]["2"] = "b"
    assert "no test rows" not in " ".join(report.followed_sentences(att))
