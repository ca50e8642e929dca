// The steppers (MixerSpec::stepper: the only recurrent code of a mechanism, the generation path
// and, through recurrent_by_steps, `--mode recurrent`): every causal mechanism has one, and a
// state saved mid-sequence and loaded into a fresh stepper continues bit for bit. (Their
// outputs are checked against the float64 reference in test_mixers.cpp, through the recurrent
// form.)
#include "linmix/mixer.h"
#include "test_util.h"

using namespace linmix;

namespace {
bool per_token(const TensorSpec& ts) { return ts.dims.rfind("B,T", 0) == 0; }
}  // namespace

TEST(Stepper, EveryCausalMechanismHasOne) {
  for (const MixerSpec& spec : mixers())
    if (spec.causal_ok) {
      EXPECT_TRUE(bool(spec.stepper)) << spec.name << " is causal but has no stepper";
    }
}

TEST(Stepper, SavedStateContinuesBitForBit) {
  for (const MixerSpec& spec : mixers()) {
    if (!spec.stepper) continue;
    const int64_t T = 37;
    auto dims = example_dims(spec, Scale::Test, T, true);
    dims["B"] = 1;
    const TensorMap all = example_inputs(spec, dims, 7);
    auto d1 = dims;
    d1["T"] = 1;
    TensorMap one = example_inputs(spec, d1, 8);
    for (const auto& ts : spec.inputs)
      if (!per_token(ts) && all.count(ts.name)) one[ts.name] = all.at(ts.name);
    const Call call = validate_call(spec.name, Mode::Recurrent, true, spec.example_params, one);
    const int64_t ny = numel_of(dims_shape(spec.y_dims, call));
    auto feed = [&](int64_t t) {
      for (const auto& ts : spec.inputs) {
        if (!per_token(ts) || !all.count(ts.name)) continue;
        const Tensor& src = all.at(ts.name);
        const int64_t n = src.numel() / T;
        std::copy(src.ptr() + t * n, src.ptr() + (t + 1) * n, one.at(ts.name).ptr());
      }
    };
    for (int64_t t1 : {1, 5, 20}) {
      Stepper a = spec.stepper(call), b = spec.stepper(call);
      std::vector<float> ya(ny), yb(ny);
      for (int64_t t = 0; t < t1; ++t) feed(t), a.step(ya.data());
      b.load(a.save());
      for (int64_t t = t1; t < T; ++t) {
        feed(t);
        a.step(ya.data()), b.step(yb.data());
        ASSERT_EQ(ya, yb) << spec.name << " t=" << t << " after a state saved at " << t1;
      }
      const TensorMap sa = a.save(), sb = b.save();
      ASSERT_EQ(sa.size(), spec.state.size()) << spec.name;
      for (const auto& [n, t] : sa) EXPECT_EQ(t.data, sb.at(n).data) << spec.name << " " << n;
    }
  }
}

// At the benchmark's sizes (H 8, D = E = 64, C 512: 128 KiB of state and more) the steppers split
// their heads over the threads (kStepParallelFloats, mixers/common.h); the recurrent form, token
// by token through them, still equals the float64 reference (y and the final state). The test
// sizes above stay on one thread.
TEST(Stepper, BenchSizedStatesEqualTheReference) {
  for (const MixerSpec& spec : mixers()) {
    if (!spec.stepper) continue;
    const TensorMap in = example_inputs(spec, example_dims(spec, Scale::Bench, 3, true), 11);
    std::map<std::string, std::string> params = spec.example_params;
    for (const auto& [k, v] : spec.bench_params) params[k] = v;
    const TensorMap want = run_mixer(spec.name, Mode::Reference, true, params, in);
    const TensorMap got = run_mixer(spec.name, Mode::Recurrent, true, params, in);
    for (const auto& [n, t] : want) {
      ASSERT_TRUE(got.count(n)) << spec.name << " " << n;
      test::expect_close(got.at(n), t, spec.name + " " + n);
    }
  }
}

// Steps that work in blocks, at widths that end in a partial block: the channel-wise steps (s4d,
// mamba: per-(channel, state) arrays in blocks of 64 channels, ChannelBlocks in mixers/common.h)
// on one thread (C 100: a block of 64 and one of 36) and over the threads (C 400: six of 64 and
// one of 16, past kStepParallelFloats); performer's features 64 at a time (M 70: 64 and 6). From a
// given state, y and the final state equal the float64 reference.
TEST(Stepper, BlocksWithAPartialLastBlockEqualTheReference) {
  const std::vector<std::tuple<std::string, std::string, int64_t>> cases = {
      {"s4d", "C", 100}, {"s4d", "C", 400}, {"mamba", "C", 100}, {"mamba", "C", 400}, {"performer", "M", 70}};
  for (const auto& [name, dim, size] : cases) {
    const MixerSpec& spec = find_mixer(name);
    auto dims = example_dims(spec, Scale::Test, 9, true);
    if (dims.count("N")) dims["N"] = 16;
    if (name == "performer") dims["D"] = 16;
    dims[dim] = size;
    TensorMap in = example_inputs(spec, dims, 13);
    for (auto& [n, t] : example_state(spec, dims, 14)) in[n] = std::move(t);
    const TensorMap want = run_mixer(name, Mode::Reference, true, spec.example_params, in);
    const TensorMap got = run_mixer(name, Mode::Recurrent, true, spec.example_params, in);
    const std::string what = name + " " + dim + " " + std::to_string(size);
    for (const auto& [n, t] : want) {
      ASSERT_TRUE(got.count(n)) << what << " " << n;
      test::expect_close(got.at(n), t, what + " " + n);
    }
  }
}
