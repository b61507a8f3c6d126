// CPU kernel of mpq::fit_multipoint: rows are independent, so threads split the rows and each
// runs the torch-free greedy fit of csrc/kernels/greedy_fit.cpp.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "checks.h"
#include "kernels/greedy_fit.h"

namespace mpq {

std::tuple<at::Tensor, at::Tensor, at::Tensor> fit_multipoint_cpu(const at::Tensor& weight, int64_t bits,
                                                                  int64_t max_points, bool exact) {
  check_fit_multipoint_args(weight, bits, max_points);
  const auto w = weight.contiguous();
  const int64_t C = w.size(0), D = w.size(1);
  auto codes = at::empty({C, max_points, D}, w.options().dtype(at::kChar));
  auto scales = at::empty({C, max_points}, w.options().dtype(at::kFloat));
  auto sq_errors = at::empty({C, max_points}, w.options().dtype(at::kFloat));
  kernels::GreedyFitOptions options;
  options.bits = static_cast<int>(bits);
  options.max_points = static_cast<int>(max_points);
  options.exact = kernels::use_exact_solver(exact, D, static_cast<int>(bits));
  int8_t* codes_ptr = codes.data_ptr<int8_t>();
  float* scales_ptr = scales.data_ptr<float>();
  float* errors_ptr = sq_errors.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "mpq::fit_multipoint", [&] {
    const scalar_t* w_ptr = w.data_ptr<scalar_t>();
    at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
      kernels::GreedyFitWorkspace ws;
      for (int64_t j = begin; j < end; ++j) {
        kernels::fit_row(w_ptr + j * D, D, options, codes_ptr + j * max_points * D, scales_ptr + j * max_points,
                         errors_ptr + j * max_points, ws);
      }
    });
  });
  return {codes, scales, sq_errors};
}

}  // namespace mpq

TORCH_LIBRARY_IMPL(mpq, CPU, m) { m.impl("fit_multipoint", &mpq::fit_multipoint_cpu); }
