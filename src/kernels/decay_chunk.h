// The chunked forms of the decaying linear recurrences (docs/MIXERS.md, "Decaying linear
// attention, delta rules, RWKV-5/6/7 and Mamba-2"), for heads run chunk by chunk on their rows
// (the *_heads entry points) or one head on contiguous rows, starting from a given state and
// handing the final state on. Two primitives serve all eight mechanisms:
//
// gated (retention, gla, rwkv5, rwkv6, mamba2), key-first state S (D,E):
//   S_t = diag(e^{g_t}) S_{t-1} + k_t v_t^T;  y_t = S_t^T q_t            (shift = false)
//                                             y_t = S_{t-1}^T q_t         (shift = true, RWKV's
//                                             read-out before the update; the bonus is the caller's)
// dplr, the diagonal-plus-low-rank delta rule (deltanet, gated_deltanet, rwkv7):
//   S_t = diag(e^{w_t}) S_{t-1} + b_t (a_t^T S_{t-1}) + k_t v_t^T;  y_t = S_t^T r_t
//
// Chunks of kDecayChunk rows. Inside a chunk, c is the cumulative sum of the log decays and
// every decay between positions is evaluated as e^{c_t - c_s} for s before t (exponent <= 0,
// never e^{+c}): pairwise in log space inside diagonal sub-blocks of kDecaySub rows, and
// between sub-blocks as one product whose two factors are both taken relative to the sub-block
// boundary (Yang et al. 2023, secondary chunking), so a log decay of -30 per step stays finite.
// The products of a chunk (scores, their application, the state update) are BLAS GEMMs. A
// gated chunk whose total decay stays above e^{-40} on every channel (every chunk of a trained
// model's slow heads) takes the factored form instead: the decays fold into q and k as they are
// read, and the chunk is four GEMMs with no pairwise exps (decay_chunk.cpp, factored_chunk); a
// dplr chunk likewise, six GEMMs (dplr_factored).
//
// Backward: the states at chunk starts (and the chunks' scores: GatedRows save_*, dplr_forward's
// save_*) are kept by the forward (T / chunk (D E + chunk^2) floats: memory linear in T), then
// chunks run in reverse with the state gradient dS. Decay gradients
// come from one rule: a factor x e^{c_t} (e^{-c_s}) has d c_t = x . dx (d c_s = -x . dx), then
// dg_tau = sum of dc over the cumulative sums that contain g_tau.
#pragma once
#include <cstdint>
#include <cstring>
#include <functional>
#include <vector>

