// exp_fast against std::exp (evaluated in double) over its whole range.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <vector>

#include "../src/kernels/vmath.h"

using linmix::exp_fast;
using linmix::log_fast;
using linmix::softplus_fast;

TEST(VMath, ExpFastMatchesStdExp) {
  double worst = 0;
  for (double x = -87.3; x <= 88.7; x += 1.0 / 1024) {
    const float xf = float(x);
    const double want = std::exp(double(xf));
    const double rel = std::fabs(double(exp_fast(xf)) - want) / want;
    worst = std::max(worst, rel);
  }
  // float32 has a 2^-24 = 6e-8 half-ulp; the reduction and polynomial add about one ulp.
  EXPECT_LT(worst, 2.5e-7);
}

TEST(VMath, ExpFastEdges) {
  EXPECT_EQ(exp_fast(0.0f), 1.0f);
  EXPECT_EQ(exp_fast(-1e38f), 0.0f);
  EXPECT_EQ(exp_fast(-std::numeric_limits<float>::infinity()), 0.0f);
  EXPECT_EQ(exp_fast(-100.0f), 0.0f);
  EXPECT_TRUE(std::isinf(exp_fast(100.0f)));
  EXPECT_TRUE(std::isinf(exp_fast(std::numeric_limits<float>::infinity())));
  EXPECT_TRUE(std::isnan(exp_fast(std::nanf(""))));
}

#if defined(__AVX512F__)
// exp16 (the AVX-512 form, Mamba's recurrent step) bit for bit exp_fast: every 1/1024 over the
// range, the edges (under- and overflow, the clamps' ends, +-inf, NaN, +-0) and 16 lanes of mixed ones.
TEST(VMath, Exp16EqualsExpFastBitForBit) {
  std::vector<float> xs = {0.0f, -0.0f, -87.3365447f, -87.34f, 88.7228391f, 88.73f, -1e38f, 1e38f,
                           std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity(),
                           std::nanf(""), 1e-30f, -1e-30f, 0.5f, -0.5f, 20.0f};
  for (double x = -90.0; x <= 90.0; x += 1.0 / 1024) xs.push_back(float(x));
  while (xs.size() % 16) xs.push_back(1.0f);
  for (size_t i = 0; i < xs.size(); i += 16) {
    alignas(64) float out[16];
    _mm512_store_ps(out, linmix::exp16(_mm512_loadu_ps(xs.data() + i)));
    for (size_t j = 0; j < 16; ++j) {
      const float want = exp_fast(xs[i + j]);
      if (std::isnan(want)) EXPECT_TRUE(std::isnan(out[j])) << xs[i + j];
      else ASSERT_EQ(std::bit_cast<uint32_t>(out[j]), std::bit_cast<uint32_t>(want)) << xs[i + j];
    }
  }
}
#endif

TEST(VMath, LogFastMatchesStdLog) {
  double worst = 0;
  for (double l = -80; l <= 80; l += 1.0 / 512) {  // x from 1.8e-35 to 5.5e34
    const float xf = float(std::exp(l));
    const double want = std::log(double(xf));
    worst = std::max(worst, std::fabs(double(log_fast(xf)) - want) / std::max(1.0, std::fabs(want)));
  }
  EXPECT_LT(worst, 2.5e-7);
  EXPECT_EQ(log_fast(1.0f), 0.0f);
}

TEST(VMath, SoftplusFastMatchesFormula) {
  double worst = 0;
  for (double x = -80; x <= 80; x += 1.0 / 256) {
    const float xf = float(x);
    const double want = std::log1p(std::exp(double(xf)));
    worst = std::max(worst, std::fabs(double(softplus_fast(xf)) - want) / want);
  }
  EXPECT_LT(worst, 5e-7);  // relative, tails included (softplus(-80) = 1.8e-35)
}

// dot_rows against float64 dot products: 37 rows (two blocks of 16, one of 4, one row alone) of
// 64 columns in a strided matrix, and 40 columns (not a multiple of 16: the plain loop). Each
// row's products differ (row i scaled by i + 1), so a sum landing in another row's lane shows.
TEST(VMath, DotRowsEqualsDoubleDotProducts) {
  for (int64_t n : {64, 40}) {
    const int64_t rows = 37, ld = n + 8;
    std::vector<float> A(static_cast<size_t>(rows * ld)), x(static_cast<size_t>(n)), out(static_cast<size_t>(rows));
    for (int64_t i = 0; i < rows * ld; ++i) A[size_t(i)] = float(std::sin(0.37 * double(i)) * double(1 + i / ld));
    for (int64_t j = 0; j < n; ++j) x[size_t(j)] = float(std::cos(0.11 * double(j)));
    linmix::dot_rows(out.data(), A.data(), rows, ld, x.data(), n, 0.5f);
    for (int64_t r = 0; r < rows; ++r) {
      double want = 0;
      for (int64_t j = 0; j < n; ++j) want += double(A[size_t(r * ld + j)]) * double(x[size_t(j)]);
      EXPECT_NEAR(out[size_t(r)], 0.5 * want, 1e-5 * double(1 + r) * double(n)) << "n " << n << " row " << r;
    }
  }
}
