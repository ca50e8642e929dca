// s4d — diagonal state space model (Gu et al. 2022, "On the Parameterization and
// Initialization of Diagonal State Space Models"), zero-order-hold discretisation:
//   Abar = exp(dt A),  Ct = C (Abar - 1) / A,  K_l = 2 Re(sum_n Ct_n Abar_n^l)
//   y_t = sum_{l<=t} K_l u_{t-l} + D u_t
// parallel: the kernel in O(T N) per channel (powers by repeated multiplication, float64),
// then the causal convolution as an FFT product zero-padded to 2T (no wrap-around).
// recurrent: x_t = Abar x_{t-1} + u_t (complex, (C,N)), y_t = 2 Re(Ct . x_t) + D u_t.
// Every form starts from a given state x_{-1} (zeros without): its part of the output,
// 2 Re(Ct Abar^{t+1} x_{-1}), and the final state Abar^T x_{-1} + sum_s Abar^{T-1-s} u_s are
// O(T N) per channel and sequence beside the convolution, and differentiated by hand.
#include <complex>

#include "../kernels/fft.h"
#include "../kernels/transpose.h"
#include "../ref/ref_util.h"
#include "common.h"
#include "linmix/kernels.h"

namespace linmix::ref {

// ---- s4d: the float64 reference (the literal formula, templated for the tape) ----
// S4D as T x T weights per channel, the kernel from its closed form (complex arithmetic
// written out in real and imaginary parts so it also runs on ad::Var):
//   K_l = 2 Re sum_n Ct_n exp(l dt A_n),  Ct = C (exp(dt A) - 1) / A,  W_ts = K_{t-s} (s <= t)
//   y_t = sum_s W_ts u_s + D u_t.   u, y: (B,T,C); log_dt, D: (C); A_*, C_*: (C,N).
// From a state x0 = (x0r, x0i) (B,C,N) (null: zeros): y_t += 2 Re sum_n Ct_n exp((t+1) dt A_n) x0_n;
// the final state xT (null: not wanted) = exp(T dt A) x0 + sum_s exp((T-1-s) dt A) u_s.
template <class S>
void s4d_ref(S* y, const S* u, const S* log_dt, const S* A_re, const S* A_im, const S* C_re, const S* C_im,
             const S* D, int64_t B, int64_t T, int64_t C, int64_t N, const S* x0r = nullptr, const S* x0i = nullptr,
             S* xTr = nullptr, S* xTi = nullptr) {
  std::vector<S> K(T), W(T * T), Sy(B * T);
  for (int64_t c = 0; c < C; ++c) {
    const S dt = exp(log_dt[c]);
    for (int64_t l = 0; l < T; ++l) K[l] = 0;
    for (auto& v : Sy) v = 0;
    for (int64_t n = 0; n < N; ++n) {
      const int64_t i = c * N + n;
      const S ar = A_re[i], ai = A_im[i], cr = C_re[i], ci = C_im[i];
      // exp(dt A) - 1
      const S er = exp(dt * ar) * cos(dt * ai) - 1, ei = exp(dt * ar) * sin(dt * ai);
      // (C (exp(dt A) - 1)) / A
      const S nr = cr * er - ci * ei, ni = cr * ei + ci * er, den = ar * ar + ai * ai;
      const S tr = (nr * ar + ni * ai) / den, ti = (ni * ar - nr * ai) / den;
      for (int64_t l = 0; l < T; ++l) {  // Re(Ct exp(l dt A))
        const S mag = exp(double(l) * dt * ar), ph = double(l) * dt * ai;
        K[l] += 2 * mag * (tr * cos(ph) - ti * sin(ph));
      }
      for (int64_t b = 0; b < B; ++b) {
        const int64_t si = (b * C + c) * N + n;
        if (x0r)
          for (int64_t t = 0; t < T; ++t) {  // 2 Re(Ct exp((t+1) dt A) x0)
            const S mag = exp(double(t + 1) * dt * ar), ph = double(t + 1) * dt * ai;
            const S pr = mag * cos(ph), pi = mag * sin(ph);  // exp((t+1) dt A)
            const S wr = tr * pr - ti * pi, wi = tr * pi + ti * pr;
            Sy[b * T + t] += 2 * (wr * x0r[si] - wi * x0i[si]);
          }
        if (xTr) {
          S fr = 0, fi = 0;
          if (x0r) {
            const S mag = exp(double(T) * dt * ar), ph = double(T) * dt * ai;
            fr = mag * (cos(ph) * x0r[si] - sin(ph) * x0i[si]), fi = mag * (cos(ph) * x0i[si] + sin(ph) * x0r[si]);
          }
          for (int64_t s2 = 0; s2 < T; ++s2) {
            const S mag = exp(double(T - 1 - s2) * dt * ar), ph = double(T - 1 - s2) * dt * ai;
            fr += mag * cos(ph) * u[(b * T + s2) * C + c], fi += mag * sin(ph) * u[(b * T + s2) * C + c];
          }
          xTr[si] = fr, xTi[si] = fi;
        }
      }
    }
    for (int64_t t = 0; t < T; ++t)
      for (int64_t s = 0; s < T; ++s) W[t * T + s] = s <= t ? K[t - s] : S(0);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < T; ++t) {
        S acc = D[c] * u[(b * T + t) * C + c] + Sy[b * T + t];
        for (int64_t s = 0; s < T; ++s) acc += W[t * T + s] * u[(b * T + s) * C + c];
        y[(b * T + t) * C + c] = acc;
      }
  }
}

}  // namespace linmix::ref

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

