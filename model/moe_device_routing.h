// A MoE layer's routing on its device (MoeLayerConfig::device, MoeAttentionConfig::device),
// shared by the MoE MLP layer and the mixture of attention heads:
//   - after the router's device forward (Router::ForwardOnDevice: logits, noise or the task
//     softmax), top-k, the slots per group (BPR or not) and the plan's rows run there;
//   - the router's and the plan's tables [T, E] and [T, K] start to the host in one
//     asynchronous copy, which the host waits for only once the layer has queued its rows,
//     experts and combine; then it computes the auxiliary losses and metrics while the
//     device works, and (training) sends the losses' part of d(logits) back the same way;
//   - the backward adds the combine weights' part of d(logits) through the softmax on the
//     device, with no host copy and no wait.
// Dropless (no fixed capacity), the capacity is the largest load of any group on any rank
// and sets the buffers' shapes: the host waits for the tables right after the slots, and the
// rows follow; the backward still has no wait. Padding tokens (evaluation's last batch) and
// given noise (replay) stay with RouteOnHost in moe_aux.h.
#ifndef MOERUN_MODEL_MOE_DEVICE_ROUTING_H_
#define MOERUN_MODEL_MOE_DEVICE_ROUTING_H_

#include <cstdint>

#include "comm/communicator.h"
#include "model/moe_aux.h"
#include "model/moe_plan.h"
#include "model/moe_router.h"
#include "runtime/tensor.h"

namespace moerun {

class DeviceRouting {
 public:
  // Whether a layer on `device` routes there this forward: a device (not the CPU) whose
  // ops have the routing entries, no padding tokens (`routed`) and no given noise.
  static bool Applies(Device device, const uint8_t* routed, const Tensor* noise);

  // After router->ForwardOnDevice: the plan into `device_plan` on the router's device
  // (groups of `group_size` tokens, `capacity` per expert and group; 0: dropless, the
  // largest load over `world`) and the start of the tables' copy into `plan` on the host
  // (its layout set now, its tables filled by Finish; dropless: both filled now).
  void Plan(Router* router, int k, bool bpr, int64_t group_size, int64_t capacity,
            Communicator& world, RoutingPlan* device_plan, RoutingPlan* plan);
  // Once the layer's forward is queued: waits for the tables, computes the losses and
  // metrics (collective over `world`) and, training, updates the usage statistics and
  // uploads the losses' part of d(logits) without a host wait.
  void Finish(Router* router, RoutingPlan* plan, MoeAuxLosses* aux, Communicator& world,
              bool training);
  // The router's backward on the device: d(logits) = the combine weights' part (from
  // d_weight [T, K] on the device, through the softmax) + the losses' part (uploaded by a
  // training Finish, or now); then the router weight's gradient and dx [T, D] += d(logits) W.
  void Backward(Router* router, const RoutingPlan& plan, const RoutingPlan& device_plan,
                const MoeAuxLosses& aux, const Tensor& d_weight, int world_size, Tensor* dx);

 private:
  void UploadLossGradient(Router* router, const RoutingPlan& plan, const MoeAuxLosses& aux,
                          int world_size);

  bool loss_gradient_uploaded_ = false;
  // [groups, E] loads on the device and their host copy; the losses' part of d(logits)
  // on the device, and the whole d(logits) there.
  Tensor device_load_, host_load_, dz_loss_, d_logits_;
  StagedUpload loss_upload_;  // dz_loss_'s, without a host wait
  HostCopies copies_;         // the router's and the plan's tables to the host
};

}  // namespace moerun

#endif  // MOERUN_MODEL_MOE_DEVICE_ROUTING_H_
