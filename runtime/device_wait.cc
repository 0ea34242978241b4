// The registry of device-wait checks and the polling wait (see device_wait.h).
#include "runtime/device_wait.h"

#include <glog/logging.h>

#include <chrono>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

namespace moerun {
namespace {

struct Registry {
  std::mutex mu;
  int next_id = 1;
  std::vector<std::pair<int, DeviceWaitCheck>> checks;
};

Registry& Checks() {
  static Registry* r = new Registry();  // never destroyed: communicators may outlive main
  return *r;
}

}  // namespace

int AddDeviceWaitCheck(DeviceWaitCheck check) {
  CHECK(check) << "an empty device-wait check";
  Registry& r = Checks();
  std::lock_guard<std::mutex> lock(r.mu);
  const int id = r.next_id++;
  r.checks.emplace_back(id, std::move(check));
  return id;
}

void RemoveDeviceWaitCheck(int id) {
  Registry& r = Checks();
  std::lock_guard<std::mutex> lock(r.mu);
  for (auto it = r.checks.begin(); it != r.checks.end(); ++it) {
    if (it->first == id) {
      r.checks.erase(it);
      return;
    }
  }
  LOG(FATAL) << "device-wait check " << id << " is not registered (removed twice?)";
}

int DeviceWaitCheckCount() {
  Registry& r = Checks();
  std::lock_guard<std::mutex> lock(r.mu);
  return static_cast<int>(r.checks.size());
}

void PollDeviceWait(const std::function<bool()>& done, const std::string& what) {
  const auto start = std::chrono::steady_clock::now();
  Registry& r = Checks();
  // polls stops counting at 64 (the sleeps start there): a wait of any length never
  // overflows it.
  for (int polls = 0;; polls += polls < 64 ? 1 : 0) {
    if (done()) return;
    const double waited =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    {
      // Held while the checks run: a communicator cannot be destroyed under its check.
      std::lock_guard<std::mutex> lock(r.mu);
      for (const auto& [id, check] : r.checks) check(waited, what);
    }
    if (polls >= 64) std::this_thread::sleep_for(std::chrono::microseconds(50));
  }
}

}  // namespace moerun