namespace linmix {

constexpr int64_t kDecayChunk = 64;
constexpr int64_t kDecaySub = 16;
// Chunks of a sequence of T tokens (the last one partial).
inline int64_t decay_chunks(int64_t T) { return (T + kDecayChunk - 1) / kDecayChunk; }

// FLOPs of gated_forward_heads per head: Q S, the state update K^T V (2 T D E each), scores (2 T L D)
// and their product with V (2 T L E), L = kDecayChunk (about half of them masked, counted whole
// as the other chunked forms count them).
inline double gated_flops(double T, double D, double E) {
  const double L = double(kDecayChunk);
  return T * (4 * D * E + 2 * L * D + 2 * L * E);
}
// dplr: four score matrices, the substitution (L^2 E), four state products.
inline double dplr_flops(double T, double D, double E) {
  const double L = double(kDecayChunk);
  return T * (8 * D * E + 8 * L * D + 6 * L * E);
}

// A head's operands at row strides in place: row t of q at q + t ldq (a head of a (B,T,H,D)
// tensor: ldq = H D), and so on (ldg = 0: one row of log decays for every step); y's rows written
// at y + t ldy, scaled by yscale (a read-out scale of q). q, k, g: D floats a row, v, y: E; g <= 0
// (log decays).
using ChunkEpilogue = std::function<void(int64_t, int64_t, const float*, const float*)>;
struct GatedRows {
  int64_t q, k, v, g, y;
  float yscale = 1.0f;
  // RWKV-5/6's bonus (shift only): y_t += (q_t . (u o k_t)) v_t, u (D), as the diagonal of the
  // chunk's scores
  const float* u = nullptr;
  // Mamba-2: row t of k scaled by kscale[t] (its step d_t); g_row: one log decay per step at
  // g + t ldg, shared by the D channels
  const float* kscale = nullptr;
  bool g_row = false;
  // Mamba-2's skip: y_t has vskip v_t added (by the caller's epilogue in the forward);
  // gated_backward_heads adds its gradient vskip dy_t to dv
  float vskip = 0.0f;
  // called with (t0, n, qc, kc) once the chunk's rows [t0, t0 + n) of y are written, while they
  // are in cache (Mamba-2's skip and gate, the linear attentions' normalisers); qc, kc: the
  // chunk's rows of q and k as the kernel read them (n x D, contiguous; phi applied with phi)
  const ChunkEpilogue* epilogue = nullptr;
  // gated_forward_heads: q and k hold x, and the kernel reads phi(x) = elu(x) + 1 = (x > 0 ?
  // x + 1 : e^x) (linear attention's feature map), applied as a chunk's rows are gathered: no
  // (T,D) copies of phi(q), phi(k). (gated_backward_heads takes phi(q), phi(k) as rows: a
  // backward reads them twice, copies made once cost less than phi in both sweeps.)
  bool phi = false;
  // For gated_backward_heads: chunk j's starting state (D,E) is written at save_states + j D E and its
  // masked scores (n x n, row stride n; yscale and kscale in them, the bonus not) at
  // save_scores + j kDecayChunk^2, when not null: (T / chunk) (D E + chunk^2) floats.
  float* save_states = nullptr;
  float* save_scores = nullptr;
  // gated_forward_heads: the operands whose rows are a call's inputs left unchecked (Call::unchecked),
  // checked as the chunk's rows are gathered (kernels/value_check.h): kCheck* bits; g as a log
  // decay (a value > 0 refused too) with kCheckGLog. A bad value sets *bad nonzero.
  uint32_t check = 0;
  uint32_t* bad = nullptr;
};
constexpr uint32_t kCheckQ = 1, kCheckK = 2, kCheckV = 4, kCheckG = 8, kCheckGLog = 16;
// One head's operands of gated_forward_heads.
struct GatedHeadRows {
  float* y;
  float* S;
  const float *q, *k, *v, *g;
  GatedRows ld;
};
// Several heads of one T, D, E, run chunk by chunk across them (every head's chunk 0, then chunk
// 1, ...): heads side by side in a (B,T,H,X) tensor then read each chunk's rows as runs of memory
// that the hardware prefetchers follow, where one head alone reads D of every H D floats a row.
void gated_forward_heads(const GatedHeadRows* heads, int64_t nh, int64_t T, int64_t D, int64_t E, bool shift);
// Backward of gated_forward_heads, several heads of one T, D, E run chunk by chunk across them (in
// reverse) on their rows in place, as gated_forward_heads. A head's operands q, k, v, g and its
// dy (rows at ld.y) are read at the strides of ld, yscale and kscale folded in as the forward
// folds them (epilogue: the caller's). Its gradients go to the strides of od: dq at od.q (times
// yscale: with respect to q itself), dk at od.k (with respect to k o kscale when ld.kscale), dv at
// od.v, dg at od.g: D floats a step, or with od.g = 0 (ld.g = 0: one row for every step) the sum
// over the steps; with g_row one float a step (the sum over the D channels), or with od.g = 0
// one float. dS0 (D,E) is written; dST (D,E; null = zeros: fla's dht) is the gradient of the
// final state. With ld.u (RWKV-5/6's bonus) its gradient is added to du (D). states, scores:
// what gated_forward_heads saved for these operands (GatedRows save_*); ST: the final state it
// returned (null: the chunks' decay gradients take the longer way, without it).
// grad_epilogue (when not null): called with (t0, n, q, k, dq, dk) for every chunk, last chunk
// first, once the chunk's dq and dk are complete in the kernel's own contiguous rows (n x D; q, k
// as gathered: yscale and kscale folded in, dq with respect to that q), before they go to the
// heads' rows: the mechanism's own terms and chain rule there while the rows are in cache (the
// rows go out as streamed stores, not to be read back soon).
using GradEpilogue = std::function<void(int64_t, int64_t, const float*, const float*, float*, float*)>;
struct GatedGradHead {
  const float *q, *k, *v, *g, *dy;
  const float *S0, *dST, *states, *scores, *ST;
  float *dq, *dk, *dv, *dg, *dS0, *du;
  GatedRows ld, od;
  const GradEpilogue* grad_epilogue = nullptr;
};
void gated_backward_heads(const GatedGradHead* heads, int64_t nh, int64_t T, int64_t D, int64_t E, bool shift);
// One head. r, w, k, a, b: (T,D); v: (T,E); y: (T,E) written; S (D,E) in and out as above.
// save_states, save_kept (when not null): what dplr_backward reads instead of recomputing, chunk
// j's starting state at save_states + j D E ((T / chunk) D E floats) and its Aab, Aak (n x n) and
// U (n x E) at save_kept + j dplr_kept_per(E) ((T / chunk) dplr_kept_per(E) floats).
inline int64_t dplr_kept_per(int64_t E) { return 2 * kDecayChunk * kDecayChunk + kDecayChunk * E; }
void dplr_forward(float* y, float* S, const float* r, const float* w, const float* k, const float* v, const float* a,
                  const float* b, int64_t T, int64_t D, int64_t E, float* save_states = nullptr,
                  float* save_kept = nullptr);
void dplr_backward(float* dr, float* dw, float* dk, float* dv, float* da, float* db, float* dS0, const float* dy,
                   const float* S0, const float* r, const float* w, const float* k, const float* v, const float* a,
                   const float* b, int64_t T, int64_t D, int64_t E, const float* dST = nullptr,
                   const float* saved_states = nullptr, const float* saved_kept = nullptr);

// Several heads of one T, D, E run chunk by chunk across them (forward only, as
// gated_forward_heads). A head's operands are made a chunk at a time by its load(t0, n, rows):
// rows [t0, t0 + n) of r, w, k, a, b (n x D) and v (n x E), contiguous, into the given buffers
// (the mechanism maps its own inputs there: deltanet's normalised keys and so on); y's rows are
// written at y + t ldy; S (D,E) in and out.
struct DplrChunkRows {
  float *r, *w, *k, *v, *a, *b;
};
struct DplrHeadRows {
  float* y;
  int64_t ldy;
  float* S;
  std::function<void(int64_t, int64_t, const DplrChunkRows&)> load;
};
void dplr_forward_heads(const DplrHeadRows* heads, int64_t nh, int64_t T, int64_t D, int64_t E);
// The load of a head whose inputs lie in rows as they are (RWKV-7's mixer and engine): n rows of
// r, w, k, a, b (row t at X + t ld) and v (at v + t ldv) into x, r times rscale.
inline void dplr_gather(const DplrChunkRows& x, int64_t n, int64_t D, int64_t E, const float* r, const float* w,
                        const float* k, const float* v, const float* a, const float* b, int64_t ld, int64_t ldv,
                        float rscale) {
  const size_t bytes = size_t(D) * 4;
  for (int64_t t = 0; t < n; ++t) {
    const int64_t o = t * ld, to = t * D;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) x.r[to + d] = rscale * r[o + d];
    std::memcpy(x.w + to, w + o, bytes), std::memcpy(x.k + to, k + o, bytes);
    std::memcpy(x.a + to, a + o, bytes), std::memcpy(x.b + to, b + o, bytes);
    std::memcpy(x.v + t * E, v + t * ldv, size_t(E) * 4);
  }
}

