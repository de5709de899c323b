// Standalone tests (no torch) of the framework-free kernel code: lgamma1p against a float64
// reference, the blocked online-softmax merge against direct sums, and the per-row weight and
// mixture algebra. Run by ctest (CMakeLists.txt); exits non-zero on the first failed check.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "common.h"
#include "lgamma1p.h"

namespace {

int g_failures = 0;

void check(bool ok, const char* what, double got, double want) {
  if (!ok) {
    std::printf("FAIL %s: got %.17g want %.17g\n", what, got, want);
    ++g_failures;
  }
}

// lgamma(1 + x) in float64 without the rounding of 1 + x for tiny x (series to x^4).
double lgamma1p_ref(double x) {
  if (x < 1e-4) {
    const double g = 0.57721566490153286061, z2 = 1.6449340668482264365,
                 z3 = 1.2020569031595942854, z4 = 1.0823232337111381915;
    return x * (-g + x * (z2 / 2 - x * (z3 / 3 - x * z4 / 4)));
  }
  return std::lgamma(1.0 + x);
}

void test_lgamma1p() {
  // Relative error in float32 ulps of the result, with an absolute floor near the zero at x = 1
  // (where lgamma(1 + x) ~ 0.42 (x - 1) and x itself is only known to half an ulp).
  double worst = 0;
  std::vector<double> xs;
  for (int e = -30; e <= 30; ++e)
    for (int j = 0; j < 200; ++j) xs.push_back(std::ldexp(1.0 + j / 200.0, e));
  for (int j = 0; j <= 20000; ++j) xs.push_back(j * 1e-3);  // dense over [0, 20]
  xs.push_back(0.0);
  xs.push_back(1.0);
  xs.push_back(9.0);
  xs.push_back(8.9995);
  xs.push_back(8.99999905);
  for (double xd : xs) {
    const float x = static_cast<float>(xd);
    const double want = lgamma1p_ref(static_cast<double>(x));
    const double got = mtbkd::lgamma1p(x);
    const double tol = 4.0 * 6e-8 * std::fabs(want) + 1e-45 +
                       (std::fabs(x - 1.0) < 1e-3 ? 0.5 * 6e-8 * 0.43 : 0.0);
    if (!(std::fabs(got - want) <= tol)) {
      check(false, "lgamma1p(float)", got, want);
      std::printf("  at x = %.9g\n", x);
      if (g_failures > 10) return;
    }
    if (want != 0) worst = std::fmax(worst, std::fabs(got - want) / std::fabs(want));
  }
  std::printf("lgamma1p<float>: worst relative error %.3g over %zu points\n", worst, xs.size());
  check(mtbkd::lgamma1p(0.0f) == 0.0f, "lgamma1p(0) == 0", mtbkd::lgamma1p(0.0f), 0);
  check(mtbkd::lgamma1p(1.0f) == 0.0f, "lgamma1p(1) == 0", mtbkd::lgamma1p(1.0f), 0);
  check(std::isinf(mtbkd::lgamma1p(INFINITY)), "lgamma1p(inf) == inf", mtbkd::lgamma1p(INFINITY),
        INFINITY);
  check(std::isnan(mtbkd::lgamma1p(NAN)), "lgamma1p(nan) is nan", mtbkd::lgamma1p(NAN), NAN);
}

void test_exp_f32() {
  double worst = 0;
  for (int j = 0; j <= 400000; ++j) {
    const float x = static_cast<float>(-87.0 + 175.3 * j / 400000.0);
    const double want = std::exp(static_cast<double>(x));
    const double rel = std::fabs(mtbkd::exp_f32(x) - want) / want;
    worst = std::fmax(worst, rel);
  }
  std::printf("exp_f32: worst relative error %.3g\n", worst);
  check(worst < 1.5e-7, "exp_f32 relative error", worst, 1.5e-7);
  check(mtbkd::exp_f32(0.0f) == 1.0f, "exp_f32(0) == 1", mtbkd::exp_f32(0.0f), 1.0);
  check(std::isnan(mtbkd::exp_f32(NAN)), "exp_f32(nan)", mtbkd::exp_f32(NAN), NAN);
  check(mtbkd::exp_f32(-INFINITY) == 0.0f, "exp_f32(-inf) == 0", mtbkd::exp_f32(-INFINITY), 0);
  check(mtbkd::exp_f32(-88.1f) == 0.0f, "exp_f32(-88.1) == 0", mtbkd::exp_f32(-88.1f), 0);
}

// Blocked online statistics, merged block by block, against two-pass direct sums.
void test_online_merge() {
  std::mt19937 gen(0);
  std::normal_distribution<double> nd(0.0, 4.0);
  const int V = 1000, K = 3, block = 37;
  const double tau = 2.0, tau_w = 0.7, it = 1 / tau, itw = 1 / tau_w;
  std::vector<double> z(V), t(K * V);
  for (auto& v : z) v = nd(gen);
  for (auto& v : t) v = nd(gen) + 3.0;
  z[V - 1] = 40;  // a late maximum forces rescaling of everything
  t[2 * V - 1] = 45;

  mtbkd::StudentAcc<double> s = mtbkd::empty_student<double>();
  std::vector<mtbkd::TeacherAcc<double>> ta(K, mtbkd::empty_teacher<double>());
  for (int c0 = 0; c0 < V; c0 += block) {
    const int c1 = c0 + block < V ? c0 + block : V;
    mtbkd::StudentAcc<double> sb = mtbkd::empty_student<double>();
    std::vector<mtbkd::TeacherAcc<double>> tb(K, mtbkd::empty_teacher<double>());
    int top = c0;
    for (int c = c0; c < c1; ++c)
      if (z[c] > sb.m) sb.m = z[top = c];
    for (int k = 0; k < K; ++k) tb[k].b = t[k * V + top];
    for (int k = 0; k < K; ++k)
      for (int c = c0; c < c1; ++c) tb[k].o = std::fmax(tb[k].o, t[k * V + c]);
    for (int c = c0; c < c1; ++c) {
      const double d = z[c] - sb.m, es = std::exp(d * it);
      sb.S += es;
      sb.S1 += std::exp(d);
      for (int k = 0; k < K; ++k) {
        const double u = t[k * V + c] - tb[k].o, e = std::exp(u * it), ew = std::exp(u * itw);
        tb[k].A += e;
        tb[k].B += e * d;
        tb[k].F += e * u;
        tb[k].E += es * (d - (t[k * V + c] - tb[k].b));
        tb[k].Aw += ew;
        tb[k].Dw += ew * u;
        tb[k].R += u < 0 ? e : 1.0;  // starts at -1: the block's sum without one top entry
        tb[k].Rw += u < 0 ? ew : 1.0;
      }
    }
    mtbkd::merge_row_stats(s, ta.data(), sb, tb.data(), K, it, itw);
  }
  // Direct: expectations under the normalised distributions.
  double zmax = -INFINITY;
  int ztop = 0;
  for (int c = 0; c < V; ++c)
    if (z[c] > zmax) zmax = z[ztop = c];
  double S = 0, S1 = 0;
  for (double v : z) {
    S += std::exp((v - zmax) * it);
    S1 += std::exp(v - zmax);
  }
  const double tol = 1e-11;
  check(std::fabs(s.m - zmax) == 0, "student max", s.m, zmax);
  check(std::fabs(s.S / S - 1) < tol, "student S", s.S, S);
  check(std::fabs(s.S1 / S1 - 1) < tol, "student S1", s.S1, S1);
  for (int k = 0; k < K; ++k) {
    double tmax = -INFINITY, A = 0, Aw = 0;
    for (int c = 0; c < V; ++c) tmax = std::fmax(tmax, t[k * V + c]);
    for (int c = 0; c < V; ++c) {
      A += std::exp((t[k * V + c] - tmax) * it);
      Aw += std::exp((t[k * V + c] - tmax) * itw);
    }
    double Epz = 0, Ept = 0, Eqd = 0, H = 0;
    for (int c = 0; c < V; ++c) {
      const double p = std::exp((t[k * V + c] - tmax) * it) / A;
      const double pw = std::exp((t[k * V + c] - tmax) * itw) / Aw;
      const double q = std::exp((z[c] - zmax) * it) / S;
      Epz += p * z[c];
      Ept += p * t[k * V + c];
      Eqd += q * ((z[c] - zmax) - (t[k * V + c] - t[k * V + ztop]));
      if (pw > 0) H -= pw * std::log(pw);
    }
    const auto& a = ta[k];
    check(a.o == tmax, "teacher max", a.o, tmax);
    check(std::fabs(a.A / A - 1) < tol, "teacher A", a.A, A);
    check(std::fabs(a.Aw / Aw - 1) < tol, "teacher Aw", a.Aw, Aw);
    check(std::fabs(a.B / a.A + s.m - Epz) < tol * 40, "E_p[z]", a.B / a.A + s.m, Epz);
    check(std::fabs(a.F / a.A + a.o - Ept) < tol * 40, "E_p[t]", a.F / a.A + a.o, Ept);
    check(a.b == t[k * V + ztop], "teacher logit at the student's maximum", a.b, t[k * V + ztop]);
    check(std::fabs(a.E / s.S - Eqd) < tol * 40, "E_q[x]", a.E / s.S, Eqd);
    check(std::fabs(a.R - (A - 1)) < tol * A, "teacher R", a.R, A - 1);
    check(std::fabs(a.Rw - (Aw - 1)) < tol * Aw, "teacher Rw", a.Rw, Aw - 1);
    const double Hk = mtbkd::entropy_from_sums(a.Aw, a.Rw, a.Dw, itw);
    check(std::fabs(Hk - H) < 1e-10, "entropy", Hk, H);
  }
}

void test_row_algebra() {
  const double H[3] = {1.0, 2.0, 3.0};
  double w[3];
  mtbkd::entropy_weights(H, 3, w);
  // (1 - H/6) / 2
  check(std::fabs(w[0] - 5.0 / 12) < 1e-15, "entropy weight 0", w[0], 5.0 / 12);
  check(std::fabs(w[2] - 0.25) < 1e-15, "entropy weight 2", w[2], 0.25);
  const double H0[2] = {0.0, 0.0};
  double w0[2];
  mtbkd::entropy_weights(H0, 2, w0);
  check(w0[0] == 0.5 && w0[1] == 0.5, "one-hot teachers -> uniform", w0[0], 0.5);
  const double ell[3] = {-INFINITY, std::log(0.25), std::log(0.75)};
  double r[3];
  const double lse = mtbkd::logsumexp_softmax(ell, 3, r);
  check(std::fabs(lse) < 1e-15, "logsumexp with -inf", lse, 0);
  check(r[0] == 0 && std::fabs(r[2] - 0.75) < 1e-15, "responsibilities", r[2], 0.75);
}

}  // namespace

int main() {
  test_lgamma1p();
  test_exp_f32();
  test_online_merge();
  test_row_algebra();
  if (g_failures) {
    std::printf("%d check(s) failed\n", g_failures);
    return EXIT_FAILURE;
  }
  std::printf("all checks passed\n");
  return EXIT_SUCCESS;
}
