// The RWKV-5 / RWKV-6 / RWKV-7 time-mix layers exactly as BlinkDL trains and publishes them
// (docs/RWKV.md: names, shapes and formulas), so that a checkpoint of either loads into the
// other: u the block's normalised input, p the previous token's, d = p - u;
//   v5: x_c = u mu_c + p (1 - mu_c); r, k, v = W x; WKV rwkv5 (w = -exp(time_decay), bonus
//       time_faaaa); y = GN(o) [* silu(W_g x_g)]; out = W_o y
//   v6: ddlerp x_c = u + d (maa_c + tanh((u + d maa_x) A1)_c A2[c]); r, k, v, g = silu(W_g x_g);
//       log decay -exp(time_decay + tanh(x_w B1) B2); WKV rwkv6; out = W_o (GN(o) g)
//   v7: x_c = u + d x_c; log decay -e^-1/2 sigmoid(w0 + tanh(x_w W1) W2);
//       a = sigmoid(a0 + x_a A1 A2); g = sigmoid(x_g G1) G2; kappa = l2norm(k k_k) per head;
//       k' = k (1 + (a - 1) k_a); v' = v (layer 0, which sets v_first) or
//       v + (v_first - v) sigmoid(v0 + x_v V1 V2); WKV rwkv7 (a = kappa, b = -kappa a);
//       y = GN(o) + (r . (k' r_k))_h v'_h; out = W_o (y g)
// The WKV runs through the registry's mechanisms (their chunked parallel form and its
// backward; the stepper in recurrent use). RWKV-7's v_first crosses layers through the
// model's Carry. Knobs: "gate" (v5: 0 for the gateless 5.1 layout), LoRA widths "d_mix",
// "d_decay" (v6), "d_w", "d_a", "d_v", "d_g" (v7), "gn_eps" (default 64e-5).
#include <cblas.h>

#include <cmath>
#include <cstring>

#include "kernels/blas.h"
#include "layers.h"
#include "mixer_layer.h"

namespace linmix {

namespace {

// C (M,N) = A (M,K) B (K,N) [+ C]: row-major, A and B optionally transposed, leading dims given.
void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
          float* C, int64_t ldc, bool acc) {
  if (M == 0 || N == 0) return;
  blas::sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, int(M), int(N), int(K),
              1.0f, A, int(lda), B, int(ldb), acc ? 1.0f : 0.0f, C, int(ldc));
}
float sig(float x) { return 1.0f / (1.0f + std::exp(-x)); }
const float kE05 = std::exp(-0.5f);

int64_t blink_lora(double mult, double power, int64_t C) {  // BlinkDL's v7 LoRA widths
  return std::max<int64_t>(32, int64_t(std::lround(mult * std::pow(double(C), power) / 32.0)) * 32);
}

class RwkvLayer : public MixerLayer {
 public:
  RwkvLayer(const ModelConfig& cfg, int64_t index) : MixerLayer(cfg, index) {
    ver_ = lc_.mixer == "rwkv5" ? 5 : lc_.mixer == "rwkv6" ? 6 : 7;
    H_ = cfg.n_head, N_ = C_ / H_;
    for (int64_t i = 0; i < index; ++i) first_v7_ = first_v7_ && cfg.layers[size_t(i)].mixer != "rwkv7";
    auto k = [&](const char* n, int64_t def) { return lc_.params.count(n) ? cfg.knob(lc_, n) : def; };
    gate_ = ver_ != 5 || k("gate", 1) == 1;
    dmix_ = k("d_mix", 32), ddecay_ = k("d_decay", 64);
    dw_ = k("d_w", blink_lora(1.8, 0.5, C_)), da_ = k("d_a", blink_lora(1.8, 0.5, C_));
    dv_ = k("d_v", blink_lora(1.3, 0.5, C_)), dg_ = k("d_g", blink_lora(0.6, 0.8, C_));
    if (lc_.params.count("gn_eps")) {
      const std::string& s = lc_.params.at("gn_eps");
      char* end = nullptr;
      eps_ = std::strtof(s.c_str(), &end);
      LINMIX_CHECK(!s.empty() && *end == '\0' && std::isfinite(eps_) && eps_ > 0.0f && eps_ < 1.0f,
                   "model config: layer param 'gn_eps' must be a number in (0, 1), found '" + s + "'");
    }
  }

  std::vector<int64_t> vec() const { return {1, 1, C_}; }
  const char* mixes() const { return ver_ == 5 ? (gate_ ? "rkvg" : "rkv") : ver_ == 6 ? "wkvrg" : "rwkvag"; }
  std::string mix_name(char c) const {
    return ver_ == 5 ? std::string("att.time_mix_") + c : ver_ == 6 ? std::string("att.time_maa_") + c
                                                                     : std::string("att.x_") + c;
  }

  ParamShapes shapes() const override {
    ParamShapes s;
    for (const char* c = mixes(); *c; ++c) s.push_back({mix_name(*c), vec()});
    for (const char* n : {"att.receptance.weight", "att.key.weight", "att.value.weight", "att.output.weight"})
      s.push_back({n, {C_, C_}});
    if (gate_ && ver_ != 7) s.push_back({"att.gate.weight", {C_, C_}});
    s.push_back({"att.ln_x.weight", {C_}}), s.push_back({"att.ln_x.bias", {C_}});
    if (ver_ == 5) s.push_back({"att.time_decay", {H_, N_}}), s.push_back({"att.time_faaaa", {H_, N_}});
    if (ver_ == 6) {
      s.push_back({"att.time_maa_x", vec()});
      s.push_back({"att.time_maa_w1", {C_, 5 * dmix_}}), s.push_back({"att.time_maa_w2", {5, dmix_, C_}});
      s.push_back({"att.time_decay", vec()});
      s.push_back({"att.time_decay_w1", {C_, ddecay_}}), s.push_back({"att.time_decay_w2", {ddecay_, C_}});
      s.push_back({"att.time_faaaa", {H_, N_}});
    }
    if (ver_ == 7) {
      for (auto [n, r] : {std::pair<const char*, int64_t>{"w", dw_}, {"a", da_}, {"v", dv_}}) {
        if (std::string(n) == "v" && first_v7_) continue;  // layer 0 has no value residual
        s.push_back({std::string("att.") + n + "0", vec()});
        s.push_back({std::string("att.") + n + "1", {C_, r}}), s.push_back({std::string("att.") + n + "2", {r, C_}});
      }
      s.push_back({"att.g1", {C_, dg_}}), s.push_back({"att.g2", {dg_, C_}});
      s.push_back({"att.k_k", vec()}), s.push_back({"att.k_a", vec()}), s.push_back({"att.r_k", {H_, N_}});
    }
    return s;
  }

