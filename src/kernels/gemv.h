// Matrix-vector products for one-token decode, with weights in FP32, BF16, INT8 (per-row scales) or
// Q4 (4 bits, a step and an offset per group of 64). Accumulation is FP32, activations FP32,
// except INT8 and Q4 on AVX-512: x rounded to int16 (a step max|x| / 32767) and integer products
// (gemv.cpp, rows_i8_avx512 and rows_q4_i16_avx512). AVX-512 kernels are
// chosen at run time when the CPU has AVX-512 (F + BW), AVX2 + FMA otherwise (the baseline).
#pragma once
#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "linmix/quant.h"

namespace linmix {

// A row-major (rows, cols) weight matrix in one of the three storage types.
struct QMatrix {
  int64_t rows = 0, cols = 0;
  WType type = WType::F32;
  std::vector<float> f32;      // F32
  std::vector<uint16_t> bf16;  // BF16: the upper half of the FP32 word, rounded to nearest even
  std::vector<int8_t> i8;      // I8: round(w / scale[row]), scale = max|w_row| / 127
  std::vector<float> scale;    // I8: (rows)
  // Q4: (rows, groups, 32) bytes, groups = ceil(cols / 64): value i of a group in the low nibble
  // of byte i, value 32 + i in its high nibble (a short last group padded with 0);
  // q4d, q4m (rows, groups): the group's step d and offset m as fp16, w = d q + m. m is min(w)
  // rounded down and d = (max(w) - m) / 15 rounded up, so every |w - (d q + m)| <= d / 2.
  std::vector<uint8_t> q4;
  std::vector<uint16_t> q4d, q4m;
  static constexpr int64_t kQ4Group = 64, kQ4Bytes = kQ4Group / 2;

  static QMatrix from_f32(const float* W, int64_t rows, int64_t cols, WType type);
  void to_f32(float* out) const;        // the weights this matrix stands for, (rows, cols)
  size_t bytes() const;                 // storage read by one gemv (weights + scales)
};

// The engine's matrices already in one weight type, by parameter name: read from a file that
// `linmix convert` wrote (Model::packed), or being recorded while an engine converts a model's
// FP32 weights (recording: convert_checkpoint).
struct PackedWeights {
  WType type = WType::F32;
  std::map<std::string, QMatrix> mats;
  bool recording = false;
};

// y (rows) = W x. Parallel over row blocks (OpenMP).
void gemv(const QMatrix& W, const float* x, float* y);
// Several independent products y_j = W_j x_j in one parallel region (one barrier instead of
// one each: decode's many small products per layer); at most 16.
struct GemvJob {
  const QMatrix* W;
  const float* x;
  float* y;
};
void gemv_many(const GemvJob* jobs, int n);
// Name of the kernel family gemv uses on this CPU ("avx512" | "avx2").
const char* gemv_isa();

float bf16_to_f32(uint16_t h);
uint16_t f32_to_bf16(float f);  // round to nearest even; NaN stays NaN
float f16_to_f32(uint16_t h);   // IEEE half

}  // namespace linmix
