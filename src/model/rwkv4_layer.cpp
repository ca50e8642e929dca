// The RWKV-4 time-mix layer (Peng et al. 2023): token shift xx = a_{t-1} (zero at t = 0, or the
// carried "att_prev"), x{k,v,r} = a mix + xx (1 - mix); k, v, r = x{k,v,r} W{k,v,r}^T;
// out = (sigmoid(r) * wkv(k, v; w = exp(time_decay), u = time_first)) Wo^T.
#include <algorithm>
#include <cmath>

#include "layers.h"
#include "mixer_layer.h"

namespace linmix {

void mix_shift(float* __restrict out, const float* __restrict x, const float* __restrict xx,
               const float* __restrict mix, int64_t N, int64_t C) {
#pragma omp parallel for schedule(static) if (N * C >= nn::kParallelMin)
  for (int64_t i = 0; i < N; ++i)
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) out[i * C + c] = x[i * C + c] * mix[c] + xx[i * C + c] * (1.0f - mix[c]);
}

// RWKV-4's ratio init of a token-shift mix: later channels keep more of the current token.
void init_time_mix(Tensor& t, bool v, float depth) {
  const int64_t C = t.numel();
  for (int64_t c = 0; c < C; ++c)
    t.data[c] = std::pow(float(c) / float(C), 1.0f - depth * 0.5f) * (v ? 1.0f : 0.8f) + 0.1f;
}

namespace {

class Rwkv4Layer : public MixerLayer {
 public:
  using MixerLayer::MixerLayer;

  ParamShapes shapes() const override {
    ParamShapes s;
    for (const char* n : {"att.time_mix_k", "att.time_mix_v", "att.time_mix_r", "att.time_decay", "att.time_first"})
      s.push_back({n, {C_}});
    for (const char* n : {"att.key.weight", "att.value.weight", "att.receptance.weight", "att.output.weight"})
      s.push_back({n, {C_, C_}});
    return s;
  }

  bool init(const std::string& name, Tensor& t, InitCtx& ctx) const override {
    const float depth = ctx.depth;
    if (name == "att.time_mix_k" || name == "att.time_mix_v" || name == "att.time_mix_r") {
      init_time_mix(t, name == "att.time_mix_v", depth);
    } else if (name == "att.time_decay") {
      for (int64_t c = 0; c < C_; ++c)
        t.data[c] = -5.0f + 8.0f * std::pow(float(c) / float(std::max<int64_t>(C_ - 1, 1)), 0.7f + 1.3f * depth);
    } else if (name == "att.time_first") {
      std::fill(t.data.begin(), t.data.end(), std::log(0.3f));
    } else {
      return false;
    }
    return true;
  }

  void forward(const LayerIO& io, const float* a, float* out, int64_t B, int64_t T) override {
    const int64_t N = B * T, C = C_;
    a_ = a;
    for (auto* v : {&xx_, &xk_, &xv_, &xr_, &k_, &v_, &r_, &rw_}) v->resize(N * C);  // each written whole below
    nn::shift_forward(xx_.data(), a, B, T, C);
    const float *mk = io.w("att.time_mix_k"), *mv = io.w("att.time_mix_v"), *mr = io.w("att.time_mix_r");
    float *__restrict xk = xk_.data(), *__restrict xv = xv_.data(), *__restrict xr = xr_.data();
    const float* __restrict xx = xx_.data();
#pragma omp parallel for schedule(static) if (N * C >= nn::kParallelMin)
    for (int64_t i = 0; i < N; ++i)
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const int64_t j = i * C + c;
        xk[j] = a[j] * mk[c] + xx[j] * (1.0f - mk[c]);
        xv[j] = a[j] * mv[c] + xx[j] * (1.0f - mv[c]);
        xr[j] = a[j] * mr[c] + xx[j] * (1.0f - mr[c]);
      }
    nn::matmul_forward(k_.data(), xk_.data(), io.w("att.key.weight"), nullptr, N, C, C);
    nn::matmul_forward(v_.data(), xv_.data(), io.w("att.value.weight"), nullptr, N, C, C);
    nn::matmul_forward(r_.data(), xr_.data(), io.w("att.receptance.weight"), nullptr, N, C, C);
    float* r = r_.data();
#pragma omp parallel for simd schedule(static) if (N * C >= nn::kParallelMin)
    for (int64_t i = 0; i < N * C; ++i) r[i] = sigmoid1(r[i]);
    wkv_ = mixer_forward(lc_, inputs(io, B, T)).data;
    float* rw = rw_.data();
    const float* wkv = wkv_.data();
#pragma omp parallel for simd schedule(static) if (N * C >= nn::kParallelMin)
    for (int64_t i = 0; i < N * C; ++i) rw[i] = r[i] * wkv[i];
    nn::matmul_forward(out, rw_.data(), io.w("att.output.weight"), nullptr, N, C, C);
  }

