// The language model: forward, backward and the recurrent step. Shapes: N = B*T rows of C.
#include "linmix/model.h"

#include <cmath>
#include <nlohmann/json.hpp>
#include <random>

#include "layers.h"
#include "linmix/kernels.h"
#include "linmix/mixer.h"

namespace linmix {

namespace {

using json = nlohmann::json;

enum class Kind { Attn, Aft, Rwkv, S4d, Flash, Mamba };

Kind kind_of(const std::string& m) {
  if (m == "softmax" || m == "linear" || m == "performer" || m == "flow" || m == "norm_linear" ||
      m == "block_softmax")
    return Kind::Attn;
  if (m == "aft_full" || m == "aft_local" || m == "aft_simple" || m == "aft_conv") return Kind::Aft;
  if (m == "rwkv4") return Kind::Rwkv;
  if (m == "s4d") return Kind::S4d;
  if (m == "flash") return Kind::Flash;
  if (m == "mamba") return Kind::Mamba;
  throw Error("mixer '" + m + "' has no causal form, so it cannot be a language-model layer");
}

float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }

std::string P(int64_t i, const char* name) { return "blocks." + std::to_string(i) + "." + name; }

}  // namespace

// ---------------------------------------------------------------- config

ModelConfig ModelConfig::from_json(const std::string& text) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {
    throw Error(std::string("model config is not valid JSON (") + e.what() + ")");
  }
  LINMIX_CHECK(j.is_object(), "model config must be a JSON object");
  ModelConfig c;
  static const std::vector<std::string> known = {"vocab",   "d_model",  "n_layer",  "n_head", "ctx",
                                                 "channel_mix", "ffn_mult", "features", "kernel", "ln0",
                                                 "mixer",   "params",   "layers", "state", "qk_dim", "expand", "pos_emb"};
  for (auto it = j.begin(); it != j.end(); ++it)
    LINMIX_CHECK(std::find(known.begin(), known.end(), it.key()) != known.end(),
                 "model config: unknown field '" + it.key() + "'");
  auto geti = [&](const char* k, int64_t& dst) {
    if (!j.contains(k)) return;
    LINMIX_CHECK(j[k].is_number_integer(), std::string("model config: '") + k + "' must be an integer");
    dst = j[k].get<int64_t>();
  };
  geti("vocab", c.vocab), geti("d_model", c.d_model), geti("n_layer", c.n_layer), geti("n_head", c.n_head);
  geti("ctx", c.ctx), geti("ffn_mult", c.ffn_mult), geti("features", c.features), geti("kernel", c.kernel);
  geti("state", c.state), geti("qk_dim", c.qk_dim), geti("expand", c.expand);
  if (j.contains("channel_mix")) {
    LINMIX_CHECK(j["channel_mix"].is_string(), "model config: 'channel_mix' must be a string");
    c.channel_mix = j["channel_mix"].get<std::string>();
  }
  if (j.contains("pos_emb")) {
    LINMIX_CHECK(j["pos_emb"].is_boolean(), "model config: 'pos_emb' must be true or false");
    c.pos_emb = j["pos_emb"].get<bool>() ? 1 : 0;
  }
  if (j.contains("ln0")) {
    LINMIX_CHECK(j["ln0"].is_boolean(), "model config: 'ln0' must be true or false");
    c.ln0 = j["ln0"].get<bool>();
  }
  auto params_of = [](const json& p) {
    std::map<std::string, std::string> out;
    LINMIX_CHECK(p.is_object(), "model config: 'params' must be an object");
    for (auto it = p.begin(); it != p.end(); ++it)
      out[it.key()] = it.value().is_string() ? it.value().get<std::string>() : it.value().dump();
    return out;
  };
  if (j.contains("layers")) {
    LINMIX_CHECK(j["layers"].is_array(), "model config: 'layers' must be an array");
    for (const json& l : j["layers"]) {
      LINMIX_CHECK(l.is_object() && l.contains("mixer") && l["mixer"].is_string(),
                   "model config: every layer needs a \"mixer\" name");
      c.layers.push_back({l["mixer"].get<std::string>(), l.contains("params") ? params_of(l["params"])
                                                                               : std::map<std::string, std::string>{}});
    }
    if (!j.contains("n_layer")) c.n_layer = static_cast<int64_t>(c.layers.size());
  } else {
    const std::string m = j.contains("mixer") ? j["mixer"].get<std::string>() : "rwkv4";
    const auto p = j.contains("params") ? params_of(j["params"]) : std::map<std::string, std::string>{};
    for (int64_t i = 0; i < c.n_layer; ++i) c.layers.push_back({m, p});
  }
  c.validate();
  return c;
}

ModelConfig ModelConfig::for_mixer(const std::string& mixer) {
  ModelConfig c;
  c.d_model = 128, c.n_layer = 4, c.n_head = 4, c.ctx = 256;
  find_mixer(mixer);  // unknown names fail here, naming the known ones
  c.channel_mix = kind_of(mixer) == Kind::Rwkv ? "rwkv" : "mlp";
  c.layers.assign(size_t(c.n_layer), LayerConfig{mixer, {}});
  c.validate();
  return c;
}

std::string ModelConfig::to_json() const {
  json j = {{"vocab", vocab},       {"d_model", d_model},   {"n_layer", n_layer}, {"n_head", n_head},
            {"ctx", ctx},           {"channel_mix", channel_mix}, {"ffn_mult", ffn_mult}, {"features", features},
            {"kernel", kernel},     {"ln0", ln0}, {"state", state}, {"qk_dim", qk_dim}, {"expand", expand},
            {"pos_emb", uses_pos_emb()}};
  j["layers"] = json::array();
  for (const auto& l : layers) j["layers"].push_back({{"mixer", l.mixer}, {"params", l.params}});
  return j.dump();
}

void ModelConfig::validate() const {
  LINMIX_CHECK(vocab >= 2 && vocab <= (1 << 20), "model config: vocab must be in [2, 2^20]");
  LINMIX_CHECK(d_model >= 1 && d_model <= 16384, "model config: d_model must be in [1, 16384]");
  LINMIX_CHECK(n_layer >= 1 && n_layer <= 256, "model config: n_layer must be in [1, 256]");
  LINMIX_CHECK(n_head >= 1 && d_model % n_head == 0, "model config: n_head must divide d_model");
  LINMIX_CHECK(ctx >= 1 && ctx <= (1 << 20), "model config: ctx must be in [1, 2^20]");
  LINMIX_CHECK(ffn_mult >= 1 && ffn_mult <= 64, "model config: ffn_mult must be in [1, 64]");
  LINMIX_CHECK(features >= 1 && kernel >= 1, "model config: features and kernel must be >= 1");
  LINMIX_CHECK(state >= 1 && state <= 1024 && qk_dim >= 1 && qk_dim <= 4096 && expand >= 1 && expand <= 16,
               "model config: state in [1, 1024], qk_dim in [1, 4096], expand in [1, 16]");
  LINMIX_CHECK(channel_mix == "mlp" || channel_mix == "rwkv",
               "model config: channel_mix must be \"mlp\" or \"rwkv\", found \"" + channel_mix + "\"");
  LINMIX_CHECK(static_cast<int64_t>(layers.size()) == n_layer,
               "model config: " + std::to_string(layers.size()) + " layers given for n_layer = " + std::to_string(n_layer));
  for (const auto& l : layers) {
    find_mixer(l.mixer);  // unknown names fail here
    kind_of(l.mixer);
    LINMIX_CHECK(find_mixer(l.mixer).causal_ok, "mixer '" + l.mixer + "' has no causal form for a language model");
  }
}

bool ModelConfig::uses_pos_emb() const {
  if (pos_emb >= 0) return pos_emb == 1;
  for (const auto& l : layers)  // default: the attention-like mixers carry no order of their own
    if (kind_of(l.mixer) == Kind::Attn || kind_of(l.mixer) == Kind::Flash) return true;
  return false;
}

bool is_buffer_param(const std::string& name) { return name.size() > 9 && name.rfind("att.proj") == name.size() - 8; }

// ---------------------------------------------------------------- parameters

