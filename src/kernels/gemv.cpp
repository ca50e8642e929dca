#include "kernels/gemv.h"

// GCC 12 reports its own _mm512 reduce intrinsics as maybe-uninitialized (a known false positive).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>

#include "linmix/error.h"

namespace linmix {

WType parse_wtype(const std::string& s) {
  if (s == "f32" || s == "fp32") return WType::F32;
  if (s == "bf16") return WType::BF16;
  if (s == "int8" || s == "i8") return WType::I8;
  if (s == "q4") return WType::Q4;
  throw Error("unknown weight type '" + s + "' (expected f32, bf16, int8 or q4)");
}

const char* wtype_name(WType t) {
  return t == WType::F32 ? "f32" : t == WType::BF16 ? "bf16" : t == WType::I8 ? "int8" : "q4";
}

float f16_to_f32(uint16_t h) { return _cvtsh_ss(h); }

float bf16_to_f32(uint16_t h) {
  const uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if (std::isnan(f)) return uint16_t((u >> 16) | 0x40);
  u += 0x7fff + ((u >> 16) & 1);
  return uint16_t(u >> 16);
}

QMatrix QMatrix::from_f32(const float* W, int64_t rows, int64_t cols, WType type) {
  QMatrix q;
  q.rows = rows, q.cols = cols, q.type = type;
  const size_t n = size_t(rows) * size_t(cols);
  switch (type) {
    case WType::F32:
      q.f32.assign(W, W + n);
      break;
    case WType::BF16:
      q.bf16.resize(n);
      for (size_t i = 0; i < n; ++i) q.bf16[i] = f32_to_bf16(W[i]);
      break;
    case WType::I8:
      q.i8.resize(n), q.scale.resize(rows);
      for (int64_t r = 0; r < rows; ++r) {
        const float* w = W + r * cols;
        float mx = 0.0f;
        for (int64_t c = 0; c < cols; ++c) mx = std::max(mx, std::fabs(w[c]));
        const float s = mx > 0.0f ? mx / 127.0f : 1.0f;
        q.scale[r] = s;
        for (int64_t c = 0; c < cols; ++c)
          q.i8[r * cols + c] = int8_t(std::lrint(std::clamp(w[c] / s, -127.0f, 127.0f)));
      }
      break;
    case WType::Q4: {
      const int64_t G = q.q4_groups(), RB = (rows + kQ4Rows - 1) / kQ4Rows;
      q.q4.assign(size_t(RB * G * kQ4Tile), 0), q.q4d.assign(size_t(RB * G * kQ4Rows), 0), q.q4m.assign(size_t(RB * G * kQ4Rows), 0);
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t g = 0; g < G; ++g) {
          const float* w = W + r * cols + g * kQ4Group;
          const int64_t n = std::min(kQ4Group, cols - g * kQ4Group);
          float lo = w[0], hi = w[0];
          for (int64_t i = 1; i < n; ++i) lo = std::min(lo, w[i]), hi = std::max(hi, w[i]);
          // m rounded down, d rounded up: [m, m + 15 d] covers [lo, hi]
          const uint16_t mh = _cvtss_sh(lo, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
          const float m = _cvtsh_ss(mh);
          const uint16_t dh = _cvtss_sh((hi - m) / 15.0f, _MM_FROUND_TO_POS_INF | _MM_FROUND_NO_EXC);
          const float d = _cvtsh_ss(dh);
          LINMIX_CHECK(std::isfinite(m) && std::isfinite(d),
                       "q4: weights past fp16's range (|w| > 65504) in row " + std::to_string(r));
          const size_t at = q.q4_at(r, g);
          q.q4d[at] = dh, q.q4m[at] = mh;
          uint8_t* tile = &q.q4[at / kQ4Rows * kQ4Tile];
          for (int64_t k = 0; k < n; ++k) {
            const int v = d > 0.0f ? int(std::clamp(std::lrint((w[k] - m) / d), 0L, 15L)) : 0;
            uint8_t& byte = tile[64 * ((k % 32) / 4) + 4 * (r % kQ4Rows) + k % 4];
            byte = uint8_t(byte | (k < 32 ? v : v << 4));
          }
        }
      break;
    }
  }
  return q;
}

void QMatrix::to_f32(float* out) const {
  const int64_t n = rows * cols;
  switch (type) {
    case WType::F32:
      std::copy(f32.begin(), f32.end(), out);
      break;
    case WType::BF16:
#pragma omp parallel for schedule(static) if (n > (1 << 16))
      for (int64_t i = 0; i < n; ++i) out[i] = bf16_to_f32(bf16[i]);
      break;
    case WType::I8:
#pragma omp parallel for schedule(static) if (n > (1 << 16))
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < cols; ++c) out[r * cols + c] = float(i8[r * cols + c]) * scale[r];
      break;
    case WType::Q4: {
      const int64_t G = q4_groups(), RB = (rows + kQ4Rows - 1) / kQ4Rows;
#pragma omp parallel for schedule(static) if (n > (1 << 16))
      for (int64_t rb = 0; rb < RB; ++rb)
        for (int64_t g = 0; g < G; ++g) {  // a tile: 16 rows' steps and offsets once, their 64 values
          const int64_t c0 = g * kQ4Group, n_g = std::min(kQ4Group, cols - c0), nr = std::min(kQ4Rows, rows - rb * kQ4Rows);
          const size_t at = size_t((rb * G + g) * kQ4Rows);
          const uint8_t* tile = &q4[at / kQ4Rows * kQ4Tile];
          if (n_g == kQ4Group && nr == kQ4Rows) {  // a whole tile: 8 values (4 of two rows) a step
            __m256 dp[8], mp[8];
            for (int p = 0; p < 8; ++p)
              dp[p] = _mm256_setr_m128(_mm_set1_ps(f16_to_f32(q4d[at + size_t(2 * p)])), _mm_set1_ps(f16_to_f32(q4d[at + size_t(2 * p + 1)]))),
              mp[p] = _mm256_setr_m128(_mm_set1_ps(f16_to_f32(q4m[at + size_t(2 * p)])), _mm_set1_ps(f16_to_f32(q4m[at + size_t(2 * p + 1)])));
            const __m256i m4 = _mm256_set1_epi8(0x0F);
            float* o = out + rb * kQ4Rows * cols + c0;
            alignas(32) uint8_t nib[2][64];  // a line's low nibbles, then its high ones
            for (int i = 0; i < 8; ++i) {
              for (int h = 0; h < 2; ++h) {
                const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tile + 64 * i + 32 * h));
                _mm256_store_si256(reinterpret_cast<__m256i*>(nib[0] + 32 * h), _mm256_and_si256(v, m4));
                _mm256_store_si256(reinterpret_cast<__m256i*>(nib[1] + 32 * h), _mm256_and_si256(_mm256_srli_epi16(v, 4), m4));
              }
              for (int u = 0; u < 2; ++u)  // values 4 i .. (low) and 32 + 4 i .. (high)
                for (int p = 0; p < 8; ++p) {
                  const __m256 qv = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(nib[u] + 8 * p))));
                  const __m256 w = _mm256_fmadd_ps(qv, dp[p], mp[p]);
                  float* row = o + 2 * p * cols + 32 * u + 4 * i;
                  _mm_storeu_ps(row, _mm256_castps256_ps128(w)), _mm_storeu_ps(row + cols, _mm256_extractf128_ps(w, 1));
                }
            }
            continue;
          }
          for (int64_t j = 0; j < nr; ++j) {
            const float d = f16_to_f32(q4d[at + size_t(j)]), m = f16_to_f32(q4m[at + size_t(j)]);
            float* o = out + (rb * kQ4Rows + j) * cols + c0;
            for (int64_t k = 0; k < std::min<int64_t>(n_g, 32); ++k) o[k] = d * float(tile[64 * (k / 4) + 4 * j + k % 4] & 15) + m;
            for (int64_t k = 32; k < n_g; ++k) o[k] = d * float(tile[64 * ((k - 32) / 4) + 4 * j + k % 4] >> 4) + m;
          }
        }
      break;
    }
  }
}

