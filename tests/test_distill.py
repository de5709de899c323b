"""The MT-BKD pipeline (mtbkd.distill) on tiny synthetic problems."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from mtbkd import distill
from mtbkd import metrics as M
from mtbkd.data import Dataset

MEANS = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]]) * 1.2


def halves_problem(n_per_class: int, seed: int):
    """Four overlapping Gaussian classes in 2-D and two teachers, each the Bayes posterior on one
    half of the classes (0-1 or 2-3) and confident noise on the other half."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(4).repeat_interleave(n_per_class)
    x = MEANS[y] + torch.randn(len(y), 2, generator=g)
    logp = -0.5 * ((x[:, None, :] - MEANS[None]) ** 2).sum(-1)
    logp = logp - logp.logsumexp(-1, keepdim=True)
    noise = 3.0 * torch.randn(2, len(y), 4, generator=g)
    first = torch.where((y < 2)[:, None], logp, noise[0])
    second = torch.where((y >= 2)[:, None], logp, noise[1])
    return x, y, torch.stack([first, second])


CONFIG = distill.DistillConfig(
    hidden=(32,),
    batch_size=16,
    map_epochs=60,
    map_lr=1e-2,
    weight_decay=0.0,
    sgld_epochs=10,
    num_samples=20,
    concentration=20.0,
    prior_weight=0.5,
    progress=False,
)


def _student(seed=0):
    torch.manual_seed(seed)
    return distill.StudentMLP(2, 4, (32,))


def test_mtbkd_beats_cross_entropy_on_disjoint_expert_teachers():
    x, y, t = halves_problem(12, seed=0)
    x_test, y_test, t_test = halves_problem(300, seed=1)
    ce = distill.distill(_student(), t, x, y, CONFIG, method="ce")
    mt = distill.distill(_student(), t, x, y, CONFIG, method="mtbkd_sgld")
    nll_ce, nll_mt = ce.evaluate(x_test, y_test)["nll"], mt.evaluate(x_test, y_test)["nll"]
    assert nll_mt < 0.8 * nll_ce, (nll_mt, nll_ce)
    assert len(mt.store) == CONFIG.num_samples
    # the student follows the right teacher: the first one on classes 0-1, the second on 2-3
    w, r = distill.teacher_attribution(mt.predict(x_test), t_test, mt.objective)
    assert torch.allclose(w.sum(0), torch.ones(len(y_test)), atol=1e-5)
    assert torch.allclose(r.sum(0), torch.ones(len(y_test)), atol=1e-5)
    assert r[0, y_test < 2].mean() > 0.7 and r[1, y_test >= 2].mean() > 0.7


def test_sgld_resume_after_interruption_gives_the_same_samples(tmp_path):
    x, y, t = halves_problem(8, seed=2)
    cfg = replace(CONFIG, map_epochs=4, sgld_epochs=7, num_samples=10, checkpoint_every=2)
    obj = distill.Objective("mtbkd", (0, 1), concentration=20.0, prior_weight=0.5)
    data = distill.TrainData(x, y, t)

    ran: list[int] = []

    def run(ckpt, stop_at=None, seed=0):
        model = _student(seed)
        distill.train_map(model, data, obj, cfg, checkpoint_dir=ckpt)
        ran.clear()
        torch.manual_seed(1000 + seed)  # the global RNG as a caller might leave it

        def interrupt(epoch):
            ran.append(epoch)
            if epoch == stop_at:
                raise KeyboardInterrupt

        store, _ = distill.train_sgld(
            model, data, obj, cfg, checkpoint_dir=ckpt, callback=interrupt
        )
        return model, store

    _, reference = run(None)
    everything = list(ran)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "ck", stop_at=everything[4])  # the last checkpoint is after 4 epochs
    # (another initialisation and global RNG state: all of it must come from the checkpoints;
    # a rerun from scratch gave the same samples, so the samples alone proved nothing)
    model, resumed = run(tmp_path / "ck", seed=5)
    assert ran == everything[4:]  # only the epochs after the checkpoint ran
    assert len(resumed) == len(reference) == 10
    assert torch.equal(resumed.samples(), reference.samples())
    # a finished run is loaded, not retrained: same samples again, no epoch run
    _, again = run(tmp_path / "ck", seed=6)
    assert ran == [] and torch.equal(again.samples(), reference.samples())
    # an interruption between writing a checkpoint's samples and the checkpoint itself: the
    # checkpoint on disk keeps its own samples file, and the resumed run is the same
    real = distill._save_atomic
    calls = {"sgld": 0}

    def flaky(obj, path):
        if path.name == "sgld.pt":
            calls["sgld"] += 1
            if calls["sgld"] == 2:  # the second SGLD checkpoint's samples are already written
                raise KeyboardInterrupt
        real(obj, path)

    distill._save_atomic = flaky
    try:
        with pytest.raises(KeyboardInterrupt):
            run(tmp_path / "ck2")
    finally:
        distill._save_atomic = real
    _, resumed = run(tmp_path / "ck2")
    assert torch.equal(resumed.samples(), reference.samples())
    assert len(list((tmp_path / "ck2").rglob("sgld_samples.*.safetensors"))) <= 2


def test_map_resume_matches_uninterrupted(tmp_path):
    x, y, t = halves_problem(8, seed=3)
    cfg = replace(CONFIG, map_epochs=6, checkpoint_every=3)
    obj = distill.Objective("kd", (0, 1), "uniform")
    data = distill.TrainData(x, y, t)
    ref = _student()
    distill.train_map(ref, data, obj, cfg)

    def stop(epoch):
        if epoch == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        distill.train_map(_student(), data, obj, cfg, checkpoint_dir=tmp_path, callback=stop)
    model = _student(seed=5)  # different init: everything must come from the checkpoint
    distill.train_map(model, data, obj, cfg, checkpoint_dir=tmp_path)
    for a, b in zip(ref.state_dict().values(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_bad_inputs_get_clear_errors():
    x, y, t = halves_problem(4, seed=4)
    with pytest.raises(ValueError, match="N = 16 rows"):
        distill.distill(_student(), t[:, :-1], x, y, CONFIG, method="avg_kd")
    with pytest.raises(ValueError, match="teachers have 5 classes but the student outputs 4"):
        distill.distill(_student(), torch.randn(2, 16, 5), x, y, CONFIG, method="avg_kd")
    bad = x.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite features"):
        distill.distill(_student(), t, bad, y, CONFIG, method="ce")
    t_nan = t.clone()
    t_nan[0, 2, 1] = float("inf")
    with pytest.raises(ValueError, match="teacher logits have NaN"):
        distill.distill(_student(), t_nan, x, y, CONFIG, method="mtbkd_map")
    with pytest.raises(ValueError, match="unknown method"):
        distill.distill(_student(), t, x, y, CONFIG, method="mtbkd_vi")
    with pytest.raises(ValueError, match="teacher index out of range"):
        distill.distill(_student(), t, x, y, CONFIG, method="bkd_2")
    # a teacher's name is the command line's: here an index (before: int()'s bare error)
    with pytest.raises(ValueError, match="'bkd_t0' names no teacher: .* 'bkd_0' .. 'bkd_1'"):
        distill.distill(_student(), t, x, y, CONFIG, method="bkd_t0")
    # probabilities given as logits: refused as the dataset loaders refuse them (before: a
    # softmax of probabilities, a flattened teacher, without a word)
    with pytest.raises(ValueError, match=r"teachers\[0\] looks like probabilities"):
        distill.distill(_student(), t.softmax(-1), x, y, CONFIG, method="mtbkd_map")
    # features of another width than the student's first layer: named (before: torch's
    # "mat1 and mat2 shapes cannot be multiplied" from inside the model)
    with pytest.raises(ValueError, match="x has 5 features; the student takes 2"):
        distill.distill(_student(), t, torch.randn(16, 5), y, CONFIG, method="ce")
    plain = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 4))
    res = distill.distill(plain, t, x, y, replace(CONFIG, map_epochs=1), method="ce")
    with pytest.raises(ValueError, match="x has 3 features; the student takes 2"):
        res.predict(torch.randn(2, 3))
    with pytest.raises(ValueError, match="unknown methods"):
        distill.DistillConfig(methods=("ce", "svm"))
    with pytest.raises(ValueError, match="methods lists 'ce' more than once"):
        distill.DistillConfig(methods=("ce", "avg_kd", "ce"))
    with pytest.raises(ValueError, match="burn_in"):
        distill.DistillConfig(burn_in=1.5)
    # grids tune only the objective's own hyperparameters, with non-empty lists of numbers
    with pytest.raises(ValueError, match="mtbkd_grid may tune"):
        distill.DistillConfig(mtbkd_grid={"hard_label_weight": (0.5, 1.0)})
    with pytest.raises(ValueError, match="kd_grid may tune"):
        distill.DistillConfig(kd_grid={"temperature": (1.0,)})
    with pytest.raises(ValueError, match="non-empty list of numbers"):
        distill.DistillConfig(mtbkd_grid={"temperature": 2.0})
    with pytest.raises(ValueError, match="non-empty list of numbers"):
        distill.DistillConfig(mtbkd_grid={"temperature": ()})
    with pytest.raises(ValueError, match="must be positive"):
        distill.DistillConfig(mtbkd_grid={"concentration": (-5.0,)})
    with pytest.raises(ValueError, match="hidden must list positive integer"):
        distill.DistillConfig(hidden=(True,))
    with pytest.raises(ValueError, match="hidden must list positive integer"):
        distill.DistillConfig(hidden=(32.7,))
    # a BKD of a teacher that does not exist is an error, and bkd expands without duplicates
    cfg = replace(CONFIG, methods=("ce", "bkd_low"))
    with pytest.raises(ValueError, match=r"\['bkd_low'\] name no teacher"):
        distill.method_names(cfg, ["lo", "hi"])
    cfg = replace(CONFIG, methods=("bkd_lo", "bkd", "ce"))
    assert distill.method_names(cfg, ["lo", "hi"]) == ["bkd_lo", "bkd_hi", "ce"]


def test_teacher_modules_are_evaluated_once_and_cached():
    x, y, t = halves_problem(6, seed=5)
    calls = []

    class Teacher(torch.nn.Module):
        def __init__(self, logits):
            super().__init__()
            self.logits = logits

        def forward(self, inp):
            calls.append(len(inp))
            return self.logits

    teachers = {"a": Teacher(t[0]), "b": Teacher(t[1])}
    res = distill.distill(
        _student(), teachers, x, y, replace(CONFIG, map_epochs=3), method="mtbkd_map"
    )
    assert calls == [len(x), len(x)]
    assert res.store is None and res.predict(x).shape == (1, len(x), 4)


def _tiny_dataset(seed=0) -> Dataset:
    x, y, t = halves_problem(20, seed)
    xt, yt, tt = halves_problem(20, seed + 10)
    return Dataset(
        "halves",
        x.numpy(),
        y.numpy(),
        xt.numpy(),
        yt.numpy(),
        list("abcd"),
        {"lo": t[0].numpy(), "hi": t[1].numpy()},
        {"lo": tt[0].numpy(), "hi": tt[1].numpy()},
    )


TINY = replace(
    CONFIG,
    map_epochs=8,
    sgld_epochs=4,
    num_samples=8,
    mtbkd_grid={"prior_weight": (0.1, 0.5)},
    kd_grid={"kd_weight": (0.5,)},
    sgld_grid=(1e-3,),
    tune_bkd=False,
)


