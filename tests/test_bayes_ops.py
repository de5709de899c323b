"""Fused reparameterised sampling, Gaussian KL and the SGLD step op (MATH.md sections 6-7) on
every backend available here, against plain-torch formulas and torch.distributions."""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mtbkd import bayes_ops as B
from mtbkd.ops import backend_status

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _backend_params():
    status = backend_status()
    out = []
    for be in ("reference", "cpu", "triton", "cuda"):
        reason = status[be]
        if reason is None and be == "cpu" and DEVICE != "cpu":
            reason = "the cpu backend runs on CPU tensors; tests run on CUDA here"
        if reason is None and be == "cuda" and DEVICE != "cuda":
            reason = "no CUDA device"
        mark = pytest.mark.skipif(reason is not None, reason=str(reason))
        out.append(pytest.param(be, marks=mark))
    return out


BACKENDS = _backend_params()


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("MTBKD_BACKEND", request.param)
    return request.param


def _n(backend: str, big: int) -> int:
    # The Triton interpreter (numpy per program) and the integer-op reference Philox are slow on
    # CPU: their statistical tests use fewer samples (the tolerances scale with 1/sqrt(n)).
    if DEVICE == "cpu" and backend in ("triton", "reference"):
        return big // 8
    return big


def _rho_for_sigma(sigma: float) -> float:
    return math.log(math.expm1(sigma))  # softplus^-1


# ---------------------------------------------------------------------------------------------
# The generator
# ---------------------------------------------------------------------------------------------


def test_philox_known_answer():
    # Random123's known-answer vector for Philox4x32-10, counter 0 and key 0.
    x = B._philox_uint32(0, torch.zeros(1, dtype=torch.int64), 0)
    assert [hex(int(v)) for v in x] == ["0x6627e8d5", "0xe169c58d", "0xbc57ac4c", "0x9b00dbd8"]


@pytest.mark.skipif(backend_status()["cpu"] is not None, reason=str(backend_status()["cpu"]))
@pytest.mark.parametrize("stream", [0, 3])
def test_cpu_generator_matches_reference_stream(stream):
    # The last case crosses a carry into the high counter word inside one 16-counter vector.
    cases = [(0, 0, 1), (7, 5, 1027), (2**40 + 3, 2**33 + 1, 4099), (5, 2**32 - 7, 400)]
    for seed, offset, n in cases:
        ref = B.philox_normal(seed, offset, n, stream=stream)
        cpu = B.philox_normal(seed, offset, n, stream=stream, backend="cpu")
        assert cpu.shape == (n,)
        torch.testing.assert_close(cpu, ref, atol=2e-6, rtol=2e-6)


def test_stream_layout_uses_counter_offset():
    # Element i is normal i % 4 of counter offset + i // 4: shifting the offset by one counter
    # shifts the stream by four elements.
    a = B.philox_normal(11, 0, 40)
    b = B.philox_normal(11, 1, 36)
    torch.testing.assert_close(a[4:], b)


# ---------------------------------------------------------------------------------------------
# reparameterize
# ---------------------------------------------------------------------------------------------


def test_sample_is_the_reference_stream(backend):
    n = 2051
    mu = torch.zeros(n, dtype=torch.float64, device=DEVICE)
    rho = torch.full_like(mu, _rho_for_sigma(1.0))
    w = B.reparameterize(mu, rho, seed=1234, offset=17)
    eps = B.philox_normal(1234, 17, n).double().to(DEVICE)
    # One stream everywhere; the transcendentals (log, sin, cos) differ by an ulp or so between
    # libraries (on a GPU, Triton's tl.randn4x uses its own approximate log/sin/cos: a looser
    # bound there).
    tol = 2e-6 if DEVICE == "cpu" else 2e-5
    torch.testing.assert_close(w, eps, atol=tol, rtol=tol)


def test_box_muller_clamps_the_uniform_at_1e_7(backend):
    # Counter 5926005 of seed 2024 draws u = 6.2e-8 < 1e-7 as the radius uniform of its second
    # pair (elements 22 and 23 from offset 5926000): tl.pair_uniform_to_normal (and csrc/philox.h)
    # clamp it at 1e-7, so the radius is sqrt(-2 log 1e-7), not sqrt(-2 log u) (1.2 % larger).
    # Every backend, the reference generator included, against the closed form in float64.
    seed, offset, n = 2024, 5926000, 40
    x = B._philox_uint32(seed, torch.tensor([offset + 5]), 0)
    u_radius, u_angle = B._uniform(x[2]).item(), B._uniform(x[3]).item()
    assert u_radius < 1e-7
    r = math.sqrt(-2 * math.log(1e-7))
    th = 2 * math.pi * u_angle
    want = torch.tensor([r * math.cos(th), r * math.sin(th)], dtype=torch.float64)
    ref = B.philox_normal(seed, offset, n).double()
    torch.testing.assert_close(ref[22:24], want, atol=2e-6, rtol=2e-6)
    mu = torch.zeros(n, dtype=torch.float64, device=DEVICE)
    rho = torch.full_like(mu, _rho_for_sigma(1.0))
    w = B.reparameterize(mu, rho, seed=seed, offset=offset).cpu()
    tol = 2e-6 if DEVICE == "cpu" else 2e-5
    torch.testing.assert_close(w, ref, atol=tol, rtol=tol)


def test_large_seed_and_offset_across_the_32_bit_carry(backend):
    # Seeds use both 32-bit key words and the counter both 32-bit words: the sample (and the
    # backward's regenerated eps) of a seed >= 2**32 at counters crossing 2**32 is the reference
    # stream there. (The other tests' seeds and offsets fit in 32 bits.)
    n = 1500
    seed, offset = 2**40 + 3, 2**32 - 7
    mu = torch.zeros(n, dtype=torch.float64, device=DEVICE)
    rho = torch.full_like(mu, _rho_for_sigma(1.0)).requires_grad_(True)
    w = B.reparameterize(mu, rho, seed=seed, offset=offset)
    eps = B.philox_normal(seed, offset, n).double().to(DEVICE)
    tol = 2e-6 if DEVICE == "cpu" else 2e-5
    torch.testing.assert_close(w.detach(), eps, atol=tol, rtol=tol)
    g = torch.randn_like(mu)
    (drho,) = torch.autograd.grad(w, rho, g)
    torch.testing.assert_close(drho, g * eps * torch.sigmoid(rho.detach()), atol=tol, rtol=tol)


def test_moments_and_independence(backend):
    n = _n(backend, 400_000)
    m0, s0 = 0.3, 2.0
    mu = torch.full((n,), m0, device=DEVICE)
    rho = torch.full_like(mu, _rho_for_sigma(s0))
    w1 = B.reparameterize(mu, rho, seed=5).double()
    w2 = B.reparameterize(mu, rho, seed=6).double()
    w3 = B.reparameterize(mu, rho, seed=5, offset=B.counters_used(n)).double()
    se = 1 / math.sqrt(n)
    for w in (w1, w2, w3):
        z = (w - m0) / s0
        assert abs(z.mean().item()) < 5 * se
        assert abs(z.std().item() - 1) < 5 * se
        # Gaussian tails: fraction beyond 2 sigma is 4.55 %.
        assert abs((z.abs() > 2).double().mean().item() - 0.0455) < 5 * math.sqrt(0.0455 / n)
        # Neighbours share a Philox block (lags 1-3) or not (lag 4): all uncorrelated.
        for lag in (1, 2, 3, 4, 5):
            r = torch.corrcoef(torch.stack([z[:-lag], z[lag:]]))[0, 1].item()
            assert abs(r) < 5 * se, lag
    # Independent across calls (seeds) and across offsets under one seed.
    for a, b in ((w1, w2), (w1, w3), (w2, w3)):
        assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 5 * se


def test_same_seed_same_sample(backend):
    mu = torch.randn(33, 65, device=DEVICE)
    rho = torch.randn(33, 65, device=DEVICE)
    a = B.reparameterize(mu, rho, seed=42, offset=3)
    b = B.reparameterize(mu, rho, seed=42, offset=3)
    c = B.reparameterize(mu, rho, seed=43, offset=3)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_seed_from_torch_generator(backend):
    mu = torch.zeros(100, device=DEVICE)
    rho = torch.zeros(100, device=DEVICE)
    torch.manual_seed(0)
    a = B.reparameterize(mu, rho)
    torch.manual_seed(0)
    b = B.reparameterize(mu, rho)
    assert torch.equal(a, b)
    assert not torch.equal(a, B.reparameterize(mu, rho))


def test_backward_eps_equals_forward_eps(backend):
    torch.manual_seed(1)
    mu = torch.randn(257, 9, dtype=torch.float64, device=DEVICE, requires_grad=True)
    rho = torch.randn(257, 9, dtype=torch.float64, device=DEVICE, requires_grad=True)
    w = B.reparameterize(mu, rho, seed=99, offset=2)
    g = torch.randn_like(w)
    dmu, drho = torch.autograd.grad(w, (mu, rho), g)
    with torch.no_grad():
        eps_fwd = (w - mu) / F.softplus(rho)
    torch.testing.assert_close(dmu, g, rtol=0, atol=0)
    torch.testing.assert_close(drho, g * eps_fwd * torch.sigmoid(rho), rtol=1e-10, atol=1e-12)


def test_gradients_against_autograd_of_plain_formula(backend):
    torch.manual_seed(2)
    shape = (45, 37)
    mu = torch.randn(shape, dtype=torch.float64, device=DEVICE, requires_grad=True)
    rho = (torch.randn(shape, dtype=torch.float64, device=DEVICE) - 2).requires_grad_(True)
    g = torch.randn(shape, dtype=torch.float64, device=DEVICE)
    w = B.reparameterize(mu, rho, seed=7, offset=0)
    grads = torch.autograd.grad(w, (mu, rho), g)
    eps = B.philox_normal(7, 0, mu.numel()).double().to(DEVICE).view(shape)
    w_plain = mu + F.softplus(rho) * eps
    plain = torch.autograd.grad(w_plain, (mu, rho), g)
    torch.testing.assert_close(w, w_plain, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, plain):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# Triton's interpreter evaluates both sides of tl.where with numpy: the discarded x / 0 of log1p
@pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sigma_is_torch_softplus_over_the_whole_range(backend, dtype):
    # sigma = softplus(rho) to a few ulps from rho = -40 (exp(rho) far below an ulp of 1: a plain
    # log(1 + exp(rho)) is 0 there, or 1e-3 off at -9) through torch's threshold (rho > 20: rho
    # itself) to rho = 100 (exp overflows float32). With mu = 0 and one (seed, offset) the ratio
    # w(rho) / w(0) = softplus(rho) / log 2 is free of eps (the backends' eps differ by an ulp).
    rho = torch.linspace(-40.0, 100.0, 1401, dtype=torch.float64).to(dtype).to(DEVICE)
    mu = torch.zeros_like(rho)
    w = B.reparameterize(mu, rho, seed=31).double()
    w0 = B.reparameterize(mu, mu, seed=31).double()
    eps = B.philox_normal(31, 0, rho.numel()).double().to(DEVICE)
    torch.testing.assert_close(w0, math.log(2) * eps, atol=2e-5, rtol=2e-5)
    sigma = w / w0 * math.log(2)
    true = F.softplus(rho.double())
    err = ((sigma - true).abs() / true).max().item()
    assert err <= 8 * torch.finfo(dtype).eps, err  # measured: <= 2.4 ulps


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_no_worse_than_plain_torch(backend, dtype):
    torch.manual_seed(3)
    shape = (64, 50)
    mu64 = torch.randn(shape, dtype=torch.float64, device=DEVICE)
    rho64 = torch.randn(shape, dtype=torch.float64, device=DEVICE) * 2
    mu, rho = mu64.to(dtype), rho64.to(dtype)
    mu.requires_grad_(True)
    rho.requires_grad_(True)
    g = torch.randn(shape, dtype=dtype, device=DEVICE)
    w = B.reparameterize(mu, rho, seed=8)
    dmu, drho = torch.autograd.grad(w, (mu, rho), g)
    assert w.dtype == dtype and drho.dtype == dtype
    eps = B.philox_normal(8, 0, mu.numel()).to(DEVICE).view(shape)
    # The truth from the same (rounded) inputs in float64; plain torch in `dtype` as the bar.
    m, r, g64 = mu.detach().double(), rho.detach().double(), g.double()
    w_true = m + F.softplus(r) * eps.double()
    drho_true = g64 * eps.double() * torch.sigmoid(r)
    with torch.no_grad():
        w_plain = mu + F.softplus(rho) * eps.to(dtype)
        drho_plain = g * eps.to(dtype) * torch.sigmoid(rho)
    ulp = torch.finfo(dtype).eps
    for ours, plain, true in ((w, w_plain, w_true), (drho, drho_plain, drho_true)):
        err = (ours.double() - true).abs().max().item()
        bar = (plain.double() - true).abs().max().item()
        assert err <= bar + ulp * true.abs().max().item(), (err, bar)


