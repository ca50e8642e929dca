// The table of layer kinds keyed by mixer name, and the helpers the layer files share.
#include "mixer_layer.h"

#include <cmath>
#include <functional>
#include <map>

#include "linmix/profile.h"

namespace linmix {

std::unique_ptr<MixerLayer> attention_layer(const ModelConfig& cfg, int64_t index);
std::unique_ptr<MixerLayer> aft_layer(const ModelConfig& cfg, int64_t index);
std::unique_ptr<MixerLayer> rwkv4_layer(const ModelConfig& cfg, int64_t index);
std::unique_ptr<MixerLayer> s4d_layer(const ModelConfig& cfg, int64_t index);
std::unique_ptr<MixerLayer> gau_layer(const ModelConfig& cfg, int64_t index);
std::unique_ptr<MixerLayer> mamba_layer(const ModelConfig& cfg, int64_t index);
std::unique_ptr<MixerLayer> decay_layer(const ModelConfig& cfg, int64_t index);
std::unique_ptr<MixerLayer> rwkv_layer(const ModelConfig& cfg, int64_t index);
std::unique_ptr<MixerLayer> mamba2_layer(const ModelConfig& cfg, int64_t index);
std::unique_ptr<MixerLayer> fnet_layer(const ModelConfig& cfg, int64_t index);

namespace {

struct Kind {
  std::unique_ptr<MixerLayer> (*make)(const ModelConfig&, int64_t);
  bool positions;           // learned absolute positions by default (the mixer has no order of its own)
  const char* channel_mix;  // the channel mix `linmix train --mixer NAME` pairs it with
  bool bounded = false;     // its parameters cover ctx positions only (AFT's learned bias w)
  bool noncausal = false;   // the layer also runs its mixer's non-causal form (an encoder's layer)
  bool causal = true;       // the layer runs its mixer's causal form (a language model's layer)
};

// One line per mechanism that can be a model's layer: of a language model (causal) and / or of
// an encoder (non-causal).
const std::map<std::string, Kind>& table() {
  static const std::map<std::string, Kind> t = {
      {"softmax", {attention_layer, true, "mlp", false, true}},
      {"linear", {attention_layer, true, "mlp", false, true}},
      {"performer", {attention_layer, true, "mlp", false, true}},
      {"flow", {attention_layer, true, "mlp", false, true}},
      {"norm_linear", {attention_layer, true, "mlp", false, true}},
      {"block_softmax", {attention_layer, true, "mlp", false, true}},
      {"aft_full", {aft_layer, false, "mlp", true, true}},
      {"aft_local", {aft_layer, false, "mlp", true, true}},
      {"aft_simple", {aft_layer, false, "mlp", false, true}},
      {"aft_conv", {aft_layer, false, "mlp", false, true}},
      {"fnet", {fnet_layer, true, "mlp", false, true, false}},
      {"rwkv4", {rwkv4_layer, false, "rwkv"}},
      {"s4d", {s4d_layer, false, "mlp"}},
      {"flash", {gau_layer, true, "mlp", false, true}},
      {"mamba", {mamba_layer, false, "mlp"}},
      {"retention", {decay_layer, false, "mlp"}},
      {"gla", {decay_layer, false, "mlp"}},
      {"deltanet", {decay_layer, false, "mlp"}},
      {"gated_deltanet", {decay_layer, false, "mlp"}},
      {"rwkv5", {rwkv_layer, false, "rwkv"}},
      {"rwkv6", {rwkv_layer, false, "rwkv6"}},
      {"rwkv7", {rwkv_layer, false, "rwkv7"}},
      {"mamba2", {mamba2_layer, false, "mlp"}},
  };
  return t;
}

const Kind& kind(const std::string& mixer) {
  find_mixer(mixer);  // unknown names fail here, naming the known ones
  auto it = table().find(mixer);
  LINMIX_CHECK(it != table().end(), "mixer '" + mixer + "' has no model layer");
  return it->second;
}

std::string layer_names(bool causal) {
  std::string s;
  for (const auto& [n, k] : table())
    if (causal ? k.causal : k.noncausal) s += (s.empty() ? "" : ", ") + n;
  return s;
}

}  // namespace

void check_mixer_layer(const std::string& mixer, bool causal) {
  const Kind& k = kind(mixer);
  const MixerSpec& spec = find_mixer(mixer);
  if (causal ? k.causal && spec.causal_ok : k.noncausal && spec.noncausal_ok) return;
  throw Error(causal ? "mixer '" + mixer + "' has no causal form, so it cannot be a layer of a language model or a "
                                            "causal classifier (it can be an encoder's: \"causal\": false); causal "
                                            "layers: " + layer_names(true)
                      : "mixer '" + mixer + "' has no non-causal form, so it cannot be an encoder layer (\"causal\": "
                                            "false); a causal classifier (\"causal\": true) can use it; non-causal "
                                            "layers: " + layer_names(false));
}

std::unique_ptr<MixerLayer> make_mixer_layer(const ModelConfig& cfg, int64_t index) {
  return kind(cfg.layers.at(size_t(index)).mixer).make(cfg, index);
}
bool has_mixer_layer(const std::string& mixer) { return kind(mixer).make != nullptr; }
bool layer_wants_positions(const std::string& mixer) { return kind(mixer).positions; }
std::string layer_channel_mix(const std::string& mixer) { return kind(mixer).channel_mix; }
bool layer_bounded_by_ctx(const std::string& mixer) { return kind(mixer).bounded; }

float* LayerIO::g(const std::string& n) const {
  LINMIX_CHECK(grads, "LayerIO: no gradients in this pass");
  auto it = grads->find(prefix + n);
  if (it == grads->end()) it = grads->emplace(prefix + n, Tensor(params.at(prefix + n).shape)).first;
  return it->second.ptr();
}

namespace {
// The layer's knobs, which are not the mixer's params.
const char* const kKnobs[] = {"features", "kernel", "state", "qk_dim", "expand", "gate",    "d_mix",  "d_decay",
                              "d_w",      "d_a",    "d_v",   "d_g",    "gn_eps", "dt_rank", "groups", "init"};
std::map<std::string, std::string> mixer_params(const LayerConfig& lc) {
  auto p = lc.params;
  for (const char* k : kKnobs) p.erase(k);
  return p;
}
}  // namespace

namespace {
std::vector<CapturedCall>* g_capture = nullptr;
}  // namespace

void set_mixer_capture(std::vector<CapturedCall>* sink) { g_capture = sink; }

Tensor mixer_forward(const LayerConfig& lc, const TensorMap& in, bool causal, std::shared_ptr<RunSaved>* keep) {
  const profile::Scope prof("mechanism");
  if (g_capture) g_capture->push_back({lc.mixer, mixer_params(lc), causal, in});
  if (keep) keep->reset();
  return run_mixer(lc.mixer, Mode::Parallel, causal, mixer_params(lc), in, false, false, true, keep).at("y");
}

TensorMap mixer_backward(const LayerConfig& lc, const TensorMap& in, std::vector<int64_t> y_shape, const float* dy,
                         bool causal, const RunSaved* reuse) {
  const profile::Scope prof("mechanism");
  TensorMap call;
  for (const auto& [name, t] : in) call.emplace(name, view_of(t.shape, t.ptr()));
  call["dy"] = view_of(std::move(y_shape), dy);
  // the inputs' values were checked by mixer_forward; dy is the model's own (a NaN reaches the loss)
  return run_mixer(lc.mixer, Mode::Parallel, causal, mixer_params(lc), call, true, false, false, nullptr, reuse);
}

Tensor view_of(std::vector<int64_t> shape, const float* src) {
  Tensor t;
  t.shape = std::move(shape);
  t.data = Storage::view(const_cast<float*>(src), size_t(numel_of(t.shape)), nullptr);
  return t;
}

Tensor tensor_of(std::vector<int64_t> shape, const float* src) {
  Tensor t(std::move(shape));
  std::copy(src, src + t.numel(), t.data.begin());
  return t;
}

MixerStep::MixerStep(const LayerConfig& lc, TensorMap in, const TensorMap& state) : in_(std::move(in)) {
  const auto params = mixer_params(lc);
  if (!state.empty()) {  // the state's names and shapes, checked like `linmix mix --mode recurrent`
    TensorMap with = in_;
    for (const auto& [n, t] : state) with[n] = t;
    validate_call(lc.mixer, Mode::Recurrent, true, params, with);
  }
  call_ = std::make_unique<Call>(validate_call(lc.mixer, Mode::Recurrent, true, params, in_));
  const MixerSpec& spec = find_mixer(lc.mixer);
  LINMIX_CHECK(spec.stepper, "mixer '" + lc.mixer + "' has no recurrent form");
  st_ = spec.stepper(*call_);
  if (!state.empty()) st_.load(state);
}

TensorMap split_layer_state(const TensorMap& state, const std::vector<std::pair<std::string, int64_t>>& own,
                            TensorMap& own_out, int64_t index) {
  TensorMap mix;
  for (const auto& [n_, t] : state) {
    const std::string& n = n_;  // (clang 14 cannot capture a structured binding)
    auto it = std::find_if(own.begin(), own.end(), [&](const auto& o) { return o.first == n; });
    if (it != own.end()) {
      LINMIX_CHECK(t.rank() == 1 && t.numel() == it->second,
                   "state: tensor 'layer." + std::to_string(index) + "." + n + "' should have shape [" +
                       std::to_string(it->second) + "], found " + shape_str(t.shape));
      own_out[n] = t;
    } else {
      LINMIX_CHECK(n.rfind("state.", 0) == 0,
                   "state: unexpected tensor 'layer." + std::to_string(index) + "." + n + "'");
      mix[n] = t;
    }
  }
  return mix;
}


}  // namespace linmix
