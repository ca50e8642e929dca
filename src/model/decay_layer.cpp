// The layer of the decaying / delta-rule mechanisms as fla builds them (retention, gla, deltanet,
// gated_deltanet; the RWKV-5/6/7 blocks, BlinkDL's, are rwkv_layer.cpp, and Mamba-2's, mamba_ssm's,
// mamba2_layer.cpp), one recipe per mechanism over these stages:
//   1. projections: raw = x W^T (+ b); a short causal depthwise convolution (kernel 4, no bias)
//      and SiLU where the paper has one (DeltaNet, Gated DeltaNet: q, k, v);
//      then the map into the mechanism's domain (sigmoid for beta, logsigmoid / 16 for GLA's
//      gate, ...). Per-head weights: map(raw) of a learned raw parameter, or RetNet's fixed
//      gammas 1 - 2^(-5-h);
//   2. the mixer (parallel form; the stepper in recurrent use);
//   3. output: the norm: per-head RMSNorm (fla's GLA, DeltaNet, Gated DeltaNet) or per-head
//      GroupNorm (RetNet); then the swish output gate; out = . Wo^T.
// Heads of D = E = d_model / n_head.
// Recurrent state: the mixer's and the last three raw rows of each convolved projection
// ("conv.<input>", 3 width).
#include <cmath>
#include <map>

#include "layers.h"
#include "mixer_layer.h"

namespace linmix {

namespace {

constexpr int64_t kConv = 4;  // the short convolution's kernel

enum class Map { Id, Sigmoid, LogSig16, Softplus };

float map_f(Map m, float x) {
  switch (m) {
    case Map::Id: return x;
    case Map::Sigmoid: return 1.0f / (1.0f + std::exp(-x));
    // logsigmoid(x) = -softplus(-x): x itself below -20 (exp(-x) overflows below -88)
    case Map::LogSig16: return (x > 20.0f ? -std::exp(-x) : x < -20.0f ? x : -std::log1p(std::exp(-x))) / 16.0f;
    case Map::Softplus: return x > 20.0f ? x : std::log1p(std::exp(x));
  }
  return x;
}
float map_df(Map m, float x) {  // d map / dx
  const float s = 1.0f / (1.0f + std::exp(-x));
  switch (m) {
    case Map::Id: return 1.0f;
    case Map::Sigmoid: return s * (1.0f - s);
    case Map::LogSig16: return (1.0f - s) / 16.0f;
    case Map::Softplus: return s;
  }
  return 1.0f;
}

enum class Role { Mixer, Gate };  // a mixer input, the output gate
struct Proj {
  std::string input;
  Map map = Map::Id;
  bool has_bias = false;
  float bias0 = 0.0f;
  bool conv = false;  // short convolution + SiLU before the map
  Role role = Role::Mixer;
  int64_t rank = 0;    // > 0: a low-rank projection x W1^T W2^T (GLA's gate: W1 "lora" (rank, C))
  bool a_log = false;  // the mapped value times -exp(A_log) per channel (Gated DeltaNet's gate; the
                       // bias is Mamba's dt_bias, initialised as Mamba-2's)
};
enum class Init { Normal, RetnetGamma, MambaDtBias };
struct Weight {  // a per-head weight input: map(raw), raw learned (or fixed: computed, not a parameter)
  std::string input;
  Map map;
  Init init;
  bool learned = true;
};
enum class Norm { RmsHead, GroupHead };
enum class Gate { None, Swish };
struct Recipe {
  std::vector<Proj> proj;
  std::vector<Weight> weights;
  Norm norm;
  float eps;
  Gate gate;
};

Proj mix(const char* n, Map m = Map::Id) { return {n, m}; }
Proj biased(const char* n, Map m, float b0) { return {n, m, true, b0}; }
Proj conv(const char* n) { return {n, Map::Id, false, 0.0f, true}; }
Proj gate() { return {"gate", Map::Id, false, 0.0f, false, Role::Gate}; }
Proj lowrank(const char* n, Map m, int64_t rank) { return {n, m, true, 0.0f, false, Role::Mixer, rank}; }
Proj mamba_gate(const char* n) { return {n, Map::Softplus, true, 0.0f, false, Role::Mixer, 0, true}; }

const std::map<std::string, Recipe>& recipes() {
  static const std::map<std::string, Recipe> r = {
      {"retention",
       {{mix("q"), mix("k"), mix("v"), gate()}, {{"gamma", Map::Id, Init::RetnetGamma, false}}, Norm::GroupHead, 1e-5f,
        Gate::Swish}},
      {"gla", {{mix("q"), mix("k"), mix("v"), lowrank("g", Map::LogSig16, 16), gate()}, {}, Norm::RmsHead, 1e-5f, Gate::Swish}},
      {"deltanet",
       {{conv("q"), conv("k"), conv("v"), biased("beta", Map::Sigmoid, 0.0f), gate()}, {}, Norm::RmsHead, 1e-5f, Gate::Swish}},
      {"gated_deltanet",
       {{conv("q"), conv("k"), conv("v"), biased("beta", Map::Sigmoid, 0.0f), mamba_gate("g"), gate()},
        {},
        Norm::RmsHead,
        1e-5f,
        Gate::Swish}},
  };
  return r;
}

float silu_f(float x) { return x / (1.0f + std::exp(-x)); }
float gate_f(Gate, float x) { return silu_f(x); }
float gate_df(Gate, float x) {
  const float s = 1.0f / (1.0f + std::exp(-x));
  return s * (1.0f + x * (1.0f - s));
}

// What one forward keeps per projection for its backward.
struct ProjAct {
  std::vector<float> mid;  // x W1^T (low rank only)
  std::vector<float> raw;  // x W^T + b
  std::vector<float> cv;   // the convolution's output, before SiLU (conv only)
  std::vector<float> act;  // the map's argument: raw, or silu(cv)
};

class DecayLayer : public MixerLayer {
 public:
  DecayLayer(const ModelConfig& cfg, int64_t index)
      : MixerLayer(cfg, index), r_(recipes().at(lc_.mixer)), spec_(find_mixer(lc_.mixer)) {}

