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
          const S e = std::exp(W[t * T + s] - mx);
          den += e;
          num += e * at(v, s);
        }
        y[(b * T + t) * C + c] = num / den / (1 + std::exp(-at(q, t)));
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
          const S e = std::exp(L[t * T + i] - mx);
          num += e * at(v, i);
          den += e;
        }
        y[(b * T + t) * C + c] = num / den;
      }
    }
}

}  // namespace linmix::ref
