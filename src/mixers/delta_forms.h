// The delta rule (DeltaNet, Schlag et al. 2021; chunked by Yang et al. 2024) and its gated form
// (Gated DeltaNet, Yang, Kautz & Hatamizadeh 2024), shared by deltanet.cpp and gated_deltanet.cpp:
//   S_t = e^{g_t} (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,  y_t = scale S_t^T q_t
// (g = 0 for deltanet), q and k first l2-normalised (param l2norm, default 1).
// parallel: the diagonal-plus-low-rank chunked kernel (kernels/decay_chunk.h dplr_*, the WY /
// UT-transform form generalised) with r = scale q, w = g, k' = beta k, a = k, b = -e^{g} beta k;
// backward: dplr_backward and the chain rule through that map and the normalisation.
#pragma once
#include <cstring>

#include "decay_forms.h"

namespace linmix {

namespace ref {
template <class S>
std::vector<S> delta_ref(const Call& c, const RefIn<S>& x, bool gated) {
  const int64_t B = c.d("B"), T = c.d("T"), H = c.d("H"), D = c.d("D"), E = c.d("E");
  const S scale = c.given.at("scale") ? c.p("scale") : 1.0 / std::sqrt(double(D));
  const bool norm = c.p("l2norm") != 0;
  const S *q = x.at("q").data(), *k = x.at("k").data(), *v = x.at("v").data(), *beta = x.at("beta").data();
  const S *g = gated ? x.at("g").data() : nullptr, *S0 = opt_in(x, "state.S");
  std::vector<S> y(B * T * H * E), fin(B * H * D * E), qn(D), kn(D), sk(E);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      S* St = &fin[(b * H + h) * D * E];
      for (int64_t i = 0; i < D * E; ++i) St[i] = S0 ? S0[(b * H + h) * D * E + i] : S(0.0);
      for (int64_t t = 0; t < T; ++t) {
        const int64_t rt = (b * T + t) * H + h;
        if (norm) l2norm(qn.data(), q + rt * D, D), l2norm(kn.data(), k + rt * D, D);
        else std::copy(q + rt * D, q + (rt + 1) * D, qn.begin()), std::copy(k + rt * D, k + (rt + 1) * D, kn.begin());
        const S f = gated ? exp(g[rt]) : S(1.0);
        // S = f S;  S += beta k (v - S^T k)^T
        for (int64_t i = 0; i < D * E; ++i) St[i] = f * St[i];
        for (int64_t e = 0; e < E; ++e) {
          sk[e] = 0.0;
          for (int64_t d = 0; d < D; ++d) sk[e] += St[d * E + e] * kn[d];
        }
        for (int64_t d = 0; d < D; ++d)
          for (int64_t e = 0; e < E; ++e) St[d * E + e] += beta[rt] * kn[d] * (v[rt * E + e] - sk[e]);
        for (int64_t e = 0; e < E; ++e) {
          S acc = 0.0;
          for (int64_t d = 0; d < D; ++d) acc += qn[d] * St[d * E + e];
          y[rt * E + e] = scale * acc;
        }
      }
    }
  append(y, fin);
  return y;
}
}  // namespace ref

// x (T,D) rows replaced by x / sqrt(|x|^2 + 1e-6); inv (T) keeps 1 / sqrt(...).
inline void l2norm_rows(std::vector<float>& x, std::vector<float>& inv, int64_t T, int64_t D) {
  inv.resize(size_t(T));
  for (int64_t t = 0; t < T; ++t) {
    float s = 1e-6f, *xt = x.data() + t * D;
#pragma omp simd reduction(+ : s)
    for (int64_t d = 0; d < D; ++d) s += xt[d] * xt[d];
    const float f = inv[size_t(t)] = 1.0f / std::sqrt(s);
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) xt[d] *= f;
  }
}
// d(raw) from d(normalised) xn: (dxn - xn (xn . dxn)) inv, in place in dx.
inline void l2norm_rows_backward(std::vector<float>& dx, const std::vector<float>& xn, const std::vector<float>& inv,
                                 int64_t T, int64_t D) {
  for (int64_t t = 0; t < T; ++t) {
    float dot = 0.0f, *g = dx.data() + t * D;
    const float *x = xn.data() + t * D, f = inv[size_t(t)];
#pragma omp simd reduction(+ : dot)
    for (int64_t d = 0; d < D; ++d) dot += x[d] * g[d];
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) g[d] = (g[d] - x[d] * dot) * f;
  }
}

