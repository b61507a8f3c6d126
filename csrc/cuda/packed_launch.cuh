// The host side of every launch of the packed kernels (csrc/cuda/packed_kernels.cuh): grid, block
// and shared memory of each kernel, the K split with its workspace and finalize pass, in one place
// for the library (csrc/cuda/multipoint_packed.cu, nvcc and the CUDA runtime) and for the
// emulation test (tests/cpp/test_kernel_emulation.cpp, the host compiler and
// tests/cpp/simt_emulator.h), so that the emulation runs the launches a GPU gets. No torch API:
// what differs between the two is the Launcher argument, an object with
//   int multiprocessors() const;   // the device's (the emulation: a few)
//   float* workspace(int64_t n);   // n floats of scratch that outlive the launches
//   template <class Kernel, class... Args>
//   void operator()(dim3 grid, dim3 block, size_t shared_bytes, Kernel kernel, Args... args);
//                                  // kernel<<<grid, block, shared_bytes, stream>>>(args...), checked
// Which kernel runs (gemv, mma, int8, dense) is the ops' choice (multipoint_packed.cu); this file
// launches the one chosen.
#pragma once

#include <cstdint>

#include "cuda/act_quant.cuh"
#include "cuda/packed_kernels.cuh"

namespace mpq {
namespace packed_kernels {
// NB: internal linkage, as packed_kernels.cuh (one including translation unit per binary).
namespace {

// packed_linear_kernel of one configuration of the main loop (MT m16 tiles per warp, WARPS_K warps
// along K, U steps in flight) into out [M, out_features], and, when the plan splits K, the finalize
// kernel that sums the splits in a fixed order.
template <class Op, int MT, int WARPS_K, int U, class Launcher>
void launch_fused(Launcher& launch, const typename Op::Args& args, const PackedWeight& w, int64_t M, int64_t D,
                  const ActParams& act, bool int8_act, const float* bias, void* out, OutType type) {
  constexpr int64_t BM = 16 * MT * (kWarps / WARPS_K);
  const int sms = launch.multiprocessors();
  const LaunchPlan plan = plan_launch(w.num_tiles, M, w.slabs, BM, WARPS_K, sms);
  const int64_t n = M * int64_t{w.num_tiles} * kTileN;  // one partial sum per input row and packed row
  float* workspace = plan.splits > 1 ? launch.workspace(plan.splits * n) : nullptr;
  const dim3 grid(static_cast<unsigned>(w.num_tiles), static_cast<unsigned>(plan.grid_y),
                  static_cast<unsigned>(plan.splits));
  launch(grid, dim3(kThreads), 0, packed_linear_kernel<Op, MT, WARPS_K, U>, args, w, M, D, plan.m_blocks,
         plan.split_slabs, bias, act, out, type, workspace);
  if (plan.splits > 1) {
    launch(dim3(static_cast<unsigned>(cuda_detail::grid_for(n, kElementwiseThreads, sms))), dim3(kElementwiseThreads),
           0, finalize_kernel, static_cast<const float*>(workspace), static_cast<int>(plan.splits), M, w, int8_act,
           Op::kZeroLevel, bias, act, out, type);
  }
}

// The two configurations of the main loop: M <= 16 (one m16 tile, the warps split K: "gemv") and
// larger M (the warps split M, two m16 tiles each: "mma").
template <class Op, class Launcher>
void launch_config(Launcher& launch, bool small_m, const typename Op::Args& args, const PackedWeight& w, int64_t M,
                   int64_t D, const ActParams& act, bool int8_act, const float* bias, void* out, OutType type) {
  if (small_m) {
    launch_fused<Op, 1, kWarps, 4 / Op::kStepSlabs>(launch, args, w, M, D, act, int8_act, bias, out, type);
  } else {
    launch_fused<Op, 2, 1, 2 / Op::kStepSlabs>(launch, args, w, M, D, act, int8_act, bias, out, type);
  }
}

// The int8 levels of x [rows, D] into xq [rows, kp] (quantize_int8_kernel, one thread per word).
template <typename scalar_t, class Launcher>
void launch_quantize_int8(Launcher& launch, const scalar_t* x, int64_t rows, int64_t D, int64_t kp,
                          const ActParams& act, int8_t* xq) {
  const int64_t n = rows * kp / 4;
  if (n == 0) return;
  launch(dim3(static_cast<unsigned>(cuda_detail::grid_for(n, kElementwiseThreads, launch.multiprocessors()))),
         dim3(kElementwiseThreads), 0, quantize_int8_kernel<scalar_t>, x, rows, D, kp, act,
         reinterpret_cast<uint32_t*>(xq));
}

// The dense weight [out_features, D] of the packed one (decode_dense_kernel).
template <typename scalar_t, class Launcher>
void launch_decode_dense(Launcher& launch, const PackedWeight& w, int bits, int64_t D, scalar_t* out) {
  const int64_t n = int64_t{w.num_tiles} * kTileN * D;
  if (n == 0) return;
  launch(dim3(static_cast<unsigned>(cuda_detail::grid_for(n, kElementwiseThreads, launch.multiprocessors()))),
         dim3(kElementwiseThreads), 0, decode_dense_kernel<scalar_t>, w, bits, D, out);
}

}  // namespace
}  // namespace packed_kernels
}  // namespace mpq
