#include <malloc.h>
#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include "kernels/blas.h"
#include "linmix/bench.h"


namespace linmix {

namespace {
double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// VmHWM / VmRSS of /proc/self/status, bytes.
double status_kb(const char* key) {
  std::ifstream f("/proc/self/status");
  std::string line;
  const size_t n = std::strlen(key);
  while (std::getline(f, line))
    if (line.compare(0, n, key) == 0) return std::atof(line.c_str() + n + 1) * 1024.0;
  return 0.0;
}
double rss_at_reset = 0.0;
}  // namespace

void set_threads(int n) {
  if (n <= 0) return;
  omp_set_num_threads(n);
  blas::library().set_num_threads(n);
}

double measure_triad_gbs(int64_t n, int reps) {
  std::vector<float> a(n), b(n, 1.0f), c(n, 2.0f);
  const float s = 3.0f;
  double best = 1e30;
  for (int r = 0; r < reps + 1; ++r) {  // the first pass faults the pages in
    const double t0 = now_s();
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; ++i) a[i] = b[i] + s * c[i];
    const double t = now_s() - t0;
    if (r) best = std::min(best, t);
  }
  volatile float sink = a[n / 2];
  (void)sink;
  return 12.0 * double(n) / best / 1e9;
}

double measure_read_gbs(int64_t n, int reps) {
  constexpr int64_t kW = 64;  // independent partial sums: the adds never wait on each other
  n = n / kW * kW;
  std::vector<float> a(n, 1.0f);
  double best = 1e30, sink = 0;
  for (int r = 0; r < reps + 1; ++r) {  // the first pass faults the pages in
    const double t0 = now_s();
    float total = 0.0f;
#pragma omp parallel reduction(+ : total)
    {
      alignas(64) float acc[kW] = {};
#pragma omp for schedule(static)
      for (int64_t i = 0; i < n; i += kW)
#pragma omp simd
        for (int64_t j = 0; j < kW; ++j) acc[j] += a[i + j];
      for (int64_t j = 0; j < kW; ++j) total += acc[j];
    }
    const double t = now_s() - t0;
    sink += total;
    if (r) best = std::min(best, t);
  }
  volatile double keep = sink;
  (void)keep;
  return 4.0 * double(n) / best / 1e9;
}

double measure_sgemm_gflops(int64_t n, int reps) {
  std::vector<float> A(n * n, 0.5f), B(n * n, 0.25f), C(n * n);
  double best = 1e30;
  for (int r = 0; r < reps + 1; ++r) {
    const double t0 = now_s();
    blas::sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(n), int(n), int(n), 1.0f, A.data(), int(n), B.data(),
                int(n), 0.0f, C.data(), int(n));
    const double t = now_s() - t0;
    if (r) best = std::min(best, t);
  }
  return 2.0 * double(n) * double(n) * double(n) / best / 1e9;
}

void reset_peak_rss() {
  std::ofstream f("/proc/self/clear_refs");
  f << "5";  // resets VmHWM to the current VmRSS
  f.close();
  rss_at_reset = status_kb("VmRSS:");
}

double peak_extra_bytes() { return std::max(0.0, status_kb("VmHWM:") - rss_at_reset); }
double rss_bytes() { return status_kb("VmRSS:"); }
double peak_rss_bytes() { return status_kb("VmHWM:"); }

void keep_freed_memory() {
  mallopt(M_MMAP_THRESHOLD, 256 << 20);
  mallopt(M_TRIM_THRESHOLD, 1 << 30);
}

void map_every_buffer() {
  mallopt(M_MMAP_THRESHOLD, 1 << 16);
  mallopt(M_TRIM_THRESHOLD, 0);
}

}  // namespace linmix
