// MPI for `mpirun -np N linmix train` (tools/mpi_comm.cpp; built when CMake finds MPI).
#pragma once
#include <memory>
#include <string>

#include "linmix/comm.h"

namespace linmix::cli {

// The ranks this process runs with: null when it was not started by mpirun (or with one rank),
// else MPI initialised and its MPI_COMM_WORLD (MPI_Finalize when destroyed). Error when mpirun
// started several ranks and this binary was built without MPI. A collective that waits longer
// than LINMIX_MPI_TIMEOUT seconds (default 600) for the other ranks aborts the job with a message.
std::unique_ptr<Comm> mpi_start();
// The ranks started on this machine (mpirun's local size; 1 without mpirun).
int local_ranks();
// Prints "linmix (rank R of N): what" and aborts every rank of the job with exit code 2.
[[noreturn]] void mpi_fail(const Comm& comm, const std::string& what);

}  // namespace linmix::cli
