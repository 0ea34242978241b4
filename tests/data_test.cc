// The input pipelines: the real Fashion-MNIST files (skipped when not installed), corrupt IDX
// files written here with zlib, the synthetic dataset as a pure function of (seed, index),
// the batch sampler and evaluation slices over any rank count, and augmentation.
#include <gtest/gtest.h>
#include <omp.h>
#include <stdlib.h>
#include <zlib.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <set>
#include <string>
#include <tuple>
#include <vector>

#include "data/dataset.h"

namespace moerun {
namespace {

namespace fs = std::filesystem;

constexpr char kRealDir[] = "/usr/share/datasets/fashion-mnist";

// --- Fashion-MNIST ------------------------------------------------------------------------

TEST(DataFashionMnistRealTest, LoadsTrainAndTestSets) {
  if (!fs::is_directory(kRealDir)) GTEST_SKIP() << kRealDir << " not installed";
  const auto start = std::chrono::steady_clock::now();
  StatusOr<Dataset> train = LoadFashionMnist(kRealDir, /*train=*/true);
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  ASSERT_TRUE(train.ok()) << train.status().message();
  std::cout << "loaded the Fashion-MNIST training set in " << seconds << " s\n";
  RecordProperty("train_load_seconds", std::to_string(seconds));

  EXPECT_EQ(train->size, 60000);
  EXPECT_EQ(train->channels, 1);
  EXPECT_EQ(train->height, 28);
  EXPECT_EQ(train->width, 28);
  EXPECT_EQ(train->num_classes, 10);
  ASSERT_EQ(train->images.size(), size_t{60000} * 28 * 28);
  ASSERT_EQ(train->labels.size(), size_t{60000});
  EXPECT_EQ(train->labels[0], 9);  // an ankle boot
  std::vector<int> per_class(10, 0);
  for (int32_t label : train->labels) {
    ASSERT_TRUE(label >= 0 && label < 10) << label;
    ++per_class[label];
  }
  for (int c = 0; c < 10; ++c) EXPECT_EQ(per_class[c], 6000) << "class " << c;

  double sum = 0.0, sum_sq = 0.0;
  for (float v : train->images) {
    sum += v;
    sum_sq += static_cast<double>(v) * v;
  }
  const double n = static_cast<double>(train->images.size());
  const double mean = sum / n;
  const double stddev = std::sqrt(sum_sq / n - mean * mean);
  EXPECT_NEAR(mean, 0.0, 0.01);
  EXPECT_NEAR(stddev, 1.0, 0.01);
  EXPECT_FLOAT_EQ(train->background, -kFashionMnistMean / kFashionMnistStd);

  StatusOr<Dataset> test = LoadFashionMnist(kRealDir, /*train=*/false);
  ASSERT_TRUE(test.ok()) << test.status().message();
  EXPECT_EQ(test->size, 10000);
  EXPECT_EQ(test->labels.size(), size_t{10000});
  EXPECT_EQ(test->images.size(), size_t{10000} * 28 * 28);
  EXPECT_EQ(test->labels[0], 9);
  EXPECT_NE(train->name, test->name);
}

// A fresh directory per test, removed afterwards, with helpers that write IDX files.
class DataFashionMnistFileTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = (fs::temp_directory_path() / "data_test.XXXXXX").string();
    ASSERT_NE(mkdtemp(tmpl.data()), nullptr) << std::strerror(errno);
    dir_ = tmpl;
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::string Path(const std::string& name) const { return (dir_ / name).string(); }

  static std::string Header(uint32_t magic, const std::vector<uint32_t>& dims) {
    std::string bytes;
    auto put = [&](uint32_t v) {
      for (int shift = 24; shift >= 0; shift -= 8) bytes.push_back(static_cast<char>(v >> shift));
    };
    put(magic);
    for (uint32_t d : dims) put(d);
    return bytes;
  }

