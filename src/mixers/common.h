// Internal helpers shared by the mechanism files: float64 copies for the references,
// small vector math, and the registration hooks of every mechanism.
#pragma once
#include <bit>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <vector>

#include "../ref/tape.h"
#include "linmix/kernels.h"
#include "../kernels/value_check.h"
#include "../kernels/vmath.h"
#include "linmix/mixer.h"

namespace linmix {

// Whether any of n floats is inf or NaN (an exponent of all ones), on the bits in one vectorised
// pass, on the calling thread: for the kernels' checks of rows they have just read (Call::unchecked;
// all_finite opens a parallel region, which nested inside a kernel's costs more than the check).
inline bool any_nonfinite(const float* p, int64_t n) {
  uint32_t bad = 0;
#pragma omp simd reduction(| : bad)
  for (int64_t i = 0; i < n; ++i) bad |= nonfinite_bits(p[i]);
  return bad != 0;
}

inline std::vector<double> to_double(const Tensor& t) { return {t.data.begin(), t.data.end()}; }
inline Tensor from_double(std::vector<int64_t> shape, const std::vector<double>& d) {
  Tensor t(std::move(shape));
  std::copy(d.begin(), d.end(), t.data.begin());
  return t;
}

// One recurrent step of a kernelised state (linear, norm_linear, performer), fused so that the
// state streams through the cache once per token instead of twice (it is D E floats a head:
// 16 KiB at D = E = 64, 128 KiB for 8 heads, more than L1):
//   S (D,E) = decay S + a v^T, then y (E) = sum_x b_x S_x over the updated rows; y is written.
// The same operations in the same order as the two-pass form (decay 1 multiplies exactly).
// Columns in strips of 32: a strip's y and v stay in registers down the D rows (with y in
// memory every element loads and stores y once more; f32x16: kernels/vmath.h).
inline void state_step(float* __restrict S, float* __restrict y, const float* __restrict a,
                       const float* __restrict b, const float* __restrict v, float decay, int64_t D, int64_t E) {
  int64_t e0 = 0;
  for (; e0 + 32 <= E; e0 += 32) {
    f32x16 acc0 = {}, acc1 = {};
    const f32x16 v0 = load16(v + e0), v1 = load16(v + e0 + 16);
    for (int64_t x = 0; x < D; ++x) {
      f32x16* s = reinterpret_cast<f32x16*>(S + x * E + e0);
      const float ax = a[x], bx = b[x];
      const f32x16 n0 = s[0] * decay + ax * v0, n1 = s[1] * decay + ax * v1;
      s[0] = n0, s[1] = n1;
      acc0 += bx * n0, acc1 += bx * n1;
    }
    store16(y + e0, acc0), store16(y + e0 + 16, acc1);
  }
  if (e0 == E) return;
  std::fill(y + e0, y + E, 0.0f);
  for (int64_t x = 0; x < D; ++x) {
    float* __restrict s = S + x * E;
    const float ax = a[x], bx = b[x];
#pragma omp simd
    for (int64_t e = e0; e < E; ++e) {
      const float n = s[e] * decay + ax * v[e];
      s[e] = n;
      y[e] += bx * n;
    }
  }
}

[[gnu::always_inline]] inline float sigmoidf(float x) { return 1.0f / (1.0f + exp_fast(-x)); }  // loops vectorise
// The recurrent steps split their heads over the threads from this many state floats a token
// (128 KiB), where each core then streams half the state through its own L2 (a token's step is
// bound by the state's trip through L2: ~4 us for 128 KiB on one core). Measured, 2 threads, H 8,
// D = E = 64 (128 KiB), `linmix bench --T 256 --thread-counts 2`, on the Intel Xeon (one core a
// thread, 2 MiB of L2 each): linear 4.4 -> 2.7 us, gla 4.0 -> 2.8, mamba2 7.8 -> 4.7, performer
// 9.9 -> 6.1 against the heads on one thread. (On the AMD EPYC of docs/bench_decay, at the old
// threshold of 1 MiB: gla 3.3 us on 1 thread, 6 on 2 spinning threads; with OMP_WAIT_POLICY=passive
// every region wakes a sleeping thread: 25 us.)
constexpr int64_t kStepParallelFloats = int64_t(1) << 15;

// The layout of the diagonal SSM steps' per-(channel, state) arrays (s4d, mamba): blocks of kBlock
// channels, channels innermost within each, element (ch, n) of a block from c0, w channels wide,
// at c0 N + n w + ch - c0. Every inner loop runs over contiguous channels in SIMD lanes (no
// per-channel horizontal sum), a block's sums stay in registers through its N rows, and a block is
// one contiguous run per array (rows of all C channels 2 KiB apart, read 64 channels at a time as
// 16 short streams, ran 40% slower).
struct ChannelBlocks {
  static constexpr int64_t kBlock = 64;
  int64_t C, N;
  int64_t count() const { return (C + kBlock - 1) / kBlock; }
  int64_t width(int64_t c0) const { return std::min(kBlock, C - c0); }
  int64_t row(int64_t c0, int64_t n) const { return c0 * N + n * width(c0); }  // row n of the block from c0
  int64_t at(int64_t ch, int64_t n) const {
    const int64_t c0 = ch / kBlock * kBlock;
    return row(c0, n) + ch - c0;
  }
};

// The same maps as function objects for gather_head: a function pointer is not inlined there,
// and phi then runs out of line and scalar.
inline constexpr auto phi_fn = [](float x) { return phi_elu(x); };
inline constexpr auto sigmoid_fn = [](float x) { return sigmoidf(x); };
inline constexpr auto identity_fn = [](float x) { return x; };

// Rows ahead that the sweeps over strided rows (a head of (B,T,H,D), a block of channels of
// (B,T,C)) prefetch by hand: such rows are kilobytes apart, a stride the hardware prefetchers
// lose at every page (rwkv4 at T = 65536 ran at a third of its per-token speed at T = 1024).
constexpr int64_t kPrefetchRows = 8;
// Prefetches the cache lines of n floats from p (Write: for writing).
template <bool Write = false>
inline void prefetch_floats(const float* p, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) __builtin_prefetch(p + i, Write ? 1 : 0);
}

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
inline float dphi_elu(float x) { return x > 0.0f ? 1.0f : exp_fast(x); }  // d(elu(x) + 1)/dx

