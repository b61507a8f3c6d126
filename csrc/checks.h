// Argument checks shared by the CPU and CUDA kernels of each op: every user mistake is
// reported with the op's name and the argument's name before any work starts.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

namespace mpq {

// fit_multipoint: weight float32/float64 [C, D] without NaN/inf, bits in 2..8, max_points >= 1.
void check_fit_multipoint_args(const at::Tensor& weight, int64_t bits, int64_t max_points);

// The multipoint weight triple, for an op named `op`; `code_dims` is the rank of codes
// (3 for linear [C, P, D], 5 for conv [C, P, C_in/g, kh, kw]). Checks num_points values
// in 0..P when they live on the CPU.
void check_multipoint_weight(const char* op, const at::Tensor& codes, const at::Tensor& scales,
                             const at::Tensor& num_points, int64_t code_dims);

// Optional bias float[C] and activation qparams float32[4] = (scale, zero_point, qmin, qmax).
void check_bias_and_act(const char* op, const at::Tensor& input, const c10::optional<at::Tensor>& bias,
                        const c10::optional<at::Tensor>& act_qparams, int64_t out_channels);

// The values of act_qparams once on the host: finite, scale > 0, qmin < qmax.
void check_act_qparams_values(const char* op, double scale, double zero_point, double qmin, double qmax);

// Every argument of mpq::dequantize_multipoint / multipoint_linear / multipoint_conv2d, on any
// backend; the input must live on the device of codes, act_qparams there or on the CPU.
void check_dequantize_args(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& num_points,
                           at::ScalarType dtype);
void check_multipoint_linear_args(const at::Tensor& input, const at::Tensor& codes, const at::Tensor& scales,
                                  const at::Tensor& num_points, const c10::optional<at::Tensor>& bias,
                                  const c10::optional<at::Tensor>& act_qparams);
void check_multipoint_conv2d_args(const at::Tensor& input, const at::Tensor& codes, const at::Tensor& scales,
                                  const at::Tensor& num_points, const c10::optional<at::Tensor>& bias,
                                  const c10::optional<at::Tensor>& act_qparams, at::IntArrayRef stride,
                                  at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups);

}  // namespace mpq
