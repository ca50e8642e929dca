// The language model: what every model shares (embedding, positions, pre-LayerNorm residual
// blocks, channel mix, head, loss) around the token-mixing layers of src/model/*_layer.cpp.
// Forward, backward and the recurrent step. Shapes: N = B*T rows of C.
#include "linmix/model.h"

#include <algorithm>
#include <cmath>
#include <optional>
#include <random>

#include "channel_mix.h"
#include "kernels/gemv.h"
#include "layers.h"
#include "seed.h"
#include "linmix/kernels.h"
#include "linmix/profile.h"
#include "mixer_layer.h"

namespace linmix {

namespace {
std::string P(int64_t i, const std::string& name) { return "blocks." + std::to_string(i) + "." + name; }
}  // namespace

bool is_buffer_param(const std::string& name) { return name.size() > 9 && name.rfind("att.proj") == name.size() - 8; }

// ---------------------------------------------------------------- parameters

Model::Model(ModelConfig cfg, bool allocate) : cfg_(std::move(cfg)) {
  cfg_.validate();
  const int64_t C = cfg_.d_model, V = cfg_.vocab;
  auto add = [&](const std::string& n, std::vector<int64_t> s) {
    Tensor& t = params_[n];
    if (allocate) t = Tensor(std::move(s));
    else t.shape = std::move(s);
  };
  add("emb.weight", {V, C});
  if (cfg_.uses_pos_emb()) add("pos.weight", {cfg_.ctx, C});
  auto add_norm = [&](const std::string& n) {
    add(n + ".weight", {C});
    if (!cfg_.rms()) add(n + ".bias", {C});
  };
  if (cfg_.ln0) add_norm("blocks.0.ln0");
  const ChannelMix cm(cfg_);
  for (int64_t i = 0; i < cfg_.n_layer; ++i) {
    layers_.push_back(make_mixer_layer(cfg_, i));
    add_norm(P(i, "ln1"));
    if (cfg_.has_channel_mix()) add_norm(P(i, "ln2"));
    for (const auto& [n, shape] : layers_.back()->shapes()) add(P(i, n), shape);
    if (cfg_.has_channel_mix())
      for (const auto& [n, shape] : cm.shapes()) add(P(i, n), shape);
  }
  add_norm("ln_out");
  if (cfg_.classifier()) {
    add("head.weight", {cfg_.classes, C});
    add("head.bias", {cfg_.classes});
    if (cfg_.cls_rows()) add("cls.weight", {C});
  } else {
    add("head.weight", {V, C});
  }
}

int64_t Model::num_params() const {
  int64_t n = 0;
  for (const auto& [name, t] : params_)
    if (!is_buffer_param(name)) n += numel_of(t.shape);  // by shape: a packed or released model has no values
  return n;
}

void Model::init(uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const int64_t L = cfg_.n_layer;
  const float std_out = 0.02f / std::sqrt(2.0f * float(L));
  for (auto& [name_, t] : params_) {  // std::map: a fixed order, so the draw is deterministic
    const std::string& name = name_;  // (clang 14 cannot capture a structured binding)
    auto ends = [&](const std::string& s) { return name.size() >= s.size() && name.rfind(s) == name.size() - s.size(); };
    const bool block = name.rfind("blocks.", 0) == 0;
    const int64_t layer = block ? std::atoll(name.c_str() + 7) : 0;
    const float depth = L > 1 ? float(layer) / float(L - 1) : 0.0f;
    const std::string local = block ? name.substr(name.find('.', 7) + 1) : name;
    InitCtx ctx{rng, normal, seed, depth};
    if (ends("ln0.weight") || ends("ln1.weight") || ends("ln2.weight") || ends("ln_out.weight")) {
      std::fill(t.data.begin(), t.data.end(), 1.0f);
    } else if (ends(".bias") || ends("att.w") || ends("att.u")) {
      std::fill(t.data.begin(), t.data.end(), 0.0f);
    } else if (ends("ffn.time_mix_k") || ends("ffn.time_mix_r")) {
      init_time_mix(t, false, depth);
    } else if (ends("ffn.time_maa_k") || ends("ffn.time_maa_r") || ends("ffn.x_k")) {  // 1 - a mix
      init_time_mix(t, false, depth);
      for (float& m : t.data) m = 1.0f - m;
    } else if (block && layers_[size_t(layer)]->init(local, t, ctx)) {
      // the layer's own rule
    } else {
      const bool out = ends("att.o.weight") || ends("att.output.weight") || ends("mlp.proj.weight") ||
                       ends("ffn.value.weight") || ends("att.out_proj.weight");
      const float s = out ? std_out : 0.02f;
      for (float& x : t.data) x = s * normal(rng);
    }
  }
  for (size_t i = 0; i < layers_.size(); ++i) {
    std::mt19937_64 own(seed ^ (0x9e3779b97f4a7c15ULL * (i + 1)));
    layers_[i]->finish_init(params_, "blocks." + std::to_string(i) + ".", own);
  }
}

// ---------------------------------------------------------------- norms

// The norm `name` ("blocks.0.ln0", "blocks.<i>.ln1", ..., "ln_out") of N rows: LayerNorm, or
// RMSNorm (mean left 0) when the config says so.
void Model::norm_forward(const std::string& name, float* out, float* mean, float* rstd, const float* x,
                         int64_t N) const {
  const int64_t C = cfg_.d_model;
  if (cfg_.rms()) {
    nn::rmsnorm_forward(out, rstd, x, params_.at(name + ".weight").ptr(), N, C);
    std::fill(mean, mean + N, 0.0f);
    return;
  }
  nn::layernorm_forward(out, mean, rstd, x, params_.at(name + ".weight").ptr(), params_.at(name + ".bias").ptr(), N, C);
}

void Model::norm_backward(const std::string& name, float* dx, const float* dout, const float* x, const float* mean,
                          const float* rstd, TensorMap* grads, int64_t N) const {
  const int64_t C = cfg_.d_model;
  const LayerIO top{params_, grads, ""};
  if (cfg_.rms()) {
    nn::rmsnorm_backward(dx, top.g(name + ".weight"), dout, x, params_.at(name + ".weight").ptr(), rstd, N, C);
    return;
  }
  nn::layernorm_backward(dx, top.g(name + ".weight"), top.g(name + ".bias"), dout, x, params_.at(name + ".weight").ptr(),
                         mean, rstd, N, C);
}

// ---------------------------------------------------------------- forward / backward

// Activations of one forward pass, kept for the backward (the layers keep their own).
struct Model::Acts {
  struct Layer {
    std::vector<float> x_in, a, mean1, rstd1, att_out, x_mid, b, mean2, rstd2;
  };
  std::vector<Layer> layers;
  std::vector<ChannelMix> cmix;
  Carry carry;                  // forward / backward
  std::vector<float> carry_step;  // Model::step (C)
  std::vector<float> x0, e0, mean0, rstd0, xf, lnf, meanf, rstdf, logits;
};

Model::~Model() = default;

namespace {
float* sized(std::vector<float>& v, int64_t n) {
  v.assign(static_cast<size_t>(n), 0.0f);
  return v.data();
}
}  // namespace

void Model::release_weights() {
  for (auto& [name, t] : params_) t.data.release();
  released_ = true;
}

void Model::check_weights() const {
  LINMIX_CHECK(!packed_ || packed_->recording,
               std::string("the model's weights are stored as ") + wtype_name(packed_ ? packed_->type : WType::F32) +
                   " for the inference engine (linmix convert): run it with generate, eval --mode sequence or logits "
                   "--mode sequence|decode, or use the FP32 checkpoint it was converted from");
  LINMIX_CHECK(!released_, "the model's weights were given to an inference engine");
}

void Model::dropout_branch(float* out, int64_t N, int64_t Tp, int64_t l, int branch) const {
  const double p = cfg_.dropout;
  const uint64_t key = splitmix64(splitmix64(drop_key_ ^ splitmix64(uint64_t(l) * 2 + uint64_t(branch))));
  const uint64_t cut = uint64_t(p * double(uint64_t(1) << 32));  // dropped: the hash's top 32 bits < cut
  const float scale = float(1.0 / (1.0 - p));
  const int64_t C = cfg_.d_model, n = N * C, off = drop_row0_ * Tp * C;
#pragma omp parallel for schedule(static) if (n >= (int64_t(1) << 16))
  for (int64_t i = 0; i < n; ++i) out[i] = (splitmix64(key + uint64_t(off + i)) >> 32) < cut ? 0.0f : out[i] * scale;
}

void Model::trunk_forward(const int32_t* inputs, int64_t B, int64_t T, bool keep) {
  check_weights();
  const ModelConfig& c = cfg_;
  const int64_t C = c.d_model, V = c.vocab, R = c.cls_rows(), Tp = T + R, N = B * Tp;
  LINMIX_CHECK(T >= 1 && B >= 1, "forward: empty batch");
  for (int64_t i = 0; i < B * T; ++i)
    LINMIX_CHECK(inputs[i] >= 0 && inputs[i] < V, "token " + std::to_string(inputs[i]) + " is outside the vocabulary");
  if (!acts_) acts_ = std::make_unique<Acts>();
  Acts& A = *acts_;
  A.layers.resize(c.n_layer);
  if (A.cmix.empty()) A.cmix.assign(size_t(c.n_layer), ChannelMix(c));
  auto W = [&](const std::string& n) { return params_.at(n).ptr(); };
  const profile::Scope prof("forward");
  std::optional<profile::Scope> part(std::in_place, "embedding");

  // embedding (+ the cls row, + positions, + ln0)
  float* x = sized(A.x0, N * C);
  const float* emb = W("emb.weight");
  for (int64_t b = 0; b < B; ++b) {
    if (R) std::copy(W("cls.weight"), W("cls.weight") + C, x + b * Tp * C);
    for (int64_t t = 0; t < T; ++t) {
      const int64_t tok = inputs[b * T + t];
      std::copy(emb + tok * C, emb + (tok + 1) * C, x + (b * Tp + R + t) * C);
    }
  }
  if (c.uses_pos_emb()) {  // learned absolute positions (GPT-2 style)
    LINMIX_CHECK(Tp <= c.ctx, "sequence of " + std::to_string(Tp) + " positions is longer than the model's ctx " +
                                  std::to_string(c.ctx) + " (it has learned positions)");
    const float* pw = W("pos.weight");
    for (int64_t i = 0; i < N; ++i)
      for (int64_t ch = 0; ch < C; ++ch) x[i * C + ch] += pw[(i % Tp) * C + ch];
  }
  if (c.ln0) {
    sized(A.e0, N * C), sized(A.mean0, N), sized(A.rstd0, N);
    norm_forward("blocks.0.ln0", A.e0.data(), A.mean0.data(), A.rstd0.data(), A.x0.data(), N);
  }
  auto io = [&](int64_t l) { return LayerIO{params_, nullptr, "blocks." + std::to_string(l) + ".", &A.carry, keep}; };
  std::vector<float> cur(c.ln0 ? A.e0 : A.x0), out2(N * C);
  part.reset();
  for (int64_t l = 0; l < c.n_layer; ++l) {  // x_mid = x + mix(ln1(x)); x' = x_mid + channel(ln2(x_mid))
    auto& L = A.layers[l];
    L.x_in = cur;
    sized(L.a, N * C), sized(L.mean1, N), sized(L.rstd1, N), sized(L.att_out, N * C);
    norm_forward(P(l, "ln1"), L.a.data(), L.mean1.data(), L.rstd1.data(), L.x_in.data(), N);
    part.emplace(c.layers[size_t(l)].mixer);
    layers_[l]->forward(io(l), L.a.data(), L.att_out.data(), B, Tp);
    part.reset();
    if (dropping()) dropout_branch(L.att_out.data(), N, Tp, l, 0);
    sized(L.x_mid, N * C);
    for (int64_t i = 0; i < N * C; ++i) L.x_mid[i] = L.x_in[i] + L.att_out[i];
    if (!c.has_channel_mix()) {  // Mamba's blocks: the mixer only
      cur = L.x_mid;
      continue;
    }
    sized(L.b, N * C), sized(L.mean2, N), sized(L.rstd2, N);
    norm_forward(P(l, "ln2"), L.b.data(), L.mean2.data(), L.rstd2.data(), L.x_mid.data(), N);
    part.emplace("channel mix");
    A.cmix[l].forward(io(l), L.b.data(), out2.data(), B, Tp);
    part.reset();
    if (dropping()) dropout_branch(out2.data(), N, Tp, l, 1);
    for (int64_t i = 0; i < N * C; ++i) cur[i] = L.x_mid[i] + out2[i];
  }
  A.xf = cur;
  sized(A.lnf, N * C), sized(A.meanf, N), sized(A.rstdf, N);
  norm_forward("ln_out", A.lnf.data(), A.meanf.data(), A.rstdf.data(), A.xf.data(), N);
}

void Model::trunk_backward(const int32_t* inputs, std::vector<float>& dlnf, int64_t B, int64_t T, TensorMap* grads) {
  const ModelConfig& c = cfg_;
  const int64_t C = c.d_model, R = c.cls_rows(), Tp = T + R, N = B * Tp;
  Acts& A = *acts_;
  const LayerIO top{params_, grads, ""};
  const profile::Scope prof("backward");
  std::optional<profile::Scope> part;
  std::vector<float> dx(N * C, 0.0f), db(N * C), da(N * C), dmask;
  const bool drop = dropping();
  auto branch_grad = [&](int64_t l, int branch) {  // d(branch output) = mask * d(residual sum)
    if (!drop) return dx.data();
    dmask = dx;
    dropout_branch(dmask.data(), N, Tp, l, branch);
    return dmask.data();
  };
  norm_backward("ln_out", dx.data(), dlnf.data(), A.xf.data(), A.meanf.data(), A.rstdf.data(), grads, N);
  for (int64_t l = c.n_layer - 1; l >= 0; --l) {
    auto& L = A.layers[l];
    const LayerIO lio{params_, grads, "blocks." + std::to_string(l) + ".", &A.carry};
    if (c.has_channel_mix()) {
      part.emplace("channel mix");
      A.cmix[l].backward(lio, branch_grad(l, 1), db.data(), B, Tp);  // dx holds d x_out
      part.reset();
      // dx (d x_mid) = dx + ln2 backward(db)
      norm_backward(P(l, "ln2"), dx.data(), db.data(), L.x_mid.data(), L.mean2.data(), L.rstd2.data(), grads, N);
    }
    std::fill(da.begin(), da.end(), 0.0f);
    part.emplace(c.layers[size_t(l)].mixer);
    layers_[l]->backward(lio, branch_grad(l, 0), da.data(), B, Tp);
    part.reset();
    // dx (d x_in) = dx + ln1 backward(da)
    norm_backward(P(l, "ln1"), dx.data(), da.data(), L.x_in.data(), L.mean1.data(), L.rstd1.data(), grads, N);
  }
  part.emplace("embedding");
  std::vector<float> demb(N * C, 0.0f);
  if (c.ln0) {
    norm_backward("blocks.0.ln0", demb.data(), dx.data(), A.x0.data(), A.mean0.data(), A.rstd0.data(), grads, N);
  } else {
    demb = dx;
  }
  if (c.uses_pos_emb()) {
    float* gp = top.g("pos.weight");
    for (int64_t i = 0; i < N; ++i)
      for (int64_t ch = 0; ch < C; ++ch) gp[(i % Tp) * C + ch] += demb[i * C + ch];
  }
  float* ge = top.g("emb.weight");
  float* gc = R ? top.g("cls.weight") : nullptr;
  for (int64_t b = 0; b < B; ++b) {
    if (R)
      for (int64_t ch = 0; ch < C; ++ch) gc[ch] += demb[b * Tp * C + ch];
    for (int64_t t = 0; t < T; ++t) {
      const float* d = &demb[(b * Tp + R + t) * C];
      float* g = ge + int64_t(inputs[b * T + t]) * C;
      for (int64_t ch = 0; ch < C; ++ch) g[ch] += d[ch];
    }
  }
}

double Model::forward_backward(const int32_t* inputs, const int32_t* targets, int64_t B, int64_t T,
                               TensorMap* grads, float grad_scale, int64_t* counted_out) {
  const ModelConfig& c = cfg_;
  LINMIX_CHECK(!c.classifier(), "this model is a classifier (" + std::to_string(c.classes) +
                                    " classes): it has no next-token logits");
  const int64_t C = c.d_model, V = c.vocab, N = B * T;
  trunk_forward(inputs, B, T, grads && targets);
  Acts& A = *acts_;
  sized(A.logits, N * V);
  std::optional<profile::Scope> part(std::in_place, "head");
  nn::matmul_forward(A.logits.data(), A.lnf.data(), params_.at("head.weight").ptr(), nullptr, N, C, V);
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

  const LayerIO top{params_, grads, ""};
  std::vector<float> dlnf(N * C);
  nn::matmul_backward(dlnf.data(), top.g("head.weight"), nullptr, dlogits.data(), A.lnf.data(),
                      params_.at("head.weight").ptr(), N, C, V);
  part.reset();
  trunk_backward(inputs, dlnf, B, T, grads);
  return loss;
}

double Model::classify(const int32_t* inputs, const int32_t* lengths, const int32_t* labels, int64_t B, int64_t T,
                       TensorMap* grads, float grad_scale, float* logits_out) {
  const ModelConfig& c = cfg_;
  LINMIX_CHECK(c.classifier(), "this model is a language model, not a classifier (its config has no \"classes\")");
  LINMIX_CHECK(!grads || labels, "classify: gradients need labels");
  const int64_t C = c.d_model, K = c.classes, R = c.cls_rows(), Tp = T + R;
  for (int64_t b = 0; b < B; ++b) {
    LINMIX_CHECK(lengths[b] >= 1 && lengths[b] <= T, "sequence " + std::to_string(b) + " has length " +
                                                         std::to_string(lengths[b]) + ", outside [1, " +
                                                         std::to_string(T) + "]");
    LINMIX_CHECK(!labels || (labels[b] >= 0 && labels[b] < K),
                 "label " + std::to_string(labels ? labels[b] : 0) + " is outside the model's " + std::to_string(K) +
                     " classes");
  }
  trunk_forward(inputs, B, T, grads != nullptr);
  Acts& A = *acts_;
  // pool: each sequence's cls row, or the mean of its own (unpadded) rows
  std::vector<float> pooled(B * C, 0.0f), logits(B * K);
  for (int64_t b = 0; b < B; ++b) {
    float* p = &pooled[b * C];
    if (R) {
      std::copy(&A.lnf[b * Tp * C], &A.lnf[b * Tp * C] + C, p);
      continue;
    }
    for (int64_t t = 0; t < lengths[b]; ++t)
      for (int64_t ch = 0; ch < C; ++ch) p[ch] += A.lnf[(b * Tp + t) * C + ch];
    for (int64_t ch = 0; ch < C; ++ch) p[ch] /= float(lengths[b]);
  }
  nn::matmul_forward(logits.data(), pooled.data(), params_.at("head.weight").ptr(), params_.at("head.bias").ptr(), B,
                     C, K);
  for (float v : logits)
    LINMIX_CHECK(std::isfinite(v), "the class logits are not finite: the model's weights overflow float32");
  if (logits_out) std::copy(logits.begin(), logits.end(), logits_out);
  if (!labels) return 0.0;
  std::vector<float> dlogits(grads ? B * K : 0);
  const double loss = nn::crossentropy_forward_backward(grads ? dlogits.data() : nullptr, logits.data(), labels, B, K,
                                                        grad_scale / float(B), nullptr) /
                      double(B);
  if (!grads) return loss;
  const LayerIO top{params_, grads, ""};
  std::vector<float> dpooled(B * C), dlnf(B * Tp * C, 0.0f);
  nn::matmul_backward(dpooled.data(), top.g("head.weight"), top.g("head.bias"), dlogits.data(), pooled.data(),
                      params_.at("head.weight").ptr(), B, C, K);
  for (int64_t b = 0; b < B; ++b) {
    const float* dp = &dpooled[b * C];
    if (R) {
      std::copy(dp, dp + C, &dlnf[b * Tp * C]);
      continue;
    }
    for (int64_t t = 0; t < lengths[b]; ++t)
      for (int64_t ch = 0; ch < C; ++ch) dlnf[(b * Tp + t) * C + ch] = dp[ch] / float(lengths[b]);
  }
  trunk_backward(inputs, dlnf, B, T, grads);
  return loss;
}

std::vector<float> Model::logits(const int32_t* inputs, int64_t B, int64_t T) {
  forward_backward(inputs, nullptr, B, T, nullptr);
  return acts_->logits;
}

// ---------------------------------------------------------------- recurrent state

Model::State::State() = default;
Model::State::State(int64_t n_layer, int64_t d_model)
    : layer(size_t(n_layer)), ffn_prev(size_t(n_layer), std::vector<float>(size_t(d_model), 0.0f)), run(size_t(n_layer)) {}
Model::State::~State() = default;
Model::State::State(State&&) noexcept = default;
Model::State& Model::State::operator=(State&&) noexcept = default;

void Model::State::flush() {
  for (size_t l = 0; l < run.size(); ++l)
    if (run[l]) layer[l] = run[l]->save(), run[l].reset();
}

Model::State Model::new_state() const { return State(cfg_.n_layer, cfg_.d_model); }

TensorMap Model::state_tensors(const State& st) const {
  TensorMap out;
  out["pos"] = Tensor({1}, float(st.pos));
  for (int64_t l = 0; l < cfg_.n_layer; ++l) {
    const std::string p = "layer." + std::to_string(l) + ".";
    if (cfg_.rwkv_channel_mix()) out[p + "ffn_prev"] = tensor_of({cfg_.d_model}, st.ffn_prev[l].data());
    for (const auto& [n, t] : st.run[l] ? st.run[l]->save() : st.layer[l]) out[p + n] = t;
  }
  return out;
}

Model::State Model::state_from_tensors(const TensorMap& t) const {
  State st = new_state();
  auto it = t.find("pos");
  LINMIX_CHECK(it != t.end() && it->second.numel() == 1 && it->second.data[0] >= 0 &&
                   it->second.data[0] <= float(1 << 24) && it->second.data[0] == std::floor(it->second.data[0]),
               "state: missing or malformed tensor 'pos' (an integer position in [0, 2^24])");
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
    const bool zeros = std::all_of(x.data.begin(), x.data.end(), [](float v) { return v == 0.0f; });
    if (rest == "ffn_prev") {
      check_shape(n, x, {cfg_.d_model});
      LINMIX_CHECK(cfg_.rwkv_channel_mix() || zeros, "state: unexpected tensor '" + n + "' (no token shift here)");
      st.ffn_prev[l] = std::vector<float>(x.data);
    } else if (rest == "att_prev" && cfg_.layers[l].mixer != "rwkv4" && zeros && x.numel() == cfg_.d_model) {
      // states saved before layers kept their own: a zero token shift for every layer
    } else {
      st.layer[l][rest] = x;
    }
  }
  // every layer validates its state by starting from it (names, shapes, the mixer's checks)
  for (int64_t l = 0; l < cfg_.n_layer; ++l)
    if (!st.layer[l].empty()) {
      st.run[l] = layers_[l]->start(LayerIO{params_, nullptr, "blocks." + std::to_string(l) + "."}, st.layer[l]);
      st.layer[l].clear();
    }
  return st;
}

