// The device code of mpq::fit_multipoint on CUDA (host code, launches and the segmented sort of
// exact mode: csrc/cuda/fit_multipoint.cu, whose top comment describes both modes). Compiled by nvcc
// there, and by a host C++ compiler in tests/cpp/test_kernel_emulation.cpp on
// tests/cpp/simt_emulator.h, which runs these kernels' own code on the CPU against the CPU kernel.
#pragma once

#include <cmath>
#include <cstdint>

#include "cuda/shared_memory.cuh"
#include "kernels/greedy_fit.h"

namespace mpq {
namespace fit_kernels {
// NB: internal linkage: each binary has one including translation unit (the library's .cu, or the
// emulation test), and the test's host-compiled kernels must not interpose the library's symbols.
namespace {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kGridPoints = kernels::kFastGridPoints;
constexpr int kLocalPoints = kernels::kFastLocalPoints;
// Fast mode: one thread per grid candidate.
constexpr int kFastThreads = kGridPoints;
static_assert(kFastThreads % kWarp == 0 && kFastThreads <= 1024, "the fast grid must fill whole warps");
static_assert(kLocalPoints <= kFastThreads, "one thread per local candidate");
// Dynamic shared memory for the residual copies, below the 48 KiB available without opt-in.
constexpr int64_t kFastSmemBudget = 46 * 1024;
constexpr int64_t kFastScratchBytes = int64_t{256} << 20;
// Exact mode.
constexpr int kExactThreads = 256;
constexpr int kExactItems = 4;  // consecutive breakpoints per thread in a tile
constexpr int64_t kExactChunkBreakpoints = int64_t{1} << 24;

// ---- block-wide reductions --------------------------------------------------------------------
// Every thread of the block must call them (they synchronise) and gets the same result: warp
// butterflies (a + b == b + a bit for bit) and then one fixed order over the warps.

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

__device__ __forceinline__ double warp_max(double v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v = fmax(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

// `red` holds at least 2 doubles per warp.
__device__ double block_sum(double v, double* red) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, nwarps = blockDim.x / kWarp;
  v = warp_sum(v);
  __syncthreads();  // a previous reduction may still be reading red
  if (lane == 0) red[warp] = v;
  __syncthreads();
  double s = 0.0;
  for (int w = 0; w < nwarps; ++w) s += red[w];
  return s;
}

__device__ double2 block_sum2(double x, double y, double* red) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, nwarps = blockDim.x / kWarp;
  x = warp_sum(x);
  y = warp_sum(y);
  __syncthreads();
  if (lane == 0) {
    red[2 * warp] = x;
    red[2 * warp + 1] = y;
  }
  __syncthreads();
  double2 s = make_double2(0.0, 0.0);
  for (int w = 0; w < nwarps; ++w) {
    s.x += red[2 * w];
    s.y += red[2 * w + 1];
  }
  return s;
}

__device__ double block_max(double v, double* red) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, nwarps = blockDim.x / kWarp;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  double m = red[0];
  for (int w = 1; w < nwarps; ++w) m = fmax(m, red[w]);
  return m;
}

// ---- the pieces of fit_row shared by both modes ----------------------------------------------
// Each thread owns the elements i = threadIdx.x + k * blockDim.x of the row's r and q, so these
// passes need no synchronisation of their own.

// clip(round(r / a), -K, K) as greedy_fit.cpp's round_codes computes it (round half to even).
__device__ __forceinline__ double round_code(double r, double inv, double K) {
  return rint(fmin(fmax(__dmul_rn(r, inv), -K), K));
}

// Writes q = clip(round(r / a), -K, K) for a = 1 / inv; returns (<r, q>, <q, q>).
__device__ double2 block_round_codes(const double* r, int8_t* q, int64_t D, double inv, double K, double* red) {
  double rq = 0.0, qq = 0.0;
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) {
    const double c = round_code(r[i], inv, K);
    q[i] = static_cast<int8_t>(c);
    rq += r[i] * c;
    qq += c * c;
  }
  return block_sum2(rq, qq, red);
}

// ||r - a q||^2; NB: no FMA in r - a q, as on the CPU.
__device__ double block_sq_error(const double* r, const int8_t* q, int64_t D, double a, double* red) {
  double e = 0.0;
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) {
    const double d = __dsub_rn(r[i], __dmul_rn(a, static_cast<double>(q[i])));
    e += d * d;
  }
  return block_sum(e, red);
}

