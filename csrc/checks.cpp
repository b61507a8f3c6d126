#include "checks.h"

#include <ATen/ATen.h>

#include <cmath>
#include <string>
#include <utility>
#include <vector>

#include "kernels/layout.h"
#include "kernels/packed_layout.h"

namespace mpq {

void check_w_bits(const char* op, int64_t w_bits, const char* name) {
  TORCH_CHECK(w_bits >= layout::kMinWBits && w_bits <= layout::kMaxWBits, op, ": expected ", name, " in ",
              layout::kMinWBits, "..", layout::kMaxWBits, ", got ", w_bits);
}

void check_max_points(const char* op, int64_t max_points) {
  TORCH_CHECK(max_points >= 1 && max_points <= layout::kMaxPoints, op, ": expected max_points in 1..",
              layout::kMaxPoints, ", got ", max_points);
}

void check_fit_multipoint_args(const at::Tensor& weight, int64_t bits, int64_t max_points) {
  TORCH_CHECK(weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kDouble,
              "mpq::fit_multipoint: expected weight to be float32 or float64, got ", weight.scalar_type());
  TORCH_CHECK(weight.dim() == 2, "mpq::fit_multipoint: expected weight to be 2-D [C, D], got shape ", weight.sizes());
  TORCH_CHECK(weight.size(1) >= 1, "mpq::fit_multipoint: expected weight to have D >= 1 columns, got shape ",
              weight.sizes());
  check_w_bits("mpq::fit_multipoint", bits, "bits");
  check_max_points("mpq::fit_multipoint", max_points);
  if (weight.numel() > 0) {
    TORCH_CHECK(at::isfinite(weight).all().item<bool>(), "mpq::fit_multipoint: weight contains NaN or inf");
    // The errors are float64 sums stored in float32, never above the row's squared norm.
    const auto norms = weight.to(at::kDouble).square().sum(1);
    const auto row = norms.argmax().item<int64_t>();
    const double most = norms[row].item<double>();
    TORCH_CHECK(most <= kMaxRowSquaredNorm,
                "mpq::fit_multipoint: expected every row of weight to have a squared norm sum_d w[j, d]^2 <= ",
                kMaxRowSquaredNorm, " (the float32 maximum: sq_errors are float32), got ", most, " in row ", row);
  }
}

void check_multipoint_weight(const char* op, const at::Tensor& codes, const at::Tensor& scales,
                             const at::Tensor& num_points, int64_t code_dims) {
  TORCH_CHECK(codes.scalar_type() == at::kChar, op, ": expected codes to be int8, got ", codes.scalar_type());
  TORCH_CHECK(codes.dim() == code_dims, op, ": expected codes to have ", code_dims, " dimensions, got shape ",
              codes.sizes());
  TORCH_CHECK(scales.scalar_type() == at::kFloat, op, ": expected scales to be float32, got ", scales.scalar_type());
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == codes.size(0) && scales.size(1) == codes.size(1), op,
              ": expected scales of shape [", codes.size(0), ", ", codes.size(1), "] to match codes, got ",
              scales.sizes());
  TORCH_CHECK(num_points.scalar_type() == at::kInt, op, ": expected num_points to be int32, got ",
              num_points.scalar_type());
  TORCH_CHECK(num_points.dim() == 1 && num_points.size(0) == codes.size(0), op, ": expected num_points of shape [",
              codes.size(0), "], got ", num_points.sizes());
  TORCH_CHECK(codes.device() == scales.device() && codes.device() == num_points.device(), op,
              ": expected codes, scales and num_points on one device, got ", codes.device(), ", ", scales.device(),
              ", ", num_points.device());
  if (num_points.is_cpu() && num_points.numel() > 0) {
    const auto lo = num_points.min().item<int64_t>();
    const auto hi = num_points.max().item<int64_t>();
    TORCH_CHECK(lo >= 0 && hi <= codes.size(1), op, ": expected num_points in 0..", codes.size(1), ", got values in ",
                lo, "..", hi);
    // One pass over the scales of the points in use (the others contribute nothing). NB: not on
    // CUDA, where reading them would sync the device; non-finite scales give NaN there (checks.h).
    const auto n = num_points.contiguous();
    const auto s = scales.contiguous();
    const int* counts = n.data_ptr<int>();
    const float* v = s.data_ptr<float>();
    const int64_t C = codes.size(0), P = codes.size(1);
    for (int64_t c = 0; c < C; ++c) {
      for (int64_t k = 0; k < counts[c]; ++k) {
        TORCH_CHECK(std::isfinite(v[c * P + k]), op, ": expected finite scales for the points in use, got ",
                    v[c * P + k], " at scales[", c, ", ", k, "] (num_points[", c, "] = ", counts[c], ")");
      }
    }
  }
}

