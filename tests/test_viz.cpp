// linmix viz: the effective attention of every causal mechanism (value_weights) reproduces the
// mechanism's output for any values (the linearity viz rests on), softmax's weights are its
// attention probabilities computed here from q and k, and a model's maps are distributions.
#include <random>

#include "linmix/mixer.h"
#include "linmix/model.h"
#include "linmix/viz.h"
#include "test_util.h"

using namespace linmix;

namespace {

TensorMap one_sequence(const MixerSpec& spec, int64_t T, uint64_t seed) {
  auto dims = example_dims(spec, Scale::Test, T, true);
  dims["B"] = 1;
  return example_inputs(spec, dims, seed);
}

}  // namespace

// y_t(u) = sum_s W_ts(u) v_s(u) for fresh random values: the weights are the mechanism's, for
// every causal mechanism of the registry (norm_linear's output norm is not linear in v: viz
// shows its kernel products, those of linear).
TEST(Viz, WeightsReproduceEveryCausalMechanism) {
  const int64_t T = 37;  // crosses the probe's 16-position chunks
  for (const auto& spec : mixers()) {
    if (!spec.causal_ok) continue;
    TensorMap in = one_sequence(spec, T, 7);
    int64_t U = 0;
    const std::vector<double> W = value_weights(spec.name, spec.example_params, in, &U);
    const std::string vn = value_input(spec.name);
    std::mt19937_64 rng(3);
    std::normal_distribution<float> normal;
    for (float& x : in.at(vn).data) x = normal(rng);
    const Tensor y = run_mixer(spec.name, Mode::Reference, true, spec.example_params, in).at("y");
    ASSERT_EQ(y.numel(), T * U) << spec.name;
    double err = 0, scale = 0;
    for (int64_t t = 0; t < T; ++t)
      for (int64_t u = 0; u < U; ++u) {
        double want = 0;
        for (int64_t s = 0; s < T; ++s) {
          if (s > t) EXPECT_EQ(W[size_t((t * T + s) * U + u)], 0.0) << spec.name << ": weight on the future";
          want += W[size_t((t * T + s) * U + u)] * in.at(vn).data[size_t(s * U + u)];
        }
        err = std::max(err, std::fabs(want - y.data[size_t(t * U + u)]));
        scale = std::max(scale, std::fabs(want));
      }
    if (spec.name == "norm_linear")
      EXPECT_GT(err, 1e-2 * std::max(1.0, scale)) << "norm_linear became linear in v: viz could show its own weights";
    else
      EXPECT_LE(err, 1e-4 * std::max(1.0, scale)) << spec.name;
  }
}

TEST(Viz, SoftmaxWeightsAreItsAttentionProbabilities) {
  const MixerSpec& spec = find_mixer("softmax");
  const int64_t T = 21;
  const TensorMap in = one_sequence(spec, T, 9);
  const Tensor &q = in.at("q"), &k = in.at("k");
  const int64_t H = q.dim(2), D = q.dim(3), E = in.at("v").dim(3);
  int64_t U = 0;
  const std::vector<double> W = value_weights("softmax", {}, in, &U);
  ASSERT_EQ(U, H * E);
  for (int64_t h = 0; h < H; ++h)
    for (int64_t t = 0; t < T; ++t) {
      std::vector<double> p(size_t(t + 1));
      double mx = -1e300, sum = 0;
      for (int64_t s = 0; s <= t; ++s) {
        double dot = 0;
        for (int64_t d = 0; d < D; ++d) dot += double(q.data[size_t((t * H + h) * D + d)]) * k.data[size_t((s * H + h) * D + d)];
        p[size_t(s)] = dot / std::sqrt(double(D));
        mx = std::max(mx, p[size_t(s)]);
      }
      for (double& x : p) sum += (x = std::exp(x - mx));
      for (int64_t s = 0; s <= t; ++s)
        for (int64_t e = 0; e < E; ++e)
          EXPECT_NEAR(W[size_t((t * T + s) * U + h * E + e)], p[size_t(s)] / sum, 1e-6) << h << " " << t << " " << s;
    }
}

TEST(Viz, ModelMapsAreDistributionsOverThePast) {
  for (const std::string mixer : {"softmax", "rwkv4", "mamba", "gla", "norm_linear"}) {
    ModelConfig cfg = ModelConfig::from_json(R"({"d_model": 16, "n_layer": 2, "n_head": 2, "ctx": 32, "state": 4,
      "mixer": ")" + mixer + R"("})");
    Model m(cfg);
    m.init(1);
    std::vector<int32_t> toks;
    for (int i = 0; i < 24; ++i) toks.push_back((i * 37 + 11) % 256);
    const auto layers = effective_attention(m, toks);
    ASSERT_EQ(layers.size(), 2u) << mixer;
    for (const auto& la : layers) {
      EXPECT_EQ(la.mixer, mixer);
      const int64_t T = 24;
      for (int64_t g = 0; g < la.groups; ++g) {
        for (int64_t t = 0; t < T; ++t) {
          double sum = 0;
          for (int64_t s = 0; s < T; ++s) {
            const float w = la.weights[size_t((g * T + t) * T + s)];
            if (s > t) EXPECT_EQ(w, 0.0f);
            EXPECT_GE(w, 0.0f);
            sum += w;
          }
          EXPECT_NEAR(sum, 1.0, 1e-5) << mixer << " layer " << la.layer << " group " << g << " t " << t;
        }
        EXPECT_GE(la.lookback[size_t(g)], 0.0);
        EXPECT_LE(la.lookback[size_t(g)], (T - 1) / 2.0);
      }
    }
  }
  ModelConfig big = ModelConfig::from_json(R"({"d_model": 16, "n_layer": 1, "n_head": 2, "ctx": 8, "mixer": "softmax"})");
  Model m(big);
  m.init(1);
  EXPECT_THROW(effective_attention(m, std::vector<int32_t>(9, 1)), Error);  // past the learned positions
  EXPECT_THROW(effective_attention(m, std::vector<int32_t>(4, 300)), Error);  // outside the vocabulary
}
