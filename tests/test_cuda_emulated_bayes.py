"""The CUDA kernels of the Bayesian student run on the CPU: ``csrc/cuda/bayes_kernels.cu``
(with ``bayes_kernels.cuh`` and ``csrc/philox.h``, unchanged) compiled by g++ in the host
emulation of ``tests/test_cuda_emulated.py`` (``tests/cuda_emu/``: the same generator, ``emu.h``
and shims, built by ``tests/cuda_emu/build.py`` into a library of its own).

``tests/cuda_emu/harness_bayes.cpp`` fills the params structs as the CUDA wrappers of
``csrc/bayes_ops.cpp`` do, and the outputs are compared with the C++ CPU kernels
(``torch.ops.mtbkd_C``) and, in float64, with the reference backend of ``mtbkd/bayes_ops.py``:

* the Philox normals (element ``i``: normal ``i % 4`` of counter ``offset + i // 4``) at seeds
  and offsets using both 32-bit words, across the 2**32 carry, 2**63 and the 2**64 wraparound;
* ``reparameterize`` and its backward, ``gaussian_kl`` and its backward, ``reparameterize_kl``
  and its backward, in every dtype, at sizes that are not multiples of 4 and of several blocks;
* the fused (p)SGLD step of several parameters of odd sizes (one Philox stream each), with and
  without preconditioning, weight decay and temperature, more tensors than one launch takes;
* NaN and inf inputs (the CUDA ops leave the finiteness check to the Python op layer; the kernels
  must give what the CPU kernels give without it).

``__CUDA_ARCH__`` is defined for this library, so ``philox.h`` takes its device branch
(``sincosf``). Limits as for the loss kernels: libm's ``logf`` / ``sincosf`` / ``expf`` /
``log1pf`` stand in for CUDA's (an ulp or two apart), g++ contracts no FMAs where nvcc does, so
float32 results are compared to a few ulps (the normals to the 2e-6 that
``tests/test_bayes_ops.py`` allows between the CPU backend and the reference); a fiber runs alone
between barriers (``atomicAdd`` is a plain add), so races go untested.
"""

from __future__ import annotations

import ctypes
import math
from pathlib import Path

import pytest
import torch
from cuda_emu.build import EMU, GeneratorError, build_library, generate

from mtbkd import bayes_ops as B
from mtbkd import ops

SOURCES = ("bayes_kernels.cu",)
DEFINES = ("__CUDA_ARCH__=900",)  # csrc/philox.h's device branch

pytestmark = [
    pytest.mark.skipif(
        ops.backend_status()["cpu"] is not None,
        reason=f"C++ extension not built: {ops.backend_status()['cpu']}",
    ),
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
]

try:  # at collection; an error fails the tests below rather than the whole session
    GENERATED: dict[str, str] = generate(SOURCES)
    GENERATOR_ERROR: Exception | None = None
except (GeneratorError, OSError) as exc:
    GENERATED, GENERATOR_ERROR = {}, exc


def test_the_generator_rewrites_every_launch_and_shared_array():
    if GENERATOR_ERROR is not None:
        raise GENERATOR_ERROR
    text = GENERATED["bayes_kernels.cu"]
    assert text.count("emu_launch(") == 6 and "static double partial" in text


# ---- ctypes wrappers (the CUDA torch wrappers' conventions) ------------------------------------

_DTYPE = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}
_ARG = {"I": ctypes.c_int, "L": ctypes.c_int64, "D": ctypes.c_double, "P": ctypes.c_void_p}
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _ptr(t):
    return None if t is None else t.data_ptr()


def _nan_like(t):
    return torch.full_like(t, float("nan"))