// The convolution kernel of channel ch: K_l = 2 Re sum_n Ct_n Abar_n^l for l < T, into K.
// Real and imaginary parts in separate arrays (w: 6 N scratch), so the loop over modes runs in
// SIMD lanes; std::complex's operator* goes through __muldc3 (its inf/NaN recovery) and ran
// scalar. The same products and sums as (Ct * pw).real() and pw *= Abar.
void s4d_kernel(const S4dParams& p, int64_t ch, int64_t T, double* K, double* w) {
  const int64_t N = p.N;
  double *pr = w, *pi = pr + N, *ar = pi + N, *ai = ar + N, *cr = ai + N, *ci = cr + N;
  for (int64_t n = 0; n < N; ++n) {
    pr[n] = 1.0, pi[n] = 0.0;
    ar[n] = p.Abar[ch * N + n].real(), ai[n] = p.Abar[ch * N + n].imag();
    cr[n] = p.Ct[ch * N + n].real(), ci[n] = p.Ct[ch * N + n].imag();
  }
  for (int64_t l = 0; l < T; ++l) {
    double k = 0;
#pragma omp simd reduction(+ : k)
    for (int64_t n = 0; n < N; ++n) {
      k += cr[n] * pr[n] - ci[n] * pi[n];
      const double r = pr[n] * ar[n] - pi[n] * ai[n], im = pr[n] * ai[n] + pi[n] * ar[n];
      pr[n] = r, pi[n] = im;
    }
    K[l] = 2 * k;
  }
}

// A (B,C,N) complex state as its two float tensors; null pointers where absent.
struct S4dState {
  Tensor re, im;
  const float* r() const { return re.numel() ? re.ptr() : nullptr; }
  const float* i() const { return im.numel() ? im.ptr() : nullptr; }
};
S4dState state_in(const Call& c, const char* re, const char* im) {
  S4dState s;
  if (c.has(re)) s.re = c.t(re), s.im = c.t(im);
  return s;
}