size_t QMatrix::bytes() const {
  return f32.size() * 4 + bf16.size() * 2 + i8.size() + scale.size() * 4 + q4.size() + (q4d.size() + q4m.size()) * 2;
}

namespace {

// Each kernel computes 4 rows at a time so that every load of x serves four weight streams.
// Loads of weights are the only memory traffic that matters; x (<= 16 KiB) stays in L1.

// ---- AVX2 + FMA (the x86-64-v3 baseline) ----
inline __m256 load8_f32(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8_bf16(const uint16_t* p) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
inline __m256 load8_i8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <class T>
inline float scalar_w(const T* p, int64_t i) {
  if constexpr (std::is_same_v<T, float>) return p[i];
  else if constexpr (std::is_same_v<T, uint16_t>) return bf16_to_f32(p[i]);
  else return float(p[i]);
}

template <class T>
void rows_avx2(const T* W, const float* x, float* y, int64_t r0, int64_t r1, int64_t cols) {
  auto load = [](const T* p) {
    if constexpr (std::is_same_v<T, float>) return load8_f32(p);
    else if constexpr (std::is_same_v<T, uint16_t>) return load8_bf16(p);
    else return load8_i8(p);
  };
  const int64_t cv = cols & ~int64_t(7);
  int64_t r = r0;
  for (; r + 4 <= r1; r += 4) {
    const T *w0 = W + r * cols, *w1 = w0 + cols, *w2 = w1 + cols, *w3 = w2 + cols;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t i = 0; i < cv; i += 8) {
      const __m256 xv = _mm256_loadu_ps(x + i);
      a0 = _mm256_fmadd_ps(load(w0 + i), xv, a0);
      a1 = _mm256_fmadd_ps(load(w1 + i), xv, a1);
      a2 = _mm256_fmadd_ps(load(w2 + i), xv, a2);
      a3 = _mm256_fmadd_ps(load(w3 + i), xv, a3);
    }
    float s[4] = {hsum8(a0), hsum8(a1), hsum8(a2), hsum8(a3)};
    for (int64_t i = cv; i < cols; ++i)
      for (int j = 0; j < 4; ++j) s[j] += scalar_w(W + (r + j) * cols, i) * x[i];
    for (int j = 0; j < 4; ++j) y[r + j] = s[j];
  }
  for (; r < r1; ++r) {
    const T* w = W + r * cols;
    __m256 a = _mm256_setzero_ps();
    for (int64_t i = 0; i < cv; i += 8) a = _mm256_fmadd_ps(load(w + i), _mm256_loadu_ps(x + i), a);
    float s = hsum8(a);
    for (int64_t i = cv; i < cols; ++i) s += scalar_w(w, i) * x[i];
    y[r] = s;
  }
}

// Q4 rows [r0, r1) in FP32, value by value: where x holds a NaN, an infinity or only values below
// 1e-30 (quantize_q4x refuses it; the products carry a NaN to y).
void rows_q4_f32(const QMatrix& W, const float* x, float* y, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    float s = 0.0f;
    for (int64_t g = 0; g < W.q4_groups(); ++g) {
      const float d = f16_to_f32(W.q4d[W.q4_at(r, g)]), m = f16_to_f32(W.q4m[W.q4_at(r, g)]);
      for (int64_t c = g * QMatrix::kQ4Group; c < std::min(W.cols, (g + 1) * QMatrix::kQ4Group); ++c)
        s += (d * float(W.q4_value(r, c)) + m) * x[c];
    }
    y[r] = s;
  }
}

