// rwkv7 — RWKV-7 "Goose" WKV (Peng et al. 2025, "RWKV-7 Goose with Expressive Dynamic State
// Evolution"), the generalised delta rule with a diagonal-plus-low-rank transition:
//   S_t = (diag(e^{w_t}) + b_t a_t^T) S_{t-1} + k_t v_t^T,  y_t = scale S_t^T r_t
// (fla's chunk_rwkv7(r, w, k, v, a, b) layout; the state is key-first, the transpose of
// BlinkDL's value-first one). parallel: the DPLR chunked kernel (kernels/decay_chunk.h);
// backward: dplr_backward; recurrent: dplr_step.
#include <cstring>

#include "decay_forms.h"

namespace linmix::ref {

template <class S>
std::vector<S> rwkv7_ref(const Call& c, const RefIn<S>& x) {
  const int64_t B = c.d("B"), T = c.d("T"), H = c.d("H"), D = c.d("D"), E = c.d("E");
  const S scale = c.given.at("scale") ? c.p("scale") : 1.0;
  const S *r = x.at("r").data(), *w = x.at("w").data(), *k = x.at("k").data(), *v = x.at("v").data(),
          *a = x.at("a").data(), *bb = x.at("b").data(), *S0 = opt_in(x, "state.S");
  std::vector<S> y(B * T * H * E), fin(B * H * D * E), sa(E);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      S* St = &fin[(b * H + h) * D * E];
      for (int64_t i = 0; i < D * E; ++i) St[i] = S0 ? S0[(b * H + h) * D * E + i] : S(0.0);
      for (int64_t t = 0; t < T; ++t) {
        const int64_t o = ((b * T + t) * H + h) * D, oe = ((b * T + t) * H + h) * E;
        for (int64_t e = 0; e < E; ++e) {  // a^T S_{t-1}: the row of values stored under a
          sa[e] = 0.0;
          for (int64_t d = 0; d < D; ++d) sa[e] += a[o + d] * St[d * E + e];
        }
        for (int64_t d = 0; d < D; ++d) {
          const S f = exp(w[o + d]);
          for (int64_t e = 0; e < E; ++e) St[d * E + e] = f * St[d * E + e] + bb[o + d] * sa[e] + k[o + d] * v[oe + e];
        }
        for (int64_t e = 0; e < E; ++e) {
          S acc = 0.0;
          for (int64_t d = 0; d < D; ++d) acc += r[o + d] * St[d * E + e];
          y[oe + e] = scale * acc;
        }
      }
    }
  append(y, fin);
  return y;
}

}  // namespace linmix::ref

