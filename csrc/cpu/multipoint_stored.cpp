// The stored form of a multipoint weight (what files hold) and the layer ops that run on it.
//
// Stored form: only the points in use, channel-major (channel j's points k = 0..n_j-1 in a row),
// each point's D codes bit-packed at w_bits bits (code i at bits i*w_bits.. of the row, LSB
// first, two's complement), plus one float32 scale per point and the point counts.
//
// CPU kernels of the stored-form layers:
// - int8 activations (act_qparams with at most 256 integer levels, float32 input): the points are
//   rows of one "expanded" int8 layer run by oneDNN's int8 convolution / inner product (VNNI and
//   AMX where the CPU has them; torch.ops.onednn, as PyTorch's own x86 int8 path) with float32
//   output scaled by activation scale x point scale; a second pass adds each channel's extra
//   points into its first (the paper's "expanded layer whose extra outputs are summed back").
// - float activations (float32): the dense weight sum_k a_k q_k, decoded once.
// - anything else (float64, float16/bfloat16 on the CPU): the reference ops on the unpacked weight.
// The prepared forms (oneDNN's prepacked weight, the decoded dense weight) are made once per
// weight and kept in a process-wide cache keyed by the stored tensors (weak references and
// version counters: a freed or modified weight is never served stale), so a TorchScript module,
// a C++ program and eager Python all prepare once and never per forward; files never hold them.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/StorageImpl.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <memory>
#include <mutex>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "checks.h"
#include "cpu/multipoint_layers.h"

