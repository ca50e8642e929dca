// Data, AdamW, checkpoints, the training loop, evaluation and sampling.
#include "linmix/train.h"
#include "linmix/engine.h"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>

#include "linmix/safetensors.h"
#include "linmix/tokenizer.h"
#include "packed.h"
#include "seed.h"

namespace linmix {

namespace {
using json = nlohmann::json;

}  // namespace

// ---------------------------------------------------------------- data

std::pair<std::vector<uint8_t>, std::vector<uint8_t>> split_text(std::vector<uint8_t> bytes) {
  LINMIX_CHECK(bytes.size() >= 100, "corpus too small (" + std::to_string(bytes.size()) + " bytes; need at least 100)");
  size_t cut = bytes.size() * 9 / 10;
  for (int i = 0; i < 3 && cut < bytes.size() && (bytes[cut] & 0xC0) == 0x80; ++i) ++cut;  // not inside a character
  std::vector<uint8_t> val(bytes.begin() + static_cast<std::ptrdiff_t>(cut), bytes.end());
  bytes.resize(cut);
  return {std::move(bytes), std::move(val)};
}

Corpus Corpus::from_bytes(std::vector<uint8_t> bytes, const Tokenizer* tk) {
  auto [train, val] = split_text(std::move(bytes));
  Corpus c;
  const auto ids = [&](const std::vector<uint8_t>& part) {
    if (!tk) return std::vector<int32_t>(part.begin(), part.end());
    return tk->encode(std::string(part.begin(), part.end()));
  };
  c.train = ids(train), c.val = ids(val);
  if (tk) {
    c.bytes_of.resize(static_cast<size_t>(tk->vocab_size()));
    for (int32_t i = 0; i < int32_t(c.bytes_of.size()); ++i) {
      try {
        c.bytes_of[i] = int32_t(tk->decode({i}).size());
      } catch (const Error&) {  // an id the tokenizer leaves unused (World's 0): never in the text
      }
    }
  }
  return c;
}

Corpus Corpus::from_file(const std::string& path, const Tokenizer* tk) {
  std::ifstream f(path, std::ios::binary);
  LINMIX_CHECK(f.good(), path + ": cannot open the data file");
  std::vector<uint8_t> bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  return from_bytes(std::move(bytes), tk);
}

namespace {
// The model's dropout (config dropout > 0) on for one training forward and backward: its masks
// a function of the batch's seed (seed, step, accumulation index) and the rows' place in the
// batch, so a resumed run and any number of ranks drop what one uninterrupted process does.
struct DropoutArmed {
  Model& m;
  DropoutArmed(Model& model, uint64_t batch_seed, int64_t row0) : m(model) {
    m.arm_dropout(mix_seed(batch_seed, 0x64726f70u), row0);
  }
  ~DropoutArmed() { m.disarm_dropout(); }
  DropoutArmed(const DropoutArmed&) = delete;
  DropoutArmed& operator=(const DropoutArmed&) = delete;
};
}  // namespace

Batch corpus_batch(const std::vector<int32_t>& split, int64_t B, int64_t T, uint64_t seed) {
  LINMIX_CHECK(static_cast<int64_t>(split.size()) > T + 1,
               "data split of " + std::to_string(split.size()) + " tokens is shorter than a window of " +
                   std::to_string(T + 1));
  Batch b{B, T, std::vector<int32_t>(B * T), std::vector<int32_t>(B * T)};
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int64_t> pos(0, static_cast<int64_t>(split.size()) - T - 1);
  for (int64_t i = 0; i < B; ++i) {
    const int64_t p = pos(rng);
    for (int64_t t = 0; t < T; ++t) b.inputs[i * T + t] = split[p + t], b.targets[i * T + t] = split[p + t + 1];
  }
  return b;
}

Batch synthetic_batch(const std::string& task, int64_t B, int64_t T, int64_t vocab, uint64_t seed, int64_t pairs) {
  LINMIX_CHECK(task == "recall" || task == "copy", "unknown task '" + task + "' (expected recall or copy)");
  LINMIX_CHECK(vocab >= 16 && T >= 8, "synthetic tasks need vocab >= 16 and seq >= 8");
  LINMIX_CHECK(pairs == 0 || task == "recall", "--pairs is the recall task's");
  const int64_t kmax = std::abs(pairs);
  LINMIX_CHECK(kmax <= (vocab - 2) / 2 && 2 * kmax + 2 <= T + 1,
               "recall: " + std::to_string(kmax) + " pairs do not fit: at most " + std::to_string((vocab - 2) / 2) +
                   " keys (vocab " + std::to_string(vocab) + ") and 2 pairs + 2 <= seq + 1 (seq " + std::to_string(T) + ")");
  Batch b{B, T, std::vector<int32_t>(B * T, 0), std::vector<int32_t>(B * T, -1)};
  std::mt19937_64 rng(seed);
  const int32_t sep = 1, half = int32_t((vocab - 2) / 2);
  for (int64_t i = 0; i < B; ++i) {
    int32_t* in = &b.inputs[i * T];
    int32_t* tg = &b.targets[i * T];
    if (task == "copy") {  // s_1 .. s_n SEP s_1 .. s_n: the second copy is scored
      const int64_t n = (T - 1) / 2;
      std::uniform_int_distribution<int32_t> tok(2, int32_t(vocab - 1));
      std::vector<int32_t> s(n);
      for (auto& x : s) x = tok(rng);
      std::vector<int32_t> seq(s);
      seq.push_back(sep);
      seq.insert(seq.end(), s.begin(), s.end());
      seq.resize(T + 1, 0);
      for (int64_t t = 0; t < T; ++t) {
        in[t] = seq[t];
        if (t >= n && t < 2 * n) tg[t] = seq[t + 1];
      }
    } else {  // multi-query associative recall: k v pairs, then queried keys, score their values
      int64_t n = pairs > 0 ? pairs : std::max<int64_t>(1, T / 4);
      if (pairs < 0) n = std::uniform_int_distribution<int64_t>(1, -pairs)(rng);
      std::vector<int32_t> keys(half);
      for (int32_t k = 0; k < half; ++k) keys[k] = 2 + k;
      std::shuffle(keys.begin(), keys.end(), rng);
      keys.resize(std::min<int64_t>(n, half));
      std::uniform_int_distribution<int32_t> val(2 + half, 2 + 2 * half - 1);
      std::vector<int32_t> vals(keys.size());
      for (auto& x : vals) x = val(rng);
      std::vector<int32_t> seq;
      for (size_t j = 0; j < keys.size(); ++j) seq.push_back(keys[j]), seq.push_back(vals[j]);
      std::uniform_int_distribution<size_t> pick(0, keys.size() - 1);
      std::vector<int64_t> scored;
      while (static_cast<int64_t>(seq.size()) + 2 <= T + 1) {
        const size_t j = pick(rng);
        seq.push_back(keys[j]);
        scored.push_back(static_cast<int64_t>(seq.size()) - 1);  // predicting the value after this key
        seq.push_back(vals[j]);
      }
      seq.resize(T + 1, 0);
      for (int64_t t = 0; t < T; ++t) in[t] = seq[t];
      for (int64_t p : scored)
        if (p < T) tg[p] = seq[p + 1];
    }
  }
  return b;
}

// ---------------------------------------------------------------- optimizer

void AdamW::step(TensorMap& params, const TensorMap& grads, double lr_now) {
  ++t;
  const double bc1 = 1 - std::pow(beta1, double(t)), bc2 = 1 - std::pow(beta2, double(t));
  for (auto& [name, p] : params) {
    if (is_buffer_param(name)) continue;
    auto g = grads.find(name);
    if (g == grads.end()) continue;
    Tensor& m1 = m[name];
    Tensor& m2 = v[name];
    if (m1.numel() != p.numel()) m1 = Tensor(p.shape), m2 = Tensor(p.shape);
    const bool decay = p.rank() >= 2;  // matrices and embeddings; not gains, biases, mixes
    const int64_t n = p.numel();
    float *pw = p.ptr(), *a = m1.ptr(), *b = m2.ptr();
    const float* gw = g->second.ptr();
    // element by element: the threads' split changes no value
#pragma omp parallel for schedule(static) if (n >= (1 << 15))
    for (int64_t i = 0; i < n; ++i) {
      const float gi = gw[i];
      a[i] = float(beta1 * a[i] + (1 - beta1) * gi);
      b[i] = float(beta2 * b[i] + (1 - beta2) * gi * gi);
      const double upd = (a[i] / bc1) / (std::sqrt(b[i] / bc2) + eps);
      pw[i] = float(pw[i] - lr_now * (upd + (decay ? weight_decay * pw[i] : 0.0)));
    }
  }
}

// ---------------------------------------------------------------- checkpoints

void save_checkpoint(const std::string& path, const Model& model, const AdamW& opt, int64_t step,
                     const std::string& meta_json, const std::string& tokenizer) {
  TensorMap all = model.params();
  for (const auto& [n, t] : opt.m) all["opt.m." + n] = t;
  for (const auto& [n, t] : opt.v) all["opt.v." + n] = t;
  write_safetensors(path, all,
                    {{"linmix", "checkpoint"},
                     {"config", model.config().to_json()},
                     {"step", std::to_string(step)},
                     {"adam_t", std::to_string(opt.t)},
                     {"run", meta_json},
                     {"tokenizer", tokenizer}});
}

Checkpoint load_checkpoint(const std::string& path) {
  SafeTensors st = read_safetensors(path);
  Checkpoint ck;
  const bool ours = st.metadata.count("linmix") && st.metadata.at("linmix") == "checkpoint" && st.metadata.count("config");
  ck.tokenizer = st.metadata.count("tokenizer") ? st.metadata.at("tokenizer") : "";
  ck.kind = "linmix checkpoint";
  if (!ours && looks_like_mamba(st.tensors)) {
    std::string v, groups;
    for (const char* key : {"n_groups", "ngroups"})
      if (st.metadata.count(key)) groups = st.metadata.at(key);
    ck.model = import_mamba(std::move(st.tensors), path, groups, &v);
    ck.imported = true, ck.kind = std::string(v == "2" ? "Mamba-2" : "Mamba") + " checkpoint (imported)";
    return ck;
  }
  if (!ours && looks_like_rwkv(st.tensors)) {
    std::string v;  // the version, whatever the names were (detected after Hugging Face's are mapped)
    ck.model = import_rwkv(std::move(st.tensors), path, st.metadata.count("gn_eps") ? st.metadata.at("gn_eps") : "", &v);
    ck.imported = true, ck.kind = "RWKV-" + v + " checkpoint (imported)";
    return ck;
  }
  if (ck.tokenizer.empty()) ck.tokenizer = "bytes";  // linmix checkpoints before the field: byte-level
  LINMIX_CHECK(ours, path + ": not a linmix checkpoint (no config in its metadata) nor an RWKV or Mamba checkpoint");
  const ModelConfig cfg = ModelConfig::from_json(st.metadata.at("config"));
  ck.model = std::make_unique<Model>(cfg, false);  // shapes only: each parameter moved in from the file below
  // a `linmix convert` file: the engine's matrices as they are stored (packed.cpp)
  std::shared_ptr<PackedWeights> packed;
  if (st.metadata.count(kPackedKey)) {
    packed = take_packed(st, *ck.model, path);
    ck.kind = std::string("linmix checkpoint, ") + wtype_name(packed->type) + " weights (linmix convert)";
  } else {
    check_floats(st, path, "a checkpoint's tensors are floats (unless linmix convert wrote it)");
  }
  {  // the file must hold the parameters its config declares: a tiny file cannot make us allocate
    int64_t held = 0;
    for (const auto& [n, t] : st.tensors) held += t.numel();
    if (packed)
      for (const auto& [n, q] : packed->mats) held += q.rows * q.cols;
    LINMIX_CHECK(cfg.param_count() <= held, path + ": its config declares " + std::to_string(cfg.param_count()) +
                                                " parameters, the file holds " + std::to_string(held) + " numbers");
  }
  // step and adam_t: plain non-negative decimal integers ("-5" or "3abc" are refused)
  auto count = [&](const char* key) -> int64_t {
    if (!st.metadata.count(key)) return 0;
    const std::string& v = st.metadata.at(key);
    LINMIX_CHECK(!v.empty() && v.size() <= 15 && std::all_of(v.begin(), v.end(), [](char c) { return c >= '0' && c <= '9'; }),
                 path + ": malformed '" + key + "' in the checkpoint metadata: '" + v + "' (a non-negative integer)");
    return std::stoll(v);
  };
  ck.step = count("step");
  ck.opt.t = count("adam_t");
  ck.meta_json = st.metadata.count("run") ? st.metadata.at("run") : "{}";
  for (auto& [name, t] : ck.model->params()) {
    if (packed && packed->mats.count(name)) continue;
    auto it = st.tensors.find(name);
    LINMIX_CHECK(it != st.tensors.end(), path + ": missing tensor '" + name + "'");
    check_shape(name, it->second, t.shape);
    check_finite(name, it->second);
    t = std::move(it->second);
    for (const char* pre : {"opt.m.", "opt.v."}) {
      auto o = st.tensors.find(pre + name);
      if (o == st.tensors.end()) continue;
      check_shape(pre + name, o->second, t.shape);
      check_finite(pre + name, o->second);
      (std::string(pre) == "opt.m." ? ck.opt.m : ck.opt.v)[name] = std::move(o->second);
    }
  }
  if (packed) ck.model->set_packed(std::move(packed));
  return ck;
}

// ---------------------------------------------------------------- training

void clip_grad_norm(TensorMap& grads, double norm, double max_norm) {
  if (max_norm <= 0 || norm <= max_norm) return;
  for (auto& [n, t] : grads)
    for (float& x : t.data) x *= float(max_norm / norm);
}

double lr_at(const TrainOptions& o, int64_t step) {
  if (step < o.warmup) return o.lr * double(step + 1) / double(o.warmup);
  const double p = o.steps > o.warmup ? double(step - o.warmup) / double(o.steps - o.warmup) : 1.0;
  const double cosine = 0.5 * (1 + std::cos(3.14159265358979323846 * std::min(1.0, p)));
  return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * cosine);
}

