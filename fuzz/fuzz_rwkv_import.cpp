// RWKV-4/5/6/7, Mamba and Mamba-2 tensors -> a model: the imports' naming (BlinkDL or Hugging Face),
// version detection and shape inference.
#include "fuzz_util.h"
#include "linmix/safetensors.h"
#include "linmix/train.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  return fuzz::guarded([&] {
    linmix::SafeTensors st = linmix::parse_safetensors(fuzz::bytes(data, size), "fuzz");
    const std::string groups = st.metadata.count("n_groups") ? st.metadata.at("n_groups") : "";
    if (linmix::looks_like_mamba(st.tensors)) linmix::import_mamba(std::move(st.tensors), "fuzz", groups);
    else if (linmix::looks_like_rwkv(st.tensors)) linmix::import_rwkv(std::move(st.tensors), "fuzz");
  });
}
