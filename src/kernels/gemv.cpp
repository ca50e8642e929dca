#include "kernels/gemv.h"

// GCC 12 reports its own _mm512 reduce intrinsics as maybe-uninitialized (a known false positive).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "linmix/error.h"

namespace linmix {

WType parse_wtype(const std::string& s) {
  if (s == "f32" || s == "fp32") return WType::F32;
  if (s == "bf16") return WType::BF16;
  if (s == "int8" || s == "i8") return WType::I8;
  throw Error("unknown weight type '" + s + "' (expected f32, bf16 or int8)");
}

const char* wtype_name(WType t) { return t == WType::F32 ? "f32" : t == WType::BF16 ? "bf16" : "int8"; }

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
  }
}

size_t QMatrix::bytes() const {
  return f32.size() * 4 + bf16.size() * 2 + i8.size() + scale.size() * 4;
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
    for (int64_t i = 0; i < cv; i += 16) {
      if (pf)
        for (int64_t l = 0; l < int64_t(4 * 16 * sizeof(T)); l += 64) _mm_prefetch(next + 4 * i * sizeof(T) + l, _MM_HINT_T0);
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

bool has_avx512() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return ok;
}

// Rows [r0, r1) of y = W x (the int8 scales applied).
void rows_of(const QMatrix& W, const float* x, float* y, int64_t r0, int64_t r1, bool wide) {
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
      if (wide) rows_avx512(W.i8.data(), x, y, r0, r1, W.cols, W.rows);
      else rows_avx2(W.i8.data(), x, y, r0, r1, W.cols);
      for (int64_t r = r0; r < r1; ++r) y[r] *= W.scale[size_t(r)];
      break;
  }
}

}  // namespace

const char* gemv_isa() { return has_avx512() ? "avx512" : "avx2"; }

void gemv_many(const GemvJob* jobs, int n) {
  constexpr int64_t kRows = 16;  // rows per work item: 4 kernel calls of 4 rows
  int64_t first[17] = {0}, work = 0;
  LINMIX_CHECK(n >= 0 && n <= 16, "gemv_many: at most 16 products");
  for (int j = 0; j < n; ++j) {
    first[j + 1] = first[j] + (jobs[j].W->rows + kRows - 1) / kRows;
    work += jobs[j].W->rows * jobs[j].W->cols;
  }
  const bool wide = has_avx512();
  // one parallel region (one barrier) for every product: their row blocks share the threads
#pragma omp parallel for schedule(static) if (work > 32768)
  for (int64_t b = 0; b < first[n]; ++b) {
    int j = 0;
    while (b >= first[j + 1]) ++j;
    const QMatrix& W = *jobs[j].W;
    const int64_t r0 = (b - first[j]) * kRows;
    rows_of(W, jobs[j].x, jobs[j].y, r0, std::min(W.rows, r0 + kRows), wide);
  }
}

void gemv(const QMatrix& W, const float* x, float* y) {
  const GemvJob job{&W, x, y};
  gemv_many(&job, 1);
}

}  // namespace linmix
