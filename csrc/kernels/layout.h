// The rules of mpq's weight layouts that Python needs too, each defined once, here (torch-free; the
// packed GPU layout's own constants are in packed_layout.h). The ops library hands them to Python:
// mpq::layout_constants() returns the constants (below and packed_layout.h's) by name, and
// mpq::int8_levels_fit / mpq::packed_int8_fits evaluate the predicates (csrc/cpu/layout.cpp);
// python/mpq/layout.py reads them once. The C++ checks (csrc/checks.cpp), the stored form
// (csrc/cpu/multipoint_stored.cpp) and the CUDA kernels (csrc/cuda/multipoint_packed.cu) use them
// from here, so that Python and C++ cannot disagree.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "kernels/packed_layout.h"

namespace mpq {
namespace layout {

// ---- the multipoint weight -----------------------------------------------------------------------

// Symmetric codes of w_bits bits (-2^(w_bits-1) .. 2^(w_bits-1) - 1, held as int8), w_bits in
// kMinWBits..kMaxWBits: for mpq::fit_multipoint, pack_points, pack_multipoint and the modules.
constexpr int kMinWBits = 2;
constexpr int kMaxWBits = 8;

// Points per output channel (max_points): 1..kMaxPoints, for mpq::fit_multipoint, the modules and
// QuantConfig alike. No kernel limits the count: the fits, the stored form, the CPU int8 path (one
// expanded row per point) and the packed tiles loop over points with int32 counts and offsets. The
// bound catches a mistyped argument and keeps a fit's codes (C x max_points x D int8) and the
// allocation's per-point error table (C x max_points) within a few times the layer's float weight.
constexpr int kMaxPoints = 64;

// ---- the stored form (mpq::pack_points; what modules and files hold) ------------------------------

// One float32 scale per point in use (point_scales), one int32 count per channel (num_points).
constexpr int kScaleBits = 32;
constexpr int kCountBits = 32;
static_assert(sizeof(float) * 8 == kScaleBits, "point_scales are float32");
static_assert(sizeof(int32_t) * 8 == kCountBits, "num_points are int32");

// Bytes of one point's row in point_codes: D codes of w_bits bits, LSB first, the last byte padded.
constexpr int64_t stored_row_bytes(int64_t d, int64_t w_bits) { return (d * w_bits + 7) / 8; }

// ---- int8 activations ------------------------------------------------------------------------------

// The int8 paths represent an activation quantizer act_qparams = (scale, zero_point, qmin, qmax)
// exactly when it is valid (finite, scale > 0, qmin < qmax) and has an integer zero point and range
// of at most kInt8Levels levels: levels L - qmin are uint8 on the CPU, v = L - qmin - 128 int8 on
// the GPU.
constexpr int kInt8Levels = 256;

// oneDNN's CPU int8 kernels without VNNI add each pair of uint8 x int8 products into a saturating
// int16 (vpmaddubsw): exact while 2 * (levels - 1) * max|code| <= 32767 for activations of `levels`
// levels, i.e. codes of at most 7 bits with 8-bit activations, and every int8 code (|code| <= 128)
// with 7-bit activations, as PyTorch's x86 int8 path runs (reduce_range)
// (csrc/cpu/multipoint_stored.cpp: int8_code_limit).
constexpr int64_t kInt16Max = 32767;
constexpr int64_t kInt8CodeMax = 128;  // |-128|
constexpr int64_t exact_code_limit_without_vnni(int64_t act_levels) {
  return act_levels <= 1 ? kInt8CodeMax : std::min<int64_t>(kInt8CodeMax, kInt16Max / (2 * (act_levels - 1)));
}
static_assert(exact_code_limit_without_vnni(kInt8Levels) == 64, "8-bit activations: codes of at most 7 bits");
static_assert(exact_code_limit_without_vnni(kInt8Levels / 2) == kInt8CodeMax, "7-bit activations: every int8 code");

inline bool int8_levels_fit(double scale, double zero_point, double qmin, double qmax) {
  const auto integral = [](double v) { return std::nearbyint(v) == v; };
  return scale > 0.0 && std::isfinite(scale) && std::isfinite(zero_point) && std::isfinite(qmin) &&
         std::isfinite(qmax) && qmin < qmax && integral(zero_point) && integral(qmin) && integral(qmax) &&
         qmax - qmin <= kInt8Levels - 1;
}

// The packed int8 CUDA kernels (mma.sync.m16n8k32.s8, int32 accumulators): Kp = packed::padded_k(D)
// at most packed::kInt8MaxK.
constexpr bool packed_int8_k_fits(int64_t kp) { return kp <= packed::kInt8MaxK; }

// Their convolution also reads whole slabs of one pixel (C_in / groups a multiple of
// packed::kSlabK) and stores the level of 0 in its zero padding, which must be an int8 level too
// (qmin <= zero_point <= qmin + kInt8Levels - 1).
constexpr bool packed_int8_conv_channels_fit(int64_t channels_per_group) {
  return channels_per_group % packed::kSlabK == 0;
}
inline bool int8_zero_level_fits(double zero_point, double qmin) {
  return zero_point >= qmin && zero_point - qmin <= kInt8Levels - 1;
}

// Whether the packed int8 kernel computes a layer with act_qparams q: a Linear layer of D inputs
// (conv false), or a convolution with D = kh * kw * C_in / groups and channels_per_group = C_in / groups.
inline bool packed_int8_fits(const double q[4], int64_t d, bool conv, int64_t channels_per_group) {
  if (!int8_levels_fit(q[0], q[1], q[2], q[3]) || !packed_int8_k_fits(packed::padded_k(d))) return false;
  return !conv || (packed_int8_conv_channels_fit(channels_per_group) && int8_zero_level_fits(q[1], q[2]));
}

}  // namespace layout
}  // namespace mpq
