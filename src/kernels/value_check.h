// The value check of rows a kernel reads (Call::unchecked: the per-token inputs validation leaves
// to the kernel): an inf or NaN anywhere, and in a log decay a value > 0, found on the bits in 16
// lanes kept across every row seen and reduced once: the largest |x| (inf or NaN: >= 0x7f800000)
// and, for a log decay, the smallest x - 1 (x in (0, +NaN]: < 0x7fffffff; +0 and every negative
// value wrap above). A reduction a row cost ~20 cycles a row of 64 floats; this is two or three
// vector operations a 16 floats, and `copy` does it in the pass that gathers the row.
#pragma once

#include <algorithm>
#include <bit>
#include <cstdint>
#include <cstring>

namespace linmix {

template <bool LogDecay>
struct RowCheck {
  using u32x16 = uint32_t __attribute__((vector_size(64), aligned(4)));
  u32x16 mx = {}, mn = ~u32x16{};
  uint32_t smx = 0, smn = ~0u;

  void take(u32x16 x) {
    const u32x16 a = x & 0x7fffffffu;
    mx = mx > a ? mx : a;
    if constexpr (LogDecay) {
      const u32x16 w = x - 1u;
      mn = w < mn ? w : mn;
    }
  }
  void take(uint32_t x) {
    smx = std::max(smx, x & 0x7fffffffu);
    if constexpr (LogDecay) smn = std::min(smn, x - 1u);
  }
  // W floats at p
  void add(const float* p, int64_t W) {
    int64_t j = 0;
    for (; j + 16 <= W; j += 16) {
      u32x16 x;
      std::memcpy(&x, p + j, sizeof x);
      take(x);
    }
    for (; j < W; ++j) take(std::bit_cast<uint32_t>(p[j]));
  }
  // ... copied to d as they are read
  void copy(float* d, const float* p, int64_t W) {
    int64_t j = 0;
    for (; j + 16 <= W; j += 16) {
      u32x16 x;
      std::memcpy(&x, p + j, sizeof x);
      std::memcpy(d + j, &x, sizeof x);
      take(x);
    }
    for (; j < W; ++j) take(std::bit_cast<uint32_t>(p[j])), d[j] = p[j];
  }
  // nonzero: a value seen was not finite (or, in a log decay, > 0)
  uint32_t bad() const {
    uint32_t a = smx, b = smn;
    for (int l = 0; l < 16; ++l) a = std::max(a, uint32_t(mx[l])), b = std::min(b, uint32_t(mn[l]));
    return uint32_t(a >= 0x7f800000u) | uint32_t(LogDecay && b < 0x7fffffffu);
  }
};

}  // namespace linmix
