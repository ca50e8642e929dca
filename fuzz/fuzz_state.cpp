// A saved generation state (safetensors) -> a state of a model with one layer of each kind
// (attention-like with a KV cache, AFT, RWKV-4 time-mix with token shift, S4D, GAU, Mamba with
// its conv window; RWKV channel mix), then two steps from it.
#include <memory>

#include "fuzz_util.h"
#include "linmix/model.h"
#include "linmix/safetensors.h"

namespace {
linmix::Model& model() {
  static std::unique_ptr<linmix::Model> m = [] {
    auto p = std::make_unique<linmix::Model>(linmix::ModelConfig::from_json(
        R"({"vocab": 16, "d_model": 8, "n_head": 2, "ctx": 64, "channel_mix": "rwkv", "state": 2, "qk_dim": 4,
            "layers": [{"mixer": "softmax"}, {"mixer": "aft_local", "params": {"window": 3}}, {"mixer": "rwkv4"},
                       {"mixer": "s4d"}, {"mixer": "flash", "params": {"group": 4}}, {"mixer": "mamba"}]})"));
    p->init(1);
    return p;
  }();
  return *m;
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  return fuzz::guarded([&] {
    linmix::Model& m = model();
    linmix::Model::State st = m.state_from_tensors(linmix::parse_safetensors(fuzz::bytes(data, size), "fuzz").tensors);
    std::vector<float> lg(16);
    m.step(3, st, lg.data());
    m.step(4, st, lg.data());
    m.state_tensors(st);
  });
}
