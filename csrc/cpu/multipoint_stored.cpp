// The stored form of a multipoint weight (what files hold) and the layer ops that run on it.
//
// Stored form: only the points in use, channel-major (channel j's points k = 0..n_j-1 in a row),
// each point's D codes bit-packed at w_bits bits (code i at bits i*w_bits.. of the row, LSB
// first, two's complement), plus one float32 scale per point and the point counts.
//
// CPU kernels of the stored-form layers (path "int8", "dense" or, for Linear, "weight_only", or
// "auto": chosen per layer shape):
// - int8: the input quantized to uint8 in one pass; each channel's first point (with the bias) is
//   one oneDNN int8 convolution / inner product (VNNI and AMX where the CPU has them; the ops of
//   PyTorch's own x86 int8 path) with float32 output scaled by activation scale x point scale,
//   the further points a second one whose outputs are added into their channels (the paper's
//   "expanded layer whose extra outputs are summed back").
// - dense: the input fake-quantized in one pass, then the dense weight sum_k a_k q_k, decoded once.
// - weight_only (Linear): the input fake-quantized in one pass (if act_qparams), then
//   csrc/kernels/weight_only_linear.h on the codes kept packed (4-bit stays 4-bit), decoded in
//   registers per use: for few input rows the layer reads w_bits/32 of the float weight's bytes.
// - anything else (float64, float16/bfloat16 on the CPU): the reference ops on the unpacked weight.
// The prepared forms (oneDNN's prepacked weight, the decoded dense weight, the weight-only layout) are made once per
// weight and kept in a process-wide cache keyed by the stored tensors (weak references and
// version counters: a freed or modified weight is never served stale), so a TorchScript module,
// a C++ program and eager Python all prepare once and never per forward; files never hold them.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/StorageImpl.h>
#include <torch/library.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdlib>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <numeric>
#include <string>
#include <tuple>
#include <unordered_map>
#include <utility>
#include <vector>

#include "checks.h"
#include "cpu/multipoint_layers.h"
#include "kernels/activation_levels.h"
#include "kernels/depthwise.h"
#include "kernels/layout.h"
#include "kernels/weight_only_linear.h"

