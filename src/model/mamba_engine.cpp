// The Mamba inference engine (include/linmix/engine.h): the Mamba language model (Hugging Face
// MambaForCausalLM, imported by mamba_import.cpp; the Model's mamba layers with RMSNorm and no
// channel mix) for inference. Rows of C; per layer
//   a = RMSNorm(x); [u, z] = a W_in^T; u = silu(conv4(u) + b) (the window continues the state's
//   last three rows); [dt, B, C] = u W_x^T; dt = softplus(dt W_dt^T + b_dt);
//   s = exp(dt A) s + dt B u, y = s C + D u (per channel, the state s (E, N)); x += (y silu(z)) W_out^T
// sequence(): passes of up to kPass rows, every projection one GEMM, the scan per channel block
// over the rows (channels in parallel); step(): gemv, the scan inline, no allocation.
// The state is the Model's: per layer "conv" (3 E, oldest row first) and "state.h" (1, E, N).
#include <algorithm>
#include <cmath>

#include "engine_util.h"
#include "linmix/engine.h"
#include "linmix/error.h"

namespace linmix {

namespace {

using engine::silu;
using engine::softplus;
constexpr int64_t kConvK = 4;


class MambaEngine : public engine::RowsEngine {
 public:
  MambaEngine(const Model& m, WType wt, bool take) : cfg_(m.config()) {
    engine::Weights W(m, take);
    C_ = cfg_.d_model, V_ = cfg_.vocab, L_ = cfg_.n_layer;
    auto mat = [&](const std::string& n) { return W.mat(n, wt); };
    emb_ = W.vec("emb.weight"), lnf_ = W.vec("ln_out.weight"), head_ = mat("head.weight");
    for (int64_t l = 0; l < L_; ++l) {
      const std::string p = "blocks." + std::to_string(l) + ".";
      Layer y;
      y.norm = W.vec(p + "ln1.weight");
      y.in = mat(p + "att.in_proj.weight"), y.xp = mat(p + "att.x_proj.weight"), y.dtp = mat(p + "att.dt_proj.weight");
      y.out = mat(p + "att.out_proj.weight");
      y.conv = W.vec(p + "att.conv.weight"), y.conv_b = W.vec(p + "att.conv.bias");
      y.dt_b = W.vec(p + "att.dt_proj.bias"), y.D = W.vec(p + "att.D"), y.A = W.vec(p + "att.A_log");
      for (float& a : y.A) a = -std::exp(a);
      E_ = y.in.rows / 2, N_ = W.at(p + "att.A_log").dim(1), R_ = y.dtp.cols;
      layers_.push_back(std::move(y));
    }
    state_ = {{"conv", {3 * E_}, 0.0f}, {"state.h", {1, E_, N_}, 0.0f}};
    grow(1);
  }

  const ModelConfig& config() const override { return cfg_; }
  Model::State new_state() const override { return Model::State(L_, C_); }
  double step_bytes() const override {
    double b = double(head_.bytes()) + 4.0 * double(C_) * 2;
    for (const Layer& y : layers_)
      b += double(y.in.bytes() + y.xp.bytes() + y.dtp.bytes() + y.out.bytes()) + 4.0 * double(C_) +
           4.0 * double(E_) * (kConvK + 3 + N_) + 2 * 4.0 * double(E_ * N_) + 4.0 * double(3 * E_) * 2;
    return b;
  }
  double flops_per_token(bool with_head) const override {
    const double per = 2.0 * (double(2 * E_ * C_) + double(E_ * (R_ + 2 * N_)) + double(E_ * R_) + double(C_ * E_));
    return double(L_) * per + (with_head ? 2.0 * double(V_ * C_) : 0.0);
  }

 private:
  struct Layer {
    std::vector<float> norm, conv, conv_b, dt_b, D, A;
    QMatrix in, xp, dtp, out;
  };