def test_run_experiment_every_method_and_save_predict(tmp_path):
    ds = _tiny_dataset()
    res = distill.run_experiment(ds, TINY, checkpoint_dir=tmp_path / "ck", log=lambda m: None)
    names = [m.name for m in res.methods]
    assert names == ["ce", "avg_kd", "entropy_kd", "bkd_lo", "bkd_hi", "mtbkd_map", "mtbkd_sgld"]
    assert res.teacher_pred.shape == (2, len(ds.y_test))  # for the disagreement table
    for m in res.methods:
        assert set(m.row()) == {
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
        }
        assert m.probs.shape[1:] == (len(ds.y_test), 4)
    assert res.method("mtbkd_sgld").probs.shape[0] == TINY.num_samples
    assert res.method("mtbkd_map").probs.shape[0] == 1
    att = res.attribution
    assert att["teachers"] == ["lo", "hi"] and set(att["followed"]) <= set("abcd")
    assert att["responsibilities"].shape == (2, len(ds.y_test))

    distill.save_run(res, tmp_path / "run", ds)
    np.save(tmp_path / "x.npy", ds.x_test)
    metrics = distill.predict_file(tmp_path / "run", tmp_path / "x.npy", tmp_path / "p.csv")
    assert metrics == {}
    lines = (tmp_path / "p.csv").read_text().splitlines()
    assert lines[0] == "pred,confidence,mean_deviance,mutual_information,credible_set,pred_class"
    assert all(r.split(",")[5] == "abcd"[int(r.split(",")[0])] for r in lines[1:])
    saved = (tmp_path / "run" / "predictions.csv").read_text().splitlines()
    # the saved samples reproduce the run's own test predictions
    assert [r.split(",")[:5] for r in lines[1:]] == [r.split(",")[:5] for r in saved[1:]]
    assert saved[0].endswith("responsibility_lo,responsibility_hi")
    # labelled inputs in blocks of 7 rows: the same CSV and the same metrics as in one block,
    # and the metrics the run reported on its test set
    csv_in = tmp_path / "x.csv"
    names = [f"f{j}" for j in range(ds.x_test.shape[1])]
    csv_in.write_text(
        ",".join(names + ["label"]) + "\n"
        + "".join(",".join([*(repr(float(v)) for v in r), str(int(c))]) + "\n"
                  for r, c in zip(ds.x_test, ds.y_test, strict=True))
    )  # fmt: skip
    one = distill.predict_file(tmp_path / "run", csv_in, tmp_path / "one.csv", block_rows=10**6)
    blocks = distill.predict_file(tmp_path / "run", csv_in, tmp_path / "b.csv", block_rows=7)
    a, b = (
        [r.split(",") for r in (tmp_path / f).read_text().splitlines()]
        for f in ("one.csv", "b.csv")
    )
    assert a[0] == b[0] and len(a) == len(b) == len(ds.y_test) + 1
    for ra, rb in zip(a[1:], b[1:], strict=True):  # equal up to float rounding of the matmuls
        assert ra[0] == rb[0] and ra[4:] == rb[4:]
        assert [float(v) for v in ra[1:4]] == pytest.approx([float(v) for v in rb[1:4]], abs=1e-5)
    assert blocks == pytest.approx(one)
    run_metrics = res.method("mtbkd_sgld").metrics
    assert one == pytest.approx({k: run_metrics[k] for k in one}, nan_ok=True)
    with pytest.raises(ValueError, match="block_rows"):
        distill.predict_file(tmp_path / "run", csv_in, tmp_path / "z.csv", block_rows=0)


def test_hyperparameters_never_see_the_test_labels():
    ds = _tiny_dataset(seed=1)
    shuffled = replace(ds, y_test=np.random.default_rng(0).permutation(ds.y_test))
    cfg = replace(TINY, methods=("entropy_kd", "mtbkd_sgld"), kd_grid={"kd_weight": (0.5, 2.0)})
    a = distill.run_experiment(ds, cfg, log=lambda m: None)
    b = distill.run_experiment(shuffled, cfg, log=lambda m: None)
    for ma, mb in zip(a.methods, b.methods, strict=True):
        assert ma.hparams == mb.hparams and ma.val_nll == mb.val_nll


def test_pipeline_trains_teachers_for_datasets_without():
    x, y, _ = halves_problem(15, seed=6)
    xt, yt, _ = halves_problem(10, seed=7)
    ds = Dataset("plain", x.numpy(), y.numpy(), xt.numpy(), yt.numpy(), list("abcd"))
    cfg = replace(TINY, methods=("mtbkd_map",), num_teachers=2, teacher_epochs=20)
    res = distill.run_experiment(ds, cfg, log=lambda m: None)
    assert res.teacher_names == ["t01", "t23"]
    assert [t["name"] for t in res.teachers] == ["t01", "t23"]


def test_sgld_schedule_spreads_samples():
    cfg = replace(CONFIG, sgld_epochs=10, batch_size=10, num_samples=20, burn_in=0.1)
    burn, thin, kept = distill.sgld_schedule(100, cfg)  # 100 steps
    assert (burn, kept) == (10, 20) and thin == 4
    # 105 rows in batches of 10: 11 steps an epoch (the last batch of 5 is a step too), 110 in all
    burn, thin, kept = distill.sgld_schedule(105, cfg)
    assert (burn, thin, kept) == (11, (110 - 11) // 20, 20)
    # fewer steps after the burn-in than samples: said, not silently fewer samples
    with pytest.warns(UserWarning, match="num_samples=20, but SGLD runs only 18 steps"):
        distill.sgld_schedule(20, cfg)


def _val_nll(model, x, y):
    return float(distill.evaluate_probs(distill.predict_probs(model, x), y)["nll"])


def test_early_stopping_keeps_the_best_validation_epoch_and_stops_after_patience():
    x, y, t = halves_problem(10, seed=11)
    xv, yv, _ = halves_problem(10, seed=12)
    # a large learning rate without weight decay over-fits 40 rows: validation NLL turns up
    cfg = replace(CONFIG, map_epochs=80, map_lr=3e-2, patience=5)
    data = distill.TrainData(x, y, t)
    obj = distill.Objective("ce")
    seen = []
    model = _student()
    distill.train_map(
        model,
        data,
        obj,
        cfg,
        validation=(xv, yv),
        callback=lambda e: seen.append(_val_nll(model, xv, yv)),
    )
    best = int(np.argmin(seen))
    assert len(seen) == best + 1 + cfg.patience < cfg.map_epochs  # stopped early
    assert _val_nll(model, xv, yv) == pytest.approx(seen[best], abs=1e-6)
    # without a validation split (or with early_stopping off) every epoch runs
    seen.clear()
    distill.train_map(_student(), data, obj, replace(cfg, early_stopping=False),
                      validation=(xv, yv), callback=lambda e: seen.append(e))  # fmt: skip
    assert len(seen) == cfg.map_epochs
    with pytest.raises(ValueError, match="validation must be"):
        distill.train_map(_student(), data, obj, cfg, validation=(xv[:, :1], yv))


def test_early_stopping_resumes_to_the_same_weights(tmp_path):
    x, y, t = halves_problem(10, seed=13)
    xv, yv, _ = halves_problem(10, seed=14)
    cfg = replace(CONFIG, map_epochs=40, map_lr=3e-2, patience=6, checkpoint_every=4)
    data = distill.TrainData(x, y, t)
    obj = distill.Objective("mtbkd", (0, 1), concentration=20.0, prior_weight=0.5)
    ref = _student()
    distill.train_map(ref, data, obj, cfg, validation=(xv, yv))

    def stop(epoch):
        if epoch == 8:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        distill.train_map(
            _student(), data, obj, cfg, checkpoint_dir=tmp_path, callback=stop, validation=(xv, yv)
        )
    for again in range(2):  # resumed, then loaded from the finished (stopped) checkpoint
        model, ran = _student(seed=5), []
        distill.train_map(model, data, obj, cfg, checkpoint_dir=tmp_path, validation=(xv, yv),
                          callback=ran.append)  # fmt: skip
        for a, b in zip(ref.state_dict().values(), model.state_dict().values(), strict=True):
            assert torch.equal(a, b)
        # the run stops early, at epoch 9 (no multiple of checkpoint_every), and checkpoints
        # that it stopped: loading that checkpoint trains no further epoch
        assert ran == ([] if again else [9])


def test_sgld_prior_precision_defaults_to_num_data_times_weight_decay():
    # DistillConfig: sgld_prior_precision None is num_data * weight_decay (Adam's L2 on the mean
    # loss is that prior on the summed loss): the same samples as asking for it explicitly
    x, y, t = halves_problem(6, seed=16)
    cfg = replace(CONFIG, weight_decay=0.05, sgld_epochs=2, num_samples=3)
    data = distill.TrainData(x, y, t)
    obj = distill.Objective("mtbkd", (0, 1), concentration=20.0, prior_weight=0.5)
    default, _ = distill.train_sgld(_student(), data, obj, cfg)
    explicit, _ = distill.train_sgld(_student(), data, obj, cfg, prior_precision=24 * 0.05)
    assert len(default) == 3 and torch.equal(default.samples(), explicit.samples())
    other, _ = distill.train_sgld(_student(), data, obj, cfg, prior_precision=0.05)
    assert not torch.equal(default.samples(), other.samples())


def test_teacher_attribution_by_hand():
    # MATH.md sections 1-2: entropy weights w_k of the teachers and responsibilities
    # r_k = softmax_k(log w_k + C_k - L_k), averaged over the posterior samples
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(2, 3, 4, generator=g, dtype=torch.float64), -1)
    t = torch.randn(2, 3, 4, generator=g, dtype=torch.float64) * 2
    obj = distill.Objective("mtbkd", (0, 1), temperature=2.0, concentration=5.0)
    w, r = distill.teacher_attribution(probs.float(), t.float(), obj)
    p1 = torch.softmax(t, -1)
    h = -(p1 * p1.log()).sum(-1)  # [K, N]
    w_want = 1 - h / h.sum(0)  # K = 2: (1 - H_k / sum H) / (K - 1)
    torch.testing.assert_close(w, w_want.float(), rtol=1e-5, atol=1e-6)
    p = torch.softmax(t / 2.0, -1)  # [K, N, C]
    resp = []
    for q in probs:  # each posterior sample
        log_q = torch.log_softmax(q.log() / 2.0, -1)
        ell = w_want.log() + 5.0 * (p * log_q).sum(-1) - torch.lgamma(1 + 5.0 * p).sum(-1)
        resp.append(torch.softmax(ell, 0))
    torch.testing.assert_close(r, torch.stack(resp).mean(0).float(), rtol=1e-5, atol=1e-6)


def test_chains_are_pooled_with_their_own_bodies():
    x, y, t = halves_problem(8, seed=15)
    cfg = replace(CONFIG, map_epochs=6, sgld_epochs=3, num_samples=5, num_chains=3)
    res = distill.distill(_student(), t, x, y, cfg, method="mtbkd_sgld")
    store = res.store
    assert isinstance(store, distill.ChainSamples) and len(store) == 15
    # each chain keeps its own body once and the samples of its head only
    assert [len(s) for _, s in store.chains] == [5, 5, 5]
    assert all(n.startswith("head.") for _, s in store.chains for n in s.names)
    b0, b1, b2 = (st["body.0.weight"] for st, _ in store.chains)
    # chain c starts from its own initialisation (seed config.seed + c): no two chains alike
    assert not torch.equal(b0, b1) and not torch.equal(b1, b2) and not torch.equal(b0, b2)
    before = {k: v.clone() for k, v in res.model.state_dict().items()}
    # the first chain's samples are those of a one-chain run with the same seed
    one = distill.distill(_student(), t, x, y, replace(cfg, num_chains=1), method="mtbkd_sgld")
    pooled = res.predict(x)
    assert pooled.shape == (15, len(x), 4)
    torch.testing.assert_close(pooled[:5], one.predict(x))
    for (
        k,
        v,
    ) in res.model.state_dict().items():  # predicting leaves the model's weights as they were
        assert torch.equal(v, before[k])
    with pytest.raises(ValueError, match="num_chains"):
        distill.DistillConfig(num_chains=0)
    with pytest.raises(ValueError, match="sgld_grid"):
        distill.DistillConfig(sgld_grid=(1e-3, -1.0))


