// flow — Flow-Attention (Wu et al. 2022, "Flowformer"), exactly as MIXERS.md writes it
// (eq. 5-9 of the paper; causal version as the paper's causal code: every sum a prefix sum,
// normalised by the position count r_i = i + 1). Q = sigma(q), K = sigma(k), eps = 1e-6.
// parallel: one O(T D) pass for the flow scalars (incoming I, outgoing O, conserved
// Ihat / Ohat, allocation, competition), then the kernelised product
// y_i = alloc_i (Q_i I_i / r_i)^T sum_j K_j (v_j comp_j)^T through kernels/linear_product.
// recurrent: the prefix sums and KV (D,E) as state.
#include <array>

#include "../kernels/linear_product.h"
#include "../ref/ref_util.h"
#include "common.h"
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

void flow_forward(float* y, const float* q, const float* k, const float* v, const AttnDims& d, bool causal,
                  const FlowStateIO& st = {}) {
  const int64_t B = d.B, T = d.T, H = d.H, D = d.D, E = d.E;
#pragma omp parallel
  {
    // Q, K: (T,D) sigmoid rows, Q later scaled to Q I / r; Vc: (T,E) = v comp;
    // alloc: (T); scalars I, O, Ohat: (T); running sums: (D).
    std::vector<float> Q(T * D), K(T * D), Vc(T * E), Yh(T * E), alloc(T), I(T), O(T), Oh(T), sK(D), sQ(D), sKO(D),
        sQI(D);
#pragma omp for collapse(2) schedule(dynamic)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < H; ++h) {
        const int64_t row0 = b * T * H + h, bh = b * H + h;
        gather_head(Q.data(), q, row0, T, H, D, sigmoid_fn);
        gather_head(K.data(), k, row0, T, H, D, sigmoid_fn);
        std::vector<float>* sums[4] = {&sK, &sQ, &sKO, &sQI};
        for (int n = 0; n < 4; ++n) {  // the prefix sums start from the state's (causal)
          const float* s0 = causal ? state_rows(st.s0[n], bh, D) : nullptr;
          if (s0) std::copy(s0, s0 + D, sums[n]->begin());
          else std::fill(sums[n]->begin(), sums[n]->end(), 0.0f);
        }
        LinearProductArgs args{T, D, E, D, D, E, E, causal};
        if (causal) {
          args.S0 = state_rows(st.s0[kKV], bh, D * E), args.ST = state_rows(st.sT[kKV], bh, D * E);
          float sumexp = st.s0[kSumexp] ? st.s0[kSumexp][bh] : 0.0f;
          for (int64_t t = 0; t < T; ++t) {
            const float r = float(st.at(b) + t + 1);
            const float *Qt = &Q[t * D], *Kt = &K[t * D];
            for (int64_t x = 0; x < D; ++x) sK[x] += Kt[x], sQ[x] += Qt[x];
            I[t] = r / dot_eps(Qt, sK.data(), D);
            O[t] = r / dot_eps(Kt, sQ.data(), D);
            for (int64_t x = 0; x < D; ++x) sKO[x] += Kt[x] * O[t], sQI[x] += Qt[x] * I[t];
            alloc[t] = sigmoidf(dot_eps(Qt, sKO.data(), D) / r);
            const float ohat = std::clamp(dot_eps(Kt, sQI.data(), D) / r, -1.0f, 1.0f);
            sumexp += std::exp(ohat);
            const float comp = std::exp(ohat) / sumexp * r;
            for (int64_t e = 0; e < E; ++e) Vc[t * E + e] = v[(row0 + t * H) * E + e] * comp;
            for (int64_t x = 0; x < D; ++x) Q[t * D + x] *= I[t] / r;
          }
          for (int n = 0; n < 4; ++n)
            if (float* f = state_rows(st.sT[n], bh, D)) std::copy(sums[n]->begin(), sums[n]->end(), f);
          if (st.sT[kSumexp]) st.sT[kSumexp][bh] = sumexp;
        } else {
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
        }
        // the product (from the state's KV) into contiguous rows, then scaled by alloc into y's strided rows
        linear_product(Yh.data(), nullptr, Q.data(), K.data(), Vc.data(), args);
        scatter_head(y, Yh.data(), row0, T, H, E, [&](int64_t t) { return alloc[t]; });
      }
  }
}

