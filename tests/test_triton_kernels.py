"""The GPU kernels (Triton ``mtbkd.kernels``; CUDA C++ where built) against the float64 reference,
and ``TeacherStats``.

Without a GPU the Triton kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set by
conftest) on CPU tensors, on small shapes, and the ``cuda`` cases skip (no CUDA build); on a CUDA
machine the same tests run the compiled Triton kernels and the CUDA C++ kernels. The interpreter
supports float64, so the float64 comparisons are tight (the kernels accumulate in float64 for
float64 input). Low precision is judged against the float64 truth of the same rounded inputs,
relative to the error of PyTorch's own computation in that dtype (the reference run on the
low-precision input, fp32 accumulation, gradient rounded once).

``test_triton_compiles_for_sm80_sm90`` compiles every kernel specialisation the wrappers launch to
cubins for sm_80 and sm_90 without a GPU (Triton's bundled ptxas), which the interpreter cannot
check: IR typing, loop-carried types, register spills.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import mtbkd
from mtbkd import ops
from mtbkd.teacher_stats import TeacherStats

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_STATUS = ops.backend_status()["triton"]
pytestmark = [
    pytest.mark.skipif(_STATUS is not None, reason=f"triton backend unavailable: {_STATUS}"),
    # The interpreter evaluates masked-out lanes too (-inf - -inf, log 0); numpy warns about
    # values that the kernels then discard.
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning"),
]

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
_lgamma1p = pytest.importorskip("mtbkd.kernels.losses")._lgamma1p


@triton.jit
def _lgamma1p_kernel(x_ptr, out_ptr, n, HIGH: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    tl.store(out_ptr + offs, _lgamma1p(x, HIGH), mask=offs < n)


ENTROPY, UNIFORM, FIXED = (ops.WEIGHT_MODES[m] for m in ("entropy", "uniform", "fixed"))
FKL, RKL, JSD = (ops.DIVERGENCES[d] for d in ("forward_kl", "reverse_kl", "jsd"))
ON_CUDA = DEVICE == "cuda"
NO_DEVICE_ASSERT = "a device-side assertion would poison the CUDA context of the test session"


@pytest.fixture(params=["triton", "cuda"])
def backend(request, monkeypatch):
    """Each op test runs on the Triton kernels and on the CUDA C++ kernels (where built)."""
    reason = ops.backend_status()[request.param]
    if reason is not None:
        pytest.skip(f"{request.param} backend unavailable: {reason}")
    monkeypatch.setenv("MTBKD_BACKEND", request.param)
    return request.param


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _data(n, v, k, dtype, *, labels=True, masked=(1,), layout="stacked", seed=0, scale=3.0):
    """Student [N, V], K teachers (views of one [K, N, V] tensor, or separate tensors), labels."""
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(n, v, generator=g, dtype=torch.float64) * 2).to(dtype)
    t = (torch.randn(k, n, v, generator=g, dtype=torch.float64) * scale).to(dtype)
    y = torch.randint(0, v, (n,), generator=g) if labels else None
    if labels:
        for i in masked:
            if i < n:
                y[i] = -100
    z, t = z.to(DEVICE), t.to(DEVICE)
    y = None if y is None else y.to(DEVICE)
    ts = list(t.unbind(0)) if layout == "stacked" else [x.clone() for x in t.unbind(0)]
    return z, ts, y


def _f64(ts):
    return [t.double() for t in ts]


def _maxerr(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


# ------------------------------------------------------------------------------------------------
# mtbkd_loss_fwd
# ------------------------------------------------------------------------------------------------

MTBKD_CASES = [
    # k, v, labels, weight_mode, cached stats, teacher layout
    (1, 37, True, ENTROPY, False, "stacked"),
    (2, 37, False, ENTROPY, False, "separate"),
    (3, 1271, True, ENTROPY, False, "stacked"),
    (3, 1271, True, ENTROPY, True, "separate"),
    (2, 300, True, UNIFORM, False, "stacked"),
    (3, 300, False, FIXED, True, "stacked"),
    (5, 129, True, ENTROPY, False, "separate"),
    (9, 64, True, FIXED, False, "separate"),  # more teachers than pointer arguments: one stack
]


def _mtbkd_args(z, ts, y, mode, cached, *, tau=2.0, lam=5.0, tw=1.0, check=True):
    n, k = z.shape[0], len(ts)
    fw = None
    if mode == FIXED:
        g = torch.Generator().manual_seed(7)
        fw = torch.rand(k, n, generator=g, dtype=torch.float64).to(DEVICE, _acc(z.dtype)) + 0.1
    stats = ops._ref_teacher_stats(_f64(ts), tau, lam, tw, False) if cached else None
    return (z, ts, y, fw, stats, tau, lam, 0.02, 1.0, mode, tw, -100, check)


@pytest.mark.parametrize("k,v,labels,mode,cached,layout", MTBKD_CASES)
def test_mtbkd_fwd_float64(backend, k, v, labels, mode, cached, layout):
    z, ts, y = _data(5, v, k, torch.float64, labels=labels, layout=layout)
    args = _mtbkd_args(z, ts, y, mode, cached)
    if backend == "cuda" and k > 8:
        with pytest.raises((RuntimeError, ValueError), match="at most 8 teachers"):
            torch.ops.mtbkd.mtbkd_loss_fwd(*args)
        return
    out = torch.ops.mtbkd.mtbkd_loss_fwd(*args)
    ref = ops._ref_mtbkd_loss_fwd(*args)
    names = ("loss", "grad", "weights", "responsibilities", "entropy", "prior", "ce")
    for name, a, b in zip(names, out, ref, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        # prior carries -lgamma(V + lam) (~1e4 for V = 1271): compare relative to its size.
        tol = 1e-10 * max(1.0, b.abs().max().item())
        assert _maxerr(a, b) <= tol, (name, _maxerr(a, b))
    if labels:
        masked = y == -100
        assert torch.all(out[1][masked] == 0) and torch.all(out[0][masked] == 0)


@pytest.mark.parametrize("tw", [0.5, 3.0])
@pytest.mark.parametrize("cached", [False, True])
def test_mtbkd_fwd_weight_temperature(backend, tw, cached):
    # MTBKD_CASES weight at tau_w = 1 (the KD cases at 1.5): the entropy weights of MT-BKD at
    # another tau_w, and through them the responsibilities, loss and gradient.
    z, ts, y = _data(5, 300, 3, torch.float64)
    args = _mtbkd_args(z, ts, y, ENTROPY, cached, tw=tw)
    out = torch.ops.mtbkd.mtbkd_loss_fwd(*args)
    ref = ops._ref_mtbkd_loss_fwd(*args)
    at_one = ops._ref_mtbkd_loss_fwd(*_mtbkd_args(z, ts, y, ENTROPY, cached))
    assert _maxerr(ref[2], at_one[2]) > 1e-3  # tau_w matters for these teachers
    names = ("loss", "grad", "weights", "responsibilities", "entropy", "prior", "ce")
    for name, a, b in zip(names, out, ref, strict=True):
        tol = 1e-10 * max(1.0, b.abs().max().item())
        assert _maxerr(a, b) <= tol, (name, _maxerr(a, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cached", [False, True])
def test_mtbkd_fwd_low_precision(backend, dtype, cached):
    z, ts, y = _data(6, 1271, 3, dtype)
    args = _mtbkd_args(z, ts, y, ENTROPY, cached)
    out = torch.ops.mtbkd.mtbkd_loss_fwd(*args)
    truth = ops._ref_mtbkd_loss_fwd(z.double(), _f64(ts), *args[2:])
    base = ops._ref_mtbkd_loss_fwd(*args)  # PyTorch on the same low-precision tensors
    for i, name in enumerate(("loss", "grad", "weights", "responsibilities", "entropy")):
        err, err_base = _maxerr(out[i], truth[i]), _maxerr(base[i], truth[i])
        assert out[i].dtype == base[i].dtype
        assert err <= 2 * err_base + 2e-6 * max(1.0, truth[i].abs().max().item()), (
            name,
            err,
            err_base,
        )


def _mtbkd_fwd_against_reference(args):
    """The op's seven float64 outputs, each checked against the reference to 1e-10 (relative)."""
    out = torch.ops.mtbkd.mtbkd_loss_fwd(*args)
    ref = ops._ref_mtbkd_loss_fwd(*args)
    names = ("loss", "grad", "weights", "responsibilities", "entropy", "prior", "ce")
    for name, a, b in zip(names, out, ref, strict=True):
        assert _maxerr(a, b) <= 1e-10 * max(1.0, b.abs().max().item()), (name, _maxerr(a, b))
    return out


