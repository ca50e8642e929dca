// mamba — the selective scan of Mamba (Gu & Dao 2023, Algorithm 2 / selective_scan_ref):
//   dt_t = softplus(delta_t + delta_bias)   (or delta_t + delta_bias with delta_softplus=0)
//   h_t = exp(dt_t A) * h_{t-1} + dt_t Bm_t u_t      h: (C,N) per sequence
//   y_t = Cm_t . h_t + D u_t;   y_t *= silu(z_t) when z is given
// parallel: threads over (batch, channel block); per chunk of kChunk steps the decays
// exp(dt A) and inputs dt Bm u of the block are computed in one vectorisable pass, then the
// scan runs over them, from the given state h_{-1} (zeros without), the final h handed out;
// the backward's reverse scan ends with the initial state's gradient. recurrent: one token for
// all channels, h carried as state.
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

constexpr int64_t kChunk = 32;   // time steps whose decays are computed together
constexpr int64_t kCBlock = 16;  // channels per task (backward)
constexpr int64_t kFBlock = 64;  // channels per task (forward)

inline float silu(float x) { return x / (1.0f + exp_fast(-x)); }

// Inputs of one call; optional tensors are null.
struct MambaArgs {
  const float *u, *delta, *A, *Bm, *Cm, *D, *z, *bias;
  int64_t B, T, C, N;
  bool use_softplus;
  const float* h0 = nullptr;  // the state before token 0 (B,C,N), null: zeros
  float* hT = nullptr;        // the final state (B,C,N), written when not null
  const float* dhT = nullptr;  // backward: the gradient of the final state (dfinal.h), null: zero
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
  float out(float acc, int64_t b, int64_t t, int64_t c) const {  // + D u, gate
    const int64_t i = (b * T + t) * C + c;
    if (D) acc += D[c] * u[i];
    if (z) acc *= silu(z[i]);
    return acc;
  }
};

MambaArgs args_of(const Call& c) {
  auto opt = [&](const char* n) { return c.has(n) ? c.t(n).ptr() : nullptr; };
  return {c.t("u").ptr(), c.t("delta").ptr(), c.t("A").ptr(), c.t("Bm").ptr(), c.t("Cm").ptr(), opt("D"), opt("z"),
          opt("delta_bias"), c.d("B"), c.d("T"), c.d("C"), c.d("N"), c.ip("delta_softplus") != 0, opt("state.h"),
          nullptr, opt("dfinal.h")};
}

void mamba_forward(float* y, const MambaArgs& a) {
  // Per (batch, block of kFBlock channels) task, time in chunks of kChunk. Layouts put the
  // channel innermost ((n, j) with j the channel), so every inner loop runs over kFBlock
  // contiguous channels in SIMD lanes: dA = exp(dt A), dBu = dt u B, h = dA h + dBu, y += C h.
  const int64_t T = a.T, C = a.C, N = a.N, nblk = (C + kFBlock - 1) / kFBlock;
#pragma omp parallel
  {
    std::vector<float> dA(kChunk * N * kFBlock), dBu(kChunk * N * kFBlock), h(N * kFBlock), At(N * kFBlock),
        dt(kFBlock), du(kFBlock), acc(kFBlock);
#pragma omp for collapse(2) schedule(dynamic)
    for (int64_t b = 0; b < a.B; ++b)
      for (int64_t blk = 0; blk < nblk; ++blk) {
        const int64_t c0 = blk * kFBlock, nc = std::min(kFBlock, C - c0);
        std::fill(h.begin(), h.end(), 0.0f);
        if (a.h0)
          for (int64_t n = 0; n < N; ++n)
            for (int64_t j = 0; j < nc; ++j) h[n * kFBlock + j] = a.h0[(b * C + c0 + j) * N + n];
        std::fill(At.begin(), At.end(), 0.0f);
        for (int64_t n = 0; n < N; ++n)
          for (int64_t j = 0; j < nc; ++j) At[n * kFBlock + j] = a.A[(c0 + j) * N + n];
        for (int64_t t0 = 0; t0 < T; t0 += kChunk) {
          const int64_t nt = std::min(kChunk, T - t0);
          for (int64_t i = 0; i < nt; ++i) {
            const int64_t t = t0 + i;
            a.dt_row(dt.data(), b, t, c0, nc);
            for (int64_t j = 0; j < nc; ++j) du[j] = dt[j] * a.u[(b * T + t) * C + c0 + j];
            const float* Br = a.Bm + (b * T + t) * N;
            for (int64_t n = 0; n < N; ++n) {
              float* __restrict da = &dA[(i * N + n) * kFBlock];
              float* __restrict db = &dBu[(i * N + n) * kFBlock];
              const float* __restrict ar = &At[n * kFBlock];
              const float bn = Br[n];
              for (int64_t j = 0; j < kFBlock; ++j) da[j] = exp_fast(dt[j] * ar[j]), db[j] = du[j] * bn;
            }
          }
          for (int64_t i = 0; i < nt; ++i) {
            const int64_t t = t0 + i;
            const float* Cr = a.Cm + (b * T + t) * N;
            std::fill(acc.begin(), acc.end(), 0.0f);
            for (int64_t n = 0; n < N; ++n) {
              float* __restrict hr = &h[n * kFBlock];
              const float* __restrict da = &dA[(i * N + n) * kFBlock];
              const float* __restrict db = &dBu[(i * N + n) * kFBlock];
              float* __restrict ac = acc.data();
              const float cn = Cr[n];
              for (int64_t j = 0; j < kFBlock; ++j) {
                hr[j] = da[j] * hr[j] + db[j];
                ac[j] += cn * hr[j];
              }
            }
            for (int64_t j = 0; j < nc; ++j) y[(b * T + t) * C + c0 + j] = a.out(acc[j], b, t, c0 + j);
          }
        }
        if (a.hT)
          for (int64_t n = 0; n < N; ++n)
            for (int64_t j = 0; j < nc; ++j) a.hT[(b * C + c0 + j) * N + n] = h[n * kFBlock + j];
      }
  }
}

