// Data-parallel collectives for `train` with several processes.
//
// The library calls this interface and never MPI itself: the command-line tool supplies MPI's
// (tools/mpi_comm.cpp, when `mpirun -np N linmix train` launched it), a null Comm* is one
// process. Every rank calls the same collectives in the same order; each blocks until all ranks
// have called it (an implementation gives up with an Error-free abort of the whole job when a
// rank does not answer, rather than hang).
#pragma once
#include <cstdint>

namespace linmix {

struct Comm {
  virtual ~Comm() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  // In place: x = the element-wise sum of every rank's x (the same result on every rank).
  virtual void allreduce_sum(float* x, int64_t n) = 0;
  virtual void allreduce_sum(double* x, int64_t n) = 0;
  // In place: every rank's x = rank 0's x.
  virtual void broadcast(float* x, int64_t n) = 0;
  virtual void barrier() = 0;
};

}  // namespace linmix
