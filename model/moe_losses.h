// Auxiliary losses of the V-MoE router for one group of S tokens over E experts
// (shared/specs/vmoe-routing.md), each with its gradient. Every function returns the
// group's loss and, when `grad` is not null, adds scale * dLoss/dInput to it (so callers
// pass scale = weight / number of groups and accumulate all terms into one buffer).
#ifndef MOERUN_MODEL_MOE_LOSSES_H_
#define MOERUN_MODEL_MOE_LOSSES_H_

#include <cstdint>
#include <vector>

namespace moerun {

// (std(imp) / mean(imp))^2, imp[e] = sum_s p[s,e], p the clean softmax. grad: d/dp.
double ImportanceLoss(const float* p, int64_t tokens, int num_experts, float* grad, double scale);

// E^2 * mean_e(mean_s onehot(argmax_e p)[s,e] * mean_s p[s,e]); the argmax (ties to the
// lower index) carries no gradient. grad: d/dp.
double GShardLoss(const float* p, int64_t tokens, int num_experts, float* grad, double scale);

// (std(load) / mean(load))^2 with load[e] = mean_s (1 - Phi((tau_s - z[s,e]) / sigma)),
// tau_s the noisy logit of the expert ranked k-th by the noisy logits. z are the clean
// logits, z_noisy = z + noise. grad: d/dz through both z and tau (tau = z[s,e*] + noise).
double LoadLoss(const float* z, const float* z_noisy, int64_t tokens, int num_experts, int k,
                double sigma, float* grad, double scale);
// LoadLoss in two halves, for a caller that reports the loss in the forward and adds its
// gradient in the backward without evaluating it twice: the value, with what the gradient
// needs (each token's k-th expert and dLoss/dload), then the gradient from those. Bit for
// bit LoadLoss.
struct LoadLossState {
  double loss = 0;
  std::vector<int32_t> kth;   // [tokens]
  std::vector<double> dload;  // [num_experts]
};
void LoadLossForward(const float* z, const float* z_noisy, int64_t tokens, int num_experts, int k,
                     double sigma, LoadLossState* state);
void LoadLossBackward(const LoadLossState& state, const float* z, const float* z_noisy,
                      int64_t tokens, int num_experts, double sigma, float* grad, double scale);

// Router z-loss (ST-MoE): mean_s logsumexp(z[s,:])^2 on the clean logits. grad: d/dz.
double ZLoss(const float* z, int64_t tokens, int num_experts, float* grad, double scale);

// Mod-Squad's mutual-information loss of one MoE layer over one step
// (shared/specs/modsquad.md): a[t, e] = sum of the gates p[s, e] (softmax + 1e-4) over task
// t's tokens, count[e] = selections of expert e (k per token), over all tasks:
//   N = sum_e count[e] / k,  P(t,e) = a[t,e] / (N + 1e-4),  P(t) = sum_e P(t,e) + 1e-4,
//   P(e) = sum_t P(t,e) + 1e-4,  L = -sum_{t,e} P(t,e) log(P(t,e) / (P(t) P(e)) + 1e-4).
// Double precision throughout. When `grad_a` is not null, writes dL/da[t, e] ([tasks, E];
// count carries no gradient).
double MutualInformationLoss(const double* a, const double* count, int tasks, int num_experts,
                             int k, double* grad_a);

}  // namespace moerun

#endif  // MOERUN_MODEL_MOE_LOSSES_H_
