// Argument checks shared by the CPU and CUDA kernels of each op: every user mistake is
// reported with the op's name and the argument's name before any work starts.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>
#include <c10/util/string_view.h>

#include <vector>

namespace mpq {

// The code width of a multipoint weight (argument `name` of op `op`): w_bits in
// layout::kMinWBits..kMaxWBits (csrc/kernels/layout.h).
void check_w_bits(const char* op, int64_t w_bits, const char* name = "w_bits");
// Points per channel: max_points in 1..layout::kMaxPoints, the bound QuantConfig and the modules
// read through mpq::layout_constants.
void check_max_points(const char* op, int64_t max_points);

// fit_multipoint: weight float32/float64 [C, D] without NaN/inf, bits as check_w_bits, max_points as
// check_max_points, and every row's squared norm sum_d w[j, d]^2 (in float64) at most
// kMaxRowSquaredNorm: sq_errors are float32 and the greedy errors never exceed the row's squared
// norm, so none overflows to inf (nor do the scales, least-squares scales at most max|residual| <=
// ||w_j||). Syncs the device on CUDA (a one-off op).
constexpr double kMaxRowSquaredNorm = 3.4028234663852886e38;  // FLT_MAX
void check_fit_multipoint_args(const at::Tensor& weight, int64_t bits, int64_t max_points);

// The multipoint weight triple, for an op named `op`; `code_dims` is the rank of codes
// (3 for linear [C, P, D], 5 for conv [C, P, C_in/g, kh, kw]). C = 0 channels and P = 0 points
// are valid (an empty weight, an all-zero weight). When num_points and scales live on the CPU,
// also their values: num_points in 0..P, and the scales of the points in use (k < num_points[c])
// finite. NB: on CUDA neither is checked, as reading them would sync the device: counts are
// clamped to 0..P by the kernels, and non-finite scales propagate as NaN (or inf) into the
// dequantized weight and the layer's output.
void check_multipoint_weight(const char* op, const at::Tensor& codes, const at::Tensor& scales,
                             const at::Tensor& num_points, int64_t code_dims);

// Optional bias floating [out_channels] on `device` and activation qparams float32[4] = (scale,
// zero_point, qmin, qmax) on the CPU or on `device`.
void check_bias_and_act_qparams(const char* op, const at::Device& device, const c10::optional<at::Tensor>& bias,
                                const c10::optional<at::Tensor>& act_qparams, int64_t out_channels);
// The same, on a floating input (its device).
void check_bias_and_act(const char* op, const at::Tensor& input, const c10::optional<at::Tensor>& bias,
                        const c10::optional<at::Tensor>& act_qparams, int64_t out_channels);

// The values of act_qparams once on the host: finite, scale > 0, qmin < qmax.
void check_act_qparams_values(const char* op, double scale, double zero_point, double qmin, double qmax);

// Every argument of mpq::dequantize_multipoint / multipoint_linear / multipoint_conv2d, on any
// backend; the input must live on the device of codes, act_qparams there or on the CPU.
// multipoint_conv2d also needs a kernel of at least 1 x 1 (codes), an input of at least 1 x 1 and
// the dilated kernel inside the padded input (an output of at least 1 x 1); it returns the output
// shape [N, C_out, H_out, W_out]: with C_out = 0 the kernels return an empty tensor of that shape
// (ATen's conv2d refuses a weight without output channels).
void check_dequantize_args(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& num_points,
                           at::ScalarType dtype);
void check_multipoint_linear_args(const at::Tensor& input, const at::Tensor& codes, const at::Tensor& scales,
                                  const at::Tensor& num_points, const c10::optional<at::Tensor>& bias,
                                  const c10::optional<at::Tensor>& act_qparams);
std::vector<int64_t> check_multipoint_conv2d_args(const at::Tensor& input, const at::Tensor& codes,
                                                  const at::Tensor& scales, const at::Tensor& num_points,
                                                  const c10::optional<at::Tensor>& bias,
                                                  const c10::optional<at::Tensor>& act_qparams, at::IntArrayRef stride,
                                                  at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups);

// The geometry of a convolution on the stored form (code_shape = [C_in/groups, kh, kw], C output
// channels), bias and act_qparams' shapes, without making or reading a tensor (the stored-form ops
// check these on every call); the input may be float or uint8 levels. Returns the output shape.
std::vector<int64_t> check_stored_conv2d_args(const char* op, const at::Tensor& input, int64_t out_channels,
                                              at::IntArrayRef code_shape, const c10::optional<at::Tensor>& bias,
                                              const c10::optional<at::Tensor>& act_qparams, at::IntArrayRef stride,
                                              at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups);

// ---- the packed weight (csrc/kernels/packed_layout.h) -------------------------------------------

// mpq::pack_multipoint: codes int8[C, P, D], scales, num_points as check_multipoint_weight, w_bits
// as check_w_bits, groups >= 1 dividing C; on the CPU also the codes of the points in use within
// the storage range (-8..7 for w_bits <= 4).
void check_pack_multipoint_args(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& num_points,
                                int64_t w_bits, int64_t groups);

// The tensors of a packed weight for op `op`: dtypes, shapes and one device; out_features in
// 0..num_tiles*64. When tile_offsets and perm live on the CPU, also their values (offsets from 0,
// non-decreasing, ending at num_blocks; perm a permutation of 0..out_features-1 padded with -1).
void check_packed_weight(const char* op, const at::Tensor& packed, const at::Tensor& packed_scales,
                         const at::Tensor& perm, const at::Tensor& tile_offsets, int64_t out_features);

// mpq::unpack_multipoint: the packed weight, in_features matching its Kp, max_points >= every tile's count.
void check_unpack_multipoint_args(const at::Tensor& packed, const at::Tensor& packed_scales, const at::Tensor& perm,
                                  const at::Tensor& tile_offsets, int64_t out_features, int64_t in_features,
                                  int64_t max_points);

// The kernels the packed ops may be asked for (linear: auto, dense, gemv, mma, int8; conv2d: auto,
// dense, igemm, int8).
enum class PackedKernel { kAuto, kDense, kGemv, kMma, kIgemm, kInt8 };

// Every argument of mpq::multipoint_linear_packed; returns the kernel asked for (its preconditions
// on dtypes checked: gemv/mma need float16/bfloat16 input, int8 needs act_qparams). On the CPU also
// packed_scales finite (as the scales of check_multipoint_weight; on CUDA not checked, NaN propagates).
PackedKernel check_multipoint_linear_packed_args(const at::Tensor& input, const at::Tensor& packed,
                                                 const at::Tensor& packed_scales, const at::Tensor& perm,
                                                 const at::Tensor& tile_offsets, const at::Tensor& row_sums,
                                                 int64_t out_features, const c10::optional<at::Tensor>& bias,
                                                 const c10::optional<at::Tensor>& act_qparams, c10::string_view kernel);

// Every argument of mpq::multipoint_conv2d_packed: the packed weight as for the linear op, input
// [N, C_in, H, W] on its device, groups dividing C_in and out_channels, kh * kw * C_in / groups
// matching the packed Kp, stride/padding/dilation as multipoint_conv2d. Returns the kernel asked
// for ("igemm" needs float16/bfloat16 input, "int8" act_qparams), the output shape and D.
struct PackedConv2dArgs {
  PackedKernel kernel;
  std::vector<int64_t> out_shape;
  int64_t in_features;  // D = kh * kw * C_in / groups
};
PackedConv2dArgs check_multipoint_conv2d_packed_args(
    const at::Tensor& input, const at::Tensor& packed, const at::Tensor& packed_scales, const at::Tensor& perm,
    const at::Tensor& tile_offsets, const at::Tensor& row_sums, int64_t out_channels, at::IntArrayRef kernel_size,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& act_qparams, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, c10::string_view kernel);

}  // namespace mpq