// The state's part of sequence b, channel ch: y[t] += 2 Re sum_n Ct_n Abar_n^{t+1} x0_n (x0 from
// the call's state, if any), and the final state xT = Abar^T x0 + sum_s Abar^{T-1-s} u_s into
// xT.re / xT.im (B,C,N) when they are allocated (an O(T N) recurrence per channel: as much
// work as the convolution, so only when the caller wants it, Call::final_state).
void state_forward(const S4dParams& p, const S4dState& x0, S4dState& xT, const float* u, double* y, int64_t b,
                   int64_t ch, int64_t T) {
  const int64_t C = p.C, N = p.N;
  for (int64_t n = 0; n < N; ++n) {
    const int64_t i = ch * N + n, si = (b * C + ch) * N + n;
    const cd z = p.Abar[i];
    cd x = x0.r() ? cd(x0.r()[si], x0.i()[si]) : cd(0.0);
    if (x0.r()) {
      const cd w0 = p.Ct[i] * x;  // Ct x0, then times z^{t+1}
      cd zl = z;
      for (int64_t t = 0; t < T; ++t, zl *= z) y[t] += 2.0 * (w0 * zl).real();
    }
    if (!xT.r()) continue;
    for (int64_t t = 0; t < T; ++t) x = z * x + double(u[(b * T + t) * C + ch]);  // the recurrence
    xT.re.data[si] = float(x.real()), xT.im.data[si] = float(x.imag());
  }
}

// The backward of state_forward for sequence b, channel ch, given g = dy and the final state's
// gradient dT (the call's dfinal.*, if any), in the complex-gradient convention of s4d_grad:
//   y_t += 2 Re(Ct z^{t+1} x0):  G_Ct += 2 conj(x0) S,  G_z += 2 conj(Ct x0) S',  G_x0 = 2 conj(Ct) S
//     with S = sum_t g_t conj(z)^{t+1}, S' = sum_t g_t (t+1) conj(z)^t;
//   xT = z^T x0 + sum_s z^{T-1-s} u_s:  du_s += Re(conj(G_xT) z^{T-1-s}),  G_x0 += conj(z^T) G_xT,
//     G_z += conj(T z^{T-1} x0 + sum_s (T-1-s) z^{T-2-s} u_s) G_xT.
// Also adds the state's part of y (yd, the backward's y). GCt, Gz: (N) accumulators of the
// channel; dx0 (B,C,N): written where the call has a state.
void state_backward(const S4dParams& p, const S4dState& x0, const S4dState& dT, const float* u, const float* g,
                    double* yd, float* du, int64_t b, int64_t ch, int64_t T, cd* GCt, cd* Gz, S4dState* dx0) {
  const int64_t C = p.C, N = p.N;
  for (int64_t n = 0; n < N; ++n) {
    const int64_t i = ch * N + n, si = (b * C + ch) * N + n;
    const cd z = p.Abar[i], Ct = p.Ct[i];
    const cd x = x0.r() ? cd(x0.r()[si], x0.i()[si]) : cd(0.0);
    cd Gx0 = 0.0;
    if (x0.r()) {
      cd S = 0, S1 = 0, zl = 1.0;  // zl = z^t
      for (int64_t t = 0; t < T; ++t) {
        const double gt = g[(b * T + t) * C + ch];
        S1 += gt * double(t + 1) * std::conj(zl);
        zl *= z;
        S += gt * std::conj(zl);
        yd[t] += 2.0 * (Ct * x * zl).real();
      }
      GCt[n] += 2.0 * std::conj(x) * S, Gz[n] += 2.0 * std::conj(Ct * x) * S1, Gx0 = 2.0 * std::conj(Ct) * S;
    }
    if (dT.r()) {
      const cd G(dT.r()[si], dT.i()[si]);
      // walking s from T-1 down: zp = z^{T-1-s}; dxz = d xT / dz accumulated
      cd zp = 1.0, dxz = 0.0, zprev = 0.0;  // zprev = z^{T-2-s} (0 for s = T-1)
      for (int64_t s2 = T - 1; s2 >= 0; --s2) {
        const int64_t it = (b * T + s2) * C + ch;
        du[it] += float((std::conj(G) * zp).real());
        dxz += double(T - 1 - s2) * zprev * double(u[it]);
        zprev = zp, zp *= z;
      }
      // now zp = z^T, zprev = z^{T-1}
      dxz += double(T) * zprev * x;
      Gz[n] += std::conj(dxz) * G;
      Gx0 += std::conj(zp) * G;
    }
    if (dx0) dx0->re.data[si] = float(Gx0.real()), dx0->im.data[si] = float(Gx0.imag());
  }
}

