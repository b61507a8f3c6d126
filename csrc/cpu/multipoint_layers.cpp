// CPU kernels of the multipoint layers. The weight is dequantized once per call
// (C * P * D multiply-adds, small next to the layer itself) and the layer runs through ATen,
// so in float64 the result equals the layer with the dense weight sum_k a_k q_k.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu/multipoint_layers.h"

namespace mpq {
namespace {

// float64 stays float64; every other dtype dequantizes in float32 and is cast afterwards.
at::ScalarType compute_dtype(at::ScalarType dtype) { return dtype == at::kDouble ? at::kDouble : at::kFloat; }

at::Tensor fake_quantize_activation(const char* op, const at::Tensor& input,
                                    const c10::optional<at::Tensor>& act_qparams) {
  if (!act_qparams.has_value()) return input;
  const auto p = act_qparams->to(at::kCPU, at::kDouble);
  const double* v = p.data_ptr<double>();
  const double scale = v[0], zero_point = v[1], qmin = v[2], qmax = v[3];
  check_act_qparams_values(op, scale, zero_point, qmin, qmax);
  // NB: x / scale rather than x * (1 / scale): the float64 reference divides too.
  return at::clamp(at::round(input / scale) + zero_point, qmin, qmax).sub_(zero_point).mul_(scale);
}

// The dense weight of checked arguments (each op checks its own once, naming itself).
at::Tensor dense_weight(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& num_points,
                        at::ScalarType dtype) {
  const auto ct = compute_dtype(dtype);
  const int64_t C = codes.size(0), P = codes.size(1);
  std::vector<int64_t> shape = {C};
  int64_t D = 1;  // NB: not reshape(C, P, -1), which cannot infer D when C or P is 0
  for (int64_t d = 2; d < codes.dim(); ++d) {
    shape.push_back(codes.size(d));
    D *= codes.size(d);
  }
  // Points at or beyond a channel's count contribute nothing; P = 0 gives the zero weight.
  const auto active = at::arange(P, num_points.options()).unsqueeze(0) < num_points.unsqueeze(1);
  const auto effective = at::where(active, scales, at::zeros({}, scales.options())).to(ct);
  auto flat = codes.reshape({C, P, D}).to(ct);
  auto w = at::bmm(effective.unsqueeze(1), flat).squeeze(1);  // [C, D]
  return w.reshape(shape).to(dtype);
}

}  // namespace

at::Tensor dequantize_multipoint_cpu(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& num_points,
                                     at::ScalarType dtype) {
  check_dequantize_args(codes, scales, num_points, dtype);
  return dense_weight(codes, scales, num_points, dtype);
}

at::Tensor multipoint_linear_cpu(const at::Tensor& input, const at::Tensor& codes, const at::Tensor& scales,
                                 const at::Tensor& num_points, const c10::optional<at::Tensor>& bias,
                                 const c10::optional<at::Tensor>& act_qparams) {
  check_multipoint_linear_args(input, codes, scales, num_points, bias, act_qparams);
  const auto w = dense_weight(codes, scales, num_points, input.scalar_type());
  c10::optional<at::Tensor> b;
  if (bias.has_value()) b = bias->to(input.scalar_type());
  return at::linear(fake_quantize_activation("mpq::multipoint_linear", input, act_qparams), w, b);
}

at::Tensor multipoint_conv2d_cpu(const at::Tensor& input, const at::Tensor& codes, const at::Tensor& scales,
                                 const at::Tensor& num_points, const c10::optional<at::Tensor>& bias,
                                 const c10::optional<at::Tensor>& act_qparams, at::IntArrayRef stride,
                                 at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const auto out_shape = check_multipoint_conv2d_args(input, codes, scales, num_points, bias, act_qparams, stride,
                                                      padding, dilation, groups);
  const auto x = fake_quantize_activation("mpq::multipoint_conv2d", input, act_qparams);  // checks act_qparams
  if (codes.size(0) == 0) return at::empty(out_shape, input.options());                   // ATen refuses C_out = 0
  const auto w = dense_weight(codes, scales, num_points, input.scalar_type());
  c10::optional<at::Tensor> b;
  if (bias.has_value()) b = bias->to(input.scalar_type());
  return at::conv2d(x, w, b, stride, padding, dilation, groups);
}

}  // namespace mpq

TORCH_LIBRARY_IMPL(mpq, CPU, m) {
  m.impl("dequantize_multipoint", &mpq::dequantize_multipoint_cpu);
  m.impl("multipoint_linear", &mpq::multipoint_linear_cpu);
  m.impl("multipoint_conv2d", &mpq::multipoint_conv2d_cpu);
}
