// The banded-sum kernel of the Attention Free Transformer (Zhai et al. 2021), shared by
// aft_full, aft_local, aft_simple and aft_conv (src/mixers/aft_*.cpp):
//   y_t = sigma(q_t) * sum_s exp(k_s + w_ts) v_s / sum_s exp(k_s + w_ts)   (per channel)
// All four variants share one kernel. Position t sees a band [t - lo, t + hi] where the
// bias w_ts may be non-zero, and every other allowed position with w = 0. The far positions
// are summed as running prefix (and, non-causal, suffix) sums, each kept with its own running
// max so no exp overflows or underflows; the band is summed directly. The two sets are
// disjoint, so nothing is ever subtracted (a "global sum minus the band" form would cancel
// catastrophically when the band's k + w dominate). Cost O(T (band + 1) C), extra memory O(T C)
// for the suffix sums (non-causal) and O(band) otherwise.
#include <omp.h>

#include <bit>

#include <optional>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "../mixers/common.h"
#include "linear_product.h"
#include "vmath.h"
#include "linmix/kernels.h"

namespace linmix {

namespace {

// Stands in for -inf as the max of an empty running sum so that saved states stay finite
// (MIXERS.md uses the same convention, p = -1e38, for RWKV).
constexpr float kEmptyMax = kAftEmptyMax;

// One channel: adds exp(x) * val to the running sum (num, den) kept scaled by exp(-m).
[[gnu::always_inline]] inline void running_step(float& m, float& num, float& den, float x, float val) {
  const float mn = vmax(m, x);
  float a, e;
  exp_pair(m, x, a, e);  // e^{m - mn}, e^{x - mn}
  num = num * a + e * val;
  den = den * a + e;
  m = mn;
}

// Adds exp(x) * val to the running sum (num, den) kept scaled by exp(-m), per channel.
inline void running_add(float* __restrict m, float* __restrict num, float* __restrict den, const float* __restrict x,
                        const float* __restrict val, int64_t n) {
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) running_step(m[c], num[c], den[c], x[c], val[c]);
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

// A row of outputs written once and not read back here (y, dq, dk, dv): whole aligned cache
// lines go out as streamed stores, not read for ownership first (16 MiB of rows at T = 4096,
// C 512 in a forward + backward); each task ends with an sfence.
inline void put_row(float* __restrict dst, const float* __restrict src, int64_t n) {
#if defined(__AVX2__)
  if (n % 16 == 0 && reinterpret_cast<uintptr_t>(dst) % 64 == 0) {
    for (int64_t c = 0; c < n; c += 8) _mm256_stream_ps(dst + c, _mm256_loadu_ps(src + c));
    return;
  }
#endif
  std::copy(src, src + n, dst);
}
inline void end_streams() {
#if defined(__AVX2__)
  _mm_sfence();
#endif
}

// The factored band's operands (AftBand::diagonal: aft_conv; AftBand::factor_rows: aft_local),
// the same for the forward and the backward: for a block of rows [t0, t0 + rows) its key window
// [w0, w1) (its rows' bands together), kap (n) the window's largest k per channel, Pk = e^{k - kap}
// and PV = Pk v (window x n), and Wt (rows x window) = e^{w_ts - omr_t} inside each row's band,
// 0 outside. omr_t is the largest bias of the diagonal band (one for every row: Wt's entries from
// ew = e^{w - om}, taken once) or, for a bias of any (t, s), the largest of row t's own band. kb,
// vb: the channel block's row 0, rows ld floats apart.
struct BandFactors {
  const AftBand* band = nullptr;
  const float* dg = nullptr;  // diagonal: the block's biases, dg[t - s + hi]; null: band->bias
  bool causal = false;
  int64_t bi = 0, n = 0, w0 = 0, w1 = 0;
  float om = kEmptyMax;
  std::vector<float> ew, kap, Pk, PV, Wt, omr;
  // whether band (for channel block bi) takes the factored form, and if so the buffers ready
  bool init(const AftBand& b, int64_t block, int64_t width, bool is_causal) {
    if ((b.diagonal == nullptr && !b.factor_rows) || b.lo < 0 || b.lo + b.hi < 1) return false;
    band = &b, causal = is_causal, n = width, bi = block, dg = b.diagonal ? b.diagonal(b.ctx, bi) : nullptr;
    const int64_t nb = b.lo + b.hi + 1, win = kAftRows + nb - 1;
    if (dg) {
      om = kEmptyMax;
      for (int64_t d = 0; d < nb; ++d) om = vmax(om, dg[d]);
      ew.resize(size_t(nb));
      for (int64_t d = 0; d < nb; ++d) ew[size_t(d)] = exp_fast(dg[d] - om);
    }
    kap.resize(size_t(n)), Pk.resize(size_t(win * n)), PV.resize(size_t(win * n)), Wt.resize(size_t(kAftRows * win));
    omr.resize(size_t(kAftRows));
    return true;
  }
  float bias(int64_t t, int64_t s) const { return dg ? dg[t - s + band->hi] : band->bias(band->ctx, t, s, bi); }
  int64_t window() const { return w1 - w0; }
  void block(const float* kb, const float* vb, int64_t ld, int64_t T, int64_t t0, int64_t rows) {
    w0 = std::max<int64_t>(0, t0 - band->lo), w1 = std::min(T, t0 + rows + (causal ? 0 : band->hi));
    const int64_t W = w1 - w0;
    float* kp = kap.data();
    std::fill(kp, kp + n, kEmptyMax);
    for (int64_t s = w0; s < w1; ++s) {
      const float* ks = kb + s * ld;
#pragma omp simd
      for (int64_t c = 0; c < n; ++c) kp[c] = vmax(kp[c], ks[c]);
    }
    for (int64_t s = w0; s < w1; ++s) {
      const float *ks = kb + s * ld, *vs = vb + s * ld;
      float *pk = Pk.data() + (s - w0) * n, *pv = PV.data() + (s - w0) * n;
#pragma omp simd
      for (int64_t c = 0; c < n; ++c) pk[c] = exp_fast(ks[c] - kp[c]), pv[c] = pk[c] * vs[c];
    }
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t t = t0 + i;  // row t's band in the window: s in [a, e)
      const int64_t a = std::max(w0, t - band->lo), e = std::min(w1, causal ? t + 1 : t + band->hi + 1);
      float* wt = Wt.data() + i * W;
      std::fill(wt, wt + (a - w0), 0.0f);
      std::fill(wt + (e - w0), wt + W, 0.0f);
      if (dg) {
        omr[size_t(i)] = om;
        for (int64_t s = a; s < e; ++s) wt[s - w0] = ew[size_t(t - s + band->hi)];
        continue;
      }
      float m = kEmptyMax;
      for (int64_t s = a; s < e; ++s) wt[s - w0] = band->bias(band->ctx, t, s, bi), m = vmax(m, wt[s - w0]);
      omr[size_t(i)] = m;
      float* __restrict r = wt + (a - w0);
#pragma omp simd
      for (int64_t j = 0; j < e - a; ++j) r[j] = exp_fast(r[j] - m);
    }
  }
};

// The forward of one (batch row b, channel block bi) task, row by row: every row t takes the
// prefix sums (and, non-causal, the suffix sums) of the positions outside its band and the band's
// own terms (factored: from the current row block's GEMMs, factor_block). aft_forward runs it
// over every row; the fused forward + backward (aft_forward_backward) row block by row block,
// sharing the block's factors with the backward's band.
struct ForwardRows {
  const float *q, *k, *v;
  float* y;
  int64_t b, bi, T, C, c0, n;
  bool causal;
  const AftBand& band;
  AftSumsIO* sums;
  // Prefix sums over s < band start: pm, pn, pd (n). Suffix sums (non-causal) over s >= j,
  // for every j: sm, sn, sd (T+1, n). M, num, den (n): per-row work; wb: band biases.
  std::vector<float> pm, pn, pd, M, num, den, yr, wb, sm, sn, sd;
  // The factored band (band.diagonal: aft_conv; band.factor_rows: aft_local): rows in blocks
  // of kAftRows. A block's key rows [w0, w1) (its rows' bands together), kap (n) their largest
  // k per channel, P = e^{k - kap} and P v (window x n), Wt (rows x window) = e^{w_ts - om_t}
  // inside the band and 0 outside (om_t: the largest bias of the band, or of row t's own), then
  // NUM = Wt (P v) and DEN = Wt P: two GEMMs in place of an exp per (t, s, c). Row t's band
  // terms are e^{kap + om_t} (NUM, DEN); where a row's DEN falls below 2^-64 (its band far
  // below the block's largest k and bias: terms may have underflowed) that (t, c) is summed
  // exactly, as the direct form does.
  BandFactors& bf;
  std::vector<float>&NUM, &DEN;
  bool fact = false;
  int64_t blk = -1;   // the current row block's start
  int64_t next = 0;   // next position to move into the prefix sums

