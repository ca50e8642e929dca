// flow — Flow-Attention (Wu et al. 2022, "Flowformer"), exactly as MIXERS.md writes it
// (eq. 5-9 of the paper; causal version as the paper's causal code: every sum a prefix sum,
// normalised by the position count r_i = i + 1). Q = sigma(q), K = sigma(k), eps = 1e-6.
// parallel: one O(T D) pass for the flow scalars (incoming I, outgoing O, conserved
// Ihat / Ohat, allocation, competition), then the kernelised product
// y_i = alloc_i (Q_i I_i / r_i)^T sum_j K_j (v_j comp_j)^T through kernels/linear_product.
// recurrent: the prefix sums and KV (D,E) as state.
#include "../kernels/linear_product.h"
#include "../ref/attention_ref.h"
#include "common.h"
#include "linmix/kernels.h"

namespace linmix {

namespace {

constexpr float kEps = 1e-6f;

inline float dot_eps(const float* a, const float* b, int64_t D) {  // (a + eps) . (b + eps)
  float s = 0.0f;
  for (int64_t x = 0; x < D; ++x) s += (a[x] + kEps) * (b[x] + kEps);
  return s;
}

}  // namespace

// State of one sequence, per head: prefix sums sumK, sumQ, sumKO, sumQI: (H,D);
// sumexp: (H) = sum exp(Ohat); KV: (H,D,E) = sum K_j (v_j comp_j)^T; pos = tokens seen.
struct FlowState {
  int64_t H = 0, D = 0, E = 0, pos = 0;
  std::vector<float> sumK, sumQ, sumKO, sumQI, sumexp, KV;
};

void flow_step(float* y, FlowState& st, const float* q, const float* k, const float* v, std::vector<float>& scratch) {
  const int64_t H = st.H, D = st.D, E = st.E;
  const float r = float(st.pos + 1);
  scratch.resize(static_cast<size_t>(2 * D));
  float *Q = scratch.data(), *K = Q + D;
  for (int64_t h = 0; h < H; ++h) {
    for (int64_t x = 0; x < D; ++x) Q[x] = sigmoidf(q[h * D + x]), K[x] = sigmoidf(k[h * D + x]);
    float *sK = &st.sumK[h * D], *sQ = &st.sumQ[h * D], *sKO = &st.sumKO[h * D], *sQI = &st.sumQI[h * D];
    for (int64_t x = 0; x < D; ++x) sK[x] += K[x], sQ[x] += Q[x];
    const float I = r / dot_eps(Q, sK, D), O = r / dot_eps(K, sQ, D);
    for (int64_t x = 0; x < D; ++x) sKO[x] += K[x] * O, sQI[x] += Q[x] * I;
    const float Ihat = dot_eps(Q, sKO, D) / r;
    const float Ohat = std::clamp(dot_eps(K, sQI, D) / r, -1.0f, 1.0f);
    const float alloc = sigmoidf(Ihat);
    st.sumexp[h] += std::exp(Ohat);
    const float comp = std::exp(Ohat) / st.sumexp[h] * r;
    float* KV = &st.KV[h * D * E];
    for (int64_t x = 0; x < D; ++x)
      for (int64_t e = 0; e < E; ++e) KV[x * E + e] += K[x] * v[h * E + e] * comp;
    float* yr = y + h * E;
    std::fill(yr, yr + E, 0.0f);
    for (int64_t x = 0; x < D; ++x) {
      const float qs = Q[x] * I / r;
      for (int64_t e = 0; e < E; ++e) yr[e] += qs * KV[x * E + e];
    }
    for (int64_t e = 0; e < E; ++e) yr[e] *= alloc;
  }
  st.pos += 1;
}

void flow_forward(float* y, const float* q, const float* k, const float* v, const AttnDims& d, bool causal) {
  const int64_t B = d.B, T = d.T, H = d.H, D = d.D, E = d.E;
#pragma omp parallel
  {
    // Q, K: (T,D) sigmoid rows, Q later scaled to Q I / r; Vc: (T,E) = v comp;
    // alloc: (T); scalars I, O, Ohat: (T); running sums: (D).
    std::vector<float> Q(T * D), K(T * D), Vc(T * E), alloc(T), I(T), O(T), Oh(T), sK(D), sQ(D), sKO(D), sQI(D);
#pragma omp for collapse(2) schedule(dynamic)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < H; ++h) {
        const int64_t row0 = b * T * H + h;
        for (int64_t t = 0; t < T; ++t)
          for (int64_t x = 0; x < D; ++x) {
            Q[t * D + x] = sigmoidf(q[(row0 + t * H) * D + x]);
            K[t * D + x] = sigmoidf(k[(row0 + t * H) * D + x]);
          }
        std::fill(sK.begin(), sK.end(), 0.0f);
        std::fill(sQ.begin(), sQ.end(), 0.0f);
        std::fill(sKO.begin(), sKO.end(), 0.0f);
        std::fill(sQI.begin(), sQI.end(), 0.0f);
        if (causal) {
          float sumexp = 0.0f;
          for (int64_t t = 0; t < T; ++t) {
            const float r = float(t + 1);
            const float *Qt = &Q[t * D], *Kt = &K[t * D];
            for (int64_t x = 0; x < D; ++x) sK[x] += Kt[x], sQ[x] += Qt[x];
            I[t] = r / dot_eps(Qt, sK.data(), D);
            O[t] = r / dot_eps(Kt, sQ.data(), D);
            for (int64_t x = 0; x < D; ++x) sKO[x] += Kt[x] * O[t], sQI[x] += Qt[x] * I[t];
            alloc[t] = sigmoidf(dot_eps(Qt, sKO.data(), D) / r);
            const float ohat = std::clamp(dot_eps(Kt, sQI.data(), D) / r, -1.0f, 1.0f);
            sumexp += std::exp(ohat);
            const float comp = std::exp(ohat) / sumexp * r;
            for (int64_t e = 0; e < E; ++e) Vc[t * E + e] = v[(row0 + t * H) * E + e] * comp;
            for (int64_t x = 0; x < D; ++x) Q[t * D + x] *= I[t] / r;
          }
        } else {
          for (int64_t t = 0; t < T; ++t)
            for (int64_t x = 0; x < D; ++x) sK[x] += K[t * D + x], sQ[x] += Q[t * D + x];
          for (int64_t t = 0; t < T; ++t) {
            I[t] = 1.0f / dot_eps(&Q[t * D], sK.data(), D);
            O[t] = 1.0f / dot_eps(&K[t * D], sQ.data(), D);
            for (int64_t x = 0; x < D; ++x) sKO[x] += K[t * D + x] * O[t], sQI[x] += Q[t * D + x] * I[t];
          }
          float omax = kNegInf, sumexp = 0.0f;
          for (int64_t t = 0; t < T; ++t) {
            alloc[t] = sigmoidf(dot_eps(&Q[t * D], sKO.data(), D));
            Oh[t] = std::clamp(dot_eps(&K[t * D], sQI.data(), D), -1.0f, 1.0f);
            omax = std::max(omax, Oh[t]);
          }
          for (int64_t t = 0; t < T; ++t) sumexp += std::exp(Oh[t] - omax);
          for (int64_t t = 0; t < T; ++t) {
            const float comp = std::exp(Oh[t] - omax) / sumexp * float(T);
            for (int64_t e = 0; e < E; ++e) Vc[t * E + e] = v[(row0 + t * H) * E + e] * comp;
            for (int64_t x = 0; x < D; ++x) Q[t * D + x] *= I[t];
          }
        }
        float* yh = y + row0 * E;
        linear_product(yh, nullptr, Q.data(), K.data(), Vc.data(), {T, D, E, D, D, E, H * E, causal});
        for (int64_t t = 0; t < T; ++t)
          for (int64_t e = 0; e < E; ++e) yh[t * H * E + e] *= alloc[t];
      }
  }
}