namespace {
// The loss summed over the windows w of evaluate_split with w % size == rank, the count of
// positions scored and the bytes their targets stand for (bytes_of, Corpus's; empty: one byte a
// token): a rank's share of an evaluation split across ranks.
struct EvalShare {
  double total = 0;
  int64_t count = 0, bytes = 0;
};
EvalShare eval_share(Model& m, const std::vector<int32_t>& split, int64_t seq, int64_t max_windows, bool recurrent,
                     int rank, int size, const std::vector<int32_t>& bytes_of = {}) {
  const int64_t n = static_cast<int64_t>(split.size()) - 1;
  LINMIX_CHECK(n >= seq, "evaluation split shorter than one window of " + std::to_string(seq));
  const auto [windows, stride] = eval_windows(n + 1, seq, max_windows);  // spread evenly over the split
  double total = 0;
  int64_t count = 0, nbytes = 0;
  const int64_t V = m.config().vocab;
  std::vector<float> lg(V);
  for (int64_t w = rank; w < windows; w += size) {
    const int64_t p = w * stride;
    for (int64_t t = 1; t <= seq; ++t) nbytes += bytes_of.empty() ? 1 : bytes_of[size_t(split[p + t])];
    if (recurrent) {
      Model::State st = m.new_state();
      for (int64_t t = 0; t < seq; ++t) {
        m.step(split[p + t], st, lg.data());
        const float mx = *std::max_element(lg.begin(), lg.end());
        double z = 0;
        for (float x : lg) z += std::exp(double(x - mx));
        total += std::log(z) - double(lg[split[p + t + 1]] - mx);
        ++count;
      }
    } else {
      std::vector<int32_t> in(seq), tg(seq);
      for (int64_t t = 0; t < seq; ++t) in[t] = split[p + t], tg[t] = split[p + t + 1];
      int64_t c = 0;
      total += m.forward_backward(in.data(), tg.data(), 1, seq, nullptr, 1.0f, &c) * double(c);
      count += c;
    }
  }
  return {total, count, nbytes};
}
}  // namespace

