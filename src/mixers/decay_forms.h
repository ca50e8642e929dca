// What the eight decaying / delta-rule mechanisms (retention, gla, deltanet, gated_deltanet,
// rwkv5, rwkv6, rwkv7, mamba2) share around the chunked kernels of kernels/decay_chunk.h: the
// per-head gathers of their (B,T,H,X) inputs, the state in and out (state.S (B,H,D,E), the
// state before token 0 in every mode), the domain checks, the "fast decay" stress draw of
// MIXERS.md, and the spec fields common to all eight.
#pragma once
#include <omp.h>

#include <algorithm>
#include <bit>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <type_traits>

#include "../kernels/decay_chunk.h"
#include "../kernels/value_check.h"
#include "../ref/ref_util.h"
#include "common.h"

namespace linmix {

// One head's rows of a (B,T,H,W) (or (B,T,H) with W = 1) tensor, contiguous (T,W), into an
// existing buffer (its capacity reused across heads and calls: no page faults per call).
inline void rows_into(std::vector<float>& out, const Tensor& t, int64_t b, int64_t h, int64_t T, int64_t H, int64_t W) {
  out.resize(size_t(T * W));
  gather_head(out.data(), t.ptr(), b * T * H + h, T, H, W, identity_fn);
}
inline void rows_into(std::vector<float>& out, const Call& c, const std::string& name, int64_t b, int64_t h, int64_t W) {
  rows_into(out, c.t(name), b, h, c.d("T"), c.d("H"), W);
}
// The same as a new vector.
inline std::vector<float> head_rows(const Tensor& t, int64_t b, int64_t h, int64_t T, int64_t H, int64_t W) {
  std::vector<float> out;
  rows_into(out, t, b, h, T, H, W);
  return out;
}
inline std::vector<float> head_rows(const Call& c, const std::string& name, int64_t b, int64_t h, int64_t W) {
  std::vector<float> out;
  rows_into(out, c, name, b, h, W);
  return out;
}
// Writes (T,W) rows of one head, times scale, into a (B,T,H,W) tensor.
inline void put_head(Tensor& dst, const float* src, int64_t b, int64_t h, int64_t T, int64_t H, int64_t W,
                     float scale = 1.0f) {
  scatter_head(dst.ptr(), src, b * T * H + h, T, H, W, [scale](int64_t) { return scale; });
}
// The state before token 0 of head bh = b H + h (n floats): state.<name> or zeros.
inline std::vector<float> head_state(const Call& c, const std::string& name, int64_t bh, int64_t n) {
  const std::string sn = "state." + name;
  if (!c.has(sn)) return std::vector<float>(size_t(n), 0.0f);
  const float* p = c.t(sn).ptr() + bh * n;
  return {p, p + n};
}

// Every head (b, h) in parallel.
template <class F>
void each_head(int64_t B, int64_t H, F f) {
#pragma omp parallel for collapse(2) schedule(dynamic)
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) f(b, h);
}

