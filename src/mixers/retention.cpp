// retention — RetNet retention (Sun et al. 2023, "Retentive Network"): a fixed decay gamma_h
// per head. S_t = gamma S_{t-1} + k_t v_t^T, y_t = scale S_t^T q_t.
// parallel: RetNet's chunkwise recurrent form, run by the gated chunked kernel with the log
// decay log gamma on every step (powers gamma^n with n >= 0 only); backward: gated_backward_heads,
// dgamma = sum of the log-decay gradients / gamma; recurrent: gated_step.
#include "decay_forms.h"

namespace linmix::ref {

// y_t = scale (sum_{s<=t} gamma^(t-s) (q_t . k_s) v_s + gamma^(t+1) S_{-1}^T q_t); then the final S.
template <class S>
std::vector<S> retention_ref(const Call& c, const RefIn<S>& x) {
  const int64_t B = c.d("B"), T = c.d("T"), H = c.d("H"), D = c.d("D"), E = c.d("E");
  const S scale = c.given.at("scale") ? c.p("scale") : 1.0 / std::sqrt(double(D));
  const S *q = x.at("q").data(), *k = x.at("k").data(), *v = x.at("v").data(), *gamma = x.at("gamma").data();
  const S* S0 = opt_in(x, "state.S");
  std::vector<S> y(B * T * H * E), fin(B * H * D * E);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      const S lg = log(gamma[h]);
      for (int64_t t = 0; t < T; ++t) {
        const int64_t rt = (b * T + t) * H + h;
        for (int64_t e = 0; e < E; ++e) {
          S acc = 0.0;
          for (int64_t s = 0; s <= t; ++s) {
            const int64_t rs = (b * T + s) * H + h;
            S qk = 0.0;
            for (int64_t d = 0; d < D; ++d) qk += q[rt * D + d] * k[rs * D + d];
            acc += exp(S(double(t - s)) * lg) * qk * v[rs * E + e];
          }
          if (S0)
            for (int64_t d = 0; d < D; ++d)
              acc += exp(S(double(t + 1)) * lg) * S0[((b * H + h) * D + d) * E + e] * q[rt * D + d];
          y[rt * E + e] = scale * acc;
        }
      }
      for (int64_t d = 0; d < D; ++d)  // S_{T-1} = gamma^T S_{-1} + sum_s gamma^(T-1-s) k_s v_s^T
        for (int64_t e = 0; e < E; ++e) {
          S acc = S0 ? exp(S(double(T)) * lg) * S0[((b * H + h) * D + d) * E + e] : S(0.0);
          for (int64_t s = 0; s < T; ++s) {
            const int64_t rs = (b * T + s) * H + h;
            acc += exp(S(double(T - 1 - s)) * lg) * k[rs * D + d] * v[rs * E + e];
          }
          fin[((b * H + h) * D + d) * E + e] = acc;
        }
    }
  append(y, fin);
  return y;
}

}  // namespace linmix::ref

