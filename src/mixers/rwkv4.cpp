// rwkv4 — the RWKV-4 WKV operator (Peng et al. 2023, eq. 14-16), causal only.
//   y_t = (sum_{i<t} e^{-(t-1-i) w + k_i} v_i + e^{u + k_t} v_t) / (same without v_i)
// Numerically stable scan (as the paper's CUDA kernel): the running sums a (numerator) and
// b (denominator) are kept scaled by exp(-p), p the running max exponent, so no exp ever
// sees a positive argument. parallel: the scan over T, vectorised over channels and
// threaded over (batch, channel block), from the given state (a, b, p) (zeros, p = -1e38
// without) to the final one; backward: the reverse scan, chunk by chunk from the end, each chunk's
// forward recomputed from the state saved at its start; recurrent: the same update one token at
// a time with the state carried across calls.
#include "../ref/ref_util.h"
#include "../kernels/vmath.h"
#include "common.h"
#include "linmix/kernels.h"

namespace linmix::ref {

// ---- rwkv4: the float64 reference (the literal formula, templated for the tape) ----
// RWKV-4 WKV: y_t = (sum_{i<t} e^{-(t-1-i) w + k_i} v_i + e^{u + k_t} v_t) / (same without v).
// From a state (a0, b0, p0) (B,C) before token 0 (null: zeros, p0 = -1e38): the past sums
// gain e^{p0 - t w} a0 and e^{p0 - t w} b0. The final state (null: not wanted):
// pT = max(p0 - T w, max_i k_i - (T-1-i) w), aT = (e^{p0 - T w} a0 + sum_i e^{k_i - (T-1-i) w} v_i) e^{-pT},
// bT likewise without v (the scan's (a, b, p): the sums scaled by their running maximum).
template <class S>
void rwkv4_ref(S* y, const S* k, const S* v, const S* w, const S* u, int64_t B, int64_t T, int64_t C,
               const S* a0 = nullptr, const S* b0 = nullptr, const S* p0 = nullptr, S* aT = nullptr, S* bT = nullptr,
               S* pT = nullptr) {
  std::vector<S> L(static_cast<size_t>(T * T));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t c = 0; c < C; ++c) {
      auto at = [&](const S* x, int64_t t) { return x[(b * T + t) * C + c]; };
      const int64_t sc = b * C + c;
      for (int64_t t = 0; t < T; ++t) {
        S mx = -std::numeric_limits<S>::infinity();
        for (int64_t i = 0; i <= t; ++i) {
          L[t * T + i] = i < t ? -S(t - 1 - i) * w[c] + at(k, i) : u[c] + at(k, t);
          mx = std::max(mx, L[t * T + i]);
        }
        const S ls = a0 ? p0[sc] - S(t) * w[c] : S(0);  // the state's exponent at t
        if (a0) mx = std::max(mx, ls);
        S num = 0, den = 0;
        for (int64_t i = 0; i <= t; ++i) {
          const S e = exp(L[t * T + i] - mx);
          num += e * at(v, i);
          den += e;
        }
        if (a0) {
          const S e = exp(ls - mx);
          num += e * a0[sc], den += e * b0[sc];
        }
        y[(b * T + t) * C + c] = num / den;
      }
      if (aT) {
        const S ls = (a0 ? p0[sc] : S(-1e38)) - S(T) * w[c];
        S p = ls;
        for (int64_t i = 0; i < T; ++i) p = std::max(p, at(k, i) - S(T - 1 - i) * w[c]);
        S na = a0 ? exp(ls - p) * a0[sc] : S(0), nb = a0 ? exp(ls - p) * b0[sc] : S(0);
        for (int64_t i = 0; i < T; ++i) {
          const S e = exp(at(k, i) - S(T - 1 - i) * w[c] - p);
          na += e * at(v, i), nb += e;
        }
        aT[sc] = na, bT[sc] = nb, pT[sc] = p;
      }
    }
}

}  // namespace linmix::ref

