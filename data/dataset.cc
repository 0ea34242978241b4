// Input pipelines: the Fashion-MNIST IDX reader (zlib), the synthetic dataset, the batch
// sampler, evaluation slices and augmentation. Random streams are counter-based: each is an
// std::mt19937_64 seeded with a splitmix64 hash of (seed, what it is for, epoch / step /
// index), and uniform / normal variates and shuffles are computed here rather than by the
// standard library's distributions, so results are the same with any C++ library.
#include "data/dataset.h"

#include <zlib.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <random>
#include <sstream>
#include <utility>

#include "runtime/hash.h"

namespace moerun {
namespace {

// --- Counter-based random numbers ---------------------------------------------------------

uint64_t HashCombine(uint64_t a, uint64_t b) { return SplitMix64(a ^ SplitMix64(b)); }

// Separate streams for separate purposes under one user seed.
enum StreamTag : uint64_t {
  kTagTemplate = 0x7465'6d70'6c61'7465ULL,
  kTagExample = 0x6578'616d'706c'6521ULL,
  kTagShuffle = 0x7368'7566'666c'6521ULL,
  kTagAugment = 0x6175'676d'656e'7421ULL,
};

uint64_t StreamSeed(uint64_t seed, StreamTag tag, uint64_t counter) {
  return HashCombine(HashCombine(seed, tag), counter);
}

constexpr double kTwoPi = 6.283185307179586476925286766559;

class Rng {
 public:
  explicit Rng(uint64_t seed) : gen_(seed) {}
  uint64_t Bits() { return gen_(); }
  double Uniform() { return static_cast<double>(gen_() >> 11) * 0x1.0p-53; }  // [0, 1)
  double Uniform(double lo, double hi) { return lo + (hi - lo) * Uniform(); }
  // Uniform in [0, n), unbiased (Lemire's multiply-and-reject).
  uint64_t Below(uint64_t n) {
    unsigned __int128 m = static_cast<unsigned __int128>(gen_()) * n;
    uint64_t low = static_cast<uint64_t>(m);
    if (low < n) {
      const uint64_t threshold = (0 - n) % n;
      while (low < threshold) {
        m = static_cast<unsigned __int128>(gen_()) * n;
        low = static_cast<uint64_t>(m);
      }
    }
    return static_cast<uint64_t>(m >> 64);
  }
  // Standard normal (Box-Muller; the second value of each pair is kept for the next call).
  double Normal() {
    if (has_spare_) {
      has_spare_ = false;
      return spare_;
    }
    const double u1 = 1.0 - Uniform();  // (0, 1]
    const double u2 = Uniform();
    const double r = std::sqrt(-2.0 * std::log(u1));
    spare_ = r * std::sin(kTwoPi * u2);
    has_spare_ = true;
    return r * std::cos(kTwoPi * u2);
  }

 private:
  std::mt19937_64 gen_;
  bool has_spare_ = false;
  double spare_ = 0.0;
};

// --- Fashion-MNIST ------------------------------------------------------------------------

constexpr uint32_t kImagesMagic = 0x00000803;  // unsigned bytes, 3 dimensions
constexpr uint32_t kLabelsMagic = 0x00000801;  // unsigned bytes, 1 dimension
constexpr int kMnistSide = 28;
constexpr int kMnistClasses = 10;
constexpr char kInstallHint[] =
    "install it with: apt-get install dataset-fashion-mnist (files under "
    "/usr/share/datasets/fashion-mnist), or set data.dir";

std::string Hex32(uint32_t v) {
  char buf[16];
  std::snprintf(buf, sizeof(buf), "0x%08x", v);
  return buf;
}

// dir/name.gz if it exists, else dir/name if that exists, else an error with the hint.
StatusOr<std::string> FindFile(const std::string& dir, const std::string& name) {
  namespace fs = std::filesystem;
  std::error_code ec;
  const fs::path gz = fs::path(dir) / (name + ".gz");
  if (fs::is_regular_file(gz, ec)) return gz.string();
  const fs::path plain = fs::path(dir) / name;
  if (fs::is_regular_file(plain, ec)) return plain.string();
  return Status::Error("Fashion-MNIST file " + gz.string() + " not found (nor " + name +
                       " without .gz); " + kInstallHint);
}

// A gzip (or plain: zlib reads those as they are) file, closed on scope exit.
class GzFile {
 public:
  GzFile() = default;
  ~GzFile() {
    if (file_ != nullptr) gzclose(file_);
  }
  GzFile(const GzFile&) = delete;
  GzFile& operator=(const GzFile&) = delete;