// The recurrent steps (one token, one head; allocation-free).
// gated: S = diag(e^{g}) S + k v^T, y = S^T q (shift: y = S_old^T q, read before the update).
// Blocks of 16 values, rows two at a time into two sums each held in registers: one running sum
// a row chained the FMAs through y in memory (gla, H 8, D = E = 64: 3.9 us a token).
inline void gated_step(float* __restrict S, float* __restrict y, const float* q, const float* k, const float* v,
                       const float* decay /* e^{g}, (D) */, int64_t D, int64_t E, bool shift) {
  constexpr int64_t W = 16;
  for (int64_t e0 = 0; e0 < E; e0 += W) {
    const int64_t ne = E - e0 < W ? E - e0 : W;
    const float* ve = v + e0;
    float a[W] = {}, b[W] = {};
    int64_t x = 0;
    if (ne == W)
      for (; x + 2 <= D; x += 2) {
        float* __restrict s0 = S + x * E + e0;
        float* __restrict s1 = s0 + E;
        const float q0 = q[x], q1 = q[x + 1], k0 = k[x], k1 = k[x + 1], f0 = decay[x], f1 = decay[x + 1];
#pragma omp simd
        for (int64_t j = 0; j < W; ++j) {
          const float o0 = s0[j], o1 = s1[j], n0 = o0 * f0 + k0 * ve[j], n1 = o1 * f1 + k1 * ve[j];
          s0[j] = n0, s1[j] = n1;
          a[j] += q0 * (shift ? o0 : n0), b[j] += q1 * (shift ? o1 : n1);
        }
      }
    for (; x < D; ++x) {
      float* __restrict s0 = S + x * E + e0;
      const float q0 = q[x], k0 = k[x], f0 = decay[x];
      for (int64_t j = 0; j < ne; ++j) {
        const float o0 = s0[j], n0 = o0 * f0 + k0 * ve[j];
        s0[j] = n0, a[j] += q0 * (shift ? o0 : n0);
      }
    }
    for (int64_t j = 0; j < ne; ++j) y[e0 + j] = a[j] + b[j];
  }
}
// dplr: u = a^T S (E, scratch), S = diag(e^{w}) S + b u^T + k v^T, y = S^T r.
inline void dplr_step(float* __restrict S, float* __restrict y, float* __restrict u, const float* r,
                      const float* decay /* e^{w} */, const float* k, const float* v, const float* a, const float* b,
                      int64_t D, int64_t E) {
  for (int64_t e = 0; e < E; ++e) u[e] = 0.0f, y[e] = 0.0f;
  for (int64_t x = 0; x < D; ++x) {
    const float ax = a[x];
#pragma omp simd
    for (int64_t e = 0; e < E; ++e) u[e] += ax * S[x * E + e];
  }
  for (int64_t x = 0; x < D; ++x) {
    float* __restrict s = S + x * E;
    const float f = decay[x], bx = b[x], kx = k[x], rx = r[x];
#pragma omp simd
    for (int64_t e = 0; e < E; ++e) {
      const float n = s[e] * f + bx * u[e] + kx * v[e];
      s[e] = n, y[e] += rx * n;
    }
  }
}

}  // namespace linmix
