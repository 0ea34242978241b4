// Sharded checkpoints of named global tensors: save over the ranks of a communicator
// (each piece written once, writers balanced by bytes), commit atomically, load any
// tensor's rows on any rank count, verify. The library knows named tensors and which rows
// of each a rank holds, not models.
//
// On disk (`root` is the checkpoint directory of a run):
//   root/LATEST                      "step_00001234\n": the newest committed checkpoint
//   root/step_00001234/              one committed checkpoint
//     shard-00003-of-00008.safetensors   what rank 3 of 8 wrote (global names; plain
//                                        safetensors, loadable by the Python package)
//     manifest.pb, manifest.pbtxt        CheckpointManifest (runtime/checkpoint.proto)
//   root/step_00001240.tmp/          a save in progress (or a crashed one: never loaded,
//                                    removed by RemoveUncommitted)
// Commit protocol: every writer writes and fsyncs its shard into step_N.tmp/; the ranks
// agree that all writes succeeded; rank 0 writes the manifest last, fsyncs it and the
// directory, renames step_N.tmp to step_N, fsyncs root, then replaces LATEST by temp file
// + rename. A directory without manifest.pb is never a checkpoint.
//
// All ranks must see the same `root` (one machine, or a shared file system).
#ifndef MOERUN_RUNTIME_CHECKPOINT_H_
#define MOERUN_RUNTIME_CHECKPOINT_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "comm/communicator.h"
#include "runtime/checkpoint.pb.h"
#include "runtime/status.h"
#include "runtime/tensor.h"

namespace moerun {

// What one rank holds of one global tensor.
struct CheckpointSlice {
  std::string name;       // global name
  Shape global_shape;     // the whole tensor's shape
  int64_t row_begin = 0;  // rows [row_begin, row_end) of dim 0 are held here;
  int64_t row_end = -1;   // -1: to the end (the whole tensor)
  Tensor local;           // those rows, contiguous, on the CPU: saved from / loaded into
};

struct SaveOptions {
  int keep = 0;  // > 0: after the commit, delete all but the newest `keep` checkpoints
  // Test hook (tests/checkpoint_test.sh): after writing its shard, the rank sleeps this long
  // before the commit, so a test can kill it mid-save. From MOERUN_TEST_SAVE_PAUSE_S.
  double pause_after_shard_s = 0;
};

struct SaveResult {
  std::string path;                  // root/step_N
  int64_t step = 0;                  // the step it holds
  uint64_t local_bytes = 0;          // bytes this rank wrote
  uint64_t total_bytes = 0;          // over all ranks
  double seconds = 0;                // wall time of the save on this rank (through the commit)
  std::vector<std::string> removed;  // old checkpoints deleted by `keep` (rank 0)
};

// "step_00001234".
std::string CheckpointDirName(int64_t step);
// "shard-00003-of-00008.safetensors".
std::string ShardFileName(int rank, int world_size);

// Who writes each piece: largest first, each to the least-loaded of its holders (ties: the
// first holder listed). bytes[i] and holders[i] describe piece i; returns its writer.
std::vector<int> AssignWriters(const std::vector<uint64_t>& bytes,
                               const std::vector<std::vector<int>>& holders, int world_size);

// Which pieces each rank writes; the same on every rank. Collective (gathers every rank's
// slice list). CHECKs that ranks agree on each tensor's global shape and dtype.
struct SavePlan {
  int world_size = 0;
  std::vector<int> mine;  // indices into the slices this rank writes
  uint64_t local_bytes = 0, total_bytes = 0;
  std::string file;  // this rank's shard file name ("" when it writes nothing)
};
SavePlan PlanSave(Communicator& comm, const std::vector<CheckpointSlice>& slices);

// Writes the whole checkpoint `manifest.step()` under `root`. The caller fills the
// manifest's training state (step, config, data, rng, ...); this fills files and tensors.
// Collective. On any rank's failure every rank gets the error (naming the rank, the path
// and the system's reason), the temporary directory is removed and earlier checkpoints
// and LATEST are untouched.
Status SaveCheckpoint(Communicator& comm, const std::string& root,
                      const CheckpointManifest& manifest,
                      const std::vector<CheckpointSlice>& slices, const SaveOptions& options,
                      SaveResult* result);

// The steps of SaveCheckpoint, for saving in the background: PrepareSave (collective:
// plan, fresh temporary directory, free-space check), WriteShard (local, no communication:
// may run on another thread), CommitSave (collective).
struct PendingSave {
  std::string root, tmp_dir, final_dir;
  CheckpointManifest manifest;
  SavePlan plan;
  std::vector<CheckpointSlice> slices;  // what WriteShard writes (may be snapshots)
  SaveOptions options;
  double start_s = 0;
  // Filled by WriteShard.
  Status write_status;
  std::vector<CheckpointTensor> written;  // this rank's pieces
  CheckpointFile file;
};
Status PrepareSave(Communicator& comm, const std::string& root, const CheckpointManifest& manifest,
                   std::vector<CheckpointSlice> slices, const SaveOptions& options,
                   PendingSave* pending);
void WriteShard(PendingSave* pending);
Status CommitSave(Communicator& comm, PendingSave* pending, SaveResult* result);

// Writes a checkpoint from one process as if `world_size` ranks had written it (offline
// resharding, import): shard q holds the tensors whose writer is q, fetched with `load`
// shard by shard (memory holds one shard at a time). `state` is the manifest's training
// state. Commits like SaveCheckpoint (but keeps every older checkpoint).
struct OfflineTensor {
  std::string name;
  Shape shape;
  DType dtype = DType::kF32;
  int writer = 0;
};
Status WriteCheckpointOffline(const std::string& root, const CheckpointManifest& state,
                              int world_size, const std::vector<OfflineTensor>& tensors,
                              const std::function<StatusOr<Tensor>(const std::string&)>& load,
                              SaveResult* result);

// Saves in the background, so that training stalls only for a copy of the state: Start
// snapshots the slices and returns; the shard write (each rank's own thread, which also
// makes the temporary directory and checks free space), the exchange of manifest parts and
// rank 0's commit (manifest, fsyncs, rename, LATEST) proceed while training goes on,
// advanced by Poll at step boundaries. One save is in flight at a time; the slices' layout
// (names, rows, dtypes) must be the same at every Start (the save plan is made once).
class AsyncCheckpointer {
 public:
  AsyncCheckpointer(Communicator& comm, std::string root, SaveOptions options);
  ~AsyncCheckpointer();  // waits for its threads; an unfinished save is left uncommitted
  bool busy() const { return stage_ != Stage::kIdle; }
  // Collective. Commits the save in flight first (waiting for it; its result comes with the
  // next Poll or Finish), then starts this one.
  Status Start(const CheckpointManifest& manifest, const std::vector<CheckpointSlice>& slices);
  // Collective, cheap (one small all-reduce): moves the save in flight on when every rank
  // is ready, never waits for I/O. Committed saves are appended to `done`.
  Status Poll(std::vector<SaveResult>* done);
  // The same without the all-reduce, for a caller that already agrees on flags at each step
  // boundary: pass whether `local_ready()` held on every rank.
  Status Poll(bool all_ready, std::vector<SaveResult>* done);
  // This rank's part of the current stage is finished (true when idle).
  bool local_ready() const { return !busy() || worker_done_; }
  // Collective: waits for the save in flight and commits it.
  Status Finish(std::vector<SaveResult>* done);

