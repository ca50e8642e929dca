// The channel mix of a block (what every model layer shares after its token mixer): the GELU
// MLP (GPT-2) or the RWKV channel mix (token shift, squared ReLU, receptance gate) in its three
// published forms: "rwkv" (RWKV-4/5: x = u mix + p (1 - mix), ffn.time_mix_k/r), "rwkv6"
// (x = u + (p - u) maa, ffn.time_maa_k/r), "rwkv7" (ffn.x_k as v6's form, no receptance).
#pragma once
#include <vector>

#include "mixer_layer.h"

namespace linmix {

class ChannelMix {
 public:
  explicit ChannelMix(const ModelConfig& cfg)
      : rwkv_(cfg.rwkv_channel_mix()), maa_(cfg.channel_mix == "rwkv6" || cfg.channel_mix == "rwkv7"),
        recept_(cfg.channel_mix != "rwkv7"), C_(cfg.d_model), F_(cfg.ffn_width()),
        mk_(cfg.channel_mix == "rwkv" ? "ffn.time_mix_k" : cfg.channel_mix == "rwkv6" ? "ffn.time_maa_k" : "ffn.x_k"),
        mr_(cfg.channel_mix == "rwkv" ? "ffn.time_mix_r" : "ffn.time_maa_r") {}
  ParamShapes shapes() const;
  // b (B*T, C) -> out (B*T, C), written; keeps its activations (b must stay valid).
  void forward(const LayerIO& io, const float* b, float* out, int64_t B, int64_t T);
  // dout -> db (B*T, C), written.
  void backward(const LayerIO& io, const float* dout, float* db, int64_t B, int64_t T);
  // One token: b (C) -> out (C); prev: the RWKV token shift (C), updated.
  void step(const LayerIO& io, const float* b, float* out, std::vector<float>& prev);
  bool has_shift() const { return rwkv_; }

 private:
  // x = u m + p (1 - m), or u + (p - u) m (maa_): the token-shifted input of one projection
  void lerp(float* x, const float* u, const float* p, const float* m, int64_t N) const;
  bool rwkv_, maa_, recept_;
  int64_t C_, F_;
  std::string mk_, mr_;
  const float* b_ = nullptr;
  std::vector<float> h_pre_, h_, xx_, xk_, xr_, kpre_, kk_, vv_, r_;  // h_pre, h, kpre, kk: (N, F)
  std::vector<float> sk_, sr_, sh_, so_, sg_;                        // step scratch
};

// Helpers shared with the RWKV-4 time mix (rwkv4_layer.cpp).
void mix_shift(float* out, const float* x, const float* xx, const float* mix, int64_t N, int64_t C);
void init_time_mix(Tensor& t, bool v, float depth);

}  // namespace linmix