TensorMap s4d_parallel(const Call& c) {
  const int64_t B = c.d("B"), T = c.d("T"), C = c.d("C"), N = c.d("N");
  const S4dParams p = discretise(c);
  const S4dState x0 = state_in(c, "state.x_re", "state.x_im");
  S4dState xT;
  if (c.final_state) xT = S4dState{Tensor({B, C, N}), Tensor({B, C, N})};
  const int64_t L = 2 * T, F = L / 2 + 1;
  const RealFft fft(L);
  // Kf: (C, F) spectrum of each channel's kernel, zero-padded to 2T.
  std::vector<cd> Kf(C * F);
  Tensor y({B, T, C});
  const float* u = c.t("u").ptr();
  const float* D = c.t("D").ptr();
  // u and y as (B, C, T) copies, each channel's sequence contiguous: read and written in place at
  // row stride C, every element of a channel's sequence was a cache line of its own (the
  // transposes: 8 x 8 blocks, rows over the threads)
  std::vector<float> uT(size_t(B * C * T)), yT(size_t(B * C * T));
  constexpr int64_t kRows = 64;
  const int64_t nrb = (T + kRows - 1) / kRows;
#pragma omp parallel
  {
    RealBuf buf = alloc_real(L);
    ComplexBuf spec = alloc_complex(F);
    std::vector<double> w(6 * N);
#pragma omp for collapse(2) schedule(static)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t r = 0; r < nrb; ++r) {
        const int64_t t0 = r * kRows, nr = std::min(kRows, T - t0);
        transpose(uT.data() + b * C * T + t0, T, u + (b * T + t0) * C, C, nr, C);
      }
#pragma omp for schedule(static)
    for (int64_t ch = 0; ch < C; ++ch) {
      s4d_kernel(p, ch, T, buf.get(), w.data());  // K_l = 2 Re sum_n Ct_n Abar_n^l
      for (int64_t l = T; l < L; ++l) buf[l] = 0;
      fft.forward(buf.get(), spec.get());
      for (int64_t f = 0; f < F; ++f) Kf[ch * F + f] = cd(spec[f][0], spec[f][1]);
    }
#pragma omp for collapse(2) schedule(static)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t ch = 0; ch < C; ++ch) {
        const float* uc = uT.data() + (b * C + ch) * T;
        float* yc = yT.data() + (b * C + ch) * T;
        for (int64_t t = 0; t < T; ++t) buf[t] = uc[t];
        for (int64_t l = T; l < L; ++l) buf[l] = 0;
        fft.forward(buf.get(), spec.get());
        for (int64_t f = 0; f < F; ++f) {
          const cd z = cd(spec[f][0], spec[f][1]) * Kf[ch * F + f];
          spec[f][0] = z.real(), spec[f][1] = z.imag();
        }
        fft.inverse(spec.get(), buf.get());
        for (int64_t t = 0; t < T; ++t) buf[t] /= double(L);
        state_forward(p, x0, xT, u, buf.get(), b, ch, T);
        const double d = double(D[ch]);
        for (int64_t t = 0; t < T; ++t) yc[t] = float(buf[t] + d * uc[t]);
      }
#pragma omp for collapse(2) schedule(static)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t r = 0; r < nrb; ++r) {
        const int64_t t0 = r * kRows, nr = std::min(kRows, T - t0);
        transpose(y.ptr() + (b * T + t0) * C, C, yT.data() + b * C * T + t0, T, C, nr);
      }
  }
  TensorMap out = moved_map("y", std::move(y));
  if (c.final_state) out["state.x_re"] = std::move(xT.re), out["state.x_im"] = std::move(xT.im);
  return out;
}

