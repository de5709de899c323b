// Fused CPU kernels of the multi-teacher losses (MATH.md sections 1-3).
//
// One row (example / token) at a time, rows spread over threads with at::parallel_for. A row's
// K + 1 logit vectors (V = 32000: 128 KB each in float32) are read from memory once; every later
// pass works on L2-resident data. Everything is at::vec::Vectorized with masked tail lanes.
//
//   pass 1, statistics: one sweep over blocks of kBlock classes (L1-resident). Per block, the
//     maxima of z and each t_k, then the exponential sums and cross terms of common.h relative to
//     them, merged into the row's running sums (blocked online softmax). The NaN/inf check is
//     folded in: (x - max) * 0 accumulates NaN for any non-finite x. MT-BKD and forward KL also
//     keep the exponentials they computed (ExpCache) for the passes below.
//   pass 2 (MT-BKD without cached teacher statistics): L_k = sum lgamma(1 + lam p_kc) from the
//     cached exponentials; (JSD): the per-teacher KLs, which need log m_kc per class.
//   last pass: the gradient, written once (rounded once to the storage dtype).
//
// Accumulation in A = float (float32 / bf16 / fp16 inputs) or double (float64 stays float64).
#include "cpu/vec_ops.h"  // first: selects the SIMD capability before any ATen header

#include "cpu/loss_kernels.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <mutex>
#include <type_traits>
#include <vector>

namespace mtbkd {
namespace cpu {
namespace {

// Classes per statistics block: (K + 1) blocks of 4 KB (float) sit in L1 between the max sweep
// and the sum sweep. A multiple of every vector width.
constexpr int64_t kBlock = 1024;

template <class A>
constexpr A kInf = std::numeric_limits<A>::infinity();

// Logits of -inf (a class a teacher rules out) work with check_finite off: offsets and the
// linear factors x - offset are clamped at -kFar, where every exponential is exactly 0, so the
// products exp(.) * (x - offset) are 0 instead of 0 * -inf = NaN. The NaN/inf check looks at
// the unclamped values.
template <class A>
constexpr A kFar = A(1e30);

// ---- loads, stores, conversions -------------------------------------------------------------

template <class A>
inline Vec<A> load(const A* p, int64_t n) {
  return n >= Vec<A>::size() ? Vec<A>::loadu(p) : Vec<A>::loadu(p, n);
}

// Zero the lanes >= n (the tail of a row).
template <class A>
inline Vec<A> keep(const Vec<A>& v, int64_t n) {
  return n >= Vec<A>::size() ? v : Vec<A>::set(Vec<A>(A(0)), v, n);
}

template <class A>
inline void store(A* p, const Vec<A>& v, int64_t n) {
  if (n >= Vec<A>::size())
    v.store(p);
  else
    v.store(p, n);
}

// Reduced-precision rows are widened once per row into scratch (they then stay in L2 for the
// later passes); float / double rows are used in place.
template <class T>
void widen(const T* src, float* dst, int64_t n) {
  using VT = Vec<T>;
  int64_t i = 0;
  for (; i + VT::size() <= n; i += VT::size()) {
    auto lo_hi = at::vec::convert_to_float<T>(VT::loadu(src + i));
    std::get<0>(lo_hi).store(dst + i);
    std::get<1>(lo_hi).store(dst + i + Vec<float>::size());
  }
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

template <class T, class A>
const A* acc_row(const T* src, int64_t n, A* scratch) {
  if constexpr (std::is_same_v<T, A>) {
    return src;
  } else {
    widen(src, scratch, n);
    return scratch;
  }
}

// The gradient is produced in A; reduced-precision outputs are rounded once at the end.
template <class T, class A>
A* grad_target(T* out_row, A* scratch) {
  if constexpr (std::is_same_v<T, A>)
    return out_row;
  else
    return scratch;
}

template <class T, class A>
void finish_grad(T* out_row, const A* g, int64_t n) {
  if constexpr (!std::is_same_v<T, A>) at::vec::convert(g, out_row, n);
}

// ---- error bookkeeping (reported by ops.cpp after the parallel loop) -------------------------

struct StatusCollector {
  std::atomic<int64_t> label_row{std::numeric_limits<int64_t>::max()};
  std::atomic<int64_t> label_value{0};
  std::atomic<int64_t> student_row{std::numeric_limits<int64_t>::max()};
  std::atomic<int64_t> teacher_row{std::numeric_limits<int64_t>::max()};
  std::mutex label_mutex;

  static void keep_min(std::atomic<int64_t>& slot, int64_t row) {
    int64_t cur = slot.load(std::memory_order_relaxed);
    while (row < cur && !slot.compare_exchange_weak(cur, row, std::memory_order_relaxed)) {
    }
  }
  // row and value change together (under label_mutex: an error path): two threads could
  // otherwise pair the first bad row with the other's value
  void bad_label(int64_t row, int64_t value) {
    std::lock_guard<std::mutex> lock(label_mutex);
    if (row < label_row.load()) {
      label_row.store(row);
      label_value.store(value);
    }
  }
  void nonfinite(int64_t row, int which) {
    if (which & 1) keep_min(student_row, row);
    if (which & 2) keep_min(teacher_row, row);
  }
  KernelStatus result() const {
    KernelStatus s;
    const int64_t none = std::numeric_limits<int64_t>::max();
    if (label_row.load() != none) {
      s.bad_label_row = label_row.load();
      s.bad_label_value = label_value.load();
    }
    if (student_row.load() != none) s.nonfinite_student_row = student_row.load();
    if (teacher_row.load() != none) s.nonfinite_teacher_row = teacher_row.load();
    return s;
  }
};

// Rows per parallel task: enough work per task to hide scheduling (~32K elements).
inline int64_t grain_rows(int64_t V, int K) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, V * (K + 1)));
}

// ---- per-thread scratch -----------------------------------------------------------------------

template <class T, class A>
struct RowScratch {
  std::vector<A> conv;  // (K + 1) * V widened rows (reduced-precision inputs only)
  std::vector<A> gbuf;  // V: gradient in A (reduced precision) / JSD's partial gradient
  std::vector<A> dbuf, ebuf, pbuf;  // one block each: z - m, exp((z - m) / tau), JSD partials
  // Exponential cache (see ExpCache): (K + 1) * V exponentials and (K + 1) * blocks offsets.
  std::vector<A> cache, blk_off;
  std::vector<const A*> rows;  // K teacher rows in A
  std::vector<TeacherAcc<A>> ta, tb;
  std::vector<A> off, logA, H, w, L, ell, r, aux1, aux2;