  Status Open(const std::string& path) {
    path_ = path;
    errno = 0;
    file_ = gzopen(path.c_str(), "rb");
    if (file_ == nullptr) {
      return Status::Error(
          path + ": cannot open: " + (errno != 0 ? std::strerror(errno) : "out of memory"));
    }
    gzbuffer(file_, 1 << 20);
    return Status::Ok();
  }

  // Reads up to `bytes` bytes into `out`; *got is how many came (fewer only at the end).
  Status Read(void* out, size_t bytes, size_t* got) {
    *got = 0;
    auto* dst = static_cast<unsigned char*>(out);
    while (*got < bytes) {
      const unsigned chunk = static_cast<unsigned>(std::min<size_t>(bytes - *got, 1u << 30));
      const int n = gzread(file_, dst + *got, chunk);
      if (n < 0) return GzError();
      if (n == 0) break;
      *got += static_cast<size_t>(n);
    }
    return Status::Ok();
  }

  // The error state after an end of data: a damaged gzip stream is an error, not an end.
  Status CheckEnd() {
    int errnum = Z_OK;
    gzerror(file_, &errnum);
    if (errnum != Z_OK && errnum != Z_STREAM_END) return GzError();
    return Status::Ok();
  }

 private:
  Status GzError() {
    int errnum = Z_OK;
    const char* message = gzerror(file_, &errnum);
    std::string text = errnum == Z_ERRNO ? std::strerror(errno) : message;
    // zlib's message starts with the path; ours names it once.
    if (text.compare(0, path_.size() + 2, path_ + ": ") == 0) text.erase(0, path_.size() + 2);
    return Status::Error(path_ + ": corrupt or truncated gzip data: " + text);
  }

