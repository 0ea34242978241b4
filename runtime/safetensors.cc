// Safetensors reading (whole file into memory, then strict validation of the JSON header
// against the data section) and atomic writing (temporary file, fsync, rename).
#include "runtime/safetensors.h"

#include <errno.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <exception>
#include <nlohmann/json.hpp>
#include <utility>

#include "runtime/crc32c.h"

namespace moerun {
namespace {

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
              "safetensors data is little-endian and is copied as is");

using Json = nlohmann::json;

constexpr DType kSupported[] = {DType::kF32, DType::kBF16, DType::kF64,
                                DType::kI32, DType::kI64,  DType::kU8};
constexpr const char* kMetadataKey = "__metadata__";

std::string SupportedNames() {
  std::string s;
  for (DType t : kSupported) s += std::string(s.empty() ? "" : ", ") + DTypeName(t);
  return s;
}

// A JSON value for a message, cut short when long.
std::string Show(const Json& j) {
  std::string s = j.dump(-1, ' ', false, Json::error_handler_t::replace);
  return s.size() > 80 ? s.substr(0, 77) + "..." : s;
}

std::string Range(uint64_t begin, uint64_t end) {
  return "[" + std::to_string(begin) + ", " + std::to_string(end) + "]";
}

// A JSON integer >= 0 (and <= INT64_MAX, so it fits every use here).
bool NonNegativeInt(const Json& j, int64_t* out) {
  if (j.is_number_unsigned()) {
    const uint64_t v = j.get<uint64_t>();
    if (v > static_cast<uint64_t>(INT64_MAX)) return false;
    *out = static_cast<int64_t>(v);
    return true;
  }
  if (j.is_number_integer()) {
    const int64_t v = j.get<int64_t>();
    if (v < 0) return false;
    *out = v;
    return true;
  }
  return false;
}

Status ReadWholeFile(const std::string& path, std::vector<char>* out) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return Status::Error(path + ": cannot open: " + std::strerror(errno));
  struct stat st;
  const bool stat_ok = ::fstat(fd, &st) == 0;
  if (!stat_ok || S_ISDIR(st.st_mode)) {
    const int err = stat_ok ? EISDIR : errno;
    ::close(fd);
    return Status::Error(path + ": cannot read: " + std::strerror(err));
  }
  out->resize(static_cast<size_t>(st.st_size));
  size_t got = 0;
  while (got < out->size()) {
    const ssize_t n = ::read(fd, out->data() + got, out->size() - got);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      const int err = errno;
      ::close(fd);
      return Status::Error(path + ": cannot read: " + std::strerror(err));
    }
    if (n == 0) break;  // the file shrank meanwhile
    got += static_cast<size_t>(n);
  }
  out->resize(got);
  ::close(fd);
  return Status::Ok();
}

}  // namespace

