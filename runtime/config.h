// Loading and validating configs (Protobuf text format). Every error names where the bad
// value came from: "file:line:column: field: problem", or the --override that set it.
#ifndef MOERUN_RUNTIME_CONFIG_H_
#define MOERUN_RUNTIME_CONFIG_H_

#include <string>
#include <vector>

#include "runtime/config.pb.h"
#include "runtime/status.h"

namespace moerun {

// Parses `path`, then applies each override "dotted.field.path=value" in order (e.g.
// "train.steps=20", "model.moe.bpr=false", "data.dataset=synthetic"), then validates.
StatusOr<Config> LoadConfig(const std::string& path, const std::vector<std::string>& overrides);
// The same from text already in memory; `source_name` stands for the file in messages.
StatusOr<Config> ParseConfig(const std::string& text, const std::string& source_name,
                             const std::vector<std::string>& overrides);

}  // namespace moerun

#endif  // MOERUN_RUNTIME_CONFIG_H_
