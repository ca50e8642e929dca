// aft_full, aft_local, aft_simple, aft_conv — Attention Free Transformer (Zhai et al. 2021).
//   y_t = sigma(q_t) * sum_s exp(k_s + w_ts) v_s / sum_s exp(k_s + w_ts)   (per channel)
// All four variants share one kernel. Position t sees a band [t - lo, t + hi] where the
// bias w_ts may be non-zero, and every other allowed position with w = 0. The far positions
// are summed as running prefix (and, non-causal, suffix) sums, each kept with its own running
// max so no exp overflows or underflows; the band is summed directly. The two sets are
// disjoint, so nothing is ever subtracted (a "global sum minus the band" form would cancel
// catastrophically when the band's k + w dominate). Cost O(T (band + 1) C), extra memory O(T C)
// for the suffix sums (non-causal) and O(band) otherwise.
#include "../ref/channel_ref.h"
#include "../kernels/vmath.h"
#include "common.h"
#include "linmix/kernels.h"

namespace linmix {

namespace {

// Stands in for -inf as the max of an empty running sum so that saved states stay finite
// (MIXERS.md uses the same convention, p = -1e38, for RWKV).
constexpr float kEmptyMax = -1e38f;

// Adds exp(x) * val to the running sum (num, den) kept scaled by exp(-m), per channel.
inline void running_add(float* __restrict m, float* __restrict num, float* __restrict den, const float* __restrict x,
                        const float* __restrict val, int64_t n) {
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) {
    const float mn = vmax(m[c], x[c]);
    float a, e;
    exp_pair(m[c], x[c], a, e);  // e^{m - mn}, e^{x - mn}
    num[c] = num[c] * a + e * val[c];
    den[c] = den[c] * a + e;
    m[c] = mn;
  }
}

// Adds exp(x) * (v1, v2) to two running sums kept scaled by exp(-m), per channel.
inline void running_add2(float* __restrict m, float* __restrict s1, float* __restrict s2, const float* __restrict x,
                         const float* __restrict v1, const float* __restrict v2, int64_t n) {
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) {
    const float mn = vmax(m[c], x[c]);
    float a, e;
    exp_pair(m[c], x[c], a, e);  // e^{m - mn}, e^{x - mn}
    s1[c] = s1[c] * a + e * v1[c];
    s2[c] = s2[c] * a + e * v2[c];
    m[c] = mn;
  }
}

}  // namespace