class Emulated:
    """The CUDA ops with the signatures of ``torch.ops.mtbkd_C`` (csrc/bayes_ops.cpp)."""

    def __init__(self, path: Path):
        self.lib = lib = ctypes.CDLL(str(path))
        signatures = {  # I int, L int64, D double, P pointer (harness_bayes.cpp)
            "emu_reparameterize": "IILPPPLL",
            "emu_gaussian_kl": "ILPPDDP",
            "emu_gaussian_kl_bwd": "ILPPPPPDD",
            "emu_reparameterize_kl_fwd": "ILPPPPLLDD",
            "emu_reparameterize_kl_bwd": "ILPPPPPPLLDD",
            "emu_sgld_step": "IIPPPPDDDDLIDD",
        }
        for name, sig in signatures.items():
            getattr(lib, name).argtypes = [_ARG[c] for c in sig]

    def _check(self, rc, name):
        assert rc == 0, f"{name} returned cudaError {rc}"

    def reparameterize_fwd(self, mu, rho, seed, offset, check_finite=False):
        # check_finite is the Python op's on CUDA tensors (the wrapper ignores it)
        w = _nan_like(mu)
        rc = self.lib.emu_reparameterize(_DTYPE[mu.dtype], 0, mu.numel(), _ptr(mu), _ptr(rho),
                                         _ptr(w), seed, offset)  # fmt: skip
        self._check(rc, "launch_reparameterize")
        return w

    def reparameterize_bwd(self, grad, rho, seed, offset):
        drho = _nan_like(rho)
        rc = self.lib.emu_reparameterize(_DTYPE[rho.dtype], 1, rho.numel(), _ptr(grad),
                                         _ptr(rho), _ptr(drho), seed, offset)  # fmt: skip
        self._check(rc, "launch_reparameterize")
        return drho

    def gaussian_kl(self, mu, rho, prior_mu, prior_sigma):
        total = torch.zeros((), dtype=torch.float64)
        rc = self.lib.emu_gaussian_kl(_DTYPE[mu.dtype], mu.numel(), _ptr(mu), _ptr(rho),
                                      prior_mu, prior_sigma, _ptr(total))  # fmt: skip
        self._check(rc, "launch_gaussian_kl")
        return total.to(_acc(mu.dtype))

    def gaussian_kl_bwd(self, grad, mu, rho, prior_mu, prior_sigma, mu_grad, rho_grad):
        dmu = _nan_like(mu) if mu_grad else mu.new_empty((0,))
        drho = _nan_like(rho) if rho_grad else rho.new_empty((0,))
        g = grad.reshape(()).to(torch.float64)
        rc = self.lib.emu_gaussian_kl_bwd(
            _DTYPE[mu.dtype], mu.numel(), _ptr(g), _ptr(mu), _ptr(rho),
            _ptr(dmu) if mu_grad else None, _ptr(drho) if rho_grad else None, prior_mu,
            prior_sigma,
        )  # fmt: skip
        self._check(rc, "launch_gaussian_kl")
        return dmu, drho

    def reparameterize_kl_fwd(self, mu, rho, seed, offset, prior_mu, prior_sigma,
                              check_finite=False):  # fmt: skip
        w = _nan_like(mu)
        total = torch.zeros((), dtype=torch.float64)
        rc = self.lib.emu_reparameterize_kl_fwd(_DTYPE[mu.dtype], mu.numel(), _ptr(mu), _ptr(rho),
                                                _ptr(w), _ptr(total), seed, offset, prior_mu,
                                                prior_sigma)  # fmt: skip
        self._check(rc, "launch_reparameterize_kl")
        return w, total.to(_acc(mu.dtype))

    def reparameterize_kl_bwd(self, grad, grad_kl, mu, rho, seed, offset, prior_mu, prior_sigma,
                              mu_grad, rho_grad):  # fmt: skip
        dmu = _nan_like(mu) if mu_grad else mu.new_empty((0,))
        drho = _nan_like(rho) if rho_grad else rho.new_empty((0,))
        gk = grad_kl.reshape(()).to(torch.float64)
        rc = self.lib.emu_reparameterize_kl_bwd(
            _DTYPE[mu.dtype], mu.numel(), _ptr(grad), _ptr(gk), _ptr(mu), _ptr(rho),
            _ptr(dmu) if mu_grad else None, _ptr(drho) if rho_grad else None, seed, offset,
            prior_mu, prior_sigma,
        )  # fmt: skip
        self._check(rc, "launch_reparameterize_kl")
        return dmu, drho

    def sgld_step_(self, params, grads, square_avgs, lr, num_data, temperature, weight_decay,
                   seed, precondition, alpha, eps):  # fmt: skip
        k = len(params)
        if k == 0:
            return
        assert all(p.dtype == params[0].dtype for p in params)
        arr = ctypes.c_void_p * k
        sq = arr(*[_ptr(s) for s in square_avgs]) if precondition else arr()
        numel = (ctypes.c_int64 * k)(*[p.numel() for p in params])
        rc = self.lib.emu_sgld_step(
            _DTYPE[params[0].dtype], k, arr(*[_ptr(p) for p in params]),
            arr(*[_ptr(g) for g in grads]), sq, numel, lr, num_data, temperature, weight_decay,
            seed, int(precondition), alpha, eps,
        )  # fmt: skip
        self._check(rc, "launch_sgld")