// Backward. With g = dy and the causal convolution y = K * u + D u:
//   dD = sum g u,  du = D g + sum_{t>=s} K_{t-s} g_t,  dK_l = sum_b sum_t g_t u_{t-l}
// (both correlations as FFT products with a conjugate, zero-padded to 2T). Then through
// K_l = 2 Re sum_n Ct_n z_n^l, z = exp(dt A), Ct = C (z - 1) / A, with complex gradients
// G_w = dL/dRe(w) + i dL/dIm(w) (for holomorphic w = h(p): G_p = conj(h'(p)) G_w):
//   G_Ct = 2 sum_l dK_l conj(z^l),  G_z = 2 sum_l dK_l conj(Ct l z^(l-1)) + conj(C / A) G_Ct
//   G_C = conj((z - 1) / A) G_Ct,  G_A = conj(-C (z - 1) / A^2) G_Ct + conj(dt z) G_z
//   dL/d dt = sum_n Re(conj(G_z) A z),  d log_dt = dt dL/d dt.
TensorMap s4d_grad(const Call& c, const Tensor& dy) {
  const int64_t B = c.d("B"), T = c.d("T"), C = c.d("C"), N = c.d("N");
  const S4dParams p = discretise(c);
  const int64_t L = 2 * T, F = L / 2 + 1;
  const RealFft fft(L);
  const float *u = c.t("u").ptr(), *D = c.t("D").ptr(), *g = dy.ptr();
  Tensor y({B, T, C}), du({B, T, C}), dlog_dt({C}), dA_re({C, N}), dA_im({C, N}), dC_re({C, N}), dC_im({C, N}),
      dD({C});
  const S4dState x0 = state_in(c, "state.x_re", "state.x_im"), dT = state_in(c, "dfinal.x_re", "dfinal.x_im");
  const bool with_state = x0.r() || dT.r();
  S4dState dx0;
  if (x0.r()) dx0 = S4dState{Tensor({B, C, N}), Tensor({B, C, N})};
#pragma omp parallel
  {
    RealBuf buf = alloc_real(L);
    ComplexBuf Kf = alloc_complex(F), Uf = alloc_complex(F), Gf = alloc_complex(F), tmp = alloc_complex(F);
    std::vector<double> K(T), dK(T), ys(T);  // ys: y of one row before D u (the state's part added)
    std::vector<double> w(6 * N);
    std::vector<cd> GCt_s(N), Gz_s(N);  // the state's parts of G_Ct, G_z of the channel
    auto spectrum = [&](fftw_complex* out, auto value) {  // FFT of a length-T signal, zero-padded
      for (int64_t t = 0; t < T; ++t) buf[t] = value(t);
      for (int64_t l = T; l < L; ++l) buf[l] = 0;
      fft.forward(buf.get(), out);
    };
    // buf = irfft(a * (conj b if conj_b else b)) / L
    auto product = [&](const fftw_complex* a, const fftw_complex* b, bool conj_b) {
      for (int64_t f = 0; f < F; ++f) {
        const cd z = cd(a[f][0], a[f][1]) * (conj_b ? std::conj(cd(b[f][0], b[f][1])) : cd(b[f][0], b[f][1]));
        tmp[f][0] = z.real(), tmp[f][1] = z.imag();
      }
      fft.inverse(tmp.get(), buf.get());
      for (int64_t l = 0; l < L; ++l) buf[l] /= double(L);
    };
#pragma omp for schedule(static)
    for (int64_t ch = 0; ch < C; ++ch) {
      s4d_kernel(p, ch, T, K.data(), w.data());
      spectrum(Kf.get(), [&](int64_t t) { return K[t]; });
      std::fill(dK.begin(), dK.end(), 0.0);
      std::fill(GCt_s.begin(), GCt_s.end(), cd(0.0)), std::fill(Gz_s.begin(), Gz_s.end(), cd(0.0));
      double dDc = 0;
      for (int64_t b = 0; b < B; ++b) {
        auto at = [&](int64_t t) { return (b * T + t) * C + ch; };
        spectrum(Uf.get(), [&](int64_t t) { return double(u[at(t)]); });
        spectrum(Gf.get(), [&](int64_t t) { return double(g[at(t)]); });
        product(Uf.get(), Kf.get(), false);  // y = K * u + D u (+ the state's part)
        std::copy(buf.get(), buf.get() + T, ys.begin());
        product(Gf.get(), Kf.get(), true);  // du_s = sum_{t>=s} K_{t-s} g_t + D g_s
        for (int64_t t = 0; t < T; ++t) du.data[at(t)] = float(buf[t] + double(D[ch]) * g[at(t)]);
        if (with_state)
          state_backward(p, x0, dT, u, g, ys.data(), du.ptr(), b, ch, T, GCt_s.data(), Gz_s.data(),
                         x0.r() ? &dx0 : nullptr);
        for (int64_t t = 0; t < T; ++t) y.data[at(t)] = float(ys[t] + double(D[ch]) * u[at(t)]);
        product(Gf.get(), Uf.get(), true);  // dK_l += sum_t g_t u_{t-l}
        for (int64_t l = 0; l < T; ++l) dK[l] += buf[l];
        for (int64_t t = 0; t < T; ++t) dDc += double(g[at(t)]) * u[at(t)];
      }
      dD.data[ch] = float(dDc);
      const double dt = std::exp(double(c.t("log_dt").data[ch]));
      double ddt = 0;
      for (int64_t n = 0; n < N; ++n) {
        const int64_t i = ch * N + n;
        const cd z = p.Abar[i], Ct = p.Ct[i];
        const cd A(c.t("A_re").data[i], c.t("A_im").data[i]), Cc(c.t("C_re").data[i], c.t("C_im").data[i]);
        cd S0 = 0, S1 = 0, zl = 1;  // sum dK_l conj(z^l), sum dK_l l conj(z^(l-1))
        for (int64_t l = 0; l < T; ++l) {
          S0 += dK[l] * std::conj(zl);
          if (l + 1 < T) S1 += dK[l + 1] * double(l + 1) * std::conj(zl);
          zl *= z;
        }
        const cd GCt = 2.0 * S0 + GCt_s[n];
        const cd Gz = 2.0 * std::conj(Ct) * S1 + Gz_s[n] + std::conj(Cc / A) * GCt;
        const cd GC = std::conj((z - 1.0) / A) * GCt;
        const cd GA = std::conj(-Cc * (z - 1.0) / (A * A)) * GCt + std::conj(dt * z) * Gz;
        ddt += (std::conj(Gz) * A * z).real();
        dA_re.data[i] = float(GA.real()), dA_im.data[i] = float(GA.imag());
        dC_re.data[i] = float(GC.real()), dC_im.data[i] = float(GC.imag());
      }
      dlog_dt.data[ch] = float(dt * ddt);
    }
  }
  TensorMap out = moved_map("y", std::move(y), "du", std::move(du), "dlog_dt", std::move(dlog_dt), "dA_re",
                            std::move(dA_re), "dA_im", std::move(dA_im), "dC_re", std::move(dC_re), "dC_im",
                            std::move(dC_im), "dD", std::move(dD));
  if (x0.r()) out["dstate.x_re"] = std::move(dx0.re), out["dstate.x_im"] = std::move(dx0.im);
  return out;
}