void check_bias_and_act_qparams(const char* op, const at::Device& device, const c10::optional<at::Tensor>& bias,
                                const c10::optional<at::Tensor>& act_qparams, int64_t out_channels) {
  if (bias.has_value()) {
    TORCH_CHECK(at::isFloatingType(bias->scalar_type()), op, ": expected bias to be floating, got ",
                bias->scalar_type());
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out_channels, op, ": expected bias of shape [", out_channels,
                "], got ", bias->sizes());
    TORCH_CHECK(bias->device() == device, op, ": expected bias on ", device, ", got ", bias->device());
  }
  if (act_qparams.has_value()) {
    TORCH_CHECK(act_qparams->scalar_type() == at::kFloat && act_qparams->dim() == 1 && act_qparams->size(0) == 4, op,
                ": expected act_qparams to be float32[4] (scale, zero_point, qmin, qmax), got ",
                act_qparams->scalar_type(), act_qparams->sizes());
    TORCH_CHECK(act_qparams->is_cpu() || act_qparams->device() == device, op,
                ": expected act_qparams on the CPU or on ", device, ", got ", act_qparams->device());
  }
}

void check_bias_and_act(const char* op, const at::Tensor& input, const c10::optional<at::Tensor>& bias,
                        const c10::optional<at::Tensor>& act_qparams, int64_t out_channels) {
  TORCH_CHECK(at::isFloatingType(input.scalar_type()), op, ": expected input to be a floating tensor, got ",
              input.scalar_type());
  check_bias_and_act_qparams(op, input.device(), bias, act_qparams, out_channels);
}

void check_act_qparams_values(const char* op, double scale, double zero_point, double qmin, double qmax) {
  TORCH_CHECK(scale > 0.0 && std::isfinite(scale) && std::isfinite(zero_point) && std::isfinite(qmin) &&
                  std::isfinite(qmax) && qmin < qmax,
              op, ": expected act_qparams with a finite scale > 0, finite zero_point and qmin < qmax, got scale ",
              scale, ", zero_point ", zero_point, ", qmin ", qmin, ", qmax ", qmax);
}

namespace {

// The output shape [N, C_out, H_out, W_out] of a convolution of `input` [N, C, H, W] with a kh x kw
// kernel; checks stride, padding and dilation.
std::vector<int64_t> conv2d_output_shape(const char* op, const at::Tensor& input, int64_t out_channels, int64_t kh,
                                         int64_t kw, at::IntArrayRef stride, at::IntArrayRef padding,
                                         at::IntArrayRef dilation) {
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, op,
              ": expected stride, padding and dilation of length 2");
  TORCH_CHECK(stride[0] >= 1 && stride[1] >= 1 && dilation[0] >= 1 && dilation[1] >= 1 && padding[0] >= 0 &&
                  padding[1] >= 0,
              op, ": expected stride >= 1, dilation >= 1 and padding >= 0, got stride ", stride, ", padding ", padding,
              ", dilation ", dilation);
  std::vector<int64_t> out = {input.size(0), out_channels, 0, 0};
  const int64_t kernel[2] = {kh, kw};
  for (int d = 0; d < 2; ++d) {
    const int64_t size = input.size(2 + d), padded = size + 2 * padding[d];
    const int64_t extent = dilation[d] * (kernel[d] - 1) + 1;  // of the dilated kernel
    TORCH_CHECK(size >= 1, op, ": expected input [N, C_in, H, W] with H, W >= 1, got shape ", input.sizes());
    TORCH_CHECK(padded >= extent, op, ": expected input [N, C_in, H, W] to hold the dilated kernel after padding ",
                "(an output of at least 1 x 1), got input shape ", input.sizes(), " with padding ", padding,
                ": padded size ", padded, " < dilated kernel size ", extent, " in dimension ", 2 + d);
    out[2 + d] = (padded - extent) / stride[d] + 1;
  }
  return out;
}

}  // namespace

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
  TORCH_CHECK(input.device() == codes.device(), op, ": expected input on ", codes.device(), " with codes, got ",
              input.device());
  TORCH_CHECK(input.dim() >= 1 && input.size(-1) == codes.size(2), op, ": expected input [..., ", codes.size(2),
              "] to match codes [C, P, D], got input shape ", input.sizes());
}