// Backward of mamba_forward, per (batch, channel block) task. h is checkpointed at chunk
// starts in a forward sweep, each chunk's states are recomputed from its checkpoint, and the
// chunk is walked backwards:
//   g = dy (times silu(z) with a gate; dz = dy y_pre silu'(z)),  dD += g u,  du = g D
//   dh += Cm_t g,  dCm_t += g h_t
//   b = dt Bm u:   dBm_t += dh dt u,  du += sum_n dh dt Bm,  ddt += sum_n dh Bm u
//   a = exp(dt A): ddt += sum_n dh h_{t-1} a A,  dA += dh h_{t-1} a dt,  then dh *= a
//   ddelta = ddt sigma(delta + bias) (softplus) or ddt;  dbias += ddelta
// Extra memory O(T/chunk C N + chunk C N) per task plus per-thread parameter accumulators.
struct MambaGrads {
  float *du, *ddelta, *dA, *dBm, *dCm, *dD, *dz, *dbias;  // dD, dz, dbias null when absent
  float* dh0 = nullptr;  // the initial state's gradient (B,C,N), written when not null
};

void mamba_backward(const MambaGrads& g, const MambaArgs& a, const float* dy) {
  const int64_t B = a.B, T = a.T, C = a.C, N = a.N, nblk = (C + kCBlock - 1) / kCBlock;
  const int64_t nchunks = (T + kChunk - 1) / kChunk;
  std::fill(g.dA, g.dA + C * N, 0.0f);
  std::fill(g.dBm, g.dBm + B * T * N, 0.0f);
  std::fill(g.dCm, g.dCm + B * T * N, 0.0f);
  if (g.dD) std::fill(g.dD, g.dD + C, 0.0f);
  if (g.dbias) std::fill(g.dbias, g.dbias + C, 0.0f);
  std::vector<float> dts(B * T * C);  // dt of every (b, t, c), once: O(T C) like the gradients
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) a.dt_row(&dts[(b * T + t) * C], b, t, 0, C);
#pragma omp parallel
  {
    // per thread: parameter accumulators; per task: checkpoints hc (nchunks+1, kCBlock, N),
    // chunk states hs (kChunk+1, kCBlock, N), decays da (kChunk, kCBlock, N), dh (kCBlock, N)
    std::vector<float> lA(C * N, 0.0f), lB(B * T * N, 0.0f), lC(B * T * N, 0.0f), lD(C, 0.0f), lbias(C, 0.0f);
    std::vector<float> hc((nchunks + 1) * kCBlock * N), hs((kChunk + 1) * kCBlock * N), da(kChunk * kCBlock * N),
        dh(kCBlock * N);
#pragma omp for collapse(2) schedule(dynamic)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t blk = 0; blk < nblk; ++blk) {
        const int64_t c0 = blk * kCBlock, nc = std::min(kCBlock, C - c0);
        auto step = [&](int64_t t, const float* hp, float* hn, float* dav) {  // h_t from h_{t-1}
          for (int64_t j = 0; j < nc; ++j) {
            const int64_t c = c0 + j;
            const float dt = dts[(b * T + t) * C + c], du = dt * a.u[(b * T + t) * C + c];
            for (int64_t n = 0; n < N; ++n) {
              const float e = exp_fast(dt * a.A[c * N + n]);
              if (dav) dav[j * N + n] = e;
              hn[j * N + n] = e * hp[j * N + n] + du * a.Bm[(b * T + t) * N + n];
            }
          }
        };
        std::fill(hc.begin(), hc.begin() + kCBlock * N, 0.0f);
        if (a.h0)  // the scan starts from the given state; hc, hs, dh are (channel, n)
          std::copy(a.h0 + (b * C + c0) * N, a.h0 + (b * C + c0 + nc) * N, hc.begin());
        for (int64_t ch = 0; ch < nchunks; ++ch) {  // checkpoints: h before each chunk
          std::copy(&hc[ch * kCBlock * N], &hc[(ch + 1) * kCBlock * N], hs.begin());
          const int64_t t0 = ch * kChunk, nt = std::min(kChunk, T - t0);
          for (int64_t i = 0; i < nt; ++i) step(t0 + i, &hs[(i % 2) * kCBlock * N], &hs[((i + 1) % 2) * kCBlock * N], nullptr);
          std::copy(&hs[(nt % 2) * kCBlock * N], &hs[(nt % 2) * kCBlock * N] + kCBlock * N, &hc[(ch + 1) * kCBlock * N]);
        }
        std::fill(dh.begin(), dh.end(), 0.0f);
        if (a.dhT) std::copy(a.dhT + (b * C + c0) * N, a.dhT + (b * C + c0 + nc) * N, dh.begin());
        for (int64_t ch = nchunks - 1; ch >= 0; --ch) {
          const int64_t t0 = ch * kChunk, nt = std::min(kChunk, T - t0);
          std::copy(&hc[ch * kCBlock * N], &hc[(ch + 1) * kCBlock * N], hs.begin());  // hs[i] = h_{t0+i-1}
          for (int64_t i = 0; i < nt; ++i)
            step(t0 + i, &hs[i * kCBlock * N], &hs[(i + 1) * kCBlock * N], &da[i * kCBlock * N]);
          for (int64_t i = nt - 1; i >= 0; --i) {
            const int64_t t = t0 + i;
            const float* Cr = a.Cm + (b * T + t) * N;
            const float* Br = a.Bm + (b * T + t) * N;
            for (int64_t j = 0; j < nc; ++j) {
              const int64_t c = c0 + j, it = (b * T + t) * C + c;
              const float* h = &hs[(i + 1) * kCBlock * N + j * N];
              const float* hp = &hs[i * kCBlock * N + j * N];
              const float* av = &da[i * kCBlock * N + j * N];
              float* d = &dh[j * N];
              float gy = dy[it];
              if (a.z) {
                float ypre = 0.0f;
#pragma omp simd reduction(+ : ypre)
                for (int64_t n = 0; n < N; ++n) ypre += Cr[n] * h[n];
                if (a.D) ypre += a.D[c] * a.u[it];
                const float sz = 1.0f / (1.0f + exp_fast(-a.z[it]));
                g.dz[it] = gy * ypre * sz * (1.0f + a.z[it] * (1.0f - sz));
                gy *= a.z[it] * sz;
              }
              float du = 0.0f;
              if (a.D) {
                lD[c] += gy * a.u[it];
                du = gy * a.D[c];
              }
              const float x = a.delta[it] + (a.bias ? a.bias[c] : 0.0f);
              const float dt = dts[it];
              float ddt = 0.0f;
#pragma omp simd reduction(+ : du, ddt)
              for (int64_t n = 0; n < N; ++n) {
                d[n] += Cr[n] * gy;
                lC[(b * T + t) * N + n] += gy * h[n];
                lB[(b * T + t) * N + n] += d[n] * dt * a.u[it];
                du += d[n] * dt * Br[n];
                ddt += d[n] * (Br[n] * a.u[it] + hp[n] * av[n] * a.A[c * N + n]);
                lA[c * N + n] += d[n] * hp[n] * av[n] * dt;
                d[n] *= av[n];
              }
              g.du[it] = du;
              const float dd = a.use_softplus ? ddt / (1.0f + exp_fast(-x)) : ddt;
              g.ddelta[it] = dd;
              lbias[c] += dd;
            }
          }
        }
        if (g.dh0) std::copy(dh.begin(), dh.begin() + nc * N, g.dh0 + (b * C + c0) * N);  // dh of h_{-1}
      }
