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

#include "kernels/blas.h"
#include "../mixers/common.h"
#include "linmix/kernels.h"
#include "vmath.h"

namespace linmix {

namespace {
constexpr int64_t kKeyBlock = 256;  // key positions per product (tests/oracle_test.py crosses it at T = 257)
constexpr float kUnderflow = 8.75651e-27f;  // e^{-60}: below it, a (t, c) is recomputed exactly

// m_t = max of w_ts over the allowed s, t < T
void row_max(float* m, const float* w, int64_t Tw, int64_t T, bool causal) {
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < T; ++t) {
    const int64_t end = causal ? t + 1 : T;
    m[t] = max_of(w + t * Tw + 1, end - 1, w[t * Tw]);  // (a plain loop of vmax is a serial chain)
  }
}

// ew (nt rows of kKeyBlock) = e^{w_ts - m_t} for rows t0 + i and key positions s0 + s, s < ns;
// zero where s is not allowed (s > t when causal)
void bias_block(float* ew, const float* w, int64_t Tw, const float* m, int64_t t0, int64_t nt, int64_t s0, int64_t ns,
                bool causal) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < nt; ++i) {
    const int64_t t = t0 + i;
    const float* wt = w + t * Tw + s0;
    float* e = ew + i * kKeyBlock;
    const int64_t lim = causal ? std::min(ns, t - s0 + 1) : ns;
#pragma omp simd
    for (int64_t s = 0; s < lim; ++s) e[s] = exp_fast(wt[s] - m[t]);
    std::fill(e + lim, e + ns, 0.0f);
  }
}
}  // namespace

void aft_full_forward(float* y, const float* q, const float* k, const float* v, const float* w, int64_t Tw, int64_t B,
                      int64_t T, int64_t C, bool causal, float* o_out, float* lse_out) {
  const int64_t S = kKeyBlock;
  std::vector<float> m(static_cast<size_t>(T)), ew(static_cast<size_t>(T * S)), kv(static_cast<size_t>(S * 2 * C)),
      part(static_cast<size_t>(T * 2 * C)), Mc(static_cast<size_t>(C)), num(static_cast<size_t>(T * C)),
      den(static_cast<size_t>(T * C)), mu(static_cast<size_t>(T * C));
  for (int64_t b = 0; b < B; ++b) {
    const float *kb = k + b * T * C, *vb = v + b * T * C, *qb = q + b * T * C;
    float* yb = y + b * T * C;
    row_max(m.data(), w, Tw, T, causal);
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
      bias_block(ew.data(), w, Tw, m.data(), t0, nt, s0, ns, causal);
      blas::sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(nt), int(2 * C), int(ns), 1.0f, ew.data(), int(S),
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
        float scale = m[size_t(t)] + mu[size_t(t * C + c)];  // log of den's scale
        if (!(d >= kUnderflow)) {  // every term underflowed against the two maxima: exactly
          float mx = kAftEmptyMax;
          for (int64_t s = 0; s < end; ++s) mx = vmax(mx, kb[s * C + c] + w[t * Tw + s]);
          n = 0.0f, d = 0.0f;
          for (int64_t s = 0; s < end; ++s) {
            const float e = exp_fast(kb[s * C + c] + w[t * Tw + s] - mx);
            n += e * vb[s * C + c], d += e;
          }
          scale = mx;
        }
        yb[t * C + c] = sigmoidf(qb[t * C + c]) * n / d;
        if (o_out) o_out[(b * T + t) * C + c] = n / d, lse_out[(b * T + t) * C + c] = scale + std::log(d);
      }
    }
  }
}

