// C++ deployment through LibTorch: the mpq ops called through the dispatcher against ATen on
// the dequantized weight ([dispatcher]), and TorchScript mpq models written by Python
// (make_scripted_models.py, a CTest fixture) run here with Python's output ([scripted]).
// Nothing here references a symbol of libmpq_ops.so: the ops come from its static
// initialisers, kept by mpq_ops' --no-as-needed link option.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/cuda.h>
#include <torch/script.h>

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <optional>
#include <sstream>
#include <string>

#include "catch_compat.h"  // MPQ_SKIP: ctest reports the test as skipped
#include "kernels/layout.h"
#include "kernels/packed_layout.h"

#ifndef MPQ_SCRIPTED_MODELS_DIR
#error "MPQ_SCRIPTED_MODELS_DIR must name the directory make_scripted_models.py writes into"
#endif

namespace {

using LinearFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const std::optional<at::Tensor>&, const std::optional<at::Tensor>&);
using Conv2dFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, c10::IntArrayRef,
                            c10::IntArrayRef, c10::IntArrayRef, int64_t);
using DequantizeFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::ScalarType);

c10::TypedOperatorHandle<LinearFn> linear_op() {
  return c10::Dispatcher::singleton().findSchemaOrThrow("mpq::multipoint_linear", "").typed<LinearFn>();
}

// max |a - b| / max |b|: "relative" at the scale of the output, robust to outputs near 0.
double max_relative_difference(const at::Tensor& a, const at::Tensor& b) {
  const auto ref = b.to(at::kDouble);
  const double scale = ref.abs().max().item<double>();
  return (a.to(at::kDouble) - ref).abs().max().item<double>() / std::max(scale, 1e-30);
}

struct Multipoint {
  at::Tensor codes, scales, num_points;
};

// codes in -K..K (K = 7, 4 bits), scales > 0 over two decades, num_points in 0..P with a
// 0-point and a P-point channel: every path of the dequantization.
Multipoint random_multipoint(int64_t C, int64_t P, at::IntArrayRef inner) {
  std::vector<int64_t> shape = {C, P};
  shape.insert(shape.end(), inner.begin(), inner.end());
  Multipoint m;
  m.codes = at::randint(-7, 8, shape, at::kChar);
  m.scales = (at::rand({C, P}) * 4 - 2).exp() * 0.05;
  m.num_points = at::randint(0, P + 1, {C}, at::kInt);
  m.num_points[0] = 0;
  m.num_points[C - 1] = static_cast<int>(P);
  return m;
}

// The dense weight sum_{k < n_j} scales[j,k] codes[j,k], in float64, written out here.
at::Tensor dequantize_reference(const Multipoint& m) {
  const int64_t P = m.codes.size(1);
  auto active = (at::arange(P, at::kInt).unsqueeze(0) < m.num_points.unsqueeze(1)).to(at::kDouble);
  auto s = (m.scales.to(at::kDouble) * active);
  std::vector<int64_t> view = {s.size(0), P};
  for (int64_t d = 2; d < m.codes.dim(); ++d) view.push_back(1);
  return (s.view(view) * m.codes.to(at::kDouble)).sum(1);
}

// Per-tensor fake quantization as the schema defines it, in the input's dtype.
at::Tensor fake_quantize(const at::Tensor& x, double scale, double zero_point, double qmin, double qmax) {
  return (at::clamp(at::round(x / scale) + zero_point, qmin, qmax) - zero_point) * scale;
}

bool mpq_has_cuda_kernels() {
  auto info = c10::Dispatcher::singleton().findSchemaOrThrow("mpq::_build_info", "").typed<std::string()>();
  return info.call().find("\"cuda_kernels\": true") != std::string::npos;
}

std::filesystem::path models_dir() { return std::filesystem::path(MPQ_SCRIPTED_MODELS_DIR); }