// What a gated forward keeps for its backward (Call::keep / Call::reuse): per head (b H + h) the
// kernel's chunk states and scores (what the backward reads), its rows of y as the kernel wrote them
// (before the mechanism's epilogue) and the final state. The backward then restores y's rows and
// runs the epilogue on them (the mechanism's normalisers, its dy for the kernel) in place of the
// forward kernel.
struct GatedSaved : RunSaved {
  int64_t nbh = 0, T = 0, Dk = 0, E = 0;
  bool shift = false;
  struct Head {
    // written whole by the forward before the backward reads them: left unset (a zeroing pass over
    // ~3 MiB a head at T 4096, fresh each call, was ~4% of a kept forward + backward's samples)
    scratch_vector<float> states, scores, rows;
    std::vector<float> S;
    std::vector<float> own;  // the mechanism's own (performer: its features and running key max)
  };
  std::vector<Head> heads;
  bool fits(int64_t n, int64_t t, int64_t dk, int64_t e, bool sh) const {
    return nbh == n && T == t && Dk == dk && E == e && shift == sh && int64_t(heads.size()) == n;
  }
};
// The call's inputs whose values the forward checks (Call::unchecked): (B,T,R,W) rows, R = H (a row
// a head) or R = G groups of H / G heads (Mamba-2's Bm, Cm: the group's first head checks its rows).
struct UncheckedRows {
  const float* p;
  int64_t R, W, per;  // per: heads a row
  bool log_decay;
};
// One head of a gated mechanism (kernels/decay_chunk.h gated_*). prep points iq, ik, iv, ig at
// the head's rows in place (with their strides, the read-out scale and the rest in ld) and oy at
// the output's rows; with dy it also points odq, odk, odv, odg (and odu with a bonus) at where
// the gradients go, at the strides of od when prep sets od.q, else of ld (dg as
// gated_backward_heads writes it), and may fill dy (T,E) with the kernel's own dy (else the call's
// rows). q, k, g, dq, dk, dg, du are the mechanism's own buffers (kept across calls) for what it
// points the kernels at (Mamba-2's steps d and log decays d A, its per-head dCm and dk). post
// maps the rest to the mechanism's tensors (the final state S, dS0, parameters' gradients). dST,
// the gradient of the final state (fla's dht), is the call's dfinal.S of the head unless prep
// fills it (a state of another layout); empty: zeros.
struct GatedHead {
  int64_t b = 0, h = 0;
  std::vector<float> q, k, g, S0, S, dy, dST, dq, dk, dg, dS0, du, states, scores;
  const float *iq = nullptr, *ik = nullptr, *iv = nullptr, *ig = nullptr;
  float *oy = nullptr, *odq = nullptr, *odk = nullptr, *odv = nullptr, *odg = nullptr, *odu = nullptr;
  GatedRows ld{0, 0, 0, 0, 0}, od{0, 0, 0, 0, 0};
  ChunkEpilogue epilogue;  // ld.epilogue may point here
  ChunkEpilogue keep_rows;  // the epilogue that keeps the kernel's rows (Call::keep)
  GradEpilogue grad_epilogue;                       // the backward's per-chunk hook (GatedGradHead), when set
  // the head's saved forward: where prep may keep its own (keeping: the forward keeps) or find
  // it (kept: the backward on a kept forward); null otherwise
  GatedSaved::Head* keeping = nullptr;
  const GatedSaved::Head* kept = nullptr;
  ChunkEpilogue check_rows;  // the epilogue that checks the call's unchecked rows (Call::unchecked)
  uint32_t bad = 0;          // ... and what it found: a value not finite, or a log decay > 0
  std::vector<UncheckedRows> rest;  // the unchecked rows the kernel does not gather (GatedRows::check)
  // set by prep: unchecked inputs (by their first float) that its own passes check as they read
  // them, OR-ing into bad (Mamba-2's gate in its epilogue, its steps in prep)
  std::vector<const float*> self_checked;
  // The call's rows left unchecked (null: none). A prep that reads them all itself before the
  // kernel (flow's intermediates) checks them there, OR-ing into bad, and sets this to null (some of
  // them: self_checked); the kernel checks the rest: its operands as it gathers their rows
  // (GatedRows::check), the others in its chunk epilogue.
  const std::vector<UncheckedRows>* unchecked = nullptr;
  // Set by prep in a forward: the head's operands are the thread's scratch, which the next head's
  // prep reuses, so the kernel runs it at once, alone, instead of chunk by chunk beside the
  // thread's other heads (flow: no operands kept per head, 3 MiB a head at T 4096)
  bool alone = false;
};
inline std::vector<UncheckedRows> unchecked_rows(const Call& c) {
  std::vector<UncheckedRows> out;
  const int64_t BT = c.d("B") * c.d("T"), H = c.d("H");
  for (const Call::Unchecked& u : c.unchecked) {
    const Tensor& t = c.t(u.name);
    const int64_t R = t.shape.size() >= 3 ? t.shape[2] : 1;
    out.push_back({t.ptr(), R, BT * R > 0 ? t.numel() / (BT * R) : 0, R > 0 ? H / R : 1, u.log_decay});
  }
  return out;
}
// Rows [t0, t0 + n) of head (b, h) of the unchecked inputs: nonzero when one holds an inf or NaN
// or, in a log decay, a value > 0 (kernels/value_check.h). The rows the kernel gathers itself
// (q, k, v, g as the call's rows: GatedRows::check) it checks as it copies them; these are the
// others (a gate the epilogue reads next, Mamba-2's steps), prefetched ahead as gather_head's.
template <bool LogDecay>
uint32_t rows_bad_bits(const float* p0, int64_t stride, int64_t W, int64_t n) {
  RowCheck<LogDecay> chk;
  for (int64_t i = 0; i < n; ++i) {
    const float* p = p0 + i * stride;
    if (i + kPrefetchRows < n) prefetch_floats(p + kPrefetchRows * stride, W);
    chk.add(p, W);
  }
  return chk.bad();
}
inline uint32_t rows_bad(const UncheckedRows& r, int64_t b, int64_t h, int64_t T, int64_t t0, int64_t n) {
  if (h % r.per != 0 || n <= 0) return 0;  // a group's rows: its first head's to check
  const float* p0 = r.p + ((b * T + t0) * r.R + h / r.per) * r.W;
  return r.log_decay ? rows_bad_bits<true>(p0, r.R * r.W, r.W, n) : rows_bad_bits<false>(p0, r.R * r.W, r.W, n);
}
inline uint32_t rows_bad(const std::vector<UncheckedRows>& u, int64_t b, int64_t h, int64_t T, int64_t t0, int64_t n) {
  uint32_t bad = 0;
  for (const UncheckedRows& r : u) bad |= rows_bad(r, b, h, T, t0, n);
  return bad;
}
// The head's rows of dfinal.S (the gradient of the final state.S), when the call has it.
template <class Z>
void final_grad(Z& z, const Call& c, int64_t n) {
  if (!z.dST.empty() || !c.has("dfinal.S")) return;
  const float* p = c.t("dfinal.S").ptr() + (z.b * c.d("H") + z.h) * n;
  z.dST.assign(p, p + n);
}
// Each thread takes a run of adjacent heads (b H + h) and runs them chunk by chunk together
// (gated_forward_heads, gated_backward_heads), reading runs of each row. finish(id, threads), when
// given, runs on every thread once every head is posted (a reduction over the heads' results).
struct NoFinish {
  void operator()(int64_t, int64_t) const {}
};
template <class Prep, class Post, class Finish = NoFinish>
void gated_heads(const Call& c, const Tensor* dy, int64_t Dk, int64_t E, bool shift, Prep prep, Post post,
                 Finish finish = {}) {
  const int64_t B = c.d("B"), T = c.d("T"), H = c.d("H"), nc = decay_chunks(T);
  GatedSaved* keep = nullptr;  // the forward keeps what its backward reads
  if (!dy && c.keep) {
    auto s = std::make_shared<GatedSaved>();
    s->nbh = B * H, s->T = T, s->Dk = Dk, s->E = E, s->shift = shift;
    s->heads.resize(size_t(B * H));
    keep = s.get(), *c.keep = std::move(s);
  }
  const auto* reuse = dy ? dynamic_cast<const GatedSaved*>(c.reuse) : nullptr;  // the backward takes it
  if (reuse && !reuse->fits(B * H, T, Dk, E, shift)) reuse = nullptr;
  // the values validation left to the forward (run_mixer reports a bad one after it)
  const std::vector<UncheckedRows> unchecked =
      !dy && c.unchecked_bad ? unchecked_rows(c) : std::vector<UncheckedRows>{};
#pragma omp parallel
  {
    const int64_t nbh = B * H, nth = omp_get_num_threads(), id = omp_get_thread_num();
    const int64_t lo = nbh * id / nth, hi = nbh * (id + 1) / nth;
    thread_local std::vector<GatedHead> zs;  // buffers reused across calls
    thread_local std::vector<GatedHeadRows> rows;
    thread_local std::vector<GatedGradHead> grads;
    if (int64_t(zs.size()) < hi - lo) zs.resize(size_t(hi - lo));  // before prep: ld may point into z
    rows.clear(), grads.clear();
    for (int64_t i = lo; i < hi; ++i) {
      GatedHead& z = zs[size_t(i - lo)];
      z.b = i / H, z.h = i % H, z.dy.clear(), z.dST.clear(), z.iq = nullptr, z.oy = nullptr;
      z.odq = z.odk = z.odv = z.odg = z.odu = nullptr, z.od.q = -1, z.grad_epilogue = nullptr;
      z.keeping = keep ? &keep->heads[size_t(i)] : nullptr;
      z.kept = reuse ? &reuse->heads[size_t(i)] : nullptr;
      z.bad = 0, z.unchecked = unchecked.empty() ? nullptr : &unchecked, z.alone = false, z.self_checked.clear();
      prep(z);
      z.S = z.S0;
      LINMIX_CHECK(z.iq && z.oy, "gated_heads: the kernels run on the rows in place");
      GatedRows ld = z.ld;
      if (z.unchecked) {  // not checked by prep: the kernel's operands as it gathers their rows
        // (GatedRows::check), the rest chunk by chunk in the epilogue, in cache by then
        z.rest.clear();
        for (const UncheckedRows& r : *z.unchecked) {
          if (std::find(z.self_checked.begin(), z.self_checked.end(), r.p) != z.self_checked.end()) continue;
          const float* row0 = r.p + (z.b * T * r.R + z.h / r.per) * r.W;  // the head's row at t = 0
          const int64_t st = r.R * r.W;
          uint32_t bit = 0;
          if (r.log_decay) bit = z.ig == row0 && !ld.g_row && ld.g == st && r.W == Dk ? kCheckG | kCheckGLog : 0;
          else if (z.iq == row0 && ld.q == st && r.W == Dk) bit = kCheckQ;
          else if (z.ik == row0 && ld.k == st && r.W == Dk) bit = kCheckK;
          else if (z.iv == row0 && ld.v == st && r.W == E) bit = kCheckV;
          else if (z.ig == row0 && !ld.g_row && ld.g == st && r.W == Dk) bit = kCheckG;
          if (bit) ld.check |= bit;
          else z.rest.push_back(r);
        }
        ld.bad = &z.bad;
        if (!z.rest.empty()) {
          const auto* inner = ld.epilogue;
          const int64_t b = z.b, h = z.h;
          uint32_t* bad = &z.bad;
          const std::vector<UncheckedRows>* rest = &z.rest;
          z.check_rows = [inner, rest, b, h, T, bad](int64_t t0, int64_t n, const float* qc, const float* kc) {
            *bad |= rows_bad(*rest, b, h, T, t0, n);
            if (inner) (*inner)(t0, n, qc, kc);
          };
          ld.epilogue = &z.check_rows;
        }
      }
      if (keep) {  // the chunk states and scores go to the saved head, and the kernel's rows of y
        // where the mechanism's epilogue reads them again in the backward (else y is the forward's
        // alone: a backward on a kept forward returns no y, run_mixer)
        GatedSaved::Head& kh = keep->heads[size_t(i)];
        kh.states.resize(size_t(nc * Dk * E)), kh.scores.resize(size_t(nc * kDecayChunk * kDecayChunk));
        ld.save_states = kh.states.data(), ld.save_scores = kh.scores.data();
      }
      if (keep && z.ld.epilogue) {
        GatedSaved::Head& kh = keep->heads[size_t(i)];
        kh.rows.resize(size_t(T * E));
        const auto* inner = ld.epilogue;
        float *oy = z.oy, *kr = kh.rows.data();
        const int64_t ldy = ld.y;
        z.keep_rows = [inner, oy, kr, ldy, E](int64_t t0, int64_t n, const float* qc, const float* kc) {
          for (int64_t t = t0; t < t0 + n; ++t) std::copy(oy + t * ldy, oy + t * ldy + E, kr + t * E);
          if (inner) (*inner)(t0, n, qc, kc);
        };
        ld.epilogue = &z.keep_rows;
      } else if (!keep && dy && !reuse) {  // the forward keeps what the backward reads
        z.states.resize(size_t(nc * Dk * E)), z.scores.resize(size_t(nc * kDecayChunk * kDecayChunk));
        ld.save_states = z.states.data(), ld.save_scores = z.scores.data();
      }
      if (reuse) {  // the forward's rows of y back in place, the epilogue over them chunk by chunk
        // (without the kernel's rows of q and k: null); none kept: no epilogue to run
        const GatedSaved::Head& kh = reuse->heads[size_t(i)];
        for (int64_t t0 = 0; t0 < T && !kh.rows.empty(); t0 += kDecayChunk) {
          const int64_t n = std::min(kDecayChunk, T - t0);
          for (int64_t t = t0; t < t0 + n; ++t)
            std::copy(kh.rows.data() + t * E, kh.rows.data() + (t + 1) * E, z.oy + t * ld.y);
          if (ld.epilogue) (*ld.epilogue)(t0, n, nullptr, nullptr);
        }
        z.S = kh.S;
        continue;
      }
      rows.push_back({z.oy, z.S.data(), z.iq, z.ik, z.iv, z.ig, ld});
      if (z.alone && !dy) {  // before the next head's prep takes the operands' buffers
        gated_forward_heads(&rows.back(), 1, T, Dk, E, shift);
        rows.pop_back();
      }
    }
    if (!rows.empty()) gated_forward_heads(rows.data(), int64_t(rows.size()), T, Dk, E, shift);
    if (keep)
      for (int64_t i = lo; i < hi; ++i) keep->heads[size_t(i)].S = zs[size_t(i - lo)].S;
    if (dy && hi > lo) {
      for (int64_t i = lo; i < hi; ++i) {
        GatedHead& z = zs[size_t(i - lo)];
        LINMIX_CHECK(z.odq && z.odk && z.odv && z.odg && (z.odu || !z.ld.u) && (!z.dy.empty() || z.ld.y == H * E),
                     "gated_heads: the gradients' rows in place are the mechanism's to give");
        final_grad(z, c, Dk * E);
        z.dS0.resize(size_t(Dk * E));
        GatedRows ld = z.ld, od = z.od.q < 0 ? z.ld : z.od;
        const float* gy = dy->ptr() + (z.b * T * H + z.h) * E;  // the call's rows, or the kernel's own dy
        if (!z.dy.empty()) gy = z.dy.data(), ld.y = E;
        const float *states = z.states.data(), *scores = z.scores.data();
        if (reuse) states = reuse->heads[size_t(i)].states.data(), scores = reuse->heads[size_t(i)].scores.data();
        grads.push_back({z.iq, z.ik, z.iv, z.ig, gy, z.S0.data(), z.dST.empty() ? nullptr : z.dST.data(), states,
                         scores, z.S.data(), z.odq, z.odk, z.odv, z.odg, z.dS0.data(), z.odu, ld, od,
                         z.grad_epilogue ? &z.grad_epilogue : nullptr});
      }
      gated_backward_heads(grads.data(), int64_t(grads.size()), T, Dk, E, shift);
    }
    for (int64_t i = lo; i < hi; ++i) {
      if (zs[size_t(i - lo)].bad) c.unchecked_bad->fetch_or(1u);
      post(zs[size_t(i - lo)]);
    }
    if constexpr (!std::is_same_v<Finish, NoFinish>) {
#pragma omp barrier
      finish(id, nth);
    }
  }
}