// Gathers one head of a (B,T,H,D) tensor into contiguous (T,D) rows, mapped by f; row0 is
// the row index b*T*H + h of the head's first element. chk (not null): the values read are
// checked too (the kernels' checks of the rows validation left them, Call::unchecked, in the
// gather's own pass instead of a second read).
template <class F>
void gather_head(float* dst, const float* src, int64_t row0, int64_t T, int64_t H, int64_t D, F f,
                 RowCheck<false>* chk = nullptr) {
  for (int64_t t = 0; t < T; ++t) {
    if (t + kPrefetchRows < T) prefetch_floats(src + (row0 + (t + kPrefetchRows) * H) * D, D);
    if (chk) chk->add(src + (row0 + t * H) * D, D);
    for (int64_t x = 0; x < D; ++x) dst[t * D + x] = f(src[(row0 + t * H) * D + x]);
  }
}

// Writes (T,E) rows of one head into a (B,T,H,E) tensor (row0 = b*T*H + h), row t scaled by
// scale(t); the destination rows are prefetched ahead as gather_head's sources are.
template <class S>
void scatter_head(float* dst, const float* src, int64_t row0, int64_t T, int64_t H, int64_t E, S scale) {
  for (int64_t t = 0; t < T; ++t) {
    if (t + kPrefetchRows < T) prefetch_floats<true>(dst + (row0 + (t + kPrefetchRows) * H) * E, E);
    const float s = scale(t);
    float* d = dst + (row0 + t * H) * E;
#pragma omp simd
    for (int64_t e = 0; e < E; ++e) d[e] = src[t * E + e] * s;
  }
}

// Scatters (T,D) head gradients back into a (B,T,H,D) tensor through phi = elu + 1:
// dx = d(phi(x)) phi'(x).
inline void scatter_head_dphi(float* dx, const float* dphi, const float* x, int64_t row0, int64_t T, int64_t H,
                              int64_t D) {
  for (int64_t t = 0; t < T; ++t) {
    if (t + kPrefetchRows < T) {
      const int64_t o = (row0 + (t + kPrefetchRows) * H) * D;
      prefetch_floats(x + o, D), prefetch_floats<true>(dx + o, D);
    }
#pragma omp simd
    for (int64_t j = 0; j < D; ++j) {
      const int64_t o = (row0 + t * H) * D + j;
      dx[o] = dphi[t * D + j] * dphi_elu(x[o]);
    }
  }
}

// A position held in a float tensor (state.pos): an integer in [0, 2^24] (exact in float32), or
// an Error naming the tensor. Never casts an out-of-range float (undefined behaviour).
inline int64_t position_of(const Tensor& t, const std::string& name) {
  const float p = t.numel() == 1 ? t.data[0] : -1.0f;
  LINMIX_CHECK(p >= 0 && p <= float(1 << 24) && p == std::floor(p),
               "tensor '" + name + "': not a position (an integer in [0, 2^24])");
  return static_cast<int64_t>(p);
}

