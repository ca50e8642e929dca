// mamba — the selective scan of Mamba (Gu & Dao 2023, Algorithm 2 / selective_scan_ref):
//   dt_t = softplus(delta_t + delta_bias)   (or delta_t + delta_bias with delta_softplus=0)
//   h_t = exp(dt_t A) * h_{t-1} + dt_t Bm_t u_t      h: (C,N) per sequence
//   y_t = Cm_t . h_t + D u_t;   y_t *= silu(z_t) when z is given
// parallel: threads over (batch, channel block); token by token, the block's decays exp(dt A),
// inputs dt Bm u and the scan in one vectorised pass over its N states, from the given state
// h_{-1} (zeros without), the final h handed out; the backward's reverse scan (checkpoints every
// kChunk steps) ends with the initial state's gradient. recurrent: one token for
// all channels, h carried as state.
#include "../kernels/value_check.h"
#include "../kernels/vmath.h"
#include "../ref/ref_util.h"
#include "common.h"
#include "linmix/kernels.h"

namespace linmix::ref {

// ---- mamba: the float64 reference (the literal formula, templated for the tape) ----
// Mamba's selective scan as T x T weights: with cum_t = sum_{r<=t} dt_r,
//   W_ts = sum_n Cm_t[n] exp(A[c,n] (cum_t - cum_s)) dt_s Bm_s[n]   (s <= t)
//   y_t = (sum_s W_ts u_s + sum_n Cm_t[n] exp(A[c,n] cum_t) h0[c,n] + D u_t) * silu(z_t).
// D, z, bias, h0 (the state before token 0, (B,C,N)) may be null; hT (null: not wanted) gets
// the final state exp(A cum_{T-1}) h0 + sum_s exp(A (cum_{T-1} - cum_s)) dt_s Bm_s u_s.
template <class S>
void mamba_ref(S* y, const S* u, const S* delta, const S* A, const S* Bm, const S* Cm, const S* D, const S* z,
               const S* bias, bool use_softplus, int64_t B, int64_t T, int64_t C, int64_t N, const S* h0 = nullptr,
               S* hT = nullptr) {
  std::vector<S> cum(T), dt(T), W(T * T);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t c = 0; c < C; ++c) {
      S run = 0;
      for (int64_t t = 0; t < T; ++t) {
        const S x = delta[(b * T + t) * C + c] + (bias ? bias[c] : S(0));
        dt[t] = use_softplus ? (x > 30 ? x : log1p(exp(x))) : x;
        cum[t] = (run += dt[t]);
      }
      for (int64_t t = 0; t < T; ++t)
        for (int64_t s = 0; s < T; ++s) {
          S w = 0;
          if (s <= t)
            for (int64_t n = 0; n < N; ++n)
              w += Cm[(b * T + t) * N + n] * exp(A[c * N + n] * (cum[t] - cum[s])) * dt[s] * Bm[(b * T + s) * N + n];
          W[t * T + s] = w;
        }
      const S* h0c = h0 ? h0 + (b * C + c) * N : nullptr;
      for (int64_t t = 0; t < T; ++t) {
        S acc = 0;
        for (int64_t s = 0; s < T; ++s) acc += W[t * T + s] * u[(b * T + s) * C + c];
        if (h0c)
          for (int64_t n = 0; n < N; ++n) acc += Cm[(b * T + t) * N + n] * exp(A[c * N + n] * cum[t]) * h0c[n];
        const int64_t i = (b * T + t) * C + c;
        if (D) acc += D[c] * u[i];
        if (z) acc *= z[i] / (1 + exp(-z[i]));
        y[i] = acc;
      }
      if (hT)
        for (int64_t n = 0; n < N; ++n) {
          S h = h0c ? exp(A[c * N + n] * cum[T - 1]) * h0c[n] : S(0);
          for (int64_t s = 0; s < T; ++s)
            h += exp(A[c * N + n] * (cum[T - 1] - cum[s])) * dt[s] * Bm[(b * T + s) * N + n] * u[(b * T + s) * C + c];
          hT[(b * C + c) * N + n] = h;
        }
    }
}

}  // namespace linmix::ref

