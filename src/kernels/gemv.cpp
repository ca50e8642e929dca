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
      const int64_t G = (cols + kQ4Group - 1) / kQ4Group;
      q.q4.assign(size_t(rows * G * kQ4Bytes), 0), q.q4d.resize(size_t(rows * G)), q.q4m.resize(size_t(rows * G));
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
          q.q4d[size_t(r * G + g)] = dh, q.q4m[size_t(r * G + g)] = mh;
          uint8_t* b = &q.q4[size_t((r * G + g) * kQ4Bytes)];
          for (int64_t i = 0; i < n; ++i) {
            const int v = d > 0.0f ? int(std::clamp(std::lrint((w[i] - m) / d), 0L, 15L)) : 0;
            b[i % kQ4Bytes] = uint8_t(b[i % kQ4Bytes] | (i < kQ4Bytes ? v : v << 4));
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
      const int64_t G = (cols + kQ4Group - 1) / kQ4Group;
#pragma omp parallel for schedule(static) if (n > (1 << 16))
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t g = 0; g < G; ++g) {  // a group's step and offset once, its 64 values
          const int64_t at = r * G + g, c0 = g * kQ4Group, n_g = std::min(kQ4Group, cols - c0);
          const float d = f16_to_f32(q4d[size_t(at)]), m = f16_to_f32(q4m[size_t(at)]);
          const uint8_t* b = &q4[size_t(at * kQ4Bytes)];
          float* o = out + r * cols + c0;
          for (int64_t i = 0; i < n_g; ++i) o[i] = d * float(i < kQ4Bytes ? b[i] & 15 : b[i - kQ4Bytes] >> 4) + m;
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

// Q4 rows [r0, r1): per group of 64, w = d q + m from the packed nibbles and the fp16 (d, m).
// The last group of a row whose length is not a multiple of 64 reads x only up to cols.
inline float q4_tail(const QMatrix& W, const float* x, int64_t r, int64_t g) {  // the short last group
  const int64_t G = (W.cols + QMatrix::kQ4Group - 1) / QMatrix::kQ4Group, at = r * G + g;
  const float d = f16_to_f32(W.q4d[size_t(at)]), m = f16_to_f32(W.q4m[size_t(at)]);
  float s = 0.0f;
  for (int64_t c = g * QMatrix::kQ4Group, i = 0; c < W.cols; ++c, ++i) {
    const uint8_t b = W.q4[size_t(at * QMatrix::kQ4Bytes + i % QMatrix::kQ4Bytes)];
    s += (d * float(i < QMatrix::kQ4Bytes ? b & 15 : b >> 4) + m) * x[c];
  }
  return s;
}

// AVX2, and AVX-512 where x holds a NaN, an infinity or only values below 1e-30 (quantize_x16).
void rows_q4_avx2(const QMatrix& W, const float* x, float* y, int64_t r0, int64_t r1) {
  constexpr int64_t kB = QMatrix::kQ4Bytes;
  const int64_t G = (W.cols + QMatrix::kQ4Group - 1) / QMatrix::kQ4Group, full = W.cols / QMatrix::kQ4Group;
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* q = W.q4.data() + r * G * kB;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0;
    for (int64_t g = 0; g < full; ++g) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + g * kB));
      const __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
      const __m256 d = _mm256_set1_ps(f16_to_f32(W.q4d[size_t(r * G + g)]));
      const __m256 m = _mm256_set1_ps(f16_to_f32(W.q4m[size_t(r * G + g)]));
      const float* xg = x + g * QMatrix::kQ4Group;
      auto part = [&](__m128i bytes8, const float* xp, __m256& acc) {  // 8 values from the low 8 bytes
        const __m256 qv = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes8));
        acc = _mm256_fmadd_ps(_mm256_fmadd_ps(qv, d, m), _mm256_loadu_ps(xp), acc);
      };
      for (int h = 0; h < 2; ++h) {  // bytes 16 h .. 16 h + 15: values 16 h + i (lo) and 32 + 16 h + i (hi)
        const __m128i l = h ? _mm256_extracti128_si256(lo, 1) : _mm256_castsi256_si128(lo);
        const __m128i u = h ? _mm256_extracti128_si256(hi, 1) : _mm256_castsi256_si128(hi);
        part(l, xg + 16 * h, a0), part(_mm_srli_si128(l, 8), xg + 16 * h + 8, a1);
        part(u, xg + kB + 16 * h, a0), part(_mm_srli_si128(u, 8), xg + kB + 16 * h + 8, a1);
      }
    }
    y[r] = hsum8(_mm256_add_ps(a0, a1)) + (full < G ? q4_tail(W, x, r, full) : 0.0f);
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

