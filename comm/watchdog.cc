// Watchdog thread for collectives.
#include "comm/watchdog.h"

#include <algorithm>
#include <chrono>
#include <sstream>

#include "runtime/process.h"

namespace moerun {
namespace {

int64_t NowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

}  // namespace

std::string DescribeState(const WatchdogState& s) {
  std::ostringstream o;
  o.setf(std::ios::fixed);
  o.precision(1);
  if (s.in_collective) {
    o << "in " << s.op << " on '" << s.comm << "' (collective #" << s.seq << ") for " << s.seconds
      << " s";
  } else if (s.seq == 0) {
    o << "not in a collective, none entered yet (" << s.seconds << " s since start)";
  } else {
    o << "not in a collective for " << s.seconds << " s (last: " << s.op << " #" << s.seq << ")";
  }
  return o.str();
}

Watchdog::Watchdog(double timeout_s, TimeoutHandler on_timeout, std::unique_ptr<PeerService> peers)
    : peers_(std::move(peers)), timeout_s_(timeout_s), on_timeout_(on_timeout) {
  ended_ns_.store(NowNs());
  if (timeout_s_ > 0) thread_ = std::thread([this] { Run(); });
}

WatchdogState Watchdog::State() const {
  WatchdogState s;
  const int64_t started = started_ns_.load(std::memory_order_acquire);
  const std::string* name = comm_name_.load(std::memory_order_relaxed);
  const char* op = op_.load(std::memory_order_relaxed);
  s.in_collective = started != 0;
  s.op = op != nullptr ? op : "";
  s.comm = name != nullptr ? *name : "?";
  s.seq = seq_.load(std::memory_order_relaxed);
  s.seconds = (NowNs() - (started != 0 ? started : ended_ns_.load())) * 1e-9;
  return s;
}

Watchdog::~Watchdog() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void Watchdog::Enter(const char* op, const std::string* comm_name, int comm_size) {
  op_.store(op, std::memory_order_relaxed);
  comm_name_.store(comm_name, std::memory_order_relaxed);
  comm_size_.store(comm_size, std::memory_order_relaxed);
  seq_.fetch_add(1, std::memory_order_relaxed);
  started_ns_.store(NowNs(), std::memory_order_release);
}

void Watchdog::Exit() {
  ended_ns_.store(NowNs(), std::memory_order_relaxed);
  started_ns_.store(0, std::memory_order_release);
}

void Watchdog::Run() {
  // Poll at a tenth of the timeout (at most once a second, at least every 10 ms).
  const auto period = std::chrono::milliseconds(
      std::max<int64_t>(10, std::min<int64_t>(1000, static_cast<int64_t>(timeout_s_ * 100))));
  std::unique_lock<std::mutex> lock(mu_);
  while (!cv_.wait_for(lock, period, [this] { return stop_; })) {
    if (peers_ != nullptr) peers_->Serve(State());
    const int64_t started = started_ns_.load(std::memory_order_acquire);
    if (started == 0) continue;
    const double waited_s = (NowNs() - started) * 1e-9;
    if (waited_s < timeout_s_) continue;
    const std::string* name = comm_name_.load(std::memory_order_relaxed);
    std::ostringstream msg;
    msg << RankTag() << ": collective " << op_.load(std::memory_order_relaxed)
        << " on communicator '" << (name ? *name : "?") << "' (" << comm_size_.load()
        << " ranks) made no progress for " << waited_s << " s (watchdog timeout " << timeout_s_
        << " s).";
    if (peers_ != nullptr) {
      msg << " " << peers_->AskPeers(State(), std::min(10.0, std::max(1.0, timeout_s_ / 2)));
    } else {
      msg << " A peer rank has probably failed or is in a different collective.";
    }
    msg << " Aborting the job. Raise comm.watchdog_timeout_s (or --watchdog-timeout) if this "
           "step is legitimately slow.";
    on_timeout_(msg.str());
  }
}

}  // namespace moerun