  std::string path_;
  gzFile file_ = nullptr;
};

uint32_t BigEndian32(const unsigned char* p) {
  return (uint32_t{p[0]} << 24) | (uint32_t{p[1]} << 16) | (uint32_t{p[2]} << 8) | uint32_t{p[3]};
}

// Reads an IDX file of unsigned bytes: checks the magic number and that the file holds
// exactly the bytes its header declares. `check_dims` may reject the dimensions (returning
// the problem, or "" when they are fine) before any data is read.
template <typename CheckDims>
Status ReadIdx(const std::string& path, uint32_t magic, int ndims, const char* what,
               CheckDims check_dims, std::vector<uint32_t>* dims, std::vector<uint8_t>* data) {
  GzFile file;
  MOERUN_RETURN_IF_ERROR(file.Open(path));
  unsigned char header[16];
  const size_t header_bytes = 4 * (1 + ndims);
  size_t got = 0;
  MOERUN_RETURN_IF_ERROR(file.Read(header, header_bytes, &got));
  MOERUN_RETURN_IF_ERROR(file.CheckEnd());
  if (got < 4) {
    return Status::Error(path + ": " + std::to_string(got) +
                         " bytes is too short for an IDX header; is it the right file?");
  }
  const uint32_t found_magic = BigEndian32(header);
  if (found_magic != magic) {
    return Status::Error(path + ": bad magic number " + Hex32(found_magic) + ", expected " +
                         Hex32(magic) + " (IDX " + what + ": unsigned bytes, " +
                         std::to_string(ndims) + " dimension" + (ndims > 1 ? "s" : "") +
                         "); is it the right file?");
  }
  if (got < header_bytes) {
    return Status::Error(path + ": truncated header: " + std::to_string(got) + " of " +
                         std::to_string(header_bytes) + " bytes");
  }
  dims->resize(ndims);
  uint64_t expected = 1;
  for (int d = 0; d < ndims; ++d) {
    (*dims)[d] = BigEndian32(header + 4 * (1 + d));
    expected *= (*dims)[d];
  }
  const std::string dims_problem = check_dims(*dims);
  if (!dims_problem.empty()) return Status::Error(path + ": " + dims_problem);

  // Grow the buffer as data arrives, so a corrupt count cannot make us allocate much more
  // than the file holds.
  data->clear();
  size_t have = 0;
  while (have < expected) {
    const size_t grow = static_cast<size_t>(
        std::min<uint64_t>(expected - have, std::max<uint64_t>(have, uint64_t{1} << 20)));
    data->resize(have + grow);
    MOERUN_RETURN_IF_ERROR(file.Read(data->data() + have, grow, &got));
    have += got;
    if (got < grow) break;
  }
  MOERUN_RETURN_IF_ERROR(file.CheckEnd());
  if (have < expected) {
    std::ostringstream msg;
    msg << path << ": truncated: the header declares " << (*dims)[0] << " " << what << " ("
        << expected << " bytes after the header) but the file holds " << have
        << "; download it again";
    return Status::Error(msg.str());
  }
  unsigned char extra[1];
  MOERUN_RETURN_IF_ERROR(file.Read(extra, 1, &got));
  if (got != 0) {
    std::ostringstream msg;
    msg << path << ": longer than its header declares (" << (*dims)[0] << " " << what << ", "
        << expected << " bytes after the header); is it the right file?";
    return Status::Error(msg.str());
  }
  MOERUN_RETURN_IF_ERROR(file.CheckEnd());
  data->resize(have);
  return Status::Ok();
}

// --- Synthetic data -----------------------------------------------------------------------

constexpr int kComponents = 3;        // sinusoids per channel of a class template
constexpr int kMaxFrequency = 3;      // cycles across the image, per axis
constexpr double kPhaseJitter = 0.5;  // radians, std of the per-example phase change
constexpr double kNoiseStd = 0.5;

struct Sinusoid {
  int kx, ky;  // cycles across the width / height
  double amplitude, phase;
};

// The templates of all classes: [class][channel][component].
std::vector<std::vector<std::vector<Sinusoid>>> MakeTemplates(uint64_t seed, int channels,
                                                              int num_classes) {
  // The frequency vectors of one half-plane (a vector and its negative give the same wave).
  std::vector<std::pair<int, int>> frequencies;
  for (int ky = 0; ky <= kMaxFrequency; ++ky) {
    for (int kx = -kMaxFrequency; kx <= kMaxFrequency; ++kx) {
      if (ky > 0 || kx > 0) frequencies.emplace_back(kx, ky);
    }
  }
  std::vector<std::vector<std::vector<Sinusoid>>> templates(num_classes);
  for (int c = 0; c < num_classes; ++c) {
    Rng rng(StreamSeed(seed, kTagTemplate, static_cast<uint64_t>(c)));
    templates[c].resize(channels);
    for (int ch = 0; ch < channels; ++ch) {
      // kComponents distinct frequencies (a partial Fisher-Yates shuffle).
      std::vector<std::pair<int, int>> pool = frequencies;
      double power = 0.0;
      for (int k = 0; k < kComponents; ++k) {
        const size_t j = k + rng.Below(pool.size() - k);
        std::swap(pool[k], pool[j]);
        Sinusoid s;
        s.kx = pool[k].first;
        s.ky = pool[k].second;
        s.amplitude = rng.Uniform(0.5, 1.0);
        s.phase = rng.Uniform(0.0, kTwoPi);
        power += 0.5 * s.amplitude * s.amplitude;
        templates[c][ch].push_back(s);
      }
      // Root-mean-square 1 (exact when the frequencies fit the grid).
      for (Sinusoid& s : templates[c][ch]) s.amplitude /= std::sqrt(power);
    }
  }
  return templates;
}

}  // namespace

StatusOr<Dataset> LoadFashionMnist(const std::string& dir, bool train) {
  {
    std::error_code ec;
    if (!std::filesystem::is_directory(dir, ec)) {
      return Status::Error("Fashion-MNIST directory " + dir + " does not exist; " + kInstallHint);
    }
  }
  const std::string prefix = train ? "train" : "t10k";
  StatusOr<std::string> images_path = FindFile(dir, prefix + "-images-idx3-ubyte");
  if (!images_path.ok()) return images_path.status();
  StatusOr<std::string> labels_path = FindFile(dir, prefix + "-labels-idx1-ubyte");
  if (!labels_path.ok()) return labels_path.status();

  std::vector<uint32_t> label_dims;
  std::vector<uint8_t> label_bytes;
  MOERUN_RETURN_IF_ERROR(ReadIdx(
      *labels_path, kLabelsMagic, 1, "labels", [](const std::vector<uint32_t>&) { return ""; },
      &label_dims, &label_bytes));
  const int64_t count = label_dims[0];
  for (int64_t i = 0; i < count; ++i) {
    if (label_bytes[i] >= kMnistClasses) {
      return Status::Error(*labels_path + ": label " + std::to_string(label_bytes[i]) +
                           " at index " + std::to_string(i) + " is outside 0.." +
                           std::to_string(kMnistClasses - 1));
    }
  }

  std::vector<uint32_t> image_dims;
  std::vector<uint8_t> pixels;
  const std::string labels_name = std::filesystem::path(*labels_path).filename().string();
  MOERUN_RETURN_IF_ERROR(ReadIdx(
      *images_path, kImagesMagic, 3, "images",
      [&](const std::vector<uint32_t>& d) -> std::string {
        if (d[1] != kMnistSide || d[2] != kMnistSide) {
          return "images are " + std::to_string(d[1]) + "x" + std::to_string(d[2]) +
                 ", expected 28x28";
        }
        if (d[0] != static_cast<uint64_t>(count)) {
          return "holds " + std::to_string(d[0]) + " images but " + labels_name + " holds " +
                 std::to_string(count) + " labels; the two files must come from the same set";
        }
        return "";
      },
      &image_dims, &pixels));

  Dataset data;
  data.size = count;
  data.channels = 1;
  data.height = kMnistSide;
  data.width = kMnistSide;
  data.num_classes = kMnistClasses;
  data.name = train ? "fashion_mnist_train" : "fashion_mnist_test";
  float table[256];
  for (int v = 0; v < 256; ++v) {
    table[v] = (static_cast<float>(v) / 255.0f - kFashionMnistMean) / kFashionMnistStd;
  }
  data.background = table[0];
  data.images.resize(pixels.size());
  for (size_t i = 0; i < pixels.size(); ++i) data.images[i] = table[pixels[i]];
  data.labels.assign(label_bytes.begin(), label_bytes.end());
  return data;
}

Dataset MakeSyntheticDataset(uint64_t seed, int64_t size, int channels, int height, int width,
                             int num_classes) {
  CHECK_GE(size, 0);
  CHECK_GT(channels, 0);
  CHECK_GT(height, 0);
  CHECK_GT(width, 0);
  CHECK_GT(num_classes, 0);
  Dataset data;
  data.size = size;
  data.channels = channels;
  data.height = height;
  data.width = width;
  data.num_classes = num_classes;
  data.name = "synthetic";
  data.background = 0.0f;
  const int64_t numel = data.image_numel();
  data.images.resize(static_cast<size_t>(size * numel));
  data.labels.resize(static_cast<size_t>(size));
  const auto templates = MakeTemplates(seed, channels, num_classes);

#pragma omp parallel
  {
    // Per component: sin / cos of the x part (with the example's phase) and of the y part.
    std::vector<double> sx(kComponents * width), cx(kComponents * width);
    std::vector<double> sy(kComponents * height), cy(kComponents * height);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < size; ++i) {
      Rng rng(StreamSeed(seed, kTagExample, static_cast<uint64_t>(i)));
      const int label = static_cast<int>(rng.Below(static_cast<uint64_t>(num_classes)));
      data.labels[i] = label;
      const double scale = rng.Uniform(0.8, 1.2);
      float* image = data.images.data() + i * numel;
      for (int ch = 0; ch < channels; ++ch) {
        const std::vector<Sinusoid>& waves = templates[label][ch];
        for (int k = 0; k < kComponents; ++k) {
          const Sinusoid& s = waves[k];
          const double phase = s.phase + kPhaseJitter * rng.Normal();
          for (int x = 0; x < width; ++x) {
            const double u = kTwoPi * s.kx * x / width + phase;
            sx[k * width + x] = scale * s.amplitude * std::sin(u);
            cx[k * width + x] = scale * s.amplitude * std::cos(u);
          }
          for (int y = 0; y < height; ++y) {
            const double v = kTwoPi * s.ky * y / height;
            sy[k * height + y] = std::sin(v);
            cy[k * height + y] = std::cos(v);
          }
        }
        // sin(u + v) = sin(u) cos(v) + cos(u) sin(v).
        for (int y = 0; y < height; ++y) {
          float* row = image + (static_cast<int64_t>(ch) * height + y) * width;
          for (int x = 0; x < width; ++x) {
            double value = 0.0;
            for (int k = 0; k < kComponents; ++k) {
              value +=
                  sx[k * width + x] * cy[k * height + y] + cx[k * width + x] * sy[k * height + y];
            }
            row[x] = static_cast<float>(value + kNoiseStd * rng.Normal());
          }
        }
      }
    }
  }
  return data;
}

