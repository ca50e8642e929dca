// mamba2 — Mamba-2 SSD (Dao & Gu 2024, "Transformers are SSMs"): a scalar decay e^{d_t A_h} per
// head over the state h (E,N), input-dependent B and C shared by the heads of a group.
//   d_t = softplus(dt_t + dt_bias), h_t = e^{d_t A} h_{t-1} + d_t x_t Bm_t^T, y_t = h_t Cm_t + D x_t,
//   y_t *= silu(z_t) when z is given.
// parallel: SSD's block decomposition as the gated chunked kernel with q = Cm, k = d Bm, v = x
// and log decay d A (the key-first state is h^T), on the rows in place; backward:
// gated_backward_heads and the chain rule through d, D and the gate; recurrent: gated_step.
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
  // every tensor but the parameters' gradients (sums over heads) is written whole: left uninitialised
  TensorMap out;
  out.emplace("y", Tensor::uninitialized({B, T, H, E})), out.emplace("state.h", Tensor::uninitialized({B, H, E, N}));
  if (dy) {
    out["dx"] = Tensor::uninitialized({B, T, H, E}), out["ddt"] = Tensor::uninitialized({B, T, H}), out["dA"] = Tensor({H});
    out["dBm"] = Tensor::uninitialized({B, T, G, N}), out["dCm"] = Tensor::uninitialized({B, T, G, N});
    if (Dp) out["dD"] = Tensor({H});
    if (zz) out["dz"] = Tensor::uninitialized({B, T, H, E});
    if (bias) out["ddt_bias"] = Tensor({H});
    if (c.has("state.h")) out["dstate.h"] = Tensor::uninitialized({B, H, E, N});
  }
  // output pointers taken once (a map lookup per token cost more than the chunked kernel)
  auto ptr = [&](const char* n) { return out.count(n) ? out[n].ptr() : nullptr; };
  float *py = ptr("y"), *phs = ptr("state.h"), *pdx = ptr("dx"), *pdz = ptr("dz"), *pddt = ptr("ddt"),
        *pdh = ptr("dstate.h"), *pdB = ptr("dBm"), *pdC = ptr("dCm");
  auto row_of = [&](auto* p, int64_t b, int64_t t, int64_t h, int64_t W) { return p + ((b * T + t) * H + h) * W; };
  auto grp = [&](const float* p, int64_t b, int64_t t, int64_t h) { return p + ((b * T + t) * G + h / (H / G)) * N; };
  const float* xp = c.t("x").ptr();
  // y = (y + D x) o silu(z) on rows [t0, t0 + n) of head (b, h) in place; with bad, z's rows
  // checked as they are read (an inf or NaN sets *bad: GatedHead::self_checked)
  auto skip_gate = [&](int64_t b, int64_t h, int64_t t0, int64_t n, uint32_t* bad) {
    RowCheck<false> chk;
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
      if (bad) chk.add(zr, E);
#pragma omp simd
      for (int64_t e = 0; e < E; ++e) yo[e] = (yo[e] + dh * xr[e]) * zr[e] * sigmoidf(zr[e]);
    }
    if (bad) *bad |= chk.bad();
  };
  // With dy, the same rows' skip and gate and what flows back through them, while the rows are in
  // cache: y1 = y + D x, y = y1 o silu(z), dz, the kernel's dy1 = dy o silu(z) (rows of dy1, (T,E),
  // or dy itself without a gate) and dD (added to).
  auto skip_gate_grad = [&](int64_t b, int64_t h, int64_t t0, int64_t n, float* dy1, float& dD) {
    const float dh = Dp ? Dp[h] : 0.0f;
    float acc = 0.0f;
    for (int64_t t = t0; t < t0 + n; ++t) {
      float* yo = row_of(py, b, t, h, E);
      const float *xr = row_of(xp, b, t, h, E), *gr = row_of(dy->ptr(), b, t, h, E);
      if (!zz) {
#pragma omp simd reduction(+ : acc)
        for (int64_t e = 0; e < E; ++e) yo[e] += dh * xr[e], acc += gr[e] * xr[e];
        continue;
      }
      const float* zr = row_of(zz, b, t, h, E);
      float *dzr = row_of(pdz, b, t, h, E), *d1 = dy1 + t * E;
#pragma omp simd reduction(+ : acc)
      for (int64_t e = 0; e < E; ++e) {
        const float y1 = yo[e] + dh * xr[e], zv = zr[e], sg = sigmoidf(zv), g = gr[e];
        yo[e] = y1 * zv * sg;
        dzr[e] = g * y1 * sg * (1.0f + zv * (1.0f - sg));
        d1[e] = g * zv * sg;
        acc += d1[e] * xr[e];
      }
    }
    dD += acc;
  };
  std::vector<float> dDs(size_t(dy ? B * H : 0));  // dD of each head
  auto initial_state = [&](GatedHead& z) {  // key-first: h^T
    z.S0.assign(size_t(N * E), 0.0f);
    if (!c.has("state.h")) return;
    const float* h0 = c.t("state.h").ptr() + (z.b * H + z.h) * E * N;
    for (int64_t e = 0; e < E; ++e)
      for (int64_t n = 0; n < N; ++n) z.S0[n * E + e] = h0[e * N + n];
  };
  // with dy: each head's dCm, d Bm-gradient and d (the kernel's dq, dk and kscale), summed over
  // the heads of a group by finish
  std::vector<const float*> hq(size_t(dy ? B * H : 0)), hk(hq.size()), hd(hq.size());
  auto prep = [&](GatedHead& z) {  // the kernels on the call's rows in place: q = Cm, k = d Bm (kscale d)
    const int64_t b = z.b, h = z.h;
    z.k.resize(size_t(T)), z.g.resize(size_t(T));  // d_t and d_t A, one a step
    // the forward's unchecked dt and z are checked here and in the epilogue as they are read
    uint32_t* bad = z.unchecked ? &z.bad : nullptr;
    if (bad) z.self_checked = {dtp, zz};
    RowCheck<false> chk;
    for (int64_t t = 0; t < T; ++t) {
      const float raw = *row_of(dtp, b, t, h, 1), pre = raw + (bias ? bias[h] : 0.0f);
      chk.take(std::bit_cast<uint32_t>(raw));
      z.k[size_t(t)] = sp ? softplus1(pre) : pre, z.g[size_t(t)] = z.k[size_t(t)] * A[h];
    }
    if (bad) z.bad |= chk.bad();
    z.iq = grp(Cm, b, 0, h), z.ik = grp(Bm, b, 0, h), z.iv = row_of(xp, b, 0, h, E), z.ig = z.g.data();
    z.oy = row_of(py, b, 0, h, E);
    z.ld = {G * N, G * N, H * E, 1, H * E};
    z.ld.kscale = z.k.data(), z.ld.g_row = true;
    z.ld.vskip = Dp ? Dp[h] : 0.0f;  // dx = the kernel's dv + D dy1, in place
    if (!dy) {
      z.epilogue = [&skip_gate, b, h, bad](int64_t t0, int64_t n, const float*, const float*) { skip_gate(b, h, t0, n, bad); };  // per chunk
    } else {
      z.dy.resize(zz ? size_t(T * E) : 0);  // the kernel's dy through the gate, filled by the epilogue
      float *dy1 = z.dy.data(), &dD = dDs[size_t(b * H + h)];
      dD = 0.0f;
      z.epilogue = [&skip_gate_grad, b, h, dy1, &dD](int64_t t0, int64_t n, const float*, const float*) { skip_gate_grad(b, h, t0, n, dy1, dD); };
    }
    z.ld.epilogue = &z.epilogue;
    initial_state(z);
    if (!dy) return;
    // dCm and the d Bm-gradient per head (summed over the group by finish), dx in place (the
    // skip's D dy1 in it), d(d A) one a step
    z.dq.resize(size_t(T * N)), z.dk.resize(size_t(T * N)), z.dg.resize(size_t(T));
    z.odq = z.dq.data(), z.odk = z.dk.data(), z.odv = row_of(pdx, b, 0, h, E), z.odg = z.dg.data();
    z.od = {N, N, H * E, 1, 0};
    if (c.has("dfinal.h")) {  // the final state's gradient, key-first too
      const float* d = c.t("dfinal.h").ptr() + (b * H + h) * E * N;
      z.dST.resize(size_t(N * E));
      for (int64_t e = 0; e < E; ++e)
        for (int64_t n = 0; n < N; ++n) z.dST[n * E + e] = d[e * N + n];
    }
  };
  auto post = [&](GatedHead& z) {
    const int64_t b = z.b, h = z.h;
    float* hs = phs + (b * H + h) * E * N;
    for (int64_t e = 0; e < E; ++e)
      for (int64_t n = 0; n < N; ++n) hs[e * N + n] = z.S[n * E + e];
    if (!dy) return;  // a forward alone: the kernel wrote y, skip and gate included (its epilogue)
    // d: through k = d Bm (dk is the gradient of the scaled rows) and the log decay d A
    float dA = 0.0f, dbias = 0.0f;
    for (int64_t t = 0; t < T; ++t) {
      const float pre = *row_of(dtp, b, t, h, 1) + (bias ? bias[h] : 0.0f);
      const float d = z.k[size_t(t)], *bm = grp(Bm, b, t, h), *dk = &z.dk[t * N];
      float dd = 0.0f;
#pragma omp simd reduction(+ : dd)
      for (int64_t n = 0; n < N; ++n) dd += bm[n] * dk[n];
      const float dg = z.dg[size_t(t)];
      dd += A[h] * dg, dA += d * dg;
      const float dpre = sp ? dd * sigmoidf(pre) : dd;
      *row_of(pddt, b, t, h, 1) = dpre;
      dbias += dpre;
    }
    if (c.has("state.h")) {
      float* dhp = pdh + (b * H + h) * E * N;
      for (int64_t e = 0; e < E; ++e)
        for (int64_t n = 0; n < N; ++n) dhp[e * N + n] = z.dS0[n * E + e];
    }
    hq[size_t(b * H + h)] = z.dq.data(), hk[size_t(b * H + h)] = z.dk.data(), hd[size_t(b * H + h)] = z.k.data();
#pragma omp critical(mamba2_shared)
    {
      out["dA"].data[size_t(h)] += dA;
      if (Dp) out["dD"].data[size_t(h)] += dDs[size_t(b * H + h)];
      if (bias) out["ddt_bias"].data[size_t(h)] += dbias;
    }
  };
  // dBm, dCm: each row (b, t) of a group the sum over its heads, rows split across the threads
  auto finish = [&](int64_t id, int64_t nth) {
    if (!dy) return;
    const int64_t rows = B * T, r0 = rows * id / nth, r1 = rows * (id + 1) / nth, per = H / G;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / T, t = r % T;
      for (int64_t gi = 0; gi < G; ++gi) {
        float *gb = pdB + (r * G + gi) * N, *gc = pdC + (r * G + gi) * N;
        std::fill(gb, gb + N, 0.0f), std::fill(gc, gc + N, 0.0f);
        for (int64_t h = gi * per; h < (gi + 1) * per; ++h) {
          const size_t bh = size_t(b * H + h);
          const float d = hd[bh][t], *dk = hk[bh] + t * N, *dq = hq[bh] + t * N;
#pragma omp simd
          for (int64_t n = 0; n < N; ++n) gb[n] += d * dk[n], gc[n] += dq[n];
        }
      }
    }
  };
  gated_heads(c, dy, N, E, false, prep, post, finish);
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
  s.kernel_checks_values = true;  // gated_heads checks x, dt and (each group's first head) Bm, Cm as it runs
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
    // S: H key-first states (N,E); then a head's kd: d Bm, f: decays
    auto buf = std::make_shared<std::vector<float>>(H * N * E + H * 2 * N, 0.0f);
    const float *x = c.t("x").ptr(), *dt = c.t("dt").ptr(), *A = c.t("A").ptr(), *Bm = c.t("Bm").ptr(),
                *Cm = c.t("Cm").ptr(), *Dp = c.has("D") ? c.t("D").ptr() : nullptr,
                *zz = c.has("z") ? c.t("z").ptr() : nullptr, *bias = c.has("dt_bias") ? c.t("dt_bias").ptr() : nullptr;
    auto step = [=](float* y) {
      float* S = buf->data();
      step_heads(H, H * N * E, [&](int64_t h) {
        float *kd = S + H * N * E + h * 2 * N, *f = kd + N;
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
      });
    };
    auto save = [=] {  // (1,H,E,N) from the key-first (N,E) states
      Tensor t({1, H, E, N});
      for (int64_t h = 0; h < H; ++h)
        for (int64_t e = 0; e < E; ++e)
          for (int64_t n = 0; n < N; ++n) t.data[size_t((h * E + e) * N + n)] = (*buf)[size_t((h * N + n) * E + e)];
      return moved_map("state.h", std::move(t));
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
