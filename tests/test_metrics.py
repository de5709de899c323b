"""Uncertainty metrics (MATH.md section 8) against hand-computed examples."""

import math

import numpy as np
import pytest
import torch

from mtbkd import metrics as M

# Two posterior samples, three rows, three classes.
Q = torch.tensor(
    [
        [[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.3, 0.3, 0.4]],
        [[0.5, 0.4, 0.1], [0.3, 0.2, 0.5], [0.2, 0.2, 0.6]],
    ]
)
Y = torch.tensor([0, 2, 1])
# p_bar rows: [0.6, 0.3, 0.1], [0.2, 0.4, 0.4], [0.25, 0.25, 0.5]


def _h(p):
    return -sum(x * math.log(x) for x in p if x > 0)


def test_accuracy():
    # argmax p_bar: 0 (right), 1 (ties broken to the first max: wrong), 2 (wrong).
    assert M.accuracy(Q, Y).item() == pytest.approx(1 / 3)
    assert M.accuracy(Q[0], Y).item() == pytest.approx(1 / 3)


def test_nll_is_log_of_mean_not_mean_of_log():
    expected = -(math.log(0.6) + math.log(0.4) + math.log(0.25)) / 3
    assert M.nll(Q, Y).item() == pytest.approx(expected, rel=1e-6)
    mean_of_logs = -(math.log(0.7) + math.log(0.5) + math.log(0.3) + math.log(0.5)
                     + math.log(0.3) + math.log(0.2)) / 6  # fmt: skip
    assert abs(M.nll(Q, Y).item() - mean_of_logs) > 0.01
    # Probability exactly 0 stays finite: floored 1 nat below the log of the smallest float32
    # subnormal (before: at the smallest normal number, above every subnormal's NLL)
    zero = M.nll(torch.tensor([[1.0, 0.0]]), torch.tensor([1])).item()
    fi = torch.finfo(torch.float32)
    assert zero == pytest.approx(1.0 - math.log(fi.tiny * fi.eps))
    # a subnormal probability is not floored: an fp32 softmax with a logit gap of 95
    p = torch.softmax(torch.tensor([[95.0, 0.0]]), -1)
    assert 0 < p[0, 1].item() < torch.finfo(torch.float32).tiny
    assert M.nll(p, torch.tensor([1])).item() == pytest.approx(95.0, rel=1e-6)
    two = torch.stack([p, torch.softmax(torch.tensor([[94.0, 0.0]]), -1)])
    expected = -math.log((math.exp(-95.0) + math.exp(-94.0)) / 2)
    assert M.nll(two, torch.tensor([1])).item() == pytest.approx(expected, rel=1e-5)
    # the per-row terms it averages
    rows = M.row_nll(Q, Y)
    assert rows.tolist() == pytest.approx([-math.log(0.6), -math.log(0.4), -math.log(0.25)])


def test_brier():
    rows = [(0.6 - 1) ** 2 + 0.3**2 + 0.1**2, 0.2**2 + 0.4**2 + (0.4 - 1) ** 2,
            0.25**2 + (0.25 - 1) ** 2 + 0.5**2]  # fmt: skip
    assert M.brier(Q, Y).item() == pytest.approx(sum(rows) / 3, rel=1e-6)


def test_ece_hand_example_and_right_closed_bins():
    # C = 4; confidences 0.4, 0.41, 0.9, 0.92. Bins of width 1/15: 0.4 = 6/15 closes bin 5
    # (5/15, 6/15]; 0.41 is in bin 6; 0.9 and 0.92 share bin 13 (13/15, 14/15].
    p = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.41, 0.39, 0.1, 0.1], [0.9, 0.05, 0.03, 0.02],
                      [0.92, 0.04, 0.02, 0.02]])  # fmt: skip
    y = torch.tensor([0, 1, 0, 3])  # right, wrong, right, wrong
    expected = (1 / 4) * abs(1 - 0.4) + (1 / 4) * abs(0 - 0.41) + (2 / 4) * abs(0.5 - 0.91)
    assert M.ece(p, y).item() == pytest.approx(expected, rel=1e-6)
    # Were 0.4 in bin 6 with 0.41, the result would be different.
    merged = (2 / 4) * abs(0.5 - 0.405) + (2 / 4) * abs(0.5 - 0.91)
    assert abs(M.ece(p, y).item() - merged) > 0.05