namespace mpq {

// ---- stored form <-> codes [C, P, D] -------------------------------------------------------------

int64_t stored_row_bytes(int64_t D, int64_t w_bits) { return layout::stored_row_bytes(D, w_bits); }

// Whether oneDNN's int8 kernels compute codes of w_bits bits exactly. Without VNNI (AVX2 or
// AVX-512 CPUs before Cascade Lake, or any CPU under an ONEDNN_MAX_CPU_ISA cap below it) they
// multiply uint8 levels by int8 codes with vpmaddubsw, which adds each pair of products into a
// saturating int16: exact only while 2 * (levels - 1) * max|code| <= 32767, i.e. for codes of at
// most 7 bits under 8-bit activations, and for every int8 code under 7-bit activations (a_bits=7,
// PyTorch's reduce_range on such CPUs). With VNNI (and AMX) the products accumulate in int32.
// Measured: the Fashion-MNIST ResNet at W8A8 (RTN) under ONEDNN_MAX_CPU_ISA=AVX2 missed its
// float64 recomputation by 0.097 (bound 4e-5); 8-bit layers there take the float path instead.
namespace {

bool onednn_int8_has_vnni() {
  static const bool vnni = [] {
    const bool avx512_vnni = __builtin_cpu_supports("avx512vnni");
    const bool avx_vnni = __builtin_cpu_supports("avxvnni");
    const char* env = std::getenv("ONEDNN_MAX_CPU_ISA");
    if (env == nullptr) env = std::getenv("DNNL_MAX_CPU_ISA");
    std::string cap(env == nullptr ? "" : env);
    for (auto& ch : cap) ch = char(std::toupper(static_cast<unsigned char>(ch)));
    if (cap.empty() || cap == "ALL" || cap == "DEFAULT") return avx512_vnni || avx_vnni;
    if (cap == "SSE41" || cap == "AVX" || cap == "AVX2" || cap == "AVX512_CORE") return false;
    if (cap.rfind("AVX2_VNNI", 0) == 0) return avx_vnni;  // AVX2_VNNI, AVX2_VNNI_2: no AVX-512
    return avx512_vnni || avx_vnni;                       // AVX512_CORE_VNNI and every ISA above it
  }();
  return vnni;
}

// The largest |code| the int8 kernels compute exactly against activations of act_levels levels.
int64_t int8_code_limit(int64_t act_levels) {
  return onednn_int8_has_vnni() ? layout::kInt8CodeMax : layout::exact_code_limit_without_vnni(act_levels);
}

}  // namespace

bool int8_kernels_exact(int64_t w_bits, int64_t act_levels) {
  return (int64_t(1) << (w_bits - 1)) <= int8_code_limit(act_levels);
}

namespace {

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
    TORCH_CHECK(mn >= lo && mx <= hi, op, ": expected the codes of the points in use in ", lo, "..", hi, " (w_bits ",
                w_bits, "), got values in ", mn, "..", mx);
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

// The stored form's dtypes, shapes and device; with `values` also the point counts (their sum is
// the number of stored points; a read of num_points, made once per weight by the layer ops).
void check_stored(const char* op, const at::Tensor& point_codes, const at::Tensor& point_scales,
                  const at::Tensor& num_points, int64_t w_bits, int64_t D, bool values = true) {
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
  if (!values) return;
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
  c10::weak_intrusive_ptr<c10::StorageImpl> storage{
      c10::make_intrusive<c10::StorageImpl>(c10::StorageImpl::use_byte_size_t(), 0, at::DataPtr(), nullptr, false)};
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

// One entry per weight (the storage of its first tensor) and path tag (values[0]): a Linear whose
// "auto" picks "weight_only" for few rows and "dense" or "int8" for many keeps both prepared forms
// instead of preparing again whenever the row count crosses the rule's bound.
class PreparedCache {
 public:
  template <typename T, typename Make>
  std::shared_ptr<T> get(const std::vector<at::Tensor>& tensors, const std::vector<double>& values, Make make) {
    const Key key{tensors[0].storage().unsafeGetStorageImpl(), values.empty() ? 0.0 : values[0]};
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
  using Key = std::pair<const void*, double>;
  struct KeyHash {
    size_t operator()(const Key& k) const { return std::hash<const void*>()(k.first) ^ std::hash<double>()(k.second); }
  };
  std::mutex mutex_;
  std::unordered_map<Key, Entry, KeyHash> entries_;
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
  TORCH_CHECK(act_qparams.numel() == 4, op, ": expected act_qparams float32[4] (scale, zero_point, qmin, qmax), got ",
              act_qparams.sizes());
  double v[4];
  if (act_qparams.is_cpu() && act_qparams.scalar_type() == at::kFloat && act_qparams.is_contiguous()) {
    const float* f = act_qparams.data_ptr<float>();
    for (int i = 0; i < 4; ++i) v[i] = f[i];
  } else {
    const auto p = act_qparams.to(at::kCPU, at::kDouble).contiguous();
    for (int i = 0; i < 4; ++i) v[i] = p.data_ptr<double>()[i];
  }
  check_act_qparams_values(op, v[0], v[1], v[2], v[3]);
  return {v[0], v[1], v[2], v[3]};
}

// Whether the int8 kernels compute this layer: integer zero point and range, at most 256 levels.
bool int8_fits(const ActQuant& q) { return layout::int8_levels_fit(q.scale, q.zero_point, q.qmin, q.qmax); }

// The number of activation levels (what int8_kernels_exact and the exact merge depend on).
int64_t levels_count(const ActQuant& q) { return int64_t(q.qmax - q.qmin) + 1; }

// L = clamp(round_half_even(x / s) + zp, qmin, qmax), the level of fake_quantize_activation,
// exactly. Clamping x/s to [qmin - zp - 1, qmax - zp + 1] before rounding changes no level and keeps
// |v| < 2^22, where adding and subtracting 1.5 * 2^23 rounds half to even. NB: SSE/AVX arithmetic
// has no wider intermediates and, without -ffast-math, no reassociation.
__attribute__((always_inline)) inline float activation_level(float x, float scale, float zp, float qmin, float qmax) {
  const float lo = qmin - zp - 1.0f, hi = qmax - zp + 1.0f, magic = 12582912.0f;
  float v = x / scale;
  v = v < lo ? lo : (v > hi ? hi : v);
  const float q = ((v + magic) - magic) + zp;
  return q < qmin ? qmin : (q > qmax ? qmax : q);
}

// The vector path of mpq's torch-free kernels, following ATen's (so ATEN_CPU_CAPABILITY forces each
// path, as for ATen's own): AVX-512, AVX2 or scalar. The level and depthwise kernels have AVX-512 and
// scalar code (AVX2 runs the scalar loop; both give the same bytes); the weight-only Linear kernel
// has all three.
kernels::CpuIsa cpu_isa() {
  static const auto capability = at::get_cpu_capability();  // ATen's choice, read once as ATen does
  if (capability == "AVX512") return kernels::CpuIsa::kAvx512;
  return capability == "AVX2" ? kernels::CpuIsa::kAvx2 : kernels::CpuIsa::kScalar;
}

kernels::LevelGrid level_grid(const ActQuant& q) {
  return {float(q.scale), float(q.zero_point), float(q.qmin), float(q.qmax)};
}

// The float levels of fake_quantize_activation in one pass: (L - zp) * s.
__attribute__((target_clones("avx512f", "avx2", "default"))) void fake_quantize_levels(const float* x, float* out,
                                                                                       int64_t n, float scale, float zp,
                                                                                       float qmin, float qmax) {
  for (int64_t i = 0; i < n; ++i) out[i] = (activation_level(x[i], scale, zp, qmin, qmax) - zp) * scale;
}

// Per-thread scratch for tensors consumed inside one op call (the quantized input): reusing it
// saves the page faults of a fresh allocation per call, which cost as much as the pass itself on a
// machine where the allocator hands large blocks back to the OS. NB: never returned to the caller.
template <typename T>
at::Tensor scratch(at::IntArrayRef sizes, at::MemoryFormat format) {
  thread_local at::Tensor buf;
  const int64_t n = c10::multiply_integers(sizes);
  if (!buf.defined() || buf.numel() < n || buf.scalar_type() != c10::CppTypeToScalarType<T>::value) {
    buf = at::empty({std::max<int64_t>(n, 1)}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
  }
  if (format == at::MemoryFormat::ChannelsLast && sizes.size() == 4) {
    return buf.as_strided(sizes, c10::get_channels_last_strides_2d(sizes));
  }
  return buf.narrow(0, 0, n).view(sizes);
}

// One elementwise pass In -> Out over `input` laid out in `format`, into the calling thread's
// scratch: pass(src, dst, n) on element blocks split over the threads.
template <typename In, typename Out, typename Pass>
at::Tensor scratch_pass(const at::Tensor& input, at::MemoryFormat format, const Pass& pass) {
  const auto x = input.contiguous(format);
  auto out = scratch<Out>(x.sizes(), format);
  const In* src = x.data_ptr<In>();
  Out* dst = out.template data_ptr<Out>();
  at::parallel_for(0, x.numel(), 1 << 14, [&](int64_t b, int64_t e) { pass(src + b, dst + b, e - b); });
  return out;
}

// fake_quantize_activation of a float32 input, in its own memory format (channels_last stays so),
// in the calling thread's scratch (consumed by the layer inside the op).
at::Tensor fake_quantize_input(const at::Tensor& input, const c10::optional<at::Tensor>& act_qparams,
                               const ActQuant& q) {
  if (!act_qparams.has_value()) return input;
  return scratch_pass<float, float>(input, input.suggest_memory_format(), [&](const float* x, float* y, int64_t n) {
    fake_quantize_levels(x, y, n, float(q.scale), float(q.zero_point), float(q.qmin), float(q.qmax));
  });
}

// The input's uint8 levels (quantize_levels) in `format`, in the calling thread's scratch.
at::Tensor quantize_input(const at::Tensor& input, const ActQuant& q, at::MemoryFormat format) {
  const auto grid = level_grid(q);
  const auto isa = cpu_isa();
  const float inf = std::numeric_limits<float>::infinity();
  return scratch_pass<float, uint8_t>(input, format, [&](const float* x, uint8_t* u, int64_t n) {
    kernels::epilogue_levels(x, nullptr, u, n, -inf, inf, grid, isa);
  });
}

// One of oneDNN's ops that PyTorch registers (onednn::qconv_prepack, ...).
c10::OperatorHandle onednn_op(const char* name, const char* overload) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, overload);
}

// oneDNN's prepacked forms of one int8 convolution weight, one per input shape seen (up to
// kMaxPackedShapes, then one packed for no particular shape). oneDNN picks the weight's blocking
// for the input shape it is told at prepacking; a weight packed for another shape is reordered on
// every call (measured, ResNet-50 W4A8 at batch 1: 6 such reorders, 1.8 ms of its 23 ms), and the
// blocking it wants depends on the batch too (512 -> 576 at 7 x 7: batch 1 and 16 differ).
constexpr size_t kMaxPackedShapes = 8;

struct ConvPacks {
  at::Tensor plain;  // int8 [rows, C_in/g, kh, kw], kept to pack for a further shape
  at::Tensor w_scales;
  double x_scale;
  int64_t x_zp, groups;
  std::vector<int64_t> stride, padding, dilation;
  std::mutex mutex;
  std::vector<std::pair<std::vector<int64_t>, at::Tensor>> by_shape;
  at::Tensor any_shape;

  at::Tensor pack(c10::optional<at::IntArrayRef> sizes) const {
    static auto prepack =
        onednn_op("onednn::qconv_prepack", "")
            .typed<at::Tensor(at::Tensor, at::Tensor, double, int64_t, torch::List<int64_t>, torch::List<int64_t>,
                              torch::List<int64_t>, int64_t, std::optional<torch::List<int64_t>>)>();
    std::optional<torch::List<int64_t>> shape;
    if (sizes.has_value()) shape = torch::List<int64_t>(sizes->vec());
    return prepack.call(plain, w_scales, x_scale, x_zp, torch::List<int64_t>(stride), torch::List<int64_t>(padding),
                        torch::List<int64_t>(dilation), groups, shape);
  }
  at::Tensor for_input(at::IntArrayRef sizes) {
    std::lock_guard<std::mutex> lock(mutex);
    for (const auto& [shape, packed] : by_shape) {
      if (at::IntArrayRef(shape) == sizes) return packed;
    }
    if (by_shape.size() < kMaxPackedShapes) {
      by_shape.emplace_back(sizes.vec(), pack(sizes));
      return by_shape.back().second;
    }
    if (!any_shape.defined()) any_shape = pack(c10::nullopt);
    return any_shape;
  }
};

// One oneDNN int8 layer over rows of points.
struct Int8Rows {
  at::Tensor weight;         // int8 [rows, C_in/g, kh, kw], or oneDNN's prepacked [rows, K] for Linear
  at::Tensor w_scales;       // float32 [rows]: the point scales (1 on rows without a point)
  at::Tensor w_zero_points;  // int64 zeros
  c10::optional<at::Tensor> bias;
  std::shared_ptr<ConvPacks> packs;  // convolutions: prepack_conv
};

// A multipoint weight as two int8 layers: `primary` has one row per channel (its first point,
// zero codes when it has none) and the bias, so its output is the layer's output when no channel
// has a second point; `extra` holds the further points, per group Re rows (zero rows pad the
// groups to one size, as grouped convolutions need), and `extra_channel` maps each extra row to the
// channel it adds into (-1: padding).
struct PreparedInt8 {
  Int8Rows primary, extra;
  at::Tensor extra_channel;  // int64 [groups * Re]
  bool has_extra = false;
};

Int8Rows make_rows(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& used,
                   at::IntArrayRef code_shape, c10::optional<at::Tensor> bias) {
  Int8Rows r;
  std::vector<int64_t> wshape = {codes.size(0)};
  for (auto s : code_shape) wshape.push_back(s);
  r.weight = (codes * used.unsqueeze(1).to(at::kChar)).reshape(wshape).contiguous();
  r.w_scales = at::where(used, scales, at::ones({}, scales.options())).to(at::kFloat).contiguous();
  r.w_zero_points = at::zeros({codes.size(0)}, at::kLong);
  r.bias = std::move(bias);
  return r;
}

// Points that merge exactly into one int8 row. When a channel's point k has a scale that divides
// the scale of its points before k by a whole number r (s_before == r * s_k, exactly), then
// s_before * q_before + s_k * q_k == s_k * (r * q_before + q_k): one row of codes r * q_before + q_k
// at scale s_k, if those codes stay within what the int8 kernels compute exactly against activations
// of act_levels levels (|code| <= 127 with VNNI; without, <= 64 under 8-bit and <= 127 under 7-bit
// activations, see int8_kernels_exact). mpq's fit produces such scales when asked
// (MultipointConfig.int8_merge); any other fit merges only where its scales happen to qualify.
// Returns, per channel, the index of its first point that did not merge (1 when none did); the
// merged codes and scales replace point 0 in `codes` [C, P, D] and `scales` [C, P].
std::vector<int64_t> merge_points_exactly(at::Tensor& codes, at::Tensor& scales, const int* counts,
                                          int64_t act_levels) {
  const int64_t C = codes.size(0), D = codes.size(2);
  const int bound = int(std::min<int64_t>(127, int8_code_limit(act_levels)));
  std::vector<int64_t> first_unmerged(C, 1);
  auto q = codes.accessor<int8_t, 3>();
  auto s = scales.accessor<float, 2>();
  std::vector<int32_t> merged(D);
  for (int64_t c = 0; c < C; ++c) {
    if (counts[c] < 2) continue;
    for (int64_t d = 0; d < D; ++d) merged[d] = q[c][0][d];
    double run = s[c][0];
    int64_t k = 1;
    for (; k < counts[c]; ++k) {
      const double sk = s[c][k];
      if (!(sk > 0) || !(run > 0)) break;
      const double r = std::nearbyint(run / sk);
      if (r < 1 || r > bound || sk * r != run) break;  // float * small integer: exact in double
      bool fits = true;
      for (int64_t d = 0; d < D && fits; ++d) fits = std::abs(int32_t(r) * merged[d] + q[c][k][d]) <= bound;
      if (!fits) break;
      for (int64_t d = 0; d < D; ++d) merged[d] = int32_t(r) * merged[d] + q[c][k][d];
      run = sk;
    }
    if (k == 1) continue;
    for (int64_t d = 0; d < D; ++d) q[c][0][d] = int8_t(merged[d]);
    s[c][0] = float(run);
    first_unmerged[c] = k;
  }
  return first_unmerged;
}

}  // namespace

at::Tensor int8_merged_points(const at::Tensor& point_codes, const at::Tensor& point_scales,
                              const at::Tensor& num_points, int64_t w_bits, int64_t D, int64_t act_levels) {
  const char* op = "mpq::int8_merged_points";
  check_stored(op, point_codes, point_scales, num_points, w_bits, D);
  TORCH_CHECK(act_levels >= 2 && act_levels <= layout::kInt8Levels, op, ": expected act_levels in 2..",
              layout::kInt8Levels, ", got ", act_levels);
  TORCH_CHECK(point_codes.device().is_cpu(), op, ": expected CPU tensors (the CPU int8 kernels' rule), got ",
              point_codes.device());
  const int64_t C = num_points.size(0);
  const int64_t P = C ? std::max<int64_t>(1, num_points.max().item<int64_t>()) : 1;
  auto [codes, scales] = unpack_points(point_codes, point_scales, num_points, w_bits, D, P);
  codes = codes.contiguous();
  scales = scales.to(at::kFloat).contiguous();
  const auto n = num_points.to(at::kInt).contiguous();
  const std::vector<int64_t> first = merge_points_exactly(codes, scales, n.data_ptr<int>(), act_levels);
  auto out = at::empty({C}, at::kInt);
  for (int64_t c = 0; c < C; ++c) out[c] = n.data_ptr<int>()[c] > 0 ? int(first[c]) : 0;
  return out;
}

namespace {

PreparedInt8 expand_points(const at::Tensor& point_codes, const at::Tensor& point_scales, const at::Tensor& num_points,
                           int64_t w_bits, at::IntArrayRef code_shape, const c10::optional<at::Tensor>& bias,
                           int64_t groups, int64_t act_levels) {
  const int64_t C = num_points.size(0), D = c10::multiply_integers(code_shape);
  const int64_t P = C ? std::max<int64_t>(1, num_points.max().item<int64_t>()) : 1;
  auto [codes, scales] = unpack_points(point_codes, point_scales, num_points, w_bits, D, P);  // [C, P, D]
  codes = codes.contiguous();
  scales = scales.to(at::kFloat).contiguous();
  const auto n = num_points.to(at::kInt).contiguous();
  const int* counts = n.data_ptr<int>();
  const std::vector<int64_t> first_unmerged = merge_points_exactly(codes, scales, counts, act_levels);
  PreparedInt8 p;
  c10::optional<at::Tensor> b;
  if (bias.has_value()) b = bias->to(at::kFloat).contiguous();
  p.primary = make_rows(codes.select(1, 0), scales.select(1, 0), n > 0, code_shape, b);
  const int64_t Cg = C / groups;
  std::vector<std::vector<std::pair<int64_t, int64_t>>> per_group(groups);  // (channel, point)
  int64_t Re = 0;
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t k = first_unmerged[c]; k < counts[c]; ++k) per_group[c / Cg].emplace_back(c, k);
  }
  for (const auto& g : per_group) Re = std::max<int64_t>(Re, g.size());
  p.has_extra = Re > 0;
  if (!p.has_extra) return p;
  std::vector<int64_t> channel(groups * Re, -1), point(groups * Re, 0);
  for (int64_t g = 0; g < groups; ++g) {
    for (size_t i = 0; i < per_group[g].size(); ++i) {
      channel[g * Re + i] = per_group[g][i].first;
      point[g * Re + i] = per_group[g][i].second;
    }
  }
  const auto long_opts = at::TensorOptions().dtype(at::kLong);
  p.extra_channel = at::tensor(channel, long_opts);
  const auto pt = at::tensor(point, long_opts), safe = p.extra_channel.clamp_min(0);
  p.extra = make_rows(codes.index({safe, pt}), scales.index({safe, pt}), p.extra_channel >= 0, code_shape,
                      c10::nullopt);
  return p;
}

// y[i, extra_channel[r]] += e[i, r] for every input row i of e [rows, Re'] and y [rows, C], both
// row-major: the Linear int8 path's further points (convolutions add theirs as runs, combine_points).
void add_extra_points(const at::Tensor& e, const at::Tensor& extra_channel, at::Tensor& y) {
  const float* src = e.data_ptr<float>();
  float* dst = y.data_ptr<float>();
  const int64_t R = extra_channel.numel(), C = y.size(1), rows = y.size(0);
  const int64_t* ch = extra_channel.data_ptr<int64_t>();
  at::parallel_for(0, rows, 64, [&](int64_t b, int64_t end) {
    for (int64_t i = b; i < end; ++i) {
      const float* s = src + i * R;
      float* d = dst + i * C;
      for (int64_t r = 0; r < R; ++r) {
        if (ch[r] >= 0) d[ch[r]] += s[r];
      }
    }
  });
}

// The clamp oneDNN applies before writing uint8 levels: none, a ReLU, or [lo, hi] (its hardtanh).
struct OutClamp {
  enum Kind { kNone, kRelu, kHardtanh } kind = kNone;
  double lo = 0.0, hi = 0.0;
  const char* attr() const { return kind == kRelu ? "relu" : kind == kHardtanh ? "hardtanh" : "none"; }
  torch::List<std::optional<at::Scalar>> scalars() const {
    torch::List<std::optional<at::Scalar>> s;
    if (kind == kHardtanh) {
      s.push_back(at::Scalar(lo));
      s.push_back(at::Scalar(hi));
    }
    return s;
  }
};

// float32 output, or with out_scale > 0 uint8 output (out_zp, `clamp` first).
at::Tensor call_qconv(const at::Tensor& qx, double x_scale, int64_t x_zp, const Int8Rows& r, at::IntArrayRef stride,
                      at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, double out_scale = 0.0,
                      int64_t out_zp = 0, const OutClamp& clamp = OutClamp{}) {
  static auto op =
      onednn_op("onednn::qconv2d_pointwise", "")
          .typed<at::Tensor(at::Tensor, double, int64_t, at::Tensor, at::Tensor, at::Tensor, std::optional<at::Tensor>,
                            torch::List<int64_t>, torch::List<int64_t>, torch::List<int64_t>, int64_t, double, int64_t,
                            std::optional<at::ScalarType>, c10::string_view, torch::List<std::optional<at::Scalar>>,
                            std::optional<c10::string_view>)>();
  return op.call(qx, x_scale, x_zp, r.packs->for_input(qx.sizes()), r.w_scales, r.w_zero_points, r.bias,
                 torch::List<int64_t>(stride.vec()), torch::List<int64_t>(padding.vec()),
                 torch::List<int64_t>(dilation.vec()), groups, out_scale > 0.0 ? out_scale : 1.0, out_zp,
                 out_scale > 0.0 ? std::optional<at::ScalarType>(at::kByte) : std::optional<at::ScalarType>(at::kFloat),
                 clamp.attr(), clamp.scalars(), std::nullopt);
}

// uint8 output at (out_scale, out_zp) of conv + the uint8 levels `accum` at (accum_scale, accum_zp),
// `clamp` (none or a ReLU: oneDNN takes no other here) first: oneDNN's sum post-op, which writes
// into accum (callers pass a copy).
at::Tensor call_qconv_sum(const at::Tensor& qx, double x_scale, int64_t x_zp, const Int8Rows& r, at::IntArrayRef stride,
                          at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, at::Tensor accum,
                          double accum_scale, int64_t accum_zp, double out_scale, int64_t out_zp,
                          const OutClamp& clamp) {
  static auto op =
      onednn_op("onednn::qconv2d_pointwise", "binary")
          .typed<at::Tensor(at::Tensor, double, int64_t, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                            std::optional<at::Tensor>, torch::List<int64_t>, torch::List<int64_t>, torch::List<int64_t>,
                            int64_t, double, int64_t, std::optional<at::ScalarType>, double, int64_t, c10::string_view,
                            std::optional<at::Scalar>, std::optional<c10::string_view>,
                            torch::List<std::optional<at::Scalar>>, std::optional<c10::string_view>)>();
  const bool relu = clamp.kind == OutClamp::kRelu;
  return op.call(qx, x_scale, x_zp, r.packs->for_input(qx.sizes()), r.w_scales, r.w_zero_points, accum, r.bias,
                 torch::List<int64_t>(stride.vec()), torch::List<int64_t>(padding.vec()),
                 torch::List<int64_t>(dilation.vec()), groups, out_scale, out_zp, at::kByte, accum_scale, accum_zp,
                 "sum", at::Scalar(1.0), relu ? std::optional<c10::string_view>("relu") : std::nullopt,
                 torch::List<std::optional<at::Scalar>>(), std::nullopt);
}

at::Tensor call_qlinear(const at::Tensor& qx, double x_scale, int64_t x_zp, const Int8Rows& r) {
  static auto op = onednn_op("onednn::qlinear_pointwise", "")
                       .typed<at::Tensor(at::Tensor, double, int64_t, at::Tensor, at::Tensor, at::Tensor,
                                         std::optional<at::Tensor>, double, int64_t, std::optional<at::ScalarType>,
                                         c10::string_view, torch::List<std::optional<at::Scalar>>, c10::string_view)>();
  return op.call(qx, x_scale, x_zp, r.weight, r.w_scales, r.w_zero_points, r.bias, 1.0, 0, at::kFloat, "none",
                 torch::List<std::optional<at::Scalar>>(), "");
}

std::vector<double> qparam_values(const ActQuant& q) { return {q.scale, q.zero_point, q.qmin, q.qmax}; }

// The cache key values of a convolution's prepared form: its tag (0 dense weight, 2 combined int8
// rows, 3 depthwise), then w_bits, groups, stride, padding and dilation.
std::vector<double> conv_key(double tag, int64_t w_bits, int64_t groups, at::IntArrayRef stride,
                             at::IntArrayRef padding, at::IntArrayRef dilation) {
  std::vector<double> key = {tag, double(w_bits), double(groups)};
  for (auto v : {stride, padding, dilation}) key.insert(key.end(), v.begin(), v.end());
  return key;
}

std::vector<at::Tensor> weight_tensors(const at::Tensor& point_codes, const at::Tensor& point_scales,
                                       const at::Tensor& num_points, const c10::optional<at::Tensor>& bias) {
  return {point_codes, point_scales, num_points, bias.has_value() ? *bias : at::Tensor()};
}

// oneDNN's prepacked forms of int8 convolution rows (packed per input shape on first use).
std::shared_ptr<ConvPacks> prepack_conv(const Int8Rows& r, const ActQuant& q, at::IntArrayRef stride,
                                        at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  auto p = std::make_shared<ConvPacks>();
  p->plain = r.weight;
  p->w_scales = r.w_scales;
  p->x_scale = q.scale;
  p->x_zp = int64_t(q.zero_point - q.qmin);
  p->groups = groups;
  p->stride = stride.vec();
  p->padding = padding.vec();
  p->dilation = dilation.vec();
  return p;
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

// The weight-only layout of a Linear weight (csrc/kernels/weight_only_linear.h).
struct PreparedWeightOnly {
  kernels::WeightOnlyWeight weight;
};

enum class CpuKernel { kInt8, kDense, kWeightOnly, kReference };

// "auto" picks the faster of the two on this kind of CPU, measured per layer shape against each other
// (benchmarks/cpu.py --layers, the "layers" rows of benchmarks/results/cpu.json): int8 for
// convolutions with at least kInt8MinGroupChannels input and output channels per group, a kernel
// larger than 1 x 1 (3 x 3 dense convs 3-9x faster than float32) or fewer outputs than inputs (1 x 1
// projections: faster than float32 and than the float path, which fake-quantizes its input in an
// extra pass), and for Linear calls of at least kInt8MinLinearMacs multiply-adds (3x at 512 rows);
// the float path for depthwise convs, stems with few input channels, 1 x 1 expansions (their float
// outputs per point dominate) and small Linear calls, where oneDNN's int8 kernels or their fixed
// cost lose.
// Linear at few rows (below the int8 rule's size) with ATen's AVX-512 or AVX2 kernels: "weight_only" up to
// kWeightOnlyMaxRows rows, else "dense". Measured (benchmarks/cpu.py --w4a16-layers --w4a16-rows 1 2 4
// 8 16 32 64, MiniLM's 384x384, 384x1536, 1536x384, 4-bit, 1/4 of the channels with 2 points, 1
// thread on a shared 2-core AVX-512 machine, where 2-thread medians were swamped by the other
// load), weight_only / dense time with the weights out of cache (copies of the layer run in turn,
// as a model's layers are): rows 1-8 0.38-0.74 on every shape (1.4-2.6x faster), 16 rows 0.78-1.0,
// 32-64 rows 1.2-2.0 (slower: the FMAs, not the weight bytes, bound it there); with one layer
// repeated (its float weight held in L2) weight_only wins 1.5-2.4x on the 1536-wide shapes at 1-8
// rows and loses up to 1.3x on 384x384 at 2-8 rows. With ATen's AVX2 kernels (the kernel's AVX2
// path; same command, 1 thread, 2-core AMD EPYC without AVX-512: benchmarks/results/
// w4a16_linear_avx2.json), weights out of cache: rows 1-8 1.4-3.6x faster than float32 and 1.6-3.7x
// than "dense", 16 rows 0.8-1.8x, 32 rows 0.8-1.3x; with one layer repeated 0.7-1.5x at 1-8 rows:
// the same bound.
constexpr int64_t kInt8MinGroupChannels = 16;
constexpr int64_t kInt8MinLinearMacs = int64_t(1) << 23;
constexpr int64_t kWeightOnlyMaxRows = 8;

// weight_only_wins: Linear only (convolutions pass nullopt: no such path).
CpuKernel choose_kernel(const char* op, c10::string_view kernel, const at::Tensor& input,
                        const c10::optional<at::Tensor>& act_qparams, const ActQuant& q, int64_t w_bits, bool int8_wins,
                        int64_t C, c10::optional<bool> weight_only_wins = c10::nullopt) {
  if (weight_only_wins.has_value()) {
    TORCH_CHECK(kernel == "auto" || kernel == "int8" || kernel == "dense" || kernel == "weight_only", op,
                ": expected path \"auto\", \"int8\", \"dense\" or \"weight_only\", got \"", std::string(kernel), "\"");
  } else {
    TORCH_CHECK(kernel == "auto" || kernel == "int8" || kernel == "dense", op,
                ": expected path \"auto\", \"int8\" or \"dense\", got \"", std::string(kernel), "\"");
  }
  const bool int8_ok = act_qparams.has_value() && input.scalar_type() == at::kFloat && int8_fits(q) &&
                       int8_kernels_exact(w_bits, levels_count(q));
  TORCH_CHECK(kernel != "int8" || int8_ok, op,
              ": path \"int8\" needs a float32 input, act_qparams with at most 256 integer levels and, for 8-bit "
              "codes, a CPU with VNNI or activations of at most 128 levels (oneDNN's int8 kernels saturate "
              "them otherwise)");
  TORCH_CHECK(kernel != "dense" || input.scalar_type() == at::kFloat, op, ": path \"dense\" needs a float32 input");
  TORCH_CHECK(kernel != "weight_only" || input.scalar_type() == at::kFloat, op,
              ": path \"weight_only\" needs a float32 input");
  if (C == 0 || input.numel() == 0 || input.scalar_type() != at::kFloat) return CpuKernel::kReference;
  if (kernel == "int8") return CpuKernel::kInt8;
  if (kernel == "dense") return CpuKernel::kDense;
  if (kernel == "weight_only") return CpuKernel::kWeightOnly;
  if (int8_ok && int8_wins) return CpuKernel::kInt8;
  return weight_only_wins.value_or(false) ? CpuKernel::kWeightOnly : CpuKernel::kDense;
}

}  // namespace

at::Tensor cached_weight(const std::vector<at::Tensor>& tensors, const std::vector<double>& key,
                         const std::function<at::Tensor()>& make) {
  return cache().get<PreparedDense>(tensors, key, [&] { return PreparedDense{make()}; })->weight;
}

at::Tensor multipoint_linear_stored_cpu(const at::Tensor& input, const at::Tensor& point_codes,
                                        const at::Tensor& point_scales, const at::Tensor& num_points, int64_t w_bits,
                                        int64_t in_features, const c10::optional<at::Tensor>& bias,
                                        const c10::optional<at::Tensor>& act_qparams, c10::string_view kernel) {
  const char* op = "mpq::multipoint_linear_stored";
  check_stored(op, point_codes, point_scales, num_points, w_bits, in_features, /*values=*/false);
  const int64_t C = num_points.size(0);
  check_bias_and_act(op, input, bias, act_qparams, C);
  TORCH_CHECK(input.dim() >= 1 && input.size(-1) == in_features, op, ": expected input [..., ", in_features, "], got ",
              input.sizes());
  TORCH_CHECK(input.device() == point_codes.device(), op, ": expected input on ", point_codes.device());
  ActQuant q{1.0, 0.0, 0.0, 1.0};
  if (act_qparams.has_value()) q = read_act_qparams(op, *act_qparams);
  const std::vector<int64_t> code_shape = {in_features};
  const int64_t rows = input.numel() / std::max<int64_t>(1, in_features);
  const bool int8_wins = rows * in_features * C >= kInt8MinLinearMacs;
  const bool weight_only_wins = rows <= kWeightOnlyMaxRows && cpu_isa() != kernels::CpuIsa::kScalar;
  const auto choice = choose_kernel(op, kernel, input, act_qparams, q, w_bits, int8_wins, C, weight_only_wins);
  if (choice == CpuKernel::kInt8) {
    const int64_t levels = levels_count(q);  // which points merge depends on it (merge_points_exactly)
    auto p = cache().get<PreparedInt8>(weight_tensors(point_codes, point_scales, num_points, bias),
                                       {0.0, double(w_bits), double(in_features), double(levels)}, [&] {
      check_stored(op, point_codes, point_scales, num_points, w_bits, in_features);
      auto e = expand_points(point_codes, point_scales, num_points, w_bits, code_shape, bias, 1, levels);
      static auto prepack =
          onednn_op("onednn::qlinear_prepack", "").typed<at::Tensor(at::Tensor, std::optional<torch::List<int64_t>>)>();
      e.primary.weight = prepack.call(e.primary.weight, std::nullopt);
      if (e.has_extra) e.extra.weight = prepack.call(e.extra.weight, std::nullopt);
      return e;
    });
    const auto x2 = input.reshape({-1, in_features});
    const auto qx = quantize_input(x2, q, at::MemoryFormat::Contiguous);
    const int64_t zp = int64_t(q.zero_point - q.qmin);
    auto y = call_qlinear(qx, q.scale, zp, p->primary).contiguous();
    if (p->has_extra) add_extra_points(call_qlinear(qx, q.scale, zp, p->extra).contiguous(), p->extra_channel, y);
    std::vector<int64_t> shape(input.sizes().begin(), input.sizes().end() - 1);
    shape.push_back(C);
    return y.reshape(shape);
  }
  if (choice == CpuKernel::kDense) {
    auto p = cache().get<PreparedDense>(weight_tensors(point_codes, point_scales, num_points, bias),
                                        {1.0, double(w_bits), double(in_features)}, [&] {
      return PreparedDense{dense_from_stored(point_codes, point_scales, num_points, w_bits, code_shape, at::kFloat)};
    });
    const auto x = fake_quantize_input(input, act_qparams, q);
    return at::linear(x, p->weight, bias.has_value() ? c10::optional<at::Tensor>(bias->to(at::kFloat)) : c10::nullopt);
  }
  if (choice == CpuKernel::kWeightOnly) {
    auto p = cache().get<PreparedWeightOnly>(weight_tensors(point_codes, point_scales, num_points, bias),
                                             {4.0, double(w_bits), double(in_features)}, [&] {
      check_stored(op, point_codes, point_scales, num_points, w_bits, in_features);  // the counts, read once
      const auto codes = point_codes.contiguous(), scales = point_scales.contiguous(), counts = num_points.contiguous();
      return PreparedWeightOnly{kernels::prepare_weight_only(codes.data_ptr<uint8_t>(), scales.data_ptr<float>(),
                                                             counts.data_ptr<int32_t>(), C, in_features, w_bits)};
    });
    const auto x = fake_quantize_input(input, act_qparams, q).reshape({rows, in_features}).contiguous();
    const auto b = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
    auto y = at::empty({rows, C}, input.options());
    const float* xp = x.data_ptr<float>();
    const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
    float* yp = y.data_ptr<float>();
    const auto isa = cpu_isa();
    // Channels split over the threads, at least about 2^14 multiply-adds per task.
    const int64_t points = int64_t(p->weight.scales.size());
    const int64_t per_channel = std::max<int64_t>(1, rows * in_features * std::max<int64_t>(1, points / C));
    at::parallel_for(0, C, std::max<int64_t>(1, (int64_t(1) << 14) / per_channel), [&](int64_t c0, int64_t c1) {
      kernels::weight_only_linear(p->weight, xp, rows, bp, yp, c0, c1, isa);
    });
    std::vector<int64_t> shape(input.sizes().begin(), input.sizes().end() - 1);
    shape.push_back(C);
    return y.reshape(shape);
  }
  const int64_t P = C ? std::max<int64_t>(1, num_points.max().item<int64_t>()) : 1;
  auto [codes, scales] = unpack_points(point_codes, point_scales, num_points, w_bits, in_features, P);
  return multipoint_linear_cpu(input, codes, scales, num_points, bias, act_qparams);
}

at::Tensor int8_conv2d_stored(const char* op, const at::Tensor& input, const at::Tensor& point_codes,
                              const at::Tensor& point_scales, const at::Tensor& num_points, int64_t w_bits,
                              at::IntArrayRef code_shape, const c10::optional<at::Tensor>& bias, const ActQuant& q,
                              at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                              at::IntArrayRef out_shape);

at::Tensor multipoint_conv2d_stored_cpu(const at::Tensor& input, const at::Tensor& point_codes,
                                        const at::Tensor& point_scales, const at::Tensor& num_points, int64_t w_bits,
                                        at::IntArrayRef code_shape, const c10::optional<at::Tensor>& bias,
                                        const c10::optional<at::Tensor>& act_qparams, at::IntArrayRef stride,
                                        at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                        c10::string_view kernel) {
  const char* op = "mpq::multipoint_conv2d_stored";
  TORCH_CHECK(code_shape.size() == 3, op, ": expected code_shape [C_in/groups, kh, kw], got ", code_shape);
  check_stored(op, point_codes, point_scales, num_points, w_bits, c10::multiply_integers(code_shape), /*values=*/false);
  const int64_t C = num_points.size(0);
  TORCH_CHECK(groups >= 1 && C % groups == 0, op, ": expected groups (", groups, ") to divide the ", C,
              " output channels");
  ActQuant q{1.0, 0.0, 0.0, 1.0};
  if (act_qparams.has_value()) q = read_act_qparams(op, *act_qparams);
  const int64_t taps = code_shape[1] * code_shape[2];
  const bool int8_wins = code_shape[0] >= kInt8MinGroupChannels && C / groups >= kInt8MinGroupChannels &&
                         (taps > 1 || C / groups <= code_shape[0]);
  const auto choice = choose_kernel(op, kernel, input, act_qparams, q, w_bits, int8_wins, C);
  const bool int8 = choice == CpuKernel::kInt8, dense = choice == CpuKernel::kDense;
  if (!int8 && !dense) {  // the reference path, with its own complete checks
    const int64_t P = C ? std::max<int64_t>(1, num_points.max().item<int64_t>()) : 1;
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
  const auto out_shape = check_multipoint_conv2d_args(input, at::empty(shape, point_codes.options().dtype(at::kChar)),
                                                      at::empty({C, 0}, point_scales.options()),
                                                      at::zeros({C}, num_points.options()), bias, act_qparams, stride,
                                                      padding, dilation, groups);
  if (dense) {
    auto p = cache().get<PreparedDense>(weight_tensors(point_codes, point_scales, num_points, bias),
                                        conv_key(0.0, w_bits, groups, stride, padding, dilation), [&] {
      return PreparedDense{dense_from_stored(point_codes, point_scales, num_points, w_bits, code_shape, at::kFloat)};
    });
    const auto x = fake_quantize_input(input, act_qparams, q);
    return at::conv2d(x, p->weight, bias.has_value() ? c10::optional<at::Tensor>(bias->to(at::kFloat)) : c10::nullopt,
                      stride, padding, dilation, groups)
        .contiguous(at::MemoryFormat::ChannelsLast);
  }
  return int8_conv2d_stored(op, input, point_codes, point_scales, num_points, w_bits, code_shape, bias, q, stride,
                            padding, dilation, groups, out_shape);
}

// ---- fused: convolution, + residual, clamp, and the next layer's activation quantizer -----------
//
// multipoint_conv2d_fused (registration.cpp) lets int8 activations flow between layers: its input
// may be the uint8 levels u = L - qmin that the previous fused layer wrote (at this layer's
// act_qparams), and its output y = clamp(conv + bias + residual, lo, hi) may be written as the
// levels of the next layer's quantizer (out_qparams) instead of float32. The float32 activation
// tensor between two layers, its ReLU pass and the next layer's quantizing pass are gone: a third
// of the memory traffic of an int8 layer at batch 16 (benchmarks/NOTES.md).

namespace {

// The float epilogue of C values: out[c] = clamp(y[c] + residual[c], lo, hi) (no residual: null);
// the uint8 one is kernels::epilogue_levels. Written so that the compiler vectorizes it (no pointer
// tests inside, restrict; std::max / std::min are (v < lo ? lo : v) and (hi < v ? hi : v), NaN
// passing through as in at::clamp).
__attribute__((target_clones("avx512f", "avx2", "default"))) void epilogue_row_float(const float* __restrict y,
                                                                                     const float* __restrict residual,
                                                                                     float* __restrict out, int64_t C,
                                                                                     float lo, float hi) {
  if (residual != nullptr) {
    for (int64_t c = 0; c < C; ++c) out[c] = std::min(std::max(y[c] + residual[c], lo), hi);
  } else {
    for (int64_t c = 0; c < C; ++c) out[c] = std::min(std::max(y[c], lo), hi);
  }
}

// out[c] = y[at[c]]: a row's channels in channel order.
__attribute__((target_clones("avx512f", "avx2", "default"))) void gather_row(const float* __restrict y,
                                                                             const int32_t* __restrict at,
                                                                             float* __restrict out, int64_t C) {
  for (int64_t c = 0; c < C; ++c) out[c] = y[at[c]];
}

// y[i] += x[i], i < n (x and y do not overlap).
__attribute__((target_clones("avx512f", "avx2", "default"))) void add_into(float* __restrict y,
                                                                           const float* __restrict x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += x[i];
}

// The values of n levels: (u - zp') * s, exact in float32 for |u - zp'| < 2^24 (as ATen's
// to(float).sub_(zp').mul_(s), bit for bit).
__attribute__((target_clones("avx512f", "avx2", "default"))) void level_values(const uint8_t* __restrict u,
                                                                               float* __restrict v, int64_t n, float zp,
                                                                               float scale) {
  for (int64_t i = 0; i < n; ++i) v[i] = (static_cast<float>(u[i]) - zp) * scale;
}

struct Epilogue {
  c10::optional<at::Tensor> residual;  // float32, or uint8 levels at residual_grid; the output's shape, channels_last
  float lo, hi;
  c10::optional<ActQuant> out;
  c10::optional<ActQuant> residual_grid;
};

// The residual's values for n consecutive output values from o: float32 in place, uint8 levels
// converted into `buf` (the thread's), (u - (zp - qmin)) * s exactly as the reference dequantizes.
struct ResidualRows {
  const float* values = nullptr;
  const uint8_t* levels = nullptr;
  float zp = 0.0f, scale = 1.0f;

  const float* at(int64_t o, int64_t n, std::vector<float>& buf) const {
    if (levels == nullptr) return values == nullptr ? nullptr : values + o;
    buf.resize(n);
    level_values(levels + o, buf.data(), n, zp, scale);
    return buf.data();
  }
  ResidualRows shifted(int64_t o) const {
    ResidualRows r = *this;
    if (r.values != nullptr) r.values += o;
    if (r.levels != nullptr) r.levels += o;
    return r;
  }
};

// Where a layer's channels are in a convolution's output rows (channels last). Per group g, the
// row holds `stride` columns from g * stride: first one column per channel (its first point), then
// the further points. The channels' columns are ordered by point count, most first, so the
// further points add in as contiguous runs: run k (k = 1, 2, ...: every channel's (k+1)-th point)
// holds runs[g][k-1] columns, added into the first runs[g][k-1] columns. Channel c of the group
// then is at column `at[c]` (no `at`: column c, the order of the channels).
struct RowLayout {
  int64_t groups = 1, stride = 0, channels = 0;  // channels per group
  std::vector<std::vector<int64_t>> runs;        // per group; empty: no further points
  std::vector<int32_t> at;                       // [groups * channels], or empty
};

// The epilogue on y (float32 channels_last [n, T, H, W], T = groups * layout.stride) into `out`
// ([n, groups * layout.channels, H, W], channels_last, float32 or uint8 levels): the further
// points added into their channels (in place in y), then + residual (rows of the output's width,
// or null), clamp, quantize. The sums are the reference's: a channel's points in order.
void epilogue_into(const at::Tensor& y, const ResidualRows& res, const Epilogue& ep, const RowLayout& layout,
                   const at::Tensor& out) {
  const int64_t T = y.size(1), rows = y.numel() / std::max<int64_t>(1, T);
  const int64_t C = layout.groups * layout.channels;
  float* yp = y.data_ptr<float>();
  const c10::optional<ActQuant> q = ep.out;
  uint8_t* out_levels = q.has_value() ? out.data_ptr<uint8_t>() : nullptr;
  float* out_float = q.has_value() ? nullptr : out.data_ptr<float>();
  const auto grid = q.has_value() ? level_grid(*q) : kernels::LevelGrid{1.0f, 0.0f, 0.0f, 255.0f};
  const auto isa = cpu_isa();
  auto finish = [&](const float* y_rows, int64_t o, int64_t n, std::vector<float>& buf) {  // n values from o
    const float* res_rows = res.at(o, n, buf);
    if (q.has_value()) {
      kernels::epilogue_levels(y_rows, res_rows, out_levels + o, n, ep.lo, ep.hi, grid, isa);
    } else {
      epilogue_row_float(y_rows, res_rows, out_float + o, n, ep.lo, ep.hi);
    }
  };
  // Threads split the rows only where each gets at least ~32K values: below, a parallel region
  // costs more than it saves (ResNet-50's 7 x 7 layers at batch 1).
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(1, T));
  if (layout.runs.empty() && layout.at.empty() && T == C) {  // the rows are the output's: one pass per block
    at::parallel_for(0, rows, grain, [&](int64_t b, int64_t e) {
      std::vector<float> buf;
      finish(yp + b * C, b * C, (e - b) * C, buf);
    });
    return;
  }
  at::parallel_for(0, rows, grain, [&](int64_t b, int64_t e) {
    std::vector<float> ordered(layout.at.empty() ? 0 : layout.channels), buf;
    for (int64_t i = b; i < e; ++i) {
      float* row = yp + i * T;
      for (int64_t g = 0; g < layout.groups; ++g) {
        float* yr = row + g * layout.stride;
        if (!layout.runs.empty()) {
          int64_t from = layout.channels;
          for (const int64_t n : layout.runs[g]) {
            add_into(yr, yr + from, n);
            from += n;
          }
        }
        if (!layout.at.empty()) {  // the channels in their order, in this thread's row buffer
          gather_row(yr, layout.at.data() + g * layout.channels, ordered.data(), layout.channels);
          yr = ordered.data();
        }
        finish(yr, i * C + g * layout.channels, layout.channels, buf);
      }
    }
  });
}

// A float32 output per chunk of images stays in cache when it is at most this large: the
// epilogue then reads it from there, and the allocator reuses one block instead of mapping fresh
// pages per call. Measured (benchmarks/NOTES.md): a 256 -> 205 1 x 1 int8 conv at 56 x 56 with float
// output, 16 images at once 15.2 ms, in chunks of 2 images 2.6 ms.
constexpr int64_t kChunkBytes = int64_t(8) << 20;

// Large layer outputs from a cache of freed blocks. glibc maps allocations above 32 MB afresh each
// time and unmaps them on free, so a layer's output at batch 16 (ResNet-50's 256 x 56 x 56 float32:
// 51 MB) paid its page faults on every call, more than the layer's arithmetic (measured, ResNet-50
// W8A8 one point per channel at batch 16: 211 ms, 145 ms with glibc told to keep such blocks). A
// freed block of at least kPooledMinBytes returns here and serves the next output of its exact size
// (the same shapes recur every forward); at most kPooledMaxBytes are kept, beyond which blocks are
// freed as usual. The tensor owns its block through its deleter; nothing else changes for users.
constexpr size_t kPooledMinBytes = size_t(16) << 20;
constexpr size_t kPooledMaxBytes = size_t(1) << 30;

class BlockPool {
 public:
  void* get(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = free_.find(bytes);
      if (it != free_.end() && !it->second.empty()) {
        void* p = it->second.back();
        it->second.pop_back();
        cached_ -= bytes;
        return p;
      }
    }
    void* p = nullptr;
    TORCH_CHECK(posix_memalign(&p, 64, bytes) == 0, "mpq: out of memory allocating ", bytes, " bytes");
    return p;
  }
  void put(void* p, size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (cached_ + bytes <= kPooledMaxBytes) {
        free_[bytes].push_back(p);
        cached_ += bytes;
        return;
      }
    }
    std::free(p);
  }

