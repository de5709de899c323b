"""Triton kernels of the Bayesian student (MATH.md sections 6 and 7).

Motivation: a Bayesian layer's weight sample ``w = mu + softplus(rho) * eps`` done eagerly writes
eps, sigma and w (three weight-sized tensors) and reads them back in the backward. Here eps comes
from Triton's Philox (``tl.randn4x``) inside the kernel: the forward reads mu, rho and writes w;
the backward regenerates eps from ``(seed, offset)`` and writes drho; nothing else is stored.

Stream layout (shared with ``csrc/philox.h`` and ``mtbkd.bayes_ops``): element ``i`` is normal
``i % 4`` of counter ``offset + i // 4`` in stream 0. A program owns ``BLOCK_Q`` counters, i.e.
``4 * BLOCK_Q`` consecutive elements: ``tl.randn4x`` gives four ``[BLOCK_Q]`` blocks which are
interleaved into element order. The SGLD kernel uses the parameter's index as the third counter
word (``tl.philox`` with ``c2 = stream``), the other streams of the same key.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from mtbkd.ops import register_impl

from .losses import _interpreting, _to_out

BLOCK_Q = 256  # Philox counters per program: 1024 elements


@triton.jit
def _normals(seed, q, stream, STREAM0: tl.constexpr):
    # Four normal blocks of counters q (int64) interleaved: element 4 q + j is normal j.
    if STREAM0:
        n0, n1, n2, n3 = tl.randn4x(seed, q)
    else:
        c0 = q.to(tl.uint32)
        c1 = (q >> 32).to(tl.uint32)
        c2 = (q * 0 + stream).to(tl.uint32)
        c3 = (q * 0).to(tl.uint32)
        i0, i1, i2, i3 = tl.philox(seed, c0, c1, c2, c3)
        n0, n1 = tl.pair_uniform_to_normal(
            tl.uint_to_uniform_float(i0), tl.uint_to_uniform_float(i1)
        )
        n2, n3 = tl.pair_uniform_to_normal(
            tl.uint_to_uniform_float(i2), tl.uint_to_uniform_float(i3)
        )
    return tl.interleave(tl.interleave(n0, n2), tl.interleave(n1, n3))


# softplus, sigmoid, the KL's log and the SGLD step's square root use CUDA's libdevice on a GPU,
# not tl.exp / tl.log: those are the SFU approximations (ex2.approx of x log2 e), whose error
# grows with |x| (softplus(-40) came out 15 float32 ulps off on an H200; with libdevice the GPU
# tests' bound of 8 ulps holds). The normals themselves are Triton's tl.randn4x, with its own
# approximate log/sin/cos. These are memory-bound elementwise kernels; the longer sequences'
# cost on a GPU was not measured. The interpreter has no libdevice: there tl.exp / tl.log are
# numpy's, correctly rounded to about an ulp.
@triton.jit
def _exp(x, INTERPRET: tl.constexpr):
    if INTERPRET:
        return tl.exp(x)
    else:
        return libdevice.exp(x)


@triton.jit
def _log(x, INTERPRET: tl.constexpr):
    if INTERPRET:
        return tl.log(x)
    else:
        return libdevice.log(x)


@triton.jit
def _sqrt(x, INTERPRET: tl.constexpr):
    if INTERPRET:
        return tl.sqrt(x)
    else:
        return libdevice.sqrt(x)


@triton.jit
def _log1p(x, INTERPRET: tl.constexpr):
    if INTERPRET:
        # Kahan's log1p: exact rounding of 1 + x corrected by x / ((1 + x) - 1).
        u = 1.0 + x
        return tl.where(u == 1.0, x, tl.log(u) * (x / (u - 1.0)))
    else:
        return libdevice.log1p(x)


@triton.jit
def _softplus(r, INTERPRET: tl.constexpr):
    # torch's softplus (threshold 20): r for r > 20, log1p(exp(r)) otherwise. NaN propagates
    # (a GPU's min would drop it and return softplus(20): gaussian_kl's finite check reads the
    # NaN from the KL sum).
    rc = tl.minimum(r, 20.0, propagate_nan=tl.PropagateNan.ALL)
    return tl.where(r > 20.0, r, _log1p(_exp(rc, INTERPRET), INTERPRET))


@triton.jit
def _sigmoid(r, INTERPRET: tl.constexpr):
    return 1.0 / (1.0 + _exp(-r, INTERPRET))


@triton.jit
def _kl_term(mu, r, s, prior_mu, inv_var0, log_s0, INTERPRET: tl.constexpr):
    # KL(N(mu, s^2) || N(m0, s0^2)) = log s0 - log s + (s^2 + (mu - m0)^2) / (2 s0^2) - 1/2.
    # Below rho = -20, s = e^rho (1 - e^rho / 2 + ...) heads for the denormals (0 below -104 in
    # float32): log s = rho - s / 2 there (not log 0).
    d = mu - prior_mu
    log_s = tl.where(r < -20.0, r - 0.5 * s, _log(s, INTERPRET))
    return log_s0 - log_s + 0.5 * (s * s + d * d) * inv_var0 - 0.5


@triton.jit
def _kl_rho_grad(r, s, sig, inv_var0):
    # dKL/drho = (s / s0^2 - 1 / s) sigmoid(rho); sigmoid(rho) / s = 1 - s / 2 below rho = -20
    plain = (s * inv_var0 - 1.0 / s) * sig
    return tl.where(r < -20.0, s * sig * inv_var0 - (1.0 - 0.5 * s), plain)


@triton.jit
def _reparam_fwd_kernel(mu_ptr, rho_ptr, w_ptr, n, seed, offset, BLOCK_Q: tl.constexpr,
                        F64: tl.constexpr, INTERPRET: tl.constexpr):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    q = pid * BLOCK_Q + tl.arange(0, BLOCK_Q).to(tl.int64)
    eps = _normals(seed, offset + q, 0, True)
    idx = pid * (4 * BLOCK_Q) + tl.arange(0, 4 * BLOCK_Q)
    mask = idx < n
    acc = tl.float64 if F64 else tl.float32
    mu = tl.load(mu_ptr + idx, mask=mask, other=0.0).to(acc)
    r = tl.load(rho_ptr + idx, mask=mask, other=0.0).to(acc)
    w = mu + _softplus(r, INTERPRET) * eps.to(acc)
    tl.store(w_ptr + idx, _to_out(w, w_ptr.dtype.element_ty, INTERPRET), mask=mask)


@triton.jit
def _reparam_bwd_kernel(g_ptr, rho_ptr, drho_ptr, n, seed, offset, BLOCK_Q: tl.constexpr,
                        F64: tl.constexpr, INTERPRET: tl.constexpr):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    q = pid * BLOCK_Q + tl.arange(0, BLOCK_Q).to(tl.int64)
    eps = _normals(seed, offset + q, 0, True)
    idx = pid * (4 * BLOCK_Q) + tl.arange(0, 4 * BLOCK_Q)
    mask = idx < n
    acc = tl.float64 if F64 else tl.float32
    g = tl.load(g_ptr + idx, mask=mask, other=0.0).to(acc)
    r = tl.load(rho_ptr + idx, mask=mask, other=0.0).to(acc)
    drho = g * eps.to(acc) * _sigmoid(r, INTERPRET)
    tl.store(drho_ptr + idx, _to_out(drho, drho_ptr.dtype.element_ty, INTERPRET), mask=mask)


@triton.jit
def _kl_kernel(mu_ptr, rho_ptr, part_ptr, n, prior_mu: tl.float64, inv_var0: tl.float64,
               log_s0: tl.float64, BLOCK: tl.constexpr, F64: tl.constexpr,
               INTERPRET: tl.constexpr):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    idx = pid * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    acc = tl.float64 if F64 else tl.float32
    # A Python float argument would arrive as float32: the float64 scalars, rounded once to acc.
    prior_mu = tl.full((), prior_mu, acc)
    inv_var0 = tl.full((), inv_var0, acc)
    log_s0 = tl.full((), log_s0, acc)
    mu = tl.load(mu_ptr + idx, mask=mask, other=0.0).to(acc)
    r = tl.load(rho_ptr + idx, mask=mask, other=0.0).to(acc)
    kl = _kl_term(mu, r, _softplus(r, INTERPRET), prior_mu, inv_var0, log_s0, INTERPRET)
    tl.store(part_ptr + pid, tl.sum(tl.where(mask, kl, 0.0), axis=0))


@triton.jit
def _kl_grad_kernel(g_ptr, mu_ptr, rho_ptr, dmu_ptr, drho_ptr, n, prior_mu: tl.float64,
                    inv_var0: tl.float64, BLOCK: tl.constexpr, MU_GRAD: tl.constexpr,
                    RHO_GRAD: tl.constexpr, F64: tl.constexpr,
                    INTERPRET: tl.constexpr):  # fmt: skip
    # g dKL/dmu = g (mu - m0) / s0^2 and g dKL/drho, g read on the device.
    pid = tl.program_id(0).to(tl.int64)
    idx = pid * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    acc = tl.float64 if F64 else tl.float32
    prior_mu = tl.full((), prior_mu, acc)
    inv_var0 = tl.full((), inv_var0, acc)
    g = tl.load(g_ptr).to(acc)
    if MU_GRAD:
        mu = tl.load(mu_ptr + idx, mask=mask, other=0.0).to(acc)
        dm = g * ((mu - prior_mu) * inv_var0)
        tl.store(dmu_ptr + idx, _to_out(dm, dmu_ptr.dtype.element_ty, INTERPRET), mask=mask)
    if RHO_GRAD:
        r = tl.load(rho_ptr + idx, mask=mask, other=0.0).to(acc)
        dr = _kl_rho_grad(r, _softplus(r, INTERPRET), _sigmoid(r, INTERPRET), inv_var0)
        tl.store(drho_ptr + idx, _to_out(g * dr, drho_ptr.dtype.element_ty, INTERPRET), mask=mask)


@triton.jit
def _reparam_kl_fwd_kernel(mu_ptr, rho_ptr, w_ptr, part_ptr, n, seed, offset,
                           prior_mu: tl.float64, inv_var0: tl.float64, log_s0: tl.float64,
                           BLOCK_Q: tl.constexpr, F64: tl.constexpr,
                           INTERPRET: tl.constexpr):  # fmt: skip
    # w = mu + s eps and this program's KL sum from the same loads of mu and rho (and s).
    pid = tl.program_id(0).to(tl.int64)
    q = pid * BLOCK_Q + tl.arange(0, BLOCK_Q).to(tl.int64)
    eps = _normals(seed, offset + q, 0, True)
    idx = pid * (4 * BLOCK_Q) + tl.arange(0, 4 * BLOCK_Q)
    mask = idx < n
    acc = tl.float64 if F64 else tl.float32
    prior_mu = tl.full((), prior_mu, acc)
    inv_var0 = tl.full((), inv_var0, acc)
    log_s0 = tl.full((), log_s0, acc)
    mu = tl.load(mu_ptr + idx, mask=mask, other=0.0).to(acc)
    r = tl.load(rho_ptr + idx, mask=mask, other=0.0).to(acc)
    s = _softplus(r, INTERPRET)
    w = mu + s * eps.to(acc)
    tl.store(w_ptr + idx, _to_out(w, w_ptr.dtype.element_ty, INTERPRET), mask=mask)
    kl = _kl_term(mu, r, s, prior_mu, inv_var0, log_s0, INTERPRET)
    tl.store(part_ptr + pid, tl.sum(tl.where(mask, kl, 0.0), axis=0))


@triton.jit
def _reparam_kl_bwd_kernel(g_ptr, gk_ptr, mu_ptr, rho_ptr, dmu_ptr, drho_ptr, n, seed, offset,
                           prior_mu: tl.float64, inv_var0: tl.float64, BLOCK_Q: tl.constexpr,
                           MU_GRAD: tl.constexpr, RHO_GRAD: tl.constexpr, F64: tl.constexpr,
                           INTERPRET: tl.constexpr):  # fmt: skip
    # dmu = g + gk (mu - m0) / s0^2, drho = g eps sigmoid(rho) + gk dKL/drho, in one pass.
    pid = tl.program_id(0).to(tl.int64)
    idx = pid * (4 * BLOCK_Q) + tl.arange(0, 4 * BLOCK_Q)
    mask = idx < n
    acc = tl.float64 if F64 else tl.float32
    prior_mu = tl.full((), prior_mu, acc)
    inv_var0 = tl.full((), inv_var0, acc)
    gk = tl.load(gk_ptr).to(acc)
    g = tl.load(g_ptr + idx, mask=mask, other=0.0).to(acc)
    if MU_GRAD:
        mu = tl.load(mu_ptr + idx, mask=mask, other=0.0).to(acc)
        dm = g + gk * ((mu - prior_mu) * inv_var0)
        tl.store(dmu_ptr + idx, _to_out(dm, dmu_ptr.dtype.element_ty, INTERPRET), mask=mask)
    if RHO_GRAD:
        q = pid * BLOCK_Q + tl.arange(0, BLOCK_Q).to(tl.int64)
        eps = _normals(seed, offset + q, 0, True)
        r = tl.load(rho_ptr + idx, mask=mask, other=0.0).to(acc)
        sig = _sigmoid(r, INTERPRET)
        dr = _kl_rho_grad(r, _softplus(r, INTERPRET), sig, inv_var0)
        out = g * eps.to(acc) * sig + gk * dr
        tl.store(drho_ptr + idx, _to_out(out, drho_ptr.dtype.element_ty, INTERPRET), mask=mask)


@triton.jit
def _sgld_kernel(p_ptr, g_ptr, sq_ptr, n, seed, stream, lr: tl.float64, num_data: tl.float64,
                 weight_decay: tl.float64, noise_scale: tl.float64, alpha: tl.float64,
                 damp: tl.float64, BLOCK_Q: tl.constexpr, PRECOND: tl.constexpr,
                 F64: tl.constexpr, INTERPRET: tl.constexpr):  # fmt: skip
    # theta <- theta - lr G grad_U + sqrt(2 lr T G) xi, grad_U = N g + wd theta (MATH.md 7).
    pid = tl.program_id(0).to(tl.int64)
    q = pid * BLOCK_Q + tl.arange(0, BLOCK_Q).to(tl.int64)
    xi = _normals(seed, q, stream, False)
    idx = pid * (4 * BLOCK_Q) + tl.arange(0, 4 * BLOCK_Q)
    mask = idx < n
    acc = tl.float64 if F64 else tl.float32
    # float64 scalars (a Python float would arrive as float32), rounded once to acc
    lr = tl.full((), lr, acc)
    num_data = tl.full((), num_data, acc)
    weight_decay = tl.full((), weight_decay, acc)
    noise_scale = tl.full((), noise_scale, acc)
    alpha = tl.full((), alpha, acc)
    damp = tl.full((), damp, acc)
    th = tl.load(p_ptr + idx, mask=mask, other=0.0).to(acc)
    g = tl.load(g_ptr + idx, mask=mask, other=0.0).to(acc)
    gu = num_data * g + weight_decay * th
    if PRECOND:
        gm = gu / num_data
        v = alpha * tl.load(sq_ptr + idx, mask=mask, other=0.0).to(acc) + (1.0 - alpha) * gm * gm
        tl.store(sq_ptr + idx, v.to(sq_ptr.dtype.element_ty), mask=mask)
        g_pre = 1.0 / (damp + _sqrt(v, INTERPRET))
        new = th - lr * g_pre * gu + noise_scale * _sqrt(g_pre, INTERPRET) * xi.to(acc)
    else:
        new = th - lr * gu + noise_scale * xi.to(acc)
    tl.store(p_ptr + idx, _to_out(new, p_ptr.dtype.element_ty, INTERPRET), mask=mask)


def _grid_q(n: int) -> tuple[int]:
    return (triton.cdiv(n, 4 * BLOCK_Q),)


def _check_finite(t: torch.Tensor, name: str) -> None:
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains non-finite values (NaN or inf)")


@register_impl("reparameterize", "triton")
def reparameterize_fwd(mu, rho, seed, offset, check_finite):
    """Forward of ``mtbkd::reparameterize``: ``mu + softplus(rho) * eps(seed, offset)``."""
    if check_finite:
        _check_finite(mu, "mu")
        _check_finite(rho, "rho")
    w = torch.empty_like(mu)
    n = mu.numel()
    if n:
        _reparam_fwd_kernel[_grid_q(n)](mu, rho, w, n, seed, offset, BLOCK_Q=BLOCK_Q,
                                        F64=mu.dtype == torch.float64,
                                        INTERPRET=_interpreting())  # fmt: skip
    return w


@register_impl("reparameterize_backward", "triton")
def reparameterize_bwd(grad, rho, seed, offset):
    """``grad * eps(seed, offset) * sigmoid(rho)`` with eps regenerated."""
    drho = torch.empty_like(rho)
    n = rho.numel()
    if n:
        _reparam_bwd_kernel[_grid_q(n)](grad, rho, drho, n, seed, offset, BLOCK_Q=BLOCK_Q,
                                        F64=rho.dtype == torch.float64,
                                        INTERPRET=_interpreting())  # fmt: skip
    return drho


_KL_BLOCK = 1024


@register_impl("gaussian_kl", "triton")
def gaussian_kl(mu, rho, prior_mu, prior_sigma):
    """Summed Gaussian-prior KL: per-program partial sums, added in float64."""
    n = mu.numel()
    f64 = mu.dtype == torch.float64
    parts = torch.zeros(triton.cdiv(n, _KL_BLOCK), device=mu.device,
                        dtype=torch.float64 if f64 else torch.float32)  # fmt: skip
    if n:
        _kl_kernel[(parts.numel(),)](
            mu, rho, parts, n, prior_mu, 1.0 / prior_sigma / prior_sigma, math.log(prior_sigma),
            BLOCK=_KL_BLOCK, F64=f64, INTERPRET=_interpreting(),
        )  # fmt: skip
    return parts.sum(dtype=torch.float64).to(parts.dtype)


@register_impl("gaussian_kl_backward", "triton")
def gaussian_kl_bwd(grad, mu, rho, prior_mu, prior_sigma, mu_grad, rho_grad):
    """The KL's gradient times ``grad``, recomputed from mu and rho in one pass."""
    n = mu.numel()
    f64 = mu.dtype == torch.float64
    dmu = torch.empty_like(mu) if mu_grad else mu.new_empty((0,))
    drho = torch.empty_like(rho) if rho_grad else rho.new_empty((0,))
    if n and (mu_grad or rho_grad):
        g = grad.reshape(1).to(torch.float64 if f64 else torch.float32)
        _kl_grad_kernel[(triton.cdiv(n, _KL_BLOCK),)](
            g, mu, rho, dmu, drho, n, prior_mu, 1.0 / prior_sigma / prior_sigma, BLOCK=_KL_BLOCK,
            MU_GRAD=mu_grad, RHO_GRAD=rho_grad, F64=f64, INTERPRET=_interpreting(),
        )  # fmt: skip
    return dmu, drho


