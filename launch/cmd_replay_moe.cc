// moerun replay-moe: runs one MoE layer's forward and backward on a case file and writes
// every output and gradient, so that the layer can be compared with PyTorch, JAX or NumPy.
// The file formats are documented in README.md ("Replaying one MoE layer").
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <set>

#include "launch/case_file.h"
#include "launch/commands.h"
#include "model/moe_layer.h"
#include "model/vit_spec.h"
#include "runtime/safetensors.h"

namespace moerun {
namespace {

struct ReplayCase {
  MoeLayerConfig config;
  int64_t tokens = 0;
  uint64_t seed = 0;
  std::map<std::string, Tensor> tensors;  // the inputs, whole
};

StatusOr<ReplayCase> LoadCase(const std::string& path, int ranks) {
  auto reader = SafetensorsReader::Open(path);
  if (!reader.ok()) return reader.status();
  const Metadata md(reader->metadata());
  // A misspelt key would silently fall back to its default: refuse what is not a setting.
  static const char* const kKeys[] = {"num_experts",
                                      "k",
                                      "capacity",
                                      "capacity_factor",
                                      "multiple_of",
                                      "bpr",
                                      "group_size",
                                      "noise_std",
                                      "importance_weight",
                                      "load_weight",
                                      "gshard_weight",
                                      "z_loss_weight",
                                      "seed",
                                      "ceil_or_round",
                                      "format"};
  for (const auto& [key, value] : reader->metadata()) {
    if (std::find(std::begin(kKeys), std::end(kKeys), key) == std::end(kKeys)) {
      std::string known;
      for (const char* k : kKeys) known += (known.empty() ? "" : ", ") + std::string(k);
      return Status::Error(path + ": unknown metadata key '" + key +
                           "'; the settings are: " + known);
    }
  }
  ReplayCase c;
  MoeLayerConfig& cfg = c.config;
  const MoeConfig defaults;
  int64_t e = 0, k = 0, capacity = 0, multiple_of = 0, group_size = 0, seed = 0;
  if (!md.Has("num_experts") || !md.Has("k")) {
    return Status::Error(path + ": metadata must give 'num_experts' and 'k'");
  }
  MOERUN_RETURN_IF_ERROR(md.Int("num_experts", 0, &e));
  MOERUN_RETURN_IF_ERROR(md.Int("k", 0, &k));
  MOERUN_RETURN_IF_ERROR(md.Int("capacity", 0, &capacity));
  MOERUN_RETURN_IF_ERROR(
      md.Double("capacity_factor", defaults.capacity_factor(), &cfg.capacity_factor));
  MOERUN_RETURN_IF_ERROR(md.Int("multiple_of", defaults.multiple_of(), &multiple_of));
  MOERUN_RETURN_IF_ERROR(md.Bool("bpr", defaults.bpr(), &cfg.bpr));
  MOERUN_RETURN_IF_ERROR(md.Int("group_size", 0, &group_size));
  MOERUN_RETURN_IF_ERROR(md.Double("noise_std", defaults.noise_std(), &cfg.noise_std));
  MOERUN_RETURN_IF_ERROR(
      md.Double("importance_weight", defaults.importance_weight(), &cfg.importance_weight));
  MOERUN_RETURN_IF_ERROR(md.Double("load_weight", defaults.load_weight(), &cfg.load_weight));
  MOERUN_RETURN_IF_ERROR(md.Double("gshard_weight", defaults.gshard_weight(), &cfg.gshard_weight));
  MOERUN_RETURN_IF_ERROR(md.Double("z_loss_weight", 0.0, &cfg.z_loss_weight));
  MOERUN_RETURN_IF_ERROR(md.Int("seed", 0, &seed));
  const std::string rounding = md.Str("ceil_or_round", "ceil");
  if (rounding != "ceil" && rounding != "round") {
    return Status::Error(path + ": metadata 'ceil_or_round' = '" + rounding +
                         "'; use ceil or round");
  }
  if (md.Has("capacity") && md.Has("capacity_factor")) {
    return Status::Error(path + ": metadata gives both 'capacity' and 'capacity_factor'; give one");
  }
  if (e < 1 || k < 1 || k > e) {
    return Status::Error(path + ": need 1 <= k <= num_experts (k " + std::to_string(k) +
                         ", num_experts " + std::to_string(e) + ")");
  }
  if (capacity < 0 || cfg.capacity_factor < 0 || multiple_of < 0 || group_size < 0 ||
      cfg.noise_std < 0) {
    return Status::Error(path +
                         ": capacity, capacity_factor, multiple_of, group_size and "
                         "noise_std must not be negative");
  }
  cfg.num_experts = static_cast<int>(e);
  cfg.k = static_cast<int>(k);
  cfg.capacity = capacity;
  if (capacity > 0) cfg.capacity_factor = 0;
  cfg.multiple_of = static_cast<int>(multiple_of);
  cfg.round = rounding == "round";
  cfg.group_size = group_size;
  c.seed = static_cast<uint64_t>(seed);

  auto x = reader->Get("x", DType::kF32, {-1, -1});
  if (!x.ok()) return x.status();
  auto fc1 = reader->Get("experts.fc1.weight", DType::kF32, {e, -1, x->dim(1)});
  if (!fc1.ok()) return fc1.status();
  const int64_t t = x->dim(0), d = x->dim(1), m = fc1->dim(1);
  cfg.d = static_cast<int>(d);
  cfg.m = static_cast<int>(m);
  c.tokens = t;
  c.tensors["x"] = *x;
  c.tensors["experts.fc1.weight"] = *fc1;
  const std::pair<const char*, Shape> rest[] = {{"dy", {t, d}},
                                                {"router.weight", {e, d}},
                                                {"experts.fc1.bias", {e, m}},
                                                {"experts.fc2.weight", {e, d, m}},
                                                {"experts.fc2.bias", {e, d}}};
  for (const auto& [name, shape] : rest) {
    auto tensor = reader->Get(name, DType::kF32, shape);
    if (!tensor.ok()) return tensor.status();
    c.tensors[name] = *tensor;
  }
  if (reader->Has("noise")) {
    auto noise = reader->Get("noise", DType::kF32, {t, e});
    if (!noise.ok()) return noise.status();
    c.tensors["noise"] = *noise;
  }
  if (t % ranks != 0) {
    return Status::Error(path + ": the case has " + std::to_string(t) + " tokens, which " +
                         std::to_string(ranks) +
                         " ranks cannot share evenly; run with a rank count that divides it");
  }
  const int64_t s = group_size > 0 ? group_size : t / ranks;
  if ((t / ranks) % s != 0) {
    return Status::Error(path + ": group_size " + std::to_string(s) + " does not divide the " +
                         std::to_string(t / ranks) + " tokens each of " + std::to_string(ranks) +
                         " ranks holds; run with fewer ranks or another group size");
  }
  auto placement = PlaceExperts(cfg.num_experts, ranks);
  if (!placement.ok()) return placement.status();
  return c;
}

}  // namespace

int RunReplayMoe(const std::vector<std::string>& args, ProgramArgs program) {
  GlobalOptions global;
  std::string case_path, out_path;
  bool eval = false;
  po::options_description desc("Options");
  desc.add_options()                                                                              //
      ("case", po::value(&case_path)->required(), "input case (.safetensors)")                    //
      ("out", po::value(&out_path)->required(), "output file (.safetensors), written by rank 0")  //
      ("eval", po::bool_switch(&eval), "inference mode: no router noise, no load loss");
  AddGlobalOptions(&desc, &global);
  global.cuda_supported = true;  // the layer's rows, experts and combine on a GPU
  po::variables_map vm;
  if (auto done = ParseArgs(
          "moerun replay-moe",
          "[mpirun -np P] moerun replay-moe --case case.safetensors --out out.safetensors",
          "Runs one MoE layer forward and backward on a case file and writes the output,\n"
          "the auxiliary losses, the routing and every gradient of\n"
          "L = sum(y * dy) + loss.aux_total. Rank r takes the r-th contiguous slice of\n"
          "the tokens; any P that divides the tokens and fits the experts works. With\n"
          "--device cuda the rows, the experts, the combine and the router's GEMMs run on\n"
          "each rank's GPU (gates and routing plan on the host, as in training), so the same\n"
          "case compares the two backends. Tensor names and metadata keys: README.md,\n"
          "'Replaying one MoE layer'.",
          args, desc, nullptr, &vm))
    return *done;
  Session session(program.argc, program.argv, global);
  if (const Status nccl = session.RequireDeviceWorld(); !nccl.ok()) {
    PrintError("moerun replay-moe", nccl.message());
    return kExitUnavailable;
  }
  Communicator& world = session.world();
  StatusOr<ReplayCase> loaded = LoadCase(case_path, world.size());
  Status agreed = AgreeOnStatus(world, loaded.status());
  if (!agreed.ok()) {
    PrintError("moerun replay-moe", agreed.message());
    return kExitUsage;
  }
  ReplayCase& c = *loaded;
  const Device dev = session.device();
  c.config.device = dev;
  auto groups = MoeGroups::Create(&world, c.config.num_experts, session.device_world());
  CHECK(groups.ok()) << groups.status().message();  // checked by LoadCase
  MoeLayer layer(c.config, *groups);
  const int64_t el = (*groups)->local_experts(), e0 = (*groups)->first_local_expert();
  MoeParams& p = layer.params();
  p.router_weight.CopyFrom(c.tensors["router.weight"]);
  p.fc1_weight.CopyFrom(c.tensors["experts.fc1.weight"].Slice(0, e0, e0 + el));
  p.fc1_bias.CopyFrom(c.tensors["experts.fc1.bias"].Slice(0, e0, e0 + el));
  p.fc2_weight.CopyFrom(c.tensors["experts.fc2.weight"].Slice(0, e0, e0 + el));
  p.fc2_bias.CopyFrom(c.tensors["experts.fc2.bias"].Slice(0, e0, e0 + el));
  const int64_t t = c.tokens / world.size(), first = world.rank() * t, d = c.config.d;
  Tensor x = Rows(c.tensors["x"], first, t).To(dev), dy = Rows(c.tensors["dy"], first, t).To(dev);
  Tensor y = Tensor::Empty({t, d}, DType::kF32, dev), dx = Tensor::Empty({t, d}, DType::kF32, dev);
  Tensor noise;
  MoeForwardArgs fwd;
  fwd.training = !eval;
  fwd.first_token = first;
  fwd.noise_key = {c.seed, 0, 0};
  if (c.tensors.count("noise")) {
    noise = Rows(c.tensors["noise"], first, t);
    fwd.noise = &noise;
  }
  agreed = AgreeOnStatus(world, layer.Forward(x, fwd, &y));
  if (!agreed.ok()) {
    PrintError("moerun replay-moe", agreed.message());
    return kExitUsage;
  }
  layer.ZeroGradients();
  layer.Backward(dy, &dx);
  layer.ReduceReplicaGradients();
  MoeParams& g = layer.grads();
  // The router's gradient (on the layer's device) summed over the ranks on the host.
  Tensor router_grad = g.router_weight.To(Device::kCPU);
  world.AllReduce(router_grad.raw_data(), router_grad.numel(), DType::kF32, ReduceOp::kSum);

  // Assemble on every rank (equal slices), write on rank 0.
  SafetensorsWriter out;
  // Results to the host (after everything queued on the device) before they are gathered.
  y = y.To(Device::kCPU);
  dx = dx.To(Device::kCPU);
  out.Add("y", GatherRows(world, y));
  out.Add("grad.x", GatherRows(world, dx));
  out.Add("expert_index", GatherRows(world, layer.expert_index()));
  out.Add("slot", GatherRows(world, layer.slot()));
  out.Add("combine_weight", GatherRows(world, layer.combine_weight()));
  out.Add("grad.router.weight", router_grad);
  // Experts in rank order; with replicas the first E ranks hold experts 0..E-1.
  auto experts = [&](const Tensor& grad) {
    Tensor all = GatherRows(world, grad.To(Device::kCPU));
    return all.Slice(0, 0, c.config.num_experts).Contiguous();
  };
  out.Add("grad.experts.fc1.weight", experts(g.fc1_weight));
  out.Add("grad.experts.fc1.bias", experts(g.fc1_bias));
  out.Add("grad.experts.fc2.weight", experts(g.fc2_weight));
  out.Add("grad.experts.fc2.bias", experts(g.fc2_bias));
  const MoeLosses& l = layer.losses();
  out.Add("loss.importance", Scalar(l.value("importance")));
  out.Add("loss.load", Scalar(l.value("load")));
  out.Add("loss.gshard", Scalar(l.value("gshard")));
  out.Add("loss.aux_total", Scalar(l.aux_total));
  out.SetMetadata("ranks", std::to_string(world.size()));
  out.SetMetadata("capacity", std::to_string(layer.metrics().capacity));
  out.SetMetadata("mode", eval ? "eval" : "train");
  out.SetMetadata("device", DeviceName(dev));
  Status written = session.is_root() ? out.Write(out_path) : Status::Ok();
  written = AgreeOnStatus(world, written);
  if (!written.ok()) {
    PrintError("moerun replay-moe", written.message());
    return kExitFailure;
  }
  if (session.is_root()) {
    LOG(INFO) << "replay-moe: " << c.tokens << " tokens, E=" << c.config.num_experts
              << " K=" << c.config.k << " capacity " << layer.metrics().capacity << " on "
              << world.size() << " rank(s) (" << DeviceName(dev) << "); aux_total " << l.aux_total
              << "; wrote " << out_path;
  }
  return kExitOk;
}

}  // namespace moerun
