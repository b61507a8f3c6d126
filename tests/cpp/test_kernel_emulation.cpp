// The packed multipoint CUDA kernels (csrc/cuda/packed_kernels.cuh), their own source compiled for
// the host and run by tests/cpp/simt_emulator.h: every thread a fiber, every mma.sync a warp
// collective from the PTX ISA's tables. Each kernel configuration the host code launches
// (csrc/cuda/multipoint_packed.cu: gemv with warps splitting K, mma with warps splitting M, the
// int8 W4A8 path with its quantize kernel, K split across CTAs with the finalize kernel, the
// implicit-GEMM convolutions, the dense decode) runs on packed weights from mpq::pack_multipoint
// and is compared with mpq's CPU ops and a float64 reference, outputs poisoned with NaN first.
// The launches (grids, blocks, the K split, its workspace) are the library's own code
// (csrc/cuda/packed_launch.cuh), given the emulator as the launcher.
// What a GPU must still show: that the intrinsics, the memory system and the launch behave as
// emulated here (tests/python/test_cuda.py), and the speed (benchmarks/kernels.py).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdint>
#include <functional>
#include <string>
#include <tuple>
#include <vector>

#include "catch_compat.h"
#include "simt_emulator.h"  // after the torch headers, before the kernels
#include "cuda/layer_kernels.cuh"
#include "cuda/packed_kernels.cuh"
#include "cuda/packed_launch.cuh"

namespace {

namespace pk = mpq::packed_kernels;
namespace lk = mpq::layer_kernels;
using Packed = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

constexpr int kEmulatedSms = 4;  // few "multiprocessors": small problems take the split-K path too

Packed pack(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& num_points, int64_t w_bits,
            int64_t groups = 1) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mpq::pack_multipoint", "")
                       .typed<Packed(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t)>();
  return op.call(codes, scales, num_points, w_bits, groups);
}

at::Tensor dequantize(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& num_points,
                      at::ScalarType dtype = at::kDouble) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mpq::dequantize_multipoint", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, at::ScalarType)>();
  return op.call(codes, scales, num_points, dtype);
}

// The levels clamp(round(x / s) + zp, qmin, qmax), each step in x's dtype as mpq's fake quantization
// computes them (CPU and CUDA), then (level - zp) * s in float64: the reference's activations.
at::Tensor fake_quantize64(const at::Tensor& x, const std::vector<float>& q) {
  const auto v = at::clamp(at::round(x / q[0]) + q[1], q[2], q[3]).to(at::kDouble);
  return (v - q[1]) * q[0];
}

struct Weight {
  at::Tensor codes, scales, num_points;
};

// Codes over the storage range, scales over two decades, mixed counts with a 0 and a P.
Weight random_weight(int64_t C, int64_t P, int64_t D, int w_bits, uint64_t seed) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  const int64_t lo = w_bits <= 4 ? -8 : -(int64_t{1} << (w_bits - 1)), hi = -lo;
  Weight w;
  w.codes = at::randint(lo, hi, {C, P, D}, gen, at::TensorOptions().dtype(at::kChar));
  w.scales = ((at::rand({C, P}, gen) * 4 - 2).exp() * 0.05).to(at::kFloat);
  w.num_points = at::randint(0, P + 1, {C}, gen, at::TensorOptions().dtype(at::kInt));
  if (C >= 2) {
    w.num_points[0] = 0;
    w.num_points[C - 1] = static_cast<int>(P);
  }
  return w;
}

pk::PackedWeight view(const Packed& p, int64_t out_features) {
  const auto& [packed, scales, perm, offsets, row_sums] = p;
  return pk::PackedWeight{packed.data_ptr<uint8_t>(),
                          scales.data_ptr<float>(),
                          perm.data_ptr<int>(),
                          offsets.data_ptr<int>(),
                          row_sums.data_ptr<float>(),
                          packed.size(0),
                          packed.size(1),
                          static_cast<int>(perm.size(0) / pk::kTileN),
                          static_cast<int>(out_features)};
}

pk::OutType out_type(at::ScalarType t) {
  return t == at::kHalf ? pk::OutType::kHalf : (t == at::kBFloat16 ? pk::OutType::kBFloat16 : pk::OutType::kFloat);
}

pk::ActParams host_act(const std::vector<float>& q) {
  pk::ActParams act{nullptr, {0.0f, 0.0f, 0.0f, 0.0f}};
  if (!q.empty()) std::copy(q.begin(), q.end(), act.host);
  return act;
}

// The Launcher of csrc/cuda/packed_launch.cuh: the emulator, a few multiprocessors, workspaces
// poisoned with NaN (a partial sum the main kernel does not write reaches the output as NaN).
struct EmulatedLauncher {
  std::vector<at::Tensor> workspaces;
  int multiprocessors() const { return kEmulatedSms; }
  float* workspace(int64_t n) {
    workspaces.push_back(at::full({n}, NAN));
    return workspaces.back().data_ptr<float>();
  }
  template <class Kernel, class... Args>
  void operator()(dim3 grid, dim3 block, size_t shared_bytes, Kernel kernel, Args... args) const {
    mpq_simt::launch_shared(grid, block, shared_bytes, kernel, args...);
  }
};

// multipoint_packed.cu's launches of one configuration of the main loop into out.
template <class Op>
void launch_config(bool small_m, const typename Op::Args& args, const pk::PackedWeight& w, int64_t M, int64_t D,
                   const pk::ActParams& act, bool int8_act, const float* bias, at::Tensor& out) {
  EmulatedLauncher launch;
  pk::launch_config<Op>(launch, small_m, args, w, M, D, act, int8_act, bias, out.data_ptr(),
                        out_type(out.scalar_type()));
}