std::vector<int64_t> check_multipoint_conv2d_args(const at::Tensor& input, const at::Tensor& codes,
                                                  const at::Tensor& scales, const at::Tensor& num_points,
                                                  const c10::optional<at::Tensor>& bias,
                                                  const c10::optional<at::Tensor>& act_qparams, at::IntArrayRef stride,
                                                  at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  constexpr const char* op = "mpq::multipoint_conv2d";
  check_multipoint_weight(op, codes, scales, num_points, 5);
  TORCH_CHECK(codes.size(3) >= 1 && codes.size(4) >= 1, op,
              ": expected codes [C_out, P, C_in/groups, kh, kw] with a kernel of at least 1 x 1, got shape ",
              codes.sizes());
  check_bias_and_act(op, input, bias, act_qparams, codes.size(0));
  TORCH_CHECK(input.device() == codes.device(), op, ": expected input on ", codes.device(), " with codes, got ",
              input.device());
  TORCH_CHECK(input.dim() == 4, op, ": expected input [N, C_in, H, W], got shape ", input.sizes());
  TORCH_CHECK(groups >= 1 && codes.size(0) % groups == 0, op, ": expected groups >= 1 dividing the ", codes.size(0),
              " output channels, got groups = ", groups);
  TORCH_CHECK(input.size(1) == codes.size(2) * groups, op, ": expected input with ", codes.size(2) * groups,
              " channels (codes [C_out, P, C_in/groups, kh, kw] with groups = ", groups, "), got shape ",
              input.sizes());
  return conv2d_output_shape(op, input, codes.size(0), codes.size(3), codes.size(4), stride, padding, dilation);
}

std::vector<int64_t> check_stored_conv2d_args(const char* op, const at::Tensor& input, int64_t out_channels,
                                              at::IntArrayRef code_shape, const c10::optional<at::Tensor>& bias,
                                              const c10::optional<at::Tensor>& act_qparams, at::IntArrayRef stride,
                                              at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK(code_shape.size() == 3 && code_shape[1] >= 1 && code_shape[2] >= 1, op,
              ": expected code_shape [C_in/groups, kh, kw] with a kernel of at least 1 x 1, got ", code_shape);
  TORCH_CHECK(input.dim() == 4, op, ": expected input [N, C_in, H, W], got shape ", input.sizes());
  TORCH_CHECK(groups >= 1 && out_channels % groups == 0, op, ": expected groups >= 1 dividing the ", out_channels,
              " output channels, got groups = ", groups);
  TORCH_CHECK(input.size(1) == code_shape[0] * groups, op, ": expected input with ", code_shape[0] * groups,
              " channels (code_shape ", code_shape, " with groups = ", groups, "), got shape ", input.sizes());
  check_bias_and_act_qparams(op, input.device(), bias, act_qparams, out_channels);
  return conv2d_output_shape(op, input, out_channels, code_shape[1], code_shape[2], stride, padding, dilation);
}

// ---- the packed weight ----------------------------------------------------------------------------

