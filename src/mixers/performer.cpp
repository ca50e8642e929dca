// performer — FAVOR+ (Choromanski et al. 2021, "Rethinking Attention with Performers").
//   x' = x D^(-1/4);  phi(x)_m = exp(omega_m . x' - |x'|^2 / 2) / sqrt(M)   (positive features, eq. 7)
//   y_t = phi(q_t)^T S / (phi(q_t) . z),  S = sum_s phi(k_s) v_s^T, z = sum_s phi(k_s)
// Stabilising shifts cancel between numerator and denominator: queries subtract their own
// row max; keys subtract the max over all keys (non-causal) or the running max over keys
// s <= t (causal, both forms), the carried S, z being rescaled by exp(old max - new max) <= 1.
#include <random>

#include "../kernels/linear_product.h"
#include "../ref/ref_util.h"
#include <cblas.h>

#include "../kernels/vmath.h"
#include "common.h"
#include "linmix/kernels.h"

namespace linmix::ref {

// ---- performer: the float64 reference (the literal formula, templated for the tape) ----
// Performer: y_t = sum_s A_ts v_s / sum_s A_ts, A_ts = phi(q_t) . phi(k_s) (s <= t when
// causal), phi(x)_m = exp(omega_m . x' - |x'|^2 / 2) / sqrt(M), x' = x D^(-1/4): the features
// exactly as the paper writes them (no shifts). proj: (M,D).
template <class S>
void performer_ref(S* y, const S* q, const S* k, const S* v, const S* proj, const AttnDims& d, int64_t M,
                   bool causal) {
  const int64_t T = d.T, H = d.H, D = d.D, E = d.E;
  const double sc = std::pow(double(D), -0.25);
  auto phi = [&](const S* x, S* out) {
    S sq = 0;
    for (int64_t j = 0; j < D; ++j) sq += x[j] * sc * x[j] * sc;
    for (int64_t m = 0; m < M; ++m) {
      S a = 0;
      for (int64_t j = 0; j < D; ++j) a += proj[m * D + j] * x[j] * sc;
      out[m] = exp(a - sq / 2) / std::sqrt(double(M));
    }
  };
  std::vector<S> fq(T * M), fk(T * M), A(T * T);
  for (int64_t b = 0; b < d.B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t t = 0; t < T; ++t) {
        phi(q + ((b * T + t) * H + h) * D, &fq[t * M]);
        phi(k + ((b * T + t) * H + h) * D, &fk[t * M]);
      }
      for (int64_t t = 0; t < T; ++t) {
        S den = 0;
        for (int64_t s2 = 0; s2 < T; ++s2) {
          S a = 0;
          if (!causal || s2 <= t)
            for (int64_t m = 0; m < M; ++m) a += fq[t * M + m] * fk[s2 * M + m];
          A[t * T + s2] = a;
          den += a;
        }
        for (int64_t e = 0; e < E; ++e) {
          S num = 0;
          for (int64_t s2 = 0; s2 < T; ++s2) num += A[t * T + s2] * v[((b * T + s2) * H + h) * E + e];
          y[((b * T + t) * H + h) * E + e] = num / den;
        }
      }
    }
}

}  // namespace linmix::ref

