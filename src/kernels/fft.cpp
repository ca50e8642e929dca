#include "fft.h"

#include <map>
#include <mutex>
#include <tuple>

#include "linmix/error.h"

namespace linmix {

namespace {
std::mutex& planner_mutex() {
  static std::mutex m;
  return m;
}
}  // namespace

RealBufF alloc_real_f(int64_t n) { return RealBufF(fftwf_alloc_real(static_cast<size_t>(std::max<int64_t>(n, 1)))); }
ComplexBufF alloc_complex_f(int64_t n) {
  return ComplexBufF(fftwf_alloc_complex(static_cast<size_t>(std::max<int64_t>(n, 1))));
}

RealFft2F::RealFft2F(int64_t n0, int64_t n1, int threads) {
  std::lock_guard<std::mutex> lock(planner_mutex());
  static const bool threads_ok = fftwf_init_threads() != 0;  // once, under the planner's lock
  fftwf_plan_with_nthreads(threads_ok ? std::max(1, threads) : 1);
  RealBufF r = alloc_real_f(n0 * n1);
  ComplexBufF c = alloc_complex_f(n0 * (n1 / 2 + 1));
  fwd_ = fftwf_plan_dft_r2c_2d(int(n0), int(n1), r.get(), c.get(), FFTW_ESTIMATE);
  fftwf_plan_with_nthreads(1);
  LINMIX_CHECK(fwd_, "FFTW could not plan a transform of size " + std::to_string(n0) + " x " + std::to_string(n1));
}

RealFft2F::~RealFft2F() {
  std::lock_guard<std::mutex> lock(planner_mutex());
  if (fwd_) fftwf_destroy_plan(fwd_);
}

std::shared_ptr<const RealFft2F> RealFft2F::cached(int64_t n0, int64_t n1, int threads) {
  static std::mutex m;
  static std::map<std::tuple<int64_t, int64_t, int>, std::shared_ptr<const RealFft2F>> plans;
  const auto key = std::make_tuple(n0, n1, threads);
  {
    std::lock_guard<std::mutex> lock(m);
    const auto it = plans.find(key);
    if (it != plans.end()) return it->second;
  }
  auto p = std::make_shared<const RealFft2F>(n0, n1, threads);  // planned outside m (the planner has its own)
  std::lock_guard<std::mutex> lock(m);
  if (plans.size() < 16) plans.emplace(key, p);
  return p;
}


}  // namespace linmix
