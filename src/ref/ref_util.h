// Building blocks shared by several float64 references (each mechanism's own reference lives in
// its file under src/mixers/, in namespace linmix::ref): the masked softmax attention (softmax,
// block_softmax), the phi = elu + 1 kernel matrix (linear, norm_linear) and the AFT formula
// with a given bias (the four AFT variants). Templated on the scalar: double, or ad::Var for
// the reference gradient.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "linmix/dims.h"

namespace linmix::ref {

// Unqualified math: std:: for double, ad:: (found by argument lookup) for ad::Var.
using std::cos;
using std::exp;
using std::log1p;
using std::sin;
using std::sqrt;

using linmix::AttnDims;

// Allowed pair (t, s) under MIXERS.md's causal flag, `window` (0 = unlimited) and
// `block` (block_softmax: t and s in the same block of `block` positions; 0 = no blocks).
inline bool attn_allowed(int64_t t, int64_t s, bool causal, int64_t window, int64_t block = 0) {
  if (causal && s > t) return false;
  if (window > 0 && (t - s >= window || s - t >= window)) return false;
  if (block > 0 && t / block != s / block) return false;
  return true;
}

// y_t = sum_s softmax_s(scale * q_t . k_s) v_s over the allowed s.
template <class S>
void softmax_ref(S* y, const S* q, const S* k, const S* v, const AttnDims& d, S scale, bool causal,
                 int64_t window, int64_t block = 0) {
  const int64_t T = d.T, H = d.H, D = d.D, E = d.E;
  std::vector<S> A(static_cast<size_t>(T * T));
  for (int64_t b = 0; b < d.B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      auto Q = [&](int64_t t, int64_t i) { return q[((b * T + t) * H + h) * D + i]; };
      auto K = [&](int64_t t, int64_t i) { return k[((b * T + t) * H + h) * D + i]; };
      auto V = [&](int64_t t, int64_t i) { return v[((b * T + t) * H + h) * E + i]; };
      for (int64_t t = 0; t < T; ++t) {
        S mx = -std::numeric_limits<S>::infinity();
        for (int64_t s = 0; s < T; ++s) {
          S a = -std::numeric_limits<S>::infinity();
          if (attn_allowed(t, s, causal, window, block)) {
            a = 0;
            for (int64_t i = 0; i < D; ++i) a += Q(t, i) * K(s, i);
            a *= scale;
          }
          A[t * T + s] = a;
          mx = std::max(mx, a);
        }
        S sum = 0;
        for (int64_t s = 0; s < T; ++s) sum += (A[t * T + s] = exp(A[t * T + s] - mx));
        for (int64_t s = 0; s < T; ++s) A[t * T + s] /= sum;
      }
      for (int64_t t = 0; t < T; ++t)
        for (int64_t e = 0; e < E; ++e) {
          S acc = 0;
          for (int64_t s = 0; s < T; ++s) acc += A[t * T + s] * V(s, e);
          y[((b * T + t) * H + h) * E + e] = acc;
        }
    }
}

template <class S>
S phi_elu_ref(S x) {
  return x > 0 ? x + 1 : exp(x);
}

// A (T,T) = phi(q_t) . phi(k_s) for one (batch, head), zero where s > t when causal.
template <class S>
void phi_kernel_matrix(S* A, const S* q, const S* k, const AttnDims& d, int64_t b, int64_t h, bool causal) {
  const int64_t T = d.T, H = d.H, D = d.D;
  for (int64_t t = 0; t < T; ++t)
    for (int64_t s = 0; s < T; ++s) {
      S a = 0;
      if (!causal || s <= t)
        for (int64_t i = 0; i < D; ++i)
          a += phi_elu_ref(q[((b * T + t) * H + h) * D + i]) * phi_elu_ref(k[((b * T + s) * H + h) * D + i]);
      A[t * T + s] = a;
    }
}

// The AFT formula for a given pairwise bias bias(t, s, c) (each variant writes its own):
// y_t = sigma(q_t) * sum_s exp(k_s + w_ts) v_s / sum_s exp(k_s + w_ts), elementwise in C, over
// s <= t when causal (AFT never excludes any other position: far ones just get w = 0).
// A causal state (num0, den0, max0: (B,C), the sums of e^{k_s} (v_s, 1) over the positions before
// token 0, scaled by e^{-max0}; null: none) adds num0 e^{max0} and den0 e^{max0} to every t's
// numerator and denominator: those positions are far from every t (bias 0).
template <class S, class Bias>
void aft_ref(S* y, const S* q, const S* k, const S* v, int64_t B, int64_t T, int64_t C, bool causal, Bias bias,
             const S* num0 = nullptr, const S* den0 = nullptr, const S* max0 = nullptr) {
  std::vector<S> W(static_cast<size_t>(T * T));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t c = 0; c < C; ++c) {
      auto at = [&](const S* x, int64_t t) { return x[(b * T + t) * C + c]; };
      for (int64_t t = 0; t < T; ++t) {
        S mx = -std::numeric_limits<S>::infinity();
        for (int64_t s = 0; s < T; ++s) {
          W[t * T + s] = !causal || s <= t ? at(k, s) + bias(t, s, c) : -std::numeric_limits<S>::infinity();
          mx = std::max(mx, W[t * T + s]);
        }
        if (num0) mx = std::max(mx, max0[b * C + c]);
        S den = 0, num = 0;
        for (int64_t s = 0; s < T; ++s) {
          const S e = exp(W[t * T + s] - mx);
          den += e;
          num += e * at(v, s);
        }
        if (num0) {
          const S e = exp(max0[b * C + c] - mx);
          num += e * num0[b * C + c], den += e * den0[b * C + c];
        }
        y[(b * T + t) * C + c] = num / den / (1 + exp(-at(q, t)));
      }
    }
}

