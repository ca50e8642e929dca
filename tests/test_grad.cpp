// Gradients of sum(y * dy), for every mechanism and causal flag:
//  - the reference backward (the float64 reference differentiated by src/ref/tape.h) against
//    central finite differences of the float64 reference, element by element, tiny shapes;
//  - the hand-written backward of the parallel form against the reference backward,
//    relative RMS error <= 1e-3 per tensor (MIXERS.md's gradient tolerance), T in {1, 7, 64};
//  - the parallel backward stays finite and correct under the stability inputs.
#include <random>

#include "linmix/mixer.h"
#include "test_util.h"

using namespace linmix;

namespace {

struct Case {
  std::string mixer;
  bool causal;
  std::map<std::string, std::string> params;
};

void PrintTo(const Case& c, std::ostream* os) { *os << c.mixer << (c.causal ? " causal" : " non-causal"); }

std::vector<Case> grad_cases() {
  std::vector<Case> out;
  for (const auto& spec : mixers())
    for (bool causal : {false, true}) {
      if ((causal && !spec.causal_ok) || (!causal && !spec.noncausal_ok)) continue;
      std::map<std::string, std::string> p = spec.example_params;
      for (const auto& [k, v] : spec.small_params) p[k] = v;  // several groups / blocks in tiny T
      out.push_back({spec.name, causal, p});
      for (const auto& more : spec.more_params) {
        auto pm = p;
        for (const auto& [k, v] : more) pm[k] = v;
        out.push_back({spec.name, causal, pm});
      }
    }
  return out;
}

std::string case_name(const ::testing::TestParamInfo<Case>& info) {
  std::string n = info.param.mixer + (info.param.causal ? "_causal" : "_noncausal");
  for (const auto& [k, v] : info.param.params) n += "_" + k + v;
  for (char& ch : n)
    if (!std::isalnum(static_cast<unsigned char>(ch))) ch = '_';  // "0.5" is no test name
  return n;
}

std::map<std::string, int64_t> dims_for(const Case& c, int64_t T) {
  return example_dims(find_mixer(c.mixer), Scale::Grad, T, c.causal);
}

TensorMap with_dy(TensorMap in, const Case& c, uint64_t seed) {
  // mechanisms whose parallel form starts from a given state: a random one, so that every
  // gradient test also checks d(state.*); and a random gradient of the final state (dfinal.*,
  // fla's dht) beside dy
  const MixerSpec& spec = find_mixer(c.mixer);
  std::map<std::string, int64_t> dims;
  const bool with_state = spec.state_all_modes && c.causal;  // a state exists in the causal form
  if (with_state) {
    const Call call = validate_call(c.mixer, Mode::Reference, c.causal, c.params, in);
    dims = call.dims;
    for (const auto& [n, v] : example_dims(spec, Scale::Grad, 1, c.causal)) dims.emplace(n, v);  // a cache's L
  }
  if (with_state)
    for (auto& [n, t] : example_state(spec, dims, seed + 7)) in[n] = std::move(t);
  const Tensor y = run_mixer(c.mixer, Mode::Reference, c.causal, c.params, in).at("y");
  Tensor dy(y.shape);
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal;
  for (float& x : dy.data) x = normal(rng);
  in["dy"] = std::move(dy);
  if (with_state) {  // shaped like the final state (a cache's has grown)
    const Call call = validate_call(c.mixer, Mode::Reference, c.causal, c.params, in, true);
    for (const auto& ts : spec.state) {
      Tensor d(final_state_shape(spec, call, ts));
      for (float& x : d.data) x = normal(rng);
      in["dfinal." + ts.name] = std::move(d);
    }
  }
  return in;
}

double rms(const Tensor& t) {
  double r = 0;
  for (float x : t.data) r += double(x) * x;
  return std::sqrt(r / std::max<int64_t>(1, t.numel()));
}

// RMS error of got against want, relative to want's RMS floored at `floor`.
double rel_rms(const Tensor& got, const Tensor& want, double floor = 1e-30) {
  double e = 0;
  for (int64_t i = 0; i < want.numel(); ++i) {
    const double d = double(got.data[i]) - double(want.data[i]);
    e += d * d;
  }
  if (e == 0) return 0;  // exact agreement, also where the gradient is identically zero
  return std::sqrt(e / std::max<int64_t>(1, want.numel())) / std::max({rms(want), floor, 1e-30});
}

// The floor for comparing the gradients of one call: a gradient that vanishes in exact
// arithmetic (dq, dk of a normalised mechanism at T = 1, where y = v whatever q and k) is
// float32 rounding noise in the parallel form, a difference of terms the size of the other
// gradients each rounded at ~(D + M) 2^-24 ~ 1e-6 relative; it is compared at 1e-3 of the
// largest gradient's RMS instead of its own (so 1e-6 of that scale overall).
double grad_floor(const TensorMap& want) {
  double m = 0;
  for (const auto& [n, t] : want)
    if (n != "y") m = std::max(m, rms(t));
  return 1e-3 * m;
}

class Grad : public ::testing::TestWithParam<Case> {};

TEST_P(Grad, ReferenceBackwardMatchesFiniteDifferences) {
  const Case& c = GetParam();
  const MixerSpec& spec = find_mixer(c.mixer);
  const TensorMap in = with_dy(example_inputs(spec, dims_for(c, 5), 17), c, 18);
  const TensorMap g = run_mixer(c.mixer, Mode::Reference, c.causal, c.params, in, true);
  std::map<std::string, std::vector<double>> x64;
  TensorMap in_nody;  // the call's inputs (and initial state) without the output gradients
  for (const auto& [n, t] : in)
    if (n != "dy" && n.rfind("dfinal.", 0) != 0) x64[n] = std::vector<double>(t.data.begin(), t.data.end()), in_nody[n] = t;
  // loss = sum y dy + sum final state dfinal, from the float64 reference's outputs
  auto loss = [&](const std::map<std::string, std::vector<double>>& x) {
    const auto out = reference_f64_all(c.mixer, c.causal, c.params, in_nody, x, nullptr);
    double l = 0;
    for (const auto& [n, v] : out) {
      const Tensor& d = n == "y" ? in.at("dy") : in.at("dfinal." + n.substr(6));
      for (size_t i = 0; i < v.size(); ++i) l += v[i] * d.data[i];
    }
    return l;
  };
  for (const auto& [n, vals] : x64) {
    ASSERT_TRUE(g.count("d" + n)) << "no gradient for " << n;
    bool count = false;  // a state's position: not differentiated, its gradient 0
    for (const auto& ts : spec.state) count = count || (n == "state." + ts.name && ts.count);
    if (count) {
      for (float x : g.at("d" + n).data) EXPECT_EQ(x, 0.0f) << "d" << n;
      continue;
    }
    Tensor fd(in.at(n).shape);
    for (size_t i = 0; i < vals.size(); ++i) {
      // central differences in float64: truncation O(h^2) ~ 1e-10, rounding ~ 1e-16 / h ~ 1e-10
      const double h = 1e-5 * std::max(1.0, std::fabs(vals[i]));
      auto xp = x64, xm = x64;
      xp[n][i] += h;
      xm[n][i] -= h;
      fd.data[i] = float((loss(xp) - loss(xm)) / (2 * h));
    }
    // The tape gradient is exact in float64 and rounded to float32 (6e-8 relative); the
    // finite difference is good to ~1e-9 relative: 1e-5 leaves room and still catches any
    // wrong term.
    EXPECT_LE(rel_rms(g.at("d" + n), fd), 1e-5) << "d" << n;
  }
}

TEST_P(Grad, ParallelBackwardMatchesReferenceBackward) {
  const Case& c = GetParam();
  const MixerSpec& spec = find_mixer(c.mixer);
  ASSERT_TRUE(spec.backward) << c.mixer << " has no parallel backward";
  for (int64_t T : {1, 7, 64}) {
    const TensorMap in = with_dy(example_inputs(spec, dims_for(c, T), 100 + T), c, 200 + T);
    const TensorMap want = run_mixer(c.mixer, Mode::Reference, c.causal, c.params, in, true);
    const TensorMap got = run_mixer(c.mixer, Mode::Parallel, c.causal, c.params, in, true);
    for (const auto& [n, t] : want) {
      if (n == "y") continue;
      ASSERT_TRUE(got.count(n)) << n;
      ASSERT_EQ(got.at(n).shape, t.shape) << n;
      // MIXERS.md: 1e-3 relative RMS for float32 gradients against float64.
      EXPECT_LE(rel_rms(got.at(n), t, grad_floor(want)), 1e-3) << n << " T=" << T;
    }
    test::expect_close(got.at("y"), want.at("y"), "y from the backward call T=" + std::to_string(T));
    // the final state the backward call hands out (its forward's): the reference forward's
    TensorMap fin = in;
    for (auto it = fin.begin(); it != fin.end();)
      it = it->first == "dy" || it->first.rfind("dfinal.", 0) == 0 ? fin.erase(it) : std::next(it);
    for (const auto& [n, t] : run_mixer(c.mixer, Mode::Reference, c.causal, c.params, fin))
      if (n != "y" && got.count(n)) test::expect_close(got.at(n), t, n + " from the backward call T=" + std::to_string(T));
  }
}

TEST_P(Grad, ParallelBackwardStableForLargeKeys) {
  const Case& c = GetParam();
  const MixerSpec& spec = find_mixer(c.mixer);
  ASSERT_TRUE(spec.backward) << c.mixer << " has no parallel backward";
  // T = 33 and, for a mechanism with a stress rule (the decay kernels' fast decays), past every
  // blocking constant too: chunks that decay too fast for the kernels' factored form
  std::vector<std::map<std::string, int64_t>> sizes{dims_for(c, 33)};
  if (spec.stress && !crossing_dims(spec, Scale::Grad, c.causal).empty())
    sizes.push_back(crossing_dims(spec, Scale::Grad, c.causal));
  for (const auto& dims : sizes) {
    TensorMap in = example_inputs(spec, dims, 5);
    stress_inputs(spec, in, true);  // the spec's stability rule, gradient version
    in = with_dy(in, c, 6);
    const TensorMap want = run_mixer(c.mixer, Mode::Reference, c.causal, c.params, in, true);
    const TensorMap got = run_mixer(c.mixer, Mode::Parallel, c.causal, c.params, in, true);
    for (const auto& [n, t] : want) {
      if (n == "y") continue;
      for (float x : got.at(n).data) ASSERT_TRUE(std::isfinite(x)) << n;
      EXPECT_LE(rel_rms(got.at(n), t, grad_floor(want)), 1e-3) << n << " T=" << dims.at("T");
    }
  }
}

// The backward at sizes past every blocking constant of the kernels (see test_mixers.cpp).
TEST_P(Grad, ParallelBackwardCrossesEveryBlock) {
  const Case& c = GetParam();
  const MixerSpec& spec = find_mixer(c.mixer);
  const auto dims = crossing_dims(spec, Scale::Grad, c.causal);
  if (dims.empty()) GTEST_SKIP() << "no blocking constants";
  const int64_t T = dims.at("T");
  const TensorMap in = with_dy(example_inputs(spec, dims, 41), c, 42);
  const TensorMap want = run_mixer(c.mixer, Mode::Reference, c.causal, c.params, in, true);
  const TensorMap got = run_mixer(c.mixer, Mode::Parallel, c.causal, c.params, in, true);
  for (const auto& [n, t] : want) {
    if (n == "y") continue;
    EXPECT_LE(rel_rms(got.at(n), t, grad_floor(want)), 1e-3) << n << " T=" << T << " C=" << dims.at("C");
  }
}

// The backward on what its forward kept (Call::keep / Call::reuse: what linmix.ops and linmix train
// run) gives exactly what the backward that recomputes the forward gives, past every blocking
// constant, from a state where the mechanism takes one: every gradient and the final state (not y,
// which its forward returned: run_mixer leaves it out). Every case whose forward keeps something
// (the gated kernels' causal forms, flash).
TEST(GradKept, BackwardOnTheKeptForwardEqualsTheRecomputingOne) {
  int keeping = 0;
  for (const Case& c : grad_cases()) {
    const MixerSpec& spec = find_mixer(c.mixer);
    if (!spec.backward) continue;
    SCOPED_TRACE(c.mixer + (c.causal ? " causal" : " non-causal") + (c.params.count("group") ? " group " + c.params.at("group") : ""));
    auto dims = crossing_dims(spec, Scale::Grad, c.causal);
    if (dims.empty()) dims = dims_for(c, 40);
    const TensorMap in = with_dy(example_inputs(spec, dims, 51), c, 52);
    TensorMap fwd_in;
    for (const auto& [n, t] : in)
      if (n != "dy" && n.rfind("dfinal.", 0) != 0) fwd_in[n] = t;
    std::shared_ptr<RunSaved> kept;
    run_mixer(c.mixer, Mode::Parallel, c.causal, c.params, fwd_in, false, true, true, &kept);
    if (!kept) continue;
    ++keeping;
    const TensorMap want = run_mixer(c.mixer, Mode::Parallel, c.causal, c.params, in, true);
    const TensorMap got = run_mixer(c.mixer, Mode::Parallel, c.causal, c.params, in, true, true, true, nullptr, kept.get());
    EXPECT_FALSE(got.count("y"));
    ASSERT_EQ(got.size() + 1, want.size());
    for (const auto& [n, t] : want) {
      if (n == "y") continue;
      ASSERT_TRUE(got.count(n)) << n;
      EXPECT_EQ(got.at(n).shape, t.shape) << n;
      EXPECT_TRUE(got.at(n).data == t.data) << n << " differs, T=" << dims.at("T");
    }
  }
  EXPECT_GE(keeping, 19);  // 10 mechanisms' causal forms (with their more_params), flash's non-causal ones
}

INSTANTIATE_TEST_SUITE_P(All, Grad, ::testing::ValuesIn(grad_cases()), case_name);

// The gated kernel's factored form with a few channels too fast for it (kernels/decay_chunk.cpp
// fast_channel: one channel of a head decaying at e^{-5} a step among slow ones, as RWKV-5's
// fastest channels): y, the final state and every gradient agree with the reference, past every
// chunk boundary, with D = 16 (two fast channels allowed there) and D = 9 (one).
TEST(DecayKernels, FewFastChannels) {
  for (const auto& [name, decay] : std::vector<std::pair<std::string, std::string>>{{"gla", "g"}, {"rwkv5", "w"}, {"rwkv6", "w"}})
    for (const int64_t D : {16, 9}) {
      const Case c{name, true, {}};
      const MixerSpec& spec = find_mixer(name);
      auto dims = crossing_dims(spec, Scale::Grad, true);
      dims["D"] = D;
      TensorMap in = example_inputs(spec, dims, 11);
      for (size_t i = 0; i < in[decay].data.size(); ++i)
        if (int64_t(i) % D == 3) in[decay].data[i] = -5.0f;
      in = with_dy(in, c, 12);
      const TensorMap want = run_mixer(name, Mode::Reference, true, {}, in, true);
      const TensorMap got = run_mixer(name, Mode::Parallel, true, {}, in, true);
      const std::string at = name + " D=" + std::to_string(D) + " T=" + std::to_string(dims.at("T"));
      test::expect_close(got.at("y"), want.at("y"), "y " + at);
      for (const auto& [n, t] : want) {
        if (n == "y") continue;
        EXPECT_LE(rel_rms(got.at(n), t, grad_floor(want)), 1e-3) << n << " " << at;
      }
      TensorMap fin = in;  // the forward alone: no dy, no dfinal
      for (auto it = fin.begin(); it != fin.end();)
        it = it->first == "dy" || it->first.rfind("dfinal.", 0) == 0 ? fin.erase(it) : std::next(it);
      const TensorMap fwd = run_mixer(name, Mode::Parallel, true, {}, fin);
      const TensorMap ref = run_mixer(name, Mode::Reference, true, {}, fin);
      test::expect_close(fwd.at("state.S"), ref.at("state.S"), "final state " + at);
    }
}

}  // namespace