void aft_forward(float* y, const float* q, const float* k, const float* v, int64_t B, int64_t T, int64_t C,
                 bool causal, const AftBand& band, float* o_out, float* lse_out) {
  const int64_t nblocks = static_cast<int64_t>(band.blocks.size());
#pragma omp parallel for collapse(2) schedule(dynamic)
  for (int64_t b = 0; b < B; ++b)
    for (int64_t bi = 0; bi < nblocks; ++bi) {
      const int64_t c0 = band.blocks[bi].first, n = band.blocks[bi].second - c0;
      auto row = [&](const float* x, int64_t t) { return x + (b * T + t) * C + c0; };
      // Prefix sums over s < band start: pm, pn, pd (n). Suffix sums (non-causal) over s >= j,
      // for every j: sm, sn, sd (T+1, n). M, num, den, x (n): per-row work; wb: band biases.
      std::vector<float> pm(n, kEmptyMax), pn(n, 0.0f), pd(n, 0.0f), M(n), num(n), den(n), x(n), wb;
      std::vector<float> sm, sn, sd;
      // raw restrict views: through std::vector::operator[] GCC reloads the data pointer in every
      // loop and does not vectorise it
      float *__restrict pM = M.data(), *__restrict pnum = num.data(), *__restrict pden = den.data();
      float *__restrict ppm = pm.data(), *__restrict ppn = pn.data(), *__restrict ppd = pd.data();
      if (!causal) {
        sm.assign((T + 1) * n, kEmptyMax);
        sn.assign((T + 1) * n, 0.0f);
        sd.assign((T + 1) * n, 0.0f);
        for (int64_t j = T - 1; j >= 0; --j) {
          std::copy(&sm[(j + 1) * n], &sm[(j + 2) * n], &sm[j * n]);
          std::copy(&sn[(j + 1) * n], &sn[(j + 2) * n], &sn[j * n]);
          std::copy(&sd[(j + 1) * n], &sd[(j + 2) * n], &sd[j * n]);
          running_add(&sm[j * n], &sn[j * n], &sd[j * n], row(k, j), row(v, j), n);
        }
      }
      int64_t next = 0;  // next position to move into the prefix sums
      for (int64_t t = 0; t < T; ++t) {
        if (C > n && t + kPrefetchRows < T) {  // a block's rows are C floats apart (common.h)
          const int64_t ta = t + kPrefetchRows;
          prefetch_floats(row(k, ta), n), prefetch_floats(row(v, ta), n), prefetch_floats(row(q, ta), n);
          prefetch_floats<true>(y + (b * T + ta) * C + c0, n);
        }
        const int64_t s_lo = std::max<int64_t>(0, t - band.lo);
        const int64_t s_hi = causal ? t : std::min(T - 1, t + band.hi);  // band is [s_lo, s_hi]
        const int64_t prefix_end = std::min(s_lo, causal ? t + 1 : T);
        for (; next < prefix_end; ++next) running_add(pm.data(), pn.data(), pd.data(), row(k, next), row(v, next), n);
        const int64_t suf = causal ? T : std::max(s_hi + 1, s_lo);  // suffix starts after the band
        std::copy(pm.begin(), pm.end(), M.begin());
        if (!causal)
          for (int64_t c = 0; c < n; ++c) pM[c] = vmax(pM[c], sm[suf * n + c]);
        wb.resize(static_cast<size_t>(std::max<int64_t>(0, s_hi - s_lo + 1)));
        for (int64_t s = s_lo; s <= s_hi; ++s) {
          const float w = wb[s - s_lo] = band.bias(band.ctx, t, s, bi);
          const float* ks = row(k, s);
          for (int64_t c = 0; c < n; ++c) pM[c] = vmax(pM[c], ks[c] + w);
        }
        if (causal && s_lo > s_hi) {  // no band (aft_simple): M is the prefix max, the scale e^0 = 1
          std::copy(ppn, ppn + n, pnum);
          std::copy(ppd, ppd + n, pden);
        } else {
          for (int64_t c = 0; c < n; ++c) {
            const float a = exp_fast(ppm[c] - pM[c]);
            pnum[c] = ppn[c] * a;
            pden[c] = ppd[c] * a;
          }
        }
        if (!causal)
          for (int64_t c = 0; c < n; ++c) {
            const float a = exp_fast(sm[suf * n + c] - pM[c]);
            pnum[c] += sn[suf * n + c] * a;
            pden[c] += sd[suf * n + c] * a;
          }
        for (int64_t s = s_lo; s <= s_hi; ++s) {
          const float w = wb[s - s_lo];
          const float *ks = row(k, s), *vs = row(v, s);
          for (int64_t c = 0; c < n; ++c) {
            const float e = exp_fast(ks[c] + w - pM[c]);
            pnum[c] += e * vs[c];
            pden[c] += e;
          }
        }
        const float* qt = row(q, t);
        float* yt = y + (b * T + t) * C + c0;
        for (int64_t c = 0; c < n; ++c) yt[c] = sigmoidf(qt[c]) * pnum[c] / pden[c];
        if (o_out)  // saved for backward: o = num / den and lse = log(sum_s exp(k_s + w_ts))
          for (int64_t c = 0; c < n; ++c) {
            o_out[(b * T + t) * C + c0 + c] = pnum[c] / pden[c];
            lse_out[(b * T + t) * C + c0 + c] = pM[c] + log_fast(pden[c]);
          }
      }
    }
}

