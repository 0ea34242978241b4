// CRC-32C: the SSE4.2 instruction when available, Boost.CRC otherwise.
#include "runtime/crc32c.h"

#include <boost/crc.hpp>
#include <cstring>

#if defined(__SSE4_2__)
#include <nmmintrin.h>
#endif

namespace moerun {

uint32_t Crc32cPortable(uint32_t crc, const void* data, size_t n) {
  // Boost's augmented state is the pre-final-xor register: resume from ~crc.
  boost::crc_optimal<32, 0x1EDC6F41, 0xFFFFFFFF, 0xFFFFFFFF, true, true> c(~crc);
  c.process_bytes(data, n);
  return c.checksum();
}

uint32_t Crc32cExtend(uint32_t crc, const void* data, size_t n) {
#if defined(__SSE4_2__)
  const unsigned char* p = static_cast<const unsigned char*>(data);
  uint64_t c = ~crc & 0xFFFFFFFFu;
  while (n > 0 && (reinterpret_cast<uintptr_t>(p) & 7) != 0) {
    c = _mm_crc32_u8(static_cast<uint32_t>(c), *p++);
    --n;
  }
  while (n >= 8) {
    uint64_t w;
    std::memcpy(&w, p, 8);
    c = _mm_crc32_u64(c, w);
    p += 8;
    n -= 8;
  }
  while (n > 0) {
    c = _mm_crc32_u8(static_cast<uint32_t>(c), *p++);
    --n;
  }
  return ~static_cast<uint32_t>(c);
#else
  return Crc32cPortable(crc, data, n);
#endif
}

}  // namespace moerun