Model::Model(ModelConfig cfg) : cfg_(std::move(cfg)) {
  cfg_.validate();
  const int64_t C = cfg_.d_model, V = cfg_.vocab, F = cfg_.ffn_mult * C;
  auto add = [&](const std::string& n, std::vector<int64_t> s) { params_[n] = Tensor(std::move(s)); };
  add("emb.weight", {V, C});
  if (cfg_.uses_pos_emb()) add("pos.weight", {cfg_.ctx, C});
  if (cfg_.ln0) add("blocks.0.ln0.weight", {C}), add("blocks.0.ln0.bias", {C});
  for (int64_t i = 0; i < cfg_.n_layer; ++i) {
    const std::string& m = cfg_.layers[i].mixer;
    for (const char* n : {"ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias"}) add(P(i, n), {C});
    if (kind_of(m) == Kind::Rwkv) {
      for (const char* n : {"att.time_mix_k", "att.time_mix_v", "att.time_mix_r", "att.time_decay", "att.time_first"})
        add(P(i, n), {C});
      for (const char* n : {"att.key.weight", "att.value.weight", "att.receptance.weight", "att.output.weight"})
        add(P(i, n), {C, C});
    } else if (kind_of(m) == Kind::S4d) {
      const int64_t N = cfg_.state;
      add(P(i, "att.log_dt"), {C}), add(P(i, "att.D"), {C}), add(P(i, "att.o.weight"), {C, C});
      // A_re = -exp(log_A_re) (as S4D parametrises it): the SSM stays stable whatever the optimizer does
      for (const char* n : {"att.log_A_re", "att.A_im", "att.C_re", "att.C_im"}) add(P(i, n), {C, N});
    } else if (kind_of(m) == Kind::Flash) {
      const int64_t e = cfg_.expand * C, S = cfg_.qk_dim;
      add(P(i, "att.wu.weight"), {e, C}), add(P(i, "att.wu.bias"), {e});
      add(P(i, "att.wv.weight"), {e, C}), add(P(i, "att.wv.bias"), {e});
      add(P(i, "att.wz.weight"), {S, C}), add(P(i, "att.wz.bias"), {S});
      add(P(i, "att.gamma"), {4, S}), add(P(i, "att.beta"), {4, S});
      add(P(i, "att.o.weight"), {C, e});
    } else if (kind_of(m) == Kind::Mamba) {
      const int64_t Ei = cfg_.expand * C, N = cfg_.state, R = (C + 15) / 16;
      add(P(i, "att.in_proj.weight"), {2 * Ei, C});
      add(P(i, "att.conv.weight"), {Ei, 4}), add(P(i, "att.conv.bias"), {Ei});
      add(P(i, "att.x_proj.weight"), {R + 2 * N, Ei});
      add(P(i, "att.dt_proj.weight"), {Ei, R}), add(P(i, "att.dt_proj.bias"), {Ei});
      add(P(i, "att.A_log"), {Ei, N}), add(P(i, "att.D"), {Ei});
      add(P(i, "att.out_proj.weight"), {C, Ei});
    } else {
      for (const char* n : {"att.q.weight", "att.k.weight", "att.v.weight", "att.o.weight"}) add(P(i, n), {C, C});
      if (m == "performer") add(P(i, "att.proj"), {cfg_.features, C / cfg_.n_head});
      if (m == "aft_full" || m == "aft_local") add(P(i, "att.w"), {cfg_.ctx, cfg_.ctx});
      if (m == "aft_conv") add(P(i, "att.u"), {cfg_.n_head, cfg_.kernel});
    }
    if (cfg_.channel_mix == "rwkv") {
      add(P(i, "ffn.time_mix_k"), {C}), add(P(i, "ffn.time_mix_r"), {C});
      add(P(i, "ffn.key.weight"), {F, C}), add(P(i, "ffn.value.weight"), {C, F});
      add(P(i, "ffn.receptance.weight"), {C, C});
    } else {
      add(P(i, "mlp.fc.weight"), {F, C}), add(P(i, "mlp.fc.bias"), {F});
      add(P(i, "mlp.proj.weight"), {C, F}), add(P(i, "mlp.proj.bias"), {C});
    }
  }
  add("ln_out.weight", {C}), add("ln_out.bias", {C});
  add("head.weight", {V, C});
}

int64_t Model::num_params() const {
  int64_t n = 0;
  for (const auto& [name, t] : params_)
    if (!is_buffer_param(name)) n += t.numel();
  return n;
}

void Model::init(uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const int64_t C = cfg_.d_model, L = cfg_.n_layer;
  const float std_out = 0.02f / std::sqrt(2.0f * float(L));
  for (auto& [name, t] : params_) {  // std::map: a fixed order, so the draw is deterministic
    auto ends = [&](const std::string& s) { return name.size() >= s.size() && name.rfind(s) == name.size() - s.size(); };
    const int64_t layer = name.rfind("blocks.", 0) == 0 ? std::atoll(name.c_str() + 7) : 0;
    const float depth = L > 1 ? float(layer) / float(L - 1) : 0.0f;
    if (ends("ln0.weight") || ends("ln1.weight") || ends("ln2.weight") || ends("ln_out.weight")) {
      std::fill(t.data.begin(), t.data.end(), 1.0f);
    } else if (ends(".bias") || ends("att.w") || ends("att.u")) {
      std::fill(t.data.begin(), t.data.end(), 0.0f);
    } else if (ends("time_mix_k") || ends("time_mix_v") || ends("time_mix_r")) {
      for (int64_t c = 0; c < C; ++c)  // RWKV-4's ratio init: later channels keep more of x
        t.data[c] = std::pow(float(c) / float(C), 1.0f - depth * 0.5f) * (ends("time_mix_v") ? 1.0f : 0.8f) + 0.1f;
    } else if (ends("time_decay")) {
      for (int64_t c = 0; c < C; ++c)
        t.data[c] = -5.0f + 8.0f * std::pow(float(c) / float(std::max<int64_t>(C - 1, 1)), 0.7f + 1.3f * depth);
    } else if (ends("time_first")) {
      std::fill(t.data.begin(), t.data.end(), std::log(0.3f));
    } else if (ends("att.log_dt")) {  // S4D: dt log-uniform in [1e-3, 1e-1]
      for (int64_t c = 0; c < C; ++c) t.data[c] = std::log(1e-3f) + std::log(100.0f) * float(c) / float(std::max<int64_t>(C - 1, 1));
    } else if (ends("att.log_A_re")) {  // S4D-Lin: A_n = -1/2 + i pi n
      std::fill(t.data.begin(), t.data.end(), std::log(0.5f));
    } else if (ends("att.A_im")) {
      for (int64_t r = 0; r < t.dim(0); ++r)
        for (int64_t n = 0; n < t.dim(1); ++n) t.data[r * t.dim(1) + n] = 3.14159265f * float(n);
    } else if (ends("att.C_re") || ends("att.C_im")) {
      for (float& x : t.data) x = 0.5f * normal(rng);
    } else if (ends("att.D") || ends("att.gamma")) {
      for (float& x : t.data) x = 1.0f + 0.02f * normal(rng);
    } else if (ends("att.beta") || ends("att.wu.bias") || ends("att.wv.bias") || ends("att.wz.bias")) {
      std::fill(t.data.begin(), t.data.end(), 0.0f);
    } else if (ends("att.A_log")) {  // Mamba: A = -(1..N)
      for (int64_t r = 0; r < t.dim(0); ++r)
        for (int64_t n = 0; n < t.dim(1); ++n) t.data[r * t.dim(1) + n] = std::log(float(n + 1));
    } else if (ends("att.dt_proj.bias")) {  // Mamba: softplus^-1 of dt log-uniform in [1e-3, 1e-1]
      for (int64_t r = 0; r < t.numel(); ++r) {
        const float dt = std::exp(std::log(1e-3f) + std::log(100.0f) * float(r) / float(std::max<int64_t>(t.numel() - 1, 1)));
        t.data[r] = dt + std::log(-std::expm1(-dt));
      }
    } else if (ends("att.conv.weight")) {
      for (float& x : t.data) x = 0.3f * normal(rng);
    } else if (ends("att.proj")) {
      t.data = orthogonal_gaussian_features(t.dim(0), t.dim(1), seed * 1000003 + static_cast<uint64_t>(layer));
    } else {
      const bool out = ends("att.o.weight") || ends("att.output.weight") || ends("mlp.proj.weight") ||
                       ends("ffn.value.weight") || ends("att.out_proj.weight");
      const float s = out ? std_out : 0.02f;
      for (float& x : t.data) x = s * normal(rng);
    }
  }
}

// ---------------------------------------------------------------- forward / backward

// Activations of one forward pass, kept for the backward. Per layer, all (N, C) unless noted.
struct Model::LayerActs {
    std::vector<float> x_in, a, mean1, rstd1, q, k, v, y, att_out, x_mid, b, mean2, rstd2;
    std::vector<float> xx, xk, xv, xr, r, wkv, rw;           // rwkv time-mix
    std::vector<float> h_pre, h, xx2, xk2, xr2, kpre, kk, vv, r2;  // channel mix (h_pre, h, kpre, kk: (N,F))
    std::map<std::string, std::vector<float>> ex;  // s4d / flash / mamba intermediates, by name
};

struct Model::Acts {
  std::vector<LayerActs> layers;
  std::vector<float> x0, e0, mean0, rstd0, xf, lnf, meanf, rstdf, logits;
};