  void backward(const LayerIO& io, const float* dout, float* da, int64_t B, int64_t T) override {
    const int64_t N = B * T, C = C_;
    std::vector<float> drw(N * C), dwkv(N * C), dr(N * C), dxk(N * C), dxv(N * C), dxr(N * C), dxx(N * C, 0.0f);
    nn::matmul_backward(drw.data(), io.g("att.output.weight"), nullptr, dout, rw_.data(), io.w("att.output.weight"),
                        N, C, C);
    {
      const float *r = r_.data(), *wkv = wkv_.data(), *g = drw.data();
      float *dw = dwkv.data(), *drr = dr.data();
#pragma omp parallel for simd schedule(static) if (N * C >= nn::kParallelMin)
      for (int64_t i = 0; i < N * C; ++i) {
        dw[i] = g[i] * r[i];
        drr[i] = g[i] * wkv[i] * r[i] * (1.0f - r[i]);
      }
    }
    const TensorMap in = inputs(io, B, T);
    const TensorMap g = mixer_backward(lc_, in, {B, T, C}, dwkv.data());
    float *gtd = io.g("att.time_decay"), *gtf = io.g("att.time_first");
    for (int64_t ch = 0; ch < C; ++ch) {
      gtd[ch] += g.at("dw").data[ch] * in.at("w").data[ch];  // w = exp(time_decay)
      gtf[ch] += g.at("du").data[ch];
    }
    nn::matmul_backward(dxk.data(), io.g("att.key.weight"), nullptr, g.at("dk").ptr(), xk_.data(),
                        io.w("att.key.weight"), N, C, C);
    nn::matmul_backward(dxv.data(), io.g("att.value.weight"), nullptr, g.at("dv").ptr(), xv_.data(),
                        io.w("att.value.weight"), N, C, C);
    nn::matmul_backward(dxr.data(), io.g("att.receptance.weight"), nullptr, dr.data(), xr_.data(),
                        io.w("att.receptance.weight"), N, C, C);
    const float *mk = io.w("att.time_mix_k"), *mv = io.w("att.time_mix_v"), *mr = io.w("att.time_mix_r");
    float *gmk = io.g("att.time_mix_k"), *gmv = io.g("att.time_mix_v"), *gmr = io.g("att.time_mix_r");
    std::vector<float> dself(N * C);
    // (raw pointers in the loops: through the vectors GCC does not vectorise them)
    const float *__restrict gk = dxk.data(), *__restrict gv = dxv.data(), *__restrict gr = dxr.data();
    const float *__restrict xa = a_, *__restrict xx = xx_.data();
    float *__restrict ds = dself.data(), *__restrict dsh = dxx.data();
#pragma omp parallel for schedule(static) if (N * C >= nn::kParallelMin)
    for (int64_t i = 0; i < N; ++i)
#pragma omp simd
      for (int64_t ch = 0; ch < C; ++ch) {
        const int64_t j = i * C + ch;
        ds[j] = gk[j] * mk[ch] + gv[j] * mv[ch] + gr[j] * mr[ch];
        dsh[j] = gk[j] * (1.0f - mk[ch]) + gv[j] * (1.0f - mv[ch]) + gr[j] * (1.0f - mr[ch]);
      }
    nn::column_sums<3>({gmk, gmv, gmr}, N, C, [&](int64_t i, int64_t ch) {  // the mixes' gradients
      const int64_t j = i * C + ch;
      const float diff = xa[j] - xx[j];
      return std::array<float, 3>{gk[j] * diff, gv[j] * diff, gr[j] * diff};
    });
    nn::shift_backward(dself.data(), dxx.data(), B, T, C);
#pragma omp parallel for simd schedule(static) if (N * C >= nn::kParallelMin)
    for (int64_t j = 0; j < N * C; ++j) da[j] += ds[j];
  }