def _half_ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Half the spacing of ``dtype`` at the float64 values ``x`` (subnormals included)."""
    fi = torch.finfo(dtype)
    bits = {torch.bfloat16: 8, torch.float16: 11}[dtype]  # significand bits
    _, e = torch.frexp(x)
    spacing = torch.ldexp(torch.ones_like(x), e - bits)
    return 0.5 * spacing.clamp(min=fi.tiny * fi.eps)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_sample_is_rounded_once(backend, dtype):
    # MATH.md section 2's numerics: bf16 / fp16 inputs are computed in fp32, so every backend's
    # w = mu + softplus(rho) eps is the float64 truth (same rounded inputs, same eps) rounded once:
    # within half an ulp of it, up to float32 slack. Rounding softplus(rho) eps to the storage
    # dtype before the add would be up to a whole ulp off.
    torch.manual_seed(21)
    shape = (64, 50)
    mu = (torch.randn(shape, dtype=torch.float64) * 0.5).to(dtype).to(DEVICE)
    rho = torch.randn(shape, dtype=torch.float64).to(dtype).to(DEVICE)
    w = B.reparameterize(mu, rho, seed=8)
    eps = B.philox_normal(8, 0, mu.numel()).double().to(DEVICE).view(shape)
    noise = F.softplus(rho.double()) * eps
    true = mu.double() + noise
    slack = 1e-6 * (mu.double().abs() + noise.abs())
    err = (w.double() - true).abs()
    assert (err <= _half_ulp(true, dtype) + slack).all(), (err / _half_ulp(true, dtype)).max()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_gradient_is_rounded_once(backend, dtype):
    # The backward's drho = g eps sigmoid(rho) of bf16 / fp16 tensors is computed in fp32 and
    # rounded once: within half an ulp of the float64 product from the same stored g and rho
    # (plus float32 slack, which also covers the backends' eps differing by an ulp).
    torch.manual_seed(22)
    shape = (64, 50)
    mu = torch.randn(shape, dtype=torch.float64).to(dtype).to(DEVICE)
    rho = torch.randn(shape, dtype=torch.float64).to(dtype).to(DEVICE).requires_grad_(True)
    g = torch.randn(shape, dtype=torch.float64).to(dtype).to(DEVICE)
    w = B.reparameterize(mu, rho, seed=9, offset=5)
    (drho,) = torch.autograd.grad(w, rho, g)
    assert drho.dtype == dtype
    eps = B.philox_normal(9, 5, mu.numel()).double().to(DEVICE).view(shape)
    true = g.double() * eps * torch.sigmoid(rho.detach().double())
    err = (drho.double() - true).abs()
    bound = _half_ulp(true, dtype) + 1e-6 * true.abs()
    assert (err <= bound).all(), (err / _half_ulp(true, dtype)).max()


def test_empty_and_odd_shapes(backend):
    for shape in [(0,), (1,), (3,), (5, 1), (2, 3, 7)]:
        mu = torch.zeros(shape, device=DEVICE)
        w = B.reparameterize(mu, torch.zeros_like(mu), seed=1)
        assert w.shape == mu.shape


def test_finite_float64_beyond_the_float32_range_is_not_called_non_finite(backend):
    # an audit: the cpu kernel's finiteness check cast float64 to float, so a finite 1e300 read as
    # inf ("mu contains non-finite values") where the other backends sampled it
    for mu, rho in (([1e300, 0.0], [0.0, 0.0]), ([0.0, 0.0], [0.0, 1e200])):
        mu = torch.tensor(mu, dtype=torch.float64, device=DEVICE)
        rho = torch.tensor(rho, dtype=torch.float64, device=DEVICE)
        w = B.reparameterize(mu, rho, seed=3)
        assert torch.isfinite(w).all()
        want = mu + torch.nn.functional.softplus(rho) * B.reparameterize(
            torch.zeros_like(mu), torch.full_like(rho, 0.5413248546129181), seed=3
        )  # softplus(0.5413...) = 1: the sample's eps
        torch.testing.assert_close(w, want)
    with pytest.raises(ValueError, match="mu contains non-finite"):
        B.reparameterize(torch.tensor([math.inf, 0.0], dtype=torch.float64, device=DEVICE),
                         torch.zeros(2, dtype=torch.float64, device=DEVICE), seed=3)  # fmt: skip


def test_non_contiguous_inputs(backend):
    mu = torch.randn(20, 30, device=DEVICE).t()
    rho = torch.randn(20, 30, device=DEVICE).t()
    w = B.reparameterize(mu, rho, seed=4)
    expected = B.reparameterize(mu.contiguous(), rho.contiguous(), seed=4)
    assert torch.equal(w, expected)


# ---------------------------------------------------------------------------------------------
# gaussian_kl
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prior", [(0.0, 1.0), (0.5, 0.1), (-1.0, 3.0)])
def test_kl_against_torch_distributions(backend, prior):
    prior_mu, prior_sigma = prior
    torch.manual_seed(4)
    shape = (31, 17)
    mu = torch.randn(shape, dtype=torch.float64, device=DEVICE, requires_grad=True)
    rho = (torch.randn(shape, dtype=torch.float64, device=DEVICE) * 3).requires_grad_(True)
    kl = B.gaussian_kl(mu, rho, prior_sigma=prior_sigma, prior_mu=prior_mu)
    q = torch.distributions.Normal(mu, F.softplus(rho))
    p = torch.distributions.Normal(torch.full_like(mu, prior_mu), torch.full_like(mu, prior_sigma))
    expected = torch.distributions.kl_divergence(q, p).sum()
    assert kl.dtype == torch.float64 and kl.shape == ()
    torch.testing.assert_close(kl, expected, rtol=1e-12, atol=1e-10)
    grads = torch.autograd.grad(kl * 3, (mu, rho))
    expected_grads = torch.autograd.grad(expected * 3, (mu, rho))
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kl_low_precision_against_torch_distributions(backend, dtype):
    # The float32-accumulating path over sigmas from 1e-4 to 3 (rho in [-9, 3]: the tiny-rho
    # series log softplus(rho) ~ rho - softplus(rho) / 2 applies only below rho = -20), against
    # torch.distributions in float64 from the same rounded inputs.
    torch.manual_seed(14)
    mu = (torch.randn(40, 33, dtype=torch.float64, device=DEVICE) * 0.5).to(dtype)
    rho = torch.linspace(-9.0, 3.0, 40 * 33, dtype=torch.float64, device=DEVICE).view(40, 33)
    rho = rho.to(dtype)
    kl = B.gaussian_kl(mu, rho, prior_sigma=0.7, prior_mu=0.2)
    m, r = mu.double(), rho.double()
    q = torch.distributions.Normal(m, F.softplus(r))
    p = torch.distributions.Normal(torch.full_like(m, 0.2), torch.full_like(m, 0.7))
    expected = torch.distributions.kl_divergence(q, p)
    assert kl.dtype == torch.float32 and kl.shape == ()
    # float32 terms: a few ulps of each element's magnitude, summed (measured: <= 6e-7)
    assert abs(kl.double().item() - expected.sum().item()) <= 4e-6 * expected.abs().sum().item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kl_gradient_low_precision_is_rounded_once(backend, dtype):
    # The bf16 / fp16 gradient is computed in fp32 and rounded once to the input dtype: within
    # half an ulp of the float64 formula at the same stored inputs (plus float32 slack), on every
    # backend (Triton's interpreter truncates fp32 -> bf16; the kernels round to nearest even).
    torch.manual_seed(18)
    mu = (torch.randn(40, 30, dtype=torch.float64) * 0.5).to(dtype).to(DEVICE).requires_grad_()
    rho = torch.linspace(-6.0, 3.0, 1200, dtype=torch.float64).view(40, 30).to(dtype).to(DEVICE)
    rho.requires_grad_(True)
    B.gaussian_kl(mu, rho, prior_sigma=0.7, prior_mu=0.2).backward()
    m, r = mu.detach().double(), rho.detach().double()
    s = F.softplus(r)
    dmu = (m - 0.2) / 0.49
    drho = (s / 0.49 - 1 / s) * torch.sigmoid(r)
    # float32 slack: a few ulps of the terms (d KL / d rho cancels where sigma = prior_sigma)
    terms = (((m - 0.2).abs() + 0.2) / 0.49, (s / 0.49 + 1 / s) * torch.sigmoid(r))
    for got, true, size in ((mu.grad, dmu, terms[0]), (rho.grad, drho, terms[1])):
        assert got.dtype == dtype
        err = (got.double() - true).abs()
        bound = _half_ulp(true, dtype) + 1e-6 * size
        assert (err <= bound).all(), (err / _half_ulp(true, dtype)).max()


def test_kl_fp32_accumulation(backend):
    torch.manual_seed(5)
    n = _n(backend, 1 << 18)
    mu = torch.randn(n, device=DEVICE) * 0.1
    rho = torch.full((n,), -5.0, device=DEVICE)
    kl = B.gaussian_kl(mu, rho)
    assert kl.dtype == torch.float32
    s = F.softplus(rho.double())
    truth = (-torch.log(s) + (s**2 + mu.double() ** 2) / 2 - 0.5).sum()
    assert abs(kl.double().item() - truth.item()) <= 1e-5 * truth.abs().item()


# Triton's interpreter evaluates both sides of tl.where with numpy: the discarded log 0 and 1 / 0
@pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_kl_of_tiny_sigma(backend, dtype):
    # softplus(rho) reaches the float32 denormals below rho ~ -87 and 0 below ~ -104 (float64:
    # -745): the KL stays finite (log s ~ rho) and d KL / d rho ~ -1, not inf and NaN.
    values = [-20.5, -30.0, -90.0, -110.0] + ([-800.0] if dtype == torch.float64 else [])
    rho = torch.tensor(values, dtype=dtype, device=DEVICE, requires_grad=True)
    mu = torch.zeros_like(rho, requires_grad=True)
    kl = B.gaussian_kl(mu, rho, prior_sigma=0.5)
    kl.backward()
    r = rho.detach().double()
    log_s = torch.where(r < -700, r, torch.log(torch.log1p(torch.exp(r))))
    truth = (math.log(0.5) - log_s + 2 * torch.exp(2 * log_s) - 0.5).sum()
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(kl.double(), truth, rtol=tol, atol=0)
    torch.testing.assert_close(rho.grad.double(), -torch.ones_like(r), rtol=0, atol=1e-8)
    assert torch.equal(mu.grad, torch.zeros_like(mu))


def test_kl_float64_near_the_tiny_rho_series(backend):
    # float64 keeps what float32 rounds away below rho = -20: log s = rho - s / 2 (the s / 2 is
    # 1e-9 at rho = -20.5, a hundred thousand ulps of rho) and d KL / d rho = s sigmoid(rho) / s0^2
    # - (1 - s / 2), whose first term a small prior sigma makes visible. Against the closed form
    # from torch's float64 log1p, which is exact to an ulp here (s is far from the denormals).
    rho = torch.tensor([-19.5, -20.01, -20.5, -21.0, -22.0, -24.0, -27.0, -30.0],
                       dtype=torch.float64, device=DEVICE, requires_grad=True)  # fmt: skip
    mu = torch.linspace(-3e-4, 3e-4, rho.numel(), dtype=torch.float64, device=DEVICE)
    mu.requires_grad_(True)
    m0, s0 = 1e-4, 1e-4
    kl = B.gaussian_kl(mu, rho, prior_sigma=s0, prior_mu=m0)
    kl.backward()
    r, m = rho.detach(), mu.detach()
    s = torch.log1p(torch.exp(r))
    terms = math.log(s0) - torch.log(s) + (s**2 + (m - m0) ** 2) / (2 * s0**2) - 0.5
    torch.testing.assert_close(kl, terms.sum(), rtol=1e-14, atol=0)
    torch.testing.assert_close(mu.grad, (m - m0) / s0**2, rtol=1e-14, atol=0)
    drho = (s / s0**2 - 1 / s) * torch.sigmoid(r)
    torch.testing.assert_close(rho.grad, drho, rtol=1e-14, atol=0)


def test_reparameterize_second_derivatives(backend):
    # w = mu + softplus(rho) eps is smooth in rho: second (and third) derivatives regenerate eps
    # (was: a RuntimeError that the backward op had no autograd formula)
    mu = torch.randn(40, dtype=torch.float64, device=DEVICE, requires_grad=True)
    rho = torch.randn(40, dtype=torch.float64, device=DEVICE, requires_grad=True)

    def f(m, r):
        return B.reparameterize(m, r, seed=7, offset=3) ** 3

    if backend not in ("triton", "reference"):  # slow per call on CPU: the comparison below
        torch.autograd.gradgradcheck(f, (mu, rho))
    # against plain autograd on the same eps
    eps = (B.reparameterize(torch.zeros_like(mu), rho, seed=7, offset=3) / F.softplus(rho)).detach()
    for fn in (f, lambda m, r: (m + F.softplus(r) * eps) ** 3):
        g_rho = torch.autograd.grad(fn(mu, rho).sum(), rho, create_graph=True)[0]
        h = torch.autograd.grad(g_rho.sum(), (mu, rho))
        if fn is f:
            got = h
    for a, b in zip(got, h):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kl_gradient_of_a_scaled_kl_in_low_precision(backend, dtype):
    # found by a bug hunt: KL / num_data in fp16 rounded 1 / num_data to a subnormal or 0 before
    # the product (every gradient 0 at N = 5e7), and a tight prior's d KL / d mu overflowed
    torch.manual_seed(19)
    mu = (torch.randn(200) * 0.1).to(dtype).to(DEVICE).requires_grad_()
    rho = torch.full((200,), -3.0, dtype=dtype, device=DEVICE, requires_grad=True)
    for prior_sigma, n in ((1e-3, 1e5), (1.0, 5e7)):
        mu.grad = rho.grad = None
        (B.gaussian_kl(mu, rho, prior_sigma=prior_sigma) / n).backward()
        m = mu.detach().double()
        want = (m / prior_sigma**2) / n
        assert torch.isfinite(mu.grad).all()
        err = (mu.grad.double() - want).abs()
        # the backward forms the product in fp32 and rounds it once (it used to store d KL / d mu
        # in bf16 and round the product again)
        assert (err <= _half_ulp(want, dtype) + 1e-6 * want.abs()).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_kl_backward_op_writes_what_is_asked(backend, dtype):
    # mtbkd::gaussian_kl_backward: grad times the gradient, recomputed from mu and rho, each
    # output only when asked for (an empty tensor otherwise), against the float64 formula
    torch.manual_seed(23)
    mu = torch.randn(1500, dtype=dtype, device=DEVICE)
    rho = torch.cat([torch.linspace(-30.0, 25.0, 1000), torch.randn(500) * 4]).to(dtype)
    rho = rho.to(DEVICE)
    g = torch.tensor(-0.37, dtype=dtype, device=DEVICE)
    m, r = mu.double(), rho.double()
    s = F.softplus(r)
    want_mu = -0.37 * (m - 0.2) / 0.49
    want_rho = -0.37 * torch.where(r < -20, s * torch.sigmoid(r) / 0.49 - (1 - s / 2),
                                   (s / 0.49 - 1 / s) * torch.sigmoid(r))  # fmt: skip
    tol = {"rtol": 1e-12, "atol": 1e-13} if dtype == torch.float64 else {"rtol": 2e-6, "atol": 2e-7}
    for mu_grad, rho_grad in ((True, True), (True, False), (False, True), (False, False)):
        dmu, drho = B.gaussian_kl_backward(g, mu, rho, 0.2, 0.7, mu_grad, rho_grad)
        for got, want, asked in ((dmu, want_mu, mu_grad), (drho, want_rho, rho_grad)):
            if not asked:
                assert got.numel() == 0
                continue
            assert got.dtype == dtype and got.shape == mu.shape
            torch.testing.assert_close(got.double(), want, **tol)


def test_kl_keeps_no_tensor_of_its_own_for_the_backward(backend):
    # the forward used to store the gradient (two weight-sized tensors until the backward); now
    # autograd keeps only mu and rho themselves
    mu = torch.randn(64, 32, device=DEVICE, requires_grad=True)
    rho = torch.randn(64, 32, device=DEVICE, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        kl = B.gaussian_kl(mu, rho)
    assert sorted(t.data_ptr() for t in saved) == sorted([mu.data_ptr(), rho.data_ptr()])
    kl.backward()
    assert mu.grad is not None and rho.grad is not None


# Triton's interpreter evaluates both sides of tl.where with numpy: the discarded log 0 and 1 / 0
@pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_kl_second_derivatives(backend):
    # create_graph=True differentiates the backward's formula again (it used to raise: the
    # gradient was stored by the forward, a constant); against torch.distributions, and finite
    # in the tiny-rho branch (torch.where's other side sees sigma = 1 there)
    torch.manual_seed(21)
    mu = torch.randn(30, dtype=torch.float64, device=DEVICE, requires_grad=True)
    rho = (torch.randn(30, dtype=torch.float64, device=DEVICE) * 3).requires_grad_(True)

    def ours(m, r):
        return B.gaussian_kl(m, r, prior_sigma=0.6, prior_mu=0.1) * 1.5

    def theirs(m, r):
        q = torch.distributions.Normal(m, F.softplus(r))
        p = torch.distributions.Normal(torch.full_like(m, 0.1), torch.full_like(m, 0.6))
        return torch.distributions.kl_divergence(q, p).sum() * 1.5

    for fn in (ours, theirs):
        g_mu, g_rho = torch.autograd.grad(fn(mu, rho), (mu, rho), create_graph=True)
        hess = torch.autograd.grad((g_mu * g_rho).sum() + (g_rho**2).sum(), (mu, rho))
        if fn is ours:
            got = hess
    for a, b in zip(got, hess):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    if backend == "cpu":
        torch.autograd.gradgradcheck(ours, (mu, rho))
    tiny = torch.tensor([-25.0, -60.0, -900.0], dtype=torch.float64, device=DEVICE)
    tiny.requires_grad_(True)
    (g,) = torch.autograd.grad(B.gaussian_kl(torch.zeros_like(tiny), tiny), tiny,
                               create_graph=True)  # fmt: skip
    (h,) = torch.autograd.grad(g.sum(), tiny)
    assert torch.isfinite(h).all()


_LAUNCH_TYPES = """
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import mangle_type

