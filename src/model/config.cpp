// The model config: JSON in and out, validation, defaults.
#include <cstdlib>
#include <nlohmann/json.hpp>

#include "linmix/model.h"
#include "channel_mix.h"
#include "mixer_layer.h"

namespace linmix {

using json = nlohmann::json;

// ---------------------------------------------------------------- config

namespace {
ModelConfig from_json_impl(const std::string& text) {
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
                                                 "mixer",   "params",   "layers", "state", "qk_dim", "expand", "pos_emb",
                                                 "ffn_dim", "norm", "causal", "classes", "pool", "dropout"};
  for (auto it = j.begin(); it != j.end(); ++it)
    LINMIX_CHECK(std::find(known.begin(), known.end(), it.key()) != known.end(),
                 "model config: unknown field '" + it.key() + "'");
  auto geti = [&](const char* k, int64_t& dst) {
    if (!j.contains(k)) return;
    LINMIX_CHECK(j[k].is_number_integer(), std::string("model config: '") + k + "' must be an integer");
    dst = j[k].get<int64_t>();
  };
  geti("vocab", c.vocab), geti("d_model", c.d_model), geti("n_layer", c.n_layer), geti("n_head", c.n_head);
  geti("ctx", c.ctx), geti("ffn_mult", c.ffn_mult), geti("ffn_dim", c.ffn_dim), geti("features", c.features), geti("kernel", c.kernel);
  geti("state", c.state), geti("qk_dim", c.qk_dim), geti("expand", c.expand), geti("classes", c.classes);
  if (j.contains("causal")) {
    LINMIX_CHECK(j["causal"].is_boolean(), "model config: 'causal' must be true or false");
    c.causal = j["causal"].get<bool>();
  }
  if (j.contains("pool")) {
    LINMIX_CHECK(j["pool"].is_string(), "model config: 'pool' must be a string");
    c.pool = j["pool"].get<std::string>();
  }
  if (j.contains("channel_mix")) {
    LINMIX_CHECK(j["channel_mix"].is_string(), "model config: 'channel_mix' must be a string");
    c.channel_mix = j["channel_mix"].get<std::string>();
  }
  if (j.contains("norm")) {
    LINMIX_CHECK(j["norm"].is_string(), "model config: 'norm' must be a string");
    c.norm = j["norm"].get<std::string>();
  }
  if (j.contains("pos_emb")) {
    LINMIX_CHECK(j["pos_emb"].is_boolean(), "model config: 'pos_emb' must be true or false");
    c.pos_emb = j["pos_emb"].get<bool>() ? 1 : 0;
  }
  if (j.contains("dropout")) {
    LINMIX_CHECK(j["dropout"].is_number(), "model config: 'dropout' must be a number");
    c.dropout = j["dropout"].get<double>();
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
    // bounded before the layers are made (n_layer 2e14 was an out-of-memory, found by fuzzing)
    LINMIX_CHECK(c.n_layer >= 1 && c.n_layer <= 256, "model config: n_layer must be in [1, 256]");
    for (int64_t i = 0; i < c.n_layer; ++i) c.layers.push_back({m, p});
  }
  c.validate();
  return c;
}
}  // namespace

ModelConfig ModelConfig::from_json(const std::string& text) {
  try {
    return from_json_impl(text);
  } catch (const nlohmann::json::exception& e) {  // a field of the wrong type or range
    throw Error(std::string("model config: a field has the wrong type (") + e.what() + ")");
  }

}

ModelConfig ModelConfig::for_mixer(const std::string& mixer) {
  ModelConfig c;
  c.d_model = 128, c.n_layer = 4, c.n_head = 4, c.ctx = 256;
  find_mixer(mixer);  // unknown names fail here, naming the known ones
  c.channel_mix = layer_channel_mix(mixer);
  c.layers.assign(size_t(c.n_layer), LayerConfig{mixer, {}});
  if (mixer == "rwkv5" || mixer == "rwkv6" || mixer == "rwkv7") {  // BlinkDL's models: ln0, F = 3.5 C (v5.2, v6)
    c.ln0 = true;
    if (mixer != "rwkv7") c.ffn_dim = int64_t(3.5 * double(c.d_model)) / 32 * 32;
  }
  c.validate();
  return c;
}

