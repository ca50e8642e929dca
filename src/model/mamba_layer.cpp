// The Mamba block (Gu & Dao 2023, Fig. 3), inner width Ei = expand d_model, state size N and
// dt rank R = ceil(d_model / 16): [x, z] = a W_in; x = silu(conv4(x)) (causal, depthwise, kernel
// 4); [dt_r, Bm, Cm] = x W_x; delta = dt_r W_dt; y = selective_scan(x, delta, A = -exp(A_log),
// Bm, Cm, D, z, dt bias); out = y W_out. Its recurrent state: the scan's h and the last three
// conv inputs ("conv", (3, Ei) oldest first).
// Init as mamba_ssm's: A = -(1..N), D = 1, dt_proj.bias = softplus^-1(dt) with dt log-uniform
// in [1e-3, 1e-1] (floored at 1e-4), so that the scan starts with memories of 10 to 1000
// tokens (a zero bias, the model's rule for biases, gives dt = 0.69: a memory of about a token).
#include <cmath>

#include "layers.h"
#include "mixer_layer.h"

namespace linmix {

namespace {

class MambaLayer : public MixerLayer {
 public:
  MambaLayer(const ModelConfig& cfg, int64_t index)
      : MixerLayer(cfg, index), Ei_(cfg.knob(lc_, "expand") * cfg.d_model), N_(cfg.knob(lc_, "state")),
        R_(lc_.params.count("dt_rank") ? cfg.knob(lc_, "dt_rank") : (cfg.d_model + 15) / 16) {}

  ParamShapes shapes() const override {
    return {{"att.in_proj.weight", {2 * Ei_, C_}}, {"att.conv.weight", {Ei_, 4}},    {"att.conv.bias", {Ei_}},
            {"att.x_proj.weight", {R_ + 2 * N_, Ei_}}, {"att.dt_proj.weight", {Ei_, R_}}, {"att.dt_proj.bias", {Ei_}},
            {"att.A_log", {Ei_, N_}},                {"att.D", {Ei_}},                {"att.out_proj.weight", {C_, Ei_}}};
  }

  bool init(const std::string& name, Tensor& t, InitCtx& ctx) const override {
    if (name == "att.A_log") {  // A = -(1..N)
      for (int64_t r = 0; r < t.dim(0); ++r)
        for (int64_t n = 0; n < t.dim(1); ++n) t.data[r * t.dim(1) + n] = std::log(float(n + 1));
    } else if (name == "att.D") {
      for (float& x : t.data) x = 1.0f + 0.02f * ctx.normal(ctx.rng);
    } else if (name == "att.conv.weight") {
      for (float& x : t.data) x = 0.3f * ctx.normal(ctx.rng);
    } else {
      return false;
    }
    return true;
  }

  void finish_init(TensorMap& params, const std::string& prefix, std::mt19937_64& rng) const override {
    std::uniform_real_distribution<float> u01(0.0f, 1.0f);
    for (float& x : params.at(prefix + "att.dt_proj.bias").data) {
      const float dt = std::max(std::exp(std::log(1e-3f) + std::log(100.0f) * u01(rng)), 1e-4f);
      x = dt + std::log(-std::expm1(-dt));
    }
  }

  void forward(const LayerIO& io, const float* a, float* out, int64_t B, int64_t T) override {
    const int64_t NR = B * T, Ei = Ei_, N = N_, R = R_;
    a_ = a;
    xz_.resize(NR * 2 * Ei), xp_.resize(NR * Ei), xc_.resize(NR * Ei), xs_.resize(NR * Ei), z_.resize(NR * Ei);
    dbc_.resize(NR * (R + 2 * N)), dtr_.resize(NR * R), delta_.resize(NR * Ei);
    nn::matmul_forward(xz_.data(), a, io.w("att.in_proj.weight"), nullptr, NR, C_, 2 * Ei);
    for (int64_t i = 0; i < NR; ++i) {
      std::copy(&xz_[i * 2 * Ei], &xz_[i * 2 * Ei] + Ei, &xp_[i * Ei]);
      std::copy(&xz_[i * 2 * Ei] + Ei, &xz_[(i + 1) * 2 * Ei], &z_[i * Ei]);
    }
    nn::conv4_forward(xc_.data(), xp_.data(), io.w("att.conv.weight"), io.w("att.conv.bias"), B, T, Ei);
    {
      float* xs = xs_.data();  // (pointers, not the members: the loop then vectorises)
      const float* xc = xc_.data();
#pragma omp parallel for simd schedule(static) if (NR * Ei >= nn::kParallelMin)
      for (int64_t i = 0; i < NR * Ei; ++i) xs[i] = silu1(xc[i]);
    }
    nn::matmul_forward(dbc_.data(), xs_.data(), io.w("att.x_proj.weight"), nullptr, NR, Ei, R + 2 * N);
    for (int64_t i = 0; i < NR; ++i) std::copy(&dbc_[i * (R + 2 * N)], &dbc_[i * (R + 2 * N)] + R, &dtr_[i * R]);
    nn::matmul_forward(delta_.data(), dtr_.data(), io.w("att.dt_proj.weight"), nullptr, NR, R, Ei);
    y_ = mixer_forward(lc_, inputs(io, B, T)).data;
    nn::matmul_forward(out, y_.data(), io.w("att.out_proj.weight"), nullptr, NR, Ei, C_);
  }