namespace linmix {

namespace {
// One scan of what Kind names: kY the outputs y, kSave also mo and dn, kState only the state
// (a, b, p) advanced (one exp a step instead of two, no division: the backward's checkpoint sweep).
// Pointers are restrict (distinct arrays, as documented): with possible aliasing (and std::max)
// GCC ran a scalar loop (17.6 ns/element).
// With Check, *bad gets 1 where a k or v read holds an inf or NaN (Call::unchecked: on the bits, as
// the scan reads them).
enum ScanKind { kY, kSave, kState };
template <ScanKind Kind, bool Check = false>
void scan_impl(float* __restrict y, float* __restrict a, float* __restrict bb, float* __restrict p,
               const float* __restrict k, const float* __restrict v, const float* __restrict w,
               const float* __restrict u, int64_t T, int64_t C, int64_t stride, float* __restrict mo,
               float* __restrict dn, int64_t ldy, uint32_t* bad = nullptr) {
  uint32_t nonfinite = 0;
  for (int64_t t = 0; t < T; ++t) {
    const float* kt = k + t * stride;
    const float* vt = v + t * stride;
    float* yt = Kind == kState ? nullptr : y + t * ldy;
    if (stride > C && t + kPrefetchRows < T) {  // rows of a channel block are strided (common.h)
      const int64_t a = kPrefetchRows * stride;
      prefetch_floats(kt + a, C), prefetch_floats(vt + a, C);
      if (Kind != kState && ldy > C) prefetch_floats<true>(yt + kPrefetchRows * ldy, C);
    }
#pragma omp simd reduction(| : nonfinite)
    for (int64_t c = 0; c < C; ++c) {
      if constexpr (Check)
        nonfinite |= nonfinite_bits(kt[c]) | nonfinite_bits(vt[c]);
      const float pc = p[c];
      float e1, e2;
      if constexpr (Kind != kState) {
        // output: the past (a, b at exponent p) plus the bonus term e^{u + k_t}
        const float ww = u[c] + kt[c];
        const float q = pc < ww ? ww : pc;  // std::max returns a reference, which GCC cannot vectorise
        exp_pair(pc, ww, e1, e2);  // e^{pc - q}, e^{ww - q}
        const float den = e1 * bb[c] + e2;
        yt[c] = (e1 * a[c] + e2 * vt[c]) / den;
        if constexpr (Kind == kSave) mo[t * ldy + c] = q, dn[t * ldy + c] = den;  // D_t = den e^{q}: for backward
      }
      // state: decay the past by e^{-w}, add e^{k_t} v_t
      const float wd = pc - w[c], kc = kt[c];
      const float q = wd < kc ? kc : wd;
      exp_pair(wd, kc, e1, e2);
      a[c] = e1 * a[c] + e2 * vt[c];
      bb[c] = e1 * bb[c] + e2;
      p[c] = q;
    }
  }
  if constexpr (Check) *bad |= nonfinite;
}
}  // namespace

void rwkv4_scan(float* y, float* a, float* bb, float* p, const float* k, const float* v, const float* w,
                const float* u, int64_t T, int64_t C, int64_t stride, float* mo, float* dn, int64_t ldy) {
  if (ldy == 0) ldy = stride;
  if (mo) scan_impl<kSave>(y, a, bb, p, k, v, w, u, T, C, stride, mo, dn, ldy);
  else scan_impl<kY>(y, a, bb, p, k, v, w, u, T, C, stride, nullptr, nullptr, ldy);
}

void rwkv4_backward(float* __restrict dk, float* __restrict dv, float* __restrict dw, float* __restrict du,
                    const float* __restrict k, const float* __restrict v, const float* __restrict w,
                    const float* __restrict u, const float* __restrict y, const float* __restrict mo,
                    const float* __restrict dn, const float* __restrict dy, int64_t T, int64_t C, int64_t stride,
                    float* carry, int64_t ldy) {
  // Reverse scan. With D_s = dn_s e^{m_s} and g_s = dy_s:
  //   G_t = sum_{s>t} e^{-(s-1-t) w} g_s / D_s,       H_t = same with g_s y_s
  //   G'_t = sum_{s>t} (s-1-t) e^{-(s-1-t) w} g_s / D_s, H'_t likewise
  //   dv_t = e^{u+k_t} g_t / D_t + e^{k_t} G_t
  //   dk_t = e^{u+k_t} (v_t - y_t) g_t / D_t + e^{k_t} (v_t G_t - H_t)
  //   du  += e^{u+k_t} (v_t - y_t) g_t / D_t,   dw -= e^{k_t} (v_t G'_t - H'_t)
  // G, H, G', H' are kept as (gg, hh, gg2, hh2) e^{q} with a running exponent q, so every
  // exponential has a non-positive argument; G_{t-1} = g_t / D_t + e^{-w} G_t and
  // G'_{t-1} = e^{-w} (G'_t + G_t).
  for (int64_t c = 0; c < C; ++c) du[c] = 0.0f, dw[c] = 0.0f;
  std::vector<float> own(carry ? 0 : 5 * C, 0.0f);
  float* state = carry ? carry : own.data();
  float* __restrict gg = state;
  float* __restrict hh = gg + C;
  float* __restrict gg2 = hh + C;
  float* __restrict hh2 = gg2 + C;
  float* __restrict q = hh2 + C;
  if (!carry)
    for (int64_t c = 0; c < C; ++c) q[c] = -1e38f;
  if (ldy == 0) ldy = stride;
  for (int64_t t = T - 1; t >= 0; --t) {
    const int64_t o = t * stride, oy = t * ldy;
    if (stride > C && t >= kPrefetchRows) {  // strided rows, walked backwards (common.h)
      const int64_t a = o - kPrefetchRows * stride;
      for (const float* r : {k + a, v + a, dy + a}) prefetch_floats(r, C);
      prefetch_floats<true>(dk + a, C), prefetch_floats<true>(dv + a, C);
      if (ldy > C)
        for (const float* r : {y, mo, dn}) prefetch_floats(r + oy - kPrefetchRows * ldy, C);
    }
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const float inv = dy[o + c] / dn[oy + c];  // g_t / D_t = inv e^{-m_t}
      const float eb = exp_fast(u[c] + k[o + c] - mo[oy + c]);
      const float ek = exp_fast(k[o + c] + q[c]);
      const float vy = v[o + c] - y[oy + c];
      dv[o + c] = eb * inv + ek * gg[c];
      dk[o + c] = eb * vy * inv + ek * (v[o + c] * gg[c] - hh[c]);
      du[c] += eb * vy * inv;
      dw[c] -= ek * (v[o + c] * gg2[c] - hh2[c]);
      const float qa = -mo[oy + c], qb = q[c] - w[c];
      const float qn = qa < qb ? qb : qa;  // not std::max: its reference result stops vectorisation
      float a1, a2;
      exp_pair(qa, qb, a1, a2);  // e^{qa - qn}, e^{qb - qn}
      gg2[c] = (gg2[c] + gg[c]) * a2;
      hh2[c] = (hh2[c] + hh[c]) * a2;
      gg[c] = inv * a1 + gg[c] * a2;
      hh[c] = inv * y[oy + c] * a1 + hh[c] * a2;
      q[c] = qn;
    }
  }
}

