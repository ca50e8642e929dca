// s4d — diagonal state space model (Gu et al. 2022, "On the Parameterization and
// Initialization of Diagonal State Space Models"), zero-order-hold discretisation:
//   Abar = exp(dt A),  Ct = C (Abar - 1) / A,  K_l = 2 Re(sum_n Ct_n Abar_n^l)
//   y_t = sum_{l<=t} K_l u_{t-l} + D u_t
// parallel: chunks of 64 steps, each a Toeplitz product with the kernel's first 64 taps plus the
// state carried from chunk to chunk (GEMMs; O(T C (64 + 4N)), linear in T; see kChunk below).
// recurrent: x_t = Abar x_{t-1} + u_t (complex, (C,N)), y_t = 2 Re(Ct . x_t) + D u_t.
// Every form starts from a given state x_{-1} (zeros without) and can return the final one.
#include <omp.h>

#include <complex>

#include "../kernels/linear_product.h"
#include "../kernels/transpose.h"
#include "../kernels/value_check.h"
#include "../ref/ref_util.h"
#include "common.h"
#include "linmix/kernels.h"

namespace linmix::ref {

// ---- s4d: the float64 reference (the literal formula, templated for the tape) ----
// S4D as T x T weights per channel, the kernel from its closed form (complex arithmetic
// written out in real and imaginary parts so it also runs on ad::Var):
//   K_l = 2 Re sum_n Ct_n exp(l dt A_n),  Ct = C (exp(dt A) - 1) / A,  W_ts = K_{t-s} (s <= t)
//   y_t = sum_s W_ts u_s + D u_t.   u, y: (B,T,C); log_dt, D: (C); A_*, C_*: (C,N).
// From a state x0 = (x0r, x0i) (B,C,N) (null: zeros): y_t += 2 Re sum_n Ct_n exp((t+1) dt A_n) x0_n;
// the final state xT (null: not wanted) = exp(T dt A) x0 + sum_s exp((T-1-s) dt A) u_s.
template <class S>
void s4d_ref(S* y, const S* u, const S* log_dt, const S* A_re, const S* A_im, const S* C_re, const S* C_im,
             const S* D, int64_t B, int64_t T, int64_t C, int64_t N, const S* x0r = nullptr, const S* x0i = nullptr,
             S* xTr = nullptr, S* xTi = nullptr) {
  std::vector<S> K(T), W(T * T), Sy(B * T);
  for (int64_t c = 0; c < C; ++c) {
    const S dt = exp(log_dt[c]);
    for (int64_t l = 0; l < T; ++l) K[l] = 0;
    for (auto& v : Sy) v = 0;
    for (int64_t n = 0; n < N; ++n) {
      const int64_t i = c * N + n;
      const S ar = A_re[i], ai = A_im[i], cr = C_re[i], ci = C_im[i];
      // exp(dt A) - 1
      const S er = exp(dt * ar) * cos(dt * ai) - 1, ei = exp(dt * ar) * sin(dt * ai);
      // (C (exp(dt A) - 1)) / A
      const S nr = cr * er - ci * ei, ni = cr * ei + ci * er, den = ar * ar + ai * ai;
      const S tr = (nr * ar + ni * ai) / den, ti = (ni * ar - nr * ai) / den;
      for (int64_t l = 0; l < T; ++l) {  // Re(Ct exp(l dt A))
        const S mag = exp(double(l) * dt * ar), ph = double(l) * dt * ai;
        K[l] += 2 * mag * (tr * cos(ph) - ti * sin(ph));
      }
      for (int64_t b = 0; b < B; ++b) {
        const int64_t si = (b * C + c) * N + n;
        if (x0r)
          for (int64_t t = 0; t < T; ++t) {  // 2 Re(Ct exp((t+1) dt A) x0)
            const S mag = exp(double(t + 1) * dt * ar), ph = double(t + 1) * dt * ai;
            const S pr = mag * cos(ph), pi = mag * sin(ph);  // exp((t+1) dt A)
            const S wr = tr * pr - ti * pi, wi = tr * pi + ti * pr;
            Sy[b * T + t] += 2 * (wr * x0r[si] - wi * x0i[si]);
          }
        if (xTr) {
          S fr = 0, fi = 0;
          if (x0r) {
            const S mag = exp(double(T) * dt * ar), ph = double(T) * dt * ai;
            fr = mag * (cos(ph) * x0r[si] - sin(ph) * x0i[si]), fi = mag * (cos(ph) * x0i[si] + sin(ph) * x0r[si]);
          }
          for (int64_t s2 = 0; s2 < T; ++s2) {
            const S mag = exp(double(T - 1 - s2) * dt * ar), ph = double(T - 1 - s2) * dt * ai;
            fr += mag * cos(ph) * u[(b * T + s2) * C + c], fi += mag * sin(ph) * u[(b * T + s2) * C + c];
          }
          xTr[si] = fr, xTi[si] = fi;
        }
      }
    }
    for (int64_t t = 0; t < T; ++t)
      for (int64_t s = 0; s < T; ++s) W[t * T + s] = s <= t ? K[t - s] : S(0);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < T; ++t) {
        S acc = D[c] * u[(b * T + t) * C + c] + Sy[b * T + t];
        for (int64_t s = 0; s < T; ++s) acc += W[t * T + s] * u[(b * T + s) * C + c];
        y[(b * T + t) * C + c] = acc;
      }
  }
}

}  // namespace linmix::ref