namespace linmix {

namespace {

constexpr float kEmptyMax = -1e38f;  // the max of nothing; finite so a saved state stays finite

// logits (n,M) = omega . x' - |x'|^2 / 2 for n rows of x with row stride ldx: one GEMM
// (x' omega^T, OpenBLAS) and the row norms.
void feature_logits(float* out, const float* x, int64_t ldx, int64_t n, const float* proj, int64_t M, int64_t D) {
  const float s = std::pow(float(D), -0.25f);
  if (n == 0) return;
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(n), int(M), int(D), s, x, int(ldx), proj, int(D), 0.0f, out,
              int(M));
  for (int64_t i = 0; i < n; ++i) {
    const float* xr = x + i * ldx;
    float sq = 0.0f;
#pragma omp simd reduction(+ : sq)
    for (int64_t j = 0; j < D; ++j) sq += xr[j] * xr[j];
    const float h = 0.5f * s * s * sq;
    for (int64_t m = 0; m < M; ++m) out[i * M + m] -= h;
  }
}

// max of n floats in SIMD partial maxima (std::max_element runs a serial chain of compares)
inline float row_max(const float* r, int64_t n) {
  float mx = kEmptyMax;
#pragma omp simd reduction(max : mx)
  for (int64_t i = 0; i < n; ++i) mx = std::max(mx, r[i]);
  return mx;
}

// Stabilised features of one head (row0 = b*T*H + h): Qf, Kf (T,M). Queries: exp(l - row max);
// keys: exp(l - g_t) with g_t the running max over keys s <= t (causal, saved in g) or the max
// over all keys (non-causal). All / sqrt(M).
void head_features(float* Qf, float* Kf, float* g, const float* q, const float* k, const float* proj, int64_t row0,
                   int64_t T, int64_t H, int64_t D, int64_t M, bool causal) {
  const float inv_sqrt_m = 1.0f / std::sqrt(float(M));
  feature_logits(Qf, q + row0 * D, H * D, T, proj, M, D);
  feature_logits(Kf, k + row0 * D, H * D, T, proj, M, D);
  for (int64_t t = 0; t < T; ++t) {
    float* r = Qf + t * M;
    const float mx = row_max(r, M);
    for (int64_t m = 0; m < M; ++m) r[m] = exp_fast(r[m] - mx) * inv_sqrt_m;
  }
  if (causal) {
    float run = kEmptyMax;
    for (int64_t t = 0; t < T; ++t) {
      float* r = Kf + t * M;
      g[t] = run = std::max(run, row_max(r, M));
      for (int64_t m = 0; m < M; ++m) r[m] = exp_fast(r[m] - run) * inv_sqrt_m;
    }
  } else {
    const float mx = *std::max_element(Kf, Kf + T * M);
    for (int64_t i = 0; i < T * M; ++i) Kf[i] = exp_fast(Kf[i] - mx) * inv_sqrt_m;
  }
}

}  // namespace

void performer_forward(float* y, const float* q, const float* k, const float* v, const float* proj,
                       const AttnDims& d, int64_t M, bool causal) {
  const int64_t B = d.B, T = d.T, H = d.H, D = d.D, E = d.E;
#pragma omp parallel
  {
    // Qf, Kf: (T,M) features of one head; den: (T); g: (T) running key max (causal).
    // Vh, Yh: (T,E) the head's values and outputs, contiguous
    std::vector<float> Qf(T * M), Kf(T * M), Vh(T * E), Yh(T * E), den(T), g(T);
#pragma omp for collapse(2) schedule(dynamic)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < H; ++h) {
        const int64_t row0 = b * T * H + h;
        head_features(Qf.data(), Kf.data(), g.data(), q, k, proj, row0, T, H, D, M, causal);
        gather_head(Vh.data(), v, row0, T, H, E, identity_fn);
        linear_product(Yh.data(), den.data(), Qf.data(), Kf.data(), Vh.data(), {T, M, E, M, M, E, E, causal},
                       causal ? g.data() : nullptr);
        scatter_head(y, Yh.data(), row0, T, H, E, [&](int64_t t) { return 1.0f / den[t]; });
      }
  }
}

