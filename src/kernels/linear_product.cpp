#include "linear_product.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels/blas.h"
#include "kernels/transpose.h"
#include "kernels/vmath.h"
#include "linmix/error.h"

namespace linmix {

// The small products of the chunked forms go to OpenBLAS (C += A B with beta = 1). Called from
// inside the mixers' OpenMP loops over (batch, head), where the OpenMP build of OpenBLAS runs
// each product on the calling thread. The backward passes run these products on time-reversed
// views (negative leading dimensions), which BLAS does not take: such operands are first
// copied into contiguous per-thread buffers (O(rows x cols), against the O(m n k) product).
namespace {

// A (rows, cols) view with row stride ld, as a BLAS operand: itself when ld >= cols, else a
// contiguous copy in buf.
const float* operand(const float* A, int64_t rows, int64_t cols, int64_t ld, std::vector<float>& buf, int64_t& ld_out) {
  if (ld >= cols) {
    ld_out = ld;
    return A;
  }
  buf.resize(static_cast<size_t>(rows * cols));
  for (int64_t i = 0; i < rows; ++i) std::copy(A + i * ld, A + i * ld + cols, buf.data() + i * cols);
  ld_out = cols;
  return buf.data();
}

constexpr int64_t kSmallTransposed = 128 * 128;  // B (n,k) small enough to transpose per call

// C (m,n, row stride ldc) += op(A) op(B), op(A): (m,k), op(B): (k,n); A stored (ar, ac), B (br, bc).
void gemm_acc(bool ta, bool tb, float* C, const float* A, const float* B, int64_t m, int64_t n, int64_t k,
              int64_t lda, int64_t ldb, int64_t ldc) {
  if (m == 0 || n == 0 || k == 0) return;
  thread_local std::vector<float> pa, pb, pc;
  int64_t la, lb;
  const float* a = operand(A, ta ? k : m, ta ? m : k, lda, pa, la);
  const float* b = operand(B, tb ? n : k, tb ? k : n, ldb, pb, lb);
  float* c = C;
  int64_t lc = ldc;
  if (ldc < n) {  // a reversed output view: accumulate into a contiguous copy, then write back
    pc.resize(static_cast<size_t>(m * n));
    for (int64_t i = 0; i < m; ++i) std::copy(C + i * ldc, C + i * ldc + n, pc.data() + i * n);
    c = pc.data(), lc = n;
  }
  if (tb && !ta && m >= 8 && n * k <= kSmallTransposed) {
    // OpenBLAS 0.3.21 runs a small row-major A B^T through its packing path (8.4 us at 64^3 on
    // this machine, against 2.7 us for A B through its small-matrix kernel): B is transposed into
    // a per-thread buffer (about 1 us at 64 x 64) and the product taken as A B.
    thread_local std::vector<float> pt;
    pt.resize(static_cast<size_t>(n * k));
    transpose(pt.data(), n, b, lb, n, k);
    b = pt.data(), lb = n, tb = false;
  }
  blas::sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, int(m), int(n), int(k),
              1.0f, a, int(la), b, int(lb), 1.0f, c, int(lc));
  if (c != C)
    for (int64_t i = 0; i < m; ++i) std::copy(pc.data() + i * n, pc.data() + (i + 1) * n, C + i * ldc);
}

}  // namespace

void gemm_nt_acc(float* C, const float* A, const float* B, int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb,
                 int64_t ldc) {
  gemm_acc(false, true, C, A, B, m, n, k, lda, ldb, ldc);
}

void gemm_nn_acc(float* C, const float* A, const float* B, int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb,
                 int64_t ldc) {
  gemm_acc(false, false, C, A, B, m, n, k, lda, ldb, ldc);
}

void gemm_tn_acc(float* C, const float* A, const float* B, int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb,
                 int64_t ldc) {
  gemm_acc(true, false, C, A, B, m, n, k, lda, ldb, ldc);
}

void gemm_nn(float* C, const float* A, const float* B, int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb,
             int64_t ldc, float alpha, float beta) {
  if (m == 0 || n == 0) return;
  LINMIX_CHECK(lda >= k && ldb >= n && ldc >= n, "gemm_nn: row strides must be at least the rows' widths");
  blas::sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(m), int(n), int(k), alpha, A, int(lda), B, int(ldb), beta,
              C, int(ldc));
}

void gemm_nt(float* C, const float* A, const float* B, int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb,
             int64_t ldc, float alpha, float beta) {
  if (m == 0 || n == 0) return;
  LINMIX_CHECK(lda >= k && ldb >= k && ldc >= n, "gemm_nt: row strides must be at least the rows' widths");
  blas::sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(m), int(n), int(k), alpha, A, int(lda), B, int(ldb), beta, C,
              int(ldc));
}

