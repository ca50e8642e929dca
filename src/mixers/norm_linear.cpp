// norm_linear — TransNormer's NormAttention (Qin et al. 2022, "The Devil in Linear
// Transformer", sec. 4.1): linear attention without the denominator, its output normalised by
// SRMSNorm. parallel: phi = elu + 1 per row, non-causal the product of kernels/linear_product.h
// without normaliser, then SRMS per head; recurrent: S (D,E) per head. The causal form starts
// from a given S and returns the final one in every mode, as linear's. The causal parallel form
// and its backward run on the gated chunked kernels with no decay (linear_forms.h), the SRMSNorm
// in the chunk's epilogue (norm_linear_causal_run).
#include "../kernels/linear_product.h"
#include "../ref/ref_util.h"
#include "common.h"
#include "linear_forms.h"
#include "linmix/kernels.h"

namespace linmix::ref {

// ---- norm_linear: the float64 reference (the literal formula, templated for the tape) ----
// TransNormer NormAttention: y_t = srms(sum_s A_ts v_s), A_ts = phi(q_t) . phi(k_s)
// (s <= t when causal), srms(x) = x / sqrt(mean(x^2) + eps) over the E values of a head.
template <class S>
void norm_linear_ref(S* y, const S* q, const S* k, const S* v, const AttnDims& d, S eps, bool causal,
                     const S* S0 = nullptr, S* ST = nullptr) {
  // S0: the state before token 0 (causal; null = zeros), o_t += phi(q_t)^T S0; ST (null = not
  // wanted): the final state S0 + sum_s phi(k_s) v_s^T
  const int64_t T = d.T, H = d.H, D = d.D, E = d.E;
  std::vector<S> A(static_cast<size_t>(T * T)), o(static_cast<size_t>(E));
  for (int64_t b = 0; b < d.B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      const int64_t bh = b * H + h;
      phi_kernel_matrix(A.data(), q, k, d, b, h, causal);
      for (int64_t t = 0; t < T; ++t) {
        S ms = 0;
        for (int64_t e = 0; e < E; ++e) {
          S acc = 0;
          for (int64_t s = 0; s < T; ++s) acc += A[t * T + s] * v[((b * T + s) * H + h) * E + e];
          if (S0)
            for (int64_t x = 0; x < D; ++x) acc += phi_elu_ref(q[((b * T + t) * H + h) * D + x]) * S0[(bh * D + x) * E + e];
          o[e] = acc;
          ms += acc * acc;
        }
        const S inv = 1 / sqrt(ms / S(E) + eps);
        for (int64_t e = 0; e < E; ++e) y[((b * T + t) * H + h) * E + e] = o[e] * inv;
      }
      if (ST)
        for (int64_t x = 0; x < D; ++x)
          for (int64_t e = 0; e < E; ++e) {
            S acc = S0 ? S0[(bh * D + x) * E + e] : S(0);
            for (int64_t s = 0; s < T; ++s)
              acc += phi_elu_ref(k[((b * T + s) * H + h) * D + x]) * v[((b * T + s) * H + h) * E + e];
            ST[(bh * D + x) * E + e] = acc;
          }
    }
}

}  // namespace linmix::ref