// xq [rows, kp] of quantize_int8_kernel, emulated, poisoned first.
template <typename scalar_t>
at::Tensor quantize_int8(const at::Tensor& x, int64_t rows, int64_t D, int64_t kp, const pk::ActParams& act) {
  auto xq = at::full({rows, kp}, 0x55, at::TensorOptions().dtype(at::kChar));
  EmulatedLauncher launch;
  pk::launch_quantize_int8(launch, reinterpret_cast<const scalar_t*>(x.data_ptr()), rows, D, kp, act,
                           xq.data_ptr<int8_t>());
  return xq;
}

// The weight sum_p scale_p code_p in float32 by layer_kernels.cuh's dequantize_kernel, emulated.
at::Tensor emulated_dequantize(const Weight& wt) {
  const int64_t C = wt.codes.size(0), P = wt.codes.size(1), D = wt.codes.size(2);
  auto out = at::full({C, D}, NAN);
  mpq_simt::launch(dim3(3), dim3(lk::kThreads), lk::dequantize_kernel<float>,
                   static_cast<const int8_t*>(wt.codes.data_ptr<int8_t>()),
                   static_cast<const float*>(wt.scales.data_ptr<float>()),
                   static_cast<const int*>(wt.num_points.data_ptr<int>()), C, static_cast<int>(P), D,
                   out.data_ptr<float>());
  return out;
}

// A float32 weight against the CPU's dequantize: with FMA contraction (nvcc's default, emulated
// here) the kernels round each partial sum once where the CPU rounds the product too, so they
// agree to 2 P u sum_p |scale_p code_p| (u = 2^-24), not bit for bit.
void require_dequantized(const at::Tensor& got, const Weight& wt) {
  const auto cpu = dequantize(wt.codes, wt.scales, wt.num_points, at::kFloat).to(at::kDouble);
  const int64_t P = wt.codes.size(1);
  const auto active = (at::arange(P, at::kInt).unsqueeze(0) < wt.num_points.unsqueeze(1)).to(at::kDouble);
  const auto spread = ((wt.scales.to(at::kDouble) * active).abs().unsqueeze(2) * wt.codes.to(at::kDouble).abs()).sum(1);
  const auto excess = (got.to(at::kDouble) - cpu).abs() - 2.0 * static_cast<double>(P) * std::ldexp(1.0, -24) * spread;
  REQUIRE(excess.max().item<double>() <= 0.0);
}

double rel_err(const at::Tensor& got, const at::Tensor& want) {
  const auto g = got.to(at::kDouble), w = want.to(at::kDouble);
  return ((g - w).norm() / w.norm().clamp_min(1e-300)).item<double>();
}

double tolerance(at::ScalarType t) { return t == at::kHalf ? 2e-3 : (t == at::kBFloat16 ? 1.2e-2 : 1e-5); }

struct LinearCase {
  int64_t M, C, P, D;
};

// M = 1 and 16 (gemv), 17..130 (mma); odd C and D; a long K that is split across CTAs.
const LinearCase kLinearCases[] = {{1, 70, 3, 37},   {16, 130, 2, 100}, {5, 65, 4, 65},
                                   {17, 65, 2, 200}, {130, 70, 2, 48},  {1, 64, 1, 1024}};

}  // namespace

TEST_CASE("emulated weight-only linear kernels match the float64 reference", "[emulation][linear]") {
  for (const auto& lc : kLinearCases) {
    for (const int w_bits : {4, 8}) {
      for (const auto dtype : {at::kHalf, at::kBFloat16}) {
        const Weight wt = random_weight(lc.C, lc.P, lc.D, w_bits, 100 + lc.M * lc.C + w_bits);
        const Packed p = pack(wt.codes, wt.scales, wt.num_points, w_bits);
        const pk::PackedWeight w = view(p, lc.C);
        auto gen = at::make_generator<at::CPUGeneratorImpl>(7);
        const auto x = at::randn({lc.M, lc.D}, gen).to(dtype);
        const auto bias = at::randn({lc.C}, gen);
        const auto bias_f = bias.to(dtype).to(at::kFloat);  // the epilogue rounds the float32 bias to the dtype
        const auto want = at::linear(x.to(at::kDouble), dequantize(wt.codes, wt.scales, wt.num_points),
                                     bias_f.to(at::kDouble));
        for (const bool small_m : {true, false}) {
          if (small_m && lc.M > 16) continue;
          auto out = at::full({lc.M, lc.C}, NAN, at::TensorOptions().dtype(dtype));
          const bool vec = lc.D % 2 == 0;
          const auto none = host_act({});
          if (dtype == at::kHalf) {
            const auto* xp = reinterpret_cast<const __half*>(x.data_ptr());
            if (w_bits == 4) {
              launch_config<pk::WeightOnly<__half, 4>>(small_m, {xp, vec}, w, lc.M, lc.D, none, false,
                                                       bias.data_ptr<float>(), out);
            } else {
              launch_config<pk::WeightOnly<__half, 8>>(small_m, {xp, vec}, w, lc.M, lc.D, none, false,
                                                       bias.data_ptr<float>(), out);
            }
          } else {
            const auto* xp = reinterpret_cast<const __nv_bfloat16*>(x.data_ptr());
            if (w_bits == 4) {
              launch_config<pk::WeightOnly<__nv_bfloat16, 4>>(small_m, {xp, vec}, w, lc.M, lc.D, none, false,
                                                              bias.data_ptr<float>(), out);
            } else {
              launch_config<pk::WeightOnly<__nv_bfloat16, 8>>(small_m, {xp, vec}, w, lc.M, lc.D, none, false,
                                                              bias.data_ptr<float>(), out);
            }
          }
          INFO("M " << lc.M << " C " << lc.C << " P " << lc.P << " D " << lc.D << " bits " << w_bits << " dtype "
                    << dtype << " small_m " << small_m);
          REQUIRE_FALSE(at::isnan(out).any().item<bool>());
          REQUIRE(rel_err(out, want) <= tolerance(dtype));
        }
      }
    }
  }
}

