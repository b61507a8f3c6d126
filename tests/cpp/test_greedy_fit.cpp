// Catch2 tests of the torch-free greedy fit (csrc/kernels/greedy_fit.h): the exact step against
// brute force, the nesting and storage rules of fit_row, edge cases, and the fast solver's margin.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "catch_compat.h"
#include "kernels/greedy_fit.h"

namespace {

using mpq::kernels::fit_row;
using mpq::kernels::greedy_step_exact;
using mpq::kernels::greedy_step_fast;
using mpq::kernels::GreedyFitOptions;
using mpq::kernels::GreedyFitWorkspace;

int grid_max(int bits) { return (1 << (bits - 1)) - 1; }

double sq_norm(const std::vector<double>& r) {
  double s = 0.0;
  for (double x : r) s += x * x;
  return s;
}

double step_error(const std::vector<double>& r, double a, const std::vector<int8_t>& q) {
  double e = 0.0;
  for (size_t i = 0; i < r.size(); ++i) {
    const double d = r[i] - a * q[i];
    e += d * d;
  }
  return e;
}

// Error of the codes clip(round(r / a)) at their own least-squares scale.
double error_at_scale(const std::vector<double>& r, double a, int K) {
  double rq = 0.0, qq = 0.0;
  for (double x : r) {
    const double q = std::nearbyint(std::clamp(x / a, -double(K), double(K)));
    rq += x * q;
    qq += q * q;
  }
  const double best = (qq > 0.0 && rq > 0.0) ? rq * rq / qq : 0.0;
  return sq_norm(r) - best;
}

// Brute force: a dense log scan of a over [max|r| / (K + 1/2) / 1e3, 2 max|r|], each candidate
// evaluated exactly; every optimum is the least-squares scale of some rounding, so a fine scan
// of the roundings finds it on small vectors.
double brute_force_error(const std::vector<double>& r, int bits, int n_scan = 200000) {
  const int K = grid_max(bits);
  double m = 0.0;
  for (double x : r) m = std::max(m, std::fabs(x));
  if (m == 0.0) return 0.0;
  const double lo = m / (K + 0.5) / 1e3, hi = 2.0 * m;
  double best = sq_norm(r);
  for (int g = 0; g < n_scan; ++g) {
    const double a = lo * std::pow(hi / lo, double(g) / (n_scan - 1));
    best = std::min(best, error_at_scale(r, a, K));
  }
  return best;
}

// Every q in {-K..K}^n at its least-squares scale (tiny n only).
double enumerate_error(const std::vector<double>& r, int bits) {
  const int K = grid_max(bits);
  const size_t n = r.size();
  std::vector<int> q(n, -K);
  double best = sq_norm(r);
  while (true) {
    double rq = 0.0, qq = 0.0;
    for (size_t i = 0; i < n; ++i) {
      rq += r[i] * q[i];
      qq += double(q[i]) * q[i];
    }
    if (qq > 0.0 && rq > 0.0) best = std::min(best, sq_norm(r) - rq * rq / qq);
    size_t i = 0;
    while (i < n && q[i] == K) q[i++] = -K;
    if (i == n) break;
    ++q[i];
  }
  return best;
}

// Random draws from the raw mt19937_64 stream (whose output the standard fixes), not from
// <random>'s distributions (which differ between standard libraries): the measured margins
// below then hold for the same data everywhere.
double uniform01(std::mt19937_64& rng) { return (double(rng() >> 11) + 0.5) * 0x1.0p-53; }

std::vector<double> gaussian(std::mt19937_64& rng, int64_t n, double scale = 1.0) {
  std::vector<double> v(n);
  for (auto& x : v) {
    const double u1 = uniform01(rng), u2 = uniform01(rng);
    x = scale * std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
  }
  return v;
}

// Laplace(0, 1) entries; with `outliers`, three entries are scaled by 15.
std::vector<double> laplace(std::mt19937_64& rng, int64_t n, bool outliers) {
  std::vector<double> v(n);
  for (auto& x : v) {
    const double u = uniform01(rng) - 0.5;
    x = u < 0 ? std::log1p(2.0 * u) : -std::log1p(-2.0 * u);
  }
  if (outliers) {
    for (int k = 0; k < 3; ++k) v[rng() % n] *= 15.0;
  }
  return v;
}

struct Fit {
  std::vector<int8_t> codes;
  std::vector<float> scales, sq_errors;
};

template <typename T>
Fit fit(const std::vector<T>& w, int bits, int points, bool exact) {
  GreedyFitOptions options;
  options.bits = bits;
  options.max_points = points;
  options.exact = exact;
  Fit f;
  const auto n = static_cast<int64_t>(w.size());
  f.codes.assign(points * n, int8_t{99});
  f.scales.assign(points, -1.0f);
  f.sq_errors.assign(points, -1.0f);
  GreedyFitWorkspace ws;
  fit_row(w.data(), n, options, f.codes.data(), f.scales.data(), f.sq_errors.data(), ws);
  return f;
}

}  // namespace

