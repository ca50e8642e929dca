#include "channel_mix.h"

#include <algorithm>

#include "layers.h"

namespace linmix {

ParamShapes ChannelMix::shapes() const {
  if (rwkv_ && !recept_) return {{mk_, {1, 1, C_}}, {"ffn.key.weight", {F_, C_}}, {"ffn.value.weight", {C_, F_}}};
  if (rwkv_ && maa_)
    return {{mk_, {1, 1, C_}}, {mr_, {1, 1, C_}}, {"ffn.key.weight", {F_, C_}}, {"ffn.value.weight", {C_, F_}},
            {"ffn.receptance.weight", {C_, C_}}};
  if (rwkv_)
    return {{"ffn.time_mix_k", {C_}}, {"ffn.time_mix_r", {C_}}, {"ffn.key.weight", {F_, C_}},
            {"ffn.value.weight", {C_, F_}}, {"ffn.receptance.weight", {C_, C_}}};
  return {{"mlp.fc.weight", {F_, C_}}, {"mlp.fc.bias", {F_}}, {"mlp.proj.weight", {C_, F_}}, {"mlp.proj.bias", {C_}}};
}

void ChannelMix::lerp(float* x, const float* u, const float* p, const float* m, int64_t N) const {
  if (!maa_) return mix_shift(x, u, p, m, N, C_);  // RWKV-4/5's u m + p (1 - m)
#pragma omp parallel for schedule(static) if (N * C_ >= nn::kParallelMin)
  for (int64_t i = 0; i < N; ++i)
#pragma omp simd
    for (int64_t c = 0; c < C_; ++c) {
      const int64_t j = i * C_ + c;
      x[j] = u[j] + (p[j] - u[j]) * m[c];
    }
}

void ChannelMix::forward(const LayerIO& io, const float* b, float* out, int64_t B, int64_t T) {
  const int64_t N = B * T, C = C_, F = F_;
  b_ = b;
  if (rwkv_) {
    for (auto* v : {&xx_, &xk_, &xr_, &vv_, &r_}) v->resize(N * C);  // each written whole below (when used)
    kpre_.resize(N * F), kk_.resize(N * F);
    nn::shift_forward(xx_.data(), b, B, T, C);
    lerp(xk_.data(), b, xx_.data(), io.w(mk_), N);
    if (recept_) lerp(xr_.data(), b, xx_.data(), io.w(mr_), N);
    nn::matmul_forward(kpre_.data(), xk_.data(), io.w("ffn.key.weight"), nullptr, N, C, F);
    const float* kp = kpre_.data();
    float* kk = kk_.data();
#pragma omp parallel for simd schedule(static) if (N * F >= nn::kParallelMin)
    for (int64_t i = 0; i < N * F; ++i) kk[i] = kp[i] > 0 ? kp[i] * kp[i] : 0.0f;
    nn::matmul_forward(vv_.data(), kk_.data(), io.w("ffn.value.weight"), nullptr, N, F, C);
    if (recept_) {
      nn::matmul_forward(r_.data(), xr_.data(), io.w("ffn.receptance.weight"), nullptr, N, C, C);
      float* r = r_.data();
      const float* vv = vv_.data();
#pragma omp parallel for simd schedule(static) if (N * C >= nn::kParallelMin)
      for (int64_t i = 0; i < N * C; ++i) r[i] = sigmoid1(r[i]), out[i] = r[i] * vv[i];
    } else {
      std::copy(vv_.begin(), vv_.end(), out);
    }
  } else {
    h_pre_.assign(N * F, 0.0f), h_.assign(N * F, 0.0f);
    nn::matmul_forward(h_pre_.data(), b, io.w("mlp.fc.weight"), io.w("mlp.fc.bias"), N, C, F);
    nn::gelu_forward(h_.data(), h_pre_.data(), N * F);
    nn::matmul_forward(out, h_.data(), io.w("mlp.proj.weight"), io.w("mlp.proj.bias"), N, F, C);
  }
}

void ChannelMix::backward(const LayerIO& io, const float* dout, float* db, int64_t B, int64_t T) {
  const int64_t N = B * T, C = C_, F = F_;
  if (rwkv_) {
    std::vector<float> dvv(N * C), dr2(N * C), dkk(N * F), dxk2(N * C), dxr2(N * C), dxx2(N * C, 0.0f);
    {
      const float *r = r_.data(), *vv = vv_.data();
      float *dv = dvv.data(), *dr = dr2.data();
      const bool rec = recept_;
#pragma omp parallel for simd schedule(static) if (N * C >= nn::kParallelMin)
      for (int64_t i = 0; i < N * C; ++i) {
        dv[i] = rec ? dout[i] * r[i] : dout[i];
        dr[i] = rec ? dout[i] * vv[i] * r[i] * (1.0f - r[i]) : 0.0f;
      }
    }
    if (recept_)
      nn::matmul_backward(dxr2.data(), io.g("ffn.receptance.weight"), nullptr, dr2.data(), xr_.data(),
                          io.w("ffn.receptance.weight"), N, C, C);
    nn::matmul_backward(dkk.data(), io.g("ffn.value.weight"), nullptr, dvv.data(), kk_.data(),
                        io.w("ffn.value.weight"), N, F, C);
    {
      const float* kp = kpre_.data();
      float* d = dkk.data();
#pragma omp parallel for simd schedule(static) if (N * F >= nn::kParallelMin)
      for (int64_t i = 0; i < N * F; ++i) d[i] = kp[i] > 0 ? d[i] * 2.0f * kp[i] : 0.0f;
    }
    nn::matmul_backward(dxk2.data(), io.g("ffn.key.weight"), nullptr, dkk.data(), xk_.data(), io.w("ffn.key.weight"),
                        N, C, F);
    // x = u m + p (1 - m): du = dx m, dp = dx (1 - m), dm = dx (u - p); the maa form swaps the
    // roles of u and p (x = p m + u (1 - m))
    const float *mk = io.w(mk_), *mr = recept_ ? io.w(mr_) : nullptr;
    float *gmk = io.g(mk_), *gmr = recept_ ? io.g(mr_) : nullptr;
#pragma omp parallel for schedule(static) if (N * C >= nn::kParallelMin)
    for (int64_t i = 0; i < N; ++i)
#pragma omp simd
      for (int64_t ch = 0; ch < C; ++ch) {
        const int64_t j = i * C + ch;
        const float fk = maa_ ? 1.0f - mk[ch] : mk[ch], fr = mr ? (maa_ ? 1.0f - mr[ch] : mr[ch]) : 0.0f;
        db[j] = dxk2[j] * fk + dxr2[j] * fr;
        dxx2[j] = dxk2[j] * (1.0f - fk) + dxr2[j] * (1.0f - fr);
      }
    nn::column_sums<2>({gmk, gmr}, N, C, [&](int64_t i, int64_t ch) {  // the mixes' gradients
      const int64_t j = i * C + ch;
      const float diff = maa_ ? xx_[j] - b_[j] : b_[j] - xx_[j];
      return std::array<float, 2>{dxk2[j] * diff, dxr2[j] * diff};
    });
    nn::shift_backward(db, dxx2.data(), B, T, C);
  } else {
    std::vector<float> dh(N * F);
    nn::matmul_backward(dh.data(), io.g("mlp.proj.weight"), io.g("mlp.proj.bias"), dout, h_.data(),
                        io.w("mlp.proj.weight"), N, F, C);
    nn::gelu_backward(dh.data(), h_pre_.data(), dh.data(), N * F);
    nn::matmul_backward(db, io.g("mlp.fc.weight"), io.g("mlp.fc.bias"), dh.data(), b_, io.w("mlp.fc.weight"), N, C, F);
  }
}

void ChannelMix::step(const LayerIO& io, const float* b, float* out, std::vector<float>& prev) {
  const int64_t C = C_, F = F_;
  sh_.resize(F), so_.resize(C), sk_.resize(C), sr_.resize(C);
  if (rwkv_) {
    lerp(sk_.data(), b, prev.data(), io.w(mk_), 1);
    if (recept_) lerp(sr_.data(), b, prev.data(), io.w(mr_), 1);
    std::copy(b, b + C, prev.begin());
    nn::matmul_forward(sh_.data(), sk_.data(), io.w("ffn.key.weight"), nullptr, 1, C, F);
    for (float& e : sh_) e = e > 0 ? e * e : 0.0f;
    nn::matmul_forward(so_.data(), sh_.data(), io.w("ffn.value.weight"), nullptr, 1, F, C);
    sg_.resize(C);
    if (recept_) {
      nn::matmul_forward(sg_.data(), sr_.data(), io.w("ffn.receptance.weight"), nullptr, 1, C, C);
      for (int64_t ch = 0; ch < C; ++ch) out[ch] = sigmoid1(sg_[ch]) * so_[ch];
    } else {
      std::copy(so_.begin(), so_.end(), out);
    }
  } else {
    std::vector<float>& h2 = sk_;
    h2.resize(F);
    nn::matmul_forward(sh_.data(), b, io.w("mlp.fc.weight"), io.w("mlp.fc.bias"), 1, C, F);
    nn::gelu_forward(h2.data(), sh_.data(), F);
    nn::matmul_forward(out, h2.data(), io.w("mlp.proj.weight"), io.w("mlp.proj.bias"), 1, F, C);
  }
}

}  // namespace linmix
