// Every mechanism, every defined causal flag, T in {1, 7, 64, 257}, B = 2, H = 3:
//  - the parallel and recurrent float32 forms equal the float64 reference (MIXERS.md tolerance);
//  - a sequence split across two recurrent calls, state passed along, equals one call;
//  - stability: keys and biases up to +-60 give finite outputs equal to the reference;
//  - one-token sanity facts that follow from the formulas alone.
#include "linmix/kernels.h"
#include "linmix/mixer.h"
#include "test_util.h"

using namespace linmix;

namespace {

struct Case {
  std::string mixer;
  bool causal;
  std::map<std::string, std::string> params;
};

std::vector<Case> all_cases() {
  std::vector<Case> out;
  for (const auto& spec : mixers())
    for (bool causal : {false, true}) {
      if ((causal && !spec.causal_ok) || (!causal && !spec.noncausal_ok)) continue;
      out.push_back({spec.name, causal, spec.example_params});
      if (spec.name == "softmax") out.push_back({spec.name, causal, {{"window", "5"}}});
    }
  return out;
}

void PrintTo(const Case& c, std::ostream* os) { *os << c.mixer << (c.causal ? " causal" : " non-causal"); }

std::vector<Case> causal_cases() {
  std::vector<Case> out;
  for (const Case& c : all_cases())
    if (c.causal) out.push_back(c);
  return out;
}

std::string case_name(const ::testing::TestParamInfo<Case>& info) {
  std::string n = info.param.mixer + (info.param.causal ? "_causal" : "_noncausal");
  for (const auto& [k, v] : info.param.params) n += "_" + k + v;
  return n;
}

std::map<std::string, int64_t> dims_for(const std::string& mixer, int64_t T, bool causal) {
  // aft_conv: H = 3 heads of 2 channels; K odd when non-causal, even allowed when causal.
  return {{"B", 2}, {"T", T}, {"H", 3}, {"D", 5}, {"E", 4}, {"C", 6}, {"Tw", T + 2},
          {"K", mixer == "aft_conv" && causal ? 4 : 5}, {"M", 7}, {"S", 5}, {"N", 4}};
}

TensorMap slice_time(const TensorMap& in, int64_t t1, int64_t t2) {
  TensorMap out;
  for (const auto& [name, t] : in) {
    if (t.rank() < 3) {  // weights (w, u, ...) are not per-token
      out[name] = t;
      continue;
    }
    std::vector<int64_t> shape = t.shape;
    shape[1] = t2 - t1;
    Tensor s(shape);
    const int64_t row = numel_of(t.shape) / (t.shape[0] * t.shape[1]);
    for (int64_t b = 0; b < t.shape[0]; ++b)
      std::copy(t.ptr() + (b * t.shape[1] + t1) * row, t.ptr() + (b * t.shape[1] + t2) * row,
                s.ptr() + b * (t2 - t1) * row);
    out[name] = std::move(s);
  }
  return out;
}

Tensor concat_time(const Tensor& a, const Tensor& b) {
  std::vector<int64_t> shape = a.shape;
  shape[1] += b.shape[1];
  Tensor out(shape);
  const int64_t row = numel_of(a.shape) / (a.shape[0] * a.shape[1]);
  for (int64_t bb = 0; bb < a.shape[0]; ++bb) {
    float* dst = out.ptr() + bb * shape[1] * row;
    dst = std::copy(a.ptr() + bb * a.shape[1] * row, a.ptr() + (bb + 1) * a.shape[1] * row, dst);
    std::copy(b.ptr() + bb * b.shape[1] * row, b.ptr() + (bb + 1) * b.shape[1] * row, dst);
  }
  return out;
}

class MixerForms : public ::testing::TestWithParam<Case> {};

TEST_P(MixerForms, ParallelAndRecurrentEqualReference) {
  const Case& c = GetParam();
  const MixerSpec& spec = find_mixer(c.mixer);
  for (int64_t T : {1, 7, 64, 257}) {
    const TensorMap in = example_inputs(spec, dims_for(c.mixer, T, c.causal), 1000 + T);
    const Tensor ref = run_mixer(c.mixer, Mode::Reference, c.causal, c.params, in).at("y");
    const std::string at = " T=" + std::to_string(T);
    test::expect_close(run_mixer(c.mixer, Mode::Parallel, c.causal, c.params, in).at("y"), ref, "parallel" + at);
    if (!c.causal) {
      EXPECT_THROW(run_mixer(c.mixer, Mode::Recurrent, false, c.params, in), Error);
      continue;
    }
    test::expect_close(run_mixer(c.mixer, Mode::Recurrent, c.causal, c.params, in).at("y"), ref, "recurrent" + at);
  }
}

class RecurrentSplit : public ::testing::TestWithParam<Case> {};

TEST_P(RecurrentSplit, StateCarriesAcrossCalls) {
  const Case& c = GetParam();
  const MixerSpec& spec = find_mixer(c.mixer);
  const int64_t T = 64;
  const TensorMap in = example_inputs(spec, dims_for(c.mixer, T, true), 7);
  const TensorMap whole = run_mixer(c.mixer, Mode::Recurrent, true, c.params, in);
  for (int64_t t1 : {1, 3, 33, 63}) {
    const TensorMap first = run_mixer(c.mixer, Mode::Recurrent, true, c.params, slice_time(in, 0, t1));
    TensorMap second_in = slice_time(in, t1, T);
    for (const auto& [name, t] : first)
      if (name.rfind("state.", 0) == 0) second_in[name] = t;
    const TensorMap second = run_mixer(c.mixer, Mode::Recurrent, true, c.params, second_in);
    // The split run does the same float32 operations in the same order: equal bit for bit.
    const Tensor joined = concat_time(first.at("y"), second.at("y"));
    EXPECT_EQ(joined.data, whole.at("y").data) << "split at " << t1;
    for (const auto& [name, t] : whole) {
      if (name.rfind("state.", 0) != 0) continue;
      EXPECT_EQ(second.at(name).data, t.data) << name << " split at " << t1;
    }
  }
}

TEST_P(MixerForms, StableForLargeKeysAndBiases) {
  const Case& c = GetParam();
  const MixerSpec& spec = find_mixer(c.mixer);
  TensorMap in = example_inputs(spec, dims_for(c.mixer, 257, c.causal), 99);
  // Keys and position biases pushed to +-60 (an N(0,1) draw times 20, clipped): exponents
  // of e^120 differences that overflow or underflow float32 without a max shift.
  for (const char* name : {"k", "w", "u"}) {
    if (!in.count(name) || (c.mixer == "rwkv4" && std::string(name) == "w")) continue;
    if (c.mixer == "performer") continue;
    for (float& x : in[name].data) x = std::clamp(20.0f * x, -60.0f, 60.0f);
  }
  // performer: a feature exp(omega . x' - |x'|^2/2) of a key at +-60 underflows even float64
  // (the formula itself is 0/0 there); |q|, |k| ~ 10 gives feature logits near -100 .. +40,
  // outside float32's exp range without the max shifts, inside float64's.
  if (c.mixer == "performer")
    for (const char* name : {"q", "k"})
      for (float& x : in[name].data) x *= 10.0f;
  if (c.mixer == "rwkv4")  // decay rates from tiny to large
    for (float& x : in["w"].data) x = std::min(60.0f, x * x * 10.0f + 1e-3f);
  const Tensor ref = run_mixer(c.mixer, Mode::Reference, c.causal, c.params, in).at("y");
  test::expect_close(run_mixer(c.mixer, Mode::Parallel, c.causal, c.params, in).at("y"), ref, "parallel");
  if (c.causal)
    test::expect_close(run_mixer(c.mixer, Mode::Recurrent, c.causal, c.params, in).at("y"), ref, "recurrent");
}

INSTANTIATE_TEST_SUITE_P(All, MixerForms, ::testing::ValuesIn(all_cases()), case_name);
INSTANTIATE_TEST_SUITE_P(Causal, RecurrentSplit, ::testing::ValuesIn(causal_cases()), case_name);

// With a single position every mechanism's weights are one term: y_0 is v_0 (times
// sigma(q_0) for AFT), whatever the keys and biases.
TEST(MixerFacts, OneTokenIsItsValue) {
  // (flow, flash, norm_linear, s4d, mamba, fnet transform v even for one token: not here)
  for (const std::string name : {"softmax", "block_softmax", "performer", "linear", "aft_full", "aft_local",
                                 "aft_simple", "aft_conv", "rwkv4"}) {
    const MixerSpec& spec = find_mixer(name);
    for (bool causal : {false, true}) {
      if ((causal && !spec.causal_ok) || (!causal && !spec.noncausal_ok)) continue;
      const TensorMap in = example_inputs(spec, dims_for(spec.name, 1, causal), 5);
      for (Mode m : {Mode::Reference, Mode::Parallel}) {
        const Tensor y = run_mixer(spec.name, m, causal, spec.example_params, in).at("y");
        const Tensor& v = in.at("v");
        ASSERT_EQ(y.numel(), v.numel()) << spec.name;
        for (int64_t i = 0; i < y.numel(); ++i) {
          double want = v.data[i];
          if (spec.name.rfind("aft", 0) == 0) want /= 1.0 + std::exp(-double(in.at("q").data[i]));
          if (spec.name == "linear") continue;  // the eps in the denominator: checked below
          EXPECT_NEAR(y.data[i], want, 1e-6 * std::max(1.0, std::fabs(want))) << spec.name << " " << mode_name(m);
        }
      }
    }
  }
  // linear: y_0 = v_0 * A / (A + eps), A = phi(q_0).phi(k_0) > 0
  const TensorMap in = example_inputs(find_mixer("linear"), dims_for("linear", 1, true), 5);
  const Tensor y = run_mixer("linear", Mode::Reference, true, {{"eps", "1e6"}}, in).at("y");
  for (int64_t i = 0; i < y.numel(); ++i) EXPECT_LT(std::fabs(y.data[i]), std::fabs(in.at("v").data[i]));
}

// softmax with a window of 1 sees only itself: y = v for every position.
TEST(MixerFacts, SoftmaxWindowOneIsIdentity) {
  const TensorMap in = example_inputs(find_mixer("softmax"), dims_for("softmax", 9, false), 3);
  for (bool causal : {false, true})
    for (Mode m : {Mode::Reference, Mode::Parallel})
      EXPECT_EQ(run_mixer("softmax", m, causal, {{"window", "1"}}, in).at("y").data.size(), in.at("v").data.size());
  const Tensor y = run_mixer("softmax", Mode::Parallel, false, {{"window", "1"}}, in).at("y");
  for (int64_t i = 0; i < y.numel(); ++i) EXPECT_FLOAT_EQ(y.data[i], in.at("v").data[i]);
}

// aft_local with a window covering the whole sequence is aft_full; aft_full with w = 0 is
// aft_simple: three variants, one formula.
TEST(MixerFacts, AftVariantsNest) {
  const int64_t T = 40;
  TensorMap in = example_inputs(find_mixer("aft_full"), dims_for("aft_full", T, false), 11);
  for (bool causal : {false, true}) {
    const Tensor full = run_mixer("aft_full", Mode::Parallel, causal, {}, in).at("y");
    const Tensor local = run_mixer("aft_local", Mode::Parallel, causal, {{"window", std::to_string(T + 2)}}, in).at("y");
    test::expect_close(local, full, "aft_local(window >= T) == aft_full");
  }
  for (float& x : in["w"].data) x = 0.0f;
  TensorMap simple_in = in;
  simple_in.erase("w");
  for (bool causal : {false, true})
    test::expect_close(run_mixer("aft_full", Mode::Parallel, causal, {}, in).at("y"),
                       run_mixer("aft_simple", Mode::Parallel, causal, {}, simple_in).at("y"), "aft_full(w=0)");
}

}  // namespace

