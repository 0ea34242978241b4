// BlockCache (runtime/block_cache.h), the CUDA backend's allocator without memory pools,
// over a host allocator that records every call: reuse, the fit rule, release on a full
// device, and the misuse it refuses.
#include "runtime/block_cache.h"

#include <gtest/gtest.h>

#include <cstdlib>
#include <map>
#include <vector>

namespace moerun {
namespace {

// A "device" of `capacity` bytes: malloc behind a byte count, every call logged.
struct FakeDevice {
  size_t capacity = 1 << 20;
  size_t used = 0;
  int allocs = 0, frees = 0, waits = 0;
  std::map<void*, size_t> live;
  std::vector<size_t> sizes;
  // Read during the wait, which runs without the cache's lock (a wait that polls the device
  // runs checks that may touch the cache): what the cache still holds then.
  BlockCache* cache = nullptr;
  size_t cached_during_wait = 1;
  BlockCache Cache() {
    return BlockCache(
        [this](size_t n) -> void* {
          if (used + n > capacity) return nullptr;
          void* p = std::malloc(n);
          used += n;
          ++allocs;
          live[p] = n;
          sizes.push_back(n);
          return p;
        },
        [this](void* p) {
          EXPECT_GT(waits, 0) << "a block went back before the device's work was waited for";
          ASSERT_EQ(live.count(p), 1u);
          used -= live[p];
          live.erase(p);
          std::free(p);
          ++frees;
        },
        [this] {
          ++waits;
          if (cache != nullptr) cached_during_wait = cache->cached_bytes();
        });
  }
};

TEST(BlockCache, AFreedBlockIsReusedWithoutTheDevice) {
  FakeDevice dev;
  BlockCache cache = dev.Cache();
  void* a = cache.Allocate(1000);
  ASSERT_NE(a, nullptr);
  EXPECT_EQ(dev.sizes.back(), 1024u);  // rounded up to 512-byte units
  cache.Free(a);
  EXPECT_EQ(dev.frees, 0);
  EXPECT_EQ(cache.cached_bytes(), 1024u);
  EXPECT_EQ(cache.Allocate(600), a);  // 1024 fits 600 (rounded 1024)
  EXPECT_EQ(dev.allocs, 1);
  EXPECT_EQ(cache.cached_bytes(), 0u);
  EXPECT_EQ(cache.reserved_bytes(), 1024u);
  cache.Free(a);
}

TEST(BlockCache, BestFitUnderTwiceTheSize) {
  FakeDevice dev;
  BlockCache cache = dev.Cache();
  void* big = cache.Allocate(8192);
  void* mid = cache.Allocate(2048);
  cache.Free(big);
  cache.Free(mid);
  // 1536 bytes: 2048 is the smallest that fits, and under twice 1536.
  EXPECT_EQ(cache.Allocate(1536), mid);
  // 1024 bytes: 8192 fits but is over twice the size, so a new block.
  void* small = cache.Allocate(1024);
  EXPECT_NE(small, big);
  EXPECT_EQ(dev.allocs, 3);
  EXPECT_EQ(cache.cached_bytes(), 8192u);
  cache.Free(small);
  cache.Free(mid);
}

TEST(BlockCache, AFullDeviceGetsTheCachedBlocksBackOnce) {
  FakeDevice dev;
  dev.capacity = 4096;
  BlockCache cache = dev.Cache();
  dev.cache = &cache;
  void* a = cache.Allocate(1024);
  void* b = cache.Allocate(2048);
  cache.Free(a);
  cache.Free(b);
  // 3072 bytes: no cached block is large enough and the device has 1024 left: the cache
  // waits once, hands both back, and the allocation succeeds.
  void* c = cache.Allocate(3072);
  ASSERT_NE(c, nullptr);
  EXPECT_EQ(dev.waits, 1);
  EXPECT_EQ(dev.cached_during_wait, 0u);  // out of the cache before the wait
  EXPECT_EQ(dev.frees, 2);
  EXPECT_EQ(cache.cached_bytes(), 0u);
  EXPECT_EQ(cache.reserved_bytes(), 3072u);
  // More than the device holds: nullptr, after nothing is left to hand back.
  EXPECT_EQ(cache.Allocate(4096), nullptr);
  EXPECT_EQ(dev.waits, 1);
  cache.Free(c);
  cache.ReleaseAll();
  EXPECT_EQ(dev.waits, 2);
  EXPECT_TRUE(dev.live.empty());
  EXPECT_EQ(cache.reserved_bytes(), 0u);
}

TEST(BlockCache, RefusesAForeignOrDoubleFree) {
  FakeDevice dev;
  BlockCache cache = dev.Cache();
  void* a = cache.Allocate(64);
  cache.Free(a);
  EXPECT_DEATH(cache.Free(a), "already freed");
  int x = 0;
  EXPECT_DEATH(cache.Free(&x), "did not hand out");
  cache.Free(nullptr);  // ignored
  cache.ReleaseAll();
}

}  // namespace
}  // namespace moerun
