// FFT through FFTW3 (double precision): plan creation is serialised (FFTW's planner is not
// thread-safe); execution on per-thread buffers is (fftw_execute_dft_* "new-array" calls
// with buffers from fftw_alloc_*, which share the planner buffers' alignment).
#pragma once
#include <fftw3.h>

#include <complex>
#include <cstdint>
#include <memory>

namespace linmix {

struct FftwFree {
  void operator()(void* p) const { fftw_free(p); }
};
using RealBuf = std::unique_ptr<double[], FftwFree>;
using ComplexBuf = std::unique_ptr<fftw_complex[], FftwFree>;
RealBuf alloc_real(int64_t n);
ComplexBuf alloc_complex(int64_t n);

// Owns a pair of plans for real <-> half-complex transforms of length n (1-D) or n0 x n1 (2-D).
class RealFft {
 public:
  explicit RealFft(int64_t n);             // 1-D
  RealFft(int64_t n0, int64_t n1);         // 2-D, row-major
  ~RealFft();
  RealFft(const RealFft&) = delete;
  RealFft& operator=(const RealFft&) = delete;
  // in: real (n), out: complex (n/2+1) [2-D: (n0, n1/2+1)]. Unnormalised.
  void forward(double* in, fftw_complex* out) const { fftw_execute_dft_r2c(fwd_, in, out); }
  // in: complex, out: real; unnormalised (the round trip multiplies by the size). Overwrites in.
  void inverse(fftw_complex* in, double* out) const { fftw_execute_dft_c2r(inv_, in, out); }

 private:
  fftw_plan fwd_ = nullptr, inv_ = nullptr;
};

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
