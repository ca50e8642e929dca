// flow — Flow-Attention (Wu et al. 2022, "Flowformer"), exactly as MIXERS.md writes it
// (eq. 5-9 of the paper; causal version as the paper's causal code: every sum a prefix sum,
// normalised by the position count r_i = i + 1). Q = sigma(q), K = sigma(k), eps = 1e-6.
// parallel: one O(T D) pass for the flow scalars (incoming I, outgoing O, conserved
// Ihat / Ohat, allocation, competition), then the kernelised product
// y_i = alloc_i (Q_i I_i / r_i)^T sum_j K_j (v_j comp_j)^T: causal on the gated chunked kernels
// with a log decay of 0 and their fused backward (flow_causal_run), non-causal through
// kernels/linear_product.
// recurrent: the prefix sums and KV (D,E) as state.
#include <array>

#include "../kernels/linear_product.h"
#include "../ref/ref_util.h"
#include "common.h"
#include "decay_forms.h"
#include "linmix/kernels.h"

namespace linmix::ref {

// ---- flow: the float64 reference (the literal formula, templated for the tape) ----
// Flow-Attention, the literal formula of MIXERS.md: every sum written out over its index set
// (j < lim(i): all j, or j <= i when causal), then the T x T weights
// W_ij = (Q_i I_i / r_i) . K_j comp_j, y_i = alloc_i sum_j W_ij v_j.
// A causal state (st: sumK, sumQ, sumKO, sumQI (B,H,D), sumexp (B,H), KV (B,H,D,E), pos (B): the
// sums over the pos tokens before 0; null: none) is every prefix sum's value before token 0,
// and positions count on from pos (r_i = pos + i + 1); with fin the final state is written in
// the same order (pos + T last).
template <class S>
void flow_ref(S* y, const S* q, const S* k, const S* v, const AttnDims& d, bool causal,
              const std::array<const S*, 7>& st = {}, S* fin = nullptr) {
  const int64_t T = d.T, H = d.H, D = d.D, E = d.E, BH = d.B * H;
  const double eps = 1e-6;
  const bool s0 = st[0] != nullptr;
  double pos = 0.0;  // of the batch row b below: a count, not differentiated
  std::vector<S> Q(T * D), K(T * D), I(T), O(T), Ih(T), Oh(T), comp(T), W(T * T);
  auto sig = [](const S& x) { return S(1) / (1 + exp(-x)); };
  auto lim = [&](int64_t i) { return causal ? i + 1 : T; };
  auto r = [&](int64_t i) { return causal ? pos + double(i + 1) : 1.0; };
  auto base = [&](int n, int64_t bh, int64_t x) { return s0 ? st[n][bh * D + x] : S(0); };  // a sum's state
  for (int64_t b = 0; b < d.B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      const int64_t bh = b * H + h;
      pos = s0 ? ad::value(st[6][b]) : 0.0;
      for (int64_t t = 0; t < T; ++t)
        for (int64_t x = 0; x < D; ++x) {
          Q[t * D + x] = sig(q[((b * T + t) * H + h) * D + x]);
          K[t * D + x] = sig(k[((b * T + t) * H + h) * D + x]);
        }
      for (int64_t i = 0; i < T; ++i) {
        S a = 0, c = 0;
        for (int64_t x = 0; x < D; ++x) {
          S sk = base(0, bh, x), sq = base(1, bh, x);
          for (int64_t j = 0; j < lim(i); ++j) sk += K[j * D + x], sq += Q[j * D + x];
          a += (Q[i * D + x] + eps) * (sk + eps);
          c += (K[i * D + x] + eps) * (sq + eps);
        }
        I[i] = r(i) / a;
        O[i] = r(i) / c;
      }
      for (int64_t i = 0; i < T; ++i) {
        S a = 0, c = 0;
        for (int64_t x = 0; x < D; ++x) {
          S sko = base(2, bh, x), sqi = base(3, bh, x);
          for (int64_t j = 0; j < lim(i); ++j) sko += K[j * D + x] * O[j], sqi += Q[j * D + x] * I[j];
          a += (Q[i * D + x] + eps) * (sko + eps);
          c += (K[i * D + x] + eps) * (sqi + eps);
        }
        Ih[i] = a / r(i);
        Oh[i] = std::clamp(c / r(i), S(-1.0), S(1.0));
      }
      for (int64_t i = 0; i < T; ++i) {
        S z = s0 ? st[4][bh] : S(0);
        for (int64_t j = 0; j < lim(i); ++j) z += exp(Oh[j]);
        comp[i] = exp(Oh[i]) / z * (causal ? r(i) : double(T));
      }
      for (int64_t i = 0; i < T; ++i)
        for (int64_t j = 0; j < T; ++j) {
          S w = 0;
          if (j < lim(i))
            for (int64_t x = 0; x < D; ++x) w += Q[i * D + x] * I[i] / r(i) * K[j * D + x];
          W[i * T + j] = w * comp[j];
        }
      for (int64_t i = 0; i < T; ++i)
        for (int64_t e = 0; e < E; ++e) {
          S acc = 0;
          for (int64_t j = 0; j < T; ++j) acc += W[i * T + j] * v[((b * T + j) * H + h) * E + e];
          if (s0)  // the state's KV = sum over the tokens before 0 of K_j (v_j comp_j)^T
            for (int64_t x = 0; x < D; ++x) acc += Q[i * D + x] * I[i] / r(i) * st[5][(bh * D + x) * E + e];
          y[((b * T + i) * H + h) * E + e] = acc * sig(Ih[i]);
        }
      if (fin) {  // the final state: every sum over all T tokens on top of the state's
        S* f = fin;
        for (int n = 0; n < 4; ++n, f += BH * D)
          for (int64_t x = 0; x < D; ++x) {
            S acc = base(n, bh, x);
            for (int64_t j = 0; j < T; ++j)
              acc += n == 0 ? K[j * D + x] : n == 1 ? Q[j * D + x] : n == 2 ? K[j * D + x] * O[j] : Q[j * D + x] * I[j];
            f[bh * D + x] = acc;
          }
        S z = s0 ? st[4][bh] : S(0);
        for (int64_t j = 0; j < T; ++j) z += exp(Oh[j]);
        f[bh] = z;
        f += BH;
        for (int64_t x = 0; x < D; ++x)
          for (int64_t e = 0; e < E; ++e) {
            S acc = s0 ? st[5][(bh * D + x) * E + e] : S(0);
            for (int64_t j = 0; j < T; ++j) acc += K[j * D + x] * v[((b * T + j) * H + h) * E + e] * comp[j];
            f[(bh * D + x) * E + e] = acc;
          }
        f += BH * D * E;
        f[b] = S(pos + double(T));
      }
    }
}

}  // namespace linmix::ref

