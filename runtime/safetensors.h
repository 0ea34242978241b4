// Reading and writing safetensors files (https://github.com/huggingface/safetensors), the
// checkpoint format of the PyTorch / JAX / NumPy ecosystem: named tensors plus string metadata.
//
// The format: an 8-byte little-endian uint64 N, then N bytes of UTF-8 JSON (the header), then
// the data section. The header maps each tensor name to
//   {"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]}
// where the offsets are bytes relative to the start of the data section (end exclusive), and
// may hold "__metadata__": {string: string}. Tensor data is little-endian and row-major, and
// the tensors tile the data section exactly: no gaps, no overlaps, no trailing bytes.
// Supported dtypes are those of runtime/dtype.h: F32, BF16, F64, I32, I64, U8.
#ifndef MOERUN_RUNTIME_SAFETENSORS_H_
#define MOERUN_RUNTIME_SAFETENSORS_H_

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "runtime/dtype.h"
#include "runtime/status.h"
#include "runtime/tensor.h"

namespace moerun {

// The dtype a safetensors name ("F32", "BF16", ...) stands for; false for other names.
bool ParseDType(const std::string& name, DType* out);

// A whole safetensors file read into memory and validated. Every error message names the
// file (as given to Open) and, where there is one, the tensor, and says what is wrong, e.g.
//   "case.safetensors: tensor 'x': data_offsets [0, 12] hold 12 bytes but shape [2, 3] F32
//    needs 24".
// Copies share the file's bytes; a reader is safe to use from several threads at once.
class SafetensorsReader {
 public:
  // Reads `path` and checks: the file holds the 8-byte header length and the header; the
  // header is a JSON object; "__metadata__", if present, maps strings to strings; every other
  // entry has a supported dtype, a shape of non-negative integers and data_offsets
  // [begin, end] with end - begin = numel * dtype size, inside the data section; the tensors
  // neither overlap nor leave gaps, and end exactly where the file ends (as the official
  // reader requires).
  static StatusOr<SafetensorsReader> Open(const std::string& path);

  const std::string& path() const { return path_; }
  // The "__metadata__" entries; empty when the file has none.
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  // Every tensor name, sorted.
  std::vector<std::string> names() const;
  bool Has(const std::string& name) const;

  // A new owning, contiguous copy of the tensor; an error when there is no such tensor.
  StatusOr<Tensor> Get(const std::string& name) const;
  // The same, and an error naming the tensor when its dtype is not `expected` or its shape
  // does not match `expected_shape`, where a -1 entry matches any size of that dimension.
  StatusOr<Tensor> Get(const std::string& name, DType expected, const Shape& expected_shape) const;

 private:
  struct Entry {
    DType dtype;
    Shape shape;
    uint64_t begin;  // byte offsets into the data section
    uint64_t end;
  };

  SafetensorsReader() = default;
  std::string Where(const std::string& name) const;  // "path: tensor 'name'"

  std::string path_;
  std::shared_ptr<const std::vector<char>> bytes_;  // the whole file
  size_t data_start_ = 0;                           // 8 + header length
  std::map<std::string, Entry> entries_;
  std::map<std::string, std::string> metadata_;
};

// Collects named tensors and metadata, then writes them as one safetensors file.
//
// Layout: tensors packed without gaps in name order; the JSON header compact, "__metadata__"
// first (only when metadata was set), each entry's keys "dtype", "shape", "data_offsets" in
// that order, padded with spaces so the data section starts at a multiple of 8 bytes. This is
// byte for byte what the official writer produces when all tensors share one dtype (it orders
// mixed dtypes widest first, then by name; readers accept either order).
// Where Write() put each tensor, with checksums (used by checkpoint manifests).
struct SafetensorsLayout {
  struct Entry {
    std::string name;
    uint64_t begin = 0, end = 0;  // absolute byte range in the file
    uint32_t crc32c = 0;          // CRC-32C of those bytes
  };
  uint64_t header_bytes = 0;   // 8 + JSON header length: where the data section starts
  uint32_t header_crc32c = 0;  // CRC-32C of those first header_bytes bytes
  uint64_t file_size = 0;
  std::vector<Entry> tensors;  // in file (name) order
};

class SafetensorsWriter {
 public:
  // Sets (or replaces) one "__metadata__" entry.
  void SetMetadata(const std::string& key, const std::string& value);
  // Adds a tensor under `name`. The writer keeps a reference to the tensor's storage (no copy):
  // the values written are those the storage holds when Write() runs. The tensor may be
  // strided; it is written contiguous. A duplicate or empty name, the name "__metadata__", an
  // undefined tensor or a tensor off the CPU is a programming error (CHECK).
  void Add(const std::string& name, const Tensor& tensor);

  // Writes the file atomically: to `path + ".tmp.<pid>"`, flushed and fsync'ed, then renamed
  // over `path` (the directory is then fsync'ed, best effort). On failure the temporary file is
  // removed, `path` is left as it was (absent, or the previous file whole), and the Status
  // names the path and the system's reason (strerror).
  // With `layout`, also reports where each tensor went and its CRC-32C (computed from the
  // bytes as they are written). `atomic` false writes `path` in place (still fsync'ed): for
  // a file inside a directory that is itself committed atomically (checkpoints).
  Status Write(const std::string& path, SafetensorsLayout* layout = nullptr,
               bool atomic = true) const;

  size_t size() const { return tensors_.size(); }

 private:
  std::map<std::string, Tensor> tensors_;
  std::map<std::string, std::string> metadata_;
};

}  // namespace moerun

#endif  // MOERUN_RUNTIME_SAFETENSORS_H_
