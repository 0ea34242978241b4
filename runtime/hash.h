// Small, well-known integer hashes used to derive independent random streams from a seed
// and a key (a step, a dataset index, a parameter name), so that random numbers depend on
// what they are for, never on the order they are drawn in or the number of ranks.
#ifndef MOERUN_RUNTIME_HASH_H_
#define MOERUN_RUNTIME_HASH_H_

#include <cstdint>
#include <string>

namespace moerun {

// SplitMix64's finaliser (Steele, Lea, Flood 2014): a bijective 64-bit mix.
inline uint64_t SplitMix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

// 64-bit FNV-1a of a string.
inline uint64_t Fnv1a(const std::string& s) {
  uint64_t h = 0xcbf29ce484222325ULL;
  for (unsigned char c : s) h = (h ^ c) * 0x100000001b3ULL;
  return h;
}

}  // namespace moerun

#endif  // MOERUN_RUNTIME_HASH_H_
