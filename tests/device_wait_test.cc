// The polling device wait and its registered checks (runtime/device_wait.h). Host-only: the
// CUDA backend and the NCCL communicator wait through this code.
#include "runtime/device_wait.h"

#include <glog/logging.h>
#include <gtest/gtest.h>

#include <chrono>
#include <string>
#include <vector>

namespace moerun {
namespace {

TEST(DeviceWaitTest, PollsUntilDoneAndRunsTheChecksBetweenPolls) {
  std::vector<double> waited;
  std::vector<std::string> whats;
  const int before = DeviceWaitCheckCount();
  const int id = AddDeviceWaitCheck([&](double w, const std::string& what) {
    waited.push_back(w);
    whats.push_back(what);
  });
  EXPECT_EQ(DeviceWaitCheckCount(), before + 1);
  int polls = 0;
  PollDeviceWait([&] { return ++polls == 100; }, "the test's queue");
  EXPECT_EQ(polls, 100);
  // One check per poll that found the work unfinished, with the wait's name and a growing
  // wait time (past the first 64 polls each one sleeps).
  ASSERT_EQ(waited.size(), 99u);
  EXPECT_EQ(whats.front(), "the test's queue");
  for (size_t i = 1; i < waited.size(); ++i) EXPECT_GE(waited[i], waited[i - 1]);
  EXPECT_GT(waited.back(), 30 * 50e-6);  // at least the 35 sleeps of 50 us, give or take
  // Done at the first poll: no check runs.
  waited.clear();
  PollDeviceWait([] { return true; }, "an idle queue");
  EXPECT_TRUE(waited.empty());
  RemoveDeviceWaitCheck(id);
  EXPECT_EQ(DeviceWaitCheckCount(), before);
  // A removed check runs no more.
  polls = 0;
  PollDeviceWait([&] { return ++polls == 3; }, "after removal");
  EXPECT_TRUE(waited.empty());
}

TEST(DeviceWaitTest, EveryRegisteredCheckRuns) {
  int a = 0, b = 0;
  const int ia = AddDeviceWaitCheck([&](double, const std::string&) { ++a; });
  const int ib = AddDeviceWaitCheck([&](double, const std::string&) { ++b; });
  EXPECT_NE(ia, ib);
  int polls = 0;
  PollDeviceWait([&] { return ++polls == 4; }, "two checks");
  EXPECT_EQ(a, 3);
  EXPECT_EQ(b, 3);
  RemoveDeviceWaitCheck(ia);
  polls = 0;
  PollDeviceWait([&] { return ++polls == 2; }, "one check");
  EXPECT_EQ(a, 3);
  EXPECT_EQ(b, 4);
  RemoveDeviceWaitCheck(ib);
}

TEST(DeviceWaitDeathTest, AWaitThatNeverEndsIsEndedByItsCheckWithTheMessage) {
  // What the NCCL communicator's check does with a peer that never comes: the wait is
  // ended after the timeout, naming what it waited for.
  EXPECT_DEATH(
      {
        AddDeviceWaitCheck([](double waited_s, const std::string& what) {
          if (waited_s > 0.05) LOG(FATAL) << "rank 1/2: waiting for " << what << " timed out";
        });
        PollDeviceWait([] { return false; }, "the device backend's stream");
      },
      "rank 1/2: waiting for the device backend's stream timed out");
}

TEST(DeviceWaitDeathTest, RemovingACheckTwiceDies) {
  EXPECT_DEATH(
      {
        const int id = AddDeviceWaitCheck([](double, const std::string&) {});
        RemoveDeviceWaitCheck(id);
        RemoveDeviceWaitCheck(id);
      },
      "not registered");
}

}  // namespace
}  // namespace moerun
