// CUDA kernels of the packed multipoint weight (layout: csrc/kernels/packed_layout.h; semantics:
// the CPU kernel in csrc/cpu/multipoint_packed.cpp, fq(input) @ W^T + bias).
//
// Kernels of mpq::multipoint_linear_packed (`kernel` argument; "auto" picks by dtype and M):
//  * "gemv"  (auto for M <= 16, float16/bfloat16): fused weight-only. One CTA of 4 warps per tile of
//            64 channels (one point count) and K range; the warps split K; each warp reads every
//            slab of its K range once with one coalesced 128-bit load per lane and point, widens the
//            4-bit codes to fp16/bf16 in registers (OR with the exponent of 1024 / 128, one
//            subtraction), multiplies by the point's scale and runs mma.sync.m16n8k16 with the
//            activations (M <= 16 is exactly one m16 tile), fp32 accumulation; the warps' partial
//            sums meet in shared memory. The grid is split along K when the tiles alone give fewer
//            than two CTAs per multiprocessor (a float32 workspace and a finalize kernel, in a fixed
//            order: deterministic).
//  * "mma"   (auto for 16 < M < 1024): the same main loop with the 4 warps splitting M instead,
//            two m16 tiles each: a 128 x 64 CTA tile per packed tile.
//  * "int8"  (auto when act_qparams are on the host and describe <= 256 integer levels; the module
//            asks for it explicitly): W4A8. The input is quantized once to int8 levels v = q - (qmin
//            + 128) (a small kernel, writing each 16 columns in the slot order of the int8 mma
//            operands), each point runs mma.sync.m16n8k32.s8 into int32 and is added as
//            scale_p * (float) acc_p; the epilogue applies act scale * (sum + (qmin + 128 - zp) *
//            row_sum) + bias.
//  * "dense" (auto for other dtypes, GPUs before sm_80, and M >= 1024): decode the packed weight to
//            a dense [C, D] tensor of the input's dtype (same float32 sums as the generic dequantize)
//            and run at::linear (cuBLAS).
// The output of packed row r goes straight to column perm[r] (no permutation pass). The fused
// kernels use mma.sync (sm_80+, valid on sm_90); on older GPUs, or builds without sm_80+ code, auto
// takes "dense" and an explicit request is an error.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/conv2d.h>
#include <ATen/ops/diff.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <mutex>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "cuda/act_quant.cuh"
#include "cuda/packed_kernels.cuh"
#include "cuda/packed_launch.cuh"
#include "kernels/layout.h"

namespace mpq {
namespace {

using namespace mpq::packed;
using namespace mpq::packed_kernels;
using cuda_detail::ActParams;

constexpr const char* kLinearOp = "mpq::multipoint_linear_packed";
// ---- host side -------------------------------------------------------------------------------

OutType out_type(at::ScalarType t) {
  return t == at::kHalf ? OutType::kHalf : (t == at::kBFloat16 ? OutType::kBFloat16 : OutType::kFloat);
}

struct Operands {
  at::Tensor packed, scales, perm, tile_offsets, row_sums;  // contiguous, aligned
  PackedWeight w;
  int bits;
};

Operands operands(const at::Tensor& packed, const at::Tensor& packed_scales, const at::Tensor& perm,
                  const at::Tensor& tile_offsets, const at::Tensor& row_sums, int64_t out_features) {
  Operands o;
  o.packed = packed.contiguous();
  // NB: the kernels read 16-byte vectors; an offset view gets an aligned copy rather than an error.
  if (reinterpret_cast<uintptr_t>(o.packed.data_ptr()) % 16 != 0) o.packed = o.packed.clone();
  o.scales = packed_scales.contiguous();
  o.perm = perm.contiguous();
  o.tile_offsets = tile_offsets.contiguous();
  o.row_sums = row_sums.contiguous();
  o.bits = packed.size(2) == slab_bytes(4) ? 4 : 8;
  o.w = PackedWeight{o.packed.data_ptr<uint8_t>(),
                     o.scales.data_ptr<float>(),
                     o.perm.data_ptr<int>(),
                     o.tile_offsets.data_ptr<int>(),
                     o.row_sums.data_ptr<float>(),
                     o.packed.size(0),
                     o.packed.size(1),
                     static_cast<int>(o.perm.size(0) / kTileN),
                     static_cast<int>(out_features)};
  return o;
}

int device_attribute(cudaDeviceAttr attr) {
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attr, c10::cuda::current_device()));
  return value;
}

