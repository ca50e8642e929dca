// mamba2 — Mamba-2 SSD (Dao & Gu 2024, "Transformers are SSMs"): a scalar decay e^{d_t A_h} per
// head over the state h (E,N), input-dependent B and C shared by the heads of a group.
//   d_t = softplus(dt_t + dt_bias), h_t = e^{d_t A} h_{t-1} + d_t x_t Bm_t^T, y_t = h_t Cm_t + D x_t,
//   y_t *= silu(z_t) when z is given.
// parallel: SSD's block decomposition as the gated chunked kernel with q = Cm, k = d Bm, v = x
// and log decay d A (the key-first state is h^T); backward: gated_backward and the chain rule
// through d, D and the gate; recurrent: gated_step.
#include "decay_forms.h"

namespace linmix::ref {

template <class S>
S softplus(const S& x) {
  return x > S(20.0) ? x : log1p(exp(x));
}

// The literal recurrence per sequence and head; returns y then the final h (B,H,E,N).
template <class S>
std::vector<S> mamba2_ref(const Call& c, const RefIn<S>& in) {
  const int64_t B = c.d("B"), T = c.d("T"), H = c.d("H"), E = c.d("E"), G = c.d("G"), N = c.d("N");
  const S *x = in.at("x").data(), *dt = in.at("dt").data(), *A = in.at("A").data(), *Bm = in.at("Bm").data(),
          *Cm = in.at("Cm").data();
  const S *Dp = opt_in(in, "D"), *z = opt_in(in, "z"), *bias = opt_in(in, "dt_bias"), *h0 = opt_in(in, "state.h");
  const bool sp = c.p("dt_softplus") != 0;
  std::vector<S> y(B * T * H * E), fin(B * H * E * N);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      const int64_t g = h / (H / G);
      S* st = &fin[(b * H + h) * E * N];
      for (int64_t i = 0; i < E * N; ++i) st[i] = h0 ? h0[(b * H + h) * E * N + i] : S(0.0);
      for (int64_t t = 0; t < T; ++t) {
        const int64_t rt = (b * T + t) * H + h, rg = (b * T + t) * G + g;
        const S pre = dt[rt] + (bias ? bias[h] : S(0.0));
        const S d = sp ? softplus(pre) : pre;
        const S f = exp(d * A[h]);
        for (int64_t e = 0; e < E; ++e) {
          S acc = 0.0;
          for (int64_t n = 0; n < N; ++n) {
            st[e * N + n] = f * st[e * N + n] + d * x[rt * E + e] * Bm[rg * N + n];
            acc += st[e * N + n] * Cm[rg * N + n];
          }
          if (Dp) acc += Dp[h] * x[rt * E + e];
          if (z) {
            const S zz = z[rt * E + e];
            acc = acc * zz / (S(1.0) + exp(-zz));
          }
          y[rt * E + e] = acc;
        }
      }
    }
  append(y, fin);
  return y;
}

}  // namespace linmix::ref