inline TensorMap delta_run(const Call& c, const Tensor* dy, bool gated) {
  const int64_t B = c.d("B"), T = c.d("T"), H = c.d("H"), D = c.d("D"), E = c.d("E");
  const float scale = readout_scale(c, true);
  const bool norm = c.p("l2norm") != 0;
  TensorMap out = decay_outputs(c, dy, {{"dq", {B, T, H, D}}, {"dk", {B, T, H, D}}, {"dv", {B, T, H, E}},
                                        {"dbeta", {B, T, H}}, {"dg", {B, T, H}}, {"dstate.S", {B, H, D, E}}});
  const float *q = c.t("q").ptr(), *k = c.t("k").ptr(), *v = c.t("v").ptr(), *beta = c.t("beta").ptr(),
              *g = gated ? c.t("g").ptr() : nullptr;
  // r = scale qn, a = kn, k' = beta kn, b = -e^{g} beta kn, w = g (qn, kn: q, k l2-normalised)
  auto load = [&](int64_t b, int64_t h, int64_t t0, int64_t n, const DplrChunkRows& x) {
    for (int64_t t = 0; t < n; ++t) {
      const int64_t row = (b * T + t0 + t) * H + h, to = t * D;
      const float *qt = q + row * D, *kt = k + row * D;
      float sq = 1e-6f, sk = 1e-6f;
      if (norm) {
#pragma omp simd reduction(+ : sq, sk)
        for (int64_t d = 0; d < D; ++d) sq += qt[d] * qt[d], sk += kt[d] * kt[d];
      }
      const float fq = norm ? scale / std::sqrt(sq) : scale, fk = norm ? 1.0f / std::sqrt(sk) : 1.0f;
      const float gt = gated ? g[row] : 0.0f, bt = beta[row], ft = -std::exp(gt) * bt;
      float *r = x.r + to, *a = x.a + to, *kb = x.k + to, *bb = x.b + to, *w = x.w + to;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) {
        const float kn = kt[d] * fk;
        r[d] = qt[d] * fq, a[d] = kn, kb[d] = kn * bt, bb[d] = kn * ft, w[d] = gt;
      }
      std::memcpy(x.v + t * E, v + row * E, size_t(E) * 4);
    }
  };
  auto post = [&](DplrHead& z) {
    // recover the map's inputs: kn = a, beta, e^{g} (into buffers kept across heads and calls)
    thread_local std::vector<float> qn, kr, iq, ik, beta, g, dq, dk, dbeta, dg;
    rows_into(qn, c, "q", z.b, z.h, D), rows_into(kr, c, "k", z.b, z.h, D);
    if (norm) l2norm_rows(qn, iq, T, D), l2norm_rows(kr, ik, T, D);
    rows_into(beta, c, "beta", z.b, z.h, 1);
    if (gated) rows_into(g, c, "g", z.b, z.h, 1);
    else g.assign(size_t(T), 0.0f);
    dq.resize(size_t(T * D)), dk.resize(size_t(T * D)), dbeta.resize(size_t(T)), dg.resize(size_t(T));
    for (int64_t t = 0; t < T; ++t) {
      const float bt = beta[size_t(t)], eg = std::exp(g[size_t(t)]);
      const int64_t o = t * D;
      const float *dr = z.dr.data() + o, *zk = z.dk.data() + o, *da = z.da.data() + o, *db = z.db.data() + o,
                  *bb = z.bb.data() + o, *dw = z.dw.data() + o, *kt = kr.data() + o;
      float *dqt = dq.data() + o, *dkt = dk.data() + o;
      float sb = 0.0f, sw = 0.0f, sbd = 0.0f;
#pragma omp simd reduction(+ : sb, sw, sbd)
      for (int64_t d = 0; d < D; ++d) {
        dqt[d] = scale * dr[d];
        dkt[d] = bt * zk[d] + da[d] - eg * bt * db[d];
        sb += kt[d] * (zk[d] - eg * db[d]);  // d beta
        sbd += bb[d] * db[d];                // d g through b = -e^{g} beta k
        sw += dw[d];
      }
      dbeta[size_t(t)] = sb, dg[size_t(t)] = sw + sbd;
    }
    if (norm) l2norm_rows_backward(dq, qn, iq, T, D), l2norm_rows_backward(dk, kr, ik, T, D);
    put_head(out["dq"], dq.data(), z.b, z.h, T, H, D), put_head(out["dk"], dk.data(), z.b, z.h, T, H, D);
    put_head(out["dv"], z.dv.data(), z.b, z.h, T, H, E), put_head(out["dbeta"], dbeta.data(), z.b, z.h, T, H, 1);
    if (gated) put_head(out["dg"], dg.data(), z.b, z.h, T, H, 1);
    put_state(out, "dstate.S", z.dS0, z.b * H + z.h);
  };
  dplr_heads(c, dy, D, E, out, load, post);
  return out;
}