// fit_row's bookkeeping after a greedy step of scale `a` with codes q: the scale is stored in
// float32 and the residual and the error use the stored value; a point that would not reduce
// the error is stored as zero (scale 0, codes 0). Returns the error after the point.
__device__ double commit_point(double* r, int8_t* q, int64_t D, double a, double err, float* scale_out,
                               float* sq_error_out, double* red) {
  const float a_stored = static_cast<float>(a);
  const double as = static_cast<double>(a_stored);  // as * q is exact in float64
  double new_err = 0.0;
  if (a_stored > 0.0f) new_err = block_sq_error(r, q, D, as, red);
  const bool keep = a_stored > 0.0f && new_err < err;  // the same in every thread
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) {
    if (keep) {
      r[i] -= as * static_cast<double>(q[i]);
    } else {
      q[i] = 0;
    }
  }
  if (keep) err = new_err;
  if (threadIdx.x == 0) {
    *scale_out = keep ? a_stored : 0.0f;
    *sq_error_out = static_cast<float>(err);
  }
  return err;
}

// ---- fast mode --------------------------------------------------------------------------------

// The candidate scales, computed on the host with the CPU's expressions so they agree bit for bit.
struct FastGrid {
  double grid[kGridPoints];            // lo * ratio^g
  double local_pow[kLocalPoints + 1];  // local_ratio^g
  double ratio;
};

inline FastGrid make_fast_grid(int K) {
  FastGrid g;
  const double lo = 1.0 / (K + 0.5) / kernels::kFastGridLowDivisor, hi = 2.0;
  const double ratio = std::pow(hi / lo, 1.0 / (kGridPoints - 1));
  for (int i = 0; i < kGridPoints; ++i) g.grid[i] = lo * std::pow(ratio, i);
  const double local_ratio = std::pow(ratio * ratio, 1.0 / (kLocalPoints + 1));
  for (int i = 0; i <= kLocalPoints; ++i) g.local_pow[i] = std::pow(local_ratio, i);
  g.ratio = ratio;
  return g;
}

// ||x - a clip(round(x / a))||^2 in float32 in greedy_fit.cpp's grid_error order: element i in
// lane i % kGridLanes, each lane summed in index order without FMA, lanes combined pairwise.
__device__ float grid_error(const float* x, int64_t n, float a, float K) {
  using mpq::kernels::kGridLanes;
  const float inv = __fdiv_rn(1.0f, a);
  float acc[kGridLanes];
#pragma unroll
  for (int l = 0; l < kGridLanes; ++l) acc[l] = 0.0f;
  int64_t i = 0;
  for (; i + kGridLanes <= n; i += kGridLanes) {
#pragma unroll
    for (int l = 0; l < kGridLanes; ++l) {
      const float xi = x[i + l];
      const float q = rintf(fminf(fmaxf(__fmul_rn(xi, inv), -K), K));
      const float d = __fsub_rn(xi, __fmul_rn(a, q));
      acc[l] = __fadd_rn(acc[l], __fmul_rn(d, d));
    }
  }
  for (int l = 0; i < n; ++i, ++l) {
    const float xi = x[i];
    const float q = rintf(fminf(fmaxf(__fmul_rn(xi, inv), -K), K));
    const float d = __fsub_rn(xi, __fmul_rn(a, q));
    acc[l] = __fadd_rn(acc[l], __fmul_rn(d, d));
  }
  return __fadd_rn(__fadd_rn(__fadd_rn(acc[0], acc[1]), __fadd_rn(acc[2], acc[3])),
                   __fadd_rn(__fadd_rn(acc[4], acc[5]), __fadd_rn(acc[6], acc[7])));
}

struct FitOutputs {
  int8_t* codes;     // [C, P, D]
  float* scales;     // [C, P]
  float* sq_errors;  // [C, P]
};