TEST_CASE("emulated int8 (W4A8) linear kernels match the float64 reference", "[emulation][linear]") {
  const std::vector<std::vector<float>> acts = {
      {0.05f, 0.0f, -128.0f, 127.0f}, {0.02f, 128.0f, 0.0f, 255.0f}, {0.15f, 3.0f, 0.0f, 15.0f}};
  for (const auto& lc : kLinearCases) {
    for (const int w_bits : {4, 8}) {
      for (const auto& q : acts) {
        const Weight wt = random_weight(lc.C, lc.P, lc.D, w_bits, 200 + lc.M + lc.D + w_bits);
        const Packed p = pack(wt.codes, wt.scales, wt.num_points, w_bits);
        const pk::PackedWeight w = view(p, lc.C);
        auto gen = at::make_generator<at::CPUGeneratorImpl>(8);
        const auto x = (at::randn({lc.M, lc.D}, gen) * 2).to(at::kHalf);
        const auto bias = at::randn({lc.C}, gen);  // float32: rounded to float16 by the epilogue
        const auto want = at::linear(fake_quantize64(x, q), dequantize(wt.codes, wt.scales, wt.num_points),
                                     bias.to(at::kHalf).to(at::kDouble));
        const int64_t kp = std::get<0>(p).size(1) * pk::kSlabK;
        const auto act = host_act(q);
        const auto xq = quantize_int8<at::Half>(x, lc.M, lc.D, kp, act);
        for (const bool small_m : {true, false}) {
          if (small_m && lc.M > 16) continue;
          auto out = at::full({lc.M, lc.C}, NAN, at::TensorOptions().dtype(at::kHalf));
          if (w_bits == 4) {
            launch_config<pk::Int8Act<4>>(small_m, {xq.data_ptr<int8_t>(), kp}, w, lc.M, lc.D, act, true,
                                          bias.data_ptr<float>(), out);
          } else {
            launch_config<pk::Int8Act<8>>(small_m, {xq.data_ptr<int8_t>(), kp}, w, lc.M, lc.D, act, true,
                                          bias.data_ptr<float>(), out);
          }
          INFO("M " << lc.M << " C " << lc.C << " D " << lc.D << " bits " << w_bits << " zp " << q[1] << " small_m "
                    << small_m);
          REQUIRE_FALSE(at::isnan(out).any().item<bool>());
          REQUIRE(rel_err(out, want) <= 2e-3);  // exact int32 products; fp16 output rounding
        }
      }
    }
  }
}

TEST_CASE("the emulated dense decode equals the generic dequantize kernel", "[emulation][linear]") {
  const Weight wt = random_weight(130, 3, 70, 4, 300);
  const Packed p = pack(wt.codes, wt.scales, wt.num_points, 4);
  auto out = at::full({130, 70}, NAN);
  EmulatedLauncher launch;
  pk::launch_decode_dense(launch, view(p, 130), 4, int64_t{70}, out.data_ptr<float>());
  // Bit for bit: the same float32 sums, each product fused into its sum alike (nvcc's FMA
  // contraction, emulated); the CPU's dequantize rounds every product first (see below).
  REQUIRE(at::equal(out, emulated_dequantize(wt)));
  require_dequantized(out, wt);
}

