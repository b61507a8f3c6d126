// The packed multipoint weight (mpq::pack_multipoint), version 1: where every code lives, and the
// few integer steps that turn the words of one lane into mma.sync operands. Torch-free and usable
// from host and device code, so that the CPU packing (csrc/cpu/multipoint_packed.cpp), the CUDA
// kernels (csrc/cuda/multipoint_packed.cu) and the Catch2 tests (tests/cpp/test_packed_layout.cpp)
// share one definition.
//
// From codes int8[C, P, D], scales float32[C, P], num_points int32[C] and w_bits:
//
//  * Storage width b: 4 for w_bits <= 4 (a nibble u = q + 8, so q in -8..7), 8 for w_bits in 5..8
//    (the int8 code itself). Kp = D rounded up to a multiple of kKAlign = 64; columns D..Kp-1 hold
//    code 0 (nibble 8), so kernels never need a K tail for the weights (they still guard x).
//  * Channels are sorted by num_points, descending and stable (equal counts keep channel order).
//    Each run of equal count is padded with empty rows to a multiple of kTileN = 64, so that a tile
//    (64 consecutive packed rows) has exactly one point count; counts 0 make tiles without points
//    (their outputs are the bias). Heavy tiles come first: they start first on the GPU.
//  * perm int32[num_tiles * 64]: the original channel of packed row r = 64 t + n, or -1 for a
//    padding row. Kernels write row r's output to column perm[r] (the inverse permutation is
//    applied in the epilogue; nothing is permuted back afterwards).
//  * tile_offsets int32[num_tiles + 1], tile_offsets[0] = 0: point p of tile t is block
//    tile_offsets[t] + p, so tile t has tile_offsets[t + 1] - tile_offsets[t] points.
//  * packed uint8[num_blocks, Kp / 16, 512 * b / 4]: one block = one point of one tile = 64 rows
//    x Kp columns, cut into slabs of kSlabK = 16 columns. A slab is one or two 512-byte chunks;
//    the 16 bytes at 512 c + 16 L of a slab belong to lane L = 4 g + t of a warp (g = L / 4,
//    t = L % 4), so that a warp reads a chunk with one coalesced 128-bit load per lane. They hold
//    exactly the codes that lane needs as B operands of mma.sync.m16n8k16 (B[k][n] with n = g and
//    k = 2 t + e + 8 r, e, r in {0, 1}: register r, half e) for the eight n8 subtiles j of the
//    tile (tile rows n = 8 j + g), k relative to the slab:
//      b = 4: word i (bytes 4 i .. 4 i + 3 of the lane's 16) holds subtiles j = 2 i + jj,
//             jj in {0, 1}, at nibble pos = (2 jj + r) + 4 e (bits 4 pos .. 4 pos + 3), so that
//             (word >> 4 h) & 0x000F000F is the (e = 0, e = 1) pair of register h = 2 jj + r at
//             bits 0 and 16: OR-ed with 0x6400 (fp16 1024) or 0x4300 (bf16 128) per half it is
//             the pair 1024 + u or 128 + u, one subtraction from the codes.
//      b = 8: chunk c = j / 4, word j % 4 holds subtile j, byte 2 r + e.
//    For mma.sync.m16n8k32 with int8 operands (B[k][n], k = 4 t + i, 16 + 4 t + i for the two
//    registers) two consecutive slabs form one k32 step, and the k order inside each slab is
//    permuted consistently for A and B: the mma's slot 4 t + i of a slab is the column
//    2 t + (i & 1) + 8 (i >> 1) (s8_slot_column); a sum over k does not depend on its order.
//  * packed_scales float32[num_blocks, 64]: the scale of point p of packed row n of tile t at
//    [tile_offsets[t] + p, n]; 0 for padding rows.
//  * row_sums float32[num_tiles * 64]: sum_k W[perm[r], k] of the dequantized weight, summed in
//    float64 (the zero-point correction of the int8-activation kernel); 0 for padding rows.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define MPQ_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MPQ_HOST_DEVICE inline
#endif

