// Safetensors reader and writer: round trips, the exact bytes of the format, validation of
// corrupt files (written by hand here), and atomic writes.
#include "runtime/safetensors.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace moerun {
namespace {

namespace fs = std::filesystem;

// A fresh directory per test, removed afterwards.
class SafetensorsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = (fs::temp_directory_path() / "safetensors_test.XXXXXX").string();
    ASSERT_NE(mkdtemp(tmpl.data()), nullptr) << std::strerror(errno);
    dir_ = tmpl;
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::string Path(const std::string& name) const { return (dir_ / name).string(); }

  // Every entry of the test directory, by name.
  std::vector<std::string> Listing() const {
    std::vector<std::string> names;
    for (const auto& e : fs::directory_iterator(dir_)) names.push_back(e.path().filename());
    std::sort(names.begin(), names.end());
    return names;
  }

  fs::path dir_;
};

std::string ReadBytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

void WriteBytes(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(out.good()) << path;
}

// Bytes from hex digits ("0a ff 3f"; spaces ignored).
std::string Hex(const std::string& hex) {
  std::string out;
  std::string digits;
  for (char c : hex) {
    if (c == ' ') continue;
    digits += c;
    if (digits.size() == 2) {
      out += static_cast<char>(std::stoi(digits, nullptr, 16));
      digits.clear();
    }
  }
  EXPECT_TRUE(digits.empty()) << "odd number of hex digits";
  return out;
}

// A file as the format lays it out: 8-byte little-endian header length, header, data.
// The header is used as given (no padding added).
std::string FileBytes(const std::string& header, const std::string& data) {
  std::string out;
  for (int i = 0; i < 8; ++i) out += static_cast<char>((header.size() >> (8 * i)) & 0xff);
  return out + header + data;
}

uint64_t LittleEndian64(const std::string& bytes) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = v << 8 | static_cast<unsigned char>(bytes[i]);
  return v;
}

std::string TensorBytes(const Tensor& t) {
  const Tensor c = t.Contiguous();
  return std::string(static_cast<const char*>(c.raw_data()), c.nbytes());
}

template <typename T>
Tensor Make(const Shape& shape, const std::vector<T>& values) {
  Tensor t = Tensor::Empty(shape, DTypeOf<T>::value);
  EXPECT_EQ(static_cast<size_t>(t.numel()), values.size());
  if (!values.empty()) std::memcpy(t.raw_data(), values.data(), values.size() * sizeof(T));
  return t;
}

std::vector<BF16> ToBF16(const std::vector<float>& values) {
  std::vector<BF16> out;
  for (float v : values) out.push_back(FloatToBF16(v));
  return out;
}

