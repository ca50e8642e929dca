// fnet — Fourier mixing (Lee-Thorp et al. 2022, "FNet: Mixing Tokens with Fourier
// Transforms", eq. 3): y = Re(DFT_T(DFT_C(x))). Non-causal only; no state.
// parallel: one 2-D real-to-complex FFT per sequence (FFTW); the half spectrum suffices since
// for real x, Re X[t, c] = Re X[(T - t) % T, (C - c) % C] (Hermitian symmetry).
#include <numbers>

#include "../kernels/fft.h"
#include "common.h"
#include "linmix/kernels.h"

namespace linmix {

namespace {

TensorMap fnet_parallel(const Call& c) {
  const int64_t B = c.d("B"), T = c.d("T"), C = c.d("C"), Ch = C / 2 + 1;
  const RealFft fft(T, C);
  Tensor y({B, T, C});
  const float* x = c.t("x").ptr();
#pragma omp parallel
  {
    RealBuf in = alloc_real(T * C);
    ComplexBuf out = alloc_complex(T * Ch);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t i = 0; i < T * C; ++i) in[i] = x[b * T * C + i];
      fft.forward(in.get(), out.get());
      float* yb = y.ptr() + b * T * C;
      for (int64_t t = 0; t < T; ++t)
        for (int64_t ch = 0; ch < C; ++ch) {
          const int64_t tt = ch < Ch ? t : (T - t) % T, cc = ch < Ch ? ch : C - ch;
          yb[t * C + ch] = float(out[tt * Ch + cc][0]);
        }
    }
  }
  return {{"y", std::move(y)}};
}

// Materialised DFT matrices in float64: with e^{-i a} e^{-i b} = cos a cos b - sin a sin b - i (...),
//   y = Re(F_T x F_C) = cos_T x cos_C - sin_T x sin_C.
TensorMap fnet_reference(const Call& c) {
  const int64_t B = c.d("B"), T = c.d("T"), C = c.d("C");
  auto mats = [](int64_t n, std::vector<double>& cs, std::vector<double>& sn) {
    cs.resize(n * n), sn.resize(n * n);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < n; ++j) {
        const double a = 2 * std::numbers::pi * double((i * j) % n) / double(n);
        cs[i * n + j] = std::cos(a), sn[i * n + j] = std::sin(a);
      }
  };
  std::vector<double> cT, sT, cC, sC, xc(T * C), xs(T * C), y(B * T * C);
  mats(T, cT, sT);
  mats(C, cC, sC);
  for (int64_t b = 0; b < B; ++b) {
    const float* x = c.t("x").ptr() + b * T * C;
    for (int64_t s = 0; s < T; ++s)  // x cos_C and x sin_C
      for (int64_t ch = 0; ch < C; ++ch) {
        double a = 0, d = 0;
        for (int64_t k = 0; k < C; ++k) a += x[s * C + k] * cC[k * C + ch], d += x[s * C + k] * sC[k * C + ch];
        xc[s * C + ch] = a, xs[s * C + ch] = d;
      }
    for (int64_t t = 0; t < T; ++t)
      for (int64_t ch = 0; ch < C; ++ch) {
        double acc = 0;
        for (int64_t s = 0; s < T; ++s) acc += cT[t * T + s] * xc[s * C + ch] - sT[t * T + s] * xs[s * C + ch];
        y[(b * T + t) * C + ch] = acc;
      }
  }
  return {{"y", from_double({B, T, C}, y)}};
}

MixerSpec make_spec() {
  MixerSpec s;
  s.name = "fnet";
  s.paper = "Lee-Thorp et al. 2022, FNet: Mixing Tokens with Fourier Transforms";
  s.summary = "parameter-free mixing: real part of the 2-D DFT over time and channels";
  s.causal_ok = false;
  s.noncausal_ok = true;
  s.inputs = {{"x", "B,T,C"}};
  s.state_size = "none (non-causal only)";
  s.time = "O(T C log(T C))";
  s.memory = "O(T C)";
  s.reference = fnet_reference;
  s.parallel = fnet_parallel;
  return s;
}

}  // namespace

MixerSpec fnet_spec() { return make_spec(); }

}  // namespace linmix
