// Multi-task Fashion-MNIST for Mod-Squad style multi-task training: every image is labelled
// for every task (as in Taskonomy), with all targets derived deterministically at load time
// from the image and its class. The tasks, in this fixed order (task id = index):
//
//   0 "class"         classification, 10 classes: the Fashion-MNIST class.
//   1 "coarse"        classification, 4 classes: CoarseClass() of the Fashion-MNIST class.
//   2 "rotation"      classification, 4 classes: r, the number of 90-degree counter-clockwise
//                     turns the example's image was stored rotated by (ChooseRotation()).
//   3 "segmentation"  dense, 2 classes per pixel: 1 (foreground) where the raw pixel value is
//                     above kForegroundThreshold (25 of 255), else 0 (background). Metric mIoU.
//   4 "edges"         dense regression per pixel: the Sobel gradient magnitude of the raw
//                     [0, 1] image divided by 4 (kEdgeScale), in [0, sqrt(2)]. Metric and loss
//                     L1 (mean absolute error per pixel).
//
// The input is shared by all tasks: the image every task sees is the rotated one, and the
// segmentation and edge targets are computed from that rotated image. "Raw" means the pixel
// before normalisation, x * kFashionMnistStd + kFashionMnistMean for a stored (normalised)
// value x, i.e. the byte value / 255 for Fashion-MNIST.
//
// Note: Augment() (dataset.h) moves pixels without moving the dense targets or correcting the
// rotation label (a mirror turns r into -r); do not apply it to multi-task batches.
#ifndef MOERUN_DATA_MULTITASK_H_
#define MOERUN_DATA_MULTITASK_H_

#include <cstdint>
#include <string>
#include <vector>

#include "data/dataset.h"

namespace moerun {

enum class TaskKind {
  kClassification,  // one label per example
  kSegmentation,    // one class per pixel
  kRegression,      // one real value per pixel
};

struct TaskSpec {
  std::string name;
  TaskKind kind = TaskKind::kClassification;
  int num_classes = 0;           // classification and segmentation; 0 for regression
  std::string metric;            // "accuracy", "miou" or "l1"
  bool higher_is_better = true;  // false for "l1"
  bool dense() const { return kind != TaskKind::kClassification; }
};

// Task ids, the indices into FashionMnistTasks().
enum FashionMnistTask : int {
  kTaskClass = 0,
  kTaskCoarse = 1,
  kTaskRotation = 2,
  kTaskSegmentation = 3,
  kTaskEdges = 4,
  kNumFashionMnistTasks = 5,
};

// The five tasks above, in task-id order.
const std::vector<TaskSpec>& FashionMnistTasks();
// The id of the task called `name`, or -1 when there is none; TaskIndex("edges") == 4.
int TaskIndex(const std::string& name);

// The coarse class of a Fashion-MNIST class (0..9):
//   0 upper body:          0 T-shirt/top, 2 Pullover, 4 Coat, 6 Shirt
//   1 lower or full body:  1 Trouser, 3 Dress
//   2 footwear:            5 Sandal, 7 Sneaker, 9 Ankle boot
//   3 bag:                 8 Bag
// CHECKs 0 <= fashion_class < 10.
constexpr int kNumCoarseClasses = 4;
int CoarseClass(int fashion_class);

// A pixel is foreground when its raw byte value is above this (of 255). On stored floats the
// test is raw * 255 > kForegroundThreshold + 0.5, so that float round-off of the
// normalisation cannot move a pixel of exactly 25 or 26 across the threshold.
constexpr int kForegroundThreshold = 25;
// The Sobel magnitude is multiplied by this; the largest possible target is sqrt(2).
constexpr float kEdgeScale = 0.25f;

// The number of 90-degree counter-clockwise turns (0..3) of dataset example `index`: a pure
// function of (seed, index), uniform over 0..3.
int ChooseRotation(uint64_t seed, int64_t index);

// Rotates a side x side image (row-major) counter-clockwise by quarter_turns * 90 degrees
// (any integer; taken mod 4) into `out`, which must not overlap `in`. One turn maps
// out[y][x] = in[x][side - 1 - y] (numpy.rot90's convention): the top-right pixel becomes
// the top-left one. The pixels are permuted exactly, so a normalised image stays normalised.
void RotateCcw(const float* in, int side, int quarter_turns, float* out);

// The segmentation target of one normalised height x width image: 1 where the raw pixel is
// foreground (see kForegroundThreshold), else 0.
void SegmentationTarget(const float* image, int height, int width, uint8_t* mask);

// The edge target of one normalised height x width image: kEdgeScale * sqrt(gx^2 + gy^2) per
// pixel, where gx and gy are the 3x3 Sobel responses of the raw image
//   gx = [-1 0 1; -2 0 2; -1 0 1] (x to the right),  gy = [-1 -2 -1; 0 0 0; 1 2 1] (y down),
// with raw value 0 outside the image (zero padding).
void EdgeTarget(const float* image, int height, int width, float* edges);

// A dataset with every task's targets.
struct MultiTaskDataset {
  // The rotated, normalised images; labels are task 0's (the Fashion-MNIST class); the name
  // is the source's with "_multitask" appended. Everything else is copied from the source.
  Dataset base;
  uint64_t seed = 0;  // of the rotations
  // [task][example] for the classification tasks; empty for the dense tasks.
  std::vector<std::vector<int32_t>> labels;
  std::vector<uint8_t> segmentation;  // [example, H * W], 0 or 1
  std::vector<float> edges;           // [example, H * W]
  std::vector<int32_t> rotation;      // [example], the same as labels[kTaskRotation]

