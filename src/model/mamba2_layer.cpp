// The Mamba-2 block as mamba_ssm publishes it (Dao & Gu 2024; mamba_ssm/modules/mamba2.py with
// its defaults: rmsnorm, norm_before_gate = False, conv bias, no projection biases, D per head,
// no gated-MLP part). Inner width Ei = expand d_model, H = n_head heads of P = Ei / H, G =
// "groups" (default 1) groups of state size N = "state":
//   [z, xBC, dt] = a W_in^T   (widths Ei, Ei + 2 G N, H: mamba_ssm's packed order z, x, B, C, dt)
//   xBC = silu(conv4(xBC) + b)      (causal, depthwise, kernel 4)
//   [x, Bm, Cm] = xBC          (widths Ei, G N, G N)
//   y = SSD(x, dt, A = -exp(A_log), Bm, Cm, D, dt_bias)   (the mamba2 mechanism, d = softplus(dt + dt_bias))
//   y = RMSNorm_per_group(y silu(z)) * w   (eps 1e-5, G groups of Ei / G channels)
//   out = y W_out^T
// Parameters under mamba_ssm's names (att.in_proj.weight, att.conv.weight [Ei+2GN, 4],
// att.conv.bias, att.dt_bias [H], att.A_log [H], att.D [H], att.norm.weight [Ei],
// att.out_proj.weight), so a checkpoint imports by renaming (mamba_import.cpp). Recurrent state:
// the mixer's h (1,H,P,N) and the last three conv inputs ("conv", 3 (Ei + 2 G N), oldest first).
#include <cmath>

#include "layers.h"
#include "mixer_layer.h"

namespace linmix {

namespace {

constexpr float kNormEps = 1e-5f;

// The gated RMSNorm of one row: y1 = y0 silu(z); per group of W channels y2 = y1 rstd w.
void gated_norm_row(const float* y0, const float* z, const float* w, float* y1, float* rstd, float* y2, int64_t Ei,
                    int64_t G) {
  const int64_t W = Ei / G;
  for (int64_t c = 0; c < Ei; ++c) y1[c] = y0[c] * silu1(z[c]);
  for (int64_t g = 0; g < G; ++g) {
    float sq = 0.0f;
    for (int64_t i = g * W; i < (g + 1) * W; ++i) sq += y1[i] * y1[i];
    const float r = 1.0f / std::sqrt(sq / float(W) + kNormEps);
    rstd[g] = r;
    for (int64_t i = g * W; i < (g + 1) * W; ++i) y2[i] = y1[i] * r * w[i];
  }
}

class Mamba2Layer : public MixerLayer {
 public:
  Mamba2Layer(const ModelConfig& cfg, int64_t index)
      : MixerLayer(cfg, index), Ei_(cfg.knob(lc_, "expand") * cfg.d_model), H_(cfg.n_head),
        G_(cfg.knob(lc_, "groups")), N_(cfg.knob(lc_, "state")) {
    LINMIX_CHECK(Ei_ % H_ == 0, "model config: mamba2's inner width expand * d_model = " + std::to_string(Ei_) +
                                    " is not a multiple of n_head = " + std::to_string(H_));
    LINMIX_CHECK(H_ % G_ == 0, "model config: mamba2's n_head = " + std::to_string(H_) + " is not a multiple of groups = " +
                                   std::to_string(G_));
    P_ = Ei_ / H_, Wc_ = Ei_ + 2 * G_ * N_, Win_ = Ei_ + Wc_ + H_;
  }

  int64_t Ei() const { return Ei_; }
  int64_t H() const { return H_; }
  int64_t G() const { return G_; }
  int64_t N() const { return N_; }
  int64_t P() const { return P_; }
  int64_t Wc() const { return Wc_; }
  int64_t Win() const { return Win_; }

  ParamShapes shapes() const override {
    return {{"att.in_proj.weight", {Win_, C_}}, {"att.conv.weight", {Wc_, 4}}, {"att.conv.bias", {Wc_}},
            {"att.dt_bias", {H_}},            {"att.A_log", {H_}},          {"att.D", {H_}},
            {"att.norm.weight", {Ei_}},       {"att.out_proj.weight", {C_, Ei_}}};
  }

