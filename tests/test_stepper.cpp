// The allocation-free steppers (MixerSpec::stepper, the generation path) against the recurrent
// form run over the whole sequence: token by token they give the same outputs.
#include <random>

#include "linmix/mixer.h"
#include "test_util.h"

using namespace linmix;

namespace {
bool per_token(const TensorSpec& ts) { return ("," + ts.dims + ",").find(",T,") != std::string::npos; }
}  // namespace

TEST(Stepper, EqualsTheRecurrentFormTokenByToken) {
  int with = 0;
  for (const MixerSpec& spec : mixers()) {
    if (!spec.stepper) continue;
    ++with;
    const int64_t T = 37;
    std::map<std::string, int64_t> dims{{"B", 1}, {"T", T}, {"H", 2}, {"D", 4}, {"E", 3}, {"C", 6}, {"M", 5},
                                        {"N", 3}, {"K", 4}, {"S", 4}, {"Tw", T}};
    std::map<std::string, std::string> params;
    for (const auto& [k, v] : spec.example_params) params[k] = v;
    const TensorMap all = example_inputs(spec, dims, 7);
    const TensorMap want = run_mixer(spec.name, Mode::Recurrent, true, params, all);
    // one token at a time: the per-token tensors (those with a T dim) overwritten in place
    auto d1 = dims;
    d1["T"] = 1;
    TensorMap one = example_inputs(spec, d1, 8);
    for (const auto& ts : spec.inputs)
      if (!per_token(ts) && all.count(ts.name)) one[ts.name] = all.at(ts.name);
    const Call call = validate_call(spec.name, Mode::Recurrent, true, params, one);
    auto step = spec.stepper(call);
    const Tensor& yw = want.at("y");
    const int64_t per = yw.numel() / T;
    std::vector<float> y(per);
    for (int64_t t = 0; t < T; ++t) {
      for (const auto& ts : spec.inputs) {
        if (!per_token(ts) || !all.count(ts.name)) continue;
        const Tensor& src = all.at(ts.name);
        const int64_t n = src.numel() / T;
        std::copy(src.ptr() + t * n, src.ptr() + (t + 1) * n, one.at(ts.name).ptr());
      }
      step(y.data());
      for (int64_t i = 0; i < per; ++i)
        EXPECT_NEAR(y[i], yw.data[t * per + i], 1e-5f * std::max(1.0f, std::fabs(yw.data[t * per + i])))
            << spec.name << " t=" << t << " i=" << i;
    }
  }
  EXPECT_GE(with, 11);  // softmax, linear, performer, norm_linear, rwkv4, the four AFT, s4d, mamba
}
