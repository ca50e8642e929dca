// performer — FAVOR+ (Choromanski et al. 2021, "Rethinking Attention with Performers").
//   x' = x D^(-1/4);  phi(x)_m = exp(omega_m . x' - |x'|^2 / 2) / sqrt(M)   (positive features, eq. 7)
//   y_t = phi(q_t)^T S / (phi(q_t) . z),  S = sum_s phi(k_s) v_s^T, z = sum_s phi(k_s)
// Stabilising shifts cancel between numerator and denominator: queries subtract their own
// row max; keys subtract the max over all keys (non-causal) or the running max over keys
// s <= t (causal, both forms), the carried S, z being rescaled by exp(old max - new max) <= 1.
// The causal parallel form and its backward run on the gated chunked kernels, the running key max
// as the decay (performer_causal_run); the non-causal form on the product of
// kernels/linear_product.h (two GEMMs).
#include <bit>
#include <random>

#include "kernels/blas.h"
#include "../kernels/linear_product.h"
#include "../ref/ref_util.h"
#include <cblas.h>

#include "../kernels/transpose.h"
#include "../kernels/value_check.h"
#include "../kernels/vmath.h"
#include "common.h"
#include "linear_forms.h"
#include "linmix/kernels.h"

namespace linmix::ref {

// ---- performer: the float64 reference (the literal formula, templated for the tape) ----
// Performer: y_t = sum_s A_ts v_s / sum_s A_ts, A_ts = phi(q_t) . phi(k_s) (s <= t when
// causal), phi(x)_m = exp(omega_m . x' - |x'|^2 / 2) / sqrt(M), x' = x D^(-1/4): the features
// exactly as the paper writes them (no shifts). proj: (M,D).
// A causal state (S0 (B,H,M,E), z0 (B,H,M), kmax0 (B,H); null: none) is the sums
// e^{kmax0} (S0, z0) of phi(k_s) (v_s^T, 1) over the tokens before 0, which every t sees; with ST
// the final state is written in the same form, kmaxT the largest of kmax0 and every key logit
// omega_m . k'_s - |k'_s|^2 / 2 (-1e38 without a state and keys).
template <class S>
void performer_ref(S* y, const S* q, const S* k, const S* v, const S* proj, const AttnDims& d, int64_t M, bool causal,
                   const S* S0 = nullptr, const S* z0 = nullptr, const S* kmax0 = nullptr, S* ST = nullptr,
                   S* zT = nullptr, S* kmaxT = nullptr) {
  const int64_t T = d.T, H = d.H, D = d.D, E = d.E;
  const double sc = std::pow(double(D), -0.25);
  auto logits = [&](const S* x, S* out) {
    S sq = 0;
    for (int64_t j = 0; j < D; ++j) sq += x[j] * sc * x[j] * sc;
    for (int64_t m = 0; m < M; ++m) {
      S a = 0;
      for (int64_t j = 0; j < D; ++j) a += proj[m * D + j] * x[j] * sc;
      out[m] = a - sq / 2;
    }
  };
  const double inv_sqrt_m = 1.0 / std::sqrt(double(M));
  std::vector<S> fq(T * M), lk(T * M), fk(T * M), A(T * T);
  for (int64_t b = 0; b < d.B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      const int64_t bh = b * H + h;
      for (int64_t t = 0; t < T; ++t) {
        logits(q + ((b * T + t) * H + h) * D, &fq[t * M]);
        logits(k + ((b * T + t) * H + h) * D, &lk[t * M]);
        for (int64_t m = 0; m < M; ++m)
          fq[t * M + m] = exp(fq[t * M + m]) * inv_sqrt_m, fk[t * M + m] = exp(lk[t * M + m]) * inv_sqrt_m;
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
        if (S0)
          for (int64_t m = 0; m < M; ++m) den += fq[t * M + m] * z0[bh * M + m] * exp(kmax0[bh]);
        for (int64_t e = 0; e < E; ++e) {
          S num = 0;
          for (int64_t s2 = 0; s2 < T; ++s2) num += A[t * T + s2] * v[((b * T + s2) * H + h) * E + e];
          if (S0)
            for (int64_t m = 0; m < M; ++m) num += fq[t * M + m] * S0[(bh * M + m) * E + e] * exp(kmax0[bh]);
          y[((b * T + t) * H + h) * E + e] = num / den;
        }
      }
      if (ST) {
        S kT = S0 ? kmax0[bh] : S(-1e38);
        for (int64_t i = 0; i < T * M; ++i) kT = std::max(kT, lk[i]);
        for (int64_t m = 0; m < M; ++m) {
          S zs = S0 ? exp(kmax0[bh] - kT) * z0[bh * M + m] : S(0);
          for (int64_t s2 = 0; s2 < T; ++s2) zs += exp(lk[s2 * M + m] - kT) * inv_sqrt_m;
          zT[bh * M + m] = zs;
          for (int64_t e = 0; e < E; ++e) {
            S ss = S0 ? exp(kmax0[bh] - kT) * S0[(bh * M + m) * E + e] : S(0);
            for (int64_t s2 = 0; s2 < T; ++s2) ss += exp(lk[s2 * M + m] - kT) * inv_sqrt_m * v[((b * T + s2) * H + h) * E + e];
            ST[(bh * M + m) * E + e] = ss;
          }
        }
        kmaxT[bh] = kT;
      }
    }
}

}  // namespace linmix::ref