  // mamba_ssm's initialisation: A uniform in [1, 16], dt log-uniform in [1e-3, 0.1] (floor 1e-4)
  // through softplus^-1, D = 1, the norm's weight 1, the conv as PyTorch's Conv1d (U(-1/2, 1/2)
  // for a fan-in of 4); the projections keep the model's rule.
  bool init(const std::string& name, Tensor& t, InitCtx& ctx) const override {
    std::uniform_real_distribution<float> u01(0.0f, 1.0f), half(-0.5f, 0.5f);
    if (name == "att.A_log") {
      for (float& x : t.data) x = std::log(1.0f + 15.0f * u01(ctx.rng));
    } else if (name == "att.dt_bias") {
      for (float& x : t.data) {
        const float dt = std::max(std::exp(std::log(1e-3f) + std::log(100.0f) * u01(ctx.rng)), 1e-4f);
        x = dt + std::log(-std::expm1(-dt));
      }
    } else if (name == "att.D" || name == "att.norm.weight") {
      std::fill(t.data.begin(), t.data.end(), 1.0f);
    } else if (name == "att.conv.weight" || name == "att.conv.bias") {
      for (float& x : t.data) x = half(ctx.rng);
    } else {
      return false;
    }
    return true;
  }

  void forward(const LayerIO& io, const float* a, float* out, int64_t B, int64_t T) override {
    const int64_t NR = B * T, Ei = Ei_, Wc = Wc_, Win = Win_;
    a_ = a;
    zx_.resize(size_t(NR * Win)), xp_.resize(size_t(NR * Wc)), xc_.resize(size_t(NR * Wc)), xs_.resize(size_t(NR * Wc));
    nn::matmul_forward(zx_.data(), a, io.w("att.in_proj.weight"), nullptr, NR, C_, Win);
    for (int64_t i = 0; i < NR; ++i) std::copy(&zx_[size_t(i * Win + Ei)], &zx_[size_t(i * Win + Ei + Wc)], &xp_[size_t(i * Wc)]);
    nn::conv4_forward(xc_.data(), xp_.data(), io.w("att.conv.weight"), io.w("att.conv.bias"), B, T, Wc);
    for (int64_t i = 0; i < NR * Wc; ++i) xs_[size_t(i)] = silu1(xc_[size_t(i)]);
    y0_ = mixer_forward(lc_, inputs(io, B, T), true, io.keep ? &kept_ : nullptr).data;
    y1_.resize(size_t(NR * Ei)), y2_.resize(size_t(NR * Ei)), rstd_.resize(size_t(NR * G_));
    const float* w = io.w("att.norm.weight");
    for (int64_t i = 0; i < NR; ++i)
      gated_norm_row(&y0_[size_t(i * Ei)], &zx_[size_t(i * Win)], w, &y1_[size_t(i * Ei)], &rstd_[size_t(i * G_)],
                     &y2_[size_t(i * Ei)], Ei, G_);
    nn::matmul_forward(out, y2_.data(), io.w("att.out_proj.weight"), nullptr, NR, Ei, C_);
  }