void gemm_tn(float* C, const float* A, const float* B, int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb,
             int64_t ldc, float alpha, float beta) {
  if (m == 0 || n == 0) return;
  LINMIX_CHECK(lda >= m && ldb >= n && ldc >= n, "gemm_tn: row strides must be at least the rows' widths");
  blas::sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, int(m), int(n), int(k), alpha, A, int(lda), B, int(ldb), beta, C,
              int(ldc));
}

void linear_product(float* y, float* den, const float* q, const float* k, const float* v, const LinearProductArgs& a,
                    const float* g) {
  const int64_t T = a.T, D = a.D, E = a.E;
  // S: (D,E) running sum of k v^T; z: (D) running sum of k; A: (chunk,chunk) intra-chunk
  // scores; Ks: (chunk,D) keys scaled by e^{g_j - g_last} (only with g).
  std::vector<float> S(D * E, 0.0f), z(D, 0.0f), A(kLinearChunk * kLinearChunk), Ks(g ? kLinearChunk * D : 0);
  if (a.S0) std::copy(a.S0, a.S0 + D * E, S.begin());
  if (a.z0) std::copy(a.z0, a.z0 + D, z.begin());
  float g_state = g && T > 0 ? (a.S0 ? a.g0 : g[0]) : 0.0f;  // the state is scaled by e^{-g_state}
  auto absorb = [&](int64_t t0, int64_t n) {  // S += K^T V, z += sum K over rows [t0, t0+n)
    const float* kk = k + t0 * a.ldk;
    int64_t ldk = a.ldk;
    if (g) {
      const float gl = g[t0 + n - 1], f = exp_fast(g_state - gl);
      for (float& s : S) s *= f;
      for (float& s : z) s *= f;
      for (int64_t j = 0; j < n; ++j) {
        const float fj = exp_fast(g[t0 + j] - gl);
        for (int64_t x = 0; x < D; ++x) Ks[j * D + x] = kk[j * a.ldk + x] * fj;
      }
      kk = Ks.data(), ldk = D, g_state = gl;
    }
    gemm_tn_acc(S.data(), kk, v + t0 * a.ldv, D, E, n, ldk, a.ldv, E);
    for (int64_t j = 0; j < n; ++j)
      for (int64_t x = 0; x < D; ++x) z[x] += kk[j * ldk + x];
  };
  // y rows [t0, t0+n) = Q S (+ masked intra-chunk part); den likewise with z.
  auto emit = [&](int64_t t0, int64_t n, bool intra) {
    for (int64_t i = 0; i < n; ++i) std::fill(y + (t0 + i) * a.ldy, y + (t0 + i) * a.ldy + E, 0.0f);
    gemm_nn_acc(y + t0 * a.ldy, q + t0 * a.ldq, S.data(), n, E, D, a.ldq, E, a.ldy);
    for (int64_t i = 0; i < n; ++i) {
      float d = 0.0f;
      if (den) {
        const float* qi = q + (t0 + i) * a.ldq;
#pragma omp simd reduction(+ : d)
        for (int64_t x = 0; x < D; ++x) d += qi[x] * z[x];
      }
      if (g) {  // the state's scale e^{-g_state} -> the row's e^{-g_i}
        const float f = exp_fast(g_state - g[t0 + i]);
        for (int64_t e = 0; e < E; ++e) y[(t0 + i) * a.ldy + e] *= f;
        d *= f;
      }
      if (den) den[t0 + i] = d;
    }
    if (!intra) return;
    std::fill(A.begin(), A.end(), 0.0f);
    gemm_nt_acc(A.data(), q + t0 * a.ldq, k + t0 * a.ldk, n, n, D, a.ldq, a.ldk, kLinearChunk);
    for (int64_t i = 0; i < n; ++i) {  // causal mask (and decay) inside the chunk, row sums
      float* Ar = A.data() + i * kLinearChunk;
      float d = 0.0f;
      if (g) {
        const float gi = g[t0 + i];
#pragma omp simd
        for (int64_t j = 0; j <= i; ++j) Ar[j] *= exp_fast(g[t0 + j] - gi);
      }
#pragma omp simd reduction(+ : d)
      for (int64_t j = 0; j <= i; ++j) d += Ar[j];
      std::fill(Ar + i + 1, Ar + n, 0.0f);
      if (den) den[t0 + i] += d;
    }
    gemm_nn_acc(y + t0 * a.ldy, A.data(), v + t0 * a.ldv, n, E, n, kLinearChunk, a.ldv, a.ldy);
  };
  if (a.causal) {
    for (int64_t t0 = 0; t0 < T; t0 += kLinearChunk) {
      const int64_t n = std::min(kLinearChunk, T - t0);
      emit(t0, n, true);
      absorb(t0, n);
    }
    if (a.ST) std::copy(S.begin(), S.end(), a.ST);
    if (a.zT) std::copy(z.begin(), z.end(), a.zT);
  } else {
    for (int64_t t0 = 0; t0 < T; t0 += kLinearChunk) absorb(t0, std::min(kLinearChunk, T - t0));
    for (int64_t t0 = 0; t0 < T; t0 += kLinearChunk) emit(t0, std::min(kLinearChunk, T - t0), false);
  }
}

}  // namespace linmix

