// The dispatch points of moe_ops.h and the CPU table.
#include "model/moe_ops.h"

#include <glog/logging.h>

#include <array>
#include <cstring>
#include <initializer_list>

#include "model/moe_dispatch.h"

namespace moerun {
namespace {

void CpuPackRows(const int32_t* row, const float* x, int64_t tokens, int64_t k, int64_t w,
                 float* buf, int64_t buf_rows) {
  std::memset(buf, 0, buf_rows * w * sizeof(float));
#pragma omp parallel for schedule(static)
  for (int64_t tok = 0; tok < tokens; ++tok) {
    for (int64_t j = 0; j < k; ++j) {
      const int32_t r = row[tok * k + j];
      if (r >= 0) std::memcpy(buf + static_cast<int64_t>(r) * w, x + tok * w, w * sizeof(float));
    }
  }
}

void CpuCombineRowsBackward(const float* buf, const int32_t* row, const float* weight,
                            const float* dy, int64_t tokens, int64_t k, int64_t w, float* d_buf,
                            int64_t buf_rows, float* d_weight) {
  Tensor view = Tensor::Wrap(d_buf, {buf_rows, w}, DType::kF32);
  GatherKeptRowsBackward(buf, row, weight, dy, tokens, k, w, &view, d_weight);
}

const MoeOpsTable kCpuOps = {"cpu", &CpuPackRows, &GatherKeptRows, &CpuCombineRowsBackward,
                             &AdamWUpdate};

std::array<const MoeOpsTable*, 2>& Tables() {
  static std::array<const MoeOpsTable*, 2> tables = {&kCpuOps, nullptr};
  return tables;
}

// The one device of an op's tensors (undefined ones skipped); dies naming a mismatch.
Device OneDevice(const char* op, std::initializer_list<const Tensor*> tensors) {
  const Tensor* first = nullptr;
  for (const Tensor* t : tensors) {
    if (t == nullptr || !t->defined()) continue;
    if (first == nullptr) {
      first = t;
    } else {
      CHECK(t->device() == first->device())
          << "ops::" << op << ": operands on different devices: " << first->ShapeString() << " ("
          << DeviceName(first->device()) << ") and " << t->ShapeString() << " ("
          << DeviceName(t->device()) << "); copy them to one device with To()";
    }
  }
  CHECK(first != nullptr) << "ops::" << op << " without tensors";
  return first->device();
}

// The implementation `entry` of `device`'s table; dies naming what is missing.
template <typename Fn>
Fn Impl(const char* op, Device device, Fn MoeOpsTable::*entry) {
  const MoeOpsTable* table = MoeOpsFor(device);
  CHECK(table != nullptr) << "ops::" << op << ": no " << DeviceName(device)
                          << " implementations are registered in this process (run with "
                             "--device "
                          << DeviceName(device) << " in a build with its kernels)";
  CHECK(table->*entry != nullptr) << "ops::" << op << " is not implemented on " << table->name
                                  << " yet";
  return table->*entry;
}

void EnsureOn(Tensor* t, const Shape& shape, Device device) {
  if (!t->defined() || t->shape() != shape || t->dtype() != DType::kF32 || t->device() != device) {
    *t = Tensor::Empty(shape, DType::kF32, device);
  }
}

}  // namespace

void RegisterMoeOps(Device device, const MoeOpsTable* table) {
  Tables()[static_cast<size_t>(device)] = table;
}

const MoeOpsTable* MoeOpsFor(Device device) { return Tables()[static_cast<size_t>(device)]; }

namespace ops {

void PackRows(const RoutingPlan& plan, const Tensor& x, Tensor* buf) {
  const Tensor& row = plan.row;
  const Device device = OneDevice("PackRows", {&row, &x});
  const int64_t w = x.dim(1), rows = plan.num_experts * plan.rows_per_expert();
  MOERUN_CHECK_SHAPE(row, {plan.tokens, plan.k});
  EnsureOn(buf, {plan.num_experts, plan.rows_per_expert(), w}, device);
  Impl("PackRows", device, &MoeOpsTable::pack_rows)(
      row.device_data<int32_t>(device), x.device_data<float>(device), plan.tokens, plan.k, w,
      buf->device_data<float>(device), rows);
}

void CombineRows(const Tensor& buf, const Tensor& row, const Tensor& weight, Tensor* out) {
  const Device device = OneDevice("CombineRows", {&buf, &row, &weight, out});
  const int64_t tokens = row.dim(0), k = row.dim(1), w = buf.dim(-1);
  MOERUN_CHECK_SHAPE(*out, {tokens, w});
  Impl("CombineRows", device, &MoeOpsTable::combine_rows)(
      buf.device_data<float>(device), row.device_data<int32_t>(device),
      weight.defined() ? weight.device_data<float>(device) : nullptr, tokens, k, w,
      out->device_data<float>(device));
}

void CombineRowsBackward(const Tensor& buf, const Tensor& row, const Tensor& weight,
                         const Tensor& dy, Tensor* d_buf, Tensor* d_weight) {
  const Device device = OneDevice("CombineRowsBackward", {&buf, &row, &weight, &dy});
  const int64_t tokens = row.dim(0), k = row.dim(1), w = buf.dim(-1);
  MOERUN_CHECK_SHAPE(dy, {tokens, w});
  EnsureOn(d_buf, buf.shape(), device);
  EnsureOn(d_weight, {tokens, k}, device);
  Impl("CombineRowsBackward", device, &MoeOpsTable::combine_rows_backward)(
      buf.device_data<float>(device), row.device_data<int32_t>(device),
      weight.device_data<float>(device), dy.device_data<float>(device), tokens, k, w,
      d_buf->device_data<float>(device), buf.numel() / w, d_weight->device_data<float>(device));
}

void AdamWStep(const AdamWScalars& s, bool decay, const Tensor& value, const Tensor& grad,
               const Tensor& m, const Tensor& v) {
  const Device device = OneDevice("AdamWStep", {&value, &grad, &m, &v});
  CHECK(m.dtype() == v.dtype() && (m.dtype() == DType::kF32 || m.dtype() == DType::kBF16))
      << "ops::AdamWStep: moments must both be F32 or BF16, got " << m.ShapeString() << " and "
      << v.ShapeString();
  CHECK(grad.numel() == value.numel() && m.numel() == value.numel() && v.numel() == value.numel())
      << "ops::AdamWStep: sizes differ";
  Impl("AdamWStep", device, &MoeOpsTable::adamw_step)(
      s, decay, value.device_data<float>(device), grad.device_data<float>(device), m.raw_data(),
      v.raw_data(), value.numel(), m.dtype() == DType::kBF16);
}

}  // namespace ops
}  // namespace moerun