MixerSpec make_spec() {
  MixerSpec s;
  s.name = "s4d";
  s.own_dims = [](std::map<std::string, int64_t>& d, Scale scale, bool) {
    d["N"] = scale == Scale::Test ? 4 : scale == Scale::Grad ? 2 : scale == Scale::Demo ? 8 : 16;
  };
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
  s.state_all_modes = true;  // every form starts from state.x_re / x_im and returns the final x
  set_reference(s, [](const Call& c, const auto& x) {
    using S = scalar_of<decltype(x)>;
    const int64_t B = c.d("B"), T = c.d("T"), C = c.d("C"), N = c.d("N");
    std::vector<S> y(B * T * C + 2 * B * C * N);
    S* fin = y.data() + B * T * C;
    ref::s4d_ref<S>(y.data(), x.at("u").data(), x.at("log_dt").data(), x.at("A_re").data(), x.at("A_im").data(),
                    x.at("C_re").data(), x.at("C_im").data(), x.at("D").data(), B, T, C, N, opt_in(x, "state.x_re"),
                    opt_in(x, "state.x_im"), fin, fin + B * C * N);
    return y;
  });
  s.parallel = s4d_parallel;
  s.stepper = [](const Call& c) {
    const int64_t C = c.d("C"), N = c.d("N");
    const S4dParams p = discretise(c);  // once: the discretised A and C of every channel
    // Channels innermost ((n, c) layouts): every inner loop runs over C contiguous channels in
    // SIMD lanes, with no per-channel horizontal sum.
    auto ab = std::make_shared<std::vector<float>>(4 * C * N);  // Abar re, im; Ct re, im: (N, C)
    for (int64_t ch = 0; ch < C; ++ch)
      for (int64_t n = 0; n < N; ++n) {
        const int64_t i = ch * N + n, o = n * C + ch;
        (*ab)[o] = float(p.Abar[i].real()), (*ab)[C * N + o] = float(p.Abar[i].imag()),
        (*ab)[2 * C * N + o] = float(p.Ct[i].real()), (*ab)[3 * C * N + o] = float(p.Ct[i].imag());
      }
    auto x = std::make_shared<std::vector<float>>(2 * C * N + C, 0.0f);  // state re, im (N, C); acc (C)
    const float *u = c.t("u").ptr(), *D = c.t("D").ptr();
    auto save = [=] {  // the spec's (1, C, N) layout
      Tensor xr({1, C, N}), xi({1, C, N});
      for (int64_t ch = 0; ch < C; ++ch)
        for (int64_t n = 0; n < N; ++n)
          xr.data[ch * N + n] = (*x)[n * C + ch], xi.data[ch * N + n] = (*x)[C * N + n * C + ch];
      return moved_map("state.x_re", std::move(xr), "state.x_im", std::move(xi));
    };
    auto load = [=](const TensorMap& m) {
      const Tensor &xr = m.at("state.x_re"), &xi = m.at("state.x_im");
      for (int64_t ch = 0; ch < C; ++ch)
        for (int64_t n = 0; n < N; ++n)
          (*x)[n * C + ch] = xr.data[ch * N + n], (*x)[C * N + n * C + ch] = xi.data[ch * N + n];
    };
    auto step = [=](float* y) {
      const float *ar = ab->data(), *ai = ar + C * N, *cr = ai + C * N, *ci = cr + C * N;
      float *xr = x->data(), *xi = xr + C * N, *acc = xi + C * N;
      std::fill(acc, acc + C, 0.0f);
      for (int64_t n = 0; n < N; ++n) {  // x = Abar x + u; acc += Re(Ct x)
        const int64_t o = n * C;
#pragma omp simd
        for (int64_t ch = 0; ch < C; ++ch) {
          const float r = ar[o + ch] * xr[o + ch] - ai[o + ch] * xi[o + ch] + u[ch],
                      i = ar[o + ch] * xi[o + ch] + ai[o + ch] * xr[o + ch];
          xr[o + ch] = r, xi[o + ch] = i;
          acc[ch] += cr[o + ch] * r - ci[o + ch] * i;
        }
      }
      for (int64_t ch = 0; ch < C; ++ch) y[ch] = 2.0f * acc[ch] + D[ch] * u[ch];
    };
    return Stepper{step, save, load};
  };
  s.backward = s4d_grad;
  return s;
}

}  // namespace

MixerSpec s4d_spec() { return make_spec(); }

}  // namespace linmix
