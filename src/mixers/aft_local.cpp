// aft_local — AFT-local (Zhai et al. 2021, sec. 3.2): the position bias used only inside a
// local window, 0 outside:  w'_ts = w_ts if |t - s| < window, else 0.
// The forms: the banded-sum kernel with the window as its band (aft_forms.cpp).
#include "../ref/ref_util.h"
#include "aft_forms.h"
#include <algorithm>

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
  s.state.push_back({"pos", "B", false, true});
  s.state_size = "3 C running sums + last window-1 (k, v) rows + position";
  s.time = "O(T window C)";
  s.memory = "O(T C) non-causal (suffix sums), O(window C) causal";
  s.check = [](const Call& c) {
    LINMIX_CHECK(c.given.at("window"), "mixer 'aft_local' needs --param window=N (N >= 1)");
    int64_t last = 0;  // the largest position a call reaches
    for (int64_t pos : c.has("state.pos") ? positions_of(c.t("state.pos"), "state.pos") : std::vector<int64_t>{0}) {
      // the ring holds at most the last window - 1 positions before pos
      LINMIX_CHECK(!c.has("state.k") || c.d("L") <= std::min(pos, c.ip("window") - 1),
                   "tensor 'state.k': at most " + std::to_string(std::min(pos, c.ip("window") - 1)) +
                       " rows for position " + std::to_string(pos) + ", found " + std::to_string(c.d("L")));
      last = std::max(last, pos);
    }
    LINMIX_CHECK(c.d("Tw") >= last + c.d("T"), "tensor 'w': Tw = " + std::to_string(c.d("Tw")) +
                                                   " is smaller than the sequence length " +
                                                   std::to_string(last + c.d("T")));
  };
  // The forms read w only in the band |t - s| < window of the rows the call's positions reach
  // (causal: s <= t), 0 elsewhere: the values checked are those (T (2 window - 1) of Tw^2, a 64 MB
  // w at Tw 4096 is 4 MB at window 128). Rows: from the least position's ring (the ring's rows run
  // through the banded kernel as rows of their own, their outputs dropped: the backward's zero dy
  // times their w) to the largest position's last.
  s.read_runs["w"] = [](const Call& c) {
    const int64_t T = c.d("T"), Tw = c.d("Tw"), win = c.ip("window");
    int64_t lo = 0, hi = 0;
    if (c.has("state.pos")) {
      const std::vector<int64_t> pos = positions_of(c.t("state.pos"), "state.pos");
      lo = std::max<int64_t>(0, *std::min_element(pos.begin(), pos.end()) - (c.has("state.k") ? c.d("L") : 0));
      hi = *std::max_element(pos.begin(), pos.end());
    }
    std::vector<std::pair<int64_t, int64_t>> runs;
    for (int64_t t = lo; t < std::min(hi + T, Tw); ++t) {
      const int64_t s0 = std::max<int64_t>(0, t - win + 1), s1 = std::min(Tw - 1, c.causal ? t : t + win - 1);
      runs.emplace_back(t * Tw + s0, s1 - s0 + 1);
    }
    return runs;
  };
  // a ring of L = 2 rows (1 at the gradient tests' window 2) after up to 3 more tokens: w covers them
  s.own_dims = [](std::map<std::string, int64_t>& d, Scale scale, bool) {
    if (scale == Scale::Grad) d["L"] = 1;
    d["Tw"] = d["T"] + (scale == Scale::Test ? 2 + d["L"] + 3 : scale == Scale::Grad ? 1 + d["L"] + 3 : 0);
  };
  // every causal form starts from the sums, the ring (window - 1 rows) and the position, and
  // returns the final ones
  set_ring_state(s, [](const Call& c) { return c.ip("window") - 1; });
  s.state_fix = [](TensorMap& st) {
    fix_aft_sums(st);
    const float L = float(st["state.k"].dim(1));  // the ring's rows, then 0..3 tokens further
    for (float& p : st["state.pos"].data) p = L + std::round(std::min(3.0f, std::abs(p) * 2.0f));
  };
  s.y_dims = "B,T,C";
  set_reference(s, [](const Call& c, const auto& x) {
    using S = scalar_of<decltype(x)>;
    const int64_t B = c.d("B"), T = c.d("T"), C = c.d("C"), Tw = c.d("Tw"), win = c.ip("window");
    const S* w = x.at("w").data();
    auto bias = [&](int64_t t, int64_t s, int64_t) { return t - s < win && s - t < win ? w[t * Tw + s] : S(0); };
    if (!c.causal) {
      std::vector<S> y(B * T * C);
      ref::aft_ref<S>(y.data(), x.at("q").data(), x.at("k").data(), x.at("v").data(), B, T, C, false, bias);
      return y;
    }
    // from the sums, the ring and the positions (none: L = 0, position 0)
    const bool s0 = x.count("state.num") != 0;
    const int64_t L = s0 ? c.d("L") : 0, keep = std::min(L + T, win - 1);
    std::vector<int64_t> pos(size_t(B), 0);
    for (int64_t b = 0; s0 && b < B; ++b) pos[size_t(b)] = int64_t(ad::value(x.at("state.pos")[size_t(b)]));
    std::vector<S> y(B * T * C + B * C * 3 + 2 * B * keep * C + B);
    ref::aft_ring_ref<S>(y.data(), y.data() + B * T * C, x.at("q").data(), x.at("k").data(), x.at("v").data(), B, T,
                         C, L, win - 1, opt_in(x, "state.num"), opt_in(x, "state.den"), opt_in(x, "state.max"),
                         opt_in(x, "state.k"), opt_in(x, "state.v"), pos, true, bias);
    return y;
  });
  set_aft_forms(s, AftVariant::Local);
  return s;
}

}  // namespace linmix