namespace linmix {

namespace {

TensorMap rwkv7_run(const Call& c, const Tensor* dy) {
  const int64_t B = c.d("B"), T = c.d("T"), H = c.d("H"), D = c.d("D"), E = c.d("E");
  const float scale = readout_scale(c, false);
  TensorMap out = decay_outputs(c, dy, {{"dr", {B, T, H, D}}, {"dw", {B, T, H, D}}, {"dk", {B, T, H, D}},
                                        {"dv", {B, T, H, E}}, {"da", {B, T, H, D}}, {"db", {B, T, H, D}},
                                        {"dstate.S", {B, H, D, E}}});
  const float *r = c.t("r").ptr(), *w = c.t("w").ptr(), *k = c.t("k").ptr(), *v = c.t("v").ptr(), *a = c.t("a").ptr(),
              *bb = c.t("b").ptr();
  auto load = [&](int64_t b, int64_t h, int64_t t0, int64_t n, const DplrChunkRows& x) {  // the inputs' rows, r scaled
    const int64_t row = (b * T + t0) * H + h, o = row * D;
    dplr_gather(x, n, D, E, r + o, w + o, k + o, v + row * E, a + o, bb + o, H * D, H * E, scale);
  };
  auto post = [&](DplrHead& z) {
    for (float& x : z.dr) x *= scale;
    put_head(out["dr"], z.dr.data(), z.b, z.h, T, H, D), put_head(out["dw"], z.dw.data(), z.b, z.h, T, H, D);
    put_head(out["dk"], z.dk.data(), z.b, z.h, T, H, D), put_head(out["dv"], z.dv.data(), z.b, z.h, T, H, E);
    put_head(out["da"], z.da.data(), z.b, z.h, T, H, D), put_head(out["db"], z.db.data(), z.b, z.h, T, H, D);
    put_state(out, "dstate.S", z.dS0, z.b * H + z.h);
  };
  dplr_heads(c, dy, D, E, out, load, post);
  return out;
}

MixerSpec make_spec() {
  MixerSpec s;
  s.name = "rwkv7";
  s.paper = "Peng et al. 2025, RWKV-7 \"Goose\" with Expressive Dynamic State Evolution";
  s.summary = "RWKV-7 WKV: the generalised delta rule, S = (diag(e^w) + b a^T) S + k v^T";
  decay_spec_common(s);
  s.inputs = {{"r", "B,T,H,D"}, {"w", "B,T,H,D"}, {"k", "B,T,H,D"}, {"v", "B,T,H,E"}, {"a", "B,T,H,D"}, {"b", "B,T,H,D"}};
  s.params = {{"scale", 1.0, false, -1e300, "read-out scale"}};
  s.more_params = {{{"scale", "0.7"}}};
  s.example_fix = [](TensorMap& in) {
    // w = -exp(-0.5) sigma(x); kk = x_a / |x_a| over D, a = -kk, b = kk o sigma(x_b)
    for (float& x : in["w"].data) x = -std::exp(-0.5f) / (1.0f + std::exp(-x));
    Tensor &a = in["a"], &b = in["b"];
    const int64_t D = a.shape.back();
    for (int64_t row = 0; row < a.numel() / D; ++row) {
      float n = 0.0f;
      for (int64_t d = 0; d < D; ++d) n += a.data[size_t(row * D + d)] * a.data[size_t(row * D + d)];
      n = std::sqrt(std::max(n, 1e-12f));
      for (int64_t d = 0; d < D; ++d) {
        const size_t o = size_t(row * D + d);
        const float kk = a.data[o] / n;
        a.data[o] = -kk, b.data[o] = kk / (1.0f + std::exp(-b.data[o]));
      }
    }
  };
  s.stress = [](TensorMap& in, bool for_grad) { fast_log_decay(in["w"], for_grad, 7); };
  s.log_decays = {"w"};
  s.kernel_checks_values = true;  // dplr_heads checks each chunk's rows as it loads them
  s.flops = [](const std::map<std::string, int64_t>& d, bool) {
    return double(d.at("H")) * dplr_flops(double(d.at("T")), double(d.at("D")), double(d.at("E")));
  };
  set_reference(s, [](const Call& c, const auto& x) { return ref::rwkv7_ref(c, x); });
  s.parallel = [](const Call& c) { return rwkv7_run(c, nullptr); };
  s.backward = [](const Call& c, const Tensor& dy) { return rwkv7_run(c, &dy); };
  s.stepper = [](const Call& c) {
    const int64_t H = c.d("H"), D = c.d("D"), E = c.d("E");
    const float scale = readout_scale(c, false);
    auto buf = std::make_shared<std::vector<float>>(H * D * E + H * (2 * D + E), 0.0f);  // S; a head's scaled r, decays, u
    const float *r = c.t("r").ptr(), *w = c.t("w").ptr(), *k = c.t("k").ptr(), *v = c.t("v").ptr(),
                *a = c.t("a").ptr(), *b = c.t("b").ptr();
    auto step = [=](float* y) {
      float* S = buf->data();
      step_heads(H, H * D * E, [&](int64_t h) {
        float *rs = S + H * D * E + h * (2 * D + E), *f = rs + D, *u = f + D;
        for (int64_t d = 0; d < D; ++d) rs[d] = scale * r[h * D + d], f[d] = exp_fast(w[h * D + d]);
        dplr_step(S + h * D * E, y + h * E, u, rs, f, k + h * D, v + h * E, a + h * D, b + h * D, D, E);
      });
    };
    return s_stepper(buf, H, D, E, step);
  };
  return s;
}

}  // namespace

MixerSpec rwkv7_spec() { return make_spec(); }

}  // namespace linmix
