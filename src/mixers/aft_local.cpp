// aft_local — AFT-local (Zhai et al. 2021, sec. 3.2): the position bias used only inside a
// local window, 0 outside:  w'_ts = w_ts if |t - s| < window, else 0.
// The forms: the banded-sum kernel with the window as its band (aft_forms.cpp).
#include "../ref/ref_util.h"
#include "aft_forms.h"
#include "common.h"

namespace linmix {

MixerSpec aft_local_spec() {
  MixerSpec s = aft_base();
  s.name = "aft_local";
  s.summary = "AFT with the position bias used only inside a local window (0 outside)";
  s.inputs.push_back({"w", "Tw,Tw"});
  s.params = {{"window", 0, true, 1, "local window s (|t - s| < s uses w_ts); required"}};
  s.example_params = {{"window", "5"}};
  s.small_params = {{"window", "2"}};
  s.bench_params = {{"window", "128"}};
  s.state = kAftSums;
  s.state.insert(s.state.end(), kAftRing.begin(), kAftRing.end());
  s.state.push_back({"pos", "1"});
  s.state_size = "3 C running sums + last window-1 (k, v) rows + position";
  s.time = "O(T window C)";
  s.memory = "O(T C) non-causal (suffix sums), O(window C) causal";
  s.check = [](const Call& c) {
    LINMIX_CHECK(c.given.at("window"), "mixer 'aft_local' needs --param window=N (N >= 1)");
    const int64_t pos = c.has("state.pos") ? position_of(c.t("state.pos"), "state.pos") : 0;
    if (c.has("state.pos")) {
      LINMIX_CHECK(c.d("L") == std::min(pos, c.ip("window") - 1),
                   "tensor 'state.k': expected " + std::to_string(std::min(pos, c.ip("window") - 1)) +
                       " rows for position " + std::to_string(pos) + ", found " + std::to_string(c.d("L")));
    }
    LINMIX_CHECK(c.d("Tw") >= pos + c.d("T"), "tensor 'w': Tw = " + std::to_string(c.d("Tw")) +
                                                  " is smaller than the sequence length " +
                                                  std::to_string(pos + c.d("T")));
  };
  s.own_dims = [](std::map<std::string, int64_t>& d, Scale scale, bool) {
    d["Tw"] = d["T"] + (scale == Scale::Test ? 2 : scale == Scale::Grad ? 1 : 0);
  };
  s.y_dims = "B,T,C";
  set_reference(s, [](const Call& c, const auto& x) {
    using S = scalar_of<decltype(x)>;
    const int64_t B = c.d("B"), T = c.d("T"), C = c.d("C"), Tw = c.d("Tw"), win = c.ip("window");
    const S* w = x.at("w").data();
    std::vector<S> y(B * T * C);
    ref::aft_ref<S>(y.data(), x.at("q").data(), x.at("k").data(), x.at("v").data(), B, T, C, c.causal,
                    [&](int64_t t, int64_t s, int64_t) { return t - s < win && s - t < win ? w[t * Tw + s] : S(0); });
    return y;
  });
  set_aft_forms(s, AftVariant::Local);
  return s;
}

}  // namespace linmix
