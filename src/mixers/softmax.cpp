// softmax — scaled dot-product attention, the O(T^2) baseline (MIXERS.md "softmax").
// parallel: tiled online softmax (Dao et al. 2022, Algorithm 1): per query tile a running
// row max m, row sum l and unnormalised accumulator, so extra memory is O(tile^2 + T).
// recurrent: a key/value cache (causal only).
#include <cblas.h>

#include <cmath>

#include "kernels/blas.h"
#include "../kernels/linear_product.h"
#include "../ref/ref_util.h"
#include "../kernels/vmath.h"
#include "common.h"
#include "row_cache.h"
#include "linmix/kernels.h"

namespace linmix {

namespace {
constexpr int64_t kTileQ = 64;  // query rows per tile
constexpr int64_t kTileK = 64;  // key rows per tile

// The keys row t may see inside the tile [s0, s0 + nk): j in [lo, hi] (empty when lo > hi);
// the same set as ref::attn_allowed (causal: s <= t; window: |t - s| < window).
inline void allowed_range(int64_t t, int64_t s0, int64_t nk, bool causal, int64_t window, int64_t& lo, int64_t& hi) {
  lo = 0, hi = nk - 1;
  if (causal) hi = std::min(hi, t - s0);
  if (window > 0) lo = std::max(lo, t - window + 1 - s0), hi = std::min(hi, t + window - 1 - s0);
}

// Copies n rows of head h (row stride H * cols) starting at time t0 into a contiguous (n, cols)
// tile, times scale.
inline void load_rows(float* dst, const float* src, int64_t b, int64_t t0, int64_t n, int64_t T, int64_t H,
                      int64_t h, int64_t cols, float scale = 1.0f) {
  for (int64_t i = 0; i < n; ++i) {
    const float* r = src + ((b * T + t0 + i) * H + h) * cols;
#pragma omp simd
    for (int64_t x = 0; x < cols; ++x) dst[i * cols + x] = scale * r[x];
  }
}
}  // namespace

// Every tile product is a GEMM (OpenBLAS, on the calling thread): S = Q K^T, then the online
// softmax update of the rows (SIMD), then acc += P V.
void softmax_forward(float* y, const float* q, const float* k, const float* v, const AttnDims& d,
                     float scale, bool causal, int64_t window, float* lse) {
  const int64_t B = d.B, T = d.T, H = d.H, D = d.D, E = d.E;
#pragma omp parallel
  {
    // Per-thread tiles: Qb (kTileQ,D), Kb (kTileK,D), Vb (kTileK,E), Sb (kTileQ,kTileK) scores
    // then probabilities, acc (kTileQ,E), m and l (kTileQ).
    std::vector<float> Qb(kTileQ * D), Kb(kTileK * D), Vb(kTileK * E), Sb(kTileQ * kTileK), acc(kTileQ * E),
        m(kTileQ), l(kTileQ);
#pragma omp for collapse(2) schedule(dynamic)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < H; ++h) {
        for (int64_t t0 = 0; t0 < T; t0 += kTileQ) {
          const int64_t nq = std::min(kTileQ, T - t0);
          load_rows(Qb.data(), q, b, t0, nq, T, H, h, D, scale);
          std::fill(m.begin(), m.end(), kNegInf);
          std::fill(l.begin(), l.end(), 0.0f);
          std::fill(acc.begin(), acc.end(), 0.0f);
          // Keys any row of this tile may see.
          const int64_t s_begin = window > 0 ? std::max<int64_t>(0, t0 - window + 1) : 0;
          const int64_t s_end = causal ? t0 + nq : (window > 0 ? std::min(T, t0 + nq - 1 + window) : T);
          for (int64_t s0 = s_begin; s0 < s_end; s0 += kTileK) {
            const int64_t nk = std::min(kTileK, s_end - s0);
            load_rows(Kb.data(), k, b, s0, nk, T, H, h, D);
            load_rows(Vb.data(), v, b, s0, nk, T, H, h, E);
            std::fill(Sb.begin(), Sb.end(), 0.0f);
            gemm_nt_acc(Sb.data(), Qb.data(), Kb.data(), nq, nk, D, D, D, kTileK);
            for (int64_t i = 0; i < nq; ++i) {
              float* srow = &Sb[i * kTileK];
              int64_t lo, hi;
              allowed_range(t0 + i, s0, nk, causal, window, lo, hi);
              if (lo > hi) {  // no allowed key in this tile for this row: P row 0, state unchanged
                std::fill(srow, srow + nk, 0.0f);
                continue;
              }
              const float rmax = max_of(srow + lo, hi - lo + 1, kNegInf);
              const float mnew = vmax(m[i], rmax);
              const float corr = exp_fast(m[i] - mnew);  // 0 when m was -inf
              float* ar = &acc[i * E];
              for (int64_t e = 0; e < E; ++e) ar[e] *= corr;
              float lsum = 0.0f;
#pragma omp simd reduction(+ : lsum)
              for (int64_t j = 0; j < nk; ++j) {
                const float p = j >= lo && j <= hi ? exp_fast(srow[j] - mnew) : 0.0f;
                srow[j] = p;
                lsum += p;
              }
              l[i] = l[i] * corr + lsum;
              m[i] = mnew;
            }
            gemm_nn_acc(acc.data(), Sb.data(), Vb.data(), nq, E, nk, kTileK, E, E);  // acc += P V
          }
          for (int64_t i = 0; i < nq; ++i) {
            float* yr = y + ((b * T + t0 + i) * H + h) * E;
            const float inv = 1.0f / l[i];
            for (int64_t e = 0; e < E; ++e) yr[e] = acc[i * E + e] * inv;
            if (lse) lse[(b * H + h) * T + t0 + i] = m[i] + std::log(l[i]);
          }
        }
      }
  }
}

