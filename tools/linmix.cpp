// The `linmix` command: parses arguments, calls the library, prints. Every user error is one
// line "linmix: <message>" on stderr and exit code 2.
#include <CLI/CLI.hpp>
#include <malloc.h>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>
#include <random>

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

namespace {

// An output that would overwrite one of the command's inputs is refused.
void refuse_same(const std::string& out, const std::vector<std::string>& inputs, const std::string& what) {
  if (out.empty()) return;
  std::error_code e1;
  const auto co = std::filesystem::weakly_canonical(out, e1);
  for (const auto& in : inputs) {
    if (in.empty()) continue;
    std::error_code e2;
    const auto ci = std::filesystem::weakly_canonical(in, e2);
    LINMIX_CHECK(e1 || e2 || co != ci, what + " " + out + " is also an input of this command: it would be overwritten");
  }
}

std::map<std::string, std::string> parse_params(const std::vector<std::string>& kvs) {
  std::map<std::string, std::string> out;
  for (const auto& kv : kvs) {
    const auto eq = kv.find('=');
    LINMIX_CHECK(eq != std::string::npos && eq > 0, "malformed --param '" + kv + "' (expected KEY=VALUE)");
    const std::string key = kv.substr(0, eq);
    LINMIX_CHECK(!out.count(key), "param '" + key + "' given twice");
    out[key] = kv.substr(eq + 1);
  }
  return out;
}

// Peak resident memory of this process (VmHWM of /proc/self/status), in MiB; -1 if unknown.
double peak_rss_mib() {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line))
    if (line.rfind("VmHWM:", 0) == 0) return std::atof(line.c_str() + 6) / 1024.0;
  return -1;
}

int cmd_mix(const std::string& mixer, bool causal, const std::string& mode, const std::vector<std::string>& params,
            bool grad, bool stats, const std::string& in_path, const std::string& out_path) {
  if (stats) {
    // the peak resident set then is the peak of live memory: every buffer of 64 KiB or more is
    // mapped when allocated and unmapped when freed (glibc's adaptive threshold otherwise keeps
    // freed buffers in per-thread heaps, and the peak depends on which thread ran what)
    mallopt(M_MMAP_THRESHOLD, 1 << 16);
    mallopt(M_TRIM_THRESHOLD, 0);
  }
  const auto t0 = std::chrono::steady_clock::now();
  const Mode m = parse_mode(mode);
  const MixerSpec& spec = find_mixer(mixer);  // unknown names fail before any file is read
  (void)spec;
  const auto kv = parse_params(params);
  const SafeTensors in = read_safetensors(in_path);
  const TensorMap out = run_mixer(mixer, m, causal, kv, in.tensors, grad);
  write_safetensors(out_path, out,
                    {{"mixer", mixer}, {"mode", mode}, {"causal", causal ? "1" : "0"}, {"grad", grad ? "1" : "0"}});
  if (stats)
    std::fprintf(stderr, "linmix stats: wall_ms=%.3f peak_rss_mib=%.1f\n",
                 std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count(),
                 peak_rss_mib());
  return 0;
}

// "1,2,3" -> ids, each an integer in [0, vocab).
std::vector<int32_t> parse_ids(const std::string& csv, int64_t vocab, const std::string& flag,
                               bool allow_ignore = false) {
  std::vector<int32_t> ids;
  std::stringstream ss(csv);
  std::string item;
  while (std::getline(ss, item, ',')) {
    char* end = nullptr;
    errno = 0;
    const long v = std::strtol(item.c_str(), &end, 10);
    LINMIX_CHECK(!item.empty() && end && *end == '\0' && errno == 0, flag + ": '" + item + "' is not an integer");
    LINMIX_CHECK((v >= 0 || (allow_ignore && v == -1)) && v < vocab,
                 flag + ": " + item + " is outside the vocabulary [0, " + std::to_string(vocab) + ")");
    ids.push_back(int32_t(v));
  }
  LINMIX_CHECK(!ids.empty(), flag + ": no token ids");
  return ids;
}

double max_abs_diff(const Tensor& a, const Tensor& b) {
  double m = 0;
  for (int64_t i = 0; i < a.numel(); ++i) m = std::max(m, std::fabs(double(a.data[i]) - double(b.data[i])));
  return m;
}
double max_abs(const Tensor& a) {
  double m = 0;
  for (float x : a.data) m = std::max(m, std::fabs(double(x)));
  return m;
}