  // BlinkDL's initialisation (RWKV-LM v5/v6 model.py, v7 train_temp), with one departure: the
  // first LoRA matrices, zeros there, are small random here (every path carries gradient).
  bool init(const std::string& name, Tensor& t, InitCtx& ctx) const override {
    const int64_t L = cfg_.n_layer;
    const double r01 = L > 1 ? double(index_) / double(L - 1) : 0.0, r1 = 1.0 - double(index_) / double(L);
    auto ddd = [&](int64_t c) { return double(c) / double(C_); };
    auto fill = [&](auto f) {
      for (int64_t c = 0; c < t.numel(); ++c) t.data[size_t(c)] = float(f(c));
    };
    auto normal = [&](double s) {
      for (float& x : t.data) x = float(s) * ctx.normal(ctx.rng);
    };
    const std::string n = name;
    if (ver_ == 5 && n.rfind("att.time_mix_", 0) == 0) {
      const char c = n.back();
      fill([&](int64_t i) {
        return c == 'k' ? std::pow(ddd(i), r1) : c == 'v' ? std::pow(ddd(i), r1) + 0.3 * r01 : std::pow(ddd(i), 0.5 * r1);
      });
    } else if (ver_ == 6 && n.rfind("att.time_maa_", 0) == 0 && n.size() == 14) {
      const char c = n.back();
      fill([&](int64_t i) {
        return 1.0 - (c == 'v' ? std::pow(ddd(i), r1) + 0.3 * r01 : c == 'r' || c == 'g' ? std::pow(ddd(i), 0.5 * r1)
                                                                                          : std::pow(ddd(i), r1));
      });
    } else if (ver_ == 7 && n.rfind("att.x_", 0) == 0) {
      const char c = n.back();
      const double e = c == 'r' || c == 'g' ? 0.2 : c == 'w' || c == 'a' ? 0.9 : 0.7;
      fill([&](int64_t i) { return 1.0 - std::pow(ddd(i), e * r1); });
    } else if (n == "att.time_decay") {  // -6 .. -1 over the channels: slow to fast
      fill([&](int64_t i) { return -6.0 + 5.0 * std::pow(double(i) / double(std::max<int64_t>(C_ - 1, 1)), 0.7 + 1.3 * r01); });
    } else if (n == "att.time_faaaa") {
      fill([&](int64_t i) { return r01 * (1.0 - double(i) / double(std::max<int64_t>(C_ - 1, 1))) + ((i + 1) % 3 - 1) * 0.1; });
    } else if (n == "att.w0") {
      fill([&](int64_t i) {
        return -7.0 + 5.0 * std::pow(double(i) / double(std::max<int64_t>(C_ - 1, 1)), 0.85 + std::sqrt(r01)) + 0.5;
      });
    } else if (n == "att.a0") {
      std::fill(t.data.begin(), t.data.end(), 0.0f);
    } else if (n == "att.v0" || n == "att.k_a") {
      std::fill(t.data.begin(), t.data.end(), 1.0f);
    } else if (n == "att.k_k") {
      std::fill(t.data.begin(), t.data.end(), 0.85f);
    } else if (n == "att.r_k") {
      normal(0.1);
    } else if (n == "att.ln_x.weight") {
      std::fill(t.data.begin(), t.data.end(), ver_ == 7 ? float(std::pow(r1, 0.7)) : 1.0f);
    } else if (n == "att.time_maa_w1" || n == "att.time_decay_w1" || n == "att.w1" || n == "att.a1" || n == "att.v1" ||
               n == "att.g1") {
      normal(0.1 / std::sqrt(double(C_)));
    } else if (n == "att.time_maa_w2" || n == "att.time_decay_w2" || n == "att.w2" || n == "att.a2" || n == "att.v2" ||
               n == "att.g2") {
      normal(0.1 / std::sqrt(double(t.dim(t.rank() - 2))));
    } else {
      return false;
    }
    return true;
  }

  // ---- forward

