// Weight-only Linear on a multipoint weight (float activations, "W·A16"): the codes stay packed in
// memory and are decoded in registers, so a small-M (decode-like) Linear reads about w_bits/32 of
// the bytes of float32 at::linear. On raw pointers (no torch), so that Catch2 tests it directly.
//
//   y[m, j] = bias[j] + sum over channel j's points t of sum_d (scale_t * code_t[d]) * x[m, d]
//
// Prepared layout (prepare_weight_only, once per weight):
// - w_bits 2..4: 4-bit two's complement codes (2- and 3-bit codes sign-extended to 4 bits; 4-bit
//   codes keep their 4 bits), each point row in blocks of 128 codes = 64 bytes = 16 little-endian
//   uint32 words: word l holds code 16 * k + l of the block in bits 4k..4k+3 (k = 0..7). One 64-byte
//   load, a shift right by 4k and a 16-entry float table (vpermps reads the low 4 bits of each lane)
//   give codes 16k..16k+15 as 16 float lanes, next to x[16k..16k+15]. Rows are zero-padded to whole
//   blocks (zero codes add exact zeros).
// - w_bits 5..8: expanded to one int8 per code at prepare time (rows zero-padded to 16 codes), so 5-
//   to 7-bit weights take 8 bits in memory here.
//
// Order of the float32 sums (the bound below covers both paths):
// - AVX-512: per row m, one 16-lane accumulator over all points of channel j; for each point t in
//   order, the code vector times scale_t (one rounding: the table is scaled once per point), then
//   fused multiply-adds of x[m, 16k + l] into lane l in increasing d; then the 16 lanes are summed
//   as a tree and bias[j] added.
// - AVX2 (+ FMA): per 8 codes d..d+7, channel j's weight w = sum_t scale_t * code_t[d..] in a
//   register (the first product rounded once, each further point one fused multiply-add), then per
//   row m one fused multiply-add of x[m, d..d+7] into one of S 8-lane accumulators (chunk d / 8 into
//   set (d / 8) mod S; S = 4 for 1-2 rows, 2 for 3-4, 1 beyond) in increasing d; the sets added in
//   order, the 8 lanes summed as a tree and bias[j] added. A term's chain: at most
//   P_j + ceil(D / 8) + S + 3 roundings.
// - scalar: per point t, s_t = sum_d code_t[d] * x[m, d] in increasing d (each product rounded);
//   acc += scale_t * s_t over the points in order (two roundings each); y = bias[j] + acc.
// Error bound against the exact (float64) value, with u = 2^-24, P_j channel j's point count and
// S = |bias[j]| + sum_t |scale_t| * sum_d |code_t[d]| * |x[m, d]|:
//   |y - y_exact| <= gamma_n * S,  gamma_n = n u / (1 - n u),  n = max(D + 2 P_j, P_j ceil(D / 16)) + 6
// (the longest chain of roundings any term goes through, on any path).
#pragma once

#include <cstdint>
#include <vector>

#include "kernels/cpu_isa.h"

namespace mpq {
namespace kernels {

struct WeightOnlyWeight {
  int64_t channels = 0, in_features = 0, w_bits = 0;
  bool nibbles = false;        // w_bits <= 4: the 4-bit block layout above; else int8 rows
  int64_t row_bytes = 0;       // bytes per point row in `codes` (whole blocks)
  std::vector<int64_t> first;  // channel j's points are first[j] .. first[j + 1] - 1 (channel-major)
  std::vector<float> scales;   // one per point
  std::vector<uint8_t> codes;  // [points, row_bytes]
};

// Bytes per stored row (the stored form of csrc/registration.cpp's pack_points).
int64_t packed_row_bytes(int64_t in_features, int64_t w_bits);

// The kernel layout of a stored multipoint weight: point_codes uint8[T, packed_row_bytes] (code i at
// bits i*w_bits.., LSB first, two's complement), point_scales float32[T], num_points int32[C]
// (T = sum num_points, channel-major), w_bits 2..8.
WeightOnlyWeight prepare_weight_only(const uint8_t* point_codes, const float* point_scales, const int32_t* num_points,
                                     int64_t channels, int64_t in_features, int64_t w_bits);

// y[m, j] for m < rows and c_begin <= j < c_end: x float32 [rows, in_features] and y float32
// [rows, channels], both row-major and contiguous; bias null or float32 [channels]. Disjoint channel
// ranges write disjoint elements of y (split channels over threads). AVX-512 where `isa` says so and
// the CPU has it (with AVX-512BW), else AVX2 where `isa` is not kScalar and the CPU has AVX2 and FMA,
// else scalar. Fast for few rows (x rows held in registers 16 at a time on AVX-512, 8 on AVX2); any
// rows.
void weight_only_linear(const WeightOnlyWeight& w, const float* x, int64_t rows, const float* bias, float* y,
                        int64_t c_begin, int64_t c_end, CpuIsa isa);

}  // namespace kernels
}  // namespace mpq