def test_mtbkd_fwd_hard_label_weight_scales_only_the_cross_entropy(backend):
    # Every other MT-BKD case runs at hard_label_weight = 1: beta_h dropped from the loss or from
    # the hard-label gradient, or folded into the per-row ce output, went unnoticed.
    z, ts, y = _data(5, 300, 3, torch.float64)
    args = list(_mtbkd_args(z, ts, y, ENTROPY, False))
    args[7], args[8] = 0.5, 0.3  # prior_weight, hard_label_weight
    out = _mtbkd_fwd_against_reference(args)
    keep = y != -100
    ce = torch.nn.functional.cross_entropy(z, torch.where(keep, y, 0), reduction="none")
    assert _maxerr(out[6][keep], ce[keep]) <= 1e-12  # the unweighted cross-entropy
    assert _maxerr(out[0], torch.where(keep, 0.3 * out[6] + 0.5 * out[5], 0.0)) <= 1e-12


def test_mtbkd_fwd_zero_hard_label_weight_drops_the_cross_entropy(backend):
    # hard_label_weight = 0: no cross-entropy term, so a -inf student logit at the label (a
    # column masked in student and teachers, check_finite=False) must not give 0 * inf = NaN. The
    # KD kernels are tested for this in test_functional; the MT-BKD kernels were not.
    z, ts, y = _data(4, 37, 2, torch.float64)  # row 1 masked
    z[0, y[0]] = float("-inf")
    for t in ts:
        t[0, y[0]] = float("-inf")
    args = list(_mtbkd_args(z, ts, y, ENTROPY, False, check=False))
    args[8] = 0.0
    out = torch.ops.mtbkd.mtbkd_loss_fwd(*args)
    args[2] = None
    unlabelled = torch.ops.mtbkd.mtbkd_loss_fwd(*args)
    keep = y != -100
    assert torch.isfinite(out[0]).all() and torch.isfinite(out[1]).all()
    assert torch.equal(out[0], torch.where(keep, unlabelled[0], 0.0))
    assert torch.equal(out[1], torch.where(keep[:, None], unlabelled[1], 0.0))
    args[2] = y  # the reference drops the term too (and 0 log 0 = 0)
    ref = ops._ref_mtbkd_loss_fwd(*args)
    for a, b in zip(out[:2], ref[:2], strict=True):
        assert _maxerr(a, b) <= 1e-10 * max(1.0, b.abs().max().item())


