// The device code of the generic multipoint layers on CUDA (host code: csrc/cuda/multipoint_layers.cu):
// the dequantize and fake-quantize kernels and the direct depthwise convolution. Compiled by nvcc
// there, and by a host C++ compiler in tests/cpp/test_kernel_emulation.cpp on
// tests/cpp/simt_emulator.h, which runs them on the CPU.
#pragma once

#include <cmath>
#include <cstdint>

#include "cuda/act_quant.cuh"

namespace mpq {
namespace layer_kernels {
// NB: internal linkage, as in packed_kernels.cuh.
namespace {

using cuda_detail::ActParams;
using cuda_detail::compute_t;

constexpr int kThreads = 256;

// out[c, s] = sum_{k < num_points[c]} scales[c, k] * codes[c, k, s]. NB: num_points is not
// range-checked on the device (that would need a host sync): counts are clamped to 0..P; nor are the
// scales checked for NaN/inf (the CPU kernel rejects them): they propagate as NaN (checks.h).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    dequantize_kernel(const int8_t* __restrict__ codes, const float* __restrict__ scales,
                      const int* __restrict__ num_points, int64_t C, int P, int64_t S, scalar_t* __restrict__ out) {
  using acc_t = compute_t<scalar_t>;
  const int64_t n = C * S;
  for (int64_t idx = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; idx < n; idx += int64_t{gridDim.x} * blockDim.x) {
    const int64_t c = idx / S, s = idx - c * S;
    const int points = min(max(num_points[c], 0), P);
    acc_t acc = 0;
    for (int k = 0; k < points; ++k) {
      acc += static_cast<acc_t>(scales[c * P + k]) * static_cast<acc_t>(codes[(c * P + k) * S + s]);
    }
    out[idx] = static_cast<scalar_t>(acc);
  }
}

// clamp(round(x / scale) + zero_point, qmin, qmax) - zero_point, times scale: each step as its own
// ATen op on the CPU (cuda_detail::quant_level), rounded to the tensor's dtype after every step.
// Invalid qparams (scale <= 0 or not finite, qmin >= qmax), which the CPU kernel rejects, give NaN:
// checking them here would need a sync.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    fake_quantize_kernel(const scalar_t* __restrict__ in, scalar_t* __restrict__ out, int64_t n, ActParams params) {
  using op_t = compute_t<scalar_t>;
  const auto q = cuda_detail::load_qparams<op_t>(params);
  for (int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    if (!q.valid) {
      out[i] = static_cast<scalar_t>(NAN);
      continue;
    }
    const op_t v = static_cast<op_t>(static_cast<scalar_t>(cuda_detail::quant_level(in[i], q) - q.zero_point));
    out[i] = static_cast<scalar_t>(v * q.scale);
  }
}

// Depthwise conv2d, direct: one thread per output element of NHWC out [N, OH, OW, C] (channels
// fastest: coalesced loads of x [N, H, W, C]); the tap weights sum_k scales[c, k] codes[c, k, i, j]
// in float32 (as the generic dequantize sums them), rounded to scalar_t (the generic path's weight
// dtype); fq(x) rounded to scalar_t as fake_quantize_kernel does; float32 accumulation; + bias.
struct DepthwiseShape {
  int64_t N;
  int H, W, C, OH, OW, KH, KW, sh, sw, ph, pw, dh, dw, P;
};

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    depthwise_conv_kernel(const scalar_t* __restrict__ x, const int8_t* __restrict__ codes,
                          const float* __restrict__ scales, const int* __restrict__ num_points,
                          const float* __restrict__ bias, ActParams params, bool quantize, DepthwiseShape s,
                          scalar_t* __restrict__ out) {
  using op_t = compute_t<scalar_t>;
  const auto q = cuda_detail::load_qparams<op_t>(params);
  const int64_t n_out = s.N * s.OH * s.OW * s.C;
  const int taps = s.KH * s.KW;
  for (int64_t idx = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; idx < n_out;
       idx += int64_t{gridDim.x} * blockDim.x) {
    const int c = static_cast<int>(idx % s.C);
    int64_t rest = idx / s.C;
    const int ow = static_cast<int>(rest % s.OW);
    rest /= s.OW;
    const int oh = static_cast<int>(rest % s.OH);
    const int64_t n = rest / s.OH;
    if (quantize && !q.valid) {
      out[idx] = static_cast<scalar_t>(NAN);
      continue;
    }
    const int points = min(max(num_points[c], 0), s.P);
    float acc = 0.0f;
    for (int i = 0; i < s.KH; ++i) {
      const int ih = oh * s.sh - s.ph + i * s.dh;
      if (ih < 0 || ih >= s.H) continue;
      for (int j = 0; j < s.KW; ++j) {
        const int iw = ow * s.sw - s.pw + j * s.dw;
        if (iw < 0 || iw >= s.W) continue;
        float w = 0.0f;
        for (int k = 0; k < points; ++k) {
          w += scales[c * s.P + k] *
               static_cast<float>(codes[(static_cast<int64_t>(c) * s.P + k) * taps + i * s.KW + j]);
        }
        scalar_t v = x[((n * s.H + ih) * s.W + iw) * s.C + c];
        if (quantize) {
          const op_t level = static_cast<op_t>(static_cast<scalar_t>(cuda_detail::quant_level(v, q) - q.zero_point));
          v = static_cast<scalar_t>(level * q.scale);
        }
        acc += static_cast<float>(static_cast<scalar_t>(w)) * static_cast<float>(v);
      }
    }
    if (bias != nullptr) acc += bias[c];
    out[idx] = static_cast<scalar_t>(acc);
  }
}

}  // namespace
}  // namespace layer_kernels
}  // namespace mpq