void check_pack_multipoint_args(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& num_points,
                                int64_t w_bits, int64_t groups) {
  constexpr const char* op = "mpq::pack_multipoint";
  check_multipoint_weight(op, codes, scales, num_points, 3);
  check_w_bits(op, w_bits);
  TORCH_CHECK(groups >= 1 && codes.size(0) % groups == 0, op, ": expected groups >= 1 dividing the ", codes.size(0),
              " output channels, got groups = ", groups);
  TORCH_CHECK(codes.size(0) <= (int64_t{1} << 30), op, ": expected at most 2^30 output channels, got ", codes.size(0));
  if (codes.is_cpu() && codes.numel() > 0 && w_bits <= 4) {
    // Only the points in use are stored: nibbles hold -8..7.
    const auto active =
        (at::arange(codes.size(1), num_points.options()).unsqueeze(0) < num_points.unsqueeze(1)).unsqueeze(2);
    const auto used = at::where(active, codes, at::zeros({}, codes.options()));
    const auto lo = used.min().item<int64_t>(), hi = used.max().item<int64_t>();
    TORCH_CHECK(lo >= -8 && hi <= 7, op, ": expected codes of the points in use in -8..7 for w_bits = ", w_bits,
                " (4-bit storage), got values in ", lo, "..", hi);
  }
}

void check_packed_weight(const char* op, const at::Tensor& packed, const at::Tensor& packed_scales,
                         const at::Tensor& perm, const at::Tensor& tile_offsets, int64_t out_features) {
  using namespace mpq::packed;
  TORCH_CHECK(packed.scalar_type() == at::kByte, op, ": expected packed to be uint8, got ", packed.scalar_type());
  TORCH_CHECK(packed.dim() == 3 && (packed.size(2) == slab_bytes(4) || packed.size(2) == slab_bytes(8)), op,
              ": expected packed of shape [num_blocks, Kp/16, 512 or 1024] (from mpq::pack_multipoint), got ",
              packed.sizes());
  TORCH_CHECK(packed_scales.scalar_type() == at::kFloat, op, ": expected packed_scales to be float32, got ",
              packed_scales.scalar_type());
  TORCH_CHECK(packed_scales.dim() == 2 && packed_scales.size(0) == packed.size(0) && packed_scales.size(1) == kTileN,
              op, ": expected packed_scales of shape [", packed.size(0), ", ", kTileN, "], got ",
              packed_scales.sizes());
  TORCH_CHECK(perm.scalar_type() == at::kInt, op, ": expected perm to be int32, got ", perm.scalar_type());
  TORCH_CHECK(perm.dim() == 1 && perm.size(0) % kTileN == 0, op, ": expected perm of shape [num_tiles * 64], got ",
              perm.sizes());
  const int64_t num_tiles = perm.size(0) / kTileN;
  TORCH_CHECK(tile_offsets.scalar_type() == at::kInt, op, ": expected tile_offsets to be int32, got ",
              tile_offsets.scalar_type());
  TORCH_CHECK(tile_offsets.dim() == 1 && tile_offsets.size(0) == num_tiles + 1, op,
              ": expected tile_offsets of shape [", num_tiles + 1, "] (perm has ", num_tiles, " tiles), got ",
              tile_offsets.sizes());
  TORCH_CHECK(packed.device() == packed_scales.device() && packed.device() == perm.device() &&
                  packed.device() == tile_offsets.device(),
              op, ": expected packed, packed_scales, perm and tile_offsets on one device, got ", packed.device(), ", ",
              packed_scales.device(), ", ", perm.device(), ", ", tile_offsets.device());
  TORCH_CHECK(out_features >= 0 && out_features <= perm.size(0), op, ": expected out_features in 0..", perm.size(0),
              " (perm's rows), got ", out_features);
  if (tile_offsets.is_cpu()) {
    const auto off = tile_offsets.contiguous();
    const int* o = off.data_ptr<int>();
    int64_t bad = o[0] == 0 ? -1 : 0;
    for (int64_t t = 0; bad < 0 && t < num_tiles; ++t) {
      if (o[t + 1] < o[t]) bad = t + 1;
    }
    TORCH_CHECK(bad < 0 && o[num_tiles] == packed.size(0), op,
                ": expected tile_offsets to rise from 0 to num_blocks = ", packed.size(0),
                " (from mpq::pack_multipoint), got ", bad < 0 ? o[num_tiles] : o[bad], " at index ",
                bad < 0 ? num_tiles : bad);
  }
  if (perm.is_cpu()) {
    const auto p = perm.contiguous();
    const int* v = p.data_ptr<int>();
    std::vector<char> seen(static_cast<size_t>(out_features), 0);
    int64_t count = 0;
    for (int64_t r = 0; r < perm.size(0); ++r) {
      if (v[r] == -1) continue;
      TORCH_CHECK(v[r] >= 0 && v[r] < out_features && !seen[v[r]], op, ": expected perm to hold every channel 0..",
                  out_features - 1, " once and -1 for padding rows, got ", v[r], " at row ", r);
      seen[v[r]] = 1;
      ++count;
    }
    TORCH_CHECK(count == out_features, op, ": expected perm to hold all ", out_features, " channels, got ", count);
  }
}