namespace mpq {

// ---- stored form <-> codes [C, P, D] -------------------------------------------------------------

int64_t stored_row_bytes(int64_t D, int64_t w_bits) { return (D * w_bits + 7) / 8; }

namespace {

void check_w_bits(const char* op, int64_t w_bits) {
  TORCH_CHECK(w_bits >= 2 && w_bits <= 8, op, ": expected w_bits in 2..8, got ", w_bits);
}

// Byte index and shift of code i's lowest bit, for every code of a row of D codes.
std::pair<at::Tensor, at::Tensor> code_bit_positions(int64_t D, int64_t w_bits, const at::Device& device) {
  const auto pos = at::arange(D, at::TensorOptions().dtype(at::kLong).device(device)) * w_bits;
  return {at::floor_divide(pos, 8), at::remainder(pos, 8).to(at::kInt)};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> pack_points(const at::Tensor& codes, const at::Tensor& scales,
                                               const at::Tensor& num_points, int64_t w_bits) {
  const char* op = "mpq::pack_points";
  TORCH_CHECK(codes.dim() >= 3, op, ": expected codes of shape [C, P, ...] with at least 3 dimensions, got ",
              codes.sizes());
  check_multipoint_weight(op, codes, scales, num_points, codes.dim());
  check_w_bits(op, w_bits);
  const int64_t C = codes.size(0), P = codes.size(1), D = codes.numel() / std::max<int64_t>(1, C * P);
  const auto keep = at::arange(P, num_points.options()).unsqueeze(0) < num_points.unsqueeze(1);
  const auto rows = codes.reshape({C, P, D}).index({keep});  // [T, D], channel-major
  const auto point_scales = scales.index({keep}).contiguous();
  const int64_t lo = -(int64_t(1) << (w_bits - 1)), hi = (int64_t(1) << (w_bits - 1)) - 1;
  if (rows.numel() > 0) {
    const auto mn = rows.min().item<int64_t>(), mx = rows.max().item<int64_t>();
    TORCH_CHECK(mn >= lo && mx <= hi, op, ": expected the codes of the points in use in ", lo, "..", hi,
                " (w_bits ", w_bits, "), got values in ", mn, "..", mx);
  }
  const int64_t T = rows.size(0), B = stored_row_bytes(D, w_bits);
  auto [byte, shift] = code_bit_positions(D, w_bits, codes.device());
  const auto u = at::bitwise_and(rows.to(at::kInt), (1 << w_bits) - 1);
  const auto shifted = at::bitwise_left_shift(u, shift.unsqueeze(0));  // < 2^15
  auto acc = at::zeros({T, B + 1}, rows.options().dtype(at::kInt));
  acc.index_add_(1, byte, at::bitwise_and(shifted, 0xFF));  // the bits never overlap: add == or
  acc.index_add_(1, byte + 1, at::bitwise_right_shift(shifted, 8));
  return {acc.narrow(1, 0, B).to(at::kByte).contiguous(), point_scales};
}

namespace {

void check_stored(const char* op, const at::Tensor& point_codes, const at::Tensor& point_scales,
                  const at::Tensor& num_points, int64_t w_bits, int64_t D) {
  check_w_bits(op, w_bits);
  TORCH_CHECK(point_codes.scalar_type() == at::kByte && point_codes.dim() == 2, op,
              ": expected point_codes to be uint8 [points, bytes], got ", point_codes.scalar_type(),
              point_codes.sizes());
  TORCH_CHECK(point_scales.scalar_type() == at::kFloat && point_scales.dim() == 1 &&
                  point_scales.size(0) == point_codes.size(0),
              op, ": expected point_scales float32 [", point_codes.size(0), "], got ", point_scales.scalar_type(),
              point_scales.sizes());
  TORCH_CHECK(num_points.scalar_type() == at::kInt && num_points.dim() == 1, op,
              ": expected num_points to be int32 [C], got ", num_points.scalar_type(), num_points.sizes());
  TORCH_CHECK(point_codes.device() == point_scales.device() && point_codes.device() == num_points.device(), op,
              ": expected point_codes, point_scales and num_points on one device");
  TORCH_CHECK(D >= 0 && point_codes.size(1) == stored_row_bytes(D, w_bits), op, ": expected point_codes rows of ",
              stored_row_bytes(D, w_bits), " bytes (", D, " codes of ", w_bits, " bits), got ", point_codes.size(1));
  const int64_t total = num_points.numel() ? num_points.sum().item<int64_t>() : 0;  // NB: syncs on CUDA
  TORCH_CHECK(total == point_codes.size(0), op, ": expected as many stored points as sum(num_points) = ", total,
              ", got ", point_codes.size(0));
  if (num_points.numel()) {
    TORCH_CHECK(num_points.min().item<int64_t>() >= 0, op, ": expected num_points >= 0");
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> unpack_points(const at::Tensor& point_codes, const at::Tensor& point_scales,
                                                 const at::Tensor& num_points, int64_t w_bits, int64_t D,
                                                 int64_t max_points) {
  const char* op = "mpq::unpack_points";
  check_stored(op, point_codes, point_scales, num_points, w_bits, D);
  const int64_t C = num_points.size(0), T = point_codes.size(0);
  TORCH_CHECK(max_points >= 0 && (C == 0 || num_points.max().item<int64_t>() <= max_points), op,
              ": expected num_points <= max_points (", max_points, ")");
  auto [byte, shift] = code_bit_positions(D, w_bits, point_codes.device());
  const auto bytes = at::constant_pad_nd(point_codes.to(at::kInt), {0, 1});  // [T, B + 1]
  const auto two = at::bitwise_or(bytes.index_select(1, byte),
                                  at::bitwise_left_shift(bytes.index_select(1, byte + 1), 8));
  auto v = at::bitwise_and(at::bitwise_right_shift(two, shift.unsqueeze(0)), (1 << w_bits) - 1);
  v = at::where(v >= (1 << (w_bits - 1)), v - (1 << w_bits), v).to(at::kChar);  // [T, D]
  auto codes = at::zeros({C, max_points, D}, point_codes.options().dtype(at::kChar));
  auto scales = at::zeros({C, max_points}, point_scales.options());
  const auto keep = at::arange(max_points, num_points.options()).unsqueeze(0) < num_points.unsqueeze(1);
  if (T > 0) {
    codes.index_put_({keep}, v);
    scales.index_put_({keep}, point_scales);
  }
  return {codes, scales};
}

// ---- the cache of prepared weights ---------------------------------------------------------------

namespace {

// A tensor as seen when a prepared form was made: its storage (weakly), offset and version.
struct Seen {
  c10::weak_intrusive_ptr<c10::StorageImpl> storage{c10::make_intrusive<c10::StorageImpl>(
      c10::StorageImpl::use_byte_size_t(), 0, at::DataPtr(), nullptr, false)};
  const void* storage_key = nullptr;
  int64_t offset = -1;
  int64_t version = -1;

  static int64_t version_of(const at::Tensor& t) {
    return t.is_inference() ? 0 : static_cast<int64_t>(t.unsafeGetTensorImpl()->version_counter().current_version());
  }
  static Seen of(const at::Tensor& t) {
    Seen s;
    if (!t.defined()) return s;
    s.storage = c10::weak_intrusive_ptr<c10::StorageImpl>(t.storage().getWeakStorageImpl());
    s.storage_key = t.storage().unsafeGetStorageImpl();
    s.offset = t.storage_offset();
    s.version = version_of(t);
    return s;
  }
  bool matches(const at::Tensor& t) const {
    if (!t.defined()) return storage_key == nullptr;
    if (storage_key != t.storage().unsafeGetStorageImpl() || offset != t.storage_offset()) return false;
    auto alive = storage.lock();  // not expired: the address was not reused by another tensor
    return alive && alive.get() == storage_key && version == version_of(t);
  }
};

struct Entry {
  std::vector<Seen> inputs;
  std::vector<double> values;  // act_qparams, geometry
  std::shared_ptr<void> prepared;
};

class PreparedCache {
 public:
  template <typename T, typename Make>
  std::shared_ptr<T> get(const std::vector<at::Tensor>& tensors, const std::vector<double>& values, Make make) {
    const void* key = tensors[0].storage().unsafeGetStorageImpl();
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = entries_.find(key);
      if (it != entries_.end() && fits(it->second, tensors, values)) {
        return std::static_pointer_cast<T>(it->second.prepared);
      }
    }
    Entry e;  // made outside the lock: preparing may take a while
    for (const auto& t : tensors) e.inputs.push_back(Seen::of(t));
    e.values = values;
    auto prepared = std::make_shared<T>(make());
    e.prepared = prepared;
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = entries_.begin(); it != entries_.end();) {  // drop the entries of freed weights
      it = it->second.inputs[0].storage.expired() ? entries_.erase(it) : std::next(it);
    }
    entries_[key] = std::move(e);
    return prepared;
  }

 private:
  static bool fits(const Entry& e, const std::vector<at::Tensor>& tensors, const std::vector<double>& values) {
    if (e.inputs.size() != tensors.size() || e.values != values) return false;
    for (size_t i = 0; i < tensors.size(); ++i) {
      if (!e.inputs[i].matches(tensors[i])) return false;
    }
    return true;
  }
  std::mutex mutex_;
  std::unordered_map<const void*, Entry> entries_;
};

PreparedCache& cache() {
  static PreparedCache c;
  return c;
}

// ---- int8 activations ----------------------------------------------------------------------------

struct ActQuant {
  double scale, zero_point, qmin, qmax;
};

ActQuant read_act_qparams(const char* op, const at::Tensor& act_qparams) {
  const auto p = act_qparams.to(at::kCPU, at::kDouble);
  const double* v = p.data_ptr<double>();
  check_act_qparams_values(op, v[0], v[1], v[2], v[3]);
  return {v[0], v[1], v[2], v[3]};
}

// Whether the int8 kernels compute this layer: integer zero point and range, at most 256 levels.
bool int8_fits(const ActQuant& q) {
  auto integral = [](double v) { return std::nearbyint(v) == v; };
  return integral(q.zero_point) && integral(q.qmin) && integral(q.qmax) && q.qmax - q.qmin <= 255.0;
}

// u = clamp(round_half_even(x / s) + zp, qmin, qmax) - qmin as uint8 (the levels shifted to 0..255,
// zero point zp - qmin): the levels of fake_quantize_activation, exactly.
__attribute__((target_clones("avx512f", "avx2", "default"))) void quantize_levels(
    const float* x, uint8_t* out, int64_t n, float scale, float zp, float qmin, float qmax) {
  // Clamping x/s to [qmin - zp - 1, qmax - zp + 1] before rounding changes no level and keeps
  // |v| < 2^22, where adding and subtracting 1.5 * 2^23 rounds half to even.
  const float lo = qmin - zp - 1.0f, hi = qmax - zp + 1.0f, magic = 12582912.0f;
  for (int64_t i = 0; i < n; ++i) {
    float v = x[i] / scale;
    v = v < lo ? lo : (v > hi ? hi : v);
    // NB: SSE/AVX arithmetic has no wider intermediates and, without -ffast-math, no reassociation.
    float q = ((v + magic) - magic) + zp;
    q = q < qmin ? qmin : (q > qmax ? qmax : q);
    out[i] = static_cast<uint8_t>(static_cast<int>(q - qmin));
  }
}

at::Tensor quantize_input(const at::Tensor& input, const ActQuant& q, at::MemoryFormat format) {
  const auto x = input.contiguous(format);
  auto out = at::empty(x.sizes(), x.options().dtype(at::kByte), format);
  const float* src = x.data_ptr<float>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  const float s = static_cast<float>(q.scale);
  at::parallel_for(0, x.numel(), 1 << 14, [&](int64_t b, int64_t e) {
    quantize_levels(src + b, dst + b, e - b, s, float(q.zero_point), float(q.qmin), float(q.qmax));
  });
  return out;
}

// The expanded int8 layer of a multipoint weight, prepared once.
struct PreparedInt8 {
  at::Tensor weight;         // oneDNN's prepacked int8 weight [groups * R, C_in/g, kh, kw] or [R, K]
  at::Tensor w_scales;       // float32 [groups * R]: the point scales (1 on padding rows)
  at::Tensor w_zero_points;  // int64 zeros
  at::Tensor bias;           // float32 [groups * R]: the channel's bias on its first row, or undefined
  at::Tensor primary;        // int64 [C]: the row of each channel's first point
  at::Tensor extra_row, extra_channel;  // int64 [E]: rows of the further points and their channels
  int64_t rows = 0;          // groups * R
  bool identity = false;     // one row per channel, in channel order: no reduction needed
};

// Rows of the expanded layer: per group, its channels' first points, then their further points,
// then zero rows up to the largest group (oneDNN's groups all have R output channels).
PreparedInt8 expand_points(const at::Tensor& point_codes, const at::Tensor& point_scales, const at::Tensor& num_points,
                           int64_t w_bits, at::IntArrayRef code_shape, const c10::optional<at::Tensor>& bias,
                           int64_t groups) {
  const int64_t C = num_points.size(0), D = c10::multiply_integers(code_shape);
  const int64_t P = C ? std::max<int64_t>(1, num_points.max().item<int64_t>()) : 1;
  auto [codes, scales] = unpack_points(point_codes, point_scales, num_points, w_bits, D, P);
  const auto n = num_points.contiguous();
  const int* counts = n.data_ptr<int>();
  const int64_t Cg = C / groups;
  int64_t R = 0;
  for (int64_t g = 0; g < groups; ++g) {
    int64_t r = Cg;
    for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) r += std::max(0, counts[c] - 1);
    R = std::max(R, r);
  }
  std::vector<int64_t> row_channel(groups * R, -1), row_point(groups * R, 0), extra_row, extra_channel;
  std::vector<int64_t> primary(C);
  for (int64_t g = 0; g < groups; ++g) {
    int64_t next = g * R + Cg;
    for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
      primary[c] = g * R + (c - g * Cg);
      row_channel[primary[c]] = c;
      for (int64_t k = 1; k < counts[c]; ++k, ++next) {
        row_channel[next] = c;
        row_point[next] = k;
        extra_row.push_back(next);
        extra_channel.push_back(c);
      }
    }
  }
  const auto long_opts = at::TensorOptions().dtype(at::kLong);
  const auto rc = at::tensor(row_channel, long_opts), rp = at::tensor(row_point, long_opts);
  const auto used = rc >= 0;
  const auto safe_c = rc.clamp_min(0);
  auto rows_codes = codes.index({safe_c, rp}) * used.unsqueeze(1).to(at::kChar);  // [rows, D]
  auto rows_scales = at::where(used, scales.index({safe_c, rp}), at::ones({}, scales.options()));
  // A channel without points (num_points 0) keeps its zero codes on its first row: it outputs its bias.
  PreparedInt8 p;
  p.rows = groups * R;
  std::vector<int64_t> wshape = {p.rows};
  for (auto s : code_shape) wshape.push_back(s);
  p.weight = rows_codes.reshape(wshape).contiguous();
  p.w_scales = rows_scales.to(at::kFloat).contiguous();
  p.w_zero_points = at::zeros({p.rows}, long_opts);
  if (bias.has_value()) {
    auto b = at::zeros({p.rows}, at::kFloat);
    b.index_put_({at::tensor(primary, long_opts)}, bias->to(at::kFloat));
    p.bias = b;
  }
  p.primary = at::tensor(primary, long_opts);
  p.extra_row = at::tensor(extra_row, long_opts);
  p.extra_channel = at::tensor(extra_channel, long_opts);
  p.identity = groups * R == C && extra_row.empty();
  return p;
}

// y[p, c] = out[p, primary[c]] + sum of out[p, extra_row[e]] over extra_channel[e] == c, for every
// pixel (row) p of out [pixels, rows] (channels last).
void sum_points(const at::Tensor& out, const PreparedInt8& p, int64_t C, int64_t pixels, float* y) {
  const float* src = out.data_ptr<float>();
  const int64_t rows = p.rows, E = p.extra_row.numel();
  const int64_t* prim = p.primary.data_ptr<int64_t>();
  const int64_t* er = p.extra_row.data_ptr<int64_t>();
  const int64_t* ec = p.extra_channel.data_ptr<int64_t>();
  at::parallel_for(0, pixels, 64, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const float* o = src + i * rows;
      float* d = y + i * C;
      for (int64_t c = 0; c < C; ++c) d[c] = o[prim[c]];
      for (int64_t k = 0; k < E; ++k) d[ec[k]] += o[er[k]];
    }
  });
}

c10::OperatorHandle onednn_op(const char* name, const char* overload) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, overload);
}

