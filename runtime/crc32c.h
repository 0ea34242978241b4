// CRC-32C (Castagnoli, polynomial 0x1EDC6F41, reflected, init and final xor 0xFFFFFFFF),
// the checksum of checkpoint pieces: the same as Python's crc32c / google_crc32c packages.
#ifndef MOERUN_RUNTIME_CRC32C_H_
#define MOERUN_RUNTIME_CRC32C_H_

#include <cstddef>
#include <cstdint>

namespace moerun {

// Extends `crc` (the value returned for the bytes before) over n more bytes; start with 0.
// Crc32c("123456789") == 0xE3069283. Uses the SSE4.2 crc32 instruction where the build
// targets it, else Boost.CRC.
uint32_t Crc32cExtend(uint32_t crc, const void* data, size_t n);
inline uint32_t Crc32c(const void* data, size_t n) { return Crc32cExtend(0, data, n); }
// Always Boost.CRC (the reference the fast path is tested against).
uint32_t Crc32cPortable(uint32_t crc, const void* data, size_t n);

}  // namespace moerun

#endif  // MOERUN_RUNTIME_CRC32C_H_
