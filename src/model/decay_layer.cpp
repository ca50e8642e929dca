// The layer of the eight decaying / delta-rule mechanisms (retention, gla, deltanet,
// gated_deltanet, rwkv5, rwkv6, rwkv7, mamba2), in one recipe-driven form:
//   every per-token input of the mixer = map(a W^T (+ b)), a learned projection of the block's
//   normalised input a through the map that puts it in the mechanism's domain;
//   every per-head weight = map(raw) of a learned raw parameter, or fixed (RetNet's gammas);
//   y = mixer(...) (B,T,H,E);  out = y Wo^T.
// Heads of D = E = d_model / n_head (mamba2: E = d_model / n_head, N = the "state" knob, one group).
// RWKV-7's a, b come from two projections: kk = l2norm(a Wkk^T) per head, a = -kk,
// b = kk o sigmoid(a Wiclr^T) (its in-context learning rate), as in the RWKV-7 model.
// What the papers' layers add on top (short convolutions, token shift and LoRA mixes, GroupNorm /
// RMSNorm and output gates) is not in this form yet (docs: issue 13's note).
#include <cmath>
#include <map>

#include "layers.h"
#include "mixer_layer.h"

namespace linmix {

namespace {

enum class Map { Id, Sigmoid, LogSig16, NegExp, Rwkv7Decay };

float map_f(Map m, float x) {
  switch (m) {
    case Map::Id: return x;
    case Map::Sigmoid: return 1.0f / (1.0f + std::exp(-x));
    case Map::LogSig16: return -(x > 20.0f ? std::exp(-x) : std::log1p(std::exp(-x))) / 16.0f;
    case Map::NegExp: return -std::exp(x);
    case Map::Rwkv7Decay: return -std::exp(-0.5f) / (1.0f + std::exp(-x));
  }
  return x;
}
float map_df(Map m, float x) {  // d map / dx
  const float s = 1.0f / (1.0f + std::exp(-x));
  switch (m) {
    case Map::Id: return 1.0f;
    case Map::Sigmoid: return s * (1.0f - s);
    case Map::LogSig16: return (1.0f - s) / 16.0f;
    case Map::NegExp: return -std::exp(x);
    case Map::Rwkv7Decay: return -std::exp(-0.5f) * s * (1.0f - s);
  }
  return 1.0f;
}

struct Proj {  // a per-token input: its projection (with a bias initialised to bias0 when has_bias)
  std::string input;
  Map map;
  bool has_bias = false;
  float bias0 = 0.0f;
};
enum class Init { Zero, One, Normal, RetnetGamma, DecaySpread, MambaALog, MambaDtBias };
struct Weight {  // a per-head weight input: map(raw), raw learned (or fixed: computed, not a parameter)
  std::string input;
  Map map;
  Init init;
  bool learned = true;
};
struct Recipe {
  std::vector<Proj> proj;
  std::vector<Weight> weights;
  bool rwkv7_ab = false;  // a, b from the kk and iclr projections
};

const std::map<std::string, Recipe>& recipes() {
  static const std::map<std::string, Recipe> r = {
      {"retention", {{{"q", Map::Id}, {"k", Map::Id}, {"v", Map::Id}}, {{"gamma", Map::Id, Init::RetnetGamma, false}}}},
      {"gla", {{{"q", Map::Id}, {"k", Map::Id}, {"v", Map::Id}, {"g", Map::LogSig16, true, 0.0f}}, {}}},
      {"deltanet", {{{"q", Map::Id}, {"k", Map::Id}, {"v", Map::Id}, {"beta", Map::Sigmoid, true, 0.0f}}, {}}},
      {"gated_deltanet",
       {{{"q", Map::Id}, {"k", Map::Id}, {"v", Map::Id}, {"beta", Map::Sigmoid, true, 0.0f}, {"g", Map::LogSig16, true, 0.0f}},
        {}}},
      {"rwkv5",
       {{{"r", Map::Id}, {"k", Map::Id}, {"v", Map::Id}},
        {{"w", Map::NegExp, Init::DecaySpread}, {"u", Map::Id, Init::Normal}}}},
      {"rwkv6",
       {{{"r", Map::Id}, {"k", Map::Id}, {"v", Map::Id}, {"w", Map::NegExp, true, -3.0f}}, {{"u", Map::Id, Init::Normal}}}},
      {"rwkv7",
       {{{"r", Map::Id}, {"w", Map::Rwkv7Decay, true, 0.0f}, {"k", Map::Id}, {"v", Map::Id}, {"kk", Map::Id},
         {"iclr", Map::Id, true, 0.0f}},
        {},
        true}},
      {"mamba2",
       {{{"x", Map::Id}, {"dt", Map::Id}, {"Bm", Map::Id}, {"Cm", Map::Id}, {"z", Map::Id}},
        {{"A", Map::NegExp, Init::MambaALog}, {"D", Map::Id, Init::One}, {"dt_bias", Map::Id, Init::MambaDtBias}}}},
  };
  return r;
}

class DecayLayer : public MixerLayer {
 public:
  DecayLayer(const ModelConfig& cfg, int64_t index)
      : MixerLayer(cfg, index), r_(recipes().at(lc_.mixer)), spec_(find_mixer(lc_.mixer)) {}

