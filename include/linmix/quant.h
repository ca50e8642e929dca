// Weight storage types of the inference engine.
#pragma once
#include <string>

namespace linmix {

// Q4: 4-bit values in groups of 64 along a row, each group with its step and offset (fp16):
// w = d q + m, q in 0..15 (ggml's Q4_1 layout with fp16 scales over groups of 64: 4.5 bits a weight).
enum class WType { F32, BF16, I8, Q4 };
WType parse_wtype(const std::string& s);  // "f32" | "bf16" | "int8" | "q4"; throws Error otherwise
const char* wtype_name(WType t);

}  // namespace linmix