// x for the Q4 kernels (rows_q4_avx2, rows_q4_avx512): rounded to int16 within +-32639 (a step xs =
// max|x| / 32639) and split into two signed bytes, x16 = 256 xh + xl (xh = (x16 + 128) >> 8, both in
// -128..127), so that the products run as bytes (u8 q times s8 x: vpdpbusd, or vpmaddubsw + vpmaddwd):
// x8 holds per group 128 bytes, its 64 xh then its 64 xl (zeros past cols). sums: per group sx,
// the FP32 sum of x over it (the offsets' factor), then per group cx = 7.5 (sx - xs sum x16), 7.5
// times the rounding of x's sum over it. A row's integer products carry sum_c q_c e_c off per
// group (e_c = x_c - xs x16_c); adding d_g cx_g leaves sum_c (q_c - 7.5) e_c, at most half as large
// and, for values spread over 0..15, mostly a few times smaller. false (nothing written) as
// integer_x_max (rows_q4_f32 then runs).
// max|x| into mx, for the integer kernels' step (quantize_x16, quantize_q4x); false when x holds a
// NaN or an infinity (the FP32 kernels then run, and carry it to y) or when max|x| is below 1e-30
// (zero, or so small that 1 / step would overflow: the FP32 kernels too).
bool integer_x_max(const float* x, int64_t cols, float& mx) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 mxv = _mm256_setzero_ps(), nan = mxv;
  int64_t c = 0;
  for (; c + 8 <= cols; c += 8) {
    const __m256 xv = _mm256_loadu_ps(x + c);
    mxv = _mm256_max_ps(mxv, _mm256_andnot_ps(sign, xv)), nan = _mm256_or_ps(nan, _mm256_cmp_ps(xv, xv, _CMP_UNORD_Q));
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, mxv);
  mx = 0.0f;
  for (float l : lanes) mx = std::max(mx, l);
  bool finite = _mm256_testz_ps(nan, nan);
  for (; c < cols; ++c) mx = std::max(mx, std::fabs(x[c])), finite &= !std::isnan(x[c]);
  return finite && mx >= 1e-30f && mx <= std::numeric_limits<float>::max();
}

bool quantize_q4x(const float* x, int64_t cols, std::vector<int8_t>& x8, float& xs, std::vector<float>& sums) {
  float mx;
  if (!integer_x_max(x, cols, mx)) return false;
  const int64_t G = (cols + QMatrix::kQ4Group - 1) / QMatrix::kQ4Group;
  if (x8.size() < size_t(G * 128)) x8.resize(size_t(G * 128));
  if (sums.size() < size_t(2 * G)) sums.resize(size_t(2 * G));
  xs = mx / 32639.0f;
  const float inv = 1.0f / xs;
  const __m256 invv = _mm256_set1_ps(inv), xsv = _mm256_set1_ps(xs), lim = _mm256_set1_ps(32639.0f);
  const __m256i k128 = _mm256_set1_epi32(128), order = _mm256_setr_epi32(0, 1, 4, 5, 2, 3, 6, 7);
  float tail[QMatrix::kQ4Group];
  for (int64_t g = 0; g < G; ++g) {
    const float* xg = x + g * QMatrix::kQ4Group;
    const int64_t n = std::min(QMatrix::kQ4Group, cols - g * QMatrix::kQ4Group);
    if (n < QMatrix::kQ4Group) {  // the short last group, padded with zeros
      std::fill(tail, tail + QMatrix::kQ4Group, 0.0f);
      std::copy(xg, xg + n, tail);
      xg = tail;
    }
    __m256 sx = _mm256_setzero_ps(), se = sx;  // sum x, and sum of x's rounding x - xs x16
    for (int64_t k = 0; k < QMatrix::kQ4Group; k += 16) {
      __m256i h[2], l[2];
      for (int j = 0; j < 2; ++j) {
        const __m256 xv = _mm256_loadu_ps(xg + k + 8 * j);
        const __m256 q = _mm256_min_ps(lim, _mm256_max_ps(-lim, _mm256_round_ps(_mm256_mul_ps(xv, invv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)));
        const __m256i v = _mm256_cvtps_epi32(q);
        h[j] = _mm256_srai_epi32(_mm256_add_epi32(v, k128), 8);
        l[j] = _mm256_sub_epi32(v, _mm256_slli_epi32(h[j], 8));
        sx = _mm256_add_ps(sx, xv), se = _mm256_add_ps(se, _mm256_fnmadd_ps(xsv, q, xv));
      }
      // 16 int32 -> 16 int8 in order: pack to words (lanes interleaved), reorder, pack to bytes
      auto bytes16 = [&](__m256i a, __m256i b) {
        const __m256i w = _mm256_permutevar8x32_epi32(_mm256_packs_epi32(a, b), order);
        return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packs_epi16(w, w), 0x08));
      };
      _mm_storeu_si128(reinterpret_cast<__m128i*>(x8.data() + g * 128 + k), bytes16(h[0], h[1]));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(x8.data() + g * 128 + 64 + k), bytes16(l[0], l[1]));
    }
    sums[size_t(g)] = hsum8(sx), sums[size_t(G + g)] = 7.5f * hsum8(se);
  }
  return true;
}