// ---------------------------------------------------------------------------------------
StatusOr<SafetensorsReader> SafetensorsReader::Open(const std::string& path) {
  auto bytes = std::make_shared<std::vector<char>>();
  MOERUN_RETURN_IF_ERROR(ReadWholeFile(path, bytes.get()));
  const size_t size = bytes->size();
  if (size < 8) {
    return Status::Error(path + ": file is " + std::to_string(size) +
                         " bytes, too short for the 8-byte header length");
  }
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) {
    header_len = header_len << 8 | static_cast<unsigned char>((*bytes)[i]);
  }
  if (header_len > size - 8) {
    return Status::Error(path + ": header length " + std::to_string(header_len) +
                         " is more than the " + std::to_string(size - 8) +
                         " bytes that follow it (truncated or not a safetensors file)");
  }

  Json header;
  try {
    const char* begin = bytes->data() + 8;
    header = Json::parse(begin, begin + header_len);
  } catch (const std::exception& e) {
    return Status::Error(path + ": header is not valid JSON: " + e.what());
  }
  if (!header.is_object()) {
    return Status::Error(path + ": header is " + Show(header) + ", not a JSON object");
  }

  SafetensorsReader reader;
  reader.path_ = path;
  reader.data_start_ = 8 + static_cast<size_t>(header_len);
  const uint64_t data_size = size - reader.data_start_;

  for (const auto& [name, value] : header.items()) {
    if (name == kMetadataKey) {
      if (!value.is_object()) {
        return Status::Error(path + ": __metadata__ is " + Show(value) +
                             ", not an object of strings");
      }
      for (const auto& [key, v] : value.items()) {
        if (!v.is_string()) {
          return Status::Error(path + ": __metadata__ '" + key + "' is " + Show(v) +
                               ", not a string");
        }
        reader.metadata_[key] = v.get<std::string>();
      }
      continue;
    }
    const std::string where = reader.Where(name);
    if (!value.is_object()) {
      return Status::Error(where + ": entry is " + Show(value) + ", not an object");
    }
    for (const char* key : {"dtype", "shape", "data_offsets"}) {
      if (!value.contains(key)) return Status::Error(where + ": no \"" + key + "\"");
    }
    Entry e;
    const Json& dtype = value.at("dtype");
    if (!dtype.is_string() || !ParseDType(dtype.get<std::string>(), &e.dtype)) {
      return Status::Error(where + ": dtype " + Show(dtype) +
                           " is not supported (supported: " + SupportedNames() + ")");
    }
    const Json& shape = value.at("shape");
    bool shape_ok = shape.is_array();
    int64_t numel = 1;
    bool overflow = false;
    if (shape_ok) {
      for (const Json& d : shape) {
        int64_t v;
        if (!NonNegativeInt(d, &v)) {
          shape_ok = false;
          break;
        }
        e.shape.push_back(v);
        overflow = overflow || __builtin_mul_overflow(numel, v, &numel);
      }
    }
    if (!shape_ok) {
      return Status::Error(where + ": shape " + Show(shape) +
                           " is not a list of non-negative integers");
    }
    const std::string shape_text = ShapeToString(e.shape) + " " + DTypeName(e.dtype);
    int64_t needed = 0;
    if (overflow ||
        __builtin_mul_overflow(numel, static_cast<int64_t>(DTypeSize(e.dtype)), &needed)) {
      return Status::Error(where + ": shape " + shape_text + " is too large to address");
    }
    const Json& offsets = value.at("data_offsets");
    int64_t begin = 0, end = 0;
    if (!offsets.is_array() || offsets.size() != 2 || !NonNegativeInt(offsets[0], &begin) ||
        !NonNegativeInt(offsets[1], &end) || begin > end) {
      return Status::Error(where + ": data_offsets " + Show(offsets) +
                           " is not [begin, end] with 0 <= begin <= end");
    }
    e.begin = static_cast<uint64_t>(begin);
    e.end = static_cast<uint64_t>(end);
    if (e.end - e.begin != static_cast<uint64_t>(needed)) {
      return Status::Error(where + ": data_offsets " + Range(e.begin, e.end) + " hold " +
                           std::to_string(e.end - e.begin) + " bytes but shape " + shape_text +
                           " needs " + std::to_string(needed));
    }
    if (e.end > data_size) {
      return Status::Error(where + ": data_offsets " + Range(e.begin, e.end) +
                           " reach past the end of the data section (" + std::to_string(data_size) +
                           " bytes)");
    }
    reader.entries_.emplace(name, std::move(e));
  }

  // The tensors must tile the data section: sorted by offsets, each begins where the one
  // before it ends, and the last ends with the file.
  std::vector<const std::pair<const std::string, Entry>*> order;
  for (const auto& kv : reader.entries_) order.push_back(&kv);
  std::sort(order.begin(), order.end(), [](const auto* a, const auto* b) {
    return std::make_pair(a->second.begin, a->second.end) <
           std::make_pair(b->second.begin, b->second.end);
  });
  uint64_t covered = 0;
  const std::string* previous = nullptr;
  for (const auto* kv : order) {
    const Entry& e = kv->second;
    if (e.begin < covered) {
      const Entry& p = reader.entries_.at(*previous);
      return Status::Error(reader.Where(kv->first) + ": data_offsets " + Range(e.begin, e.end) +
                           " overlap tensor '" + *previous + "' at " + Range(p.begin, p.end));
    }
    if (e.begin > covered) {
      return Status::Error(
          reader.Where(kv->first) + ": data_offsets " + Range(e.begin, e.end) + " leave bytes " +
          Range(covered, e.begin) + " of the data section unused" +
          (previous ? " after tensor '" + *previous + "'" : std::string(" at its start")));
    }
    covered = e.end;
    previous = &kv->first;
  }
  if (covered != data_size) {
    return Status::Error(path + ": the data section is " + std::to_string(data_size) +
                         " bytes but the tensors end at byte " + std::to_string(covered) +
                         " (trailing bytes after " +
                         (previous ? "tensor '" + *previous + "'" : std::string("the header")) +
                         ")");
  }
  reader.bytes_ = std::move(bytes);
  return reader;
}

