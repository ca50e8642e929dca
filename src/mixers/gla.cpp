// gla — Gated Linear Attention (Yang et al. 2023, "Gated Linear Attention Transformers with
// Hardware-Efficient Training"). S_t = diag(e^{g_t}) S_{t-1} + k_t v_t^T, y_t = scale S_t^T q_t.
// parallel: the chunked form with secondary chunking (kernels/decay_chunk.h, gated_forward_heads),
// from state.S and handing the final state on; backward: gated_backward_heads; recurrent: gated_step.
#include "decay_forms.h"

namespace linmix::ref {

// The literal recurrence, per sequence and head; returns y then the final S.
template <class S>
std::vector<S> gla_ref(const Call& c, const RefIn<S>& x) {
  const int64_t B = c.d("B"), T = c.d("T"), H = c.d("H"), D = c.d("D"), E = c.d("E");
  const S scale = c.given.at("scale") ? c.p("scale") : 1.0 / std::sqrt(double(D));
  const S *q = x.at("q").data(), *k = x.at("k").data(), *v = x.at("v").data(), *g = x.at("g").data();
  const S* S0 = opt_in(x, "state.S");
  std::vector<S> y(B * T * H * E), fin(B * H * D * E);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      S* St = &fin[(b * H + h) * D * E];
      for (int64_t i = 0; i < D * E; ++i) St[i] = S0 ? S0[(b * H + h) * D * E + i] : S(0.0);
      for (int64_t t = 0; t < T; ++t) {
        const int64_t r = (b * T + t) * H + h;
        for (int64_t d = 0; d < D; ++d) {
          const S f = exp(g[r * D + d]);
          for (int64_t e = 0; e < E; ++e) St[d * E + e] = f * St[d * E + e] + k[r * D + d] * v[r * E + e];
        }
        for (int64_t e = 0; e < E; ++e) {
          S acc = 0.0;
          for (int64_t d = 0; d < D; ++d) acc += q[r * D + d] * St[d * E + e];
          y[r * E + e] = scale * acc;
        }
      }
    }
  append(y, fin);
  return y;
}

}  // namespace linmix::ref

namespace linmix {

namespace {

// Every head through the chunked kernel; with dy also the backward.
TensorMap gla_run(const Call& c, const Tensor* dy) {
  const int64_t B = c.d("B"), T = c.d("T"), H = c.d("H"), D = c.d("D"), E = c.d("E");
  const float scale = readout_scale(c, true);
  TensorMap out = decay_outputs(c, dy, {{"dq", {B, T, H, D}}, {"dk", {B, T, H, D}}, {"dv", {B, T, H, E}},
                                        {"dg", {B, T, H, D}}, {"dstate.S", {B, H, D, E}}});
  float* py = out["y"].ptr();
  float* pd[4] = {};  // dq, dk, dv, dg
  if (dy) pd[0] = out["dq"].ptr(), pd[1] = out["dk"].ptr(), pd[2] = out["dv"].ptr(), pd[3] = out["dg"].ptr();
  auto prep = [&](GatedHead& z) {  // the kernels read and write the heads' rows in place
    const int64_t r0 = z.b * T * H + z.h;  // the row of (b, 0, h)
    z.iq = c.t("q").ptr() + r0 * D, z.ik = c.t("k").ptr() + r0 * D, z.ig = c.t("g").ptr() + r0 * D;
    z.iv = c.t("v").ptr() + r0 * E, z.oy = py + r0 * E;
    z.ld = {H * D, H * D, H * E, H * D, H * E, scale};
    z.S0 = head_state(c, "S", z.b * H + z.h, D * E);
    if (dy) z.odq = pd[0] + r0 * D, z.odk = pd[1] + r0 * D, z.odv = pd[2] + r0 * E, z.odg = pd[3] + r0 * D;
  };
  auto post = [&](GatedHead& z) {
    put_state(out, "state.S", z.S, z.b * H + z.h);
    if (dy) put_state(out, "dstate.S", z.dS0, z.b * H + z.h);
  };
  gated_heads(c, dy, D, E, false, prep, post);
  return out;
}

MixerSpec make_spec() {
  MixerSpec s;
  s.name = "gla";
  s.paper = "Yang et al. 2023, Gated Linear Attention Transformers with Hardware-Efficient Training";
  s.summary = "linear attention with a data-dependent diagonal forget gate per key channel";
  decay_spec_common(s);
  s.inputs = {{"q", "B,T,H,D"}, {"k", "B,T,H,D"}, {"v", "B,T,H,E"}, {"g", "B,T,H,D"}};
  s.params = {{"scale", 0.0, false, -1e300, "read-out scale", "1/sqrt(D)"}};
  s.more_params = {{{"scale", "0.7"}}};
  s.example_fix = [](TensorMap& in) {  // GLA's gate: logsigmoid(x) / 16
    for (float& x : in["g"].data) x = -std::log1p(std::exp(-x)) / 16.0f;
  };
  s.stress = [](TensorMap& in, bool for_grad) { fast_log_decay(in["g"], for_grad, 1); };
  s.log_decays = {"g"};
  s.kernel_checks_values = true;  // gated_heads checks q, k, v, g as it runs
  s.flops = [](const std::map<std::string, int64_t>& d, bool) {
    return double(d.at("H")) * gated_flops(double(d.at("T")), double(d.at("D")), double(d.at("E")));
  };
  set_reference(s, [](const Call& c, const auto& x) { return ref::gla_ref(c, x); });
  s.parallel = [](const Call& c) { return gla_run(c, nullptr); };
  s.backward = [](const Call& c, const Tensor& dy) { return gla_run(c, &dy); };
  s.stepper = [](const Call& c) {
    const int64_t H = c.d("H"), D = c.d("D"), E = c.d("E");
    const float scale = readout_scale(c, true);
    auto buf = std::make_shared<std::vector<float>>(H * D * E + H * 2 * D, 0.0f);  // S; a head's scaled q, decay
    const float *q = c.t("q").ptr(), *k = c.t("k").ptr(), *v = c.t("v").ptr(), *g = c.t("g").ptr();
    auto step = [=](float* y) {
      float* S = buf->data();
      step_heads(H, H * D * E, [&](int64_t h) {
        float *qs = S + H * D * E + h * 2 * D, *f = qs + D;
        for (int64_t d = 0; d < D; ++d) qs[d] = scale * q[h * D + d], f[d] = exp_fast(g[h * D + d]);
        gated_step(S + h * D * E, y + h * E, qs, k + h * D, v + h * E, f, D, E, false);
      });
    };
    return s_stepper(buf, H, D, E, step);
  };
  return s;
}

}  // namespace

MixerSpec gla_spec() { return make_spec(); }

}  // namespace linmix