namespace {

struct ConvCase {
  int64_t N, C, H, W, O, KH, KW, sh, sw, ph, pw, dh, dw, groups;
};

// Batch 1, odd C (scalar loads), 1x1, stride 2, dilation, groups of 16 and 32 channels, a
// rectangular kernel, a kernel larger than the image, C_out not a multiple of 64.
const ConvCase kConvCases[] = {
    {1, 3, 9, 7, 40, 3, 3, 2, 2, 1, 1, 1, 1, 1},   {2, 32, 6, 6, 64, 3, 3, 1, 1, 1, 1, 1, 1, 1},
    {1, 64, 5, 5, 70, 1, 1, 1, 1, 0, 0, 1, 1, 1},  {1, 64, 6, 6, 128, 3, 3, 1, 1, 2, 2, 2, 2, 2},
    {1, 48, 5, 6, 192, 3, 2, 2, 1, 1, 0, 1, 2, 3}, {1, 16, 3, 3, 16, 5, 5, 1, 1, 2, 2, 1, 1, 1},
    {1, 6, 5, 5, 12, 2, 2, 1, 1, 0, 1, 1, 1, 3},
};

// The implicit GEMM of a case: M = N * OH * OW rows, D = KH * KW * Cg columns.
pk::ConvShape conv_shape(const ConvCase& cc) {
  const int64_t cg = cc.C / cc.groups;
  const int64_t OH = (cc.H + 2 * cc.ph - cc.dh * (cc.KH - 1) - 1) / cc.sh + 1;
  const int64_t OW = (cc.W + 2 * cc.pw - cc.dw * (cc.KW - 1) - 1) / cc.sw + 1;
  return pk::ConvShape{
      cc.N * OH * OW,          cc.KH * cc.KW * cg,      static_cast<int>(cc.H),  static_cast<int>(cc.W),
      static_cast<int>(cc.C),  static_cast<int>(OH),    static_cast<int>(OW),    static_cast<int>(cc.KW),
      static_cast<int>(cg),    static_cast<int>(cc.sh), static_cast<int>(cc.sw), static_cast<int>(cc.ph),
      static_cast<int>(cc.pw), static_cast<int>(cc.dh), static_cast<int>(cc.dw), static_cast<int>(cc.O / cc.groups)};
}

// The outputs of every configuration that runs M rows (the small-M one only for M <= 16), each
// into its own NaN-poisoned NHWC tensor [N, OH, OW, O], returned as NCHW views: (small_m, output).
template <class Op>
std::vector<std::pair<bool, at::Tensor>> run_conv(const ConvCase& cc, const typename Op::Args& args,
                                                  const pk::PackedWeight& w, const pk::ActParams& act, bool int8_act,
                                                  const float* bias, at::ScalarType dtype, int64_t OH, int64_t OW) {
  const int64_t M = cc.N * OH * OW;
  std::vector<std::pair<bool, at::Tensor>> outs;
  for (const bool small_m : {true, false}) {
    if (small_m && M > pk::kGemvMaxM) continue;
    auto out = at::full({cc.N, OH, OW, cc.O}, NAN, at::TensorOptions().dtype(dtype));
    launch_config<Op>(small_m, args, w, M, args.s.D, act, int8_act, bias, out);
    outs.emplace_back(small_m, out.permute({0, 3, 1, 2}));
  }
  return outs;
}

}  // namespace

TEST_CASE("emulated implicit-GEMM conv kernels match the float64 reference", "[emulation][conv]") {
  const std::vector<float> q = {0.02f, 128.0f, 0.0f, 255.0f};
  for (const auto& cc : kConvCases) {
    const pk::ConvShape shape = conv_shape(cc);
    const int64_t cg = shape.Cg, D = shape.D, OH = shape.OH, OW = shape.OW;
    for (const int w_bits : {4, 8}) {
      const Weight wt = random_weight(cc.O, 3, D, w_bits, 400 + cc.C * cc.O + w_bits);
      // The module's codes [O, P, Cg, kh, kw] and their NHWC columns (mpq.ops.conv_codes_nhwc).
      const auto codes5 = wt.codes.view({cc.O, 3, cc.KH, cc.KW, cg}).permute({0, 1, 4, 2, 3}).contiguous();
      const Packed p = pack(wt.codes, wt.scales, wt.num_points, w_bits, cc.groups);
      const pk::PackedWeight w = view(p, cc.O);
      auto gen = at::make_generator<at::CPUGeneratorImpl>(9);
      const auto x = (at::randn({cc.N, cc.C, cc.H, cc.W}, gen) * 2).to(at::kHalf);
      const auto x_nhwc = x.permute({0, 2, 3, 1}).contiguous();
      const auto bias = at::randn({cc.O}, gen);  // float32: rounded to float16 by the epilogue
      const auto w64 = dequantize(codes5, wt.scales, wt.num_points);
      const auto conv64 = [&](const at::Tensor& input) {
        return at::conv2d(input, w64, bias.to(at::kHalf).to(at::kDouble), {cc.sh, cc.sw}, {cc.ph, cc.pw},
                          {cc.dh, cc.dw}, cc.groups);
      };
      INFO("conv N " << cc.N << " C " << cc.C << " O " << cc.O << " k " << cc.KH << "x" << cc.KW << " groups "
                     << cc.groups << " bits " << w_bits);
      {  // weight-only, float16 activations
        const auto* xp = reinterpret_cast<const __half*>(x_nhwc.data_ptr());
        const bool vec = cg % 2 == 0 && cc.C % 2 == 0;
        const auto none = host_act({});
        const auto outs = w_bits == 4
                              ? run_conv<pk::ConvWeightOnly<__half, 4>>(cc, {xp, shape, 0, vec}, w, none, false,
                                                                        bias.data_ptr<float>(), at::kHalf, OH, OW)
                              : run_conv<pk::ConvWeightOnly<__half, 8>>(cc, {xp, shape, 0, vec}, w, none, false,
                                                                        bias.data_ptr<float>(), at::kHalf, OH, OW);
        REQUIRE(outs.size() == (shape.M <= pk::kGemvMaxM ? 2u : 1u));
        const auto want = conv64(x.to(at::kDouble));
        for (const auto& [small_m, out] : outs) {
          INFO("weight-only, small_m " << small_m);
          REQUIRE_FALSE(at::isnan(out).any().item<bool>());
          REQUIRE(rel_err(out, want) <= tolerance(at::kHalf));
        }
      }
      if (cg % pk::kSlabK == 0) {  // int8 activations: NHWC levels, the level of 0 in the padding
        const auto act = host_act(q);
        const auto xq = quantize_int8<at::Half>(x_nhwc, cc.N * cc.H * cc.W, cc.C, cc.C, act);
        const typename pk::ConvInt8<4>::Args args{xq.data_ptr<int8_t>(), shape, act, 0, 0u};
        const auto outs = w_bits == 4 ? run_conv<pk::ConvInt8<4>>(cc, args, w, act, true, bias.data_ptr<float>(),
                                                                  at::kHalf, OH, OW)
                                      : run_conv<pk::ConvInt8<8>>(cc, {args.xq, shape, act, 0, 0u}, w, act, true,
                                                                  bias.data_ptr<float>(), at::kHalf, OH, OW);
        REQUIRE(outs.size() == (shape.M <= pk::kGemvMaxM ? 2u : 1u));
        const auto want = conv64(fake_quantize64(x, q));
        for (const auto& [small_m, out] : outs) {
          INFO("int8, small_m " << small_m);
          REQUIRE_FALSE(at::isnan(out).any().item<bool>());
          REQUIRE(rel_err(out, want) <= 2e-3);
        }
      }
    }
  }
}

