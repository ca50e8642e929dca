// The token-mixing layer of a language-model block, one class per layer kind (one file each
// under src/model/): attention-like q/k/v/o (attention_layer.cpp), AFT (aft_layer.cpp), RWKV-4
// time-mix (rwkv4_layer.cpp), S4D (s4d_layer.cpp), GAU (gau_layer.cpp), Mamba (mamba_layer.cpp),
// Mamba-2 (mamba2_layer.cpp), the decaying / delta-rule family (decay_layer.cpp), RWKV-5/6/7
// (rwkv_layer.cpp).
// Each declares its parameters and their initialisation, runs forward and backward on the
// block's normalised input (keeping its own activations between the two), and starts a
// recurrent runtime (LayerRun) with its own state. make_mixer_layer() picks the class from a
// table keyed by mixer name (mixer_layer.cpp): a mechanism that fits an existing kind is one
// line there; a new kind is one file and one line.
#pragma once
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "kernels/vmath.h"
#include "linmix/mixer.h"
#include "linmix/model.h"

namespace linmix {

// What crosses layers besides the residual stream, per forward (rows of C): RWKV-7's value
// residual v_first (set by the first rwkv7 layer, read by the later ones) and its gradient
// (added by the later layers' backward, read by the first's, which runs last).
struct Carry {
  std::vector<float> v_first, dv_first;
};

// A layer's view of the model's parameters and gradients: names relative to "blocks.<i>.".
struct LayerIO {
  const TensorMap& params;
  TensorMap* grads;    // null in forward-only and recurrent use
  std::string prefix;  // "blocks.<i>."
  Carry* carry = nullptr;  // the model's, in forward and backward
  // A training forward: backward follows on the same inputs, so a mixer may keep what its
  // backward reads (mixer_forward's keep) instead of the backward running the forward again.
  bool keep = false;
  const float* w(const std::string& n) const { return params.at(prefix + n).ptr(); }
  const Tensor& t(const std::string& n) const { return params.at(prefix + n); }
  float* g(const std::string& n) const;  // d(loss)/d(param): the accumulator, created as zeros
};

// One layer's recurrent runtime (one sequence): the mechanism's stepper and the layer's own
// buffers (token shift, convolution window). step() is allocation-free.
class LayerRun {
 public:
  virtual ~LayerRun() = default;
  virtual void step(const float* a, float* out) = 0;  // a: the block's normalised input (C); out (C)
  // The layer's state as tensors: its own ("att_prev", "conv", ...) and the mixer's "state.*".
  virtual TensorMap save() const = 0;
  float* carry = nullptr;  // this token's cross-layer values (C; RWKV-7's v_first), set by Model::step
};

// What a layer's init reads: the model's generator (shared, so the draws are in the model's
// parameter order), the seed, and the layer's depth = layer / (n_layer - 1).
struct InitCtx {
  std::mt19937_64& rng;
  std::normal_distribution<float>& normal;
  uint64_t seed;
  float depth;
};

using ParamShapes = std::vector<std::pair<std::string, std::vector<int64_t>>>;

class MixerLayer {
 public:
  MixerLayer(const ModelConfig& cfg, int64_t index)
      : cfg_(cfg), lc_(cfg.layers.at(size_t(index))), index_(index), C_(cfg.d_model) {}
  virtual ~MixerLayer() = default;

  // Its parameters, named under "blocks.<i>." (e.g. "att.q.weight"), with shapes.
  virtual ParamShapes shapes() const = 0;
  // Initialises one of its parameters; false: the model's default rule (0.02 N(0,1), scaled
  // down for output projections). Draws come from the model's one generator, in its order.
  virtual bool init(const std::string& name, Tensor& t, InitCtx& ctx) const {
    (void)name, (void)t, (void)ctx;
    return false;
  }
  // After every parameter's init: a rule that couples several of the layer's parameters (S4D-LegS:
  // C = C0 B) or overrides the model's rule for a bias (Mamba's dt_proj.bias); params: the model's,
  // prefix "blocks.<i>.", rng: the layer's own generator (seeded from the model's seed and index).
  virtual void finish_init(TensorMap& params, const std::string& prefix, std::mt19937_64& rng) const {
    (void)params, (void)prefix, (void)rng;
  }
  // a (B*T, C) -> out (B*T, C), written; keeps what backward needs (a must stay valid).
  virtual void forward(const LayerIO& io, const float* a, float* out, int64_t B, int64_t T) = 0;
  // dout (B*T, C) -> da (B*T, C), added; parameter gradients into io.grads.
  virtual void backward(const LayerIO& io, const float* dout, float* da, int64_t B, int64_t T) = 0;
  // A recurrent runtime from `state` (empty = the zero state); validates it, naming what is wrong.
  // The runtime reads the parameters as they are now.
  virtual std::unique_ptr<LayerRun> start(const LayerIO& io, const TensorMap& state) const = 0;