// Backward of performer_forward. The stabilising shifts (query row max, key max) leave y
// unchanged, so they are constants for the gradient; per head: features and the forward
// product are recomputed, dnum = dy / den, dden = -(dy . y) / den, the product's backward
// gives d(features); a feature f = exp(l - shift) gives dl = df f; and
// l_m(x) = omega_m . x' - |x'|^2 / 2, x' = x D^(-1/4) gives
//   dx = D^(-1/4) (sum_m dl_m omega_m - (sum_m dl_m) x'),  dproj_m += sum over rows dl_m x'.
void performer_backward(float* dq, float* dk, float* dv, float* dproj, const float* q, const float* k, const float* v,
                        const float* proj, const float* dy, const AttnDims& d, int64_t M, bool causal) {
  const int64_t B = d.B, T = d.T, H = d.H, D = d.D, E = d.E;
  const float sc = std::pow(float(D), -0.25f);
  std::fill(dproj, dproj + M * D, 0.0f);
#pragma omp parallel
  {
    std::vector<float> Qf(T * M), Kf(T * M), g(T), num(T * E), den(T), dnum(T * E), dden(T), dQ(T * M), dK(T * M),
        dV(T * E), dp(M * D, 0.0f);
#pragma omp for collapse(2) schedule(dynamic)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < H; ++h) {
        const int64_t row0 = b * T * H + h;
        head_features(Qf.data(), Kf.data(), g.data(), q, k, proj, row0, T, H, D, M, causal);
        const float* gp = causal ? g.data() : nullptr;
        const LinearProductArgs args{T, M, E, M, M, H * E, E, causal};
        linear_product(num.data(), den.data(), Qf.data(), Kf.data(), v + row0 * E, args, gp);
        for (int64_t t = 0; t < T; ++t) {
          const float* gy = dy + (row0 + t * H) * E;
          float s = 0.0f;
          for (int64_t e = 0; e < E; ++e) s += gy[e] * num[t * E + e];
          for (int64_t e = 0; e < E; ++e) dnum[t * E + e] = gy[e] / den[t];
          dden[t] = -s / (den[t] * den[t]);
        }
        linear_product_backward(dQ.data(), dK.data(), dV.data(), Qf.data(), Kf.data(), v + row0 * E, dnum.data(), E,
                                dden.data(), args, gp);
        for (int64_t t = 0; t < T; ++t) std::copy(&dV[t * E], &dV[t * E] + E, dv + (row0 + t * H) * E);
        // per pass: dl = df f (T,M); dx = sc (dl proj - rowsum(dl) sc x) (one GEMM);
        // dproj += sc dl^T x (one GEMM)
        for (int pass = 0; pass < 2; ++pass) {  // queries, then keys
          const float* x = (pass == 0 ? q : k) + row0 * D;
          float* dx = (pass == 0 ? dq : dk) + row0 * D;
          float* dl = (pass == 0 ? dQ : dK).data();  // overwritten with dl
          const float* f = (pass == 0 ? Qf : Kf).data();
          for (int64_t i = 0; i < T * M; ++i) dl[i] *= f[i];
          cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(T), int(D), int(M), sc, dl, int(M), proj, int(D),
                      0.0f, dx, int(H * D));
          for (int64_t t = 0; t < T; ++t) {
            float sum_dl = 0.0f;
#pragma omp simd reduction(+ : sum_dl)
            for (int64_t m = 0; m < M; ++m) sum_dl += dl[t * M + m];
            const float c2 = sc * sc * sum_dl;
            for (int64_t j = 0; j < D; ++j) dx[t * H * D + j] -= c2 * x[t * H * D + j];
          }
          cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, int(M), int(D), int(T), sc, dl, int(M), x, int(H * D), 1.0f,
                      dp.data(), int(D));
        }
      }
#pragma omp critical
    for (int64_t i = 0; i < M * D; ++i) dproj[i] += dp[i];
  }
}