// The output tensors of a run: y, the final state.S (B,H,D,E) and with dy the named gradients of the
// given shapes (dstate.S when the call has state.S).
// The per-token ones (B, T, ...: y and the inputs' gradients, which every mechanism writes head
// by head, whole) are left uninitialised; the rest (states, parameters' gradients, which
// accumulate) start at zero.
inline TensorMap decay_outputs(const Call& c, bool grad, const std::vector<std::pair<std::string, std::vector<int64_t>>>& grads) {
  const int64_t B = c.d("B"), T = c.d("T"), H = c.d("H"), E = c.d("E");
  TensorMap out;  // (an initializer list would copy the values)
  out.emplace("y", Tensor::uninitialized({B, T, H, E}));
  out.emplace("state.S", Tensor({B, H, c.d("D"), E}));
  if (grad)
    for (const auto& [n, sh] : grads)
      if (c.has(n.substr(1)))  // d<input> for every input present
        out[n] = n.rfind("dstate.", 0) != 0 && sh.size() >= 3 && sh[0] == B && sh[1] == T ? Tensor::uninitialized(sh)
                                                                                         : Tensor(sh);
  return out;
}
// Copies n floats of one head's state into a (B,H,...) tensor of out, when out has it.
inline void put_state(TensorMap& out, const std::string& name, const std::vector<float>& S, int64_t bh) {
  auto it = out.find(name);
  if (it != out.end()) std::copy(S.begin(), S.end(), it->second.ptr() + bh * int64_t(S.size()));
}
// One head of a delta-rule mechanism (kernels/decay_chunk.h dplr_*) on the backward's way: its
// whole rows of the kernel's operands (r, w, k, a, bb: (T,D); v: (T,E)), its state S0, the
// kernel's gradients (dr, dw, dk, da, db, dv, dS0) that the mechanism's post maps to its own.
struct DplrHead {
  int64_t b = 0, h = 0;
  std::vector<float> r, w, k, v, a, bb, S0, y, S, dy, dST, dr, dw, dk, dv, da, db, dS0, states, kept;
};
// A delta-rule mechanism run: load(b, h, t0, n, rows) maps rows [t0, t0 + n) of head (b, h) of
// the call's inputs to the kernel's operands (DplrChunkRows); y and the final state.S go to out.
// The forward runs each thread's run of adjacent heads chunk by chunk (dplr_forward_heads), its
// operands made a chunk at a time; with dy a head at a time on its whole rows (loaded once), then
// post(z) maps the kernel's gradients to the mechanism's.
template <class Load, class Post>
void dplr_heads(const Call& c, const Tensor* dy, int64_t D, int64_t E, TensorMap& out, Load load, Post post) {
  const int64_t B = c.d("B"), T = c.d("T"), H = c.d("H");
  Tensor& Y = out.at("y");
  if (!dy) {
#pragma omp parallel
    {
      const int64_t nbh = B * H, nth = omp_get_num_threads(), id = omp_get_thread_num();
      const int64_t lo = nbh * id / nth, hi = nbh * (id + 1) / nth;
      thread_local std::vector<std::vector<float>> Ss;  // buffers reused across calls
      if (int64_t(Ss.size()) < hi - lo) Ss.resize(size_t(hi - lo));
      std::vector<DplrHeadRows> rows;
      // the values validation left to the forward (Call::unchecked): a chunk's rows as they are loaded
      const std::vector<UncheckedRows> unchecked = c.unchecked_bad ? unchecked_rows(c) : std::vector<UncheckedRows>{};
      uint32_t bad = 0;
      for (int64_t i = lo; i < hi; ++i) {
        const int64_t b = i / H, h = i % H;
        Ss[size_t(i - lo)] = head_state(c, "S", i, D * E);
        rows.push_back({Y.ptr() + (b * T * H + h) * E, H * E, Ss[size_t(i - lo)].data(),
                        [&load, &unchecked, &bad, b, h, T, H](int64_t t0, int64_t n, const DplrChunkRows& x) {
                          load(b, h, t0, n, x);
                          if (!unchecked.empty()) bad |= rows_bad(unchecked, b, h, T, t0, n);
                        }});
      }
      dplr_forward_heads(rows.data(), int64_t(rows.size()), T, D, E);
      if (bad) c.unchecked_bad->fetch_or(1u);
      for (int64_t i = lo; i < hi; ++i) put_state(out, "state.S", Ss[size_t(i - lo)], i);
    }
    return;
  }
  each_head(B, H, [&](int64_t b, int64_t h) {
    thread_local DplrHead z;  // buffers reused across heads and calls
    z.b = b, z.h = h, z.dy.clear(), z.dST.clear();
    for (auto* x : {&z.r, &z.w, &z.k, &z.a, &z.bb}) x->resize(size_t(T * D));
    z.v.resize(size_t(T * E));
    load(b, h, 0, T, DplrChunkRows{z.r.data(), z.w.data(), z.k.data(), z.v.data(), z.a.data(), z.bb.data()});
    z.S0 = head_state(c, "S", b * H + h, D * E);
    z.S = z.S0;
    z.y.resize(size_t(T * E));
    const int64_t nc = decay_chunks(T);  // the forward keeps what the backward reads
    z.states.resize(size_t(nc * D * E)), z.kept.resize(size_t(nc * dplr_kept_per(E)));
    dplr_forward(z.y.data(), z.S.data(), z.r.data(), z.w.data(), z.k.data(), z.v.data(), z.a.data(), z.bb.data(), T,
                 D, E, z.states.data(), z.kept.data());
    put_head(Y, z.y.data(), b, h, T, H, E);
    put_state(out, "state.S", z.S, b * H + h);
    rows_into(z.dy, *dy, b, h, T, H, E);
    for (auto* x : {&z.dr, &z.dw, &z.dk, &z.da, &z.db}) x->resize(size_t(T * D));
    z.dv.resize(size_t(T * E)), z.dS0.resize(size_t(D * E));
    final_grad(z, c, D * E);
    dplr_backward(z.dr.data(), z.dw.data(), z.dk.data(), z.dv.data(), z.da.data(), z.db.data(), z.dS0.data(),
                  z.dy.data(), z.S0.data(), z.r.data(), z.w.data(), z.k.data(), z.v.data(), z.a.data(), z.bb.data(),
                  T, D, E, z.dST.empty() ? nullptr : z.dST.data(), z.states.data(), z.kept.data());
    post(z);
  });
}

