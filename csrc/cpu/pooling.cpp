// Pooling on uint8 activation levels (the CPU int8 path between fused convolutions).
#include <ATen/ATen.h>
#include <torch/library.h>

namespace mpq {

// Max pooling commutes with a monotone quantizer: the max of the levels is the level of the max. The
// levels are pooled as a quint8 tensor of scale 1 (no copy in, PyTorch's vectorized quantized max
// pool on channels_last), then returned as plain uint8.
at::Tensor max_pool2d_levels_cpu(const at::Tensor& levels, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                 at::IntArrayRef padding, at::IntArrayRef dilation, bool ceil_mode) {
  const char* op = "mpq::max_pool2d_levels";
  TORCH_CHECK(levels.scalar_type() == at::kByte && levels.dim() == 4, op,
              ": expected levels uint8 [N, C, H, W], got ", levels.scalar_type(), levels.sizes());
  TORCH_CHECK(kernel_size.size() == 2 && kernel_size[0] > 0 && kernel_size[1] > 0, op,
              ": expected kernel_size of two positive values, got ", kernel_size);
  TORCH_CHECK(stride.size() == 2 && stride[0] > 0 && stride[1] > 0, op, ": expected stride of two positive values, got ",
              stride);
  TORCH_CHECK(dilation.size() == 2 && dilation[0] > 0 && dilation[1] > 0, op,
              ": expected dilation of two positive values, got ", dilation);
  TORCH_CHECK(padding.size() == 2 && padding[0] >= 0 && padding[1] >= 0 && 2 * padding[0] <= kernel_size[0] &&
                  2 * padding[1] <= kernel_size[1],
              op, ": expected padding of two values in 0 .. kernel_size / 2, got ", padding);
  const auto q = at::_make_per_tensor_quantized_tensor(levels.contiguous(at::MemoryFormat::ChannelsLast), 1.0, 0);
  return at::max_pool2d(q, kernel_size, stride, padding, dilation, ceil_mode)
      .int_repr()
      .contiguous(at::MemoryFormat::ChannelsLast);
}

}  // namespace mpq

TORCH_LIBRARY_IMPL(mpq, CPU, m) { m.impl("max_pool2d_levels", &mpq::max_pool2d_levels_cpu); }