void performer_step(float* y, PerformerState& st, const float* q, const float* k, const float* v, const float* proj,
                    int64_t D, std::vector<float>& scratch) {
  const int64_t H = st.H, M = st.M, E = st.E;
  scratch.resize(static_cast<size_t>(2 * M * H));
  // heads in parallel when the state is large (each core streams its heads through its L2)
#pragma omp parallel for schedule(static) if (H * M * E >= (1 << 15))
  for (int64_t h = 0; h < H; ++h) {
    float *fq = scratch.data() + 2 * M * h, *fk = fq + M;
    float* S = &st.S[h * M * E];
    float* z = &st.z[h * M];
    feature_logits(fk, k + h * D, D, 1, proj, M, D);
    const float mnew = std::max(st.kmax[h], row_max(fk, M));
    const float shrink = std::exp(st.kmax[h] - mnew);
    st.kmax[h] = mnew;
    feature_logits(fq, q + h * D, D, 1, proj, M, D);
    const float qmax = row_max(fq, M);
    float den = 0.0f;
    for (int64_t m = 0; m < M; ++m) {  // features: fk = e^{logit - running key max}, fq = e^{logit - row max}
      fk[m] = exp_fast(fk[m] - mnew), fq[m] = exp_fast(fq[m] - qmax);
      z[m] = z[m] * shrink + fk[m];
      den += fq[m] * z[m];
    }
    float* yr = y + h * E;
    state_step(S, yr, fk, fq, v + h * E, shrink, M, E);  // S = shrink S + fk v^T; y = fq^T S
    for (int64_t e = 0; e < E; ++e) yr[e] /= den;
  }
}

std::vector<float> orthogonal_gaussian_features(int64_t M, int64_t D, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  std::vector<float> out(static_cast<size_t>(M * D));
  std::vector<double> G(static_cast<size_t>(D * D));
  for (int64_t r0 = 0; r0 < M; r0 += D) {
    for (double& g : G) g = normal(rng);
    // Orthonormalise the rows (modified Gram-Schmidt, twice for full float64 orthogonality).
    for (int pass = 0; pass < 2; ++pass)
      for (int64_t i = 0; i < D; ++i) {
        double* gi = &G[i * D];
        for (int64_t j = 0; j < i; ++j) {
          const double* gj = &G[j * D];
          double dot = 0;
          for (int64_t x = 0; x < D; ++x) dot += gi[x] * gj[x];
          for (int64_t x = 0; x < D; ++x) gi[x] -= dot * gj[x];
        }
        double nrm = 0;
        for (int64_t x = 0; x < D; ++x) nrm += gi[x] * gi[x];
        nrm = std::sqrt(nrm);
        for (int64_t x = 0; x < D; ++x) gi[x] /= nrm;
      }
    for (int64_t i = 0; i < D && r0 + i < M; ++i) {
      double chi = 0;  // |g| for g ~ N(0, I_D): chi distributed with D degrees of freedom
      for (int64_t x = 0; x < D; ++x) {
        const double g = normal(rng);
        chi += g * g;
      }
      chi = std::sqrt(chi);
      for (int64_t x = 0; x < D; ++x) out[(r0 + i) * D + x] = float(G[i * D + x] * chi);
    }
  }
  return out;
}

