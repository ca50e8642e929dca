// What the engines (rwkv4_engine.cpp, rwkv_engine.cpp, mamba_engine.cpp, mamba2_engine.cpp) share:
// LayerNorm and RMSNorm over rows, the GEMM of rows against a (possibly quantised) weight matrix, the state's validation,
// and (RowsEngine) step / sequence around a model that runs rows.
#pragma once
#include <cblas.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "kernels/blas.h"
#include "kernels/gemv.h"
#include "kernels/vmath.h"
#include "linmix/engine.h"
#include "linmix/error.h"
#include "linmix/profile.h"

namespace linmix::engine {

// exp_fast (kernels/vmath.h, ~1 ulp) so that the loops over channels vectorise
// always inlined: called out of line, it keeps the simd loops around it scalar (RWKV-6 0.1B, the
// gated group norm of a 1024-token prefill: 44 ms)
[[gnu::always_inline]] inline float sigmoidf(float x) { return 1.0f / (1.0f + exp_fast(-x)); }
inline float softplus(float x) { return x > 20.0f ? x : std::log1p(std::exp(x)); }
inline float silu(float x) { return x / (1.0f + std::exp(-x)); }

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

// RMSNorm (eps 1e-5, Mamba's) of N rows, rows in parallel.
inline void rmsnorm_rows(float* out, const float* x, const float* w, int64_t n, int64_t C) {
#pragma omp parallel for schedule(static) if (n > 8)
  for (int64_t i = 0; i < n; ++i) {
    const float* xi = x + i * C;
    float ms = 0;
#pragma omp simd reduction(+ : ms)
    for (int64_t c = 0; c < C; ++c) ms += xi[c] * xi[c];
    const float r = 1.0f / std::sqrt(ms / float(C) + 1e-5f);
    for (int64_t c = 0; c < C; ++c) out[i * C + c] = xi[c] * r * w[c];
  }
}
// out (N,OC) (+)= in (N,IC) W^T; a quantised W is expanded into deq first (one GEMM then), and
// one row goes through gemv (the weights streamed once).
inline void matmul(float* out, const float* in, const QMatrix& W, int64_t N, bool accumulate, std::vector<float>& deq) {
  const profile::Scope prof("matmul");
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
  blas::sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(N), int(W.rows), int(W.cols), 1.0f, in, int(W.cols), w,
              int(W.cols), accumulate ? 1.0f : 0.0f, out, int(W.rows));
}

// The weights an engine reads from a model: copied (the model keeps them), or taken (make_engine's
// take_weights): each tensor moved out of the model (FP32) or freed as soon as it is converted
// (BF16, INT8), so the model's FP32 weights and the engine's are never all resident together.
class Weights {
 public:
  // take: the caller gave up m's weights (make_engine(Model&, WType, true): m is not const there)
  Weights(const Model& m, bool take) : W_(const_cast<TensorMap&>(m.params())), take_(take), packed_(m.packed()) {}
  bool has(const std::string& n) const { return W_.count(n) > 0; }
  // shape only (a taken tensor keeps its shape)
  const Tensor& at(const std::string& n) const { return W_.at(n); }
  // its values, for a read that does not take them (LoRAs); a tensor already taken is an error
  const float* ptr(const std::string& n) const {
    const Tensor& t = W_.at(n);
    LINMIX_CHECK(numel_of(t.shape) == 0 || !t.data.empty(),
                 "engine: weight '" + n + "' has no FP32 values (taken already, or stored converted)");
    return t.ptr();
  }
  std::vector<float> vec(const std::string& n) {
    ptr(n);
    Tensor& t = W_.at(n);
    return take_ ? std::move(t.data).take() : std::vector<float>(t.data.begin(), t.data.end());
  }
  // the matrix `n` in weight type t: as the model's packed weights hold it (a `linmix convert`
  // file; taken or copied), else converted from its FP32 values (and recorded when converting)
  QMatrix mat(const std::string& n, WType t) {
    if (packed_ && !packed_->recording && packed_->mats.count(n)) {  // of type t: make_engine checked it
      QMatrix& q = packed_->mats.at(n);
      if (!take_) return q;
      QMatrix out = std::move(q);
      packed_->mats.erase(n);
      return out;
    }
    const float* p = ptr(n);
    Tensor& x = W_.at(n);
    QMatrix q;
    if (take_ && t == WType::F32) {
      q.rows = x.shape[0], q.cols = x.shape[1], q.type = t, q.f32 = std::move(x.data).take();
      return q;
    }
    q = QMatrix::from_f32(p, x.shape[0], x.shape[1], t);
    if (packed_ && packed_->recording) packed_->mats[n] = q;
    if (take_) x.data.release();
    return q;
  }

