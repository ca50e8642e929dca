// The causal kernelised linear attentions with phi = elu + 1 (linear, norm_linear) on the gated
// chunked kernels of kernels/decay_chunk.h with a log decay of 0 on every step: every chunk then
// takes the kernels' factored form (four GEMMs), the heads' rows are read in place and a thread's
// heads run chunk by chunk together, and the backward is the kernels' fused chunked backward (the
// chunked product of kernels/linear_product.h, which the non-causal forms keep, ran three more
// products on time-reversed copies for it). What differs between the mechanisms is what they do
// with a chunk's rows of phi(q)^T S while those are in cache (the epilogue: the normaliser, the
// SRMSNorm, and the kernel's dy for the backward) and what they add to the gradients after.
#pragma once
#include <algorithm>
#include <functional>
#include <vector>

#include "decay_forms.h"

namespace linmix {

// One head as the mechanism's epilogue and post see it: r0, its first row (b, 0, h) of the
// (B,T,H,X) tensors (row t at r0 + t H); bh = b H + h; qf, kf: a backward's phi(q), phi(k)
// (B,T,H,D), null in a forward (the epilogue gets a chunk's rows of them from the kernel, and reads
// them here where it does not: the backward's replay of a kept forward); y: the
// output (B,T,H,E), whose chunk rows the epilogue finds holding num_t = phi(q_t)^T S_t; gy: the
// call's dy (B,T,H,E) (null in the forward); kdy: (T,E) rows the epilogue fills with the
// kernel's dy (the gradient of num).
struct PhiHead {
  int64_t r0, bh;
  const float *qf, *kf;
  float* y;
  const float* gy;
  float* kdy;
};

// phi(q), phi(k) of a backward call, (B,T,H,D) each: one pair of buffers per thread for every
// mechanism here, reused across calls (no page faults per call).
struct PhiBuffers {
  scratch_vector<float> q, k;
};
inline PhiBuffers& phi_buffers() {
  thread_local PhiBuffers b;
  return b;
}

// The outputs of a run: y and state.S, and with grad dq, dk, dv (every element of these written by
// the run) and dstate.S when the call has state.S.
inline TensorMap phi_outputs(const Call& c, bool grad) {
  const int64_t B = c.d("B"), T = c.d("T"), H = c.d("H"), D = c.d("D"), E = c.d("E");
  TensorMap out;
  out.emplace("y", Tensor::uninitialized({B, T, H, E}));
  out.emplace("state.S", Tensor({B, H, D, E}));
  if (grad) {
    out.emplace("dq", Tensor::uninitialized({B, T, H, D}));
    out.emplace("dk", Tensor::uninitialized({B, T, H, D}));
    out.emplace("dv", Tensor::uninitialized({B, T, H, E}));
    if (c.has("state.S")) out.emplace("dstate.S", Tensor({B, H, D, E}));
  }
  return out;
}

// g[i] *= phi'(x_i) = min(phi(x_i), 1) for i < m (f: phi(x), not x).
inline void phi_prime_times(float* __restrict g, const float* __restrict f, int64_t m) {
#pragma omp simd
  for (int64_t i = 0; i < m; ++i) g[i] *= f[i] < 1.0f ? f[i] : 1.0f;
}

// A mechanism without terms of its own in the chunks of the backward (phi_gated_heads' chunk_terms).
struct NoChunkTerms {
  GradEpilogue operator()(const PhiHead&) const { return nullptr; }
};

// Runs the causal form: out holds y (B,T,H,E) and state.S (B,H,D,E), and with dy dq, dk
// (B,T,H,D), dv (B,T,H,E), and dstate.S when the call has state.S. epilogue(head) returns the
// head's chunk epilogue (t0, n); chunk_terms(head), with dy, returns what the backward runs on a
// chunk's gradients of phi(q), phi(k) while they are in cache (GatedGradHead's grad_epilogue: the
// mechanism's own terms, chunks last first) or null; phi' is applied after it, in the same place,
// as phi'(x) = min(phi(x), 1) (1 for x > 0, e^x = phi(x) otherwise) on the gathered phi rows.
// post(head, z) then has z's state and gradients; z.S0 is state.S's head or zeros.
template <class Epilogue, class Post, class ChunkTerms = NoChunkTerms>
void phi_gated_heads(const Call& c, const Tensor* dy, TensorMap& out, Epilogue epilogue, Post post,
                     ChunkTerms chunk_terms = {}) {
  const int64_t B = c.d("B"), T = c.d("T"), H = c.d("H"), D = c.d("D"), E = c.d("E");
  // The forward reads q and k in place, the kernel applying phi to a chunk's rows as it gathers
  // them (ld.phi; a pass making (B,T,H,D) copies of phi(q), phi(k) first was 15% of linear's
  // forward at T = 4096: 6.8 -> 6.3 ms without it). A backward reads each row twice (its forward
  // and its own sweep): there the copies are made once, as before (phi in both gathers instead:
  // fwd+bwd 20.4 -> 21.3 ms).
  const float *q = c.t("q").ptr(), *k = c.t("k").ptr(), *v = c.t("v").ptr();
  const float *iq = q, *ik = k;
  if (dy) {
    const int64_t nqk = B * T * H * D;
    PhiBuffers& pb = phi_buffers();
    pb.q.resize(size_t(nqk)), pb.k.resize(size_t(nqk));
    float *qf = pb.q.data(), *kf = pb.k.data();
    constexpr int64_t kRun = 4096;  // threads over runs of floats, SIMD inside (phi inlined)
#pragma omp parallel for schedule(static)
    for (int64_t i0 = 0; i0 < nqk; i0 += kRun) {
      const int64_t i1 = std::min(nqk, i0 + kRun);
#pragma omp simd
      for (int64_t i = i0; i < i1; ++i) qf[i] = phi_elu(q[i]), kf[i] = phi_elu(k[i]);
    }
    iq = qf, ik = kf;
  }
  float* py = out.at("y").ptr();
  auto head = [&](GatedHead& z) {
    const int64_t r0 = z.b * T * H + z.h;
    return PhiHead{r0, z.b * H + z.h, dy ? iq : nullptr, dy ? ik : nullptr, py, dy ? dy->ptr() + r0 * E : nullptr,
                   dy ? z.dy.data() : nullptr};
  };
  auto prep = [&](GatedHead& z) {
    const int64_t r0 = z.b * T * H + z.h;
    z.iq = iq + r0 * D, z.ik = ik + r0 * D, z.iv = v + r0 * E;
    z.g.assign(1, 0.0f);
    z.ig = z.g.data(), z.oy = py + r0 * E;
    z.ld = {H * D, H * D, H * E, 0, H * E, 1.0f};
    z.ld.g_row = true, z.ld.phi = !dy;
    z.S0 = head_state(c, "S", z.b * H + z.h, D * E);
    if (dy) {
      z.dy.resize(size_t(T * E));
      z.odq = out.at("dq").ptr() + r0 * D, z.odk = out.at("dk").ptr() + r0 * D, z.odv = out.at("dv").ptr() + r0 * E;
      z.dg.resize(1), z.odg = z.dg.data();  // the (zero) decay's gradient: not used
      z.grad_epilogue = [terms = GradEpilogue(chunk_terms(head(z))), D](int64_t t0, int64_t n, const float* qc,
                                                                        const float* kc, float* dqc, float* dkc) {
        if (terms) terms(t0, n, qc, kc, dqc, dkc);
        phi_prime_times(dqc, qc, n * D), phi_prime_times(dkc, kc, n * D);
      };
    }
    z.epilogue = epilogue(head(z));
    z.ld.epilogue = &z.epilogue;
  };
  auto post_all = [&](GatedHead& z) {
    const PhiHead ph = head(z);
    put_state(out, "state.S", z.S, ph.bh);
    post(ph, z);
    if (!dy) return;
    put_state(out, "dstate.S", z.dS0, ph.bh);
  };
  gated_heads(c, dy, D, E, false, prep, post_all);
}

// The spec's parallel and backward forms: run(c, dy) (dy null: the forward) when causal, the
// spec's own (the chunked product) otherwise.
inline void set_causal_forms(MixerSpec& s, TensorMap (*run)(const Call&, const Tensor*)) {
  auto parallel = s.parallel;
  auto backward = s.backward;
  s.kernel_checks_values = true;  // gated_heads checks the per-token inputs' rows as it runs
  s.parallel = [parallel, run](const Call& c) { return c.causal ? run(c, nullptr) : parallel(c); };
  s.backward = [backward, run](const Call& c, const Tensor& dy) { return c.causal ? run(c, &dy) : backward(c, dy); };
}

}  // namespace linmix