void aft_backward(float* dq, float* dk, float* dv, const float* q, const float* k, const float* v, const float* o,
                  const float* lse, const float* dy, int64_t B, int64_t T, int64_t C, bool causal,
                  const AftBand& band) {
  // With h_t = dy_t sigma(q_t) and P_ts = exp(k_s + w_ts - lse_t):
  //   dq_t = dy_t o_t sigma'(q_t),  dv_s = sum_t P_ts h_t = A_s,
  //   dk_s = sum_t P_ts h_t (v_s - o_t) = v_s A_s - B_s,  B_s = sum_t P_ts h_t o_t.
  // The sums over t run over the transposed sets: the band t in [s - hi, s + lo] directly, the
  // far positions as running sums of exp(-lse_t) (h_t, h_t o_t) with their own running max:
  // t >= s + lo + 1 (a suffix), and non-causal also t <= s - hi - 1 (a prefix).
  const int64_t nblocks = static_cast<int64_t>(band.blocks.size());
#pragma omp parallel for collapse(2) schedule(dynamic)
  for (int64_t b = 0; b < B; ++b)
    for (int64_t bi = 0; bi < nblocks; ++bi) {
      const int64_t c0 = band.blocks[bi].first, n = band.blocks[bi].second - c0;
      auto at = [&](int64_t t) { return (b * T + t) * C + c0; };
      // h, ho, nl (-lse): (T,n); A, Bs: (T,n); running sums m, s1, s2: (n).
      std::vector<float> h(T * n), ho(T * n), nl(T * n), A(T * n, 0.0f), Bs(T * n, 0.0f), m(n), s1(n), s2(n);
      for (int64_t t = 0; t < T; ++t)
        for (int64_t c = 0; c < n; ++c) {
          const float sg = sigmoidf(q[at(t) + c]), g = dy[at(t) + c];
          h[t * n + c] = g * sg;
          ho[t * n + c] = g * sg * o[at(t) + c];
          nl[t * n + c] = -lse[at(t) + c];
          dq[at(t) + c] = g * o[at(t) + c] * sg * (1.0f - sg);
        }
      auto far = [&](int64_t s) {  // A_s, B_s += exp(k_s + m) (s1, s2)
        for (int64_t c = 0; c < n; ++c) {
          const float e = exp_fast(k[at(s) + c] + m[c]);
          A[s * n + c] += e * s1[c];
          Bs[s * n + c] += e * s2[c];
        }
      };
      auto reset = [&] {
        std::fill(m.begin(), m.end(), -1e38f);
        std::fill(s1.begin(), s1.end(), 0.0f);
        std::fill(s2.begin(), s2.end(), 0.0f);
      };
      reset();
      for (int64_t s = T - 1; s >= 0; --s) {  // suffix: t >= s + lo + 1
        const int64_t t = s + band.lo + 1;
        if (t >= 0 && t < T) running_add2(m.data(), s1.data(), s2.data(), &nl[t * n], &h[t * n], &ho[t * n], n);
        far(s);
      }
      if (!causal) {
        reset();
        for (int64_t s = 0; s < T; ++s) {  // prefix: t <= s - hi - 1
          const int64_t t = s - band.hi - 1;
          if (t >= 0 && t < T) running_add2(m.data(), s1.data(), s2.data(), &nl[t * n], &h[t * n], &ho[t * n], n);
          far(s);
        }
      }
      for (int64_t t = 0; t < T; ++t) {  // the band, as in the forward
        const int64_t s_lo = std::max<int64_t>(0, t - band.lo);
        const int64_t s_hi = causal ? t : std::min(T - 1, t + band.hi);
        for (int64_t s = s_lo; s <= s_hi; ++s) {
          const float w = band.bias(band.ctx, t, s, bi);
          for (int64_t c = 0; c < n; ++c) {
            const float P = exp_fast(k[at(s) + c] + w + nl[t * n + c]);
            A[s * n + c] += P * h[t * n + c];
            Bs[s * n + c] += P * ho[t * n + c];
          }
        }
      }
      for (int64_t s = 0; s < T; ++s)
        for (int64_t c = 0; c < n; ++c) {
          dv[at(s) + c] = A[s * n + c];
          dk[at(s) + c] = v[at(s) + c] * A[s * n + c] - Bs[s * n + c];
        }
    }
}