inline void delta_spec(MixerSpec& s, bool gated) {
  decay_spec_common(s);
  s.inputs = {{"q", "B,T,H,D"}, {"k", "B,T,H,D"}, {"v", "B,T,H,E"}, {"beta", "B,T,H"}};
  if (gated) s.inputs.push_back({"g", "B,T,H"});
  s.params = {{"scale", 0.0, false, -1e300, "read-out scale", "1/sqrt(D)"},
              {"l2norm", 1, true, 0, "1: q, k replaced by q / |q|, k / |k| first (fla's use_qk_l2norm_in_kernel)"}};
  s.more_params = {{{"l2norm", "0"}, {"scale", "0.7"}}};
  s.example_fix = [gated](TensorMap& in) {
    // beta = sigma(x) (g = logsigmoid(x) / 16); every key row rescaled to a norm in [0.5, 1)
    // (from its own draw), so that raw keys (l2norm 0) keep I - beta k k^T a contraction for
    // beta < 2 as unit keys do, and the normalisation (l2norm 1) still sees non-unit keys
    for (float& x : in["beta"].data) x = 1.0f / (1.0f + std::exp(-x));
    if (gated)
      for (float& x : in["g"].data) x = -std::log1p(std::exp(-x)) / 16.0f;
    Tensor& k = in["k"];
    const int64_t D = k.shape.back();
    for (int64_t row = 0; row < k.numel() / D; ++row) {
      float* kr = k.ptr() + row * D;
      float n = 1e-12f;
      for (int64_t d = 0; d < D; ++d) n += kr[d] * kr[d];
      const float target = 0.5f + 0.5f * std::fabs(kr[0]) / (1.0f + std::fabs(kr[0]));
      for (int64_t d = 0; d < D; ++d) kr[d] *= target / std::sqrt(n);
    }
  };
  s.stress = [gated](TensorMap& in, bool for_grad) {
    if (gated) fast_log_decay(in["g"], for_grad, 9);
    for (float& x : in["beta"].data) x = 2.0f * x;  // beta in (0, 2): the edge of the contraction
  };
  if (gated) s.log_decays = {"g"};
  s.kernel_checks_values = true;  // dplr_heads checks each chunk's rows as it loads them
  s.check = [](const Call& c) {
    check_flag(c, "l2norm");
  };
  s.flops = [](const std::map<std::string, int64_t>& d, bool) {
    return double(d.at("H")) * dplr_flops(double(d.at("T")), double(d.at("D")), double(d.at("E")));
  };
  set_reference(s, [gated](const Call& c, const auto& x) { return ref::delta_ref(c, x, gated); });
  s.parallel = [gated](const Call& c) { return delta_run(c, nullptr, gated); };
  s.backward = [gated](const Call& c, const Tensor& dy) { return delta_run(c, &dy, gated); };
  s.stepper = [gated](const Call& c) {
    const int64_t H = c.d("H"), D = c.d("D"), E = c.d("E");
    const float scale = readout_scale(c, true);
    const bool norm = c.p("l2norm") != 0;
    // S; then per head scratch: r, k', b, kn, decay (D each), u (E)
    auto buf = std::make_shared<std::vector<float>>(H * D * E + H * (5 * D + E), 0.0f);
    const float *q = c.t("q").ptr(), *k = c.t("k").ptr(), *v = c.t("v").ptr(), *beta = c.t("beta").ptr(),
                *g = gated ? c.t("g").ptr() : nullptr;
    auto step = [=](float* y) {
      float* S = buf->data();
      step_heads(H, H * D * E, [&](int64_t h) {
        float *r = S + H * D * E + h * (5 * D + E), *kb = r + D, *bb = kb + D, *kn = bb + D, *f = kn + D, *u = f + D;
        float sq = 1e-6f, sk = 1e-6f;
        for (int64_t d = 0; d < D; ++d) sq += q[h * D + d] * q[h * D + d], sk += k[h * D + d] * k[h * D + d];
        const float iq = norm ? 1.0f / std::sqrt(sq) : 1.0f, ik = norm ? 1.0f / std::sqrt(sk) : 1.0f;
        const float eg = g ? exp_fast(g[h]) : 1.0f, bt = beta[h];
        for (int64_t d = 0; d < D; ++d) {
          kn[d] = k[h * D + d] * ik, r[d] = scale * q[h * D + d] * iq;
          kb[d] = bt * kn[d], bb[d] = -eg * bt * kn[d], f[d] = eg;
        }
        dplr_step(S + h * D * E, y + h * E, u, r, f, kb, v + h * E, kn, bb, D, E);
      });
    };
    return s_stepper(buf, H, D, E, step);
  };
}

}  // namespace linmix