Model::~Model() = default;

namespace {

// Builds the mixer inputs of layer i from its projections. q, k, v: (N, C).
TensorMap mixer_inputs(const ModelConfig& cfg, const TensorMap& params, int64_t i, int64_t B, int64_t T,
                       const float* q, const float* k, const float* v) {
  const int64_t C = cfg.d_model, H = cfg.n_head, D = C / H;
  const std::string& m = cfg.layers[i].mixer;
  TensorMap in;
  const Kind kind = kind_of(m);
  const std::vector<int64_t> shape = kind == Kind::Attn ? std::vector<int64_t>{B, T, H, D}
                                                        : std::vector<int64_t>{B, T, C};
  auto put = [&](const char* n, const float* src) {
    if (!src) return;
    Tensor t(shape);
    std::copy(src, src + t.numel(), t.data.begin());
    in[n] = std::move(t);
  };
  put("q", q), put("k", k), put("v", v);
  if (m == "performer") in["proj"] = params.at(P(i, "att.proj"));
  if (m == "aft_full" || m == "aft_local") in["w"] = params.at(P(i, "att.w"));
  if (m == "aft_conv") in["u"] = params.at(P(i, "att.u"));
  if (kind == Kind::Rwkv) {
    Tensor w({C});
    const Tensor& td = params.at(P(i, "att.time_decay"));
    for (int64_t c = 0; c < C; ++c) w.data[c] = std::exp(td.data[c]);
    in["w"] = std::move(w);
    in["u"] = params.at(P(i, "att.time_first"));
  }
  return in;
}

void mix_shift(float* out, const float* x, const float* xx, const float* mix, int64_t N, int64_t C) {
  for (int64_t i = 0; i < N; ++i)
    for (int64_t c = 0; c < C; ++c) out[i * C + c] = x[i * C + c] * mix[c] + xx[i * C + c] * (1.0f - mix[c]);
}

float silu(float x) { return x / (1.0f + std::exp(-x)); }
float dsilu(float x) {  // d silu / dx
  const float s = 1.0f / (1.0f + std::exp(-x));
  return s * (1.0f + x * (1.0f - s));
}

// Mamba's causal depthwise convolution (kernel 4): out[t,c] = b[c] + sum_j w[c,j] x[t-3+j, c],
// rows before the sequence start (or, one token at a time, the carried `prev` rows) are zeros.
void conv4_forward(float* out, const float* x, const float* w, const float* b, int64_t B, int64_t T, int64_t E) {
  for (int64_t bb = 0; bb < B; ++bb)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t c = 0; c < E; ++c) {
        float acc = b[c];
        for (int64_t j = 0; j < 4; ++j) {
          const int64_t s = t - 3 + j;
          if (s >= 0) acc += w[c * 4 + j] * x[(bb * T + s) * E + c];
        }
        out[(bb * T + t) * E + c] = acc;
      }
}
void conv4_backward(float* dx, float* dw, float* db, const float* dout, const float* x, const float* w, int64_t B,
                    int64_t T, int64_t E) {
  for (int64_t bb = 0; bb < B; ++bb)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t c = 0; c < E; ++c) {
        const float g = dout[(bb * T + t) * E + c];
        db[c] += g;
        for (int64_t j = 0; j < 4; ++j) {
          const int64_t s = t - 3 + j;
          if (s < 0) continue;
          dw[c * 4 + j] += g * x[(bb * T + s) * E + c];
          dx[(bb * T + s) * E + c] += g * w[c * 4 + j];
        }
      }
}

}  // namespace