// Loads NAME.pt and NAME_io.pt, runs the model on the saved input, compares with Python's
// output; returns the max relative difference.
double run_scripted(const std::string& name, c10::Device device) {
  const auto model_path = models_dir() / (name + ".pt");
  const auto io_path = models_dir() / (name + "_io.pt");
  INFO("model " << model_path.string());
  REQUIRE(std::filesystem::exists(model_path));
  REQUIRE(std::filesystem::exists(io_path));

  torch::jit::Module io = torch::jit::load(io_path.string());
  const at::Tensor input = io.attr("input").toTensor();
  const at::Tensor expected = io.attr("output").toTensor();
  const int64_t expected_layers = io.attr("multipoint_layers").toInt();

  torch::jit::Module model = torch::jit::load(model_path.string(), device);
  model.eval();
  // Scripted and traced modules keep their class names (mangled in the namespace, not the name).
  int64_t layers = 0;
  for (const auto& sub : model.named_modules()) {
    const auto type = sub.value.type()->name();
    const auto kind = type ? type->name() : std::string();
    if (kind == "MultipointConv2d" || kind == "MultipointLinear" || kind == "GroupwiseConv2d" ||
        kind == "GroupwiseLinear") {
      ++layers;
    }
  }
  INFO("multipoint modules found: " << layers << ", Python reported " << expected_layers);
  CHECK(layers == expected_layers);

  c10::InferenceMode guard;
  at::Tensor out = model.forward({input.to(device)}).toTensor().cpu();
  REQUIRE(out.sizes() == expected.sizes());
  REQUIRE(out.scalar_type() == expected.scalar_type());
  const double rel = max_relative_difference(out, expected);
  std::cout << "mpq scripted model " << name << " on " << device << ": max |C++ - Python| / max |Python| = " << rel
            << std::endl;
  return rel;
}

}  // namespace

// ---- ops through the dispatcher ---------------------------------------------------------------

TEST_CASE("mpq ops are registered with the dispatcher", "[dispatcher]") {
  auto& dispatcher = c10::Dispatcher::singleton();
  for (const char* op : {"mpq::fit_multipoint", "mpq::dequantize_multipoint", "mpq::multipoint_linear",
                         "mpq::multipoint_conv2d", "mpq::_build_info"}) {
    INFO(op);
    CHECK(dispatcher.findSchema({op, ""}).has_value());
  }
  const auto schema = linear_op().schema();
  CHECK(schema.arguments().size() == 6);
  CHECK(schema.arguments()[4].name() == "bias");
}

TEST_CASE("mpq::layout_constants from C++ are the library's constants, without a tensor", "[dispatcher]") {
  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("mpq::layout_constants", "")
                .typed<c10::Dict<std::string, int64_t>()>();
  const auto c = op.call();
  CHECK(c.at("min_w_bits") == mpq::layout::kMinWBits);
  CHECK(c.at("max_w_bits") == mpq::layout::kMaxWBits);
  CHECK(c.at("max_points") == mpq::layout::kMaxPoints);
  CHECK(c.at("scale_bits") == mpq::layout::kScaleBits);
  CHECK(c.at("tile_n") == mpq::packed::kTileN);
  CHECK(c.at("slab_k") == mpq::packed::kSlabK);
  CHECK(c.at("int8_max_k") == mpq::packed::kInt8MaxK);
  CHECK(c.at("slab_bytes_nibble") == mpq::packed::slab_bytes(4));
  // The predicates answer on the values, as Python's modules ask them.
  auto fits = c10::Dispatcher::singleton()
                  .findSchemaOrThrow("mpq::packed_int8_fits", "")
                  .typed<bool(const at::Tensor&, c10::IntArrayRef)>();
  const auto qp = at::tensor({0.05f, 0.0f, 0.0f, 255.0f});
  CHECK(fits.call(qp, {16, 3, 3}));
  CHECK_FALSE(fits.call(qp, {15, 3, 3}));
  CHECK_FALSE(fits.call(at::tensor({0.05f, 0.0f, 0.0f, 256.0f}), {64}));
}

