// The Trainer's Mod-Squad path: multi-task Fashion-MNIST batches (data/multitask.h), the
// Mod-Squad model (model/modsquad.h), per-task statistics.
#include <algorithm>
#include <string>

#include "model/vit_spec.h"
#include "runtime/kernels.h"
#include "runtime/trainer.h"

namespace moerun {
namespace {

std::string TaskNames() {
  std::string names;
  for (const TaskSpec& t : FashionMnistTasks()) names += (names.empty() ? "" : ", ") + t.name;
  return names;
}

const char* KindName(TaskHeadConfig::Kind k) {
  switch (k) {
    case TaskHeadConfig::CLASSIFICATION:
      return "CLASSIFICATION";
    case TaskHeadConfig::SEGMENTATION:
      return "SEGMENTATION";
    default:
      return "REGRESSION";
  }
}

}  // namespace

Status Trainer::CreateModSquad() {
  const ModelConfig& m = config_.model();
  const ModSquadConfig& ms = m.modsquad();
  const TrainConfig& tc = config_.train();
  const Dataset& train = *train_;
  if (train.channels != 1 || train.height != train.width || train.num_classes != 10) {
    return Status::Error(
        "a Mod-Squad model trains on multi-task Fashion-MNIST, derived from "
        "1-channel square images with 10 classes; data.dataset " +
        config_.data().dataset() + " gives " + std::to_string(train.channels) + "x" +
        std::to_string(train.height) + "x" + std::to_string(train.width) + " with " +
        std::to_string(train.num_classes) + " classes");
  }
  if (m.channels() != train.channels || m.image_size() != train.height) {
    return Status::Error("the dataset's images are " + std::to_string(train.channels) + "x" +
                         std::to_string(train.height) + "x" + std::to_string(train.width) +
                         "; set model.channels and model.image_size to match");
  }
  // Every config task must be one of the data's, with the matching head.
  data_task_.clear();
  for (int i = 0; i < ms.tasks_size(); ++i) {
    const TaskHeadConfig& t = ms.tasks(i);
    const std::string at = "model.modsquad.tasks[" + std::to_string(i) + "]";
    const int dt = TaskIndex(t.name());
    if (dt < 0) {
      return Status::Error(at + ".name: unknown task '" + t.name() +
                           "'; the multi-task Fashion-MNIST tasks are " + TaskNames());
    }
    const TaskSpec& spec = FashionMnistTasks()[dt];
    const TaskHeadConfig::Kind want =
        spec.kind == TaskKind::kClassification ? TaskHeadConfig::CLASSIFICATION
        : spec.kind == TaskKind::kSegmentation ? TaskHeadConfig::SEGMENTATION
                                               : TaskHeadConfig::REGRESSION;
    const int outputs = spec.kind == TaskKind::kRegression ? 1 : spec.num_classes;
    if (t.kind() != want || t.outputs() != outputs) {
      return Status::Error(at + ": task '" + t.name() + "' is " + KindName(want) + " with " +
                           std::to_string(outputs) + " output(s); the config says " +
                           KindName(t.kind()) + " with " + std::to_string(t.outputs()));
    }
    data_task_.push_back(dt);
  }
  if (config_.data().augment()) {
    return Status::Error(
        "data.augment moves pixels but not the dense targets; turn it off for "
        "a Mod-Squad model");
  }
  if (local_batch_ % GroupStepImages(m) != 0) {
    return Status::Error("model.modsquad.group_images " + std::to_string(ms.group_images()) +
                         " does not divide a rank's " + std::to_string(local_batch_) +
                         " images (train.global_batch " + std::to_string(tc.global_batch()) +
                         " over " + std::to_string(world_->size()) +
                         " ranks); groups may not straddle task passes");
  }
  auto model = ModSquadModel::Create(m, world_, device_, device_world_);
  if (!model.ok()) return model.status();
  modsquad_ = std::move(*model);
  // The manifest records the placement of the largest expert count.
  const std::vector<int> counts = ExpertCounts(m);
  if (!counts.empty()) groups_ = modsquad_->groups(counts.back());
  modsquad_->Init(tc.seed());
  return Status::Ok();
}

const MultiTaskDataset& Trainer::MultiTask(const Dataset& base) {
  for (const auto& [source, data] : multitask_) {
    if (source == &base) return *data;
  }
  multitask_.emplace_back(&base, std::make_unique<MultiTaskDataset>(
                                     MakeMultiTaskDataset(base, config_.train().seed())));
  return *multitask_.back().second;
}

void Trainer::GatherTasks(const MultiTaskDataset& data, const std::vector<int64_t>& indices,
                          MultiTaskBatch* batch) {
  const int tasks = static_cast<int>(data_task_.size());
  const int64_t n = static_cast<int64_t>(indices.size()), pixels = data.pixels();
  task_labels_.resize(tasks);
  task_targets_.resize(tasks);
  batch->labels.assign(tasks, nullptr);
  batch->targets.assign(tasks, nullptr);
  for (int t = 0; t < tasks; ++t) {
    const int dt = data_task_[t];
    const TaskKind kind = FashionMnistTasks()[dt].kind;
    if (kind == TaskKind::kClassification) {
      task_labels_[t].resize(n);
      for (int64_t i = 0; i < n; ++i) task_labels_[t][i] = data.labels[dt][indices[i]];
      batch->labels[t] = task_labels_[t].data();
    } else if (kind == TaskKind::kSegmentation) {
      task_labels_[t].resize(n * pixels);
      for (int64_t i = 0; i < n; ++i) {
        std::copy_n(data.segmentation.begin() + indices[i] * pixels, pixels,
                    task_labels_[t].begin() + i * pixels);
      }
      batch->labels[t] = task_labels_[t].data();
    } else {
      task_targets_[t].resize(n * pixels);
      for (int64_t i = 0; i < n; ++i) {
        std::copy_n(data.edges.begin() + indices[i] * pixels, pixels,
                    task_targets_[t].begin() + i * pixels);
      }
      batch->targets[t] = task_targets_[t].data();
    }
  }
}

namespace {

std::vector<TaskStat> TaskStats(const ModelConfig& m, const MultiTaskOutput& out) {
  std::vector<TaskStat> v;
  for (int t = 0; t < m.modsquad().tasks_size(); ++t) {
    const TaskHeadConfig& h = m.modsquad().tasks(t);
    const char* metric = h.kind() == TaskHeadConfig::CLASSIFICATION ? "accuracy"
                         : h.kind() == TaskHeadConfig::SEGMENTATION ? "miou"
                                                                    : "l1";
    v.push_back({h.name(), metric, out.tasks[t].loss, out.tasks[t].metric});
  }
  return v;
}

// The first classification task's accuracy (0 when there is none).
double FirstAccuracy(const std::vector<TaskStat>& tasks) {
  for (const TaskStat& t : tasks) {
    if (t.metric == "accuracy") return t.value;
  }
  return 0;
}

}  // namespace

StepStats Trainer::MultiTaskStep() {
  const TrainConfig& tc = config_.train();
  const MultiTaskDataset& data = MultiTask(*train_);
  const int64_t b = local_batch_, numel = train_->image_numel();
  MultiTaskBatch batch;
  {
    ScopedTimer timer(&time_split_.data);
    images_.resize(b * numel);
    sampler_->RankSlice(step_, world_->rank(), world_->size(), &indices_);
    GatherBatch(data.base, indices_, images_.data(), nullptr);
    GatherTasks(data, indices_, &batch);
  }
  batch.images = images_.data();
  batch.batch = b;
  batch.counted = b;
  batch.global_counted = tc.global_batch();
  batch.training = true;
  MultiTaskOutput out;
  const StepTimeSplit moe_before = MoeTimes();
  {
    ScopedTimer timer(&time_split_.forward, device_);
    modsquad_->ZeroGrads();
    const Status s = modsquad_->Forward(batch, &out);
    CHECK(s.ok()) << s.message();  // shapes were validated in Create
  }
  {
    ScopedTimer timer(&time_split_.backward, device_);
    modsquad_->Backward();
  }
  AddMoeTimes(moe_before);
  StepStats st;
  {
    ScopedTimer timer(&time_split_.reduce, device_);
    modsquad_->ReduceGradients();
    st.grad_norm = GlobalGradNorm();
  }
  st.step = step_;
  st.learning_rate = LearningRate(optimizer_->config(), step_);
  st.loss = out.task_loss;
  st.aux_loss = out.aux_loss;
  st.tasks = TaskStats(config_.model(), out);
  st.accuracy = FirstAccuracy(st.tasks);
  if (!UpdateIfFinite(&st)) return st;
  for (MoeAttention* layer : modsquad_->moe_attention_layers()) {
    st.moe.push_back(layer->metrics());
    st.moe_losses.push_back(layer->losses());
  }
  for (MoeLayer* layer : modsquad_->moe_mlp_layers()) {
    st.moe.push_back(layer->metrics());
    st.moe_losses.push_back(layer->losses());
  }
  return st;
}

EvalStats Trainer::EvaluateMultiTask(const Dataset& base, int64_t global_batch,
                                     const RoutingOverride& routing) {
  const int p = world_->size();
  const ModelConfig& m = config_.model();
  const ModSquadConfig& ms = m.modsquad();
  const MultiTaskDataset& data = MultiTask(base);
  const int64_t b = EvalImagesPerRank(m, p, global_batch);
  // Inference routing overrides, restored afterwards.
  std::vector<MoeLayerConfig> saved_mlp;
  std::vector<MoeAttentionConfig> saved_attention;
  for (MoeLayer* layer : modsquad_->moe_mlp_layers()) {
    saved_mlp.push_back(layer->config());
    MoeLayerConfig& c = layer->mutable_config();
    if (routing.capacity_factor >= 0) c.capacity_factor = routing.capacity_factor;
    if (routing.exact_capacity) c.multiple_of = 0;
    if (routing.bpr >= 0) c.bpr = routing.bpr == 1;
  }
  for (MoeAttention* layer : modsquad_->moe_attention_layers()) {
    saved_attention.push_back(layer->config());
    CapacityRule& c = layer->mutable_config().capacity;
    if (routing.capacity_factor >= 0) c.capacity_factor = routing.capacity_factor;
    if (routing.exact_capacity) c.multiple_of = 0;
    if (routing.bpr >= 0) c.bpr = routing.bpr == 1;
  }
  std::vector<float> images(b * base.image_numel());
  std::vector<std::vector<double>> sums;
  std::vector<double> dropped;
  int64_t batches = 0;
  for (int64_t begin = 0; begin < base.size; begin += b * p) {
    const int64_t count = std::min<int64_t>(b * p, base.size - begin);
    std::vector<int64_t> idx = EvalSlice(base.size, begin, count, world_->rank(), p);
    const int64_t real = static_cast<int64_t>(idx.size());
    idx.resize(b, 0);  // padding: not counted
    GatherBatch(data.base, idx, images.data(), nullptr);
    MultiTaskBatch batch;
    GatherTasks(data, idx, &batch);
    batch.images = images.data();
    batch.batch = b;
    batch.counted = real;
    batch.global_counted = count;
    batch.training = false;
    MultiTaskOutput out;
    const Status s = modsquad_->Forward(batch, &out);
    CHECK(s.ok()) << s.message();
    ResolveDeviceTimers();  // the heads' outputs came to the host: the device work is done
    sums.resize(out.tasks.size());
    for (size_t t = 0; t < out.tasks.size(); ++t) {
      sums[t].resize(out.tasks[t].sums.size(), 0.0);
      for (size_t j = 0; j < sums[t].size(); ++j) sums[t][j] += out.tasks[t].sums[j];
    }
    std::vector<const MoeMetrics*> metrics;
    for (MoeAttention* layer : modsquad_->moe_attention_layers())
      metrics.push_back(&layer->metrics());
    for (MoeLayer* layer : modsquad_->moe_mlp_layers()) metrics.push_back(&layer->metrics());
    for (const MoeMetrics* mm : metrics) {
      const auto& f = mm->dropped_fraction;
      dropped.resize(std::max(dropped.size(), f.size()), 0.0);
      for (size_t j = 0; j < f.size(); ++j) dropped[j] += f[j] / metrics.size();
    }
    ++batches;
  }
  auto mlp = modsquad_->moe_mlp_layers();
  for (size_t i = 0; i < mlp.size(); ++i) mlp[i]->mutable_config() = saved_mlp[i];
  auto attention = modsquad_->moe_attention_layers();
  for (size_t i = 0; i < attention.size(); ++i) attention[i]->mutable_config() = saved_attention[i];
  // The sums are global already (the model all-reduces them per batch).
  MultiTaskOutput merged;
  merged.tasks.resize(sums.size());
  for (size_t t = 0; t < sums.size(); ++t) {
    TaskResult& r = merged.tasks[t];
    r.sums = sums[t];
    const double n = r.sums[r.sums.size() - 1];
    r.loss = n > 0 ? r.sums[r.sums.size() - 2] / n : 0;
    r.metric = TaskMetric(ms.tasks(static_cast<int>(t)), r.sums);
  }
  EvalStats e;
  e.tasks = TaskStats(m, merged);
  e.examples = base.size;
  e.accuracy = FirstAccuracy(e.tasks);
  for (const TaskStat& t : e.tasks) e.loss += t.loss;
  for (double& d : dropped) d /= std::max<int64_t>(1, batches);
  e.dropped_fraction = dropped;
  return e;
}

}  // namespace moerun