def test_run_experiment_with_chains_and_prior_grid_saves_and_predicts(tmp_path):
    ds = _tiny_dataset(seed=2)
    cfg = replace(TINY, methods=("ce", "mtbkd_sgld"), num_chains=2, sgld_prior_grid=(0.0, 50.0))
    res = distill.run_experiment(ds, cfg, checkpoint_dir=tmp_path / "ck", log=lambda m: None)
    mt = res.method("mtbkd_sgld")
    assert mt.probs.shape[0] == 2 * cfg.num_samples
    assert mt.hparams["sgld_prior_precision"] in (0.0, 50.0) and "sgld_lr" in mt.hparams
    distill.save_run(res, tmp_path / "run", ds)
    assert (tmp_path / "run" / "chain1_samples.safetensors").is_file()
    np.save(tmp_path / "x.npy", ds.x_test)
    distill.predict_file(tmp_path / "run", tmp_path / "x.npy", tmp_path / "p.csv")
    lines = (tmp_path / "p.csv").read_text().splitlines()
    saved = (tmp_path / "run" / "predictions.csv").read_text().splitlines()
    assert [r.split(",")[:5] for r in lines[1:]] == [r.split(",")[:5] for r in saved[1:]]
    # an interrupted-and-finished run is read back from its checkpoints: same predictions
    again = distill.run_experiment(ds, cfg, checkpoint_dir=tmp_path / "ck", log=lambda m: None)
    torch.testing.assert_close(again.method("mtbkd_sgld").probs, mt.probs)


def test_prediction_csv_quotes_class_names(tmp_path):
    import csv

    probs = torch.tensor([[[0.9, 0.1], [0.2, 0.8]]])
    path = tmp_path / "p.csv"
    distill._write_predictions(path, probs, torch.tensor([0, 0]), None, [], ["r1", "r2"],
                               ["Cell membrane, apical", "Nucleus"])  # fmt: skip
    rows = list(csv.DictReader(path.open()))
    assert [r["pred_class"] for r in rows] == ["Cell membrane, apical", "Nucleus"]
    assert [r["id"] for r in rows] == ["r1", "r2"] and [r["label"] for r in rows] == ["0", "0"]


def test_joint_selection_samples_every_grid_point_and_keeps_the_best_predictive(monkeypatch):
    first, pooled = [], []
    select_sgld, sample = distill._Experiment.select_sgld, distill._Experiment.sample

    def one_at_a_time(self, name, obj, map_model, settings):
        # each SGLD setting on its own, so every (objective, step) pair's NLL is recorded
        runs = []
        for h in settings:
            runs.append(select_sgld(self, name, obj, map_model, [h]))
            first.append((name, obj.hparams()["prior_weight"], h["sgld_lr"], runs[-1][4]))
        return min(runs, key=lambda r: r[4])

    def recorded_sample(self, name, obj, map_model, settings):
        out = sample(self, name, obj, map_model, settings)
        pooled.append((name, obj.hparams()["prior_weight"], out[0]["sgld_lr"], out[4]))
        return out

    monkeypatch.setattr(distill._Experiment, "select_sgld", one_at_a_time)
    monkeypatch.setattr(distill._Experiment, "sample", recorded_sample)
    cfg = replace(
        TINY,
        methods=("mtbkd_sgld", "bkd"),
        sgld_grid=(1e-4, 3e-2),
        num_chains=2,
        joint_selection=True,
        tune_bkd=True,
    )
    res = distill.run_experiment(_tiny_dataset(seed=3), cfg, log=lambda m: None)
    for name, method in (("mtbkd", "mtbkd_sgld"), ("bkd_lo", "bkd_lo"), ("bkd_hi", "bkd_hi")):
        # every prior weight with every step size on the first chain ...
        mine = [c for c in first if c[0] == name]
        assert sorted(c[1:3] for c in mine) == [(a, b) for a in (0.1, 0.5) for b in (1e-4, 3e-2)]
        # ... each prior weight's best step pooled over both chains, the best pool kept
        runs = [c for c in pooled if c[0] == name]
        assert sorted(c[1] for c in runs) == [0.1, 0.5]
        for _, pw, lr, _ in runs:
            assert lr == min((c for c in mine if c[1] == pw), key=lambda c: c[3])[2]
        best = min(runs, key=lambda c: c[3])
        got = res.method(method)
        assert (got.hparams["prior_weight"], got.hparams["sgld_lr"]) == best[1:3]
        assert got.val_nll == pytest.approx(best[3])
        assert got.probs.shape[0] == 2 * cfg.num_samples


def test_selection_keeps_the_lowest_validation_nll_and_the_default_prior(monkeypatch):
    # the MAP objective and the SGLD setting are chosen by the lowest validation NLL (the best
    # sits between a worse first and a worse last candidate)
    x, y, t = halves_problem(3, seed=17)
    cfg = replace(CONFIG, weight_decay=1e-3, sgld_grid=())
    ex = distill._Experiment(cfg, x, y, t, x, y, x, y, _student(), None, lambda m: None)
    nll = {0.1: 0.7, 0.5: 0.3, 0.9: 0.5}
    objs = [distill.Objective("mtbkd", (0, 1), prior_weight=pw) for pw in nll]
    monkeypatch.setattr(ex, "fit_map", lambda name, obj: (None, 1.0, nll[obj.prior_weight]))
    obj, _, _, vnll = ex.select_map("mtbkd", objs)
    assert (obj.prior_weight, vnll) == (0.5, 0.3)
    vals = {1e-3: 0.6, 1e-2: 0.2, 1e-1: 0.4}
    settings = [{"sgld_lr": lr, "sgld_prior_precision": 1.0} for lr in vals]
    monkeypatch.setattr(distill, "train_sgld", lambda *a, sgld_lr, **kw: (sgld_lr, 0.0))
    monkeypatch.setattr(ex, "val_nll", lambda model, store: vals[store])
    h, _, _, _, vnll = ex.select_sgld("mtbkd", objs[0], _student(), settings)
    assert (h["sgld_lr"], vnll) == (1e-2, 0.2)
    # the SGLD grid: every step size with every prior precision; without a prior grid the
    # default precision num_data * weight_decay (12 rows here)
    assert ex.sgld_settings() == [{"sgld_lr": cfg.sgld_lr, "sgld_prior_precision": 12 * 1e-3}]
    ex.config = replace(cfg, sgld_grid=(1e-3, 1e-2), sgld_prior_grid=(1.0, 2.0))
    assert [(h["sgld_lr"], h["sgld_prior_precision"]) for h in ex.sgld_settings()] == [
        (1e-3, 1.0),
        (1e-3, 2.0),
        (1e-2, 1.0),
        (1e-2, 2.0),
    ]


def test_evaluate_probs_auroc_tells_wrong_predictions_by_their_entropy():
    # MATH.md section 8: AUROC of the predictive entropy for wrong (positive) against right rows.
    # Two classes, top probabilities 0.55 (wrong), 0.7 (wrong), 0.65 (right), 0.95 (right): the
    # entropy falls as the top probability grows, so 3 of the 4 (wrong, right) pairs are ordered
    top = torch.tensor([0.55, 0.7, 0.65, 0.95])
    probs = torch.stack([top, 1 - top], -1)[None]
    labels = torch.tensor([1, 1, 0, 0])
    m = distill.evaluate_probs(probs, labels)
    assert m["accuracy"] == 0.5
    assert m["auroc_error"] == pytest.approx(0.75)


def test_teacher_calibration_divides_train_and_test_logits_by_one_fitted_temperature(monkeypatch):
    # each teacher's temperature T minimises the NLL of its out-of-fold training logits / T
    # (found here by scipy) and scales its training and its test logits alike
    optimize = pytest.importorskip("scipy.optimize")

    def teachers(x, y, num_classes, config):  # x . mean_c is the Bayes logit: T = 3 and 0.5
        heads = {"over": torch.nn.Linear(2, 4), "under": torch.nn.Linear(2, 4)}
        for scale, head in zip((3.0, 0.5), heads.values(), strict=True):
            head.weight.data, head.bias.data = scale * MEANS, torch.zeros(4)
        return heads

    monkeypatch.setattr(distill, "train_teachers", teachers)
    x, y, _ = halves_problem(10, seed=18)
    cfg = replace(CONFIG, teacher_folds=2, teacher_calibrate=False)
    _, raw_tr, raw_te = distill.teacher_logits(x, y, x[:7], 4, cfg)
    _, cal_tr, cal_te = distill.teacher_logits(x, y, x[:7], 4, replace(cfg, teacher_calibrate=True))
    for k in range(2):
        logits = raw_tr[k].double()

        def nll(log_t, logits=logits):
            return float(torch.nn.functional.cross_entropy(logits / np.exp(log_t), y))

        fit = optimize.minimize_scalar(nll, bounds=(np.log(0.05), np.log(20.0)), method="bounded",
                                       options={"xatol": 1e-8})  # fmt: skip
        temp = float(np.exp(fit.x))
        assert 0.1 < temp < 10  # an interior minimum
        torch.testing.assert_close(cal_tr[k], raw_tr[k] / temp, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cal_te[k], raw_te[k] / temp, rtol=1e-5, atol=1e-5)


def test_format_hparams_is_compact():
    # the progress lines and report.md show 0.0237, not float noise like 0.023700000000000002
    from mtbkd.distill import format_hparams

    assert format_hparams({"sgld_prior_precision": 0.023700000000000002, "temperature": 4.0}) == (
        "sgld_prior_precision=0.0237, temperature=4"
    )
    assert format_hparams({}) == "none"


def test_teacher_mixtures_by_hand():
    # two teachers, two rows of two classes, label 0: the average and the entropy-weighted mixture
    a = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[0.0, 0.5], [4.0, 0.0]])
    y = torch.tensor([0, 0])
    mixes = {m["name"]: m for m in distill.teacher_mixtures(torch.stack([a, b]), y)}
    pa, pb = torch.softmax(a.double(), -1), torch.softmax(b.double(), -1)
    ha, hb = (-(p * p.log()).sum(-1) for p in (pa, pb))
    wa = 1 - ha / (ha + hb)  # MATH.md section 1, K = 2; wb = 1 - wa
    expect = {
        "average": (pa + pb) / 2,
        "entropy-weighted": wa[:, None] * pa + (1 - wa)[:, None] * pb,
    }
    for name, p in expect.items():
        assert mixes[name]["nll"] == pytest.approx(float(-p[:, 0].log().mean()), rel=1e-5)
        assert mixes[name]["accuracy"] == pytest.approx(float((p.argmax(-1) == 0).double().mean()))
    # the more confident teacher is the right one on both rows: its weight halves the NLL
    assert mixes["entropy-weighted"]["nll"] < 0.6 * mixes["average"]["nll"]
    assert distill.teacher_mixtures(a[None], y) == []  # one teacher: nothing to mix
    with pytest.raises(ValueError, match="rows but labels"):
        distill.teacher_mixtures(torch.stack([a, b]), y[:1])
    with pytest.raises(ValueError, match=r"\[K, N, C\]"):
        distill.teacher_mixtures(a, y)


