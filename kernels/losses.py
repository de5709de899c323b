"""Triton kernels of the fused multi-teacher losses (MATH.md sections 1-4).

One program per row (an example or a token) streams the row in blocks of ``BLOCK`` vocabulary
entries. Teachers are read as one ``[KP, BLOCK]`` tile per block (``KP`` = K rounded up to a power
of two, the padding rows masked), so the K + 1 online softmaxes of a row advance together:

* **statistics pass**: the online (max, sum) pairs of ``z/tau``, ``z`` (cross-entropy) and
  ``t_k/tau``, the entropy of ``softmax(t_k/tau_w)`` (entropy weights) and the student-dependent
  running sums (the MT-BKD cross term ``sum_c p_kc (z_c - max z)``, the reverse-KL
  ``E_q[(z - max z) - (t_k - b_k)]``);
* MT-BKD only, unless cached teacher statistics are given: the ``L_k = sum_c lgamma(1 + lam p_kc)``
  pass (``L_k`` needs the teacher's full ``lse`` first);
* JSD only: a divergence pass (its gradient needs ``KL(q || m_k)`` for the whole row);
* **loss + gradient pass**: ``dL_i/dz_i`` written once in the student's dtype, from fp32 (fp64 for
  float64 input) arithmetic.

Normalisers stay split: a log-probability is ``(x - m) / tau - log s`` with the raw row max
``m`` and the sum ``s`` of ``exp((x - m) / tau)`` kept apart (as ``torch.log_softmax`` keeps
``x - m`` and ``log s``), never ``x / tau - (m / tau + log s)``: with logits of magnitude 1e4 (or
``tau = 0.05``) one float32 ``m / tau + log s`` would cost ~1e-3.

Outputs are per row (no ``N x V`` loss buffer). Masked rows (``label == ignore_index``) skip every
pass and write zeros. Label-range and ``check_finite`` failures are recorded per row in an int32
status vector: on CPU tensors (the interpreter) the wrapper raises ``ValueError`` naming the
argument and row; on CUDA tensors it queues ``torch._assert_async`` so that no host
synchronisation happens (the failure surfaces as a device-side assertion, as PyTorch's own
``cross_entropy`` does for out-of-range targets).

Teachers arrive as a list of K ``[N, V]`` tensors. When they are equally spaced views of one
``[K, N, V]`` tensor (``unbind`` of a stacked tensor) the kernel gets the first pointer and the
teacher stride; otherwise up to :data:`MAX_POINTER_TEACHERS` separate pointers (no copy); more
teachers than that are stacked once.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from mtbkd.ops import DIVERGENCES, WEIGHT_MODES, register_impl

MAX_POINTER_TEACHERS = 8

# Bits of the per-row status word (host ints, and the same values as kernel constants).
STATUS_LABEL = 1
STATUS_STUDENT = 2
STATUS_TEACHER = 4
_STATUS_LABEL = tl.constexpr(STATUS_LABEL)
_STATUS_STUDENT = tl.constexpr(STATUS_STUDENT)
_STATUS_TEACHER = tl.constexpr(STATUS_TEACHER)

# ----------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def _scalar(x, ACC: tl.constexpr):
    # Host floats arrive as fp64 kernel arguments (Python floats under the interpreter); adding them
    # to a typed zero keeps all 53 bits for float64 input, then one rounding to the compute dtype.
    return (tl.zeros([1], ACC) + x).to(ACC)


@triton.jit
def _safe_max(m):
    # exp(x - m) with m = -inf (nothing seen yet, or an all -inf row) would be NaN; shift by 0.
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def _log1p(x, HIGH: tl.constexpr):
    # log1p(x) = 2 atanh(u), u = x / (2 + x) <= 1/5 on [0, 1/2]: relative accuracy for tiny x,
    # which plain log(1 + x) loses (1 + x rounds to 1).
    u = x / (2.0 + x)
    u2 = u * u
    if HIGH:
        s = u2 * (1.0 / 25.0) + 1.0 / 23.0
        s = s * u2 + 1.0 / 21.0
        s = s * u2 + 1.0 / 19.0
        s = s * u2 + 1.0 / 17.0
        s = s * u2 + 1.0 / 15.0
        s = s * u2 + 1.0 / 13.0
    else:
        s = u2 * 0.0 + 1.0 / 13.0
    s = s * u2 + 1.0 / 11.0
    s = s * u2 + 1.0 / 9.0
    s = s * u2 + 1.0 / 7.0
    s = s * u2 + 1.0 / 5.0
    s = s * u2 + 1.0 / 3.0
    s = s * u2 + 1.0
    return 2.0 * u * s


@triton.jit
def _lgamma2p(u, HIGH: tl.constexpr):
    # lgamma(2 + u) = (1 - gamma) u + sum_{k>=2} (-1)^k (zeta(k) - 1) u^k / k for |u| <= 1/2; the
    # terms shrink like 4^-k, so 13 (fp32) or 27 (fp64) terms suffice. Exactly 0 at u = 0.
    if HIGH:
        s = u * -2.7595228851242331e-10 + 5.7313672416788620e-10
        s = s * u + -1.1921401405860912e-9
        s = s * u + 2.4836745438024783e-9
        s = s * u + -5.1834750419700467e-9
        s = s * u + 1.0838659214896954e-8
        s = s * u + -2.2711094608943165e-8
        s = s * u + 4.7698101693639806e-8
        s = s * u + -1.0043224823968100e-7
        s = s * u + 2.1207184805554666e-7
        s = s * u + -4.4924691987645660e-7
        s = s * u + 9.5514121304074198e-7
        s = s * u + -2.0392157538013662e-6
        s = s * u + 4.3748667899074878e-6
        s = s * u + -9.4394882752683959e-6
    else:
        s = u * 0.0 + -9.4394882752683959e-6
    s = s * u + 2.0507212775670692e-5
    s = s * u + -4.4926236738133142e-5
    s = s * u + 9.9457512781808534e-5
    s = s * u + -2.2315475845357938e-4
    s = s * u + 5.0966952474304242e-4
    s = s * u + -1.1927539117032610e-3
    s = s * u + 2.8905103307415233e-3
    s = s * u + -7.3855510286739853e-3
    s = s * u + 2.0580808427784548e-2
    s = s * u + -6.7352301053198095e-2
    s = s * u + 3.2246703342411322e-1
    s = s * u + 4.2278433509846714e-1
    return s * u


@triton.jit
def _lgamma1p(x, HIGH: tl.constexpr):
    """``lgamma(1 + x)`` for ``x >= 0`` (``x = lam * p``), accurate to the compute dtype.

    ``x < 1/2``: ``lgamma(2 + x) - log1p(x)`` (relative accuracy as ``x -> 0``); ``1 + x < 8``:
    recurrence down to ``lgamma(2 + u)``, ``|u| <= 1/2`` (exactly 0 at ``x = 1``); else Stirling.
    """
    y = 1.0 + x
    small = x < 0.5
    n = tl.floor(y - 1.5)  # steps of the recurrence lgamma(y) = lgamma(y - 1) + log(y - 1)
    prod = tl.where(n >= 1.0, y - 1.0, 1.0)
    prod *= tl.where(n >= 2.0, y - 2.0, 1.0)
    prod *= tl.where(n >= 3.0, y - 3.0, 1.0)
    prod *= tl.where(n >= 4.0, y - 4.0, 1.0)
    prod *= tl.where(n >= 5.0, y - 5.0, 1.0)
    prod *= tl.where(n >= 6.0, y - 6.0, 1.0)
    u = tl.where(small, x, (x - 1.0) - n)  # x - 1 is exact near the zero at x = 1
    xs = tl.where(small, x, 0.0)
    near = _lgamma2p(u, HIGH) + tl.where(small, -_log1p(xs, HIGH), tl.log(prod))
    # Stirling: (y - 1/2) log y - y + log(2 pi)/2 + sum_j B_2j / (2j (2j - 1) y^(2j - 1)).
    yb = tl.maximum(y, 8.0)
    r = 1.0 / (yb * yb)
    if HIGH:
        c = r * -2.9550653594771242e-2 + 6.4102564102564103e-3
        c = c * r + -1.9175269175269175e-3
        c = c * r + 8.4175084175084175e-4
        c = c * r + -5.9523809523809524e-4
    else:
        c = r * -5.9523809523809524e-4
    c = c * r + 7.9365079365079365e-4
    c = c * r + -2.7777777777777778e-3
    c = c * r + 8.3333333333333333e-2
    far = (yb - 0.5) * tl.log(yb) - yb + 0.91893853320467274 + c / yb
    return tl.where(y >= 8.0, far, near)


@triton.jit
def _teacher_bases(t0, t1, t2, t3, t4, t5, t6, t7, t_stride, kidx, K: tl.constexpr,
                   STACKED: tl.constexpr):  # fmt: skip
    # [KP] vector of per-teacher base pointers.
    if STACKED:
        base = t0 + kidx.to(tl.int64) * t_stride
    else:
        base = tl.where(kidx == 1, t1, t0)
        if K > 2:
            base = tl.where(kidx == 2, t2, base)
        if K > 3:
            base = tl.where(kidx == 3, t3, base)
        if K > 4:
            base = tl.where(kidx == 4, t4, base)
        if K > 5:
            base = tl.where(kidx == 5, t5, base)
        if K > 6:
            base = tl.where(kidx == 6, t6, base)
        if K > 7:
            base = tl.where(kidx == 7, t7, base)
    return base


@triton.jit
def _to_out(x, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    # Round once to the output dtype. Triton's interpreter truncates fp32 -> bf16 (the GPU rounds
    # to nearest even), so under the interpreter round to nearest even in the fp32 bits first; the
    # cast after it is then exact.
    if INTERPRET:
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _grad_scale(gs_ptr, HAS_GS: tl.constexpr, ACC: tl.constexpr):
    # The op's grad_scale ([1]; 1 when absent), folded into the gradient's coefficients so the
    # gradient is rounded to the output dtype once, already scaled.
    if HAS_GS:
        return tl.load(gs_ptr + tl.zeros([1], tl.int64)).to(ACC)
    else:
        return tl.full([1], 1.0, ACC)


@triton.jit
def _not_finite(x, mask):
    # 1 if some masked-in element is NaN or +-inf.
    finite = (x == x) & (tl.abs(x) < float("inf"))
    return tl.max((mask & (~finite)).to(tl.int32))


@triton.jit
def _online(m, s, x, valid, scale):
    # One block of an online logsumexp of x * scale (scale > 0) along axis 1 of x [R, BLOCK]:
    # running max m [R] of the raw x and sum s [R] of exp((x - m) * scale); also returns the
    # block's exp((x - shift) * scale) and the shift used. Subtracting the raw max first keeps the
    # exponent exact near the max: x * scale - m * scale would round at |x * scale| (~1e-4 for
    # logits of 100 at tau = 0.05) before the subtraction.
    m_new = tl.maximum(m, tl.max(tl.where(valid, x, float("-inf")), axis=1))
    shift = _safe_max(m_new)
    e = tl.where(valid, tl.exp((x - shift[:, None]) * scale), 0.0)
    s = s * tl.exp((m - shift) * scale) + tl.sum(e, axis=1)
    return m_new, s, e, shift


@triton.jit
def _student_online(mz, ss, s1, z, cm, inv_tau, HAS_LABELS: tl.constexpr):
    # One block of the student's two online softmaxes, sharing the raw max mz: ss = sum
    # exp((z - mz) / tau) and, for the cross-entropy, s1 = sum exp(z - mz). Returns the max before
    # and after, the sums, the block's exp((z - shift) / tau) [1, BLOCK] and the shift.
    mz_old = mz
    mz, ss, e, shift = _online(mz, ss, z[None, :], cm[None, :], inv_tau)
    if HAS_LABELS:
        s1 = s1 * tl.exp(mz_old - shift) + tl.sum(tl.where(cm, tl.exp(z - shift), 0.0))
    return mz_old, mz, ss, s1, e, shift


@triton.jit
def _weights(h, fw_ptr, row, N, kidx, kmask, K: tl.constexpr, WEIGHT_MODE: tl.constexpr,
             ACC: tl.constexpr):  # fmt: skip
    # MATH.md section 1: entropy weights (1 - H_k / sum H) / (K - 1), uniform, or fixed
    # (renormalised per row).
    if WEIGHT_MODE == 2:
        fw = tl.load(fw_ptr + kidx.to(tl.int64) * N + row, mask=kmask, other=0.0).to(ACC)
        w = fw / tl.sum(fw)
    elif (WEIGHT_MODE == 1) | (K == 1):
        w = tl.where(kmask, 1.0, 0.0).to(ACC) / K
    else:
        hs = tl.where(kmask, h, 0.0)
        total = tl.sum(hs)
        wt = tl.where(kmask, 1.0 - hs / total, 0.0)
        # Every teacher one-hot (sum of entropies 0): uniform.
        w = tl.where(total > 0.0, wt / tl.sum(wt), tl.where(kmask, 1.0, 0.0).to(ACC) / K)
    return w


@triton.jit
def _teacher_entropy_stats(t, valid2, mw, sw, bw, rw, inv_tw):
    # Online entropy of softmax(t / tau_w): with x = t / tau_w, S = sum e^(x - m) and
    # B = sum e^(x - m) (x - m), H = log S - B / S. Rescaling to a new max m':
    # B' = e^(m - m') (B + (m - m') S). R = S - 1 is kept apart (-1 while empty): the sum without
    # one entry at the maximum, so that log S = log1p(R) keeps a nearly one-hot teacher's small
    # sum, which S rounds away. A block that raises the max turns the old S into part of R; its
    # own entries at the new max count 1 each but one.
    x = t * inv_tw
    m_new, s_new, e, shift = _online(mw, sw, x, valid2, 1.0)
    alpha = tl.exp(mw - shift)
    delta = tl.where(sw > 0.0, mw - shift, 0.0)
    at_top = valid2 & (x == shift[:, None])
    # 0 at the top, not x - shift: on a GPU the compiler fuses t * inv_tw - shift into one fma
    # of the exact product, which leaves the product's rounding (~1e-6 at x ~ 57) where the
    # top's term must be 0, and a nearly one-hot teacher's entropy is smaller than that
    blk = tl.sum(tl.where((e > 0.0) & (~at_top), e * (x - shift[:, None]), 0.0), axis=1)
    bw = alpha * (bw + delta * sw) + blk
    raised = m_new > mw
    n_top = tl.sum(at_top.to(bw.dtype), axis=1) - raised.to(bw.dtype)
    rest = tl.sum(tl.where(at_top, 0.0, e), axis=1)
    rw = tl.where(raised, alpha * (rw + 1.0), rw) + rest + n_top
    return m_new, s_new, bw, rw


@triton.jit
def _row_pointers(z_ptr, grad_ptr, t0, t1, t2, t3, t4, t5, t6, t7, t_stride, row, N, V,
                  K: tl.constexpr, KP: tl.constexpr, BLOCK: tl.constexpr,
                  STACKED: tl.constexpr):  # fmt: skip
    # Teacher lanes (kidx, kmask), this row's index into [K, N] outputs (kn), the block's column
    # offsets, and the row's student, gradient and per-teacher base pointers.
    kidx = tl.arange(0, KP)
    kmask = kidx < K
    kn = kidx.to(tl.int64) * N + row
    row_off = row * V
    tbase = _teacher_bases(t0, t1, t2, t3, t4, t5, t6, t7, t_stride, kidx, K, STACKED) + row_off
    return kidx, kmask, kn, tl.arange(0, BLOCK), z_ptr + row_off, grad_ptr + row_off, tbase


@triton.jit
def _row_label(labels_ptr, one, ignore_index, V, HAS_LABELS: tl.constexpr):
    # The row's label y (0 when out of range or absent), whether the row counts (not
    # ignore_index) and its status bits (a label outside [0, V) that is not ignore_index).
    status = tl.zeros([1], tl.int32)
    if HAS_LABELS:
        y = tl.load(labels_ptr + one)
        unmasked = y != ignore_index
        valid = tl.max(unmasked.to(tl.int32)) != 0  # scalar condition for the row-level branch
        in_range = (y >= 0) & (y < V)
        status = tl.where(unmasked & (~in_range), _STATUS_LABEL, status)
        y = tl.where(in_range, y, 0)
    else:
        y = tl.zeros([1], tl.int64)
        valid = True
    return y, valid, status


@triton.jit
def _zero_row(grow, V, BLOCK: tl.constexpr, ACC: tl.constexpr):
    # The gradient row of a masked (ignore_index) row: zeros.
    cols0 = tl.arange(0, BLOCK)
    zero = tl.zeros([BLOCK], ACC)
    for start in range(0, V, BLOCK):
        cols = start + cols0
        tl.store(grow + cols, zero.to(grow.dtype.element_ty), mask=cols < V)


@triton.jit
def _finish_lse(m, s, kmask, scale):
    # Per-teacher logsumexp of x * scale from the online (max, sum) of _online; 0 in padding lanes.
    # Only an output (TeacherStats): log-probabilities keep the max and the log-sum apart.
    return tl.where(kmask, m * scale + tl.log(tl.where(kmask, s, 1.0)), 0.0)


@triton.jit
def _finish_max(m, kmask):
    # Per-teacher raw max of _online, for log p = (x - max) * scale - log sum; 0 in padding lanes.
    return tl.where(kmask, _safe_max(m), 0.0)


@triton.jit
def _finish_log_sum(s, kmask):
    # log of the per-teacher sum of _online; 0 in padding lanes.
    return tl.where(kmask, tl.log(tl.where(kmask, s, 1.0)), 0.0)


@triton.jit
def _finish_entropy(sw, bw, rw, kmask, HIGH: tl.constexpr):
    # H = log S - B / S from _teacher_entropy_stats, log S = log1p(R); 0 in padding lanes.
    sw_safe = tl.where(kmask, sw, 1.0)
    small = rw < 0.5
    log_s = tl.where(small, _log1p(tl.where(small, rw, 0.0), HIGH), tl.log(sw_safe))
    return tl.where(kmask, log_s - bw / sw_safe, 0.0)


@triton.jit
def _lgamma_terms(tbase, kmask, V, mt, lst, inv_tau, lam, BLOCK: tl.constexpr, KP: tl.constexpr,
                  ACC: tl.constexpr, HIGH: tl.constexpr):  # fmt: skip
    # L_k = sum_c lgamma(1 + lam p_kc) (MATH.md section 2): a pass of its own, since it needs the
    # teacher's full normaliser: raw max mt and log-sum lst (_finish_max, _finish_log_sum).
    cols0 = tl.arange(0, BLOCK)
    lg = tl.zeros([KP], ACC)
    for start in range(0, V, BLOCK):
        cols = start + cols0
        valid2 = kmask[:, None] & (cols < V)[None, :]
        t = tl.load(tbase[:, None] + cols[None, :], mask=valid2, other=float("-inf"))
        p = tl.exp((t.to(ACC) - mt[:, None]) * inv_tau - lst[:, None])
        lg += tl.sum(tl.where(valid2, _lgamma1p(lam * p, HIGH), 0.0), axis=1)
    return lg


# ----------------------------------------------------------------------------------------------
# MT-BKD: teacher-informed mixture prior (MATH.md section 2)
# ----------------------------------------------------------------------------------------------
#
# Per row, with q = softmax(z/tau), p_k = softmax(t_k/tau), m = max z, S = sum e^((z - m)/tau):
#   C_k = lam * (sum_c p_kc (z_c - m)/tau - log S)       (statistics pass, online in t and z)
#   L_k = sum_c lgamma(1 + lam p_kc)                      (own pass: needs lse(t_k/tau))
#   l_k = log w_k + C_k - L_k,  prior = -lgamma(V + lam) - logsumexp_k l_k,  r = softmax_k(l)
#   dL/dz = beta_h (softmax(z) - onehot(y)) + beta_p (lam/tau) (q - sum_k r_k p_k)


@triton.jit
def _mtbkd_fwd_kernel(
    z_ptr, t0, t1, t2, t3, t4, t5, t6, t7, t_stride, labels_ptr, fw_ptr, stats_ptr,
    loss_ptr, grad_ptr, w_ptr, r_ptr, h_ptr, prior_ptr, ce_ptr, status_ptr, gs_ptr,
    N, V, ignore_index,
    inv_tau_: tl.float64, inv_tw_: tl.float64, lam_: tl.float64, beta_p_: tl.float64,
    beta_h_: tl.float64, lgamma_v_: tl.float64,
    K: tl.constexpr, KP: tl.constexpr, BLOCK: tl.constexpr, STACKED: tl.constexpr,
    HAS_LABELS: tl.constexpr, HAS_STATS: tl.constexpr, WEIGHT_MODE: tl.constexpr,
    CHECK_FINITE: tl.constexpr, HAS_STATUS: tl.constexpr, HAS_GS: tl.constexpr,
    ACC: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    one = row + tl.zeros([1], tl.int64)  # [1]-shaped offset of this row in per-row outputs
    HIGH: tl.constexpr = ACC == tl.float64
    inv_tau = _scalar(inv_tau_, ACC)
    inv_tw = _scalar(inv_tw_, ACC)
    lam = _scalar(lam_, ACC)
    beta_p = _scalar(beta_p_, ACC)
    beta_h = _scalar(beta_h_, ACC)
    lgamma_v = _scalar(lgamma_v_, ACC)
    kidx, kmask, kn, cols0, zrow, grow, tbase = _row_pointers(
        z_ptr, grad_ptr, t0, t1, t2, t3, t4, t5, t6, t7, t_stride, row, N, V, K, KP, BLOCK, STACKED
    )
    y, valid, status = _row_label(labels_ptr, one, ignore_index, V, HAS_LABELS)

    if valid:
        # ---- statistics pass ----------------------------------------------------------------
        mz = tl.full([1], float("-inf"), ACC)  # raw student max, shared by both softmaxes
        ss = tl.zeros([1], ACC)
        s1 = tl.zeros([1], ACC)
        mt = tl.full([KP], float("-inf"), ACC)  # raw teacher maxima
        st = tl.zeros([KP], ACC)
        cross = tl.zeros([KP], ACC)
        mw = tl.full([KP], float("-inf"), ACC)
        sw = tl.zeros([KP], ACC)
        bw = tl.zeros([KP], ACC)
        rw = tl.full([KP], -1.0, ACC)
        if HAS_STATS:
            # The cached lse(t_k/tau) is not used: p_k from it would carry its float32 rounding
            # (~1e-3 at logits of 1e4). The online teacher softmax below needs the same exp per
            # element (and a max per block); L_k and H_k still come from the cache.
            sbase = stats_ptr + kn * 4
            h = tl.where(kmask, tl.load(sbase + 2, mask=kmask, other=0.0).to(ACC), 0.0)
            lg = tl.where(kmask, tl.load(sbase + 3, mask=kmask, other=0.0).to(ACC), 0.0)
        for start in range(0, V, BLOCK):
            cols = start + cols0
            cm = cols < V
            valid2 = kmask[:, None] & cm[None, :]
            zraw = tl.load(zrow + cols, mask=cm, other=float("-inf"))
            traw = tl.load(tbase[:, None] + cols[None, :], mask=valid2, other=float("-inf"))
            if CHECK_FINITE:
                status |= _not_finite(zraw.to(ACC), cm) * _STATUS_STUDENT
                status |= _not_finite(traw.to(ACC), valid2) * _STATUS_TEACHER
            z = zraw.to(ACC)
            t = traw.to(ACC)
            mz_old, mz, ss, s1, _e, shz = _student_online(mz, ss, s1, z, cm, inv_tau, HAS_LABELS)
            # cross_k = sum_c e^((t_kc - mt_k)/tau) (z_c - mz), relative to both running maxima: a
            # new student max shifts it by (mz_old - mz) S_k, a new teacher max rescales it.
            mt_old = mt
            st_old = st
            mt, st, e, sht = _online(mt, st, t, valid2, inv_tau)
            shift_z = tl.where(st_old > 0.0, (mz_old - shz) * st_old, 0.0)
            cross = tl.exp((mt_old - sht) * inv_tau) * (cross + shift_z) + tl.sum(
                tl.where(e > 0.0, e * (z - shz)[None, :], 0.0), axis=1
            )
            if not HAS_STATS:
                mw, sw, bw, rw = _teacher_entropy_stats(t, valid2, mw, sw, bw, rw, inv_tw)
        lss = tl.log(ss)
        mts = _finish_max(mt, kmask)
        lst = _finish_log_sum(st, kmask)
        if not HAS_STATS:
            h = _finish_entropy(sw, bw, rw, kmask, HIGH)
            lg = _lgamma_terms(tbase, kmask, V, mts, lst, inv_tau, lam, BLOCK, KP, ACC, HIGH)
        # C_k = lam (E_p[z - mz]/tau - log S): two non-positive terms, no cancellation.
        cterm = tl.where(kmask, lam * (cross / tl.where(kmask, st, 1.0) * inv_tau - lss), 0.0)
        w = _weights(h, fw_ptr, row, N, kidx, kmask, K, WEIGHT_MODE, ACC)
        ell = tl.where(kmask & (w > 0.0), tl.log(tl.where(w > 0.0, w, 1.0)) + cterm - lg,
                       float("-inf"))  # fmt: skip
        m_ell = tl.max(ell)
        e_ell = tl.exp(ell - m_ell)
        s_ell = tl.sum(e_ell)
        lse_ell = m_ell + tl.log(s_ell)
        # normalised by the sum, not exp(ell - lse_ell): at |ell| ~ 7e4 (logits of 1e4) the
        # float32 lse is off by up to half its ulp (0.004) and the responsibilities summed to
        # 0.997, the gradient 2e-3 off (the C++ and CUDA kernels divide, common.h)
        resp = e_ell / s_ell
        prior = -lgamma_v - lse_ell
        loss = beta_p * prior
        if HAS_LABELS:
            ls1 = tl.log(s1)
            zy = tl.load(zrow + y).to(ACC)
            ce = (mz - zy) + ls1
            loss += tl.where(beta_h != 0.0, beta_h * ce, 0.0)  # beta_h = 0: no term, no 0 * inf
        else:
            ce = tl.zeros([1], ACC)
        # ---- loss + gradient pass -----------------------------------------------------------
        # The gradient's coefficients carry grad_scale (the loss does not).
        gsc = _grad_scale(gs_ptr, HAS_GS, ACC)
        coef = beta_p * lam * inv_tau * gsc
        beta_hg = beta_h * gsc
        # q sum_k r_k - sum_k r_k p_k: zero for q = p_k however sum_k r_k rounds (as autograd's
        # softmax backward, q sum_c sum_k r_k p_kc - sum_k r_k p_k, is).
        rsum = tl.sum(resp)
        for start in range(0, V, BLOCK):
            cols = start + cols0
            cm = cols < V
            valid2 = kmask[:, None] & cm[None, :]
            z = tl.load(zrow + cols, mask=cm, other=float("-inf")).to(ACC)
            t = tl.load(tbase[:, None] + cols[None, :], mask=valid2, other=float("-inf")).to(ACC)
            q = tl.exp((z - mz) * inv_tau - lss)
            p = tl.where(valid2, tl.exp((t - mts[:, None]) * inv_tau - lst[:, None]), 0.0)
            g = coef * (q * rsum - tl.sum(resp[:, None] * p, axis=0))
            if HAS_LABELS:
                g += beta_hg * (tl.exp((z - mz) - ls1) - tl.where(cols == y, 1.0, 0.0))
            tl.store(grow + cols, _to_out(g, grad_ptr.dtype.element_ty, INTERPRET), mask=cm)
        tl.store(loss_ptr + one, loss)
        tl.store(prior_ptr + one, prior)
        tl.store(ce_ptr + one, ce)
        tl.store(w_ptr + kn, w, mask=kmask)
        tl.store(r_ptr + kn, resp, mask=kmask)
        tl.store(h_ptr + kn, h, mask=kmask)
    else:
        _zero_row(grow, V, BLOCK, ACC)
        zero1 = tl.zeros([1], ACC)
        tl.store(loss_ptr + one, zero1)
        tl.store(prior_ptr + one, zero1)
        tl.store(ce_ptr + one, zero1)
        zk = tl.zeros([KP], ACC)
        tl.store(w_ptr + kn, zk, mask=kmask)
        tl.store(r_ptr + kn, zk, mask=kmask)
        tl.store(h_ptr + kn, zk, mask=kmask)
    if HAS_STATUS:
        tl.store(status_ptr + one, status)


# ----------------------------------------------------------------------------------------------
# Weighted-sum multi-teacher KD (MATH.md section 3)
# ----------------------------------------------------------------------------------------------
#
# q = softmax(z/tau), p_k = softmax(t_k/tau), w summing to 1, soft weight a = beta_s s(tau):
#   forward KL  D_k = sum p_k (log p_k - log q)          dD/dz = (q - p_k) / tau
#   reverse KL  D_k = sum q (log q - log p_k)            dD/dz = q (log q - log p_k - D_k) / tau
#               log q - log p_k - D_k = (d_k - E_q[d_k]) / tau for d_kc = (z_c - a) - (t_kc - b_k)
#               and any row constants a, b_k; the gradient uses this form with a = max z and b_k =
#               t_k at the column of max z (no offset of 1e4 rounds d, and |d| is small where q is:
#               its rounding scales with the teachers' spread over the student's likely classes).
#               E_q[d_k] = R_k / S, R_k = sum_c e^((z_c - a)/tau) d_kc accumulated in the stats pass
#               with the running a and b_k; both move (and shift R_k) only in a block that raises
#               the student max. So once the student's top class is seen R_k is only summed, and a
#               confident student's ~0 gradient is a difference of two nearly equal O(|d|) numbers
#               formed the same way (exactly 0 when one class holds all of q), not of
#               O(|z - t|/tau) log-probabilities. D_k = (E_q[d_k] + max t_k - b_k)/tau + log S_k
#               - log S follows from the same sums.
#   JSD(beta)   m_k = beta p_k + (1 - beta) q,  D_k = beta KL(p_k || m_k) + (1 - beta) KL(q || m_k)
#               dD/dq_c = (1 - beta) log(q_c / m_kc), so through the softmax
#               dD/dz = (1 - beta) q (log q - log m_k - KL(q || m_k)) / tau   (third pass)
#   dL/dz = a sum_k w_k dD_k/dz + beta_h (softmax(z) - onehot(y))


@triton.jit
def _kd_fwd_kernel(
    z_ptr, t0, t1, t2, t3, t4, t5, t6, t7, t_stride, labels_ptr, fw_ptr,
    loss_ptr, grad_ptr, w_ptr, status_ptr, gs_ptr,
    N, V, ignore_index,
    inv_tau_: tl.float64, inv_tw_: tl.float64, beta_: tl.float64, one_m_beta_: tl.float64,
    log_beta_: tl.float64, log_1mbeta_: tl.float64, beta_h_: tl.float64, soft_w_: tl.float64,
    K: tl.constexpr, KP: tl.constexpr, BLOCK: tl.constexpr, STACKED: tl.constexpr,
    HAS_LABELS: tl.constexpr, WEIGHT_MODE: tl.constexpr, DIVERGENCE: tl.constexpr,
    CHECK_FINITE: tl.constexpr, HAS_STATUS: tl.constexpr, HAS_GS: tl.constexpr,
    ACC: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    one = row + tl.zeros([1], tl.int64)
    NEED_H: tl.constexpr = (WEIGHT_MODE == 0) & (K > 1)
    HIGH: tl.constexpr = ACC == tl.float64
    inv_tau = _scalar(inv_tau_, ACC)
    inv_tw = _scalar(inv_tw_, ACC)
    beta = _scalar(beta_, ACC)
    # 1 - beta from the host: formed in float32 from a float32-rounded beta it would lose digits
    # as beta -> 1 (fp32(1 - 1e-6) leaves 1 - beta 1.3 % off), and it scales the whole gradient.
    one_m_beta = _scalar(one_m_beta_, ACC)
    log_beta = _scalar(log_beta_, ACC)
    log_1mbeta = _scalar(log_1mbeta_, ACC)
    beta_h = _scalar(beta_h_, ACC)
    soft_w = _scalar(soft_w_, ACC)
    # The gradient's coefficients carry grad_scale (the loss does not).
    gsc = _grad_scale(gs_ptr, HAS_GS, ACC)
    soft_wg = soft_w * gsc
    beta_hg = beta_h * gsc
    kidx, kmask, kn, cols0, zrow, grow, tbase = _row_pointers(
        z_ptr, grad_ptr, t0, t1, t2, t3, t4, t5, t6, t7, t_stride, row, N, V, K, KP, BLOCK, STACKED
    )
    y, valid, status = _row_label(labels_ptr, one, ignore_index, V, HAS_LABELS)

    if valid:
        # ---- statistics pass ----------------------------------------------------------------
        mz = tl.full([1], float("-inf"), ACC)  # raw student max, shared by both softmaxes
        ss = tl.zeros([1], ACC)
        s1 = tl.zeros([1], ACC)
        mt = tl.full([KP], float("-inf"), ACC)  # raw teacher maxima
        st = tl.zeros([KP], ACC)
        mw = tl.full([KP], float("-inf"), ACC)
        sw = tl.zeros([KP], ACC)
        bw = tl.zeros([KP], ACC)
        rw = tl.full([KP], -1.0, ACC)
        rev = tl.zeros([KP], ACC)  # R_k = sum_c e^((z_c - mz)/tau) d_kc (reverse KL)
        tb = tl.zeros([KP], ACC)  # b_k of d_kc = (z_c - mz) - (t_kc - b_k)
        for start in range(0, V, BLOCK):
            cols = start + cols0
            cm = cols < V
            valid2 = kmask[:, None] & cm[None, :]
            zraw = tl.load(zrow + cols, mask=cm, other=float("-inf"))
            traw = tl.load(tbase[:, None] + cols[None, :], mask=valid2, other=float("-inf"))
            if CHECK_FINITE:
                status |= _not_finite(zraw.to(ACC), cm) * _STATUS_STUDENT
                status |= _not_finite(traw.to(ACC), valid2) * _STATUS_TEACHER
            z = zraw.to(ACC)
            t = traw.to(ACC)
            ss_old = ss
            mz_old, mz, ss, s1, eq, shz = _student_online(mz, ss, s1, z, cm, inv_tau, HAS_LABELS)
            mt, st, _et, sht = _online(mt, st, t, valid2, inv_tau)
            if NEED_H:
                mw, sw, bw, rw = _teacher_entropy_stats(t, valid2, mw, sw, bw, rw, inv_tw)
            if DIVERGENCE == 1:
                # A block that raises the student max moves a to it and b_k to the teachers' logits
                # at its column (their max if that is -inf), shifting R_k by (a_old - a) +
                # (b_k - b_k_old) per unit of S_old (the old terms then scale by alpha; when alpha
                # underflows they vanish).
                at_max = tl.min(tl.where(z == shz, cols, V))
                t_at = tl.load(tbase + at_max, mask=kmask & (at_max < V), other=float("-inf"))
                t_at = tl.where(t_at.to(ACC) > float("-inf"), t_at.to(ACC), sht)
                tb_new = tl.where(shz > mz_old, t_at, tb)
                shift_d = tl.where(ss_old > 0.0, ((mz_old - shz) + (tb_new - tb)) * ss_old, 0.0)
                tb = tb_new
                alpha = tl.exp((mz_old - shz) * inv_tau)
                d = (z - shz)[None, :] - (t - tb[:, None])
                live = valid2 & (eq > 0.0)
                rev = tl.where(alpha > 0.0, alpha * (rev + shift_d), 0.0) + tl.sum(
                    tl.where(live, eq * d, 0.0), axis=1
                )
        lss = tl.log(ss)
        mts = _finish_max(mt, kmask)
        lst = _finish_log_sum(st, kmask)
        if NEED_H:
            h = _finish_entropy(sw, bw, rw, kmask, HIGH)
        else:
            h = tl.zeros([KP], ACC)
        w = _weights(h, fw_ptr, row, N, kidx, kmask, K, WEIGHT_MODE, ACC)
        if HAS_LABELS:
            ls1 = tl.log(s1)
            zy = tl.load(zrow + y).to(ACC)
            ce = (mz - zy) + ls1
        div = tl.zeros([KP], ACC)
        if DIVERGENCE == 1:
            mean_d = tl.where(kmask, rev / ss, 0.0)  # E_q[d_k]
            # log q - log p_k = d_k / tau + (max t_k - b_k) / tau + log S_k - log S, so
            # D_k = E_q[d_k] / tau + (max t_k - b_k) / tau + log S_k - log S: with b_k the
            # teacher at the student's max, every term is small where q is (no offset rounds).
            div = tl.where(kmask, mean_d * inv_tau + ((mts - tb) * inv_tau + lst - lss), 0.0)
        kqm = tl.zeros([KP], ACC)
        if DIVERGENCE == 2:
            # ---- JSD divergence pass: KL(p||m) and KL(q||m) per teacher -----------------------
            for start in range(0, V, BLOCK):
                cols = start + cols0
                cm = cols < V
                valid2 = kmask[:, None] & cm[None, :]
                z = tl.load(zrow + cols, mask=cm, other=float("-inf")).to(ACC)
                t = tl.load(tbase[:, None] + cols[None, :], mask=valid2, other=float("-inf"))
                logq = ((z - mz) * inv_tau - lss)[None, :]
                logp = (t.to(ACC) - mts[:, None]) * inv_tau - lst[:, None]
                q = tl.exp(logq)
                p = tl.exp(logp)
                a = log_beta + logp
                b = log_1mbeta + logq
                mx = tl.maximum(a, b)
                logm = mx + tl.log(tl.exp(a - _safe_max(mx)) + tl.exp(b - _safe_max(mx)))
                # != 0, not > 0: a NaN (a NaN or +inf logit, check_finite off) stays NaN
                kl_q = tl.where(valid2 & (q != 0.0), q * (logq - logm), 0.0)
                kl_p = tl.where(valid2 & (p != 0.0), p * (logp - logm), 0.0)
                kqm += tl.sum(kl_q, axis=1)
                div += beta * tl.sum(kl_p, axis=1) + one_m_beta * tl.sum(kl_q, axis=1)
        # ---- gradient pass (forward KL also accumulates its divergence here) ----------------
        # Forward KL: q sum_k w_k - sum_k w_k p_k, zero for q = p_k however sum_k w_k rounds.
        wsum = tl.sum(w)
        inv_tau2 = inv_tau * inv_tau
        for start in range(0, V, BLOCK):
            cols = start + cols0
            cm = cols < V
            valid2 = kmask[:, None] & cm[None, :]
            z = tl.load(zrow + cols, mask=cm, other=float("-inf")).to(ACC)
            t = tl.load(tbase[:, None] + cols[None, :], mask=valid2, other=float("-inf")).to(ACC)
            logq = (z - mz) * inv_tau - lss
            q = tl.exp(logq)
            if DIVERGENCE != 1:
                logp = (t - mts[:, None]) * inv_tau - lst[:, None]
            if DIVERGENCE == 0:
                p = tl.where(valid2, tl.exp(logp), 0.0)
                # == 0, not > 0: a NaN p (a NaN or +inf teacher logit) makes the loss NaN, as its
                # gradient is (it was dropped from the loss alone)
                div += tl.sum(tl.where(p == 0.0, 0.0, p * (logp - logq[None, :])), axis=1)
                gs = (q * wsum - tl.sum(w[:, None] * p, axis=0)) * inv_tau
            elif DIVERGENCE == 1:
                d = (z - mz)[None, :] - (t - tb[:, None])
                live = valid2 & (q > 0.0)[None, :]
                # a teacher of weight 0 drops out (its d may be inf: no 0 * inf), as on CPU/CUDA
                term = tl.where(live & (w > 0.0)[:, None], w[:, None] * (d - mean_d[:, None]), 0.0)
                gs = tl.where(q > 0.0, q * tl.sum(term, axis=0), 0.0) * inv_tau2
            else:
                a = log_beta + logp
                b = (log_1mbeta + logq)[None, :]
                mx = tl.maximum(a, b)
                logm = mx + tl.log(tl.exp(a - _safe_max(mx)) + tl.exp(b - _safe_max(mx)))
                inner = logq[None, :] - logm - kqm[:, None]
                live = valid2 & (q > 0.0)[None, :] & (w > 0.0)[:, None]
                term = tl.where(live, w[:, None] * inner, 0.0)
                gs = tl.where(q > 0.0, q * tl.sum(term, axis=0), 0.0) * (one_m_beta * inv_tau)
            g = soft_wg * gs
            if HAS_LABELS:
                g += beta_hg * (tl.exp((z - mz) - ls1) - tl.where(cols == y, 1.0, 0.0))
            tl.store(grow + cols, _to_out(g, grad_ptr.dtype.element_ty, INTERPRET), mask=cm)
        loss = soft_w * tl.sum(tl.where(w > 0.0, w * div, 0.0)) + tl.zeros([1], ACC)
        if HAS_LABELS:
            loss += tl.where(beta_h != 0.0, beta_h * ce, 0.0)  # beta_h = 0: no term, no 0 * inf
        tl.store(loss_ptr + one, loss)
        tl.store(w_ptr + kn, w, mask=kmask)
    else:
        _zero_row(grow, V, BLOCK, ACC)
        tl.store(loss_ptr + one, tl.zeros([1], ACC))
        tl.store(w_ptr + kn, tl.zeros([KP], ACC), mask=kmask)
    if HAS_STATUS:
        tl.store(status_ptr + one, status)


# ----------------------------------------------------------------------------------------------
# Teacher-only statistics: weights (MATH.md section 1) and the TeacherStats cache
# ----------------------------------------------------------------------------------------------


@triton.jit
def _teacher_kernel(
    t0, t1, t2, t3, t4, t5, t6, t7, t_stride, w_ptr, h_ptr, stats_ptr, status_ptr,
    N, V, inv_tau_: tl.float64, inv_tw_: tl.float64, lam_: tl.float64,
    K: tl.constexpr, KP: tl.constexpr, BLOCK: tl.constexpr, STACKED: tl.constexpr,
    STATS: tl.constexpr, WEIGHT_MODE: tl.constexpr, CHECK_FINITE: tl.constexpr,
    ACC: tl.constexpr,
):  # fmt: skip
    # STATS=False: weights [K, N] and entropies [K, N] (one pass). STATS=True: the [K, N, 4] rows
    # (lse at tau, lse at tau_w, entropy at tau_w, L_k), two passes.
    row = tl.program_id(0).to(tl.int64)
    one = row + tl.zeros([1], tl.int64)
    HIGH: tl.constexpr = ACC == tl.float64
    inv_tau = _scalar(inv_tau_, ACC)
    inv_tw = _scalar(inv_tw_, ACC)
    lam = _scalar(lam_, ACC)
    kidx = tl.arange(0, KP)
    kmask = kidx < K
    kn = kidx.to(tl.int64) * N + row
    cols0 = tl.arange(0, BLOCK)
    row_off = row * V
    tbase = _teacher_bases(t0, t1, t2, t3, t4, t5, t6, t7, t_stride, kidx, K, STACKED) + row_off
    status = tl.zeros([1], tl.int32)
    mt = tl.full([KP], float("-inf"), ACC)
    st = tl.zeros([KP], ACC)
    mw = tl.full([KP], float("-inf"), ACC)
    sw = tl.zeros([KP], ACC)
    bw = tl.zeros([KP], ACC)
    rw = tl.full([KP], -1.0, ACC)
    for start in range(0, V, BLOCK):
        cols = start + cols0
        valid2 = kmask[:, None] & (cols < V)[None, :]
        t = tl.load(tbase[:, None] + cols[None, :], mask=valid2, other=float("-inf")).to(ACC)
        if CHECK_FINITE:
            status |= _not_finite(t, valid2) * _STATUS_TEACHER
        mw, sw, bw, rw = _teacher_entropy_stats(t, valid2, mw, sw, bw, rw, inv_tw)
        if STATS:
            mt, st, _e, _sh = _online(mt, st, t, valid2, inv_tau)
    h = _finish_entropy(sw, bw, rw, kmask, HIGH)
    if STATS:
        lse_t = _finish_lse(mt, st, kmask, inv_tau)
        lg = _lgamma_terms(tbase, kmask, V, _finish_max(mt, kmask), _finish_log_sum(st, kmask),
                           inv_tau, lam, BLOCK, KP, ACC, HIGH)  # fmt: skip
        lse_w = _finish_lse(mw, sw, kmask, 1.0)
        sbase = stats_ptr + kn * 4
        tl.store(sbase, lse_t, mask=kmask)
        tl.store(sbase + 1, lse_w, mask=kmask)
        tl.store(sbase + 2, h, mask=kmask)
        tl.store(sbase + 3, lg, mask=kmask)
    else:
        w = _weights(h, w_ptr, row, N, kidx, kmask, K, WEIGHT_MODE, ACC)
        tl.store(w_ptr + kn, w, mask=kmask)
        tl.store(h_ptr + kn, h, mask=kmask)
    if CHECK_FINITE:
        tl.store(status_ptr + one, status)


# ----------------------------------------------------------------------------------------------
# Backward: scale the saved gradient rows by the incoming per-row gradient
# ----------------------------------------------------------------------------------------------


@triton.jit
def _scale_grad_kernel(g_ptr, s_ptr, out_ptr, V, BLOCK: tl.constexpr, INTERPRET: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    cm = cols < V
    scale = tl.load(s_ptr + row + tl.zeros([1], tl.int64))
    g = tl.load(g_ptr + row * V + cols, mask=cm, other=0.0).to(s_ptr.dtype.element_ty)
    tl.store(
        out_ptr + row * V + cols, _to_out(g * scale, out_ptr.dtype.element_ty, INTERPRET), mask=cm
    )


# ----------------------------------------------------------------------------------------------
# Host side: launch configuration, teacher pointers, status checks, op registration
# ----------------------------------------------------------------------------------------------


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tl_acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _check_dtype(x: Tensor, name: str) -> None:
    if x.dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        raise TypeError(f"{name} must be float32, float64, bfloat16 or float16, got {x.dtype}")


def _block(v: int, kp: int, elem_bytes: int) -> tuple[int, int]:
    """The row kernels' tile: ``BLOCK`` vocabulary columns per step, and ``num_warps``.

    ``BLOCK``: about 8K live elements across the K + 1 rows of the tile, at least 64 columns.
    ``num_warps``: as many as give each thread 16 contiguous bytes of every row per step (8
    bf16/fp16, 4 float32 or 2 float64 elements: one 128-bit load), and no fewer than keep a
    thread's share of the tile at 40 elements, the measured tile's (many teachers: fewer bytes
    per row then, rather than registers spilled). Measured on an H200
    (``bench/sweep_triton_tiles.py``, N = 8192, V = 128256, bf16, K = 3, forward + backward):
    1024 columns over 4 warps ran forward KL in 14.1 ms and MT-BKD with cached teacher statistics
    in 12.3 ms; over 8 warps (4 elements, 8 bytes per thread: the earlier rule) 30.5 and 27.6 ms.
    Other K and dtypes follow the rule unmeasured (bf16 at K = 1 keeps its measured 2048 / 8).
    """
    cap = max(64, triton.next_power_of_2(max(1, 8192 // (kp + 1))) // 2)
    block = min(triton.next_power_of_2(max(v, 1)), cap)
    per_thread = max(1, 16 // elem_bytes)
    by_bytes = block // (32 * per_thread)
    by_share = triton.next_power_of_2(-(-block * (kp + 1) // (32 * 40)))
    return block, max(1, min(16, max(by_bytes, by_share)))


def _teacher_args(teachers: list[Tensor]) -> tuple[list[Tensor], int, bool]:
    """``(eight pointer tensors, teacher stride in elements, stacked)`` for the kernels.

    Equally spaced views of one allocation (``unbind`` of ``[K, N, V]``) use one base pointer and a
    stride; otherwise up to :data:`MAX_POINTER_TEACHERS` separate pointers; beyond that one stack.
    """
    ts = [t.contiguous() for t in teachers]
    k = len(ts)
    if k == 1:
        return [ts[0]] * MAX_POINTER_TEACHERS, 0, True
    size = ts[0].element_size()
    step = ts[1].data_ptr() - ts[0].data_ptr()
    if step % size == 0 and all(
        t.data_ptr() - ts[0].data_ptr() == i * step
        and t.untyped_storage().data_ptr() == ts[0].untyped_storage().data_ptr()
        for i, t in enumerate(ts)
    ):
        return [ts[0]] * MAX_POINTER_TEACHERS, step // size, True
    if k <= MAX_POINTER_TEACHERS:
        return ts + [ts[0]] * (MAX_POINTER_TEACHERS - k), 0, False
    stacked = torch.stack(ts)
    return [stacked[0]] * MAX_POINTER_TEACHERS, stacked[0].numel(), True


def _check_inputs(student: Tensor, teachers: list[Tensor], labels: Tensor | None) -> Tensor | None:
    """Check the op's inputs; returns the labels contiguous (the kernels index them by row)."""
    _check_dtype(student, "student_logits")
    if student.dim() != 2:
        raise ValueError(f"student_logits must be [N, V], got shape {tuple(student.shape)}")
    if len(teachers) == 0:
        raise ValueError("teacher_logits must hold at least one teacher (K >= 1)")
    for t in teachers:
        if t.shape != student.shape or t.dtype != student.dtype or t.device != student.device:
            raise ValueError(
                "teacher_logits must match student_logits in shape, dtype and device; got "
                f"{tuple(t.shape)} {t.dtype} {t.device} vs {tuple(student.shape)} "
                f"{student.dtype} {student.device}"
            )
    if labels is not None and (labels.shape != student.shape[:1] or labels.dtype != torch.int64):
        raise ValueError(
            f"labels must be int64 of shape [{student.shape[0]}], got {labels.dtype} "
            f"{tuple(labels.shape)}"
        )
    return None if labels is None else labels.contiguous()