TEST_CASE("mpq::dequantize_multipoint from C++ equals the weight written out", "[dispatcher]") {
  at::manual_seed(0);
  auto op = c10::Dispatcher::singleton().findSchemaOrThrow("mpq::dequantize_multipoint", "").typed<DequantizeFn>();
  const auto m = random_multipoint(13, 3, {2, 3, 3});
  const auto w = op.call(m.codes, m.scales, m.num_points, at::kDouble);
  REQUIRE(w.sizes() == at::IntArrayRef({13, 2, 3, 3}));
  CHECK(max_relative_difference(w, dequantize_reference(m)) < 1e-12);
  CHECK(w[0].abs().max().item<double>() == 0.0);  // the 0-point channel
  CHECK(max_relative_difference(op.call(m.codes, m.scales, m.num_points, at::kFloat), dequantize_reference(m)) < 1e-6);
}

TEST_CASE("mpq::multipoint_linear from C++ equals at::linear on the dequantized weight", "[dispatcher]") {
  at::manual_seed(1);
  auto op = linear_op();
  const int64_t C = 37, P = 4, D = 53;
  const auto m = random_multipoint(C, P, {D});
  const auto w = dequantize_reference(m);
  const auto bias = at::randn({C});
  const auto x = at::randn({3, 5, D});  // leading dimensions are kept

  SECTION("float32, float activations, with and without bias") {
    auto out = op.call(x, m.codes, m.scales, m.num_points, bias, std::nullopt);
    REQUIRE(out.sizes() == at::IntArrayRef({3, 5, C}));
    CHECK(max_relative_difference(out, at::linear(x.to(at::kDouble), w, bias.to(at::kDouble))) < 1e-5);
    CHECK(max_relative_difference(out, at::linear(x, w.to(at::kFloat), bias)) < 1e-5);
    auto no_bias = op.call(x, m.codes, m.scales, m.num_points, std::nullopt, std::nullopt);
    CHECK(max_relative_difference(no_bias, at::linear(x.to(at::kDouble), w)) < 1e-5);
  }
  SECTION("float64 is exact") {
    auto out = op.call(x.to(at::kDouble), m.codes, m.scales, m.num_points, bias, std::nullopt);
    CHECK(out.scalar_type() == at::kDouble);
    CHECK(max_relative_difference(out, at::linear(x.to(at::kDouble), w, bias.to(at::kDouble))) < 1e-12);
  }
  SECTION("8-bit activations with a zero point") {
    // The op reads act_qparams as float32: the reference uses the float32 scale too.
    const double scale = static_cast<float>(0.02), zero_point = 128, qmin = 0, qmax = 255;
    const auto act = at::tensor({scale, zero_point, qmin, qmax}, at::kFloat);
    auto out = op.call(x.to(at::kDouble), m.codes, m.scales, m.num_points, bias, act);
    auto ref = at::linear(fake_quantize(x.to(at::kDouble), scale, zero_point, qmin, qmax), w, bias.to(at::kDouble));
    CHECK(max_relative_difference(out, ref) < 1e-12);
  }
}

TEST_CASE("mpq::multipoint_conv2d from C++ equals at::conv2d on the dequantized weight", "[dispatcher]") {
  at::manual_seed(2);
  auto op = c10::Dispatcher::singleton().findSchemaOrThrow("mpq::multipoint_conv2d", "").typed<Conv2dFn>();
  const int64_t groups = 4, C_in = 8, C_out = 12;
  const auto m = random_multipoint(C_out, 3, {C_in / groups, 3, 3});
  const auto w = dequantize_reference(m);
  const auto bias = at::randn({C_out});
  const auto x = at::randn({2, C_in, 11, 9});
  const std::vector<int64_t> stride = {2, 1}, padding = {1, 2}, dilation = {1, 2};
  auto out = op.call(x, m.codes, m.scales, m.num_points, bias, std::nullopt, stride, padding, dilation, groups);
  auto ref = at::conv2d(x.to(at::kDouble), w, bias.to(at::kDouble), stride, padding, dilation, groups);
  REQUIRE(out.sizes() == ref.sizes());
  CHECK(max_relative_difference(out, ref) < 1e-5);
}