from mtbkd.kernels import bayes as K

kernel, calls = getattr(K, KERNEL), []


class Recorder:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: calls.append((args, kwargs))


setattr(K, KERNEL, Recorder())
x = torch.zeros(8, dtype=torch.float64)
if KERNEL == "_kl_kernel":
    K.gaussian_kl(x, x, 0.1, 0.3)
elif KERNEL == "_kl_grad_kernel":
    K.gaussian_kl_bwd(torch.ones((), dtype=torch.float64), x, x, 0.1, 0.3, True, True)
elif KERNEL == "_reparam_kl_fwd_kernel":
    K.reparameterize_kl_fwd(x, x, 3, 0, 0.1, 0.3, False)
elif KERNEL == "_reparam_kl_bwd_kernel":
    K.reparameterize_kl_bwd(x, torch.ones((), dtype=torch.float64), x, x, 3, 0, 0.1, 0.3, True,
                            True)
else:
    K.sgld_step_([x], [x], [x.clone()], 0.1, 7.0, 0.3, 0.2, 5, True, 0.9, 1e-5)
((args, kwargs),) = calls
bound = {**dict(zip(kernel.arg_names, args)), **kwargs}
sig, constexprs = {}, {}
for i, p in enumerate(kernel.params):  # the types Triton's launcher gives the arguments
    if p.is_constexpr:
        sig[p.name], constexprs[(i,)] = "constexpr", bound[p.name]
    elif isinstance(bound[p.name], torch.Tensor):
        sig[p.name] = "*fp64"
    else:
        sig[p.name] = p.annotation_type or mangle_type(bound[p.name])
src = ASTSource(fn=kernel, signature=sig, constexprs=constexprs)
triton.compile(src, target=GPUTarget("cuda", 90, 32))
print(*(sig[name] for name in SCALARS))
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    "kernel, scalars",
    [
        ("_kl_kernel", ("prior_mu", "inv_var0", "log_s0")),
        ("_kl_grad_kernel", ("prior_mu", "inv_var0")),
        ("_reparam_kl_fwd_kernel", ("prior_mu", "inv_var0", "log_s0")),
        ("_reparam_kl_bwd_kernel", ("prior_mu", "inv_var0")),
        ("_sgld_kernel", ("lr", "num_data", "weight_decay", "noise_scale", "alpha", "damp")),
    ],
)
def test_triton_float64_kernels_get_float64_scalars(kernel, scalars):
    # Compiled Triton (not its interpreter) types a Python float argument as float32: the float64
    # KL used the prior rounded to float32 (relative error ~1e-10), the float64 SGLD step its
    # step size and decay. Compiled for sm_90, no GPU needed.
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MTBKD_BACKEND")}
    code = f"KERNEL, SCALARS = {kernel!r}, {scalars!r}\n" + _LAUNCH_TYPES
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.split() == ["fp64"] * len(scalars)


def test_kl_without_grad_returns_scalar(backend):
    mu = torch.randn(10, device=DEVICE)
    rho = torch.randn(10, device=DEVICE)
    with torch.no_grad():
        kl = B.gaussian_kl(mu, rho)
    assert kl.shape == () and not kl.requires_grad


def test_kl_of_empty_tensors_has_empty_gradients(backend):
    mu = torch.zeros(0, 3, device=DEVICE, requires_grad=True)
    rho = torch.zeros(0, 3, device=DEVICE, requires_grad=True)
    kl = B.gaussian_kl(mu, rho)
    kl.backward()
    assert kl.item() == 0.0 and mu.grad.shape == rho.grad.shape == (0, 3)


# ---------------------------------------------------------------------------------------------
# reparameterize_kl: the sample and the KL in one pass
# ---------------------------------------------------------------------------------------------


# Triton's interpreter evaluates both sides of tl.where with numpy (rho < -20: 1 / s and log s)
@pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("used", ["both", "sample", "kl"])
def test_reparameterize_kl_is_the_two_ops_in_one_pass(backend, dtype, used):
    # the same w as reparameterize (same seed / offset), the same KL as gaussian_kl, and the
    # gradient of whatever the loss uses, against the float64 formula on the same eps
    torch.manual_seed(24)
    n = 2003  # not a multiple of 4: a partial Philox counter and a partial program
    mu = (torch.randn(n, dtype=torch.float64) * 0.5).to(dtype).to(DEVICE).requires_grad_()
    rho = torch.cat([torch.linspace(-25.0, 4.0, 1003, dtype=torch.float64),
                     torch.randn(1000, dtype=torch.float64) * 2 - 3])  # fmt: skip
    rho = rho.to(dtype).to(DEVICE)
    rho.requires_grad_(True)
    w, kl = B.reparameterize_kl(mu, rho, seed=9, offset=5, prior_sigma=0.7, prior_mu=0.1)
    assert torch.equal(w, B.reparameterize(mu, rho, seed=9, offset=5))
    assert kl.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    kl_sep = B.gaussian_kl(mu, rho, prior_sigma=0.7, prior_mu=0.1)
    torch.testing.assert_close(kl, kl_sep, rtol=1e-12 if dtype == torch.float64 else 2e-6, atol=0)
    gw = torch.randn(n, dtype=torch.float64).to(dtype).to(DEVICE)
    loss = {"both": (w * gw).sum() + 0.3 * kl, "sample": (w * gw).sum(), "kl": 0.3 * kl}[used]
    dmu, drho = torch.autograd.grad(loss, (mu, rho))
    m, r, g = mu.detach().double(), rho.detach().double(), gw.double()
    s = F.softplus(r)
    # the kernels' float32 normals differ from philox_normal's by an ulp or so: in float64 the
    # op's own eps, read back from w
    if dtype == torch.float64:
        eps = (w.detach() - m) / s
    else:
        eps = B.philox_normal(9, 5, n).double().to(DEVICE)
    kl_mu = (m - 0.1) / 0.49
    kl_rho = torch.where(r < -20, s * torch.sigmoid(r) / 0.49 - (1 - s / 2),
                         (s / 0.49 - 1 / s) * torch.sigmoid(r))  # fmt: skip
    want_mu = (g if used != "kl" else 0) + (0.3 * kl_mu if used != "sample" else 0)
    want_rho = (g * eps * torch.sigmoid(r) if used != "kl" else 0) + (
        0.3 * kl_rho if used != "sample" else 0
    )
    for got, want in ((dmu, want_mu), (drho, want_rho)):
        assert got.dtype == dtype
        if dtype == torch.bfloat16:  # rounded once: half an ulp (plus the float32 terms' slack)
            size = want.abs() + 0.3 * kl_rho.abs() + g.abs() * 4
            bound = _half_ulp(want, dtype) + 1e-5 * size
            assert ((got.double() - want).abs() <= bound).all()
        else:
            tol = 1e-12 if dtype == torch.float64 else 2e-5
            torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_reparameterize_kl_samples_exactly_what_reparameterize_samples(backend, dtype):
    # a review: in bf16 / fp16 the CPU kernels computed softplus two ways (18 of 262,144
    # elements an ulp apart); now one tile code serves both ops
    torch.manual_seed(27)
    n = _n(backend, 1 << 18)
    mu = (torch.randn(n) * 0.3).to(dtype).to(DEVICE)
    rho = (torch.rand(n) * 12 - 8).to(dtype).to(DEVICE)
    w, _ = B.reparameterize_kl(mu, rho, seed=31, offset=2)
    assert torch.equal(w, B.reparameterize(mu, rho, seed=31, offset=2))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_a_nan_rho_gives_a_nan_sample_without_the_check(backend):
    # a review: the CPU kernels' vector softplus dropped a NaN (min_ps), and w came out finite
    mu = torch.zeros(40, device=DEVICE)
    rho = torch.full((40,), -2.0, device=DEVICE)
    rho[3] = float("nan")
    w = B.reparameterize(mu, rho, seed=1, check_finite=False)
    w_kl, kl = B.reparameterize_kl(mu, rho, seed=1, check_finite=False)
    for out in (w, w_kl):
        assert torch.isnan(out[3]) and torch.isfinite(out[torch.arange(40) != 3]).all()
    assert torch.isnan(kl)
    g = torch.ones_like(mu)
    drho = B.reparameterize_backward(g, rho, 1, 0)
    one = torch.ones((), device=DEVICE)
    _, drho_kl = B.reparameterize_kl_backward(g, one, mu, rho, 1, 0, 0.0, 1.0, True, True)
    assert torch.isnan(drho[3]) and torch.isnan(drho_kl[3])