TEST_CASE("launch plans cover K exactly once", "[emulation]") {
  for (const int64_t slabs : {1, 4, 7, 64, 257}) {
    for (const int64_t tiles : {1, 3, 300}) {
      for (const int warps_k : {1, 4}) {
        const pk::LaunchPlan plan = pk::plan_launch(tiles, 5, slabs, 64, warps_k, 132);
        REQUIRE(plan.splits >= 1);
        REQUIRE(plan.split_slabs % 4 == 0);
        REQUIRE(plan.splits * plan.split_slabs >= slabs);
        REQUIRE((plan.splits - 1) * plan.split_slabs < slabs);  // no empty split
      }
    }
  }
}

// ---- fit_multipoint (csrc/cuda/fit_kernels.cuh) -------------------------------------------------

#include "cuda/fit_kernels.cuh"

namespace {

namespace fk = mpq::fit_kernels;
using Fit = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

Fit cpu_fit(const at::Tensor& w, int64_t bits, int64_t points, bool exact) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mpq::fit_multipoint", "")
                       .typed<Fit(const at::Tensor&, int64_t, int64_t, bool)>();
  return op.call(w, bits, points, exact);
}

// Rows like test_cuda.py's: Gaussian, an all-zero row, a Laplace row with outliers, rows scaled by
// 1e15 and 1e-15, a row rounded to 1/64 (many ties between candidates).
at::Tensor fit_weight(int64_t C, int64_t D, uint64_t seed) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  auto w = at::randn({C, D}, gen, at::TensorOptions().dtype(at::kDouble));
  if (C >= 6) {
    w[1].zero_();
    w[2] = at::randn({D}, gen, at::TensorOptions().dtype(at::kDouble)).pow(3);
    w[3] *= 1e15;
    w[4] *= 1e-15;
    w[5] = at::round(w[5] * 64) / 64;
  }
  return w.to(at::kFloat);
}

// The criterion of test_cuda.py's _assert_fit_matches_cpu, per row: points with identical codes
// have errors within 1e-5 relative (floor 1e-10 ||w_j||^2) and scales within 1e-6; at the first point
// whose codes differ the two errors must still agree (an exact tie between candidates, e.g. the
// proportional code vectors of a 2-element row, whose gains round differently in the CPU's
// sequential sweep and the kernel's block scan), after which the greedy fits go on from different
// but equally good residuals and are not compared. Returns the number of rows that met a tie.
int require_fit_matches(const at::Tensor& w, const Fit& got, const Fit& want) {
  const auto c = std::get<0>(got), c_ref = std::get<0>(want);
  const auto s = std::get<1>(got).to(at::kDouble), s_ref = std::get<1>(want).to(at::kDouble);
  const auto e = std::get<2>(got).to(at::kDouble), e_ref = std::get<2>(want).to(at::kDouble);
  const auto norm2 = w.to(at::kDouble).pow(2).sum(1);
  int ties = 0;
  for (int64_t j = 0; j < c.size(0); ++j) {
    for (int64_t p = 0; p < c.size(1); ++p) {
      const double tol = 1e-5 * std::abs(e_ref[j][p].item<double>()) + 1e-10 * norm2[j].item<double>();
      INFO("row " << j << " point " << p << " error " << e[j][p].item<double>() << " vs "
                  << e_ref[j][p].item<double>());
      REQUIRE(std::abs(e[j][p].item<double>() - e_ref[j][p].item<double>()) <= tol);
      if (!at::equal(c[j][p], c_ref[j][p])) {
        ++ties;
        break;
      }
      REQUIRE(std::abs(s[j][p].item<double>() - s_ref[j][p].item<double>()) <=
              1e-6 * std::abs(s_ref[j][p].item<double>()));
    }
  }
  return ties;
}

// fit_multipoint.cu's fit_fast with the shared-memory mode and the number of blocks given.
Fit emulated_fit_fast(const at::Tensor& w, int bits, int P, int smem_mode, int64_t blocks) {
  const int64_t C = w.size(0), D = w.size(1);
  const int K = (1 << (bits - 1)) - 1;
  auto codes = at::full({C, P, D}, 77, at::TensorOptions().dtype(at::kChar));
  auto scales = at::full({C, P}, NAN);
  auto errors = at::full({C, P}, NAN);
  const fk::FitOutputs out{codes.data_ptr<int8_t>(), scales.data_ptr<float>(), errors.data_ptr<float>()};
  auto r_scratch = at::full({blocks, D}, NAN, at::TensorOptions().dtype(at::kDouble));
  auto x_scratch = at::full({blocks, D}, NAN);
  const size_t smem = smem_mode == 2 ? D * (sizeof(double) + sizeof(float)) : (smem_mode == 1 ? D * sizeof(float) : 0);
  mpq_simt::launch_shared(dim3(static_cast<unsigned>(blocks)), dim3(fk::kFastThreads), smem, fk::fit_fast_kernel<float>,
                          w.data_ptr<float>(), C, D, P, K, out, r_scratch.data_ptr<double>(),
                          x_scratch.data_ptr<float>(), smem_mode, fk::make_fast_grid(K));
  return {codes, scales, errors};
}

