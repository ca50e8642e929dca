#include "decay_chunk.h"

#include <algorithm>
#include <cstring>
#include <memory>
#include <vector>

#include "kernels/linear_product.h"
#include "kernels/transpose.h"
#include "kernels/value_check.h"
#include "kernels/vmath.h"
#include "linmix/error.h"

namespace linmix {

namespace {

// The in-chunk cumulative sums of log decays are kept in double: a decay is a difference of two
// of them, and in float32 a sum of -1e4 leaves 1e-3 of absolute error in a step of -0.01.
using Cum = double;


// Per-thread scratch of the score builders.
struct ScoreWork {
  std::vector<float> ex, xf, ey, yf, t1, t2;
  std::vector<Cum> ref;
};

// A diagonal sub-block [i0, i1) may join the products when its decays stay moderate: with the
// reference c at i0 - 1 (0 before the chunk), the key-side factors e^{ref - cy_s} of its own rows
// grow to e^{span}; up to kFactorSpan both factors stay far inside float32 (e^{+-40}), so the
// block's scores are one product like the others (then masked). Beyond it (the fast-decay draw),
// pairwise in log space.
// Zeroes A (n x n) above the diagonal (and on it when strict).
void mask_upper(float* A, int64_t n, bool strict) {
  for (int64_t t = 0; t < n; ++t) std::fill(A + t * n + (strict ? t : t + 1), A + (t + 1) * n, 0.0f);
}
constexpr float kFactorSpan = 40.0f;
bool block_factorable(const Cum* ref, const Cum* cy_last, int64_t D) {
  Cum span = 0.0;
  for (int64_t d = 0; d < D; ++d) span = std::max(span, ref[d] - cy_last[d]);
  return span <= kFactorSpan;
}

// Whether every row of c (n x D) holds one value (a scalar decay per step: retention, mamba2,
// gated_deltanet): the decay then factors out of the sum over d, and the scores are
// (X Y^T) o Gamma with Gamma_ts = e^{cx_t - cy_s} evaluated once per pair (SSD's form), exact for
// any decay.
bool uniform_rows(const Cum* c, int64_t n, int64_t D) {
  for (int64_t t = 0; t < n; ++t)
    for (int64_t d = 1; d < D; ++d)
      if (c[t * D + d] != c[t * D]) return false;
  return true;
}
// Gamma (n x n) o A in place, masked (s <= t; s < t when strict).
void times_gamma(float* A, const Cum* cx, const Cum* cy, int64_t n, int64_t D, bool strict) {
  Cum ys[kDecayChunk];  // the key side's sums, contiguous: the loop over s vectorises
  for (int64_t s = 0; s < n; ++s) ys[s] = cy[s * D];
  for (int64_t t = 0; t < n; ++t) {
    const int64_t end = strict ? t : t + 1;
    const Cum xt = cx[t * D];
    float* a = A + t * n;
#pragma omp simd
    for (int64_t s = 0; s < end; ++s) a[s] *= exp_fast(float(xt - ys[s]));
    std::fill(a + end, a + n, 0.0f);
  }
}

// A (n x n, row stride n), written: A_ts = sum_d X_t[d] Y_s[d] e^{cx_t[d] - cy_s[d]} for s <= t
// (s < t when strict), zero elsewhere. cy is a cumulative sum of log decays (non-increasing in
// s); the caller guarantees cx_t <= cy at the sub-block start for every row t of the sub-block.
void scores(float* A, const float* X, const Cum* cx, const float* Y, const Cum* cy, int64_t n, int64_t D,
            bool strict, ScoreWork& w) {
  std::fill(A, A + n * n, 0.0f);
  w.xf.resize(size_t(n * D)), w.yf.resize(size_t(n * D));
  if (uniform_rows(cx, n, D) && uniform_rows(cy, n, D)) {  // a scalar decay: (X Y^T) o Gamma
    gemm_nt_acc(A, X, Y, n, n, D, D, D, n);
    times_gamma(A, cx, cy, n, D, strict);
    return;
  }
  w.ref.assign(size_t(D), 0.0);
  if (block_factorable(w.ref.data(), cy + (n - 1) * D, D)) {  // the whole chunk as one product
    for (int64_t o = 0; o < n * D; ++o) w.xf[o] = X[o] * exp_fast(float(cx[o])), w.yf[o] = Y[o] * exp_fast(float(-cy[o]));
    gemm_nt_acc(A, w.xf.data(), w.yf.data(), n, n, D, D, D, n);
    mask_upper(A, n, strict);
    return;
  }
  for (int64_t i0 = 0; i0 < n; i0 += kDecaySub) {
    const int64_t i1 = std::min(i0 + kDecaySub, n), m = i1 - i0;
    Cum* ref = w.ref.data();  // cy at i0 - 1, zeros before the chunk
    for (int64_t d = 0; d < D; ++d) ref[d] = i0 > 0 ? cy[(i0 - 1) * D + d] : 0.0;
    const bool fast = block_factorable(ref, cy + (i1 - 1) * D, D);
    const int64_t cols = fast ? i1 : i0;  // columns taken by the product
    if (cols > 0) {  // rows of sub-block i against columns [0, cols), relative to ref
      for (int64_t t = i0; t < i1; ++t)
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) w.xf[(t - i0) * D + d] = X[t * D + d] * exp_fast(float(cx[t * D + d] - ref[d]));
      for (int64_t s = 0; s < cols; ++s)
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) w.yf[s * D + d] = Y[s * D + d] * exp_fast(float(ref[d] - cy[s * D + d]));
      gemm_nt_acc(A + i0 * n, w.xf.data(), w.yf.data(), m, cols, D, D, D, n);
    }
    if (fast) {  // mask the block's upper part
      for (int64_t t = i0; t < i1; ++t) std::fill(A + t * n + (strict ? t : t + 1), A + t * n + i1, 0.0f);
      continue;
    }
    for (int64_t t = i0; t < i1; ++t)  // the diagonal sub-block, pairwise in log space
      for (int64_t s = i0; s < (strict ? t : t + 1); ++s) {
        const float *xt = X + t * D, *ys = Y + s * D;
        const Cum *ct = cx + t * D, *cs = cy + s * D;
        float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
        for (int64_t d = 0; d < D; ++d) acc += xt[d] * ys[d] * exp_fast(float(ct[d] - cs[d]));
        A[t * n + s] = acc;
      }
  }
}

// Backward of scores: given dA (n x n, masked as A), adds dX_t += sum_s dA_ts Y_s e^{cx_t - cy_s}
// and dY_s += sum_t dA_ts X_t e^{cx_t - cy_s}.
void scores_backward(float* dX, float* dY, const float* dA, const float* X, const Cum* cx, const float* Y,
                     const Cum* cy, int64_t n, int64_t D, bool strict, ScoreWork& w) {
  w.ex.resize(size_t(kDecaySub * D)), w.xf.resize(size_t(kDecaySub * D));
  w.ey.resize(size_t(n * D)), w.yf.resize(size_t(n * D));
  w.t1.resize(size_t(kDecaySub * D)), w.t2.resize(size_t(n * D));
  if (uniform_rows(cx, n, D) && uniform_rows(cy, n, D)) {  // a scalar decay: G = dA o Gamma
    w.t1.resize(size_t(n * n));
    std::copy(dA, dA + n * n, w.t1.begin());
    times_gamma(w.t1.data(), cx, cy, n, D, strict);
    gemm_nn_acc(dX, w.t1.data(), Y, n, D, n, n, D, D);  // dX += G Y
    gemm_tn_acc(dY, w.t1.data(), X, n, D, n, n, D, D);  // dY += G^T X
    return;
  }
  w.ref.assign(size_t(D), 0.0);
  if (block_factorable(w.ref.data(), cy + (n - 1) * D, D)) {  // the whole chunk as one product
    w.ex.resize(size_t(n * D)), w.xf.resize(size_t(n * D)), w.t1.resize(size_t(n * D));
    for (int64_t o = 0; o < n * D; ++o) {
      w.ex[o] = exp_fast(float(cx[o])), w.xf[o] = X[o] * w.ex[o];
      w.ey[o] = exp_fast(float(-cy[o])), w.yf[o] = Y[o] * w.ey[o];
    }
    std::fill(w.t1.begin(), w.t1.begin() + n * D, 0.0f);
    gemm_nn_acc(w.t1.data(), dA, w.yf.data(), n, D, n, n, D, D);
    for (int64_t o = 0; o < n * D; ++o) dX[o] += w.t1[o] * w.ex[o];
    std::fill(w.t2.begin(), w.t2.begin() + n * D, 0.0f);
    gemm_tn_acc(w.t2.data(), dA, w.xf.data(), n, D, n, n, D, D);
    for (int64_t o = 0; o < n * D; ++o) dY[o] += w.t2[o] * w.ey[o];
    return;
  }
  for (int64_t i0 = 0; i0 < n; i0 += kDecaySub) {
    const int64_t i1 = std::min(i0 + kDecaySub, n), m = i1 - i0;
    Cum* ref = w.ref.data();
    for (int64_t d = 0; d < D; ++d) ref[d] = i0 > 0 ? cy[(i0 - 1) * D + d] : 0.0;
    const bool fast = block_factorable(ref, cy + (i1 - 1) * D, D);
    const int64_t cols = fast ? i1 : i0;
    if (cols > 0) {  // dA is zero above the diagonal: the block's masked entries add nothing
      for (int64_t t = i0; t < i1; ++t)
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) {
          const int64_t o = (t - i0) * D + d;
          w.ex[o] = exp_fast(float(cx[t * D + d] - ref[d])), w.xf[o] = X[t * D + d] * w.ex[o];
        }
      for (int64_t s = 0; s < cols; ++s)
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) {
          const int64_t o = s * D + d;
          w.ey[o] = exp_fast(float(ref[d] - cy[o])), w.yf[o] = Y[o] * w.ey[o];
        }
      std::fill(w.t1.begin(), w.t1.begin() + m * D, 0.0f);
      gemm_nn_acc(w.t1.data(), dA + i0 * n, w.yf.data(), m, D, cols, n, D, D);  // (m,cols)(cols,D)
      for (int64_t o = 0; o < m * D; ++o) dX[i0 * D + o] += w.t1[o] * w.ex[o];
      std::fill(w.t2.begin(), w.t2.begin() + cols * D, 0.0f);
      gemm_tn_acc(w.t2.data(), dA + i0 * n, w.xf.data(), cols, D, m, n, D, D);  // (cols,m)(m,D)
      for (int64_t o = 0; o < cols * D; ++o) dY[o] += w.t2[o] * w.ey[o];
    }
    if (fast) continue;
    for (int64_t t = i0; t < i1; ++t)
      for (int64_t s = i0; s < (strict ? t : t + 1); ++s) {
        const float g = dA[t * n + s];
        if (g == 0.0f) continue;
        const float *xt = X + t * D, *ys = Y + s * D;
        const Cum *ct = cx + t * D, *cs = cy + s * D;
        float *dxt = dX + t * D, *dys = dY + s * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) {
          const float e = g * exp_fast(float(ct[d] - cs[d]));
          dxt[d] += e * ys[d], dys[d] += e * xt[d];
        }
      }
  }
}