namespace linmix {

namespace {

constexpr int64_t kChunk = 32;   // time steps between the backward's checkpoints
// channels per task (backward); 64, as the forward's: each (t, n) step's two sums across the lanes
// (dBm, dCm) then serve 64 channels, not 32 (T = 4096, C 512, N 16, 2 threads: fwd+bwd 64.5, 61.4
// -> 59.9, 55.6 ms, alternated)
constexpr int64_t kCBlock = 64;
static_assert(kCBlock % 16 == 0, "the backward's walk runs sixteen lanes at a time");
constexpr int64_t kFBlock = 64;  // channels per task (forward)
static_assert(kFBlock % 16 == 0, "the forward runs sixteen lanes at a time");

[[gnu::always_inline]] inline float silu(float x) { return x / (1.0f + exp_fast(-x)); }

// Inputs of one call; optional tensors are null.
struct MambaArgs {
  const float *u, *delta, *A, *Bm, *Cm, *D, *z, *bias;
  int64_t B, T, C, N;
  bool use_softplus;
  const float* h0 = nullptr;  // the state before token 0 (B,C,N), null: zeros
  float* hT = nullptr;        // the final state (B,C,N), written when not null
  const float* dhT = nullptr;  // backward: the gradient of the final state (dfinal.h), null: zero
  // forward: u, delta and z left unchecked by validation (Call::unchecked), checked as they are
  // read (kernels/value_check.h); a value not finite sets *bad
  std::atomic<uint32_t>* bad = nullptr;
  float dt(int64_t b, int64_t t, int64_t c) const {
    const float x = delta[(b * T + t) * C + c] + (bias ? bias[c] : 0.0f);
    return use_softplus ? softplus_fast(x) : x;
  }
  // dt of n channels from c0 at (b, t) into out: the same values as dt(), in loops that vectorise
  void dt_row(float* out, int64_t b, int64_t t, int64_t c0, int64_t n) const {
    const float* x = delta + (b * T + t) * C + c0;
    for (int64_t j = 0; j < n; ++j) out[j] = x[j] + (bias ? bias[c0 + j] : 0.0f);
    if (use_softplus)
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) out[j] = softplus_fast(out[j]);
  }
  // y = (acc + D u) silu(z) (D and the gate when given) for n channels from c0 at (b, t) into o,
  // one loop a case so each vectorises (a per-element call compiled to scalar code: ~10% of the
  // forward at T = 4096, C 512)
  void out_row(float* __restrict o, const float* __restrict acc, int64_t b, int64_t t, int64_t c0, int64_t n) const {
    const int64_t i = (b * T + t) * C + c0;
    const float *ur = u + i, *zr = z ? z + i : nullptr, *Dr = D ? D + c0 : nullptr;
    if (Dr && zr) {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) o[j] = (acc[j] + Dr[j] * ur[j]) * silu(zr[j]);
    } else if (Dr) {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) o[j] = acc[j] + Dr[j] * ur[j];
    } else if (zr) {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) o[j] = acc[j] * silu(zr[j]);
    } else {
      std::copy(acc, acc + n, o);
    }
  }
};

MambaArgs args_of(const Call& c) {
  auto opt = [&](const char* n) { return c.has(n) ? c.t(n).ptr() : nullptr; };
  return {c.t("u").ptr(), c.t("delta").ptr(), c.t("A").ptr(), c.t("Bm").ptr(), c.t("Cm").ptr(), opt("D"), opt("z"),
          opt("delta_bias"), c.d("B"), c.d("T"), c.d("C"), c.d("N"), c.ip("delta_softplus") != 0, opt("state.h"),
          nullptr, opt("dfinal.h")};
}