// FlashAttention-2 style backward, per (query tile, key tile), every product a GEMM:
//   P = exp(S - lse) (masked),  dV += P^T dY,  dP = dY V^T,  dS = P (dP - D_t) scale,
//   dQ += dS K,  dK += dS^T q   (S = scale q . k; D_t = dy_t . y_t).
void softmax_backward(float* dq, float* dk, float* dv, const float* q, const float* k, const float* v,
                      const float* y, const float* lse, const float* dy, const AttnDims& d, float scale, bool causal,
                      int64_t window) {
  const int64_t B = d.B, T = d.T, H = d.H, D = d.D, E = d.E;
#pragma omp parallel
  {
    // Per head: dQ (T,D), dK (T,D), dV (T,E) accumulators and Dt (T) = dy_t . y_t; per tile:
    // Qb (kTileQ,D) scaled queries, Qr the same unscaled, G (kTileQ,E) dy rows, Kb (kTileK,D),
    // Vb (kTileK,E), P and dS (kTileQ,kTileK).
    std::vector<float> dQ(T * D), dK(T * D), dV(T * E), Dt(T), Qb(kTileQ * D), Qr(kTileQ * D), G(kTileQ * E),
        Kb(kTileK * D), Vb(kTileK * E), P(kTileQ * kTileK), dS(kTileQ * kTileK);
#pragma omp for collapse(2) schedule(dynamic)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < H; ++h) {
        auto row = [&](int64_t t) { return (b * T + t) * H + h; };
        std::fill(dQ.begin(), dQ.end(), 0.0f);
        std::fill(dK.begin(), dK.end(), 0.0f);
        std::fill(dV.begin(), dV.end(), 0.0f);
        for (int64_t t = 0; t < T; ++t) {
          float s = 0.0f;
          const float *g = dy + row(t) * E, *yr = y + row(t) * E;
#pragma omp simd reduction(+ : s)
          for (int64_t e = 0; e < E; ++e) s += g[e] * yr[e];
          Dt[t] = s;
        }
        const float* L = lse + (b * H + h) * T;
        for (int64_t t0 = 0; t0 < T; t0 += kTileQ) {
          const int64_t nq = std::min(kTileQ, T - t0);
          load_rows(Qr.data(), q, b, t0, nq, T, H, h, D);
          load_rows(Qb.data(), q, b, t0, nq, T, H, h, D, scale);
          load_rows(G.data(), dy, b, t0, nq, T, H, h, E);
          const int64_t s_begin = window > 0 ? std::max<int64_t>(0, t0 - window + 1) : 0;
          const int64_t s_end = causal ? t0 + nq : (window > 0 ? std::min(T, t0 + nq - 1 + window) : T);
          for (int64_t s0 = s_begin; s0 < s_end; s0 += kTileK) {
            const int64_t nk = std::min(kTileK, s_end - s0);
            load_rows(Kb.data(), k, b, s0, nk, T, H, h, D);
            load_rows(Vb.data(), v, b, s0, nk, T, H, h, E);
            std::fill(P.begin(), P.end(), 0.0f);
            std::fill(dS.begin(), dS.end(), 0.0f);
            gemm_nt_acc(P.data(), Qb.data(), Kb.data(), nq, nk, D, D, D, kTileK);   // S
            gemm_nt_acc(dS.data(), G.data(), Vb.data(), nq, nk, E, E, E, kTileK);   // dP
            for (int64_t i = 0; i < nq; ++i) {
              const int64_t t = t0 + i;
              int64_t lo, hi;
              allowed_range(t, s0, nk, causal, window, lo, hi);
              float *pr = &P[i * kTileK], *dr = &dS[i * kTileK];
              const float lt = L[t], dt = Dt[t];
#pragma omp simd
              for (int64_t j = 0; j < nk; ++j) {
                const float p = j >= lo && j <= hi ? exp_fast(pr[j] - lt) : 0.0f;  // from the saved lse
                pr[j] = p;
                dr[j] = p * (dr[j] - dt) * scale;  // d(scale q.k)/dq = scale k
              }
            }
            gemm_tn_acc(&dV[s0 * E], P.data(), G.data(), nk, E, nq, kTileK, E, E);    // dV += P^T dY
            gemm_nn_acc(&dQ[t0 * D], dS.data(), Kb.data(), nq, D, nk, kTileK, D, D);  // dQ += dS K
            gemm_tn_acc(&dK[s0 * D], dS.data(), Qr.data(), nk, D, nq, kTileK, D, D);  // dK += dS^T q
          }
        }
        for (int64_t t = 0; t < T; ++t) {
          std::copy(&dQ[t * D], &dQ[t * D] + D, dq + row(t) * D);
          std::copy(&dK[t * D], &dK[t * D] + D, dk + row(t) * D);
          std::copy(&dV[t * E], &dV[t * E] + E, dv + row(t) * E);
        }
      }
  }
}

