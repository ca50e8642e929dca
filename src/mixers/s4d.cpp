// s4d — diagonal state space model (Gu et al. 2022, "On the Parameterization and
// Initialization of Diagonal State Space Models"), zero-order-hold discretisation:
//   Abar = exp(dt A),  Ct = C (Abar - 1) / A,  K_l = 2 Re(sum_n Ct_n Abar_n^l)
//   y_t = sum_{l<=t} K_l u_{t-l} + D u_t
// parallel: the kernel in O(T N) per channel (powers by repeated multiplication, float64),
// then the causal convolution as an FFT product zero-padded to 2T (no wrap-around).
// recurrent: x_t = Abar x_{t-1} + u_t (complex, (C,N)), y_t = 2 Re(Ct . x_t) + D u_t.
#include <complex>

#include "../kernels/fft.h"
#include "../ref/channel_ref.h"
#include "common.h"
#include "linmix/kernels.h"

namespace linmix {

namespace {

using cd = std::complex<double>;

struct S4dParams {  // per channel c and mode n: Abar, Ct (float64)
  int64_t C, N;
  std::vector<cd> Abar, Ct;
};

S4dParams discretise(const Call& c) {
  const int64_t C = c.d("C"), N = c.d("N");
  S4dParams p{C, N, std::vector<cd>(C * N), std::vector<cd>(C * N)};
  for (int64_t ch = 0; ch < C; ++ch) {
    const double dt = std::exp(double(c.t("log_dt").data[ch]));
    for (int64_t n = 0; n < N; ++n) {
      const int64_t i = ch * N + n;
      const cd A(c.t("A_re").data[i], c.t("A_im").data[i]), Cc(c.t("C_re").data[i], c.t("C_im").data[i]);
      p.Abar[i] = std::exp(dt * A);
      p.Ct[i] = Cc * (p.Abar[i] - 1.0) / A;
    }
  }
  return p;
}

TensorMap s4d_parallel(const Call& c) {
  const int64_t B = c.d("B"), T = c.d("T"), C = c.d("C"), N = c.d("N");
  const S4dParams p = discretise(c);
  const int64_t L = 2 * T, F = L / 2 + 1;
  const RealFft fft(L);
  // Kf: (C, F) spectrum of each channel's kernel, zero-padded to 2T.
  std::vector<cd> Kf(C * F);
  Tensor y({B, T, C});
  const float* u = c.t("u").ptr();
  const float* D = c.t("D").ptr();
#pragma omp parallel
  {
    RealBuf buf = alloc_real(L);
    ComplexBuf spec = alloc_complex(F);
    std::vector<cd> pw(N);
#pragma omp for schedule(static)
    for (int64_t ch = 0; ch < C; ++ch) {
      for (int64_t n = 0; n < N; ++n) pw[n] = 1.0;
      for (int64_t l = 0; l < T; ++l) {  // K_l = 2 Re sum_n Ct_n Abar_n^l
        double k = 0;
        for (int64_t n = 0; n < N; ++n) {
          k += (p.Ct[ch * N + n] * pw[n]).real();
          pw[n] *= p.Abar[ch * N + n];
        }
        buf[l] = 2 * k;
      }
      for (int64_t l = T; l < L; ++l) buf[l] = 0;
      fft.forward(buf.get(), spec.get());
      for (int64_t f = 0; f < F; ++f) Kf[ch * F + f] = cd(spec[f][0], spec[f][1]);
    }
#pragma omp for collapse(2) schedule(static)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t ch = 0; ch < C; ++ch) {
        for (int64_t t = 0; t < T; ++t) buf[t] = u[(b * T + t) * C + ch];
        for (int64_t l = T; l < L; ++l) buf[l] = 0;
        fft.forward(buf.get(), spec.get());
        for (int64_t f = 0; f < F; ++f) {
          const cd z = cd(spec[f][0], spec[f][1]) * Kf[ch * F + f];
          spec[f][0] = z.real(), spec[f][1] = z.imag();
        }
        fft.inverse(spec.get(), buf.get());
        for (int64_t t = 0; t < T; ++t) {
          const int64_t i = (b * T + t) * C + ch;
          y.data[i] = float(buf[t] / double(L) + double(D[ch]) * u[i]);
        }
      }
  }
  return {{"y", std::move(y)}};
}

TensorMap s4d_recurrent(const Call& c) {
  const int64_t B = c.d("B"), T = c.d("T"), C = c.d("C"), N = c.d("N");
  const S4dParams p = discretise(c);
  using cf = std::complex<float>;
  std::vector<cf> Abar(p.Abar.begin(), p.Abar.end()), Ct(p.Ct.begin(), p.Ct.end());
  Tensor y({B, T, C}), xr({B, C, N}), xi({B, C, N});
  if (c.has("state.x_re")) xr = c.t("state.x_re"), xi = c.t("state.x_im");
  const float *u = c.t("u").ptr(), *D = c.t("D").ptr();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t ch = 0; ch < C; ++ch) {
        const int64_t i = (b * T + t) * C + ch;
        float acc = 0.0f;
        for (int64_t n = 0; n < N; ++n) {
          const int64_t s = (b * C + ch) * N + n;
          const cf x = Abar[ch * N + n] * cf(xr.data[s], xi.data[s]) + u[i];
          xr.data[s] = x.real(), xi.data[s] = x.imag();
          acc += (Ct[ch * N + n] * x).real();
        }
        y.data[i] = 2.0f * acc + D[ch] * u[i];
      }
  return {{"y", std::move(y)}, {"state.x_re", std::move(xr)}, {"state.x_im", std::move(xi)}};
}