def test_mtbkd_fwd_zero_fixed_weight_drops_the_teacher(backend):
    # MATH.md section 2: a teacher with w_k = 0 drops out of the mixture (log 0 = -inf), so the
    # loss is that of the other teachers alone and its responsibility is 0. The Triton cases had
    # fixed weights >= 0.1 only.
    z, ts, y = _data(5, 129, 3, torch.float64)
    fw = torch.tensor(
        [[0.4, 0.0, 2.0, 1.0, 0.0], [0.0, 0.0, 1.0, 3.0, 0.5], [0.6, 1.0, 0.0, 0.0, 1.5]],
        dtype=torch.float64,
        device=DEVICE,
    )
    args = (z, ts, y, fw, None, 2.0, 5.0, 0.5, 1.0, FIXED, 1.0, -100, True)
    out = _mtbkd_fwd_against_reference(args)
    keep = y != -100
    assert torch.all(out[3][fw == 0] == 0)
    for i in torch.nonzero(keep).flatten().tolist():  # each row against its teachers with w > 0
        live = [k for k in range(3) if fw[k, i] > 0]
        sub = (z[i : i + 1], [ts[k][i : i + 1] for k in live], y[i : i + 1], fw[live, i : i + 1])
        alone = torch.ops.mtbkd.mtbkd_loss_fwd(*sub, *args[4:])
        assert _maxerr(out[0][i], alone[0][0]) <= 1e-12 and _maxerr(out[1][i], alone[1][0]) <= 1e-12


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_mtbkd_gradient_vanishes_when_the_student_equals_every_teacher(backend, dtype):
    # q = p_k for every k: the prior's gradient (lam/tau)(q sum_k r_k - sum_k r_k p_k) is zero
    # however sum_k r_k rounds (the responsibilities exp(l_k - lse l) sum to 1 only to about
    # |l| ulps, |l| ~ lam H ~ 500 here). Taking sum_k r_k = 1 left q (1 - sum_k r_k) (lam/tau):
    # ~250 units below, where the kernels reach ~1.5 and the reference's autograd ~4.
    g = torch.Generator().manual_seed(0)
    z = (torch.randn(4, 1271, generator=g, dtype=torch.float64) * 3).to(DEVICE, dtype)
    fw = (torch.rand(3, 4, generator=g, dtype=torch.float64) + 0.1).to(DEVICE, dtype)
    unit = torch.finfo(dtype).eps * (100.0 / 2.0) * torch.softmax(z.double() / 2.0, -1).amax(-1)
    for mode, f in ((ENTROPY, None), (FIXED, fw)):
        args = (z, [z.clone() for _ in range(3)], None, f, None, 2.0, 100.0, 1.0, 0.0, mode, 1.0,
                -100, True)  # fmt: skip
        grad = torch.ops.mtbkd.mtbkd_loss_fwd(*args)[1].double()
        ratio = (grad.abs().amax(-1) / unit).max().item()
        assert ratio <= 16, (mode, ratio)


# ------------------------------------------------------------------------------------------------
# multi_teacher_kd_fwd
# ------------------------------------------------------------------------------------------------

KD_CASES = [
    # divergence, beta, k, v, labels, weight mode, layout
    (FKL, 0.5, 1, 37, True, ENTROPY, "stacked"),
    (FKL, 0.5, 3, 1271, False, UNIFORM, "separate"),
    (RKL, 0.5, 2, 37, True, ENTROPY, "separate"),
    (RKL, 0.5, 3, 1271, True, FIXED, "stacked"),
    (JSD, 0.5, 3, 37, True, ENTROPY, "stacked"),
    (JSD, 0.1, 2, 1271, False, ENTROPY, "separate"),
    (JSD, 0.0, 2, 129, True, ENTROPY, "stacked"),  # endpoint: forward KL exactly
    (JSD, 1.0, 2, 129, True, UNIFORM, "stacked"),  # endpoint: reverse KL exactly
    (JSD, 0.7, 8, 64, True, FIXED, "separate"),  # all eight pointer arguments
]


def _kd_args(z, ts, y, div, beta, mode, *, tau=2.0, check=True):
    n, k = z.shape[0], len(ts)
    fw = None
    if mode == FIXED:
        g = torch.Generator().manual_seed(3)
        fw = torch.rand(k, n, generator=g, dtype=torch.float64).to(DEVICE, _acc(z.dtype)) + 0.1
    return (z, ts, y, fw, div, beta, tau, mode, 1.5, 0.5, 0.8, tau**2, -100, check)