namespace linmix {

namespace {

constexpr float kEmptyMax = -1e38f;  // the max of nothing; finite so a saved state stays finite

// logits (n,M) = omega . x' - |x'|^2 / 2 for n rows of x with row stride ldx: one GEMM
// (x' omega^T, OpenBLAS) and the row norms (the backward's one row; head_features makes a head's
// by tiles).
void feature_logits(float* out, const float* x, int64_t ldx, int64_t n, const float* proj, int64_t M, int64_t D) {
  const float s = std::pow(float(D), -0.25f);
  if (n == 0) return;
  if (n == 1) {  // one row (T = 1, or the key reaching the final max): own loops (cheaper than sgemm's call)
    dot_rows(out, proj, M, D, x, D, s);
  } else {
    blas::sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(n), int(M), int(D), s, x, int(ldx), proj, int(D), 0.0f, out,
                int(M));
  }
  for (int64_t i = 0; i < n; ++i) {
    const float* xr = x + i * ldx;
    float sq = 0.0f;
#pragma omp simd reduction(+ : sq)
    for (int64_t j = 0; j < D; ++j) sq += xr[j] * xr[j];
    const float h = 0.5f * s * s * sq;
    for (int64_t m = 0; m < M; ++m) out[i * M + m] -= h;
  }
}

// max of n floats in SIMD partial maxima (std::max_element runs a serial chain of compares)
inline float row_max(const float* r, int64_t n) { return max_of(r, n, kEmptyMax); }

// The feature map's backward for n rows x (row stride ldx) of one head: dl (n,M) holds d phi on
// entry and dl = d phi o phi on exit (phi = f; plus `add` at index add_at: the final kmax's logit);
// l_m(x) = omega_m . x' - |x'|^2 / 2, x' = x D^(-1/4) gives dx = D^(-1/4) (dl proj - rowsum(dl) x')
// (written at row stride ldx) and dproj += D^(-1/4) dl^T x (into dp (M,D)).
void feature_backward(float* dx, float* dl, const float* f, const float* x, int64_t ldx, const float* proj, int64_t n,
                      int64_t M, int64_t D, float* dp, int64_t add_at = -1, float add = 0.0f) {
  const float sc = std::pow(float(D), -0.25f);
  // dl and dx by tiles of 64 rows while they are in L1 (dx = dl proj a small GEMM a tile, as the
  // forward's logits: one (n,D) product took OpenBLAS's packing path); dproj in one product
  constexpr int64_t kTile = 64;
  for (int64_t t0 = 0; t0 < n; t0 += kTile) {
    const int64_t nt = std::min(kTile, n - t0);
    float* __restrict dlt = dl + t0 * M;
    const float* __restrict ft = f + t0 * M;
#pragma omp simd
    for (int64_t i = 0; i < nt * M; ++i) dlt[i] *= ft[i];
    if (add_at >= t0 * M && add_at < (t0 + nt) * M) dl[add_at] += add;
    blas::sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(nt), int(D), int(M), sc, dlt, int(M), proj, int(D), 0.0f,
                dx + t0 * ldx, int(ldx));
    for (int64_t t = t0; t < t0 + nt; ++t) {
      float sum_dl = 0.0f;
#pragma omp simd reduction(+ : sum_dl)
      for (int64_t m = 0; m < M; ++m) sum_dl += dl[t * M + m];
      const float c2 = sc * sc * sum_dl;
      float* __restrict dr = dx + t * ldx;
      const float* __restrict xr = x + t * ldx;
#pragma omp simd
      for (int64_t j = 0; j < D; ++j) dr[j] -= c2 * xr[j];
    }
  }
  blas::sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, int(M), int(D), int(n), sc, dl, int(M), x, int(ldx), 1.0f, dp,
              int(D));
}

