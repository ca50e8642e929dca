// deltanet — DeltaNet, the delta rule (Schlag et al. 2021, "Linear Transformers Are Secretly
// Fast Weight Programmers"; chunked: Yang et al. 2024, "Parallelizing Linear Transformers with
// the Delta Rule over Sequence Length"). The forms are in delta_forms.h (shared with gated_deltanet).
#include "delta_forms.h"

namespace linmix {

MixerSpec deltanet_spec() {
  MixerSpec s;
  s.name = "deltanet";
  s.paper = "Schlag et al. 2021; Yang et al. 2024, Parallelizing Linear Transformers with the Delta Rule";
  s.summary = "the delta rule: S += beta k (v - S^T k)^T, chunked by the WY / UT transform";
  delta_spec(s, false);
  return s;
}

}  // namespace linmix