double evaluate_split(Model& m, const std::vector<int32_t>& split, int64_t seq, int64_t max_windows, bool recurrent) {
  const EvalShare e = eval_share(m, split, seq, max_windows, recurrent, 0, 1);
  return e.total / double(e.count);
}

double evaluate_split(Engine& e, const std::vector<int32_t>& split, int64_t seq, int64_t max_windows) {
  const int64_t n = static_cast<int64_t>(split.size()) - 1;
  LINMIX_CHECK(n >= seq, "evaluation split shorter than one window of " + std::to_string(seq));
  const auto [windows, stride] = eval_windows(n + 1, seq, max_windows);  // spread evenly over the split
  const int64_t V = e.config().vocab;
  std::vector<float> lg(seq * V);
  std::vector<int32_t> in(seq);
  double total = 0;
  for (int64_t w = 0; w < windows; ++w) {
    const int64_t p = w * stride;
    for (int64_t t = 0; t < seq; ++t) in[t] = split[p + t];
    Model::State st = e.new_state();
    e.sequence(in.data(), seq, st, lg.data(), true);
    for (int64_t t = 0; t < seq; ++t) {
      const float* l = lg.data() + t * V;
      const float mx = *std::max_element(l, l + V);
      double z = 0;
      for (int64_t i = 0; i < V; ++i) z += std::exp(double(l[i] - mx));
      total += std::log(z) - double(l[split[p + t + 1]] - mx);
    }
  }
  return total / double(windows * seq);
}