// Cumulative sums of a chunk's log decays g (n rows of D, row stride ldg: D when contiguous, 0
// for one row repeated): c inclusive, cp exclusive (c - g).
void cumsums(Cum* c, Cum* cp, const float* g, int64_t n, int64_t D, int64_t ldg) {
  for (int64_t d = 0; d < D; ++d) cp[d] = 0.0, c[d] = g[d];
  for (int64_t t = 1; t < n; ++t)
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) cp[t * D + d] = c[(t - 1) * D + d], c[t * D + d] = cp[t * D + d] + g[t * ldg + d];
}

// How one chunk's decays are evaluated. Every form is exact in float32; they differ in cost.
//   factored: the chunk's total decay e^{cL} >= e^{-kFactorSpan} on every channel: every factor
//             e^{c}, e^{-c} stays inside float32, so X o e^{c} and Y o e^{-c} are formed once a
//             chunk and each score matrix is one GEMM of them (then masked). With one log decay
//             per step shared by the D channels (retention, mamba2, gated_deltanet) the factors
//             take one exp a row.
//   scalar:   a shared decay faster than that: the scores' decays e^{c_t - c_s} pairwise, one
//             exp a pair (scores()'s (X Y^T) o Gamma, SSD's form);
//   general:  per-channel decays faster than that (the fast-decay draw): scores() and its
//             secondary chunking.
enum class Form { scalar, factored, general };

// D ones (D <= the widths the kernels see; grown on demand, per thread).
const float* one_row(int64_t D) {
  thread_local std::vector<float> ones;
  if (int64_t(ones.size()) < D) ones.assign(size_t(D), 1.0f);
  return ones.data();
}

// The exponentials of one chunk's cumulative log decays, each computed once a chunk and shared
// by every product, their backward and the decays of the state (c inclusive, cp exclusive; cq
// the read-out's: c, or cp for RWKV's read-before-update).
struct Decays {
  Form form = Form::general;
  std::vector<float> eq;  // e^{cq} (n,D)
  std::vector<float> ea;  // e^{cp} (n,D): the delta rule's a (when asked)
  std::vector<float> en;  // e^{-c} (n,D): the factored form's key side
  std::vector<float> et;  // e^{cL - c} (n,D): a key's decay to the chunk's end
  std::vector<float> el;  // e^{cL} (D)
  void compute(const Cum* c, const Cum* cp, const Cum* cq, bool with_a, int64_t n, int64_t D) {
    const Cum* cl = c + (n - 1) * D;
    Cum span = 0.0;
    for (int64_t d = 0; d < D; ++d) span = std::max(span, -cl[d]);
    const bool uniform = uniform_rows(c, n, D), fac = span <= kFactorSpan;
    form = fac ? Form::factored : uniform ? Form::scalar : Form::general;
    eq.resize(size_t(n * D)), et.resize(size_t(n * D)), el.resize(size_t(D));
    if (with_a) ea.resize(size_t(n * D));
    if (fac) en.resize(size_t(n * D));
    for (int64_t d = 0; d < D; ++d) el[size_t(d)] = exp_fast(float(cl[d]));
    if (uniform) {  // one exp a row, broadcast
      for (int64_t t = 0; t < n; ++t) {
        const auto row = [&](std::vector<float>& f, float x) {
          std::fill(f.begin() + t * D, f.begin() + (t + 1) * D, exp_fast(x));
        };
        row(eq, float(cq[t * D])), row(et, float(cl[0] - c[t * D]));
        if (with_a) row(ea, float(cp[t * D]));
        if (fac) row(en, float(-c[t * D]));
      }
      return;
    }
    if (fac) {  // one exp an entry, E = e^{c}: e^{cq} and e^{cp} are E or the row before's, e^{-c} 1 / E
      float* ex = en.data();
#pragma omp simd
      for (int64_t o = 0; o < n * D; ++o) ex[o] = exp_fast(float(c[o]));
      const bool qs = cq != c;  // cq is cp
      for (int64_t t = 0; t < n; ++t) {
        const float* prev = t > 0 ? ex + (t - 1) * D : one_row(D);
        float *q = eq.data() + t * D, *a = with_a ? ea.data() + t * D : nullptr, *x = ex + t * D, *tt = et.data() + t * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) q[d] = qs ? prev[d] : x[d];
        if (a) std::copy(prev, prev + D, a);
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) tt[d] = el[size_t(d)] / x[d];
      }
#pragma omp simd
      for (int64_t o = 0; o < n * D; ++o) ex[o] = 1.0f / ex[o];
      return;
    }
#pragma omp simd
    for (int64_t o = 0; o < n * D; ++o) eq[size_t(o)] = exp_fast(float(cq[o]));
    if (with_a) {
#pragma omp simd
      for (int64_t o = 0; o < n * D; ++o) ea[size_t(o)] = exp_fast(float(cp[o]));
    }
    for (int64_t t = 0; t < n; ++t)
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) et[size_t(t * D + d)] = exp_fast(float(cl[d] - c[t * D + d]));
  }
};

// out (n,D) = X o F
void times(float* out, const float* X, const std::vector<float>& F, int64_t n, int64_t D) {
  const float* f = F.data();
#pragma omp simd
  for (int64_t o = 0; o < n * D; ++o) out[o] = X[o] * f[o];
}

// A (n x n) = Xf Yf^T masked (s <= t; s < t when strict): the factored form's scores, Xf = X o
// e^{cx} and Yf = Y o e^{-cy} formed by the caller.
void factored_scores(float* A, const float* Xf, const float* Yf, int64_t n, int64_t D, bool strict) {
  std::fill(A, A + n * n, 0.0f);
  gemm_nt_acc(A, Xf, Yf, n, n, D, D, D, n);
  mask_upper(A, n, strict);
}
// Its backward: dX += (dA Yf) o ex, dY += (dA^T Xf) o ey (t1, t2: n D floats of scratch).
void factored_scores_backward(float* dX, float* dY, const float* dA, const float* Xf, const float* ex,
                              const float* Yf, const float* ey, int64_t n, int64_t D, float* t1, float* t2) {
  std::fill(t1, t1 + n * D, 0.0f), std::fill(t2, t2 + n * D, 0.0f);
  gemm_nn_acc(t1, dA, Yf, n, D, n, n, D, D);
  gemm_tn_acc(t2, dA, Xf, n, D, n, n, D, D);
#pragma omp simd
  for (int64_t o = 0; o < n * D; ++o) dX[o] += t1[o] * ex[o], dY[o] += t2[o] * ey[o];
}

// S (D,E) rows scaled by f (D).
void scale_rows(float* S, const float* f, int64_t D, int64_t E) {
  for (int64_t d = 0; d < D; ++d) {
#pragma omp simd
    for (int64_t e = 0; e < E; ++e) S[d * E + e] *= f[d];
  }
}
// dg of a chunk from the gradients of its cumulative sums: dg_tau = sum_{t >= tau} dc_t
// + sum_{t > tau} dcp_t + dcL (dc, dcp: (n,D); dcL: (D)).
void decay_grad(float* dg, const float* dc, const float* dcp, const float* dcL, int64_t n, int64_t D) {
  std::vector<float> run(dcL, dcL + D);  // small (D); once per chunk
  for (int64_t t = n - 1; t >= 0; --t)
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) {
      run[size_t(d)] += dc[t * D + d];
      dg[t * D + d] = run[size_t(d)];
      run[size_t(d)] += dcp[t * D + d];
    }
}

// GatedRows' save_*: the chunk's starting state S and its scores A (n x n) times scale (to hold
// yscale where A does not).
void save_chunk(const GatedRows& ld, const float* S, const float* A, int64_t t0, int64_t n, int64_t D, int64_t E,
                float scale = 1.0f) {
  const int64_t j = t0 / kDecayChunk;
  if (ld.save_states) std::copy(S, S + D * E, ld.save_states + j * D * E);
  if (!ld.save_scores) return;
  float* out = ld.save_scores + j * kDecayChunk * kDecayChunk;
#pragma omp simd
  for (int64_t o = 0; o < n * n; ++o) out[o] = A[o] * scale;
}

// RWKV-5/6's bonus on the (strict) scores' diagonal: A_tt = scale f_t (q_t . (u o k_t)), rows of q
// and k at strides ldq, ldk, f_t = kscale[t] when given (else 1).
void bonus_diagonal(float* A, const float* q, int64_t ldq, const float* k, int64_t ldk, const float* u,
                    const float* kscale, float scale, int64_t n, int64_t D) {
  for (int64_t t = 0; t < n; ++t) {
    const float *qt = q + t * ldq, *kt = k + t * ldk;
    float b = 0.0f;
#pragma omp simd reduction(+ : b)
    for (int64_t d = 0; d < D; ++d) b += qt[d] * u[d] * kt[d];
    A[t * n + t] = scale * b * (kscale ? kscale[t] : 1.0f);
  }
}

// A head's log decays constant in time (ld.g = 0: RWKV-5's w): every full chunk has the same
// factors, made once a call: eq = yscale e^{cq_t}, en = e^{-c_t} (t < kDecayChunk, c_t = (t + 1) g;
// inf on a fast channel, whose factors are not used), el = e^{cL}, and the fast channels.
struct FixedDecays {
  std::vector<float> eq, en, el;
  std::vector<int64_t> fast;
  void make(const float* g, int64_t D, bool shift, float yscale) {
    const int64_t L = kDecayChunk;
    eq.resize(size_t(L * D)), en.resize(size_t(L * D)), el.resize(size_t(D)), fast.clear();
    for (int64_t d = 0; d < D; ++d) {
      for (int64_t t = 0; t < L; ++t) {
        const Cum c = Cum(t + 1) * Cum(g[d]), cq = shift ? Cum(t) * Cum(g[d]) : c;
        eq[size_t(t * D + d)] = yscale * exp_fast(float(cq)), en[size_t(t * D + d)] = exp_fast(float(-c));
      }
      el[size_t(d)] = exp_fast(float(Cum(L) * Cum(g[d])));
      if (-Cum(L) * Cum(g[d]) > kFactorSpan) fast.push_back(d);
    }
  }
};

// Scratch of factored_chunk, sized once per call of gated_forward_heads.
struct FactoredWork {
  std::vector<float> qd, kfT, ek, A, el, kfast, diff, kb;
  std::vector<Cum> run, cf;
  std::vector<int64_t> fast;
  FactoredWork(int64_t D)
      : qd(kDecayChunk * D), kfT(D * kDecayChunk), ek(kDecayChunk * D), A(kDecayChunk * kDecayChunk), el(D),
        kfast(kDecayChunk * D), diff(kDecayChunk), kb(kDecayChunk), run(D), cf(2 * kDecayChunk), fast(D) {}
};

