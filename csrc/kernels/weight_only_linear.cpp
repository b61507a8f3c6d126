#include "kernels/weight_only_linear.h"

#include <immintrin.h>

#include <algorithm>
#include <array>
#include <utility>

namespace mpq {
namespace kernels {
namespace {

constexpr int64_t kBlockCodes = 128;  // 4-bit layout: codes per 64-byte block
constexpr int kMaxRows = 16;          // x rows per register block (AVX-512)

// Code i of a stored row (two's complement at w_bits bits, LSB first), as an int.
int stored_code(const uint8_t* row, int64_t i, int64_t w_bits) {
  const int64_t bit = i * w_bits, byte = bit / 8, shift = bit % 8;
  uint32_t two = row[byte];
  if (shift + w_bits > 8) two |= uint32_t(row[byte + 1]) << 8;
  const int u = int((two >> shift) & ((1u << w_bits) - 1));
  return u >= (1 << (w_bits - 1)) ? u - (1 << w_bits) : u;
}

// Code d of prepared row `row` (either layout).
int prepared_code(const WeightOnlyWeight& w, const uint8_t* row, int64_t d) {
  if (!w.nibbles) return int(int8_t(row[d]));
  const int64_t block = d / kBlockCodes, i = d % kBlockCodes, k = i / 16, l = i % 16;
  const uint8_t byte = row[block * 64 + l * 4 + k / 2];  // word l, little-endian: nibble k in byte k / 2
  const int u = (k % 2 == 0) ? (byte & 0xF) : (byte >> 4);
  return u >= 8 ? u - 16 : u;
}

void linear_scalar(const WeightOnlyWeight& w, const float* x, int64_t rows, const float* bias, float* y,
                   int64_t c_begin, int64_t c_end) {
  const int64_t D = w.in_features;
  std::vector<float> code(D), acc(rows);
  for (int64_t j = c_begin; j < c_end; ++j) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int64_t t = w.first[j]; t < w.first[j + 1]; ++t) {
      const uint8_t* row = w.codes.data() + t * w.row_bytes;
      for (int64_t d = 0; d < D; ++d) code[d] = float(prepared_code(w, row, d));  // decoded once for all rows
      for (int64_t m = 0; m < rows; ++m) {
        const float* xm = x + m * D;
        float s = 0.0f;
        for (int64_t d = 0; d < D; ++d) s += code[d] * xm[d];
        acc[m] += w.scales[t] * s;
      }
    }
    const float b = bias ? bias[j] : 0.0f;
    for (int64_t m = 0; m < rows; ++m) y[m * w.channels + j] = b + acc[m];
  }
}

// x[r * D + d0 .. + 15] for r < R (lanes at or beyond `mask` read as zero) times `c`, into acc[r].
template <int R>
__attribute__((target("avx512f,avx512bw"), always_inline)) inline void fma_rows(__m512* acc, const float* x, int64_t D,
                                                                                int64_t d0, __m512 c, __mmask16 mask) {
  for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, x + r * D + d0), c, acc[r]);
}

template <int R>
__attribute__((target("avx512f,avx512bw"), always_inline)) inline void fma_rows_full(__m512* acc, const float* x,
                                                                                     int64_t D, int64_t d0, __m512 c) {
  for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(_mm512_loadu_ps(x + r * D + d0), c, acc[r]);
}

