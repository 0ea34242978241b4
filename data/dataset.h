// Input pipelines: Fashion-MNIST read from its IDX files, a synthetic dataset made from a
// seed, the per-epoch shuffled order of global batches and each rank's slice of them, and
// light augmentation. Every random choice is a pure function of (seed, step or epoch,
// dataset index), never of the rank count, so a run gives the same result on any number of
// ranks.
#ifndef MOERUN_DATA_DATASET_H_
#define MOERUN_DATA_DATASET_H_

#include <cstdint>
#include <string>
#include <vector>

#include "runtime/status.h"

namespace moerun {

// Fashion-MNIST pixel statistics (of x / 255 over the 60000 training images).
constexpr float kFashionMnistMean = 0.2860f;
constexpr float kFashionMnistStd = 0.3530f;

// A whole dataset in memory.
struct Dataset {
  int64_t size = 0;
  int channels = 0, height = 0, width = 0, num_classes = 0;
  std::vector<float> images;    // [size, C, H, W], normalised
  std::vector<int32_t> labels;  // [size], each in [0, num_classes)
  std::string name;             // "fashion_mnist_train", "fashion_mnist_test", "synthetic"
  // The normalised value of a blank (0) pixel: what Augment fills uncovered pixels with.
  float background = 0.0f;

  int64_t image_numel() const { return static_cast<int64_t>(channels) * height * width; }
};

// Reads Fashion-MNIST from `dir`: train-images-idx3-ubyte.gz and train-labels-idx1-ubyte.gz
// (train) or t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz (test); each name
// without .gz is read instead when only that one exists. Checks the magic numbers
// (0x00000803 images, 0x00000801 labels), the big-endian dimensions (28x28), that images
// and labels agree in count, that each file's length matches its header exactly, and that
// every label is in 0..9. An error names the file and the problem; a missing file or
// directory says how to install the dataset. Pixels become (x / 255 - kFashionMnistMean) /
// kFashionMnistStd; channels = 1, height = width = 28, num_classes = 10.
StatusOr<Dataset> LoadFashionMnist(const std::string& dir, bool train);

// `size` examples that are a pure function of `seed`: example i depends only on (seed, i),
// so the first k examples are the same whatever `size` is. Its label is uniform in
// [0, num_classes); its image is the label's template (a sum of a few 2-D sinusoids per
// channel, chosen from (seed, label), root-mean-square about 1) with each sinusoid's phase
// jittered per example, times a per-example amplitude in [0.8, 1.2], plus Gaussian noise of
// std 0.5. Requires size >= 0 and positive dimensions and classes.
Dataset MakeSyntheticDataset(uint64_t seed, int64_t size, int channels, int height, int width,
                             int num_classes);

// The order in which training visits a dataset: epoch e is a permutation of [0, size) that
// depends only on (seed, e) (the identity when !shuffle, for evaluation), cut into
// steps_per_epoch() consecutive global batches; the remaining size % global_batch examples
// of each epoch are skipped. Step s belongs to epoch s / steps_per_epoch(). Const methods
// cache the current epoch's permutation, so one sampler must not be shared between threads.
class BatchSampler {
 public:
  // CHECKs 0 < global_batch <= dataset_size.
  BatchSampler(int64_t dataset_size, int64_t global_batch, uint64_t seed, bool shuffle = true);

  int64_t dataset_size() const { return dataset_size_; }
  int64_t global_batch() const { return global_batch_; }
  int64_t steps_per_epoch() const { return dataset_size_ / global_batch_; }
  int64_t epoch_of(int64_t step) const;  // step >= 0

  // The global_batch dataset indices of step `step` (all ranks together).
  void GlobalBatch(int64_t step, std::vector<int64_t>* indices) const;
  // The rank-th of `world` equal contiguous slices of GlobalBatch(step): the ranks' slices
  // concatenated in rank order are the global batch. CHECKs world divides global_batch and
  // 0 <= rank < world.
  void RankSlice(int64_t step, int rank, int world, std::vector<int64_t>* indices) const;

 private:
  // The permutation of `epoch`, computed on first use.
  const std::vector<int64_t>& Permutation(int64_t epoch) const;

  int64_t dataset_size_;
  int64_t global_batch_;
  uint64_t seed_;
  bool shuffle_;
  mutable int64_t cached_epoch_ = -1;
  mutable std::vector<int64_t> permutation_;
};

// Rank `rank`'s contiguous part of the indices [begin, begin + count) split over `world`
// ranks as evenly as possible (the first count % world ranks get one more), so that over
// all ranks every index is evaluated exactly once. CHECKs 0 <= begin, 0 <= count,
// begin + count <= dataset_size and 0 <= rank < world.
std::vector<int64_t> EvalSlice(int64_t dataset_size, int64_t begin, int64_t count, int rank,
                               int world);

// Copies examples indices[0..n) of `data` into images [n, C, H, W] and labels [n]; either
// output may be null to skip it. CHECKs every index is in [0, data.size).
void GatherBatch(const Dataset& data, const std::vector<int64_t>& indices, float* images,
                 int32_t* labels);

// One example's augmentation at one step.
struct AugmentChoice {
  bool flip = false;  // mirror left-right
  int dx = 0;         // shift right by dx pixels (negative: left), in [-2, 2]
  int dy = 0;         // shift down by dy pixels (negative: up), in [-2, 2]
};

// The augmentation of dataset example `index` at `step`: a pure function of
// (seed, step, index). Flips with probability 1/2; dx and dy are uniform in [-2, 2].
AugmentChoice ChooseAugment(uint64_t seed, int64_t step, int64_t index);

// Mirrors one [C, H, W] image left-right in place; applying it twice restores the image.
void FlipHorizontal(int channels, int height, int width, float* image);
// Shifts one [C, H, W] image in place by (dx, dy) pixels; pixels shifted in are `fill`.
void Translate(int channels, int height, int width, int dx, int dy, float fill, float* image);

// Augments, in place, the batch that GatherBatch(data, indices, images, ...) produced: image
// j gets ChooseAugment(seed, step, indices[j]), the flip first, then the translation filling
// with data.background. The result depends on no rank count or batch position.
void Augment(const Dataset& data, const std::vector<int64_t>& indices, uint64_t seed, int64_t step,
             float* images);

}  // namespace moerun

#endif  // MOERUN_DATA_DATASET_H_
