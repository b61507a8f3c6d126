#include "kernels/depthwise.h"

#include <immintrin.h>

#include <vector>

#include "kernels/cpu_isa.h"

namespace mpq {
namespace kernels {
namespace {

// The valid taps of output column ow: pointers to their input pixel and weight row.
int64_t taps_of(const DepthwiseRow& a, int64_t ow, const float** x, const float** w) {
  int64_t n = 0;
  for (int64_t i = 0; i < a.kh; ++i) {
    if (a.rows[i] == nullptr) continue;
    for (int64_t j = 0; j < a.kw; ++j) {
      const int64_t iw = ow * a.stride_w - a.pad_w + j * a.dilation_w;
      if (iw < 0 || iw >= a.W) continue;
      x[n] = a.rows[i] + iw * a.C;
      w[n] = a.weight + (i * a.kw + j) * a.C;
      ++n;
    }
  }
  return n;
}

// The channel loop innermost and contiguous (vectorized by the compiler); the sums in out.
__attribute__((target_clones("avx2", "default"))) void row_scalar(const DepthwiseRow& a, float* out, const float** x,
                                                                  const float** w) {
  const int64_t C = a.C;
  for (int64_t ow = 0; ow < a.OW; ++ow) {
    float* __restrict acc = out + ow * C;
    const int64_t n = taps_of(a, ow, x, w);
    for (int64_t c = 0; c < C; ++c) acc[c] = 0.0f;
    for (int64_t t = 0; t < n; ++t) {
      const float* __restrict xt = x[t];
      const float* __restrict wt = w[t];
      for (int64_t c = 0; c < C; ++c) acc[c] += wt[c] * xt[c];
    }
    for (int64_t c = 0; c < C; ++c) acc[c] = acc[c] * a.scale + a.bias[c];
  }
}

// 16 channels per register, up to 4 registers of sums held across the taps; the last channels
// (C % 16) under a mask.
template <int R>
__attribute__((target("avx512f"), always_inline)) inline void block_avx512(const DepthwiseRow& a, int64_t c,
                                                                           __mmask16 mask, int64_t n, const float** x,
                                                                           const float** w, float* out) {
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t t = 0; t < n; ++t) {
    for (int r = 0; r < R; ++r) {
      const __mmask16 m = r == R - 1 ? mask : __mmask16(0xFFFF);
      acc[r] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, w[t] + c + 16 * r), _mm512_maskz_loadu_ps(m, x[t] + c + 16 * r),
                               acc[r]);
    }
  }
  const __m512 scale = _mm512_set1_ps(a.scale);
  for (int r = 0; r < R; ++r) {
    const __mmask16 m = r == R - 1 ? mask : __mmask16(0xFFFF);
    const __m512 y = _mm512_fmadd_ps(acc[r], scale, _mm512_maskz_loadu_ps(m, a.bias + c + 16 * r));
    _mm512_mask_storeu_ps(out + c + 16 * r, m, y);
  }
}

__attribute__((target("avx512f"))) void row_avx512(const DepthwiseRow& a, float* out, const float** x,
                                                   const float** w) {
  const int64_t C = a.C;
  for (int64_t ow = 0; ow < a.OW; ++ow) {
    float* o = out + ow * C;
    const int64_t n = taps_of(a, ow, x, w);
    int64_t c = 0;
    for (; c + 64 <= C; c += 64) block_avx512<4>(a, c, 0xFFFF, n, x, w, o);
    const int64_t rest = C - c;
    if (rest == 0) continue;
    const int64_t regs = (rest + 15) / 16;
    const __mmask16 mask = rest % 16 == 0 ? __mmask16(0xFFFF) : __mmask16((1u << (rest % 16)) - 1);
    if (regs == 1) block_avx512<1>(a, c, mask, n, x, w, o);
    if (regs == 2) block_avx512<2>(a, c, mask, n, x, w, o);
    if (regs == 3) block_avx512<3>(a, c, mask, n, x, w, o);
    if (regs == 4) block_avx512<4>(a, c, mask, n, x, w, o);
  }
}

}  // namespace

void depthwise_row(const DepthwiseRow& a, float* out, CpuIsa isa) {
  // The taps' pointers, per thread: no allocation per row once a thread has seen this many taps.
  thread_local std::vector<const float*> x, w;
  x.resize(a.kh * a.kw);
  w.resize(a.kh * a.kw);
  if (isa == CpuIsa::kAvx512 && cpu_has_avx512()) {
    row_avx512(a, out, x.data(), w.data());
  } else {
    row_scalar(a, out, x.data(), w.data());
  }
}

}  // namespace kernels
}  // namespace mpq
