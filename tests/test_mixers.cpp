// Every mechanism, every defined causal flag, T in {1, 7, 64, 257}, B = 2, H = 3:
//  - the parallel and recurrent float32 forms equal the float64 reference (MIXERS.md tolerance);
//  - a sequence split across two recurrent calls, state passed along, equals one call;
//  - stability: keys and biases up to +-60 give finite outputs equal to the reference;
// Mechanism-specific facts (one token, nesting of variants) are in test_mixer_facts.cpp.
#include <omp.h>

#include <cmath>

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
      for (const auto& more : spec.more_params) {
        auto p = spec.example_params;
        for (const auto& [k, v] : more) p[k] = v;
        out.push_back({spec.name, causal, p});
      }
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
  for (char& ch : n)
    if (!std::isalnum(static_cast<unsigned char>(ch))) ch = '_';  // "0.5" is no test name
  return n;
}

std::map<std::string, int64_t> dims_for(const std::string& mixer, int64_t T, bool causal) {
  return example_dims(find_mixer(mixer), Scale::Test, T, causal);
}

TensorMap slice_time(const TensorMap& in, int64_t t1, int64_t t2) {
  TensorMap out;
  for (const auto& [name, t] : in) {
    if (t.rank() < 3 || name.rfind("state.", 0) == 0) {  // weights (w, u, ...) and states are not per-token
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
  // keys and biases at the edge of float32's exp range (the spec's stability rule)
  stress_inputs(spec, in, false);
  const Tensor ref = run_mixer(c.mixer, Mode::Reference, c.causal, c.params, in).at("y");
  test::expect_close(run_mixer(c.mixer, Mode::Parallel, c.causal, c.params, in).at("y"), ref, "parallel");
  if (c.causal)
    test::expect_close(run_mixer(c.mixer, Mode::Recurrent, c.causal, c.params, in).at("y"), ref, "recurrent");
}

// Sizes past every blocking constant the mechanism's kernels declare (channel blocks, time
// chunks, tiles): a block's offset dropped or a partial block mishandled shows here.
TEST_P(MixerForms, CrossesEveryBlock) {
  const Case& c = GetParam();
  const MixerSpec& spec = find_mixer(c.mixer);
  const auto dims = crossing_dims(spec, Scale::Test, c.causal);
  if (dims.empty()) GTEST_SKIP() << "no blocking constants";
  const int64_t T = dims.at("T");
  const TensorMap in = example_inputs(spec, dims, 31);
  const Tensor ref = run_mixer(c.mixer, Mode::Reference, c.causal, c.params, in).at("y");
  const std::string at = " T=" + std::to_string(T) + " C=" + std::to_string(dims.at("C"));
  test::expect_close(run_mixer(c.mixer, Mode::Parallel, c.causal, c.params, in).at("y"), ref, "parallel" + at);
  if (c.causal)
    test::expect_close(run_mixer(c.mixer, Mode::Recurrent, c.causal, c.params, in).at("y"), ref, "recurrent" + at);
}

// The decay mechanisms' steps run their heads over the threads once the state reaches 2^14
// floats (step_heads): at H = 4, D = E = 64 every head's per-head scratch must stay its own.
TEST(DecaySteps, HeadsOverThreadsAgree) {
  const int before = omp_get_max_threads();
  omp_set_num_threads(2);
  for (const std::string name : {"retention", "gla", "rwkv5", "rwkv6", "mamba2", "deltanet", "gated_deltanet", "rwkv7"}) {
    const MixerSpec& spec = find_mixer(name);
    auto dims = example_dims(spec, Scale::Test, 7, true);
    dims["B"] = 1, dims["H"] = 4, dims["E"] = 64;
    for (const char* k : {"D", "N"})
      if (dims.count(k)) dims[k] = 64;
    if (dims.count("G")) dims["G"] = 2;
    if (dims.count("C")) dims["C"] = 4 * 64;
    const TensorMap in = example_inputs(spec, dims, 9);
    test::expect_close(run_mixer(name, Mode::Recurrent, true, {}, in).at("y"),
                       run_mixer(name, Mode::Reference, true, {}, in).at("y"), name + " H = 4, D = E = 64, 2 threads");
  }
  omp_set_num_threads(before);
}

// The gated mechanisms' forward splits the (batch, head) pairs into one run of heads per thread:
// with fewer heads than threads some threads get none (a crash once), the rest still agree.
TEST(GatedHeads, FewerHeadsThanThreads) {
  const int before = omp_get_max_threads();
  omp_set_num_threads(4);
  for (const std::string name : {"retention", "gla", "rwkv5", "rwkv6", "mamba2"}) {
    const MixerSpec& spec = find_mixer(name);
    auto dims = example_dims(spec, Scale::Test, 70, true);
    dims["B"] = 1, dims["H"] = 1;
    if (dims.count("G")) dims["G"] = 1;
    if (dims.count("C")) dims["C"] = dims.at("E");
    const TensorMap in = example_inputs(spec, dims, 5);
    test::expect_close(run_mixer(name, Mode::Parallel, true, {}, in).at("y"),
                       run_mixer(name, Mode::Reference, true, {}, in).at("y"), name + " B = H = 1 on 4 threads");
  }
  omp_set_num_threads(before);
}

// Mechanisms whose every form starts from a given state (state_all_modes): from a random
// state, reference, parallel and recurrent agree on y and on the final state; a parallel call
// split in two (the first call's state passed on) equals one call; past every chunk boundary.
class InitialState : public ::testing::TestWithParam<Case> {};

TEST_P(InitialState, InEveryMode) {
  const Case& c = GetParam();
  const MixerSpec& spec = find_mixer(c.mixer);
  auto dims = crossing_dims(spec, Scale::Test, c.causal);
  if (dims.empty()) dims = example_dims(spec, Scale::Test, 37, c.causal);  // no blocking constant (s4d)
  for (int64_t T : {int64_t(1), int64_t(7), dims.at("T")}) {
    dims["T"] = T;
    TensorMap in = example_inputs(spec, dims, 300 + T);
    for (auto& [n, t] : example_state(spec, dims, 400 + T)) in[n] = std::move(t);
    const TensorMap ref = run_mixer(c.mixer, Mode::Reference, true, c.params, in);
    const std::string at = " T=" + std::to_string(T);
    for (Mode m : {Mode::Parallel, Mode::Recurrent}) {
      const TensorMap got = run_mixer(c.mixer, m, true, c.params, in);
      for (const auto& [n, t] : ref) {
        ASSERT_TRUE(got.count(n)) << n;
        test::expect_close(got.at(n), t, std::string(mode_name(m)) + " " + n + at);
      }
    }
    if (T < 3) continue;
    const int64_t t1 = T / 2 + 1;
    const TensorMap first = run_mixer(c.mixer, Mode::Parallel, true, c.params, slice_time(in, 0, t1));
    TensorMap second_in = slice_time(in, t1, T);
    for (const auto& [n, t] : first)
      if (n.rfind("state.", 0) == 0) second_in[n] = t;
    const TensorMap second = run_mixer(c.mixer, Mode::Parallel, true, c.params, second_in);
    test::expect_close(concat_time(first.at("y"), second.at("y")), ref.at("y"), "parallel split y" + at);
    for (const auto& [n, t] : ref)
      if (n != "y") test::expect_close(second.at(n), t, "parallel split " + n + at);
  }
}

INSTANTIATE_TEST_SUITE_P(All, MixerForms, ::testing::ValuesIn(all_cases()), case_name);
INSTANTIATE_TEST_SUITE_P(Causal, RecurrentSplit, ::testing::ValuesIn(causal_cases()), case_name);

std::vector<Case> state_cases() {
  std::vector<Case> out;
  for (const Case& c : causal_cases())
    if (find_mixer(c.mixer).state_all_modes) out.push_back(c);
  return out;
}
INSTANTIATE_TEST_SUITE_P(StateAllModes, InitialState, ::testing::ValuesIn(state_cases()), case_name);

}  // namespace


// A NaN or an infinity in a log-decay tensor is refused by name (validate checks those
// tensors' values in one pass with their domain, g <= 0, which a NaN passes): every mechanism
// that declares log decays.
TEST(Validation, NonFiniteLogDecaysRefused) {
  int seen = 0;
  for (const MixerSpec& spec : mixers()) {
    if (spec.log_decays.empty()) continue;
    const bool causal = spec.causal_ok;
    for (float bad : {std::nanf(""), -INFINITY}) {
      TensorMap in = example_inputs(spec, example_dims(spec, Scale::Test, 9, causal), 2);
      const std::string& g = spec.log_decays.front();
      in.at(g).data[in.at(g).data.size() / 2] = bad;
      try {
        run_mixer(spec.name, Mode::Parallel, causal, {}, in);
        ADD_FAILURE() << spec.name << ": " << g << " = " << bad << " accepted";
      } catch (const Error& e) {
        EXPECT_NE(std::string(e.what()).find("'" + g + "'"), std::string::npos) << spec.name << ": " << e.what();
      }
    }
    ++seen;
  }
  EXPECT_GE(seen, 6);
}

// A NaN or an infinity anywhere in any input is refused, naming the tensor and the element, in
// every mechanism's parallel form at sizes past every block and chunk: first element, last (the
// last head's last row, in the tail chunk) and one between. The forms whose kernel checks its
// per-token rows as it runs (kernel_checks_values: gated_heads) report exactly what validation
// reports; a log decay > 0 is refused wherever it is.
TEST(Validation, EveryBadValueIsRefusedWhereverItIs) {
  int deferred = 0;
  for (const MixerSpec& spec : mixers()) {
    const bool causal = spec.causal_ok;
    deferred += spec.kernel_checks_values;
    std::map<std::string, int64_t> dims = crossing_dims(spec, Scale::Test, causal);
    if (dims.empty()) dims = example_dims(spec, Scale::Test, 70, causal);
    TensorMap good = example_inputs(spec, dims, 4);
    std::map<std::string, std::string> params(spec.example_params.begin(), spec.example_params.end());
    // with a state before token 0 too, where every form takes one (a key/value cache's rows join
    // the call's: the forms on the concatenation)
    TensorMap with_state = good;
    if (causal)
      for (auto& [n, t] : example_state(spec, dims, 5)) with_state[n] = t;
    for (const TensorSpec& ts : spec.inputs) {
      if (!good.count(ts.name)) continue;
      const int64_t n = good.at(ts.name).numel();
      const bool log_decay =
          std::find(spec.log_decays.begin(), spec.log_decays.end(), ts.name) != spec.log_decays.end();
      // the elements the forms read: all, or the runs of spec.read_runs (aft_local's band of w)
      // (read without a state and from one: where both read, first, last and one between)
      std::vector<int64_t> ats = {0, n - 1, (n * 7) / 11};
      if (spec.read_runs.count(ts.name)) {
        std::vector<int> both(size_t(n), 0);
        // without a state and from one (the rows differ), and the non-causal form (its band)
        const TensorMap noncausal =
            spec.noncausal_ok ? example_inputs(spec, example_dims(spec, Scale::Test, 70, false), 4) : TensorMap{};
        for (int form = 0; form < 3; ++form) {
          if (form == 2 && noncausal.empty()) continue;
          const bool cz = form < 2 && causal;
          const TensorMap& base = form == 0 ? good : form == 1 ? with_state : noncausal;
          const int64_t nb = base.at(ts.name).numel();
          const Call call = validate_call(spec.name, Mode::Parallel, cz, params, base, false);
          const auto runs = spec.read_runs.at(ts.name)(call);
          ASSERT_FALSE(runs.empty()) << spec.name << " " << ts.name;
          std::vector<bool> read(size_t(nb), false);
          for (const auto& [off, len] : runs) std::fill(read.begin() + off, read.begin() + off + len, true);
          for (int64_t i = 0; i < n && form < 2; ++i) both[size_t(i)] += read[size_t(i)];
          // every element no form reads NaN at once: accepted, and nothing changes (the forward, its
          // final state, the backward's gradients): the runs hold every element the forms read
          TensorMap in = base;
          for (int64_t i = 0; i < nb; ++i)
            if (!read[size_t(i)]) in.at(ts.name).data[size_t(i)] = std::nanf("");
          for (const Mode mode : {Mode::Parallel, Mode::Reference, Mode::Recurrent})
            for (const bool grad : {false, true}) {
              if ((grad || !cz) && mode == Mode::Recurrent) continue;
              if (mode == Mode::Recurrent && form == 1 && !spec.state_all_modes) continue;
              TensorMap a = base, b = in;
              if (grad) {
                Tensor dy = run_mixer(spec.name, Mode::Parallel, cz, params, base).at("y");
                for (float& x : dy.data) x = 0.5f - 0.25f * x;
                a["dy"] = dy, b["dy"] = dy;
              }
              const TensorMap want = run_mixer(spec.name, mode, cz, params, a, grad, true);
              const TensorMap got = run_mixer(spec.name, mode, cz, params, b, grad, true);
              for (const auto& [on, t] : want) {  // (a sum over threads may round differently: not ==)
                int64_t off = 0;
                for (size_t e = 0; e < t.data.size(); ++e)
                  off += !(std::abs(got.at(on).data[e] - t.data[e]) <= 1e-5f * (1.0f + std::abs(t.data[e])));
                EXPECT_EQ(off, 0) << spec.name << " " << ts.name << (form == 1 ? " from a state" : form == 2 ? " non-causal" : "")
                                  << " NaN where no form reads (" << mode_name(mode) << (grad ? ", --grad" : "")
                                  << "): " << on << " changed";
              }
            }
        }
        std::vector<int64_t> in_both;
        for (int64_t i = 0; i < n; ++i)
          if (both[size_t(i)] == 2) in_both.push_back(i);
        ASSERT_GE(in_both.size(), 3u) << spec.name << " " << ts.name;
        ats = {in_both.front(), in_both.back(), in_both[in_both.size() * 7 / 11]};
      }
      for (int64_t at : ats) {
        for (float bad : {std::nanf(""), INFINITY, -INFINITY, 0.5f}) {
          if (bad == 0.5f && !log_decay) continue;
          // with the final state and without (the forms differ: aft_local's ring, s4d's state),
          // then from a state
          for (int form = 0; form < 3; ++form) {
            const bool final_state = form > 0;
            if (form == 2 && with_state.size() == good.size()) continue;
            TensorMap in = form == 2 ? with_state : good;
            in.at(ts.name).data[size_t(at)] = bad;
            const std::string what = spec.name + " " + ts.name + "[" + std::to_string(at) + "] = " +
                                     std::to_string(bad) + (final_state ? ", final state" : "") +
                                     (form == 2 ? ", from a state" : "");
            try {
              run_mixer(spec.name, Mode::Parallel, causal, params, in, false, final_state);
              ADD_FAILURE() << what << ": accepted";
            } catch (const Error& e) {
              const std::string msg = e.what();
              const std::string want = bad == 0.5f ? "tensor '" + ts.name + "': log decays must be <= 0"
                                                   : "tensor '" + ts.name + "': element " + std::to_string(at) + " is ";
              EXPECT_NE(msg.find(want), std::string::npos) << what << ": " << msg;
            }
          }
        }
      }
    }
  }
  // linear, norm_linear, performer, flow, retention, gla, rwkv5, rwkv6, mamba2 (gated_heads); rwkv7,
  // deltanet, gated_deltanet (dplr_heads); rwkv4; aft_simple, aft_local, aft_conv (aft_forward);
  // block_softmax
  EXPECT_GE(deferred, 17);
}
