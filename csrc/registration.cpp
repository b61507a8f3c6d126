// Every mpq operator schema, in one place. Kernels register per backend in
// csrc/cpu/*.cpp and csrc/cuda/*.cu; fake kernels for tracing live in python/mpq/ops.py.
#include <torch/library.h>

#include "cpu/multipoint_layers.h"

#include <sstream>
#include <string>

#ifndef MPQ_VERSION
#define MPQ_VERSION "unknown"
#endif
#ifndef MPQ_TORCH_VERSION
#define MPQ_TORCH_VERSION "unknown"
#endif
#ifndef MPQ_WITH_CUDA
#define MPQ_WITH_CUDA 0
#endif
#ifndef MPQ_CUDA_ARCHITECTURES
#define MPQ_CUDA_ARCHITECTURES ""
#endif

namespace mpq {

// Build facts as JSON, so Python and C++ read them the same way.
static std::string build_info() {
  std::ostringstream out;
  out << "{\"mpq_version\": \"" << MPQ_VERSION << "\", \"torch_version\": \"" << MPQ_TORCH_VERSION
      << "\", \"cuda_kernels\": " << (MPQ_WITH_CUDA ? "true" : "false") << ", \"cuda_architectures\": \""
      << (MPQ_WITH_CUDA ? MPQ_CUDA_ARCHITECTURES : "") << "\"}";
  return out.str();
}

}  // namespace mpq

