// Benchmarks (linmix bench): the machine's own limits and linmix's kernels measured in the
// same run, so that every speed is reported as a fraction of a limit or a ratio to a peer.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace linmix {

// Sets the OpenMP and OpenBLAS thread counts (0 = leave them).
void set_threads(int n);

// STREAM-like triad a = b + s c over three float arrays of n elements, best of reps, in GB/s
// counting 12 bytes per element (STREAM's convention: the write-allocate read is not counted).
double measure_triad_gbs(int64_t n, int reps);
// OpenBLAS sgemm of n x n matrices, best of reps, GFLOP/s (2 n^3 per product).
double measure_sgemm_gflops(int64_t n, int reps);

// Peak resident memory since the last reset_peak_rss(), minus the resident memory at that
// reset, in bytes: what a kernel allocated and touched. Uses /proc/self/clear_refs (Linux).
void reset_peak_rss();
double peak_extra_bytes();

struct ModelBenchOptions {
  int threads = 2;
  int64_t vocab = 50277, d_model = 768, n_layer = 12, ffn_mult = 4;  // RWKV-4 169M
  int64_t decode_tokens = 32, prefill_tokens = 1024;
  std::vector<std::string> dtypes{"f32", "bf16", "int8"};
  std::string checkpoint, data;  // optional: perplexity of a trained RWKV-4 in each dtype
  int64_t eval_seq = 256, eval_windows = 32;
  std::string out;                // JSON report path ("" = none)
};
// `linmix bench --model`: RWKV-4 decode and prefill against the bandwidth and sgemm limits.
// Prints a table; returns 0.
int bench_model(const ModelBenchOptions& o);

}  // namespace linmix