 private:
  std::mutex mutex_;
  std::unordered_map<size_t, std::vector<void*>> free_;
  size_t cached_ = 0;
};

// NB: never destroyed (tensors may outlive static destruction at exit).
BlockPool& block_pool() {
  static auto* pool = new BlockPool();
  return *pool;
}

// at::empty(sizes, dtype, channels_last), large ones from block_pool().
at::Tensor output_tensor(at::IntArrayRef sizes, at::ScalarType dtype) {
  const size_t bytes = size_t(c10::multiply_integers(sizes)) * c10::elementSize(dtype);
  if (bytes < kPooledMinBytes)
    return at::empty(sizes, at::TensorOptions().dtype(dtype), at::MemoryFormat::ChannelsLast);
  void* p = block_pool().get(bytes);
  return at::for_blob(p, sizes)
      .strides(c10::get_channels_last_strides_2d(sizes))
      .deleter([bytes](void* q) { block_pool().put(q, bytes); })
      .options(at::TensorOptions().dtype(dtype))
      .make_tensor();
}

// `layer(n0, n)` (float32 [n, T, OH, OW] for images n0..n0+n-1) in chunks of images, each followed
// by the epilogue into the output [N, C, OH, OW] (channels_last, float32 or uint8 levels).
template <typename Layer>
at::Tensor run_chunked(at::IntArrayRef out_shape, int64_t T, const Epilogue& ep, const RowLayout& layout, Layer layer) {
  const int64_t N = out_shape[0], pixels = out_shape[2] * out_shape[3], C = out_shape[1];
  auto out = output_tensor(out_shape, ep.out.has_value() ? at::kByte : at::kFloat);
  ResidualRows res;
  if (ep.residual.has_value() && ep.residual->scalar_type() == at::kByte) {
    res.levels = ep.residual->data_ptr<uint8_t>();
    res.zp = float(ep.residual_grid->zero_point - ep.residual_grid->qmin);
    res.scale = float(ep.residual_grid->scale);
  } else if (ep.residual.has_value()) {
    res.values = ep.residual->data_ptr<float>();
  }
  const int64_t chunk = std::max<int64_t>(1, kChunkBytes / std::max<int64_t>(1, pixels * T * 4));
  for (int64_t n0 = 0; n0 < N; n0 += chunk) {
    const int64_t n = std::min(chunk, N - n0);
    const auto y = layer(n0, n).contiguous(at::MemoryFormat::ChannelsLast);
    epilogue_into(y, res.shifted(n0 * pixels * C), ep, layout, out.narrow(0, n0, n));
  }
  return out;
}