def _grad_scale_arg(grad_scale: Tensor | None, student: Tensor) -> Tensor | None:
    """The op's ``grad_scale`` as a contiguous one-element tensor of the accumulation dtype."""
    from mtbkd.ops import check_grad_scale

    check_grad_scale(grad_scale, student)
    if grad_scale is None:
        return None
    return grad_scale.reshape(1).to(_acc_dtype(student.dtype)).contiguous()


def _status_buffer(n: int, device: torch.device, needed: bool, dummy: Tensor) -> Tensor:
    return torch.empty(n, dtype=torch.int32, device=device) if needed else dummy


def _raise_on_status(status: Tensor, v: int, op: str) -> None:
    """Turn the kernels' per-row status bits into an error, without a host sync on CUDA."""
    if status.device.type == "cuda":
        # Queued on the stream: no synchronisation; a failure is a device-side assertion.
        torch._assert_async(
            (status == 0).all(),
            f"mtbkd::{op}: labels out of range [0, {v}) (other than ignore_index) or non-finite "
            "student_logits/teacher_logits in an unmasked row",
        )
        return
    bad = torch.nonzero(status).flatten()
    if bad.numel() == 0:
        return
    row = int(bad[0])
    bits = int(status[row])
    if bits & STATUS_LABEL:
        raise ValueError(f"labels must lie in [0, {v}) or equal ignore_index; row {row} does not")
    if bits & STATUS_STUDENT:
        raise ValueError(f"student_logits contains NaN or inf (row {row})")
    raise ValueError(f"teacher_logits contains NaN or inf (row {row})")