  RowScratch(int K, int64_t V, bool with_cache) {
    if (with_cache) {
      cache.resize(static_cast<size_t>((K + 1) * V));
      blk_off.resize(static_cast<size_t>((K + 1) * ((V + kBlock - 1) / kBlock)));
    }
    if (!std::is_same_v<T, A>) conv.resize(static_cast<size_t>((K + 1) * V));
    if (!std::is_same_v<T, A>) gbuf.resize(static_cast<size_t>(V));
    dbuf.resize(kBlock);
    ebuf.resize(kBlock);
    pbuf.resize(kBlock);
    rows.resize(K);
    ta.resize(K);
    tb.resize(K);
    for (auto* v : {&off, &logA, &H, &w, &L, &ell, &r, &aux1, &aux2}) v->assign(K, A(0));
  }
};

// ---- pass 1: row statistics -------------------------------------------------------------------

struct StatNeeds {
  bool s1 = false;      // student normaliser at temperature 1 (cross-entropy when tau != 1)
  bool rev = false;     // E_k (reverse KL)
  bool f = false;       // F_k (forward KL, or the entropy when tau_w == tau)
  bool w = false;       // Aw_k, Dw_k at a separate tau_w (entropy)
  bool h = false;       // the entropy is wanted: R_k (from F) or Rw_k (from Aw, Dw) too
  bool cached = false;  // teacher offsets fixed to the given values: no teacher max sweep
  bool check = false;   // NaN/inf detection
  // exp(d) = exp(d / tau)^2 when tau = 2, and exp(u / tau_w) = exp(u / tau)^2 when tau = 2 tau_w
  // (the paper's tau = 2, tau_w = 1): a multiply instead of an exponential.
  bool s1_square = false;
  bool w_square = false;
};

// Exponential cache: the statistics pass keeps exp((x - block offset) / tau) of the student
// (row 0) and every teacher (rows 1..K), with each block's offset, so that later passes get
// q^tau and p_k by one multiply with a per-block factor instead of an exponential:
//   exp((x_c - final offset) / tau) = cached_c * exp((block offset - final offset) / tau).
// (K + 1) * V values per thread (512 KB for V = 32000, K = 3 in float32): L2-resident.
template <class A>
struct ExpCache {
  A* e = nullptr;    // [(K + 1) * V]
  A* off = nullptr;  // [(K + 1) * blocks]
  int64_t blocks = 0;
};

// Fills s and ta (see common.h for the meaning of every sum); fills the exponential cache when
// cache.e is set. Returns a bit mask of non-finite inputs seen (1: student, 2: some teacher)
// when needs.check.
template <class A>
int row_stats(const A* z, const A* const* t, int K, int64_t V, A it, A itw, const StatNeeds& nd,
              const A* fixed_offsets, StudentAcc<A>& s, TeacherAcc<A>* ta, TeacherAcc<A>* tb,
              A* dbuf, A* ebuf_block, const ExpCache<A>& cache) {
  using VA = Vec<A>;
  constexpr int64_t W = VA::size();
  const VA vit(it), vitw(itw), zero(A(0)), one(A(1)), ninf(-kInf<A>);
  VA bad_s(A(0)), bad_t(A(0));
  s = empty_student<A>();
  for (int k = 0; k < K; ++k) ta[k] = empty_teacher<A>();

  for (int64_t c0 = 0; c0 < V; c0 += kBlock) {
    const int64_t len = std::min(kBlock, V - c0);
    const int64_t blk = c0 / kBlock;
    const A* zb = z + c0;
    A* ebuf = cache.e != nullptr ? cache.e + c0 : ebuf_block;
    VA vmax = ninf;
    for (int64_t i = 0; i < len; i += W) {
      const int64_t n = len - i;
      VA x = load(zb + i, n);
      if (n < W) x = VA::set(ninf, x, n);
      vmax = at::vec::maximum(vmax, x);
    }
    // the block's maximum is its frame, however low (a row of finfo.min logits: clamping it at
    // -kFar had made every exponential 0 and the row NaN); a block of -inf alone is an empty
    // frame (-inf, which the merges take as such) computed against -kFar
    const A bmax = hmax(vmax);
    StudentAcc<A> sb{bmax, A(0), A(0)};
    const A zoff = bmax == -kInf<A> ? -kFar<A> : bmax;
    if (cache.e != nullptr) cache.off[blk] = bmax;
    // reverse KL: the column of the block's maximum (the teachers' b_k are read there); a
    // vector compare finds its vector, a scalar scan its lane (0 if the block is all -inf)
    int64_t top = 0;
    if (nd.rev) {
      const VA vm(zoff);
      int64_t i = 0;
      while (i < len && (load(zb + i, len - i) == vm).zero_mask() == (1 << W) - 1) i += W;
      if (i < len) {
        top = i;
        while (top < len - 1 && zb[top] != sb.m) ++top;
      }
    }
    {
      const VA vm(zoff), vfar(-kFar<A>);
      VA aS(A(0)), aS1(A(0));
      for (int64_t i = 0; i < len; i += W) {
        const int64_t n = len - i;
        const VA zraw = load(zb + i, n);
        const VA d = at::vec::maximum(zraw - vm, vfar);
        const VA e = keep(vexp(d * vit), n);
        d.store(dbuf + i);
        store(ebuf + i, e, n);
        aS += e;
        if (nd.s1) aS1 += nd.s1_square ? e * e : keep(vexp(d), n);
        // the finiteness check is on the logits themselves: x - max of finite values such as
        // 3e38 and -3e38 overflows to -inf, which is not an input error
        if (nd.check) bad_s = at::vec::fmadd(zraw, zero, bad_s);
      }
      sb.S = hsum(aS);
      sb.S1 = hsum(aS1);
    }
    for (int k = 0; k < K; ++k) {
      const A* tk = t[k] + c0;
      A o;
      if (nd.cached) {
        o = fixed_offsets[k];
      } else {
        VA tmax = ninf;
        for (int64_t i = 0; i < len; i += W) {
          const int64_t n = len - i;
          VA x = load(tk + i, n);
          if (n < W) x = VA::set(ninf, x, n);
          tmax = at::vec::maximum(tmax, x);
        }
        o = hmax(tmax);  // (as the student's: -inf for a block of -inf alone)
      }
      const A toff = o == -kInf<A> ? -kFar<A> : o;
      const VA vo(toff), vfar(-kFar<A>);
      const A b = tk[top] == -kInf<A> ? -kFar<A> : tk[top];
      const VA vb(b);
      A* ek = nullptr;
      if (cache.e != nullptr) {
        ek = cache.e + (k + 1) * V + c0;
        cache.off[(k + 1) * cache.blocks + blk] = o;
      }
      VA aA(A(0)), aB(A(0)), aF(A(0)), aE(A(0)), aAw(A(0)), aDw(A(0)), aR(A(0)), aN(A(0));
      const bool rest = nd.h && !nd.cached;  // R_k / Rw_k: the sums without one top entry
      for (int64_t i = 0; i < len; i += W) {
        const int64_t n = len - i;
        const VA traw = load(tk + i, n);
        const VA u = at::vec::maximum(traw - vo, vfar);
        const VA e = keep(vexp(u * vit), n);
        if (ek != nullptr) store(ek + i, e, n);
        aA += e;
        aB = at::vec::fmadd(e, VA::loadu(dbuf + i), aB);
        if (nd.f) aF = at::vec::fmadd(e, u, aF);
        if (nd.rev) {
          // x = d - (t - b): 0 at the block maximum's column, relative (small) elsewhere
          const VA x = VA::loadu(dbuf + i) - at::vec::maximum(traw - vb, vfar);
          aE = at::vec::fmadd(load(ebuf + i, n), x, aE);
        }
        VA ew = e;
        if (nd.w) {
          ew = nd.w_square ? e * e : keep(vexp_denormal(u * vitw), n);
          aAw += ew;
          aDw = at::vec::fmadd(ew, u, aDw);
        }
        if (rest) {
          // the block maximum's entries (u = 0, e = 1) are counted apart from the others
          const VA at_top = u == zero;
          aN += keep(VA::blendv(zero, one, at_top), n);
          aR += VA::blendv(ew, zero, at_top);
        }
        if (nd.check) bad_t = at::vec::fmadd(traw, zero, bad_t);
      }
      // R / Rw: the block's sum without one of its top entries (-1 for a block of -inf)
      const A blk_rest = hsum(aR) + (hsum(aN) - A(1));
      const A Ab = hsum(aA), Awb = hsum(aAw);
      tb[k] = TeacherAcc<A>{o, Ab, hsum(aB), hsum(aF), hsum(aE), Awb, hsum(aDw), b,
                            rest && !nd.w ? blk_rest : Ab - A(1),
                            rest && nd.w ? blk_rest : Awb - A(1)};
    }
    merge_row_stats(s, ta, sb, tb, K, it, itw);
  }
  int bad = 0;
  if (nd.check) {
    if (!std::isfinite(hsum(bad_s))) bad |= 1;
    if (!std::isfinite(hsum(bad_t))) bad |= 2;
  }
  return bad;
}

// Statistics of one teacher alone (teacher_weights / teacher_stats): offset o = max t, A and F at
// tau (if need_tau), Aw and Dw at tau_w (if need_w). Returns false on a non-finite input.
template <class A>
bool teacher_only_stats(const A* t, int64_t V, A it, A itw, bool need_tau, bool need_w, bool check,
                        TeacherAcc<A>& acc) {
  using VA = Vec<A>;
  constexpr int64_t W = VA::size();
  const VA vit(it), vitw(itw), zero(A(0)), one(A(1)), ninf(-kInf<A>);
  VA bad(A(0));
  acc = empty_teacher<A>();
  for (int64_t c0 = 0; c0 < V; c0 += kBlock) {
    const int64_t len = std::min(kBlock, V - c0);
    const A* tb = t + c0;
    VA tmax = ninf;
    for (int64_t i = 0; i < len; i += W) {
      const int64_t n = len - i;
      VA x = load(tb + i, n);
      if (n < W) x = VA::set(ninf, x, n);
      tmax = at::vec::maximum(tmax, x);
    }
    const A o = hmax(tmax);  // -inf for a block of -inf alone (an empty frame), as above
    const VA vo(o == -kInf<A> ? -kFar<A> : o), vfar(-kFar<A>);
    VA aA(A(0)), aF(A(0)), aAw(A(0)), aDw(A(0)), aR(A(0)), aRw(A(0)), aN(A(0));
    for (int64_t i = 0; i < len; i += W) {
      const int64_t n = len - i;
      const VA traw = load(tb + i, n);
      const VA u = at::vec::maximum(traw - vo, vfar);
      const VA at_top = u == zero;  // R, Rw: the block maximum's entries counted apart
      aN += keep(VA::blendv(zero, one, at_top), n);
      if (need_tau) {
        const VA e = keep(vexp(u * vit), n);
        aA += e;
        aF = at::vec::fmadd(e, u, aF);
        aR += VA::blendv(e, zero, at_top);
      }
      if (need_w) {
        const VA ew = keep(vexp_denormal(u * vitw), n);
        aAw += ew;
        aDw = at::vec::fmadd(ew, u, aDw);
        aRw += VA::blendv(ew, zero, at_top);
      }
      if (check) bad = at::vec::fmadd(traw, zero, bad);
    }
    const A extra = hsum(aN) - A(1);  // -1 for a block of -inf
    TeacherAcc<A> blk{o,    hsum(aA),  A(0), hsum(aF), A(0), hsum(aAw), hsum(aDw), A(0),
                      need_tau ? hsum(aR) + extra : A(-1), need_w ? hsum(aRw) + extra : A(-1)};
    const bool keep_acc = !(o > acc.o);
    const A m = keep_acc ? acc.o : o;
    shift_teacher(acc, m, it, itw);
    shift_teacher(blk, m, it, itw);
    merge_rest(acc, blk, keep_acc);
    acc.A += blk.A;
    acc.F += blk.F;
    acc.Aw += blk.Aw;
    acc.Dw += blk.Dw;
  }
  return !check || std::isfinite(hsum(bad));
}

// The entropies the loss kernels take from their sums at tau (tau_w == tau) miss the float32
// exponentials below -88 (exp_f32 flushes them; the hot loop stays one exponential a logit). Only
// a nearly one-hot teacher's entropy is small enough for that to matter (a denormal ~1e-37 reads
// 0 and, all of them 0, the 1/K rule would fire): rows whose entropies sum below
// V K 1e-28 take them again from the teachers alone, keeping denormals (teacher_only_stats).
template <class A>
void refine_tiny_entropies(const A* const* rows, int K, int64_t V, A it, A* H) {
  if (!std::is_same<A, float>::value) return;  // float64's exp keeps the whole range
  A sum = A(0);
  for (int k = 0; k < K; ++k) sum += H[k];
  if (!(sum < static_cast<A>(V) * static_cast<A>(K) * A(1e-28))) return;  // also NaN: skip
  for (int k = 0; k < K; ++k) {
    TeacherAcc<A> a;
    teacher_only_stats(rows[k], V, it, it, false, true, false, a);
    H[k] = entropy_from_sums(a.Aw, a.Rw, a.Dw, it);
  }
}

// L = sum_c lgamma(1 + lam p_c), p_c = exp((t_c - o) / tau - logA).
template <class A>
A lgamma_sum(const A* t, int64_t V, A o, A it, A logA, A lam) {
  using VA = Vec<A>;
  constexpr int64_t W = VA::size();
  const VA vo(o), vit(it), voff(-logA), vlam(lam);
  VA acc(A(0));
  for (int64_t c = 0; c < V; c += W) {
    const int64_t n = V - c;
    const VA u = load(t + c, n) - vo;
    const VA x = vexp(at::vec::fmadd(u, vit, voff)) * vlam;
    acc += keep(vlgamma1p(x), n);
  }
  return hsum(acc);
}

// The same from the exponential cache: lam p_c = e_c * lam exp((o_b - o) / tau) / A per block.
template <class A>
A lgamma_sum_cached(const A* e, const A* blk_off, int64_t V, A o, A it, A Asum, A lam) {
  using VA = Vec<A>;
  constexpr int64_t W = VA::size();
  VA acc(A(0));
  for (int64_t c0 = 0; c0 < V; c0 += kBlock) {
    const int64_t len = std::min(kBlock, V - c0);
    const VA f(lam * std::exp((blk_off[c0 / kBlock] - o) * it) / Asum);
    for (int64_t i = 0; i < len; i += W) {
      const int64_t n = len - i;
      acc += keep(vlgamma1p(load(e + c0 + i, n) * f), n);
    }
  }
  return hsum(acc);
}

// Gradient of the forward-KL-shaped losses (MT-BKD and forward KL) from the exponential cache:
//   g_c = cq q^tau_c - sum_k cp_k p_kc + beta_h q_c
// with q^tau_c = es_c exp((m_b - m) / tau) / S and p_kc = e_kc exp((o_kb - o_k) / tau) / A_k; the
// cross-entropy's q_c = exp(z_c - m) / S1 comes from es_c too when tau is 1 or 2.
template <class A>
void grad_from_cache(const ExpCache<A>& cache, int K, int64_t V, A it, const StudentAcc<A>& s,
                     A S1, const TeacherAcc<A>* ta, A cq, const A* cp, bool with_ce, A bh,
                     A tau, const A* z, A* fb, A* g) {
  using VA = Vec<A>;
  constexpr int64_t W = VA::size();
  // q_c = es_c^2 exp(m_b - m) / S1 when tau = 2, es_c exp(m_b - m) / S1 when tau = 1 (S1 = S)
  const int ce_mode = tau == A(1) ? 1 : tau == A(2) ? 2 : 0;
  const VA vm(s.m), vbh_s1(bh / S1);
  for (int64_t c0 = 0; c0 < V; c0 += kBlock) {
    const int64_t len = std::min(kBlock, V - c0);
    const int64_t blk = c0 / kBlock;
    const A ms = cache.off[blk] - s.m;
    const VA a(cq * std::exp(ms * it) / s.S);
    const VA fq(bh * std::exp(ms) / S1);
    for (int k = 0; k < K; ++k) {
      const A ok = cache.off[(k + 1) * cache.blocks + blk];
      fb[k] = cp[k] == A(0) ? A(0) : cp[k] * std::exp((ok - ta[k].o) * it) / ta[k].A;
    }
    for (int64_t i = 0; i < len; i += W) {
      const int64_t n = len - i, c = c0 + i;
      const VA es = load(cache.e + c, n);
      VA acc = es * a;
      for (int k = 0; k < K; ++k) {
        if (fb[k] == A(0)) continue;
        acc -= load(cache.e + (k + 1) * V + c, n) * VA(fb[k]);
      }
      if (with_ce) {
        if (ce_mode == 1)
          acc = at::vec::fmadd(es, fq, acc);
        else if (ce_mode == 2)
          acc = at::vec::fmadd(es * es, fq, acc);
        else
          acc = at::vec::fmadd(vexp(load(z + c, n) - vm), vbh_s1, acc);
      }
      store(g + c, acc, n);
    }
  }
}

// Weights of one row into w[0..K): entropy (from H), uniform, or the user's row renormalised.
template <class A>
void row_weights(int mode, const A* H, int K, const A* fixed, int64_t N, int64_t i, A* w) {
  if (mode == 0) {
    entropy_weights(H, K, w);
  } else if (mode == 1) {
    for (int k = 0; k < K; ++k) w[k] = A(1) / A(K);
  } else {
    A total = A(0);
    for (int k = 0; k < K; ++k) total += fixed[k * N + i];
    for (int k = 0; k < K; ++k) w[k] = fixed[k * N + i] / total;
  }
}

// ---- per-row set-up shared by the loss rows ---------------------------------------------------

// The row's label into y (-1 without labels). False when the row is ignored (ignore_index) or
// its label is outside [0, V) (recorded in st): the caller then zeroes the row's outputs.
template <class T, class A>
bool row_label(const LossParams<T, A>& p, int64_t i, StatusCollector& st, int64_t& y) {
  y = -1;
  if (p.labels == nullptr) return true;
  y = p.labels[i];
  if (y == p.ignore_index) return false;
  if (y < 0 || y >= p.V) {
    st.bad_label(i, y);
    return false;
  }
  return true;
}

// The student's row in the accumulation type A (returned) and each teacher's (ws.rows): the
// inputs themselves when T is A, widened copies in ws.conv otherwise.
template <class T, class A>
const A* load_rows(const LossParams<T, A>& p, int64_t i, RowScratch<T, A>& ws) {
  const int64_t V = p.V;
  for (int k = 0; k < p.K; ++k)
    ws.rows[k] = acc_row(p.teachers[k] + i * V, V, ws.conv.data() + (k + 1) * V);
  return acc_row(p.student + i * V, V, ws.conv.data());
}

// ---- MT-BKD (MATH.md section 2) ---------------------------------------------------------------
//
// Per row, with q^tau = softmax(z / tau), p_k = softmax(t_k / tau):
//   C_k = lam sum_c p_kc log q^tau_c = lam (E_{p_k}[z - m] / tau - log S)
//   L_k = sum_c lgamma(1 + lam p_kc)            (pass 2, or the cache's lgamma_sum column)
//   ell_k = log w_k + C_k - L_k,  prior = -lgamma(V + lam) - logsumexp_k ell_k
//   r_k = softmax_k ell_k,        ce = -(z_y - m - log S1)
// d prior / dz_c = -sum_k r_k dC_k/dz_c = -(lam / tau) sum_k r_k (p_kc - q^tau_c)
//                = (lam / tau) (q^tau_c - sum_k r_k p_kc)        (using sum_c p_kc = 1)
// so grad = beta_h (q - onehot(y)) + beta_p (lam / tau) (q^tau - sum_k r_k p_k). The mixture's
// weights enter only through r_k. Passes 2 and 3 read q^tau and p_k from the exponential cache
// (one multiply per class and teacher), so the row takes K + 1 exponentials per class in all
// (K more for the entropy when tau_w is neither tau nor tau / 2).
template <class T, class A>
void mtbkd_row(const LossParams<T, A>& p, int64_t i, A lgamma_v_lam, RowScratch<T, A>& ws,
               StatusCollector& st) {
  const int K = p.K;
  const int64_t V = p.V, N = p.N;
  T* grow = p.grad + i * V;
  auto zero_row = [&]() {
    std::fill(grow, grow + V, T(0));
    p.loss[i] = p.prior[i] = p.ce[i] = A(0);
    for (int k = 0; k < K; ++k)
      p.weights[k * N + i] = p.resp[k * N + i] = p.entropy[k * N + i] = A(0);
  };
  int64_t y = -1;
  if (!row_label(p, i, st, y)) return zero_row();
  const A* z = load_rows(p, i, ws);

  const A tau = static_cast<A>(p.temperature);
  const A it = A(1) / tau;
  const A itw = A(1) / static_cast<A>(p.weight_temperature);
  const A lam = static_cast<A>(p.concentration);
  const bool cached = p.teacher_stats != nullptr;
  const bool sep_w = !cached && p.weight_temperature != p.temperature;
  StatNeeds nd;
  nd.s1 = p.labels != nullptr && p.temperature != 1.0;
  nd.f = !cached && !sep_w;
  nd.w = sep_w;
  nd.h = !cached;
  nd.cached = cached;
  nd.check = p.check_finite;
  nd.s1_square = p.temperature == 2.0;
  nd.w_square = p.temperature == 2.0 * p.weight_temperature;
  const A* stats = p.teacher_stats;
  if (cached)
    for (int k = 0; k < K; ++k) ws.off[k] = tau * stats[(k * N + i) * 4 + 0];

  const ExpCache<A> cache{ws.cache.data(), ws.blk_off.data(), (V + kBlock - 1) / kBlock};
  StudentAcc<A> s;
  const int bad = row_stats(z, ws.rows.data(), K, V, it, itw, nd, ws.off.data(), s, ws.ta.data(),
                            ws.tb.data(), ws.dbuf.data(), ws.ebuf.data(), cache);
  if (bad) {
    st.nonfinite(i, bad);
    return zero_row();
  }
  // check_finite off: a NaN or +inf logit, or a student or teacher row of -inf alone, leaves no
  // distribution: NaN, as kd_row and the Triton and CUDA kernels give (with one teacher no
  // weight carried the NaN, and the prior made the loss +inf)
  bool empty = !(s.S > A(0)) || !(s.S < kInf<A>);
  for (int k = 0; k < K; ++k) empty = empty || !(ws.ta[k].A > A(0)) || !(ws.ta[k].A < kInf<A>);
  if (empty) {
    const A nan = std::numeric_limits<A>::quiet_NaN();
    std::fill(grow, grow + V, static_cast<T>(nan));
    p.loss[i] = p.prior[i] = p.ce[i] = nan;
    for (int k = 0; k < K; ++k)
      p.weights[k * N + i] = p.resp[k * N + i] = p.entropy[k * N + i] = nan;
    return;
  }
  const A logS = std::log(s.S);
  const A logS1 = nd.s1 ? std::log(s.S1) : logS;
  for (int k = 0; k < K; ++k) {
    const TeacherAcc<A>& a = ws.ta[k];
    ws.logA[k] = std::log(a.A);
    if (cached) {
      ws.H[k] = stats[(k * N + i) * 4 + 2];
      ws.L[k] = stats[(k * N + i) * 4 + 3];
    } else {
      ws.H[k] = sep_w ? entropy_from_sums(a.Aw, a.Rw, a.Dw, itw)
                      : entropy_from_sums(a.A, a.R, a.F, it);
      ws.L[k] = lgamma_sum_cached(cache.e + (k + 1) * V, cache.off + (k + 1) * cache.blocks, V,
                                  a.o, it, a.A, lam);
    }
  }
  if (!cached && !sep_w) refine_tiny_entropies(ws.rows.data(), K, V, it, ws.H.data());
  row_weights(p.weight_mode, ws.H.data(), K, p.fixed_weights, N, i, ws.w.data());
  for (int k = 0; k < K; ++k) {
    const A cross = lam * (ws.ta[k].B / ws.ta[k].A * it - logS);
    ws.ell[k] = (ws.w[k] > A(0) ? std::log(ws.w[k]) : -kInf<A>) + cross - ws.L[k];
  }
  const A lse = logsumexp_softmax(ws.ell.data(), K, ws.r.data());
  const A prior = -lgamma_v_lam - lse;
  const bool has_y = p.labels != nullptr;
  const A ce = has_y ? -((z[y] - s.m) - logS1) : A(0);
  const A bh = static_cast<A>(p.hard_label_weight);
  const A bp = static_cast<A>(p.prior_weight);
  // beta_h = 0: no term (a -inf student logit at the label, check_finite off, has ce = inf and
  // 0 * inf = NaN), as in the KD kernel and the CUDA / Triton kernels
  p.loss[i] = (has_y && bh != A(0) ? bh * ce : A(0)) + bp * prior;
  p.prior[i] = prior;
  p.ce[i] = ce;
  for (int k = 0; k < K; ++k) {
    p.weights[k * N + i] = ws.w[k];
    p.resp[k * N + i] = ws.r[k];
    p.entropy[k * N + i] = ws.H[k];
  }

  // Gradient pass: cq q^tau - sum_k (cq r_k) p_k + beta_h q, cq = beta_p lam / tau; both
  // coefficients carry grad_scale (gs).
  const A gs = static_cast<A>(p.grad_scale);
  const A cq = bp * lam * it * gs;
  const A bhg = bh * gs;
  for (int k = 0; k < K; ++k) ws.aux1[k] = cq * ws.r[k];
  A* g = grad_target(grow, ws.gbuf.data());
  grad_from_cache(cache, K, V, it, s, nd.s1 ? s.S1 : s.S, ws.ta.data(), cq, ws.aux1.data(),
                  has_y && bh != A(0), bhg, tau, z, ws.aux2.data(), g);
  if (has_y) g[y] -= bhg;
  finish_grad(grow, g, V);
}

// ---- weighted-sum KD (MATH.md section 3) --------------------------------------------------------
//
// log q_c = (z_c - m) / tau - log S,  log p_kc = (t_kc - o_k) / tau - log A_k.
// Forward KL: D_k = sum p (log p - log q) = (E_p[t - o] - E_p[z - m]) / tau - log A_k + log S;
//   d D_k / dz = (q - p_k) / tau, so with soft coefficient c = beta_s s(tau):
//   grad_soft = (c / tau) (sum_k w_k q - sum_k w_k p_k).
// Reverse KL: D_k = sum q (log q - log p_k) = (E_q[z - m] - E_q[t - o]) / tau - log S + log A_k;
//   d D_k / dz_c = (1 / tau) q_c (g_c - sum_j q_j g_j) with g = log q - log p_k, and
//   sum_j q_j g_j = D_k, so grad_soft = (c / tau) q (sum_k w_k (log q - log p_k - D_k)).
// Generalised JSD, 0 < beta < 1, m_k = beta p_k + (1 - beta) q:
//   D_k = beta KL(p_k || m_k) + (1 - beta) KL(q || m_k);
//   dD_k / dq_c = -beta (1 - beta) p_c / m_c + (1 - beta)(log q_c + 1 - log m_c)
//                 - (1 - beta)^2 q_c / m_c = (1 - beta) log(q_c / m_c)  (m = beta p + (1 - beta) q)
//   then the softmax Jacobian: d/dz_c = (1 / tau) q_c (g_c - sum_j q_j g_j), sum_j q_j g_j =
//   (1 - beta) KL(q || m_k). Pass 2 accumulates both KLs and writes the first part,
//   (c (1 - beta) / tau) q_c sum_k w_k log(q_c / m_kc); pass 3 subtracts
//   (c (1 - beta) / tau) q_c sum_k w_k KL(q || m_k) (and adds the cross-entropy part).
//   beta = 0 is forward KL and beta = 1 reverse KL exactly (special-cased, no 0 * log 0).
template <class T, class A>
void kd_row(const LossParams<T, A>& p, int64_t i, int div, RowScratch<T, A>& ws,
            StatusCollector& st) {
  using VA = Vec<A>;
  constexpr int64_t W = VA::size();
  const int K = p.K;
  const int64_t V = p.V, N = p.N;
  T* grow = p.grad + i * V;
  auto zero_row = [&]() {
    std::fill(grow, grow + V, T(0));
    p.loss[i] = A(0);
    for (int k = 0; k < K; ++k) p.weights[k * N + i] = A(0);
  };
  int64_t y = -1;
  if (!row_label(p, i, st, y)) return zero_row();
  const A* z = load_rows(p, i, ws);

  const A tau = static_cast<A>(p.temperature);
  const A it = A(1) / tau;
  const A itw = A(1) / static_cast<A>(p.weight_temperature);
  const A bh = static_cast<A>(p.hard_label_weight);
  const bool has_y = p.labels != nullptr;
  const bool with_ce = has_y && bh != A(0);
  const bool need_h = p.weight_mode == 0 && K >= 2;
  const bool sep_w = need_h && p.weight_temperature != p.temperature;
  StatNeeds nd;
  nd.s1 = with_ce && p.temperature != 1.0;
  nd.rev = div == 1;
  nd.f = div == 0 || (need_h && !sep_w);
  nd.w = sep_w;
  nd.h = need_h;
  nd.check = p.check_finite;
  nd.s1_square = p.temperature == 2.0;
  nd.w_square = p.temperature == 2.0 * p.weight_temperature;

  // forward KL reuses the statistics pass's exponentials in its gradient pass
  const ExpCache<A> cache = div == 0 ? ExpCache<A>{ws.cache.data(), ws.blk_off.data(),
                                                   (V + kBlock - 1) / kBlock}
                                     : ExpCache<A>{};
  StudentAcc<A> s;
  const int bad = row_stats(z, ws.rows.data(), K, V, it, itw, nd, static_cast<const A*>(nullptr),
                            s, ws.ta.data(), ws.tb.data(), ws.dbuf.data(), ws.ebuf.data(), cache);
  if (bad) {
    st.nonfinite(i, bad);
    return zero_row();
  }
  // check_finite off: a student or teacher row of -inf alone rules out every class and has no
  // distribution. NaN, as the Triton and CUDA kernels give (log 0 made the loss -inf here, which
  // reads as the best loss there is).
  bool empty = !(s.S > A(0));
  for (int k = 0; k < K; ++k) empty = empty || !(ws.ta[k].A > A(0));
  if (empty) {
    const A nan = std::numeric_limits<A>::quiet_NaN();
    std::fill(grow, grow + V, static_cast<T>(nan));
    p.loss[i] = nan;
    for (int k = 0; k < K; ++k) p.weights[k * N + i] = nan;
    return;
  }
  const A logS = std::log(s.S);
  const A logS1 = nd.s1 ? std::log(s.S1) : logS;
  for (int k = 0; k < K; ++k) {
    const TeacherAcc<A>& a = ws.ta[k];
    ws.logA[k] = std::log(a.A);
    if (need_h)
      ws.H[k] = sep_w ? entropy_from_sums(a.Aw, a.Rw, a.Dw, itw)
                      : entropy_from_sums(a.A, a.R, a.F, it);
  }
  if (need_h && !sep_w) refine_tiny_entropies(ws.rows.data(), K, V, it, ws.H.data());
  row_weights(p.weight_mode, ws.H.data(), K, p.fixed_weights, N, i, ws.w.data());
  A wsum = A(0);
  for (int k = 0; k < K; ++k) wsum += ws.w[k];
  const A ce = with_ce ? -((z[y] - s.m) - logS1) : A(0);
  const A c = static_cast<A>(p.soft_coef);
  // The gradient's coefficients carry grad_scale (gs): cg for the soft part, bhg for the hard.
  const A gs = static_cast<A>(p.grad_scale);
  const A cg = c * gs, bhg = bh * gs;
  A* g = grad_target(grow, ws.gbuf.data());
  const VA vm(s.m), vit(it), vnlogS(-logS), vinvS(A(1) / s.S),
      vinvS1(A(1) / (nd.s1 ? s.S1 : s.S)), vbh(bhg), vfar(-kFar<A>);
  // cross-entropy part of the gradient, beta_h q (q = exp(d) / S1), from e = exp(d / tau)
  auto ce_grad = [&](const VA& e, const VA& d) {
    const VA e1 = !nd.s1 ? e : nd.s1_square ? e * e : vexp(d);
    return e1 * vinvS1 * vbh;
  };
  A soft = A(0);

  if (div == 0) {
    for (int k = 0; k < K; ++k) {
      const TeacherAcc<A>& a = ws.ta[k];
      ws.L[k] = (a.F - a.B) / a.A * it - ws.logA[k] + logS;  // D_k
      soft += ws.w[k] * ws.L[k];
      ws.aux1[k] = cg * it * ws.w[k];
    }
    grad_from_cache(cache, K, V, it, s, nd.s1 ? s.S1 : s.S, ws.ta.data(), cg * it * wsum,
                    ws.aux1.data(), with_ce, bhg, tau, z, ws.aux2.data(), g);
  } else if (div == 1) {
    for (int k = 0; k < K; ++k) {
      const TeacherAcc<A>& a = ws.ta[k];
      // log q - log p_k = (x_k - (b_k - o_k)) / tau - log S + log A_k, x_k = (z - m) - (t_k - b_k)
      ws.aux1[k] = a.E / s.S;  // E_q[x_k]
      ws.L[k] = (ws.aux1[k] - (a.b - a.o)) * it - logS + ws.logA[k];  // D_k
      soft += ws.w[k] * ws.L[k];
    }
    // dD_k/dz_c = q_c (log q_c - log p_kc - D_k) / tau = q_c (x_kc - E_q[x_k]) / tau^2 (the
    // normalisers cancel exactly), summed as q_c (wsum d - sum_k w_k u_k - sum_k w_k E_q[x_k]) /
    // tau^2 with u_k = t_k - b_k: d and u_k are both 0 at the student's top column and small
    // elsewhere, so a confident student's gradient is not a difference of two large numbers
    A mean = A(0);
    for (int k = 0; k < K; ++k)
      if (ws.w[k] > A(0)) mean += ws.w[k] * ws.aux1[k];
    const VA vcs(cg * it), vwit(wsum * it), vmean(-mean * it);
    for (int64_t cc = 0; cc < V; cc += W) {
      const int64_t n = V - cc;
      const VA d = at::vec::maximum(load(z + cc, n) - vm, vfar);
      VA inner = at::vec::fmadd(d, vwit, vmean);
      for (int k = 0; k < K; ++k) {
        if (!(ws.w[k] > A(0))) continue;
        const VA u = at::vec::maximum(load(ws.rows[k] + cc, n) - VA(ws.ta[k].b), vfar);
        inner = at::vec::fmadd(u, VA(-ws.w[k] * it), inner);
      }
      const VA e = vexp(d * vit);
      VA acc = e * vinvS * inner * vcs;
      if (with_ce) acc += ce_grad(e, d);
      store(g + cc, acc, n);
    }
  } else {
    const A beta = static_cast<A>(p.beta);
    // 1 - beta comes from the host in double: formed here in float32 from a rounded beta it is
    // 1.3 % off at beta = 1 - 1e-6, and it scales KL(q || m) and the whole gradient.
    const A omb = static_cast<A>(p.one_m_beta);
    const VA vb(beta), v1b(omb), vtiny(std::numeric_limits<A>::min());
    const VA vcj(cg * omb * it);
    for (int k = 0; k < K; ++k) ws.aux1[k] = ws.aux2[k] = A(0);  // KL(p||m), KL(q||m)
    // Pass 2: the per-teacher KLs and the first part of the gradient (into g, in A).
    for (int64_t c0 = 0; c0 < V; c0 += kBlock) {
      const int64_t len = std::min(kBlock, V - c0);
      std::fill(ws.pbuf.begin(), ws.pbuf.end(), A(0));
      // log q and q of the block, shared by every teacher (the stats pass is done with dbuf/ebuf)
      A* lqb = ws.dbuf.data();
      A* qb = ws.ebuf.data();
      for (int64_t i2 = 0; i2 < len; i2 += W) {
        const int64_t n = len - i2;
        const VA d = at::vec::maximum(load(z + c0 + i2, n) - vm, vfar);
        const VA lq = at::vec::fmadd(d, vit, vnlogS);
        lq.store(lqb + i2);
        keep(vexp(lq), n).store(qb + i2);
      }
      for (int k = 0; k < K; ++k) {
        if (!(ws.w[k] > A(0))) continue;
        const VA vo(ws.ta[k].o), vnlogA(-ws.logA[k]), vw(ws.w[k]);
        VA kpm(A(0)), kqm(A(0));
        for (int64_t i2 = 0; i2 < len; i2 += W) {
          const int64_t n = len - i2, cc = c0 + i2;
          const VA lq = VA::loadu(lqb + i2);
          const VA q = VA::loadu(qb + i2);
          const VA u = at::vec::maximum(load(ws.rows[k] + cc, n) - vo, vfar);
          const VA lp = at::vec::fmadd(u, vit, vnlogA);
          const VA pk = keep(vexp(lp), n);
          const VA lm = vlog(at::vec::maximum(at::vec::fmadd(vb, pk, v1b * q), vtiny));
          kpm = at::vec::fmadd(pk, lp - lm, kpm);
          kqm = at::vec::fmadd(q, lq - lm, kqm);
          // sum_k w_k log(q / m_k) for this block, in an L1 buffer
          at::vec::fmadd(vw, lq - lm, VA::loadu(ws.pbuf.data() + i2)).store(ws.pbuf.data() + i2);
        }
        ws.aux1[k] += hsum(kpm);
        ws.aux2[k] += hsum(kqm);
      }
      for (int64_t i2 = 0; i2 < len; i2 += W) {
        const int64_t n = len - i2;
        store(g + c0 + i2, VA::loadu(qb + i2) * VA::loadu(ws.pbuf.data() + i2) * vcj, n);
      }
    }
    A wkqm = A(0);
    for (int k = 0; k < K; ++k) {
      if (!(ws.w[k] > A(0))) continue;
      ws.L[k] = beta * ws.aux1[k] + omb * ws.aux2[k];
      soft += ws.w[k] * ws.L[k];
      wkqm += ws.w[k] * ws.aux2[k];
    }
    // Pass 3.
    const VA vsub(cg * omb * it * wkqm);
    for (int64_t cc = 0; cc < V; cc += W) {
      const int64_t n = V - cc;
      const VA d = load(z + cc, n) - vm;
      const VA e = vexp(d * vit);
      VA acc = load(g + cc, n) - vsub * e * vinvS;
      if (with_ce) acc += ce_grad(e, d);
      store(g + cc, acc, n);
    }
  }
  if (with_ce) g[y] -= bhg;
  finish_grad(grow, g, V);
  p.loss[i] = bh * ce + c * soft;
  for (int k = 0; k < K; ++k) p.weights[k * N + i] = ws.w[k];
}

}  // namespace