def test_ece_one_bin():
    # One bin: ECE = |accuracy - mean confidence|.
    assert M.ece(Q, Y, n_bins=1).item() == pytest.approx(abs(1 / 3 - (0.6 + 0.4 + 0.5) / 3))


def test_rows_must_sum_to_one():
    y = torch.tensor([0, 1])
    logits = torch.tensor([[2.0, 0.5, 0.1], [0.3, 0.2, 0.9]])  # non-negative, but not probabilities
    for f in (M.nll, M.ece, M.brier, M.accuracy):
        with pytest.raises(ValueError, match=r"probs must be probabilities whose rows sum to 1"):
            f(logits, y)
    with pytest.raises(ValueError, match="row 0 sums to 0"):
        M.ece(torch.zeros(2, 3), y)
    bad = Q.clone()
    bad[1, 2] *= 0.9
    with pytest.raises(ValueError, match=r"sample 1, row 2 sums to 0\.9"):
        M.mutual_information(bad)
    # rounding of the dtype is allowed: a softmax over 50k classes stored in bfloat16
    q16 = torch.randn(4, 50_000).mul(3).softmax(-1).bfloat16()
    assert (q16.float().sum(-1) - 1).abs().max() > 1e-4
    assert torch.isfinite(M.nll(q16, torch.zeros(4, dtype=torch.long)))


def test_entropies_mutual_information_and_mean_deviance():
    pbar = [[0.6, 0.3, 0.1], [0.2, 0.4, 0.4], [0.25, 0.25, 0.5]]
    h_pbar = [_h(r) for r in pbar]
    e_h = [(_h(Q[0, i].tolist()) + _h(Q[1, i].tolist())) / 2 for i in range(3)]
    torch.testing.assert_close(M.predictive_entropy(Q), torch.tensor(h_pbar))
    torch.testing.assert_close(M.expected_entropy(Q), torch.tensor(e_h))
    torch.testing.assert_close(M.mutual_information(Q), torch.tensor(h_pbar) - torch.tensor(e_h))
    torch.testing.assert_close(M.mean_deviance(Q), 2 * torch.tensor(e_h))
    # One sample: no epistemic part.
    torch.testing.assert_close(M.mutual_information(Q[0]), torch.zeros(3))
    # Rounding never makes it negative.
    same = torch.tensor([[0.3, 0.7]]).expand(5, 1, 2)
    assert 0.0 <= M.mutual_information(same).item() < 1e-12  # rounding at most, never below 0
    assert M.predictive_entropy(torch.tensor([[1.0, 0.0]])).item() == 0.0


def test_mutual_information_is_clamped_where_rounding_makes_it_negative():
    # Identical samples: H[p_bar] - E_s H[q^(s)] is 0, but the fp32 mean of 6 or 7 copies of
    # these rows rounds so that the difference is about -1e-7 (MATH.md section 8: clamped at 0).
    rows = torch.tensor([[0.1, 0.1, 0.8], [0.1, 0.6, 0.3], [0.1, 0.7, 0.2]])
    for s in (6, 7):
        same = rows.expand(s, 3, 3)
        raw = M.predictive_entropy(same) - M.expected_entropy(same)
        assert raw.min().item() < 0.0  # the case needs the clamp
        mi = M.mutual_information(same)
        assert (mi >= 0).all()
        torch.testing.assert_close(mi, raw.clamp_min(0.0), atol=0.0, rtol=0.0)


def test_credible_set_hand_example():
    # Row 0: samples [0.7, 0.2, 0.1] and [0.5, 0.45, 0.05]. f(u) = (1/2) sum q 1[q >= u]:
    # u in (0.05, 0.1] gives (0.7 + 0.5 + 0.45 + 0.2 + 0.1) / 2 = 0.975 >= 0.95 and
    # u in (0.1, 0.2] gives 0.925, so u = 0.1; p_bar = [0.6, 0.325, 0.075] -> set {0, 1}.
    # Row 1: one confident class in both samples: u = 0.96 -> set {2}.
    q = torch.tensor([[[0.7, 0.2, 0.1], [0.02, 0.02, 0.96]],
                      [[0.5, 0.45, 0.05], [0.02, 0.02, 0.96]]])  # fmt: skip
    u = M.credible_threshold(q)
    torch.testing.assert_close(u, torch.tensor([0.1, 0.96]), atol=1e-6, rtol=0)
    sets = M.credible_set(q)
    assert sets.tolist() == [[True, True, False], [False, False, True]]
    cov, size = M.credible_set_summary(q, torch.tensor([2, 2]))
    assert cov.item() == 0.5 and size.item() == 1.5