  void forward(const LayerIO& io, const float* a, float* out, int64_t B, int64_t T) override {
    const int64_t N = B * T, C = C_;
    a_ = a;
    p_.resize(size_t(N * C));
    nn::shift_forward(p_.data(), a, B, T, C);
    d_.resize(size_t(N * C));
    for (int64_t i = 0; i < N * C; ++i) d_[size_t(i)] = p_[size_t(i)] - a[i];
    xs_.clear();
    std::map<std::string, std::vector<float>> wkv;  // the mechanism's inputs
    if (ver_ == 5) {
      for (const char* c = mixes(); *c; ++c) {
        auto& x = xs_[*c];
        x.resize(size_t(N * C));
        const float* m = io.w(mix_name(*c));
        for (int64_t i = 0; i < N; ++i)
          for (int64_t ch = 0; ch < C; ++ch) x[size_t(i * C + ch)] = a[i * C + ch] * m[ch] + p_[size_t(i * C + ch)] * (1 - m[ch]);
      }
    } else if (ver_ == 6) {
      const int64_t D5 = 5 * dmix_;
      std::vector<float> xx(size_t(N * C));
      lerp_d(xx.data(), io.w("att.time_maa_x"), nullptr, N);
      z6_.resize(size_t(N * D5));
      gemm(false, false, N, D5, C, xx.data(), C, io.w("att.time_maa_w1"), D5, z6_.data(), D5, false);
      for (float& z : z6_) z = std::tanh(z);
      m6_.assign(size_t(5 * N * C), 0.0f);
      for (int c = 0; c < 5; ++c) {
        float* m = &m6_[size_t(c * N * C)];
        gemm(false, false, N, C, dmix_, &z6_[size_t(c * dmix_)], D5, io.w("att.time_maa_w2") + c * dmix_ * C, C, m, C, false);
        auto& x = xs_["wkvrg"[c]];
        x.resize(size_t(N * C));
        lerp_d(x.data(), io.w(mix_name("wkvrg"[c])), m, N);
      }
    } else {
      for (const char* c = mixes(); *c; ++c) {
        auto& x = xs_[*c];
        x.resize(size_t(N * C));
        lerp_d(x.data(), io.w(mix_name(*c)), nullptr, N);
      }
    }
    for (auto [c, n] : {std::pair<char, const char*>{'r', "att.receptance.weight"}, {'k', "att.key.weight"}, {'v', "att.value.weight"}}) {
      auto& y = proj_[c];
      y.resize(size_t(N * C));
      nn::matmul_forward(y.data(), xs_.at(c).data(), io.w(n), nullptr, N, C, C);
    }
    if (gate_) {  // the gate's pre-activation (v5/v6: W_g x_g; v7: x_g G1 before the sigmoid)
      auto& g = proj_['g'];
      if (ver_ == 7) {
        zg_.resize(size_t(N * dg_));
        gemm(false, false, N, dg_, C, xs_.at('g').data(), C, io.w("att.g1"), dg_, zg_.data(), dg_, false);
        for (float& z : zg_) z = sig(z);
        g.resize(size_t(N * C));
        gemm(false, false, N, C, dg_, zg_.data(), dg_, io.w("att.g2"), C, g.data(), C, false);
      } else {
        g.resize(size_t(N * C));
        nn::matmul_forward(g.data(), xs_.at('g').data(), io.w("att.gate.weight"), nullptr, N, C, C);
      }
    }
    TensorMap in;
    auto rows = [&](const std::vector<float>& v) {
      Tensor t({B, T, H_, N_});
      std::copy(v.begin(), v.end(), t.data.begin());
      return t;
    };
    in["r"] = rows(proj_['r']);
    if (ver_ == 5) {
      Tensor w({H_, N_});
      const float* td = io.w("att.time_decay");
      for (int64_t i = 0; i < C; ++i) w.data[size_t(i)] = -std::exp(td[i]);
      in["w"] = std::move(w);
      in["u"] = tensor_of({H_, N_}, io.w("att.time_faaaa"));
      in["k"] = rows(proj_['k']), in["v"] = rows(proj_['v']);
    } else if (ver_ == 6) {
      zd_.resize(size_t(N * ddecay_));
      gemm(false, false, N, ddecay_, C, xs_.at('w').data(), C, io.w("att.time_decay_w1"), ddecay_, zd_.data(), ddecay_, false);
      for (float& z : zd_) z = std::tanh(z);
      lw_.resize(size_t(N * C));
      gemm(false, false, N, C, ddecay_, zd_.data(), ddecay_, io.w("att.time_decay_w2"), C, lw_.data(), C, false);
      const float* td = io.w("att.time_decay");
      for (int64_t i = 0; i < N; ++i)
        for (int64_t c = 0; c < C; ++c) lw_[size_t(i * C + c)] = -std::exp(lw_[size_t(i * C + c)] + td[c]);
      in["w"] = rows(lw_);
      in["u"] = tensor_of({H_, N_}, io.w("att.time_faaaa"));
      in["k"] = rows(proj_['k']), in["v"] = rows(proj_['v']);
    } else {
      forward7(io, N);
      in["w"] = rows(lw_), in["k"] = rows(k2_), in["v"] = rows(v2_);
      Tensor ta({B, T, H_, N_}), tb({B, T, H_, N_});
      for (int64_t i = 0; i < N * C; ++i) ta.data[size_t(i)] = kap_[size_t(i)], tb.data[size_t(i)] = -kap_[size_t(i)] * a7_[size_t(i)];
      in["a"] = std::move(ta), in["b"] = std::move(tb);
    }
    o_ = mixer_forward(lc_, in, true, io.keep ? &kept_ : nullptr).data;
    in_ = std::move(in);
    // GN, bonus (v7), gate, output
    gn_forward(io, N);
    y_.resize(size_t(N * C));
    for (int64_t i = 0; i < N * C; ++i) {
      float y = yn_[size_t(i)];
      if (ver_ == 7) y = (y + bonus_[size_t(i / N_)] * v2_[size_t(i)]) * proj_['g'][size_t(i)];
      else if (gate_) y *= silu1(proj_['g'][size_t(i)]);
      y_[size_t(i)] = y;
    }
    nn::matmul_forward(out, y_.data(), io.w("att.output.weight"), nullptr, N, C, C);
  }

  // x = u + d (m + extra), extra (N,C) or null
  void lerp_d(float* x, const float* m, const float* extra, int64_t N) const {
    for (int64_t i = 0; i < N; ++i)
      for (int64_t c = 0; c < C_; ++c) {
        const int64_t j = i * C_ + c;
        x[j] = a_[j] + d_[size_t(j)] * (m[c] + (extra ? extra[j] : 0.0f));
      }
  }

  void forward7(const LayerIO& io, int64_t N) {
    const int64_t C = C_;
    zw_.resize(size_t(N * dw_)), lw_.resize(size_t(N * C));
    gemm(false, false, N, dw_, C, xs_.at('w').data(), C, io.w("att.w1"), dw_, zw_.data(), dw_, false);
    for (float& z : zw_) z = std::tanh(z);
    gemm(false, false, N, C, dw_, zw_.data(), dw_, io.w("att.w2"), C, lw_.data(), C, false);
    const float* w0 = io.w("att.w0");
    for (int64_t i = 0; i < N * C; ++i) lw_[size_t(i)] = -kE05 * sig(lw_[size_t(i)] + w0[i % C]);
    za_.resize(size_t(N * da_)), a7_.resize(size_t(N * C));
    gemm(false, false, N, da_, C, xs_.at('a').data(), C, io.w("att.a1"), da_, za_.data(), da_, false);
    gemm(false, false, N, C, da_, za_.data(), da_, io.w("att.a2"), C, a7_.data(), C, false);
    const float* a0 = io.w("att.a0");
    for (int64_t i = 0; i < N * C; ++i) a7_[size_t(i)] = sig(a7_[size_t(i)] + a0[i % C]);
    const float *kk = io.w("att.k_k"), *ka = io.w("att.k_a");
    const std::vector<float>& k = proj_['k'];
    kap_.resize(size_t(N * C)), knorm_.resize(size_t(N * H_)), k2_.resize(size_t(N * C));
    for (int64_t hrow = 0; hrow < N * H_; ++hrow) {
      double s = 0;
      for (int64_t j = 0; j < N_; ++j) {
        const int64_t i = hrow * N_ + j;
        const float x = k[size_t(i)] * kk[i % C];
        s += double(x) * x;
      }
      const float nrm = std::max(float(std::sqrt(s)), 1e-12f);
      knorm_[size_t(hrow)] = nrm;
      for (int64_t j = 0; j < N_; ++j) {
        const int64_t i = hrow * N_ + j;
        kap_[size_t(i)] = k[size_t(i)] * kk[i % C] / nrm;
      }
    }
    for (int64_t i = 0; i < N * C; ++i) k2_[size_t(i)] = k[size_t(i)] * (1.0f + (a7_[size_t(i)] - 1.0f) * ka[i % C]);
    const std::vector<float>& v = proj_['v'];
    LINMIX_CHECK(io.carry, "rwkv7 layer: no cross-layer carry (v_first)");
    Carry& cy = *io.carry;
    if (first_v7_) {  // layer 0 (the first rwkv7 layer of a mixed stack) sets v_first
      cy.v_first = v, cy.dv_first.assign(size_t(N * C), 0.0f);
      v2_ = v;
      return;
    }
    LINMIX_CHECK(cy.v_first.size() == size_t(N * C), "rwkv7 layer: v_first was not set by an earlier layer");
    zv_.resize(size_t(N * dv_)), sv_.resize(size_t(N * C)), v2_.resize(size_t(N * C));
    gemm(false, false, N, dv_, C, xs_.at('v').data(), C, io.w("att.v1"), dv_, zv_.data(), dv_, false);
    gemm(false, false, N, C, dv_, zv_.data(), dv_, io.w("att.v2"), C, sv_.data(), C, false);
    const float* v0 = io.w("att.v0");
    vf_ = cy.v_first;
    for (int64_t i = 0; i < N * C; ++i) {
      sv_[size_t(i)] = sig(sv_[size_t(i)] + v0[i % C]);
      v2_[size_t(i)] = v[size_t(i)] + (vf_[size_t(i)] - v[size_t(i)]) * sv_[size_t(i)];
    }
  }