RowLayout plain_layout(int64_t C) {
  RowLayout plain;
  plain.stride = plain.channels = C;
  return plain;
}

// All of a convolution's points as one oneDNN int8 convolution: per group, its channels' first
// points (with the bias) then its further points (rows padded per group to one count, Re; bias 0),
// so the input is read once and one call's fixed cost is paid once; the epilogue adds the further
// points' columns into their channels.
struct PreparedCombined {
  Int8Rows rows;
  RowLayout layout;
  bool has_extra = false;
};

PreparedCombined combine_points(PreparedInt8 e, int64_t C, int64_t groups) {
  PreparedCombined p;
  const int64_t Cg = C / groups;
  p.layout.groups = groups;
  p.layout.channels = Cg;
  p.layout.stride = Cg;
  p.has_extra = e.has_extra;
  if (!e.has_extra) {
    p.rows = std::move(e.primary);
    return p;
  }
  // Rows are picked from [primary rows (C), extra rows (groups * Re), one zero row].
  const int64_t Re = e.extra.weight.size(0) / groups, zero_row = C + groups * Re;
  int64_t padded = Re;
  if (groups == 1) {
    // oneDNN's int8 kernels want whole blocks of 64 output channels: 2048 -> 515 runs ~500x slower
    // than 2048 -> 576 (AMX, 7 x 7 pixels). Pad the further points with zero rows up to one.
    padded = (Cg + Re + 63) / 64 * 64 - Cg;
  }
  p.layout.stride = Cg + padded;
  p.layout.at.resize(C);
  p.layout.runs.resize(groups);
  std::vector<int64_t> pick;
  const int64_t* ch = e.extra_channel.data_ptr<int64_t>();
  for (int64_t g = 0; g < groups; ++g) {
    std::vector<std::vector<int64_t>> further(Cg);  // per channel of the group: its extra rows, in point order
    for (int64_t i = 0; i < Re; ++i) {
      if (ch[g * Re + i] >= 0) further[ch[g * Re + i] - g * Cg].push_back(C + g * Re + i);
    }
    std::vector<int64_t> order(Cg);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(),
                     [&](int64_t a, int64_t b) { return further[a].size() > further[b].size(); });
    for (int64_t i = 0; i < Cg; ++i) {
      pick.push_back(g * Cg + order[i]);
      p.layout.at[g * Cg + order[i]] = int32_t(i);
    }
    int64_t placed = 0;
    for (size_t k = 0;; ++k) {
      int64_t m = 0;
      while (m < Cg && further[order[m]].size() > k) pick.push_back(further[order[m++]][k]);
      if (m == 0) break;
      p.layout.runs[g].push_back(m);
      placed += m;
    }
    pick.insert(pick.end(), padded - placed, zero_row);
  }
  const auto index = at::tensor(pick, at::TensorOptions().dtype(at::kLong));
  auto flat = [&](const at::Tensor& a, const at::Tensor& b, const at::Tensor& zero) {
    return at::cat({a.reshape({a.size(0), -1}), b.reshape({b.size(0), -1}), zero.reshape({1, -1}).to(a.dtype())})
        .index_select(0, index);
  };
  auto wshape = e.primary.weight.sizes().vec();
  wshape[0] = groups * (Cg + padded);
  p.rows.weight = flat(e.primary.weight, e.extra.weight, at::zeros({1, e.extra.weight[0].numel()}, at::kChar))
                      .reshape(wshape)
                      .contiguous();
  p.rows.w_scales =
      flat(e.primary.w_scales.unsqueeze(1), e.extra.w_scales.unsqueeze(1), at::ones({1})).reshape({-1}).contiguous();
  p.rows.w_zero_points = at::zeros({groups * (Cg + padded)}, at::kLong);
  if (e.primary.bias.has_value()) {
    p.rows.bias =
        flat(e.primary.bias->unsqueeze(1), at::zeros({groups * Re, 1}), at::zeros({1})).reshape({-1}).contiguous();
  }
  return p;
}

