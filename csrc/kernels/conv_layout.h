// The implicit GEMM of mpq::multipoint_conv2d_packed: where row m and column k of the GEMM
// A operand live in an NHWC input. Torch-free and usable from host and device code, so that the
// CUDA kernels (csrc/cuda/multipoint_packed.cu) and the Catch2 emulation of their loads
// (tests/cpp/test_packed_layout.cpp) share one definition.
//
// The convolution of x [N, H, W, C] (NHWC, C = groups * Cg) with a kh x kw kernel is the GEMM
// out[m, co] = sum_k A[m, k] W[co, k] with
//   * rows m = (n, oh, ow) in NHWC output order: m = (n * OH + oh) * OW + ow, M = N * OH * OW;
//   * columns k = (kh, kw, c) of the packed weight (mpq::conv_codes_nhwc): k = (i * KW + j) * Cg + c,
//     D = KH * KW * Cg; channel c of group grp is input channel grp * Cg + c;
//   * A[m, k] = x[n, oh * sh - ph + i * dh, ow * sw - pw + j * dw, grp * Cg + c], zero outside the
//     image (the convolution's zero padding; the int8 kernel stores the level of 0 there).
// A packed tile never mixes groups (pack_multipoint(..., groups)): its group is the group of its
// first row's channel, c0 = grp * Cg is added to every column's channel.
#pragma once

#include <cstdint>

#include "kernels/packed_layout.h"

namespace mpq {
namespace packed {

struct ConvShape {
  int64_t M;    // N * OH * OW
  int64_t D;    // KH * KW * Cg
  int H, W, C;  // input (NHWC), C all channels
  int OH, OW;   // output
  int KW, Cg;   // kernel width, input channels per group
  int sh, sw, ph, pw, dh, dw;
  int out_per_group;  // C_out / groups
};

// One GEMM row: the offset of its image in x (elements), and the input coordinates of kernel tap
// (0, 0); image < 0 for rows >= M.
struct ConvRow {
  int64_t image;
  int ih0, iw0;
};

MPQ_HOST_DEVICE ConvRow conv_row(const ConvShape& s, int64_t m) {
  if (m < 0 || m >= s.M) return {-1, 0, 0};
  const int64_t per_image = static_cast<int64_t>(s.OH) * s.OW;
  const int64_t n = m / per_image;
  const int rem = static_cast<int>(m - n * per_image);
  const int oh = rem / s.OW, ow = rem - (rem / s.OW) * s.OW;
  return {n * s.H * s.W * static_cast<int64_t>(s.C), oh * s.sh - s.ph, ow * s.sw - s.pw};
}

// One GEMM column: the tap (i, j) as offsets in the input rows/columns, and the channel in its group.
struct ConvCol {
  int di, dj;  // i * dh, j * dw
  int c;       // 0..Cg-1
  bool valid;  // k < D
};

MPQ_HOST_DEVICE ConvCol conv_col(const ConvShape& s, int64_t k) {
  if (k < 0 || k >= s.D) return {0, 0, 0, false};
  const int kk = static_cast<int>(k);  // D < 2^31 (checked on the host)
  const int tap = kk / s.Cg, c = kk - tap * s.Cg;
  const int i = tap / s.KW, j = tap - (tap / s.KW) * s.KW;
  return {i * s.dh, j * s.dw, c, true};
}

// The element offset of A[m, k] in x for a tile whose group starts at channel c0, or -1 where A is
// the zero padding (outside the image), the row is beyond M or the column beyond D.
MPQ_HOST_DEVICE int64_t conv_offset(const ConvShape& s, const ConvRow& r, const ConvCol& col, int c0) {
  if (r.image < 0 || !col.valid) return -1;
  const int ih = r.ih0 + col.di, iw = r.iw0 + col.dj;
  if (ih < 0 || ih >= s.H || iw < 0 || iw >= s.W) return -1;
  return r.image + (static_cast<int64_t>(ih) * s.W + iw) * s.C + c0 + col.c;
}

// The first input channel of tile t's group, from its first row's channel (never padding).
MPQ_HOST_DEVICE int conv_tile_channel0(const ConvShape& s, int first_row_channel) {
  return first_row_channel < 0 ? 0 : (first_row_channel / s.out_per_group) * s.Cg;
}

}  // namespace packed
}  // namespace mpq