// ---- entry points -------------------------------------------------------------------------------

template <class T, class A>
KernelStatus mtbkd_loss_kernel(const LossParams<T, A>& p) {
  StatusCollector st;
  const A lgamma_v_lam = static_cast<A>(std::lgamma(static_cast<double>(p.V) + p.concentration));
  at::parallel_for(0, p.N, grain_rows(p.V, p.K), [&](int64_t begin, int64_t end) {
    RowScratch<T, A> ws(p.K, p.V, true);
    for (int64_t i = begin; i < end; ++i) mtbkd_row(p, i, lgamma_v_lam, ws, st);
  });
  return st.result();
}

template <class T, class A>
KernelStatus multi_teacher_kd_kernel(const LossParams<T, A>& p) {
  StatusCollector st;
  int div = p.divergence;
  if (div == 2 && p.beta == 0.0) div = 0;
  if (div == 2 && p.beta == 1.0) div = 1;
  at::parallel_for(0, p.N, grain_rows(p.V, p.K), [&](int64_t begin, int64_t end) {
    RowScratch<T, A> ws(p.K, p.V, div == 0);
    for (int64_t i = begin; i < end; ++i) kd_row(p, i, div, ws, st);
  });
  return st.result();
}

template <class T, class A>
KernelStatus teacher_weights_kernel(int64_t N, int64_t V, int K, const T* const* teachers,
                                    int weight_mode, double weight_temperature, bool check_finite,
                                    A* weights, A* entropy) {
  StatusCollector st;
  const A itw = A(1) / static_cast<A>(weight_temperature);
  at::parallel_for(0, N, grain_rows(V, K - 1), [&](int64_t begin, int64_t end) {
    std::vector<A> conv(std::is_same_v<T, A> ? 0 : V), H(K), w(K);
    for (int64_t i = begin; i < end; ++i) {
      bool ok = true;
      for (int k = 0; k < K; ++k) {
        const A* t = acc_row(teachers[k] + i * V, V, conv.data());
        TeacherAcc<A> a;
        ok = teacher_only_stats(t, V, itw, itw, false, true, check_finite, a) && ok;
        H[k] = entropy_from_sums(a.Aw, a.Rw, a.Dw, itw);
      }
      if (!ok) st.nonfinite(i, 2);
      row_weights(weight_mode, H.data(), K, static_cast<const A*>(nullptr), N, i, w.data());
      for (int k = 0; k < K; ++k) {
        weights[k * N + i] = w[k];
        entropy[k * N + i] = H[k];
      }
    }
  });
  return st.result();
}