  ForwardRows(const float* q_, const float* k_, const float* v_, float* y_, int64_t b_, int64_t bi_, int64_t T_,
              int64_t C_, bool causal_, const AftBand& band_, AftSumsIO* sums_, BandFactors& bf_,
              std::vector<float>& NUM_, std::vector<float>& DEN_)
      : q(q_), k(k_), v(v_), y(y_), b(b_), bi(bi_), T(T_), C(C_), c0(band_.blocks[bi_].first),
        n(band_.blocks[bi_].second - c0), causal(causal_), band(band_), sums(sums_), bf(bf_), NUM(NUM_), DEN(DEN_) {
    pm.assign(n, kEmptyMax), pn.assign(n, 0.0f), pd.assign(n, 0.0f), M.resize(n), num.resize(n), den.resize(n), yr.resize(n);
    if (causal && sums && sums->num0) {  // the prefix sums start from the initial state
      const int64_t o0 = b * C + c0;
      std::copy(sums->max0 + o0, sums->max0 + o0 + n, pm.data());
      std::copy(sums->num0 + o0, sums->num0 + o0 + n, pn.data());
      std::copy(sums->den0 + o0, sums->den0 + o0 + n, pd.data());
    }
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
    fact = bf.init(band, bi, n, causal);
    if (fact) NUM.resize(size_t(kAftRows * n)), DEN.resize(size_t(kAftRows * n));
  }
  const float* row(const float* x, int64_t t) const { return x + (b * T + t) * C + c0; }

  void factor_block(int64_t t0) {
    const int64_t rows = std::min(kAftRows, T - t0);
    bf.block(row(k, 0), row(v, 0), C, T, t0, rows);
    const int64_t W = bf.window();
    gemm_nn(NUM.data(), bf.Wt.data(), bf.PV.data(), rows, n, W, W, n, n, 1.0f, 0.0f);
    gemm_nn(DEN.data(), bf.Wt.data(), bf.Pk.data(), rows, n, W, W, n, n, 1.0f, 0.0f);
    blk = t0;
  }

