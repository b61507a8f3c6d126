// CPU kernels of the multipoint layers (csrc/cpu/multipoint_layers.cpp), for the CPU kernels of
// other ops that reduce to them (the packed linear and conv2d in csrc/cpu/multipoint_packed.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Optional.h>

#include <functional>
#include <tuple>
#include <vector>

namespace mpq {

// Whether oneDNN's int8 kernels compute w_bits-bit codes exactly on this CPU against activations
// of act_levels levels (8-bit codes under 8-bit activations need VNNI: without it their uint8 x int8
// pair sums saturate int16; under 7-bit activations they are exact everywhere). The CPU int8 paths
// follow it; Python asks through mpq::int8_kernels_exact.
bool int8_kernels_exact(int64_t w_bits, int64_t act_levels);

// Per channel of a stored weight, how many of its leading points the CPU int8 kernels run as one
// int8 row against activations of act_levels levels (scales in whole-number ratios, merged codes in
// the exact range): int32 [C], 1 where
// none merge, 0 for channels without points (csrc/cpu/multipoint_stored.cpp: merge_points_exactly).
at::Tensor int8_merged_points(const at::Tensor& point_codes, const at::Tensor& point_scales,
                              const at::Tensor& num_points, int64_t w_bits, int64_t D, int64_t act_levels);

at::Tensor dequantize_multipoint_cpu(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& num_points,
                                     at::ScalarType dtype);

at::Tensor multipoint_linear_cpu(const at::Tensor& input, const at::Tensor& codes, const at::Tensor& scales,
                                 const at::Tensor& num_points, const c10::optional<at::Tensor>& bias,
                                 const c10::optional<at::Tensor>& act_qparams);

at::Tensor multipoint_conv2d_cpu(const at::Tensor& input, const at::Tensor& codes, const at::Tensor& scales,
                                 const at::Tensor& num_points, const c10::optional<at::Tensor>& bias,
                                 const c10::optional<at::Tensor>& act_qparams, at::IntArrayRef stride,
                                 at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups);

// mpq::unpack_points (csrc/cpu/multipoint_stored.cpp): codes int8 [C, max_points, D], scales.
std::tuple<at::Tensor, at::Tensor> unpack_points(const at::Tensor& point_codes, const at::Tensor& point_scales,
                                                 const at::Tensor& num_points, int64_t w_bits, int64_t D,
                                                 int64_t max_points);

// A dense weight kept by the ops library's cache of prepared weights (csrc/cpu/multipoint_stored.cpp):
// made by `make` on the first call, and again when one of `tensors` (tensors[0]: the key) was
// replaced or changed in place or `key` differs (key[0]: a tag no other prepared form uses).
at::Tensor cached_weight(const std::vector<at::Tensor>& tensors, const std::vector<double>& key,
                         const std::function<at::Tensor()>& make);

}  // namespace mpq
