// safetensors bytes -> tensors (the reader every file input of linmix goes through).
#include "fuzz_util.h"
#include "linmix/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  return fuzz::guarded([&] { linmix::parse_safetensors(fuzz::bytes(data, size), "fuzz"); });
}
