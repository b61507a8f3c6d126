// CUDA kernels of the packed multipoint weight (layout: csrc/kernels/packed_layout.h; semantics:
// the CPU kernel in csrc/cpu/multipoint_packed.cpp, fq(input) @ W^T + bias).
//
// Kernels of mpq::multipoint_linear_packed (`kernel` argument; "auto" picks by dtype and M):
//  * "gemv"  (auto for M <= 16, float16/bfloat16): fused weight-only. One CTA of 4 warps per tile of
//            64 channels (one point count) and K range; the warps split K; each warp reads every
//            slab of its K range once with one coalesced 128-bit load per lane and point, widens the
//            4-bit codes to fp16/bf16 in registers (OR with the exponent of 1024 / 128, one
//            subtraction), multiplies by the point's scale and runs mma.sync.m16n8k16 with the
//            activations (M <= 16 is exactly one m16 tile), fp32 accumulation; the warps' partial
//            sums meet in shared memory. The grid is split along K when the tiles alone give fewer
//            than two CTAs per multiprocessor (a float32 workspace and a finalize kernel, in a fixed
//            order: deterministic).
//  * "mma"   (auto for 16 < M < 1024): the same main loop with the 4 warps splitting M instead,
//            two m16 tiles each: a 128 x 64 CTA tile per packed tile.
//  * "int8"  (auto when act_qparams are on the host and describe <= 256 integer levels; the module
//            asks for it explicitly): W4A8. The input is quantized once to int8 levels v = q - (qmin
//            + 128) (a small kernel, writing each 16 columns in the slot order of the int8 mma
//            operands), each point runs mma.sync.m16n8k32.s8 into int32 and is added as
//            scale_p * (float) acc_p; the epilogue applies act scale * (sum + (qmin + 128 - zp) *
//            row_sum) + bias.
//  * "dense" (auto for other dtypes, GPUs before sm_80, and M >= 1024): decode the packed weight to
//            a dense [C, D] tensor of the input's dtype (same float32 sums as the generic dequantize)
//            and run at::linear (cuBLAS).
// The output of packed row r goes straight to column perm[r] (no permutation pass). The fused
// kernels use mma.sync (sm_80+, valid on sm_90); on older GPUs, or builds without sm_80+ code, auto
// takes "dense" and an explicit request is an error.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/conv2d.h>
#include <ATen/ops/diff.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <mutex>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "cuda/act_quant.cuh"
#include "kernels/conv_layout.h"
#include "kernels/packed_layout.h"

