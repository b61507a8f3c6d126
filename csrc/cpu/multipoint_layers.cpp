// CPU kernels of the multipoint layers. The weight is dequantized once per call
// (C * P * D multiply-adds, small next to the layer itself) and the layer runs through ATen,
// so in float64 the result equals the layer with the dense weight sum_k a_k q_k.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "checks.h"

namespace mpq {
namespace {

// float64 stays float64; every other dtype dequantizes in float32 and is cast afterwards.
at::ScalarType compute_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

at::Tensor fake_quantize_activation(const at::Tensor& input, const c10::optional<at::Tensor>& act_qparams) {
  if (!act_qparams.has_value()) return input;
  const auto p = act_qparams->to(at::kCPU, at::kDouble);
  const double* v = p.data_ptr<double>();
  const double scale = v[0], zero_point = v[1], qmin = v[2], qmax = v[3];
  TORCH_CHECK(scale > 0.0 && std::isfinite(scale) && qmin < qmax,
              "mpq: expected act_qparams with scale > 0 and qmin < qmax, got scale ", scale, ", qmin ", qmin,
              ", qmax ", qmax);
  // NB: x / scale rather than x * (1 / scale): the float64 reference divides too.
  return at::clamp(at::round(input / scale) + zero_point, qmin, qmax).sub_(zero_point).mul_(scale);
}

}  // namespace

at::Tensor dequantize_multipoint_cpu(const at::Tensor& codes, const at::Tensor& scales,
                                     const at::Tensor& num_points, at::ScalarType dtype) {
  TORCH_CHECK(codes.dim() >= 3, "mpq::dequantize_multipoint: expected codes of rank >= 3 [C, P, ...], got shape ",
              codes.sizes());
  check_multipoint_weight("mpq::dequantize_multipoint", codes, scales, num_points, codes.dim());
  TORCH_CHECK(at::isFloatingType(dtype), "mpq::dequantize_multipoint: expected a floating dtype, got ", dtype);
  const auto ct = compute_dtype(dtype);
  const int64_t C = codes.size(0), P = codes.size(1);
  // Points at or beyond a channel's count contribute nothing.
  const auto active = at::arange(P, num_points.options()).unsqueeze(0) < num_points.unsqueeze(1);
  const auto effective = at::where(active, scales, at::zeros({}, scales.options())).to(ct);
  auto flat = codes.reshape({C, P, -1}).to(ct);
  auto w = at::bmm(effective.unsqueeze(1), flat).squeeze(1);  // [C, D]
  std::vector<int64_t> shape = {C};
  for (int64_t d = 2; d < codes.dim(); ++d) shape.push_back(codes.size(d));
  return w.reshape(shape).to(dtype);
}

at::Tensor multipoint_linear_cpu(const at::Tensor& input, const at::Tensor& codes, const at::Tensor& scales,
                                 const at::Tensor& num_points, const c10::optional<at::Tensor>& bias,
                                 const c10::optional<at::Tensor>& act_qparams) {
  constexpr const char* op = "mpq::multipoint_linear";
  check_multipoint_weight(op, codes, scales, num_points, 3);
  check_bias_and_act(op, input, bias, act_qparams, codes.size(0));
  TORCH_CHECK(input.dim() >= 1 && input.size(-1) == codes.size(2), op, ": expected input [..., ", codes.size(2),
              "] to match codes [C, P, D], got input shape ", input.sizes());
  const auto w = dequantize_multipoint_cpu(codes, scales, num_points, input.scalar_type());
  c10::optional<at::Tensor> b;
  if (bias.has_value()) b = bias->to(input.scalar_type());
  return at::linear(fake_quantize_activation(input, act_qparams), w, b);
}

at::Tensor multipoint_conv2d_cpu(const at::Tensor& input, const at::Tensor& codes, const at::Tensor& scales,
                                 const at::Tensor& num_points, const c10::optional<at::Tensor>& bias,
                                 const c10::optional<at::Tensor>& act_qparams, at::IntArrayRef stride,
                                 at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  constexpr const char* op = "mpq::multipoint_conv2d";
  check_multipoint_weight(op, codes, scales, num_points, 5);
  check_bias_and_act(op, input, bias, act_qparams, codes.size(0));
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
  const auto w = dequantize_multipoint_cpu(codes, scales, num_points, input.scalar_type());
  c10::optional<at::Tensor> b;
  if (bias.has_value()) b = bias->to(input.scalar_type());
  return at::conv2d(fake_quantize_activation(input, act_qparams), w, b, stride, padding, dilation, groups);
}

}  // namespace mpq

TORCH_LIBRARY_IMPL(mpq, CPU, m) {
  m.impl("dequantize_multipoint", &mpq::dequantize_multipoint_cpu);
  m.impl("multipoint_linear", &mpq::multipoint_linear_cpu);
  m.impl("multipoint_conv2d", &mpq::multipoint_conv2d_cpu);
}