// A chunk whose total decay is below e^{-kFactorSpan} on a few channels only (RWKV-5's fastest
// channels in a head of slow ones: the whole chunk had gone to the general form, pairwise in log
// space on every channel) keeps the factored form for the rest; each fast channel d is taken
// apart, exactly, with exponents <= 0 only: its scores A_ts += yscale q_td k_sd f_s e^{cq_td - c_sd}
// (s <= t; s < t with shift; f = kscale) pair by pair from double sums, and its row of the state
// update from k_td f_t e^{cL_d - c_td}, kept in kfast row i (the caller's).
inline int64_t max_fast_channels(int64_t D) { return D / 8; }
void fast_channel(FactoredWork& f, float* A, const float* qc, const float* kc, const float* gc, int64_t t0, int64_t n,
                  int64_t d, int64_t i, bool shift, const GatedRows& ld) {
  Cum *c = f.cf.data(), *cq = c + kDecayChunk;
  float *diff = f.diff.data(), *kb = f.kb.data(), *kl = f.kfast.data() + i * n;
  Cum run = 0.0;
  for (int64_t t = 0; t < n; ++t) {
    const Cum before = run;
    run += gc[t * ld.g + d];
    c[t] = run, cq[t] = shift ? before : run;
    kb[t] = kc[t * ld.k + d] * (ld.kscale ? ld.kscale[t0 + t] : 1.0f);
  }
  for (int64_t t = 0; t < n; ++t) kl[t] = kb[t] * exp_fast(float(run - c[t]));
  for (int64_t t = 0; t < n; ++t) {
    const int64_t end = shift ? t : t + 1;
    const Cum x = cq[t];
#pragma omp simd
    for (int64_t s = 0; s < end; ++s) diff[s] = float(x - c[s]);  // <= 0
    const float a = ld.yscale * qc[t * ld.q + d];
    float* row = A + t * n;
#pragma omp simd
    for (int64_t s = 0; s < end; ++s) row[s] += a * kb[s] * exp_fast(diff[s]);
  }
}

// One chunk of gated_forward_heads in the factored form, when it applies: every channel's total log
// decay over the chunk is >= -kFactorSpan. qc, kc, vc, gc, yc point at the chunk's first row (row
// t0 of the sequence; strides of ld, v contiguous). The decays fold into the operands as they are
// read (qd = yscale q o e^{cq}, kfT = (k o e^{-c})^T, D x n), so the chunk is four GEMMs on them
// and V:
//   A = qd kfT (masked, the bonus on its diagonal), y = qd S + A V, S = diag(e^{cL}) (S + kfT V).
// With one log decay a step (ld.g_row) the factors are one exp a row and e^{cL} folds into the
// last GEMM's alpha and beta. Returns false, having written nothing, when the chunk decays faster.
bool factored_chunk(FactoredWork& f, float* yc, float* S, const float* qc, const float* kc, const float* vc,
                    const float* gc, int64_t t0, int64_t n, int64_t D, int64_t E, bool shift, const GatedRows& ld,
                    const FixedDecays* fixed) {
  const float ys = ld.yscale;
  float *qd = f.qd.data(), *kfT = f.kfT.data(), *ek = f.ek.data(), *el = f.el.data(), *A = f.A.data();
  Cum* run = f.run.data();
  float el0 = 1.0f;  // e^{cL} of a scalar decay
  int64_t* fast = f.fast.data();  // channels too fast for the factors, taken apart (fast_channel)
  int64_t nf = 0;
  if (ld.g_row) {
    Cum r = 0.0;
    float eqs[kDecayChunk], ens[kDecayChunk];
    for (int64_t t = 0; t < n; ++t) {
      const Cum before = r;
      r += gc[t * ld.g];
      eqs[t] = float(shift ? before : r), ens[t] = float(-r);
    }
    if (-r > kFactorSpan) return false;
#pragma omp simd
    for (int64_t t = 0; t < n; ++t) eqs[t] = ys * exp_fast(eqs[t]), ens[t] = exp_fast(ens[t]);
    if (ld.kscale)
      for (int64_t t = 0; t < n; ++t) ens[t] *= ld.kscale[t0 + t];
    el0 = exp_fast(float(r));
    for (int64_t t = 0; t < n; ++t) {
      const float *qt = qc + t * ld.q, *kt = kc + t * ld.k, a = eqs[t], b = ens[t];
      float *qo = qd + t * D, *ko = ek + t * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) qo[d] = qt[d] * a, ko[d] = kt[d] * b;
    }
    transpose(kfT, n, ek, D, n, D);
  } else if (fixed && n == kDecayChunk) {  // a decay constant in time: the head's factors, made once
    if (int64_t(fixed->fast.size()) > max_fast_channels(D)) return false;
    nf = int64_t(fixed->fast.size());
    std::copy(fixed->fast.begin(), fixed->fast.end(), fast);
    for (int64_t t = 0; t < n; ++t) {
      const float *qt = qc + t * ld.q, *kt = kc + t * ld.k, *eq = fixed->eq.data() + t * D,
                  *en = fixed->en.data() + t * D, b = ld.kscale ? ld.kscale[t0 + t] : 1.0f;
      float *qo = qd + t * D, *ko = ek + t * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) qo[d] = qt[d] * eq[d], ko[d] = kt[d] * en[d] * b;
    }
    transpose(kfT, n, ek, D, n, D);
    std::copy(fixed->el.begin(), fixed->el.end(), el);
    for (int64_t i = 0; i < nf; ++i) std::fill(kfT + fast[i] * n, kfT + (fast[i] + 1) * n, 0.0f);  // (inf there)
  } else {
    std::fill(run, run + D, 0.0);
    if (ld.g == 0) {  // one row of log decays for every step: the totals first, then the sums
      int64_t nfast = 0;
      for (int64_t d = 0; d < D; ++d) nfast += -Cum(n) * Cum(gc[d]) > kFactorSpan;
      if (nfast > max_fast_channels(D)) return false;
    }
    for (int64_t t = 0; t < n; ++t) {  // c into ek (then the exps in a loop of their own: one
      const float* gt = gc + t * ld.g;   // mixing double and exp_fast stays scalar)
      float* et = ek + t * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) {
        const Cum after = run[d] + Cum(gt[d]);
        run[d] = after, et[d] = float(after);
      }
    }
    nf = 0;
    for (int64_t d = 0; d < D; ++d)
      if (-run[d] > kFactorSpan) {
        if (nf == max_fast_channels(D)) return false;
        fast[nf++] = d;
      }
    // one exp an entry: e^{c_t}; the read-out's e^{cq_t} is it (or the row before's, with shift)
    // and the key's e^{-c_t} its reciprocal; el ends as e^{cL}
    std::fill(el, el + D, 1.0f);
    for (int64_t t = 0; t < n; ++t) {
      const float *qt = qc + t * ld.q, *kt = kc + t * ld.k, b = ld.kscale ? ld.kscale[t0 + t] : 1.0f;
      float *qo = qd + t * D, *et = ek + t * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) et[d] = exp_fast(et[d]);
      if (shift) {
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) qo[d] = ys * qt[d] * el[d], el[d] = et[d], et[d] = kt[d] * b / et[d];
      } else {
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) qo[d] = ys * qt[d] * et[d], el[d] = et[d], et[d] = kt[d] * b / et[d];
      }
    }
    transpose(kfT, n, ek, D, n, D);
    for (int64_t i = 0; i < nf; ++i) std::fill(kfT + fast[i] * n, kfT + (fast[i] + 1) * n, 0.0f);  // (inf there)
  }
  gemm_nn(A, qd, kfT, n, n, D, D, n, n, 1.0f, 0.0f);
  mask_upper(A, n, shift);
  for (int64_t i = 0; i < nf; ++i) fast_channel(f, A, qc, kc, gc, t0, n, fast[i], i, shift, ld);
  save_chunk(ld, S, A, t0, n, D, E);
  if (ld.u) bonus_diagonal(A, qc, ld.q, kc, ld.k, ld.u, ld.kscale ? ld.kscale + t0 : nullptr, ys, n, D);
  gemm_nn(yc, qd, S, n, E, D, D, E, ld.y, 1.0f, 0.0f);  // (q o e^{cq}) S0
  gemm_nn(yc, A, vc, n, E, n, n, E, ld.y, 1.0f, 1.0f);  // + A V
  if (ld.g_row) {
    gemm_nn(S, kfT, vc, D, E, n, n, E, E, el0, el0);
  } else {
    gemm_nn(S, kfT, vc, D, E, n, n, E, E, 1.0f, 1.0f);
    scale_rows(S, el, D, E);
    for (int64_t i = 0; i < nf; ++i)  // a fast channel's row: + sum_t k_t e^{cL - c_t} v_t
      gemm_nn(S + fast[i] * E, f.kfast.data() + i * n, vc, 1, E, n, n, E, E, 1.0f, 1.0f);
  }
  return true;
}

// Scratch of general_chunk.
struct GeneralWork {
  std::vector<Cum> c, cp;
  std::vector<float> qd, kt, A, krows, kT;
  Decays x;
  ScoreWork w;
  GeneralWork(int64_t D)
      : c(kDecayChunk * D), cp(kDecayChunk * D), qd(kDecayChunk * D), kt(kDecayChunk * D), A(kDecayChunk * kDecayChunk),
        krows(kDecayChunk * D), kT(D * kDecayChunk) {}
};

// general_chunk with one log decay a step (ld.g_row, no bonus; k already scaled): the decays
// are scalars per row and pair, so the scores are (q k^T) o Gamma with Gamma_ts = e^{cq_t - c_s}
// from the double sums (exact for any decay: exponents <= 0 only), q's read-out factors e^{cq_t}
// and k's e^{cL - c_s} one per row.
void scalar_chunk(GeneralWork& z, float* yc, float* S, const float* qc, const float* kc, const float* vc,
                  const float* gc, int64_t t0, int64_t n, int64_t D, int64_t E, bool shift, const GatedRows& ld) {
  Cum c[kDecayChunk], cq[kDecayChunk];
  Cum run = 0.0;
  for (int64_t t = 0; t < n; ++t) {
    const Cum before = run;
    run += gc[t * ld.g];
    c[t] = run, cq[t] = shift ? before : run;
  }
  // kT = k^T and ktT = (k o e^{cL - c})^T (D x n): every product A B (the small-matrix kernel;
  // A^T B runs at about half its rate)
  float *A = z.A.data(), *qd = z.qd.data(), *ktT = z.kt.data(), *kT = z.kT.data();
  float fk[kDecayChunk];
  for (int64_t t = 0; t < n; ++t) {
    const float fq = ld.yscale * exp_fast(float(cq[t]));
    fk[t] = exp_fast(float(run - c[t]));
    const float* qt = qc + t * D;
    float* qo = qd + t * D;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) qo[d] = qt[d] * fq;
  }
  transpose(kT, n, kc, D, n, D);
  for (int64_t d = 0; d < D; ++d)
#pragma omp simd
    for (int64_t t = 0; t < n; ++t) ktT[d * n + t] = kT[d * n + t] * fk[t];
  gemm_nn(A, qc, kT, n, n, D, D, n, n, 1.0f, 0.0f);  // q k^T, then o Gamma (masked)
  times_gamma(A, cq, c, n, 1, shift);                 // (one sum a row: D = 1)
  save_chunk(ld, S, A, t0, n, D, E, ld.yscale);
  gemm_nn(yc, qd, S, n, E, D, D, E, ld.y, 1.0f, 0.0f);    // (yscale q o e^{cq}) S0
  gemm_nn(yc, A, vc, n, E, n, n, E, ld.y, ld.yscale, 1.0f);  // + yscale A V
  const float el = exp_fast(float(run));  // S = e^{cL} S0 + (k o e^{cL - c})^T V
  gemm_nn(S, ktT, vc, D, E, n, n, E, E, 1.0f, el);
}