TEST_F(SafetensorsTest, RoundTripsEveryDTypeScalarAndEmpty) {
  std::map<std::string, Tensor> tensors = {
      {"f32", Make<float>({2, 3}, {0.5f, -1.25f, 3e-38f, 1e30f, -0.0f, 7.0f})},
      {"bf16", Make<BF16>({3}, ToBF16({1.5f, -2.0f, 0.0078125f}))},
      {"f64", Make<double>({2}, {1.0 / 3.0, -1e300})},
      {"i32", Make<int32_t>({2, 2}, {std::numeric_limits<int32_t>::min(), -1, 0,
                                     std::numeric_limits<int32_t>::max()})},
      {"i64", Make<int64_t>({3}, {std::numeric_limits<int64_t>::min(), 1LL << 40,
                                  std::numeric_limits<int64_t>::max()})},
      {"u8", Make<uint8_t>({1, 1, 3}, {0, 128, 255})},
      {"scalar", Make<float>({}, {42.5f})},
      {"empty", Tensor::Empty({0, 4}, DType::kF32)},
  };
  SafetensorsWriter writer;
  for (const auto& [name, t] : tensors) writer.Add(name, t);
  EXPECT_EQ(writer.size(), tensors.size());
  const std::string path = Path("all.safetensors");
  ASSERT_TRUE(writer.Write(path).ok());

  StatusOr<SafetensorsReader> reader = SafetensorsReader::Open(path);
  ASSERT_TRUE(reader.ok()) << reader.status().message();
  EXPECT_EQ(reader->names(), (std::vector<std::string>{"bf16", "empty", "f32", "f64", "i32", "i64",
                                                       "scalar", "u8"}));
  EXPECT_TRUE(reader->metadata().empty());
  EXPECT_FALSE(reader->Has("F32"));
  for (const auto& [name, t] : tensors) {
    SCOPED_TRACE(name);
    EXPECT_TRUE(reader->Has(name));
    StatusOr<Tensor> got = reader->Get(name);
    ASSERT_TRUE(got.ok()) << got.status().message();
    EXPECT_EQ(got->dtype(), t.dtype());
    EXPECT_EQ(got->shape(), t.shape());
    EXPECT_TRUE(got->is_contiguous());
    EXPECT_TRUE(got->owns_storage());
    EXPECT_EQ(TensorBytes(*got), TensorBytes(t));
  }
  EXPECT_EQ(reader->Get("scalar")->ndim(), 0);
  EXPECT_EQ(reader->Get("scalar")->data<float>()[0], 42.5f);
  EXPECT_EQ(reader->Get("empty")->numel(), 0);
  EXPECT_EQ(reader->Get("i64")->data<int64_t>()[1], 1LL << 40);

  // The reader's tensors are copies: changing one changes neither the file nor a later Get.
  Tensor f = *reader->Get("f32");
  f.data<float>()[0] = 99.0f;
  EXPECT_EQ(reader->Get("f32")->data<float>()[0], 0.5f);
}

TEST_F(SafetensorsTest, MetadataRoundTrips) {
  SafetensorsWriter writer;
  writer.SetMetadata("format", "pt");
  writer.SetMetadata("step", "1");
  writer.SetMetadata("step", "1200");  // replaces
  writer.SetMetadata("empty", "");
  writer.SetMetadata("note", "caf\xc3\xa9 \"quoted\"\n");
  writer.Add("w", Tensor::Full({2}, 1.0f));
  const std::string path = Path("meta.safetensors");
  ASSERT_TRUE(writer.Write(path).ok());
  StatusOr<SafetensorsReader> reader = SafetensorsReader::Open(path);
  ASSERT_TRUE(reader.ok()) << reader.status().message();
  EXPECT_EQ(reader->metadata(),
            (std::map<std::string, std::string>{{"empty", ""},
                                                {"format", "pt"},
                                                {"note", "caf\xc3\xa9 \"quoted\"\n"},
                                                {"step", "1200"}}));
  EXPECT_EQ(reader->names(), std::vector<std::string>{"w"});

  // Metadata only, no tensors, is a valid file too.
  SafetensorsWriter only_meta;
  only_meta.SetMetadata("k", "v");
  ASSERT_TRUE(only_meta.Write(Path("meta_only.safetensors")).ok());
  reader = SafetensorsReader::Open(Path("meta_only.safetensors"));
  ASSERT_TRUE(reader.ok()) << reader.status().message();
  EXPECT_TRUE(reader->names().empty());
  EXPECT_EQ(reader->metadata().at("k"), "v");
}

TEST_F(SafetensorsTest, StridedTensorsAreWrittenContiguous) {
  Tensor t = Tensor::Empty({2, 3});
  for (int i = 0; i < 6; ++i) t.data<float>()[i] = static_cast<float>(i);
  SafetensorsWriter writer;
  writer.Add("transposed", t.Transpose(0, 1));  // [3, 2]: t[j][i]
  writer.Add("column", t.Slice(1, 1, 2));       // [2, 1]: {1, 4}
  ASSERT_FALSE(t.Transpose(0, 1).is_contiguous());
  ASSERT_FALSE(t.Slice(1, 1, 2).is_contiguous());
  const std::string path = Path("strided.safetensors");
  ASSERT_TRUE(writer.Write(path).ok());

  StatusOr<SafetensorsReader> reader = SafetensorsReader::Open(path);
  ASSERT_TRUE(reader.ok()) << reader.status().message();
  Tensor tr = *reader->Get("transposed");
  EXPECT_EQ(tr.shape(), (Shape{3, 2}));
  const float expected[] = {0, 3, 1, 4, 2, 5};
  for (int i = 0; i < 6; ++i) EXPECT_EQ(tr.data<float>()[i], expected[i]) << i;
  Tensor col = *reader->Get("column");
  EXPECT_EQ(col.shape(), (Shape{2, 1}));
  EXPECT_EQ(col.data<float>()[0], 1.0f);
  EXPECT_EQ(col.data<float>()[1], 4.0f);
  // The file holds exactly 6 + 2 floats of data.
  const std::string bytes = ReadBytes(path);
  EXPECT_EQ(bytes.size(), 8 + LittleEndian64(bytes) + 8 * sizeof(float));
}

