// The `linmix` command: parses arguments, calls the library, prints. Every user error is one
// line "linmix: <message>" on stderr and exit code 2.
#include <CLI/CLI.hpp>
#include <malloc.h>
#include <unistd.h>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>
#include <random>

#include "kernels/blas.h"
#include "arch.h"
#include "commands.h"
#include "linmix/bench.h"
#include "linmix/generate.h"
#include "linmix/kernels.h"
#include "linmix/mixer.h"
#include "linmix/model.h"
#include "linmix/quant.h"
#include "linmix/rwkv4.h"
#include "linmix/safetensors.h"
#include "linmix/tokenizer.h"
#include "linmix/train.h"

using namespace linmix;

using namespace linmix::cli;

int main(int argc, char** argv) {
  {  // LINMIX_ARCH (tools/arch.h): the launcher has chosen this build by it; checked here too when run directly
    const char* why = "";
    if (!requested_arch(&why)) {
      std::fprintf(stderr, "linmix: %s\n", why);
      return 2;
    }
#ifdef __AVX512F__
    if (!cpu_has_x86_64_v4()) {
      std::fprintf(stderr, "linmix: this linmix is built for %s and the CPU has no AVX-512: run the portable build\n",
                   LINMIX_ARCH_BUILT);
      return 2;
    }
#endif
  }
  // OpenBLAS chose its kernels as it loaded: on a CPU its tables do not know it took the SSE3 ones;
  // it chooses again, the AVX-512 ones named (kernels/blas.h select_avx512_core), or where it
  // cannot, the process runs itself again with them named: only once OPENBLAS_CORETYPE is set,
  // which the process run again finds and so never runs itself a third time
  if (!linmix::blas::select_avx512_core() && std::getenv("OPENBLAS_CORETYPE"))
    ::execv("/proc/self/exe", argv);  // returns only when it fails
  CLI::App app{"linmix: linear-time token mixers (see docs/MIXERS.md for the contract)"};
  app.require_subcommand(1);

  auto* mix = app.add_subcommand("mix", "run one mechanism on tensors from a safetensors file");
  std::string mixer, mode = "parallel", in_path, out_path;
  bool causal = false;
  std::vector<std::string> params;
  mix->add_option("--mixer", mixer, "mechanism name (see `linmix mixers`)")->required();
  mix->add_flag("--causal", causal, "position t uses positions s <= t only");
  mix->add_option("--mode", mode, "reference | parallel | recurrent")->capture_default_str();
  mix->add_option("--param", params, "KEY=VALUE mechanism parameter (repeatable)");
  bool grad = false;
  mix->add_flag("--grad", grad, "also write d<name> = d sum(y * dy) / d<name> for every input (IN holds dy)");
  bool stats = false;
  mix->add_flag("--stats", stats, "print wall time and peak resident memory to stderr");
  bool no_state = false;
  mix->add_flag("--no-state", no_state,
                "y alone: the final state neither computed nor written (fla's output_final_state=False)");
  mix->add_option("--in", in_path, "input safetensors")->required();
  mix->add_option("--out", out_path, "output safetensors (written atomically)")->required();

  auto* list = app.add_subcommand("mixers", "list every mechanism: inputs, params, forms, state, complexity");
  bool list_json = false;
  list->add_flag("--json", list_json, "the registry as JSON (what the Python tools iterate)");

  auto* ex = app.add_subcommand("example", "write a mechanism's example inputs (the tests' draws) to safetensors");
  int64_t ex_T = 7;
  uint64_t ex_seed = 1;
  std::string ex_scale = "test";
  int ex_stress = 0;
  ex->add_option("--mixer", mixer, "mechanism name")->required();
  ex->add_flag("--causal", causal, "sizes for the causal form (e.g. aft_conv's K)");
  ex->add_option("--T", ex_T, "sequence length")->capture_default_str()->check(CLI::Range(int64_t(1), int64_t(1) << 20));
  ex->add_option("--seed", ex_seed, "random seed")->capture_default_str();
  ex->add_option("--scale", ex_scale, "test | grad | demo | bench: the harness sizes")->capture_default_str();
  std::vector<std::string> ex_dims;
  ex->add_option("--dim", ex_dims, "LETTER=SIZE: override one dim (repeatable)");
  ex->add_option("--stress", ex_stress, "stability inputs (0 = none, 1 = forms, 2 = gradients)");
  bool ex_dy = false;
  ex->add_flag("--dy", ex_dy, "also write dy, N(0,1) shaped like y (the input of --grad)");
  ex->add_option("--out", out_path, "output safetensors")->required();

  auto* demo = app.add_subcommand("demo", "run every mechanism in every form on generated inputs");
  int64_t demo_T = 256;
  uint64_t seed = 1;
  std::string dir = "linmix-demo";
  demo->add_option("--T", demo_T, "sequence length")->capture_default_str()->check(CLI::Range(int64_t(1), int64_t(1) << 20));
  demo->add_option("--seed", seed, "random seed")->capture_default_str();
  demo->add_option("--dir", dir, "where the input and output files go")->capture_default_str();

  auto* feats = app.add_subcommand("features", "orthogonal Gaussian random features for performer (tensor 'proj')");
  int64_t fM = 0, fD = 0;
  uint64_t fseed = 0;
  std::string fout;
  feats->add_option("--M", fM, "number of features")->required()->check(CLI::Range(int64_t(1), int64_t(1) << 20));
  feats->add_option("--D", fD, "query/key width")->required()->check(CLI::Range(int64_t(1), int64_t(1) << 14));
  feats->add_option("--seed", fseed, "random seed")->capture_default_str();
  feats->add_option("--out", fout, "output safetensors (tensor 'proj' [M,D])")->required();

  auto* hip = app.add_subcommand("hippo", "the S4D-LegS initialisation: HiPPO-LegS's diagonal (eigenvalues, B in its eigenbasis) as JSON");
  int64_t hip_N = 32;
  hip->add_option("--state", hip_N, "complex state size N (the LegS matrix is 2N x 2N)")->capture_default_str()->check(CLI::Range(int64_t(1), int64_t(1024)));

  auto* viz = app.add_subcommand("viz", "how far each layer looks back: every layer's effective attention (heat maps, JSON)");
  std::string viz_model, viz_data, viz_prompt, viz_out = "linmix-viz";
  int64_t viz_offset = -1, viz_T = 128;
  bool viz_force = false;
  viz->add_option("--model", viz_model, "checkpoint (a causal language model)")->required();
  viz->add_option("--data", viz_data, "text file: --tokens tokens from --offset (default: its last 10%, the validation split)");
  viz->add_option("--offset", viz_offset, "byte offset in --data")->check(CLI::NonNegativeNumber);
  viz->add_option("--prompt", viz_prompt, "the text itself (instead of --data)");
  viz->add_option("--tokens", viz_T, "sequence length T")->capture_default_str()->check(CLI::Range(int64_t(2), int64_t(512)));
  viz->add_option("--out", viz_out, "output directory")->capture_default_str();
  viz->add_flag("--force", viz_force, "replace the output of an earlier viz in --out");

  auto* tr = app.add_subcommand("train", "train a language model on a text file (bytes or --tokenizer) or a task");
  TrainOptions topt;
  std::string config_path;
  tr->add_option("--data", topt.data, "text file (first 90% train, last 10% validation)");
  tr->add_option("--task", topt.task, "synthetic task instead of a file: recall | copy");
  tr->add_option("--config", config_path, "model config JSON file (default: a 4-layer RWKV-4, d_model 128)");
  tr->add_option("--mixer", mixer, "shorthand: every layer uses this token mixer (MLP channel mix unless rwkv4)");
  tr->add_option("--out", topt.out, "run directory: ckpt.safetensors, log.jsonl")->capture_default_str();
  tr->add_option("--init", topt.init, "start from this checkpoint's weights and config (linmix, or RWKV-4/5/6/7 safetensors): fine-tune it");
  tr->add_option("--tokenizer", topt.tokenizer,
                 "the text's tokenizer: bytes, an RWKV World vocabulary or a Hugging Face tokenizer.json (byte-level BPE); "
                 "default: the --init checkpoint's, else bytes (a new model's vocab becomes the tokenizer's)");
  tr->add_flag("--resume", topt.resume, "continue from OUT/ckpt.safetensors (with the run's arguments)");
  tr->add_flag("--force", topt.force, "start a new run in an OUT that holds one (replacing its checkpoint and log)");
  tr->add_option("--pairs", topt.pairs, "recall: key-value pairs per sequence (0: seq/4; -K: 1..K at random)")
      ->capture_default_str()->check(CLI::Range(int64_t(-1) << 20, int64_t(1) << 20));
  tr->add_option("--steps", topt.steps, "optimizer steps")->capture_default_str()->check(CLI::PositiveNumber);
  tr->add_option("--batch", topt.batch, "sequences per micro-batch")->capture_default_str()->check(CLI::PositiveNumber);
  tr->add_option("--seq", topt.seq, "tokens per sequence")->capture_default_str()->check(CLI::Range(2, 1 << 20));
  tr->add_option("--accum", topt.accum, "micro-batches per step (gradient accumulation)")->capture_default_str()->check(CLI::PositiveNumber);
  tr->add_option("--lr", topt.lr, "peak learning rate")->capture_default_str()->check(CLI::PositiveNumber);
  tr->add_option("--warmup", topt.warmup, "warm-up steps")->capture_default_str()->check(CLI::NonNegativeNumber);
  tr->add_option("--weight-decay", topt.weight_decay, "AdamW decoupled weight decay")->capture_default_str();
  tr->add_option("--clip", topt.clip, "gradient clipping (global norm; 0 = off)")->capture_default_str();
  tr->add_option("--eval-every", topt.eval_every, "evaluate every N steps")->capture_default_str();
  tr->add_option("--ckpt-every", topt.ckpt_every, "checkpoint every N steps")->capture_default_str();
  tr->add_option("--time-budget", topt.time_budget_s, "stop after this many seconds of training (0 = off)");
  tr->add_option("--seed", topt.seed, "seed (initialisation and batches)")->capture_default_str();
  tr->add_flag("--profile", topt.profile, "print where a step's time goes: each layer kind and pass, its GEMMs and mechanism");

  auto* gen = app.add_subcommand("generate", "sample text from a checkpoint with the recurrent form, streaming");
  std::string model_path;
  GenerateOptions gopt;
  SampleOptions& sopt = gopt.sample;
  gen->add_option("--model", model_path, "checkpoint (OUT/ckpt.safetensors of linmix train)")->required();
  gen->add_option("--prompt", gopt.prompt, "prompt text")->capture_default_str();
  gen->add_option("--tokens", gopt.tokens, "tokens to generate")->capture_default_str()->check(CLI::Range(int64_t(0), int64_t(1) << 24));
  gen->add_option("--temperature", sopt.temperature, "0 = greedy")->capture_default_str()->check(CLI::NonNegativeNumber);
  gen->add_option("--top-k", sopt.top_k, "keep the k most likely (0 = all)")->capture_default_str()->check(CLI::NonNegativeNumber);
  gen->add_option("--top-p", sopt.top_p, "nucleus mass")->capture_default_str()->check(CLI::Range(0.0, 1.0));
  gen->add_option("--seed", sopt.seed, "sampling seed")->capture_default_str();
  gen->add_flag("--stats", stats, "print ms per generated token and peak memory to stderr");
  std::string tokenizer_path, state_in, state_out;  // tokenizer: "" = the checkpoint's (or bytes)
  gen->add_option("--tokenizer", tokenizer_path, "bytes, an RWKV World vocabulary, or a Hugging Face tokenizer.json (byte-level BPE); default: the one the checkpoint names, else bytes");
  gen->add_option("--state-in", state_in, "continue from a saved state (safetensors)");
  gen->add_option("--state-out", state_out, "save the final state (safetensors, written atomically)");
  std::string dtype;  // "": the checkpoint's own (the type linmix convert stored, else f32)
  const std::string dtype_help = "weights of the inference engine: f32 | bf16 | int8 | q4 (RWKV and Mamba models); "
                                 "default: the checkpoint's (the type linmix convert stored it in, else f32)";
  gen->add_option("--dtype", dtype, dtype_help);

  auto* tok = app.add_subcommand("tokenize", "encode text to token ids (or --decode ids to text)");
  std::string tok_text, tok_file, tok_decode;
  tok->add_option("--tokenizer", tokenizer_path, "bytes, an RWKV World vocabulary, or a Hugging Face tokenizer.json (byte-level BPE)")->required();
  tok->add_option("--text", tok_text, "text to encode");
  tok->add_option("--file", tok_file, "file to encode");
  tok->add_option("--decode", tok_decode, "comma-separated ids to decode (@FILE reads them from a file)");

  auto* ev = app.add_subcommand("eval", "bits per character of a checkpoint on a text file; a classifier's accuracy on its task's test split");
  std::string eval_file, eval_mode = "parallel";
  int64_t eval_seq = 128, eval_windows = 64;
  ev->add_option("--model", model_path, "checkpoint")->required();
  ev->add_option("--data", eval_file, "text file (a language model)");
  std::string eval_split;
  ev->add_option("--split", eval_split, "a language model: val (the last 10%, training's validation; default) | train "
                                        "(the first 90%) | all; a classifier: test (default) | val | train");
  int64_t eval_examples = 0;
  bool eval_json = false;
  ev->add_option("--examples", eval_examples, "a classifier: the first N examples of the split (default: all)")
      ->check(CLI::PositiveNumber);
  int64_t eval_batch = 16;
  ev->add_option("--batch", eval_batch, "a classifier: sequences per forward")->capture_default_str()->check(CLI::Range(1, 1 << 16));
  ev->add_flag("--json", eval_json, "a classifier: print the result as one JSON object (with each example's length and outcome)");
  ev->add_option("--tokenizer", tokenizer_path, "bytes, or the model's tokenizer (tokenizer.json or an RWKV World vocabulary); default: the one the checkpoint names, else bytes");
  ev->add_option("--mode", eval_mode, "parallel | recurrent | sequence (the RWKV-4 engine; all agree)")
      ->capture_default_str();
  ev->add_option("--dtype", dtype, "sequence mode: " + dtype_help);
  int64_t eval_pairs = 0;
  ev->add_option("--pairs", eval_pairs, "a recall model: key-value pairs per sequence (0: seq/4)")
      ->check(CLI::Range(int64_t(0), int64_t(1) << 20));
  ev->add_option("--seq", eval_seq, "window length")->capture_default_str()->check(CLI::Range(2, 1 << 20));
  ev->add_option("--windows", eval_windows, "windows, spread over the file")->capture_default_str()->check(CLI::PositiveNumber);

  auto* lg = app.add_subcommand("logits", "logits [T,V] of a token sequence, for cross-checks");
  std::string tokens_csv, logits_mode = "parallel";
  lg->add_option("--model", model_path, "checkpoint (linmix, or RWKV-4/5/6/7 safetensors with BlinkDL or HF names)")->required();
  lg->add_option("--tokens", tokens_csv, "comma-separated token ids")->required();
  int64_t logits_chunk = 64;
  lg->add_option("--mode", logits_mode,
                 "parallel | recurrent (the training model) | sequence | decode (the RWKV-4 engine)")
      ->capture_default_str();
  lg->add_option("--chunk", logits_chunk, "sequence mode: tokens per call, the state carried between calls")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  lg->add_option("--dtype", dtype, "sequence and decode modes: " + dtype_help);
  lg->add_option("--out", out_path, "output safetensors (tensor 'logits' [T,V])")->required();

  auto* gr = app.add_subcommand("grad", "mean loss and every parameter's gradient on given tokens (for cross-checks)");
  std::string targets_csv;
  int64_t grad_batch = 1;
  gr->add_option("--model", model_path, "checkpoint")->required();
  gr->add_option("--tokens", tokens_csv, "B*T comma-separated input ids, batch-major")->required();
  gr->add_option("--targets", targets_csv, "B*T target ids (-1 = not scored); a language model");
  std::string labels_csv, lengths_csv;
  gr->add_option("--labels", labels_csv, "B class labels; a classifier");
  gr->add_option("--lengths", lengths_csv, "B sequence lengths (default: T each; the rest is padding); a classifier");
  gr->add_option("--batch", grad_batch, "B")->capture_default_str()->check(CLI::PositiveNumber);
  gr->add_option("--out", out_path, "output safetensors: d<param> for every trained parameter")->required();

  auto* cv = app.add_subcommand("convert", "write a checkpoint with the inference engine's weights already in a type "
                                           "(loading then reads them as they are)");
  std::string cv_in, cv_out, cv_dtype;
  bool cv_force = false;
  cv->add_option("model", cv_in, "checkpoint (linmix, or an RWKV / Mamba checkpoint the engine runs)")->required();
  cv->add_option("--dtype", cv_dtype, "bf16 | int8 | q4 (the engine's matrices), or f32 (the FP32 model under linmix's names)")->required();
  cv->add_option("--out", cv_out, "output safetensors (written atomically)")->required();
  cv->add_flag("--force", cv_force, "replace --out if it exists");
  auto* info = app.add_subcommand("info", "a checkpoint's config, parameter count, tokenizer and step");
  info->add_option("model", model_path, "checkpoint (linmix, or an RWKV-4 safetensors file)")->required();

  auto* hlp = app.add_subcommand("help", "list the commands (linmix COMMAND --help for one)");

  auto* bn = app.add_subcommand("bench", "benchmarks against the machine's limits measured in the same run");
  bool bench_model_flag = false;
  ModelBenchOptions mbo;
  bn->add_flag("--model", bench_model_flag, "the RWKV inference engine (random weights; RWKV-4 169M unless --version / --size)");
  bn->add_option("--version", mbo.version, "the model of --model: RWKV 4, 5 (5.2), 6, 7, mamba or mamba2")->capture_default_str();
  bn->add_option("--size", mbo.size, "a released model's shape for --model: 0.1B, 0.4B or 1.5B");
  bn->add_option("--threads", mbo.threads, "threads (OpenMP and OpenBLAS)")->capture_default_str()->check(CLI::Range(1, 1024));
  bn->add_option("--decode-tokens", mbo.decode_tokens, "tokens timed in decode")->capture_default_str()->check(CLI::Range(1, 1 << 20));
  bn->add_option("--rounds", mbo.rounds, "decode rounds, each beside its own bandwidth measurement")->capture_default_str()->check(CLI::Range(1, 1000));
  bn->add_option("--prefill-tokens", mbo.prefill_tokens, "tokens of the prefill")->capture_default_str()->check(CLI::Range(1, 1 << 20));
  bn->add_option("--layers", mbo.n_layer, "model layers (12 = 169M)")->capture_default_str()->check(CLI::Range(1, 1000));
  bn->add_option("--d-model", mbo.d_model, "model width (768 = 169M)")->capture_default_str()->check(CLI::Range(1, 1 << 16));
  bn->add_option("--vocab", mbo.vocab, "vocabulary (50277 = 169M)")->capture_default_str()->check(CLI::Range(1, 1 << 24));
  bn->add_option("--dtypes", mbo.dtypes, "weight types to run")->capture_default_str()->delimiter(',');
  bool no_load = false;
  bn->add_flag("--no-load", no_load, "skip timing the load of a checkpoint file into each type's engine");
  bn->add_flag("--profile", mbo.profile, "with --model: print where a decode token's and a prefill's time go (layers, products, WKV, head)");
  bn->add_option("--checkpoint", mbo.checkpoint, "also: perplexity of this trained RWKV model in each weight type");
  bn->add_option("--data", mbo.data, "text file for --checkpoint");
  bn->add_option("--eval-seq", mbo.eval_seq, "window length for --checkpoint")->capture_default_str()->check(CLI::Range(2, 1 << 20));
  bn->add_option("--eval-windows", mbo.eval_windows, "windows for --checkpoint")->capture_default_str()->check(CLI::PositiveNumber);
  bn->add_option("--out", mbo.out, "write the report as JSON (atomically)");
  MixerBenchOptions xbo;
  bn->add_option("--mixers", xbo.mixers, "mechanisms (default: all)")->delimiter(',');
  bn->add_option("--T", xbo.T, "sequence lengths (default 256,512,...,65536)")->delimiter(',')->check(CLI::Range(int64_t(1), int64_t(1) << 24));
  bn->add_option("--thread-counts", xbo.threads, "thread counts to run (default 1,2)")->delimiter(',')->check(CLI::Range(1, 1024));
  bn->add_option("--max-seconds", xbo.max_seconds, "skip a size predicted to take longer than this")->capture_default_str()->check(CLI::PositiveNumber);
  bn->add_option("--step-tokens", xbo.step_tokens, "tokens timed in the recurrent step")->capture_default_str()->check(CLI::Range(1, 1 << 20));
  bool no_backward = false, no_step = false;
  bn->add_flag("--no-backward", no_backward, "skip forward + backward");
  bn->add_flag("--no-step", no_step, "skip the recurrent step");

  // --threads on every command that computes (bench has its own --threads / --thread-counts)
  int threads = 0;
  for (auto* sc : {mix, demo, ex, tr, gen, ev, lg, gr, viz})
    sc->add_option("--threads", threads, "threads (OpenMP and OpenBLAS; default: all cores)")->check(CLI::Range(1, 1024));
  app.set_version_flag("--version", std::string("linmix ") + LINMIX_VERSION + " (" + LINMIX_ARCH_BUILT + ")");
  // an unknown command names the commands
  if (argc >= 2 && argv[1][0] != '-') {
    std::string known;
    bool found = false;
    for (const auto* sc : app.get_subcommands({})) {
      known += (known.empty() ? "" : ", ") + sc->get_name();
      found = found || sc->get_name() == argv[1];
    }
    if (!found) {
      std::fprintf(stderr, "linmix: unknown command '%s' (commands: %s; linmix help)\n", argv[1], known.c_str());
      return 2;
    }
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::string msg = e.what();
    for (char& ch : msg)
      if (ch == '\n') ch = ' ';
    std::fprintf(stderr, "linmix: %s (see linmix --help)\n", msg.c_str());
    return 2;
  }
  if (*hlp) {
    std::printf("linmix %s: linear-time token mixers. Commands (linmix COMMAND --help for one):\n", LINMIX_VERSION);
    for (const auto* sc : app.get_subcommands({}))
      std::printf("  %-10s %s\n", sc->get_name().c_str(), sc->get_description().c_str());
    return 0;
  }
  if (threads > 0) set_threads(threads);
  try {
    if (*info) return cmd_info(model_path);
    if (*cv) return cmd_convert(cv_in, cv_out, cv_dtype, cv_force);
    if (*mix) refuse_same(out_path, {in_path}, "--out");
    if (*gen) refuse_same(state_out, {model_path, state_in, tokenizer_path}, "--state-out");
    if (*lg || *gr) refuse_same(out_path, {model_path}, "--out");
    if (*ex) refuse_same(out_path, {}, "--out");
    if (*mix) return cmd_mix(mixer, causal, mode, params, grad, stats, !no_state, in_path, out_path);
    if (*list) return cmd_mixers(list_json);
    if (*demo) return cmd_demo(demo_T, dir, seed);
    if (*ex) return cmd_example(mixer, causal, ex_T, ex_seed, ex_scale, ex_dims, ex_stress, ex_dy, out_path);
    if (*tr) {
      for (const char* k : {"data", "task", "config", "mixer", "init", "tokenizer", "steps", "batch", "seq", "pairs", "accum",
                            "lr", "warmup", "weight-decay", "clip", "seed"})
        if (tr->get_option(std::string("--") + k)->count()) {
          std::string key = k;
          std::replace(key.begin(), key.end(), '-', '_');
          topt.given.insert(key);
        }
      return cmd_train(topt, config_path, mixer, threads);
    }
    if (*gen) {
      gopt.tokenizer = tokenizer_path, gopt.state_in = state_in, gopt.state_out = state_out, gopt.dtype = dtype;
      return cmd_generate(model_path, gopt, stats);
    }
    if (*ev) {
      if (eval_file.empty())
        return cmd_eval_class(model_path, eval_split.empty() ? "test" : eval_split, eval_examples, eval_json, eval_batch,
                              ev->get_option("--seq")->count() ? eval_seq : 0, eval_pairs);
      return cmd_eval(model_path, eval_file, eval_split.empty() ? "val" : eval_split, tokenizer_path, eval_mode, dtype,
                      eval_seq, eval_windows);
    }
    if (*tok) return cmd_tokenize(tokenizer_path, tok_text, tok_file, tok_decode);
    if (*gr) return cmd_grad(model_path, tokens_csv, targets_csv, labels_csv, lengths_csv, grad_batch, out_path);
    if (*lg) return cmd_logits(model_path, tokens_csv, logits_mode, logits_chunk, dtype, out_path);
    if (*bn) {
      xbo.backward = !no_backward, xbo.step = !no_step, xbo.out = mbo.out, mbo.load = !no_load;
      return cmd_bench(bench_model_flag, mbo, xbo);
    }
    if (*feats) return cmd_features(fM, fD, fseed, fout);
    if (*hip) return cmd_hippo(hip_N);
    if (*viz) return cmd_viz(viz_model, viz_data, viz_offset, viz_prompt, viz_T, viz_out, viz_force);
  } catch (const Error& e) {
    std::fprintf(stderr, "linmix: %s\n", e.what());
    return 2;
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr, "linmix: out of memory: the sizes asked for do not fit in this machine's memory\n");
    return 2;
  } catch (const std::filesystem::filesystem_error& e) {
    std::fprintf(stderr, "linmix: %s\n", e.what());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "linmix: internal error: %s\n", e.what());
    return 3;
  }
  return 0;
}
