// Catch2 tests of the packed weight layout (csrc/kernels/packed_layout.h) and of the integer steps
// the CUDA kernels (csrc/cuda/multipoint_packed.cu) use to turn a lane's words into mma.sync
// operands. The fragment ownership below is written from the PTX ISA's tables for
// mma.m16n8k16 (f16/bf16) and mma.m16n8k32 (s8), independently of the layout code: a lane
// (g = lane / 4, t = lane % 4) holds B[k][n] with n = g and, for k16, k = 2t + e + 8r (register r,
// half e); for k32 with int8, k = 4t + i (register 0) and 16 + 4t + i (register 1), byte i. A of
// k32: register 0 = A[g][4t + i], 1 = A[g + 8][4t + i], 2 = A[g][16 + 4t + i], 3 = A[g + 8][16 + 4t + i].
// The tests run the same helper functions the kernels run (they are host-device), so what the
// GPU must still show is only that the intrinsics behave as their host emulations here.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <set>
#include <utility>
#include <vector>

#include "catch_compat.h"
#include "kernels/conv_layout.h"
#include "kernels/layout.h"
#include "kernels/packed_layout.h"

namespace {

namespace pk = mpq::packed;

// IEEE binary16 and bfloat16 bit patterns to float.
float half_to_float(uint16_t h) {
  const int sign = h >> 15, exp = (h >> 10) & 0x1F, mant = h & 0x3FF;
  float v;
  if (exp == 0) {
    v = std::ldexp(static_cast<float>(mant), -24);
  } else if (exp == 31) {
    v = mant ? NAN : INFINITY;
  } else {
    v = std::ldexp(static_cast<float>(mant + 1024), exp - 25);
  }
  return sign ? -v : v;
}

float bf16_to_float(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

uint32_t word_at(const std::vector<uint8_t>& block, int64_t byte) {
  uint32_t w;
  std::memcpy(&w, block.data() + byte, sizeof(w));
  return w;
}

// One packed block (one point of one tile) with random codes, and the codes themselves [n][k].
struct Block {
  int bits;
  int64_t kp;
  std::vector<uint8_t> bytes;
  std::vector<std::vector<int>> q;  // [64][kp]
};

Block random_block(int bits, int64_t kp, uint32_t seed) {
  std::mt19937 rng(seed);
  const int lo = bits == 4 ? -8 : -128, hi = bits == 4 ? 7 : 127;
  std::uniform_int_distribution<int> dist(lo, hi);
  Block b{bits, kp,
          std::vector<uint8_t>(static_cast<size_t>(kp / pk::kSlabK * pk::slab_bytes(bits)), bits == 4 ? 0x88 : 0),
          std::vector<std::vector<int>>(pk::kTileN, std::vector<int>(static_cast<size_t>(kp)))};
  for (int n = 0; n < pk::kTileN; ++n) {
    for (int64_t k = 0; k < kp; ++k) {
      b.q[n][k] = dist(rng);
      pk::store_code(b.bytes.data(), bits, n, k, b.q[n][k]);
    }
  }
  return b;
}

// The 32-bit word i (0..3) of chunk c of slab s that lane L loads.
uint32_t lane_word(const Block& b, int64_t slab, int lane, int chunk, int i) {
  return word_at(b.bytes, slab * pk::slab_bytes(b.bits) + chunk * pk::kChunkBytes + lane * pk::kLaneBytes + 4 * i);
}

}  // namespace

TEST_CASE("every code of a block has its own place, and all places are used", "[packed_layout]") {
  for (const int bits : {4, 8}) {
    const int64_t kp = 128;
    std::set<std::pair<int64_t, int>> places;
    for (int n = 0; n < pk::kTileN; ++n) {
      for (int64_t k = 0; k < kp; ++k) {
        const auto at = pk::code_at(bits, n, k);
        CHECK(at.byte >= 0);
        CHECK(at.byte < kp / pk::kSlabK * pk::slab_bytes(bits));
        places.insert({at.byte, at.shift});
      }
    }
    CHECK(static_cast<int64_t>(places.size()) == pk::kTileN * kp);
  }
}

TEST_CASE("store_code and load_code round-trip every representable code", "[packed_layout]") {
  for (const int bits : {4, 8}) {
    const Block b = random_block(bits, 64, 7u + bits);
    for (int n = 0; n < pk::kTileN; ++n)
      for (int64_t k = 0; k < b.kp; ++k) REQUIRE(pk::load_code(b.bytes.data(), bits, n, k) == b.q[n][k]);
  }
  std::vector<uint8_t> block(pk::slab_bytes(4), 0x88);
  CHECK(pk::load_code(block.data(), 4, 5, 3) == 0);  // the padding pattern is code 0
}

TEST_CASE("padded_k and storage widths", "[packed_layout]") {
  CHECK(pk::padded_k(0) == 0);
  CHECK(pk::padded_k(1) == 64);
  CHECK(pk::padded_k(64) == 64);
  CHECK(pk::padded_k(65) == 128);
  CHECK(pk::storage_bits(2) == 4);
  CHECK(pk::storage_bits(4) == 4);
  CHECK(pk::storage_bits(5) == 8);
  CHECK(pk::storage_bits(8) == 8);
}

// The rules of csrc/kernels/layout.h, the ones Python reads through mpq::layout_constants and the
// predicate ops (tests/python/test_layout.py checks that every Python site agrees with them).
TEST_CASE("layout rules: stored rows and int8 eligibility", "[packed_layout][layout]") {
  namespace ly = mpq::layout;
  CHECK(ly::stored_row_bytes(0, 4) == 0);
  CHECK(ly::stored_row_bytes(1, 2) == 1);
  CHECK(ly::stored_row_bytes(5, 3) == 2);  // 15 bits
  CHECK(ly::stored_row_bytes(8, 8) == 8);
  CHECK(ly::stored_row_bytes(27, 4) == 14);

  CHECK(ly::int8_levels_fit(0.1, 0.0, 0.0, 255.0));
  CHECK(ly::int8_levels_fit(0.1, 0.0, -128.0, 127.0));
  CHECK(ly::int8_levels_fit(0.1, 300.0, 0.0, 15.0));       // any integer zero point
  CHECK_FALSE(ly::int8_levels_fit(0.1, 0.0, 0.0, 256.0));  // 257 levels
  CHECK_FALSE(ly::int8_levels_fit(0.1, 0.5, 0.0, 255.0));
  CHECK_FALSE(ly::int8_levels_fit(0.1, 0.0, 0.0, 254.5));
  CHECK_FALSE(ly::int8_levels_fit(0.0, 0.0, 0.0, 255.0));
  CHECK_FALSE(ly::int8_levels_fit(std::nan(""), 0.0, 0.0, 255.0));
  CHECK_FALSE(ly::int8_levels_fit(0.1, 0.0, 7.0, 7.0));

  const double ok[4] = {0.1, 3.0, 0.0, 255.0}, far_zero[4] = {0.1, 300.0, 0.0, 255.0};
  CHECK(ly::packed_int8_fits(ok, 65536, false, 0));
  CHECK_FALSE(ly::packed_int8_fits(ok, 65537, false, 0));  // Kp = 65600 > kInt8MaxK
  CHECK(ly::packed_int8_fits(far_zero, 100, false, 0));    // Linear: no zero padding
  CHECK(ly::packed_int8_fits(ok, 16 * 9, true, 16));
  CHECK_FALSE(ly::packed_int8_fits(ok, 17 * 9, true, 17));        // not whole slabs of one pixel
  CHECK_FALSE(ly::packed_int8_fits(far_zero, 16 * 9, true, 16));  // the level of 0 outside int8
}

TEST_CASE("host emulations of prmt and vsub4", "[packed_layout]") {
  CHECK(pk::byte_perm(0x33221100u, 0x77665544u, 0x3210u) == 0x33221100u);
  CHECK(pk::byte_perm(0x33221100u, 0x77665544u, 0x7654u) == 0x77665544u);
  CHECK(pk::byte_perm(0x33221100u, 0x77665544u, 0x5140u) == 0x55114400u);
  CHECK(pk::sub_bytes(0x00FF0801u, 0x08080808u) == 0xF8F700F9u);
}

TEST_CASE("4-bit words give the m16n8k16 B fragments as fp16 and bf16", "[packed_layout]") {
  const Block b = random_block(4, 64, 11u);
  for (int64_t slab = 0; slab < b.kp / pk::kSlabK; ++slab) {
    for (int lane = 0; lane < 32; ++lane) {
      const int g = lane / 4, t = lane % 4;
      for (int j = 0; j < 8; ++j) {
        const uint32_t word = lane_word(b, slab, lane, 0, j / 2);
        for (int r = 0; r < 2; ++r) {
          const uint32_t pair = pk::nibble_pair(word, 2 * (j % 2) + r);
          const uint32_t h = pair | pk::kHalfMagic, bf = pair | pk::kBf16Magic;
          for (int e = 0; e < 2; ++e) {
            const int want = b.q[8 * j + g][slab * pk::kSlabK + 2 * t + e + 8 * r];
            const float bias_h = half_to_float(static_cast<uint16_t>(pk::kHalfMagicBias >> (16 * e)));
            const float bias_b = bf16_to_float(static_cast<uint16_t>(pk::kBf16MagicBias >> (16 * e)));
            REQUIRE(half_to_float(static_cast<uint16_t>(h >> (16 * e))) - bias_h == static_cast<float>(want));
            REQUIRE(bf16_to_float(static_cast<uint16_t>(bf >> (16 * e))) - bias_b == static_cast<float>(want));
          }
        }
      }
    }
  }
  CHECK(half_to_float(0x6408) == 1032.0f);
  CHECK(bf16_to_float(0x4308) == 136.0f);
}

TEST_CASE("8-bit words give the m16n8k16 B fragments", "[packed_layout]") {
  const Block b = random_block(8, 64, 12u);
  for (int64_t slab = 0; slab < b.kp / pk::kSlabK; ++slab) {
    for (int lane = 0; lane < 32; ++lane) {
      const int g = lane / 4, t = lane % 4;
      for (int j = 0; j < 8; ++j) {
        const uint32_t word = lane_word(b, slab, lane, j / 4, j % 4);
        for (int r = 0; r < 2; ++r) {
          const uint32_t h = pk::byte_pair_half_bits(word, r);
          for (int e = 0; e < 2; ++e) {
            const int want = b.q[8 * j + g][slab * pk::kSlabK + 2 * t + e + 8 * r];
            // the fp16 path (magic) and the bf16 path (the signed byte itself)
            REQUIRE(half_to_float(static_cast<uint16_t>(h >> (16 * e))) -
                        half_to_float(static_cast<uint16_t>(pk::kHalfByteBias)) ==
                    static_cast<float>(want));
            REQUIRE(static_cast<int8_t>((word >> (16 * r + 8 * e)) & 0xFFu) == want);
          }
        }
      }
    }
  }
}

TEST_CASE("s8_slot_column is a permutation of a slab's 16 columns", "[packed_layout]") {
  std::set<int> cols;
  for (int s = 0; s < 16; ++s) cols.insert(pk::s8_slot_column(s));
  CHECK(cols.size() == 16);
  CHECK(*cols.begin() == 0);
  CHECK(*cols.rbegin() == 15);
}

// Emulates one warp's mma.sync.m16n8k32.s8 per subtile, with A built as the quantize kernel writes
// the activations and B as the int8 kernel decodes the weights, and compares with the plain sum
// over the 32 columns of two slabs.
TEST_CASE("int8 fragments of activations and weights multiply to the true product", "[packed_layout]") {
  for (const int bits : {4, 8}) {
    const Block b = random_block(bits, 64, 20u + bits);
    std::mt19937 rng(5u);
    std::uniform_int_distribution<int> dist(-128, 127);
    std::vector<std::vector<int>> x(16, std::vector<int>(static_cast<size_t>(b.kp)));
    for (auto& row : x)
      for (auto& v : row) v = dist(rng);
    // xq row-major [16, kp]: slot 4t + i of slab s holds column 16 s + s8_slot_column(4t + i).
    std::vector<int8_t> xq(16 * b.kp);
    for (int m = 0; m < 16; ++m)
      for (int64_t s = 0; s < b.kp / pk::kSlabK; ++s)
        for (int slot = 0; slot < 16; ++slot)
          xq[m * b.kp + s * pk::kSlabK + slot] = static_cast<int8_t>(x[m][s * pk::kSlabK + pk::s8_slot_column(slot)]);
    const auto xq_word = [&](int m, int64_t col) {
      uint32_t w;
      std::memcpy(&w, xq.data() + m * b.kp + col, sizeof(w));
      return w;
    };
    const auto byte = [](uint32_t w, int i) { return static_cast<int>(static_cast<int8_t>((w >> (8 * i)) & 0xFFu)); };
    for (int64_t step = 0; step < b.kp / (2 * pk::kSlabK); ++step) {
      const int64_t s0 = 2 * step, k0 = s0 * pk::kSlabK;
      for (int j = 0; j < 8; ++j) {
        // Registers per lane, as the kernel loads and decodes them.
        uint32_t a[32][4], bb[32][2];
        for (int lane = 0; lane < 32; ++lane) {
          const int g = lane / 4, t = lane % 4;
          a[lane][0] = xq_word(g, k0 + 4 * t);
          a[lane][1] = xq_word(g + 8, k0 + 4 * t);
          a[lane][2] = xq_word(g, k0 + pk::kSlabK + 4 * t);
          a[lane][3] = xq_word(g + 8, k0 + pk::kSlabK + 4 * t);
          for (int ss = 0; ss < 2; ++ss) {
            bb[lane][ss] = bits == 4 ? pk::nibbles_to_s8x4(lane_word(b, s0 + ss, lane, 0, j / 2), j % 2)
                                     : lane_word(b, s0 + ss, lane, j / 4, j % 4);
          }
        }
        // The mma: D[m][n] = sum over the 32 logical k of A[m][k] B[k][n], by the PTX tables.
        for (int m = 0; m < 16; ++m) {
          for (int n = 0; n < 8; ++n) {
            int64_t d = 0, want = 0;
            for (int kl = 0; kl < 32; ++kl) {
              const int t = (kl % 16) / 4, i = kl % 4, hi = kl / 16;
              const int a_lane = 4 * (m % 8) + t, a_reg = (m >= 8 ? 1 : 0) + 2 * hi;
              const int b_lane = 4 * n + t;
              d += static_cast<int64_t>(byte(a[a_lane][a_reg], i)) * byte(bb[b_lane][hi], i);
            }
            for (int64_t k = k0; k < k0 + 32; ++k) want += static_cast<int64_t>(x[m][k]) * b.q[8 * j + n][k];
            REQUIRE(d == want);
          }
        }
      }
    }
  }
}

// The same for mma.sync.m16n8k16 with 4-bit codes widened to fp16: A registers as the weight-only
// kernel loads them (pairs of columns 2t, 2t + 1 and 2t + 8, 2t + 9 of rows g and g + 8), B from
// nibble_pair and the fp16 magic; A table: register 0 = A[g][2t + e], 1 = A[g + 8][2t + e],
// 2 = A[g][2t + 8 + e], 3 = A[g + 8][2t + 8 + e].
TEST_CASE("fp16 fragments of activations and 4-bit weights multiply to the true product", "[packed_layout]") {
  const Block b = random_block(4, 64, 31u);
  std::mt19937 rng(6u);
  std::uniform_int_distribution<int> dist(-50, 50);
  std::vector<std::vector<int>> x(16, std::vector<int>(static_cast<size_t>(b.kp)));
  for (auto& row : x)
    for (auto& v : row) v = dist(rng);  // small integers: every product and sum exact in float
  for (int64_t slab = 0; slab < b.kp / pk::kSlabK; ++slab) {
    const int64_t k0 = slab * pk::kSlabK;
    for (int j = 0; j < 8; ++j) {
      float a[32][4][2], bb[32][2][2];
      for (int lane = 0; lane < 32; ++lane) {
        const int g = lane / 4, t = lane % 4;
        for (int e = 0; e < 2; ++e) {
          a[lane][0][e] = static_cast<float>(x[g][k0 + 2 * t + e]);
          a[lane][1][e] = static_cast<float>(x[g + 8][k0 + 2 * t + e]);
          a[lane][2][e] = static_cast<float>(x[g][k0 + 2 * t + 8 + e]);
          a[lane][3][e] = static_cast<float>(x[g + 8][k0 + 2 * t + 8 + e]);
        }
        const uint32_t word = lane_word(b, slab, lane, 0, j / 2);
        for (int r = 0; r < 2; ++r) {
          const uint32_t h = pk::nibble_pair(word, 2 * (j % 2) + r) | pk::kHalfMagic;
          for (int e = 0; e < 2; ++e) bb[lane][r][e] = half_to_float(static_cast<uint16_t>(h >> (16 * e))) - 1032.0f;
        }
      }
      for (int m = 0; m < 16; ++m) {
        for (int n = 0; n < 8; ++n) {
          float d = 0.0f, want = 0.0f;
          for (int kl = 0; kl < 16; ++kl) {  // PTX: A[m][kl], B[kl][n]
            const int t = (kl % 8) / 2, e = kl % 2, hi = kl / 8;
            d += a[4 * (m % 8) + t][(m >= 8 ? 1 : 0) + 2 * hi][e] * bb[4 * n + t][hi][e];
          }
          for (int64_t k = k0; k < k0 + 16; ++k) want += static_cast<float>(x[m][k] * b.q[8 * j + n][k]);
          REQUIRE(d == want);
        }
      }
    }
  }
}

// ---- the implicit GEMM of the packed conv2d (csrc/kernels/conv_layout.h) -----------------------
//
// For many convolution shapes: the A operand the conv kernels load (ConvWeightOnly::pair with and
// without 32-bit vector loads, ConvInt8::word with the slot-ordered NHWC levels and the level of 0
// in the padding), rebuilt here from the same index functions, equals an im2col matrix written
// independently from the convolution's definition on an NCHW tensor.

namespace {

struct ConvCase {
  int N, C, H, W, KH, KW, sh, sw, ph, pw, dh, dw, groups, Cout;
};

constexpr int kPad = 1000;  // marks the zero padding in the reference im2col

// Reference: A[m][k] for the tile group grp, m = (n, oh, ow), k = (i, j, c).
std::vector<std::vector<int>> im2col(const ConvCase& cc, const std::vector<int>& x_nchw, int grp, int OH, int OW) {
  const int Cg = cc.C / cc.groups;
  std::vector<std::vector<int>> a;
  for (int n = 0; n < cc.N; ++n)
    for (int oh = 0; oh < OH; ++oh)
      for (int ow = 0; ow < OW; ++ow) {
        std::vector<int> row;
        for (int i = 0; i < cc.KH; ++i)
          for (int j = 0; j < cc.KW; ++j)
            for (int c = 0; c < Cg; ++c) {
              const int ih = oh * cc.sh - cc.ph + i * cc.dh, iw = ow * cc.sw - cc.pw + j * cc.dw;
              const bool inside = ih >= 0 && ih < cc.H && iw >= 0 && iw < cc.W;
              row.push_back(inside ? x_nchw[((n * cc.C + grp * Cg + c) * cc.H + ih) * cc.W + iw] : kPad);
            }
        a.push_back(row);
      }
  return a;
}

pk::ConvShape conv_shape(const ConvCase& cc, int OH, int OW) {
  const int Cg = cc.C / cc.groups;
  return {static_cast<int64_t>(cc.N) * OH * OW,
          static_cast<int64_t>(cc.KH) * cc.KW * Cg,
          cc.H,
          cc.W,
          cc.C,
          OH,
          OW,
          cc.KW,
          Cg,
          cc.sh,
          cc.sw,
          cc.ph,
          cc.pw,
          cc.dh,
          cc.dw,
          cc.Cout / cc.groups};
}

}  // namespace

TEST_CASE("the conv kernels' A loads equal im2col of the NCHW input", "[packed_layout][conv]") {
  const ConvCase cases[] = {
      {2, 3, 7, 5, 3, 3, 1, 1, 1, 1, 1, 1, 1, 8},     // odd C (scalar loads), padding
      {1, 32, 9, 9, 3, 3, 2, 2, 1, 1, 1, 1, 1, 64},   // stride 2, int8-eligible
      {2, 64, 6, 7, 1, 1, 1, 1, 0, 0, 1, 1, 1, 70},   // 1x1
      {1, 64, 8, 8, 3, 3, 1, 1, 2, 2, 2, 2, 2, 128},  // dilation, groups of 32 channels
      {1, 48, 5, 6, 3, 2, 2, 1, 1, 0, 1, 2, 3, 192},  // groups of 16, rectangular kernel
      {3, 6, 4, 4, 2, 2, 2, 2, 0, 1, 1, 1, 3, 6},     // groups of 2 channels (even, vector loads)
      {1, 16, 3, 3, 7, 7, 1, 1, 3, 3, 1, 1, 1, 16},   // kernel larger than the image, all padding rows
  };
  std::mt19937 rng(11u);
  std::uniform_int_distribution<int> dist(-128, 127);
  for (const ConvCase& cc : cases) {
    const int Cg = cc.C / cc.groups;
    const int OH = (cc.H + 2 * cc.ph - cc.dh * (cc.KH - 1) - 1) / cc.sh + 1;
    const int OW = (cc.W + 2 * cc.pw - cc.dw * (cc.KW - 1) - 1) / cc.sw + 1;
    const pk::ConvShape s = conv_shape(cc, OH, OW);
    std::vector<int> x_nchw(static_cast<size_t>(cc.N) * cc.C * cc.H * cc.W);
    for (auto& v : x_nchw) v = dist(rng);
    std::vector<int> x_nhwc(x_nchw.size());  // the kernels' input
    for (int n = 0; n < cc.N; ++n)
      for (int c = 0; c < cc.C; ++c)
        for (int h = 0; h < cc.H; ++h)
          for (int w = 0; w < cc.W; ++w)
            x_nhwc[((n * cc.H + h) * cc.W + w) * cc.C + c] = x_nchw[((n * cc.C + c) * cc.H + h) * cc.W + w];
    // xq: the NHWC levels with each 16 channels in slot order (quantize_int8 over [N*H*W, C]).
    std::vector<int8_t> xq(x_nhwc.size());
    if (cc.C % pk::kSlabK == 0) {
      for (size_t pix = 0; pix < x_nhwc.size() / cc.C; ++pix)
        for (int c0 = 0; c0 < cc.C; c0 += pk::kSlabK)
          for (int slot = 0; slot < pk::kSlabK; ++slot)
            xq[pix * cc.C + c0 + slot] = static_cast<int8_t>(x_nhwc[pix * cc.C + c0 + pk::s8_slot_column(slot)]);
    }
    const int8_t pad_level = -37;
    const int64_t kp = pk::padded_k(s.D);
    for (int grp = 0; grp < cc.groups; ++grp) {
      // A tile of this group: its first row is some channel of the group.
      const int first_channel = grp * (cc.Cout / cc.groups) + (cc.Cout / cc.groups) / 2;
      const int c0 = pk::conv_tile_channel0(s, first_channel);
      REQUIRE(c0 == grp * Cg);
      const auto want = im2col(cc, x_nchw, grp, OH, OW);
      const int64_t rows = s.M + 16;  // rows past M are skipped
      for (int64_t m = 0; m < rows; ++m) {
        const pk::ConvRow r = pk::conv_row(s, m);
        REQUIRE((r.image < 0) == (m >= s.M));
        // Weight-only: pairs (k, k + 1), k even, as ConvWeightOnly::pair loads them.
        for (const bool vec : {false, true}) {
          if (vec && (Cg % 2 != 0 || cc.C % 2 != 0)) continue;
          for (int64_t k = 0; k < kp; k += 2) {
            int got[2];
            const pk::ConvCol col = pk::conv_col(s, k);
            if (vec) {
              const int64_t off = pk::conv_offset(s, r, col, c0);
              got[0] = off < 0 ? 0 : x_nhwc[off];
              got[1] = off < 0 ? 0 : x_nhwc[off + 1];
            } else {
              for (int e = 0; e < 2; ++e) {
                const int64_t off = pk::conv_offset(s, r, pk::conv_col(s, k + e), c0);
                got[e] = off < 0 ? 0 : x_nhwc[off];
              }
            }
            for (int e = 0; e < 2; ++e) {
              const int64_t kk = k + e;
              const int expect = m >= s.M || kk >= s.D || want[m][kk] == kPad ? 0 : want[m][kk];
              REQUIRE(got[e] == expect);
            }
          }
        }
        // int8: words of slots 4t..4t+3 of each slab, as ConvInt8::word loads them.
        if (Cg % pk::kSlabK != 0) continue;
        for (int64_t k0 = 0; k0 < kp; k0 += pk::kSlabK) {
          const pk::ConvCol col = pk::conv_col(s, k0);
          for (int t = 0; t < 4; ++t) {
            for (int i = 0; i < 4; ++i) {
              int got = 0;
              if (r.image >= 0 && col.valid) {
                const int64_t off = pk::conv_offset(s, r, col, c0);
                got = off < 0 ? pad_level : xq[off + 4 * t + i];
              }
              const int64_t kk = k0 + pk::s8_slot_column(4 * t + i);
              if (m >= s.M || kk >= s.D) {
                REQUIRE(got == 0);
              } else {
                REQUIRE(got == (want[m][kk] == kPad ? pad_level : want[m][kk]));
              }
            }
          }
        }
      }
    }
  }
}
