// The inference engines (RWKV-4, RWKV-5/6/7, Mamba, Mamba-2): sequence mode in chunks of 1, 7 and 64 gives
// the same logits and the same state as the training model's recurrent step token by token, from
// a zero state and from a state half-way through; states cross between the two paths; decode
// allocates nothing; the gemv kernels of every weight type equal a float64 product of the weights
// they stand for.
#include <omp.h>

#include <functional>
#include <atomic>
#include <cstdlib>
#include <strings.h>
#include <new>
#include <random>

#include "../src/kernels/blas.h"
#include "../src/kernels/gemv.h"
#include "linmix/mixer.h"
#include "linmix/model.h"
#include "linmix/engine.h"
#include "linmix/rwkv4.h"
#include "linmix/safetensors.h"
#include "linmix/train.h"
#include "test_util.h"

using namespace linmix;

namespace {

std::unique_ptr<Model> rwkv_model(bool ln0 = true) {
  auto m = std::make_unique<Model>(ModelConfig::from_json(
      R"({"vocab": 50, "d_model": 40, "n_layer": 3, "ffn_mult": 4, "mixer": "rwkv4", "channel_mix": "rwkv", "ln0": )" +
      std::string(ln0 ? "true" : "false") + "}"));
  m->init(11);
  std::mt19937_64 rng(5);
  std::normal_distribution<float> n(0.0f, 0.3f);
  for (auto& [name, t] : m->params())  // larger than the init so that every path matters
    if (name.find("ln") == std::string::npos)
      for (float& x : t.data) x = x * 6.0f + (name.find("time_") != std::string::npos ? n(rng) : 0.0f);
  return m;
}

template <class A, class B>
double max_rel(const A& a, const B& b) {
  double m = 0, s = 1e-6;
  for (size_t i = 0; i < a.size(); ++i) m = std::max(m, double(std::fabs(a[i] - b[i]))), s = std::max(s, double(std::fabs(b[i])));
  return m / s;
}

void expect_same_state(const Model& m, const Model::State& a, const Model::State& b, double tol) {
  const TensorMap ta = m.state_tensors(a), tb = m.state_tensors(b);
  ASSERT_EQ(ta.size(), tb.size());
  for (const auto& [n, t] : ta) {
    ASSERT_TRUE(tb.count(n)) << n;
    EXPECT_LE(max_rel(t.data, tb.at(n).data), tol) << n;
  }
}

// The engine against the training model's recurrent step on 150 tokens: sequence mode in
// chunks of 1, 7, 64 and 150 (logits, position and state), decode, a prefill asked for its last
// logits only, and states crossing both ways (33 tokens by the model's step, saved and reloaded,
// the rest by the engine; 50 by the engine, the rest by the model's step).
void expect_engine_equals_step(Model& m, Engine& eng, double tol) {
  const int64_t T = 150, V = m.config().vocab;
  std::vector<int32_t> toks(T);
  std::mt19937 rng(3);
  for (auto& t : toks) t = int32_t(rng() % V);
  Model::State ref = m.new_state();
  std::vector<float> want(T * V);
  for (int64_t t = 0; t < T; ++t) m.step(toks[t], ref, want.data() + t * V);
  const std::vector<float> want_last(want.end() - V, want.end());
  for (int64_t chunk : {1, 7, 64, 150}) {
    Model::State st = eng.new_state();
    std::vector<float> got(T * V);
    for (int64_t t0 = 0; t0 < T; t0 += chunk)
      eng.sequence(toks.data() + t0, std::min(chunk, T - t0), st, got.data() + t0 * V, true);
    EXPECT_LE(max_rel(got, want), tol) << "chunk " << chunk;
    EXPECT_EQ(st.pos, T);
    expect_same_state(m, st, ref, tol);
  }
  Model::State st = eng.new_state();
  std::vector<float> got(T * V), lg(V);
  for (int64_t t = 0; t < T; ++t) eng.step(toks[t], st, got.data() + t * V);
  EXPECT_LE(max_rel(got, want), tol);
  expect_same_state(m, st, ref, tol);
  Model::State st2 = eng.new_state();
  eng.sequence(toks.data(), T, st2, lg.data());
  EXPECT_LE(max_rel(lg, want_last), tol);
  Model::State half = m.new_state();
  for (int64_t t = 0; t < 33; ++t) m.step(toks[t], half, lg.data());
  Model::State s2 = m.state_from_tensors(m.state_tensors(half));
  eng.sequence(toks.data() + 33, T - 33, s2, lg.data());
  EXPECT_LE(max_rel(lg, want_last), tol);
  Model::State e = eng.new_state();
  eng.sequence(toks.data(), 50, e, nullptr);
  for (int64_t t = 50; t < T; ++t) m.step(toks[t], e, lg.data());
  EXPECT_LE(max_rel(lg, want_last), tol);
}

}  // namespace

class Rwkv4EngineLn0 : public ::testing::TestWithParam<bool> {};

TEST_P(Rwkv4EngineLn0, SequenceChunksEqualTokenByToken) {
  auto m = rwkv_model(GetParam());
  Rwkv4Engine eng(*m, WType::F32);
  expect_engine_equals_step(*m, eng, 1e-5);
}

