// Facts of particular mechanisms that follow from their formulas alone (one token is its value,
// the AFT variants nest, a window of one is the identity) and performer's feature generator.
// The generic form, split and stability tests of every mechanism are in test_mixers.cpp.
#include <random>

#include "linmix/kernels.h"
#include "linmix/mixer.h"
#include "test_util.h"

using namespace linmix;

namespace {

std::map<std::string, int64_t> dims_for(const std::string& mixer, int64_t T, bool causal) {
  return example_dims(find_mixer(mixer), Scale::Test, T, causal);
}

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

// aft_conv's factored band (aft_band.cpp) scales a block of rows by its largest key: a key of +60
// inside a block whose other keys are -60 puts every other row's band ~120 below that scale, where
// e^{k - kappa} underflows and e^{kappa - lse_t} overflows. Those rows take the direct form, in the
// forward and in the backward; y and every gradient still equal the float64 reference.
TEST(MixerFacts, AftConvBandFarBelowItsBlockIsExact) {
  const MixerSpec& spec = find_mixer("aft_conv");
  for (bool causal : {true, false}) {
    std::map<std::string, int64_t> dims{{"B", 1}, {"T", 2 * kAftRows + 3}, {"C", 4}, {"H", 2}, {"K", causal ? 8 : 9}};
    TensorMap in = example_inputs(spec, dims, 3);
    for (int64_t i = 0; i < in.at("k").numel(); ++i) in["k"].data[size_t(i)] = -60.0f + 0.5f * in.at("k").data[size_t(i)];
    for (int64_t c = 0; c < 4; ++c) in["k"].data[size_t(60 * 4 + c)] = 60.0f;  // row 60 of block 0
    Tensor dy({1, dims["T"], 4});
    std::mt19937_64 rng(4);
    std::normal_distribution<float> normal;
    for (float& x : dy.data) x = normal(rng);
    in["dy"] = std::move(dy);
    const TensorMap want = run_mixer("aft_conv", Mode::Reference, causal, {}, in, true);
    const TensorMap got = run_mixer("aft_conv", Mode::Parallel, causal, {}, in, true);
    for (const char* n : {"y", "dq", "dk", "dv", "du"})
      test::expect_close(got.at(n), want.at(n), std::string(causal ? "causal " : "non-causal ") + n, 1e-3);
  }
}

// aft_local's factored band (aft_band.cpp, AftBand::factor_rows) scales each row by its own
// largest bias and a block by its largest key: rows whose biases sit 120 apart (+-60), keys of
// +60 among keys of -60, and a row whose largest bias lies far from its largest key put terms
// below float's range in the factored sums; those (t, c) take the direct form. y and every
// gradient (dw included) still equal the float64 reference, in blocks of rows and across them.
TEST(MixerFacts, AftLocalRowsFarApartAreExact) {
  const MixerSpec& spec = find_mixer("aft_local");
  for (bool causal : {true, false}) {
    const int64_t T = 2 * kAftRows + 3;
    std::map<std::string, int64_t> dims{{"B", 1}, {"T", T}, {"C", 4}, {"Tw", T}};
    TensorMap in = example_inputs(spec, dims, 3);
    for (int64_t i = 0; i < in.at("k").numel(); ++i) in["k"].data[size_t(i)] = -60.0f + 0.5f * in.at("k").data[size_t(i)];
    // keys of +60 in rows 60 and 120: row 120 is in the key window of rows 64..127 but (causal)
    // in neither the band nor the prefix of row 70, whose band's terms e^{-60 + 50} then lead
    // while their factors e^{k - 60} underflow
    for (int64_t c = 0; c < 4; ++c) in["k"].data[size_t(60 * 4 + c)] = in["k"].data[size_t(120 * 4 + c)] = 60.0f;
    for (int64_t t = 0; t < T; ++t)  // a row's biases near +60 or -60 by turns of 5 rows; row 70's
      for (int64_t s = 0; s < T; ++s) {  // largest bias far from its large keys
        float& w = in["w"].data[size_t(t * T + s)];
        w = (t / 5) % 2 ? 60.0f + 0.3f * w : -60.0f + 0.3f * w;
        if (t == 70) w = s == 66 ? 50.0f : -50.0f;
      }
    Tensor dy({1, T, 4});
    std::mt19937_64 rng(5);
    std::normal_distribution<float> normal;
    for (float& x : dy.data) x = normal(rng);
    in["dy"] = std::move(dy);
    const std::map<std::string, std::string> params{{"window", "9"}};
    const TensorMap want = run_mixer("aft_local", Mode::Reference, causal, params, in, true);
    const TensorMap got = run_mixer("aft_local", Mode::Parallel, causal, params, in, true);
    for (const char* n : {"y", "dq", "dk", "dv", "dw"})
      test::expect_close(got.at(n), want.at(n), std::string(causal ? "causal " : "non-causal ") + n, 1e-3);
  }
}
