// RWKV-4 inference engine (see include/linmix/rwkv4.h). Per layer, with a = LN1(x), b = LN2(x):
//   xk = a mk + a_prev (1 - mk) (likewise xv, xr);  k = Wk xk, v = Wv xv, r = sigmoid(Wr xr)
//   x += Wo (r * wkv(k, v; w = exp(time_decay), u = time_first, state a, b, p))
//   xk = b mk' + b_prev (1 - mk'), xr likewise;  x += sigmoid(Fr xr) * Fv relu(Fk xk)^2
#include "linmix/rwkv4.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>

#include "engine_util.h"
#include "linmix/error.h"
#include "linmix/kernels.h"

namespace linmix {

using engine::layernorm_rows;
using engine::sigmoidf;

namespace {

constexpr float kInitP = -1e38f;   // MIXERS.md: the running max of an empty sum
constexpr int64_t kChunk = Rwkv4Engine::kPass;  // rows per internal pass of sequence(): bounds its memory
constexpr int64_t kScanBlock = Rwkv4Engine::kScanBlock;  // channels per scan task

std::string P(int64_t i, const char* name) { return "blocks." + std::to_string(i) + "." + name; }

}  // namespace

struct Rwkv4Engine::Impl {
  struct Layer {
    std::vector<float> ln1w, ln1b, ln2w, ln2b, amk, amv, amr, w, u, fmk, fmr;
    QMatrix Wk, Wv, Wr, Wo, Fk, Fv, Fr;
  };
  WType wt;
  int64_t V = 0, C = 0, F = 0, L = 0;
  std::vector<float> emb, ln0w, ln0b, lnfw, lnfb;
  std::vector<Layer> layers;
  QMatrix head;
  // the layers' state as the model's RWKV-4 time-mix layers keep it: "att_prev" (C) and the rwkv4
  // mixer's "state.a", "state.b", "state.p" (1, C); zeros (p = -1e38) where a layer has none yet
  std::vector<engine::StateEntry> state;
  // step() scratch
  std::vector<float> x, a, xk, xv, xr, k, v, r, y, h, o;
  // sequence() scratch
  std::vector<float> X, A, XK, XV, XR, K, Vv, R, Y, H, O, deq;