namespace linmix {

namespace {


float srms_scale(const float* x, int64_t E, float eps) {  // 1 / sqrt(mean(x^2) + eps)
  float ms = 0.0f;
  for (int64_t e = 0; e < E; ++e) ms += x[e] * x[e];
  return 1.0f / std::sqrt(ms / float(E) + eps);
}

void srms(float* x, int64_t E, float eps) {  // x / sqrt(mean(x^2) + eps)
  const float inv = srms_scale(x, E, eps);
  for (int64_t e = 0; e < E; ++e) x[e] *= inv;
}

// One token of one head: S (D,E) += phi(k) v^T; y (E) = srms(phi(q)^T S). fx: 2 D scratch.
void norm_linear_step(float* S, float* y, const float* q, const float* k, const float* v, int64_t D, int64_t E,
                      float eps, float* fx) {
  float *kx = fx, *qx = fx + D;
  for (int64_t x = 0; x < D; ++x) kx[x] = phi_elu(k[x]), qx[x] = phi_elu(q[x]);
  state_step(S, y, kx, qx, v, 1.0f, D, E);
  srms(y, E, eps);
}

void norm_linear_forward(float* y, const float* q, const float* k, const float* v, const AttnDims& d, float eps) {
  const int64_t B = d.B, T = d.T, H = d.H, D = d.D, E = d.E;
#pragma omp parallel
  {
    // (T,D) phi rows of one head, (T,E) its values and outputs: contiguous operands
    std::vector<float> Qf(T * D), Kf(T * D), Vh(T * E), Yh(T * E);
#pragma omp for collapse(2) schedule(dynamic)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < H; ++h) {
        const int64_t row0 = b * T * H + h;
        gather_head(Qf.data(), q, row0, T, H, D, phi_fn);
        gather_head(Kf.data(), k, row0, T, H, D, phi_fn);
        gather_head(Vh.data(), v, row0, T, H, E, identity_fn);
        linear_product(Yh.data(), nullptr, Qf.data(), Kf.data(), Vh.data(), {T, D, E, D, D, E, E});
        scatter_head(y, Yh.data(), row0, T, H, E, [&](int64_t t) { return srms_scale(Yh.data() + t * E, E, eps); });
      }
  }
}

// Backward of norm_linear_forward. Per head the product o = phi(Q) phi(K)^T V is
// recomputed; SRMS backward: with y = o r, r = (mean(o^2) + eps)^(-1/2),
//   do = r (dy - y (dy . y) / E);
// then the product's backward and phi'(x) = 1 (x > 0) or e^x.
void norm_linear_backward(float* dq, float* dk, float* dv, const float* q, const float* k, const float* v,
                          const float* dy, const AttnDims& d, float eps) {
  const int64_t B = d.B, T = d.T, H = d.H, D = d.D, E = d.E;
#pragma omp parallel
  {
    std::vector<float> Qf(T * D), Kf(T * D), o(T * E), dO(T * E), dQ(T * D), dK(T * D), dV(T * E);
#pragma omp for collapse(2) schedule(dynamic)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < H; ++h) {
        const int64_t row0 = b * T * H + h;
        gather_head(Qf.data(), q, row0, T, H, D, phi_fn);
        gather_head(Kf.data(), k, row0, T, H, D, phi_fn);
        const float* vh = v + row0 * E;  // the head's value rows, stride H E
        const LinearProductArgs args{T, D, E, D, D, H * E, E};
        linear_product(o.data(), nullptr, Qf.data(), Kf.data(), vh, args);
        for (int64_t t = 0; t < T; ++t) {
          const float* ot = &o[t * E];
          const float* g = dy + (row0 + t * H) * E;
          float ms = 0.0f;
          for (int64_t e = 0; e < E; ++e) ms += ot[e] * ot[e];
          const float r = 1.0f / std::sqrt(ms / float(E) + eps);
          float gy = 0.0f;
          for (int64_t e = 0; e < E; ++e) gy += g[e] * ot[e] * r;
          for (int64_t e = 0; e < E; ++e) dO[t * E + e] = r * (g[e] - ot[e] * r * gy / float(E));
        }
        linear_product_backward(dQ.data(), dK.data(), dV.data(), Qf.data(), Kf.data(), vh, dO.data(), E, nullptr, args);
        scatter_head_dphi(dq, dQ.data(), q, row0, T, H, D);
        scatter_head_dphi(dk, dK.data(), k, row0, T, H, D);
        for (int64_t t = 0; t < T; ++t) std::copy(&dV[t * E], &dV[t * E] + E, dv + (row0 + t * H) * E);
      }
  }
}

// The causal form on the gated kernels (linear_forms.h): the chunk's epilogue normalises
// o_t = phi(q_t)^T S_t, y_t = o_t r_t with r_t = (mean(o_t^2) + eps)^(-1/2), and with dy makes
// the kernel's dy, do_t = r_t (dy_t - y_t (dy_t . y_t) / E). (Against the chunked product,
// T = 4096, H 8, D = E = 64, 2 threads, the two binaries alternated 3 times: fwd 8.2-8.9 ->
// 8.3-9.2 ms, fwd+bwd 47-51 -> 26.4-26.6 ms.)
TensorMap norm_linear_causal_run(const Call& c, const Tensor* dy) {
  const int64_t H = c.d("H"), E = c.d("E");
  const float eps = float(c.p("eps"));
  TensorMap out = phi_outputs(c, dy);
  auto epilogue = [&](const PhiHead& p) {
    return [=](int64_t t0, int64_t n, const float*, const float*) {
      for (int64_t t = t0; t < t0 + n; ++t) {
        float* yr = p.y + (p.r0 + t * H) * E;
        float ms = 0.0f;
#pragma omp simd reduction(+ : ms)
        for (int64_t e = 0; e < E; ++e) ms += yr[e] * yr[e];
        const float r = 1.0f / std::sqrt(ms / float(E) + eps);
#pragma omp simd
        for (int64_t e = 0; e < E; ++e) yr[e] *= r;
        if (!p.gy) continue;
        const float* g = p.gy + t * H * E;
        float* dn = p.kdy + t * E;
        float gy = 0.0f;
#pragma omp simd reduction(+ : gy)
        for (int64_t e = 0; e < E; ++e) gy += g[e] * yr[e];
        const float f = gy / float(E);
#pragma omp simd
        for (int64_t e = 0; e < E; ++e) dn[e] = r * (g[e] - yr[e] * f);
      }
    };
  };
  phi_gated_heads(c, dy, out, epilogue, [](const PhiHead&, GatedHead&) {});
  return out;
}