namespace {

// Performer's feature generator: each block of D rows is orthogonal, and the row norms are
// chi_D distributed: E|w|^2 = D. With 64 blocks of D = 8 the mean of |w|^2 over 512 rows has
// standard deviation sqrt(2 D / 512) = 0.125, so |mean - D| < 0.75 fails with p < 1e-8.
TEST(PerformerFeatures, OrthogonalBlocksWithChiNorms) {
  const int64_t D = 8, M = 512 + 3;  // a partial last block too
  const std::vector<float> w = orthogonal_gaussian_features(M, D, 123);
  ASSERT_EQ(static_cast<int64_t>(w.size()), M * D);
  auto dot = [&](int64_t i, int64_t j) {
    double s = 0;
    for (int64_t x = 0; x < D; ++x) s += double(w[i * D + x]) * w[j * D + x];
    return s;
  };
  double mean_sq = 0;
  for (int64_t i = 0; i < M; ++i) {
    mean_sq += dot(i, i) / double(M);
    for (int64_t j = (i / D) * D; j < i; ++j)  // same block: orthogonal
      EXPECT_NEAR(dot(i, j) / std::sqrt(dot(i, i) * dot(j, j)), 0.0, 1e-5) << i << "," << j;
  }
  EXPECT_NEAR(mean_sq, double(D), 0.75);
  EXPECT_EQ(orthogonal_gaussian_features(M, D, 123), w) << "deterministic in the seed";
  EXPECT_NE(orthogonal_gaussian_features(M, D, 124), w);
}

}  // namespace
