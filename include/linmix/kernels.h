// The fast kernels of linmix: the parallel (training / prefill) form and the recurrent
// (generation) step of every mechanism, with their state structs. The float64 references
// they are tested against live in src/ref/. Shapes are given per function; all tensors are
// contiguous row-major float32. Outputs come first, then inputs, then weights, then dims.
#pragma once
#include <cstdint>
#include <vector>

#include "linmix/dims.h"

namespace linmix {


// ---- softmax (src/mixers/softmax.cpp) ----
// Tiled online softmax (FlashAttention algorithm): O(T) extra memory.
// y: (B,T,H,E); q, k: (B,T,H,D); v: (B,T,H,E). window 0 = unlimited.
// lse (B,H,T), optional: the log-sum-exp of each row's scaled logits, saved for backward.
void softmax_forward(float* y, const float* q, const float* k, const float* v, const AttnDims& d,
                     float scale, bool causal, int64_t window, float* lse = nullptr);
// FlashAttention backward (Dao et al. 2022, Algorithm 2 in spirit): P recomputed tile by tile
// from the saved lse; D_t = dy_t . y_t; dS = P (dy . v - D); dq = scale dS k, dk = scale dS^T q,
// dv = P^T dy. Extra memory O(T (D + E)) per head. dq, dk, dv written.
void softmax_backward(float* dq, float* dk, float* dv, const float* q, const float* k, const float* v,
                      const float* y, const float* lse, const float* dy, const AttnDims& d, float scale, bool causal,
                      int64_t window);

// Key/value cache of one sequence. k: (len,H,D), v: (len,H,E), oldest first. With a window
// only the last window-1 entries are kept between steps (all a future query can see).
struct KVCache {
  int64_t H = 0, D = 0, E = 0, window = 0;
  std::vector<float> k, v;
  int64_t len() const { return D ? static_cast<int64_t>(k.size()) / (H * D) : 0; }
};
// One causal token: y: (H,E); q, k: (H,D); v: (H,E). `scratch` is reused across calls.
void softmax_step(float* y, KVCache& cache, const float* q, const float* k, const float* v, float scale,
                  std::vector<float>& scratch);

// ---- linear (src/mixers/linear.cpp) ----
// Linear attention's non-causal form (every position sees every key), phi = elu + 1: per head
// S = phi(K)^T V, z = sum phi(k), y_t = phi(q_t)^T S / (phi(q_t) . z + eps) (two GEMMs). The
// causal form, from a given state and returning the final one, is the registry's "linear" (the
// gated chunked kernels of decay_chunk.h).
void linear_forward(float* y, const float* q, const float* k, const float* v, const AttnDims& d, float eps);
// Gradient of sum(y * dy): dq, dk (B,T,H,D), dv (B,T,H,E), written. O(T) extra memory.
void linear_backward(float* dq, float* dk, float* dv, const float* q, const float* k, const float* v,
                     const float* dy, const AttnDims& d, float eps);
// State of one sequence: S: (H,D,E), z: (H,D).
struct LinearState {
  int64_t H = 0, D = 0, E = 0;
  std::vector<float> S, z;
};
// One causal token: y: (H,E); q, k: (H,D); v: (H,E).
void linear_step(float* y, LinearState& st, const float* q, const float* k, const float* v, float eps,
                 std::vector<float>& scratch);

// ---- AFT family (src/mixers/aft.cpp) ----
// Banded AFT: position t mixes s in the band [t - lo, t + hi] with bias w(t, s, c), and every
// other allowed s (s <= t when causal) with bias 0, through running prefix / suffix sums.
// aft_simple: empty band (lo = -1, hi = 0); aft_local: lo = hi = window - 1 (hi = 0 causal);
// aft_conv: the kernel support; aft_full: lo = hi = T (everything in the band).
// The bias is constant over a channel block: bias(t, s, block) -> float.
struct AftBand {
  int64_t lo, hi;
  // channel blocks [c0, c1) over which the bias is constant; a block is processed as a unit
  std::vector<std::pair<int64_t, int64_t>> blocks;
  // bias for (t, s) in the block with index bi; only called for s in the band
  float (*bias)(const void* ctx, int64_t t, int64_t s, int64_t bi);
  const void* ctx;
  // optional: a bias that depends on t - s only (aft_conv), diagonal(ctx, bi)[t - s + hi] for the
  // band's lo + hi + 1 offsets; aft_forward then takes the band's sums as products of factors
  // e^{k - kappa} and e^{w - omega} (two GEMMs per block of rows) instead of an exp per (t, s, c)
  const float* (*diagonal)(const void* ctx, int64_t bi) = nullptr;
  // optional: a bias of any (t, s) in a band of finite width (aft_local) taken in the same
  // factored form, each row t of a block with its own scale: e^{w_ts - omega_t}, omega_t the
  // row's largest bias in its band
  bool factor_rows = false;
};
// The causal form's running sums as a state (the AFTs' state.num, den, max; (B,C) each, row
// b at b C): num, den are sums of e^{k_s} (v_s, 1) over the positions before the band, scaled by
// e^{-max}. Every pointer may be null: no initial state (empty sums), final state not wanted, no
// gradient wanted or given.
struct AftSumsIO {
  const float *num0 = nullptr, *den0 = nullptr, *max0 = nullptr;  // before token 0
  float *numT = nullptr, *denT = nullptr, *maxT = nullptr;        // after the last token (forward writes)
  const float *dnumT = nullptr, *ddenT = nullptr, *dmaxT = nullptr;  // the final sums' gradient
  float *dnum0 = nullptr, *dden0 = nullptr, *dmax0 = nullptr;        // the initial sums' (backward writes)
};
// y, q, k, v: (B,T,C). Extra memory O(T C) (the suffix sums, non-causal only).
// o_out, lse_out (B,T,C), optional: o = num / den and lse = log sum_s exp(k_s + w_ts), saved
// for the backward. sums (causal only): the running sums start from num0/den0/max0 and, with
// numT, the sums over every position that has left the band after the last token are written
// (aft_simple's band is empty: all of them; aft_local's and aft_conv's keep their last lo rows).
// bad (optional): set to 1 when a row of q, k or v holds an inf or NaN (checked as the rows are read).
void aft_forward(float* y, const float* q, const float* k, const float* v, int64_t B, int64_t T, int64_t C,
                 bool causal, const AftBand& band, float* o_out = nullptr, float* lse_out = nullptr,
                 AftSumsIO* sums = nullptr, uint32_t* bad = nullptr);
// AFT-full's forward as GEMMs over blocks of key positions (kernels/aft_full_gemm.cpp): w is
// (Tw, Tw) with Tw >= T, row t at w + t Tw; exact for any range (underflowing (t, c) recomputed).
void aft_full_forward(float* y, const float* q, const float* k, const float* v, const float* w, int64_t Tw, int64_t B,
                      int64_t T, int64_t C, bool causal, float* o_out = nullptr, float* lse_out = nullptr);
// Its backward from the saved o = num / den and lse (B,T,C): dq, dk, dv (B,T,C) and dw (Tw,Tw) written.
void aft_full_backward(float* dq, float* dk, float* dv, float* dw, const float* q, const float* k, const float* v,
                       const float* w, int64_t Tw, const float* o, const float* lse, const float* dy, int64_t B,
                       int64_t T, int64_t C, bool causal);
// The gradient of the band's bias, summed in aft_backward's band pass (the pass that already
// forms every P_ts): for each t, s in the band and channel block bi, the sum over the block's
// channels and the batch of P_ts h_t (v_s - o_t) is added to out[slot(ctx, t, s, bi)]. out
// (size floats) is written whole; the sums run in per-thread partials of size doubles.
struct AftBiasGrad {
  float* out = nullptr;
  int64_t size = 0;
  int64_t (*slot)(const void* ctx, int64_t t, int64_t s, int64_t bi) = nullptr;  // affine in s for a fixed t
  const void* ctx = nullptr;
};
// Backward for q, k, v: dq, dk, dv (B,T,C) written. Extra memory O(T C) per (batch, channel
// block) task. sums (causal only): the forward's AftSumsIO (its initial and final sums); with
// dnum0 the initial sums' gradient is written, with dnumT the final sums' gradient is taken in.
// bias_grad, optional: the bias's gradient too (above).
void aft_backward(float* dq, float* dk, float* dv, const float* q, const float* k, const float* v, const float* o,
                  const float* lse, const float* dy, int64_t B, int64_t T, int64_t C, bool causal,
                  const AftBand& band, const AftSumsIO* sums = nullptr, const AftBiasGrad* bias_grad = nullptr);
// The forward (y) and the backward (dq, dk, dv, bias_grad) in one call, no sums: for a factored
// band (AftBand::diagonal, factor_rows) each row block's forward rows feed its backward at once,
// sharing the block's factors, o and lse never written out; other bands run the two above.
void aft_forward_backward(float* y, float* dq, float* dk, float* dv, const float* q, const float* k, const float* v,
                          const float* dy, int64_t B, int64_t T, int64_t C, bool causal, const AftBand& band,
                          const AftBiasGrad* bias_grad = nullptr);

// The max of an empty running sum: stands in for -inf so that saved states stay finite
// (MIXERS.md uses the same convention, p = -1e38, for RWKV).
constexpr float kAftEmptyMax = -1e38f;
// Rows per block of the factored band (AftBand::diagonal, AftBand::factor_rows).
constexpr int64_t kAftRows = 64;

// Recurrent AFT state of one sequence: the running sums over positions that left the band
// (num, den scaled by exp(-max), per channel) and the band's last `lo` (k, v) rows.
struct AftState {
  int64_t C = 0;
  std::vector<float> num, den, max;  // (C)
  std::vector<float> k, v;           // (L,C), oldest first, L <= lo
  int64_t pos = 0;                   // tokens seen so far (absolute position of the next one)
  int64_t len() const { return C ? static_cast<int64_t>(k.size()) / C : 0; }
};
// One causal token at position st.pos: y, q, k, v: (C). lo = -1 (simple), K - 1 (conv),
// window - 1 (local) or a huge value (full, keeps everything).
void aft_step(float* y, AftState& st, const float* q, const float* k, const float* v, int64_t lo,
              const AftBand& band, std::vector<float>& scratch);

// ---- rwkv4 (src/mixers/rwkv4.cpp) ----
// State of the numerically stable WKV scan, per channel: a (numerator), b (denominator),
// both scaled by exp(-p). Initial a = b = 0, p = -1e38.
// Scans T tokens starting from (a, bb, p), updating them in place.
// y, k, v: (T, C) with row stride `stride` (C for one sequence, so B sequences are B calls);
// w (decay rate > 0), u (bonus): (C); a, bb, p: (C).
// mo, dn (T,C), optional: the exponent m_t and scaled denominator of each output (D_t = dn_t
// e^{m_t}), saved for the backward. y, mo, dn have row stride ldy (0: `stride`).
void rwkv4_scan(float* y, float* a, float* bb, float* p, const float* k, const float* v, const float* w,
                const float* u, int64_t T, int64_t C, int64_t stride, float* mo = nullptr, float* dn = nullptr,
                int64_t ldy = 0);
// Backward of a scan from the initial state: dk, dv (T,C) written; dw, du (C) written (this
// sequence's share). Needs the forward's y, mo, dn (row stride ldy, 0: `stride`). A reverse scan,
// O(C) extra memory. carry (5 C, optional): the reverse scan's sums (G, H, G', H' scaled by e^q,
// and q; see the definition) before the last token on entry (zeros and q = -1e38 without) and
// after the first on return: how the gradients of the initial and the final state enter and
// leave, and how one sequence's backward runs chunk by chunk from the end.
void rwkv4_backward(float* dk, float* dv, float* dw, float* du, const float* k, const float* v, const float* w,
                    const float* u, const float* y, const float* mo, const float* dn, const float* dy, int64_t T,
                    int64_t C, int64_t stride, float* carry = nullptr, int64_t ldy = 0);

}  // namespace linmix

