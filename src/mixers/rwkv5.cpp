// rwkv5 — RWKV-5 "Eagle" WKV (Peng et al. 2024, "Eagle and Finch"): a matrix-valued state per
// head with a learned decay w per key channel, constant in time, and the bonus u. The forms are
// in rwkv56_forms.h (shared with rwkv6; powers e^{n w} with n >= 0 only).
#include "rwkv56_forms.h"

namespace linmix {

MixerSpec rwkv5_spec() {
  MixerSpec s;
  s.name = "rwkv5";
  s.paper = "Peng et al. 2024, Eagle and Finch: RWKV with Matrix-Valued States and Dynamic Recurrence";
  s.summary = "RWKV-5 WKV: matrix state, a learned decay per key channel constant in time, bonus u";
  rwkv56_spec(s, false);
  return s;
}

}  // namespace linmix