@pytest.fixture(scope="module")
def emu(tmp_path_factory) -> Emulated:
    if GENERATOR_ERROR is not None:
        raise GENERATOR_ERROR
    tmp = tmp_path_factory.mktemp("cuda-emu-bayes")
    return Emulated(build_library(tmp, GENERATED, EMU / "harness_bayes.cpp", DEFINES))


C = torch.ops.mtbkd_C
REF = ops._IMPLS

# ---- comparisons ---------------------------------------------------------------------------------

NORMAL_TOL = 2e-6  # tests/test_bayes_ops.py: the CPU generator against the reference stream


def _tol(dtype):
    """(rtol, atol relative to the output's scale) between the emulated CUDA and the CPU kernels:
    the float32 normals of both differ by NORMAL_TOL (libm against SLEEF), float64 outputs take
    them as they are; a bfloat16/float16 output may round the other way (one step of its type)."""
    if dtype in (torch.bfloat16, torch.float16):
        eps = torch.finfo(dtype).eps
        return eps, eps
    return NORMAL_TOL, NORMAL_TOL


def _close(got, want, what, rtol, atol_rel, equal_nan=True):
    assert got.dtype == want.dtype and got.shape == want.shape, (
        f"{what}: {got.dtype}{list(got.shape)} against {want.dtype}{list(want.shape)}"
    )
    if got.numel() == 0:
        return
    scale = max(want.double().nan_to_num(0, 0, 0).abs().max().item(), 1.0)
    torch.testing.assert_close(got.double(), want.double(), rtol=rtol, atol=atol_rel * scale,
                               equal_nan=equal_nan, msg=lambda m: f"{what}: {m}")  # fmt: skip


def _same(got, want, dtype, what):
    _close(got, want, what, *_tol(dtype))


def _mu_rho(n, dtype, seed, rho_lo=-25.0, rho_hi=25.0):
    """mu ~ 2 N(0, 1); rho over [rho_lo, rho_hi] (both softplus branches and the tiny-rho
    series below -20), in dtype."""
    g = torch.Generator().manual_seed(seed)
    mu = (torch.randn(n, generator=g, dtype=torch.float64) * 2).to(dtype)
    rho = (torch.rand(n, generator=g, dtype=torch.float64) * (rho_hi - rho_lo) + rho_lo).to(dtype)
    if n >= 4:
        rho[:4] = torch.tensor([-3.0, 0.0, 20.5, -21.0], dtype=torch.float64).to(dtype)
    return mu, rho


def _half_ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Half the spacing of dtype at |x| (float64 values), the normal range's."""
    fi = torch.finfo(dtype)
    e = torch.floor(torch.log2(x.abs().clamp_min(fi.tiny)))
    return torch.exp2(e) * (fi.eps / 2)


# ---- the Philox normals --------------------------------------------------------------------------

# (seed, offset, n): offsets as the ops' int64 (-k is 2**64 - k as the kernels' uint64 counter)
NORMAL_CASES = [
    (0, 0, 1),
    (7, 5, 1027),  # 257 counters: two blocks
    (2**40 + 3, 2**32 - 7, 203),  # both key words; the counter's low word carries into the high
    (2**63 - 1, 2**63 - 3, 9),  # the largest seed; counters across 2**63
    (123, -3, 22),  # counters 2**64 - 3 .. 2**64 + 2: the uint64 counter wraps to 0
    (2024, 5926000, 40),  # counter 5926005 draws u = 6.2e-8 < 1e-7: the clamp of Box-Muller
]


