#include "kernels/blas.h"

#include <dlfcn.h>

extern "C" void openblas_set_num_threads(int);
extern "C" int openblas_get_parallel();

namespace linmix::blas {

namespace {
Library& current() {
  static Library lib{&cblas_sgemm, &cblas_sgemv, &openblas_set_num_threads, &openblas_get_parallel};
  return lib;
}
}  // namespace

const Library& library() { return current(); }

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