// One chunk of gated_forward_heads that decays faster than the factored form allows (the fast-decay
// draw), on contiguous q, k, v rows (g, y as ld): scores() with its secondary chunking, the
// decays from double cumulative sums.
void general_chunk(GeneralWork& z, float* yc, float* S, const float* qc, const float* kc, const float* vc,
                   const float* gc, int64_t t0, int64_t n, int64_t D, int64_t E, bool shift, const GatedRows& ld) {
  float* A = z.A.data();
  if (ld.kscale) {  // k's rows scaled
    for (int64_t t = 0; t < n; ++t) {
      const float f = ld.kscale[t0 + t], *src = kc + t * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) z.krows[size_t(t * D + d)] = f * src[d];
    }
    kc = z.krows.data();
  }
  if (ld.g_row && !ld.u) {  // one log decay a step (Mamba-2's fast heads): SSD's (q k^T) o Gamma
    scalar_chunk(z, yc, S, qc, kc, vc, gc, t0, n, D, E, shift, ld);
    return;
  }
  Cum *c = z.c.data(), *cp = z.cp.data();
  if (ld.g_row) {  // one log decay a step, broadcast over the channels
    Cum run = 0.0;
    for (int64_t t = 0; t < n; ++t) {
      std::fill(cp + t * D, cp + (t + 1) * D, run);
      run += gc[t * ld.g];
      std::fill(c + t * D, c + (t + 1) * D, run);
    }
  } else {
    cumsums(c, cp, gc, n, D, ld.g);
  }
  const Cum* cq = shift ? cp : c;
  z.x.compute(c, cp, cq, false, n, D);
  times(z.qd.data(), qc, z.x.eq, n, D);  // q o e^{cq}
  times(z.kt.data(), kc, z.x.et, n, D);  // k o e^{cL - c}
  scores(A, qc, cq, kc, c, n, D, shift, z.w);
  save_chunk(ld, S, A, t0, n, D, E, ld.yscale);
  if (ld.u) bonus_diagonal(A, qc, D, kc, D, ld.u, nullptr, 1.0f, n, D);  // (k already scaled)
  gemm_nn(yc, z.qd.data(), S, n, E, D, D, E, ld.y, ld.yscale, 0.0f);  // (q o e^{cq}) S0
  gemm_nn(yc, A, vc, n, E, n, n, E, ld.y, ld.yscale, 1.0f);          // + A V
  scale_rows(S, z.x.el.data(), D, E);  // S = e^{cL} S0 + (k o e^{cL - c})^T V
  gemm_tn_acc(S, z.kt.data(), vc, D, E, n, D, E, E);
}

struct Chunk {
  int64_t t0, n;
};
std::vector<Chunk> chunks_of(int64_t T) {
  std::vector<Chunk> out;
  for (int64_t t0 = 0; t0 < T; t0 += kDecayChunk) out.push_back({t0, std::min(kDecayChunk, T - t0)});
  return out;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// gated

// Every head's chunk rows of q, k, v (and g when it has rows), gathered before the chunk runs: a
// head's rows lie H D floats apart in a (B,T,H,D) tensor, and read in place by the chunk's
// compute loops they stall on memory (gla, T = 4096, 1 thread: 24.1 ms; gathered first as one
// head's rows: 20.2 ms); gathered row by row across the heads, adjacent heads make one run of
// memory a row.
void gated_forward_heads(const GatedHeadRows* heads, int64_t nh, int64_t T, int64_t D, int64_t E, bool shift) {
  if (nh <= 0) return;
  const FlushDenormals ftz;
  FactoredWork fw(D);
  std::unique_ptr<GeneralWork> gw;  // made when a chunk first needs it
  const int64_t L = kDecayChunk, per = L * (3 * D + E);  // a head's gathered q, k, g, v
  std::vector<float> buf(size_t(nh * per));
  std::vector<float> ybuf(size_t(L * E));
  std::vector<FixedDecays> fixed;  // heads whose log decays are one row for every step
  if (!heads[0].ld.g_row && heads[0].ld.g == 0) {
    fixed.resize(size_t(nh));
    for (int64_t i = 0; i < nh; ++i) fixed[size_t(i)].make(heads[i].g, D, shift, heads[i].ld.yscale);
  }
  std::vector<GatedRows> lds(static_cast<size_t>(nh));  // the strides of what is read: gathered rows contiguous
  for (int64_t i = 0; i < nh; ++i) {
    const GatedRows& ld = heads[i].ld;
    lds[size_t(i)] = ld;
    lds[size_t(i)].q = D, lds[size_t(i)].k = D, lds[size_t(i)].v = E, lds[size_t(i)].y = E;
    if (!ld.g_row && ld.g != 0) lds[size_t(i)].g = D;
  }
  const bool phi = heads[0].ld.phi;
  // the value checks of the operands that are a call's unchecked rows (GatedRows::check), a head's
  // across all its chunks, in the gather's own pass (a pass of their own after the chunk cost
  // gla's forward through linmix.ops ~7%)
  std::vector<RowCheck<false>> chk(static_cast<size_t>(nh));
  std::vector<RowCheck<true>> chk_log(static_cast<size_t>(nh));
  uint32_t any_check = 0;
  for (int64_t i = 0; i < nh; ++i) any_check |= heads[i].ld.bad ? heads[i].ld.check : 0u;
  const auto gather = [&](int64_t t0, int64_t n, int64_t off, int64_t W, auto src, auto stride, uint32_t bit,
                          bool map = false) {
    // contiguous rows (one head's own buffers, or H = 1) are read in place: only checked here
    const bool in_place = stride(heads[0]) == W && !map;
    if (in_place && !(any_check & bit)) return;
    for (int64_t t = 0; t < n; ++t)
      for (int64_t i = 0; i < nh; ++i) {
        const GatedRows& ld = heads[i].ld;
        const bool check = ld.bad && (ld.check & bit), log = bit == kCheckG && (ld.check & kCheckGLog);
        float* __restrict d = buf.data() + i * per + off + t * W;
        const float* __restrict r = src(heads[i]) + (t0 + t) * stride(heads[i]);
        if (in_place || map) {
          if (check) log ? chk_log[size_t(i)].add(r, W) : chk[size_t(i)].add(r, W);
          if (in_place) continue;
#pragma omp simd
          for (int64_t j = 0; j < W; ++j) d[j] = phi_elu(r[j]);
        } else if (check) {
          log ? chk_log[size_t(i)].copy(d, r, W) : chk[size_t(i)].copy(d, r, W);
        } else {
          std::memcpy(d, r, size_t(W) * 4);
        }
      }
  };
  for (const Chunk& ch : chunks_of(T)) {
    const int64_t t0 = ch.t0, n = ch.n;
    gather(t0, n, 0, D, [](const GatedHeadRows& h) { return h.q; }, [](const GatedHeadRows& h) { return h.ld.q; },
           kCheckQ, phi);
    gather(t0, n, L * D, D, [](const GatedHeadRows& h) { return h.k; }, [](const GatedHeadRows& h) { return h.ld.k; },
           kCheckK, phi);
    gather(t0, n, 3 * L * D, E, [](const GatedHeadRows& h) { return h.v; }, [](const GatedHeadRows& h) { return h.ld.v; },
           kCheckV);
    const bool g_rows = !heads[0].ld.g_row && heads[0].ld.g != 0;
    if (g_rows)
      gather(t0, n, 2 * L * D, D, [](const GatedHeadRows& h) { return h.g; }, [](const GatedHeadRows& h) { return h.ld.g; },
             kCheckG);
    for (int64_t i = 0; i < nh; ++i) {
      const GatedHeadRows& h = heads[i];
      const float* b = buf.data() + i * per;
      const auto at = [&](const float* x, int64_t ld, int64_t W, int64_t off, bool map = false) {  // gathered or in place
        return ld == W && !map ? x + t0 * W : b + off;
      };
      const float *qc = at(h.q, h.ld.q, D, 0, phi), *kc = at(h.k, h.ld.k, D, L * D, phi),
                  *vc = at(h.v, h.ld.v, E, 3 * L * D);
      const float* gc = g_rows ? at(h.g, h.ld.g, D, 2 * L * D) : h.g + t0 * h.ld.g;
      // y into a contiguous chunk of rows, then out: the small-matrix kernel writing strided rows
      // that are not in cache stalled on them (Mamba-2's forward: its y products 35% of the time)
      const bool direct = h.ld.y == E;
      float* yc = direct ? h.y + t0 * E : ybuf.data();
      if (!factored_chunk(fw, yc, h.S, qc, kc, vc, gc, t0, n, D, E, shift, lds[size_t(i)],
                          fixed.empty() ? nullptr : &fixed[size_t(i)])) {
        if (!gw) gw = std::make_unique<GeneralWork>(D);
        general_chunk(*gw, yc, h.S, qc, kc, vc, gc, t0, n, D, E, shift, lds[size_t(i)]);
      }
      if (!direct)
        for (int64_t t = 0; t < n; ++t) std::memcpy(h.y + (t0 + t) * h.ld.y, yc + t * E, size_t(E) * 4);
      if (h.ld.epilogue) (*h.ld.epilogue)(t0, n, qc, kc);
    }
  }
  for (int64_t i = 0; i < nh; ++i)
    if (heads[i].ld.bad && heads[i].ld.check) *heads[i].ld.bad |= chk[size_t(i)].bad() | chk_log[size_t(i)].bad();
}

namespace {

// One chunk of gated_backward_heads in the factored form with per-channel decays (eq = e^{cq},
// en = e^{-c}, el = e^{cL}; q with yscale): the eight products of the chunk's gradients as five,
// three of them over stacked operands (inner dimension n + E or n + D), every one A B:
//   dA = dy V^T (masked)                 dq = ([dy | dA] [S0^T; kf]) o eq
//   dk = ([dA^T | V] [qd; dSe^T]) o en   dv = [A^T | kf] [dy; dSe]      dSe = diag(e^{cL}) dS
//   dS <- dSe + qd^T dy
// and the total decay's gradient dcL_d = <dS_d, S1_d> with S1 the state after the chunk (the
// chunk's own update kt^T V = S1 - diag(e^{cL}) S0 folded in). dbonus: dA's diagonal before the
// mask, when bonus.
struct FactoredGrad {
  std::vector<float> XQ, BQ, XK, BK, XV, BV, VT, qdT;
  FactoredGrad(int64_t D, int64_t E)
      : XQ(kDecayChunk * (E + kDecayChunk)), BQ((E + kDecayChunk) * D), XK(kDecayChunk * (kDecayChunk + E)),
        BK((kDecayChunk + E) * D), XV(kDecayChunk * (kDecayChunk + D)), BV((kDecayChunk + D) * E), VT(E * kDecayChunk),
        qdT(D * kDecayChunk) {}
};
void factored_backward(FactoredGrad& w, float* dq, float* dk, float* dv, float* dcL, float* dbonus, float* dS,
                       const float* q, const float* k, const float* v, const float* dy, const float* S0, const float* S1,
                       const float* A, const float* eq, const float* en, const float* el, int64_t n, int64_t D,
                       int64_t E, bool shift, bool bonus) {
  const int64_t lq = E + n, lk = n + E, lv = n + D;
  float *XQ = w.XQ.data(), *BQ = w.BQ.data(), *XK = w.XK.data(), *BK = w.BK.data(), *XV = w.XV.data(),
        *BV = w.BV.data();
  for (int64_t d = 0; d < D; ++d) {  // dcL, then dS scaled by e^{cL} (dSe), also BV's lower rows
    float* r = dS + d * E;
    const float* s1 = S1 + d * E;
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t e = 0; e < E; ++e) sum += r[e] * s1[e];
    dcL[d] = sum;
    const float f = el[d];
    float* o = BV + (n + d) * E;
#pragma omp simd
    for (int64_t e = 0; e < E; ++e) r[e] *= f, o[e] = r[e];
  }
  for (int64_t t = 0; t < n; ++t) {  // the stacked operands' rows
    const float *qt = q + t * D, *kt = k + t * D, *et = eq + t * D, *nt = en + t * D, *yt = dy + t * E, *vt = v + t * E;
    float *qo = BK + t * D, *ko = BQ + (E + t) * D, *kv = XV + t * lv + n, *yq = XQ + t * lq, *yv = BV + t * E,
          *vk = XK + t * lk + n;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) qo[d] = qt[d] * et[d], ko[d] = kt[d] * nt[d], kv[d] = ko[d];
#pragma omp simd
    for (int64_t e = 0; e < E; ++e) yq[e] = yt[e], yv[e] = yt[e], vk[e] = vt[e];
  }
  transpose(BQ, D, S0, E, D, E);          // S0^T
  transpose(w.VT.data(), n, v, E, n, E);  // V^T
  transpose(BK + n * D, D, dS, E, D, E);  // dSe^T
  transpose(XV, lv, A, n, n, n);          // A^T
  gemm_nn(XQ + E, dy, w.VT.data(), n, n, E, E, n, lq, 1.0f, 0.0f);  // dA = dy V^T
  for (int64_t t = 0; t < n; ++t) {
    float* r = XQ + t * lq + E;
    if (bonus) dbonus[t] = r[t];
    std::fill(r + (shift ? t : t + 1), r + n, 0.0f);
  }
  transpose(XK, lk, XQ + E, lq, n, n);  // dA^T
  gemm_nn(dq, XQ, BQ, n, D, E + n, lq, D, D, 1.0f, 0.0f);
  gemm_nn(dk, XK, BK, n, D, n + E, lk, D, D, 1.0f, 0.0f);
  gemm_nn(dv, XV, BV, n, E, n + D, lv, E, E, 1.0f, 0.0f);
#pragma omp simd
  for (int64_t o = 0; o < n * D; ++o) dq[o] *= eq[o], dk[o] *= en[o];
  transpose(w.qdT.data(), n, BK, D, n, D);  // qd^T
  gemm_nn(dS, w.qdT.data(), dy, D, E, n, n, E, E, 1.0f, 1.0f);
}

