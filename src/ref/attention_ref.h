// Plain references for the multi-head mechanisms (MIXERS.md "softmax", "linear").
// They materialise the T x T weight matrix per (batch, head) and are templated on the
// scalar so the tests and `--mode reference` run them in float64.
//
// q, k: (B,T,H,D) contiguous; v: (B,T,H,E) contiguous; y: (B,T,H,E).
#pragma once
#include <cmath>
#include <cstdint>
#include <algorithm>
#include <limits>
#include <vector>

#include "linmix/kernels.h"

namespace linmix::ref {

// Unqualified math: std:: for double, ad:: (found by argument lookup) for ad::Var.
using std::cos;
using std::exp;
using std::log1p;
using std::sin;
using std::sqrt;

using linmix::AttnDims;  // (B,T,H,D,E), from linmix/kernels.h

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

// y_t = sum_s A_ts v_s / (sum_s A_ts + eps), A_ts = phi(q_t) . phi(k_s), s <= t when causal.
// (Equal to phi(q_t)^T S / (phi(q_t) . z + eps) of MIXERS.md by linearity.)
template <class S>
void linear_ref(S* y, const S* q, const S* k, const S* v, const AttnDims& d, S eps, bool causal) {
  const int64_t T = d.T, H = d.H, E = d.E;
  std::vector<S> A(static_cast<size_t>(T * T));
  for (int64_t b = 0; b < d.B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      phi_kernel_matrix(A.data(), q, k, d, b, h, causal);
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
  const int64_t T = d.T, H = d.H, E = d.E;
  std::vector<S> A(static_cast<size_t>(T * T)), o(static_cast<size_t>(E));
  for (int64_t b = 0; b < d.B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      phi_kernel_matrix(A.data(), q, k, d, b, h, causal);
      for (int64_t t = 0; t < T; ++t) {
        S ms = 0;
        for (int64_t e = 0; e < E; ++e) {
          S acc = 0;
          for (int64_t s = 0; s < T; ++s) acc += A[t * T + s] * v[((b * T + s) * H + h) * E + e];
          o[e] = acc;
          ms += acc * acc;
        }
        const S inv = 1 / sqrt(ms / S(E) + eps);
        for (int64_t e = 0; e < E; ++e) y[((b * T + t) * H + h) * E + e] = o[e] * inv;
      }
    }
}

// Performer: y_t = sum_s A_ts v_s / sum_s A_ts, A_ts = phi(q_t) . phi(k_s) (s <= t when
// causal), phi(x)_m = exp(omega_m . x' - |x'|^2 / 2) / sqrt(M), x' = x D^(-1/4): the features
// exactly as the paper writes them (no shifts). proj: (M,D).
template <class S>
void performer_ref(S* y, const S* q, const S* k, const S* v, const S* proj, const AttnDims& d, int64_t M,
                   bool causal) {
  const int64_t T = d.T, H = d.H, D = d.D, E = d.E;
  const double sc = std::pow(double(D), -0.25);
  auto phi = [&](const S* x, S* out) {
    S sq = 0;
    for (int64_t j = 0; j < D; ++j) sq += x[j] * sc * x[j] * sc;
    for (int64_t m = 0; m < M; ++m) {
      S a = 0;
      for (int64_t j = 0; j < D; ++j) a += proj[m * D + j] * x[j] * sc;
      out[m] = exp(a - sq / 2) / std::sqrt(double(M));
    }
  };
  std::vector<S> fq(T * M), fk(T * M), A(T * T);
  for (int64_t b = 0; b < d.B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t t = 0; t < T; ++t) {
        phi(q + ((b * T + t) * H + h) * D, &fq[t * M]);
        phi(k + ((b * T + t) * H + h) * D, &fk[t * M]);
      }
      for (int64_t t = 0; t < T; ++t) {
        S den = 0;
        for (int64_t s2 = 0; s2 < T; ++s2) {
          S a = 0;
          if (!causal || s2 <= t)
            for (int64_t m = 0; m < M; ++m) a += fq[t * M + m] * fk[s2 * M + m];
          A[t * T + s2] = a;
          den += a;
        }
        for (int64_t e = 0; e < E; ++e) {
          S num = 0;
          for (int64_t s2 = 0; s2 < T; ++s2) num += A[t * T + s2] * v[((b * T + s2) * H + h) * E + e];
          y[((b * T + t) * H + h) * E + e] = num / den;
        }
      }
    }
}

// Flow-Attention, the literal formula of MIXERS.md: every sum written out over its index set
// (j < lim(i): all j, or j <= i when causal), then the T x T weights
// W_ij = (Q_i I_i / r_i) . K_j comp_j, y_i = alloc_i sum_j W_ij v_j.
template <class S>
void flow_ref(S* y, const S* q, const S* k, const S* v, const AttnDims& d, bool causal) {
  const int64_t T = d.T, H = d.H, D = d.D, E = d.E;
  const double eps = 1e-6;
  std::vector<S> Q(T * D), K(T * D), I(T), O(T), Ih(T), Oh(T), comp(T), W(T * T);
  auto sig = [](const S& x) { return S(1) / (1 + exp(-x)); };
  auto lim = [&](int64_t i) { return causal ? i + 1 : T; };
  auto r = [&](int64_t i) { return causal ? double(i + 1) : 1.0; };
  for (int64_t b = 0; b < d.B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t t = 0; t < T; ++t)
        for (int64_t x = 0; x < D; ++x) {
          Q[t * D + x] = sig(q[((b * T + t) * H + h) * D + x]);
          K[t * D + x] = sig(k[((b * T + t) * H + h) * D + x]);
        }
      for (int64_t i = 0; i < T; ++i) {
        S a = 0, c = 0;
        for (int64_t x = 0; x < D; ++x) {
          S sk = 0, sq = 0;
          for (int64_t j = 0; j < lim(i); ++j) sk += K[j * D + x], sq += Q[j * D + x];
          a += (Q[i * D + x] + eps) * (sk + eps);
          c += (K[i * D + x] + eps) * (sq + eps);
        }
        I[i] = r(i) / a;
        O[i] = r(i) / c;
      }
      for (int64_t i = 0; i < T; ++i) {
        S a = 0, c = 0;
        for (int64_t x = 0; x < D; ++x) {
          S sko = 0, sqi = 0;
          for (int64_t j = 0; j < lim(i); ++j) sko += K[j * D + x] * O[j], sqi += Q[j * D + x] * I[j];
          a += (Q[i * D + x] + eps) * (sko + eps);
          c += (K[i * D + x] + eps) * (sqi + eps);
        }
        Ih[i] = a / r(i);
        Oh[i] = std::clamp(c / r(i), S(-1.0), S(1.0));
      }
      for (int64_t i = 0; i < T; ++i) {
        S z = 0;
        for (int64_t j = 0; j < lim(i); ++j) z += exp(Oh[j]);
        comp[i] = exp(Oh[i]) / z * (causal ? r(i) : double(T));
      }
      for (int64_t i = 0; i < T; ++i)
        for (int64_t j = 0; j < T; ++j) {
          S w = 0;
          if (j < lim(i))
            for (int64_t x = 0; x < D; ++x) w += Q[i * D + x] * I[i] / r(i) * K[j * D + x];
          W[i * T + j] = w * comp[j];
        }
      for (int64_t i = 0; i < T; ++i)
        for (int64_t e = 0; e < E; ++e) {
          S acc = 0;
          for (int64_t j = 0; j < T; ++j) acc += W[i * T + j] * v[((b * T + j) * H + h) * E + e];
          y[((b * T + i) * H + h) * E + e] = acc * sig(Ih[i]);
        }
    }
}