  void gn_forward(const LayerIO& io, int64_t N) {
    const int64_t C = C_;
    const float *w = io.w("att.ln_x.weight"), *b = io.w("att.ln_x.bias");
    xhat_.resize(size_t(N * C)), rstd_.resize(size_t(N * H_)), yn_.resize(size_t(N * C));
    if (ver_ == 7) bonus_.assign(size_t(N * H_), 0.0f);
    for (int64_t hrow = 0; hrow < N * H_; ++hrow) {
      const float* o = &o_[size_t(hrow * N_)];
      float m = 0, v = 0;
      for (int64_t j = 0; j < N_; ++j) m += o[j];
      m /= float(N_);
      for (int64_t j = 0; j < N_; ++j) v += (o[j] - m) * (o[j] - m);
      const float r = 1.0f / std::sqrt(v / float(N_) + eps_);
      rstd_[size_t(hrow)] = r;
      const int64_t h = hrow % H_;
      for (int64_t j = 0; j < N_; ++j) {
        const int64_t i = hrow * N_ + j, c = h * N_ + j;
        xhat_[size_t(i)] = (o[j] - m) * r;
        yn_[size_t(i)] = xhat_[size_t(i)] * w[c] + b[c];
      }
      if (ver_ == 7) {
        const float* rk = io.w("att.r_k") + h * N_;
        float s = 0;
        for (int64_t j = 0; j < N_; ++j) s += proj_['r'][size_t(hrow * N_ + j)] * k2_[size_t(hrow * N_ + j)] * rk[j];
        bonus_[size_t(hrow)] = s;
      }
    }
  }

  // ---- backward

