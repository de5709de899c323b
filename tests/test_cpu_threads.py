"""The C++ CPU kernels give on several threads what they give on one.

The kernels spread rows (losses) or 1024-element tiles (Bayesian ops) over threads with
``at::parallel_for``. Under pytest-xdist (``make test``) every worker runs with one torch thread
(tests/conftest.py), so the other tests no longer reach the threaded paths; this module sets two
threads and more itself, with inputs of many parallel tasks, and compares each output with a
one-thread run: bitwise for per-row and per-element outputs, to rounding for the summed KL (a
``parallel_reduce`` adds the threads' partial sums in another order).
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from mtbkd import bayes_ops as B
from mtbkd import ops

pytestmark = pytest.mark.skipif(
    ops.backend_status()["cpu"] is not None,
    reason=f"C++ extension not built: {ops.backend_status()['cpu']}",
)

THREADS = (2, 3)  # two threads, and a count that does not divide the tasks evenly


@pytest.fixture(autouse=True)
def _cpu_backend(monkeypatch):
    monkeypatch.setenv("MTBKD_BACKEND", "cpu")


@contextlib.contextmanager
def _threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        assert torch.get_num_threads() == n
        yield
    finally:
        torch.set_num_threads(old)


def _on_threads(fn):
    """``fn()`` on one thread and on each of THREADS: ``(one, [several, ...])``."""
    with _threads(1):
        one = fn()
    several = []
    for n in THREADS:
        with _threads(n):
            several.append(fn())
    return one, several


def _same(one, several, **tol):
    tol = tol or {"rtol": 0, "atol": 0}
    for got in several:
        assert len(got) == len(one)
        for i, (a, b) in enumerate(zip(got, one, strict=True)):
            torch.testing.assert_close(a, b, **tol, equal_nan=True, msg=lambda m, i=i: f"[{i}] {m}")


def _inputs(n, v, k, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(n, v, generator=g, dtype=torch.float64) * 3).to(dtype)
    ts = [(torch.randn(n, v, generator=g, dtype=torch.float64) * 3 + j).to(dtype) for j in range(k)]
    y = torch.randint(0, v, (n,), generator=g)
    y[1] = -100  # a masked row
    return z, ts, y


# 96 rows of V = 1000 with K = 2: a grain of 32768 / 3000 -> 10 rows, ten parallel tasks
N, V, K = 96, 1000, 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_loss_kernels_on_several_threads(dtype):
    z, ts, y = _inputs(N, V, K, dtype)
    fixed = torch.rand(K, N, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    fixed = (fixed / fixed.sum(0)).to(ops._acc_dtype(dtype))
    cases = [
        # (student, teachers, labels, fixed, stats, tau, lam, bp, bh, mode, tau_w, ignore, check)
        lambda: ops.mtbkd_loss_fwd(z, ts, y, None, None, 2.0, 5.0, 0.02, 1.0, 0, 1.0, -100, True),
        lambda: ops.mtbkd_loss_fwd(z, ts, y, fixed, None, 2.0, 5.0, 0.02, 1.0, 0, 1.0, -100, True),
        lambda: ops.mtbkd_loss_fwd(z, ts, None, None, None, 1.0, 2.0, 0.0, 1.0, 1, 1.0, -100, True),
    ]
    for div in (0, 1, 2):
        # (student, teachers, labels, fixed, div, beta, tau, mode, tau_w, bh, bs, scale, ignore,
        #  check)
        cases.append(
            lambda div=div: ops.multi_teacher_kd_fwd(
                z, ts, y, None, div, 0.5, 1.5, 0, 1.0, 0.5, 1.0, 1.0, -100, True
            )
        )
    cases.append(lambda: ops.teacher_weights_op(ts, 0, 1.0, True))
    cases.append(lambda: [ops.teacher_stats_op(ts, 2.0, 5.0, 1.0, True)])
    rows = torch.rand(N, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    cases.append(lambda: [ops.scale_grad(z, rows.to(ops._acc_dtype(dtype)))])
    for fn in cases:
        one, several = _on_threads(fn)
        _same(one, several)


def test_the_first_bad_row_is_named_on_several_threads():
    z, ts, y = _inputs(N, V, K, torch.float32)
    for row in (37, 61, 90):  # in different tasks, none the first
        ts[1][row, row] = float("nan")
    for n in (1, *THREADS):
        with _threads(n), pytest.raises(ValueError, match=r"teacher_logits.*\(row 37\)"):
            ops.mtbkd_loss_fwd(z, ts, y, None, None, 2.0, 5.0, 0.02, 1.0, 0, 1.0, -100, True)


# 2**18 + 5 elements: 257 tiles of 1024, five tasks of 64 tiles, the last one partial
NB = 2**18 + 5


def _mu_rho(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(NB, generator=g, dtype=torch.float64).to(dtype)
    rho = (torch.randn(NB, generator=g, dtype=torch.float64) - 3).to(dtype)
    return mu, rho


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_bayes_kernels_on_several_threads(dtype):
    mu, rho = _mu_rho(dtype)
    grad = torch.randn(NB, generator=torch.Generator().manual_seed(5)).to(dtype)

    def sample():
        m, r = mu.clone().requires_grad_(), rho.clone().requires_grad_()
        w = B.reparameterize(m, r, seed=11, offset=7)
        w.backward(grad)
        return w.detach(), m.grad, r.grad

    def kl_grads():
        m, r = mu.clone().requires_grad_(), rho.clone().requires_grad_()
        B.gaussian_kl(m, r, prior_sigma=0.5, prior_mu=0.1).backward(torch.tensor(3.0))
        return m.grad, r.grad

    def sample_kl_grads():
        m, r = mu.clone().requires_grad_(), rho.clone().requires_grad_()
        w, kl = B.reparameterize_kl(m, r, seed=11, offset=7, prior_sigma=0.5)
        (w.float() * grad.float()).sum().add(2.0 * kl).backward()
        return w.detach(), m.grad, r.grad

    def sgld(precondition):
        def step():
            p, g = mu.clone(), grad.clone()
            sq = [torch.rand(NB, generator=torch.Generator().manual_seed(6)).to(B._acc(dtype))]
            B.sgld_step_([p], [g], sq if precondition else None, lr=1e-3, num_data=100.0,
                         weight_decay=0.1, seed=13, precondition=precondition)  # fmt: skip
            return [p, *sq]

        return step

    for fn in (sample, kl_grads, sample_kl_grads, sgld(False), sgld(True)):
        one, several = _on_threads(fn)
        _same(one, several)
    # the summed KL: the partial sums of the threads, added in another order
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    tol = {"rtol": 1e-12 if acc == torch.float64 else 1e-6, "atol": 0.0}
    one, several = _on_threads(lambda: [B.gaussian_kl(mu, rho, prior_sigma=0.5)])
    _same(one, several, **tol)
    one, several = _on_threads(lambda: [B.reparameterize_kl(mu, rho, seed=11, prior_sigma=0.5)[1]])
    _same(one, several, **tol)
    assert one[0].dtype == acc