namespace {

constexpr float kInitP = -1e38f;  // MIXERS.md: initial p = -1e38
constexpr int64_t kBlock = 256;
constexpr int64_t kBwdChunk = 32;  // tokens the backward recomputes at a time (backward above)

// The scan's (a, b, p) of n channels from row r0 of the call's state (B,C), or the zero state.
void initial_state(const Call& c, int64_t r0, int64_t n, float* a, float* bb, float* p) {
  if (!c.has("state.a")) {
    std::fill(a, a + n, 0.0f), std::fill(bb, bb + n, 0.0f), std::fill(p, p + n, kInitP);
    return;
  }
  std::copy(c.t("state.a").ptr() + r0, c.t("state.a").ptr() + r0 + n, a);
  std::copy(c.t("state.b").ptr() + r0, c.t("state.b").ptr() + r0 + n, bb);
  std::copy(c.t("state.p").ptr() + r0, c.t("state.p").ptr() + r0 + n, p);
}

MixerSpec make_spec() {
  MixerSpec s;
  s.name = "rwkv4";
  s.blocking = {{"C", kBlock}, {"T", kBwdChunk}};
  // keys and bonuses pushed to +-60 (times 20, clipped); decay rates from tiny to large
  // (the gradients: keys and bonuses only)
  s.stress = [](TensorMap& in, bool for_grad) {
    for (const char* name : {"k", "u"})
      for (float& x : in[name].data) x = std::clamp(20.0f * x, -60.0f, 60.0f);
    if (!for_grad)
      for (float& x : in["w"].data) x = std::min(60.0f, x * x * 10.0f + 1e-3f);
  };
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
  s.kernel_checks_values = true;  // the parallel scan checks k and v as it reads them
  s.check = [](const Call& c) {
    const Tensor& w = c.t("w");
    for (int64_t i = 0; i < w.numel(); ++i)
      LINMIX_CHECK(w.data[i] > 0.0f, "tensor 'w': the decay rate must be > 0 (w = exp(time_decay)); w[" +
                                         std::to_string(i) + "] = " + std::to_string(w.data[i]));
  };
  s.y_dims = "B,T,C";
  s.state_all_modes = true;  // every form starts from (a, b, p) and returns the final (a, b, p)
  s.state_fix = [](TensorMap& st) {
    for (float& x : st["state.b"].data) x = std::abs(x) + 0.5f;  // b, a sum of e^{k}, scaled: > 0
    // p spread wide (N(2, 4^2)): in some channels the state's term p - t w stays the largest
    // exponent (the running max p_T then comes from p0), in others a key takes over
    for (float& x : st["state.p"].data) x = 2.0f + 4.0f * x;
  };
  set_reference(s, [](const Call& c, const auto& x) {
    using S = scalar_of<decltype(x)>;
    const int64_t B = c.d("B"), T = c.d("T"), C = c.d("C");
    std::vector<S> y(B * T * C + 3 * B * C);
    S* fin = y.data() + B * T * C;
    ref::rwkv4_ref<S>(y.data(), x.at("k").data(), x.at("v").data(), x.at("w").data(), x.at("u").data(), B, T, C,
                      opt_in(x, "state.a"), opt_in(x, "state.b"), opt_in(x, "state.p"), fin, fin + B * C,
                      fin + 2 * B * C);
    return y;
  });
  s.parallel = [](const Call& c) {
    const int64_t B = c.d("B"), T = c.d("T"), C = c.d("C");
    TensorMap out;  // (an initializer list would copy y; the scan writes every element of it)
    out.emplace("y", Tensor::uninitialized({B, T, C}));
    for (const char* n : {"state.a", "state.b", "state.p"}) out.emplace(n, Tensor({B, C}));
    float *y = out["y"].ptr(), *fa = out["state.a"].ptr(), *fb = out["state.b"].ptr(), *fp = out["state.p"].ptr();
    const int64_t nblk = (C + kBlock - 1) / kBlock;
#pragma omp parallel for collapse(2) schedule(static)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t blk = 0; blk < nblk; ++blk) {
        const int64_t c0 = blk * kBlock, n = std::min(kBlock, C - c0);
        float a[kBlock], bb[kBlock], p[kBlock];
        initial_state(c, b * C + c0, n, a, bb, p);
        const int64_t off = b * T * C + c0;
        const float *k = c.t("k").ptr() + off, *v = c.t("v").ptr() + off, *w = c.t("w").ptr() + c0,
                    *u = c.t("u").ptr() + c0;
        if (c.unchecked_bad) {  // k's and v's values checked as the scan reads them (Call::unchecked)
          uint32_t bad = 0;
          scan_impl<kY, true>(y + off, a, bb, p, k, v, w, u, T, n, C, nullptr, nullptr, C, &bad);
          if (bad) c.unchecked_bad->fetch_or(1u);
        } else {
          rwkv4_scan(y + off, a, bb, p, k, v, w, u, T, n, C);
        }
        std::copy(a, a + n, fa + b * C + c0), std::copy(bb, bb + n, fb + b * C + c0), std::copy(p, p + n, fp + b * C + c0);
      }
    return out;
  };
  // The backward with the state: the reverse scan starts from the final state's gradient, as
  // if it were one more output at position T (G = da_T e^{-p_T}, H = -db_T e^{-p_T}: the
  // gradients of the unscaled sums), and ends with the sums G, H, G', H' before token 0, which
  // give the initial state's: with A0 = a0 e^{p0}, B0 = b0 e^{p0}, dA0 = G, dB0 = -H, so
  // da0 = e^{p0} G, db0 = -e^{p0} H, dp0 = a0 da0 + b0 db0 and dw -= A0 G' - B0 H'. p_T itself
  // is a running max: d p_T - da_T a_T - db_T b_T flows to the term that attains it (a key
  // k_i with dw -= (T-1-i) times it, or p0 with dw -= T times it).
  s.backward = [](const Call& c, const Tensor& dy) {
    const int64_t B = c.d("B"), T = c.d("T"), C = c.d("C");
    // y, dk, dv, mo, dn: every element written by the scans (not zeroed first: 40 MB of stores at
    // T = 4096, C = 512)
    Tensor y = Tensor::uninitialized({B, T, C}), dk = Tensor::uninitialized({B, T, C}),
           dv = Tensor::uninitialized({B, T, C}), dw({C}), du({C});
    const bool s0 = c.has("state.a"), sT = c.has("dfinal.a");
    Tensor da0, db0, dp0;
    if (s0) da0 = Tensor({B, C}), db0 = Tensor({B, C}), dp0 = Tensor({B, C});
    // The forward sweep only advances the state (no outputs) and keeps it at every chunk start (3 C
    // floats per kBwdChunk tokens); the reverse walk recomputes a chunk's y, m, dn from its start
    // into buffers that stay in cache, hands y out and runs the backward over the chunk, its sums
    // carried to the chunk before. Against saving m and dn for all T (two more (T, C) streams
    // written, then read, and their fresh pages) and computing y twice: see the commits.
    const int64_t nch = (T + kBwdChunk - 1) / kBwdChunk;
    std::vector<float> dwb(B * C), dub(B * C);
    const int64_t nblk = (C + kBlock - 1) / kBlock;
#pragma omp parallel for collapse(2) schedule(static)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t blk = 0; blk < nblk; ++blk) {
        const int64_t c0 = blk * kBlock, n = std::min(kBlock, C - c0), off = b * T * C + c0, r0 = b * C + c0;
        float a[kBlock], bb[kBlock], p[kBlock], carry[5 * kBlock], dwc[kBlock], duc[kBlock];
        thread_local std::vector<float> ck, ly;  // chunk-start states (nch, 3, n); a chunk's y, m, dn
        ck.resize(size_t(nch * 3 * n)), ly.resize(size_t(3 * kBwdChunk * n));
        initial_state(c, r0, n, a, bb, p);
        const float *k = c.t("k").ptr() + off, *v = c.t("v").ptr() + off, *w = c.t("w").ptr() + c0,
                    *u = c.t("u").ptr() + c0;
        for (int64_t ch = 0; ch < nch; ++ch) {
          const int64_t t0 = ch * kBwdChunk, nt = std::min(kBwdChunk, T - t0);
          float* s0c = ck.data() + ch * 3 * n;
          std::copy(a, a + n, s0c), std::copy(bb, bb + n, s0c + n), std::copy(p, p + n, s0c + 2 * n);
          scan_impl<kState>(nullptr, a, bb, p, k + t0 * C, v + t0 * C, w, u, nt, n, C, nullptr, nullptr, 0);
        }
        float *gg = carry, *hh = gg + n, *gg2 = hh + n, *hh2 = gg2 + n, *q = hh2 + n;
        std::fill(carry, carry + 4 * n, 0.0f), std::fill(q, q + n, -1e38f);
        if (sT)
          for (int64_t j = 0; j < n; ++j)  // a, bb, p now hold the final state
            gg[j] = c.t("dfinal.a").data[r0 + j], hh[j] = -c.t("dfinal.b").data[r0 + j], q[j] = -p[j];
        float* dwj = dwb.data() + r0;
        float* duj = dub.data() + r0;
        std::fill(dwj, dwj + n, 0.0f), std::fill(duj, duj + n, 0.0f);
        float *cy = ly.data(), *cm = cy + kBwdChunk * n, *cd = cm + kBwdChunk * n;
        for (int64_t ch = nch - 1; ch >= 0; --ch) {
          const int64_t t0 = ch * kBwdChunk, nt = std::min(kBwdChunk, T - t0);
          float* s0c = ck.data() + ch * 3 * n;  // read once: the recompute advances it in place
          rwkv4_scan(cy, s0c, s0c + n, s0c + 2 * n, k + t0 * C, v + t0 * C, w, u, nt, n, C, cm, cd, n);
          for (int64_t t = 0; t < nt; ++t) std::copy(cy + t * n, cy + (t + 1) * n, y.ptr() + off + (t0 + t) * C);
          rwkv4_backward(dk.ptr() + off + t0 * C, dv.ptr() + off + t0 * C, dwc, duc, k + t0 * C, v + t0 * C, w, u, cy,
                         cm, cd, dy.ptr() + off + t0 * C, nt, n, C, carry, n);
          for (int64_t j = 0; j < n; ++j) dwj[j] += dwc[j], duj[j] += duc[j];
        }
        for (int64_t j = 0; j < n; ++j) {
          float dp_init = 0.0f;
          if (s0) {
            const float a0 = c.t("state.a").data[r0 + j], b0 = c.t("state.b").data[r0 + j],
                        p0 = c.t("state.p").data[r0 + j], e = std::exp(q[j] + p0);
            da0.data[r0 + j] = e * gg[j], db0.data[r0 + j] = -e * hh[j];
            dp_init = a0 * e * gg[j] - b0 * e * hh[j];
            dwj[j] -= e * (a0 * gg2[j] - b0 * hh2[j]);
          }
          if (sT) {  // the running max p_T: its gradient to the term that attains it (the scan's comparisons)
            const float dpt = c.t("dfinal.p").data[r0 + j] - c.t("dfinal.a").data[r0 + j] * a[j] -
                              c.t("dfinal.b").data[r0 + j] * bb[j];
            float pm = s0 ? c.t("state.p").data[r0 + j] : kInitP;
            int64_t arg = -1;
            for (int64_t t = 0; t < T; ++t) {
              const float wd = pm - w[j], kc = k[t * C + j];
              if (wd < kc) pm = kc, arg = t;
              else pm = wd;
            }
            if (arg >= 0) dk.data[off + arg * C + j] += dpt, dwj[j] -= float(T - 1 - arg) * dpt;
            else dp_init += dpt, dwj[j] -= float(T) * dpt;
          }
          if (s0) dp0.data[r0 + j] = dp_init;
        }
      }
    for (int64_t b = 0; b < B; ++b)  // parameter gradients accumulate over the batch
      for (int64_t ch = 0; ch < C; ++ch) dw.data[ch] += dwb[b * C + ch], du.data[ch] += dub[b * C + ch];
    TensorMap out =
        moved_map("y", std::move(y), "dk", std::move(dk), "dv", std::move(dv), "dw", std::move(dw), "du", std::move(du));
    if (s0) out["dstate.a"] = std::move(da0), out["dstate.b"] = std::move(db0), out["dstate.p"] = std::move(dp0);
    return out;
  };
  s.stepper = [](const Call& c) {
    const int64_t C = c.d("C");
    auto st = std::make_shared<std::vector<float>>(3 * C, 0.0f);  // a, b, p
    std::fill(st->begin() + 2 * C, st->end(), kInitP);
    const float *k = c.t("k").ptr(), *v = c.t("v").ptr(), *w = c.t("w").ptr(), *u = c.t("u").ptr();
    auto step = [=](float* y) {
      float* s = st->data();
      rwkv4_scan(y, s, s + C, s + 2 * C, k, v, w, u, 1, C, C);
    };
    auto save = [=] {
      TensorMap m;
      for (int i = 0; i < 3; ++i) m[std::string("state.") + "abp"[i]] = state_tensor({1, C}, st->data() + i * C);
      return m;
    };
    auto load = [=](const TensorMap& m) {
      for (int i = 0; i < 3; ++i) {
        const Tensor& t = m.at(std::string("state.") + "abp"[i]);
        std::copy(t.data.begin(), t.data.end(), st->begin() + i * C);
      }
    };
    return Stepper{step, save, load};
  };
  return s;
}

}  // namespace

MixerSpec rwkv4_spec() { return make_spec(); }

}  // namespace linmix