void mamba_forward(float* y, const MambaArgs& a) {
  // Per (batch, block of kFBlock channels) task, token by token. Layouts put the channel innermost
  // ((n, j) with j the channel), so every inner loop runs over kFBlock contiguous channels in SIMD
  // lanes, and each token's N states are one pass: dA = exp(dt A), h = dA h + dt u B, y += C h,
  // h and A in L1 (4 KiB each at N 16). (The decays of 32 tokens first, written to and read back
  // from (32, N, 64) buffers in L2, then the recurrence: 1.2-1.4x as long, see the commit.)
  const int64_t T = a.T, C = a.C, N = a.N, nblk = (C + kFBlock - 1) / kFBlock;
#pragma omp parallel
  {
    std::vector<float> h(N * kFBlock), At(N * kFBlock), dt(kFBlock, 0.0f), du(kFBlock, 0.0f), acc(kFBlock);
#pragma omp for collapse(2) schedule(dynamic)
    for (int64_t b = 0; b < a.B; ++b)
      for (int64_t blk = 0; blk < nblk; ++blk) {
        const int64_t c0 = blk * kFBlock, nc = std::min(kFBlock, C - c0);
        std::fill(h.begin(), h.end(), 0.0f);
        if (a.h0)
          for (int64_t n = 0; n < N; ++n)
            for (int64_t j = 0; j < nc; ++j) h[n * kFBlock + j] = a.h0[(b * C + c0 + j) * N + n];
        std::fill(At.begin(), At.end(), 0.0f);  // lanes past C: a decay of 1 on a state that stays 0
        for (int64_t n = 0; n < N; ++n)
          for (int64_t j = 0; j < nc; ++j) At[n * kFBlock + j] = a.A[(c0 + j) * N + n];
        RowCheck<false> chk;
        for (int64_t t = 0; t < T; ++t) {
          if (t + kPrefetchRows < T) {  // rows C floats apart: ahead by hand (kPrefetchRows)
            const int64_t o = (b * T + t + kPrefetchRows) * C + c0;
            prefetch_floats(a.delta + o, nc), prefetch_floats(a.u + o, nc);
            if (a.z) prefetch_floats(a.z + o, nc);
            prefetch_floats<true>(y + o, nc);
          }
          if (a.bad) {  // the rows this step reads (z: the output loop below, in cache still)
            const int64_t o = (b * T + t) * C + c0;
            chk.add(a.delta + o, nc), chk.add(a.u + o, nc);
            if (a.z) chk.add(a.z + o, nc);
          }
          a.dt_row(dt.data(), b, t, c0, nc);
          for (int64_t j = 0; j < nc; ++j) du[j] = dt[j] * a.u[(b * T + t) * C + c0 + j];
          const float *Br = a.Bm + (b * T + t) * N, *Cr = a.Cm + (b * T + t) * N;
          float* __restrict ac = acc.data();
          std::fill(acc.begin(), acc.end(), 0.0f);
          for (int64_t n = 0; n < N; ++n) {
            float* __restrict hr = &h[n * kFBlock];
            const float* __restrict ar = &At[n * kFBlock];
            const float bn = Br[n], cn = Cr[n];
#if defined(__AVX512F__)
            const __m512 bv = _mm512_set1_ps(bn), cv = _mm512_set1_ps(cn);
            for (int64_t j = 0; j < kFBlock; j += 16) {
              const __m512 e = exp16(_mm512_mul_ps(_mm512_loadu_ps(dt.data() + j), _mm512_loadu_ps(ar + j)));
              const __m512 hv = _mm512_fmadd_ps(e, _mm512_loadu_ps(hr + j), _mm512_mul_ps(_mm512_loadu_ps(du.data() + j), bv));
              _mm512_storeu_ps(hr + j, hv);
              _mm512_storeu_ps(ac + j, _mm512_fmadd_ps(cv, hv, _mm512_loadu_ps(ac + j)));
            }
#else
            const float *__restrict dtr = dt.data(), *__restrict dur = du.data();
#pragma omp simd
            for (int64_t j = 0; j < kFBlock; ++j) {
              hr[j] = exp_fast(dtr[j] * ar[j]) * hr[j] + dur[j] * bn;
              ac[j] += cn * hr[j];
            }
#endif
          }
          a.out_row(y + (b * T + t) * C + c0, acc.data(), b, t, c0, nc);
        }
        if (a.hT)
          for (int64_t n = 0; n < N; ++n)
            for (int64_t j = 0; j < nc; ++j) a.hT[(b * C + c0 + j) * N + n] = h[n * kFBlock + j];
        if (a.bad && chk.bad()) a.bad->fetch_or(1u);
      }
  }
}

// Backward of mamba_forward, per (batch, block of kCBlock channels) task, the channel innermost
// as in the forward ((n, j) with j the channel: every inner loop runs over kCBlock lanes, the
// lanes past C zeros). h is checkpointed at chunk starts in a forward sweep, each chunk's
// states are recomputed from its checkpoint, and the chunk is walked backwards:
//   g = dy (times silu(z) with a gate; dz = dy y_pre silu'(z)),  dD += g u,  du = g D
//   dh += Cm_t g,  dCm_t += g h_t
//   b = dt Bm u:   dBm_t += dh dt u,  du += sum_n dh dt Bm,  ddt += sum_n dh Bm u
//   a = exp(dt A): ddt += sum_n dh h_{t-1} a A,  dA += dh h_{t-1} a dt,  then dh *= a
//   ddelta = ddt sigma(delta + bias) (softplus) or ddt;  dbias += ddelta
// du and ddt sum over n in their lanes; only dBm_t and dCm_t (sums over channels) reduce across
// lanes. Extra memory O(T/chunk C N + chunk C N) per task plus per-thread accumulators of dBm,
// dCm. (Measured, B 16 x T 128, C 256, N 16, 2 threads: 45 -> 27 ms a call, from the layout of
// (channel, n) with n in the lanes and two cross-lane sums per (t, channel).)
// The forward's outputs come from the same passes: the final state from the checkpoint sweep
// (a.hT), y from the recomputed states of the reverse walk (y), so no forward runs before it
// (T = 4096, C 512, N 16, 2 threads, alternated 7 times: fwd+bwd 55.4-64.8 -> 48.2-55.4 ms, medians
// 58.4 -> 51.5, 4.1x -> 3.6x the forward).
struct MambaGrads {
  float *du, *ddelta, *dA, *dBm, *dCm, *dD, *dz, *dbias;  // dD, dz, dbias null when absent
  float* dh0 = nullptr;  // the initial state's gradient (B,C,N), written when not null
  float* y = nullptr;    // the forward's output (B,T,C), written when not null
};

