// The BLAS calls of linmix (sgemm, sgemv) and its BLAS thread count go through here: by default
// the OpenBLAS the library is linked with; use_blas_library() installs another build at run time.
// The torch extension does: torch brings Debian's pthread OpenBLAS into the process first (same
// SONAME, so it is the one the extension's calls bind to), whose threads would run linmix's
// top-level GEMMs on one thread (set to 1) or spin against linmix's OpenMP threads inside its
// loops; the extension loads the OpenMP build beside it for linmix's own calls (torch keeps its).
#pragma once
#include <cblas.h>

#include <string>

namespace linmix::blas {

struct Library {
  decltype(&cblas_sgemm) sgemm;
  decltype(&cblas_sgemv) sgemv;
  void (*set_num_threads)(int);
  int (*get_parallel)();  // 0 sequential, 1 pthreads, 2 OpenMP
};
const Library& library();
// OpenBLAS 0.3.21 (Debian 12) picks its kernels by the CPU's model when it loads and falls back to
// its Prescott (SSE3) kernels on Intel CPUs newer than its tables (family 6 model 207, measured here:
// 2-thread sgemm 64-67 GFLOP/s, 290-314 with its SkylakeX kernels). OPENBLAS_CORETYPE, read as the
// library loads, chooses them instead. avx512_core_wanted(): the core name to set when the loaded
// OpenBLAS says Prescott, OPENBLAS_CORETYPE is unset and the CPU has AVX-512 (F, BW, DQ, VL): the
// SkylakeX kernels; else null.
const char* avx512_core_wanted();
// Switches the loaded OpenBLAS (and one loaded later by use_blas_library: its load reads the
// variable) to the AVX-512 kernels where avx512_core_wanted() says so, in this process: sets
// OPENBLAS_CORETYPE, then has a DYNAMIC_ARCH OpenBLAS choose its kernel table again
// (gotoblas_dynamic_quit / gotoblas_dynamic_init, read from the environment; Debian's builds export
// both). True when the kernels in use are then the wanted ones or nothing was wanted; false when
// the OpenBLAS cannot switch (the variable stays set: a process run again picks them as it loads).
// Call it before any BLAS call and before any other thread starts.
bool select_avx512_core();
// Loads the OpenBLAS at `path` (RTLD_LOCAL: its symbols stay its own) and uses it from now on;
// false (nothing changed) when it cannot be loaded or lacks a function.
bool use_blas_library(const std::string& path);

template <class... A>
inline void sgemm(A... a) {
  library().sgemm(a...);
}
template <class... A>
inline void sgemv(A... a) {
  library().sgemv(a...);
}

}  // namespace linmix::blas
