// Catch2 tests of the int8 path's level kernels (csrc/kernels/activation_levels.h): the AVX-512
// path gives the scalar path's bytes, and the scalar path is the definition computed in float64
// (round half to even of the float32 quotient).
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "catch_compat.h"
#include "kernels/activation_levels.h"

namespace {

namespace k = mpq::kernels;

// The level of v by the definition: the float32 quotient (as the ops divide), rounded half to even
// in float64, plus the zero point, clamped.
uint8_t level(float v, const k::LevelGrid& g) {
  if (std::isnan(v)) return 0;
  const double quotient = static_cast<float>(v / g.scale);
  double q = std::nearbyint(quotient) + g.zero_point;
  q = std::min<double>(std::max<double>(q, g.qmin), g.qmax);
  return static_cast<uint8_t>(q - g.qmin);
}

// Inputs that probe every branch: random values over and beyond the grid, exact half levels (the
// ties) and their float neighbours, +-0, +-inf, NaN.
std::vector<float> probe_values(const k::LevelGrid& g, int n_random, uint32_t seed) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<float> over(-1.5f * 256 * g.scale, 1.5f * 256 * g.scale);
  std::vector<float> v;
  for (int i = 0; i < n_random; ++i) v.push_back(over(gen));
  for (int l = -300; l <= 300; ++l) {
    const float tie = (l + 0.5f) * g.scale;
    v.push_back(tie);
    v.push_back(std::nextafter(tie, -INFINITY));
    v.push_back(std::nextafter(tie, INFINITY));
  }
  const float inf = std::numeric_limits<float>::infinity();
  for (float s : {0.0f, -0.0f, inf, -inf, std::numeric_limits<float>::quiet_NaN(), 1e30f, -1e30f}) v.push_back(s);
  return v;
}

const k::LevelGrid kGrids[] = {{0.05f, 0.0f, 0.0f, 255.0f},
                               {0.0371f, 3.0f, -128.0f, 127.0f},
                               {0.3f, 2.0f, 0.0f, 15.0f},
                               {1.0f / 3, -5.0f, -8.0f, 7.0f}};

}  // namespace

TEST_CASE("scalar levels equal the definition, with residual and clamp", "[levels]") {
  for (const auto& g : kGrids) {
    const auto y = probe_values(g, 4000, 1);
    const auto r = probe_values(g, 4000, 2);
    std::vector<uint8_t> u(y.size());
    const float inf = std::numeric_limits<float>::infinity();
    k::epilogue_levels(y.data(), nullptr, u.data(), int64_t(y.size()), -inf, inf, g, k::CpuIsa::kScalar);
    for (size_t i = 0; i < y.size(); ++i) REQUIRE(int(u[i]) == int(level(y[i], g)));
    const float lo = 0.0f, hi = 6.0f;
    k::epilogue_levels(y.data(), r.data(), u.data(), int64_t(y.size()), lo, hi, g, k::CpuIsa::kScalar);
    for (size_t i = 0; i < y.size(); ++i) {
      float v = y[i] + r[i];
      v = v < lo ? lo : v;
      v = hi < v ? hi : v;
      REQUIRE(int(u[i]) == int(level(v, g)));
    }
  }
}

TEST_CASE("AVX-512 levels are the scalar levels, byte for byte", "[levels]") {
  if (!k::cpu_has_avx512()) MPQ_SKIP("this CPU has no AVX-512F");
  const float inf = std::numeric_limits<float>::infinity();
  for (const auto& g : kGrids) {
    const auto y = probe_values(g, 4000, 3);
    const auto r = probe_values(g, 4000, 4);
    for (int64_t n : {int64_t(y.size()), int64_t(1), int64_t(15), int64_t(17), int64_t(33)}) {  // tails
      for (bool with_r : {false, true}) {
        for (auto [lo, hi] : {std::pair<float, float>{-inf, inf}, {0.0f, inf}, {-1.0f, 6.0f}}) {
          std::vector<uint8_t> a(n), b(n);
          const float* rp = with_r ? r.data() : nullptr;
          k::epilogue_levels(y.data(), rp, a.data(), n, lo, hi, g, k::CpuIsa::kScalar);
          k::epilogue_levels(y.data(), rp, b.data(), n, lo, hi, g, k::CpuIsa::kAvx512);
          REQUIRE(a == b);
        }
      }
    }
  }
}
