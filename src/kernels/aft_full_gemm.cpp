// AFT-full's forward as GEMMs (issue 19): y_t = sigma(q_t) num_t / den_t with
//   num_tc = sum_s e^{w_ts} e^{k_sc} v_sc,   den_tc = sum_s e^{w_ts} e^{k_sc}
// (s <= t when causal). The pairwise bias factors out of the channel sum, so a block of key
// positions is two products of the (T x S) matrix e^{w - m_t} with (S x C) matrices
// e^{k - M_c} and e^{k - M_c} v, each factor <= 1 against a stabiliser: the row max m_t of w
// (common to num and den: it cancels) and the block's column max M_c of k (blocks are combined
// per (t, c) with a running max, as a log-sum-exp). Where the two maxima sit at different
// positions the product of the factors can underflow for every s of a (t, c); then den falls
// below e^{-60} of its scale, and that (t, c) is recomputed exactly with a running max over s
// (the banded kernel's arithmetic), so the result is exact for any range (the tests' +-60).
#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../mixers/common.h"
#include "linmix/kernels.h"
#include "vmath.h"

namespace linmix {

namespace {
constexpr int64_t kKeyBlock = 256;            // key positions per product
constexpr float kUnderflow = 8.75651e-27f;  // e^{-60}: below it, a (t, c) is recomputed exactly
}  // namespace

void aft_full_forward(float* y, const float* q, const float* k, const float* v, const float* w, int64_t Tw, int64_t B,
                      int64_t T, int64_t C, bool causal) {
  const int64_t S = kKeyBlock;
  std::vector<float> m(static_cast<size_t>(T)), ew(static_cast<size_t>(T * S)), kv(static_cast<size_t>(S * 2 * C)),
      part(static_cast<size_t>(T * 2 * C)), Mc(static_cast<size_t>(C)), num(static_cast<size_t>(T * C)),
      den(static_cast<size_t>(T * C)), mu(static_cast<size_t>(T * C));
  for (int64_t b = 0; b < B; ++b) {
    const float *kb = k + b * T * C, *vb = v + b * T * C, *qb = q + b * T * C;
    float* yb = y + b * T * C;
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < T; ++t) {  // the row max of w over the allowed s
      const int64_t end = causal ? t + 1 : T;
      float mx = w[t * Tw];
      for (int64_t s = 1; s < end; ++s) mx = vmax(mx, w[t * Tw + s]);
      m[size_t(t)] = mx;
    }
    std::fill(num.begin(), num.end(), 0.0f), std::fill(den.begin(), den.end(), 0.0f);
    std::fill(mu.begin(), mu.end(), kAftEmptyMax);
    for (int64_t s0 = 0; s0 < T; s0 += S) {
      const int64_t ns = std::min(S, T - s0), t0 = causal ? s0 : 0, nt = T - t0;  // rows that see the block
      for (int64_t c = 0; c < C; ++c) Mc[size_t(c)] = kb[s0 * C + c];
      for (int64_t s = 1; s < ns; ++s)
        for (int64_t c = 0; c < C; ++c) Mc[size_t(c)] = vmax(Mc[size_t(c)], kb[(s0 + s) * C + c]);
#pragma omp parallel for schedule(static)
      for (int64_t s = 0; s < ns; ++s) {  // [e^{k - M} | e^{k - M} v] (ns, 2C)
        const float *ks = kb + (s0 + s) * C, *vs = vb + (s0 + s) * C;
        float* row = &kv[size_t(s * 2 * C)];
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          const float e = exp_fast(ks[c] - Mc[size_t(c)]);
          row[c] = e, row[C + c] = e * vs[c];
        }
      }
#pragma omp parallel for schedule(static)
      for (int64_t i = 0; i < nt; ++i) {  // e^{w_ts - m_t}, zero where s is not allowed
        const int64_t t = t0 + i;
        const float* wt = w + t * Tw + s0;
        float* e = &ew[size_t(i * S)];
        const int64_t lim = causal ? std::min(ns, t - s0 + 1) : ns;
#pragma omp simd
        for (int64_t s = 0; s < lim; ++s) e[s] = exp_fast(wt[s] - m[size_t(t)]);
        std::fill(e + lim, e + ns, 0.0f);
      }
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(nt), int(2 * C), int(ns), 1.0f, ew.data(), int(S),
                  kv.data(), int(2 * C), 0.0f, part.data(), int(2 * C));
#pragma omp parallel for schedule(static)
      for (int64_t i = 0; i < nt; ++i) {  // combine the block into (num, den) with a running max
        const int64_t t = t0 + i;
        float *nu = &num[size_t(t * C)], *de = &den[size_t(t * C)], *mt = &mu[size_t(t * C)];
        const float* p = &part[size_t(i * 2 * C)];
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          const float mn = vmax(mt[c], Mc[size_t(c)]);
          float a, e;
          exp_pair(mt[c], Mc[size_t(c)], a, e);  // e^{mu - mn}, e^{M - mn}
          de[c] = de[c] * a + p[c] * e;
          nu[c] = nu[c] * a + p[C + c] * e;
          mt[c] = mn;
        }
      }
    }
#pragma omp parallel for schedule(dynamic, 16)
    for (int64_t t = 0; t < T; ++t) {
      const int64_t end = causal ? t + 1 : T;
      for (int64_t c = 0; c < C; ++c) {
        float n = num[size_t(t * C + c)], d = den[size_t(t * C + c)];
        if (!(d >= kUnderflow)) {  // every term underflowed against the two maxima: exactly
          float mx = kAftEmptyMax;
          for (int64_t s = 0; s < end; ++s) mx = vmax(mx, kb[s * C + c] + w[t * Tw + s]);
          n = 0.0f, d = 0.0f;
          for (int64_t s = 0; s < end; ++s) {
            const float e = exp_fast(kb[s * C + c] + w[t * Tw + s] - mx);
            n += e * vb[s * C + c], d += e;
          }
        }
        yb[t * C + c] = sigmoidf(qb[t * C + c]) * n / d;
      }
    }
  }
}

}  // namespace linmix