// Q4 rows [r0, r1) (whole tiles of 16 rows, y written only in [r0, r1)) against x as quantize_q4x
// makes it, AVX2: y_r = sum_g d_g (xs S_rg + cx_g) + m_g sx_g with S_rg = sum_k q_k x16_k =
// 256 sum q xh + sum q xl. A tile's 64-byte line holds four values of each of its 16 rows; its two
// 32-byte halves (rows 0-7, 8-15) are split into low and high nibbles (values 4i..4i+3 and 32 + 4i..)
// and multiplied with those values' xh and xl broadcast to every row (vpmaddubsw + vpmaddwd: at
// most 2 x 15 x 128 a pair, no saturation); the rows stay in the lanes to the end (no horizontal sums).
void rows_q4_avx2(const QMatrix& W, const int8_t* x8, float xs, const float* sums, float* y, int64_t r0, int64_t r1) {
  const int64_t G = W.q4_groups();
  const __m256i m4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  auto dot = [&](__m256i acc, __m256i w, __m256i x) {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), ones));
  };
  for (int64_t rb = r0 / QMatrix::kQ4Rows; rb * QMatrix::kQ4Rows < r1; ++rb) {
    __m256 f0 = _mm256_setzero_ps(), f1 = f0;
    for (int64_t g = 0; g < G; ++g) {
      const uint8_t* tile = W.q4.data() + (rb * G + g) * QMatrix::kQ4Tile;
      const int8_t* xg = x8 + g * 128;
      __m256i h0 = _mm256_setzero_si256(), h1 = h0, l0 = h0, l1 = h0;
      for (int i = 0; i < 8; ++i) {
        const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tile + 64 * i));
        const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tile + 64 * i + 32));
        const __m256i lo0 = _mm256_and_si256(v0, m4), hi0 = _mm256_and_si256(_mm256_srli_epi16(v0, 4), m4);
        const __m256i lo1 = _mm256_and_si256(v1, m4), hi1 = _mm256_and_si256(_mm256_srli_epi16(v1, 4), m4);
        int32_t a, b, c, d;
        std::memcpy(&a, xg + 4 * i, 4), std::memcpy(&b, xg + 32 + 4 * i, 4);
        std::memcpy(&c, xg + 64 + 4 * i, 4), std::memcpy(&d, xg + 96 + 4 * i, 4);
        const __m256i xa = _mm256_set1_epi32(a), xb = _mm256_set1_epi32(b), ya = _mm256_set1_epi32(c), yb = _mm256_set1_epi32(d);
        h0 = dot(dot(h0, lo0, xa), hi0, xb), h1 = dot(dot(h1, lo1, xa), hi1, xb);
        l0 = dot(dot(l0, lo0, ya), hi0, yb), l1 = dot(dot(l1, lo1, ya), hi1, yb);
      }
      const size_t at = size_t((rb * G + g) * QMatrix::kQ4Rows);
      const __m256 s0 = _mm256_cvtepi32_ps(_mm256_add_epi32(_mm256_slli_epi32(h0, 8), l0));
      const __m256 s1 = _mm256_cvtepi32_ps(_mm256_add_epi32(_mm256_slli_epi32(h1, 8), l1));
      const __m256 xsv = _mm256_set1_ps(xs), cx = _mm256_set1_ps(sums[G + g]), sx = _mm256_set1_ps(sums[g]);
      auto half = [&](const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); };
      f0 = _mm256_fmadd_ps(half(W.q4d.data() + at), _mm256_fmadd_ps(s0, xsv, cx), f0);
      f1 = _mm256_fmadd_ps(half(W.q4d.data() + at + 8), _mm256_fmadd_ps(s1, xsv, cx), f1);
      f0 = _mm256_fmadd_ps(half(W.q4m.data() + at), sx, f0);
      f1 = _mm256_fmadd_ps(half(W.q4m.data() + at + 8), sx, f1);
    }
    alignas(32) float out[16];
    _mm256_store_ps(out, f0), _mm256_store_ps(out + 8, f1);
    for (int64_t r = std::max(r0, rb * QMatrix::kQ4Rows); r < std::min(r1, (rb + 1) * QMatrix::kQ4Rows); ++r)
      y[r] = out[r - rb * QMatrix::kQ4Rows];
  }
}

// ---- AVX-512 (F + BW), chosen at run time ----
#define LINMIX_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,avx2")))

LINMIX_AVX512 inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
LINMIX_AVX512 inline __m512 load16(const uint16_t* p) {
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
LINMIX_AVX512 inline __m512 load16(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
LINMIX_AVX512 inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
LINMIX_AVX512 inline __m512 load16(const uint16_t* p, __mmask16 m) {
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
LINMIX_AVX512 inline __m512 load16(const int8_t* p, __mmask16 m) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, p)));
}