def _emulated_normals(emu, seed, offset, n):
    """The kernel's eps: reparameterize's backward with grad 1 and sigmoid(rho) = 1 exactly."""
    grad = torch.ones(n, dtype=torch.float64)
    rho = torch.full((n,), 50.0, dtype=torch.float64)
    return emu.reparameterize_bwd(grad, rho, seed, offset)


@pytest.mark.parametrize(("seed", "offset", "n"), NORMAL_CASES, ids=str)
def test_normals_are_the_cpu_generators_and_the_reference_stream(emu, seed, offset, n):
    eps = _emulated_normals(emu, seed, offset, n)
    assert eps.isfinite().all()
    assert torch.equal(eps, eps.float().double())  # float32 normals
    cpu = C.philox_normal(seed, offset, 0, n).double()
    ref = B._reference_normal(seed, offset, n).double()
    what = f"normals seed={seed} offset={offset}"
    torch.testing.assert_close(eps, cpu, rtol=NORMAL_TOL, atol=NORMAL_TOL, msg=lambda m: m + what)
    torch.testing.assert_close(eps, ref, rtol=NORMAL_TOL, atol=NORMAL_TOL, msg=lambda m: m + what)
    # the layout: shifting the offset by one counter shifts the stream by four elements
    if n > 8:
        torch.testing.assert_close(_emulated_normals(emu, seed, offset + 1, n - 4), eps[4:],
                                   rtol=0, atol=0)  # fmt: skip


def test_the_box_muller_clamp(emu):
    seed, offset = 2024, 5926000
    x = B._philox_uint32(seed, torch.tensor([offset + 5]), 0)
    u_radius, u_angle = B._uniform(x[2]).item(), B._uniform(x[3]).item()
    assert u_radius < 1e-7
    r, th = math.sqrt(-2 * math.log(1e-7)), 2 * math.pi * u_angle
    want = torch.tensor([r * math.cos(th), r * math.sin(th)], dtype=torch.float64)
    got = _emulated_normals(emu, seed, offset, 24)[22:24]
    torch.testing.assert_close(got, want, rtol=NORMAL_TOL, atol=NORMAL_TOL)


# ---- reparameterize ------------------------------------------------------------------------------

OFFSETS = [0, 2**32 - 3, 2**63 - 2, -2]
SIZES = [1, 6, 1029]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reparameterize_matches_the_cpu_kernels(emu, dtype):
    for n in SIZES:
        mu, rho = _mu_rho(n, dtype, seed=n)
        grad = (torch.randn(n, generator=torch.Generator().manual_seed(n + 1)) * 3).to(dtype)
        for offset in OFFSETS:
            seed = 2**40 + n
            what = f"reparameterize {dtype} n={n} offset={offset}"
            w = emu.reparameterize_fwd(mu, rho, seed, offset)
            _same(w, C.reparameterize_fwd(mu, rho, seed, offset, False), dtype, what)
            drho = emu.reparameterize_bwd(grad, rho, seed, offset)
            _same(drho, C.reparameterize_bwd(grad, rho, seed, offset), dtype, what + " bwd")
            # the kernel's arithmetic on its own normals: float64 exactly the formula, the others
            # rounded once from it (within half an ulp of the output type, float32 slack)
            eps = _emulated_normals(emu, seed, offset, n)
            m, r, g = mu.double(), rho.double(), grad.double()
            s, sig = torch.nn.functional.softplus(r), torch.sigmoid(r)
            cases = (("w", w, m + s * eps, m.abs() + (s * eps).abs()),
                     ("drho", drho, g * eps * sig, (g * eps * sig).abs()))  # fmt: skip
            for name, got, true, size in cases:
                err = (got.double() - true).abs()
                if dtype == torch.float64:
                    bound = 1e-14 * size
                elif dtype == torch.float32:
                    bound = 4e-7 * size
                else:
                    bound = _half_ulp(true, dtype) + 4e-7 * size
                assert (err <= bound).all(), (
                    f"{what} {name}: |err| / bound up to {(err / bound).max().item():.3g} at "
                    f"{(err > bound).nonzero().flatten().tolist()[:8]}"
                )
            if dtype == torch.float64:
                ref = REF["reparameterize"]["reference"](mu, rho, seed, offset, False)
                _same(w, ref, dtype, what + " vs reference")


