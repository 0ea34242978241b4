// Multi-task Fashion-MNIST: the task list, the per-example rotation (a splitmix64 hash of
// (seed, a tag, index), as dataset.cc keys its streams), the derived targets, batches, metric
// accumulators and trivial baselines.
#include "data/multitask.h"

#include <algorithm>
#include <cmath>

#include "runtime/hash.h"

namespace moerun {
namespace {

uint64_t HashCombine(uint64_t a, uint64_t b) { return SplitMix64(a ^ SplitMix64(b)); }

constexpr uint64_t kTagRotation = 0x726f'7461'7469'6f6eULL;  // "rotation"

constexpr int kCoarseOfClass[10] = {0, 1, 0, 1, 0, 2, 0, 2, 3, 2};

// The raw (un-normalised) value of a stored pixel: byte / 255 for Fashion-MNIST.
inline float Raw(float x) { return x * kFashionMnistStd + kFashionMnistMean; }

// Raw threshold: above 25 of 255, tested halfway to 26 (see kForegroundThreshold).
constexpr float kForegroundRaw = (kForegroundThreshold + 0.5f) / 255.0f;

// EdgeTarget with a caller's scratch buffer for the zero-padded raw image.
void EdgeTargetInto(const float* image, int height, int width, std::vector<float>* padded,
                    float* edges) {
  const int pw = width + 2;
  padded->assign(static_cast<size_t>(height + 2) * pw, 0.0f);
  float* p = padded->data();
  for (int y = 0; y < height; ++y) {
    const float* row = image + static_cast<int64_t>(y) * width;
    float* dst = p + static_cast<int64_t>(y + 1) * pw + 1;
    for (int x = 0; x < width; ++x) dst[x] = Raw(row[x]);
  }
  for (int y = 0; y < height; ++y) {
    // Rows y-1, y, y+1 of the image are rows y, y+1, y+2 of the padded one; column x-1 of
    // the image is column x of the padded one.
    const float* up = p + static_cast<int64_t>(y) * pw;
    const float* mid = up + pw;
    const float* down = mid + pw;
    float* out = edges + static_cast<int64_t>(y) * width;
    for (int x = 0; x < width; ++x) {
      const float gx =
          (up[x + 2] + 2.0f * mid[x + 2] + down[x + 2]) - (up[x] + 2.0f * mid[x] + down[x]);
      const float gy =
          (down[x] + 2.0f * down[x + 1] + down[x + 2]) - (up[x] + 2.0f * up[x + 1] + up[x + 2]);
      out[x] = kEdgeScale * std::sqrt(gx * gx + gy * gy);
    }
  }
}

}  // namespace

const std::vector<TaskSpec>& FashionMnistTasks() {
  static const std::vector<TaskSpec> tasks = {
      {"class", TaskKind::kClassification, 10, "accuracy", true},
      {"coarse", TaskKind::kClassification, kNumCoarseClasses, "accuracy", true},
      {"rotation", TaskKind::kClassification, 4, "accuracy", true},
      {"segmentation", TaskKind::kSegmentation, 2, "miou", true},
      {"edges", TaskKind::kRegression, 0, "l1", false},
  };
  return tasks;
}

int TaskIndex(const std::string& name) {
  const std::vector<TaskSpec>& tasks = FashionMnistTasks();
  for (size_t t = 0; t < tasks.size(); ++t) {
    if (tasks[t].name == name) return static_cast<int>(t);
  }
  return -1;
}

int CoarseClass(int fashion_class) {
  CHECK(fashion_class >= 0 && fashion_class < 10)
      << "Fashion-MNIST class " << fashion_class << " is outside 0..9";
  return kCoarseOfClass[fashion_class];
}

int ChooseRotation(uint64_t seed, int64_t index) {
  const uint64_t h = HashCombine(HashCombine(seed, kTagRotation), static_cast<uint64_t>(index));
  return static_cast<int>(h >> 62);  // the top two bits
}

void RotateCcw(const float* in, int side, int quarter_turns, float* out) {
  const int r = ((quarter_turns % 4) + 4) % 4;
  const int64_t n = side;
  for (int64_t y = 0; y < n; ++y) {
    for (int64_t x = 0; x < n; ++x) {
      int64_t sy, sx;  // the source pixel of out[y][x]
      switch (r) {
        case 0:
          sy = y, sx = x;
          break;
        case 1:
          sy = x, sx = n - 1 - y;
          break;
        case 2:
          sy = n - 1 - y, sx = n - 1 - x;
          break;
        default:
          sy = n - 1 - x, sx = y;
          break;
      }
      out[y * n + x] = in[sy * n + sx];
    }
  }
}

void SegmentationTarget(const float* image, int height, int width, uint8_t* mask) {
  const int64_t n = static_cast<int64_t>(height) * width;
  for (int64_t p = 0; p < n; ++p) mask[p] = Raw(image[p]) > kForegroundRaw ? 1 : 0;
}

void EdgeTarget(const float* image, int height, int width, float* edges) {
  std::vector<float> padded;
  EdgeTargetInto(image, height, width, &padded, edges);
}

MultiTaskDataset MakeMultiTaskDataset(const Dataset& base, uint64_t seed) {
  CHECK_EQ(base.channels, 1) << "multi-task data needs 1-channel images; " << base.name << " has "
                             << base.channels;
  CHECK(base.height == base.width && base.height > 0)
      << "multi-task data needs square images (for the rotation task); " << base.name << " is "
      << base.height << "x" << base.width;
  CHECK_EQ(base.num_classes, 10) << "multi-task data needs the 10 Fashion-MNIST classes; "
                                 << base.name << " has " << base.num_classes;
  CHECK_EQ(base.images.size(), static_cast<size_t>(base.size * base.image_numel()));
  CHECK_EQ(base.labels.size(), static_cast<size_t>(base.size));

  const std::vector<TaskSpec>& tasks = FashionMnistTasks();
  MultiTaskDataset data;
  data.seed = seed;
  data.base.size = base.size;
  data.base.channels = base.channels;
  data.base.height = base.height;
  data.base.width = base.width;
  data.base.num_classes = base.num_classes;
  data.base.background = base.background;
  data.base.name = base.name + "_multitask";
  data.base.labels = base.labels;

  const int side = base.height;
  const int64_t pixels = data.pixels();
  const size_t total = static_cast<size_t>(base.size * pixels);
  data.base.images.resize(total);
  data.segmentation.resize(total);
  data.edges.resize(total);
  data.rotation.resize(static_cast<size_t>(base.size));
  data.labels.assign(tasks.size(), {});
  std::vector<int32_t>& coarse = data.labels[kTaskCoarse];
  coarse.resize(static_cast<size_t>(base.size));

  std::vector<float> padded;
  for (int64_t i = 0; i < base.size; ++i) {
    const int label = base.labels[i];
    CHECK(label >= 0 && label < 10) << base.name << ": label " << label << " at index " << i;
    coarse[i] = kCoarseOfClass[label];
    const int r = ChooseRotation(seed, i);
    data.rotation[i] = r;
    float* image = data.base.images.data() + i * pixels;
    RotateCcw(base.images.data() + i * pixels, side, r, image);
    SegmentationTarget(image, side, side, data.segmentation.data() + i * pixels);
    EdgeTargetInto(image, side, side, &padded, data.edges.data() + i * pixels);
  }
  data.labels[kTaskClass] = base.labels;
  data.labels[kTaskRotation] = data.rotation;
  return data;
}

void GatherMultiTaskBatch(const MultiTaskDataset& data, const std::vector<int64_t>& indices,
                          float* images, const std::vector<int32_t*>& class_labels, int32_t* seg,
                          float* edges) {
  const std::vector<TaskSpec>& tasks = FashionMnistTasks();
  CHECK_LE(class_labels.size(), tasks.size()) << "more label outputs than tasks";
  for (size_t t = 0; t < class_labels.size(); ++t) {
    CHECK(class_labels[t] == nullptr || !tasks[t].dense())
        << "task " << t << " (" << tasks[t].name << ") has no per-example labels";
  }
  const int64_t numel = data.base.image_numel();
  const int64_t pixels = data.pixels();
  for (size_t j = 0; j < indices.size(); ++j) {
    const int64_t i = indices[j];
    CHECK(i >= 0 && i < data.size()) << "index " << i << " outside dataset " << data.base.name
                                     << " of " << data.size() << " examples";
    if (images != nullptr) {
      std::copy_n(data.base.images.data() + i * numel, numel, images + j * numel);
    }
    for (size_t t = 0; t < class_labels.size(); ++t) {
      if (class_labels[t] != nullptr) class_labels[t][j] = data.labels[t][i];
    }
    if (seg != nullptr) {
      const uint8_t* src = data.segmentation.data() + i * pixels;
      int32_t* dst = seg + j * pixels;
      for (int64_t p = 0; p < pixels; ++p) dst[p] = src[p];
    }
    if (edges != nullptr) {
      std::copy_n(data.edges.data() + i * pixels, pixels, edges + j * pixels);
    }
  }
}

// --- Metrics ------------------------------------------------------------------------------

void AccuracyMetric::Add(const int32_t* pred, const int32_t* target, int64_t n) {
  int64_t correct = 0;
  for (int64_t i = 0; i < n; ++i) correct += pred[i] == target[i];
  counts[0] += static_cast<double>(correct);
  counts[1] += static_cast<double>(n);
}

void AccuracyMetric::Merge(const AccuracyMetric& other) {
  for (int k = 0; k < 2; ++k) counts[k] += other.counts[k];
}

double AccuracyMetric::Accuracy() const { return counts[1] > 0 ? counts[0] / counts[1] : 0.0; }

SegmentationMetric::SegmentationMetric(int num_classes)
    : num_classes_(num_classes), counts_(2 * static_cast<size_t>(num_classes), 0.0) {
  CHECK_GT(num_classes, 0);
}

void SegmentationMetric::Add(const int32_t* pred, const int32_t* target, int64_t n) {
  // Per (target, prediction) pair counts: intersection_c = m[c][c], union_c = row c + column
  // c - m[c][c].
  const int k = num_classes_;
  std::vector<int64_t> m(static_cast<size_t>(k) * k, 0);
  for (int64_t i = 0; i < n; ++i) {
    const int32_t p = pred[i], t = target[i];
    CHECK(p >= 0 && p < k && t >= 0 && t < k) << "segmentation prediction " << p << " / target "
                                              << t << " at " << i << " is outside 0.." << k - 1;
    ++m[static_cast<size_t>(t) * k + p];
  }
  for (int c = 0; c < k; ++c) {
    int64_t row = 0, col = 0;
    for (int o = 0; o < k; ++o) {
      row += m[static_cast<size_t>(c) * k + o];
      col += m[static_cast<size_t>(o) * k + c];
    }
    const int64_t inter = m[static_cast<size_t>(c) * k + c];
    counts_[c] += static_cast<double>(inter);
    counts_[k + c] += static_cast<double>(row + col - inter);
  }
}

void SegmentationMetric::Merge(const SegmentationMetric& other) {
  CHECK_EQ(num_classes_, other.num_classes_);
  for (size_t i = 0; i < counts_.size(); ++i) counts_[i] += other.counts_[i];
}

double SegmentationMetric::IoU(int c) const {
  CHECK(c >= 0 && c < num_classes_);
  return union_count(c) > 0 ? intersection(c) / union_count(c) : 0.0;
}

double SegmentationMetric::MeanIoU() const {
  double sum = 0.0;
  int present = 0;
  for (int c = 0; c < num_classes_; ++c) {
    if (union_count(c) > 0) {
      sum += IoU(c);
      ++present;
    }
  }
  return present > 0 ? sum / present : 0.0;
}

void L1Metric::Add(const float* pred, const float* target, int64_t n) {
  double sum = 0.0;
  for (int64_t i = 0; i < n; ++i) sum += std::fabs(static_cast<double>(pred[i]) - target[i]);
  counts[0] += sum;
  counts[1] += static_cast<double>(n);
}

void L1Metric::Merge(const L1Metric& other) {
  for (int k = 0; k < 2; ++k) counts[k] += other.counts[k];
}

double L1Metric::MeanAbsoluteError() const { return counts[1] > 0 ? counts[0] / counts[1] : 0.0; }

// --- Baselines ----------------------------------------------------------------------------

namespace {

// The metric of predicting class `c` at every pixel of a set with `foreground` of `total`
// pixels foreground: intersection_c = pixels of class c, union_c = all pixels; the other
// class has intersection 0 and union its own pixels.
SegmentationMetric ConstantMaskMetric(int64_t foreground, int64_t total, int c) {
  SegmentationMetric metric(2);
  const double of_class[2] = {static_cast<double>(total - foreground),
                              static_cast<double>(foreground)};
  double* counts = metric.counts();
  counts[c] = of_class[c];
  counts[2 + c] = static_cast<double>(total);
  counts[2 + (1 - c)] = of_class[1 - c];
  return metric;
}

int64_t CountForeground(const MultiTaskDataset& d) {
  int64_t n = 0;
  for (uint8_t v : d.segmentation) n += v;
  return n;
}

}  // namespace

TaskBaselines ComputeBaselines(const MultiTaskDataset& train, const MultiTaskDataset& eval) {
  CHECK(train.base.channels == eval.base.channels && train.base.height == eval.base.height &&
        train.base.width == eval.base.width)
      << "baselines need the same image shape: " << train.base.name << " and " << eval.base.name;
  const std::vector<TaskSpec>& tasks = FashionMnistTasks();
  TaskBaselines out;
  out.value.assign(tasks.size(), 0.0);
  out.description.assign(tasks.size(), "");
  for (size_t t = 0; t < tasks.size(); ++t) {
    const TaskSpec& task = tasks[t];
    if (task.kind == TaskKind::kClassification) {
      std::vector<int64_t> count(task.num_classes, 0);
      for (int32_t label : train.labels[t]) ++count[label];
      const int majority =
          static_cast<int>(std::max_element(count.begin(), count.end()) - count.begin());
      const int64_t hits = std::count(eval.labels[t].begin(), eval.labels[t].end(), majority);
      out.value[t] = eval.size() > 0 ? static_cast<double>(hits) / eval.size() : 0.0;
      out.description[t] = "majority label " + std::to_string(majority);
    } else if (task.kind == TaskKind::kSegmentation) {
      const int64_t train_fg = CountForeground(train);
      const int64_t train_total = static_cast<int64_t>(train.segmentation.size());
      const int best = ConstantMaskMetric(train_fg, train_total, 1).MeanIoU() >
                               ConstantMaskMetric(train_fg, train_total, 0).MeanIoU()
                           ? 1
                           : 0;
      out.value[t] = ConstantMaskMetric(CountForeground(eval),
                                        static_cast<int64_t>(eval.segmentation.size()), best)
                         .MeanIoU();
      out.description[t] = best == 1 ? "constant foreground" : "constant background";
    } else {
      const int64_t pixels = train.pixels();
      std::vector<double> sum(static_cast<size_t>(pixels), 0.0);
      for (int64_t i = 0; i < train.size(); ++i) {
        const float* e = train.edges.data() + i * pixels;
        for (int64_t p = 0; p < pixels; ++p) sum[p] += e[p];
      }
      std::vector<float> mean(static_cast<size_t>(pixels), 0.0f);
      if (train.size() > 0) {
        for (int64_t p = 0; p < pixels; ++p) mean[p] = static_cast<float>(sum[p] / train.size());
      }
      L1Metric l1;
      for (int64_t i = 0; i < eval.size(); ++i) {
        l1.Add(mean.data(), eval.edges.data() + i * pixels, pixels);
      }
      out.value[t] = l1.MeanAbsoluteError();
      out.description[t] = "per-pixel mean edge image";
    }
  }
  return out;
}

}  // namespace moerun
