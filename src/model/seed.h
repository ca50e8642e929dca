// Seeds and hashes derived from counters (splitmix64's finaliser): the batches, generated task
// examples and dropout masks that depend only on (seed, step, index), so a resumed or
// distributed run draws what one uninterrupted process does.
#pragma once

#include <cstdint>

namespace linmix {

// splitmix64's output function of x
inline uint64_t mix64(uint64_t x) {
  x ^= x >> 30, x *= 0xBF58476D1CE4E5B9ull, x ^= x >> 27, x *= 0x94D049BB133111EBull, x ^= x >> 31;
  return x;
}
// the splitmix64 generator's value at counter x
inline uint64_t splitmix64(uint64_t x) { return mix64(x + 0x9E3779B97F4A7C15ull); }
// one seed from up to three parts
inline uint64_t mix_seed(uint64_t a, uint64_t b, uint64_t c = 0) {
  return mix64(a * 0x9E3779B97F4A7C15ull ^ (b + 0x632BE59BD9B4E019ull) ^ (c * 0xD6E8FEB86659FD93ull));
}

}  // namespace linmix
