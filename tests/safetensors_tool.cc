// Helper for tests/safetensors_interop.py: writes a known safetensors file, or reads any
// safetensors file and prints what it holds as JSON lines, so the Python side can compare
// our files with the official `safetensors` package both ways.
//
//   safetensors_tool write PATH   F32 "f32" [2, 3] = 0..5, I32 "i32" [4] = 10..13,
//                                 BF16 "bf16" [2] = {1.5, -2}, metadata {"k": "2",
//                                 "name": "test"}
//   safetensors_tool read PATH    one line per tensor in name order:
//                                   {"tensor":NAME,"dtype":"F32","shape":[2,3],"sum":15.0}
//                                 then one line per metadata entry:
//                                   {"metadata":KEY,"value":VALUE}
// Exit codes: 0 success, 1 the file could not be written or read (message on stderr), 2 usage.
#include <cstdint>
#include <cstdio>
#include <iostream>
#include <nlohmann/json.hpp>
#include <string>

#include "runtime/safetensors.h"

namespace moerun {
namespace {

double Sum(const Tensor& t) {
  double sum = 0;
  const int64_t n = t.numel();
  for (int64_t i = 0; i < n; ++i) {
    switch (t.dtype()) {
      case DType::kF32:
        sum += t.data<float>()[i];
        break;
      case DType::kBF16:
        sum += BF16ToFloat(t.data<BF16>()[i]);
        break;
      case DType::kF64:
        sum += t.data<double>()[i];
        break;
      case DType::kI32:
        sum += t.data<int32_t>()[i];
        break;
      case DType::kI64:
        sum += static_cast<double>(t.data<int64_t>()[i]);
        break;
      case DType::kU8:
        sum += t.data<uint8_t>()[i];
        break;
    }
  }
  return sum;
}

int Write(const std::string& path) {
  Tensor f32 = Tensor::Empty({2, 3}, DType::kF32);
  for (int i = 0; i < 6; ++i) f32.data<float>()[i] = static_cast<float>(i);
  Tensor i32 = Tensor::Empty({4}, DType::kI32);
  for (int i = 0; i < 4; ++i) i32.data<int32_t>()[i] = 10 + i;
  Tensor bf16 = Tensor::Empty({2}, DType::kBF16);
  bf16.data<BF16>()[0] = FloatToBF16(1.5f);
  bf16.data<BF16>()[1] = FloatToBF16(-2.0f);

  SafetensorsWriter writer;
  writer.Add("f32", f32);
  writer.Add("i32", i32);
  writer.Add("bf16", bf16);
  writer.SetMetadata("k", "2");
  writer.SetMetadata("name", "test");
  const Status s = writer.Write(path);
  if (!s.ok()) {
    std::cerr << "safetensors_tool: " << s.message() << "\n";
    return 1;
  }
  return 0;
}

int Read(const std::string& path) {
  StatusOr<SafetensorsReader> reader = SafetensorsReader::Open(path);
  if (!reader.ok()) {
    std::cerr << "safetensors_tool: " << reader.status().message() << "\n";
    return 1;
  }
  for (const std::string& name : reader->names()) {
    StatusOr<Tensor> t = reader->Get(name);
    if (!t.ok()) {
      std::cerr << "safetensors_tool: " << t.status().message() << "\n";
      return 1;
    }
    nlohmann::ordered_json line;
    line["tensor"] = name;
    line["dtype"] = DTypeName(t->dtype());
    line["shape"] = t->shape();
    line["sum"] = Sum(*t);
    std::cout << line.dump() << "\n";
  }
  for (const auto& [key, value] : reader->metadata()) {
    nlohmann::ordered_json line;
    line["metadata"] = key;
    line["value"] = value;
    std::cout << line.dump() << "\n";
  }
  return 0;
}

}  // namespace
}  // namespace moerun

int main(int argc, char** argv) {
  const std::string mode = argc == 3 ? argv[1] : "";
  if (mode == "write") return moerun::Write(argv[2]);
  if (mode == "read") return moerun::Read(argv[2]);
  std::fprintf(stderr, "usage: %s write|read PATH\n", argv[0]);
  return 2;
}