  int64_t H() const { return cfg_.n_head; }
  int64_t Dh() const { return C_ / cfg_.n_head; }
  // The per-token shape (after B, T) of a projected input, and its width.
  std::vector<int64_t> row_shape(const std::string& input) const {
    if (input == "kk" || input == "iclr") return {H(), Dh()};
    for (const auto& ts : spec_.inputs)
      if (ts.name == input) {
        std::vector<int64_t> s;
        std::string dims = ts.dims.substr(4);  // after "B,T,"
        size_t at = 0;
        while (at <= dims.size()) {
          const size_t comma = dims.find(',', at);
          const std::string d = dims.substr(at, comma == std::string::npos ? std::string::npos : comma - at);
          s.push_back(d == "H" ? H() : d == "G" ? 1 : d == "N" ? cfg_.knob(lc_, "state") : Dh());
          if (comma == std::string::npos) break;
          at = comma + 1;
        }
        return s;
      }
    throw Error("decay layer: no input '" + input + "'");
  }
  int64_t width(const std::string& input) const { return numel_of(row_shape(input)); }
  std::vector<int64_t> weight_shape(const std::string& input) const {
    for (const auto& ts : spec_.inputs)
      if (ts.name == input) return ts.dims == "H" ? std::vector<int64_t>{H()} : std::vector<int64_t>{H(), Dh()};
    throw Error("decay layer: no weight '" + input + "'");
  }

  ParamShapes shapes() const override {
    ParamShapes s;
    for (const Proj& p : r_.proj) {
      s.push_back({"att." + p.input + ".weight", {width(p.input), C_}});
      if (p.has_bias) s.push_back({"att." + p.input + ".bias", {width(p.input)}});
    }
    for (const Weight& w : r_.weights)
      if (w.learned) s.push_back({"att." + w.input, weight_shape(w.input)});
    s.push_back({"att.o.weight", {C_, C_}});
    return s;
  }

  bool init(const std::string& name, Tensor& t, InitCtx& ctx) const override {
    for (const Proj& p : r_.proj)
      if (p.has_bias && name == "att." + p.input + ".bias") {
        std::fill(t.data.begin(), t.data.end(), p.bias0);
        return true;
      }
    for (const Weight& w : r_.weights)
      if (name == "att." + w.input) {
        fill_weight(w.init, t, &ctx);
        return true;
      }
    return false;
  }

