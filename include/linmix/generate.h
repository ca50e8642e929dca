// The inference workflows of the linmix command, in the library: generation (prompt, then
// sampling, streaming), logits of a token sequence and bits per character of a file, each
// choosing between the language model's own forms (parallel, the recurrent steppers) and the
// RWKV-4 inference engine (sequence / decode, any weight type) for RWKV-4 models.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "linmix/model.h"
#include "linmix/train.h"

namespace linmix {

struct GenerateOptions {
  std::string prompt = "\n";
  int64_t tokens = 200;
  SampleOptions sample;
  std::string tokenizer = "bytes";  // bytes, an RWKV World vocabulary, or a tokenizer.json
  std::string dtype;  // weights of the inference engine; "": the model's own (resolve_wtype)
  std::string state_in, state_out;  // continue from / save the state (safetensors)
};
struct GenerateResult {
  int64_t prompt_tokens = 0, generated = 0;
  double ms_per_token = 0;  // the sampling loop: one model step, one sample, one decode per token
  double seconds = 0;       // the sampling loop in all
};
// Feeds the prompt (the engine's sequence mode for the models an engine runs, else the model's
// recurrent step), then samples `tokens` tokens, each decoded and passed to `emit` as it comes.
// Where an engine runs (here, and the sequence / decode modes below), it takes m's weights
// (make_engine's take_weights: one copy of the weights in memory): m runs no forward afterwards.
GenerateResult generate(Model& m, const GenerateOptions& o, const std::function<void(const std::string&)>& emit);

// logits [T, V] of one sequence: "parallel" | "recurrent" (the model) | "sequence" (the RWKV-4
// engine, `chunk` tokens per call, the state carried) | "decode" (the engine token by token).
Tensor sequence_logits(Model& m, const std::vector<int32_t>& tokens, const std::string& mode, int64_t chunk,
                       const std::string& dtype);

// Loss of a text file: up to `windows` windows of `seq` tokens spread over it (tokenized with
// `tokenizer`: "bytes" or the model's own), in "parallel", "recurrent" (the model) or
// "sequence" (the RWKV-4 engine, any dtype) mode: all agree.
struct EvalResult {
  double loss = 0;           // mean nats per scored token
  int64_t windows = 0, tokens = 0, bytes = 0;  // what was scored: windows, target tokens, their bytes
  double bits_per_byte = 0;  // loss * tokens / bytes / ln 2 (= bpc for byte-level models)
};
EvalResult evaluate_file(Model& m, const std::vector<uint8_t>& bytes, const std::string& tokenizer,
                         const std::string& mode, const std::string& dtype, int64_t seq, int64_t windows);

}  // namespace linmix
