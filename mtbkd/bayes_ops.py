"""Custom ops of the Bayesian student (MATH.md sections 6 and 7) and their reference backend.

* ``mtbkd::reparameterize``: ``w = mu + softplus(rho) * eps`` with ``eps ~ N(0, 1)`` drawn by a
  Philox 4x32-10 generator keyed by ``(seed, offset)`` inside the kernel. The backward
  (``mtbkd::reparameterize_backward``) regenerates eps, so it is never stored.
* ``mtbkd::gaussian_kl``: the summed KL to a Gaussian prior in one pass; its backward
  (``mtbkd::gaussian_kl_backward``) recomputes the gradient in one more pass, already scaled.
* ``mtbkd::reparameterize_kl``: the sample and the KL from one pass over ``mu`` and ``rho``, and a
  one-pass backward of both (``mtbkd::reparameterize_kl_backward``): what the Bayesian layers
  (``BayesLinear``, ``BayesConv1d/2d/3d``) run inside ``mtbkd.nn.record_kl``.
* ``mtbkd::sgld_step_``: one fused (p)SGLD update of a list of parameters, noise made in-kernel.

The random stream (see ``csrc/philox.h``) is Triton's ``tl.randn4x``: element ``i`` takes normal
``i % 4`` of Philox counter ``offset + i // 4`` (stream 0), so a tensor of ``n`` elements uses
``ceil(n / 4)`` counters and every backend (reference, cpu, triton, cuda) draws the same numbers
up to an ulp of the transcendental functions. The reference backend below implements Philox with
integer torch ops, independently of the kernels.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from mtbkd.ops import _impl, register_impl

__all__ = [
    "reparameterize",
    "reparameterize_backward",
    "gaussian_kl",
    "gaussian_kl_backward",
    "reparameterize_kl",
    "reparameterize_kl_backward",
    "sgld_step_",
    "philox_normal",
    "new_seed",
    "counters_used",
]

_MASK32 = 0xFFFFFFFF
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_SEED_LIMIT = 2**63
_SOFTPLUS_THRESHOLD = 20.0  # torch's softplus: rho > 20 -> rho


def new_seed() -> int:
    """A fresh Philox seed drawn from torch's default CPU generator (``torch.manual_seed``-able).

    While a graph is traced (``torch.export``, ``make_fx`` with symbolic shapes) the draw is a
    node of the graph and the seed a symbolic int, so each call of the traced program draws its
    own; under a bare ``FakeTensorMode`` (no values, no graph: shape and memory estimation) it is
    0, and torch's generator is left as it is.
    """
    if not torch.compiler.is_compiling():  # (dynamo traces the draw itself)
        from torch._guards import detect_fake_mode

        mode = detect_fake_mode()
        if mode is not None and mode.shape_env is None:
            return 0
    v = torch.randint(0, _SEED_LIMIT - 1, (), dtype=torch.int64).item()
    return v if isinstance(v, torch.SymInt) else int(v)


def counters_used(numel: int) -> int:
    """Philox counters consumed by sampling ``numel`` elements: ``ceil(numel / 4)``."""
    return (numel + 3) // 4


# ----------------------------------------------------------------------------------------------
# Reference Philox 4x32-10 in integer torch ops (uint32 values held in int64)
# ----------------------------------------------------------------------------------------------


def _mulhilo(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    # 32x32 -> 64-bit product split as a = a_hi * 2^16 + a_lo so that nothing exceeds 2^49.
    p_lo = b * (a & 0xFFFF)
    p_hi = b * (a >> 16)
    s = p_hi + (p_lo >> 16)
    return s >> 16, ((s & 0xFFFF) << 16) | (p_lo & 0xFFFF)


def _philox_uint32(seed: int, counters: Tensor, stream: int) -> list[Tensor]:
    c0 = counters & _MASK32
    c1 = (counters >> 32) & _MASK32
    c2 = torch.full_like(counters, stream & _MASK32)
    c3 = torch.zeros_like(counters)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(10):
        hi_a, lo_a = _mulhilo(_ROUND_A, c0)
        hi_b, lo_b = _mulhilo(_ROUND_B, c2)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _MASK32, (k1 + _KEY_B) & _MASK32
    return [c0, c1, c2, c3]


def _uniform(x: Tensor) -> Tensor:
    s = torch.where(x >= 2**31, x - 2**32, x)  # reinterpret as int32
    s = torch.where(s < 0, -s - 1, s)
    return s.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32)


def _box_muller(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    r = torch.sqrt(-2.0 * torch.log(torch.clamp_min(a, 1e-7)))
    th = torch.tensor(2 * math.pi, dtype=torch.float32) * b
    return r * torch.cos(th), r * torch.sin(th)


def _reference_normal(seed: int, offset: int, n: int, stream: int = 0) -> Tensor:
    counters = offset + torch.arange(counters_used(n), dtype=torch.int64)
    x = _philox_uint32(seed, counters, stream)
    n0, n1 = _box_muller(_uniform(x[0]), _uniform(x[1]))
    n2, n3 = _box_muller(_uniform(x[2]), _uniform(x[3]))
    return torch.stack([n0, n1, n2, n3], dim=1).reshape(-1)[:n]


def philox_normal(
    seed: int, offset: int, n: int, stream: int = 0, backend: str = "reference"
) -> Tensor:
    """The first ``n`` normals (float32, CPU) of the stream ``(seed, offset, stream)``.

    ``backend="reference"`` uses integer torch ops; ``"cpu"`` the C++ generator.
    """
    seed, offset = _check_seed(seed, offset)
    for name, v, hi in (("n", n, None), ("stream", stream, 2**32)):
        if not isinstance(v, int) and isinstance(v, numbers.Integral):
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")
        if v < 0 or (hi is not None and v >= hi):
            bound = "in [0, 2**32)" if hi else "non-negative"
            raise ValueError(f"{name} must be {bound}, got {v}")
    n, stream = int(n), int(stream)
    if backend == "cpu":
        from mtbkd import ops

        if ops._C is None:
            raise RuntimeError(f"backend='cpu' is not available: {ops._C_ERROR}")
        return torch.ops.mtbkd_C.philox_normal(seed, offset, stream, n)
    if backend != "reference":
        raise ValueError(f"backend must be 'reference' or 'cpu', got {backend!r}")
    return _reference_normal(seed, offset, n, stream)


# ----------------------------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------------------------


def _plain_number(value):
    """A numpy (or other ``numbers.Real``) scalar as a Python ``int`` / ``float``, as ``nn.Linear``
    and :class:`mtbkd.optim.SGLD` take them (``np.int64(len(dataset))``, ``np.float32(0.5)``);
    anything else, bools included, unchanged (for the caller's check to refuse)."""
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, int, float)):
        return int(value) if isinstance(value, numbers.Integral) else float(value)
    return value


