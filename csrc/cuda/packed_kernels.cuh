// The device code of the packed multipoint kernels (host code and launches:
// csrc/cuda/multipoint_packed.cu). Compiled by nvcc there, and by a host C++ compiler in
// tests/cpp/test_kernel_emulation.cpp, where tests/cpp/simt_emulator.h runs every thread of a CTA
// as a fiber and every mma.sync as a warp collective written from the PTX ISA's fragment tables:
// the kernels' own code computes on the CPU, so CI checks it without a GPU.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if !defined(MPQ_SIMT_EMULATION)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

#include "cuda/act_quant.cuh"
#include "cuda/shared_memory.cuh"
#include "kernels/conv_layout.h"
#include "kernels/layout.h"
#include "kernels/packed_layout.h"

namespace mpq {
namespace packed_kernels {
// NB: internal linkage: each binary has one including translation unit (the library's .cu, or the
// emulation test), and the test's host-compiled kernels must not interpose the library's symbols.
namespace {

using namespace mpq::packed;
using cuda_detail::ActParams;

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kElementwiseThreads = 256;
constexpr int64_t kMaxSplits = 16;
constexpr int64_t kGemvMaxM = 16;     // one m16 tile: memory bound, the "gemv" kernel
constexpr int64_t kDenseMinM = 1024;  // from here on, decode once and run cuBLAS (docs/PERF.md allows it)
// kInt8MaxK (the int8 kernel's largest Kp): csrc/kernels/packed_layout.h.

// ---- the launch ------------------------------------------------------------------------------

// Grid of packed_linear_kernel: x = tile, y = block of BM rows (at most 65535, the kernel loops),
// z = K split. K is split while the tiles give fewer than two CTAs per multiprocessor, keeping at
// least one group of 4 slabs per warp and split; split_slabs is a multiple of 4 (of every
// kStepSlabs).
struct LaunchPlan {
  int64_t m_blocks, grid_y, splits, split_slabs;
};

inline LaunchPlan plan_launch(int64_t num_tiles, int64_t M, int64_t slabs, int64_t BM, int warps_k,
                              int multiprocessors) {
  constexpr int64_t kGranule = 4;
  LaunchPlan plan{};
  plan.m_blocks = (M + BM - 1) / BM;
  plan.grid_y = plan.m_blocks < 65535 ? plan.m_blocks : 65535;
  const int64_t ctas = num_tiles * plan.m_blocks;
  const int64_t target = 2 * static_cast<int64_t>(multiprocessors);
  int64_t splits = 1;
  if (ctas > 0 && ctas < target) {
    splits = (target + ctas - 1) / ctas;
    if (splits > kMaxSplits) splits = kMaxSplits;
    if (splits > slabs / (kGranule * warps_k)) splits = slabs / (kGranule * warps_k);
    if (splits < 1) splits = 1;
  }
  int64_t split_slabs = (slabs + splits - 1) / splits;
  split_slabs = (split_slabs + kGranule - 1) / kGranule * kGranule;
  plan.splits = split_slabs > 0 ? (slabs + split_slabs - 1) / split_slabs : 1;
  plan.split_slabs = split_slabs > 0 ? split_slabs : 1;
  return plan;
}

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
// (The device-side form of layout::int8_levels_fit and int8_zero_level_fits, csrc/kernels/layout.h,
// for act_qparams on the GPU, which the host does not read.)
__device__ __forceinline__ Epilogue int8_epilogue(const ActParams& act, bool zero_level) {
  constexpr float kMaxLevel = mpq::layout::kInt8Levels - 1;
  const auto q = cuda_detail::load_qparams<float>(act);
  const bool valid = q.valid && q.qmin == rintf(q.qmin) && q.qmax == rintf(q.qmax) &&
                     q.zero_point == rintf(q.zero_point) && q.qmax - q.qmin <= kMaxLevel &&
                     (!zero_level || (q.zero_point >= q.qmin && q.zero_point - q.qmin <= kMaxLevel));
  return {q.scale, q.qmin + 128.0f - q.zero_point, valid};
}

enum class OutType { kFloat, kHalf, kBFloat16 };

__device__ __forceinline__ void store_out(void* out, OutType type, int64_t i, float v) {
  if (type == OutType::kHalf) {
    static_cast<__half*>(out)[i] = __float2half_rn(v);
  } else if (type == OutType::kBFloat16) {
    static_cast<__nv_bfloat16*>(out)[i] = __float2bfloat16_rn(v);
  } else {
    static_cast<float*>(out)[i] = v;
  }
}

// v rounded to the output's dtype (and back): the bias as the generic path adds it, rounded to the
// input's dtype first, without a cast kernel per forward on the host.
__device__ __forceinline__ float round_to(OutType type, float v) {
  if (type == OutType::kHalf) return __half2float(__float2half_rn(v));
  if (type == OutType::kBFloat16) return __bfloat162float(__float2bfloat16_rn(v));
  return v;
}

// Output of packed row r (a channel, or padding) for one input row.
__device__ __forceinline__ void finish(const PackedWeight& w, const Epilogue& ep, const float* bias, void* out,
                                       OutType type, int64_t row, int64_t r, float acc) {
  const int ch = w.perm[r];
  if (ch < 0 || ch >= w.out_features) return;
  float v = NAN;
  if (ep.valid) {
    v = ep.beta != 0.0f ? ep.alpha * (acc + ep.beta * w.row_sums[r]) : ep.alpha * acc;
    if (bias != nullptr) v += round_to(type, bias[ch]);
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
#if defined(MPQ_SIMT_EMULATION)
  ::mpq_simt::mma_m16n8k16<std::is_same_v<T, __nv_bfloat16>>(d, a, b0, b1);
#elif !defined(MPQ_NO_MMA)
#define MPQ_MMA_16816(TYPE)                                                             \
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." TYPE "." TYPE                   \
               ".f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n" \
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                         \
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
#if defined(MPQ_SIMT_EMULATION)
  ::mpq_simt::mma_m16n8k32_s8(d, a, b0, b1);
#elif !defined(MPQ_NO_MMA)
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
  static constexpr int kChunks = BITS / 4;   // 16-byte vectors per lane and slab
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
  static __device__ __forceinline__ void rows(const Args&, int64_t M, int64_t D, int64_t row0, int, Rows<MT>& r) {
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
  static __device__ __forceinline__ void mma_step(float (&)[MT][8][4], PointState<MT>& ps, const uint32_t (&a)[MT][4],
                                                  const uint4 (&b)[kStepSlabs][kChunks]) {
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
  static __device__ __forceinline__ void rows(const Args& args, int64_t, int64_t, int64_t row0, int lane, Rows<MT>& r) {
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
  static __device__ __forceinline__ void rows(const Args& args, int64_t, int64_t, int64_t row0, int lane, Rows<MT>& r) {
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
  MPQ_SHARED(float, partial, [WARPS_K > 1 ? WARPS_K * BM * kTileN : 1]);

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

}  // namespace
}  // namespace packed_kernels
}  // namespace mpq