namespace mpq {
namespace {

using namespace mpq::packed;
using cuda_detail::ActParams;

constexpr const char* kLinearOp = "mpq::multipoint_linear_packed";
constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kElementwiseThreads = 256;
constexpr int64_t kMaxSplits = 16;
constexpr int64_t kGemvMaxM = 16;     // one m16 tile: memory bound, the "gemv" kernel
constexpr int64_t kDenseMinM = 1024;  // from here on, decode once and run cuBLAS (PERF.md allows it)
// int32 accumulators of the int8 kernel: |v| <= 128, |q| <= 128, so K < 2^31 / 2^14; halved for margin.
constexpr int64_t kInt8MaxK = 65536;

// ---- the packed weight as kernel arguments ---------------------------------------------------

struct PackedWeight {
  const uint8_t* packed;    // [num_blocks, slabs, slab bytes]
  const float* scales;      // [num_blocks, 64]
  const int* perm;          // [num_tiles * 64]
  const int* tile_offsets;  // [num_tiles + 1]
  const float* row_sums;    // [num_tiles * 64]
  int64_t num_blocks;
  int64_t slabs;
  int num_tiles;
  int out_features;
};

// Tile t's first block and point count, clamped to the buffer: tile_offsets is not range-checked
// on the device (that would need a host sync), so damaged offsets read nothing outside the weight.
__device__ __forceinline__ void tile_blocks(const PackedWeight& w, int t, int64_t& first, int& points) {
  const int64_t a = min(max(static_cast<int64_t>(w.tile_offsets[t]), int64_t{0}), w.num_blocks);
  const int64_t b = min(max(static_cast<int64_t>(w.tile_offsets[t + 1]), a), w.num_blocks);
  first = a;
  points = static_cast<int>(b - a);
}

// y = alpha * (acc + beta * row_sum) + bias, or NaN everywhere when the activation parameters are
// unusable (what the generic path's fake quantization does without a host sync).
struct Epilogue {
  float alpha, beta;
  bool valid;
};

__device__ __forceinline__ Epilogue weight_only_epilogue() { return {1.0f, 0.0f, true}; }

// The int8 levels v = q - (qmin + 128) fit int8 when qmax - qmin <= 255 with integer qmin, qmax, zp.
// The convolution also stores the level of 0 (v = zp - qmin - 128) in its zero padding, so it
// needs qmin <= zp <= qmin + 255 (`zero_level`).
__device__ __forceinline__ Epilogue int8_epilogue(const ActParams& act, bool zero_level) {
  const auto q = cuda_detail::load_qparams<float>(act);
  const bool valid = q.valid && q.qmin == rintf(q.qmin) && q.qmax == rintf(q.qmax) &&
                     q.zero_point == rintf(q.zero_point) && q.qmax - q.qmin <= 255.0f &&
                     (!zero_level || (q.zero_point >= q.qmin && q.zero_point - q.qmin <= 255.0f));
  return {q.scale, q.qmin + 128.0f - q.zero_point, valid};
}

enum class OutType { kFloat, kHalf, kBFloat16 };

OutType out_type(at::ScalarType t) {
  return t == at::kHalf ? OutType::kHalf : (t == at::kBFloat16 ? OutType::kBFloat16 : OutType::kFloat);
}

__device__ __forceinline__ void store_out(void* out, OutType type, int64_t i, float v) {
  if (type == OutType::kHalf) {
    static_cast<__half*>(out)[i] = __float2half_rn(v);
  } else if (type == OutType::kBFloat16) {
    static_cast<__nv_bfloat16*>(out)[i] = __float2bfloat16_rn(v);
  } else {
    static_cast<float*>(out)[i] = v;
  }
}

// Output of packed row r (a channel, or padding) for one input row.
__device__ __forceinline__ void finish(const PackedWeight& w, const Epilogue& ep, const float* bias, void* out,
                                       OutType type, int64_t row, int64_t r, float acc) {
  const int ch = w.perm[r];
  if (ch < 0 || ch >= w.out_features) return;
  float v = NAN;
  if (ep.valid) {
    v = ep.beta != 0.0f ? ep.alpha * (acc + ep.beta * w.row_sums[r]) : ep.alpha * acc;
    if (bias != nullptr) v += bias[ch];
  }
  store_out(out, type, row * w.out_features + ch, v);
}

// ---- operands --------------------------------------------------------------------------------

__device__ __forceinline__ uint32_t word_of(const uint4& v, int i) {
  return i == 0 ? v.x : (i == 1 ? v.y : (i == 2 ? v.z : v.w));
}

template <typename T2>
__device__ __forceinline__ T2 bits_as(uint32_t u) {
  T2 v;
  memcpy(&v, &u, sizeof(v));
  return v;
}

template <typename T2>
__device__ __forceinline__ uint32_t as_bits(T2 v) {
  uint32_t u;
  memcpy(&u, &v, sizeof(u));
  return u;
}

template <typename T>
struct Pair;
template <>
struct Pair<__half> {
  using type = __half2;
  static constexpr uint32_t kMagic = kHalfMagic, kMagicBias = kHalfMagicBias;
  static __device__ __forceinline__ type splat(float s) { return __float2half2_rn(s); }
};
template <>
struct Pair<__nv_bfloat16> {
  using type = __nv_bfloat162;
  static constexpr uint32_t kMagic = kBf16Magic, kMagicBias = kBf16MagicBias;
  static __device__ __forceinline__ type splat(float s) { return __float2bfloat162_rn(s); }
};

// NB: mma.sync with these shapes needs sm_80; the host never launches the kernels on older GPUs
// (fused_kernels_available), and builds for older architectures compile a trap instead.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define MPQ_NO_MMA 1
#endif

// D += A B for one m16n8k16 tile, T = __half or __nv_bfloat16 operands, float32 accumulators.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#ifndef MPQ_NO_MMA
#define MPQ_MMA_16816(TYPE)                                                                                  \
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." TYPE "." TYPE                                       \
               ".f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"                   \
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                                              \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1))
  if constexpr (std::is_same_v<T, __half>) {
    MPQ_MMA_16816("f16");
  } else {
    MPQ_MMA_16816("bf16");
  }
#undef MPQ_MMA_16816
#else
  __trap();
#endif
}

__device__ __forceinline__ void mma_16832_s8(int (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#ifndef MPQ_NO_MMA
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
  __trap();
#endif
}

// Two consecutive 16-bit activations x[row, k], x[row, k + 1] (k even), zero outside [M, D).
// `vec`: D even and x 4-byte aligned, so the pair is one 32-bit load.
template <typename T>
__device__ __forceinline__ uint32_t load_pair(const T* x, int64_t M, int64_t D, int64_t row, int64_t k, bool vec) {
  if (row >= M || k >= D) return 0u;
  const auto* p = reinterpret_cast<const unsigned short*>(x + row * D + k);
  if (vec) return __ldg(reinterpret_cast<const unsigned int*>(p));
  const uint32_t lo = __ldg(p);
  const uint32_t hi = k + 1 < D ? __ldg(p + 1) : 0u;
  return lo | (hi << 16);
}

// Weight-only: activations of type T (fp16 / bf16), one slab (k16) per step, the point's scale
// applied to the widened codes before the mma (one fp16/bf16 rounding per point and weight).
template <typename T, int BITS>
struct WeightOnly {
  using T2 = typename Pair<T>::type;
  static constexpr int kStepSlabs = 1;
  static constexpr bool kZeroLevel = false;  // int8 epilogue only
  static constexpr int kChunks = BITS / 4;  // 16-byte vectors per lane and slab
  static constexpr int kSlabBytes = BITS == 4 ? kChunkBytes : 2 * kChunkBytes;
  struct Args {
    const T* x;  // [M, D]
    bool vec;
  };
  template <int MT>
  struct PointState {
    T2 scale[8];  // of rows 8 j + g
  };

  static __device__ __forceinline__ Epilogue epilogue(const ActParams&) { return weight_only_epilogue(); }

  template <int MT>
  static __device__ __forceinline__ void begin_point(PointState<MT>& ps, const PackedWeight& w, int64_t block,
                                                     int lane) {
#pragma unroll
    for (int j = 0; j < 8; ++j) ps.scale[j] = Pair<T>::splat(w.scales[block * kTileN + 8 * j + lane / 4]);
  }

  static __device__ __forceinline__ Args tile_args(const Args& args, const PackedWeight&, int) { return args; }

  // The warp's input rows (row0: its first row; the m16 tile mt is rows row0 + 16 mt ..).
  template <int MT>
  struct Rows {
    int64_t row0, M, D;
  };
  template <int MT>
  static __device__ __forceinline__ void rows(const Args&, int64_t M, int64_t D, int64_t row0, int,
                                              Rows<MT>& r) {
    r = {row0, M, D};
  }

  // A of m16 tile mt and one slab starting at column k0.
  template <int MT>
  static __device__ __forceinline__ void load_a(const Args& args, const Rows<MT>& r, int mt, int64_t k0, int lane,
                                                uint32_t (&a)[4]) {
    const int g = lane / 4, t = lane % 4;
    const int64_t row = r.row0 + 16 * mt;
    a[0] = load_pair(args.x, r.M, r.D, row + g, k0 + 2 * t, args.vec);
    a[1] = load_pair(args.x, r.M, r.D, row + g + 8, k0 + 2 * t, args.vec);
    a[2] = load_pair(args.x, r.M, r.D, row + g, k0 + 2 * t + 8, args.vec);
    a[3] = load_pair(args.x, r.M, r.D, row + g + 8, k0 + 2 * t + 8, args.vec);
  }

  // The exact codes of register r of subtile j (columns 2t + 8r, 2t + 8r + 1) as a pair of T.
  static __device__ __forceinline__ T2 codes(const uint4 (&b)[kChunks], int j, int r) {
    if constexpr (BITS == 4) {
      const uint32_t bits = nibble_pair(word_of(b[0], j / 2), 2 * (j % 2) + r) | Pair<T>::kMagic;
      return __hsub2(bits_as<T2>(bits), bits_as<T2>(Pair<T>::kMagicBias));
    } else if constexpr (std::is_same_v<T, __half>) {
      return __hsub2(bits_as<T2>(byte_pair_half_bits(word_of(b[j / 4], j % 4), r)), bits_as<T2>(kHalfByteBias));
    } else {
      const uint32_t word = word_of(b[j / 4], j % 4);
      const float lo = static_cast<float>(static_cast<int8_t>((word >> (16 * r)) & 0xFFu));
      const float hi = static_cast<float>(static_cast<int8_t>((word >> (16 * r + 8)) & 0xFFu));
      return __floats2bfloat162_rn(lo, hi);
    }
  }

  template <int MT>
  static __device__ __forceinline__ void mma_step(float (&acc)[MT][8][4], PointState<MT>& ps,
                                                  const uint32_t (&a)[MT][4], const uint4 (&b)[kStepSlabs][kChunks]) {
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const uint32_t b0 = as_bits(__hmul2(codes(b[0], j, 0), ps.scale[j]));
      const uint32_t b1 = as_bits(__hmul2(codes(b[0], j, 1), ps.scale[j]));
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) mma_16816<T>(acc[mt][j], a[mt], b0, b1);
    }
  }

  template <int MT>
  static __device__ __forceinline__ void end_point(float (&)[MT][8][4], const PointState<MT>&, const PackedWeight&,
                                                   int64_t, int) {}
};

// int8 activations: levels written by quantize_int8_kernel ([M, Kp], each slab in slot order), two
// slabs (k32) per step, each point accumulated exactly in int32 and scaled when the point ends.
template <int BITS>
struct Int8Act {
  static constexpr int kStepSlabs = 2;
  static constexpr bool kZeroLevel = false;  // no zero padding in the input levels
  static constexpr int kChunks = BITS / 4;
  static constexpr int kSlabBytes = BITS == 4 ? kChunkBytes : 2 * kChunkBytes;
  struct Args {
    const int8_t* xq;  // [M, Kp]
    int64_t kp;
  };
  template <int MT>
  struct PointState {
    int acc[MT][8][4];
  };