TEST_F(SafetensorsTest, HeaderLengthIsLittleEndianAndDataIsEightByteAligned) {
  // Names of 1..9 characters give header lengths of every residue mod 8.
  std::vector<uint64_t> residues;
  for (int len = 1; len <= 9; ++len) {
    SCOPED_TRACE(len);
    const std::string name(len, 'n');
    SafetensorsWriter writer;
    writer.Add(name, Make<int32_t>({3}, {0x01020304, -2, 7}));
    writer.Add("z", Make<BF16>({1}, ToBF16({1.0f})));
    const std::string path = Path("aligned.safetensors");
    ASSERT_TRUE(writer.Write(path).ok());
    const std::string bytes = ReadBytes(path);
    ASSERT_GE(bytes.size(), 8u);
    const uint64_t n = LittleEndian64(bytes);
    EXPECT_EQ(n % 8, 0u) << "data section must start at a multiple of 8";
    ASSERT_EQ(bytes.size(), 8 + n + 12 + 2);
    const std::string header = bytes.substr(8, n);
    // Unpadded JSON, then only spaces (at most 7).
    const size_t json_end = header.find_last_not_of(' ') + 1;
    EXPECT_LE(n - json_end, 7u);
    EXPECT_EQ(header[json_end - 1], '}');
    residues.push_back(json_end % 8);
    const nlohmann::json j = nlohmann::json::parse(header);
    EXPECT_EQ(j[name]["dtype"], "I32");
    EXPECT_EQ(j[name]["shape"], nlohmann::json::array({3}));
    EXPECT_EQ(j[name]["data_offsets"], nlohmann::json::array({0, 12}));  // name order
    EXPECT_EQ(j["z"]["data_offsets"], nlohmann::json::array({12, 14}));
    EXPECT_FALSE(j.contains("__metadata__"));
    // Data: little-endian int32 0x01020304, -2, 7, then bf16 1.0 = 0x3f80.
    EXPECT_EQ(bytes.substr(8 + n), Hex("04030201 feffffff 07000000 803f"));
  }
  std::sort(residues.begin(), residues.end());
  residues.erase(std::unique(residues.begin(), residues.end()), residues.end());
  EXPECT_EQ(residues.size(), 8u) << "every amount of padding was exercised";
}

// The exact bytes the format defines for one F32 tensor "a" = {1.0, 2.0}: the 54-byte JSON
// header padded with 2 spaces to 56 = 0x38, then 1.0f = 0x3f800000 and 2.0f = 0x40000000
// little-endian.
const char kGoldenHeader[] = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";

std::string GoldenFile() {
  return Hex("38 00 00 00 00 00 00 00") + kGoldenHeader + "  " + Hex("0000803f 00000040");
}

