// Pooling on uint8 activation levels (the CPU int8 path between fused convolutions).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

namespace mpq {
namespace {

// PyTorch's pooling output size (ATen's pooling_output_shape): the last window must start inside
// the input or its left padding.
int64_t pooled_size(int64_t in, int64_t k, int64_t pad, int64_t stride, int64_t dilation, bool ceil_mode) {
  const int64_t span = in + 2 * pad - dilation * (k - 1) - 1;
  int64_t out = (span + (ceil_mode ? stride - 1 : 0)) / stride + 1;
  if (ceil_mode && (out - 1) * stride >= in + pad) --out;
  return out;
}

// dst[c] = max(dst[c], src[c]): the channel loop, vectorized by the compiler.
__attribute__((target_clones("arch=skylake-avx512", "avx2", "default"))) void max_into(uint8_t* __restrict dst,
                                                                                       const uint8_t* __restrict src,
                                                                                       int64_t n) {
  for (int64_t c = 0; c < n; ++c) dst[c] = std::max(dst[c], src[c]);
}

}  // namespace

// Max pooling commutes with a monotone quantizer: the max of the levels is the level of the max.
// Channels_last: per output pixel, the running max over its window's pixels, C channels at a time.
at::Tensor max_pool2d_levels_cpu(const at::Tensor& levels, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                 at::IntArrayRef padding, at::IntArrayRef dilation, bool ceil_mode) {
  const char* op = "mpq::max_pool2d_levels";
  TORCH_CHECK(levels.scalar_type() == at::kByte && levels.dim() == 4, op, ": expected levels uint8 [N, C, H, W], got ",
              levels.scalar_type(), levels.sizes());
  TORCH_CHECK(kernel_size.size() == 2 && kernel_size[0] > 0 && kernel_size[1] > 0, op,
              ": expected kernel_size of two positive values, got ", kernel_size);
  TORCH_CHECK(stride.size() == 2 && stride[0] > 0 && stride[1] > 0, op,
              ": expected stride of two positive values, got ", stride);
  TORCH_CHECK(dilation.size() == 2 && dilation[0] > 0 && dilation[1] > 0, op,
              ": expected dilation of two positive values, got ", dilation);
  TORCH_CHECK(padding.size() == 2 && padding[0] >= 0 && padding[1] >= 0 && 2 * padding[0] <= kernel_size[0] &&
                  2 * padding[1] <= kernel_size[1],
              op, ": expected padding of two values in 0 .. kernel_size / 2, got ", padding);
  const int64_t N = levels.size(0), C = levels.size(1), H = levels.size(2), W = levels.size(3);
  const int64_t OH = pooled_size(H, kernel_size[0], padding[0], stride[0], dilation[0], ceil_mode);
  const int64_t OW = pooled_size(W, kernel_size[1], padding[1], stride[1], dilation[1], ceil_mode);
  TORCH_CHECK(OH > 0 && OW > 0, op, ": the input ", levels.sizes(), " is too small for kernel_size ", kernel_size,
              " (output ", OH, " x ", OW, ")");
  const auto x = levels.contiguous(at::MemoryFormat::ChannelsLast);
  auto y = at::empty({N, C, OH, OW}, levels.options(), at::MemoryFormat::ChannelsLast);
  if (y.numel() == 0) return y;
  const uint8_t* src = x.data_ptr<uint8_t>();
  uint8_t* dst = y.data_ptr<uint8_t>();
  at::parallel_for(0, N * OH, std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(1, OW * C)),
                   [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / OH, oh = r % OH;
      for (int64_t ow = 0; ow < OW; ++ow) {
        uint8_t* out = dst + ((n * OH + oh) * OW + ow) * C;
        std::fill(out, out + C, uint8_t(0));  // every window holds at least one input pixel
        for (int64_t i = 0; i < kernel_size[0]; ++i) {
          const int64_t ih = oh * stride[0] - padding[0] + i * dilation[0];
          if (ih < 0 || ih >= H) continue;
          for (int64_t j = 0; j < kernel_size[1]; ++j) {
            const int64_t iw = ow * stride[1] - padding[1] + j * dilation[1];
            if (iw >= 0 && iw < W) max_into(out, src + ((n * H + ih) * W + iw) * C, C);
          }
        }
      }
    }
  });
  return y;
}

}  // namespace mpq

TORCH_LIBRARY_IMPL(mpq, CPU, m) { m.impl("max_pool2d_levels", &mpq::max_pool2d_levels_cpu); }
