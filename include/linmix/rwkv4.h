// RWKV-4 inference engine: the language model of MIXERS.md ("The RWKV-4 language model") for
// generation, with weights in FP32, BF16 or INT8 (per-row scales, FP32 accumulation).
//   sequence(): T tokens at once from any state (prefill): every projection is one GEMM over
//               the T rows, the WKV recurrence one scan per channel block;
//   step():     one token (decode): matrix-vector products that stream the weights once,
//               no allocation.
// Both read and update the same Model::State as Model::step, so states saved by either path
// continue in the other; sequence() in chunks of any size equals step() token by token.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "linmix/engine.h"

namespace linmix {

class Rwkv4Engine : public Engine {
 public:
  // The blocking of sequence(): internal passes of kPass tokens (bound its memory), scan tasks of
  // kScanBlock channels. Tests run sizes that cross both.
  static constexpr int64_t kPass = 1024, kScanBlock = 64;
  // True when the model is an RWKV-4 LM (every layer rwkv4, RWKV channel-mix, no learned
  // positions; ln0 or not); otherwise `why` says what differs.
  static bool supports(const ModelConfig& c, std::string* why = nullptr);
  // Copies (and converts) the weights of `m`; throws Error when !supports(m.config()).
  // take: the weights are taken from m (make_engine's take_weights), not copied.
  Rwkv4Engine(const Model& m, WType wtype, bool take = false);
  ~Rwkv4Engine() override;

  // Feeds T >= 1 tokens. logits: (T,V) when all_logits, else (V) for the last token; may be null.
  void sequence(const int32_t* tokens, int64_t T, Model::State& st, float* logits, bool all_logits = false) override;
  // Feeds one token; logits (V).
  void step(int32_t token, Model::State& st, float* logits) override;

  const ModelConfig& config() const override { return cfg_; }
  Model::State new_state() const override;
  // Bytes of weights step() reads per token (all matrices, one embedding row, the vectors).
  double step_bytes() const override;
  // Multiply-add FLOPs (2 per MAC) of sequence() per token: projections, and the head when
  // the logits of that token are computed.
  double flops_per_token(bool with_head) const override;

 private:
  struct Impl;
  ModelConfig cfg_;
  std::unique_ptr<Impl> p_;
};

}  // namespace linmix
