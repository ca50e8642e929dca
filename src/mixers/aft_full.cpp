// aft_full — AFT-full (Zhai et al. 2021, eq. 2): a learned pairwise position bias w (Tw x Tw),
//   y_t = sigma(q_t) * sum_s exp(k_s + w_ts) v_s / sum_s exp(k_s + w_ts).
// The forms: the banded-sum kernel with a band covering every position (aft_forms.cpp).
#include "../ref/ref_util.h"
#include "aft_forms.h"
#include "common.h"

namespace linmix {

MixerSpec aft_full_spec() {
  MixerSpec s = aft_base();
  s.name = "aft_full";
  s.summary = "AFT with a learned pairwise position bias w (Tw x Tw)";
  s.inputs.push_back({"w", "Tw,Tw"});
  s.state = kAftRing;
  s.state_size = "all past k, v: 2 L C per sequence (no constant-size state)";
  s.time = "O(T^2 C)";
  s.memory = "O(T C)";
  s.quadratic = true;
  s.check = [](const Call& c) {
    LINMIX_CHECK(c.d("Tw") >= c.d("T") + (c.has("state.k") ? c.d("L") : 0),
                 "tensor 'w': Tw = " + std::to_string(c.d("Tw")) + " is smaller than the sequence length " +
                     std::to_string(c.d("T") + (c.has("state.k") ? c.d("L") : 0)));
  };
  s.own_dims = [](std::map<std::string, int64_t>& d, Scale scale, bool) {  // w longer than T (and a cache), as a model's
    d["Tw"] = d["T"] + (scale == Scale::Test ? 2 + d["L"] : scale == Scale::Grad ? 1 + d["L"] : 0);
  };
  s.y_dims = "B,T,C";
  set_reference(s, [](const Call& c, const auto& x) {
    using S = scalar_of<decltype(x)>;
    const int64_t B = c.d("B"), T = c.d("T"), C = c.d("C"), Tw = c.d("Tw");
    const S* w = x.at("w").data();
    std::vector<S> y(B * T * C);
    ref::aft_ref<S>(y.data(), x.at("q").data(), x.at("k").data(), x.at("v").data(), B, T, C, c.causal,
                    [&](int64_t t, int64_t s, int64_t) { return w[t * Tw + s]; });
    return y;
  });
  set_aft_forms(s, AftVariant::Full);
  return s;
}

}  // namespace linmix
