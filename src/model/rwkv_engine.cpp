// The RWKV-5/6/7 inference engine (include/linmix/engine.h): the models of docs/RWKV.md as the
// Model's rwkv_layer.cpp computes them, for inference. Rows of C, u = LN1(x), p the previous
// row's u (the state's "shift" for row 0), d = p - u; per layer
//   mixes -> r, k, v (+ gate) GEMMs -> decay and the v7 vectors -> WKV -> GN (+ v7 bonus) ->
//   gate -> x += W_o y;  u2 = LN2(x), x += channel mix.
// sequence(): passes of up to kPass rows; the WKV through the chunked kernels of the registry's
// rwkv5, rwkv6, rwkv7 (kernels/decay_chunk.h: gated with the bonus, DPLR) on the engine's buffers.
// step(): one row with gemv and the WKV recurrence inline; buffers sized once, no allocation.
// The state is the Model's: per layer "shift" (C), "state.S" (1,H,N,N; key index first, as the
// mechanisms keep it) and the channel mix's ffn_prev.
#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "kernels/blas.h"
#include "kernels/decay_chunk.h"
#include "engine_util.h"
#include "mixer_layer.h"
#include "linmix/error.h"
#include "linmix/mixer.h"
#include "linmix/rwkv4.h"

namespace linmix {

using engine::layernorm_rows;
using engine::sigmoidf;

namespace {

const float kE05 = std::exp(-0.5f);
// A decode step's WKV runs its heads over the threads from this many state floats a layer (a
// region costs ~3.5 us here; 0.1B's 48 Ki floats take ~10 us on one core)
constexpr int64_t kHeadsParallelFloats = int64_t(1) << 15;

// f(t) for the rows t < n, in parallel when there are enough of them (prefill); inline for decode.
template <class F>
void par_rows(int64_t n, F&& f) {
#pragma omp parallel for schedule(static) if (n >= 16)
  for (int64_t t = 0; t < n; ++t) f(t);
}

// f(i) for the i < count elements of n rows, in parallel when the rows are many.
template <class F>
void par_elems(int64_t n, int64_t count, F&& f) {
#pragma omp parallel for schedule(static) if (n >= 16)
  for (int64_t i = 0; i < count; ++i) f(i);
}

// A LoRA / mixing matrix A (in, out), stored [in, out] as BlinkDL does (applied as x A), kept in
// FP32 (rwkv.cpp does not quantise v7's either); also as A^T for one-token gemv (the engine's
// OpenMP kernels: no BLAS thread pool woken for each small product).
struct Lora {
  std::vector<float> A;
  int64_t in = 0, out = 0;
  QMatrix t;
  Lora() = default;
  Lora(const float* a, int64_t in_, int64_t out_) : A(a, a + in_ * out_), in(in_), out(out_) {
    std::vector<float> tr(size_t(in * out));
    for (int64_t i = 0; i < in; ++i)
      for (int64_t o = 0; o < out; ++o) tr[size_t(o * in + i)] = A[size_t(i * out + o)];
    t = QMatrix::from_f32(tr.data(), out, in, WType::F32);
  }
};

// out (n, L.out) = x (n, L.in) L.A, x rows ldx apart
void xa(float* out, const float* x, const Lora& L, int64_t n, int64_t ldx) {
  if (n == 1) return gemv(L.t, x, out);
  blas::sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(n), int(L.out), int(L.in), 1.0f, x, int(ldx), L.A.data(),
              int(L.out), 0.0f, out, int(L.out));
}

class RwkvEngine : public engine::RowsEngine {
 public:
  RwkvEngine(const Model& m, WType wt, bool take) : cfg_(m.config()) {
    const ModelConfig& c = cfg_;
    C_ = c.d_model, V_ = c.vocab, L_ = c.n_layer, F_ = c.ffn_width(), H_ = c.n_head, N_ = C_ / H_;
    const std::string& mixer = c.layers[0].mixer;
    ver_ = mixer == "rwkv5" ? 5 : mixer == "rwkv6" ? 6 : 7;
    engine::Weights W(m, take);
    auto has = [&](const std::string& n) { return W.has(n); };
    auto vec = [&](const std::string& n) { return W.vec(n); };
    auto lora = [&](const std::string& n) { return Lora(W.ptr(n), W.at(n).shape[0], W.at(n).shape[1]); };
    auto mat = [&](const std::string& n) { return W.mat(n, wt); };
    emb_ = vec("emb.weight"), ln0w_ = vec("blocks.0.ln0.weight"), ln0b_ = vec("blocks.0.ln0.bias");
    lnfw_ = vec("ln_out.weight"), lnfb_ = vec("ln_out.bias");
    head_ = mat("head.weight");
    layers_.resize(size_t(L_));
    for (int64_t l = 0; l < L_; ++l) {
      Layer& y = layers_[size_t(l)];
      const std::string p = "blocks." + std::to_string(l) + ".";
      y.gate = ver_ != 5 || has(p + "att.gate.weight");
      y.mixes = ver_ == 5 ? (y.gate ? "rkvg" : "rkv") : ver_ == 6 ? "wkvrg" : "rwkvag";
      for (size_t i = 0; i < y.mixes.size(); ++i)
        y.mix.push_back(vec(p + (ver_ == 5 ? "att.time_mix_" : ver_ == 6 ? "att.time_maa_" : "att.x_") + y.mixes[i]));
      y.ln1w = vec(p + "ln1.weight"), y.ln1b = vec(p + "ln1.bias"), y.ln2w = vec(p + "ln2.weight");
      y.ln2b = vec(p + "ln2.bias"), y.lnxw = vec(p + "att.ln_x.weight"), y.lnxb = vec(p + "att.ln_x.bias");
      y.Wr = mat(p + "att.receptance.weight"), y.Wk = mat(p + "att.key.weight"), y.Wv = mat(p + "att.value.weight");
      y.Wo = mat(p + "att.output.weight");
      if (y.gate && ver_ != 7) y.Wg = mat(p + "att.gate.weight");
      if (ver_ == 5) {
        y.decay = vec(p + "att.time_decay");
        y.logw = y.decay;
        for (size_t i = 0; i < y.decay.size(); ++i) y.logw[i] = -std::exp(y.decay[i]), y.decay[i] = std::exp(y.logw[i]);
      }
      if (ver_ != 7) y.bonus = vec(p + "att.time_faaaa");
      if (ver_ == 6) {
        y.dmix = W.at(p + "att.time_maa_w2").dim(1), y.ddecay = W.at(p + "att.time_decay_w1").dim(1);
        y.maa_x = vec(p + "att.time_maa_x"), y.td = vec(p + "att.time_decay");
        y.A1 = lora(p + "att.time_maa_w1"), y.B1 = lora(p + "att.time_decay_w1"), y.B2 = lora(p + "att.time_decay_w2");
        for (int64_t c = 0; c < 5; ++c) y.A2[c] = Lora(W.ptr(p + "att.time_maa_w2") + c * y.dmix * C_, y.dmix, C_);
      }
      if (ver_ == 7) {
        y.w0 = vec(p + "att.w0"), y.w1 = lora(p + "att.w1"), y.w2 = lora(p + "att.w2");
        y.a0 = vec(p + "att.a0"), y.a1 = lora(p + "att.a1"), y.a2 = lora(p + "att.a2");
        y.g1 = lora(p + "att.g1"), y.g2 = lora(p + "att.g2");
        y.kk = vec(p + "att.k_k"), y.ka = vec(p + "att.k_a"), y.rk = vec(p + "att.r_k");
        y.dw = W.at(p + "att.w1").dim(1), y.da = W.at(p + "att.a1").dim(1), y.dg = W.at(p + "att.g1").dim(1);
        if (l > 0) y.v0 = vec(p + "att.v0"), y.v1 = lora(p + "att.v1"), y.v2 = lora(p + "att.v2"), y.dv = W.at(p + "att.v1").dim(1);
      }
      const char* fm = ver_ == 5 ? "ffn.time_mix_" : ver_ == 6 ? "ffn.time_maa_" : "ffn.x_";
      y.fmk = vec(p + fm + "k");
      if (ver_ != 7) y.fmr = vec(p + fm + "r"), y.Fr = mat(p + "ffn.receptance.weight");
      y.Fk = mat(p + "ffn.key.weight"), y.Fv = mat(p + "ffn.value.weight");
      y.eps = 64e-5f;
      const auto& lp = c.layers[size_t(l)].params;
      if (lp.count("gn_eps")) y.eps = std::strtof(lp.at("gn_eps").c_str(), nullptr);
      lora_ = std::max({lora_, 5 * y.dmix + y.ddecay, y.dw + y.da + y.dv + y.dg});
    }
    state_ = {{"shift", {C_}, 0.0f}, {"state.S", {1, H_, N_, N_}, 0.0f}};
    grow(1);
  }