at::Tensor call_qconv(const at::Tensor& qx, double x_scale, int64_t x_zp, const PreparedInt8& p,
                      at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  static auto op = onednn_op("onednn::qconv2d_pointwise", "")
                       .typed<at::Tensor(at::Tensor, double, int64_t, at::Tensor, at::Tensor, at::Tensor,
                                         std::optional<at::Tensor>, torch::List<int64_t>, torch::List<int64_t>,
                                         torch::List<int64_t>, int64_t, double, int64_t,
                                         std::optional<at::ScalarType>, c10::string_view,
                                         torch::List<std::optional<at::Scalar>>, std::optional<c10::string_view>)>();
  std::optional<at::Tensor> bias;
  if (p.bias.defined()) bias = p.bias;
  return op.call(qx, x_scale, x_zp, p.weight, p.w_scales, p.w_zero_points, bias, torch::List<int64_t>(stride.vec()),
                 torch::List<int64_t>(padding.vec()), torch::List<int64_t>(dilation.vec()), groups, 1.0, 0,
                 at::kFloat, "none", torch::List<std::optional<at::Scalar>>(), std::nullopt);
}

at::Tensor call_qlinear(const at::Tensor& qx, double x_scale, int64_t x_zp, const PreparedInt8& p) {
  static auto op = onednn_op("onednn::qlinear_pointwise", "")
                       .typed<at::Tensor(at::Tensor, double, int64_t, at::Tensor, at::Tensor, at::Tensor,
                                         std::optional<at::Tensor>, double, int64_t, std::optional<at::ScalarType>,
                                         c10::string_view, torch::List<std::optional<at::Scalar>>,
                                         c10::string_view)>();
  std::optional<at::Tensor> bias;
  if (p.bias.defined()) bias = p.bias;
  return op.call(qx, x_scale, x_zp, p.weight, p.w_scales, p.w_zero_points, bias, 1.0, 0, at::kFloat, "none",
                 torch::List<std::optional<at::Scalar>>(), "");
}