// FLASH mixed-chunk attention as T x T weights: W_ij = [same group, j <= i if causal]
// relu(qq_i . qk_j / G)^2 + lin_q_i . lin_k_j / G for earlier groups (causal) or / T for all
// j (non-causal). qq, qk, lq, lk: (B,T,S); v, y: (B,T,E).
template <class S>
void flash_ref(S* y, const S* qq, const S* qk, const S* lq, const S* lk, const S* v, int64_t B, int64_t T,
               int64_t Sd, int64_t E, int64_t G, bool causal) {
  std::vector<S> W(T * T);
  for (int64_t b = 0; b < B; ++b) {
    auto dot = [&](const S* a, const S* c, int64_t i, int64_t j) {
      S s = 0;
      for (int64_t x = 0; x < Sd; ++x) s += a[(b * T + i) * Sd + x] * c[(b * T + j) * Sd + x];
      return s;
    };
    for (int64_t i = 0; i < T; ++i)
      for (int64_t j = 0; j < T; ++j) {
        S w = 0;
        if (i / G == j / G && (!causal || j <= i)) {
          const S a = std::max(S(0), dot(qq, qk, i, j) / double(G));
          w += a * a;
        }
        if (causal && j / G < i / G) w += dot(lq, lk, i, j) / double(G);
        if (!causal) w += dot(lq, lk, i, j) / double(T);
        W[i * T + j] = w;
      }
    for (int64_t i = 0; i < T; ++i)
      for (int64_t e = 0; e < E; ++e) {
        S acc = 0;
        for (int64_t j = 0; j < T; ++j) acc += W[i * T + j] * v[(b * T + j) * E + e];
        y[(b * T + i) * E + e] = acc;
      }
  }
}

}  // namespace linmix::ref