void check_unpack_multipoint_args(const at::Tensor& packed, const at::Tensor& packed_scales, const at::Tensor& perm,
                                  const at::Tensor& tile_offsets, int64_t out_features, int64_t in_features,
                                  int64_t max_points) {
  constexpr const char* op = "mpq::unpack_multipoint";
  check_packed_weight(op, packed, packed_scales, perm, tile_offsets, out_features);
  TORCH_CHECK(in_features >= 0 && mpq::packed::padded_k(in_features) == packed.size(1) * mpq::packed::kSlabK, op,
              ": expected in_features with Kp = ", packed.size(1) * mpq::packed::kSlabK,
              " (in_features rounded up to a multiple of 64), got in_features = ", in_features);
  TORCH_CHECK(max_points >= 0, op, ": expected max_points >= 0, got ", max_points);
  if (tile_offsets.is_cpu() && tile_offsets.size(0) > 1) {
    const auto most = at::diff(tile_offsets).max().item<int64_t>();
    TORCH_CHECK(most <= max_points, op, ": expected max_points >= the largest tile's point count ", most, ", got ",
                max_points);
  }
}

namespace {

// The packed weight with its values where they are on the CPU, and row_sums.
void check_packed_operands(const char* op, const at::Tensor& packed, const at::Tensor& packed_scales,
                           const at::Tensor& perm, const at::Tensor& tile_offsets, const at::Tensor& row_sums,
                           int64_t out_features) {
  check_packed_weight(op, packed, packed_scales, perm, tile_offsets, out_features);
  if (packed_scales.is_cpu()) {  // as the scales in check_multipoint_weight: not on CUDA (a sync)
    const auto s = packed_scales.contiguous();
    const float* v = s.data_ptr<float>();
    for (int64_t i = 0; i < s.numel(); ++i) {
      TORCH_CHECK(std::isfinite(v[i]), op, ": expected finite packed_scales, got ", v[i], " at packed_scales[",
                  i / s.size(1), ", ", i % s.size(1), "]");
    }
  }
  TORCH_CHECK(row_sums.scalar_type() == at::kFloat && row_sums.dim() == 1 && row_sums.size(0) == perm.size(0), op,
              ": expected row_sums to be float32[", perm.size(0), "], got ", row_sums.scalar_type(), row_sums.sizes());
  TORCH_CHECK(row_sums.device() == packed.device(), op, ": expected row_sums on ", packed.device(), ", got ",
              row_sums.device());
}

// `kernel` by name, one of `names` (the op's choices), with its dtype preconditions.
PackedKernel parse_packed_kernel(const char* op, c10::string_view kernel, const std::vector<const char*>& names,
                                 const at::Tensor& input, const c10::optional<at::Tensor>& act_qparams) {
  static const std::pair<const char*, PackedKernel> all[] = {
      {"auto", PackedKernel::kAuto}, {"dense", PackedKernel::kDense}, {"gemv", PackedKernel::kGemv},
      {"mma", PackedKernel::kMma},   {"igemm", PackedKernel::kIgemm}, {"int8", PackedKernel::kInt8}};
  PackedKernel k = PackedKernel::kAuto;
  bool found = false;
  for (const char* name : names) {
    if (kernel != name) continue;
    for (const auto& [n, v] : all) {
      if (std::string(n) == name) k = v;
    }
    found = true;
  }
  if (!found) {
    std::string choices;
    for (const char* name : names) choices += (choices.empty() ? "" : ", ") + std::string(name);
    TORCH_CHECK(false, op, ": expected kernel to be one of ", choices, ", got '", std::string(kernel), "'");
  }
  const auto dt = input.scalar_type();
  if (k == PackedKernel::kGemv || k == PackedKernel::kMma || k == PackedKernel::kIgemm) {
    TORCH_CHECK(dt == at::kHalf || dt == at::kBFloat16, op, ": kernel '", std::string(kernel),
                "' expects a float16 or bfloat16 input, got ", dt);
  }
  if (k == PackedKernel::kInt8) {
    TORCH_CHECK(act_qparams.has_value(), op, ": kernel 'int8' expects act_qparams (int8 activations), got None");
    TORCH_CHECK(dt == at::kHalf || dt == at::kBFloat16 || dt == at::kFloat, op,
                ": kernel 'int8' expects a float16, bfloat16 or float32 input, got ", dt);
  }
  return k;
}

}  // namespace