namespace mpq {
namespace packed {

constexpr int kFormatVersion = 1;
constexpr int kTileN = 64;        // packed rows (output channels) per tile
constexpr int kSlabK = 16;        // columns per slab
constexpr int kKAlign = 64;       // Kp is a multiple of this
constexpr int kChunkBytes = 512;  // one 16-byte vector per lane of a warp
constexpr int kLaneBytes = 16;
// The int8 kernels (mma.sync.m16n8k32.s8) accumulate in int32: |v| <= 128, |q| <= 128, so K < 2^31 / 2^14;
// halved for margin. Kp is at most this for "int8".
constexpr int64_t kInt8MaxK = 65536;

MPQ_HOST_DEVICE int storage_bits(int w_bits) { return w_bits <= 4 ? 4 : 8; }
MPQ_HOST_DEVICE int slab_bytes(int bits) { return bits == 4 ? kChunkBytes : 2 * kChunkBytes; }
MPQ_HOST_DEVICE int64_t padded_k(int64_t d) { return (d + kKAlign - 1) / kKAlign * kKAlign; }

// Where code (n, k) of a block lives: byte offset inside the block, and the bit shift inside
// that byte (0 or 4 for nibbles, 0 for bytes). n in 0..63, k in 0..Kp-1.
struct CodeAt {
  int64_t byte;
  int shift;
};

MPQ_HOST_DEVICE CodeAt code_at(int bits, int n, int64_t k) {
  const int kk = static_cast<int>(k % kSlabK);
  const int g = n % 8, j = n / 8, t = (kk % 8) / 2, r = kk / 8, e = kk % 2;
  const int lane = 4 * g + t;
  const int64_t slab = (k / kSlabK) * slab_bytes(bits);
  if (bits == 4) {
    const int i = j / 2, jj = j % 2, pos = 2 * jj + r + 4 * e;
    return {slab + kLaneBytes * lane + 4 * i + pos / 2, 4 * (pos % 2)};
  }
  return {slab + kChunkBytes * (j / 4) + kLaneBytes * lane + 4 * (j % 4) + 2 * r + e, 0};
}

// Writes code q (in -8..7 for b = 4, any int8 for b = 8) into a block.
MPQ_HOST_DEVICE void store_code(uint8_t* block, int bits, int n, int64_t k, int q) {
  const CodeAt at = code_at(bits, n, k);
  if (bits == 4) {
    const unsigned u = static_cast<unsigned>(q + 8) & 0xFu;
    block[at.byte] = static_cast<uint8_t>((block[at.byte] & ~(0xFu << at.shift)) | (u << at.shift));
  } else {
    block[at.byte] = static_cast<uint8_t>(static_cast<int8_t>(q));
  }
}

MPQ_HOST_DEVICE int load_code(const uint8_t* block, int bits, int n, int64_t k) {
  const CodeAt at = code_at(bits, n, k);
  if (bits == 4) return static_cast<int>((block[at.byte] >> at.shift) & 0xFu) - 8;
  return static_cast<int>(static_cast<int8_t>(block[at.byte]));
}

// The column (relative to its slab) of slot 0..15 of an int8 mma operand register run: slot
// 4 t + i holds column 2 t + (i & 1) + 8 (i >> 1). Activations quantized to int8 are written
// in this order, so that each A register of m16n8k32 is one aligned 32-bit load.
MPQ_HOST_DEVICE int s8_slot_column(int slot) {
  const int t = slot / 4, i = slot % 4;
  return 2 * t + (i & 1) + 8 * (i >> 1);
}

// ---- the integer steps of the kernels' operand decoding ----------------------------------------

// PTX prmt (byte permute, default mode): byte i of the result is byte sel[4i+3:4i] of {b, a}.
MPQ_HOST_DEVICE uint32_t byte_perm(uint32_t a, uint32_t b, uint32_t sel) {
#if defined(__CUDA_ARCH__)
  return __byte_perm(a, b, sel);
#else
  const uint64_t ab = (static_cast<uint64_t>(b) << 32) | a;
  uint32_t d = 0;
  for (int i = 0; i < 4; ++i) d |= static_cast<uint32_t>((ab >> (8 * ((sel >> (4 * i)) & 7u))) & 0xFFu) << (8 * i);
  return d;
#endif
}

// Bytewise a - b modulo 256 (no borrow between bytes).
MPQ_HOST_DEVICE uint32_t sub_bytes(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __vsub4(a, b);
#else
  uint32_t d = 0;
  for (int i = 0; i < 4; ++i) d |= (((a >> (8 * i)) - (b >> (8 * i))) & 0xFFu) << (8 * i);
  return d;
#endif
}

// b = 4: the nibbles u of half2 register h (0..3) of a word, at bits 0..3 (e = 0) and 16..19 (e = 1).
MPQ_HOST_DEVICE uint32_t nibble_pair(uint32_t word, int h) { return (word >> (4 * h)) & 0x000F000Fu; }

// fp16 bits of 1024 + u (0x6400 | u), bf16 bits of 128 + u (0x4300 | u); subtract 1032 / 136.
constexpr uint32_t kHalfMagic = 0x64006400u;
constexpr uint32_t kHalfMagicBias = 0x64086408u;  // 1032 = 1024 + 8 in both halves
constexpr uint32_t kBf16Magic = 0x43004300u;
constexpr uint32_t kBf16MagicBias = 0x43084308u;  // 136 = 128 + 8

// b = 8, fp16: the pair of bytes 2 r, 2 r + 1 of a word as fp16 bits of 1024 + (q + 128); subtract 1152.
constexpr uint32_t kHalfByteBias = 0x64806480u;
MPQ_HOST_DEVICE uint32_t byte_pair_half_bits(uint32_t word, int r) {
  return byte_perm(word ^ 0x80808080u, 0x64646464u, r == 0 ? 0x5140u : 0x5342u);
}

// b = 4: the four codes of subtile jj (0, 1) of a word as int8 bytes in slot order
// (columns 2t, 2t+1, 2t+8, 2t+9 = nibbles 2jj, 2jj+4, 2jj+1, 2jj+5): one B register of
// mma.sync.m16n8k32.s8.
MPQ_HOST_DEVICE uint32_t nibbles_to_s8x4(uint32_t word, int jj) {
  const uint32_t lo = word & 0x0F0F0F0Fu;         // nibbles 0, 2, 4, 6
  const uint32_t hi = (word >> 4) & 0x0F0F0F0Fu;  // nibbles 1, 3, 5, 7
  return sub_bytes(byte_perm(lo, hi, jj == 0 ? 0x6420u : 0x7531u), 0x08080808u);
}

}  // namespace packed
}  // namespace mpq
