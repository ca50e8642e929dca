// The linmix language model: embedding, pre-LayerNorm blocks whose token mixer is any
// mechanism of the registry, a channel mixer (GELU MLP or RWKV channel-mix), final
// LayerNorm, output head. Forward and backward are written by hand (llm.c style); the token
// mixers run through their parallel forward / backward; generation runs their recurrent form.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "linmix/tensor.h"

namespace linmix {

class LayerRun;
class MixerLayer;

struct LayerConfig {
  std::string mixer;                          // a registry name (softmax, linear, rwkv4, aft_conv, ...)
  // the mixer's params (window, block, ...) and the layer's knobs (features, kernel, state,
  // qk_dim, expand: these override the model-wide defaults below and are not passed on)
  std::map<std::string, std::string> params;
};

struct ModelConfig {
  int64_t vocab = 256;   // byte-level
  int64_t d_model = 128;
  int64_t n_layer = 4;
  int64_t n_head = 4;    // multi-head mixers: D = E = d_model / n_head; aft_conv: its kernel heads
  int64_t ctx = 256;     // longest training context (aft_full / aft_local store w for it)
  // "mlp" (GELU), "rwkv" (the RWKV-4/5 channel mix: time_mix_k/r, receptance), "rwkv6" (its
  // time_maa_k/r form: u + (p - u) maa), "rwkv7" (ffn.x_k, no receptance) or "none" (Mamba's
  // blocks: the mixer only, no ln2)
  std::string channel_mix = "mlp";
  std::string norm = "layernorm";  // the blocks' and final norm: "layernorm" (weight, bias) or "rmsnorm" (weight)
  int64_t ffn_mult = 4;
  int64_t ffn_dim = 0;   // the channel mix's hidden width F; 0: ffn_mult * d_model
  int64_t ffn_width() const { return ffn_dim > 0 ? ffn_dim : ffn_mult * d_model; }
  bool rwkv_channel_mix() const { return channel_mix == "rwkv" || channel_mix == "rwkv6" || channel_mix == "rwkv7"; }
  bool has_channel_mix() const { return channel_mix != "none"; }
  bool rms() const { return norm == "rmsnorm"; }
  // model-wide defaults of the layers' knobs (a layer's params may override them):
  int64_t features = 32;  // performer random features M
  int64_t kernel = 7;     // aft_conv kernel size K
  bool ln0 = false;       // LayerNorm on the embedding (RWKV-4's blocks.0.ln0)
  double dropout = 0.0;   // training only: each residual branch's output (mixer, channel mix)
                          // zeroed with this probability, the rest scaled by 1 / (1 - p)
  int64_t state = 16;     // s4d / mamba / mamba2 state size N
  int64_t qk_dim = 32;    // flash (GAU) shared query/key width S
  int64_t expand = 2;     // flash (GAU), mamba and mamba2 inner width = expand * d_model
  int pos_emb = -1;       // learned absolute positions: 1 on, 0 off, -1 = on iff a layer is
                          // attention-like (softmax, linear, performer, flow, TransNormer, flash)
                          // or the model is non-causal
  // The encoder classifier (docs/lra.md): classes > 0 replaces the language-model head by a
  // classification head (head.weight [classes, C], head.bias) on the pooled final-norm rows;
  // causal = false runs every token mixer in its non-causal form (a language model must be
  // causal; a classifier may be either: a causal one reads left to right, like an RNN).
  bool causal = true;
  int64_t classes = 0;
  std::string pool = "mean";  // classifier: "mean" (over each sequence's own tokens) or "cls" (a
                              // learned vector cls.weight prepended at position 0, its final row)
  bool classifier() const { return classes > 0; }
  int64_t cls_rows() const { return classifier() && pool == "cls" ? 1 : 0; }
  bool uses_pos_emb() const;
  // The longest sequence the model's parameters cover (learned positions, AFT's bias w): ctx,
  // or 0 when unbounded (a recurrent model).
  int64_t context_limit() const;
  // A layer's knob: its params' value if set (an integer), else the model-wide default.
  int64_t knob(const LayerConfig& l, const std::string& name) const;
  std::vector<LayerConfig> layers;  // one per layer

  // JSON: {"d_model":..,"n_layer":..,"mixer":"rwkv4" | "layers":[{"mixer":..,"params":{..}}],..}
  static ModelConfig from_json(const std::string& text);
  // The default model around one mechanism (`linmix train --mixer NAME`): 4 layers of d_model
  // 128, 4 heads, ctx 256, the channel mix the mechanism's layer prefers.
  static ModelConfig for_mixer(const std::string& mixer);
  // The default encoder classifier around one mechanism (`linmix train --task listops --mixer
  // NAME`): for_mixer's shape, non-causal (causal when the mixer has no non-causal layer: RWKV,
  // the SSMs and the decaying family then read left to right), mean pooling, ctx = seq.
  static ModelConfig for_classifier(const std::string& mixer, int64_t vocab, int64_t classes, int64_t seq);
  std::string to_json() const;
  void validate() const;  // throws Error naming the bad field (and a model past kMaxParams)
  int64_t param_count() const;  // floats the model's parameters take (computed, nothing allocated)
  static constexpr int64_t kMaxParams = int64_t(1) << 32;
};

// Names of the parameters that are fixed buffers, not trained (performer's features).
bool is_buffer_param(const std::string& name);

struct PackedWeights;  // kernels/gemv.h: the engine's matrices, pre-converted (linmix convert)

class Model {
 public:
  explicit Model(ModelConfig cfg) : Model(std::move(cfg), true) {}
  // allocate = false: every parameter has its shape but no values (a loader moves each one in:
  // the file's tensors are not copied beside a zeroed model).
  Model(ModelConfig cfg, bool allocate);
  ~Model();
  Model(const Model&) = delete;
  Model& operator=(const Model&) = delete;

