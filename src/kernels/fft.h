// FFT through FFTW3 (single precision, FNet's transform): plan creation is serialised (FFTW's
// planner is not thread-safe).
#pragma once
#include <fftw3.h>

#include <complex>
#include <cstdint>
#include <memory>

namespace linmix {

// Single precision, 2-D real -> half-complex (n0 x n1 -> n0 x (n1/2+1)), forward only, for
// FNet: threads > 1 has FFTW's OpenMP threads run each transform (call it outside a parallel
// region). Buffers from fftwf_alloc_* (the planner's alignment).
struct FftwfFree {
  void operator()(void* p) const { fftwf_free(p); }
};
using RealBufF = std::unique_ptr<float[], FftwfFree>;
using ComplexBufF = std::unique_ptr<fftwf_complex[], FftwfFree>;
RealBufF alloc_real_f(int64_t n);
ComplexBufF alloc_complex_f(int64_t n);
class RealFft2F {
 public:
  RealFft2F(int64_t n0, int64_t n1, int threads);
  ~RealFft2F();
  RealFft2F(const RealFft2F&) = delete;
  RealFft2F& operator=(const RealFft2F&) = delete;
  void forward(float* in, fftwf_complex* out) const { fftwf_execute_dft_r2c(fwd_, in, out); }
  // A plan kept for the process (the first 16 shapes x threads asked for; others get one of
  // their own, held by the returned pointer)
  static std::shared_ptr<const RealFft2F> cached(int64_t n0, int64_t n1, int threads);

 private:
  fftwf_plan fwd_ = nullptr;
};

}  // namespace linmix
