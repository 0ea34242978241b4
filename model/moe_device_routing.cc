// A MoE layer's routing on its device.
#include "model/moe_device_routing.h"

#include <vector>

#include "model/moe_dispatch.h"
#include "model/ops.h"

namespace moerun {

bool DeviceRouting::Applies(Device device, const uint8_t* routed, const Tensor* noise) {
  if (device == Device::kCPU) return false;
  if (routed != nullptr || noise != nullptr) return false;
  const OpsTable& ops = Ops(device);
  return ops.top_k != nullptr && ops.add_router_noise != nullptr && ops.assign_slots != nullptr &&
         ops.plan_rows != nullptr && ops.router_logits_backward != nullptr &&
         ops.add_bias != nullptr;
}

void DeviceRouting::Plan(Router* router, int k, bool bpr, int64_t group_size, int64_t capacity,
                         Communicator& world, RoutingPlan* device_plan, RoutingPlan* plan) {
  const Tensor& gates = router->device_gates();
  const Device dev = gates.device();
  const OpsTable& ops = Ops(dev);
  const int64_t t = gates.dim(0), e_count = gates.dim(1), kk = k;
  const int e = static_cast<int>(e_count);
  RoutingPlan& p = *device_plan;
  SetPlanLayout(&p, t, kk, e_count, group_size, capacity);
  SetPlanLayout(plan, t, kk, e_count, group_size, capacity);
  p.routed = plan->routed = nullptr;
  p.load.clear();
  EnsureTensor(&p.expert_index, {t, kk}, DType::kI32, dev);
  EnsureTensor(&p.slot, {t, kk}, DType::kI32, dev);
  EnsureTensor(&p.weight, {t, kk}, DType::kF32, dev);
  EnsureTensor(&p.row, {t, kk}, DType::kI32, dev);
  EnsureTensor(&device_load_, {p.groups, e_count}, DType::kI32, dev);
  int32_t* idx = p.expert_index.device_data<int32_t>(dev);
  int32_t* slot = p.slot.device_data<int32_t>(dev);
  float* w = p.weight.device_data<float>(dev);
  int32_t* load = device_load_.device_data<int32_t>(dev);
  MOERUN_OP(ops, top_k)(gates.device_data<float>(dev), t, e, k, idx, w);
  MOERUN_OP(ops, assign_slots)(idx, w, t, group_size, e, k, bpr, slot, load);  // every group
  const bool dropless = capacity <= 0;
  if (!dropless) {
    MOERUN_OP(ops, plan_rows)
    (idx, slot, t, kk, group_size, capacity, p.rows_per_expert(), p.row.device_data<int32_t>(dev));
  }
  // The tables to the host in one copy, for the losses, which Finish computes once the
  // layer's work is queued (dropless: and for the capacity, at once).
  EnsureTensor(&plan->expert_index, {t, kk}, DType::kI32);
  EnsureTensor(&plan->slot, {t, kk}, DType::kI32);
  EnsureTensor(&plan->weight, {t, kk}, DType::kF32);
  EnsureTensor(&plan->row, {t, kk}, DType::kI32);
  EnsureTensor(&host_load_, {p.groups, e_count}, DType::kI32);
  std::vector<const Tensor*> src;
  std::vector<Tensor*> dst;
  router->HostCopies(&src, &dst);
  src.insert(src.end(), {&p.expert_index, &p.slot, &p.weight, &device_load_});
  dst.insert(dst.end(), {&plan->expert_index, &plan->slot, &plan->weight, &host_load_});
  if (!dropless) {
    src.push_back(&p.row);
    dst.push_back(&plan->row);
  }
  copies_.Start(src, dst);
  loss_gradient_uploaded_ = false;
  if (!dropless) return;
  // Dropless: the capacity is the largest per-expert load of any group on any rank, and it
  // sets the buffers' shapes: the host waits for the tables here, then the rows are made on
  // both sides (the same integer formula).
  copies_.Finish();
  capacity = DroplessCapacity(host_load_.data<int32_t>(), host_load_.numel(), world);
  p.capacity = plan->capacity = capacity;
  MOERUN_OP(ops, plan_rows)
  (idx, slot, t, kk, group_size, capacity, p.rows_per_expert(), p.row.device_data<int32_t>(dev));
  PlanRows(plan->expert_index.data<int32_t>(), plan->slot.data<int32_t>(), t, kk, group_size,
           capacity, plan->rows_per_expert(), plan->row.data<int32_t>());
}

void DeviceRouting::Finish(Router* router, RoutingPlan* plan, MoeAuxLosses* aux,
                           Communicator& world, bool training) {
  if (copies_.started()) copies_.Finish();  // the routing's tables, long on the host by now
  const int32_t* load = host_load_.data<int32_t>();
  plan->load.assign(load, load + host_load_.numel());
  aux->Compute(*router, *plan, world);
  if (!training) return;
  aux->UpdateUsage();
  UploadLossGradient(router, *plan, *aux, world.size());
}

void DeviceRouting::UploadLossGradient(Router* router, const RoutingPlan& plan,
                                       const MoeAuxLosses& aux, int world_size) {
  aux.LossLogitGradient(router, plan, world_size);
  const Tensor& host = router->d_logits();
  EnsureTensor(&dz_loss_, host.shape(), DType::kF32, router->weight().device());
  loss_upload_.Copy(host, &dz_loss_);  // no host wait
  loss_gradient_uploaded_ = true;
}

void DeviceRouting::Backward(Router* router, const RoutingPlan& plan,
                             const RoutingPlan& device_plan, const MoeAuxLosses& aux,
                             const Tensor& d_weight, int world_size, Tensor* dx) {
  // After a forward that was not training, the losses' part now.
  if (!loss_gradient_uploaded_) UploadLossGradient(router, plan, aux, world_size);
  const Device dev = dx->device();
  const int64_t t = plan.tokens;
  EnsureTensor(&d_logits_, dz_loss_.shape(), DType::kF32, dev);
  MOERUN_OP(Ops(dev), router_logits_backward)
  (router->device_choice_softmax().device_data<float>(dev),
   device_plan.expert_index.device_data<int32_t>(dev), device_plan.row.device_data<int32_t>(dev),
   d_weight.device_data<float>(dev), dz_loss_.device_data<float>(dev),
   d_logits_.device_data<float>(dev), t, static_cast<int>(plan.num_experts),
   static_cast<int>(plan.k));
  router->DeviceLogitsToInputs(d_logits_, dx->device_data<float>(dev));
}

}  // namespace moerun
