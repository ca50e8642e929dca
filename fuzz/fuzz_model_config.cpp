// Model config JSON -> a validated config; a valid one survives to_json / from_json unchanged.
#include "fuzz_util.h"
#include "linmix/model.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  return fuzz::guarded([&] {
    const linmix::ModelConfig c = linmix::ModelConfig::from_json(fuzz::bytes(data, size));
    if (linmix::ModelConfig::from_json(c.to_json()).to_json() != c.to_json()) __builtin_trap();
  });
}
