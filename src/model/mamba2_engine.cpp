// The Mamba-2 inference engine (include/linmix/engine.h): the Mamba-2 language model (mamba_ssm's
// MambaLMHeadModel with Mamba2 layers, or Hugging Face's Mamba2ForCausalLM, imported by
// mamba_import.cpp; the Model's mamba2 layers with RMSNorm and no channel mix). Rows of C; per layer
//   a = RMSNorm(x); [z, xBC, dt] = a W_in^T; xBC = silu(conv4(xBC) + b) (the window continues the
//   state's last three rows); [x, B, C] = xBC; per head h (group g = h / (H / G)):
//   d = softplus(dt_h + dt_bias_h), s_h = e^{d A_h} s_h + d x_h B_g^T, y_h = s_h C_g + D_h x_h;
//   y = RMSNorm_per_group(y silu(z)) w; x += y W_out^T
// sequence(): passes of up to kPass rows, every projection one GEMM, the SSD through the mamba2
// mechanism's chunked parallel form from the state (its final state back); step(): gemv, the
// recurrence inline over the heads, no allocation.
// The state is the Model's: per layer "conv" (3 (E + 2 G N), oldest row first) and "state.h"
// (1, H, P, N), mamba_ssm's conv_state and ssm_state.
#include <algorithm>
#include <cmath>

#include "engine_util.h"
#include "linmix/engine.h"
#include "linmix/error.h"
#include "linmix/mixer.h"

namespace linmix {

namespace {

using engine::silu;
using engine::softplus;
constexpr int64_t kConvK = 4;


class Mamba2Engine : public engine::RowsEngine {
 public:
  Mamba2Engine(const Model& m, WType wt, bool take) : cfg_(m.config()) {
    engine::Weights W(m, take);
    C_ = cfg_.d_model, V_ = cfg_.vocab, L_ = cfg_.n_layer;
    auto mat = [&](const std::string& n) { return W.mat(n, wt); };
    emb_ = W.vec("emb.weight"), lnf_ = W.vec("ln_out.weight"), head_ = mat("head.weight");
    const LayerConfig& lc = cfg_.layers[0];
    H_ = cfg_.n_head, G_ = cfg_.knob(lc, "groups"), N_ = cfg_.knob(lc, "state"), E_ = cfg_.knob(lc, "expand") * C_;
    P_ = E_ / H_, Wc_ = E_ + 2 * G_ * N_, Win_ = E_ + Wc_ + H_;
    for (int64_t l = 0; l < L_; ++l) {
      const std::string p = "blocks." + std::to_string(l) + ".";
      Layer y;
      y.norm = W.vec(p + "ln1.weight"), y.nw = W.vec(p + "att.norm.weight");
      y.in = mat(p + "att.in_proj.weight"), y.out = mat(p + "att.out_proj.weight");
      y.conv = W.vec(p + "att.conv.weight"), y.conv_b = W.vec(p + "att.conv.bias");
      y.dt_b = W.vec(p + "att.dt_bias"), y.D = W.vec(p + "att.D"), y.A = W.vec(p + "att.A_log");
      for (float& a : y.A) a = -std::exp(a);
      layers_.push_back(std::move(y));
    }
    state_ = {{"conv", {3 * Wc_}, 0.0f}, {"state.h", {1, H_, P_, N_}, 0.0f}};
    grow(1);
  }

  const ModelConfig& config() const override { return cfg_; }
  Model::State new_state() const override { return Model::State(L_, C_); }
  double step_bytes() const override {
    double b = double(head_.bytes()) + 4.0 * double(C_) * 2;
    for (const Layer& y : layers_)
      b += double(y.in.bytes() + y.out.bytes()) + 4.0 * double(C_ + E_) +  // weights, the norms
           4.0 * double(Wc_) * (kConvK + 1) + 4.0 * 3.0 * double(H_) +   // conv, dt_bias, A, D
           2 * 4.0 * double(H_ * P_ * N_) + 2 * 4.0 * double(3 * Wc_);   // the states, read and written
    return b;
  }
  double flops_per_token(bool with_head) const override {
    return double(L_) * 2.0 * double(Win_ * C_ + C_ * E_) + (with_head ? 2.0 * double(V_ * C_) : 0.0);
  }

 private:
  struct Layer {
    std::vector<float> norm, nw, conv, conv_b, dt_b, D, A;
    QMatrix in, out;
  };

  void grow(int64_t n) {
    if (n <= cap_) return;
    cap_ = n;
    X_.resize(size_t(n * C_)), A_.resize(size_t(n * C_)), ZX_.resize(size_t(n * Win_)), XS_.resize(size_t(n * Wc_));
    Y_.resize(size_t(n * E_)), hist_tmp_.resize(size_t(3 * Wc_));
  }

  void ensure_state(Model::State& st) const override { engine::ensure_layer_states(st, L_, state_, 0); }