  // Row t: y's row, and with o_row (n floats) o = num / den and lse = log(sum_s exp(k_s + w_ts))
  // (the backward's), each written at their pointer's row.
  void forward_row(int64_t t, float* o_row, float* lse_row) {
    float *__restrict pM = M.data(), *__restrict pnum = num.data(), *__restrict pden = den.data();
    float *__restrict ppm = pm.data(), *__restrict ppn = pn.data(), *__restrict ppd = pd.data();
    const float* kap = bf.kap.data();
    if (C > n && t + kPrefetchRows < T) {  // a block's rows are C floats apart (common.h)
      const int64_t ta = t + kPrefetchRows;
      prefetch_floats(row(k, ta), n), prefetch_floats(row(v, ta), n), prefetch_floats(row(q, ta), n);
      prefetch_floats<true>(y + (b * T + ta) * C + c0, n);
    }
    const int64_t s_lo = std::max<int64_t>(0, t - band.lo);
    const int64_t s_hi = causal ? t : std::min(T - 1, t + band.hi);  // band is [s_lo, s_hi]
    const int64_t prefix_end = std::min(s_lo, causal ? t + 1 : T);
    for (; next < prefix_end; ++next) running_add(ppm, ppn, ppd, row(k, next), row(v, next), n);
    const int64_t suf = causal ? T : std::max(s_hi + 1, s_lo);  // suffix starts after the band
    std::copy(ppm, ppm + n, pM);
    if (!causal)
      for (int64_t c = 0; c < n; ++c) pM[c] = vmax(pM[c], sm[suf * n + c]);
    // the band's biases, where the direct form reads them (factored: only for a fallback)
    auto band_biases = [&] {
      wb.resize(static_cast<size_t>(std::max<int64_t>(0, s_hi - s_lo + 1)));
      for (int64_t s = s_lo; s <= s_hi; ++s) wb[s - s_lo] = fact ? bf.bias(t, s) : band.bias(band.ctx, t, s, bi);
    };
    if (!fact) band_biases();
    const float om = fact ? bf.omr[size_t(t - blk)] : 0.0f;  // row t's bias scale
    if (fact) {  // the band's terms are at most e^{kap + om}
      for (int64_t c = 0; c < n; ++c) pM[c] = vmax(pM[c], kap[c] + om);
    } else {
      for (int64_t s = s_lo; s <= s_hi; ++s) {
        const float w = wb[s - s_lo];
        const float* ks = row(k, s);
        for (int64_t c = 0; c < n; ++c) pM[c] = vmax(pM[c], ks[c] + w);
      }
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
    if (fact) {
      const float *NUMt = NUM.data() + (t - blk) * n, *DENt = DEN.data() + (t - blk) * n;
      // every channel through the GEMMs' sums in one vectorised pass (with the exact fallback
      // in its body the loop compiled to scalar code: ~20% of aft_conv's forward), then the
      // rare channels whose DEN fell below 2^-64 (or is not a number) summed again exactly
      uint32_t exact = 0;
      for (int64_t c = 0; c < n; ++c) {
        const float a = exp_fast(kap[c] + om - pM[c]);
        pnum[c] += NUMt[c] * a;
        pden[c] += DENt[c] * a;
        exact |= uint32_t(!(DENt[c] >= 0x1p-64f));
      }
      if (exact) band_biases();
      for (int64_t c = 0; exact && c < n; ++c) {
        if (DENt[c] >= 0x1p-64f) continue;
        // exactly, as the direct form: the max over the far sums' and the band's own terms
        float mx = ppm[c];
        if (!causal) mx = vmax(mx, sm[suf * n + c]);
        for (int64_t s = s_lo; s <= s_hi; ++s) mx = vmax(mx, row(k, s)[c] + wb[s - s_lo]);
        float nu = ppn[c] * exp_fast(ppm[c] - mx), de = ppd[c] * exp_fast(ppm[c] - mx);
        if (!causal) {
          const float a = exp_fast(sm[suf * n + c] - mx);
          nu += sn[suf * n + c] * a, de += sd[suf * n + c] * a;
        }
        for (int64_t s = s_lo; s <= s_hi; ++s) {
          const float e = exp_fast(row(k, s)[c] + wb[s - s_lo] - mx);
          nu += e * row(v, s)[c], de += e;
        }
        pM[c] = mx, pnum[c] = nu, pden[c] = de;
      }
    } else {
      for (int64_t s = s_lo; s <= s_hi; ++s) {
        const float w = wb[s - s_lo];
        const float *ks = row(k, s), *vs = row(v, s);
        for (int64_t c = 0; c < n; ++c) {
          const float e = exp_fast(ks[c] + w - pM[c]);
          pnum[c] += e * vs[c];
          pden[c] += e;
        }
      }
    }
    const float* __restrict qt = row(q, t);
    float* __restrict yt = yr.data();
    for (int64_t c = 0; c < n; ++c) yt[c] = sigmoidf(qt[c]) * pnum[c] / pden[c];
    put_row(y + (b * T + t) * C + c0, yt, n);
    if (o_row)  // saved for backward: o = num / den and lse = log(sum_s exp(k_s + w_ts))
      for (int64_t c = 0; c < n; ++c) {
        o_row[c] = pnum[c] / pden[c];
        lse_row[c] = pM[c] + log_fast(pden[c]);
      }
  }

  // The final state: the sums over what left the band
  void finish() {
    if (!(causal && sums && sums->numT)) return;
    const int64_t end = T - std::min(T, std::max<int64_t>(band.lo, 0));
    for (; next < end; ++next) running_add(pm.data(), pn.data(), pd.data(), row(k, next), row(v, next), n);
    const int64_t o0 = b * C + c0;
    std::copy(pm.begin(), pm.end(), sums->maxT + o0);
    std::copy(pn.begin(), pn.end(), sums->numT + o0);
    std::copy(pd.begin(), pd.end(), sums->denT + o0);
  }
};

}  // namespace

namespace {

// aft_simple's causal forward (no band: the running sums alone), one pass over a row: the sums'
// update, y and the check of the row's values together, where ForwardRows::forward_row took
// seven (the sums, their copies for the band's scale, y into a staging row, the check) over its
// channel block's n floats. The sums as that path updates them; y with one division, sigma(q)
// nu / de = nu / (de (1 + e^-q)) (within an ulp of the two divisions: measured 6% of the
// forward).
void simple_rows(float* y, const float* q, const float* k, const float* v, int64_t b, int64_t T, int64_t C,
                 int64_t c0, int64_t n, AftSumsIO* sums, uint32_t* bad) {
  thread_local std::vector<float> buf;
  buf.resize(size_t(4 * n));
  float *__restrict pm = buf.data(), *__restrict pn = pm + n, *__restrict pd = pn + n, *__restrict yr = pd + n;
  const int64_t o0 = b * C + c0;
  if (sums && sums->num0) {  // the sums start from the initial state
    std::copy(sums->max0 + o0, sums->max0 + o0 + n, pm);
    std::copy(sums->num0 + o0, sums->num0 + o0 + n, pn);
    std::copy(sums->den0 + o0, sums->den0 + o0 + n, pd);
  } else {
    std::fill(pm, pm + n, kEmptyMax), std::fill(pn, pn + 2 * n, 0.0f);
  }
  uint32_t nonfinite = 0;
  for (int64_t t = 0; t < T; ++t) {
    const int64_t at = (b * T + t) * C + c0;
    if (C > n && t + kPrefetchRows < T) {  // a block's rows are C floats apart (common.h)
      const int64_t ta = at + kPrefetchRows * C;
      prefetch_floats(k + ta, n), prefetch_floats(v + ta, n), prefetch_floats(q + ta, n);
      prefetch_floats<true>(y + ta, n);
    }
    const float *__restrict qt = q + at, *__restrict kt = k + at, *__restrict vt = v + at;
#pragma omp simd reduction(| : nonfinite)
    for (int64_t c = 0; c < n; ++c) {
      running_step(pm[c], pn[c], pd[c], kt[c], vt[c]);
      yr[c] = pn[c] / (pd[c] * (1.0f + exp_fast(-qt[c])));  // sigma(q) nu / de, one division
      nonfinite |= nonfinite_bits(qt[c]) | nonfinite_bits(kt[c]) | nonfinite_bits(vt[c]);
    }
    put_row(y + at, yr, n);
  }
  if (bad && nonfinite) __atomic_fetch_or(bad, 1u, __ATOMIC_RELAXED);
  if (sums && sums->numT) {
    std::copy(pm, pm + n, sums->maxT + o0);
    std::copy(pn, pn + n, sums->numT + o0);
    std::copy(pd, pd + n, sums->denT + o0);
  }
}

}  // namespace

void aft_forward(float* y, const float* q, const float* k, const float* v, int64_t B, int64_t T, int64_t C,
                 bool causal, const AftBand& band, float* o_out, float* lse_out, AftSumsIO* sums, uint32_t* bad) {
  const int64_t nblocks = static_cast<int64_t>(band.blocks.size());
  if (causal && band.lo < 0 && !o_out) {  // aft_simple's inference forward
#pragma omp parallel for collapse(2) schedule(dynamic)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t bi = 0; bi < nblocks; ++bi) {
        const int64_t c0 = band.blocks[bi].first;
        simple_rows(y, q, k, v, b, T, C, c0, band.blocks[bi].second - c0, sums, bad);
        end_streams();
      }
    return;
  }
#pragma omp parallel for collapse(2) schedule(dynamic)
  for (int64_t b = 0; b < B; ++b)
    for (int64_t bi = 0; bi < nblocks; ++bi) {
      thread_local BandFactors bf;
      thread_local std::vector<float> NUM, DEN;
      ForwardRows fr(q, k, v, y, b, bi, T, C, causal, band, sums, bf, NUM, DEN);
      uint32_t nonfinite = 0;
      for (int64_t t = 0; t < T; ++t) {
        if (fr.fact && t % kAftRows == 0) fr.factor_block(t);
        const int64_t at = (b * T + t) * C + fr.c0;
        fr.forward_row(t, o_out ? o_out + at : nullptr, o_out ? lse_out + at : nullptr);
        if (bad) {  // row t of q, k, v, which the row has just read (the band's newest, or the prefix's)
          const float *qt = q + at, *kt = k + at, *vt = v + at;
#pragma omp simd reduction(| : nonfinite)
          for (int64_t c = 0; c < fr.n; ++c)
            nonfinite |= nonfinite_bits(qt[c]) | nonfinite_bits(kt[c]) | nonfinite_bits(vt[c]);
        }
      }
      if (nonfinite) __atomic_fetch_or(bad, 1u, __ATOMIC_RELAXED);
      fr.finish();
      end_streams();
    }
}