// The input as this layer's uint8 levels (channels_last): as given, or quantized in one pass.
at::Tensor levels_of(const at::Tensor& input, const ActQuant& q) {
  if (input.scalar_type() == at::kByte) return input.contiguous(at::MemoryFormat::ChannelsLast);
  return quantize_input(input, q, at::MemoryFormat::ChannelsLast);
}

// The input's fake-quantized float32 values (L - zp) * s: from the levels or from a float input.
at::Tensor fake_quantized_of(const at::Tensor& input, const c10::optional<at::Tensor>& act_qparams, const ActQuant& q) {
  if (input.scalar_type() != at::kByte) return fake_quantize_input(input, act_qparams, q);
  // u = L - qmin: (u - (zp - qmin)) * s in one pass, into the calling thread's scratch.
  return scratch_pass<uint8_t, float>(input, input.suggest_memory_format(), [&](const uint8_t* u, float* y, int64_t n) {
    level_values(u, y, n, float(q.zero_point - q.qmin), float(q.scale));
  });
}

// Depthwise convolution (groups = C_in = C_out) on uint8 levels, channels_last: per output pixel,
// acc[c] = sum over taps of w[tap, c] * (u - zp'), y = s * acc + bias. The weight is the dense sum
// of each channel's points (float32 [taps, C]), so the points cost nothing extra here; padding taps
// hold the level of 0.0 (u = zp') and contribute nothing, so they are skipped.
struct PreparedDepthwise {
  at::Tensor weight;  // float32 [kh * kw, C]
  at::Tensor bias;    // float32 [C] (zeros without a bias)
};