  void forward(const LayerIO& io, const float* a, float* out, int64_t B, int64_t T) override {
    a_ = a;
    raw_.clear();
    const TensorMap in = inputs(io, a, B, T, &raw_);
    y_ = mixer_forward(lc_, in).data;
    nn::matmul_forward(out, y_.data(), io.w("att.o.weight"), nullptr, B * T, C_, C_);
  }

  void backward(const LayerIO& io, const float* dout, float* da, int64_t B, int64_t T) override {
    const int64_t N = B * T;
    std::vector<float> dy(N * C_);
    nn::matmul_backward(dy.data(), io.g("att.o.weight"), nullptr, dout, y_.data(), io.w("att.o.weight"), N, C_, C_);
    const TensorMap in = inputs(io, a_, B, T, nullptr);
    const std::vector<int64_t> yshape{B, T, H(), Dh()};
    const TensorMap g = mixer_backward(lc_, in, yshape, dy.data());
    std::map<std::string, std::vector<float>> dmapped;  // d(mapped input) per projected input
    for (const Proj& p : r_.proj)
      if (g.count("d" + p.input)) dmapped[p.input] = g.at("d" + p.input).data;
    if (r_.rwkv7_ab) rwkv7_ab_backward(dmapped, g, N);
    for (const Proj& p : r_.proj) {
      const std::vector<float>& raw = raw_.at(p.input);
      std::vector<float> d = dmapped.at(p.input);
      for (size_t i = 0; i < d.size(); ++i) d[i] *= map_df(p.map, raw[i]);
      const int64_t W = width(p.input);
      nn::matmul_backward(da, io.g("att." + p.input + ".weight"), p.has_bias ? io.g("att." + p.input + ".bias") : nullptr,
                          d.data(), a_, io.w("att." + p.input + ".weight"), N, C_, W, true);
    }
    for (const Weight& w : r_.weights) {
      if (!w.learned || !g.count("d" + w.input)) continue;
      const Tensor& raw = io.t("att." + w.input);
      const Tensor& d = g.at("d" + w.input);
      float* gp = io.g("att." + w.input);
      for (int64_t i = 0; i < d.numel(); ++i) gp[i] += d.data[i] * map_df(w.map, raw.data[i]);
    }
  }

  std::unique_ptr<LayerRun> start(const LayerIO& io, const TensorMap& state) const override;

  // The mixer's inputs for (B,T) rows of a: the projections through their maps (the raw
  // projections into *raw when given), the weights, rwkv7's a and b.
  TensorMap inputs(const LayerIO& io, const float* a, int64_t B, int64_t T,
                   std::map<std::string, std::vector<float>>* raw_out) const {
    const int64_t N = B * T;
    TensorMap in;
    std::map<std::string, std::vector<float>> mapped;
    for (const Proj& p : r_.proj) {
      const int64_t W = width(p.input);
      std::vector<float> raw(size_t(N * W));
      nn::matmul_forward(raw.data(), a, io.w("att." + p.input + ".weight"),
                         p.has_bias ? io.w("att." + p.input + ".bias") : nullptr, N, C_, W);
      std::vector<float> m(raw.size());
      for (size_t i = 0; i < raw.size(); ++i) m[i] = map_f(p.map, raw[i]);
      mapped[p.input] = std::move(m);
      if (raw_out) (*raw_out)[p.input] = std::move(raw);
    }
    if (r_.rwkv7_ab) rwkv7_ab(mapped, N);
    for (auto& [name, m] : mapped) {
      if (name == "kk" || name == "iclr") continue;
      std::vector<int64_t> shape{B, T};
      for (int64_t d : row_shape(name)) shape.push_back(d);
      Tensor t(shape);
      t.data = std::move(m);
      in[name] = std::move(t);
    }
    for (const Weight& w : r_.weights) in[w.input] = weight_value(io, w);
    return in;
  }