BatchSampler::BatchSampler(int64_t dataset_size, int64_t global_batch, uint64_t seed, bool shuffle)
    : dataset_size_(dataset_size), global_batch_(global_batch), seed_(seed), shuffle_(shuffle) {
  CHECK_GT(global_batch, 0) << "global batch must be positive";
  CHECK_LE(global_batch, dataset_size)
      << "global batch " << global_batch << " is larger than the dataset (" << dataset_size
      << " examples)";
}

int64_t BatchSampler::epoch_of(int64_t step) const {
  CHECK_GE(step, 0);
  return step / steps_per_epoch();
}

const std::vector<int64_t>& BatchSampler::Permutation(int64_t epoch) const {
  if (permutation_.empty() || (shuffle_ && epoch != cached_epoch_)) {
    permutation_.resize(static_cast<size_t>(dataset_size_));
    for (int64_t i = 0; i < dataset_size_; ++i) permutation_[i] = i;
    if (shuffle_) {
      Rng rng(StreamSeed(seed_, kTagShuffle, static_cast<uint64_t>(epoch)));
      for (int64_t i = dataset_size_ - 1; i > 0; --i) {
        const int64_t j = static_cast<int64_t>(rng.Below(static_cast<uint64_t>(i + 1)));
        std::swap(permutation_[i], permutation_[j]);
      }
    }
    cached_epoch_ = epoch;
  }
  return permutation_;
}