// fit_multipoint.cu's fit_exact (one chunk), the segmented radix sort (descending, stable) on the host.
Fit emulated_fit_exact(const at::Tensor& w, int bits, int P) {
  const int64_t C = w.size(0), D = w.size(1);
  const int K = (1 << (bits - 1)) - 1;
  const int64_t DK = D * K;
  auto codes = at::full({C, P, D}, 77, at::TensorOptions().dtype(at::kChar));
  auto scales = at::full({C, P}, NAN);
  auto errors = at::full({C, P}, NAN);
  const fk::FitOutputs out{codes.data_ptr<int8_t>(), scales.data_ptr<float>(), errors.data_ptr<float>()};
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  auto r = at::empty({C, D}, f64), err = at::empty({C}, f64), m = at::empty({C}, f64);
  auto keys = at::empty({C * DK}, f64);
  auto vals = at::empty({C * DK}, at::TensorOptions().dtype(at::kInt));
  const dim3 grid(static_cast<unsigned>(C)), block(fk::kExactThreads);
  mpq_simt::launch(grid, block, fk::exact_init_kernel<float>, w.data_ptr<float>(), D, r.data_ptr<double>(),
                   err.data_ptr<double>());
  for (int p = 0; p < P; ++p) {
    mpq_simt::launch(grid, block, fk::exact_breakpoints_kernel, static_cast<const double*>(r.data_ptr<double>()), D, K,
                     m.data_ptr<double>(), keys.data_ptr<double>(), vals.data_ptr<int>());
    for (int64_t b = 0; b < C; ++b) {
      double* kb = keys.data_ptr<double>() + b * DK;
      int* vb = vals.data_ptr<int>() + b * DK;
      std::vector<std::pair<double, int>> seg(static_cast<size_t>(DK));
      for (int64_t t = 0; t < DK; ++t) seg[t] = {kb[t], vb[t]};
      std::stable_sort(seg.begin(), seg.end(), [](const auto& x, const auto& y) { return x.first > y.first; });
      for (int64_t t = 0; t < DK; ++t) std::tie(kb[t], vb[t]) = seg[t];
    }
    mpq_simt::launch(grid, block, fk::exact_sweep_kernel, r.data_ptr<double>(), D, K, P, p,
                     static_cast<const double*>(m.data_ptr<double>()),
                     static_cast<const double*>(keys.data_ptr<double>()), static_cast<const int*>(vals.data_ptr<int>()),
                     err.data_ptr<double>(), out);
  }
  return {codes, scales, errors};
}

}  // namespace

TEST_CASE("emulated fast fit_multipoint kernel matches the CPU kernel", "[emulation][fit]") {
  struct Case {
    int64_t C, D;
    int bits;
  };
  // D * K above kExactBelowBreakpoints: the CPU (and the CUDA host code) run the fast solver there.
  for (const Case fc : {Case{3, 40, 8}, Case{7, 600, 4}, Case{6, 700, 8}, Case{6, 4200, 2}}) {
    REQUIRE_FALSE(mpq::kernels::use_exact_solver(false, fc.D, fc.bits));
    const auto w = fit_weight(fc.C, fc.D, 500 + fc.C * fc.D);
    const Fit want = cpu_fit(w, fc.bits, 3, false);
    for (const int smem_mode : {2, 1, 0}) {
      for (const int64_t blocks : {fc.C, int64_t{2}}) {
        INFO("C " << fc.C << " D " << fc.D << " bits " << fc.bits << " smem_mode " << smem_mode << " blocks "
                  << blocks);
        REQUIRE(require_fit_matches(w, emulated_fit_fast(w, fc.bits, 3, smem_mode, blocks), want) == 0);
      }
    }
  }
}

TEST_CASE("emulated exact fit_multipoint kernels match the CPU kernel", "[emulation][fit]") {
  struct Case {
    int64_t C, D;
  };
  int ties = 0;
  for (const Case fc : {Case{1, 1}, Case{5, 2}, Case{7, 33}, Case{6, 300}}) {
    const auto w = fit_weight(fc.C, fc.D, 600 + fc.C * fc.D);
    for (const int bits : {2, 4, 6}) {
      INFO("C " << fc.C << " D " << fc.D << " bits " << bits);
      const int t = require_fit_matches(w, emulated_fit_exact(w, bits, 3), cpu_fit(w, bits, 3, true));
      if (fc.D > 2) REQUIRE(t == 0);  // ties only where code vectors can be proportional
      ties += t;
    }
  }
  // 2-element rows at 6 bits tie (proportional codes): seen here, and allowed by the criterion.
  CHECK(ties > 0);
}

// ---- the generic layers' kernels (csrc/cuda/layer_kernels.cuh) ---------------------------------

namespace {

at::Tensor fake_quantize_cpu(const at::Tensor& x, const std::vector<float>& q) {
  // mpq's CPU fake quantization, each step in x's dtype (csrc/cpu/multipoint_layers.cpp).
  const auto level = at::clamp(at::round(x / q[0]) + q[1], q[2], q[3]);
  return (level - q[1]) * q[0];
}

}  // namespace

