// Training, evaluation, checkpoints, sampling and data for the linmix language model.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "linmix/comm.h"
#include "linmix/model.h"
#include "linmix/profile.h"
#include "linmix/tasks.h"

namespace linmix {

class Engine;

// ---- data
// A text split by bytes: the first 90% train, the last 10% validation (the cut moved forward to
// the next UTF-8 character boundary, so a tokenizer sees whole characters; training and
// `linmix eval --split` cut the same way).
std::pair<std::vector<uint8_t>, std::vector<uint8_t>> split_text(std::vector<uint8_t> bytes);

class Tokenizer;
// A corpus of token ids: split_text's halves, each encoded by a tokenizer (null: the bytes
// themselves). bytes_of[id]: the bytes token `id` stands for (empty: one byte each), so a
// loss per token converts to bits per byte.
struct Corpus {
  std::vector<int32_t> train, val;
  std::vector<int32_t> bytes_of;
  static Corpus from_file(const std::string& path, const Tokenizer* tk = nullptr);
  static Corpus from_bytes(std::vector<uint8_t> bytes, const Tokenizer* tk = nullptr);
};

// One batch: inputs and targets (B,T); targets < 0 are not scored.
struct Batch {
  int64_t B = 0, T = 0;
  std::vector<int32_t> inputs, targets;
};

// Synthetic tasks generated in-process (Zoology-style): "recall" (multi-query associative
// recall: key-value pairs, then queried keys whose values are scored) and "copy" (a random
// string, a separator, the string again, scored). recall's pairs: 0 = T/4 (at most the keys
// there are: (vocab - 2) / 2), K > 0 = K per sequence, K < 0 = uniform in [1, -K] per sequence;
// the queries fill the rest of the sequence.
Batch synthetic_batch(const std::string& task, int64_t B, int64_t T, int64_t vocab, uint64_t seed, int64_t pairs = 0);
// A language model's accuracy (argmax at the scored positions) and mean loss on `batches`
// synthetic batches of `task` (the same draws for the same seed).
std::pair<double, double> evaluate_task(Model& m, const std::string& task, int64_t batch, int64_t T, int64_t pairs,
                                        int64_t batches, uint64_t seed);
Batch corpus_batch(const std::vector<int32_t>& split, int64_t B, int64_t T, uint64_t seed);

// ---- optimizer / checkpoint
struct AdamW {
  double lr = 3e-3, beta1 = 0.9, beta2 = 0.95, eps = 1e-8, weight_decay = 0.1;
  TensorMap m, v;  // moments, by parameter name
  int64_t t = 0;   // steps taken
  void step(TensorMap& params, const TensorMap& grads, double lr_now);
};

struct Checkpoint {
  std::unique_ptr<Model> model;
  AdamW opt;
  int64_t step = 0;
  std::string meta_json;  // the run's options, as saved
  bool imported = false;  // an RWKV-4/5/6/7 checkpoint (BlinkDL or Hugging Face names) or a Mamba one
  std::string kind;       // what it was: "linmix checkpoint", "RWKV-7.0 checkpoint (imported)", ...
  // The tokenizer the model was trained or imported with, from the metadata "tokenizer":
  // "bytes", "task:<name>", a tokenizer file, or "" when the file does not say.
  std::string tokenizer;
};
// Writes params, optimizer moments, step, the config and the tokenizer (metadata) atomically.
void save_checkpoint(const std::string& path, const Model& model, const AdamW& opt, int64_t step,
                     const std::string& meta_json, const std::string& tokenizer = "bytes");
// Refuses (Error naming the problem) anything truncated, corrupt, or not matching its config.
// Also loads plain RWKV-4/5/6/7 checkpoints (BlinkDL or Hugging Face names, see rwkv_import.cpp).
Checkpoint load_checkpoint(const std::string& path);

// RWKV-4 import (src/model/rwkv_import.cpp): shape (V, C, L, F) inferred from the tensors; every
// missing or mis-shaped tensor is an Error naming it.
bool looks_like_rwkv(const TensorMap& tensors);
std::string rwkv_version(const TensorMap& tensors);  // "4", "5.1", "5.2", "6.0", "7.0" (docs/RWKV.md)
// Mamba and Mamba-2 checkpoints: Hugging Face MambaForCausalLM / Mamba2ForCausalLM or mamba_ssm's
// names (src/model/mamba_import.cpp). n_groups: Mamba-2's number of groups as text ("" = 1: the
// shapes hold only groups x state); version: "1" or "2".
bool looks_like_mamba(const TensorMap& tensors);
std::unique_ptr<Model> import_mamba(TensorMap tensors, const std::string& what, const std::string& n_groups = "",
                                    std::string* version = nullptr);
// gn_eps: the v5/6/7 group-norm eps as text ("" = 64e-5); version: the detected one ("4" .. "7.0").
std::unique_ptr<Model> import_rwkv(TensorMap tensors, const std::string& what, const std::string& gn_eps = "",
                                   std::string* version = nullptr);

// ---- training
struct TrainOptions {
  std::string data;      // text file; empty with a task
  std::string task;      // "", "recall" or "copy" (a language model), "listops", "fmnist" or "order" (a classifier)
  std::string mixer;     // a classification task's model: the default classifier around this mixer (--mixer)
  std::string config = R"({"mixer": "rwkv4", "channel_mix": "rwkv", "d_model": 128, "n_layer": 4, "n_head": 4, "ctx": 256})";
  std::string out = "linmix-run";  // directory: ckpt.safetensors, log.jsonl
  bool resume = false;
  std::string init;    // start from this checkpoint's weights and config (linmix or an RWKV checkpoint): fine-tuning
  // --data's tokenizer: "bytes" or a file (Tokenizer::load); empty: the --init checkpoint's (or
  // the resumed run's), else bytes. The checkpoint records it for generate / eval.
  std::string tokenizer;
  bool force = false;  // start a new run in an --out that holds one (its checkpoint and log are replaced)
  // The options the user gave explicitly (the CLI's names without dashes: "batch", "lr", ...): on
  // --resume the others are taken from the run, and a given one that differs is refused.
  std::set<std::string> given;
  int64_t steps = 600, batch = 16, seq = 128, accum = 1;
  int64_t pairs = 0;  // the recall task's key-value pairs (synthetic_batch)
  double lr = 3e-3, min_lr_ratio = 0.1, weight_decay = 0.1, clip = 1.0;
  int64_t warmup = 30, eval_every = 100, eval_batches = 8, ckpt_every = 100;
  double time_budget_s = 0;  // > 0: stop (and checkpoint) once training time passes this
  uint64_t seed = 1;
  bool quiet = false;
  bool profile = false;  // record where the steps' time goes (linmix/profile.h) into TrainResult::profile
  // Data-parallel training (null: one process). Each step's batch (the same --batch sequences one
  // process draws) is split by rows across the ranks (rank r: rows [B r / N, B (r+1) / N)); each
  // rank's gradient is weighted by its share of the scored positions and the gradients summed
  // (comm->allreduce_sum), so every rank applies the same AdamW step as one process would; the
  // evaluation windows are split across ranks and reduced. Rank 0 alone writes the log and the
  // checkpoints (in which all ranks' parameters are first made equal to rank 0's); --data and,
  // for --resume, --out must be readable at the same path on every rank.
  Comm* comm = nullptr;
};
struct TrainResult {
  int64_t steps_done = 0;
  double train_loss = 0, val_loss = 0, val_bpc = 0, val_acc = -1, tokens_per_s = 0, seconds = 0;
  int ranks = 1;
  double allreduce_s = 0;  // time spent in the gradient allreduce, all steps (0 with one process)
  std::vector<std::pair<int64_t, double>> losses;  // (step, train loss)
  std::vector<profile::Row> profile;               // with TrainOptions::profile: every region's time, all steps
};
TrainResult train(const TrainOptions& opt);

// A classifier on the first n examples of a split (batches of `batch`, batch i evaluated by the
// rank i % size): counts, summed loss and, per example evaluated here, its length and whether it
// was right (for accuracy against length).
struct ClassEval {
  int64_t n = 0, correct = 0;
  double loss_sum = 0;
  std::vector<int32_t> lengths, right, labels;
};
ClassEval evaluate_class(Model& m, const ClassTask& task, Split s, int64_t n, int64_t batch, int rank = 0, int size = 1);

double lr_at(const TrainOptions& o, int64_t step);  // warm-up, then cosine to min_lr_ratio
// --clip: scales every gradient by max_norm / norm when the global norm exceeds max_norm > 0.
void clip_grad_norm(TensorMap& grads, double norm, double max_norm);

// Mean loss (nats per token) of the model on windows of `seq` tokens of a split; in recurrent
// mode each window runs token by token from a fresh state (so the two modes agree).
// The windows: min(max_windows, (n - 1) / seq) of them, spread evenly (eval_windows).
double evaluate_split(Model& m, const std::vector<int32_t>& split, int64_t seq, int64_t max_windows, bool recurrent);
// The same windows through the RWKV-4 inference engine's sequence mode (any weight type).
double evaluate_split(Engine& e, const std::vector<int32_t>& split, int64_t seq, int64_t max_windows);
inline double evaluate_split(Model& m, const std::vector<uint8_t>& bytes, int64_t seq, int64_t max_windows,
                             bool recurrent) {
  return evaluate_split(m, std::vector<int32_t>(bytes.begin(), bytes.end()), seq, max_windows, recurrent);
}
inline double evaluate_split(Engine& e, const std::vector<uint8_t>& bytes, int64_t seq, int64_t max_windows) {
  return evaluate_split(e, std::vector<int32_t>(bytes.begin(), bytes.end()), seq, max_windows);
}
// How many windows of seq tokens, and where (window w starts at w * stride), evaluate_split
// scores in n tokens.
inline std::pair<int64_t, int64_t> eval_windows(int64_t n, int64_t seq, int64_t max_windows) {
  const int64_t windows = std::min(max_windows, (n - 1) / seq);
  return {windows, windows > 0 ? (n - 1) / windows : 0};
}

// ---- sampling
struct SampleOptions {
  double temperature = 1.0, top_p = 1.0;
  int64_t top_k = 0;  // 0 = all
  uint64_t seed = 1;
  void validate() const;  // finite temperature >= 0, top_p in (0, 1], top_k >= 0; Error otherwise
};
int32_t sample_token(const float* logits, int64_t V, const SampleOptions& o, std::mt19937_64& rng);

}  // namespace linmix