namespace linmix {

namespace {

float softplus1(float x) { return x > 20.0f ? x : std::log1p(std::exp(x)); }

TensorMap mamba2_run(const Call& c, const Tensor* dy) {
  const int64_t B = c.d("B"), T = c.d("T"), H = c.d("H"), E = c.d("E"), G = c.d("G"), N = c.d("N");
  const bool sp = c.p("dt_softplus") != 0;
  const float *A = c.t("A").ptr(), *Dp = c.has("D") ? c.t("D").ptr() : nullptr,
              *bias = c.has("dt_bias") ? c.t("dt_bias").ptr() : nullptr, *Bm = c.t("Bm").ptr(), *Cm = c.t("Cm").ptr(),
              *zz = c.has("z") ? c.t("z").ptr() : nullptr, *dtp = c.t("dt").ptr();
  TensorMap out{{"y", Tensor({B, T, H, E})}, {"state.h", Tensor({B, H, E, N})}};
  if (dy) {
    out["dx"] = Tensor({B, T, H, E}), out["ddt"] = Tensor({B, T, H}), out["dA"] = Tensor({H});
    out["dBm"] = Tensor({B, T, G, N}), out["dCm"] = Tensor({B, T, G, N});
    if (Dp) out["dD"] = Tensor({H});
    if (zz) out["dz"] = Tensor({B, T, H, E});
    if (bias) out["ddt_bias"] = Tensor({H});
    if (c.has("state.h")) out["dstate.h"] = Tensor({B, H, E, N});
  }
  // output pointers taken once (a map lookup per token cost more than the chunked kernel)
  auto ptr = [&](const char* n) { return out.count(n) ? out[n].ptr() : nullptr; };
  float *py = ptr("y"), *phs = ptr("state.h"), *pdx = ptr("dx"), *pdz = ptr("dz"), *pddt = ptr("ddt"),
        *pdh = ptr("dstate.h"), *pdB = ptr("dBm"), *pdC = ptr("dCm");
  auto row_of = [&](auto* p, int64_t b, int64_t t, int64_t h, int64_t W) { return p + ((b * T + t) * H + h) * W; };
  auto grp = [&](const float* p, int64_t b, int64_t t, int64_t h) { return p + ((b * T + t) * G + h / (H / G)) * N; };
  const float* xp = c.t("x").ptr();
  // y = (y + D x) o silu(z) on rows [t0, t0 + n) of head (b, h) in place
  auto skip_gate = [&](int64_t b, int64_t h, int64_t t0, int64_t n) {
    const float dh = Dp ? Dp[h] : 0.0f;
    if (zz)  // the next chunk's gate rows, strided, fetched while the kernel runs it
      for (int64_t t = t0 + n; t < std::min(T, t0 + 2 * n); ++t)
        for (int64_t e = 0; e < E; e += 16) __builtin_prefetch(row_of(zz, b, t, h, E) + e);
    for (int64_t t = t0; t < t0 + n; ++t) {
      float* yo = row_of(py, b, t, h, E);
      const float* xr = row_of(xp, b, t, h, E);
      if (!zz) {
#pragma omp simd
        for (int64_t e = 0; e < E; ++e) yo[e] += dh * xr[e];
        continue;
      }
      const float* zr = row_of(zz, b, t, h, E);
#pragma omp simd
      for (int64_t e = 0; e < E; ++e) yo[e] = (yo[e] + dh * xr[e]) * zr[e] * sigmoidf(zr[e]);
    }
  };
  auto initial_state = [&](GatedHead& z) {  // key-first: h^T
    z.S0.assign(size_t(N * E), 0.0f);
    if (!c.has("state.h")) return;
    const float* h0 = c.t("state.h").ptr() + (z.b * H + z.h) * E * N;
    for (int64_t e = 0; e < E; ++e)
      for (int64_t n = 0; n < N; ++n) z.S0[n * E + e] = h0[e * N + n];
  };
  auto prep = [&](GatedHead& z) {
    const int64_t b = z.b, h = z.h;
    if (!dy) {  // the forward on the call's rows in place: q = Cm, k = d Bm
      z.k.resize(size_t(T)), z.g.resize(size_t(T));  // d_t and d_t A, one a step
      for (int64_t t = 0; t < T; ++t) {
        const float pre = *row_of(dtp, b, t, h, 1) + (bias ? bias[h] : 0.0f);
        z.k[size_t(t)] = sp ? softplus1(pre) : pre, z.g[size_t(t)] = z.k[size_t(t)] * A[h];
      }
      z.iq = grp(Cm, b, 0, h), z.ik = grp(Bm, b, 0, h), z.iv = row_of(xp, b, 0, h, E), z.ig = z.g.data();
      z.oy = row_of(py, b, 0, h, E);
      z.ld = {G * N, G * N, H * E, 1, H * E};
      z.ld.kscale = z.k.data(), z.ld.g_row = true;
      z.epilogue = [&skip_gate, b, h](int64_t t0, int64_t n) { skip_gate(b, h, t0, n); };  // per chunk
      z.ld.epilogue = &z.epilogue;
      initial_state(z);
      return;
    }
    z.q.resize(size_t(T * N)), z.k.resize(size_t(T * N)), z.g.resize(size_t(T * N));
    rows_into(z.v, c, "x", b, h, E);
    for (int64_t t = 0; t < T; ++t) {
      const float pre = *row_of(dtp, b, t, h, 1) + (bias ? bias[h] : 0.0f);
      const float d = sp ? softplus1(pre) : pre;
      const float *bm = grp(Bm, b, t, h), *cm = grp(Cm, b, t, h);
      for (int64_t n = 0; n < N; ++n) z.q[t * N + n] = cm[n], z.k[t * N + n] = d * bm[n], z.g[t * N + n] = d * A[h];
    }
    initial_state(z);
    if (dy && c.has("dfinal.h")) {  // the final state's gradient, key-first too
      const float* d = c.t("dfinal.h").ptr() + (b * H + h) * E * N;
      z.dST.resize(size_t(N * E));
      for (int64_t e = 0; e < E; ++e)
        for (int64_t n = 0; n < N; ++n) z.dST[n * E + e] = d[e * N + n];
    }
    if (dy && zz) {  // the kernel's dy: through the gate
      z.dy = head_rows(*dy, b, h, T, H, E);
      for (int64_t t = 0; t < T; ++t) {
        const float* zr = row_of(zz, b, t, h, E);
        float* d = &z.dy[t * E];
#pragma omp simd
        for (int64_t e = 0; e < E; ++e) d[e] *= zr[e] * sigmoidf(zr[e]);
      }
    }
  };
  auto post = [&](GatedHead& z) {
    const int64_t b = z.b, h = z.h;
    float* hs = phs + (b * H + h) * E * N;
    for (int64_t e = 0; e < E; ++e)
      for (int64_t n = 0; n < N; ++n) hs[e * N + n] = z.S[n * E + e];
    if (z.oy) return;  // a forward alone: the kernel wrote y, skip and gate included (its epilogue)
    // here with dy: y and the gradients through the skip and the gate
    const std::vector<float> gy = head_rows(*dy, b, h, T, H, E);
    // per row, branch-free inner loops over e (they vectorise: the gate's sigmoid had run scalar,
    // with a division per element, and cost twice the chunked kernel)
    float dD = 0.0f;
    const float dh = Dp ? Dp[h] : 0.0f;
    for (int64_t t = 0; t < T; ++t) {
      float* yo = row_of(py, b, t, h, E);
      const float *xr = &z.v[t * E], *yr = &z.y[t * E];
      if (!zz) {
#pragma omp simd
        for (int64_t e = 0; e < E; ++e) yo[e] = yr[e] + dh * xr[e];
      } else {
        const float *zr = row_of(zz, b, t, h, E), *gr = &gy[t * E];
        float* dzr = row_of(pdz, b, t, h, E);
#pragma omp simd
        for (int64_t e = 0; e < E; ++e) {
          const float y1 = yr[e] + dh * xr[e], zv = zr[e], sg = sigmoidf(zv);
          yo[e] = y1 * zv * sg;
          dzr[e] = gr[e] * y1 * sg * (1.0f + zv * (1.0f - sg));
        }
      }
      float* dx = row_of(pdx, b, t, h, E);
      const float *dy1 = &z.dy[t * E], *dvr = &z.dv[t * E];  // dy through the gate (or dy)
#pragma omp simd reduction(+ : dD)
      for (int64_t e = 0; e < E; ++e) {
        dx[e] = dvr[e] + dh * dy1[e];
        dD += dy1[e] * xr[e];
      }
    }
    float dA = 0.0f, dbias = 0.0f;
    std::vector<float> dBm(size_t(T * N)), dCm(size_t(T * N));
    for (int64_t t = 0; t < T; ++t) {
      const float pre = *row_of(dtp, b, t, h, 1) + (bias ? bias[h] : 0.0f);
      const float d = sp ? softplus1(pre) : pre;
      const float* bm = grp(Bm, b, t, h);
      float dd = 0.0f, dg = 0.0f;
      for (int64_t n = 0; n < N; ++n) {
        dBm[size_t(t * N + n)] = d * z.dk[t * N + n], dCm[size_t(t * N + n)] = z.dq[t * N + n];
        dd += bm[n] * z.dk[t * N + n], dg += z.dg[t * N + n];
      }
      dd += A[h] * dg, dA += d * dg;
      const float dpre = sp ? dd * sigmoidf(pre) : dd;
      *row_of(pddt, b, t, h, 1) = dpre;
      dbias += dpre;
    }
    if (c.has("state.h")) {
      float* dh = pdh + (b * H + h) * E * N;
      for (int64_t e = 0; e < E; ++e)
        for (int64_t n = 0; n < N; ++n) dh[e * N + n] = z.dS0[n * E + e];
    }
#pragma omp critical(mamba2_shared)
    {
      out["dA"].data[size_t(h)] += dA;
      if (Dp) out["dD"].data[size_t(h)] += dD;
      if (bias) out["ddt_bias"].data[size_t(h)] += dbias;
      for (int64_t t = 0; t < T; ++t) {
        float *gb = pdB + ((b * T + t) * G + h / (H / G)) * N, *gc = pdC + ((b * T + t) * G + h / (H / G)) * N;
        for (int64_t n = 0; n < N; ++n) gb[n] += dBm[size_t(t * N + n)], gc[n] += dCm[size_t(t * N + n)];
      }
    }
  };
  gated_heads(c, dy, N, E, false, prep, post);
  return out;
}

MixerSpec make_spec() {
  MixerSpec s;
  s.name = "mamba2";
  s.paper = "Dao & Gu 2024, Transformers are SSMs: Generalized Models and Efficient Algorithms Through Structured State Space Duality";
  s.summary = "Mamba-2 SSD: scalar decay per head, input-dependent B, C shared by groups of heads";
  decay_spec_common(s);
  s.inputs = {{"x", "B,T,H,E"},        {"dt", "B,T,H"},   {"A", "H"}, {"Bm", "B,T,G,N"}, {"Cm", "B,T,G,N"},
              {"D", "H", true},        {"z", "B,T,H,E", true}, {"dt_bias", "H", true}};
  s.params = {{"dt_softplus", 1, true, 0, "1: d = softplus(dt + dt_bias); 0: d = dt + dt_bias"}};
  s.state = {{"h", "B,H,E,N"}};
  s.state_size = "H E N per sequence";
  s.time = "O(T H E N) + O(T chunk H (E + N)), chunk " + std::to_string(kDecayChunk);
  s.own_dims = [](std::map<std::string, int64_t>& d, Scale scale, bool) {
    switch (scale) {  // H = 4 with two groups in the form tests, one group elsewhere; E != N
      case Scale::Test: d["H"] = 4, d["G"] = 2, d["N"] = 3; break;
      case Scale::Grad: d["G"] = 1, d["N"] = 3; break;
      case Scale::Demo: d["G"] = 1, d["N"] = 16; break;
      case Scale::Bench: d["G"] = 1, d["N"] = 64; break;
    }
  };
  s.example_fix = [](TensorMap& in) {  // A = -exp(x), dt_bias = x - 4 (d about 0.02 to 0.2)
    for (float& x : in["A"].data) x = -std::exp(x);
    if (in.count("dt_bias"))
      for (float& x : in["dt_bias"].data) x -= 4.0f;
  };
  s.stress = [](TensorMap& in, bool for_grad) {  // no dt_bias (d about 0.7), A to -exp(3): fast decays
    in.erase("dt_bias");
    Tensor& A = in["A"];
    const auto x = stress_draw(A.data.size(), 8);
    for (size_t i = 0; i < x.size(); ++i) A.data[i] = -std::exp(std::min(2.0f * x[i], for_grad ? 2.0f : 3.5f));
  };
  s.log_decays = {"A"};
  s.check = [](const Call& c) {
    check_flag(c, "dt_softplus");
    LINMIX_CHECK(c.d("H") % c.d("G") == 0, "mamba2: H = " + std::to_string(c.d("H")) + " heads is not a multiple of G = " +
                                               std::to_string(c.d("G")) + " groups");
  };
  s.flops = [](const std::map<std::string, int64_t>& d, bool) {
    return double(d.at("H")) * gated_flops(double(d.at("T")), double(d.at("N")), double(d.at("E")));
  };
  set_reference(s, [](const Call& c, const auto& x) { return ref::mamba2_ref(c, x); });
  s.parallel = [](const Call& c) { return mamba2_run(c, nullptr); };
  s.backward = [](const Call& c, const Tensor& dy) { return mamba2_run(c, &dy); };
  s.stepper = [](const Call& c) {
    const int64_t H = c.d("H"), E = c.d("E"), G = c.d("G"), N = c.d("N");
    const bool sp = c.p("dt_softplus") != 0;
    // S: H key-first states (N,E); kd: d Bm; f: decays; acc: y before D and the gate
    auto buf = std::make_shared<std::vector<float>>(H * N * E + 2 * N, 0.0f);
    const float *x = c.t("x").ptr(), *dt = c.t("dt").ptr(), *A = c.t("A").ptr(), *Bm = c.t("Bm").ptr(),
                *Cm = c.t("Cm").ptr(), *Dp = c.has("D") ? c.t("D").ptr() : nullptr,
                *zz = c.has("z") ? c.t("z").ptr() : nullptr, *bias = c.has("dt_bias") ? c.t("dt_bias").ptr() : nullptr;
    auto step = [=](float* y) {
      float *S = buf->data(), *kd = S + H * N * E, *f = kd + N;
      for (int64_t h = 0; h < H; ++h) {
        const float pre = dt[h] + (bias ? bias[h] : 0.0f);
        const float d = sp ? (pre > 20.0f ? pre : std::log1p(std::exp(pre))) : pre;
        const float fd = exp_fast(d * A[h]);
        const int64_t g = h / (H / G);
        for (int64_t n = 0; n < N; ++n) kd[n] = d * Bm[g * N + n], f[n] = fd;
        gated_step(S + h * N * E, y + h * E, Cm + g * N, kd, x + h * E, f, N, E, false);
        for (int64_t e = 0; e < E; ++e) {
          float v = y[h * E + e] + (Dp ? Dp[h] * x[h * E + e] : 0.0f);
          if (zz) v *= zz[h * E + e] * sigmoidf(zz[h * E + e]);
          y[h * E + e] = v;
        }
      }
    };
    auto save = [=] {  // (1,H,E,N) from the key-first (N,E) states
      Tensor t({1, H, E, N});
      for (int64_t h = 0; h < H; ++h)
        for (int64_t e = 0; e < E; ++e)
          for (int64_t n = 0; n < N; ++n) t.data[size_t((h * E + e) * N + n)] = (*buf)[size_t((h * N + n) * E + e)];
      return TensorMap{{"state.h", std::move(t)}};
    };
    auto load = [=](const TensorMap& m) {
      const Tensor& t = m.at("state.h");
      for (int64_t h = 0; h < H; ++h)
        for (int64_t e = 0; e < E; ++e)
          for (int64_t n = 0; n < N; ++n) (*buf)[size_t((h * N + n) * E + e)] = t.data[size_t((h * E + e) * N + n)];
    };
    return Stepper{step, save, load};
  };
  return s;
}

}  // namespace

MixerSpec mamba2_spec() { return make_spec(); }

}  // namespace linmix