template <class T, class A>
KernelStatus teacher_stats_kernel(int64_t N, int64_t V, int K, const T* const* teachers,
                                  double temperature, double concentration,
                                  double weight_temperature, bool check_finite, A* stats) {
  StatusCollector st;
  const A it = A(1) / static_cast<A>(temperature);
  const A itw = A(1) / static_cast<A>(weight_temperature);
  const A lam = static_cast<A>(concentration);
  at::parallel_for(0, N, grain_rows(V, K - 1), [&](int64_t begin, int64_t end) {
    std::vector<A> conv(std::is_same_v<T, A> ? 0 : V);
    for (int64_t i = begin; i < end; ++i) {
      bool ok = true;
      for (int k = 0; k < K; ++k) {
        const A* t = acc_row(teachers[k] + i * V, V, conv.data());
        TeacherAcc<A> a;
        ok = teacher_only_stats(t, V, it, itw, true, true, check_finite, a) && ok;
        const A logA = std::log(a.A);
        A* out = stats + (k * N + i) * 4;
        out[0] = a.o * it + logA;
        out[1] = a.o * itw + std::log(a.Aw);
        out[2] = entropy_from_sums(a.Aw, a.Rw, a.Dw, itw);
        out[3] = lgamma_sum(t, V, a.o, it, logA, lam);
      }
      if (!ok) st.nonfinite(i, 2);
    }
  });
  return st.result();
}