// x as int16 for rows_i8_avx512 and rows_q4_i16_avx512: xq (cols rounded up to a multiple of
// pad, 32 for INT8's steps and 64 for Q4's groups, zeros past cols) and its step; false when x
// holds a NaN or an infinity (the FP32 kernel then runs, and carries it to y) or when its largest
// |x| is below 1e-30 (zero, or so small that 1 / step would overflow: the FP32 kernel too).
bool quantize_x16(const float* x, int64_t cols, std::vector<int16_t>& xq, float& xs, int64_t pad) {
  float mx = 0.0f;
  bool finite = true;
  for (int64_t c = 0; c < cols; ++c) {
    const float a = std::fabs(x[c]);
    mx = std::max(mx, a), finite &= a <= std::numeric_limits<float>::max();  // false for NaN too
  }
  if (!finite || !(mx >= 1e-30f)) return false;
  const size_t n = size_t((cols + pad - 1) / pad * pad);
  if (xq.size() < n) xq.resize(n);
  xs = mx / 32767.0f;
  const float inv = 1.0f / xs;
  for (int64_t c = 0; c < cols; ++c) xq[size_t(c)] = int16_t(std::clamp(std::nearbyint(x[c] * inv), -32767.0f, 32767.0f));
  std::fill(xq.begin() + cols, xq.begin() + int64_t(n), int16_t(0));
  return true;
}

// For rows_q4_i16_avx512, per Q4 group (each padded with zeros to a multiple of 16 groups): sx,
// the FP32 sum of x over the group (its offsets' factor), and cx = 7.5 (sx - xs sum xq), 7.5 times
// the rounding of x's sum over it. A row's integer products carry sum_c q_c e_c off per group (e_c
// = x_c - xs xq_c); adding d_g cx_g leaves sum_c (q_c - 7.5) e_c, at most half as large and, for
// values spread over 0..15, mostly a few times smaller. sx then cx, one after the other.
void q4_group_sums(const float* x, const int16_t* xq, float xs, int64_t cols, std::vector<float>& sums) {
  const int64_t G = (cols + QMatrix::kQ4Group - 1) / QMatrix::kQ4Group, Gp = (G + 15) / 16 * 16;
  if (sums.size() < size_t(2 * Gp)) sums.resize(size_t(2 * Gp));
  std::fill(sums.begin(), sums.begin() + 2 * Gp, 0.0f);
  for (int64_t g = 0; g < G; ++g) {
    double s = 0.0;
    int64_t sq = 0;
    for (int64_t c = g * QMatrix::kQ4Group; c < std::min(cols, (g + 1) * QMatrix::kQ4Group); ++c) s += x[c], sq += xq[c];
    sums[size_t(g)] = float(s), sums[size_t(Gp + g)] = float(7.5 * (s - double(xs) * double(sq)));
  }
}

constexpr int64_t kQ4Ahead = 2;  // rows ahead that the Q4 kernel prefetches

