// norm_linear, block_softmax — TransNormer (Qin et al. 2022, "The Devil in Linear
// Transformer"): NormAttention (linear attention without the denominator, its output
// normalised by SRMSNorm; sec. 4.1) and DiagAttention (softmax attention restricted to
// non-overlapping blocks; sec. 4.2).
// norm_linear parallel: phi = elu + 1 per row, the chunked product of
// kernels/linear_product.h without normaliser, then SRMS per head; recurrent: S (D,E) per head.
// block_softmax parallel: the tiled softmax kernel on each block; recurrent: the current
// block's key/value rows (< block).
#include "../kernels/linear_product.h"
#include "../ref/attention_ref.h"
#include "common.h"
#include "linmix/kernels.h"

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

void norm_linear_forward(float* y, const float* q, const float* k, const float* v, const AttnDims& d, float eps,
                         bool causal) {
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
        linear_product(Yh.data(), nullptr, Qf.data(), Kf.data(), Vh.data(), {T, D, E, D, D, E, E, causal});
        scatter_head(y, Yh.data(), row0, T, H, E, [&](int64_t t) { return srms_scale(Yh.data() + t * E, E, eps); });
      }
  }
}

// Backward of norm_linear_forward. Per head the product o = phi(Q) phi(K)^T V (masked) is
// recomputed; SRMS backward: with y = o r, r = (mean(o^2) + eps)^(-1/2),
//   do = r (dy - y (dy . y) / E);
// then the product's backward and phi'(x) = 1 (x > 0) or e^x.
void norm_linear_backward(float* dq, float* dk, float* dv, const float* q, const float* k, const float* v,
                          const float* dy, const AttnDims& d, float eps, bool causal) {
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
        const LinearProductArgs args{T, D, E, D, D, H * E, E, causal};
        linear_product(o.data(), nullptr, Qf.data(), Kf.data(), v + row0 * E, args);
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
        linear_product_backward(dQ.data(), dK.data(), dV.data(), Qf.data(), Kf.data(), v + row0 * E, dO.data(), E,
                                nullptr, args);
        scatter_head_dphi(dq, dQ.data(), q, row0, T, H, D);
        scatter_head_dphi(dk, dK.data(), k, row0, T, H, D);
        for (int64_t t = 0; t < T; ++t) std::copy(&dV[t * E], &dV[t * E] + E, dv + (row0 + t * H) * E);
      }
  }
}

MixerSpec norm_linear() {
  MixerSpec s;
  s.name = "norm_linear";
  s.paper = "Qin et al. 2022, The Devil in Linear Transformer (TransNormer NormAttention)";
  s.summary = "linear attention without denominator, output normalised by SRMSNorm";
  s.inputs = {{"q", "B,T,H,D"}, {"k", "B,T,H,D"}, {"v", "B,T,H,E"}};
  s.params = {{"eps", 1e-6, false, 0.0, "SRMSNorm epsilon"}};
  s.state = {{"S", "B,H,D,E"}};
  s.state_size = "H D E per sequence";
  s.time = "O(T H D E)";
  s.memory = "O(T D) per head + O(chunk^2 + D E)";
  s.y_dims = "B,T,H,E";
  set_reference(s, [](const Call& c, const auto& x) {
    using S = scalar_of<decltype(x)>;
    const AttnDims d = attn_dims(c);
    std::vector<S> y(d.B * d.T * d.H * d.E);
    ref::norm_linear_ref<S>(y.data(), x.at("q").data(), x.at("k").data(), x.at("v").data(), d, S(c.p("eps")),
                            c.causal);
    return y;
  });
  set_qkv_eps_forms(s, norm_linear_forward, norm_linear_backward);
  s.recurrent = [](const Call& c) {
    const AttnDims d = attn_dims(c);
    const int64_t H = d.H, D = d.D, E = d.E;
    Tensor y({d.B, d.T, H, E}), S({d.B, H, D, E});
    if (c.has("state.S")) S = c.t("state.S");
    const float eps = float(c.p("eps"));
    std::vector<float> fx(2 * D);
    for (int64_t b = 0; b < d.B; ++b)
      for (int64_t t = 0; t < d.T; ++t)
        for (int64_t h = 0; h < H; ++h) {
          const int64_t row = (b * d.T + t) * H + h;
          const float *q = c.t("q").ptr() + row * D, *k = c.t("k").ptr() + row * D, *v = c.t("v").ptr() + row * E;
          float* Sh = S.ptr() + (b * H + h) * D * E;
          float* yr = y.ptr() + row * E;
          norm_linear_step(Sh, yr, q, k, v, D, E, eps, fx.data());
        }
    return TensorMap{{"y", std::move(y)}, {"state.S", std::move(S)}};
  };
  s.stepper = [](const Call& c) -> std::function<void(float*)> {
    const AttnDims d = attn_dims(c);
    const int64_t H = d.H, D = d.D, E = d.E;
    auto S = std::make_shared<std::vector<float>>(H * D * E, 0.0f);
    const float eps = float(c.p("eps"));
    const float *q = c.t("q").ptr(), *k = c.t("k").ptr(), *v = c.t("v").ptr();
    auto fx = std::make_shared<std::vector<float>>(2 * D * H);
    return [=](float* y) {
      // heads in parallel when the state is large (each core streams its heads through its L2)
#pragma omp parallel for schedule(static) if (H * D * E >= (1 << 15))
      for (int64_t h = 0; h < H; ++h)
        norm_linear_step(S->data() + h * D * E, y + h * E, q + h * D, k + h * D, v + h * E, D, E, eps,
                         fx->data() + 2 * D * h);
    };
  };
  return s;
}

