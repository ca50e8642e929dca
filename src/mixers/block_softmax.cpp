// block_softmax — TransNormer's DiagAttention (Qin et al. 2022, "The Devil in Linear
// Transformer", sec. 4.2): softmax attention restricted to non-overlapping blocks.
// reference: the masked softmax of ref_util.h with the block mask; parallel: the tiled softmax
// kernel on each block; recurrent: the current block's key/value rows (< block).
#include "../kernels/linear_product.h"
#include "../kernels/vmath.h"
#include "../ref/ref_util.h"
#include "common.h"
#include "row_cache.h"
#include "linmix/kernels.h"

namespace linmix {

namespace {

// Blocks up to this length run forward + backward through block_attention (two n x n buffers a
// thread: 512 KiB at 256), longer ones through the tiled kernels of softmax.cpp.
constexpr int64_t kFusedBlock = 256;

// One block of n rows, every head, forward and backward, the block's probabilities made once and
// kept from the one to the other (the tiled kernels' backward remade them from the log-sum-exp;
// the forward alone stays theirs: 2-4% faster than this one's, measured): per head
//   P = softmax(scale Q K^T) (masked when causal),  Y = P V;  with dy:
//   dV = P^T dY,  dP = dY V^T,  dS = P (dP - D_t) scale (D_t = dy_t . y_t),  dQ = dS K,  dK = dS^T Q.
// Every product is a GEMM on the heads' rows in place (row strides H D, H E); q, k, v, y, dy and
// the gradients point at the block's first row. P, dS: the caller's scratch (n x n each).
void block_attention(float* y, float* dq, float* dk, float* dv, const float* q, const float* k, const float* v,
                     const float* dy, int64_t n, int64_t H, int64_t D, int64_t E, float scale, bool causal, float* P,
                     float* dS) {
  const int64_t HD = H * D, HE = H * E;
  for (int64_t h = 0; h < H; ++h) {
    const float *qh = q + h * D, *kh = k + h * D, *vh = v + h * E;
    float* yh = y + h * E;
    gemm_nt(P, qh, kh, n, n, D, HD, HD, n, scale, 0.0f);  // S = scale Q K^T
    for (int64_t i = 0; i < n; ++i) {
      float* pr = P + i * n;
      const int64_t m = causal ? i + 1 : n;  // the keys row i sees
      const float mx = max_of(pr, m, kNegInf);
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < m; ++j) {
        const float e = exp_fast(pr[j] - mx);
        pr[j] = e, sum += e;
      }
      const float inv = 1.0f / sum;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) pr[j] = j < m ? pr[j] * inv : 0.0f;
    }
    gemm_nn(yh, P, vh, n, E, n, n, HE, HE, 1.0f, 0.0f);  // Y = P V
    const float* gh = dy + h * E;
    gemm_tn(dv + h * E, P, gh, n, E, n, n, HE, HE, 1.0f, 0.0f);  // dV = P^T dY
    gemm_nt(dS, gh, vh, n, n, E, HE, HE, n, 1.0f, 0.0f);         // dP = dY V^T
    for (int64_t i = 0; i < n; ++i) {
      const float *g = gh + i * HE, *yr = yh + i * HE, *pr = P + i * n;
      float dt = 0.0f;
#pragma omp simd reduction(+ : dt)
      for (int64_t e = 0; e < E; ++e) dt += g[e] * yr[e];
      float* dr = dS + i * n;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) dr[j] = pr[j] * (dr[j] - dt) * scale;  // d(scale q.k)/dq = scale k
    }
    gemm_nn(dq + h * D, dS, kh, n, D, n, n, HD, HD, 1.0f, 0.0f);  // dQ = dS K
    gemm_tn(dk + h * D, dS, qh, n, D, n, n, HD, HD, 1.0f, 0.0f);  // dK = dS^T Q
  }
}

MixerSpec block_softmax() {
  MixerSpec s;
  s.name = "block_softmax";
  s.small_params = {{"block", "3"}};
  s.more_params = {{{"block", "300"}}};  // past kFusedBlock: the tiled kernels' forward + backward
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
  s.kernel_checks_values = true;  // the forward checks each block's rows of q, k, v after it
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
    const bool check = c.unchecked_bad != nullptr;  // the values of q, k, v (Call::unchecked)
    bool bad = false;
#pragma omp parallel for collapse(2) schedule(dynamic) reduction(|| : bad)
    for (int64_t b = 0; b < d.B; ++b)
      for (int64_t i = 0; i < nblk; ++i) {  // each block is an independent attention problem
        const int64_t t0 = b * d.T + i * blk, n = std::min(blk, d.T - i * blk);
        const float *q = c.t("q").ptr() + t0 * HD, *k = c.t("k").ptr() + t0 * HD, *v = c.t("v").ptr() + t0 * HE;
        softmax_forward(y.ptr() + t0 * HE, q, k, v, {1, n, d.H, d.D, d.E}, scale, c.causal, 0);
        // the block's rows (one run of memory each), just read: in cache
        if (check) bad = bad || any_nonfinite(q, n * HD) || any_nonfinite(k, n * HD) || any_nonfinite(v, n * HE);
      }
    if (bad) c.unchecked_bad->fetch_or(1u);
    return moved_map("y", std::move(y));
  };
  s.backward = [](const Call& c, const Tensor& dy) {
    const AttnDims d = attn_dims(c);
    const int64_t blk = c.ip("block"), nblk = (d.T + blk - 1) / blk, HD = d.H * d.D, HE = d.H * d.E;
    const float scale = 1.0f / std::sqrt(float(d.D));
    if (blk > kFusedBlock) {  // the tiled kernels: O(tile) memory whatever the block
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
    }
    Tensor y = Tensor::uninitialized({d.B, d.T, d.H, d.E}), dq = Tensor::uninitialized({d.B, d.T, d.H, d.D}),
           dk = Tensor::uninitialized({d.B, d.T, d.H, d.D}), dv = Tensor::uninitialized({d.B, d.T, d.H, d.E});
#pragma omp parallel
    {
      std::vector<float> P(size_t(blk * blk)), dS(size_t(blk * blk));
#pragma omp for collapse(2) schedule(dynamic)
      for (int64_t b = 0; b < d.B; ++b)
        for (int64_t i = 0; i < nblk; ++i) {  // blocks are independent: forward + backward each
          const int64_t t0 = b * d.T + i * blk, n = std::min(blk, d.T - i * blk);
          block_attention(y.ptr() + t0 * HE, dq.ptr() + t0 * HD, dk.ptr() + t0 * HD, dv.ptr() + t0 * HE,
                          c.t("q").ptr() + t0 * HD, c.t("k").ptr() + t0 * HD, c.t("v").ptr() + t0 * HE,
                          dy.ptr() + t0 * HE, n, d.H, d.D, d.E, scale, c.causal, P.data(), dS.data());
        }
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
