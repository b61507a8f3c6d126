// CUDA kernel of mpq::fit_multipoint: the greedy multipoint fit of csrc/kernels/greedy_fit.cpp
// (docs/ALGORITHM.md section 1) for every row at once, with the CPU's arithmetic step for step, so
// that codes agree with the CPU kernel except at exact ties and errors to rounding.
//
// Fast mode (fit_fast_kernel): one block of kFastGridPoints = 128 threads per row, all points in
//   one launch. Thread g evaluates grid scale g over the whole row, summing float32 terms in index
//   order of the CPU's grid_error (8 interleaved lanes, no FMA contraction), term for term, so the same
//   candidate wins; the 48 local scales likewise. All threads read the same x[i] at once (a
//   shared-memory broadcast). The other reductions (max|r|, <r,q>, <q,q>, errors) are float64
//   block reductions in a fixed order, deterministic from run to run. The float copy x of the
//   normalised residual lives in shared memory for D <= 11776, the float64 residual r too for
//   D <= 3925; otherwise both live in a global scratch slot per resident block (at most
//   kFastScratchBytes), and blocks loop over rows. Work per row and point: 176 * D float
//   evaluations (latency about 176 / 128 * D sequential steps) plus ~8 passes over r.
//
// Exact mode: the breakpoint sweep in parallel form, rows in chunks of at most
//   kExactChunkBreakpoints breakpoints (~400 MB of workspace), the float64 residual of the chunk in
//   global scratch. Per chunk and point:
//     1. exact_breakpoints_kernel (block per row): m = max|r|, all D*K breakpoints v_i / (k + 1/2)
//        (v = |r| / m, as the CPU normalises) with their index i*K + k;
//     2. cub::DeviceSegmentedRadixSort sorts each row's breakpoints descending (stable);
//     3. exact_sweep_kernel (block per row): tiles of 1024 breakpoints, an inclusive block scan of
//        the increments (v_i, 2k+1) gives <r,q> and <q,q> on every interval (a, b) between
//        consecutive breakpoints; each interval's least-squares scale clamped to [a, b] and its
//        gain 2 a <r,q> - a^2 <q,q> are evaluated in parallel; the first maximum in sweep order
//        wins, as in the CPU's sequential sweep. Then the codes at that scale, the least-squares
//        scale of those codes and fit_row's bookkeeping.
//   O(D K log(D K)) work per row and point, like the CPU (the sort dominates: 64-bit keys).
//   NB: the order of equal breakpoints differs from the CPU's heap, which is harmless: crossing a
//   breakpoint b = v_i / (k + 1/2) does not change the gain at a = b (2 b v_i - b^2 (2k+1) = 0).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cub/device/device_segmented_radix_sort.cuh>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>

#include "checks.h"
#include "cuda/fit_kernels.cuh"
#include "kernels/greedy_fit.h"