namespace linmix {

namespace {

constexpr float kEps = 1e-6f;

inline float dot_eps(const float* a, const float* b, int64_t D) {  // (a + eps) . (b + eps)
  float s = 0.0f;
#pragma omp simd reduction(+ : s)  // SIMD partial sums: a serial chain of D adds was the forward's bottleneck
  for (int64_t x = 0; x < D; ++x) s += (a[x] + kEps) * (b[x] + kEps);
  return s;
}

}  // namespace

// State of one sequence, per head: prefix sums sumK, sumQ, sumKO, sumQI: (H,D);
// sumexp: (H) = sum exp(Ohat); KV: (H,D,E) = sum K_j (v_j comp_j)^T; pos = tokens seen.
struct FlowState {
  int64_t H = 0, D = 0, E = 0, pos = 0;
  std::vector<float> sumK, sumQ, sumKO, sumQI, sumexp, KV;
};

void flow_step(float* y, FlowState& st, const float* q, const float* k, const float* v, std::vector<float>& scratch) {
  const int64_t H = st.H, D = st.D, E = st.E;
  const float r = float(st.pos + 1);
  scratch.resize(static_cast<size_t>(2 * D));
  float *Q = scratch.data(), *K = Q + D;
  for (int64_t h = 0; h < H; ++h) {
    for (int64_t x = 0; x < D; ++x) Q[x] = sigmoidf(q[h * D + x]), K[x] = sigmoidf(k[h * D + x]);
    float *sK = &st.sumK[h * D], *sQ = &st.sumQ[h * D], *sKO = &st.sumKO[h * D], *sQI = &st.sumQI[h * D];
    for (int64_t x = 0; x < D; ++x) sK[x] += K[x], sQ[x] += Q[x];
    const float I = r / dot_eps(Q, sK, D), O = r / dot_eps(K, sQ, D);
    for (int64_t x = 0; x < D; ++x) sKO[x] += K[x] * O, sQI[x] += Q[x] * I;
    const float Ihat = dot_eps(Q, sKO, D) / r;
    const float Ohat = std::clamp(dot_eps(K, sQI, D) / r, -1.0f, 1.0f);
    const float alloc = sigmoidf(Ihat);
    st.sumexp[h] += std::exp(Ohat);
    const float comp = std::exp(Ohat) / st.sumexp[h] * r;
    float* KV = &st.KV[h * D * E];
    for (int64_t x = 0; x < D; ++x)
      for (int64_t e = 0; e < E; ++e) KV[x * E + e] += K[x] * v[h * E + e] * comp;
    float* yr = y + h * E;
    std::fill(yr, yr + E, 0.0f);
    for (int64_t x = 0; x < D; ++x) {
      const float qs = Q[x] * I / r;
      for (int64_t e = 0; e < E; ++e) yr[e] += qs * KV[x * E + e];
    }
    for (int64_t e = 0; e < E; ++e) yr[e] *= alloc;
  }
  st.pos += 1;
}

// The state of a causal call in every form, in the spec's order: sumK, sumQ, sumKO, sumQI (B,H,D),
// sumexp (B,H), KV (B,H,D,E) (each null where absent: zeros, no final wanted, no gradient), and
// pos (B), the tokens before 0 of each sequence (positions count on from it; it has no gradient).
struct FlowStateIO {
  std::array<const float*, 6> s0{};  // before token 0
  std::array<float*, 6> sT{};        // after the last token
  std::array<const float*, 6> dT{};  // the final state's gradient
  std::array<float*, 6> d0{};        // the initial state's gradient
  std::vector<int64_t> pos;          // (B) tokens before 0 per sequence (empty: 0)
  int64_t at(int64_t b) const { return pos.empty() ? 0 : pos[size_t(b)]; }
};
constexpr int kSumexp = 4, kKV = 5;
const std::string kFlowState[7] = {"sumK", "sumQ", "sumKO", "sumQI", "sumexp", "KV", "pos"};  // the spec's order
// the rows of state tensor n for head bh (width D, 1 or D E)
inline int64_t flow_state_width(int n, int64_t D, int64_t E) { return n < kSumexp ? D : n == kSumexp ? 1 : D * E; }

// The non-causal form (the causal one: flow_causal_run).
void flow_forward(float* y, const float* q, const float* k, const float* v, const AttnDims& d) {
  const int64_t B = d.B, T = d.T, H = d.H, D = d.D, E = d.E;
#pragma omp parallel
  {
    // Q, K: (T,D) sigmoid rows, Q later scaled to Q I; Vc: (T,E) = v comp;
    // alloc: (T); scalars I, O, Ohat: (T); the sums: (D).
    std::vector<float> Q(T * D), K(T * D), Vc(T * E), Yh(T * E), alloc(T), I(T), O(T), Oh(T), sK(D), sQ(D), sKO(D),
        sQI(D);
#pragma omp for collapse(2) schedule(dynamic)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < H; ++h) {
        const int64_t row0 = b * T * H + h;
        gather_head(Q.data(), q, row0, T, H, D, sigmoid_fn);
        gather_head(K.data(), k, row0, T, H, D, sigmoid_fn);
        for (auto* x : {&sK, &sQ, &sKO, &sQI}) std::fill(x->begin(), x->end(), 0.0f);
        for (int64_t t = 0; t < T; ++t)
          for (int64_t x = 0; x < D; ++x) sK[x] += K[t * D + x], sQ[x] += Q[t * D + x];
        for (int64_t t = 0; t < T; ++t) {
          I[t] = 1.0f / dot_eps(&Q[t * D], sK.data(), D);
          O[t] = 1.0f / dot_eps(&K[t * D], sQ.data(), D);
          for (int64_t x = 0; x < D; ++x) sKO[x] += K[t * D + x] * O[t], sQI[x] += Q[t * D + x] * I[t];
        }
        float omax = kNegInf, sumexp = 0.0f;
        for (int64_t t = 0; t < T; ++t) {
          alloc[t] = sigmoidf(dot_eps(&Q[t * D], sKO.data(), D));
          Oh[t] = std::clamp(dot_eps(&K[t * D], sQI.data(), D), -1.0f, 1.0f);
          omax = vmax(omax, Oh[t]);
        }
        for (int64_t t = 0; t < T; ++t) sumexp += std::exp(Oh[t] - omax);
        for (int64_t t = 0; t < T; ++t) {
          const float comp = std::exp(Oh[t] - omax) / sumexp * float(T);
          for (int64_t e = 0; e < E; ++e) Vc[t * E + e] = v[(row0 + t * H) * E + e] * comp;
          for (int64_t x = 0; x < D; ++x) Q[t * D + x] *= I[t];
        }
        // the product into contiguous rows, then scaled by alloc into y's strided rows
        linear_product(Yh.data(), nullptr, Q.data(), K.data(), Vc.data(), {T, D, E, D, D, E, E});
        scatter_head(y, Yh.data(), row0, T, H, E, [&](int64_t t) { return alloc[t]; });
      }
  }
}