double Model::forward_backward(const int32_t* inputs, const int32_t* targets, int64_t B, int64_t T,
                               TensorMap* grads, float grad_scale, int64_t* counted_out) {
  const ModelConfig& c = cfg_;
  const int64_t C = c.d_model, V = c.vocab, F = c.ffn_mult * C, N = B * T;
  LINMIX_CHECK(T >= 1 && B >= 1, "forward: empty batch");
  for (int64_t i = 0; i < N; ++i)
    LINMIX_CHECK(inputs[i] >= 0 && inputs[i] < V, "token " + std::to_string(inputs[i]) + " is outside the vocabulary");
  if (!acts_) acts_ = std::make_unique<Acts>();
  Acts& A = *acts_;
  A.layers.resize(c.n_layer);
  auto W = [&](const std::string& n) { return params_.at(n).ptr(); };
  auto sized = [](std::vector<float>& v, int64_t n) -> float* {
    v.assign(static_cast<size_t>(n), 0.0f);
    return v.data();
  };

  // embedding (+ ln0)
  float* x = sized(A.x0, N * C);
  for (int64_t i = 0; i < N; ++i) std::copy(W("emb.weight") + inputs[i] * C, W("emb.weight") + (inputs[i] + 1) * C, x + i * C);
  if (c.uses_pos_emb()) {  // learned absolute positions (GPT-2 style)
    LINMIX_CHECK(T <= c.ctx, "sequence of " + std::to_string(T) + " tokens is longer than the model's ctx " +
                                 std::to_string(c.ctx) + " (it has learned positions)");
    for (int64_t i = 0; i < N; ++i)
      for (int64_t ch = 0; ch < C; ++ch) x[i * C + ch] += W("pos.weight")[(i % T) * C + ch];
  }
  if (c.ln0) {
    sized(A.e0, N * C), sized(A.mean0, N), sized(A.rstd0, N);
    nn::layernorm_forward(A.e0.data(), A.mean0.data(), A.rstd0.data(), A.x0.data(), W("blocks.0.ln0.weight"),
                          W("blocks.0.ln0.bias"), N, C);
  }
  std::vector<float> cur(c.ln0 ? A.e0 : A.x0);
  for (int64_t l = 0; l < c.n_layer; ++l) {
    auto& L = A.layers[l];
    const std::string& m = c.layers[l].mixer;
    L.x_in = cur;
    sized(L.a, N * C), sized(L.mean1, N), sized(L.rstd1, N);
    nn::layernorm_forward(L.a.data(), L.mean1.data(), L.rstd1.data(), L.x_in.data(), W(P(l, "ln1.weight")),
                          W(P(l, "ln1.bias")), N, C);
    sized(L.att_out, N * C);
    if (kind_of(m) == Kind::Rwkv) {
      sized(L.xx, N * C), sized(L.xk, N * C), sized(L.xv, N * C), sized(L.xr, N * C);
      nn::shift_forward(L.xx.data(), L.a.data(), B, T, C);
      mix_shift(L.xk.data(), L.a.data(), L.xx.data(), W(P(l, "att.time_mix_k")), N, C);
      mix_shift(L.xv.data(), L.a.data(), L.xx.data(), W(P(l, "att.time_mix_v")), N, C);
      mix_shift(L.xr.data(), L.a.data(), L.xx.data(), W(P(l, "att.time_mix_r")), N, C);
      sized(L.k, N * C), sized(L.v, N * C), sized(L.r, N * C);
      nn::matmul_forward(L.k.data(), L.xk.data(), W(P(l, "att.key.weight")), nullptr, N, C, C);
      nn::matmul_forward(L.v.data(), L.xv.data(), W(P(l, "att.value.weight")), nullptr, N, C, C);
      nn::matmul_forward(L.r.data(), L.xr.data(), W(P(l, "att.receptance.weight")), nullptr, N, C, C);
      for (float& r : L.r) r = sigmoid(r);
      L.wkv = run_mixer(m, Mode::Parallel, true, c.layers[l].params,
                        mixer_inputs(c, params_, l, B, T, nullptr, L.k.data(), L.v.data()))
                  .at("y")
                  .data;
      sized(L.rw, N * C);
      for (int64_t i = 0; i < N * C; ++i) L.rw[i] = L.r[i] * L.wkv[i];
      nn::matmul_forward(L.att_out.data(), L.rw.data(), W(P(l, "att.output.weight")), nullptr, N, C, C);
    } else if (kind_of(m) == Kind::S4d) {  // y = s4d(a); out = gelu(y) Wo^T
      L.y = run_mixer(m, Mode::Parallel, true, c.layers[l].params, s4d_inputs(l, B, T, L.a.data())).at("y").data;
      auto& g = L.ex["gelu"];
      g.resize(N * C);
      nn::gelu_forward(g.data(), L.y.data(), N * C);
      nn::matmul_forward(L.att_out.data(), g.data(), W(P(l, "att.o.weight")), nullptr, N, C, C);
    } else if (kind_of(m) == Kind::Flash) {
      flash_layer_forward(l, B, T, L);
    } else if (kind_of(m) == Kind::Mamba) {
      mamba_layer_forward(l, B, T, L);
    } else {
      sized(L.q, N * C), sized(L.k, N * C), sized(L.v, N * C);
      nn::matmul_forward(L.q.data(), L.a.data(), W(P(l, "att.q.weight")), nullptr, N, C, C);
      nn::matmul_forward(L.k.data(), L.a.data(), W(P(l, "att.k.weight")), nullptr, N, C, C);
      nn::matmul_forward(L.v.data(), L.a.data(), W(P(l, "att.v.weight")), nullptr, N, C, C);
      L.y = run_mixer(m, Mode::Parallel, true, c.layers[l].params,
                      mixer_inputs(c, params_, l, B, T, L.q.data(), L.k.data(), L.v.data()))
                .at("y")
                .data;
      nn::matmul_forward(L.att_out.data(), L.y.data(), W(P(l, "att.o.weight")), nullptr, N, C, C);
    }
    sized(L.x_mid, N * C);
    for (int64_t i = 0; i < N * C; ++i) L.x_mid[i] = L.x_in[i] + L.att_out[i];
    sized(L.b, N * C), sized(L.mean2, N), sized(L.rstd2, N);
    nn::layernorm_forward(L.b.data(), L.mean2.data(), L.rstd2.data(), L.x_mid.data(), W(P(l, "ln2.weight")),
                          W(P(l, "ln2.bias")), N, C);
    std::vector<float> out2(N * C);
    if (c.channel_mix == "rwkv") {
      sized(L.xx2, N * C), sized(L.xk2, N * C), sized(L.xr2, N * C);
      nn::shift_forward(L.xx2.data(), L.b.data(), B, T, C);
      mix_shift(L.xk2.data(), L.b.data(), L.xx2.data(), W(P(l, "ffn.time_mix_k")), N, C);
      mix_shift(L.xr2.data(), L.b.data(), L.xx2.data(), W(P(l, "ffn.time_mix_r")), N, C);
      sized(L.kpre, N * F), sized(L.kk, N * F), sized(L.vv, N * C), sized(L.r2, N * C);
      nn::matmul_forward(L.kpre.data(), L.xk2.data(), W(P(l, "ffn.key.weight")), nullptr, N, C, F);
      for (int64_t i = 0; i < N * F; ++i) L.kk[i] = L.kpre[i] > 0 ? L.kpre[i] * L.kpre[i] : 0.0f;
      nn::matmul_forward(L.vv.data(), L.kk.data(), W(P(l, "ffn.value.weight")), nullptr, N, F, C);
      nn::matmul_forward(L.r2.data(), L.xr2.data(), W(P(l, "ffn.receptance.weight")), nullptr, N, C, C);
      for (int64_t i = 0; i < N * C; ++i) L.r2[i] = sigmoid(L.r2[i]), out2[i] = L.r2[i] * L.vv[i];
    } else {
      sized(L.h_pre, N * F), sized(L.h, N * F);
      nn::matmul_forward(L.h_pre.data(), L.b.data(), W(P(l, "mlp.fc.weight")), W(P(l, "mlp.fc.bias")), N, C, F);
      nn::gelu_forward(L.h.data(), L.h_pre.data(), N * F);
      nn::matmul_forward(out2.data(), L.h.data(), W(P(l, "mlp.proj.weight")), W(P(l, "mlp.proj.bias")), N, F, C);
    }
    for (int64_t i = 0; i < N * C; ++i) cur[i] = L.x_mid[i] + out2[i];
  }
  A.xf = cur;
  sized(A.lnf, N * C), sized(A.meanf, N), sized(A.rstdf, N), sized(A.logits, N * V);
  nn::layernorm_forward(A.lnf.data(), A.meanf.data(), A.rstdf.data(), A.xf.data(), W("ln_out.weight"),
                        W("ln_out.bias"), N, C);
  nn::matmul_forward(A.logits.data(), A.lnf.data(), W("head.weight"), nullptr, N, C, V);
  if (!targets) return 0.0;

  // loss; dlogits scaled so that the gradient is of the mean over counted positions
  // the scale needs the number of scored positions before the (single) cross-entropy pass
  const int64_t counted = std::count_if(targets, targets + N, [](int32_t t) { return t >= 0; });
  if (counted_out) *counted_out = counted;
  std::vector<float> dlogits(grads ? N * V : 0);
  const double loss_sum = nn::crossentropy_forward_backward(
      grads ? dlogits.data() : nullptr, A.logits.data(), targets, N, V,
      counted ? grad_scale / float(counted) : 0.0f, nullptr);
  const double loss = counted ? loss_sum / double(counted) : 0.0;
  if (!grads) return loss;

  // ---------------- backward
  auto G = [&](const std::string& n) { return grad_slot(*grads, n); };
  std::vector<float> dlnf(N * C), dx(N * C, 0.0f);
  nn::matmul_backward(dlnf.data(), G("head.weight"), nullptr, dlogits.data(), A.lnf.data(), W("head.weight"), N, C, V);
  nn::layernorm_backward(dx.data(), G("ln_out.weight"), G("ln_out.bias"), dlnf.data(), A.xf.data(), W("ln_out.weight"),
                         A.meanf.data(), A.rstdf.data(), N, C);
  for (int64_t l = c.n_layer - 1; l >= 0; --l) {
    auto& L = A.layers[l];
    const std::string& m = c.layers[l].mixer;
    // x_out = x_mid + channel_mix(ln2(x_mid)); dx holds d x_out
    std::vector<float> dout2(dx), db(N * C);
    if (c.channel_mix == "rwkv") {
      std::vector<float> dvv(N * C), dr2(N * C), dkk(N * F), dxk2(N * C), dxr2(N * C), dxx2(N * C, 0.0f);
      for (int64_t i = 0; i < N * C; ++i) {
        dvv[i] = dout2[i] * L.r2[i];
        dr2[i] = dout2[i] * L.vv[i] * L.r2[i] * (1.0f - L.r2[i]);
      }
      nn::matmul_backward(dxr2.data(), G(P(l, "ffn.receptance.weight")), nullptr, dr2.data(), L.xr2.data(),
                          W(P(l, "ffn.receptance.weight")), N, C, C);
      nn::matmul_backward(dkk.data(), G(P(l, "ffn.value.weight")), nullptr, dvv.data(), L.kk.data(),
                          W(P(l, "ffn.value.weight")), N, F, C);
      for (int64_t i = 0; i < N * F; ++i) dkk[i] = L.kpre[i] > 0 ? dkk[i] * 2.0f * L.kpre[i] : 0.0f;
      nn::matmul_backward(dxk2.data(), G(P(l, "ffn.key.weight")), nullptr, dkk.data(), L.xk2.data(),
                          W(P(l, "ffn.key.weight")), N, C, F);
      const float *mk = W(P(l, "ffn.time_mix_k")), *mr = W(P(l, "ffn.time_mix_r"));
      float *gmk = G(P(l, "ffn.time_mix_k")), *gmr = G(P(l, "ffn.time_mix_r"));
      for (int64_t i = 0; i < N; ++i)
        for (int64_t ch = 0; ch < C; ++ch) {
          const int64_t j = i * C + ch;
          db[j] = dxk2[j] * mk[ch] + dxr2[j] * mr[ch];
          dxx2[j] = dxk2[j] * (1.0f - mk[ch]) + dxr2[j] * (1.0f - mr[ch]);
          gmk[ch] += dxk2[j] * (L.b[j] - L.xx2[j]);
          gmr[ch] += dxr2[j] * (L.b[j] - L.xx2[j]);
        }
      nn::shift_backward(db.data(), dxx2.data(), B, T, C);
    } else {
      std::vector<float> dh(N * F);
      nn::matmul_backward(dh.data(), G(P(l, "mlp.proj.weight")), G(P(l, "mlp.proj.bias")), dout2.data(), L.h.data(),
                          W(P(l, "mlp.proj.weight")), N, F, C);
      nn::gelu_backward(dh.data(), L.h_pre.data(), dh.data(), N * F);
      nn::matmul_backward(db.data(), G(P(l, "mlp.fc.weight")), G(P(l, "mlp.fc.bias")), dh.data(), L.b.data(),
                          W(P(l, "mlp.fc.weight")), N, C, F);
    }
    // dx (d x_mid) = dx + ln2 backward(db)
    nn::layernorm_backward(dx.data(), G(P(l, "ln2.weight")), G(P(l, "ln2.bias")), db.data(), L.x_mid.data(),
                           W(P(l, "ln2.weight")), L.mean2.data(), L.rstd2.data(), N, C);
    // x_mid = x_in + att(ln1(x_in))
    std::vector<float> da(N * C, 0.0f);
    if (kind_of(m) == Kind::Rwkv) {
      std::vector<float> drw(N * C), dwkv(N * C), dr(N * C), dxk(N * C), dxv(N * C), dxr(N * C), dxx(N * C, 0.0f);
      nn::matmul_backward(drw.data(), G(P(l, "att.output.weight")), nullptr, dx.data(), L.rw.data(),
                          W(P(l, "att.output.weight")), N, C, C);
      for (int64_t i = 0; i < N * C; ++i) {
        dwkv[i] = drw[i] * L.r[i];
        dr[i] = drw[i] * L.wkv[i] * L.r[i] * (1.0f - L.r[i]);
      }
      TensorMap in = mixer_inputs(c, params_, l, B, T, nullptr, L.k.data(), L.v.data());
      in["dy"] = Tensor({B, T, C});
      in["dy"].data = dwkv;
      const TensorMap g = run_mixer(m, Mode::Parallel, true, c.layers[l].params, in, true);
      float *gtd = G(P(l, "att.time_decay")), *gtf = G(P(l, "att.time_first"));
      for (int64_t ch = 0; ch < C; ++ch) {
        gtd[ch] += g.at("dw").data[ch] * in.at("w").data[ch];  // w = exp(time_decay)
        gtf[ch] += g.at("du").data[ch];
      }
      nn::matmul_backward(dxk.data(), G(P(l, "att.key.weight")), nullptr, g.at("dk").ptr(), L.xk.data(),
                          W(P(l, "att.key.weight")), N, C, C);
      nn::matmul_backward(dxv.data(), G(P(l, "att.value.weight")), nullptr, g.at("dv").ptr(), L.xv.data(),
                          W(P(l, "att.value.weight")), N, C, C);
      nn::matmul_backward(dxr.data(), G(P(l, "att.receptance.weight")), nullptr, dr.data(), L.xr.data(),
                          W(P(l, "att.receptance.weight")), N, C, C);
      const float *mk = W(P(l, "att.time_mix_k")), *mv = W(P(l, "att.time_mix_v")), *mr = W(P(l, "att.time_mix_r"));
      float *gmk = G(P(l, "att.time_mix_k")), *gmv = G(P(l, "att.time_mix_v")), *gmr = G(P(l, "att.time_mix_r"));
      for (int64_t i = 0; i < N; ++i)
        for (int64_t ch = 0; ch < C; ++ch) {
          const int64_t j = i * C + ch;
          da[j] = dxk[j] * mk[ch] + dxv[j] * mv[ch] + dxr[j] * mr[ch];
          dxx[j] = dxk[j] * (1.0f - mk[ch]) + dxv[j] * (1.0f - mv[ch]) + dxr[j] * (1.0f - mr[ch]);
          const float diff = L.a[j] - L.xx[j];
          gmk[ch] += dxk[j] * diff, gmv[ch] += dxv[j] * diff, gmr[ch] += dxr[j] * diff;
        }
      nn::shift_backward(da.data(), dxx.data(), B, T, C);
    } else if (kind_of(m) == Kind::S4d) {
      std::vector<float> dg(N * C);
      nn::matmul_backward(dg.data(), G(P(l, "att.o.weight")), nullptr, dx.data(), L.ex["gelu"].data(),
                          W(P(l, "att.o.weight")), N, C, C);
      nn::gelu_backward(dg.data(), L.y.data(), dg.data(), N * C);
      TensorMap in = s4d_inputs(l, B, T, L.a.data());
      in["dy"] = Tensor({B, T, C});
      in["dy"].data = dg;
      const TensorMap g = run_mixer(m, Mode::Parallel, true, c.layers[l].params, in, true);
      da = g.at("du").data;
      for (const char* n : {"log_dt", "A_im", "C_re", "C_im", "D"}) {
        float* gp = G(P(l, (std::string("att.") + n).c_str()));
        const Tensor& d = g.at(std::string("d") + n);
        for (int64_t i = 0; i < d.numel(); ++i) gp[i] += d.data[i];
      }
      float* gla = G(P(l, "att.log_A_re"));  // A_re = -exp(log_A_re): d log_A_re = dA_re A_re
      for (int64_t i = 0; i < g.at("dA_re").numel(); ++i) gla[i] += g.at("dA_re").data[i] * in.at("A_re").data[i];
    } else if (kind_of(m) == Kind::Flash) {
      flash_layer_backward(l, B, T, L, dx.data(), da.data(), *grads);
    } else if (kind_of(m) == Kind::Mamba) {
      mamba_layer_backward(l, B, T, L, dx.data(), da.data(), *grads);
    } else {
      std::vector<float> dy(N * C);
      nn::matmul_backward(dy.data(), G(P(l, "att.o.weight")), nullptr, dx.data(), L.y.data(), W(P(l, "att.o.weight")),
                          N, C, C);
      TensorMap in = mixer_inputs(c, params_, l, B, T, L.q.data(), L.k.data(), L.v.data());
      Tensor dyt(in.at("q").shape);
      if (m.rfind("aft", 0) != 0) dyt.shape.back() = C / c.n_head;  // (B,T,H,E) with E = D
      dyt.data = dy;
      in["dy"] = std::move(dyt);
      const TensorMap g = run_mixer(m, Mode::Parallel, true, c.layers[l].params, in, true);
      nn::matmul_backward(da.data(), G(P(l, "att.q.weight")), nullptr, g.at("dq").ptr(), L.a.data(),
                          W(P(l, "att.q.weight")), N, C, C, true);
      nn::matmul_backward(da.data(), G(P(l, "att.k.weight")), nullptr, g.at("dk").ptr(), L.a.data(),
                          W(P(l, "att.k.weight")), N, C, C, true);
      nn::matmul_backward(da.data(), G(P(l, "att.v.weight")), nullptr, g.at("dv").ptr(), L.a.data(),
                          W(P(l, "att.v.weight")), N, C, C, true);
      if (g.count("dw")) {
        float* gw = G(P(l, "att.w"));
        for (int64_t i = 0; i < g.at("dw").numel(); ++i) gw[i] += g.at("dw").data[i];
      }
      if (g.count("du")) {
        float* gu = G(P(l, "att.u"));
        for (int64_t i = 0; i < g.at("du").numel(); ++i) gu[i] += g.at("du").data[i];
      }
    }
    // dx (d x_in) = dx + ln1 backward(da)
    nn::layernorm_backward(dx.data(), G(P(l, "ln1.weight")), G(P(l, "ln1.bias")), da.data(), L.x_in.data(),
                           W(P(l, "ln1.weight")), L.mean1.data(), L.rstd1.data(), N, C);
  }
  std::vector<float> demb(N * C, 0.0f);
  if (c.ln0) {
    nn::layernorm_backward(demb.data(), G("blocks.0.ln0.weight"), G("blocks.0.ln0.bias"), dx.data(), A.x0.data(),
                           W("blocks.0.ln0.weight"), A.mean0.data(), A.rstd0.data(), N, C);
  } else {
    demb = dx;
  }
  if (c.uses_pos_emb()) {
    float* gp = G("pos.weight");
    for (int64_t i = 0; i < N; ++i)
      for (int64_t ch = 0; ch < C; ++ch) gp[(i % T) * C + ch] += demb[i * C + ch];
  }
  float* ge = G("emb.weight");
  for (int64_t i = 0; i < N; ++i)
    for (int64_t ch = 0; ch < C; ++ch) ge[inputs[i] * C + ch] += demb[i * C + ch];
  return loss;
}


