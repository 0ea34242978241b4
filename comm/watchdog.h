// A per-process watchdog for collectives: each collective marks its start and end; a
// background thread aborts the job when one stays in flight longer than the timeout.
// The hot path costs a few relaxed atomic stores per collective.
//
// With a PeerService (the MPI backend gives one), every rank's watchdog thread also answers
// its peers' "where are you?" on a communicator of its own, and a rank that times out asks
// every peer before aborting, so the message names the ranks that did not arrive: not in a
// collective (an endless loop, a slow step), in another collective, or not answering at all
// (stopped, dead, hung outside MPI).
#ifndef MOERUN_COMM_WATCHDOG_H_
#define MOERUN_COMM_WATCHDOG_H_

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

namespace moerun {

// This rank's state as peers see it.
struct WatchdogState {
  bool in_collective = false;
  std::string op, comm;  // the current (or, outside a collective, the last) collective
  int64_t seq = 0;       // collectives entered so far (the current one included)
  double seconds = 0;    // in the current collective, or since the last one ended
};

class PeerService {
 public:
  virtual ~PeerService() = default;
  // Answers peers that asked (called on every watchdog tick; must not block).
  virtual void Serve(const WatchdogState& mine) = 0;
  // Asks every peer for its state, answering peers meanwhile; waits at most grace_s.
  // Returns a description, one clause per peer, naming those that did not arrive.
  virtual std::string AskPeers(const WatchdogState& mine, double grace_s) = 0;
};

// "in all_reduce on 'world' (collective #12) for 5.1 s" / "not in a collective for 6.0 s
// (last: all_reduce #11)".
std::string DescribeState(const WatchdogState& s);

class Watchdog {
 public:
  // `on_timeout(message)` runs on the watchdog thread and must not return (it aborts).
  using TimeoutHandler = void (*)(const std::string& message);
  Watchdog(double timeout_s, TimeoutHandler on_timeout,
           std::unique_ptr<PeerService> peers = nullptr);
  ~Watchdog();
  Watchdog(const Watchdog&) = delete;
  Watchdog& operator=(const Watchdog&) = delete;

  double timeout_s() const { return timeout_s_; }
  // `op` and `comm_name` must outlive the collective (string literals, communicator names).
  void Enter(const char* op, const std::string* comm_name, int comm_size);
  void Exit();
  WatchdogState State() const;

 private:
  void Run();
  std::unique_ptr<PeerService> peers_;
  std::atomic<int64_t> seq_{0};
  std::atomic<int64_t> ended_ns_{0};
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