// Backward of flow_forward, per head. The forward is recomputed with every intermediate kept
// (O(T (D + E)) per head); "scan" is a prefix sum when causal and the total otherwise, and
// its adjoint a suffix sum (flow_adjoint_causal's running sums) or the total (flow_adjoint). With R_i = r_i (causal) or 1, and the
// competition multiplier n_i = r_i or T:
//   cK = scan K, cQ = scan Q;  a_i = (Q_i+eps).(cK_i+eps), I_i = R_i / a_i;  c_i, O_i alike
//   cKO = scan(K O), cQI = scan(Q I);  Ih_i = (Q_i+eps).(cKO_i+eps) / R_i;  Oraw_i alike, clamped
//   e = exp(Oh), Z = scan e, comp_i = e_i / Z_i n_i;  alloc = sigma(Ih)
//   o_i = sum_j (Q_i I_i / R_i . K_j) (v_j comp_j) over j <= i (or all);  y = o alloc
// and the backward walks these lines in reverse (each adjoint written next to its line).
// With a state (causal) every scan starts from the state's sum, R_i = n_i = pos + i + 1, and the
// product from the state's KV; the final state is each scan's last row (and the product's KV),
// so its gradient joins the last row of each adjoint before the reverse scan, and the initial
// state's gradient is each reverse scan's first row.

// One head's intermediates and adjoints (T,D), (T,E) or (T); buffers reused across heads and calls.
struct FlowWork {  // (every element written before it is read: scratch_vector leaves them unset)
  scratch_vector<float> Q, K, cK, cQ, cKO, cQI, Qs, dQ, dK, dQs, dKp, dcKO, dcQI, dcK, dcQ;  // (T,D)
  scratch_vector<float> Vc, dVc;                                                          // (T,E)
  scratch_vector<float> a, c, I, O, Ih, Oraw, e, Z, comp, alloc, dalloc, dI, dOv, de, dZ;  // (T)
  void resize(int64_t T, int64_t D, int64_t E) {
    for (auto* x : {&Q, &K, &cK, &cQ, &cKO, &cQI, &Qs, &dQ, &dK, &dQs, &dKp, &dcKO, &dcQI, &dcK, &dcQ})
      x->resize(size_t(T * D));
    for (auto* x : {&Vc, &dVc}) x->resize(size_t(T * E));
    for (auto* x : {&a, &c, &I, &O, &Ih, &Oraw, &e, &Z, &comp, &alloc, &dalloc, &dI, &dOv, &de, &dZ})
      x->resize(size_t(T));
  }
};

// The head (b, h) of a call: its positions, its state's rows, the scans.
struct FlowHead {
  int64_t b, bh, row0, T, H, D, E;
  bool causal;
  const FlowStateIO& st;
  float R(int64_t t) const { return causal ? float(st.at(b) + t + 1) : 1.0f; }
  float ncomp(int64_t t) const { return causal ? float(st.at(b) + t + 1) : float(T); }
  // every row of x (rows of width w) the sum of all: the non-causal forms' sums (the causal ones
  // run as running sums in flow_causal_rows and flow_adjoint_causal)
  void scan(float* x, int64_t w) const {
    for (int64_t t = 1; t < T; ++t)
      for (int64_t j = 0; j < w; ++j) x[j] += x[t * w + j];
    for (int64_t t = 1; t < T; ++t) std::copy(x, x + w, x + t * w);
  }
  // the initial state's gradient from the adjoint of a scan from state tensor n: the first row of
  // its reverse scan (flow_adjoint_causal's running sums, which start from the final state's)
  void to_initial(const float* dx, int n, int64_t w) const {
    if (float* g = causal ? state_rows(st.d0[n], bh, w) : nullptr) std::copy(dx, dx + w, g);
  }
};

// Exchanges the buffers of the forward's intermediates (flow_intermediates' outputs) of a and b.
inline void swap_intermediates(FlowWork& a, FlowWork& b) {
  for (auto [x, y] : {std::pair{&a.Q, &b.Q}, {&a.K, &b.K}, {&a.cK, &b.cK}, {&a.cQ, &b.cQ}, {&a.cKO, &b.cKO},
                      {&a.cQI, &b.cQI}, {&a.Qs, &b.Qs}, {&a.Vc, &b.Vc}, {&a.a, &b.a}, {&a.c, &b.c}, {&a.I, &b.I},
                      {&a.O, &b.O}, {&a.Ih, &b.Ih}, {&a.Oraw, &b.Oraw}, {&a.e, &b.e}, {&a.Z, &b.Z},
                      {&a.comp, &b.comp}, {&a.alloc, &b.alloc}})
    std::swap(*x, *y);
}

