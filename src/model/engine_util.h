// What the RWKV engines (rwkv4_engine.cpp, rwkv_engine.cpp) share: LayerNorm over rows and the
// GEMM of rows against a (possibly quantised) weight matrix.
#pragma once
#include <cblas.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "kernels/gemv.h"
#include "kernels/vmath.h"

namespace linmix::engine {

// exp_fast (kernels/vmath.h, ~1 ulp) so that the loops over channels vectorise
inline float sigmoidf(float x) { return 1.0f / (1.0f + exp_fast(-x)); }

// LayerNorm (eps 1e-5) of N rows, rows in parallel; two passes in float with SIMD partial sums.
inline void layernorm_rows(float* out, const float* x, const float* w, const float* b, int64_t N, int64_t C) {
#pragma omp parallel for schedule(static) if (N > 8)
  for (int64_t i = 0; i < N; ++i) {
    const float* xi = x + i * C;
    float m = 0, v = 0;
#pragma omp simd reduction(+ : m)
    for (int64_t c = 0; c < C; ++c) m += xi[c];
    m /= float(C);
#pragma omp simd reduction(+ : v)
    for (int64_t c = 0; c < C; ++c) v += (xi[c] - m) * (xi[c] - m);
    v /= float(C);
    const float s = 1.0f / std::sqrt(v + 1e-5f);
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) out[i * C + c] = (xi[c] - m) * s * w[c] + b[c];
  }
}

// out (N,OC) (+)= in (N,IC) W^T; a quantised W is expanded into deq first (one GEMM then), and
// one row goes through gemv (the weights streamed once).
inline void matmul(float* out, const float* in, const QMatrix& W, int64_t N, bool accumulate, std::vector<float>& deq) {
  if (N == 1 && !accumulate) return gemv(W, in, out);
  if (N == 1) {  // accumulate through a row of deq (grown once)
    if (deq.size() < size_t(W.rows)) deq.resize(size_t(W.rows));
    gemv(W, in, deq.data());
    for (int64_t i = 0; i < W.rows; ++i) out[i] += deq[size_t(i)];
    return;
  }
  const float* w = W.f32.data();
  if (W.type != WType::F32) {
    deq.resize(size_t(W.rows * W.cols));
    W.to_f32(deq.data());
    w = deq.data();
  }
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(N), int(W.rows), int(W.cols), 1.0f, in, int(W.cols), w,
              int(W.cols), accumulate ? 1.0f : 0.0f, out, int(W.rows));
}

}  // namespace linmix::engine