def _check_seed(seed: int, offset: int) -> tuple[int, int]:
    """``(seed, offset)`` as ints in ``[0, 2**63)`` (a numpy integer is taken, a bool is not)."""
    out = []
    for name, v in (("seed", seed), ("offset", offset)):
        if not isinstance(v, (int, torch.SymInt)) and isinstance(v, numbers.Integral):
            v = int(v)  # np.int64 and friends (np.bool_ is not Integral)
        if isinstance(v, bool) or not isinstance(v, (int, torch.SymInt)):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")
        if torch.compiler.is_compiling() or isinstance(v, torch.SymInt):
            # new_seed()'s .item() is a data-dependent value in a graph: assert the range
            # instead of branching on it (fullgraph=True could not guard on it). Strict
            # torch.export (torch 2.13) fails on a message callable in the graph: none there.
            if torch.compiler.is_exporting():
                torch._check(v >= 0)
                torch._check(v < _SEED_LIMIT)
            else:
                torch._check(v >= 0, lambda name=name: f"{name} must be in [0, 2**63)")
                torch._check(v < _SEED_LIMIT, lambda name=name: f"{name} must be in [0, 2**63)")
        elif not 0 <= v < _SEED_LIMIT:
            raise ValueError(f"{name} must be in [0, 2**63), got {v}")
        out.append(v)
    return out[0], out[1]