namespace {


MixerSpec make_spec() {
  MixerSpec s;
  s.name = "performer";
  s.blocking = {{"T", kLinearChunk}};
  // the chunked product of kernels/linear_product.h
  // with M features in place of D, plus the feature logits of q and k (2 T M D each)
  s.flops = [](const std::map<std::string, int64_t>& d, bool) {
    const double T = double(d.at("T")), H = double(d.at("H")), D = double(d.at("D")), E = double(d.at("E"));
    return chunked_product_flops(T, H, double(d.at("M")), E) + H * 2 * 2 * T * double(d.at("M")) * D;
  };
  s.own_dims = [](std::map<std::string, int64_t>& d, Scale scale, bool) {
    d["M"] = scale == Scale::Test ? 7 : scale == Scale::Grad ? 3 : scale == Scale::Demo ? 32 : 64;
  };
  // |q|, |k| ~ 10 (5 for the gradients): feature logits near -100 .. +40, outside float32's exp
  // range without the max shifts, inside float64's (keys at +-60 would underflow even float64:
  // the formula itself is 0/0 there)
  s.stress = [](TensorMap& in, bool for_grad) {
    for (const char* name : {"q", "k"})
      for (float& x : in[name].data) x *= for_grad ? 5.0f : 10.0f;
  };
  s.paper = "Choromanski et al. 2021, Rethinking Attention with Performers (FAVOR+)";
  s.summary = "softmax-kernel attention through M positive random features";
  s.inputs = {{"q", "B,T,H,D"}, {"k", "B,T,H,D"}, {"v", "B,T,H,E"}, {"proj", "M,D"}};
  s.state = {{"S", "B,H,M,E"}, {"z", "B,H,M"}, {"kmax", "B,H"}};
  s.state_size = "H M (E + 1) + H per sequence (S, z scaled by exp(-kmax))";
  s.time = "O(T H M (D + E))";
  s.memory = "O(T M) per head (features) + O(chunk^2 + M E)";
  s.example_fix = [](TensorMap& in) {  // a real feature draw instead of plain N(0,1) rows
    const int64_t M = in["proj"].dim(0), D = in["proj"].dim(1);
    in["proj"].data = orthogonal_gaussian_features(M, D, 42);
  };
  s.y_dims = "B,T,H,E";
  set_reference(s, [](const Call& c, const auto& x) {
    using S = scalar_of<decltype(x)>;
    const AttnDims d = attn_dims(c);
    std::vector<S> y(d.B * d.T * d.H * d.E);
    ref::performer_ref<S>(y.data(), x.at("q").data(), x.at("k").data(), x.at("v").data(), x.at("proj").data(), d,
                          c.d("M"), c.causal);
    return y;
  });
  s.parallel = [](const Call& c) {
    const AttnDims d = attn_dims(c);
    Tensor y({d.B, d.T, d.H, d.E});
    performer_forward(y.ptr(), c.t("q").ptr(), c.t("k").ptr(), c.t("v").ptr(), c.t("proj").ptr(), d, c.d("M"),
                      c.causal);
    return TensorMap{{"y", std::move(y)}};
  };
  s.backward = [](const Call& c, const Tensor& dy) {
    const AttnDims d = attn_dims(c);
    const int64_t M = c.d("M");
    Tensor y({d.B, d.T, d.H, d.E}), dq({d.B, d.T, d.H, d.D}), dk({d.B, d.T, d.H, d.D}), dv({d.B, d.T, d.H, d.E}),
        dproj({M, d.D});
    performer_forward(y.ptr(), c.t("q").ptr(), c.t("k").ptr(), c.t("v").ptr(), c.t("proj").ptr(), d, M, c.causal);
    performer_backward(dq.ptr(), dk.ptr(), dv.ptr(), dproj.ptr(), c.t("q").ptr(), c.t("k").ptr(), c.t("v").ptr(),
                       c.t("proj").ptr(), dy.ptr(), d, M, c.causal);
    return TensorMap{{"y", std::move(y)},
                     {"dq", std::move(dq)},
                     {"dk", std::move(dk)},
                     {"dv", std::move(dv)},
                     {"dproj", std::move(dproj)}};
  };
  s.stepper = [](const Call& c) {
    const AttnDims d = attn_dims(c);
    const int64_t M = c.d("M");
    auto st = std::make_shared<PerformerState>(PerformerState{d.H, M, d.E, std::vector<float>(d.H * M * d.E, 0.0f),
                                                              std::vector<float>(d.H * M, 0.0f),
                                                              std::vector<float>(d.H, kEmptyMax)});
    auto scratch = std::make_shared<std::vector<float>>();
    const float *q = c.t("q").ptr(), *k = c.t("k").ptr(), *v = c.t("v").ptr(), *proj = c.t("proj").ptr();
    const int64_t D = d.D;
    auto save = [=] {
      return TensorMap{{"state.S", state_tensor({1, st->H, st->M, st->E}, st->S)},
                       {"state.z", state_tensor({1, st->H, st->M}, st->z)},
                       {"state.kmax", state_tensor({1, st->H}, st->kmax)}};
    };
    auto load = [=](const TensorMap& m) {
      state_load(st->S, m, "state.S"), state_load(st->z, m, "state.z"), state_load(st->kmax, m, "state.kmax");
    };
    return Stepper{[=](float* y) { performer_step(y, *st, q, k, v, proj, D, *scratch); }, save, load};
  };
  return s;
}

}  // namespace

MixerSpec performer_spec() { return make_spec(); }

}  // namespace linmix
