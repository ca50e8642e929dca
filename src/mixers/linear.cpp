// linear — linear attention, "Transformers are RNNs" (Katharopoulos et al. 2020), phi = elu+1.
// parallel: phi applied once per row, then, non-causal, the product of kernels/linear_product.h
// (S = sum phi(k) v^T, z = sum phi(k) over every position: two GEMMs; paper eq. 5-6); the causal
// form and its backward run on the gated chunked kernels with no decay (linear_forms.h;
// linear_causal_run below; paper eq. 10-12 chunked as in flash-linear-attention).
// recurrent: S, z per head, one token at a time (paper eq. 18-20). The causal form starts
// from a given state (S0, z0) and returns the final one in every mode (state_all_modes).
#include "../ref/ref_util.h"
#include "../kernels/linear_product.h"
#include "common.h"
#include "linear_forms.h"
#include "linmix/kernels.h"

namespace linmix::ref {

// ---- linear: the float64 reference (the literal formula, templated for the tape) ----
// y_t = (sum_s A_ts v_s + phi(q_t)^T S0) / (sum_s A_ts + phi(q_t) . z0 + eps),
// A_ts = phi(q_t) . phi(k_s), s <= t when causal; S0, z0: the state before token 0 (causal, null
// = zeros). (Equal to phi(q_t)^T S_t / (phi(q_t) . z_t + eps) of MIXERS.md by linearity.) ST, zT
// (null = not wanted): the final state S0 + sum_s phi(k_s) v_s^T, z0 + sum_s phi(k_s).
template <class S>
void linear_ref(S* y, const S* q, const S* k, const S* v, const AttnDims& d, S eps, bool causal, const S* S0 = nullptr,
                const S* z0 = nullptr, S* ST = nullptr, S* zT = nullptr) {
  const int64_t T = d.T, H = d.H, D = d.D, E = d.E;
  std::vector<S> A(static_cast<size_t>(T * T));
  for (int64_t b = 0; b < d.B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      const int64_t bh = b * H + h;
      phi_kernel_matrix(A.data(), q, k, d, b, h, causal);
      for (int64_t t = 0; t < T; ++t) {
        const S* qt = q + ((b * T + t) * H + h) * D;
        S den = 0;
        for (int64_t s = 0; s < T; ++s) den += A[t * T + s];
        if (z0)
          for (int64_t x = 0; x < D; ++x) den += phi_elu_ref(qt[x]) * z0[bh * D + x];
        for (int64_t e = 0; e < E; ++e) {
          S num = 0;
          for (int64_t s = 0; s < T; ++s) num += A[t * T + s] * v[((b * T + s) * H + h) * E + e];
          if (S0)
            for (int64_t x = 0; x < D; ++x) num += phi_elu_ref(qt[x]) * S0[(bh * D + x) * E + e];
          y[((b * T + t) * H + h) * E + e] = num / (den + eps);
        }
      }
      for (int64_t x = 0; x < D; ++x) {
        if (zT) {
          S z = z0 ? z0[bh * D + x] : S(0);
          for (int64_t s = 0; s < T; ++s) z += phi_elu_ref(k[((b * T + s) * H + h) * D + x]);
          zT[bh * D + x] = z;
        }
        if (ST)
          for (int64_t e = 0; e < E; ++e) {
            S acc = S0 ? S0[(bh * D + x) * E + e] : S(0);
            for (int64_t s = 0; s < T; ++s)
              acc += phi_elu_ref(k[((b * T + s) * H + h) * D + x]) * v[((b * T + s) * H + h) * E + e];
            ST[(bh * D + x) * E + e] = acc;
          }
      }
    }
}

}  // namespace linmix::ref

namespace linmix {


void linear_forward(float* y, const float* q, const float* k, const float* v, const AttnDims& d, float eps) {
  const int64_t B = d.B, T = d.T, H = d.H, D = d.D, E = d.E;
#pragma omp parallel
  {
    // Qf, Kf: (T,D) phi-mapped rows of one head; Vh, Yh: (T,E) its values and outputs, all
    // contiguous (the products then run on contiguous operands); den: (T).
    std::vector<float> Qf(T * D), Kf(T * D), Vh(T * E), Yh(T * E), den(T);
#pragma omp for collapse(2) schedule(dynamic)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < H; ++h) {
        const int64_t row0 = b * T * H + h;
        gather_head(Qf.data(), q, row0, T, H, D, phi_fn);
        gather_head(Kf.data(), k, row0, T, H, D, phi_fn);
        gather_head(Vh.data(), v, row0, T, H, E, identity_fn);
        linear_product(Yh.data(), den.data(), Qf.data(), Kf.data(), Vh.data(), {T, D, E, D, D, E, E});
        // y_t = phi(q_t)^T S / (phi(q_t) . z + eps)
        scatter_head(y, Yh.data(), row0, T, H, E, [&](int64_t t) { return 1.0f / (den[t] + eps); });
      }
  }
}