namespace linmix {

// ---- performer (src/mixers/performer.cpp) ----
// FAVOR+ positive random features. proj: (M,D) rows omega_m. y, q, k, v as softmax.
// The non-causal form: queries are stabilised by their row max, keys by the max over all keys.
// The causal form (the running key max as a decay, from a given state) is the registry's
// "performer" (the gated chunked kernels of decay_chunk.h).
void performer_forward(float* y, const float* q, const float* k, const float* v, const float* proj,
                       const AttnDims& d, int64_t M);
// Gradient of sum(y * dy): dq, dk, dv, dproj written.
void performer_backward(float* dq, float* dk, float* dv, float* dproj, const float* q, const float* k, const float* v,
                        const float* proj, const float* dy, const AttnDims& d, int64_t M);
// State of one sequence: S: (H,M,E), z: (H,M), both scaled by exp(-kmax[h]); kmax: (H); projT:
// the features' proj transposed (D,M), made once with the state (the step's q and k features from
// it with no horizontal sums).
struct PerformerState {
  int64_t H = 0, M = 0, E = 0;
  std::vector<float> S, z, kmax, projT;
};
void performer_step(float* y, PerformerState& st, const float* q, const float* k, const float* v, int64_t D,
                    std::vector<float>& scratch);
// Orthogonal Gaussian random features (Choromanski et al. 2021, sec. 2.4 / 4): blocks of D
// orthonormal rows (QR of a Gaussian matrix), each row scaled by an independent chi_D norm.
// Returns (M,D) row-major, deterministic in seed.
std::vector<float> orthogonal_gaussian_features(int64_t M, int64_t D, uint64_t seed);

}  // namespace linmix
