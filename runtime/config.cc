// Config parsing (text format with line-accurate errors), overrides and validation.
#include "runtime/config.h"

#include <google/protobuf/io/tokenizer.h>
#include <google/protobuf/text_format.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>

namespace moerun {
namespace {

namespace pb = google::protobuf;

class CollectErrors : public pb::io::ErrorCollector {
 public:
  explicit CollectErrors(std::string source) : source_(std::move(source)) {}
  void AddError(int line, pb::io::ColumnNumber column, const std::string& message) override {
    errors_ << source_ << ":" << line + 1 << ":" << column + 1 << ": " << message << "\n";
  }
  void AddWarning(int line, pb::io::ColumnNumber column, const std::string& message) override {
    AddError(line, column, message);
  }
  std::string text() const { return errors_.str(); }

 private:
  std::string source_;
  std::ostringstream errors_;
};

// Where each set field's value came from, by dotted path ("model.moe.k").
using Origins = std::map<std::string, std::string>;

void RecordOrigins(const pb::Message& msg, const pb::TextFormat::ParseInfoTree& tree,
                   const std::string& prefix, const std::string& source, Origins* origins) {
  std::vector<const pb::FieldDescriptor*> fields;
  msg.GetReflection()->ListFields(msg, &fields);
  for (const pb::FieldDescriptor* f : fields) {
    const std::string path = prefix.empty() ? f->name() : prefix + "." + f->name();
    const pb::TextFormat::ParseLocation loc = tree.GetLocation(f, f->is_repeated() ? 0 : -1);
    if (loc.line >= 0) {
      (*origins)[path] =
          source + ":" + std::to_string(loc.line + 1) + ":" + std::to_string(loc.column + 1);
    }
    if (f->cpp_type() == pb::FieldDescriptor::CPPTYPE_MESSAGE && !f->is_repeated()) {
      const pb::TextFormat::ParseInfoTree* nested = tree.GetTreeForNested(f, -1);
      if (nested != nullptr) {
        RecordOrigins(msg.GetReflection()->GetMessage(msg, f), *nested, path, source, origins);
      }
    }
  }
}

std::string FieldNames(const pb::Descriptor* d) {
  std::string s;
  for (int i = 0; i < d->field_count(); ++i) s += (i ? ", " : "") + d->field(i)->name();
  return s;
}

// "model.moe.k=4" -> "model { moe { k: 4 } }", checking each name against the schema.
Status OverrideToText(const std::string& override_text, std::string* text, std::string* path) {
  const size_t eq = override_text.find('=');
  if (eq == std::string::npos || eq == 0) {
    return Status::Error("--override '" + override_text +
                         "': expected key=value, e.g. train.steps=100");
  }
  *path = override_text.substr(0, eq);
  std::string value = override_text.substr(eq + 1);
  std::vector<std::string> parts;
  std::stringstream ss(*path);
  for (std::string p; std::getline(ss, p, '.');) parts.push_back(p);
  const pb::Descriptor* d = Config::descriptor();
  std::string open, close, walked;
  for (size_t i = 0; i < parts.size(); ++i) {
    const pb::FieldDescriptor* f = d->FindFieldByName(parts[i]);
    if (f == nullptr) {
      return Status::Error("--override '" + override_text +
                           "': " + (walked.empty() ? std::string("the config") : walked) +
                           " has no field '" + parts[i] + "'; its fields are: " + FieldNames(d));
    }
    walked += (walked.empty() ? "" : ".") + parts[i];
    const bool last = i + 1 == parts.size();
    if (f->cpp_type() == pb::FieldDescriptor::CPPTYPE_MESSAGE) {
      if (last) {
        return Status::Error(
            "--override '" + override_text + "': " + walked +
            " is a section; name one of its fields: " + FieldNames(f->message_type()));
      }
      open += parts[i] + " { ";
      close += " }";
      d = f->message_type();
    } else {
      if (!last) {
        return Status::Error("--override '" + override_text + "': " + walked + " is not a section");
      }
      if (f->is_repeated()) {
        return Status::Error("--override '" + override_text + "': " + walked +
                             " is a list; set it in the config file");
      }
      // The value is one value of that field, never more text format.
      if (f->cpp_type() == pb::FieldDescriptor::CPPTYPE_STRING) {
        if (value.size() >= 2 && value.front() == '"' && value.back() == '"') {
          value = value.substr(1, value.size() - 2);
        }
        std::string quoted = "\"";
        for (char ch : value) {
          if (ch == '\\' || ch == '"') quoted += '\\';
          quoted += ch == '\n' ? std::string("\\n") : std::string(1, ch);
        }
        value = quoted + "\"";
      } else {
        const bool one_token =
            !value.empty() && value.find_first_not_of(
                                  "abcdefghijklmnopqrstuvwxyz"
                                  "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.+-") == std::string::npos;
        if (!one_token) {
          return Status::Error("--override '" + override_text + "': '" + value +
                               "' is not one value for " + walked);
        }
      }
      *text = open + parts[i] + ": " + value + close;
    }
  }
  return Status::Ok();
}

class Validator {
 public:
  explicit Validator(const Origins& origins) : origins_(origins) {}
  void Require(bool ok, const std::string& path, const std::string& problem) {
    if (ok) return;
    auto it = origins_.find(path);
    const std::string where = it != origins_.end() ? it->second : "(default value)";
    errors_ += where + ": " + path + ": " + problem + "\n";
  }
  Status status() const {
    return errors_.empty() ? Status::Ok() : Status::Error(errors_.substr(0, errors_.size() - 1));
  }

