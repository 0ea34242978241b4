// The training step and evaluation.
#include "runtime/trainer.h"

#include <google/protobuf/text_format.h>
#include <google/protobuf/util/message_differencer.h>

#include <cmath>
#include <fstream>
#include <iomanip>
#include <numeric>
#include <set>
#include <sstream>

#include "model/ops.h"
#include "model/vit_spec.h"
#include "runtime/backend.h"
#include "runtime/kernels.h"
#include "runtime/process.h"

namespace moerun {

Status CheckMemory(const Config& config, int ranks, int64_t micro_batch, Device device,
                   int64_t eval_images) {
  // On a device, the evaluation step's activations where they are the larger.
  const bool eval_larger = device != Device::kCPU && eval_images > micro_batch;
  const int64_t images = eval_larger ? eval_images : micro_batch;
  const TrainingFootprint f =
      EstimateFootprint(config.model(), ranks, images, false,
                        config.train().optimizer_moments() == TrainConfig::BF16);
  const std::string plan =
      GiBString(f.bytes_per_rank) + " per rank (weights " + GiBString(f.param_bytes) +
      ", gradients " + GiBString(f.grad_bytes) + ", AdamW moments " + GiBString(f.optimizer_bytes) +
      ", activations " + GiBString(f.activation_bytes) +
      (eval_larger
           ? ", evaluation step " + std::to_string(eval_images) +
                 " images per rank (train.eval_batch), micro-batch " + std::to_string(micro_batch)
           : ", micro-batch " + std::to_string(micro_batch)) +
      ")";
  SetMemoryPlan(plan);
  const int local = std::max(1, Process().local_size);
  const std::string advice =
      std::string("use more ranks (on more hosts), a smaller train.global_batch, ") +
      (eval_larger ? "a smaller train.eval_batch, " : "") +
      (config.train().optimizer_moments() == TrainConfig::BF16
           ? ""
           : "train.optimizer_moments: BF16 (half the moments' bytes), ") +
      "or a smaller model (`moerun plan` prints the figures)";
  if (device == Device::kCPU) {
    const double need = static_cast<double>(f.bytes_per_rank) * local;
    const int64_t available = AvailableHostBytes();
    if (available < 0 || need <= static_cast<double>(available)) return Status::Ok();
    return Status::Error("the plan needs " + plan + " x " + std::to_string(local) +
                         " rank(s) on this host = " + GiBString(need) + ", but the host has " +
                         GiBString(static_cast<double>(available)) + " available; " + advice);
  }
  // The weights, gradients, moments and activations live on the GPU; the host keeps only
  // the data and the routing's small tables. Local rank r binds GPU r % devices: with
  // several GPUs visible and more local ranks than GPUs, ranks share one and count
  // together. With one GPU visible, a launcher that shows each rank its own
  // (CUDA_VISIBLE_DEVICES) looks the same from here as ranks sharing it: each is checked
  // alone. Free is the driver's plus what this process's pool holds for reuse. The plan
  // leaves out cuBLAS's workspaces and Thrust's temporaries (see dry-run's device figures).
  const Backend* backend = BackendFor(device);
  const DeviceMemory mem = backend != nullptr ? backend->Memory() : DeviceMemory{};
  if (mem.free_bytes < 0) return Status::Ok();
  const int devices = device == Device::kCUDA ? CudaDeviceCount() : 0;
  int sharing = 1;
  if (devices > 1) {
    const int mine = Process().local_rank % devices;
    sharing = std::max(1, local / devices + (mine < local % devices ? 1 : 0));
  }
  // The composed attention's backward scratch on a device (model/ops.h: up to 256 MiB, a
  // temporary of each call): the self-attention's, and Mod-Squad's per-choice attention's,
  // whose sequences are an image's for each task.
  const ModelConfig& model = config.model();
  const int64_t n = TokensPerImage(model);
  // (The training step's: an evaluation runs no backward.)
  const int64_t sequences =
      model.has_modsquad() ? micro_batch * model.modsquad().tasks_size() : micro_batch;
  int64_t scratch = ComposedAttentionScratchBytes(sequences, n, model.num_heads());
  if (model.has_modsquad() && model.modsquad().moe()) {
    scratch = std::max(
        scratch, ComposedChoiceAttentionScratchBytes(sequences, model.modsquad().attention_k(), n));
  }
  // train.precision BF16: the experts' bf16 weight copies (FusedExperts), at most half the
  // weights' fp32 bytes.
  const int64_t bf16_copies =
      config.train().precision() == TrainConfig::BF16 ? f.param_bytes / 2 : 0;
  const double need = static_cast<double>(f.bytes_per_rank + scratch + bf16_copies) * sharing;
  const double free = static_cast<double>(mem.free_bytes) +
                      static_cast<double>(std::max<int64_t>(0, mem.pool_free_bytes));
  if (need <= free) return Status::Ok();
  const std::string shared =
      sharing > 1 ? " x " + std::to_string(sharing) + " ranks sharing it" : std::string();
  const std::string copies =
      bf16_copies > 0 ? ", the bf16 weight copies " + GiBString(static_cast<double>(bf16_copies))
                      : std::string();
  return Status::Error("the plan needs " + plan + " and the attention's backward scratch " +
                       GiBString(static_cast<double>(scratch)) + copies + shared + " on " +
                       backend->Describe() + ", but it has " + GiBString(free) + " free of " +
                       GiBString(static_cast<double>(mem.total_bytes)) + "; " +
                       (sharing > 1 ? "run one rank per GPU, or " : "") + advice);
}

StatusOr<std::unique_ptr<Trainer>> Trainer::Create(const Config& config, Communicator* world,
                                                   const Dataset* train, Device device,
                                                   Communicator* device_world) {
  std::unique_ptr<Trainer> t(new Trainer());
  t->config_ = config;
  t->device_ = device;
  t->device_world_ = device != Device::kCPU && world->size() > 1 ? device_world : nullptr;
  if (device != Device::kCPU) {
    if (world->size() > 1 && (device_world == nullptr || device_world->device() != device)) {
      return Status::Error("a " + std::string(DeviceName(device)) + " job of " +
                           std::to_string(world->size()) +
                           " ranks needs a communicator that moves " + DeviceName(device) +
                           " memory (NCCL) beside the world's, and " +
                           (device_world == nullptr
                                ? std::string("there is none")
                                : "the one given moves " +
                                      std::string(DeviceName(device_world->device())) + " memory") +
                           "; build moerun with NCCL, or run one rank per job, or on the CPU");
    }
  }
  // train.precision: the dense layers' and experts' GEMMs take bf16-rounded operands.
  t->bf16_gemms_before_ = SetBf16Gemms(config.train().precision() == TrainConfig::BF16);
  if (config.train().precision() == TrainConfig::BF16 && !HasBf16GemmOps(device)) {
    LOG(WARNING) << "train.precision BF16: the " << DeviceName(device)
                 << " ops have no bf16 GEMMs; they stay fp32";
  }
  t->world_ = world;
  t->train_ = train;
  const int p = world->size();
  const TrainConfig& tc = config.train();
  if (tc.global_batch() % p != 0) {
    return Status::Error("train.global_batch " + std::to_string(tc.global_batch()) +
                         " does not split over " + std::to_string(p) +
                         " ranks; use a multiple of the rank count");
  }
  if (tc.global_batch() > train->size) {
    return Status::Error("train.global_batch " + std::to_string(tc.global_batch()) +
                         " is larger than the dataset (" + std::to_string(train->size) + ")");
  }
  t->local_batch_ = tc.global_batch() / p;
  // Every rank reads its memory before any allocates the model (the agreement is a
  // collective): ranks that share a GPU see each other's contexts, not each other's model,
  // which their plans already count. And the ranks stop together when one is short,
  // before the collectives of the model's creation.
  MOERUN_RETURN_IF_ERROR(
      AgreeOnStatus(*world, CheckMemory(config, p, t->local_batch_, device,
                                        EvalImagesPerRank(config.model(), p, tc.eval_batch()))));
  MOERUN_RETURN_IF_ERROR(config.model().has_modsquad() ? t->CreateModSquad() : t->CreateVit());
  OptimizerConfig oc;
  oc.learning_rate = tc.learning_rate();
  oc.weight_decay = tc.weight_decay();
  oc.warmup_steps = tc.warmup_steps();
  oc.total_steps = tc.steps();
  oc.schedule = tc.schedule();
  oc.moments = tc.optimizer_moments() == TrainConfig::BF16 ? DType::kBF16 : DType::kF32;
  std::vector<OptimizerParam> params;
  for (Param& p : t->params()) {
    const Device d = p.value.device();
    params.push_back({p.name, p.value.device_data<float>(d), p.grad.device_data<float>(d),
                      p.value.numel(), p.decay, d,
                      d == Device::kCPU ? nullptr : MOERUN_OP(Ops(d), adamw_step_many)});
  }
  t->optimizer_ = std::make_unique<AdamW>(oc, std::move(params));
  t->sampler_ = std::make_unique<BatchSampler>(train->size, tc.global_batch(), tc.seed());
  return t;
}

Trainer::~Trainer() {
  ResolveDeviceTimers();  // no pending device time may outlive the slots it adds to
  SetBf16Gemms(bf16_gemms_before_);
}

const StepTimeSplit& Trainer::time_split() const {
  ResolveDeviceTimers();
  return time_split_;
}

Status Trainer::CreateVit() {
  const TrainConfig& tc = config_.train();
  const Dataset* train = train_;
  Communicator* world = world_;
  const int p = world->size();
  const ModelConfig& m = config_.model();
  if (train->channels != m.channels() || train->height != m.image_size() ||
      train->width != m.image_size() || train->num_classes > m.num_classes()) {
    return Status::Error("the dataset's images are " + std::to_string(train->channels) + "x" +
                         std::to_string(train->height) + "x" + std::to_string(train->width) +
                         " with " + std::to_string(train->num_classes) +
                         " classes; set model.channels, model.image_size and model.num_classes "
                         "to match");
  }
  if (m.has_moe()) {
    const int64_t tokens = local_batch_ * TokensPerImage(m), g = GroupTokens(m);
    if (g > 0 && tokens % g != 0) {
      const std::string field = m.moe().group_size() > 0
                                    ? "model.moe.group_size " + std::to_string(g)
                                    : "model.moe.group_images " +
                                          std::to_string(m.moe().group_images()) + " (" +
                                          std::to_string(g) + " tokens)";
      return Status::Error(field + " does not divide the " + std::to_string(tokens) +
                           " tokens of a rank's micro-batch (" + std::to_string(local_batch_) +
                           " images: train.global_batch " + std::to_string(tc.global_batch()) +
                           " over " + std::to_string(p) +
                           " ranks); use a global batch that splits into whole groups per rank, "
                           "or a smaller group");
    }
    auto groups = MoeGroups::Create(world, m.moe().num_experts(), device_world_);
    if (!groups.ok()) return groups.status();
    groups_ = *groups;
  }
  auto model = VitModel::Create(m, groups_, device_);
  if (!model.ok()) return model.status();
  model_ = std::move(*model);
  model_->Init(tc.seed());
  return Status::Ok();
}

namespace {

// sum x^2 of a tensor on its device's ops.
double SquaredNorm(const Tensor& t) {
  const Device d = t.device();
  return MOERUN_OP(Ops(d), sum_of_squares)(t.device_data<float>(d), t.numel());
}

// world.AllReduce(sum) of a tensor's floats; nothing to do on one rank (and a device
// tensor is never handed to a host communicator).
void SumOverRanks(Communicator& world, Tensor& t) {
  if (world.size() == 1) return;
  world.AllReduce(t.raw_data(), t.numel(), DType::kF32, ReduceOp::kSum);
}

}  // namespace

double Trainer::GlobalGradNorm() {
  // Dense gradients are equal on every rank after the all-reduce: count them once (here,
  // locally). Expert gradients: each expert once, from its first replica.
  double dense = 0, expert = 0;
  auto first_replica = [&](const Param& p) {
    const MoeGroups* g = p.groups != nullptr ? p.groups : groups_.get();
    return g == nullptr || g->replicas() == nullptr || g->replicas()->rank() == 0;
  };
  // Every gradient's squares, one call per device (on a GPU: one wait, not one each).
  std::vector<Param>& ps = params();
  std::vector<double> squares(ps.size(), 0.0);
  for (const Device d : {Device::kCPU, Device::kCUDA}) {
    std::vector<const float*> x;
    std::vector<int64_t> n;
    std::vector<size_t> at;
    for (size_t i = 0; i < ps.size(); ++i) {
      if (ps[i].grad.device() != d) continue;
      x.push_back(ps[i].grad.device_data<float>(d));
      n.push_back(ps[i].grad.numel());
      at.push_back(i);
    }
    if (x.empty()) continue;
    std::vector<double> out(x.size());
    MOERUN_OP(Ops(d), sum_of_squares_many)
    (x.data(), n.data(), static_cast<int64_t>(x.size()), out.data());
    for (size_t k = 0; k < at.size(); ++k) squares[at[k]] = out[k];
  }
  for (size_t i = 0; i < ps.size(); ++i) {
    if (!ps[i].expert) {
      dense += squares[i];
    } else if (first_replica(ps[i])) {
      expert += squares[i];
    }
  }
  world_->AllReduce(&expert, 1, DType::kF64, ReduceOp::kSum);
  return std::sqrt(dense + expert);
}

StepStats Trainer::Step() {
  if (modsquad_) return MultiTaskStep();
  const TrainConfig& tc = config_.train();
  const int64_t b = local_batch_, numel = train_->image_numel();
  {
    ScopedTimer timer(&time_split_.data);
    images_.resize(b * numel);
    labels_.resize(b);
    sampler_->RankSlice(step_, world_->rank(), world_->size(), &indices_);
    GatherBatch(*train_, indices_, images_.data(), labels_.data());
    if (config_.data().augment()) {
      Augment(*train_, indices_, tc.seed(), step_, images_.data());
    }
  }
  VitBatch batch;
  batch.images = images_.data();
  batch.labels = labels_.data();
  batch.batch = b;
  batch.global_batch = tc.global_batch();
  batch.first_image = static_cast<int64_t>(world_->rank()) * b;
  batch.training = true;
  batch.step = static_cast<uint32_t>(step_);
  batch.seed = tc.seed();
  VitOutput out;
  const StepTimeSplit moe_before = MoeTimes();
  {
    ScopedTimer timer(&time_split_.forward, device_);
    model_->ZeroGrads();
    const Status s = model_->Forward(batch, &out);
    CHECK(s.ok()) << s.message();  // shapes were validated in Create
  }
  {
    ScopedTimer timer(&time_split_.backward, device_);
    model_->Backward();
  }
  AddMoeTimes(moe_before);
  StepStats st;
  {
    // Data-parallel dense gradients; expert replicas.
    ScopedTimer timer(&time_split_.reduce, device_);
    // The dense gradients and the routers' are where the model is: the device's
    // communicator on a GPU.
    Communicator& dense_world = device_world_ != nullptr ? *device_world_ : *world_;
    SumOverRanks(dense_world, model_->dense_grads());
    for (MoeLayer* layer : model_->moe_layers()) {
      SumOverRanks(dense_world, layer->grads().router_weight);
      layer->ReduceReplicaGradients();
    }
    st.step = step_;
    st.grad_norm = GlobalGradNorm();
    st.learning_rate = LearningRate(optimizer_->config(), step_);
    double sums[3] = {out.loss_sum, static_cast<double>(out.correct),
                      static_cast<double>(out.counted)};
    world_->AllReduce(sums, 3, DType::kF64, ReduceOp::kSum);
    st.loss = sums[0] / sums[2];
    st.accuracy = sums[1] / sums[2];
    st.aux_loss = out.aux_loss;
  }
  if (!UpdateIfFinite(&st)) return st;
  for (MoeLayer* layer : model_->moe_layers()) {
    st.moe.push_back(layer->metrics());
    st.moe_losses.push_back(layer->losses());
  }
  return st;
}

namespace {
void AddTimers(const MoeTimers& t, StepTimeSplit* s) {
  s->router += t.router + t.routing + t.bwd_router;
  s->dispatch_a2a += t.all_to_all + t.bwd_all_to_all;
  s->experts += t.expert + t.expert_act + t.bwd_expert + t.bwd_expert_act;
  s->combine += t.pack + t.combine + t.bwd_combine + t.bwd_pack + t.bwd_dispatch;
}
}  // namespace

StepTimeSplit Trainer::MoeTimes() {
  StepTimeSplit s;
  if (model_) {
    for (MoeLayer* layer : model_->moe_layers()) AddTimers(layer->timers(), &s);
  }
  if (modsquad_) {
    for (MoeAttention* layer : modsquad_->moe_attention_layers()) AddTimers(layer->timers(), &s);
    for (MoeLayer* layer : modsquad_->moe_mlp_layers()) AddTimers(layer->timers(), &s);
  }
  return s;
}

void Trainer::AddMoeTimes(const StepTimeSplit& before) {
  // The forward's and backward's device times (and the last step's reduce and optimizer),
  // done by now but for the backward's last kernels: the gradients' reduction follows, which
  // waits for them anyway. With this, every step resolves what it timed, MoE layers or none.
  ResolveDeviceTimers();
  const StepTimeSplit now = MoeTimes();
  time_split_.router += now.router - before.router;
  time_split_.dispatch_a2a += now.dispatch_a2a - before.dispatch_a2a;
  time_split_.experts += now.experts - before.experts;
  time_split_.combine += now.combine - before.combine;
}

bool Trainer::UpdateIfFinite(StepStats* stats) {
  StepStats& st = *stats;
  if (!std::isfinite(st.loss) || !std::isfinite(st.grad_norm) || !std::isfinite(st.aux_loss)) {
    // No update: the weights stay those of the last good step.
    st.finite = false;
    std::string first;
    for (Param& p : params()) {
      if (!std::isfinite(SquaredNorm(p.grad))) {
        first = "the gradient of '" + p.name + "' is not finite";
        break;
      }
    }
    const Status where =
        AgreeOnStatus(*world_, first.empty() ? Status::Ok() : Status::Error(first));
    std::ostringstream o;
    o << "step " << step_ + 1 << ": loss " << st.loss << ", gradient norm " << st.grad_norm
      << ", aux loss " << st.aux_loss << ": not finite";
    if (!where.ok()) o << "; " << where.message();
    o << "; no update was made (lower train.learning_rate or set train.clip_grad_norm, and "
         "resume from the last checkpoint)";
    st.problem = o.str();
    return false;
  }
  {
    ScopedTimer timer(&time_split_.optimizer, device_);
    optimizer_->Step(step_, ClipCoefficient(st.grad_norm, config_.train().clip_grad_norm()));
  }
  ++time_split_.steps;
  ++step_;
  return true;
}

std::string Trainer::FirstNonFiniteParameter() {
  for (Param& p : params()) {
    if (!std::isfinite(SquaredNorm(p.value))) return p.name;
  }
  return "";
}

std::vector<CheckpointSlice> Trainer::StateSlices(
    bool optimizer, std::vector<std::pair<Tensor, Tensor>>* device_views) {
  std::vector<CheckpointSlice> out;
  std::vector<Param>& params = this->params();
  // A device tensor is saved from and loaded into a host copy.
  auto host = [&](const Tensor& t) {
    if (t.device() == Device::kCPU) return t;
    Tensor copy = t.To(Device::kCPU);
    if (device_views != nullptr) device_views->push_back({t, copy});
    return copy;
  };
  for (Param& p : params) out.push_back({p.name, p.value.shape(), 0, -1, host(p.value)});
  if (modsquad_) {
    for (Param& b : modsquad_->buffers()) out.push_back({b.name, b.value.shape(), 0, -1, b.value});
  }
  if (optimizer) {
    const DType dt = optimizer_->config().moments;
    for (size_t i = 0; i < params.size(); ++i) {
      const Shape& shape = params[i].value.shape();
      const Device d = params[i].value.device();
      out.push_back({"optimizer.m." + params[i].name, shape, 0, -1,
                     host(Tensor::Wrap(optimizer_->first_moment(i), shape, dt, d))});
      out.push_back({"optimizer.v." + params[i].name, shape, 0, -1,
                     host(Tensor::Wrap(optimizer_->second_moment(i), shape, dt, d))});
    }
  }
  return out;
}

CheckpointManifest Trainer::StateManifest() const {
  const TrainConfig& tc = config_.train();
  CheckpointManifest m;
  m.set_step(step_);
  std::string text;
  google::protobuf::TextFormat::PrintToString(config_, &text);
  m.set_config(text);
  DataPosition* d = m.mutable_data();
  const int64_t spe = sampler_->steps_per_epoch();
  d->set_epoch(step_ / spe);
  d->set_index_in_epoch((step_ % spe) * tc.global_batch());
  d->set_shuffle_seed(tc.seed());
  d->set_steps_per_epoch(spe);
  d->set_global_batch(tc.global_batch());
  d->set_dataset_size(train_->size);
  d->set_dataset(config_.data().dataset());
  auto rng = [&](const char* name, const char* algorithm, int64_t counter) {
    RngState* r = m.add_rng();
    r->set_name(name);
    r->set_algorithm(algorithm);
    r->set_seed(tc.seed());
    r->set_counter(counter);
  };
  rng("router_noise", "philox4x32-10(seed, step, layer, global token, expert), Box-Muller", step_);
  rng("augmentation", "philox4x32-10(seed, step, dataset index)", step_);
  rng("data_shuffle", "philox4x32-10(seed, epoch): a permutation per epoch", step_ / spe);
  LrSchedule* lr = m.mutable_lr_schedule();
  lr->set_step(step_);
  lr->set_learning_rate(LearningRate(optimizer_->config(), step_));
  lr->set_peak_learning_rate(tc.learning_rate());
  lr->set_warmup_steps(tc.warmup_steps());
  lr->set_total_steps(tc.steps());
  lr->set_schedule(tc.schedule());
  m.set_expert_parallel_size(groups_ ? groups_->expert().size() : 1);
  m.set_expert_replicas(groups_ && groups_->replicas() ? groups_->replicas()->size() : 1);
  m.set_moerun_version(MOERUN_VERSION);
  m.set_git_revision(MOERUN_GIT_REVISION);
  m.set_optimizer_state(true);
  m.set_optimizer_step(step_);
  return m;
}

Status CheckSameModel(const CheckpointManifest& manifest, const Config& current) {
  Config stored;
  if (!google::protobuf::TextFormat::ParseFromString(manifest.config(), &stored)) {
    return Status::Error("the checkpoint's stored config does not parse");
  }
  // Compared: what decides the parameters. The name and the routing settings (capacity,
  // BPR, noise, loss weights, k, group size) may change between runs of one model.
  auto structure = [](const ModelConfig& m) {
    ModelConfig s = m;
    s.clear_name();
    if (m.has_modsquad()) {
      ModSquadConfig& ms = *s.mutable_modsquad();
      for (const char* f :
           {"mi_weight", "mi_per_rank", "capacity_factor", "group_images", "bpr", "multiple_of"}) {
        ms.GetReflection()->ClearField(&ms, ModSquadConfig::descriptor()->FindFieldByName(f));
      }
    }
    if (m.has_moe()) {
      MoeConfig& e = *s.mutable_moe();
      e.Clear();
      e.set_num_experts(m.moe().num_experts());
      e.set_placement(m.moe().placement());
      e.set_every_n(m.moe().every_n());
      e.set_last_n(m.moe().last_n());
    }
    return s;
  };
  const ModelConfig a = structure(stored.model()), b = structure(current.model());
  google::protobuf::util::MessageDifferencer diff;
  std::string report;
  diff.ReportDifferencesToString(&report);
  diff.set_message_field_comparison(google::protobuf::util::MessageDifferencer::EQUIVALENT);
  if (!diff.Compare(a, b)) {
    return Status::Error(
        "the checkpoint was written by another model: its config differs from "
        "this one in (checkpoint -> this config)\n" +
        report +
        "use the config the checkpoint was trained with (`moerun checkpoint "
        "info` prints it)");
  }
  return Status::Ok();
}

Status Trainer::Restore(const std::string& dir, const CheckpointManifest& manifest,
                        bool parameters_only) {
  MOERUN_RETURN_IF_ERROR(CheckSameModel(manifest, config_));
  const bool moments = manifest.optimizer_state() && !parameters_only;
  if (moments) {
    // The moments are stored as the run that saved them kept them.
    const std::string want = optimizer_->config().moments == DType::kBF16 ? "BF16" : "F32";
    for (const CheckpointTensor& t : manifest.tensors()) {
      if (t.name().rfind("optimizer.m.", 0) == 0 && t.dtype() != want) {
        return Status::Error(dir + " holds the AdamW moments as " + t.dtype() +
                             ", this run keeps them as " + want +
                             ": set train.optimizer_moments to " +
                             (t.dtype() == "BF16" ? "BF16" : "FP32") + " to resume it");
      }
    }
  }
  std::vector<std::pair<Tensor, Tensor>> device_views;
  std::vector<CheckpointSlice> slices = StateSlices(moments, &device_views);
  if (modsquad_) {
    // Usage statistics: restored when the checkpoint has them (else they restart at zero).
    std::set<std::string> stored;
    for (const CheckpointTensor& t : manifest.tensors()) stored.insert(t.name());
    std::vector<CheckpointSlice> kept;
    for (CheckpointSlice& sl : slices) {
      const bool buffer =
          sl.name.size() > 6 && sl.name.compare(sl.name.size() - 6, 6, ".usage") == 0;
      if (!buffer) {
        kept.push_back(sl);
      } else if (stored.count(sl.name)) {
        kept.push_back(sl);
      } else {
        sl.local.SetZero();
      }
    }
    slices = std::move(kept);
  }
  MOERUN_RETURN_IF_ERROR(LoadSlices(dir, manifest, &slices));
  for (auto& [device_tensor, host_copy] : device_views) device_tensor.CopyFrom(host_copy);
  if (!moments) {
    optimizer_->ZeroMoments();
  }
  step_ = parameters_only ? 0 : manifest.step();
  return Status::Ok();
}

int64_t EvalImagesPerRank(const ModelConfig& model, int ranks, int64_t global_batch) {
  const int64_t step_images = GroupStepImages(model);
  return std::max<int64_t>(step_images,
                           global_batch / std::max(1, ranks) / step_images * step_images);
}

EvalStats Trainer::Evaluate(const Dataset& data, int64_t global_batch,
                            const RoutingOverride& routing) {
  // The MoE layers' timers run in evaluation too: their device times land after each batch
  // (here and in EvaluateMultiTask), before the next step takes its MoeTimes() baseline, so
  // that they stay out of the training split.
  if (modsquad_) return EvaluateMultiTask(data, global_batch, routing);
  const int p = world_->size();
  // Each rank's micro-batch holds whole routing groups (the last batch is padded).
  const int64_t b = EvalImagesPerRank(config_.model(), p, global_batch);
  const int64_t numel = data.image_numel();
  // Inference routing overrides, restored afterwards.
  std::vector<MoeLayerConfig> saved;
  for (MoeLayer* layer : model_->moe_layers()) {
    saved.push_back(layer->config());
    MoeLayerConfig& c = layer->mutable_config();
    if (routing.capacity_factor >= 0) {
      c.capacity_factor = routing.capacity_factor;
      c.capacity = 0;
      if (routing.exact_capacity) c.multiple_of = 0;
    }
    if (routing.bpr >= 0) c.bpr = routing.bpr == 1;
  }
  std::vector<float> images(b * numel);
  std::vector<int32_t> labels(b);
  double sums[3] = {0, 0, 0};
  std::vector<double> dropped;
  int64_t batches = 0;
  for (int64_t begin = 0; begin < data.size; begin += b * p) {
    const int64_t count = std::min<int64_t>(b * p, data.size - begin);
    // Every rank runs a full micro-batch (the MoE all-to-all needs equal shapes); the
    // padding repeats example 0 with label -1 (not counted).
    std::vector<int64_t> idx = EvalSlice(data.size, begin, count, world_->rank(), p);
    const int64_t real = static_cast<int64_t>(idx.size());
    idx.resize(b, 0);
    GatherBatch(data, idx, images.data(), labels.data());
    for (int64_t i = real; i < b; ++i) labels[i] = -1;
    VitBatch batch;
    batch.images = images.data();
    batch.labels = labels.data();
    batch.batch = b;
    batch.global_batch = count;
    batch.first_image = static_cast<int64_t>(world_->rank()) * b;
    batch.training = false;
    // A mask on every rank where any rank pads (count < b * p), even one whose images are
    // all real: masked layers route on the host, and every rank must route the same way.
    batch.routed_images = count < b * p ? real : -1;
    VitOutput out;
    const Status s = model_->Forward(batch, &out);
    CHECK(s.ok()) << s.message();
    ResolveDeviceTimers();  // the batch's logits came to the host: its device work is done
    sums[0] += out.loss_sum;
    sums[1] += out.correct;
    sums[2] += out.counted;
    const auto layers = model_->moe_layers();
    for (MoeLayer* layer : layers) {
      const auto& f = layer->metrics().dropped_fraction;
      dropped.resize(f.size(), 0.0);
      for (size_t j = 0; j < f.size(); ++j) dropped[j] += f[j] / layers.size();
    }
    ++batches;
  }
  world_->AllReduce(sums, 3, DType::kF64, ReduceOp::kSum);
  auto layers = model_->moe_layers();
  for (size_t i = 0; i < layers.size(); ++i) layers[i]->mutable_config() = saved[i];
  EvalStats e;
  e.examples = static_cast<int64_t>(sums[2]);
  e.loss = sums[2] > 0 ? sums[0] / sums[2] : 0;
  e.accuracy = sums[2] > 0 ? sums[1] / sums[2] : 0;
  for (double& d : dropped) d /= std::max<int64_t>(1, batches);
  e.dropped_fraction = dropped;
  return e;
}

}  // namespace moerun
