// The AFT variants' shared forms (src/mixers/aft_forms.cpp) and the spec fields they share.
#pragma once
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

}  // namespace linmix