  Tensor weight_value(const LayerIO& io, const Weight& w) const {
    Tensor t(weight_shape(w.input));
    if (!w.learned) {
      fill_weight(w.init, t, nullptr);
      return t;
    }
    const Tensor& raw = io.t("att." + w.input);
    for (int64_t i = 0; i < t.numel(); ++i) t.data[i] = map_f(w.map, raw.data[i]);
    return t;
  }

  void fill_weight(Init init, Tensor& t, InitCtx* ctx) const {
    const int64_t n = t.numel();
    for (int64_t i = 0; i < n; ++i) {
      const int64_t h = t.rank() == 1 ? i : i / t.dim(1);
      const float frac = float(h) / float(std::max<int64_t>(H() - 1, 1));
      float v = 0.0f;
      switch (init) {
        case Init::Zero: v = 0.0f; break;
        case Init::One: v = 1.0f; break;
        case Init::Normal: v = ctx ? 0.5f * ctx->normal(ctx->rng) : 0.0f; break;
        case Init::RetnetGamma: v = 1.0f - std::exp2(-5.0f - float(h)); break;  // RetNet: 1 - 2^(-5-h)
        case Init::DecaySpread: v = -6.0f + 5.0f * frac; break;                  // w = -exp(v): slow to fast heads
        case Init::MambaALog: v = std::log(1.0f + 15.0f * frac); break;          // A = -(1 .. 16)
        case Init::MambaDtBias: {  // softplus^-1 of dt log-spaced in [1e-3, 1e-1]
          const float dt = std::exp(std::log(1e-3f) + std::log(100.0f) * frac);
          v = dt + std::log(-std::expm1(-dt));
          break;
        }
      }
      t.data[size_t(i)] = v;
    }
  }

  // rwkv7: a = -kk, b = kk o sigmoid(iclr), kk = l2norm(kk raw) per head, for `rows` rows of
  // H heads (kr, ic: the raw kk and iclr projections).
  void rwkv7_ab_rows(float* av, float* bv, const float* kr, const float* ic, int64_t rows) const {
    const int64_t D = Dh();
    for (int64_t row = 0; row < rows * H(); ++row) {
      float s = 1e-6f;
      for (int64_t d = 0; d < D; ++d) s += kr[row * D + d] * kr[row * D + d];
      const float inv = 1.0f / std::sqrt(s);
      for (int64_t d = 0; d < D; ++d) {
        const int64_t o = row * D + d;
        const float kk = kr[o] * inv;
        av[o] = -kk, bv[o] = kk / (1.0f + std::exp(-ic[o]));
      }
    }
  }
  void rwkv7_ab(std::map<std::string, std::vector<float>>& mapped, int64_t N) const {
    const std::vector<float>& kr = mapped.at("kk");
    std::vector<float> av(kr.size()), bv(kr.size());
    rwkv7_ab_rows(av.data(), bv.data(), kr.data(), mapped.at("iclr").data(), N);
    mapped["a"] = std::move(av), mapped["b"] = std::move(bv);
  }
  void rwkv7_ab_backward(std::map<std::string, std::vector<float>>& dmapped, const TensorMap& g, int64_t N) const {
    const int64_t Hh = H(), D = Dh();
    const std::vector<float>& kr = raw_.at("kk");
    const std::vector<float>& ic = raw_.at("iclr");
    const std::vector<float>&da = g.at("da").data, &db = g.at("db").data;
    std::vector<float> dkr(kr.size()), dic(kr.size());
    for (int64_t row = 0; row < N * Hh; ++row) {
      float s = 1e-6f;
      for (int64_t d = 0; d < D; ++d) s += kr[size_t(row * D + d)] * kr[size_t(row * D + d)];
      const float inv = 1.0f / std::sqrt(s);
      float dot = 0.0f;
      std::vector<float> dkk(static_cast<size_t>(D));
      for (int64_t d = 0; d < D; ++d) {
        const size_t o = size_t(row * D + d);
        const float sg = 1.0f / (1.0f + std::exp(-ic[o])), kk = kr[o] * inv;
        dkk[size_t(d)] = -da[o] + db[o] * sg;
        dic[o] = db[o] * kk * sg * (1.0f - sg);
        dot += kk * dkk[size_t(d)];
      }
      for (int64_t d = 0; d < D; ++d) {
        const size_t o = size_t(row * D + d);
        dkr[o] = (dkk[size_t(d)] - kr[o] * inv * dot) * inv;
      }
    }
    dmapped["kk"] = std::move(dkr), dmapped["iclr"] = std::move(dic);
  }

