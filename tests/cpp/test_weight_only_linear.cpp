// Catch2 tests of the weight-only Linear kernel (csrc/kernels/weight_only_linear.h): every path
// against the layer computed in float64 from the stored codes, within the header's error bound, for
// w_bits 2..8, in_features with tails (odd, below and above a 128-code block), 1..17 input rows
// (one and two register blocks) and channels with 0..4 points.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "catch_compat.h"
#include "kernels/weight_only_linear.h"

namespace {

namespace k = mpq::kernels;

struct Stored {
  int64_t C, D, w_bits;
  std::vector<int32_t> num_points;
  std::vector<std::vector<int>> codes;  // per point, D codes
  std::vector<float> scales;            // per point
  std::vector<uint8_t> packed;          // [T, packed_row_bytes]: the stored form
  std::vector<float> bias;
};

// Random codes over the whole w_bits range, scales of both signs, 0..4 points per channel (channel
// 0 with none), packed as pack_points packs them: code i at bits i*w_bits.., LSB first.
Stored random_stored(int64_t C, int64_t D, int64_t w_bits, uint32_t seed) {
  std::mt19937 gen(seed);
  Stored s{C, D, w_bits, {}, {}, {}, {}, {}};
  std::uniform_int_distribution<int> points(1, 4), code(-(1 << (w_bits - 1)), (1 << (w_bits - 1)) - 1);
  std::uniform_real_distribution<float> scale(-0.05f, 0.05f), bias(-1.0f, 1.0f);
  const int64_t B = k::packed_row_bytes(D, w_bits);
  for (int64_t j = 0; j < C; ++j) {
    s.num_points.push_back(j == 0 ? 0 : points(gen));
    s.bias.push_back(bias(gen));
    for (int p = 0; p < s.num_points.back(); ++p) {
      std::vector<int> row(D);
      std::vector<uint8_t> bytes(B + 1, 0);
      for (int64_t i = 0; i < D; ++i) {
        row[i] = code(gen);
        const uint32_t u = uint32_t(row[i]) & ((1u << w_bits) - 1);
        const int64_t bit = i * w_bits;
        bytes[bit / 8] |= uint8_t(u << (bit % 8));
        bytes[bit / 8 + 1] |= uint8_t((u << (bit % 8)) >> 8);
      }
      s.codes.push_back(row);
      s.scales.push_back(scale(gen));
      s.packed.insert(s.packed.end(), bytes.begin(), bytes.begin() + B);
    }
  }
  return s;
}

// Every row of y against the float64 value within gamma_n * S (weight_only_linear.h).
void check_against_float64(const Stored& s, const std::vector<float>& x, int64_t rows, const std::vector<float>& y,
                           bool with_bias) {
  const double u = std::ldexp(1.0, -24);
  for (int64_t m = 0; m < rows; ++m) {
    int64_t t = 0;
    for (int64_t j = 0; j < s.C; ++j) {
      const double b = with_bias ? s.bias[j] : 0.0;
      double exact = b, S = std::abs(b);
      const int64_t P = s.num_points[j];
      for (int64_t p = 0; p < P; ++p, ++t) {
        double dot = 0.0, abs_dot = 0.0;
        for (int64_t d = 0; d < s.D; ++d) {
          dot += double(s.codes[t][d]) * x[m * s.D + d];
          abs_dot += std::abs(double(s.codes[t][d]) * x[m * s.D + d]);
        }
        exact += double(s.scales[t]) * dot;
        S += std::abs(double(s.scales[t])) * abs_dot;
      }
      const double n = double(std::max<int64_t>(s.D + 2 * P, P * ((s.D + 15) / 16)) + 6);
      const double bound = n * u / (1.0 - n * u) * S + 1e-12 * S;  // + the float64 reference's own error
      const double got = y[m * s.C + j];
      INFO("D " << s.D << " w_bits " << s.w_bits << " row " << m << " channel " << j << " points " << P);
      REQUIRE(std::abs(got - exact) <= bound);
    }
  }
}

std::vector<k::CpuIsa> paths() {
  std::vector<k::CpuIsa> p = {k::CpuIsa::kScalar};
  if (k::cpu_has_avx2()) p.push_back(k::CpuIsa::kAvx2);
  if (k::cpu_has_avx512()) p.push_back(k::CpuIsa::kAvx512);
  return p;
}

}  // namespace