TEST_CASE("mpq ops report a wrong argument by op and argument name", "[dispatcher]") {
  at::manual_seed(3);
  const auto m = random_multipoint(4, 2, {8});
  const auto x = at::randn({2, 8});
  std::string message;
  try {
    linear_op().call(x, m.codes.to(at::kFloat), m.scales, m.num_points, std::nullopt, std::nullopt);
  } catch (const c10::Error& e) {
    message = e.what();
  }
  INFO(message);
  CHECK(message.find("mpq::multipoint_linear") != std::string::npos);
  CHECK(message.find("codes") != std::string::npos);
  CHECK_THROWS_AS(linear_op().call(at::randn({2, 7}), m.codes, m.scales, m.num_points, std::nullopt, std::nullopt),
                  c10::Error);
}

TEST_CASE("mpq::multipoint_linear on CUDA equals the CPU kernel", "[dispatcher][cuda]") {
  if (!torch::cuda::is_available()) MPQ_SKIP("no CUDA GPU: the CUDA kernels are tested on GPU machines");
  if (!mpq_has_cuda_kernels())
    MPQ_SKIP("libmpq_ops.so was built without CUDA kernels (MPQ_ENABLE_CUDA=OFF or no nvcc)");
  at::manual_seed(4);
  const auto m = random_multipoint(64, 4, {96});
  const auto x = at::randn({16, 96});
  const auto bias = at::randn({64});
  const auto act = at::tensor({0.05, 0.0, -128.0, 127.0}, at::kFloat);
  auto cpu = linear_op().call(x, m.codes, m.scales, m.num_points, bias, act);
  const c10::Device cuda(c10::kCUDA);
  auto gpu = linear_op().call(x.to(cuda), m.codes.to(cuda), m.scales.to(cuda), m.num_points.to(cuda), bias.to(cuda),
                              act.to(cuda));
  CHECK(max_relative_difference(gpu.cpu(), cpu) < 1e-4);
}

// ---- scripted models written by Python ------------------------------------------------------

TEST_CASE("scripted small ResNet (W3A8) from Python runs in C++ with Python's output", "[scripted]") {
  CHECK(run_scripted("small_resnet_w3a8", c10::kCPU) <= 1e-5);
}

TEST_CASE("scripted small ResNet (W4A16, float activations) from Python runs in C++ with Python's output",
          "[scripted]") {
  CHECK(run_scripted("small_resnet_w4a16", c10::kCPU) <= 1e-5);
}

TEST_CASE("scripted small ResNet with group-wise layers (GPTQ g8, W4A8) runs in C++ with Python's output",
          "[scripted]") {
  CHECK(run_scripted("small_resnet_gptq_g8_w4a8", c10::kCPU) <= 1e-5);
}

TEST_CASE("traced EfficientNet-Lite0 (W4A8) from Python runs in C++ with Python's output", "[scripted]") {
  const auto skip = models_dir() / "efficientnet_lite0_w4a8.skip";
  if (std::filesystem::exists(skip)) {
    std::ifstream in(skip);
    std::stringstream reason;
    reason << in.rdbuf();
    MPQ_SKIP(reason.str());
  }
  CHECK(run_scripted("efficientnet_lite0_w4a8", c10::kCPU) <= 1e-5);
}

TEST_CASE("scripted small ResNet on CUDA agrees with Python's CPU output", "[scripted][cuda]") {
  if (!torch::cuda::is_available()) MPQ_SKIP("no CUDA GPU: the CUDA path is tested on GPU machines");
  if (!mpq_has_cuda_kernels())
    MPQ_SKIP("libmpq_ops.so was built without CUDA kernels (MPQ_ENABLE_CUDA=OFF or no nvcc)");
  // TF32 and a different summation order: agreement at the level of 8-bit activations.
  CHECK(run_scripted("small_resnet_w4a16", c10::Device(c10::kCUDA)) <= 1e-3);
}