void BatchSampler::GlobalBatch(int64_t step, std::vector<int64_t>* indices) const {
  RankSlice(step, 0, 1, indices);
}

void BatchSampler::RankSlice(int64_t step, int rank, int world,
                             std::vector<int64_t>* indices) const {
  CHECK_GT(world, 0);
  CHECK(rank >= 0 && rank < world) << "rank " << rank << " of " << world;
  CHECK_EQ(global_batch_ % world, 0)
      << "global batch " << global_batch_ << " does not split evenly over " << world << " ranks";
  const int64_t epoch = epoch_of(step);
  const int64_t local = global_batch_ / world;
  const int64_t begin = (step % steps_per_epoch()) * global_batch_ + rank * local;
  const std::vector<int64_t>& perm = Permutation(epoch);
  indices->assign(perm.begin() + begin, perm.begin() + begin + local);
}

std::vector<int64_t> EvalSlice(int64_t dataset_size, int64_t begin, int64_t count, int rank,
                               int world) {
  CHECK_GE(begin, 0);
  CHECK_GE(count, 0);
  CHECK_LE(begin + count, dataset_size);
  CHECK(world > 0 && rank >= 0 && rank < world) << "rank " << rank << " of " << world;
  const int64_t base = count / world;
  const int64_t extra = count % world;
  const int64_t first = begin + rank * base + std::min<int64_t>(rank, extra);
  const int64_t n = base + (rank < extra ? 1 : 0);
  std::vector<int64_t> indices(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) indices[i] = first + i;
  return indices;
}