 private:
  enum class Stage { kIdle, kWriting, kCommitting };
  Status Advance(bool all_ready);
  void Drain(std::vector<SaveResult>* done);

  Communicator& comm_;
  std::string root_;
  SaveOptions options_;
  bool planned_ = false;
  SavePlan plan_;
  Stage stage_ = Stage::kIdle;
  PendingSave pending_;
  std::vector<CheckpointSlice> snapshot_;  // reused from save to save
  std::thread worker_;
  std::atomic<bool> worker_done_{false};
  Status commit_status_;
  std::vector<std::string> removed_;
  std::vector<SaveResult> completed_;  // committed, not yet handed out (Start commits too)
};

// Copies of the slices' tensors (a snapshot the caller may change afterwards).
std::vector<CheckpointSlice> SnapshotSlices(const std::vector<CheckpointSlice>& slices);

// `path` is a checkpoint directory (holds manifest.pb) or a root with LATEST: returns the
// checkpoint directory. An error says what was found instead.
StatusOr<std::string> ResolveCheckpoint(const std::string& path);
// The checkpoint LATEST names under root; "" when root has no LATEST. An error when LATEST
// names a directory that is not a committed checkpoint.
StatusOr<std::string> LatestCheckpoint(const std::string& root);

// Reads and checks root/manifest.pb (tensor and file entries consistent).
StatusOr<CheckpointManifest> ReadManifest(const std::string& checkpoint_dir);

// Fills each slice's `local` (already allocated, with the slice's shape and dtype) from the
// checkpoint, reading only the byte ranges it needs and checking each piece's CRC. An
// error names the file and tensor (missing tensor, dtype or shape mismatch, missing or
// truncated file, bad checksum); then nothing is guaranteed about `local`. Local: no
// communication.
Status LoadSlices(const std::string& checkpoint_dir, const CheckpointManifest& manifest,
                  std::vector<CheckpointSlice>* slices);

// Re-reads every file and piece: sizes, header checksums and piece checksums, and that the
// pieces of every tensor tile it exactly. The error names the first bad file and tensor.
Status VerifyCheckpoint(const std::string& checkpoint_dir, const CheckpointManifest& manifest);

// Removes leftovers under root: step_*.tmp directories and step_* directories without a
// manifest. Returns the removed names.
std::vector<std::string> RemoveUncommitted(const std::string& root);
// Committed checkpoints under root, oldest first (directory names).
std::vector<std::string> ListCheckpoints(const std::string& root);
// Deletes all but the newest `keep` committed checkpoints (never the one LATEST names).
std::vector<std::string> PruneCheckpoints(const std::string& root, int keep);

// Reads the rows [row_begin, row_end) of one tensor from a checkpoint into `out` (allocated
// here, contiguous). For tools (export, reshard).
StatusOr<Tensor> LoadTensor(const std::string& checkpoint_dir, const CheckpointManifest& manifest,
                            const std::string& name);

// Writes `bytes` to `path` atomically (temp file, fsync, rename, fsync of the directory).
Status WriteFileAtomically(const std::string& path, const std::string& bytes);

}  // namespace moerun

#endif  // MOERUN_RUNTIME_CHECKPOINT_H_
