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

}  // namespace linmix