  const ModelConfig& config() const override { return cfg_; }
  Model::State new_state() const override { return Model::State(L_, C_); }

  double step_bytes() const override {
    double b = double(head_.bytes()) + 4.0 * double(C_) * 5;
    for (const Layer& y : layers_) {
      for (const QMatrix* q : {&y.Wr, &y.Wk, &y.Wv, &y.Wo, &y.Wg, &y.Fk, &y.Fv, &y.Fr}) b += double(q->bytes());
      for (const Lora* v : {&y.A1, &y.A2[0], &y.A2[1], &y.A2[2], &y.A2[3], &y.A2[4], &y.B1, &y.B2, &y.w1, &y.w2, &y.a1,
                            &y.a2, &y.v1, &y.v2, &y.g1, &y.g2})
        b += 4.0 * double(v->A.size());
      b += 4.0 * double(C_) * 20 + 2 * 4.0 * double(H_ * N_ * N_);  // vectors; the state read and written
    }
    return b;
  }

  double flops_per_token(bool with_head) const override {
    double f = 0;
    for (const Layer& y : layers_) {
      f += 2.0 * double(C_) * double(C_) * (4 + (y.Wg.rows ? 1 : 0) + (y.Fr.rows ? 1 : 0)) + 4.0 * double(C_) * double(F_);
      f += 2.0 * double(C_) * double(5 * y.dmix + y.ddecay + y.dw + y.da + y.dv + y.dg) * 2;
    }
    return f + (with_head ? 2.0 * double(V_) * double(C_) : 0.0);
  }

