#include "kernels/greedy_fit.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <queue>
#include <utility>

namespace mpq {
namespace kernels {
namespace {

inline int grid_max(int bits) { return (1 << (bits - 1)) - 1; }

// Round half to even without a libm call, so the loops below vectorise; exact for |x| < 2^22.
inline float round_small(float x) {
  constexpr float magic = 12582912.0f;  // 1.5 * 2^23
  return (x + magic) - magic;
}

// q = clip(round(r / a), -K, K); returns (<r, q>, <q, q>).
std::pair<double, double> round_codes(const double* r, int64_t n, double a, int K, int8_t* codes) {
  const double inv = 1.0 / a;
  double rq = 0.0, qq = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const double q = std::nearbyint(std::min(std::max(r[i] * inv, -double(K)), double(K)));
    codes[i] = static_cast<int8_t>(q);
    rq += r[i] * q;
    qq += q * q;
  }
  return {rq, qq};
}

double sq_error(const double* r, int64_t n, double a, const int8_t* codes) {
  double e = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const double d = r[i] - a * codes[i];
    e += d * d;
  }
  return e;
}

// ||x - a clip(round(x / a))||^2 on a float copy of the residual: the fast solver's inner loop.
// NB: the summation order is part of the contract (the CUDA kernel repeats it so that both pick
// the same candidate): element i goes to lane i % kGridLanes, each lane sums in index order
// without FMA, and the lanes are combined pairwise. The lanes let the compiler vectorise; an
// AVX2 clone (8 lanes = one register, chosen at load time) does the same arithmetic, just wider.
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
float grid_error(const float* x, int64_t n, float a, float K) {
  const float inv = 1.0f / a;
  float acc[kGridLanes] = {};
  int64_t i = 0;
  for (; i + kGridLanes <= n; i += kGridLanes) {
    for (int l = 0; l < kGridLanes; ++l) {
      const float q = round_small(std::min(std::max(x[i + l] * inv, -K), K));
      const float d = x[i + l] - a * q;
      acc[l] += d * d;
    }
  }
  for (int l = 0; i < n; ++i, ++l) {
    const float q = round_small(std::min(std::max(x[i] * inv, -K), K));
    const float d = x[i] - a * q;
    acc[l] += d * d;
  }
  return combine_lanes(acc);
}

double max_abs(const double* r, int64_t n) {
  double m = 0.0;
  for (int64_t i = 0; i < n; ++i) m = std::max(m, std::fabs(r[i]));
  return m;
}

// Least-squares scale for fixed codes, then the codes re-rounded at that scale, as long as
// the error keeps decreasing (at most `rounds` times). Returns the scale; `codes` hold its codes.
double refine_least_squares(const double* r, int64_t n, int K, int8_t* codes, int rounds, GreedyFitWorkspace& ws) {
  double rq = 0.0, qq = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    rq += r[i] * codes[i];
    qq += double(codes[i]) * codes[i];
  }
  if (qq == 0.0 || rq <= 0.0) return 0.0;
  double best_a = rq / qq;
  double best_e = sq_error(r, n, best_a, codes);
  ws.trial_codes.resize(n);
  for (int round = 0; round < rounds; ++round) {
    const auto sums = round_codes(r, n, best_a, K, ws.trial_codes.data());
    if (sums.second == 0.0 || sums.first <= 0.0) break;
    const double a_new = sums.first / sums.second;
    const double e_new = sq_error(r, n, a_new, ws.trial_codes.data());
    if (!(e_new < best_e)) break;
    best_a = a_new;
    best_e = e_new;
    std::copy(ws.trial_codes.begin(), ws.trial_codes.end(), codes);
  }
  return best_a;
}

}  // namespace