#pragma omp critical
    {
      for (int64_t i = 0; i < C * N; ++i) g.dA[i] += lA[i];
      for (int64_t i = 0; i < B * T * N; ++i) g.dBm[i] += lB[i], g.dCm[i] += lC[i];
      for (int64_t c = 0; c < C; ++c) {
        if (g.dD) g.dD[c] += lD[c];
        if (g.dbias) g.dbias[c] += lbias[c];
      }
    }
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
  s.parallel = [](const Call& c) {
    MambaArgs a = args_of(c);
    TensorMap out{{"y", Tensor({a.B, a.T, a.C})}, {"state.h", Tensor({a.B, a.C, a.N})}};
    a.hT = out["state.h"].ptr();
    mamba_forward(out["y"].ptr(), a);
    return out;
  };
  s.stepper = [](const Call& c) {
    // Channels innermost, as in the forward: h and A stored (N, C), so every inner loop runs
    // over C contiguous channels in SIMD lanes and no per-channel horizontal sum is needed.
    const MambaArgs a = args_of(c);  // pointers into the call's tensors (no copies)
    const int64_t C = a.C, N = a.N;
    auto buf = std::make_shared<std::vector<float>>(2 * C * N + 3 * C, 0.0f);  // h, At, dt, du, acc
    float* At = buf->data() + C * N;
    for (int64_t n = 0; n < N; ++n)
      for (int64_t ch = 0; ch < C; ++ch) At[n * C + ch] = a.A[ch * N + n];
    auto save = [=] {  // the spec's (1, C, N) layout
      Tensor h({1, C, N});
      for (int64_t ch = 0; ch < C; ++ch)
        for (int64_t n = 0; n < N; ++n) h.data[ch * N + n] = (*buf)[n * C + ch];
      return TensorMap{{"state.h", std::move(h)}};
    };
    auto load = [=](const TensorMap& m) {
      const Tensor& h = m.at("state.h");
      for (int64_t ch = 0; ch < C; ++ch)
        for (int64_t n = 0; n < N; ++n) (*buf)[n * C + ch] = h.data[ch * N + n];
    };
    auto step = [a, buf, C, N](float* y) {
      float *h = buf->data(), *At = h + C * N, *dt = At + C * N, *du = dt + C, *acc = du + C;
      a.dt_row(dt, 0, 0, 0, C);
      for (int64_t ch = 0; ch < C; ++ch) du[ch] = dt[ch] * a.u[ch], acc[ch] = 0.0f;
      for (int64_t n = 0; n < N; ++n) {
        float* __restrict hn = h + n * C;
        const float* __restrict An = At + n * C;
        const float bn = a.Bm[n], cn = a.Cm[n];
#pragma omp simd
        for (int64_t ch = 0; ch < C; ++ch) {
          hn[ch] = exp_fast(dt[ch] * An[ch]) * hn[ch] + du[ch] * bn;
          acc[ch] += cn * hn[ch];
        }
      }
      for (int64_t ch = 0; ch < C; ++ch) y[ch] = a.out(acc[ch], 0, 0, ch);
    };
    return Stepper{step, save, load};
  };
  s.backward = [](const Call& c, const Tensor& dy) {
    MambaArgs a = args_of(c);
    const int64_t B = a.B, T = a.T, C = a.C, N = a.N;
    TensorMap out;
    out["y"] = Tensor({B, T, C});
    out["state.h"] = Tensor({B, C, N});
    a.hT = out["state.h"].ptr();
    mamba_forward(out["y"].ptr(), a);
    if (a.h0) out["dstate.h"] = Tensor({B, C, N});
    for (const char* n : {"du", "ddelta"}) out[n] = Tensor({B, T, C});
    out["dA"] = Tensor({C, N});
    out["dBm"] = Tensor({B, T, N});
    out["dCm"] = Tensor({B, T, N});
    if (a.D) out["dD"] = Tensor({C});
    if (a.z) out["dz"] = Tensor({B, T, C});
    if (a.bias) out["ddelta_bias"] = Tensor({C});
    auto p = [&](const char* n) { return out.count(n) ? out[n].ptr() : nullptr; };
    mamba_backward({p("du"), p("ddelta"), p("dA"), p("dBm"), p("dCm"), p("dD"), p("dz"), p("ddelta_bias"), p("dstate.h")},
                   a, dy.ptr());
    return out;
  };
  return s;
}

}  // namespace

MixerSpec mamba_spec() { return make_spec(); }

}  // namespace linmix