  // out (N,OC) (+)= in (N,IC) W^T
  void matmul(float* out, const float* in, const QMatrix& W, int64_t N, bool accumulate) {
    engine::matmul(out, in, W, N, accumulate, deq);
  }
};

bool Rwkv4Engine::supports(const ModelConfig& c, std::string* why) {
  auto no = [&](const std::string& s) {
    if (why) *why = s;
    return false;
  };
  for (const auto& l : c.layers)
    if (l.mixer != "rwkv4") return no("layer mixer '" + l.mixer + "' is not rwkv4");
  if (c.channel_mix != "rwkv") return no("channel mix is '" + c.channel_mix + "', not rwkv");
  if (c.uses_pos_emb()) return no("the model has learned positions");
  if (c.rms()) return no("the model uses RMSNorm, RWKV-4 LayerNorm");
  return true;
}

Rwkv4Engine::Rwkv4Engine(const Model& m, WType wtype, bool take) : cfg_(m.config()), p_(std::make_unique<Impl>()) {
  std::string why;
  LINMIX_CHECK(supports(cfg_, &why), "the RWKV-4 engine cannot run this model: " + why);
  Impl& I = *p_;
  I.wt = wtype;
  I.V = cfg_.vocab, I.C = cfg_.d_model, I.F = cfg_.ffn_width(), I.L = cfg_.n_layer;
  engine::Weights W(m, take);
  auto vec = [&](const std::string& n) { return W.vec(n); };
  auto mat = [&](const std::string& n, WType t) { return W.mat(n, t); };
  I.emb = vec("emb.weight");
  if (cfg_.ln0) I.ln0w = vec("blocks.0.ln0.weight"), I.ln0b = vec("blocks.0.ln0.bias");
  I.lnfw = vec("ln_out.weight"), I.lnfb = vec("ln_out.bias");
  I.head = mat("head.weight", wtype);
  I.state = {{"att_prev", {I.C}, 0.0f}, {"state.a", {1, I.C}, 0.0f}, {"state.b", {1, I.C}, 0.0f}, {"state.p", {1, I.C}, kInitP}};
  I.layers.resize(I.L);
  for (int64_t l = 0; l < I.L; ++l) {
    Impl::Layer& y = I.layers[l];
    y.ln1w = vec(P(l, "ln1.weight")), y.ln1b = vec(P(l, "ln1.bias"));
    y.ln2w = vec(P(l, "ln2.weight")), y.ln2b = vec(P(l, "ln2.bias"));
    y.amk = vec(P(l, "att.time_mix_k")), y.amv = vec(P(l, "att.time_mix_v")), y.amr = vec(P(l, "att.time_mix_r"));
    y.w = vec(P(l, "att.time_decay"));
    for (float& e : y.w) e = std::exp(e);  // decay rate w = exp(time_decay) > 0
    y.u = vec(P(l, "att.time_first"));
    y.fmk = vec(P(l, "ffn.time_mix_k")), y.fmr = vec(P(l, "ffn.time_mix_r"));
    y.Wk = mat(P(l, "att.key.weight"), wtype), y.Wv = mat(P(l, "att.value.weight"), wtype);
    y.Wr = mat(P(l, "att.receptance.weight"), wtype), y.Wo = mat(P(l, "att.output.weight"), wtype);
    y.Fk = mat(P(l, "ffn.key.weight"), wtype), y.Fv = mat(P(l, "ffn.value.weight"), wtype);
    y.Fr = mat(P(l, "ffn.receptance.weight"), wtype);
  }
  const int64_t C = I.C;
  for (auto* s : {&I.x, &I.a, &I.xk, &I.xv, &I.xr, &I.k, &I.v, &I.r, &I.y, &I.o}) s->assign(C, 0.0f);
  I.h.assign(I.F, 0.0f);
}

Rwkv4Engine::~Rwkv4Engine() = default;

Model::State Rwkv4Engine::new_state() const { return Model::State(cfg_.n_layer, cfg_.d_model); }

double Rwkv4Engine::step_bytes() const {
  const Impl& I = *p_;
  double b = double(I.head.bytes()) + 4.0 * I.C * 5;  // head, embedding row, ln0, ln_out
  for (const auto& y : I.layers)
    b += double(y.Wk.bytes() + y.Wv.bytes() + y.Wr.bytes() + y.Wo.bytes() + y.Fk.bytes() + y.Fv.bytes() +
                y.Fr.bytes()) +
         4.0 * I.C * 11;
  return b;
}

double Rwkv4Engine::flops_per_token(bool with_head) const {
  const Impl& I = *p_;
  return 2.0 * double(I.L) * double(5 * I.C * I.C + 2 * I.C * I.F) + (with_head ? 2.0 * double(I.V * I.C) : 0.0);
}


void Rwkv4Engine::step(int32_t token, Model::State& st, float* logits) {
  Impl& I = *p_;
  const int64_t C = I.C, F = I.F;
  LINMIX_CHECK(token >= 0 && token < I.V, "token " + std::to_string(token) + " is outside the vocabulary");
  engine::ensure_layer_states(st, I.L, I.state, C);
  float *x = I.x.data(), *a = I.a.data(), *xk = I.xk.data(), *xv = I.xv.data(), *xr = I.xr.data(), *k = I.k.data(),
        *v = I.v.data(), *r = I.r.data(), *y = I.y.data(), *h = I.h.data(), *o = I.o.data();
  if (cfg_.ln0) layernorm_rows(x, I.emb.data() + int64_t(token) * C, I.ln0w.data(), I.ln0b.data(), 1, C);
  else std::copy(I.emb.data() + int64_t(token) * C, I.emb.data() + int64_t(token + 1) * C, x);
  for (int64_t l = 0; l < I.L; ++l) {
    const Impl::Layer& Y = I.layers[l];
    float* prev = st.layer[l].at("att_prev").ptr();
    layernorm_rows(a, x, Y.ln1w.data(), Y.ln1b.data(), 1, C);
    for (int64_t c = 0; c < C; ++c) {
      xk[c] = a[c] * Y.amk[c] + prev[c] * (1 - Y.amk[c]);
      xv[c] = a[c] * Y.amv[c] + prev[c] * (1 - Y.amv[c]);
      xr[c] = a[c] * Y.amr[c] + prev[c] * (1 - Y.amr[c]);
    }
    std::copy(a, a + C, prev);
    const GemvJob kvr[] = {{&Y.Wk, xk, k}, {&Y.Wv, xv, v}, {&Y.Wr, xr, r}};
    gemv_many(kvr, 3);  // one parallel region for the three
    auto& ms = st.layer[l];
    rwkv4_scan(y, ms["state.a"].ptr(), ms["state.b"].ptr(), ms["state.p"].ptr(), k, v, Y.w.data(), Y.u.data(), 1, C,
               C);
    for (int64_t c = 0; c < C; ++c) y[c] *= sigmoidf(r[c]);
    gemv(Y.Wo, y, o);
    for (int64_t c = 0; c < C; ++c) x[c] += o[c];
    float* prev2 = st.ffn_prev[l].data();
    layernorm_rows(a, x, Y.ln2w.data(), Y.ln2b.data(), 1, C);
    for (int64_t c = 0; c < C; ++c) {
      xk[c] = a[c] * Y.fmk[c] + prev2[c] * (1 - Y.fmk[c]);
      xr[c] = a[c] * Y.fmr[c] + prev2[c] * (1 - Y.fmr[c]);
    }
    std::copy(a, a + C, prev2);
    gemv(Y.Fk, xk, h);
    for (int64_t i = 0; i < F; ++i) h[i] = h[i] > 0 ? h[i] * h[i] : 0.0f;
    const GemvJob vr[] = {{&Y.Fv, h, o}, {&Y.Fr, xr, r}};
    gemv_many(vr, 2);
    for (int64_t c = 0; c < C; ++c) x[c] += sigmoidf(r[c]) * o[c];
  }
  layernorm_rows(a, x, I.lnfw.data(), I.lnfb.data(), 1, C);
  if (logits) gemv(I.head, a, logits);
  st.pos += 1;
}

void Rwkv4Engine::sequence(const int32_t* tokens, int64_t T, Model::State& st, float* logits, bool all_logits) {
  Impl& I = *p_;
  const int64_t C = I.C, F = I.F, V = I.V;
  LINMIX_CHECK(T >= 1, "sequence: no tokens");
  for (int64_t t = 0; t < T; ++t)
    LINMIX_CHECK(tokens[t] >= 0 && tokens[t] < V, "token " + std::to_string(tokens[t]) + " is outside the vocabulary");
  engine::ensure_layer_states(st, I.L, I.state, C);
  for (int64_t t0 = 0; t0 < T; t0 += kChunk) {
    const int64_t n = std::min(kChunk, T - t0), NC = n * C;
    for (auto* s : {&I.X, &I.A, &I.XK, &I.XV, &I.XR, &I.K, &I.Vv, &I.R, &I.Y}) s->resize(size_t(NC));
    I.H.resize(size_t(n * F));
    float *X = I.X.data(), *A = I.A.data(), *XK = I.XK.data(), *XV = I.XV.data(), *XR = I.XR.data(),
          *K = I.K.data(), *Vv = I.Vv.data(), *R = I.R.data(), *Y = I.Y.data(), *H = I.H.data();
    for (int64_t t = 0; t < n; ++t)
      std::copy(I.emb.data() + int64_t(tokens[t0 + t]) * C, I.emb.data() + int64_t(tokens[t0 + t] + 1) * C, X + t * C);
    if (cfg_.ln0) layernorm_rows(X, X, I.ln0w.data(), I.ln0b.data(), n, C);
    for (int64_t l = 0; l < I.L; ++l) {
      const Impl::Layer& L = I.layers[l];
      // token shift: row t mixes with row t-1, row 0 with the state's last row
      auto shift_mix = [&](const float* src, float* prev, const std::vector<float>* mixes[],
                           float* outs[], int nm) {
#pragma omp parallel for schedule(static)
        for (int64_t t = 0; t < n; ++t) {
          const float* p = t ? src + (t - 1) * C : prev;
          for (int j = 0; j < nm; ++j) {
            const float* m = mixes[j]->data();
            float* d = outs[j] + t * C;
            for (int64_t c = 0; c < C; ++c) d[c] = src[t * C + c] * m[c] + p[c] * (1 - m[c]);
          }
        }
        std::copy(src + (n - 1) * C, src + n * C, prev);
      };
      layernorm_rows(A, X, L.ln1w.data(), L.ln1b.data(), n, C);
      {
        const std::vector<float>* mixes[] = {&L.amk, &L.amv, &L.amr};
        float* outs[] = {XK, XV, XR};
        shift_mix(A, st.layer[l].at("att_prev").data.data(), mixes, outs, 3);
      }
      I.matmul(K, XK, L.Wk, n, false), I.matmul(Vv, XV, L.Wv, n, false), I.matmul(R, XR, L.Wr, n, false);
      auto& ms = st.layer[l];
      float *sa = ms["state.a"].ptr(), *sb = ms["state.b"].ptr(), *sp = ms["state.p"].ptr();
      const int64_t nblk = (C + kScanBlock - 1) / kScanBlock;
#pragma omp parallel for schedule(static)
      for (int64_t b = 0; b < nblk; ++b) {
        const int64_t c0 = b * kScanBlock, m = std::min(kScanBlock, C - c0);
        rwkv4_scan(Y + c0, sa + c0, sb + c0, sp + c0, K + c0, Vv + c0, L.w.data() + c0, L.u.data() + c0, n, m, C);
        for (int64_t t = 0; t < n; ++t)
          for (int64_t c = c0; c < c0 + m; ++c) Y[t * C + c] *= sigmoidf(R[t * C + c]);
      }
      I.matmul(X, Y, L.Wo, n, true);  // x += Wo (r * wkv)
      layernorm_rows(A, X, L.ln2w.data(), L.ln2b.data(), n, C);
      {
        const std::vector<float>* mixes[] = {&L.fmk, &L.fmr};
        float* outs[] = {XK, XR};
        shift_mix(A, st.ffn_prev[l].data(), mixes, outs, 2);
      }
      I.matmul(H, XK, L.Fk, n, false);
#pragma omp parallel for schedule(static)
      for (int64_t i = 0; i < n * F; ++i) H[i] = H[i] > 0 ? H[i] * H[i] : 0.0f;
      I.matmul(Vv, H, L.Fv, n, false), I.matmul(R, XR, L.Fr, n, false);
#pragma omp parallel for schedule(static)
      for (int64_t i = 0; i < NC; ++i) X[i] += sigmoidf(R[i]) * Vv[i];
    }
    const bool last_chunk = t0 + n == T;
    if (all_logits && logits) {
      layernorm_rows(A, X, I.lnfw.data(), I.lnfb.data(), n, C);
      I.matmul(logits + t0 * V, A, I.head, n, false);
    } else if (last_chunk && logits) {
      layernorm_rows(A, X + (n - 1) * C, I.lnfw.data(), I.lnfb.data(), 1, C);
      gemv(I.head, A, logits);
    }
  }
  st.pos += T;
}

}  // namespace linmix