// mamba's backward walks sixteen lanes at a time through every state index n and sums its dCm, dBm
// terms sixteen n at a time (hsum16x16), the rest of N one by one: at N = 19 (a group of 16 and 3
// more), C = 70 (a channel block of 64 and one of 6) and T = 40 (a chunk of 32 and one of 8), from
// a given state, with a gate z, D, a delta bias and a final state's gradient, every gradient and
// y equal the float64 reference's.
TEST(MambaBackward, SixteenStatesAtATime) {
  const Case c{"mamba", true, find_mixer("mamba").example_params};
  auto dims = dims_for(c, 40);
  dims["N"] = 19, dims["C"] = 70;
  const TensorMap in = with_dy(example_inputs(find_mixer("mamba"), dims, 61), c, 62);
  ASSERT_TRUE(in.count("z") && in.count("D") && in.count("state.h") && in.count("dfinal.h"));
  const TensorMap want = run_mixer("mamba", Mode::Reference, true, c.params, in, true);
  const TensorMap got = run_mixer("mamba", Mode::Parallel, true, c.params, in, true);
  for (const auto& [n, t] : want) {
    if (n == "y") continue;
    EXPECT_LE(rel_rms(got.at(n), t, grad_floor(want)), 1e-3) << n;
  }
  test::expect_close(got.at("y"), want.at("y"), "y from the backward call");
}