def test_student_keeps_the_unit_scale_of_a_feature_constant_in_training():
    mean = torch.tensor([0.0, 3.0])
    std = torch.tensor([0.0, 2.0])  # the first feature never varies on the training rows
    torch.manual_seed(0)
    model = distill.StudentMLP(2, 3, (8,), mean, std)
    assert model.input_std.tolist() == [1.0, 2.0]
    # a new input with a value the training rows never had in that feature: a unit step, not a
    # step of 1e6 standard deviations
    torch.manual_seed(0)
    plain = distill.StudentMLP(2, 3, (8,))
    x = torch.tensor([[0.5, 3.0 + 2 * 0.7]])
    expected = plain.head(plain.body(torch.tensor([[0.5, 0.7]])))
    torch.testing.assert_close(model(x), expected)
    # "constant" is relative to the feature's scale: float32 rounding of a constant 5.3 is, a
    # feature on a scale of 1e-7 is not (an absolute bound of 1e-6 had left one unscaled)
    mean = torch.tensor([5.3, 2e-7, 0.0])
    std = torch.tensor([4e-7, 1e-7, 0.0])
    model = distill.StudentMLP(3, 3, (8,), mean, std)
    assert model.input_std.tolist() == pytest.approx([1.0, 1e-7, 1.0], rel=1e-6)


def test_shift_auroc_by_hand():
    confident = torch.tensor([[0.98, 0.01, 0.01], [0.01, 0.98, 0.01]])
    flat = torch.full((3, 3), 1 / 3)
    assert distill.shift_auroc(confident, flat) == 1.0  # every shifted row is more uncertain
    assert distill.shift_auroc(flat[:2], confident) == 0.0
    # samples [S, N, C]: the predictive mean's entropy; one tie of three pairs counts half
    half = torch.tensor([[[0.9, 0.1]], [[0.1, 0.9]]])  # mean (0.5, 0.5), the shifted row's too
    assert distill.shift_auroc(torch.tensor([[0.5, 0.5], [0.99, 0.01]]), half) == 0.75
    with pytest.raises(ValueError, match="classes"):
        distill.shift_auroc(confident, torch.full((2, 2), 0.5))


def test_run_experiment_measures_shifted_inputs():
    ds = _tiny_dataset()
    origin = np.zeros((7, ds.x_test.shape[1]), dtype=ds.x_test.dtype)
    shifted = replace(ds, x_shift=origin, shift_name="the origin")
    cfg = replace(TINY, methods=("ce", "mtbkd_sgld"))
    res = distill.run_experiment(shifted, cfg, log=lambda m: None)
    assert res.shift_name == "the origin"
    for m in res.methods:
        assert m.shift_probs.shape[1:] == (7, 4)
        assert m.shift_probs.shape[0] == m.probs.shape[0]
        expected = distill.shift_auroc(m.probs, m.shift_probs)
        assert m.row()["auroc_shift"] == m.metrics["auroc_shift"] == expected
        assert list(m.row())[-5:] == [
            "auroc_shift",
            "overconfidence",
            "ece_floor",
            "ece_p",
            "seconds",
        ]
    plain = distill.run_experiment(ds, cfg, log=lambda m: None)
    assert plain.shift_name is None and "auroc_shift" not in plain.methods[0].row()
    # the shifted inputs change no other metric
    for a, b in zip(res.methods, plain.methods, strict=True):
        assert {k: v for k, v in a.metrics.items() if k != "auroc_shift"} == pytest.approx(
            b.metrics, nan_ok=True
        )


def test_digits_teachers_never_train_on_the_students_validation_rows(monkeypatch):
    from mtbkd.data import load_digits, stratified_split

    cfg = replace(distill.DistillConfig(**distill.SMOKE), val_fraction=0.3, seed=3)
    seen = []
    real = distill.train_teachers

    def recording(x, y, num_classes, config):
        seen.append(x.clone())
        return real(x, y, num_classes, config)

    monkeypatch.setattr(distill, "train_teachers", recording)
    ds = distill.digits_demo_dataset(cfg, seed=3)
    full = load_digits(3)
    _, val = stratified_split(ds.y_train, cfg.val_fraction, cfg.seed)  # run_experiment's split
    val_rows = {r.tobytes() for r in ds.x_train[val]}
    # the full teachers, then one set per fold
    assert len(seen) == 1 + cfg.teacher_folds
    assert len(seen[0]) == len(full.y_train) - len(val)
    for x in seen:
        assert not any(r.numpy().tobytes() in val_rows for r in x)
    # the validation rows still have teacher logits (from teachers that never saw them)
    assert all(t.shape == (len(ds.y_train), 10) for t in ds.teachers_train.values())


def test_digits_demo_dataset_tests_on_its_cross_fitting_fold():
    from mtbkd.data import load_digits

    cfg = replace(distill.DistillConfig(**distill.SMOKE), test_folds=4, test_fold=1, fold_seed=2)
    ds = distill.digits_demo_dataset(cfg, seed=5)
    fold = load_digits(0, fold=(1, 4, 2))
    # the fold's rows are the test rows whatever the seed; the student's rows come from the rest
    assert np.array_equal(ds.x_test, fold.x_test) and np.array_equal(ds.y_test, fold.y_test)
    assert len(ds.y_test) in (449, 450)
    train = {r.tobytes() for r in fold.x_train}
    assert all(r.tobytes() in train for r in ds.x_train)
    assert all(t.shape == (len(ds.y_test), 10) for t in ds.teachers_test.values())


def test_checkpoints_of_other_settings_are_refused(tmp_path):
    x, y, t = halves_problem(6, seed=16)
    cfg = replace(CONFIG, map_epochs=3, sgld_epochs=2, num_samples=3)
    first = distill.distill(_student(), t, x, y, cfg, checkpoint_dir=tmp_path)
    # a run with another optimizer setting, seed, SGLD temperature, objective or data must not
    # silently load these checkpoints (it would return the first run's samples)
    for other, data, msg in [
        (replace(cfg, map_lr=0.1), (x, y), r"map\.pt .*differing: lr\)"),
        (replace(cfg, seed=7), (x, y), r"differing: seed\)"),
        (replace(cfg, weights="uniform"), (x, y), r"differing: objective\)"),
        (replace(cfg, sgld_temperature=0.5), (x, y), r"sgld\.pt .*differing: temperature\)"),
        (cfg, (x, y.roll(1)), r"differing: features\) \(the features or labels differ"),
    ]:
        with pytest.raises(distill.CheckpointMismatchError, match=msg):
            distill.distill(_student(), t, *data, other, checkpoint_dir=tmp_path)
    # other teachers: said to be the teachers (the hint of float rounding is theirs alone)
    with pytest.raises(distill.CheckpointMismatchError,
                       match=r"differing: teachers\) \(the teachers' logits differ"):  # fmt: skip
        distill.distill(_student(), [u + 1e-3 for u in t], x, y, cfg, checkpoint_dir=tmp_path)
    again = distill.distill(_student(), t, x, y, cfg, checkpoint_dir=tmp_path)
    assert torch.equal(again.store.samples(), first.store.samples())


def test_checkpoints_with_the_older_single_data_digest_still_resume(tmp_path, monkeypatch):
    x, y, t = halves_problem(6, seed=16)
    cfg = replace(CONFIG, map_epochs=3, sgld_epochs=2, num_samples=3)
    real = distill._fingerprint

    def older(data, *args):
        fp = real(data, *args)
        del fp["features"], fp["teachers"]
        return {"data": distill._digest(data.x, data.y, data.t), **fp}

    monkeypatch.setattr(distill, "_fingerprint", older)
    first = distill.distill(_student(), t, x, y, cfg, checkpoint_dir=tmp_path)
    monkeypatch.setattr(distill, "_fingerprint", real)
    again = distill.distill(_student(), t, x, y, cfg, checkpoint_dir=tmp_path)
    assert torch.equal(again.store.samples(), first.store.samples())
    with pytest.raises(distill.CheckpointMismatchError, match=r"differing: data\) \(the teach"):
        distill.distill(_student(), t, x, y.roll(1), cfg, checkpoint_dir=tmp_path)


def test_damaged_checkpoints_are_refused_by_name(tmp_path):
    # found by an audit: one flipped bit in a checkpoint's weights was resumed from silently
    # (torch.load does not check the zip CRCs: weights of 7e36 in the results), and a truncated
    # checkpoint or samples file was a raw traceback naming no file
    import shutil
    import zipfile

    x, y, t = halves_problem(6, seed=16)
    cfg = replace(CONFIG, map_epochs=3, sgld_epochs=2, num_samples=3)
    first = distill.distill(_student(), t, x, y, cfg, checkpoint_dir=tmp_path / "ok")
    sgld = tmp_path / "ok" / "sgld.pt"
    samples = sorted((tmp_path / "ok").glob("sgld_samples.*.safetensors"))
    assert sgld.is_file() and len(samples) == 1

    def damaged(name, edit):
        d = tmp_path / name
        shutil.copytree(tmp_path / "ok", d)
        edit(d)
        with pytest.raises(distill.CheckpointCorruptError, match=f"{name}/.* is damaged"):
            distill.distill(_student(), t, x, y, cfg, checkpoint_dir=d)

    def flip(d):  # one bit of a stored tensor (not of the zip's bookkeeping)
        path = d / "sgld.pt"
        with zipfile.ZipFile(path) as z:
            entry = next(i for i in z.infolist() if "/data/" in i.filename and i.file_size)
        raw = bytearray(path.read_bytes())
        at = entry.header_offset  # the local header's name and (alignment) extra lengths
        start = at + 30 + int.from_bytes(raw[at + 26 : at + 28], "little")
        start += int.from_bytes(raw[at + 28 : at + 30], "little")
        raw[start] ^= 0x40
        path.write_bytes(bytes(raw))

    damaged("bitflip", flip)
    damaged("truncated", lambda d: (d / "map.pt").write_bytes((d / "map.pt").read_bytes()[:300]))
    damaged("samples", lambda d: (d / samples[0].name).write_bytes(b"\0" * 16))
    # a missing samples file was a FileNotFoundError the command line let through as a traceback
    shutil.copytree(tmp_path / "ok", tmp_path / "missing")
    (tmp_path / "missing" / samples[0].name).unlink()
    with pytest.raises(distill.CheckpointCorruptError, match="samples file .* is missing"):
        distill.distill(_student(), t, x, y, cfg, checkpoint_dir=tmp_path / "missing")
    # the same bytes as written resume as before
    again = distill.distill(_student(), t, x, y, cfg, checkpoint_dir=tmp_path / "ok")
    assert torch.equal(again.store.samples(), first.store.samples())


def test_checkpoint_of_another_student_shape_is_refused(tmp_path):
    # found by a bug hunt: `--set hidden=[64]` on --resume was a raw load_state_dict traceback
    x, y, t = halves_problem(6, seed=16)
    cfg = replace(CONFIG, map_epochs=3, sgld_epochs=2, num_samples=3, methods=("mtbkd_map",))
    distill.distill(_student(), t, x, y, cfg, checkpoint_dir=tmp_path, method="mtbkd_map")
    torch.manual_seed(0)
    wider = distill.StudentMLP(2, 4, (48,))
    other = r"map\.pt holds a student of other shapes \(differing: model"
    with pytest.raises(distill.CheckpointMismatchError, match=other):
        distill.distill(wider, t, x, y, cfg, checkpoint_dir=tmp_path, method="mtbkd_map")


def test_an_empty_validation_split_is_refused_before_training():
    # found by a bug hunt: 1 training row per class gave 0 validation rows and a traceback from
    # the metrics of early stopping
    x = np.random.default_rng(0).normal(size=(6, 2)).astype(np.float32)
    y = np.array([0, 1, 2, 0, 1, 2])
    t = {"a": np.eye(3, dtype=np.float32)[y[:3]] * 3}
    ds = Dataset("tiny", x[:3], y[:3], x[3:], y[3:], list("abc"), t,
                 {"a": np.eye(3, dtype=np.float32)[y[3:]] * 3})  # fmt: skip
    cfg = replace(CONFIG, methods=("ce",))
    with pytest.raises(ValueError, match="the validation split is empty: 3 training rows"):
        distill.check_methods(ds, cfg)
    with pytest.raises(ValueError, match="the validation split is empty"):
        distill.run_experiment(ds, cfg, log=lambda m: None)