TEST_CASE("weight-only Linear equals the float64 layer within the stated bound", "[weight_only]") {
  const int64_t C = 9;
  uint32_t seed = 1;
  for (int64_t w_bits = 2; w_bits <= 8; ++w_bits) {
    for (int64_t D : {1, 7, 16, 17, 127, 128, 129, 200, 384}) {
      const Stored s = random_stored(C, D, w_bits, seed++);
      const auto w = k::prepare_weight_only(s.packed.data(), s.scales.data(), s.num_points.data(), C, D, w_bits);
      REQUIRE(w.nibbles == (w_bits <= 4));
      for (int64_t rows : {1, 2, 3, 5, 8, 15, 16, 17}) {
        std::mt19937 gen(seed++);
        std::normal_distribution<float> normal(0.0f, 1.0f);
        std::vector<float> x(rows * D);
        for (auto& v : x) v = normal(gen);
        for (const auto isa : paths()) {
          for (const bool with_bias : {true, false}) {
            std::vector<float> y(rows * C, NAN);
            k::weight_only_linear(w, x.data(), rows, with_bias ? s.bias.data() : nullptr, y.data(), 0, C, isa);
            check_against_float64(s, x, rows, y, with_bias);
          }
        }
      }
    }
  }
}

TEST_CASE("weight-only Linear: channel ranges split the work without changing a bit", "[weight_only]") {
  const int64_t C = 37, D = 300, rows = 17;
  for (int64_t w_bits : {3, 4, 6}) {
    const Stored s = random_stored(C, D, w_bits, 100 + uint32_t(w_bits));
    const auto w = k::prepare_weight_only(s.packed.data(), s.scales.data(), s.num_points.data(), C, D, w_bits);
    std::mt19937 gen(7);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::vector<float> x(rows * D);
    for (auto& v : x) v = normal(gen);
    for (const auto isa : paths()) {
      std::vector<float> whole(rows * C), parts(rows * C, NAN);
      k::weight_only_linear(w, x.data(), rows, s.bias.data(), whole.data(), 0, C, isa);
      for (int64_t c0 : {0, 5, 6, 20}) {
        const int64_t c1 = c0 == 0 ? 5 : (c0 == 5 ? 6 : (c0 == 6 ? 20 : C));
        k::weight_only_linear(w, x.data(), rows, s.bias.data(), parts.data(), c0, c1, isa);
      }
      for (size_t i = 0; i < whole.size(); ++i) REQUIRE(whole[i] == parts[i]);
    }
  }
}

TEST_CASE("weight-only Linear: the prepared codes are the stored codes", "[weight_only]") {
  // Decoding through the kernel with one-hot inputs gives back scale * code exactly (one term).
  for (int64_t w_bits = 2; w_bits <= 8; ++w_bits) {
    const int64_t C = 3, D = 131;
    Stored s = random_stored(C, D, w_bits, 300 + uint32_t(w_bits));
    for (auto& v : s.scales) v = 1.0f;
    const auto w = k::prepare_weight_only(s.packed.data(), s.scales.data(), s.num_points.data(), C, D, w_bits);
    std::vector<float> x(D * D, 0.0f);
    for (int64_t d = 0; d < D; ++d) x[d * D + d] = 1.0f;
    for (const auto isa : paths()) {
      std::vector<float> y(D * C);
      k::weight_only_linear(w, x.data(), D, nullptr, y.data(), 0, C, isa);
      int64_t t = 0;
      for (int64_t j = 0; j < C; ++j) {
        for (int64_t d = 0; d < D; ++d) {
          int sum = 0;
          for (int64_t p = 0; p < s.num_points[j]; ++p) sum += s.codes[t + p][d];
          REQUIRE(y[d * C + j] == float(sum));
        }
        t += s.num_points[j];
      }
    }
  }
}