  std::unique_ptr<LayerRun> start(const LayerIO& io, const TensorMap& state) const override;

 private:
  TensorMap inputs(const LayerIO& io, int64_t B, int64_t T) const {
    Tensor w({C_});
    const float* td = io.w("att.time_decay");
    for (int64_t c = 0; c < C_; ++c) w.data[c] = std::exp(td[c]);
    return moved_map("k", view_of({B, T, C_}, k_.data()), "v", view_of({B, T, C_}, v_.data()), "w", std::move(w),
                     "u", Tensor(io.t("att.time_first")));
  }
  std::vector<float> xx_, xk_, xv_, xr_, k_, v_, r_, wkv_, rw_;
  const float* a_ = nullptr;
};

class Rwkv4Run : public LayerRun {
 public:
  Rwkv4Run(const LayerIO& io, int64_t C, const LayerConfig& lc, const TensorMap& state, int64_t index)
      : C_(C), mk_(io.w("att.time_mix_k")), mv_(io.w("att.time_mix_v")), mr_(io.w("att.time_mix_r")),
        wk_(io.w("att.key.weight")), wv_(io.w("att.value.weight")), wr_(io.w("att.receptance.weight")),
        wo_(io.w("att.output.weight")), prev_(C, 0.0f), xk_(C), xv_(C), xr_(C), r_(C), y_(C) {
    Tensor w({C});
    const float* td = io.w("att.time_decay");
    for (int64_t c = 0; c < C; ++c) w.data[c] = std::exp(td[c]);
    TensorMap in{{"k", Tensor({1, 1, C})}, {"v", Tensor({1, 1, C})}, {"w", std::move(w)}, {"u", io.t("att.time_first")}};
    TensorMap own;
    const TensorMap mix = split_layer_state(state, {{"att_prev", C}}, own, index);
    if (own.count("att_prev")) prev_ = std::vector<float>(own.at("att_prev").data);
    mix_ = std::make_unique<MixerStep>(lc, std::move(in), mix);
  }
  void step(const float* a, float* out) override {
    for (int64_t c = 0; c < C_; ++c) {
      const float p = prev_[c];
      xk_[c] = a[c] * mk_[c] + p * (1 - mk_[c]);
      xv_[c] = a[c] * mv_[c] + p * (1 - mv_[c]);
      xr_[c] = a[c] * mr_[c] + p * (1 - mr_[c]);
    }
    std::copy(a, a + C_, prev_.begin());
    nn::matmul_forward(mix_->buf("k"), xk_.data(), wk_, nullptr, 1, C_, C_);
    nn::matmul_forward(mix_->buf("v"), xv_.data(), wv_, nullptr, 1, C_, C_);
    nn::matmul_forward(r_.data(), xr_.data(), wr_, nullptr, 1, C_, C_);
    mix_->step(y_.data());
    for (int64_t c = 0; c < C_; ++c) y_[c] *= sigmoid1(r_[c]);
    nn::matmul_forward(out, y_.data(), wo_, nullptr, 1, C_, C_);
  }
  TensorMap save() const override {
    TensorMap m = mix_->save();
    m["att_prev"] = tensor_of({C_}, prev_.data());
    return m;
  }

 private:
  int64_t C_;
  const float *mk_, *mv_, *mr_, *wk_, *wv_, *wr_, *wo_;
  std::vector<float> prev_, xk_, xv_, xr_, r_, y_;
  std::unique_ptr<MixerStep> mix_;
};

std::unique_ptr<LayerRun> Rwkv4Layer::start(const LayerIO& io, const TensorMap& state) const {
  return std::make_unique<Rwkv4Run>(io, C_, lc_, state, index_);
}

}  // namespace

std::unique_ptr<MixerLayer> rwkv4_layer(const ModelConfig& cfg, int64_t index) {
  return std::make_unique<Rwkv4Layer>(cfg, index);
}

}  // namespace linmix