// Channel j for x rows 0..R-1 (x, y already offset to the block's first row).
template <int R>
__attribute__((target("avx512f,avx512bw"), always_inline)) inline void channel_avx512(const WeightOnlyWeight& w,
                                                                                      int64_t j, const float* x,
                                                                                      float bias, float* y) {
  const int64_t D = w.in_features;
  // Nibble -> two's complement value; vpermps reads the low 4 bits of each index lane.
  const __m512 table = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1);
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t t = w.first[j]; t < w.first[j + 1]; ++t) {
    const uint8_t* row = w.codes.data() + t * w.row_bytes;
    const __m512 scale = _mm512_set1_ps(w.scales[t]);
    if (w.nibbles) {
      const __m512 scaled = _mm512_mul_ps(table, scale);  // scale_t * code, rounded once per point
      const int64_t full = D / kBlockCodes;
      // Nibble k of every word into its low 4 bits: v for k = 0, v >> 4 for k = 1, and byte k / 2
      // of v or v >> 4 moved to byte 0 for k >= 2. The byte moves (vpshufb) run on the shuffle port
      // beside the table lookups, the shifts on the FMA port: with one row (FMA-light) nibbles 2 and
      // 3 are shifted, to balance the two; with more rows every move is a vpshufb.
      // vpshufb controls: byte 0 of word l <- byte 4 (l % 4) + j of its 128-bit lane, bytes 1..3 <- 0.
      const __m512i word = _mm512_set_epi32(12, 8, 4, 0, 12, 8, 4, 0, 12, 8, 4, 0, 12, 8, 4, 0);
      const __m512i at1 = _mm512_add_epi32(word, _mm512_set1_epi32(int(0x80808001u))),
                    at2 = _mm512_add_epi32(word, _mm512_set1_epi32(int(0x80808002u))),
                    at3 = _mm512_add_epi32(word, _mm512_set1_epi32(int(0x80808003u)));
      for (int64_t b = 0; b < full; ++b) {
        const __m512i v = _mm512_loadu_si512(row + b * 64), v4 = _mm512_srli_epi32(v, 4);
        const int64_t d0 = b * kBlockCodes;
        fma_rows_full<R>(acc, x, D, d0 + 0, _mm512_permutexvar_ps(v, scaled));
        fma_rows_full<R>(acc, x, D, d0 + 16, _mm512_permutexvar_ps(v4, scaled));
        const __m512i n2 = R == 1 ? _mm512_srli_epi32(v, 8) : _mm512_shuffle_epi8(v, at1);
        const __m512i n3 = R == 1 ? _mm512_srli_epi32(v, 12) : _mm512_shuffle_epi8(v4, at1);
        fma_rows_full<R>(acc, x, D, d0 + 32, _mm512_permutexvar_ps(n2, scaled));
        fma_rows_full<R>(acc, x, D, d0 + 48, _mm512_permutexvar_ps(n3, scaled));
        fma_rows_full<R>(acc, x, D, d0 + 64, _mm512_permutexvar_ps(_mm512_shuffle_epi8(v, at2), scaled));
        fma_rows_full<R>(acc, x, D, d0 + 80, _mm512_permutexvar_ps(_mm512_shuffle_epi8(v4, at2), scaled));
        fma_rows_full<R>(acc, x, D, d0 + 96, _mm512_permutexvar_ps(_mm512_shuffle_epi8(v, at3), scaled));
        fma_rows_full<R>(acc, x, D, d0 + 112, _mm512_permutexvar_ps(_mm512_shuffle_epi8(v4, at3), scaled));
      }
      if (full * kBlockCodes < D) {  // the last block: x read under a mask, sub-vectors past D skipped
        const __m512i v = _mm512_loadu_si512(row + full * 64);
        for (int64_t k = 0, d0 = full * kBlockCodes; d0 < D; ++k, d0 += 16) {
          const int64_t n = std::min<int64_t>(16, D - d0);
          const __mmask16 mask = n == 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1);
          const __m512i shifted = _mm512_srlv_epi32(v, _mm512_set1_epi32(int(4 * k)));
          fma_rows<R>(acc, x, D, d0, _mm512_permutexvar_ps(shifted, scaled), mask);
        }
      }
    } else {
      const int8_t* codes = reinterpret_cast<const int8_t*>(row);
      int64_t d0 = 0;
      for (; d0 + 16 <= D; d0 += 16) {
        const __m128i c8 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + d0));
        fma_rows_full<R>(acc, x, D, d0, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(c8)), scale));
      }
      if (d0 < D) {  // rows are padded to 16 codes: the codes load is whole, x is masked
        const __m128i c8 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + d0));
        const __mmask16 mask = __mmask16((1u << (D - d0)) - 1);
        fma_rows<R>(acc, x, D, d0, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(c8)), scale), mask);
      }
    }
  }
  for (int r = 0; r < R; ++r) y[r * w.channels + j] = bias + _mm512_reduce_add_ps(acc[r]);
}