// Stabilised features of one head (row0 = b*T*H + h): Qf, Kf (T,M). Queries: exp(l - row max);
// keys: exp(l - g_t) with g_t the running max over keys s <= t (causal, saved in g) or the max
// over all keys (non-causal). All / sqrt(M). kmax0: the largest key logit before token 0 (a
// state's; kEmptyMax without), where the causal running max starts.
// bad (not null): q's and k's rows checked for inf / NaN through their squared norms h (an inf or
// NaN in a row makes it inf or NaN; a finite row whose square overflows only costs run_mixer's
// own check of the tensor, which names no element then), OR-ed into *bad.
void head_features(float* Qf, float* Kf, float* g, const float* q, const float* k, const float* proj, int64_t row0,
                   int64_t T, int64_t H, int64_t D, int64_t M, bool causal, float kmax0 = kEmptyMax,
                   uint32_t* bad = nullptr) {
  const float inv_sqrt_m = 1.0f / std::sqrt(float(M)), s = std::pow(float(D), -0.25f), hs = 0.5f * s * s;
  const int64_t ldx = H * D;
  // By tiles of kFeatureTile rows: the logits of the tile's q and k rows (two small GEMMs on
  // proj^T, straight from the head's strided rows), then their exps while the tile is in L1. One
  // (T,M) GEMM each (OpenBLAS's packing path, its pass zeroing the output, the exps a second pass
  // over 1 MiB at T 4096) took 1.2-1.3x as long for the products alone (one thread, a driver).
  // The rows' norm terms h_t = |x'|^2 / 2 are subtracted as the exps read the logits (the max of
  // l - h_t is max(l) - h_t: the rounded subtraction is monotonic).
  constexpr int64_t kFeatureTile = 64;
  thread_local std::vector<float> pt, hk;
  pt.resize(size_t(D * M));
  transpose(pt.data(), M, proj, D, M, D);  // proj^T (D,M)
  if (!causal) hk.resize(size_t(T));
  RowCheck<false> chk;  // the rows' squared norms: inf or NaN when a value of the row is
  float run = kmax0, kmx = kEmptyMax;
  for (int64_t t0 = 0; t0 < T; t0 += kFeatureTile) {
    const int64_t n = std::min(kFeatureTile, T - t0);
    const float *xq = q + (row0 + t0 * H) * D, *xk = k + (row0 + t0 * H) * D;
    blas::sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(n), int(M), int(D), s, xq, int(ldx), pt.data(), int(M),
                0.0f, Qf + t0 * M, int(M));
    blas::sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(n), int(M), int(D), s, xk, int(ldx), pt.data(), int(M),
                0.0f, Kf + t0 * M, int(M));
    for (int64_t i = 0; i < n; ++i) {
      const float *xr = xq + i * ldx, *kr = xk + i * ldx;
      float sq = 0.0f, sk = 0.0f;
#pragma omp simd reduction(+ : sq, sk)
      for (int64_t j = 0; j < D; ++j) sq += xr[j] * xr[j], sk += kr[j] * kr[j];
      const float h = hs * sq, hk_i = hs * sk;
      if (bad) chk.take(std::bit_cast<uint32_t>(h)), chk.take(std::bit_cast<uint32_t>(hk_i));
      float* __restrict r = Qf + (t0 + i) * M;
      const float mx = row_max(r, M) - h;
#pragma omp simd
      for (int64_t m = 0; m < M; ++m) r[m] = exp_fast((r[m] - h) - mx) * inv_sqrt_m;
      float* __restrict rk = Kf + (t0 + i) * M;
      if (causal) {
        g[t0 + i] = run = std::max(run, row_max(rk, M) - hk_i);
#pragma omp simd
        for (int64_t m = 0; m < M; ++m) rk[m] = exp_fast((rk[m] - hk_i) - run) * inv_sqrt_m;
      } else {
        hk[size_t(t0 + i)] = hk_i, kmx = std::max(kmx, row_max(rk, M) - hk_i);
      }
    }
  }
  if (bad) *bad |= chk.bad();
  if (causal) return;
  for (int64_t t = 0; t < T; ++t) {  // non-causal: the max over every key first
    float* __restrict r = Kf + t * M;
    const float h = hk[size_t(t)];
#pragma omp simd
    for (int64_t m = 0; m < M; ++m) r[m] = exp_fast((r[m] - h) - kmx) * inv_sqrt_m;
  }
}


}  // namespace

void performer_forward(float* y, const float* q, const float* k, const float* v, const float* proj,
                       const AttnDims& d, int64_t M) {
  const int64_t B = d.B, T = d.T, H = d.H, D = d.D, E = d.E;
#pragma omp parallel
  {
    // Qf, Kf: (T,M) features of one head; den: (T); Vh, Yh: (T,E) the head's values and
    // outputs, contiguous
    std::vector<float> Qf(T * M), Kf(T * M), Vh(T * E), Yh(T * E), den(T);
#pragma omp for collapse(2) schedule(dynamic)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < H; ++h) {
        const int64_t row0 = b * T * H + h;
        head_features(Qf.data(), Kf.data(), nullptr, q, k, proj, row0, T, H, D, M, false);
        gather_head(Vh.data(), v, row0, T, H, E, identity_fn);
        linear_product(Yh.data(), den.data(), Qf.data(), Kf.data(), Vh.data(), {T, M, E, M, M, E, E});
        scatter_head(y, Yh.data(), row0, T, H, E, [&](int64_t t) { return 1.0f / den[t]; });
      }
  }
}

// Backward of performer_forward. The stabilising shifts (query row max, key max) leave y
// unchanged, so they are constants for the gradient; per head: features and the forward
// product are recomputed, dnum = dy / den, dden = -(dy . y) / den, the product's backward
// gives d(features); a feature f = exp(l - shift) gives dl = df f; and
// l_m(x) = omega_m . x' - |x'|^2 / 2, x' = x D^(-1/4) gives
//   dx = D^(-1/4) (sum_m dl_m omega_m - (sum_m dl_m) x'),  dproj_m += sum over rows dl_m x'.
void performer_backward(float* dq, float* dk, float* dv, float* dproj, const float* q, const float* k, const float* v,
                        const float* proj, const float* dy, const AttnDims& d, int64_t M) {
  const int64_t B = d.B, T = d.T, H = d.H, D = d.D, E = d.E;
  std::fill(dproj, dproj + M * D, 0.0f);
#pragma omp parallel
  {
    std::vector<float> Qf(T * M), Kf(T * M), num(T * E), den(T), dnum(T * E), dden(T), dQ(T * M), dK(T * M),
        dV(T * E), dp(M * D, 0.0f);
#pragma omp for collapse(2) schedule(dynamic)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < H; ++h) {
        const int64_t row0 = b * T * H + h;
        head_features(Qf.data(), Kf.data(), nullptr, q, k, proj, row0, T, H, D, M, false);
        const LinearProductArgs args{T, M, E, M, M, H * E, E};
        linear_product(num.data(), den.data(), Qf.data(), Kf.data(), v + row0 * E, args);
        for (int64_t t = 0; t < T; ++t) {
          const float* gy = dy + (row0 + t * H) * E;
          float s = 0.0f;
          for (int64_t e = 0; e < E; ++e) s += gy[e] * num[t * E + e];
          for (int64_t e = 0; e < E; ++e) dnum[t * E + e] = gy[e] / den[t];
          dden[t] = -s / (den[t] * den[t]);
        }
        linear_product_backward(dQ.data(), dK.data(), dV.data(), Qf.data(), Kf.data(), v + row0 * E, dnum.data(), E,
                                dden.data(), args);
        for (int64_t t = 0; t < T; ++t) std::copy(&dV[t * E], &dV[t * E] + E, dv + (row0 + t * H) * E);
        feature_backward(dq + row0 * D, dQ.data(), Qf.data(), q + row0 * D, H * D, proj, T, M, D, dp.data());
        feature_backward(dk + row0 * D, dK.data(), Kf.data(), k + row0 * D, H * D, proj, T, M, D, dp.data());
      }
#pragma omp critical
    for (int64_t i = 0; i < M * D; ++i) dproj[i] += dp[i];
  }
}