  // Writes `bytes` to `name` in the test directory, gzip-compressed when the name ends .gz.
  void Write(const std::string& name, const std::string& bytes) {
    const std::string path = Path(name);
    if (name.size() > 3 && name.compare(name.size() - 3, 3, ".gz") == 0) {
      gzFile file = gzopen(path.c_str(), "wb");
      ASSERT_NE(file, nullptr) << path;
      if (!bytes.empty()) {
        ASSERT_EQ(gzwrite(file, bytes.data(), static_cast<unsigned>(bytes.size())),
                  static_cast<int>(bytes.size()));
      }
      ASSERT_EQ(gzclose(file), Z_OK);
    } else {
      std::ofstream out(path, std::ios::binary);
      out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
      ASSERT_TRUE(out.good()) << path;
    }
  }

  // `n` images whose pixel p of image i is (i * 7 + p) % 256, and labels i % 10.
  static std::string ImagesFile(uint32_t n, uint32_t rows = 28, uint32_t cols = 28) {
    std::string bytes = Header(0x00000803, {n, rows, cols});
    for (uint32_t i = 0; i < n; ++i) {
      for (uint32_t p = 0; p < rows * cols; ++p) bytes.push_back(static_cast<char>((i * 7 + p)));
    }
    return bytes;
  }
  static std::string LabelsFile(uint32_t n) {
    std::string bytes = Header(0x00000801, {n});
    for (uint32_t i = 0; i < n; ++i) bytes.push_back(static_cast<char>(i % 10));
    return bytes;
  }

  void WriteValidTrainSet(uint32_t n, bool gzip = true) {
    const std::string ext = gzip ? ".gz" : "";
    Write("train-images-idx3-ubyte" + ext, ImagesFile(n));
    Write("train-labels-idx1-ubyte" + ext, LabelsFile(n));
  }

  // The error of loading the training set from the test directory.
  std::string LoadError() {
    StatusOr<Dataset> data = LoadFashionMnist(dir_.string(), /*train=*/true);
    EXPECT_FALSE(data.ok());
    return data.ok() ? "" : data.status().message();
  }

