// A Backend wrapper for tests on the host stand-in (runtime/backend.h's
// NewHostStandInBackend): counts the calls that touch memory, so device code that reached
// device memory with memcpy (which works on the stand-in's host memory but not on a GPU)
// fails its test, and simulates what a GPU's driver and clock would report.
#ifndef MOERUN_TESTS_COUNTING_BACKEND_H_
#define MOERUN_TESTS_COUNTING_BACKEND_H_

#include <glog/logging.h>

#include <chrono>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "runtime/backend.h"

namespace moerun {

class CountingBackend : public Backend {
 public:
  explicit CountingBackend(Backend* inner) : inner_(inner) {}
  Device device() const override { return inner_->device(); }
  std::string Describe() const override { return inner_->Describe(); }
  void* Allocate(size_t bytes) override {
    if (log != nullptr) log->push_back("allocate");
    return inner_->Allocate(bytes);
  }
  void Free(void* p, size_t bytes) override { inner_->Free(p, bytes); }
  void SetZero(void* p, size_t bytes) override {
    ++zeros;
    inner_->SetZero(p, bytes);
  }
  void CopyFromHost(void* d, const void* s, size_t bytes) override {
    ++from_host;
    from_host_bytes += static_cast<int64_t>(bytes);
    inner_->CopyFromHost(d, s, bytes);
  }
  void CopyToHost(void* d, const void* s, size_t bytes) override {
    ++to_host;
    to_host_bytes += static_cast<int64_t>(bytes);
    inner_->CopyToHost(d, s, bytes);
  }
  void CopyWithin(void* d, const void* s, size_t bytes) override {
    ++within;
    inner_->CopyWithin(d, s, bytes);
  }
  // Copies through staging (no host wait on a GPU), counted apart from the blocking ones.
  void* AllocateStagingHost(size_t bytes) override { return inner_->AllocateStagingHost(bytes); }
  void FreeStagingHost(void* p) override { inner_->FreeStagingHost(p); }
  void* CopyFromStagingAsync(void* d, const void* s, size_t bytes) override {
    ++from_staging;
    from_host_bytes += static_cast<int64_t>(bytes);
    return inner_->CopyFromStagingAsync(d, s, bytes);
  }
  // A copy to the host returns an event of its own (the stand-in's are done at once), so
  // that the host's wait for it runs on_wait_to_host.
  void* CopyToStagingAsync(void* d, const void* s, size_t bytes) override {
    ++to_staging;
    to_host_bytes += static_cast<int64_t>(bytes);
    CHECK(inner_->CopyToStagingAsync(d, s, bytes) == nullptr);
    return &kToHostEvent;
  }
  void WaitForCopy(void* event) override {
    if (event != &kToHostEvent) {
      inner_->WaitForCopy(event);
      return;
    }
    if (on_wait_to_host) on_wait_to_host();
  }
  static inline char kToHostEvent = 0;
  std::function<void()> on_wait_to_host;
  // Sleeps sync_ms first: the time a GPU's queued work would take to finish.
  void Synchronize() override {
    ++syncs;
    if (sync_ms > 0) std::this_thread::sleep_for(std::chrono::milliseconds(sync_ms));
    inner_->Synchronize();
  }
  void* stream() const override { return inner_->stream(); }
  size_t allocated_bytes() const override { return inner_->allocated_bytes(); }
  size_t peak_allocated_bytes() const override { return inner_->peak_allocated_bytes(); }
  DeviceMemory Memory() const override {
    if (log != nullptr) log->push_back("memory");
    return memory;
  }
  // With `events`, timing events carry the simulated device clock `clock_s` when recorded.
  void* RecordTimingEvent() override {
    if (!events) return nullptr;
    ++recorded;
    return new double(clock_s);
  }
  double ElapsedSecondsAndRelease(void* start, void* stop) override {
    ++timed;
    const double s = *static_cast<double*>(stop) - *static_cast<double*>(start);
    delete static_cast<double*>(start);
    delete static_cast<double*>(stop);
    return s;
  }
  int zeros = 0, from_host = 0, to_host = 0, within = 0, syncs = 0, sync_ms = 0;
  int from_staging = 0, to_staging = 0;
  int64_t from_host_bytes = 0, to_host_bytes = 0;
  DeviceMemory memory;  // what the "driver" reports
  bool events = false;
  double clock_s = 0;
  int recorded = 0, timed = 0;
  std::vector<std::string>* log = nullptr;  // "memory" and "allocate", in order

 private:
  Backend* inner_;
};

}  // namespace moerun

#endif  // MOERUN_TESTS_COUNTING_BACKEND_H_