ModelConfig ModelConfig::for_classifier(const std::string& mixer, int64_t vocab, int64_t classes, int64_t seq) {
  ModelConfig c = [&] {
    try {
      return for_mixer(mixer);
    } catch (const Error&) {  // fnet: no causal form, so no language model
      ModelConfig f;
      f.d_model = 128, f.n_layer = 4, f.n_head = 4;
      f.channel_mix = layer_channel_mix(mixer);
      f.layers.assign(size_t(f.n_layer), LayerConfig{mixer, {}});
      return f;
    }
  }();
  c.vocab = vocab, c.classes = classes, c.ctx = seq;
  c.causal = false;
  try {
    check_mixer_layer(mixer, false);
  } catch (const Error&) {
    c.causal = true;
  }
  c.validate();
  return c;
}

std::string ModelConfig::to_json() const {
  json j = {{"vocab", vocab},       {"d_model", d_model},   {"n_layer", n_layer}, {"n_head", n_head},
            {"ctx", ctx},           {"channel_mix", channel_mix}, {"ffn_mult", ffn_mult}, {"ffn_dim", ffn_dim}, {"features", features},
            {"kernel", kernel},     {"ln0", ln0}, {"state", state}, {"qk_dim", qk_dim}, {"expand", expand},
            {"pos_emb", uses_pos_emb()}, {"norm", norm}};
  if (classifier() || !causal) j["causal"] = causal, j["classes"] = classes, j["pool"] = pool;
  if (dropout > 0) j["dropout"] = dropout;
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
  LINMIX_CHECK(dropout >= 0.0 && dropout < 1.0, "model config: dropout must be in [0, 1)");  // NaN fails too
  LINMIX_CHECK(ffn_mult >= 1 && ffn_mult <= 64, "model config: ffn_mult must be in [1, 64]");
  LINMIX_CHECK(ffn_dim >= 0 && ffn_dim <= 64 * d_model, "model config: ffn_dim must be in [0, 64 d_model] (0: ffn_mult d_model)");
  LINMIX_CHECK(features >= 1 && kernel >= 1, "model config: features and kernel must be >= 1");
  LINMIX_CHECK(state >= 1 && state <= 1024 && qk_dim >= 1 && qk_dim <= 4096 && expand >= 1 && expand <= 16,
               "model config: state in [1, 1024], qk_dim in [1, 4096], expand in [1, 16]");
  LINMIX_CHECK(channel_mix == "mlp" || channel_mix == "rwkv" || channel_mix == "rwkv6" || channel_mix == "rwkv7" ||
                   channel_mix == "none",
               "model config: channel_mix must be \"mlp\", \"rwkv\", \"rwkv6\", \"rwkv7\" or \"none\", found \"" +
                   channel_mix + "\"");
  LINMIX_CHECK(norm == "layernorm" || norm == "rmsnorm",
               "model config: norm must be \"layernorm\" or \"rmsnorm\", found \"" + norm + "\"");
  LINMIX_CHECK(static_cast<int64_t>(layers.size()) == n_layer,
               "model config: " + std::to_string(layers.size()) + " layers given for n_layer = " + std::to_string(n_layer));
  LINMIX_CHECK(classes >= 0 && classes <= (1 << 16), "model config: classes must be in [0, 2^16] (0: a language model)");
  LINMIX_CHECK(classes != 1, "model config: a classifier needs at least 2 classes");
  LINMIX_CHECK(pool == "mean" || pool == "cls", "model config: pool must be \"mean\" or \"cls\", found \"" + pool + "\"");
  LINMIX_CHECK(causal || classifier(),
               "model config: a non-causal model must be a classifier (\"classes\" > 0): a language model that sees "
               "the token it predicts learns nothing");
  LINMIX_CHECK(pool == "mean" || classifier(), "model config: \"pool\" is a classifier's (set \"classes\")");
  for (const auto& l : layers) {
    check_mixer_layer(l.mixer, causal);  // unknown names and mixers without such a layer fail here
    for (const char* k : {"features", "kernel", "state", "qk_dim", "expand", "gate", "d_mix", "d_decay", "d_w", "d_a",
                          "d_v", "d_g", "dt_rank", "groups"})
      if (l.params.count(k)) knob(l, k);  // malformed knobs fail here
    if (l.params.count("init"))
      LINMIX_CHECK(l.mixer == "s4d" && (l.params.at("init") == "lin" || l.params.at("init") == "legs"),
                   std::string("model config: layer param 'init' is s4d's: \"lin\" (S4D-Lin) or \"legs\" (S4D-LegS), "
                               "found '") + l.params.at("init") + "' for " + l.mixer);
  }  const double n = double(param_count());
  LINMIX_CHECK(n <= double(kMaxParams), "model config: " + std::to_string(int64_t(n)) +
                                            " parameters, more than linmix's limit of 2^32");
}