namespace {

double grad_norm(const TensorMap& g) {
  double s = 0;
  for (const auto& [n, t] : g)
    for (float x : t.data) s += double(x) * x;
  return std::sqrt(s);
}

// Accuracy (argmax) and mean loss on the scored positions of a synthetic batch.
std::pair<double, double> task_metrics(Model& m, const Batch& b) {
  int64_t counted = 0;
  const double loss = m.forward_backward(b.inputs.data(), b.targets.data(), b.B, b.T, nullptr, 1.0f, &counted);
  const std::vector<float> lg = m.logits(b.inputs.data(), b.B, b.T);
  const int64_t V = m.config().vocab;
  int64_t right = 0, n = 0;
  for (int64_t i = 0; i < b.B * b.T; ++i) {
    if (b.targets[i] < 0) continue;
    const float* l = &lg[i * V];
    right += (std::max_element(l, l + V) - l) == b.targets[i];
    ++n;
  }
  return {n ? double(right) / double(n) : 0.0, loss};
}

}  // namespace

std::pair<double, double> evaluate_task(Model& m, const std::string& task, int64_t batch, int64_t T, int64_t pairs,
                                        int64_t batches, uint64_t seed) {
  LINMIX_CHECK(batch >= 1 && batches >= 1, "evaluation batch and batches must be >= 1");
  double acc = 0, loss = 0;
  for (int64_t i = 0; i < batches; ++i) {
    const auto [a, l] = task_metrics(m, synthetic_batch(task, batch, T, m.config().vocab, mix_seed(seed, 1u << 30, i), pairs));
    acc += a / double(batches), loss += l / double(batches);
  }
  return {acc, loss};
}

ClassEval evaluate_class(Model& m, const ClassTask& task, Split s, int64_t n, int64_t batch, int rank, int size) {
  LINMIX_CHECK(n >= 1 && n <= task.size(s), "the " + std::string(split_name(s)) + " split of " + task.name() + " has " +
                                                std::to_string(task.size(s)) + " examples, asked for " + std::to_string(n));
  LINMIX_CHECK(batch >= 1, "evaluation batch must be >= 1");
  ClassEval r;
  const int64_t K = m.config().classes;
  for (int64_t i0 = int64_t(rank) * batch; i0 < n; i0 += int64_t(size) * batch) {
    std::vector<int64_t> idx;
    for (int64_t i = i0; i < std::min(n, i0 + batch); ++i) idx.push_back(i);
    const ClassBatch b = class_batch(task, s, idx);
    std::vector<float> lg(b.B * K);
    r.loss_sum += m.classify(b.inputs.data(), b.lengths.data(), b.labels.data(), b.B, b.T, nullptr, 1.0f, lg.data()) *
                  double(b.B);
    for (int64_t j = 0; j < b.B; ++j) {
      const float* l = &lg[j * K];
      const bool ok = std::max_element(l, l + K) - l == b.labels[j];
      r.correct += ok, r.n += 1;
      r.lengths.push_back(b.lengths[j]), r.right.push_back(ok), r.labels.push_back(b.labels[j]);
    }
  }
  return r;
}

namespace {

std::string fmt_time(double s) {
  char buf[32];
  const int64_t t = static_cast<int64_t>(s);
  std::snprintf(buf, sizeof buf, "%lld:%02lld", static_cast<long long>(t / 60), static_cast<long long>(t % 60));
  return buf;
}

}  // namespace

namespace {

// --out: created if missing, a directory, writable (probed now, not at the first checkpoint).
void prepare_out(const std::string& out) {
  std::error_code ec;
  std::filesystem::create_directories(out, ec);
  LINMIX_CHECK(!ec || std::filesystem::is_directory(out), out + ": cannot create the run directory (" + ec.message() + ")");
  LINMIX_CHECK(std::filesystem::is_directory(out), out + ": --out must be a directory");
  const std::string probe = out + "/.linmix-write-test." + std::to_string(::getpid());
  {
    std::ofstream f(probe);
    LINMIX_CHECK(f.good() && (f << "x") && f.flush(), out + ": the run directory is not writable");
  }
  std::filesystem::remove(probe, ec);
}

bool same_file(const std::string& a, const std::string& b) {
  std::error_code e1, e2;
  const auto ca = std::filesystem::weakly_canonical(a, e1), cb = std::filesystem::weakly_canonical(b, e2);
  return !e1 && !e2 && ca == cb;
}

// On --resume: the run's stored arguments fill those not given; a given one that differs is
// refused (a run is continued as it was started). --steps may grow; the schedule stays the run's.
void merge_run_args(TrainOptions& o, const json& run, const std::string& ckpt) {
  auto take = [&](const char* key, auto& field) {
    if (!run.contains(key)) return;
    using T = std::decay_t<decltype(field)>;
    const T stored = run.at(key).get<T>();
    if (o.given.count(key) && !(field == stored)) {
      std::ostringstream a, b;
      a << field, b << stored;
      throw Error("--" + std::string(key) + " " + a.str() + " differs from the run's " + b.str() + " (" + ckpt +
                  "): resume with the run's arguments, or start a new run with --force");
    }
    field = stored;
  };
  take("data", o.data), take("task", o.task), take("mixer", o.mixer), take("seed", o.seed), take("batch", o.batch), take("seq", o.seq);
  take("pairs", o.pairs), take("tokenizer", o.tokenizer);
  take("accum", o.accum), take("lr", o.lr), take("warmup", o.warmup), take("weight_decay", o.weight_decay);
  take("clip", o.clip), take("min_lr_ratio", o.min_lr_ratio);
  if (run.contains("steps") && !o.given.count("steps")) o.steps = run.at("steps").get<int64_t>();
}

// The log keeps one record per step: those past the checkpoint being resumed are dropped.
void trim_log(const std::string& logp, int64_t upto) {
  std::ifstream f(logp);
  if (!f.good()) return;
  std::string line, kept;
  while (std::getline(f, line)) {
    try {
      const json r = json::parse(line);
      if (r.value("step", int64_t(0)) > upto) continue;
    } catch (const json::exception&) {
      continue;  // a record cut by a kill
    }
    kept += line + "\n";
  }
  write_file_atomic(logp, kept);
}

}  // namespace