// Backward of flow_forward, per head. The forward is recomputed with every intermediate kept
// (O(T (D + E)) per head); "scan" is a prefix sum when causal and the total otherwise, and
// its adjoint "rscan" a suffix sum or the total. With R_i = r_i (causal) or 1, and the
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
void flow_backward(float* dq, float* dk, float* dv, const float* q, const float* k, const float* v, const float* dy,
                   const AttnDims& d, bool causal, const FlowStateIO& st = {}) {
  const int64_t B = d.B, T = d.T, H = d.H, D = d.D, E = d.E;
#pragma omp parallel
  {
    std::vector<float> Q(T * D), K(T * D), cK(T * D), cQ(T * D), cKO(T * D), cQI(T * D), Qs(T * D), Vc(T * E),
        o(T * E), a(T), c(T), I(T), O(T), Ih(T), Oraw(T), e(T), Z(T), comp(T), alloc(T), dQ(T * D), dK(T * D),
        dQs(T * D), dKp(T * D), dVc(T * E), dO_(T * E), dI(T), dOv(T), dcKO(T * D), dcQI(T * D), dcK(T * D),
        dcQ(T * D), de(T), dZ(T), tmp(T * D);
    auto scan = [&](float* x, int64_t w) {  // in place, rows of width w
      if (causal) {
        for (int64_t t = 1; t < T; ++t)
          for (int64_t j = 0; j < w; ++j) x[t * w + j] += x[(t - 1) * w + j];
      } else {
        for (int64_t t = 1; t < T; ++t)
          for (int64_t j = 0; j < w; ++j) x[j] += x[t * w + j];
        for (int64_t t = 1; t < T; ++t) std::copy(x, x + w, x + t * w);
      }
    };
    auto rscan = [&](float* x, int64_t w) {
      if (causal) {
        for (int64_t t = T - 2; t >= 0; --t)
          for (int64_t j = 0; j < w; ++j) x[t * w + j] += x[(t + 1) * w + j];
      } else {
        scan(x, w);
      }
    };
    auto dot_e = [&](const float* x, const float* y2) {
      float s = 0.0f;
      for (int64_t j = 0; j < D; ++j) s += (x[j] + kEps) * (y2[j] + kEps);
      return s;
    };
#pragma omp for collapse(2) schedule(dynamic)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < H; ++h) {
        const int64_t row0 = b * T * H + h, bh = b * H + h;
        auto R = [&](int64_t t) { return causal ? float(st.at(b) + t + 1) : 1.0f; };
        auto ncomp = [&](int64_t t) { return causal ? float(st.at(b) + t + 1) : float(T); };
        // a scanned tensor x (rows of width w) from state tensor n: + the state's sum in every row
        auto from_state = [&](float* x, int n, int64_t w) {
          if (const float* s0 = causal ? state_rows(st.s0[n], bh, w) : nullptr)
            for (int64_t t = 0; t < T; ++t)
              for (int64_t j = 0; j < w; ++j) x[t * w + j] += s0[j];
        };
        // an adjoint dx of a scan from state tensor n: the final state's gradient joins its last
        // row before the reverse scan (to_final), the initial state's is its first row after (to_initial)
        auto to_final = [&](float* dx, int n, int64_t w) {
          if (const float* g = causal ? state_rows(st.dT[n], bh, w) : nullptr)
            for (int64_t j = 0; j < w; ++j) dx[(T - 1) * w + j] += g[j];
        };
        auto to_initial = [&](const float* dx, int n, int64_t w) {
          if (float* g = causal ? state_rows(st.d0[n], bh, w) : nullptr) std::copy(dx, dx + w, g);
        };
        // ---- forward, keeping intermediates
        gather_head(Q.data(), q, row0, T, H, D, sigmoid_fn);
        gather_head(K.data(), k, row0, T, H, D, sigmoid_fn);
        cK = K, cQ = Q;
        scan(cK.data(), D), scan(cQ.data(), D);
        from_state(cK.data(), 0, D), from_state(cQ.data(), 1, D);
        for (int64_t t = 0; t < T; ++t) {
          a[t] = dot_e(&Q[t * D], &cK[t * D]), I[t] = R(t) / a[t];
          c[t] = dot_e(&K[t * D], &cQ[t * D]), O[t] = R(t) / c[t];
          for (int64_t j = 0; j < D; ++j) cKO[t * D + j] = K[t * D + j] * O[t], cQI[t * D + j] = Q[t * D + j] * I[t];
        }
        scan(cKO.data(), D), scan(cQI.data(), D);
        from_state(cKO.data(), 2, D), from_state(cQI.data(), 3, D);
        for (int64_t t = 0; t < T; ++t) {
          Ih[t] = dot_e(&Q[t * D], &cKO[t * D]) / R(t);
          Oraw[t] = dot_e(&K[t * D], &cQI[t * D]) / R(t);
          e[t] = std::exp(std::clamp(Oraw[t], -1.0f, 1.0f));
          alloc[t] = sigmoidf(Ih[t]);
        }
        Z = e;
        scan(Z.data(), 1);
        from_state(Z.data(), kSumexp, 1);
        for (int64_t t = 0; t < T; ++t) {
          comp[t] = e[t] / Z[t] * ncomp(t);
          for (int64_t x = 0; x < E; ++x) Vc[t * E + x] = v[(row0 + t * H) * E + x] * comp[t];
          for (int64_t j = 0; j < D; ++j) Qs[t * D + j] = Q[t * D + j] * I[t] / R(t);
        }
        LinearProductArgs args{T, D, E, D, D, E, E, causal};
        const float* KV0 = causal ? state_rows(st.s0[kKV], bh, D * E) : nullptr;
        args.S0 = KV0;
        linear_product(o.data(), nullptr, Qs.data(), K.data(), Vc.data(), args);
        // ---- backward
        std::fill(dQ.begin(), dQ.end(), 0.0f);
        std::fill(dK.begin(), dK.end(), 0.0f);
        std::vector<float> dalloc(T);
        for (int64_t t = 0; t < T; ++t) {  // y = o alloc
          const float* g = dy + (row0 + t * H) * E;
          float s = 0.0f;
          for (int64_t x = 0; x < E; ++x) dO_[t * E + x] = g[x] * alloc[t], s += g[x] * o[t * E + x];
          dalloc[t] = s;
        }
        linear_product_backward(dQs.data(), dKp.data(), dVc.data(), Qs.data(), K.data(), Vc.data(), dO_.data(), E,
                                nullptr, args);
        if (causal)  // the state's KV: read by every row, handed on as the final KV
          linear_product_state_backward(dQs.data(), dKp.data(), dVc.data(), Qs.data(), K.data(), Vc.data(), E,
                                        dO_.data(), nullptr, T, D, E, KV0, nullptr, state_rows(st.dT[kKV], bh, D * E),
                                        nullptr, state_rows(st.d0[kKV], bh, D * E), nullptr);
        for (int64_t t = 0; t < T; ++t) {  // Vc = v comp; Qs = Q I / R
          float dcomp = 0.0f, di = 0.0f;
          for (int64_t x = 0; x < E; ++x) {
            dv[(row0 + t * H) * E + x] = dVc[t * E + x] * comp[t];
            dcomp += dVc[t * E + x] * v[(row0 + t * H) * E + x];
          }
          for (int64_t j = 0; j < D; ++j) {
            dQ[t * D + j] += dQs[t * D + j] * I[t] / R(t);
            di += dQs[t * D + j] * Q[t * D + j] / R(t);
            dK[t * D + j] += dKp[t * D + j];
          }
          dI[t] = di;
          de[t] = dcomp * ncomp(t) / Z[t];  // comp = e / Z n
          dZ[t] = -dcomp * e[t] * ncomp(t) / (Z[t] * Z[t]);
        }
        to_final(dZ.data(), kSumexp, 1);
        rscan(dZ.data(), 1);  // Z = scan e
        to_initial(dZ.data(), kSumexp, 1);
        for (int64_t t = 0; t < T; ++t) {
          de[t] += dZ[t];
          const float dOh = de[t] * e[t];
          const float dOraw = (Oraw[t] > -1.0f && Oraw[t] < 1.0f) ? dOh : 0.0f;
          const float dIh = dalloc[t] * alloc[t] * (1.0f - alloc[t]);
          for (int64_t j = 0; j < D; ++j) {  // Ih, Oraw: dot products with the scanned sums
            dQ[t * D + j] += dIh * (cKO[t * D + j] + kEps) / R(t);
            dcKO[t * D + j] = dIh * (Q[t * D + j] + kEps) / R(t);
            dK[t * D + j] += dOraw * (cQI[t * D + j] + kEps) / R(t);
            dcQI[t * D + j] = dOraw * (K[t * D + j] + kEps) / R(t);
          }
        }
        to_final(dcKO.data(), 2, D), to_final(dcQI.data(), 3, D);
        rscan(dcKO.data(), D), rscan(dcQI.data(), D);
        to_initial(dcKO.data(), 2, D), to_initial(dcQI.data(), 3, D);
        for (int64_t t = 0; t < T; ++t) {  // cKO = scan(K O), cQI = scan(Q I)
          float dO2 = 0.0f;
          for (int64_t j = 0; j < D; ++j) {
            dK[t * D + j] += dcKO[t * D + j] * O[t];
            dO2 += dcKO[t * D + j] * K[t * D + j];
            dQ[t * D + j] += dcQI[t * D + j] * I[t];
            dI[t] += dcQI[t * D + j] * Q[t * D + j];
          }
          dOv[t] = dO2;
        }
        for (int64_t t = 0; t < T; ++t) {  // I = R / a, O = R / c
          const float da = -dI[t] * R(t) / (a[t] * a[t]), dc = -dOv[t] * R(t) / (c[t] * c[t]);
          for (int64_t j = 0; j < D; ++j) {
            dQ[t * D + j] += da * (cK[t * D + j] + kEps);
            dcK[t * D + j] = da * (Q[t * D + j] + kEps);
            dK[t * D + j] += dc * (cQ[t * D + j] + kEps);
            dcQ[t * D + j] = dc * (K[t * D + j] + kEps);
          }
        }
        to_final(dcK.data(), 0, D), to_final(dcQ.data(), 1, D);
        rscan(dcK.data(), D), rscan(dcQ.data(), D);
        to_initial(dcK.data(), 0, D), to_initial(dcQ.data(), 1, D);
        for (int64_t t = 0; t < T; ++t)  // cK = scan K, cQ = scan Q; then the sigmoids
          for (int64_t j = 0; j < D; ++j) {
            const float gq = dQ[t * D + j] + dcQ[t * D + j], gk = dK[t * D + j] + dcK[t * D + j];
            const float sq = Q[t * D + j], sk = K[t * D + j];
            dq[(row0 + t * H) * D + j] = gq * sq * (1.0f - sq);
            dk[(row0 + t * H) * D + j] = gk * sk * (1.0f - sk);
          }
      }
  }
}

