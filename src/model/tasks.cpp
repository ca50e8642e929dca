// The classification tasks of include/linmix/tasks.h: ListOps (generated), Fashion-MNIST (Debian's
// files), order (generated).
#include "linmix/tasks.h"

#include <zlib.h>

#include <algorithm>
#include <cstdlib>
#include <mutex>
#include <random>

#include "linmix/error.h"
#include "seed.h"

namespace linmix {

namespace {

// every generated task's examples depend only on (task, split, index): the same data in every run
uint64_t example_seed(uint64_t task, Split s, int64_t i) { return mix_seed(task, uint64_t(s) + 1, uint64_t(i)); }

// ---------------------------------------------------------------- listops

constexpr int32_t kDigit0 = 1, kMin = 11, kMax = 12, kMed = 13, kSm = 14, kEnd = 15;

class ListOps : public ClassTask {
 public:
  explicit ListOps(int64_t seq) : seq_(seq) {
    LINMIX_CHECK(seq >= 16 && seq <= 100000, "task listops: --seq must be in [16, 100000] (LRA: 2000), found " +
                                                 std::to_string(seq));
  }
  std::string name() const override { return "listops"; }
  int64_t vocab() const override { return 16; }
  int64_t classes() const override { return 10; }
  int64_t seq() const override { return seq_; }
  int64_t size(Split s) const override { return s == Split::Train ? 96000 : 2000; }
  void example(Split s, int64_t i, std::vector<int32_t>& tokens, int32_t& label) const override {
    std::mt19937_64 rng(example_seed(0x4c6973744f7073ull, s, i));
    // LRA: trees of any length are drawn and those with min_length < length < max_length kept
    // (min = max / 4 as LRA's 500 / 2000); a tree is abandoned as soon as it passes max_length
    // (which changes only the draws spent, not the distribution of the kept ones)
    for (;;) {
      tokens.clear();
      if (tree(1, rng, tokens) && int64_t(tokens.size()) > seq_ / 4 && int64_t(tokens.size()) < seq_) break;
    }
    label = listops_value(tokens);
  }

 private:
  // LRA's generate_tree: below max depth 10, a node is a value with probability 0.75, else an
  // operator over 2..10 arguments; at max depth always a value. false: it outgrew seq.
  bool tree(int depth, std::mt19937_64& rng, std::vector<int32_t>& out) const {
    std::uniform_real_distribution<double> u(0.0, 1.0);
    const double r = depth < 10 ? u(rng) : 1.0;
    if (r > 0.25) {
      out.push_back(kDigit0 + std::uniform_int_distribution<int32_t>(0, 9)(rng));
      return int64_t(out.size()) < seq_;
    }
    const int n = std::uniform_int_distribution<int>(2, 10)(rng);
    const size_t at = out.size();
    out.push_back(0);  // the operator, drawn after its arguments as LRA does
    for (int a = 0; a < n; ++a)
      if (!tree(depth + 1, rng, out)) return false;
    out[at] = kMin + std::uniform_int_distribution<int32_t>(0, 3)(rng);
    out.push_back(kEnd);
    return int64_t(out.size()) < seq_;
  }
  int64_t seq_;
};

// ---------------------------------------------------------------- order

class Order : public ClassTask {
 public:
  explicit Order(int64_t seq) : seq_(seq) {
    LINMIX_CHECK(seq >= 4 && seq <= 1000000, "task order: --seq must be in [4, 10^6], found " + std::to_string(seq));
  }
  std::string name() const override { return "order"; }
  int64_t vocab() const override { return 13; }  // 0 pad, 1..10 digits, 11 A, 12 B
  int64_t classes() const override { return 2; }
  int64_t seq() const override { return seq_; }
  int64_t size(Split s) const override { return s == Split::Train ? 100000 : 2000; }
  void example(Split s, int64_t i, std::vector<int32_t>& tokens, int32_t& label) const override {
    std::mt19937_64 rng(example_seed(0x4f72646572ull, s, i));
    const int64_t n = std::uniform_int_distribution<int64_t>(seq_ / 2, seq_)(rng);
    tokens.resize(size_t(n));
    std::uniform_int_distribution<int32_t> digit(1, 10);
    for (auto& t : tokens) t = digit(rng);
    std::uniform_int_distribution<int64_t> pos(0, n - 1);
    const int64_t a = pos(rng);
    int64_t b = pos(rng);
    while (b == a) b = pos(rng);
    tokens[size_t(a)] = 11, tokens[size_t(b)] = 12;
    label = a < b ? 1 : 0;
  }