// smem_mode: 2 = r and x in shared memory, 1 = x only, 0 = both in the global scratch slot
// [gridDim.x, D] of this block.
template <typename scalar_t>
__global__ void __launch_bounds__(kFastThreads)
    fit_fast_kernel(const scalar_t* __restrict__ w, int64_t C, int64_t D, int P, int K, FitOutputs out,
                    double* r_scratch, float* x_scratch, int smem_mode, FastGrid grid) {
  MPQ_DYNAMIC_SHARED(smem);
  MPQ_SHARED(double, red, [2 * kFastThreads / kWarp]);
  MPQ_SHARED(float, errs, [kGridPoints + kLocalPoints]);
  MPQ_SHARED(double, best_a_shared, );
  MPQ_SHARED(float, best_e_shared, );

  double* r = smem_mode == 2 ? reinterpret_cast<double*>(smem) : r_scratch + int64_t(blockIdx.x) * D;
  float* x = smem_mode == 2   ? reinterpret_cast<float*>(smem + D * sizeof(double))
             : smem_mode == 1 ? reinterpret_cast<float*>(smem)
                              : x_scratch + int64_t(blockIdx.x) * D;
  const double Kd = static_cast<double>(K);
  const float Kf = static_cast<float>(K);

  for (int64_t row = blockIdx.x; row < C; row += gridDim.x) {
    const scalar_t* wr = w + row * D;
    double part = 0.0;
    for (int64_t i = threadIdx.x; i < D; i += blockDim.x) {
      const double v = static_cast<double>(wr[i]);
      r[i] = v;
      part += v * v;
    }
    double err = block_sum(part, red);

    for (int p = 0; p < P; ++p) {
      int8_t* q = out.codes + (row * P + p) * D;
      double m = 0.0;
      for (int64_t i = threadIdx.x; i < D; i += blockDim.x) m = fmax(m, fabs(r[i]));
      m = block_max(m, red);
      double a = 0.0;
      if (m > 0.0) {  // the same in every thread
        for (int64_t i = threadIdx.x; i < D; i += blockDim.x) x[i] = static_cast<float>(r[i] / m);
        __syncthreads();  // every thread reads all of x below
        errs[threadIdx.x] = grid_error(x, D, static_cast<float>(grid.grid[threadIdx.x]), Kf);
        __syncthreads();
        if (threadIdx.x == 0) {  // first minimum, as the CPU's strict < in index order
          double best_a = grid.grid[0];
          float best_e = INFINITY;
          for (int g = 0; g < kGridPoints; ++g) {
            if (errs[g] < best_e) {
              best_e = errs[g];
              best_a = grid.grid[g];
            }
          }
          best_a_shared = best_a;
          best_e_shared = best_e;
        }
        __syncthreads();
        // A finer local grid between the neighbours of the best grid point.
        const double local_lo = best_a_shared / grid.ratio;
        if (threadIdx.x < kLocalPoints) {
          const double al = local_lo * grid.local_pow[threadIdx.x + 1];
          errs[kGridPoints + threadIdx.x] = grid_error(x, D, static_cast<float>(al), Kf);
        }
        __syncthreads();
        if (threadIdx.x == 0) {
          double best_a = best_a_shared;
          float best_e = best_e_shared;
          for (int g = 0; g < kLocalPoints; ++g) {
            if (errs[kGridPoints + g] < best_e) {
              best_e = errs[kGridPoints + g];
              best_a = local_lo * grid.local_pow[g + 1];
            }
          }
          best_a_shared = best_a;
        }
        __syncthreads();
        const double best_a = best_a_shared;

        // Codes at the best scale, then least squares, one re-rounding, least squares again
        // (greedy_fit.cpp refine_least_squares with rounds = 1); the trial codes are recomputed
        // rather than stored.
        const double2 s1 = block_round_codes(r, q, D, 1.0 / (best_a * m), Kd, red);
        if (s1.y != 0.0 && s1.x > 0.0) {
          a = s1.x / s1.y;
          const double e1 = block_sq_error(r, q, D, a, red);
          const double inv = 1.0 / a;
          double rq = 0.0, qq = 0.0;
          for (int64_t i = threadIdx.x; i < D; i += blockDim.x) {
            const double c = round_code(r[i], inv, Kd);
            rq += r[i] * c;
            qq += c * c;
          }
          const double2 s2 = block_sum2(rq, qq, red);
          if (s2.y != 0.0 && s2.x > 0.0) {
            const double a2 = s2.x / s2.y;
            double e = 0.0;
            for (int64_t i = threadIdx.x; i < D; i += blockDim.x) {
              const double d = __dsub_rn(r[i], __dmul_rn(a2, round_code(r[i], inv, Kd)));
              e += d * d;
            }
            const double e2 = block_sum(e, red);
            if (e2 < e1) {
              a = a2;
              for (int64_t i = threadIdx.x; i < D; i += blockDim.x) {
                q[i] = static_cast<int8_t>(round_code(r[i], inv, Kd));
              }
            }
          }
        }
      }
      err = commit_point(r, q, D, a, err, out.scales + row * P + p, out.sq_errors + row * P + p, red);
    }
  }
}