std::vector<double> qparam_values(const ActQuant& q) { return {q.scale, q.zero_point, q.qmin, q.qmax}; }

std::vector<at::Tensor> weight_tensors(const at::Tensor& point_codes, const at::Tensor& point_scales,
                                       const at::Tensor& num_points, const c10::optional<at::Tensor>& bias) {
  return {point_codes, point_scales, num_points, bias.has_value() ? *bias : at::Tensor()};
}

// ---- float activations ---------------------------------------------------------------------------

struct PreparedDense {
  at::Tensor weight;  // float32 [C, ...]
};

at::Tensor dense_from_stored(const at::Tensor& point_codes, const at::Tensor& point_scales,
                             const at::Tensor& num_points, int64_t w_bits, at::IntArrayRef code_shape,
                             at::ScalarType dtype) {
  const int64_t C = num_points.size(0), D = c10::multiply_integers(code_shape);
  const int64_t P = C ? std::max<int64_t>(1, num_points.max().item<int64_t>()) : 1;
  auto [codes, scales] = unpack_points(point_codes, point_scales, num_points, w_bits, D, P);
  std::vector<int64_t> shape = {C, P};
  for (auto s : code_shape) shape.push_back(s);
  return dequantize_multipoint_cpu(codes.reshape(shape), scales, num_points, dtype);
}

