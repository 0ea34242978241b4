// BlockCache: the CUDA backend's allocator where the device has no stream-ordered memory
// pools (cudaMallocAsync unsupported: some sandboxes, such as gVisor). cudaFree waits for
// the whole device, so freeing every temporary would stall each step many times; instead
// freed blocks are kept and handed out again, as PyTorch's caching allocator does. All the
// backend's work is on one stream, so a block freed after the work queued on it and handed
// out again to work queued later is in stream order, as cudaFreeAsync / cudaMallocAsync on
// that stream would be. Blocks go back to the device only when an allocation fails (then
// every cached block is released and the allocation tried once more) or on ReleaseAll.
// Host code with the raw allocator injected, so the same class is tested on the CPU.
#ifndef MOERUN_RUNTIME_BLOCK_CACHE_H_
#define MOERUN_RUNTIME_BLOCK_CACHE_H_

#include <cstddef>
#include <functional>
#include <map>
#include <mutex>
#include <unordered_map>

namespace moerun {

class BlockCache {
 public:
  // raw_alloc(bytes): a new block, or nullptr when the device is out of memory.
  // raw_free(p): returns a block to the device (the caller has waited for its work).
  // release_wait(): called once before cached blocks go back (wait for the device's work).
  BlockCache(std::function<void*(size_t)> raw_alloc, std::function<void(void*)> raw_free,
             std::function<void()> release_wait);
  BlockCache(const BlockCache&) = delete;
  BlockCache& operator=(const BlockCache&) = delete;

  // A block of at least `bytes` (rounded up to kGranularity): the smallest cached block that
  // fits and is under twice the rounded size, else a new one; when the device has no memory
  // for a new one, every cached block is released and it is tried once more. nullptr when
  // even that fails.
  void* Allocate(size_t bytes);
  // Back into the cache (p from Allocate, not freed since; nullptr is ignored).
  void Free(void* p);
  // Every cached (free) block back to the device.
  void ReleaseAll();

  size_t cached_bytes() const;    // free blocks held
  size_t reserved_bytes() const;  // all blocks taken from the device, in use or cached
  static constexpr size_t kGranularity = 512;

 private:
  // The cached blocks, out of the cache (under the lock); then back to the device after
  // one wait (without it).
  std::multimap<size_t, void*> TakeCached();
  void Release(const std::multimap<size_t, void*>& taken);

  std::function<void*(size_t)> raw_alloc_;
  std::function<void(void*)> raw_free_;
  std::function<void()> release_wait_;
  mutable std::mutex mu_;
  struct Block {
    size_t size = 0;
    bool cached = false;
  };
  std::multimap<size_t, void*> free_;        // cached blocks by size
  std::unordered_map<void*, Block> blocks_;  // every block taken from the device
  size_t cached_ = 0, reserved_ = 0;
};

}  // namespace moerun

#endif  // MOERUN_RUNTIME_BLOCK_CACHE_H_