def test_float16_students_and_diverged_training_are_refused_by_name():
    # found in the thirtieth session: a float16 student's Adam update is 0/0 = NaN (eps rounds to
    # 0), and `ce` returned a model that predicts NaN without a word; any divergence now stops
    x, y = torch.randn(64, 5), torch.randint(0, 3, (64,))
    t = torch.randn(2, 64, 3)
    cfg = distill.DistillConfig(map_epochs=3, sgld_epochs=2, batch_size=16, early_stopping=False)

    def mlp(dtype=torch.float32):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3)).to(dtype)

    for method in ("ce", "mtbkd_sgld"):
        with pytest.raises(TypeError, match="student parameter '0.weight' is float16"):
            distill.distill(mlp(torch.float16), t, x, y, cfg, method=method)
        with pytest.raises(distill.TrainingDivergedError, match=f"{method} MAP: .* epoch 1"):
            distill.distill(mlp(), t, x, y, replace(cfg, map_lr=1e30), method=method)
    # bfloat16 trains
    res = distill.distill(mlp(torch.bfloat16), t, x, y, cfg, method="mtbkd_map")
    assert torch.isfinite(res.predict(x[:4])).all()


def test_a_student_that_masks_a_class_with_minus_inf_is_not_diverged():
    # review (thirty-first session): any non-finite logit was called a divergence, so `ce`
    # refused a student that rules out a class with -inf (F.cross_entropy trains it); NaN, +inf
    # and a row of -inf only still are
    torch.manual_seed(0)
    x, y = torch.randn(64, 5), torch.randint(0, 3, (64,))
    t = torch.randn(2, 64, 4)

    class Masked(nn.Module):
        def __init__(self, fill):
            super().__init__()
            self.lin, self.fill = nn.Linear(5, 4), fill

        def forward(self, x):
            return self.lin(x).masked_fill(self.fill, -torch.inf)

    cfg = distill.DistillConfig(map_epochs=2, sgld_epochs=1, batch_size=16, early_stopping=False)
    res = distill.distill(Masked(torch.tensor([False, False, False, True])), t, x, y, cfg,
                          method="ce")  # fmt: skip
    p = res.predict(x[:4])
    assert not torch.isnan(p).any() and torch.all(p[..., 3] == 0)
    with pytest.raises(distill.TrainingDivergedError, match="-inf in a whole row at epoch 1"):
        distill.distill(Masked(torch.ones(4, dtype=torch.bool)), t, x, y, cfg, method="ce")


def _bn_student(kind: str) -> nn.Module:
    if kind == "frozen_bn1d_body":  # a pretrained body the caller froze: eval mode in training
        body = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU())
        body.requires_grad_(False)
        return nn.Sequential(body, nn.Linear(8, 3))
    if kind == "bn2d":  # BatchNorm2d over a 2x2 map: one row still gives 4 values per channel
        return nn.Sequential(nn.Unflatten(1, (1, 2, 2)), nn.Conv2d(1, 4, 1), nn.BatchNorm2d(4),
                             nn.ReLU(), nn.Flatten(), nn.Linear(16, 3))  # fmt: skip
    bn = nn.BatchNorm1d(8, track_running_stats=False)  # batch statistics even when frozen
    body = nn.Sequential(nn.Linear(4, 8), bn)
    body.requires_grad_(False)
    return nn.Sequential(body, nn.Linear(8, 3))


@pytest.mark.parametrize("kind", ["frozen_bn1d_body", "bn2d"])
def test_batch_norm_students_that_train_on_one_row_are_not_refused(kind):
    # review (thirty-first session): any batch norm was refused when the last batch has one row;
    # a frozen body's (eval mode in training) and a BatchNorm2d's (several values per channel)
    # train on it
    torch.manual_seed(0)
    x, y = torch.randn(65, 4), torch.randint(0, 3, (65,))  # 65 % 64 == 1
    cfg = distill.DistillConfig(batch_size=64, map_epochs=1, sgld_epochs=1, num_samples=1,
                                progress=False)  # fmt: skip
    res = distill.distill(_bn_student(kind), None, x, y, cfg, method="ce")
    assert torch.isfinite(res.predict(x[:3])).all()
    with pytest.raises(ValueError, match=r"batch norm \(0.1\) cannot train on"):
        distill.distill(_bn_student("frozen_no_running_stats"), None, x, y, cfg, method="ce")


@pytest.mark.parametrize("old", [{"teacher_calibrate": True}, {"teacher_folds": 1}])
def test_older_runs_without_teacher_folds_are_the_same_experiment_as_todays(old):
    # review (thirty-first session): runs written before teacher_folds=0 with teacher_calibrate
    # (or teacher_folds=1) were refused ran neither cross-fitting nor calibration; they must
    # still resume and pool with today's equivalent config
    base = distill.DistillConfig(teacher_folds=0, teacher_calibrate=False).to_dict()
    was = distill.experiment_settings({"dataset": "digits", "config": {**base, **old}})
    now = distill.experiment_settings({"dataset": "digits", "config": base})
    assert was == now


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_evaluate_probs_takes_half_precision_probabilities(dtype):
    # review (thirty-first session): the float32 cast held bfloat16 rows (sums off by up to
    # their rounding, ~2e-3) to float32's tolerance and refused them; every metric takes them
    for c in (4, 10, 1000):
        torch.manual_seed(0)
        y = torch.randint(0, c, (20,))
        p = torch.softmax(torch.randn(5, 20, c), -1).to(dtype)
        got = distill.evaluate_probs(p, y)
        want = distill.evaluate_probs(p.float() / p.float().sum(-1, keepdim=True), y)
        assert got["accuracy"] == want["accuracy"]
        for key in ("nll", "ece", "brier"):
            assert abs(got[key] - want[key]) < 1e-3, (c, key)
        assert distill.evaluate_probs(p[0], y)["accuracy"] >= 0  # [N, C] too


def test_distill_leaves_the_cuda_generator_alone(monkeypatch):
    # review: torch.manual_seed inside the CPU-only fork also seeded (or queued a seed for) every
    # CUDA device, leaving a GPU caller's generator at the run's seed
    calls = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda s: calls.append(s))
    x, y = torch.randn(32, 5), torch.randint(0, 3, (32,))
    cfg = distill.DistillConfig(map_epochs=1, batch_size=16, progress=False)
    distill.distill(distill.StudentMLP(5, 3), None, x, y, cfg, method="ce")
    assert calls == []


def test_distill_takes_whole_number_float_labels_and_numpy_bools():
    # review (thirty-first session): float64 labels of whole values (np.loadtxt, pandas), which
    # mtbkd.data takes, were refused; so were numpy bools in DistillConfig (SGLD takes them)
    torch.manual_seed(0)
    x, y = torch.randn(40, 4), torch.arange(40) % 3
    cfg = distill.DistillConfig(map_epochs=1, sgld_epochs=1, num_samples=1, num_chains=1,
                                batch_size=20, progress=False,
                                early_stopping=np.bool_(False))  # fmt: skip
    assert cfg.early_stopping is False
    student = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    r = distill.distill(student, torch.randn(2, 40, 3), x, y.numpy().astype(np.float64), cfg,
                        method="mtbkd_map")  # fmt: skip
    assert r.predict(x).shape == (1, 40, 3)
    for bad in (np.full(40, 0.5), np.full(40, np.nan)):
        with pytest.raises(TypeError, match="fractional or non-finite"):
            distill.distill(student, None, x, bad, cfg, method="ce")


def test_further_chains_keep_a_frozen_bodys_parameter_free_batch_norm_statistics():
    # review (thirty-first session): a BatchNorm1d(affine=False) in a frozen body has no
    # parameters of its own, so "all its parameters require grad" held and every chain after
    # the first reset its pretrained running statistics to 0 and 1
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(60, 6, generator=g), torch.randint(0, 3, (60,), generator=g)
    t = torch.randn(2, 60, 3, generator=g)
    body = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8, affine=False))
    with torch.no_grad():
        body[1].running_mean.fill_(3.0)
        body[1].running_var.fill_(4.0)
    body.requires_grad_(False)
    student = nn.Sequential(body, nn.ReLU(), nn.Linear(8, 3))
    cfg = distill.DistillConfig(map_epochs=2, sgld_epochs=2, num_samples=2, batch_size=16,
                                progress=False, num_chains=2)  # fmt: skip
    res = distill.distill(student, t, x, y, cfg)
    assert len(res.store.chains) == 2
    for c, (state, _) in enumerate(res.store.chains):
        assert torch.equal(state["0.1.running_mean"], torch.full((8,), 3.0)), c
        assert torch.equal(state["0.1.running_var"], torch.full((8,), 4.0)), c


def test_a_bfloat16_student_trains_with_a_checkpoint_dir(tmp_path):
    # review: the checkpoint fingerprint hashed x through numpy, which has no bfloat16
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 5, generator=g), torch.randint(0, 3, (40,), generator=g)
    t = torch.randn(2, 40, 3, generator=g)
    student = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3)).to(torch.bfloat16)
    cfg = distill.DistillConfig(map_epochs=2, batch_size=16, progress=False)
    res = distill.distill(student, t, x, y, cfg, method="mtbkd_map", checkpoint_dir=tmp_path,
                          validation=(x[:20], y[:20]))  # fmt: skip
    assert res.predict(x).shape == (1, 40, 3)
    assert distill._digest(x.bfloat16()) != distill._digest(x.bfloat16() + 1)


def test_config_rejects_bad_values_naming_the_field():
    for kw, msg in [
        ({"sgld_temperature": -1.0}, "sgld_temperature must be"),
        ({"sgld_prior_precision": -1.0}, "sgld_prior_precision must be"),
        ({"kd_weight": -1.0}, "kd_weight must be"),
        ({"map_lr": float("inf")}, "map_lr must be a positive finite"),
        ({"teacher_other_fraction": 3.0}, "teacher_other_fraction must lie"),
        ({"num_teachers": 0}, "num_teachers must be at least 1"),
        ({"sgld_epochs": 0}, "sgld_epochs must be at least 1 for the sampled methods"),
        ({"batch_size": 2.5}, "batch_size must be an integer"),
        ({"test_folds": 1}, "test_folds must be 0 .* or at least 2"),
        ({"test_fold": 1}, "test_fold=1 needs test_folds"),
        ({"test_folds": 3, "test_fold": 3}, r"test_fold must lie in 0..2"),
        ({"test_folds": 3, "fold_seed": -1}, "fold_seed must be non-negative"),
        ({"fold_seed": 2}, "fold_seed=2 needs test_folds"),
    ]:
        with pytest.raises((ValueError, TypeError), match=msg):
            distill.DistillConfig(**kw)
    assert distill.DistillConfig().fold() is None
    assert distill.DistillConfig(test_folds=5, test_fold=2, fold_seed=7).fold() == (2, 5, 7)
    # a whole float (a JSON --set value) is the integer; no SGLD epochs without a sampled method
    assert distill.DistillConfig(map_epochs=4.0).map_epochs == 4
    assert distill.DistillConfig(sgld_epochs=0, methods=("ce", "mtbkd_map")).sgld_epochs == 0
    x, y, t = halves_problem(4, seed=17)
    cfg = replace(CONFIG, sgld_epochs=0, methods=("ce",))
    with pytest.raises(ValueError, match="sgld_epochs must be at least 1"):
        distill.distill(_student(), t, x, y, cfg, method="mtbkd_sgld")


def test_distill_leaves_the_callers_rng_alone():
    x, y, t = halves_problem(4, seed=18)
    s = _student()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    distill.distill(s, t, x, y, replace(CONFIG, map_epochs=2), method="ce")
    assert torch.equal(torch.rand(3), expected)