// Every value of t a position (flow's per-sequence state.pos), or a one-line error naming it.
inline std::vector<int64_t> positions_of(const Tensor& t, const std::string& name) {
  std::vector<int64_t> out;
  for (float p : t.data) out.push_back(position_of(Tensor({1}, p), name));
  return out;
}

// Steppers' state as tensors of one sequence (MixerSpec::stepper save / load).
inline Tensor state_tensor(std::vector<int64_t> shape, const float* src) {
  Tensor t(std::move(shape));
  std::copy(src, src + t.numel(), t.data.begin());
  return t;
}
inline Tensor state_tensor(std::vector<int64_t> shape, const std::vector<float>& v) {
  Tensor t(std::move(shape));
  LINMIX_CHECK(t.numel() == static_cast<int64_t>(v.size()), "state_tensor: size mismatch");
  t.data = v;
  return t;
}
inline void state_load(std::vector<float>& dst, const TensorMap& st, const std::string& name) {
  const Tensor& t = st.at(name);
  dst.assign(t.data.begin(), t.data.end());
}

// Inputs of a reference evaluation, by tensor name, in the reference's scalar.
template <class S>
using RefIn = std::map<std::string, std::vector<S>>;
template <class X>
using scalar_of = typename std::decay_t<X>::mapped_type::value_type;
template <class S>
const S* opt_in(const RefIn<S>& x, const char* name) {
  auto it = x.find(name);
  return it == x.end() ? nullptr : it->second.data();
}
inline bool is_input_name(const std::string& n) {
  return n != "dy" && n.rfind("state.", 0) != 0 && n.rfind("dfinal.", 0) != 0;
}

// Installs spec.reference (float64 inside), spec.reference64_grad (float64 values in and out; with
// an output gradient the same template run on ad::Var, differentiated by the tape) and
// spec.reference_grad (its float view) from one generic reference
//   f(const Call&, const RefIn<S>&) -> std::vector<S> y  (laid out as spec.y_dims).
// With spec.state_all_modes, f also sees the call's state.* tensors (the state before token 0,
// absent = zeros) and returns y followed by the final state tensors in spec.state order (in
// the causal form; a non-causal call, where the mechanism has one, returns y alone); the
// reference then returns them as state.*, the tape gives d(state.*) too, and the gradient of
// the final state (dfinal.*, fla's dht) enters the loss beside dy.
template <class F>
void set_reference(MixerSpec& s, F f) {
  const std::string yd = s.y_dims;
  const bool with_state = s.state_all_modes;
  std::vector<std::pair<std::string, std::string>> outs{{"y", yd}};  // f's outputs in order: name, dims
  for (const auto& t : s.state)
    if (with_state) outs.emplace_back("state." + t.name, t.dims);
  auto input = [with_state](const std::string& n) { return is_input_name(n) || (with_state && n.rfind("state.", 0) == 0); };
  // the outputs of a call: the final states only in the causal form (where a state exists)
  using Outs = std::vector<std::pair<std::string, std::string>>;
  auto live = [outs](const Call& c) { return c.causal ? outs : Outs{outs.front()}; };
  // an output's shape: y by the call's dims, a final state by spec.final_dims over them (a ring grows)
  auto shape = [fd = s.final_dims](const std::string& n, const std::string& d, const Call& c) {
    return n == "y" ? dims_shape(d, c) : final_state_shape(fd, c, d);
  };
  // f's flat output split by name
  auto split = [live, shape](const Call& c, const std::vector<double>& all) {
    std::map<std::string, std::vector<double>> out;
    size_t at = 0;
    for (const auto& [n, d] : live(c)) {
      const size_t m = size_t(numel_of(shape(n, d, c)));
      LINMIX_CHECK(all.size() >= at + m, "reference: output '" + n + "' missing");
      out[n].assign(all.begin() + int64_t(at), all.begin() + int64_t(at + m));
      at += m;
    }
    return out;
  };
  s.reference64_grad = [f, split](const Call& c, const RefIn<double>& x, const std::vector<double>& dout) {
    if (dout.empty()) return split(c, f(c, x));
    ad::TapeScope scope;
    RefIn<ad::Var> xv;
    for (const auto& [n, v] : x)
      for (double e : v) xv[n].push_back(ad::Var::leaf(e));
    const std::vector<ad::Var> y = f(c, xv);
    ad::Var loss = 0.0;
    for (size_t i = 0; i < std::min(y.size(), dout.size()); ++i) loss += y[i] * dout[i];
    const std::vector<double> g = ad::backward(scope.tape, loss);
    std::vector<double> vals(y.size());
    for (size_t i = 0; i < y.size(); ++i) vals[i] = y[i].v;
    auto out = split(c, vals);
    for (const auto& [n, vars] : xv) {
      auto& d = out["d" + n];
      d.resize(vars.size());
      for (size_t i = 0; i < vars.size(); ++i) d[i] = vars[i].i < 0 ? 0.0 : g[vars[i].i];
    }
    return out;
  };
  s.reference = [f, split, input, live, shape](const Call& c) {
    RefIn<double> x;
    for (const auto& [n, t] : c.in)
      if (input(n)) x[n] = to_double(t);
    const auto all = split(c, f(c, x));
    TensorMap out;
    for (const auto& [n, d] : live(c)) out[n] = from_double(shape(n, d, c), all.at(n));
    return out;
  };
  // float view: dy (and dfinal.*) as the output gradient; y and d<input> back as float
  s.reference_grad = [g64 = s.reference64_grad, input, live, shape](const Call& c, const Tensor& dy) {
    const Outs outs = live(c);
    RefIn<double> x;
    for (const auto& [n, t] : c.in)
      if (input(n)) x[n] = to_double(t);
    std::vector<double> dout = to_double(dy);
    for (size_t i = 1; i < outs.size(); ++i) {  // the final states' gradients, zeros when absent
      const std::string dn = "dfinal." + outs[i].first.substr(6);
      const auto d = c.has(dn) ? to_double(c.t(dn))
                               : std::vector<double>(size_t(numel_of(shape(outs[i].first, outs[i].second, c))), 0.0);
      dout.insert(dout.end(), d.begin(), d.end());
    }
    const auto all = g64(c, x, dout);
    TensorMap out = moved_map("y", from_double(dims_shape(outs[0].second, c), all.at("y")));
    for (const auto& [n, v] : x) out["d" + n] = from_double(c.in.at(n).shape, all.at("d" + n));
    return out;
  };
}