 private:
  struct Layer {
    std::string mixes;
    bool gate = true;
    float eps = 64e-5f;
    int64_t dmix = 0, ddecay = 0, dw = 0, da = 0, dv = 0, dg = 0;
    std::vector<std::vector<float>> mix;
    std::vector<float> ln1w, ln1b, ln2w, ln2b, lnxw, lnxb, decay, logw, bonus, maa_x, td, w0, a0, v0, kk, ka, rk, fmk, fmr;
    Lora A1, A2[5], B1, B2, w1, w2, a1, a2, v1, v2, g1, g2;
    QMatrix Wr, Wk, Wv, Wo, Wg, Fk, Fv, Fr;
  };

  // Buffers for n rows (grown only: after the first call of a size nothing is allocated).
  void grow(int64_t n) {
    if (n <= cap_) return;
    cap_ = n;
    const size_t nc = size_t(n * C_);
    for (auto* v : {&X_, &U_, &R_, &K_, &Vv_, &G_, &LW_, &A7_, &KAP_, &BB_, &VF_, &O_, &Y_, &TMP_}) v->resize(nc);
    if (ver_ == 6) P_.resize(nc), D_.resize(nc);  // the shifted rows and d (v6's data-dependent mixes)
    XS_.resize(6 * nc);
    Z_.resize(size_t(n * lora_));
    Hf_.resize(size_t(n * F_));
  }

  void ensure_state(Model::State& st) const override { engine::ensure_layer_states(st, L_, state_, C_); }