int multiprocessors() { return device_attribute(cudaDevAttrMultiProcessorCount); }

// Whether the fused kernels have sm_80+ code for the current device (mma.sync): the GPU's
// capability and the architectures this library was compiled for, read once per device.
bool fused_kernels_available() {
  static std::mutex mutex;
  static std::vector<int> known;  // per device: -1 unknown, 0 no, 1 yes
  const int device = c10::cuda::current_device();
  std::lock_guard<std::mutex> lock(mutex);
  if (static_cast<int>(known.size()) <= device) known.resize(device + 1, -1);
  if (known[device] < 0) {
    cudaFuncAttributes attr{};
    C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, finalize_kernel));
    const int major = device_attribute(cudaDevAttrComputeCapabilityMajor);
    known[device] = major >= 8 && attr.ptxVersion >= 80 && attr.binaryVersion >= 80 ? 1 : 0;
  }
  return known[device] == 1;
}

// Levels of act_qparams that the int8 kernel represents exactly (host values; csrc/kernels/layout.h).
bool int8_levels_fit(const float* v) { return layout::int8_levels_fit(v[0], v[1], v[2], v[3]); }

// The Launcher of packed_launch.cuh: the current stream, a workspace from the caching allocator
// (freed when the host function returns; stream order keeps it until the kernels are done).
class CudaLauncher {
 public:
  explicit CudaLauncher(const at::Tensor& like) : options_(like.options().dtype(at::kFloat)) {}
  int multiprocessors() const { return mpq::multiprocessors(); }
  float* workspace(int64_t n) {
    workspaces_.push_back(at::empty({n}, options_));
    return workspaces_.back().data_ptr<float>();
  }
  template <class Kernel, class... Args>
  void operator()(dim3 grid, dim3 block, size_t shared_bytes, Kernel kernel, Args... args) const {
    kernel<<<grid, block, shared_bytes, stream_>>>(args...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

 private:
  at::TensorOptions options_;
  cudaStream_t stream_ = c10::cuda::getCurrentCUDAStream();
  std::vector<at::Tensor> workspaces_;
};

at::Tensor decode_dense(const Operands& o, int64_t D, at::ScalarType dtype) {
  if (dtype != at::kDouble && dtype != at::kFloat && dtype != at::kHalf && dtype != at::kBFloat16) {
    return decode_dense(o, D, at::kFloat).to(dtype);  // float8: float32, then a cast, as the CPU does
  }
  auto out = at::empty({int64_t{o.w.out_features}, D}, o.packed.options().dtype(dtype));
  const int64_t n = int64_t{o.w.num_tiles} * kTileN * D;
  if (out.numel() == 0 || n == 0) return out;
  CudaLauncher launch(out);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "mpq::multipoint_linear_packed_decode",
                                  [&] { launch_decode_dense(launch, o.w, o.bits, D, out.data_ptr<scalar_t>()); });
  return out;
}

// The int8 levels of x [rows, D] (float16, bfloat16 or float32) as int8 [rows, kp], each 16 columns
// in the slot order of the int8 mma operands (quantize_int8_kernel).
at::Tensor quantize_int8(const at::Tensor& x, int64_t rows, int64_t D, int64_t kp, const ActParams& act) {
  auto xq = at::empty({rows, kp}, x.options().dtype(at::kChar));
  CudaLauncher launch(x);
  const auto quantize = [&](auto tag) {
    using scalar_t = decltype(tag);
    launch_quantize_int8(launch, reinterpret_cast<const scalar_t*>(x.data_ptr()), rows, D, kp, act,
                         xq.data_ptr<int8_t>());
  };
  if (x.scalar_type() == at::kHalf) {
    quantize(at::Half{});
  } else if (x.scalar_type() == at::kBFloat16) {
    quantize(at::BFloat16{});
  } else {
    quantize(float{});
  }
  return xq;
}

// The bias as the fused kernels read it: float32, rounded to the input's dtype by their epilogue
// (round_to), as the generic path adds it. A float32 bias (the modules') is used as it is: no cast
// kernels per forward; other dtypes are rounded to the input's dtype here first (one rounding).
at::Tensor bias_float32(const c10::optional<at::Tensor>& bias, at::ScalarType dtype) {
  if (!bias.has_value()) return at::Tensor();
  if (bias->scalar_type() == at::kFloat) return bias->contiguous();
  return bias->to(dtype).to(at::kFloat).contiguous();
}

void check_fused_available(const char* op, c10::string_view name) {
  TORCH_CHECK(fused_kernels_available(), op, ": kernel '", std::string(name),
              "' needs mma.sync (a GPU of compute capability 8.0 or newer and a build with sm_80+ code), got "
              "a GPU of capability ",
              device_attribute(cudaDevAttrComputeCapabilityMajor), ".",
              device_attribute(cudaDevAttrComputeCapabilityMinor));
}

PackedKernel resolve_kernel(PackedKernel asked, c10::string_view name, const at::Tensor& input, int64_t M, int64_t kp,
                            const c10::optional<at::Tensor>& act_qparams) {
  const bool fused = fused_kernels_available();
  if (asked != PackedKernel::kAuto) {
    if (asked != PackedKernel::kDense) check_fused_available(kLinearOp, name);
    if (asked == PackedKernel::kInt8) {
      TORCH_CHECK(layout::packed_int8_k_fits(kp), kLinearOp, ": kernel 'int8' supports in_features up to ", kInt8MaxK,
                  " (int32 accumulators), got Kp = ", kp);
      if (act_qparams->is_cpu()) {
        const auto v = act_qparams->contiguous();
        TORCH_CHECK(int8_levels_fit(v.data_ptr<float>()), kLinearOp,
                    ": kernel 'int8' expects act_qparams with integer zero_point, qmin, qmax and at most 256 levels "
                    "(qmax - qmin <= 255), got ",
                    v.data_ptr<float>()[1], ", ", v.data_ptr<float>()[2], ", ", v.data_ptr<float>()[3]);
      }
    }
    return asked;
  }
  const auto dt = input.scalar_type();
  if (!fused || (dt != at::kHalf && dt != at::kBFloat16)) return PackedKernel::kDense;
  // act_qparams on the host can be checked without a sync; on the device the caller says "int8".
  if (act_qparams.has_value() && act_qparams->is_cpu() && layout::packed_int8_k_fits(kp) &&
      int8_levels_fit(act_qparams->contiguous().data_ptr<float>())) {
    return PackedKernel::kInt8;
  }
  if (M <= kGemvMaxM) return PackedKernel::kGemv;
  return M < kDenseMinM ? PackedKernel::kMma : PackedKernel::kDense;
}

}  // namespace