  const Recipe& r_;
  const MixerSpec& spec_;
  std::map<std::string, std::vector<float>> raw_;  // the projections before their maps (forward)
  std::vector<float> y_;
  const float* a_ = nullptr;
};

// The recurrent runtime: one token's projections into preallocated buffers, mapped straight
// into the stepper's inputs (no allocation per token).
class DecayRun : public LayerRun {
 public:
  DecayRun(const DecayLayer& L, const LayerIO& io, const TensorMap& state, const LayerConfig& lc, int64_t C,
           int64_t index)
      : L_(L), C_(C), wo_(io.w("att.o.weight")), y_(size_t(C)) {
    const std::vector<float> zero(size_t(C), 0.0f);
    TensorMap in = L_.inputs(io, zero.data(), 1, 1, nullptr);
    for (const Proj& p : L_.r_.proj) {
      projs_.push_back({&p, io.w("att." + p.input + ".weight"), p.has_bias ? io.w("att." + p.input + ".bias") : nullptr,
                        L_.width(p.input)});
      raw_.emplace_back(size_t(L_.width(p.input)));
    }
    TensorMap own;
    mix_ = std::make_unique<MixerStep>(lc, std::move(in), split_layer_state(state, {}, own, index));
    for (size_t i = 0; i < projs_.size(); ++i) {
      const std::string& n = projs_[i].p->input;
      if (n == "kk") kk_ = raw_[i].data();
      if (n == "iclr") ic_ = raw_[i].data();
      dst_.push_back(n == "kk" || n == "iclr" ? nullptr : mix_->buf(n));
    }
    if (L_.r_.rwkv7_ab) a_ = mix_->buf("a"), b_ = mix_->buf("b");
  }
  void step(const float* a, float* out) override {
    for (size_t i = 0; i < projs_.size(); ++i) {
      const P& p = projs_[i];
      float* raw = raw_[i].data();
      nn::matmul_forward(raw, a, p.W, p.bias, 1, C_, p.width);
      if (dst_[i])
        for (int64_t j = 0; j < p.width; ++j) dst_[i][j] = map_f(p.p->map, raw[j]);
    }
    if (a_) L_.rwkv7_ab_rows(a_, b_, kk_, ic_, 1);
    mix_->step(y_.data());
    nn::matmul_forward(out, y_.data(), wo_, nullptr, 1, C_, C_);
  }
  TensorMap save() const override { return mix_->save(); }

 private:
  struct P {
    const Proj* p;
    const float *W, *bias;
    int64_t width;
  };
  const DecayLayer& L_;
  int64_t C_;
  const float* wo_;
  std::vector<float> y_;
  std::vector<P> projs_;
  std::vector<std::vector<float>> raw_;
  std::vector<float*> dst_;
  float *kk_ = nullptr, *ic_ = nullptr, *a_ = nullptr, *b_ = nullptr;
  std::unique_ptr<MixerStep> mix_;
};

std::unique_ptr<LayerRun> DecayLayer::start(const LayerIO& io, const TensorMap& state) const {
  return std::make_unique<DecayRun>(*this, io, state, lc_, C_, index_);
}

}  // namespace

std::unique_ptr<MixerLayer> decay_layer(const ModelConfig& cfg, int64_t index) {
  return std::make_unique<DecayLayer>(cfg, index);
}

}  // namespace linmix