  // d = p - u with p the previous row (row 0: prev); prev <- the last row
  void shift_rows(const float* u, float* p, float* d, float* prev, int64_t n) const {
    const int64_t C = C_;
    std::copy(prev, prev + C, p);
    if (n > 1) std::copy(u, u + (n - 1) * C, p + C);
    std::copy(u + (n - 1) * C, u + n * C, prev);
    par_elems(n, n * C, [&](int64_t i) { d[i] = p[i] - u[i]; });
  }

  // The token shift's mixes of n rows u (v5: x = u m + p (1 - m); v6, v7: x = u + (p - u) m, p
  // the previous row's u, prev's for row 0), mix c into out + c n C; prev <- the last row. Each
  // row's mixes made while u and p are in cache (no shifted copy of the rows written first).
  void mix_rows(const float* U, float* prev, int64_t n, const float* const* mixes, size_t nm, float* out) const {
    const int64_t C = C_, NC = n * C;
    par_rows(n, [&](int64_t t) {
      const float *u = U + t * C, *p = t ? u - C : prev;
      for (size_t c = 0; c < nm; ++c) {
        const float* m = mixes[c];
        float* x = out + int64_t(c) * NC + t * C;
        if (ver_ == 5) {
#pragma omp simd
          for (int64_t j = 0; j < C; ++j) x[j] = u[j] * m[j] + p[j] * (1.0f - m[j]);
        } else {
#pragma omp simd
          for (int64_t j = 0; j < C; ++j) x[j] = u[j] + (p[j] - u[j]) * m[j];
        }
      }
    });
    std::copy(U + (n - 1) * C, U + n * C, prev);
  }

  void rows(const int32_t* tokens, int64_t n, Model::State& st, float* logits, bool all_logits) override {
    grow(n);
    const int64_t C = C_;
    float* X = X_.data();
    engine::embed_rows(X, emb_, tokens, n, C);
    layernorm_rows(X, X, ln0w_.data(), ln0b_.data(), n, C);
    for (int64_t l = 0; l < L_; ++l) {
      time_mix(layers_[size_t(l)], l, n, st.layer[size_t(l)]);
      channel_mix(layers_[size_t(l)], n, st.ffn_prev[size_t(l)].data());
    }
    if (!logits) return;
    const profile::Scope prof("head");
    engine::head_logits(logits, U_.data(), X, n, C, V_, all_logits, head_, deq_, [&](float* o, const float* x, int64_t k) {
      layernorm_rows(o, x, lnfw_.data(), lnfb_.data(), k, C);
    });
  }

  // The products of one stage: for one row (decode) gathered and run as one gemv_many (one
  // parallel region); for many rows each weight matrix one GEMM at once, and the LoRAs (thin:
  // 32-128 wide) gathered and run together, each thread every LoRA's product for its share of
  // the rows (one GEMM a thread is not split again: OpenBLAS runs a call made inside a parallel
  // region on its caller's thread): v7 0.1B, a prefill of 1024 tokens, its LoRAs 64-65 ms as one
  // 2-thread GEMM each, 50-51 ms so.
  struct Stage {
    RwkvEngine& e;
    int64_t n;
    GemvJob jobs[16] = {};
    int k = 0;
    struct LoraJob {
      float* out;
      const float* in;
      const Lora* L;
      int64_t ldx;
    };
    LoraJob loras[16] = {};
    int kl = 0;
    void mm(float* out, const float* in, const QMatrix& W) {
      if (n == 1) jobs[k++] = {&W, in, out};
      else engine::matmul(out, in, W, n, false, e.deq_);
    }
    void la(float* out, const float* in, const Lora& L, int64_t ldx) {
      if (n == 1) jobs[k++] = {&L.t, in, out};
      else loras[kl++] = {out, in, &L, ldx};
    }
    void run() {
      if (k) {
        const profile::Scope prof("gemv");
        gemv_many(jobs, k);
      }
      k = 0;
      if (kl == 0) return;
      const profile::Scope prof("loras");
      if (kl == 1) xa(loras[0].out, loras[0].in, *loras[0].L, n, loras[0].ldx);
      if (kl > 1) {
#pragma omp parallel
        {
          const int64_t nt = omp_get_num_threads(), tid = omp_get_thread_num();
          const int64_t r0 = n * tid / nt, r1 = n * (tid + 1) / nt;
          for (int j = 0; j < kl && r1 > r0; ++j) {
            const LoraJob& q = loras[j];
            xa(q.out + r0 * q.L->out, q.in + r0 * q.ldx, *q.L, r1 - r0, q.ldx);
          }
        }
      }
      kl = 0;
    }
  };

