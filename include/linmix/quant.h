// Weight storage types of the inference engine.
#pragma once
#include <string>

namespace linmix {

enum class WType { F32, BF16, I8 };
WType parse_wtype(const std::string& s);  // "f32" | "bf16" | "int8"; throws Error otherwise
const char* wtype_name(WType t);

}  // namespace linmix
