// The forms shared by the four AFT variants (aft_full, aft_local, aft_simple, aft_conv): the
// parallel form, its backward (with the gradient of the variant's bias), the recurrent form and
// the stepper, all over the banded-sum kernel of src/kernels/aft_band.cpp. Each variant's file
// declares its spec (inputs, params, state, checks, reference) and calls set_aft_forms.
#include "aft_forms.h"

#include "common.h"
#include "row_cache.h"
#include "linmix/kernels.h"

namespace linmix {

namespace {

using Variant = AftVariant;

// What the bias callback reads: w (Tw,Tw) for full/local; u (H,K) for conv.
struct BiasCtx {
  const float* w = nullptr;
  int64_t Tw = 0;
  const float* u = nullptr;
  int64_t K = 0, shift = 0;   // conv: index = t - s + shift
  std::vector<int64_t> head;  // conv: head of each channel block
  int64_t off = 0;            // w: the absolute position of row 0 (a call after a state's ring)
};

float bias_w(const void* ctx, int64_t t, int64_t s, int64_t) {
  const auto* c = static_cast<const BiasCtx*>(ctx);
  return c->w[(t + c->off) * c->Tw + (s + c->off)];
}
// aft_conv: the entry of u (H,K) that is the bias of (t, s) in channel block bi
int64_t u_index(const BiasCtx* c, int64_t t, int64_t s, int64_t bi) { return c->head[bi] * c->K + (t - s + c->shift); }
float bias_u(const void* ctx, int64_t t, int64_t s, int64_t bi) {
  const auto* c = static_cast<const BiasCtx*>(ctx);
  return c->u[u_index(c, t, s, bi)];
}
float bias_zero(const void*, int64_t, int64_t, int64_t) { return 0.0f; }
// aft_conv: head(bi)'s row of u, indexed by t - s + shift (= t - s + band.hi)
const float* diagonal_u(const void* ctx, int64_t bi) {
  const auto* c = static_cast<const BiasCtx*>(ctx);
  return c->u + c->head[size_t(bi)] * c->K;
}

constexpr int64_t kBlock = 256;  // channels per block (aft_simple/full/local; conv: per head): long inner loops
constexpr int64_t kHuge = int64_t(1) << 40;  // "band covers everything" (aft_full)

// Band and bias of one variant for a call; `ctx` must outlive the band.
AftBand make_band(Variant var, const Call& c, BiasCtx& ctx) {
  const int64_t C = c.d("C");
  AftBand band{};
  band.ctx = &ctx;
  auto split = [&](int64_t c0, int64_t c1, int64_t h) {
    for (int64_t x = c0; x < c1; x += kBlock) {
      band.blocks.push_back({x, std::min(c1, x + kBlock)});
      ctx.head.push_back(h);
    }
  };
  switch (var) {
    case Variant::Simple:
      band.lo = -1, band.hi = 0, band.bias = bias_zero;
      split(0, C, 0);
      break;
    case Variant::Full:
      ctx.w = c.t("w").ptr(), ctx.Tw = c.d("Tw");
      band.lo = kHuge, band.hi = c.causal ? 0 : kHuge, band.bias = bias_w;
      split(0, C, 0);
      break;
    case Variant::Local: {
      const int64_t win = c.ip("window");
      ctx.w = c.t("w").ptr(), ctx.Tw = c.d("Tw");
      band.lo = win - 1, band.hi = c.causal ? 0 : win - 1, band.bias = bias_w, band.factor_rows = true;
      split(0, C, 0);
      break;
    }
    case Variant::Conv: {
      const int64_t H = c.d("H"), K = c.d("K"), Ch = C / H;
      ctx.u = c.t("u").ptr(), ctx.K = K;
      if (c.causal) band.lo = K - 1, band.hi = 0, ctx.shift = 0;
      else band.lo = band.hi = ctx.shift = (K - 1) / 2;
      band.bias = bias_u, band.diagonal = diagonal_u;
      for (int64_t h = 0; h < H; ++h) split(h * Ch, (h + 1) * Ch, h);
      break;
    }
  }
  return band;
}

// The running sums as a state in every form (state_all_modes: aft_simple): the call's state.num,
// den, max in, the final ones out as state.* (and, with grad, the initial ones' gradient as
// dstate.* and the final ones' dfinal.* in). No state in a non-causal call.
AftSumsIO sums_io(const Call& c, TensorMap& out, bool grad) {
  AftSumsIO io;
  if (!c.causal) return io;
  const std::vector<int64_t> shape{c.d("B"), c.d("C")};
  auto in = [&](const char* n) { return c.has(n) ? c.t(n).ptr() : nullptr; };
  auto make = [&](const std::string& n) { return (out[n] = Tensor(shape)).ptr(); };
  io.num0 = in("state.num"), io.den0 = in("state.den"), io.max0 = in("state.max");
  io.numT = make("state.num"), io.denT = make("state.den"), io.maxT = make("state.max");
  if (grad) {
    io.dnumT = in("dfinal.num"), io.ddenT = in("dfinal.den"), io.dmaxT = in("dfinal.max");
    if (io.num0) io.dnum0 = make("dstate.num"), io.dden0 = make("dstate.den"), io.dmax0 = make("dstate.max");
  }
  return io;
}

TensorMap aft_parallel(Variant var, const Call& c, bool with_state) {
  const int64_t B = c.d("B"), T = c.d("T"), C = c.d("C");
  BiasCtx ctx;
  const AftBand band = make_band(var, c, ctx);
  TensorMap out;
  Tensor y = Tensor::uninitialized({B, T, C});  // every element written by the kernels
  if (var == Variant::Full) {  // the pairwise bias factors out of the channel sum: GEMMs
    aft_full_forward(y.ptr(), c.t("q").ptr(), c.t("k").ptr(), c.t("v").ptr(), ctx.w, ctx.Tw, B, T, C, c.causal);
  } else {
    AftSumsIO io = with_state && var == Variant::Simple ? sums_io(c, out, false) : AftSumsIO{};
    uint32_t bad = 0;  // the values of q, k, v, checked as the rows are read (Call::unchecked)
    aft_forward(y.ptr(), c.t("q").ptr(), c.t("k").ptr(), c.t("v").ptr(), B, T, C, c.causal, band, nullptr, nullptr, &io,
                c.unchecked_bad ? &bad : nullptr);
    if (bad) c.unchecked_bad->fetch_or(1u);
  }
  out["y"] = std::move(y);
  return out;
}

// The bias's gradient, summed by aft_backward in its band pass (AftBiasGrad): aft_conv's slots
// are du's own entries [head, t - s + shift]; aft_local's the band's (t, s - t + lo), (T, W), added
// into dw[t + off, s + off] after the pass (a (T, W) buffer, not a (Tw, Tw) one per thread).
struct BandSlots {
  int64_t lo = 0, W = 0;
  const BiasCtx* ctx = nullptr;
};
int64_t slot_band(const void* p, int64_t t, int64_t s, int64_t) {
  const auto* b = static_cast<const BandSlots*>(p);
  return t * b->W + (s - t + b->lo);
}
int64_t slot_u(const void* p, int64_t t, int64_t s, int64_t bi) {
  return u_index(static_cast<const BandSlots*>(p)->ctx, t, s, bi);
}

// Runs backward(const AftBiasGrad*) with the variant's bias gradient folded in and adds that
// gradient into dbias (dw or du).
template <class F>
void with_bias_grad(Variant var, const BiasCtx& ctx, const AftBand& band, int64_t T, bool causal, Tensor& dbias,
                    F&& backward) {
  BandSlots slots;
  slots.ctx = &ctx;
  AftBiasGrad bg;
  bg.ctx = &slots;
  std::unique_ptr<float[]> buf;  // written whole by the backward (ordinary pages: see aft_ring)
  if (var == Variant::Conv) {
    bg.slot = slot_u, bg.size = dbias.numel();
  } else {
    slots.lo = std::min(band.lo, T - 1);
    slots.W = slots.lo + (causal ? 0 : std::min(band.hi, T - 1)) + 1;
    bg.slot = slot_band, bg.size = T * slots.W;
  }
  buf.reset(new float[size_t(std::max<int64_t>(bg.size, 1))]);
  bg.out = buf.get();
  backward(&bg);
  if (var == Variant::Conv) {
    for (int64_t i = 0; i < bg.size; ++i) dbias.data[size_t(i)] += buf[i];
    return;
  }
  if (dbias.numel() == 0) {  // aft_local's fresh dw (Tw, Tw): every row written once, zeros and band
    const int64_t Tw = ctx.Tw;
    // unset, on ordinary pages (see aft_ring), written whole below; a buffer of its own (the torch
    // extension hands it on: as a view of a buffer it was copied, 64 MiB)
    Tensor dw = Tensor::uninitialized({Tw, Tw}, false);
    float* out = dw.ptr();
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < Tw; ++r) {  // row r = t + off
      float* row = out + r * Tw;
      const int64_t t = r - ctx.off;
      if (t < 0 || t >= T) {
        std::fill(row, row + Tw, 0.0f);
        continue;
      }
      const int64_t s_lo = std::max<int64_t>(0, t - band.lo), s_hi = causal ? t : std::min(T - 1, t + band.hi);
      std::fill(row, row + s_lo + ctx.off, 0.0f);
      for (int64_t s = s_lo; s <= s_hi; ++s) row[s + ctx.off] = buf[slot_band(&slots, t, s, 0)];
      std::fill(row + s_hi + 1 + ctx.off, row + Tw, 0.0f);
    }
    dbias = std::move(dw);
    return;
  }
  for (int64_t t = 0; t < T; ++t) {
    const int64_t s_lo = std::max<int64_t>(0, t - band.lo), s_hi = causal ? t : std::min(T - 1, t + band.hi);
    for (int64_t s = s_lo; s <= s_hi; ++s)
      dbias.data[size_t((t + ctx.off) * ctx.Tw + (s + ctx.off))] += buf[slot_band(&slots, t, s, 0)];
  }
}

TensorMap aft_grad(Variant var, const Call& c, const Tensor& dy, bool with_state) {
  const int64_t B = c.d("B"), T = c.d("T"), C = c.d("C");
  BiasCtx ctx;
  const AftBand band = make_band(var, c, ctx);
  const float *q = c.t("q").ptr(), *k = c.t("k").ptr(), *v = c.t("v").ptr();
  // every element written by the kernels (no zero-filling pass over fresh pages)
  Tensor y = Tensor::uninitialized({B, T, C}), dq = Tensor::uninitialized({B, T, C}),
         dk = Tensor::uninitialized({B, T, C}), dv = Tensor::uninitialized({B, T, C});
  if (var == Variant::Full) {
    // GEMMs over key blocks (kernels/aft_full_gemm.cpp); o and lse saved by the forward: O(T C)
    Tensor o = Tensor::uninitialized({B, T, C}), lse = Tensor::uninitialized({B, T, C});
    Tensor dw(c.t("w").shape);
    aft_full_forward(y.ptr(), q, k, v, ctx.w, ctx.Tw, B, T, C, c.causal, o.ptr(), lse.ptr());
    aft_full_backward(dq.ptr(), dk.ptr(), dv.ptr(), dw.ptr(), q, k, v, ctx.w, ctx.Tw, o.ptr(), lse.ptr(), dy.ptr(), B,
                      T, C, c.causal);
    return moved_map("y", std::move(y), "dq", std::move(dq), "dk", std::move(dk), "dv", std::move(dv), "dw",
                     std::move(dw));
  }
  TensorMap out;
  if (var == Variant::Simple) {
    AftSumsIO io = with_state ? sums_io(c, out, true) : AftSumsIO{};
    Tensor o = Tensor::uninitialized({B, T, C}), lse = Tensor::uninitialized({B, T, C});  // saved by the forward
    aft_forward(y.ptr(), q, k, v, B, T, C, c.causal, band, o.ptr(), lse.ptr(), &io);
    aft_backward(dq.ptr(), dk.ptr(), dv.ptr(), q, k, v, o.ptr(), lse.ptr(), dy.ptr(), B, T, C, c.causal, band, &io);
  } else {  // aft_local's dw, aft_conv's du: forward and backward fused (kernels.h)
    auto backward = [&](const AftBiasGrad* bg) {
      aft_forward_backward(y.ptr(), dq.ptr(), dk.ptr(), dv.ptr(), q, k, v, dy.ptr(), B, T, C, c.causal, band, bg);
    };
    const std::string name = var == Variant::Local ? "w" : "u";
    // aft_conv's du (H, K) summed into; aft_local's dw (Tw, Tw: 64 MiB at T = 4096) made by
    // with_bias_grad in one parallel pass over its rows (zero-filled first and then added into,
    // it was a tenth of the forward + backward)
    Tensor dbias = var == Variant::Local ? Tensor() : Tensor(c.t(name).shape);
    with_bias_grad(var, ctx, band, T, c.causal, dbias, backward);
    out["d" + name] = std::move(dbias);
  }
  out["y"] = std::move(y), out["dq"] = std::move(dq), out["dk"] = std::move(dk), out["dv"] = std::move(dv);
  return out;
}

bool has_sums(Variant var) { return var != Variant::Full; }
bool has_ring(Variant var) { return var != Variant::Simple; }

// Row b of the (B,C) sums' pointers.
AftSumsIO sums_row(const AftSumsIO& a, int64_t off) {
  auto at = [off](auto* p) { return p ? p + off : p; };
  return {at(a.num0), at(a.den0), at(a.max0), at(a.numT), at(a.denT), at(a.maxT),
          at(a.dnumT), at(a.ddenT), at(a.dmaxT), at(a.dnum0), at(a.dden0), at(a.dmax0)};
}

// aft_local and aft_conv: the sums and the ring (and aft_local's pos) as the state of every
// causal form. The ring's L rows (positions pos - L .. pos - 1) join before the call's rows (q
// gets zero rows there) and the sums start the prefix sums: the banded kernel over the n = L + T
// rows gives y (the ring rows' outputs dropped), the final sums (every row but the last
// min(n, lo)) and the final ring (those rows). The backward runs the same with dy = 0 on the ring
// rows; dfinal's ring rows join the rows they copy, the ring rows' gradient is dstate's. One batch
// row at a time: its pos places w (aft_local reads w at absolute positions).
TensorMap aft_ring(Variant var, const Call& c, const Tensor* dy) {
  const int64_t B = c.d("B"), T = c.d("T"), C = c.d("C");
  const bool s0 = c.has("state.num"), grad = dy != nullptr;
  const int64_t L = s0 ? c.d("L") : 0, n = L + T;
  BiasCtx probe;
  const int64_t keep = std::min(n, make_band(var, c, probe).lo);
  std::vector<int64_t> pos(size_t(B), L);
  if (var == Variant::Local && s0) pos = positions_of(c.t("state.pos"), "state.pos");
  TensorMap out;
  const AftSumsIO sums = sums_io(c, out, grad);
  // y, dq, dk, dv written whole below (directly or copied); dbias summed into from zero
  Tensor y = Tensor::uninitialized({B, T, C}), fk({B, keep, C}), fv({B, keep, C}), dq, dk, dv, dbias, dk0, dv0;
  const std::string bias_name = var == Variant::Local ? "w" : "u";
  if (grad) {
    dq = Tensor::uninitialized({B, T, C}), dk = Tensor::uninitialized({B, T, C}), dv = Tensor::uninitialized({B, T, C});
    // dbias on ordinary pages, zeroed: aft_local's dw is (Tw, Tw), 64 MiB at T = 4096, and on
    // huge pages (Tensor::uninitialized) a fresh one's faults waited on the kernel's compaction
    // (THP defrag "madvise"): 250-300 ms for the buffer in some runs
    dbias = Tensor(c.t(bias_name).shape);
    if (s0) dk0 = Tensor({B, L, C}), dv0 = Tensor({B, L, C});
  }
  const float *q = c.t("q").ptr(), *k = c.t("k").ptr(), *v = c.t("v").ptr();
  const float *rk = s0 ? c.t("state.k").ptr() : nullptr, *rv = s0 ? c.t("state.v").ptr() : nullptr;
  const float *gk = grad && c.has("dfinal.k") ? c.t("dfinal.k").ptr() : nullptr;
  const float *gv = grad && c.has("dfinal.v") ? c.t("dfinal.v").ptr() : nullptr;
  // With a ring (L > 0) the kernels run on copies of its rows and the call's; without one
  // (a first call that wants the final state) on the call's tensors themselves
  // (n C floats each, left unset, on ordinary pages: see dbias)
  const int64_t nc = n * C;
  auto rows = [nc] { return std::unique_ptr<float[]>(new float[size_t(std::max<int64_t>(nc, 1))]); };
  std::unique_ptr<float[]> cq, ck, cv, yc, o, lse, dyc, dqc, dkc, dvc;
  if (L > 0) {
    cq = rows(), ck = rows(), cv = rows(), yc = rows();
    std::fill(cq.get(), cq.get() + L * C, 0.0f);
    if (grad) dyc = rows(), dqc = rows(), dkc = rows(), dvc = rows(), std::fill(dyc.get(), dyc.get() + L * C, 0.0f);
  }
  if (grad) o = rows(), lse = rows();
  for (int64_t b = 0; b < B; ++b) {
    const int64_t r = L * C, m = T * C;  // the ring's and the call's values of row b
    const float *pq = q + b * m, *pk = k + b * m, *pv = v + b * m;
    float* py = y.ptr() + b * m;
    if (L > 0) {
      std::copy(pq, pq + m, cq.get() + r);
      std::copy(rk + b * r, rk + (b + 1) * r, ck.get()), std::copy(rv + b * r, rv + (b + 1) * r, cv.get());
      std::copy(pk, pk + m, ck.get() + r), std::copy(pv, pv + m, cv.get() + r);
      pq = cq.get(), pk = ck.get(), pv = cv.get(), py = yc.get();
    }
    BiasCtx ctx;
    const AftBand band = make_band(var, c, ctx);
    ctx.off = pos[size_t(b)] - L;
    AftSumsIO io = sums_row(sums, b * C);
    if (!grad) {
      uint32_t bad = 0;  // the values of q, k, v (and the ring's, checked before), as the rows are read
      aft_forward(py, pq, pk, pv, 1, n, C, true, band, nullptr, nullptr, &io, c.unchecked_bad ? &bad : nullptr);
      if (bad) c.unchecked_bad->fetch_or(1u);
    } else {
      const float* pdy = dy->ptr() + b * m;
      float *pdq = dq.ptr() + b * m, *pdk = dk.ptr() + b * m, *pdv = dv.ptr() + b * m;
      if (L > 0) {
        std::copy(pdy, pdy + m, dyc.get() + r);
        pdy = dyc.get(), pdq = dqc.get(), pdk = dkc.get(), pdv = dvc.get();
      }
      aft_forward(py, pq, pk, pv, 1, n, C, true, band, o.get(), lse.get(), &io);
      with_bias_grad(var, ctx, band, n, true, dbias, [&](const AftBiasGrad* bg) {
        aft_backward(pdq, pdk, pdv, pq, pk, pv, o.get(), lse.get(), pdy, 1, n, C, true, band, &io, bg);
      });
      const int64_t f0 = (n - keep) * C, fm = keep * C;  // the final ring: the last keep rows
      for (int64_t i = 0; i < fm; ++i) {
        if (gk) pdk[f0 + i] += gk[b * fm + i];
        if (gv) pdv[f0 + i] += gv[b * fm + i];
      }
      if (L > 0) {
        std::copy(dqc.get() + r, dqc.get() + nc, dq.ptr() + b * m);
        std::copy(dkc.get() + r, dkc.get() + nc, dk.ptr() + b * m), std::copy(dvc.get() + r, dvc.get() + nc, dv.ptr() + b * m);
        std::copy(dkc.get(), dkc.get() + r, dk0.ptr() + b * r), std::copy(dvc.get(), dvc.get() + r, dv0.ptr() + b * r);
      }
    }
    if (L > 0) std::copy(yc.get() + r, yc.get() + nc, y.ptr() + b * m);
    std::copy(pk + (n - keep) * C, pk + n * C, fk.ptr() + b * keep * C);
    std::copy(pv + (n - keep) * C, pv + n * C, fv.ptr() + b * keep * C);
  }
  out["y"] = std::move(y), out["state.k"] = std::move(fk), out["state.v"] = std::move(fv);
  if (var == Variant::Local) {
    Tensor p({B});
    for (int64_t b = 0; b < B; ++b) p.data[size_t(b)] = float(pos[size_t(b)] + T);
    out["state.pos"] = std::move(p);
  }
  if (grad) {
    out["dq"] = std::move(dq), out["dk"] = std::move(dk), out["dv"] = std::move(dv), out["d" + bias_name] = std::move(dbias);
    if (s0) {
      out["dstate.k"] = std::move(dk0), out["dstate.v"] = std::move(dv0);
      if (var == Variant::Local) out["dstate.pos"] = Tensor({B});  // a count: no gradient
    }
  }
  return out;
}


}  // namespace