// The step's logits of q and k together from proj transposed (D,M): for each d, q_d and k_d times
// row d of proj^T, into M-wide sums (64 at a time in registers), then less |x|^2 / 2 as
// feature_logits. proj x as dot products (dot_rows) took a horizontal sum per feature, q's and k's
// apart: 2 M of them a head, more than the products themselves.
void step_logits(float* __restrict fq, float* __restrict fk, const float* __restrict q, const float* __restrict k,
                 const float* __restrict projT, int64_t M, int64_t D) {
  const float s = std::pow(float(D), -0.25f);
  float sq = 0.0f, sk = 0.0f;
#pragma omp simd reduction(+ : sq, sk)
  for (int64_t j = 0; j < D; ++j) sq += q[j] * q[j], sk += k[j] * k[j];
  const float hq = 0.5f * s * s * sq, hk = 0.5f * s * s * sk;
  int64_t m0 = 0;
  for (; m0 + 64 <= M; m0 += 64) {
    f32x16 q0 = {}, q1 = {}, q2 = {}, q3 = {}, k0 = {}, k1 = {}, k2 = {}, k3 = {};
    for (int64_t d = 0; d < D; ++d) {
      const float* p = projT + d * M + m0;
      const f32x16 p0 = load16(p), p1 = load16(p + 16), p2 = load16(p + 32), p3 = load16(p + 48);
      const float qd = q[d], kd = k[d];
      q0 += qd * p0, q1 += qd * p1, q2 += qd * p2, q3 += qd * p3;
      k0 += kd * p0, k1 += kd * p1, k2 += kd * p2, k3 += kd * p3;
    }
    store16(fq + m0, q0 * s - hq), store16(fq + m0 + 16, q1 * s - hq);
    store16(fq + m0 + 32, q2 * s - hq), store16(fq + m0 + 48, q3 * s - hq);
    store16(fk + m0, k0 * s - hk), store16(fk + m0 + 16, k1 * s - hk);
    store16(fk + m0 + 32, k2 * s - hk), store16(fk + m0 + 48, k3 * s - hk);
  }
  if (m0 == M) return;
  std::fill(fq + m0, fq + M, 0.0f), std::fill(fk + m0, fk + M, 0.0f);
  for (int64_t d = 0; d < D; ++d) {
    const float* p = projT + d * M;
    const float qd = q[d], kd = k[d];
#pragma omp simd
    for (int64_t m = m0; m < M; ++m) fq[m] += qd * p[m], fk[m] += kd * p[m];
  }
  for (int64_t m = m0; m < M; ++m) fq[m] = fq[m] * s - hq, fk[m] = fk[m] * s - hk;
}

void performer_step(float* y, PerformerState& st, const float* q, const float* k, const float* v, int64_t D,
                    std::vector<float>& scratch) {
  const int64_t H = st.H, M = st.M, E = st.E;
  scratch.resize(static_cast<size_t>(2 * M * H));
  // heads in parallel when the state is large (each core streams its heads through its L2)
#pragma omp parallel for schedule(static) if (H * M * E >= kStepParallelFloats)
  for (int64_t h = 0; h < H; ++h) {
    float *fq = scratch.data() + 2 * M * h, *fk = fq + M;
    float* S = &st.S[h * M * E];
    float* z = &st.z[h * M];
    step_logits(fq, fk, q + h * D, k + h * D, st.projT.data(), M, D);
    const float mnew = std::max(st.kmax[h], row_max(fk, M));
    const float shrink = std::exp(st.kmax[h] - mnew);
    st.kmax[h] = mnew;
    const float qmax = row_max(fq, M);
    float den = 0.0f;
    // features: fk = e^{logit - running key max} / sqrt(M) (the state holds phi(k) e^{-kmax}, as
    // the parallel form's), fq = e^{logit - row max} (its scale cancels in y)
    const float inv_sqrt_m = 1.0f / std::sqrt(float(M));
    for (int64_t m = 0; m < M; ++m) {
      fk[m] = exp_fast(fk[m] - mnew) * inv_sqrt_m, fq[m] = exp_fast(fq[m] - qmax);
      z[m] = z[m] * shrink + fk[m];
      den += fq[m] * z[m];
    }
    float* yr = y + h * E;
    state_step(S, yr, fk, fq, v + h * E, shrink, M, E);  // S = shrink S + fk v^T; y = fq^T S
    for (int64_t e = 0; e < E; ++e) yr[e] /= den;
  }
}

