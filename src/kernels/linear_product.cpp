#include "linear_product.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels/blas.h"
#include "kernels/transpose.h"
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

void linear_product(float* y, float* den, const float* q, const float* k, const float* v, const LinearProductArgs& a) {
  const int64_t T = a.T, D = a.D, E = a.E;
  std::vector<float> S(D * E);
  gemm_tn(S.data(), k, v, D, E, T, a.ldk, a.ldv, E, 1.0f, 0.0f);  // S = K^T V
  gemm_nn(y, q, S.data(), T, E, D, a.ldq, E, a.ldy, 1.0f, 0.0f);  // y = Q S
  if (!den) return;
  std::vector<float> z(D, 0.0f);
  for (int64_t t = 0; t < T; ++t) {
    const float* kt = k + t * a.ldk;
#pragma omp simd
    for (int64_t x = 0; x < D; ++x) z[x] += kt[x];
  }
  for (int64_t t = 0; t < T; ++t) {
    const float* qt = q + t * a.ldq;
    float d = 0.0f;
#pragma omp simd reduction(+ : d)
    for (int64_t x = 0; x < D; ++x) d += qt[x] * z[x];
    den[t] = d;
  }
}

void linear_product_backward(float* dq, float* dk, float* dv, const float* q, const float* k, const float* v,
                             const float* dnum, int64_t lddn, const float* dden, const LinearProductArgs& a) {
  const int64_t T = a.T, D = a.D, E = a.E;
  if (T == 0) return;
  std::vector<float> S(D * E), dS(D * E), z(D, 0.0f), dz(D, 0.0f);
  gemm_tn(S.data(), k, v, D, E, T, a.ldk, a.ldv, E, 1.0f, 0.0f);      // S = K^T V
  gemm_nt(dq, dnum, S.data(), T, D, E, lddn, E, D, 1.0f, 0.0f);       // dq = dnum S^T
  gemm_tn(dS.data(), q, dnum, D, E, T, a.ldq, lddn, E, 1.0f, 0.0f);   // dS = Q^T dnum
  gemm_nt(dk, v, dS.data(), T, D, E, a.ldv, E, D, 1.0f, 0.0f);        // dk = V dS^T
  gemm_nn(dv, k, dS.data(), T, E, D, a.ldk, E, E, 1.0f, 0.0f);        // dv = K dS
  if (!dden) return;
  for (int64_t t = 0; t < T; ++t) {  // z = sum_t k_t, dz = sum_t dden_t q_t
    const float *kt = k + t * a.ldk, *qt = q + t * a.ldq, g = dden[t];
#pragma omp simd
    for (int64_t x = 0; x < D; ++x) z[x] += kt[x], dz[x] += g * qt[x];
  }
  for (int64_t t = 0; t < T; ++t) {  // dq += dden z^T, dk += 1 dz^T
    const float g = dden[t];
#pragma omp simd
    for (int64_t x = 0; x < D; ++x) dq[t * D + x] += g * z[x], dk[t * D + x] += dz[x];
  }
}

}  // namespace linmix