// The backward from the forward's o and lse (log sum_s e^{k_sc + w_ts}), g = dy o sigma(q):
//   P_ts,c = e^{w_ts + k_sc - lse_tc} = e^{w_ts - m_t} e^{k_sc - M_c} F_tc,  F = e^{m_t + M_c - lse}
//   dv_s = e^{k_s - M} o (EW^T G),  dk_s = v_s o dv_s - e^{k_s - M} o (EW^T (G o o)),
//   dw_ts = e^{w_ts - m_t} (G (e^{k - M} o v)^T - (G o o) e^{k - M}^T)_ts,   G = g o F,
// as GEMMs over blocks of key positions, with M_c the column max of k over all positions. Where
// F > e^{60} (the sum of the kept terms is below e^{-60} of the largest: some dominant term
// underflowed) the (t, c) is taken out of G and its contributions added exactly, term by term.
void aft_full_backward(float* dq, float* dk, float* dv, float* dw, const float* q, const float* k, const float* v,
                       const float* w, int64_t Tw, const float* o, const float* lse, const float* dy, int64_t B,
                       int64_t T, int64_t C, bool causal) {
  const int64_t S = kKeyBlock;
  std::vector<float> m(static_cast<size_t>(T)), M(static_cast<size_t>(C)), G(static_cast<size_t>(T * 2 * C)),
      ek(static_cast<size_t>(T * 2 * C)), ew(static_cast<size_t>(T * S)), part(static_cast<size_t>(T * 2 * C)),
      dwb(static_cast<size_t>(T * S));
  std::fill(dw, dw + Tw * Tw, 0.0f);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t o0 = b * T * C;
    const float *kb = k + o0, *vb = v + o0, *qb = q + o0, *ob = o + o0, *lb = lse + o0, *gb = dy + o0;
    float *dqb = dq + o0, *dkb = dk + o0, *dvb = dv + o0;
    row_max(m.data(), w, Tw, T, causal);
    for (int64_t c = 0; c < C; ++c) M[size_t(c)] = kb[c];
    for (int64_t s = 1; s < T; ++s)
      for (int64_t c = 0; c < C; ++c) M[size_t(c)] = vmax(M[size_t(c)], kb[s * C + c]);
    std::vector<std::pair<int64_t, int64_t>> exact;  // the (t, c) taken term by term
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < T; ++t) {  // dq; [G | G o o]; [e^{k - M} o v | e^{k - M}] (row s = t)
      float *gt = &G[size_t(t * 2 * C)], *et = &ek[size_t(t * 2 * C)];
      for (int64_t c = 0; c < C; ++c) {
        const int64_t i = t * C + c;
        const float sg = sigmoidf(qb[i]), g = gb[i] * sg, lf = m[size_t(t)] + M[size_t(c)] - lb[i];
        dqb[i] = gb[i] * ob[i] * sg * (1.0f - sg);
        const bool ok = lf <= 60.0f;
        const float F = ok ? exp_fast(lf) : 0.0f;
        gt[c] = g * F, gt[C + c] = g * F * ob[i];
        const float e = exp_fast(kb[i] - M[size_t(c)]);
        et[c] = e * vb[i], et[C + c] = e;
        if (!ok) {
#pragma omp critical(aft_full_exact)
          exact.emplace_back(t, c);
        }
      }
    }
    for (int64_t s0 = 0; s0 < T; s0 += S) {
      const int64_t ns = std::min(S, T - s0), t0 = causal ? s0 : 0, nt = T - t0;  // rows that see the block
      bias_block(ew.data(), w, Tw, m.data(), t0, nt, s0, ns, causal);
      // [EW^T G | EW^T (G o o)] for the block's positions: (ns, 2C)
      blas::sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, int(ns), int(2 * C), int(nt), 1.0f, ew.data(), int(S),
                  &G[size_t(t0 * 2 * C)], int(2 * C), 0.0f, part.data(), int(2 * C));
#pragma omp parallel for schedule(static)
      for (int64_t s = 0; s < ns; ++s) {
        const int64_t r = (s0 + s) * C;
        const float *p = &part[size_t(s * 2 * C)], *e = &ek[size_t((s0 + s) * 2 * C)];
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          const float dvv = e[C + c] * p[c];
          dvb[r + c] = dvv;
          dkb[r + c] = vb[r + c] * dvv - e[C + c] * p[C + c];
        }
      }
      // dw[:, block] = EW o ([G | G o o] [e^{k-M} o v | -e^{k-M}]^T): the second half's sign in the sum
      blas::sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(nt), int(ns), int(C), 1.0f, &G[size_t(t0 * 2 * C)],
                  int(2 * C), &ek[size_t(s0 * 2 * C)], int(2 * C), 0.0f, dwb.data(), int(S));
      blas::sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(nt), int(ns), int(C), -1.0f, &G[size_t(t0 * 2 * C + C)],
                  int(2 * C), &ek[size_t(s0 * 2 * C + C)], int(2 * C), 1.0f, dwb.data(), int(S));
#pragma omp parallel for schedule(static)
      for (int64_t i = 0; i < nt; ++i) {
        const int64_t t = t0 + i;
        float* d = dw + t * Tw + s0;
        const float *e = &ew[size_t(i * S)], *p = &dwb[size_t(i * S)];
#pragma omp simd
        for (int64_t s = 0; s < ns; ++s) d[s] += e[s] * p[s];
      }
    }
    for (const auto& [t, c] : exact) {  // term by term: P = e^{k_sc + w_ts - lse_tc}
      const int64_t i = t * C + c, end = causal ? t + 1 : T;
      const float g = gb[i] * sigmoidf(qb[i]);
      for (int64_t s = 0; s < end; ++s) {
        const int64_t j = s * C + c;
        const float P = exp_fast(kb[j] + w[t * Tw + s] - lb[i]), pg = P * g;
        dvb[j] += pg, dkb[j] += pg * (vb[j] - ob[i]), dw[t * Tw + s] += pg * (vb[j] - ob[i]);
      }
    }
  }
}

}  // namespace linmix