at::Tensor multipoint_linear_packed_cuda(const at::Tensor& input, const at::Tensor& packed,
                                         const at::Tensor& packed_scales, const at::Tensor& perm,
                                         const at::Tensor& tile_offsets, const at::Tensor& row_sums,
                                         int64_t out_features, const c10::optional<at::Tensor>& bias,
                                         const c10::optional<at::Tensor>& act_qparams, c10::string_view kernel) {
  const PackedKernel asked = check_multipoint_linear_packed_args(input, packed, packed_scales, perm, tile_offsets,
                                                                 row_sums, out_features, bias, act_qparams, kernel);
  TORCH_CHECK(packed.is_cuda(), kLinearOp, ": expected the packed weight on a CUDA device, got ", packed.device());
  c10::cuda::CUDAGuard guard(input.device());
  const int64_t D = input.size(-1);
  const int64_t kp = packed.size(1) * kSlabK;
  std::vector<int64_t> out_shape(input.sizes().begin(), input.sizes().end() - 1);
  int64_t M = 1;
  for (const int64_t s : out_shape) M *= s;
  out_shape.push_back(out_features);
  const auto dtype = input.scalar_type();
  const PackedKernel k = resolve_kernel(asked, kernel, input, M, kp, act_qparams);
  const Operands o = operands(packed, packed_scales, perm, tile_offsets, row_sums, out_features);

  if (k == PackedKernel::kDense) {
    const auto w = decode_dense(o, D, dtype);
    c10::optional<at::Tensor> b;
    if (bias.has_value()) b = bias->to(dtype);
    return at::linear(cuda_detail::fake_quantize_activation(kLinearOp, input, act_qparams), w, b);
  }

  auto out = at::empty({M, out_features}, input.options());
  if (M == 0 || out_features == 0) return out.reshape(out_shape);
  const at::Tensor bias_f = bias_float32(bias, dtype);
  const float* bias_ptr = bias.has_value() ? bias_f.data_ptr<float>() : nullptr;
  CudaLauncher launch(out);
  const OutType type = out_type(dtype);

  if (k == PackedKernel::kInt8) {
    at::Tensor qp;
    const ActParams act = cuda_detail::act_params(kLinearOp, *act_qparams, qp);
    const auto x = input.reshape({M, D}).contiguous();
    const auto xq = quantize_int8(x, M, D, kp, act);
    const bool small_m = M <= kGemvMaxM;
    const int8_t* levels = xq.data_ptr<int8_t>();
    if (o.bits == 4) {
      launch_config<Int8Act<4>>(launch, small_m, {levels, kp}, o.w, M, D, act, true, bias_ptr, out.data_ptr(), type);
    } else {
      launch_config<Int8Act<8>>(launch, small_m, {levels, kp}, o.w, M, D, act, true, bias_ptr, out.data_ptr(), type);
    }
    return out.reshape(out_shape);
  }

  // Weight-only: fake-quantized activations (when act_qparams is given) in the input's dtype.
  const auto x = cuda_detail::fake_quantize_activation(kLinearOp, input, act_qparams).reshape({M, D}).contiguous();
  const bool vec = D % 2 == 0 && reinterpret_cast<uintptr_t>(x.data_ptr()) % 4 == 0;
  const bool small_m = k == PackedKernel::kGemv;
  const ActParams none{nullptr, {0.0f, 0.0f, 0.0f, 0.0f}};
  const auto run = [&](auto tag) {
    using T = decltype(tag);
    const T* xp = reinterpret_cast<const T*>(x.data_ptr());
    if (o.bits == 4) {
      launch_config<WeightOnly<T, 4>>(launch, small_m, {xp, vec}, o.w, M, D, none, false, bias_ptr, out.data_ptr(),
                                      type);
    } else {
      launch_config<WeightOnly<T, 8>>(launch, small_m, {xp, vec}, o.w, M, D, none, false, bias_ptr, out.data_ptr(),
                                      type);
    }
  };
  if (dtype == at::kHalf) {
    run(__half{});
  } else {
    run(__nv_bfloat16{});
  }
  return out.reshape(out_shape);
}

