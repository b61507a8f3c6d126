// CUDA kernels of the multipoint layers, the generic path for any GPU: the weight is dequantized
// by a small kernel (C * P * D multiply-adds, read once) and the layer runs through ATen (cuBLAS /
// cuDNN), exactly as the CPU kernels in csrc/cpu/multipoint_layers.cpp do it. The activation fake
// quantization is one elementwise kernel that reads act_qparams from device memory, so no host
// synchronisation happens. The fused kernels of the packed weight are csrc/cuda/multipoint_packed.cu.
// One fused kernel lives here: depthwise convolutions (groups = C_in = C_out) on channels_last
// float16/bfloat16 inputs run a direct kernel that reads the multipoint codes themselves (a packed
// 64-channel tile would hold one channel of a depthwise layer).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/conv2d.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/linear.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "checks.h"
#include "cuda/act_quant.cuh"
#include "cuda/layer_kernels.cuh"

namespace mpq {
namespace cuda_detail {

int64_t grid_for(int64_t n, int threads) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
  return grid_for(n, threads, sms);
}

}  // namespace cuda_detail

namespace {

using namespace mpq::layer_kernels;
using cuda_detail::ActParams;
using cuda_detail::compute_t;

int64_t grid_for(int64_t n) { return cuda_detail::grid_for(n, kThreads); }

at::Tensor dequantize(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& num_points,
                      at::ScalarType dtype) {
  if (dtype != at::kDouble && dtype != at::kFloat && dtype != at::kHalf && dtype != at::kBFloat16) {
    // Other floating dtypes (float8): float32, then a cast, as the CPU kernel does.
    return dequantize(codes, scales, num_points, at::kFloat).to(dtype);
  }
  const auto c = codes.contiguous();
  const auto s = scales.contiguous();
  const auto np = num_points.contiguous();
  const int64_t C = c.size(0), P = c.size(1);
  std::vector<int64_t> shape = {C};
  for (int64_t d = 2; d < c.dim(); ++d) shape.push_back(c.size(d));
  auto out = at::empty(shape, c.options().dtype(dtype));
  const int64_t S = C > 0 ? out.numel() / C : 0;
  if (out.numel() == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "mpq::dequantize_multipoint_cuda", [&] {
    dequantize_kernel<scalar_t><<<static_cast<unsigned>(grid_for(C * S)), kThreads, 0, stream>>>(
        c.data_ptr<int8_t>(), s.data_ptr<float>(), np.data_ptr<int>(), C, static_cast<int>(P), S,
        out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

void check_on_cuda(const char* op, const at::Tensor& input, const at::Tensor& codes) {
  TORCH_CHECK(codes.is_cuda(), op, ": expected codes, scales and num_points on a CUDA device, got ", codes.device());
}

}  // namespace

namespace {

at::Tensor depthwise_conv2d(const at::Tensor& input, const at::Tensor& codes, const at::Tensor& scales,
                            const at::Tensor& num_points, const c10::optional<at::Tensor>& bias,
                            const c10::optional<at::Tensor>& act_qparams, at::IntArrayRef stride,
                            at::IntArrayRef padding, at::IntArrayRef dilation, const std::vector<int64_t>& out_shape) {
  constexpr const char* op = "mpq::multipoint_conv2d";
  at::Tensor qp;
  ActParams params{nullptr, {1.0f, 0.0f, 0.0f, 1.0f}};
  if (act_qparams.has_value()) params = cuda_detail::act_params(op, *act_qparams, qp);  // checks host values
  const auto x = input.contiguous(at::MemoryFormat::ChannelsLast);
  auto out = at::empty(out_shape, input.options().memory_format(at::MemoryFormat::ChannelsLast));
  const int64_t n = out.numel();
  if (n == 0) return out;
  const auto c = codes.contiguous();
  const auto s = scales.contiguous();
  const auto np = num_points.contiguous();
  at::Tensor b;
  if (bias.has_value()) b = bias->to(input.scalar_type()).to(at::kFloat).contiguous();  // as the generic path adds it
  const DepthwiseShape shape{input.size(0),
                             static_cast<int>(input.size(2)),
                             static_cast<int>(input.size(3)),
                             static_cast<int>(input.size(1)),
                             static_cast<int>(out_shape[2]),
                             static_cast<int>(out_shape[3]),
                             static_cast<int>(codes.size(3)),
                             static_cast<int>(codes.size(4)),
                             static_cast<int>(stride[0]),
                             static_cast<int>(stride[1]),
                             static_cast<int>(padding[0]),
                             static_cast<int>(padding[1]),
                             static_cast<int>(dilation[0]),
                             static_cast<int>(dilation[1]),
                             static_cast<int>(codes.size(1))};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "mpq::multipoint_conv2d_depthwise",
                                  [&] {
    depthwise_conv_kernel<scalar_t><<<static_cast<unsigned>(grid_for(n)), kThreads, 0, stream>>>(
        x.data_ptr<scalar_t>(), c.data_ptr<int8_t>(), s.data_ptr<float>(), np.data_ptr<int>(),
        bias.has_value() ? b.data_ptr<float>() : nullptr, params, act_qparams.has_value(), shape,
        out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

namespace cuda_detail {

ActParams act_params(const char* op, const at::Tensor& act_qparams, at::Tensor& keep) {
  ActParams params{nullptr, {0.0f, 0.0f, 0.0f, 0.0f}};
  keep = act_qparams.contiguous();
  if (keep.is_cpu()) {
    // Already on the host: read and check it here, as the CPU kernel does.
    const float* v = keep.data_ptr<float>();
    std::copy(v, v + 4, params.host);
    check_act_qparams_values(op, v[0], v[1], v[2], v[3]);
  } else {  // on the input's device (check_bias_and_act)
    params.device = keep.data_ptr<float>();
  }
  return params;
}

at::Tensor fake_quantize_activation(const char* op, const at::Tensor& input,
                                    const c10::optional<at::Tensor>& act_qparams) {
  if (!act_qparams.has_value()) return input;
  at::Tensor qp;
  const ActParams params = act_params(op, *act_qparams, qp);
  // Keep the input's layout (e.g. channels_last) when it is dense; otherwise make it contiguous.
  const auto x = input.is_non_overlapping_and_dense() ? input : input.contiguous();
  auto out = at::empty_like(x);
  const int64_t n = x.numel();
  if (n == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mpq::fake_quantize_activation", [&] {
    fake_quantize_kernel<scalar_t><<<static_cast<unsigned>(grid_for(n, kThreads)), kThreads, 0, stream>>>(
        x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), n, params);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace cuda_detail

using cuda_detail::fake_quantize_activation;

at::Tensor dequantize_multipoint_cuda(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& num_points,
                                      at::ScalarType dtype) {
  check_dequantize_args(codes, scales, num_points, dtype);
  TORCH_CHECK(codes.is_cuda(), "mpq::dequantize_multipoint: expected codes on a CUDA device, got ", codes.device());
  c10::cuda::CUDAGuard guard(codes.device());
  return dequantize(codes, scales, num_points, dtype);
}

at::Tensor multipoint_linear_cuda(const at::Tensor& input, const at::Tensor& codes, const at::Tensor& scales,
                                  const at::Tensor& num_points, const c10::optional<at::Tensor>& bias,
                                  const c10::optional<at::Tensor>& act_qparams) {
  constexpr const char* op = "mpq::multipoint_linear";
  check_multipoint_linear_args(input, codes, scales, num_points, bias, act_qparams);
  check_on_cuda(op, input, codes);
  c10::cuda::CUDAGuard guard(input.device());
  const auto w = dequantize(codes, scales, num_points, input.scalar_type());
  c10::optional<at::Tensor> b;
  if (bias.has_value()) b = bias->to(input.scalar_type());
  return at::linear(fake_quantize_activation(op, input, act_qparams), w, b);
}

at::Tensor multipoint_conv2d_cuda(const at::Tensor& input, const at::Tensor& codes, const at::Tensor& scales,
                                  const at::Tensor& num_points, const c10::optional<at::Tensor>& bias,
                                  const c10::optional<at::Tensor>& act_qparams, at::IntArrayRef stride,
                                  at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  constexpr const char* op = "mpq::multipoint_conv2d";
  const auto out_shape = check_multipoint_conv2d_args(input, codes, scales, num_points, bias, act_qparams, stride,
                                                      padding, dilation, groups);
  check_on_cuda(op, input, codes);
  c10::cuda::CUDAGuard guard(input.device());
  const auto dt = input.scalar_type();
  if (groups > 1 && groups == input.size(1) && groups == codes.size(0) && (dt == at::kHalf || dt == at::kBFloat16) &&
      input.suggest_memory_format() == at::MemoryFormat::ChannelsLast) {
    return depthwise_conv2d(input, codes, scales, num_points, bias, act_qparams, stride, padding, dilation, out_shape);
  }
  const auto x = fake_quantize_activation(op, input, act_qparams);       // checks act_qparams on the host
  if (codes.size(0) == 0) return at::empty(out_shape, input.options());  // ATen refuses C_out = 0, as on the CPU
  const auto w = dequantize(codes, scales, num_points, input.scalar_type());
  c10::optional<at::Tensor> b;
  if (bias.has_value()) b = bias->to(input.scalar_type());
  return at::conv2d(x, w, b, stride, padding, dilation, groups);
}

}  // namespace mpq

TORCH_LIBRARY_IMPL(mpq, CUDA, m) {
  m.impl("dequantize_multipoint", &mpq::dequantize_multipoint_cuda);
  m.impl("multipoint_linear", &mpq::multipoint_linear_cuda);
  m.impl("multipoint_conv2d", &mpq::multipoint_conv2d_cuda);
}