namespace {


MixerSpec make_spec() {
  MixerSpec s;
  s.name = "flow";
  s.blocking = {{"T", kLinearChunk}};
  // the chunked product of kernels/linear_product.h
  // plus the flow normalisers (2 dot products of D per token and head, q and k)
  s.flops = [](const std::map<std::string, int64_t>& d, bool) {
    const double T = double(d.at("T")), H = double(d.at("H")), D = double(d.at("D")), E = double(d.at("E"));
    return chunked_product_flops(T, H, D, E) + H * 2 * 2 * T * D;
  };
  s.paper = "Wu et al. 2022, Flowformer: Linearizing Transformers with Conservation Flows";
  s.summary = "Flow-Attention: sigmoid kernels with flow conservation (competition, allocation)";
  s.inputs = {{"q", "B,T,H,D"}, {"k", "B,T,H,D"}, {"v", "B,T,H,E"}};
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
    Tensor y({d.B, d.T, d.H, d.E});
    flow_forward(y.ptr(), c.t("q").ptr(), c.t("k").ptr(), c.t("v").ptr(), d, c.causal, st);
    out["y"] = std::move(y);
    return out;
  };
  s.backward = [state_io](const Call& c, const Tensor& dy) {
    const AttnDims d = attn_dims(c);
    TensorMap out;
    const FlowStateIO st = state_io(c, out, true);
    Tensor y({d.B, d.T, d.H, d.E}), dq({d.B, d.T, d.H, d.D}), dk({d.B, d.T, d.H, d.D}), dv({d.B, d.T, d.H, d.E});
    flow_forward(y.ptr(), c.t("q").ptr(), c.t("k").ptr(), c.t("v").ptr(), d, c.causal, st);
    flow_backward(dq.ptr(), dk.ptr(), dv.ptr(), c.t("q").ptr(), c.t("k").ptr(), c.t("v").ptr(), dy.ptr(), d,
                  c.causal, st);
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