// The float values v = u - zp' of n levels.
__attribute__((target_clones("avx512f", "avx2", "default"))) void levels_to_float(const uint8_t* __restrict u,
                                                                                  float* __restrict v, int64_t n,
                                                                                  float zp) {
  for (int64_t i = 0; i < n; ++i) v[i] = static_cast<float>(u[i]) - zp;
}

at::Tensor depthwise_levels(const at::Tensor& u, const PreparedDepthwise& p, const ActQuant& q, int64_t kh, int64_t kw,
                            at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                            at::IntArrayRef out_shape) {
  const int64_t N = u.size(0), C = u.size(1), H = u.size(2), W = u.size(3);
  const int64_t OH = out_shape[2], OW = out_shape[3];
  auto y = at::empty(out_shape, u.options().dtype(at::kFloat), at::MemoryFormat::ChannelsLast);
  const uint8_t* xp = u.data_ptr<uint8_t>();
  const float* wp = p.weight.data_ptr<float>();
  const float* bp = p.bias.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const float zp = float(q.zero_point - q.qmin), scale = float(q.scale);
  const auto isa = cpu_isa();
  at::parallel_for(0, N * OH, 1, [&](int64_t b, int64_t e) {
    // Input rows as float values, one slot per kernel row; with dilation 1, input row ih sits in
    // slot ih % kh and is converted once for the kh output rows (stride 1) that read it.
    std::vector<float> buf(kh * W * C);
    std::vector<int64_t> held(kh, -1);  // (image, row) index held by each slot
    std::vector<const float*> rows(kh);
    for (int64_t r = b; r < e; ++r) {
      const int64_t n = r / OH, oh = r % OH;
      for (int64_t i = 0; i < kh; ++i) {
        const int64_t ih = oh * stride[0] - padding[0] + i * dilation[0];
        if (ih < 0 || ih >= H) {
          rows[i] = nullptr;
          continue;
        }
        const int64_t slot = dilation[0] == 1 ? ih % kh : i;
        float* dst = buf.data() + slot * W * C;
        if (held[slot] != n * H + ih) {
          levels_to_float(xp + (n * H + ih) * W * C, dst, W * C, zp);
          held[slot] = n * H + ih;
        }
        rows[i] = dst;
      }
      const kernels::DepthwiseRow row{rows.data(), wp, bp, scale, W, C, OW, kh, kw, stride[1], padding[1], dilation[1]};
      kernels::depthwise_row(row, yp + (n * OH + oh) * OW * C, isa);
    }
  });
  return y;
}

