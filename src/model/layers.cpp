#include "layers.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels/blas.h"
#include "linmix/profile.h"
#include "../kernels/vmath.h"

namespace linmix::nn {

void matmul_forward(float* out, const float* in, const float* W, const float* bias, int64_t N, int64_t IC,
                    int64_t OC) {
  if (N == 0) return;
  const profile::Scope prof("matmul");
  if (N == 1) {  // one token (the recurrent step): a matrix-vector product, not a GEMM of one row
    if (bias) std::copy(bias, bias + OC, out);
    blas::sgemv(CblasRowMajor, CblasNoTrans, int(OC), int(IC), 1.0f, W, int(IC), in, 1, bias ? 1.0f : 0.0f, out, 1);
    return;
  }
  if (bias) {
    for (int64_t i = 0; i < N; ++i) std::copy(bias, bias + OC, out + i * OC);
  }
  blas::sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(N), int(OC), int(IC), 1.0f, in, int(IC), W, int(IC),
              bias ? 1.0f : 0.0f, out, int(OC));
}

void matmul_backward(float* din, float* dW, float* dbias, const float* dout, const float* in, const float* W,
                     int64_t N, int64_t IC, int64_t OC, bool accumulate) {
  if (N == 0) return;
  const profile::Scope prof("matmul");
  if (din)
    blas::sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(N), int(IC), int(OC), 1.0f, dout, int(OC), W, int(IC),
                accumulate ? 1.0f : 0.0f, din, int(IC));
  blas::sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, int(OC), int(IC), int(N), 1.0f, dout, int(OC), in, int(IC),
              1.0f, dW, int(IC));
  if (dbias)
    for (int64_t i = 0; i < N; ++i)
      for (int64_t o = 0; o < OC; ++o) dbias[o] += dout[i * OC + o];
}

// The norms run rows over threads; their weight gradients (sums over rows) run columns over
// threads (column_sums).

// dw[c] += sum_i g[i, c] xhat[i, c] (and db[c] += sum_i g[i, c] when db), xhat = (x - mean) rstd
// (mean null: 0).
void norm_weight_grads(float* dw, float* db, const float* dout, const float* x, const float* mean, const float* rstd,
                       int64_t N, int64_t C) {
  column_sums<2>({dw, db}, N, C, [&](int64_t i, int64_t c) {
    const float g = dout[i * C + c];
    return std::array<float, 2>{g * ((x[i * C + c] - (mean ? mean[i] : 0.0f)) * rstd[i]), g};
  });
}

void layernorm_forward(float* out, float* mean, float* rstd, const float* x, const float* w, const float* b,
                       int64_t N, int64_t C) {
  const profile::Scope prof("norm");
#pragma omp parallel for schedule(static) if (N * C >= kParallelMin)
  for (int64_t i = 0; i < N; ++i) {
    const float* xi = x + i * C;
    float m = 0, v = 0;  // two passes: the variance of the centred values (no cancellation)
#pragma omp simd reduction(+ : m)
    for (int64_t c = 0; c < C; ++c) m += xi[c];
    m /= float(C);
#pragma omp simd reduction(+ : v)
    for (int64_t c = 0; c < C; ++c) v += (xi[c] - m) * (xi[c] - m);
    v /= float(C);
    const float s = 1.0f / std::sqrt(v + 1e-5f);
    for (int64_t c = 0; c < C; ++c) out[i * C + c] = (xi[c] - m) * s * w[c] + b[c];
    mean[i] = m, rstd[i] = s;
  }
}

void layernorm_backward(float* dx, float* dw, float* db, const float* dout, const float* x, const float* w,
                        const float* mean, const float* rstd, int64_t N, int64_t C) {
  const profile::Scope prof("norm");
  norm_weight_grads(dw, db, dout, x, mean, rstd, N, C);
#pragma omp parallel for schedule(static) if (N * C >= kParallelMin)
  for (int64_t i = 0; i < N; ++i) {
    const float *g = dout + i * C, *xi = x + i * C;
    // xhat = (x - mean) rstd;  dxhat = g w;
    // dx = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat))
    float m1 = 0.0f, m2 = 0.0f;
    for (int64_t c = 0; c < C; ++c) {
      const float xh = (xi[c] - mean[i]) * rstd[i], dxh = g[c] * w[c];
      m1 += dxh, m2 += dxh * xh;
    }
    m1 /= float(C), m2 /= float(C);
    for (int64_t c = 0; c < C; ++c) {
      const float xh = (xi[c] - mean[i]) * rstd[i];
      dx[i * C + c] += rstd[i] * (g[c] * w[c] - m1 - xh * m2);
    }
  }
}