MixerSpec make_spec() {
  MixerSpec s;
  s.name = "s4d";
  s.paper = "Gu et al. 2022, On the Parameterization and Initialization of Diagonal State Space Models (S4D)";
  s.summary = "diagonal complex state space model, convolution kernel via FFT";
  s.causal_ok = true;
  s.noncausal_ok = false;
  s.inputs = {{"u", "B,T,C"},    {"log_dt", "C"}, {"A_re", "C,N"}, {"A_im", "C,N"},
              {"C_re", "C,N"},   {"C_im", "C,N"}, {"D", "C"}};
  s.state = {{"x_re", "B,C,N"}, {"x_im", "B,C,N"}};
  s.state_size = "2 C N per sequence (complex state)";
  s.time = "O(T C N + T C log T)";
  s.memory = "O(T C) (FFT buffers and kernel spectra)";
  s.example_fix = [](TensorMap& in) {  // S4D-Lin-like domain: dt in ~[1e-3, 1e-1], Re A < 0
    for (auto& x : in["log_dt"].data) x = -4.6f + 2.3f * (0.5f + 0.5f * std::tanh(x));
    for (auto& x : in["A_re"].data) x = -0.5f * std::exp(0.5f * x);
    for (auto& x : in["A_im"].data) x *= 3.0f;
  };
  s.check = [](const Call& c) {
    const Tensor& a = c.t("A_re");
    for (int64_t i = 0; i < a.numel(); ++i)
      LINMIX_CHECK(a.data[i] < 0.0f, "tensor 'A_re': must be < 0 (a stable diagonal SSM); A_re[" + std::to_string(i) +
                                         "] = " + std::to_string(a.data[i]));
  };
  s.y_dims = "B,T,C";
  set_reference(s, [](const Call& c, const auto& x) {
    using S = scalar_of<decltype(x)>;
    const int64_t B = c.d("B"), T = c.d("T"), C = c.d("C");
    std::vector<S> y(B * T * C);
    ref::s4d_ref<S>(y.data(), x.at("u").data(), x.at("log_dt").data(), x.at("A_re").data(), x.at("A_im").data(),
                    x.at("C_re").data(), x.at("C_im").data(), x.at("D").data(), B, T, C, c.d("N"));
    return y;
  });
  s.parallel = s4d_parallel;
  s.recurrent = s4d_recurrent;
  return s;
}

}  // namespace

MixerSpec s4d_spec() { return make_spec(); }

}  // namespace linmix