PackedKernel check_multipoint_linear_packed_args(const at::Tensor& input, const at::Tensor& packed,
                                                 const at::Tensor& packed_scales, const at::Tensor& perm,
                                                 const at::Tensor& tile_offsets, const at::Tensor& row_sums,
                                                 int64_t out_features, const c10::optional<at::Tensor>& bias,
                                                 const c10::optional<at::Tensor>& act_qparams,
                                                 c10::string_view kernel) {
  constexpr const char* op = "mpq::multipoint_linear_packed";
  check_packed_operands(op, packed, packed_scales, perm, tile_offsets, row_sums, out_features);
  check_bias_and_act(op, input, bias, act_qparams, out_features);
  TORCH_CHECK(input.device() == packed.device(), op, ": expected input on ", packed.device(),
              " with the packed weight, got ", input.device());
  TORCH_CHECK(input.dim() >= 1 && mpq::packed::padded_k(input.size(-1)) == packed.size(1) * mpq::packed::kSlabK, op,
              ": expected input [..., D] with D rounded up to a multiple of 64 equal to the packed Kp = ",
              packed.size(1) * mpq::packed::kSlabK, ", got input shape ", input.sizes());
  return parse_packed_kernel(op, kernel, {"auto", "dense", "gemv", "mma", "int8"}, input, act_qparams);
}

PackedConv2dArgs check_multipoint_conv2d_packed_args(
    const at::Tensor& input, const at::Tensor& packed, const at::Tensor& packed_scales, const at::Tensor& perm,
    const at::Tensor& tile_offsets, const at::Tensor& row_sums, int64_t out_channels, at::IntArrayRef kernel_size,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& act_qparams, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, c10::string_view kernel) {
  constexpr const char* op = "mpq::multipoint_conv2d_packed";
  check_packed_operands(op, packed, packed_scales, perm, tile_offsets, row_sums, out_channels);
  check_bias_and_act(op, input, bias, act_qparams, out_channels);
  TORCH_CHECK(input.device() == packed.device(), op, ": expected input on ", packed.device(),
              " with the packed weight, got ", input.device());
  TORCH_CHECK(input.dim() == 4, op, ": expected input [N, C_in, H, W], got shape ", input.sizes());
  TORCH_CHECK(kernel_size.size() == 2 && kernel_size[0] >= 1 && kernel_size[1] >= 1, op,
              ": expected kernel_size [kh, kw] with kh, kw >= 1, got ", kernel_size);
  TORCH_CHECK(groups >= 1 && out_channels % groups == 0 && input.size(1) % groups == 0, op,
              ": expected groups >= 1 dividing out_channels (", out_channels, ") and the input's channels (",
              input.size(1), "), got groups = ", groups);
  const int64_t D = kernel_size[0] * kernel_size[1] * (input.size(1) / groups);
  TORCH_CHECK(mpq::packed::padded_k(D) == packed.size(1) * mpq::packed::kSlabK, op,
              ": expected kh * kw * C_in / groups = ", D,
              " rounded up to a multiple of 64 to equal the packed Kp = ", packed.size(1) * mpq::packed::kSlabK,
              " (input shape ", input.sizes(), ", kernel_size ", kernel_size, ", groups ", groups, ")");
  auto out_shape = conv2d_output_shape(op, input, out_channels, kernel_size[0], kernel_size[1], stride, padding,
                                       dilation);
  return {parse_packed_kernel(op, kernel, {"auto", "dense", "igemm", "int8"}, input, act_qparams), out_shape, D};
}

}  // namespace mpq