  int64_t H() const { return cfg_.n_head; }
  int64_t Dh() const { return C_ / cfg_.n_head; }
  int64_t C() const { return C_; }
  const Recipe& recipe() const { return r_; }
  // The per-token shape (after B, T) of a projected input, and its width.
  std::vector<int64_t> row_shape(const std::string& input) const {
    if (input == "gate") return {C_};
    for (const auto& ts : spec_.inputs)
      if (ts.name == input) {
        std::vector<int64_t> s;
        const std::string dims = ts.dims.substr(4);  // after "B,T,"
        size_t at = 0;
        while (true) {
          const size_t comma = dims.find(',', at);
          const std::string d = dims.substr(at, comma == std::string::npos ? std::string::npos : comma - at);
          s.push_back(d == "H" ? H() : Dh());
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
  int64_t norm_width() const { return r_.norm == Norm::RmsHead ? Dh() : C_; }

  ParamShapes shapes() const override {
    ParamShapes s;
    for (const Proj& p : r_.proj) {
      if (p.rank) s.push_back({"att." + p.input + ".lora", {p.rank, C_}});
      s.push_back({"att." + p.input + ".weight", {width(p.input), p.rank ? p.rank : C_}});
      if (p.a_log) s.push_back({"att." + p.input + ".A_log", {width(p.input)}});
      if (p.has_bias) s.push_back({"att." + p.input + ".bias", {width(p.input)}});
      if (p.conv) s.push_back({"att." + p.input + ".conv", {width(p.input), kConv}});
    }
    for (const Weight& w : r_.weights)
      if (w.learned) s.push_back({"att." + w.input, weight_shape(w.input)});
    s.push_back({"att.ln_x.weight", {norm_width()}});
    if (r_.norm == Norm::GroupHead) s.push_back({"att.ln_x.bias", {C_}});
    s.push_back({"att.o.weight", {C_, C_}});
    return s;
  }

  bool init(const std::string& name, Tensor& t, InitCtx& ctx) const override {
    for (const Proj& p : r_.proj) {
      if (p.has_bias && name == "att." + p.input + ".bias") {
        if (p.a_log) fill_weight(Init::MambaDtBias, t, &ctx);  // Mamba-2's dt_bias
        else std::fill(t.data.begin(), t.data.end(), p.bias0);
        return true;
      }
      if (p.a_log && name == "att." + p.input + ".A_log") {  // Gated DeltaNet: A uniform in (0, 16)
        std::uniform_real_distribution<float> u(1.0f, 16.0f);
        for (float& x : t.data) x = std::log(u(ctx.rng));
        return true;
      }
      if (name == "att." + p.input + ".conv") {  // PyTorch's Conv1d default: U(-1/sqrt(K), 1/sqrt(K))
        std::uniform_real_distribution<float> u(-0.5f, 0.5f);
        for (float& x : t.data) x = u(ctx.rng);
        return true;
      }
    }
    for (const Weight& w : r_.weights)
      if (name == "att." + w.input) {
        fill_weight(w.init, t, &ctx);
        return true;
      }
    if (name == "att.ln_x.weight") {
      std::fill(t.data.begin(), t.data.end(), 1.0f);
      return true;
    }
    if (name == "att.ln_x.bias") {
      std::fill(t.data.begin(), t.data.end(), 0.0f);
      return true;
    }
    return false;
  }

  // ---- forward / backward over (B,T) rows

  void forward(const LayerIO& io, const float* a, float* out, int64_t B, int64_t T) override {
    a_ = a;
    const int64_t N = B * T;
    acts_.clear();
    for (const Proj& p : r_.proj) acts_[p.input] = project(io, p, a, B, T);
    in_ = mixer_inputs(io, B, T);
    y0_ = mixer_forward(lc_, in_, true, io.keep ? &kept_ : nullptr).data;
    output_forward(io, out, N);
  }

  void backward(const LayerIO& io, const float* dout, float* da, int64_t B, int64_t T) override {
    const int64_t N = B * T;
    std::vector<float> dy0(size_t(N * C_));
    std::map<std::string, std::vector<float>> dact;  // d(map argument) of the gate projections
    output_backward(io, dout, dy0.data(), dact, N);
    const TensorMap g = mixer_backward(lc_, in_, {B, T, H(), Dh()}, dy0.data(), true, kept_.get());
    kept_.reset();
    std::map<std::string, std::vector<float>> dmapped;
    for (const Proj& p : r_.proj)
      if (p.role == Role::Mixer && g.count("d" + p.input)) dmapped[p.input] = std::vector<float>(g.at("d" + p.input).data);
    for (const Proj& p : r_.proj) {
      const ProjAct& z = acts_.at(p.input);
      std::vector<float> d = p.role == Role::Mixer ? dmapped.at(p.input) : dact.at(p.input);
      if (p.a_log) {  // value = -exp(A_log) map(act): dA_log += d value, d map = d (-exp(A_log))
        const float* al = io.w("att." + p.input + ".A_log");
        float* gal = io.g("att." + p.input + ".A_log");
        const int64_t W = width(p.input);
        for (size_t i = 0; i < d.size(); ++i) {
          const float f = -std::exp(al[int64_t(i) % W]);
          gal[int64_t(i) % W] += d[i] * f * map_f(p.map, z.act[i]);
          d[i] *= f;
        }
      }
      if (p.role == Role::Mixer)
        for (size_t i = 0; i < d.size(); ++i) d[i] *= map_df(p.map, z.act[i]);
      project_backward(io, p, z, d, da, B, T);
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

  // One projection of (B,T) rows: x W^T + b, the convolution (+ SiLU).
  ProjAct project(const LayerIO& io, const Proj& p, const float* a, int64_t B, int64_t T) const {
    const int64_t N = B * T, W = width(p.input);
    ProjAct z;
    const float* x = a;
    z.raw.resize(size_t(N * W));
    if (p.rank) {
      z.mid.resize(size_t(N * p.rank));
      nn::matmul_forward(z.mid.data(), x, io.w("att." + p.input + ".lora"), nullptr, N, C_, p.rank);
    }
    nn::matmul_forward(z.raw.data(), p.rank ? z.mid.data() : x, io.w("att." + p.input + ".weight"),
                       p.has_bias ? io.w("att." + p.input + ".bias") : nullptr, N, p.rank ? p.rank : C_, W);
    if (!p.conv) {
      z.act = z.raw;
      return z;
    }
    const float* cw = io.w("att." + p.input + ".conv");
    z.cv.assign(size_t(N * W), 0.0f);
    z.act.resize(size_t(N * W));
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < T; ++t) {
        float* o = &z.cv[size_t((b * T + t) * W)];
        for (int64_t j = 0; j < kConv; ++j) {  // out[t] = sum_j w[:, j] raw[t - 3 + j]
          const int64_t s = t - (kConv - 1) + j;
          if (s < 0) continue;
          const float* in = &z.raw[size_t((b * T + s) * W)];
          for (int64_t c = 0; c < W; ++c) o[c] += cw[c * kConv + j] * in[c];
        }
        for (int64_t c = 0; c < W; ++c) z.act[size_t((b * T + t) * W + c)] = silu_f(o[c]);
      }
    return z;
  }

  // d is the gradient of the projection's map argument (act); adds into da.
  void project_backward(const LayerIO& io, const Proj& p, const ProjAct& z, std::vector<float>& d, float* da,
                        int64_t B, int64_t T) const {
    const int64_t N = B * T, W = width(p.input);
    if (p.conv) {  // through SiLU and the convolution, back to raw
      const float* cw = io.w("att." + p.input + ".conv");
      float* gw = io.g("att." + p.input + ".conv");
      std::vector<float> draw(size_t(N * W), 0.0f);
      for (size_t i = 0; i < d.size(); ++i) {
        const float x = z.cv[i], s = 1.0f / (1.0f + std::exp(-x));
        d[i] *= s * (1.0f + x * (1.0f - s));
      }
      for (int64_t b = 0; b < B; ++b)
        for (int64_t t = 0; t < T; ++t) {
          const float* go = &d[size_t((b * T + t) * W)];
          for (int64_t j = 0; j < kConv; ++j) {
            const int64_t s = t - (kConv - 1) + j;
            if (s < 0) continue;
            const float* in = &z.raw[size_t((b * T + s) * W)];
            float* gi = &draw[size_t((b * T + s) * W)];
            for (int64_t c = 0; c < W; ++c) gi[c] += cw[c * kConv + j] * go[c], gw[c * kConv + j] += go[c] * in[c];
          }
        }
      d = std::move(draw);
    }
    const float* x = a_;
    if (p.rank) {  // through W2 to the low-rank middle, then W1
      std::vector<float> dmid(size_t(N * p.rank));
      nn::matmul_backward(dmid.data(), io.g("att." + p.input + ".weight"), p.has_bias ? io.g("att." + p.input + ".bias") : nullptr,
                          d.data(), z.mid.data(), io.w("att." + p.input + ".weight"), N, p.rank, W, false);
      nn::matmul_backward(da, io.g("att." + p.input + ".lora"), nullptr, dmid.data(), x, io.w("att." + p.input + ".lora"), N,
                          C_, p.rank, true);
      return;
    }
    nn::matmul_backward(da, io.g("att." + p.input + ".weight"), p.has_bias ? io.g("att." + p.input + ".bias") : nullptr,
                        d.data(), x, io.w("att." + p.input + ".weight"), N, C_, W, true);
  }

  // The mixer's inputs from the kept projections (mapped) and the weights.
  TensorMap mixer_inputs(const LayerIO& io, int64_t B, int64_t T) const {
    TensorMap in;
    std::map<std::string, std::vector<float>> mapped;
    for (const Proj& p : r_.proj) {
      if (p.role != Role::Mixer) continue;
      const ProjAct& z = acts_.at(p.input);
      std::vector<float> m(z.act.size());
      for (size_t i = 0; i < m.size(); ++i) m[i] = map_f(p.map, z.act[i]);
      if (p.a_log) {
        const float* al = io.w("att." + p.input + ".A_log");
        const int64_t W = width(p.input);
        for (size_t i = 0; i < m.size(); ++i) m[i] *= -std::exp(al[int64_t(i) % W]);
      }
      mapped[p.input] = std::move(m);
    }
    for (auto& [name, m] : mapped) {
      std::vector<int64_t> shape{B, T};
      for (int64_t d : row_shape(name)) shape.push_back(d);
      Tensor t(shape);
      t.data = std::move(m);
      in[name] = std::move(t);
    }
    for (const Weight& w : r_.weights) in[w.input] = weight_value(io, w);
    return in;
  }

  // ---- the output stage: norm -> [gate] -> Wo, rows of C

  // One row: y0 (C) -> y3 (C), keeping the norm's rstd per head, its normalised x-hat (C) and
  // y2 (after the norm). gr: the raw gate row.
  void output_row(const float* lnw, const float* lnb, const float* y0, const float* gr, float* xhat, float* rstd,
                  float* y2, float* y3) const {
    const int64_t G = H(), W = C_ / G;
    for (int64_t g = 0; g < G; ++g) {
      const float* x = y0 + g * W;
      float mean = 0.0f, sq = 0.0f;
      if (r_.norm == Norm::GroupHead) {
        for (int64_t i = 0; i < W; ++i) mean += x[i];
        mean /= float(W);
      }
      for (int64_t i = 0; i < W; ++i) sq += (x[i] - mean) * (x[i] - mean);
      const float r = 1.0f / std::sqrt(sq / float(W) + r_.eps);
      rstd[g] = r;
      for (int64_t i = 0; i < W; ++i) {
        const int64_t c = g * W + i;
        xhat[c] = (x[i] - mean) * r;
        const float w = r_.norm == Norm::RmsHead ? lnw[i] : lnw[c];
        y2[c] = xhat[c] * w + (lnb ? lnb[c] : 0.0f);
      }
    }
    for (int64_t c = 0; c < C_; ++c) y3[c] = gr ? y2[c] * gate_f(r_.gate, gr[c]) : y2[c];
  }

  void output_forward(const LayerIO& io, float* out, int64_t N) {
    const int64_t G = H();
    xhat_.resize(size_t(N * C_)), y2_.resize(size_t(N * C_)), rstd_.resize(size_t(N * G));
    std::vector<float> y3(size_t(N * C_));
    const float* gr = gate_raw();
    const float* lnb = r_.norm == Norm::GroupHead ? io.w("att.ln_x.bias") : nullptr;
    for (int64_t i = 0; i < N; ++i)
      output_row(io.w("att.ln_x.weight"), lnb, &y0_[size_t(i * C_)], gr ? gr + i * C_ : nullptr,
                 &xhat_[size_t(i * C_)], &rstd_[size_t(i * G)], &y2_[size_t(i * C_)], &y3[size_t(i * C_)]);
    y3_ = std::move(y3);
    nn::matmul_forward(out, y3_.data(), io.w("att.o.weight"), nullptr, N, C_, C_);
  }

  void output_backward(const LayerIO& io, const float* dout, float* dy0,
                       std::map<std::string, std::vector<float>>& dact, int64_t N) const {
    std::vector<float> dy3(size_t(N * C_));
    nn::matmul_backward(dy3.data(), io.g("att.o.weight"), nullptr, dout, y3_.data(), io.w("att.o.weight"), N, C_, C_);
    const float* gr = gate_raw();
    if (gr) dact["gate"].assign(size_t(N * C_), 0.0f);
    float* dgate = gr ? dact["gate"].data() : nullptr;
    const int64_t G = H(), W = C_ / G;
    const float* lnw = io.w("att.ln_x.weight");
    float* glnw = io.g("att.ln_x.weight");
    float* glnb = r_.norm == Norm::GroupHead ? io.g("att.ln_x.bias") : nullptr;
    std::vector<float> dx(static_cast<size_t>(W));
    for (int64_t i = 0; i < N; ++i) {
      const int64_t o = i * C_;
      for (int64_t g = 0; g < G; ++g) {
        float sd = 0.0f, sdx = 0.0f;
        for (int64_t j = 0; j < W; ++j) {
          const int64_t c = g * W + j;
          float d2 = dy3[size_t(o + c)];
          if (gr) {
            dgate[o + c] = d2 * y2_[size_t(o + c)] * gate_df(r_.gate, gr[o + c]);
            d2 *= gate_f(r_.gate, gr[o + c]);
          }
          const int64_t wi = r_.norm == Norm::RmsHead ? j : c;
          glnw[wi] += d2 * xhat_[size_t(o + c)];
          if (glnb) glnb[c] += d2;
          dx[size_t(j)] = d2 * lnw[wi];  // d x-hat
          sd += dx[size_t(j)], sdx += dx[size_t(j)] * xhat_[size_t(o + c)];
        }
        const float r = rstd_[size_t(i * G + g)], mean_d = r_.norm == Norm::GroupHead ? sd / float(W) : 0.0f;
        for (int64_t j = 0; j < W; ++j) {
          const int64_t c = g * W + j;
          dy0[o + c] = r * (dx[size_t(j)] - mean_d - xhat_[size_t(o + c)] * sdx / float(W));
        }
      }
    }
  }

  const float* gate_raw() const {
    for (const Proj& p : r_.proj)
      if (p.role == Role::Gate) return acts_.at(p.input).act.data();
    return nullptr;
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
        case Init::Normal: v = ctx ? 0.5f * ctx->normal(ctx->rng) : 0.0f; break;
        case Init::RetnetGamma: v = 1.0f - std::exp2(-5.0f - float(h)); break;  // RetNet: 1 - 2^(-5-h)
        case Init::MambaDtBias: {  // softplus^-1 of dt log-spaced in [1e-3, 1e-1]
          const float dt = std::exp(std::log(1e-3f) + std::log(100.0f) * frac);
          v = dt + std::log(-std::expm1(-dt));
          break;
        }
      }
      t.data[size_t(i)] = v;
    }
  }

 private:
  const Recipe& r_;
  const MixerSpec& spec_;
  std::map<std::string, ProjAct> acts_;
  TensorMap in_;
  std::shared_ptr<RunSaved> kept_;  // what the training forward kept for the backward (Call::keep)
  std::vector<float> y0_, xhat_, rstd_, y2_, y3_;
  const float* a_ = nullptr;
};

// The recurrent runtime: one token through every stage with preallocated buffers (no
// allocation per token); the convolutions' last three raw rows are its own state.
class DecayRun : public LayerRun {
 public:
  DecayRun(const DecayLayer& L, const LayerIO& io, const TensorMap& state, const LayerConfig& lc, int64_t index)
      : L_(L), r_(L.recipe()), C_(L.C()), wo_(io.w("att.o.weight")), lnw_(io.w("att.ln_x.weight")),
        lnb_(r_.norm == Norm::GroupHead ? io.w("att.ln_x.bias") : nullptr), y_(size_t(4 * C_)),
        rstd_(size_t(L.H())) {
    std::vector<std::pair<std::string, int64_t>> own_names;
    for (const Proj& p : r_.proj)
      if (p.conv) own_names.push_back({"conv." + p.input, (kConv - 1) * L.width(p.input)});
    TensorMap own;
    const TensorMap mix_state = split_layer_state(state, own_names, own, index);
    // the stepper's inputs: per-token rows (written each step) and the weights
    TensorMap in;
    for (const Proj& p : r_.proj) {
      if (p.role != Role::Mixer) continue;
      std::vector<int64_t> shape{1, 1};
      for (int64_t d : L.row_shape(p.input)) shape.push_back(d);
      in[p.input] = Tensor(shape);
    }
    for (const Weight& w : r_.weights) in[w.input] = L.weight_value(io, w);
    mix_ = std::make_unique<MixerStep>(lc, std::move(in), mix_state);
    for (const Proj& p : r_.proj) {
      const int64_t W = L.width(p.input);
      P q{&p,
          io.w("att." + p.input + ".weight"),
          p.has_bias ? io.w("att." + p.input + ".bias") : nullptr,
          p.conv ? io.w("att." + p.input + ".conv") : nullptr,
          p.rank ? io.w("att." + p.input + ".lora") : nullptr,
          p.a_log ? io.w("att." + p.input + ".A_log") : nullptr,
          W,
          std::vector<float>(size_t(W)),
          std::vector<float>(size_t(W)),
          std::vector<float>(size_t((kConv - 1) * W), 0.0f),
          std::vector<float>(size_t(p.rank)),
          nullptr};
      if (p.conv && own.count("conv." + p.input)) q.hist = std::vector<float>(own.at("conv." + p.input).data);
      if (p.role == Role::Mixer) q.dst = mix_->buf(p.input);
      projs_.push_back(std::move(q));
    }
  }

  void step(const float* a, float* out) override {
    const float* gr = nullptr;
    for (P& p : projs_) {
      const float* x = a;
      float* raw = p.raw.data();
      if (p.lora) {
        nn::matmul_forward(p.mid.data(), x, p.lora, nullptr, 1, C_, p.p->rank);
        nn::matmul_forward(raw, p.mid.data(), p.W, p.bias, 1, p.p->rank, p.width);
      } else {
        nn::matmul_forward(raw, x, p.W, p.bias, 1, C_, p.width);
      }
      float* act = p.act.data();
      if (p.conv) {  // out = sum_j w[:, j] raw[t - 3 + j] over the history and this row
        const int64_t W = p.width;
        for (int64_t c = 0; c < W; ++c) {
          float o = p.conv[c * kConv + kConv - 1] * raw[c];
          for (int64_t j = 0; j < kConv - 1; ++j) o += p.conv[c * kConv + j] * p.hist[size_t(j * W + c)];
          act[c] = silu_f(o);
        }
        std::copy(p.hist.begin() + W, p.hist.end(), p.hist.begin());  // shift the history by one row
        std::copy(raw, raw + W, p.hist.end() - W);
      } else {
        std::copy(raw, raw + p.width, act);
      }
      if (p.dst)
        for (int64_t j = 0; j < p.width; ++j)
          p.dst[j] = map_f(p.p->map, act[j]) * (p.alog ? -std::exp(p.alog[j]) : 1.0f);
      if (p.p->role == Role::Gate) gr = act;
    }
    float *y0 = y_.data(), *xh = y0 + C_, *y2 = xh + C_, *y3 = y2 + C_;
    mix_->step(y0);
    L_.output_row(lnw_, lnb_, y0, gr, xh, rstd_.data(), y2, y3);
    nn::matmul_forward(out, y3, wo_, nullptr, 1, C_, C_);
  }

  TensorMap save() const override {
    TensorMap m = mix_->save();
    for (const P& p : projs_)
      if (p.conv) m["conv." + p.p->input] = tensor_of({int64_t(p.hist.size())}, p.hist.data());
    return m;
  }

 private:
  struct P {
    const Proj* p;
    const float *W, *bias, *conv, *lora, *alog;
    int64_t width;
    std::vector<float> raw, act, hist, mid;  // hist: the last kConv - 1 raw rows, oldest first
    float* dst;                          // the stepper's input buffer (mixer inputs)
  };
  const DecayLayer& L_;
  const Recipe& r_;
  int64_t C_;
  const float *wo_, *lnw_, *lnb_;
  std::vector<float> y_, rstd_;
  std::vector<P> projs_;
  std::unique_ptr<MixerStep> mix_;
};

std::unique_ptr<LayerRun> DecayLayer::start(const LayerIO& io, const TensorMap& state) const {
  return std::make_unique<DecayRun>(*this, io, state, lc_, index_);
}

}  // namespace

std::unique_ptr<MixerLayer> decay_layer(const ModelConfig& cfg, int64_t index) {
  return std::make_unique<DecayLayer>(cfg, index);
}

}  // namespace linmix