  void rows(const int32_t* tokens, int64_t n, Model::State& st, float* logits, bool all_logits) override {
    grow(n);
    const int64_t C = C_, E = E_, Wc = Wc_, Win = Win_;
    float* X = X_.data();
    engine::embed_rows(X, emb_, tokens, n, C);
    for (int64_t l = 0; l < L_; ++l) {
      const Layer& y = layers_[size_t(l)];
      TensorMap& ls = st.layer[size_t(l)];
      float* hist = ls.at("conv").ptr();
      engine::rmsnorm_rows(A_.data(), X, y.norm.data(), n, C);
      engine::matmul(ZX_.data(), A_.data(), y.in, n, false, deq_);
      // the conv over xBC's rows continuing the history
      engine::conv4_silu_rows(XS_.data(), ZX_.data() + E, Win, hist, y.conv.data(), y.conv_b.data(), n, Wc,
                              hist_tmp_.data());
      if (n == 1) ssd_step(y, ls.at("state.h").ptr());
      else ssd_chunked(y, n, ls);
      // the gated RMSNorm per group, rows in parallel
      const int64_t G = G_, Wg = E / G;
#pragma omp parallel for schedule(static) if (n > 8)
      for (int64_t t = 0; t < n; ++t)
        for (int64_t g = 0; g < G; ++g) {
          float* yr = &Y_[size_t(t * E + g * Wg)];
          const float* z = &ZX_[size_t(t * Win + g * Wg)];
          float ms = 0;
          for (int64_t i = 0; i < Wg; ++i) {
            yr[i] *= silu(z[i]);
            ms += yr[i] * yr[i];
          }
          const float r = 1.0f / std::sqrt(ms / float(Wg) + 1e-5f);
          for (int64_t i = 0; i < Wg; ++i) yr[i] *= r * y.nw[size_t(g * Wg + i)];
        }
      engine::matmul(X, Y_.data(), y.out, n, true, deq_);
    }
    if (!logits) return;
    engine::head_logits(logits, A_.data(), X, n, C, V_, all_logits, head_, deq_, [&](float* o, const float* x, int64_t k) {
      engine::rmsnorm_rows(o, x, lnf_.data(), k, C);
    });
  }

  // One token: the recurrence per head on the state s (H, P, N), into Y_ (E).
  void ssd_step(const Layer& y, float* S) {
    const int64_t H = H_, P = P_, N = N_, E = E_, GN = G_ * N_, rep = H_ / G_;
    const float *x = XS_.data(), *dt = ZX_.data() + E + Wc_;
    float* Y = Y_.data();
#pragma omp parallel for schedule(static) if (H * P * N >= (1 << 15))
    for (int64_t h = 0; h < H; ++h) {
      const int64_t g = h / rep;
      const float *Bm = x + E + g * N_, *Cm = x + E + GN + g * N_;
      const float d = softplus(dt[h] + y.dt_b[size_t(h)]), f = exp_fast(d * y.A[size_t(h)]);
      for (int64_t p = 0; p < P; ++p) {
        const float xv = x[h * P + p], dx = d * xv;
        float* s = S + (h * P + p) * N;
        float acc = 0;
#pragma omp simd reduction(+ : acc)
        for (int64_t k = 0; k < N; ++k) {
          s[k] = f * s[k] + dx * Bm[k];
          acc += s[k] * Cm[k];
        }
        Y[h * P + p] = acc + y.D[size_t(h)] * xv;
      }
    }
  }

  // n rows from the state through the mamba2 mechanism's chunked parallel form (final state back).
  void ssd_chunked(const Layer& y, int64_t n, TensorMap& ls) {
    const int64_t E = E_, GN = G_ * N_, Wc = Wc_, Win = Win_;
    Tensor x({1, n, H_, P_}), dt({1, n, H_}), Bm({1, n, G_, N_}), Cm({1, n, G_, N_});
    for (int64_t t = 0; t < n; ++t) {
      const float* s = &XS_[size_t(t * Wc)];
      std::copy(s, s + E, &x.data[size_t(t * E)]);
      std::copy(s + E, s + E + GN, &Bm.data[size_t(t * GN)]);
      std::copy(s + E + GN, s + Wc, &Cm.data[size_t(t * GN)]);
      std::copy(&ZX_[size_t(t * Win + E + Wc)], &ZX_[size_t((t + 1) * Win)], &dt.data[size_t(t * H_)]);
    }
    auto vec = [&](const std::vector<float>& v) {
      Tensor t({H_});
      std::copy(v.begin(), v.end(), t.data.begin());
      return t;
    };
    TensorMap in;
    in["x"] = std::move(x), in["dt"] = std::move(dt), in["Bm"] = std::move(Bm), in["Cm"] = std::move(Cm);
    in["A"] = vec(y.A), in["D"] = vec(y.D), in["dt_bias"] = vec(y.dt_b);
    in["state.h"] = ls.at("state.h");
    in["state.h"].shape = {1, H_, P_, N_};
    TensorMap out = run_mixer("mamba2", Mode::Parallel, true, {}, in, false, true, false);  // values: the engine's own
    std::copy(out.at("y").data.begin(), out.at("y").data.end(), Y_.begin());
    std::copy(out.at("state.h").data.begin(), out.at("state.h").data.end(), ls.at("state.h").data.begin());
  }

  ModelConfig cfg_;
  int64_t C_ = 0, V_ = 0, L_ = 0, E_ = 0, H_ = 0, G_ = 0, N_ = 0, P_ = 0, Wc_ = 0, Win_ = 0, cap_ = 0;
  std::vector<float> emb_, lnf_;
  QMatrix head_;
  std::vector<Layer> layers_;
  std::vector<engine::StateEntry> state_;  // per layer: "conv" (3 Wc), "state.h" (1,H,P,N)
  std::vector<float> X_, A_, ZX_, XS_, Y_, deq_, hist_tmp_;
};

}  // namespace

std::unique_ptr<Engine> mamba2_engine(const Model& m, WType wtype, bool take) {
  return std::make_unique<Mamba2Engine>(m, wtype, take);
}

}  // namespace linmix