TrainResult train(const TrainOptions& opts) {
  TrainOptions o = opts;
  LINMIX_CHECK(o.steps >= 1 && o.batch >= 1 && o.seq >= 2 && o.accum >= 1, "steps, batch, accum >= 1 and seq >= 2");
  LINMIX_CHECK(double(o.batch) * double(o.seq) <= double(1 << 24),
               "--batch x --seq = " + std::to_string(double(o.batch) * double(o.seq)) +
                   " tokens per micro-batch, more than 2^24 (use --accum for larger steps)");
  Comm* comm = o.comm;
  const int rank = comm ? comm->rank() : 0, nranks = comm ? comm->size() : 1;
  const bool root = rank == 0;
  LINMIX_CHECK(o.batch >= nranks, "--batch " + std::to_string(o.batch) + " is smaller than the " +
                                      std::to_string(nranks) + " ranks (each rank takes at least one sequence of a step's batch)");
  if (!root) o.quiet = true;
  if (root) prepare_out(o.out);
  const std::string ckpt = o.out + "/ckpt.safetensors", logp = o.out + "/log.jsonl";
  const bool has_run = std::filesystem::exists(ckpt) || std::filesystem::exists(logp);
  LINMIX_CHECK(o.resume || o.force || !has_run, o.out + " holds a run (ckpt.safetensors / log.jsonl): pass --resume to "
                                                        "continue it or --force to replace it");
  LINMIX_CHECK(!o.resume || std::filesystem::exists(ckpt), ckpt + ": no checkpoint to resume");
  std::unique_ptr<Model> model;
  AdamW opt;
  int64_t start = 0, schedule_steps = o.steps;
  // a classification task: its data (seq: the task's default unless given), and with --mixer
  // the default classifier around that mixer
  std::unique_ptr<ClassTask> ctask;
  const auto resolve_task = [&] {
    if (!is_class_task(o.task) || ctask) return;
    ctask = make_class_task(o.task, o.given.count("seq") || o.resume ? o.seq : 0);
    o.seq = ctask->seq();
    if (!o.mixer.empty())
      o.config = ModelConfig::for_classifier(o.mixer, ctask->vocab(), ctask->classes(), ctask->seq()).to_json();
  };
  if (o.resume) {
    Checkpoint ck = load_checkpoint(ckpt);
    json stored;
    try {
      stored = json::parse(ck.meta_json);
    } catch (const json::exception&) {
      throw Error(ckpt + ": malformed run arguments in the checkpoint metadata");
    }
    LINMIX_CHECK(stored.is_object(), ckpt + ": malformed run arguments in the checkpoint metadata");
    try {
      merge_run_args(o, stored, ckpt);
      schedule_steps = stored.contains("schedule_steps") ? stored.at("schedule_steps").get<int64_t>()
                                                         : stored.value("steps", o.steps);
    } catch (const json::exception& e) {
      throw Error(ckpt + ": malformed run arguments in the checkpoint metadata (" + e.what() + ")");
    }
    resolve_task();
    if (o.given.count("config") || o.given.count("mixer")) {
      const std::string want = ModelConfig::from_json(o.config).to_json();
      LINMIX_CHECK(want == ck.model->config().to_json(),
                   "the given model config differs from the run's (" + ckpt + "): resume without --config / --mixer, "
                   "or start a new run with --force");
    }
    model = std::move(ck.model);
    opt.m = std::move(ck.opt.m), opt.v = std::move(ck.opt.v), opt.t = ck.opt.t;
    start = ck.step;
    LINMIX_CHECK(start <= o.steps, "the run is at step " + std::to_string(start) + ", past --steps " +
                                        std::to_string(o.steps));
  }
  LINMIX_CHECK(o.data.empty() != o.task.empty(), "give exactly one of --data FILE or --task NAME");
  LINMIX_CHECK(o.task.empty() || o.task == "recall" || o.task == "copy" || is_class_task(o.task),
               "unknown task '" + o.task + "' (expected recall or copy (language model), listops, fmnist or order "
               "(classifier))");
  LINMIX_CHECK(o.pairs == 0 || o.task == "recall", "--pairs is the recall task's (--task recall)");
  resolve_task();
  LINMIX_CHECK(o.data.empty() || (!same_file(o.data, ckpt) && !same_file(o.data, logp)),
               "--data " + o.data + " is the run's own checkpoint or log");
  opt.lr = o.lr, opt.weight_decay = o.weight_decay;
  Checkpoint init_ck;  // fine-tuning: the checkpoint's model, a fresh optimizer
  if (!o.resume && !o.init.empty()) {
    LINMIX_CHECK(!o.given.count("config") && !o.given.count("mixer"),
                 "--init takes the model (and its config) from the checkpoint: drop --config / --mixer");
    init_ck = load_checkpoint(o.init);
    LINMIX_CHECK(!init_ck.model->packed(), o.init + ": its weights are stored converted for the inference engine "
                                                    "(linmix convert): fine-tune the FP32 checkpoint it came from");
  }
  // The text's tokenizer: --tokenizer, else the resumed run's or the --init checkpoint's, else bytes.
  std::unique_ptr<Tokenizer> tk;
  if (!o.task.empty()) {
    LINMIX_CHECK(o.tokenizer.empty(), "--tokenizer is for a text (--data), not --task " + o.task);
  } else {
    const std::string& named = init_ck.tokenizer;
    if (o.tokenizer.empty() && !named.empty() && named != "bytes" && named.rfind("task:", 0) != 0) {
      LINMIX_CHECK(std::filesystem::exists(named), o.init + " names its tokenizer " + named +
                                                       ", which is not there: pass --tokenizer FILE");
      o.tokenizer = named;
    }
    if (o.tokenizer.empty()) o.tokenizer = "bytes";
    if (o.tokenizer != "bytes") tk = Tokenizer::load(o.tokenizer);
  }
  if (init_ck.model) {
    model = std::move(init_ck.model);
  } else if (!o.resume) {
    ModelConfig c = ModelConfig::from_json(o.config);
    if (tk && !o.given.count("config")) c.vocab = tk->vocab_size();  // the default shape or --mixer: the tokenizer's ids
    model = std::make_unique<Model>(c);
    model->init(o.seed);
  }
  Corpus corpus;
  if (!o.data.empty()) {
    const int64_t V = model->config().vocab;
    LINMIX_CHECK(tk || V <= 256 || o.resume || o.given.count("tokenizer"),
                 "the model has " + std::to_string(V) + " tokens, not bytes: pass its --tokenizer (a tokenizer.json or "
                 "an RWKV World vocabulary), or --tokenizer bytes");
    LINMIX_CHECK(!tk || tk->vocab_size() <= V, "tokenizer " + o.tokenizer + " has " + std::to_string(tk->vocab_size()) +
                                                   " tokens, the model only " + std::to_string(V));
    LINMIX_CHECK(std::filesystem::is_regular_file(o.data), o.data + ": --data must be a readable file");
    corpus = Corpus::from_file(o.data, tk.get());
    for (const auto* part : {&corpus.train, &corpus.val})
      for (int32_t id : *part)
        LINMIX_CHECK(id >= 0 && id < V, o.data + ": token id " + std::to_string(id) + " (" + o.tokenizer +
                                            ") is past the model's vocabulary of " + std::to_string(V));
  }
  TrainOptions sched = o;  // the learning-rate schedule of the run as it was started
  sched.steps = schedule_steps;
  const json run = {{"data", o.data},   {"task", o.task}, {"mixer", o.mixer}, {"seed", o.seed},   {"steps", o.steps},
                    {"batch", o.batch}, {"seq", o.seq},   {"accum", o.accum}, {"lr", o.lr},
                    {"warmup", o.warmup}, {"weight_decay", o.weight_decay}, {"clip", o.clip},
                    {"min_lr_ratio", o.min_lr_ratio}, {"schedule_steps", schedule_steps}, {"init", o.init},
                    {"pairs", o.pairs}, {"tokenizer", o.tokenizer}};
  if (comm) comm->barrier();  // every rank has read the run before rank 0 writes to it
  if (o.resume && root) trim_log(logp, start);
  const ModelConfig& cfg = model->config();
  if (ctask) {
    LINMIX_CHECK(cfg.classifier() && cfg.classes == ctask->classes() && cfg.vocab >= ctask->vocab(),
                 "task " + o.task + " needs a classifier of " + std::to_string(ctask->classes()) + " classes over " +
                     std::to_string(ctask->vocab()) + " tokens (\"classes\": " + std::to_string(ctask->classes()) +
                     ", \"vocab\": " + std::to_string(ctask->vocab()) + "); the model has classes " +
                     std::to_string(cfg.classes) + ", vocab " + std::to_string(cfg.vocab) + " (--mixer NAME builds one)");
    LINMIX_CHECK(!cfg.uses_pos_emb() || o.seq + cfg.cls_rows() <= cfg.ctx,
                 "task " + o.task + ": sequences of " + std::to_string(o.seq + cfg.cls_rows()) +
                     " positions, longer than the model's ctx " + std::to_string(cfg.ctx));
  } else {
    LINMIX_CHECK(!cfg.classifier(), "the model is a classifier: train it on a classification task (--task listops | "
                                    "fmnist | order)");
  }
  LINMIX_CHECK(o.seq <= cfg.ctx || [&] {
    for (const auto& l : cfg.layers)
      if (l.mixer == "aft_full" || l.mixer == "aft_local") return false;
    return true;
  }(), "seq " + std::to_string(o.seq) + " exceeds the model's ctx " + std::to_string(cfg.ctx) + " (aft_full/aft_local)");
  if (o.task == "recall" || o.task == "copy") synthetic_batch(o.task, 1, o.seq, cfg.vocab, 0, o.pairs);  // its checks
  std::ofstream log;
  if (root) log.open(logp, o.resume ? std::ios::app : std::ios::trunc);
  const bool tty = !o.quiet && isatty(STDERR_FILENO);
  if (!o.quiet)
    std::fprintf(stderr, "linmix train: %lld parameters, %s%s, %s; steps %lld..%lld, batch %lld x %lld x %lld\n",
                 static_cast<long long>(model->num_params()), cfg.layers[0].mixer.c_str(),
                 !cfg.classifier() ? ""
                 : cfg.causal      ? " (a causal classifier: the mixer reads left to right, it has no non-causal form)"
                                   : " (encoder classifier, non-causal)",
                 o.task.empty() ? o.data.c_str() : ("task " + o.task).c_str(), static_cast<long long>(start),
                 static_cast<long long>(o.steps), static_cast<long long>(o.accum), static_cast<long long>(o.batch),
                 static_cast<long long>(o.seq));
  TrainResult res;
  const auto t0 = std::chrono::steady_clock::now();
  auto elapsed = [&] { return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(); };
  auto evaluate = [&](json& rec) {
    if (o.task.empty()) {  // the windows split across the ranks, the sums reduced
      const EvalShare e = eval_share(*model, corpus.val, o.seq, o.eval_batches * o.batch, false, rank, nranks,
                                     corpus.bytes_of);
      double sums[3] = {e.total, double(e.count), double(e.bytes)};
      if (comm) comm->allreduce_sum(sums, 3);
      res.val_loss = sums[0] / sums[1];                        // nats per token
      res.val_bpc = sums[0] / sums[2] / std::log(2.0);         // bits per byte of text
      rec["val_loss"] = res.val_loss, rec["val_bpc"] = res.val_bpc;
    } else if (ctask) {  // the validation split's first eval_batches x batch examples, split across the ranks
      const ClassEval e = evaluate_class(*model, *ctask, Split::Val, std::min(ctask->size(Split::Val), o.eval_batches * o.batch),
                                         o.batch, rank, nranks);
      double sums[3] = {double(e.correct), e.loss_sum, double(e.n)};
      if (comm) comm->allreduce_sum(sums, 3);
      res.val_acc = sums[0] / sums[2], res.val_loss = sums[1] / sums[2];
      rec["val_loss"] = res.val_loss, rec["val_acc"] = res.val_acc;
    } else {
      double sums[2] = {0, 0};  // accuracy, loss: the means over eval batches, split across the ranks
      for (int64_t i = rank; i < o.eval_batches; i += nranks) {
        const auto [a, l] = task_metrics(*model, synthetic_batch(o.task, o.batch, o.seq, cfg.vocab, mix_seed(o.seed, 1u << 30, i), o.pairs));
        sums[0] += a / double(o.eval_batches), sums[1] += l / double(o.eval_batches);
      }
      if (comm) comm->allreduce_sum(sums, 2);
      const double acc = sums[0], loss = sums[1];
      res.val_acc = acc, res.val_loss = loss;
      rec["val_loss"] = loss, rec["val_acc"] = acc;
    }
  };
  int64_t tokens = 0, step = start;
  std::vector<float> flat;  // the gradients of every rank, one buffer (one allreduce per step)
  res.ranks = nranks;
  profile::set_enabled(o.profile);
  profile::reset();
  for (; step < o.steps; ++step) {
    std::optional<profile::Scope> prof_step(std::in_place, "step");
    TensorMap grads;
    double loss = 0, real = 0;  // real: a classifier batch's own tokens (not its padding), this rank's rows
    // a non-finite activation in a forward: the run diverged
    const auto diverged = [&](const Error& e) {
      if (std::string(e.what()).find("finite") == std::string::npos) throw e;
      throw Error("training diverged: loss is NaN/inf at step " + std::to_string(step + 1) + " (" + e.what() +
                  "); the last checkpoint is kept in " + o.out);
    };
    for (int64_t a = 0; a < o.accum; ++a) {  // the batch of a step depends only on (seed, step, a)
      const uint64_t s = mix_seed(o.seed, static_cast<uint64_t>(step), static_cast<uint64_t>(a));
      if (ctask) {  // B training examples drawn uniformly; this rank's rows, weighted by their share
        std::mt19937_64 rng(s);
        std::uniform_int_distribution<int64_t> pick(0, ctask->size(Split::Train) - 1);
        std::vector<int64_t> idx(static_cast<size_t>(o.batch));
        for (auto& i : idx) i = pick(rng);
        const int64_t r0 = o.batch * rank / nranks, r1 = o.batch * (rank + 1) / nranks;
        const ClassBatch b = class_batch(*ctask, Split::Train, std::vector<int64_t>(idx.begin() + r0, idx.begin() + r1));
        const double share = double(r1 - r0) / double(o.batch);
        const DropoutArmed drop(*model, s, r0);
        try {
          loss += model->classify(b.inputs.data(), b.lengths.data(), b.labels.data(), b.B, b.T, &grads,
                                  float(share) / float(o.accum)) *
                  share / double(o.accum);
        } catch (const Error& e) {
          diverged(e);
        }
        for (int32_t l : b.lengths) real += l;
        continue;
      }
      std::optional<profile::Scope> prof_batch(std::in_place, "batch");
      const Batch b = o.task.empty() ? corpus_batch(corpus.train, o.batch, o.seq, s)
                                     : synthetic_batch(o.task, o.batch, o.seq, cfg.vocab, s, o.pairs);
      prof_batch.reset();
      // this rank's rows, weighted by its share of the batch's scored positions: the ranks' weighted
      // mean gradients sum to the gradient of the whole batch's mean loss (exactly, for any split)
      const int64_t r0 = b.B * rank / nranks, r1 = b.B * (rank + 1) / nranks;
      const auto scored = [&](int64_t i0, int64_t i1) {
        return std::count_if(b.targets.begin() + i0 * b.T, b.targets.begin() + i1 * b.T, [](int32_t x) { return x >= 0; });
      };
      const double share = nranks == 1 ? 1.0 : double(scored(r0, r1)) / double(std::max<int64_t>(1, scored(0, b.B)));
      const DropoutArmed drop(*model, s, r0);
      try {
        if (share > 0)
          loss += model->forward_backward(&b.inputs[r0 * b.T], &b.targets[r0 * b.T], r1 - r0, b.T, &grads,
                                          float(share) / float(o.accum)) *
                  share / double(o.accum);
      } catch (const Error& e) {
        diverged(e);
      }
      tokens += b.B * b.T;
    }
    if (comm) {  // sum the ranks' gradients and losses
      const auto c0 = std::chrono::steady_clock::now();
      int64_t n = 0;
      for (const auto& [name, g] : grads) n += g.numel();
      if (flat.empty()) {  // the first step: every rank holds gradients of the same size?
        double sizes[2] = {double(n), double(n) * double(n)};
        comm->allreduce_sum(sizes, 2);
        LINMIX_CHECK(sizes[0] == double(n) * nranks && sizes[1] == double(n) * double(n) * nranks,
                     "the ranks' gradients differ in size: every rank must run the same model");
      }
      flat.resize(static_cast<size_t>(n));
      int64_t at = 0;
      for (const auto& [name, g] : grads) std::copy(g.data.begin(), g.data.end(), flat.begin() + at), at += g.numel();
      comm->allreduce_sum(flat.data(), n);
      at = 0;
      for (auto& [name, g] : grads) std::copy(flat.begin() + at, flat.begin() + at + g.numel(), g.data.begin()), at += g.numel();
      double sums[2] = {loss, real};  // the classifier's tokens travel with the loss: no extra collective
      comm->allreduce_sum(sums, 2);
      loss = sums[0], real = sums[1];
      res.allreduce_s += std::chrono::duration<double>(std::chrono::steady_clock::now() - c0).count();
    }
    tokens += int64_t(real);
    std::optional<profile::Scope> prof_opt(std::in_place, "gradient norm, clip, AdamW");
    const double gn = grad_norm(grads);
    LINMIX_CHECK(std::isfinite(loss) && std::isfinite(gn), "training diverged: loss is NaN/inf at step " +
                                                               std::to_string(step + 1) + " (loss " + std::to_string(loss) +
                                                               ", gradient norm " + std::to_string(gn) +
                                                               "); the last checkpoint is kept in " + o.out);
    clip_grad_norm(grads, gn, o.clip);
    const double lr = lr_at(sched, step);
    opt.step(model->params(), grads, lr);
    prof_opt.reset();
    prof_step.reset();
    res.train_loss = loss;
    res.losses.push_back({step + 1, loss});
    const double secs = elapsed();
    res.tokens_per_s = double(tokens) / std::max(secs, 1e-9);
    json rec = {{"step", step + 1}, {"loss", loss}, {"lr", lr}, {"grad_norm", gn}, {"tok_s", res.tokens_per_s},
                {"time_s", secs}};
    bool last = step + 1 == o.steps;
    if (o.time_budget_s > 0) {  // every rank stops at the same step: when any has spent the budget
      double over = secs >= o.time_budget_s ? 1.0 : 0.0;
      if (comm) comm->allreduce_sum(&over, 1);
      last = last || over > 0;
    }
    if (comm) rec["allreduce_s"] = res.allreduce_s;
    const bool do_eval = (o.eval_every > 0 && (step + 1) % o.eval_every == 0) || last;
    if (do_eval) {
      const profile::Scope prof("evaluation");
      evaluate(rec);
    }
    if (root) log << rec.dump() << "\n" << std::flush;
    if (!o.quiet) {
      const double eta = double(o.steps - step - 1) * secs / double(step + 1 - start);
      if (tty) {
        const int width = 24, fill = int(width * double(step + 1) / double(o.steps));
        std::fprintf(stderr, "\r[%s%s] step %lld/%lld loss %.4f | %.0f tok/s | ETA %s ", std::string(fill, '#').c_str(),
                     std::string(width - fill, '.').c_str(), static_cast<long long>(step + 1),
                     static_cast<long long>(o.steps), loss, res.tokens_per_s, fmt_time(eta).c_str());
        if (do_eval) std::fprintf(stderr, "\n");
      }
      if (do_eval || (!tty && (step + 1) % 10 == 0)) {
        std::fprintf(stderr, "step %lld/%lld loss %.4f lr %.2e %.0f tok/s", static_cast<long long>(step + 1),
                     static_cast<long long>(o.steps), loss, lr, res.tokens_per_s);
        if (do_eval && o.task.empty()) std::fprintf(stderr, " | val loss %.4f bpc %.4f", res.val_loss, res.val_bpc);
        if (do_eval && !o.task.empty()) std::fprintf(stderr, " | val acc %.4f", res.val_acc);
        std::fprintf(stderr, "\n");
      }
    }
    if ((o.ckpt_every > 0 && (step + 1) % o.ckpt_every == 0) || last) {
      if (comm) {  // the ranks applied the same steps; make them bit-equal to what rank 0 saves
        for (auto* group : {&model->params(), &opt.m, &opt.v})
          for (auto& [name, t] : *group) comm->broadcast(t.ptr(), t.numel());
      }
      const profile::Scope prof("checkpoint");
      if (root) save_checkpoint(ckpt, *model, opt, step + 1, run.dump(), o.task.empty() ? o.tokenizer : "task:" + o.task);
    }
    if (last) {
      ++step;
      break;
    }
  }
  res.steps_done = step;
  res.seconds = elapsed();
  res.profile = profile::rows();
  profile::set_enabled(false);
  return res;
}