TORCH_LIBRARY(mpq, m) {
  // Greedy multipoint fit of every row w_j of weight[C, D]: point k solves
  // min_{a>0, q in {-K..K}^D} ||r - a q||^2 on the residual r of the first k points
  // (exact: breakpoint sweep; otherwise a log-grid search with least-squares refinement).
  // codes int8[C, max_points, D], scales float32[C, max_points],
  // sq_errors float32[C, max_points] = ||w_j - sum_{i<=k} scales[j,i] codes[j,i]||^2.
  m.def(
      "fit_multipoint(Tensor weight, int bits, int max_points, bool exact) -> "
      "(Tensor codes, Tensor scales, Tensor sq_errors)");

  // Dense weight W[j] = sum_{k < num_points[j]} scales[j,k] * codes[j,k], in `dtype`:
  // codes int8[C, P, ...], scales float32[C, P], num_points int32[C] -> dtype[C, ...].
  m.def("dequantize_multipoint(Tensor codes, Tensor scales, Tensor num_points, ScalarType dtype) -> Tensor");

  // y = fq(input) @ W^T + bias with W the dequantized multipoint weight (codes int8[C, P, D]);
  // fq is per-tensor affine fake quantization with act_qparams float32[4] =
  // (scale, zero_point, qmin, qmax), or the identity when act_qparams is None.
  m.def(
      "multipoint_linear(Tensor input, Tensor codes, Tensor scales, Tensor num_points, "
      "Tensor? bias, Tensor? act_qparams) -> Tensor");

  // conv2d(fq(input), W, bias, stride, padding, dilation, groups) with W the dequantized
  // multipoint weight (codes int8[C_out, P, C_in/groups, kh, kw]); fq as in multipoint_linear.
  m.def(
      "multipoint_conv2d(Tensor input, Tensor codes, Tensor scales, Tensor num_points, "
      "Tensor? bias, Tensor? act_qparams, int[2] stride, int[2] padding, int[2] dilation, "
      "int groups) -> Tensor");

  // The packed weight for the fused kernels (layout: csrc/kernels/packed_layout.h), made once:
  // channels sorted by point count into tiles of 64 with one count each, 4-bit codes as nibbles
  // (w_bits <= 4) or int8, laid out as the lanes of a warp load them for mma.sync.
  // packed uint8[num_blocks, Kp/16, 512 or 1024], packed_scales float32[num_blocks, 64],
  // perm int32[num_tiles*64] (original channel of each packed row, -1 for padding),
  // tile_offsets int32[num_tiles+1] (tile t's points are blocks tile_offsets[t]..[t+1]-1),
  // row_sums float32[num_tiles*64] (sum over k of each dequantized row).
  // groups > 1 (grouped convolutions): channels are sorted by group first, so that every tile
  // holds channels of one group (group of channel c = c / (C / groups)).
  m.def(
      "pack_multipoint(Tensor codes, Tensor scales, Tensor num_points, int w_bits, int groups=1) -> "
      "(Tensor packed, Tensor packed_scales, Tensor perm, Tensor tile_offsets, Tensor row_sums)");

  // The inverse of pack_multipoint: codes int8[C, max_points, D] (zero beyond each channel's
  // count), scales float32[C, max_points], num_points int32[C].
  m.def(
      "unpack_multipoint(Tensor packed, Tensor packed_scales, Tensor perm, Tensor tile_offsets, "
      "int out_features, int in_features, int max_points) -> (Tensor codes, Tensor scales, Tensor num_points)");

  // multipoint_linear on a packed weight: fq(input) @ W^T + bias -> [..., out_features], the same
  // function whichever kernel runs it. kernel: "auto", or on CUDA "dense" (decode, then cuBLAS),
  // "gemv" / "mma" (fused weight-only, float16/bfloat16 input), "int8" (int8 activations from
  // act_qparams, int8 tensor cores); the CPU kernel computes every choice with the reference path.
  m.def(
      "multipoint_linear_packed(Tensor input, Tensor packed, Tensor packed_scales, Tensor perm, "
      "Tensor tile_offsets, Tensor row_sums, int out_features, Tensor? bias, Tensor? act_qparams, "
      "str kernel=\"auto\") -> Tensor");

  // multipoint_conv2d on a packed weight: the codes [C_out, P, C_in/groups, kh, kw] packed as
  // [C_out, P, kh * kw * C_in/groups], the columns in (kh, kw, c) order (NHWC), with
  // pack_multipoint(..., groups). Same function as multipoint_conv2d, whichever kernel runs it;
  // kernel: "auto", or on CUDA "dense" (decode, then cuDNN), "igemm" (fused weight-only implicit
  // GEMM on NHWC, float16/bfloat16 input), "int8" (int8 activations, int8 tensor cores).
  // NB: the packed weight records K only rounded up to 64: kernel_size and groups must be those it
  // was packed with (a kernel_size with the same padded K is not detected).
  m.def(
      "multipoint_conv2d_packed(Tensor input, Tensor packed, Tensor packed_scales, Tensor perm, "
      "Tensor tile_offsets, Tensor row_sums, int out_channels, int[2] kernel_size, Tensor? bias, "
      "Tensor? act_qparams, int[2] stride, int[2] padding, int[2] dilation, int groups, "
      "str kernel=\"auto\") -> Tensor");

  // The stored form of a multipoint weight (what files hold): only the points in use
  // (k < num_points[j]), channel-major, each point's D codes bit-packed at w_bits bits (code i at
  // bits i*w_bits.. of its row, LSB first, two's complement): point_codes uint8[T, ceil(D*w_bits/8)],
  // point_scales float32[T], T = sum(num_points). codes int8[C, P, ...] (D = prod of the trailing dims).
  m.def(
      "pack_points(Tensor codes, Tensor scales, Tensor num_points, int w_bits) -> (Tensor point_codes, Tensor "
      "point_scales)");

  // The inverse of pack_points: codes int8[C, max_points, D] (zero beyond each channel's count),
  // scales float32[C, max_points].
  m.def(
      "unpack_points(Tensor point_codes, Tensor point_scales, Tensor num_points, int w_bits, int in_features, "
      "int max_points) -> (Tensor codes, Tensor scales)");

  // multipoint_linear on the stored form: fq(input) @ W^T + bias -> [..., C], C = num_points.size(0),
  // the same function whichever kernel runs it. On the CPU, path "int8" runs oneDNN's int8 inner
  // product on the points (float32 input, act_qparams with at most 256 integer levels), "dense" the
  // weight decoded once after fake-quantizing the input, "weight_only" the codes kept packed and
  // decoded in registers after fake-quantizing the input (csrc/kernels/weight_only_linear.h: for few
  // rows, float32 activations with 4-bit codes read 1/8 of the float weight's bytes), "auto" picks by
  // the layer's shape; each prepared once per weight (csrc/cpu/multipoint_stored.cpp). Other
  // backends: the reference op.
  // NB: not named "kernel": Inductor's fallback kernels take that keyword themselves.
  m.def(
      "multipoint_linear_stored(Tensor input, Tensor point_codes, Tensor point_scales, Tensor num_points, "
      "int w_bits, int in_features, Tensor? bias, Tensor? act_qparams, str path=\"auto\") -> Tensor");

  // The group-wise layers (python/mpq/nn/groupwise.py) on their stored form: codes one row per
  // channel (point_codes uint8 [C, ceil(D * w_bits / 8)], D = prod(code_shape); in_features for
  // Linear is input.size(-1)), group_scales float16 [C, ceil(D / group_size)], group_zeros the zero
  // points packed like codes (uint8 [C, ...], or [0, ...] for a symmetric grid), input_scales
  // float16 [in_channels] (AWQ's, dividing each input channel's weights) or [0]. The float op on
  // the dense weight scale * (code - zero) / input_scale, the input taken as it comes (the layer
  // fake-quantizes it first). CPU: the weight decoded once and cached (float32's speed and memory);
  // other backends: decoded per call (csrc/cpu/groupwise.cpp).
  m.def(
      "groupwise_linear(Tensor input, Tensor point_codes, Tensor group_scales, Tensor group_zeros, "
      "Tensor input_scales, int w_bits, int group_size, Tensor? bias) -> Tensor");
  m.def(
      "groupwise_conv2d(Tensor input, Tensor point_codes, Tensor group_scales, Tensor group_zeros, "
      "Tensor input_scales, int w_bits, int group_size, int[] code_shape, Tensor? bias, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups) -> Tensor");

  // multipoint_conv2d on the stored form (code_shape = [C_in/groups, kh, kw]); CPU kernels as
  // multipoint_linear_stored (oneDNN int8 convolution). The CPU kernel's output is channels_last
  // (oneDNN's layout: the next layer reads it without a reorder).
  m.def(
      "multipoint_conv2d_stored(Tensor input, Tensor point_codes, Tensor point_scales, Tensor num_points, "
      "int w_bits, int[3] code_shape, Tensor? bias, Tensor? act_qparams, int[2] stride, int[2] padding, "
      "int[2] dilation, int groups, str path=\"auto\") -> Tensor");

  // multipoint_conv2d_stored with int8 activations between layers: y = clamp(conv + bias + residual,
  // clamp_min, clamp_max; None: no bound), returned as float32 or, with out_qparams (the next layer's act_qparams),
  // as that quantizer's uint8 levels u = L - qmin. The input is float32 or such uint8 levels at this
  // layer's act_qparams; the residual float32 or uint8 levels at residual_qparams (its values
  // (u - (zp - qmin)) * s are added). path: "auto", "int8" (oneDNN), "depthwise" (mpq's own kernel
  // on uint8 levels), "dense"; every path computes the same function. CPU output is channels_last.
  m.def(
      "multipoint_conv2d_fused(Tensor input, Tensor point_codes, Tensor point_scales, Tensor num_points, "
      "int w_bits, int[3] code_shape, Tensor? bias, Tensor act_qparams, int[2] stride, int[2] padding, "
      "int[2] dilation, int groups, Tensor? residual, float? clamp_min, float? clamp_max, Tensor? out_qparams, "
      "str path=\"auto\", Tensor? residual_qparams=None) -> Tensor");

  // Max pooling of uint8 activation levels [N, C, H, W] (PyTorch's max_pool2d arguments): exactly the
  // levels of the max-pooled values, since quantizing is monotone; what a fused model runs between a
  // convolution that writes levels and the convolutions that read them (python/mpq/fuse.py).
  // CPU output is channels_last.
  m.def(
      "max_pool2d_levels(Tensor levels, int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, "
      "bool ceil_mode) -> Tensor");

  // Whether the CPU int8 paths compute w_bits-bit weight codes exactly here against activations of
  // act_levels levels (oneDNN without VNNI saturates 8-bit codes under 8-bit activations;
  // csrc/cpu/multipoint_stored.cpp): where not, "auto" takes the float path.
  m.def("int8_kernels_exact(int w_bits, int act_levels=256) -> bool", &mpq::int8_kernels_exact);

  // Per channel of a stored weight (CPU), how many of its leading points the CPU int8 kernels run as
  // one int8 row: points whose scales divide by whole numbers exactly, with merged codes in the
  // exact range against activations of act_levels levels (MultipointConfig(int8_merge=True) fits such
  // scales). int32 [C]; 1 where none merge.
  m.def(
      "int8_merged_points(Tensor point_codes, Tensor point_scales, Tensor num_points, int w_bits, int D, "
      "int act_levels=256) -> Tensor",
      &mpq::int8_merged_points);

  // Build facts (mpq version, torch version, CUDA kernels and architectures) as a JSON string.
  m.def("_build_info() -> str", &mpq::build_info);

  // The layout rules that Python shares with the kernels (csrc/kernels/layout.h, packed_layout.h;
  // python/mpq/layout.py reads them once), so that no rule is written twice. Any backend
  // (csrc/cpu/layout.cpp). The constants by name: min_w_bits, max_w_bits (code widths), max_points
  // (points per channel: 1..max_points), scale_bits, count_bits (stored point scales float32,
  // point counts int32), int8_levels (levels of an int8 activation quantizer), and of the packed
  // weight packed_format_version, tile_n (rows per tile), slab_k (columns per slab), k_align (Kp is
  // D rounded up to a multiple), nibble_max_w_bits (the widest codes stored as nibbles),
  // slab_bytes_nibble, slab_bytes_int8 (a slab's bytes), int8_max_k (the int8 kernels' largest Kp).
  m.def("layout_constants() -> Dict(str, int)");
  // Whether the int8 paths represent act_qparams float32[4] = (scale, zero_point, qmin, qmax)
  // exactly: valid, integer zero point and range, at most int8_levels levels (read on the host).
  m.def("int8_levels_fit(Tensor act_qparams) -> bool");
  // Whether the packed int8 CUDA kernel (multipoint_{linear,conv2d}_packed, kernel "int8") computes a
  // layer: act_qparams as int8_levels_fit, Kp <= int8_max_k, and for a convolution (code_shape
  // [C_in/groups, kh, kw]; a Linear layer's is [in_features]) C_in/groups a multiple of slab_k and
  // qmin <= zero_point <= qmin + int8_levels - 1. What the modules ask once when they pack.
  m.def("packed_int8_fits(Tensor act_qparams, int[] code_shape) -> bool");
}
