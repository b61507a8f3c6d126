// Per-tensor activation quantization on the GPU, shared by the generic layers
// (multipoint_layers.cu: fake quantization in the input's dtype) and the packed int8 kernel
// (multipoint_packed.cu: the same integer levels, stored as int8). One definition of the steps,
// so that both paths see the same levels for the same input.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace mpq {
namespace cuda_detail {

// float64 stays float64; every other dtype computes in float32 and is rounded at each step.
template <typename scalar_t>
using compute_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// Blocks for a grid-stride loop over n elements: at most 32 per multiprocessor (torch-free: the
// emulation test, tests/cpp/test_kernel_emulation.cpp, launches with it too).
inline int64_t grid_for(int64_t n, int threads, int multiprocessors) {
  return std::max<int64_t>(1, std::min<int64_t>((n + threads - 1) / threads, int64_t{multiprocessors} * 32));
}
// The same for the current device.
int64_t grid_for(int64_t n, int threads);

// (scale, zero_point, qmin, qmax), from device memory when `device` is set, else from `host`.
struct ActParams {
  const float* device;
  float host[4];
};

// act_qparams as a kernel argument: read and checked on the host when it lives on the CPU, else
// passed by device pointer (no sync). `keep` holds the tensor the pointer points into.
ActParams act_params(const char* op, const at::Tensor& act_qparams, at::Tensor& keep);

// fq(input) as a new tensor in input's dtype (input itself when act_qparams is None).
at::Tensor fake_quantize_activation(const char* op, const at::Tensor& input,
                                    const c10::optional<at::Tensor>& act_qparams);

#if defined(__CUDACC__) || defined(MPQ_SIMT_EMULATION)  // device code (or its host emulation in tests/cpp)
// IEEE division, as ATen's CPU kernel divides (not a multiplication by the reciprocal).
__device__ __forceinline__ float div_rn(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double div_rn(double a, double b) { return __ddiv_rn(a, b); }

template <typename op_t>
struct QParams {
  op_t scale, zero_point, qmin, qmax;
  bool valid;  // scale > 0 and finite, qmin < qmax (what the CPU kernel checks)
};

template <typename op_t>
__device__ __forceinline__ QParams<op_t> load_qparams(const ActParams& p) {
  const bool dev = p.device != nullptr;
  QParams<op_t> q;
  q.scale = dev ? p.device[0] : p.host[0];
  q.zero_point = dev ? p.device[1] : p.host[1];
  q.qmin = dev ? p.device[2] : p.host[2];
  q.qmax = dev ? p.device[3] : p.host[3];
  q.valid = q.scale > op_t(0) && isfinite(q.scale) && q.qmin < q.qmax;
  return q;
}

// clamp(round(x / scale) + zero_point, qmin, qmax), each step as its own ATen op on the CPU: computed
// in compute_t and rounded to scalar_t after every step, true division included. NaN passes through.
template <typename scalar_t>
__device__ __forceinline__ compute_t<scalar_t> quant_level(scalar_t x, const QParams<compute_t<scalar_t>>& q) {
  using op_t = compute_t<scalar_t>;
  const auto step = [](op_t v) { return static_cast<op_t>(static_cast<scalar_t>(v)); };
  op_t v = step(div_rn(static_cast<op_t>(x), q.scale));
  v = step(rint(v));
  v = step(v + q.zero_point);
  return step(v < q.qmin ? q.qmin : (v > q.qmax ? q.qmax : v));
}
#endif

}  // namespace cuda_detail
}  // namespace mpq