INSTANTIATE_TEST_SUITE_P(WithAndWithoutLn0, Rwkv4EngineLn0, ::testing::Bool());

// Past every blocking of sequence(): C crosses a scan block (kScanBlock + 16 channels), and one
// call of T = kPass + 76 tokens crosses an internal pass; equal to the model's recurrent step.
TEST(Rwkv4Engine, CrossesScanBlocksAndPasses) {
  const int64_t C = Rwkv4Engine::kScanBlock + 16, T = Rwkv4Engine::kPass + 76, V = 30;
  Model m(ModelConfig::from_json(R"({"vocab": 30, "d_model": )" + std::to_string(C) +
                                 R"(, "n_layer": 2, "ffn_mult": 2, "mixer": "rwkv4", "channel_mix": "rwkv", "ln0": true})"));
  m.init(4);
  std::mt19937_64 rng(6);
  std::normal_distribution<float> n(0.0f, 0.3f);
  for (auto& [name, t] : m.params())
    if (name.find("ln") == std::string::npos)
      for (float& x : t.data) x = x * 6.0f + (name.find("time_") != std::string::npos ? n(rng) : 0.0f);
  std::vector<int32_t> toks(T);
  for (auto& t : toks) t = int32_t(rng() % V);
  Model::State ref = m.new_state();
  std::vector<float> want(T * V), got(T * V);
  for (int64_t t = 0; t < T; ++t) m.step(toks[t], ref, want.data() + t * V);
  Rwkv4Engine eng(m, WType::F32);
  Model::State st = eng.new_state();
  eng.sequence(toks.data(), T, st, got.data(), true);
  EXPECT_LE(max_rel(got, want), 1e-4);
  expect_same_state(m, st, ref, 1e-4);
}

TEST(Rwkv4Engine, ContinuesFromAStateOfTheOtherPath) {
  auto m = rwkv_model();
  const int64_t T = 90, V = 50;
  std::vector<int32_t> toks(T);
  for (int64_t t = 0; t < T; ++t) toks[t] = int32_t((t * 7 + 3) % V);
  Model::State ref = m->new_state();
  std::vector<float> want(V);
  for (int64_t t = 0; t < T; ++t) m->step(toks[t], ref, want.data());
  Rwkv4Engine eng(*m, WType::F32);
  // first 33 tokens by the model's step, saved and reloaded as tensors, the rest by the engine
  Model::State half = m->new_state();
  std::vector<float> lg(V);
  for (int64_t t = 0; t < 33; ++t) m->step(toks[t], half, lg.data());
  Model::State st = m->state_from_tensors(m->state_tensors(half));
  eng.sequence(toks.data() + 33, T - 33, st, lg.data());
  EXPECT_LE(max_rel(lg, want), 1e-5);
  expect_same_state(*m, st, ref, 1e-5);
  // and the other way round: the engine's state continues in the model's step
  Model::State e = eng.new_state();
  eng.sequence(toks.data(), 50, e, nullptr);
  for (int64_t t = 50; t < T; ++t) m->step(toks[t], e, lg.data());
  EXPECT_LE(max_rel(lg, want), 1e-5);
}

TEST(Rwkv4Engine, RejectsOtherModelsAndBadStates) {
  Model softmax(ModelConfig::from_json(R"({"vocab": 20, "d_model": 16, "n_layer": 1, "mixer": "softmax"})"));
  EXPECT_THROW(Rwkv4Engine(softmax, WType::F32), Error);
  auto m = rwkv_model();
  Rwkv4Engine eng(*m, WType::I8);
  Model::State st = eng.new_state();
  std::vector<float> lg(50);
  EXPECT_THROW(eng.step(50, st, lg.data()), Error);
  st.layer.pop_back();
  EXPECT_THROW(eng.step(1, st, lg.data()), Error);
}