void softmax_step(float* y, KVCache& c, const float* q, const float* k, const float* v, float scale,
                  std::vector<float>& scratch) {
  const int64_t H = c.H, D = c.D, E = c.E;
  c.k.insert(c.k.end(), k, k + H * D);
  c.v.insert(c.v.end(), v, v + H * E);
  const int64_t L = c.len();
  const int64_t first = c.window > 0 ? std::max<int64_t>(0, L - c.window) : 0;  // t - s < window
  const int64_t n = L - first;
  scratch.resize(static_cast<size_t>(H * n));  // each head's scores
  const float *K0 = c.k.data() + first * H * D, *V0 = c.v.data() + first * H * E;
  // Per head the scores K q and y = V^T p over the cached rows (row stride H D, H E) in plain
  // loops: OpenBLAS's sgemv, two calls a head, woke its thread pool for each (2 threads: 21 us a
  // token at the benchmark's size, 12.8 on one). Heads over the threads once the cache is big
  // enough (kStepParallelFloats), as the other steps' states.
#pragma omp parallel for schedule(static) if (H > 1 && n * H * (D + E) >= kStepParallelFloats)
  for (int64_t h = 0; h < H; ++h) {
    float* __restrict sc = scratch.data() + h * n;
    const float* __restrict qh = q + h * D;
    dot_rows(sc, K0 + h * D, n, H * D, qh, D, scale);  // the scores, four rows at a time
    const float mx = max_of(sc, n, kNegInf);
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t s = 0; s < n; ++s) {
      sc[s] = exp_fast(sc[s] - mx);
      sum += sc[s];
    }
    float* __restrict yr = y + h * E;
    int64_t e0 = 0;
    for (; e0 + 64 <= E; e0 += 64) {  // y in registers, 64 columns at a time (in memory: a load
      f32x16 a0 = {}, a1 = {}, a2 = {}, a3 = {};  // and a store of y a row, ~2/3 of the step)
      for (int64_t s = 0; s < n; ++s) {
        const float* vr = V0 + (s * H + h) * E + e0;
        const float p = sc[s];
        a0 += p * load16(vr), a1 += p * load16(vr + 16), a2 += p * load16(vr + 32), a3 += p * load16(vr + 48);
      }
      store16(yr + e0, a0), store16(yr + e0 + 16, a1), store16(yr + e0 + 32, a2), store16(yr + e0 + 48, a3);
    }
    std::fill(yr + e0, yr + E, 0.0f);
    for (int64_t s = 0; s < n && e0 < E; ++s) {
      const float* __restrict vr = V0 + (s * H + h) * E;
      const float p = sc[s];
#pragma omp simd
      for (int64_t e = e0; e < E; ++e) yr[e] += p * vr[e];
    }
    const float inv = 1.0f / sum;
#pragma omp simd
    for (int64_t e = 0; e < E; ++e) yr[e] *= inv;
  }
  // Keep only what a later query can see: the last window-1 positions.
  if (c.window > 0 && L > c.window - 1) {
    const int64_t drop = L - (c.window - 1);
    c.k.erase(c.k.begin(), c.k.begin() + drop * H * D);
    c.v.erase(c.v.begin(), c.v.begin() + drop * H * E);
  }
}