// The chunk buffers of gated_backward_heads that row_decay_backward reads (q with yscale, k, v, dy)
// and writes (dq, dk, dv, dA: the gradients with respect to them and the masked scores), and its
// own scratch.
struct RowWork {
  const float *q, *k, *v, *dy;
  float *dq, *dk, *dv, *dA;
  std::vector<float> qd, kt, kf, t1, t2, G, dg;
  explicit RowWork(int64_t D)
      : qd(kDecayChunk * D), kt(kDecayChunk * D), kf(kDecayChunk * D), t1(kDecayChunk * D), t2(kDecayChunk * D),
        G(kDecayChunk * kDecayChunk), dg(kDecayChunk) {}
};

// X (n,W) rows scaled into out: out_t = X_t f_t (in place: scale_rows)
void row_scaled(float* out, const float* X, const float* f, int64_t n, int64_t W) {
  for (int64_t t = 0; t < n; ++t) {
    const float a = f[t];
#pragma omp simd
    for (int64_t j = 0; j < W; ++j) out[t * W + j] = X[t * W + j] * a;
  }
}
// sum_j X_tj Y_tj for each row t
void row_dots(float* out, const float* X, const float* Y, int64_t n, int64_t W) {
  for (int64_t t = 0; t < n; ++t) {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t j = 0; j < W; ++j) s += X[t * W + j] * Y[t * W + j];
    out[t] = s;
  }
}

// One chunk of gated_backward_heads with one log decay a step (ld.g_row: retention, Mamba-2):
// every decay is a scalar of a row (e^{cq_t}, e^{-c_t}, e^{cL - c_t}) or of a pair (the scores'
// Gamma), so no (n,D) arrays of sums or exponentials. dq, dk, dv, dS as the per-channel body; dg:
// one a step into z.dg (the sum over the channels of the per-channel rule).
void row_decay_backward(RowWork& z, const GatedGradHead& h, float* dS, const float* Sc, const float* Ac, int64_t t0,
                        int64_t n, int64_t D, int64_t E, bool shift, float* dbonus) {
  Cum c[kDecayChunk], cq[kDecayChunk];
  Cum run = 0.0;
  for (int64_t t = 0; t < n; ++t) {
    const Cum before = run;
    run += h.g[(t0 + t) * h.ld.g];
    c[t] = run, cq[t] = shift ? before : run;
  }
  const Cum cL = run;
  const bool fac = -cL <= kFactorSpan;
  float eq[kDecayChunk], et[kDecayChunk], en[kDecayChunk], dc[kDecayChunk], dcq[kDecayChunk];
  for (int64_t t = 0; t < n; ++t) {
    eq[t] = exp_fast(float(cq[t])), et[t] = exp_fast(float(cL - c[t]));
    en[t] = fac ? exp_fast(float(-c[t])) : 0.0f;
  }
  const float el = exp_fast(float(cL));
  const float *q = z.q, *k = z.k, *v = z.v, *dy = z.dy;
  float *dq = z.dq, *dk = z.dk, *dv = z.dv, *dA = z.dA, *qd = z.qd.data(), *kt = z.kt.data(), *kf = z.kf.data();
  row_scaled(qd, q, eq, n, D), row_scaled(kt, k, et, n, D);
  if (fac) row_scaled(kf, k, en, n, D);
  // dq = (dy S0^T) e^{cq}  (+ the intra part below)
  std::fill(dq, dq + n * D, 0.0f), std::fill(dk, dk + n * D, 0.0f);
  gemm_nt_acc(dq, dy, Sc, n, D, E, E, E, D);
  scale_rows(dq, eq, n, D);
  // dA = dy V^T (masked); dv = A^T dy + kt dS
  std::fill(dA, dA + n * n, 0.0f);
  gemm_nt_acc(dA, dy, v, n, n, E, E, E, n);
  if (h.ld.u)
    for (int64_t t = 0; t < n; ++t) dbonus[t] = dA[t * n + t];
  mask_upper(dA, n, shift);
  std::fill(dv, dv + n * E, 0.0f);
  gemm_tn_acc(dv, Ac, dy, n, E, n, n, E, E);
  gemm_nn_acc(dv, kt, dS, n, E, D, D, E, E);
  float *t1 = z.t1.data(), *t2 = z.t2.data();
  if (fac) {  // A = (q e^{cq}) (k e^{-c})^T: dq += (dA kf) e^{cq}, dk += (dA^T qd) e^{-c}
    gemm_nn(t1, dA, kf, n, D, n, n, D, D, 1.0f, 0.0f);
    gemm_tn_acc(t2, dA, qd, n, D, n, n, D, D);
    for (int64_t t = 0; t < n; ++t) {
      const float a = eq[t], b = en[t];
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) dq[t * D + d] += t1[t * D + d] * a, dk[t * D + d] += t2[t * D + d] * b;
    }
    std::fill(t2, t2 + n * D, 0.0f);
  } else {  // A = (q k^T) o Gamma: G = dA o Gamma, dq += G k, dk += G^T q
    float* G = z.G.data();
    std::copy(dA, dA + n * n, G);
    times_gamma(G, cq, c, n, 1, shift);
    gemm_nn_acc(dq, G, k, n, D, n, n, D, D);
    gemm_tn_acc(dk, G, q, n, D, n, n, D, D);
  }
  // dkt = V dS^T; dk += dkt e^{cL - c}; dcL = sum kt o dkt + e^{cL} sum S0 o dS
  gemm_nt_acc(t2, v, dS, n, D, E, E, E, D);  // (t2 zero here)
  float dcL = 0.0f;
  for (int64_t t = 0; t < n; ++t) {
    const float a = et[t];
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t d = 0; d < D; ++d) s += kt[t * D + d] * t2[t * D + d], dk[t * D + d] += t2[t * D + d] * a;
    dcL += s;
  }
  std::fill(t2, t2 + n * D, 0.0f);
  float sd = 0.0f;
#pragma omp simd reduction(+ : sd)
  for (int64_t o = 0; o < D * E; ++o) sd += Sc[o] * dS[o];
  dcL += sd * el;
  // q carries e^{cq}, k carries e^{-c}: dcq_t = q_t . dq_t, dc_t = -k_t . dk_t; then
  // dg_tau = sum of dc over the sums that contain g_tau
  row_dots(dcq, q, dq, n, D), row_dots(dc, k, dk, n, D);
  float acc = dcL;
  for (int64_t t = n - 1; t >= 0; --t) {
    acc += (shift ? 0.0f : dcq[t]) - dc[t];
    z.dg[size_t(t)] = acc;
    if (shift) acc += dcq[t];
  }
  // dS0 of this chunk = e^{cL} dS + qd^T dy
  for (int64_t o = 0; o < D * E; ++o) dS[o] *= el;
  gemm_tn_acc(dS, qd, dy, D, E, n, D, E, E);
}

}  // namespace

