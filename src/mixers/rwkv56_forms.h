// The RWKV-5 / RWKV-6 WKV (Peng et al. 2024, "Eagle and Finch"), shared by rwkv5.cpp (w
// (H,D) constant in time) and rwkv6.cpp (w (B,T,H,D) per token):
//   y_t = scale (S_{t-1} + diag(u) k_t v_t^T)^T r_t,  S_t = diag(e^{w_t}) S_{t-1} + k_t v_t^T.
// parallel: the gated chunked kernel with the read-out one step earlier (shift) plus the
// diagonal bonus scale (r_t . (u o k_t)) v_t; backward: gated_backward_heads, the bonus's terms included.
#pragma once
#include "decay_forms.h"

namespace linmix {

namespace ref {
// The literal recurrence; w is (B,T,H,D) (per_token) or (H,D). Returns y then the final S.
template <class S>
std::vector<S> rwkv56_ref(const Call& c, const RefIn<S>& x, bool per_token) {
  const int64_t B = c.d("B"), T = c.d("T"), H = c.d("H"), D = c.d("D"), E = c.d("E");
  const S scale = c.given.at("scale") ? c.p("scale") : 1.0;
  const S *r = x.at("r").data(), *k = x.at("k").data(), *v = x.at("v").data(), *w = x.at("w").data(),
          *u = x.at("u").data();
  const S* S0 = opt_in(x, "state.S");
  std::vector<S> y(B * T * H * E), fin(B * H * D * E);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      S* St = &fin[(b * H + h) * D * E];
      for (int64_t i = 0; i < D * E; ++i) St[i] = S0 ? S0[(b * H + h) * D * E + i] : S(0.0);
      for (int64_t t = 0; t < T; ++t) {
        const int64_t rt = (b * T + t) * H + h;
        for (int64_t e = 0; e < E; ++e) {
          S acc = 0.0;
          for (int64_t d = 0; d < D; ++d)
            acc += r[rt * D + d] * (St[d * E + e] + u[h * D + d] * k[rt * D + d] * v[rt * E + e]);
          y[rt * E + e] = scale * acc;
        }
        for (int64_t d = 0; d < D; ++d) {
          const S f = exp(per_token ? w[rt * D + d] : w[h * D + d]);
          for (int64_t e = 0; e < E; ++e) St[d * E + e] = f * St[d * E + e] + k[rt * D + d] * v[rt * E + e];
        }
      }
    }
  append(y, fin);
  return y;
}
}  // namespace ref

inline TensorMap rwkv56_run(const Call& c, const Tensor* dy, bool per_token) {
  const int64_t B = c.d("B"), T = c.d("T"), H = c.d("H"), D = c.d("D"), E = c.d("E");
  const float scale = readout_scale(c, false);
  const float* u = c.t("u").ptr();
  const std::vector<int64_t> wshape = per_token ? std::vector<int64_t>{B, T, H, D} : std::vector<int64_t>{H, D};
  TensorMap out = decay_outputs(c, dy, {{"dr", {B, T, H, D}}, {"dk", {B, T, H, D}}, {"dv", {B, T, H, E}},
                                        {"dw", wshape}, {"du", {H, D}}, {"dstate.S", {B, H, D, E}}});
  float* py = out["y"].ptr();
  float* pd[4] = {};  // dr, dk, dv, dw (per token)
  if (dy) pd[0] = out["dr"].ptr(), pd[1] = out["dk"].ptr(), pd[2] = out["dv"].ptr(), pd[3] = out["dw"].ptr();
  auto prep = [&](GatedHead& z) {  // the kernels read and write the heads' rows in place (w: one row when constant)
    const int64_t r0 = z.b * T * H + z.h;  // the row of (b, 0, h)
    z.iq = c.t("r").ptr() + r0 * D, z.ik = c.t("k").ptr() + r0 * D, z.iv = c.t("v").ptr() + r0 * E;
    z.ig = per_token ? c.t("w").ptr() + r0 * D : c.t("w").ptr() + z.h * D, z.oy = py + r0 * E;
    z.ld = {H * D, H * D, H * E, per_token ? H * D : 0, H * E, scale, u + z.h * D};
    z.S0 = head_state(c, "S", z.b * H + z.h, D * E);
    if (!dy) return;
    z.odq = pd[0] + r0 * D, z.odk = pd[1] + r0 * D, z.odv = pd[2] + r0 * E;
    z.dg.assign(per_token ? 0 : size_t(D), 0.0f), z.du.assign(size_t(D), 0.0f);
    z.odg = per_token ? pd[3] + r0 * D : z.dg.data(), z.odu = z.du.data();
  };
  auto post = [&](GatedHead& z) {
    put_state(out, "state.S", z.S, z.b * H + z.h);
    if (!dy) return;
    put_state(out, "dstate.S", z.dS0, z.b * H + z.h);
#pragma omp critical(rwkv56_weights)
    {  // u's gradient, and the constant decay's summed over time
      float *gu = out["du"].ptr() + z.h * D, *gw = per_token ? nullptr : out["dw"].ptr() + z.h * D;
      for (int64_t d = 0; d < D; ++d) {
        gu[d] += z.du[size_t(d)];
        if (gw) gw[d] += z.dg[size_t(d)];
      }
    }
  };
  gated_heads(c, dy, D, E, true, prep, post);
  return out;
}

