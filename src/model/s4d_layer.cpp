// The S4D layer (Gu et al. 2022): y = s4d(a) per channel with state size N (the layer's knob
// "state"), out = gelu(y) Wo^T. A_re = -exp(log_A_re), as S4D parametrises it, so training
// cannot make the SSM unstable. Init (the layer param "init"): "lin", S4D-Lin (A_n = -1/2 +
// i pi n, B = 1), the default, or "legs", S4D-LegS (A_n = -1/2 + i w_n, the eigenvalues of
// HiPPO-LegS's normal part, and B = V^* B_LegS in its eigenbasis, hippo.h); the kernel holds
// B only through C B, so B is folded into C's init (as S4D's own code does): C = C0 B with C0
// complex normal. dt log-uniform in [1e-3, 1e-1].
#include <cmath>

#include "linmix/hippo.h"
#include "layers.h"
#include "mixer_layer.h"

namespace linmix {

namespace {

class S4dLayer : public MixerLayer {
 public:
  using MixerLayer::MixerLayer;

  ParamShapes shapes() const override {
    const int64_t N = cfg_.knob(lc_, "state");
    ParamShapes s{{"att.log_dt", {C_}}, {"att.D", {C_}}, {"att.o.weight", {C_, C_}}};
    for (const char* n : {"att.log_A_re", "att.A_im", "att.C_re", "att.C_im"}) s.push_back({n, {C_, N}});
    return s;
  }

  bool init(const std::string& name, Tensor& t, InitCtx& ctx) const override {
    auto normal = [&](std::mt19937_64&) { return ctx.normal(ctx.rng); };
    auto& rng = ctx.rng;
    if (name == "att.log_dt") {
      for (int64_t c = 0; c < C_; ++c)
        t.data[c] = std::log(1e-3f) + std::log(100.0f) * float(c) / float(std::max<int64_t>(C_ - 1, 1));
    } else if (name == "att.log_A_re") {
      std::fill(t.data.begin(), t.data.end(), std::log(0.5f));
    } else if (name == "att.A_im") {
      const int64_t N = t.dim(1);
      const std::vector<double> w = legs() ? hippo::diagonal_legs(N).w : std::vector<double>();
      for (int64_t r = 0; r < t.dim(0); ++r)
        for (int64_t n = 0; n < N; ++n) t.data[r * N + n] = legs() ? float(w[n]) : 3.14159265f * float(n);
    } else if (name == "att.C_re" || name == "att.C_im") {  // C0; times B in finish_init
      for (float& x : t.data) x = 0.5f * normal(rng);
    } else if (name == "att.D") {
      for (float& x : t.data) x = 1.0f + 0.02f * normal(rng);
    } else {
      return false;
    }
    return true;
  }

  void finish_init(TensorMap& params, const std::string& prefix, std::mt19937_64&) const override {
    if (!legs()) return;
    Tensor& cr = params.at(prefix + "att.C_re");
    Tensor& ci = params.at(prefix + "att.C_im");
    const int64_t N = cr.dim(1);
    const hippo::DiagonalLegs d = hippo::diagonal_legs(N);
    for (int64_t i = 0; i < cr.numel(); ++i) {
      const double re = cr.data[i], im = ci.data[i], br = d.B_re[i % N], bi = d.B_im[i % N];
      cr.data[i] = float(re * br - im * bi);
      ci.data[i] = float(re * bi + im * br);
    }
  }

  void forward(const LayerIO& io, const float* a, float* out, int64_t B, int64_t T) override {
    const int64_t N = B * T;
    a_ = a;
    y_ = mixer_forward(lc_, inputs(io, B, T, a)).data;
    gelu_.resize(N * C_);
    nn::gelu_forward(gelu_.data(), y_.data(), N * C_);
    nn::matmul_forward(out, gelu_.data(), io.w("att.o.weight"), nullptr, N, C_, C_);
  }

  void backward(const LayerIO& io, const float* dout, float* da, int64_t B, int64_t T) override {
    const int64_t N = B * T;
    std::vector<float> dg(N * C_);
    nn::matmul_backward(dg.data(), io.g("att.o.weight"), nullptr, dout, gelu_.data(), io.w("att.o.weight"), N, C_, C_);
    nn::gelu_backward(dg.data(), y_.data(), dg.data(), N * C_);
    const TensorMap in = inputs(io, B, T, a_);
    const TensorMap g = mixer_backward(lc_, in, {B, T, C_}, dg.data());
    const Tensor& du = g.at("du");
    for (int64_t i = 0; i < du.numel(); ++i) da[i] += du.data[i];
    for (const char* n : {"log_dt", "A_im", "C_re", "C_im", "D"}) {
      float* gp = io.g(std::string("att.") + n);
      const Tensor& d = g.at(std::string("d") + n);
      for (int64_t i = 0; i < d.numel(); ++i) gp[i] += d.data[i];
    }
    float* gla = io.g("att.log_A_re");  // A_re = -exp(log_A_re): d log_A_re = dA_re A_re
    for (int64_t i = 0; i < g.at("dA_re").numel(); ++i) gla[i] += g.at("dA_re").data[i] * in.at("A_re").data[i];
  }

  std::unique_ptr<LayerRun> start(const LayerIO& io, const TensorMap& state) const override;

  // The mixer's inputs: u and the SSM's parameters (A_re from log_A_re).
  TensorMap inputs(const LayerIO& io, int64_t B, int64_t T, const float* u) const {
    TensorMap in{{"u", view_of({B, T, C_}, u)}};
    for (const char* n : {"log_dt", "A_im", "C_re", "C_im", "D"}) in[n] = io.t(std::string("att.") + n);
    Tensor A_re = io.t("att.log_A_re");
    for (float& x : A_re.data) x = -std::exp(x);
    in["A_re"] = std::move(A_re);
    return in;
  }

 private:
  bool legs() const {
    auto it = lc_.params.find("init");
    return it != lc_.params.end() && it->second == "legs";
  }
  std::vector<float> y_, gelu_;
  const float* a_ = nullptr;
};

class S4dRun : public LayerRun {
 public:
  S4dRun(const LayerIO& io, int64_t C, const LayerConfig& lc, TensorMap in, const TensorMap& state, int64_t index)
      : C_(C), wo_(io.w("att.o.weight")), y_(C), g_(C) {
    TensorMap own;
    mix_ = std::make_unique<MixerStep>(lc, std::move(in), split_layer_state(state, {}, own, index));
  }
  void step(const float* a, float* out) override {
    std::copy(a, a + C_, mix_->buf("u"));
    mix_->step(y_.data());
    nn::gelu_forward(g_.data(), y_.data(), C_);
    nn::matmul_forward(out, g_.data(), wo_, nullptr, 1, C_, C_);
  }
  TensorMap save() const override { return mix_->save(); }

 private:
  int64_t C_;
  const float* wo_;
  std::vector<float> y_, g_;
  std::unique_ptr<MixerStep> mix_;
};

std::unique_ptr<LayerRun> S4dLayer::start(const LayerIO& io, const TensorMap& state) const {
  const std::vector<float> zero(C_, 0.0f);
  return std::make_unique<S4dRun>(io, C_, lc_, inputs(io, 1, 1, zero.data()), state, index_);
}

}  // namespace

std::unique_ptr<MixerLayer> s4d_layer(const ModelConfig& cfg, int64_t index) {
  return std::make_unique<S4dLayer>(cfg, index);
}

}  // namespace linmix