  void backward(const LayerIO& io, const float* dout, float* da, int64_t B, int64_t T) override {
    const int64_t N = B * T, C = C_;
    std::vector<float> dy(size_t(N * C)), dyn(size_t(N * C)), dg(gate_ ? size_t(N * C) : 0);
    nn::matmul_backward(dy.data(), io.g("att.output.weight"), nullptr, dout, y_.data(), io.w("att.output.weight"), N, C, C);
    std::map<char, std::vector<float>> dproj;  // d r, k, v (the projections' outputs)
    for (char c : {'r', 'k', 'v'}) dproj[c].assign(size_t(N * C), 0.0f);
    std::vector<float> dk2, dv2;
    if (ver_ == 7) dk2.assign(size_t(N * C), 0.0f), dv2.assign(size_t(N * C), 0.0f);
    const float* gp = gate_ ? proj_.at('g').data() : nullptr;
    for (int64_t i = 0; i < N * C; ++i) {
      const float g = gp ? gp[i] : 0.0f;
      if (ver_ == 7) {
        const float ypre = yn_[size_t(i)] + bonus_[size_t(i / N_)] * v2_[size_t(i)];
        dg[size_t(i)] = dy[size_t(i)] * ypre;
        dyn[size_t(i)] = dy[size_t(i)] * g;
      } else if (gate_) {
        dg[size_t(i)] = dy[size_t(i)] * yn_[size_t(i)] * dsilu1(g);
        dyn[size_t(i)] = dy[size_t(i)] * silu1(g);
      } else {
        dyn[size_t(i)] = dy[size_t(i)];
      }
    }
    if (ver_ == 7) {  // the bonus: y_h += s_h v'_h, s_h = sum_j r_j k'_j r_k[h][j]
      const float* rk = io.w("att.r_k");
      float* grk = io.g("att.r_k");
      for (int64_t hrow = 0; hrow < N * H_; ++hrow) {
        const int64_t h = hrow % H_;
        float ds = 0;
        for (int64_t j = 0; j < N_; ++j) {
          const int64_t i = hrow * N_ + j;
          ds += dyn[size_t(i)] * v2_[size_t(i)];
          dv2[size_t(i)] += dyn[size_t(i)] * bonus_[size_t(hrow)];
        }
        for (int64_t j = 0; j < N_; ++j) {
          const int64_t i = hrow * N_ + j;
          const float r = proj_['r'][size_t(i)], k = k2_[size_t(i)];
          dproj['r'][size_t(i)] += ds * k * rk[h * N_ + j];
          dk2[size_t(i)] += ds * r * rk[h * N_ + j];
          grk[h * N_ + j] += ds * r * k;
        }
      }
    }
    // group norm
    std::vector<float> dob(size_t(N * C));
    {
      const float* w = io.w("att.ln_x.weight");
      float *gw = io.g("att.ln_x.weight"), *gb = io.g("att.ln_x.bias");
      for (int64_t hrow = 0; hrow < N * H_; ++hrow) {
        const int64_t h = hrow % H_;
        float s1 = 0, s2 = 0;
        for (int64_t j = 0; j < N_; ++j) {
          const int64_t i = hrow * N_ + j, c = h * N_ + j;
          gw[c] += dyn[size_t(i)] * xhat_[size_t(i)], gb[c] += dyn[size_t(i)];
          const float dx = dyn[size_t(i)] * w[c];
          s1 += dx, s2 += dx * xhat_[size_t(i)];
        }
        for (int64_t j = 0; j < N_; ++j) {
          const int64_t i = hrow * N_ + j, c = h * N_ + j;
          const float dx = dyn[size_t(i)] * w[c];
          dob[size_t(i)] = rstd_[size_t(hrow)] * (dx - s1 / float(N_) - xhat_[size_t(i)] * s2 / float(N_));
        }
      }
    }
    const TensorMap g = mixer_backward(lc_, in_, {B, T, H_, N_}, dob.data(), true, kept_.get());
    kept_.reset();
    auto add = [&](std::vector<float>& dst, const std::string& n) {
      const Tensor& t = g.at(n);
      for (int64_t i = 0; i < t.numel(); ++i) dst[size_t(i)] += t.data[size_t(i)];
    };
    add(dproj['r'], "dr");
    std::map<char, std::vector<float>> dx;  // d x_c (the mixed inputs)
    for (const char* c = mixes(); *c; ++c) dx[*c].assign(size_t(N * C), 0.0f);
    if (ver_ == 5) {
      add(dproj['k'], "dk"), add(dproj['v'], "dv");
      const float* td = io.w("att.time_decay");
      float* gtd = io.g("att.time_decay");
      const Tensor& dw = g.at("dw");
      for (int64_t i = 0; i < C; ++i) gtd[i] += dw.data[size_t(i)] * -std::exp(td[i]);
      float* gu = io.g("att.time_faaaa");
      for (int64_t i = 0; i < C; ++i) gu[i] += g.at("du").data[size_t(i)];
    } else if (ver_ == 6) {
      add(dproj['k'], "dk"), add(dproj['v'], "dv");
      float* gu = io.g("att.time_faaaa");
      for (int64_t i = 0; i < C; ++i) gu[i] += g.at("du").data[size_t(i)];
      // log w = -exp(lambda): d lambda = d logw * logw
      std::vector<float> dl(size_t(N * C));
      const Tensor& dw = g.at("dw");
      float* gtd = io.g("att.time_decay");
      for (int64_t i = 0; i < N * C; ++i) dl[size_t(i)] = dw.data[size_t(i)] * lw_[size_t(i)], gtd[i % C] += dl[size_t(i)];
      lora_backward(io, "att.time_decay_w1", "att.time_decay_w2", xs_.at('w').data(), zd_, dl, ddecay_, dx['w'], Act::Tanh, N);
    } else {
      backward7(io, g, dproj, dk2, dv2, dx, N);
    }
    // the gate
    if (gate_) {
      if (ver_ == 7) {  // g = sigmoid(x G1) G2
        lora_backward(io, "att.g1", "att.g2", xs_.at('g').data(), zg_, dg, dg_, dx['g'], Act::Sigmoid, N);
      } else {
        nn::matmul_backward(dx['g'].data(), io.g("att.gate.weight"), nullptr, dg.data(), xs_.at('g').data(),
                            io.w("att.gate.weight"), N, C, C, true);
      }
    }
    for (auto [c, n] : {std::pair<char, const char*>{'r', "att.receptance.weight"}, {'k', "att.key.weight"}, {'v', "att.value.weight"}})
      nn::matmul_backward(dx[c].data(), io.g(n), nullptr, dproj[c].data(), xs_.at(c).data(), io.w(n), N, C, C, true);
    // the mixes, back to u (da) and p (dprev)
    std::vector<float> dp(size_t(N * C), 0.0f);
    if (ver_ == 6) {  // x_c = u + d (maa_c + m_c); m_c = z_c A2[c]; z = tanh(xx A1); xx = u + d maa_x
      const int64_t D5 = 5 * dmix_;
      std::vector<float> dz(size_t(N * D5)), dm(size_t(N * C));
      for (int c = 0; c < 5; ++c) {
        const char nm = "wkvrg"[c];
        const float* mu = io.w(mix_name(nm));
        float* gmu = io.g(mix_name(nm));
        const float* m = &m6_[size_t(c * N * C)];
        const std::vector<float>& d = dx[nm];
        for (int64_t i = 0; i < N * C; ++i) {
          const float f = mu[i % C] + m[i];
          da[i] += d[size_t(i)] * (1.0f - f), dp[size_t(i)] += d[size_t(i)] * f;
          gmu[i % C] += d[size_t(i)] * d_[size_t(i)];
          dm[size_t(i)] = d[size_t(i)] * d_[size_t(i)];
        }
        gemm(false, true, N, dmix_, C, dm.data(), C, io.w("att.time_maa_w2") + c * dmix_ * C, C, &dz[size_t(c * dmix_)], D5, false);
        gemm(true, false, dmix_, C, N, &z6_[size_t(c * dmix_)], D5, dm.data(), C, io.g("att.time_maa_w2") + c * dmix_ * C, C, true);
      }
      for (size_t i = 0; i < dz.size(); ++i) dz[i] *= 1.0f - z6_[i] * z6_[i];
      std::vector<float> dxx(size_t(N * C)), xx(size_t(N * C));
      lerp_d(xx.data(), io.w("att.time_maa_x"), nullptr, N);
      gemm(false, true, N, C, D5, dz.data(), D5, io.w("att.time_maa_w1"), D5, dxx.data(), C, false);
      gemm(true, false, C, D5, N, xx.data(), C, dz.data(), D5, io.g("att.time_maa_w1"), D5, true);
      const float* mx = io.w("att.time_maa_x");
      float* gmx = io.g("att.time_maa_x");
      for (int64_t i = 0; i < N * C; ++i) {
        da[i] += dxx[size_t(i)] * (1.0f - mx[i % C]), dp[size_t(i)] += dxx[size_t(i)] * mx[i % C];
        gmx[i % C] += dxx[size_t(i)] * d_[size_t(i)];
      }
    } else {
      for (const char* c = mixes(); *c; ++c) {
        const float* mu = io.w(mix_name(*c));
        float* gmu = io.g(mix_name(*c));
        const std::vector<float>& d = dx[*c];
        for (int64_t i = 0; i < N * C; ++i) {
          const float m = mu[i % C];
          if (ver_ == 5) {  // u m + p (1 - m)
            da[i] += d[size_t(i)] * m, dp[size_t(i)] += d[size_t(i)] * (1.0f - m);
            gmu[i % C] -= d[size_t(i)] * d_[size_t(i)];
          } else {  // u + d m
            da[i] += d[size_t(i)] * (1.0f - m), dp[size_t(i)] += d[size_t(i)] * m;
            gmu[i % C] += d[size_t(i)] * d_[size_t(i)];
          }
        }
      }
    }
    nn::shift_backward(da, dp.data(), B, T, C);
  }