  void backward(const LayerIO& io, const float* dout, float* da, int64_t B, int64_t T) override {
    const int64_t NR = B * T, Ei = Ei_, N = N_, R = R_;
    std::vector<float> dy(NR * Ei);
    nn::matmul_backward(dy.data(), io.g("att.out_proj.weight"), nullptr, dout, y_.data(), io.w("att.out_proj.weight"),
                        NR, Ei, C_);
    const TensorMap in = inputs(io, B, T);
    const TensorMap g = mixer_backward(lc_, in, {B, T, Ei}, dy.data());
    float *gal = io.g("att.A_log"), *gD = io.g("att.D"), *gb = io.g("att.dt_proj.bias");
    const Tensor& dA = g.at("dA");
    for (int64_t i = 0; i < dA.numel(); ++i) gal[i] += dA.data[i] * in.at("A").data[i];  // A = -exp(A_log)
    for (int64_t i = 0; i < Ei; ++i) gD[i] += g.at("dD").data[i], gb[i] += g.at("ddelta_bias").data[i];
    std::vector<float> ddtr(NR * R), ddbc(NR * (R + 2 * N)), dxs(g.at("du").data), dxz(NR * 2 * Ei, 0.0f);
    nn::matmul_backward(ddtr.data(), io.g("att.dt_proj.weight"), nullptr, g.at("ddelta").ptr(), dtr_.data(),
                        io.w("att.dt_proj.weight"), NR, R, Ei);
    const float *dBm = g.at("dBm").ptr(), *dCm = g.at("dCm").ptr(), *dz = g.at("dz").ptr();
    for (int64_t i = 0; i < NR; ++i) {
      float* row = &ddbc[i * (R + 2 * N)];
      std::copy(&ddtr[i * R], &ddtr[i * R] + R, row);
      std::copy(dBm + i * N, dBm + (i + 1) * N, row + R);
      std::copy(dCm + i * N, dCm + (i + 1) * N, row + R + N);
    }
    nn::matmul_backward(dxs.data(), io.g("att.x_proj.weight"), nullptr, ddbc.data(), xs_.data(),
                        io.w("att.x_proj.weight"), NR, Ei, R + 2 * N, true);
    std::vector<float> dxc(NR * Ei), dxp(NR * Ei, 0.0f);
    {
      float* d = dxc.data();
      const float *ds = dxs.data(), *xc = xc_.data();
#pragma omp parallel for simd schedule(static) if (NR * Ei >= nn::kParallelMin)
      for (int64_t i = 0; i < NR * Ei; ++i) d[i] = ds[i] * dsilu1(xc[i]);
    }
    nn::conv4_backward(dxp.data(), io.g("att.conv.weight"), io.g("att.conv.bias"), dxc.data(), xp_.data(),
                   io.w("att.conv.weight"), B, T, Ei);
    for (int64_t i = 0; i < NR; ++i) {
      std::copy(&dxp[i * Ei], &dxp[(i + 1) * Ei], &dxz[i * 2 * Ei]);
      std::copy(dz + i * Ei, dz + (i + 1) * Ei, &dxz[i * 2 * Ei + Ei]);
    }
    nn::matmul_backward(da, io.g("att.in_proj.weight"), nullptr, dxz.data(), a_, io.w("att.in_proj.weight"), NR, C_,
                        2 * Ei, true);
  }

  std::unique_ptr<LayerRun> start(const LayerIO& io, const TensorMap& state) const override;

