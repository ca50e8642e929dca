// rwkv4 — the RWKV-4 WKV operator (Peng et al. 2023, eq. 14-16), causal only.
//   y_t = (sum_{i<t} e^{-(t-1-i) w + k_i} v_i + e^{u + k_t} v_t) / (same without v_i)
// Numerically stable scan (as the paper's CUDA kernel): the running sums a (numerator) and
// b (denominator) are kept scaled by exp(-p), p the running max exponent, so no exp ever
// sees a positive argument. parallel: the scan over T, vectorised over channels and
// threaded over (batch, channel block); recurrent: the same update one token at a time with
// the state (a, b, p) carried across calls.
#include "../ref/channel_ref.h"
#include "../kernels/vmath.h"
#include "common.h"
#include "linmix/kernels.h"

namespace linmix {

void rwkv4_scan(float* y, float* a, float* bb, float* p, const float* k, const float* v, const float* w,
                const float* u, int64_t T, int64_t C, int64_t stride) {
  for (int64_t t = 0; t < T; ++t) {
    const float* kt = k + t * stride;
    const float* vt = v + t * stride;
    float* yt = y + t * stride;
    for (int64_t c = 0; c < C; ++c) {
      // output: the past (a, b at exponent p) plus the bonus term e^{u + k_t}
      const float ww = u[c] + kt[c];
      float q = std::max(p[c], ww);
      float e1 = exp_fast(p[c] - q), e2 = exp_fast(ww - q);
      yt[c] = (e1 * a[c] + e2 * vt[c]) / (e1 * bb[c] + e2);
      // state: decay the past by e^{-w}, add e^{k_t} v_t
      const float wd = p[c] - w[c];
      q = std::max(wd, kt[c]);
      e1 = exp_fast(wd - q), e2 = exp_fast(kt[c] - q);
      a[c] = e1 * a[c] + e2 * vt[c];
      bb[c] = e1 * bb[c] + e2;
      p[c] = q;
    }
  }
}

namespace {

constexpr float kInitP = -1e38f;  // MIXERS.md: initial p = -1e38
constexpr int64_t kBlock = 64;

MixerSpec make_spec() {
  MixerSpec s;
  s.name = "rwkv4";
  s.paper = "Peng et al. 2023, RWKV: Reinventing RNNs for the Transformer Era";
  s.summary = "RWKV-4 WKV: exponentially decaying (w) attention with a bonus (u) for the current token";
  s.causal_ok = true;
  s.noncausal_ok = false;
  s.inputs = {{"k", "B,T,C"}, {"v", "B,T,C"}, {"w", "C"}, {"u", "C"}};
  s.state = {{"a", "B,C"}, {"b", "B,C"}, {"p", "B,C"}};
  s.state_size = "3 C per sequence";
  s.time = "O(T C)";
  s.memory = "O(C)";
  s.example_fix = [](TensorMap& in) {  // w = exp(time_decay), time_decay ~ N(0,1)
    for (auto& x : in["w"].data) x = std::exp(x);
  };
  s.check = [](const Call& c) {
    const Tensor& w = c.t("w");
    for (int64_t i = 0; i < w.numel(); ++i)
      LINMIX_CHECK(w.data[i] > 0.0f, "tensor 'w': the decay rate must be > 0 (w = exp(time_decay)); w[" +
                                         std::to_string(i) + "] = " + std::to_string(w.data[i]));
  };
  s.y_dims = "B,T,C";
  set_reference(s, [](const Call& c, const auto& x) {
    using S = scalar_of<decltype(x)>;
    const int64_t B = c.d("B"), T = c.d("T"), C = c.d("C");
    std::vector<S> y(B * T * C);
    ref::rwkv4_ref<S>(y.data(), x.at("k").data(), x.at("v").data(), x.at("w").data(), x.at("u").data(), B, T, C);
    return y;
  });
  s.parallel = [](const Call& c) {
    const int64_t B = c.d("B"), T = c.d("T"), C = c.d("C");
    Tensor y({B, T, C});
    const int64_t nblk = (C + kBlock - 1) / kBlock;
#pragma omp parallel for collapse(2) schedule(static)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t blk = 0; blk < nblk; ++blk) {
        const int64_t c0 = blk * kBlock, n = std::min(kBlock, C - c0);
        float a[kBlock] = {}, bb[kBlock] = {}, p[kBlock];
        std::fill(p, p + kBlock, kInitP);
        const int64_t off = b * T * C + c0;
        rwkv4_scan(y.ptr() + off, a, bb, p, c.t("k").ptr() + off, c.t("v").ptr() + off, c.t("w").ptr() + c0,
                   c.t("u").ptr() + c0, T, n, C);
      }
    return TensorMap{{"y", std::move(y)}};
  };
  s.recurrent = [](const Call& c) {
    const int64_t B = c.d("B"), T = c.d("T"), C = c.d("C");
    Tensor y({B, T, C}), a({B, C}), bb({B, C}), p({B, C}, kInitP);
    if (c.has("state.a")) a = c.t("state.a"), bb = c.t("state.b"), p = c.t("state.p");
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < T; ++t) {  // one token at a time: the generation path
        const int64_t off = (b * T + t) * C;
        rwkv4_scan(y.ptr() + off, a.ptr() + b * C, bb.ptr() + b * C, p.ptr() + b * C, c.t("k").ptr() + off,
                   c.t("v").ptr() + off, c.t("w").ptr(), c.t("u").ptr(), 1, C, C);
      }
    return TensorMap{{"y", std::move(y)}, {"state.a", std::move(a)}, {"state.b", std::move(bb)},
                     {"state.p", std::move(p)}};
  };
  return s;
}

}  // namespace

MixerSpec rwkv4_spec() { return make_spec(); }

}  // namespace linmix