// ---- exact mode -------------------------------------------------------------------------------

// r[b] = w[b] in float64 and err[b] = ||w[b]||^2, one block per row of the chunk.
template <typename scalar_t>
__global__ void __launch_bounds__(kExactThreads)
    exact_init_kernel(const scalar_t* __restrict__ w, int64_t D, double* r, double* err) {
  MPQ_SHARED(double, red, [2 * kExactThreads / kWarp]);
  const int64_t b = blockIdx.x;
  double part = 0.0;
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) {
    const double v = static_cast<double>(w[b * D + i]);
    r[b * D + i] = v;
    part += v * v;
  }
  part = block_sum(part, red);
  if (threadIdx.x == 0) err[b] = part;
}

// m[b] = max|r[b]|; keys[b, i*K + k] = (|r_i| / m) / (k + 1/2) (0 for a zero row), vals = i*K + k.
__global__ void __launch_bounds__(kExactThreads)
    exact_breakpoints_kernel(const double* r, int64_t D, int K, double* m_out, double* keys, int* vals) {
  MPQ_SHARED(double, red, [2 * kExactThreads / kWarp]);
  const int64_t b = blockIdx.x, DK = D * K;
  const double* rr = r + b * D;
  double m = 0.0;
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) m = fmax(m, fabs(rr[i]));
  m = block_max(m, red);
  if (threadIdx.x == 0) m_out[b] = m;
  for (int64_t t = threadIdx.x; t < DK; t += blockDim.x) {
    const int64_t i = t / K;
    const int k = static_cast<int>(t - i * K);
    const double v = m > 0.0 ? fabs(rr[i]) / m : 0.0;
    keys[b * DK + t] = v / (k + 0.5);
    vals[b * DK + t] = static_cast<int>(t);
  }
}

