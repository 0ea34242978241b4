// Recoverable failures (config, data, checkpoint, I/O, command line) travel as a Status with
// a message a user can act on. Broken invariants use glog's CHECK instead and end the job.
#ifndef MOERUN_RUNTIME_STATUS_H_
#define MOERUN_RUNTIME_STATUS_H_

#include <glog/logging.h>

#include <optional>
#include <string>
#include <utility>

namespace moerun {

class Status {
 public:
  Status() = default;  // OK
  static Status Ok() { return Status(); }
  static Status Error(std::string message) { return Status(std::move(message)); }

  bool ok() const { return !message_.has_value(); }
  // The message; empty for OK.
  const std::string& message() const {
    static const std::string kEmpty;
    return message_ ? *message_ : kEmpty;
  }
  // Returns a copy whose message is "context: message" (OK stays OK).
  Status WithContext(const std::string& context) const {
    return ok() ? *this : Error(context + ": " + *message_);
  }

 private:
  explicit Status(std::string message) : message_(std::move(message)) {}
  std::optional<std::string> message_;
};

// A value or the Status that explains why there is none.
template <typename T>
class StatusOr {
 public:
  StatusOr(T value) : value_(std::move(value)) {}         // NOLINT: implicit by design
  StatusOr(Status status) : status_(std::move(status)) {  // NOLINT: implicit by design
    CHECK(!status_.ok()) << "StatusOr built from an OK status without a value";
  }
  bool ok() const { return status_.ok(); }
  const Status& status() const { return status_; }
  T& value() {
    CHECK(ok()) << status_.message();
    return *value_;
  }
  const T& value() const {
    CHECK(ok()) << status_.message();
    return *value_;
  }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }
  T& operator*() { return value(); }
  const T& operator*() const { return value(); }

 private:
  Status status_;
  std::optional<T> value_;
};

#define MOERUN_RETURN_IF_ERROR(expr)                 \
  do {                                               \
    ::moerun::Status moerun_status_ = (expr);        \
    if (!moerun_status_.ok()) return moerun_status_; \
  } while (0)

}  // namespace moerun

#endif  // MOERUN_RUNTIME_STATUS_H_