std::vector<float> orthogonal_gaussian_features(int64_t M, int64_t D, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  std::vector<float> out(static_cast<size_t>(M * D));
  std::vector<double> G(static_cast<size_t>(D * D));
  for (int64_t r0 = 0; r0 < M; r0 += D) {
    for (double& g : G) g = normal(rng);
    // Orthonormalise the rows (modified Gram-Schmidt, twice for full float64 orthogonality).
    for (int pass = 0; pass < 2; ++pass)
      for (int64_t i = 0; i < D; ++i) {
        double* gi = &G[i * D];
        for (int64_t j = 0; j < i; ++j) {
          const double* gj = &G[j * D];
          double dot = 0;
          for (int64_t x = 0; x < D; ++x) dot += gi[x] * gj[x];
          for (int64_t x = 0; x < D; ++x) gi[x] -= dot * gj[x];
        }
        double nrm = 0;
        for (int64_t x = 0; x < D; ++x) nrm += gi[x] * gi[x];
        nrm = std::sqrt(nrm);
        for (int64_t x = 0; x < D; ++x) gi[x] /= nrm;
      }
    for (int64_t i = 0; i < D && r0 + i < M; ++i) {
      double chi = 0;  // |g| for g ~ N(0, I_D): chi distributed with D degrees of freedom
      for (int64_t x = 0; x < D; ++x) {
        const double g = normal(rng);
        chi += g * g;
      }
      chi = std::sqrt(chi);
      for (int64_t x = 0; x < D; ++x) out[(r0 + i) * D + x] = float(G[i * D + x] * chi);
    }
  }
  return out;
}