void rmsnorm_forward(float* out, float* rstd, const float* x, const float* w, int64_t N, int64_t C) {
  const profile::Scope prof("norm");
#pragma omp parallel for schedule(static) if (N * C >= kParallelMin)
  for (int64_t i = 0; i < N; ++i) {
    const float* xi = x + i * C;
    float ms = 0.0f;
    for (int64_t c = 0; c < C; ++c) ms += xi[c] * xi[c];
    const float r = 1.0f / std::sqrt(ms / float(C) + 1e-5f);
    rstd[i] = r;
    for (int64_t c = 0; c < C; ++c) out[i * C + c] = xi[c] * r * w[c];
  }
}

void rmsnorm_backward(float* dx, float* dw, const float* dout, const float* x, const float* w, const float* rstd,
                      int64_t N, int64_t C) {
  const profile::Scope prof("norm");
  norm_weight_grads(dw, nullptr, dout, x, nullptr, rstd, N, C);
#pragma omp parallel for schedule(static) if (N * C >= kParallelMin)
  for (int64_t i = 0; i < N; ++i) {
    const float *g = dout + i * C, *xi = x + i * C;
    // xhat = x rstd; dx = rstd (g w - xhat mean(g w xhat))
    float m2 = 0.0f;
    for (int64_t c = 0; c < C; ++c) m2 += g[c] * w[c] * (xi[c] * rstd[i]);
    m2 /= float(C);
    for (int64_t c = 0; c < C; ++c) dx[i * C + c] += rstd[i] * (g[c] * w[c] - xi[c] * rstd[i] * m2);
  }
}

namespace {
constexpr float kGeluScale = 0.7978845608028654f;  // sqrt(2 / pi)
}

// tanh(a) = 1 - 2 / (e^{2a} + 1) through exp_fast, so that the loops vectorise (std::tanh, a libm
// call per element, was 60% of a small model's forward); absolute error ~1e-7, exact limits +-1.
[[gnu::always_inline]] inline float tanh_fast(float a) { return 1.0f - 2.0f / (exp_fast(2.0f * a) + 1.0f); }

namespace {
void gelu_block(float* __restrict out, const float* __restrict x, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float u = x[i];
    out[i] = 0.5f * u * (1.0f + tanh_fast(kGeluScale * (u + 0.044715f * u * u * u)));
  }
}
void gelu_back_block(float* __restrict dx, const float* __restrict x, const float* __restrict dout, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float u = x[i], a = kGeluScale * (u + 0.044715f * u * u * u), th = tanh_fast(a);
    const float da = kGeluScale * (1.0f + 3.0f * 0.044715f * u * u);
    dx[i] = dout[i] * (0.5f * (1.0f + th) + 0.5f * u * (1.0f - th * th) * da);
  }
}
constexpr int64_t kGeluBlock = 4096;
}  // namespace

void gelu_forward(float* out, const float* x, int64_t n) {
  const profile::Scope prof("gelu");
#pragma omp parallel for if (n >= 16 * kGeluBlock) schedule(static)
  for (int64_t i0 = 0; i0 < n; i0 += kGeluBlock) gelu_block(out + i0, x + i0, std::min(kGeluBlock, n - i0));
}

void gelu_backward(float* dx, const float* x, const float* dout, int64_t n) {
  const profile::Scope prof("gelu");
#pragma omp parallel for if (n >= 16 * kGeluBlock) schedule(static)
  for (int64_t i0 = 0; i0 < n; i0 += kGeluBlock)
    gelu_back_block(dx + i0, x + i0, dout + i0, std::min(kGeluBlock, n - i0));
}

void shift_forward(float* out, const float* x, int64_t B, int64_t T, int64_t C) {
  for (int64_t b = 0; b < B; ++b) {
    std::fill(out + b * T * C, out + b * T * C + C, 0.0f);
    if (T > 1) std::copy(x + b * T * C, x + (b * T + T - 1) * C, out + (b * T + 1) * C);
  }
}

void shift_backward(float* dx, const float* dout, int64_t B, int64_t T, int64_t C) {
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t + 1 < T; ++t)
      for (int64_t c = 0; c < C; ++c) dx[(b * T + t) * C + c] += dout[(b * T + t + 1) * C + c];
}

