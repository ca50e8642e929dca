// rwkv6 — RWKV-6 "Finch" WKV (Peng et al. 2024, "Eagle and Finch: RWKV with Matrix-Valued
// States and Dynamic Recurrence"): a data-dependent decay w_t per key channel and token, the
// read-out before the update plus the bonus u. The forms are in rwkv56_forms.h (shared with rwkv5).
#include "rwkv56_forms.h"

namespace linmix {

MixerSpec rwkv6_spec() {
  MixerSpec s;
  s.name = "rwkv6";
  s.paper = "Peng et al. 2024, Eagle and Finch: RWKV with Matrix-Valued States and Dynamic Recurrence";
  s.summary = "RWKV-6 WKV: matrix state, data-dependent per-channel decay, bonus u";
  rwkv56_spec(s, true);
  return s;
}

}  // namespace linmix