void aft_step(float* y, AftState& st, const float* q, const float* k, const float* v, int64_t lo,
              const AftBand& band, std::vector<float>& scratch) {
  const int64_t C = st.C, t = st.pos;
  st.k.insert(st.k.end(), k, k + C);
  st.v.insert(st.v.end(), v, v + C);
  // Ring invariant: st.k holds positions [t - len + 1, t]; those before t - lo leave the band.
  auto retire = [&](int64_t keep) {
    int64_t drop = 0;
    while (st.len() - drop > std::max<int64_t>(keep, 0)) {
      running_add(st.max.data(), st.num.data(), st.den.data(), &st.k[drop * C], &st.v[drop * C], C);
      ++drop;
    }
    st.k.erase(st.k.begin(), st.k.begin() + drop * C);
    st.v.erase(st.v.begin(), st.v.begin() + drop * C);
  };
  retire(lo + 1);
  const int64_t L = st.len(), first = t - L + 1;
  scratch.resize(static_cast<size_t>(3 * C));
  float *M = scratch.data(), *num = M + C, *den = num + C;
  for (int64_t bi = 0; bi < static_cast<int64_t>(band.blocks.size()); ++bi) {
    const int64_t c0 = band.blocks[bi].first, c1 = band.blocks[bi].second;
    for (int64_t c = c0; c < c1; ++c) M[c] = st.max[c];
    for (int64_t i = 0; i < L; ++i) {
      const float w = band.bias(band.ctx, t, first + i, bi);
      for (int64_t c = c0; c < c1; ++c) M[c] = vmax(M[c], st.k[i * C + c] + w);
    }
    for (int64_t c = c0; c < c1; ++c) {
      const float a = exp_fast(st.max[c] - M[c]);
      num[c] = st.num[c] * a;
      den[c] = st.den[c] * a;
    }
    for (int64_t i = 0; i < L; ++i) {
      const float w = band.bias(band.ctx, t, first + i, bi);
      for (int64_t c = c0; c < c1; ++c) {
        const float e = exp_fast(st.k[i * C + c] + w - M[c]);
        num[c] += e * st.v[i * C + c];
        den[c] += e;
      }
    }
  }
  for (int64_t c = 0; c < C; ++c) y[c] = sigmoidf(q[c]) * num[c] / den[c];
  st.pos = t + 1;
  retire(lo);  // keep only the last lo rows: all the next band can reach
}