// The breakpoint sweep over one row's sorted breakpoints (see the top of the file), then the codes,
// their least-squares scale and fit_row's bookkeeping for point p.
__global__ void __launch_bounds__(kExactThreads)
    exact_sweep_kernel(double* r, int64_t D, int K, int P, int p, const double* m_in, const double* keys,
                       const int* vals, double* err_io, FitOutputs out) {
  constexpr int kWarps = kExactThreads / kWarp;
  MPQ_SHARED(double, red, [2 * kWarps]);
  MPQ_SHARED(double, warp_rq, [kWarps]);
  MPQ_SHARED(double, warp_qq, [kWarps]);
  MPQ_SHARED(double, best_gain_w, [kWarps]);
  MPQ_SHARED(double, best_a_w, [kWarps]);
  MPQ_SHARED(long long, best_t_w, [kWarps]);

  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int64_t b = blockIdx.x, DK = D * K;
  double* rr = r + b * D;
  const double* kb = keys + b * DK;
  const int* vb = vals + b * DK;
  int8_t* q = out.codes + (b * P + p) * D;
  const double m = m_in[b];
  const double Kd = static_cast<double>(K);

  double a = 0.0;
  if (m > 0.0) {                              // the same in every thread
    double prefix_rq = 0.0, prefix_qq = 0.0;  // sums over the tiles before this one
    double best_gain = 0.0, best_a = 0.0;     // gains must beat 0, as on the CPU
    long long best_t = LLONG_MAX;
    for (int64_t base = 0; base < DK; base += int64_t{kExactThreads} * kExactItems) {
      const int64_t t0 = base + int64_t{threadIdx.x} * kExactItems;
      // Increments of <r, q> and <q, q> when a falls below each breakpoint; thread-local scan.
      double inc_rq[kExactItems], inc_qq[kExactItems];
      double own_rq = 0.0, own_qq = 0.0;
#pragma unroll
      for (int j = 0; j < kExactItems; ++j) {
        const int64_t t = t0 + j;
        double drq = 0.0, dqq = 0.0;
        if (t < DK) {
          const int id = vb[t];
          const int i = id / K, k = id - i * K;
          const double ri = rr[i];
          if (ri != 0.0) {  // the CPU leaves zeros out of the sweep
            drq = fabs(ri) / m;
            dqq = 2.0 * k + 1.0;
          }
        }
        own_rq += drq;
        own_qq += dqq;
        inc_rq[j] = own_rq;
        inc_qq[j] = own_qq;
      }
      // Exclusive scan of the thread totals: warp scan, then the warps in order.
      double x_rq = own_rq, x_qq = own_qq;
#pragma unroll
      for (int o = 1; o < kWarp; o <<= 1) {
        const double y_rq = __shfl_up_sync(kFullMask, x_rq, o);
        const double y_qq = __shfl_up_sync(kFullMask, x_qq, o);
        if (lane >= o) {
          x_rq = y_rq + x_rq;
          x_qq = y_qq + x_qq;
        }
      }
      double lane_rq = __shfl_up_sync(kFullMask, x_rq, 1);
      double lane_qq = __shfl_up_sync(kFullMask, x_qq, 1);
      if (lane == 0) lane_rq = lane_qq = 0.0;
      __syncthreads();  // the previous tile may still be reading warp_rq
      if (lane == kWarp - 1) {
        warp_rq[warp] = x_rq;
        warp_qq[warp] = x_qq;
      }
      __syncthreads();
      double before_rq = prefix_rq, before_qq = prefix_qq, tile_rq = 0.0, tile_qq = 0.0;
      for (int w = 0; w < kWarps; ++w) {
        if (w < warp) {
          before_rq += warp_rq[w];
          before_qq += warp_qq[w];
        }
        tile_rq += warp_rq[w];
        tile_qq += warp_qq[w];
      }
      before_rq += lane_rq;
      before_qq += lane_qq;
      // Interval below breakpoint t: (keys[t + 1], keys[t]) with <r,q>, <q,q> summed through t.
#pragma unroll
      for (int j = 0; j < kExactItems; ++j) {
        const int64_t t = t0 + j;
        const double rq = before_rq + inc_rq[j], qq = before_qq + inc_qq[j];
        if (t < DK && qq > 0.0) {
          const double upper = kb[t];
          const double lower = t + 1 < DK ? kb[t + 1] : 0.0;
          const double at = fmin(fmax(rq / qq, lower), upper);
          const double gain = __dsub_rn(__dmul_rn(__dmul_rn(2.0, at), rq), __dmul_rn(__dmul_rn(at, at), qq));
          if (gain > best_gain) {  // strict: the first maximum in sweep order
            best_gain = gain;
            best_a = at;
            best_t = t;
          }
        }
      }
      prefix_rq += tile_rq;
      prefix_qq += tile_qq;
    }
    // Block argmax: the largest gain, the smallest t among equal gains.
#pragma unroll
    for (int o = kWarp / 2; o > 0; o >>= 1) {
      const double g2 = __shfl_xor_sync(kFullMask, best_gain, o);
      const double a2 = __shfl_xor_sync(kFullMask, best_a, o);
      const long long t2 = __shfl_xor_sync(kFullMask, best_t, o);
      if (g2 > best_gain || (g2 == best_gain && t2 < best_t)) {
        best_gain = g2;
        best_a = a2;
        best_t = t2;
      }
    }
    __syncthreads();
    if (lane == 0) {
      best_gain_w[warp] = best_gain;
      best_a_w[warp] = best_a;
      best_t_w[warp] = best_t;
    }
    __syncthreads();  // also orders the sweep's reads of rr before the writes below
    best_gain = best_gain_w[0];
    best_a = best_a_w[0];
    best_t = best_t_w[0];
    for (int w = 1; w < kWarps; ++w) {
      if (best_gain_w[w] > best_gain || (best_gain_w[w] == best_gain && best_t_w[w] < best_t)) {
        best_gain = best_gain_w[w];
        best_a = best_a_w[w];
        best_t = best_t_w[w];
      }
    }
    if (best_a != 0.0) {
      // Codes at the best scale, then their least-squares scale (refine_least_squares, rounds = 0).
      const double2 s = block_round_codes(rr, q, D, 1.0 / (best_a * m), Kd, red);
      if (s.y != 0.0 && s.x > 0.0) a = s.x / s.y;
    }
  }
  const double err = commit_point(rr, q, D, a, err_io[b], out.scales + b * P + p, out.sq_errors + b * P + p, red);
  if (threadIdx.x == 0) err_io[b] = err;
}

}  // namespace
}  // namespace fit_kernels
}  // namespace mpq