TEST_CASE("exact step equals exhaustive enumeration on tiny vectors", "[exact]") {
  std::mt19937_64 rng(1);
  GreedyFitWorkspace ws;
  for (int bits = 2; bits <= 3; ++bits) {
    for (int n = 1; n <= 4; ++n) {
      for (int trial = 0; trial < 40; ++trial) {
        auto r = gaussian(rng, n);
        if (trial % 4 == 0) r[0] *= 12.0;  // an outlier: clipping it may be optimal
        std::vector<int8_t> q(n);
        const double a = greedy_step_exact(r.data(), n, bits, q.data(), ws);
        const double e = step_error(r, a, q);
        const double e_enum = enumerate_error(r, bits);
        INFO("bits " << bits << " n " << n << " trial " << trial);
        REQUIRE(a > 0.0);
        REQUIRE(std::fabs(e - e_enum) <= 1e-12 * sq_norm(r));
      }
    }
  }
}

TEST_CASE("exact step is never worse than a dense brute-force scan", "[exact]") {
  std::mt19937_64 rng(2);
  GreedyFitWorkspace ws;
  for (int bits : {2, 3, 4, 5, 8}) {
    for (int n : {1, 2, 3, 5, 8, 16}) {
      for (int trial = 0; trial < 4; ++trial) {
        auto r = trial % 2 ? laplace(rng, n, n > 4) : gaussian(rng, n);
        std::vector<int8_t> q(n);
        const double a = greedy_step_exact(r.data(), n, bits, q.data(), ws);
        const double e = step_error(r, a, q);
        const double e_brute = brute_force_error(r, bits, 20000);
        INFO("bits " << bits << " n " << n << " trial " << trial << " exact " << e << " brute " << e_brute);
        REQUIRE(e <= e_brute + 1e-12 * sq_norm(r));
        // The scan is fine enough on these sizes to find the same optimum.
        REQUIRE(e_brute <= e + 1e-6 * sq_norm(r));
      }
    }
  }
}

TEST_CASE("exact step returns least-squares consistent codes in range", "[exact]") {
  std::mt19937_64 rng(3);
  GreedyFitWorkspace ws;
  for (int bits = 2; bits <= 8; ++bits) {
    const int K = grid_max(bits);
    auto r = laplace(rng, 200, true);
    std::vector<int8_t> q(r.size());
    const double a = greedy_step_exact(r.data(), r.size(), bits, q.data(), ws);
    REQUIRE(a > 0.0);
    double rq = 0.0, qq = 0.0;
    for (size_t i = 0; i < r.size(); ++i) {
      REQUIRE(int(q[i]) >= -K);
      REQUIRE(int(q[i]) <= K);
      rq += r[i] * q[i];
      qq += double(q[i]) * q[i];
    }
    REQUIRE(std::fabs(a - rq / qq) <= 1e-12 * a);
  }
}

TEST_CASE("fit_row: errors never increase and decay with points", "[fit]") {
  std::mt19937_64 rng(4);
  for (int bits = 2; bits <= 8; ++bits) {
    for (bool exact : {true, false}) {
      for (int trial = 0; trial < 5; ++trial) {
        const auto w = trial % 2 ? laplace(rng, 576, true) : gaussian(rng, 576);
        const auto f = fit(w, bits, 6, exact);
        const double w2 = sq_norm(w);
        INFO("bits " << bits << " exact " << exact << " trial " << trial);
        REQUIRE(f.sq_errors[0] < w2);
        for (int p = 1; p < 6; ++p) REQUIRE(f.sq_errors[p] <= f.sq_errors[p - 1]);
        // Point 4 is well below point 1 (docs/ALGORITHM.md: roughly geometric decay).
        REQUIRE(f.sq_errors[3] < 0.1 * f.sq_errors[0]);
      }
    }
  }
}

TEST_CASE("fit_row: sq_errors match the stored float32 scales and codes", "[fit]") {
  std::mt19937_64 rng(5);
  for (int bits : {2, 4, 8}) {
    for (bool exact : {true, false}) {
      const auto w = laplace(rng, 300, true);
      const int P = 4;
      const auto f = fit(w, bits, P, exact);
      std::vector<double> r = w;
      for (int p = 0; p < P; ++p) {
        for (size_t i = 0; i < r.size(); ++i) r[i] -= double(f.scales[p]) * f.codes[p * r.size() + i];
        INFO("bits " << bits << " exact " << exact << " point " << p);
        REQUIRE(std::fabs(sq_norm(r) - f.sq_errors[p]) <= 1e-6 * f.sq_errors[p] + 1e-30);
      }
    }
  }
}

TEST_CASE("fit_row: all-zero row gives zero codes, scales and errors", "[edge]") {
  for (bool exact : {true, false}) {
    const std::vector<double> w(17, 0.0);
    const auto f = fit(w, 4, 3, exact);
    for (auto c : f.codes) REQUIRE(c == 0);
    for (auto s : f.scales) REQUIRE(s == 0.0f);
    for (auto e : f.sq_errors) REQUIRE(e == 0.0f);
  }
}