namespace linmix {

namespace {

TensorMap retention_run(const Call& c, const Tensor* dy) {
  const int64_t B = c.d("B"), T = c.d("T"), H = c.d("H"), D = c.d("D"), E = c.d("E");
  const float scale = readout_scale(c, true);
  const float* gamma = c.t("gamma").ptr();
  TensorMap out = decay_outputs(c, dy, {{"dq", {B, T, H, D}}, {"dk", {B, T, H, D}}, {"dv", {B, T, H, E}},
                                        {"dgamma", {H}}, {"dstate.S", {B, H, D, E}}});
  float* py = out["y"].ptr();
  float *pdq = dy ? out["dq"].ptr() : nullptr, *pdk = dy ? out["dk"].ptr() : nullptr, *pdv = dy ? out["dv"].ptr() : nullptr;
  auto prep = [&](GatedHead& z) {  // the kernels read the heads' rows in place (one row of log gamma)
    const int64_t r0 = z.b * T * H + z.h;  // the row of (b, 0, h)
    z.iq = c.t("q").ptr() + r0 * D, z.ik = c.t("k").ptr() + r0 * D, z.iv = c.t("v").ptr() + r0 * E;
    z.g.assign(1, std::log(gamma[z.h]));
    z.ig = z.g.data(), z.oy = py + r0 * E;
    z.ld = {H * D, H * D, H * E, 0, H * E, scale};
    z.ld.g_row = true;
    z.S0 = head_state(c, "S", z.b * H + z.h, D * E);
    if (!dy) return;
    z.odq = pdq + r0 * D, z.odk = pdk + r0 * D, z.odv = pdv + r0 * E;
    z.dg.resize(1), z.odg = z.dg.data();  // d log(gamma), summed over the steps and key channels
  };
  auto post = [&](GatedHead& z) {
    put_state(out, "state.S", z.S, z.b * H + z.h);
    if (!dy) return;
    put_state(out, "dstate.S", z.dS0, z.b * H + z.h);
#pragma omp critical(retention_dgamma)
    out["dgamma"].data[size_t(z.h)] += z.dg[0] / gamma[z.h];
  };
  gated_heads(c, dy, D, E, false, prep, post);
  return out;
}

MixerSpec make_spec() {
  MixerSpec s;
  s.name = "retention";
  s.paper = "Sun et al. 2023, Retentive Network: A Successor to Transformer for Large Language Models";
  s.summary = "RetNet retention: linear attention with a fixed exponential decay gamma per head";
  decay_spec_common(s);
  s.inputs = {{"q", "B,T,H,D"}, {"k", "B,T,H,D"}, {"v", "B,T,H,E"}, {"gamma", "H"}};
  s.kernel_checks_values = true;  // gated_heads checks q, k, v as it runs
  s.params = {{"scale", 0.0, false, -1e300, "read-out scale", "1/sqrt(D)"}};
  s.more_params = {{{"scale", "0.7"}}};
  s.example_fix = [](TensorMap& in) {  // gamma = sigma(x + 4)
    for (float& x : in["gamma"].data) x = 1.0f / (1.0f + std::exp(-(x + 4.0f)));
  };
  s.stress = [](TensorMap& in, bool for_grad) {  // gamma = exp(-exp(x)): log decays to about -30
    Tensor& g = in["gamma"];
    fast_log_decay(g, for_grad, 2);
    for (float& x : g.data) x = std::max(std::exp(x), 1e-30f);
  };
  s.check = [](const Call& c) {
    for (float x : c.t("gamma").data)
      LINMIX_CHECK(x > 0.0f && x <= 1.0f, "tensor 'gamma': decays must be in (0, 1], found " + std::to_string(x));
  };
  s.flops = [](const std::map<std::string, int64_t>& d, bool) {
    return double(d.at("H")) * gated_flops(double(d.at("T")), double(d.at("D")), double(d.at("E")));
  };
  set_reference(s, [](const Call& c, const auto& x) { return ref::retention_ref(c, x); });
  s.parallel = [](const Call& c) { return retention_run(c, nullptr); };
  s.backward = [](const Call& c, const Tensor& dy) { return retention_run(c, &dy); };
  s.stepper = [](const Call& c) {
    const int64_t H = c.d("H"), D = c.d("D"), E = c.d("E");
    const float scale = readout_scale(c, true);
    auto buf = std::make_shared<std::vector<float>>(H * D * E + H * 2 * D, 0.0f);  // S; a head's scaled q, decays
    for (int64_t h = 0; h < H; ++h)
      std::fill(buf->begin() + H * D * E + h * 2 * D + D, buf->begin() + H * D * E + (h + 1) * 2 * D, c.t("gamma").data[size_t(h)]);
    const float *q = c.t("q").ptr(), *k = c.t("k").ptr(), *v = c.t("v").ptr();
    auto step = [=](float* y) {
      float* S = buf->data();
      step_heads(H, H * D * E, [&](int64_t h) {
        float *qs = S + H * D * E + h * 2 * D, *f = qs + D;
        for (int64_t d = 0; d < D; ++d) qs[d] = scale * q[h * D + d];
        gated_step(S + h * D * E, y + h * E, qs, k + h * D, v + h * E, f, D, E, false);
      });
    };
    return s_stepper(buf, H, D, E, step);
  };
  return s;
}

}  // namespace

MixerSpec retention_spec() { return make_spec(); }

}  // namespace linmix