TEST(Gemv, EveryTypeEqualsFloat64ProductOfItsWeights) {
  std::mt19937_64 rng(9);
  std::normal_distribution<float> n(0.0f, 1.0f);
  for (auto [rows, cols] : {std::pair<int64_t, int64_t>{1, 1}, {5, 3}, {37, 24}, {64, 768}, {300, 131}}) {
    std::vector<float> W(rows * cols), x(cols), y(rows), deq(rows * cols);
    for (auto& e : W) e = n(rng);
    for (auto& e : x) e = n(rng);
    for (WType t : {WType::F32, WType::BF16, WType::I8, WType::Q4}) {
      const QMatrix q = QMatrix::from_f32(W.data(), rows, cols, t);
      q.to_f32(deq.data());
      gemv(q, x.data(), y.data());
      // INT8 on AVX-512 and Q4 on every ISA multiply x rounded to int16: at most half its step
      // (max|x| / 32767; Q4's max|x| / 32639) off an element, so sum_c |w_c| of that more off the
      // row (Q4: sum_c |d (q_c - 7.5)|, the rest of x's rounding corrected through its group sums)
      float xmax = 0.0f;
      for (float e : x) xmax = std::max(xmax, std::fabs(e));
      const double xhalf = t == WType::I8 && std::string(gemv_isa()).rfind("avx512", 0) == 0 ? xmax / 32767.0 / 2.0
                           : t == WType::Q4                                                  ? xmax / 32639.0 / 2.0
                                                                                             : 0.0;
      for (int64_t r = 0; r < rows; ++r) {
        double want = 0, mag = 0, wsum = 0;
        for (int64_t c = 0; c < cols; ++c)
          want += double(deq[r * cols + c]) * x[c], mag += std::fabs(deq[r * cols + c] * x[c]),
              wsum += std::fabs(deq[r * cols + c] - (t == WType::Q4 ? f16_to_f32(q.q4m[q.q4_at(r, c / 64)]) +
                                                                             7.5f * f16_to_f32(q.q4d[q.q4_at(r, c / 64)])
                                                                       : 0.0f));
        EXPECT_NEAR(y[r], want, 1e-5 * mag + xhalf * wsum + 1e-6) << wtype_name(t) << " " << rows << "x" << cols << " row " << r;
      }
      // the rounding itself: bf16 keeps 8 bits of mantissa, int8 steps of max|w_row| / 127, q4
      // half a step of its group of 64, the step (max - min) / 15 (min rounded down and the step
      // rounded up to fp16: a relative 2^-10 each, and fp16's smallest step 6e-8)
      for (int64_t i = 0; i < rows * cols; ++i) {
        const int64_t r = i / cols, g = (i % cols) / 64;
        float lo = W[r * cols + g * 64], hi = lo;
        for (int64_t c = g * 64; c < std::min(cols, g * 64 + 64); ++c) lo = std::min(lo, W[r * cols + c]), hi = std::max(hi, W[r * cols + c]);
        const float tol = t == WType::F32    ? 0.0f
                          : t == WType::BF16 ? std::fabs(W[i]) / 256.0f
                          : t == WType::I8   ? q.scale[i / cols] * 0.5f
                                             : f16_to_f32(q.q4d[q.q4_at(r, g)]) * 0.5f;
        EXPECT_LE(std::fabs(deq[i] - W[i]), tol * 1.0001f + 1e-7f) << wtype_name(t);
        if (t == WType::Q4)
          EXPECT_LE(tol, (hi - lo + std::fabs(lo) / 1024.0f) / 30.0f * 1.001f + 4e-7f) << "q4 step, row " << r << " group " << g;
      }
    }
  }
  // INT8's and Q4's integer products at their largest (every weight and x at its maximum: INT8
  // +-2 everywhere, Q4 rows of 0 and +-15, steps of 1, nibbles 0 and 15) over rows longer than one
  // int32 segment of the AVX-512 INT8 kernel (8192 columns): exact, no lane overflows; and a NaN
  // in x reaches y (the FP32 kernel takes such an x)
  for (WType t : {WType::I8, WType::Q4})
    for (int64_t cols : {int64_t(8192), int64_t(3 * 8192 + 17)}) {
      std::vector<float> W(size_t(5 * cols)), x(size_t(cols), 1.0f), y(5), want(5, 0.0f);
      for (size_t i = 0; i < W.size(); ++i) {
        const float sign = (i / size_t(cols)) % 2 ? -1.0f : 1.0f;
        W[i] = t == WType::I8 ? 2.0f * sign : (i % size_t(cols)) % 2 ? 15.0f * sign : 0.0f;
        want[i / size_t(cols)] += W[i];
      }
      const QMatrix q = QMatrix::from_f32(W.data(), 5, cols, t);
      gemv(q, x.data(), y.data());
      for (int64_t r = 0; r < 5; ++r) EXPECT_NEAR(y[r], want[size_t(r)], 1e-5 * std::fabs(want[size_t(r)])) << wtype_name(t) << " " << cols;
      x[size_t(cols / 2)] = NAN;
      gemv(q, x.data(), y.data());
      for (int64_t r = 0; r < 5; ++r) EXPECT_TRUE(std::isnan(y[r])) << wtype_name(t) << " " << cols;
      // an x of denormals (1 / its int16 step would overflow): the products stay finite and right
      // (to the FP32 sum's rounding of 24593 equal terms)
      const float tiny = 1e-40f;
      std::fill(x.begin(), x.end(), tiny);
      gemv(q, x.data(), y.data());
      for (int64_t r = 0; r < 5; ++r)
        EXPECT_NEAR(y[r], double(want[size_t(r)]) * double(tiny), 1e-4 * std::fabs(want[size_t(r)]) * double(tiny)) << wtype_name(t) << " " << cols;
    }
  EXPECT_EQ(f32_to_bf16(1.0f), 0x3f80);
  EXPECT_EQ(f32_to_bf16(bf16_to_f32(0x3f81)), 0x3f81);
  EXPECT_THROW(parse_wtype("fp8"), Error);
  EXPECT_EQ(parse_wtype("q4"), WType::Q4);
}