  // The scan's inputs: u = xs, delta, z, Bm and Cm out of dbc, A = -exp(A_log), D, dt bias.
  TensorMap inputs(const LayerIO& io, int64_t B, int64_t T) const {
    const int64_t N = N_, R = R_, NR = B * T;
    TensorMap in{{"u", view_of({B, T, Ei_}, xs_.data())},
                 {"delta", view_of({B, T, Ei_}, delta_.data())},
                 {"z", view_of({B, T, Ei_}, z_.data())}};
    Tensor Bm({B, T, N}), Cm({B, T, N});
    for (int64_t i = 0; i < NR; ++i)
      for (int64_t n = 0; n < N; ++n) {
        Bm.data[i * N + n] = dbc_[i * (R + 2 * N) + R + n];
        Cm.data[i * N + n] = dbc_[i * (R + 2 * N) + R + N + n];
      }
    in["Bm"] = std::move(Bm), in["Cm"] = std::move(Cm);
    in["A"] = neg_exp(io.t("att.A_log"));
    in["D"] = io.t("att.D");
    in["delta_bias"] = io.t("att.dt_proj.bias");
    return in;
  }
  static Tensor neg_exp(Tensor t) {
    for (float& x : t.data) x = -std::exp(x);
    return t;
  }

 private:
  int64_t Ei_, N_, R_;
  std::vector<float> xz_, xp_, xc_, xs_, z_, dbc_, dtr_, delta_, y_;
  const float* a_ = nullptr;
};

class MambaRun : public LayerRun {
 public:
  MambaRun(const LayerIO& io, int64_t C, int64_t Ei, int64_t N, int64_t R, const LayerConfig& lc,
           const TensorMap& state, int64_t index)
      : C_(C), Ei_(Ei), N_(N), R_(R), win_(io.w("att.in_proj.weight")), cw_(io.w("att.conv.weight")),
        cb_(io.w("att.conv.bias")), wx_(io.w("att.x_proj.weight")), wdt_(io.w("att.dt_proj.weight")),
        wout_(io.w("att.out_proj.weight")), xz_(2 * Ei), prev_(3 * Ei, 0.0f), dbc_(R + 2 * N), y_(Ei) {
    TensorMap in{{"u", Tensor({1, 1, Ei})}, {"delta", Tensor({1, 1, Ei})}, {"z", Tensor({1, 1, Ei})},
                 {"Bm", Tensor({1, 1, N})}, {"Cm", Tensor({1, 1, N})},     {"A", MambaLayer::neg_exp(io.t("att.A_log"))},
                 {"D", io.t("att.D")},      {"delta_bias", io.t("att.dt_proj.bias")}};
    TensorMap own;
    const TensorMap mix = split_layer_state(state, {{"conv", 3 * Ei}}, own, index);
    if (own.count("conv")) prev_ = std::vector<float>(own.at("conv").data);
    mix_ = std::make_unique<MixerStep>(lc, std::move(in), mix);
  }
  void step(const float* a, float* out) override {
    const int64_t Ei = Ei_, N = N_, R = R_;
    nn::matmul_forward(xz_.data(), a, win_, nullptr, 1, C_, 2 * Ei);
    float* xs = mix_->buf("u");
    for (int64_t c = 0; c < Ei; ++c) {  // the conv window: the last 3 inputs, oldest first
      float acc = cb_[c] + cw_[c * 4 + 3] * xz_[c];
      for (int64_t j = 0; j < 3; ++j) acc += cw_[c * 4 + j] * prev_[j * Ei + c];
      xs[c] = silu1(acc);
    }
    std::copy(prev_.begin() + Ei, prev_.end(), prev_.begin());
    std::copy(xz_.begin(), xz_.begin() + Ei, prev_.begin() + 2 * Ei);
    std::copy(xz_.begin() + Ei, xz_.end(), mix_->buf("z"));
    nn::matmul_forward(dbc_.data(), xs, wx_, nullptr, 1, Ei, R + 2 * N);
    nn::matmul_forward(mix_->buf("delta"), dbc_.data(), wdt_, nullptr, 1, R, Ei);
    std::copy(dbc_.begin() + R, dbc_.begin() + R + N, mix_->buf("Bm"));
    std::copy(dbc_.begin() + R + N, dbc_.end(), mix_->buf("Cm"));
    mix_->step(y_.data());
    nn::matmul_forward(out, y_.data(), wout_, nullptr, 1, Ei, C_);
  }
  TensorMap save() const override {
    TensorMap m = mix_->save();
    m["conv"] = tensor_of({3 * Ei_}, prev_.data());
    return m;
  }

 private:
  int64_t C_, Ei_, N_, R_;
  const float *win_, *cw_, *cb_, *wx_, *wdt_, *wout_;
  std::vector<float> xz_, prev_, dbc_, y_;
  std::unique_ptr<MixerStep> mix_;
};

std::unique_ptr<LayerRun> MambaLayer::start(const LayerIO& io, const TensorMap& state) const {
  return std::make_unique<MambaRun>(io, C_, Ei_, N_, R_, lc_, state, index_);
}

}  // namespace

std::unique_ptr<MixerLayer> mamba_layer(const ModelConfig& cfg, int64_t index) {
  return std::make_unique<MambaLayer>(cfg, index);
}

}  // namespace linmix