def test_reparameterize_kl_refuses_a_mu_changed_before_its_backward():
    # mu is kept beside the saved rho (one saved tensor, as reparameterize saves): its version is
    # checked as autograd checks saved tensors
    mu = torch.randn(6, device=DEVICE, requires_grad=True)
    rho = torch.randn(6, device=DEVICE, requires_grad=True)
    _, kl = B.reparameterize_kl(mu, rho, seed=1)
    with torch.no_grad():
        mu.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        kl.backward()


def test_reparameterize_kl_frees_a_computed_mu_after_its_backward():
    # a review: a non-leaf mu kept on the autograd context outlived the backward (a parameter
    # costs nothing to keep; a computed one is saved, and freed, as autograd does)
    import weakref

    base = torch.randn(50, device=DEVICE, requires_grad=True)
    rho = torch.randn(50, device=DEVICE, requires_grad=True)

    def loss_of_a_computed_mu():
        mu = base * 2
        w, kl = B.reparameterize_kl(mu, rho, seed=2)
        return (w.sum() + kl), weakref.ref(mu)

    loss, mu_ref = loss_of_a_computed_mu()
    assert mu_ref() is not None
    loss.backward()
    assert mu_ref() is None  # the loss is still held
    # d/dbase of sum(w) + KL: 2 (1 + dKL/dmu), dKL/dmu = mu for the prior N(0, 1)
    torch.testing.assert_close(base.grad, 2 * (1 + base.detach() * 2))


def test_reparameterize_kl_is_exported_beside_the_other_ops():
    from mtbkd import ops

    assert ops.reparameterize_kl is B.reparameterize_kl
    assert "reparameterize_kl" in B.__all__ and "reparameterize_kl_backward" in B.__all__


def test_reparameterize_kl_backward_op_writes_what_is_asked(backend):
    torch.manual_seed(25)
    mu, rho, g = (torch.randn(999, dtype=torch.float64, device=DEVICE) for _ in range(3))
    gk = torch.tensor(0.25, dtype=torch.float64, device=DEVICE)
    full = B._ref_reparameterize_kl_backward(g, gk, mu, rho, 3, 1, 0.0, 1.5, True, True)
    for mu_grad, rho_grad in ((True, True), (True, False), (False, True)):
        dmu, drho = B.reparameterize_kl_backward(g, gk, mu, rho, 3, 1, 0.0, 1.5, mu_grad, rho_grad)
        # (dmu has no eps; drho's eps are float32 normals, an ulp or so apart between backends)
        for got, want, asked, tol in ((dmu, full[0], mu_grad, 1e-12),
                                      (drho, full[1], rho_grad, 2e-6)):  # fmt: skip
            if asked:
                torch.testing.assert_close(got, want, rtol=tol, atol=tol)
            else:
                assert got.numel() == 0


def test_reparameterize_kl_second_derivatives(backend):
    # create_graph=True: the sampling's backward op (differentiable) plus the KL's formula in
    # torch ops, against the two separate ops
    torch.manual_seed(26)
    mu = torch.randn(40, dtype=torch.float64, device=DEVICE, requires_grad=True)
    rho = torch.randn(40, dtype=torch.float64, device=DEVICE, requires_grad=True)

    def joint(m, r):
        w, kl = B.reparameterize_kl(m, r, seed=4, prior_sigma=0.8)
        return (w**3).sum() + kl

    def separate(m, r):
        return (B.reparameterize(m, r, seed=4) ** 3).sum() + B.gaussian_kl(m, r, prior_sigma=0.8)

    for fn in (joint, separate):
        g_mu, g_rho = torch.autograd.grad(fn(mu, rho), (mu, rho), create_graph=True)
        h = torch.autograd.grad((g_mu * g_rho).sum() + (g_rho**2).sum(), (mu, rho))
        if fn is joint:
            got = h
    for a, b in zip(got, h):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("which", ["mu", "rho"])
def test_reparameterize_kl_names_a_non_finite_input(backend, which):
    mu, rho = torch.zeros(50, device=DEVICE), torch.zeros(50, device=DEVICE)
    {"mu": mu, "rho": rho}[which][7] = float("nan")
    with pytest.raises(ValueError, match=f"{which} contains non-finite values"):
        B.reparameterize_kl(mu, rho, seed=1)
    w, kl = B.reparameterize_kl(mu, rho, seed=1, check_finite=False)
    assert torch.isnan(kl)


