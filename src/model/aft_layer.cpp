// The AFT layer (aft_full, aft_local, aft_simple, aft_conv): q, k, v = a Wq^T, a Wk^T, a Wv^T as
// (B,T,C) channels; y = mixer(q, k, v [, w | u]); out = y Wo^T. aft_full / aft_local learn the
// pairwise bias w (ctx x ctx), aft_conv the per-head kernels u (n_head x kernel); both start at 0.
#include <cstdint>

#include "layers.h"
#include "mixer_layer.h"

namespace linmix {

namespace {

class AftLayer : public MixerLayer {
 public:
  using MixerLayer::MixerLayer;

  ParamShapes shapes() const override {
    ParamShapes s;
    for (const char* n : {"att.q.weight", "att.k.weight", "att.v.weight", "att.o.weight"}) s.push_back({n, {C_, C_}});
    if (bias_name() == "w") s.push_back({"att.w", {cfg_.ctx, cfg_.ctx}});
    if (bias_name() == "u") s.push_back({"att.u", {cfg_.n_head, cfg_.knob(lc_, "kernel")}});
    return s;
  }

  void forward(const LayerIO& io, const float* a, float* out, int64_t B, int64_t T) override {
    const int64_t N = B * T;
    a_ = a;
    q_.resize(N * C_), k_.resize(N * C_), v_.resize(N * C_);
    nn::matmul_forward(q_.data(), a, io.w("att.q.weight"), nullptr, N, C_, C_);
    nn::matmul_forward(k_.data(), a, io.w("att.k.weight"), nullptr, N, C_, C_);
    nn::matmul_forward(v_.data(), a, io.w("att.v.weight"), nullptr, N, C_, C_);
    y_ = mixer_forward(lc_, inputs(io, B, T), cfg_.causal).data;
    nn::matmul_forward(out, y_.data(), io.w("att.o.weight"), nullptr, N, C_, C_);
  }

  void backward(const LayerIO& io, const float* dout, float* da, int64_t B, int64_t T) override {
    const int64_t N = B * T;
    std::vector<float> dy(N * C_);
    nn::matmul_backward(dy.data(), io.g("att.o.weight"), nullptr, dout, y_.data(), io.w("att.o.weight"), N, C_, C_);
    const TensorMap g = mixer_backward(lc_, inputs(io, B, T), {B, T, C_}, dy.data(), cfg_.causal);
    nn::matmul_backward(da, io.g("att.q.weight"), nullptr, g.at("dq").ptr(), a_, io.w("att.q.weight"), N, C_, C_, true);
    nn::matmul_backward(da, io.g("att.k.weight"), nullptr, g.at("dk").ptr(), a_, io.w("att.k.weight"), N, C_, C_, true);
    nn::matmul_backward(da, io.g("att.v.weight"), nullptr, g.at("dv").ptr(), a_, io.w("att.v.weight"), N, C_, C_, true);
    if (!bias_name().empty()) {
      const Tensor& d = g.at("d" + bias_name());
      float* gb = io.g("att." + bias_name());
      for (int64_t i = 0; i < d.numel(); ++i) gb[i] += d.data[i];
    }
  }

  std::unique_ptr<LayerRun> start(const LayerIO& io, const TensorMap& state) const override;

 private:
  std::string bias_name() const {  // the learned bias input of the variant
    if (lc_.mixer == "aft_full" || lc_.mixer == "aft_local") return "w";
    if (lc_.mixer == "aft_conv") return "u";
    return "";
  }
  TensorMap inputs(const LayerIO& io, int64_t B, int64_t T) const {
    TensorMap in{{"q", view_of({B, T, C_}, q_.data())},
                 {"k", view_of({B, T, C_}, k_.data())},
                 {"v", view_of({B, T, C_}, v_.data())}};
    if (!bias_name().empty()) in[bias_name()] = io.t("att." + bias_name());
    return in;
  }
  std::vector<float> q_, k_, v_, y_;
  const float* a_ = nullptr;
};

class AftRun : public LayerRun {
 public:
  AftRun(const LayerIO& io, int64_t C, const LayerConfig& lc, const TensorMap& state, const std::string& bias,
         int64_t index, int64_t ctx)
      : C_(C), limit_(bias == "w" ? ctx : INT64_MAX), wq_(io.w("att.q.weight")), wk_(io.w("att.k.weight")), wv_(io.w("att.v.weight")),
        wo_(io.w("att.o.weight")), y_(C) {
    TensorMap in{{"q", Tensor({1, 1, C})}, {"k", Tensor({1, 1, C})}, {"v", Tensor({1, 1, C})}};
    if (!bias.empty()) in[bias] = io.t("att." + bias);
    TensorMap own;
    mix_ = std::make_unique<MixerStep>(lc, std::move(in), split_layer_state(state, {}, own, index));
    // the position of the next token (w_ts is read at absolute positions: aft_local keeps it,
    // aft_full's ring holds every past row)
    if (state.count("state.pos")) pos_ = int64_t(state.at("state.pos").data[0]);  // validated by MixerStep
    else if (state.count("state.k") && lc.mixer == "aft_full") pos_ = state.at("state.k").dim(1);
  }
  void step(const float* a, float* out) override {
    LINMIX_CHECK(pos_ < limit_, "position " + std::to_string(pos_) + " is past the model's ctx " +
                                    std::to_string(limit_) + " (the AFT position bias w ends there)");
    ++pos_;
    nn::matmul_forward(mix_->buf("q"), a, wq_, nullptr, 1, C_, C_);
    nn::matmul_forward(mix_->buf("k"), a, wk_, nullptr, 1, C_, C_);
    nn::matmul_forward(mix_->buf("v"), a, wv_, nullptr, 1, C_, C_);
    mix_->step(y_.data());
    nn::matmul_forward(out, y_.data(), wo_, nullptr, 1, C_, C_);
  }
  TensorMap save() const override { return mix_->save(); }

 private:
  int64_t C_, limit_, pos_ = 0;
  const float *wq_, *wk_, *wv_, *wo_;
  std::vector<float> y_;
  std::unique_ptr<MixerStep> mix_;
};

std::unique_ptr<LayerRun> AftLayer::start(const LayerIO& io, const TensorMap& state) const {
  return std::make_unique<AftRun>(io, C_, lc_, state, bias_name(), index_, cfg_.ctx);
}

}  // namespace

std::unique_ptr<MixerLayer> aft_layer(const ModelConfig& cfg, int64_t index) {
  return std::make_unique<AftLayer>(cfg, index);
}

}  // namespace linmix