namespace {

// Whether a band takes the factored form (BandFactors::init's test)
bool factored(const AftBand& b) { return (b.diagonal != nullptr || b.factor_rows) && b.lo >= 0 && b.lo + b.hi >= 1; }

// aft_backward, and with y (o = lse = null, a factored band, no sums) the fused forward +
// backward: each row block's forward rows (ForwardRows) give o and lse of its rows, which the
// block's band backward uses at once with the same factors; o and lse never leave the task.
void backward_impl(float* y, float* dq, float* dk, float* dv, const float* q, const float* k, const float* v,
                   const float* o, const float* lse, const float* dy, int64_t B, int64_t T, int64_t C, bool causal,
                   const AftBand& band, const AftSumsIO* sums, const AftBiasGrad* bias_grad) {
  const bool fused = y != nullptr;
  // With h_t = dy_t sigma(q_t) and P_ts = exp(k_s + w_ts - lse_t):
  //   dq_t = dy_t o_t sigma'(q_t),  dv_s = sum_t P_ts h_t = A_s,
  //   dk_s = sum_t P_ts h_t (v_s - o_t) = v_s A_s - B_s,  B_s = sum_t P_ts h_t o_t.
  // The sums over t run over the transposed sets: the band t in [s - hi, s + lo] directly, the
  // far positions as running sums of exp(-lse_t) (h_t, h_t o_t) with their own running max:
  // t >= s + lo + 1 (a suffix), and non-causal also t <= s - hi - 1 (a prefix).
  const int64_t nblocks = static_cast<int64_t>(band.blocks.size());
  if (bias_grad) std::fill(bias_grad->out, bias_grad->out + bias_grad->size, 0.0f);
  // Every thread's buffers, taken here on the calling thread in one piece (each written before it
  // is read: no zeroing pass): per thread h, ho, nl (-lse): (T,n) (no band: one row); A, Bs: (T,n)
  // (no band: none); and its bias sums (doubles). (Taken inside the region, on the workers' own
  // malloc arenas, which hand large blocks back to the kernel when freed, they faulted again in
  // every call.)
  const bool scan = causal && band.lo < 0;
  int64_t nmax = 0;
  for (const auto& blk : band.blocks) nmax = std::max(nmax, blk.second - blk.first);
  const int64_t rows = scan ? 1 : T, per = nmax * (3 * rows + (scan ? 0 : 2 * T));
  const int nth = omp_get_max_threads();
  const int64_t nbias = bias_grad ? bias_grad->size : 0;
  // (ordinary pages: on huge ones a fresh buffer's faults may wait on the kernel's compaction)
  const std::unique_ptr<float[]> work(new float[size_t(std::max<int64_t>(1, per * nth))]);
  const std::unique_ptr<double[]> parts(new double[size_t(std::max<int64_t>(1, nbias * nth))]);
#pragma omp parallel
  {
  double* part = parts.get() + nbias * omp_get_thread_num();  // this thread's bias sums
  std::fill(part, part + nbias, 0.0);
  float* mine = work.get() + per * omp_get_thread_num();
#pragma omp for collapse(2) schedule(dynamic)
  for (int64_t b = 0; b < B; ++b)
    for (int64_t bi = 0; bi < nblocks; ++bi) {
      const int64_t c0 = band.blocks[bi].first, n = band.blocks[bi].second - c0;
      auto at = [&](int64_t t) { return (b * T + t) * C + c0; };
      // No band (aft_simple): every t >= s reaches s through the far sums, so one sweep from the
      // end forms h, ho, nl of row s, adds them to the running sums and writes row s's gradients;
      // nothing (T,n) is stored.
      float *h = mine, *ho = h + rows * n, *nl = ho + rows * n, *A = nl + rows * n, *Bs = A + T * n;
      std::vector<float> m(n), s1(n), s2(n), rowbuf(2 * n);  // running sums; a row's outputs
      auto reset = [&] {
        std::fill(m.begin(), m.end(), -1e38f);
        std::fill(s1.begin(), s1.end(), 0.0f);
        std::fill(s2.begin(), s2.end(), 0.0f);
      };
      if (scan) {
        reset();
        float *__restrict ph = h, *__restrict pho = ho, *__restrict pnl = nl;
        for (int64_t s = T - 1; s >= 0; --s) {
          const float *__restrict qs = q + at(s), *__restrict gs = dy + at(s), *__restrict os = o + at(s);
          const float *__restrict ls = lse + at(s), *__restrict ks = k + at(s), *__restrict vs = v + at(s);
          float *__restrict dqs = dq + at(s), *__restrict dks = dk + at(s), *__restrict dvs = dv + at(s);
#pragma omp simd
          for (int64_t c = 0; c < n; ++c) {
            const float sg = sigmoidf(qs[c]), g = gs[c];
            ph[c] = g * sg, pho[c] = g * sg * os[c], pnl[c] = -ls[c];
            dqs[c] = g * os[c] * sg * (1.0f - sg);
          }
          running_add2(m.data(), s1.data(), s2.data(), pnl, ph, pho, n);
          const float *__restrict pm = m.data(), *__restrict ps1 = s1.data(), *__restrict ps2 = s2.data();
#pragma omp simd
          for (int64_t c = 0; c < n; ++c) {
            const float e = exp_fast(ks[c] + pm[c]);
            dvs[c] = e * ps1[c];
            dks[c] = vs[c] * e * ps1[c] - e * ps2[c];
          }
        }
      }
      // h, ho, nl and dq of row t from its o and lse
      auto grad_row = [&](int64_t t, const float* __restrict ot, const float* __restrict lt) {
        const float *__restrict qt = q + at(t), *__restrict gt = dy + at(t);
        float *__restrict ht = h + t * n, *__restrict hot = ho + t * n, *__restrict nlt = nl + t * n,
                          *__restrict dqt = rowbuf.data();
#pragma omp simd
        for (int64_t c = 0; c < n; ++c) {
          const float sg = sigmoidf(qt[c]), g = gt[c];
          ht[c] = g * sg, hot[c] = g * sg * ot[c], nlt[c] = -lt[c];
          dqt[c] = g * ot[c] * sg * (1.0f - sg);
        }
        put_row(dq + at(t), dqt, n);
      };
      if (!fused)  // (through restrict rows: the indexed form was scalar)
        for (int64_t t = 0; t < T && !scan; ++t) grad_row(t, o + at(t), lse + at(t));
      // The band first (its rows of A and Bs set where they first appear), then the far sums
      // added: every row of A and Bs is in some row block's key window.
      // The band factored as in the forward (BandFactors): P_ts = e^{k_s - kap} e^{w_ts - om_t}
      // e^{kap + om_t - lse_t} for a block of rows t and its key window s, so A_s += Pk_s o (Wt^T (F h))_s
      // and B_s alike with F h o (two GEMMs); the bias's gradient sum_c P_ts (h_t v_s - (h o)_t) is
      // Wt o ((F h) (Pk v)^T - (F h o) Pk^T). A (t, c) with kap + om_t - lse_t > 20 (F past e^20: terms
      // whose Pk underflowed could matter) takes the direct form instead, its F set to 0.
      thread_local BandFactors bf;
      const bool fact = !scan && bf.init(band, bi, n, causal);
      if (!fact && !scan) std::fill(A, A + 2 * T * n, 0.0f);  // A, Bs (adjacent): summed into below
      if (fact) {
        const int64_t win = kAftRows + band.lo + band.hi;
        const float *kp = bf.kap.data(), *Pk = bf.Pk.data(), *PkV = bf.PV.data(), *Wt = bf.Wt.data();
        thread_local std::vector<float> FH, FHO, GA, GB, G1, G2;
        thread_local std::vector<int64_t> slow;  // (t, c) of the direct form, as t n + c
        FH.resize(size_t(kAftRows * n)), FHO.resize(size_t(kAftRows * n)), GA.resize(size_t(win * n));
        GB.resize(size_t(win * n));
        if (bias_grad) G1.resize(size_t(kAftRows * win)), G2.resize(size_t(kAftRows * win));
        // fused: the task's forward, a row block at a time, its rows' o and lse in ob, lb
        thread_local std::vector<float> NUM, DEN, ob, lb;
        std::optional<ForwardRows> fr;
        if (fused) fr.emplace(q, k, v, y, b, bi, T, C, causal, band, nullptr, bf, NUM, DEN);
        if (fused) ob.resize(size_t(kAftRows * n)), lb.resize(size_t(kAftRows * n));
        int64_t fresh = 0;  // the rows of A and Bs from here on are not set yet
        for (int64_t t0 = 0; t0 < T; t0 += kAftRows) {
          const int64_t nr = std::min(kAftRows, T - t0);
          if (fused) {
            fr->factor_block(t0);  // bf.block and the forward's GEMMs
            for (int64_t i = 0; i < nr; ++i) {
              fr->forward_row(t0 + i, ob.data() + i * n, lb.data() + i * n);
              grad_row(t0 + i, ob.data() + i * n, lb.data() + i * n);
            }
          } else {
            bf.block(k + at(0), v + at(0), C, T, t0, nr);
          }
          const int64_t w0 = bf.w0, w1 = bf.w1, W = bf.window();
          if (w1 > fresh) std::fill(A + fresh * n, A + w1 * n, 0.0f), std::fill(Bs + fresh * n, Bs + w1 * n, 0.0f);
          fresh = std::max(fresh, w1);
          slow.clear();
          for (int64_t i = 0; i < nr; ++i) {  // (the push in the loop's body kept it scalar)
            const int64_t t = t0 + i;
            const float *nlt = nl + t * n, *ht = h + t * n, *hot = ho + t * n;
            float *fh = FH.data() + i * n, *fho = FHO.data() + i * n;
            const float om = bf.omr[size_t(i)];
            uint32_t any = 0;
            for (int64_t c = 0; c < n; ++c) {
              const float x = kp[c] + om + nlt[c];  // kap + om - lse_t
              const bool direct = !(x <= 20.0f);
              const float F = direct ? 0.0f : exp_fast(x);
              fh[c] = F * ht[c], fho[c] = F * hot[c];
              any |= uint32_t(direct);
            }
            for (int64_t c = 0; any && c < n; ++c)
              if (!(kp[c] + om + nlt[c] <= 20.0f)) slow.push_back(t * n + c);
          }
          gemm_tn(GA.data(), Wt, FH.data(), W, n, nr, W, n, n, 1.0f, 0.0f);
          gemm_tn(GB.data(), Wt, FHO.data(), W, n, nr, W, n, n, 1.0f, 0.0f);
          for (int64_t s = w0; s < w1; ++s) {
            const float *pk = Pk + (s - w0) * n, *ga = GA.data() + (s - w0) * n, *gb = GB.data() + (s - w0) * n;
            float *As = &A[s * n], *Bss = &Bs[s * n];
#pragma omp simd
            for (int64_t c = 0; c < n; ++c) As[c] += pk[c] * ga[c], Bss[c] += pk[c] * gb[c];
          }
          if (bias_grad) {
            gemm_nt(G1.data(), FH.data(), PkV, nr, W, n, n, n, W, 1.0f, 0.0f);
            gemm_nt(G2.data(), FHO.data(), Pk, nr, W, n, n, n, W, 1.0f, 0.0f);
            for (int64_t i = 0; i < nr; ++i) {  // row t's band [a, e): slots affine in s
              const int64_t t = t0 + i, a = std::max(w0, t - band.lo), e = std::min(w1, causal ? t + 1 : t + band.hi + 1);
              const int64_t base = bias_grad->slot(bias_grad->ctx, t, a, bi);
              const int64_t step = e - a > 1 ? bias_grad->slot(bias_grad->ctx, t, a + 1, bi) - base : 0;
              const float *wt = Wt + i * W - w0, *g1 = G1.data() + i * W - w0, *g2 = G2.data() + i * W - w0;
              double* pt = part + base;
              for (int64_t s = a; s < e; ++s) pt[(s - a) * step] += wt[s] * (g1[s] - g2[s]);
            }
          }
          for (const int64_t tc : slow) {  // the direct form for these (t, c)
            const int64_t t = tc / n, c = tc % n;
            const int64_t s_lo = std::max<int64_t>(0, t - band.lo), s_hi = causal ? t : std::min(T - 1, t + band.hi);
            for (int64_t s = s_lo; s <= s_hi; ++s) {
              const float P = exp_fast(k[at(s) + c] + bf.bias(t, s) + nl[t * n + c]);
              A[s * n + c] += P * h[t * n + c];
              Bs[s * n + c] += P * ho[t * n + c];
              if (bias_grad)
                part[bias_grad->slot(bias_grad->ctx, t, s, bi)] += P * (h[t * n + c] * v[at(s) + c] - ho[t * n + c]);
            }
          }
        }
      }
      for (int64_t t = 0; t < T && !scan && !fact; ++t) {  // the band, as in the forward
        const int64_t s_lo = std::max<int64_t>(0, t - band.lo);
        const int64_t s_hi = causal ? t : std::min(T - 1, t + band.hi);
        const float *__restrict ht = &h[t * n], *__restrict hot = &ho[t * n], *__restrict nlt = &nl[t * n];
        for (int64_t s = s_lo; s <= s_hi; ++s) {
          const float w = band.bias(band.ctx, t, s, bi);
          const float *__restrict ks = k + at(s), *__restrict vs = v + at(s);
          float *__restrict As = &A[s * n], *__restrict Bss = &Bs[s * n];
          if (!bias_grad) {
#pragma omp simd
            for (int64_t c = 0; c < n; ++c) {
              const float P = exp_fast(ks[c] + w + nlt[c]);
              As[c] += P * ht[c];
              Bss[c] += P * hot[c];
            }
          } else {  // and the bias's gradient: P_ts h_t (v_s - o_t) = P (h_t v_s - (h o)_t)
            float g = 0.0f;
#pragma omp simd reduction(+ : g)
            for (int64_t c = 0; c < n; ++c) {
              const float P = exp_fast(ks[c] + w + nlt[c]);
              As[c] += P * ht[c];
              Bss[c] += P * hot[c];
              g += P * (ht[c] * vs[c] - hot[c]);
            }
            part[bias_grad->slot(bias_grad->ctx, t, s, bi)] += g;
          }
        }
      }
      auto far = [&](int64_t s) {  // A_s, B_s += exp(k_s + m) (s1, s2)
        const float *__restrict ks = k + at(s), *__restrict pm = m.data(), *__restrict p1 = s1.data(),
                    *__restrict p2 = s2.data();
        float *__restrict As = &A[size_t(s * n)], *__restrict Bss = &Bs[size_t(s * n)];
#pragma omp simd
        for (int64_t c = 0; c < n; ++c) {
          const float e = exp_fast(ks[c] + pm[c]);
          As[c] += e * p1[c], Bss[c] += e * p2[c];
        }
      };
      if (!scan) reset();
      for (int64_t s = T - 1; s >= 0 && !scan; --s) {  // suffix: t >= s + lo + 1
        const int64_t t = s + band.lo + 1;
        if (t >= 0 && t < T) running_add2(m.data(), s1.data(), s2.data(), &nl[t * n], &h[t * n], &ho[t * n], n);
        far(s);
      }
      const int64_t o0 = b * C + c0;
      const bool init = causal && sums && sums->num0 && sums->dnum0;
      if (init) {
        // The initial sums are far from every t (a position before 0 outside every band): with
        // N0 = num0 e^{max0}, D0 = den0 e^{max0} in every numerator and denominator,
        // dN0 = sum_t e^{-lse_t} h_t, dD0 = -sum_t e^{-lse_t} h_t o_t; the suffix sums above hold
        // t >= lo + 1, the rest of t joins them here.
        for (int64_t t = std::min(T, band.lo + 1); t-- > 0;)
          running_add2(m.data(), s1.data(), s2.data(), &nl[t * n], &h[t * n], &ho[t * n], n);
        for (int64_t c = 0; c < n; ++c) {
          const float e = exp_fast(sums->max0[o0 + c] + m[c]);
          const float A0 = e * s1[c], B0 = e * s2[c];
          sums->dnum0[o0 + c] = A0;
          sums->dden0[o0 + c] = -B0;
          sums->dmax0[o0 + c] = sums->num0[o0 + c] * A0 - sums->den0[o0 + c] * B0;
        }
      }
      if (!causal) {
        reset();
        for (int64_t s = 0; s < T; ++s) {  // prefix: t <= s - hi - 1
          const int64_t t = s - band.hi - 1;
          if (t >= 0 && t < T) running_add2(m.data(), s1.data(), s2.data(), &nl[t * n], &h[t * n], &ho[t * n], n);
          far(s);
        }
      }
      for (int64_t s = 0; s < T && !scan; ++s) {
        const float *__restrict As = A + s * n, *__restrict Bss = Bs + s * n, *__restrict vs = v + at(s);
        float* __restrict dks = rowbuf.data();
#pragma omp simd
        for (int64_t c = 0; c < n; ++c) dks[c] = vs[c] * As[c] - Bss[c];
        put_row(dv + at(s), As, n), put_row(dk + at(s), dks, n);
      }
      end_streams();  // (the final sums' gradient below adds into dv, dk)
      if (causal && sums && sums->dnumT) {
        // The final sums numT = num0 e^{max0 - maxT} + sum_s e^{k_s - maxT} v_s (denT alike, over
        // the positions s < end that left the band), maxT = max(max0, k_s): their gradient
        // (Gn, Gd, Gm) reaches v_s, k_s and the initial sums; maxT's own, Gm - Gn numT - Gd denT,
        // goes to the term that attains it (the first, as the running max keeps it).
        const int64_t end = T - std::min(T, std::max<int64_t>(band.lo, 0));
        const bool s0 = sums->num0 != nullptr;
        for (int64_t c = 0; c < n; ++c) {
          const float mT = sums->maxT[o0 + c], Gn = sums->dnumT[o0 + c], Gd = sums->ddenT[o0 + c];
          const float R = sums->dmaxT[o0 + c] - Gn * sums->numT[o0 + c] - Gd * sums->denT[o0 + c];
          int64_t arg = -1;  // the attaining key; -1: the initial state
          if (!s0 || sums->max0[o0 + c] != mT)
            for (int64_t s = 0; s < end && arg < 0; ++s)
              if (k[at(s) + c] == mT) arg = s;
          for (int64_t s = 0; s < end; ++s) {
            const float e = exp_fast(k[at(s) + c] - mT);
            dv[at(s) + c] += Gn * e;
            dk[at(s) + c] += e * (Gn * v[at(s) + c] + Gd) + (s == arg ? R : 0.0f);
          }
          if (init) {
            const float e = exp_fast(sums->max0[o0 + c] - mT);
            sums->dnum0[o0 + c] += Gn * e;
            sums->dden0[o0 + c] += Gd * e;
            sums->dmax0[o0 + c] += e * (Gn * sums->num0[o0 + c] + Gd * sums->den0[o0 + c]) + (arg < 0 ? R : 0.0f);
          }
        }
      }
    }
  if (bias_grad) {
#pragma omp critical
    for (int64_t i = 0; i < bias_grad->size; ++i) bias_grad->out[i] += float(part[i]);
  }
  }
}

}  // namespace

