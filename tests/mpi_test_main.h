// Access to the MPI world from GoogleTest binaries run under mpirun (see mpi_test_main.cc).
#ifndef MOERUN_TESTS_MPI_TEST_MAIN_H_
#define MOERUN_TESTS_MPI_TEST_MAIN_H_

#include <string>

#include "comm/communicator.h"

namespace moerun::testing {
Communicator& World();
// A new directory under the system's temp directory, made by rank 0, the same path on
// every rank (collective). The caller removes it.
std::string SharedTempDir(const std::string& prefix);
}  // namespace moerun::testing

#endif  // MOERUN_TESTS_MPI_TEST_MAIN_H_