// The read-out scale: the param when given, else 1/sqrt(D) (def_sqrt) or 1.
inline float readout_scale(const Call& c, bool def_sqrt) {
  if (c.given.at("scale")) return float(c.p("scale"));
  return def_sqrt ? float(1.0 / std::sqrt(double(c.d("D")))) : 1.0f;
}

// The heads of one token's step over the threads, static (a thread keeps its heads' state in its
// own core's cache from token to token), once the state is big enough to pay for the parallel
// region (kStepParallelFloats).
template <class F>
void step_heads(int64_t H, int64_t state_floats, F f) {
#pragma omp parallel for schedule(static) if (H > 1 && state_floats >= kStepParallelFloats)
  for (int64_t h = 0; h < H; ++h) f(h);
}

// A stepper whose state is state.S (1,H,D,E), kept at the front of buf.
template <class Step>
Stepper s_stepper(std::shared_ptr<std::vector<float>> buf, int64_t H, int64_t D, int64_t E, Step step) {
  auto save = [=] { return TensorMap{{"state.S", state_tensor({1, H, D, E}, buf->data())}}; };
  auto load = [=](const TensorMap& m) {
    const Tensor& t = m.at("state.S");
    std::copy(t.data.begin(), t.data.end(), buf->begin());
  };
  return Stepper{step, save, load};
}