// Generates inputs for every mechanism, writes them as safetensors, runs every form through
// the same path as `linmix mix` and prints how closely the forms agree.
int cmd_demo(int64_t T, const std::string& dir, uint64_t seed) {
  std::filesystem::create_directories(dir);
  std::printf("linmix demo: B=2 T=%lld H=4 D=E=16 C=64, N(0,1) inputs (seed %llu); files in %s/\n",
              static_cast<long long>(T), static_cast<unsigned long long>(seed), dir.c_str());
  std::printf("%-11s %-10s %-10s %13s %12s %12s %s\n", "mixer", "causal", "form", "max|y-ref|", "tolerance",
              "time (ms)", "");
  int failures = 0;
  for (const auto& spec : mixers()) {
    for (bool causal : {false, true}) {
      if ((causal && !spec.causal_ok) || (!causal && !spec.noncausal_ok)) continue;
      const std::string stem = dir + "/" + spec.name + (causal ? "_causal" : "");
      write_safetensors(stem + ".in.safetensors", example_inputs(spec, example_dims(spec, Scale::Demo, T, causal), seed));
      const TensorMap in = read_safetensors(stem + ".in.safetensors").tensors;
      Tensor ref;
      for (Mode m : {Mode::Reference, Mode::Parallel, Mode::Recurrent}) {
        if (m == Mode::Recurrent && !causal) continue;
        const auto t0 = std::chrono::steady_clock::now();
        const TensorMap out = run_mixer(spec.name, m, causal, spec.example_params, in);
        const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
        write_safetensors(stem + "." + mode_name(m) + ".out.safetensors", out);
        if (m == Mode::Reference) {
          ref = out.at("y");
          std::printf("%-11s %-10s %-10s %13s %12s %12.2f\n", spec.name.c_str(), causal ? "causal" : "non-causal",
                      mode_name(m), "-", "-", ms);
          continue;
        }
        // MIXERS.md: max |err| <= 1e-4 * max(1, max |ref|) against the float64 reference.
        const double err = max_abs_diff(out.at("y"), ref), tol = 1e-4 * std::max(1.0, max_abs(ref));
        const bool ok = err <= tol;
        failures += !ok;
        std::printf("%-11s %-10s %-10s %13.3e %12.1e %12.2f %s\n", spec.name.c_str(), causal ? "causal" : "non-causal",
                    mode_name(m), err, tol, ms, ok ? "ok" : "MISMATCH");
      }
    }
  }
  std::printf("%s: every form %s the float64 reference\n", failures ? "FAIL" : "OK",
              failures ? "does NOT match" : "matches");
  return failures ? 1 : 0;
}


int cmd_mixers(bool json) {
  std::cout << (json ? mixers_json() : describe_mixers());
  return 0;
}

int cmd_example(const std::string& mixer, bool causal, int64_t T, uint64_t seed, const std::string& scale,
                const std::vector<std::string>& dim_overrides, int stress, bool with_dy, const std::string& out) {
  const MixerSpec& spec = find_mixer(mixer);
  LINMIX_CHECK(causal ? spec.causal_ok : spec.noncausal_ok,
               "mixer '" + mixer + "' has no " + (causal ? "causal" : "non-causal") + " form");
  LINMIX_CHECK(stress >= 0 && stress <= 2, "--stress must be 0, 1 or 2");
  auto dims = example_dims(spec, parse_scale(scale), T, causal);
  for (const auto& [k, v] : parse_params(dim_overrides)) {
    char* end = nullptr;
    const long long n = std::strtoll(v.c_str(), &end, 10);
    LINMIX_CHECK(!v.empty() && *end == '\0' && n >= 1 && n <= (1 << 24), "--dim " + k + "=" + v + ": not a size");
    dims[k] = n;
  }
  TensorMap in = example_inputs(spec, dims, seed);
  if (stress) stress_inputs(spec, in, stress == 2);
  if (with_dy) {
    Tensor dy(dims_shape(spec.y_dims, validate_call(mixer, Mode::Parallel, causal, spec.example_params, in)));
    std::mt19937_64 rng(seed ^ 0x9e3779b97f4a7c15ull);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    for (float& x : dy.data) x = normal(rng);
    in["dy"] = std::move(dy);
  }
  write_safetensors(out, in, {{"mixer", mixer}, {"seed", std::to_string(seed)}});
  return 0;
}