# ---- gaussian_kl ---------------------------------------------------------------------------------

PRIORS = [(0.0, 1.0), (0.3, 0.05), (-1.0, 3.0)]


def _kl_rtol(dtype):
    # float32 terms: the CPU kernels sum them in float within tiles of 1024, CUDA in double
    return 1e-12 if dtype == torch.float64 else 2e-6


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gaussian_kl_and_its_gradient_match_the_cpu_kernels(emu, dtype):
    for n in (1, 7, 3001):
        mu, rho = _mu_rho(n, dtype, seed=3 * n)
        if n > 10:
            rho[5:8] = torch.tensor([-110.0, -90.0, -30.0]).to(dtype)  # s denormal or 0 in float
        for m0, s0 in PRIORS:
            what = f"gaussian_kl {dtype} n={n} prior=({m0}, {s0})"
            kl = emu.gaussian_kl(mu, rho, m0, s0)
            want = C.gaussian_kl(mu, rho, m0, s0)
            assert kl.dtype == want.dtype and kl.shape == want.shape == ()
            torch.testing.assert_close(kl, want, rtol=_kl_rtol(dtype), atol=0,
                                       msg=lambda m, w=what: f"{w}: {m}")  # fmt: skip
            if dtype == torch.float64:
                ref = REF["gaussian_kl"]["reference"](mu, rho, m0, s0)
                torch.testing.assert_close(kl, ref, rtol=1e-12, atol=0)
            for grad in (torch.tensor(0.7, dtype=torch.float64), torch.tensor([-2.5])):
                for mu_grad, rho_grad in ((True, True), (True, False), (False, True)):
                    args = (grad, mu, rho, m0, s0, mu_grad, rho_grad)
                    got, want = emu.gaussian_kl_bwd(*args), C.gaussian_kl_bwd(*args)
                    for name, a, b in zip(("dmu", "drho"), got, want):
                        _same(a, b, dtype, f"{what} {name} grad={grad.item()}")
                    if dtype == torch.float64:
                        ref = REF["gaussian_kl_backward"]["reference"](*args)
                        for name, a, b in zip(("dmu", "drho"), got, ref):
                            _close(a, b, f"{what} {name} vs reference", 1e-12, 1e-14)
        dmu, drho = emu.gaussian_kl_bwd(torch.tensor(1.0), mu, rho, 0.0, 1.0, False, False)
        assert dmu.numel() == 0 and drho.numel() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("sigma", [1e-18, 1e155])
def test_kl_at_the_prior_sigma_extremes(emu, dtype, sigma):
    # tests/test_bayes_ops.py's audit case: s0 = 1e-18 (1 / s0^2 = 1e36, the float32 limit the
    # ops accept) and softplus(rho) = 20, where s^2 / s0^2 would overflow float32; s0 = 1e155,
    # where s0^2 is inf in float64 and 1 / s0^2 is 0
    mu = torch.linspace(-1.0, 1.0, 21, dtype=dtype)
    rho = torch.full((21,), 20.0, dtype=dtype)
    rho[::5] = torch.tensor([-50.0, -45.0, 3.0, 20.5, -0.5], dtype=dtype)
    what = f"{dtype} prior_sigma={sigma}"
    kl = emu.gaussian_kl(mu, rho, 0.0, sigma)
    _assert_nan_pattern(kl, C.gaussian_kl(mu, rho, 0.0, sigma), f"gaussian_kl {what}")
    torch.testing.assert_close(kl, C.gaussian_kl(mu, rho, 0.0, sigma), rtol=_kl_rtol(dtype), atol=0)
    g = torch.tensor(1.0, dtype=torch.float64)
    for name, got, want in (
        ("gaussian_kl_bwd", emu.gaussian_kl_bwd(g, mu, rho, 0.0, sigma, True, True),
         C.gaussian_kl_bwd(g, mu, rho, 0.0, sigma, True, True)),
        ("reparameterize_kl_bwd",
         emu.reparameterize_kl_bwd(mu, g, mu, rho, 3, 0, 0.0, sigma, True, True),
         C.reparameterize_kl_bwd(mu, g, mu, rho, 3, 0, 0.0, sigma, True, True)),
    ):  # fmt: skip
        for part, a, b in zip(("dmu", "drho"), got, want):
            assert a.isfinite().all(), f"{name} {part} {what}: {a}"
            _same(a, b, dtype, f"{name} {part} {what}")
    ref = REF["gaussian_kl_backward"]["reference"](g, mu.double(), rho.double(), 0.0, sigma, True,
                                                   True)  # fmt: skip
    got = emu.gaussian_kl_bwd(g, mu, rho, 0.0, sigma, True, True)
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    for part, a, b in zip(("dmu", "drho"), got, ref):
        torch.testing.assert_close(a.double(), b, rtol=rtol, atol=1e-30,
                                   msg=lambda m, p=part: f"{p} {what}: {m}")  # fmt: skip