  // out = f(x A1) A2 (dout: d out; z: f(x A1), f none, tanh or sigmoid): adds dx, dA1, dA2.
  enum class Act { None, Tanh, Sigmoid };
  void lora_backward(const LayerIO& io, const char* n1, const char* n2, const float* x, const std::vector<float>& z,
                     const std::vector<float>& dout, int64_t r, std::vector<float>& dx, Act f, int64_t N) {
    const int64_t C = C_;
    std::vector<float> dz(size_t(N * r));
    gemm(false, true, N, r, C, dout.data(), C, io.w(n2), C, dz.data(), r, false);
    gemm(true, false, r, C, N, z.data(), r, dout.data(), C, io.g(n2), C, true);
    for (size_t i = 0; i < dz.size(); ++i)
      dz[i] *= f == Act::Tanh ? 1.0f - z[i] * z[i] : f == Act::Sigmoid ? z[i] * (1.0f - z[i]) : 1.0f;
    gemm(false, true, N, C, r, dz.data(), r, io.w(n1), r, dx.data(), C, true);
    gemm(true, false, C, r, N, x, C, dz.data(), r, io.g(n1), r, true);
  }

  void backward7(const LayerIO& io, const TensorMap& g, std::map<char, std::vector<float>>& dproj,
                 std::vector<float>& dk2, std::vector<float>& dv2, std::map<char, std::vector<float>>& dx, int64_t N) {
    const int64_t C = C_;
    auto G = [&](const char* n) -> const Storage& { return g.at(n).data; };
    for (int64_t i = 0; i < N * C; ++i) dk2[size_t(i)] += G("dk")[size_t(i)], dv2[size_t(i)] += G("dv")[size_t(i)];
    // mechanism a = kappa, b = -kappa a7
    std::vector<float> dkap(size_t(N * C)), da7(size_t(N * C));
    for (int64_t i = 0; i < N * C; ++i) {
      dkap[size_t(i)] = G("da")[size_t(i)] - G("db")[size_t(i)] * a7_[size_t(i)];
      da7[size_t(i)] = -G("db")[size_t(i)] * kap_[size_t(i)];
    }
    // k' = k (1 + (a - 1) k_a)
    const float *kk = io.w("att.k_k"), *ka = io.w("att.k_a");
    float *gkk = io.g("att.k_k"), *gka = io.g("att.k_a");
    const std::vector<float>& k = proj_['k'];
    std::vector<float>& dk = dproj['k'];
    for (int64_t i = 0; i < N * C; ++i) {
      const float d = dk2[size_t(i)];
      dk[size_t(i)] += d * (1.0f + (a7_[size_t(i)] - 1.0f) * ka[i % C]);
      da7[size_t(i)] += d * k[size_t(i)] * ka[i % C];
      gka[i % C] += d * k[size_t(i)] * (a7_[size_t(i)] - 1.0f);
    }
    // kappa = l2norm(k k_k) per head
    for (int64_t hrow = 0; hrow < N * H_; ++hrow) {
      float dot = 0;
      for (int64_t j = 0; j < N_; ++j) dot += kap_[size_t(hrow * N_ + j)] * dkap[size_t(hrow * N_ + j)];
      const float nrm = knorm_[size_t(hrow)];
      const bool clamped = nrm <= 1e-12f;
      for (int64_t j = 0; j < N_; ++j) {
        const int64_t i = hrow * N_ + j;
        const float dkr = (dkap[size_t(i)] - (clamped ? 0.0f : kap_[size_t(i)] * dot)) / nrm;
        dk[size_t(i)] += dkr * kk[i % C];
        gkk[i % C] += dkr * k[size_t(i)];
      }
    }
    // a7 = sigmoid(a0 + x_a A1 A2)
    {
      std::vector<float> dpre(size_t(N * C));
      float* ga0 = io.g("att.a0");
      for (int64_t i = 0; i < N * C; ++i) {
        dpre[size_t(i)] = da7[size_t(i)] * a7_[size_t(i)] * (1.0f - a7_[size_t(i)]);
        ga0[i % C] += dpre[size_t(i)];
      }
      lora_backward(io, "att.a1", "att.a2", xs_.at('a').data(), za_, dpre, da_, dx['a'], Act::None, N);
    }
    // log w = -e^-1/2 sigmoid(lambda): d lambda = d logw * logw * (1 - sigmoid)
    {
      std::vector<float> dl(size_t(N * C));
      float* gw0 = io.g("att.w0");
      for (int64_t i = 0; i < N * C; ++i) {
        const float s = -lw_[size_t(i)] / kE05;
        dl[size_t(i)] = G("dw")[size_t(i)] * lw_[size_t(i)] * (1.0f - s);
        gw0[i % C] += dl[size_t(i)];
      }
      lora_backward(io, "att.w1", "att.w2", xs_.at('w').data(), zw_, dl, dw_, dx['w'], Act::Tanh, N);
    }
    // v' = v (layer 0: plus what later layers send back through v_first) or v + (vf - v) sv
    Carry& cy = *io.carry;
    std::vector<float>& dv = dproj['v'];
    if (first_v7_) {
      for (int64_t i = 0; i < N * C; ++i) dv[size_t(i)] += dv2[size_t(i)] + cy.dv_first[size_t(i)];
      return;
    }
    std::vector<float> dpre(size_t(N * C));
    float* gv0 = io.g("att.v0");
    for (int64_t i = 0; i < N * C; ++i) {
      const float s = sv_[size_t(i)], d = dv2[size_t(i)];
      dv[size_t(i)] += d * (1.0f - s);
      cy.dv_first[size_t(i)] += d * s;
      dpre[size_t(i)] = d * (vf_[size_t(i)] - proj_['v'][size_t(i)]) * s * (1.0f - s);
      gv0[i % C] += dpre[size_t(i)];
    }
    lora_backward(io, "att.v1", "att.v2", xs_.at('v').data(), zv_, dpre, dv_, dx['v'], Act::None, N);
  }

