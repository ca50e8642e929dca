// Helpers shared by the C++ tests.
#pragma once
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <string>

#include "linmix/tensor.h"

namespace linmix::test {

inline double max_abs(const Tensor& t) {
  double m = 0;
  for (float x : t.data) m = std::max(m, std::fabs(double(x)));
  return m;
}

// MIXERS.md tolerance for float32 kernels vs the float64 reference:
// max |err| <= 1e-4 * max(1, max |ref|).
inline void expect_close(const Tensor& got, const Tensor& ref, const std::string& what, double factor = 1e-4) {
  ASSERT_EQ(got.shape, ref.shape) << what;
  double err = 0;
  for (int64_t i = 0; i < ref.numel(); ++i) {
    ASSERT_TRUE(std::isfinite(got.data[i])) << what << ": element " << i << " is not finite";
    err = std::max(err, std::fabs(double(got.data[i]) - double(ref.data[i])));
  }
  const double tol = factor * std::max(1.0, max_abs(ref));
  EXPECT_LE(err, tol) << what;
}

inline std::string tmp_dir() {
  const std::string d = std::string(LINMIX_TEST_TMP) + "/" +
                        ::testing::UnitTest::GetInstance()->current_test_info()->test_suite_name() + "." +
                        ::testing::UnitTest::GetInstance()->current_test_info()->name();
  std::filesystem::remove_all(d);
  std::filesystem::create_directories(d);
  return d;
}

}  // namespace linmix::test
