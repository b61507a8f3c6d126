// Greedy multipoint fitting of one weight row, on raw pointers (no torch), so that Catch2
// tests it directly and the CPU op is a thin loop over rows. Algorithm: docs/ALGORITHM.md section 1.
#pragma once

#include <cstdint>
#include <vector>

namespace mpq {
namespace kernels {

struct GreedyFitOptions {
  int bits = 4;        // symmetric grid -K..K, K = 2^(bits-1) - 1, bits in 2..8
  int max_points = 4;  // points fitted per row
  bool exact = true;   // breakpoint sweep (true optimum of each step) or the fast grid solver
};

// The fast solver's search: kFastGridPoints log-spaced scales over
// [max|r| / (K + 1/2) / kFastGridLowDivisor, 2 max|r|], then kFastLocalPoints log-spaced scales
// between the best grid point's neighbours, then least squares on the chosen codes, re-rounding,
// and least squares again. Measured margin against the exact step: tests/python/test_fit.py.
constexpr int kFastGridPoints = 128;
constexpr int kFastLocalPoints = 48;
constexpr double kFastGridLowDivisor = 64.0;

// Rows with at most kExactBelowBreakpoints breakpoints (D * K) use the exact sweep even when the
// fast solver is asked for: it costs about as much there, and the 176-scale grid can miss the
// narrow optima of short rows (measured: up to 29% more error on depthwise D = 9 rows at 8 bits).
constexpr int64_t kExactBelowBreakpoints = 4096;
inline bool use_exact_solver(bool exact, int64_t n, int bits) {
  return exact || n * ((int64_t{1} << (bits - 1)) - 1) <= kExactBelowBreakpoints;
}

// The fast solver's float32 candidate error is summed in kGridLanes interleaved lanes, combined
// pairwise; the CPU and CUDA kernels share this order (see grid_error), so they pick the same scale.
constexpr int kGridLanes = 8;
#if defined(__CUDACC__)
__host__ __device__
#endif
    inline float combine_lanes(const float* acc) {
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

// Per-thread scratch memory, reused across rows.
struct GreedyFitWorkspace {
  std::vector<double> residual;
  std::vector<double> sorted_abs;
  std::vector<float> normalized;
  std::vector<int8_t> trial_codes;
};

// One greedy step: the scale a >= 0 and codes q (written to `codes`, length n) minimising
// ||r - a q||^2 over the b-bit grid. Returns 0 (and zero codes) when r == 0.
double greedy_step_exact(const double* r, int64_t n, int bits, int8_t* codes, GreedyFitWorkspace& ws);
double greedy_step_fast(const double* r, int64_t n, int bits, int8_t* codes, GreedyFitWorkspace& ws);

// Fits max_points nested points to w[n]: codes[max_points * n], scales[max_points],
// sq_errors[max_points] (||w - sum of the first k+1 points||^2, scales rounded to float32 as stored).
// A point that would not reduce the error is stored as zero (scale 0, codes 0).
template <typename T>
void fit_row(const T* w, int64_t n, const GreedyFitOptions& options, int8_t* codes, float* scales, float* sq_errors,
             GreedyFitWorkspace& ws);

}  // namespace kernels
}  // namespace mpq