std::string SafetensorsReader::Where(const std::string& name) const {
  return path_ + ": tensor '" + name + "'";
}

std::vector<std::string> SafetensorsReader::names() const {
  std::vector<std::string> names;
  names.reserve(entries_.size());
  for (const auto& kv : entries_) names.push_back(kv.first);
  return names;
}

bool SafetensorsReader::Has(const std::string& name) const { return entries_.count(name) > 0; }

StatusOr<Tensor> SafetensorsReader::Get(const std::string& name) const {
  const auto it = entries_.find(name);
  if (it == entries_.end()) {
    std::string known;
    int listed = 0;
    for (const auto& kv : entries_) {
      if (listed++ == 8) {
        known += ", ...";
        break;
      }
      known += (known.empty() ? "'" : ", '") + kv.first + "'";
    }
    return Status::Error(Where(name) + ": no such tensor (the file holds " +
                         std::to_string(entries_.size()) + (known.empty() ? "" : ": " + known) +
                         ")");
  }
  const Entry& e = it->second;
  Tensor t = Tensor::Empty(e.shape, e.dtype);
  if (e.end > e.begin) {
    std::memcpy(t.raw_data(), bytes_->data() + data_start_ + e.begin, e.end - e.begin);
  }
  return t;
}

StatusOr<Tensor> SafetensorsReader::Get(const std::string& name, DType expected,
                                        const Shape& expected_shape) const {
  const auto it = entries_.find(name);
  if (it == entries_.end()) return Get(name);  // the "no such tensor" error
  const Entry& e = it->second;
  if (e.dtype != expected) {
    return Status::Error(Where(name) + ": dtype is " + DTypeName(e.dtype) + ", expected " +
                         DTypeName(expected));
  }
  bool match = e.shape.size() == expected_shape.size();
  for (size_t i = 0; match && i < e.shape.size(); ++i) {
    match = expected_shape[i] == -1 || expected_shape[i] == e.shape[i];
  }
  const bool any = std::count(expected_shape.begin(), expected_shape.end(), -1) > 0;
  if (!match) {
    return Status::Error(Where(name) + ": shape is " + ShapeToString(e.shape) + ", expected " +
                         ShapeToString(expected_shape) + (any ? " (-1: any size)" : ""));
  }
  return Get(name);
}

// ---------------------------------------------------------------------------------------
bool ParseDType(const std::string& name, DType* out) {
  for (DType t : kSupported) {
    if (name == DTypeName(t)) {
      *out = t;
      return true;
    }
  }
  return false;
}

void SafetensorsWriter::SetMetadata(const std::string& key, const std::string& value) {
  metadata_[key] = value;
}

