// The group-wise layers' ops (python/mpq/nn/groupwise.py): the dense weight
//
//   w[j, d] = group_scales[j, d / group_size] * (code[j, d] - zero[j, d / group_size]) / input_scales[c(d)]
//
// (c(d): the input channel of flattened weight d), then the float op. On the CPU the weight is
// decoded once per weight and kept by the ops library's cache of prepared weights (its float32
// copy costs the FP32 weight's memory; in-place changes of the tables are seen through their
// version counters), so a group-wise layer runs at float32's speed; on other backends
// (CompositeExplicitAutograd) it is decoded on every call. The decode is the Python reference's
// (GroupwiseLayer.dequantized_weight), operation for operation, so both give the same bits.
#include <ATen/ATen.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <vector>

#include "checks.h"
#include "cpu/multipoint_layers.h"
#include "kernels/layout.h"

namespace mpq {
namespace {

struct GroupwiseWeight {
  const at::Tensor& point_codes;
  const at::Tensor& group_scales;
  const at::Tensor& group_zeros;
  const at::Tensor& input_scales;
  int64_t w_bits, group_size;
  std::vector<int64_t> code_shape;
};

// Every table against the others and code_shape, naming the op and the argument.
void check_groupwise(const char* op, const GroupwiseWeight& g) {
  check_w_bits(op, g.w_bits);
  TORCH_CHECK(!g.code_shape.empty(), op, ": expected a non-empty code_shape");
  for (auto v : g.code_shape) TORCH_CHECK(v >= 1, op, ": expected code_shape entries >= 1, got ", g.code_shape);
  const int64_t D = c10::multiply_integers(g.code_shape);
  TORCH_CHECK(g.group_size >= 1, op, ": expected group_size >= 1, got ", g.group_size);
  TORCH_CHECK(g.group_scales.dim() == 2 && g.group_scales.is_floating_point(), op,
              ": expected group_scales floating [C, G] (float16 as stored), got ", g.group_scales.scalar_type(), " ",
              g.group_scales.sizes());
  const int64_t C = g.group_scales.size(0), G = (D + g.group_size - 1) / g.group_size;
  TORCH_CHECK(g.group_scales.size(1) == G, op, ": expected group_scales with ", G, " groups (", D,
              " weights per channel, group_size ", g.group_size, "), got ", g.group_scales.size(1));
  TORCH_CHECK(g.point_codes.dim() == 2 && g.point_codes.scalar_type() == at::kByte && g.point_codes.size(0) == C &&
                  g.point_codes.size(1) == layout::stored_row_bytes(D, g.w_bits),
              op, ": expected point_codes uint8 [", C, ", ", layout::stored_row_bytes(D, g.w_bits), "], got ",
              g.point_codes.scalar_type(), " ", g.point_codes.sizes());
  TORCH_CHECK(g.group_zeros.dim() == 2 && g.group_zeros.scalar_type() == at::kByte &&
                  (g.group_zeros.size(0) == 0 || g.group_zeros.size(0) == C) &&
                  (g.group_zeros.size(0) == 0 || g.group_zeros.size(1) == layout::stored_row_bytes(G, g.w_bits)),
              op, ": expected group_zeros uint8 [0, ...] (symmetric) or [", C, ", ",
              layout::stored_row_bytes(G, g.w_bits), "], got ", g.group_zeros.scalar_type(), " ",
              g.group_zeros.sizes());
  const int64_t n_in = g.input_scales.numel(), cin = g.code_shape[0];
  TORCH_CHECK(g.input_scales.dim() == 1 && g.input_scales.is_floating_point(), op,
              ": expected input_scales floating [in_channels] or [0] (float16 as stored), got ",
              g.input_scales.scalar_type(), " ", g.input_scales.sizes());
  TORCH_CHECK(n_in == 0 || (n_in % cin == 0 && C % (n_in / cin) == 0), op, ": expected input_scales of ",
              "a multiple of ", cin, " values that divides the channels' groups, got ", n_in);
  for (const auto* t : {&g.group_scales, &g.group_zeros, &g.input_scales}) {
    TORCH_CHECK(t->device() == g.point_codes.device(), op, ": expected every table on ", g.point_codes.device());
  }
}

// The codes of a table stored one row per channel at w_bits bits: int8 [C, n].
at::Tensor unpack_rows(const at::Tensor& packed, int64_t n, int64_t w_bits) {
  const int64_t C = packed.size(0);
  const auto ones = at::ones({C}, packed.options().dtype(at::kFloat));
  const auto counts = at::ones({C}, packed.options().dtype(at::kInt));
  return std::get<0>(unpack_points(packed, ones, counts, w_bits, n, 1)).select(1, 0);
}

// GroupwiseLayer.dequantized_weight: float32 [C, *code_shape].
at::Tensor decode(const GroupwiseWeight& g) {
  const int64_t C = g.group_scales.size(0), D = c10::multiply_integers(g.code_shape);
  auto per_weight = [&](const at::Tensor& t) { return t.repeat_interleave(g.group_size, 1).narrow(1, 0, D); };
  auto q = unpack_rows(g.point_codes, D, g.w_bits).to(at::kFloat);
  const auto s = per_weight(g.group_scales.to(at::kFloat));
  if (g.group_zeros.size(0) > 0)
    q = q - per_weight(unpack_rows(g.group_zeros, g.group_scales.size(1), g.w_bits).to(at::kFloat));
  auto w = q * s;
  if (g.input_scales.numel() > 0) {
    const int64_t cin = g.code_shape[0], groups = g.input_scales.numel() / cin;
    const auto per_column = g.input_scales.view({groups, cin}).repeat_interleave(D / cin, 1);
    w = w / per_column.repeat_interleave(C / groups, 0).to(at::kFloat);
  }
  std::vector<int64_t> shape = {C};
  shape.insert(shape.end(), g.code_shape.begin(), g.code_shape.end());
  return w.view(shape);
}

// The weight in the input's dtype: for a float32 input and `cached` (the CPU kernel) the cached
// decode, else decoded now.
at::Tensor weight_for(const at::Tensor& input, const GroupwiseWeight& g, bool cached) {
  if (!cached || input.scalar_type() != at::kFloat) return decode(g).to(input.scalar_type());
  std::vector<double> key = {5.0, double(g.w_bits), double(g.group_size)};
  key.insert(key.end(), g.code_shape.begin(), g.code_shape.end());
  return cached_weight({g.point_codes, g.group_scales, g.group_zeros, g.input_scales}, key, [&] { return decode(g); });
}

// Every check (the tables, the input, the bias) before any decode; the bias in the input's dtype.
c10::optional<at::Tensor> checked_bias(const char* op, const at::Tensor& input, const GroupwiseWeight& g,
                                       const c10::optional<at::Tensor>& bias) {
  check_groupwise(op, g);
  TORCH_CHECK(input.is_floating_point(), op, ": expected a floating input, got ", input.scalar_type());
  TORCH_CHECK(input.device() == g.point_codes.device(), op, ": expected input on ", g.point_codes.device());
  check_bias_and_act(op, input, bias, c10::nullopt, g.group_scales.size(0));
  return bias.has_value() ? c10::optional<at::Tensor>(bias->to(input.scalar_type())) : c10::nullopt;
}

// Cached: the CPU kernel (the decode kept by the ops library); else decoded per call.
template <bool Cached>
at::Tensor groupwise_linear(const at::Tensor& input, const at::Tensor& point_codes, const at::Tensor& group_scales,
                            const at::Tensor& group_zeros, const at::Tensor& input_scales, int64_t w_bits,
                            int64_t group_size, const c10::optional<at::Tensor>& bias) {
  const char* op = "mpq::groupwise_linear";
  TORCH_CHECK(input.dim() >= 1, op, ": expected input [..., in_features], got ", input.sizes());
  const GroupwiseWeight g{point_codes, group_scales, group_zeros, input_scales, w_bits, group_size, {input.size(-1)}};
  const auto b = checked_bias(op, input, g, bias);
  return at::linear(input, weight_for(input, g, Cached), b);
}

template <bool Cached>
at::Tensor groupwise_conv2d(const at::Tensor& input, const at::Tensor& point_codes, const at::Tensor& group_scales,
                            const at::Tensor& group_zeros, const at::Tensor& input_scales, int64_t w_bits,
                            int64_t group_size, at::IntArrayRef code_shape, const c10::optional<at::Tensor>& bias,
                            at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const char* op = "mpq::groupwise_conv2d";
  TORCH_CHECK(code_shape.size() == 3, op, ": expected code_shape [in_channels / groups, kh, kw], got ", code_shape);
  TORCH_CHECK(input.dim() == 4 && input.size(1) == code_shape[0] * groups, op, ": expected input [N, ",
              code_shape[0] * groups, ", H, W], got ", input.sizes());
  const GroupwiseWeight g{point_codes, group_scales, group_zeros, input_scales, w_bits, group_size, code_shape.vec()};
  const auto b = checked_bias(op, input, g, bias);
  return at::conv2d(input, weight_for(input, g, Cached), b, stride, padding, dilation, groups);
}

}  // namespace
}  // namespace mpq

TORCH_LIBRARY_IMPL(mpq, CompositeExplicitAutograd, m) {
  m.impl("groupwise_linear", &mpq::groupwise_linear<false>);
  m.impl("groupwise_conv2d", &mpq::groupwise_conv2d<false>);
}

TORCH_LIBRARY_IMPL(mpq, CPU, m) {
  m.impl("groupwise_linear", &mpq::groupwise_linear<true>);
  m.impl("groupwise_conv2d", &mpq::groupwise_conv2d<true>);
}