int cmd_train(TrainOptions topt, const std::string& config_path, const std::string& mixer) {
  if (!config_path.empty()) {
    std::ifstream f(config_path);
    LINMIX_CHECK(f.good(), config_path + ": cannot open the model config");
    topt.config.assign(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
  } else if (!mixer.empty()) {
    topt.config = ModelConfig::for_mixer(mixer).to_json();
  }
  const TrainResult r = train(topt);
  std::printf("trained %lld steps in %.1f s (%.0f tok/s): train loss %.4f", static_cast<long long>(r.steps_done),
              r.seconds, r.tokens_per_s, r.train_loss);
  if (topt.task.empty()) std::printf(", validation loss %.4f = %.4f bpc\n", r.val_loss, r.val_bpc);
  else std::printf(", %s accuracy %.4f\n", topt.task.c_str(), r.val_acc);
  std::printf("checkpoint: %s/ckpt.safetensors; peak memory %.1f MiB\n", topt.out.c_str(), peak_rss_mib());
  return 0;
}

// The tokenizer a command uses: the one given, else the one the checkpoint names (a tokenizer
// file that exists, or bytes), else bytes.
std::string tokenizer_for(const Checkpoint& ck, const std::string& given) {
  if (!given.empty()) return given;
  if (!ck.tokenizer.empty() && ck.tokenizer != "bytes" && ck.tokenizer.rfind("task:", 0) != 0 &&
      std::filesystem::exists(ck.tokenizer))
    return ck.tokenizer;
  return "bytes";
}

int cmd_generate(const std::string& model_path, GenerateOptions o, bool stats) {
  Checkpoint ck = load_checkpoint(model_path);
  o.tokenizer = tokenizer_for(ck, o.tokenizer);
  const GenerateResult r = generate(*ck.model, o, [](const std::string& piece) {
    std::fwrite(piece.data(), 1, piece.size(), stdout);
    std::fflush(stdout);
  });
  std::fputc('\n', stdout);
  std::fprintf(stderr, "linmix generate: %lld tokens in %.2f s (%.1f tokens/s)\n", static_cast<long long>(r.generated),
               r.seconds, double(r.generated) / std::max(r.seconds, 1e-9));
  if (stats) std::fprintf(stderr, "linmix stats: ms_per_token=%.4f peak_rss_mib=%.1f\n", r.ms_per_token, peak_rss_mib());
  return 0;
}

std::vector<uint8_t> read_bytes(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  LINMIX_CHECK(f.good(), path + ": cannot open");
  return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}

int cmd_eval(const std::string& model_path, const std::string& file, const std::string& split,
             const std::string& tokenizer, const std::string& mode, const std::string& dtype, int64_t seq,
             int64_t windows) {
  LINMIX_CHECK(split == "val" || split == "train" || split == "all", "--split must be val, train or all");
  Checkpoint ck = load_checkpoint(model_path);
  const std::string tk = tokenizer_for(ck, tokenizer);
  std::vector<uint8_t> bytes = read_bytes(file);
  if (split != "all") {  // split by bytes as training does: the first 90% train, the last 10% validation
    const Corpus c = Corpus::from_bytes(std::move(bytes));
    bytes = split == "val" ? c.val : c.train;
  }
  const EvalResult r = evaluate_file(*ck.model, bytes, tk, mode, dtype, seq, windows);
  if (tk == "bytes")
    std::printf("%s (%s): %s mode, %lld windows of %lld: loss %.6f nats/char = %.6f bpc\n", file.c_str(),
                split.c_str(), mode.c_str(), static_cast<long long>(r.windows), static_cast<long long>(seq), r.loss,
                r.bits_per_byte);
  else
    std::printf("%s (%s): %s mode, %lld windows of %lld tokens (%lld bytes scored): loss %.6f nats/token = %.6f "
                "bits/byte\n",
                file.c_str(), split.c_str(), mode.c_str(), static_cast<long long>(r.windows), static_cast<long long>(seq),
                static_cast<long long>(r.bytes), r.loss, r.bits_per_byte);
  return 0;
}

int cmd_tokenize(const std::string& tokenizer, const std::string& text, const std::string& file, std::string decode) {
  const auto tk = Tokenizer::load(tokenizer);
  if (!decode.empty() && decode[0] == '@') {
    const std::vector<uint8_t> b = read_bytes(decode.substr(1));
    decode.assign(b.begin(), b.end());
    while (!decode.empty() && std::isspace(static_cast<unsigned char>(decode.back()))) decode.pop_back();
  }
  if (!decode.empty()) {
    const std::string s = tk->decode(parse_ids(decode, tk->vocab_size(), "--decode"));
    std::fwrite(s.data(), 1, s.size(), stdout);
    return 0;
  }
  std::string all = text;
  if (!file.empty()) {
    const std::vector<uint8_t> b = read_bytes(file);
    all.assign(b.begin(), b.end());
  }
  const std::vector<int32_t> ids = tk->encode(all);
  for (size_t i = 0; i < ids.size(); ++i) std::printf("%s%d", i ? "," : "", ids[i]);
  std::printf("\n");
  return 0;
}

int cmd_grad(const std::string& model_path, const std::string& tokens, const std::string& targets, int64_t batch,
             const std::string& out_path) {
  Checkpoint ck = load_checkpoint(model_path);
  Model& m = *ck.model;
  const std::vector<int32_t> in = parse_ids(tokens, m.config().vocab, "--tokens");
  const std::vector<int32_t> tg = parse_ids(targets, m.config().vocab, "--targets", true);
  LINMIX_CHECK(in.size() == tg.size(), "--tokens and --targets differ in length");
  LINMIX_CHECK(static_cast<int64_t>(in.size()) % batch == 0, "--batch does not divide the token count");
  LINMIX_CHECK(std::any_of(tg.begin(), tg.end(), [](int32_t t) { return t >= 0; }),
               "--targets: every target is -1, nothing is scored (the loss would be undefined)");
  TensorMap grads;
  const double loss = m.forward_backward(in.data(), tg.data(), batch, static_cast<int64_t>(in.size()) / batch, &grads);
  TensorMap out;
  for (auto& [n, t] : grads) out["d" + n] = std::move(t);
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.17g", loss);
  write_safetensors(out_path, out, {{"loss", buf}});
  return 0;
}

int cmd_logits(const std::string& model_path, const std::string& tokens, const std::string& mode, int64_t chunk,
               const std::string& dtype, const std::string& out_path) {
  Checkpoint ck = load_checkpoint(model_path);
  const std::vector<int32_t> toks = parse_ids(tokens, ck.model->config().vocab, "--tokens");
  write_safetensors(out_path, {{"logits", sequence_logits(*ck.model, toks, mode, chunk, dtype)}}, {{"mode", mode}});
  return 0;
}

int cmd_info(const std::string& path) {
  Checkpoint ck = load_checkpoint(path);
  const ModelConfig& c = ck.model->config();
  std::printf("%s\n  kind:       %s\n  config:     %s\n  parameters: %lld\n  tokenizer:  %s\n  step:       %lld\n",
              path.c_str(), ck.imported ? "RWKV-4 checkpoint (imported)" : "linmix checkpoint", c.to_json().c_str(),
              static_cast<long long>(ck.model->num_params()), ck.tokenizer.c_str(), static_cast<long long>(ck.step));
  return 0;
}

int cmd_bench(bool model, const ModelBenchOptions& mbo, const MixerBenchOptions& xbo) {
  if (!model) return bench_mixers(xbo);
  LINMIX_CHECK(mbo.checkpoint.empty() == mbo.data.empty(), "--checkpoint and --data go together");
  for (const auto& d : mbo.dtypes) parse_wtype(d);
  return bench_model(mbo);
}

int cmd_features(int64_t M, int64_t D, uint64_t seed, const std::string& out) {
  Tensor proj({M, D});
  proj.data = orthogonal_gaussian_features(M, D, seed);
  write_safetensors(out, {{"proj", proj}}, {{"generator", "orthogonal_gaussian"}, {"seed", std::to_string(seed)}});
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
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

  auto* tr = app.add_subcommand("train", "train a language model (byte-level) on a text file or a synthetic task");
  TrainOptions topt;
  std::string config_path;
  tr->add_option("--data", topt.data, "text file (first 90% train, last 10% validation)");
  tr->add_option("--task", topt.task, "synthetic task instead of a file: recall | copy");
  tr->add_option("--config", config_path, "model config JSON file (default: a 4-layer RWKV-4, d_model 128)");
  tr->add_option("--mixer", mixer, "shorthand: every layer uses this token mixer (MLP channel mix unless rwkv4)");
  tr->add_option("--out", topt.out, "run directory: ckpt.safetensors, log.jsonl")->capture_default_str();
  tr->add_flag("--resume", topt.resume, "continue from OUT/ckpt.safetensors (with the run's arguments)");
  tr->add_flag("--force", topt.force, "start a new run in an OUT that holds one (replacing its checkpoint and log)");
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
  std::string dtype = "f32";
  gen->add_option("--dtype", dtype, "weights of the RWKV-4 engine: f32 | bf16 | int8 (RWKV-4 models only)")
      ->capture_default_str();

  auto* tok = app.add_subcommand("tokenize", "encode text to token ids (or --decode ids to text)");
  std::string tok_text, tok_file, tok_decode;
  tok->add_option("--tokenizer", tokenizer_path, "bytes, an RWKV World vocabulary, or a Hugging Face tokenizer.json (byte-level BPE)")->required();
  tok->add_option("--text", tok_text, "text to encode");
  tok->add_option("--file", tok_file, "file to encode");
  tok->add_option("--decode", tok_decode, "comma-separated ids to decode (@FILE reads them from a file)");

  auto* ev = app.add_subcommand("eval", "bits per character of a checkpoint on a text file");
  std::string eval_file, eval_mode = "parallel";
  int64_t eval_seq = 128, eval_windows = 64;
  ev->add_option("--model", model_path, "checkpoint")->required();
  ev->add_option("--data", eval_file, "text file")->required();
  std::string eval_split = "val";
  ev->add_option("--split", eval_split, "val (the last 10%, training's validation) | train (the first 90%) | all")
      ->capture_default_str();
  ev->add_option("--tokenizer", tokenizer_path, "bytes, or the model's tokenizer (tokenizer.json or an RWKV World vocabulary); default: the one the checkpoint names, else bytes");
  ev->add_option("--mode", eval_mode, "parallel | recurrent | sequence (the RWKV-4 engine; all agree)")
      ->capture_default_str();
  ev->add_option("--dtype", dtype, "weights of the RWKV-4 engine (sequence mode): f32 | bf16 | int8")
      ->capture_default_str();
  ev->add_option("--seq", eval_seq, "window length")->capture_default_str()->check(CLI::Range(2, 1 << 20));
  ev->add_option("--windows", eval_windows, "windows, spread over the file")->capture_default_str()->check(CLI::PositiveNumber);

  auto* lg = app.add_subcommand("logits", "logits [T,V] of a token sequence, for cross-checks");
  std::string tokens_csv, logits_mode = "parallel";
  lg->add_option("--model", model_path, "checkpoint (linmix, or RWKV-4 safetensors with BlinkDL or HF names)")->required();
  lg->add_option("--tokens", tokens_csv, "comma-separated token ids")->required();
  int64_t logits_chunk = 64;
  lg->add_option("--mode", logits_mode,
                 "parallel | recurrent (the training model) | sequence | decode (the RWKV-4 engine)")
      ->capture_default_str();
  lg->add_option("--chunk", logits_chunk, "sequence mode: tokens per call, the state carried between calls")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  lg->add_option("--dtype", dtype, "weights of the RWKV-4 engine: f32 | bf16 | int8")->capture_default_str();
  lg->add_option("--out", out_path, "output safetensors (tensor 'logits' [T,V])")->required();

  auto* gr = app.add_subcommand("grad", "mean loss and every parameter's gradient on given tokens (for cross-checks)");
  std::string targets_csv;
  int64_t grad_batch = 1;
  gr->add_option("--model", model_path, "checkpoint")->required();
  gr->add_option("--tokens", tokens_csv, "B*T comma-separated input ids, batch-major")->required();
  gr->add_option("--targets", targets_csv, "B*T target ids (-1 = not scored)")->required();
  gr->add_option("--batch", grad_batch, "B")->capture_default_str()->check(CLI::PositiveNumber);
  gr->add_option("--out", out_path, "output safetensors: d<param> for every trained parameter")->required();

  auto* info = app.add_subcommand("info", "a checkpoint's config, parameter count, tokenizer and step");
  info->add_option("model", model_path, "checkpoint (linmix, or an RWKV-4 safetensors file)")->required();

  auto* hlp = app.add_subcommand("help", "list the commands (linmix COMMAND --help for one)");

  auto* bn = app.add_subcommand("bench", "benchmarks against the machine's limits measured in the same run");
  bool bench_model_flag = false;
  ModelBenchOptions mbo;
  bn->add_flag("--model", bench_model_flag, "the RWKV-4 inference engine on the 169M shape (random weights)");
  bn->add_option("--threads", mbo.threads, "threads (OpenMP and OpenBLAS)")->capture_default_str()->check(CLI::Range(1, 1024));
  bn->add_option("--decode-tokens", mbo.decode_tokens, "tokens timed in decode")->capture_default_str()->check(CLI::Range(1, 1 << 20));
  bn->add_option("--rounds", mbo.rounds, "decode rounds, each beside its own bandwidth measurement")->capture_default_str()->check(CLI::Range(1, 1000));
  bn->add_option("--prefill-tokens", mbo.prefill_tokens, "tokens of the prefill")->capture_default_str()->check(CLI::Range(1, 1 << 20));
  bn->add_option("--layers", mbo.n_layer, "model layers (12 = 169M)")->capture_default_str()->check(CLI::Range(1, 1000));
  bn->add_option("--d-model", mbo.d_model, "model width (768 = 169M)")->capture_default_str()->check(CLI::Range(1, 1 << 16));
  bn->add_option("--vocab", mbo.vocab, "vocabulary (50277 = 169M)")->capture_default_str()->check(CLI::Range(1, 1 << 24));
  bn->add_option("--dtypes", mbo.dtypes, "weight types to run")->capture_default_str()->delimiter(',');
  bn->add_option("--checkpoint", mbo.checkpoint, "also: perplexity of this trained RWKV-4 in each weight type");
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
  for (auto* sc : {mix, demo, ex, tr, gen, ev, lg, gr})
    sc->add_option("--threads", threads, "threads (OpenMP and OpenBLAS; default: all cores)")->check(CLI::Range(1, 1024));
  app.set_version_flag("--version", std::string("linmix ") + LINMIX_VERSION);
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
    if (*mix) refuse_same(out_path, {in_path}, "--out");
    if (*gen) refuse_same(state_out, {model_path, state_in, tokenizer_path}, "--state-out");
    if (*lg || *gr) refuse_same(out_path, {model_path}, "--out");
    if (*ex) refuse_same(out_path, {}, "--out");
    if (*mix) return cmd_mix(mixer, causal, mode, params, grad, stats, in_path, out_path);
    if (*list) return cmd_mixers(list_json);
    if (*demo) return cmd_demo(demo_T, dir, seed);
    if (*ex) return cmd_example(mixer, causal, ex_T, ex_seed, ex_scale, ex_dims, ex_stress, ex_dy, out_path);
    if (*tr) {
      for (const char* k : {"data", "task", "config", "mixer", "steps", "batch", "seq", "accum", "lr", "warmup",
                            "weight-decay", "clip", "seed"})
        if (tr->get_option(std::string("--") + k)->count()) {
          std::string key = k;
          std::replace(key.begin(), key.end(), '-', '_');
          topt.given.insert(key);
        }
      return cmd_train(topt, config_path, mixer);
    }
    if (*gen) {
      gopt.tokenizer = tokenizer_path, gopt.state_in = state_in, gopt.state_out = state_out, gopt.dtype = dtype;
      return cmd_generate(model_path, gopt, stats);
    }
    if (*ev) return cmd_eval(model_path, eval_file, eval_split, tokenizer_path, eval_mode, dtype, eval_seq, eval_windows);
    if (*tok) return cmd_tokenize(tokenizer_path, tok_text, tok_file, tok_decode);
    if (*gr) return cmd_grad(model_path, tokens_csv, targets_csv, grad_batch, out_path);
    if (*lg) return cmd_logits(model_path, tokens_csv, logits_mode, logits_chunk, dtype, out_path);
    if (*bn) {
      xbo.backward = !no_backward, xbo.step = !no_step, xbo.out = mbo.out;
      return cmd_bench(bench_model_flag, mbo, xbo);
    }
    if (*feats) return cmd_features(fM, fD, fseed, fout);
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