// ---------------------------------------------------------------- sampling

void SampleOptions::validate() const {
  LINMIX_CHECK(std::isfinite(temperature) && temperature >= 0,
               "--temperature must be a finite number >= 0 (0 = greedy), found " + std::to_string(temperature));
  LINMIX_CHECK(std::isfinite(top_p) && top_p > 0 && top_p <= 1, "--top-p must be in (0, 1], found " + std::to_string(top_p));
  LINMIX_CHECK(top_k >= 0, "--top-k must be >= 0 (0 = all)");
}

int32_t sample_token(const float* logits, int64_t V, const SampleOptions& o, std::mt19937_64& rng) {
  if (o.temperature <= 0) return int32_t(std::max_element(logits, logits + V) - logits);
  std::vector<std::pair<float, int32_t>> p(V);
  const float mx = *std::max_element(logits, logits + V);
  double z = 0;
  for (int64_t i = 0; i < V; ++i) {
    p[i] = {float(std::exp(double(logits[i] - mx) / o.temperature)), int32_t(i)};
    z += p[i].first;
  }
  std::sort(p.begin(), p.end(), [](auto& a, auto& b) { return a.first > b.first; });
  int64_t keep = o.top_k > 0 ? std::min<int64_t>(o.top_k, V) : V;
  double cum = 0;
  for (int64_t i = 0; i < keep; ++i) {  // nucleus: the smallest prefix with mass >= top_p
    cum += p[i].first / z;
    if (cum >= o.top_p) {
      keep = i + 1;
      break;
    }
  }
  double mass = 0;
  for (int64_t i = 0; i < keep; ++i) mass += p[i].first;
  std::uniform_real_distribution<double> u(0.0, mass);
  double r = u(rng);
  for (int64_t i = 0; i < keep; ++i) {
    r -= p[i].first;
    if (r <= 0) return p[i].second;
  }
  return p[keep - 1].second;
}

}  // namespace linmix
