#include "kernels/activation_levels.h"

#include <immintrin.h>

namespace mpq {
namespace kernels {
namespace {

// Clamping v / s to [qmin - zp - 1, qmax - zp + 1] before rounding changes no level and keeps
// |v| < 2^22, where adding and subtracting 1.5 * 2^23 rounds half to even. NB: compiled with
// -ffp-contract=off and without -ffast-math: no fused or reassociated arithmetic on any path.
constexpr float kMagic = 12582912.0f;

inline float clamp_to(float v, float lo, float hi) {
  v = v < lo ? lo : v;
  return hi < v ? hi : v;
}

__attribute__((target_clones("avx2", "default"))) void levels_scalar(const float* __restrict y,
                                                                     const float* __restrict r, uint8_t* __restrict u,
                                                                     int64_t n, float lo, float hi, LevelGrid g) {
  const float vlo = g.qmin - g.zero_point - 1.0f, vhi = g.qmax - g.zero_point + 1.0f;
  for (int64_t i = 0; i < n; ++i) {
    float v = clamp_to(r != nullptr ? y[i] + r[i] : y[i], lo, hi);
    v = clamp_to(v / g.scale, vlo, vhi);
    const float q = clamp_to(((v + kMagic) - kMagic) + g.zero_point, g.qmin, g.qmax);
    u[i] = static_cast<uint8_t>(static_cast<int>(q - g.qmin));
  }
}

// The same operations on 16 lanes: _mm512_max_ps(a, v) is (a > v ? a : v) and returns v when
// either is NaN, _mm512_min_ps(b, v) is (b < v ? b : v), so each clamp_to above maps to one of
// each; the truncating conversion and the narrowing to bytes match the scalar casts (NaN: 0).
__attribute__((target("avx512f"))) void levels_avx512(const float* __restrict y, const float* __restrict r,
                                                      uint8_t* __restrict u, int64_t n, float lo, float hi,
                                                      LevelGrid g) {
  const __m512 vlo = _mm512_set1_ps(lo), vhi = _mm512_set1_ps(hi), scale = _mm512_set1_ps(g.scale);
  const __m512 qlo = _mm512_set1_ps(g.qmin - g.zero_point - 1.0f), qhi = _mm512_set1_ps(g.qmax - g.zero_point + 1.0f);
  const __m512 magic = _mm512_set1_ps(kMagic), zp = _mm512_set1_ps(g.zero_point);
  const __m512 qmin = _mm512_set1_ps(g.qmin), qmax = _mm512_set1_ps(g.qmax);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __m512 v = _mm512_loadu_ps(y + i);
    if (r != nullptr) v = _mm512_add_ps(v, _mm512_loadu_ps(r + i));
    v = _mm512_min_ps(vhi, _mm512_max_ps(vlo, v));
    v = _mm512_min_ps(qhi, _mm512_max_ps(qlo, _mm512_div_ps(v, scale)));
    __m512 q = _mm512_add_ps(_mm512_sub_ps(_mm512_add_ps(v, magic), magic), zp);
    q = _mm512_min_ps(qmax, _mm512_max_ps(qmin, q));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(u + i),
                     _mm512_cvtepi32_epi8(_mm512_cvttps_epi32(_mm512_sub_ps(q, qmin))));
  }
  if (i < n) levels_scalar(y + i, r != nullptr ? r + i : nullptr, u + i, n - i, lo, hi, g);
}

}  // namespace

void epilogue_levels(const float* y, const float* r, uint8_t* u, int64_t n, float lo, float hi, const LevelGrid& g,
                     CpuIsa isa) {
  if (isa == CpuIsa::kAvx512 && cpu_has_avx512()) {
    levels_avx512(y, r, u, n, lo, hi, g);
  } else {
    levels_scalar(y, r, u, n, lo, hi, g);
  }
}

}  // namespace kernels
}  // namespace mpq