TEST_CASE("emulated dequantize and fake-quantize kernels match the CPU kernels", "[emulation][layers]") {
  const Weight wt = random_weight(70, 3, 45, 4, 700);
  require_dequantized(emulated_dequantize(wt), wt);

  auto gen = at::make_generator<at::CPUGeneratorImpl>(10);
  for (const auto dtype : {at::kFloat, at::kHalf}) {
    const auto x = (at::randn({1000}, gen) * 3).to(dtype);
    const std::vector<float> q = {0.037f, 5.0f, -128.0f, 127.0f};
    auto fq = at::full({1000}, NAN, at::TensorOptions().dtype(dtype));
    if (dtype == at::kFloat) {
      mpq_simt::launch(dim3(2), dim3(lk::kThreads), lk::fake_quantize_kernel<float>,
                       static_cast<const float*>(x.data_ptr<float>()), fq.data_ptr<float>(), int64_t{1000},
                       host_act(q));
    } else {
      mpq_simt::launch(dim3(2), dim3(lk::kThreads), lk::fake_quantize_kernel<at::Half>,
                       static_cast<const at::Half*>(x.data_ptr<at::Half>()), fq.data_ptr<at::Half>(), int64_t{1000},
                       host_act(q));
    }
    INFO("dtype " << dtype);
    REQUIRE(at::equal(fq, fake_quantize_cpu(x, q)));  // bit for bit, each step rounded to the dtype
  }
}

TEST_CASE("emulated depthwise conv kernel matches the float64 reference", "[emulation][layers]") {
  struct Case {
    int64_t N, C, H, W, KH, KW, sh, sw, ph, pw, dh, dw;
  };
  const std::vector<float> q = {0.02f, 128.0f, 0.0f, 255.0f};
  for (const Case dc : {Case{1, 32, 9, 9, 3, 3, 1, 1, 1, 1, 1, 1}, Case{2, 24, 7, 8, 5, 5, 2, 2, 2, 2, 1, 1},
                        Case{1, 7, 8, 8, 3, 3, 1, 1, 2, 2, 2, 2}, Case{1, 16, 4, 4, 7, 5, 1, 2, 3, 2, 1, 1}}) {
    const int64_t OH = (dc.H + 2 * dc.ph - dc.dh * (dc.KH - 1) - 1) / dc.sh + 1;
    const int64_t OW = (dc.W + 2 * dc.pw - dc.dw * (dc.KW - 1) - 1) / dc.sw + 1;
    const Weight wt = random_weight(dc.C, 3, dc.KH * dc.KW, 4, 800 + dc.C);
    const auto codes = wt.codes.view({dc.C, 3, 1, dc.KH, dc.KW});
    auto gen = at::make_generator<at::CPUGeneratorImpl>(11);
    const auto x = (at::randn({dc.N, dc.C, dc.H, dc.W}, gen) * 2).to(at::kHalf);
    const auto x_nhwc = x.permute({0, 2, 3, 1}).contiguous();
    const auto bias = at::randn({dc.C}, gen).to(at::kHalf).to(at::kFloat);  // as the host code rounds it
    const lk::DepthwiseShape shape{dc.N,
                                   static_cast<int>(dc.H),
                                   static_cast<int>(dc.W),
                                   static_cast<int>(dc.C),
                                   static_cast<int>(OH),
                                   static_cast<int>(OW),
                                   static_cast<int>(dc.KH),
                                   static_cast<int>(dc.KW),
                                   static_cast<int>(dc.sh),
                                   static_cast<int>(dc.sw),
                                   static_cast<int>(dc.ph),
                                   static_cast<int>(dc.pw),
                                   static_cast<int>(dc.dh),
                                   static_cast<int>(dc.dw),
                                   3};
    const auto w64 = dequantize(codes, wt.scales, wt.num_points);
    for (const bool quantize : {false, true}) {
      auto out = at::full({dc.N, OH, OW, dc.C}, NAN, at::TensorOptions().dtype(at::kHalf));
      mpq_simt::launch(dim3(3), dim3(lk::kThreads), lk::depthwise_conv_kernel<at::Half>,
                       static_cast<const at::Half*>(x_nhwc.data_ptr<at::Half>()),
                       static_cast<const int8_t*>(wt.codes.data_ptr<int8_t>()),
                       static_cast<const float*>(wt.scales.data_ptr<float>()),
                       static_cast<const int*>(wt.num_points.data_ptr<int>()),
                       static_cast<const float*>(bias.data_ptr<float>()), host_act(quantize ? q : std::vector<float>{}),
                       quantize, shape, out.data_ptr<at::Half>());
      const auto input = quantize ? fake_quantize64(x, q) : x.to(at::kDouble);
      const auto want = at::conv2d(input, w64, bias.to(at::kDouble), {dc.sh, dc.sw}, {dc.ph, dc.pw}, {dc.dh, dc.dw},
                                   dc.C);
      INFO("depthwise N " << dc.N << " C " << dc.C << " k " << dc.KH << "x" << dc.KW << " quantize " << quantize);
      REQUIRE_FALSE(at::isnan(out).any().item<bool>());
      REQUIRE(rel_err(out.permute({0, 3, 1, 2}), want) <= 2e-3);
    }
  }
}