namespace linmix {

namespace {

using cd = std::complex<double>;

struct S4dParams {  // per channel c and mode n: Abar, Ct (float64)
  int64_t C, N;
  std::vector<cd> Abar, Ct;
};

S4dParams discretise(const Call& c) {
  const int64_t C = c.d("C"), N = c.d("N");
  S4dParams p{C, N, std::vector<cd>(C * N), std::vector<cd>(C * N)};
  // (the tensors looked up once: by name per element, the map's string compares took a tenth of
  // a T = 1024 forward)
  const float *log_dt = c.t("log_dt").ptr(), *are = c.t("A_re").ptr(), *aim = c.t("A_im").ptr();
  const float *cre = c.t("C_re").ptr(), *cim = c.t("C_im").ptr();
  for (int64_t ch = 0; ch < C; ++ch) {
    const double dt = std::exp(double(log_dt[ch]));
    for (int64_t n = 0; n < N; ++n) {
      const int64_t i = ch * N + n;
      const cd A(are[i], aim[i]), Cc(cre[i], cim[i]);
      p.Abar[i] = std::exp(dt * A);
      p.Ct[i] = Cc * (p.Abar[i] - 1.0) / A;
    }
  }
  return p;
}

// The chunked form (parallel and backward). The sequence of a channel in chunks of Q = kChunk
// steps, nc = ceil(T / Q) of them, u zero-padded to nc Q: with z = Abar and S_c the state after
// chunk c (S_{-1} the call's initial state),
//   within a chunk:  y_{cQ+j} = sum_{i<=j} K_{j-i} u_{cQ+i} + 2 Re(sum_n Ct_n z_n^{j+1} S_{c-1,n}) + D u
//   across chunks:   S_c = z^Q S_{c-1} + L_c,  L_c = sum_{i<Q} z^{Q-1-i} u_{cQ+i}
// As real matrices per channel, with W = Q + 2N columns: MP (Q x W) = [M | P], M_ij = K_{j-i}
// (j >= i), P_in = (Re, Im) z_n^{Q-1-i}; O (2N x Q) = (2 Re, -2 Im) of Ct_n z_n^{j+1}. A chunk row
// of u times MP gives its intra-chunk outputs and L_c in one GEMM (nc x Q x W), the states run
// across the chunks (nc steps of N complex products), and the rows of S_{c-1} times O add the
// state's part (a GEMM nc x 2N x Q): O(T (Q + 4N)) per channel, linear in T. The final state
// takes the last chunk's own length r: S_final = z^r S_{nc-2} + sum_{i<r} z^{r-1-i} u_{(nc-1)Q+i}.
// (The FFT convolution, zero-padded to 2T, computes the same y in O(T log T): this form replaced
// it at 43 -> 5.5 ms (forward) and 160 -> 17 ms (forward + backward), T = 4096, C 512, N 16, 2
// threads; its exponent in T was 1.73, 1.15 with the kernel's decaying powers kept out of the
// subnormals.) Tables in float64, then float.
constexpr int64_t kChunk = 64;

struct S4dChunks {
  int64_t T, Q, nc, r, N, W;
  S4dChunks(int64_t T_, int64_t N_)
      : T(T_), Q(kChunk), nc(std::max<int64_t>(1, (T_ + kChunk - 1) / kChunk)), r(T_ - (nc - 1) * kChunk), N(N_),
        W(kChunk + 2 * N_) {}
  int64_t padded() const { return nc * Q; }
};

// One channel's tables: the powers z^l, l = 0..Q, as (Q + 1, N) real and imaginary parts
// (float64, modes innermost: the products run over the modes in SIMD lanes, not as one chain
// per mode); MP, O (float) as above.
struct S4dTables {
  std::vector<double> pr, pi, z, ct;  // z, ct: (re N, im N) of the channel's Abar and Ct
  std::vector<float> K, MP, O;
  void build(const S4dParams& p, const S4dChunks& g, int64_t ch) {
    const int64_t Q = g.Q, N = g.N, W = g.W;
    pr.resize(size_t((Q + 1) * N)), pi.resize(size_t((Q + 1) * N)), z.resize(size_t(2 * N)), ct.resize(size_t(2 * N));
    K.resize(size_t(Q)), MP.resize(size_t(Q * W)), O.resize(size_t(2 * N * Q));
    double *zr = z.data(), *zi = zr + N, *cr = ct.data(), *ci = cr + N;
    for (int64_t n = 0; n < N; ++n) {
      zr[n] = p.Abar[ch * N + n].real(), zi[n] = p.Abar[ch * N + n].imag();
      cr[n] = p.Ct[ch * N + n].real(), ci[n] = p.Ct[ch * N + n].imag();
      pr[size_t(n)] = 1.0, pi[size_t(n)] = 0.0;
    }
    for (int64_t l = 0; l < Q; ++l) {  // z^{l+1} = z^l z
      const double *__restrict ar = pr.data() + l * N, *__restrict ai = pi.data() + l * N;
      double *__restrict br = pr.data() + (l + 1) * N, *__restrict bi = pi.data() + (l + 1) * N;
#pragma omp simd
      for (int64_t n = 0; n < N; ++n) br[n] = ar[n] * zr[n] - ai[n] * zi[n], bi[n] = ar[n] * zi[n] + ai[n] * zr[n];
    }
    for (int64_t l = 0; l < Q; ++l) {
      const double *__restrict ar = pr.data() + l * N, *__restrict ai = pi.data() + l * N;
      const double *__restrict nr = ar + N, *__restrict ni = ai + N;  // z^{l+1}
      double k = 0;  // K_l / 2 = Re sum_n Ct_n z_n^l
#pragma omp simd reduction(+ : k)
      for (int64_t n = 0; n < N; ++n) k += cr[n] * ar[n] - ci[n] * ai[n];
      K[size_t(l)] = float(2.0 * k);
      float* mrow = MP.data() + l * W;
      for (int64_t n = 0; n < N; ++n) {  // O's column j = l: Ct z^{l+1}; P's row l: z^{Q-1-l}
        O[size_t(n * Q + l)] = float(2.0 * (cr[n] * nr[n] - ci[n] * ni[n]));
        O[size_t((N + n) * Q + l)] = float(-2.0 * (cr[n] * ni[n] + ci[n] * nr[n]));
        mrow[Q + n] = float(pr[size_t((Q - 1 - l) * N + n)]), mrow[Q + N + n] = float(pi[size_t((Q - 1 - l) * N + n)]);
      }
    }
    for (int64_t i = 0; i < Q; ++i) {  // M_ij = K_{j-i}, j >= i
      float* mrow = MP.data() + i * W;
      std::fill(mrow, mrow + i, 0.0f);
      std::copy(K.data(), K.data() + (Q - i), mrow + i);
    }
  }
  cd power(int64_t l, int64_t n, int64_t N) const { return cd(pr[size_t(l * N + n)], pi[size_t(l * N + n)]); }
};

// A (B,C,N) complex state as its two float tensors; null pointers where absent.
struct S4dState {
  Tensor re, im;
  const float* r() const { return re.numel() ? re.ptr() : nullptr; }
  const float* i() const { return im.numel() ? im.ptr() : nullptr; }
};
S4dState state_in(const Call& c, const char* re, const char* im) {
  S4dState s;
  if (c.has(re)) s.re = c.t(re), s.im = c.t(im);
  return s;
}

// A panel of kPanel channels [c0, c0 + nch) of x (B,T,C) as P (B, nch, Tp): every channel's
// sequence contiguous, zero past T (8 x 8 transposes; a row of the panel in x is one cache line).
// Panel by panel, the transposes stay in the caches: the whole (B,C,T) copies of u, dy, y, du
// (8 MiB each at T = 4096, C 512) were 16% of the backward, and their pages' first touches more.
constexpr int64_t kPanel = 16;
void panel_in(float* P, const float* x, int64_t B, int64_t T, int64_t C, int64_t Tp, int64_t c0, int64_t nch) {
  for (int64_t b = 0; b < B; ++b) {
    float* pb = P + b * nch * Tp;
    transpose(pb, Tp, x + b * T * C + c0, C, T, nch);
    for (int64_t j = 0; j < nch; ++j) std::fill(pb + j * Tp + T, pb + (j + 1) * Tp, 0.0f);
  }
}
// the way back: P (B, nch, Tp) -> channels [c0, c0 + nch) of x (B,T,C)
void panel_out(float* x, const float* P, int64_t B, int64_t T, int64_t C, int64_t Tp, int64_t c0, int64_t nch) {
  for (int64_t b = 0; b < B; ++b) transpose(x + b * T * C + c0, C, P + b * nch * Tp, Tp, nch, T);
}

// The forward of sequence b, channel ch: US (nc x W) holds the chunks of u in its first Q
// columns (set by the caller); the states S_{c-1} are written into its last 2N columns, Z (nc x W)
// gets the intra-chunk outputs plus the state's part in its first Q columns (then y = Z + D u) and
// L_c in the rest. x0: the initial state's (re, im) of this (b, ch) or null; fin: the final state
// (N complex) or null.
void chunk_forward(const S4dChunks& g, const S4dTables& tb, float* US, float* Z, const float* x0r,
                   const float* x0i, cd* fin) {
  const int64_t Q = g.Q, N = g.N, W = g.W, nc = g.nc;
  gemm_nn(Z, US, tb.MP.data(), nc, W, Q, W, W, W, 1.0f, 0.0f);
  thread_local std::vector<cd> S;
  S.resize(size_t(N));
  for (int64_t n = 0; n < N; ++n) S[size_t(n)] = x0r ? cd(x0r[n], x0i[n]) : cd(0.0);
  for (int64_t c = 0; c < nc; ++c) {
    float* sp = US + c * W + Q;  // S_{c-1}
    for (int64_t n = 0; n < N; ++n) sp[n] = float(S[size_t(n)].real()), sp[N + n] = float(S[size_t(n)].imag());
    if (c + 1 == nc) break;
    const float* L = Z + c * W + Q;
    for (int64_t n = 0; n < N; ++n) S[size_t(n)] = tb.power(Q, n, N) * S[size_t(n)] + cd(L[n], L[N + n]);
  }
  if (fin) {  // S_final = z^r S_{nc-2} + sum_{i<r} z^{r-1-i} u_i over the last chunk
    const float* ul = US + (nc - 1) * W;
    for (int64_t n = 0; n < N; ++n) {
      cd s = tb.power(g.r, n, N) * S[size_t(n)];
      for (int64_t i = 0; i < g.r; ++i) s += double(ul[i]) * tb.power(g.r - 1 - i, n, N);
      fin[n] = s;
    }
  }
  gemm_nn(Z, US + Q, tb.O.data(), nc, Q, 2 * N, W, Q, W, 1.0f, 1.0f);
}

TensorMap s4d_parallel(const Call& c) {
  const int64_t B = c.d("B"), T = c.d("T"), C = c.d("C"), N = c.d("N");
  const S4dParams p = discretise(c);
  const S4dChunks g(T, N);
  const int64_t Tp = g.padded(), Q = g.Q, W = g.W;
  const S4dState x0 = state_in(c, "state.x_re", "state.x_im");
  S4dState xT;
  if (c.final_state) xT = S4dState{Tensor::uninitialized({B, C, N}), Tensor::uninitialized({B, C, N})};
  Tensor y = Tensor::uninitialized({B, T, C});
  const float *u = c.t("u").ptr(), *D = c.t("D").ptr();
  const int64_t ngrp = (C + kPanel - 1) / kPanel, np = B * kPanel * Tp;
  // every thread's panels (u, y), taken here in one piece: taken inside the region, on the
  // workers' own malloc arenas, which hand large blocks back when freed, they faulted in every call
  const std::unique_ptr<float[]> panels(new float[size_t(2 * np * omp_get_max_threads())]);
  // u left unchecked by validation (Call::unchecked): checked in its panels, in cache
  std::atomic<uint32_t>* bad = c.unchecked_bad.get();
#pragma omp parallel
  {
    S4dTables tb;
    std::vector<float> US(size_t(g.nc * W)), Z(size_t(g.nc * W));
    float *uP = panels.get() + 2 * np * omp_get_thread_num(), *yP = uP + np;
    std::vector<cd> fin(static_cast<size_t>(N));
    RowCheck<false> chk;
#pragma omp for schedule(static)
    for (int64_t grp = 0; grp < ngrp; ++grp) {
      const int64_t c0 = grp * kPanel, nch = std::min(kPanel, C - c0);
      panel_in(uP, u, B, T, C, Tp, c0, nch);
      if (bad) chk.add(uP, B * nch * Tp);  // (zeros past T)
      for (int64_t j = 0; j < nch; ++j) {
        const int64_t ch = c0 + j;
        tb.build(p, g, ch);
        for (int64_t b = 0; b < B; ++b) {
          const float* uc = uP + (b * nch + j) * Tp;
          for (int64_t cc = 0; cc < g.nc; ++cc) std::copy(uc + cc * Q, uc + (cc + 1) * Q, US.data() + cc * W);
          const int64_t si = (b * C + ch) * N;
          chunk_forward(g, tb, US.data(), Z.data(), x0.r() ? x0.r() + si : nullptr, x0.r() ? x0.i() + si : nullptr,
                        c.final_state ? fin.data() : nullptr);
          float* yc = yP + (b * nch + j) * Tp;
          const float d = D[ch];
          for (int64_t cc = 0; cc < g.nc; ++cc)
            for (int64_t t = 0; t < Q; ++t) yc[cc * Q + t] = Z[size_t(cc * W + t)] + d * uc[cc * Q + t];
          if (c.final_state)
            for (int64_t n = 0; n < N; ++n)
              xT.re.ptr()[si + n] = float(fin[size_t(n)].real()), xT.im.ptr()[si + n] = float(fin[size_t(n)].imag());
        }
      }
      panel_out(y.ptr(), yP, B, T, C, Tp, c0, nch);
    }
    if (bad && chk.bad()) bad->fetch_or(1u);
  }
  TensorMap out = moved_map("y", std::move(y));
  if (c.final_state) out["state.x_re"] = std::move(xT.re), out["state.x_im"] = std::move(xT.im);
  return out;
}

// Backward, in the complex-gradient convention G_w = dL/dRe(w) + i dL/dIm(w) (for holomorphic
// w = h(p): G_p = conj(h'(p)) G_w). Per sequence, with G (nc x Q) the chunks of dy:
//   dS_{c-1} (as the rows S_{c-1} of US) = G O^T, and back across the chunks: the state after
//   chunk c collects dS_c = dSp_{c+1} + conj(m_{c+1}) dS_{c+1} (m = z^Q, the last one z^r; the
//   final state's own gradient from dfinal), dL_c = dS_c, G_m += conj(S_{c-1}) dS_c, the initial
//   state's dS_{-1}.
//   With GL = [G | dL] (nc x W): du = GL MP^T + D g (the last chunk's dL through its own
//   z^{r-1-i}), and [dMP; dO .] += US^T GL (W x W), summed over the sequences.
// Then through the tables: dK_l = sum_{j-i=l} dM_ij; G of z^{Q-1-i} = dP_i (re + i im); G of
// Ct z^{j+1} = 2 dO_j (re - i im); K_l = 2 Re(Ct z^l); then z = exp(dt A), Ct = C (z - 1) / A:
//   G_Ct = 2 sum_l dK_l conj(z^l) + sum_j conj(z^{j+1}) G_w(j)
//   G_z  = 2 sum_l dK_l conj(Ct l z^(l-1)) + sum_j conj(Ct (j+1) z^j) G_w(j)
//          + sum_i conj((Q-1-i) z^(Q-2-i)) G_P(i) + conj(Q z^(Q-1)) G_zQ + conj(r z^(r-1)) G_zr
//          + (last chunk) + conj(C / A) G_Ct
//   G_C = conj((z - 1) / A) G_Ct,  G_A = conj(-C (z - 1) / A^2) G_Ct + conj(dt z) G_z
//   dL/d dt = sum_n Re(conj(G_z) A z),  d log_dt = dt dL/d dt.
TensorMap s4d_grad(const Call& c, const Tensor& dy) {
  const int64_t B = c.d("B"), T = c.d("T"), C = c.d("C"), N = c.d("N");
  const S4dParams p = discretise(c);
  const S4dChunks g(T, N);
  const int64_t Tp = g.padded(), Q = g.Q, W = g.W, nc = g.nc, r = g.r;
  const float *u = c.t("u").ptr(), *D = c.t("D").ptr(), *gy = dy.ptr(), *log_dt = c.t("log_dt").ptr();
  const float *are = c.t("A_re").ptr(), *aim = c.t("A_im").ptr(), *cre = c.t("C_re").ptr(), *cim = c.t("C_im").ptr();
  Tensor y = Tensor::uninitialized({B, T, C}), du = Tensor::uninitialized({B, T, C}), dlog_dt({C}), dA_re({C, N}),
         dA_im({C, N}), dC_re({C, N}), dC_im({C, N}), dD({C});
  const S4dState x0 = state_in(c, "state.x_re", "state.x_im"), dT = state_in(c, "dfinal.x_re", "dfinal.x_im");
  S4dState dx0;
  if (x0.r()) dx0 = S4dState{Tensor({B, C, N}), Tensor({B, C, N})};
  const int64_t ngrp = (C + kPanel - 1) / kPanel, np = B * kPanel * Tp;
  // every thread's panels (u, dy, y, du), taken here in one piece (see s4d_parallel)
  const std::unique_ptr<float[]> panels(new float[size_t(4 * np * omp_get_max_threads())]);
#pragma omp parallel
  {
    S4dTables tb;
    float *uP = panels.get() + 4 * np * omp_get_thread_num(), *gP = uP + np, *yP = gP + np, *duP = yP + np;
    std::vector<float> US(size_t(nc * W)), Z(size_t(nc * W)), GL(size_t(nc * W)), dU(size_t(nc * Q)), dAll(size_t(W * W));
    std::vector<cd> GzQ(static_cast<size_t>(N)), Gzr(static_cast<size_t>(N)), Glast(size_t(N * Q)), dS(static_cast<size_t>(N));
    std::vector<double> dK(static_cast<size_t>(Q));
#pragma omp for schedule(static)
    for (int64_t grp = 0; grp < ngrp; ++grp) {
    const int64_t c0 = grp * kPanel, nch = std::min(kPanel, C - c0);
    panel_in(uP, u, B, T, C, Tp, c0, nch);
    panel_in(gP, gy, B, T, C, Tp, c0, nch);
    for (int64_t jc = 0; jc < nch; ++jc) {
      const int64_t ch = c0 + jc;
      tb.build(p, g, ch);
      std::fill(GzQ.begin(), GzQ.end(), cd(0.0)), std::fill(Gzr.begin(), Gzr.end(), cd(0.0));
      std::fill(Glast.begin(), Glast.end(), cd(0.0));
      double dDc = 0;
      const double d = D[ch];
      for (int64_t b = 0; b < B; ++b) {
        const float *uc = uP + (b * nch + jc) * Tp, *gc = gP + (b * nch + jc) * Tp;
        for (int64_t cc = 0; cc < nc; ++cc) {
          std::copy(uc + cc * Q, uc + (cc + 1) * Q, US.data() + cc * W);
          std::copy(gc + cc * Q, gc + (cc + 1) * Q, GL.data() + cc * W);
        }
        const int64_t si = (b * C + ch) * N;
        chunk_forward(g, tb, US.data(), Z.data(), x0.r() ? x0.r() + si : nullptr, x0.r() ? x0.i() + si : nullptr,
                      nullptr);
        float* yc = yP + (b * nch + jc) * Tp;
        for (int64_t cc = 0; cc < nc; ++cc) {
          float dd = 0;  // (per chunk in float, the chunks' sums in float64)
          for (int64_t t = cc * Q; t < (cc + 1) * Q; ++t)
            yc[t] = Z[size_t(cc * W + t - cc * Q)] + float(d) * uc[t], dd += gc[t] * uc[t];
          dDc += dd;
        }
        // dS_{c-1} = G O^T into GL's last 2N columns, then back across the chunks
        gemm_nt(GL.data() + Q, GL.data(), tb.O.data(), nc, 2 * N, Q, W, Q, W, 1.0f, 0.0f);
        for (int64_t n = 0; n < N; ++n) dS[size_t(n)] = dT.r() ? cd(dT.r()[si + n], dT.i()[si + n]) : cd(0.0);
        for (int64_t cc = nc - 1; cc >= 0; --cc) {
          float* row = GL.data() + cc * W + Q;  // dSp_c in, dL_c out
          const float* sp = US.data() + cc * W + Q;
          const bool last = cc == nc - 1;
          for (int64_t n = 0; n < N; ++n) {
            const cd dSc = dS[size_t(n)], Sp(sp[n], sp[N + n]), dSp(row[n], row[N + n]);
            const cd m = tb.power(last ? r : Q, n, N);
            (last ? Gzr : GzQ)[size_t(n)] += std::conj(Sp) * dSc;
            // the last chunk's L goes through z^{r-1-i}, not P's z^{Q-1-i}: its dL is kept apart
            row[n] = last ? 0.0f : float(dSc.real()), row[N + n] = last ? 0.0f : float(dSc.imag());
            dS[size_t(n)] = dSp + std::conj(m) * dSc;
          }
        }
        if (x0.r())
          for (int64_t n = 0; n < N; ++n)
            dx0.re.ptr()[si + n] = float(dS[size_t(n)].real()), dx0.im.ptr()[si + n] = float(dS[size_t(n)].imag());
        // du = GL MP^T + D g, and the last chunk's dL (dfinal) through z^{r-1-i}
        gemm_nt(dU.data(), GL.data(), tb.MP.data(), nc, Q, W, W, W, Q, 1.0f, 0.0f);
        if (dT.r()) {
          const float* ul = uc + (nc - 1) * Q;
          for (int64_t i = 0; i < r; ++i) {
            double acc = 0;
            for (int64_t n = 0; n < N; ++n) {
              const cd G(dT.r()[si + n], dT.i()[si + n]), w = tb.power(r - 1 - i, n, N);
              acc += w.real() * G.real() + w.imag() * G.imag();
              Glast[size_t(i * N + n)] += double(ul[i]) * G;  // G of z^{r-1-i}
            }
            dU[size_t((nc - 1) * Q + i)] += float(acc);
          }
        }
        float* duc = duP + (b * nch + jc) * Tp;
        for (int64_t t = 0; t < Tp; ++t) duc[t] = dU[size_t(t)] + float(d) * gc[t];
        gemm_tn(dAll.data(), US.data(), GL.data(), W, W, nc, W, W, W, 1.0f, b == 0 ? 0.0f : 1.0f);
      }
      dD.data[ch] = float(dDc);
      const double dt = std::exp(double(log_dt[ch]));
      double ddt = 0;
      for (int64_t l = 0; l < Q; ++l) {  // dK_l = sum_{j - i = l} dM_ij
        dK[size_t(l)] = 0;
        for (int64_t a = 0; a + l < Q; ++a) dK[size_t(l)] += dAll[size_t(a * W + a + l)];
      }
      for (int64_t n = 0; n < N; ++n) {
        const int64_t i = ch * N + n;
        const cd z = p.Abar[i], Ct = p.Ct[i];
        const cd A(are[i], aim[i]), Cc(cre[i], cim[i]);
        auto zp = [&](int64_t l) { return tb.power(l, n, N); };
        cd GCt = 0.0, Gz = 0.0;
        for (int64_t l = 0; l < Q; ++l) {
          GCt += 2.0 * dK[size_t(l)] * std::conj(zp(l));
          if (l > 0) Gz += 2.0 * dK[size_t(l)] * std::conj(Ct * double(l) * zp(l - 1));
          const cd GP(dAll[size_t(l * W + Q + n)], dAll[size_t(l * W + Q + N + n)]);  // G of z^{Q-1-l}
          if (Q - 1 - l > 0) Gz += std::conj(double(Q - 1 - l) * zp(Q - 2 - l)) * GP;
          const cd Gw(2.0 * dAll[size_t((Q + n) * W + l)], -2.0 * dAll[size_t((Q + N + n) * W + l)]);  // Ct z^{l+1}
          GCt += std::conj(zp(l + 1)) * Gw;
          Gz += std::conj(Ct * double(l + 1) * zp(l)) * Gw;
          if (l < r && r - 1 - l > 0) Gz += std::conj(double(r - 1 - l) * zp(r - 2 - l)) * Glast[size_t(l * N + n)];
        }
        Gz += std::conj(double(Q) * zp(Q - 1)) * GzQ[size_t(n)] + std::conj(double(r) * zp(r - 1)) * Gzr[size_t(n)];
        Gz += std::conj(Cc / A) * GCt;
        const cd GC = std::conj((z - 1.0) / A) * GCt;
        const cd GA = std::conj(-Cc * (z - 1.0) / (A * A)) * GCt + std::conj(dt * z) * Gz;
        ddt += (std::conj(Gz) * A * z).real();
        dA_re.data[i] = float(GA.real()), dA_im.data[i] = float(GA.imag());
        dC_re.data[i] = float(GC.real()), dC_im.data[i] = float(GC.imag());
      }
      dlog_dt.data[ch] = float(dt * ddt);
    }
    panel_out(y.ptr(), yP, B, T, C, Tp, c0, nch);
    panel_out(du.ptr(), duP, B, T, C, Tp, c0, nch);
    }
  }
  TensorMap out = moved_map("y", std::move(y), "du", std::move(du), "dlog_dt", std::move(dlog_dt), "dA_re",
                            std::move(dA_re), "dA_im", std::move(dA_im), "dC_re", std::move(dC_re), "dC_im",
                            std::move(dC_im), "dD", std::move(dD));
  if (x0.r()) out["dstate.x_re"] = std::move(dx0.re), out["dstate.x_im"] = std::move(dx0.im);
  return out;
}


MixerSpec make_spec() {
  MixerSpec s;
  s.name = "s4d";
  s.own_dims = [](std::map<std::string, int64_t>& d, Scale scale, bool) {
    d["N"] = scale == Scale::Test ? 4 : scale == Scale::Grad ? 2 : scale == Scale::Demo ? 8 : 16;
  };
  s.paper = "Gu et al. 2022, On the Parameterization and Initialization of Diagonal State Space Models (S4D)";
  s.summary = "diagonal complex state space model (chunked: Toeplitz GEMMs within chunks, the state across)";
  s.causal_ok = true;
  s.noncausal_ok = false;
  s.inputs = {{"u", "B,T,C"},    {"log_dt", "C"}, {"A_re", "C,N"}, {"A_im", "C,N"},
              {"C_re", "C,N"},   {"C_im", "C,N"}, {"D", "C"}};
  s.state = {{"x_re", "B,C,N"}, {"x_im", "B,C,N"}};
  s.state_size = "2 C N per sequence (complex state)";
  s.time = "O(T C (Q + 4 N)), Q = 64";
  s.memory = "O(16 T) per thread (panels of 16 channels, each sequence contiguous)";
  s.blocking = {{"T", kChunk}};
  s.example_fix = [](TensorMap& in) {  // S4D-Lin-like domain: dt in ~[1e-3, 1e-1], Re A < 0
    for (auto& x : in["log_dt"].data) x = -4.6f + 2.3f * (0.5f + 0.5f * std::tanh(x));
    for (auto& x : in["A_re"].data) x = -0.5f * std::exp(0.5f * x);
    for (auto& x : in["A_im"].data) x *= 3.0f;
  };
  s.check = [](const Call& c) {
    const Tensor& a = c.t("A_re");
    for (int64_t i = 0; i < a.numel(); ++i)
      LINMIX_CHECK(a.data[i] < 0.0f, "tensor 'A_re': must be < 0 (a stable diagonal SSM); A_re[" + std::to_string(i) +
                                         "] = " + std::to_string(a.data[i]));
  };
  s.y_dims = "B,T,C";
  s.state_all_modes = true;  // every form starts from state.x_re / x_im and returns the final x
  set_reference(s, [](const Call& c, const auto& x) {
    using S = scalar_of<decltype(x)>;
    const int64_t B = c.d("B"), T = c.d("T"), C = c.d("C"), N = c.d("N");
    std::vector<S> y(B * T * C + 2 * B * C * N);
    S* fin = y.data() + B * T * C;
    ref::s4d_ref<S>(y.data(), x.at("u").data(), x.at("log_dt").data(), x.at("A_re").data(), x.at("A_im").data(),
                    x.at("C_re").data(), x.at("C_im").data(), x.at("D").data(), B, T, C, N, opt_in(x, "state.x_re"),
                    opt_in(x, "state.x_im"), fin, fin + B * C * N);
    return y;
  });
  s.parallel = s4d_parallel;
  s.kernel_checks_values = true;  // s4d_parallel checks u in its panels
  s.stepper = [](const Call& c) {
    const int64_t C = c.d("C"), N = c.d("N");
    const S4dParams p = discretise(c);  // once: the discretised A and C of every channel
    const ChannelBlocks L{C, N};  // the (channel block, n, channel) layout of every array
    auto ab = std::make_shared<std::vector<float>>(4 * C * N);  // Abar re, im; Ct re, im
    for (int64_t ch = 0; ch < C; ++ch)
      for (int64_t n = 0; n < N; ++n) {
        const int64_t i = ch * N + n, o = L.at(ch, n);
        (*ab)[o] = float(p.Abar[i].real()), (*ab)[C * N + o] = float(p.Abar[i].imag()),
        (*ab)[2 * C * N + o] = float(p.Ct[i].real()), (*ab)[3 * C * N + o] = float(p.Ct[i].imag());
      }
    auto x = std::make_shared<std::vector<float>>(2 * C * N, 0.0f);  // state re, im
    const float *u = c.t("u").ptr(), *D = c.t("D").ptr();
    auto save = [=] {  // the spec's (1, C, N) layout
      Tensor xr({1, C, N}), xi({1, C, N});
      for (int64_t ch = 0; ch < C; ++ch)
        for (int64_t n = 0; n < N; ++n)
          xr.data[ch * N + n] = (*x)[L.at(ch, n)], xi.data[ch * N + n] = (*x)[C * N + L.at(ch, n)];
      return moved_map("state.x_re", std::move(xr), "state.x_im", std::move(xi));
    };
    auto load = [=](const TensorMap& m) {
      const Tensor &xr = m.at("state.x_re"), &xi = m.at("state.x_im");
      for (int64_t ch = 0; ch < C; ++ch)
        for (int64_t n = 0; n < N; ++n)
          (*x)[L.at(ch, n)] = xr.data[ch * N + n], (*x)[C * N + L.at(ch, n)] = xi.data[ch * N + n];
    };
    // Block by block, its sums in registers through its N state rows; the blocks over the threads
    // when the floats a token streams through L2 (Abar, Ct, x: 6 C N) are many
    // (kStepParallelFloats), each core keeping its channels' state in its own L2. Measured (one
    // token, C 512, N 16, a driver timing the stepper alone): 3.4 us -> 3.4 on one thread, 2.4 on two.
    auto step = [=](float* y) {
      const float *ar = ab->data(), *ai = ar + C * N, *cr = ai + C * N, *ci = cr + C * N;
      float *xr = x->data(), *xi = xr + C * N;
      const int64_t nb = L.count();
#pragma omp parallel for schedule(static) if (nb > 1 && 6 * C * N >= kStepParallelFloats)
      for (int64_t b = 0; b < nb; ++b) {
        const int64_t c0 = b * L.kBlock, w = L.width(c0);
        float acc[L.kBlock] = {};
        for (int64_t n = 0; n < N; ++n) {  // x = Abar x + u; acc += Re(Ct x)
          const int64_t o = L.row(c0, n);
          const float *__restrict ar_ = ar + o, *__restrict ai_ = ai + o, *__restrict cr_ = cr + o,
                      *__restrict ci_ = ci + o, *__restrict u_ = u + c0;
          float *__restrict xr_ = xr + o, *__restrict xi_ = xi + o;
#pragma omp simd
          for (int64_t j = 0; j < w; ++j) {
            const float r = ar_[j] * xr_[j] - ai_[j] * xi_[j] + u_[j], i = ar_[j] * xi_[j] + ai_[j] * xr_[j];
            xr_[j] = r, xi_[j] = i;
            acc[j] += cr_[j] * r - ci_[j] * i;
          }
        }
        for (int64_t j = 0; j < w; ++j) y[c0 + j] = 2.0f * acc[j] + D[c0 + j] * u[c0 + j];
      }
    };
    return Stepper{step, save, load};
  };
  s.backward = s4d_grad;
  return s;
}

}  // namespace

MixerSpec s4d_spec() { return make_spec(); }

}  // namespace linmix
