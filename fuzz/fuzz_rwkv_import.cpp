// RWKV-4 tensors -> a model: the import's naming (BlinkDL or Hugging Face) and shape inference.
#include "fuzz_util.h"
#include "linmix/safetensors.h"
#include "linmix/train.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  return fuzz::guarded([&] {
    linmix::SafeTensors st = linmix::parse_safetensors(fuzz::bytes(data, size), "fuzz");
    if (linmix::looks_like_rwkv4(st.tensors)) linmix::import_rwkv4(std::move(st.tensors), "fuzz");
  });
}