template <int R>
__attribute__((target("avx512f,avx512bw"))) void channels_avx512(const WeightOnlyWeight& w, const float* x,
                                                                 const float* bias, float* y, int64_t c_begin,
                                                                 int64_t c_end) {
  for (int64_t j = c_begin; j < c_end; ++j) channel_avx512<R>(w, j, x, bias ? bias[j] : 0.0f, y);
}

using ChannelsFn = void (*)(const WeightOnlyWeight&, const float*, const float*, float*, int64_t, int64_t);

template <int... R>
constexpr std::array<ChannelsFn, sizeof...(R)> channel_table(std::integer_sequence<int, R...>) {
  return {&channels_avx512<R + 1>...};
}

// AVX2 + FMA: each channel's weight is formed 8 codes at a time in a register, as the sum over its
// points of scale_t * code (one fused multiply-add per point), and used by every row of the block.
constexpr int kMaxRowsAvx2 = 8;  // x rows per register block: 8 accumulators, the weight and temps

// The weight at one 8-code chunk of channel rows `rows` (P points of row_bytes each, chunk at byte
// `offset` of every row): nibble K of each 32-bit word (4-bit layout), sign-extended by two shifts.
template <int K>
__attribute__((target("avx2,fma"), always_inline)) inline __m256 nibble_weight(const uint8_t* rows, int64_t row_bytes,
                                                                               const float* scales, int64_t P,
                                                                               int64_t offset) {
  __m256 wv = _mm256_setzero_ps();
  for (int64_t t = 0; t < P; ++t) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows + t * row_bytes + offset));
    const __m256 c = _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(v, 28 - 4 * K), 28));
    wv = _mm256_fmadd_ps(c, _mm256_set1_ps(scales[t]), wv);
  }
  return wv;
}

// The same for any chunk c (the last, partial block of the 4-bit layout, and int8 rows).
__attribute__((target("avx2,fma"), always_inline)) inline __m256 chunk_weight(const WeightOnlyWeight& w,
                                                                              const uint8_t* rows, const float* scales,
                                                                              int64_t P, int64_t c) {
  __m256 wv = _mm256_setzero_ps();
  const int64_t k = (c % 16) / 2;
  const __m128i left = _mm_cvtsi32_si128(int(28 - 4 * k)), right = _mm_cvtsi32_si128(28);
  for (int64_t t = 0; t < P; ++t) {
    const uint8_t* row = rows + t * w.row_bytes;
    __m256i code;
    if (w.nibbles) {  // word l of half (c % 2) of block c / 16 holds code 16 k + 8 (c % 2) + l in nibble k
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + (c / 16) * 64 + (c % 2) * 32));
      code = _mm256_sra_epi32(_mm256_sll_epi32(v, left), right);
    } else {  // rows are zero-padded to 16 codes: the 8-byte load stays inside the row
      code = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + c * 8)));
    }
    wv = _mm256_fmadd_ps(_mm256_cvtepi32_ps(code), _mm256_set1_ps(scales[t]), wv);
  }
  return wv;
}

template <int R>
__attribute__((target("avx2,fma"), always_inline)) inline void fma_rows_avx2(__m256* acc, const float* x, int64_t D,
                                                                             int64_t d0, __m256 wv) {
  for (int r = 0; r < R; ++r) acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(x + r * D + d0), wv, acc[r]);
}

template <int R>
__attribute__((target("avx2,fma"), always_inline)) inline void fma_rows_avx2(__m256* acc, const float* x, int64_t D,
                                                                             int64_t d0, __m256 wv, __m256i mask) {
  for (int r = 0; r < R; ++r) acc[r] = _mm256_fmadd_ps(_mm256_maskload_ps(x + r * D + d0, mask), wv, acc[r]);
}

// Accumulator sets per row: chunk c (8 codes) adds into set c % kSets<R>, so that few rows still
// keep several fused multiply-adds in flight (one row's single chain would wait on each one).
template <int R>
constexpr int kSets = R <= 2 ? 4 : (R <= 4 ? 2 : 1);