def test_credible_set_when_the_level_is_reached_exactly_and_at_level_one():
    # p = [1/2, 1/4, 1/8, 1/8] (exact in binary): f(u) = 0.75 exactly for u in (1/8, 1/4], so
    # u = 1/4 solves f(u) = 0.75 and the set is the two top classes, not all four (MATH.md 8)
    q = torch.tensor([[0.5, 0.25, 0.125, 0.125], [0.5, 0.5, 0.0, 0.0]])
    assert M.credible_set(q, 0.75)[0].tolist() == [True, True, False, False]
    torch.testing.assert_close(M.credible_threshold(q, 0.75)[0], torch.tensor(0.25))
    # level 1 (allowed: (0, 1]): every class with probability > 0, and no class without
    assert M.credible_set(q, 1.0).tolist() == [[True] * 4, [True, True, False, False]]
    # ... also when the row's float probabilities sum to just under 1 (before: every class)
    short = torch.tensor([[0.6023842692375183, 0.15841348469257355, 0.23920221626758575, 0.0]])
    assert float(short.sum()) < 1.0
    assert M.credible_set(short, 1.0).tolist() == [[True, True, True, False]]
    g = torch.Generator().manual_seed(0)
    soft = torch.softmax(torch.randn(1000, 6, generator=g), -1)
    rows = torch.cat([soft, torch.zeros(1000, 1)], -1)  # fp32 softmax rows: sums 1 ± 1e-7
    sets = M.credible_set(rows, 1.0)
    assert not sets[:, -1].any() and sets[:, :-1].all()
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="level must be in"):
            M.credible_threshold(q, bad)


def test_credible_threshold_matches_exact_sort():
    torch.manual_seed(0)
    q = torch.softmax(torch.randn(6, 40, 10) * 2, -1)
    u = M.credible_threshold(q, 0.9)
    # Exact: sort all S*C values of a row, the threshold is the value at which the cumulative
    # mass (divided by S) first reaches the level.
    for i in range(40):
        v = q[:, i].flatten().double().sort(descending=True).values
        k = int(torch.nonzero(v.cumsum(0) / 6 >= 0.9)[0])
        assert u[i].item() == pytest.approx(v[k].item(), abs=1e-6)


def test_credible_set_of_identical_samples_is_the_set_of_one():
    # the fp32 mean of three copies of 0.11 rounds a step below 0.11, the threshold: the class
    # at the threshold was dropped, leaving a set of mass 0.88 < 0.95
    q = torch.tensor([[0.01, 0.11, 0.88]])
    assert M.credible_set(q).tolist() == [[False, True, True]]
    for s in (2, 3, 5, 6, 7, 10):
        assert M.credible_set(q.expand(s, 1, 3).contiguous()).tolist() == [[False, True, True]]
    g = torch.Generator().manual_seed(0)
    rows = torch.softmax(3 * torch.randn(2000, 6, generator=g), -1)
    for dtype in (torch.float32, torch.float64):
        one = M.credible_set(rows.to(dtype))
        for s in (3, 7):
            assert torch.equal(M.credible_set(rows.to(dtype).expand(s, -1, -1)), one)


def test_credible_threshold_is_exactly_a_sample_value():
    # bisection to 2^-40 let a class 1e-13 below the threshold into the set
    q = torch.tensor([[0.5, 0.5 - 1e-13, 1e-13]], dtype=torch.float64)
    assert M.credible_threshold(q, 0.5).item() == 0.5
    assert M.credible_set(q, 0.5).tolist() == [[True, False, False]]
    # many small probabilities (thresholds near 1e-6): the set is what an exact sort gives
    g = torch.Generator().manual_seed(1)
    q = torch.softmax(torch.randn(2, 3, 20000, generator=g), -1)
    u = M.credible_threshold(q, 0.9)
    for i in range(3):
        v = q[:, i].flatten().double().sort(descending=True).values
        k = int(torch.nonzero(v.cumsum(0) >= 0.9 * v.sum())[0])
        assert u[i].item() == v[k].item()
    assert M.credible_threshold(q, 0.9).dtype == torch.float32