 private:
  TensorMap& W_;
  bool take_;
  PackedWeights* packed_;
};
// X (n, C) = the embedding rows of the tokens.
inline void embed_rows(float* X, const std::vector<float>& emb, const int32_t* tokens, int64_t n, int64_t C) {
  for (int64_t t = 0; t < n; ++t) std::copy(&emb[size_t(tokens[t] * C)], &emb[size_t((tokens[t] + 1) * C)], X + t * C);
}
// The logits of the residual rows X (n, C): norm(out, x, rows) normalises rows into buf, then the
// head: every row's (n, V) by one GEMM when all, else the last row's (V) by gemv. Non-finite
// logits are an Error.
template <class Norm>
void head_logits(float* logits, float* buf, const float* X, int64_t n, int64_t C, int64_t V, bool all,
                 const QMatrix& head, std::vector<float>& deq, Norm norm) {
  if (all) {
    norm(buf, X, n);
    matmul(logits, buf, head, n, false, deq);
  } else {
    norm(buf, X + (n - 1) * C, 1);
    gemv(head, buf, logits);
  }
  LINMIX_CHECK(all_finite(logits, (all ? n : 1) * V),
               "the logits are not finite: the model's weights or state overflow float32");
}
// Mamba's convolution (causal, depthwise, kernel 4, bias, then SiLU) over n rows of W channels,
// row t read at in + t stride, continuing the history hist (the previous 3 rows, oldest first):
// out (n, W); hist then holds the last 3 rows of [hist ; rows] (tmp: 3 W floats).
inline void conv4_silu_rows(float* out, const float* in, int64_t stride, float* hist, const float* w, const float* b,
                            int64_t n, int64_t W, float* tmp) {
  auto row = [&](int64_t s, int64_t c) { return s >= 0 ? in[s * stride + c] : hist[(3 + s) * W + c]; };
#pragma omp parallel for schedule(static) if (n >= 16)
  for (int64_t t = 0; t < n; ++t)
    for (int64_t c = 0; c < W; ++c) {
      float acc = b[c];
      for (int64_t j = 0; j < 4; ++j) acc += w[c * 4 + j] * row(t - 3 + j, c);
      out[t * W + c] = acc / (1.0f + std::exp(-acc));
    }
  for (int64_t r = 0; r < 3; ++r)
    for (int64_t c = 0; c < W; ++c) tmp[r * W + c] = row(n - 3 + r, c);
  std::copy(tmp, tmp + 3 * W, hist);
}
// One tensor of a layer's engine state: its name, the shape a fresh state gets, its fill.
struct StateEntry {
  const char* name;
  std::vector<int64_t> shape;
  float fill;
};
// Validates a Model::State for an engine of L layers whose layers hold `entries` (flushing any
// runtime first; a layer without state gets them freshly filled), and, with ffn_C > 0, the
// channel mix's token shift of ffn_C. No allocation once the state is complete.
inline void ensure_layer_states(Model::State& st, int64_t L, const std::vector<StateEntry>& entries, int64_t ffn_C) {
  LINMIX_CHECK(int64_t(st.layer.size()) == L && int64_t(st.run.size()) == L &&
                   (ffn_C == 0 || int64_t(st.ffn_prev.size()) == L),
               "state: it has " + std::to_string(st.layer.size()) + " layers, the model " + std::to_string(L));
  st.flush();
  for (int64_t l = 0; l < L; ++l) {
    auto& m = st.layer[size_t(l)];
    if (m.empty())
      for (const StateEntry& e : entries) m[e.name] = Tensor(e.shape, e.fill);
    for (const StateEntry& e : entries) {
      auto it = m.find(e.name);
      LINMIX_CHECK(it != m.end() && it->second.numel() == numel_of(e.shape),
                   "state: layer " + std::to_string(l) + " lacks a well-formed '" + e.name + "'");
    }
    LINMIX_CHECK(ffn_C == 0 || int64_t(st.ffn_prev[size_t(l)].size()) == ffn_C,
                 "state: layer " + std::to_string(l) + " has a token-shift vector of the wrong size");
  }
}

// An engine that runs rows of tokens: step() is one row, sequence() passes of up to kPass rows;
// the token checks, the state's validation and its position are here, the model in rows().
class RowsEngine : public Engine {
 public:
  // rows per internal pass of sequence(): bounds its memory. 1024 (was 512): a 1024-token prefill
  // in one pass, each INT8 matrix dequantised once for it and the thin LoRA GEMMs twice as tall
  // (RWKV-7 0.1B prefill tok/s f32 1254, 1247 -> 1266, 1274; int8 1206, 1138 -> 1240, 1195;
  // RWKV-5 0.1B f32 1236, 1306 -> 1429, 1383), decode's peak memory the same (1.10x its bound).
  static constexpr int64_t kPass = 1024;

  void step(int32_t token, Model::State& st, float* logits) override {
    LINMIX_CHECK(token >= 0 && token < vocab(), "token " + std::to_string(token) + " is outside the vocabulary");
    ensure_state(st);
    rows(&token, 1, st, logits, false);
    st.pos += 1;
  }
  void sequence(const int32_t* tokens, int64_t T, Model::State& st, float* logits, bool all_logits) override {
    LINMIX_CHECK(T >= 1, "sequence: no tokens");
    for (int64_t t = 0; t < T; ++t)
      LINMIX_CHECK(tokens[t] >= 0 && tokens[t] < vocab(),
                   "token " + std::to_string(tokens[t]) + " is outside the vocabulary");
    ensure_state(st);
    for (int64_t t0 = 0; t0 < T; t0 += kPass) {
      const int64_t n = std::min(kPass, T - t0);
      rows(tokens + t0, n, st, all_logits && logits ? logits + t0 * vocab() : (t0 + n == T ? logits : nullptr),
           all_logits);
    }
    st.pos += T;
  }

 protected:
  int64_t vocab() const { return config().vocab; }
  // Validates the state (and fills a fresh one) before any row runs.
  virtual void ensure_state(Model::State& st) const = 0;
  // n rows from the state; logits: (n,V) when all_logits, else (V) of the last row; may be null.
  virtual void rows(const int32_t* tokens, int64_t n, Model::State& st, float* logits, bool all_logits) = 0;
};

}  // namespace linmix::engine