namespace linmix {

void linear_product_backward(float* dq, float* dk, float* dv, const float* q, const float* k, const float* v,
                             const float* dnum, int64_t lddn, const float* dden, const LinearProductArgs& a,
                             const float* g) {
  const int64_t T = a.T, D = a.D, E = a.E, E1 = E + 1;
  if (T == 0) return;
  // gn = [dnum_t, dden_t], vn = [v_s, 1]: (T, E+1), so (dnum_t . v_s + dden_t) = gn_t . vn_s.
  std::vector<float> gn(T * E1), vn(T * E1), grev;
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t e = 0; e < E; ++e) gn[t * E1 + e] = dnum[t * lddn + e], vn[t * E1 + e] = v[t * a.ldv + e];
    gn[t * E1 + E] = dden ? dden[t] : 0.0f;
    vn[t * E1 + E] = 1.0f;
  }
  // dq_t = sum_{s <= t} w_ts (gn_t . vn_s) k_s: a forward-time product.
  linear_product(dq, nullptr, gn.data(), vn.data(), k, {T, E1, D, E1, E1, a.ldk, D, a.causal}, g);
  // The other two sum over t >= s: run the product on time-reversed views (negative row
  // strides), where the log scale becomes -g reversed (still non-decreasing).
  if (g) {
    grev.resize(T);
    for (int64_t t = 0; t < T; ++t) grev[t] = -g[T - 1 - t];
  }
  // Time-reversed contiguous copies (row i = row T-1-i), made once: BLAS takes no negative
  // strides, and copying per product call cost more than the products.
  auto reversed = [T](const float* src, int64_t ld, int64_t cols) {
    std::vector<float> r(static_cast<size_t>(T * cols));
    for (int64_t i = 0; i < T; ++i) std::copy(src + (T - 1 - i) * ld, src + (T - 1 - i) * ld + cols, r.data() + i * cols);
    return r;
  };
  const std::vector<float> vr = reversed(vn.data(), E1, E1), gr = reversed(gn.data(), E1, E1),
                           qr = reversed(q, a.ldq, D), kr = reversed(k, a.ldk, D), dr = reversed(dnum, lddn, E);
  std::vector<float> out(static_cast<size_t>(T * std::max(D, E)));
  // dk_s = sum_{t >= s} w_ts (vn_s . gn_t) q_t
  linear_product(out.data(), nullptr, vr.data(), gr.data(), qr.data(), {T, E1, D, E1, E1, D, D, a.causal},
                 g ? grev.data() : nullptr);
  for (int64_t i = 0; i < T; ++i) std::copy(&out[i * D], &out[(i + 1) * D], dk + (T - 1 - i) * D);
  // dv_s = sum_{t >= s} w_ts (k_s . q_t) dnum_t
  linear_product(out.data(), nullptr, kr.data(), qr.data(), dr.data(), {T, D, E, D, D, E, E, a.causal},
                 g ? grev.data() : nullptr);
  for (int64_t i = 0; i < T; ++i) std::copy(&out[i * E], &out[(i + 1) * E], dv + (T - 1 - i) * E);
}

void linear_product_state_backward(float* dQ, float* dK, float* dV, const float* Qf, const float* Kf, const float* Vh,
                                   int64_t ldv, const float* dnum, const float* dden, int64_t T, int64_t D, int64_t E,
                                   const float* S0, const float* z0, const float* dST, const float* dzT, float* dS0,
                                   float* dz0) {
  if (S0) gemm_nt_acc(dQ, dnum, S0, T, D, E, E, E, D);
  if (z0 && dden)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t x = 0; x < D; ++x) dQ[t * D + x] += dden[t] * z0[x];
  if (dST) {
    gemm_nt_acc(dK, Vh, dST, T, D, E, ldv, E, D);
    gemm_nn_acc(dV, Kf, dST, T, E, D, D, E, E);
  }
  if (dzT)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t x = 0; x < D; ++x) dK[t * D + x] += dzT[x];
  if (dS0) {
    if (dST) std::copy(dST, dST + D * E, dS0);
    else std::fill(dS0, dS0 + D * E, 0.0f);
    gemm_tn_acc(dS0, Qf, dnum, D, E, T, D, E, E);
  }
  if (dz0) {
    if (dzT) std::copy(dzT, dzT + D, dz0);
    else std::fill(dz0, dz0 + D, 0.0f);
    if (dden)
      for (int64_t t = 0; t < T; ++t)
        for (int64_t x = 0; x < D; ++x) dz0[x] += Qf[t * D + x] * dden[t];
  }
}

}  // namespace linmix