// The chunks run in reverse, every head's chunk i before any head's chunk i - 1; a chunk's rows are
// gathered into contiguous buffers first (q times yscale, g spread over the D channels when one a
// step) and its gradients computed there, then written to the heads' rows (dq times yscale).
void gated_backward_heads(const GatedGradHead* heads, int64_t nh, int64_t T, int64_t D, int64_t E, bool shift) {
  if (nh <= 0) return;
  const FlushDenormals ftz;
  const int64_t L = kDecayChunk;
  const auto chunks = chunks_of(T);
  std::vector<float> qd(L * D), kf(L * D), kt(L * D), dA(L * L), dkt(L * D), dc(L * D), dcp(L * D), dcL(D), t1(L * D),
      t2(L * D);
  // the chunk's operands and gradients, contiguous
  std::vector<float> qb(L * D), kb(L * D), vb(L * E), yb(L * E), dqc(L * D), dkc(L * D), dgc(L * D), dvc(L * E);
  std::vector<float> dSs(size_t(nh * D * E));  // every head's state gradient, carried from chunk to chunk
  struct ChunkDecays {
    std::vector<Cum> c, cp;
    Decays x;
    bool made = false;
    explicit ChunkDecays(int64_t D) : c(kDecayChunk * D), cp(kDecayChunk * D) {}
  };
  ChunkDecays own(D);
  std::vector<ChunkDecays> kept(static_cast<size_t>(nh), ChunkDecays(D));
  ScoreWork sw;
  RowWork rw(D);
  FactoredGrad fg(D, E);
  rw.q = qb.data(), rw.k = kb.data(), rw.v = vb.data(), rw.dy = yb.data(), rw.dq = dqc.data(), rw.dk = dkc.data(),
  rw.dv = dvc.data(), rw.dA = dA.data();
  for (int64_t i = 0; i < nh; ++i) {
    const GatedGradHead& h = heads[i];
    LINMIX_CHECK(h.states && h.scores && (h.ld.g == 0) == (h.od.g == 0) && !h.ld.phi,
                 "gated_backward_heads: the forward's saves are needed; dg summed over the steps iff g is one row; "
                 "phi(q), phi(k) as rows (ld.phi is the forward's)");
    float* dS = dSs.data() + i * D * E;
    if (h.dST) std::copy(h.dST, h.dST + D * E, dS);
    else std::fill(dS, dS + D * E, 0.0f);
    if (h.od.g == 0) std::fill(h.dg, h.dg + (h.ld.g_row ? 1 : D), 0.0f);  // sums over the steps
  }
  const auto gather = [](float* dst, const float* src, int64_t ld, int64_t n, int64_t W, float scale) {
    for (int64_t t = 0; t < n; ++t) {
      const float* s = src + t * ld;
      float* d = dst + t * W;
#pragma omp simd
      for (int64_t j = 0; j < W; ++j) d[j] = s[j] * scale;
    }
  };
  const auto put = [](float* dst, int64_t ld, const float* src, int64_t n, int64_t W, float scale) {
#if defined(__AVX2__)
    // rows of whole cache lines: streamed (not read for ownership first; the gradients are not
    // read again here)
    if (W % 16 == 0 && ld % 16 == 0 && reinterpret_cast<uintptr_t>(dst) % 64 == 0) {
      const __m256 f = _mm256_set1_ps(scale);
      for (int64_t t = 0; t < n; ++t)
        for (int64_t j = 0; j < W; j += 8)
          _mm256_stream_ps(dst + t * ld + j, _mm256_mul_ps(_mm256_loadu_ps(src + t * W + j), f));
      return;
    }
#endif
    for (int64_t t = 0; t < n; ++t) {
      float* d = dst + t * ld;
      const float* s = src + t * W;
#pragma omp simd
      for (int64_t j = 0; j < W; ++j) d[j] = s[j] * scale;
    }
  };
  for (size_t ci = chunks.size(); ci-- > 0;)
    for (int64_t hi = 0; hi < nh; ++hi) {
      const GatedGradHead& h = heads[hi];
      const GatedRows& ld = h.ld;
      const int64_t t0 = chunks[ci].t0, n = chunks[ci].n;
      const float ys = ld.yscale;
      float* dS = dSs.data() + hi * D * E;
      const float *qc = qb.data(), *kc = kb.data(), *vc = vb.data(), *dyc = yb.data();
      gather(qb.data(), h.q + t0 * ld.q, ld.q, n, D, ys);
      gather(kb.data(), h.k + t0 * ld.k, ld.k, n, D, 1.0f);
      if (ld.kscale) scale_rows(kb.data(), ld.kscale + t0, n, D);
      gather(vb.data(), h.v + t0 * ld.v, ld.v, n, E, 1.0f);
      gather(yb.data(), h.dy + t0 * ld.y, ld.y, n, E, 1.0f);
      const float* Sc = h.states + int64_t(ci) * D * E;
      const float* Ac = h.scores + int64_t(ci) * L * L;
      float dbonus[kDecayChunk];  // the bonus's dA_tt, before the strict mask drops it
      if (ld.g_row) {
        row_decay_backward(rw, h, dS, Sc, Ac, t0, n, D, E, shift, dbonus);
      } else {
      // a decay constant in time (RWKV-5): every full chunk's sums and exponentials are the same,
      // made at the head's first full chunk and kept
      const bool keep = ld.g == 0 && n == kDecayChunk;
      ChunkDecays& K = keep ? kept[size_t(hi)] : own;
      if (!keep || !K.made) {
        cumsums(K.c.data(), K.cp.data(), h.g + t0 * ld.g, n, D, ld.g);
        K.x.compute(K.c.data(), K.cp.data(), shift ? K.cp.data() : K.c.data(), false, n, D);
        K.made = keep;
      }
      const Decays& x = K.x;
      const Cum *cc = K.c.data(), *cq = shift ? K.cp.data() : K.c.data();
      const bool fac = x.form == Form::factored;
      const float* S1 = ci + 1 < chunks.size() ? h.states + int64_t(ci + 1) * D * E : h.ST;  // the state after
      const bool stacked = fac && S1;
      if (stacked) {
        factored_backward(fg, dqc.data(), dkc.data(), dvc.data(), dcL.data(), dbonus, dS, qc, kc, vc, dyc, Sc, S1, Ac,
                          x.eq.data(), x.en.data(), x.el.data(), n, D, E, shift, ld.u != nullptr);
      } else {
      times(qd.data(), qc, x.eq, n, D);
      times(kt.data(), kc, x.et, n, D);
      if (fac) times(kf.data(), kc, x.en, n, D);
      // dq = (dy S0^T) o e^{cq}  (+ the intra part below)
      std::fill(dqc.begin(), dqc.begin() + n * D, 0.0f);
      std::fill(dkc.begin(), dkc.begin() + n * D, 0.0f);
      gemm_nt_acc(dqc.data(), dyc, Sc, n, D, E, E, E, D);
      for (int64_t o = 0; o < n * D; ++o) dqc[o] *= x.eq[size_t(o)];
      // dA = dy V^T (masked); dv = A^T dy + kt dS
      std::fill(dA.begin(), dA.begin() + n * n, 0.0f);
      gemm_nt_acc(dA.data(), dyc, vc, n, n, E, E, E, n);
      if (ld.u)
        for (int64_t t = 0; t < n; ++t) dbonus[t] = dA[t * n + t];
      mask_upper(dA.data(), n, shift);
      std::fill(dvc.begin(), dvc.begin() + n * E, 0.0f);
      gemm_tn_acc(dvc.data(), Ac, dyc, n, E, n, n, E, E);
      gemm_nn_acc(dvc.data(), kt.data(), dS, n, E, D, D, E, E);
      if (fac)
        factored_scores_backward(dqc.data(), dkc.data(), dA.data(), qd.data(), x.eq.data(), kf.data(), x.en.data(), n, D,
                                 t1.data(), t2.data());
      else
        scores_backward(dqc.data(), dkc.data(), dA.data(), qc, cq, kc, cc, n, D, shift, sw);
      // dkt = V dS^T; dk += dkt o e^{cL - c}
      std::fill(dkt.begin(), dkt.begin() + n * D, 0.0f);
      gemm_nt_acc(dkt.data(), vc, dS, n, D, E, E, E, D);
      std::fill(dcL.begin(), dcL.end(), 0.0f);
      for (int64_t t = 0; t < n; ++t)
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) {
          const int64_t o = t * D + d;
          dcL[size_t(d)] += kt[o] * dkt[o];
          dkc[o] += dkt[o] * x.et[size_t(o)];
        }
      // decay gradients: q carries e^{cq}, k carries e^{-c} everywhere; S0 and kt carry e^{cL}
      for (int64_t d = 0; d < D; ++d) {
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t e = 0; e < E; ++e) sum += Sc[d * E + e] * dS[d * E + e];
        dcL[size_t(d)] += sum * x.el[size_t(d)];
      }
      }
      for (int64_t o = 0; o < n * D; ++o) {
        const float qq = qc[o] * dqc[o];
        dc[o] = -kc[o] * dkc[o] + (shift ? 0.0f : qq);
        dcp[o] = shift ? qq : 0.0f;
      }
      decay_grad(dgc.data(), dc.data(), dcp.data(), dcL.data(), n, D);
      if (!stacked) {  // dS0 of this chunk = e^{cL} o dS + qd^T dy
        scale_rows(dS, x.el.data(), D, E);
        gemm_tn_acc(dS, qd.data(), dyc, D, E, n, D, E, E);
      }
      }
      if (ld.u)  // the bonus y_t += (q_t . (u o k_t)) v_t (q with yscale): no decay in it
        for (int64_t t = 0; t < n; ++t) {
          const float *qt = qc + t * D, *kr = kc + t * D, *gy = dyc + t * E, *u = ld.u;
          float beta = 0.0f;
          for (int64_t d = 0; d < D; ++d) beta += qt[d] * u[d] * kr[d];
          float* dvt = dvc.data() + t * E;
#pragma omp simd
          for (int64_t e = 0; e < E; ++e) dvt[e] += beta * gy[e];
          const float db = dbonus[t];
          float *dqt = dqc.data() + t * D, *dkt_ = dkc.data() + t * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) {
            dqt[d] += db * u[d] * kr[d], dkt_[d] += db * u[d] * qt[d];
            h.du[d] += db * qt[d] * kr[d];
          }
        }
      if (ld.vskip != 0.0f)
#pragma omp simd
        for (int64_t o = 0; o < n * E; ++o) dvc[o] += ld.vskip * yb[o];
      if (h.grad_epilogue) (*h.grad_epilogue)(t0, n, qc, kc, dqc.data(), dkc.data());
      // the chunk's gradients into the heads' rows
      const GatedRows& od = h.od;
      put(h.dq + t0 * od.q, od.q, dqc.data(), n, D, ys);
      put(h.dk + t0 * od.k, od.k, dkc.data(), n, D, 1.0f);
      put(h.dv + t0 * od.v, od.v, dvc.data(), n, E, 1.0f);
      if (!ld.g_row && od.g != 0) {
        put(h.dg + t0 * od.g, od.g, dgc.data(), n, D, 1.0f);
      } else if (!ld.g_row) {
        for (int64_t t = 0; t < n; ++t)
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) h.dg[d] += dgc[t * D + d];
      } else {  // one a step (row_decay_backward's dg)
        for (int64_t t = 0; t < n; ++t)
          if (od.g != 0) h.dg[(t0 + t) * od.g] = rw.dg[t];
          else h.dg[0] += rw.dg[t];
      }
    }
#if defined(__AVX2__)
  _mm_sfence();  // the streamed rows, ordered before the caller reads them
#endif
  for (int64_t i = 0; i < nh; ++i) std::copy(dSs.begin() + i * D * E, dSs.begin() + (i + 1) * D * E, heads[i].dS0);
}

// ---------------------------------------------------------------------------------------------
// dplr

