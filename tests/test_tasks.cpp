// The classification tasks (listops, fmnist, order) and the encoder classifier: ListOps values by
// hand, the generators' grammar and length ranges, Fashion-MNIST's published class counts, the
// classifier's pooling and its configs, training that learns and resumes exactly.
#include <fstream>
#include <map>
#include <set>
#include <sstream>

#include "linmix/model.h"
#include "linmix/tasks.h"
#include "linmix/train.h"
#include "test_util.h"

using namespace linmix;

namespace {

// "[MAX 2 9 ]" -> tokens (0 pad, 1..10 digits, 11 [MIN, 12 [MAX, 13 [MED, 14 [SM, 15 ])
std::vector<int32_t> lo(const std::string& text) {
  std::vector<int32_t> t;
  std::istringstream in(text);
  std::string w;
  const std::map<std::string, int32_t> ops = {{"[MIN", 11}, {"[MAX", 12}, {"[MED", 13}, {"[SM", 14}, {"]", 15}};
  while (in >> w) t.push_back(ops.count(w) ? ops.at(w) : 1 + std::stoi(w));
  return t;
}

}  // namespace

TEST(ListOps, ValuesComputedByHand) {
  EXPECT_EQ(listops_value(lo("[MAX 2 9 [MIN 4 7 ] 0 ]")), 9);
  EXPECT_EQ(listops_value(lo("[MIN 3 [MAX 1 2 ] ]")), 2);
  EXPECT_EQ(listops_value(lo("[MED 1 4 2 9 ]")), 3);  // (2 + 4) / 2
  EXPECT_EQ(listops_value(lo("[MED 2 3 ]")), 2);      // int(np.median([2, 3])) = int(2.5)
  EXPECT_EQ(listops_value(lo("[MED 9 1 5 ]")), 5);
  EXPECT_EQ(listops_value(lo("[SM 7 8 [MED 5 6 ] ]")), 0);  // 7 + 8 + 5 = 20
  EXPECT_EQ(listops_value(lo("[SM 9 9 9 ]")), 7);
  EXPECT_EQ(listops_text(lo("[MAX 2 [SM 1 ] ]")), "[MAX 2 [SM 1 ] ]");
  for (const char* bad : {"]", "[MAX 2", "[MAX ]", "[MAX 2 ] 3", "3 4"}) EXPECT_THROW(listops_value(lo(bad)), Error) << bad;
  EXPECT_THROW(listops_value({1, 16}), Error);
}

TEST(ListOps, GeneratorFollowsTheGrammarAndLengths) {
  const auto task = make_class_task("listops", 128);
  EXPECT_EQ(task->seq(), 128);
  EXPECT_EQ(task->size(Split::Train), 96000);
  EXPECT_EQ(task->size(Split::Test), 2000);
  std::set<int32_t> labels;
  std::set<std::vector<int32_t>> seen;
  int deep = 0;
  for (int64_t i = 0; i < 300; ++i) {
    std::vector<int32_t> t, again;
    int32_t label = -1, label2 = -1;
    task->example(Split::Train, i, t, label);
    task->example(Split::Train, i, again, label2);
    ASSERT_EQ(t, again) << "example " << i << " is not a function of its index";
    ASSERT_GT(int64_t(t.size()), 32);  // LRA: min_length < length < max_length, min = max / 4
    ASSERT_LT(int64_t(t.size()), 128);
    ASSERT_EQ(label, listops_value(t)) << listops_text(t);
    ASSERT_TRUE(t.front() >= 11 && t.front() <= 14 && t.back() == 15) << listops_text(t);
    int depth = 0, most = 0;
    for (int32_t x : t) depth += x >= 11 && x <= 14 ? 1 : x == 15 ? -1 : 0, most = std::max(most, depth);
    ASSERT_LE(most, 9);  // max depth 10: the nodes at depth 10 are values
    deep += most >= 3;
    labels.insert(label);
    seen.insert(t);
  }
  EXPECT_GE(labels.size(), 8u);
  EXPECT_GT(deep, 100);  // nesting is the task
  EXPECT_EQ(seen.size(), 300u);
  std::vector<int32_t> a, b;
  int32_t la, lb;
  task->example(Split::Val, 0, a, la), task->example(Split::Test, 0, b, lb);
  EXPECT_NE(a, b);
  EXPECT_THROW(make_class_task("listops", 8), Error);
  EXPECT_THROW(make_class_task("lisptops"), Error);
}

TEST(OrderTask, LabelsSayWhichMarkerComesFirst) {
  const auto task = make_class_task("order", 64);
  int ones = 0;
  for (int64_t i = 0; i < 400; ++i) {
    std::vector<int32_t> t;
    int32_t label;
    task->example(Split::Test, i, t, label);
    ASSERT_GE(t.size(), 32u);
    ASSERT_LE(t.size(), 64u);
    const auto a = std::find(t.begin(), t.end(), 11), b = std::find(t.begin(), t.end(), 12);
    ASSERT_TRUE(a != t.end() && b != t.end());
    ASSERT_EQ(std::count(t.begin(), t.end(), 11) + std::count(t.begin(), t.end(), 12), 2);
    ASSERT_EQ(label, a < b ? 1 : 0);
    ones += label;
  }
  EXPECT_GT(ones, 150);
  EXPECT_LT(ones, 250);
}