// Q4 on AVX-512 rounds x to int16 and corrects 7.5 d_g times the rounding of each group's sum of x
// (q4_group_sums): what is left of x's rounding in a row is sum_c d (q_c - 7.5) e_c. An x whose
// every element sits 0.49 of a step above a step (e_c all of one sign and near their largest) holds
// that bound only with the correction there and of the right sign (without it, the row is about
// twice the bound off; with it of the wrong sign, four times).
TEST(Gemv, Q4CorrectsTheRoundingOfXThroughItsGroupSums) {
  std::mt19937_64 rng(13);
  std::normal_distribution<float> n(0.0f, 1.0f);
  std::uniform_int_distribution<int> k(-30000, 30000);
  const int64_t rows = 40, cols = 768 + 64 + 17;
  std::vector<float> W(static_cast<size_t>(rows * cols)), x(static_cast<size_t>(cols)), y(static_cast<size_t>(rows)),
      deq(static_cast<size_t>(rows * cols));
  for (auto& e : W) e = n(rng);
  for (auto& e : x) e = (float(k(rng)) + 0.49f) / 32639.0f;
  x[5] = 1.0f;  // max|x|: the step is 1 / 32639 (quantize_q4x)
  const QMatrix q = QMatrix::from_f32(W.data(), rows, cols, WType::Q4);
  q.to_f32(deq.data());
  gemv(q, x.data(), y.data());
  for (int64_t r = 0; r < rows; ++r) {
    double want = 0, mag = 0, bound = 0;
    for (int64_t c = 0; c < cols; ++c) {
      const double d = f16_to_f32(q.q4d[q.q4_at(r, c / 64)]), m = f16_to_f32(q.q4m[q.q4_at(r, c / 64)]);
      want += double(deq[size_t(r * cols + c)]) * x[size_t(c)], mag += std::fabs(deq[size_t(r * cols + c)] * x[size_t(c)]);
      bound += std::fabs(deq[size_t(r * cols + c)] - m - 7.5 * d) / 32639.0 / 2.0;
    }
    EXPECT_NEAR(y[size_t(r)], want, bound + 1e-6 * mag) << "row " << r;
  }
}

// Several products in one gemv_many call share the threads by bytes read (a C x 3.5C FP32 matrix
// beside narrow INT8 ones, row counts off the 16-row blocks): every row of every product written,
// each equal to the same product run alone.
TEST(Gemv, ManyProductsOfMixedShapesAndTypesEqualEachAlone) {
  std::mt19937_64 rng(11);
  std::normal_distribution<float> n(0.0f, 1.0f);
  struct P {
    int64_t rows, cols;
    WType t;
  };
  const std::vector<P> ps = {{768, 2688, WType::F32}, {769, 64, WType::I8}, {33, 768, WType::BF16},
                             {1000, 300, WType::I8}, {5, 7, WType::Q4},    {250, 1024, WType::Q4}};
  std::vector<QMatrix> qs;
  std::vector<std::vector<float>> xs, ys, alone;
  for (const P& p : ps) {
    std::vector<float> W(size_t(p.rows * p.cols));
    for (auto& e : W) e = n(rng);
    qs.push_back(QMatrix::from_f32(W.data(), p.rows, p.cols, p.t));
    xs.emplace_back(size_t(p.cols));
    for (auto& e : xs.back()) e = n(rng);
    ys.emplace_back(size_t(p.rows), NAN);
    alone.emplace_back(size_t(p.rows));
  }
  std::vector<GemvJob> jobs;
  for (size_t j = 0; j < ps.size(); ++j) {
    jobs.push_back({&qs[j], xs[j].data(), ys[j].data()});
    gemv(qs[j], xs[j].data(), alone[j].data());
  }
  const int before_threads = omp_get_max_threads();
  for (int threads : {1, 2, 3}) {
    omp_set_num_threads(threads);
    for (auto& y : ys) std::fill(y.begin(), y.end(), NAN);
    gemv_many(jobs.data(), int(jobs.size()));
    for (size_t j = 0; j < ps.size(); ++j)
      for (int64_t r = 0; r < ps[j].rows; ++r)
        ASSERT_EQ(ys[j][size_t(r)], alone[j][size_t(r)]) << "product " << j << " row " << r << ", " << threads << " threads";
  }
  omp_set_num_threads(before_threads);
}

// ---- the RWKV-5/6/7 engine (make_engine): the same contract against the training model's
// recurrent step (the models' blocks as BlinkDL's, random weights made larger than the init)

namespace {
std::unique_ptr<Model> rwkvx_model(const std::string& v, int64_t C, int64_t H) {
  const std::string cm = v == "5" ? "rwkv" : "rwkv" + v;
  auto m = std::make_unique<Model>(ModelConfig::from_json(
      R"({"vocab": 50, "d_model": )" + std::to_string(C) + R"(, "n_layer": 3, "n_head": )" + std::to_string(H) +
      R"(, "ffn_dim": 72, "mixer": "rwkv)" + v + R"(", "channel_mix": ")" + cm +
      R"(", "ln0": true, "layers": [)" +
      [&] {
        std::string s;
        for (int i = 0; i < 3; ++i)
          s += std::string(i ? "," : "") + R"({"mixer": "rwkv)" + v + R"(", "params": {"d_mix": "4", "d_decay": "6", "d_w": "5", "d_a": "6", "d_v": "7", "d_g": "8"}})";
        return s;
      }() + "]}"));
  m->init(7);
  std::mt19937_64 rng(5);
  std::normal_distribution<float> n(0.0f, 0.3f);
  for (auto& [name, t] : m->params())
    if (name.find("ln") == std::string::npos && name.find("decay") == std::string::npos && name.find("w0") == std::string::npos)
      for (float& x : t.data) x = x * 3.0f + n(rng) * 0.3f;
  return m;
}
}  // namespace

class RwkvEngineVersion : public ::testing::TestWithParam<std::string> {};

