#include "checks.h"

#include <ATen/ATen.h>

#include <cmath>

namespace mpq {

void check_fit_multipoint_args(const at::Tensor& weight, int64_t bits, int64_t max_points) {
  TORCH_CHECK(weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kDouble,
              "mpq::fit_multipoint: expected weight to be float32 or float64, got ", weight.scalar_type());
  TORCH_CHECK(weight.dim() == 2, "mpq::fit_multipoint: expected weight to be 2-D [C, D], got shape ",
              weight.sizes());
  TORCH_CHECK(weight.size(1) >= 1, "mpq::fit_multipoint: expected weight to have D >= 1 columns, got shape ",
              weight.sizes());
  TORCH_CHECK(bits >= 2 && bits <= 8, "mpq::fit_multipoint: expected bits in 2..8, got ", bits);
  TORCH_CHECK(max_points >= 1 && max_points <= 64, "mpq::fit_multipoint: expected max_points in 1..64, got ",
              max_points);
  if (weight.numel() > 0) {
    TORCH_CHECK(at::isfinite(weight).all().item<bool>(),
                "mpq::fit_multipoint: weight contains NaN or inf");
    if (weight.scalar_type() == at::kDouble) {  // scales and errors are stored in float32
      TORCH_CHECK(weight.abs().max().item<double>() <= 1e30,
                  "mpq::fit_multipoint: weight has magnitudes above 1e30, beyond what float32 scales and "
                  "squared errors hold");
    }
  }
}

void check_multipoint_weight(const char* op, const at::Tensor& codes, const at::Tensor& scales,
                             const at::Tensor& num_points, int64_t code_dims) {
  TORCH_CHECK(codes.scalar_type() == at::kChar, op, ": expected codes to be int8, got ", codes.scalar_type());
  TORCH_CHECK(codes.dim() == code_dims, op, ": expected codes to have ", code_dims, " dimensions, got shape ",
              codes.sizes());
  TORCH_CHECK(scales.scalar_type() == at::kFloat, op, ": expected scales to be float32, got ",
              scales.scalar_type());
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == codes.size(0) && scales.size(1) == codes.size(1), op,
              ": expected scales of shape [", codes.size(0), ", ", codes.size(1), "] to match codes, got ",
              scales.sizes());
  TORCH_CHECK(num_points.scalar_type() == at::kInt, op, ": expected num_points to be int32, got ",
              num_points.scalar_type());
  TORCH_CHECK(num_points.dim() == 1 && num_points.size(0) == codes.size(0), op,
              ": expected num_points of shape [", codes.size(0), "], got ", num_points.sizes());
  TORCH_CHECK(codes.device() == scales.device() && codes.device() == num_points.device(), op,
              ": expected codes, scales and num_points on one device, got ", codes.device(), ", ",
              scales.device(), ", ", num_points.device());
  if (num_points.is_cpu() && num_points.numel() > 0) {
    const auto lo = num_points.min().item<int64_t>();
    const auto hi = num_points.max().item<int64_t>();
    TORCH_CHECK(lo >= 0 && hi <= codes.size(1), op, ": expected num_points in 0..", codes.size(1),
                ", got values in ", lo, "..", hi);
  }
}

void check_bias_and_act(const char* op, const at::Tensor& input, const c10::optional<at::Tensor>& bias,
                        const c10::optional<at::Tensor>& act_qparams, int64_t out_channels) {
  TORCH_CHECK(at::isFloatingType(input.scalar_type()), op, ": expected input to be a floating tensor, got ",
              input.scalar_type());
  if (bias.has_value()) {
    TORCH_CHECK(at::isFloatingType(bias->scalar_type()), op, ": expected bias to be floating, got ",
                bias->scalar_type());
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out_channels, op, ": expected bias of shape [",
                out_channels, "], got ", bias->sizes());
    TORCH_CHECK(bias->device() == input.device(), op, ": expected bias on ", input.device(), ", got ",
                bias->device());
  }
  if (act_qparams.has_value()) {
    TORCH_CHECK(act_qparams->scalar_type() == at::kFloat && act_qparams->dim() == 1 &&
                    act_qparams->size(0) == 4,
                op, ": expected act_qparams to be float32[4] (scale, zero_point, qmin, qmax), got ",
                act_qparams->scalar_type(), act_qparams->sizes());
    TORCH_CHECK(act_qparams->is_cpu() || act_qparams->device() == input.device(), op,
                ": expected act_qparams on the CPU or on ", input.device(), ", got ", act_qparams->device());
  }
}