// The combined int8 form of a convolution weight (PreparedCombined), prepared once per weight,
// activation quantizer and geometry and shared by multipoint_conv2d_stored and _fused.
std::shared_ptr<PreparedCombined> prepared_combined(const char* op, const at::Tensor& point_codes,
                                                    const at::Tensor& point_scales, const at::Tensor& num_points,
                                                    int64_t w_bits, at::IntArrayRef code_shape,
                                                    const c10::optional<at::Tensor>& bias, const ActQuant& q,
                                                    at::IntArrayRef stride, at::IntArrayRef padding,
                                                    at::IntArrayRef dilation, int64_t groups) {
  auto key = conv_key(2.0, w_bits, groups, stride, padding, dilation);
  const auto values = qparam_values(q);
  key.insert(key.end(), values.begin(), values.end());
  return cache().get<PreparedCombined>(weight_tensors(point_codes, point_scales, num_points, bias), key, [&] {
    check_stored(op, point_codes, point_scales, num_points, w_bits, c10::multiply_integers(code_shape));
    auto c = combine_points(expand_points(point_codes, point_scales, num_points, w_bits, code_shape, bias, groups,
                                          levels_count(q)),
                            num_points.size(0), groups);
    c.rows.packs = prepack_conv(c.rows, q, stride, padding, dilation, groups);
    return c;
  });
}

}  // namespace

// multipoint_conv2d_stored's int8 path: the fused op's, with a float32 output and no epilogue
// beyond adding the further points.
at::Tensor int8_conv2d_stored(const char* op, const at::Tensor& input, const at::Tensor& point_codes,
                              const at::Tensor& point_scales, const at::Tensor& num_points, int64_t w_bits,
                              at::IntArrayRef code_shape, const c10::optional<at::Tensor>& bias, const ActQuant& q,
                              at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                              at::IntArrayRef out_shape) {
  const auto p = prepared_combined(op, point_codes, point_scales, num_points, w_bits, code_shape, bias, q, stride,
                                   padding, dilation, groups);
  const auto qx = levels_of(input, q);
  const int64_t zp = int64_t(q.zero_point - q.qmin);
  const float inf = std::numeric_limits<float>::infinity();
  const Epilogue ep{c10::nullopt, -inf, inf, c10::nullopt};
  return run_chunked(out_shape, p->rows.w_scales.size(0), ep, p->layout, [&](int64_t n0, int64_t n) {
    return call_qconv(qx.narrow(0, n0, n), q.scale, zp, p->rows, stride, padding, dilation, groups);
  });
}