# ---------------------------------------------------------------------------------------------
# The SGLD op: backends agree on the same noise
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("precondition", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sgld_step_matches_formula(backend, precondition, dtype):
    torch.manual_seed(6)
    shapes = [(13, 7), (5,), (1,)]
    params = [torch.randn(s, dtype=dtype, device=DEVICE) for s in shapes]
    grads = [torch.randn(s, dtype=dtype, device=DEVICE) for s in shapes]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    sq = [torch.rand(s, dtype=acc, device=DEVICE) for s in shapes]
    expected_params = [p.double().clone() for p in params]
    expected_sq = [s.double().clone() for s in sq]
    lr, nd, temp, wd, alpha, eps = 0.01, 50.0, 0.7, 0.1, 0.9, 1e-5
    for j, (p, g) in enumerate(zip(expected_params, grads)):
        xi = B.philox_normal(77, 0, p.numel(), stream=j).double().to(DEVICE).view(p.shape)
        gu = nd * g.double() + wd * p
        if precondition:
            expected_sq[j] = alpha * expected_sq[j] + (1 - alpha) * (gu / nd) ** 2
            gp = 1 / (eps + expected_sq[j].sqrt())
            p.copy_(p - lr * gp * gu + math.sqrt(2 * lr * temp) * gp.sqrt() * xi)
        else:
            p.copy_(p - lr * gu + math.sqrt(2 * lr * temp) * xi)
    B.sgld_step_(params, grads, sq if precondition else None, lr=lr, num_data=nd,
                 temperature=temp, weight_decay=wd, seed=77, precondition=precondition,
                 alpha=alpha, eps=eps)  # fmt: skip
    tol = 1e-5 if dtype == torch.float32 else 1e-6
    for p, e in zip(params, expected_params):
        torch.testing.assert_close(p.double(), e, atol=tol, rtol=tol)
    if precondition:
        for s, e in zip(sq, expected_sq):
            torch.testing.assert_close(s.double(), e, atol=tol, rtol=tol)


@pytest.mark.parametrize("precondition", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sgld_step_low_precision_rounds_once(backend, precondition, dtype):
    # The step of a bf16 / fp16 parameter is computed in fp32 and the new value rounded once: it
    # is within half an ulp of the float64 formula from the same stored values (plus float32
    # slack). Rounding theta - lr grad first and adding the noise after would be up to an ulp off.
    # (Triton's interpreter truncates fp32 -> bf16; the kernels round to nearest even there.)
    torch.manual_seed(16)
    shape = (40, 25)
    p = torch.randn(shape, dtype=torch.float64).to(dtype).to(DEVICE)
    g = (torch.randn(shape, dtype=torch.float64) * 0.02).to(dtype).to(DEVICE)
    sq = torch.rand(shape, dtype=torch.float32).to(DEVICE)
    lr, nd, temp, wd, alpha, eps = 0.01, 50.0, 0.7, 0.1, 0.9, 1e-5
    th, gu = p.double(), nd * g.double() + wd * p.double()
    xi = B.philox_normal(77, 0, p.numel(), stream=0).double().to(DEVICE).view(shape)
    if precondition:
        v = alpha * sq.double() + (1 - alpha) * (gu / nd) ** 2
        gp = 1 / (eps + v.sqrt())
        step, noise = -lr * gp * gu, math.sqrt(2 * lr * temp) * gp.sqrt() * xi
    else:
        step, noise = -lr * gu, math.sqrt(2 * lr * temp) * xi
    true = th + step + noise
    new = p.clone()
    B.sgld_step_([new], [g], [sq] if precondition else None, lr=lr, num_data=nd,
                 temperature=temp, weight_decay=wd, seed=77, precondition=precondition,
                 alpha=alpha, eps=eps)  # fmt: skip
    slack = 1e-5 * (th.abs() + step.abs() + noise.abs())
    err = (new.double() - true).abs()
    assert (err <= _half_ulp(true, dtype) + slack).all(), (err / _half_ulp(true, dtype)).max()


@pytest.mark.parametrize("precondition", [False, True])
def test_sgld_step_of_large_views_and_seed(backend, precondition):
    # Parameters of several kernel programs (> 1024 elements) held as contiguous views of one
    # flat buffer, with a seed >= 2**32: each takes the noise of its own stream (counters past the
    # first program's, both seed words) and nothing outside a parameter moves.
    torch.manual_seed(17)
    flat = torch.randn(4700, dtype=torch.float64, device=DEVICE)
    gflat = torch.randn_like(flat)
    sflat = torch.rand_like(flat)
    cuts = [(0, 2500, (2500,)), (2500, 4600, (3, 700))]
    params = [flat[a:b].view(s) for a, b, s in cuts]
    grads = [gflat[a:b].view(s) for a, b, s in cuts]
    sq = [sflat[a:b].view(s) for a, b, s in cuts]
    before, sq_before = flat.clone(), sflat.clone()
    seed, lr, nd, temp, wd, alpha, eps = 2**40 + 5, 1e-3, 20.0, 0.5, 0.3, 0.9, 1e-5
    B.sgld_step_(params, grads, sq if precondition else None, lr=lr, num_data=nd,
                 temperature=temp, weight_decay=wd, seed=seed, precondition=precondition,
                 alpha=alpha, eps=eps)  # fmt: skip
    for j, (a, b, _) in enumerate(cuts):
        th, g = before[a:b], gflat[a:b]
        xi = B.philox_normal(seed, 0, b - a, stream=j).double().to(DEVICE)
        gu = nd * g + wd * th
        gp = torch.ones_like(th)
        if precondition:
            v = alpha * sq_before[a:b] + (1 - alpha) * (gu / nd) ** 2
            torch.testing.assert_close(sflat[a:b], v, atol=1e-12, rtol=1e-12)
            gp = 1 / (eps + v.sqrt())
        want = th - lr * gp * gu + math.sqrt(2 * lr * temp) * gp.sqrt() * xi
        tol = 2e-6 if DEVICE == "cpu" else 2e-5  # the backends' xi differ by an ulp or so
        torch.testing.assert_close(flat[a:b], want, atol=tol, rtol=tol)
    assert torch.equal(flat[4600:], before[4600:]) and torch.equal(sflat[4600:], sq_before[4600:])


# ---------------------------------------------------------------------------------------------
# Custom-op machinery
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_opcheck(backend, dtype):
    mu = torch.randn(6, 5, dtype=dtype, device=DEVICE, requires_grad=True)
    rho = torch.randn(6, 5, dtype=dtype, device=DEVICE, requires_grad=True)
    torch.library.opcheck(B._reparameterize_op, (mu, rho, 3, 1, True))
    torch.library.opcheck(B.reparameterize_backward, (torch.randn_like(mu), rho.detach(), 3, 1))
    torch.library.opcheck(B._gaussian_kl_op, (mu, rho, 0.0, 1.0))
    torch.library.opcheck(B._gaussian_kl_op, (mu.detach(), rho.detach(), 0.0, 1.0))
    g = torch.tensor(0.5, dtype=dtype, device=DEVICE)
    for flags in ((True, True), (True, False), (False, True)):
        torch.library.opcheck(B.gaussian_kl_backward, (g, mu.detach(), rho.detach(), 0.2, 0.7,
                                                       *flags))  # fmt: skip
    torch.library.opcheck(B._reparameterize_kl_op, (mu, rho, 3, 1, 0.1, 0.9, True))
    for flags in ((True, True), (False, True)):
        args = (torch.randn_like(mu), g, mu.detach(), rho.detach(), 3, 1, 0.1, 0.9, *flags)
        torch.library.opcheck(B.reparameterize_kl_backward, args)
    params = [torch.randn(n, dtype=dtype, device=DEVICE) for n in (4, 3)]
    grads = [torch.randn_like(p) for p in params]
    sq = [torch.zeros_like(p) for p in params]
    args = (params, grads, sq, 0.1, 10.0, 1.0, 0.0, 5, True, 0.99, 1e-5)
    torch.library.opcheck(B._sgld_step_op, args)


def test_compile_fullgraph(backend):
    def f(mu, rho):
        w = B._reparameterize_op(mu, rho, 11, 0, False)
        kl = B._gaussian_kl_op(mu, rho, 0.0, 1.0)
        return (w**2).sum() + kl

    mu = torch.randn(8, 6, device=DEVICE, requires_grad=True)
    rho = torch.randn(8, 6, device=DEVICE, requires_grad=True)
    eager = f(mu, rho)
    ge = torch.autograd.grad(eager, (mu, rho))
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(mu, rho)
    gc = torch.autograd.grad(compiled, (mu, rho))
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b)


@pytest.mark.skipif(backend_status()["triton"] is not None, reason=str(backend_status()["triton"]))
@pytest.mark.parametrize("n", [1, 1500])
def test_triton_kernels_write_nothing_past_their_outputs(monkeypatch, n):
    # The kernels' masks stop at n: the outputs are placed at the start of a sentinel-filled
    # buffer (the allocator would hide a write past the end) and the rest must stay untouched.
    from mtbkd.kernels import bayes as K

    guard = torch.full((7 * 2048,), 1234.5, device=DEVICE)
    slots = iter(range(0, guard.numel(), 2048))

    def empty_like(t, **kwargs):
        start = next(slots)
        return guard[start : start + t.numel()].view(t.shape)

    mu = torch.randn(n, device=DEVICE)
    rho = torch.randn(n, device=DEVICE)
    monkeypatch.setattr(torch, "empty_like", empty_like)
    w = K.reparameterize_fwd(mu, rho, 3, 0, False)
    drho = K.reparameterize_bwd(torch.ones_like(mu), rho, 3, 0)
    one = torch.ones((), device=DEVICE)
    dmu, drho_kl = K.gaussian_kl_bwd(one, mu, rho, 0.0, 1.0, True, True)
    w_kl, _ = K.reparameterize_kl_fwd(mu, rho, 3, 0, 0.0, 1.0, False)
    dmu_j, drho_j = K.reparameterize_kl_bwd(torch.ones_like(mu), one, mu, rho, 3, 0, 0.0, 1.0,
                                            True, True)  # fmt: skip
    monkeypatch.undo()
    outs = (w, drho, dmu, drho_kl, w_kl, dmu_j, drho_j)
    for start, out in zip(range(0, guard.numel(), 2048), outs):
        assert out.data_ptr() == guard[start:].data_ptr() and torch.isfinite(out).all()
        assert (guard[start + n : start + 2048] == 1234.5).all()


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def test_bad_shapes_and_types():
    mu = torch.zeros(3, 4)
    with pytest.raises(ValueError, match="mu and rho must have the same shape"):
        B.reparameterize(mu, torch.zeros(4, 3), seed=1)
    with pytest.raises(ValueError, match="mu and rho must have the same shape"):
        B.gaussian_kl(mu, torch.zeros(12))
    with pytest.raises(TypeError, match="rho must be a floating-point"):
        B.reparameterize(mu, torch.zeros(3, 4, dtype=torch.int64), seed=1)
    with pytest.raises(TypeError, match="mu and rho must have the same dtype"):
        B.reparameterize(mu, torch.zeros(3, 4, dtype=torch.float64), seed=1)
    with pytest.raises(TypeError, match="mu must be a torch.Tensor"):
        B.reparameterize([1.0], torch.zeros(1), seed=1)
    with pytest.raises(ValueError, match="seed"):
        B.reparameterize(mu, mu, seed=-1)
    with pytest.raises(ValueError, match="offset"):
        B.reparameterize(mu, mu, seed=1, offset=2**63)
    with pytest.raises(TypeError, match="seed"):
        B.reparameterize(mu, mu, seed=1.5)


@pytest.mark.parametrize("sigma", [0.0, -1.0, float("nan"), float("inf"), 1e-19, 1e-30])
def test_bad_prior_sigma(sigma):
    with pytest.raises(ValueError, match="prior_sigma"):
        B.gaussian_kl(torch.zeros(3), torch.zeros(3), prior_sigma=sigma)


# Triton's interpreter evaluates both sides of tl.where with numpy (as for tiny sigma below)
@pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_smallest_prior_sigma_agrees_with_reference(backend):
    # the smallest accepted s0: 1 / s0^2 = 1e36 is still a finite float32 in every backend
    mu = torch.tensor([1e-3, -2e-3, 0.0], device=DEVICE, requires_grad=True)
    rho = torch.tensor([-50.0, -45.0, -60.0], device=DEVICE, requires_grad=True)
    kl = B.gaussian_kl(mu, rho, prior_sigma=1e-18)
    m, r = mu.detach().double(), rho.detach().double()
    want = B._ref_gaussian_kl(m, r, 0.0, 1e-18)
    assert torch.isfinite(kl)
    torch.testing.assert_close(kl.double(), want, rtol=1e-4, atol=0)
    kl.backward()
    g = torch.ones((), dtype=torch.float64, device=DEVICE)
    dmu, drho = B._ref_gaussian_kl_backward(g, m, r, 0.0, 1e-18, True, True)
    for got, true in ((mu.grad, dmu), (rho.grad, drho)):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), true, rtol=1e-5, atol=0)


@pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("sigma", [1e-18, 1e155])
def test_kl_gradient_at_the_prior_sigma_extremes_is_the_references(backend, sigma):
    # found by an audit: at s0 = 1e-18 and softplus(rho) = 20 the CPU SIMD kernels formed
    # s^2 / s0^2 (4e38, beyond float32) and gave an inf rho gradient where the others give 2e37;
    # at s0 = 1e155 the reference and Triton raised OverflowError from Python's s0 ** 2. Twenty
    # entries: the SIMD lanes and a scalar tail (the summed KL itself may overflow to inf)
    mu = torch.linspace(-1.0, 1.0, 20, device=DEVICE, requires_grad=True)
    rho = torch.full((20,), 20.0, device=DEVICE, requires_grad=True)
    for fn in (lambda: B.gaussian_kl(mu, rho, prior_sigma=sigma),
               lambda: B.reparameterize_kl(mu, rho, seed=3, prior_sigma=sigma)[1]):  # fmt: skip
        mu.grad = rho.grad = None
        fn().backward()
        g = torch.ones((), dtype=torch.float64, device=DEVICE)
        m, r = mu.detach().double(), rho.detach().double()
        dmu, drho = B._ref_gaussian_kl_backward(g, m, r, 0.0, sigma, True, True)
        for got, true in ((mu.grad, dmu), (rho.grad, drho)):
            assert torch.isfinite(got).all()
            torch.testing.assert_close(got.double(), true, rtol=1e-5, atol=1e-30)