TEST_F(SafetensorsTest, ReadsGoldenFile) {
  ASSERT_EQ(sizeof(kGoldenHeader) - 1, 54u);
  const std::string path = Path("golden.safetensors");
  WriteBytes(path, GoldenFile());
  StatusOr<SafetensorsReader> reader = SafetensorsReader::Open(path);
  ASSERT_TRUE(reader.ok()) << reader.status().message();
  EXPECT_EQ(reader->names(), std::vector<std::string>{"a"});
  StatusOr<Tensor> a = reader->Get("a", DType::kF32, {2});
  ASSERT_TRUE(a.ok()) << a.status().message();
  EXPECT_EQ(a->data<float>()[0], 1.0f);
  EXPECT_EQ(a->data<float>()[1], 2.0f);

  // With metadata, unpadded (padding is what writers do, not what readers require), and a
  // second tensor: bf16 -2.0 = 0xc000, i64 [] = -3.
  const std::string header =
      R"({"__metadata__":{"format":"pt"},"b":{"dtype":"BF16","shape":[1],"data_offsets":[0,2]},)"
      R"("c":{"dtype":"I64","shape":[],"data_offsets":[2,10]}})";
  WriteBytes(path, FileBytes(header, Hex("00c0 fdffffffffffffff")));
  reader = SafetensorsReader::Open(path);
  ASSERT_TRUE(reader.ok()) << reader.status().message();
  EXPECT_EQ(reader->metadata().at("format"), "pt");
  EXPECT_EQ(BF16ToFloat(reader->Get("b")->data<BF16>()[0]), -2.0f);
  EXPECT_EQ(reader->Get("c")->shape(), Shape{});
  EXPECT_EQ(reader->Get("c")->data<int64_t>()[0], -3);
}

TEST_F(SafetensorsTest, WritesGoldenBytes) {
  SafetensorsWriter writer;
  writer.Add("a", Make<float>({2}, {1.0f, 2.0f}));
  const std::string path = Path("golden.safetensors");
  ASSERT_TRUE(writer.Write(path).ok());
  EXPECT_EQ(ReadBytes(path), GoldenFile());

  // With metadata: it comes first; 85 bytes of JSON padded to 88 = 0x58.
  writer.SetMetadata("format", "pt");
  ASSERT_TRUE(writer.Write(path).ok());
  EXPECT_EQ(ReadBytes(path),
            Hex("58 00 00 00 00 00 00 00") +
                R"({"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2],)"
                R"("data_offsets":[0,8]}})" +
                "   " + Hex("0000803f 00000040"));
}

struct CorruptCase {
  const char* what;
  std::string bytes;
  std::string error;  // expected after "<path>: "
};

