// Shared primitive of the non-causal linear-attention family (linear, norm_linear, performer,
// flow; their causal forms run on the gated kernels of decay_chunk.h, mixers/linear_forms.h): the
// kernelised product over every position, with its normaliser, for one head.
//
//   y_i   = sum_j (q_i . k_j) v_j = q_i^T S,  S = K^T V (D,E)     q: (T,D) rows, k: (T,D), v: (T,E), y: (T,E)
//   den_i = sum_j (q_i . k_j)     = q_i . z,  z = sum_j k_j (D)   den: (T) (optional)
//
// Two GEMMs (Katharopoulos et al. 2020, eq. 5-6): O(T D E) time, O(D E) extra memory.
#pragma once
#include <cstdint>
#include <vector>

namespace linmix {

// The chunk of the causal forms (the gated kernels' kDecayChunk), by which the mixers' tests block T.
constexpr int64_t kLinearChunk = 64;

// FLOPs of the causal chunked product for H heads of T rows: Q S and K^T V (2 T Dk E each),
// the intra-chunk Q K^T (2 T c Dk) and the masked scores times V (2 T c E), c = kLinearChunk.
inline double chunked_product_flops(double T, double H, double Dk, double E) {
  const double c = double(kLinearChunk);
  return H * T * (4 * Dk * E + 2 * c * Dk + 2 * c * E);
}

struct LinearProductArgs {
  int64_t T, D, E;
  int64_t ldq, ldk, ldv, ldy;  // row strides in elements, at least the rows' widths
};

void linear_product(float* y, float* den, const float* q, const float* k, const float* v, const LinearProductArgs& a);

// Small dense helpers (row-major, leading dimensions in elements), loops ordered so the
// inner loop runs over contiguous memory.
// C (m,n) += A (m,k) . B (n,k)^T
void gemm_nt_acc(float* C, const float* A, const float* B, int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb,
                 int64_t ldc);
// C (m,n) += A (m,k) . B (k,n)
void gemm_nn_acc(float* C, const float* A, const float* B, int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb,
                 int64_t ldc);
// C (m,n) += A (k,m)^T . B (k,n)
void gemm_tn_acc(float* C, const float* A, const float* B, int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb,
                 int64_t ldc);
// C (m,n) = alpha A (m,k) . B (k,n) + beta C, forward row strides only (lda >= k, ldb >= n, ldc >= n)
void gemm_nn(float* C, const float* A, const float* B, int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb,
             int64_t ldc, float alpha, float beta);
// C (m,n) = alpha A (m,k) . B (n,k)^T + beta C, and C (m,n) = alpha A (k,m)^T . B (k,n) + beta C;
// forward row strides only (beta 0: C is not read)
void gemm_nt(float* C, const float* A, const float* B, int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb,
             int64_t ldc, float alpha, float beta);
void gemm_tn(float* C, const float* A, const float* B, int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb,
             int64_t ldc, float alpha, float beta);

}  // namespace linmix

namespace linmix {

// Backward of linear_product for one head: with S, z recomputed,
//   dq = dnum S^T + dden z^T,  dS = Q^T dnum,  dz = Q^T dden,  dk = V dS^T + 1 dz^T,  dv = K dS
// (five GEMMs). dq, dk: (T,D) contiguous; dv: (T,E) contiguous (written, not accumulated).
// dnum: (T,E) with row stride lddn; dden: (T) or null.
void linear_product_backward(float* dq, float* dk, float* dv, const float* q, const float* k, const float* v,
                             const float* dnum, int64_t lddn, const float* dden, const LinearProductArgs& a);

// The rows of sequence-head bh in a (B,H,n) state tensor, or null.
inline const float* state_rows(const float* p, int64_t bh, int64_t n) { return p ? p + bh * n : nullptr; }
inline float* state_rows(float* p, int64_t bh, int64_t n) { return p ? p + bh * n : nullptr; }

}  // namespace linmix