template <class T, class A>
void scale_grad_kernel(int64_t N, int64_t V, const T* grad, const A* rows, T* out) {
  constexpr int64_t kPiece = 512;
  at::parallel_for(0, N, std::max<int64_t>(1, 65536 / std::max<int64_t>(1, V)),
                   [&](int64_t begin, int64_t end) {
                     A buf[kPiece];
                     for (int64_t i = begin; i < end; ++i) {
                       const Vec<A> s(rows[i]);
                       for (int64_t c0 = 0; c0 < V; c0 += kPiece) {
                         const int64_t len = std::min(kPiece, V - c0);
                         const A* src = acc_row(grad + i * V + c0, len, buf);
                         A* dst = grad_target(out + i * V + c0, buf);
                         for (int64_t c = 0; c < len; c += Vec<A>::size()) {
                           const int64_t n = len - c;
                           store(dst + c, load(src + c, n) * s, n);
                         }
                         finish_grad(out + i * V + c0, dst, len);
                       }
                     }
                   });
}

template <class A>
void lgamma1p_kernel(int64_t n, const A* x, A* out) {
  for (int64_t c = 0; c < n; c += Vec<A>::size()) {
    const int64_t m = n - c;
    store(out + c, vlgamma1p(load(x + c, m)), m);
  }
}

// ---- explicit instantiations ------------------------------------------------------------------

#define MTBKD_INSTANTIATE(T, A)                                                                   \
  template KernelStatus mtbkd_loss_kernel<T, A>(const LossParams<T, A>&);                         \
  template KernelStatus multi_teacher_kd_kernel<T, A>(const LossParams<T, A>&);                   \
  template KernelStatus teacher_weights_kernel<T, A>(int64_t, int64_t, int, const T* const*, int, \
                                                     double, bool, A*, A*);                       \
  template KernelStatus teacher_stats_kernel<T, A>(int64_t, int64_t, int, const T* const*,        \
                                                   double, double, double, bool, A*);             \
  template void scale_grad_kernel<T, A>(int64_t, int64_t, const T*, const A*, T*);

MTBKD_INSTANTIATE(float, float)
MTBKD_INSTANTIATE(double, double)
MTBKD_INSTANTIATE(c10::BFloat16, float)
MTBKD_INSTANTIATE(c10::Half, float)
#undef MTBKD_INSTANTIATE

template void lgamma1p_kernel<float>(int64_t, const float*, float*);
template void lgamma1p_kernel<double>(int64_t, const double*, double*);

}  // namespace cpu
}  // namespace mtbkd