// Nibble K of a whole block: chunks 2K (codes d0 + 16 K ..) and 2K + 1 (+ 8).
template <int R, int K>
__attribute__((target("avx2,fma"), always_inline)) inline void nibble_step(__m256* acc, const uint8_t* rows,
                                                                           int64_t row_bytes, const float* scales,
                                                                           int64_t P, const float* x, int64_t D,
                                                                           int64_t block) {
  constexpr int S = kSets<R>;
  fma_rows_avx2<R>(acc + (2 * K) % S * R, x, D, block * 128 + 16 * K,
                   nibble_weight<K>(rows, row_bytes, scales, P, block * 64));
  fma_rows_avx2<R>(acc + (2 * K + 1) % S * R, x, D, block * 128 + 16 * K + 8,
                   nibble_weight<K>(rows, row_bytes, scales, P, block * 64 + 32));
}

template <int R>
__attribute__((target("avx2,fma"))) void channels_avx2(const WeightOnlyWeight& w, const float* x, const float* bias,
                                                       float* y, int64_t c_begin, int64_t c_end) {
  constexpr int S = kSets<R>;
  const int64_t D = w.in_features, chunks = (D + 7) / 8, whole = D / 8;
  const int64_t blocks = w.nibbles ? D / kBlockCodes : 0;  // whole 4-bit blocks, unrolled
  const __m256i tail = _mm256_cmpgt_epi32(_mm256_set1_epi32(int(D % 8)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  for (int64_t j = c_begin; j < c_end; ++j) {
    const uint8_t* rows = w.codes.data() + w.first[j] * w.row_bytes;
    const float* scales = w.scales.data() + w.first[j];
    const int64_t P = w.first[j + 1] - w.first[j];
    __m256 acc[S * R];  // set k, row r at k * R + r
    for (int i = 0; i < S * R; ++i) acc[i] = _mm256_setzero_ps();
    for (int64_t b = 0; b < blocks; ++b) {
      nibble_step<R, 0>(acc, rows, w.row_bytes, scales, P, x, D, b);
      nibble_step<R, 1>(acc, rows, w.row_bytes, scales, P, x, D, b);
      nibble_step<R, 2>(acc, rows, w.row_bytes, scales, P, x, D, b);
      nibble_step<R, 3>(acc, rows, w.row_bytes, scales, P, x, D, b);
      nibble_step<R, 4>(acc, rows, w.row_bytes, scales, P, x, D, b);
      nibble_step<R, 5>(acc, rows, w.row_bytes, scales, P, x, D, b);
      nibble_step<R, 6>(acc, rows, w.row_bytes, scales, P, x, D, b);
      nibble_step<R, 7>(acc, rows, w.row_bytes, scales, P, x, D, b);
    }
    for (int64_t c = blocks * 16; c < chunks; ++c) {
      const __m256 wv = chunk_weight(w, rows, scales, P, c);
      __m256* set = acc + c % S * R;
      if (c < whole) {
        fma_rows_avx2<R>(set, x, D, c * 8, wv);
      } else {
        fma_rows_avx2<R>(set, x, D, c * 8, wv, tail);
      }
    }
    for (int k = 1; k < S; ++k) {  // the sets added in order into set 0
      for (int r = 0; r < R; ++r) acc[r] = _mm256_add_ps(acc[r], acc[k * R + r]);
    }
    const float b = bias ? bias[j] : 0.0f;
    for (int r = 0; r < R; ++r) {  // lanes summed as a tree: 4 + 4, 2 + 2, 1 + 1
      __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc[r]), _mm256_extractf128_ps(acc[r], 1));
      s = _mm_add_ps(s, _mm_movehl_ps(s, s));
      s = _mm_add_ss(s, _mm_movehdup_ps(s));
      y[r * w.channels + j] = b + _mm_cvtss_f32(s);
    }
  }
}

template <int... R>
constexpr std::array<ChannelsFn, sizeof...(R)> channel_table_avx2(std::integer_sequence<int, R...>) {
  return {&channels_avx2<R + 1>...};
}