void check_act_qparams_values(const char* op, double scale, double zero_point, double qmin, double qmax) {
  TORCH_CHECK(scale > 0.0 && std::isfinite(scale) && std::isfinite(zero_point) && std::isfinite(qmin) &&
                  std::isfinite(qmax) && qmin < qmax,
              op, ": expected act_qparams with a finite scale > 0, finite zero_point and qmin < qmax, got scale ",
              scale, ", zero_point ", zero_point, ", qmin ", qmin, ", qmax ", qmax);
}

void check_dequantize_args(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& num_points,
                           at::ScalarType dtype) {
  TORCH_CHECK(codes.dim() >= 3, "mpq::dequantize_multipoint: expected codes of rank >= 3 [C, P, ...], got shape ",
              codes.sizes());
  check_multipoint_weight("mpq::dequantize_multipoint", codes, scales, num_points, codes.dim());
  TORCH_CHECK(at::isFloatingType(dtype), "mpq::dequantize_multipoint: expected a floating dtype, got ", dtype);
}

void check_multipoint_linear_args(const at::Tensor& input, const at::Tensor& codes, const at::Tensor& scales,
                                  const at::Tensor& num_points, const c10::optional<at::Tensor>& bias,
                                  const c10::optional<at::Tensor>& act_qparams) {
  constexpr const char* op = "mpq::multipoint_linear";
  check_multipoint_weight(op, codes, scales, num_points, 3);
  check_bias_and_act(op, input, bias, act_qparams, codes.size(0));
  TORCH_CHECK(input.device() == codes.device(), op, ": expected input on ", codes.device(),
              " with codes, got ", input.device());
  TORCH_CHECK(input.dim() >= 1 && input.size(-1) == codes.size(2), op, ": expected input [..., ", codes.size(2),
              "] to match codes [C, P, D], got input shape ", input.sizes());
}

void check_multipoint_conv2d_args(const at::Tensor& input, const at::Tensor& codes, const at::Tensor& scales,
                                  const at::Tensor& num_points, const c10::optional<at::Tensor>& bias,
                                  const c10::optional<at::Tensor>& act_qparams, at::IntArrayRef stride,
                                  at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  constexpr const char* op = "mpq::multipoint_conv2d";
  check_multipoint_weight(op, codes, scales, num_points, 5);
  check_bias_and_act(op, input, bias, act_qparams, codes.size(0));
  TORCH_CHECK(input.device() == codes.device(), op, ": expected input on ", codes.device(),
              " with codes, got ", input.device());
  TORCH_CHECK(input.dim() == 4, op, ": expected input [N, C_in, H, W], got shape ", input.sizes());
  TORCH_CHECK(groups >= 1 && codes.size(0) % groups == 0, op, ": expected groups >= 1 dividing the ",
              codes.size(0), " output channels, got groups = ", groups);
  TORCH_CHECK(input.size(1) == codes.size(2) * groups, op, ": expected input with ", codes.size(2) * groups,
              " channels (codes [C_out, P, C_in/groups, kh, kw] with groups = ", groups, "), got shape ",
              input.sizes());
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, op,
              ": expected stride, padding and dilation of length 2");
  TORCH_CHECK(stride[0] >= 1 && stride[1] >= 1 && dilation[0] >= 1 && dilation[1] >= 1 && padding[0] >= 0 &&
                  padding[1] >= 0,
              op, ": expected stride >= 1, dilation >= 1 and padding >= 0, got stride ", stride, ", padding ",
              padding, ", dilation ", dilation);
}

}  // namespace mpq