// ---- the packed conv2d ---------------------------------------------------------------------------

namespace {

constexpr const char* kConvOp = "mpq::multipoint_conv2d_packed";

// The int8 kernel also needs the level of 0 in int8 (qmin <= zp <= qmin + 255) and whole slabs of
// one pixel (16 | Cg): layout::packed_int8_fits, the rule the modules ask (mpq::packed_int8_fits).
bool conv_int8_fits(const at::Tensor& act_qparams, int64_t cg, int64_t kp) {
  if (!act_qparams.is_cpu()) return false;
  const auto v = act_qparams.contiguous();
  const float* p = v.data_ptr<float>();
  const double q[4] = {p[0], p[1], p[2], p[3]};
  return layout::packed_int8_fits(q, kp, /*conv=*/true, cg);
}

PackedKernel resolve_conv_kernel(PackedKernel asked, c10::string_view name, const at::Tensor& input, int64_t cg,
                                 int64_t kp, const c10::optional<at::Tensor>& act_qparams) {
  if (asked == PackedKernel::kDense) return asked;
  if (asked != PackedKernel::kAuto) {
    check_fused_available(kConvOp, name);
    if (asked == PackedKernel::kInt8) {
      TORCH_CHECK(layout::packed_int8_conv_channels_fit(cg), kConvOp,
                  ": kernel 'int8' expects input channels per group (C_in / groups) divisible by ", kSlabK, ", got ",
                  cg);
      TORCH_CHECK(layout::packed_int8_k_fits(kp), kConvOp, ": kernel 'int8' supports kh * kw * C_in / groups up to ",
                  kInt8MaxK, " (int32 accumulators), got Kp = ", kp);
      if (act_qparams->is_cpu()) {
        const auto v = act_qparams->contiguous();
        const float* p = v.data_ptr<float>();
        TORCH_CHECK(conv_int8_fits(v, cg, kp), kConvOp,
                    ": kernel 'int8' expects act_qparams with integer zero_point, qmin, qmax, at most 256 levels "
                    "(qmax - qmin <= 255) and qmin <= zero_point <= qmin + 255, got ",
                    p[1], ", ", p[2], ", ", p[3]);
      }
    }
    return asked;
  }
  const auto dt = input.scalar_type();
  if (!fused_kernels_available() || (dt != at::kHalf && dt != at::kBFloat16)) return PackedKernel::kDense;
  if (act_qparams.has_value() && conv_int8_fits(*act_qparams, cg, kp)) return PackedKernel::kInt8;
  return PackedKernel::kIgemm;
}

}  // namespace

