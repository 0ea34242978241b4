// Backend-independent helpers over the Communicator interface.
#include "comm/communicator.h"

namespace moerun {

namespace {
class CompletedCollective final : public PendingCollective {
 public:
  bool Test() override { return true; }
  void Wait() override {}
};

// "rank R: ...", AgreeOnStatus's prefix.
bool NamesARank(const std::string& message) {
  const std::string prefix = "rank ";
  if (message.compare(0, prefix.size(), prefix) != 0) return false;
  size_t i = prefix.size();
  while (i < message.size() && message[i] >= '0' && message[i] <= '9') ++i;
  return i > prefix.size() && message.compare(i, 2, ": ") == 0;
}
}  // namespace

std::unique_ptr<PendingCollective> Communicator::StartAllToAllV(
    const void* send, const std::vector<int64_t>& send_counts,
    const std::vector<int64_t>& send_displs, void* recv, const std::vector<int64_t>& recv_counts,
    const std::vector<int64_t>& recv_displs, DType dtype) {
  AllToAllV(send, send_counts, send_displs, recv, recv_counts, recv_displs, dtype);
  return std::make_unique<CompletedCollective>();
}

std::vector<int64_t> PrefixDisplacements(const std::vector<int64_t>& counts) {
  std::vector<int64_t> displs(counts.size(), 0);
  for (size_t i = 1; i < counts.size(); ++i) displs[i] = displs[i - 1] + counts[i - 1];
  return displs;
}

Status AgreeOnStatus(Communicator& comm, const Status& local) {
  int32_t first_failed = local.ok() ? comm.size() : comm.rank();
  comm.AllReduce(&first_failed, 1, DType::kI32, ReduceOp::kMin);
  if (first_failed == comm.size()) return Status::Ok();
  std::string message = local.message();
  int64_t len = static_cast<int64_t>(message.size());
  comm.Broadcast(&len, 1, DType::kI64, first_failed);
  message.resize(len);
  comm.Broadcast(message.data(), len, DType::kU8, first_failed);
  // A status agreed before (a collective step inside another's) keeps the rank it names.
  if (comm.size() > 1 && !NamesARank(message)) {
    message = "rank " + std::to_string(first_failed) + ": " + message;
  }
  return Status::Error(message);
}

}  // namespace moerun