TEST_F(SafetensorsTest, CorruptFilesGiveErrorsNamingFileAndTensor) {
  const std::string f32x2 = Hex("0000803f 00000040");  // {1, 2}
  std::string valid_written;
  {
    SafetensorsWriter writer;
    writer.Add("a", Make<float>({2}, {1.0f, 2.0f}));
    writer.Add("b", Make<int32_t>({3}, {1, 2, 3}));
    ASSERT_TRUE(writer.Write(Path("valid.safetensors")).ok());
    valid_written = ReadBytes(Path("valid.safetensors"));
  }
  const uint64_t valid_header = LittleEndian64(valid_written);
  const std::vector<CorruptCase> cases = {
      {"empty file", "", "file is 0 bytes, too short for the 8-byte header length"},
      {"five bytes", Hex("0800000000"), "file is 5 bytes, too short for the 8-byte header length"},
      {"header length larger than file", Hex("e803000000000000") + "{}",
       "header length 1000 is more than the 2 bytes that follow it"},
      {"header length near 2^64", Hex("ffffffffffffffff") + "{}",
       "header length 18446744073709551615 is more than the 2 bytes that follow it"},
      {"truncated in the header", valid_written.substr(0, 8 + valid_header / 2),
       "header length " + std::to_string(valid_header) + " is more than the " +
           std::to_string(valid_header / 2) + " bytes"},
      {"truncated in the data", valid_written.substr(0, valid_written.size() - 4),
       "tensor 'b': data_offsets [8, 20] reach past the end of the data section (16 bytes)"},
      {"bad JSON", FileBytes(R"({"a":{"dtype":"F32",)", ""), "header is not valid JSON: "},
      {"header not an object", FileBytes("[1, 2]", ""), "header is [1,2], not a JSON object"},
      {"entry not an object", FileBytes(R"({"a":3})", ""), "tensor 'a': entry is 3"},
      {"missing data_offsets", FileBytes(R"({"a":{"dtype":"F32","shape":[2]}})", f32x2),
       "tensor 'a': no \"data_offsets\""},
      {"unknown dtype",
       FileBytes(R"({"a":{"dtype":"F16","shape":[4],"data_offsets":[0,8]}})", f32x2),
       "tensor 'a': dtype \"F16\" is not supported (supported: F32, BF16, F64, I32, I64, U8)"},
      {"dtype not a string",
       FileBytes(R"({"a":{"dtype":4,"shape":[2],"data_offsets":[0,8]}})", f32x2),
       "tensor 'a': dtype 4 is not supported"},
      {"negative dimension",
       FileBytes(R"({"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", f32x2),
       "tensor 'a': shape [-2] is not a list of non-negative integers"},
      {"fractional dimension",
       FileBytes(R"({"a":{"dtype":"F32","shape":[2.5],"data_offsets":[0,8]}})", f32x2),
       "tensor 'a': shape [2.5] is not a list of non-negative integers"},
      {"shape overflows",
       FileBytes(R"({"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]}})",
                 f32x2),
       "tensor 'a': shape [4294967296, 4294967296] F32 is too large to address"},
      {"offsets reversed",
       FileBytes(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}})", f32x2),
       "tensor 'a': data_offsets [8,0] is not [begin, end] with 0 <= begin <= end"},
      {"offsets not a pair",
       FileBytes(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0]}})", f32x2),
       "tensor 'a': data_offsets [0] is not [begin, end]"},
      {"wrong size for shape",
       FileBytes(R"({"x":{"dtype":"F32","shape":[2,3],"data_offsets":[0,12]}})",
                 std::string(12, '\0')),
       "tensor 'x': data_offsets [0, 12] hold 12 bytes but shape [2, 3] F32 needs 24"},
      {"offsets out of range",
       FileBytes(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})", f32x2),
       "tensor 'a': data_offsets [8, 16] reach past the end of the data section (8 bytes)"},
      {"overlapping tensors",
       FileBytes(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                 R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                 std::string(12, '\0')),
       "tensor 'b': data_offsets [4, 12] overlap tensor 'a' at [0, 8]"},
      {"same bytes twice",
       FileBytes(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                 R"("b":{"dtype":"I32","shape":[2],"data_offsets":[0,8]}})",
                 f32x2),
       "tensor 'b': data_offsets [0, 8] overlap tensor 'a' at [0, 8]"},
      {"gap between tensors",
       FileBytes(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                 R"("b":{"dtype":"F32","shape":[1],"data_offsets":[12,16]}})",
                 std::string(16, '\0')),
       "tensor 'b': data_offsets [12, 16] leave bytes [8, 12] of the data section unused after "
       "tensor 'a'"},
      {"trailing bytes",
       FileBytes(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", f32x2 + "xyz"),
       "the data section is 11 bytes but the tensors end at byte 8 (trailing bytes after "
       "tensor 'a')"},
      {"metadata not strings", FileBytes(R"({"__metadata__":{"k":2}})", ""),
       "__metadata__ 'k' is 2, not a string"},
  };
  const std::string path = Path("case.safetensors");
  for (const CorruptCase& c : cases) {
    SCOPED_TRACE(c.what);
    WriteBytes(path, c.bytes);
    StatusOr<SafetensorsReader> reader = SafetensorsReader::Open(path);
    ASSERT_FALSE(reader.ok());
    const std::string& message = reader.status().message();
    EXPECT_EQ(message.rfind(path + ": ", 0), 0u) << message;
    EXPECT_NE(message.find(path + ": " + c.error), std::string::npos) << message;
  }
  // The example of the contract, in full.
  WriteBytes(path, FileBytes(R"({"x":{"dtype":"F32","shape":[2,3],"data_offsets":[0,12]}})",
                             std::string(12, '\0')));
  EXPECT_EQ(
      SafetensorsReader::Open(path).status().message(),
      path + ": tensor 'x': data_offsets [0, 12] hold 12 bytes but shape [2, 3] F32 needs 24");

  // A missing file and a directory.
  StatusOr<SafetensorsReader> missing = SafetensorsReader::Open(Path("nope.safetensors"));
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.status().message(),
            Path("nope.safetensors") + ": cannot open: No such file or directory");
  StatusOr<SafetensorsReader> directory = SafetensorsReader::Open(dir_.string());
  ASSERT_FALSE(directory.ok());
  EXPECT_NE(directory.status().message().find("Is a directory"), std::string::npos);
}

