// The attention-like layer (softmax, linear, performer, flow, norm_linear, block_softmax):
//   q, k, v = a Wq^T, a Wk^T, a Wv^T as (B,T,H,D) heads (D = d_model / n_head);
//   y = mixer(q, k, v [, proj]);  out = y Wo^T.
// performer's feature matrix proj (features x D, the layer's knob) is a fixed buffer drawn at init.
#include "layers.h"
#include "linmix/kernels.h"
#include "mixer_layer.h"

namespace linmix {

namespace {

class AttentionLayer : public MixerLayer {
 public:
  using MixerLayer::MixerLayer;

  ParamShapes shapes() const override {
    ParamShapes s;
    for (const char* n : {"att.q.weight", "att.k.weight", "att.v.weight", "att.o.weight"}) s.push_back({n, {C_, C_}});
    if (has_proj()) s.push_back({"att.proj", {cfg_.knob(lc_, "features"), D()}});
    return s;
  }

  bool init(const std::string& name, Tensor& t, InitCtx& ctx) const override {
    if (name != "att.proj") return false;  // orthogonal random features, one draw per layer
    t.data = orthogonal_gaussian_features(t.dim(0), t.dim(1), ctx.seed * 1000003 + static_cast<uint64_t>(index_));
    return true;
  }

  void forward(const LayerIO& io, const float* a, float* out, int64_t B, int64_t T) override {
    const int64_t N = B * T;
    a_ = a;
    q_.resize(N * C_), k_.resize(N * C_), v_.resize(N * C_);
    nn::matmul_forward(q_.data(), a, io.w("att.q.weight"), nullptr, N, C_, C_);
    nn::matmul_forward(k_.data(), a, io.w("att.k.weight"), nullptr, N, C_, C_);
    nn::matmul_forward(v_.data(), a, io.w("att.v.weight"), nullptr, N, C_, C_);
    y_ = mixer_forward(lc_, inputs(io, B, T), cfg_.causal, io.keep ? &kept_ : nullptr).data;
    nn::matmul_forward(out, y_.data(), io.w("att.o.weight"), nullptr, N, C_, C_);
  }

  void backward(const LayerIO& io, const float* dout, float* da, int64_t B, int64_t T) override {
    const int64_t N = B * T;
    std::vector<float> dy(N * C_);
    nn::matmul_backward(dy.data(), io.g("att.o.weight"), nullptr, dout, y_.data(), io.w("att.o.weight"), N, C_, C_);
    const TensorMap g = mixer_backward(lc_, inputs(io, B, T), {B, T, H(), D()}, dy.data(), cfg_.causal, kept_.get());
    kept_.reset();
    nn::matmul_backward(da, io.g("att.q.weight"), nullptr, g.at("dq").ptr(), a_, io.w("att.q.weight"), N, C_, C_, true);
    nn::matmul_backward(da, io.g("att.k.weight"), nullptr, g.at("dk").ptr(), a_, io.w("att.k.weight"), N, C_, C_, true);
    nn::matmul_backward(da, io.g("att.v.weight"), nullptr, g.at("dv").ptr(), a_, io.w("att.v.weight"), N, C_, C_, true);
  }

  std::unique_ptr<LayerRun> start(const LayerIO& io, const TensorMap& state) const override;

 private:
  int64_t H() const { return cfg_.n_head; }
  int64_t D() const { return C_ / cfg_.n_head; }
  bool has_proj() const { return lc_.mixer == "performer"; }
  TensorMap inputs(const LayerIO& io, int64_t B, int64_t T) const {
    TensorMap in{{"q", view_of({B, T, H(), D()}, q_.data())},
                 {"k", view_of({B, T, H(), D()}, k_.data())},
                 {"v", view_of({B, T, H(), D()}, v_.data())}};
    if (has_proj()) in["proj"] = io.t("att.proj");
    return in;
  }
  std::vector<float> q_, k_, v_, y_;
  std::shared_ptr<RunSaved> kept_;  // what the training forward kept for the backward (Call::keep)
  const float* a_ = nullptr;
};

class AttentionRun : public LayerRun {
 public:
  AttentionRun(const LayerIO& io, int64_t C, int64_t H, const LayerConfig& lc, const TensorMap& state, bool proj,
               int64_t index)
      : C_(C), wq_(io.w("att.q.weight")), wk_(io.w("att.k.weight")), wv_(io.w("att.v.weight")),
        wo_(io.w("att.o.weight")), y_(C) {
    TensorMap in{{"q", Tensor({1, 1, H, C / H})}, {"k", Tensor({1, 1, H, C / H})}, {"v", Tensor({1, 1, H, C / H})}};
    if (proj) in["proj"] = io.t("att.proj");
    TensorMap own;
    mix_ = std::make_unique<MixerStep>(lc, std::move(in), split_layer_state(state, {}, own, index));
  }
  void step(const float* a, float* out) override {
    nn::matmul_forward(mix_->buf("q"), a, wq_, nullptr, 1, C_, C_);
    nn::matmul_forward(mix_->buf("k"), a, wk_, nullptr, 1, C_, C_);
    nn::matmul_forward(mix_->buf("v"), a, wv_, nullptr, 1, C_, C_);
    mix_->step(y_.data());
    nn::matmul_forward(out, y_.data(), wo_, nullptr, 1, C_, C_);
  }
  TensorMap save() const override { return mix_->save(); }

 private:
  int64_t C_;
  const float *wq_, *wk_, *wv_, *wo_;
  std::vector<float> y_;
  std::unique_ptr<MixerStep> mix_;
};

std::unique_ptr<LayerRun> AttentionLayer::start(const LayerIO& io, const TensorMap& state) const {
  return std::make_unique<AttentionRun>(io, C_, H(), lc_, state, has_proj(), index_);
}

}  // namespace

std::unique_ptr<MixerLayer> attention_layer(const ModelConfig& cfg, int64_t index) {
  return std::make_unique<AttentionLayer>(cfg, index);
}

}  // namespace linmix
