// linmix-mpi.so: linmix::Comm over MPI_COMM_WORLD, the module `linmix` loads (tools/mpi_start.cpp)
// when mpirun started it with several ranks. Apart from the executable so that every other
// command starts without MPI's libraries (libmpi, open-rte, open-pal, hwloc, libevent, udev:
// ~2 ms of each process's start, measured). Collectives are non-blocking calls polled to a
// deadline, so that a rank which died or hangs turns into a message and an abort of the job
// instead of a hang (mpirun itself ends the job when a rank exits without MPI_Finalize).
#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <thread>

#include "linmix/comm.h"

namespace linmix::cli {
namespace {

class MpiComm final : public Comm {
 public:
  MpiComm() {
    int provided = 0;
    MPI_Init_thread(nullptr, nullptr, MPI_THREAD_FUNNELED, &provided);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank_);
    MPI_Comm_size(MPI_COMM_WORLD, &size_);
    const char* t = std::getenv("LINMIX_MPI_TIMEOUT");
    timeout_s_ = t ? std::atof(t) : 600.0;
    if (!(timeout_s_ > 0)) timeout_s_ = 600.0;
  }
  ~MpiComm() override { MPI_Finalize(); }
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  void allreduce_sum(float* x, int64_t n) override { chunks(x, n, MPI_FLOAT); }
  void allreduce_sum(double* x, int64_t n) override { chunks(x, n, MPI_DOUBLE); }
  void broadcast(float* x, int64_t n) override {
    for (int64_t at = 0; at < n; at += kMaxCount) {
      MPI_Request req;
      MPI_Ibcast(x + at, int(std::min<int64_t>(kMaxCount, n - at)), MPI_FLOAT, 0, MPI_COMM_WORLD, &req);
      wait(req, "broadcast");
    }
  }
  void barrier() override {
    MPI_Request req;
    MPI_Ibarrier(MPI_COMM_WORLD, &req);
    wait(req, "barrier");
  }

 private:
  static constexpr int64_t kMaxCount = int64_t(1) << 30;  // MPI counts are int
  template <class S>
  void chunks(S* x, int64_t n, MPI_Datatype type) {
    for (int64_t at = 0; at < n; at += kMaxCount) {
      MPI_Request req;
      MPI_Iallreduce(MPI_IN_PLACE, x + at, int(std::min<int64_t>(kMaxCount, n - at)), type, MPI_SUM, MPI_COMM_WORLD, &req);
      wait(req, "allreduce");
    }
  }
  void wait(MPI_Request& req, const char* what) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int64_t polls = 0;; ++polls) {
      int done = 0;
      MPI_Test(&req, &done, MPI_STATUS_IGNORE);
      if (done) return;
      if (polls > 1000) std::this_thread::sleep_for(std::chrono::microseconds(50));  // spin briefly, then doze
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      if (s > timeout_s_) {
        std::fprintf(stderr,
                     "linmix (rank %d of %d): no answer from the other ranks in %s for %.0f s (a rank died or "
                     "hangs; LINMIX_MPI_TIMEOUT sets the limit): aborting the job\n",
                     rank_, size_, what, timeout_s_);
        std::fflush(stderr);
        MPI_Abort(MPI_COMM_WORLD, 2);
      }
    }
  }
  int rank_ = 0, size_ = 1;
  double timeout_s_ = 600.0;
};

}  // namespace
}  // namespace linmix::cli

// The module's entry points (looked up by name: tools/mpi_start.cpp). MPI initialised, the
// communicator of every rank; the caller owns it (its destructor finalises MPI).
extern "C" __attribute__((visibility("default"))) linmix::Comm* linmix_mpi_open() {
  return new linmix::cli::MpiComm();
}
// Ends every rank of the job with this exit code.
extern "C" __attribute__((visibility("default"))) void linmix_mpi_abort(int code) { MPI_Abort(MPI_COMM_WORLD, code); }