TEST_F(SafetensorsTest, GetChecksExpectedDTypeAndShape) {
  SafetensorsWriter writer;
  writer.Add("w", Tensor::Full({2, 3}, 0.5f));
  const std::string path = Path("w.safetensors");
  ASSERT_TRUE(writer.Write(path).ok());
  StatusOr<SafetensorsReader> reader = SafetensorsReader::Open(path);
  ASSERT_TRUE(reader.ok()) << reader.status().message();

  EXPECT_TRUE(reader->Get("w", DType::kF32, {2, 3}).ok());
  EXPECT_TRUE(reader->Get("w", DType::kF32, {-1, 3}).ok());
  EXPECT_TRUE(reader->Get("w", DType::kF32, {-1, -1}).ok());
  EXPECT_EQ(reader->Get("w", DType::kF32, {-1, 3})->data<float>()[5], 0.5f);

  EXPECT_EQ(reader->Get("w", DType::kBF16, {2, 3}).status().message(),
            path + ": tensor 'w': dtype is F32, expected BF16");
  EXPECT_EQ(reader->Get("w", DType::kF32, {3, 2}).status().message(),
            path + ": tensor 'w': shape is [2, 3], expected [3, 2]");
  EXPECT_EQ(reader->Get("w", DType::kF32, {2, -1, 1}).status().message(),
            path + ": tensor 'w': shape is [2, 3], expected [2, -1, 1] (-1: any size)");
  EXPECT_EQ(reader->Get("w", DType::kF32, {}).status().message(),
            path + ": tensor 'w': shape is [2, 3], expected []");
  EXPECT_EQ(reader->Get("v").status().message(),
            path + ": tensor 'v': no such tensor (the file holds 1: 'w')");
  EXPECT_EQ(reader->Get("v", DType::kF32, {2, 3}).status().message(),
            path + ": tensor 'v': no such tensor (the file holds 1: 'w')");
}

TEST_F(SafetensorsTest, WriteIntoMissingDirectoryFailsAndCreatesNothing) {
  SafetensorsWriter writer;
  writer.Add("a", Tensor::Full({4}, 1.0f));
  const std::string path = Path("no_such_dir/x.safetensors");
  const Status s = writer.Write(path);
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.message().rfind("cannot write " + path + ": ", 0), 0u) << s.message();
  EXPECT_NE(s.message().find("No such file or directory"), std::string::npos) << s.message();
  EXPECT_TRUE(Listing().empty());
}

TEST_F(SafetensorsTest, WriteReplacesExistingFileAtomically) {
  const std::string path = Path("ckpt.safetensors");
  SafetensorsWriter old_writer;
  old_writer.Add("a", Tensor::Full({3}, 1.0f));
  ASSERT_TRUE(old_writer.Write(path).ok());
  const std::string old_bytes = ReadBytes(path);
  struct stat old_stat;
  ASSERT_EQ(stat(path.c_str(), &old_stat), 0);
  // A reader that opened the old file before the write keeps seeing the old file whole: the
  // new file arrives by rename, never by rewriting the old one in place.
  const int old_fd = open(path.c_str(), O_RDONLY);
  ASSERT_GE(old_fd, 0);

  SafetensorsWriter new_writer;
  new_writer.Add("a", Tensor::Full({3}, 2.0f));
  new_writer.Add("b", Tensor::Full({100}, 3.0f));
  ASSERT_TRUE(new_writer.Write(path).ok());

  std::string seen(old_bytes.size() + 100, '\0');
  const ssize_t n = pread(old_fd, seen.data(), seen.size(), 0);
  close(old_fd);
  ASSERT_EQ(n, static_cast<ssize_t>(old_bytes.size()));
  seen.resize(n);
  EXPECT_EQ(seen, old_bytes);
  struct stat new_stat;
  ASSERT_EQ(stat(path.c_str(), &new_stat), 0);
  EXPECT_NE(new_stat.st_ino, old_stat.st_ino);

  StatusOr<SafetensorsReader> reader = SafetensorsReader::Open(path);
  ASSERT_TRUE(reader.ok()) << reader.status().message();
  EXPECT_EQ(reader->names(), (std::vector<std::string>{"a", "b"}));
  EXPECT_EQ(reader->Get("a")->data<float>()[2], 2.0f);
  EXPECT_EQ(Listing(), std::vector<std::string>{"ckpt.safetensors"});  // no temporary left
}