// The AFT state's sums after position end - 1 (B,C each): maxT = max(max0, k_s), numT = num0
// e^{max0 - maxT} + sum_{s < end} e^{k_s - maxT} v_s, denT alike; without an initial state the
// sums start empty (max -1e38).
template <class S>
void aft_sums_ref(S* numT, S* denT, S* maxT, const S* k, const S* v, int64_t B, int64_t T, int64_t C, int64_t end,
                  const S* num0 = nullptr, const S* den0 = nullptr, const S* max0 = nullptr) {
  for (int64_t b = 0; b < B; ++b)
    for (int64_t c = 0; c < C; ++c) {
      auto at = [&](const S* x, int64_t t) { return x[(b * T + t) * C + c]; };
      const int64_t i = b * C + c;
      S m = num0 ? max0[i] : S(-1e38);
      for (int64_t s = 0; s < end; ++s) m = std::max(m, at(k, s));
      S num = num0 ? exp(max0[i] - m) * num0[i] : S(0), den = num0 ? exp(max0[i] - m) * den0[i] : S(0);
      for (int64_t s = 0; s < end; ++s) {
        const S e = exp(at(k, s) - m);
        num += e * at(v, s), den += e;
      }
      numT[i] = num, denT[i] = den, maxT[i] = m;
    }
}

// aft_local / aft_conv from a sums-and-ring state, causal (the float64 reference): per batch row
// b, the ring's L rows (rk, rv (B,L,C); null when L = 0) are positions pos[b] - L .. pos[b] - 1
// before the call's, every position sees the sums (num0, den0, max0; null: none) as far terms,
// and bias(t, s, c) reads absolute positions. y (B,T,C); fin: the final num, den, max (B,C each),
// the final ring k, v (B,keep,C each: the last keep = min(L + T, lo) rows) and, with_pos, pos + T (B).
template <class S, class Bias>
void aft_ring_ref(S* y, S* fin, const S* q, const S* k, const S* v, int64_t B, int64_t T, int64_t C, int64_t L,
                  int64_t lo, const S* num0, const S* den0, const S* max0, const S* rk, const S* rv,
                  const std::vector<int64_t>& pos, bool with_pos, Bias bias) {
  const int64_t n = L + T, keep = std::min(n, lo);
  std::vector<S> cq(n * C, S(0)), ck(n * C), cv(n * C), yc(n * C);
  S *numT = fin, *denT = fin + B * C, *maxT = fin + 2 * B * C, *fk = fin + 3 * B * C, *fv = fk + B * keep * C;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t i = 0; i < L * C; ++i) ck[i] = rk[b * L * C + i], cv[i] = rv[b * L * C + i];
    for (int64_t i = 0; i < T * C; ++i)
      cq[L * C + i] = q[b * T * C + i], ck[L * C + i] = k[b * T * C + i], cv[L * C + i] = v[b * T * C + i];
    const int64_t first = pos[size_t(b)] - L;  // the absolute position of row 0
    const S *n0 = num0 ? num0 + b * C : nullptr, *d0 = num0 ? den0 + b * C : nullptr, *m0 = num0 ? max0 + b * C : nullptr;
    aft_ref<S>(yc.data(), cq.data(), ck.data(), cv.data(), 1, n, C, true,
               [&](int64_t t, int64_t s, int64_t c) { return bias(t + first, s + first, c); }, n0, d0, m0);
    for (int64_t i = 0; i < T * C; ++i) y[b * T * C + i] = yc[L * C + i];
    aft_sums_ref<S>(numT + b * C, denT + b * C, maxT + b * C, ck.data(), cv.data(), 1, n, C, n - keep, n0, d0, m0);
    for (int64_t i = 0; i < keep * C; ++i) fk[b * keep * C + i] = ck[(n - keep) * C + i], fv[b * keep * C + i] = cv[(n - keep) * C + i];
    if (with_pos) fv[B * keep * C + b] = S(double(pos[size_t(b)] + T));
  }
}

}  // namespace linmix::ref
