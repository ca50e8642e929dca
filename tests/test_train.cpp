// Training: it learns, a resumed run equals an uninterrupted one, checkpoints are refused when
// truncated or corrupted, a run killed while writing a checkpoint leaves the previous one
// intact, and the synthetic tasks are well formed.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fstream>

#include "linmix/safetensors.h"
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
  expect_refused(serialize_safetensors(st.tensors, {}), "RWKV-4 checkpoint without tensor 'blocks.0.ln0.");
  st.tensors.erase("blocks.0.att.time_decay");
  expect_refused(serialize_safetensors(st.tensors, {}), "nor an RWKV-4 checkpoint");
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
  usleep(150 * 1000);
  kill(pid, SIGKILL);
  int status = 0;
  waitpid(pid, &status, 0);
  std::ifstream g(ck, std::ios::binary);
  const std::string after((std::istreambuf_iterator<char>(g)), std::istreambuf_iterator<char>());
  if (WIFSIGNALED(status)) {
    EXPECT_EQ(after, before) << "the checkpoint changed although its writer was killed";
    EXPECT_NO_THROW(load_checkpoint(ck));
  } else {
    // the machine wrote 256 MiB in 150 ms: then the new file must be complete
    EXPECT_EQ(read_safetensors(ck).tensors.at("x").numel(), 64 * 1024 * 1024);
  }
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