namespace {

// The delta rule's substitutions, for strictly lower A (n x n, row stride lda) and X (n x E):
// solve_lower:  X_t += sum_{s<t} A_ts X_s in order of t, i.e. X = (I - A)^{-1} X;
// solve_upper:  X_t += sum_{s>t} A_st X_s in reverse, i.e. X = (I - A)^{-T} X.
// Blocks of kSolveBlock rows: what the rows before (after) a block add is one GEMM, the rest the
// row loop inside the block (64 x 64, E = 64: 10.5 us as one row loop, 3.9 us blocked).
constexpr int64_t kSolveBlock = 16;
void solve_lower(float* X, const float* A, int64_t lda, int64_t n, int64_t E) {
  for (int64_t b0 = 0; b0 < n; b0 += kSolveBlock) {
    const int64_t b1 = std::min(n, b0 + kSolveBlock);
    if (b0 > 0) gemm_nn(X + b0 * E, A + b0 * lda, X, b1 - b0, E, b0, lda, E, E, 1.0f, 1.0f);
    for (int64_t t = b0 + 1; t < b1; ++t)
      for (int64_t s = b0; s < t; ++s) {
        const float f = A[t * lda + s];
#pragma omp simd
        for (int64_t e = 0; e < E; ++e) X[t * E + e] += f * X[s * E + e];
      }
  }
}
void solve_upper(float* X, const float* A, int64_t lda, int64_t n, int64_t E) {
  for (int64_t b1 = n; b1 > 0; b1 -= kSolveBlock) {
    const int64_t b0 = std::max<int64_t>(0, b1 - kSolveBlock);
    if (b1 < n)  // X[b0, b1) += A[b1:n, b0:b1]^T X[b1:n]
      gemm_tn_acc(X + b0 * E, A + b1 * lda + b0, X + b1 * E, b1 - b0, E, n - b1, lda, E, E);
    for (int64_t t = b1 - 1; t >= b0; --t)
      for (int64_t s = t + 1; s < b1; ++s) {
        const float f = A[s * lda + t];
#pragma omp simd
        for (int64_t e = 0; e < E; ++e) X[t * E + e] += f * X[s * E + e];
      }
  }
}

struct DplrChunk {  // everything of one chunk that the forward and the backward both need
  std::vector<Cum> c, cp;
  Decays x;
  // ad = a o e^{cp}, rd = r o e^{c}; kt, bt = (k, b) o e^{cL - c}; kf, bf = (k, b) o e^{-c} (factored form)
  std::vector<float> Aab, Aak, Arb, Ark, ad, rd, U, kt, bt, kf, bf;
  explicit DplrChunk(int64_t D, int64_t E)
      : c(kDecayChunk * D), cp(kDecayChunk * D), Aab(kDecayChunk * kDecayChunk), Aak(kDecayChunk * kDecayChunk),
        Arb(kDecayChunk * kDecayChunk), Ark(kDecayChunk * kDecayChunk), ad(kDecayChunk * D), rd(kDecayChunk * D),
        U(kDecayChunk * E), kt(kDecayChunk * D), bt(kDecayChunk * D), kf(kDecayChunk * D), bf(kDecayChunk * D) {}
  bool factored() const { return x.form == Form::factored; }
};

// Scores, decayed factors and U of a chunk (rows [0, n) of the given pointers) from state S0.
// saved: Aab, Aak and U of this chunk kept by the forward (n^2, n^2, n E floats), copied instead
// of recomputed.
void dplr_chunk(DplrChunk& z, const float* S0, const float* r, const float* w, const float* k, const float* v,
                const float* a, const float* b, int64_t n, int64_t D, int64_t E, ScoreWork& sw,
                const float* saved = nullptr) {
  cumsums(z.c.data(), z.cp.data(), w, n, D, D);
  z.x.compute(z.c.data(), z.cp.data(), z.c.data(), true, n, D);
  times(z.ad.data(), a, z.x.ea, n, D);
  times(z.rd.data(), r, z.x.eq, n, D);
  times(z.kt.data(), k, z.x.et, n, D);
  times(z.bt.data(), b, z.x.et, n, D);
  const bool fac = z.factored();
  if (fac) times(z.kf.data(), k, z.x.en, n, D), times(z.bf.data(), b, z.x.en, n, D);
  if (fac) {
    factored_scores(z.Arb.data(), z.rd.data(), z.bf.data(), n, D, false);
    factored_scores(z.Ark.data(), z.rd.data(), z.kf.data(), n, D, false);
  } else {
    scores(z.Arb.data(), r, z.c.data(), b, z.c.data(), n, D, false, sw);
    scores(z.Ark.data(), r, z.c.data(), k, z.c.data(), n, D, false, sw);
  }
  float* U = z.U.data();
  if (saved) {
    std::copy(saved, saved + n * n, z.Aab.begin());
    std::copy(saved + n * n, saved + 2 * n * n, z.Aak.begin());
    std::copy(saved + 2 * n * n, saved + 2 * n * n + n * E, U);
    return;
  }
  if (fac) {
    factored_scores(z.Aab.data(), z.ad.data(), z.bf.data(), n, D, true);
    factored_scores(z.Aak.data(), z.ad.data(), z.kf.data(), n, D, true);
  } else {
    scores(z.Aab.data(), a, z.cp.data(), b, z.c.data(), n, D, true, sw);
    scores(z.Aak.data(), a, z.cp.data(), k, z.c.data(), n, D, true, sw);
  }
  // (I - Aab) U = Aak V + ad S0, by forward substitution
  std::fill(U, U + n * E, 0.0f);
  gemm_nn_acc(U, z.Aak.data(), v, n, E, n, n, E, E);
  gemm_nn_acc(U, z.ad.data(), S0, n, E, D, D, E, E);
  solve_lower(U, z.Aab.data(), n, n, E);
}

// Scratch of dplr_factored.
struct DplrFactoredWork {
  // [rd; ad] (2n,D), [kf; bf]^T (D,2n) and as rows, X KB (2n,2n), [V; U] (2n,E)
  std::vector<float> X, KB, KBr, G, VU, el, en;
  std::vector<Cum> run;
  DplrFactoredWork(int64_t D, int64_t E)
      : X(2 * kDecayChunk * D), KB(D * 2 * kDecayChunk), KBr(2 * kDecayChunk * D), G(4 * kDecayChunk * kDecayChunk),
        VU(2 * kDecayChunk * E), el(D), en(D), run(D) {}
};

// One chunk of dplr_forward in the factored form, when every channel's total log decay over the
// chunk is >= -kFactorSpan (else false, nothing written). The decays fold into the operands as
// they are read: rd = r o e^{c}, ad = a o e^{cp}, kf, bf = (k, b) o e^{-c}; then
//   [Ark Arb; Aak Aab] = [rd; ad] [kf; bf]^T   one GEMM for the four score matrices (masked)
//   U = (I - Aab)^{-1} (Aak V + ad S0)          forward substitution
//   y = rd S0 + [Ark Arb] [V; U]
//   S = diag(e^{cL}) (S0 + [kf; bf]^T [V; U])
// six GEMMs where dplr_chunk's form takes eleven of a quarter the size.
bool dplr_factored(DplrFactoredWork& f, float* y, float* S, const float* r, const float* w, const float* k,
                   const float* v, const float* a, const float* b, int64_t n, int64_t D, int64_t E, float* keep) {
  float *X = f.X.data(), *KB = f.KB.data(), *G = f.G.data(), *VU = f.VU.data(), *el = f.el.data(), *en = f.en.data();
  Cum* run = f.run.data();
  const int64_t n2 = 2 * n;
  float *rd = X, *ad = X + n * D;
  std::fill(run, run + D, 0.0);
  for (int64_t t = 0; t < n; ++t) {  // c into rd's row, cp into ad's, then their exps (as factored_chunk)
    const float* wt = w + t * D;
    float *rt = rd + t * D, *at = ad + t * D;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) {
      const Cum before = run[d], after = before + Cum(wt[d]);
      run[d] = after;
      rt[d] = float(after), at[d] = float(before);
    }
  }
  Cum lo = 0.0;
  for (int64_t d = 0; d < D; ++d) lo = std::min(lo, run[d]);
  if (-lo > kFactorSpan) return false;
  for (int64_t t = 0; t < n; ++t) {
    const float *rr = r + t * D, *ar = a + t * D, *kr = k + t * D, *br = b + t * D;
    float *rt = rd + t * D, *at = ad + t * D;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) {  // en: the row's e^{-c}
      en[d] = exp_fast(-rt[d]);
      rt[d] = rr[d] * exp_fast(rt[d]), at[d] = ar[d] * exp_fast(at[d]);
    }
    float *kt = f.KBr.data() + t * D, *bt = kt + n * D;  // [kf; bf] as rows, then transposed
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) kt[d] = kr[d] * en[d], bt[d] = br[d] * en[d];
  }
  transpose(KB, n2, f.KBr.data(), D, n2, D);
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) el[d] = exp_fast(float(run[d]));
  gemm_nn(G, X, KB, n2, n2, D, D, n2, n2, 1.0f, 0.0f);
  for (int64_t t = 0; t < n; ++t) {  // the read-out's blocks keep s <= t, the update's s < t
    float *top = G + t * n2, *bot = G + (n + t) * n2;
    std::fill(top + t + 1, top + n, 0.0f), std::fill(top + n + t + 1, top + n2, 0.0f);
    std::fill(bot + t, bot + n, 0.0f), std::fill(bot + n + t, bot + n2, 0.0f);
  }
  const float *Aak = G + n * n2, *Aab = G + n * n2 + n;
  float* U = VU + n * E;
  std::copy(v, v + n * E, VU);
  gemm_nn(U, Aak, v, n, E, n, n2, E, E, 1.0f, 0.0f);
  gemm_nn(U, ad, S, n, E, D, D, E, E, 1.0f, 1.0f);
  solve_lower(U, Aab, n2, n, E);  // (I - Aab) U = Aak V + ad S0
  if (keep) {
    for (int64_t t = 0; t < n; ++t) {
      std::copy(Aab + t * n2, Aab + t * n2 + n, keep + t * n);
      std::copy(Aak + t * n2, Aak + t * n2 + n, keep + n * n + t * n);
    }
    std::copy(U, U + n * E, keep + 2 * n * n);
  }
  gemm_nn(y, rd, S, n, E, D, D, E, E, 1.0f, 0.0f);  // rd S0
  gemm_nn(y, G, VU, n, E, n2, n2, E, E, 1.0f, 1.0f);  // + [Ark Arb] [V; U]
  gemm_nn(S, KB, VU, D, E, n2, n2, E, E, 1.0f, 1.0f);
  scale_rows(S, el, D, E);
  return true;
}

}  // namespace

