"""Sparse top-k teachers (MATH.md section 5): bucketing, k = V equals dense, storage."""

import math

import pytest
import torch

import mtbkd
from mtbkd.fused_linear import (
    FusedLinearMTBKDLoss,
    FusedLinearMultiTeacherKDLoss,
    fused_linear_mtbkd_loss,
    fused_linear_multi_teacher_kd_loss,
)
from mtbkd.sparse import (
    SparseTeacher,
    bucketize,
    load_sparse_teachers,
    save_sparse_teachers,
    topk_teacher,
)


def _problem(n=13, v=40, k=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, v, generator=g, dtype=torch.float64).requires_grad_(True)
    t = torch.randn(k, n, v, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, v, (n,), generator=g)
    y[::4] = -100
    return z, t, y


CASES = [
    (mtbkd.mtbkd_loss, {}),
    (mtbkd.mtbkd_loss, {"weights": "uniform", "temperature": 1.5}),
    (mtbkd.multi_teacher_kd_loss, {"divergence": "forward_kl", "hard_label_weight": 0.3}),
    (mtbkd.multi_teacher_kd_loss, {"divergence": "reverse_kl"}),
    (mtbkd.multi_teacher_kd_loss, {"divergence": "jsd", "beta": 0.4}),
]


@pytest.mark.parametrize("fn,opts", CASES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_k_equal_v_is_dense(fn, opts, reduction):
    z, t, y = _problem()
    sparse = [topk_teacher(t[i], t.shape[-1]) for i in range(t.shape[0])]
    a = fn(z, t, y, reduction=reduction, **opts)
    b = fn(z, sparse, y, reduction=reduction, **opts)
    torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
    (ga,) = torch.autograd.grad(a.sum(), z)
    (gb,) = torch.autograd.grad(b.sum(), z)
    torch.testing.assert_close(gb, ga, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("fn,opts", CASES[:1] + CASES[2:3])
def test_k_equal_v_is_dense_with_ignore_index_a_real_class(fn, opts):
    # ignore_index = 0: the bucketed op's placeholder label for kept rows must differ from it
    # (it was 0, so every row was masked and the soft term vanished)
    z, t, y = _problem()
    y[(y == 0) | (y < 0)] = 1
    y[1::3] = 0
    sparse = [topk_teacher(t[i], t.shape[-1]) for i in range(t.shape[0])]
    a = fn(z, t, y, ignore_index=0, **opts)
    b = fn(z, sparse, y, ignore_index=0, **opts)
    torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


def test_student_tail_of_exactly_zero_mass_has_finite_gradients():
    # the student's logits outside the teacher's support are -inf (a masked vocabulary) while the
    # teacher keeps a tail bucket (10 % of its mass): the student's tail has mass exactly 0, and
    # its logsumexp over an all -inf row must not put NaN into the backward
    g = torch.Generator().manual_seed(3)
    z = torch.randn(4, 8, generator=g, dtype=torch.float64)
    z[:, 3:] = float("-inf")
    z.requires_grad_(True)
    lp = torch.tensor([0.5, 0.3, 0.1], dtype=torch.float64).log().expand(4, 3).contiguous()
    s = SparseTeacher(torch.arange(3).expand(4, 3).contiguous(), lp)
    loss = mtbkd.multi_teacher_kd_loss(z, [s], divergence="reverse_kl", check_finite=False)
    (grad,) = torch.autograd.grad(loss, z)
    assert math.isfinite(loss.item()) and bool(torch.isfinite(grad).all())
    # the limit of a student tail logit of -1e4 instead of -inf
    z2 = z.detach().clone()
    z2[:, 3:] = -1e4
    z2.requires_grad_(True)
    ref = mtbkd.multi_teacher_kd_loss(z2, [s], divergence="reverse_kl", check_finite=False)
    (g2,) = torch.autograd.grad(ref, z2)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(grad[:, :3], g2[:, :3])


def test_k_equal_v_stats_equal_dense():
    z, t, y = _problem()
    sparse = [topk_teacher(t[i], t.shape[-1]) for i in range(2)]
    _, sa = mtbkd.mtbkd_loss(z, t, y, return_stats=True)
    _, sb = mtbkd.mtbkd_loss(z, sparse, y, return_stats=True)
    for x, r in zip(sb, sa, strict=True):
        torch.testing.assert_close(x, r, rtol=1e-9, atol=1e-10)


def test_single_teacher_buckets_are_support_plus_tail():
    z, t, _ = _problem()
    s = topk_teacher(t[0], 5)
    zb, (tb,) = bucketize(z, s)
    q = torch.softmax(z, -1)
    idx = s.indices.sort(-1).values
    qb = torch.softmax(zb, -1)
    torch.testing.assert_close(qb[:, :5], q.gather(-1, idx))
    torch.testing.assert_close(qb[:, 5], 1 - q.gather(-1, idx).sum(-1))
    p = torch.softmax(t[0], -1)
    pb = tb.exp()
    torch.testing.assert_close(pb[:, :5], p.gather(-1, idx))
    torch.testing.assert_close(pb[:, 5], 1 - p.gather(-1, idx).sum(-1))


def test_union_of_supports_completes_teacher_tails_uniformly():
    z, t, _ = _problem(n=4, v=12)
    s1, s2 = topk_teacher(t[0], 3), topk_teacher(t[1], 4)
    zb, tb, counts = bucketize(z, [s1, s2], return_counts=True)
    assert zb.shape == (4, 8)
    for k, s in enumerate((s1, s2)):
        pb = tb[k].exp()
        torch.testing.assert_close(pb.sum(-1), torch.ones(4, dtype=torch.float64))
        rest = 1 - s.logprobs.exp().sum(-1)
        for i in range(4):
            union = set(s1.indices[i].tolist()) | set(s2.indices[i].tolist())
            assert counts[i] == len(union) + 1
            # the tail bucket holds the share (V - |U|) / (V - k) of the unknown mass
            torch.testing.assert_close(pb[i, -1], rest[i] * (12 - len(union)) / (12 - s.k))
    # Padding buckets get zero student mass; the student's buckets still sum to 1.
    torch.testing.assert_close(torch.softmax(zb, -1).sum(-1), torch.ones(4, dtype=torch.float64))


def test_bucketize_gradcheck():
    z, t, _ = _problem(n=3, v=9)
    teachers = [topk_teacher(t[0], 3), topk_teacher(t[1], 2)]
    # The bucket probabilities (padding buckets hold a constant logit whose value is irrelevant).
    torch.autograd.gradcheck(lambda x: torch.softmax(bucketize(x, teachers)[0], -1), (z,))


def test_tail_below_threshold_is_dropped_and_finite():
    z, t, y = _problem(v=20)
    # A teacher with almost all its mass on its top-k: tail ~1e-9 counts as no tail bucket.
    t0 = t[0].clone()
    t0[:, 5:] -= 30.0
    s = topk_teacher(t0, 5)
    zb, _, counts = bucketize(z, s, return_counts=True)
    assert bool((counts == 5).all())
    loss = mtbkd.mtbkd_loss(z, s, y)
    assert torch.isfinite(loss)
    (g,) = torch.autograd.grad(loss, z)
    assert bool(torch.isfinite(g).all())


def test_partial_k_loss_equals_explicit_buckets():
    """MT-BKD on one top-k teacher = the dense loss on the explicit (k+1)-bucket distributions,
    plus the exact full-vocabulary cross-entropy."""
    z, t, y = _problem()
    s = topk_teacher(t[0], 6)
    idx = s.indices.sort(-1).values
    q = torch.softmax(z, -1)
    qs = q.gather(-1, idx)
    zb = torch.cat([qs, 1 - qs.sum(-1, keepdim=True)], -1).log()
    p = torch.softmax(t[0], -1).gather(-1, idx)
    tb = torch.cat([p, 1 - p.sum(-1, keepdim=True)], -1).log()
    mask = y != -100
    soft = mtbkd.mtbkd_loss(zb, tb[None], torch.where(mask, 0, -100), hard_label_weight=0.0,
                            reduction="none")  # fmt: skip
    ce = torch.nn.functional.cross_entropy(z, y, reduction="none", ignore_index=-100)
    expected = ((soft + ce)[mask]).mean()
    got = mtbkd.mtbkd_loss(z, s, y)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cls", [FusedLinearMTBKDLoss, FusedLinearMultiTeacherKDLoss])
def test_fused_linear_with_sparse_teachers(cls):
    g = torch.Generator().manual_seed(1)
    n, h, v = 21, 8, 30
    hid = torch.randn(n, h, generator=g, dtype=torch.float64).requires_grad_(True)
    w = torch.randn(v, h, generator=g, dtype=torch.float64).requires_grad_(True)
    t = torch.randn(2, n, v, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, v, (n,), generator=g)
    y[::4] = -100
    sparse = [topk_teacher(t[0], 5), topk_teacher(t[1], 9)]
    fused = cls(chunk_size=8)
    plain = mtbkd.MTBKDLoss() if cls is FusedLinearMTBKDLoss else mtbkd.MultiTeacherKDLoss()
    a = fused(hid, w, sparse, y)
    ref = plain(hid @ w.t(), sparse, y)
    torch.testing.assert_close(a, ref, rtol=1e-10, atol=1e-12)
    grads = torch.autograd.grad(a, (hid, w)), torch.autograd.grad(ref, (hid, w))
    for x, r in zip(*grads, strict=True):
        torch.testing.assert_close(x, r, rtol=1e-9, atol=1e-12)


def test_save_load_roundtrip_and_size(tmp_path):
    g = torch.Generator().manual_seed(0)
    v, n, k = 49152, 8, 64
    logits = torch.randn(n, v, generator=g)
    teachers = [topk_teacher(logits, k), topk_teacher(logits * 2, k)]
    ids = torch.arange(n)
    path = save_sparse_teachers(tmp_path / "t.safetensors", teachers, extra={"input_ids": ids},
                                metadata={"vocab_size": v})  # fmt: skip
    data = load_sparse_teachers(path)
    assert data.metadata["vocab_size"] == str(v)
    torch.testing.assert_close(data.tensors["input_ids"], ids)
    for a, b in zip(data.teachers, teachers, strict=True):
        assert a.indices.dtype == torch.int32
        torch.testing.assert_close(a.indices.long(), b.indices)
        torch.testing.assert_close(a.logprobs, b.logprobs)
    # Target of issue 6: stored sparse outputs <= 1 % of dense fp32 logits at V = 49152, k = 64.
    assert sum(t.nbytes for t in data.teachers) <= 0.01 * 2 * n * v * 4
    # The loaded teachers are usable directly.
    z = torch.randn(n, v, generator=g)
    assert torch.isfinite(mtbkd.mtbkd_loss(z, data.teachers))


def test_bad_input():
    z, t, y = _problem()
    s = topk_teacher(t[0], 4)
    with pytest.raises(TypeError, match="cannot be mixed"):
        mtbkd.mtbkd_loss(z, [s, t[1]], y)
    with pytest.raises(ValueError, match="leading shape"):
        mtbkd.mtbkd_loss(z, SparseTeacher(s.indices[:-1], s.logprobs[:-1]), y)
    with pytest.raises(ValueError, match="outside"):
        mtbkd.mtbkd_loss(z, SparseTeacher(s.indices + 100, s.logprobs), y)
    twice = s.indices.clone()
    twice[3, 1] = twice[3, 0]
    with pytest.raises(ValueError, match="lists a class twice"):
        mtbkd.mtbkd_loss(z, SparseTeacher(twice, s.logprobs), y)
    with pytest.raises(ValueError, match="same non-empty shape"):
        SparseTeacher(s.indices, s.logprobs[:, :2])
    with pytest.raises(TypeError, match="integer"):
        SparseTeacher(s.logprobs, s.logprobs)
    with pytest.raises(ValueError, match="k must be"):
        topk_teacher(t[0], 0)
    with pytest.raises(ValueError, match="labels must lie"):
        mtbkd.mtbkd_loss(z, s, torch.full_like(y, 1000))
    assert math.isfinite(mtbkd.mtbkd_loss(z, s, y).item())


def test_apis_without_sparse_support_name_the_argument():
    # teacher_weights said "student_logits must be a torch.Tensor" for a SparseTeacher
    _, t, _ = _problem()
    for teachers in (topk_teacher(t[0], 3), [topk_teacher(t[0], 3), topk_teacher(t[1], 3)]):
        with pytest.raises(TypeError, match="teacher_logits .*SparseTeacher"):
            mtbkd.teacher_weights(teachers)
        with pytest.raises(TypeError, match="teacher_logits .*SparseTeacher"):
            mtbkd.TeacherStats(teachers)


@pytest.mark.parametrize("fill", [0, -1])
def test_masked_rows_may_hold_padding(fill):
    # rows with labels == ignore_index count for nothing (MATH.md section 4); a padded batch's
    # sparse teachers there (indices all 0: "a class twice", or -1: "outside") were refused
    z, t, y = _problem()
    s = topk_teacher(t[0], 4)
    idx, lp = s.indices.clone(), s.logprobs.clone()
    pad = y == -100
    idx[pad], lp[pad] = fill, float("nan")
    padded = SparseTeacher(idx, lp)
    want = mtbkd.mtbkd_loss(z, s, y)
    torch.testing.assert_close(mtbkd.mtbkd_loss(z, padded, y), want, rtol=1e-12, atol=0)
    w = torch.eye(z.shape[1], dtype=z.dtype)
    got = FusedLinearMTBKDLoss(chunk_size=5)(z.detach(), w, padded, y)
    torch.testing.assert_close(got, want.detach(), rtol=1e-10, atol=1e-12)


def test_logits_passed_as_log_probabilities_are_refused():
    # raw top-k logits (mass e^5 and more) were renormalised silently; fp16 log-probabilities of
    # the whole vocabulary (rounding only) still pass
    torch.manual_seed(0)
    z = torch.randn(4, 12, dtype=torch.float64)
    t = torch.randn(4, 12, dtype=torch.float64) * 3
    top = t.topk(5, dim=-1)
    with pytest.raises(ValueError, match=r"teacher_logits\[0\] log-probabilities sum to .* > 1"):
        mtbkd.mtbkd_loss(z, [SparseTeacher(top.indices, top.values + 5.0)])
    lp = torch.log_softmax(t, -1).half()
    idx = torch.arange(12).expand(4, 12)
    loss = mtbkd.mtbkd_loss(z, [SparseTeacher(idx, lp)])
    assert torch.isfinite(loss)


def test_tail_bucket_is_kept_unless_every_teachers_tail_is_negligible():
    # MATH.md section 5: the tail bucket is dropped only when *every* teacher's tail mass is below
    # the threshold; here teacher a's is 1e-9 but teacher b's is 0.2
    z = torch.randn(1, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    idx = torch.tensor([[0, 1]])
    a = SparseTeacher(idx, torch.tensor([[0.7, 0.3 - 1e-9]], dtype=torch.float64).log())
    b = SparseTeacher(idx, torch.tensor([[0.5, 0.3]], dtype=torch.float64).log())
    zb, (ta, tb), counts = bucketize(z, [a, b], return_counts=True)
    assert counts.tolist() == [3]  # classes 0, 1 and the tail {2, ..., 5}
    real = tb.exp() > 0  # padding buckets have probability exactly 0
    f64 = torch.float64
    torch.testing.assert_close(tb.exp()[real], torch.tensor([0.5, 0.3, 0.2], dtype=f64))
    torch.testing.assert_close(ta.exp()[real], torch.tensor([0.7, 0.3 - 1e-9, 1e-9], dtype=f64))
    q = torch.softmax(z[0], -1)
    torch.testing.assert_close(torch.softmax(zb, -1)[real], torch.stack([q[0], q[1], q[2:].sum()]))


def test_scale_by_t2_multiplies_the_sparse_soft_term_by_t_squared():
    # MATH.md section 3: scale_by_t2 multiplies the soft term by T^2 (k = V: no tail bucket)
    z, t, _ = _problem(n=5, v=7)
    sparse = [topk_teacher(t[i], 7) for i in range(2)]
    temp = 3.0
    got = mtbkd.multi_teacher_kd_loss(z, sparse, temperature=temp, weights="uniform",
                                      scale_by_t2=True)  # fmt: skip
    logq = torch.log_softmax(z / temp, -1)
    kl = torch.stack([
        torch.nn.functional.kl_div(logq, torch.log_softmax(t[i] / temp, -1), log_target=True,
                                   reduction="none").sum(-1)
        for i in range(2)
    ])  # fmt: skip
    torch.testing.assert_close(got, temp**2 * kl.mean(0).mean(), rtol=1e-10, atol=1e-12)


def test_vocab_size_is_recorded_and_checked(tmp_path):
    # found by a bug hunt: a file of top-k teachers recorded no V, and a student of a larger
    # vocabulary was accepted (the tail bucket then spread over classes the teacher never scored)
    from mtbkd.sparse import load_sparse_teachers, save_sparse_teachers

    g = torch.Generator().manual_seed(0)
    t = mtbkd.topk_teacher(torch.randn(5, 16, generator=g), 4)
    assert t.vocab_size == 16 and "vocab_size=16" in repr(t)
    save_sparse_teachers(tmp_path / "t.safetensors", [t])
    (back,) = load_sparse_teachers(tmp_path / "t.safetensors").teachers
    assert back.vocab_size == 16 and back.rows(slice(0, 2)).vocab_size == 16
    z = torch.randn(5, 16, generator=g)
    assert torch.isfinite(mtbkd.mtbkd_loss(z, [back]))
    # a student of a smaller V: the teacher's vocabulary padded beyond it (its top-k indices
    # must lie below V, as checked before), accepted as for dense teachers
    small = t.indices.max() + 1
    assert torch.isfinite(mtbkd.mtbkd_loss(torch.randn(5, int(small), generator=g), [back]))
    for wrong in (26,):
        zw = torch.randn(5, wrong, generator=g)
        with pytest.raises(
            ValueError, match="top-k of a vocabulary of 16 classes but student_logits has V"
        ):
            mtbkd.mtbkd_loss(zw, [back])
    # without the size (made by hand, or a file written before): checked by index range only
    anon = mtbkd.SparseTeacher(back.indices, back.logprobs)
    assert anon.vocab_size is None and torch.isfinite(mtbkd.mtbkd_loss(torch.randn(5, 26), [anon]))
    with pytest.raises(ValueError, match="vocab_size must be a positive int"):
        mtbkd.SparseTeacher(back.indices, back.logprobs, 0)


@pytest.mark.parametrize("fn,opts", CASES)
def test_k_equal_v_is_dense_at_a_large_temperature(fn, opts):
    # padding buckets sat at a fixed -1e4: divided by τ = 2000 they held real mass (MT-BKD off
    # by 2.1e-3 relative, reverse KL and JSD by up to 7.6e-3)
    z, t, y = _problem()
    sparse = [topk_teacher(t[i], t.shape[-1]) for i in range(t.shape[0])]
    opts = {**opts, "temperature": 2000.0}
    if fn is mtbkd.mtbkd_loss:
        opts["weight_temperature"] = 3000.0
    a = fn(z, t, y, **opts)
    b = fn(z, sparse, y, **opts)
    torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


def test_a_bucket_of_mass_zero_stays_zero_under_the_temperature():
    # a confident top-1 (log-probability 0.0, as inference servers return it) leaves no mass for
    # the classes of another teacher's support: those buckets were floored at 1e-30, which is
    # 1e-3 after τ = 10 (forward KL off by 2e-2 relative, JSD by 3e-2)
    n, v = 3, 12
    g = torch.Generator().manual_seed(2)
    z = torch.randn(n, v, generator=g, dtype=torch.float64)
    a = SparseTeacher(torch.zeros(n, 1, dtype=torch.long), torch.zeros(n, 1, dtype=torch.float64))
    t_b = torch.randn(n, v, generator=g, dtype=torch.float64)
    t_b[:, 0] = -30.0  # B gives class 0 (A's) almost nothing
    b = topk_teacher(t_b, 4)
    # the buckets by hand: the union U = {0} ∪ S_B, then the tail (exact zeros for A)
    union = torch.cat([torch.zeros(n, 1, dtype=torch.long), b.indices], -1).sort(-1).values
    q = torch.softmax(z, -1)
    qs = q.gather(-1, union)
    zb = torch.cat([qs, 1 - qs.sum(-1, keepdim=True)], -1).log()
    pa = (union == 0).to(torch.float64)
    pa = torch.cat([pa, torch.zeros(n, 1, dtype=torch.float64)], -1)
    pb_top = b.logprobs.exp()
    rest = 1 - pb_top.sum(-1, keepdim=True)
    fill = rest / (v - 4)
    pb = torch.where(union == 0, fill, 0.0)
    for j in range(4):  # B's own top-4 at its classes' positions in the union
        pb = torch.where(union == b.indices[:, j : j + 1], pb_top[:, j : j + 1], pb)
    pb = torch.cat([pb, fill * (v - 5)], -1)
    tb = torch.stack([pa.log(), pb.log()])  # -inf where A has no mass
    for div in ("forward_kl", "jsd"):
        want = mtbkd.multi_teacher_kd_loss(zb, tb, None, divergence=div, temperature=10.0,
                                           check_finite=False)  # fmt: skip
        got = mtbkd.multi_teacher_kd_loss(z, [a, b], None, divergence=div, temperature=10.0)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    # reverse KL, infinite in exact arithmetic there, stays finite: the empty buckets hold a
    # tempered probability of 1e-30, about 69 nats a unit of the student's mass, at any τ (a
    # padding-sized -1e4·τ gave about 1e4 nats: 9,290 against 63 here at τ = 1)
    for tau in (1.0, 10.0):
        want = mtbkd.multi_teacher_kd_loss(zb, tb.clamp_min(math.log(1e-30) * tau), None,
                                           divergence="reverse_kl", temperature=tau)  # fmt: skip
        got = mtbkd.multi_teacher_kd_loss(z, [a, b], None, divergence="reverse_kl",
                                          temperature=tau)  # fmt: skip
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_teachers_sharing_tensors_are_saved(tmp_path):
    # an audit: the same teacher passed twice (or two built on one tensor) made safetensors
    # refuse the file ("Some tensors share memory")
    from mtbkd.sparse import load_sparse_teachers

    sp = topk_teacher(torch.randn(4, 10), 3)
    path = save_sparse_teachers(tmp_path / "t.safetensors", [sp, sp])
    loaded = load_sparse_teachers(path).teachers
    assert len(loaded) == 2
    for t in loaded:
        assert torch.equal(t.indices.long(), sp.indices.long())
        assert torch.equal(t.logprobs, sp.logprobs)


def test_an_empty_bucket_costs_the_same_whatever_the_weight_temperature():
    # an audit: the floor of a bucket without mass took max(temperature, weight_temperature), so
    # with fixed weights the reverse KL grew with weight_temperature (57, 114, 229, 460)
    a = SparseTeacher(torch.tensor([[0]]), torch.tensor([[0.0]], dtype=torch.float64))
    b = SparseTeacher(torch.tensor([[1]]), torch.tensor([[math.log(0.5)]], dtype=torch.float64))
    s = torch.zeros(1, 6, dtype=torch.float64)
    for tau in (0.5, 1.0, 2.0):
        got = [
            float(mtbkd.multi_teacher_kd_loss(
                s, [a, b], divergence="reverse_kl", temperature=tau, weight_temperature=tw,
                weights=torch.tensor([1.0, 0.0]), reduction="sum"))
            for tw in (0.5, 1.0, 2.0, 8.0)
        ]  # fmt: skip
        assert max(got) - min(got) < 1e-9 * max(got)
        if tau == 1.0:
            # q is uniform over 6 classes (buckets {0}, {1}, tail {2..5}: 1/6, 1/6, 4/6); a's
            # mass sits on class 0, its other buckets hold 1e-30 (69 nats a unit of q there)
            want = 5 / 6 * math.log(1e30) + 2 / 6 * math.log(1 / 6) + 4 / 6 * math.log(4 / 6)
            assert got[0] == pytest.approx(want, rel=1e-9)


def test_unsigned_index_dtypes_work_like_the_signed_ones(tmp_path):
    g = torch.Generator().manual_seed(0)
    s, y = torch.randn(4, 20, generator=g), torch.randint(0, 20, (4,), generator=g)
    a = topk_teacher(torch.randn(4, 20, generator=g), 3)
    want = mtbkd.mtbkd_loss(s, a, y)
    for dtype in (torch.uint16, torch.uint32, torch.uint64):
        t = SparseTeacher(a.indices.to(dtype), a.logprobs, 20)
        assert t.indices.dtype.is_signed  # stored signed (few ops take uints)
        torch.testing.assert_close(mtbkd.mtbkd_loss(s, t, y), want)
        save_sparse_teachers(tmp_path / "u.safetensors", t)
        assert torch.equal(load_sparse_teachers(tmp_path / "u.safetensors").teachers[0].indices
                           .long(), a.indices)  # fmt: skip
    # numpy integers as k and vocab_size (API.md: scalar options may be numpy numbers)
    np = pytest.importorskip("numpy")
    assert topk_teacher(torch.randn(4, 20), np.int64(4)).k == 4
    assert SparseTeacher(a.indices, a.logprobs, np.int64(20)).vocab_size == 20


def test_save_sparse_teachers_copies_shared_extras_and_refuses_bad_options(tmp_path):
    a = topk_teacher(torch.randn(4, 50), 4)
    ids = torch.arange(10)
    path = tmp_path / "t.safetensors"
    a32 = SparseTeacher(a.indices.int(), a.logprobs)
    save_sparse_teachers(path, a32, extra={"input_ids": ids[:-1], "labels": ids[1:],
                                           "topk_ids": a32.indices})  # fmt: skip
    back = load_sparse_teachers(path)
    assert list(back.tensors) == ["input_ids", "labels", "topk_ids"]
    assert torch.equal(back.tensors["labels"], ids[1:])
    with pytest.raises(TypeError, match="logprob_dtype must be a floating-point"):
        save_sparse_teachers(path, a, logprob_dtype=torch.int8)
    with pytest.raises(ValueError, match="keys starting with 'mtbkd.' are the file's own"):
        save_sparse_teachers(path, a, metadata={"mtbkd.teacher0.vocab_size": "7"})


def test_damaged_sparse_teacher_files_are_named(tmp_path):
    from safetensors.torch import save_file

    a = topk_teacher(torch.randn(4, 50), 4)
    good = save_sparse_teachers(tmp_path / "good.safetensors", [a, a])
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:60])
    with pytest.raises(ValueError, match="cut.safetensors is not a readable safetensors file"):
        load_sparse_teachers(cut)
    for count, match in (("abc", "num_teachers is 'abc'"), ("0", "num_teachers is '0'"),
                         ("2", "records 2 teachers but lacks teacher1.indices")):  # fmt: skip
        path = tmp_path / f"n{count}.safetensors"
        save_file({"teacher0.indices": a.indices.int(), "teacher0.logprobs": a.logprobs},
                  str(path), metadata={"mtbkd.num_teachers": count})  # fmt: skip
        with pytest.raises(ValueError, match=match):
            load_sparse_teachers(path)
    with pytest.raises(FileNotFoundError):
        load_sparse_teachers(tmp_path / "none.safetensors")


def test_sparse_entropy_weights_match_dense_at_a_temperature_below_the_weights():
    # review (thirty-first session): an empty bucket floored at the loss's temperature held
    # 1e-30^(T/T_w) = 1e-3 after the weight temperature (T = 0.1, T_w = 1), which moved the
    # entropy weights of teachers whose whole mass lies in their top-k away from dense's
    torch.manual_seed(0)
    n, v = 4, 64
    z = torch.randn(n, v)
    t = torch.full((2, n, v), -200.0)
    t[0, :, :4] = torch.tensor([5.0, 3.0, 2.0, 1.0])
    t[1, :, 10:14] = torch.tensor([4.0, 4.0, 1.0, 0.0])
    ts = [mtbkd.topk_teacher(t[k], 8) for k in range(2)]
    kw = dict(temperature=0.1, weight_temperature=1.0, return_stats=True)
    loss_d, dense = mtbkd.mtbkd_loss(z, t, **kw)
    loss_s, sparse = mtbkd.mtbkd_loss(z, ts, **kw)
    torch.testing.assert_close(sparse.entropy, dense.entropy, atol=1e-3, rtol=0)
    torch.testing.assert_close(sparse.weights, dense.weights, atol=1e-4, rtol=0)


# review (thirty-first session): checklist audit of the sparse teachers and TeacherStats
def _fake():
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode()


@pytest.mark.parametrize("fake", [False, True])
def test_sparse_losses_on_meta_and_fake_tensors(fake):
    # the dense losses run on meta / fake tensors (test_functional); the sparse ones read values
    # (bucketize's index / duplicate / mass checks, check_label_range) and fail
    import contextlib

    dev = "cpu" if fake else "meta"
    with _fake() if fake else contextlib.nullcontext():
        n, v, h = 6, 10, 4
        idx = torch.arange(3, device=dev).expand(n, 3).contiguous()
        t = mtbkd.sparse.SparseTeacher(idx, torch.full((n, 3), -2.0, device=dev))
        y = torch.zeros(n, dtype=torch.long, device=dev)
        z = torch.randn(n, v, device=dev)
        assert mtbkd.mtbkd_loss(z, [t], y).shape == ()
        assert mtbkd.multi_teacher_kd_loss(z, [t], y).shape == ()
        hid = torch.randn(n, h, device=dev, requires_grad=True)
        w = torch.randn(v, h, device=dev, requires_grad=True)
        assert fused_linear_mtbkd_loss(hid, w, [t], y).shape == ()
        assert fused_linear_multi_teacher_kd_loss(hid, w, [t], y).shape == ()


@pytest.mark.parametrize("fake", [False, True])
def test_teacher_stats_loss_on_meta_and_fake_tensors(fake):
    # TeacherStats itself builds on meta / fake tensors; the loss's spot check
    # (TeacherStats.check_rows: bool(bad.any())) reads values
    import contextlib

    dev = "cpu" if fake else "meta"
    with _fake() if fake else contextlib.nullcontext():
        t = torch.randn(2, 6, 10, device=dev)
        stats = mtbkd.TeacherStats(t)
        loss = mtbkd.mtbkd_loss(torch.randn(6, 10, device=dev), t, teacher_stats=stats)
        assert loss.shape == ()


def test_sparse_file_fp16_logprobs_of_masked_classes(tmp_path):
    # top-k of logits masked with -1e9 (k above the allowed classes): the fp16 file holds -inf,
    # which the loss then refuses by default; the dense narrowing cast keeps such masking finite
    # (validate.check_cast_overflow: -inf from a finite value -> finfo.min)
    logits = torch.randn(4, 10)
    logits[:, 3:] = -1e9
    t = mtbkd.sparse.topk_teacher(logits, 5)
    path = mtbkd.sparse.save_sparse_teachers(
        tmp_path / "t.safetensors", t, logprob_dtype=torch.float16
    )
    back = mtbkd.sparse.load_sparse_teachers(path).teachers[0]
    assert torch.isfinite(back.logprobs).all()
    y = torch.zeros(4, dtype=torch.long)
    mtbkd.mtbkd_loss(torch.randn(4, 10), [back], y)


def test_save_sparse_teachers_missing_directory_raises_oserror(tmp_path):
    t = mtbkd.sparse.topk_teacher(torch.randn(4, 10), 3)
    with pytest.raises(OSError):
        mtbkd.sparse.save_sparse_teachers(tmp_path / "missing" / "t.safetensors", t)
