// The gated attention unit of FLASH (Hua et al. 2022, sec. 2): with e = expand d_model and the
// shared width S = qk_dim (the layer's knobs), U = silu(a Wu + bu), V = silu(a Wv + bv) (e),
// Z = silu(a Wz + bz) (S); quad_q, quad_k, lin_q, lin_k = Z gamma_j + beta_j;
// O = U * flash(quad_q, quad_k, lin_q, lin_k, V); out = O Wo^T.
#include "layers.h"
#include "mixer_layer.h"

namespace linmix {

namespace {

const char* const kQK[4] = {"quad_q", "quad_k", "lin_q", "lin_k"};

// The four scaled and shifted copies of Z (N rows of S) as the mixer's inputs.
void put_qk(TensorMap& in, const float* Z, const float* gm, const float* bt, int64_t B, int64_t T, int64_t S) {
  for (int j = 0; j < 4; ++j) {
    Tensor& t = in[kQK[j]];
    if (t.numel() != B * T * S) t = Tensor({B, T, S});
    for (int64_t i = 0; i < B * T; ++i)
      for (int64_t x = 0; x < S; ++x) t.data[i * S + x] = Z[i * S + x] * gm[j * S + x] + bt[j * S + x];
  }
}

class GauLayer : public MixerLayer {
 public:
  GauLayer(const ModelConfig& cfg, int64_t index)
      : MixerLayer(cfg, index), S_(cfg.knob(lc_, "qk_dim")), e_(cfg.knob(lc_, "expand") * cfg.d_model) {}

  ParamShapes shapes() const override {
    return {{"att.wu.weight", {e_, C_}}, {"att.wu.bias", {e_}}, {"att.wv.weight", {e_, C_}}, {"att.wv.bias", {e_}},
            {"att.wz.weight", {S_, C_}}, {"att.wz.bias", {S_}}, {"att.gamma", {4, S_}},    {"att.beta", {4, S_}},
            {"att.o.weight", {C_, e_}}};
  }

  bool init(const std::string& name, Tensor& t, InitCtx& ctx) const override {
    if (name == "att.gamma") {
      for (float& x : t.data) x = 1.0f + 0.02f * ctx.normal(ctx.rng);
    } else if (name == "att.beta") {
      std::fill(t.data.begin(), t.data.end(), 0.0f);
    } else {
      return false;
    }
    return true;
  }

  void forward(const LayerIO& io, const float* a, float* out, int64_t B, int64_t T) override {
    const int64_t N = B * T, S = S_, e = e_;
    a_ = a;
    up_.resize(N * e), vp_.resize(N * e), zp_.resize(N * S), U_.resize(N * e), V_.resize(N * e), Z_.resize(N * S);
    nn::matmul_forward(up_.data(), a, io.w("att.wu.weight"), io.w("att.wu.bias"), N, C_, e);
    nn::matmul_forward(vp_.data(), a, io.w("att.wv.weight"), io.w("att.wv.bias"), N, C_, e);
    nn::matmul_forward(zp_.data(), a, io.w("att.wz.weight"), io.w("att.wz.bias"), N, C_, S);
    for (int64_t i = 0; i < N * e; ++i) U_[i] = silu1(up_[i]), V_[i] = silu1(vp_[i]);
    for (int64_t i = 0; i < N * S; ++i) Z_[i] = silu1(zp_[i]);
    y_ = mixer_forward(lc_, inputs(io, B, T), cfg_.causal, io.keep ? &kept_ : nullptr).data;  // (N, e)
    O_.resize(N * e);
    for (int64_t i = 0; i < N * e; ++i) O_[i] = U_[i] * y_[i];
    nn::matmul_forward(out, O_.data(), io.w("att.o.weight"), nullptr, N, e, C_);
  }

