// flash — FLASH mixed-chunk attention (Hua et al. 2022, "Transformer Quality in Linear Time",
// sec. 3.2 and its pseudo-code). Single head; positions are cut into groups of G (T padded
// with positions that contribute nothing):
//   within a group:  y_quad = relu(Q_g K_g^T / G)^2 V_g   (masked s <= t when causal)
//   across groups:   causal y_lin,g = lin_q_g (sum_{h<g} lin_k_h^T V_h) / G;
//                    non-causal y_lin = lin_q (sum_all lin_k^T V) / T
// parallel: per group two small GEMMs for the quadratic part and a carried (S,E) state for
// the linear part. recurrent: the current group's rows (< G) plus the (S,E) state.
#include "../kernels/linear_product.h"
#include "../kernels/value_check.h"
#include "../ref/ref_util.h"
#include "common.h"
#include "linmix/kernels.h"
#include "row_cache.h"

namespace linmix::ref {

// ---- flash: the float64 reference (the literal formula, templated for the tape) ----
// FLASH mixed-chunk attention as T x T weights: W_ij = [same group, j <= i if causal]
// relu(qq_i . qk_j / G)^2 + lin_q_i . lin_k_j / G for earlier groups (causal) or / T for all
// j (non-causal). qq, qk, lq, lk: (B,T,S); v, y: (B,T,E).
// M0 (B,S,E; causal, null: none): the linear state of the groups before, which every position
// reads (y_i += lin_q_i . M0); with MT also the final one, M0 + the complete groups' lin_k^T V / G.
template <class S>
void flash_ref(S* y, const S* qq, const S* qk, const S* lq, const S* lk, const S* v, int64_t B, int64_t T,
               int64_t Sd, int64_t E, int64_t G, bool causal, const S* M0 = nullptr, S* MT = nullptr) {
  std::vector<S> W(T * T);
  for (int64_t b = 0; b < B; ++b) {
    auto dot = [&](const S* a, const S* c, int64_t i, int64_t j) {
      S s = 0;
      for (int64_t x = 0; x < Sd; ++x) s += a[(b * T + i) * Sd + x] * c[(b * T + j) * Sd + x];
      return s;
    };
    for (int64_t i = 0; i < T; ++i)
      for (int64_t j = 0; j < T; ++j) {
        S w = 0;
        if (i / G == j / G && (!causal || j <= i)) {
          const S a = std::max(dot(qq, qk, i, j) / double(G), S(0));  // (this order keeps a NaN, as torch.relu)
          w += a * a;
        }
        if (causal && j / G < i / G) w += dot(lq, lk, i, j) / double(G);
        if (!causal) w += dot(lq, lk, i, j) / double(T);
        W[i * T + j] = w;
      }
    for (int64_t i = 0; i < T; ++i)
      for (int64_t e = 0; e < E; ++e) {
        S acc = 0;
        for (int64_t j = 0; j < T; ++j) acc += W[i * T + j] * v[(b * T + j) * E + e];
        for (int64_t x = 0; M0 && x < Sd; ++x) acc += lq[(b * T + i) * Sd + x] * M0[(b * Sd + x) * E + e];
        y[(b * T + i) * E + e] = acc;
      }
    if (MT) {
      const int64_t full = T / G * G;  // the rows of complete groups
      for (int64_t x = 0; x < Sd; ++x)
        for (int64_t e = 0; e < E; ++e) {
          S m = M0 ? M0[(b * Sd + x) * E + e] : S(0);
          for (int64_t j = 0; j < full; ++j) m += lk[(b * T + j) * Sd + x] * v[(b * T + j) * E + e] / double(G);
          MT[(b * Sd + x) * E + e] = m;
        }
    }
  }
}

}  // namespace linmix::ref

