// Dims shared by the fast kernels (linmix/kernels.h) and the float64 references (src/ref/),
// so that a reference never includes a kernel header.
#pragma once
#include <cstdint>

namespace linmix {

// A multi-head call: batch, time, heads, query/key width, value width.
struct AttnDims {
  int64_t B, T, H, D, E;
};

}  // namespace linmix
