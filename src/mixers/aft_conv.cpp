// aft_conv — AFT-conv (Zhai et al. 2021, sec. 3.2): per-head convolution kernels u (H x K) as
// the local position bias of the head's C/H channels (centred when non-causal: odd K; the last
// K positions when causal), 0 outside the kernel.
// The forms: the banded-sum kernel with the kernel support as its band (aft_forms.cpp).
#include "../ref/ref_util.h"
#include "aft_forms.h"
#include "common.h"

namespace linmix {

MixerSpec aft_conv_spec() {
  MixerSpec s = aft_base();
  s.name = "aft_conv";
  s.summary = "AFT with per-head convolution kernels u (H x K) as the local bias";
  s.inputs.push_back({"u", "H,K"});
  s.state = kAftSums;
  s.state.insert(s.state.end(), kAftRing.begin(), kAftRing.end());
  s.state_size = "3 C running sums + last K-1 (k, v) rows";
  s.time = "O(T K C)";
  s.memory = "O(T C) non-causal (suffix sums), O(K C) causal";
  s.check = [](const Call& c) {
    LINMIX_CHECK(c.d("C") % c.d("H") == 0, "tensor 'u': H = " + std::to_string(c.d("H")) +
                                               " heads must divide C = " + std::to_string(c.d("C")));
    LINMIX_CHECK(c.causal || c.d("K") % 2 == 1, "tensor 'u': non-causal aft_conv needs an odd kernel size K, found " +
                                                    std::to_string(c.d("K")));
    if (c.has("state.k"))
      LINMIX_CHECK(c.d("L") <= c.d("K") - 1, "tensor 'state.k': holds at most K-1 = " + std::to_string(c.d("K") - 1) +
                                                 " rows, found " + std::to_string(c.d("L")));
  };
  // H heads of C/H channels; K odd when non-causal, an even K tested where it is allowed (causal)
  s.own_dims = [](std::map<std::string, int64_t>& d, Scale scale, bool causal) {
    switch (scale) {
      case Scale::Test: d["K"] = causal ? 4 : 5; break;
      case Scale::Grad: d["K"] = causal ? 2 : 3; break;
      case Scale::Demo: d["K"] = 7; break;
      case Scale::Bench: d["K"] = 64; break;
    }
    d["L"] = std::min<int64_t>(2, d["K"] - 1);  // a ring within the kernel's K - 1 rows
  };
  // every causal form starts from the sums and the ring (K - 1 rows), and returns the final ones
  set_ring_state(s, [](const Call& c) { return c.d("K") - 1; });
  s.y_dims = "B,T,C";
  set_reference(s, [](const Call& c, const auto& x) {
    using S = scalar_of<decltype(x)>;
    const int64_t B = c.d("B"), T = c.d("T"), C = c.d("C"), H = c.d("H"), K = c.d("K"), half = (K - 1) / 2;
    const S* u = x.at("u").data();
    auto bias = [&](int64_t t, int64_t s, int64_t ch) {
      const int64_t h = ch / (C / H);
      if (c.causal) return t - s >= 0 && t - s < K ? u[h * K + (t - s)] : S(0);
      return t - s <= half && s - t <= half ? u[h * K + (t - s + half)] : S(0);
    };
    if (!c.causal) {
      std::vector<S> y(B * T * C);
      ref::aft_ref<S>(y.data(), x.at("q").data(), x.at("k").data(), x.at("v").data(), B, T, C, false, bias);
      return y;
    }
    // from the sums and the ring (none: L = 0); the bias depends on t - s only
    const int64_t L = x.count("state.num") ? c.d("L") : 0, keep = std::min(L + T, K - 1);
    std::vector<S> y(B * T * C + B * C * 3 + 2 * B * keep * C);
    ref::aft_ring_ref<S>(y.data(), y.data() + B * T * C, x.at("q").data(), x.at("k").data(), x.at("v").data(), B, T,
                         C, L, K - 1, opt_in(x, "state.num"), opt_in(x, "state.den"), opt_in(x, "state.max"),
                         opt_in(x, "state.k"), opt_in(x, "state.v"), std::vector<int64_t>(size_t(B), L), false, bias);
    return y;
  });
  set_aft_forms(s, AftVariant::Conv);
  s.blocking.push_back({"T", kAftRows});  // the factored band's row blocks (aft_band.cpp), after set_aft_forms' C
  return s;
}

}  // namespace linmix