  static __device__ __forceinline__ Epilogue epilogue(const ActParams& act) { return int8_epilogue(act, false); }

  template <int MT>
  static __device__ __forceinline__ void begin_point(PointState<MT>& ps, const PackedWeight&, int64_t, int) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int c = 0; c < 4; ++c) ps.acc[mt][j][c] = 0;
  }

  static __device__ __forceinline__ Args tile_args(const Args& args, const PackedWeight&, int) { return args; }

  template <int MT>
  struct Rows {
    int64_t row0, M;
  };
  template <int MT>
  static __device__ __forceinline__ void rows(const Args&, int64_t M, int64_t, int64_t row0, int, Rows<MT>& r) {
    r = {row0, M};
  }

  static __device__ __forceinline__ uint32_t load_word(const Args& args, int64_t M, int64_t row, int64_t col) {
    return row < M ? __ldg(reinterpret_cast<const unsigned int*>(args.xq + row * args.kp + col)) : 0u;
  }

  // A of m16n8k32: registers (row g, slab 0), (row g + 8, slab 0), (row g, slab 1), (row g + 8, slab 1),
  // each the 4 slots 4t..4t+3.
  template <int MT>
  static __device__ __forceinline__ void load_a(const Args& args, const Rows<MT>& r, int mt, int64_t k0, int lane,
                                                uint32_t (&a)[4]) {
    const int g = lane / 4, t = lane % 4;
    const int64_t row = r.row0 + 16 * mt;
    a[0] = load_word(args, r.M, row + g, k0 + 4 * t);
    a[1] = load_word(args, r.M, row + g + 8, k0 + 4 * t);
    a[2] = load_word(args, r.M, row + g, k0 + kSlabK + 4 * t);
    a[3] = load_word(args, r.M, row + g + 8, k0 + kSlabK + 4 * t);
  }

  // One B register: the 4 codes of subtile j in one slab, as int8 in slot order.
  static __device__ __forceinline__ uint32_t codes(const uint4 (&b)[kChunks], int j) {
    if constexpr (BITS == 4) {
      return nibbles_to_s8x4(word_of(b[0], j / 2), j % 2);
    } else {
      return word_of(b[j / 4], j % 4);
    }
  }

  template <int MT>
  static __device__ __forceinline__ void mma_step(float (&)[MT][8][4], PointState<MT>& ps,
                                                  const uint32_t (&a)[MT][4], const uint4 (&b)[kStepSlabs][kChunks]) {
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const uint32_t b0 = codes(b[0], j), b1 = codes(b[1], j);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) mma_16832_s8(ps.acc[mt][j], a[mt], b0, b1);
    }
  }

  // acc += scale_p * acc_p, with the scales of the accumulator columns 8 j + 2 t, 8 j + 2 t + 1.
  template <int MT>
  static __device__ __forceinline__ void end_point(float (&acc)[MT][8][4], const PointState<MT>& ps,
                                                   const PackedWeight& w, int64_t block, int lane) {
    const float* s = w.scales + block * kTileN + 2 * (lane % 4);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const float s0 = __ldg(s + 8 * j), s1 = __ldg(s + 8 * j + 1);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        acc[mt][j][0] += s0 * static_cast<float>(ps.acc[mt][j][0]);
        acc[mt][j][1] += s1 * static_cast<float>(ps.acc[mt][j][1]);
        acc[mt][j][2] += s0 * static_cast<float>(ps.acc[mt][j][2]);
        acc[mt][j][3] += s1 * static_cast<float>(ps.acc[mt][j][3]);
      }
    }
  }
};

// ---- implicit-GEMM operands of the packed conv2d (index math: csrc/kernels/conv_layout.h) ------

// Rows g and g + 8 of each of the warp's m16 tiles, decoded once per m-block.
template <int MT>
struct ConvRows {
  ConvRow r[MT][2];
};

__device__ __forceinline__ int tile_channel0(const ConvShape& s, const PackedWeight& w, int tile) {
  return conv_tile_channel0(s, w.perm[static_cast<int64_t>(tile) * kTileN]);
}

template <int MT>
__device__ __forceinline__ void conv_rows(const ConvShape& s, int64_t row0, int lane, ConvRows<MT>& r) {
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    r.r[mt][0] = conv_row(s, row0 + 16 * mt + lane / 4);
    r.r[mt][1] = conv_row(s, row0 + 16 * mt + lane / 4 + 8);
  }
}

// Weight-only: fp16/bf16 activations from the NHWC input, as WeightOnly otherwise.
template <typename T, int BITS>
struct ConvWeightOnly : WeightOnly<T, BITS> {
  struct Args {
    const T* x;  // [N, H, W, C]
    ConvShape s;
    int c0;    // the tile's first input channel (tile_args)
    bool vec;  // Cg and C even, x 4-byte aligned: a column pair (k even) is one 32-bit load
  };
  template <int MT>
  using Rows = ConvRows<MT>;

  static __device__ __forceinline__ Args tile_args(const Args& args, const PackedWeight& w, int tile) {
    Args a = args;
    a.c0 = tile_channel0(args.s, w, tile);
    return a;
  }
  template <int MT>
  static __device__ __forceinline__ void rows(const Args& args, int64_t, int64_t, int64_t row0, int lane,
                                              Rows<MT>& r) {
    conv_rows(args.s, row0, lane, r);
  }

  static __device__ __forceinline__ uint32_t element(const Args& args, const ConvRow& r, const ConvCol& col) {
    const int64_t off = conv_offset(args.s, r, col, args.c0);
    return off < 0 ? 0u : static_cast<uint32_t>(__ldg(reinterpret_cast<const unsigned short*>(args.x + off)));
  }

  // A[m, k], A[m, k + 1] (k even) as one register.
  static __device__ __forceinline__ uint32_t pair(const Args& args, const ConvRow& r, int64_t k) {
    const ConvCol col = conv_col(args.s, k);
    if (args.vec) {  // c even, so c + 1 < Cg: the same pixel
      const int64_t off = conv_offset(args.s, r, col, args.c0);
      return off < 0 ? 0u : __ldg(reinterpret_cast<const unsigned int*>(args.x + off));
    }
    return element(args, r, col) | (element(args, r, conv_col(args.s, k + 1)) << 16);
  }

  template <int MT>
  static __device__ __forceinline__ void load_a(const Args& args, const Rows<MT>& r, int mt, int64_t k0, int lane,
                                                uint32_t (&a)[4]) {
    const int t = lane % 4;
    a[0] = pair(args, r.r[mt][0], k0 + 2 * t);
    a[1] = pair(args, r.r[mt][1], k0 + 2 * t);
    a[2] = pair(args, r.r[mt][0], k0 + 2 * t + 8);
    a[3] = pair(args, r.r[mt][1], k0 + 2 * t + 8);
  }
};