  void backward(const LayerIO& io, const float* dout, float* da, int64_t B, int64_t T) override {
    const int64_t NR = B * T, Ei = Ei_, Wc = Wc_, Win = Win_, G = G_, W = Ei / G, GN = G_ * N_;
    std::vector<float> dy2(size_t(NR * Ei)), dy0(size_t(NR * Ei)), dzx(size_t(NR * Win), 0.0f);
    nn::matmul_backward(dy2.data(), io.g("att.out_proj.weight"), nullptr, dout, y2_.data(),
                        io.w("att.out_proj.weight"), NR, Ei, C_);
    // the gated norm: y2 = y1 rstd w, y1 = y0 silu(z)
    const float* w = io.w("att.norm.weight");
    float* gw = io.g("att.norm.weight");
    for (int64_t i = 0; i < NR; ++i)
      for (int64_t g = 0; g < G; ++g) {
        const float r = rstd_[size_t(i * G + g)];
        float dot = 0.0f;  // sum d(y1 r) y1 r over the group
        for (int64_t c = g * W; c < (g + 1) * W; ++c) {
          const size_t k = size_t(i * Ei + c);
          gw[c] += dy2[k] * y1_[k] * r;
          dot += dy2[k] * w[c] * y1_[k] * r;
        }
        for (int64_t c = g * W; c < (g + 1) * W; ++c) {
          const size_t k = size_t(i * Ei + c);
          const float dy1 = r * (dy2[k] * w[c] - y1_[k] * r * dot / float(W));
          const float z = zx_[size_t(i * Win + c)];
          dzx[size_t(i * Win + c)] = dy1 * y0_[k] * dsilu1(z);
          dy0[k] = dy1 * silu1(z);
        }
      }
    const TensorMap in = inputs(io, B, T);
    const TensorMap g = mixer_backward(lc_, in, {B, T, H_, P_}, dy0.data(), true, kept_.get());
    kept_.reset();
    float *gal = io.g("att.A_log"), *gD = io.g("att.D"), *gb = io.g("att.dt_bias");
    for (int64_t h = 0; h < H_; ++h) {
      gal[h] += g.at("dA").data[size_t(h)] * in.at("A").data[size_t(h)];  // A = -exp(A_log)
      gD[h] += g.at("dD").data[size_t(h)], gb[h] += g.at("ddt_bias").data[size_t(h)];
    }
    // back through silu and the conv to the packed projection
    std::vector<float> dxc(size_t(NR * Wc)), dxp(size_t(NR * Wc), 0.0f);
    const float *dx = g.at("dx").ptr(), *dB = g.at("dBm").ptr(), *dC = g.at("dCm").ptr(), *ddt = g.at("ddt").ptr();
    for (int64_t i = 0; i < NR; ++i) {
      float* d = &dxc[size_t(i * Wc)];
      std::copy(dx + i * Ei, dx + (i + 1) * Ei, d);
      std::copy(dB + i * GN, dB + (i + 1) * GN, d + Ei);
      std::copy(dC + i * GN, dC + (i + 1) * GN, d + Ei + GN);
      for (int64_t c = 0; c < Wc; ++c) d[c] *= dsilu1(xc_[size_t(i * Wc + c)]);
      std::copy(ddt + i * H_, ddt + (i + 1) * H_, &dzx[size_t(i * Win + Ei + Wc)]);
    }
    nn::conv4_backward(dxp.data(), io.g("att.conv.weight"), io.g("att.conv.bias"), dxc.data(), xp_.data(),
                       io.w("att.conv.weight"), B, T, Wc);
    for (int64_t i = 0; i < NR; ++i) std::copy(&dxp[size_t(i * Wc)], &dxp[size_t((i + 1) * Wc)], &dzx[size_t(i * Win + Ei)]);
    nn::matmul_backward(da, io.g("att.in_proj.weight"), nullptr, dzx.data(), a_, io.w("att.in_proj.weight"), NR, C_,
                        Win, true);
  }

  std::unique_ptr<LayerRun> start(const LayerIO& io, const TensorMap& state) const override;

  // The SSD's inputs from the kept activations: x, Bm, Cm out of xs, dt out of zx, the weights.
  TensorMap inputs(const LayerIO& io, int64_t B, int64_t T) const {
    const int64_t NR = B * T, Ei = Ei_, Wc = Wc_, Win = Win_, GN = G_ * N_;
    Tensor x({B, T, H_, P_}), Bm({B, T, G_, N_}), Cm({B, T, G_, N_}), dt({B, T, H_});
    for (int64_t i = 0; i < NR; ++i) {
      const float* s = &xs_[size_t(i * Wc)];
      std::copy(s, s + Ei, &x.data[size_t(i * Ei)]);
      std::copy(s + Ei, s + Ei + GN, &Bm.data[size_t(i * GN)]);
      std::copy(s + Ei + GN, s + Wc, &Cm.data[size_t(i * GN)]);
      std::copy(&zx_[size_t(i * Win + Ei + Wc)], &zx_[size_t((i + 1) * Win)], &dt.data[size_t(i * H_)]);
    }
    TensorMap in;
    in["x"] = std::move(x), in["Bm"] = std::move(Bm), in["Cm"] = std::move(Cm), in["dt"] = std::move(dt);
    weights(io, in);
    return in;
  }
  // A = -exp(A_log), D, dt_bias.
  static void weights(const LayerIO& io, TensorMap& in) {
    Tensor A = io.t("att.A_log");
    for (float& v : A.data) v = -std::exp(v);
    in["A"] = std::move(A), in["D"] = io.t("att.D"), in["dt_bias"] = io.t("att.dt_bias");
  }

