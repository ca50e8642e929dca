// Internal helpers shared by the mechanism files: float64 copies for the references,
// small vector math, and the registration hooks of every mechanism.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "linmix/mixer.h"

namespace linmix {

inline std::vector<double> to_double(const Tensor& t) { return {t.data.begin(), t.data.end()}; }
inline Tensor from_double(std::vector<int64_t> shape, const std::vector<double>& d) {
  Tensor t(std::move(shape));
  std::copy(d.begin(), d.end(), t.data.begin());
  return t;
}

inline float sigmoidf(float x) { return 1.0f / (1.0f + std::exp(-x)); }
inline float phi_elu(float x) { return x > 0.0f ? x + 1.0f : std::exp(x); }  // elu(x) + 1

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Registration: each mechanism file defines one of these.
MixerSpec softmax_spec();
MixerSpec linear_spec();
MixerSpec aft_full_spec();
MixerSpec aft_local_spec();
MixerSpec aft_simple_spec();
MixerSpec aft_conv_spec();
MixerSpec rwkv4_spec();
MixerSpec performer_spec();
MixerSpec flow_spec();
MixerSpec flash_spec();
MixerSpec norm_linear_spec();
MixerSpec block_softmax_spec();
MixerSpec s4d_spec();
MixerSpec mamba_spec();
MixerSpec fnet_spec();

}  // namespace linmix