TEST_F(SafetensorsTest, FailedWriteLeavesOldFileAndNoTemporary) {
  const std::string path = Path("ckpt.safetensors");
  SafetensorsWriter old_writer;
  old_writer.Add("a", Tensor::Full({3}, 1.0f));
  ASSERT_TRUE(old_writer.Write(path).ok());
  const std::string old_bytes = ReadBytes(path);

  // The disk "fills up" mid-write: files may not grow past 4 KiB, and the new file is 64 KiB.
  SafetensorsWriter big;
  big.Add("a", Tensor::Full({16384}, 2.0f));
  struct rlimit saved;
  ASSERT_EQ(getrlimit(RLIMIT_FSIZE, &saved), 0);
  struct rlimit small = saved;
  small.rlim_cur = 4096;
  auto* old_handler = signal(SIGXFSZ, SIG_IGN);  // write() then fails with EFBIG
  ASSERT_EQ(setrlimit(RLIMIT_FSIZE, &small), 0);
  const Status s = big.Write(path);
  ASSERT_EQ(setrlimit(RLIMIT_FSIZE, &saved), 0);
  signal(SIGXFSZ, old_handler);
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.message().rfind("cannot write " + path + ": ", 0), 0u) << s.message();
  EXPECT_NE(s.message().find(std::strerror(EFBIG)), std::string::npos) << s.message();
  EXPECT_EQ(ReadBytes(path), old_bytes);
  EXPECT_EQ(Listing(), std::vector<std::string>{"ckpt.safetensors"});

  // The destination is a directory: the rename fails, the temporary goes away.
  fs::create_directory(Path("dir.safetensors"));
  const Status d = big.Write(Path("dir.safetensors"));
  ASSERT_FALSE(d.ok());
  EXPECT_EQ(d.message().rfind("cannot write " + Path("dir.safetensors") + ": renaming ", 0), 0u)
      << d.message();
  EXPECT_EQ(Listing(), (std::vector<std::string>{"ckpt.safetensors", "dir.safetensors"}));
  EXPECT_TRUE(fs::is_empty(Path("dir.safetensors")));
}

TEST_F(SafetensorsTest, WriterValuesAreThoseAtWriteTime) {
  Tensor t = Tensor::Full({2}, 1.0f);
  SafetensorsWriter writer;
  writer.Add("t", t);
  t.data<float>()[1] = 5.0f;  // the writer refers to t's storage
  ASSERT_TRUE(writer.Write(Path("t.safetensors")).ok());
  EXPECT_EQ(SafetensorsReader::Open(Path("t.safetensors"))->Get("t")->data<float>()[1], 5.0f);
}

TEST_F(SafetensorsTest, WriterRejectsNamesThatCannotBeWritten) {
  SafetensorsWriter writer;
  writer.Add("a", Tensor::Full({1}, 1.0f));
  EXPECT_DEATH(writer.Add("a", Tensor::Full({1}, 2.0f)), "duplicate tensor name 'a'");
  EXPECT_DEATH(writer.Add("__metadata__", Tensor::Full({1}, 2.0f)), "cannot be named");
  EXPECT_DEATH(writer.Add("u", Tensor()), "tensor 'u' is undefined");

  // A name that is not UTF-8 cannot go into the JSON header: an error, and no file.
  writer.Add("bad\xff", Tensor::Full({1}, 1.0f));
  const Status s = writer.Write(Path("bad.safetensors"));
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("not valid UTF-8"), std::string::npos) << s.message();
  EXPECT_TRUE(Listing().empty());
}

}  // namespace
}  // namespace moerun
