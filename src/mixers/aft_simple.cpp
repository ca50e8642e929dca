// aft_simple — AFT-simple (Zhai et al. 2021, sec. 3.2): no position bias,
//   y_t = sigma(q_t) * sum_s softmax_s(k)_s v_s   (s <= t when causal).
// The forms: the banded-sum kernel with an empty band: running sums only (aft_forms.cpp).
#include "../ref/ref_util.h"
#include "aft_forms.h"
#include "common.h"

namespace linmix {

MixerSpec aft_simple_spec() {
  MixerSpec s = aft_base();
  s.name = "aft_simple";
  s.summary = "AFT without position bias: sigma(q) * (softmax over time of k) . v";
  s.state = kAftSums;
  s.state_size = "3 C running sums per sequence";
  s.time = "O(T C)";
  s.memory = "O(T C) non-causal (suffix sums), O(C) causal";
  s.y_dims = "B,T,C";
  // every causal form starts from the running sums (num, den, max) and returns the final ones
  s.state_all_modes = true;
  s.state_fix = fix_aft_sums;
  set_reference(s, [](const Call& c, const auto& x) {
    using S = scalar_of<decltype(x)>;
    const int64_t B = c.d("B"), T = c.d("T"), C = c.d("C");
    std::vector<S> y(B * T * C + (c.causal ? 3 * B * C : 0));
    const S *num0 = opt_in(x, "state.num"), *den0 = opt_in(x, "state.den"), *max0 = opt_in(x, "state.max");
    ref::aft_ref<S>(y.data(), x.at("q").data(), x.at("k").data(), x.at("v").data(), B, T, C, c.causal,
                    [](int64_t, int64_t, int64_t) { return S(0); }, num0, den0, max0);
    if (c.causal) {  // the final state: every position has entered the sums
      S* fin = y.data() + B * T * C;
      ref::aft_sums_ref<S>(fin, fin + B * C, fin + 2 * B * C, x.at("k").data(), x.at("v").data(), B, T, C, T, num0,
                           den0, max0);
    }
    return y;
  });
  set_aft_forms(s, AftVariant::Simple);
  return s;
}

}  // namespace linmix