def test_auroc_hand_examples_and_pairwise_definition():
    assert M.auroc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1])).item() == 0.75
    assert M.auroc(torch.tensor([0.5, 0.5]), torch.tensor([True, False])).item() == 0.5
    assert M.auroc(torch.tensor([3.0, 1.0, 2.0]), torch.tensor([1, 0, 1])).item() == 1.0
    torch.manual_seed(1)
    s = torch.randint(0, 20, (500,)).float()  # many ties
    pos = torch.rand(500) < s / 25
    # Definition: P(score_pos > score_neg) + P(tie) / 2 over all positive-negative pairs.
    d = s[pos][:, None] - s[~pos][None, :]
    expected = ((d > 0).double().mean() + 0.5 * (d == 0).double().mean()).item()
    assert M.auroc(s, pos).item() == pytest.approx(expected, abs=1e-6)
    assert M.auroc(s, pos.float()).item() == M.auroc(s, pos).item()  # 0./1. floats are labels
    with pytest.raises(ValueError, match="positives must be boolean or hold only 0 and 1"):
        M.auroc(torch.tensor([0.1, 0.4, 0.3]), torch.tensor([0.2, 0.0, 1.0]))  # before: 0.2 -> True


def test_bad_inputs():
    with pytest.raises(ValueError, match="probs contains non-finite"):
        M.accuracy(torch.tensor([[float("nan"), 1.0]]), torch.tensor([0]))
    with pytest.raises(ValueError, match="probs contains negative"):
        M.brier(torch.tensor([[-0.1, 1.1]]), torch.tensor([0]))
    with pytest.raises(ValueError, match="labels must be in"):
        M.nll(Q, torch.tensor([0, 1, 3]))
    with pytest.raises(ValueError, match="labels must have shape"):
        M.ece(Q, torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="labels must be an integer"):
        M.accuracy(Q, torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(TypeError, match="labels must be an integer"):
        M.nll(Q, torch.tensor([True, False, True]))
    # every integer dtype is an integer tensor (uint16-64 were refused as "not an integer")
    for dtype in (torch.uint16, torch.uint32, torch.uint64, torch.int8):
        assert M.nll(Q, Y.to(dtype)) == M.nll(Q, Y), dtype
    with pytest.raises(ValueError, match="probs must have shape"):
        M.predictive_entropy(torch.rand(3))
    with pytest.raises(ValueError, match="level"):
        M.credible_set(Q, level=1.5)
    with pytest.raises(ValueError, match="both positive and negative"):
        M.auroc(torch.rand(4), torch.ones(4))
    with pytest.raises(ValueError, match="n_bins"):
        M.ece(Q, Y, n_bins=0)


def test_calibrated_ece_is_the_finite_sample_floor_of_a_calibrated_model():
    g = torch.Generator().manual_seed(0)
    # certain and right by construction: every draw is right, ECE 0
    sure = torch.eye(3)[torch.tensor([0, 1, 2, 1])]
    assert torch.equal(M.calibrated_ece(sure, 50, generator=g), torch.zeros(50))
    # one bin at confidence 0.5: a draw's ECE is |mean of N Bernoulli(0.5) - 0.5|, whose mean
    # is sqrt(0.25 / N) sqrt(2 / pi)
    n = 20000
    half = torch.full((n, 2), 0.5)
    draws = M.calibrated_ece(half, 2000, generator=g)
    assert draws.shape == (2000,)
    assert draws.mean().item() == pytest.approx(
        math.sqrt(0.25 / n) * math.sqrt(2 / math.pi), rel=0.05
    )
    # [S, N, C] samples are averaged first; a seeded generator repeats its draws
    a = M.calibrated_ece(Q, 30, generator=torch.Generator().manual_seed(3))
    b = M.calibrated_ece(Q.mean(0), 30, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    # more draws than one chunk holds give the same distribution (chunking by rows x draws)
    big = M.calibrated_ece(torch.full((300000, 2), 0.5), 30, generator=g)
    expected = math.sqrt(0.25 / 300000) * math.sqrt(2 / math.pi)
    assert big.shape == (30,) and bool((big > 0).all())
    assert big.mean().item() == pytest.approx(expected, rel=0.25)
    # a draw is the ECE of labels that are right exactly where the draw's Bernoulli is: the
    # binning of ece, confidences on the bin edges k/15 included
    conf = torch.tensor([1 / 15, 2 / 15, 0.5, 7 / 15, 8 / 15, 0.9, 14 / 15, 1.0, 0.6, 0.75])
    probs = torch.stack([conf, 1 - conf], -1)
    pred = probs.argmax(-1)
    drawn = M.calibrated_ece(probs, 6, generator=torch.Generator().manual_seed(5))
    right = torch.bernoulli(
        probs.max(-1).values.expand(6, -1), generator=torch.Generator().manual_seed(5)
    )
    for d in range(6):
        labels = torch.where(right[d].bool(), pred, 1 - pred)
        assert drawn[d].item() == pytest.approx(M.ece(probs, labels).item(), abs=1e-7)
    for bad in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match="draws"):
            M.calibrated_ece(Q, bad)
    with pytest.raises(ValueError, match="n_bins"):
        M.calibrated_ece(Q, 10, n_bins=0)


def test_temper_is_softmax_of_the_logits_over_t_and_inverts():
    g = torch.Generator().manual_seed(0)
    z = 3 * torch.randn(4, 9, 5, generator=g, dtype=torch.float64)
    q = torch.softmax(z, -1)
    for t in (0.3, 1.0, 2.5):
        torch.testing.assert_close(M.temper(q, t), torch.softmax(z / t, -1))
        # [N, C] stays [N, C]; fp32 stays fp32
        torch.testing.assert_close(M.temper(q[0].float(), t), torch.softmax(z[0] / t, -1).float())
        assert M.temper(q[0].float(), t).dtype == torch.float32
    torch.testing.assert_close(M.temper(M.temper(q, 0.4), 1 / 0.4), q)
    assert torch.equal(M.temper(q, 1.0), q)
    # an exact 0 stays finite (floored as in nll): the row still sums to 1
    zero = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]])
    for t in (0.2, 5.0):
        out = M.temper(zero, t)
        assert bool(torch.isfinite(out).all())
        torch.testing.assert_close(out.sum(-1), torch.ones(2))
    # an exact 0 stays below a subnormal probability at any temperature (fp32 and fp64 alike)
    for dt in (torch.float32, torch.float64):
        tiny = torch.finfo(dt).tiny * torch.finfo(dt).eps  # the smallest subnormal
        row = torch.tensor([[1.0 - 2 * tiny, 2 * tiny, 0.0]], dtype=dt)
        for t in (0.5, 20.0):
            out = M.temper(row, t)[0]
            assert out.dtype == dt and out[1] >= out[2]
        big = M.temper(row, 20.0)[0].double()  # 2 tiny^(1/20) against exactly 0: order kept
        assert big[1] > big[2]
    # numpy and 0-d tensor temperatures are numbers too
    import numpy as np

    torch.testing.assert_close(M.temper(q, np.float32(0.5)), M.temper(q, 0.5))
    torch.testing.assert_close(M.temper(q, torch.tensor(0.5)), M.temper(q, 0.5))
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            M.temper(q, bad)
    for bad in (True, "2", torch.ones(2)):
        with pytest.raises(TypeError, match="temperature"):
            M.temper(q, bad)