# Triton's interpreter computes the bad values with numpy before the check raises: its
# "invalid value" warnings are what this test feeds in
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("which", ["mu", "rho"])
def test_non_finite_inputs(backend, bad, which):
    mu = torch.zeros(2000, device=DEVICE)
    rho = torch.zeros(2000, device=DEVICE)
    (mu if which == "mu" else rho)[1500] = bad
    with pytest.raises(ValueError, match=f"{which} contains non-finite"):
        B.reparameterize(mu, rho, seed=1)
    with pytest.raises(ValueError, match=f"{which} contains non-finite"):
        B.gaussian_kl(mu, rho)
    # Opting out skips the check (the caller vouches for the data).
    B.reparameterize(mu, rho, seed=1, check_finite=False)


# Triton's interpreter evaluates both sides of tl.where with numpy (softplus(-inf) there)
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("which", ["mu", "rho"])
def test_non_finite_inputs_of_every_dtype(backend, dtype, bad, which):
    # The check of test_non_finite_inputs for the dtypes that take the kernels' other paths.
    mu = torch.zeros(2000, device=DEVICE, dtype=dtype)
    rho = torch.zeros(2000, device=DEVICE, dtype=dtype)
    (mu if which == "mu" else rho)[1500] = bad
    with pytest.raises(ValueError, match=f"{which} contains non-finite"):
        B.reparameterize(mu, rho, seed=1)
    B.reparameterize(mu, rho, seed=1, check_finite=False)