// The causal intermediates of a head in one pass over the rows: the prefix sums run in D floats
// each (in L1) instead of four (T,D) scans written and read again (1 MiB each a head at T 4096,
// out of L2: flow's forward was bound on them and ran 1.15 in the exponent of T). A forward that
// no backward follows (all = false) writes only what the product and its epilogue read (K, Qs,
// Vc, alloc); the backward's (all) every row of FlowWork the adjoint reads, the sums with the
// state's added (as the scans did, after the sums). Both run the same operations, so the kept
// forward's product operands are the recomputing backward's bit for bit.
void flow_causal_rows(FlowWork& w, const FlowHead& hd, const float* q, const float* k, const float* v, uint32_t* bad,
                      bool all) {
  const int64_t T = hd.T, H = hd.H, D = hd.D, E = hd.E, row0 = hd.row0;
  RowCheck<false> chk;
  thread_local std::vector<float> buf;
  buf.assign(size_t(8 * D), 0.0f);
  float *rK = buf.data(), *rQ = rK + D, *rKO = rQ + D, *rQI = rKO + D;  // the running sums
  float *Qrow = rQI + D, *cKrow = Qrow + D, *cQrow = cKrow + D, *cX = cQrow + D;  // a row's (all: FlowWork's)
  const float* s0[4];
  for (int n = 0; n < 4; ++n) s0[n] = state_rows(hd.st.s0[n], hd.bh, D);
  const float* z0 = state_rows(hd.st.s0[kSumexp], hd.bh, 1);
  auto with_state = [D](float* out, const float* run, const float* s) {
    if (!s) return std::copy(run, run + D, out), void();
#pragma omp simd
    for (int64_t x = 0; x < D; ++x) out[x] = run[x] + s[x];
  };
  float rZ = 0.0f, Zt = z0 ? z0[0] : 0.0f;
  float *K = w.K.data(), *Qs = w.Qs.data(), *Vc = w.Vc.data();
  for (int64_t t = 0; t < T; ++t) {
    const int64_t r0 = row0 + t * H;
    if (t + kPrefetchRows < T) {
      const int64_t ra = row0 + (t + kPrefetchRows) * H;
      prefetch_floats(q + ra * D, D), prefetch_floats(k + ra * D, D), prefetch_floats(v + ra * E, E);
    }
    const float *qr = q + r0 * D, *kr = k + r0 * D, *vr = v + r0 * E;
    if (bad) chk.add(qr, D), chk.add(kr, D), chk.add(vr, E);
    float *__restrict Kt = K + t * D, *__restrict Qt = all ? w.Q.data() + t * D : Qrow;
    float *cK = all ? w.cK.data() + t * D : cKrow, *cQ = all ? w.cQ.data() + t * D : cQrow;
#pragma omp simd
    for (int64_t x = 0; x < D; ++x) {
      Qt[x] = sigmoidf(qr[x]), Kt[x] = sigmoidf(kr[x]);
      rK[x] += Kt[x], rQ[x] += Qt[x];
    }
    with_state(cK, rK, s0[0]), with_state(cQ, rQ, s0[1]);
    const float r = hd.R(t), a = dot_eps(Qt, cK, D), c = dot_eps(Kt, cQ, D), I = r / a, O = r / c;
#pragma omp simd
    for (int64_t x = 0; x < D; ++x) rKO[x] += Kt[x] * O, rQI[x] += Qt[x] * I;
    const float ir = 1.0f / r;
    float* cKO = all ? w.cKO.data() + t * D : cX;
    with_state(cKO, rKO, s0[2]);
    const float Ih = dot_eps(Qt, cKO, D) * ir;
    float* cQI = all ? w.cQI.data() + t * D : cX;
    with_state(cQI, rQI, s0[3]);
    const float Oraw = dot_eps(Kt, cQI, D) * ir, e = std::exp(std::clamp(Oraw, -1.0f, 1.0f));
    const float alloc = sigmoidf(Ih);
    rZ += e;
    Zt = z0 ? rZ + z0[0] : rZ;
    const float comp = e / Zt * hd.ncomp(t), qs = I / r;
    w.alloc[t] = alloc;
    if (all) {
      w.a[t] = a, w.c[t] = c, w.I[t] = I, w.O[t] = O, w.Ih[t] = Ih, w.Oraw[t] = Oraw, w.e[t] = e;
      w.Z[t] = Zt, w.comp[t] = comp;
    }
    float *__restrict vc = Vc + t * E, *__restrict qo = Qs + t * D;
#pragma omp simd
    for (int64_t x = 0; x < E; ++x) vc[x] = vr[x] * comp;
#pragma omp simd
    for (int64_t x = 0; x < D; ++x) qo[x] = Qt[x] * qs;
  }
  if (bad) *bad |= chk.bad();
  const float* last[4] = {rK, rQ, rKO, rQI};  // the final sums (the state's own when T is 0)
  for (int n = 0; n < 4; ++n)
    if (float* f = state_rows(hd.st.sT[n], hd.bh, D)) with_state(f, last[n], s0[n]);
  if (float* f = state_rows(hd.st.sT[kSumexp], hd.bh, 1)) f[0] = Zt;
}

// The forward's intermediates of a head, up to the product's operands Qs = Q I / R and Vc = v comp
// (causal: flow_causal_rows, the final sums to the state where wanted).
// bad (not null: the call's rows validation left, gated_heads): q, k and v checked for inf / NaN
// in the passes that read them (a value validation checked is finite: one found is an unchecked
// row's), found ones OR-ed into *bad. (A second read of each head's rows after its pass, out of
// L1 by then, cost flow's forward 10-13% through linmix.ops at T 4096.)
void flow_intermediates(FlowWork& w, const FlowHead& hd, const float* q, const float* k, const float* v,
                        uint32_t* bad = nullptr) {
  if (hd.causal) return flow_causal_rows(w, hd, q, k, v, bad, true);
  const int64_t T = hd.T, H = hd.H, D = hd.D, E = hd.E, row0 = hd.row0;
  RowCheck<false> chk;
  gather_head(w.Q.data(), q, row0, T, H, D, sigmoid_fn, bad ? &chk : nullptr);
  gather_head(w.K.data(), k, row0, T, H, D, sigmoid_fn, bad ? &chk : nullptr);
  const float *Q = w.Q.data(), *K = w.K.data();
  float *cK = w.cK.data(), *cQ = w.cQ.data(), *cKO = w.cKO.data(), *cQI = w.cQI.data(), *Qs = w.Qs.data(),
        *Vc = w.Vc.data();
  std::copy(Q, Q + T * D, cQ), std::copy(K, K + T * D, cK);
  hd.scan(cK, D), hd.scan(cQ, D);
  for (int64_t t = 0; t < T; ++t) {
    const float r = hd.R(t), *Qt = Q + t * D, *Kt = K + t * D;
    const float a = dot_eps(Qt, cK + t * D, D), c = dot_eps(Kt, cQ + t * D, D), I = r / a, O = r / c;
    w.a[t] = a, w.c[t] = c, w.I[t] = I, w.O[t] = O;
    float *ko = cKO + t * D, *qi = cQI + t * D;
#pragma omp simd
    for (int64_t j = 0; j < D; ++j) ko[j] = Kt[j] * O, qi[j] = Qt[j] * I;
  }
  hd.scan(cKO, D), hd.scan(cQI, D);
  for (int64_t t = 0; t < T; ++t) {
    const float ir = 1.0f / hd.R(t);
    w.Ih[t] = dot_eps(Q + t * D, cKO + t * D, D) * ir;
    w.Oraw[t] = dot_eps(K + t * D, cQI + t * D, D) * ir;
    w.e[t] = std::exp(std::clamp(w.Oraw[t], -1.0f, 1.0f));
    w.alloc[t] = sigmoidf(w.Ih[t]);
  }
  w.Z = w.e;
  hd.scan(w.Z.data(), 1);
  for (int64_t t = 0; t < T; ++t) {
    const float comp = w.e[t] / w.Z[t] * hd.ncomp(t), qs = w.I[t] / hd.R(t), *vr = v + (row0 + t * H) * E,
                *Qt = Q + t * D;
    w.comp[t] = comp;
    float *vc = Vc + t * E, *qr = Qs + t * D;
    if (bad) chk.add(vr, E);
#pragma omp simd
    for (int64_t x = 0; x < E; ++x) vc[x] = vr[x] * comp;
#pragma omp simd
    for (int64_t j = 0; j < D; ++j) qr[j] = Qt[j] * qs;
  }
  if (bad) *bad |= chk.bad();
}