TEST(Fmnist, SplitsHoldThePublishedClassCounts) {
  // Fashion-MNIST (Xiao et al. 2017): 60,000 training and 10,000 test images, 6,000 and 1,000 of
  // each of the 10 classes; the first training image is an ankle boot (class 9)
  const auto task = make_class_task("fmnist");
  EXPECT_EQ(task->seq(), 784);
  EXPECT_EQ(task->size(Split::Train) + task->size(Split::Val), 60000);
  EXPECT_EQ(task->size(Split::Test), 10000);
  std::vector<int64_t> train(10), test(10);
  std::vector<int32_t> t;
  int32_t label;
  double mean = 0;
  for (Split s : {Split::Train, Split::Val})
    for (int64_t i = 0; i < task->size(s); ++i) {
      task->example(s, i, t, label);
      ASSERT_TRUE(label >= 0 && label < 10);
      ++train[size_t(label)];
      if (s == Split::Train && i == 0) {
        EXPECT_EQ(label, 9);
      }
    }
  for (int64_t i = 0; i < task->size(Split::Test); ++i) {
    task->example(Split::Test, i, t, label);
    ASSERT_EQ(t.size(), 784u);
    for (int32_t p : t) mean += p;
    ++test[size_t(label)];
  }
  for (int c = 0; c < 10; ++c) {
    EXPECT_EQ(train[size_t(c)], 6000) << c;
    EXPECT_EQ(test[size_t(c)], 1000) << c;
  }
  mean /= 784.0 * 10000.0;
  EXPECT_GT(mean, 50.0);  // Fashion-MNIST's mean intensity is ~73 of 255: pixels, not zeros
  EXPECT_LT(mean, 100.0);
  EXPECT_THROW(make_class_task("fmnist", 100), Error);
}

