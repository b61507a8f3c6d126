// The layout rules for Python (schemas in csrc/registration.cpp): mpq::layout_constants, the
// constants of csrc/kernels/layout.h and packed_layout.h by name, and the predicates
// mpq::int8_levels_fit and mpq::packed_int8_fits. Registered for CompositeExplicitAutograd, so that
// they answer for every backend, and layout_constants (no tensor argument) at all.
#include <ATen/ATen.h>
#include <ATen/core/Dict.h>
#include <torch/library.h>

#include <string>

#include "kernels/layout.h"
#include "kernels/packed_layout.h"

namespace mpq {
namespace {

c10::Dict<std::string, int64_t> layout_constants() {
  int nibble_max_w_bits = 0;  // the widest codes that the packed layout stores as nibbles
  for (int b = layout::kMinWBits; b <= layout::kMaxWBits; ++b) {
    if (packed::storage_bits(b) == 4) nibble_max_w_bits = b;
  }
  c10::Dict<std::string, int64_t> out;
  // The multipoint weight and its stored form.
  out.insert("min_w_bits", layout::kMinWBits);
  out.insert("max_w_bits", layout::kMaxWBits);
  out.insert("max_points", layout::kMaxPoints);
  out.insert("scale_bits", layout::kScaleBits);
  out.insert("count_bits", layout::kCountBits);
  // int8 activations.
  out.insert("int8_levels", layout::kInt8Levels);
  // The packed weight of the fused CUDA kernels.
  out.insert("packed_format_version", packed::kFormatVersion);
  out.insert("tile_n", packed::kTileN);
  out.insert("slab_k", packed::kSlabK);
  out.insert("k_align", packed::kKAlign);
  out.insert("nibble_max_w_bits", nibble_max_w_bits);
  out.insert("slab_bytes_nibble", packed::slab_bytes(4));
  out.insert("slab_bytes_int8", packed::slab_bytes(8));
  out.insert("int8_max_k", packed::kInt8MaxK);
  return out;
}

// act_qparams float32[4] (any device) as doubles on the host: one read (a sync on a GPU).
void read_act_qparams(const char* op, const at::Tensor& act_qparams, double q[4]) {
  TORCH_CHECK(act_qparams.scalar_type() == at::kFloat && act_qparams.dim() == 1 && act_qparams.size(0) == 4, op,
              ": expected act_qparams to be float32[4] (scale, zero_point, qmin, qmax), got ",
              act_qparams.scalar_type(), act_qparams.sizes());
  const auto v = act_qparams.to(at::kCPU, at::kDouble).contiguous();
  for (int i = 0; i < 4; ++i) q[i] = v.data_ptr<double>()[i];
}

bool int8_levels_fit(const at::Tensor& act_qparams) {
  double q[4];
  read_act_qparams("mpq::int8_levels_fit", act_qparams, q);
  return layout::int8_levels_fit(q[0], q[1], q[2], q[3]);
}

bool packed_int8_fits(const at::Tensor& act_qparams, at::IntArrayRef code_shape) {
  constexpr const char* op = "mpq::packed_int8_fits";
  TORCH_CHECK(code_shape.size() == 1 || code_shape.size() == 3, op,
              ": expected code_shape [in_features] (Linear) or [C_in/groups, kh, kw] (Conv2d), got ", code_shape);
  int64_t d = 1;
  for (const int64_t v : code_shape) {
    TORCH_CHECK(v >= 0, op, ": expected code_shape without negative sizes, got ", code_shape);
    d *= v;
  }
  double q[4];
  read_act_qparams(op, act_qparams, q);
  return layout::packed_int8_fits(q, d, /*conv=*/code_shape.size() == 3, code_shape[0]);
}

}  // namespace
}  // namespace mpq

TORCH_LIBRARY_IMPL(mpq, CompositeExplicitAutograd, m) {
  m.impl("layout_constants", &mpq::layout_constants);
  m.impl("int8_levels_fit", &mpq::int8_levels_fit);
  m.impl("packed_int8_fits", &mpq::packed_int8_fits);
}