void mamba_backward(const MambaGrads& g, const MambaArgs& a, const float* dy) {
  constexpr int64_t L = kCBlock;
  const int64_t B = a.B, T = a.T, C = a.C, N = a.N, nblk = (C + L - 1) / L;
  const int64_t nchunks = (T + kChunk - 1) / kChunk;
  std::fill(g.dBm, g.dBm + B * T * N, 0.0f);
  std::fill(g.dCm, g.dCm + B * T * N, 0.0f);
  std::fill(g.dA, g.dA + C * N, 0.0f);
  if (g.dD) std::fill(g.dD, g.dD + C, 0.0f);
  if (g.dbias) std::fill(g.dbias, g.dbias + C, 0.0f);
  // per (block, n, lane): dA; per (block, lane): dD, dbias (each block's own: no reduction)
  std::vector<float> dAb(nblk * N * L, 0.0f), dDb(nblk * L, 0.0f), dbb(nblk * L, 0.0f);
#pragma omp parallel
  {
    // per thread: dBm, dCm accumulators; per task: the checkpoints hc (nchunks + 1, N, L), the
    // chunk's states hs (kChunk + 1, N, L) and decays da (kChunk, N, L), dh (N, L), A (N, L),
    // the chunk's dt, u, dt u (kChunk, L)
    std::vector<float> lB(B * T * N, 0.0f), lC(B * T * N, 0.0f);
    std::vector<float> hc((nchunks + 1) * N * L), hs((kChunk + 1) * N * L), da(kChunk * N * L), dh(N * L), At(N * L),
        dtc(kChunk * L), uc(kChunk * L), duc(kChunk * L), lA(N * L), lD(L), lb(L), gy(L), du(L), ddt(L),
        scp(N * 16), sbp(N * 16);
#pragma omp for collapse(2) schedule(dynamic)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t blk = 0; blk < nblk; ++blk) {
        const int64_t c0 = blk * L, nc = std::min(L, C - c0);
        std::fill(At.begin(), At.end(), 0.0f);
        for (int64_t n = 0; n < N; ++n)
          for (int64_t j = 0; j < nc; ++j) At[n * L + j] = a.A[(c0 + j) * N + n];
        // the chunk's dt, u and dt u in lanes (zeros past C: those lanes stay zero throughout)
        auto load = [&](int64_t t0, int64_t nt) {
          std::fill(dtc.begin(), dtc.end(), 0.0f), std::fill(uc.begin(), uc.end(), 0.0f);
          std::fill(duc.begin(), duc.end(), 0.0f);
          for (int64_t i = 0; i < nt; ++i) {
            if (t0 + i + kPrefetchRows < T) {  // rows C floats apart: ahead by hand (kPrefetchRows)
              const int64_t o = (b * T + t0 + i + kPrefetchRows) * C + c0;
              prefetch_floats(a.delta + o, nc), prefetch_floats(a.u + o, nc);
            }
            a.dt_row(&dtc[i * L], b, t0 + i, c0, nc);
            const float* ur = a.u + (b * T + t0 + i) * C + c0;
            for (int64_t j = 0; j < nc; ++j) uc[i * L + j] = ur[j], duc[i * L + j] = dtc[i * L + j] * ur[j];
          }
        };
        // h_t (N, L) from h_{t-1}, the decays into dav when not null
        auto step = [&](int64_t i, int64_t t, const float* hp, float* hn, float* dav) {
          float ebuf[L];  // the decays of a state row when dav is null
          const float* Br = a.Bm + (b * T + t) * N;
          const float *dt = &dtc[i * L], *dv = &duc[i * L];
          for (int64_t n = 0; n < N; ++n) {
            const float* __restrict ar = &At[n * L];
            const float* __restrict hpr = hp + n * L;
            float* __restrict hr = hn + n * L;
            const float bn = Br[n];
            float* __restrict e = dav ? dav + n * L : ebuf;
            exp_of_products(e, dt, ar, L);
#pragma omp simd
            for (int64_t j = 0; j < L; ++j) hr[j] = e[j] * hpr[j] + dv[j] * bn;
          }
        };
        std::fill(hc.begin(), hc.begin() + N * L, 0.0f);
        if (a.h0)  // the scan starts from the given state
          for (int64_t n = 0; n < N; ++n)
            for (int64_t j = 0; j < nc; ++j) hc[n * L + j] = a.h0[(b * C + c0 + j) * N + n];
        for (int64_t ch = 0; ch < nchunks; ++ch) {  // checkpoints: h before each chunk
          const int64_t t0 = ch * kChunk, nt = std::min(kChunk, T - t0);
          load(t0, nt);
          std::copy(&hc[ch * N * L], &hc[(ch + 1) * N * L], hs.begin());
          for (int64_t i = 0; i < nt; ++i) step(i, t0 + i, &hs[(i % 2) * N * L], &hs[((i + 1) % 2) * N * L], nullptr);
          std::copy(&hs[(nt % 2) * N * L], &hs[(nt % 2) * N * L] + N * L, &hc[(ch + 1) * N * L]);
        }
        if (a.hT)  // the sweep's last state is the forward's final one
          for (int64_t n = 0; n < N; ++n)
            for (int64_t j = 0; j < nc; ++j) a.hT[(b * C + c0 + j) * N + n] = hc[(nchunks * N + n) * L + j];
        std::fill(dh.begin(), dh.end(), 0.0f);
        if (a.dhT)
          for (int64_t n = 0; n < N; ++n)
            for (int64_t j = 0; j < nc; ++j) dh[n * L + j] = a.dhT[(b * C + c0 + j) * N + n];
        std::fill(lA.begin(), lA.end(), 0.0f), std::fill(lD.begin(), lD.end(), 0.0f);
        std::fill(lb.begin(), lb.end(), 0.0f);
        for (int64_t ch = nchunks - 1; ch >= 0; --ch) {
          const int64_t t0 = ch * kChunk, nt = std::min(kChunk, T - t0);
          load(t0, nt);
          std::copy(&hc[ch * N * L], &hc[(ch + 1) * N * L], hs.begin());  // hs[i] = h_{t0+i-1}
          for (int64_t i = 0; i < nt; ++i) step(i, t0 + i, &hs[i * N * L], &hs[(i + 1) * N * L], &da[i * N * L]);
          for (int64_t i = nt - 1; i >= 0; --i) {
            const int64_t t = t0 + i, row = (b * T + t) * C + c0;
            if (t >= kPrefetchRows) {  // the walk's rows, backwards, ahead by hand
              const int64_t o = row - kPrefetchRows * C;
              prefetch_floats(dy + o, nc), prefetch_floats(a.u + o, nc), prefetch_floats(a.delta + o, nc);
              if (a.z) prefetch_floats(a.z + o, nc), prefetch_floats<true>(g.dz + o, nc);
              if (g.y) prefetch_floats<true>(g.y + o, nc);
              prefetch_floats<true>(g.du + o, nc), prefetch_floats<true>(g.ddelta + o, nc);
            }
            const float* Cr = a.Cm + (b * T + t) * N;
            const float* Br = a.Bm + (b * T + t) * N;
            const float *h = &hs[(i + 1) * N * L], *hp = &hs[i * N * L], *av = &da[i * N * L];
            const float *dt = &dtc[i * L], *uu = &uc[i * L], *dtu = &duc[i * L];
            std::fill(gy.begin(), gy.end(), 0.0f), std::fill(du.begin(), du.end(), 0.0f);
            std::fill(ddt.begin(), ddt.end(), 0.0f);
            for (int64_t j = 0; j < nc; ++j) gy[j] = dy[row + j];
            if (a.z || g.y) {  // Cm . h_t: y's sum, and the gate's (y = y_pre silu(z), y_pre = Cm . h + D u)
              float* ypre = du.data();  // (du's lanes are free until below)
              for (int64_t n = 0; n < N; ++n) {
                const float cn = Cr[n];
#pragma omp simd
                for (int64_t j = 0; j < L; ++j) ypre[j] += cn * h[n * L + j];
              }
              if (g.y)
                a.out_row(g.y + row, ypre, b, t, c0, nc);
              if (a.z) {  // (restrict pointers, no select in the body: the loop vectorises; it ran scalar)
                const float *__restrict zr = a.z + row, *__restrict ur = a.u + row;
                float *__restrict dzr = g.dz + row, *__restrict gyr = gy.data(), *__restrict yp = ypre;
                if (a.D) {
                  const float* __restrict Dr = a.D + c0;
#pragma omp simd
                  for (int64_t j = 0; j < nc; ++j) yp[j] += Dr[j] * ur[j];
                }
#pragma omp simd
                for (int64_t j = 0; j < nc; ++j) {
                  const float zz = zr[j], sz = 1.0f / (1.0f + exp_fast(-zz));
                  dzr[j] = gyr[j] * yp[j] * sz * (1.0f + zz * (1.0f - sz));
                  gyr[j] *= zz * sz;
                }
              }
              std::fill(du.begin(), du.end(), 0.0f);
            }
            if (a.D)
              for (int64_t j = 0; j < nc; ++j) {
                lD[j] += gy[j] * a.u[row + j];
                du[j] = gy[j] * a.D[c0 + j];
              }
            // Sixteen lanes at a time through every n: gy, dt u, dt, u and the sums du, ddt over n
            // in registers; each n's dCm and dBm terms (sums over the lanes) kept as 16 partial
            // lanes, then summed sixteen n at a time by one shuffle tree (hsum16x16). (Each n's
            // two sums over all 64 lanes at the end of its own loop took two horizontal sums a
            // (t, n), and du, ddt went through memory at every n.)
            std::fill(scp.begin(), scp.end(), 0.0f), std::fill(sbp.begin(), sbp.end(), 0.0f);
            for (int64_t j0 = 0; j0 < L; j0 += 16) {
              const f32x16 gyv = load16(&gy[j0]), dtuv = load16(dtu + j0), dtv = load16(dt + j0), uuv = load16(uu + j0);
              f32x16 duv = load16(&du[j0]), ddtv = load16(&ddt[j0]);
              for (int64_t n = 0; n < N; ++n) {
                const int64_t o = n * L + j0;
                const float cn = Cr[n], bn = Br[n];
                const f32x16 dj = load16(&dh[o]) + cn * gyv, an = load16(av + o);
                store16(&scp[n * 16], load16(&scp[n * 16]) + gyv * load16(h + o));
                store16(&sbp[n * 16], load16(&sbp[n * 16]) + dj * dtuv);
                duv += dj * dtv * bn;
                const f32x16 q = dj * load16(hp + o) * an;
                ddtv += dj * bn * uuv + q * load16(&At[o]);
                store16(&lA[o], load16(&lA[o]) + q * dtv);
                store16(&dh[o], dj * an);
              }
              store16(&du[j0], duv), store16(&ddt[j0], ddtv);
            }
            float* lBr = &lB[(b * T + t) * N];
            float* lCr = &lC[(b * T + t) * N];
            int64_t n = 0;
            for (; n + 16 <= N; n += 16) {
              store16(lCr + n, load16(lCr + n) + hsum16x16(reinterpret_cast<const f32x16*>(&scp[n * 16])));
              store16(lBr + n, load16(lBr + n) + hsum16x16(reinterpret_cast<const f32x16*>(&sbp[n * 16])));
            }
            for (; n < N; ++n) lCr[n] += hsum16(load16(&scp[n * 16])), lBr[n] += hsum16(load16(&sbp[n * 16]));
            {  // ddelta = ddt sigma(delta + bias) (softplus) or ddt, in loops that vectorise (a select
               // and possibly aliased stores in one loop ran scalar: ~14% of the backward)
              const float *__restrict dr = a.delta + row, *__restrict dtr = ddt.data();
              float *__restrict gdd = g.ddelta + row, *__restrict lbr = lb.data();
              std::copy(du.data(), du.data() + nc, g.du + row);
              if (a.use_softplus) {
                const float* __restrict br = a.bias ? a.bias + c0 : nullptr;
                if (br) {
#pragma omp simd
                  for (int64_t j = 0; j < nc; ++j) gdd[j] = dtr[j] / (1.0f + exp_fast(-(dr[j] + br[j])));
                } else {
#pragma omp simd
                  for (int64_t j = 0; j < nc; ++j) gdd[j] = dtr[j] / (1.0f + exp_fast(-dr[j]));
                }
              } else {
                std::copy(dtr, dtr + nc, gdd);
              }
#pragma omp simd
              for (int64_t j = 0; j < nc; ++j) lbr[j] += gdd[j];
            }
          }
        }
        if (g.dh0)  // dh of h_{-1}
          for (int64_t n = 0; n < N; ++n)
            for (int64_t j = 0; j < nc; ++j) g.dh0[(b * C + c0 + j) * N + n] = dh[n * L + j];
#pragma omp critical
        {  // the block's parameter gradients (a few KB: the tasks of one block add up here)
          for (int64_t i = 0; i < N * L; ++i) dAb[blk * N * L + i] += lA[i];
          for (int64_t j = 0; j < L; ++j) dDb[blk * L + j] += lD[j], dbb[blk * L + j] += lb[j];
        }
      }
#pragma omp critical
    for (int64_t i = 0; i < B * T * N; ++i) g.dBm[i] += lB[i], g.dCm[i] += lC[i];
  }
  for (int64_t blk = 0; blk < nblk; ++blk)
    for (int64_t j = 0; j < std::min(L, C - blk * L); ++j) {
      const int64_t c = blk * L + j;
      for (int64_t n = 0; n < N; ++n) g.dA[c * N + n] = dAb[(blk * N + n) * L + j];
      if (g.dD) g.dD[c] = dDb[blk * L + j];
      if (g.dbias) g.dbias[c] = dbb[blk * L + j];
    }
}