double greedy_step_exact(const double* r, int64_t n, int bits, int8_t* codes, GreedyFitWorkspace& ws) {
  const int K = grid_max(bits);
  const double m = max_abs(r, n);
  if (m == 0.0) {
    std::fill(codes, codes + n, int8_t{0});
    return 0.0;
  }
  // Work in units of max|r| so that squares neither overflow nor underflow.
  auto& v = ws.sorted_abs;
  v.clear();
  for (int64_t i = 0; i < n; ++i) {
    if (r[i] != 0.0) v.push_back(std::fabs(r[i]) / m);
  }
  std::sort(v.begin(), v.end(), std::greater<double>());
  // |q_i| grows from k to k+1 when a falls below the breakpoint v_i / (k + 1/2). Sweep all
  // breakpoints from the largest down with a K-way merge (list k is v / (k + 1/2), already
  // sorted), keeping <r, q> and <q, q> up to date; between two breakpoints q is fixed and the
  // best scale is <r, q> / <q, q> clamped to the interval.
  using Entry = std::pair<double, int>;  // (breakpoint, level k)
  std::priority_queue<Entry> heap;
  std::vector<int64_t> next(K, 0);
  const int64_t nz = static_cast<int64_t>(v.size());
  for (int k = 0; k < K; ++k) heap.emplace(v[0] / (k + 0.5), k);
  double rq = 0.0, qq = 0.0, upper = std::numeric_limits<double>::infinity();
  double best_gain = 0.0, best_a = 0.0;  // gain = ||r||^2 - ||r - a q||^2 (normalised units)
  auto consider = [&](double lower) {
    if (qq == 0.0) return;
    const double a = std::min(std::max(rq / qq, lower), upper);
    const double gain = 2.0 * a * rq - a * a * qq;
    if (gain > best_gain) {
      best_gain = gain;
      best_a = a;
    }
  };
  while (!heap.empty()) {
    const auto [b, k] = heap.top();
    heap.pop();
    consider(b);
    rq += v[next[k]];
    qq += 2.0 * k + 1.0;
    upper = b;
    if (++next[k] < nz) heap.emplace(v[next[k]] / (k + 0.5), k);
  }
  consider(0.0);
  if (best_a == 0.0) {
    std::fill(codes, codes + n, int8_t{0});
    return 0.0;
  }
  // Codes at the best scale, then its least-squares scale (the same pair unless the optimum
  // sat on a breakpoint, where either rounding gives the same error).
  round_codes(r, n, best_a * m, K, codes);
  return refine_least_squares(r, n, K, codes, 0, ws);
}

double greedy_step_fast(const double* r, int64_t n, int bits, int8_t* codes, GreedyFitWorkspace& ws) {
  const int K = grid_max(bits);
  const double m = max_abs(r, n);
  if (m == 0.0) {
    std::fill(codes, codes + n, int8_t{0});
    return 0.0;
  }
  auto& x = ws.normalized;
  x.resize(n);
  for (int64_t i = 0; i < n; ++i) x[i] = static_cast<float>(r[i] / m);
  const float Kf = static_cast<float>(K);
  // NB: clipping outliers is often optimal, so the grid starts far below 1 / (K + 1/2).
  const double lo = 1.0 / (K + 0.5) / kFastGridLowDivisor, hi = 2.0;
  const double ratio = std::pow(hi / lo, 1.0 / (kFastGridPoints - 1));
  double best_a = lo;
  float best_e = std::numeric_limits<float>::infinity();
  for (int g = 0; g < kFastGridPoints; ++g) {
    const double a = lo * std::pow(ratio, g);
    const float e = grid_error(x.data(), n, static_cast<float>(a), Kf);
    if (e < best_e) {
      best_e = e;
      best_a = a;
    }
  }
  // A finer local grid between the neighbours of the best grid point.
  const double local_lo = best_a / ratio;
  const double local_ratio = std::pow(ratio * ratio, 1.0 / (kFastLocalPoints + 1));
  for (int g = 1; g <= kFastLocalPoints; ++g) {
    const double a = local_lo * std::pow(local_ratio, g);
    const float e = grid_error(x.data(), n, static_cast<float>(a), Kf);
    if (e < best_e) {
      best_e = e;
      best_a = a;
    }
  }
  round_codes(r, n, best_a * m, K, codes);
  return refine_least_squares(r, n, K, codes, 1, ws);
}

template <typename T>
void fit_row(const T* w, int64_t n, const GreedyFitOptions& options, int8_t* codes, float* scales, float* sq_errors,
             GreedyFitWorkspace& ws) {
  auto& r = ws.residual;
  r.resize(n);
  double err = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    r[i] = static_cast<double>(w[i]);
    err += r[i] * r[i];
  }
  for (int p = 0; p < options.max_points; ++p) {
    int8_t* q = codes + p * n;
    const double a = options.exact ? greedy_step_exact(r.data(), n, options.bits, q, ws)
                                   : greedy_step_fast(r.data(), n, options.bits, q, ws);
    // The scale is stored in float32: the residual and the errors use the stored value.
    const float a_stored = static_cast<float>(a);
    double new_err = 0.0;
    if (a_stored > 0.0f) {
      for (int64_t i = 0; i < n; ++i) {
        const double d = r[i] - double(a_stored) * q[i];
        new_err += d * d;
      }
    }
    if (a_stored > 0.0f && new_err < err) {
      for (int64_t i = 0; i < n; ++i) r[i] -= double(a_stored) * q[i];
      err = new_err;
      scales[p] = a_stored;
    } else {
      std::fill(q, q + n, int8_t{0});
      scales[p] = 0.0f;
    }
    sq_errors[p] = static_cast<float>(err);
  }
}

template void fit_row<float>(const float*, int64_t, const GreedyFitOptions&, int8_t*, float*, float*,
                             GreedyFitWorkspace&);
template void fit_row<double>(const double*, int64_t, const GreedyFitOptions&, int8_t*, float*, float*,
                              GreedyFitWorkspace&);

}  // namespace kernels
}  // namespace mpq