MixerSpec block_softmax() {
  MixerSpec s;
  s.name = "block_softmax";
  s.paper = "Qin et al. 2022, The Devil in Linear Transformer (TransNormer DiagAttention)";
  s.summary = "softmax attention inside non-overlapping blocks (scale 1/sqrt(D))";
  s.inputs = {{"q", "B,T,H,D"}, {"k", "B,T,H,D"}, {"v", "B,T,H,E"}};
  s.params = {{"block", 64, true, 1, "block length"}};
  s.example_params = {{"block", "16"}};
  s.state = {{"k", "B,L,H,D"}, {"v", "B,L,H,E"}};
  s.state_size = "the current block's rows: < block (H D + H E) per sequence";
  s.time = "O(T block H D)";
  s.memory = "O(block) (tiled)";
  s.check = [](const Call& c) {
    if (c.has("state.k"))
      LINMIX_CHECK(c.d("L") < c.ip("block"), "tensor 'state.k': holds at most block-1 = " +
                                                 std::to_string(c.ip("block") - 1) + " rows, found " +
                                                 std::to_string(c.d("L")));
  };
  s.y_dims = "B,T,H,E";
  set_reference(s, [](const Call& c, const auto& x) {
    using S = scalar_of<decltype(x)>;
    const AttnDims d = attn_dims(c);
    std::vector<S> y(d.B * d.T * d.H * d.E);
    ref::softmax_ref<S>(y.data(), x.at("q").data(), x.at("k").data(), x.at("v").data(), d,
                        S(1.0 / std::sqrt(double(d.D))), c.causal, 0, c.ip("block"));
    return y;
  });
  s.parallel = [](const Call& c) {
    const AttnDims d = attn_dims(c);
    const int64_t blk = c.ip("block"), nblk = (d.T + blk - 1) / blk, HD = d.H * d.D, HE = d.H * d.E;
    Tensor y({d.B, d.T, d.H, d.E});
    const float scale = 1.0f / std::sqrt(float(d.D));
#pragma omp parallel for collapse(2) schedule(dynamic)
    for (int64_t b = 0; b < d.B; ++b)
      for (int64_t i = 0; i < nblk; ++i) {  // each block is an independent attention problem
        const int64_t t0 = b * d.T + i * blk, n = std::min(blk, d.T - i * blk);
        softmax_forward(y.ptr() + t0 * HE, c.t("q").ptr() + t0 * HD, c.t("k").ptr() + t0 * HD,
                        c.t("v").ptr() + t0 * HE, {1, n, d.H, d.D, d.E}, scale, c.causal, 0);
      }
    return TensorMap{{"y", std::move(y)}};
  };
  s.backward = [](const Call& c, const Tensor& dy) {
    const AttnDims d = attn_dims(c);
    const int64_t blk = c.ip("block"), nblk = (d.T + blk - 1) / blk, HD = d.H * d.D, HE = d.H * d.E;
    const float scale = 1.0f / std::sqrt(float(d.D));
    Tensor y({d.B, d.T, d.H, d.E}), dq({d.B, d.T, d.H, d.D}), dk({d.B, d.T, d.H, d.D}), dv({d.B, d.T, d.H, d.E});
#pragma omp parallel for collapse(2) schedule(dynamic)
    for (int64_t b = 0; b < d.B; ++b)
      for (int64_t i = 0; i < nblk; ++i) {  // blocks are independent: forward + backward each
        const int64_t t0 = b * d.T + i * blk, n = std::min(blk, d.T - i * blk);
        const AttnDims bd{1, n, d.H, d.D, d.E};
        std::vector<float> lse(d.H * n);
        softmax_forward(y.ptr() + t0 * HE, c.t("q").ptr() + t0 * HD, c.t("k").ptr() + t0 * HD,
                        c.t("v").ptr() + t0 * HE, bd, scale, c.causal, 0, lse.data());
        softmax_backward(dq.ptr() + t0 * HD, dk.ptr() + t0 * HD, dv.ptr() + t0 * HE, c.t("q").ptr() + t0 * HD,
                         c.t("k").ptr() + t0 * HD, c.t("v").ptr() + t0 * HE, y.ptr() + t0 * HE, lse.data(),
                         dy.ptr() + t0 * HE, bd, scale, c.causal, 0);
      }
    return TensorMap{{"y", std::move(y)}, {"dq", std::move(dq)}, {"dk", std::move(dk)}, {"dv", std::move(dv)}};
  };
  s.recurrent = [](const Call& c) {
    const AttnDims d = attn_dims(c);
    const int64_t blk = c.ip("block"), HD = d.H * d.D, HE = d.H * d.E;
    const int64_t L0 = c.has("state.k") ? c.d("L") : 0;
    const float scale = 1.0f / std::sqrt(float(d.D));
    Tensor y({d.B, d.T, d.H, d.E});
    std::vector<KVCache> caches(d.B);
    std::vector<float> scratch;
    for (int64_t b = 0; b < d.B; ++b) {
      KVCache& kc = caches[b];
      kc.H = d.H, kc.D = d.D, kc.E = d.E, kc.window = 0;
      if (L0) {
        kc.k.assign(c.t("state.k").ptr() + b * L0 * HD, c.t("state.k").ptr() + (b + 1) * L0 * HD);
        kc.v.assign(c.t("state.v").ptr() + b * L0 * HE, c.t("state.v").ptr() + (b + 1) * L0 * HE);
      }
      for (int64_t t = 0; t < d.T; ++t) {
        const int64_t row = b * d.T + t;
        softmax_step(y.ptr() + row * HE, kc, c.t("q").ptr() + row * HD, c.t("k").ptr() + row * HD,
                     c.t("v").ptr() + row * HE, scale, scratch);
        if (kc.len() == blk) kc.k.clear(), kc.v.clear();  // block complete: the next one starts empty
      }
    }
    const int64_t L = caches[0].len();
    Tensor sk({d.B, L, d.H, d.D}), sv({d.B, L, d.H, d.E});
    for (int64_t b = 0; b < d.B; ++b) {
      std::copy(caches[b].k.begin(), caches[b].k.end(), sk.ptr() + b * L * HD);
      std::copy(caches[b].v.begin(), caches[b].v.end(), sv.ptr() + b * L * HE);
    }
    return TensorMap{{"y", std::move(y)}, {"state.k", std::move(sk)}, {"state.v", std::move(sv)}};
  };
  return s;
}

}  // namespace

MixerSpec norm_linear_spec() { return norm_linear(); }
MixerSpec block_softmax_spec() { return block_softmax(); }

}  // namespace linmix
