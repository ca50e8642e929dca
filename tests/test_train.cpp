// Training: it learns, a resumed run equals an uninterrupted one, checkpoints are refused when
// truncated or corrupted, a run killed while writing a checkpoint leaves the previous one
// intact, and the synthetic tasks are well formed.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <map>
#include <fstream>

#include "linmix/generate.h"
#include "linmix/safetensors.h"
#include "linmix/tokenizer.h"
#include "linmix/train.h"
#include "test_util.h"

using namespace linmix;

namespace {

// A tiny corpus with structure: repeated words over a small alphabet.
std::string tiny_corpus() {
  std::string s;
  const char* words[] = {"the cat ", "sat on ", "the mat ", "and the ", "dog ran ", "far away. "};
  uint64_t x = 1;
  for (int i = 0; i < 3000; ++i) {
    x = x * 6364136223846793005ull + 1442695040888963407ull;
    s += words[(x >> 33) % 6];
  }
  return s;
}

std::string write_corpus(const std::string& dir) {
  const std::string p = dir + "/corpus.txt";
  std::ofstream(p) << tiny_corpus();
  return p;
}

TrainOptions small(const std::string& dir, const std::string& data) {
  TrainOptions o;
  o.data = data;
  o.out = dir + "/run";
  o.config = R"({"mixer": "rwkv4", "channel_mix": "rwkv", "d_model": 32, "n_layer": 2, "n_head": 2, "ctx": 64})";
  o.steps = 60, o.batch = 8, o.seq = 32, o.warmup = 5, o.eval_every = 20, o.ckpt_every = 20, o.lr = 1e-2;
  o.quiet = true;
  return o;
}

// Entropy of the corpus' byte distribution (bits): what a model that ignores context reaches.
double unigram_bits(const std::string& s) {
  double cnt[256] = {};
  for (unsigned char c : s) cnt[c] += 1;
  double h = 0;
  for (double c : cnt)
    if (c > 0) h -= c / double(s.size()) * std::log2(c / double(s.size()));
  return h;
}

TEST(Train, LearnsWellBelowUnigramEntropy) {
  const std::string dir = test::tmp_dir();
  const TrainResult r = train(small(dir, write_corpus(dir)));
  const double h = unigram_bits(tiny_corpus());
  EXPECT_LT(r.val_bpc, 0.6 * h) << "unigram entropy " << h << " bits";
  // the first losses are near ln(256): a fresh model knows nothing
  EXPECT_GT(r.losses.front().second, 4.0);
}

TEST(Train, ResumeEqualsUninterrupted) {
  const std::string dir = test::tmp_dir();
  const std::string data = write_corpus(dir);
  TrainOptions whole = small(dir + "/a", data);
  std::filesystem::create_directories(dir + "/a");
  const TrainResult full = train(whole);
  TrainOptions first = small(dir + "/b", data);
  std::filesystem::create_directories(dir + "/b");
  {
    // The same 60-step run, interrupted: a time budget that ends it (with a checkpoint) after
    // its first step.
    TrainOptions part = first;
    part.time_budget_s = 1e-9;
    ASSERT_EQ(train(part).steps_done, 1);
  }
  TrainOptions rest = first;
  rest.resume = true;
  const TrainResult resumed = train(rest);
  ASSERT_EQ(resumed.losses.back().first, full.losses.back().first);
  // the resumed run's losses (steps 2..60) equal the uninterrupted run's, bit for bit
  for (const auto& [step, loss] : resumed.losses) EXPECT_EQ(loss, full.losses[step - 1].second) << "step " << step;
  EXPECT_EQ(resumed.val_loss, full.val_loss);
}

// An RWKV World vocabulary file (every byte, then tiny_corpus's words) of 266 tokens: more than
// bytes, so a model of it is not a byte model.
std::string write_vocab(const std::string& dir) {
  const std::string p = dir + "/vocab.txt";
  std::ofstream f(p);
  char hex[8];
  for (int b = 0; b < 256; ++b) std::snprintf(hex, sizeof hex, "\\x%02x", b), f << b + 1 << " b'" << hex << "' 1\n";
  int id = 257;
  for (const char* w : {"the ", "cat ", "sat ", "on ", "mat ", "and ", "dog ", "ran ", "far ", "away. "})
    f << id++ << " '" << w << "' " << std::strlen(w) << "\n";
  return p;
}

TEST(Train, TextOfATokenizerTrainsAndFineTunesWithIt) {
  const std::string dir = test::tmp_dir();
  const std::string data = write_corpus(dir), vocab = write_vocab(dir);
  TrainOptions o = small(dir, data);
  o.tokenizer = vocab, o.steps = 30, o.seq = 16;
  const TrainResult r = train(o);
  Checkpoint ck = load_checkpoint(o.out + "/ckpt.safetensors");
  EXPECT_EQ(ck.tokenizer, vocab);                  // generate / eval find it
  EXPECT_EQ(ck.model->config().vocab, 267);        // the default shape took the tokenizer's ids
  // val_bpc is bits per byte of text: linmix eval's path (its own tokenizing of the validation
  // half, its own byte count of the scored targets) gives the same number
  std::ifstream f(data, std::ios::binary);
  std::vector<uint8_t> bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  const EvalResult e = evaluate_file(*ck.model, split_text(bytes).second, vocab, "parallel", "f32", o.seq,
                                     o.eval_batches * o.batch);
  EXPECT_NEAR(r.val_loss, e.loss, 1e-6);
  EXPECT_NEAR(r.val_bpc, e.bits_per_byte, 1e-6);
  EXPECT_LT(e.tokens * 3, e.bytes);  // words, not bytes: a token stands for several bytes
  // fine-tuning takes the checkpoint's tokenizer without being told
  TrainOptions ft = small(dir + "/ft", data);
  ft.init = o.out + "/ckpt.safetensors", ft.steps = 2, ft.seq = 16;
  train(ft);
  EXPECT_EQ(load_checkpoint(ft.out + "/ckpt.safetensors").tokenizer, vocab);
  // a model of more ids than bytes whose checkpoint names no tokenizer: refused, not trained on bytes
  save_checkpoint(dir + "/anon.safetensors", *ck.model, AdamW{}, 0, "{}", "");
  ft.init = dir + "/anon.safetensors", ft.force = true;
  try {
    train(ft);
    FAIL() << "a 267-token model trained on bytes";
  } catch (const Error& err) {
    EXPECT_NE(std::string(err.what()).find("not bytes: pass its --tokenizer"), std::string::npos) << err.what();
  }
  // a tokenizer the checkpoint names but that is gone: refused by name
  std::filesystem::rename(vocab, vocab + ".moved");
  ft.init = o.out + "/ckpt.safetensors";
  try {
    train(ft);
    FAIL() << "trained without its tokenizer";
  } catch (const Error& err) {
    EXPECT_NE(std::string(err.what()).find("which is not there"), std::string::npos) << err.what();
  }
}

TEST(Train, SplitTextCutsBetweenCharacters) {
  // 90% of 100 bytes is byte 90: inside a 4-byte character there, the cut moves past it
  std::string s(88, 'a');
  s += "\xF0\x9F\x98\x80";  // U+1F600 at bytes 88..91
  s += std::string(8, 'b');
  const auto [train_part, val_part] = split_text(std::vector<uint8_t>(s.begin(), s.end()));
  EXPECT_EQ(train_part.size(), 92u);
  EXPECT_EQ(val_part.size(), 8u);
  const std::string ascii(100, 'c');  // a cut between characters stays at 90%
  EXPECT_EQ(split_text(std::vector<uint8_t>(ascii.begin(), ascii.end())).first.size(), 90u);
}

TEST(Train, RefusesTruncatedOrCorruptCheckpoints) {
  const std::string dir = test::tmp_dir();
  TrainOptions o = small(dir, write_corpus(dir));
  o.steps = 2;
  train(o);
  const std::string ck = o.out + "/ckpt.safetensors";
  EXPECT_NO_THROW(load_checkpoint(ck));
  std::ifstream f(ck, std::ios::binary);
  std::string bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  auto expect_refused = [&](const std::string& content, const std::string& needle) {
    const std::string p = dir + "/bad.safetensors";
    std::ofstream(p, std::ios::binary) << content;
    try {
      load_checkpoint(p);
      FAIL() << "accepted: " << needle;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  expect_refused(bytes.substr(0, bytes.size() / 2), "out of range");
  expect_refused(bytes.substr(0, 4), "truncated");
  // flip the header's config: a tensor no longer matches its shape
  std::string wrong = bytes;
  const size_t at = wrong.find("\\\"d_model\\\":32");
  ASSERT_NE(at, std::string::npos);
  wrong.replace(at, 14, "\\\"d_model\\\":16");
  expect_refused(wrong, "expected shape");
  // a NaN written into a weight
  SafeTensors st = read_safetensors(ck);
  st.tensors["head.weight"].data[5] = std::nanf("");
  expect_refused(serialize_safetensors(st.tensors, st.metadata), "tensor 'head.weight': element 5 is NaN");
  st = read_safetensors(ck);
  st.tensors.erase("ln_out.bias");
  expect_refused(serialize_safetensors(st.tensors, st.metadata), "missing tensor 'ln_out.bias'");
  // without linmix's metadata it is read as a plain RWKV-4 file, which needs ln0
  expect_refused(serialize_safetensors(st.tensors, {}), "RWKV-4 checkpoint: no tensor 'blocks.0.ln0.");
  st.tensors.erase("blocks.0.att.time_decay");
  expect_refused(serialize_safetensors(st.tensors, {}), "RWKV-4 checkpoint: no tensor 'blocks.0.att.time_decay'");
  st.tensors.erase("emb.weight");
  expect_refused(serialize_safetensors(st.tensors, {}), "nor an RWKV or Mamba checkpoint");
}

TEST(Train, KilledMidCheckpointLeavesThePreviousIntact) {
  const std::string dir = test::tmp_dir();
  TrainOptions o = small(dir, write_corpus(dir));
  o.steps = 2;
  train(o);
  const std::string ck = o.out + "/ckpt.safetensors";
  std::ifstream f(ck, std::ios::binary);
  const std::string before((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  // A child writes a large checkpoint over the same path and is killed while writing.
  const pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    TensorMap big;
    big["x"] = Tensor({64, 1024, 1024}, 1.0f);  // 256 MiB: the write takes a while
    write_safetensors(ck, big);
    _exit(0);
  }
  // killed the moment its temporary file appears: certain to be mid-write (the 256 MiB copy and
  // fsync take tens of milliseconds before the rename; the poll sees the file within microseconds)
  const std::string tmp = ck + ".tmp." + std::to_string(pid);
  bool seen = false;
  for (int i = 0; i < 20000000 && !seen; ++i) seen = std::filesystem::exists(tmp);
  kill(pid, SIGKILL);
  int status = 0;
  waitpid(pid, &status, 0);
  ASSERT_TRUE(seen) << "the writer never created its temporary file";
  ASSERT_TRUE(WIFSIGNALED(status)) << "the writer finished before the kill";
  std::ifstream g(ck, std::ios::binary);
  const std::string after((std::istreambuf_iterator<char>(g)), std::istreambuf_iterator<char>());
  EXPECT_EQ(after, before) << "the checkpoint changed although its writer was killed mid-write";
  EXPECT_NO_THROW(load_checkpoint(ck));
  for (auto& e : std::filesystem::directory_iterator(o.out))  // leftovers of the killed writer
    if (e.path().string().find(".tmp.") != std::string::npos) std::filesystem::remove(e.path());
}

TEST(Train, SyntheticTasksAreWellFormed) {
  const Batch c = synthetic_batch("copy", 3, 21, 32, 5);
  for (int64_t i = 0; i < 3; ++i) {
    const int32_t* in = &c.inputs[i * 21];
    const int32_t* tg = &c.targets[i * 21];
    EXPECT_EQ(in[10], 1);  // separator after n = 10 tokens
    for (int64_t t = 10; t < 20; ++t) EXPECT_EQ(tg[t], in[t - 10]) << t;  // predicts the copy
  }
  const Batch r = synthetic_batch("recall", 2, 32, 64, 9);
  for (int64_t i = 0; i < 2; ++i) {
    std::map<int32_t, int32_t> kv;
    const int32_t* in = &r.inputs[i * 32];
    for (int64_t t = 0; t + 1 < 16; t += 2) kv[in[t]] = in[t + 1];  // 8 pairs
    int scored = 0;
    for (int64_t t = 16; t < 32; ++t)
      if (r.targets[i * 32 + t] >= 0) {
        ASSERT_TRUE(kv.count(in[t])) << "a scored query must be a key";
        EXPECT_EQ(r.targets[i * 32 + t], kv[in[t]]);
        ++scored;
      }
    EXPECT_GE(scored, 7);
  }
  EXPECT_THROW(synthetic_batch("nosuch", 1, 16, 32, 1), Error);
}

}  // namespace

// AdamW (Loshchilov & Hutter 2019, Algorithm 2) against a plain float64 update written from the
// paper: bias-corrected moments, decoupled weight decay on matrices only, three steps.
TEST(Train, AdamWEqualsAReferenceUpdate) {
  std::mt19937_64 rng(3);
  std::normal_distribution<float> n;
  TensorMap params{{"blocks.0.att.q.weight", Tensor({3, 4})}, {"blocks.0.ln1.bias", Tensor({4})}};
  for (auto& [k, t] : params)
    for (float& x : t.data) x = n(rng);
  AdamW opt;
  opt.weight_decay = 0.3;
  std::map<std::string, std::vector<double>> p, m, v;
  for (auto& [k, t] : params) p[k].assign(t.data.begin(), t.data.end()), m[k].assign(t.numel(), 0), v[k].assign(t.numel(), 0);
  for (int step = 1; step <= 3; ++step) {
    TensorMap grads;
    for (auto& [k, t] : params) {
      grads[k] = Tensor(t.shape);
      for (float& x : grads[k].data) x = n(rng);
    }
    const double lr = 0.01 * step;
    opt.step(params, grads, lr);
    for (auto& [k, t] : params) {
      const bool decay = t.rank() >= 2;
      for (int64_t i = 0; i < t.numel(); ++i) {
        const double g = grads[k].data[i];
        m[k][i] = 0.9 * m[k][i] + 0.1 * g;
        v[k][i] = 0.95 * v[k][i] + 0.05 * g * g;
        const double mh = m[k][i] / (1 - std::pow(0.9, step)), vh = v[k][i] / (1 - std::pow(0.95, step));
        p[k][i] -= lr * (mh / (std::sqrt(vh) + 1e-8) + (decay ? 0.3 * p[k][i] : 0.0));
        EXPECT_NEAR(t.data[i], p[k][i], 1e-5) << k << " step " << step;
      }
    }
  }
}

// Sampling: greedy is the argmax; top-k keeps the k most likely; top-p the smallest prefix of
// mass >= p; temperature sharpens or flattens the distribution (frequencies over 20000 draws
// within 5 sigma of the softmax probabilities).
TEST(Train, SamplingOptions) {
  const std::vector<float> lg = {2.0f, 1.0f, 0.5f, -1.0f, 0.0f};
  std::mt19937_64 rng(9);
  SampleOptions o;
  o.temperature = 0;
  EXPECT_EQ(sample_token(lg.data(), 5, o, rng), 0);
  auto freq = [&](const SampleOptions& so) {
    std::vector<double> f(5, 0);
    for (int i = 0; i < 20000; ++i) f[size_t(sample_token(lg.data(), 5, so, rng))] += 1.0 / 20000;
    return f;
  };
  auto probs = [&](double T, int64_t keep) {  // softmax(lg / T) over the `keep` most likely
    std::vector<double> p(5, 0);
    const std::vector<int> order = {0, 1, 2, 4, 3};
    double z = 0;
    for (int j = 0; j < keep; ++j) z += std::exp(lg[order[j]] / T);
    for (int j = 0; j < keep; ++j) p[order[j]] = std::exp(lg[order[j]] / T) / z;
    return p;
  };
  for (auto [T, k, top_p, keep] : std::vector<std::tuple<double, int64_t, double, int64_t>>{
           {1.0, 0, 1.0, 5}, {0.5, 0, 1.0, 5}, {2.0, 0, 1.0, 5}, {1.0, 2, 1.0, 2}, {1.0, 0, 0.8, 3}, {1.0, 3, 0.5, 1}}) {
    SampleOptions so;
    so.temperature = T, so.top_k = k, so.top_p = top_p;
    const auto f = freq(so), p = probs(T, keep);
    for (int i = 0; i < 5; ++i)
      EXPECT_NEAR(f[i], p[i], 5 * std::sqrt(p[i] * (1 - p[i]) / 20000) + 1e-9)
          << "T " << T << " top_k " << k << " top_p " << top_p << " token " << i;
  }
}

// Gradient accumulation as train() does it (--accum): two micro-batches at grad_scale 1/2, added
// into the same gradients, equal one batch holding both (each with as many scored targets).
TEST(Train, AccumulatedMicroBatchesEqualOneBatch) {
  Model m(ModelConfig::from_json(R"({"vocab": 20, "d_model": 8, "n_layer": 2, "n_head": 2, "ctx": 8, "mixer": "linear"})"));
  m.init(2);
  std::mt19937_64 rng(4);
  std::vector<int32_t> in(2 * 6), tg(2 * 6);
  for (auto& x : in) x = int32_t(rng() % 20);
  for (auto& x : tg) x = int32_t(rng() % 20);
  TensorMap acc, whole;
  m.forward_backward(in.data(), tg.data(), 1, 6, &acc, 0.5f);
  m.forward_backward(in.data() + 6, tg.data() + 6, 1, 6, &acc, 0.5f);
  m.forward_backward(in.data(), tg.data(), 2, 6, &whole, 1.0f);
  ASSERT_EQ(acc.size(), whole.size());
  for (const auto& [n, t] : whole)
    for (int64_t i = 0; i < t.numel(); ++i)
      EXPECT_NEAR(acc.at(n).data[i], t.data[i], 1e-6 + 1e-4 * std::fabs(t.data[i])) << n << " " << i;
}

// --clip: the global norm is brought down to the bound, directions kept; under it nothing changes.
TEST(Train, ClipGradNorm) {
  TensorMap g{{"a", Tensor({2}, 3.0f)}, {"b", Tensor({1}, 4.0f)}};  // norm sqrt(9 + 9 + 16) = sqrt(34)
  const double norm = std::sqrt(34.0);
  TensorMap same = g;
  clip_grad_norm(same, norm, 10.0);
  EXPECT_EQ(same.at("a").data, g.at("a").data);
  clip_grad_norm(g, norm, 1.0);
  double n2 = 0;
  for (const auto& [k, t] : g)
    for (float x : t.data) n2 += double(x) * x;
  EXPECT_NEAR(std::sqrt(n2), 1.0, 1e-6);
  EXPECT_NEAR(g.at("a").data[0] / g.at("b").data[0], 3.0 / 4.0, 1e-6);
  clip_grad_norm(g, 1.0, 0.0);  // 0 = off
  EXPECT_NEAR(g.at("b").data[0], 4.0 / norm, 1e-6);
}

// --profile: the rows nest (every row's parent was recorded, and a parent's time covers its
// children's), each layer is its own mixer's row, called once per layer per step, with its
// GEMMs and mechanism under it; off, nothing is recorded.
TEST(Train, ProfileRowsNestAndCountEveryLayer) {
  const std::string dir = test::tmp_dir();
  TrainOptions o = small(dir, write_corpus(dir));
  o.steps = 3, o.eval_every = 0, o.profile = true;
  o.config = R"({"layers": [{"mixer": "rwkv4"}, {"mixer": "linear"}, {"mixer": "linear"}], "channel_mix": "mlp",
                 "d_model": 32, "n_layer": 3, "n_head": 2, "ctx": 64})";
  const TrainResult r = train(o);
  std::map<std::string, profile::Row> by;
  for (const auto& row : r.profile) by[row.path] = row;
  for (const auto& [path, row] : by) {
    const size_t cut = path.rfind('/');
    if (cut == std::string::npos) continue;
    ASSERT_TRUE(by.count(path.substr(0, cut))) << path;
    double children = 0;
    for (const auto& [p2, r2] : by)
      if (p2.rfind(path + "/", 0) == 0 && p2.find('/', path.size() + 1) == std::string::npos) children += r2.seconds;
    EXPECT_LE(children, row.seconds * 1.0001 + 1e-6) << path;
  }
  ASSERT_TRUE(by.count("step/forward/rwkv4/mechanism") && by.count("step/backward/linear/matmul"));
  EXPECT_EQ(by["step"].calls, 3);
  EXPECT_EQ(by["step/forward/rwkv4"].calls, 3);
  EXPECT_EQ(by["step/forward/linear"].calls, 6);
  EXPECT_EQ(by["step/backward/linear/mechanism"].calls, 6);
  EXPECT_EQ(by["step/forward/channel mix"].calls, 9);
  EXPECT_GT(by["step/forward/linear/mechanism"].seconds, 0.0);
  o.profile = false, o.force = true;
  EXPECT_TRUE(train(o).profile.empty());
}

// With dropout the masks follow the batch (seed, step, accumulation index): a resumed run drops
// what the uninterrupted one did, and its losses are equal bit for bit.
TEST(Train, ResumeEqualsUninterruptedWithDropout) {
  const std::string dir = test::tmp_dir();
  const std::string data = write_corpus(dir);
  auto with_dropout = [&](const std::string& out) {
    TrainOptions o = small(out, data);
    o.config = R"({"mixer": "rwkv4", "channel_mix": "rwkv", "d_model": 32, "n_layer": 2, "n_head": 2, "ctx": 64,
                   "dropout": 0.2})";
    o.steps = 20, o.eval_every = 10, o.ckpt_every = 10, o.accum = 2;
    return o;
  };
  const TrainResult full = train(with_dropout(dir + "/a"));
  TrainOptions part = with_dropout(dir + "/b");
  part.time_budget_s = 1e-9;
  ASSERT_EQ(train(part).steps_done, 1);
  TrainOptions rest = with_dropout(dir + "/b");
  rest.resume = true;
  const TrainResult resumed = train(rest);
  ASSERT_EQ(resumed.losses.back().first, full.losses.back().first);
  for (const auto& [step, loss] : resumed.losses) EXPECT_EQ(loss, full.losses[step - 1].second) << "step " << step;
  EXPECT_EQ(resumed.val_loss, full.val_loss);
  // and the masks are on: the same run without dropout has other losses
  TrainOptions plain = small(dir + "/c", data);
  plain.steps = 20, plain.eval_every = 10, plain.ckpt_every = 10, plain.accum = 2;
  EXPECT_NE(train(plain).losses.back().second, full.losses.back().second);
}