namespace {

enum class Variant { Full, Local, Simple, Conv };

// What the bias callback reads: w (Tw,Tw) for full/local; u (H,K) for conv.
struct BiasCtx {
  const float* w = nullptr;
  int64_t Tw = 0;
  const float* u = nullptr;
  int64_t K = 0, shift = 0;   // conv: index = t - s + shift
  std::vector<int64_t> head;  // conv: head of each channel block
};

float bias_w(const void* ctx, int64_t t, int64_t s, int64_t) {
  const auto* c = static_cast<const BiasCtx*>(ctx);
  return c->w[t * c->Tw + s];
}
float bias_u(const void* ctx, int64_t t, int64_t s, int64_t bi) {
  const auto* c = static_cast<const BiasCtx*>(ctx);
  return c->u[c->head[bi] * c->K + (t - s + c->shift)];
}
float bias_zero(const void*, int64_t, int64_t, int64_t) { return 0.0f; }

constexpr int64_t kBlock = 256;  // channels per block (aft_simple/full/local; conv: per head): long inner loops
constexpr int64_t kHuge = int64_t(1) << 40;  // "band covers everything" (aft_full)

// Band and bias of one variant for a call; `ctx` must outlive the band.
AftBand make_band(Variant var, const Call& c, BiasCtx& ctx) {
  const int64_t C = c.d("C");
  AftBand band{};
  band.ctx = &ctx;
  auto split = [&](int64_t c0, int64_t c1, int64_t h) {
    for (int64_t x = c0; x < c1; x += kBlock) {
      band.blocks.push_back({x, std::min(c1, x + kBlock)});
      ctx.head.push_back(h);
    }
  };
  switch (var) {
    case Variant::Simple:
      band.lo = -1, band.hi = 0, band.bias = bias_zero;
      split(0, C, 0);
      break;
    case Variant::Full:
      ctx.w = c.t("w").ptr(), ctx.Tw = c.d("Tw");
      band.lo = kHuge, band.hi = c.causal ? 0 : kHuge, band.bias = bias_w;
      split(0, C, 0);
      break;
    case Variant::Local: {
      const int64_t win = c.ip("window");
      ctx.w = c.t("w").ptr(), ctx.Tw = c.d("Tw");
      band.lo = win - 1, band.hi = c.causal ? 0 : win - 1, band.bias = bias_w;
      split(0, C, 0);
      break;
    }
    case Variant::Conv: {
      const int64_t H = c.d("H"), K = c.d("K"), Ch = C / H;
      ctx.u = c.t("u").ptr(), ctx.K = K;
      if (c.causal) band.lo = K - 1, band.hi = 0, ctx.shift = 0;
      else band.lo = band.hi = ctx.shift = (K - 1) / 2;
      band.bias = bias_u;
      for (int64_t h = 0; h < H; ++h) split(h * Ch, (h + 1) * Ch, h);
      break;
    }
  }
  return band;
}

// The reference of one variant, on any scalar (double, or ad::Var for the gradient).
template <class S>
std::vector<S> aft_reference(Variant var, const Call& c, const RefIn<S>& x) {
  const int64_t B = c.d("B"), T = c.d("T"), C = c.d("C");
  ref::AftBias<S> bias;
  bias.causal = c.causal;
  bias.C = C;
  if (var == Variant::Full || var == Variant::Local) {
    bias.w = x.at("w").data(), bias.Tw = c.d("Tw");
    bias.kind = var == Variant::Full ? ref::AftBias<S>::Full : ref::AftBias<S>::Local;
    if (var == Variant::Local) bias.window = c.ip("window");
  } else if (var == Variant::Conv) {
    bias.kind = ref::AftBias<S>::Conv;
    bias.u = x.at("u").data(), bias.H = c.d("H"), bias.K = c.d("K");
  }
  std::vector<S> y(B * T * C);
  ref::aft_ref<S>(y.data(), x.at("q").data(), x.at("k").data(), x.at("v").data(), B, T, C, bias);
  return y;
}

TensorMap aft_parallel(Variant var, const Call& c) {
  const int64_t B = c.d("B"), T = c.d("T"), C = c.d("C");
  BiasCtx ctx;
  const AftBand band = make_band(var, c, ctx);
  Tensor y({B, T, C});
  aft_forward(y.ptr(), c.t("q").ptr(), c.t("k").ptr(), c.t("v").ptr(), B, T, C, c.causal, band);
  return {{"y", std::move(y)}};
}

// Gradient of the band's bias: sum over batch and the block's channels of
// P_ts h_t (v_s - o_t), into dw[t, s] (full, local; rows t are owned by one thread) or
// du[head, t - s + shift] (conv; per-thread partial sums, then reduced).
void aft_bias_grad(float* dbias, int64_t dbias_size, Variant var, const BiasCtx& ctx, const AftBand& band,
                   const float* q, const float* k, const float* v, const float* o, const float* lse, const float* dy,
                   int64_t B, int64_t T, int64_t C, bool causal) {
  std::fill(dbias, dbias + dbias_size, 0.0f);
#pragma omp parallel
  {
    std::vector<double> local(var == Variant::Conv ? dbias_size : 0, 0.0);
#pragma omp for schedule(dynamic)
    for (int64_t t = 0; t < T; ++t) {
      const int64_t s_lo = std::max<int64_t>(0, t - band.lo);
      const int64_t s_hi = causal ? t : std::min(T - 1, t + band.hi);
      for (int64_t s = s_lo; s <= s_hi; ++s)
        for (int64_t bi = 0; bi < static_cast<int64_t>(band.blocks.size()); ++bi) {
          const float w = band.bias(band.ctx, t, s, bi);
          float acc = 0.0f;
          for (int64_t b = 0; b < B; ++b)
            for (int64_t c = band.blocks[bi].first; c < band.blocks[bi].second; ++c) {
              const int64_t it = (b * T + t) * C + c, is = (b * T + s) * C + c;
              const float P = exp_fast(k[is] + w - lse[it]);
              acc += P * dy[it] * sigmoidf(q[it]) * (v[is] - o[it]);
            }
          if (var == Variant::Conv) local[ctx.head[bi] * ctx.K + (t - s + ctx.shift)] += acc;
          else dbias[t * ctx.Tw + s] += acc;
        }
    }
    if (var == Variant::Conv) {
#pragma omp critical
      for (int64_t i = 0; i < dbias_size; ++i) dbias[i] += float(local[i]);
    }
  }
}

TensorMap aft_grad(Variant var, const Call& c, const Tensor& dy) {
  const int64_t B = c.d("B"), T = c.d("T"), C = c.d("C");
  BiasCtx ctx;
  const AftBand band = make_band(var, c, ctx);
  const float *q = c.t("q").ptr(), *k = c.t("k").ptr(), *v = c.t("v").ptr();
  Tensor y({B, T, C}), dq({B, T, C}), dk({B, T, C}), dv({B, T, C});
  std::vector<float> o(B * T * C), lse(B * T * C);  // saved by the forward: O(T C)
  aft_forward(y.ptr(), q, k, v, B, T, C, c.causal, band, o.data(), lse.data());
  aft_backward(dq.ptr(), dk.ptr(), dv.ptr(), q, k, v, o.data(), lse.data(), dy.ptr(), B, T, C, c.causal, band);
  TensorMap out{{"y", std::move(y)}, {"dq", std::move(dq)}, {"dk", std::move(dk)}, {"dv", std::move(dv)}};
  if (var == Variant::Full || var == Variant::Local) {
    Tensor dw(c.t("w").shape);
    aft_bias_grad(dw.ptr(), dw.numel(), var, ctx, band, q, k, v, o.data(), lse.data(), dy.ptr(), B, T, C, c.causal);
    out["dw"] = std::move(dw);
  } else if (var == Variant::Conv) {
    Tensor du(c.t("u").shape);
    aft_bias_grad(du.ptr(), du.numel(), var, ctx, band, q, k, v, o.data(), lse.data(), dy.ptr(), B, T, C, c.causal);
    out["du"] = std::move(du);
  }
  return out;
}

bool has_sums(Variant var) { return var != Variant::Full; }
bool has_ring(Variant var) { return var != Variant::Simple; }

TensorMap aft_recurrent(Variant var, const Call& c) {
  const int64_t B = c.d("B"), T = c.d("T"), C = c.d("C");
  BiasCtx ctx;
  const AftBand band = make_band(var, c, ctx);
  const bool has_state = c.has(has_sums(var) ? "state.num" : "state.k");
  const int64_t L0 = has_state && has_ring(var) ? c.d("L") : 0;
  int64_t pos0 = 0;
  if (has_state && var == Variant::Local) pos0 = static_cast<int64_t>(c.t("state.pos").data[0]);
  if (var == Variant::Full) pos0 = L0;
  Tensor y({B, T, C});
  std::vector<AftState> states(static_cast<size_t>(B));
  std::vector<float> scratch;
  for (int64_t b = 0; b < B; ++b) {
    AftState& st = states[b];
    st.C = C, st.pos = pos0;
    st.num.assign(C, 0.0f), st.den.assign(C, 0.0f), st.max.assign(C, kEmptyMax);
    if (has_state && has_sums(var)) {
      for (auto [name, vec] : {std::pair{"state.num", &st.num}, {"state.den", &st.den}, {"state.max", &st.max}})
        vec->assign(c.t(name).ptr() + b * C, c.t(name).ptr() + (b + 1) * C);
    }
    if (has_state && has_ring(var)) {
      st.k.assign(c.t("state.k").ptr() + b * L0 * C, c.t("state.k").ptr() + (b + 1) * L0 * C);
      st.v.assign(c.t("state.v").ptr() + b * L0 * C, c.t("state.v").ptr() + (b + 1) * L0 * C);
    }
    for (int64_t t = 0; t < T; ++t) {
      const int64_t off = (b * T + t) * C;
      aft_step(y.ptr() + off, st, c.t("q").ptr() + off, c.t("k").ptr() + off, c.t("v").ptr() + off, band.lo, band,
               scratch);
    }
  }
  TensorMap out{{"y", std::move(y)}};
  if (has_sums(var)) {
    Tensor num({B, C}), den({B, C}), mx({B, C});
    for (int64_t b = 0; b < B; ++b) {
      std::copy(states[b].num.begin(), states[b].num.end(), num.ptr() + b * C);
      std::copy(states[b].den.begin(), states[b].den.end(), den.ptr() + b * C);
      std::copy(states[b].max.begin(), states[b].max.end(), mx.ptr() + b * C);
    }
    out["state.num"] = std::move(num), out["state.den"] = std::move(den), out["state.max"] = std::move(mx);
  }
  if (has_ring(var)) {
    const int64_t L = states[0].len();
    Tensor sk({B, L, C}), sv({B, L, C});
    for (int64_t b = 0; b < B; ++b) {
      std::copy(states[b].k.begin(), states[b].k.end(), sk.ptr() + b * L * C);
      std::copy(states[b].v.begin(), states[b].v.end(), sv.ptr() + b * L * C);
    }
    out["state.k"] = std::move(sk), out["state.v"] = std::move(sv);
  }
  if (var == Variant::Local) out["state.pos"] = Tensor({1}, float(states[0].pos));
  return out;
}

MixerSpec aft_spec(Variant var) {
  MixerSpec s;
  s.paper = "Zhai et al. 2021, An Attention Free Transformer";
  s.inputs = {{"q", "B,T,C"}, {"k", "B,T,C"}, {"v", "B,T,C"}};
  const std::vector<TensorSpec> sums = {{"num", "B,C"}, {"den", "B,C"}, {"max", "B,C"}};
  const std::vector<TensorSpec> ring = {{"k", "B,L,C"}, {"v", "B,L,C"}};
  switch (var) {
    case Variant::Full:
      s.name = "aft_full";
      s.summary = "AFT with a learned pairwise position bias w (Tw x Tw)";
      s.inputs.push_back({"w", "Tw,Tw"});
      s.state = ring;
      s.state_size = "all past k, v: 2 L C per sequence (no constant-size state)";
      s.time = "O(T^2 C)";
      s.memory = "O(T C)";
      s.check = [](const Call& c) {
        LINMIX_CHECK(c.d("Tw") >= c.d("T") + (c.has("state.k") ? c.d("L") : 0),
                     "tensor 'w': Tw = " + std::to_string(c.d("Tw")) + " is smaller than the sequence length " +
                         std::to_string(c.d("T") + (c.has("state.k") ? c.d("L") : 0)));
      };
      break;
    case Variant::Local:
      s.name = "aft_local";
      s.summary = "AFT with the position bias used only inside a local window (0 outside)";
      s.inputs.push_back({"w", "Tw,Tw"});
      s.params = {{"window", 0, true, 1, "local window s (|t - s| < s uses w_ts); required"}};
      s.example_params = {{"window", "5"}};
      s.state = sums;
      s.state.insert(s.state.end(), ring.begin(), ring.end());
      s.state.push_back({"pos", "1"});
      s.state_size = "3 C running sums + last window-1 (k, v) rows + position";
      s.time = "O(T window C)";
      s.memory = "O(T C) non-causal (suffix sums), O(window C) causal";
      s.check = [](const Call& c) {
        LINMIX_CHECK(c.given.at("window"), "mixer 'aft_local' needs --param window=N (N >= 1)");
        const int64_t pos = c.has("state.pos") ? static_cast<int64_t>(c.t("state.pos").data[0]) : 0;
        if (c.has("state.pos")) {
          LINMIX_CHECK(c.t("state.pos").data[0] == float(pos) && pos >= 0, "tensor 'state.pos': not a position");
          LINMIX_CHECK(c.d("L") == std::min(pos, c.ip("window") - 1),
                       "tensor 'state.k': expected " + std::to_string(std::min(pos, c.ip("window") - 1)) +
                           " rows for position " + std::to_string(pos) + ", found " + std::to_string(c.d("L")));
        }
        LINMIX_CHECK(c.d("Tw") >= pos + c.d("T"), "tensor 'w': Tw = " + std::to_string(c.d("Tw")) +
                                                      " is smaller than the sequence length " +
                                                      std::to_string(pos + c.d("T")));
      };
      break;
    case Variant::Simple:
      s.name = "aft_simple";
      s.summary = "AFT without position bias: sigma(q) * (softmax over time of k) . v";
      s.state = sums;
      s.state_size = "3 C running sums per sequence";
      s.time = "O(T C)";
      s.memory = "O(T C) non-causal (suffix sums), O(C) causal";
      break;
    case Variant::Conv:
      s.name = "aft_conv";
      s.summary = "AFT with per-head convolution kernels u (H x K) as the local bias";
      s.inputs.push_back({"u", "H,K"});
      s.state = sums;
      s.state.insert(s.state.end(), ring.begin(), ring.end());
      s.state_size = "3 C running sums + last K-1 (k, v) rows";
      s.time = "O(T K C)";
      s.memory = "O(T C) non-causal (suffix sums), O(K C) causal";
      s.check = [](const Call& c) {
        LINMIX_CHECK(c.d("C") % c.d("H") == 0, "tensor 'u': H = " + std::to_string(c.d("H")) +
                                                   " heads must divide C = " + std::to_string(c.d("C")));
        LINMIX_CHECK(c.causal || c.d("K") % 2 == 1, "tensor 'u': non-causal aft_conv needs an odd kernel size K, found " +
                                                        std::to_string(c.d("K")));
        if (c.has("state.k"))
          LINMIX_CHECK(c.d("L") <= c.d("K") - 1, "tensor 'state.k': holds at most K-1 = " + std::to_string(c.d("K") - 1) +
                                                     " rows, found " + std::to_string(c.d("L")));
      };
      break;
  }
  s.y_dims = "B,T,C";
  set_reference(s, [var](const Call& c, const auto& x) { return aft_reference(var, c, x); });
  s.parallel = [var](const Call& c) { return aft_parallel(var, c); };
  s.backward = [var](const Call& c, const Tensor& dy) { return aft_grad(var, c, dy); };
  s.recurrent = [var](const Call& c) { return aft_recurrent(var, c); };
  s.stepper = [var](const Call& c) -> std::function<void(float*)> {
    const int64_t C = c.d("C");
    auto ctx = std::make_shared<BiasCtx>();
    auto band = std::make_shared<AftBand>(make_band(var, c, *ctx));  // band.ctx points into *ctx
    auto st = std::make_shared<AftState>();
    st->C = C, st->num.assign(C, 0.0f), st->den.assign(C, 0.0f), st->max.assign(C, kEmptyMax);
    auto scratch = std::make_shared<std::vector<float>>();
    const float *q = c.t("q").ptr(), *k = c.t("k").ptr(), *v = c.t("v").ptr();
    return [=](float* y) {
      (void)ctx;  // keeps the bias context the band points into alive
      aft_step(y, *st, q, k, v, band->lo, *band, *scratch);
    };
  };
  return s;
}

}  // namespace

MixerSpec aft_full_spec() { return aft_spec(Variant::Full); }
MixerSpec aft_local_spec() { return aft_spec(Variant::Local); }
MixerSpec aft_simple_spec() { return aft_spec(Variant::Simple); }
MixerSpec aft_conv_spec() { return aft_spec(Variant::Conv); }

}  // namespace linmix
