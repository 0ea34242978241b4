// Access to the MPI world from GoogleTest binaries run under mpirun (see mpi_test_main.cc).
#ifndef MOERUN_TESTS_MPI_TEST_MAIN_H_
#define MOERUN_TESTS_MPI_TEST_MAIN_H_

#include "comm/communicator.h"

namespace moerun::testing {
Communicator& World();
}  // namespace moerun::testing

#endif  // MOERUN_TESTS_MPI_TEST_MAIN_H_