TEST_P(RwkvEngineVersion, SequenceChunksDecodeAndStatesEqualTheModelsStep) {
  auto m = rwkvx_model(GetParam(), 48, 3);
  ASSERT_TRUE(engine_supports(m->config()));
  const auto eng = make_engine(*m, WType::F32);
  expect_engine_equals_step(*m, *eng, 1e-4);
}

INSTANTIATE_TEST_SUITE_P(V567, RwkvEngineVersion, ::testing::Values("5", "6", "7"));

// A state of 2^15 floats a layer (2 heads of 128): decode runs its heads' WKV and GN on the
// threads (kHeadsParallelFloats), each head's v7 a^T S in its own scratch.
TEST(RwkvEngine, DecodeWithHeadsOverTheThreadsEqualsTheModelsStep) {
  const int before_threads = omp_get_max_threads();
  omp_set_num_threads(2);
  for (const char* v : {"6", "7"}) {
    auto m = rwkvx_model(v, 256, 2);
    const auto eng = make_engine(*m, WType::F32);
    expect_engine_equals_step(*m, *eng, 1e-4);
  }
  omp_set_num_threads(before_threads);
}

TEST(RwkvEngine, OnePrefillCrossesAnInternalPass) {
  auto m = rwkvx_model("7", 32, 2);
  const int64_t T = 600, V = 50;  // passes of 512 rows
  std::vector<int32_t> toks(T);
  for (int64_t t = 0; t < T; ++t) toks[t] = int32_t((t * 13 + 5) % V);
  Model::State ref = m->new_state();
  std::vector<float> want(T * V), got(T * V);
  for (int64_t t = 0; t < T; ++t) m->step(toks[t], ref, want.data() + t * V);
  const auto eng = make_engine(*m, WType::F32);
  Model::State st = eng->new_state();
  eng->sequence(toks.data(), T, st, got.data(), true);
  EXPECT_LE(max_rel(got, want), 1e-4);
  expect_same_state(*m, st, ref, 1e-4);
}

TEST(RwkvEngine, RefusesModelsItDoesNotRun) {
  std::string why;
  EXPECT_FALSE(engine_supports(ModelConfig::from_json(R"({"vocab": 20, "d_model": 16, "n_layer": 1, "mixer": "rwkv7", "channel_mix": "mlp", "ln0": true})"), &why));
  EXPECT_NE(why.find("channel mix"), std::string::npos) << why;
  EXPECT_FALSE(engine_supports(ModelConfig::from_json(R"({"vocab": 20, "d_model": 16, "n_layer": 1, "mixer": "gla"})"), &why));
  Model gla(ModelConfig::from_json(R"({"vocab": 20, "d_model": 16, "n_layer": 1, "mixer": "gla"})"));
  EXPECT_THROW(make_engine(gla, WType::F32), Error);
}

// Mamba and Mamba-2 as their published models (RMSNorm, no channel mix); Mamba-2 with two groups
// of state 6 over 4 heads of 12 (150 tokens cross the chunked SSD's chunks of 64).
namespace {
std::unique_ptr<Model> mamba_model(const std::string& mixer) {
  auto m = std::make_unique<Model>(ModelConfig::from_json(
      R"({"vocab": 50, "d_model": 24, "n_layer": 2, "n_head": 4, "state": 6, "mixer": ")" + mixer +
      R"(", "params": {)" + (mixer == "mamba2" ? R"("groups": "2")" : "") +
      R"(}, "channel_mix": "none", "norm": "rmsnorm", "ln0": false, "pos_emb": false})"));
  m->init(3);
  std::mt19937_64 rng(5);
  std::normal_distribution<float> n(0.0f, 0.3f);
  for (auto& [name, t] : m->params())  // the projections larger than the init; the time steps kept alive
    if (name.find("proj") != std::string::npos)
      for (float& x : t.data) x = x * 6.0f + n(rng) * 0.1f;
  return m;
}
}  // namespace

TEST(MambaEngines, SequenceChunksDecodeAndStatesEqualTheModelsStep) {
  for (const char* mixer : {"mamba", "mamba2"}) {
    SCOPED_TRACE(mixer);
    auto m = mamba_model(mixer);
    ASSERT_TRUE(engine_supports(m->config()));
    const auto eng = make_engine(*m, WType::F32);
    expect_engine_equals_step(*m, *eng, 1e-4);
  }
}

// ---- decode allocates nothing: operator new counted while engines step (after a warm-up step)

namespace {
std::atomic<long> g_news{0};
}  // namespace
void* operator new(std::size_t n) {
  g_news.fetch_add(1, std::memory_order_relaxed);
  if (void* p = std::malloc(n ? n : 1)) return p;
  throw std::bad_alloc();
}
void* operator new[](std::size_t n) { return operator new(n); }
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }

TEST(Engines, DecodeAllocatesNothing) {
  std::vector<std::unique_ptr<Model>> models;
  models.push_back(rwkv_model());
  for (const char* v : {"5", "6", "7"}) models.push_back(rwkvx_model(v, 32, 2));
  models.push_back(mamba_model("mamba"));
  models.push_back(mamba_model("mamba2"));
  for (const auto& m : models)
    for (WType wt : {WType::F32, WType::I8}) {
      const auto eng = make_engine(*m, wt);
      Model::State st = eng->new_state();
      std::vector<float> lg(size_t(m->config().vocab));
      eng->step(1, st, lg.data());  // the first step sizes the buffers and the state
      const long before = g_news.load();
      for (int32_t t = 2; t < 7; ++t) eng->step(t, st, lg.data());
      EXPECT_EQ(g_news.load() - before, 0) << m->config().layers[0].mixer << " " << int(wt);
    }
}

// An engine that takes the model's weights (make_engine(m, wt, true): one copy in memory) runs
// exactly as one that copies them, for every engine and weight type; the model it took them from
// keeps its state functions but refuses to run.
namespace {
// Two engines of the same weights fed the same tokens (a sequence with every logit, then a step):
// the same logits, bit for bit.
void expect_same_logits(Engine& a, Engine& b, Model::State& sa, Model::State& sb, const std::vector<int32_t>& toks,
                        int64_t V, const std::string& what) {
  const int64_t T = int64_t(toks.size());
  std::vector<float> la(size_t(T * V)), lb(size_t(T * V));
  a.sequence(toks.data(), T, sa, la.data(), true);
  b.sequence(toks.data(), T, sb, lb.data(), true);
  EXPECT_EQ(la, lb) << what;
  a.step(2, sa, la.data()), b.step(2, sb, lb.data());
  EXPECT_TRUE(std::equal(la.begin(), la.begin() + V, lb.begin())) << what;
}
}  // namespace

TEST(Engines, TakingTheWeightsEqualsCopyingThem) {
  std::vector<std::function<std::unique_ptr<Model>()>> makers = {[] { return rwkv_model(); },
                                                                  [] { return mamba_model("mamba"); },
                                                                  [] { return mamba_model("mamba2"); }};
  for (const char* v : {"5", "6", "7"}) makers.push_back([v] { return rwkvx_model(v, 32, 2); });
  const std::vector<int32_t> toks = {3, 1, 4, 1, 5, 9, 2};
  for (const auto& make : makers)
    for (WType wt : {WType::F32, WType::BF16, WType::I8}) {
      auto kept = make(), given = make();
      const std::string what = kept->config().layers[0].mixer + " " + wtype_name(wt);
      const auto a = make_engine(*kept, wt);
      const auto b = make_engine(*given, wt, true);
      const int64_t V = kept->config().vocab;
      Model::State sa = a->new_state(), sb = given->new_state();
      expect_same_logits(*a, *b, sa, sb, toks, V, what);
      for (const auto& [n, t] : given->params()) EXPECT_TRUE(t.data.empty()) << what << ": " << n << " still held";
      EXPECT_EQ(given->state_tensors(sb).size(), kept->state_tensors(sa).size()) << what;
      std::vector<float> lg(static_cast<size_t>(V));
      Model::State st = given->new_state();
      EXPECT_THROW(given->step(1, st, lg.data()), Error) << what;
      EXPECT_NO_THROW(kept->step(1, st, lg.data())) << what;
    }
}

// ---- converted checkpoints (linmix convert, src/model/packed.cpp): the file holds the engine's
// matrices as the engine would have converted them; loading it gives an engine whose logits and
// states equal, bit for bit, the engine built from the FP32 model in that type, with no FP32
// matrix resident; every damaged piece is refused by name.

namespace {
std::vector<std::function<std::unique_ptr<Model>()>> engine_models() {
  std::vector<std::function<std::unique_ptr<Model>()>> makers = {[] { return rwkv_model(); },
                                                                  [] { return mamba_model("mamba"); },
                                                                  [] { return mamba_model("mamba2"); }};
  for (const char* v : {"5", "6", "7"}) makers.push_back([v] { return rwkvx_model(v, 40, 2); });
  return makers;
}

std::string expect_error(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  ADD_FAILURE() << "no Error thrown";
  return "";
}
}  // namespace

TEST(ConvertedCheckpoint, LoadsAsTheEngineConvertsEveryModelAndType) {
  const std::string dir = test::tmp_dir();
  const std::vector<int32_t> toks = {3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5};
  for (const auto& make : engine_models())
    for (WType wt : {WType::BF16, WType::I8, WType::Q4}) {
      auto m = make();
      const std::string what = m->config().layers[0].mixer + " " + wtype_name(wt);
      const std::string src = dir + "/src.safetensors", out = dir + "/out.safetensors";
      save_checkpoint(src, *m, AdamW{}, 12, "{}");
      convert_checkpoint(src, out, wt, true);
      Checkpoint ck = load_checkpoint(out);
      ASSERT_TRUE(ck.model->packed()) << what;
      EXPECT_EQ(ck.model->num_params(), m->num_params()) << what;
      EXPECT_EQ(ck.step, 12) << what;
      int64_t held = 0;  // the FP32 values loaded: no matrix among them
      for (const auto& [n, t] : ck.model->params()) held += t.numel();
      EXPECT_LT(double(held), 0.8 * double(m->num_params())) << what;
      EXPECT_EQ(resolve_wtype(*ck.model, ""), wt) << what;
      const auto want = make_engine(*m, wt);
      const auto got = make_engine(*ck.model, resolve_wtype(*ck.model, ""), true);
      Model::State sa = want->new_state(), sb = got->new_state();
      expect_same_logits(*want, *got, sa, sb, toks, m->config().vocab, what);
      const TensorMap ta = m->state_tensors(sa), tb = m->state_tensors(sb);
      for (const auto& [n, t] : ta) EXPECT_EQ(t.data, tb.at(n).data) << what << " " << n;
    }
}