constexpr int64_t kAhead = 0;  // prefetch distance, in blocks of 4 rows beyond the next
// Besides the next block into L1, the block about kFarBytes beyond it into L2 (prefetcht1), at the
// same pace: from DRAM the next block alone left the loads waiting. A driver alternating the two in
// one process, 100 matrices (940 MB), 2 threads: int8 12288 x 768 21.2-21.4 -> 25.4-27.3 GB/s (the
// block 2-4 beyond: alike), f32 3072 x 768 27.7-28.4 -> 30.1-31.5, bf16 6144 x 768 22.8-23.4 -> 26.6-28.4.
constexpr int64_t kFarBytes = 8192;
inline int64_t far_blocks(int64_t block_bytes) { return std::max<int64_t>(1, (kFarBytes + block_bytes - 1) / block_bytes); }
template <class T>
LINMIX_AVX512 void rows_avx512(const T* W, const float* x, float* y, int64_t r0, int64_t r1, int64_t cols,
                               int64_t rows_total) {
  const int64_t cv = cols & ~int64_t(15);
  const __mmask16 tail = __mmask16((1u << (cols - cv)) - 1u);
  int64_t r = r0;
  for (; r + 4 <= r1; r += 4) {
    const T *w0 = W + r * cols, *w1 = w0 + cols, *w2 = w1 + cols, *w3 = w2 + cols;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    // the next 4 rows (contiguous) are prefetched at the pace this block is read: rows of a
    // few cache lines are too short for the hardware stream prefetcher to ramp up
    const char* next = reinterpret_cast<const char*>(w3 + cols + kAhead * 4 * cols);
    const bool pf = r + 4 * (kAhead + 2) <= rows_total;
    const int64_t nfar = far_blocks(4 * cols * int64_t(sizeof(T)));
    const char* far = next + nfar * 4 * cols * int64_t(sizeof(T));
    const bool pf_far = r + 4 * (kAhead + 2 + nfar) <= rows_total;
    for (int64_t i = 0; i < cv; i += 16) {
      if (pf)
        for (int64_t l = 0; l < int64_t(4 * 16 * sizeof(T)); l += 64) _mm_prefetch(next + 4 * i * sizeof(T) + l, _MM_HINT_T0);
      if (pf_far)
        for (int64_t l = 0; l < int64_t(4 * 16 * sizeof(T)); l += 64) _mm_prefetch(far + 4 * i * sizeof(T) + l, _MM_HINT_T1);
      const __m512 xv = _mm512_loadu_ps(x + i);
      a0 = _mm512_fmadd_ps(load16(w0 + i), xv, a0);
      a1 = _mm512_fmadd_ps(load16(w1 + i), xv, a1);
      a2 = _mm512_fmadd_ps(load16(w2 + i), xv, a2);
      a3 = _mm512_fmadd_ps(load16(w3 + i), xv, a3);
    }
    if (tail) {
      const __m512 xv = _mm512_maskz_loadu_ps(tail, x + cv);
      a0 = _mm512_fmadd_ps(load16(w0 + cv, tail), xv, a0);
      a1 = _mm512_fmadd_ps(load16(w1 + cv, tail), xv, a1);
      a2 = _mm512_fmadd_ps(load16(w2 + cv, tail), xv, a2);
      a3 = _mm512_fmadd_ps(load16(w3 + cv, tail), xv, a3);
    }
    y[r] = _mm512_reduce_add_ps(a0), y[r + 1] = _mm512_reduce_add_ps(a1);
    y[r + 2] = _mm512_reduce_add_ps(a2), y[r + 3] = _mm512_reduce_add_ps(a3);
  }
  for (; r < r1; ++r) {
    const T* w = W + r * cols;
    __m512 a = _mm512_setzero_ps();
    for (int64_t i = 0; i < cv; i += 16) a = _mm512_fmadd_ps(load16(w + i), _mm512_loadu_ps(x + i), a);
    if (tail) a = _mm512_fmadd_ps(load16(w + cv, tail), _mm512_maskz_loadu_ps(tail, x + cv), a);
    y[r] = _mm512_reduce_add_ps(a);
  }
}

