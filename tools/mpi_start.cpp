// mpi_start: the ranks of `mpirun -np N linmix train`, through the module linmix-mpi.so
// (tools/mpi_comm.cpp) built beside this executable and loaded only when mpirun started several
// ranks: MPI's libraries are then not loaded by the commands that never use them.
#include <dlfcn.h>
#include <unistd.h>

#include <algorithm>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "linmix/error.h"
#include "mpi_comm.h"

namespace linmix::cli {
namespace {

// How many ranks mpirun (OpenMPI, MPICH/Hydra, PMIx launchers) says this job has; 1 without.
int env_int(const char* const* names, int fallback) {
  for (const char* const* n = names; *n; ++n)
    if (const char* v = std::getenv(*n)) return std::atoi(v);
  return fallback;
}
int launched_size() {
  static const char* const names[] = {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", nullptr};
  return env_int(names, 1);
}

using AbortFn = void (*)(int);
AbortFn g_abort = nullptr;  // the module's MPI_Abort once it is loaded

#ifdef LINMIX_HAVE_MPI
using OpenFn = Comm* (*)();
// The module beside this executable (build/<preset>/linmix-mpi.so, whichever linmix-<arch> runs).
std::string module_path() {
  char self[PATH_MAX];
  const ssize_t n = ::readlink("/proc/self/exe", self, sizeof self - 1);
  LINMIX_CHECK(n > 0, "cannot find this executable's path (/proc/self/exe) to load linmix-mpi.so");
  const std::string exe(self, size_t(n));
  return exe.substr(0, exe.rfind('/') + 1) + "linmix-mpi.so";
}
#endif

}  // namespace

std::unique_ptr<Comm> mpi_start() {
  const int launched = launched_size();
  if (launched <= 1) return nullptr;
#ifdef LINMIX_HAVE_MPI
  const std::string path = module_path();
  // RTLD_GLOBAL: OpenMPI's own components, which it opens in MPI_Init, see libmpi's symbols
  void* lib = ::dlopen(path.c_str(), RTLD_NOW | RTLD_GLOBAL);
  if (!lib) {
    const char* why = ::dlerror();
    throw Error("mpirun started " + std::to_string(launched) + " ranks, but MPI could not be loaded: " +
                (why ? why : path));
  }
  const auto open = reinterpret_cast<OpenFn>(::dlsym(lib, "linmix_mpi_open"));
  g_abort = reinterpret_cast<AbortFn>(::dlsym(lib, "linmix_mpi_abort"));
  LINMIX_CHECK(open && g_abort, path + ": not linmix's MPI module (linmix_mpi_open / linmix_mpi_abort missing)");
  std::unique_ptr<Comm> c(open());  // the module stays loaded for the process's life
  if (c->size() > 1) return c;
  return nullptr;
#else
  throw Error("mpirun started " + std::to_string(launched) +
              " ranks, but this linmix was built without MPI (install libopenmpi-dev and rebuild)");
#endif
}

int local_ranks() {
  static const char* const names[] = {"OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "PMIX_LOCAL_SIZE", nullptr};
  return std::max(1, env_int(names, 1));
}

void mpi_fail(const Comm& comm, const std::string& what) {
  std::fprintf(stderr, "linmix (rank %d of %d): %s\n", comm.rank(), comm.size(), what.c_str());
  std::fflush(stderr);
  if (g_abort) g_abort(2);
  std::_Exit(2);
}

}  // namespace linmix::cli