TEST(Fmnist, CorruptOrMissingFilesAreRefused) {
  const std::string dir = test::tmp_dir();
  setenv("LINMIX_FMNIST_DIR", dir.c_str(), 1);
  EXPECT_THROW(make_class_task("fmnist"), Error);  // missing
  for (const char* n : {"train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                        "t10k-labels-idx1-ubyte.gz"})
    std::ofstream(dir + "/" + n) << "not gzip, and not an idx file";
  EXPECT_THROW(make_class_task("fmnist"), Error);
  unsetenv("LINMIX_FMNIST_DIR");
}

TEST(Classifier, ConfigsAreCheckedByName) {
  auto err = [](const std::string& j) {
    try {
      ModelConfig::from_json(j);
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("accepted");
  };
  EXPECT_NE(err(R"({"mixer": "softmax", "causal": false})").find("must be a classifier"), std::string::npos);
  EXPECT_NE(err(R"({"mixer": "rwkv4", "causal": false, "classes": 2})").find("no non-causal form"), std::string::npos);
  EXPECT_NE(err(R"({"mixer": "fnet"})").find("no causal form"), std::string::npos);
  EXPECT_NE(err(R"({"mixer": "fnet", "causal": false, "classes": 1})").find("at least 2"), std::string::npos);
  EXPECT_NE(err(R"({"mixer": "fnet", "causal": false, "classes": 2, "pool": "max"})").find("pool"), std::string::npos);
  EXPECT_NE(err(R"({"mixer": "softmax", "pool": "cls"})").find("classifier"), std::string::npos);
  EXPECT_EQ(err(R"({"mixer": "fnet", "causal": false, "classes": 3, "pool": "cls"})"), "accepted");
  EXPECT_EQ(err(R"({"mixer": "mamba", "classes": 3})"), "accepted");  // a causal classifier
  const ModelConfig c = ModelConfig::from_json(R"({"mixer": "linear", "causal": false, "classes": 3, "pool": "cls"})");
  EXPECT_EQ(ModelConfig::from_json(c.to_json()).to_json(), c.to_json());
  EXPECT_TRUE(c.uses_pos_emb());
  Model m(c);
  EXPECT_EQ(m.params().at("head.weight").shape, (std::vector<int64_t>{3, c.d_model}));
  EXPECT_EQ(m.params().at("cls.weight").numel(), c.d_model);
  EXPECT_EQ(c.param_count(), [&] {
    int64_t n = 0;
    for (const auto& [k, t] : m.params()) n += t.numel();
    return n;
  }());
  Model::State st = m.new_state();
  std::vector<float> lg(3);
  EXPECT_THROW(m.step(1, st, lg.data()), Error);  // no next-token form
  const int32_t toks[4] = {1, 2, 3, 4};
  EXPECT_THROW(m.logits(toks, 1, 4), Error);
}

TEST(Classifier, MeanPoolingReadsOnlyEachSequencesOwnTokens) {
  // a causal classifier: padding after a sequence can change nothing (causal mixers, masked mean);
  // every sequence of a batch is computed as if alone
  ModelConfig c = ModelConfig::from_json(
      R"({"mixer": "rwkv4", "channel_mix": "rwkv", "d_model": 16, "n_layer": 2, "n_head": 2, "ctx": 32, "classes": 4, "vocab": 20})");
  Model m(c);
  m.init(3);
  const std::vector<int32_t> seq = {3, 7, 1, 19, 4, 4, 2};
  std::vector<int32_t> padded(seq);
  padded.resize(12, 5);  // padding of another token than 0
  const int32_t len = 7;
  std::vector<float> a(4), b(4), both(8);
  m.classify(seq.data(), &len, nullptr, 1, 7, nullptr, 1.0f, a.data());
  m.classify(padded.data(), &len, nullptr, 1, 12, nullptr, 1.0f, b.data());
  for (int k = 0; k < 4; ++k) EXPECT_NEAR(a[k], b[k], 1e-5f);
  std::vector<int32_t> two(padded);
  two.insert(two.end(), {9, 9, 8, 1, 0, 2, 2, 2, 2, 2, 2, 2});
  const int32_t lens[2] = {7, 12};
  m.classify(two.data(), lens, nullptr, 2, 12, nullptr, 1.0f, both.data());
  for (int k = 0; k < 4; ++k) EXPECT_NEAR(both[k], a[k], 1e-5f);
  const int32_t bad_len = 13, bad_label = 4;
  EXPECT_THROW(m.classify(padded.data(), &bad_len, nullptr, 1, 12, nullptr), Error);
  EXPECT_THROW(m.classify(padded.data(), &len, &bad_label, 1, 12, nullptr), Error);
}

namespace {
TrainOptions order_run(const std::string& out) {
  TrainOptions o;
  o.task = "order";
  o.out = out;
  o.config =
      R"({"mixer": "softmax", "d_model": 32, "n_layer": 2, "n_head": 2, "ctx": 32, "causal": false, "classes": 2, "vocab": 13})";
  o.seq = 32, o.given = {"seq"};
  o.steps = 1000, o.batch = 32, o.warmup = 30, o.lr = 1e-2, o.eval_every = 500, o.ckpt_every = 500, o.eval_batches = 8;
  o.quiet = true;
  return o;
}
}  // namespace

TEST(Classifier, EncoderLearnsWhichMarkerComesFirst) {
  // chance is 0.5; a bag of tokens cannot do better: only the positions tell. (It learns after a
  // plateau: seeds 1, 2, 3 reach 0.90, 0.92, 0.96 in these 1000 steps.)
  const TrainResult r = train(order_run(test::tmp_dir() + "/run"));
  EXPECT_GT(r.val_acc, 0.75);
}

TEST(Classifier, ResumeEqualsUninterrupted) {
  const std::string dir = test::tmp_dir();
  TrainOptions whole = order_run(dir + "/a");
  whole.steps = 6, whole.eval_every = 3, whole.ckpt_every = 3;
  const TrainResult full = train(whole);
  TrainOptions part = order_run(dir + "/b");
  part.steps = 6, part.eval_every = 3, part.ckpt_every = 3, part.time_budget_s = 1e-9;
  ASSERT_EQ(train(part).steps_done, 1);
  TrainOptions rest = order_run(dir + "/b");
  rest.steps = 6, rest.eval_every = 3, rest.ckpt_every = 3, rest.resume = true, rest.given = {};
  const TrainResult resumed = train(rest);
  EXPECT_EQ(resumed.train_loss, full.train_loss);
  EXPECT_EQ(resumed.val_acc, full.val_acc);
  Checkpoint a = load_checkpoint(dir + "/a/ckpt.safetensors"), b = load_checkpoint(dir + "/b/ckpt.safetensors");
  for (const auto& [n, t] : a.model->params()) EXPECT_EQ(t.data, b.model->params().at(n).data) << n;
  EXPECT_EQ(a.tokenizer, "task:order");
}

TEST(Classifier, FnetEncoderBeatsTheMajorityClassOnListOps) {
  // issue 17's first claim at toy size: `--task listops --mixer fnet` learns more than the label
  // prior (the most frequent class of the very examples scored, counted here)
  TrainOptions o;
  o.task = "listops", o.out = test::tmp_dir() + "/run", o.quiet = true;
  o.config = R"({"mixer": "fnet", "d_model": 32, "n_layer": 2, "n_head": 2, "ctx": 64, "causal": false, "classes": 10,
                 "vocab": 16})";
  o.seq = 64, o.given = {"seq"};
  o.steps = 200, o.batch = 16, o.warmup = 20, o.lr = 3e-3, o.eval_every = 200, o.ckpt_every = 200, o.eval_batches = 16;
  const TrainResult r = train(o);
  const auto task = make_class_task("listops", 64);
  std::vector<int64_t> count(10);
  std::vector<int32_t> t;
  int32_t label;
  for (int64_t i = 0; i < 256; ++i) task->example(Split::Val, i, t, label), ++count[size_t(label)];
  const double majority = double(*std::max_element(count.begin(), count.end())) / 256.0;
  EXPECT_GT(r.val_acc, majority + 0.05) << "majority class rate " << majority;
}
