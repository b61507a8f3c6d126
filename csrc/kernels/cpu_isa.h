// Which vector path a torch-free CPU kernel runs. The ops pass ATen's choice (at::get_cpu_capability,
// which ATEN_CPU_CAPABILITY caps), so that tests force each path as they do for ATen's kernels.
#pragma once

namespace mpq {
namespace kernels {

// kAvx2: AVX2 with FMA (only the weight-only Linear kernel has such a path; the others run their
// scalar code there).
enum class CpuIsa { kScalar, kAvx2, kAvx512 };

// Whether this CPU runs AVX-512F code.
bool cpu_has_avx512();

// Whether this CPU runs AVX2 and FMA code.
bool cpu_has_avx2();

}  // namespace kernels
}  // namespace mpq
