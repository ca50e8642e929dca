// fnet — Fourier mixing (Lee-Thorp et al. 2022, "FNet: Mixing Tokens with Fourier
// Transforms", eq. 3): y = Re(DFT_T(DFT_C(x))). Non-causal only; no state.
// parallel: one 2-D real-to-complex FFT per sequence (FFTW in single precision, on the threads); the half spectrum suffices since
// for real x, Re X[t, c] = Re X[(T - t) % T, (C - c) % C] (Hermitian symmetry).

#include <omp.h>

#include "../kernels/fft.h"
#include "../ref/ref_util.h"
#include "common.h"
#include "linmix/kernels.h"

namespace linmix::ref {

// ---- fnet: the float64 reference (the literal formula, templated for the tape) ----
// FNet with materialised DFT matrices: with e^{-ia} e^{-ib} = cos a cos b - sin a sin b - i(...),
//   y = Re(F_T x F_C) = cos_T x cos_C - sin_T x sin_C.   x, y: (B,T,C).
template <class S>
void fnet_ref(S* y, const S* x, int64_t B, int64_t T, int64_t C) {
  auto mats = [](int64_t n, std::vector<double>& cs, std::vector<double>& sn) {
    cs.resize(n * n), sn.resize(n * n);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < n; ++j) {
        const double a = 2 * 3.14159265358979323846 * double((i * j) % n) / double(n);
        cs[i * n + j] = std::cos(a), sn[i * n + j] = std::sin(a);
      }
  };
  std::vector<double> cT, sT, cC, sC;
  std::vector<S> xc(T * C), xs(T * C);
  mats(T, cT, sT);
  mats(C, cC, sC);
  for (int64_t b = 0; b < B; ++b) {
    const S* xb = x + b * T * C;
    for (int64_t s = 0; s < T; ++s)
      for (int64_t c = 0; c < C; ++c) {
        S a = 0, d = 0;
        for (int64_t k = 0; k < C; ++k) a += xb[s * C + k] * cC[k * C + c], d += xb[s * C + k] * sC[k * C + c];
        xc[s * C + c] = a, xs[s * C + c] = d;
      }
    for (int64_t t = 0; t < T; ++t)
      for (int64_t c = 0; c < C; ++c) {
        S acc = 0;
        for (int64_t s = 0; s < T; ++s) acc += cT[t * T + s] * xc[s * C + c] - sT[t * T + s] * xs[s * C + c];
        y[(b * T + t) * C + c] = acc;
      }
  }
}

}  // namespace linmix::ref

namespace linmix {

namespace {

// y = Re(DFT_T(DFT_C(x))) of x: (B,T,C), one 2-D FFT per sequence in single precision, each on the
// threads (FFTW's OpenMP plan, kept across calls; inside a parallel region a single-threaded one),
// the copies in and out split over the rows.
Tensor fnet_apply(const float* x, int64_t B, int64_t T, int64_t C) {
  const int64_t Ch = C / 2 + 1;
  const int threads = omp_in_parallel() ? 1 : omp_get_max_threads();
  const std::shared_ptr<const RealFft2F> fft = RealFft2F::cached(T, C, threads);
  Tensor y = Tensor::uninitialized({B, T, C});  // every element written below
  thread_local RealBufF in;
  thread_local ComplexBufF out;
  thread_local int64_t cap = 0;
  if (cap < T * C) in = alloc_real_f(T * C), out = alloc_complex_f(T * Ch), cap = T * C;
  float* pi = in.get();
  const fftwf_complex* po = out.get();
  for (int64_t b = 0; b < B; ++b) {
    const float* xb = x + b * T * C;
#pragma omp parallel for schedule(static) if (threads > 1)
    for (int64_t i = 0; i < T * C; ++i) pi[i] = xb[i];
    fft->forward(pi, out.get());
    float* yb = y.ptr() + b * T * C;
#pragma omp parallel for schedule(static) if (threads > 1)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t ch = 0; ch < C; ++ch) {
        const int64_t tt = ch < Ch ? t : (T - t) % T, cc = ch < Ch ? ch : C - ch;
        yb[t * C + ch] = po[tt * Ch + cc][0];
      }
  }
  return y;
}

TensorMap fnet_parallel(const Call& c) {
  return moved_map("y", fnet_apply(c.t("x").ptr(), c.d("B"), c.d("T"), c.d("C")));
}

// The DFT matrices are symmetric, so y = Re(F_T x F_C) has dx = Re(F_T dy F_C): the same
// transform applied to dy (MIXERS.md "fnet").
TensorMap fnet_grad(const Call& c, const Tensor& dy) {
  const int64_t B = c.d("B"), T = c.d("T"), C = c.d("C");
  return moved_map("y", fnet_apply(c.t("x").ptr(), B, T, C), "dx", fnet_apply(dy.ptr(), B, T, C));
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
  s.y_dims = "B,T,C";
  set_reference(s, [](const Call& c, const auto& x) {
    using S = scalar_of<decltype(x)>;
    const int64_t B = c.d("B"), T = c.d("T"), C = c.d("C");
    std::vector<S> y(B * T * C);
    ref::fnet_ref<S>(y.data(), x.at("x").data(), B, T, C);
    return y;
  });
  s.parallel = fnet_parallel;
  s.backward = fnet_grad;
  return s;
}

}  // namespace

MixerSpec fnet_spec() { return make_spec(); }

}  // namespace linmix