// ---------------------------------------------------------------- s4d / flash / mamba layers

// The gradient accumulator of parameter `name`, created (zeros) on first use.
float* Model::grad_slot(TensorMap& grads, const std::string& name) const {
  auto it = grads.find(name);
  if (it == grads.end()) it = grads.emplace(name, Tensor(params_.at(name).shape)).first;
  return it->second.ptr();
}

TensorMap Model::s4d_inputs(int64_t l, int64_t B, int64_t T, const float* u) const {
  const int64_t C = cfg_.d_model;
  TensorMap in;
  in["u"] = Tensor({B, T, C});
  std::copy(u, u + B * T * C, in["u"].data.begin());
  for (const char* n : {"log_dt", "A_im", "C_re", "C_im", "D"}) in[n] = params_.at(P(l, (std::string("att.") + n).c_str()));
  Tensor A_re = params_.at(P(l, "att.log_A_re"));
  for (float& x : A_re.data) x = -std::exp(x);
  in["A_re"] = std::move(A_re);
  return in;
}

// GAU (FLASH, Hua et al. 2022, sec. 2): U = silu(a Wu + bu), V = silu(a Wv + bv) (e = expand C),
// Z = silu(a Wz + bz) (S); quad_q, quad_k, lin_q, lin_k = Z gamma_j + beta_j; O = U * flash(...)(V);
// out = O Wo^T.
TensorMap Model::flash_inputs(int64_t l, int64_t N, const float* Z, const float* V, int64_t B, int64_t T) const {
  const int64_t S = cfg_.qk_dim, e = cfg_.expand * cfg_.d_model;
  const float *gm = params_.at(P(l, "att.gamma")).ptr(), *bt = params_.at(P(l, "att.beta")).ptr();
  TensorMap in;
  const char* names[4] = {"quad_q", "quad_k", "lin_q", "lin_k"};
  for (int j = 0; j < 4; ++j) {
    Tensor t({B, T, S});
    for (int64_t i = 0; i < N; ++i)
      for (int64_t x = 0; x < S; ++x) t.data[i * S + x] = Z[i * S + x] * gm[j * S + x] + bt[j * S + x];
    in[names[j]] = std::move(t);
  }
  in["v"] = Tensor({B, T, e});
  std::copy(V, V + N * e, in["v"].data.begin());
  return in;
}