namespace {

double softmax_scale(const Call& c) { return c.given.at("scale") ? c.p("scale") : 1.0 / std::sqrt(double(c.d("D"))); }

TensorMap softmax_parallel(const Call& c) {
  const AttnDims d = attn_dims(c);
  Tensor y({d.B, d.T, d.H, d.E});
  softmax_forward(y.ptr(), c.t("q").ptr(), c.t("k").ptr(), c.t("v").ptr(), d, float(softmax_scale(c)), c.causal,
                  c.ip("window"));
  return moved_map("y", std::move(y));
}

TensorMap softmax_grad(const Call& c, const Tensor& dy) {
  const AttnDims d = attn_dims(c);
  const float scale = float(softmax_scale(c));
  Tensor y({d.B, d.T, d.H, d.E}), dq({d.B, d.T, d.H, d.D}), dk({d.B, d.T, d.H, d.D}), dv({d.B, d.T, d.H, d.E});
  std::vector<float> lse(d.B * d.H * d.T);
  softmax_forward(y.ptr(), c.t("q").ptr(), c.t("k").ptr(), c.t("v").ptr(), d, scale, c.causal, c.ip("window"),
                  lse.data());
  softmax_backward(dq.ptr(), dk.ptr(), dv.ptr(), c.t("q").ptr(), c.t("k").ptr(), c.t("v").ptr(), y.ptr(), lse.data(),
                   dy.ptr(), d, scale, c.causal, c.ip("window"));
  return moved_map("y", std::move(y), "dq", std::move(dq), "dk", std::move(dk), "dv", std::move(dv));
}


}  // namespace