at::Tensor multipoint_conv2d_packed_cuda(
    const at::Tensor& input, const at::Tensor& packed, const at::Tensor& packed_scales, const at::Tensor& perm,
    const at::Tensor& tile_offsets, const at::Tensor& row_sums, int64_t out_channels, at::IntArrayRef kernel_size,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& act_qparams, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, c10::string_view kernel) {
  const auto checked = check_multipoint_conv2d_packed_args(input, packed, packed_scales, perm, tile_offsets, row_sums,
                                                           out_channels, kernel_size, bias, act_qparams, stride,
                                                           padding, dilation, groups, kernel);
  TORCH_CHECK(packed.is_cuda(), kConvOp, ": expected the packed weight on a CUDA device, got ", packed.device());
  c10::cuda::CUDAGuard guard(input.device());
  const auto& out_shape = checked.out_shape;
  const int64_t N = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3);
  const int64_t cg = C / groups, D = checked.in_features, kp = packed.size(1) * kSlabK;
  const int64_t OH = out_shape[2], OW = out_shape[3], M = N * OH * OW;
  constexpr int64_t kIntMax = std::numeric_limits<int32_t>::max();
  TORCH_CHECK(D <= kIntMax && H * W <= kIntMax && C <= kIntMax && out_channels <= kIntMax, kConvOp,
              ": expected kh * kw * C_in / groups, H * W and the channel counts below 2^31, got input shape ",
              input.sizes());
  const auto dtype = input.scalar_type();
  const auto format = input.suggest_memory_format();
  const PackedKernel k = resolve_conv_kernel(checked.kernel, kernel, input, cg, kp, act_qparams);
  const Operands o = operands(packed, packed_scales, perm, tile_offsets, row_sums, out_channels);

  if (k == PackedKernel::kDense) {
    const auto x = cuda_detail::fake_quantize_activation(kConvOp, input, act_qparams);
    if (out_channels == 0) return at::empty(out_shape, input.options().memory_format(format));
    // Columns (kh, kw, c) back to the [C_out, C_in / groups, kh, kw] of a convolution weight.
    const auto w =
        decode_dense(o, D, dtype).view({out_channels, kernel_size[0], kernel_size[1], cg}).permute({0, 3, 1, 2});
    c10::optional<at::Tensor> b;
    if (bias.has_value()) b = bias->to(dtype);
    return at::conv2d(x, w, b, stride, padding, dilation, groups);
  }

  auto out = at::empty(out_shape, input.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (M == 0 || out_channels == 0) return out.contiguous(format);
  const at::Tensor bias_f = bias_float32(bias, dtype);
  const float* bias_ptr = bias.has_value() ? bias_f.data_ptr<float>() : nullptr;
  CudaLauncher launch(out);
  const OutType type = out_type(dtype);
  const ConvShape shape{M,
                        D,
                        static_cast<int>(H),
                        static_cast<int>(W),
                        static_cast<int>(C),
                        static_cast<int>(OH),
                        static_cast<int>(OW),
                        static_cast<int>(kernel_size[1]),
                        static_cast<int>(cg),
                        static_cast<int>(stride[0]),
                        static_cast<int>(stride[1]),
                        static_cast<int>(padding[0]),
                        static_cast<int>(padding[1]),
                        static_cast<int>(dilation[0]),
                        static_cast<int>(dilation[1]),
                        static_cast<int>(out_channels / groups)};
  const bool small_m = M <= kGemvMaxM;

  if (k == PackedKernel::kInt8) {
    at::Tensor qp;
    const ActParams act = cuda_detail::act_params(kConvOp, *act_qparams, qp);
    // NHWC levels: the rows of quantize_int8 are the pixels, its columns the channels.
    const auto x = input.contiguous(at::MemoryFormat::ChannelsLast);
    const auto xq = quantize_int8(x, N * H * W, C, C, act);
    const int8_t* levels = xq.data_ptr<int8_t>();
    if (o.bits == 4) {
      launch_config<ConvInt8<4>>(launch, small_m, {levels, shape, act, 0, 0u}, o.w, M, D, act, true, bias_ptr,
                                 out.data_ptr(), type);
    } else {
      launch_config<ConvInt8<8>>(launch, small_m, {levels, shape, act, 0, 0u}, o.w, M, D, act, true, bias_ptr,
                                 out.data_ptr(), type);
    }
    return out.contiguous(format);
  }

  // Weight-only ("igemm"): fake-quantized activations (when act_qparams is given) in NHWC.
  const auto x =
      cuda_detail::fake_quantize_activation(kConvOp, input, act_qparams).contiguous(at::MemoryFormat::ChannelsLast);
  const bool vec = cg % 2 == 0 && C % 2 == 0 && reinterpret_cast<uintptr_t>(x.data_ptr()) % 4 == 0;
  const ActParams none{nullptr, {0.0f, 0.0f, 0.0f, 0.0f}};
  const auto run = [&](auto tag) {
    using T = decltype(tag);
    const T* xp = reinterpret_cast<const T*>(x.data_ptr());
    if (o.bits == 4) {
      launch_config<ConvWeightOnly<T, 4>>(launch, small_m, {xp, shape, 0, vec}, o.w, M, D, none, false, bias_ptr,
                                          out.data_ptr(), type);
    } else {
      launch_config<ConvWeightOnly<T, 8>>(launch, small_m, {xp, shape, 0, vec}, o.w, M, D, none, false, bias_ptr,
                                          out.data_ptr(), type);
    }
  };
  if (dtype == at::kHalf) {
    run(__half{});
  } else {
    run(__nv_bfloat16{});
  }
  return out.contiguous(format);
}