at::Tensor multipoint_conv2d_fused_cpu(const at::Tensor& input, const at::Tensor& point_codes,
                                       const at::Tensor& point_scales, const at::Tensor& num_points, int64_t w_bits,
                                       at::IntArrayRef code_shape, const c10::optional<at::Tensor>& bias,
                                       const at::Tensor& act_qparams, at::IntArrayRef stride, at::IntArrayRef padding,
                                       at::IntArrayRef dilation, int64_t groups,
                                       const c10::optional<at::Tensor>& residual, c10::optional<double> clamp_min,
                                       c10::optional<double> clamp_max, const c10::optional<at::Tensor>& out_qparams,
                                       c10::string_view path, const c10::optional<at::Tensor>& residual_qparams) {
  const char* op = "mpq::multipoint_conv2d_fused";
  TORCH_CHECK(code_shape.size() == 3, op, ": expected code_shape [C_in/groups, kh, kw], got ", code_shape);
  check_stored(op, point_codes, point_scales, num_points, w_bits, c10::multiply_integers(code_shape), false);
  TORCH_CHECK(path == "auto" || path == "int8" || path == "dense" || path == "depthwise", op,
              ": expected path \"auto\", \"int8\", \"dense\" or \"depthwise\", got \"", std::string(path), "\"");
  TORCH_CHECK(input.scalar_type() == at::kFloat || input.scalar_type() == at::kByte, op,
              ": expected a float32 input or uint8 levels, got ", input.scalar_type());
  // None: no bound (what ±inf would say; AOTInductor's package format cannot hold an infinite float).
  const double lo = clamp_min.value_or(-std::numeric_limits<double>::infinity());
  const double hi = clamp_max.value_or(std::numeric_limits<double>::infinity());
  TORCH_CHECK(!(lo > hi), op, ": expected clamp_min <= clamp_max, got ", lo, " > ", hi);
  const int64_t C = num_points.size(0);
  TORCH_CHECK(groups >= 1 && C % groups == 0, op, ": expected groups (", groups, ") to divide the ", C,
              " output channels");
  const ActQuant q = read_act_qparams(op, act_qparams);
  TORCH_CHECK(input.scalar_type() != at::kByte || int8_fits(q), op,
              ": a uint8 input needs act_qparams with at most 256 integer levels");
  Epilogue ep{c10::nullopt, float(lo), float(hi), c10::nullopt};
  if (out_qparams.has_value()) {
    ep.out = read_act_qparams(op, *out_qparams);
    TORCH_CHECK(int8_fits(*ep.out), op, ": out_qparams must have at most 256 integer levels (uint8 output)");
    // A clamp bound that the output quantizer implies changes no level (levels are monotone in the
    // value: if hi already takes the top level, so does everything above it): drop it, so that a
    // ReLU6 before a grid that ends at or below 6 runs as a ReLU or as nothing, on oneDNN's uint8
    // output (EfficientNet-Lite's expansions).
    const auto& o = *ep.out;
    constexpr float inf = std::numeric_limits<float>::infinity();
    const auto level = [&](float v) {
      return activation_level(v, float(o.scale), float(o.zero_point), float(o.qmin), float(o.qmax));
    };
    if (ep.lo <= ep.hi && std::isfinite(ep.hi) && level(ep.hi) == float(o.qmax)) ep.hi = inf;
    if (ep.lo <= ep.hi && std::isfinite(ep.lo) && level(ep.lo) == float(o.qmin)) ep.lo = -inf;
  }
  const auto out_shape = check_stored_conv2d_args(op, input, C, code_shape, bias, act_qparams, stride, padding,
                                                  dilation, groups);
  if (residual.has_value()) {
    TORCH_CHECK((residual->scalar_type() == at::kFloat || residual->scalar_type() == at::kByte) &&
                    residual->sizes() == at::IntArrayRef(out_shape),
                op, ": expected residual float32 or uint8 levels of the output's shape ", at::IntArrayRef(out_shape),
                ", got ", residual->scalar_type(), residual->sizes());
    TORCH_CHECK(residual->scalar_type() == at::kFloat || residual_qparams.has_value(), op,
                ": a uint8 residual needs residual_qparams (the quantizer of its levels)");
    if (residual->scalar_type() == at::kByte) {
      ep.residual_grid = read_act_qparams(op, *residual_qparams);
      TORCH_CHECK(int8_fits(*ep.residual_grid), op, ": residual_qparams must have at most 256 integer levels");
    }
    ep.residual = residual->contiguous(at::MemoryFormat::ChannelsLast);
  }
  const bool depthwise_ok = groups == C && code_shape[0] == 1 && int8_fits(q);
  const int64_t taps = code_shape[1] * code_shape[2];
  const bool int8_ok = int8_fits(q) && int8_kernels_exact(w_bits, levels_count(q));
  TORCH_CHECK(path != "int8" || int8_ok, op,
              ": path \"int8\" needs act_qparams with at most 256 integer levels and, for 8-bit codes, a CPU with "
              "VNNI or activations of at most 128 levels (oneDNN's int8 kernels saturate them otherwise)");
  TORCH_CHECK(path != "depthwise" || depthwise_ok, op,
              ": path \"depthwise\" needs groups = in_channels = out_channels and act_qparams that fit uint8");
  std::string choice(path);
  if (path == "auto") {
    // Measured per shape (2 threads, AMX, batch 16 unless said; ms int8 / float path / FP32 conv;
    // benchmarks/NOTES.md): the int8 path wins once the reduction has K = C_in/g * kh * kw >= 32
    // terms and at least 16 outputs per group: 3 -> 64 7 x 7 stem 25 / 33 / 30, 32 -> 16 1 x 1
    // 3.6 / 4.3, 256 -> 1024 1 x 1 2.5 / 7.4, 64 -> 256 1 x 1 with float output 27 / 27; below,
    // the float path: 3 -> 32 3 x 3 stem 5.7 / 3.8, 16 -> 96 1 x 1 at 112 px 37 / 31.
    const bool int8_wins = c10::multiply_integers(code_shape) >= 32 && C / groups >= kInt8MinGroupChannels;
    choice = depthwise_ok ? "depthwise" : (int8_ok && int8_wins ? "int8" : "dense");
  }
  if (C == 0 || input.numel() == 0) {  // nothing to compute: an empty output
    return at::empty(out_shape, input.options().dtype(ep.out.has_value() ? at::kByte : at::kFloat),
                     at::MemoryFormat::ChannelsLast);
  }
  const auto weights = weight_tensors(point_codes, point_scales, num_points, bias);
  if (choice == "depthwise") {
    auto p = cache().get<PreparedDepthwise>(weights, conv_key(3.0, w_bits, groups, stride, padding, dilation), [&] {
      const auto w = dense_from_stored(point_codes, point_scales, num_points, w_bits, code_shape, at::kFloat);
      return PreparedDepthwise{w.reshape({C, taps}).t().contiguous(),
                               bias.has_value() ? bias->to(at::kFloat).contiguous() : at::zeros({C}, at::kFloat)};
    });
    const auto u = levels_of(input, q);
    return run_chunked(out_shape, C, ep, plain_layout(C), [&](int64_t n0, int64_t n) {
      auto shape = out_shape;
      shape[0] = n;
      return depthwise_levels(u.narrow(0, n0, n), *p, q, code_shape[1], code_shape[2], stride, padding, dilation,
                              shape);
    });
  }
  if (choice == "dense") {
    // The same key as multipoint_conv2d_stored's dense path: one decoded weight for both ops.
    auto p = cache().get<PreparedDense>(weights, conv_key(0.0, w_bits, groups, stride, padding, dilation), [&] {
      return PreparedDense{dense_from_stored(point_codes, point_scales, num_points, w_bits, code_shape, at::kFloat)};
    });
    const auto b = bias.has_value() ? c10::optional<at::Tensor>(bias->to(at::kFloat)) : c10::nullopt;
    return run_chunked(out_shape, C, ep, plain_layout(C), [&](int64_t n0, int64_t n) {
      return at::conv2d(fake_quantized_of(input.narrow(0, n0, n), act_qparams, q), p->weight, b, stride, padding,
                        dilation, groups);
    });
  }
  const auto p = prepared_combined(op, point_codes, point_scales, num_points, w_bits, code_shape, bias, q, stride,
                                   padding, dilation, groups);
  const auto qx = levels_of(input, q);
  const int64_t zp = int64_t(q.zero_point - q.qmin);
  const bool relu = ep.lo == 0.0f && ep.hi == std::numeric_limits<float>::infinity();
  const bool plain = ep.lo == -std::numeric_limits<float>::infinity() &&
                     ep.hi == std::numeric_limits<float>::infinity();
  if (!p->has_extra && ep.out.has_value()) {
    // No further points: oneDNN writes the levels itself (the clamp, output scale and zero point),
    // adding a uint8 residual with its sum post-op (on a copy: the op writes into its accumulator).
    // Its uint8 output saturates to 0..255: a ReLU or nothing on a grid of 256 levels, else its
    // hardtanh clamps to the clamp's and the grid's bounds (values (qmin - zp) s .. (qmax - zp) s,
    // whose levels are qmin and qmax: 7-bit grids, or a ReLU6 inside the grid).
    const auto& o = *ep.out;
    OutClamp clamp;
    if (o.qmax - o.qmin == layout::kInt8Levels - 1 && (relu || plain)) {
      clamp.kind = relu ? OutClamp::kRelu : OutClamp::kNone;
    } else {
      clamp.kind = OutClamp::kHardtanh;
      clamp.lo = std::max<double>(ep.lo, (o.qmin - o.zero_point) * o.scale);
      clamp.hi = std::min<double>(ep.hi, (o.qmax - o.zero_point) * o.scale);
    }
    const int64_t out_zp = int64_t(o.zero_point - o.qmin);
    if (!ep.residual.has_value()) {
      return call_qconv(qx, q.scale, zp, p->rows, stride, padding, dilation, groups, o.scale, out_zp, clamp)
          .contiguous(at::MemoryFormat::ChannelsLast);
    }
    if (ep.residual_grid.has_value() && clamp.kind != OutClamp::kHardtanh) {  // sum: ReLU or nothing only
      const auto& g = *ep.residual_grid;
      return call_qconv_sum(qx, q.scale, zp, p->rows, stride, padding, dilation, groups,
                            ep.residual->clone(at::MemoryFormat::ChannelsLast), g.scale, int64_t(g.zero_point - g.qmin),
                            o.scale, out_zp, clamp)
          .contiguous(at::MemoryFormat::ChannelsLast);
    }
  }
  return run_chunked(out_shape, p->rows.w_scales.size(0), ep, p->layout, [&](int64_t n0, int64_t n) {
    return call_qconv(qx.narrow(0, n0, n), q.scale, zp, p->rows, stride, padding, dilation, groups);
  });
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
                                        const c10::optional<at::Tensor>& act_qparams, c10::string_view kernel) {
  auto [codes, scales] = unpack_all(point_codes, point_scales, num_points, w_bits, in_features);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mpq::multipoint_linear", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&)>();
  return op.call(input, codes, scales, num_points, bias, act_qparams);
}

at::Tensor multipoint_conv2d_stored_any(const at::Tensor& input, const at::Tensor& point_codes,
                                        const at::Tensor& point_scales, const at::Tensor& num_points, int64_t w_bits,
                                        at::IntArrayRef code_shape, const c10::optional<at::Tensor>& bias,
                                        const c10::optional<at::Tensor>& act_qparams, at::IntArrayRef stride,
                                        at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                        c10::string_view kernel) {
  TORCH_CHECK(code_shape.size() == 3, "mpq::multipoint_conv2d_stored: expected code_shape [C_in/groups, kh, kw], got ",
              code_shape);
  auto [codes, scales] = unpack_all(point_codes, point_scales, num_points, w_bits, c10::multiply_integers(code_shape));
  std::vector<int64_t> shape = {codes.size(0), codes.size(1)};
  for (auto s : code_shape) shape.push_back(s);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mpq::multipoint_conv2d", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&,
                                         at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t)>();
  return op.call(input, codes.reshape(shape), scales, num_points, bias, act_qparams, stride, padding, dilation, groups);
}

at::Tensor multipoint_conv2d_fused_any(const at::Tensor& input, const at::Tensor& point_codes,
                                       const at::Tensor& point_scales, const at::Tensor& num_points, int64_t w_bits,
                                       at::IntArrayRef code_shape, const c10::optional<at::Tensor>& bias,
                                       const at::Tensor& act_qparams, at::IntArrayRef stride, at::IntArrayRef padding,
                                       at::IntArrayRef dilation, int64_t groups,
                                       const c10::optional<at::Tensor>& residual, c10::optional<double> clamp_min,
                                       c10::optional<double> clamp_max, const c10::optional<at::Tensor>& out_qparams,
                                       c10::string_view path, const c10::optional<at::Tensor>& residual_qparams) {
  const char* op = "mpq::multipoint_conv2d_fused";
  const ActQuant q = read_act_qparams(op, act_qparams);
  auto x = input;
  if (input.scalar_type() == at::kByte) {  // the levels' values; the layer's quantizer gives them back exactly
    x = input.to(point_scales.dtype()).sub_(q.zero_point - q.qmin).mul_(q.scale);
  }
  auto y = multipoint_conv2d_stored_any(x, point_codes, point_scales, num_points, w_bits, code_shape, bias, act_qparams,
                                        stride, padding, dilation, groups, "auto");
  if (residual.has_value() && residual->scalar_type() == at::kByte) {
    TORCH_CHECK(residual_qparams.has_value(), op,
                ": a uint8 residual needs residual_qparams (the quantizer of its levels)");
    const ActQuant r = read_act_qparams(op, *residual_qparams);
    y = y + residual->to(y.scalar_type()).sub_(r.zero_point - r.qmin).mul_(r.scale);
  } else if (residual.has_value()) {
    y = y + *residual;
  }
  y = at::clamp(y, clamp_min.value_or(-std::numeric_limits<double>::infinity()),
                clamp_max.value_or(std::numeric_limits<double>::infinity()));
  if (!out_qparams.has_value()) return y;
  const ActQuant o = read_act_qparams(op, *out_qparams);
  return (at::clamp(at::round(y / o.scale) + o.zero_point, o.qmin, o.qmax) - o.qmin).to(at::kByte);
}

}  // namespace mpq

TORCH_LIBRARY_IMPL(mpq, CompositeExplicitAutograd, m) {
  m.impl("pack_points", &mpq::pack_points);
  m.impl("unpack_points", &mpq::unpack_points);
  m.impl("multipoint_linear_stored", &mpq::multipoint_linear_stored_any);
  m.impl("multipoint_conv2d_stored", &mpq::multipoint_conv2d_stored_any);
  m.impl("multipoint_conv2d_fused", &mpq::multipoint_conv2d_fused_any);
}

TORCH_LIBRARY_IMPL(mpq, CPU, m) {
  m.impl("multipoint_linear_stored", &mpq::multipoint_linear_stored_cpu);
  m.impl("multipoint_conv2d_stored", &mpq::multipoint_conv2d_stored_cpu);
  m.impl("multipoint_conv2d_fused", &mpq::multipoint_conv2d_fused_cpu);
}