  void backward(const LayerIO& io, const float* dout, float* da, int64_t B, int64_t T) override {
    const int64_t N = B * T, S = S_, e = e_;
    std::vector<float> dO(N * e), dU(N * e), dA(N * e), dZ(N * S, 0.0f);
    nn::matmul_backward(dO.data(), io.g("att.o.weight"), nullptr, dout, O_.data(), io.w("att.o.weight"), N, e, C_);
    for (int64_t i = 0; i < N * e; ++i) dU[i] = dO[i] * y_[i], dA[i] = dO[i] * U_[i];
    const TensorMap g = mixer_backward(lc_, inputs(io, B, T), {B, T, e}, dA.data(), cfg_.causal, kept_.get());
    kept_.reset();
    const float* gm = io.w("att.gamma");
    float *ggm = io.g("att.gamma"), *gbt = io.g("att.beta");
    for (int j = 0; j < 4; ++j) {
      const float* dq = g.at(std::string("d") + kQK[j]).ptr();
      for (int64_t i = 0; i < N; ++i)
        for (int64_t x = 0; x < S; ++x) {
          dZ[i * S + x] += dq[i * S + x] * gm[j * S + x];
          ggm[j * S + x] += dq[i * S + x] * Z_[i * S + x];
          gbt[j * S + x] += dq[i * S + x];
        }
    }
    std::vector<float> dV(g.at("dv").data);
    for (int64_t i = 0; i < N * e; ++i) dU[i] *= dsilu1(up_[i]), dV[i] *= dsilu1(vp_[i]);
    for (int64_t i = 0; i < N * S; ++i) dZ[i] *= dsilu1(zp_[i]);
    nn::matmul_backward(da, io.g("att.wu.weight"), io.g("att.wu.bias"), dU.data(), a_, io.w("att.wu.weight"), N, C_, e, true);
    nn::matmul_backward(da, io.g("att.wv.weight"), io.g("att.wv.bias"), dV.data(), a_, io.w("att.wv.weight"), N, C_, e, true);
    nn::matmul_backward(da, io.g("att.wz.weight"), io.g("att.wz.bias"), dZ.data(), a_, io.w("att.wz.weight"), N, C_, S, true);
  }

  std::unique_ptr<LayerRun> start(const LayerIO& io, const TensorMap& state) const override;

 private:
  TensorMap inputs(const LayerIO& io, int64_t B, int64_t T) const {
    TensorMap in{{"v", view_of({B, T, e_}, V_.data())}};
    put_qk(in, Z_.data(), io.w("att.gamma"), io.w("att.beta"), B, T, S_);
    return in;
  }
  int64_t S_, e_;
  std::vector<float> up_, vp_, zp_, U_, V_, Z_, y_, O_;
  std::shared_ptr<RunSaved> kept_;  // what the training forward kept for the backward (Call::keep)
  const float* a_ = nullptr;
  friend class GauRun;
};

class GauRun : public LayerRun {
 public:
  GauRun(const LayerIO& io, int64_t C, int64_t S, int64_t e, const LayerConfig& lc, const TensorMap& state,
         int64_t index)
      : C_(C), S_(S), e_(e), wu_(io.w("att.wu.weight")), bu_(io.w("att.wu.bias")), wv_(io.w("att.wv.weight")),
        bv_(io.w("att.wv.bias")), wz_(io.w("att.wz.weight")), bz_(io.w("att.wz.bias")), gm_(io.w("att.gamma")),
        bt_(io.w("att.beta")), wo_(io.w("att.o.weight")), U_(e), Z_(S), A_(e) {
    TensorMap in{{"v", Tensor({1, 1, e})}};
    for (const char* n : kQK) in[n] = Tensor({1, 1, S});
    TensorMap own;
    mix_ = std::make_unique<MixerStep>(lc, std::move(in), split_layer_state(state, {}, own, index));
  }
  void step(const float* a, float* out) override {
    float* V = mix_->buf("v");
    nn::matmul_forward(U_.data(), a, wu_, bu_, 1, C_, e_);
    nn::matmul_forward(V, a, wv_, bv_, 1, C_, e_);
    nn::matmul_forward(Z_.data(), a, wz_, bz_, 1, C_, S_);
    for (float& x : U_) x = silu1(x);
    for (int64_t i = 0; i < e_; ++i) V[i] = silu1(V[i]);
    for (float& x : Z_) x = silu1(x);
    for (int j = 0; j < 4; ++j) {
      float* q = mix_->buf(kQK[j]);
      for (int64_t x = 0; x < S_; ++x) q[x] = Z_[x] * gm_[j * S_ + x] + bt_[j * S_ + x];
    }
    mix_->step(A_.data());
    for (int64_t i = 0; i < e_; ++i) U_[i] *= A_[i];
    nn::matmul_forward(out, U_.data(), wo_, nullptr, 1, e_, C_);
  }
  TensorMap save() const override { return mix_->save(); }

 private:
  int64_t C_, S_, e_;
  const float *wu_, *bu_, *wv_, *bv_, *wz_, *bz_, *gm_, *bt_, *wo_;
  std::vector<float> U_, Z_, A_;
  std::unique_ptr<MixerStep> mix_;
};

std::unique_ptr<LayerRun> GauLayer::start(const LayerIO& io, const TensorMap& state) const {
  return std::make_unique<GauRun>(io, C_, S_, e_, lc_, state, index_);
}

}  // namespace

std::unique_ptr<MixerLayer> gau_layer(const ModelConfig& cfg, int64_t index) {
  return std::make_unique<GauLayer>(cfg, index);
}

}  // namespace linmix
