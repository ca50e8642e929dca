// gated_deltanet — Gated DeltaNet (Yang, Kautz & Hatamizadeh 2024, "Gated Delta Networks:
// Improving Mamba2 with Delta Rule"): the delta rule under a scalar decay e^{g_t} per head. The
// forms are in delta_forms.h (shared with deltanet).
#include "delta_forms.h"

namespace linmix {

MixerSpec gated_deltanet_spec() {
  MixerSpec s;
  s.name = "gated_deltanet";
  s.paper = "Yang, Kautz & Hatamizadeh 2024, Gated Delta Networks: Improving Mamba2 with Delta Rule";
  s.summary = "the delta rule with a data-dependent scalar decay per head (Mamba-2's gate)";
  delta_spec(s, true);
  return s;
}

}  // namespace linmix