 private:
  int64_t seq_;
};

// ---------------------------------------------------------------- fmnist

struct Images {
  int64_t n = 0;
  std::vector<uint8_t> pixels, labels;  // n x 784, n
};

std::vector<uint8_t> read_gz(const std::string& path) {
  gzFile f = gzopen(path.c_str(), "rb");
  LINMIX_CHECK(f, path + ": cannot open (install Debian's dataset-fashion-mnist: scripts/setup.sh does; or set "
                         "LINMIX_FMNIST_DIR to a directory holding the four idx .gz files)");
  std::vector<uint8_t> out;
  uint8_t buf[1 << 16];
  int got = 0;
  while ((got = gzread(f, buf, sizeof buf)) > 0) {
    out.insert(out.end(), buf, buf + got);
    LINMIX_CHECK(out.size() <= (size_t(1) << 28), path + ": larger than any Fashion-MNIST file");
  }
  const bool bad = got < 0;
  gzclose(f);
  LINMIX_CHECK(!bad, path + ": corrupt gzip data");
  return out;
}

uint32_t be32(const std::vector<uint8_t>& b, size_t at) {
  return uint32_t(b[at]) << 24 | uint32_t(b[at + 1]) << 16 | uint32_t(b[at + 2]) << 8 | uint32_t(b[at + 3]);
}

// idx files: images magic 2051, n, 28, 28, then n*784 bytes; labels magic 2049, n, then n bytes < 10.
Images load_images(const std::string& dir, const std::string& prefix, int64_t want) {
  const std::string ip = dir + "/" + prefix + "-images-idx3-ubyte.gz", lp = dir + "/" + prefix + "-labels-idx1-ubyte.gz";
  const std::vector<uint8_t> im = read_gz(ip), lb = read_gz(lp);
  LINMIX_CHECK(im.size() >= 16 && be32(im, 0) == 2051 && be32(im, 4) == uint32_t(want) && be32(im, 8) == 28 &&
                   be32(im, 12) == 28 && im.size() == 16 + size_t(want) * 784,
               ip + ": not the Fashion-MNIST idx file of " + std::to_string(want) + " 28x28 images");
  LINMIX_CHECK(lb.size() == 8 + size_t(want) && be32(lb, 0) == 2049 && be32(lb, 4) == uint32_t(want),
               lp + ": not the Fashion-MNIST idx file of " + std::to_string(want) + " labels");
  Images r;
  r.n = want;
  r.pixels.assign(im.begin() + 16, im.end());
  r.labels.assign(lb.begin() + 8, lb.end());
  for (uint8_t l : r.labels) LINMIX_CHECK(l < 10, lp + ": a label outside 0..9");
  return r;
}

class Fmnist : public ClassTask {
 public:
  explicit Fmnist(int64_t seq) {
    LINMIX_CHECK(seq == 0 || seq == 784, "task fmnist: its sequences are the 784 pixels of an image; --seq must be 784 "
                                         "or left out, found " + std::to_string(seq));
    const char* env = std::getenv("LINMIX_FMNIST_DIR");
    const std::string dir = env && *env ? env : "/usr/share/datasets/fashion-mnist";
    static std::mutex mu;  // the files are read once per process
    static std::shared_ptr<const std::pair<Images, Images>> cache;
    static std::string cached_dir;
    std::lock_guard<std::mutex> lock(mu);
    if (!cache || cached_dir != dir) {
      cache = std::make_shared<const std::pair<Images, Images>>(load_images(dir, "train", 60000),
                                                                load_images(dir, "t10k", 10000));
      cached_dir = dir;
    }
    data_ = cache;
  }
  std::string name() const override { return "fmnist"; }
  int64_t vocab() const override { return 256; }
  int64_t classes() const override { return 10; }
  int64_t seq() const override { return 784; }
  int64_t size(Split s) const override { return s == Split::Train ? 55000 : s == Split::Val ? 5000 : 10000; }
  void example(Split s, int64_t i, std::vector<int32_t>& tokens, int32_t& label) const override {
    const Images& im = s == Split::Test ? data_->second : data_->first;
    const int64_t at = s == Split::Val ? 55000 + i : i;
    tokens.assign(im.pixels.begin() + at * 784, im.pixels.begin() + (at + 1) * 784);
    label = im.labels[size_t(at)];
  }