// Packing and unpacking run once per weight: their CPU kernels on host copies of the arguments,
// the results moved back to the arguments' device (one boxed kernel for both ops).
void on_host(const c10::OperatorHandle& op, c10::DispatchKeySet, torch::jit::Stack* stack) {
  const size_t args = op.schema().arguments().size();
  c10::optional<at::Device> device;
  for (size_t i = stack->size() - args; i < stack->size(); ++i) {
    auto& v = (*stack)[i];
    if (!v.isTensor()) continue;
    const at::Tensor t = v.toTensor();
    if (!device) device = t.device();
    TORCH_CHECK(t.device() == *device, op.schema().name(), ": expected every tensor argument on ", *device, ", got ",
                op.schema().arguments()[i - (stack->size() - args)].name(), " on ", t.device());
    v = t.cpu();
  }
  op.redispatchBoxed(c10::DispatchKeySet(c10::DispatchKey::CPU), stack);
  const size_t returns = op.schema().returns().size();
  for (size_t i = stack->size() - returns; i < stack->size(); ++i) (*stack)[i] = (*stack)[i].toTensor().to(*device);
}

}  // namespace mpq

TORCH_LIBRARY_IMPL(mpq, CUDA, m) {
  m.impl("pack_multipoint", torch::CppFunction::makeFromBoxedFunction<&mpq::on_host>());
  m.impl("unpack_multipoint", torch::CppFunction::makeFromBoxedFunction<&mpq::on_host>());
  m.impl("multipoint_linear_packed", &mpq::multipoint_linear_packed_cuda);
  m.impl("multipoint_conv2d_packed", &mpq::multipoint_conv2d_packed_cuda);
}