namespace {

AttnDims attn_dims(const Call& c) { return {c.d("B"), c.d("T"), c.d("H"), c.d("D"), c.d("E")}; }

MixerSpec make_spec() {
  MixerSpec s;
  s.name = "flow";
  s.paper = "Wu et al. 2022, Flowformer: Linearizing Transformers with Conservation Flows";
  s.summary = "Flow-Attention: sigmoid kernels with flow conservation (competition, allocation)";
  s.inputs = {{"q", "B,T,H,D"}, {"k", "B,T,H,D"}, {"v", "B,T,H,E"}};
  s.state = {{"sumK", "B,H,D"}, {"sumQ", "B,H,D"}, {"sumKO", "B,H,D"}, {"sumQI", "B,H,D"},
             {"sumexp", "B,H"},  {"KV", "B,H,D,E"},  {"pos", "1"}};
  s.state_size = "H (D E + 4 D + 1) + 1 per sequence";
  s.time = "O(T H D E)";
  s.memory = "O(T (D + E)) per head";
  s.check = [](const Call& c) {
    if (c.has("state.pos"))
      LINMIX_CHECK(c.t("state.pos").data[0] >= 0 && c.t("state.pos").data[0] == std::floor(c.t("state.pos").data[0]),
                   "tensor 'state.pos': not a position");
  };
  s.y_dims = "B,T,H,E";
  set_reference(s, [](const Call& c, const auto& x) {
    using S = scalar_of<decltype(x)>;
    const AttnDims d = attn_dims(c);
    std::vector<S> y(d.B * d.T * d.H * d.E);
    ref::flow_ref<S>(y.data(), x.at("q").data(), x.at("k").data(), x.at("v").data(), d, c.causal);
    return y;
  });
  s.parallel = [](const Call& c) {
    const AttnDims d = attn_dims(c);
    Tensor y({d.B, d.T, d.H, d.E});
    flow_forward(y.ptr(), c.t("q").ptr(), c.t("k").ptr(), c.t("v").ptr(), d, c.causal);
    return TensorMap{{"y", std::move(y)}};
  };
  s.recurrent = [](const Call& c) {
    const AttnDims d = attn_dims(c);
    const int64_t H = d.H, D = d.D, E = d.E;
    TensorMap st_out;
    for (const char* n : {"sumK", "sumQ", "sumKO", "sumQI"}) st_out[std::string("state.") + n] = Tensor({d.B, H, D});
    st_out["state.sumexp"] = Tensor({d.B, H});
    st_out["state.KV"] = Tensor({d.B, H, D, E});
    int64_t pos = 0;
    if (c.has("state.KV")) {
      for (auto& [name, t] : st_out) t = c.t(name);
      pos = static_cast<int64_t>(c.t("state.pos").data[0]);
    }
    Tensor y({d.B, d.T, H, E});
    std::vector<float> scratch;
    for (int64_t b = 0; b < d.B; ++b) {
      FlowState st;
      st.H = H, st.D = D, st.E = E, st.pos = pos;
      auto load = [&](std::vector<float>& dst, const char* n, int64_t per) {
        const float* p = st_out.at(std::string("state.") + n).ptr() + b * per;
        dst.assign(p, p + per);
      };
      load(st.sumK, "sumK", H * D), load(st.sumQ, "sumQ", H * D), load(st.sumKO, "sumKO", H * D);
      load(st.sumQI, "sumQI", H * D), load(st.sumexp, "sumexp", H), load(st.KV, "KV", H * D * E);
      for (int64_t t = 0; t < d.T; ++t) {
        const int64_t row = (b * d.T + t) * H;
        flow_step(y.ptr() + row * E, st, c.t("q").ptr() + row * D, c.t("k").ptr() + row * D, c.t("v").ptr() + row * E,
                  scratch);
      }
      auto store = [&](const std::vector<float>& src, const char* n) {
        std::copy(src.begin(), src.end(), st_out.at(std::string("state.") + n).ptr() + b * int64_t(src.size()));
      };
      store(st.sumK, "sumK"), store(st.sumQ, "sumQ"), store(st.sumKO, "sumKO"), store(st.sumQI, "sumQI");
      store(st.sumexp, "sumexp"), store(st.KV, "KV");
    }
    st_out["state.pos"] = Tensor({1}, float(pos + d.T));
    st_out["y"] = std::move(y);
    return st_out;
  };
  return s;
}

}  // namespace

MixerSpec flow_spec() { return make_spec(); }

}  // namespace linmix