  std::unique_ptr<LayerRun> start(const LayerIO& io, const TensorMap& state) const override;

  int ver_ = 5;
  int64_t H_, N_, dmix_, ddecay_, dw_, da_, dv_, dg_;
  bool gate_ = true, first_v7_ = true;
  float eps_ = 64e-5f;

 private:
  const float* a_ = nullptr;
  std::vector<float> p_, d_, z6_, m6_, zd_, lw_, zw_, za_, a7_, zg_, zv_, sv_, vf_, kap_, knorm_, k2_, v2_, o_, xhat_,
      rstd_, yn_, bonus_, y_;
  std::map<char, std::vector<float>> xs_, proj_;
  TensorMap in_;
  std::shared_ptr<RunSaved> kept_;  // what the training forward kept for the backward (Call::keep)
};

// The recurrent runtime: one token, no allocation; its state is the token shift ("shift", C)
// and the mechanism's "state.S".
class RwkvRun : public LayerRun {
 public:
  RwkvRun(const RwkvLayer& L, const LayerIO& io, const TensorMap& state, const LayerConfig& lc, int64_t index)
      : L_(L), C_(L.H_ * L.N_), H_(L.H_), N_(L.N_), prev_(size_t(C_), 0.0f), buf_(size_t(16 * C_)),
        lora_(size_t(std::max({5 * L.dmix_, L.ddecay_, L.dw_, L.da_, L.dv_, L.dg_}))) {
    TensorMap own;
    const TensorMap mix_state = split_layer_state(state, {{"shift", C_}}, own, index);
    if (own.count("shift")) prev_ = std::vector<float>(own.at("shift").data);
    TensorMap in;
    for (const char* n : {"r", "k", "v"}) in[n] = Tensor({1, 1, H_, N_});
    if (L.ver_ == 5) {
      Tensor w({H_, N_});
      for (int64_t i = 0; i < C_; ++i) w.data[size_t(i)] = -std::exp(io.w("att.time_decay")[i]);
      in["w"] = std::move(w), in["u"] = tensor_of({H_, N_}, io.w("att.time_faaaa"));
    } else if (L.ver_ == 6) {
      in["w"] = Tensor({1, 1, H_, N_}), in["u"] = tensor_of({H_, N_}, io.w("att.time_faaaa"));
    } else {
      for (const char* n : {"w", "a", "b"}) in[n] = Tensor({1, 1, H_, N_});
    }
    mixer_ = std::make_unique<MixerStep>(lc, std::move(in), mix_state);
    auto opt = [&](const std::string& n) -> const float* {
      auto it = io.params.find(io.prefix + n);
      return it == io.params.end() ? nullptr : it->second.ptr();
    };
    P_a0 = opt("att.a0");
    P_a1 = opt("att.a1");
    P_a2 = opt("att.a2");
    P_g1 = opt("att.g1");
    P_g2 = opt("att.g2");
    P_gate_weight = opt("att.gate.weight");
    P_k_a = opt("att.k_a");
    P_k_k = opt("att.k_k");
    P_key_weight = opt("att.key.weight");
    P_ln_x_bias = opt("att.ln_x.bias");
    P_ln_x_weight = opt("att.ln_x.weight");
    P_output_weight = opt("att.output.weight");
    P_r_k = opt("att.r_k");
    P_receptance_weight = opt("att.receptance.weight");
    P_time_decay = opt("att.time_decay");
    P_time_decay_w1 = opt("att.time_decay_w1");
    P_time_decay_w2 = opt("att.time_decay_w2");
    P_time_maa_w1 = opt("att.time_maa_w1");
    P_time_maa_w2 = opt("att.time_maa_w2");
    P_time_maa_x = opt("att.time_maa_x");
    P_v0 = opt("att.v0");
    P_v1 = opt("att.v1");
    P_v2 = opt("att.v2");
    P_value_weight = opt("att.value.weight");
    P_w0 = opt("att.w0");
    P_w1 = opt("att.w1");
    P_w2 = opt("att.w2");
    for (const char* c = L.mixes(); *c; ++c) mix_[c - L.mixes()] = io.w(L.mix_name(*c));
  }

  // out (C) = x (C) A (C, r), A stored [in, out]
  void vecmat(float* out, const float* x, const float* A, int64_t in, int64_t r, int64_t lda) const {
    blas::sgemv(CblasRowMajor, CblasTrans, int(in), int(r), 1.0f, A, int(lda), x, 1, 0.0f, out, 1);
  }