namespace mpq {
namespace {

using namespace mpq::fit_kernels;

// ---- host side --------------------------------------------------------------------------------

template <typename scalar_t>
void fit_fast(const at::Tensor& w, int K, int P, FitOutputs out, cudaStream_t stream) {
  const int64_t C = w.size(0), D = w.size(1);
  const int64_t x_bytes = D * int64_t{sizeof(float)}, r_bytes = D * int64_t{sizeof(double)};
  int smem_mode = 0;
  int64_t smem_bytes = 0;
  if (r_bytes + x_bytes <= kFastSmemBudget) {
    smem_mode = 2;
    smem_bytes = r_bytes + x_bytes;
  } else if (x_bytes <= kFastSmemBudget) {
    smem_mode = 1;
    smem_bytes = x_bytes;
  }
  const int64_t scratch_per_block = (smem_mode < 2 ? r_bytes : 0) + (smem_mode < 1 ? x_bytes : 0);
  int64_t blocks = std::min<int64_t>(C, INT_MAX);
  if (scratch_per_block > 0) blocks = std::min(blocks, std::max<int64_t>(1, kFastScratchBytes / scratch_per_block));
  at::Tensor r_scratch, x_scratch;
  if (smem_mode < 2) r_scratch = at::empty({blocks, D}, w.options().dtype(at::kDouble));
  if (smem_mode < 1) x_scratch = at::empty({blocks, D}, w.options().dtype(at::kFloat));
  fit_fast_kernel<scalar_t><<<static_cast<unsigned>(blocks), kFastThreads, static_cast<size_t>(smem_bytes), stream>>>(
      w.data_ptr<scalar_t>(), C, D, P, K, out, smem_mode < 2 ? r_scratch.data_ptr<double>() : nullptr,
      smem_mode < 1 ? x_scratch.data_ptr<float>() : nullptr, smem_mode, make_fast_grid(K));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void fit_exact(const at::Tensor& w, int K, int P, FitOutputs out, cudaStream_t stream) {
  const int64_t C = w.size(0), D = w.size(1), DK = D * K;
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(C, kExactChunkBreakpoints / DK));
  const auto options = w.options();
  auto r = at::empty({chunk, D}, options.dtype(at::kDouble));
  auto err = at::empty({chunk}, options.dtype(at::kDouble));
  auto m = at::empty({chunk}, options.dtype(at::kDouble));
  auto keys = at::empty({2, chunk * DK}, options.dtype(at::kDouble));
  auto vals = at::empty({2, chunk * DK}, options.dtype(at::kInt));
  // Segment b of the chunk is [b * DK, (b + 1) * DK); chunk * DK < 2^31 unless chunk == 1.
  const auto offsets = at::arange(chunk + 1, options.dtype(at::kLong)).mul(DK).to(at::kInt);
  const int* offsets_ptr = offsets.data_ptr<int>();
  double* keys_ptr = keys.data_ptr<double>();
  int* vals_ptr = vals.data_ptr<int>();
  for (int64_t row0 = 0; row0 < C; row0 += chunk) {
    const int64_t rows = std::min(chunk, C - row0);
    const int num_items = static_cast<int>(rows * DK), num_segments = static_cast<int>(rows);
    const FitOutputs chunk_out{out.codes + row0 * P * D, out.scales + row0 * P, out.sq_errors + row0 * P};
    exact_init_kernel<scalar_t><<<static_cast<unsigned>(rows), kExactThreads, 0, stream>>>(
        w.data_ptr<scalar_t>() + row0 * D, D, r.data_ptr<double>(), err.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    for (int p = 0; p < P; ++p) {
      exact_breakpoints_kernel<<<static_cast<unsigned>(rows), kExactThreads, 0, stream>>>(
          r.data_ptr<double>(), D, K, m.data_ptr<double>(), keys_ptr, vals_ptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      cub::DoubleBuffer<double> key_buf(keys_ptr, keys_ptr + chunk * DK);
      cub::DoubleBuffer<int> val_buf(vals_ptr, vals_ptr + chunk * DK);
      size_t temp_bytes = 0;
      C10_CUDA_CHECK(cub::DeviceSegmentedRadixSort::SortPairsDescending(
          nullptr, temp_bytes, key_buf, val_buf, num_items, num_segments, offsets_ptr, offsets_ptr + 1, 0,
          int{sizeof(double) * 8}, stream));
      auto temp = at::empty({static_cast<int64_t>(std::max<size_t>(temp_bytes, 1))}, options.dtype(at::kByte));
      C10_CUDA_CHECK(cub::DeviceSegmentedRadixSort::SortPairsDescending(
          temp.data_ptr(), temp_bytes, key_buf, val_buf, num_items, num_segments, offsets_ptr, offsets_ptr + 1, 0,
          int{sizeof(double) * 8}, stream));
      exact_sweep_kernel<<<static_cast<unsigned>(rows), kExactThreads, 0, stream>>>(
          r.data_ptr<double>(), D, K, P, p, m.data_ptr<double>(), key_buf.Current(), val_buf.Current(),
          err.data_ptr<double>(), chunk_out);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> fit_multipoint_cuda(const at::Tensor& weight, int64_t bits,
                                                                   int64_t max_points, bool exact) {
  check_fit_multipoint_args(weight, bits, max_points);
  TORCH_CHECK(weight.is_cuda(), "mpq::fit_multipoint: expected weight on a CUDA device, got ", weight.device());
  const int K = (1 << (bits - 1)) - 1;
  exact = mpq::kernels::use_exact_solver(exact, weight.size(1), static_cast<int>(bits));  // as on the CPU
  TORCH_CHECK(!exact || weight.size(1) * K <= INT_MAX,
              "mpq::fit_multipoint: the exact CUDA solver sorts D * (2^(bits-1) - 1) breakpoints per row, at most ",
              INT_MAX, "; got D = ", weight.size(1), " at ", bits, " bits (use exact=False or the CPU)");
  c10::cuda::CUDAGuard guard(weight.device());
  const auto w = weight.contiguous();
  const int64_t C = w.size(0), D = w.size(1);
  auto codes = at::empty({C, max_points, D}, w.options().dtype(at::kChar));
  auto scales = at::empty({C, max_points}, w.options().dtype(at::kFloat));
  auto sq_errors = at::empty({C, max_points}, w.options().dtype(at::kFloat));
  if (C == 0) return {codes, scales, sq_errors};
  const FitOutputs out{codes.data_ptr<int8_t>(), scales.data_ptr<float>(), sq_errors.data_ptr<float>()};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int P = static_cast<int>(max_points);
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "mpq::fit_multipoint_cuda", [&] {
    if (exact) {
      fit_exact<scalar_t>(w, K, P, out, stream);
    } else {
      fit_fast<scalar_t>(w, K, P, out, stream);
    }
  });
  return {codes, scales, sq_errors};
}

}  // namespace mpq

TORCH_LIBRARY_IMPL(mpq, CUDA, m) { m.impl("fit_multipoint", &mpq::fit_multipoint_cuda); }