def test_average_teacher_logits_by_hand():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(3, 5, 7, generator=g, dtype=torch.float64) * 3
    t[:, 1, 4] = float("-inf")  # a class every teacher rules out stays ruled out
    t[0, 2, 6] = float("-inf")  # one teacher's -inf averages with the others' probabilities
    got = distill.average_teacher_logits(t)
    want = torch.log(torch.softmax(t, -1).mean(0))
    assert torch.equal(torch.isinf(got), torch.isinf(want)) and got[1, 4] == float("-inf")
    torch.testing.assert_close(got[torch.isfinite(want)], want[torch.isfinite(want)])
    torch.testing.assert_close(torch.softmax(got, -1), torch.softmax(t, -1).mean(0))
    with pytest.raises(ValueError, match=r"teacher_logits must be \[K, N, C\]"):
        distill.average_teacher_logits(t[0])


def test_avg_bkd_is_single_teacher_bkd_on_the_teachers_average():
    # avg_bkd = bkd with one teacher whose logits are the teachers' average: the same samples as
    # bkd_<K> of the teachers with that average appended as teacher K
    x, y, t = halves_problem(12, seed=0)
    cfg = replace(CONFIG, map_epochs=5, sgld_epochs=3, num_samples=4)
    avg = distill.distill(_student(), t, x, y, cfg, method="avg_bkd")
    t3 = torch.cat([t, distill.average_teacher_logits(t)[None]])
    bkd = distill.distill(_student(), t3, x, y, cfg, method="bkd_2")
    assert avg.objective == bkd.objective and avg.objective.teachers == (2,)
    torch.testing.assert_close(avg.predict(x), bkd.predict(x), rtol=0, atol=0)
    other = distill.distill(_student(), t3, x, y, cfg, method="bkd_0")
    assert not torch.allclose(avg.predict(x), other.predict(x))
    with pytest.raises(ValueError, match="avg_bkd' averages several teachers, got 1"):
        distill.distill(_student(), t[:1], x, y, cfg, method="avg_bkd")


def test_run_experiment_avg_bkd_is_opt_in():
    assert "avg_bkd" not in distill.DistillConfig().methods
    ds = _tiny_dataset()
    cfg = replace(TINY, methods=("ce", "avg_bkd"))
    res = distill.run_experiment(ds, cfg, log=lambda m: None)
    assert [m.name for m in res.methods] == ["ce", "avg_bkd"]
    m = res.methods[1]
    assert m.sampled and m.probs.shape == (TINY.num_samples, len(ds.y_test), 4)
    # the same run on the dataset with the average as a third teacher, distilled by bkd_avg
    tr = np.stack([ds.teachers_train[n] for n in ("lo", "hi")])
    te = np.stack([ds.teachers_test[n] for n in ("lo", "hi")])
    ds3 = replace(
        ds,
        teachers_train={**ds.teachers_train, "avg": distill.average_teacher_logits(
            torch.from_numpy(tr)).numpy()},
        teachers_test={**ds.teachers_test, "avg": distill.average_teacher_logits(
            torch.from_numpy(te)).numpy()},
    )  # fmt: skip
    res3 = distill.run_experiment(ds3, replace(cfg, methods=("bkd_avg",)), log=lambda m: None)
    assert res3.methods[0].hparams == m.hparams
    torch.testing.assert_close(res3.methods[0].probs, m.probs, rtol=1e-6, atol=1e-7)
    one = replace(ds, teachers_train={"lo": tr[0]}, teachers_test={"lo": te[0]})
    with pytest.raises(ValueError, match="avg_bkd' averages several teachers, got 1"):
        distill.run_experiment(one, cfg, log=lambda m: None)
    with pytest.raises(ValueError, match="avg_bkd"):
        distill.DistillConfig(methods=("ce", "avg_bdk"))


def test_grids_may_be_lists_of_grids_and_tune_the_weights():
    # a list of grids is the union of their products, each setting once, in order
    grid = [{"concentration": (5.0, 20.0), "prior_weight": (0.1,)},
            {"concentration": (0.01, 5.0), "prior_weight": (0.1, 250.0)}]  # fmt: skip
    got = [(h["concentration"], h["prior_weight"]) for h in distill._grid({"x": 1}, grid)]
    assert got == [(5.0, 0.1), (20.0, 0.1), (0.01, 0.1), (0.01, 250.0), (5.0, 250.0)]
    assert distill._grid({"x": 1}, {}) == [{"x": 1}]
    cfg = distill.DistillConfig(
        mtbkd_grid=[
            {"weights": ["uniform", "entropy"], "concentration": [0.01]},
            {"prior_weight": [1, 2]},
        ]  # fmt: skip
    )
    assert cfg.mtbkd_grid == [
        {"weights": ("uniform", "entropy"), "concentration": (0.01,)},
        {"prior_weight": (1.0, 2.0)},
    ]
    back = distill.DistillConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back.mtbkd_grid == cfg.mtbkd_grid and back.kd_grid == cfg.kd_grid
    bad = {
        "must be among": {"weights": ["mean"]},
        "non-empty list of names": {"weights": "uniform"},
        "or a non-empty list of them": [],
        "may tune": [{"prior_weight": [1.0]}, {"hard_label_weight": [1.0]}],
        "values must be non-negative": [{"prior_weight": [-1.0]}],
    }
    for msg, g in bad.items():
        with pytest.raises(ValueError, match=msg):
            distill.DistillConfig(mtbkd_grid=g)
    with pytest.raises(ValueError, match="kd_grid may tune"):
        distill.DistillConfig(kd_grid=[{"weights": ["uniform"]}])
    # the weights name the checkpoints of a mixture, not of one teacher's objective
    two = distill.Objective("mtbkd", (0, 1), "uniform", prior_weight=0.5)
    assert two.hparams()["weights"] == "uniform"
    tag = "concentration5-prior_weight0.5-temperature2-weightsuniform"
    assert distill._tag(two.hparams()) == tag
    assert "weights" not in distill.Objective("mtbkd", (1,), "uniform").hparams()


def test_run_experiment_selects_the_weights_and_attributes_with_the_chosen_ones(tmp_path):
    # the grid offers only uniform weights, the config says entropy: the mixture (and its
    # attribution: every teacher weight 1/2) uses the grid's choice; the single-teacher BKDs,
    # which ignore the weights, fit each of their settings once
    cfg = replace(
        TINY,
        methods=("bkd", "mtbkd_map"),
        tune_bkd=True,
        mtbkd_grid=[
            {"weights": ["uniform"], "prior_weight": [0.1, 0.5]},
            {"weights": ["entropy", "uniform"], "prior_weight": [0.5]},
        ],  # fmt: skip
    )
    res = distill.run_experiment(_tiny_dataset(seed=4), cfg, checkpoint_dir=tmp_path,
                                 log=lambda m: None)  # fmt: skip
    h = res.method("mtbkd_map").hparams
    assert h["weights"] in ("uniform", "entropy") and h["prior_weight"] in (0.1, 0.5)
    mixtures = sorted(p.name for p in (tmp_path / "mtbkd").iterdir())
    assert mixtures == [
        "concentration20-prior_weight0.1-temperature2-weightsuniform",
        "concentration20-prior_weight0.5-temperature2-weightsentropy",
        "concentration20-prior_weight0.5-temperature2-weightsuniform",
    ]
    for name in ("bkd_lo", "bkd_hi"):
        assert "weights" not in res.method(name).hparams
        assert sorted(p.name for p in (tmp_path / name).iterdir()) == [
            "concentration20-prior_weight0.1-temperature2",
            "concentration20-prior_weight0.5-temperature2",
        ]
    only_uniform = replace(cfg, methods=("mtbkd_map",), mtbkd_grid={"weights": ["uniform"]})
    res = distill.run_experiment(_tiny_dataset(seed=4), only_uniform, log=lambda m: None)
    assert res.method("mtbkd_map").hparams["weights"] == "uniform"
    torch.testing.assert_close(
        res.attribution["weights"], torch.full_like(res.attribution["weights"], 0.5)
    )


def test_bkds_reusing_a_uniform_mixture_choice_share_checkpoints_with_tuned_ones(tmp_path):
    # tune_bkd=False copies MT-BKD's choice to each teacher; one teacher ignores the weighting, so
    # its objective (and checkpoint) is the tuned BKD's, not a copy carrying `uniform`
    grid = [{"weights": ["uniform"], "prior_weight": [0.1]}]
    cfg = replace(TINY, methods=("bkd_lo", "mtbkd_sgld"), mtbkd_grid=grid, tune_bkd=False)
    ds = _tiny_dataset(seed=6)
    a = distill.run_experiment(ds, cfg, checkpoint_dir=tmp_path, log=lambda m: None)
    b = distill.run_experiment(
        ds, replace(cfg, tune_bkd=True), checkpoint_dir=tmp_path, log=lambda m: None
    )
    assert a.method("bkd_lo").hparams == b.method("bkd_lo").hparams
    torch.testing.assert_close(a.method("bkd_lo").probs, b.method("bkd_lo").probs)


def test_evaluate_probs_tells_a_calibrated_model_from_an_overconfident_one():
    g = torch.Generator().manual_seed(0)
    logits = 2.0 * torch.randn(1000, 4, generator=g)
    probs = torch.softmax(logits, -1)
    labels = torch.multinomial(probs, 1, generator=g).squeeze(1)  # calibrated by construction
    m = distill.evaluate_probs(probs, labels)
    floor = M.calibrated_ece(
        probs, distill.ECE_FLOOR_DRAWS, generator=torch.Generator().manual_seed(0)
    )
    assert m["ece_floor"] == pytest.approx(float(floor.mean()))
    assert 0.01 < m["ece_floor"] < 0.08 and m["ece"] > 0  # a calibrated model's ECE is not 0
    # over label sets drawn from the model, ece_p is about uniform: a test that keeps its level
    ps = torch.tensor(
        [
            distill.evaluate_probs(probs, torch.multinomial(probs, 1, generator=g)[:, 0])["ece_p"]
            for _ in range(40)
        ]
    )
    assert (ps < 0.05).float().mean() <= 0.2 and 0.3 < ps.mean() < 0.7
    sharp = distill.evaluate_probs(torch.softmax(3.0 * logits, -1), labels)
    # no draw reaches its ECE: the smallest Monte Carlo p-value, never 0
    assert sharp["ece"] > 3 * sharp["ece_floor"]
    conf = torch.softmax(3.0 * logits, -1).max(-1).values.mean()
    assert sharp["overconfidence"] == pytest.approx(float(conf) - sharp["accuracy"], abs=1e-6)
    assert sharp["overconfidence"] > 0.05  # sharpened: more confident than right
    assert sharp["ece_p"] == 1 / (1 + distill.ECE_FLOOR_DRAWS)
    # certain and always right: every draw ties the observed ECE of 0, and ties count (p = 1)
    sure = distill.evaluate_probs(torch.eye(4)[labels], labels)
    assert sure["ece"] == sure["ece_floor"] == 0.0 and sure["ece_p"] == 1.0
    assert distill.evaluate_probs(probs, labels) == m  # the fixed generator: the same numbers


