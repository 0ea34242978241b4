// GoogleTest main for tests run under mpirun: brings MPI up (through MpiRuntime, as the
// product does), runs the tests on every rank, and returns the max of the ranks' results,
// so a failure on any rank fails the process. Ranks other than 0 print failures only.
#include "tests/mpi_test_main.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>

#include "comm/mpi_communicator.h"
#include "runtime/kernels.h"
#include "runtime/process.h"

namespace moerun::testing {
namespace {
std::unique_ptr<Communicator> g_world;

// Prints only failed assertions, tagged with the rank.
class FailurePrinter : public ::testing::EmptyTestEventListener {
  void OnTestPartResult(const ::testing::TestPartResult& r) override {
    if (!r.failed()) return;
    fprintf(stderr, "[rank %d] %s:%d: Failure\n%s\n", Process().rank,
            r.file_name() ? r.file_name() : "?", r.line_number(), r.summary());
  }
};
}  // namespace

Communicator& World() { return *g_world; }

std::string SharedTempDir(const std::string& prefix) {
  char buf[512] = {0};
  if (World().rank() == 0) {
    std::string t = (std::filesystem::temp_directory_path() / (prefix + "-XXXXXX")).string();
    CHECK(::mkdtemp(t.data()) != nullptr) << "mkdtemp " << t;
    std::strncpy(buf, t.c_str(), sizeof(buf) - 1);
  }
  World().Broadcast(buf, sizeof(buf), DType::kU8, 0);
  return buf;
}
}  // namespace moerun::testing

int main(int argc, char** argv) {
  moerun::SetProcess(moerun::DiscoverProcessFromEnvironment());
  moerun::InitLogging(argv[0], {});
  ::testing::InitGoogleTest(&argc, argv);
  int result = 0;
  {
    moerun::MpiRuntime mpi(&argc, &argv, {/*watchdog_timeout_s=*/120});
    moerun::InitLogging(argv[0], {});
    // As moerun does: the host's cores shared between its ranks (no oversubscription);
    // MOERUN_TEST_THREADS sets another count (the multi-threaded paths at several ranks).
    const char* threads = std::getenv("MOERUN_TEST_THREADS");
    moerun::SetNumThreads(threads != nullptr
                              ? std::max(1, std::atoi(threads))
                              : moerun::DefaultThreadsPerRank(moerun::Process().local_size));
    moerun::testing::g_world = mpi.World();
    if (moerun::Process().rank != 0) {
      auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
      delete listeners.Release(listeners.default_result_printer());
      listeners.Append(new moerun::testing::FailurePrinter);
    }
    result = RUN_ALL_TESTS();
    moerun::testing::World().AllReduce(&result, 1, moerun::DType::kI32, moerun::ReduceOp::kMax);
    moerun::testing::g_world.reset();
  }
  return result;
}