def _check_mu_rho(mu: Tensor, rho: Tensor) -> None:
    for name, t in (("mu", mu), ("rho", rho)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if mu.shape != rho.shape:
        raise ValueError(
            f"mu and rho must have the same shape, got {tuple(mu.shape)} and {tuple(rho.shape)}"
        )
    if mu.dtype != rho.dtype:
        raise TypeError(f"mu and rho must have the same dtype, got {mu.dtype} and {rho.dtype}")
    if mu.device != rho.device:
        raise ValueError(f"mu and rho must be on one device, got {mu.device} and {rho.device}")


def _check_finite(t: Tensor, name: str) -> None:
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains non-finite values (NaN or inf)")


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# The tensor checks of the custom ops, run in the op bodies before any backend is chosen, so that
# every backend (reference, cpu, triton, cuda) refuses the same calls with the same message: the
# kernels index the raw memory of contiguous tensors of one size, and a mismatch read or wrote out
# of bounds (Triton) or stepped the wrong elements. The rules and wording are those of the C++
# ops' check_pair / check_sgld_lists (csrc/bayes_ops.cpp), whose RuntimeError they keep.
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_pair(a: Tensor, b: Tensor, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise RuntimeError(f"{name_a} and {name_b} must have the same shape, got "
                           f"{list(a.shape)} and {list(b.shape)}")  # fmt: skip
    if a.dtype != b.dtype:
        raise RuntimeError(f"{name_a} and {name_b} must have the same dtype, got {a.dtype} and "
                           f"{b.dtype}")  # fmt: skip
    if a.device != b.device:
        raise RuntimeError(f"{name_a} and {name_b} must be on the same device, got {a.device} "
                           f"and {b.device}")  # fmt: skip
    if not (a.is_contiguous() and b.is_contiguous()):
        raise RuntimeError(f"{name_a} and {name_b} must be contiguous")
    if a.dtype not in _KERNEL_DTYPES:
        raise RuntimeError(f"{name_a} must be a floating tensor (float16, bfloat16, float32 or "
                           f"float64), got {a.dtype}")  # fmt: skip


def _check_sgld_tensors(params: list[Tensor], grads: list[Tensor], square_avgs: list[Tensor],
                        precondition: bool) -> None:  # fmt: skip
    if len(params) != len(grads):
        raise RuntimeError("params and grads must have the same length")
    if precondition and len(square_avgs) != len(params):
        raise RuntimeError("square_avgs must have one tensor per parameter when precondition=True")
    for j, (p, g) in enumerate(zip(params, grads)):
        _check_pair(p, g, f"params[{j}]", f"grads[{j}]")
        # the backend is chosen by params[0]'s device (and the CUDA op launches on it)
        if p.device != params[0].device:
            raise RuntimeError(f"params must all be on one device, got {params[0].device} "
                               f"(params[0]) and {p.device} (params[{j}])")  # fmt: skip
        if precondition:
            sq, acc = square_avgs[j], _acc(p.dtype)
            if not (sq.dtype == acc and sq.is_contiguous() and sq.numel() == p.numel()
                    and sq.device == p.device):  # fmt: skip
                raise RuntimeError(
                    f"square_avgs[{j}] must be a contiguous {acc} tensor shaped like params[{j}] "
                    f"({p.numel()} elements on {p.device}), got "
                    f"{'a' if sq.is_contiguous() else 'a non-contiguous'} {sq.dtype} tensor of "
                    f"{sq.numel()} elements on {sq.device}"
                )


def _check_sgld_hyperparameters(lr, num_data, temperature, weight_decay, precondition, alpha,
                                eps) -> dict:  # fmt: skip
    """:class:`mtbkd.optim.SGLD`'s checks (an ``lr`` of 0 allowed, as a scheduler may decay it
    to), numpy numbers and one-element tensors made Python numbers: the hyperparameters by name."""
    from mtbkd.optim import _check_hyperparameters  # (mtbkd.optim imports this module)

    group = {"lr": lr, "num_data": num_data, "temperature": temperature,
             "weight_decay": weight_decay, "precondition": precondition, "alpha": alpha,
             "eps": eps}  # fmt: skip
    _check_hyperparameters(group, at_step=True)
    return group


# ----------------------------------------------------------------------------------------------
# mtbkd::reparameterize (MATH.md section 6)
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("mtbkd::reparameterize", mutates_args=())
def _reparameterize_op(
    mu: Tensor, rho: Tensor, seed: int, offset: int, check_finite: bool
) -> Tensor:
    """``mu + softplus(rho) * eps(seed, offset)`` (contiguous ``mu``/``rho`` of one dtype)."""
    _check_pair(mu, rho, "mu", "rho")
    return _impl("reparameterize", mu)(mu, rho, seed, offset, check_finite)


@_reparameterize_op.register_fake
def _(mu, rho, seed, offset, check_finite):
    return torch.empty_like(mu)


@torch.library.custom_op("mtbkd::reparameterize_backward", mutates_args=())
def reparameterize_backward(grad: Tensor, rho: Tensor, seed: int, offset: int) -> Tensor:
    """``d w / d rho`` applied to ``grad``: ``grad * eps(seed, offset) * sigmoid(rho)``."""
    _check_pair(grad, rho, "grad", "rho")
    return _impl("reparameterize_backward", rho)(grad, rho, seed, offset)


@reparameterize_backward.register_fake
def _(grad, rho, seed, offset):
    return torch.empty_like(rho)


def _save(ctx, *tensors: Tensor) -> None:
    """``ctx.save_for_backward(*tensors)``, except inference-mode tensors (a frozen ``mu`` or
    ``rho`` made under ``torch.inference_mode()``), which autograd cannot save: they have no
    version counter and cannot change outside inference mode, so they are kept on ``ctx`` as
    they are. :func:`_saved` gives all of them back in order."""
    ctx.kept = [t if t.is_inference() else None for t in tensors]
    ctx.save_for_backward(*[t for t in tensors if not t.is_inference()])


def _saved(ctx) -> list[Tensor]:
    it = iter(ctx.saved_tensors)
    return [t if t is not None else next(it) for t in ctx.kept]


def _reparam_bwd_setup(ctx, inputs, output):
    grad, rho, seed, offset = inputs
    _save(ctx, grad, rho)
    ctx.seed, ctx.offset = seed, offset


def _reparam_bwd_backward(ctx, v):
    # drho = grad * sigmoid(rho) * eps is linear in grad, and d/drho of it is
    # grad * sigmoid(rho) * sigmoid(-rho) * eps: both are this op again, eps regenerated
    grad, rho = _saved(ctx)
    v = v.contiguous()
    dgrad = drho = None
    if ctx.needs_input_grad[0]:
        dgrad = reparameterize_backward(v, rho, ctx.seed, ctx.offset)
    if ctx.needs_input_grad[1]:
        acc = _acc(rho.dtype)
        g = (grad.to(acc) * v.to(acc) * torch.sigmoid(-rho.to(acc))).to(rho.dtype)
        drho = reparameterize_backward(g.contiguous(), rho, ctx.seed, ctx.offset)
    return dgrad, drho, None, None


reparameterize_backward.register_autograd(_reparam_bwd_backward, setup_context=_reparam_bwd_setup)


def _reparam_setup(ctx, inputs, output):
    _, rho, seed, offset, _ = inputs
    _save(ctx, rho)  # a parameter: saving it costs no memory
    ctx.seed, ctx.offset = seed, offset


def _reparam_backward(ctx, grad):
    (rho,) = _saved(ctx)
    grad = grad.contiguous()
    drho = None
    if ctx.needs_input_grad[1]:
        drho = reparameterize_backward(grad, rho, ctx.seed, ctx.offset)
    return grad if ctx.needs_input_grad[0] else None, drho, None, None, None


_reparameterize_op.register_autograd(_reparam_backward, setup_context=_reparam_setup)


def reparameterize(
    mu: Tensor,
    rho: Tensor,
    seed: int | None = None,
    offset: int = 0,
    *,
    check_finite: bool = True,
) -> Tensor:
    """Sample ``w = mu + softplus(rho) * eps``, ``eps ~ N(0, 1)`` from Philox (MATH.md section 6).

    ``eps`` is generated inside the kernel from ``(seed, offset)`` and regenerated in the
    backward (``dmu = g``, ``drho = g * eps * sigmoid(rho)``), so no eps-sized tensor exists;
    higher derivatives (``create_graph=True``) regenerate it the same way.
    Element ``i`` uses counter ``offset + i // 4``: to draw several independent tensors under one
    seed, advance ``offset`` by :func:`counters_used` of the previous tensor. ``seed=None`` draws
    a seed from torch's default generator, so ``torch.manual_seed`` makes sampling reproducible.
    """
    _check_mu_rho(mu, rho)
    if seed is None:
        seed = new_seed()
    seed, offset = _check_seed(seed, offset)
    if torch._C._are_functorch_transforms_active():
        # torch.func.grad / jacrev / jvp, for which the op has no rule: the same sample (the
        # reference stream, the kernels' to float32 rounding) in differentiable torch ops
        return _ref_reparameterize(mu, rho, seed, offset, False)
    return _reparameterize_op(mu.contiguous(), rho.contiguous(), seed, offset, check_finite)


@register_impl("reparameterize", "reference")
def _ref_reparameterize(mu, rho, seed, offset, check_finite):
    if check_finite:
        _check_finite(mu, "mu")
        _check_finite(rho, "rho")
    acc = _acc(mu.dtype)
    eps = _reference_normal(seed, offset, mu.numel()).to(device=mu.device, dtype=acc)
    w = mu.to(acc) + F.softplus(rho.to(acc)) * eps.view(mu.shape)
    return w.to(mu.dtype)


@register_impl("reparameterize_backward", "reference")
def _ref_reparameterize_backward(grad, rho, seed, offset):
    acc = _acc(rho.dtype)
    eps = _reference_normal(seed, offset, rho.numel()).to(device=rho.device, dtype=acc)
    return (grad.to(acc) * eps.view(rho.shape) * torch.sigmoid(rho.to(acc))).to(rho.dtype)


@register_impl("reparameterize", "cpu")
def _cpu_reparameterize(mu, rho, seed, offset, check_finite):
    return torch.ops.mtbkd_C.reparameterize_fwd(mu, rho, seed, offset, check_finite)


@register_impl("reparameterize_backward", "cpu")
def _cpu_reparameterize_backward(grad, rho, seed, offset):
    return torch.ops.mtbkd_C.reparameterize_bwd(grad, rho, seed, offset)


@register_impl("reparameterize", "cuda")
def _cuda_reparameterize(mu, rho, seed, offset, check_finite):
    if check_finite:
        _check_finite(mu, "mu")
        _check_finite(rho, "rho")
    return torch.ops.mtbkd_C.reparameterize_fwd(mu, rho, seed, offset, False)


register_impl("reparameterize_backward", "cuda", _cpu_reparameterize_backward)


# ----------------------------------------------------------------------------------------------
# mtbkd::gaussian_kl (MATH.md section 6)
# ----------------------------------------------------------------------------------------------


def _check_prior(prior_mu: float, prior_sigma: float) -> None:
    from mtbkd import validate

    validate.check_prior_sigma(prior_sigma)
    validate.check_real(prior_mu, "prior_mu")


def _check_kl_grad(grad: Tensor, mu: Tensor, name: str = "grad") -> None:
    # the C++ ops' check_kl_grad: the KL's incoming gradient, one number on mu's device (the
    # kernels read it there)
    if grad.numel() != 1 or not grad.is_floating_point():
        raise RuntimeError(f"{name} must be a floating-point tensor of one element, got "
                           f"{grad.dtype} of shape {list(grad.shape)}")  # fmt: skip
    if grad.device != mu.device:
        raise RuntimeError(f"{name} must be on mu's device {mu.device}, got {grad.device}")


@torch.library.custom_op("mtbkd::gaussian_kl", mutates_args=())
def _gaussian_kl_op(mu: Tensor, rho: Tensor, prior_mu: float, prior_sigma: float) -> Tensor:
    """The summed KL as a 0-d fp32 (fp64 for fp64) tensor; contiguous ``mu`` / ``rho``."""
    _check_pair(mu, rho, "mu", "rho")
    _check_prior(prior_mu, prior_sigma)
    return _impl("gaussian_kl", mu)(mu, rho, prior_mu, prior_sigma)


@_gaussian_kl_op.register_fake
def _(mu, rho, prior_mu, prior_sigma):
    return mu.new_empty((), dtype=_acc(mu.dtype))


@torch.library.custom_op("mtbkd::gaussian_kl_backward", mutates_args=())
def gaussian_kl_backward(
    grad: Tensor,
    mu: Tensor,
    rho: Tensor,
    prior_mu: float,
    prior_sigma: float,
    mu_grad: bool,
    rho_grad: bool,
) -> tuple[Tensor, Tensor]:
    """``grad`` (a one-element tensor) times the gradient of the summed KL, recomputed from
    ``mu`` and ``rho`` in one pass: ``grad * (mu - m0) / s0^2`` and
    ``grad * (s / s0^2 - 1 / s) * sigmoid(rho)``, in fp32 (fp64), rounded once to ``mu``'s
    dtype; an output not asked for (``mu_grad`` / ``rho_grad`` False) is an empty tensor."""
    _check_pair(mu, rho, "mu", "rho")
    _check_kl_grad(grad, mu)
    _check_prior(prior_mu, prior_sigma)
    return _impl("gaussian_kl_backward", mu)(grad, mu, rho, prior_mu, prior_sigma, mu_grad,
                                             rho_grad)  # fmt: skip


@gaussian_kl_backward.register_fake
def _(grad, mu, rho, prior_mu, prior_sigma, mu_grad, rho_grad):
    return (torch.empty_like(mu) if mu_grad else mu.new_empty((0,)),
            torch.empty_like(rho) if rho_grad else rho.new_empty((0,)))  # fmt: skip


def _kl_grad_terms(
    m: Tensor, r: Tensor, prior_mu: float, prior_sigma: float
) -> tuple[Tensor, Tensor]:
    """``(dKL/dmu, dKL/drho)`` elementwise in torch ops (differentiable; the reference's formula).

    Below rho = -20, s = softplus(rho) heads for the denormals (0 below -104 in float32):
    sigmoid(rho) / s = 1 - s / 2 there, not (1 / 0) * 0; the other branch sees s = 1 there, so
    that a second derivative through ``torch.where`` stays finite.
    """
    iv = inv_var(prior_sigma)
    s = F.softplus(r)
    sig = torch.sigmoid(r)
    tiny = r < -_SOFTPLUS_THRESHOLD
    s_plain = torch.where(tiny, torch.ones_like(s), s)
    dr = torch.where(tiny, s * sig * iv - (1.0 - 0.5 * s), (s_plain * iv - 1.0 / s_plain) * sig)
    return (m - prior_mu) * iv, dr


def inv_var(prior_sigma: float) -> float:
    """``1 / prior_sigma**2`` without forming the square: Python's ``**`` raises OverflowError
    beyond ``prior_sigma`` = 1.3e154 (the C++ kernels' 1 / inf is 0, the value this gives too,
    to within a denormal)."""
    return 1.0 / prior_sigma / prior_sigma


def _kl_setup(ctx, inputs, output):
    mu, rho, prior_mu, prior_sigma = inputs
    _save(ctx, mu, rho)  # parameters: saving them costs no memory
    ctx.prior = (prior_mu, prior_sigma)


def _kl_backward(ctx, grad_kl):
    mu, rho = _saved(ctx)
    need_mu, need_rho = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_mu or need_rho):
        return None, None, None, None
    prior_mu, prior_sigma = ctx.prior
    acc = _acc(mu.dtype)
    if torch.is_grad_enabled():
        # backward(create_graph=True): the same formula in torch ops, differentiable again
        dm, dr = _kl_grad_terms(mu.to(acc), rho.to(acc), prior_mu, prior_sigma)
        g = grad_kl.to(acc)
        return ((g * dm).to(mu.dtype) if need_mu else None,
                (g * dr).to(rho.dtype) if need_rho else None, None, None)  # fmt: skip
    dmu, drho = gaussian_kl_backward(grad_kl.reshape(()).to(acc), mu, rho, prior_mu, prior_sigma,
                                     need_mu, need_rho)  # fmt: skip
    return dmu if need_mu else None, drho if need_rho else None, None, None


_gaussian_kl_op.register_autograd(_kl_backward, setup_context=_kl_setup)


def gaussian_kl(mu: Tensor, rho: Tensor, prior_sigma: float = 1.0, prior_mu: float = 0.0) -> Tensor:
    """``sum [log(s0/s) + (s^2 + (mu - m0)^2) / (2 s0^2) - 1/2]``, ``s = softplus(rho)``
    (MATH.md section 6): KL of ``N(mu, s^2)`` to the prior ``N(m0, s0^2)``, summed, fp32 (fp64
    for fp64 input), in one pass over ``mu`` and ``rho``.

    The backward (:func:`gaussian_kl_backward`) recomputes ``softplus(rho)`` and ``sigmoid(rho)``
    in one more pass and writes the gradient already multiplied by the incoming one, in fp32 and
    rounded once (so a fp16 gradient of a tight prior does not overflow before a ``1 / num_data``
    scale): no weight-sized tensor is kept between forward and backward. Higher derivatives
    (``create_graph=True``) go through the same formula in torch ops.
    """
    from mtbkd import validate

    _check_mu_rho(mu, rho)
    prior_sigma = validate.check_prior_sigma(_plain_number(prior_sigma))
    prior_mu = validate.check_real(_plain_number(prior_mu), "prior_mu")
    if torch._C._are_functorch_transforms_active():  # (as in reparameterize)
        return _ref_gaussian_kl(mu, rho, prior_mu, prior_sigma)
    kl = _gaussian_kl_op(mu.contiguous(), rho.contiguous(), prior_mu, prior_sigma)
    # A non-finite sum is the cheap sign of bad input; only then look for the culprit.
    # (nothing to read in a compiled graph, on the meta device or under FakeTensorMode)
    if validate.has_values(kl) and not bool(torch.isfinite(kl.detach())):
        _check_finite(mu, "mu")
        _check_finite(rho, "rho")
    return kl


@register_impl("gaussian_kl", "reference")
def _ref_gaussian_kl(mu, rho, prior_mu, prior_sigma):
    # MATH.md section 6, in the accumulation dtype.
    acc = _acc(mu.dtype)
    m, r = mu.to(acc), rho.to(acc)
    s = F.softplus(r)
    # Below rho = -20, s = e^rho (1 - e^rho / 2 + ...) reaches the denormals (0 below -104 in
    # float32): log s = rho - s / 2 there, not log 0; the other branch is evaluated at s = 1
    # there, so that its gradient stays finite (the functorch path differentiates this)
    tiny = r < -_SOFTPLUS_THRESHOLD
    log_s = torch.where(tiny, r - 0.5 * s, torch.log(torch.where(tiny, torch.ones_like(s), s)))
    kl = (
        math.log(prior_sigma)
        - log_s
        + (s**2 + (m - prior_mu) ** 2) * (0.5 * inv_var(prior_sigma))
        - 0.5
    )
    return kl.sum()


@register_impl("gaussian_kl_backward", "reference")
def _ref_gaussian_kl_backward(grad, mu, rho, prior_mu, prior_sigma, mu_grad, rho_grad):
    acc = _acc(mu.dtype)
    dm, dr = _kl_grad_terms(mu.to(acc), rho.to(acc), prior_mu, prior_sigma)
    g = grad.reshape(()).to(acc)
    return ((g * dm).to(mu.dtype) if mu_grad else mu.new_empty((0,)),
            (g * dr).to(rho.dtype) if rho_grad else rho.new_empty((0,)))  # fmt: skip


@register_impl("gaussian_kl", "cpu")
def _cpu_gaussian_kl(mu, rho, prior_mu, prior_sigma):
    return torch.ops.mtbkd_C.gaussian_kl(mu, rho, prior_mu, prior_sigma)


@register_impl("gaussian_kl_backward", "cpu")
def _cpu_gaussian_kl_backward(grad, mu, rho, prior_mu, prior_sigma, mu_grad, rho_grad):
    return torch.ops.mtbkd_C.gaussian_kl_bwd(grad, mu, rho, prior_mu, prior_sigma, mu_grad,
                                             rho_grad)  # fmt: skip


register_impl("gaussian_kl", "cuda", _cpu_gaussian_kl)
register_impl("gaussian_kl_backward", "cuda", _cpu_gaussian_kl_backward)


# ----------------------------------------------------------------------------------------------
# mtbkd::reparameterize_kl: the sample and the KL in one pass (MATH.md section 6)
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("mtbkd::reparameterize_kl", mutates_args=())
def _reparameterize_kl_op(
    mu: Tensor,
    rho: Tensor,
    seed: int,
    offset: int,
    prior_mu: float,
    prior_sigma: float,
    check_finite: bool,
) -> tuple[Tensor, Tensor]:
    """``(mu + softplus(rho) * eps(seed, offset), summed KL)`` (contiguous, one dtype)."""
    _check_pair(mu, rho, "mu", "rho")
    _check_prior(prior_mu, prior_sigma)
    return _impl("reparameterize_kl", mu)(mu, rho, seed, offset, prior_mu, prior_sigma,
                                          check_finite)  # fmt: skip


@_reparameterize_kl_op.register_fake
def _(mu, rho, seed, offset, prior_mu, prior_sigma, check_finite):
    return torch.empty_like(mu), mu.new_empty((), dtype=_acc(mu.dtype))


@torch.library.custom_op("mtbkd::reparameterize_kl_backward", mutates_args=())
def reparameterize_kl_backward(
    grad: Tensor,
    grad_kl: Tensor,
    mu: Tensor,
    rho: Tensor,
    seed: int,
    offset: int,
    prior_mu: float,
    prior_sigma: float,
    mu_grad: bool,
    rho_grad: bool,
) -> tuple[Tensor, Tensor]:
    """The backward of both outputs of :func:`reparameterize_kl` in one pass:
    ``grad + grad_kl * (mu - m0) / s0^2`` and ``grad * eps * sigmoid(rho) + grad_kl * dKL/drho``
    (``grad_kl`` a one-element tensor, eps regenerated), in fp32 (fp64), each rounded once; an
    output not asked for is an empty tensor."""
    _check_pair(mu, rho, "mu", "rho")
    _check_pair(grad, rho, "grad", "rho")
    _check_kl_grad(grad_kl, mu, "grad_kl")
    _check_prior(prior_mu, prior_sigma)
    return _impl("reparameterize_kl_backward", mu)(grad, grad_kl, mu, rho, seed, offset, prior_mu,
                                                   prior_sigma, mu_grad, rho_grad)  # fmt: skip


@reparameterize_kl_backward.register_fake
def _(grad, grad_kl, mu, rho, seed, offset, prior_mu, prior_sigma, mu_grad, rho_grad):
    return (torch.empty_like(mu) if mu_grad else mu.new_empty((0,)),
            torch.empty_like(rho) if rho_grad else rho.new_empty((0,)))  # fmt: skip


def _reparam_kl_setup(ctx, inputs, output):
    mu, rho, seed, offset, prior_mu, prior_sigma, _ = inputs
    # an output that the loss does not use gets None, not a zero-filled weight-sized tensor
    ctx.set_materialize_grads(False)
    # rho is saved as reparameterize saves it (one tensor each, so that activation checkpointing,
    # which counts saved tensors, can recompute a forward of either op with the other); a leaf
    # mu (a parameter: keeping it costs nothing), which only the KL's gradient reads, is kept
    # with its version and checked as autograd would; a computed mu is saved (freed after the
    # backward, seen by saved-tensor hooks)
    # (an inference-mode mu has no version: it cannot change outside inference mode)
    ctx.mu = None
    if mu.grad_fn is None:
        _save(ctx, rho)
        ctx.mu, ctx.mu_version = mu, None if mu.is_inference() else mu._version
    else:
        _save(ctx, rho, mu)
    ctx.seed, ctx.offset, ctx.prior = seed, offset, (prior_mu, prior_sigma)


def _reparam_kl_backward(ctx, grad_w, grad_kl):
    rho, *saved_mu = _saved(ctx)
    mu = saved_mu[0] if saved_mu else ctx.mu
    # mu is read by its own gradient only (the KL's dKL/drho does not depend on it): a frozen mu
    # changed in place before the backward is no error, as in plain autograd
    if (not saved_mu and ctx.needs_input_grad[0] and ctx.mu_version is not None
            and mu._version != ctx.mu_version):  # fmt: skip
        raise RuntimeError(
            "one of the variables needed for gradient computation has been modified by an "
            f"inplace operation: mu (reparameterize_kl) is at version {mu._version}; expected "
            f"version {ctx.mu_version}"
        )
    need_mu, need_rho = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    nothing = (None,) * 7
    if not (need_mu or need_rho) or (grad_w is None and grad_kl is None):
        return nothing
    prior_mu, prior_sigma = ctx.prior
    acc = _acc(mu.dtype)
    if grad_w is not None:
        grad_w = grad_w.contiguous()
    if torch.is_grad_enabled() or grad_kl is None:
        # create_graph=True (differentiable pieces: the sampling's backward op, the KL's formula in
        # torch ops), or the sample's gradient alone (the sampling's backward)
        dmu = drho = None
        if grad_w is not None:
            dmu = grad_w if need_mu else None
            if need_rho:
                drho = reparameterize_backward(grad_w, rho, ctx.seed, ctx.offset)
        if grad_kl is not None:
            dm, dr = _kl_grad_terms(mu.to(acc), rho.to(acc), prior_mu, prior_sigma)
            g = grad_kl.to(acc)
            if need_mu:
                dmu = (g * dm).to(mu.dtype) if dmu is None else dmu + (g * dm).to(mu.dtype)
            if need_rho:
                drho = (g * dr).to(rho.dtype) if drho is None else drho + (g * dr).to(rho.dtype)
        return dmu, drho, None, None, None, None, None
    gk = grad_kl.reshape(()).to(acc)
    if grad_w is None:
        dmu, drho = gaussian_kl_backward(gk, mu, rho, prior_mu, prior_sigma, need_mu, need_rho)
    else:
        dmu, drho = reparameterize_kl_backward(grad_w, gk, mu, rho, ctx.seed, ctx.offset, prior_mu,
                                               prior_sigma, need_mu, need_rho)  # fmt: skip
    return dmu if need_mu else None, drho if need_rho else None, None, None, None, None, None


_reparameterize_kl_op.register_autograd(_reparam_kl_backward, setup_context=_reparam_kl_setup)


def reparameterize_kl(
    mu: Tensor,
    rho: Tensor,
    seed: int | None = None,
    offset: int = 0,
    *,
    prior_sigma: float = 1.0,
    prior_mu: float = 0.0,
    check_finite: bool = True,
) -> tuple[Tensor, Tensor]:
    """``(w, kl)``: :func:`reparameterize`'s sample and :func:`gaussian_kl`'s summed KL from one
    pass over ``mu`` and ``rho`` (MATH.md section 6: the KL "in the same pass").

    The backward of both outputs is one pass too: it reads the sample's gradient, ``mu`` and
    ``rho``, regenerates eps and writes ``dmu = g + g_kl (mu - m0) / s0^2`` and
    ``drho = g eps sigmoid(rho) + g_kl dKL/drho``, each rounded once; an output the loss does not
    use costs nothing in the backward (the sample's gradient alone is :func:`reparameterize`'s
    backward). Same seeds and offsets as :func:`reparameterize` (the same ``w``); ``kl`` is fp32
    (fp64 for fp64 input). The Bayesian layers of :mod:`mtbkd.nn` run it inside
    :func:`mtbkd.nn.record_kl`.
    """
    from mtbkd import validate

    _check_mu_rho(mu, rho)
    prior_sigma = validate.check_prior_sigma(_plain_number(prior_sigma))
    prior_mu = validate.check_real(_plain_number(prior_mu), "prior_mu")
    if seed is None:
        seed = new_seed()
    seed, offset = _check_seed(seed, offset)
    if torch._C._are_functorch_transforms_active():  # (as in reparameterize)
        return (_ref_reparameterize(mu, rho, seed, offset, False),
                _ref_gaussian_kl(mu, rho, prior_mu, prior_sigma))  # fmt: skip
    w, kl = _reparameterize_kl_op(mu.contiguous(), rho.contiguous(), seed, offset, prior_mu,
                                  prior_sigma, check_finite)  # fmt: skip
    if check_finite and validate.has_values(kl) and not bool(torch.isfinite(kl.detach())):
        _check_finite(mu, "mu")  # (finite inputs whose KL overflows pass: kl says so itself)
        _check_finite(rho, "rho")
    return w, kl


@register_impl("reparameterize_kl", "reference")
def _ref_reparameterize_kl(mu, rho, seed, offset, prior_mu, prior_sigma, check_finite):
    w = _ref_reparameterize(mu, rho, seed, offset, check_finite)
    return w, _ref_gaussian_kl(mu, rho, prior_mu, prior_sigma)


@register_impl("reparameterize_kl_backward", "reference")
def _ref_reparameterize_kl_backward(grad, grad_kl, mu, rho, seed, offset, prior_mu, prior_sigma,
                                    mu_grad, rho_grad):  # fmt: skip
    acc = _acc(mu.dtype)
    dm, dr = _kl_grad_terms(mu.to(acc), rho.to(acc), prior_mu, prior_sigma)
    g, gk = grad.to(acc), grad_kl.reshape(()).to(acc)
    eps = _reference_normal(seed, offset, mu.numel()).to(device=mu.device, dtype=acc)
    dmu = (g + gk * dm).to(mu.dtype) if mu_grad else mu.new_empty((0,))
    drho = (g * eps.view(mu.shape) * torch.sigmoid(rho.to(acc)) + gk * dr).to(rho.dtype)
    return dmu, drho if rho_grad else rho.new_empty((0,))


@register_impl("reparameterize_kl", "cpu")
def _cpu_reparameterize_kl(mu, rho, seed, offset, prior_mu, prior_sigma, check_finite):
    return torch.ops.mtbkd_C.reparameterize_kl_fwd(mu, rho, seed, offset, prior_mu, prior_sigma,
                                                   check_finite)  # fmt: skip


@register_impl("reparameterize_kl_backward", "cpu")
def _cpu_reparameterize_kl_backward(grad, grad_kl, mu, rho, seed, offset, prior_mu, prior_sigma,
                                    mu_grad, rho_grad):  # fmt: skip
    return torch.ops.mtbkd_C.reparameterize_kl_bwd(grad, grad_kl, mu, rho, seed, offset, prior_mu,
                                                   prior_sigma, mu_grad, rho_grad)  # fmt: skip


@register_impl("reparameterize_kl", "cuda")
def _cuda_reparameterize_kl(mu, rho, seed, offset, prior_mu, prior_sigma, check_finite):
    if check_finite:
        _check_finite(mu, "mu")
        _check_finite(rho, "rho")
    return torch.ops.mtbkd_C.reparameterize_kl_fwd(mu, rho, seed, offset, prior_mu, prior_sigma,
                                                   False)  # fmt: skip


register_impl("reparameterize_kl_backward", "cuda", _cpu_reparameterize_kl_backward)


# ----------------------------------------------------------------------------------------------
# mtbkd::sgld_step_ (MATH.md section 7)
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("mtbkd::sgld_step_", mutates_args=("params", "square_avgs"))
def _sgld_step_op(
    params: list[Tensor],
    grads: list[Tensor],
    square_avgs: list[Tensor],
    lr: float,
    num_data: float,
    temperature: float,
    weight_decay: float,
    seed: int,
    precondition: bool,
    alpha: float,
    eps: float,
) -> None:
    """In-place (p)SGLD step; parameter ``j`` draws its noise from Philox stream ``j``."""
    # every tensor and number checked before any parameter is stepped
    _check_sgld_tensors(params, grads, square_avgs, precondition)
    _check_sgld_hyperparameters(lr, num_data, temperature, weight_decay, precondition, alpha, eps)
    if not params:
        return
    _impl("sgld_step_", params[0])(
        params, grads, square_avgs, lr, num_data, temperature, weight_decay, seed, precondition,
        alpha, eps,
    )  # fmt: skip


@_sgld_step_op.register_fake
def _(params, grads, square_avgs, *args):
    return None


def sgld_step_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    square_avgs: Sequence[Tensor] | None,
    *,
    lr: float,
    num_data: float,
    temperature: float = 1.0,
    weight_decay: float = 0.0,
    seed: int | None = None,
    precondition: bool = False,
    alpha: float = 0.99,
    eps: float = 1e-5,
) -> None:
    """``theta <- theta - lr * G * grad_U + sqrt(2 lr T G) xi`` for every parameter, in place.

    ``grad_U = num_data * grad + weight_decay * theta`` (MATH.md section 7; ``grad`` is the
    gradient of the *mean* minibatch loss, ``weight_decay`` the precision of a Gaussian prior).
    ``G = 1`` for SGLD; with ``precondition`` (pSGLD, Li et al. 2016)
    ``V <- alpha V + (1 - alpha) (grad_U / num_data)^2`` and ``G = 1 / (eps + sqrt(V))``.

    The hyperparameters are checked as :class:`mtbkd.optim.SGLD` checks them (``ValueError`` /
    ``TypeError`` naming the argument; ``lr`` may be 0); the tensors on every backend as the C++
    op checks them (``RuntimeError``): ``params[j]`` and ``grads[j]`` contiguous, of one shape,
    dtype and device, all parameters on one device, and with ``precondition`` one contiguous
    ``square_avgs[j]`` per parameter, of its size, in float32 (float64 for a float64 parameter).
    Nothing is stepped unless everything passes.
    """
    h = _check_sgld_hyperparameters(lr, num_data, temperature, weight_decay, precondition, alpha,
                                    eps)  # fmt: skip
    params, grads = list(params), list(grads)
    square_avgs = list(square_avgs) if square_avgs is not None else []
    if not params and not grads:
        return
    if seed is None:
        seed = new_seed()
    seed, _ = _check_seed(seed, 0)
    _sgld_step_op(
        params, grads, square_avgs, float(h["lr"]), float(h["num_data"]),
        float(h["temperature"]), float(h["weight_decay"]), seed, h["precondition"],
        float(h["alpha"]), float(h["eps"]),
    )  # fmt: skip