namespace linmix {

namespace {

struct FlashDims {
  int64_t B, T, S, E, G;
  bool operator==(const FlashDims&) const = default;
};

// What a forward keeps for its backward (Call::keep / Call::reuse): the groups' linear states Ms
// (B, ng, S, E), each group's r = relu(Q K^T / G) (B, ng, ld, ld; A = r^2 masked) and y, so that the
// backward neither recomputes the forward nor the states and scores (T 4096, S 128, E 512, G 256:
// 2.4 of its 8 GFLOP).
struct FlashSaved : RunSaved {
  FlashDims d{};
  bool causal = false;
  std::vector<float> Ms, r;
  Tensor y, MT;  // the forward's output; the final M (causal forms from a state / with a final state)
  bool fits(const FlashDims& e, bool c) const { return d == e && causal == c; }
};

// The linear state each group reads, Ms (B, ng, S, E) for ng = ceil(T / G) groups: causal, group g
// reads M0 + sum_{h < g, h complete} lin_k_h^T V_h / G (each complete group's product on the threads,
// then a prefix sum over the groups); non-causal, every group reads lin_k^T V / T. With MT the
// final state (causal): M0 + every complete group's.
// bad (causal; not null): lin_k's and v's rows checked for inf / NaN just before each group's product
// reads them (every group's, the incomplete last one's too), a bad one setting *bad.
void flash_states(std::vector<float>& Ms, const float* lk, const float* v, const FlashDims& d, bool causal,
                  const float* M0, float* MT, std::atomic<uint32_t>* bad = nullptr) {
  const int64_t T = d.T, S = d.S, E = d.E, G = d.G, ng = (T + G - 1) / G, SE = S * E;
  Ms.resize(size_t(d.B * ng * SE));
  if (!causal) {
    for (int64_t b = 0; b < d.B; ++b)  // one product per sequence (BLAS on the threads)
      gemm_tn(Ms.data() + b * ng * SE, lk + b * T * S, v + b * T * E, S, E, T, S, E, E, 1.0f / float(T), 0.0f);
#pragma omp parallel for collapse(2) schedule(static)
    for (int64_t b = 0; b < d.B; ++b)
      for (int64_t g = 1; g < ng; ++g) std::copy_n(Ms.data() + b * ng * SE, SE, Ms.data() + (b * ng + g) * SE);
    return;
  }
  // slot g + 1 holds group g's own product (complete groups; the last slot's is not needed)
#pragma omp parallel for collapse(2) schedule(dynamic)
  for (int64_t b = 0; b < d.B; ++b)
    for (int64_t g = 0; g < ng; ++g) {
      const int64_t r0 = b * T + g * G;
      if (bad) {
        RowCheck<false> chk;
        const int64_t n = std::min(G, T - g * G);
        chk.add(lk + r0 * S, n * S), chk.add(v + r0 * E, n * E);
        if (chk.bad()) bad->fetch_or(1u);
      }
      float* add = Ms.data() + (b * ng + g) * SE;  // slot g, shifted below
      if (g * G + G <= T) gemm_tn(add, lk + r0 * S, v + r0 * E, S, E, G, S, E, E, 1.0f / float(G), 0.0f);
      else std::fill(add, add + SE, 0.0f);
    }
  // the prefix over the groups, runs of kRun elements of a state at a time (the groups' rows
  // streamed, the run's sums in a vector; element by element the loads strode S E apart, scalar)
  constexpr int64_t kRun = 256;
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t b = 0; b < d.B; ++b)
    for (int64_t x0 = 0; x0 < SE; x0 += kRun) {
      const int64_t nx = std::min(kRun, SE - x0);
      float run[kRun];
      for (int64_t i = 0; i < nx; ++i) run[i] = M0 ? M0[b * SE + x0 + i] : 0.0f;
      for (int64_t g = 0; g < ng; ++g) {
        float* m = Ms.data() + (b * ng + g) * SE + x0;
#pragma omp simd
        for (int64_t i = 0; i < nx; ++i) {
          const float own = m[i];
          m[i] = run[i], run[i] += own;
        }
      }
      if (MT) std::copy(run, run + nx, MT + b * SE + x0);
    }
}

// The rows of a group's sub-block (causal): row block i reads only the column blocks up to its own,
// so the group's four products over (n, n) scores skip the blocks above the diagonal (G 256: 10 of
// 16 blocks of 64 computed; the masked elements of the diagonal blocks as before). Non-causal: the
// whole group at once.
constexpr int64_t kFlashSub = 64;
int64_t sub_rows(int64_t n, bool causal) { return causal ? std::min(kFlashSub, n) : n; }

// M0, MT (B,S,E; causal, null: none / not wanted): the linear state before and after. Groups of
// every sequence on the threads, each given its linear state by flash_states (the groups of one
// sequence ran one after another, so a call of one sequence ran on one core).
// keep (null: none): the forward keeps its states and scores there (FlashSaved; y is the caller's).
// bad (causal; not null): every input's rows checked for inf / NaN as the group's products are about to
// read them (kernel_checks_values), a bad one setting *bad.
void flash_forward(float* y, const float* qq, const float* qk, const float* lq, const float* lk, const float* v,
                   const FlashDims& d, bool causal, const float* M0 = nullptr, float* MT = nullptr,
                   FlashSaved* keep = nullptr, std::atomic<uint32_t>* bad = nullptr) {
  const int64_t T = d.T, S = d.S, E = d.E, G = d.G, ng = (T + G - 1) / G, ld = std::min(G, T);
  thread_local std::vector<float> own;
  std::vector<float>& Ms = keep ? keep->Ms : own;
  flash_states(Ms, lk, v, d, causal, M0, MT, bad);
  const float* pM = Ms.data();
  if (keep) keep->d = d, keep->causal = causal, keep->r.resize(size_t(d.B * ng * ld * ld));
  float* kr = keep ? keep->r.data() : nullptr;
#pragma omp parallel
  {
    thread_local std::vector<float> A;  // (G,G) group scores
    A.resize(size_t(ld * ld));
#pragma omp for collapse(2) schedule(dynamic)
    for (int64_t b = 0; b < d.B; ++b)
      for (int64_t g = 0; g < ng; ++g) {
        const int64_t g0 = g * G, n = std::min(G, T - g0), r0 = b * T + g0;
        if (bad) {
          RowCheck<false> chk;
          chk.add(qq + r0 * S, n * S), chk.add(qk + r0 * S, n * S), chk.add(lq + r0 * S, n * S);
          if (chk.bad()) bad->fetch_or(1u);
        }
        float* rk = kr ? kr + (b * ng + g) * ld * ld : nullptr;
        const int64_t bs = sub_rows(n, causal);
        for (int64_t i0 = 0; i0 < n; i0 += bs) {  // row block [i0, i0 + m) reads the columns below c
          const int64_t m = std::min(bs, n - i0), c = causal ? i0 + m : n;
          gemm_nt(A.data() + i0 * ld, qq + (r0 + i0) * S, qk + r0 * S, m, c, S, S, S, ld, 1.0f, 0.0f);
          for (int64_t i = i0; i < i0 + m; ++i)
            for (int64_t j = 0; j < c; ++j) {
              const float a = std::max(A[i * ld + j] / float(G), 0.0f);
              if (rk) rk[i * ld + j] = a;
              A[i * ld + j] = (causal && j > i) ? 0.0f : a * a;
            }
          gemm_nn(y + (r0 + i0) * E, A.data() + i0 * ld, v + r0 * E, m, E, c, ld, E, E, 1.0f, 0.0f);
        }
        // the linear part: the groups before (causal) or all (non-causal)
        gemm_nn_acc(y + r0 * E, lq + r0 * S, pM + (b * ng + g) * S * E, n, E, S, S, E, E);
      }
  }
}

// Backward. Quadratic part per group (s = Q K^T, A = relu(s / G)^2 masked):
//   dV += A^T dY,  dA = dY V^T,  dS = dA 2 relu(s / G) / G,  dQq = dS Kq,  dKq = dS^T Qq.
// Linear part, M_g = sum_{h<g} lin_k_h^T V_h / G (causal) or lin_k^T V / T (non-causal):
//   dlin_q_g = dY_g M_g^T,  dM_g = lin_q_g^T dY_g,  and with R_h the dM of every group that
//   sees group h (the later ones, or all): dlin_k_h = V_h R_h^T / n,  dV_h += lin_k_h R_h / n.
// Groups on the threads in two passes: the quadratic part, dlin_q and each group's dM_g; then,
// after R_h (a suffix sum over the groups), dlin_k and the linear part of dV.
struct FlashGrads {
  float *dqq, *dqk, *dlq, *dlk, *dv;
};

// The state (causal): M0 is read by every row, so dM0 = sum_t lin_q_t^T dy_t + dMT; the final
// state's gradient dMT reaches the complete groups' lin_k and v (as a later group's dM would).
// reuse (null: recompute): the forward's states and scores (FlashSaved, fitting the call).
void flash_backward(const FlashGrads& gr, const float* qq, const float* qk, const float* lq, const float* lk,
                    const float* v, const float* dy, const FlashDims& d, bool causal, const float* M0 = nullptr,
                    const float* dMT = nullptr, float* dM0 = nullptr, const FlashSaved* reuse = nullptr) {
  const int64_t T = d.T, S = d.S, E = d.E, G = d.G, ld = std::min(G, T), ng = (T + G - 1) / G, SE = S * E;
  thread_local std::vector<float> Ms, dMs;
  if (!reuse) flash_states(Ms, lk, v, d, causal, M0, nullptr);
  dMs.resize(size_t(d.B * ng * SE));
  const float* pM = reuse ? reuse->Ms.data() : Ms.data();
  float* pdM = dMs.data();
#pragma omp parallel
  {
    thread_local std::vector<float> A, dS;  // (G,G)
    A.resize(size_t(ld * ld)), dS.resize(size_t(ld * ld));
#pragma omp for collapse(2) schedule(dynamic)
    for (int64_t b = 0; b < d.B; ++b)
      for (int64_t g = 0; g < ng; ++g) {  // the quadratic part, dlin_q, dM_g
        const int64_t g0 = g * G, n = std::min(G, T - g0), r0 = b * T + g0;
        const float* rk = reuse ? reuse->r.data() + (b * ng + g) * ld * ld : nullptr;  // relu(s / G) kept
        const int64_t bs = sub_rows(n, causal);
        for (int64_t i0 = 0; i0 < n; i0 += bs) {  // row block [i0, i0 + m): A, dS left of c, dQq
          const int64_t m = std::min(bs, n - i0), c = causal ? i0 + m : n;
          float *Ai = A.data() + i0 * ld, *dSi = dS.data() + i0 * ld;
          if (!rk) gemm_nt(Ai, qq + (r0 + i0) * S, qk + r0 * S, m, c, S, S, S, ld, 1.0f, 0.0f);
          gemm_nt(dSi, dy + (r0 + i0) * E, v + r0 * E, m, c, E, E, E, ld, 1.0f, 0.0f);  // dA = dY V^T
          for (int64_t i = i0; i < i0 + m; ++i)
            for (int64_t j = 0; j < c; ++j) {
              const float r = rk ? rk[i * ld + j] : std::max(A[i * ld + j] / float(G), 0.0f);
              const bool keep = !(causal && j > i);
              A[i * ld + j] = keep ? r * r : 0.0f;
              dS[i * ld + j] = keep ? dS[i * ld + j] * 2.0f * r / float(G) : 0.0f;
            }
          gemm_nn(gr.dqq + (r0 + i0) * S, dSi, qk + r0 * S, m, S, c, ld, S, S, 1.0f, 0.0f);
        }
        for (int64_t j0 = 0; j0 < n; j0 += bs) {  // column block [j0, j0 + m): the rows from j0 down
          const int64_t m = std::min(bs, n - j0), k0 = causal ? j0 : 0;
          gemm_tn(gr.dv + (r0 + j0) * E, A.data() + k0 * ld + j0, dy + (r0 + k0) * E, m, E, n - k0, ld, E, E, 1.0f, 0.0f);
          gemm_tn(gr.dqk + (r0 + j0) * S, dS.data() + k0 * ld + j0, qq + (r0 + k0) * S, m, S, n - k0, ld, S, S, 1.0f,
                  0.0f);
        }
        gemm_nt(gr.dlq + r0 * S, dy + r0 * E, pM + (b * ng + g) * SE, n, S, E, E, E, S, 1.0f, 0.0f);
        gemm_tn(pdM + (b * ng + g) * SE, lq + r0 * S, dy + r0 * E, S, E, n, S, E, E, 1.0f, 0.0f);
      }
    // R_h in place of dM_h: causal, dMT (complete groups) + the dM of every later group; non-causal,
    // the total (every group sees all); scaled by 1 / G or 1 / T. dM0 = dMT + every dM.
    const float scale = causal ? 1.0f / float(G) : 1.0f / float(T);
    constexpr int64_t kRun = 256;  // runs of a state's elements, the groups streamed (as flash_states)
#pragma omp for collapse(2) schedule(static)
    for (int64_t b = 0; b < d.B; ++b)
      for (int64_t x0 = 0; x0 < SE; x0 += kRun) {
        const int64_t nx = std::min(kRun, SE - x0);
        float later[kRun], fin[kRun];
        for (int64_t i = 0; i < nx; ++i) later[i] = 0.0f, fin[i] = causal && dMT ? dMT[b * SE + x0 + i] : 0.0f;
        for (int64_t g = ng - 1; g >= 0; --g) {  // the sum of every group's dM (causal: of the later ones)
          float* m = pdM + (b * ng + g) * SE + x0;
          const float f = g * G + G <= T ? 1.0f : 0.0f;  // dMT reaches the complete groups
#pragma omp simd
          for (int64_t i = 0; i < nx; ++i) {
            const float own = m[i];
            if (causal) m[i] = (f * fin[i] + later[i]) * scale;
            later[i] += own;
          }
        }
        if (!causal)
          for (int64_t g = 0; g < ng; ++g) {
            float* m = pdM + (b * ng + g) * SE + x0;
            for (int64_t i = 0; i < nx; ++i) m[i] = later[i] * scale;
          }
        if (causal && dM0)
          for (int64_t i = 0; i < nx; ++i) dM0[b * SE + x0 + i] = fin[i] + later[i];
      }
#pragma omp for collapse(2) schedule(dynamic)
    for (int64_t b = 0; b < d.B; ++b)
      for (int64_t g = 0; g < ng; ++g) {  // dlin_k = V R^T, dV += lin_k R (R scaled)
        const int64_t g0 = g * G, n = std::min(G, T - g0), r0 = b * T + g0;
        const float* R = pdM + (b * ng + g) * SE;
        gemm_nt(gr.dlk + r0 * S, v + r0 * E, R, n, S, E, E, E, S, 1.0f, 0.0f);
        gemm_nn_acc(gr.dv + r0 * E, lk + r0 * S, R, n, E, S, S, E, E);
      }
  }
}

FlashDims flash_dims(const Call& c) { return {c.d("B"), c.d("T"), c.d("S"), c.d("E"), c.ip("group")}; }

// The state in every causal form: the unfinished group's L rows (quad_k, lin_k, v) join before the
// call's rows (quad_q, lin_q get zero rows: those rows' outputs are dropped), and M, the linear
// state of the groups before, is read by every row. After the call: the last (L + T) mod G rows,
// and M with the complete groups of the joined rows. The backward runs over the joined rows with
// dy = 0 on the state's; dfinal's rows join the rows they copy, the state's rows give dstate.
const char* const kFlashIn[5] = {"quad_q", "quad_k", "lin_q", "lin_k", "v"};
const char* flash_state_of(const std::string& in) {  // the state tensor caching an input's rows
  return in == "quad_k" ? "quad_k" : in == "lin_k" ? "lin_k" : in == "v" ? "v" : nullptr;
}

// y shared, not copied: the same buffer where y's storage keeps one alive (the forward's own y, and
// the saved one the backward hands on as its y), else a copy.
Tensor saved_y(const Tensor& y) {
  if (!y.data.keeper()) return y;
  Tensor t;
  t.shape = y.shape;
  t.data = Storage::view(const_cast<float*>(y.ptr()), y.data.size(), y.data.keeper());
  return t;
}

// The call's kept forward (Call::keep, forward only): a FlashSaved for flash_forward to fill, or null.
FlashSaved* keep_of(const Call& c, bool forward) {
  if (!forward || !c.keep) return nullptr;
  auto s = std::make_shared<FlashSaved>();
  FlashSaved* p = s.get();
  *c.keep = std::move(s);
  return p;
}
// What the forward of this call kept (backward only), where it fits the rows the backward runs over.
const FlashSaved* reuse_of(const Call& c, const FlashDims& d, bool causal) {
  const auto* r = dynamic_cast<const FlashSaved*>(c.reuse);
  return r && r->fits(d, causal) ? r : nullptr;
}

TensorMap flash_state_forms(const Call& c, const Tensor* dy) {
  const FlashDims d = flash_dims(c);
  const bool s0 = c.has("state.M");
  const int64_t L = s0 ? c.d("L") : 0, n = L + d.T, keep = n % d.G;
  // the joined rows: with no state's rows (L = 0) the call's own tensors, read in place, and the
  // outputs written in place (every element written by the kernels); else copies
  TensorMap cat;
  if (L > 0)
    for (const char* name : kFlashIn) {
      const char* st = flash_state_of(name);
      cat[name] = join_rows(st && s0 ? &c.t(std::string("state.") + st) : nullptr, L, c.t(name));
    }
  auto rows = [&](const char* name) { return L > 0 ? &cat.at(name) : &c.t(name); };
  const FlashDims dn{d.B, n, d.S, d.E, d.G};
  const float* M0 = s0 ? c.t("state.M").ptr() : nullptr;
  TensorMap out;
  const FlashSaved* reuse = dy ? reuse_of(c, dn, true) : nullptr;
  if (reuse) {  // y and the final M as the forward gave them
    out["y"] = saved_y(reuse->y), out["state.M"] = reuse->MT;
  } else {
    FlashSaved* kept = keep_of(c, !dy);
    Tensor yc = Tensor::uninitialized({d.B, n, d.E}), MT({d.B, d.S, d.E});
    flash_forward(yc.ptr(), rows("quad_q")->ptr(), rows("quad_k")->ptr(), rows("lin_q")->ptr(), rows("lin_k")->ptr(),
                  rows("v")->ptr(), dn, true, M0, MT.ptr(), kept, c.unchecked_bad.get());
    out["y"] = L > 0 ? rows_of(yc, L, n) : std::move(yc);
    if (kept) kept->y = saved_y(out["y"]), kept->MT = MT;
    out["state.M"] = std::move(MT);
  }
  for (const char* name : kFlashIn)
    if (const char* st = flash_state_of(name)) out[std::string("state.") + st] = rows_of(*rows(name), n - keep, n);
  if (!dy) return out;
  TensorMap g;
  for (const char* name : kFlashIn) g[name] = Tensor::uninitialized(rows(name)->shape);  // written whole
  const Tensor dyc = L > 0 ? join_rows(nullptr, L, *dy) : Tensor();
  Tensor dM0({d.B, d.S, d.E});
  flash_backward({g["quad_q"].ptr(), g["quad_k"].ptr(), g["lin_q"].ptr(), g["lin_k"].ptr(), g["v"].ptr()},
                 rows("quad_q")->ptr(), rows("quad_k")->ptr(), rows("lin_q")->ptr(), rows("lin_k")->ptr(),
                 rows("v")->ptr(), L > 0 ? dyc.ptr() : dy->ptr(), dn, true, M0,
                 c.has("dfinal.M") ? c.t("dfinal.M").ptr() : nullptr, dM0.ptr(), reuse);
  for (const char* name : kFlashIn) {
    Tensor& gi = g[name];
    if (const char* st = flash_state_of(name)) {
      const std::string fin = std::string("dfinal.") + st;
      if (c.has(fin)) add_rows(gi.data, c.t(fin).data, d.B, n, n - keep, keep);  // the final rows copy the last keep
      if (s0) out[std::string("dstate.") + st] = rows_of(gi, 0, L);
    }
    out[std::string("d") + name] = L > 0 ? rows_of(gi, L, n) : std::move(gi);
  }
  if (s0) out["dstate.M"] = std::move(dM0);
  return out;
}

MixerSpec make_spec() {
  MixerSpec s;
  s.name = "flash";
  s.small_params = {{"group", "3"}};  // several groups, a padded last one
  // groups of several causal sub-blocks (kFlashSub), a short last one in each group
  s.more_params = {{{"group", "150"}}};
  s.blocking = {{"T", kFlashSub}};
  s.bench_params = {{"group", "256"}};
  s.own_dims = [](std::map<std::string, int64_t>& d, Scale scale, bool) {
    d["S"] = scale == Scale::Test ? 5 : scale == Scale::Grad ? 3 : scale == Scale::Demo ? 16 : 128;
    if (scale == Scale::Bench) d["E"] = d["C"];  // GAU's expanded value width
  };
  // groups of G (bench: 256): relu^2 (Q K^T, A V) inside; linear attention across
  s.flops = [](const std::map<std::string, int64_t>& d, bool) {
    const double T = double(d.at("T")), S = double(d.at("S")), E = double(d.at("E")), G = 256;
    return 2 * T * G * (S + E) + 4 * T * S * E;
  };
  s.paper = "Hua et al. 2022, Transformer Quality in Linear Time (FLASH / GAU)";
  s.summary = "mixed-chunk attention: relu^2 attention inside groups of G, linear attention across groups";
  s.inputs = {{"quad_q", "B,T,S"}, {"quad_k", "B,T,S"}, {"lin_q", "B,T,S"}, {"lin_k", "B,T,S"}, {"v", "B,T,E"}};
  // the causal forward checks every input's rows as its groups' products are about to read them
  // (validation's pass over the 24 MiB cost its linmix.ops forward ~9% at T 4096)
  s.kernel_checks_values = true, s.kernel_checks_all_rows = true;
  s.params = {{"group", 256, true, 1, "group size G"}};
  s.example_params = {{"group", "16"}};
  s.state = {{"quad_k", "B,L,S"}, {"lin_k", "B,L,S"}, {"v", "B,L,E"}, {"M", "B,S,E"}};
  s.state_size = "(G-1) (2 S + E) + S E per sequence";
  s.time = "O(T G (S + E) + T S E)";
  s.memory = "O(G^2 + S E)";
  s.check = [](const Call& c) {
    if (c.has("state.M"))
      LINMIX_CHECK(c.d("L") < c.ip("group"), "tensor 'state.quad_k': holds at most group-1 = " +
                                                 std::to_string(c.ip("group") - 1) + " rows, found " +
                                                 std::to_string(c.d("L")));
  };
  s.y_dims = "B,T,E";
  // the causal form starts from the unfinished group's rows and M in every mode
  s.state_all_modes = true;
  s.final_dims = [](const Call& c) {
    const int64_t L = c.has("state.M") ? c.d("L") : 0;
    return std::map<std::string, int64_t>{{"L", (L + c.d("T")) % c.ip("group")}};
  };
  set_reference(s, [](const Call& c, const auto& x) {
    using S = scalar_of<decltype(x)>;
    const FlashDims d = flash_dims(c);
    if (!c.causal) {
      std::vector<S> y(d.B * d.T * d.E);
      ref::flash_ref<S>(y.data(), x.at("quad_q").data(), x.at("quad_k").data(), x.at("lin_q").data(),
                        x.at("lin_k").data(), x.at("v").data(), d.B, d.T, d.S, d.E, d.G, false);
      return y;
    }
    // from the state: its rows before the call's (zero query rows there), M read by every row
    const bool s0 = x.count("state.M") != 0;
    const int64_t L = s0 ? c.d("L") : 0, n = L + d.T, keep = n % d.G;
    std::map<std::string, std::vector<S>> cat;
    for (const char* name : kFlashIn) {
      const char* st = flash_state_of(name);
      const std::vector<S>* before = st && s0 ? &x.at(std::string("state.") + st) : nullptr;
      const int64_t row = int64_t(x.at(name).size()) / (d.B * d.T);
      cat[name] = cat_rows(before, L, x.at(name), d.T, d.B, row);
    }
    std::vector<S> yc(d.B * n * d.E), MT(d.B * d.S * d.E);
    ref::flash_ref<S>(yc.data(), cat["quad_q"].data(), cat["quad_k"].data(), cat["lin_q"].data(), cat["lin_k"].data(),
                      cat["v"].data(), d.B, n, d.S, d.E, d.G, true, opt_in(x, "state.M"), MT.data());
    std::vector<S> out = slice_rows(yc, d.B, n, L, n);  // y, then the final state in spec order
    for (const char* name : {"quad_k", "lin_k", "v"}) {
      const std::vector<S> r = slice_rows(cat[name], d.B, n, n - keep, n);
      out.insert(out.end(), r.begin(), r.end());
    }
    out.insert(out.end(), MT.begin(), MT.end());
    return out;
  });
  s.parallel = [](const Call& c) {
    if (c.causal && (c.has("state.M") || c.final_state)) return flash_state_forms(c, nullptr);
    const FlashDims d = flash_dims(c);
    Tensor y = Tensor::uninitialized({d.B, d.T, d.E});  // every row written
    FlashSaved* kept = keep_of(c, true);
    flash_forward(y.ptr(), c.t("quad_q").ptr(), c.t("quad_k").ptr(), c.t("lin_q").ptr(), c.t("lin_k").ptr(),
                  c.t("v").ptr(), d, c.causal, nullptr, nullptr, kept, c.unchecked_bad.get());
    if (kept) kept->y = saved_y(y);
    return moved_map("y", std::move(y));
  };
  s.backward = [](const Call& c, const Tensor& dy) {
    if (c.causal && (c.has("state.M") || c.final_state)) return flash_state_forms(c, &dy);
    const FlashDims d = flash_dims(c);
    TensorMap out;
    const FlashSaved* reuse = reuse_of(c, d, c.causal);
    if (reuse) {
      out["y"] = saved_y(reuse->y);  // the forward's buffer
    } else {
      out["y"] = Tensor::uninitialized({d.B, d.T, d.E});
      flash_forward(out["y"].ptr(), c.t("quad_q").ptr(), c.t("quad_k").ptr(), c.t("lin_q").ptr(), c.t("lin_k").ptr(),
                    c.t("v").ptr(), d, c.causal);
    }
    // every element written by the backward's products (beta 0, or the accumulation after them)
    for (const char* n : {"dquad_q", "dquad_k", "dlin_q", "dlin_k"}) out[n] = Tensor::uninitialized({d.B, d.T, d.S});
    out["dv"] = Tensor::uninitialized({d.B, d.T, d.E});
    flash_backward({out["dquad_q"].ptr(), out["dquad_k"].ptr(), out["dlin_q"].ptr(), out["dlin_k"].ptr(),
                    out["dv"].ptr()},
                   c.t("quad_q").ptr(), c.t("quad_k").ptr(), c.t("lin_q").ptr(), c.t("lin_k").ptr(), c.t("v").ptr(),
                   dy.ptr(), d, c.causal, nullptr, nullptr, nullptr, reuse);
    return out;
  };
  // one token: the current group's rows (quadratic part) and M, the linear state of the groups
  // before (folded in when a group completes)
  s.stepper = [](const Call& c) {
    const FlashDims d = flash_dims(c);
    const int64_t S = d.S, E = d.E, G = d.G;
    struct St {
      std::vector<float> gk, gl, gv, M;
    };
    auto st = std::make_shared<St>();
    st->gk.reserve(G * S), st->gl.reserve(G * S), st->gv.reserve(G * E), st->M.assign(S * E, 0.0f);
    const float *qq = c.t("quad_q").ptr(), *lq = c.t("lin_q").ptr(), *qk = c.t("quad_k").ptr(),
                *lk = c.t("lin_k").ptr(), *v = c.t("v").ptr();
    auto step = [=](float* yr) {
      St& z = *st;
      z.gk.insert(z.gk.end(), qk, qk + S), z.gl.insert(z.gl.end(), lk, lk + S), z.gv.insert(z.gv.end(), v, v + E);
      const int64_t L = static_cast<int64_t>(z.gv.size()) / E;
      std::fill(yr, yr + E, 0.0f);
      for (int64_t j = 0; j < L; ++j) {
        float a = 0.0f;
        for (int64_t x = 0; x < S; ++x) a += qq[x] * z.gk[j * S + x];
        a = std::max(a / float(G), 0.0f);
        for (int64_t e = 0; e < E; ++e) yr[e] += a * a * z.gv[j * E + e];
      }
      for (int64_t x = 0; x < S; ++x)
        for (int64_t e = 0; e < E; ++e) yr[e] += lq[x] * z.M[x * E + e];
      if (L == G) {  // the group is complete: fold it into the linear state
        for (int64_t j = 0; j < G; ++j)
          for (int64_t x = 0; x < S; ++x)
            for (int64_t e = 0; e < E; ++e) z.M[x * E + e] += z.gl[j * S + x] * z.gv[j * E + e] / float(G);
        z.gk.clear(), z.gl.clear(), z.gv.clear();
      }
    };
    auto save = [=] {
      const int64_t L = static_cast<int64_t>(st->gv.size()) / E;
      return TensorMap{{"state.quad_k", state_tensor({1, L, S}, st->gk)},
                       {"state.lin_k", state_tensor({1, L, S}, st->gl)},
                       {"state.v", state_tensor({1, L, E}, st->gv)},
                       {"state.M", state_tensor({1, S, E}, st->M)}};
    };
    auto load = [=](const TensorMap& m) {
      state_load(st->gk, m, "state.quad_k"), state_load(st->gl, m, "state.lin_k");
      state_load(st->gv, m, "state.v"), state_load(st->M, m, "state.M");
    };
    return Stepper{step, save, load};
  };
  return s;
}

}  // namespace

MixerSpec flash_spec() { return make_spec(); }

}  // namespace linmix