def test_fit_temperature_recovers_the_temperature_that_generated_the_labels():
    g = torch.Generator().manual_seed(1)
    z = 2 * torch.randn(20000, 6, generator=g, dtype=torch.float64)
    for true_t in (0.5, 2.0):
        # labels drawn from softmax(z / T): the model softmax(z) needs temperature T
        y = torch.multinomial(torch.softmax(z / true_t, -1), 1, generator=g).squeeze(-1)
        t = M.fit_temperature(torch.softmax(z, -1), y)
        assert t == pytest.approx(true_t, rel=0.05)


def test_fit_temperature_is_not_pulled_to_its_bound_by_a_zero_probability():
    # one validation row whose label has probability exactly 0: nll floors it at a constant,
    # but the fit divided its fp64 floor (-745) by T and ran to the upper bound
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(3 * torch.randn(200, 5, generator=g), -1)
    y = torch.multinomial(p, 1, generator=g).squeeze(1)
    clean = M.fit_temperature(p[1:], y[1:])
    p[0] = torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0])
    y[0] = 0
    t = M.fit_temperature(p, y)
    grid = torch.exp(torch.linspace(math.log(0.05), math.log(20.0), 2001, dtype=torch.float64))
    nlls = torch.stack([M.nll(M.temper(p, float(s)), y) for s in grid])
    assert t == pytest.approx(float(grid[nlls.argmin()]), rel=0.01)
    assert t == pytest.approx(clean, rel=0.05) and t < 2.0
    assert float(M.nll(M.temper(p, t), y)) <= float(nlls.min()) + 1e-6