// The backward from the product's gradients on: w.dQs, w.dKp (T,D), w.dVc (T,E) (the gradients of
// Qs, K, Vc through the product) and w.dalloc (T) = dy . o in; dq, dk, dv of the head written.
// flow_adjoint of a causal head in one pass over the rows, last first: every reverse scan of
// the adjoint (of the prefix sums Z, cKO, cQI, cK, cQ) is a running sum carried from row to row
// (started at the final state's gradient, ended in the initial state's), and a row's dQ, dK are
// local; the same sums in the same order as the passes of flow_adjoint, without their seven (T,D)
// arrays (flow fwd+bwd at T = 4096 is memory-bound on them).
void flow_adjoint_causal(FlowWork& w, const FlowHead& hd, float* dq, float* dk, float* dv, const float* v) {
  const int64_t T = hd.T, H = hd.H, D = hd.D, E = hd.E, row0 = hd.row0;
  const float *Q = w.Q.data(), *K = w.K.data(), *cK = w.cK.data(), *cQ = w.cQ.data(), *cKO = w.cKO.data(),
              *cQI = w.cQI.data(), *dQs = w.dQs.data(), *dKp = w.dKp.data(), *dVc = w.dVc.data();
  const float *I = w.I.data(), *O = w.O.data(), *comp = w.comp.data(), *Z = w.Z.data(), *e = w.e.data(),
              *alloc = w.alloc.data(), *a = w.a.data(), *c = w.c.data(), *Oraw = w.Oraw.data(),
              *dalloc = w.dalloc.data();
  // the running sums: of dZ (scalar), and of dcKO, dcQI, dcK, dcQ (D each); the row's dQ, dK
  std::vector<float> sums(size_t(6 * D));
  float* run = sums.data();
  float *rKO = run, *rQI = run + D, *rK = run + 2 * D, *rQ = run + 3 * D, *dQt = run + 4 * D, *dKt = run + 5 * D;
  const auto start = [&](float* r, int n, int64_t wd) {
    const float* g = state_rows(hd.st.dT[n], hd.bh, wd);
    for (int64_t j = 0; j < wd; ++j) r[j] = g ? g[j] : 0.0f;
  };
  float rZ = 0.0f;
  start(&rZ, kSumexp, 1), start(rK, 0, D), start(rQ, 1, D), start(rKO, 2, D), start(rQI, 3, D);
  for (int64_t t = T - 1; t >= 0; --t) {
    const float ir = 1.0f / hd.R(t), qs = I[t] * ir, ct = comp[t], *vr = v + (row0 + t * H) * E, *dvc = dVc + t * E,
                *dqs = dQs + t * D, *Qt = Q + t * D, *Kt = K + t * D, *dkp = dKp + t * D;
    float* dvr = dv + (row0 + t * H) * E;
    float dcomp = 0.0f, di = 0.0f;  // Vc = v comp; Qs = Q I / R
#pragma omp simd reduction(+ : dcomp)
    for (int64_t x = 0; x < E; ++x) dcomp += dvc[x] * vr[x], dvr[x] = dvc[x] * ct;
#pragma omp simd reduction(+ : di)
    for (int64_t j = 0; j < D; ++j) dQt[j] = dqs[j] * qs, di += dqs[j] * Qt[j], dKt[j] = dkp[j];
    float dI = di * ir;
    rZ += -dcomp * e[t] * hd.ncomp(t) / (Z[t] * Z[t]);  // comp = e / Z n, Z = scan e
    const float de = dcomp * hd.ncomp(t) / Z[t] + rZ;
    // Ih, Oraw: dot products with the scanned sums cKO, cQI
    const float dOh = de * e[t], dOraw = ((Oraw[t] > -1.0f && Oraw[t] < 1.0f) ? dOh : 0.0f) * ir;
    const float dIh = dalloc[t] * alloc[t] * (1.0f - alloc[t]) * ir;
    const float *ko = cKO + t * D, *qi = cQI + t * D;
#pragma omp simd
    for (int64_t j = 0; j < D; ++j) {
      dQt[j] += dIh * (ko[j] + kEps), rKO[j] += dIh * (Qt[j] + kEps);
      dKt[j] += dOraw * (qi[j] + kEps), rQI[j] += dOraw * (Kt[j] + kEps);
    }
    // cKO = scan(K O), cQI = scan(Q I)
    float dO = 0.0f, di2 = 0.0f;
    const float Ot = O[t], It = I[t];
#pragma omp simd reduction(+ : dO, di2)
    for (int64_t j = 0; j < D; ++j) {
      dKt[j] += rKO[j] * Ot, dO += rKO[j] * Kt[j];
      dQt[j] += rQI[j] * It, di2 += rQI[j] * Qt[j];
    }
    dI += di2;
    // I = R / a, O = R / c; a = Q . cK, c = K . cQ
    const float da = -dI * hd.R(t) / (a[t] * a[t]), dc = -dO * hd.R(t) / (c[t] * c[t]);
    const float *ck = cK + t * D, *cq = cQ + t * D;
    float *dqr = dq + (row0 + t * H) * D, *dkr = dk + (row0 + t * H) * D;
#pragma omp simd
    for (int64_t j = 0; j < D; ++j) {
      dQt[j] += da * (ck[j] + kEps), rK[j] += da * (Qt[j] + kEps);
      dKt[j] += dc * (cq[j] + kEps), rQ[j] += dc * (Kt[j] + kEps);
      // cK = scan K, cQ = scan Q; then the sigmoids
      dqr[j] = (dQt[j] + rQ[j]) * Qt[j] * (1.0f - Qt[j]);
      dkr[j] = (dKt[j] + rK[j]) * Kt[j] * (1.0f - Kt[j]);
    }
  }
  hd.to_initial(&rZ, kSumexp, 1);
  hd.to_initial(rK, 0, D), hd.to_initial(rQ, 1, D), hd.to_initial(rKO, 2, D), hd.to_initial(rQI, 3, D);
}