void set_aft_forms(MixerSpec& s, AftVariant var) {
  s.y_dims = "B,T,C";
  s.blocking = {{"C", kBlock}};  // channel blocks (aft_conv: within each head)
  const bool with_state = s.state_all_modes;  // aft_simple: its sums are a state in every form
  // aft_local, aft_conv: the sums and the ring, when given or when the final state is wanted
  const bool ring = with_state && (var == Variant::Local || var == Variant::Conv);
  auto ring_call = [ring](const Call& c) { return ring && c.causal && (c.has("state.num") || c.final_state); };
  // the causal forward checks q, k and v as it reads them (aft_full's GEMMs: validation, before)
  s.kernel_checks_values = var != Variant::Full;
  s.parallel = [var, with_state, ring_call](const Call& c) {
    return ring_call(c) ? aft_ring(var, c, nullptr) : aft_parallel(var, c, with_state);
  };
  s.backward = [var, with_state, ring_call](const Call& c, const Tensor& dy) {
    return ring_call(c) ? aft_ring(var, c, &dy) : aft_grad(var, c, dy, with_state);
  };
  // aft_full: every past (k, v) row is its state, in every causal form
  if (var == Variant::Full) set_row_cache(s, {{{"k", "k"}, {"v", "v"}}, [](const Call&, int64_t n) { return n; }});
  s.stepper = [var](const Call& c) {
    const int64_t C = c.d("C");
    auto ctx = std::make_shared<BiasCtx>();
    auto band = std::make_shared<AftBand>(make_band(var, c, *ctx));  // band.ctx points into *ctx
    auto st = std::make_shared<AftState>();
    st->C = C, st->num.assign(C, 0.0f), st->den.assign(C, 0.0f), st->max.assign(C, kAftEmptyMax);
    auto scratch = std::make_shared<std::vector<float>>();
    const float *q = c.t("q").ptr(), *k = c.t("k").ptr(), *v = c.t("v").ptr();
    auto step = [=](float* y) {
      (void)ctx;  // keeps the bias context the band points into alive
      aft_step(y, *st, q, k, v, band->lo, *band, *scratch);
    };
    // the spec's state: running sums (all but aft_full), the band's last (k, v) rows (all but
    // aft_simple), aft_local's absolute position (its bias w_ts reads it; aft_full's ring holds
    // every past row, so its position is the ring's length)
    auto save = [=] {
      TensorMap m;
      if (has_sums(var))
        m["state.num"] = state_tensor({1, C}, st->num), m["state.den"] = state_tensor({1, C}, st->den),
        m["state.max"] = state_tensor({1, C}, st->max);
      if (has_ring(var))
        m["state.k"] = state_tensor({1, st->len(), C}, st->k), m["state.v"] = state_tensor({1, st->len(), C}, st->v);
      if (var == Variant::Local) m["state.pos"] = Tensor({1}, float(st->pos));
      return m;
    };
    auto load = [=](const TensorMap& m) {
      if (has_sums(var)) state_load(st->num, m, "state.num"), state_load(st->den, m, "state.den"), state_load(st->max, m, "state.max");
      if (has_ring(var)) state_load(st->k, m, "state.k"), state_load(st->v, m, "state.v");
      st->pos = var == Variant::Local ? position_of(m.at("state.pos"), "state.pos") : st->len();
    };
    return Stepper{step, save, load};
  };
}

}  // namespace linmix