// int8 activations: levels of the NHWC input (quantize_int8_kernel over [N * H * W, C], each 16
// channels in slot order; Cg % 16 == 0, so a slab is 16 channels of one pixel), the level of 0 in
// the zero padding; as Int8Act otherwise.
template <int BITS>
struct ConvInt8 : Int8Act<BITS> {
  struct Args {
    const int8_t* xq;  // [N, H, W, C]
    ConvShape s;
    ActParams act;
    int c0;        // the tile's first input channel (tile_args)
    uint32_t pad;  // the level of 0, v = zp - qmin - 128, in every byte (tile_args)
  };
  static constexpr bool kZeroLevel = true;
  template <int MT>
  using Rows = ConvRows<MT>;

  static __device__ __forceinline__ Epilogue epilogue(const ActParams& act) { return int8_epilogue(act, true); }

  static __device__ __forceinline__ Args tile_args(const Args& args, const PackedWeight& w, int tile) {
    Args a = args;
    a.c0 = tile_channel0(args.s, w, tile);
    const auto q = cuda_detail::load_qparams<float>(args.act);
    const float v = fminf(fmaxf(q.zero_point - q.qmin - 128.0f, -128.0f), 127.0f);  // exact when valid
    a.pad = 0x01010101u * static_cast<uint32_t>(static_cast<uint8_t>(static_cast<int8_t>(q.valid ? v : 0.0f)));
    return a;
  }
  template <int MT>
  static __device__ __forceinline__ void rows(const Args& args, int64_t, int64_t, int64_t row0, int lane,
                                              Rows<MT>& r) {
    conv_rows(args.s, row0, lane, r);
  }

  // Slots 4t..4t+3 of the slab starting at column k (a multiple of 16).
  static __device__ __forceinline__ uint32_t word(const Args& args, const ConvRow& r, const ConvCol& col, int t) {
    if (r.image < 0 || !col.valid) return 0u;  // rows beyond M are not written; codes beyond D are 0
    const int64_t off = conv_offset(args.s, r, col, args.c0);
    return off < 0 ? args.pad : __ldg(reinterpret_cast<const unsigned int*>(args.xq + off + 4 * t));
  }

  template <int MT>
  static __device__ __forceinline__ void load_a(const Args& args, const Rows<MT>& r, int mt, int64_t k0, int lane,
                                                uint32_t (&a)[4]) {
    const int t = lane % 4;
    const ConvCol c0 = conv_col(args.s, k0), c1 = conv_col(args.s, k0 + kSlabK);
    a[0] = word(args, r.r[mt][0], c0, t);
    a[1] = word(args, r.r[mt][1], c0, t);
    a[2] = word(args, r.r[mt][0], c1, t);
    a[3] = word(args, r.r[mt][1], c1, t);
  }
};

// ---- the fused kernel ------------------------------------------------------------------------
//
// Grid: x = tile (64 packed rows, one point count), y = block of BM input rows (looped when there
// are more than 65535), z = K split. Warp w works on rows wm = w % WARPS_M and slabs of K group
// wk = w / WARPS_M; U steps of kStepSlabs slabs are loaded (128-bit per lane) before any is used.
// Accumulator element (mt, j, c) of a lane (g, t) is row 16 mt + g + 8 (c / 2) of the warp's
// rows and packed row 8 j + 2 t + c % 2 of the tile (mma.sync's C layout).
template <class Op, int MT, int WARPS_K, int U>
__global__ void __launch_bounds__(kThreads)
    packed_linear_kernel(typename Op::Args args, PackedWeight w, int64_t M, int64_t D, int64_t m_blocks,
                         int64_t split_slabs, const float* __restrict__ bias, ActParams act, void* out, OutType type,
                         float* __restrict__ workspace) {
  constexpr int kWarpsM = kWarps / WARPS_K;
  constexpr int BM = 16 * MT * kWarpsM;
  constexpr int SS = Op::kStepSlabs;
  constexpr int CH = Op::kChunks;
  __shared__ float partial[WARPS_K > 1 ? WARPS_K * BM * kTileN : 1];

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int wm = warp % kWarpsM, wk = warp / kWarpsM;
  const int g = lane / 4, t = lane % 4;
  const int tile = blockIdx.x;
  int64_t first_block;
  int points;
  tile_blocks(w, tile, first_block, points);
  const int64_t s_begin = static_cast<int64_t>(blockIdx.z) * split_slabs;
  const int64_t s_end = min(s_begin + split_slabs, w.slabs);
  const int64_t n_pad = static_cast<int64_t>(w.num_tiles) * kTileN;
  const Epilogue ep = Op::epilogue(act);
  const typename Op::Args targs = Op::tile_args(args, w, tile);

  for (int64_t mb = blockIdx.y; mb < m_blocks; mb += gridDim.y) {
    const int64_t row0 = mb * BM + wm * 16 * MT;  // this warp's first row
    typename Op::template Rows<MT> rows;
    Op::rows(targs, M, D, row0, lane, rows);
    float acc[MT][8][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[mt][j][c] = 0.0f;

    for (int p = 0; p < points; ++p) {
      const int64_t block = first_block + p;
      const uint8_t* wp = w.packed + block * w.slabs * Op::kSlabBytes + kLaneBytes * lane;
      typename Op::template PointState<MT> ps;
      Op::begin_point(ps, w, block, lane);
      for (int64_t s0 = s_begin + static_cast<int64_t>(wk) * U * SS; s0 < s_end;
           s0 += static_cast<int64_t>(WARPS_K) * U * SS) {
        uint4 b[U][SS][CH];
        uint32_t a[U][MT][4];
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int64_t s = s0 + u * SS;
          if (s < s_end) {  // s_end is a multiple of SS
#pragma unroll
            for (int ss = 0; ss < SS; ++ss)
#pragma unroll
              for (int c = 0; c < CH; ++c)
                b[u][ss][c] = __ldg(reinterpret_cast<const uint4*>(wp + (s + ss) * Op::kSlabBytes + kChunkBytes * c));
          }
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int64_t s = s0 + u * SS;
          if (s < s_end) {
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) Op::load_a(targs, rows, mt, s * kSlabK, lane, a[u][mt]);
          }
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
          // NB: a step past the end is skipped, not zero-filled: zero bytes decode to code -8.
          if (s0 + u * SS < s_end) Op::mma_step(acc, ps, a[u], b[u]);
        }
      }
      Op::end_point(acc, ps, w, block, lane);
    }

    // One value per (row, packed row): the output, or this split's partial sum.
    const auto emit = [&](int64_t row, int n, float v) {
      if (row >= M) return;
      const int64_t r = static_cast<int64_t>(tile) * kTileN + n;
      if (gridDim.z == 1) {
        finish(w, ep, bias, out, type, row, r, v);
      } else {
        workspace[(static_cast<int64_t>(blockIdx.z) * M + row) * n_pad + r] = v;
      }
    };
    if constexpr (WARPS_K == 1) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int j = 0; j < 8; ++j)
