// Dense layers of the language model, llm.c style: <layer>_forward / <layer>_backward pairs
// on row-major buffers of N = B*T rows. Activation gradients are written (=), parameter
// gradients accumulate (+=). GEMMs go to OpenBLAS.
#pragma once
#include <algorithm>
#include <array>
#include <cstdint>

namespace linmix::nn {

// Element-wise passes (and row-wise ones) run over threads from this many elements up.
constexpr int64_t kParallelMin = 1 << 15;

// Parameter gradients that are sums over rows: out[k][c] += sum over i of term(i, c)[k] for the
// N rows and C columns (out[k] null: that sum dropped). Blocks of columns run over threads and
// every column is summed in row order: the same bits for any thread count. The norms' weights,
// the token-shift mixes, the short convolution's taps.
template <int K, class Term>
void column_sums(const std::array<float*, K>& out, int64_t N, int64_t C, Term term) {
  constexpr int64_t kCols = 32;
#pragma omp parallel for schedule(static) if (N * C >= kParallelMin)
  for (int64_t c0 = 0; c0 < C; c0 += kCols) {
    const int64_t nc = std::min(kCols, C - c0);
    float s[K][kCols] = {};
    for (int64_t i = 0; i < N; ++i)
      for (int64_t c = 0; c < nc; ++c) {
        const std::array<float, K> v = term(i, c0 + c);
        for (int k = 0; k < K; ++k) s[k][c] += v[k];
      }
    for (int k = 0; k < K; ++k)
      if (out[k])
        for (int64_t c = 0; c < nc; ++c) out[k][c0 + c] += s[k][c];
  }
}

// out (N,OC) = in (N,IC) W^T (+ bias);  W: (OC,IC), bias: (OC) or null.
void matmul_forward(float* out, const float* in, const float* W, const float* bias, int64_t N, int64_t IC,
                    int64_t OC);
// din (N,IC) = dout W (written; or added when accumulate), dW += dout^T in, dbias += sum dout.
void matmul_backward(float* din, float* dW, float* dbias, const float* dout, const float* in, const float* W,
                     int64_t N, int64_t IC, int64_t OC, bool accumulate = false);

// LayerNorm over C (eps 1e-5): out = (x - mean) rstd * w + b; mean, rstd: (N) saved.
void layernorm_forward(float* out, float* mean, float* rstd, const float* x, const float* w, const float* b,
                       int64_t N, int64_t C);
// dx += (accumulates, as it feeds a residual stream), dw += , db +=
void layernorm_backward(float* dx, float* dw, float* db, const float* dout, const float* x, const float* w,
                        const float* mean, const float* rstd, int64_t N, int64_t C);

// RMSNorm over C (eps 1e-5, no bias; Mamba's): out = x rstd * w; rstd (N) saved.
void rmsnorm_forward(float* out, float* rstd, const float* x, const float* w, int64_t N, int64_t C);
void rmsnorm_backward(float* dx, float* dw, const float* dout, const float* x, const float* w, const float* rstd,
                      int64_t N, int64_t C);  // dx +=, dw +=

// GELU, tanh approximation (as GPT-2).
void gelu_forward(float* out, const float* x, int64_t n);
void gelu_backward(float* dx, const float* x, const float* dout, int64_t n);  // dx written

// Token shift: out[b,t] = x[b,t-1], zeros at t = 0. x, out: (B,T,C).
void shift_forward(float* out, const float* x, int64_t B, int64_t T, int64_t C);
// dx[b,t] += dout[b,t+1]
void shift_backward(float* dx, const float* dout, int64_t B, int64_t T, int64_t C);

// Mamba's short convolution: causal, depthwise, kernel 4, over (B,T,E) rows:
// out[t,c] = b[c] + sum_j w[c,j] x[t-3+j, c] (rows before the sequence start are zeros).
void conv4_forward(float* out, const float* x, const float* w, const float* b, int64_t B, int64_t T, int64_t E);
// dx += , dw += , db +=
void conv4_backward(float* dx, float* dw, float* db, const float* dout, const float* x, const float* w, int64_t B,
                    int64_t T, int64_t E);

// Cross-entropy of logits (N,V) against targets (N, -1 = ignored): returns the summed loss and
// the number of counted rows; dlogits (N,V) = (softmax - onehot) * scale where counted.
double crossentropy_forward_backward(float* dlogits, const float* logits, const int32_t* targets, int64_t N,
                                     int64_t V, float scale, int64_t* counted);

}  // namespace linmix::nn