MixerSpec norm_linear() {
  MixerSpec s;
  s.name = "norm_linear";
  s.more_params = {{{"eps", "0.5"}}};  // an eps that matters (the default 1e-6 hides a wrong use)
  s.blocking = {{"T", kLinearChunk}};
  // the causal form's chunked product (chunked_product_flops; non-causal: fewer)
  s.flops = [](const std::map<std::string, int64_t>& d, bool) {
    const double T = double(d.at("T")), H = double(d.at("H")), D = double(d.at("D")), E = double(d.at("E"));
    return chunked_product_flops(T, H, D, E);
  };
  s.paper = "Qin et al. 2022, The Devil in Linear Transformer (TransNormer NormAttention)";
  s.summary = "linear attention without denominator, output normalised by SRMSNorm";
  s.inputs = {{"q", "B,T,H,D"}, {"k", "B,T,H,D"}, {"v", "B,T,H,E"}};
  s.params = {{"eps", 1e-6, false, 0.0, "SRMSNorm epsilon"}};
  s.state = {{"S", "B,H,D,E"}};
  s.state_size = "H D E per sequence";
  s.time = "O(T H D E)";
  s.memory = "O(T D) per head + O(chunk^2 + D E)";
  s.y_dims = "B,T,H,E";
  s.state_all_modes = true;  // the causal form carries S in every mode: y followed by the final S
  set_reference(s, [](const Call& c, const auto& x) {
    using S = scalar_of<decltype(x)>;
    const AttnDims d = attn_dims(c);
    const int64_t ny = d.B * d.T * d.H * d.E;
    std::vector<S> y(ny + (c.causal ? d.B * d.H * d.D * d.E : 0));
    ref::norm_linear_ref<S>(y.data(), x.at("q").data(), x.at("k").data(), x.at("v").data(), d, S(c.p("eps")),
                            c.causal, opt_in(x, "state.S"), c.causal ? y.data() + ny : nullptr);
    return y;
  });
  set_qkv_eps_forms(s, norm_linear_forward, norm_linear_backward);
  set_causal_forms(s, norm_linear_causal_run);  // the causal form on the gated chunked kernels
  s.stepper = [](const Call& c) {
    const AttnDims d = attn_dims(c);
    const int64_t H = d.H, D = d.D, E = d.E;
    auto S = std::make_shared<std::vector<float>>(H * D * E, 0.0f);
    auto save = [=] { return TensorMap{{"state.S", state_tensor({1, H, D, E}, *S)}}; };
    auto load = [=](const TensorMap& m) { state_load(*S, m, "state.S"); };
    const float eps = float(c.p("eps"));
    const float *q = c.t("q").ptr(), *k = c.t("k").ptr(), *v = c.t("v").ptr();
    auto fx = std::make_shared<std::vector<float>>(2 * D * H);
    auto step = [=](float* y) {
      // heads in parallel when the state is large (each core streams its heads through its L2)
#pragma omp parallel for schedule(static) if (H * D * E >= kStepParallelFloats)
      for (int64_t h = 0; h < H; ++h)
        norm_linear_step(S->data() + h * D * E, y + h * E, q + h * D, k + h * D, v + h * E, D, E, eps,
                         fx->data() + 2 * D * h);
    };
    return Stepper{step, save, load};
  };
  return s;
}

}  // namespace

MixerSpec norm_linear_spec() { return norm_linear(); }

}  // namespace linmix