void GatherBatch(const Dataset& data, const std::vector<int64_t>& indices, float* images,
                 int32_t* labels) {
  const int64_t numel = data.image_numel();
  for (size_t j = 0; j < indices.size(); ++j) {
    const int64_t i = indices[j];
    CHECK(i >= 0 && i < data.size)
        << "index " << i << " outside dataset " << data.name << " of " << data.size << " examples";
    if (images != nullptr) {
      std::copy_n(data.images.data() + i * numel, numel, images + j * numel);
    }
    if (labels != nullptr) labels[j] = data.labels[i];
  }
}

AugmentChoice ChooseAugment(uint64_t seed, int64_t step, int64_t index) {
  const uint64_t h = HashCombine(StreamSeed(seed, kTagAugment, static_cast<uint64_t>(step)),
                                 static_cast<uint64_t>(index));
  AugmentChoice choice;
  choice.flip = (h & 1) != 0;
  // Uniform in [0, 5) from 32 (then 31) independent bits; the bias is below 1e-9.
  choice.dx = static_cast<int>(((h >> 1) & 0xffffffffULL) * 5 >> 32) - 2;
  choice.dy = static_cast<int>(((h >> 33) & 0x7fffffffULL) * 5 >> 31) - 2;
  return choice;
}

void FlipHorizontal(int channels, int height, int width, float* image) {
  for (int64_t row = 0; row < static_cast<int64_t>(channels) * height; ++row) {
    std::reverse(image + row * width, image + (row + 1) * width);
  }
}

void Translate(int channels, int height, int width, int dx, int dy, float fill, float* image) {
  if (dx == 0 && dy == 0) return;
  for (int ch = 0; ch < channels; ++ch) {
    float* plane = image + static_cast<int64_t>(ch) * height * width;
    // Visit rows and columns so that every source is read before it is overwritten.
    for (int step_y = 0; step_y < height; ++step_y) {
      const int y = dy > 0 ? height - 1 - step_y : step_y;
      const int src_y = y - dy;
      float* row = plane + static_cast<int64_t>(y) * width;
      if (src_y < 0 || src_y >= height) {
        std::fill(row, row + width, fill);
        continue;
      }
      const float* src = plane + static_cast<int64_t>(src_y) * width;
      if (dx >= 0) {
        for (int x = width - 1; x >= 0; --x) row[x] = x - dx >= 0 ? src[x - dx] : fill;
      } else {
        for (int x = 0; x < width; ++x) row[x] = x - dx < width ? src[x - dx] : fill;
      }
    }
  }
}

void Augment(const Dataset& data, const std::vector<int64_t>& indices, uint64_t seed, int64_t step,
             float* images) {
  CHECK(images != nullptr);
  const int64_t numel = data.image_numel();
  for (size_t j = 0; j < indices.size(); ++j) {
    const AugmentChoice choice = ChooseAugment(seed, step, indices[j]);
    float* image = images + j * numel;
    if (choice.flip) FlipHorizontal(data.channels, data.height, data.width, image);
    Translate(data.channels, data.height, data.width, choice.dx, choice.dy, data.background, image);
  }
}

}  // namespace moerun