@register_impl("reparameterize_kl", "triton")
def reparameterize_kl_fwd(mu, rho, seed, offset, prior_mu, prior_sigma, check_finite):
    """``(mu + softplus(rho) * eps, summed KL)`` in one pass (partial sums added in float64)."""
    if check_finite:
        _check_finite(mu, "mu")
        _check_finite(rho, "rho")
    w = torch.empty_like(mu)
    n = mu.numel()
    f64 = mu.dtype == torch.float64
    parts = torch.zeros(_grid_q(n)[0], device=mu.device,
                        dtype=torch.float64 if f64 else torch.float32)  # fmt: skip
    if n:
        _reparam_kl_fwd_kernel[_grid_q(n)](
            mu, rho, w, parts, n, seed, offset, prior_mu, 1.0 / prior_sigma / prior_sigma,
            math.log(prior_sigma), BLOCK_Q=BLOCK_Q, F64=f64, INTERPRET=_interpreting(),
        )  # fmt: skip
    return w, parts.sum(dtype=torch.float64).to(parts.dtype)


@register_impl("reparameterize_kl_backward", "triton")
def reparameterize_kl_bwd(grad, grad_kl, mu, rho, seed, offset, prior_mu, prior_sigma, mu_grad,
                          rho_grad):  # fmt: skip
    """Both outputs' backward in one pass, eps regenerated."""
    n = mu.numel()
    f64 = mu.dtype == torch.float64
    dmu = torch.empty_like(mu) if mu_grad else mu.new_empty((0,))
    drho = torch.empty_like(rho) if rho_grad else rho.new_empty((0,))
    if n and (mu_grad or rho_grad):
        gk = grad_kl.reshape(1).to(torch.float64 if f64 else torch.float32)
        iv = 1.0 / prior_sigma / prior_sigma  # not ** 2: OverflowError beyond 1.3e154
        _reparam_kl_bwd_kernel[_grid_q(n)](
            grad, gk, mu, rho, dmu, drho, n, seed, offset, prior_mu, iv,
            BLOCK_Q=BLOCK_Q, MU_GRAD=mu_grad, RHO_GRAD=rho_grad, F64=f64,
            INTERPRET=_interpreting(),
        )  # fmt: skip
    return dmu, drho


@register_impl("sgld_step_", "triton")
def sgld_step_(params, grads, square_avgs, lr, num_data, temperature, weight_decay, seed,
               precondition, alpha, eps):  # fmt: skip
    """(p)SGLD step: one fused launch per parameter (noise and update in one pass)."""
    noise_scale = math.sqrt(2.0 * lr * temperature)
    for j, (p, g) in enumerate(zip(params, grads)):
        n = p.numel()
        if n == 0:
            continue
        sq = square_avgs[j] if precondition else p
        _sgld_kernel[_grid_q(n)](
            p, g, sq, n, seed, j, lr, num_data, weight_decay, noise_scale, alpha, eps,
            BLOCK_Q=BLOCK_Q, PRECOND=precondition, F64=p.dtype == torch.float64,
            INTERPRET=_interpreting(),
        )  # fmt: skip
