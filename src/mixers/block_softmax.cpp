// block_softmax — TransNormer's DiagAttention (Qin et al. 2022, "The Devil in Linear
// Transformer", sec. 4.2): softmax attention restricted to non-overlapping blocks.
// reference: the masked softmax of ref_util.h with the block mask; parallel: each block one tile
// (block_forward, block_attention), blocks past kFusedBlock the tiled softmax kernels; recurrent:
// the current block's key/value rows (< block).
#include "../kernels/linear_product.h"
#include "../kernels/transpose.h"
#include "../kernels/value_check.h"
#include "../kernels/vmath.h"
#include "../ref/ref_util.h"
#include "common.h"
#include "row_cache.h"
#include "linmix/kernels.h"

#include <optional>

namespace linmix {

namespace {

// Blocks up to this length run through block_forward and block_attention (one n x n buffer a thread
// in the forward, two in the backward: 512 KiB at 256), longer ones through the tiled kernels of
// softmax.cpp.
constexpr int64_t kFusedBlock = 256;

// A block of n <= kFusedBlock rows is one tile: its scores S = scale Q K^T (n x n a head) are made
// whole, with no running max or rescaled accumulator as in softmax.cpp's tiled kernels. Each
// head's operands are first copied contiguous (Q, K, V, dY and K^T, V^T: ~100 KiB at n 64):
// OpenBLAS's small kernels run a 64^3 product in 6.2 us on contiguous rows, 10.0 on rows of
// stride H D = 512, and an A B^T one in 9.3 (one thread, measured), so every product of S and of
// dP is an A B. Causal, the rows go in panels of kPanel: rows [i0, i1) see keys < i1 only, and
// the products skip the masked corner (5/8 of a 64-row block's work).
constexpr int64_t kPanel = 16;

// A thread's operands and scores for blocks of up to n rows (K, V^T, dS: the backward's only; G:
// the forward's unnormalised rows of y, the backward's rows of dy)
struct BlockScratch {
  std::vector<float> Q, K, Kt, V, Vt, G, S, dS, inv;
  RowCheck<false> check;  // the values of q, k, v the forward saw
  BlockScratch(int64_t n, int64_t D, int64_t E, bool grad)
      : Q(n * D), K(grad ? n * D : 0), Kt(D * n), V(n * E), Vt(grad ? E * n : 0), G(n * E), S(n * n),
        dS(grad ? n * n : 0), inv(n) {}
};

// f(i0, i1, cols) for the row panels of a block of n rows: rows [i0, i1) see keys < cols
template <class F>
void for_panels(int64_t n, bool causal, F f) {
  const int64_t rp = causal ? kPanel : n;
  for (int64_t i0 = 0; i0 < n; i0 += rp) {
    const int64_t i1 = std::min(n, i0 + rp);
    f(i0, i1, causal ? i1 : n);
  }
}

// S rows [i0, i1) = exp(scale q_i K^T - max) over the keys row i sees, 0 up to cols; w.inv[i] = 1 / their sum
void panel_probs(BlockScratch& w, int64_t n, int64_t D, float scale, bool causal, int64_t i0, int64_t i1,
                 int64_t cols) {
  gemm_nn(w.S.data() + i0 * n, w.Q.data() + i0 * D, w.Kt.data(), i1 - i0, cols, D, D, n, n, scale, 0.0f);
  for (int64_t i = i0; i < i1; ++i) {
    float* pr = w.S.data() + i * n;
    const int64_t m = causal ? i + 1 : n;  // the keys row i sees
    w.inv[i] = 1.0f / exp_shift_sum(pr, m, max_of(pr, m, kNegInf));
    std::fill(pr + m, pr + cols, 0.0f);
  }
}

// Forward of one block, every head: per head P = softmax(S) (masked when causal), Y = P V, the
// rows of P V scaled by 1 / sum after the product. q, k, v, y point at the block's first row.
// The values of q, k, v are checked as they are copied (w.check) when check is set.
void block_forward(float* y, const float* q, const float* k, const float* v, int64_t n, int64_t H, int64_t D,
                   int64_t E, float scale, bool causal, bool check, BlockScratch& w) {
  const int64_t HD = H * D, HE = H * E;
  for (int64_t h = 0; h < H; ++h) {
    RowCheck<false>* chk = check ? &w.check : nullptr;
    gather_head(w.Q.data(), q, h, n, H, D, identity_fn, chk), gather_head(w.V.data(), v, h, n, H, E, identity_fn, chk);
    if (chk)
      for (int64_t i = 0; i < n; ++i) chk->add(k + i * HD + h * D, D);
    transpose(w.Kt.data(), n, k + h * D, HD, n, D);
    for_panels(n, causal, [&](int64_t i0, int64_t i1, int64_t cols) {
      panel_probs(w, n, D, scale, causal, i0, i1, cols);
      gemm_nn(w.G.data() + i0 * E, w.S.data() + i0 * n, w.V.data(), i1 - i0, E, cols, n, E, E, 1.0f, 0.0f);
    });
    for (int64_t i = 0; i < n; ++i) {
      const float *__restrict yr = w.G.data() + i * E, iv = w.inv[i];
      float* __restrict out = y + i * HE + h * E;
#pragma omp simd
      for (int64_t e = 0; e < E; ++e) out[e] = yr[e] * iv;
    }
  }
}

// Forward and backward of one block, every head, P made once and kept from the one to the other
// (the tiled kernels' backward remakes it from the log-sum-exp): per head
//   P = softmax(S),  Y = P V;  with dy:
//   dV = P^T dY,  dP = dY V^T,  dS = P (dP - D_t) scale (D_t = dy_t . y_t),  dQ = dS K,  dK = dS^T Q.
// Causal, P and dS are lower triangular: dV and dK go by column panels [j0, j1), from row j0 on.
void block_attention(float* y, float* dq, float* dk, float* dv, const float* q, const float* k, const float* v,
                     const float* dy, int64_t n, int64_t H, int64_t D, int64_t E, float scale, bool causal,
                     BlockScratch& w) {
  const int64_t HD = H * D, HE = H * E;
  float *S = w.S.data(), *dS = w.dS.data();
  for (int64_t h = 0; h < H; ++h) {
    gather_head(w.Q.data(), q, h, n, H, D, identity_fn), gather_head(w.K.data(), k, h, n, H, D, identity_fn);
    gather_head(w.V.data(), v, h, n, H, E, identity_fn), gather_head(w.G.data(), dy, h, n, H, E, identity_fn);
    transpose(w.Kt.data(), n, w.K.data(), D, n, D);
    transpose(w.Vt.data(), n, w.V.data(), E, n, E);
    float *yh = y + h * E, *dvh = dv + h * E, *dqh = dq + h * D, *dkh = dk + h * D;
    for_panels(n, causal, [&](int64_t i0, int64_t i1, int64_t cols) {
      panel_probs(w, n, D, scale, causal, i0, i1, cols);
      for (int64_t i = i0; i < i1; ++i) {  // P normalised
        float* __restrict pr = S + i * n;
        const float iv = w.inv[i];
#pragma omp simd
        for (int64_t j = 0; j < cols; ++j) pr[j] *= iv;
      }
      gemm_nn(yh + i0 * HE, S + i0 * n, w.V.data(), i1 - i0, E, cols, n, E, HE, 1.0f, 0.0f);  // Y = P V
      gemm_nn(dS + i0 * n, w.G.data() + i0 * E, w.Vt.data(), i1 - i0, cols, E, E, n, n, 1.0f, 0.0f);  // dP = dY V^T
      for (int64_t i = i0; i < i1; ++i) {
        const float *__restrict g = w.G.data() + i * E, *__restrict yr = yh + i * HE, *__restrict pr = S + i * n;
        float dt = 0.0f;
#pragma omp simd reduction(+ : dt)
        for (int64_t e = 0; e < E; ++e) dt += g[e] * yr[e];
        float* __restrict dr = dS + i * n;
#pragma omp simd
        for (int64_t j = 0; j < cols; ++j) dr[j] = pr[j] * (dr[j] - dt) * scale;  // d(scale q.k)/dq = scale k
      }
      gemm_nn(dqh + i0 * HD, dS + i0 * n, w.K.data(), i1 - i0, D, cols, n, D, HD, 1.0f, 0.0f);  // dQ = dS K
    });
    // dV = P^T dY, dK = dS^T Q by key panels, from the first row that sees them (P^T and dS^T made
    // first, so that these too were A B products: no faster, measured)
    for_panels(n, causal, [&](int64_t j0, int64_t j1, int64_t) {
      const int64_t r0 = causal ? j0 : 0;
      gemm_tn(dvh + j0 * HE, S + r0 * n + j0, w.G.data() + r0 * E, j1 - j0, E, n - r0, n, E, HE, 1.0f, 0.0f);
      gemm_tn(dkh + j0 * HD, dS + r0 * n + j0, w.Q.data() + r0 * D, j1 - j0, D, n - r0, n, D, HD, 1.0f, 0.0f);
    });
  }
}

MixerSpec block_softmax() {
  MixerSpec s;
  s.name = "block_softmax";
  s.small_params = {{"block", "3"}};
  // past kFusedBlock: the tiled kernels' forward + backward; 37: causal row panels of 16, 16 and 5
  s.more_params = {{{"block", "300"}}, {{"block", "37"}}};
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
  s.kernel_checks_values = true;  // the forward checks q, k, v as it copies them (blocks past kFusedBlock: after each)
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
    Tensor y = Tensor::uninitialized({d.B, d.T, d.H, d.E});  // every block writes all its rows
    const float scale = 1.0f / std::sqrt(float(d.D));
    const bool check = c.unchecked_bad != nullptr;  // the values of q, k, v (Call::unchecked)
    bool bad = false;
#pragma omp parallel reduction(|| : bad)
    {
      std::optional<BlockScratch> w;
      if (blk <= kFusedBlock) w.emplace(blk, d.D, d.E, false);
#pragma omp for collapse(2) schedule(dynamic)
      for (int64_t b = 0; b < d.B; ++b)
        for (int64_t i = 0; i < nblk; ++i) {  // each block is an independent attention problem
          const int64_t t0 = b * d.T + i * blk, n = std::min(blk, d.T - i * blk);
          const float *q = c.t("q").ptr() + t0 * HD, *k = c.t("k").ptr() + t0 * HD, *v = c.t("v").ptr() + t0 * HE;
          if (w) {
            block_forward(y.ptr() + t0 * HE, q, k, v, n, d.H, d.D, d.E, scale, c.causal, check, *w);
          } else {  // longer blocks: the tiled kernel, O(tile) memory
            softmax_forward(y.ptr() + t0 * HE, q, k, v, {1, n, d.H, d.D, d.E}, scale, c.causal, 0);
            // the block's rows (one run of memory each), just read
            if (check) bad = bad || any_nonfinite(q, n * HD) || any_nonfinite(k, n * HD) || any_nonfinite(v, n * HE);
          }
        }
      if (check && w) bad = bad || w->check.bad() != 0;
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
      BlockScratch w(blk, d.D, d.E, true);
#pragma omp for collapse(2) schedule(dynamic)
      for (int64_t b = 0; b < d.B; ++b)
        for (int64_t i = 0; i < nblk; ++i) {  // blocks are independent: forward + backward each
          const int64_t t0 = b * d.T + i * blk, n = std::min(blk, d.T - i * blk);
          block_attention(y.ptr() + t0 * HE, dq.ptr() + t0 * HD, dk.ptr() + t0 * HD, dv.ptr() + t0 * HE,
                          c.t("q").ptr() + t0 * HD, c.t("k").ptr() + t0 * HD, c.t("v").ptr() + t0 * HE,
                          dy.ptr() + t0 * HE, n, d.H, d.D, d.E, scale, c.causal, w);
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