#pragma unroll
          for (int c = 0; c < 4; ++c) emit(row0 + 16 * mt + g + 8 * (c / 2), 8 * j + 2 * t + c % 2, acc[mt][j][c]);
    } else {
      __syncthreads();  // the previous m-block's readers are done with `partial`
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int j = 0; j < 8; ++j)
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            const int local_row = wm * 16 * MT + 16 * mt + g + 8 * (c / 2);
            partial[(wk * BM + local_row) * kTileN + 8 * j + 2 * t + c % 2] = acc[mt][j][c];
          }
      __syncthreads();
      for (int e = threadIdx.x; e < BM * kTileN; e += kThreads) {
        float v = 0.0f;
#pragma unroll
        for (int k = 0; k < WARPS_K; ++k) v += partial[k * BM * kTileN + e];
        emit(mb * BM + e / kTileN, e % kTileN, v);
      }
    }
  }
}

// Sums the K splits of the workspace [splits, M, n_pad] in split order and writes the output.
__global__ void __launch_bounds__(kElementwiseThreads)
    finalize_kernel(const float* __restrict__ workspace, int splits, int64_t M, PackedWeight w, bool int8_act,
                    bool zero_level, const float* __restrict__ bias, ActParams act, void* out, OutType type) {
  const int64_t n_pad = static_cast<int64_t>(w.num_tiles) * kTileN;
  const Epilogue ep = int8_act ? int8_epilogue(act, zero_level) : weight_only_epilogue();
  for (int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < M * n_pad;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t row = i / n_pad, r = i - row * n_pad;
    float v = 0.0f;
    for (int z = 0; z < splits; ++z) v += workspace[z * M * n_pad + i];
    finish(w, ep, bias, out, type, row, r, v);
  }
}

// Input levels for the int8 kernel: xq[row, 16 s + slot] = clamp(round(x / scale) + zp, qmin, qmax)
// - (qmin + 128) of column 16 s + s8_slot_column(slot); 0 beyond D, and 0 everywhere when the
// parameters are unusable (the main kernel then writes NaN). One thread per 4 slots (one word).
template <typename scalar_t>
__global__ void __launch_bounds__(kElementwiseThreads)
    quantize_int8_kernel(const scalar_t* __restrict__ x, int64_t M, int64_t D, int64_t kp, ActParams act,
                         uint32_t* __restrict__ xq) {
  using op_t = cuda_detail::compute_t<scalar_t>;
  const auto q = cuda_detail::load_qparams<op_t>(act);
  const bool valid = int8_epilogue(act, false).valid;
  const op_t base = q.qmin + op_t(128);
  const int64_t words_per_row = kp / 4;
  for (int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < M * words_per_row;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t row = i / words_per_row, word = i - row * words_per_row;
    const int64_t col0 = (word / 4) * kSlabK;
    const int slot0 = static_cast<int>(word % 4) * 4;
    uint32_t packed = 0;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int64_t k = col0 + s8_slot_column(slot0 + e);
      int v = 0;
      if (valid && k < D) {
        const op_t level = cuda_detail::quant_level(x[row * D + k], q);
        v = isnan(level) ? 0 : min(max(static_cast<int>(level - base), -128), 127);
      }
      packed |= static_cast<uint32_t>(static_cast<uint8_t>(static_cast<int8_t>(v))) << (8 * e);
    }
    xq[i] = packed;
  }
}

// Dense weight out[perm[r], k] = sum_p scale_p * code_p in the generic dequantize's order and
// precision (float32, float64 for float64), for the "dense" path.
template <typename scalar_t>
__global__ void __launch_bounds__(kElementwiseThreads)
    decode_dense_kernel(PackedWeight w, int bits, int64_t D, scalar_t* __restrict__ out) {
  using acc_t = cuda_detail::compute_t<scalar_t>;
  const int64_t n_pad = static_cast<int64_t>(w.num_tiles) * kTileN;
  const int64_t block_bytes = w.slabs * slab_bytes(bits);
  for (int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < n_pad * D;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t r = i / D, k = i - r * D;
    const int ch = w.perm[r];
    if (ch < 0 || ch >= w.out_features) continue;
    int64_t first;
    int points;
    tile_blocks(w, static_cast<int>(r / kTileN), first, points);
    const int n = static_cast<int>(r % kTileN);
    acc_t acc = 0;
    for (int p = 0; p < points; ++p) {
      const int64_t block = first + p;
      acc += static_cast<acc_t>(w.scales[block * kTileN + n]) *
             static_cast<acc_t>(load_code(w.packed + block * block_bytes, bits, n, k));
    }
    out[ch * D + k] = static_cast<scalar_t>(acc);
  }
}

// ---- host side -------------------------------------------------------------------------------

struct Operands {
  at::Tensor packed, scales, perm, tile_offsets, row_sums;  // contiguous, aligned
  PackedWeight w;
  int bits;
};

Operands operands(const at::Tensor& packed, const at::Tensor& packed_scales, const at::Tensor& perm,
                  const at::Tensor& tile_offsets, const at::Tensor& row_sums, int64_t out_features) {
  Operands o;
  o.packed = packed.contiguous();
  // NB: the kernels read 16-byte vectors; an offset view gets an aligned copy rather than an error.
  if (reinterpret_cast<uintptr_t>(o.packed.data_ptr()) % 16 != 0) o.packed = o.packed.clone();
  o.scales = packed_scales.contiguous();
  o.perm = perm.contiguous();
  o.tile_offsets = tile_offsets.contiguous();
  o.row_sums = row_sums.contiguous();
  o.bits = packed.size(2) == slab_bytes(4) ? 4 : 8;
  o.w = PackedWeight{o.packed.data_ptr<uint8_t>(), o.scales.data_ptr<float>(), o.perm.data_ptr<int>(),
                     o.tile_offsets.data_ptr<int>(), o.row_sums.data_ptr<float>(), o.packed.size(0),
                     o.packed.size(1), static_cast<int>(o.perm.size(0) / kTileN), static_cast<int>(out_features)};
  return o;
}

int device_attribute(cudaDeviceAttr attr) {
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attr, c10::cuda::current_device()));
  return value;
}

int multiprocessors() { return device_attribute(cudaDevAttrMultiProcessorCount); }

// Whether the fused kernels have sm_80+ code for the current device (mma.sync): the GPU's
// capability and the architectures this library was compiled for, read once per device.
bool fused_kernels_available() {
  static std::mutex mutex;
  static std::vector<int> known;  // per device: -1 unknown, 0 no, 1 yes
  const int device = c10::cuda::current_device();
  std::lock_guard<std::mutex> lock(mutex);
  if (static_cast<int>(known.size()) <= device) known.resize(device + 1, -1);
  if (known[device] < 0) {
    cudaFuncAttributes attr{};
    C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, finalize_kernel));
    const int major = device_attribute(cudaDevAttrComputeCapabilityMajor);
    known[device] = major >= 8 && attr.ptxVersion >= 80 && attr.binaryVersion >= 80 ? 1 : 0;
  }
  return known[device] == 1;
}

// Levels of act_qparams that the int8 kernel represents exactly (host values).
bool int8_levels_fit(const float* v) {
  const float scale = v[0], zp = v[1], qmin = v[2], qmax = v[3];
  return scale > 0.0f && std::isfinite(scale) && std::isfinite(zp) && std::isfinite(qmin) && std::isfinite(qmax) &&
         qmin < qmax && qmin == std::rint(qmin) && qmax == std::rint(qmax) && zp == std::rint(zp) &&
         qmax - qmin <= 255.0f;
}