  fs::path dir_;
};

TEST_F(DataFashionMnistFileTest, SmallGzipSetLoadsAndNormalises) {
  WriteValidTrainSet(3);
  StatusOr<Dataset> data = LoadFashionMnist(dir_.string(), /*train=*/true);
  ASSERT_TRUE(data.ok()) << data.status().message();
  EXPECT_EQ(data->size, 3);
  EXPECT_EQ(data->labels, (std::vector<int32_t>{0, 1, 2}));
  ASSERT_EQ(data->images.size(), size_t{3} * 784);
  for (int i = 0; i < 3; ++i) {
    for (int p = 0; p < 784; p += 97) {
      const float x = static_cast<float>((i * 7 + p) % 256) / 255.0f;
      EXPECT_NEAR(data->images[i * 784 + p], (x - 0.2860f) / 0.3530f, 1e-6) << i << " " << p;
    }
  }
  EXPECT_NEAR(data->background, -0.2860f / 0.3530f, 1e-6);
}

TEST_F(DataFashionMnistFileTest, UncompressedFilesAreAccepted) {
  Write("t10k-images-idx3-ubyte", ImagesFile(2));
  Write("t10k-labels-idx1-ubyte.gz", LabelsFile(2));
  StatusOr<Dataset> data = LoadFashionMnist(dir_.string(), /*train=*/false);
  ASSERT_TRUE(data.ok()) << data.status().message();
  EXPECT_EQ(data->size, 2);
  EXPECT_EQ(data->labels, (std::vector<int32_t>{0, 1}));
}

TEST_F(DataFashionMnistFileTest, BadImagesMagic) {
  std::string images = ImagesFile(2);
  images[3] = 0x04;
  Write("train-images-idx3-ubyte.gz", images);
  Write("train-labels-idx1-ubyte.gz", LabelsFile(2));
  const std::string error = LoadError();
  EXPECT_NE(error.find(Path("train-images-idx3-ubyte.gz")), std::string::npos) << error;
  EXPECT_NE(error.find("bad magic number 0x00000804, expected 0x00000803"), std::string::npos)
      << error;
}

TEST_F(DataFashionMnistFileTest, BadLabelsMagic) {
  Write("train-images-idx3-ubyte.gz", ImagesFile(2));
  Write("train-labels-idx1-ubyte.gz", ImagesFile(2));  // an images file in its place
  const std::string error = LoadError();
  EXPECT_NE(error.find(Path("train-labels-idx1-ubyte.gz")), std::string::npos) << error;
  EXPECT_NE(error.find("bad magic number 0x00000803, expected 0x00000801"), std::string::npos)
      << error;
}

TEST_F(DataFashionMnistFileTest, TruncatedBody) {
  std::string images = ImagesFile(3);
  images.resize(images.size() - 100);
  Write("train-images-idx3-ubyte.gz", images);
  Write("train-labels-idx1-ubyte.gz", LabelsFile(3));
  const std::string error = LoadError();
  EXPECT_NE(error.find(Path("train-images-idx3-ubyte.gz")), std::string::npos) << error;
  EXPECT_NE(error.find("truncated: the header declares 3 images (2352 bytes after the header) "
                       "but the file holds 2252"),
            std::string::npos)
      << error;
}

TEST_F(DataFashionMnistFileTest, TruncatedHeader) {
  Write("train-images-idx3-ubyte.gz", ImagesFile(3).substr(0, 10));
  Write("train-labels-idx1-ubyte.gz", LabelsFile(3));
  const std::string error = LoadError();
  EXPECT_NE(error.find(Path("train-images-idx3-ubyte.gz") + ": truncated header"),
            std::string::npos)
      << error;
}

TEST_F(DataFashionMnistFileTest, EmptyFile) {
  Write("train-images-idx3-ubyte.gz", ImagesFile(3));
  Write("train-labels-idx1-ubyte.gz", "");
  const std::string error = LoadError();
  EXPECT_NE(error.find(Path("train-labels-idx1-ubyte.gz") + ": 0 bytes is too short"),
            std::string::npos)
      << error;
}

TEST_F(DataFashionMnistFileTest, TruncatedLabels) {
  Write("train-images-idx3-ubyte.gz", ImagesFile(3));
  Write("train-labels-idx1-ubyte.gz", LabelsFile(3).substr(0, 9));
  const std::string error = LoadError();
  EXPECT_NE(error.find(Path("train-labels-idx1-ubyte.gz") + ": truncated"), std::string::npos)
      << error;
}

TEST_F(DataFashionMnistFileTest, ExtraBytesAfterTheData) {
  Write("train-images-idx3-ubyte.gz", ImagesFile(2));
  Write("train-labels-idx1-ubyte.gz", LabelsFile(2) + "x");
  const std::string error = LoadError();
  EXPECT_NE(error.find(Path("train-labels-idx1-ubyte.gz") + ": longer than its header declares"),
            std::string::npos)
      << error;
}

TEST_F(DataFashionMnistFileTest, MismatchedCounts) {
  Write("train-images-idx3-ubyte.gz", ImagesFile(3));
  Write("train-labels-idx1-ubyte.gz", LabelsFile(2));
  const std::string error = LoadError();
  EXPECT_NE(error.find(Path("train-images-idx3-ubyte.gz") +
                       ": holds 3 images but train-labels-idx1-ubyte.gz holds 2 labels"),
            std::string::npos)
      << error;
}

TEST_F(DataFashionMnistFileTest, LabelOutOfRange) {
  std::string labels = LabelsFile(4);
  labels[8 + 2] = 11;
  Write("train-images-idx3-ubyte.gz", ImagesFile(4));
  Write("train-labels-idx1-ubyte.gz", labels);
  const std::string error = LoadError();
  EXPECT_NE(
      error.find(Path("train-labels-idx1-ubyte.gz") + ": label 11 at index 2 is outside 0..9"),
      std::string::npos)
      << error;
}

TEST_F(DataFashionMnistFileTest, WrongImageSize) {
  Write("train-images-idx3-ubyte.gz", ImagesFile(2, 32, 32));
  Write("train-labels-idx1-ubyte.gz", LabelsFile(2));
  const std::string error = LoadError();
  EXPECT_NE(error.find(Path("train-images-idx3-ubyte.gz") + ": images are 32x32, expected 28x28"),
            std::string::npos)
      << error;
}

TEST_F(DataFashionMnistFileTest, CorruptGzipStream) {
  WriteValidTrainSet(50);
  // Cut the compressed images file in half: the gzip stream ends early.
  const std::string path = Path("train-images-idx3-ubyte.gz");
  fs::resize_file(path, fs::file_size(path) / 2);
  const std::string error = LoadError();
  EXPECT_NE(error.find(path + ": "), std::string::npos) << error;
  EXPECT_NE(error.find("truncated"), std::string::npos) << error;
}

TEST_F(DataFashionMnistFileTest, HugeCountInCorruptHeaderFailsCleanly) {
  // The header claims 4 billion images; the reader must not try to allocate them up front.
  std::string images = Header(0x00000803, {0xffffffffu, 28, 28}) + std::string(784, '\0');
  Write("train-images-idx3-ubyte.gz", images);
  Write("train-labels-idx1-ubyte.gz", Header(0x00000801, {0xffffffffu}));
  const std::string error = LoadError();
  EXPECT_NE(error.find(Path("train-labels-idx1-ubyte.gz") + ": truncated"), std::string::npos)
      << error;
}

TEST_F(DataFashionMnistFileTest, MissingDirectoryGivesInstallHint) {
  const std::string missing = Path("no-such-dir");
  StatusOr<Dataset> data = LoadFashionMnist(missing, /*train=*/true);
  ASSERT_FALSE(data.ok());
  const std::string& error = data.status().message();
  EXPECT_NE(error.find(missing + " does not exist"), std::string::npos) << error;
  EXPECT_NE(error.find("install it with: apt-get install dataset-fashion-mnist (files under "
                       "/usr/share/datasets/fashion-mnist), or set data.dir"),
            std::string::npos)
      << error;
}

TEST_F(DataFashionMnistFileTest, MissingFileGivesInstallHint) {
  Write("train-images-idx3-ubyte.gz", ImagesFile(2));
  const std::string error = LoadError();
  EXPECT_NE(error.find(Path("train-labels-idx1-ubyte.gz") + " not found"), std::string::npos)
      << error;
  EXPECT_NE(error.find("apt-get install dataset-fashion-mnist"), std::string::npos) << error;
  EXPECT_NE(error.find("data.dir"), std::string::npos) << error;
}

// --- Synthetic data -----------------------------------------------------------------------

TEST(DataSyntheticTest, PureFunctionOfSeedAndIndex) {
  const Dataset a = MakeSyntheticDataset(7, 100, 3, 16, 12, 10);
  const Dataset b = MakeSyntheticDataset(7, 100, 3, 16, 12, 10);
  EXPECT_EQ(a.images, b.images);
  EXPECT_EQ(a.labels, b.labels);
  EXPECT_EQ(a.size, 100);
  EXPECT_EQ(a.images.size(), size_t{100} * 3 * 16 * 12);
  EXPECT_EQ(a.name, "synthetic");
  EXPECT_EQ(a.background, 0.0f);

  const Dataset other = MakeSyntheticDataset(8, 100, 3, 16, 12, 10);
  EXPECT_NE(a.labels, other.labels);
  int64_t same = 0;
  for (size_t i = 0; i < a.images.size(); ++i) same += a.images[i] == other.images[i];
  EXPECT_EQ(same, 0);

  // Example i is the same whatever the size of the dataset.
  const Dataset small = MakeSyntheticDataset(7, 10, 3, 16, 12, 10);
  EXPECT_TRUE(std::equal(small.images.begin(), small.images.end(), a.images.begin()));
  EXPECT_TRUE(std::equal(small.labels.begin(), small.labels.end(), a.labels.begin()));
}

TEST(DataSyntheticTest, IndependentOfThreadCount) {
  const int threads = omp_get_max_threads();
  omp_set_num_threads(1);
  const Dataset one = MakeSyntheticDataset(3, 64, 1, 28, 28, 10);
  omp_set_num_threads(3);
  const Dataset three = MakeSyntheticDataset(3, 64, 1, 28, 28, 10);
  omp_set_num_threads(threads);
  EXPECT_EQ(one.images, three.images);
  EXPECT_EQ(one.labels, three.labels);
}

TEST(DataSyntheticTest, LabelsAndPixelStatistics) {
  const Dataset data = MakeSyntheticDataset(1, 2000, 1, 28, 28, 10);
  std::vector<int> per_class(10, 0);
  for (int32_t label : data.labels) {
    ASSERT_TRUE(label >= 0 && label < 10) << label;
    ++per_class[label];
  }
  for (int c = 0; c < 10; ++c) EXPECT_NEAR(per_class[c], 200, 60) << "class " << c;
  double sum = 0.0, sum_sq = 0.0;
  for (float v : data.images) {
    sum += v;
    sum_sq += static_cast<double>(v) * v;
  }
  const double n = static_cast<double>(data.images.size());
  // Template power 1 times E[scale^2] (about 1.01), plus noise 0.25.
  EXPECT_NEAR(sum / n, 0.0, 0.05);
  EXPECT_NEAR(sum_sq / n, 1.26, 0.1);
}

// Classes are learnable (a nearest-class-mean classifier fitted on 500 examples labels held-out
// examples of the same seed correctly) and the templates depend on the seed (the same
// classifier is near chance on another seed's data).
TEST(DataSyntheticTest, ClassesAreLearnable) {
  const int classes = 10, numel = 28 * 28;
  const Dataset train = MakeSyntheticDataset(5, 500, 1, 28, 28, classes);
  std::vector<double> means(classes * numel, 0.0);
  std::vector<int> counts(classes, 0);
  for (int64_t i = 0; i < train.size; ++i) {
    ++counts[train.labels[i]];
    for (int p = 0; p < numel; ++p)
      means[train.labels[i] * numel + p] += train.images[i * numel + p];
  }
  for (int c = 0; c < classes; ++c) {
    ASSERT_GT(counts[c], 0);
    for (int p = 0; p < numel; ++p) means[c * numel + p] /= counts[c];
  }
  const Dataset test = MakeSyntheticDataset(6, 500, 1, 28, 28, classes);
  // Test data of another seed has other templates: only the same seed is learnable.
  const Dataset held_out = [&] {
    Dataset d = MakeSyntheticDataset(5, 1000, 1, 28, 28, classes);
    d.images.erase(d.images.begin(), d.images.begin() + 500 * numel);
    d.labels.erase(d.labels.begin(), d.labels.begin() + 500);
    d.size = 500;
    return d;
  }();
  auto accuracy = [&](const Dataset& d) {
    int correct = 0;
    for (int64_t i = 0; i < d.size; ++i) {
      int best = -1;
      double best_dist = 0.0;
      for (int c = 0; c < classes; ++c) {
        double dist = 0.0;
        for (int p = 0; p < numel; ++p) {
          const double diff = d.images[i * numel + p] - means[c * numel + p];
          dist += diff * diff;
        }
        if (best < 0 || dist < best_dist) best = c, best_dist = dist;
      }
      correct += best == d.labels[i];
    }
    return static_cast<double>(correct) / d.size;
  };
  EXPECT_GT(accuracy(held_out), 0.9);
  EXPECT_LT(accuracy(test), 0.3);
}

// --- Batches ------------------------------------------------------------------------------

TEST(DataBatchSamplerTest, EachEpochIsAPermutation) {
  const int64_t size = 103, batch = 10;
  BatchSampler sampler(size, batch, /*seed=*/42);
  ASSERT_EQ(sampler.steps_per_epoch(), 10);
  std::vector<int64_t> indices;
  std::vector<std::vector<int64_t>> epochs;
  for (int64_t epoch = 0; epoch < 3; ++epoch) {
    std::vector<int64_t> seen;
    for (int64_t s = 0; s < sampler.steps_per_epoch(); ++s) {
      const int64_t step = epoch * sampler.steps_per_epoch() + s;
      EXPECT_EQ(sampler.epoch_of(step), epoch);
      sampler.GlobalBatch(step, &indices);
      ASSERT_EQ(indices.size(), size_t{batch});
      seen.insert(seen.end(), indices.begin(), indices.end());
    }
    const std::set<int64_t> distinct(seen.begin(), seen.end());
    EXPECT_EQ(distinct.size(), size_t{100}) << "epoch " << epoch;
    EXPECT_GE(*distinct.begin(), 0);
    EXPECT_LT(*distinct.rbegin(), size);
    epochs.push_back(seen);
  }
  EXPECT_NE(epochs[0], epochs[1]);
  EXPECT_NE(epochs[1], epochs[2]);
  // Not the identity.
  std::vector<int64_t> identity(100);
  for (int64_t i = 0; i < 100; ++i) identity[i] = i;
  EXPECT_NE(epochs[0], identity);
}

TEST(DataBatchSamplerTest, DependsOnlyOnSeedAndStep) {
  BatchSampler a(1000, 32, /*seed=*/9), b(1000, 32, /*seed=*/9), c(1000, 32, /*seed=*/10);
  std::vector<int64_t> x, y, z;
  // b visits steps in another order (jumping between epochs); the batches are the same.
  const std::vector<int64_t> steps = {0, 1, 31, 62, 5, 100, 2, 31};
  for (int64_t step : steps) {
    a.GlobalBatch(step, &x);
    BatchSampler fresh(1000, 32, 9);
    fresh.GlobalBatch(step, &y);
    EXPECT_EQ(x, y) << "step " << step;
  }
  for (auto it = steps.rbegin(); it != steps.rend(); ++it) {
    a.GlobalBatch(*it, &x);
    b.GlobalBatch(*it, &y);
    EXPECT_EQ(x, y) << "step " << *it;
  }
  a.GlobalBatch(0, &x);
  c.GlobalBatch(0, &z);
  EXPECT_NE(x, z);
}

TEST(DataBatchSamplerTest, RankSlicesConcatenateToTheGlobalBatch) {
  const int64_t size = 1001, batch = 16;
  BatchSampler global(size, batch, /*seed=*/3);
  std::vector<int64_t> expected, slice;
  for (int world : {1, 2, 4, 8, 16}) {
    // One sampler per rank, as in separate processes.
    std::vector<BatchSampler> ranks(world, BatchSampler(size, batch, 3));
    for (int64_t step : {0, 1, 61, 62, 63, 200}) {
      global.GlobalBatch(step, &expected);
      std::vector<int64_t> joined;
      for (int rank = 0; rank < world; ++rank) {
        ranks[rank].RankSlice(step, rank, world, &slice);
        EXPECT_EQ(slice.size(), size_t(batch / world));
        joined.insert(joined.end(), slice.begin(), slice.end());
      }
      EXPECT_EQ(joined, expected) << "world " << world << " step " << step;
    }
  }
}

TEST(DataBatchSamplerTest, UnshuffledOrderIsSequentialEveryEpoch) {
  BatchSampler sampler(10, 3, /*seed=*/5, /*shuffle=*/false);
  EXPECT_EQ(sampler.steps_per_epoch(), 3);
  std::vector<int64_t> indices;
  for (int64_t epoch = 0; epoch < 3; ++epoch) {
    std::vector<int64_t> seen;
    for (int64_t s = 0; s < 3; ++s) {
      sampler.GlobalBatch(epoch * 3 + s, &indices);
      seen.insert(seen.end(), indices.begin(), indices.end());
    }
    EXPECT_EQ(seen, (std::vector<int64_t>{0, 1, 2, 3, 4, 5, 6, 7, 8})) << "epoch " << epoch;
  }
  sampler.RankSlice(1, 1, 3, &indices);
  EXPECT_EQ(indices, (std::vector<int64_t>{4}));
}

TEST(DataBatchSamplerTest, WholeDatasetBatch) {
  BatchSampler sampler(5, 5, /*seed=*/1);
  EXPECT_EQ(sampler.steps_per_epoch(), 1);
  EXPECT_EQ(sampler.epoch_of(7), 7);
  std::vector<int64_t> indices;
  sampler.GlobalBatch(7, &indices);
  std::sort(indices.begin(), indices.end());
  EXPECT_EQ(indices, (std::vector<int64_t>{0, 1, 2, 3, 4}));
}

TEST(DataBatchSamplerDeathTest, RejectsBadShapes) {
  EXPECT_DEATH(BatchSampler(10, 11, 0), "larger than the dataset");
  BatchSampler sampler(100, 12, 0);
  std::vector<int64_t> indices;
  EXPECT_DEATH(sampler.RankSlice(0, 0, 5, &indices), "does not split evenly over 5 ranks");
}

TEST(DataEvalSliceTest, EveryIndexExactlyOnce) {
  for (int64_t count : {0, 1, 7, 10, 13}) {
    for (int64_t begin : {0, 4}) {
      for (int world = 1; world <= 5; ++world) {
        std::vector<int64_t> joined;
        size_t previous = SIZE_MAX;
        for (int rank = 0; rank < world; ++rank) {
          const std::vector<int64_t> part = EvalSlice(20, begin, count, rank, world);
          // Sizes differ by at most one, larger first.
          EXPECT_LE(part.size(), previous);
          EXPECT_GE(part.size() + 1, previous == SIZE_MAX ? part.size() + 1 : previous);
          previous = part.size();
          joined.insert(joined.end(), part.begin(), part.end());
        }
        std::vector<int64_t> expected(count);
        for (int64_t i = 0; i < count; ++i) expected[i] = begin + i;
        EXPECT_EQ(joined, expected)
            << "count " << count << " begin " << begin << " world " << world;
      }
    }
  }
  EXPECT_EQ(EvalSlice(100, 90, 10, 1, 3), (std::vector<int64_t>{94, 95, 96}));
  EXPECT_EQ(EvalSlice(100, 90, 10, 0, 3), (std::vector<int64_t>{90, 91, 92, 93}));
}

TEST(DataGatherTest, CopiesImagesAndLabels) {
  const Dataset data = MakeSyntheticDataset(2, 20, 2, 4, 3, 5);
  const std::vector<int64_t> indices = {7, 0, 19, 7};
  const int64_t numel = 2 * 4 * 3;
  std::vector<float> images(indices.size() * numel);
  std::vector<int32_t> labels(indices.size());
  GatherBatch(data, indices, images.data(), labels.data());
  for (size_t j = 0; j < indices.size(); ++j) {
    EXPECT_EQ(labels[j], data.labels[indices[j]]);
    EXPECT_TRUE(std::equal(images.begin() + j * numel, images.begin() + (j + 1) * numel,
                           data.images.begin() + indices[j] * numel));
  }
}

// --- Augmentation -------------------------------------------------------------------------

TEST(DataAugmentTest, FlipMirrorsAndFlipOfFlipIsIdentity) {
  std::vector<float> image(2 * 3 * 4);
  for (size_t i = 0; i < image.size(); ++i) image[i] = static_cast<float>(i);
  const std::vector<float> original = image;
  FlipHorizontal(2, 3, 4, image.data());
  EXPECT_EQ(std::vector<float>(image.begin(), image.begin() + 4), (std::vector<float>{3, 2, 1, 0}));
  EXPECT_EQ(std::vector<float>(image.begin() + 20, image.end()),
            (std::vector<float>{23, 22, 21, 20}));
  FlipHorizontal(2, 3, 4, image.data());
  EXPECT_EQ(image, original);
}

TEST(DataAugmentTest, TranslateShiftsAndFills) {
  // One 3x4 channel: value = 10 * y + x.
  auto make = [] {
    std::vector<float> image(12);
    for (int y = 0; y < 3; ++y) {
      for (int x = 0; x < 4; ++x) image[y * 4 + x] = static_cast<float>(10 * y + x);
    }
    return image;
  };
  const float f = -1.0f;
  for (int dy = -2; dy <= 2; ++dy) {
    for (int dx = -2; dx <= 2; ++dx) {
      std::vector<float> image = make();
      const std::vector<float> original = image;
      Translate(1, 3, 4, dx, dy, f, image.data());
      for (int y = 0; y < 3; ++y) {
        for (int x = 0; x < 4; ++x) {
          const int sy = y - dy, sx = x - dx;
          const float want = (sy >= 0 && sy < 3 && sx >= 0 && sx < 4) ? original[sy * 4 + sx] : f;
          EXPECT_EQ(image[y * 4 + x], want)
              << "dx " << dx << " dy " << dy << " at " << x << "," << y;
        }
      }
    }
  }
}

TEST(DataAugmentTest, ChoicesAreDeterministicAndCoverTheRange) {
  std::set<std::tuple<bool, int, int>> seen;
  int flips = 0;
  for (int64_t index = 0; index < 2000; ++index) {
    const AugmentChoice a = ChooseAugment(11, 4, index);
    const AugmentChoice b = ChooseAugment(11, 4, index);
    EXPECT_EQ(a.flip, b.flip);
    EXPECT_EQ(a.dx, b.dx);
    EXPECT_EQ(a.dy, b.dy);
    ASSERT_TRUE(a.dx >= -2 && a.dx <= 2 && a.dy >= -2 && a.dy <= 2) << a.dx << " " << a.dy;
    seen.insert({a.flip, a.dx, a.dy});
    flips += a.flip;
  }
  EXPECT_EQ(seen.size(), size_t{50});
  EXPECT_NEAR(flips, 1000, 100);
  // Another step or seed chooses differently.
  int differ_step = 0, differ_seed = 0;
  for (int64_t index = 0; index < 100; ++index) {
    const AugmentChoice a = ChooseAugment(11, 4, index);
    const AugmentChoice s = ChooseAugment(11, 5, index);
    const AugmentChoice d = ChooseAugment(12, 4, index);
    differ_step += a.flip != s.flip || a.dx != s.dx || a.dy != s.dy;
    differ_seed += a.flip != d.flip || a.dx != d.dx || a.dy != d.dy;
  }
  EXPECT_GT(differ_step, 80);
  EXPECT_GT(differ_seed, 80);
}

TEST(DataAugmentTest, IndependentOfRankCount) {
  Dataset data = MakeSyntheticDataset(4, 200, 1, 28, 28, 10);
  data.background = -0.81f;  // as for Fashion-MNIST
  const int64_t batch = 16, numel = 28 * 28;
  BatchSampler sampler(data.size, batch, /*seed=*/4);
  std::vector<int64_t> indices;
  for (int64_t step : {0, 13, 40}) {
    sampler.GlobalBatch(step, &indices);
    std::vector<float> expected(batch * numel);
    GatherBatch(data, indices, expected.data(), nullptr);
    Augment(data, indices, /*seed=*/77, step, expected.data());
    // Something changed, and uncovered pixels hold the background.
    std::vector<float> plain(batch * numel);
    GatherBatch(data, indices, plain.data(), nullptr);
    EXPECT_NE(expected, plain);
    EXPECT_GT(std::count(expected.begin(), expected.end(), -0.81f), 0);
    for (int world : {1, 2, 4}) {
      std::vector<float> joined;
      for (int rank = 0; rank < world; ++rank) {
        std::vector<int64_t> slice;
        sampler.RankSlice(step, rank, world, &slice);
        std::vector<float> part(slice.size() * numel);
        GatherBatch(data, slice, part.data(), nullptr);
        Augment(data, slice, 77, step, part.data());
        joined.insert(joined.end(), part.begin(), part.end());
      }
      EXPECT_EQ(joined, expected) << "world " << world << " step " << step;
    }
  }
}

TEST(DataAugmentTest, MatchesItsChoice) {
  const Dataset data = MakeSyntheticDataset(8, 30, 2, 6, 5, 3);
  const int64_t numel = 2 * 6 * 5;
  std::vector<int64_t> indices(30);
  for (int64_t i = 0; i < 30; ++i) indices[i] = 29 - i;
  std::vector<float> images(30 * numel);
  GatherBatch(data, indices, images.data(), nullptr);
  Augment(data, indices, 1, 2, images.data());
  for (int64_t j = 0; j < 30; ++j) {
    std::vector<float> one(data.images.begin() + indices[j] * numel,
                           data.images.begin() + (indices[j] + 1) * numel);
    const AugmentChoice c = ChooseAugment(1, 2, indices[j]);
    if (c.flip) FlipHorizontal(2, 6, 5, one.data());
    Translate(2, 6, 5, c.dx, c.dy, 0.0f, one.data());
    EXPECT_TRUE(std::equal(one.begin(), one.end(), images.begin() + j * numel)) << j;
  }
}

}  // namespace
}  // namespace moerun
