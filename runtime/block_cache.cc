// BlockCache (see block_cache.h).
#include "runtime/block_cache.h"

#include <glog/logging.h>

#include <algorithm>
#include <utility>

namespace moerun {

BlockCache::BlockCache(std::function<void*(size_t)> raw_alloc, std::function<void(void*)> raw_free,
                       std::function<void()> release_wait)
    : raw_alloc_(std::move(raw_alloc)),
      raw_free_(std::move(raw_free)),
      release_wait_(std::move(release_wait)) {}

void* BlockCache::Allocate(size_t bytes) {
  const size_t size = (std::max<size_t>(bytes, 1) + kGranularity - 1) / kGranularity * kGranularity;
  {
    std::lock_guard<std::mutex> lock(mu_);
    // Best fit, and not more than twice the size (a large block stays for a large request).
    const auto it = free_.lower_bound(size);
    if (it != free_.end() && it->first / 2 < size) {
      void* p = it->second;
      cached_ -= it->first;
      free_.erase(it);
      blocks_[p].cached = false;
      return p;
    }
  }
  // The device's calls and the wait run without the lock: the wait polls the device and
  // runs its checks, and another thread may free meanwhile.
  void* p = raw_alloc_(size);
  if (p == nullptr) {
    std::multimap<size_t, void*> taken = TakeCached();
    if (!taken.empty()) {
      Release(taken);
      p = raw_alloc_(size);
    }
  }
  if (p == nullptr) return nullptr;
  std::lock_guard<std::mutex> lock(mu_);
  blocks_[p] = Block{size, false};
  reserved_ += size;
  return p;
}

void BlockCache::Free(void* p) {
  if (p == nullptr) return;
  std::lock_guard<std::mutex> lock(mu_);
  const auto it = blocks_.find(p);
  CHECK(it != blocks_.end()) << "BlockCache::Free of a block it did not hand out";
  CHECK(!it->second.cached) << "BlockCache::Free of a block already freed";
  it->second.cached = true;
  free_.emplace(it->second.size, p);
  cached_ += it->second.size;
}

void BlockCache::ReleaseAll() { Release(TakeCached()); }

std::multimap<size_t, void*> BlockCache::TakeCached() {
  std::lock_guard<std::mutex> lock(mu_);
  std::multimap<size_t, void*> taken;
  taken.swap(free_);
  for (const auto& [size, p] : taken) {
    blocks_.erase(p);
    reserved_ -= size;
  }
  cached_ = 0;
  return taken;
}

void BlockCache::Release(const std::multimap<size_t, void*>& taken) {
  if (taken.empty()) return;
  release_wait_();
  for (const auto& [size, p] : taken) raw_free_(p);
}

size_t BlockCache::cached_bytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  return cached_;
}

size_t BlockCache::reserved_bytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  return reserved_;
}

}  // namespace moerun