void Model::flash_layer_forward(int64_t l, int64_t B, int64_t T, LayerActs& L) {
  const int64_t C = cfg_.d_model, N = B * T, S = cfg_.qk_dim, e = cfg_.expand * C;
  auto W = [&](const char* n) { return params_.at(P(l, n)).ptr(); };
  auto& up = L.ex["u_pre"], &vp = L.ex["v_pre"], &zp = L.ex["z_pre"], &U = L.ex["u"], &V = L.ex["v"], &Z = L.ex["z"];
  up.resize(N * e), vp.resize(N * e), zp.resize(N * S), U.resize(N * e), V.resize(N * e), Z.resize(N * S);
  nn::matmul_forward(up.data(), L.a.data(), W("att.wu.weight"), W("att.wu.bias"), N, C, e);
  nn::matmul_forward(vp.data(), L.a.data(), W("att.wv.weight"), W("att.wv.bias"), N, C, e);
  nn::matmul_forward(zp.data(), L.a.data(), W("att.wz.weight"), W("att.wz.bias"), N, C, S);
  for (int64_t i = 0; i < N * e; ++i) U[i] = silu(up[i]), V[i] = silu(vp[i]);
  for (int64_t i = 0; i < N * S; ++i) Z[i] = silu(zp[i]);
  L.y = run_mixer("flash", Mode::Parallel, true, cfg_.layers[l].params, flash_inputs(l, N, Z.data(), V.data(), B, T))
            .at("y")
            .data;  // A: (N, e)
  auto& O = L.ex["o"];
  O.resize(N * e);
  for (int64_t i = 0; i < N * e; ++i) O[i] = U[i] * L.y[i];
  nn::matmul_forward(L.att_out.data(), O.data(), W("att.o.weight"), nullptr, N, e, C);
}

void Model::flash_layer_backward(int64_t l, int64_t B, int64_t T, LayerActs& L, const float* dout, float* da,
                                 TensorMap& grads) {
  const int64_t C = cfg_.d_model, N = B * T, S = cfg_.qk_dim, e = cfg_.expand * C;
  auto W = [&](const char* n) { return params_.at(P(l, n)).ptr(); };
  auto G = [&](const char* n) { return grad_slot(grads, P(l, n)); };
  auto &U = L.ex["u"], &V = L.ex["v"], &Z = L.ex["z"];
  std::vector<float> dO(N * e), dU(N * e), dA(N * e), dZ(N * S, 0.0f);
  nn::matmul_backward(dO.data(), G("att.o.weight"), nullptr, dout, L.ex["o"].data(), W("att.o.weight"), N, e, C);
  for (int64_t i = 0; i < N * e; ++i) dU[i] = dO[i] * L.y[i], dA[i] = dO[i] * U[i];
  TensorMap in = flash_inputs(l, N, Z.data(), V.data(), B, T);
  in["dy"] = Tensor({B, T, e});
  in["dy"].data = dA;
  const TensorMap g = run_mixer("flash", Mode::Parallel, true, cfg_.layers[l].params, in, true);
  const float* gm = W("att.gamma");
  float *ggm = G("att.gamma"), *gbt = G("att.beta");
  const char* names[4] = {"dquad_q", "dquad_k", "dlin_q", "dlin_k"};
  for (int j = 0; j < 4; ++j) {
    const float* dq = g.at(names[j]).ptr();
    for (int64_t i = 0; i < N; ++i)
      for (int64_t x = 0; x < S; ++x) {
        dZ[i * S + x] += dq[i * S + x] * gm[j * S + x];
        ggm[j * S + x] += dq[i * S + x] * Z[i * S + x];
        gbt[j * S + x] += dq[i * S + x];
      }
  }
  std::vector<float> dV(g.at("dv").data);
  for (int64_t i = 0; i < N * e; ++i) dU[i] *= dsilu(L.ex["u_pre"][i]), dV[i] *= dsilu(L.ex["v_pre"][i]);
  for (int64_t i = 0; i < N * S; ++i) dZ[i] *= dsilu(L.ex["z_pre"][i]);
  nn::matmul_backward(da, G("att.wu.weight"), G("att.wu.bias"), dU.data(), L.a.data(), W("att.wu.weight"), N, C, e, true);
  nn::matmul_backward(da, G("att.wv.weight"), G("att.wv.bias"), dV.data(), L.a.data(), W("att.wv.weight"), N, C, e, true);
  nn::matmul_backward(da, G("att.wz.weight"), G("att.wz.bias"), dZ.data(), L.a.data(), W("att.wz.weight"), N, C, S, true);
}

// Mamba block (Gu & Dao 2023, Fig. 3): [x, z] = a W_in; x = silu(conv4(x)); [dt_r, Bm, Cm] = x W_x;
// delta = dt_r W_dt; y = selective_scan(x, delta, A = -exp(A_log), Bm, Cm, D, z, dt bias); out = y W_out.
TensorMap Model::mamba_inputs(int64_t l, int64_t B, int64_t T, const float* xs, const float* dbc, const float* delta,
                              const float* z) const {
  const int64_t Ei = cfg_.expand * cfg_.d_model, N = cfg_.state, R = (cfg_.d_model + 15) / 16, NR = B * T;
  TensorMap in;
  auto put = [&](const char* n, std::vector<int64_t> shape, const float* src) {
    Tensor t(std::move(shape));
    std::copy(src, src + t.numel(), t.data.begin());
    in[n] = std::move(t);
  };
  put("u", {B, T, Ei}, xs), put("delta", {B, T, Ei}, delta), put("z", {B, T, Ei}, z);
  Tensor Bm({B, T, N}), Cm({B, T, N});
  for (int64_t i = 0; i < NR; ++i)
    for (int64_t n = 0; n < N; ++n) {
      Bm.data[i * N + n] = dbc[i * (R + 2 * N) + R + n];
      Cm.data[i * N + n] = dbc[i * (R + 2 * N) + R + N + n];
    }
  in["Bm"] = std::move(Bm), in["Cm"] = std::move(Cm);
  Tensor A({Ei, N});
  const Tensor& al = params_.at(P(l, "att.A_log"));
  for (int64_t i = 0; i < A.numel(); ++i) A.data[i] = -std::exp(al.data[i]);
  in["A"] = std::move(A);
  in["D"] = params_.at(P(l, "att.D"));
  in["delta_bias"] = params_.at(P(l, "att.dt_proj.bias"));
  return in;
}

void Model::mamba_layer_forward(int64_t l, int64_t B, int64_t T, LayerActs& L) {
  const int64_t C = cfg_.d_model, NR = B * T, Ei = cfg_.expand * C, N = cfg_.state, R = (C + 15) / 16;
  auto W = [&](const char* n) { return params_.at(P(l, n)).ptr(); };
  auto &xz = L.ex["xz"], &xp = L.ex["xp"], &xc = L.ex["xc"], &xs = L.ex["xs"], &z = L.ex["z"], &dbc = L.ex["dbc"],
       &dtr = L.ex["dtr"], &delta = L.ex["delta"];
  xz.resize(NR * 2 * Ei), xp.resize(NR * Ei), xc.resize(NR * Ei), xs.resize(NR * Ei), z.resize(NR * Ei);
  dbc.resize(NR * (R + 2 * N)), dtr.resize(NR * R), delta.resize(NR * Ei);
  nn::matmul_forward(xz.data(), L.a.data(), W("att.in_proj.weight"), nullptr, NR, C, 2 * Ei);
  for (int64_t i = 0; i < NR; ++i) {
    std::copy(&xz[i * 2 * Ei], &xz[i * 2 * Ei] + Ei, &xp[i * Ei]);
    std::copy(&xz[i * 2 * Ei] + Ei, &xz[(i + 1) * 2 * Ei], &z[i * Ei]);
  }
  conv4_forward(xc.data(), xp.data(), W("att.conv.weight"), W("att.conv.bias"), B, T, Ei);
  for (int64_t i = 0; i < NR * Ei; ++i) xs[i] = silu(xc[i]);
  nn::matmul_forward(dbc.data(), xs.data(), W("att.x_proj.weight"), nullptr, NR, Ei, R + 2 * N);
  for (int64_t i = 0; i < NR; ++i) std::copy(&dbc[i * (R + 2 * N)], &dbc[i * (R + 2 * N)] + R, &dtr[i * R]);
  nn::matmul_forward(delta.data(), dtr.data(), W("att.dt_proj.weight"), nullptr, NR, R, Ei);
  L.y = run_mixer("mamba", Mode::Parallel, true, cfg_.layers[l].params,
                  mamba_inputs(l, B, T, xs.data(), dbc.data(), delta.data(), z.data()))
            .at("y")
            .data;
  nn::matmul_forward(L.att_out.data(), L.y.data(), W("att.out_proj.weight"), nullptr, NR, Ei, C);
}

