// The FNet layer (Lee-Thorp et al. 2022): out = Re(DFT over T of DFT over C of a), no parameters;
// the block's channel mix does the learning. Non-causal only: a layer of the encoder classifier.
#include "mixer_layer.h"

namespace linmix {

namespace {

class FnetLayer : public MixerLayer {
 public:
  using MixerLayer::MixerLayer;

  ParamShapes shapes() const override { return {}; }

  void forward(const LayerIO& io, const float* a, float* out, int64_t B, int64_t T) override {
    (void)io;
    const Tensor y = mixer_forward(lc_, {{"x", view_of({B, T, C_}, a)}}, false);
    std::copy(y.data.begin(), y.data.end(), out);
  }

  void backward(const LayerIO& io, const float* dout, float* da, int64_t B, int64_t T) override {
    (void)io;
    const TensorMap g = mixer_backward(lc_, {{"x", Tensor({B, T, C_})}}, {B, T, C_}, dout, false);
    const Tensor& dx = g.at("dx");
    for (int64_t i = 0; i < dx.numel(); ++i) da[i] += dx.data[i];
  }

  std::unique_ptr<LayerRun> start(const LayerIO& io, const TensorMap& state) const override {
    (void)io, (void)state;
    throw Error("mixer 'fnet' has no recurrent form (it mixes the whole sequence at once)");
  }
};

}  // namespace

std::unique_ptr<MixerLayer> fnet_layer(const ModelConfig& cfg, int64_t index) {
  return std::make_unique<FnetLayer>(cfg, index);
}

}  // namespace linmix