 protected:
  const ModelConfig& cfg_;
  const LayerConfig& lc_;
  int64_t index_, C_;
};

// The layer of cfg.layers[index], from the table keyed by mixer name.
std::unique_ptr<MixerLayer> make_mixer_layer(const ModelConfig& cfg, int64_t index);
// Table facts used by ModelConfig: whether the mixer has a layer, whether that layer needs
// learned positions (attention-like: no order of its own), its preferred channel mix.
bool has_mixer_layer(const std::string& mixer);
// Throws Error unless the mixer can be a layer of a causal (language model, causal classifier) or
// non-causal (encoder) model, naming the ones that can.
void check_mixer_layer(const std::string& mixer, bool causal);
bool layer_wants_positions(const std::string& mixer);
std::string layer_channel_mix(const std::string& mixer);
bool layer_bounded_by_ctx(const std::string& mixer);  // its parameters cover ctx positions only

// ---- helpers the layer files share

// The mixer's parallel forward / hand-written backward on `in` (validated like any call), in its
// causal or non-causal form.
// linmix viz: while a sink is set, every mixer_forward appends its call (in layer order).
struct CapturedCall {
  std::string mixer;
  std::map<std::string, std::string> params;  // the mixer's (the layer's knobs removed)
  bool causal;
  TensorMap in;
};
void set_mixer_capture(std::vector<CapturedCall>* sink);
// keep (a training forward: the layer's, until its backward): where a form that can keep what its
// backward reads puts it (Call::keep); mixer_backward's reuse: that (Call::reuse), or null.
Tensor mixer_forward(const LayerConfig& lc, const TensorMap& in, bool causal = true,
                     std::shared_ptr<RunSaved>* keep = nullptr);
// (`in`'s tensors and dy are viewed, not copied.)
TensorMap mixer_backward(const LayerConfig& lc, const TensorMap& in, std::vector<int64_t> y_shape, const float* dy,
                         bool causal = true, const RunSaved* reuse = nullptr);
// A tensor of `shape` holding a copy of src.
Tensor tensor_of(std::vector<int64_t> shape, const float* src);
// A tensor of `shape` viewing src, no copy: for a call's inputs from a layer's own buffers,
// which outlive the call (a copy of the tensor copies the values).
Tensor view_of(std::vector<int64_t> shape, const float* src);

// The mechanism's stepper for one layer: the one-token input buffers it reads (written by the
// layer before each step), its weights, the validated call. Not movable (the stepper points in).
class MixerStep {
 public:
  // `in`: every input of the mechanism, per-token ones shaped (1, 1, ...); `state`: its
  // "state.*" tensors or none (zero state). Validates both.
  MixerStep(const LayerConfig& lc, TensorMap in, const TensorMap& state);
  MixerStep(const MixerStep&) = delete;
  MixerStep& operator=(const MixerStep&) = delete;
  float* buf(const std::string& name) { return in_.at(name).ptr(); }
  void step(float* y) { st_.step(y); }
  TensorMap save() const { return st_.save(); }

 private:
  TensorMap in_;
  std::unique_ptr<Call> call_;
  Stepper st_;
};

// Splits a layer state into its own tensors (named in `own`, checked against their sizes) and
// the mixer's "state.*"; anything else is an error naming the tensor.
TensorMap split_layer_state(const TensorMap& state, const std::vector<std::pair<std::string, int64_t>>& own,
                            TensorMap& own_out, int64_t index);

// inline and exp_fast (about 2 ulp): the element-wise loops over them vectorise
inline float sigmoid1(float x) { return 1.0f / (1.0f + exp_fast(-x)); }
inline float silu1(float x) { return x / (1.0f + exp_fast(-x)); }
inline float dsilu1(float x) {  // d silu / dx
  const float s = 1.0f / (1.0f + exp_fast(-x));
  return s * (1.0f + x * (1.0f - s));
}

}  // namespace linmix
