"""The CUDA loss kernels run on the CPU: the real ``csrc/cuda/*.cu`` sources compiled by g++.

No GPU is needed. At collection the CUDA sources of the losses (``loss_kernels.cu``,
``kd_kernels.cu``, ``teacher_kernels.cu``, with ``loss_device.cuh``, ``loss_kernels.cuh`` and
``csrc/common.h`` included unchanged) are turned into host C++ by two textual edits only:

* every ``__shared__`` array becomes a function-``static`` one (one block runs at a time);
* every launch ``kernel<<<grid, block, 0, stream>>>(args);`` becomes
  ``emu_launch(grid, block, [&] { kernel(args); });``.

A missing edit (no launch or no ``__shared__`` array in one of the files, a ``__global__`` kernel
no launch names, dynamic shared memory, anything left of ``<<<`` or ``__shared__``) fails
``test_the_generator_rewrites_every_launch_and_shared_array`` and every other test here, naming
the file: a change in the sources cannot silently drop a kernel. ``tests/cuda_emu/emu.h``
(force-included) emulates the execution model: threadIdx/blockIdx/blockDim/gridDim, the 256
threads of a block as fibers switched at ``__syncthreads``, ``__syncthreads_or`` and the full-warp
``__shfl_xor_sync`` / ``__shfl_down_sync`` (which wait for exactly the threads the hardware waits
for, and abort on a barrier only part of a block reaches); ``tests/cuda_emu/shim/`` stands in for
``cuda_runtime.h``, ``cuda_fp16.h`` and ``cuda_bf16.h``; ``tests/cuda_emu/harness.cpp`` fills the
params structs as the torch wrappers in ``csrc/cuda/loss_ops_cuda.cpp`` do (a copy of their
logic, which the wrappers do not share: a change there must be made here too; the wrappers
themselves are only compiled, by ``tests/test_cuda_glue.py``). The library is built
(``tests/cuda_emu/build.py``, which also holds the generator) once per content hash of all of it
(sources, headers, flags, compiler) under ``build/cuda-emu/<hash>/`` (git-ignored) and shared by
the tests of this module.

The outputs are compared with the C++ CPU kernels (``torch.ops.mtbkd_C``) and, in float64, with
``mtbkd/reference.py``: ordinary inputs of every dtype, weight mode and divergence, and degenerate
rows with ``check_finite=False`` (NaN, +inf, a row of -inf), where the CUDA kernels must give what
the CPU kernels give (``test_degenerate_rows_are_nan_on_every_backend`` in test_functional.py).

Limits: the fast-math intrinsics (``__expf``, ``__logf``) are libm's ``expf`` / ``logf`` here and
g++ contracts no FMAs, so roundings differ from the hardware's by an ulp or two, and what the
hardware's approximations do with NaN/inf/denormal arguments is not reproduced (a NaN or inf the
emulation handles may still go wrong on a GPU). A fiber runs alone between barriers, so the memory
model, data races and missing ``__syncwarp``/``__threadfence`` go untested; so do launch
configuration limits, occupancy and the real headers' conversions (the shims round to nearest
even). ``bayes_kernels.cu`` runs the same way in ``tests/test_cuda_emulated_bayes.py``.
``bench/gpu_check.sh`` on a GPU remains the real test.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest
import torch
from cuda_emu.build import EMU, GeneratorError, build_library, emulation_source, generate

from mtbkd import ops

SOURCES = ("loss_kernels.cu", "kd_kernels.cu", "teacher_kernels.cu")

pytestmark = [
    pytest.mark.skipif(
        ops.backend_status()["cpu"] is not None,
        reason=f"C++ extension not built: {ops.backend_status()['cpu']}",
    ),
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
]

# ---- source generation (tests/cuda_emu/build.py) -------------------------------------------------


def _generate() -> dict[str, str]:
    return generate(SOURCES)


try:  # at collection; an error fails the tests below rather than the whole session
    GENERATED: dict[str, str] = _generate()
    GENERATOR_ERROR: Exception | None = None
except (GeneratorError, OSError) as exc:
    GENERATED, GENERATOR_ERROR = {}, exc


def test_the_generator_rewrites_every_launch_and_shared_array():
    if GENERATOR_ERROR is not None:
        raise GENERATOR_ERROR
    assert set(GENERATED) == set(SOURCES)
    for name, text in GENERATED.items():
        assert "emu_launch(" in text and "static unsigned char smem" in text, name
    with pytest.raises(GeneratorError, match="x.cu: no kernel"):
        emulation_source("x.cu", "__shared__ float a[4];")
    with pytest.raises(GeneratorError, match="x.cu: no __shared__"):
        emulation_source("x.cu", "__global__ void k(int a) {}\nvoid f() { k<<<1, 32, 0, s>>>(1); }")
    with pytest.raises(GeneratorError, match="never launched"):
        emulation_source(
            "x.cu",
            "__global__ void k(int a) { __shared__ int b[1]; }\n__global__ void j() {}\n"
            "void f() { k<<<1, 32>>>(1); }",
        )
    with pytest.raises(GeneratorError, match="only <<<grid"):
        emulation_source(
            "x.cu", "__global__ void k() { __shared__ int b[1]; }\nvoid f() { k<<<1, 32, 64>>>(); }"
        )


# ---- build ---------------------------------------------------------------------------------------


def _build(tmp: Path) -> Path:
    if GENERATOR_ERROR is not None:
        raise GENERATOR_ERROR
    return build_library(tmp, GENERATED, EMU / "harness.cpp")


# ---- ctypes wrappers (the torch wrappers' conventions) ------------------------------------------

_DTYPE = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}
_ARG = {"I": ctypes.c_int, "L": ctypes.c_int64, "D": ctypes.c_double, "P": ctypes.c_void_p}


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _ptr(t):
    return None if t is None else t.data_ptr()


class Emulated:
    """The CUDA ops with the signatures of ``torch.ops.mtbkd_C``; each also returns the status."""

    def __init__(self, path: Path):
        self.lib = lib = ctypes.CDLL(str(path))
        signatures = {  # I int, L int64, D double, P pointer (harness.cpp)
            "emu_mtbkd_loss_fwd": "ILLI" + "P" * 14 + "DDDDIDLI",
            "emu_multi_teacher_kd_fwd": "ILLI" + "P" * 9 + "IDDIDDDDLI",
            "emu_teacher_weights": "ILLIPIDIPPP",
            "emu_teacher_stats": "ILLIPDDDIPP",
            "emu_scale_grad": "IILLPPP",
            "emu_lgamma1p": "ILPP",
        }
        for name, sig in signatures.items():
            getattr(lib, name).argtypes = [_ARG[c] for c in sig]

    @staticmethod
    def _teachers(ts):
        ts = [t.contiguous() for t in ts]
        return ts, (ctypes.c_void_p * len(ts))(*[t.data_ptr() for t in ts])

    @staticmethod
    def _fixed(w, k, n, acc):
        if w is None:
            return None
        return (w[:, None].expand(k, n) if w.dim() == 1 else w).to(acc).contiguous()

    @staticmethod
    def _status(n, labels, check_finite):
        return (
            torch.full((n,), -1, dtype=torch.int32) if labels is not None or check_finite else None
        )

    def mtbkd_loss_fwd(self, student, teachers, labels, fixed_weights, teacher_stats, tau, lam,
                       prior_weight, hard_label_weight, weight_mode, tau_w, ignore_index,
                       check_finite, grad_scale=None):  # fmt: skip
        z = student.contiguous()
        n, v = z.shape
        ts, tp = self._teachers(teachers)
        k, acc = len(ts), _acc(z.dtype)
        outs = [torch.full(s, float("nan"), dtype=acc) for s in [(n,), (k, n), (k, n), (k, n)]]
        loss, w, r, h = outs
        prior, ce = (
            torch.full((n,), float("nan"), dtype=acc),
            torch.full((n,), float("nan"), dtype=acc),
        )
        grad = torch.full_like(z, float("nan"))
        fw = self._fixed(fixed_weights, k, n, acc)
        st = None if teacher_stats is None else teacher_stats.to(acc).contiguous()
        gs = None if grad_scale is None else grad_scale.reshape(1).to(acc).contiguous()
        y = None if labels is None else labels.contiguous()
        status = self._status(n, labels, check_finite)
        rc = self.lib.emu_mtbkd_loss_fwd(
            _DTYPE[z.dtype], n, v, k, _ptr(z), tp, _ptr(y), _ptr(fw), _ptr(st), _ptr(loss),
            _ptr(grad), _ptr(w), _ptr(r), _ptr(h), _ptr(prior), _ptr(ce), _ptr(status), _ptr(gs),
            tau, lam, prior_weight, hard_label_weight, weight_mode, tau_w, ignore_index,
            int(check_finite),
        )  # fmt: skip
        assert rc == 0, f"launch_mtbkd_loss_fwd returned {rc}"
        return (loss, grad, w, r, h, prior, ce), status

    def multi_teacher_kd_fwd(self, student, teachers, labels, fixed_weights, divergence, beta,
                             tau, weight_mode, tau_w, hard_label_weight, soft_label_weight,
                             soft_scale, ignore_index, check_finite, grad_scale=None):  # fmt: skip
        z = student.contiguous()
        n, v = z.shape
        ts, tp = self._teachers(teachers)
        k, acc = len(ts), _acc(z.dtype)
        loss = torch.full((n,), float("nan"), dtype=acc)
        w = torch.full((k, n), float("nan"), dtype=acc)
        grad = torch.full_like(z, float("nan"))
        fw = self._fixed(fixed_weights, k, n, acc)
        gs = None if grad_scale is None else grad_scale.reshape(1).to(acc).contiguous()
        y = None if labels is None else labels.contiguous()
        status = self._status(n, labels, check_finite)
        rc = self.lib.emu_multi_teacher_kd_fwd(
            _DTYPE[z.dtype], n, v, k, _ptr(z), tp, _ptr(y), _ptr(fw), _ptr(loss), _ptr(grad),
            _ptr(w), _ptr(status), _ptr(gs), divergence, beta, tau, weight_mode, tau_w,
            hard_label_weight, soft_label_weight, soft_scale, ignore_index, int(check_finite),
        )  # fmt: skip
        assert rc == 0, f"launch_multi_teacher_kd_fwd returned {rc}"
        return (loss, grad, w), status

    def teacher_weights(self, teachers, weight_mode, tau_w, check_finite):
        ts, tp = self._teachers(teachers)
        (n, v), k, acc = ts[0].shape, len(ts), _acc(ts[0].dtype)
        w, h = (torch.full((k, n), float("nan"), dtype=acc) for _ in range(2))
        status = self._status(n, None, check_finite)
        rc = self.lib.emu_teacher_weights(
            _DTYPE[ts[0].dtype],
            n,
            v,
            k,
            tp,
            weight_mode,
            tau_w,
            int(check_finite),
            _ptr(w),
            _ptr(h),
            _ptr(status),
        )
        assert rc == 0, f"launch_teacher_stats returned {rc}"
        return (w, h), status

    def teacher_stats(self, teachers, tau, lam, tau_w, check_finite):
        ts, tp = self._teachers(teachers)
        (n, v), k, acc = ts[0].shape, len(ts), _acc(ts[0].dtype)
        out = torch.full((k, n, 4), float("nan"), dtype=acc)
        status = self._status(n, None, check_finite)
        rc = self.lib.emu_teacher_stats(_DTYPE[ts[0].dtype], n, v, k, tp, tau, lam, tau_w,
                                        int(check_finite), _ptr(out), _ptr(status))  # fmt: skip
        assert rc == 0, f"launch_teacher_stats returned {rc}"
        return out, status

    def scale_grad(self, grad, rows):
        g = grad.contiguous()
        r = rows.to(_acc(g.dtype)).contiguous()
        out = torch.full_like(g, float("nan"))
        rc = self.lib.emu_scale_grad(_DTYPE[g.dtype], int(r.dtype == torch.float64), *g.shape,
                                     _ptr(g), _ptr(r), _ptr(out))  # fmt: skip
        assert rc == 0
        return out

    def lgamma1p(self, x):
        x = x.contiguous()
        out = torch.full_like(x, float("nan"))
        assert (
            self.lib.emu_lgamma1p(int(x.dtype == torch.float64), x.numel(), _ptr(x), _ptr(out)) == 0
        )
        return out


@pytest.fixture(scope="module")
def emu(tmp_path_factory) -> Emulated:
    return Emulated(_build(tmp_path_factory.mktemp("cuda-emu")))


C = torch.ops.mtbkd_C
REF = ops._IMPLS
MTBKD_OUT = ("loss", "grad", "weights", "resp", "entropy", "prior", "ce")
KD_OUT = ("loss", "grad", "weights")

# ---- comparisons ---------------------------------------------------------------------------------


def _tol(dtype, out_dtype):
    """(rtol, atol relative to the output's scale): float64 tightly; float32 accumulation a few
    ulp of a V-term sum; a bfloat16/float16 output one rounding step of its type on top."""
    if out_dtype == torch.float64:
        return 1e-9, 1e-11
    if out_dtype in (torch.bfloat16, torch.float16):
        eps = torch.finfo(out_dtype).eps
        return eps, 2 * eps
    return 2e-5, 2e-6


def _assert_same(names, got, want, dtype, what):
    for name, a, b in zip(names, got, want, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{what} {name}: {a.dtype}{list(a.shape)}"
        rtol, atol = _tol(dtype, a.dtype)
        scale = max(b.double().nan_to_num(0, 0, 0).abs().max().item(), 1.0) if b.numel() else 1.0
        torch.testing.assert_close(
            a.double(),
            b.double(),
            rtol=rtol,
            atol=atol * scale,
            equal_nan=True,
            msg=lambda m, n=name: f"{what} {n}: {m}",
        )


def _inputs(n, v, k, dtype, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(n, v, generator=g, dtype=torch.float64) * scale).to(dtype)
    ts = [(torch.randn(n, v, generator=g, dtype=torch.float64) * scale + 0.5 * j).to(dtype)
          for j in range(k)]  # fmt: skip
    y = torch.randint(0, v, (n,), generator=g)
    if n > 1:
        y[1] = -100  # a masked row
    fw = torch.rand(k, n, generator=g, dtype=torch.float64) + 0.1
    if k > 1:
        fw[0, 0] = 0.0  # a teacher dropping out of a row's mixture
    return z, ts, y, (fw / fw.sum(0)).to(_acc(dtype))


DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# (K, V) pairs: every K in {1, 2, 3, 8} and every V in {1, 7, 257, 1000}, each at least once
SHAPES = [(1, 257), (2, 7), (3, 1000), (8, 1), (2, 257), (8, 1000)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("k", "v"), SHAPES, ids=lambda x: str(x))
def test_mtbkd_loss_matches_the_cpu_kernels(emu, dtype, k, v):
    n = 3
    z, ts, y, fw = _inputs(n, v, k, dtype, seed=17 * k + v)
    cases = [
        dict(mode=0, tau=2.0, tau_w=1.0, fixed=None, gs=None),
        dict(mode=1, tau=1.5, tau_w=0.7, fixed=None, gs=torch.tensor([0.25])),
        dict(mode=2, tau=0.8, tau_w=1.3, fixed=fw, gs=torch.tensor([3.0])),
    ]
    for c in cases:
        args = (z, ts, y, c["fixed"], None, c["tau"], 5.0, 0.02, 1.0, c["mode"], c["tau_w"],
                -100, True, c["gs"])  # fmt: skip
        got, status = emu.mtbkd_loss_fwd(*args)
        assert status.tolist() == [0] * n
        what = f"mtbkd {dtype} K={k} V={v} mode={c['mode']}"
        _assert_same(MTBKD_OUT, got, C.mtbkd_loss_fwd(*args), dtype, what)
        if dtype == torch.float64:
            ref = REF["mtbkd_loss_fwd"]["reference"](*args)
            _assert_same(MTBKD_OUT, got, ref, dtype, what + " vs reference")
        assert (got[1][1] == 0).all() and (got[0][1] == 0) and (got[2][:, 1] == 0).all()
    # no labels: the prior alone
    args = (z, ts, None, None, None, 2.0, 5.0, 0.5, 1.0, 0, 1.0, -100, False, None)
    got, status = emu.mtbkd_loss_fwd(*args)
    assert status is None
    _assert_same(MTBKD_OUT, got, C.mtbkd_loss_fwd(*args), dtype, f"mtbkd {dtype} K={k} no labels")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_mtbkd_loss_with_cached_teacher_stats_matches(emu, dtype):
    z, ts, y, _ = _inputs(3, 257, 3, dtype, seed=5)
    stats_args = (ts, 1.5, 5.0, 0.7, True)
    stats, status = emu.teacher_stats(*stats_args)
    assert status.tolist() == [0, 0, 0]
    _assert_same(["teacher_stats"], [stats], [C.teacher_stats(*stats_args)], dtype, "stats")
    if dtype == torch.float64:
        ref = REF["teacher_stats"]["reference"](*stats_args)
        _assert_same(["teacher_stats"], [stats], [ref], dtype, "stats vs reference")
    args = (z, ts, y, None, stats, 1.5, 5.0, 0.02, 1.0, 0, 0.7, -100, True, None)
    got, _ = emu.mtbkd_loss_fwd(*args)
    _assert_same(MTBKD_OUT, got, C.mtbkd_loss_fwd(*args), dtype, f"cached {dtype}")
    plain, _ = emu.mtbkd_loss_fwd(*args[:4], None, *args[5:])
    _assert_same(MTBKD_OUT, got, plain, dtype, f"cached vs recomputed {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("k", "v"), [(1, 7), (2, 257), (3, 1), (8, 1000)], ids=lambda x: str(x))
def test_kd_loss_matches_the_cpu_kernels(emu, dtype, k, v):
    n = 3
    z, ts, y, fw = _inputs(n, v, k, dtype, seed=31 * k + v)
    cases = [  # (divergence, beta, tau, mode, tau_w, fixed, hard, soft, soft_scale, grad_scale)
        (0, 0.5, 1.0, 0, 1.0, None, 0.5, 1.0, 1.0, None),
        (1, 0.5, 2.0, 1, 0.7, None, 0.0, 1.0, 4.0, torch.tensor([0.5])),
        (2, 0.3, 1.5, 2, 1.3, fw, 0.3, 0.7, 2.0, None),
        (2, 0.9, 0.7, 0, 2.0, None, 0.0, 1.0, 1.0, torch.tensor([2.0])),
        (2, 1.0, 1.0, 1, 1.0, None, 0.2, 1.0, 1.0, None),  # endpoint: reverse KL
    ]
    for div, beta, tau, mode, tau_w, fixed, bh, bs, sc, gs in cases:
        args = (z, ts, y, fixed, div, beta, tau, mode, tau_w, bh, bs, sc, -100, True, gs)
        got, status = emu.multi_teacher_kd_fwd(*args)
        assert status.tolist() == [0] * n
        what = f"kd {dtype} K={k} V={v} div={div} beta={beta} mode={mode}"
        _assert_same(KD_OUT, got, C.multi_teacher_kd_fwd(*args), dtype, what)
        if dtype == torch.float64:
            ref = REF["multi_teacher_kd_fwd"]["reference"](*args)
            _assert_same(KD_OUT, got, ref, dtype, what + " vs reference")
    args = (z, ts, None, None, 2, 0.5, 1.0, 0, 1.0, 0.0, 1.0, 1.0, -100, False, None)
    got, status = emu.multi_teacher_kd_fwd(*args)
    assert status is None
    _assert_same(KD_OUT, got, C.multi_teacher_kd_fwd(*args), dtype, f"kd {dtype} K={k} no labels")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_teacher_weights_and_stats_match_the_cpu_kernels(emu, dtype):
    for k, v in ((1, 7), (3, 257), (8, 1000)):
        _, ts, _, _ = _inputs(2, v, k, dtype, seed=k + v)
        for mode in (0, 1):
            got, status = emu.teacher_weights(ts, mode, 0.7, True)
            assert status.tolist() == [0, 0]
            want = C.teacher_weights(ts, mode, 0.7, True)
            _assert_same(["weights", "entropy"], got, want, dtype, f"weights {dtype} K={k} V={v}")
        got, _ = emu.teacher_stats(ts, 2.0, 5.0, 1.0, False)
        want = C.teacher_stats(ts, 2.0, 5.0, 1.0, False)
        _assert_same(["stats"], [got], [want], dtype, f"stats {dtype} K={k} V={v}")


def test_status_flags_bad_labels_and_non_finite_logits(emu):
    z, ts, y, _ = _inputs(4, 7, 2, torch.float32, seed=2)
    y[0], y[2] = 7, -5  # out of range
    z[3, 2] = float("nan")
    ts[1][2, 1] = float("inf")
    _, status = emu.mtbkd_loss_fwd(z, ts, y, None, None, 2.0, 5.0, 0.02, 1.0, 0, 1.0, -100, True)
    assert status.tolist() == [1, 0, 1 | 4, 2]  # row 1 masked: its bad teacher is no error
    _, status = emu.multi_teacher_kd_fwd(z, ts, y, None, 0, 0.5, 1.0, 0, 1.0, 0.5, 1.0, 1.0,
                                         -100, True)  # fmt: skip
    assert status.tolist() == [1, 0, 1 | 4, 2]
    _, status = emu.teacher_weights(ts, 0, 1.0, True)
    assert status.tolist() == [0, 0, 4, 0]


def test_elementwise_kernels_match_the_cpu_kernels(emu):
    g = torch.Generator().manual_seed(4)
    for dtype in DTYPES:
        grad = torch.randn(3, 300, generator=g).to(dtype)
        rows = torch.rand(3, generator=g, dtype=torch.float64)
        want = C.scale_grad(grad, rows)
        _assert_same(["scale_grad"], [emu.scale_grad(grad, rows)], [want], dtype, f"{dtype}")
    for dtype in (torch.float32, torch.float64):
        x = torch.cat([torch.rand(300, generator=g) * 3, torch.logspace(-30, 30, 300)]).to(dtype)
        want = C.lgamma1p(x)
        _assert_same(["lgamma1p"], [emu.lgamma1p(x)], [want], dtype, f"lgamma1p {dtype}")


# ---- degenerate rows (check_finite=False): NaN exactly where the CPU kernels give NaN ------------

INF, NAN = float("inf"), float("nan")


def _degenerate_cases():
    """(name, student, teachers) as test_degenerate_rows_are_nan_on_every_backend: row 1 bad."""
    g = torch.Generator().manual_seed(3)
    z = torch.randn(3, 16, generator=g) * 2
    t = torch.randn(2, 3, 16, generator=g) * 2
    cases = []
    for name, bad in (("+inf", INF), ("nan", NAN)):
        tb = t.clone()
        tb[0, 1, 4] = bad
        cases.append((f"teacher0[1,4]={name}", z, tb))
    tb = t.clone()
    tb[1, 1] = -INF
    cases.append(("teacher1 row 1 all -inf", z, tb))
    tb = t.clone()
    tb[0, 1] = -INF
    cases.append(("teacher0 row 1 all -inf", z, tb))
    zb = z.clone()
    zb[1] = -INF
    cases.append(("student row 1 all -inf", zb, t))
    zb = z.clone()
    zb[1, 7] = NAN
    cases.append(("student[1,7]=nan", zb, t))
    zb = z.clone()
    zb[1, 3] = INF
    cases.append(("student[1,3]=+inf", zb, t))
    return cases


DEGENERATE = _degenerate_cases()


def _assert_degenerate(names, got, want, what):
    """The CPU kernels' outputs: NaN where they are NaN; rows 0 and 2 untouched and finite."""
    loss, grad = want[0], want[1]
    assert torch.isfinite(loss[[0, 2]]).all() and torch.isfinite(grad[[0, 2]]).all(), what
    for name, a, b in zip(names, got, want, strict=True):
        nan_a, nan_b = a.isnan(), b.isnan()
        assert torch.equal(nan_a, nan_b), (
            f"{what} {name}: CUDA NaN at {nan_a.nonzero().tolist()[:8]}, CPU NaN at"
            f" {nan_b.nonzero().tolist()[:8]}; CUDA row 1 {a[..., 1, :] if a.dim() > 1 else a[1]}"
        )
    _assert_same(names, got, want, torch.float32, what)


DEGENERATE_K = [  # a bad teacher 1 with K = 1 is no degenerate row
    pytest.param(case, k, id=f"{case[0]}-K{k}")
    for k in (1, 2)
    for case in DEGENERATE
    if k == 2 or "teacher1" not in case[0]
]


@pytest.mark.parametrize(("case", "k"), DEGENERATE_K)
def test_degenerate_rows_of_the_mtbkd_loss_are_those_of_the_cpu_kernels(emu, case, k):
    name, z, t = case
    for y in (torch.tensor([0, 1, 2]), None):
        args = (z, list(t[:k]), y, None, None, 2.0, 5.0, 0.02, 1.0, 0, 1.0, -100, False, None)
        got, _ = emu.mtbkd_loss_fwd(*args)
        want = C.mtbkd_loss_fwd(*args)
        assert torch.isnan(want[0][1]) and torch.isnan(want[1][1]).all(), "CPU semantics changed"
        what = f"mtbkd K={k} {name} labels={y is not None}"
        _assert_degenerate(MTBKD_OUT, got, want, what)


@pytest.mark.parametrize(("case", "k"), DEGENERATE_K)
def test_degenerate_rows_of_the_kd_loss_are_those_of_the_cpu_kernels(emu, case, k):
    name, z, t = case
    for div, mode in ((0, 1), (1, 1), (2, 0)):
        args = (z, list(t[:k]), None, None, div, 0.5, 1.0, mode, 1.0, 0.0, 1.0, 1.0, -100, False)
        got, _ = emu.multi_teacher_kd_fwd(*args)
        want = C.multi_teacher_kd_fwd(*args)
        _assert_degenerate(KD_OUT, got, want, f"kd div={div} K={k} {name}")


@pytest.mark.parametrize("k", [1, 2, 3])
def test_degenerate_rows_of_the_teacher_kernel_are_those_of_the_cpu_kernels(emu, k):
    g = torch.Generator().manual_seed(1)
    t = torch.randn(3, 4, 50, generator=g) * 3
    t[0, 1, 7] = NAN
    t[0, 2, 9] = INF
    t[k - 1, 3] = -INF
    t = list(t[:k])
    for mode in (0, 1):
        got, _ = emu.teacher_weights(t, mode, 0.7, False)
        want = C.teacher_weights(t, mode, 0.7, False)
        for name, a, b in zip(("weights", "entropy"), got, want, strict=True):
            assert torch.equal(a.isnan(), b.isnan()), (
                f"teacher_weights mode={mode} K={k} {name}: CUDA {a} CPU {b}"
            )
        _assert_same(("weights", "entropy"), got, want, torch.float32, f"teacher_weights K={k}")
    got, _ = emu.teacher_stats(t, 2.0, 5.0, 0.7, False)
    want = C.teacher_stats(t, 2.0, 5.0, 0.7, False)
    assert torch.equal(got.isnan(), want.isnan()), f"teacher_stats K={k}: CUDA {got} CPU {want}"
    _assert_same(["teacher_stats"], [got], [want], torch.float32, f"teacher_stats K={k}")


@pytest.mark.parametrize("who", ["student", "teacher"])
def test_rows_below_minus_1e30_match_the_cpu_kernels_and_the_reference(emu, who):
    # session 32: a row of finfo(float32).min logits (a padding row) is a uniform distribution;
    # the CPU kernels had clamped its offset at -1e30 and made it NaN, the CUDA kernels had not
    g = torch.Generator().manual_seed(5)
    z = torch.randn(3, 1500, generator=g, dtype=torch.float64)  # two blocks of the CPU kernels
    t = torch.randn(2, 3, 1500, generator=g, dtype=torch.float64)
    if who == "student":
        z[1] = torch.finfo(torch.float32).min
    else:
        t[1, 1] = torch.finfo(torch.float32).min
    args = (z, list(t), None, None, None, 2.0, 5.0, 0.02, 1.0, 0, 1.0, -100, False, None)
    got, _ = emu.mtbkd_loss_fwd(*args)
    _assert_same(MTBKD_OUT, got, C.mtbkd_loss_fwd(*args), torch.float64, f"mtbkd {who}")
    ref = REF["mtbkd_loss_fwd"]["reference"](*args)
    _assert_same(MTBKD_OUT, got, ref, torch.float64, f"mtbkd {who} vs reference")
    for div in (0, 1, 2):
        args = (z, list(t), None, None, div, 0.5, 1.0, 1, 1.0, 0.0, 1.0, 1.0, -100, False)
        got, _ = emu.multi_teacher_kd_fwd(*args)
        _assert_same(KD_OUT, got, C.multi_teacher_kd_fwd(*args), torch.float64, f"kd {div}")
