#include "kernels/blas.h"

#include <dlfcn.h>

#include <cstdlib>
#include <cstring>

extern "C" void openblas_set_num_threads(int);
extern "C" int openblas_get_parallel();
extern "C" char* openblas_get_corename();

namespace linmix::blas {

namespace {
Library& current() {
  static Library lib{&cblas_sgemm, &cblas_sgemv, &openblas_set_num_threads, &openblas_get_parallel};
  return lib;
}
}  // namespace

const Library& library() { return current(); }

const char* avx512_core_wanted() {
  if (std::getenv("OPENBLAS_CORETYPE")) return nullptr;  // the user's choice, or set already
  const char* core = openblas_get_corename();
  if (!core || strcasecmp(core, "prescott") != 0) return nullptr;
  __builtin_cpu_init();
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  return avx512 ? "SkylakeX" : nullptr;
}

bool select_avx512_core() {
  const char* core = avx512_core_wanted();
  if (!core) return true;
  if (::setenv("OPENBLAS_CORETYPE", core, 1) != 0) return false;
  // the entry points of the OpenBLAS the process bound (looked up: a build without DYNAMIC_ARCH
  // has neither, and then cannot switch)
  auto quit = reinterpret_cast<void (*)()>(::dlsym(RTLD_DEFAULT, "gotoblas_dynamic_quit"));
  auto init = reinterpret_cast<void (*)()>(::dlsym(RTLD_DEFAULT, "gotoblas_dynamic_init"));
  if (!quit || !init) return false;
  quit(), init();
  const char* now = openblas_get_corename();
  return now && strcasecmp(now, core) == 0;
}

bool use_blas_library(const std::string& path) {
  void* h = ::dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (!h) return false;
  Library lib{reinterpret_cast<decltype(&cblas_sgemm)>(::dlsym(h, "cblas_sgemm")),
              reinterpret_cast<decltype(&cblas_sgemv)>(::dlsym(h, "cblas_sgemv")),
              reinterpret_cast<void (*)(int)>(::dlsym(h, "openblas_set_num_threads")),
              reinterpret_cast<int (*)()>(::dlsym(h, "openblas_get_parallel"))};
  if (!lib.sgemm || !lib.sgemv || !lib.set_num_threads || !lib.get_parallel) {
    ::dlclose(h);
    return false;
  }
  current() = lib;  // the handle stays open for the life of the process
  return true;
}

}  // namespace linmix::blas