 private:
  std::shared_ptr<const std::pair<Images, Images>> data_;
};

}  // namespace

Split parse_split(const std::string& s) {
  if (s == "train") return Split::Train;
  if (s == "val") return Split::Val;
  if (s == "test") return Split::Test;
  throw Error("--split must be train, val or test, found '" + s + "'");
}

const char* split_name(Split s) { return s == Split::Train ? "train" : s == Split::Val ? "val" : "test"; }

bool is_class_task(const std::string& name) { return name == "listops" || name == "fmnist" || name == "order"; }

std::unique_ptr<ClassTask> make_class_task(const std::string& name, int64_t seq) {
  if (name == "listops") return std::make_unique<ListOps>(seq ? seq : 512);
  if (name == "order") return std::make_unique<Order>(seq ? seq : 256);
  if (name == "fmnist") return std::make_unique<Fmnist>(seq);
  throw Error("unknown classification task '" + name + "' (expected listops, fmnist or order)");
}

ClassBatch class_batch(const ClassTask& task, Split s, const std::vector<int64_t>& indices) {
  ClassBatch b;
  b.B = int64_t(indices.size()), b.T = task.seq();
  b.inputs.assign(size_t(b.B * b.T), 0);
  b.lengths.resize(size_t(b.B)), b.labels.resize(size_t(b.B));
  std::vector<int32_t> toks;
  for (int64_t r = 0; r < b.B; ++r) {
    LINMIX_CHECK(indices[r] >= 0 && indices[r] < task.size(s), "example " + std::to_string(indices[r]) +
                                                                     " is outside the " + split_name(s) + " split");
    task.example(s, indices[r], toks, b.labels[r]);
    std::copy(toks.begin(), toks.end(), b.inputs.begin() + r * b.T);
    b.lengths[r] = int32_t(toks.size());
  }
  return b;
}

int32_t listops_value(const std::vector<int32_t>& tokens) {
  // a stack of open operators and their arguments
  std::vector<std::pair<int32_t, std::vector<int32_t>>> st;
  int32_t result = -1;
  for (size_t i = 0; i < tokens.size(); ++i) {
    const int32_t t = tokens[i];
    LINMIX_CHECK(result < 0, "listops: tokens after the end of the expression");
    if (t >= kDigit0 && t < kDigit0 + 10) {
      if (st.empty()) {
        LINMIX_CHECK(tokens.size() == 1, "listops: a digit outside any operator");
        return t - kDigit0;
      }
      st.back().second.push_back(t - kDigit0);
    } else if (t >= kMin && t <= kSm) {
      st.push_back({t, {}});
    } else if (t == kEnd) {
      LINMIX_CHECK(!st.empty() && !st.back().second.empty(), "listops: ']' without an open operator and arguments");
      auto [op, a] = std::move(st.back());
      st.pop_back();
      std::sort(a.begin(), a.end());
      int32_t v = 0;
      if (op == kMin) v = a.front();
      if (op == kMax) v = a.back();
      if (op == kMed) v = a.size() % 2 ? a[a.size() / 2] : (a[a.size() / 2 - 1] + a[a.size() / 2]) / 2;
      if (op == kSm) {
        for (int32_t x : a) v += x;
        v %= 10;
      }
      if (st.empty()) result = v;
      else st.back().second.push_back(v);
    } else {
      throw Error("listops: token " + std::to_string(t) + " is not a digit, an operator or ']'");
    }
  }
  LINMIX_CHECK(result >= 0, "listops: the expression is not closed");
  return result;
}

std::string listops_text(const std::vector<int32_t>& tokens) {
  static const char* const ops[] = {"[MIN", "[MAX", "[MED", "[SM", "]"};
  std::string s;
  for (int32_t t : tokens) {
    if (!s.empty()) s += ' ';
    if (t >= kDigit0 && t < kDigit0 + 10) s += char('0' + t - kDigit0);
    else if (t >= kMin && t <= kEnd) s += ops[t - kMin];
    else s += "<pad>";
  }
  return s;
}

}  // namespace linmix
