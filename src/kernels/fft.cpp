#include "fft.h"

#include <mutex>

#include "linmix/error.h"

namespace linmix {

namespace {
std::mutex& planner_mutex() {
  static std::mutex m;
  return m;
}
}  // namespace

RealBuf alloc_real(int64_t n) { return RealBuf(fftw_alloc_real(static_cast<size_t>(std::max<int64_t>(n, 1)))); }
ComplexBuf alloc_complex(int64_t n) {
  return ComplexBuf(fftw_alloc_complex(static_cast<size_t>(std::max<int64_t>(n, 1))));
}

RealFft::RealFft(int64_t n) {
  std::lock_guard<std::mutex> lock(planner_mutex());
  RealBuf r = alloc_real(n);
  ComplexBuf c = alloc_complex(n / 2 + 1);
  fwd_ = fftw_plan_dft_r2c_1d(int(n), r.get(), c.get(), FFTW_ESTIMATE);
  inv_ = fftw_plan_dft_c2r_1d(int(n), c.get(), r.get(), FFTW_ESTIMATE);
  LINMIX_CHECK(fwd_ && inv_, "FFTW could not plan a transform of length " + std::to_string(n));
}

RealFft::RealFft(int64_t n0, int64_t n1) {
  std::lock_guard<std::mutex> lock(planner_mutex());
  RealBuf r = alloc_real(n0 * n1);
  ComplexBuf c = alloc_complex(n0 * (n1 / 2 + 1));
  fwd_ = fftw_plan_dft_r2c_2d(int(n0), int(n1), r.get(), c.get(), FFTW_ESTIMATE);
  inv_ = fftw_plan_dft_c2r_2d(int(n0), int(n1), c.get(), r.get(), FFTW_ESTIMATE);
  LINMIX_CHECK(fwd_ && inv_, "FFTW could not plan a transform of size " + std::to_string(n0) + " x " +
                                 std::to_string(n1));
}

RealFft::~RealFft() {
  std::lock_guard<std::mutex> lock(planner_mutex());
  if (fwd_) fftw_destroy_plan(fwd_);
  if (inv_) fftw_destroy_plan(inv_);
}

}  // namespace linmix