 private:
  const Origins& origins_;
  std::string errors_;
};

std::string Str(double v) {
  std::ostringstream s;
  s << v;
  return s.str();
}

void ValidateModSquad(const ModelConfig& m, Validator* v) {
  const ModSquadConfig& ms = m.modsquad();
  v->Require(!m.has_moe(), "model.moe",
             "a Mod-Squad model (model.modsquad) routes with its own settings; remove model.moe");
  v->Require(ms.tasks_size() >= 1, "model.modsquad.tasks", "needs at least one task");
  std::set<std::string> names;
  for (int i = 0; i < ms.tasks_size(); ++i) {
    const TaskHeadConfig& t = ms.tasks(i);
    const std::string at = "model.modsquad.tasks[" + std::to_string(i) + "]";
    v->Require(!t.name().empty(), at + ".name", "must be set");
    v->Require(names.insert(t.name()).second, at + ".name", "'" + t.name() + "' appears twice");
    v->Require(t.outputs() >= 1 && t.outputs() <= (1 << 20), at + ".outputs",
               "must be between 1 and 2^20 (classes, or channels per pixel)");
    v->Require(t.kind() != TaskHeadConfig::SEGMENTATION || t.outputs() >= 2, at + ".outputs",
               "a segmentation task needs at least 2 classes");
  }
  v->Require(ms.head_dim() >= 1 && ms.head_dim() <= (1 << 14), "model.modsquad.head_dim",
             "must be between 1 and 16384");
  v->Require(ms.attention_experts() >= 1 && ms.attention_experts() <= (1 << 16),
             "model.modsquad.attention_experts", "must be between 1 and 65536");
  v->Require(ms.attention_k() >= 1 && ms.attention_k() <= ms.attention_experts(),
             "model.modsquad.attention_k",
             Str(ms.attention_k()) + " must be between 1 and attention_experts (" +
                 Str(ms.attention_experts()) + ")");
  v->Require(ms.mlp_experts() >= 1 && ms.mlp_experts() <= (1 << 16), "model.modsquad.mlp_experts",
             "must be between 1 and 65536");
  v->Require(
      ms.mlp_k() >= 1 && ms.mlp_k() <= ms.mlp_experts(), "model.modsquad.mlp_k",
      Str(ms.mlp_k()) + " must be between 1 and mlp_experts (" + Str(ms.mlp_experts()) + ")");
  v->Require(ms.expert_hidden() > 0 || m.mlp_dim() / std::max(1, ms.mlp_k()) > 0,
             "model.modsquad.expert_hidden", "must be positive (0: mlp_dim / mlp_k)");
  v->Require(ms.expert_hidden() >= 0 && ms.expert_hidden() <= (1 << 20),
             "model.modsquad.expert_hidden", "must be between 0 and 2^20");
  v->Require(ms.capacity_factor() >= 0, "model.modsquad.capacity_factor",
             "must be >= 0 (0: dropless)");
  v->Require(ms.group_images() >= 0, "model.modsquad.group_images",
             "must be >= 0 (0: a rank's whole micro-batch of one task pass)");
  v->Require(ms.multiple_of() >= 0, "model.modsquad.multiple_of", "must be >= 0 (0: no rounding)");
  v->Require(ms.mi_weight() >= 0, "model.modsquad.mi_weight", "must be >= 0");
  v->Require(ms.layer_experts_size() == 0 || ms.layer_experts_size() == m.num_layers(),
             "model.modsquad.layer_experts",
             "gives " + Str(ms.layer_experts_size()) + " counts; give one per block (" +
                 Str(m.num_layers()) + ") or none");
  for (int b = 0; b < ms.layer_experts_size(); ++b) {
    const int k = b % 2 == 0 ? ms.attention_k() : ms.mlp_k();
    v->Require(
        ms.layer_experts(b) >= k && ms.layer_experts(b) <= (1 << 16),
        "model.modsquad.layer_experts[" + Str(b) + "]",
        Str(ms.layer_experts(b)) + " must be between the layer's k (" + Str(k) + ") and 65536");
  }
}

void ValidateModel(const ModelConfig& m, Validator* v) {
  v->Require(m.image_size() > 0, "model.image_size", "must be positive");
  v->Require(m.channels() > 0, "model.channels", "must be positive");
  v->Require(
      m.patch_size() > 0 && m.image_size() % std::max(1, m.patch_size()) == 0, "model.patch_size",
      Str(m.patch_size()) + " must be positive and divide image_size " + Str(m.image_size()));
  v->Require(m.num_layers() > 0, "model.num_layers", "must be positive");
  v->Require(
      m.num_heads() > 0 && m.hidden_size() > 0 && m.hidden_size() % std::max(1, m.num_heads()) == 0,
      "model.num_heads",
      Str(m.num_heads()) + " must be positive and divide hidden_size " + Str(m.hidden_size()));
  v->Require(m.mlp_dim() > 0, "model.mlp_dim", "must be positive");
  v->Require(m.num_classes() > 0, "model.num_classes", "must be positive");
  v->Require(m.pre_logits_size() >= 0, "model.pre_logits_size", "must be >= 0 (0: none)");
  // Sizes whose products must fit the 64-bit arithmetic of plans and allocations.
  const struct {
    const char* path;
    int64_t value, limit;
  } bounds[] = {{"model.image_size", m.image_size(), 1 << 16},
                {"model.channels", m.channels(), 1 << 12},
                {"model.hidden_size", m.hidden_size(), 1 << 18},
                {"model.mlp_dim", m.mlp_dim(), 1 << 20},
                {"model.num_layers", m.num_layers(), 1 << 12},
                {"model.num_heads", m.num_heads(), 1 << 12},
                {"model.num_classes", m.num_classes(), 1 << 24},
                {"model.pre_logits_size", m.pre_logits_size(), 1 << 18},
                {"model.moe.num_experts", m.has_moe() ? m.moe().num_experts() : 1, 1 << 16}};
  for (const auto& b : bounds) {
    v->Require(b.value <= b.limit, b.path,
               std::to_string(b.value) + " is larger than moerun supports (" +
                   std::to_string(b.limit) + ")");
  }
  if (m.has_modsquad()) {
    ValidateModSquad(m, v);
    return;
  }
  if (!m.has_moe()) return;
  const MoeConfig& e = m.moe();
  v->Require(e.num_experts() >= 1, "model.moe.num_experts", "must be at least 1");
  v->Require(e.k() >= 1 && e.k() <= e.num_experts(), "model.moe.k",
             Str(e.k()) + " must be between 1 and num_experts (" + Str(e.num_experts()) + ")");
  const int odd_blocks = m.num_layers() / 2;
  if (e.placement() == MoeConfig::EVERY) {
    v->Require(
        e.every_n() >= 1 && e.every_n() <= m.num_layers(), "model.moe.every_n",
        Str(e.every_n()) + " must be between 1 and num_layers (" + Str(m.num_layers()) + ")");
  } else {
    v->Require(e.last_n() >= 1 && e.last_n() <= odd_blocks, "model.moe.last_n",
               Str(e.last_n()) + " must be between 1 and the number of odd blocks (" +
                   Str(odd_blocks) + ")");
  }
  v->Require(e.capacity_factor() >= 0 && std::isfinite(e.capacity_factor()),
             "model.moe.capacity_factor", "must be >= 0 (0: dropless)");
  v->Require(e.capacity() >= 0, "model.moe.capacity", "must be >= 0 (0: from capacity_factor)");
  v->Require(!(e.capacity() > 0 && e.has_capacity_factor()), "model.moe.capacity",
             "give either capacity or capacity_factor, not both");
  v->Require(e.multiple_of() >= 0, "model.moe.multiple_of", "must be >= 0 (0: no rounding)");
  v->Require(e.group_size() >= 0, "model.moe.group_size",
             "must be >= 0 (0: group_images images' tokens)");
  v->Require(e.group_images() >= 0, "model.moe.group_images",
             "must be >= 0 (0 with group_size 0: a rank's whole micro-batch)");
  v->Require(e.noise_std() >= 0, "model.moe.noise_std", "must be >= 0");
  v->Require(e.overlap_stages() >= 1, "model.moe.overlap_stages",
             "must be >= 1 (the overlapped dispatch's transfers; 1: one all-to-all)");
  for (const char* w : {"importance_weight", "load_weight", "gshard_weight", "z_loss_weight"}) {
    const pb::FieldDescriptor* f = MoeConfig::descriptor()->FindFieldByName(w);
    const double x = e.GetReflection()->GetDouble(e, f);
    v->Require(std::isfinite(x), std::string("model.moe.") + w, "must be a finite number");
  }
}

// Every float or double field that is set must be a finite number (the per-field checks
// below use comparisons that NaN would pass or fail by accident).
void RequireFinite(const pb::Message& m, const std::string& prefix, Validator* v) {
  const pb::Reflection* r = m.GetReflection();
  std::vector<const pb::FieldDescriptor*> fields;
  r->ListFields(m, &fields);
  for (const pb::FieldDescriptor* f : fields) {
    const std::string path = prefix.empty() ? f->name() : prefix + "." + f->name();
    if (f->is_repeated()) continue;
    if (f->cpp_type() == pb::FieldDescriptor::CPPTYPE_MESSAGE) {
      RequireFinite(r->GetMessage(m, f), path, v);
    } else if (f->cpp_type() == pb::FieldDescriptor::CPPTYPE_DOUBLE) {
      v->Require(std::isfinite(r->GetDouble(m, f)), path, "must be a finite number");
    } else if (f->cpp_type() == pb::FieldDescriptor::CPPTYPE_FLOAT) {
      v->Require(std::isfinite(r->GetFloat(m, f)), path, "must be a finite number");
    }
  }
}

Status Validate(const Config& c, const Origins& origins) {
  Validator v(origins);
  RequireFinite(c, "", &v);
  ValidateModel(c.model(), &v);
  const std::string& ds = c.data().dataset();
  v.Require(ds == "fashion_mnist" || ds == "synthetic", "data.dataset",
            "'" + ds + "' is not a dataset; use fashion_mnist or synthetic");
  const TrainConfig& t = c.train();
  v.Require(t.global_batch() > 0, "train.global_batch", "must be positive");
  v.Require(t.steps() > 0, "train.steps", "must be positive");
  v.Require(t.learning_rate() > 0 && std::isfinite(t.learning_rate()), "train.learning_rate",
            "must be positive");
  v.Require(t.warmup_steps() >= 0, "train.warmup_steps", "must be >= 0");
  v.Require(t.schedule() == "cosine" || t.schedule() == "linear", "train.schedule",
            "'" + t.schedule() + "' is not a schedule; use cosine or linear");
  v.Require(t.weight_decay() >= 0, "train.weight_decay", "must be >= 0");
  v.Require(t.clip_grad_norm() >= 0, "train.clip_grad_norm", "must be >= 0 (0: no clipping)");
  v.Require(t.eval_every() >= 0, "train.eval_every", "must be >= 0 (0: only at the end)");
  v.Require(t.log_every() > 0, "train.log_every", "must be positive");
  v.Require(t.eval_batch() > 0, "train.eval_batch", "must be positive");
  v.Require(c.data().synthetic_train_size() > 0 && c.data().synthetic_test_size() > 0,
            "data.synthetic_train_size", "synthetic set sizes must be positive");
  v.Require(t.checkpoint_every() >= 0, "train.checkpoint_every",
            "must be >= 0 (0: only at the end)");
  v.Require(t.checkpoint_every_minutes() >= 0 && std::isfinite(t.checkpoint_every_minutes()),
            "train.checkpoint_every_minutes", "must be >= 0 (0: no time-based saves)");
  v.Require(t.keep_checkpoints() >= 0, "train.keep_checkpoints", "must be >= 0 (0: keep all)");
  v.Require(!t.resume().empty(), "train.resume", "must be auto, never or a checkpoint directory");
  v.Require(t.on_checkpoint_error() == "stop" || t.on_checkpoint_error() == "continue",
            "train.on_checkpoint_error",
            "'" + t.on_checkpoint_error() + "' is not a choice; use stop or continue");
  v.Require(c.comm().watchdog_timeout_s() >= 0, "comm.watchdog_timeout_s",
            "must be >= 0 (0: no watchdog)");
  return v.status();
}

}  // namespace

StatusOr<Config> ParseConfig(const std::string& text, const std::string& source_name,
                             const std::vector<std::string>& overrides) {
  Config config;
  Origins origins;
  {
    CollectErrors errors(source_name);
    pb::TextFormat::Parser parser;
    pb::TextFormat::ParseInfoTree tree;
    parser.RecordErrorsTo(&errors);
    parser.WriteLocationsTo(&tree);
    if (!parser.ParseFromString(text, &config)) {
      std::string e = errors.text();
      if (!e.empty() && e.back() == '\n') e.pop_back();
      return Status::Error("bad config:\n" + e);
    }
    RecordOrigins(config, tree, "", source_name, &origins);
  }
  for (const std::string& o : overrides) {
    std::string text_form, path;
    MOERUN_RETURN_IF_ERROR(OverrideToText(o, &text_form, &path));
    CollectErrors errors("--override '" + o + "'");
    pb::TextFormat::Parser parser;
    parser.RecordErrorsTo(&errors);
    if (!parser.MergeFromString(text_form, &config)) {
      std::string e = errors.text();
      if (!e.empty() && e.back() == '\n') e.pop_back();
      return Status::Error("bad override: " + e);
    }
    origins[path] = "--override '" + o + "'";
  }
  Status s = Validate(config, origins);
  if (!s.ok()) return Status::Error("invalid config:\n" + s.message());
  return config;
}

StatusOr<Config> LoadConfig(const std::string& path, const std::vector<std::string>& overrides) {
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec)) {
    return Status::Error("config '" + path +
                         "' is a directory; give a config file "
                         "(configs/*.pbtxt)");
  }
  std::ifstream in(path);
  if (!in) {
    return Status::Error("cannot read config '" + path +
                         "': no such file or not readable (configs live in configs/*.pbtxt)");
  }
  std::stringstream buffer;
  buffer << in.rdbuf();
  StatusOr<Config> config = ParseConfig(buffer.str(), path, overrides);
  if (config.ok() && !config->has_model()) {
    return Status::Error("config '" + path + "' has no model { ... } section" +
                         (buffer.str().find_first_not_of(" \t\r\n") == std::string::npos
                              ? " (the file is empty)"
                              : "") +
                         "; every config names its model (see configs/*.pbtxt)");
  }
  return config;
}

}  // namespace moerun