// (B,T,H,D,E) of a multi-head call.
inline AttnDims attn_dims(const Call& c) { return {c.d("B"), c.d("T"), c.d("H"), c.d("D"), c.d("E")}; }

// parallel and backward for the q, k, v mechanisms with one `eps` param (linear, norm_linear), their
// non-causal forms (the causal ones, with the state, run on the gated kernels: linear_forms.h's
// set_causal_forms, set after these): y (B,T,H,E) from forward; backward returns y and dq, dk, dv.
using QkvForward = void (*)(float* y, const float* q, const float* k, const float* v, const AttnDims& d, float eps);
using QkvBackward = void (*)(float* dq, float* dk, float* dv, const float* q, const float* k, const float* v,
                             const float* dy, const AttnDims& d, float eps);
inline void set_qkv_eps_forms(MixerSpec& s, QkvForward fwd, QkvBackward bwd) {
  const std::string name = s.name;
  s.parallel = [fwd, name](const Call& c) {
    LINMIX_CHECK(!c.causal, name + ": the causal form is set_causal_forms' (linear_forms.h)");
    const AttnDims d = attn_dims(c);
    Tensor y({d.B, d.T, d.H, d.E});
    fwd(y.ptr(), c.t("q").ptr(), c.t("k").ptr(), c.t("v").ptr(), d, float(c.p("eps")));
    return TensorMap{{"y", std::move(y)}};
  };
  s.backward = [fwd, bwd, name](const Call& c, const Tensor& dy) {
    LINMIX_CHECK(!c.causal, name + ": the causal form is set_causal_forms' (linear_forms.h)");
    const AttnDims d = attn_dims(c);
    Tensor y({d.B, d.T, d.H, d.E}), dq({d.B, d.T, d.H, d.D}), dk({d.B, d.T, d.H, d.D}), dv({d.B, d.T, d.H, d.E});
    fwd(y.ptr(), c.t("q").ptr(), c.t("k").ptr(), c.t("v").ptr(), d, float(c.p("eps")));
    bwd(dq.ptr(), dk.ptr(), dv.ptr(), c.t("q").ptr(), c.t("k").ptr(), c.t("v").ptr(), dy.ptr(), d, float(c.p("eps")));
    TensorMap out;
    out["y"] = std::move(y), out["dq"] = std::move(dq), out["dk"] = std::move(dk), out["dv"] = std::move(dv);
    return out;
  };
}

}  // namespace linmix