namespace {


// The causal form on the gated chunked kernels of kernels/decay_chunk.h. The running key max is a
// decay: with g_t the largest key logit up to t, the state held as S_t = sum_s e^{l_s - g_t} v_s^T
// (features of keys e^{l_s - g_s} / sqrt(M), the parallel form's) follows
//   S_t = e^{g_{t-1} - g_t} S_{t-1} + phi(k_t) v_t^T,
// a gated recurrence with one log decay a step, g_{t-1} - g_t <= 0, shared by the M features. The
// state's own scale enters before step 0: S0' = e^{kmax0 - g_0} S0 (z0 alike), so the first step's
// log decay is 0 and a kmax0 of -1e38 (no state) never meets the chunk's cumulative sums. The
// normaliser Z_t = e^{g_{t-1} - g_t} Z_{t-1} + phi(k_t) runs in the chunk epilogue beside the kernel's
// num_t = phi(q_t)^T S_t, giving y_t = num_t / (phi(q_t) . Z_t) while the rows are in cache. The
// shifts cancel between numerator and denominator, so for the gradient g is a constant (the
// kernel's decay gradient is not used): the kernel gives d phi(q), d phi(k), dv and dS0'; the
// normaliser adds dden_t Z_t to d phi(q)_t and sum_{t >= s} (decayed) dden_t phi(q_t) + dfinal.z to
// d phi(k)_s; then the feature map's gradient as performer_backward's, and the final kmax's
// own gradient into the logit that attains it.
TensorMap performer_causal_run(const Call& c, const Tensor* dy) {
  const AttnDims d = attn_dims(c);
  const int64_t B = d.B, T = d.T, H = d.H, D = d.D, E = d.E, M = c.d("M");
  const float *q = c.t("q").ptr(), *k = c.t("k").ptr(), *v = c.t("v").ptr(), *proj = c.t("proj").ptr();
  TensorMap out;
  out.emplace("y", Tensor::uninitialized({B, T, H, E}));
  out.emplace("state.S", Tensor({B, H, M, E}));
  out.emplace("state.z", Tensor({B, H, M}));
  out.emplace("state.kmax", Tensor({B, H}));
  const bool with_s0 = c.has("state.S");
  if (dy) {
    out.emplace("dq", Tensor::uninitialized({B, T, H, D}));
    out.emplace("dk", Tensor::uninitialized({B, T, H, D}));
    out.emplace("dv", Tensor::uninitialized({B, T, H, E}));
    out.emplace("dproj", Tensor({M, D}));
    if (with_s0) {
      out.emplace("dstate.S", Tensor({B, H, M, E}));
      out.emplace("dstate.z", Tensor({B, H, M}));
      out.emplace("dstate.kmax", Tensor({B, H}));
    }
  }
  const float* dzT = c.has("dfinal.z") ? c.t("dfinal.z").ptr() : nullptr;
  const float* dkmT = c.has("dfinal.kmax") ? c.t("dfinal.kmax").ptr() : nullptr;
  const bool final_grad = dy && (c.has("dfinal.S") || dzT || dkmT);
  struct Head {  // a head's normaliser and the facts of its running max
    std::vector<float> Z, dden;
    float kmax0 = kEmptyMax, s0 = 0.0f, gT = kEmptyMax;  // s0 = e^{kmax0 - g_0}; gT: the final max
    int64_t arg_s = -1;  // the first row whose key logits reach gT (-1: kmax0 itself)
    const float *Qf = nullptr, *Kf = nullptr;  // the features (T,M): the head's buffers or the kept forward's
  };
  std::vector<Head> heads(size_t(B * H));
  float* py = out.at("y").ptr();
  auto prep = [&](GatedHead& z) {
    const int64_t bh = z.b * H + z.h, row0 = z.b * T * H + z.h;
    Head& hd = heads[size_t(bh)];
    hd.kmax0 = c.has("state.kmax") ? c.t("state.kmax").ptr()[bh] : kEmptyMax;
    z.g.resize(size_t(T)), z.dg.resize(size_t(T));
    // the features and the running max g_t: a kept forward's (the backward on it), or made here
    // (the running max in dg until the backward writes dg there), kept when the forward keeps:
    // 2 T M + T floats a head, where making them again costs two GEMMs and 2 T M exps
    const size_t own = size_t(2 * T * M + T);
    const float* run = nullptr;
    if (z.kept && z.kept->own.size() == own) {
      hd.Qf = z.kept->own.data(), hd.Kf = hd.Qf + T * M, run = hd.Kf + T * M;
    } else {
      // a forward makes them in the thread's buffers and runs the head at once (z.alone: the next
      // head's prep reuses them; 8 MiB of features a head at T 4096, M 256, where every head kept
      // its own until the heads ran side by side); the backward keeps each head's until its post
      // (a forward that keeps them makes them straight into what it keeps)
      thread_local scratch_vector<float> fq, fk;
      float *Qf = nullptr, *Kf = nullptr, *rn = z.dg.data();
      if (z.keeping) {
        std::vector<float>& o = z.keeping->own;
        o.resize(own);
        Qf = o.data(), Kf = Qf + T * M, rn = Kf + T * M;
      } else if (dy) {
        z.q.resize(size_t(T * M)), z.k.resize(size_t(T * M));
        Qf = z.q.data(), Kf = z.k.data();
      } else {
        fq.resize(size_t(T * M)), fk.resize(size_t(T * M));
        Qf = fq.data(), Kf = fk.data();
      }
      z.alone = !dy;
      uint32_t* bad = z.unchecked ? &z.bad : nullptr;  // the forward's unchecked q, k: checked here
      if (bad) z.self_checked = {q, k};
      head_features(Qf, Kf, rn, q, k, proj, row0, T, H, D, M, true, hd.kmax0, bad);
      hd.Qf = Qf, hd.Kf = Kf, run = rn;
    }
    hd.gT = T > 0 ? run[T - 1] : hd.kmax0;
    hd.s0 = T > 0 ? std::exp(hd.kmax0 - run[0]) : 1.0f;
    hd.arg_s = -1;
    if (!(with_s0 && hd.kmax0 == hd.gT)) {
      hd.arg_s = 0;
      while (hd.arg_s < T - 1 && run[hd.arg_s] < hd.gT) ++hd.arg_s;
    }
    for (int64_t t = 0; t < T; ++t) z.g[size_t(t)] = t == 0 ? 0.0f : run[t - 1] - run[t];
    z.S0 = head_state(c, "S", bh, M * E);
    for (float& x : z.S0) x *= hd.s0;
    hd.Z = head_state(c, "z", bh, M);
    for (float& x : hd.Z) x *= hd.s0;
    z.iq = hd.Qf, z.ik = hd.Kf, z.iv = v + row0 * E, z.ig = z.g.data(), z.oy = py + row0 * E;
    z.ld = {M, M, H * E, 1, H * E};
    z.ld.g_row = true;
    if (dy) {
      z.dy.resize(size_t(T * E)), hd.dden.resize(size_t(T));
      z.dq.resize(size_t(T * M)), z.dk.resize(size_t(T * M));
      z.odq = z.dq.data(), z.odk = z.dk.data(), z.odv = out.at("dv").ptr() + row0 * E, z.odg = z.dg.data();
      z.od = {M, M, H * E, 1, 0};
      z.od.g_row = true;
    }
    const float* gy = dy ? dy->ptr() + row0 * E : nullptr;
    float *kdy = dy ? z.dy.data() : nullptr, *yh = py + row0 * E;
    const float *Qf = hd.Qf, *Kf = hd.Kf, *lg = z.g.data();
    z.epilogue = [&hd, Qf, Kf, lg, gy, kdy, yh, M, E, H](int64_t t0, int64_t n, const float*, const float*) {
      float* Z = hd.Z.data();
      for (int64_t t = t0; t < t0 + n; ++t) {
        const float a = std::exp(lg[t]), *qr = Qf + t * M, *kr = Kf + t * M;
        float den = 0.0f;
#pragma omp simd reduction(+ : den)
        for (int64_t m = 0; m < M; ++m) Z[m] = a * Z[m] + kr[m], den += qr[m] * Z[m];
        const float r = 1.0f / den;
        float* yr = yh + t * H * E;
        if (gy) {
          const float* g = gy + t * H * E;
          float* dn = kdy + t * E;
          float gn = 0.0f;
#pragma omp simd reduction(+ : gn)
          for (int64_t e = 0; e < E; ++e) gn += g[e] * yr[e], dn[e] = g[e] * r;
          hd.dden[size_t(t)] = -gn * r * r;
        }
#pragma omp simd
        for (int64_t e = 0; e < E; ++e) yr[e] *= r;
      }
    };
    z.ld.epilogue = &z.epilogue;
  };
  auto dot = [](const float* a, const float* b, int64_t n) {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
    return s;
  };
  std::vector<float> dps;  // (B H, M, D): each head's dproj (a local: the heads run on the threads)
  auto post = [&](GatedHead& z) {
    const int64_t bh = z.b * H + z.h, row0 = z.b * T * H + z.h;
    Head& hd = heads[size_t(bh)];
    put_state(out, "state.S", z.S, bh);
    put_state(out, "state.z", hd.Z, bh);
    out.at("state.kmax").ptr()[bh] = hd.gT;
    if (!dy) return;
    const float *Qf = hd.Qf, *Kf = hd.Kf, *lg = z.g.data(), *dd = hd.dden.data();
    float *dQ = z.dq.data(), *dK = z.dk.data();
    // the normaliser: dphi(q)_t += dden_t Z_t (Z rebuilt as the epilogue ran it)
    std::vector<float> Z = head_state(c, "z", bh, M), R(size_t(M), 0.0f);
    for (float& x : Z) x *= hd.s0;
    for (int64_t t = 0; t < T; ++t) {
      const float a = std::exp(lg[t]), *kr = Kf + t * M;
      float* dq = dQ + t * M;
#pragma omp simd
      for (int64_t m = 0; m < M; ++m) Z[size_t(m)] = a * Z[size_t(m)] + kr[m], dq[m] += dd[t] * Z[size_t(m)];
    }
    // dphi(k)_s += R_s = (dfinal.z + sum_{t >= s} dden_t phi(q_t)) decayed from t to s
    if (dzT) std::copy(dzT + bh * M, dzT + (bh + 1) * M, R.begin());
    for (int64_t t = T - 1; t >= 0; --t) {
      const float a = std::exp(lg[t]), *qr = Qf + t * M;
      float* dk = dK + t * M;
#pragma omp simd
      for (int64_t m = 0; m < M; ++m) R[size_t(m)] += dd[t] * qr[m], dk[m] += R[size_t(m)], R[size_t(m)] *= a;
    }
    // the final max g_T's own gradient: dfinal.kmax - <dfinal.S, S_T> - <dfinal.z, z_T>
    float Rg = 0.0f;
    if (final_grad) {
      Rg = (dkmT ? dkmT[bh] : 0.0f) - (dzT ? dot(dzT + bh * M, hd.Z.data(), M) : 0.0f);
      if (c.has("dfinal.S")) Rg -= dot(c.t("dfinal.S").ptr() + bh * M * E, z.S.data(), M * E);
    }
    if (with_s0) {  // S0' = s0 S0: dS0 = s0 dS0'; kmax0 scales both: dkmax0 = <S0, dS0> + <z0, dz0>
      float *dS0 = out.at("dstate.S").ptr() + bh * M * E, *dz0 = out.at("dstate.z").ptr() + bh * M;
      const float *S0 = c.t("state.S").ptr() + bh * M * E, *z0 = c.t("state.z").ptr() + bh * M;
      for (int64_t i = 0; i < M * E; ++i) dS0[i] = hd.s0 * z.dS0[size_t(i)];
      for (int64_t m = 0; m < M; ++m) dz0[m] = hd.s0 * R[size_t(m)];
      out.at("dstate.kmax").ptr()[bh] = dot(S0, dS0, M * E) + dot(z0, dz0, M) + (hd.arg_s < 0 ? Rg : 0.0f);
    }
    int64_t arg_m = -1;
    if (final_grad && hd.arg_s >= 0) {  // the logit of row arg_s that is g_T
      thread_local std::vector<float> l;
      l.resize(size_t(M));
      feature_logits(l.data(), k + (row0 + hd.arg_s * H) * D, H * D, 1, proj, M, D);
      arg_m = std::max_element(l.begin(), l.end()) - l.begin();
    }
    // the feature map, queries then keys (with the final kmax's logit); the head's share of dproj
    // in its own slot, summed over the heads in their order below (as they finished: the sum's
    // rounding changed from run to run)
    float* dp = dps.data() + bh * M * D;
    std::fill(dp, dp + M * D, 0.0f);
    feature_backward(out.at("dq").ptr() + row0 * D, dQ, Qf, q + row0 * D, H * D, proj, T, M, D, dp);
    feature_backward(out.at("dk").ptr() + row0 * D, dK, Kf, k + row0 * D, H * D, proj, T, M, D, dp,
                     arg_m >= 0 ? hd.arg_s * M + arg_m : -1, Rg);
  };
  if (dy) dps.resize(size_t(B * H * M * D));
  gated_heads(c, dy, M, E, false, prep, post);
  if (dy) {
    float* dproj = out.at("dproj").ptr();
    for (int64_t bh = 0; bh < B * H; ++bh)
      for (int64_t i = 0; i < M * D; ++i) dproj[i] += dps[size_t(bh * M * D + i)];
  }
  return out;
}

MixerSpec make_spec() {
  MixerSpec s;
  s.name = "performer";
  s.blocking = {{"T", kLinearChunk}};
  // the causal form's chunked product (chunked_product_flops; non-causal: fewer)
  // with M features in place of D, plus the feature logits of q and k (2 T M D each)
  s.flops = [](const std::map<std::string, int64_t>& d, bool) {
    const double T = double(d.at("T")), H = double(d.at("H")), D = double(d.at("D")), E = double(d.at("E"));
    return chunked_product_flops(T, H, double(d.at("M")), E) + H * 2 * 2 * T * double(d.at("M")) * D;
  };
  s.own_dims = [](std::map<std::string, int64_t>& d, Scale scale, bool) {
    d["M"] = scale == Scale::Test ? 7 : scale == Scale::Grad ? 3 : scale == Scale::Demo ? 32 : 64;
  };
  // |q|, |k| ~ 10 (5 for the gradients): feature logits near -100 .. +40, outside float32's exp
  // range without the max shifts, inside float64's (keys at +-60 would underflow even float64:
  // the formula itself is 0/0 there)
  s.stress = [](TensorMap& in, bool for_grad) {
    for (const char* name : {"q", "k"})
      for (float& x : in[name].data) x *= for_grad ? 5.0f : 10.0f;
  };
  s.paper = "Choromanski et al. 2021, Rethinking Attention with Performers (FAVOR+)";
  s.summary = "softmax-kernel attention through M positive random features";
  s.inputs = {{"q", "B,T,H,D"}, {"k", "B,T,H,D"}, {"v", "B,T,H,E"}, {"proj", "M,D"}};
  s.state = {{"S", "B,H,M,E"}, {"z", "B,H,M"}, {"kmax", "B,H"}};
  s.state_size = "H M (E + 1) + H per sequence (S, z scaled by exp(-kmax))";
  s.time = "O(T H M (D + E))";
  s.memory = "O(T M) per head (features) + O(chunk^2 + M E)";
  s.example_fix = [](TensorMap& in) {  // a real feature draw instead of plain N(0,1) rows
    const int64_t M = in["proj"].dim(0), D = in["proj"].dim(1);
    in["proj"].data = orthogonal_gaussian_features(M, D, 42);
  };
  s.y_dims = "B,T,H,E";
  // the causal form starts from (S, z, kmax) in every mode and returns the final state
  s.state_all_modes = true;
  s.state_fix = [](TensorMap& st) {
    for (float& x : st["state.z"].data) x = std::abs(x) + 0.5f;  // a sum of positive features: > 0
    // kmax spread (N(1, 2^2)) over the key logits' range: in some heads the state's scale stays
    // the largest (the final kmax is the state's), in others a key logit takes over
    for (float& x : st["state.kmax"].data) x = 1.0f + 2.0f * x;
  };
  set_reference(s, [](const Call& c, const auto& x) {
    using S = scalar_of<decltype(x)>;
    const AttnDims d = attn_dims(c);
    const int64_t M = c.d("M"), BH = d.B * d.H, ny = d.B * d.T * d.H * d.E;
    std::vector<S> y(ny + (c.causal ? BH * (M * d.E + M + 1) : 0));
    S* fin = y.data() + ny;
    ref::performer_ref<S>(y.data(), x.at("q").data(), x.at("k").data(), x.at("v").data(), x.at("proj").data(), d, M,
                          c.causal, opt_in(x, "state.S"), opt_in(x, "state.z"), opt_in(x, "state.kmax"),
                          c.causal ? fin : nullptr, fin + BH * M * d.E, fin + BH * (M * d.E + M));
    return y;
  });
  // the non-causal forms (the causal ones: set_causal_forms below)
  s.parallel = [](const Call& c) {
    LINMIX_CHECK(!c.causal, "performer: the causal form is performer_causal_run");
    const AttnDims d = attn_dims(c);
    Tensor y({d.B, d.T, d.H, d.E});
    performer_forward(y.ptr(), c.t("q").ptr(), c.t("k").ptr(), c.t("v").ptr(), c.t("proj").ptr(), d, c.d("M"));
    return TensorMap{{"y", std::move(y)}};
  };
  s.backward = [](const Call& c, const Tensor& dy) {
    LINMIX_CHECK(!c.causal, "performer: the causal form is performer_causal_run");
    const AttnDims d = attn_dims(c);
    const int64_t M = c.d("M");
    Tensor y({d.B, d.T, d.H, d.E}), dq({d.B, d.T, d.H, d.D}), dk({d.B, d.T, d.H, d.D}), dv({d.B, d.T, d.H, d.E}),
        dproj({M, d.D});
    const float *q = c.t("q").ptr(), *k = c.t("k").ptr(), *v = c.t("v").ptr(), *proj = c.t("proj").ptr();
    performer_forward(y.ptr(), q, k, v, proj, d, M);
    performer_backward(dq.ptr(), dk.ptr(), dv.ptr(), dproj.ptr(), q, k, v, proj, dy.ptr(), d, M);
    TensorMap out;
    out["y"] = std::move(y), out["dq"] = std::move(dq), out["dk"] = std::move(dk), out["dv"] = std::move(dv);
    out["dproj"] = std::move(dproj);
    return out;
  };
  set_causal_forms(s, performer_causal_run);  // the causal form on the gated chunked kernels
  s.stepper = [](const Call& c) {
    const AttnDims d = attn_dims(c);
    const int64_t M = c.d("M");
    auto st = std::make_shared<PerformerState>(PerformerState{d.H, M, d.E, std::vector<float>(d.H * M * d.E, 0.0f),
                                                              std::vector<float>(d.H * M, 0.0f),
                                                              std::vector<float>(d.H, kEmptyMax), {}});
    const Tensor& P = c.t("proj");  // (M,D), fixed for the stepper's life: transposed once
    st->projT.resize(size_t(M * d.D));
    for (int64_t m = 0; m < M; ++m)
      for (int64_t j = 0; j < d.D; ++j) st->projT[j * M + m] = P.data[m * d.D + j];
    auto scratch = std::make_shared<std::vector<float>>();
    const float *q = c.t("q").ptr(), *k = c.t("k").ptr(), *v = c.t("v").ptr();
    const int64_t D = d.D;
    auto save = [=] {
      return TensorMap{{"state.S", state_tensor({1, st->H, st->M, st->E}, st->S)},
                       {"state.z", state_tensor({1, st->H, st->M}, st->z)},
                       {"state.kmax", state_tensor({1, st->H}, st->kmax)}};
    };
    auto load = [=](const TensorMap& m) {
      state_load(st->S, m, "state.S"), state_load(st->z, m, "state.z"), state_load(st->kmax, m, "state.kmax");
    };
    return Stepper{[=](float* y) { performer_step(y, *st, q, k, v, D, *scratch); }, save, load};
  };
  return s;
}

}  // namespace

MixerSpec performer_spec() { return make_spec(); }

}  // namespace linmix
