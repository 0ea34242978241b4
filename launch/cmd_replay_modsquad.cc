// moerun replay-modsquad: one Mod-Squad MoE layer (MLP or attention) over one training step
// of several task passes, from a case file, with every intermediate and gradient written
// out, so the layer can be checked against an independent implementation
// (tests/reference/modsquad_reference.py). Format: docs/modsquad_case_format.md.
#include <algorithm>
#include <set>

#include "launch/case_file.h"
#include "launch/commands.h"
#include "model/moe_attention.h"
#include "model/moe_layer.h"
#include "model/vit_spec.h"
#include "runtime/safetensors.h"

namespace moerun {
namespace {

struct ModSquadCase {
  bool attention = false;
  int64_t experts = 0, k = 0, tasks = 0, passes = 0, batch = 0, seq_len = 0, d = 0;
  int64_t hidden = 0, head_dim = 0;
  CapacityRule capacity;
  AuxWeights aux;
  std::vector<int32_t> pass_task;
  std::map<std::string, Tensor> tensors;
};

Status CheckMetadataKeys(const std::string& path, const std::map<std::string, std::string>& md) {
  static const char* const kKeys[] = {
      "layer",       "num_experts",   "k",           "tasks",           "passes",
      "seq_len",     "mi_weight",     "mi_per_rank", "capacity_factor", "capacity",
      "multiple_of", "ceil_or_round", "bpr",         "group_size",      "format"};
  for (const auto& [key, value] : md) {
    if (std::find(std::begin(kKeys), std::end(kKeys), key) == std::end(kKeys)) {
      std::string known;
      for (const char* k : kKeys) known += (known.empty() ? "" : ", ") + std::string(k);
      return Status::Error(path + ": unknown metadata key '" + key +
                           "'; the settings are: " + known);
    }
  }
  return Status::Ok();
}

StatusOr<ModSquadCase> LoadCase(const std::string& path, int ranks) {
  auto reader = SafetensorsReader::Open(path);
  if (!reader.ok()) return reader.status();
  MOERUN_RETURN_IF_ERROR(CheckMetadataKeys(path, reader->metadata()));
  const Metadata md(reader->metadata());
  ModSquadCase c;
  const std::string layer = md.Str("layer", "");
  if (layer != "mlp" && layer != "attention") {
    return Status::Error(path + ": metadata 'layer' = '" + layer + "'; use mlp or attention");
  }
  c.attention = layer == "attention";
  for (const char* key : {"num_experts", "k", "tasks", "passes", "seq_len"}) {
    if (!md.Has(key)) return Status::Error(path + ": metadata must give '" + key + "'");
  }
  int64_t multiple_of = 4, capacity = 0, group_size = 0;
  bool bpr = true, per_rank = false;
  MOERUN_RETURN_IF_ERROR(md.Int("num_experts", 0, &c.experts));
  MOERUN_RETURN_IF_ERROR(md.Int("k", 0, &c.k));
  MOERUN_RETURN_IF_ERROR(md.Int("tasks", 0, &c.tasks));
  MOERUN_RETURN_IF_ERROR(md.Int("passes", 0, &c.passes));
  MOERUN_RETURN_IF_ERROR(md.Int("seq_len", 0, &c.seq_len));
  MOERUN_RETURN_IF_ERROR(md.Double("mi_weight", 0.0, &c.aux.mi));
  MOERUN_RETURN_IF_ERROR(md.Bool("mi_per_rank", false, &per_rank));
  MOERUN_RETURN_IF_ERROR(md.Double("capacity_factor", 0.0, &c.capacity.capacity_factor));
  MOERUN_RETURN_IF_ERROR(md.Int("capacity", 0, &capacity));
  MOERUN_RETURN_IF_ERROR(md.Int("multiple_of", 4, &multiple_of));
  MOERUN_RETURN_IF_ERROR(md.Bool("bpr", true, &bpr));
  MOERUN_RETURN_IF_ERROR(md.Int("group_size", 0, &group_size));
  const std::string rounding = md.Str("ceil_or_round", "ceil");
  if (rounding != "ceil" && rounding != "round") {
    return Status::Error(path + ": metadata 'ceil_or_round' = '" + rounding +
                         "'; use ceil or round");
  }
  if (c.experts < 1 || c.k < 1 || c.k > c.experts) {
    return Status::Error(path + ": need 1 <= k <= num_experts (k " + std::to_string(c.k) +
                         ", num_experts " + std::to_string(c.experts) + ")");
  }
  if (c.tasks < 1 || c.passes < 1 || c.seq_len < 1) {
    return Status::Error(path + ": tasks, passes and seq_len must be at least 1");
  }
  if (capacity < 0 || c.capacity.capacity_factor < 0 || multiple_of < 0 || group_size < 0 ||
      c.aux.mi < 0) {
    return Status::Error(path +
                         ": capacity, capacity_factor, multiple_of, group_size and mi_weight "
                         "must not be negative");
  }
  c.aux.mi_per_rank = per_rank;
  c.capacity.capacity = capacity;
  if (capacity > 0) c.capacity.capacity_factor = 0;
  c.capacity.multiple_of = static_cast<int>(multiple_of);
  c.capacity.round = rounding == "round";
  c.capacity.bpr = bpr;
  c.capacity.group_size = group_size;

  auto router = reader->Get("router.weight", DType::kF32, {c.tasks, c.experts, -1});
  if (!router.ok()) return router.status();
  c.d = router->dim(2);
  c.tensors["router.weight"] = *router;
  std::set<std::string> expected = {"router.weight"};
  auto take = [&](const std::string& name, const Shape& shape) -> Status {
    auto t = reader->Get(name, DType::kF32, shape);
    if (!t.ok()) return t.status();
    c.tensors[name] = *t;
    expected.insert(name);
    return Status::Ok();
  };
  const int64_t e = c.experts, d = c.d;
  if (c.attention) {
    auto q = reader->Get("experts.q.weight", DType::kF32, {e, -1, d});
    if (!q.ok()) return q.status();
    c.head_dim = q->dim(1);
    const int64_t dh = c.head_dim;
    MOERUN_RETURN_IF_ERROR(take("experts.q.weight", {e, dh, d}));
    MOERUN_RETURN_IF_ERROR(take("experts.o.weight", {e, d, dh}));
    MOERUN_RETURN_IF_ERROR(take("kv.weight", {2 * dh, d}));
    MOERUN_RETURN_IF_ERROR(take("kv.bias", {2 * dh}));
  } else {
    auto fc1 = reader->Get("experts.fc1.weight", DType::kF32, {e, -1, d});
    if (!fc1.ok()) return fc1.status();
    c.hidden = fc1->dim(1);
    const int64_t h = c.hidden;
    MOERUN_RETURN_IF_ERROR(take("experts.fc1.weight", {e, h, d}));
    MOERUN_RETURN_IF_ERROR(take("experts.fc1.bias", {e, h}));
    MOERUN_RETURN_IF_ERROR(take("experts.fc2.weight", {e, d, h}));
    MOERUN_RETURN_IF_ERROR(take("experts.fc2.bias", {e, d}));
  }
  if (reader->Has("usage")) MOERUN_RETURN_IF_ERROR(take("usage", {c.tasks, e}));
  auto x0 = reader->Get("pass0.x", DType::kF32, {-1, c.seq_len, d});
  if (!x0.ok()) return x0.status();
  c.batch = x0->dim(0);
  for (int64_t p = 0; p < c.passes; ++p) {
    const std::string pre = "pass" + std::to_string(p) + ".";
    auto task = reader->Get(pre + "task", DType::kI32, {1});
    if (!task.ok()) return task.status();
    const int32_t t = task->data<int32_t>()[0];
    if (t < 0 || t >= c.tasks) {
      return Status::Error(path + ": " + pre + "task is " + std::to_string(t) + ", outside 0.." +
                           std::to_string(c.tasks - 1) + " (the case has " +
                           std::to_string(c.tasks) + " tasks)");
    }
    c.pass_task.push_back(t);
    expected.insert(pre + "task");
    MOERUN_RETURN_IF_ERROR(take(pre + "x", {c.batch, c.seq_len, d}));
    MOERUN_RETURN_IF_ERROR(take(pre + "dy", {c.batch, c.seq_len, d}));
    if (reader->Has(pre + "noise")) {
      MOERUN_RETURN_IF_ERROR(take(pre + "noise", {c.batch * c.seq_len, e}));
    }
  }
  for (const std::string& name : reader->names()) {
    if (!expected.count(name)) {
      return Status::Error(path + ": unknown tensor '" + name + "' for a " + layer +
                           " case (see docs/modsquad_case_format.md)");
    }
  }
  if (c.batch % ranks != 0) {
    return Status::Error(path + ": each pass has " + std::to_string(c.batch) + " images, which " +
                         std::to_string(ranks) +
                         " ranks cannot share evenly; run with a rank count that divides it");
  }
  const int64_t local = c.batch / ranks * c.seq_len * c.passes;
  const int64_t s = group_size > 0 ? group_size : local;
  if (local % s != 0) {
    return Status::Error(path + ": group_size " + std::to_string(s) + " does not divide the " +
                         std::to_string(local) + " tokens each of " + std::to_string(ranks) +
                         " ranks holds; run with fewer ranks or another group size");
  }
  auto placement = PlaceExperts(static_cast<int>(e), ranks);
  if (!placement.ok()) return placement.status();
  return c;
}

// Rows [first, first + rows) of every pass's [B*L, ...] view of `name`, concatenated.
Tensor LocalStream(const ModSquadCase& c, const std::string& suffix, int64_t first_image,
                   int64_t images) {
  std::vector<Tensor> parts;
  int64_t rows = 0, width = 0;
  for (int64_t p = 0; p < c.passes; ++p) {
    const Tensor& t = c.tensors.at("pass" + std::to_string(p) + "." + suffix);
    Tensor flat = t.Reshape({c.batch * c.seq_len, -1});
    parts.push_back(flat.Slice(0, first_image * c.seq_len, (first_image + images) * c.seq_len));
    rows += images * c.seq_len;
    width = flat.dim(1);
  }
  Tensor out = Tensor::Empty({rows, width});
  int64_t at = 0;
  for (const Tensor& part : parts) {
    out.Slice(0, at, at + part.dim(0)).CopyFrom(part);
    at += part.dim(0);
  }
  return out;
}

Tensor FromDoubles(const std::vector<double>& v, const Shape& shape) {
  Tensor t = Tensor::Empty(shape);
  for (size_t i = 0; i < v.size(); ++i) t.data<float>()[i] = static_cast<float>(v[i]);
  return t;
}

}  // namespace

int RunReplayModSquad(const std::vector<std::string>& args, ProgramArgs program) {
  GlobalOptions global;
  std::string case_path, out_path;
  po::options_description desc("Options");
  desc.add_options()                                                            //
      ("case", po::value(&case_path)->required(), "input case (.safetensors)")  //
      ("out", po::value(&out_path)->required(), "output file (.safetensors), written by rank 0");
  AddGlobalOptions(&desc, &global);
  global.cuda_supported = true;  // the layer's projections, rows and experts on a GPU
  po::variables_map vm;
  if (auto done = ParseArgs(
          "moerun replay-modsquad",
          "[mpirun -np P] moerun replay-modsquad --case case.safetensors --out out.safetensors",
          "Runs one Mod-Squad MoE layer (MLP or attention) over one training step of several\n"
          "task passes from a case file and writes per pass the gates, the routing, y (and\n"
          "the attention's queries and head outputs), per step the task x expert table, the\n"
          "selection counts, the usage EMA, the MI and auxiliary losses, and every gradient\n"
          "of L = sum_p sum(y_p * dy_p) + aux_total. Rank r holds the r-th slice of every\n"
          "pass's images. --device cuda: the layer on each rank's GPU (the router's GEMM,\n"
          "rows, experts, projections and combine; with the case's noise the gates and the\n"
          "routing plan on the host, as in training's evaluation), so the same case compares\n"
          "the two backends. Format: docs/modsquad_case_format.md.",
          args, desc, nullptr, &vm))
    return *done;
  Session session(program.argc, program.argv, global);
  if (const Status nccl = session.RequireDeviceWorld(); !nccl.ok()) {
    PrintError("moerun replay-modsquad", nccl.message());
    return kExitUnavailable;
  }
  Communicator& world = session.world();
  StatusOr<ModSquadCase> loaded = LoadCase(case_path, world.size());
  Status agreed = AgreeOnStatus(world, loaded.status());
  if (!agreed.ok()) {
    PrintError("moerun replay-modsquad", agreed.message());
    return kExitUsage;
  }
  ModSquadCase& c = *loaded;
  const Device dev = session.device();
  auto groups = MoeGroups::Create(&world, static_cast<int>(c.experts), session.device_world());
  CHECK(groups.ok()) << groups.status().message();  // checked by LoadCase
  const int64_t el = (*groups)->local_experts(), e0 = (*groups)->first_local_expert();
  const int64_t images = c.batch / world.size(), first = world.rank() * images;
  const int64_t per_pass = images * c.seq_len, t = per_pass * c.passes, d = c.d, k = c.k;
  Tensor x = LocalStream(c, "x", first, images).To(dev);
  Tensor dy = LocalStream(c, "dy", first, images).To(dev);
  Tensor noise;
  const bool with_noise = c.tensors.count("pass0.noise") > 0;
  if (with_noise) noise = LocalStream(c, "noise", first, images);
  std::vector<int32_t> task(t);
  for (int64_t i = 0; i < t; ++i) task[i] = c.pass_task[i / per_pass];
  MoeForwardArgs fwd;
  fwd.task = task.data();
  if (with_noise) fwd.noise = &noise;
  Tensor y = Tensor::Empty({t, d}, DType::kF32, dev), dx = Tensor::Empty({t, d}, DType::kF32, dev);
  auto experts_of = [&](const std::string& name) {
    return c.tensors.at(name).Slice(0, e0, e0 + el);
  };
  std::unique_ptr<MoeLayer> mlp;
  std::unique_ptr<MoeAttention> attn;
  if (c.attention) {
    MoeAttentionConfig ac;
    ac.d = static_cast<int>(d);
    ac.head_dim = static_cast<int>(c.head_dim);
    ac.num_experts = static_cast<int>(c.experts);
    ac.k = static_cast<int>(k);
    ac.tasks = static_cast<int>(c.tasks);
    ac.capacity = c.capacity;
    ac.aux = c.aux;
    ac.device = dev;
    attn = std::make_unique<MoeAttention>(ac, *groups);
    MoeAttentionParams& p = attn->params();
    p.router_weight.CopyFrom(c.tensors.at("router.weight"));
    p.q_weight.CopyFrom(experts_of("experts.q.weight"));
    p.o_weight.CopyFrom(experts_of("experts.o.weight"));
    p.kv_weight.CopyFrom(c.tensors.at("kv.weight"));
    p.kv_bias.CopyFrom(c.tensors.at("kv.bias"));
    if (c.tensors.count("usage")) attn->usage().CopyFrom(c.tensors.at("usage"));
    agreed = AgreeOnStatus(world, attn->Forward(x, c.seq_len, fwd, &y));
  } else {
    MoeLayerConfig lc;
    lc.d = static_cast<int>(d);
    lc.m = static_cast<int>(c.hidden);
    lc.num_experts = static_cast<int>(c.experts);
    lc.k = static_cast<int>(k);
    lc.capacity_factor = c.capacity.capacity_factor;
    lc.capacity = c.capacity.capacity;
    lc.multiple_of = c.capacity.multiple_of;
    lc.round = c.capacity.round;
    lc.bpr = c.capacity.bpr;
    lc.group_size = c.capacity.group_size;
    lc.gate = GateKind::kTaskSoftmax;
    lc.tasks = static_cast<int>(c.tasks);
    lc.importance_weight = 0;
    lc.load_weight = 0;
    lc.mi_weight = c.aux.mi;
    lc.mi_per_rank = c.aux.mi_per_rank;
    lc.device = dev;
    mlp = std::make_unique<MoeLayer>(lc, *groups);
    MoeParams& p = mlp->params();
    p.router_weight.CopyFrom(c.tensors.at("router.weight"));
    p.fc1_weight.CopyFrom(experts_of("experts.fc1.weight"));
    p.fc1_bias.CopyFrom(experts_of("experts.fc1.bias"));
    p.fc2_weight.CopyFrom(experts_of("experts.fc2.weight"));
    p.fc2_bias.CopyFrom(experts_of("experts.fc2.bias"));
    if (c.tensors.count("usage")) mlp->usage().CopyFrom(c.tensors.at("usage"));
    agreed = AgreeOnStatus(world, mlp->Forward(x, fwd, &y));
  }
  if (!agreed.ok()) {
    PrintError("moerun replay-modsquad", agreed.message());
    return kExitUsage;
  }
  SafetensorsWriter out;
  // Host copies (of device tensors: after the work queued for them) of everything Backward
  // may overwrite, made first.
  auto host = [](const Tensor& v) { return v.To(Device::kCPU).Contiguous(); };
  const Router& router = c.attention ? attn->router() : mlp->router();
  const RoutingPlan& plan = c.attention ? attn->plan() : mlp->plan();
  const Tensor gates = host(router.gates()), index = host(plan.expert_index);
  const Tensor slot = host(plan.slot), weight = host(plan.weight);
  const MoeLosses losses = c.attention ? attn->losses() : mlp->losses();
  const MoeAuxLosses& aux = c.attention ? attn->aux() : mlp->aux();
  const std::vector<double> gate_sums = aux.task_gate_sums(), counts = aux.selection_counts();
  const std::vector<double> task_sel = aux.task_selections();
  const Tensor usage = host(c.attention ? attn->usage() : mlp->usage());
  Tensor queries, head_outputs;
  if (c.attention) {
    queries = host(attn->queries());
    head_outputs = host(attn->head_outputs());
  }
  if (c.attention) {
    attn->ZeroGradients();
    attn->Backward(dy, &dx);
    attn->ReduceReplicaGradients();
  } else {
    mlp->ZeroGradients();
    mlp->Backward(dy, &dx);
    mlp->ReduceReplicaGradients();
  }
  y = host(y);
  dx = host(dx);
  // Per pass: this rank's rows of the pass, gathered over ranks (rank order = image order).
  auto per_pass_rows = [&](const Tensor& local, int64_t p) {
    Tensor rows = local.Slice(0, p * per_pass, (p + 1) * per_pass).Contiguous();
    return GatherRows(world, rows);
  };
  for (int64_t p = 0; p < c.passes; ++p) {
    const std::string pre = "pass" + std::to_string(p) + ".";
    out.Add(pre + "gates", per_pass_rows(gates, p));
    out.Add(pre + "expert_index", per_pass_rows(index, p));
    out.Add(pre + "slot", per_pass_rows(slot, p));
    out.Add(pre + "combine_weight", per_pass_rows(weight, p));
    out.Add(pre + "y", per_pass_rows(y, p).Reshape({c.batch, c.seq_len, d}));
    out.Add("grad." + pre + "x", per_pass_rows(dx, p).Reshape({c.batch, c.seq_len, d}));
    if (c.attention) {
      out.Add(pre + "queries", per_pass_rows(queries, p));
      out.Add(pre + "head_outputs", per_pass_rows(head_outputs, p));
    }
  }
  out.Add("step.gate_sums", FromDoubles(gate_sums, {c.tasks, c.experts}));
  out.Add("step.selection_counts", FromDoubles(counts, {c.experts}));
  out.Add("step.task_selections", FromDoubles(task_sel, {c.tasks, c.experts}));
  out.Add("step.usage", usage);
  Tensor mi = Tensor::Empty({1}), aux_total = Tensor::Empty({1});
  mi.data<float>()[0] = static_cast<float>(losses.value("mi"));
  aux_total.data<float>()[0] = static_cast<float>(losses.aux_total);
  out.Add("loss.mi", mi);
  out.Add("loss.aux_total", aux_total);
  // Replicated weights: sum of the ranks' shares; experts: gathered in rank order (with
  // replicas the first E ranks hold experts 0..E-1).
  auto replicated = [&](const Tensor& g) {
    Tensor sum = host(g).Clone();  // not summed into the live gradient
    world.AllReduce(sum.raw_data(), sum.numel(), DType::kF32, ReduceOp::kSum);
    return sum;
  };
  auto experts = [&](const Tensor& g) {
    return GatherRows(world, host(g)).Slice(0, 0, c.experts).Contiguous();
  };
  if (c.attention) {
    MoeAttentionParams& g = attn->grads();
    out.Add("grad.router.weight", replicated(g.router_weight));
    out.Add("grad.kv.weight", replicated(g.kv_weight));
    out.Add("grad.kv.bias", replicated(g.kv_bias));
    out.Add("grad.experts.q.weight", experts(g.q_weight));
    out.Add("grad.experts.o.weight", experts(g.o_weight));
  } else {
    MoeParams& g = mlp->grads();
    out.Add("grad.router.weight", replicated(g.router_weight));
    out.Add("grad.experts.fc1.weight", experts(g.fc1_weight));
    out.Add("grad.experts.fc1.bias", experts(g.fc1_bias));
    out.Add("grad.experts.fc2.weight", experts(g.fc2_weight));
    out.Add("grad.experts.fc2.bias", experts(g.fc2_bias));
  }
  const int64_t capacity = plan.capacity;
  out.SetMetadata("ranks", std::to_string(world.size()));
  out.SetMetadata("capacity", std::to_string(capacity));
  out.SetMetadata("device", DeviceName(dev));
  Status written = session.is_root() ? out.Write(out_path) : Status::Ok();
  written = AgreeOnStatus(world, written);
  if (!written.ok()) {
    PrintError("moerun replay-modsquad", written.message());
    return kExitFailure;
  }
  if (session.is_root()) {
    LOG(INFO) << "replay-modsquad: " << (c.attention ? "attention" : "mlp") << ", " << c.passes
              << " passes of " << c.batch << "x" << c.seq_len << " tokens, E=" << c.experts
              << " k=" << k << " capacity " << capacity << " on " << world.size() << " rank(s) ("
              << DeviceName(dev) << "); MI " << losses.value("mi") << "; wrote " << out_path;
  }
  return kExitOk;
}

}  // namespace moerun