// ---------------------------------------------------------------- recurrent step

void Model::step(int32_t token, State& st, float* logits_out) {
  check_weights();
  const ModelConfig& c = cfg_;
  LINMIX_CHECK(!c.classifier() && c.causal, "this model is a classifier (" + std::to_string(c.classes) +
                                                " classes): it has no recurrent next-token form");
  const int64_t C = c.d_model, V = c.vocab;
  LINMIX_CHECK(token >= 0 && token < V, "token " + std::to_string(token) + " is outside the vocabulary");
  LINMIX_CHECK(int64_t(st.run.size()) == c.n_layer && int64_t(st.layer.size()) == c.n_layer &&
                   int64_t(st.ffn_prev.size()) == c.n_layer,
               "state: it has " + std::to_string(st.layer.size()) + " layers, the model " + std::to_string(c.n_layer));
  if (!acts_) acts_ = std::make_unique<Acts>();
  Acts& A = *acts_;
  if (A.cmix.empty()) A.cmix.assign(size_t(c.n_layer), ChannelMix(c));
  auto W = [&](const std::string& n) { return params_.at(n).ptr(); };
  float mean, rstd;
  A.x0.assign(W("emb.weight") + token * C, W("emb.weight") + (token + 1) * C);
  float* x = A.x0.data();
  A.lnf.resize(C), A.logits.resize(C), A.xf.resize(C), A.carry_step.resize(C);
  float *a = A.lnf.data(), *o = A.xf.data();
  if (c.uses_pos_emb()) {
    LINMIX_CHECK(st.pos < c.ctx, "position " + std::to_string(st.pos) + " is past the model's ctx " +
                                     std::to_string(c.ctx) + " (learned positions end there)");
    const float* pw = W("pos.weight") + st.pos * C;
    for (int64_t ch = 0; ch < C; ++ch) x[ch] += pw[ch];
  }
  if (c.ln0) norm_forward("blocks.0.ln0", x, &mean, &rstd, x, 1);
  for (int64_t l = 0; l < c.n_layer; ++l) {
    const LayerIO io{params_, nullptr, "blocks." + std::to_string(l) + "."};
    if (!st.run[l]) {  // the layer's runtime takes over its state
      st.run[l] = layers_[l]->start(io, st.layer[l]);
      st.layer[l].clear();
    }
    norm_forward(io.prefix + "ln1", a, &mean, &rstd, x, 1);
    st.run[l]->carry = A.carry_step.data();
    st.run[l]->step(a, o);
    for (int64_t ch = 0; ch < C; ++ch) x[ch] += o[ch];
    if (!c.has_channel_mix()) continue;
    norm_forward(io.prefix + "ln2", a, &mean, &rstd, x, 1);
    A.cmix[l].step(io, a, o, st.ffn_prev[l]);
    for (int64_t ch = 0; ch < C; ++ch) x[ch] += o[ch];
  }
  norm_forward("ln_out", a, &mean, &rstd, x, 1);
  nn::matmul_forward(logits_out, a, W("head.weight"), nullptr, 1, C, V);
  for (int64_t i = 0; i < V; ++i)  // a model (or state) whose numbers overflow float32 is refused, not sampled
    LINMIX_CHECK(std::isfinite(logits_out[i]), "the logits are not finite at position " + std::to_string(st.pos) +
                                                   ": the model's weights or state overflow float32");
  st.pos += 1;
}

}  // namespace linmix
