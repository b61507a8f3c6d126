// CPU kernels of the packed weight: packing (done once, at quantize time or when a module first
// runs on a GPU), unpacking, and the packed linear layer. The packed linear defines the semantics
// that every CUDA kernel of csrc/cuda/multipoint_packed.cu must reproduce: it unpacks the weight
// and runs mpq::multipoint_linear's CPU kernel, so on the CPU the packed op equals the unpacked
// one bit for bit; the packed conv2d likewise runs mpq::multipoint_conv2d's. The layout is
// csrc/kernels/packed_layout.h.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <numeric>
#include <tuple>
#include <vector>

#include "checks.h"
#include "cpu/multipoint_layers.h"
#include "kernels/packed_layout.h"

namespace mpq {
namespace {

using namespace mpq::packed;

struct Tile {
  int points;     // point count of every row of the tile
  int64_t first;  // index of its first row in the sorted channel order
  int rows;       // rows that hold a channel (the rest are padding)
};

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> pack_multipoint_cpu(
    const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& num_points, int64_t w_bits, int64_t groups) {
  check_pack_multipoint_args(codes, scales, num_points, w_bits, groups);
  const auto c = codes.contiguous();
  const auto s = scales.contiguous();
  const auto np = num_points.contiguous();
  const int64_t C = c.size(0), P = c.size(1), D = c.size(2);
  const int bits = storage_bits(static_cast<int>(w_bits));
  const int64_t Kp = padded_k(D), slabs = Kp / kSlabK, block_bytes = slabs * slab_bytes(bits);
  const int* counts = np.data_ptr<int>();

  // Sort by group (ascending), then count (descending); equal keys keep channel order. A tile
  // never crosses a group or a count.
  const int64_t per_group = C / groups;
  const auto group_of = [&](int64_t ch) { return ch / per_group; };
  std::vector<int64_t> order(static_cast<size_t>(C));
  std::iota(order.begin(), order.end(), int64_t{0});
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    return group_of(a) != group_of(b) ? group_of(a) < group_of(b) : counts[a] > counts[b];
  });
  std::vector<Tile> tiles;
  for (int64_t i = 0; i < C;) {
    int64_t j = i;
    while (j < C && counts[order[j]] == counts[order[i]] && group_of(order[j]) == group_of(order[i])) ++j;
    for (int64_t first = i; first < j; first += kTileN) {
      tiles.push_back({counts[order[i]], first, static_cast<int>(std::min<int64_t>(kTileN, j - first))});
    }
    i = j;
  }
  const int64_t num_tiles = static_cast<int64_t>(tiles.size());
  std::vector<int64_t> offsets(static_cast<size_t>(num_tiles + 1), 0);
  for (int64_t t = 0; t < num_tiles; ++t) offsets[t + 1] = offsets[t] + tiles[t].points;
  const int64_t num_blocks = offsets[num_tiles];
  TORCH_CHECK(num_blocks <= std::numeric_limits<int32_t>::max(), "mpq::pack_multipoint: the packed weight would have ",
              num_blocks, " blocks, more than int32 holds");

  // NB: nibble 8 is code 0, so 4-bit storage starts as 0x88 (the padding rows and columns).
  auto packed = at::full({num_blocks, slabs, slab_bytes(bits)}, bits == 4 ? 0x88 : 0, c.options().dtype(at::kByte));
  auto packed_scales = at::zeros({num_blocks, kTileN}, s.options());
  auto perm = at::full({num_tiles * kTileN}, -1, np.options());
  auto tile_offsets = at::empty({num_tiles + 1}, np.options());
  auto row_sums = at::zeros({num_tiles * kTileN}, s.options());
  for (int64_t t = 0; t <= num_tiles; ++t) tile_offsets.data_ptr<int>()[t] = static_cast<int>(offsets[t]);