void flow_adjoint(FlowWork& w, const FlowHead& hd, float* dq, float* dk, float* dv, const float* v) {
  if (hd.causal) return flow_adjoint_causal(w, hd, dq, dk, dv, v);
  const int64_t T = hd.T, H = hd.H, D = hd.D, E = hd.E, row0 = hd.row0;
  const float *Q = w.Q.data(), *K = w.K.data(), *cK = w.cK.data(), *cQ = w.cQ.data(), *cKO = w.cKO.data(),
              *cQI = w.cQI.data(), *dQs = w.dQs.data(), *dKp = w.dKp.data(), *dVc = w.dVc.data();
  float *dQ = w.dQ.data(), *dK = w.dK.data(), *dcKO = w.dcKO.data(), *dcQI = w.dcQI.data(), *dcK = w.dcK.data(),
        *dcQ = w.dcQ.data();
  const float *I = w.I.data(), *O = w.O.data(), *comp = w.comp.data(), *Z = w.Z.data(), *e = w.e.data(),
              *alloc = w.alloc.data(), *a = w.a.data(), *c = w.c.data(), *Oraw = w.Oraw.data(),
              *dalloc = w.dalloc.data();
  float *dI = w.dI.data(), *dOv = w.dOv.data(), *de = w.de.data(), *dZ = w.dZ.data();
  for (int64_t t = 0; t < T; ++t) {  // Vc = v comp; Qs = Q I / R
    const float ir = 1.0f / hd.R(t), qs = I[t] * ir, ct = comp[t], *vr = v + (row0 + t * H) * E, *dvc = dVc + t * E,
                *dqs = dQs + t * D, *Qt = Q + t * D, *dkp = dKp + t * D;
    float* dvr = dv + (row0 + t * H) * E;
    float dcomp = 0.0f, di = 0.0f;
#pragma omp simd reduction(+ : dcomp)
    for (int64_t x = 0; x < E; ++x) dcomp += dvc[x] * vr[x], dvr[x] = dvc[x] * ct;
    float *dQt = dQ + t * D, *dKt = dK + t * D;
#pragma omp simd reduction(+ : di)
    for (int64_t j = 0; j < D; ++j) dQt[j] = dqs[j] * qs, di += dqs[j] * Qt[j], dKt[j] = dkp[j];
    dI[t] = di * ir;
    de[t] = dcomp * hd.ncomp(t) / Z[t];  // comp = e / Z n
    dZ[t] = -dcomp * e[t] * hd.ncomp(t) / (Z[t] * Z[t]);
  }
  hd.scan(dZ, 1);  // Z = scan e (the total: its adjoint is the total too)
  for (int64_t t = 0; t < T; ++t) {  // Ih, Oraw: dot products with the scanned sums
    de[t] += dZ[t];
    const float ir = 1.0f / hd.R(t), dOh = de[t] * e[t];
    const float dOraw = ((Oraw[t] > -1.0f && Oraw[t] < 1.0f) ? dOh : 0.0f) * ir;
    const float dIh = dalloc[t] * alloc[t] * (1.0f - alloc[t]) * ir;
    const float *Qt = Q + t * D, *Kt = K + t * D, *ko = cKO + t * D, *qi = cQI + t * D;
    float *dQt = dQ + t * D, *dKt = dK + t * D, *dko = dcKO + t * D, *dqi = dcQI + t * D;
#pragma omp simd
    for (int64_t j = 0; j < D; ++j) {
      dQt[j] += dIh * (ko[j] + kEps), dko[j] = dIh * (Qt[j] + kEps);
      dKt[j] += dOraw * (qi[j] + kEps), dqi[j] = dOraw * (Kt[j] + kEps);
    }
  }
  hd.scan(dcKO, D), hd.scan(dcQI, D);
  for (int64_t t = 0; t < T; ++t) {  // cKO = scan(K O), cQI = scan(Q I)
    const float Ot = O[t], It = I[t], *Qt = Q + t * D, *Kt = K + t * D, *dko = dcKO + t * D, *dqi = dcQI + t * D;
    float *dQt = dQ + t * D, *dKt = dK + t * D;
    float dO2 = 0.0f, di = 0.0f;
#pragma omp simd reduction(+ : dO2, di)
    for (int64_t j = 0; j < D; ++j) {
      dKt[j] += dko[j] * Ot, dO2 += dko[j] * Kt[j];
      dQt[j] += dqi[j] * It, di += dqi[j] * Qt[j];
    }
    dI[t] += di, dOv[t] = dO2;
  }
  for (int64_t t = 0; t < T; ++t) {  // I = R / a, O = R / c
    const float da = -dI[t] * hd.R(t) / (a[t] * a[t]), dc = -dOv[t] * hd.R(t) / (c[t] * c[t]);
    const float *Qt = Q + t * D, *Kt = K + t * D, *ck = cK + t * D, *cq = cQ + t * D;
    float *dQt = dQ + t * D, *dKt = dK + t * D, *dck = dcK + t * D, *dcq = dcQ + t * D;
#pragma omp simd
    for (int64_t j = 0; j < D; ++j) {
      dQt[j] += da * (ck[j] + kEps), dck[j] = da * (Qt[j] + kEps);
      dKt[j] += dc * (cq[j] + kEps), dcq[j] = dc * (Kt[j] + kEps);
    }
  }
  hd.scan(dcK, D), hd.scan(dcQ, D);
  for (int64_t t = 0; t < T; ++t) {  // cK = scan K, cQ = scan Q; then the sigmoids
    const float *Qt = Q + t * D, *Kt = K + t * D, *dQt = dQ + t * D, *dKt = dK + t * D, *dcq = dcQ + t * D,
                *dck = dcK + t * D;
    float *dqr = dq + (row0 + t * H) * D, *dkr = dk + (row0 + t * H) * D;
#pragma omp simd
    for (int64_t j = 0; j < D; ++j) {
      dqr[j] = (dQt[j] + dcq[j]) * Qt[j] * (1.0f - Qt[j]);
      dkr[j] = (dKt[j] + dck[j]) * Kt[j] * (1.0f - Kt[j]);
    }
  }
}

FlowWork& flow_work() {
  thread_local FlowWork w;
  return w;
}

// The non-causal backward: the product through kernels/linear_product.h.
void flow_backward(float* dq, float* dk, float* dv, const float* q, const float* k, const float* v, const float* dy,
                   const AttnDims& d) {
  const int64_t B = d.B, T = d.T, H = d.H, D = d.D, E = d.E;
  const FlowStateIO st;
#pragma omp parallel
  {
    FlowWork& w = flow_work();
    w.resize(T, D, E);
    thread_local std::vector<float> o, dO;
    o.resize(size_t(T * E)), dO.resize(size_t(T * E));
#pragma omp for collapse(2) schedule(dynamic)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < H; ++h) {
        const FlowHead hd{b, b * H + h, b * T * H + h, T, H, D, E, false, st};
        flow_intermediates(w, hd, q, k, v);
        const LinearProductArgs args{T, D, E, D, D, E, E};
        linear_product(o.data(), nullptr, w.Qs.data(), w.K.data(), w.Vc.data(), args);
        for (int64_t t = 0; t < T; ++t) {  // y = o alloc
          const float* g = dy + (hd.row0 + t * H) * E;
          float s = 0.0f;
          for (int64_t x = 0; x < E; ++x) dO[t * E + x] = g[x] * w.alloc[t], s += g[x] * o[t * E + x];
          w.dalloc[t] = s;
        }
        linear_product_backward(w.dQs.data(), w.dKp.data(), w.dVc.data(), w.Qs.data(), w.K.data(), w.Vc.data(),
                                dO.data(), E, nullptr, args);
        flow_adjoint(w, hd, dq, dk, dv, v);
      }
  }
}

