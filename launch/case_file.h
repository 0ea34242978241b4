// Reading replay case files (safetensors with string metadata) and assembling results
// over ranks: shared by replay-moe and replay-modsquad.
#ifndef MOERUN_LAUNCH_CASE_FILE_H_
#define MOERUN_LAUNCH_CASE_FILE_H_

#include <cmath>
#include <cstdlib>
#include <map>
#include <string>

#include "comm/communicator.h"
#include "runtime/status.h"
#include "runtime/tensor.h"

namespace moerun {

// Strict parsing of the case's string metadata.
class Metadata {
 public:
  explicit Metadata(const std::map<std::string, std::string>& m) : m_(m) {}
  bool Has(const std::string& key) const { return m_.count(key) > 0; }
  Status Int(const std::string& key, int64_t fallback, int64_t* out) const {
    auto it = m_.find(key);
    if (it == m_.end()) {
      *out = fallback;
      return Status::Ok();
    }
    char* end = nullptr;
    const long long v = std::strtoll(it->second.c_str(), &end, 10);
    if (it->second.empty() || *end != '\0') {
      return Status::Error("metadata '" + key + "' = '" + it->second + "' is not an integer");
    }
    *out = v;
    return Status::Ok();
  }
  Status Double(const std::string& key, double fallback, double* out) const {
    auto it = m_.find(key);
    if (it == m_.end()) {
      *out = fallback;
      return Status::Ok();
    }
    char* end = nullptr;
    const double v = std::strtod(it->second.c_str(), &end);
    if (it->second.empty() || *end != '\0' || !std::isfinite(v)) {
      return Status::Error("metadata '" + key + "' = '" + it->second + "' is not a finite number");
    }
    *out = v;
    return Status::Ok();
  }
  Status Bool(const std::string& key, bool fallback, bool* out) const {
    auto it = m_.find(key);
    if (it == m_.end()) {
      *out = fallback;
      return Status::Ok();
    }
    const std::string& v = it->second;
    if (v == "1" || v == "true" || v == "True") {
      *out = true;
    } else if (v == "0" || v == "false" || v == "False") {
      *out = false;
    } else {
      return Status::Error("metadata '" + key + "' = '" + v + "' is not 1/0/true/false");
    }
    return Status::Ok();
  }
  std::string Str(const std::string& key, const std::string& fallback) const {
    auto it = m_.find(key);
    return it == m_.end() ? fallback : it->second;
  }

 private:
  const std::map<std::string, std::string>& m_;
};

// Rows [first, first + rows) of a [T, ...] tensor, as a contiguous copy.
inline Tensor Rows(const Tensor& t, int64_t first, int64_t rows) {
  return t.Slice(0, first, first + rows).Contiguous();
}

// Every rank's equal-size local rows, concatenated in rank order.
inline Tensor GatherRows(Communicator& comm, const Tensor& local) {
  Shape shape = local.shape();
  shape[0] *= comm.size();
  Tensor all = Tensor::Empty(shape, local.dtype());
  comm.AllGather(local.raw_data(), local.numel(), all.raw_data(), local.dtype());
  return all;
}

inline Tensor Scalar(double v) {
  Tensor t = Tensor::Empty({});
  t.data<float>()[0] = static_cast<float>(v);
  return t;
}

}  // namespace moerun

#endif  // MOERUN_LAUNCH_CASE_FILE_H_