# ---- reparameterize_kl ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reparameterize_kl_matches_the_cpu_kernels_and_the_two_ops(emu, dtype):
    for n in (5, 1030):
        mu, rho = _mu_rho(n, dtype, seed=5 * n)
        grad = (torch.randn(n, generator=torch.Generator().manual_seed(n)) * 3).to(dtype)
        for (m0, s0), offset in zip(PRIORS, [3, 2**32 - 1, -1]):
            seed = 99 + n
            what = f"reparameterize_kl {dtype} n={n} offset={offset} prior=({m0}, {s0})"
            w, kl = emu.reparameterize_kl_fwd(mu, rho, seed, offset, m0, s0)
            # the sample of reparameterize, bit for bit; the KL of gaussian_kl
            assert torch.equal(w, emu.reparameterize_fwd(mu, rho, seed, offset)), what
            torch.testing.assert_close(kl, emu.gaussian_kl(mu, rho, m0, s0), rtol=1e-12, atol=0)
            w_cpu, kl_cpu = C.reparameterize_kl_fwd(mu, rho, seed, offset, m0, s0, False)
            _same(w, w_cpu, dtype, what + " w")
            assert kl.dtype == kl_cpu.dtype
            torch.testing.assert_close(kl, kl_cpu, rtol=_kl_rtol(dtype), atol=0)
            for gk in (torch.tensor(0.25, dtype=torch.float64), torch.tensor([1.5])):
                for mu_grad, rho_grad in ((True, True), (True, False), (False, True)):
                    args = (grad, gk, mu, rho, seed, offset, m0, s0, mu_grad, rho_grad)
                    got, want = emu.reparameterize_kl_bwd(*args), C.reparameterize_kl_bwd(*args)
                    for name, a, b in zip(("dmu", "drho"), got, want):
                        _same(a, b, dtype, f"{what} {name} grad_kl={gk.item()}")
                    if dtype == torch.float64:
                        ref = REF["reparameterize_kl_backward"]["reference"](*args)
                        for name, a, b in zip(("dmu", "drho"), got, ref):
                            _same(a, b, dtype, f"{what} {name} vs reference")
            # the backward of both outputs is the sum of the two ops' backwards
            g1 = torch.tensor(1.0)
            dmu, drho = emu.reparameterize_kl_bwd(grad, g1, mu, rho, seed, offset, m0, s0, True,
                                                  True)  # fmt: skip
            kdmu, kdrho = emu.gaussian_kl_bwd(g1, mu, rho, m0, s0, True, True)
            acc = _acc(dtype)
            sep_rho = emu.reparameterize_bwd(grad, rho, seed, offset).to(acc) + kdrho.to(acc)
            _same(dmu, (grad.to(acc) + kdmu.to(acc)).to(dtype), dtype, what + " dmu vs ops")
            _same(drho, sep_rho.to(dtype), dtype, what + " drho vs ops")


# ---- the (p)SGLD step ----------------------------------------------------------------------------

SGLD_SHAPES = [(1,), (5,), (13, 7), (0,), (1030,), (3,)]
SGLD_HYPER = [  # lr, num_data, temperature, weight_decay, alpha, eps
    (0.01, 50.0, 0.7, 0.1, 0.9, 1e-5),
    (1e-3, 20.0, 0.0, 0.0, 0.99, 1e-8),  # no noise, no weight decay: deterministic
    (0.05, 1.0, 2.0, 0.3, 0.5, 1e-3),
]