namespace {

// The scratch of one thread's dplr chunks.
struct DplrWork {
  DplrFactoredWork f;
  std::unique_ptr<DplrChunk> z;  // the general form's, made when a chunk first needs it
  ScoreWork sw;
  DplrWork(int64_t D, int64_t E) : f(D, E) {}
};
// One chunk of n rows (r, w, k, a, b: n x D; v, y: n x E; contiguous) from state S, which it
// advances; keep: the chunk's Aab, Aak, U for the backward (dplr_kept_per floats), when not null.
void dplr_forward_chunk(DplrWork& W, float* y, float* S, const float* r, const float* w, const float* k,
                        const float* v, const float* a, const float* b, int64_t n, int64_t D, int64_t E, float* keep) {
  if (dplr_factored(W.f, y, S, r, w, k, v, a, b, n, D, E, keep)) return;
  if (!W.z) W.z = std::make_unique<DplrChunk>(D, E);
  DplrChunk& z = *W.z;
  dplr_chunk(z, S, r, w, k, v, a, b, n, D, E, W.sw);
  if (keep) {
    std::copy(z.Aab.begin(), z.Aab.begin() + n * n, keep);
    std::copy(z.Aak.begin(), z.Aak.begin() + n * n, keep + n * n);
    std::copy(z.U.begin(), z.U.begin() + n * E, keep + 2 * n * n);
  }
  gemm_nn(y, z.rd.data(), S, n, E, D, D, E, E, 1.0f, 0.0f);      // (r o e^c) S0
  gemm_nn_acc(y, z.Ark.data(), v, n, E, n, n, E, E);           // + Ark V
  gemm_nn_acc(y, z.Arb.data(), z.U.data(), n, E, n, n, E, E);  // + Arb U
  scale_rows(S, z.x.el.data(), D, E);  // S = e^{cL} S0 + kt^T V + bt^T U
  gemm_tn_acc(S, z.kt.data(), v, D, E, n, D, E, E);
  gemm_tn_acc(S, z.bt.data(), z.U.data(), D, E, n, D, E, E);
}

}  // namespace

void dplr_forward(float* y, float* S, const float* r, const float* w, const float* k, const float* v, const float* a,
                  const float* b, int64_t T, int64_t D, int64_t E, float* save_states, float* save_kept) {
  const FlushDenormals ftz;
  DplrWork W(D, E);
  const auto chunks = chunks_of(T);
  for (size_t i = 0; i < chunks.size(); ++i) {
    const int64_t t0 = chunks[i].t0, n = chunks[i].n, oD = t0 * D, oE = t0 * E;
    if (save_states) std::copy(S, S + D * E, save_states + int64_t(i) * D * E);
    dplr_forward_chunk(W, y + oE, S, r + oD, w + oD, k + oD, v + oE, a + oD, b + oD, n, D, E,
                       save_kept ? save_kept + int64_t(i) * dplr_kept_per(E) : nullptr);
  }
}

// Every head's chunk j loaded and run before any head's chunk j + 1 (as gated_forward_heads):
// the chunk's operands, made by the mechanism's load from its inputs, stay in cache while the
// chunk runs, where one head's whole rows (six T x D arrays) made before the chunks ran from
// memory.
void dplr_forward_heads(const DplrHeadRows* heads, int64_t nh, int64_t T, int64_t D, int64_t E) {
  if (nh <= 0) return;
  const FlushDenormals ftz;
  const int64_t L = kDecayChunk;
  DplrWork W(D, E);
  const int64_t per = L * (5 * D + E);  // a head's r, w, k, a, b, v
  std::vector<float> buf(size_t(nh * per)), y(size_t(L * E));
  const auto rows = [&](int64_t i) {
    float* r = buf.data() + i * per;
    return DplrChunkRows{r, r + L * D, r + 2 * L * D, r + 5 * L * D, r + 3 * L * D, r + 4 * L * D};
  };
  for (const Chunk& ch : chunks_of(T)) {
    for (int64_t i = 0; i < nh; ++i) heads[i].load(ch.t0, ch.n, rows(i));  // every head's loads in flight together
    for (int64_t i = 0; i < nh; ++i) {
      const DplrHeadRows& h = heads[i];
      const DplrChunkRows x = rows(i);
      dplr_forward_chunk(W, y.data(), h.S, x.r, x.w, x.k, x.v, x.a, x.b, ch.n, D, E, nullptr);
      for (int64_t t = 0; t < ch.n; ++t) std::memcpy(h.y + (ch.t0 + t) * h.ldy, y.data() + t * E, size_t(E) * 4);
    }
  }
}

void dplr_backward(float* dr, float* dw, float* dk, float* dv, float* da, float* db, float* dS0, const float* dy,
                   const float* S0, const float* r, const float* w, const float* k, const float* v, const float* a,
                   const float* b, int64_t T, int64_t D, int64_t E, const float* dST, const float* saved_states,
                   const float* saved_kept) {
  const FlushDenormals ftz;
  const int64_t L = kDecayChunk;
  const auto chunks = chunks_of(T);
  DplrChunk z(D, E);
  ScoreWork sw;
  // the state at every chunk start, and each chunk's Aab, Aak, U (memory linear in T: 2 L + E
  // floats a token), so the backward sweep recomputes only the read-out scores: from the
  // forward's saves, or a sweep of their own
  const int64_t per = dplr_kept_per(E);
  const bool sweep = !(saved_states && saved_kept);
  std::vector<float> own_states(sweep ? chunks.size() * D * E : 0), S(S0, S0 + D * E),
      own_kept(sweep ? chunks.size() * per : 0);  // S: the sweep's state
  const float* states = sweep ? own_states.data() : saved_states;
  const float* kept = sweep ? own_kept.data() : saved_kept;
  if (sweep) {  // (its y unused)
    std::vector<float> y(size_t(T * E));
    dplr_forward(y.data(), S.data(), r, w, k, v, a, b, T, D, E, own_states.data(), own_kept.data());
  }
  std::vector<float> dS(D * E, 0.0f), dU(L * E), dR(L * E), dA(L * L), tmp(L * D), tmp2(L * D), dc(L * D), dcp(L * D), dcL(D);
  if (dST) std::copy(dST, dST + D * E, dS.begin());  // the sweep starts from the final state's gradient
  for (size_t i = chunks.size(); i-- > 0;) {
    const int64_t t0 = chunks[i].t0, n = chunks[i].n;
    const int64_t oD = t0 * D, oE = t0 * E;
    const float* Sc = states + int64_t(i) * D * E;
    const float *rc = r + oD, *kc = k + oD, *vc = v + oE, *ac = a + oD, *bc = b + oD, *dyc = dy + oE;
    float *drc = dr + oD, *dkc = dk + oD, *dvc = dv + oE, *dac = da + oD, *dbc = db + oD;
    dplr_chunk(z, Sc, rc, w + oD, kc, vc, ac, bc, n, D, E, sw, kept + int64_t(i) * per);
    // dU = Arb^T dY + bt dS; (I - Aab)^T dR = dU by backward substitution
    std::fill(dU.begin(), dU.begin() + n * E, 0.0f);
    gemm_tn_acc(dU.data(), z.Arb.data(), dyc, n, E, n, n, E, E);
    gemm_nn_acc(dU.data(), z.bt.data(), dS.data(), n, E, D, D, E, E);
    std::copy(dU.begin(), dU.begin() + n * E, dR.begin());
    solve_upper(dR.data(), z.Aab.data(), n, n, E);
    // dV = Ark^T dY + Aak^T dR + kt dS
    std::fill(dvc, dvc + n * E, 0.0f);
    gemm_tn_acc(dvc, z.Ark.data(), dyc, n, E, n, n, E, E);
    gemm_tn_acc(dvc, z.Aak.data(), dR.data(), n, E, n, n, E, E);
    gemm_nn_acc(dvc, z.kt.data(), dS.data(), n, E, D, D, E, E);
    // dr = (dY S0^T) o e^{c}, da = (dR S0^T) o e^{cp}; then the intra-chunk score gradients
    std::fill(drc, drc + n * D, 0.0f), std::fill(dac, dac + n * D, 0.0f);
    std::fill(dkc, dkc + n * D, 0.0f), std::fill(dbc, dbc + n * D, 0.0f);
    gemm_nt_acc(drc, dyc, Sc, n, D, E, E, E, D);
    gemm_nt_acc(dac, dR.data(), Sc, n, D, E, E, E, D);
    for (int64_t o = 0; o < n * D; ++o) drc[o] *= z.x.eq[size_t(o)], dac[o] *= z.x.ea[size_t(o)];
    // the score matrices' gradients; X's factored operand Xf = X o ex, Y's Yf = Y o e^{-c}
    auto score_grad = [&](const float* G, const float* U, bool strict, float* dX, const float* X, const Cum* cx,
                          const float* Xf, const std::vector<float>& ex, float* dY, const float* Y, const float* Yf) {
      std::fill(dA.begin(), dA.begin() + n * n, 0.0f);
      gemm_nt_acc(dA.data(), G, U, n, n, E, E, E, n);
      mask_upper(dA.data(), n, strict);
      if (z.factored())
        factored_scores_backward(dX, dY, dA.data(), Xf, ex.data(), Yf, z.x.en.data(), n, D, tmp.data(), tmp2.data());
      else
        scores_backward(dX, dY, dA.data(), X, cx, Y, z.c.data(), n, D, strict, sw);
    };
    score_grad(dyc, z.U.data(), false, drc, rc, z.c.data(), z.rd.data(), z.x.eq, dbc, bc, z.bf.data());  // Arb
    score_grad(dyc, vc, false, drc, rc, z.c.data(), z.rd.data(), z.x.eq, dkc, kc, z.kf.data());          // Ark
    score_grad(dR.data(), z.U.data(), true, dac, ac, z.cp.data(), z.ad.data(), z.x.ea, dbc, bc, z.bf.data());  // Aab
    score_grad(dR.data(), vc, true, dac, ac, z.cp.data(), z.ad.data(), z.x.ea, dkc, kc, z.kf.data());          // Aak
    // kt, bt: dkt = V dS^T, dbt = U dS^T
    std::fill(dcL.begin(), dcL.end(), 0.0f);
    for (int pass = 0; pass < 2; ++pass) {
      const float* Xv = pass == 0 ? vc : z.U.data();
      const float* Xt = pass == 0 ? z.kt.data() : z.bt.data();
      float* dX = pass == 0 ? dkc : dbc;
      std::fill(tmp.begin(), tmp.begin() + n * D, 0.0f);
      gemm_nt_acc(tmp.data(), Xv, dS.data(), n, D, E, E, E, D);
      for (int64_t t = 0; t < n; ++t)
        for (int64_t d = 0; d < D; ++d) {
          const int64_t o = t * D + d;
          dcL[size_t(d)] += Xt[o] * tmp[o];
          dX[o] += tmp[o] * z.x.et[size_t(o)];
        }
    }
    for (int64_t d = 0; d < D; ++d) {
      float s = 0.0f;
      for (int64_t e = 0; e < E; ++e) s += Sc[d * E + e] * dS[d * E + e];
      dcL[size_t(d)] += s * z.x.el[size_t(d)];
    }
    for (int64_t o = 0; o < n * D; ++o) {
      dc[o] = rc[o] * drc[o] - kc[o] * dkc[o] - bc[o] * dbc[o];
      dcp[o] = ac[o] * dac[o];
    }
    decay_grad(dw + oD, dc.data(), dcp.data(), dcL.data(), n, D);
    // dS0 of this chunk = e^{cL} o dS + rd^T dY + ad^T dR
    scale_rows(dS.data(), z.x.el.data(), D, E);
    gemm_tn_acc(dS.data(), z.rd.data(), dyc, D, E, n, D, E, E);
    gemm_tn_acc(dS.data(), z.ad.data(), dR.data(), D, E, n, D, E, E);
  }
  std::copy(dS.begin(), dS.end(), dS0);
}

}  // namespace linmix