// Q4 rows against x rounded to int16 (quantize_x16, padded to whole groups): y_r = xs sum_g d_g
// (q_g . xq_g) + sum_g (m_g sx_g + d_g cx_g), sx and cx as q4_group_sums. A group's 32 bytes are widened
// to 32 words, whose low nibbles (and) and high ones (shift) are its 64 values as int16 in x's own
// order, multiplied with x in pairs into one int32 accumulator (vpdpwssd, or vpmaddwd + vpaddd
// without VNNI); one conversion and one FMA by the group's step then take it to FP32: 7 vector
// operations per 64 weights, where the FP32 form (widen to int32, convert, FMA per 16) took ~22 per
// 64 and was bound by them. A lane holds 4 products of at most 15 x 32767 (< 2^21). The rounding of
// x adds at most xs / 2 sum_c |d_g (q_c - 7.5)| to a row (INT8's: xs / 2 sum_c |w_c|).
// The row kQ4Ahead on is prefetched into L1 and the one about kFarBytes beyond it into L2 at the
// pace this one is read (as rows_avx512): a 3072 x 768 product, 300 copies past the cache, 2
// threads, 21.6 -> 27.5 GB/s with the far one.
template <bool kVnni>
LINMIX_AVX512_VNNI void rows_q4_i16_avx512(const QMatrix& W, const int16_t* xq, float xs, const float* sx, float* y,
                                           int64_t r0, int64_t r1) {
  constexpr int64_t kB = QMatrix::kQ4Bytes;
  const int64_t G = (W.cols + QMatrix::kQ4Group - 1) / QMatrix::kQ4Group, Gp = (G + 15) / 16 * 16;
  const __mmask16 kg = __mmask16(G % 16 ? (1u << (G % 16)) - 1u : 0xFFFFu);  // the last 16 groups' lanes
  thread_local std::vector<float> scratch;  // a row's steps (G, padded): grown once
  if (scratch.size() < size_t(Gp)) scratch.assign(size_t(Gp), 0.0f);
  float* df = scratch.data();
  const int64_t nfar = far_blocks(G * kB);
  const __m512i m4 = _mm512_set1_epi16(0x0F), zero = _mm512_setzero_si512();
  auto group = [&](const uint8_t* qg, const int16_t* xg) {  // the int32 lanes of one group
    const __m512i b = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(qg)));
    const __m512i s = i8_dot<kVnni>(zero, _mm512_and_si512(b, m4), _mm512_loadu_si512(xg));
    return _mm512_cvtepi32_ps(i8_dot<kVnni>(s, _mm512_srli_epi16(b, 4), _mm512_loadu_si512(xg + kB)));
  };
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* q = W.q4.data() + r * G * kB;
    const uint16_t *dh = W.q4d.data() + r * G, *mh = W.q4m.data() + r * G;
    __m512 am = _mm512_setzero_ps();  // sum_g m_g sx_g + d_g cx_g, 16 groups a step
    for (int64_t g = 0; g < G; g += 16) {  // and the steps to FP32
      const __mmask16 k = g + 16 <= G ? __mmask16(0xFFFF) : kg;
      const __m512 d = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, dh + g));
      _mm512_storeu_ps(df + g, d);
      am = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, mh + g)), _mm512_loadu_ps(sx + g), am);
      am = _mm512_fmadd_ps(d, _mm512_loadu_ps(sx + Gp + g), am);
    }
    const char* ahead = reinterpret_cast<const char*>(q + kQ4Ahead * G * kB);
    const char* far = ahead + nfar * G * kB;
    const bool pf_far = r + kQ4Ahead + nfar < W.rows;
    _mm_prefetch(reinterpret_cast<const char*>(dh + kQ4Ahead * G), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(mh + kQ4Ahead * G), _MM_HINT_T0);
    if (pf_far) {
      _mm_prefetch(reinterpret_cast<const char*>(dh + (kQ4Ahead + nfar) * G), _MM_HINT_T1);
      _mm_prefetch(reinterpret_cast<const char*>(mh + (kQ4Ahead + nfar) * G), _MM_HINT_T1);
    }
    __m512 f0 = _mm512_setzero_ps(), f1 = f0;
    int64_t g = 0;
    for (; g + 2 <= G; g += 2) {  // two groups (a cache line of nibbles) a step
      _mm_prefetch(ahead + g * kB, _MM_HINT_T0);
      if (pf_far) _mm_prefetch(far + g * kB, _MM_HINT_T1);
      f0 = _mm512_fmadd_ps(group(q + g * kB, xq + g * 64), _mm512_set1_ps(df[g]), f0);
      f1 = _mm512_fmadd_ps(group(q + (g + 1) * kB, xq + (g + 1) * 64), _mm512_set1_ps(df[g + 1]), f1);
    }
    if (g < G) f0 = _mm512_fmadd_ps(group(q + g * kB, xq + g * 64), _mm512_set1_ps(df[g]), f0);
    y[r] = _mm512_reduce_add_ps(_mm512_fmadd_ps(_mm512_add_ps(f0, f1), _mm512_set1_ps(xs), am));
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

// Rows [r0, r1) of y = W x (the int8 scales applied); xq, xs: x as int16 for the AVX-512 INT8
// kernel (null: the FP32 kernel).
void rows_of(const QMatrix& W, const float* x, float* y, int64_t r0, int64_t r1, bool wide, const int16_t* xq,
             float xs, const float* sx) {
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
      if (wide && xq && has_vnni()) rows_q4_i16_avx512<true>(W, xq, xs, sx, y, r0, r1);
      else if (wide && xq) rows_q4_i16_avx512<false>(W, xq, xs, sx, y, r0, r1);
      else rows_q4_avx2(W, x, y, r0, r1);
      break;
  }
}

}  // namespace

const char* gemv_isa() { return has_vnni() ? "avx512+vnni" : has_avx512() ? "avx512" : "avx2"; }

void gemv_many(const GemvJob* jobs, int n) {
  constexpr int64_t kRows = 16;  // rows per work item: 4 kernel calls of 4 rows
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
  // INT8 products on AVX-512 take x as int16, rounded once here for all their rows (buffers
  // grown once: decode allocates nothing)
  // and Q4 products so too, with the sums of x over their groups (sx)
  thread_local std::vector<int16_t> xbuf[16];
  thread_local std::vector<float> sxbuf[16];
  const int16_t* xq[16] = {};
  const float* sx[16] = {};
  float xs[16] = {};
  for (int j = 0; j < n && wide; ++j) {
    const QMatrix& W = *jobs[j].W;
    if (W.type == WType::I8 && quantize_x16(jobs[j].x, W.cols, xbuf[j], xs[j], 32)) xq[j] = xbuf[j].data();
    if (W.type == WType::Q4 && quantize_x16(jobs[j].x, W.cols, xbuf[j], xs[j], QMatrix::kQ4Group))
      q4_group_sums(jobs[j].x, xbuf[j].data(), xs[j], W.cols, sxbuf[j]), xq[j] = xbuf[j].data(), sx[j] = sxbuf[j].data();
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
        rows_of(W, jobs[j].x, jobs[j].y, b * kRows, std::min(W.rows, (b + 1) * kRows), wide, xq[j], xs[j], sx[j]);
    }
  }
}

void gemv(const QMatrix& W, const float* x, float* y) {
  const GemvJob job{&W, x, y};
  gemv_many(&job, 1);
}

}  // namespace linmix