// Backward of linear_forward. Per head: phi rows and the forward product are recomputed,
// then with r_t = 1 / (den_t + eps):  dnum_t = dy_t r_t,  dden_t = -(dy_t . y_t) r_t,
// the product's backward (kernels/linear_product.h) and phi'(x) = 1 (x > 0) or e^x. dq, dk:
// (B,T,H,D); dv: (B,T,H,E), written. Extra memory O(T (D + E)) per thread.
void linear_backward(float* dq, float* dk, float* dv, const float* q, const float* k, const float* v,
                     const float* dy, const AttnDims& d, float eps) {
  const int64_t B = d.B, T = d.T, H = d.H, D = d.D, E = d.E;
#pragma omp parallel
  {
    std::vector<float> Qf(T * D), Kf(T * D), Vh(T * E), G(T * E), num(T * E), den(T), dnum(T * E), dden(T),
        dQ(T * D), dK(T * D), dV(T * E);
#pragma omp for collapse(2) schedule(dynamic)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < H; ++h) {
        const int64_t row0 = b * T * H + h;
        gather_head(Qf.data(), q, row0, T, H, D, phi_fn);
        gather_head(Kf.data(), k, row0, T, H, D, phi_fn);
        gather_head(Vh.data(), v, row0, T, H, E, identity_fn);
        gather_head(G.data(), dy, row0, T, H, E, identity_fn);
        const LinearProductArgs args{T, D, E, D, D, E, E};
        linear_product(num.data(), den.data(), Qf.data(), Kf.data(), Vh.data(), args);
        for (int64_t t = 0; t < T; ++t) {
          const float r = 1.0f / (den[t] + eps);
          const float* g = &G[t * E];
          float gy = 0.0f;
#pragma omp simd reduction(+ : gy)
          for (int64_t e = 0; e < E; ++e) gy += g[e] * num[t * E + e] * r, dnum[t * E + e] = g[e] * r;
          dden[t] = -gy * r;
        }
        linear_product_backward(dQ.data(), dK.data(), dV.data(), Qf.data(), Kf.data(), Vh.data(), dnum.data(), E,
                                dden.data(), args);
        scatter_head_dphi(dq, dQ.data(), q, row0, T, H, D);
        scatter_head_dphi(dk, dK.data(), k, row0, T, H, D);
        scatter_head(dv, dV.data(), row0, T, H, E, [](int64_t) { return 1.0f; });
      }
  }
}

void linear_step(float* y, LinearState& st, const float* q, const float* k, const float* v, float eps,
                 std::vector<float>& scratch) {
  const int64_t H = st.H, D = st.D, E = st.E;
  scratch.resize(static_cast<size_t>(2 * D * H));
  // heads in parallel when the state is large (kStepParallelFloats): each core streams its
  // heads' state through its own L2
#pragma omp parallel for schedule(static) if (H * D * E >= kStepParallelFloats)
  for (int64_t h = 0; h < H; ++h) {
    float *kx = scratch.data() + 2 * D * h, *qx = kx + D;
    float* z = &st.z[h * D];
    float den = 0.0f;
    for (int64_t x = 0; x < D; ++x) {  // z += phi(k); den = phi(q) . z
      kx[x] = phi_elu(k[h * D + x]), qx[x] = phi_elu(q[h * D + x]);
      z[x] += kx[x];
    }
    for (int64_t x = 0; x < D; ++x) den += qx[x] * z[x];
    float* yr = y + h * E;
    state_step(&st.S[h * D * E], yr, kx, qx, v + h * E, 1.0f, D, E);  // S += phi(k) v^T; y = phi(q)^T S
    const float inv = 1.0f / (den + eps);
    for (int64_t e = 0; e < E; ++e) yr[e] *= inv;
  }
}