def test_fit_temperature_minimises_the_nll_of_the_tempered_pool():
    g = torch.Generator().manual_seed(2)
    z = torch.randn(1, 300, 4, generator=g, dtype=torch.float64)
    # three samples that disagree: their pool is under-confident, and T < 1 sharpens it
    q = torch.softmax(4 * z + torch.randn(3, 300, 4, generator=g, dtype=torch.float64), -1)
    y = (4 * z[0]).argmax(-1)
    t = M.fit_temperature(q, y)
    grid = torch.exp(torch.linspace(math.log(0.05), math.log(20.0), 2001, dtype=torch.float64))
    nlls = torch.stack([M.nll(M.temper(q, float(s)), y) for s in grid])
    best = float(grid[nlls.argmin()])
    assert t == pytest.approx(best, rel=0.01)
    assert float(M.nll(M.temper(q, t), y)) <= float(nlls.min()) + 1e-9
    assert t < 1.0 and float(M.nll(M.temper(q, t), y)) < float(M.nll(q, y))
    # the same as the teachers' temperature scaling of logits, for one sample
    from mtbkd.distill import fit_teacher_temperature

    one = M.fit_temperature(torch.softmax(z[0], -1), y)
    assert one == pytest.approx(fit_teacher_temperature(z[0], y), rel=1e-6)
    # a perfectly separable set: the NLL keeps falling as T shrinks, so T sits at the bound
    assert M.fit_temperature(torch.softmax(z[0], -1), z[0].argmax(-1)) == pytest.approx(
        0.05, rel=1e-6
    )
    for bad in ((1.0, 1.0), (2.0, 1.0), (0.0, 1.0), (1.0,), 3.0):
        with pytest.raises(ValueError, match="bounds"):
            M.fit_temperature(q, y, bounds=bad)
    with pytest.raises(ValueError, match="labels"):
        M.fit_temperature(q, y[:-1])


def test_nll_of_an_exact_zero_is_worse_than_of_any_positive_probability():
    # found by an audit: 0 was floored at log(finfo.tiny), the smallest NORMAL number, so a
    # probability of 0 on the label scored a lower NLL than a subnormal 1e-40 did
    y = torch.tensor([1])
    for dt in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        compute = torch.float64 if dt == torch.float64 else torch.float32  # fp16 / bf16: fp32
        fi = torch.finfo(compute)
        zero = M.nll(torch.tensor([[1.0, 0.0]], dtype=dt), y).item()
        assert zero == pytest.approx(1.0 - math.log(fi.tiny * fi.eps)), dt
        smallest = torch.finfo(dt).tiny * torch.finfo(dt).eps  # the dtype's smallest subnormal
        for p in (smallest, 1e-40 if dt == torch.float32 else smallest, torch.finfo(dt).tiny):
            row = torch.tensor([[1.0 - p, p]], dtype=dt)
            assert float(row[0, 1]) > 0, (dt, p)
            assert M.nll(row, y).item() < zero, (dt, p)
            assert math.isfinite(zero)
    # per sample too: samples that all put 0 on the label score worse than if one put 1e-40
    two = torch.tensor([[[1.0, 0.0]], [[1.0, 0.0]]])
    sub = torch.tensor([[[1.0, 1e-40]], [[1.0, 0.0]]])
    assert M.row_nll(two, y).item() > M.row_nll(sub, y).item()


