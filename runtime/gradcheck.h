// Finite-difference gradient checking for any layer with an explicit backward.
//
// The caller defines a scalar loss L(params) (typically sum(y * r) with a fixed random r,
// accumulated in double), runs its backward once to fill the analytic gradients, and
// hands both to CheckGradients. Each checked element is perturbed by +-eps (central
// difference) and the loss re-evaluated. Kernels are fp32, so the loss must be summed in
// double and eps chosen well above fp32 rounding (default 1e-2 relative to |x|, at least
// 1e-3): the truncation error of the central difference is O(eps^2) while a wrong
// gradient is wrong by O(1) relative, so the default tolerances separate the two.
#ifndef MOERUN_RUNTIME_GRADCHECK_H_
#define MOERUN_RUNTIME_GRADCHECK_H_

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace moerun {

struct GradCheckParam {
  std::string name;
  float* value;       // perturbed in place, restored afterwards
  const float* grad;  // analytic gradient dL/dvalue
  int64_t size;
};

struct GradCheckOptions {
  double rel_eps = 1e-2;  // step = max(abs_eps, rel_eps * |x|)
  double abs_eps = 1e-3;
  double atol = 2e-3;  // |numeric - analytic| <= atol + rtol * max(|numeric|, |analytic|)
  double rtol = 2e-2;
  int64_t max_per_param = 48;  // elements checked per parameter (random subset when larger)
  uint64_t seed = 1;
};

struct GradCheckResult {
  bool ok = true;
  int64_t checked = 0;
  int64_t failed = 0;
  double max_abs_error = 0;
  std::string worst;   // "w[17]: numeric 0.1234 analytic 0.2345"
  std::string report;  // the first failures, one per line
};

GradCheckResult CheckGradients(const std::function<double()>& loss,
                               const std::vector<GradCheckParam>& params,
                               const GradCheckOptions& options = {});

// sum_i a[i] * b[i] in double: the usual projection loss L = <y, r>.
double DotDouble(const float* a, const float* b, int64_t n);

}  // namespace moerun

#endif  // MOERUN_RUNTIME_GRADCHECK_H_