def test_calibrate_tempers_every_method_on_the_validation_split_and_predict_applies_it(
    tmp_path, monkeypatch
):
    ds = _tiny_dataset(seed=5)
    ds = replace(ds, x_shift=np.zeros((6, ds.x_test.shape[1]), dtype=ds.x_test.dtype),
                 shift_name="the origin")  # fmt: skip
    cfg = replace(TINY, methods=("ce", "mtbkd_map", "mtbkd_sgld"), num_chains=2, calibrate=True)
    fits = []  # every temperature is fitted on the validation rows, never on the test rows
    fit = M.fit_temperature
    monkeypatch.setattr(M, "fit_temperature", lambda p, y: fits.append((p, y)) or fit(p, y))
    res = distill.run_experiment(ds, cfg, checkpoint_dir=tmp_path / "ck", log=lambda m: None)
    _, val, _, y_all = distill._split_dataset(ds, cfg)
    assert len(fits) == len(res.methods)
    for (p, y), m in zip(fits, res.methods, strict=True):
        assert torch.equal(y, y_all[val]) and p.shape[1] == len(val)
        assert p.shape[0] == (2 * cfg.num_samples if m.sampled else 1)
        assert m.hparams["predictive_temperature"] == fit(p, y)
    plain = distill.run_experiment(
        ds, replace(cfg, calibrate=False), checkpoint_dir=tmp_path / "ck", log=lambda m: None
    )  # the same training (read back from the checkpoints), no temperature
    y_te = torch.from_numpy(ds.y_test)
    for m, p in zip(res.methods, plain.methods, strict=True):
        t = m.hparams["predictive_temperature"]
        assert "predictive_temperature" not in p.hparams and p.raw_probs is None
        torch.testing.assert_close(m.raw_probs, p.probs)
        torch.testing.assert_close(m.probs, M.temper(p.probs, t))
        torch.testing.assert_close(m.shift_probs, M.temper(p.shift_probs, t))
        assert m.metrics["auroc_shift"] == distill.shift_auroc(m.probs, m.shift_probs)
        expected = {
            **distill.evaluate_probs(m.probs, y_te),
            "auroc_shift": m.metrics["auroc_shift"],
        }
        assert m.metrics == pytest.approx(expected, nan_ok=True)
        assert m.val_nll == p.val_nll  # the selection's NLL, untempered
        assert t != 1.0 and 0.05 <= t <= 20.0
    # the attribution is of the trained student, whatever the temperature
    torch.testing.assert_close(res.attribution["responsibilities"],
                               plain.attribution["responsibilities"])  # fmt: skip
    distill.save_run(res, tmp_path / "run", ds)
    meta = json.loads((tmp_path / "run" / "run.json").read_text())
    assert (
        meta["predictive_temperature"] == res.method("mtbkd_sgld").hparams["predictive_temperature"]
    )
    np.save(tmp_path / "x.npy", ds.x_test)
    distill.predict_file(tmp_path / "run", tmp_path / "x.npy", tmp_path / "p.csv")
    lines = (tmp_path / "p.csv").read_text().splitlines()
    saved = (tmp_path / "run" / "predictions.csv").read_text().splitlines()
    assert [r.split(",")[:5] for r in lines[1:]] == [r.split(",")[:5] for r in saved[1:]]
    distill.save_run(plain, tmp_path / "plain", ds)
    assert "predictive_temperature" not in json.loads((tmp_path / "plain" / "run.json").read_text())


def test_distill_calibrate_fits_the_temperature_on_the_validation_rows():
    x, y, t = halves_problem(12, seed=0)
    xv, yv, _ = halves_problem(10, seed=2)
    cfg = replace(CONFIG, sgld_epochs=3, num_samples=5, calibrate=True)
    with pytest.raises(ValueError, match="validation"):
        distill.distill(_student(), t, x, y, cfg, method="mtbkd_sgld")
    res = distill.distill(_student(), t, x, y, cfg, method="mtbkd_sgld", validation=(xv, yv))
    raw = distill.predict_probs(res.model, xv, res.store)
    assert res.temperature == pytest.approx(M.fit_temperature(raw, yv))
    torch.testing.assert_close(res.predict(xv), M.temper(raw, res.temperature))
    assert res.evaluate(xv, yv)["nll"] <= float(M.nll(raw, yv)) + 1e-6
    # calibrate() on a point estimate is classic temperature scaling
    ce = distill.distill(_student(), t, x, y, replace(cfg, calibrate=False), method="ce")
    assert ce.temperature == 1.0
    temp = ce.calibrate(xv, yv)
    assert temp == ce.temperature != 1.0
    torch.testing.assert_close(ce.predict(xv)[0], torch.softmax(ce.model(xv) / temp, -1))


def test_config_boolean_fields_must_be_booleans():
    for name in ("calibrate", "joint_selection", "early_stopping", "tune_bkd", "progress",
                 "sgld_precondition", "teacher_calibrate"):  # fmt: skip
        with pytest.raises(TypeError, match=name):
            distill.DistillConfig(**{name: 1})


QUICK = replace(CONFIG, map_epochs=3, sgld_epochs=2, num_samples=4)


class _BatchNormStudent(torch.nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.BatchNorm1d(16),
                                        torch.nn.ReLU(), torch.nn.Dropout(0.1))  # fmt: skip
        self.head = torch.nn.Linear(16, 4)
        self.to(dtype)

    def forward(self, x):
        return self.head(self.body(x))


def test_a_users_student_and_teachers_as_they_come():
    # found by an audit of the Python API: a batch-norm student failed before training (the
    # class-count probe ran one row in training mode); a frozen body was trained and unfrozen;
    # float64 models failed (x was made float32) and predict refused what distill took
    x, y, t = halves_problem(8, seed=5)
    torch.manual_seed(0)
    bn = _BatchNormStudent()
    res = distill.distill(bn, t, x, y, replace(QUICK, num_chains=2), method="mtbkd_sgld")
    assert bn.training  # the caller's mode kept (predict then switches to eval)
    assert res.predict(x).shape == (8, 32, 4)

    frozen = _BatchNormStudent()
    for p in frozen.body.parameters():
        p.requires_grad_(False)
    before = {k: v.clone() for k, v in frozen.body.state_dict().items()}
    res = distill.distill(frozen, t, x, y, replace(QUICK, num_chains=2), method="mtbkd_sgld")
    # the body is used, not trained: weights and batch-norm statistics as they were, in the
    # first chain and in the second (which drew only its head afresh)
    for k, v in frozen.body.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert [p.requires_grad for p in frozen.parameters()] == [False] * 4 + [True] * 2
    assert frozen.training  # its mode as it came (SGLD ends in eval)
    state1, _ = res.store.chains[1]  # the second chain's weights
    for k, v in before.items():
        assert torch.equal(state1[f"body.{k}"], v), k
    assert not torch.equal(state1["head.weight"], res.store.chains[0][0]["head.weight"])

    class Teacher(torch.nn.Module):
        def __init__(self, logits):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones((), dtype=torch.float64))
            self.logits = logits.double()

        def forward(self, inputs):
            assert inputs.dtype == torch.float64  # in the teacher's own dtype
            return self.logits[: inputs.shape[0]] * self.scale

    teachers = {"lo": Teacher(t[0]), "hi": Teacher(t[1]).train()}
    s64 = _BatchNormStudent(torch.float64)
    res = distill.distill(s64, teachers, x.double(), y.int(), QUICK, method="bkd_hi")
    assert res.objective.teachers == (1,) and teachers["hi"].training  # its mode restored
    p64 = res.predict(x.numpy())  # numpy, and float32 for a float64 student
    torch.testing.assert_close(p64, res.predict(x.double()))
    assert res.evaluate(x.numpy(), y.numpy()) == res.evaluate(x.double(), y)
    w, r = distill.teacher_attribution(res.predict(x), t, res.objective)
    assert w.shape == (1, 32) and torch.equal(w, torch.ones(1, 32))
    with pytest.raises(ValueError, match="teacher_logits must be \\[K, N=32, C=4\\]"):
        distill.teacher_attribution(res.predict(x), t[:, :5], res.objective)
    with pytest.raises(ValueError, match="a 'ce' objective has no responsibilities"):
        distill.teacher_attribution(res.predict(x), t, distill.Objective("ce"))


def test_bad_pipeline_inputs_name_the_argument():
    x, y, t = halves_problem(4, seed=6)

    class Pair(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 4)

        def forward(self, inputs):
            return self.lin(inputs), None

    for kwargs, exc, words in [
        (dict(y=y.float() + 0.7), TypeError, "y must hold integer class indices"),
        (dict(y=torch.where(y == 3, -100, y)), ValueError, r"y must lie in 0..3 .* got -100..2"),
        (dict(y=y + 1), ValueError, r"y must lie in 0..3"),
        (dict(x=x[:0], y=y[:0]), ValueError, "x has no rows"),
        (dict(config={"map_epochs": 1}), TypeError, "config must be a DistillConfig"),
        (dict(method="foo", teachers=None), ValueError, "unknown method 'foo'"),
        (dict(student=Pair()), TypeError, "student must return a logits tensor"),
        (dict(teachers=[Pair()]), TypeError, r"teachers\[0\] must return a logits tensor"),
        (dict(teachers=[t[0], t[1, :, :3]]), ValueError, "every teacher must give logits of one"),
        (dict(validation=(x, y.float() + 0.5)), TypeError, r"validation\[1\] must hold integer"),
    ]:
        args = dict(student=_student(), teachers=t, x=x, y=y, config=QUICK, method="mtbkd_map")
        args.update(kwargs)
        with pytest.raises(exc, match=words):
            distill.distill(**args)
    with pytest.raises(ValueError, match="num_threads must be non-negative"):
        distill.DistillConfig(num_threads=-3)
    everything_frozen = _student()
    everything_frozen.requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter that requires grad"):
        distill.distill(everything_frozen, t, x, y, QUICK, method="mtbkd_map")


def test_a_failed_run_gives_the_student_back_as_it_came(monkeypatch):
    # the flags and the mode were put back only on success
    x, y, t = halves_problem(4, seed=7)
    student = _BatchNormStudent()
    student.body.requires_grad_(False)
    student.eval()

    def broken(model, *args, **kwargs):
        model.train()
        model.requires_grad_(False)
        raise RuntimeError("interrupted")

    monkeypatch.setattr(distill, "train_sgld", broken)
    with pytest.raises(RuntimeError, match="interrupted"):
        distill.distill(student, t, x, y, QUICK, method="mtbkd_sgld")
    assert not student.training
    assert [p.requires_grad for p in student.parameters()] == [False] * 4 + [True] * 2


def test_ece_p_counts_a_tie_read_a_rounding_step_below():
    # found by an audit: the observed ECE and a calibrated draw of exactly the same value are
    # summed in different orders, and a draw one float32 step below was not counted
    ece = 0.1208391562
    draws = torch.tensor([0.1208391413, 0.05, 0.2], dtype=torch.float32)
    assert distill.ece_p_value(draws, ece) == 3 / 4
    assert distill.ece_p_value(torch.tensor([0.1, 0.05]), ece) == 1 / 3  # clearly below: not


def test_config_fields_are_checked_by_name_and_stored_as_python_numbers():
    # an audit: numpy floats were kept (report.json then failed after the whole experiment),
    # num_threads=10**6 crashed the process, inf learning rates and colliding grid values failed
    # after the MAP phase, and several fields gave raw Python errors naming nothing
    c = distill.DistillConfig(
        map_lr=np.float32(1e-2), batch_size=np.int64(8), burn_in=np.float64(0.2)
    )
    assert type(c.map_lr) is float and type(c.batch_size) is int and type(c.burn_in) is float
    json.dumps(c.to_dict())
    distill.DistillConfig(teacher_folds=0, teacher_calibrate=False)  # no folds, no calibration
    grid = distill.DistillConfig(mtbkd_grid={"prior_weight": (np.float32(0.5), np.int64(2))})
    assert grid.mtbkd_grid == {"prior_weight": (0.5, 2.0)}
    bad = [
        ({"num_threads": 10**6}, ValueError, "num_threads must be at most 1024"),
        ({"seed": 2**64}, ValueError, r"seed must lie in \[0, 2\*\*63\)"),
        ({"seed": -5}, ValueError, "seed must lie in"),
        ({"sgld_grid": (float("inf"),)}, ValueError, "sgld_grid values must be positive finite"),
        ({"sgld_prior_grid": (float("inf"),)}, ValueError, "sgld_prior_grid values must be"),
        ({"sgld_grid": 1e-3}, TypeError, "sgld_grid must be a list of numbers"),
        ({"sgld_grid": ("x",)}, ValueError, "sgld_grid values must be"),
        ({"sgld_grid": (True,)}, ValueError, "sgld_grid values must be"),
        ({"sgld_grid": (1e-3, 1.0000001e-3)}, ValueError, "agree to 6 digits"),
        ({"mtbkd_grid": {"prior_weight": (0.5, 0.5000001)}}, ValueError, "agree to 6 digits"),
        ({"hidden": (float("nan"),)}, ValueError, "hidden must list positive integer"),
        ({"hidden": 5}, ValueError, "hidden must list positive integer"),
        ({"burn_in": "0.1"}, TypeError, "burn_in must be a number"),
        ({"burn_in": False}, TypeError, "burn_in must be a number"),
        ({"teacher_other_fraction": None}, TypeError, "teacher_other_fraction must be a number"),
        ({"methods": (1,)}, TypeError, "methods must be a sequence of method names"),
        ({"methods": ()}, ValueError, "methods names no method"),
        ({"teacher_folds": 1}, ValueError, "teacher_folds must be 0 .* or at least 2"),
        ({"teacher_folds": 0}, ValueError, "with teacher_folds=0 set teacher_calibrate=False"),
    ]
    for change, err, match in bad:
        with pytest.raises(err, match=match):
            distill.DistillConfig(**change)