TEST_CASE("fit_row: one non-zero entry is fitted in one point", "[edge]") {
  for (bool exact : {true, false}) {
    for (int bits = 2; bits <= 8; ++bits) {
      std::vector<double> w(31, 0.0);
      w[7] = -3.25;
      const auto f = fit(w, bits, 3, exact);
      INFO("bits " << bits << " exact " << exact);
      REQUIRE(f.scales[0] > 0.0f);
      // Only the float32 rounding of the scale remains.
      REQUIRE(f.sq_errors[0] <= 1e-12 * 3.25 * 3.25);
      for (size_t i = 0; i < w.size(); ++i) {
        if (i != 7) REQUIRE(f.codes[i] == 0);
      }
      REQUIRE(f.codes[7] < 0);
      for (int p = 1; p < 3; ++p) REQUIRE(f.sq_errors[p] <= f.sq_errors[0]);
    }
  }
}

TEST_CASE("fit_row: D = 1", "[edge]") {
  for (bool exact : {true, false}) {
    const std::vector<float> w = {0.7f};
    const auto f = fit(w, 3, 2, exact);
    REQUIRE(f.scales[0] > 0.0f);
    REQUIRE(f.codes[0] > 0);
    REQUIRE(f.sq_errors[0] <= 1e-12f);
  }
}

TEST_CASE("fit_row: every bit width keeps codes in -K..K", "[edge]") {
  std::mt19937_64 rng(6);
  for (int bits = 2; bits <= 8; ++bits) {
    const int K = grid_max(bits);
    for (bool exact : {true, false}) {
      const auto w = laplace(rng, 257, true);
      const auto f = fit(w, bits, 4, exact);
      INFO("bits " << bits << " exact " << exact);
      int largest = 0;
      for (auto c : f.codes) {
        REQUIRE(int(c) >= -K);
        REQUIRE(int(c) <= K);
        largest = std::max(largest, std::abs(int(c)));
      }
      // The grid is used, not just its centre (the ends need not be: clipping may be optimal).
      REQUIRE(2 * largest > K);
      for (auto s : f.scales) REQUIRE(s >= 0.0f);
    }
  }
}

TEST_CASE("fit_row: float and double inputs agree", "[edge]") {
  std::mt19937_64 rng(7);
  const auto wd = gaussian(rng, 100);
  const std::vector<float> wf(wd.begin(), wd.end());
  const std::vector<double> wfd(wf.begin(), wf.end());
  const auto a = fit(wf, 4, 3, true);
  const auto b = fit(wfd, 4, 3, true);
  REQUIRE(a.codes == b.codes);
  REQUIRE(a.scales == b.scales);
  REQUIRE(a.sq_errors == b.sq_errors);
}

// The fast step against the exact step on the same residuals (the exact fit's), 576-long
// Laplace rows, every other one with three 15x outliers, 64 rows per bit width, 4 points.
// Measured (this data, CPU), bits 2..8:
//   worst step, fast / exact - 1:       2.2e-7 1.1e-3 4.2e-5 7.8e-3 3.1e-2 6.9e-3 2.6e-2
//   all steps, sum fast / sum exact - 1: 1.4e-9 1.0e-5 2.2e-7 3.4e-5 8.3e-6 2.5e-5 9.6e-5
// The margins sit a bit above; tests/python/test_fit.py has the per-point table and real weights.
TEST_CASE("fast step stays within its margin of the exact step", "[fast]") {
  // Margins per bits 2..8 (index bits - 2).
  const double worst_margin[] = {1e-3, 2e-3, 1e-3, 0.012, 0.045, 0.012, 0.04};
  const double total_margin[] = {1e-5, 2e-5, 1e-5, 5e-5, 2e-5, 4e-5, 1.5e-4};
  std::mt19937_64 rng(8);
  GreedyFitWorkspace ws;
  for (int bits = 2; bits <= 8; ++bits) {
    double worst = 0.0, sum_fast = 0.0, sum_exact = 0.0;
    for (int row = 0; row < 64; ++row) {
      auto r = laplace(rng, 576, row % 2 == 0);
      std::vector<int8_t> qe(r.size()), qf(r.size());
      for (int p = 0; p < 4; ++p) {
        const double ae = greedy_step_exact(r.data(), r.size(), bits, qe.data(), ws);
        const double af = greedy_step_fast(r.data(), r.size(), bits, qf.data(), ws);
        const double ee = step_error(r, ae, qe), ef = step_error(r, af, qf);
        REQUIRE(ee <= ef * (1.0 + 1e-12));  // exact is the optimum
        worst = std::max(worst, ef / ee - 1.0);
        sum_fast += ef;
        sum_exact += ee;
        for (size_t i = 0; i < r.size(); ++i) r[i] -= ae * qe[i];
      }
    }
    INFO("bits " << bits << " worst step excess " << worst << " total excess " << sum_fast / sum_exact - 1.0);
    CHECK(worst <= worst_margin[bits - 2]);
    CHECK(sum_fast / sum_exact - 1.0 <= total_margin[bits - 2]);
  }
}