@pytest.mark.parametrize("div,beta,k,v,labels,mode,layout", KD_CASES)
def test_kd_fwd_float64(backend, div, beta, k, v, labels, mode, layout):
    z, ts, y = _data(5, v, k, torch.float64, labels=labels, layout=layout)
    args = _kd_args(z, ts, y, div, beta, mode)
    out = torch.ops.mtbkd.multi_teacher_kd_fwd(*args)
    ref = ops._ref_multi_teacher_kd_fwd(*args)
    for name, a, b in zip(("loss", "grad", "weights"), out, ref, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert _maxerr(a, b) <= 1e-11, (name, _maxerr(a, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("div", [FKL, RKL, JSD])
def test_kd_fwd_low_precision(backend, dtype, div):
    z, ts, y = _data(6, 1271, 3, dtype)
    args = _kd_args(z, ts, y, div, 0.5, ENTROPY)
    out = torch.ops.mtbkd.multi_teacher_kd_fwd(*args)
    truth = ops._ref_multi_teacher_kd_fwd(z.double(), _f64(ts), *args[2:])
    base = ops._ref_multi_teacher_kd_fwd(*args)
    for i, name in enumerate(("loss", "grad", "weights")):
        err, err_base = _maxerr(out[i], truth[i]), _maxerr(base[i], truth[i])
        assert err <= 2 * err_base + 2e-6 * max(1.0, truth[i].abs().max().item()), (
            name,
            err,
            err_base,
        )


@pytest.mark.parametrize("beta", [0.9999, 1 - 1e-6])
def test_jsd_float32_beta_near_one(backend, beta):
    # (1 - beta) scales KL(q || m) and the whole JSD gradient. Formed in float32 from a
    # float32-rounded beta it was 1.3 % off at beta = 1 - 1e-6 (fp32(beta) = 1 - 1.013e-6): the
    # gradient's error was 1e5 times PyTorch's own float32 error.
    z, ts, _ = _data(4, 300, 2, torch.float32, labels=False)
    args = (z, ts, None, None, JSD, beta, 1.0, ENTROPY, 1.0, 0.0, 1.0, 1.0, -100, True)
    out = torch.ops.mtbkd.multi_teacher_kd_fwd(*args)
    truth = ops._ref_multi_teacher_kd_fwd(z.double(), _f64(ts), *args[2:])
    base = ops._ref_multi_teacher_kd_fwd(*args)
    for i, name in enumerate(("loss", "grad")):
        err, err_base = _maxerr(out[i], truth[i]), _maxerr(base[i], truth[i])
        assert err <= 4 * err_base + 1e-6 * truth[i].abs().max().item(), (name, err, err_base)


# ------------------------------------------------------------------------------------------------
# float32 at extreme logits: errors like PyTorch's own float32 (README, known numerical limitations)
# ------------------------------------------------------------------------------------------------


def _extreme(case, n, v, k, seed=1):
    """float32 student [N, V], K teachers, labels and tau for the two extreme regimes.

    ``offset1e4``: logits of magnitude 1e4 with an ordinary spread (student at +1e4, teachers at
    +1e4, -1e4, 0), tau = 1. ``confident``: logits randn * 30 at tau = 0.05 (z / tau ~ 1e3), each
    row's top class 0.01 to 0.2 ahead of a second one (a few classes share q), the teachers the
    student rolled by 1, 2, 3 classes.
    """
    g = torch.Generator().manual_seed(seed)
    if case == "offset1e4":
        z = 1e4 + torch.randn(n, v, generator=g, dtype=torch.float64) * 2
        offsets = torch.tensor([1e4, -1e4, 0.0], dtype=torch.float64)[:k, None, None]
        t = offsets + torch.randn(k, n, v, generator=g, dtype=torch.float64) * 3
        tau = 1.0
    else:
        z = torch.randn(n, v, generator=g, dtype=torch.float64) * 30
        top = z.argmax(-1)
        for r in range(n):
            z[r, (top[r] + 37 * (r + 1)) % v] = z[r, top[r]] - (0.01, 0.03, 0.1, 0.2)[r % 4]
        t = torch.stack([torch.roll(z, i + 1, dims=-1) for i in range(k)])
        tau = 0.05
    y = torch.randint(0, v, (n,), generator=g)
    y[0] = int(z[0].argmax())  # cross-entropy ~ 0 in row 0
    z, t = z.float().to(DEVICE), t.float().to(DEVICE)
    return z, list(t.unbind(0)), y.to(DEVICE), tau


def _assert_like_torch32(out, truth, base, names, factor):
    # The kernel's error against the float64 truth is at most `factor` times PyTorch's float32
    # error (the reference run on the float32 tensors) plus 1e-6 of the quantity's scale. The old
    # single float32 lse = m + log s was ~1000x worse than PyTorch at logits of 1e4 (factor 10
    # here) and up to ~100x at tau = 0.05, where PyTorch's own rounding of z / tau is comparable
    # (factor 2: the kernels subtract the raw max before scaling, so they beat PyTorch there).
    for name, a, b, c in zip(names, out, truth, base, strict=False):
        err, err_base = _maxerr(a, b), _maxerr(c, b)
        tol = factor * err_base + 1e-6 * max(1.0, b.abs().max().item())
        assert err <= tol, (name, err, err_base)


_FACTOR = {"offset1e4": 10, "confident": 2}


@pytest.mark.parametrize("case", ["offset1e4", "confident"])
@pytest.mark.parametrize("div,beta", [(FKL, 0.5), (RKL, 0.5), (JSD, 0.5), (JSD, 1.0)])
def test_kd_fwd_float32_extreme_logits(backend, case, div, beta):
    z, ts, y, tau = _extreme(case, 4, 1271, 3)
    args = (z, ts, y, None, div, beta, tau, UNIFORM, 1.0, 0.5, 1.0, 1.0, -100, True)
    out = torch.ops.mtbkd.multi_teacher_kd_fwd(*args)
    truth = ops._ref_multi_teacher_kd_fwd(z.double(), _f64(ts), *args[2:])
    base = ops._ref_multi_teacher_kd_fwd(*args)
    _assert_like_torch32(out, truth, base, ("loss", "grad"), _FACTOR[case])


@pytest.mark.parametrize("case", ["offset1e4", "confident"])
@pytest.mark.parametrize("cached", [False, True])
def test_mtbkd_fwd_float32_extreme_logits(backend, case, cached):
    z, ts, y, tau = _extreme(case, 4, 1271, 3)
    stats = torch.ops.mtbkd.teacher_stats(ts, tau, 5.0, 1.0, True) if cached else None
    args = (z, ts, y, None, stats, tau, 5.0, 1.0, 1.0, UNIFORM, 1.0, -100, True)
    out = torch.ops.mtbkd.mtbkd_loss_fwd(*args)
    truth = ops._ref_mtbkd_loss_fwd(z.double(), _f64(ts), *args[2:])
    base = ops._ref_mtbkd_loss_fwd(*args)
    names = ("loss", "grad", "weights", "responsibilities")
    _assert_like_torch32(out, truth, base, names, _FACTOR[case])
    if cached:  # the L_k column (its own pass over p_k) and the logsumexp columns
        truth_s = ops._ref_teacher_stats(_f64(ts), tau, 5.0, 1.0, False)
        base_s = ops._ref_teacher_stats(ts, tau, 5.0, 1.0, False)
        cols = ops.TEACHER_STAT_COLUMNS
        _assert_like_torch32(stats.unbind(-1), truth_s.unbind(-1), base_s.unbind(-1), cols, 10)


@pytest.mark.parametrize("div,beta", [(RKL, 0.5), (JSD, 1.0)])
@pytest.mark.parametrize("teacher", ["rolled", "random"])
def test_reverse_kl_gradient_of_a_confident_student(backend, div, beta, teacher):
    # tau = 0.05, logits randn * 30: most rows are one-hot to float32, their true gradient is
    # ~1e-20 or less and PyTorch's float32 gets it to that level; the old kernels' form
    # q (log q - log p - D) / tau cancelled O(|z - t| / tau) terms (errors ~1e-3). Checked row by
    # row; V = 3000 spans two blocks, so the running references move within a row.
    g = torch.Generator().manual_seed(1)
    n, v = 32, 3000
    z = torch.randn(n, v, generator=g, dtype=torch.float64) * 30 + 7
    if teacher == "rolled":
        t = torch.roll(z, 1, dims=-1) - 2
    else:
        t = torch.randn(n, v, generator=g, dtype=torch.float64) * 30
    z, t = z.float().to(DEVICE), t.float().to(DEVICE)
    args = (z, [t], None, None, div, beta, 0.05, UNIFORM, 1.0, 0.0, 1.0, 1.0, -100, True)
    grad = torch.ops.mtbkd.multi_teacher_kd_fwd(*args)[1].double()
    truth = ops._ref_multi_teacher_kd_fwd(z.double(), [t.double()], *args[2:])[1]
    base = ops._ref_multi_teacher_kd_fwd(*args)[1].double()
    err = (grad - truth).abs().amax(-1)
    err_base = (base - truth).abs().amax(-1)
    scale = truth.abs().amax(-1)
    assert (scale < 1e-12).sum() >= n // 2  # the regime under test: mostly confident rows
    tol = 10 * err_base + 1e-6 * scale + 1e-10
    assert torch.all(err <= tol), (err.tolist(), err_base.tolist())


def test_reverse_kl_gradient_rounds_with_the_teachers_spread_over_the_likely_classes(backend):
    # The reverse-KL gradient is formed from d = (z - max z) - (t - b) with b the teacher's logit
    # at the student's top class, so d is 0 there. A student sure of one class (14 logits ahead,
    # q ~ 1 - 1e-4 at tau = 1) and a teacher that is the student rolled by one class: the teacher
    # disagrees by ~14 on that class, but the gradient stays within a few float32 ulps of its
    # row's own size: ~5 under the interpreter, 100 allowed for the GPUs' exp approximations
    # (b at another column, e.g. the teacher's max, leaves d ~ 14 there and errors of ~2e3
    # units, like PyTorch's float32). V = 2500: two blocks, top classes at the block edges too,
    # so b moves within a row.
    g = torch.Generator().manual_seed(0)
    n, v = 24, 2500
    z = torch.randn(n, v, generator=g, dtype=torch.float64) * 3
    top = torch.randint(0, v, (n,), generator=g)
    top[:4] = torch.tensor([0, 2047, 2048, v - 1])
    z[torch.arange(n), top] += 14
    t = torch.roll(z, 1, dims=-1)
    z, t = z.float().to(DEVICE), t.float().to(DEVICE)
    args = (z, [t], None, None, RKL, 0.5, 1.0, UNIFORM, 1.0, 0.0, 1.0, 1.0, -100, True)
    grad = torch.ops.mtbkd.multi_teacher_kd_fwd(*args)[1].double()
    truth = ops._ref_multi_teacher_kd_fwd(z.double(), [t.double()], *args[2:])[1]
    units = (grad - truth).abs().amax(-1) / (torch.finfo(torch.float32).eps * truth.abs().amax(-1))
    assert units.max().item() <= 100, units.tolist()


@pytest.mark.parametrize("div,beta", [(FKL, 0.5), (RKL, 0.5), (JSD, 0.5)])
def test_kd_fwd_masked_logits_unchecked(backend, div, beta):
    # check_finite=False with masked vocabulary entries: -inf at the same columns in the student
    # and the teachers (a whole first block in row 1), or a large finite -1e9 (a whole first block
    # in row 2, so no row reference may come from that block). Everything stays finite and as
    # accurate as PyTorch's float32 where the float64 reference is finite.
    g = torch.Generator().manual_seed(2)
    n, v, k = 4, 3000, 3
    z = torch.randn(n, v, generator=g) * 3
    t = torch.randn(k, n, v, generator=g) * 3
    for row, cols, val in ((0, [3, 1500, 2999], float("-inf")), (1, slice(0, 1100), float("-inf")),
                           (2, slice(0, 1100), -1e9), (3, slice(2900, 3000), -1e9)):  # fmt: skip
        z[row, cols] = val
        t[:, row, cols] = val
    z, t = z.to(DEVICE), t.to(DEVICE)
    y = torch.where(torch.isfinite(z), z, -1e30).argmax(-1)
    args = (z, list(t.unbind(0)), y, None, div, beta, 1.0, ENTROPY, 1.0, 0.5, 1.0, 1.0, -100, False)
    out = torch.ops.mtbkd.multi_teacher_kd_fwd(*args)
    truth = ops._ref_multi_teacher_kd_fwd(z.double(), _f64(list(t.unbind(0))), *args[2:])
    base = ops._ref_multi_teacher_kd_fwd(*args)
    for name, a, b, c in zip(("loss", "grad"), out, truth, base, strict=False):
        assert torch.isfinite(a).all(), name
        ok = torch.isfinite(b) & torch.isfinite(c)
        err, err_base = _maxerr(a[ok], b[ok]), _maxerr(c[ok], b[ok])
        assert err <= 10 * err_base + 1e-6 * max(1.0, b[ok].abs().max().item()), (name, err)


def test_all_rows_masked_give_zeros(backend):
    z, ts, y = _data(3, 50, 2, torch.float32)
    y[:] = -100
    out = torch.ops.mtbkd.mtbkd_loss_fwd(*_mtbkd_args(z, ts, y, ENTROPY, False))
    assert all(torch.all(o == 0) for o in out)
    out = torch.ops.mtbkd.multi_teacher_kd_fwd(*_kd_args(z, ts, y, JSD, 0.5, ENTROPY))
    assert all(torch.all(o == 0) for o in out)


def test_ignore_index_equal_to_a_class_masks_the_row(backend):
    z, ts, y = _data(4, 20, 2, torch.float64, masked=())
    y[2] = 0
    args = list(_kd_args(z, ts, y, FKL, 0.5, ENTROPY))
    args[-2] = 0  # ignore_index = 0, a real class
    out = torch.ops.mtbkd.multi_teacher_kd_fwd(*args)
    ref = ops._ref_multi_teacher_kd_fwd(*args)
    assert out[0][2] == 0 and torch.all(out[1][2] == 0)
    assert _maxerr(out[1], ref[1]) <= 1e-12


def test_single_row_and_single_class(backend):
    z, ts, y = _data(1, 1, 2, torch.float64, masked=())
    args = _mtbkd_args(z, ts, y, ENTROPY, False)
    out = torch.ops.mtbkd.mtbkd_loss_fwd(*args)
    ref = ops._ref_mtbkd_loss_fwd(*args)
    for a, b in zip(out, ref, strict=True):
        assert _maxerr(a, b) <= 1e-10


# ------------------------------------------------------------------------------------------------
# teacher_weights, teacher_stats, scale_grad, autograd
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("mode", [ENTROPY, UNIFORM])
def test_teacher_weights(backend, k, mode):
    _, ts, _ = _data(4, 301, k, torch.float64, labels=False)
    w, h = torch.ops.mtbkd.teacher_weights(ts, mode, 1.5, True)
    wr, hr = ops._ref_teacher_weights(ts, mode, 1.5, False)
    assert _maxerr(w, wr) <= 1e-12 and _maxerr(h, hr) <= 1e-12


def test_teacher_weights_all_one_hot_fall_back_to_uniform(backend):
    t = torch.full((2, 3, 10), -1e4, dtype=torch.float64, device=DEVICE)
    t[:, :, 0] = 0.0
    w, h = torch.ops.mtbkd.teacher_weights(list(t.unbind(0)), ENTROPY, 1.0, True)
    assert torch.all(h == 0) and torch.allclose(w, torch.full_like(w, 0.5))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lam", [0.3, 5.0, 1e4])
def test_teacher_stats(backend, dtype, lam):
    _, ts, _ = _data(4, 1271, 3, dtype, labels=False, layout="separate")
    out = torch.ops.mtbkd.teacher_stats(ts, 2.0, lam, 1.5, True)
    truth = ops._ref_teacher_stats(_f64(ts), 2.0, lam, 1.5, False)
    assert out.shape == (3, 4, 4) and out.dtype == _acc(dtype)
    if dtype == torch.float64:
        assert _maxerr(out, truth) <= 1e-12 * max(1.0, truth.abs().max().item())
    else:
        base = ops._ref_teacher_stats(ts, 2.0, lam, 1.5, False)
        for c in range(4):
            err, err_base = (
                _maxerr(out[..., c], truth[..., c]),
                _maxerr(base[..., c], truth[..., c]),
            )
            assert err <= 2 * err_base + 1e-5 * max(1.0, truth[..., c].abs().max().item()), c


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_scale_grad_rounds_once_like_the_reference(backend, dtype):
    g = torch.Generator().manual_seed(1)
    grad = torch.randn(5, 1271, generator=g).to(DEVICE, dtype)
    rows = torch.randn(5, generator=g, dtype=torch.float64).to(DEVICE, _acc(dtype))
    assert torch.equal(torch.ops.mtbkd.scale_grad(grad, rows), ops._ref_scale_grad(grad, rows))


def test_scale_grad_multiplies_in_the_accumulation_dtype(backend):
    # grad_rows of another dtype (bfloat16 for a float32 grad) is converted first, as on the CPU
    # backend; the Triton kernel multiplied in grad_rows' dtype (garbage under the interpreter).
    g = torch.Generator().manual_seed(1)
    grad = torch.randn(5, 300, generator=g).to(DEVICE)
    rows = torch.randn(5, generator=g).to(DEVICE, torch.bfloat16)
    out = torch.ops.mtbkd.scale_grad(grad, rows)
    assert out.dtype == grad.dtype
    assert torch.equal(out, ops._ref_scale_grad(grad, rows.float()))
    with pytest.raises(TypeError, match="grad_rows must be floating point"):
        torch.ops.mtbkd.scale_grad(grad, torch.ones(5, dtype=torch.int64, device=DEVICE))


def test_scale_grad_rounds_ties_to_even(backend):
    # Products that are exact bfloat16 ties (the float32 bits end in 0x8000), half with an odd
    # last kept bit: round to nearest even goes up there, down for the even ones. Random data
    # almost never hits a tie, so the interpreter's rounding (_to_out) was untested on them.
    lo = [1 + 2**-8, 1 + 2**-7 + 2**-8, 1.5 + 2**-8, 1.5 + 2**-7 + 2**-8, 2 + 2**-7, 3 + 3 * 2**-7]
    rows = torch.tensor(lo + [-x for x in lo], dtype=torch.float32)
    grad = torch.tensor([1.0, 0.5, -2.0, 4.0], dtype=torch.bfloat16)[None, :].repeat(len(rows), 1)
    exact = grad.float() * rows[:, None]
    bits = exact.view(torch.int32)
    assert torch.all(bits & 0xFFFF == 0x8000)  # every product is a tie
    odd = (bits >> 16) & 1 == 1
    assert odd.any() and (~odd).any()
    want = exact.to(torch.bfloat16)  # torch rounds to nearest even
    assert torch.all(want[odd].float().abs() > exact[odd].abs())  # odd: away from zero
    assert torch.all(want[~odd].float().abs() < exact[~odd].abs())
    out = torch.ops.mtbkd.scale_grad(grad.to(DEVICE), rows.to(DEVICE))
    assert torch.equal(out.cpu(), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scale_grad_of_a_vocabulary_wider_than_one_block(backend, dtype):
    # The Triton kernel splits a row into blocks of 4096 columns (a second grid axis): the other
    # scale_grad tests have V <= 1271, one block, so a wrong column offset went unnoticed.
    g = torch.Generator().manual_seed(2)
    grad = torch.randn(3, 9000, generator=g).to(DEVICE, dtype)
    rows = torch.randn(3, generator=g).to(DEVICE)
    assert torch.equal(torch.ops.mtbkd.scale_grad(grad, rows), ops._ref_scale_grad(grad, rows))


def test_strided_labels(backend):
    # labels [N] with a stride (a view): the kernels index them by row, so they must be made
    # contiguous (the Triton wrapper passed the view's storage: row i read label 2i).
    z, ts, _ = _data(4, 37, 2, torch.float64)
    y = torch.randint(0, 37, (8,), generator=torch.Generator().manual_seed(5)).to(DEVICE)[::2]
    y[1] = -100
    args = _mtbkd_args(z, ts, y, ENTROPY, False)
    for a, b in zip(torch.ops.mtbkd.mtbkd_loss_fwd(*args), ops._ref_mtbkd_loss_fwd(*args),
                    strict=True):  # fmt: skip
        assert _maxerr(a, b) <= 1e-10 * max(1.0, b.abs().max().item())
    args = _kd_args(z, ts, y, FKL, 0.5, ENTROPY)
    for a, b in zip(torch.ops.mtbkd.multi_teacher_kd_fwd(*args),
                    ops._ref_multi_teacher_kd_fwd(*args), strict=True):  # fmt: skip
        assert _maxerr(a, b) <= 1e-11


_LGAMMA_X = torch.cat([
    torch.logspace(-30, -4, 300, dtype=torch.float64),
    torch.linspace(1e-4, 12.0, 3000, dtype=torch.float64),
    torch.logspace(1.1, 6, 300, dtype=torch.float64),
    torch.tensor([0.0, 0.5, 1.0, 2.0, 6.5, 7.0], dtype=torch.float64),
])  # fmt: skip
# zeta(2..12), for the series of lgamma(1 + x) at small x
_ZETA = [1.6449340668482264, 1.2020569031595942, 1.0823232337111382, 1.0369277551433699,
         1.0173430619844491, 1.0083492773819228, 1.0040773561979443, 1.0020083928260822,
         1.0009945751278181, 1.0004941886041195, 1.0002460865533080]  # fmt: skip


def _check_lgamma1p(fn):
    """``fn(x) -> lgamma(1 + x)`` (x float32 or float64 on DEVICE) against a float64 truth.

    Truth: torch's float64 lgamma(1 + x), except below x = 0.05 where rounding 1 + x would cost
    digits: there the series -gamma x + sum_k (-1)^k zeta(k) x^k / k (float64-exact by k = 12).
    """
    for dtype, tol in ((torch.float32, 2e-6), (torch.float64, 1e-13)):
        xd = _LGAMMA_X.to(dtype).to(DEVICE)
        out = fn(xd)
        xr = xd.double().cpu()  # the rounded input: its exact lgamma(1 + x) is the truth
        series = -0.5772156649015329 * xr
        for k, zk in enumerate(_ZETA, start=2):
            series = series + (-1) ** k * zk / k * xr**k
        ref = torch.where(xr < 0.05, series, torch.lgamma(1.0 + xr))
        got = out.double().cpu()
        rel = torch.where(ref == 0, (got - ref).abs(), (got - ref).abs() / ref.abs())
        assert rel.max().item() <= tol, (dtype, rel.max().item(), xr[rel.argmax()].item())
        assert out[xd == 1.0].item() == 0.0 and out[xd == 0.0].item() == 0.0


def test_lgamma1p_accuracy():
    def run(xd):
        out = torch.empty_like(xd)
        high = xd.dtype == torch.float64
        _lgamma1p_kernel[(triton.cdiv(xd.numel(), 256),)](xd, out, xd.numel(), HIGH=high, BLOCK=256)
        return out

    _check_lgamma1p(run)


@pytest.mark.skipif(
    ops.backend_status()["cuda"] is not None, reason=f"cuda backend: {ops.backend_status()['cuda']}"
)
def test_cuda_lgamma1p_accuracy():
    _check_lgamma1p(torch.ops.mtbkd_C.lgamma1p)


def test_autograd_through_the_ops(backend):
    z, ts, y = _data(4, 97, 2, torch.float32)
    zr = z.clone().requires_grad_(True)
    args = _mtbkd_args(zr, ts, y, ENTROPY, False)
    loss = torch.ops.mtbkd.mtbkd_loss_fwd(*args)[0]
    (loss * 2).sum().backward()
    grad = torch.ops.mtbkd.mtbkd_loss_fwd(*_mtbkd_args(z, ts, y, ENTROPY, False))[1]
    torch.testing.assert_close(zr.grad, 2 * grad, rtol=0, atol=0)
    zr.grad = None
    out = torch.ops.mtbkd.multi_teacher_kd_fwd(*_kd_args(zr, ts, y, RKL, 0.5, ENTROPY))[0]
    weights = torch.arange(4, dtype=out.dtype, device=DEVICE)
    (out * weights).sum().backward()
    grad = torch.ops.mtbkd.multi_teacher_kd_fwd(*_kd_args(z, ts, y, RKL, 0.5, ENTROPY))[1]
    torch.testing.assert_close(zr.grad, (grad.float() * weights[:, None]).to(grad.dtype))


def test_functional_api_runs_on_the_backend(backend):
    z, ts, y = _data(6, 53, 3, torch.float64)
    zr = z.clone().requires_grad_(True)
    loss = mtbkd.mtbkd_loss(zr, torch.stack(ts), y)
    loss.backward()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MTBKD_BACKEND", "reference")
        zr2 = z.clone().requires_grad_(True)
        ref = mtbkd.mtbkd_loss(zr2, torch.stack(ts), y)
        ref.backward()
    assert abs(loss.item() - ref.item()) <= 1e-12
    assert _maxerr(zr.grad, zr2.grad) <= 1e-13


# ------------------------------------------------------------------------------------------------
# Errors: labels out of range and non-finite logits (raised on CPU; asserted on device on CUDA)
# ------------------------------------------------------------------------------------------------


@pytest.mark.skipif(ON_CUDA, reason=NO_DEVICE_ASSERT)
def test_label_out_of_range_raises(backend):
    z, ts, y = _data(4, 10, 2, torch.float32, masked=())
    y[3] = 10
    with pytest.raises(ValueError, match="labels.*row 3"):
        torch.ops.mtbkd.mtbkd_loss_fwd(*_mtbkd_args(z, ts, y, ENTROPY, False, check=False))
    y[3] = -1
    with pytest.raises(ValueError, match="labels"):
        torch.ops.mtbkd.multi_teacher_kd_fwd(*_kd_args(z, ts, y, FKL, 0.5, ENTROPY, check=False))


@pytest.mark.skipif(ON_CUDA, reason=NO_DEVICE_ASSERT)
def test_non_finite_logits_raise_only_in_unmasked_rows(backend):
    z, ts, y = _data(4, 10, 2, torch.float32)  # row 1 masked
    z[1, 3] = float("nan")
    torch.ops.mtbkd.mtbkd_loss_fwd(*_mtbkd_args(z, ts, y, ENTROPY, False))  # masked: fine
    z[2, 3] = float("inf")
    with pytest.raises(ValueError, match="student_logits.*row 2"):
        torch.ops.mtbkd.mtbkd_loss_fwd(*_mtbkd_args(z, ts, y, ENTROPY, False))
    z[2, 3] = 0.0
    ts[1][0, 0] = float("-inf")
    with pytest.raises(ValueError, match="teacher_logits.*row 0"):
        torch.ops.mtbkd.multi_teacher_kd_fwd(*_kd_args(z, ts, y, JSD, 0.5, ENTROPY))
    with pytest.raises(ValueError, match="teacher_logits"):
        torch.ops.mtbkd.teacher_stats(ts, 2.0, 5.0, 1.0, True)
    # check_finite=False: no check, and no error
    torch.ops.mtbkd.teacher_stats(ts, 2.0, 5.0, 1.0, False)


@pytest.mark.skipif(ON_CUDA, reason=NO_DEVICE_ASSERT)
def test_errors_without_labels_and_in_several_rows_name_the_first_row(backend):
    # check_finite must hold without labels too (the status vector was only allocated, and
    # read, when labels were given), and with several bad rows the first one is named, as on the
    # reference and CPU backends.
    z, ts, y = _data(5, 10, 2, torch.float32, labels=False)
    z[3, 0] = float("inf")
    z[1, 3] = float("nan")
    with pytest.raises(ValueError, match=r"student_logits.*\(row 1\)"):
        torch.ops.mtbkd.mtbkd_loss_fwd(*_mtbkd_args(z, ts, None, ENTROPY, False))
    with pytest.raises(ValueError, match=r"student_logits.*\(row 1\)"):
        torch.ops.mtbkd.multi_teacher_kd_fwd(*_kd_args(z, ts, None, RKL, 0.5, ENTROPY))
    loss = torch.ops.mtbkd.mtbkd_loss_fwd(*_mtbkd_args(z, ts, None, ENTROPY, False, check=False))[0]
    assert torch.isfinite(loss[[0, 2, 4]]).all() and not torch.isfinite(loss[[1, 3]]).any()
    z[1, 3] = z[3, 0] = 0.0
    ts[1][4, 2] = float("-inf")
    ts[0][2, 7] = float("nan")
    with pytest.raises(ValueError, match=r"teacher_logits.*\(row 2\)"):
        torch.ops.mtbkd.mtbkd_loss_fwd(*_mtbkd_args(z, ts, None, ENTROPY, False))
    with pytest.raises(ValueError, match=r"teacher_logits.*\(row 2\)"):
        torch.ops.mtbkd.multi_teacher_kd_fwd(*_kd_args(z, ts, None, JSD, 0.5, ENTROPY))
    with pytest.raises(ValueError, match=r"teacher_logits.*\(row 2\)"):
        torch.ops.mtbkd.teacher_weights(ts, ENTROPY, 1.0, True)
    ts[1][4, 2] = ts[0][2, 7] = 0.0
    y = torch.tensor([0, 10, 3, -1, 9], device=DEVICE)
    with pytest.raises(ValueError, match=r"labels.*row 1 does not"):
        torch.ops.mtbkd.mtbkd_loss_fwd(*_mtbkd_args(z, ts, y, ENTROPY, False))


@pytest.mark.skipif(ON_CUDA, reason="the interpreter-only guard is what is tested")
def test_forced_triton_on_cpu_without_interpreter_is_an_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("MTBKD_BACKEND", "triton")
    z, ts, y = _data(2, 5, 1, torch.float32)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        torch.ops.mtbkd.mtbkd_loss_fwd(*_mtbkd_args(z, ts, y, ENTROPY, False))


# ------------------------------------------------------------------------------------------------
# TeacherStats
# ------------------------------------------------------------------------------------------------


def test_teacher_stats_cache_matches_reference_and_slices(backend):
    g = torch.Generator().manual_seed(5)
    t = (torch.randn(3, 4, 6, 40, generator=g, dtype=torch.float64) * 2).to(DEVICE)  # [K, B, T, V]
    stats = TeacherStats(t, temperature=2.0, concentration=5.0, weight_temperature=1.5)
    assert stats.data.shape == (3, 4, 6, 4) and stats.num_teachers == 3 and len(stats) == 4
    flat = [x.reshape(-1, 40) for x in t.unbind(0)]
    ref = ops._ref_teacher_stats(flat, 2.0, 5.0, 1.5, False).reshape(3, 4, 6, 4)
    assert _maxerr(stats.data, ref) <= 1e-12 * ref.abs().max().item()
    idx = torch.tensor([3, 0])
    sub = stats[idx]
    assert torch.equal(sub.data, stats.data[:, idx.to(stats.device)])
    assert torch.equal(stats[1:3].data, stats.data[:, 1:3]) and stats[2].data.shape == (3, 6, 4)
    assert sub.temperature == 2.0 and sub.vocab_size == 40
    moved = stats.to("cpu")
    assert moved.device.type == "cpu" and torch.equal(moved.data, stats.data.cpu())
    assert "K=3" in repr(stats)


def test_teacher_stats_in_the_loss_and_mismatch_errors(backend):
    z, ts, y = _data(8, 33, 2, torch.float64)
    t = torch.stack(ts)
    stats = TeacherStats(t)  # defaults match mtbkd_loss's: tau=2, lam=5, tau_w=1
    plain = mtbkd.mtbkd_loss(z, t, y, reduction="none")
    cached = mtbkd.mtbkd_loss(z, t, y, reduction="none", teacher_stats=stats)
    assert _maxerr(plain, cached) <= 1e-12
    part = mtbkd.mtbkd_loss(z[2:5], t[:, 2:5], y[2:5], reduction="none", teacher_stats=stats[2:5])
    assert _maxerr(part, plain[2:5]) <= 1e-12
    with pytest.raises(ValueError, match="temperature"):
        mtbkd.mtbkd_loss(z, t, y, temperature=3.0, teacher_stats=stats)
    with pytest.raises(ValueError, match="rows"):
        mtbkd.mtbkd_loss(z[:4], t[:, :4], y[:4], teacher_stats=stats)
    with pytest.raises(ValueError, match="teachers"):
        mtbkd.mtbkd_loss(z, t[:1], y, teacher_stats=stats)


def test_teacher_stats_bad_input():
    with pytest.raises(ValueError, match="temperature"):
        TeacherStats(torch.randn(2, 3, 4), temperature=0.0)
    with pytest.raises(TypeError, match="teacher_logits"):
        TeacherStats("not a tensor")
    with pytest.raises(ValueError, match="teacher_logits"):
        TeacherStats([])


# ------------------------------------------------------------------------------------------------
# Ahead-of-time compilation for the GPUs the project targets (no GPU needed)
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_triton_compiles_for_sm80_sm90():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MTBKD_BACKEND")}
    script = os.path.join(os.path.dirname(__file__), "_triton_aot.py")
    proc = subprocess.run(
        [sys.executable, script, "80", "90"], env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    # 3 layouts x 8 launches (mtbkd, cached mtbkd, 3 divergences, weights, stats, scale) x 2 archs
    assert proc.stdout.count('"ok": true') == 48, proc.stdout
