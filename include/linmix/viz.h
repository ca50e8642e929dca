// How far each layer of a trained model looks back (linmix viz): every layer's effective
// attention, computed from its mechanism. Each causal mechanism's output is linear in its value
// input (v; u for s4d and mamba; x for mamba2) once the other inputs are fixed, so the float64
// reference run on the layer's own inputs with the values replaced by a unit impulse at
// position s gives column s of the mechanism's T x T weights exactly: softmax's attention
// probabilities, linear attention's normalised kernel products, RWKV's and GLA's decayed
// weights, the SSMs' (data-dependent) kernels, AFT's position biases. norm_linear's output
// normalisation is not linear in v: its weights are its kernel products phi(q_t) . phi(k_s)
// before the normalisation (linear attention's, which agree after the row normalisation below).
// The SSMs' skip term D u_t (s4d, mamba, mamba2) is left out: it is a per-channel residual
// around the state, not memory (with it, a young Mamba's every row is almost all diagonal).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "linmix/model.h"

namespace linmix {

struct LayerAttention {
  int64_t layer = 0;
  std::string mixer;
  std::string unit;      // "head" (one weight per head and (t, s)) or "channel group" (per channel, averaged)
  int64_t groups = 0;    // heads, or channel groups (n_head of them)
  int64_t T = 0;
  // [groups, T, T], row t: |w_ts| / sum_s |w_ts| over s <= t (the share of position t's output
  // that comes from s), averaged over the group's channels / value units.
  std::vector<float> weights;
  // per group: mean over t of sum_s share_ts (t - s), in tokens
  std::vector<double> lookback;
};

// The mechanism's weights on one sequence's inputs `in` (B = 1, causal, float64 reference):
// W[(t T + s) U + unit], the response of output unit `unit` at t to a unit impulse at s in
// the value input (v, u or x; every unit of that row set to 1), 0 for s > t; *units = U, the
// values per position. A mechanism whose weights are one scalar per (head or channel, t, s)
// then satisfies y_t(unit) = sum_s W_ts(unit) v_s(unit) for any v (tests/test_viz.cpp).
std::vector<double> value_weights(const std::string& mixer, const std::map<std::string, std::string>& params,
                                  const TensorMap& in, int64_t* units);
// The value input's name: v, u (s4d, mamba) or x (mamba2).
std::string value_input(const std::string& mixer);

// Runs the model on one sequence (a causal language model) and returns every layer's
// effective attention. The model's mixer calls are captured in its forward (a process-wide
// hook: one capture at a time).
std::vector<LayerAttention> effective_attention(Model& m, const std::vector<int32_t>& tokens);

// An 8-bit RGB image as PNG (zlib), written atomically.
void write_png(const std::string& path, int64_t width, int64_t height, const std::vector<uint8_t>& rgb);

}  // namespace linmix