MixerSpec make_spec() {
  MixerSpec s;
  s.name = "mamba";
  s.blocking = {{"C", kCBlock}, {"C", kFBlock}, {"T", kChunk}};
  s.own_dims = [](std::map<std::string, int64_t>& d, Scale scale, bool) {
    d["N"] = scale == Scale::Test ? 4 : scale == Scale::Grad ? 2 : scale == Scale::Demo ? 8 : 16;
  };
  s.paper = "Gu & Dao 2023, Mamba: Linear-Time Sequence Modeling with Selective State Spaces";
  s.summary = "selective scan: input-dependent dt, B, C over a diagonal real state";
  s.causal_ok = true;
  s.noncausal_ok = false;
  s.inputs = {{"u", "B,T,C"},  {"delta", "B,T,C"}, {"A", "C,N"},         {"Bm", "B,T,N"},
              {"Cm", "B,T,N"}, {"D", "C", true},   {"z", "B,T,C", true}, {"delta_bias", "C", true}};
  s.params = {{"delta_softplus", 1, true, 0, "1: dt = softplus(delta + bias); 0: dt = delta + bias"}};
  s.state = {{"h", "B,C,N"}};
  s.state_size = "C N per sequence";
  s.time = "O(T C N)";
  s.memory = "O(chunk C N) per thread";
  s.example_fix = [](TensorMap& in) {  // Mamba's A = -exp(A_log)
    for (auto& x : in["A"].data) x = -std::exp(x);
  };
  s.check = [](const Call& c) {
    LINMIX_CHECK(c.p("delta_softplus") <= 1, "param 'delta_softplus': must be 0 or 1");
    const Tensor& A = c.t("A");
    for (int64_t i = 0; i < A.numel(); ++i)
      LINMIX_CHECK(A.data[i] <= 0.0f, "tensor 'A': must be <= 0 (Mamba uses A = -exp(A_log)); A[" + std::to_string(i) +
                                          "] = " + std::to_string(A.data[i]));
  };
  s.y_dims = "B,T,C";
  s.state_all_modes = true;  // every form starts from state.h and returns the final h
  set_reference(s, [](const Call& c, const auto& x) {
    using S = scalar_of<decltype(x)>;
    const int64_t B = c.d("B"), T = c.d("T"), C = c.d("C"), N = c.d("N");
    std::vector<S> y(B * T * C + B * C * N);
    ref::mamba_ref<S>(y.data(), x.at("u").data(), x.at("delta").data(), x.at("A").data(), x.at("Bm").data(),
                      x.at("Cm").data(), opt_in(x, "D"), opt_in(x, "z"), opt_in(x, "delta_bias"),
                      c.ip("delta_softplus") != 0, B, T, C, N, opt_in(x, "state.h"), y.data() + B * T * C);
    return y;
  });
  s.kernel_checks_values = true;  // mamba_forward checks u, delta and z as it reads them
  s.parallel = [](const Call& c) {
    MambaArgs a = args_of(c);
    a.bad = c.unchecked_bad.get();
    // both written whole by mamba_forward: left unset (zeroing y was ~4% of the forward)
    TensorMap out = moved_map("y", Tensor::uninitialized({a.B, a.T, a.C}), "state.h", Tensor::uninitialized({a.B, a.C, a.N}));
    a.hT = out["state.h"].ptr();
    mamba_forward(out["y"].ptr(), a);
    return out;
  };
  s.stepper = [](const Call& c) {
    // h and A in the (channel block, n, channel) layout of ChannelBlocks: the inner loops run over
    // contiguous channels in SIMD lanes, a block's sums stay in registers through its N rows.
    const MambaArgs a = args_of(c);  // pointers into the call's tensors (no copies)
    const int64_t C = a.C, N = a.N;
    const ChannelBlocks L{C, N};
    auto buf = std::make_shared<std::vector<float>>(2 * C * N, 0.0f);  // h, At
    float* At = buf->data() + C * N;
    for (int64_t ch = 0; ch < C; ++ch)
      for (int64_t n = 0; n < N; ++n) At[L.at(ch, n)] = a.A[ch * N + n];
    auto save = [=] {  // the spec's (1, C, N) layout
      Tensor h({1, C, N});
      for (int64_t ch = 0; ch < C; ++ch)
        for (int64_t n = 0; n < N; ++n) h.data[ch * N + n] = (*buf)[L.at(ch, n)];
      return moved_map("state.h", std::move(h));
    };
    auto load = [=](const TensorMap& m) {
      const Tensor& h = m.at("state.h");
      for (int64_t ch = 0; ch < C; ++ch)
        for (int64_t n = 0; n < N; ++n) (*buf)[L.at(ch, n)] = h.data[ch * N + n];
    };
    // The blocks over the threads when a token's exps and the state's trip through L2 are many
    // (an exp a state float: 8 C N against kStepParallelFloats). Measured (one token, C 512,
    // N 16, a driver timing the stepper alone): 5.0 us -> 5.0-5.3 on one thread, 3.55 on two.
    auto step = [a, buf, L](float* y) {
      const int64_t C = L.C, N = L.N, nb = L.count();
      float *h = buf->data(), *At = h + C * N;
#pragma omp parallel for schedule(static) if (nb > 1 && 8 * C * N >= kStepParallelFloats)
      for (int64_t b = 0; b < nb; ++b) {
        const int64_t c0 = b * L.kBlock, w = L.width(c0);
        float dt[L.kBlock], du[L.kBlock], acc[L.kBlock] = {};
        a.dt_row(dt, 0, 0, c0, w);
        for (int64_t j = 0; j < w; ++j) du[j] = dt[j] * a.u[c0 + j];
#if defined(__AVX512F__)
        if (w == L.kBlock) {  // a whole block: its sums in registers, exp16 (vmath.h) for the exps
          constexpr int kV = int(L.kBlock / 16);
          __m512 dtv[kV], duv[kV], sum[kV];
          for (int q = 0; q < kV; ++q)
            dtv[q] = _mm512_loadu_ps(dt + 16 * q), duv[q] = _mm512_loadu_ps(du + 16 * q), sum[q] = _mm512_setzero_ps();
          for (int64_t n = 0; n < N; ++n) {
            float* hn = h + L.row(c0, n);
            const float* An = At + L.row(c0, n);
            const __m512 bn = _mm512_set1_ps(a.Bm[n]), cn = _mm512_set1_ps(a.Cm[n]);
            for (int q = 0; q < kV; ++q) {
              const __m512 e = exp16(_mm512_mul_ps(dtv[q], _mm512_loadu_ps(An + 16 * q)));
              const __m512 hv = _mm512_fmadd_ps(e, _mm512_loadu_ps(hn + 16 * q), _mm512_mul_ps(duv[q], bn));
              _mm512_storeu_ps(hn + 16 * q, hv);
              sum[q] = _mm512_fmadd_ps(cn, hv, sum[q]);
            }
          }
          for (int q = 0; q < kV; ++q) _mm512_storeu_ps(acc + 16 * q, sum[q]);
          a.out_row(y + c0, acc, 0, 0, c0, w);
          continue;
        }
#endif
        for (int64_t n = 0; n < N; ++n) {
          float* __restrict hn = h + L.row(c0, n);
          const float* __restrict An = At + L.row(c0, n);
          const float bn = a.Bm[n], cn = a.Cm[n];
#pragma omp simd
          for (int64_t j = 0; j < w; ++j) {
            hn[j] = exp_fast(dt[j] * An[j]) * hn[j] + du[j] * bn;
            acc[j] += cn * hn[j];
          }
        }
        a.out_row(y + c0, acc, 0, 0, c0, w);
      }
    };
    return Stepper{step, save, load};
  };
  s.backward = [](const Call& c, const Tensor& dy) {
    MambaArgs a = args_of(c);
    const int64_t B = a.B, T = a.T, C = a.C, N = a.N;
    TensorMap out;
    out["y"] = Tensor({B, T, C});
    out["state.h"] = Tensor({B, C, N});
    a.hT = out["state.h"].ptr();  // y and the final state: from mamba_backward's own passes
    if (a.h0) out["dstate.h"] = Tensor({B, C, N});
    for (const char* n : {"du", "ddelta"}) out[n] = Tensor({B, T, C});
    out["dA"] = Tensor({C, N});
    out["dBm"] = Tensor({B, T, N});
    out["dCm"] = Tensor({B, T, N});
    if (a.D) out["dD"] = Tensor({C});
    if (a.z) out["dz"] = Tensor({B, T, C});
    if (a.bias) out["ddelta_bias"] = Tensor({C});
    auto p = [&](const char* n) { return out.count(n) ? out[n].ptr() : nullptr; };
    mamba_backward({p("du"), p("ddelta"), p("dA"), p("dBm"), p("dCm"), p("dD"), p("dz"), p("ddelta_bias"), p("dstate.h"),
                    p("y")},
                   a, dy.ptr());
    return out;
  };
  return s;
}

}  // namespace

MixerSpec mamba_spec() { return make_spec(); }

}  // namespace linmix