bool use_int8(const at::Tensor& input, const c10::optional<at::Tensor>& act_qparams, const ActQuant& q) {
  return act_qparams.has_value() && input.scalar_type() == at::kFloat && int8_fits(q) && input.numel() > 0;
}

}  // namespace

at::Tensor multipoint_linear_stored_cpu(const at::Tensor& input, const at::Tensor& point_codes,
                                        const at::Tensor& point_scales, const at::Tensor& num_points, int64_t w_bits,
                                        int64_t in_features, const c10::optional<at::Tensor>& bias,
                                        const c10::optional<at::Tensor>& act_qparams) {
  const char* op = "mpq::multipoint_linear_stored";
  check_stored(op, point_codes, point_scales, num_points, w_bits, in_features);
  const int64_t C = num_points.size(0);
  check_bias_and_act(op, input, bias, act_qparams, C);
  TORCH_CHECK(input.dim() >= 1 && input.size(-1) == in_features, op, ": expected input [..., ", in_features,
              "], got ", input.sizes());
  TORCH_CHECK(input.device() == point_codes.device(), op, ": expected input on ", point_codes.device());
  ActQuant q{1.0, 0.0, 0.0, 1.0};
  if (act_qparams.has_value()) q = read_act_qparams(op, *act_qparams);
  const std::vector<int64_t> code_shape = {in_features};
  if (use_int8(input, act_qparams, q) && C > 0) {
    auto p = cache().get<PreparedInt8>(weight_tensors(point_codes, point_scales, num_points, bias),
                                       {0.0, double(w_bits), double(in_features)}, [&] {
      auto e = expand_points(point_codes, point_scales, num_points, w_bits, code_shape, bias, 1);
      static auto prepack = onednn_op("onednn::qlinear_prepack", "")
                                .typed<at::Tensor(at::Tensor, std::optional<torch::List<int64_t>>)>();
      e.weight = prepack.call(e.weight, std::nullopt);
      return e;
    });
    const auto x2 = input.reshape({-1, in_features});
    const auto qx = quantize_input(x2, q, at::MemoryFormat::Contiguous);
    const auto out = call_qlinear(qx, q.scale, int64_t(q.zero_point - q.qmin), *p);
    std::vector<int64_t> shape(input.sizes().begin(), input.sizes().end() - 1);
    shape.push_back(C);
    if (p->identity) return out.reshape(shape);
    auto y = at::empty({x2.size(0), C}, out.options());
    sum_points(out, *p, C, x2.size(0), y.data_ptr<float>());
    return y.reshape(shape);
  }
  if (input.scalar_type() == at::kFloat) {
    auto p = cache().get<PreparedDense>(weight_tensors(point_codes, point_scales, num_points, bias),
                                        {1.0, double(w_bits), double(in_features)}, [&] {
      return PreparedDense{dense_from_stored(point_codes, point_scales, num_points, w_bits, code_shape, at::kFloat)};
    });
    const auto x = act_qparams.has_value()
                       ? at::clamp(at::round(input / q.scale) + q.zero_point, q.qmin, q.qmax).sub_(q.zero_point).mul_(q.scale)
                       : input;
    return at::linear(x, p->weight, bias.has_value() ? c10::optional<at::Tensor>(bias->to(at::kFloat)) : c10::nullopt);
  }
  const int64_t P = C ? std::max<int64_t>(1, num_points.max().item<int64_t>()) : 1;
  auto [codes, scales] = unpack_points(point_codes, point_scales, num_points, w_bits, in_features, P);
  return multipoint_linear_cpu(input, codes, scales, num_points, bias, act_qparams);
}

