// Activation levels of the CPU int8 path: a float32 value to its uint8 level, on raw pointers (no
// torch), so that Catch2 tests the vector code against the scalar definition directly.
//
//   L(v) = clamp(round_half_even(v / scale) + zero_point, qmin, qmax), stored as L - qmin (0..255)
//
// exactly the level of the reference ops' fake quantization (csrc/cpu/multipoint_layers.cpp divides
// too, in float32 here), for every float32 input including +-inf and NaN (level 0 - the cast of
// NaN on x86 - on every path).
#pragma once

#include <cstdint>

#include "kernels/cpu_isa.h"

namespace mpq {
namespace kernels {

struct LevelGrid {
  float scale, zero_point, qmin, qmax;  // integral zero point and range, qmax - qmin <= 255
};

// u[i] = L(clamp(y[i] + r[i], lo, hi)) - qmin, i < n; r may be null (no residual); lo = -inf,
// hi = inf: no clamp (quantizing an input). The clamp is (v < lo ? lo : v), then (hi < v ? hi : v),
// NaN passing through as in at::clamp. Every path gives the same bytes.
void epilogue_levels(const float* y, const float* r, uint8_t* u, int64_t n, float lo, float hi, const LevelGrid& g,
                     CpuIsa isa);

}  // namespace kernels
}  // namespace mpq
