// The depthwise convolution of the CPU int8 path, one output row at a time, on raw pointers (no
// torch). The op (csrc/cpu/multipoint_stored.cpp) converts the input's uint8 levels to float values
// u - zp' once per input row and passes the kernel rows here; the weight is the dense sum of each
// channel's points, so the points cost nothing extra.
#pragma once

#include <cstdint>

#include "kernels/cpu_isa.h"

namespace mpq {
namespace kernels {

struct DepthwiseRow {
  const float* const* rows;  // [kh]: input row oh * sh - ph + i * dh as float values [W, C], or null outside
  const float* weight;       // [kh * kw, C]
  const float* bias;         // [C]
  float scale;               // the activation scale
  int64_t W, C, OW, kh, kw, stride_w, pad_w, dilation_w;
};

// out[ow, c] = scale * sum over taps (i, j) in order of weight[i * kw + j, c] * rows[i][iw, c] +
// bias[c], iw = ow * stride_w - pad_w + j * dilation_w, taps outside the image skipped; out is
// [OW, C]. kAvx512 keeps 64 channels' sums in registers across the taps; both paths sum the taps in
// the same order with fused multiply-adds where the CPU has them, within the float32 bound of the
// reference (tests/python/test_fuse.py).
void depthwise_row(const DepthwiseRow& a, float* out, CpuIsa isa);

}  // namespace kernels
}  // namespace mpq