inline void check_flag(const Call& c, const std::string& p) {
  LINMIX_CHECK(c.p(p) == 0.0 || c.p(p) == 1.0, "param '" + p + "': must be 0 or 1");
}

// Fresh N(0,1) draws for a stress rule, deterministic in the tensor's size and a salt.
inline std::vector<float> stress_draw(size_t n, uint64_t salt) {
  std::mt19937_64 rng(0x5eed0000ULL + n * 131 + salt);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> x(n);
  for (float& v : x) v = normal(rng);
  return x;
}
// MIXERS.md's fast decay: log decay = -exp(x), to about -30 per step; the gradients are tested on
// the same draw (for_grad: no milder version; it was -exp(x - 1), which left every chunk of the
// gradient tests inside the factored form: their fast-decay paths went untested).
inline void fast_log_decay(Tensor& t, bool /*for_grad*/, uint64_t salt) {
  const auto x = stress_draw(t.data.size(), salt);
  for (size_t i = 0; i < x.size(); ++i) t.data[i] = -std::exp(x[i]);
}

// The fields every one of the eight shares: causal only, state S (B,H,D,E) in every mode, the
// chunk as blocking constant, the time and memory of the chunked forms.
inline void decay_spec_common(MixerSpec& s) {
  s.noncausal_ok = false;
  s.state_all_modes = true;
  s.state = {{"S", "B,H,D,E"}};
  s.state_size = "H D E per sequence";
  s.time = "O(T H D E) + O(T chunk H (D + E)), chunk " + std::to_string(kDecayChunk);
  s.memory = "O(chunk (chunk + D + E)) per head (backward: + the state at each chunk start)";
  s.y_dims = "B,T,H,E";
  s.blocking = {{"T", kDecayChunk}, {"T", kDecaySub}};
}

// The float64 references' helpers (templated for the tape).
namespace ref {
// x / sqrt(sum x^2 + 1e-6) over n entries (fla's l2norm), in place into out.
template <class S>
void l2norm(S* out, const S* x, int64_t n) {
  S ss = 1e-6;
  for (int64_t i = 0; i < n; ++i) ss += x[i] * x[i];
  const S inv = S(1.0) / sqrt(ss);
  for (int64_t i = 0; i < n; ++i) out[i] = x[i] * inv;
}
// y (T,E) appended with the final states: the references' return layout under state_all_modes.
template <class S>
void append(std::vector<S>& out, const std::vector<S>& more) {
  out.insert(out.end(), more.begin(), more.end());
}
}  // namespace ref

}  // namespace linmix
