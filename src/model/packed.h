// Checkpoints whose engine matrices are stored already converted (`linmix convert`): the
// safetensors layout, read by load_checkpoint (train.cpp) and written by convert_checkpoint
// (packed.cpp). docs/checkpoints.md describes the format.
#pragma once
#include <memory>
#include <string>

#include "kernels/gemv.h"
#include "linmix/model.h"
#include "linmix/safetensors.h"

namespace linmix {

// The metadata key that marks a converted file; its value is the weight type ("bf16" | "int8" | "q4").
inline constexpr const char* kPackedKey = "linmix_packed";

// The packed matrices of `st` for the params of `m` that the file holds converted (moved out of
// st.raw / st.tensors); every other param stays to be read as FP32. A matrix whose pieces are
// missing, mis-shaped, of the wrong dtype or not finite, and any raw tensor that is no param's,
// is an Error naming it and `path`.
std::shared_ptr<PackedWeights> take_packed(SafeTensors& st, const Model& m, const std::string& path);

}  // namespace linmix