void Model::mamba_layer_backward(int64_t l, int64_t B, int64_t T, LayerActs& L, const float* dout, float* da,
                                 TensorMap& grads) {
  const int64_t C = cfg_.d_model, NR = B * T, Ei = cfg_.expand * C, N = cfg_.state, R = (C + 15) / 16;
  auto W = [&](const char* n) { return params_.at(P(l, n)).ptr(); };
  auto G = [&](const char* n) { return grad_slot(grads, P(l, n)); };
  std::vector<float> dy(NR * Ei);
  nn::matmul_backward(dy.data(), G("att.out_proj.weight"), nullptr, dout, L.y.data(), W("att.out_proj.weight"), NR,
                      Ei, C);
  TensorMap in = mamba_inputs(l, B, T, L.ex["xs"].data(), L.ex["dbc"].data(), L.ex["delta"].data(), L.ex["z"].data());
  in["dy"] = Tensor({B, T, Ei});
  in["dy"].data = dy;
  const TensorMap g = run_mixer("mamba", Mode::Parallel, true, cfg_.layers[l].params, in, true);
  float *gal = G("att.A_log"), *gD = G("att.D"), *gb = G("att.dt_proj.bias");
  const Tensor& dA = g.at("dA");
  for (int64_t i = 0; i < dA.numel(); ++i) gal[i] += dA.data[i] * in.at("A").data[i];  // A = -exp(A_log)
  for (int64_t i = 0; i < Ei; ++i) gD[i] += g.at("dD").data[i], gb[i] += g.at("ddelta_bias").data[i];
  std::vector<float> ddtr(NR * R), ddbc(NR * (R + 2 * N)), dxs(g.at("du").data), dxz(NR * 2 * Ei, 0.0f);
  nn::matmul_backward(ddtr.data(), G("att.dt_proj.weight"), nullptr, g.at("ddelta").ptr(), L.ex["dtr"].data(),
                      W("att.dt_proj.weight"), NR, R, Ei);
  for (int64_t i = 0; i < NR; ++i) {
    std::copy(&ddtr[i * R], &ddtr[i * R] + R, &ddbc[i * (R + 2 * N)]);
    for (int64_t n = 0; n < N; ++n) {
      ddbc[i * (R + 2 * N) + R + n] = g.at("dBm").data[i * N + n];
      ddbc[i * (R + 2 * N) + R + N + n] = g.at("dCm").data[i * N + n];
    }
  }
  nn::matmul_backward(dxs.data(), G("att.x_proj.weight"), nullptr, ddbc.data(), L.ex["xs"].data(),
                      W("att.x_proj.weight"), NR, Ei, R + 2 * N, true);
  std::vector<float> dxc(NR * Ei), dxp(NR * Ei, 0.0f);
  for (int64_t i = 0; i < NR * Ei; ++i) dxc[i] = dxs[i] * dsilu(L.ex["xc"][i]);
  conv4_backward(dxp.data(), G("att.conv.weight"), G("att.conv.bias"), dxc.data(), L.ex["xp"].data(),
                 W("att.conv.weight"), B, T, Ei);
  for (int64_t i = 0; i < NR; ++i)
    for (int64_t c = 0; c < Ei; ++c) {
      dxz[i * 2 * Ei + c] = dxp[i * Ei + c];
      dxz[i * 2 * Ei + Ei + c] = g.at("dz").data[i * Ei + c];
    }
  nn::matmul_backward(da, G("att.in_proj.weight"), nullptr, dxz.data(), L.a.data(), W("att.in_proj.weight"), NR, C,
                      2 * Ei, true);
}

std::vector<float> Model::logits(const int32_t* inputs, int64_t B, int64_t T) {
  forward_backward(inputs, nullptr, B, T, nullptr);
  return acts_->logits;
}

// ---------------------------------------------------------------- recurrent step

// One recurrent mixer call for layer l: the layer's state.* tensors in, updated, y out.
std::vector<float> Model::mixer_step(int64_t l, TensorMap in, State& st) {
  for (const auto& [n, t] : st.mix[l]) in[n] = t;
  TensorMap out = run_mixer(cfg_.layers[l].mixer, Mode::Recurrent, true, cfg_.layers[l].params, in);
  st.mix[l].clear();
  for (auto& [n, t] : out)
    if (n.rfind("state.", 0) == 0) st.mix[l][n] = std::move(t);
  return out.at("y").data;
}

// The token mix of one token for the s4d, flash (GAU) and mamba layers: a (C) -> o (C).
void Model::step_special(int64_t l, const float* a, float* o, State& st) {
  const int64_t C = cfg_.d_model;
  auto W = [&](const char* n) { return params_.at(P(l, n)).ptr(); };
  switch (kind_of(cfg_.layers[l].mixer)) {
    case Kind::S4d: {
      std::vector<float> y = mixer_step(l, s4d_inputs(l, 1, 1, a), st), g(C);
      nn::gelu_forward(g.data(), y.data(), C);
      nn::matmul_forward(o, g.data(), W("att.o.weight"), nullptr, 1, C, C);
      break;
    }
    case Kind::Flash: {
      const int64_t S = cfg_.qk_dim, e = cfg_.expand * C;
      std::vector<float> U(e), V(e), Z(S);
      nn::matmul_forward(U.data(), a, W("att.wu.weight"), W("att.wu.bias"), 1, C, e);
      nn::matmul_forward(V.data(), a, W("att.wv.weight"), W("att.wv.bias"), 1, C, e);
      nn::matmul_forward(Z.data(), a, W("att.wz.weight"), W("att.wz.bias"), 1, C, S);
      for (float& x : U) x = silu(x);
      for (float& x : V) x = silu(x);
      for (float& x : Z) x = silu(x);
      const std::vector<float> A = mixer_step(l, flash_inputs(l, 1, Z.data(), V.data(), 1, 1), st);
      for (int64_t i = 0; i < e; ++i) U[i] *= A[i];
      nn::matmul_forward(o, U.data(), W("att.o.weight"), nullptr, 1, e, C);
      break;
    }
    case Kind::Mamba: {
      const int64_t Ei = cfg_.expand * C, N = cfg_.state, R = (C + 15) / 16;
      std::vector<float> xz(2 * Ei), xs(Ei), dbc(R + 2 * N), delta(Ei);
      nn::matmul_forward(xz.data(), a, W("att.in_proj.weight"), nullptr, 1, C, 2 * Ei);
      std::vector<float>& prev = st.conv[l];  // the last 3 conv inputs, oldest first: (3, Ei)
      if (prev.empty()) prev.assign(3 * Ei, 0.0f);
      const float *cw = W("att.conv.weight"), *cb = W("att.conv.bias");
      for (int64_t c = 0; c < Ei; ++c) {
        float acc = cb[c] + cw[c * 4 + 3] * xz[c];
        for (int64_t j = 0; j < 3; ++j) acc += cw[c * 4 + j] * prev[j * Ei + c];
        xs[c] = silu(acc);
      }
      std::copy(prev.begin() + Ei, prev.end(), prev.begin());
      std::copy(xz.begin(), xz.begin() + Ei, prev.begin() + 2 * Ei);
      nn::matmul_forward(dbc.data(), xs.data(), W("att.x_proj.weight"), nullptr, 1, Ei, R + 2 * N);
      nn::matmul_forward(delta.data(), dbc.data(), W("att.dt_proj.weight"), nullptr, 1, R, Ei);
      const std::vector<float> y = mixer_step(l, mamba_inputs(l, 1, 1, xs.data(), dbc.data(), delta.data(), xz.data() + Ei), st);
      nn::matmul_forward(o, y.data(), W("att.out_proj.weight"), nullptr, 1, Ei, C);
      break;
    }
    default:
      throw Error("step_special: not an s4d / flash / mamba layer");
  }
}