// The causal form on the gated chunked kernels with a log decay of 0 (as linear_forms.h): a thread's
// heads' intermediates first (each head its own FlowWork, kept until its backward), then the
// product o = Qs K^T Vc (masked) from the state's KV chunk by chunk across the heads, y = o alloc in
// the chunk epilogue (and dalloc = dy . o there), then the kernels' fused backward gives dQs, dK,
// dVc and dKV0, and flow_adjoint the rest.
TensorMap flow_causal_run(const Call& c, const Tensor* dy, const FlowStateIO& st, TensorMap out) {
  const AttnDims d = attn_dims(c);
  const int64_t B = d.B, T = d.T, H = d.H, D = d.D, E = d.E;
  const float *q = c.t("q").ptr(), *k = c.t("k").ptr(), *v = c.t("v").ptr();
  out.emplace("y", Tensor::uninitialized({B, T, H, E}));
  if (dy) {
    out.emplace("dq", Tensor::uninitialized({B, T, H, D}));
    out.emplace("dk", Tensor::uninitialized({B, T, H, D}));
    out.emplace("dv", Tensor::uninitialized({B, T, H, E}));
  }
  // what a head keeps from its forward to its backward: every forward intermediate of its FlowWork
  // (the kernel's operands Qs, K, Vc among them; moved, not copied) and dalloc (T); the
  // adjoint's buffers stay the thread's FlowWork's. (Recomputing the intermediates in the backward
  // instead cost a fifth of flow's forward + backward at T = 4096.)
  struct Kept {
    FlowWork f;
    scratch_vector<float> dalloc;
  };
  thread_local std::vector<Kept> kept;  // one a head, reused across calls (the calling thread's)
  if (int64_t(kept.size()) < B * H) kept.resize(size_t(B * H));
  std::vector<Kept>& KP = kept;
  float* py = out.at("y").ptr();
  auto head_of = [&](const GatedHead& z) { return FlowHead{z.b, z.b * H + z.h, z.b * T * H + z.h, T, H, D, E, true, st}; };
  auto prep = [&](GatedHead& z) {
    const FlowHead hd = head_of(z);
    FlowWork& w = flow_work();
    w.resize(T, D, E);
    // (the rows checked as they are read)
    flow_causal_rows(w, hd, q, k, v, z.unchecked ? &z.bad : nullptr, dy != nullptr);
    z.unchecked = nullptr;
    Kept& kp = KP[size_t(hd.bh)];  // the intermediates move to the head's own buffers (w's next resize remakes them)
    // a forward runs the head at once on the thread's buffers (z.alone: the next head's prep
    // reuses them; 44 -> ~20 MiB touched by a forward of 8 heads at T 4096); with dy every head's
    // intermediates are kept until the backward
    if (dy) swap_intermediates(kp.f, w), kp.dalloc.resize(size_t(T));
    else z.alone = true;
    const FlowWork& f = dy ? kp.f : w;
    z.S0 = head_state(c, "KV", hd.bh, D * E);
    z.iq = f.Qs.data(), z.ik = f.K.data(), z.iv = f.Vc.data(), z.oy = py + hd.row0 * E;
    z.g.assign(1, 0.0f), z.ig = z.g.data();
    z.ld = {D, D, E, 0, H * E};
    z.ld.g_row = true;
    const float* gy = dy ? dy->ptr() + hd.row0 * E : nullptr;
    if (dy) {
      z.dy.resize(size_t(T * E));
      for (int64_t t = 0; t < T; ++t)  // the kernel's dy: d o = dy alloc
        for (int64_t x = 0; x < E; ++x) z.dy[size_t(t * E + x)] = gy[t * H * E + x] * f.alloc[size_t(t)];
      if (const float* g = state_rows(st.dT[kKV], hd.bh, D * E)) z.dST.assign(g, g + D * E);
      z.dg.resize(1);
      // the product's gradients in the call's rows, gathered and overwritten by flow_adjoint
      z.odq = out.at("dq").ptr() + hd.row0 * D, z.odk = out.at("dk").ptr() + hd.row0 * D;
      z.odv = out.at("dv").ptr() + hd.row0 * E, z.odg = z.dg.data();
      z.od = {H * D, H * D, H * E, 0, 0};
      z.od.g_row = true;
    }
    float *yh = py + hd.row0 * E, *dal = dy ? kp.dalloc.data() : nullptr;
    const float* al = f.alloc.data();
    z.epilogue = [al, dal, gy, yh, H, E](int64_t t0, int64_t n, const float*, const float*) {
      for (int64_t t = t0; t < t0 + n; ++t) {
        float* yr = yh + t * H * E;
        if (gy) {
          const float* g = gy + t * H * E;
          float s = 0.0f;
#pragma omp simd reduction(+ : s)
          for (int64_t x = 0; x < E; ++x) s += g[x] * yr[x];
          dal[t] = s;
        }
#pragma omp simd
        for (int64_t x = 0; x < E; ++x) yr[x] *= al[t];
      }
    };
    z.ld.epilogue = &z.epilogue;
  };
  auto post = [&](GatedHead& z) {
    const FlowHead hd = head_of(z);
    if (float* f = state_rows(st.sT[kKV], hd.bh, D * E)) std::copy(z.S.begin(), z.S.end(), f);
    if (!dy) return;
    if (float* g = state_rows(st.d0[kKV], hd.bh, D * E)) std::copy(z.dS0.begin(), z.dS0.end(), g);
    FlowWork& w = flow_work();
    w.resize(T, D, E);
    Kept& kp = KP[size_t(hd.bh)];
    swap_intermediates(kp.f, w);  // prep's intermediates back (w's own go to the head's buffers)
    std::swap(w.dalloc, kp.dalloc);
    float *dq = out.at("dq").ptr(), *dk = out.at("dk").ptr(), *dv = out.at("dv").ptr();
    gather_head(w.dQs.data(), dq, hd.row0, T, H, D, identity_fn);
    gather_head(w.dKp.data(), dk, hd.row0, T, H, D, identity_fn);
    gather_head(w.dVc.data(), dv, hd.row0, T, H, E, identity_fn);
    flow_adjoint(w, hd, dq, dk, dv, v);
  };
  gated_heads(c, dy, D, E, false, prep, post);
  return out;
}

