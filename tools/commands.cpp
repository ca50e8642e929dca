// The commands of the `linmix` binary: each calls the library and prints (tools/commands.h).
#include <nlohmann/json.hpp>
#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>
#include <random>
#include <thread>

#include "linmix/bench.h"
#include "linmix/engine.h"
#include "linmix/generate.h"
#include "linmix/hippo.h"
#include "linmix/kernels.h"
#include "linmix/mixer.h"
#include "linmix/model.h"
#include "linmix/quant.h"
#include "linmix/rwkv4.h"
#include "linmix/safetensors.h"
#include "linmix/tokenizer.h"
#include "linmix/train.h"
#include "linmix/viz.h"
#include "mpi_comm.h"

#include "commands.h"

namespace linmix::cli {



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
            bool grad, bool stats, bool final_state, const std::string& in_path, const std::string& out_path) {
  if (stats) {
    map_every_buffer();  // the peak resident set is then the peak of live memory
  }
  const auto t0 = std::chrono::steady_clock::now();
  const Mode m = parse_mode(mode);
  const MixerSpec& spec = find_mixer(mixer);  // unknown names fail before any file is read
  (void)spec;
  const auto kv = parse_params(params);
  const SafeTensors in = map_safetensors(in_path);  // the inputs read where they are (the kernels only read them)
  check_floats(in, in_path, "the mixers read F32, F16 or BF16 tensors");
  const auto t_read = std::chrono::steady_clock::now();
  TensorMap out = run_mixer(mixer, m, causal, kv, in.tensors, grad, final_state);
  const auto t_run = std::chrono::steady_clock::now();
  if (!final_state && !grad) std::erase_if(out, [](const auto& kv) { return kv.first.rfind("state.", 0) == 0; });
  write_safetensors(out_path, out, {},
                    {{"mixer", mixer}, {"mode", mode}, {"causal", causal ? "1" : "0"}, {"grad", grad ? "1" : "0"}},
                    false);  // renamed into place, not waited for on disk: mix computes it again
  if (stats) {
    using ms = std::chrono::duration<double, std::milli>;
    const auto t_end = std::chrono::steady_clock::now();
    std::fprintf(stderr, "linmix stats: wall_ms=%.3f read_ms=%.3f run_ms=%.3f write_ms=%.3f peak_rss_mib=%.1f\n",
                 ms(t_end - t0).count(), ms(t_read - t0).count(), ms(t_run - t_read).count(), ms(t_end - t_run).count(),
                 peak_rss_mib());
  }
  // The output is in place: the process ends here, its buffers and mappings left to the kernel
  // (freeing tens of MB and unmapping the input took ~5 ms of a whole-process call)
  std::fflush(nullptr);
  std::_Exit(0);
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

// --profile: every region's time per step (a region's row includes the regions inside it,
// indented under it) and its share of the time all top-level regions took.
void print_profile(const TrainResult& r) {
  const double steps = double(std::max<size_t>(1, r.losses.size()));
  double total = 0;
  for (const auto& row : r.profile)
    if (row.path.find('/') == std::string::npos) total += row.seconds;
  std::printf("profile, per step (%.0f steps; a row includes the rows under it):\n", steps);
  std::printf("  %-44s %10s %8s %9s\n", "region", "ms/step", "%", "calls");
  for (const auto& row : r.profile) {
    const size_t depth = size_t(std::count(row.path.begin(), row.path.end(), '/'));
    const size_t cut = row.path.rfind('/');
    const std::string name = std::string(2 * depth, ' ') + (cut == std::string::npos ? row.path : row.path.substr(cut + 1));
    std::printf("  %-44s %10.3f %7.1f%% %9.1f\n", name.c_str(), 1e3 * row.seconds / steps,
                100 * row.seconds / std::max(total, 1e-12), double(row.calls) / steps);
  }
}

int cmd_train(TrainOptions topt, const std::string& config_path, const std::string& mixer, int threads) {
  // several ranks when mpirun started this process (docs/distributed.md); the cores shared among
  // this machine's ranks unless --threads says otherwise
  std::unique_ptr<Comm> comm = mpi_start();
  if (comm && threads <= 0)
    set_threads(std::max(1, int(std::thread::hardware_concurrency()) / local_ranks()));
  topt.comm = comm.get();
  // A step allocates its activations and gradients afresh (MBs each): with glibc's defaults
  // freed buffers go back to the kernel and every step page-faults them in again. Keep freed
  // memory in the heap for the next step. Measured, RWKV-4 d_model 128, batch 16 x 128, 2
  // threads: 9,000 -> 11,600 tokens/s (backward 137 -> 91 ms).
  keep_freed_memory();
  TrainResult r;
  try {
    if (!config_path.empty()) {
      std::ifstream f(config_path);
      LINMIX_CHECK(f.good(), config_path + ": cannot open the model config");
      topt.config.assign(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
    } else if (!topt.task.empty() && topt.task != "recall" && topt.task != "copy") {
      // a classification task (train() refuses an unknown name): the classifier around the mixer
      // (softmax: LRA's Transformer)
      topt.mixer = mixer.empty() ? "softmax" : mixer;
    } else if (!mixer.empty()) {
      topt.config = ModelConfig::for_mixer(mixer).to_json();
    }
    r = train(topt);
  } catch (const std::exception& e) {
    if (comm) mpi_fail(*comm, e.what());  // one rank's error ends every rank's run
    throw;
  }
  if (comm && comm->rank() != 0) return 0;
  std::printf("trained %lld steps in %.1f s (%.0f tok/s): train loss %.4f", static_cast<long long>(r.steps_done),
              r.seconds, r.tokens_per_s, r.train_loss);
  if (topt.task.empty()) std::printf(", validation loss %.4f = %.4f bpc\n", r.val_loss, r.val_bpc);
  else std::printf(", %s accuracy %.4f\n", topt.task.c_str(), r.val_acc);
  if (r.ranks > 1)
    std::printf("%d ranks: gradient allreduce %.2f ms per step (%.1f%% of the time)\n", r.ranks,
                1e3 * r.allreduce_s / double(std::max<int64_t>(1, r.losses.size())), 100 * r.allreduce_s / r.seconds);
  std::printf("checkpoint: %s/ckpt.safetensors; peak memory %.1f MiB%s\n", topt.out.c_str(), peak_rss_mib(),
              r.ranks > 1 ? " (rank 0)" : "");
  if (topt.profile) print_profile(r);
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
  std::fflush(stdout);  // the text ends before the summary line on stderr
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
  LINMIX_CHECK(!ck.model->config().classifier(), model_path + ": a classifier: evaluate it on its task's split "
                                                              "without --data (linmix eval --model M [--split test])");
  const std::string tk = tokenizer_for(ck, tokenizer);
  std::vector<uint8_t> bytes = read_bytes(file);
  if (split != "all") {  // split as training does: the first 90% train, the last 10% validation
    auto halves = split_text(std::move(bytes));
    bytes = split == "val" ? std::move(halves.second) : std::move(halves.first);
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

int cmd_eval_class(const std::string& model_path, const std::string& split, int64_t examples, bool json,
                   int64_t batch, int64_t seq_given, int64_t pairs) {
  Checkpoint ck = load_checkpoint(model_path);
  Model& m = *ck.model;
  if (!m.config().classifier() && (ck.tokenizer == "task:recall" || ck.tokenizer == "task:copy")) {
    // a synthetic task's language model: accuracy on fresh draws (seed 7: not the training stream)
    const std::string task = ck.tokenizer.substr(5);
    int64_t seq = seq_given;
    if (seq == 0) {
      const auto run = nlohmann::json::parse(ck.meta_json, nullptr, false);
      seq = run.is_object() && run.contains("seq") && run["seq"].is_number_integer() ? run["seq"].get<int64_t>() : 128;
    }
    const int64_t lim = m.config().context_limit();
    LINMIX_CHECK(lim == 0 || seq <= lim, "--seq " + std::to_string(seq) + " is past the model's context of " +
                                             std::to_string(lim));
    const int64_t n = examples > 0 ? examples : 512, batches = (n + batch - 1) / batch;
    const auto t0 = std::chrono::steady_clock::now();
    const auto [acc, loss] = evaluate_task(m, task, batch, seq, pairs, batches, 7);
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (json) {
      const nlohmann::json j = {{"task", task}, {"seq", seq}, {"pairs", pairs}, {"examples", batches * batch},
                                {"accuracy", acc}, {"loss", loss}};
      std::printf("%s\n", j.dump().c_str());
    } else {
      std::printf("%s (seq %lld, pairs %lld, %lld examples): accuracy %.4f, loss %.4f (%.1f s)\n", task.c_str(),
                  static_cast<long long>(seq), static_cast<long long>(pairs), static_cast<long long>(batches * batch),
                  acc, loss, secs);
    }
    return 0;
  }
  LINMIX_CHECK(m.config().classifier(), model_path + ": a language model: give --data FILE to score it (--split val | "
                                                     "train | all)");
  const std::string task_name = ck.tokenizer.rfind("task:", 0) == 0 ? ck.tokenizer.substr(5) : "";
  LINMIX_CHECK(is_class_task(task_name), model_path + ": the checkpoint does not name its classification task");
  int64_t seq = 0;  // the run's sequence length (the task's own for fmnist)
  try {
    const auto run = nlohmann::json::parse(ck.meta_json);
    if (run.contains("seq") && run["seq"].is_number_integer()) seq = run["seq"].get<int64_t>();
  } catch (const nlohmann::json::exception&) {
    throw Error(model_path + ": malformed run arguments in the checkpoint metadata");
  }
  const auto task = make_class_task(task_name, seq);
  const Split s = parse_split(split);
  const int64_t n = examples ? examples : task->size(s);
  const auto t0 = std::chrono::steady_clock::now();
  const ClassEval r = evaluate_class(m, *task, s, n, batch);
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const double acc = double(r.correct) / double(r.n), loss = r.loss_sum / double(r.n);
  if (json) {
    const nlohmann::json j = {{"task", task_name}, {"split", split},       {"examples", r.n}, {"accuracy", acc},
                              {"loss", loss},      {"seq", task->seq()},   {"seconds", secs}, {"lengths", r.lengths},
                              {"right", r.right},  {"labels", r.labels}, {"peak_rss_mib", peak_rss_mib()}};
    std::printf("%s\n", j.dump().c_str());
    return 0;
  }
  std::printf("%s (%s, %lld examples of up to %lld tokens): accuracy %.4f, loss %.4f (%.1f s)\n", task_name.c_str(),
              split.c_str(), static_cast<long long>(r.n), static_cast<long long>(task->seq()), acc, loss, secs);
  const int32_t lo = *std::min_element(r.lengths.begin(), r.lengths.end()),
                hi = *std::max_element(r.lengths.begin(), r.lengths.end());
  if (hi > lo) {  // accuracy against length: four equal-width bins
    std::printf("by length:");
    for (int b = 0; b < 4; ++b) {
      const double a = lo + (hi - lo + 1) * b / 4.0, z = lo + (hi - lo + 1) * (b + 1) / 4.0;
      int64_t k = 0, ok = 0;
      for (size_t i = 0; i < r.lengths.size(); ++i)
        if (r.lengths[i] >= a && r.lengths[i] < z) ++k, ok += r.right[i];
      if (k) std::printf(" [%.0f, %.0f): %.4f (%lld)", a, z, double(ok) / double(k), static_cast<long long>(k));
    }
    std::printf("\n");
  }
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

int cmd_grad(const std::string& model_path, const std::string& tokens, const std::string& targets,
             const std::string& labels, const std::string& lengths, int64_t batch, const std::string& out_path) {
  Checkpoint ck = load_checkpoint(model_path);
  Model& m = *ck.model;
  const std::vector<int32_t> in = parse_ids(tokens, m.config().vocab, "--tokens");
  LINMIX_CHECK(static_cast<int64_t>(in.size()) % batch == 0, "--batch does not divide the token count");
  const int64_t T = static_cast<int64_t>(in.size()) / batch;
  TensorMap grads;
  double loss = 0;
  if (m.config().classifier()) {
    LINMIX_CHECK(targets.empty() && !labels.empty(), "a classifier's gradient takes --labels (one per sequence), not --targets");
    const std::vector<int32_t> lb = parse_ids(labels, m.config().classes, "--labels");
    std::vector<int32_t> len = lengths.empty() ? std::vector<int32_t>(size_t(batch), int32_t(T))
                                               : parse_ids(lengths, int64_t(T) + 1, "--lengths");
    LINMIX_CHECK(int64_t(lb.size()) == batch && int64_t(len.size()) == batch, "--labels and --lengths need --batch values");
    loss = m.classify(in.data(), len.data(), lb.data(), batch, T, &grads);
  } else {
    LINMIX_CHECK(labels.empty() && lengths.empty() && !targets.empty(),
                 "a language model's gradient takes --targets (one per token), not --labels / --lengths");
    const std::vector<int32_t> tg = parse_ids(targets, m.config().vocab, "--targets", true);
    LINMIX_CHECK(in.size() == tg.size(), "--tokens and --targets differ in length");
    LINMIX_CHECK(std::any_of(tg.begin(), tg.end(), [](int32_t t) { return t >= 0; }),
                 "--targets: every target is -1, nothing is scored (the loss would be undefined)");
    loss = m.forward_backward(in.data(), tg.data(), batch, T, &grads);
  }
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
              path.c_str(), ck.kind.c_str(), c.to_json().c_str(),
              static_cast<long long>(ck.model->num_params()), ck.tokenizer.c_str(), static_cast<long long>(ck.step));
  return 0;
}

int cmd_convert(const std::string& in, const std::string& out, const std::string& dtype, bool force) {
  refuse_same(out, {in}, "--out");
  const auto t0 = std::chrono::steady_clock::now();
  convert_checkpoint(in, out, parse_wtype(dtype), force);
  std::printf("%s: %s weights, %.1f MB (%.2f s)\n", out.c_str(), dtype.c_str(),
              double(std::filesystem::file_size(out)) / 1e6,
              std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
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

int cmd_hippo(int64_t N) {
  const hippo::DiagonalLegs d = hippo::diagonal_legs(N);
  nlohmann::json j = {{"state", N}, {"A_re", -0.5}, {"A_im", d.w}, {"B_re", d.B_re}, {"B_im", d.B_im}};
  std::printf("%s\n", j.dump().c_str());
  return 0;
}

namespace {
// A dark-to-bright colour map (magma-like anchors) of v in [0, 1].
void colour(double v, uint8_t* px) {
  static const double anchors[5][3] = {{0, 0, 4}, {80, 18, 123}, {182, 54, 121}, {251, 136, 97}, {252, 253, 191}};
  v = std::clamp(v, 0.0, 1.0) * 4;
  const int i = std::min(3, int(v));
  const double f = v - i;
  for (int c = 0; c < 3; ++c) px[c] = uint8_t(anchors[i][c] + f * (anchors[i + 1][c] - anchors[i][c]));
}
}  // namespace

int cmd_viz(const std::string& model_path, const std::string& data, int64_t offset, const std::string& prompt,
            int64_t T, const std::string& out, bool force) {
  LINMIX_CHECK(data.empty() != prompt.empty(), "viz: give the text as --data FILE or --prompt TEXT (one of them)");
  Checkpoint ck = load_checkpoint(model_path);
  const ModelConfig& cfg = ck.model->config();
  LINMIX_CHECK(!cfg.classifier() && cfg.causal, "viz: " + model_path + " is a classifier; viz reads language models");
  const auto tk = Tokenizer::load(tokenizer_for(ck, ""));
  std::string text = prompt;
  if (!data.empty()) {
    std::ifstream f(data, std::ios::binary);
    LINMIX_CHECK(f.good(), "viz: cannot read " + data);
    const std::string all((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    const int64_t start = offset >= 0 ? offset : int64_t(all.size()) * 9 / 10;  // default: the validation split
    LINMIX_CHECK(start < int64_t(all.size()), "viz: --offset " + std::to_string(start) + " is past the end of " + data);
    text = all.substr(size_t(start), size_t(std::min<int64_t>(int64_t(all.size()) - start, 16 * T)));
  }
  std::vector<int32_t> ids = tk->encode(text);
  LINMIX_CHECK(int64_t(ids.size()) >= T || !prompt.empty(),
               "viz: the text gives " + std::to_string(ids.size()) + " tokens, fewer than --tokens " + std::to_string(T));
  if (int64_t(ids.size()) > T) ids.resize(size_t(T));
  const std::filesystem::path dir(out);
  LINMIX_CHECK(force || !std::filesystem::exists(dir / "viz.json"),
               "viz: " + (dir / "viz.json").string() + " exists (pass --force to replace it)");
  std::filesystem::create_directories(dir);
  const std::vector<LayerAttention> layers = effective_attention(*ck.model, ids);
  const int64_t n = int64_t(ids.size());
  TensorMap weights;
  nlohmann::json j = {{"model", model_path}, {"tokens", n}, {"text", tk->decode(ids)}, {"layers", nlohmann::json::array()}};
  std::printf("layer  mixer            unit           mean look-back (tokens) per head / channel group\n");
  for (const auto& la : layers) {
    Tensor w({la.groups, n, n});
    w.data = la.weights;
    weights["layer." + std::to_string(la.layer)] = w;
    double mean = 0;
    for (double d : la.lookback) mean += d / double(la.lookback.size());
    j["layers"].push_back({{"layer", la.layer}, {"mixer", la.mixer}, {"unit", la.unit}, {"groups", la.groups},
                           {"lookback", la.lookback}, {"mean_lookback", mean}});
    std::printf("%5lld  %-15s  %-13s  %7.2f  [", static_cast<long long>(la.layer), la.mixer.c_str(), la.unit.c_str(), mean);
    for (size_t g = 0; g < la.lookback.size(); ++g) std::printf("%s%.2f", g ? " " : "", la.lookback[g]);
    std::printf("]\n");
    // heat map: one panel per group, log10 share from -4 to 0, s > t (the future) white
    const int64_t k = std::max<int64_t>(1, std::min<int64_t>(4, 384 / n)), P = n * k, gap = 6;
    const int64_t W = la.groups * P + (la.groups - 1) * gap;
    std::vector<uint8_t> img(size_t(W * P * 3), 255);
    for (int64_t g = 0; g < la.groups; ++g)
      for (int64_t y = 0; y < P; ++y)
        for (int64_t x = 0; x < P; ++x) {
          const int64_t t = y / k, s = x / k;
          if (s > t) continue;
          const double share = la.weights[size_t((g * n + t) * n + s)];
          colour((std::log10(std::max(share, 1e-6)) + 4) / 4, &img[size_t((y * W + g * (P + gap) + x) * 3)]);
        }
    write_png((dir / ("layer" + std::to_string(la.layer) + ".png")).string(), W, P, img);
  }
  write_safetensors((dir / "weights.safetensors").string(), weights, {{"model", model_path}});
  write_file_atomic((dir / "viz.json").string(), j.dump(1) + "\n");
  std::printf("wrote %s: viz.json, weights.safetensors (layer.L [groups, T, T]), layer<L>.png (rows t, columns s <= t; "
              "log10 share, -4 black .. 0 white)\n", out.c_str());
  return 0;
}

}  // namespace linmix::cli
