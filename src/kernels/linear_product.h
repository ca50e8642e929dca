// Shared primitive of the linear-attention family (performer, flow, and the non-causal linear and
// norm_linear; their causal forms run on the gated kernels of decay_chunk.h, mixers/linear_forms.h):
// the kernelised product with its normaliser, for one head, in chunked form.
//
//   y_i   = sum_{j in J(i)} (q_i . k_j) v_j          q: (T,D) rows, k: (T,D), v: (T,E), y: (T,E)
//   den_i = sum_{j in J(i)} (q_i . k_j)              den: (T) (optional)
//   J(i)  = {j <= i} when causal, all j otherwise
//
// Causal form (Katharopoulos et al. 2020, eq. 10-12, chunked as in flash-linear-attention):
// chunks of kLinearChunk rows; within a chunk the small masked quadratic A = Q K^T, across
// chunks the running state S = sum k v^T (D,E) and z = sum k (D). Extra memory O(chunk^2 + D E).
// `g`, when given (causal only), is a non-decreasing per-row log scale: every key row j is
// taken as k_j e^{g_j} and every query row i as q_i e^{-g_i}, i.e. A_ij is multiplied by
// e^{g_j - g_i} <= 1 and the carried state is kept scaled by e^{-g} of the last row absorbed.
// Performer passes its running key max here so that nothing overflows and a row underflows
// no more than the recurrent form does.
#pragma once
#include <cstdint>
#include <vector>

namespace linmix {

constexpr int64_t kLinearChunk = 64;

// FLOPs of the causal chunked product for H heads of T rows: Q S and K^T V (2 T Dk E each),
// the intra-chunk Q K^T (2 T c Dk) and the masked scores times V (2 T c E), c = kLinearChunk.
inline double chunked_product_flops(double T, double H, double Dk, double E) {
  const double c = double(kLinearChunk);
  return H * T * (4 * Dk * E + 2 * c * Dk + 2 * c * E);
}

struct LinearProductArgs {
  int64_t T, D, E;
  int64_t ldq, ldk, ldv, ldy;  // row strides in elements
  bool causal;
  // Causal: the state before row 0, S0 (D,E) = sum k v^T and z0 (D) = sum k over the
  // rows before (null: zeros), which every row sees; the final state after row T-1, written to
  // ST, zT where not null (the running state the chunks carry: no extra work). The backward
  // ignores these: linear_product_state_backward adds their part.
  const float* S0 = nullptr;
  const float* z0 = nullptr;
  float* ST = nullptr;
  float* zT = nullptr;
  // With g (performer): S0, z0 are scaled by e^{-g0} (g0 <= g[0]), and ST, zT come out scaled
  // by e^{-g[T-1]}.
  float g0 = 0.0f;
};

void linear_product(float* y, float* den, const float* q, const float* k, const float* v, const LinearProductArgs& a,
                    const float* g = nullptr);

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

// Backward of linear_product for one head. With w_ts = e^{g_s - g_t} (1 without g),
// num_t = sum_s w_ts (q_t . k_s) v_s and den_t = sum_s w_ts (q_t . k_s) over s in J(t):
//   dq_t = sum_{s in J(t)} w_ts (dnum_t . v_s + dden_t) k_s
//   dk_s = sum_{t: s in J(t)} w_ts (dnum_t . v_s + dden_t) q_t
//   dv_s = sum_{t: s in J(t)} w_ts (q_t . k_s) dnum_t
// each computed as one more chunked product (the last two running backwards in time), so
// memory stays O(T (D + E)). dq, dk: (T,D) contiguous; dv: (T,E) contiguous (written, not
// accumulated). dnum: (T,E) with row stride lddn; dden: (T) or null.
void linear_product_backward(float* dq, float* dk, float* dv, const float* q, const float* k, const float* v,
                             const float* dnum, int64_t lddn, const float* dden, const LinearProductArgs& a,
                             const float* g = nullptr);

// The part of the initial and final state (LinearProductArgs S0, z0, ST, zT) in the backward
// of one head of the causal product (linear, norm_linear), given dnum (T,E) and dden (T, or
// null): dq += dnum S0^T + dden z0^T; the final state's gradient into the keys and values,
// dk += V dST^T + 1 dzT^T, dv += K dST; and dS0 = Q^T dnum + dST, dz0 = Q^T dden + dzT (written where not null).
// v: rows of stride ldv.
void linear_product_state_backward(float* dq, float* dk, float* dv, const float* q, const float* k, const float* v,
                                   int64_t ldv, const float* dnum, const float* dden, int64_t T, int64_t D, int64_t E,
                                   const float* S0, const float* z0, const float* dST, const float* dzT, float* dS0,
                                   float* dz0);
// The rows of sequence-head bh in a (B,H,n) state tensor, or null.
inline const float* state_rows(const float* p, int64_t bh, int64_t n) { return p ? p + bh * n : nullptr; }
inline float* state_rows(float* p, int64_t bh, int64_t n) { return p ? p + bh * n : nullptr; }

}  // namespace linmix
