// The channel mix of a block (what every model layer shares after its token mixer): the GELU
// MLP (GPT-2) or the RWKV-4 channel mix (token shift, squared ReLU, receptance gate).
#pragma once
#include <vector>

#include "mixer_layer.h"

namespace linmix {

class ChannelMix {
 public:
  ChannelMix(const ModelConfig& cfg) : rwkv_(cfg.channel_mix == "rwkv"), C_(cfg.d_model), F_(cfg.ffn_mult * cfg.d_model) {}
  ParamShapes shapes() const;
  // b (B*T, C) -> out (B*T, C), written; keeps its activations (b must stay valid).
  void forward(const LayerIO& io, const float* b, float* out, int64_t B, int64_t T);
  // dout -> db (B*T, C), written.
  void backward(const LayerIO& io, const float* dout, float* db, int64_t B, int64_t T);
  // One token: b (C) -> out (C); prev: the RWKV token shift (C), updated.
  void step(const LayerIO& io, const float* b, float* out, std::vector<float>& prev);
  bool has_shift() const { return rwkv_; }

 private:
  bool rwkv_;
  int64_t C_, F_;
  const float* b_ = nullptr;
  std::vector<float> h_pre_, h_, xx_, xk_, xr_, kpre_, kk_, vv_, r_;  // h_pre, h, kpre, kk: (N, F)
  std::vector<float> sk_, sr_, sh_, so_, sg_;                        // step scratch
};

// Helpers shared with the RWKV-4 time mix (rwkv4_layer.cpp).
void mix_shift(float* out, const float* x, const float* xx, const float* mix, int64_t N, int64_t C);
void init_time_mix(Tensor& t, bool v, float depth);

}  // namespace linmix