at::Tensor multipoint_conv2d_stored_cpu(const at::Tensor& input, const at::Tensor& point_codes,
                                        const at::Tensor& point_scales, const at::Tensor& num_points, int64_t w_bits,
                                        at::IntArrayRef code_shape, const c10::optional<at::Tensor>& bias,
                                        const c10::optional<at::Tensor>& act_qparams, at::IntArrayRef stride,
                                        at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const char* op = "mpq::multipoint_conv2d_stored";
  TORCH_CHECK(code_shape.size() == 3, op, ": expected code_shape [C_in/groups, kh, kw], got ", code_shape);
  check_stored(op, point_codes, point_scales, num_points, w_bits, c10::multiply_integers(code_shape));
  const int64_t C = num_points.size(0);
  TORCH_CHECK(groups >= 1 && C % groups == 0, op, ": expected groups (", groups, ") to divide the ", C,
              " output channels");
  const int64_t P = C ? std::max<int64_t>(1, num_points.max().item<int64_t>()) : 1;
  ActQuant q{1.0, 0.0, 0.0, 1.0};
  if (act_qparams.has_value()) q = read_act_qparams(op, *act_qparams);
  const bool int8 = use_int8(input, act_qparams, q) && C > 0;
  const bool dense = !int8 && input.scalar_type() == at::kFloat && C > 0;
  if (!int8 && !dense) {  // the reference path, with its own complete checks
    auto [codes, scales] = unpack_points(point_codes, point_scales, num_points, w_bits,
                                         c10::multiply_integers(code_shape), P);
    std::vector<int64_t> shape = {C, P};
    for (auto s : code_shape) shape.push_back(s);
    return multipoint_conv2d_cpu(input, codes.reshape(shape), scales, num_points, bias, act_qparams, stride, padding,
                                 dilation, groups)
        .contiguous(at::MemoryFormat::ChannelsLast);
  }
  // The checks of the reference op, on a zero-size stand-in of the codes (no unpacking per call).
  std::vector<int64_t> shape = {C, 0};
  for (auto s : code_shape) shape.push_back(s);
  const auto out_shape = check_multipoint_conv2d_args(
      input, at::empty(shape, point_codes.options().dtype(at::kChar)), at::empty({C, 0}, point_scales.options()),
      at::zeros({C}, num_points.options()), bias, act_qparams, stride, padding, dilation, groups);
  std::vector<double> geometry = {double(int8), double(w_bits), double(groups)};
  for (auto v : {stride, padding, dilation}) geometry.insert(geometry.end(), v.begin(), v.end());
  if (dense) {
    auto p = cache().get<PreparedDense>(weight_tensors(point_codes, point_scales, num_points, bias), geometry, [&] {
      return PreparedDense{dense_from_stored(point_codes, point_scales, num_points, w_bits, code_shape, at::kFloat)};
    });
    const auto x = act_qparams.has_value()
                       ? at::clamp(at::round(input / q.scale) + q.zero_point, q.qmin, q.qmax).sub_(q.zero_point).mul_(q.scale)
                       : input;
    return at::conv2d(x, p->weight, bias.has_value() ? c10::optional<at::Tensor>(bias->to(at::kFloat)) : c10::nullopt,
                      stride, padding, dilation, groups)
        .contiguous(at::MemoryFormat::ChannelsLast);
  }
  auto values = qparam_values(q);
  geometry.insert(geometry.end(), values.begin(), values.end());
  auto p = cache().get<PreparedInt8>(weight_tensors(point_codes, point_scales, num_points, bias), geometry, [&] {
    auto e = expand_points(point_codes, point_scales, num_points, w_bits, code_shape, bias, groups);
    static auto prepack = onednn_op("onednn::qconv_prepack", "")
                              .typed<at::Tensor(at::Tensor, at::Tensor, double, int64_t, torch::List<int64_t>,
                                                torch::List<int64_t>, torch::List<int64_t>, int64_t,
                                                std::optional<torch::List<int64_t>>)>();
    e.weight = prepack.call(e.weight, e.w_scales, q.scale, int64_t(q.zero_point - q.qmin),
                            torch::List<int64_t>(stride.vec()), torch::List<int64_t>(padding.vec()),
                            torch::List<int64_t>(dilation.vec()), groups, std::nullopt);
    return e;
  });
  const auto qx = quantize_input(input, q, at::MemoryFormat::ChannelsLast);
  const auto out = call_qconv(qx, q.scale, int64_t(q.zero_point - q.qmin), *p, stride, padding, dilation, groups);
  if (p->identity) return out;
  auto y = at::empty(out_shape, out.options(), at::MemoryFormat::ChannelsLast);
  const auto outc = out.contiguous(at::MemoryFormat::ChannelsLast);
  sum_points(outc, *p, C, out_shape[0] * out_shape[2] * out_shape[3], y.data_ptr<float>());
  return y;
}