TEST(ConvertedCheckpoint, RunsOnlyInItsTypeAndOnlyInTheEngine) {
  const std::string dir = test::tmp_dir();
  auto m = rwkvx_model("6", 40, 2);
  save_checkpoint(dir + "/src.safetensors", *m, AdamW{}, 0, "{}");
  convert_checkpoint(dir + "/src.safetensors", dir + "/q.safetensors", WType::I8, false);
  Checkpoint ck = load_checkpoint(dir + "/q.safetensors");
  EXPECT_NE(expect_error([&] { resolve_wtype(*ck.model, "q4"); }).find("--dtype int8"), std::string::npos);
  EXPECT_NE(expect_error([&] { make_engine(*ck.model, WType::F32); }).find("--dtype int8"), std::string::npos);
  std::vector<float> lg(50);
  Model::State st = ck.model->new_state();
  EXPECT_NE(expect_error([&] { ck.model->step(1, st, lg.data()); }).find("stored as int8"), std::string::npos);
  const int32_t t[2] = {1, 2};
  EXPECT_NE(expect_error([&] { ck.model->logits(t, 1, 2); }).find("linmix convert"), std::string::npos);
  // not over an existing file without force, not from a converted file, not into its input
  EXPECT_NE(expect_error([&] { convert_checkpoint(dir + "/src.safetensors", dir + "/q.safetensors", WType::Q4, false); })
                .find("--force"), std::string::npos);
  EXPECT_NE(expect_error([&] { convert_checkpoint(dir + "/q.safetensors", dir + "/r.safetensors", WType::Q4, false); })
                .find("already converted"), std::string::npos);
  EXPECT_NE(expect_error([&] { convert_checkpoint(dir + "/src.safetensors", dir + "/src.safetensors", WType::Q4, true); })
                .find("is the input"), std::string::npos);
  Model softmax(ModelConfig::from_json(R"({"vocab": 20, "d_model": 16, "n_layer": 1, "mixer": "softmax"})"));
  save_checkpoint(dir + "/sm.safetensors", softmax, AdamW{}, 0, "{}");
  EXPECT_NE(expect_error([&] { convert_checkpoint(dir + "/sm.safetensors", dir + "/r.safetensors", WType::I8, false); })
                .find("no inference engine"), std::string::npos);
}

TEST(ConvertedCheckpoint, RefusesEveryDamagedPieceByName) {
  const std::string dir = test::tmp_dir();
  auto m = rwkv_model();
  save_checkpoint(dir + "/src.safetensors", *m, AdamW{}, 0, "{}");
  const std::string W = "blocks.1.ffn.key.weight";  // [160, 40]: one Q4 group a row, short
  // (type, the damage, what the message must name)
  struct Case {
    WType t;
    std::function<void(SafeTensors&)> damage;
    std::string says;
  };
  const std::vector<Case> cases = {
      {WType::I8, [&](SafeTensors& s) { s.tensors.erase(W + ".scale"); }, W + ".scale' is missing"},
      {WType::I8, [&](SafeTensors& s) { s.tensors.at(W + ".scale").data[3] = -1.0f; }, W + ".scale': a scale"},
      {WType::I8, [&](SafeTensors& s) { s.tensors.at(W + ".scale").data[3] = NAN; }, W + ".scale': a scale"},
      {WType::I8, [&](SafeTensors& s) { s.raw.at(W).shape = {40, 40}; s.raw.at(W).i8.resize(1600); }, "expected I8 [160,40]"},
      {WType::I8, [&](SafeTensors& s) { s.raw.erase(W); s.tensors[W] = Tensor({160, 40}); }, W + ".scale' is no parameter"},
      {WType::I8, [&](SafeTensors& s) { s.raw["stray"] = RawTensor{"U8", {2}, {1, 2}, {}, {}}; }, "'stray' (U8) is no parameter"},
      {WType::I8, [&](SafeTensors& s) { s.metadata["linmix_packed"] = "q5"; }, "unknown weight type 'q5'"},
      {WType::BF16, [&](SafeTensors& s) { s.raw.at(W).u16[3] = 0x7f80; }, W + "': a non-finite"},
      {WType::BF16, [&](SafeTensors& s) { s.raw.at(W).dtype = "F16"; }, "expected BF16"},
      {WType::Q4, [&](SafeTensors& s) { s.raw.erase(W + ".q4_m"); }, W + ".q4_m' is missing"},
      {WType::Q4, [&](SafeTensors& s) { s.raw.at(W + ".q4_d").u16[0] = 0xbc00; }, W + ".q4_d': a negative step"},
      {WType::Q4, [&](SafeTensors& s) { s.raw.at(W + ".q4_m").u16[0] = 0x7c01; }, W + ".q4_m': a non-finite"},
      // the row-major layouts q4 files had before (groups of 32, then 64): the same bytes, refused
      {WType::Q4, [&](SafeTensors& s) { s.raw.at(W).shape = {160, 2, 16}; }, "expected U8 [10,1,512]"},
      {WType::Q4, [&](SafeTensors& s) { s.raw.at(W).shape = {160, 1, 32}; }, "expected U8 [10,1,512]"},
      {WType::Q4, [&](SafeTensors& s) { s.metadata.erase("linmix_packed"); }, "is U8: a checkpoint's tensors are floats"},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    SCOPED_TRACE(i);
    const std::string good = dir + "/good.safetensors", bad = dir + "/bad.safetensors";
    convert_checkpoint(dir + "/src.safetensors", good, cases[i].t, true);
    SafeTensors s = read_safetensors(good);
    ASSERT_NO_THROW(load_checkpoint(good));
    cases[i].damage(s);
    write_safetensors(bad, s.tensors, s.raw, s.metadata);
    const std::string msg = expect_error([&] { load_checkpoint(bad); });
    EXPECT_NE(msg.find(cases[i].says), std::string::npos) << msg;
  }
}