  void grow(int64_t n) {
    if (n <= cap_) return;
    cap_ = n;
    X_.resize(size_t(n * C_)), A_.resize(size_t(n * C_)), UZ_.resize(size_t(n * 2 * E_)), U_.resize(size_t(n * E_));
    DBC_.resize(size_t(n * (R_ + 2 * N_))), DT_.resize(size_t(n * E_)), Y_.resize(size_t(n * E_));
    XR_.resize(size_t(n * R_)), hist_tmp_.resize(size_t(3 * E_));
  }

  void ensure_state(Model::State& st) const override { engine::ensure_layer_states(st, L_, state_, 0); }

  void rows(const int32_t* tokens, int64_t n, Model::State& st, float* logits, bool all_logits) override {
    grow(n);
    const int64_t C = C_, E = E_, N = N_, R = R_, W = R + 2 * N;
    float* X = X_.data();
    engine::embed_rows(X, emb_, tokens, n, C);
    for (int64_t l = 0; l < L_; ++l) {
      const Layer& y = layers_[size_t(l)];
      float *hist = st.layer[size_t(l)].at("conv").ptr(), *S = st.layer[size_t(l)].at("state.h").ptr();
      engine::rmsnorm_rows(A_.data(), X, y.norm.data(), n, C);
      engine::matmul(UZ_.data(), A_.data(), y.in, n, false, deq_);
      float* U = U_.data();  // the conv over u's rows continuing the history
      engine::conv4_silu_rows(U, UZ_.data(), 2 * E, hist, y.conv.data(), y.conv_b.data(), n, E, hist_tmp_.data());
      engine::matmul(DBC_.data(), U, y.xp, n, false, deq_);
      for (int64_t t = 0; t < n; ++t) std::copy(&DBC_[size_t(t * W)], &DBC_[size_t(t * W + R)], &XR_[size_t(t * R)]);
      engine::matmul(DT_.data(), XR_.data(), y.dtp, n, false, deq_);
      // the scan, channels in parallel
#pragma omp parallel for schedule(static) if (E >= 64)
      for (int64_t e = 0; e < E; ++e) {
        float* s = S + e * N;
        const float* A = &y.A[size_t(e * N)];
        for (int64_t t = 0; t < n; ++t) {
          const float dt = softplus(DT_[size_t(t * E + e)] + y.dt_b[size_t(e)]), u = U[t * E + e];
          const float *Bm = &DBC_[size_t(t * W + R)], *Cm = Bm + N;
          float acc = 0;
#pragma omp simd reduction(+ : acc)
          for (int64_t k = 0; k < N; ++k) {  // exp_fast (kernels/vmath.h, ~1 ulp): the loop vectorises
            s[k] = exp_fast(dt * A[k]) * s[k] + dt * Bm[k] * u;
            acc += s[k] * Cm[k];
          }
          const float z = UZ_[size_t(t * 2 * E + E + e)];
          Y_[size_t(t * E + e)] = (acc + y.D[size_t(e)] * u) * silu(z);
        }
      }
      engine::matmul(X, Y_.data(), y.out, n, true, deq_);
    }
    if (!logits) return;
    engine::head_logits(logits, A_.data(), X, n, C, V_, all_logits, head_, deq_, [&](float* o, const float* x, int64_t k) {
      engine::rmsnorm_rows(o, x, lnf_.data(), k, C);
    });
  }

  ModelConfig cfg_;
  int64_t C_ = 0, V_ = 0, L_ = 0, E_ = 0, N_ = 0, R_ = 0, cap_ = 0;
  std::vector<float> emb_, lnf_;
  QMatrix head_;
  std::vector<Layer> layers_;
  std::vector<engine::StateEntry> state_;  // per layer: "conv" (3 E), "state.h" (1,E,N)
  std::vector<float> X_, A_, UZ_, U_, DBC_, DT_, Y_, XR_, deq_, hist_tmp_;
};

}  // namespace

std::unique_ptr<Engine> mamba_engine(const Model& m, WType wtype, bool take) {
  return std::make_unique<MambaEngine>(m, wtype, take);
}

}  // namespace linmix
