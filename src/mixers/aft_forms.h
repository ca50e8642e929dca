// The AFT variants' shared forms (src/mixers/aft_forms.cpp) and the spec fields they share.
#pragma once
#include <algorithm>
#include <cmath>

#include "linmix/mixer.h"

namespace linmix {

enum class AftVariant { Full, Local, Simple, Conv };

// Installs parallel, backward, recurrent and stepper of `var` on s (and y_dims).
void set_aft_forms(MixerSpec& s, AftVariant var);

// What every AFT variant's spec shares: paper, the q, k, v inputs, and the state tensors.
inline MixerSpec aft_base() {
  MixerSpec s;
  s.paper = "Zhai et al. 2021, An Attention Free Transformer";
  s.inputs = {{"q", "B,T,C"}, {"k", "B,T,C"}, {"v", "B,T,C"}};
  return s;
}
inline const std::vector<TensorSpec> kAftSums = {{"num", "B,C"}, {"den", "B,C"}, {"max", "B,C"}};
inline const std::vector<TensorSpec> kAftRing = {{"k", "B,L,C"}, {"v", "B,L,C"}};

// Random sums in their domain (MixerSpec::state_fix): den, a sum of e^{k} scaled, > 0; max spread
// (N(2, 4^2)) so that in some channels the state's max stays the largest, in others a key's wins.
inline void fix_aft_sums(TensorMap& st) {
  for (float& x : st["state.den"].data) x = std::abs(x) + 0.5f;
  for (float& x : st["state.max"].data) x = 2.0f + 4.0f * x;
}

// aft_local, aft_conv: the sums and a ring of at most lo(call) rows as the state of every causal
// form (state_all_modes; the final ring has min(L + T, lo) rows).
inline void set_ring_state(MixerSpec& s, int64_t (*lo)(const Call&)) {
  s.state_all_modes = true;
  s.final_dims = [lo](const Call& c) {
    const int64_t L = c.has("state.k") ? c.d("L") : 0;
    return std::map<std::string, int64_t>{{"L", std::min(L + c.d("T"), lo(c))}};
  };
  s.state_fix = fix_aft_sums;
}

}  // namespace linmix