  int64_t size() const { return base.size; }
  int64_t pixels() const { return static_cast<int64_t>(base.height) * base.width; }
};

// Derives all tasks from a loaded (un-rotated) Fashion-MNIST dataset, or any dataset of
// 1-channel square images with 10 classes (e.g. MakeSyntheticDataset(seed, n, 1, 28, 28,
// 10)): example i is stored rotated by ChooseRotation(seed, i). Examples depend only on
// (seed, source example), so train and eval sets may share a seed. CHECKs channels == 1,
// height == width > 0 and num_classes == 10.
MultiTaskDataset MakeMultiTaskDataset(const Dataset& base, uint64_t seed);

// Copies examples indices[0..n) into images [n, C, H, W]; class_labels[t] (when non-null)
// [n] for classification task t; seg [n, H * W] (0 or 1, as int32); edges [n, H * W]. Any
// output may be null to skip it, and class_labels may be shorter than the task list. CHECKs
// every index is in range, class_labels has at most kNumFashionMnistTasks entries and no
// non-null entry belongs to a dense task.
void GatherMultiTaskBatch(const MultiTaskDataset& data, const std::vector<int64_t>& indices,
                          float* images, const std::vector<int32_t*>& class_labels, int32_t* seg,
                          float* edges);

// --- Metric accumulators ------------------------------------------------------------------
// Each keeps its sums in a double array (counts()) so ranks can sum them with one allreduce
// (exact for counts below 2^53) and then read the metric; Merge() adds another accumulator.

// Classification accuracy: counts = {correct, total}.
struct AccuracyMetric {
  double counts[2] = {0.0, 0.0};

  void Add(const int32_t* pred, const int32_t* target, int64_t n);
  void Merge(const AccuracyMetric& other);
  double Accuracy() const;  // 0 when nothing was added
};

// Per-class intersection over union: counts = {intersection_0 .. intersection_{K-1},
// union_0 .. union_{K-1}}, in pixels. The mean IoU averages over the classes whose union is
// not empty.
class SegmentationMetric {
 public:
  explicit SegmentationMetric(int num_classes = 2);

  // CHECKs every prediction and target is in [0, num_classes).
  void Add(const int32_t* pred, const int32_t* target, int64_t n);
  void Merge(const SegmentationMetric& other);

  int num_classes() const { return num_classes_; }
  double intersection(int c) const { return counts_[c]; }
  double union_count(int c) const { return counts_[num_classes_ + c]; }
  double IoU(int c) const;  // 0 when the class's union is empty
  double MeanIoU() const;   // 0 when every union is empty

  // The 2 * num_classes sums, for summing over ranks in place.
  double* counts() { return counts_.data(); }
  const double* counts() const { return counts_.data(); }
  int num_counts() const { return static_cast<int>(counts_.size()); }

 private:
  int num_classes_;
  std::vector<double> counts_;
};

// Mean absolute error: counts = {sum of |pred - target|, number of values}.
struct L1Metric {
  double counts[2] = {0.0, 0.0};

  void Add(const float* pred, const float* target, int64_t n);
  void Merge(const L1Metric& other);
  double MeanAbsoluteError() const;  // 0 when nothing was added
};

// --- Trivial baselines --------------------------------------------------------------------

// What a model must beat, per task (indexed by task id), of predictors fit on `train` and
// scored on `eval`:
//   classification: accuracy of always predicting train's most frequent label (the lowest
//                   such label on ties);
//   segmentation:   mIoU of the constant mask (all background or all foreground) with the
//                   higher mIoU on train;
//   edges:          L1 of predicting train's per-pixel mean edge image.
// CHECKs both datasets have the same image shape.
struct TaskBaselines {
  std::vector<double> value;             // the metric, per task
  std::vector<std::string> description;  // the predictor, e.g. "majority label 0"
};
TaskBaselines ComputeBaselines(const MultiTaskDataset& train, const MultiTaskDataset& eval);

}  // namespace moerun

#endif  // MOERUN_DATA_MULTITASK_H_
