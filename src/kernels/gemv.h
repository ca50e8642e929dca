// Matrix-vector products for one-token decode, with weights in FP32, BF16, INT8 (per-row scales) or
// Q4 (4 bits, a step and an offset per group of 64, in tiles of 16 rows). Accumulation is FP32,
// activations FP32, except INT8 on AVX-512 and Q4 everywhere: x rounded to int16 (a step max|x| /
// 32767; Q4's max|x| / 32639, as two bytes) and integer products (gemv.cpp, rows_i8_avx512,
// rows_q4_avx512, rows_q4_avx2). AVX-512 kernels are
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
  // Q4: groups of 64 values along a row, each with a step d and an offset m (fp16), w = d q + m,
  // q in 0..15; m is min(w) rounded down and d = (max(w) - m) / 15 rounded up, so every
  // |w - (d q + m)| <= d / 2 (a short last group padded with q = 0). Stored in tiles of 16 rows
  // by one group, as the AVX-512 VNNI decode kernel multiplies them (16 rows in the 16 lanes, four
  // values of a row in a lane's 4 bytes): q4 (row_blocks, groups, 512) bytes, row_blocks =
  // ceil(rows / 16) (the rows past `rows` all zero); row n of the block, value k of the group sits
  // in byte 64 ((k % 32) / 4) + 4 n + k % 4, in its low nibble for k < 32, its high one else.
  // q4d, q4m (row_blocks, groups, 16): the steps and offsets of the block's 16 rows.
  std::vector<uint8_t> q4;
  std::vector<uint16_t> q4d, q4m;
  static constexpr int64_t kQ4Group = 64, kQ4Rows = 16, kQ4Tile = kQ4Group * kQ4Rows / 2;
  int64_t q4_groups() const { return (cols + kQ4Group - 1) / kQ4Group; }
  size_t q4_at(int64_t r, int64_t g) const { return size_t(((r / kQ4Rows) * q4_groups() + g) * kQ4Rows + r % kQ4Rows); }
  int q4_value(int64_t r, int64_t c) const {  // q of row r, column c
    const int64_t k = c % kQ4Group;
    const uint8_t b = q4[q4_at(r, c / kQ4Group) / kQ4Rows * kQ4Tile + size_t(64 * ((k % 32) / 4) + 4 * (r % kQ4Rows) + k % 4)];
    return k < 32 ? b & 15 : b >> 4;
  }

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