namespace {


MixerSpec make_spec() {
  MixerSpec s;
  s.name = "flow";
  s.blocking = {{"T", kLinearChunk}};
  // the causal form's chunked product (chunked_product_flops; non-causal: fewer)
  // plus the flow normalisers (2 dot products of D per token and head, q and k)
  s.flops = [](const std::map<std::string, int64_t>& d, bool) {
    const double T = double(d.at("T")), H = double(d.at("H")), D = double(d.at("D")), E = double(d.at("E"));
    return chunked_product_flops(T, H, D, E) + H * 2 * 2 * T * D;
  };
  s.paper = "Wu et al. 2022, Flowformer: Linearizing Transformers with Conservation Flows";
  s.summary = "Flow-Attention: sigmoid kernels with flow conservation (competition, allocation)";
  s.inputs = {{"q", "B,T,H,D"}, {"k", "B,T,H,D"}, {"v", "B,T,H,E"}};
  s.kernel_checks_values = true;  // gated_heads checks q, k, v as its causal form runs
  s.state = {{"sumK", "B,H,D"}, {"sumQ", "B,H,D"}, {"sumKO", "B,H,D"}, {"sumQI", "B,H,D"},
             {"sumexp", "B,H"},  {"KV", "B,H,D,E"},  {"pos", "B", false, true}};
  s.state_size = "H (D E + 4 D + 1) + 1 per sequence";
  s.time = "O(T H D E)";
  s.memory = "O(T (D + E)) per head";
  s.check = [](const Call& c) {
    if (c.has("state.pos")) positions_of(c.t("state.pos"), "state.pos");
  };
  s.y_dims = "B,T,H,E";
  // the causal form starts from the state in every mode and returns the final one
  s.state_all_modes = true;
  s.state_fix = [](TensorMap& st) {
    // pos tokens before 0 (2..9); sums of sigmoids in (0, pos) (sumK, sumQ), positive flows
    // (sumKO, sumQI), sumexp a sum of pos values of e^{Ohat} in [e^-1, e]
    for (float& p : st["state.pos"].data) p = 2.0f + std::round(std::min(7.0f, std::abs(p) * 3.0f));
    for (const char* n : {"state.sumK", "state.sumQ"})
      for (float& x : st[n].data) x = 4.0f / (1.0f + std::exp(-x));
    for (const char* n : {"state.sumKO", "state.sumQI"})
      for (float& x : st[n].data) x = std::abs(x) + 0.5f;
    for (float& x : st["state.sumexp"].data) x = 4.0f * std::exp(std::tanh(x));
  };
  set_reference(s, [](const Call& c, const auto& x) {
    using S = scalar_of<decltype(x)>;
    const AttnDims d = attn_dims(c);
    const int64_t ny = d.B * d.T * d.H * d.E, BH = d.B * d.H;
    std::vector<S> y(ny + (c.causal ? BH * (4 * d.D + 1 + d.D * d.E) + d.B : 0));
    std::array<const S*, 7> st{};
    for (size_t n = 0; n < 7; ++n) st[n] = opt_in(x, ("state." + kFlowState[n]).c_str());
    ref::flow_ref<S>(y.data(), x.at("q").data(), x.at("k").data(), x.at("v").data(), d, c.causal, st,
                     c.causal ? y.data() + ny : nullptr);
    return y;
  });
  // the call's state pointers (causal); out gets the final state and, with grad, the initial
  // one's gradient (pos's is 0: a count)
  auto state_io = [](const Call& c, TensorMap& out, bool grad) {
    FlowStateIO st;
    if (!c.causal) return st;
    const AttnDims d = attn_dims(c);
    const bool s0 = c.has("state.pos");
    if (s0) st.pos = positions_of(c.t("state.pos"), "state.pos");
    for (int n = 0; n < 6; ++n) {
      const std::string name = "state." + kFlowState[n];
      std::vector<int64_t> shape{d.B, d.H};
      if (n != kSumexp) shape.push_back(d.D);
      if (n == kKV) shape.push_back(d.E);
      if (s0) st.s0[n] = c.t(name).ptr();
      st.sT[n] = (out[name] = Tensor(shape)).ptr();
      if (grad && c.has("dfinal." + kFlowState[n])) st.dT[n] = c.t("dfinal." + kFlowState[n]).ptr();
      if (grad && s0) st.d0[n] = (out["d" + name] = Tensor(shape)).ptr();
    }
    Tensor pos({d.B});
    for (int64_t b = 0; b < d.B; ++b) pos.data[size_t(b)] = float(st.at(b) + d.T);
    out["state.pos"] = std::move(pos);
    if (grad && s0) out["dstate.pos"] = Tensor({d.B});
    return st;
  };
  s.parallel = [state_io](const Call& c) {
    const AttnDims d = attn_dims(c);
    TensorMap out;
    const FlowStateIO st = state_io(c, out, false);
    if (c.causal) return flow_causal_run(c, nullptr, st, std::move(out));
    Tensor y({d.B, d.T, d.H, d.E});
    flow_forward(y.ptr(), c.t("q").ptr(), c.t("k").ptr(), c.t("v").ptr(), d);
    out["y"] = std::move(y);
    return out;
  };
  s.backward = [state_io](const Call& c, const Tensor& dy) {
    const AttnDims d = attn_dims(c);
    TensorMap out;
    const FlowStateIO st = state_io(c, out, true);
    if (c.causal) return flow_causal_run(c, &dy, st, std::move(out));
    Tensor y({d.B, d.T, d.H, d.E}), dq({d.B, d.T, d.H, d.D}), dk({d.B, d.T, d.H, d.D}), dv({d.B, d.T, d.H, d.E});
    flow_forward(y.ptr(), c.t("q").ptr(), c.t("k").ptr(), c.t("v").ptr(), d);
    flow_backward(dq.ptr(), dk.ptr(), dv.ptr(), c.t("q").ptr(), c.t("k").ptr(), c.t("v").ptr(), dy.ptr(), d);
    out["y"] = std::move(y), out["dq"] = std::move(dq), out["dk"] = std::move(dk), out["dv"] = std::move(dv);
    return out;
  };
  s.stepper = [](const Call& c) {
    const AttnDims d = attn_dims(c);
    const int64_t H = d.H, D = d.D, E = d.E;
    auto st = std::make_shared<FlowState>();
    st->H = H, st->D = D, st->E = E, st->pos = 0;
    for (auto* v : {&st->sumK, &st->sumQ, &st->sumKO, &st->sumQI}) v->assign(H * D, 0.0f);
    st->sumexp.assign(H, 0.0f), st->KV.assign(H * D * E, 0.0f);
    auto scratch = std::make_shared<std::vector<float>>();
    const float *q = c.t("q").ptr(), *k = c.t("k").ptr(), *v = c.t("v").ptr();
    auto save = [=] {
      return TensorMap{{"state.sumK", state_tensor({1, H, D}, st->sumK)},
                       {"state.sumQ", state_tensor({1, H, D}, st->sumQ)},
                       {"state.sumKO", state_tensor({1, H, D}, st->sumKO)},
                       {"state.sumQI", state_tensor({1, H, D}, st->sumQI)},
                       {"state.sumexp", state_tensor({1, H}, st->sumexp)},
                       {"state.KV", state_tensor({1, H, D, E}, st->KV)},
                       {"state.pos", Tensor({1}, float(st->pos))}};
    };
    auto load = [=](const TensorMap& m) {
      state_load(st->sumK, m, "state.sumK"), state_load(st->sumQ, m, "state.sumQ");
      state_load(st->sumKO, m, "state.sumKO"), state_load(st->sumQI, m, "state.sumQI");
      state_load(st->sumexp, m, "state.sumexp"), state_load(st->KV, m, "state.KV");
      st->pos = position_of(m.at("state.pos"), "state.pos");
    };
    return Stepper{[=](float* y) { flow_step(y, *st, q, k, v, *scratch); }, save, load};
  };
  return s;
}

}  // namespace

MixerSpec flow_spec() { return make_spec(); }

}  // namespace linmix