void aft_backward(float* dq, float* dk, float* dv, const float* q, const float* k, const float* v, const float* o,
                  const float* lse, const float* dy, int64_t B, int64_t T, int64_t C, bool causal,
                  const AftBand& band, const AftSumsIO* sums, const AftBiasGrad* bias_grad) {
  backward_impl(nullptr, dq, dk, dv, q, k, v, o, lse, dy, B, T, C, causal, band, sums, bias_grad);
}

void aft_forward_backward(float* y, float* dq, float* dk, float* dv, const float* q, const float* k, const float* v,
                          const float* dy, int64_t B, int64_t T, int64_t C, bool causal, const AftBand& band,
                          const AftBiasGrad* bias_grad) {
  if (factored(band)) {
    backward_impl(y, dq, dk, dv, q, k, v, nullptr, nullptr, dy, B, T, C, causal, band, nullptr, bias_grad);
    return;
  }
  // the other bands: the forward's o and lse through memory
  const std::unique_ptr<float[]> o(new float[size_t(std::max<int64_t>(1, B * T * C))]),
      lse(new float[size_t(std::max<int64_t>(1, B * T * C))]);
  aft_forward(y, q, k, v, B, T, C, causal, band, o.get(), lse.get());
  aft_backward(dq, dk, dv, q, k, v, o.get(), lse.get(), dy, B, T, C, causal, band, nullptr, bias_grad);
}

void aft_step(float* y, AftState& st, const float* q, const float* k, const float* v, int64_t lo,
              const AftBand& band, std::vector<float>& scratch) {
  const int64_t C = st.C, t = st.pos;
  if (lo < 0) {  // no band (aft_simple): the token joins the sums, y reads them
    running_add(st.max.data(), st.num.data(), st.den.data(), k, v, C);
    const float *__restrict nm = st.num.data(), *__restrict dn = st.den.data();
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) y[c] = sigmoidf(q[c]) * nm[c] / dn[c];
    st.pos = t + 1;
    return;
  }
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

}  // namespace linmix