// Everything of the spec that rwkv5 and rwkv6 share.
inline void rwkv56_spec(MixerSpec& s, bool per_token) {
  decay_spec_common(s);
  s.inputs = {{"r", "B,T,H,D"}, {"k", "B,T,H,D"}, {"v", "B,T,H,E"}, {"w", per_token ? "B,T,H,D" : "H,D"}, {"u", "H,D"}};
  s.kernel_checks_values = true;  // gated_heads checks r, k, v (and rwkv6's w) as it runs
  s.params = {{"scale", 1.0, false, -1e300, "read-out scale"}};
  s.more_params = {{{"scale", "0.7"}}};
  s.example_fix = [](TensorMap& in) {  // w = -exp(x - 3) (u = x)
    for (float& x : in["w"].data) x = -std::exp(x - 3.0f);
  };
  s.stress = [per_token](TensorMap& in, bool for_grad) { fast_log_decay(in["w"], for_grad, per_token ? 6 : 5); };
  s.log_decays = {"w"};
  s.flops = [](const std::map<std::string, int64_t>& d, bool) {
    return double(d.at("H")) * gated_flops(double(d.at("T")), double(d.at("D")), double(d.at("E")));
  };
  set_reference(s, [per_token](const Call& c, const auto& x) { return ref::rwkv56_ref(c, x, per_token); });
  s.parallel = [per_token](const Call& c) { return rwkv56_run(c, nullptr, per_token); };
  s.backward = [per_token](const Call& c, const Tensor& dy) { return rwkv56_run(c, &dy, per_token); };
  s.stepper = [](const Call& c) {  // w is read through one pointer: per token (overwritten each step) or (H,D)
    const int64_t H = c.d("H"), D = c.d("D"), E = c.d("E");
    const float scale = readout_scale(c, false);
    auto buf = std::make_shared<std::vector<float>>(H * D * E + H * 2 * D, 0.0f);  // S; a head's scaled r, decays
    const float *r = c.t("r").ptr(), *k = c.t("k").ptr(), *v = c.t("v").ptr(), *w = c.t("w").ptr(), *u = c.t("u").ptr();
    auto step = [=](float* y) {
      float* S = buf->data();
      step_heads(H, H * D * E, [&](int64_t h) {
        float *rs = S + H * D * E + h * 2 * D, *f = rs + D, beta = 0.0f;
        const float *rh = r + h * D, *uh = u + h * D, *kh = k + h * D, *wh = w + h * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) rs[d] = scale * rh[d], f[d] = exp_fast(wh[d]);
#pragma omp simd reduction(+ : beta)
        for (int64_t d = 0; d < D; ++d) beta += rs[d] * uh[d] * kh[d];
        gated_step(S + h * D * E, y + h * E, rs, kh, v + h * E, f, D, E, true);
        for (int64_t e = 0; e < E; ++e) y[h * E + e] += beta * v[h * E + e];
      });
    };
    return s_stepper(buf, H, D, E, step);
  };
}

}  // namespace linmix