// Channels in groups whose point rows stay in L1 while every block of x rows reads them: the weight
// is read from memory once, x from L1/L2 once per channel group and row block.
template <int MaxRows, size_t N>
void linear_blocked(const std::array<ChannelsFn, N>& fns, const WeightOnlyWeight& w, const float* x, int64_t rows,
                    const float* bias, float* y, int64_t c_begin, int64_t c_end) {
  const int64_t group = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, w.row_bytes * 2));
  for (int64_t c0 = c_begin; c0 < c_end; c0 += group) {
    const int64_t c1 = std::min(c_end, c0 + group);
    for (int64_t m0 = 0; m0 < rows; m0 += MaxRows) {
      const int64_t R = std::min<int64_t>(MaxRows, rows - m0);
      fns[R - 1](w, x + m0 * w.in_features, bias, y + m0 * w.channels, c0, c1);
    }
  }
}

void linear_avx512(const WeightOnlyWeight& w, const float* x, int64_t rows, const float* bias, float* y,
                   int64_t c_begin, int64_t c_end) {
  static constexpr auto fns = channel_table(std::make_integer_sequence<int, kMaxRows>());
  linear_blocked<kMaxRows>(fns, w, x, rows, bias, y, c_begin, c_end);
}

void linear_avx2(const WeightOnlyWeight& w, const float* x, int64_t rows, const float* bias, float* y, int64_t c_begin,
                 int64_t c_end) {
  static constexpr auto fns = channel_table_avx2(std::make_integer_sequence<int, kMaxRowsAvx2>());
  linear_blocked<kMaxRowsAvx2>(fns, w, x, rows, bias, y, c_begin, c_end);
}

}  // namespace

int64_t packed_row_bytes(int64_t in_features, int64_t w_bits) { return (in_features * w_bits + 7) / 8; }

WeightOnlyWeight prepare_weight_only(const uint8_t* point_codes, const float* point_scales, const int32_t* num_points,
                                     int64_t channels, int64_t in_features, int64_t w_bits) {
  WeightOnlyWeight w;
  w.channels = channels;
  w.in_features = in_features;
  w.w_bits = w_bits;
  w.nibbles = w_bits <= 4;
  w.first.assign(channels + 1, 0);
  for (int64_t j = 0; j < channels; ++j) w.first[j + 1] = w.first[j] + num_points[j];
  const int64_t T = w.first[channels], D = in_features, stored = packed_row_bytes(D, w_bits);
  w.scales.assign(point_scales, point_scales + T);
  w.row_bytes = w.nibbles ? (D + kBlockCodes - 1) / kBlockCodes * 64 : (D + 15) / 16 * 16;
  w.codes.assign(T * w.row_bytes, 0);  // padding codes are zero
  for (int64_t t = 0; t < T; ++t) {
    const uint8_t* src = point_codes + t * stored;
    uint8_t* dst = w.codes.data() + t * w.row_bytes;
    for (int64_t d = 0; d < D; ++d) {
      const int c = stored_code(src, d, w_bits);
      if (!w.nibbles) {
        dst[d] = uint8_t(int8_t(c));
        continue;
      }
      const int64_t block = d / kBlockCodes, i = d % kBlockCodes, k = i / 16, l = i % 16;
      dst[block * 64 + l * 4 + k / 2] |= uint8_t((c & 0xF) << (4 * (k % 2)));
    }
  }
  return w;
}

void weight_only_linear(const WeightOnlyWeight& w, const float* x, int64_t rows, const float* bias, float* y,
                        int64_t c_begin, int64_t c_end, CpuIsa isa) {
  if (rows <= 0 || c_begin >= c_end) return;
  static const bool avx512bw = cpu_has_avx512() && __builtin_cpu_supports("avx512bw");  // vpshufb on zmm
  if (isa == CpuIsa::kAvx512 && avx512bw) {
    linear_avx512(w, x, rows, bias, y, c_begin, c_end);
  } else if (isa != CpuIsa::kScalar && cpu_has_avx2()) {
    linear_avx2(w, x, rows, bias, y, c_begin, c_end);
  } else {
    linear_scalar(w, x, rows, bias, y, c_begin, c_end);
  }
}

}  // namespace kernels
}  // namespace mpq