// INT8 rows against x rounded to int16 (xq = round(x / xs), xs = max|x| / 32767, padded with
// zeros to a multiple of 32): 32 products a step as integers (weights widened to int16, pairs
// multiplied and added into int32: vpmaddwd), where the FP32 path takes three instructions per 16
// (widen, convert, FMA) and is bound by them, not by memory: a 65536 x 768 product (RWKV's head),
// 2 threads, 53-60 -> 70-82 GB/s, the read stream's rate (VNNI's vpdpwssd, one instruction for the
// multiply and the add, measured no faster: memory-bound either way). The rounding of x adds at most
// xs / 2 sum_c |w_c| to a row (a relative 2^-16 of max|x|, beside int8's max|w| / 254 per weight).
// A pair of products is at most 2 127 32767 < 2^23.0, so an int32 lane takes 256 of them: the
// lanes go to FP32 every kI8Seg columns (16 pairs a lane per 512 columns).
// Where the CPU has AVX512-VNNI, vpdpwssd does the multiply and the add in one instruction (the
// widening of the weights and vpmaddwd + vpaddd: 3 vector ALU operations per 32 weights, 2 with it).
constexpr int64_t kI8Seg = 8192;
#define LINMIX_AVX512_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,avx2,avx512vnni")))
template <bool kVnni>
LINMIX_AVX512_VNNI inline __m512i i8_dot(__m512i acc, __m512i w, __m512i x) {  // acc + pairwise w x
  if constexpr (kVnni) return _mm512_dpwssd_epi32(acc, w, x);
  else return _mm512_add_epi32(acc, _mm512_madd_epi16(w, x));
}
LINMIX_AVX512 inline __m512i wload(const int8_t* p) {  // 32 weights widened to int16
  return _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
LINMIX_AVX512 inline __m512i wload_masked(const int8_t* p, __mmask32 m) {
  return _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(m, p));
}
template <bool kVnni>
LINMIX_AVX512_VNNI void rows_i8_avx512(const int8_t* W, const int16_t* xq, float xs, float* y, int64_t r0, int64_t r1,
                                       int64_t cols, int64_t rows_total) {
  int64_t r = r0;
  for (; r + 4 <= r1; r += 4) {
    const int8_t *w0 = W + r * cols, *w1 = w0 + cols, *w2 = w1 + cols, *w3 = w2 + cols;
    const char* next = reinterpret_cast<const char*>(w3 + cols);
    const bool pf = r + 8 <= rows_total;
    const int64_t nfar = far_blocks(4 * cols);
    const char* far = next + nfar * 4 * cols;
    const bool pf_far = r + 8 + 4 * nfar <= rows_total;
    __m512 f0 = _mm512_setzero_ps(), f1 = f0, f2 = f0, f3 = f0;
    for (int64_t c0 = 0; c0 < cols; c0 += kI8Seg) {
      const int64_t c1 = std::min(cols, c0 + kI8Seg), cv = c0 + ((c1 - c0) & ~int64_t(31));
      __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
      for (int64_t i = c0; i < cv; i += 32) {
        if (pf) _mm_prefetch(next + 4 * i, _MM_HINT_T0), _mm_prefetch(next + 4 * i + 64, _MM_HINT_T0);
        if (pf_far) _mm_prefetch(far + 4 * i, _MM_HINT_T1), _mm_prefetch(far + 4 * i + 64, _MM_HINT_T1);
        const __m512i xv = _mm512_loadu_si512(xq + i);
        a0 = i8_dot<kVnni>(a0, wload(w0 + i), xv);
        a1 = i8_dot<kVnni>(a1, wload(w1 + i), xv);
        a2 = i8_dot<kVnni>(a2, wload(w2 + i), xv);
        a3 = i8_dot<kVnni>(a3, wload(w3 + i), xv);
      }
      if (cv < c1) {  // xq is zero past cols: only the weights need a mask
        const __mmask32 m = __mmask32((uint64_t(1) << (c1 - cv)) - 1u);
        const __m512i xv = _mm512_loadu_si512(xq + cv);
        a0 = i8_dot<kVnni>(a0, wload_masked(w0 + cv, m), xv);
        a1 = i8_dot<kVnni>(a1, wload_masked(w1 + cv, m), xv);
        a2 = i8_dot<kVnni>(a2, wload_masked(w2 + cv, m), xv);
        a3 = i8_dot<kVnni>(a3, wload_masked(w3 + cv, m), xv);
      }
      f0 = _mm512_add_ps(f0, _mm512_cvtepi32_ps(a0)), f1 = _mm512_add_ps(f1, _mm512_cvtepi32_ps(a1));
      f2 = _mm512_add_ps(f2, _mm512_cvtepi32_ps(a2)), f3 = _mm512_add_ps(f3, _mm512_cvtepi32_ps(a3));
    }
    y[r] = _mm512_reduce_add_ps(f0) * xs, y[r + 1] = _mm512_reduce_add_ps(f1) * xs;
    y[r + 2] = _mm512_reduce_add_ps(f2) * xs, y[r + 3] = _mm512_reduce_add_ps(f3) * xs;
  }
  for (; r < r1; ++r) {
    const int8_t* w = W + r * cols;
    __m512 f = _mm512_setzero_ps();
    for (int64_t c0 = 0; c0 < cols; c0 += kI8Seg) {
      const int64_t c1 = std::min(cols, c0 + kI8Seg), cv = c0 + ((c1 - c0) & ~int64_t(31));
      __m512i a = _mm512_setzero_si512();
      for (int64_t i = c0; i < cv; i += 32) a = i8_dot<kVnni>(a, wload(w + i), _mm512_loadu_si512(xq + i));
      if (cv < c1)
        a = i8_dot<kVnni>(a, wload_masked(w + cv, __mmask32((uint64_t(1) << (c1 - cv)) - 1u)), _mm512_loadu_si512(xq + cv));
      f = _mm512_add_ps(f, _mm512_cvtepi32_ps(a));
    }
    y[r] = _mm512_reduce_add_ps(f) * xs;
  }
}

// x as int16 for rows_i8_avx512: xq (cols rounded up to 32, zeros past cols) and its step; false
// as integer_x_max.
bool quantize_x16(const float* x, int64_t cols, std::vector<int16_t>& xq, float& xs) {
  float mx;
  if (!integer_x_max(x, cols, mx)) return false;
  const size_t n = size_t((cols + 31) / 32 * 32);
  if (xq.size() < n) xq.resize(n);
  xs = mx / 32767.0f;
  const float inv = 1.0f / xs;
  for (int64_t c = 0; c < cols; ++c) xq[size_t(c)] = int16_t(std::clamp(std::nearbyint(x[c] * inv), -32767.0f, 32767.0f));
  std::fill(xq.begin() + cols, xq.begin() + int64_t(n), int16_t(0));
  return true;
}