int64_t ModelConfig::param_count() const {  // the shapes Model's constructor allocates, summed
  auto numel = [](const std::vector<int64_t>& s) {
    double n = 1;
    for (int64_t d : s) n *= double(d);
    return n;
  };
  const double nw = rms() ? 1.0 : 2.0;  // a norm's vectors: weight (and bias)
  double n = double(vocab) * double(d_model) + nw * double(d_model);  // emb, ln_out
  n += classifier() ? double(classes) * (double(d_model) + 1) + double(cls_rows() * d_model)  // head (+ bias), cls
                    : double(vocab) * double(d_model);
  if (uses_pos_emb()) n += double(ctx) * double(d_model);
  if (ln0) n += nw * double(d_model);
  const double C = double(d_model);
  double cm = 0;  // one block's channel mix, from its own shapes
  if (has_channel_mix())
    for (const auto& [name, shape] : ChannelMix(*this).shapes()) cm += numel(shape);
  for (int64_t i = 0; i < n_layer; ++i) {
    n += nw * C * (has_channel_mix() ? 2 : 1) + cm;
    for (const auto& [name, shape] : make_mixer_layer(*this, i)->shapes()) n += numel(shape);
    if (n > 1e18) break;
  }
  return n > 1e18 ? int64_t(1e18) : int64_t(n);
}

bool ModelConfig::uses_pos_emb() const {
  if (pos_emb >= 0) return pos_emb == 1;
  if (!causal) return true;  // a non-causal mixer has no order of its own
  for (const auto& l : layers)  // default: the attention-like mixers carry no order of their own
    if (layer_wants_positions(l.mixer)) return true;
  return false;
}

int64_t ModelConfig::context_limit() const {
  if (uses_pos_emb()) return ctx;
  for (const auto& l : layers)
    if (layer_bounded_by_ctx(l.mixer)) return ctx;
  return 0;
}

int64_t ModelConfig::knob(const LayerConfig& l, const std::string& name) const {
  const std::map<std::string, std::pair<int64_t, int64_t>> bounds = {
      {"features", {1, 1 << 16}}, {"kernel", {1, 1 << 16}}, {"state", {1, 1024}}, {"qk_dim", {1, 4096}},
      {"expand", {1, 16}}, {"gate", {0, 1}}, {"d_mix", {1, 4096}}, {"d_decay", {1, 4096}}, {"d_w", {1, 4096}},
      {"d_a", {1, 4096}}, {"d_v", {1, 4096}}, {"d_g", {1, 4096}}, {"dt_rank", {1, 4096}}, {"groups", {1, 1024}}};
  auto it = l.params.find(name);
  if (it == l.params.end()) {
    if (name == "features") return features;
    if (name == "kernel") return kernel;
    if (name == "state") return state;
    if (name == "qk_dim") return qk_dim;
    if (name == "expand") return expand;
    if (name == "groups") return 1;
    throw Error("model config: unknown layer knob '" + name + "'");
  }
  char* end = nullptr;
  const long long v = std::strtoll(it->second.c_str(), &end, 10);
  const auto [lo, hi] = bounds.at(name);
  LINMIX_CHECK(!it->second.empty() && *end == '\0' && v >= lo && v <= hi,
               "model config: layer param '" + name + "' must be an integer in [" + std::to_string(lo) + ", " +
                   std::to_string(hi) + "], found '" + it->second + "'");
  return v;
}

}  // namespace linmix