 private:
  int64_t Ei_, H_, G_, N_, P_ = 0, Wc_ = 0, Win_ = 0;
  std::vector<float> zx_, xp_, xc_, xs_, y0_, y1_, y2_, rstd_;
  std::shared_ptr<RunSaved> kept_;  // what the training forward kept for the backward (Call::keep)
  const float* a_ = nullptr;
};

// One token: the packed projection, the conv over the last three inputs, the SSD step, the gated
// norm and the output projection, into preallocated buffers.
class Mamba2Run : public LayerRun {
 public:
  Mamba2Run(const Mamba2Layer& L, const LayerIO& io, const LayerConfig& lc, const TensorMap& state, int64_t index)
      : L_(L), C_(io.t("att.out_proj.weight").dim(0)), win_(io.w("att.in_proj.weight")), cw_(io.w("att.conv.weight")),
        cb_(io.w("att.conv.bias")), nw_(io.w("att.norm.weight")), wout_(io.w("att.out_proj.weight")),
        zx_(size_t(L.Win())), prev_(size_t(3 * L.Wc()), 0.0f), y_(size_t(3 * L.Ei())), rstd_(size_t(L.G())) {
    TensorMap in{{"x", Tensor({1, 1, L.H(), L.P()})},
                 {"dt", Tensor({1, 1, L.H()})},
                 {"Bm", Tensor({1, 1, L.G(), L.N()})},
                 {"Cm", Tensor({1, 1, L.G(), L.N()})}};
    Mamba2Layer::weights(io, in);
    TensorMap own;
    const TensorMap mix = split_layer_state(state, {{"conv", 3 * L.Wc()}}, own, index);
    if (own.count("conv")) prev_ = std::vector<float>(own.at("conv").data);
    mix_ = std::make_unique<MixerStep>(lc, std::move(in), mix);
  }
  void step(const float* a, float* out) override {
    const int64_t Ei = L_.Ei(), Wc = L_.Wc(), GN = L_.G() * L_.N(), H = L_.H();
    nn::matmul_forward(zx_.data(), a, win_, nullptr, 1, C_, L_.Win());
    const float* xbc = zx_.data() + Ei;
    float *x = mix_->buf("x"), *Bm = mix_->buf("Bm"), *Cm = mix_->buf("Cm");
    for (int64_t c = 0; c < Wc; ++c) {  // the conv window: the last 3 inputs, oldest first
      float acc = cb_[c] + cw_[c * 4 + 3] * xbc[c];
      for (int64_t j = 0; j < 3; ++j) acc += cw_[c * 4 + j] * prev_[size_t(j * Wc + c)];
      const float s = silu1(acc);
      if (c < Ei) x[c] = s;
      else if (c < Ei + GN) Bm[c - Ei] = s;
      else Cm[c - Ei - GN] = s;
    }
    std::copy(prev_.begin() + Wc, prev_.end(), prev_.begin());
    std::copy(xbc, xbc + Wc, prev_.end() - Wc);
    std::copy(xbc + Wc, xbc + Wc + H, mix_->buf("dt"));
    float *y0 = y_.data(), *y1 = y0 + Ei, *y2 = y1 + Ei;
    mix_->step(y0);
    gated_norm_row(y0, zx_.data(), nw_, y1, rstd_.data(), y2, Ei, L_.G());
    nn::matmul_forward(out, y2, wout_, nullptr, 1, Ei, C_);
  }
  TensorMap save() const override {
    TensorMap m = mix_->save();
    m["conv"] = tensor_of({int64_t(prev_.size())}, prev_.data());
    return m;
  }

 private:
  const Mamba2Layer& L_;
  int64_t C_;
  const float *win_, *cw_, *cb_, *nw_, *wout_;
  std::vector<float> zx_, prev_, y_, rstd_;
  std::unique_ptr<MixerStep> mix_;
};

std::unique_ptr<LayerRun> Mamba2Layer::start(const LayerIO& io, const TensorMap& state) const {
  return std::make_unique<Mamba2Run>(*this, io, lc_, state, index_);
}

}  // namespace

std::unique_ptr<MixerLayer> mamba2_layer(const ModelConfig& cfg, int64_t index) {
  return std::make_unique<Mamba2Layer>(cfg, index);
}

}  // namespace linmix
