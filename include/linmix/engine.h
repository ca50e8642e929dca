// The inference engine of the RWKV language models (every version: RWKV-4 in rwkv4.h, RWKV-5/6/7
// in rwkv.h), with weights in FP32, BF16, INT8 (per-row scales) or Q4 (4 bits, groups of 64 with
// an fp16 step and offset), FP32 accumulation (decode's INT8 and Q4 products as integers first:
// kernels/gemv.h):
//   sequence(): T tokens at once from any state (prefill): every projection is one GEMM over the
//               rows, the WKV through the chunked kernels (RWKV-4: one scan per channel block);
//   step():     one token (decode): matrix-vector products that stream the weights once, no
//               allocation.
// Both read and update the same Model::State as Model::step, so states saved by either path
// continue in the other; sequence() in chunks of any size equals step() token by token.
#pragma once
#include <cstdint>
#include <memory>
#include <string>

#include "linmix/model.h"
#include "linmix/quant.h"

namespace linmix {

class Engine {
 public:
  virtual ~Engine() = default;
  // Feeds T >= 1 tokens. logits: (T,V) when all_logits, else (V) for the last token; may be null.
  virtual void sequence(const int32_t* tokens, int64_t T, Model::State& st, float* logits, bool all_logits = false) = 0;
  // Feeds one token; logits (V).
  virtual void step(int32_t token, Model::State& st, float* logits) = 0;
  virtual const ModelConfig& config() const = 0;
  virtual Model::State new_state() const = 0;  // the zero state (as Model::new_state)
  // Bytes step() reads per token: every matrix, one embedding row, the vectors, the WKV state.
  virtual double step_bytes() const = 0;
  // Multiply-add FLOPs (2 per MAC) of sequence() per token: the projections, and the head when
  // the logits of that token are computed.
  virtual double flops_per_token(bool with_head) const = 0;
};

// True when an engine runs this model (an RWKV-4, or an RWKV-5/6/7 model as BlinkDL's: every
// layer the same version, its channel mix, ln0, no learned positions); otherwise `why` says
// what differs.
bool engine_supports(const ModelConfig& c, std::string* why = nullptr);
// The engine of `m` (copies and converts the weights); throws Error when !engine_supports.
std::unique_ptr<Engine> make_engine(const Model& m, WType wtype);
// take_weights: the engine takes m's weights instead of copying them (each FP32 tensor moved, or
// freed once converted to BF16 / INT8), so the peak memory is one copy of the weights, not two;
// m keeps its config and state functions (new_state, state_tensors, ...) but its forward and
// step refuse to run (Model::release_weights).
std::unique_ptr<Engine> make_engine(Model& m, WType wtype, bool take_weights);

// The weight type to run m with: `dtype` ("f32" | "bf16" | "int8" | "q4"), or "" for the model's
// own (the type of a `linmix convert` file, else f32). A converted model runs only in its type.
WType resolve_wtype(const Model& m, const std::string& dtype);
// `linmix convert`: the checkpoint `in` (linmix, or an RWKV / Mamba checkpoint the engine runs)
// written to `out` with every matrix of the engine already in type t, as the engine converts it,
// so that loading `out` reads the weights as they are (src/model/packed.cpp has the layout);
// t = f32 writes the FP32 model under linmix's names. `out` is replaced only with force.
void convert_checkpoint(const std::string& in, const std::string& out, WType t, bool force);

}  // namespace linmix