def test_ece_sums_in_float64_on_a_million_rows():
    # found by an audit: bin sums were accumulated by bincount with float32 weights, so every
    # row at confidence 0.95 with exactly 95 % right scored ECE 8e-3 at N = 1e6 (truth ~1e-8)
    n = 1_000_000
    conf = torch.full((n,), 0.95)
    probs = torch.stack([conf, 1 - conf], 1)
    labels = torch.zeros(n, dtype=torch.long)
    labels[: n // 20] = 1  # exactly 95 % right
    exact = abs(0.95 - float(conf[0]))  # the fp32 confidence is 0.95 - 1.2e-8
    got = M.ece(probs, labels)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(exact, abs=1e-9)
    # fp64 input: fp64 confidences in the sums (bins still chosen on the fp32 confidence)
    got64 = M.ece(torch.tensor([[0.95, 0.05]], dtype=torch.float64).expand(n, 2), labels)
    assert got64.dtype == torch.float64 and got64.item() < 1e-12
    # the calibrated-model floor: mean |Binomial(N, 0.95) / N - 0.95| = sqrt(0.95 * 0.05 / N)
    # sqrt(2 / pi) = 1.7e-4 (before: ~8e-3, the rounding of the fp32 confidence sum)
    draws = M.calibrated_ece(probs, 24, generator=torch.Generator().manual_seed(0))
    assert draws.dtype == torch.float32
    expected = math.sqrt(0.95 * 0.05 / n) * math.sqrt(2 / math.pi)
    assert draws.mean().item() == pytest.approx(expected, rel=0.5)


def test_numpy_integers_and_level_type_checks():
    # found by an audit: n_bins / draws of a numpy integer type were refused, and a level given
    # as a string raised a bare TypeError from a comparison, naming nothing
    assert M.ece(Q, Y, n_bins=np.int64(15)).item() == M.ece(Q, Y).item()
    assert M.ece(Q, Y, n_bins=np.int32(1)).item() == M.ece(Q, Y, n_bins=1).item()
    g = torch.Generator().manual_seed(0)
    a = M.calibrated_ece(Q, np.int64(7), n_bins=np.int16(15), generator=g)
    b = M.calibrated_ece(Q, 7, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    for bad in (True, np.int64(0), 2.0):
        with pytest.raises(ValueError, match="n_bins"):
            M.ece(Q, Y, n_bins=bad)
    with pytest.raises(ValueError, match="draws"):
        M.calibrated_ece(Q, np.int64(-3))
    # level: a real number (numpy floats too), not a string or a bool
    assert torch.equal(M.credible_set(Q, np.float64(0.9)), M.credible_set(Q, 0.9))
    assert torch.equal(M.credible_set(Q, np.float32(0.75)), M.credible_set(Q, 0.75))
    for bad in ("0.9", True, None, torch.tensor([0.9, 0.8])):
        with pytest.raises(TypeError, match="level must be a real number"):
            M.credible_set(Q, bad)
        with pytest.raises(TypeError, match="level must be a real number"):
            M.credible_threshold(Q, bad)
        with pytest.raises(TypeError, match="level must be a real number"):
            M.credible_set_summary(Q, Y, bad)
    for bad in (float("nan"), -0.1, 0.0, 1.0001, float("inf")):
        with pytest.raises(ValueError, match="level must be in"):
            M.credible_set(Q, bad)


def test_credible_set_is_empty_when_the_samples_disagree():
    # MATH.md section 8: u comes from the individual samples, the set from their mean. Two
    # samples each 0.97 sure of a different class: mass 0.97 >= 0.95 up to u = 0.97, so u =
    # 0.97, but p_bar = [0.5, 0.5] has no class >= u: the set is empty (the contract's
    # definition, pinned here), the row counts as not covered and adds 0 to the mean size
    q = torch.tensor([[[0.97, 0.03]], [[0.03, 0.97]]])
    assert M.credible_threshold(q).item() == pytest.approx(0.97, abs=1e-6)
    assert M.credible_set(q).tolist() == [[False, False]]
    cov, size = M.credible_set_summary(q, torch.tensor([0]))
    assert cov.item() == 0.0 and size.item() == 0.0
    # beside a row whose samples agree: coverage 1/2, mean size 1/2
    both = torch.cat([q, torch.tensor([[[0.97, 0.03]], [[0.97, 0.03]]])], 1)
    assert M.credible_set(both).tolist() == [[False, False], [True, False]]
    cov, size = M.credible_set_summary(both, torch.tensor([1, 0]))
    assert cov.item() == 0.5 and size.item() == 0.5


def test_credible_set_takes_a_one_element_tensor_level():
    # review (thirty-first session): temper and fit_temperature took a 0-d tensor, level did not
    p = torch.softmax(torch.randn(3, 8, 4), -1)
    assert torch.equal(M.credible_set(p, torch.tensor(0.9)), M.credible_set(p, 0.9))