// Q4 rows [r0, r1) as rows_q4_avx2, AVX-512: a tile's 64-byte line (four values of each of its 16
// rows) is one register, its low and high nibbles two, each multiplied with those values' xh and
// xl broadcast (vpdpbusd on VNNI: u8 q times s8 x, four products a lane into int32; vpmaddubsw +
// vpmaddwd + vpaddd without). Per 64 weights ~3.5 vector operations (half a shift, an and, two
// dot products), where the row-major kernel of 6d40174 (words, vpdpwssd, a conversion and an FMA a
// group, a horizontal sum a row) took ~8 and was bound by them; the 16 rows stay in the lanes, so
// a tile's step, offset and x's corrections are one FMA each for 16 rows. Eight int32
// accumulators (the even and odd lines, xh and xl, low and high nibbles) keep the dot products'
// latency covered. A lane holds at most 64 x 15 x 128 (< 2^17). The next tiles are prefetched
// into L1 (2 KB ahead) and about kFarBytes ahead into L2 at the pace this one is read.
template <bool kVnni>
LINMIX_AVX512_VNNI inline __m512i u8s8_dot(__m512i acc, __m512i w, __m512i x) {  // acc + 4-byte dots, w u8, x s8
  if constexpr (kVnni) return _mm512_dpbusd_epi32(acc, w, x);
  else return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(w, x), _mm512_set1_epi16(1)));
}
template <bool kVnni>
LINMIX_AVX512_VNNI void rows_q4_avx512(const QMatrix& W, const int8_t* x8, float xs, const float* sums, float* y,
                                       int64_t r0, int64_t r1) {
  const int64_t G = W.q4_groups();
  const __m512i m4 = _mm512_set1_epi8(0x0F);
  const __m512 xsv = _mm512_set1_ps(xs);
  for (int64_t rb = r0 / QMatrix::kQ4Rows; rb * QMatrix::kQ4Rows < r1; ++rb) {
    __m512 f = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
      const uint8_t* tile = W.q4.data() + (rb * G + g) * QMatrix::kQ4Tile;
      const size_t at = size_t((rb * G + g) * QMatrix::kQ4Rows);
      _mm_prefetch(reinterpret_cast<const char*>(W.q4d.data() + at + 16 * QMatrix::kQ4Rows), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(W.q4m.data() + at + 16 * QMatrix::kQ4Rows), _MM_HINT_T0);
      const int32_t* xh = reinterpret_cast<const int32_t*>(x8 + g * 128);
      const int32_t* xl = xh + 16;
      __m512i hl[2] = {_mm512_setzero_si512(), _mm512_setzero_si512()}, hh[2] = {hl[0], hl[0]};
      __m512i ll[2] = {hl[0], hl[0]}, lh[2] = {hl[0], hl[0]};
      for (int i = 0; i < 8; ++i) {
        _mm_prefetch(reinterpret_cast<const char*>(tile + 64 * i + 2048), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(tile + 64 * i + kFarBytes), _MM_HINT_T1);
        const __m512i v = _mm512_loadu_si512(tile + 64 * i);
        const __m512i lo = _mm512_and_si512(v, m4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
        const int p = i & 1;
        hl[p] = u8s8_dot<kVnni>(hl[p], lo, _mm512_set1_epi32(xh[i]));
        hh[p] = u8s8_dot<kVnni>(hh[p], hi, _mm512_set1_epi32(xh[8 + i]));
        ll[p] = u8s8_dot<kVnni>(ll[p], lo, _mm512_set1_epi32(xl[i]));
        lh[p] = u8s8_dot<kVnni>(lh[p], hi, _mm512_set1_epi32(xl[8 + i]));
      }
      const __m512i H = _mm512_add_epi32(_mm512_add_epi32(hl[0], hl[1]), _mm512_add_epi32(hh[0], hh[1]));
      const __m512i L = _mm512_add_epi32(_mm512_add_epi32(ll[0], ll[1]), _mm512_add_epi32(lh[0], lh[1]));
      const __m512 S = _mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_slli_epi32(H, 8), L));
      const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(W.q4d.data() + at)));
      const __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(W.q4m.data() + at)));
      f = _mm512_fmadd_ps(d, _mm512_fmadd_ps(S, xsv, _mm512_set1_ps(sums[G + g])), f);
      f = _mm512_fmadd_ps(m, _mm512_set1_ps(sums[g]), f);
    }
    const int64_t lo = std::max(r0, rb * QMatrix::kQ4Rows), hi = std::min(r1, (rb + 1) * QMatrix::kQ4Rows);
    const __mmask16 k = __mmask16(((1u << (hi - rb * QMatrix::kQ4Rows)) - 1u) & ~((1u << (lo - rb * QMatrix::kQ4Rows)) - 1u));
    _mm512_mask_storeu_ps(y + rb * QMatrix::kQ4Rows, k, f);
  }
}

// LINMIX_NO_AVX512=1 keeps the AVX2 kernels (the tests run them so on an AVX-512 machine too).
bool has_avx512() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                         !(std::getenv("LINMIX_NO_AVX512") && std::string(std::getenv("LINMIX_NO_AVX512")) == "1");
  return ok;
}
// LINMIX_NO_VNNI=1 keeps the INT8 kernel's vpmaddwd + vpaddd (the tests run both).
bool has_vnni() {
  static const bool ok = has_avx512() && __builtin_cpu_supports("avx512vnni") &&
                         !(std::getenv("LINMIX_NO_VNNI") && std::string(std::getenv("LINMIX_NO_VNNI")) == "1");
  return ok;
}

