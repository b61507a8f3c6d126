// Every mpq operator schema, in one place. Kernels register per backend in
// csrc/cpu/*.cpp and csrc/cuda/*.cu; fake kernels for tracing live in python/mpq/ops.py.
#include <torch/library.h>

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
      << "\", \"cuda_kernels\": " << (MPQ_WITH_CUDA ? "true" : "false")
      << ", \"cuda_architectures\": \"" << (MPQ_WITH_CUDA ? MPQ_CUDA_ARCHITECTURES : "") << "\"}";
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

  // Build facts (mpq version, torch version, CUDA kernels and architectures) as a JSON string.
  m.def("_build_info() -> str", &mpq::build_info);
}