  const int8_t* cp = c.data_ptr<int8_t>();
  const float* sp = s.data_ptr<float>();
  uint8_t* out = packed.data_ptr<uint8_t>();
  float* out_scales = packed_scales.data_ptr<float>();
  int* out_perm = perm.data_ptr<int>();
  float* out_sums = row_sums.data_ptr<float>();
  at::parallel_for(0, num_tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const Tile& tile = tiles[t];
      for (int n = 0; n < tile.rows; ++n) {
        const int64_t ch = order[tile.first + n], r = t * kTileN + n;
        out_perm[r] = static_cast<int>(ch);
        double row_sum = 0.0;
        for (int p = 0; p < tile.points; ++p) {
          const int64_t block = offsets[t] + p;
          const float scale = sp[ch * P + p];
          out_scales[block * kTileN + n] = scale;
          uint8_t* base = out + block * block_bytes;
          const int8_t* q = cp + (ch * P + p) * D;
          int64_t code_sum = 0;
          for (int64_t k = 0; k < D; ++k) {
            store_code(base, bits, n, k, q[k]);
            code_sum += q[k];
          }
          row_sum += static_cast<double>(scale) * static_cast<double>(code_sum);
        }
        out_sums[r] = static_cast<float>(row_sum);
      }
    }
  });
  return {packed, packed_scales, perm, tile_offsets, row_sums};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> unpack_multipoint_cpu(
    const at::Tensor& packed, const at::Tensor& packed_scales, const at::Tensor& perm, const at::Tensor& tile_offsets,
    int64_t out_features, int64_t in_features, int64_t max_points) {
  check_unpack_multipoint_args(packed, packed_scales, perm, tile_offsets, out_features, in_features, max_points);
  const auto pk = packed.contiguous();
  const auto ps = packed_scales.contiguous();
  const auto pm = perm.contiguous();
  const auto off = tile_offsets.contiguous();
  const int bits = pk.size(2) == slab_bytes(4) ? 4 : 8;
  const int64_t C = out_features, P = max_points, D = in_features;
  const int64_t block_bytes = pk.size(1) * pk.size(2), num_tiles = pm.size(0) / kTileN;
  auto codes = at::zeros({C, P, D}, pk.options().dtype(at::kChar));
  auto scales = at::zeros({C, P}, ps.options());
  auto num_points = at::zeros({C}, pm.options());
  const uint8_t* src = pk.data_ptr<uint8_t>();
  const float* src_scales = ps.data_ptr<float>();
  const int* p_perm = pm.data_ptr<int>();
  const int* p_off = off.data_ptr<int>();
  int8_t* out_codes = codes.data_ptr<int8_t>();
  float* out_scales = scales.data_ptr<float>();
  int* out_points = num_points.data_ptr<int>();
  at::parallel_for(0, num_tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int points = p_off[t + 1] - p_off[t];
      for (int n = 0; n < kTileN; ++n) {
        const int64_t ch = p_perm[t * kTileN + n];
        if (ch < 0) continue;
        out_points[ch] = points;
        for (int p = 0; p < points; ++p) {
          const int64_t block = p_off[t] + p;
          out_scales[ch * P + p] = src_scales[block * kTileN + n];
          const uint8_t* base = src + block * block_bytes;
          int8_t* q = out_codes + (ch * P + p) * D;
          for (int64_t k = 0; k < D; ++k) q[k] = static_cast<int8_t>(load_code(base, bits, n, k));
        }
      }
    }
  });
  return {codes, scales, num_points};
}

at::Tensor multipoint_linear_packed_cpu(const at::Tensor& input, const at::Tensor& packed,
                                        const at::Tensor& packed_scales, const at::Tensor& perm,
                                        const at::Tensor& tile_offsets, const at::Tensor& row_sums,
                                        int64_t out_features, const c10::optional<at::Tensor>& bias,
                                        const c10::optional<at::Tensor>& act_qparams, c10::string_view kernel) {
  constexpr const char* op = "mpq::multipoint_linear_packed";
  check_multipoint_linear_packed_args(input, packed, packed_scales, perm, tile_offsets, row_sums, out_features, bias,
                                      act_qparams, kernel);
  if (act_qparams.has_value()) {  // on the CPU here (check_bias_and_act): name this op in the error
    const auto p = act_qparams->to(at::kDouble).contiguous();
    const double* v = p.data_ptr<double>();
    check_act_qparams_values(op, v[0], v[1], v[2], v[3]);
  }
  const int64_t max_points = tile_offsets.size(0) > 1 ? at::diff(tile_offsets).max().item<int64_t>() : 0;
  const auto [codes, scales, num_points] = unpack_multipoint_cpu(packed, packed_scales, perm, tile_offsets,
                                                                 out_features, input.size(-1), max_points);
  return multipoint_linear_cpu(input, codes, scales, num_points, bias, act_qparams);
}

at::Tensor multipoint_conv2d_packed_cpu(
    const at::Tensor& input, const at::Tensor& packed, const at::Tensor& packed_scales, const at::Tensor& perm,
    const at::Tensor& tile_offsets, const at::Tensor& row_sums, int64_t out_channels, at::IntArrayRef kernel_size,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& act_qparams, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, c10::string_view kernel) {
  const auto args = check_multipoint_conv2d_packed_args(input, packed, packed_scales, perm, tile_offsets, row_sums,
                                                        out_channels, kernel_size, bias, act_qparams, stride, padding,
                                                        dilation, groups, kernel);
  if (act_qparams.has_value()) {  // on the CPU here (check_bias_and_act): name this op in the error
    const auto p = act_qparams->to(at::kDouble).contiguous();
    const double* v = p.data_ptr<double>();
    check_act_qparams_values("mpq::multipoint_conv2d_packed", v[0], v[1], v[2], v[3]);
  }
  const int64_t max_points = tile_offsets.size(0) > 1 ? at::diff(tile_offsets).max().item<int64_t>() : 0;
  const auto [codes, scales, num_points] = unpack_multipoint_cpu(packed, packed_scales, perm, tile_offsets,
                                                                 out_channels, args.in_features, max_points);
  // Columns (kh, kw, c) back to the module's codes [C_out, P, C_in/groups, kh, kw].
  const auto conv_codes = codes.view({out_channels, max_points, kernel_size[0], kernel_size[1], input.size(1) / groups})
                              .permute({0, 1, 4, 2, 3});
  return multipoint_conv2d_cpu(input, conv_codes, scales, num_points, bias, act_qparams, stride, padding, dilation,
                               groups);
}

}  // namespace mpq

TORCH_LIBRARY_IMPL(mpq, CPU, m) {
  m.impl("pack_multipoint", &mpq::pack_multipoint_cpu);
  m.impl("unpack_multipoint", &mpq::unpack_multipoint_cpu);
  m.impl("multipoint_linear_packed", &mpq::multipoint_linear_packed_cpu);
  m.impl("multipoint_conv2d_packed", &mpq::multipoint_conv2d_packed_cpu);
}
