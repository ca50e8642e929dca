// Plain references for the multi-head mechanisms (MIXERS.md "softmax", "linear").
// They materialise the T x T weight matrix per (batch, head) and are templated on the
// scalar so the tests and `--mode reference` run them in float64.
//
// q, k: (B,T,H,D) contiguous; v: (B,T,H,E) contiguous; y: (B,T,H,E).
#pragma once
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace linmix::ref {

struct AttnDims {
  int64_t B, T, H, D, E;
};

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
        for (int64_t s = 0; s < T; ++s) sum += (A[t * T + s] = std::exp(A[t * T + s] - mx));
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
  return x > 0 ? x + 1 : std::exp(x);
}

// y_t = sum_s A_ts v_s / (sum_s A_ts + eps), A_ts = phi(q_t) . phi(k_s), s <= t when causal.
// (Equal to phi(q_t)^T S / (phi(q_t) . z + eps) of MIXERS.md by linearity.)
template <class S>
void linear_ref(S* y, const S* q, const S* k, const S* v, const AttnDims& d, S eps, bool causal) {
  const int64_t T = d.T, H = d.H, D = d.D, E = d.E;
  std::vector<S> A(static_cast<size_t>(T * T));
  for (int64_t b = 0; b < d.B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t t = 0; t < T; ++t)
        for (int64_t s = 0; s < T; ++s) {
          S a = 0;
          if (!causal || s <= t)
            for (int64_t i = 0; i < D; ++i)
              a += phi_elu_ref(q[((b * T + t) * H + h) * D + i]) * phi_elu_ref(k[((b * T + s) * H + h) * D + i]);
          A[t * T + s] = a;
        }
      for (int64_t t = 0; t < T; ++t) {
        S den = 0;
        for (int64_t s = 0; s < T; ++s) den += A[t * T + s];
        for (int64_t e = 0; e < E; ++e) {
          S num = 0;
          for (int64_t s = 0; s < T; ++s) num += A[t * T + s] * v[((b * T + s) * H + h) * E + e];
          y[((b * T + t) * H + h) * E + e] = num / (den + eps);
        }
      }
    }
}

// TransNormer NormAttention: y_t = srms(sum_s A_ts v_s), A_ts = phi(q_t) . phi(k_s)
// (s <= t when causal), srms(x) = x / sqrt(mean(x^2) + eps) over the E values of a head.
template <class S>
void norm_linear_ref(S* y, const S* q, const S* k, const S* v, const AttnDims& d, S eps, bool causal) {
  const int64_t T = d.T, H = d.H, D = d.D, E = d.E;
  std::vector<S> A(static_cast<size_t>(T * T)), o(static_cast<size_t>(E));
  for (int64_t b = 0; b < d.B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t t = 0; t < T; ++t)
        for (int64_t s = 0; s < T; ++s) {
          S a = 0;
          if (!causal || s <= t)
            for (int64_t i = 0; i < D; ++i)
              a += phi_elu_ref(q[((b * T + t) * H + h) * D + i]) * phi_elu_ref(k[((b * T + s) * H + h) * D + i]);
          A[t * T + s] = a;
        }
      for (int64_t t = 0; t < T; ++t) {
        S ms = 0;
        for (int64_t e = 0; e < E; ++e) {
          S acc = 0;
          for (int64_t s = 0; s < T; ++s) acc += A[t * T + s] * v[((b * T + s) * H + h) * E + e];
          o[e] = acc;
          ms += acc * acc;
        }
        const S inv = 1 / std::sqrt(ms / S(E) + eps);
        for (int64_t e = 0; e < E; ++e) y[((b * T + t) * H + h) * E + e] = o[e] * inv;
      }
    }
}

}  // namespace linmix::ref