def _sgld_reference_update(th, g, sq, xi, lr, num_data, temperature, weight_decay, precondition,
                           alpha, eps):  # fmt: skip
    acc = _acc(th.dtype)
    t = th.to(acc)
    gu = num_data * g.to(acc) + weight_decay * t
    noise = math.sqrt(2.0 * lr * temperature) * xi.to(acc).view(th.shape)
    if precondition:
        v = alpha * sq.view(th.shape) + (1 - alpha) * (gu / num_data) ** 2
        sq.copy_(v.reshape(sq.shape))
        g_pre = 1.0 / (eps + v.sqrt())
        th.copy_((t - lr * g_pre * gu + g_pre.sqrt() * noise).to(th.dtype))
    else:
        th.copy_((t - lr * gu + noise).to(th.dtype))


@register_impl("sgld_step_", "reference")
def _ref_sgld_step(params, grads, square_avgs, lr, num_data, temperature, weight_decay, seed,
                   precondition, alpha, eps):  # fmt: skip
    for j, (th, g) in enumerate(zip(params, grads)):
        xi = _reference_normal(seed, 0, th.numel(), stream=j).to(th.device)
        sq = square_avgs[j] if precondition else None
        _sgld_reference_update(th, g, sq, xi, lr, num_data, temperature, weight_decay,
                               precondition, alpha, eps)  # fmt: skip


@register_impl("sgld_step_", "cpu")
def _cpu_sgld_step(params, grads, square_avgs, *args):
    torch.ops.mtbkd_C.sgld_step_(params, grads, square_avgs, *args)


register_impl("sgld_step_", "cuda", _cpu_sgld_step)