namespace {

// The causal parallel form and its backward on the gated chunked kernels with no decay
// (linear_forms.h): the kernel makes num_t = sum_{s<=t} (phi(q_t) . phi(k_s)) v_s + phi(q_t)^T S0
// and carries S; the normaliser den_t = phi(q_t) . Z_t, Z_t = z0 + sum_{s<=t} phi(k_s), is the
// chunk's epilogue's, while the rows are in cache: Z as the chunk start's sum plus a running sum
// within the chunk (the rounding of the chunked product's z), y_t = num_t r_t with
// r_t = 1 / (den_t + eps), and with dy the kernel's dy, dnum_t = dy_t r_t, and
// dden_t = -(dy_t . num_t) r_t^2. The backward adds the normaliser's part to the kernel's
// gradients of phi(q), phi(k): dphi(q)_t += dden_t Z_t, dphi(k)_s += sum_{t>=s} dden_t phi(q_t)
// + dfinal.z, dz0 = dfinal.z + sum_t dden_t phi(q_t). (Against the chunked product of
// kernels/linear_product.h, T = 4096, H 8, D = E = 64, 2 threads, the two binaries alternated 3
// times: fwd 8.9-9.4 -> 8.4-9.2 ms, fwd+bwd 49-51 -> 28-31 ms.)
TensorMap linear_causal_run(const Call& c, const Tensor* dy) {
  const int64_t B = c.d("B"), T = c.d("T"), H = c.d("H"), D = c.d("D"), E = c.d("E");
  const float eps = float(c.p("eps"));
  TensorMap out = phi_outputs(c, dy);
  out.emplace("state.z", Tensor({B, H, D}));
  const bool with_s0 = c.has("state.S");
  if (dy && with_s0) out.emplace("dstate.z", Tensor({B, H, D}));
  // A head's normaliser: Z at the chunk start (z0 first), the chunk's running sum, dden; with dy
  // Zc, Z at every chunk's start, and R, the backward's running sum for dphi(k) (below).
  struct Norm {
    std::vector<float> Z, run, dden, Zc, R;
  };
  std::vector<Norm> norms(size_t(B * H));
  auto epilogue = [&](const PhiHead& p) {
    Norm& nm = norms[size_t(p.bh)];
    nm.Z = head_state(c, "z", p.bh, D), nm.run.assign(size_t(D), 0.0f);
    if (p.gy) nm.dden.resize(size_t(T)), nm.Zc.resize(size_t(decay_chunks(T) * D));
    return [=, &nm](int64_t t0, int64_t n, const float* qc, const float* kc) {
      float *Z = nm.Z.data(), *run = nm.run.data();
      if (p.gy) std::copy(Z, Z + D, nm.Zc.begin() + t0 / kDecayChunk * D);
      std::fill(run, run + D, 0.0f);
      // the kernel's phi rows of the chunk (D apart); without them (the backward's replay of a
      // kept forward) the backward's own phi rows (H D apart)
      const int64_t ld = qc ? D : H * D;
      if (!qc) qc = p.qf + (p.r0 + t0 * H) * D, kc = p.kf + (p.r0 + t0 * H) * D;
      for (int64_t t = t0; t < t0 + n; ++t) {
        const float *qr = qc + (t - t0) * ld, *kr = kc + (t - t0) * ld;
        float den = 0.0f;
#pragma omp simd reduction(+ : den)
        for (int64_t x = 0; x < D; ++x) run[x] += kr[x], den += qr[x] * (Z[x] + run[x]);
        const float r = 1.0f / (den + eps);
        float* yr = p.y + (p.r0 + t * H) * E;
        if (p.gy) {
          const float* g = p.gy + t * H * E;
          float* dn = p.kdy + t * E;
          float gn = 0.0f;
#pragma omp simd reduction(+ : gn)
          for (int64_t e = 0; e < E; ++e) gn += g[e] * yr[e], dn[e] = g[e] * r;
          nm.dden[size_t(t)] = -gn * r * r;
        }
#pragma omp simd
        for (int64_t e = 0; e < E; ++e) yr[e] *= r;
      }
      for (int64_t x = 0; x < D; ++x) Z[x] += run[x];
    };
  };
  const float* dzT = c.has("dfinal.z") ? c.t("dfinal.z").ptr() : nullptr;
  // The normaliser's terms on a chunk's gradients of phi(q), phi(k) (rows t0 + t), last chunk first:
  //   dphi(q)_t += dden_t Z_t,  Z_t = the chunk's starting Z + its phi(k) rows up to t;
  //   dphi(k)_s += R_s = dfinal.z + sum_{t >= s} dden_t phi(q_t), R running backwards.
  auto chunk_terms = [&](const PhiHead& p) -> GradEpilogue {
    Norm& nm = norms[size_t(p.bh)];
    nm.R.assign(size_t(D), 0.0f);
    if (dzT) std::copy(dzT + p.bh * D, dzT + (p.bh + 1) * D, nm.R.begin());
    return [&nm, D](int64_t t0, int64_t n, const float* qc, const float* kc, float* dqc, float* dkc) {
      const float *dd = nm.dden.data() + t0, *Z0 = nm.Zc.data() + t0 / kDecayChunk * D;
      float *run = nm.run.data(), *R = nm.R.data();
      std::copy(Z0, Z0 + D, run);
      for (int64_t t = 0; t < n; ++t) {
        const float* kr = kc + t * D;
        float* dqr = dqc + t * D;
#pragma omp simd
        for (int64_t x = 0; x < D; ++x) run[x] += kr[x], dqr[x] += dd[t] * run[x];
      }
      for (int64_t t = n - 1; t >= 0; --t) {
        const float* qr = qc + t * D;
        float* dkr = dkc + t * D;
#pragma omp simd
        for (int64_t x = 0; x < D; ++x) R[x] += dd[t] * qr[x], dkr[x] += R[x];
      }
    };
  };
  auto post = [&](const PhiHead& p, GatedHead&) {
    Norm& nm = norms[size_t(p.bh)];
    put_state(out, "state.z", nm.Z, p.bh);  // Z after the last chunk: z0 + sum phi(k)
    if (dy && with_s0) put_state(out, "dstate.z", nm.R, p.bh);  // dz0 = dfinal.z + sum_t dden_t phi(q_t)
  };
  phi_gated_heads(c, dy, out, epilogue, post, chunk_terms);
  return out;
}


MixerSpec make_spec() {
  MixerSpec s;
  s.name = "linear";
  s.more_params = {{{"eps", "0.5"}}};  // an eps that matters (the default 1e-6 hides a wrong use)
  s.blocking = {{"T", kLinearChunk}};
  // the causal form's chunked product (chunked_product_flops; non-causal: fewer)
  s.flops = [](const std::map<std::string, int64_t>& d, bool) {
    const double T = double(d.at("T")), H = double(d.at("H")), D = double(d.at("D")), E = double(d.at("E"));
    return chunked_product_flops(T, H, D, E);
  };
  s.paper = "Katharopoulos et al. 2020, Transformers are RNNs";
  s.summary = "linear attention with phi = elu + 1";
  s.inputs = {{"q", "B,T,H,D"}, {"k", "B,T,H,D"}, {"v", "B,T,H,E"}};
  s.params = {{"eps", 1e-6, false, 0.0, "denominator epsilon"}};
  s.state = {{"S", "B,H,D,E"}, {"z", "B,H,D"}};
  s.state_size = "H D (E + 1) per sequence";
  s.time = "O(T H D E) (+ O(T chunk H D) intra-chunk when causal)";
  s.memory = "O(T D) per head (phi rows) + O(chunk^2 + D E)";
  s.y_dims = "B,T,H,E";
  // the causal form carries the state in every mode: y followed by the final S, z
  s.state_all_modes = true;
  s.state_fix = [](TensorMap& st) {  // z, a sum of phi(k) > 0 over the tokens before: positive
    for (float& x : st["state.z"].data) x = std::abs(x) + 0.5f;
  };
  set_reference(s, [](const Call& c, const auto& x) {
    using S = scalar_of<decltype(x)>;
    const AttnDims d = attn_dims(c);
    const int64_t nS = c.causal ? d.B * d.H * d.D * d.E : 0, nz = c.causal ? d.B * d.H * d.D : 0;
    std::vector<S> y(d.B * d.T * d.H * d.E + nS + nz);
    S* fin = y.data() + d.B * d.T * d.H * d.E;
    ref::linear_ref<S>(y.data(), x.at("q").data(), x.at("k").data(), x.at("v").data(), d, S(c.p("eps")), c.causal,
                       opt_in(x, "state.S"), opt_in(x, "state.z"), c.causal ? fin : nullptr,
                       c.causal ? fin + nS : nullptr);
    return y;
  });
  set_qkv_eps_forms(s, linear_forward, linear_backward);
  set_causal_forms(s, linear_causal_run);  // the causal form on the gated chunked kernels
  s.stepper = [](const Call& c) {
    const AttnDims d = attn_dims(c);
    auto st = std::make_shared<LinearState>(LinearState{d.H, d.D, d.E, std::vector<float>(d.H * d.D * d.E, 0.0f),
                                                        std::vector<float>(d.H * d.D, 0.0f)});
    auto scratch = std::make_shared<std::vector<float>>(d.D);
    const float eps = float(c.p("eps"));
    const float *q = c.t("q").ptr(), *k = c.t("k").ptr(), *v = c.t("v").ptr();
    return Stepper{[st, scratch, eps, q, k, v](float* y) { linear_step(y, *st, q, k, v, eps, *scratch); },
                   [st] {
                     return TensorMap{{"state.S", state_tensor({1, st->H, st->D, st->E}, st->S)},
                                      {"state.z", state_tensor({1, st->H, st->D}, st->z)}};
                   },
                   [st](const TensorMap& m) { state_load(st->S, m, "state.S"), state_load(st->z, m, "state.z"); }};
  };
  return s;
}

}  // namespace

MixerSpec linear_spec() { return make_spec(); }

}  // namespace linmix
