// A program that fails on purpose, for tests that prove a failure on one rank ends the
// whole job with a message naming the rank (tests/fault_test.sh runs it under mpirun).
//   fault_probe watchdog   rank 0 waits in a barrier rank 1 never joins (1 s watchdog)
//   fault_probe mpi-error  an MPI call with a bad root on every rank
//   fault_probe check      rank 1 fails a CHECK while rank 0 waits in a barrier
//   fault_probe exit       rank 1 exits with code 3 while rank 0 waits in a barrier
// Under mpirun -np 4, with a 3 s watchdog, rank 2 fails while the others wait in an
// all-reduce after one good one:
//   fault_probe loop       rank 2 spins in an endless loop
//   fault_probe stop       rank 2 stops itself (SIGSTOP)
//   fault_probe kill       rank 2 kills itself (SIGKILL)
#include <signal.h>
#include <unistd.h>

#include <cstdlib>
#include <iostream>
#include <string>

#include "comm/mpi_communicator.h"
#include "runtime/process.h"

int main(int argc, char** argv) {
  if (argc != 2) {
    std::cerr << "usage: fault_probe watchdog|mpi-error|check|exit\n";
    return 2;
  }
  const std::string mode = argv[1];
  moerun::SetProcess(moerun::DiscoverProcessFromEnvironment());
  moerun::InitLogging(argv[0], {});
  const bool stalls = mode == "loop" || mode == "stop" || mode == "kill";
  moerun::MpiRuntime mpi(&argc, &argv,
                         {/*watchdog_timeout_s=*/mode == "watchdog" ? 1.0
                          : stalls                                  ? 3.0
                                                                    : 0.0});
  auto world = mpi.World();
  const int rank = world->rank();
  if (mode == "watchdog") {
    if (rank == 1) sleep(60);
    world->Barrier();
  } else if (mode == "mpi-error") {
    int x = 0;
    MOERUN_MPI_CHECK(MPI_Bcast(&x, 1, MPI_INT, 99, MPI_COMM_WORLD));
  } else if (mode == "check") {
    if (rank == 1) CHECK(false) << "injected failure";
    world->Barrier();
  } else if (stalls) {
    double x = 1;
    world->AllReduce(&x, 1, moerun::DType::kF64, moerun::ReduceOp::kSum);
    if (rank == 2) {
      if (mode == "stop") raise(SIGSTOP);
      if (mode == "kill") raise(SIGKILL);
      volatile double spin = 0;
      for (;;) spin = spin + 1;  // the endless loop
    }
    world->AllReduce(&x, 1, moerun::DType::kF64, moerun::ReduceOp::kSum);
  } else if (mode == "exit") {
    if (rank == 1) std::exit(3);
    world->Barrier();
  } else {
    std::cerr << "unknown mode " << mode << "\n";
    return 2;
  }
  std::cout << "fault_probe: no failure happened\n";
  return 0;
}
