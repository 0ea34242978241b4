// Central-difference gradient checker.
#include "runtime/gradcheck.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <sstream>

namespace moerun {

double DotDouble(const float* a, const float* b, int64_t n) {
  double s = 0.0;
  for (int64_t i = 0; i < n; ++i) s += static_cast<double>(a[i]) * b[i];
  return s;
}

GradCheckResult CheckGradients(const std::function<double()>& loss,
                               const std::vector<GradCheckParam>& params,
                               const GradCheckOptions& options) {
  GradCheckResult result;
  std::mt19937_64 rng(options.seed);
  std::ostringstream report;
  double worst_excess = -1.0;
  for (const GradCheckParam& p : params) {
    std::vector<int64_t> idx(p.size);
    std::iota(idx.begin(), idx.end(), 0);
    if (p.size > options.max_per_param) {
      std::shuffle(idx.begin(), idx.end(), rng);
      idx.resize(options.max_per_param);
    }
    for (int64_t i : idx) {
      const float x0 = p.value[i];
      const double h = std::max(options.abs_eps, options.rel_eps * std::fabs(x0));
      const float xp = static_cast<float>(x0 + h), xm = static_cast<float>(x0 - h);
      p.value[i] = xp;
      const double lp = loss();
      p.value[i] = xm;
      const double lm = loss();
      p.value[i] = x0;
      // Divide by the step actually taken in fp32, not the one asked for.
      const double numeric = (lp - lm) / (static_cast<double>(xp) - xm);
      const double analytic = p.grad[i];
      const double err = std::fabs(numeric - analytic);
      const double allowed =
          options.atol + options.rtol * std::max(std::fabs(numeric), std::fabs(analytic));
      ++result.checked;
      result.max_abs_error = std::max(result.max_abs_error, err);
      std::ostringstream line;
      line << p.name << "[" << i << "]: numeric " << numeric << " analytic " << analytic;
      if (err - allowed > worst_excess) {
        worst_excess = err - allowed;
        result.worst = line.str();
      }
      if (err > allowed) {
        result.ok = false;
        if (++result.failed <= 10) report << line.str() << "\n";
      }
    }
  }
  result.report = report.str();
  return result;
}

}  // namespace moerun
