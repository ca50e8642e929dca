// Benchmarks (linmix bench): the machine's own limits and linmix's kernels measured in the
// same run, so that every speed is reported as a fraction of a limit or a ratio to a peer.
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace linmix {

// Sets the OpenMP and OpenBLAS thread counts (0 = leave them).
void set_threads(int n);

// STREAM-like triad a = b + s c over three float arrays of n elements, best of reps, in GB/s
// counting 12 bytes per element (STREAM's convention: the write-allocate read is not counted).
double measure_triad_gbs(int64_t n, int reps);
// A read-only stream (a sum over n floats, SIMD, all threads), best of reps, GB/s: the ceiling
// of a kernel that only reads, such as a matrix-vector product over weights that miss the cache.
double measure_read_gbs(int64_t n, int reps);
// OpenBLAS sgemm of n x n matrices, best of reps, GFLOP/s (2 n^3 per product).
double measure_sgemm_gflops(int64_t n, int reps);

// Peak resident memory since the last reset_peak_rss(), minus the resident memory at that
// reset, in bytes: what a kernel allocated and touched. Uses /proc/self/clear_refs (Linux).
void reset_peak_rss();
double peak_extra_bytes();
// The resident memory now and its peak since the last reset_peak_rss() (or the start), in bytes.
double rss_bytes();
double peak_rss_bytes();

// glibc heap policies (mallopt), process-wide:
// keep_freed_memory: freed buffers stay in the heap for the next call or step instead of going
// back to the kernel, so a loop of calls does not page-fault its buffers in again each time
// (allocations of 256 MiB and more are still mapped). linmix train, linmix bench's timed runs
// and the torch extension run under it.
void keep_freed_memory();
// map_every_buffer: every buffer of 64 KiB or more is mapped when allocated and unmapped when
// freed, so the peak resident set is the peak of live memory (glibc's adaptive threshold would
// otherwise keep freed buffers in per-thread heaps, and the peak depend on which thread ran what).
void map_every_buffer();

struct ModelBenchOptions {
  int threads = 2;
  int64_t vocab = 50277, d_model = 768, n_layer = 12, ffn_mult = 4;  // RWKV-4 169M
  std::string version = "4";  // RWKV 4, 5 (5.2), 6 or 7 (the blocks BlinkDL publishes, heads of 64) or "mamba"
  std::string size;           // "0.1B", "0.4B", "1.5B": a released model's L, C (and V = 65536 past v4)
  int64_t decode_tokens = 32, prefill_tokens = 1024;
  int rounds = 5;  // decode: rounds of (triad, read, decode_tokens tokens), interleaved
  std::vector<std::string> dtypes{"f32", "bf16", "int8", "q4"};
  std::string checkpoint, data;  // optional: perplexity of a trained RWKV-4 in each dtype
  int64_t eval_seq = 256, eval_windows = 32;
  std::string out;                // JSON report path ("" = none)
  bool load = true;               // time loading a checkpoint file into each type's engine
  bool profile = false;           // print where one prefill's time goes (profile regions)
};
// `linmix bench --model`: RWKV decode and prefill against the bandwidth and sgemm limits.
// Prints a table; returns 0.
int bench_model(const ModelBenchOptions& o);

struct MixerBenchOptions {
  std::vector<std::string> mixers;  // empty = every mechanism
  std::vector<int64_t> T;           // empty = 256, 512, ..., 65536
  std::vector<int> threads{1, 2};
  double max_seconds = 20.0;        // a size whose predicted run time exceeds this is skipped
  double max_input_gib = 4.0;       // ... and one whose inputs exceed this
  int64_t step_tokens = 256;        // tokens timed in the recurrent step
  bool backward = true, step = true;
  std::string out;                  // JSON report path ("" = none)
};
// `linmix bench`: every mechanism's parallel forward, forward + backward and recurrent step
// against T, with time, tokens/s, GFLOP/s (chunked and attention forms) or GB/s (scans), peak
// extra memory, and the fitted exponent of time in T; sgemm and triad in the same run.
int bench_mixers(const MixerBenchOptions& o);

// The dims, params and FLOP count of each mechanism come from its MixerSpec (example_dims at
// Scale::Bench, bench_params, flops).

}  // namespace linmix
