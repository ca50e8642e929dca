// A checkpoint file -> a model: linmix checkpoints (config and step metadata, parameters, Adam
// moments) and RWKV-4 checkpoints (BlinkDL or Hugging Face names, the import's shape inference).
// A model that loads also runs two tokens through its recurrent step.
#include "fuzz_util.h"
#include "linmix/train.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = fuzz::as_file(data, size, ".safetensors");
  return fuzz::guarded([&] {
    linmix::Checkpoint ck = linmix::load_checkpoint(path);
    linmix::Model& m = *ck.model;
    if (m.num_params() > (1 << 20)) return;  // loaded fine; stepping a large model is slow, not a finding
    std::vector<float> lg(static_cast<size_t>(m.config().vocab));
    linmix::Model::State st = m.new_state();
    m.step(0, st, lg.data());
    m.step(1, st, lg.data());
  });
}
