"""Fused-linear losses equal the unfused ``head matmul + loss`` (values and gradients)."""

import numpy as np
import pytest
import torch

import mtbkd
from mtbkd.fused_linear import (
    CHUNK_BYTES,
    FusedLinearMTBKDLoss,
    FusedLinearMultiTeacherKDLoss,
    auto_chunk_size,
    fused_linear_from,
    fused_linear_mtbkd_loss,
    fused_linear_multi_teacher_kd_loss,
)


def _problem(n=37, h=16, v=50, k=2, dtype=torch.float64, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    hid = torch.randn(n, h, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True)
    w = (torch.randn(v, h, generator=g, dtype=torch.float64) * 0.5).to(dtype).requires_grad_(True)
    b = (torch.randn(v, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True)
         if bias else None)  # fmt: skip
    # Teachers: different hidden sizes, vocabularies padded beyond V, one with a bias.
    teachers = []
    for i in range(k):
        th = torch.randn(n, 12 + 4 * i, generator=g, dtype=torch.float64).to(dtype)
        tw = torch.randn(v + 3 * i, 12 + 4 * i, generator=g, dtype=torch.float64).to(dtype)
        tb = torch.randn(v + 3 * i, generator=g, dtype=torch.float64).to(dtype) if i else None
        teachers.append((th, tw, tb))
    y = torch.randint(0, v, (n,), generator=g)
    y[::5] = -100
    return hid, w, b, teachers, y


def _unfused(loss_fn, hid, w, b, teachers, y):
    v = w.shape[0]
    z = hid @ w.t() + (b if b is not None else 0)
    t = [th @ tw[:v].t() + (tb[:v] if tb is not None else 0) for th, tw, tb in teachers]
    return loss_fn(z, [x.to(z.dtype) for x in t], y)


LOSSES = [
    ("mtbkd", {}),
    ("mtbkd", {"weights": "uniform", "hard_label_weight": 0.0}),
    ("kd", {"divergence": "forward_kl", "hard_label_weight": 0.5}),
    ("kd", {"divergence": "reverse_kl"}),
    ("kd", {"divergence": "jsd", "beta": 0.3, "temperature": 2.0, "scale_by_t2": True}),
]


def _modules(kind, opts, reduction, chunk):
    if kind == "mtbkd":
        return (FusedLinearMTBKDLoss(reduction=reduction, chunk_size=chunk, **opts),
                mtbkd.MTBKDLoss(reduction=reduction, **opts))  # fmt: skip
    return (FusedLinearMultiTeacherKDLoss(reduction=reduction, chunk_size=chunk, **opts),
            mtbkd.MultiTeacherKDLoss(reduction=reduction, **opts))  # fmt: skip


@pytest.mark.parametrize("kind,opts", LOSSES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunk", [8, 11, None])  # 11 does not divide N = 37
def test_matches_unfused_float64(kind, opts, reduction, chunk):
    hid, w, b, teachers, y = _problem()
    fused, plain = _modules(kind, opts, reduction, chunk)
    a = fused(hid, w, teachers, y, b)
    ref = _unfused(plain, hid, w, b, teachers, y)
    torch.testing.assert_close(a, ref, rtol=1e-10, atol=1e-12)
    # A non-uniform grad_output (and loss * 2) must scale the gradient.
    scale = torch.linspace(0.5, 2.0, a.numel(), dtype=a.dtype).reshape(a.shape)
    ga = torch.autograd.grad((a * scale).sum() * 2, (hid, w, b))
    gr = torch.autograd.grad((ref * scale).sum() * 2, (hid, w, b))
    for x, r in zip(ga, gr, strict=True):
        torch.testing.assert_close(x, r, rtol=1e-9, atol=1e-12)


def test_num_items_in_batch_and_stats():
    hid, w, b, teachers, y = _problem(bias=False)
    fused = FusedLinearMTBKDLoss(chunk_size=8)
    a, st = fused(hid, w, teachers, y, num_items_in_batch=100, return_stats=True)
    ref, rst = _unfused(
        lambda z, t, y: mtbkd.mtbkd_loss(z, t, y, num_items_in_batch=100, return_stats=True),
        hid, w, None, teachers, y,
    )  # fmt: skip
    torch.testing.assert_close(a, ref, rtol=1e-10, atol=1e-12)
    for x, r in zip(st, rst, strict=True):
        torch.testing.assert_close(x, r, rtol=1e-9, atol=1e-12)
    ga = torch.autograd.grad(a, (hid, w))
    gr = torch.autograd.grad(ref, (hid, w))
    for x, r in zip(ga, gr, strict=True):
        torch.testing.assert_close(x, r, rtol=1e-9, atol=1e-12)


def test_dense_teacher_logits_and_all_masked():
    hid, w, b, teachers, y = _problem(k=1)
    v = w.shape[0]
    t = torch.stack([th @ tw[:v].t() for th, tw, _ in teachers])
    a = FusedLinearMultiTeacherKDLoss(chunk_size=5)(hid, w, t, y, b)
    ref = mtbkd.multi_teacher_kd_loss(hid @ w.t() + b, t, y)
    torch.testing.assert_close(a, ref, rtol=1e-10, atol=1e-12)
    masked = torch.full_like(y, -100)
    z = FusedLinearMTBKDLoss(chunk_size=5)(hid, w, t, masked, b)
    assert z.item() == 0.0
    g = torch.autograd.grad(z, (hid, w, b))
    assert all(bool((x == 0).all()) for x in g)


@pytest.mark.parametrize("kind,opts", [LOSSES[0], LOSSES[2]])
def test_bfloat16_error_no_worse_than_plain_pytorch(kind, opts):
    """bf16: the fused path's error vs the float64 truth is within that of plain bf16 PyTorch."""
    hid64, w64, b64, teachers64, y = _problem(n=64, v=300, dtype=torch.float64)
    fused, plain = _modules(kind, opts, "mean", 16)
    truth = _unfused(plain, hid64, w64, b64, teachers64, y)
    g_truth = torch.autograd.grad(truth, (hid64, w64, b64))

    def cast(x):
        return x.detach().to(torch.bfloat16).requires_grad_(x.requires_grad)

    hid, w, b = cast(hid64), cast(w64), cast(b64)
    teachers = [tuple(None if x is None else x.to(torch.bfloat16) for x in t) for t in teachers64]
    a = fused(hid, w, teachers, y, b)
    ga = torch.autograd.grad(a, (hid, w, b))
    # Plain bf16 PyTorch: bf16 head matmuls, bf16 logits, the loss computed from them.
    hp, wp, bp = cast(hid64), cast(w64), cast(b64)
    p = _unfused(plain, hp, wp, bp, teachers, y)
    gp = torch.autograd.grad(p, (hp, wp, bp))
    assert a.dtype == torch.float32 and ga[1].dtype == torch.bfloat16
    err_f = abs(a.double() - truth).item()
    err_p = abs(p.double() - truth).item()
    assert err_f <= 2 * err_p + 1e-4 * abs(truth.item())
    for x, xp, xt in zip(ga, gp, g_truth, strict=True):
        ef = (x.double() - xt).norm() / xt.norm()
        ep = (xp.double() - xt).norm() / xt.norm()
        assert ef <= 1.5 * ep + 1e-3, (ef, ep)  # (a floor of 1e-2 let a 1 % error pass)


def test_auto_chunk_size():
    assert auto_chunk_size(2048, 128256, 2) == 256
    assert auto_chunk_size(2048, 128256, 2) * 128256 * 4 * 4 <= CHUNK_BYTES
    assert auto_chunk_size(3, 128256, 2) == 3
    assert auto_chunk_size(100, 10**9, 4) == 1
    assert auto_chunk_size(10**6, 1000, 1) % 8 == 0


def test_fused_linear_from_copies_options():
    f = fused_linear_from(mtbkd.MTBKDLoss(temperature=3.0, prior_weight=0.1), chunk_size=4)
    assert isinstance(f, FusedLinearMTBKDLoss)
    assert (f.temperature, f.prior_weight, f.chunk_size) == (3.0, 0.1, 4)
    g = fused_linear_from(mtbkd.MultiTeacherKDLoss(divergence="jsd", beta=0.2))
    assert isinstance(g, FusedLinearMultiTeacherKDLoss) and g.beta == 0.2
    with pytest.raises(TypeError, match="loss must be"):
        fused_linear_from(torch.nn.MSELoss())


def test_bad_input():
    hid, w, b, teachers, y = _problem()
    f = FusedLinearMTBKDLoss()
    with pytest.raises(ValueError, match="student_weight has hidden size"):
        f(hid, w[:, :-1], teachers, y)
    with pytest.raises(ValueError, match=r"teachers\[1\] weight has vocabulary size"):
        f(hid, w, [teachers[0], (teachers[1][0], teachers[1][1][:10], None)], y)
    with pytest.raises(ValueError, match=r"teachers\[0\] weight has hidden size"):
        f(hid, w, [(teachers[0][0], teachers[0][1][:, :-1], None)], y)
    with pytest.raises(ValueError, match=r"teachers\[0\] hidden has"):
        f(hid, w, [(teachers[0][0][:-1], teachers[0][1], None)], y)
    with pytest.raises(ValueError, match=r"teachers\[0\] has vocabulary size"):
        f(hid, w, [torch.randn(hid.shape[0], 10, dtype=hid.dtype)], y)
    with pytest.raises(ValueError, match="student_bias has"):
        f(hid, w, teachers, y, b[:-1])
    with pytest.raises(ValueError, match="labels must have shape"):
        f(hid, w, teachers, y[:-1])
    with pytest.raises(ValueError, match="chunk_size"):
        FusedLinearMTBKDLoss(chunk_size=0)
    with pytest.raises(ValueError, match="chunk_size"):
        FusedLinearMTBKDLoss(chunk_size=True)(hid, w, teachers, y)
    with pytest.raises(ValueError, match="chunk_size"):
        mtbkd.fused_linear.fused_linear_mtbkd_loss(hid, w, teachers, y, chunk_size=2.5)
    # a numpy integer is an integer (np.int64(3) was refused)
    torch.testing.assert_close(
        FusedLinearMTBKDLoss(chunk_size=np.int64(3))(hid, w, teachers, y), f(hid, w, teachers, y)
    )
    # a [B, T] student: the error lists the [K, B, T] form it takes (it said [K, *(N,)])
    h6, w6, _, t6, y6 = _problem(n=6)
    with pytest.raises(ValueError, match=r"\[K=2, \*\(2, 3\)\] or \[K=2, N=6\]"):
        FusedLinearMTBKDLoss(weights=torch.ones(2, 3, 2))(h6.reshape(2, 3, -1), w6, t6,
                                                          y6.reshape(2, 3))  # fmt: skip
    with pytest.raises(ValueError, match="at least one teacher"):
        f(hid, w, [], y)
    # found by a bug hunt: torch's own dtype / meta-device errors, and a false "NaN or inf"
    h32 = (teachers[0][0].float(), teachers[0][1])
    with pytest.raises(
        TypeError, match=r"teachers\[0\] weight has dtype torch.float64 but its hidden"
    ):
        f(hid, w, [h32], y)
    with pytest.raises(ValueError, match="labels is on meta but student_hidden is on cpu"):
        f(hid, w, teachers, y.to("meta"))
    with pytest.raises(ValueError, match="weights is on meta but student_hidden is on cpu"):
        mtbkd.fused_linear.fused_linear_mtbkd_loss(
            hid, w, teachers, y, weights=torch.ones(2, device="meta")
        )
    big = torch.randn(2, hid.shape[0], w.shape[0], dtype=torch.float64)
    big[1, 3, 4] = 1e300
    with pytest.raises(ValueError, match=r"teachers\[1\] .* beyond the range of the student's"):
        f(hid.float(), w.float(), big, y)


def test_errors_number_the_rows_of_the_whole_input():
    # before: the row within the chunk (row 1 of the third chunk of 4 for row 9)
    from mtbkd.fused_linear import fused_linear_mtbkd_loss

    hid, w, b, teachers, y = _problem(n=10)
    t = torch.randn(2, 10, w.shape[0], dtype=torch.float64)
    t[1, 9, 0] = float("nan")
    with pytest.raises(ValueError, match=r"^teachers\[1\] contains NaN or inf \(row 9\)"):
        fused_linear_mtbkd_loss(hid, w, t, y, chunk_size=4)
    bad = y.clone()
    bad[9] = w.shape[0]
    with pytest.raises(ValueError, match=r"row 9"):
        fused_linear_mtbkd_loss(hid, w, t[:1], bad, chunk_size=4)


def test_errors_name_the_arguments_the_logits_come_from():
    # the fused op named its own inputs (student_logits, teacher_logits), not the caller's, and
    # not which teacher
    from mtbkd.fused_linear import fused_linear_mtbkd_loss

    hid, w, b, teachers, y = _problem(n=10)
    bad_w = w.detach().clone()
    bad_w[3, 0] = float("nan")  # every row's logit 3; row 0 is masked (y[::5] = -100)
    with pytest.raises(ValueError, match=r"^student_hidden @ student_weight.T \(\+ student_bias\) "
                       r"contains NaN or inf \(row 1\)"):  # fmt: skip
        fused_linear_mtbkd_loss(hid, bad_w, teachers, y, chunk_size=4)
    th = teachers[1][0].clone()
    th[6, 2] = float("inf")
    heads = [teachers[0], (th, *teachers[1][1:])]
    with pytest.raises(ValueError, match=r"^teachers\[1\] \(hidden @ weight.T \+ bias\) contains "
                       r"NaN or inf \(row 6\)"):  # fmt: skip
        fused_linear_mtbkd_loss(hid, w, heads, y, chunk_size=4)
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        fused_linear_mtbkd_loss(hid, w, teachers, y.to(torch.complex64))


def test_teachers_in_another_row_order_are_refused():
    # a sequence-first teacher [K, T, B, V] against a [B, T, H] student was flattened and paired
    # with the wrong rows (only the row count was checked); the plain losses refuse it
    from mtbkd.fused_linear import fused_linear_mtbkd_loss
    from mtbkd.sparse import topk_teacher

    g = torch.Generator().manual_seed(1)
    hid = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    w = torch.randn(5, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (2, 3), generator=g)
    t = torch.randn(2, 2, 3, 5, generator=g, dtype=torch.float64)
    t_tb = t.transpose(1, 2).contiguous()
    said = r"leading shape \(3, 2\) but student_hidden has \(2, 3\)"
    with pytest.raises(ValueError, match=r"^teachers has " + said):
        fused_linear_mtbkd_loss(hid, w, t_tb, y)
    with pytest.raises(ValueError, match=r"^teachers\[1\] has " + said):
        fused_linear_mtbkd_loss(hid, w, [t[0], t_tb[1]], y)
    head = (
        torch.randn(3, 2, 6, generator=g, dtype=torch.float64),
        torch.randn(5, 6, dtype=torch.float64),
    )
    with pytest.raises(ValueError, match=r"^teachers\[0\] hidden has " + said):
        fused_linear_mtbkd_loss(hid, w, [head], y)
    with pytest.raises(ValueError, match=r"^teachers has " + said):
        fused_linear_mtbkd_loss(hid, w, topk_teacher(t_tb[0], 3), y)
    # the same order, or the rows flattened on either side, are accepted
    plain = mtbkd.mtbkd_loss(hid @ w.T, t, y)
    torch.testing.assert_close(fused_linear_mtbkd_loss(hid, w, t, y), plain)
    torch.testing.assert_close(fused_linear_mtbkd_loss(hid, w, t.reshape(2, 6, 5), y), plain)
    flat = fused_linear_mtbkd_loss(hid.reshape(6, 4), w, t, y.reshape(6))
    torch.testing.assert_close(flat, plain)
    torch.testing.assert_close(
        fused_linear_mtbkd_loss(hid.reshape(6, 4), w, list(t), y.reshape(6)), plain
    )


def test_no_grad_computes_no_head_gradient(monkeypatch):
    # evaluation under torch.no_grad() used to compute every head gradient (2x the work)
    import mtbkd.fused_linear as FL

    hid, w, b, teachers, y = _problem()
    seen = []
    real = FL._run_chunks

    def spy(*args):
        seen.append(args[10])  # want_grads: whether the chunks compute gradients
        return real(*args)

    monkeypatch.setattr(FL, "_run_chunks", spy)
    f = FusedLinearMTBKDLoss()
    with torch.no_grad():
        evaluated = f(hid, w, teachers, y, b)
    trained = f(hid, w, teachers, y, b)
    assert seen == [False, True] and not evaluated.requires_grad and trained.requires_grad
    torch.testing.assert_close(evaluated, trained.detach())


def test_leading_shapes_for_fixed_weights_and_sparse_teachers():
    # [B, T, H] hidden states: fixed weights [K, B, T] and a SparseTeacher [B, T, k] are accepted
    # as by the plain losses (they were checked against [N] / not flattened)
    from mtbkd.fused_linear import fused_linear_mtbkd_loss
    from mtbkd.sparse import topk_teacher

    g = torch.Generator().manual_seed(0)
    hid = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    w = torch.randn(5, 4, generator=g, dtype=torch.float64)
    t = torch.randn(2, 2, 3, 5, generator=g, dtype=torch.float64)
    weights = torch.rand(2, 2, 3, generator=g, dtype=torch.float64)
    plain = mtbkd.mtbkd_loss(hid @ w.T, t, weights=weights)
    torch.testing.assert_close(fused_linear_mtbkd_loss(hid, w, t, weights=weights), plain)
    flat = fused_linear_mtbkd_loss(hid, w, t, weights=weights.reshape(2, -1))
    torch.testing.assert_close(flat, plain)
    s = topk_teacher(t[0], 3)
    torch.testing.assert_close(fused_linear_mtbkd_loss(hid, w, [s]), mtbkd.mtbkd_loss(hid @ w.T, s))
    torch.testing.assert_close(fused_linear_mtbkd_loss(hid, w, s), mtbkd.mtbkd_loss(hid @ w.T, s))
    with pytest.raises(ValueError, match="weights must have shape"):
        fused_linear_mtbkd_loss(hid, w, t, weights=weights[:, :1])


@pytest.mark.parametrize("cls", [FusedLinearMTBKDLoss, FusedLinearMultiTeacherKDLoss])
def test_sparse_teachers_under_inference_mode(cls):
    # the sparse chunk gradient is autograd on the chunk's logits; made under inference_mode they
    # were inference tensors: "element 0 of tensors does not require grad"
    from mtbkd.sparse import topk_teacher

    g = torch.Generator().manual_seed(0)
    hid = torch.randn(6, 4, generator=g)
    w = torch.randn(5, 4, generator=g)
    teachers = [topk_teacher(torch.randn(6, 5, generator=g), 3) for _ in range(2)]
    y = torch.randint(0, 5, (6,), generator=g)
    loss_fn = cls()
    with torch.no_grad():
        want = loss_fn(hid, w, teachers, y)
    with torch.inference_mode():
        torch.testing.assert_close(loss_fn(hid, w, teachers, y), want)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_batch_with_stats(reduction):
    # N = 0 with return_stats: no chunk ran and torch.cat got an empty list
    hid = torch.randn(0, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 0, 5, dtype=torch.float64)
    y = torch.zeros(0, dtype=torch.long)
    a, st = FusedLinearMTBKDLoss(reduction=reduction)(hid, w, t, y, return_stats=True)
    ref, rst = mtbkd.mtbkd_loss(hid @ w.t(), t, y, reduction=reduction, return_stats=True)
    torch.testing.assert_close(a, ref)
    for x, r in zip(st, rst, strict=True):
        torch.testing.assert_close(x, r)


def test_float16_grad_hidden_survives_loss_scaling():
    # fp16 with a loss scale (GradScaler): grad_hidden was rounded to fp16 at its reduced size
    # (1/num_items_in_batch, prior weight) before grad_output scaled it, and underflowed (0.15
    # relative error here, 300x that of plain fp16 PyTorch)
    g = torch.Generator().manual_seed(0)
    n, h, v, scale = 512, 16, 32, 65536.0
    hid = torch.randn(n, h, generator=g, dtype=torch.float64)
    w = torch.randn(v, h, generator=g, dtype=torch.float64) * 0.3
    t = torch.randn(2, n, v, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, v, (n,), generator=g)
    loss_fn = mtbkd.MTBKDLoss(hard_label_weight=0.0)

    def grad_hidden(fused, dtype):
        x, wd = hid.to(dtype).requires_grad_(True), w.to(dtype)
        if fused:
            a = fused_linear_from(loss_fn, chunk_size=128)(x, wd, t.to(dtype), y,
                                                           num_items_in_batch=64 * n)  # fmt: skip
        else:
            a = loss_fn(x @ wd.t(), t.to(dtype), y, num_items_in_batch=64 * n)
        (gx,) = torch.autograd.grad(a * scale, x)
        return gx.double() / scale

    truth = grad_hidden(False, torch.float64)
    err_fused = (grad_hidden(True, torch.float16) - truth).norm() / truth.norm()
    err_plain = (grad_hidden(False, torch.float16) - truth).norm() / truth.norm()
    assert err_fused <= 2 * err_plain, (err_fused, err_plain)


def _forward_kl_rows(z, teacher_logits):
    """Per row: the uniform mean over teachers of KL(softmax(t_k) || softmax(z)), by torch."""
    logq = torch.log_softmax(z, -1)
    kl = [torch.nn.functional.kl_div(logq, torch.log_softmax(t, -1), log_target=True,
                                     reduction="none").sum(-1) for t in teacher_logits]  # fmt: skip
    return torch.stack(kl).mean(0)


def test_padded_dense_teachers_are_sliced_and_grad_output_scales_every_gradient():
    # Teacher logits [N, V_k] with V_k > V are sliced to the student's V (their softmax is over
    # the first V columns); the backward multiplies every gradient by grad_output
    hid, w, b, _, _ = _problem(n=9, v=11)
    g = torch.Generator().manual_seed(1)
    t = [torch.randn(9, 11 + 3 * i, generator=g, dtype=torch.float64) for i in range(2)]
    loss = fused_linear_multi_teacher_kd_loss(hid, w, t, student_bias=b, weights="uniform",
                                                    chunk_size=4)  # fmt: skip
    want = _forward_kl_rows(hid @ w.t() + b, [x[:, :11] for x in t]).mean()
    torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-12)
    got = torch.autograd.grad(3.0 * loss, (hid, w, b))
    expected = torch.autograd.grad(3.0 * want, (hid, w, b))
    for a, e in zip(got, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-12)


def test_mean_counts_the_rows_whose_label_is_not_ignore_index_a_real_class():
    # MATH.md section 4: the mean divides by the rows with labels != ignore_index, here class 0
    hid, w, b, _, _ = _problem(n=10, v=7)
    g = torch.Generator().manual_seed(2)
    t = [torch.randn(10, 7, generator=g, dtype=torch.float64) for _ in range(2)]
    y = torch.tensor([0, 3, 1, 0, 6, 2, 0, 5, 4, 0])
    loss = fused_linear_multi_teacher_kd_loss(
        hid, w, t, y, b, weights="uniform", hard_label_weight=0.5, ignore_index=0, chunk_size=3
    )
    z = hid @ w.t() + b
    rows = _forward_kl_rows(z, t) + 0.5 * torch.nn.functional.cross_entropy(z, y, reduction="none")
    torch.testing.assert_close(loss, rows[y != 0].mean(), rtol=1e-10, atol=1e-12)


def test_double_backward_is_refused_and_teacher_heads_keep_finfo_min_masking():
    # found by a bug hunt: a gradient penalty (create_graph=True) ran and dropped the loss's
    # Hessian term, as the plain losses refuse to; a float32 teacher head whose bias masks a
    # class with finfo.min was refused as "NaN or inf" for a bfloat16 student (logits were not)
    from mtbkd.fused_linear import fused_linear_mtbkd_loss

    hid, w, b, teachers, y = _problem(n=9, v=20)
    total = fused_linear_mtbkd_loss(hid, w, teachers, y, b) + (hid**3).sum()
    with pytest.raises(RuntimeError, match="do not support double backward"):
        torch.autograd.grad(total, hid, create_graph=True)
    th, tw, _ = teachers[0]
    tb = torch.zeros(tw.shape[0], dtype=torch.float32)
    tb[3] = torch.finfo(torch.float32).min
    head = (th.float(), tw.float(), tb)
    low = [x.detach().bfloat16() for x in (hid, w)]
    as_head = fused_linear_mtbkd_loss(low[0], low[1], [head], y)
    logits = th.float() @ tw.float().t() + tb
    as_logits = fused_linear_mtbkd_loss(low[0], low[1], [logits], y)
    assert torch.isfinite(as_head)
    torch.testing.assert_close(as_head, as_logits)


def test_chunks_keep_no_statistics_of_earlier_chunks(monkeypatch):
    # an audit: every chunk's statistics were kept to the end of the call (also without
    # return_stats); under glibc those small long-lived tensors pinned the heap between the
    # chunks' freed [chunk, V] logits, and the process grew by one [chunk, V] per chunk
    import weakref

    import mtbkd.fused_linear as FL

    hid, w, b, teachers, y = _problem(n=40)
    alive: list = []
    real = FL._chunk_op

    def spy(*args, **kwargs):
        assert not any(r() is not None for r in alive), "an earlier chunk's statistics survive"
        out = real(*args, **kwargs)
        alive.extend(weakref.ref(x) for x in out[2])
        return out

    monkeypatch.setattr(FL, "_chunk_op", spy)
    for stats in (False, True):
        alive.clear()
        out = fused_linear_mtbkd_loss(hid, w, teachers, y, b, chunk_size=7,
                                            return_stats=stats)  # fmt: skip
        if stats:  # the statistics, copied into one tensor per field, equal the unfused loss's
            logits = hid @ w.T + b
            tl = [th @ tw[:50].T + (0 if tb is None else tb[:50]) for th, tw, tb in teachers]
            _, want = mtbkd.mtbkd_loss(logits, tl, y, return_stats=True)
            for name in ("weights", "responsibilities", "entropy", "prior", "ce"):
                torch.testing.assert_close(getattr(out[1], name), getattr(want, name))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_autocast_runs_the_head_as_the_unfused_linear_does(reduction):
    # an audit: under autocast the chunk matmuls (out=, in place) stayed float32 while the
    # forward's grad_hidden alone was rounded to bfloat16, and only for a mean or a sum
    hid, w, b, teachers, y = _problem(dtype=torch.float32)
    up = torch.linspace(0.5, 2.0, hid.shape[0]) if reduction == "none" else torch.tensor(1.0)

    def run(fused):
        hh, ww, bb = (x.detach().clone().requires_grad_(True) for x in (hid, w, b))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if fused:
                loss = fused_linear_mtbkd_loss(hh, ww, teachers, y, bb, chunk_size=8,
                                                     reduction=reduction)  # fmt: skip
            else:
                tl = [torch.nn.functional.linear(th, tw[:50], None if tb is None else tb[:50])
                      for th, tw, tb in teachers]  # fmt: skip
                loss = mtbkd.mtbkd_loss(torch.nn.functional.linear(hh, ww, bb), tl, y,
                                        reduction=reduction)  # fmt: skip
        (loss * up).sum().backward()
        return loss.detach(), hh.grad, ww.grad, bb.grad

    got, want = run(True), run(False)
    assert all(g.dtype == torch.float32 for g in got[1:])
    torch.testing.assert_close(got[0], want[0].to(got[0].dtype), rtol=1e-5, atol=1e-5)
    for g, r in zip(got[1:], want[1:], strict=True):  # the bf16 head's gradients, as unfused
        torch.testing.assert_close(g, r, rtol=2e-2, atol=2e-3 * float(r.abs().max()))


def test_meta_tensors_still_run():
    # a review: the autocast handling opened torch.autocast("meta", ...), which raises
    hid, w, _, _, y = _problem(dtype=torch.float32, bias=False)
    t = torch.randn(hid.shape[0], 50)
    meta = [x.detach().to("meta") for x in (hid, w, t)]
    out = fused_linear_mtbkd_loss(meta[0].requires_grad_(), meta[1], [meta[2]], y.to("meta"),
                                  check_finite=False)  # fmt: skip
    assert out.device.type == "meta" and out.shape == ()


@pytest.mark.parametrize("loss_fn", [fused_linear_mtbkd_loss, fused_linear_multi_teacher_kd_loss])
def test_reduction_none_refuses_teachers_or_labels_changed_before_backward(loss_fn):
    # an audit (thirtieth session): reduction="none" recomputes its chunks in the backward, from
    # teachers and labels autograd did not guard: a buffer refilled before backward() silently
    # changed the gradient (by up to 3.1)
    torch.manual_seed(0)
    h = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    heads = [(torch.randn(6, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64))]
    sparse = [mtbkd.topk_teacher(torch.randn(6, 5), 2)]
    for teachers, change in [
        (torch.randn(2, 6, 5, dtype=torch.float64), lambda t, y: t.normal_()),
        (torch.randn(2, 6, 5, dtype=torch.float64), lambda t, y: y.fill_(-100)),
        (heads, lambda t, y: t[0][1].mul_(2)),
        (sparse, lambda t, y: t[0].logprobs.sub_(1)),
    ]:
        y = torch.randint(0, 5, (6,))
        loss = loss_fn(h, w, teachers, y, reduction="none", chunk_size=4)
        change(teachers, y)
        with pytest.raises(RuntimeError, match="modified by an inplace operation since the fo"):
            loss.sum().backward()
    loss = loss_fn(h, w, torch.randn(2, 6, 5, dtype=torch.float64), y, reduction="none")
    loss.sum().backward()  # unchanged: fine


def test_sparse_teacher_errors_name_the_fused_arguments():
    h, w = torch.randn(4, 3), torch.randn(6, 3)
    with pytest.raises(ValueError, match=r"teachers\[0\] .* but student_weight has V = 6") as e:
        fused_linear_mtbkd_loss(h, w, [mtbkd.topk_teacher(torch.randn(4, 5), 2)])
    assert "student_logits" not in str(e.value) and "teacher_logits" not in str(e.value)
    with pytest.raises(ValueError, match=r"^teachers must be \[K, N, V\]"):
        fused_linear_mtbkd_loss(h, w, torch.randn(4, 6))


def test_zero_width_and_one_row_hidden_states():
    d = torch.float64
    h = torch.randn(3, 0, dtype=d, requires_grad=True)
    w = torch.randn(5, 0, dtype=d, requires_grad=True)
    b = torch.randn(5, dtype=d, requires_grad=True)
    t = torch.randn(2, 3, 5, dtype=d)
    got = fused_linear_mtbkd_loss(h, w, t, None, b)
    torch.testing.assert_close(got, mtbkd.mtbkd_loss(h @ w.t() + b, t))
    head = (torch.randn(3, 0, dtype=d), torch.randn(5, 0, dtype=d), torch.randn(5, dtype=d))
    torch.testing.assert_close(
        fused_linear_mtbkd_loss(h, w, [head], None, b),
        mtbkd.mtbkd_loss(h @ w.t() + b, head[2].expand(3, 5)[None]),
    )
    # one row [H]: its teachers may come without a row dimension, as mtbkd_loss takes them
    h, w, t = torch.randn(4, dtype=d), torch.randn(5, 4, dtype=d), torch.randn(2, 5, dtype=d)
    y = torch.tensor(2)
    ref = mtbkd.mtbkd_loss(h @ w.t(), t, y)
    torch.testing.assert_close(fused_linear_mtbkd_loss(h, w, t, y), ref)  # [K, V]
    torch.testing.assert_close(fused_linear_mtbkd_loss(h, w, list(t), y), ref)  # [V] each
    torch.testing.assert_close(fused_linear_mtbkd_loss(h, w, t[:, None], y), ref)  # [K, 1, V]
    hw = torch.randn(5, 3, dtype=d)
    hk = torch.randn(3, dtype=d)
    torch.testing.assert_close(fused_linear_mtbkd_loss(h, w, [(hk, hw)], y),
                               mtbkd.mtbkd_loss(h @ w.t(), (hk @ hw.t())[None], y))  # fmt: skip
    sp = mtbkd.topk_teacher(torch.randn(5, dtype=d), 2)
    torch.testing.assert_close(fused_linear_mtbkd_loss(h, w, [sp], y),
                               mtbkd.mtbkd_loss(h @ w.t(), [sp], y))  # fmt: skip


@pytest.mark.parametrize("loss_fn", [fused_linear_mtbkd_loss, fused_linear_multi_teacher_kd_loss])
def test_reduction_none_takes_teachers_and_labels_made_under_inference_mode(loss_fn):
    # review (thirty-first session): teachers usually run under torch.inference_mode(); their
    # tensors have no version counter, and the in-place check of reduction="none" raised
    # "Inference tensors do not track version counter"
    g = torch.Generator().manual_seed(0)
    h = torch.randn(6, 4, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(5, 4, dtype=torch.float64, generator=g, requires_grad=True)
    with torch.inference_mode():
        t = torch.randn(2, 6, 5, dtype=torch.float64, generator=g)
        y = torch.randint(0, 5, (6,), generator=g)
        sparse = [mtbkd.topk_teacher(torch.randn(6, 5, generator=g), 2)]
    for teachers, labels in ((t, y.clone()), (t.clone(), y), (sparse, None)):
        loss = loss_fn(h, w, teachers, labels, reduction="none")
        loss.sum().backward()
        ref = loss_fn(h.detach(), w.detach(), teachers, labels, reduction="none")
        torch.testing.assert_close(loss.detach(), ref)