// Other backends (CUDA): unpack, then that backend's reference op (the fused GPU kernels run on
// the packed layout of pack_multipoint instead; python/mpq/nn/modules.py).
namespace {
std::tuple<at::Tensor, at::Tensor> unpack_all(const at::Tensor& point_codes, const at::Tensor& point_scales,
                                              const at::Tensor& num_points, int64_t w_bits, int64_t D) {
  const int64_t C = num_points.size(0);
  const int64_t P = C ? std::max<int64_t>(1, num_points.max().item<int64_t>()) : 1;
  return unpack_points(point_codes, point_scales, num_points, w_bits, D, P);
}
}  // namespace

at::Tensor multipoint_linear_stored_any(const at::Tensor& input, const at::Tensor& point_codes,
                                        const at::Tensor& point_scales, const at::Tensor& num_points, int64_t w_bits,
                                        int64_t in_features, const c10::optional<at::Tensor>& bias,
                                        const c10::optional<at::Tensor>& act_qparams) {
  auto [codes, scales] = unpack_all(point_codes, point_scales, num_points, w_bits, in_features);
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("mpq::multipoint_linear", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&)>();
  return op.call(input, codes, scales, num_points, bias, act_qparams);
}

at::Tensor multipoint_conv2d_stored_any(const at::Tensor& input, const at::Tensor& point_codes,
                                        const at::Tensor& point_scales, const at::Tensor& num_points, int64_t w_bits,
                                        at::IntArrayRef code_shape, const c10::optional<at::Tensor>& bias,
                                        const c10::optional<at::Tensor>& act_qparams, at::IntArrayRef stride,
                                        at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK(code_shape.size() == 3, "mpq::multipoint_conv2d_stored: expected code_shape [C_in/groups, kh, kw], got ",
              code_shape);
  auto [codes, scales] = unpack_all(point_codes, point_scales, num_points, w_bits, c10::multiply_integers(code_shape));
  std::vector<int64_t> shape = {codes.size(0), codes.size(1)};
  for (auto s : code_shape) shape.push_back(s);
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("mpq::multipoint_conv2d", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&,
                                         at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t)>();
  return op.call(input, codes.reshape(shape), scales, num_points, bias, act_qparams, stride, padding, dilation, groups);
}

}  // namespace mpq

TORCH_LIBRARY_IMPL(mpq, CompositeExplicitAutograd, m) {
  m.impl("pack_points", &mpq::pack_points);
  m.impl("unpack_points", &mpq::unpack_points);
  m.impl("multipoint_linear_stored", &mpq::multipoint_linear_stored_any);
  m.impl("multipoint_conv2d_stored", &mpq::multipoint_conv2d_stored_any);
}

TORCH_LIBRARY_IMPL(mpq, CPU, m) {
  m.impl("multipoint_linear_stored", &mpq::multipoint_linear_stored_cpu);
  m.impl("multipoint_conv2d_stored", &mpq::multipoint_conv2d_stored_cpu);
}