  void step(const float* u, float* out) override {
    const int64_t C = C_;
    const RwkvLayer& L = L_;
    float *d = buf_.data(), *x = d + C, *r = mixer_->buf("r"), *k = mixer_->buf("k"), *v = mixer_->buf("v");
    float *y = x + C, *g = y + C, *tmp = g + C, *xs = tmp + C;  // xs: up to 6 mixed inputs (6 C)
    for (int64_t c = 0; c < C; ++c) d[c] = prev_[size_t(c)] - u[c];
    const char* mixes = L.mixes();
    auto xsof = [&](char c) { return xs + (std::strchr(mixes, c) - mixes) * C; };
    if (L.ver_ == 5) {
      for (const char* c = mixes; *c; ++c) {
        const float* m = mix_[std::strchr(mixes, *c) - mixes];
        for (int64_t i = 0; i < C; ++i) xsof(*c)[i] = u[i] * m[i] + prev_[size_t(i)] * (1 - m[i]);
      }
    } else if (L.ver_ == 6) {
      const float* mx = P_time_maa_x;
      for (int64_t i = 0; i < C; ++i) x[i] = u[i] + d[i] * mx[i];
      const int64_t D5 = 5 * L.dmix_;
      float* z = lora_.data();
      vecmat(z, x, P_time_maa_w1, C, D5, D5);
      for (int64_t i = 0; i < D5; ++i) z[i] = std::tanh(z[i]);
      for (int c = 0; c < 5; ++c) {
        vecmat(tmp, z + c * L.dmix_, P_time_maa_w2 + c * L.dmix_ * C, L.dmix_, C, C);
        const float* m = mix_[std::strchr(mixes, "wkvrg"[c]) - mixes];
        float* xc = xsof("wkvrg"[c]);
        for (int64_t i = 0; i < C; ++i) xc[i] = u[i] + d[i] * (m[i] + tmp[i]);
      }
    } else {
      for (const char* c = mixes; *c; ++c) {
        const float* m = mix_[std::strchr(mixes, *c) - mixes];
        for (int64_t i = 0; i < C; ++i) xsof(*c)[i] = u[i] + d[i] * m[i];
      }
    }
    std::copy(u, u + C, prev_.begin());
    nn::matmul_forward(r, xsof('r'), P_receptance_weight, nullptr, 1, C, C);
    nn::matmul_forward(k, xsof('k'), P_key_weight, nullptr, 1, C, C);
    nn::matmul_forward(v, xsof('v'), P_value_weight, nullptr, 1, C, C);
    if (L.gate_ && L.ver_ != 7) nn::matmul_forward(g, xsof('g'), P_gate_weight, nullptr, 1, C, C);
    float* z = lora_.data();
    if (L.ver_ == 6) {
      float* w = mixer_->buf("w");
      vecmat(z, xsof('w'), P_time_decay_w1, C, L.ddecay_, L.ddecay_);
      for (int64_t i = 0; i < L.ddecay_; ++i) z[i] = std::tanh(z[i]);
      vecmat(w, z, P_time_decay_w2, L.ddecay_, C, C);
      const float* td = P_time_decay;
      for (int64_t i = 0; i < C; ++i) w[i] = -std::exp(w[i] + td[i]);
    }
    float* a7 = tmp;
    if (L.ver_ == 7) {
      float *w = mixer_->buf("w"), *ma = mixer_->buf("a"), *mb = mixer_->buf("b");
      vecmat(z, xsof('w'), P_w1, C, L.dw_, L.dw_);
      for (int64_t i = 0; i < L.dw_; ++i) z[i] = std::tanh(z[i]);
      vecmat(w, z, P_w2, L.dw_, C, C);
      for (int64_t i = 0; i < C; ++i) w[i] = -kE05 * sig(w[i] + P_w0[i]);
      vecmat(z, xsof('a'), P_a1, C, L.da_, L.da_);
      vecmat(a7, z, P_a2, L.da_, C, C);
      for (int64_t i = 0; i < C; ++i) a7[i] = sig(a7[i] + P_a0[i]);
      vecmat(z, xsof('g'), P_g1, C, L.dg_, L.dg_);
      for (int64_t i = 0; i < L.dg_; ++i) z[i] = sig(z[i]);
      vecmat(g, z, P_g2, L.dg_, C, C);
      const float *kk = P_k_k, *ka = P_k_a;
      for (int64_t h = 0; h < H_; ++h) {
        double s = 0;
        for (int64_t j = 0; j < N_; ++j) s += double(k[h * N_ + j] * kk[h * N_ + j]) * (k[h * N_ + j] * kk[h * N_ + j]);
        const float nrm = std::max(float(std::sqrt(s)), 1e-12f);
        for (int64_t j = 0; j < N_; ++j) {
          const int64_t i = h * N_ + j;
          ma[i] = k[i] * kk[i] / nrm, mb[i] = -ma[i] * a7[i];
        }
      }
      for (int64_t i = 0; i < C; ++i) k[i] *= 1.0f + (a7[i] - 1.0f) * ka[i];
      LINMIX_CHECK(carry, "rwkv7 layer: no cross-layer carry (v_first)");
      if (L.first_v7_) {
        std::copy(v, v + C, carry);
      } else {
        vecmat(z, xsof('v'), P_v1, C, L.dv_, L.dv_);
        vecmat(y, z, P_v2, L.dv_, C, C);
        for (int64_t i = 0; i < C; ++i) v[i] += (carry[i] - v[i]) * sig(y[i] + P_v0[i]);
      }
    }
    mixer_->step(y);  // o
    const float *lw = P_ln_x_weight, *lb = P_ln_x_bias;
    for (int64_t h = 0; h < H_; ++h) {
      float* o = y + h * N_;
      float m = 0, var = 0, bonus = 0;
      for (int64_t j = 0; j < N_; ++j) m += o[j];
      m /= float(N_);
      for (int64_t j = 0; j < N_; ++j) var += (o[j] - m) * (o[j] - m);
      const float rs = 1.0f / std::sqrt(var / float(N_) + L.eps_);
      if (L.ver_ == 7)
        for (int64_t j = 0; j < N_; ++j) bonus += r[h * N_ + j] * k[h * N_ + j] * P_r_k[h * N_ + j];
      for (int64_t j = 0; j < N_; ++j) {
        const int64_t i = h * N_ + j;
        float yi = (o[j] - m) * rs * lw[i] + lb[i];
        if (L.ver_ == 7) yi = (yi + bonus * v[i]) * g[i];
        else if (L.gate_) yi *= silu1(g[i]);
        o[j] = yi;
      }
    }
    nn::matmul_forward(out, y, P_output_weight, nullptr, 1, C, C);
  }

  TensorMap save() const override {
    TensorMap m = mixer_->save();
    m["shift"] = tensor_of({C_}, prev_.data());
    return m;
  }

 private:
  const RwkvLayer& L_;
  int64_t C_, H_, N_;
  std::vector<float> prev_, buf_, lora_;
  const float *P_a0 = nullptr, *P_a1 = nullptr, *P_a2 = nullptr, *P_g1 = nullptr, *P_g2 = nullptr, *P_gate_weight = nullptr, *P_k_a = nullptr, *P_k_k = nullptr, *P_key_weight = nullptr, *P_ln_x_bias = nullptr, *P_ln_x_weight = nullptr, *P_output_weight = nullptr, *P_r_k = nullptr, *P_receptance_weight = nullptr, *P_time_decay = nullptr, *P_time_decay_w1 = nullptr, *P_time_decay_w2 = nullptr, *P_time_maa_w1 = nullptr, *P_time_maa_w2 = nullptr, *P_time_maa_x = nullptr, *P_v0 = nullptr, *P_v1 = nullptr, *P_v2 = nullptr, *P_value_weight = nullptr, *P_w0 = nullptr, *P_w1 = nullptr, *P_w2 = nullptr;
  const float* mix_[6] = {};
  std::unique_ptr<MixerStep> mixer_;
};

std::unique_ptr<LayerRun> RwkvLayer::start(const LayerIO& io, const TensorMap& state) const {
  return std::make_unique<RwkvRun>(*this, io, state, lc_, index_);
}

}  // namespace

std::unique_ptr<MixerLayer> rwkv_layer(const ModelConfig& cfg, int64_t index) {
  return std::make_unique<RwkvLayer>(cfg, index);
}

}  // namespace linmix
