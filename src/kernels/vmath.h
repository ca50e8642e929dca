// Vectorisable elementwise math. std::exp is an opaque libm call that stops GCC from
// vectorising a loop; exp_fast is plain arithmetic, so loops over it compile to SIMD.
//
// exp_fast(x): range reduction x = n ln2 + r, |r| <= ln2/2 (ln2 split in a short high part
// and a correction so n ln2 is exact), a degree-6 minimax polynomial for e^r (the classic
// single-precision coefficients), and 2^n assembled in the exponent bits. Max relative error
// about 2 ulp over the normal range (tests/test_vmath.cpp checks it against std::exp).
// Below -87.33 (where 2^n would be subnormal) it returns 0, +inf above 88.72, NaN for NaN.
#pragma once
#include <bit>
#include <cstdint>
#if defined(__SSE__)
#include <xmmintrin.h>
#endif
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace linmix {

// Subnormal floats flushed to zero (FTZ) and read as zero (DAZ) in this thread while in scope,
// the caller's setting restored after. The decay kernels' products of tiny decays (e^{-100}
// scores, states decayed by e^{cL}) land in the subnormal range, where every x86 multiply takes a
// microcode assist: Mamba-2's forward at T = 4096 ran 18.1 ms with them, 13.2 ms flushed. Values
// below 1.2e-38 are far under float32's resolution of any O(1) sum they join.
struct FlushDenormals {
#if defined(__SSE__)
  unsigned saved = _mm_getcsr();
  FlushDenormals() { _mm_setcsr(saved | 0x8040u); }  // FTZ (bit 15) | DAZ (bit 6)
  ~FlushDenormals() { _mm_setcsr(saved); }
#endif
  FlushDenormals(const FlushDenormals&) = delete;
  FlushDenormals& operator=(const FlushDenormals&) = delete;
};

// max by value: std::max returns a reference, and a select through a reference keeps GCC
// from vectorising the loop around it. NaN handling as std::max (a NaN first argument wins).
inline float vmax(float a, float b) { return a < b ? b : a; }

// max(init, p[0..n)) in SIMD partial maxima: with std::max in the body, GCC compiled an omp simd
// max reduction to a serial chain of vmaxss (performer's feature row maxima: 8% of its forward)
inline float max_of(const float* p, int64_t n, float init) {
  float mx = init;
#pragma omp simd reduction(max : mx)
  for (int64_t i = 0; i < n; ++i) mx = vmax(mx, p[i]);
  return mx;
}

// 16 floats as one GCC vector (one AVX-512 register, two AVX2 ones): for the small loops whose
// accumulators must stay in registers (`omp simd` over a local array left them on the stack).
// (Without AVX-512, GCC notes that passing one by value has another ABI than with it: -Wno-psabi
// in CMakeLists.txt; these are inline helpers within one build.)
using f32x16 = float __attribute__((vector_size(64), aligned(4)));
inline f32x16 load16(const float* p) { return *reinterpret_cast<const f32x16*>(p); }
inline void store16(float* p, f32x16 x) { *reinterpret_cast<f32x16*>(p) = x; }
inline float hsum16(f32x16 a) {  // a tree: 16 -> 8 -> 4 lanes, then 4 scalars
  using f32x8 = float __attribute__((vector_size(32)));
  using f32x4 = float __attribute__((vector_size(16)));
  const f32x8 h = __builtin_shufflevector(a, a, 0, 1, 2, 3, 4, 5, 6, 7) +
                  __builtin_shufflevector(a, a, 8, 9, 10, 11, 12, 13, 14, 15);
  const f32x4 g = __builtin_shufflevector(h, h, 0, 1, 2, 3) + __builtin_shufflevector(h, h, 4, 5, 6, 7);
  return (g[0] + g[2]) + (g[1] + g[3]);
}

// The lane sums of 16 vectors as one vector (lane i: the sum of v[i]), a transposing tree: pairs
// of vectors halve their lanes and interleave at each of 4 levels, 30 two-source shuffles and 15
// adds for the 16 sums (hsum16 one at a time: ~7 dependent operations each, scalar at the end).
inline f32x16 hsum16x16(const f32x16* v) {
  f32x16 u[8], w[4], x[2];
  for (int i = 0; i < 8; ++i)  // lanes 0-7: v[2i]'s halves added, 8-15: v[2i+1]'s
    u[i] = __builtin_shufflevector(v[2 * i], v[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(v[2 * i], v[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  for (int i = 0; i < 4; ++i)  // lanes 4j..4j+3: v[4i+j]
    w[i] = __builtin_shufflevector(u[2 * i], u[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
           __builtin_shufflevector(u[2 * i], u[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  for (int i = 0; i < 2; ++i)  // lanes 2j, 2j+1: v[8i+j]
    x[i] = __builtin_shufflevector(w[2 * i], w[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
           __builtin_shufflevector(w[2 * i], w[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
  return __builtin_shufflevector(x[0], x[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
         __builtin_shufflevector(x[0], x[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

// out[r] = scale * (A_r . x) for the rows r < rows of A (row stride ld, n columns): sixteen rows,
// then four, at a time in vector accumulators (one row's `omp simd` reduction waits on its own
// chain of adds and horizontal sum), the sixteen summed together (hsum16x16); n a multiple of 16
// takes those paths, other n a plain loop.
inline void dot_rows(float* out, const float* A, int64_t rows, int64_t ld, const float* x, int64_t n, float scale) {
  int64_t r = 0;
  for (; n % 16 == 0 && r + 16 <= rows; r += 16) {
    const float* a = A + r * ld;
    f32x16 acc[16] = {};
    for (int64_t j = 0; j < n; j += 16) {
      const f32x16 xv = load16(x + j);
      for (int i = 0; i < 16; ++i) acc[i] += load16(a + i * ld + j) * xv;
    }
    store16(out + r, hsum16x16(acc) * scale);
  }
  for (; n % 16 == 0 && r + 4 <= rows; r += 4) {
    const float* a = A + r * ld;
    f32x16 a0 = {}, a1 = {}, a2 = {}, a3 = {};
    for (int64_t j = 0; j < n; j += 16) {
      const f32x16 xv = load16(x + j);
      a0 += load16(a + j) * xv, a1 += load16(a + ld + j) * xv;
      a2 += load16(a + 2 * ld + j) * xv, a3 += load16(a + 3 * ld + j) * xv;
    }
    out[r] = hsum16(a0) * scale, out[r + 1] = hsum16(a1) * scale;
    out[r + 2] = hsum16(a2) * scale, out[r + 3] = hsum16(a3) * scale;
  }
  for (; r < rows; ++r) {
    const float* __restrict a = A + r * ld;
    float d = 0.0f;
#pragma omp simd reduction(+ : d)
    for (int64_t j = 0; j < n; ++j) d += a[j] * x[j];
    out[r] = d * scale;
  }
}

// always_inline: a loop that calls it vectorises only when it is inlined, and GCC sometimes declines
[[gnu::always_inline]] inline float exp_fast(float x) {
  const float hi = 88.7228391f, lo = -87.3365447f;
  const bool under = x < lo, over = x > hi, nan = x != x;
  // clamped with comparisons that are false for NaN, so a NaN becomes lo here: it must not reach
  // the float -> int conversion below (undefined behaviour); the result is NaN again at the end
  float xc = x > lo ? x : lo;
  xc = xc < hi ? xc : hi;
  const float n = __builtin_floorf(xc * 1.44269504088896341f + 0.5f);
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  // 2^n for n in [-126, 128] as 2^a 2^b with a, b in [-63, 64]: both normal, no overflow.
  const int32_t ni = static_cast<int32_t>(n), a = ni >> 1, b = ni - a;
  const float sa = std::bit_cast<float>(static_cast<int32_t>((a + 127) << 23));
  const float sb = std::bit_cast<float>(static_cast<int32_t>((b + 127) << 23));
  float out = p * sa * sb;
  out = under ? 0.0f : out;
  out = over ? __builtin_inff() : out;
  return nan ? x : out;
}

#if defined(__AVX512F__)
// exp_fast of 16 floats with AVX-512: the same reduction and polynomial, 2^n applied by vscalefps
// (one instruction for the exponent assembly and its two-step scaling) and the edges by masks:
// ~14 instructions for 16 values where the auto-vectorised exp_fast takes ~28. Bit for bit equal
// to exp_fast (tests/test_vmath.cpp).
[[gnu::always_inline]] inline __m512 exp16(__m512 x) {
  const __m512 hi = _mm512_set1_ps(88.7228391f), lo = _mm512_set1_ps(-87.3365447f);
  const __mmask16 under = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ), over = _mm512_cmp_ps_mask(x, hi, _CMP_GT_OQ),
                  nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  // (the maskz forms with every lane: GCC 12's unmasked ones read an undefined source and warn)
  const __mmask16 all = 0xFFFF;
  const __m512 xc = _mm512_maskz_min_ps(all, _mm512_maskz_max_ps(all, x, lo), hi);
  const __m512 n = _mm512_maskz_roundscale_ps(
      all, _mm512_fmadd_ps(xc, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)), _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), xc);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(1.9875691500e-4f), r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.0f));
  __m512 out = _mm512_maskz_scalef_ps(all, p, n);
  out = _mm512_mask_mov_ps(out, under, _mm512_setzero_ps());
  out = _mm512_mask_mov_ps(out, over, _mm512_set1_ps(__builtin_inff()));
  return _mm512_mask_mov_ps(out, nan, x);
}
#endif

// out[j] = exp_fast(a[j] b[j]) for j < n: exp16 16 at a time where the build has AVX-512 (Mamba's
// decays e^{dt A}), the same values bit for bit.
[[gnu::always_inline]] inline void exp_of_products(float* __restrict out, const float* __restrict a,
                                                   const float* __restrict b, int64_t n) {
  int64_t j = 0;
#if defined(__AVX512F__)
  for (; j + 16 <= n; j += 16) _mm512_storeu_ps(out + j, exp16(_mm512_mul_ps(_mm512_loadu_ps(a + j), _mm512_loadu_ps(b + j))));
#endif
#pragma omp simd
  for (int64_t i = j; i < n; ++i) out[i] = exp_fast(a[i] * b[i]);
}

// p[j] = exp_fast(p[j] - c) for j < n, in place, and their sum (a softmax row's numerators):
// exp16 16 at a time, the tail under a mask, where the build has AVX-512.
inline float exp_shift_sum(float* __restrict p, int64_t n, float c) {
#if defined(__AVX512F__)
  const __m512 cv = _mm512_set1_ps(c);
  __m512 s = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(p + j), cv));
    _mm512_storeu_ps(p + j, e), s = _mm512_add_ps(s, e);
  }
  if (j < n) {
    const __mmask16 m = __mmask16((1u << (n - j)) - 1);
    const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, p + j), cv));
    _mm512_mask_storeu_ps(p + j, m, e), s = _mm512_add_ps(s, _mm512_maskz_mov_ps(m, e));
  }
  return hsum16(f32x16(s));  // (_mm512_reduce_add_ps reads an undefined vector: GCC 12 warns)
#else
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) {
    const float e = exp_fast(p[j] - c);
    p[j] = e, s += e;
  }
  return s;
#endif
}

// phi(x) = elu(x) + 1 = x + 1 for x > 0, e^x otherwise: linear attention's feature map
// (Katharopoulos et al. 2020), positive everywhere.
[[gnu::always_inline]] inline float phi_elu(float x) { return x > 0.0f ? x + 1.0f : exp_fast(x); }

// e^{a - m} and e^{b - m} with m = max(a, b): one of them is e^0 = 1 exactly, so one exp_fast of
// -|a - b| gives both (bit for bit the values of two exp_fast calls, at half the cost).
// Results through references: a returned struct kept GCC from vectorising the loops around it.
[[gnu::always_inline]] inline void exp_pair(float a, float b, float& ea, float& eb) {
  const float d = a - b, f = exp_fast(d < 0.0f ? d : -d);
  ea = d < 0.0f ? f : 1.0f, eb = d < 0.0f ? 1.0f : f;
}

// log_fast(x), x > 0 normal: x = m 2^e with m in [sqrt(1/2), sqrt(2)), log x = e ln2 + log m,
// log m by the classic degree-9 single-precision polynomial in f = m - 1. About 1 ulp.
// x <= 0 or subnormal is outside its contract (callers pass 1 + something positive).
[[gnu::always_inline]] inline float log_fast(float x) {
  const int32_t bits = std::bit_cast<int32_t>(x);
  int32_t e = ((bits >> 23) & 0xff) - 126;                              // x = m 2^e, m in [0.5, 1)
  float m = std::bit_cast<float>(static_cast<int32_t>((bits & 0x007fffff) | 0x3f000000));
  const bool small = m < 0.707106781186547524f;
  e = small ? e - 1 : e;
  m = small ? m + m - 1.0f : m - 1.0f;
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  const float fe = static_cast<float>(e);
  y += -2.12194440e-4f * fe;
  y += -0.5f * z;
  return m + y + 0.693359375f * fe;
}

// log(1 + y) for y >= 0, accurate for tiny y too: with u = 1 + y rounded,
// log1p(y) = log(u) * y / (u - 1) (Goldberg's correction), and y itself when u == 1.
[[gnu::always_inline]] inline float log1p_fast(float y) {
  const float u = 1.0f + y;
  const float d = u - 1.0f;
  return d == 0.0f ? y : log_fast(u) * (y / d);
}

// softplus(x) = log(1 + e^x) = max(x, 0) + log1p(e^-|x|): no overflow, exact tails.
[[gnu::always_inline]] inline float softplus_fast(float x) {
  const float ax = x < 0.0f ? -x : x;
  return (x > 0.0f ? x : 0.0f) + log1p_fast(exp_fast(-ax));
}

}  // namespace linmix