template <class Op, int MT, int WARPS_K, int U>
void launch_fused(const typename Op::Args& args, const Operands& o, int64_t M, int64_t D, const ActParams& act,
                  bool int8_act, const float* bias, at::Tensor& out, cudaStream_t stream) {
  constexpr int64_t BM = 16 * MT * (kWarps / WARPS_K);
  const PackedWeight& w = o.w;
  const int64_t m_blocks = (M + BM - 1) / BM;
  const int64_t ctas = static_cast<int64_t>(w.num_tiles) * m_blocks;
  // Split K while the tiles give fewer than two CTAs per multiprocessor, keeping at least one
  // group of 4 slabs per warp and split.
  constexpr int64_t kGranule = 4;  // slabs; a multiple of every kStepSlabs
  int64_t splits = 1;
  const int64_t target = 2 * static_cast<int64_t>(multiprocessors());
  if (ctas < target) {
    splits = std::min<int64_t>({kMaxSplits, (target + ctas - 1) / ctas, w.slabs / (kGranule * WARPS_K)});
    splits = std::max<int64_t>(splits, 1);
  }
  int64_t split_slabs = (w.slabs + splits - 1) / splits;
  split_slabs = (split_slabs + kGranule - 1) / kGranule * kGranule;
  splits = split_slabs > 0 ? (w.slabs + split_slabs - 1) / split_slabs : 1;
  split_slabs = std::max<int64_t>(split_slabs, 1);

  at::Tensor workspace;
  if (splits > 1) workspace = at::empty({splits, M, int64_t{w.num_tiles} * kTileN}, out.options().dtype(at::kFloat));
  const dim3 grid(static_cast<unsigned>(w.num_tiles), static_cast<unsigned>(std::min<int64_t>(m_blocks, 65535)),
                  static_cast<unsigned>(splits));
  packed_linear_kernel<Op, MT, WARPS_K, U><<<grid, kThreads, 0, stream>>>(
      args, w, M, D, m_blocks, split_slabs, bias, act, out.data_ptr(), out_type(out.scalar_type()),
      splits > 1 ? workspace.data_ptr<float>() : nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (splits > 1) {
    const int64_t n = M * int64_t{w.num_tiles} * kTileN;
    finalize_kernel<<<static_cast<unsigned>(cuda_detail::grid_for(n, kElementwiseThreads)), kElementwiseThreads, 0,
                      stream>>>(workspace.data_ptr<float>(), static_cast<int>(splits), M, w, int8_act, Op::kZeroLevel, bias, act,
                                out.data_ptr(), out_type(out.scalar_type()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// The two configurations of the main loop: M <= 16 (warps split K) and larger M (warps split M).
template <class Op>
void launch_config(bool small_m, const typename Op::Args& args, const Operands& o, int64_t M, int64_t D,
                   const ActParams& act, bool int8_act, const float* bias, at::Tensor& out, cudaStream_t stream) {
  if (small_m) {
    launch_fused<Op, 1, kWarps, 4 / Op::kStepSlabs>(args, o, M, D, act, int8_act, bias, out, stream);
  } else {
    launch_fused<Op, 2, 1, 2 / Op::kStepSlabs>(args, o, M, D, act, int8_act, bias, out, stream);
  }
}

at::Tensor decode_dense(const Operands& o, int64_t D, at::ScalarType dtype) {
  if (dtype != at::kDouble && dtype != at::kFloat && dtype != at::kHalf && dtype != at::kBFloat16) {
    return decode_dense(o, D, at::kFloat).to(dtype);  // float8: float32, then a cast, as the CPU does
  }
  auto out = at::empty({int64_t{o.w.out_features}, D}, o.packed.options().dtype(dtype));
  const int64_t n = int64_t{o.w.num_tiles} * kTileN * D;
  if (out.numel() == 0 || n == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "mpq::multipoint_linear_packed_decode", [&] {
    decode_dense_kernel<scalar_t>
        <<<static_cast<unsigned>(cuda_detail::grid_for(n, kElementwiseThreads)), kElementwiseThreads, 0, stream>>>(
            o.w, o.bits, D, out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// The int8 levels of x [rows, D] (float16, bfloat16 or float32) as int8 [rows, kp], each 16 columns
// in the slot order of the int8 mma operands (quantize_int8_kernel).
at::Tensor quantize_int8(const at::Tensor& x, int64_t rows, int64_t D, int64_t kp, const ActParams& act,
                         cudaStream_t stream) {
  auto xq = at::empty({rows, kp}, x.options().dtype(at::kChar));
  const int64_t n = rows * kp / 4;
  if (n == 0) return xq;
  const auto quantize = [&](auto tag) {
    using scalar_t = decltype(tag);
    quantize_int8_kernel<scalar_t>
        <<<static_cast<unsigned>(cuda_detail::grid_for(n, kElementwiseThreads)), kElementwiseThreads, 0, stream>>>(
            reinterpret_cast<const scalar_t*>(x.data_ptr()), rows, D, kp, act,
            reinterpret_cast<uint32_t*>(xq.data_ptr<int8_t>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (x.scalar_type() == at::kHalf) {
    quantize(at::Half{});
  } else if (x.scalar_type() == at::kBFloat16) {
    quantize(at::BFloat16{});
  } else {
    quantize(float{});
  }
  return xq;
}

void check_fused_available(const char* op, c10::string_view name) {
  TORCH_CHECK(fused_kernels_available(), op, ": kernel '", std::string(name),
              "' needs mma.sync (a GPU of compute capability 8.0 or newer and a build with sm_80+ code), got "
              "a GPU of capability ",
              device_attribute(cudaDevAttrComputeCapabilityMajor), ".",
              device_attribute(cudaDevAttrComputeCapabilityMinor));
}

PackedKernel resolve_kernel(PackedKernel asked, c10::string_view name, const at::Tensor& input, int64_t M,
                            int64_t kp, const c10::optional<at::Tensor>& act_qparams) {
  const bool fused = fused_kernels_available();
  if (asked != PackedKernel::kAuto) {
    if (asked != PackedKernel::kDense) check_fused_available(kLinearOp, name);
    if (asked == PackedKernel::kInt8) {
      TORCH_CHECK(kp <= kInt8MaxK, kLinearOp, ": kernel 'int8' supports in_features up to ", kInt8MaxK,
                  " (int32 accumulators), got Kp = ", kp);
      if (act_qparams->is_cpu()) {
        const auto v = act_qparams->contiguous();
        TORCH_CHECK(int8_levels_fit(v.data_ptr<float>()), kLinearOp,
                    ": kernel 'int8' expects act_qparams with integer zero_point, qmin, qmax and at most 256 levels "
                    "(qmax - qmin <= 255), got ",
                    v.data_ptr<float>()[1], ", ", v.data_ptr<float>()[2], ", ", v.data_ptr<float>()[3]);
      }
    }
    return asked;
  }
  const auto dt = input.scalar_type();
  if (!fused || (dt != at::kHalf && dt != at::kBFloat16)) return PackedKernel::kDense;
  // act_qparams on the host can be checked without a sync; on the device the caller says "int8".
  if (act_qparams.has_value() && act_qparams->is_cpu() && kp <= kInt8MaxK &&
      int8_levels_fit(act_qparams->contiguous().data_ptr<float>())) {
    return PackedKernel::kInt8;
  }
  if (M <= kGemvMaxM) return PackedKernel::kGemv;
  return M < kDenseMinM ? PackedKernel::kMma : PackedKernel::kDense;
}

}  // namespace

at::Tensor multipoint_linear_packed_cuda(const at::Tensor& input, const at::Tensor& packed,
                                         const at::Tensor& packed_scales, const at::Tensor& perm,
                                         const at::Tensor& tile_offsets, const at::Tensor& row_sums,
                                         int64_t out_features, const c10::optional<at::Tensor>& bias,
                                         const c10::optional<at::Tensor>& act_qparams, c10::string_view kernel) {
  const PackedKernel asked = check_multipoint_linear_packed_args(input, packed, packed_scales, perm, tile_offsets,
                                                                 row_sums, out_features, bias, act_qparams, kernel);
  TORCH_CHECK(packed.is_cuda(), kLinearOp, ": expected the packed weight on a CUDA device, got ", packed.device());
  c10::cuda::CUDAGuard guard(input.device());
  const int64_t D = input.size(-1);
  const int64_t kp = packed.size(1) * kSlabK;
  std::vector<int64_t> out_shape(input.sizes().begin(), input.sizes().end() - 1);
  int64_t M = 1;
  for (const int64_t s : out_shape) M *= s;
  out_shape.push_back(out_features);
  const auto dtype = input.scalar_type();
  const PackedKernel k = resolve_kernel(asked, kernel, input, M, kp, act_qparams);
  const Operands o = operands(packed, packed_scales, perm, tile_offsets, row_sums, out_features);

  if (k == PackedKernel::kDense) {
    const auto w = decode_dense(o, D, dtype);
    c10::optional<at::Tensor> b;
    if (bias.has_value()) b = bias->to(dtype);
    return at::linear(cuda_detail::fake_quantize_activation(kLinearOp, input, act_qparams), w, b);
  }

  auto out = at::empty({M, out_features}, input.options());
  if (M == 0 || out_features == 0) return out.reshape(out_shape);
  // The bias as the generic path adds it: rounded to the input's dtype, added in float32.
  at::Tensor bias_f;
  if (bias.has_value()) bias_f = bias->to(dtype).to(at::kFloat).contiguous();
  const float* bias_ptr = bias.has_value() ? bias_f.data_ptr<float>() : nullptr;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  if (k == PackedKernel::kInt8) {
    at::Tensor qp;
    const ActParams act = cuda_detail::act_params(kLinearOp, *act_qparams, qp);
    const auto x = input.reshape({M, D}).contiguous();
    const auto xq = quantize_int8(x, M, D, kp, act, stream);
    const bool small_m = M <= kGemvMaxM;
    if (o.bits == 4) {
      launch_config<Int8Act<4>>(small_m, {xq.data_ptr<int8_t>(), kp}, o, M, D, act, true, bias_ptr, out, stream);
    } else {
      launch_config<Int8Act<8>>(small_m, {xq.data_ptr<int8_t>(), kp}, o, M, D, act, true, bias_ptr, out, stream);
    }
    return out.reshape(out_shape);
  }

  // Weight-only: fake-quantized activations (when act_qparams is given) in the input's dtype.
  const auto x = cuda_detail::fake_quantize_activation(kLinearOp, input, act_qparams).reshape({M, D}).contiguous();
  const bool vec = D % 2 == 0 && reinterpret_cast<uintptr_t>(x.data_ptr()) % 4 == 0;
  const bool small_m = k == PackedKernel::kGemv;
  const ActParams none{nullptr, {0.0f, 0.0f, 0.0f, 0.0f}};
  const auto run = [&](auto tag) {
    using T = decltype(tag);
    const T* xp = reinterpret_cast<const T*>(x.data_ptr());
    if (o.bits == 4) {
      launch_config<WeightOnly<T, 4>>(small_m, {xp, vec}, o, M, D, none, false, bias_ptr, out, stream);
    } else {
      launch_config<WeightOnly<T, 8>>(small_m, {xp, vec}, o, M, D, none, false, bias_ptr, out, stream);
    }
  };
  if (dtype == at::kHalf) {
    run(__half{});
  } else {
    run(__nv_bfloat16{});
  }
  return out.reshape(out_shape);
}

// ---- the packed conv2d ---------------------------------------------------------------------------

namespace {

constexpr const char* kConvOp = "mpq::multipoint_conv2d_packed";

// The int8 kernel also needs the level of 0 in int8 (qmin <= zp <= qmin + 255) and whole slabs of
// one pixel (16 | Cg).
bool conv_int8_fits(const at::Tensor& act_qparams, int64_t cg, int64_t kp) {
  if (!act_qparams.is_cpu() || cg % kSlabK != 0 || kp > kInt8MaxK) return false;
  const auto v = act_qparams.contiguous();
  const float* p = v.data_ptr<float>();
  return int8_levels_fit(p) && p[1] >= p[2] && p[1] - p[2] <= 255.0f;
}

PackedKernel resolve_conv_kernel(PackedKernel asked, c10::string_view name, const at::Tensor& input, int64_t cg,
                                 int64_t kp, const c10::optional<at::Tensor>& act_qparams) {
  if (asked == PackedKernel::kDense) return asked;
  if (asked != PackedKernel::kAuto) {
    check_fused_available(kConvOp, name);
    if (asked == PackedKernel::kInt8) {
      TORCH_CHECK(cg % kSlabK == 0, kConvOp, ": kernel 'int8' expects input channels per group (C_in / groups) ",
                  "divisible by 16, got ", cg);
      TORCH_CHECK(kp <= kInt8MaxK, kConvOp, ": kernel 'int8' supports kh * kw * C_in / groups up to ", kInt8MaxK,
                  " (int32 accumulators), got Kp = ", kp);
      if (act_qparams->is_cpu()) {
        const auto v = act_qparams->contiguous();
        const float* p = v.data_ptr<float>();
        TORCH_CHECK(conv_int8_fits(v, cg, kp), kConvOp,
                    ": kernel 'int8' expects act_qparams with integer zero_point, qmin, qmax, at most 256 levels "
                    "(qmax - qmin <= 255) and qmin <= zero_point <= qmin + 255, got ",
                    p[1], ", ", p[2], ", ", p[3]);
      }
    }
    return asked;
  }
  const auto dt = input.scalar_type();
  if (!fused_kernels_available() || (dt != at::kHalf && dt != at::kBFloat16)) return PackedKernel::kDense;
  if (act_qparams.has_value() && conv_int8_fits(*act_qparams, cg, kp)) return PackedKernel::kInt8;
  return PackedKernel::kIgemm;
}

}  // namespace

at::Tensor multipoint_conv2d_packed_cuda(const at::Tensor& input, const at::Tensor& packed,
                                         const at::Tensor& packed_scales, const at::Tensor& perm,
                                         const at::Tensor& tile_offsets, const at::Tensor& row_sums,
                                         int64_t out_channels, at::IntArrayRef kernel_size,
                                         const c10::optional<at::Tensor>& bias,
                                         const c10::optional<at::Tensor>& act_qparams, at::IntArrayRef stride,
                                         at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                         c10::string_view kernel) {
  const auto checked = check_multipoint_conv2d_packed_args(input, packed, packed_scales, perm, tile_offsets, row_sums,
                                                           out_channels, kernel_size, bias, act_qparams, stride,
                                                           padding, dilation, groups, kernel);
  TORCH_CHECK(packed.is_cuda(), kConvOp, ": expected the packed weight on a CUDA device, got ", packed.device());
  c10::cuda::CUDAGuard guard(input.device());
  const auto& out_shape = checked.out_shape;
  const int64_t N = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3);
  const int64_t cg = C / groups, D = checked.in_features, kp = packed.size(1) * kSlabK;
  const int64_t OH = out_shape[2], OW = out_shape[3], M = N * OH * OW;
  constexpr int64_t kIntMax = std::numeric_limits<int32_t>::max();
  TORCH_CHECK(D <= kIntMax && H * W <= kIntMax && C <= kIntMax && out_channels <= kIntMax, kConvOp,
              ": expected kh * kw * C_in / groups, H * W and the channel counts below 2^31, got input shape ",
              input.sizes());
  const auto dtype = input.scalar_type();
  const auto format = input.suggest_memory_format();
  const PackedKernel k = resolve_conv_kernel(checked.kernel, kernel, input, cg, kp, act_qparams);
  const Operands o = operands(packed, packed_scales, perm, tile_offsets, row_sums, out_channels);

  if (k == PackedKernel::kDense) {
    const auto x = cuda_detail::fake_quantize_activation(kConvOp, input, act_qparams);
    if (out_channels == 0) return at::empty(out_shape, input.options().memory_format(format));
    // Columns (kh, kw, c) back to the [C_out, C_in / groups, kh, kw] of a convolution weight.
    const auto w = decode_dense(o, D, dtype).view({out_channels, kernel_size[0], kernel_size[1], cg}).permute(
        {0, 3, 1, 2});
    c10::optional<at::Tensor> b;
    if (bias.has_value()) b = bias->to(dtype);
    return at::conv2d(x, w, b, stride, padding, dilation, groups);
  }

  auto out = at::empty(out_shape, input.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (M == 0 || out_channels == 0) return out.contiguous(format);
  at::Tensor bias_f;
  if (bias.has_value()) bias_f = bias->to(dtype).to(at::kFloat).contiguous();
  const float* bias_ptr = bias.has_value() ? bias_f.data_ptr<float>() : nullptr;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const ConvShape shape{M,
                        D,
                        static_cast<int>(H),
                        static_cast<int>(W),
                        static_cast<int>(C),
                        static_cast<int>(OH),
                        static_cast<int>(OW),
                        static_cast<int>(kernel_size[1]),
                        static_cast<int>(cg),
                        static_cast<int>(stride[0]),
                        static_cast<int>(stride[1]),
                        static_cast<int>(padding[0]),
                        static_cast<int>(padding[1]),
                        static_cast<int>(dilation[0]),
                        static_cast<int>(dilation[1]),
                        static_cast<int>(out_channels / groups)};
  const bool small_m = M <= kGemvMaxM;

  if (k == PackedKernel::kInt8) {
    at::Tensor qp;
    const ActParams act = cuda_detail::act_params(kConvOp, *act_qparams, qp);
    // NHWC levels: the rows of quantize_int8 are the pixels, its columns the channels.
    const auto x = input.contiguous(at::MemoryFormat::ChannelsLast);
    const auto xq = quantize_int8(x, N * H * W, C, C, act, stream);
    const typename ConvInt8<4>::Args args{xq.data_ptr<int8_t>(), shape, act, 0, 0u};
    if (o.bits == 4) {
      launch_config<ConvInt8<4>>(small_m, args, o, M, D, act, true, bias_ptr, out, stream);
    } else {
      launch_config<ConvInt8<8>>(small_m, {args.xq, shape, act, 0, 0u}, o, M, D, act, true, bias_ptr, out, stream);
    }
    return out.contiguous(format);
  }

  // Weight-only ("igemm"): fake-quantized activations (when act_qparams is given) in NHWC.
  const auto x = cuda_detail::fake_quantize_activation(kConvOp, input, act_qparams)
                     .contiguous(at::MemoryFormat::ChannelsLast);
  const bool vec = cg % 2 == 0 && C % 2 == 0 && reinterpret_cast<uintptr_t>(x.data_ptr()) % 4 == 0;
  const ActParams none{nullptr, {0.0f, 0.0f, 0.0f, 0.0f}};
  const auto run = [&](auto tag) {
    using T = decltype(tag);
    const T* xp = reinterpret_cast<const T*>(x.data_ptr());
    if (o.bits == 4) {
      launch_config<ConvWeightOnly<T, 4>>(small_m, {xp, shape, 0, vec}, o, M, D, none, false, bias_ptr, out, stream);
    } else {
      launch_config<ConvWeightOnly<T, 8>>(small_m, {xp, shape, 0, vec}, o, M, D, none, false, bias_ptr, out, stream);
    }
  };
  if (dtype == at::kHalf) {
    run(__half{});
  } else {
    run(__nv_bfloat16{});
  }
  return out.contiguous(format);
}

// Packing and unpacking run once per weight: their CPU kernels on host copies of the arguments,
// the results moved back to the arguments' device (one boxed kernel for both ops).
void on_host(const c10::OperatorHandle& op, c10::DispatchKeySet, torch::jit::Stack* stack) {
  const size_t args = op.schema().arguments().size();
  c10::optional<at::Device> device;
  for (size_t i = stack->size() - args; i < stack->size(); ++i) {
    auto& v = (*stack)[i];
    if (!v.isTensor()) continue;
    const at::Tensor t = v.toTensor();
    if (!device) device = t.device();
    TORCH_CHECK(t.device() == *device, op.schema().name(), ": expected every tensor argument on ", *device,
                ", got ", op.schema().arguments()[i - (stack->size() - args)].name(), " on ", t.device());
    v = t.cpu();
  }
  op.redispatchBoxed(c10::DispatchKeySet(c10::DispatchKey::CPU), stack);
  const size_t returns = op.schema().returns().size();
  for (size_t i = stack->size() - returns; i < stack->size(); ++i) (*stack)[i] = (*stack)[i].toTensor().to(*device);
}

}  // namespace mpq

TORCH_LIBRARY_IMPL(mpq, CUDA, m) {
  m.impl("pack_multipoint", torch::CppFunction::makeFromBoxedFunction<&mpq::on_host>());
  m.impl("unpack_multipoint", torch::CppFunction::makeFromBoxedFunction<&mpq::on_host>());
  m.impl("multipoint_linear_packed", &mpq::multipoint_linear_packed_cuda);
  m.impl("multipoint_conv2d_packed", &mpq::multipoint_conv2d_packed_cuda);
}