// The engines do not check their own tensors on the way (run_mixer's check_values off in
// sequence mode): a model whose numbers overflow float32 is refused at its logits (head_logits),
// in sequence mode and in decode, by one error rather than sampled from.
TEST(Engines, OverflowingModelIsRefusedAtItsLogits) {
  std::vector<std::unique_ptr<Model>> models;
  models.push_back(rwkvx_model("7", 32, 2));
  models.push_back(rwkvx_model("5", 32, 2));
  models.push_back(mamba_model("mamba2"));
  for (auto& m : models) {
    for (float& x : m->params().at("head.weight").data) x = 3e38f;
    const auto eng = make_engine(*m, WType::F32);
    std::vector<float> lg(size_t(m->config().vocab));
    const std::vector<int32_t> toks{1, 2, 3, 4, 5};
    Model::State st = eng->new_state();
    EXPECT_THROW(eng->sequence(toks.data(), 5, st, lg.data()), Error) << m->config().layers[0].mixer;
    Model::State st2 = eng->new_state();
    EXPECT_THROW(eng->step(1, st2, lg.data()), Error) << m->config().layers[0].mixer;
  }
}

// The decay mechanisms' steppers allocate nothing per token (issue: "steps allocation-free"),
// on one thread and with their heads over two (step_heads: H 8, D = E = 64 crosses its 2^14
// floats), after a warm-up step.
TEST(DecaySteps, StepAllocatesNothing) {
  const int before_threads = omp_get_max_threads();
  for (int threads : {1, 2}) {
    omp_set_num_threads(threads);
    for (const std::string name : {"retention", "gla", "rwkv5", "rwkv6", "mamba2", "deltanet", "gated_deltanet", "rwkv7"}) {
      const MixerSpec& spec = find_mixer(name);
      const TensorMap in = example_inputs(spec, example_dims(spec, Scale::Bench, 1, true), 3);
      const Call call = validate_call(name, Mode::Recurrent, true, {}, in);
      Stepper st = spec.stepper(call);
      std::vector<float> y(size_t(1 << 16), 0.0f);
      st.step(y.data());
      const long before = g_news.load();
      for (int i = 0; i < 5; ++i) st.step(y.data());
      EXPECT_EQ(g_news.load() - before, 0) << name << " on " << threads << " threads";
    }
  }
  omp_set_num_threads(before_threads);
}

// OpenBLAS 0.3.21 takes its SSE3 kernels on CPUs newer than its tables; select_avx512_core()
// switches it to the AVX-512 ones in the running process (no second exec). In a fresh process
// (the death test's threadsafe style runs this test alone in a new one): where the switch is
// wanted, the kernels in use after it are the wanted ones, and an sgemm on them equals the sums.
extern "C" char* openblas_get_corename();
namespace {
[[noreturn]] void blas_switch_child() {
  const char* want = linmix::blas::avx512_core_wanted();
  const std::string before = openblas_get_corename();
  const bool ok = linmix::blas::select_avx512_core();
  const std::string after = openblas_get_corename();
  std::fprintf(stderr, "before %s, wanted %s, after %s\n", before.c_str(), want ? want : "-", after.c_str());
  if (!ok || (want && strcasecmp(after.c_str(), want) != 0) || (!want && after != before)) std::_Exit(1);
  const int n = 67, k = 45, m = 83;  // past the kernels' register blocks
  std::vector<float> A(size_t(n * k)), B(size_t(k * m)), C(size_t(n * m));
  for (size_t i = 0; i < A.size(); ++i) A[i] = float(int(i % 7) - 3);
  for (size_t i = 0; i < B.size(); ++i) B[i] = float(int(i % 5) - 2);
  linmix::blas::sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, m, k, 1.0f, A.data(), k, B.data(), m, 0.0f,
                      C.data(), m);
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < m; ++j) {
      float s = 0;  // small integers: exact in float
      for (int l = 0; l < k; ++l) s += A[size_t(i * k + l)] * B[size_t(l * m + j)];
      if (C[size_t(i * m + j)] != s) std::_Exit(2);
    }
  std::_Exit(0);
}
}  // namespace
TEST(Blas, SwitchesToTheAvx512KernelsInProcess) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_EXIT(blas_switch_child(), ::testing::ExitedWithCode(0), "before .*, wanted .*, after ");
}