TEST_CASE("emulated kernels give bit-identical outputs when the threads run in reverse order", "[emulation][races]") {
  // Each kernel once in ascending and once in descending thread order between barriers.
  const auto both_orders = [](const std::function<at::Tensor()>& run) {
    mpq_simt::set_reverse_order(false);
    const at::Tensor forward = run();
    mpq_simt::set_reverse_order(true);
    const at::Tensor backward = run();
    mpq_simt::set_reverse_order(false);
    return at::equal(forward, backward);
  };
  // Linear: gemv (warps split K, the shared-memory sum) with split-K, mma, int8.
  const Weight wt = random_weight(130, 2, 200, 4, 900);
  const Packed p = pack(wt.codes, wt.scales, wt.num_points, 4);
  const pk::PackedWeight w = view(p, 130);
  auto gen = at::make_generator<at::CPUGeneratorImpl>(12);
  const auto x = at::randn({17, 200}, gen).to(at::kHalf);
  const auto bias = at::randn({130}, gen);
  for (const int64_t M : {int64_t{5}, int64_t{17}}) {
    REQUIRE(both_orders([&] {
      auto out = at::full({M, 130}, NAN, at::TensorOptions().dtype(at::kHalf));
      launch_config<pk::WeightOnly<__half, 4>>(M <= 16, {reinterpret_cast<const __half*>(x.data_ptr()), true}, w, M,
                                               200, host_act({}), false, bias.data_ptr<float>(), out);
      return out;
    }));
  }
  const std::vector<float> q = {0.05f, 0.0f, -128.0f, 127.0f};
  const auto xq = quantize_int8<at::Half>(x, 17, 200, 256, host_act(q));
  REQUIRE(both_orders([&] {
    auto out = at::full({5, 130}, NAN, at::TensorOptions().dtype(at::kHalf));
    launch_config<pk::Int8Act<4>>(true, {xq.data_ptr<int8_t>(), 256}, w, 5, 200, host_act(q), true,
                                  bias.data_ptr<float>(), out);
    return out;
  }));
  // The int8 quantize kernel.
  REQUIRE(both_orders([&] { return quantize_int8<at::Half>(x, 17, 200, 256, host_act(q)); }));
  // Implicit-GEMM conv, weight-only and int8, each configuration (M = 12: the small-M one too).
  const ConvCase cc{1, 48, 5, 6, 192, 3, 2, 2, 1, 1, 0, 1, 2, 3};
  const pk::ConvShape shape = conv_shape(cc);
  REQUIRE(shape.M <= pk::kGemvMaxM);
  const Weight cw = random_weight(cc.O, 3, shape.D, 4, 903);
  const Packed cp = pack(cw.codes, cw.scales, cw.num_points, 4, cc.groups);
  const pk::PackedWeight cv = view(cp, cc.O);
  const auto image = (at::randn({cc.N, cc.H, cc.W, cc.C}, gen) * 2).to(at::kHalf);  // NHWC
  const auto image_q = quantize_int8<at::Half>(image, cc.N * cc.H * cc.W, cc.C, cc.C, host_act(q));
  const auto conv_bias = at::randn({cc.O}, gen);
  for (const bool small_m : {true, false}) {
    INFO("conv, small_m " << small_m);
    REQUIRE(both_orders([&] {
      auto out = at::full({shape.M, cc.O}, NAN, at::TensorOptions().dtype(at::kHalf));
      launch_config<pk::ConvWeightOnly<__half, 4>>(small_m,
                                                   {reinterpret_cast<const __half*>(image.data_ptr()), shape, 0, true},
                                                   cv, shape.M, shape.D, host_act({}), false,
                                                   conv_bias.data_ptr<float>(), out);
      return out;
    }));
    REQUIRE(both_orders([&] {
      auto out = at::full({shape.M, cc.O}, NAN, at::TensorOptions().dtype(at::kHalf));
      launch_config<pk::ConvInt8<4>>(small_m, {image_q.data_ptr<int8_t>(), shape, host_act(q), 0, 0u}, cv, shape.M,
                                     shape.D, host_act(q), true, conv_bias.data_ptr<float>(), out);
      return out;
    }));
  }
  // The depthwise kernel, with and without the activation quantizer.
  const Weight dw = random_weight(24, 3, 25, 4, 904);
  const auto dx = (at::randn({2, 7, 8, 24}, gen) * 2).to(at::kHalf);  // NHWC
  const lk::DepthwiseShape ds{2, 7, 8, 24, 4, 4, 5, 5, 2, 2, 2, 2, 1, 1, 3};
  for (const bool quantize : {false, true}) {
    INFO("depthwise, quantize " << quantize);
    REQUIRE(both_orders([&] {
      auto out = at::full({2, 4, 4, 24}, NAN, at::TensorOptions().dtype(at::kHalf));
      mpq_simt::launch(dim3(3), dim3(lk::kThreads), lk::depthwise_conv_kernel<at::Half>,
                       static_cast<const at::Half*>(dx.data_ptr<at::Half>()),
                       static_cast<const int8_t*>(dw.codes.data_ptr<int8_t>()),
                       static_cast<const float*>(dw.scales.data_ptr<float>()),
                       static_cast<const int*>(dw.num_points.data_ptr<int>()),
                       static_cast<const float*>(conv_bias.data_ptr<float>()),
                       host_act(quantize ? q : std::vector<float>{}), quantize, ds, out.data_ptr<at::Half>());
      return out;
    }));
  }
  // fit_multipoint: block reductions (fast) and block scans (exact).
  const auto fw = fit_weight(6, 700, 901);
  REQUIRE(both_orders([&] { return std::get<0>(emulated_fit_fast(fw, 4, 3, 2, 6)); }));
  REQUIRE(both_orders([&] { return std::get<2>(emulated_fit_fast(fw, 4, 3, 0, 2)); }));
  const auto ew = fit_weight(6, 300, 902);
  REQUIRE(both_orders([&] { return std::get<0>(emulated_fit_exact(ew, 4, 3)); }));
  REQUIRE(both_orders([&] { return std::get<2>(emulated_fit_exact(ew, 4, 3)); }));
}