TensorMap Model::state_tensors(const State& st) const {
  TensorMap out;
  out["pos"] = Tensor({1}, float(st.pos));
  for (int64_t l = 0; l < cfg_.n_layer; ++l) {
    const std::string p = "layer." + std::to_string(l) + ".";
    auto vec = [&](const std::string& n, const std::vector<float>& v) {
      Tensor t({static_cast<int64_t>(v.size())});
      t.data = v;
      out[p + n] = std::move(t);
    };
    vec("att_prev", st.att_prev[l]);
    vec("ffn_prev", st.ffn_prev[l]);
    if (!st.conv[l].empty()) vec("conv", st.conv[l]);
    for (const auto& [n, t] : st.mix[l]) out[p + n] = t;
  }
  return out;
}

Model::State Model::state_from_tensors(const TensorMap& t) const {
  State st = new_state();
  auto it = t.find("pos");
  LINMIX_CHECK(it != t.end() && it->second.numel() == 1 && it->second.data[0] >= 0 &&
                   it->second.data[0] == std::floor(it->second.data[0]),
               "state: missing or malformed tensor 'pos'");
  st.pos = static_cast<int64_t>(it->second.data[0]);
  for (const auto& [n, x] : t) {
    if (n == "pos") continue;
    check_finite(n, x);
    LINMIX_CHECK(n.rfind("layer.", 0) == 0, "state: unexpected tensor '" + n + "'");
    const size_t dot = n.find('.', 6);
    LINMIX_CHECK(dot != std::string::npos, "state: unexpected tensor '" + n + "'");
    const int64_t l = std::atoll(n.substr(6, dot - 6).c_str());
    LINMIX_CHECK(l >= 0 && l < cfg_.n_layer, "state: tensor '" + n + "' names a layer this model does not have");
    const std::string rest = n.substr(dot + 1);
    if (rest == "att_prev" || rest == "ffn_prev") {
      check_shape(n, x, {cfg_.d_model});
      (rest == "att_prev" ? st.att_prev : st.ffn_prev)[l] = x.data;
    } else if (rest == "conv") {
      check_shape(n, x, {3 * cfg_.expand * cfg_.d_model});
      st.conv[l] = x.data;
    } else {
      LINMIX_CHECK(rest.rfind("state.", 0) == 0, "state: unexpected tensor '" + n + "'");
      st.mix[l][rest] = x;  // validated by the mixer on the next step (names, shapes)
    }
  }
  return st;
}

Model::State Model::new_state() const {
  State s;
  s.conv.resize(cfg_.n_layer);
  s.mix.resize(cfg_.n_layer);
  s.att_prev.assign(cfg_.n_layer, std::vector<float>(cfg_.d_model, 0.0f));
  s.ffn_prev.assign(cfg_.n_layer, std::vector<float>(cfg_.d_model, 0.0f));
  return s;
}

void Model::step(int32_t token, State& st, float* logits_out) {
  const ModelConfig& c = cfg_;
  const int64_t C = c.d_model, V = c.vocab, F = c.ffn_mult * C;
  LINMIX_CHECK(token >= 0 && token < V, "token " + std::to_string(token) + " is outside the vocabulary");
  auto W = [&](const std::string& n) { return params_.at(n).ptr(); };
  float mean, rstd;
  std::vector<float> x(W("emb.weight") + token * C, W("emb.weight") + (token + 1) * C), a(C), o(C), q(C), k(C), v(C),
      r(C), tmp(C), h(F), h2(F);
  if (c.uses_pos_emb()) {
    LINMIX_CHECK(st.pos < c.ctx, "position " + std::to_string(st.pos) + " is past the model's ctx " +
                                     std::to_string(c.ctx) + " (learned positions end there)");
    for (int64_t ch = 0; ch < C; ++ch) x[ch] += W("pos.weight")[st.pos * C + ch];
  }
  if (c.ln0) nn::layernorm_forward(x.data(), &mean, &rstd, x.data(), W("blocks.0.ln0.weight"), W("blocks.0.ln0.bias"), 1, C);
  for (int64_t l = 0; l < c.n_layer; ++l) {
    const std::string& m = c.layers[l].mixer;
    nn::layernorm_forward(a.data(), &mean, &rstd, x.data(), W(P(l, "ln1.weight")), W(P(l, "ln1.bias")), 1, C);
    const Kind kind = kind_of(m);
    if (kind == Kind::S4d || kind == Kind::Flash || kind == Kind::Mamba) {
      step_special(l, a.data(), o.data(), st);
    } else if (kind == Kind::Rwkv) {
      const float *mk = W(P(l, "att.time_mix_k")), *mv = W(P(l, "att.time_mix_v")), *mr = W(P(l, "att.time_mix_r"));
      std::vector<float> xk(C), xv(C), xr(C);
      for (int64_t ch = 0; ch < C; ++ch) {
        const float p = st.att_prev[l][ch];
        xk[ch] = a[ch] * mk[ch] + p * (1 - mk[ch]);
        xv[ch] = a[ch] * mv[ch] + p * (1 - mv[ch]);
        xr[ch] = a[ch] * mr[ch] + p * (1 - mr[ch]);
      }
      st.att_prev[l] = a;
      nn::matmul_forward(k.data(), xk.data(), W(P(l, "att.key.weight")), nullptr, 1, C, C);
      nn::matmul_forward(v.data(), xv.data(), W(P(l, "att.value.weight")), nullptr, 1, C, C);
      nn::matmul_forward(r.data(), xr.data(), W(P(l, "att.receptance.weight")), nullptr, 1, C, C);
      const std::vector<float> y = mixer_step(l, mixer_inputs(c, params_, l, 1, 1, nullptr, k.data(), v.data()), st);
      for (int64_t ch = 0; ch < C; ++ch) tmp[ch] = sigmoid(r[ch]) * y[ch];
      nn::matmul_forward(o.data(), tmp.data(), W(P(l, "att.output.weight")), nullptr, 1, C, C);
    } else {
      nn::matmul_forward(q.data(), a.data(), W(P(l, "att.q.weight")), nullptr, 1, C, C);
      nn::matmul_forward(k.data(), a.data(), W(P(l, "att.k.weight")), nullptr, 1, C, C);
      nn::matmul_forward(v.data(), a.data(), W(P(l, "att.v.weight")), nullptr, 1, C, C);
      const std::vector<float> y =
          mixer_step(l, mixer_inputs(c, params_, l, 1, 1, q.data(), k.data(), v.data()), st);
      nn::matmul_forward(o.data(), y.data(), W(P(l, "att.o.weight")), nullptr, 1, C, C);
    }
    for (int64_t ch = 0; ch < C; ++ch) x[ch] += o[ch];
    nn::layernorm_forward(a.data(), &mean, &rstd, x.data(), W(P(l, "ln2.weight")), W(P(l, "ln2.bias")), 1, C);
    if (c.channel_mix == "rwkv") {
      const float *mk = W(P(l, "ffn.time_mix_k")), *mr = W(P(l, "ffn.time_mix_r"));
      std::vector<float> xk(C), xr(C);
      for (int64_t ch = 0; ch < C; ++ch) {
        const float p = st.ffn_prev[l][ch];
        xk[ch] = a[ch] * mk[ch] + p * (1 - mk[ch]);
        xr[ch] = a[ch] * mr[ch] + p * (1 - mr[ch]);
      }
      st.ffn_prev[l] = a;
      nn::matmul_forward(h.data(), xk.data(), W(P(l, "ffn.key.weight")), nullptr, 1, C, F);
      for (float& e : h) e = e > 0 ? e * e : 0.0f;
      nn::matmul_forward(o.data(), h.data(), W(P(l, "ffn.value.weight")), nullptr, 1, F, C);
      nn::matmul_forward(r.data(), xr.data(), W(P(l, "ffn.receptance.weight")), nullptr, 1, C, C);
      for (int64_t ch = 0; ch < C; ++ch) x[ch] += sigmoid(r[ch]) * o[ch];
    } else {
      nn::matmul_forward(h.data(), a.data(), W(P(l, "mlp.fc.weight")), W(P(l, "mlp.fc.bias")), 1, C, F);
      nn::gelu_forward(h2.data(), h.data(), F);
      nn::matmul_forward(o.data(), h2.data(), W(P(l, "mlp.proj.weight")), W(P(l, "mlp.proj.bias")), 1, F, C);
      for (int64_t ch = 0; ch < C; ++ch) x[ch] += o[ch];
    }
  }
  nn::layernorm_forward(a.data(), &mean, &rstd, x.data(), W("ln_out.weight"), W("ln_out.bias"), 1, C);
  nn::matmul_forward(logits_out, a.data(), W("head.weight"), nullptr, 1, C, V);
  st.pos += 1;
}

}  // namespace linmix