// x made once per product for the integer kernels: as int16 for AVX-512 INT8 (quantize_x16), as
// bytes with its group sums for Q4 (quantize_q4x); null where x was refused (the FP32 kernels run)
struct PreparedX {
  const int16_t* x16 = nullptr;
  const int8_t* x8 = nullptr;
  const float* sums = nullptr;
  float xs = 0.0f;
};

// Rows [r0, r1) of y = W x (the int8 scales applied).
void rows_of(const QMatrix& W, const float* x, float* y, int64_t r0, int64_t r1, bool wide, const PreparedX& px) {
  const int16_t* xq = px.x16;
  const float xs = px.xs;
  switch (W.type) {
    case WType::F32:
      if (wide) rows_avx512(W.f32.data(), x, y, r0, r1, W.cols, W.rows);
      else rows_avx2(W.f32.data(), x, y, r0, r1, W.cols);
      break;
    case WType::BF16:
      if (wide) rows_avx512(W.bf16.data(), x, y, r0, r1, W.cols, W.rows);
      else rows_avx2(W.bf16.data(), x, y, r0, r1, W.cols);
      break;
    case WType::I8:
      if (wide && xq && has_vnni()) rows_i8_avx512<true>(W.i8.data(), xq, xs, y, r0, r1, W.cols, W.rows);
      else if (wide && xq) rows_i8_avx512<false>(W.i8.data(), xq, xs, y, r0, r1, W.cols, W.rows);
      else if (wide) rows_avx512(W.i8.data(), x, y, r0, r1, W.cols, W.rows);
      else rows_avx2(W.i8.data(), x, y, r0, r1, W.cols);
      for (int64_t r = r0; r < r1; ++r) y[r] *= W.scale[size_t(r)];
      break;
    case WType::Q4:
      if (!px.x8) rows_q4_f32(W, x, y, r0, r1);
      else if (wide && has_vnni()) rows_q4_avx512<true>(W, px.x8, xs, px.sums, y, r0, r1);
      else if (wide) rows_q4_avx512<false>(W, px.x8, xs, px.sums, y, r0, r1);
      else rows_q4_avx2(W, px.x8, xs, px.sums, y, r0, r1);
      break;
  }
}

}  // namespace

const char* gemv_isa() { return has_vnni() ? "avx512+vnni" : has_avx512() ? "avx512" : "avx2"; }

void gemv_many(const GemvJob* jobs, int n) {
  constexpr int64_t kRows = 16;  // rows per work item: 4 kernel calls of 4 rows, or a Q4 tile
  static_assert(kRows == QMatrix::kQ4Rows);
  // Each thread takes one contiguous run of row blocks holding an equal share of the bytes read:
  // the products differ in width and type (FFN value C x 3.5C beside receptance C x C, FP32 LoRAs
  // beside INT8 matrices), so an equal count of blocks would leave one thread idle at the barrier.
  int64_t nblk[16] = {0}, bcost[16] = {0}, start[17] = {0}, work = 0;
  LINMIX_CHECK(n >= 0 && n <= 16, "gemv_many: at most 16 products");
  for (int j = 0; j < n; ++j) {
    const QMatrix& W = *jobs[j].W;
    nblk[j] = (W.rows + kRows - 1) / kRows;
    bcost[j] = std::max<int64_t>(1, int64_t(W.bytes()) / std::max<int64_t>(1, W.rows) * kRows);
    start[j + 1] = start[j] + nblk[j] * bcost[j];
    work += W.rows * W.cols;
  }
  const bool wide = has_avx512();
  // INT8 products on AVX-512 take x as int16 and Q4 products (every ISA) as bytes with its group
  // sums, made once here for all their rows (buffers grown once: decode allocates nothing)
  thread_local std::vector<int16_t> x16[16];
  thread_local std::vector<int8_t> x8[16];
  thread_local std::vector<float> sums[16];
  PreparedX px[16];
  for (int j = 0; j < n; ++j) {
    const QMatrix& W = *jobs[j].W;
    if (W.type == WType::I8 && wide && quantize_x16(jobs[j].x, W.cols, x16[j], px[j].xs)) px[j].x16 = x16[j].data();
    if (W.type == WType::Q4 && quantize_q4x(jobs[j].x, W.cols, x8[j], px[j].xs, sums[j]))
      px[j].x8 = x8[j].data(), px[j].sums = sums[j].data();
  }
  // one parallel region (one barrier) for every product: their row blocks share the threads
#pragma omp parallel if (work > 32768)
  {
    const int64_t nt = omp_get_num_threads(), tid = omp_get_thread_num();
    const int64_t lo = start[n] * tid / nt, hi = start[n] * (tid + 1) / nt;
    // a block belongs to the thread whose share holds the cost at the block's start
    auto first_at = [](int64_t c, int64_t c0, int64_t bc) { return c <= c0 ? 0 : (c - c0 + bc - 1) / bc; };
    for (int j = 0; j < n; ++j) {
      if (start[j + 1] <= lo || start[j] >= hi) continue;
      const int64_t b0 = first_at(lo, start[j], bcost[j]), b1 = std::min(nblk[j], first_at(hi, start[j], bcost[j]));
      const QMatrix& W = *jobs[j].W;
      for (int64_t b = b0; b < b1; ++b)
        rows_of(W, jobs[j].x, jobs[j].y, b * kRows, std::min(W.rows, (b + 1) * kRows), wide, px[j]);
    }
  }
}

void gemv(const QMatrix& W, const float* x, float* y) {
  const GemvJob job{&W, x, y};
  gemv_many(&job, 1);
}

}  // namespace linmix