  void time_mix(const Layer& y, int64_t l, int64_t n, TensorMap& ls) {
    const profile::Scope prof("time mix");
    const int64_t C = C_, NC = n * C;
    float *X = X_.data(), *U = U_.data(), *P = P_.data(), *D = D_.data(), *R = R_.data(), *K = K_.data(),
          *Vv = Vv_.data(), *G = G_.data(), *LW = LW_.data(), *A7 = A7_.data(), *KAP = KAP_.data(), *BB = BB_.data(),
          *O = O_.data(), *Y = Y_.data(), *Z = Z_.data(), *TMP = TMP_.data();
    layernorm_rows(U, X, y.ln1w.data(), y.ln1b.data(), n, C);
    float* prev = ls.at("shift").ptr();
    auto xs = [&](char c) { return XS_.data() + (y.mixes.find(c)) * NC; };
    Stage st{*this, n};
    // the mixed inputs
    if (ver_ == 6) {  // x_c = u + d (maa_c + tanh((u + d maa_x) A1)_c A2[c])
      shift_rows(U, P, D, prev, n);
      const int64_t D5 = 5 * y.dmix;
      par_rows(n, [&](int64_t t) {
        for (int64_t c = 0, i = t * C; c < C; ++c, ++i) TMP[i] = U[i] + D[i] * y.maa_x[size_t(c)];
      });
      xa(Z, TMP, y.A1, n, C);
      par_elems(n, n * D5, [&](int64_t i) { Z[i] = std::tanh(Z[i]); });
      for (int c = 0; c < 5; ++c) st.la(xs("wkvrg"[c]), Z + c * y.dmix, y.A2[c], D5);
      st.run();
      float* x5[5];
      for (int c = 0; c < 5; ++c) x5[c] = xs("wkvrg"[c]);
      par_rows(n, [&](int64_t t) {  // every mix of a row while its u and d are in cache
        const float *u = U + t * C, *d = D + t * C;
        for (int c = 0; c < 5; ++c) {
          float* x = x5[c] + t * C;
          const float* m = y.mix[size_t(c)].data();
#pragma omp simd
          for (int64_t j = 0; j < C; ++j) x[j] = u[j] + d[j] * (m[j] + x[j]);
        }
      });
    } else {  // every mix of a row from its u and the previous row's (no shifted copy, no d)
      const float* m[6];  // at most v7's six: r, w, k, v, a, g
      LINMIX_CHECK(y.mix.size() <= 6, "rwkv engine: more token-shift mixes than a layer has");
      for (size_t c = 0; c < y.mix.size(); ++c) m[c] = y.mix[c].data();
      mix_rows(U, prev, n, m, y.mix.size(), XS_.data());
    }
    // r, k, v (and the gate) with every first LoRA stage, in one go
    st.mm(R, xs('r'), y.Wr), st.mm(K, xs('k'), y.Wk), st.mm(Vv, xs('v'), y.Wv);
    if (y.gate && ver_ != 7) st.mm(G, xs('g'), y.Wg);
    float *zd = Z + n * 5 * y.dmix, *zw = Z, *za = zw + n * y.dw, *zg = za + n * y.da, *zv = zg + n * y.dg;
    if (ver_ == 6) st.la(zd, xs('w'), y.B1, C);
    if (ver_ == 7) {
      st.la(zw, xs('w'), y.w1, C), st.la(za, xs('a'), y.a1, C), st.la(zg, xs('g'), y.g1, C);
      if (l > 0) st.la(zv, xs('v'), y.v1, C);
    }
    st.run();
    if (ver_ == 6) {  // log w = -exp(time_decay + tanh(x_w B1) B2)
      par_elems(n, n * y.ddecay, [&](int64_t i) { zd[i] = std::tanh(zd[i]); });
      st.la(LW, zd, y.B2, y.ddecay);
      st.run();
      par_rows(n, [&](int64_t t) {  // exp_fast (vectorised; std::exp kept this loop scalar: 16 ms of 0.1B's prefill)
        float* lw = LW + t * C;
        const float* td = y.td.data();
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) lw[c] = -exp_fast(lw[c] + td[c]);
      });
    }
    if (ver_ == 7) {
      par_elems(n, n * y.dw, [&](int64_t i) { zw[i] = std::tanh(zw[i]); });
      par_elems(n, n * y.dg, [&](int64_t i) { zg[i] = sigmoidf(zg[i]); });
      st.la(LW, zw, y.w2, y.dw), st.la(A7, za, y.a2, y.da), st.la(G, zg, y.g2, y.dg);
      if (l > 0) st.la(TMP, zv, y.v2, y.dv);
      st.run();
      const float *w0 = y.w0.data(), *a0 = y.a0.data(), *v0 = y.v0.data(), *kk = y.kk.data(), *ka = y.ka.data();
      float* VF = VF_.data();
      const int64_t H = H_, N = N_;
      par_rows(n, [&](int64_t t) {  // a row's decays, a7, kappa, b, scaled k and value residual in one pass
        const int64_t r0 = t * C;
        float *lw = LW + r0, *a7 = A7 + r0, *vv = Vv + r0, *vf = VF + r0;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          lw[c] = -kE05 * sigmoidf(lw[c] + w0[c]);
          a7[c] = sigmoidf(a7[c] + a0[c]);
        }
        for (int64_t h = 0; h < H; ++h) {  // kappa = (k o kk) / |k o kk| a head, b = -kappa a7, k scaled
          const int64_t o = r0 + h * N;
          const float *kh = kk + h * N, *kah = ka + h * N;
          float *Ko = K + o, *Ao = A7 + o, *KAo = KAP + o, *Bo = BB + o, s = 0.0f;
#pragma omp simd reduction(+ : s)
          for (int64_t j = 0; j < N; ++j) s += Ko[j] * kh[j] * (Ko[j] * kh[j]);
          const float inv = 1.0f / std::max(std::sqrt(s), 1e-12f);
#pragma omp simd
          for (int64_t j = 0; j < N; ++j) {
            KAo[j] = Ko[j] * kh[j] * inv, Bo[j] = -KAo[j] * Ao[j];
            Ko[j] *= 1.0f + (Ao[j] - 1.0f) * kah[j];
          }
        }
        if (l == 0) {  // the first layer's v is every layer's residual
          std::copy(vv, vv + C, vf);
        } else {
          const float* tm = TMP + r0;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) vv[c] += (vf[c] - vv[c]) * sigmoidf(tm[c] + v0[c]);
        }
      });
    }
    // WKV, then per head GN (+ bonus) (+ gate); one token: a head's recurrence and its GN
    // together, heads over the threads once the state is large (0.4B: 256 KiB a layer)
    auto gn = [&](int64_t hr) {
      const int64_t o = hr * N_, h = hr % H_, N = N_;
      const float *Oo = O + o, *Ro = R + o, *Ko = K + o, *Vo = Vv + o, *Go = G + o;
      const float *lw = y.lnxw.data() + h * N, *lb = y.lnxb.data() + h * N, *rk = y.rk.data() + (ver_ == 7 ? h * N : 0);
      float* Yo = Y + o;
      float m = 0, var = 0, bonus = 0;
#pragma omp simd reduction(+ : m)
      for (int64_t j = 0; j < N; ++j) m += Oo[j];
      m /= float(N);
#pragma omp simd reduction(+ : var)
      for (int64_t j = 0; j < N; ++j) var += (Oo[j] - m) * (Oo[j] - m);
      const float rs = 1.0f / std::sqrt(var / float(N) + y.eps);
      if (ver_ == 7) {
#pragma omp simd reduction(+ : bonus)
        for (int64_t j = 0; j < N; ++j) bonus += Ro[j] * Ko[j] * rk[j];
#pragma omp simd
        for (int64_t j = 0; j < N; ++j) Yo[j] = ((Oo[j] - m) * rs * lw[j] + lb[j] + bonus * Vo[j]) * Go[j];
      } else if (y.gate) {
#pragma omp simd
        for (int64_t j = 0; j < N; ++j) Yo[j] = ((Oo[j] - m) * rs * lw[j] + lb[j]) * (Go[j] * sigmoidf(Go[j]));
      } else {
#pragma omp simd
        for (int64_t j = 0; j < N; ++j) Yo[j] = (Oo[j] - m) * rs * lw[j] + lb[j];
      }
    };
    float* S = ls.at("state.S").ptr();
    if (n == 1) {
      const profile::Scope prof("wkv");
#pragma omp parallel for schedule(static) if (H_ * N_ * N_ >= kHeadsParallelFloats)
      for (int64_t h = 0; h < H_; ++h) wkv_head(y, S, h), gn(h);
    } else {
      wkv_chunked(y, n, ls);
      par_elems(n, n * H_, gn);
    }
    engine::matmul(X, Y, y.Wo, n, true, deq_);
  }

  // One token, head h: the recurrence of docs/RWKV.md on the state S[h][key d][value e].
  void wkv_head(const Layer& y, float* S, int64_t h) {
    const float *R = R_.data(), *K = K_.data(), *Vv = Vv_.data();
    float* Sh = S + h * N_ * N_;
    const int64_t o = h * N_;
    float* out = O_.data() + o;
    std::fill(out, out + N_, 0.0f);
    if (ver_ != 7) {  // o = r (S + b k v^T); S = w S + k v^T
      for (int64_t d = 0; d < N_; ++d) {
        const float r = R[o + d], k = K[o + d], b = y.bonus[size_t(o + d)];
        const float w = ver_ == 5 ? y.decay[size_t(o + d)] : std::exp(LW_[size_t(o + d)]);
        float* row = Sh + d * N_;
#pragma omp simd
        for (int64_t e = 0; e < N_; ++e) {
          const float kv = k * Vv[o + e];
          out[e] += r * (row[e] + b * kv);
          row[e] = w * row[e] + kv;
        }
      }
      return;
    }
    // S = diag(w) S + b (a^T S) + k v^T (a = kappa, b = -kappa a7); o = S^T r. a^T S in the
    // head's own slice of TMP_ (free by now: the value residual has been mixed in)
    float* sa = TMP_.data() + o;
    std::fill(sa, sa + N_, 0.0f);
    for (int64_t d = 0; d < N_; ++d) {
      const float a = KAP_[size_t(o + d)];
      const float* row = Sh + d * N_;
#pragma omp simd
      for (int64_t e = 0; e < N_; ++e) sa[e] += a * row[e];
    }
    for (int64_t d = 0; d < N_; ++d) {
      const float w = std::exp(LW_[size_t(o + d)]), b = BB_[size_t(o + d)], k = K[o + d], r = R[o + d];
      float* row = Sh + d * N_;
#pragma omp simd
      for (int64_t e = 0; e < N_; ++e) {
        row[e] = w * row[e] + b * sa[e] + k * Vv[o + e];
        out[e] += r * row[e];
      }
    }
  }

  // n rows from the state through the chunked kernels of the registry's rwkv5 / rwkv6 (gated, the
  // read-out a step early plus the bonus) and rwkv7 (DPLR), on the engine's buffers in place: y
  // into O_, the state advanced where it lies, the heads over the threads (the mechanisms' parallel
  // forms less their copies in and out and their fresh output tensors: 0.1B v7, 1024 tokens, 5 ms
  // of the WKV's 84 were the copy back alone). The values are not checked here, as step()'s
  // recurrence does not check them.
  void wkv_chunked(const Layer& y, int64_t n, TensorMap& ls) {
    const profile::Scope prof("wkv");
    const int64_t H = H_, N = N_, C = C_;
    float *S = ls.at("state.S").ptr(), *O = O_.data();
    const float *R = R_.data(), *K = K_.data(), *V = Vv_.data(), *LW = LW_.data(), *A = KAP_.data(), *B = BB_.data();
#pragma omp parallel
    {
      const int64_t nth = omp_get_num_threads(), id = omp_get_thread_num();
      const int64_t lo = H * id / nth, hi = H * (id + 1) / nth;
      if (ver_ == 7) {
        std::vector<DplrHeadRows> heads;
        for (int64_t h = lo; h < hi; ++h) {
          auto load = [=](int64_t t0, int64_t m, const DplrChunkRows& x) {  // a chunk's rows of head h
            const int64_t o = t0 * C + h * N;
            dplr_gather(x, m, N, N, R + o, LW + o, K + o, V + o, A + o, B + o, C, C, 1.0f);
          };
          heads.push_back({O + h * N, C, S + h * N * N, load});
        }
        dplr_forward_heads(heads.data(), int64_t(heads.size()), n, N, N);
      } else {
        std::vector<GatedHeadRows> heads;
        for (int64_t h = lo; h < hi; ++h) {
          GatedHeadRows g{O + h * N, S + h * N * N, R + h * N, K + h * N, V + h * N,
                          ver_ == 5 ? y.logw.data() + h * N : LW + h * N, {}};
          g.ld.q = g.ld.k = g.ld.v = g.ld.y = C, g.ld.g = ver_ == 5 ? 0 : C;  // v5: one decay row for all t
          g.ld.u = y.bonus.data() + h * N;
          heads.push_back(g);
        }
        gated_forward_heads(heads.data(), int64_t(heads.size()), n, N, N, true);
      }
    }
  }

  void channel_mix(const Layer& y, int64_t n, float* prev) {
    const profile::Scope prof("channel mix");
    const int64_t C = C_, NC = n * C;
    float *X = X_.data(), *U = U_.data(), *XK = XS_.data(), *XR = XS_.data() + NC, *Hf = Hf_.data(), *O = O_.data(),
          *R = R_.data();
    layernorm_rows(U, X, y.ln2w.data(), y.ln2b.data(), n, C);
    const float* m[2] = {y.fmk.data(), y.fmr.data()};
    mix_rows(U, prev, n, m, ver_ == 7 ? 1 : 2, XK);  // XR follows XK in XS_
    engine::matmul(Hf, XK, y.Fk, n, false, deq_);
    par_elems(n, n * F_, [&](int64_t i) { Hf[i] = Hf[i] > 0 ? Hf[i] * Hf[i] : 0.0f; });
    if (ver_ == 7) {
      engine::matmul(X, Hf, y.Fv, n, true, deq_);
      return;
    }
    Stage st{*this, n};
    st.mm(O, Hf, y.Fv), st.mm(R, XR, y.Fr);
    st.run();
    par_rows(n, [&](int64_t t) {
      for (int64_t c = 0, i = t * C; c < C; ++c, ++i) X[i] += sigmoidf(R[i]) * O[i];
    });
  }

  ModelConfig cfg_;
  int ver_ = 5;
  int64_t C_ = 0, V_ = 0, L_ = 0, F_ = 0, H_ = 1, N_ = 1, lora_ = 1, cap_ = 0;
  std::vector<float> emb_, ln0w_, ln0b_, lnfw_, lnfb_;
  QMatrix head_;
  std::vector<Layer> layers_;
  std::vector<engine::StateEntry> state_;  // per layer: "shift" (C), "state.S" (1,H,N,N)
  std::vector<float> X_, U_, P_, D_, R_, K_, Vv_, G_, LW_, A7_, KAP_, BB_, VF_, O_, Y_, TMP_, XS_, Z_, Hf_, deq_;
};

}  // namespace

std::unique_ptr<Engine> rwkv_engine(const Model& m, WType wtype, bool take) {
  return std::make_unique<RwkvEngine>(m, wtype, take);
}

}  // namespace linmix