// Rows (b, t) over threads, the channels in SIMD lanes (the taps transposed to (j, c)); the
// weight gradients over blocks of channels, each summed in (b, t) order: the same bits as one
// thread, whatever the count.
void conv4_forward(float* out, const float* x, const float* w, const float* b, int64_t B, int64_t T, int64_t E) {
  const profile::Scope prof("conv4");
  std::vector<float> wt(4 * E);
  for (int64_t c = 0; c < E; ++c)
    for (int64_t j = 0; j < 4; ++j) wt[j * E + c] = w[c * 4 + j];
#pragma omp parallel for collapse(2) schedule(static) if (B * T * E >= kParallelMin)
  for (int64_t bb = 0; bb < B; ++bb)
    for (int64_t t = 0; t < T; ++t) {
      float* __restrict o = out + (bb * T + t) * E;
      std::copy(b, b + E, o);
      for (int64_t j = 0; j < 4; ++j) {
        const int64_t s = t - 3 + j;
        if (s < 0) continue;
        const float* __restrict xs = x + (bb * T + s) * E;
        const float* __restrict wj = &wt[j * E];
        for (int64_t c = 0; c < E; ++c) o[c] += wj[c] * xs[c];
      }
    }
}

void conv4_backward(float* dx, float* dw, float* db, const float* dout, const float* x, const float* w, int64_t B,
                    int64_t T, int64_t E) {
  const profile::Scope prof("conv4");
  std::vector<float> wt(4 * E);
  for (int64_t c = 0; c < E; ++c)
    for (int64_t j = 0; j < 4; ++j) wt[j * E + c] = w[c * 4 + j];
  // dx[s] += sum_j w[., j] dout[s + 3 - j]
#pragma omp parallel for collapse(2) schedule(static) if (B * T * E >= kParallelMin)
  for (int64_t bb = 0; bb < B; ++bb)
    for (int64_t s = 0; s < T; ++s) {
      float* __restrict d = dx + (bb * T + s) * E;
      for (int64_t j = 3; j >= 0; --j) {
        const int64_t t = s + 3 - j;
        if (t >= T) continue;
        const float* __restrict g = dout + (bb * T + t) * E;
        const float* __restrict wj = &wt[j * E];
        for (int64_t c = 0; c < E; ++c) d[c] += g[c] * wj[c];
      }
    }
  // db[c] += sum of dout[., c]; dw[c, j] += sum_t dout[t, c] x[t - 3 + j, c] (taps as rows, then
  // into dw's (E,4))
  std::vector<float> taps(size_t(4 * E), 0.0f);
  column_sums<5>({db, &taps[0], &taps[size_t(E)], &taps[size_t(2 * E)], &taps[size_t(3 * E)]}, B * T, E,
                 [&](int64_t i, int64_t c) {
                   const int64_t t = i % T;
                   const float g = dout[i * E + c];
                   std::array<float, 5> v{g, 0.0f, 0.0f, 0.0f, 0.0f};
                   for (int64_t j = 0; j < 4; ++j)
                     if (t - 3 + j >= 0) v[size_t(1 + j)] = g * x[(i - 3 + j) * E + c];
                   return v;
                 });
  for (int64_t c = 0; c < E; ++c)
    for (int64_t j = 0; j < 4; ++j) dw[c * 4 + j] += taps[size_t(j * E + c)];
}

double crossentropy_forward_backward(float* dlogits, const float* logits, const int32_t* targets, int64_t N,
                                     int64_t V, float scale, int64_t* counted) {
  const profile::Scope prof("cross-entropy");
  double loss = 0;
  int64_t n = 0;
  // rows over threads; e^{l - max} once per logit (exp_fast, about 2 ulp), its sum in double
#pragma omp parallel for schedule(static) reduction(+ : loss, n) if (N * V >= kParallelMin)
  for (int64_t i = 0; i < N; ++i) {
    const float* l = logits + i * V;
    float* d = dlogits ? dlogits + i * V : nullptr;
    if (targets[i] < 0) {
      if (d) std::fill(d, d + V, 0.0f);
      continue;
    }
    float mx = l[0];
    for (int64_t v = 1; v < V; ++v) mx = vmax(mx, l[v]);
    double z = 0;
    if (d) {
      for (int64_t v = 0; v < V; ++v) d[v] = exp_fast(l[v] - mx);
      for (int64_t v = 0; v < V; ++v) z += d[v];
      const float s = float(double(scale) / z);
      for (int64_t v = 0; v < V; ++v) d[v] *= s;
      d[targets[i]] -= scale;
    } else {
      for (int64_t v = 0; v < V; ++v) z += exp_fast(l[v] - mx);
    }
    loss += std::log(z) - double(l[targets[i]] - mx);
    ++n;
  }
  if (counted) *counted = n;
  return loss;
}

}  // namespace linmix::nn
