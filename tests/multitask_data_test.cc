// Multi-task Fashion-MNIST: the task list and coarse mapping, the rotation (a hand-written
// grid, determinism and uniformity), the segmentation threshold and Sobel targets on
// hand-made images (expected values worked out by hand here), targets computed from the
// rotated image, batches, metric accumulators, and baselines on a hand-made set and on the
// real dataset (skipped when it is not installed).
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <iostream>
#include <string>
#include <vector>

#include "data/dataset.h"
#include "data/multitask.h"

namespace moerun {
namespace {

constexpr char kRealDir[] = "/usr/share/datasets/fashion-mnist";

// A byte pixel as LoadFashionMnist stores it.
float Normalise(int byte) {
  return (static_cast<float>(byte) / 255.0f - kFashionMnistMean) / kFashionMnistStd;
}

std::vector<float> NormaliseAll(const std::vector<int>& bytes) {
  std::vector<float> out;
  for (int b : bytes) out.push_back(Normalise(b));
  return out;
}

// A 1-channel side x side dataset with 10 classes from byte images.
Dataset MakeTiny(int side, const std::vector<std::vector<int>>& images,
                 const std::vector<int32_t>& labels) {
  Dataset d;
  d.size = static_cast<int64_t>(images.size());
  d.channels = 1;
  d.height = d.width = side;
  d.num_classes = 10;
  d.name = "tiny";
  d.background = Normalise(0);
  for (const auto& image : images) {
    const std::vector<float> n = NormaliseAll(image);
    d.images.insert(d.images.end(), n.begin(), n.end());
  }
  d.labels = labels;
  return d;
}

// The test's own rotation: one CCW turn moves pixel (row a, column b) to (side-1-b, a).
template <typename T>
std::vector<T> TurnCcw(const std::vector<T>& in, int side, int turns) {
  std::vector<T> cur = in;
  for (int t = 0; t < turns; ++t) {
    std::vector<T> next(cur.size());
    for (int a = 0; a < side; ++a) {
      for (int b = 0; b < side; ++b) next[(side - 1 - b) * side + a] = cur[a * side + b];
    }
    cur = next;
  }
  return cur;
}

// 4x4 bytes: a vertical step (columns 2-3 white) over rows 0-2, row 3 grey (51 = 0.2 raw).
const std::vector<int> kStep = {0,  0,  255, 255,  //
                                0,  0,  255, 255,  //
                                0,  0,  255, 255,  //
                                51, 51, 51,  51};
// Its foreground (> 25 of 255).
const std::vector<uint8_t> kStepMask = {0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 1, 1, 1, 1, 1, 1};

// --- Tasks --------------------------------------------------------------------------------

TEST(MultiTaskTasksTest, ListAndIndex) {
  const std::vector<TaskSpec>& tasks = FashionMnistTasks();
  ASSERT_EQ(tasks.size(), size_t{5});
  const std::vector<std::string> names = {"class", "coarse", "rotation", "segmentation", "edges"};
  for (int t = 0; t < 5; ++t) {
    EXPECT_EQ(tasks[t].name, names[t]);
    EXPECT_EQ(TaskIndex(names[t]), t);
  }
  EXPECT_EQ(TaskIndex("edges"), 4);
  EXPECT_EQ(TaskIndex("depth"), -1);
  EXPECT_EQ(TaskIndex(""), -1);
  EXPECT_EQ(tasks[0].num_classes, 10);
  EXPECT_EQ(tasks[1].num_classes, 4);
  EXPECT_EQ(tasks[2].num_classes, 4);
  EXPECT_EQ(tasks[3].num_classes, 2);
  EXPECT_EQ(tasks[4].num_classes, 0);
  for (int t = 0; t < 3; ++t) {
    EXPECT_EQ(tasks[t].kind, TaskKind::kClassification);
    EXPECT_EQ(tasks[t].metric, "accuracy");
    EXPECT_FALSE(tasks[t].dense());
  }
  EXPECT_EQ(tasks[3].kind, TaskKind::kSegmentation);
  EXPECT_EQ(tasks[3].metric, "miou");
  EXPECT_EQ(tasks[4].kind, TaskKind::kRegression);
  EXPECT_EQ(tasks[4].metric, "l1");
  EXPECT_FALSE(tasks[4].higher_is_better);
  EXPECT_TRUE(tasks[3].dense());
  EXPECT_TRUE(tasks[4].dense());
}

TEST(MultiTaskTasksTest, CoarseMapping) {
  // T-shirt, Trouser, Pullover, Dress, Coat, Sandal, Shirt, Sneaker, Bag, Ankle boot.
  const int expected[10] = {0, 1, 0, 1, 0, 2, 0, 2, 3, 2};
  for (int c = 0; c < 10; ++c) EXPECT_EQ(CoarseClass(c), expected[c]) << "class " << c;
}

TEST(MultiTaskTasksDeathTest, CoarseRejectsBadClass) {
  EXPECT_DEATH(CoarseClass(10), "outside 0..9");
  EXPECT_DEATH(CoarseClass(-1), "outside 0..9");
}

// --- Rotation -----------------------------------------------------------------------------

TEST(MultiTaskRotationTest, HandWrittenGrids) {
  const std::vector<float> in = {1, 2, 3, 4, 5, 6, 7, 8, 9};
  std::vector<float> out(9);
  RotateCcw(in.data(), 3, 1, out.data());
  EXPECT_EQ(out, (std::vector<float>{3, 6, 9, 2, 5, 8, 1, 4, 7}));
  RotateCcw(in.data(), 3, 2, out.data());
  EXPECT_EQ(out, (std::vector<float>{9, 8, 7, 6, 5, 4, 3, 2, 1}));
  RotateCcw(in.data(), 3, 3, out.data());
  EXPECT_EQ(out, (std::vector<float>{7, 4, 1, 8, 5, 2, 9, 6, 3}));
  RotateCcw(in.data(), 3, -1, out.data());
  EXPECT_EQ(out, (std::vector<float>{7, 4, 1, 8, 5, 2, 9, 6, 3}));
  RotateCcw(in.data(), 3, 4, out.data());
  EXPECT_EQ(out, in);

  const std::vector<float> in4 = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16};
  std::vector<float> out4(16);
  RotateCcw(in4.data(), 4, 1, out4.data());
  EXPECT_EQ(out4, (std::vector<float>{4, 8, 12, 16, 3, 7, 11, 15, 2, 6, 10, 14, 1, 5, 9, 13}));
  // The test's own rotation agrees.
  for (int r = 0; r < 4; ++r) {
    RotateCcw(in4.data(), 4, r, out4.data());
    EXPECT_EQ(out4, TurnCcw(in4, 4, r)) << r;
  }
}

TEST(MultiTaskRotationTest, DeterministicUniformAndSeeded) {
  std::vector<int> count(4, 0);
  int differ = 0;
  for (int64_t i = 0; i < 4000; ++i) {
    const int r = ChooseRotation(17, i);
    ASSERT_TRUE(r >= 0 && r < 4) << r;
    EXPECT_EQ(ChooseRotation(17, i), r);
    ++count[r];
    differ += ChooseRotation(18, i) != r;
  }
  for (int r = 0; r < 4; ++r) EXPECT_NEAR(count[r], 1000, 120) << "r = " << r;
  // Another seed agrees about a quarter of the time.
  EXPECT_NEAR(differ, 3000, 150);
}

TEST(MultiTaskRotationTest, StoredImagesAreTurnedByChooseRotation) {
  const Dataset source = MakeSyntheticDataset(1, 60, 1, 28, 28, 10);
  const MultiTaskDataset d = MakeMultiTaskDataset(source, 5);
  ASSERT_EQ(d.rotation.size(), size_t{60});
  const int64_t numel = 28 * 28;
  for (int64_t i = 0; i < 60; ++i) {
    const int r = ChooseRotation(5, i);
    EXPECT_EQ(d.rotation[i], r);
    EXPECT_EQ(d.labels[kTaskRotation][i], r);
    const std::vector<float> src(source.images.begin() + i * numel,
                                 source.images.begin() + (i + 1) * numel);
    const std::vector<float> got(d.base.images.begin() + i * numel,
                                 d.base.images.begin() + (i + 1) * numel);
    EXPECT_EQ(got, TurnCcw(src, 28, r)) << i;  // exact: a permutation of the pixels
  }
  // The same seed gives the same dataset; another seed other rotations.
  const MultiTaskDataset again = MakeMultiTaskDataset(source, 5);
  EXPECT_EQ(again.base.images, d.base.images);
  EXPECT_EQ(again.edges, d.edges);
  EXPECT_NE(MakeMultiTaskDataset(source, 6).rotation, d.rotation);
}

// --- Targets ------------------------------------------------------------------------------

TEST(MultiTaskTargetsTest, SegmentationThreshold) {
  const std::vector<float> image = NormaliseAll({0, 25, 26, 255, 100, 24});  // 2x3
  std::vector<uint8_t> mask(6, 7);
  SegmentationTarget(image.data(), 2, 3, mask.data());
  EXPECT_EQ(mask, (std::vector<uint8_t>{0, 0, 1, 1, 1, 0}));

  const std::vector<float> step = NormaliseAll(kStep);
  std::vector<uint8_t> step_mask(16);
  SegmentationTarget(step.data(), 4, 4, step_mask.data());
  EXPECT_EQ(step_mask, kStepMask);
}

TEST(MultiTaskTargetsTest, SobelByHand) {
  const std::vector<float> image = NormaliseAll(kStep);
  std::vector<float> edges(16, -1.0f);
  EdgeTarget(image.data(), 4, 4, edges.data());
  // (row 1, col 1): gx = (1 + 2 + 1) - 0 = 4, gy = (0 + 0 + 1) - (0 + 0 + 1) = 0 -> 4 / 4.
  EXPECT_NEAR(edges[1 * 4 + 1], 1.0, 1e-5);
  // (0, 3), a corner: right column padding, left column (0, 2, 1) -> gx = -3; bottom row
  // (1 + 2 + 0), top padding -> gy = 3; |g| = sqrt(18).
  EXPECT_NEAR(edges[0 * 4 + 3], std::sqrt(18.0) / 4, 1e-5);
  // (3, 0), a corner: gx = (0 + 2 * 0.2 + 0) - 0 = 0.4; gy = 0 (bottom padding) - (0 + 0 + 0).
  EXPECT_NEAR(edges[3 * 4 + 0], 0.1, 1e-5);
  // (2, 2): gx = (1 + 2 + 0.2) - (0 + 0 + 0.2) = 3; gy = (0.2 + 0.4 + 0.2) - (0 + 2 + 1) = -2.2.
  EXPECT_NEAR(edges[2 * 4 + 2], std::sqrt(9.0 + 4.84) / 4, 1e-5);
  // (0, 0): gx = (0 + 0 + 0) - 0 = 0; gy = (0 + 0 + 0) - 0 = 0.
  EXPECT_NEAR(edges[0], 0.0, 1e-5);
  for (float e : edges) {
    EXPECT_GE(e, 0.0f);
    EXPECT_LE(e, std::sqrt(2.0f) + 1e-5f);
  }

  // A single white pixel in the centre of 3x3: corners sqrt(2) / 4, edge middles 2 / 4, the
  // centre 0.
  const std::vector<float> dot = NormaliseAll({0, 0, 0, 0, 255, 0, 0, 0, 0});
  std::vector<float> dot_edges(9);
  EdgeTarget(dot.data(), 3, 3, dot_edges.data());
  const double c = std::sqrt(2.0) / 4;
  const std::vector<double> want = {c, 0.5, c, 0.5, 0.0, 0.5, c, 0.5, c};
  for (int p = 0; p < 9; ++p) EXPECT_NEAR(dot_edges[p], want[p], 1e-5) << p;
}

TEST(MultiTaskTargetsTest, TargetsComeFromTheRotatedImage) {
  std::vector<std::vector<int>> images(40, kStep);
  std::vector<int32_t> labels(40);
  for (int i = 0; i < 40; ++i) labels[i] = i % 10;
  const MultiTaskDataset d = MakeMultiTaskDataset(MakeTiny(4, images, labels), 3);
  EXPECT_EQ(d.base.name, "tiny_multitask");
  EXPECT_EQ(d.size(), 40);
  EXPECT_EQ(d.pixels(), 16);
  std::vector<float> base_edges(16);
  const std::vector<float> step = NormaliseAll(kStep);
  EdgeTarget(step.data(), 4, 4, base_edges.data());

  std::vector<int> seen(4, 0);
  for (int64_t i = 0; i < 40; ++i) {
    const int r = d.rotation[i];
    ++seen[r];
    EXPECT_EQ(d.labels[kTaskClass][i], i % 10);
    EXPECT_EQ(d.base.labels[i], i % 10);
    EXPECT_EQ(d.labels[kTaskCoarse][i], CoarseClass(static_cast<int>(i % 10)));
    const std::vector<uint8_t> seg(d.segmentation.begin() + i * 16,
                                   d.segmentation.begin() + (i + 1) * 16);
    EXPECT_EQ(seg, TurnCcw(kStepMask, 4, r)) << "example " << i << " r " << r;
    const std::vector<float> edges(d.edges.begin() + i * 16, d.edges.begin() + (i + 1) * 16);
    const std::vector<float> want = TurnCcw(base_edges, 4, r);
    for (int p = 0; p < 16; ++p) EXPECT_NEAR(edges[p], want[p], 1e-6) << i << " " << p;
    if (r == 1) {
      // One turn moves (a, b) to (3 - b, a): the corner (0, 3) to (0, 0), (2, 2) to (1, 2).
      EXPECT_NEAR(edges[0], std::sqrt(18.0) / 4, 1e-5);
      EXPECT_NEAR(edges[1 * 4 + 2], std::sqrt(13.84) / 4, 1e-5);
      // Rotated mask: the white columns 2-3 become rows 0-1 and the grey row 3 column 3.
      EXPECT_EQ(seg, (std::vector<uint8_t>{1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 1, 0, 0, 0, 1}));
    }
  }
  for (int r = 0; r < 4; ++r) EXPECT_GT(seen[r], 0) << "no example with r = " << r;
  EXPECT_TRUE(d.labels[kTaskSegmentation].empty());
  EXPECT_TRUE(d.labels[kTaskEdges].empty());
}

TEST(MultiTaskTargetsDeathTest, RejectsUnsupportedShapes) {
  EXPECT_DEATH(MakeMultiTaskDataset(MakeSyntheticDataset(1, 2, 3, 8, 8, 10), 0), "1-channel");
  EXPECT_DEATH(MakeMultiTaskDataset(MakeSyntheticDataset(1, 2, 1, 8, 6, 10), 0), "square");
  EXPECT_DEATH(MakeMultiTaskDataset(MakeSyntheticDataset(1, 2, 1, 8, 8, 5), 0), "10 Fashion");
}

// --- Batches ------------------------------------------------------------------------------

TEST(MultiTaskGatherTest, CopiesEveryTarget) {
  const MultiTaskDataset d = MakeMultiTaskDataset(MakeSyntheticDataset(4, 30, 1, 6, 6, 10), 9);
  const std::vector<int64_t> indices = {7, 0, 29, 7};
  const int64_t n = 4, px = 36;
  std::vector<float> images(n * px), edges(n * px);
  std::vector<int32_t> cls(n), coarse(n), rot(n), seg(n * px);
  GatherMultiTaskBatch(d, indices, images.data(), {cls.data(), coarse.data(), rot.data()},
                       seg.data(), edges.data());
  for (int64_t j = 0; j < n; ++j) {
    const int64_t i = indices[j];
    EXPECT_EQ(cls[j], d.base.labels[i]);
    EXPECT_EQ(coarse[j], CoarseClass(d.base.labels[i]));
    EXPECT_EQ(rot[j], d.rotation[i]);
    for (int64_t p = 0; p < px; ++p) {
      EXPECT_EQ(images[j * px + p], d.base.images[i * px + p]);
      EXPECT_EQ(seg[j * px + p], d.segmentation[i * px + p]);
      EXPECT_EQ(edges[j * px + p], d.edges[i * px + p]);
    }
  }
  // Null outputs are skipped; only the rotation labels.
  std::vector<int32_t> only(n, -1);
  GatherMultiTaskBatch(d, indices, nullptr, {nullptr, nullptr, only.data()}, nullptr, nullptr);
  for (int64_t j = 0; j < n; ++j) EXPECT_EQ(only[j], d.rotation[indices[j]]);
}

TEST(MultiTaskGatherDeathTest, RejectsBadRequests) {
  const MultiTaskDataset d = MakeMultiTaskDataset(MakeSyntheticDataset(4, 5, 1, 4, 4, 10), 9);
  std::vector<int32_t> labels(1);
  EXPECT_DEATH(GatherMultiTaskBatch(d, {5}, nullptr, {}, nullptr, nullptr), "outside dataset");
  EXPECT_DEATH(GatherMultiTaskBatch(d, {0}, nullptr, {nullptr, nullptr, nullptr, labels.data()},
                                    nullptr, nullptr),
               "segmentation");
}

// --- Metrics ------------------------------------------------------------------------------

TEST(MultiTaskMetricTest, MeanIoUByHand) {
  // (target, pred): (0,0) once, (0,1) once, (1,0) once, (1,1) twice. Class 0: intersection 1,
  // union 3; class 1: intersection 2, union 4. mIoU = (1/3 + 1/2) / 2 = 5/12.
  const std::vector<int32_t> target = {0, 0, 1, 1, 1};
  const std::vector<int32_t> pred = {0, 1, 0, 1, 1};
  SegmentationMetric m;
  m.Add(pred.data(), target.data(), 5);
  EXPECT_EQ(m.intersection(0), 1);
  EXPECT_EQ(m.union_count(0), 3);
  EXPECT_EQ(m.intersection(1), 2);
  EXPECT_EQ(m.union_count(1), 4);
  EXPECT_DOUBLE_EQ(m.IoU(0), 1.0 / 3);
  EXPECT_DOUBLE_EQ(m.IoU(1), 0.5);
  EXPECT_DOUBLE_EQ(m.MeanIoU(), 5.0 / 12);

  // Accumulating in two parts, or summing the counts arrays (as over ranks), is the same.
  SegmentationMetric a, b;
  a.Add(pred.data(), target.data(), 2);
  b.Add(pred.data() + 2, target.data() + 2, 3);
  SegmentationMetric summed;
  ASSERT_EQ(summed.num_counts(), 4);
  for (int k = 0; k < 4; ++k) summed.counts()[k] = a.counts()[k] + b.counts()[k];
  EXPECT_DOUBLE_EQ(summed.MeanIoU(), 5.0 / 12);
  a.Merge(b);
  EXPECT_DOUBLE_EQ(a.MeanIoU(), 5.0 / 12);

  // A class absent from both prediction and target does not count.
  SegmentationMetric three(3);
  three.Add(pred.data(), target.data(), 5);
  EXPECT_DOUBLE_EQ(three.MeanIoU(), 5.0 / 12);
  EXPECT_EQ(SegmentationMetric().MeanIoU(), 0.0);
}

TEST(MultiTaskMetricDeathTest, SegmentationRejectsBadClass) {
  const int32_t pred[1] = {2}, target[1] = {0};
  SegmentationMetric m;
  EXPECT_DEATH(m.Add(pred, target, 1), "outside 0..1");
}

TEST(MultiTaskMetricTest, AccuracyAndL1ByHand) {
  const int32_t pred[4] = {1, 2, 3, 0}, target[4] = {1, 2, 0, 0};
  AccuracyMetric acc;
  acc.Add(pred, target, 4);
  EXPECT_DOUBLE_EQ(acc.Accuracy(), 0.75);
  AccuracyMetric more;
  more.Add(pred, target, 2);
  acc.Merge(more);
  EXPECT_DOUBLE_EQ(acc.Accuracy(), 5.0 / 6);
  EXPECT_EQ(AccuracyMetric().Accuracy(), 0.0);

  const float p[3] = {0.5f, 1.0f, 0.0f}, t[3] = {0.25f, 1.5f, 0.0f};
  L1Metric l1;
  l1.Add(p, t, 3);
  EXPECT_DOUBLE_EQ(l1.MeanAbsoluteError(), 0.25);  // (0.25 + 0.5 + 0) / 3
  L1Metric other;
  other.Add(p, t, 1);
  l1.Merge(other);
  EXPECT_DOUBLE_EQ(l1.MeanAbsoluteError(), 0.25);  // (0.75 + 0.25) / 4
}

// --- Baselines ----------------------------------------------------------------------------

TEST(MultiTaskBaselineTest, HandMadeSets) {
  // A centred white dot on 3x3 is the same under every rotation.
  const std::vector<int> dot = {0, 0, 0, 0, 255, 0, 0, 0, 0};
  const std::vector<int> blank(9, 0);
  const MultiTaskDataset train = MakeMultiTaskDataset(MakeTiny(3, {dot, dot, dot}, {3, 3, 5}), 1);
  const MultiTaskDataset eval = MakeMultiTaskDataset(MakeTiny(3, {dot, blank}, {3, 4}), 2);
  const TaskBaselines b = ComputeBaselines(train, eval);
  ASSERT_EQ(b.value.size(), size_t{5});
  ASSERT_EQ(b.description.size(), size_t{5});
  // Majority class 3 (Dress): eval labels {3, 4} -> 1/2.
  EXPECT_DOUBLE_EQ(b.value[kTaskClass], 0.5);
  EXPECT_EQ(b.description[kTaskClass], "majority label 3");
  // Coarse: train {1, 1, 2} -> 1; eval {1, 0} -> 1/2.
  EXPECT_DOUBLE_EQ(b.value[kTaskCoarse], 0.5);
  EXPECT_EQ(b.description[kTaskCoarse], "majority label 1");
  // Rotation: the majority of train's rotations (lowest on ties), scored on eval's.
  std::vector<int> count(4, 0);
  for (int i = 0; i < 3; ++i) ++count[ChooseRotation(1, i)];
  int majority = 0;
  for (int r = 1; r < 4; ++r) {
    if (count[r] > count[majority]) majority = r;
  }
  const double hits = (ChooseRotation(2, 0) == majority) + (ChooseRotation(2, 1) == majority);
  EXPECT_DOUBLE_EQ(b.value[kTaskRotation], hits / 2);
  // Segmentation: train is 1/9 foreground, so all-background (mIoU 4/9) beats
  // all-foreground (1/18). Eval has 1 foreground pixel of 18: IoU 17/18 and 0 -> 17/36.
  EXPECT_NEAR(b.value[kTaskSegmentation], 17.0 / 36, 1e-12);
  EXPECT_EQ(b.description[kTaskSegmentation], "constant background");
  // Edges: the mean image is the dot's edge image (corners sqrt(2)/4, middles 1/2), exact on
  // the dot and off by its sum (2 + sqrt(2)) on the blank: L1 = (2 + sqrt(2)) / 18.
  EXPECT_NEAR(b.value[kTaskEdges], (2.0 + std::sqrt(2.0)) / 18, 1e-6);
}

TEST(MultiTaskRealTest, BaselinesOnFashionMnist) {
  if (!std::filesystem::is_directory(kRealDir)) GTEST_SKIP() << kRealDir << " not installed";
  const auto start = std::chrono::steady_clock::now();
  StatusOr<Dataset> train_base = LoadFashionMnist(kRealDir, /*train=*/true);
  ASSERT_TRUE(train_base.ok()) << train_base.status().message();
  const auto loaded = std::chrono::steady_clock::now();
  const MultiTaskDataset train = MakeMultiTaskDataset(*train_base, 42);
  const auto derived = std::chrono::steady_clock::now();
  const double load_s = std::chrono::duration<double>(loaded - start).count();
  const double derive_s = std::chrono::duration<double>(derived - loaded).count();
  std::cout << "train set: load " << load_s << " s, derive " << derive_s << " s, total "
            << load_s + derive_s << " s\n";
  RecordProperty("train_load_seconds", std::to_string(load_s));
  RecordProperty("train_derive_seconds", std::to_string(derive_s));

  StatusOr<Dataset> test_base = LoadFashionMnist(kRealDir, /*train=*/false);
  ASSERT_TRUE(test_base.ok()) << test_base.status().message();
  const MultiTaskDataset test = MakeMultiTaskDataset(*test_base, 43);
  EXPECT_EQ(test.base.name, "fashion_mnist_test_multitask");
  ASSERT_EQ(test.size(), 10000);
  ASSERT_EQ(test.edges.size(), size_t{10000} * 784);

  // An example with one turn: its mask is the turned mask of the source bytes.
  int64_t turned = -1;
  for (int64_t i = 0; i < test.size() && turned < 0; ++i) {
    if (test.rotation[i] == 1) turned = i;
  }
  ASSERT_GE(turned, 0);
  std::vector<uint8_t> source_mask(784);
  for (int p = 0; p < 784; ++p) {
    const float x = test_base->images[turned * 784 + p];
    const long byte = std::lround((x * kFashionMnistStd + kFashionMnistMean) * 255.0f);
    source_mask[p] = byte > 25 ? 1 : 0;
  }
  const std::vector<uint8_t> mask(test.segmentation.begin() + turned * 784,
                                  test.segmentation.begin() + (turned + 1) * 784);
  EXPECT_EQ(mask, TurnCcw(source_mask, 28, 1));
  EXPECT_NE(mask, source_mask);

  const TaskBaselines b = ComputeBaselines(train, test);
  for (int t = 0; t < kNumFashionMnistTasks; ++t) {
    std::cout << "baseline " << FashionMnistTasks()[t].name << " (" << FashionMnistTasks()[t].metric
              << ", " << b.description[t] << "): " << b.value[t] << "\n";
    RecordProperty("baseline_" + FashionMnistTasks()[t].name, std::to_string(b.value[t]));
  }
  EXPECT_DOUBLE_EQ(b.value[kTaskClass], 0.1);   // 1000 of each class
  EXPECT_DOUBLE_EQ(b.value[kTaskCoarse], 0.4);  // upper body: 4 of the 10 classes
  EXPECT_NEAR(b.value[kTaskRotation], 0.25, 0.03);
  EXPECT_GT(b.value[kTaskSegmentation], 0.0);
  EXPECT_LT(b.value[kTaskSegmentation], 0.5);
  EXPECT_GT(b.value[kTaskEdges], 0.0);
  float max_edge = 0.0f;
  for (float e : test.edges) max_edge = std::max(max_edge, e);
  EXPECT_LE(max_edge, std::sqrt(2.0f) + 1e-5f);
}

}  // namespace
}  // namespace moerun