  const ModelConfig& config() const { return cfg_; }
  TensorMap& params() { return params_; }
  const TensorMap& params() const { return params_; }
  void init(uint64_t seed);  // GPT-2 / RWKV style initialisation, deterministic
  // Frees every parameter (an engine took them: make_engine(m, wtype, true)); the config and the
  // state functions stay, forward and step refuse to run.
  void release_weights();
  int64_t num_params() const;
  // A model read from a `linmix convert` file: the engine's matrices are held here in their
  // type (BF16 / INT8 / Q4), the params of those names have a shape and no values; only an
  // inference engine runs it (forward and step refuse, saying so).
  void set_packed(std::shared_ptr<PackedWeights> p) { packed_ = std::move(p); }
  PackedWeights* packed() const { return packed_.get(); }

  // inputs, targets: (B,T) tokens (targets < 0 are not counted). Returns the mean loss over
  // counted positions; with grads, adds d(mean loss)/d(param) * grad_scale into them.
  double forward_backward(const int32_t* inputs, const int32_t* targets, int64_t B, int64_t T, TensorMap* grads,
                          float grad_scale = 1.0f, int64_t* counted = nullptr);
  // logits (B,T,V) of the parallel form.
  std::vector<float> logits(const int32_t* inputs, int64_t B, int64_t T);

  // The classifier (config classes > 0). inputs: (B,T) tokens, padded past lengths[b] (1 <=
  // lengths[b] <= T; the padding is seen by the mixers, not pooled); labels (B) in [0, classes) or
  // null. Writes class logits (B, classes) when logits_out is given; returns the mean
  // cross-entropy over the batch (0 without labels); with grads, adds d(mean loss)/d(param) *
  // grad_scale into them.
  double classify(const int32_t* inputs, const int32_t* lengths, const int32_t* labels, int64_t B, int64_t T,
                  TensorMap* grads, float grad_scale = 1.0f, float* logits_out = nullptr);

  // Dropout (config dropout > 0) in the forward_backward / classify calls between arm_dropout
  // and disarm_dropout, and in no other: the masks are a hash of (key, layer, branch, element),
  // the element counted from batch row row0 (a rank's rows drop as the whole batch's would).
  void arm_dropout(uint64_t key, int64_t row0 = 0) { drop_on_ = true, drop_key_ = key, drop_row0_ = row0; }
  void disarm_dropout() { drop_on_ = false; }

  // Recurrent form, one sequence: the whole state of every layer. Each layer's own state lives in
  // `layer` as tensors (the RWKV-4 time-mix token shift "att_prev", Mamba's "conv" window, the
  // mechanism's "state.*"; empty = zero) until Model::step starts the layer's runtime (its
  // allocation-free stepper), which then owns it; flush() writes the runtimes' state back.
  struct State {
    State();
    State(int64_t n_layer, int64_t d_model);
    ~State();
    State(State&&) noexcept;
    State& operator=(State&&) noexcept;
    std::vector<TensorMap> layer;                  // per layer: its own state tensors
    std::vector<std::vector<float>> ffn_prev;      // per layer: the RWKV channel mix's token shift (C)
    int64_t pos = 0;
    std::vector<std::unique_ptr<LayerRun>> run;    // per layer: the runtime, while Model::step runs it
    void flush();                                  // runtimes' state -> layer tensors; runtimes dropped
  };
  State new_state() const;
  // A state as tensors ("pos", "layer.L.att_prev", "layer.L.state.*", ...) and back; loading
  // checks every tensor against this model and throws Error naming the first mismatch.
  TensorMap state_tensors(const State& st) const;
  State state_from_tensors(const TensorMap& t) const;
  // Feeds one token; writes logits (V).
  void step(int32_t token, State& st, float* logits);

 private:
  void norm_forward(const std::string& name, float* out, float* mean, float* rstd, const float* x, int64_t N) const;
  void norm_backward(const std::string& name, float* dx, const float* dout, const float* x, const float* mean,
                     const float* rstd, TensorMap* grads, int64_t N) const;
  // The trunk shared by both heads: embedding (+ cls row, positions, ln0), the blocks and the
  // final norm, on B sequences of Tp = T + cls_rows() rows; the final-norm rows land in acts_->lnf.
  // keep: a training forward (the backward follows): the layers keep what their backward reads
  void trunk_forward(const int32_t* inputs, int64_t B, int64_t T, bool keep = false);
  // d(final-norm rows) -> every trunk parameter's gradient (into grads).
  void trunk_backward(const int32_t* inputs, std::vector<float>& dlnf, int64_t B, int64_t T, TensorMap* grads);
  struct Acts;
  ModelConfig cfg_;
  TensorMap params_;
  bool released_ = false;  // release_weights() ran
  std::shared_ptr<PackedWeights> packed_;
  void check_weights() const;  // the FP32 paths: refuses a released or packed model
  std::unique_ptr<Acts> acts_;
  bool drop_on_ = false;  // arm_dropout
  uint64_t drop_key_ = 0;
  int64_t drop_row0_ = 0;
  bool dropping() const { return drop_on_ && cfg_.dropout > 0; }  // armed, and the config drops
  // the residual branch `out` (N C values of B sequences of Tp rows) of layer l, branch 0 (mixer)
  // or 1 (channel mix), masked and scaled: in the forward on its output, in the backward on its
  // output's gradient
  void dropout_branch(float* out, int64_t N, int64_t Tp, int64_t l, int branch) const;
  std::vector<std::unique_ptr<MixerLayer>> layers_;
};

}  // namespace linmix