def _sgld_inputs(shapes, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]
    grads = [(torch.randn(s, generator=g, dtype=torch.float64) * 0.1).to(dtype) for s in shapes]
    sq = [torch.rand(s, generator=g, dtype=torch.float64).to(_acc(dtype)) * 0.01 for s in shapes]
    return params, grads, sq


def _run_sgld(step, params, grads, sq, precondition, hyper, seed):
    lr, nd, temp, wd, alpha, eps = hyper
    p = [t.clone() for t in params]
    s = [t.clone() for t in sq]
    step(p, grads, s if precondition else [], lr, nd, temp, wd, seed, precondition, alpha, eps)
    return p, s


@pytest.mark.parametrize("precondition", [False, True], ids=["sgld", "psgld"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sgld_step_matches_the_cpu_kernels(emu, dtype, precondition):
    params, grads, sq = _sgld_inputs(SGLD_SHAPES, dtype, seed=11)
    for hyper, seed in zip(SGLD_HYPER, [77, 2**40 + 5, 2**63 - 1]):
        what = f"sgld {dtype} precondition={precondition} hyper={hyper} seed={seed}"
        p_emu, s_emu = _run_sgld(emu.sgld_step_, params, grads, sq, precondition, hyper, seed)
        p_cpu, s_cpu = _run_sgld(C.sgld_step_, params, grads, sq, precondition, hyper, seed)
        for j, (a, b) in enumerate(zip(p_emu, p_cpu)):
            _same(a, b, dtype, f"{what} params[{j}] {list(a.shape)}")
        for j, (a, b) in enumerate(zip(s_emu, s_cpu)):
            if precondition:  # no noise in it: the same float arithmetic up to FMA contraction
                _close(a, b, f"{what} square_avgs[{j}]", 1e-14 if a.dtype == torch.float64
                       else 4e-7, 0)  # fmt: skip
            else:
                assert torch.equal(a, sq[j]), f"{what}: square_avgs[{j}] written"
        if dtype == torch.float64:
            p_ref, s_ref = _run_sgld(REF["sgld_step_"]["reference"], params, grads, sq,
                                     precondition, hyper, seed)  # fmt: skip
            for j, (a, b) in enumerate(zip(p_emu, p_ref)):
                _same(a, b, dtype, f"{what} params[{j}] vs reference")
            for j, (a, b) in enumerate(zip(s_emu, s_ref)):
                _close(a, b, f"{what} square_avgs[{j}] vs reference", 1e-14, 0)


@pytest.mark.parametrize("precondition", [False, True], ids=["sgld", "psgld"])
def test_sgld_step_of_more_tensors_than_one_launch_takes(emu, precondition):
    # kSgldTensorsPerLaunch = 24: 30 parameters take two launches; tensor j takes stream j
    shapes = [((7 * j) % 23 + (300 if j == 25 else 0),) for j in range(30)]
    params, grads, sq = _sgld_inputs(shapes, torch.float32, seed=5)
    hyper = SGLD_HYPER[0]
    p_emu, s_emu = _run_sgld(emu.sgld_step_, params, grads, sq, precondition, hyper, 3)
    p_cpu, s_cpu = _run_sgld(C.sgld_step_, params, grads, sq, precondition, hyper, 3)
    for j, (a, b) in enumerate(zip(p_emu, p_cpu)):
        _same(a, b, torch.float32, f"params[{j}] of 30 (precondition={precondition})")
        assert not torch.equal(a, params[j]) or a.numel() == 0, f"params[{j}] not stepped"
    for j, (a, b) in enumerate(zip(s_emu, s_cpu)):
        _close(a, b, f"square_avgs[{j}] of 30", 4e-7, 0)


# ---- non-finite inputs (no check in the CUDA ops: the kernels give what the CPU kernels give) ----


def _assert_nan_pattern(got, want, what):
    """NaN where the CPU kernels have NaN, the same infinities, the rest close."""
    assert torch.equal(got.isnan(), want.isnan()), (
        f"{what}: CUDA NaN at {got.isnan().nonzero().flatten().tolist()}, CPU NaN at"
        f" {want.isnan().nonzero().flatten().tolist()}; CUDA {got} CPU {want}"
    )
    inf = want.isinf()
    assert torch.equal(got.isinf(), inf) and torch.equal(got[inf], want[inf]), (
        f"{what}: CUDA {got} CPU {want}"
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("which", ["mu", "rho"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=str)
def test_non_finite_inputs_give_what_the_cpu_kernels_give(emu, dtype, which, bad):
    n = 11
    mu, rho = _mu_rho(n, dtype, seed=4)
    (mu if which == "mu" else rho)[6] = bad
    grad = torch.linspace(-1, 1, n).to(dtype)
    what = f"{which}[6]={bad} {dtype}"
    for name, got, want in (
        ("reparameterize", emu.reparameterize_fwd(mu, rho, 1, 2),
         C.reparameterize_fwd(mu, rho, 1, 2, False)),
        ("reparameterize_bwd", emu.reparameterize_bwd(grad, rho, 1, 2),
         C.reparameterize_bwd(grad, rho, 1, 2)),
        ("gaussian_kl", emu.gaussian_kl(mu, rho, 0.0, 1.0), C.gaussian_kl(mu, rho, 0.0, 1.0)),
        *zip(("gaussian_kl_bwd dmu", "gaussian_kl_bwd drho"),
             emu.gaussian_kl_bwd(torch.tensor(1.0), mu, rho, 0.0, 1.0, True, True),
             C.gaussian_kl_bwd(torch.tensor(1.0), mu, rho, 0.0, 1.0, True, True)),
        *zip(("reparameterize_kl w", "reparameterize_kl kl"),
             emu.reparameterize_kl_fwd(mu, rho, 1, 2, 0.0, 1.0),
             C.reparameterize_kl_fwd(mu, rho, 1, 2, 0.0, 1.0, False)),
        *zip(("reparameterize_kl_bwd dmu", "reparameterize_kl_bwd drho"),
             emu.reparameterize_kl_bwd(grad, torch.tensor(0.5), mu, rho, 1, 2, 0.0, 1.0, True,
                                       True),
             C.reparameterize_kl_bwd(grad, torch.tensor(0.5), mu, rho, 1, 2, 0.0, 1.0, True,
                                     True)),
    ):  # fmt: skip
        _assert_nan_pattern(got, want, f"{name} {what}")
        fin = want.isfinite()
        _same(got[fin], want[fin], dtype, f"{name} {what}")


@pytest.mark.parametrize("precondition", [False, True], ids=["sgld", "psgld"])
def test_sgld_step_of_non_finite_gradients_gives_what_the_cpu_kernels_give(emu, precondition):
    params, grads, sq = _sgld_inputs([(9,), (6,)], torch.float32, seed=8)
    grads[0][2], grads[0][5], grads[1][1] = float("nan"), float("inf"), -float("inf")
    params[1][4] = float("inf")
    p_emu, s_emu = _run_sgld(emu.sgld_step_, params, grads, sq, precondition, SGLD_HYPER[0], 4)
    p_cpu, s_cpu = _run_sgld(C.sgld_step_, params, grads, sq, precondition, SGLD_HYPER[0], 4)
    for j in range(2):
        _assert_nan_pattern(p_emu[j], p_cpu[j], f"params[{j}] precondition={precondition}")
        _assert_nan_pattern(s_emu[j], s_cpu[j], f"square_avgs[{j}] precondition={precondition}")


def test_empty_tensors_launch_nothing(emu):
    e = torch.empty(0)
    assert emu.reparameterize_fwd(e, e, 1, 2).numel() == 0
    assert emu.gaussian_kl(e, e, 0.0, 1.0).item() == 0.0
    w, kl = emu.reparameterize_kl_fwd(e, e, 1, 2, 0.0, 1.0)
    assert w.numel() == 0 and kl.item() == 0.0
    emu.sgld_step_([e, e], [e, e], [], 0.1, 1.0, 1.0, 0.0, 3, False, 0.9, 1e-8)
