// A per-process watchdog for collectives: each collective marks its start and end; a
// background thread aborts the job when one stays in flight longer than the timeout.
// The hot path costs two relaxed atomic stores per collective.
#ifndef MOERUN_COMM_WATCHDOG_H_
#define MOERUN_COMM_WATCHDOG_H_

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <string>
#include <thread>

namespace moerun {

class Watchdog {
 public:
  // `on_timeout(message)` runs on the watchdog thread and must not return (it aborts).
  using TimeoutHandler = void (*)(const std::string& message);
  Watchdog(double timeout_s, TimeoutHandler on_timeout);
  ~Watchdog();
  Watchdog(const Watchdog&) = delete;
  Watchdog& operator=(const Watchdog&) = delete;

  double timeout_s() const { return timeout_s_; }
  // `op` and `comm_name` must outlive the collective (string literals, communicator names).
  void Enter(const char* op, const std::string* comm_name, int comm_size);
  void Exit();

 private:
  void Run();
  double timeout_s_;
  TimeoutHandler on_timeout_;
  std::atomic<int64_t> started_ns_{0};  // 0: no collective in flight
  std::atomic<const char*> op_{nullptr};
  std::atomic<const std::string*> comm_name_{nullptr};
  std::atomic<int> comm_size_{0};
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  std::thread thread_;
};

// Marks one collective for the watchdog (no-op when the watchdog is null).
class WatchdogScope {
 public:
  WatchdogScope(Watchdog* w, const char* op, const std::string* comm_name, int comm_size) : w_(w) {
    if (w_ != nullptr) w_->Enter(op, comm_name, comm_size);
  }
  ~WatchdogScope() {
    if (w_ != nullptr) w_->Exit();
  }

 private:
  Watchdog* w_;
};

}  // namespace moerun

#endif  // MOERUN_COMM_WATCHDOG_H_
