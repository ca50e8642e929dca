// Plain references for the per-channel mechanisms (MIXERS.md "aft_*", "rwkv4").
// Each materialises, per (batch, channel), the T x T matrix of exponents, subtracts the
// row max and normalises: the literal formula, templated on the scalar (run in float64).
//
// q, k, v: (B,T,C) contiguous; y: (B,T,C).
#pragma once
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace linmix::ref {

// Unqualified math: std:: for double, ad:: (found by argument lookup) for ad::Var.
using std::cos;
using std::exp;
using std::log1p;
using std::sin;
using std::sqrt;

// The pairwise bias w_ts of one AFT variant; allowed(t, s) is false where s is excluded
// (only by causality: AFT never excludes a position, far ones just get w = 0).
template <class S>
struct AftBias {
  enum Kind { None, Full, Local, Conv } kind = None;
  const S* w = nullptr;  // Full/Local: (Tw,Tw)
  int64_t Tw = 0;
  int64_t window = 0;     // Local
  const S* u = nullptr;  // Conv: (H,K)
  int64_t H = 1, K = 0, C = 1;
  bool causal = false;

  bool allowed(int64_t t, int64_t s) const { return !causal || s <= t; }
  S operator()(int64_t t, int64_t s, int64_t c) const {
    switch (kind) {
      case None: return 0;
      case Full: return w[t * Tw + s];
      case Local: return (t - s < window && s - t < window) ? w[t * Tw + s] : S(0);
      case Conv: {
        const int64_t h = c / (C / H);
        if (causal) return (t - s >= 0 && t - s < K) ? u[h * K + (t - s)] : S(0);
        const int64_t half = (K - 1) / 2;
        return (t - s <= half && s - t <= half) ? u[h * K + (t - s + half)] : S(0);
      }
    }
    return 0;
  }
};

// y_t = sigma(q_t) * sum_s exp(k_s + w_ts) v_s / sum_s exp(k_s + w_ts), elementwise in C.
template <class S>
void aft_ref(S* y, const S* q, const S* k, const S* v, int64_t B, int64_t T, int64_t C, const AftBias<S>& bias) {
  std::vector<S> W(static_cast<size_t>(T * T));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t c = 0; c < C; ++c) {
      auto at = [&](const S* x, int64_t t) { return x[(b * T + t) * C + c]; };
      for (int64_t t = 0; t < T; ++t) {
        S mx = -std::numeric_limits<S>::infinity();
        for (int64_t s = 0; s < T; ++s) {
          W[t * T + s] = bias.allowed(t, s) ? at(k, s) + bias(t, s, c) : -std::numeric_limits<S>::infinity();
          mx = std::max(mx, W[t * T + s]);
        }
        S den = 0, num = 0;
        for (int64_t s = 0; s < T; ++s) {
          const S e = exp(W[t * T + s] - mx);
          den += e;
          num += e * at(v, s);
        }
        y[(b * T + t) * C + c] = num / den / (1 + exp(-at(q, t)));
      }
    }
}

// RWKV-4 WKV: y_t = (sum_{i<t} e^{-(t-1-i) w + k_i} v_i + e^{u + k_t} v_t) / (same without v).
template <class S>
void rwkv4_ref(S* y, const S* k, const S* v, const S* w, const S* u, int64_t B, int64_t T, int64_t C) {
  std::vector<S> L(static_cast<size_t>(T * T));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t c = 0; c < C; ++c) {
      auto at = [&](const S* x, int64_t t) { return x[(b * T + t) * C + c]; };
      for (int64_t t = 0; t < T; ++t) {
        S mx = -std::numeric_limits<S>::infinity();
        for (int64_t i = 0; i <= t; ++i) {
          L[t * T + i] = i < t ? -S(t - 1 - i) * w[c] + at(k, i) : u[c] + at(k, t);
          mx = std::max(mx, L[t * T + i]);
        }
        S num = 0, den = 0;
        for (int64_t i = 0; i <= t; ++i) {
          const S e = exp(L[t * T + i] - mx);
          num += e * at(v, i);
          den += e;
        }
        y[(b * T + t) * C + c] = num / den;
      }
    }
}

// S4D as T x T weights per channel, the kernel from its closed form (complex arithmetic
// written out in real and imaginary parts so it also runs on ad::Var):
//   K_l = 2 Re sum_n Ct_n exp(l dt A_n),  Ct = C (exp(dt A) - 1) / A,  W_ts = K_{t-s} (s <= t)
//   y_t = sum_s W_ts u_s + D u_t.   u, y: (B,T,C); log_dt, D: (C); A_*, C_*: (C,N).
template <class S>
void s4d_ref(S* y, const S* u, const S* log_dt, const S* A_re, const S* A_im, const S* C_re, const S* C_im,
             const S* D, int64_t B, int64_t T, int64_t C, int64_t N) {
  std::vector<S> K(T), W(T * T);
  for (int64_t c = 0; c < C; ++c) {
    const S dt = exp(log_dt[c]);
    for (int64_t l = 0; l < T; ++l) K[l] = 0;
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
    }
    for (int64_t t = 0; t < T; ++t)
      for (int64_t s = 0; s < T; ++s) W[t * T + s] = s <= t ? K[t - s] : S(0);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < T; ++t) {
        S acc = D[c] * u[(b * T + t) * C + c];
        for (int64_t s = 0; s < T; ++s) acc += W[t * T + s] * u[(b * T + s) * C + c];
        y[(b * T + t) * C + c] = acc;
      }
  }
}

// Mamba's selective scan as T x T weights: with cum_t = sum_{r<=t} dt_r,
//   W_ts = sum_n Cm_t[n] exp(A[c,n] (cum_t - cum_s)) dt_s Bm_s[n]   (s <= t)
//   y_t = (sum_s W_ts u_s + D u_t) * silu(z_t).   D, z, bias may be null.
template <class S>
void mamba_ref(S* y, const S* u, const S* delta, const S* A, const S* Bm, const S* Cm, const S* D, const S* z,
               const S* bias, bool use_softplus, int64_t B, int64_t T, int64_t C, int64_t N) {
  std::vector<S> cum(T), dt(T), W(T * T);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t c = 0; c < C; ++c) {
      S run = 0;
      for (int64_t t = 0; t < T; ++t) {
        const S x = delta[(b * T + t) * C + c] + (bias ? bias[c] : S(0));
        dt[t] = use_softplus ? (x > 30 ? x : log1p(exp(x))) : x;
        cum[t] = (run += dt[t]);
      }
      for (int64_t t = 0; t < T; ++t)
        for (int64_t s = 0; s < T; ++s) {
          S w = 0;
          if (s <= t)
            for (int64_t n = 0; n < N; ++n)
              w += Cm[(b * T + t) * N + n] * exp(A[c * N + n] * (cum[t] - cum[s])) * dt[s] * Bm[(b * T + s) * N + n];
          W[t * T + s] = w;
        }
      for (int64_t t = 0; t < T; ++t) {
        S acc = 0;
        for (int64_t s = 0; s < T; ++s) acc += W[t * T + s] * u[(b * T + s) * C + c];
        const int64_t i = (b * T + t) * C + c;
        if (D) acc += D[c] * u[i];
        if (z) acc *= z[i] / (1 + exp(-z[i]));
        y[i] = acc;
      }
    }
}

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
