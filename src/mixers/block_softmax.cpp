// block_softmax — TransNormer's DiagAttention (Qin et al. 2022, "The Devil in Linear
// Transformer", sec. 4.2): softmax attention restricted to non-overlapping blocks.
// reference: the masked softmax of ref_util.h with the block mask; parallel: the tiled softmax
// kernel on each block; recurrent: the current block's key/value rows (< block).
#include "../ref/ref_util.h"
#include "common.h"
#include "row_cache.h"
#include "linmix/kernels.h"

namespace linmix {

namespace {

MixerSpec block_softmax() {
  MixerSpec s;
  s.name = "block_softmax";
  s.small_params = {{"block", "3"}};
  s.bench_params = {{"block", "64"}};
  s.flops = [](const std::map<std::string, int64_t>& d, bool) {  // tiles of the blocks (bench: block 64)
    return double(d.at("H")) * 2 * double(d.at("D") + d.at("E")) * double(d.at("T")) * 64;
  };
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
    return moved_map("y", std::move(y));
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
    return moved_map("y", std::move(y), "dq", std::move(dq), "dk", std::move(dk), "dv", std::move(dv));
  };
  // the current block's rows are the state, in every causal form
  set_row_cache(s, {{{"k", "k"}, {"v", "v"}}, [](const Call& c, int64_t n) { return n % c.ip("block"); }});
  s.stepper = [](const Call& c) {
    const AttnDims d = attn_dims(c);
    const int64_t blk = c.ip("block");
    auto kc = std::make_shared<KVCache>();
    kc->H = d.H, kc->D = d.D, kc->E = d.E, kc->window = 0;
    kc->k.reserve(blk * d.H * d.D), kc->v.reserve(blk * d.H * d.E);
    auto scratch = std::make_shared<std::vector<float>>();
    const float scale = 1.0f / std::sqrt(float(d.D));
    const float *q = c.t("q").ptr(), *k = c.t("k").ptr(), *v = c.t("v").ptr();
    auto step = [=](float* y) {
      softmax_step(y, *kc, q, k, v, scale, *scratch);
      if (kc->len() == blk) kc->k.clear(), kc->v.clear();  // block complete: the next one starts empty
    };
    auto save = [=] {
      const int64_t L = kc->len();
      return TensorMap{{"state.k", state_tensor({1, L, kc->H, kc->D}, kc->k)},
                       {"state.v", state_tensor({1, L, kc->H, kc->E}, kc->v)}};
    };
    auto load = [=](const TensorMap& m) { state_load(kc->k, m, "state.k"), state_load(kc->v, m, "state.v"); };
    return Stepper{step, save, load};
  };
  return s;
}

}  // namespace

MixerSpec block_softmax_spec() { return block_softmax(); }

}  // namespace linmix