@pytest.mark.parametrize("which", ["mu", "rho"])
def test_kl_gradient_of_only_one_argument(backend, which):
    # with only rho requiring grad, the op was called without its gradient: backward raised
    torch.manual_seed(7)
    mu = torch.randn(9, 4, dtype=torch.float64, device=DEVICE)
    rho = torch.randn(9, 4, dtype=torch.float64, device=DEVICE)
    leaf = (mu if which == "mu" else rho).requires_grad_(True)
    (g,) = torch.autograd.grad(B.gaussian_kl(mu, rho, prior_sigma=0.5, prior_mu=0.2) * 2, leaf)
    q = torch.distributions.Normal(mu, F.softplus(rho))
    p = torch.distributions.Normal(torch.full_like(mu, 0.2), torch.full_like(mu, 0.5))
    (want,) = torch.autograd.grad(torch.distributions.kl_divergence(q, p).sum() * 2, leaf)
    torch.testing.assert_close(g, want, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------------------------
# The ops check their tensors on every backend (found by a bug hunt: the Triton backend checked
# nothing, so mismatched shapes read or wrote out of bounds and a non-contiguous parameter got
# its update at the wrong elements; only the C++ CPU ops refused them)
# ---------------------------------------------------------------------------------------------


def _op_cases():
    # (name, call, message): mismatches that no backend read or wrote out of bounds before the
    # checks (those run in a subprocess below)
    z = lambda *s, dtype=torch.float32: torch.zeros(*s, dtype=dtype, device=DEVICE)  # noqa: E731
    ops = torch.ops.mtbkd
    hyper = (1e-3, 10.0, 1.0, 0.0, 1)  # lr, num_data, temperature, weight_decay, seed
    return [
        ("reparam dtype", lambda: ops.reparameterize(z(6), z(6, dtype=torch.float64), 1, 0, False),
         "mu and rho must have the same dtype"),
        ("reparam non-contiguous", lambda: ops.reparameterize(z(4, 2).t(), z(2, 4), 1, 0, False),
         "mu and rho must be contiguous"),
        ("reparam int", lambda: ops.reparameterize(z(3, dtype=torch.int64),
                                                   z(3, dtype=torch.int64), 1, 0, False),
         "mu must be a floating tensor"),
        ("reparam bwd non-contiguous",
         lambda: ops.reparameterize_backward(z(4, 2).t(), z(2, 4), 1, 0),
         "grad and rho must be contiguous"),
        ("kl dtype", lambda: ops.gaussian_kl(z(6), z(6, dtype=torch.float64), 0.0, 1.0),
         "mu and rho must have the same dtype"),
        ("kl prior_sigma", lambda: ops.gaussian_kl(z(6), z(6), 0.0, 0.0), "prior_sigma"),
        ("kl bwd shape", lambda: ops.gaussian_kl_backward(z(()), z(6), z(5), 0.0, 1.0, True,
                                                          True),
         "mu and rho must have the same shape"),
        ("kl bwd grad", lambda: ops.gaussian_kl_backward(z(2), z(6), z(6), 0.0, 1.0, True, True),
         "grad must be a floating-point tensor of one element"),
        ("kl bwd int grad", lambda: ops.gaussian_kl_backward(z((), dtype=torch.int64), z(6),
                                                             z(6), 0.0, 1.0, True, True),
         "grad must be a floating-point tensor of one element"),
        ("kl bwd prior_sigma", lambda: ops.gaussian_kl_backward(z(()), z(6), z(6), 0.0, -1.0,
                                                                True, True),
         "prior_sigma"),
        ("joint dtype", lambda: ops.reparameterize_kl(z(6), z(6, dtype=torch.float64), 1, 0, 0.0,
                                                      1.0, False),
         "mu and rho must have the same dtype"),
        ("joint bwd grad shape", lambda: ops.reparameterize_kl_backward(z(5), z(()), z(6), z(6), 1,
                                                                        0, 0.0, 1.0, True, True),
         "grad and rho must have the same shape"),
        ("joint bwd grad_kl", lambda: ops.reparameterize_kl_backward(z(6), z(3), z(6), z(6), 1, 0,
                                                                     0.0, 1.0, True, True),
         "grad_kl must be a floating-point tensor of one element"),
        ("sgld lengths", lambda: ops.sgld_step_([z(8), z(3)], [z(8)], [], *hyper, False, 0.9,
                                                1e-5),
         "params and grads must have the same length"),
        ("sgld square_avgs missing", lambda: ops.sgld_step_([z(8)], [z(8)], [], *hyper, True,
                                                            0.9, 1e-5),
         "square_avgs must have one tensor per parameter when precondition=True"),
        ("sgld grad dtype", lambda: ops.sgld_step_([z(8), z(8)], [z(8), z(8, dtype=torch.float64)],
                                                   [], *hyper, False, 0.9, 1e-5),
         r"params\[1\] and grads\[1\] must have the same dtype"),
        ("sgld non-contiguous param",
         lambda: ops.sgld_step_([z(8), z(8, 2).t()], [z(8), z(2, 8)], [], *hyper, False, 0.9,
                                1e-5),
         r"params\[1\] and grads\[1\] must be contiguous"),
        ("sgld bf16 square_avg",
         lambda: ops.sgld_step_([z(8, dtype=torch.bfloat16)], [z(8, dtype=torch.bfloat16)],
                                [z(8, dtype=torch.bfloat16)], *hyper, True, 0.9, 1e-5),
         r"square_avgs\[0\] must be a contiguous torch.float32 tensor"),
        ("sgld non-contiguous square_avg",
         lambda: ops.sgld_step_([z(2, 8)], [z(2, 8)], [z(8, 2).t()], *hyper, True, 0.9, 1e-5),
         r"square_avgs\[0\] must be a contiguous torch.float32 tensor"),
    ]  # fmt: skip


@pytest.mark.parametrize("case", range(len(_op_cases())), ids=[c[0] for c in _op_cases()])
def test_ops_check_their_tensors_on_every_backend(backend, case):
    _, call, message = _op_cases()[case]
    with pytest.raises((RuntimeError, ValueError), match=message):
        call()


def test_sgld_op_checks_every_tensor_before_stepping_any(backend):
    # the Triton backend stepped parameter 0 before parameter 1 was (not) checked: a refused call
    # must change nothing, and a non-contiguous parameter must not get its update at the wrong
    # elements
    p = [torch.ones(8, device=DEVICE), torch.zeros(8, 2, device=DEVICE).t()]
    g = [torch.ones(8, device=DEVICE), torch.arange(16.0, device=DEVICE).reshape(2, 8)]
    with pytest.raises(RuntimeError, match="must be contiguous"):
        B.sgld_step_(p, g, None, lr=1e-3, num_data=1.0, temperature=0.0, seed=1)
    assert torch.equal(p[0], torch.ones(8, device=DEVICE))
    assert torch.equal(p[1], torch.zeros(2, 8, device=DEVICE))


_OUT_OF_BOUNDS = """
import os, torch
from mtbkd import bayes_ops as B

dev = "cuda" if torch.cuda.is_available() else "cpu"
z = lambda n: torch.zeros(n, device=dev)
ops = torch.ops.mtbkd
cases = [
    ("reparam", lambda: ops.reparameterize(z(4096), z(8), 1, 0, False),
     "mu and rho must have the same shape, got [4096] and [8]"),
    ("reparam_bwd", lambda: ops.reparameterize_backward(z(4096), z(8), 1, 0),
     "grad and rho must have the same shape, got [4096] and [8]"),
    ("kl", lambda: ops.gaussian_kl(z(4096), z(8), 0.0, 1.0),
     "mu and rho must have the same shape, got [4096] and [8]"),
    ("kl_bwd", lambda: ops.gaussian_kl_backward(z(()) + 1, z(4096), z(8), 0.0, 1.0, True, True),
     "mu and rho must have the same shape, got [4096] and [8]"),
    ("joint", lambda: ops.reparameterize_kl(z(4096), z(8), 1, 0, 0.0, 1.0, False),
     "mu and rho must have the same shape, got [4096] and [8]"),
    ("joint_bwd", lambda: ops.reparameterize_kl_backward(z(4096), z(()), z(8), z(8), 1, 0, 0.0,
                                                         1.0, True, True),
     "grad and rho must have the same shape, got [4096] and [8]"),
    ("sgld_grad", lambda: B.sgld_step_([z(4096)], [z(8)], None, lr=1e-3, num_data=10.0, seed=1),
     "params[0] and grads[0] must have the same shape, got [4096] and [8]"),
    ("sgld_square_avg", lambda: B.sgld_step_([z(100000)], [z(100000)], [z(10)], lr=1e-3,
                                             num_data=10.0, seed=1, precondition=True),
     "square_avgs[0] must be a contiguous torch.float32 tensor"),
]
for name, call, message in cases:
    try:
        call()
        print(name, "accepted", flush=True)
    except RuntimeError as e:
        print(name, "refused" if message in str(e) else "other: " + str(e)[:200], flush=True)
junk = [torch.randn(1000, device=dev) for _ in range(100)]
print("survived", flush=True)
"""


@pytest.mark.skipif(backend_status()["triton"] is not None, reason=str(backend_status()["triton"]))
def test_triton_ops_refuse_out_of_bounds_shapes():
    # In a subprocess: before the checks these read and wrote past the tensors (pSGLD with a short
    # square_avg corrupted the heap: "corrupted size vs. prev_size", a crash)
    env = {**os.environ, "MTBKD_BACKEND": "triton"}
    proc = subprocess.run([sys.executable, "-c", _OUT_OF_BOUNDS], env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, (proc.stdout, proc.stderr[-4000:])
    names = ["reparam", "reparam_bwd", "kl", "kl_bwd", "joint", "joint_bwd", "sgld_grad",
             "sgld_square_avg"]  # fmt: skip
    assert proc.stdout.splitlines() == [f"{n} refused" for n in names] + ["survived"], proc.stdout


@pytest.mark.parametrize(
    "kw, message",
    [({"lr": -1e-3}, "lr must be a non-negative"),
     ({"temperature": -1.0}, "temperature must be a non-negative"),
     ({"num_data": 0.0, "precondition": True}, "num_data must be a positive"),
     ({"weight_decay": float("nan")}, "weight_decay must be a non-negative finite"),
     ({"alpha": 1.0, "precondition": True}, r"alpha must be in \[0, 1\)"),
     ({"eps": 0.0, "precondition": True}, "eps must be a positive")],
)  # fmt: skip
def test_sgld_step_checks_its_hyperparameters(backend, kw, message):
    # the public op took anything: a negative lr or temperature made NaN parameters on cpu (a
    # "math domain error" elsewhere), num_data=0 with precondition divided by zero
    args = {"lr": 1e-3, "num_data": 100.0, **kw}
    p, g = torch.zeros(8, device=DEVICE), torch.ones(8, device=DEVICE)
    sq = [torch.zeros(8, device=DEVICE)] if args.get("precondition") else None
    with pytest.raises(ValueError, match=message):
        B.sgld_step_([p], [g], sq, seed=1, **args)
    # ... and so does the op itself
    full = {"temperature": 1.0, "weight_decay": 0.0, "precondition": False, "alpha": 0.99,
            "eps": 1e-5, **args}  # fmt: skip
    with pytest.raises(ValueError, match=message):
        torch.ops.mtbkd.sgld_step_(
            [p], [g], sq or [], full["lr"], full["num_data"], full["temperature"],
            full["weight_decay"], 1, full["precondition"], full["alpha"], full["eps"],
        )  # fmt: skip
    assert torch.equal(p, torch.zeros(8, device=DEVICE))


def test_sgld_step_hyperparameter_types():
    p, g = torch.zeros(3), torch.ones(3)
    with pytest.raises(TypeError, match="precondition must be a bool"):
        B.sgld_step_([p], [g], None, lr=1e-3, num_data=10, seed=1, precondition="False")
    with pytest.raises(TypeError, match="lr must be a number"):
        B.sgld_step_([p], [g], None, lr="0.1", num_data=10, seed=1)
    assert torch.equal(p, torch.zeros(3))
    # an lr decayed to 0 (a scheduler), numpy numbers and a tensor lr are taken, as by SGLD
    B.sgld_step_([p], [g], None, lr=0.0, num_data=10, seed=1)
    assert torch.equal(p, torch.zeros(3))
    B.sgld_step_([p], [g], None, lr=torch.tensor(0.1), num_data=np.int64(1),
                 temperature=np.float32(0.0), seed=np.int64(1))  # fmt: skip
    torch.testing.assert_close(p, torch.full((3,), -0.1))


def test_numpy_integer_seed_and_offset_and_numpy_prior():
    # np.int64 seeds and offsets (and np.float32 priors) were refused
    mu, rho = torch.randn(5), torch.randn(5)
    w = B.reparameterize(mu, rho, seed=np.int64(3), offset=np.int32(2))
    assert torch.equal(w, B.reparameterize(mu, rho, seed=3, offset=2))
    assert torch.equal(B.philox_normal(np.uint64(7), np.int64(1), 9), B.philox_normal(7, 1, 9))
    kl = B.gaussian_kl(mu, rho, prior_sigma=np.float32(0.5), prior_mu=np.int64(1))
    assert torch.equal(kl, B.gaussian_kl(mu, rho, prior_sigma=0.5, prior_mu=1.0))
    for bad in (True, np.bool_(True), 1.0, np.float64(3.0)):
        with pytest.raises(TypeError, match="seed must be an int"):
            B.reparameterize(mu, rho, seed=bad)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_philox_normal_checks_n_and_stream_on_every_backend(backend):
    # an audit (thirtieth session): n=-1 gave an empty tensor on the reference backend and an
    # error on the C++ one; a float n or stream gave unrelated errors
    with pytest.raises(ValueError, match="n must be non-negative, got -1"):
        B.philox_normal(3, 0, -1, backend=backend)
    with pytest.raises(TypeError, match="n must be an int, got float"):
        B.philox_normal(3, 0, 2.0, backend=backend)
    with pytest.raises(ValueError, match=r"stream must be in \[0, 2\*\*32\), got -1"):
        B.philox_normal(3, 0, 2, stream=-1, backend=backend)
    assert torch.equal(B.philox_normal(3, 0, np.int64(5), stream=np.int32(1), backend=backend),
                       B.philox_normal(3, 0, 5, stream=1, backend="reference"))  # fmt: skip


@pytest.mark.parametrize("op", ["gaussian_kl", "reparameterize_kl", "reparameterize"])
def test_an_inference_mode_mu_or_rho_of_a_frozen_half_is_taken(op):
    # review (thirty-first session): the KL ops saved mu for the backward (and reparameterize_kl
    # read its version counter), so an inference-mode mu with a trainable rho failed ("Inference
    # tensors cannot be saved for backward"); plain autograd takes it. Likewise a frozen
    # inference-mode rho with a trainable mu.
    def run(mu, rho):
        if op == "gaussian_kl":
            return B.gaussian_kl(mu, rho)
        if op == "reparameterize_kl":
            w, kl = B.reparameterize_kl(mu, rho, 1)
            return w.square().sum() + kl
        return B.reparameterize(mu, rho, 1).square().sum()

    with torch.inference_mode():
        mu_i, rho_i = torch.randn(3, 4), torch.full((3, 4), -3.0)
    for trainable in ("rho", "mu"):
        mu = mu_i if trainable == "rho" else mu_i.clone().requires_grad_(True)
        rho = rho_i if trainable == "mu" else rho_i.clone().requires_grad_(True)
        run(mu, rho).backward()
        p = rho if trainable == "rho" else mu
        # the same gradient as with ordinary tensors
        mu2 = mu_i.clone().requires_grad_(trainable == "mu")
        rho2 = rho_i.clone().requires_grad_(trainable == "rho")
        run(mu2, rho2).backward()
        q = rho2 if trainable == "rho" else mu2
        torch.testing.assert_close(p.grad, q.grad)


def test_reparameterize_kl_frozen_mu_changed_before_the_backward_is_no_error():
    # review: rho's gradient does not read mu; plain autograd does not refuse this either
    mu = torch.randn(10)
    rho = torch.full((10,), -3.0, requires_grad=True)
    w, kl = B.reparameterize_kl(mu, rho, 1, 0)
    with torch.no_grad():
        mu.add_(1.0)
    (w.sum() + kl).backward()
    assert rho.grad is not None and torch.isfinite(rho.grad).all()
    # a trainable mu changed in place is still refused, as autograd refuses it
    mu = torch.randn(10, requires_grad=True)
    w, kl = B.reparameterize_kl(mu, rho, 1, 0)
    with torch.no_grad():
        mu.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (w.sum() + kl).backward()


def test_reparameterize_kl_and_record_kl_run_on_the_meta_device():
    from mtbkd.nn import BayesLinear, record_kl

    w, kl = B.reparameterize_kl(torch.empty(3, device="meta"), torch.empty(3, device="meta"), 1)
    assert w.device.type == "meta" and kl.shape == ()
    m = BayesLinear(4, 3, device="meta")
    with record_kl(m) as rec:
        y = m(torch.randn(2, 4, device="meta"))
    assert y.shape == (2, 3) and rec.kl.device.type == "meta"


@pytest.mark.parametrize("rho_value", [-90.0, -110.0])
def test_the_ops_under_torch_func_grad_match_their_fused_forms(rho_value):
    # review (thirty-first session): the fused ops have no functorch rule (torch raised a
    # setup_context error under torch.func.grad); there they run in torch ops, whose KL took
    # log(softplus) directly at first: a -inf gradient at rho = -90, an inf KL at -110 (float32)
    from torch.func import grad

    mu = torch.randn(6)
    rho = torch.full((6,), rho_value)
    rho[:3] = -1.0

    def loss(m, r):
        torch.manual_seed(3)
        w = B.reparameterize(m, r)
        w2, kl2 = B.reparameterize_kl(m, r, 5, 0, prior_sigma=0.5, prior_mu=0.1)
        return (w * w).sum() + (w2 * w2).sum() + kl2 + B.gaussian_kl(m, r, 0.5, 0.1)

    g_mu, g_rho = grad(loss, argnums=(0, 1))(mu, rho)
    m, r = mu.clone().requires_grad_(True), rho.clone().requires_grad_(True)
    loss(m, r).backward()
    assert torch.isfinite(g_rho).all() and torch.isfinite(g_mu).all()
    torch.testing.assert_close(g_mu, m.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_rho, r.grad, rtol=1e-5, atol=1e-5)