void SafetensorsWriter::Add(const std::string& name, const Tensor& tensor) {
  CHECK(!name.empty()) << "safetensors: empty tensor name";
  CHECK(name != kMetadataKey) << "safetensors: a tensor cannot be named " << kMetadataKey;
  CHECK(tensor.defined()) << "safetensors: tensor '" << name << "' is undefined";
  CHECK(tensor.device() == Device::kCPU)
      << "safetensors: tensor '" << name << "' is on " << DeviceName(tensor.device())
      << "; copy it to the CPU first";
  CHECK(tensors_.emplace(name, tensor).second)
      << "safetensors: duplicate tensor name '" << name << "'";
}

Status SafetensorsWriter::Write(const std::string& path, SafetensorsLayout* layout,
                                bool atomic) const {
  // Header: "__metadata__" first, then the tensors in name order with their offsets.
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata_.empty()) {
    nlohmann::ordered_json& m = header[kMetadataKey];
    m = nlohmann::ordered_json::object();
    for (const auto& [k, v] : metadata_) m[k] = v;
  }
  uint64_t offset = 0;
  for (const auto& [name, t] : tensors_) {
    nlohmann::ordered_json entry = nlohmann::ordered_json::object();
    entry["dtype"] = DTypeName(t.dtype());
    entry["shape"] = t.shape();
    entry["data_offsets"] = nlohmann::ordered_json::array({offset, offset + t.nbytes()});
    header[name] = std::move(entry);
    offset += t.nbytes();
  }
  std::string text;
  try {
    text = header.dump();
  } catch (const std::exception& e) {
    return Status::Error("cannot write " + path +
                         ": a tensor name or metadata string is not valid UTF-8 (" + e.what() +
                         ")");
  }
  text.append((8 - text.size() % 8) % 8, ' ');  // the data section starts 8-byte aligned
  unsigned char len[8];
  for (int i = 0; i < 8; ++i) len[i] = static_cast<unsigned char>(text.size() >> (8 * i));

  if (layout != nullptr) {
    *layout = SafetensorsLayout();
    layout->header_bytes = 8 + text.size();
    layout->header_crc32c = Crc32cExtend(Crc32c(len, 8), text.data(), text.size());
    layout->file_size = layout->header_bytes + offset;
  }
  const std::string tmp = atomic ? path + ".tmp." + std::to_string(::getpid()) : path;
  FILE* f = std::fopen(tmp.c_str(), "wbe");
  auto fail = [&](const std::string& step) {
    const int err = errno;
    if (f != nullptr) std::fclose(f);
    ::unlink(tmp.c_str());
    return Status::Error("cannot write " + path + ": " + step + ": " + std::strerror(err));
  };
  if (f == nullptr) return fail("creating " + tmp);
  if (std::fwrite(len, 1, 8, f) != 8 ||
      std::fwrite(text.data(), 1, text.size(), f) != text.size()) {
    return fail("writing " + tmp);
  }
  for (const auto& kv : tensors_) {
    const Tensor c = kv.second.Contiguous();  // one packed copy at a time, if strided
    if (layout != nullptr) {
      const uint64_t begin =
          layout->tensors.empty() ? layout->header_bytes : layout->tensors.back().end;
      layout->tensors.push_back(
          {kv.first, begin, begin + c.nbytes(), Crc32c(c.raw_data(), c.nbytes())});
    }
    if (std::fwrite(c.raw_data(), 1, c.nbytes(), f) != c.nbytes()) return fail("writing " + tmp);
  }
  if (std::fflush(f) != 0) return fail("writing " + tmp);
  if (::fsync(::fileno(f)) != 0) return fail("fsync of " + tmp);
  const int closed = std::fclose(f);
  f = nullptr;
  if (closed != 0) return fail("closing " + tmp);
  if (!atomic) return Status::Ok();
  if (std::rename(tmp.c_str(), path.c_str()) != 0) return fail("renaming " + tmp + " over it");

  // Make the rename itself durable; the file is already complete, so this is best effort.
  const size_t slash = path.rfind('/');
  const std::string dir =
      slash == std::string::npos ? "." : (slash == 0 ? "/" : path.substr(0, slash));
  const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
  return Status::Ok();
}

}  // namespace moerun