def test_runs_recheck_a_mutated_config_and_refuse_bad_inputs_before_training():
    x, y, t = halves_problem(6, seed=1)
    c = replace(QUICK)
    c.num_samples = 0  # set after construction: was a ZeroDivisionError after the MAP phase
    with pytest.raises(ValueError, match="num_samples must be at least 1"):
        distill.distill(_student(), t, x, y, c)
    with pytest.raises(ValueError, match="num_samples must be at least 1"):
        distill.run_experiment(_tiny_dataset(), c, log=lambda m: None)
    with pytest.raises(TypeError, match="config must be a DistillConfig, got dict"):
        distill.run_experiment(_tiny_dataset(), {}, log=lambda m: None)
    # a head without parameters, or of no name, before the MAP phase
    with pytest.raises(ValueError, match="head='nope' names no submodule"):
        distill.distill(_student(), t, x, y, QUICK, head="nope")
    with pytest.raises(ValueError, match="has no parameters to sample"):
        distill.distill(_student(), t, x, y, QUICK, head="body.1")
    with pytest.raises(ValueError, match="validation holds no rows"):
        distill.distill(_student(), t, x, y, QUICK, method="mtbkd_map", validation=(x[:0], y[:0]))
    # float64 teachers beyond float32's range: refused up front on the tensor path too
    t64 = t.double().clone()
    t64[0, 3, 1] = 1e39
    with pytest.raises(ValueError, match="teacher logits have NaN or infinite values"):
        distill.distill(_student(), t64, x, y, QUICK)
    # unsigned label dtypes work like the signed ones
    for dtype in (np.uint16, np.uint32, np.uint64):
        r = distill.distill(_student(), t, x, y.numpy().astype(dtype), QUICK, method="ce")
        assert r is not None


def test_batch_norm_last_batch_of_one_row_and_bad_arguments_are_refused_up_front():
    # an audit: a batch-norm student crashed in the MAP phase when N % batch_size == 1; method
    # None and 1-D or numpy probabilities were raw AttributeError / IndexError
    x, y, t = halves_problem(6, seed=1)
    n = x.shape[0]
    with pytest.raises(ValueError, match="leaves a last batch of one row"):
        distill.distill(_BatchNormStudent(), t[:, : n - 3], x[: n - 3], y[: n - 3],
                        replace(QUICK, batch_size=(n - 4)), method="ce")  # fmt: skip
    with pytest.raises(ValueError, match="unknown method None"):
        distill.distill(_student(), t, x, y, QUICK, method=None)
    with pytest.raises(ValueError, match=r"probs must have shape \[S, N, C\] or \[N, C\]"):
        distill.evaluate_probs(torch.tensor([0.5, 0.5]), torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="probs must be a torch.Tensor"):
        distill.evaluate_probs(np.full((2, 2), 0.5), torch.tensor([0, 1]))


# ---------------------------------------------------------------------------------------------
# Session 32: a checklist audit of the pipeline (each test failed on the code before)
# ---------------------------------------------------------------------------------------------

SMALL = replace(QUICK, hidden=(8,), map_epochs=3, sgld_epochs=3, num_samples=5)


def _small_student(seed=0, classes=4):
    torch.manual_seed(seed)
    return distill.StudentMLP(2, classes, (8,))


def test_evaluate_and_calibrate_take_the_whole_number_float_labels_distill_takes():
    x, y, t = halves_problem(10, seed=0)
    res = distill.distill(_small_student(), t, x, y.float(), SMALL, method="mtbkd_map")
    ref = res.evaluate(x, y)
    assert res.evaluate(x, y.float()) == pytest.approx(ref, nan_ok=True)
    assert res.evaluate(x, y.double().numpy()) == pytest.approx(ref, nan_ok=True)
    res.calibrate(x, y.float())
    with pytest.raises(ValueError, match="y must be"):
        res.evaluate(x, y[:-1])  # its own name and the row count, not evaluate_probs' terms


def test_distill_takes_features_that_carry_an_autograd_graph():
    x, y, t = halves_problem(10, seed=0)
    encoder = nn.Linear(2, 2)
    features = encoder(x)  # an encoder's output, computed outside torch.no_grad()
    distill.distill(_small_student(), t, features, y, SMALL, method="mtbkd_map")
    assert encoder.weight.grad is None  # nor was the caller's graph trained through


def test_a_validation_split_of_the_wrong_width_is_refused_before_training(monkeypatch):
    class Net(nn.Module):  # no in_features the pipeline can read
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Flatten(), nn.Linear(2, 8), nn.ReLU())
            self.head = nn.Linear(8, 4)

        def forward(self, x):
            return self.head(self.body(x))

    x, y, t = halves_problem(10, seed=0)
    calls = []
    monkeypatch.setattr(distill, "train_map", lambda *a, **k: calls.append(1))
    cfg = replace(SMALL, early_stopping=False, calibrate=True)
    with pytest.raises(ValueError, match=r"validation\[0\] has 3 features; x has 2"):
        distill.distill(Net(), t, x, y, cfg, validation=(torch.randn(8, 3), y[:8]))
    assert not calls


def test_a_refused_checkpoint_leaves_the_student_unchanged(tmp_path):
    x, y, _ = halves_problem(10, seed=0)
    distill.distill(_small_student(), None, x, y, SMALL, method="ce", checkpoint_dir=tmp_path)
    other = _small_student(seed=1, classes=5)  # the same body, another head
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(distill.CheckpointMismatchError):
        distill.distill(other, None, x, y, SMALL, method="ce", checkpoint_dir=tmp_path)
    for k, v in other.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_train_sgld_gives_the_flags_and_modes_back_when_it_fails(tmp_path):
    x, y, t = halves_problem(10, seed=0)
    obj = distill.Objective("mtbkd", (0, 1))
    data = distill.TrainData(x, y, t)
    first = _small_student()
    distill.train_map(first, data, obj, SMALL)
    distill.train_sgld(first, data, obj, SMALL, checkpoint_dir=tmp_path)
    model = _small_student()
    model.train()
    with pytest.raises(distill.CheckpointMismatchError):
        distill.train_sgld(model, data, obj, SMALL, sgld_lr=1e-2, checkpoint_dir=tmp_path)
    assert all(p.requires_grad for p in model.parameters())
    assert all(m.training for m in model.modules())


@pytest.mark.parametrize("kind", ["zip", "pickle", "list", "dict"])
def test_a_checkpoint_that_is_not_ours_is_a_checkpoint_error(tmp_path, kind):
    import zipfile

    x, y, _ = halves_problem(10, seed=0)
    path = tmp_path / "map.pt"
    if kind == "zip":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("notes.txt", "hello")
    elif kind == "pickle":
        torch.save({"model": nn.Linear(2, 2)}, path)  # a whole module: weights_only refuses it
    elif kind == "list":
        torch.save([1, 2, 3], path)
    else:
        torch.save({"model": {}}, path)
    with pytest.raises(distill.CheckpointCorruptError, match="not a checkpoint of this pipeline"):
        distill.distill(_small_student(), None, x, y, SMALL, method="ce", checkpoint_dir=tmp_path)


def test_complex_boolean_and_text_teacher_logits_are_refused():
    import warnings

    x, y, t = halves_problem(10, seed=0)
    for bad, name in (
        (torch.complex(t, torch.ones_like(t)), "teacher logits"),
        (t > 0, "teacher logits"),
        ([t[0], t[1] > 0], r"teachers\[1\]"),
        ([t[0], [["a"] * 4] * len(y)], r"teachers\[1\] must be logits"),
    ):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(TypeError, match=name):
                distill.distill(_small_student(), bad, x, y, SMALL, method="mtbkd_map")


def test_a_seed_whose_further_chains_would_overflow_is_refused_up_front():
    with pytest.raises(ValueError, match=r"seed must lie in \[0, 2\*\*63 - 1\)"):
        replace(SMALL, seed=2**63 - 1, num_chains=2)
    assert replace(SMALL, seed=2**63 - 2, num_chains=2).seed == 2**63 - 2
    assert replace(SMALL, seed=2**63 - 1, num_chains=1).seed == 2**63 - 1


def test_grid_settings_of_one_checkpoint_folder_across_grid_parts_are_refused():
    with pytest.raises(ValueError, match="6 digits"):
        distill.DistillConfig(mtbkd_grid=[{"concentration": [5.0]}, {"concentration": [5.0000001]}])
    with pytest.raises(ValueError, match="6 digits"):  # a part that keeps the field's value
        distill.DistillConfig(concentration=5.0000001, mtbkd_grid=[{"concentration": [5.0]}, {}])
    # the very same setting twice is one setting
    distill.DistillConfig(mtbkd_grid=[{"concentration": [5.0]}, {"concentration": [5.0]}])


def test_a_float64_students_samples_are_kept_in_float64():
    x, y, t = halves_problem(10, seed=0)
    cfg = replace(SMALL, num_samples=9)  # 3 epochs x 3 batches: the last step is the last sample
    res = distill.distill(_small_student().double(), t.double(), x.double(), y, cfg)
    last = res.store.buffer[len(res.store) - 1]
    head = torch.cat([res.model.head.weight.detach().reshape(-1), res.model.head.bias.detach()])
    assert last.dtype == torch.float64 and torch.equal(last, head)


def test_integer_fields_beyond_int64_are_refused_up_front():
    # --set batch_size=1e300 passed, then torch.split overflowed in the middle of training
    for name in ("batch_size", "map_epochs", "num_samples"):
        with pytest.raises(ValueError, match=f"{name} must be below 2\\*\\*62"):
            replace(SMALL, **{name: 1e300})


def test_predict_file_block_rows_must_be_an_integer(tmp_path):
    for bad in (True, 2.5):  # True was one row a block; 2.5 a TypeError after loading the run
        with pytest.raises(TypeError, match="block_rows must be an integer"):
            distill.predict_file(
                tmp_path, tmp_path / "in.csv", tmp_path / "out.csv", block_rows=bad
            )


def test_teacher_attribution_and_mixtures_take_numpy_inputs():
    x, y, t = halves_problem(10, seed=0)
    res = distill.distill(_small_student(), t, x, y, SMALL, method="mtbkd_map")
    probs = res.predict(x)
    w, r = distill.teacher_attribution(probs.numpy(), t.numpy(), res.objective)
    w0, r0 = distill.teacher_attribution(probs, t, res.objective)
    assert torch.equal(w, w0) and torch.equal(r, r0)
    assert distill.teacher_mixtures(t, y.numpy()) == distill.teacher_mixtures(t, y)
    assert distill.teacher_mixtures(t, y.double()) == distill.teacher_mixtures(t, y)