MixerSpec softmax_spec() {
  MixerSpec s;
  s.name = "softmax";
  s.blocking = {{"T", kTileQ}, {"T", kTileK}};
  s.more_params = {{{"window", "3"}}};
  s.quadratic = true;
  // tiled causal softmax: the tiles on and below the diagonal, Q K^T and P V
  s.flops = [](const std::map<std::string, int64_t>& d, bool) {
    const double T = double(d.at("T"));
    return double(d.at("H")) * 2 * double(d.at("D") + d.at("E")) * T * (T + double(kTileK)) / 2;
  };
  s.paper = "Vaswani et al. 2017 (attention); Dao et al. 2022 (FlashAttention tiling)";
  s.summary = "scaled dot-product attention, the quadratic baseline";
  s.inputs = {{"q", "B,T,H,D"}, {"k", "B,T,H,D"}, {"v", "B,T,H,E"}};
  s.params = {{"scale", 0.0, false, -1e300, "logit scale", "1/sqrt(D)"},
              {"window", 0, true, 0, "local window (0 = unlimited)"}};
  s.state = {{"k", "B,L,H,D"}, {"v", "B,L,H,E"}};
  s.state_size = "KV cache: L (H D + H E) per sequence, L = tokens seen (window-1 with a window)";
  s.time = "O(T^2 H D) (O(T window H D) with a window)";
  s.memory = "O(T) parallel (tiled), O(T^2) reference";
  s.check = [](const Call& c) {
    // |scale q.k| <= |scale| |q| |k|: a bound past float32's range would make the logits inf
    // and the output NaN where the float64 reference is finite: refused instead
    auto max_norm = [&](const Tensor& t, int64_t w) {
      double m = 0;
      for (int64_t r = 0; r < t.numel() / w; ++r) {
        double s = 0;
        for (int64_t i = 0; i < w; ++i) s += double(t.data[r * w + i]) * t.data[r * w + i];
        m = std::max(m, s);
      }
      return std::sqrt(m);
    };
    const int64_t D = c.d("D");
    const double bound = std::fabs(softmax_scale(c)) * max_norm(c.t("q"), D) * max_norm(c.t("k"), D);
    LINMIX_CHECK(bound < 1e37, "param 'scale': |scale| |q| |k| reaches " + std::to_string(bound) +
                                   ", past float32's range (3.4e38): the logits would overflow");
    if (c.has("state.k") && c.ip("window") > 0)
      LINMIX_CHECK(c.d("L") <= c.ip("window") - 1, "tensor 'state.k': a cache for window " +
                                                       std::to_string(c.ip("window")) + " holds at most " +
                                                       std::to_string(c.ip("window") - 1) + " positions, found " +
                                                       std::to_string(c.d("L")));
  };
  s.y_dims = "B,T,H,E";
  set_reference(s, [](const Call& c, const auto& x) {
    using S = scalar_of<decltype(x)>;
    const AttnDims d = attn_dims(c);
    std::vector<S> y(d.B * d.T * d.H * d.E);
    ref::softmax_ref<S>(y.data(), x.at("q").data(), x.at("k").data(), x.at("v").data(), d, S(softmax_scale(c)),
                        c.causal, c.ip("window"));
    return y;
  });
  s.parallel = softmax_parallel;
  s.backward = softmax_grad;
  // the key/value cache in every causal form: all past rows (the last window - 1 with a window)
  set_row_cache(s, {{{"k", "k"}, {"v", "v"}}, [](const Call& c, int64_t n) {
                      return c.ip("window") > 0 ? std::min(n, c.ip("window") - 1) : n;
                    }});
  s.stepper = [](const Call& c) {
    const AttnDims d = attn_dims(c);
    auto kc = std::make_shared<KVCache>();
    kc->H = d.H, kc->D = d.D, kc->E = d.E, kc->window = c.ip("window");
    kc->k.reserve(4096 * d.H * d.D), kc->v.reserve(4096 * d.H * d.E);
    auto scratch = std::make_shared<std::vector<float>>();
    const float scale = float(softmax_scale(c));
    const float *q = c.t("q").ptr(), *k = c.t("k").ptr(), *v = c.t("v").ptr();
    auto save = [=] {
      const int64_t L = kc->len();
      return TensorMap{{"state.k", state_tensor({1, L, kc->H, kc->D}, kc->k)},
                       {"state.v", state_tensor({1, L, kc->H, kc->E}, kc->v)}};
    };
    auto load = [=](const TensorMap& m) { state_load(kc->k, m, "state.k"), state_load(kc->v, m, "state.v"); };
    return Stepper{[=](float* y) { softmax_step(y, *kc, q, k, v, scale, *scratch); }, save, load};
  };
  return s;
}

}  // namespace linmix