class _on_device:
    """Launch on the tensors' GPU (Triton uses the current device); nothing on CPU."""

    def __init__(self, device: torch.device):
        self.ctx = torch.cuda.device(device) if device.type == "cuda" else None

    def __enter__(self):
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx is not None:
            self.ctx.__exit__(*exc)


@register_impl("mtbkd_loss_fwd", "triton")
def mtbkd_loss_fwd(
    student: Tensor,
    teachers: list[Tensor],
    labels: Tensor | None,
    fixed_weights: Tensor | None,
    teacher_stats: Tensor | None,
    temperature: float,
    concentration: float,
    prior_weight: float,
    hard_label_weight: float,
    weight_mode: int,
    weight_temperature: float,
    ignore_index: int,
    check_finite: bool,
    grad_scale: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Triton ``mtbkd::mtbkd_loss_fwd`` (MATH.md section 2), semantics of the op's docstring."""
    labels = _check_inputs(student, teachers, labels)
    student = student.contiguous()
    n, v = student.shape
    k = len(teachers)
    acc = _acc_dtype(student.dtype)
    dev = student.device
    kp = triton.next_power_of_2(k)
    ptrs, t_stride, stacked = _teacher_args(teachers)
    if weight_mode == WEIGHT_MODES["fixed"]:
        if fixed_weights is None or fixed_weights.shape != (k, n):
            raise ValueError(f"fixed_weights must be [K, N] = [{k}, {n}] with weight_mode fixed")
        fixed_weights = fixed_weights.to(acc).contiguous()
    if teacher_stats is not None:
        if teacher_stats.shape != (k, n, 4):
            raise ValueError(
                f"teacher_stats must be [K, N, 4] = [{k}, {n}, 4], got {tuple(teacher_stats.shape)}"
            )
        teacher_stats = teacher_stats.to(device=dev, dtype=acc).contiguous()
    loss = torch.empty(n, dtype=acc, device=dev)
    grad = torch.empty_like(student)
    w = torch.empty(k, n, dtype=acc, device=dev)
    r = torch.empty_like(w)
    h = torch.empty_like(w)
    prior = torch.empty_like(loss)
    ce = torch.empty_like(loss)
    has_status = labels is not None or check_finite
    status = _status_buffer(n, dev, has_status, loss)
    block, warps = _block(v, kp, student.element_size())
    gs = _grad_scale_arg(grad_scale, student)
    if n > 0:
        with _on_device(dev):
            _mtbkd_fwd_kernel[(n,)](
                student, *ptrs, t_stride,
                labels if labels is not None else student,
                fixed_weights if fixed_weights is not None else student,
                teacher_stats if teacher_stats is not None else student,
                loss, grad, w, r, h, prior, ce, status, gs if gs is not None else loss,
                n, v, ignore_index,
                1.0 / temperature, 1.0 / weight_temperature, float(concentration),
                float(prior_weight), float(hard_label_weight), math.lgamma(v + concentration),
                K=k, KP=kp, BLOCK=block, STACKED=stacked, HAS_LABELS=labels is not None,
                HAS_STATS=teacher_stats is not None, WEIGHT_MODE=int(weight_mode),
                CHECK_FINITE=bool(check_finite), HAS_STATUS=has_status, HAS_GS=gs is not None,
                ACC=_tl_acc(acc),
                INTERPRET=_interpreting(),
                num_warps=warps,
            )  # fmt: skip
        if has_status:
            _raise_on_status(status, v, "mtbkd_loss_fwd")
    return loss, grad, w, r, h, prior, ce


@register_impl("multi_teacher_kd_fwd", "triton")
def multi_teacher_kd_fwd(
    student: Tensor,
    teachers: list[Tensor],
    labels: Tensor | None,
    fixed_weights: Tensor | None,
    divergence: int,
    beta: float,
    temperature: float,
    weight_mode: int,
    weight_temperature: float,
    hard_label_weight: float,
    soft_label_weight: float,
    soft_scale: float,
    ignore_index: int,
    check_finite: bool,
    grad_scale: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Triton ``mtbkd::multi_teacher_kd_fwd`` (MATH.md section 3)."""
    labels = _check_inputs(student, teachers, labels)
    if divergence not in DIVERGENCES.values():
        raise ValueError(f"divergence must be one of {sorted(DIVERGENCES.values())}")
    if divergence == DIVERGENCES["jsd"]:
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must lie in [0, 1] for jsd, got {beta}")
        # The endpoints are forward and reverse KL exactly (log 0 never reaches the kernel).
        if beta == 0.0:
            divergence = DIVERGENCES["forward_kl"]
        elif beta == 1.0:
            divergence = DIVERGENCES["reverse_kl"]
    student = student.contiguous()
    n, v = student.shape
    k = len(teachers)
    acc = _acc_dtype(student.dtype)
    dev = student.device
    kp = triton.next_power_of_2(k)
    ptrs, t_stride, stacked = _teacher_args(teachers)
    if weight_mode == WEIGHT_MODES["fixed"]:
        if fixed_weights is None or fixed_weights.shape != (k, n):
            raise ValueError(f"fixed_weights must be [K, N] = [{k}, {n}] with weight_mode fixed")
        fixed_weights = fixed_weights.to(acc).contiguous()
    loss = torch.empty(n, dtype=acc, device=dev)
    grad = torch.empty_like(student)
    w = torch.empty(k, n, dtype=acc, device=dev)
    has_status = labels is not None or check_finite
    status = _status_buffer(n, dev, has_status, loss)
    block, warps = _block(v, kp, student.element_size())
    jsd = divergence == DIVERGENCES["jsd"]
    gs = _grad_scale_arg(grad_scale, student)
    if n > 0:
        with _on_device(dev):
            _kd_fwd_kernel[(n,)](
                student, *ptrs, t_stride,
                labels if labels is not None else student,
                fixed_weights if fixed_weights is not None else student,
                loss, grad, w, status, gs if gs is not None else loss, n, v, ignore_index,
                1.0 / temperature, 1.0 / weight_temperature, float(beta), 1.0 - float(beta),
                math.log(beta) if jsd else 0.0, math.log1p(-beta) if jsd else 0.0,
                float(hard_label_weight), float(soft_label_weight) * float(soft_scale),
                K=k, KP=kp, BLOCK=block, STACKED=stacked, HAS_LABELS=labels is not None,
                WEIGHT_MODE=int(weight_mode), DIVERGENCE=int(divergence),
                CHECK_FINITE=bool(check_finite), HAS_STATUS=has_status, HAS_GS=gs is not None,
                ACC=_tl_acc(acc),
                INTERPRET=_interpreting(),
                num_warps=warps,
            )  # fmt: skip
        if has_status:
            _raise_on_status(status, v, "multi_teacher_kd_fwd")
    return loss, grad, w


def _teacher_launch(teachers, stats, inv_tau, inv_tw, lam, weight_mode, check_finite):
    for i, t in enumerate(teachers):
        _check_dtype(t, "teacher_logits")
        if t.dim() != 2 or t.shape != teachers[0].shape or t.dtype != teachers[0].dtype:
            raise ValueError(f"teacher_logits[{i}] must be [N, V] like teacher_logits[0]")
    n, v = teachers[0].shape
    k = len(teachers)
    acc = _acc_dtype(teachers[0].dtype)
    dev = teachers[0].device
    kp = triton.next_power_of_2(k)
    ptrs, t_stride, stacked = _teacher_args(teachers)
    if stats:
        out = torch.empty(k, n, 4, dtype=acc, device=dev)
        w = h = out
    else:
        w = torch.empty(k, n, dtype=acc, device=dev)
        h = torch.empty_like(w)
        out = w
    status = _status_buffer(n, dev, check_finite, out)
    block, warps = _block(v, kp, teachers[0].element_size())
    if n > 0:
        with _on_device(dev):
            _teacher_kernel[(n,)](
                *ptrs, t_stride, w, h, out, status, n, v, inv_tau, inv_tw, lam,
                K=k, KP=kp, BLOCK=block, STACKED=stacked, STATS=stats,
                WEIGHT_MODE=int(weight_mode), CHECK_FINITE=bool(check_finite),
                ACC=_tl_acc(acc), num_warps=warps,
            )  # fmt: skip
        if check_finite:
            _raise_on_status(status, v, "teacher_stats" if stats else "teacher_weights")
    return out if stats else (w, h)


@register_impl("teacher_weights", "triton")
def teacher_weights(
    teachers: list[Tensor], weight_mode: int, weight_temperature: float, check_finite: bool
) -> tuple[Tensor, Tensor]:
    """Triton ``mtbkd::teacher_weights``: entropy or uniform weights and entropies ``[K, N]``."""
    if weight_mode not in (WEIGHT_MODES["entropy"], WEIGHT_MODES["uniform"]):
        raise ValueError("weight_mode must be entropy or uniform for teacher_weights")
    return _teacher_launch(teachers, False, 1.0, 1.0 / weight_temperature, 1.0, weight_mode,
                           check_finite)  # fmt: skip


@register_impl("teacher_stats", "triton")
def teacher_stats(
    teachers: list[Tensor],
    temperature: float,
    concentration: float,
    weight_temperature: float,
    check_finite: bool,
) -> Tensor:
    """Triton ``mtbkd::teacher_stats``: ``[K, N, 4]`` (:data:`mtbkd.ops.TEACHER_STAT_COLUMNS`)."""
    return _teacher_launch(teachers, True, 1.0 / temperature, 1.0 / weight_temperature,
                           float(concentration), 0, check_finite)  # fmt: skip


@register_impl("scale_grad", "triton")
def scale_grad(grad: Tensor, grad_rows: Tensor) -> Tensor:
    """Triton ``mtbkd::scale_grad``: ``grad * grad_rows[:, None]`` in ``grad``'s accumulation
    dtype (fp32, fp64 for float64), rounded once to ``grad.dtype``."""
    _check_dtype(grad, "grad")
    if grad.dim() != 2 or grad_rows.shape != grad.shape[:1]:
        raise ValueError(f"grad_rows must be [{grad.shape[0]}] for grad {tuple(grad.shape)}")
    if not grad_rows.is_floating_point():
        raise TypeError(f"grad_rows must be floating point, got {grad_rows.dtype}")
    grad = grad.contiguous()
    # The kernel multiplies in grad_rows' dtype: a bfloat16 (or float64 for a float32 grad)
    # grad_rows would change the arithmetic, as the other backends do not.
    grad_rows = grad_rows.to(_acc_dtype(grad.dtype)).contiguous()
    out = torch.empty_like(grad)
    n, v = grad.shape
    if n and v:
        block = min(4096, triton.next_power_of_2(v))
        with _on_device(grad.device):
            _scale_grad_kernel[(n, triton.cdiv(v, block))](
                grad,
                grad_rows,
                out,
                v,
                BLOCK=block,
                INTERPRET=_interpreting(),
                num_warps=8 if block >= 2048 else 4,
            )
    return out
