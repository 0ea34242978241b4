// Sharded checkpoints: save plan, shard writing, commit, load by byte ranges, verify.
#include "runtime/checkpoint.h"

#include <errno.h>
#include <fcntl.h>
#include <google/protobuf/text_format.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>
#include <tuple>

#include "runtime/crc32c.h"
#include "runtime/safetensors.h"

namespace moerun {
namespace fs = std::filesystem;

namespace {

constexpr const char* kManifest = "manifest.pb";
constexpr const char* kManifestText = "manifest.pbtxt";
constexpr const char* kLatest = "LATEST";

double NowSeconds() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

std::string Errno() { return std::strerror(errno); }

std::string ShapeText(const Shape& s) { return ShapeToString(s); }

int64_t RowsOf(const CheckpointSlice& s) { return s.global_shape.empty() ? 1 : s.global_shape[0]; }
int64_t RowEnd(const CheckpointSlice& s) { return s.row_end < 0 ? RowsOf(s) : s.row_end; }
bool IsWhole(const CheckpointSlice& s) { return s.row_begin == 0 && RowEnd(s) == RowsOf(s); }

// Bytes of one row (dim 0) of a tensor of `shape` and element size `elem`.
uint64_t RowBytes(const Shape& shape, size_t elem) {
  uint64_t n = elem;
  for (size_t i = 1; i < shape.size(); ++i) n *= shape[i];
  return n;
}

// Every rank's string, in rank order. Collective.
std::vector<std::string> AllGatherStrings(Communicator& comm, const std::string& mine) {
  const int p = comm.size();
  int64_t len = static_cast<int64_t>(mine.size());
  std::vector<int64_t> lens(p);
  comm.AllGather(&len, 1, lens.data(), DType::kI64);
  const int64_t max_len = std::max<int64_t>(1, *std::max_element(lens.begin(), lens.end()));
  std::string padded = mine;
  padded.resize(max_len, '\0');
  std::string all(max_len * p, '\0');
  comm.AllGather(padded.data(), max_len, all.data(), DType::kU8);
  std::vector<std::string> out(p);
  for (int r = 0; r < p; ++r) out[r] = all.substr(r * max_len, lens[r]);
  return out;
}

Status FsyncPath(const std::string& path, bool directory) {
  const int fd = ::open(path.c_str(), (directory ? O_RDONLY | O_DIRECTORY : O_RDONLY) | O_CLOEXEC);
  if (fd < 0) return Status::Error("cannot open " + path + " for fsync: " + Errno());
  const int rc = ::fsync(fd);
  const std::string why = rc != 0 ? Errno() : "";
  ::close(fd);
  if (rc != 0) return Status::Error("fsync of " + path + " failed: " + why);
  return Status::Ok();
}

// Reads exactly n bytes at `offset`; an error names the file and says how many it got.
Status PreadAll(int fd, const std::string& path, uint64_t offset, void* dst, uint64_t n) {
  char* p = static_cast<char*>(dst);
  uint64_t done = 0;
  while (done < n) {
    const ssize_t got = ::pread(fd, p + done, n - done, static_cast<off_t>(offset + done));
    if (got < 0) {
      if (errno == EINTR) continue;
      return Status::Error(path + ": read failed at byte " + std::to_string(offset + done) + ": " +
                           Errno());
    }
    if (got == 0) {
      return Status::Error(path + ": file ends at byte " + std::to_string(offset + done) +
                           ", expected data up to byte " + std::to_string(offset + n) +
                           " (truncated)");
    }
    done += static_cast<uint64_t>(got);
  }
  return Status::Ok();
}

// Open files of one checkpoint, checked against the manifest's sizes once.
class FileSet {
 public:
  FileSet(const std::string& dir, const CheckpointManifest& m) : dir_(dir) {
    for (const CheckpointFile& f : m.files()) sizes_[f.name()] = f.size();
  }
  ~FileSet() {
    for (auto& kv : fds_) ::close(kv.second);
  }
  StatusOr<int> Open(const std::string& name) {
    auto it = fds_.find(name);
    if (it != fds_.end()) return it->second;
    const std::string path = dir_ + "/" + name;
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
      return Status::Error(path + ": cannot open shard file: " + Errno() +
                           (errno == ENOENT ? " (the checkpoint is missing a shard)" : ""));
    }
    struct stat st;
    if (::fstat(fd, &st) != 0) {
      ::close(fd);
      return Status::Error(path + ": cannot stat: " + Errno());
    }
    const auto want = sizes_.find(name);
    if (want != sizes_.end() && static_cast<uint64_t>(st.st_size) != want->second) {
      ::close(fd);
      return Status::Error(
          path + ": file is " + std::to_string(st.st_size) + " bytes, the manifest says " +
          std::to_string(want->second) +
          (static_cast<uint64_t>(st.st_size) < want->second ? " (truncated)" : " (replaced?)"));
    }
    fds_[name] = fd;
    return fd;
  }
  std::string PathOf(const std::string& name) const { return dir_ + "/" + name; }

 private:
  std::string dir_;
  std::map<std::string, uint64_t> sizes_;
  std::map<std::string, int> fds_;
};

// Checks the CRC of a piece already read into `data`.
Status CheckPiece(const std::string& path, const std::string& tensor, const CheckpointPiece& piece,
                  const void* data) {
  const uint32_t crc = Crc32c(data, piece.end() - piece.begin());
  if (crc == piece.crc32c()) return Status::Ok();
  char buf[128];
  std::snprintf(buf, sizeof(buf), "checksum mismatch (manifest 0x%08x, file 0x%08x)",
                piece.crc32c(), crc);
  return Status::Error(path + ": tensor '" + tensor + "' bytes [" + std::to_string(piece.begin()) +
                       ", " + std::to_string(piece.end()) + "): " + buf + ": the file is corrupt");
}

// Free space in `dir` for a shard of `bytes` holding `tensors` tensors (plus its header).
Status CheckFreeSpace(const std::string& dir, const std::string& root, uint64_t bytes,
                      size_t tensors) {
  struct statvfs st;
  if (::statvfs(dir.c_str(), &st) != 0) return Status::Ok();  // unknown: let the write tell
  const uint64_t avail = static_cast<uint64_t>(st.f_bavail) * st.f_frsize;
  const uint64_t need = bytes + 64 * 1024 + 512 * tensors;
  if (avail >= need) return Status::Ok();
  return Status::Error("not enough free space in " + root + ": this rank's shard needs " +
                       std::to_string(need) + " bytes, " + std::to_string(avail) +
                       " are available; free space, use another --checkpoint-dir, or --keep "
                       "fewer checkpoints");
}

// Reads one whole piece into dst (piece bytes) and checks its CRC.
Status ReadPiece(FileSet& files, const std::string& tensor, const CheckpointPiece& piece,
                 void* dst) {
  auto fd = files.Open(piece.file());
  if (!fd.ok()) return Status::Error(fd.status().message() + " (tensor '" + tensor + "')");
  const std::string path = files.PathOf(piece.file());
  Status s = PreadAll(*fd, path, piece.begin(), dst, piece.end() - piece.begin());
  if (!s.ok()) return Status::Error(s.message() + " (tensor '" + tensor + "')");
  return CheckPiece(path, tensor, piece, dst);
}

}  // namespace

std::string CheckpointDirName(int64_t step) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "step_%08lld", static_cast<long long>(step));
  return buf;
}

namespace {
// Writes and fsyncs `path` in place.
Status WriteFileSynced(const std::string& path, const std::string& bytes) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return Status::Error("cannot create " + path + ": " + Errno());
  size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      const std::string why = Errno();
      ::close(fd);
      return Status::Error("cannot write " + path + ": " + why);
    }
    done += static_cast<size_t>(n);
  }
  const bool synced = ::fsync(fd) == 0;
  const std::string why = synced ? "" : Errno();
  ::close(fd);
  if (!synced) return Status::Error("fsync of " + path + " failed: " + why);
  return Status::Ok();
}
}  // namespace

Status WriteFileAtomically(const std::string& path, const std::string& bytes) {
  const std::string tmp = path + ".tmp." + std::to_string(::getpid());
  Status s = WriteFileSynced(tmp, bytes);
  if (s.ok() && std::rename(tmp.c_str(), path.c_str()) != 0) {
    s = Status::Error("cannot rename " + tmp + " to " + path + ": " + Errno());
  }
  if (!s.ok()) {
    ::unlink(tmp.c_str());
    return s;
  }
  const std::string dir = fs::path(path).parent_path().string();
  return FsyncPath(dir.empty() ? "." : dir, true);
}

std::vector<int> AssignWriters(const std::vector<uint64_t>& bytes,
                               const std::vector<std::vector<int>>& holders, int world_size) {
  std::vector<size_t> order(bytes.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t a, size_t b) { return bytes[a] > bytes[b]; });
  std::vector<uint64_t> load(world_size, 0);
  std::vector<int> writer(bytes.size(), -1);
  for (size_t i : order) {
    CHECK(!holders[i].empty()) << "checkpoint: a piece without holders";
    int best = holders[i][0];
    for (int h : holders[i]) {
      if (load[h] < load[best]) best = h;
    }
    load[best] += bytes[i];
    writer[i] = best;
  }
  return writer;
}

std::string ShardFileName(int rank, int world_size) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "shard-%05d-of-%05d.safetensors", rank, world_size);
  return buf;
}

SavePlan PlanSave(Communicator& comm, const std::vector<CheckpointSlice>& slices) {
  // Every rank's pieces: name, rows, dtype, global shape, bytes.
  nlohmann::json mine = nlohmann::json::array();
  for (const CheckpointSlice& s : slices) {
    CHECK(s.local.defined()) << "checkpoint slice '" << s.name << "' has no tensor";
    const int64_t rows = RowEnd(s) - s.row_begin;
    CHECK(s.row_begin >= 0 && rows >= 0 && RowEnd(s) <= RowsOf(s))
        << "checkpoint slice '" << s.name << "': rows out of range";
    mine.push_back({s.name, s.row_begin, RowEnd(s), DTypeName(s.local.dtype()), s.global_shape,
                    s.local.nbytes()});
  }
  const std::vector<std::string> all = AllGatherStrings(comm, mine.dump());
  struct Piece {
    std::string name;
    int64_t row_begin, row_end;
    uint64_t bytes;
    std::vector<int> holders;
  };
  std::map<std::tuple<std::string, int64_t, int64_t>, Piece> pieces;
  std::map<std::string, std::pair<std::string, Shape>> kinds;  // name -> dtype, shape
  for (int r = 0; r < comm.size(); ++r) {
    for (const auto& e : nlohmann::json::parse(all[r])) {
      const std::string name = e[0];
      const std::string dtype = e[3];
      const Shape shape = e[4].get<Shape>();
      auto k = kinds.emplace(name, std::make_pair(dtype, shape));
      CHECK(k.first->second.first == dtype && k.first->second.second == shape)
          << "checkpoint: ranks disagree on tensor '" << name << "' (" << dtype << " "
          << ShapeText(shape) << " on rank " << r << ")";
      Piece& p = pieces[{name, e[1].get<int64_t>(), e[2].get<int64_t>()}];
      p.name = name;
      p.row_begin = e[1];
      p.row_end = e[2];
      p.bytes = e[5];
      p.holders.push_back(r);
    }
  }
  std::vector<Piece*> order;
  std::vector<uint64_t> bytes;
  std::vector<std::vector<int>> holders;
  for (auto& kv : pieces) {
    order.push_back(&kv.second);
    bytes.push_back(kv.second.bytes);
    holders.push_back(kv.second.holders);
  }
  const std::vector<int> assigned = AssignWriters(bytes, holders, comm.size());
  std::map<std::tuple<std::string, int64_t, int64_t>, int> writer;
  SavePlan plan;
  plan.world_size = comm.size();
  for (size_t i = 0; i < order.size(); ++i) {
    plan.total_bytes += order[i]->bytes;
    writer[{order[i]->name, order[i]->row_begin, order[i]->row_end}] = assigned[i];
  }
  for (size_t i = 0; i < slices.size(); ++i) {
    const CheckpointSlice& s = slices[i];
    if (writer.at({s.name, s.row_begin, RowEnd(s)}) == comm.rank()) {
      plan.mine.push_back(static_cast<int>(i));
      plan.local_bytes += s.local.nbytes();
    }
  }
  if (!plan.mine.empty()) plan.file = ShardFileName(comm.rank(), comm.size());
  return plan;
}

namespace {

// The manifest `base` with the files and tensors of every rank's part (serialized
// CheckpointManifest holding only files and tensors), tensors by name, pieces by offset.
CheckpointManifest MergeParts(const CheckpointManifest& base,
                              const std::vector<std::string>& parts) {
  CheckpointManifest m = base;
  m.clear_files();
  m.clear_tensors();
  m.set_created_unix_s(NowSeconds());
  std::map<std::string, CheckpointTensor> tensors;
  for (const std::string& b : parts) {
    CheckpointManifest q;
    CHECK(q.ParseFromString(b)) << "checkpoint: bad manifest part";
    for (const CheckpointFile& f : q.files()) *m.add_files() = f;
    for (const CheckpointTensor& t : q.tensors()) {
      auto it = tensors.find(t.name());
      if (it == tensors.end()) {
        tensors[t.name()] = t;
      } else {
        for (const CheckpointPiece& piece : t.pieces()) *it->second.add_pieces() = piece;
      }
    }
  }
  for (auto& [name, t] : tensors) {
    std::sort(t.mutable_pieces()->begin(), t.mutable_pieces()->end(),
              [](const CheckpointPiece& a, const CheckpointPiece& b) {
                return a.offset_size() > 0 && a.offset(0) < b.offset(0);
              });
    *m.add_tensors() = t;
  }
  return m;
}

// The commit: manifest (text twin first, binary last) into tmp_dir, rename to final_dir,
// fsync root, LATEST, prune.
Status CommitDirectory(const std::string& root, const std::string& tmp_dir,
                       const std::string& final_dir, const CheckpointManifest& m, int keep,
                       std::vector<std::string>* removed) {
  std::string binary, text;
  m.SerializeToString(&binary);
  google::protobuf::TextFormat::PrintToString(m, &text);
  // Inside the temporary directory no file needs its own rename: the directory's is the
  // commit. The files are fsync'ed, then the directory.
  MOERUN_RETURN_IF_ERROR(WriteFileSynced(tmp_dir + "/" + kManifestText, text));
  MOERUN_RETURN_IF_ERROR(WriteFileSynced(tmp_dir + "/" + kManifest, binary));
  MOERUN_RETURN_IF_ERROR(FsyncPath(tmp_dir, true));
  std::error_code ec;
  if (fs::exists(final_dir, ec)) {  // the same step saved again: replace it
    const std::string old = final_dir + ".old";
    fs::remove_all(old, ec);
    fs::rename(final_dir, old, ec);
    if (!ec) fs::rename(tmp_dir, final_dir, ec);
    if (!ec) fs::remove_all(old, ec);
  } else {
    fs::rename(tmp_dir, final_dir, ec);
  }
  if (ec) {
    return Status::Error("cannot rename " + tmp_dir + " to " + final_dir + ": " + ec.message());
  }
  MOERUN_RETURN_IF_ERROR(FsyncPath(root, true));
  MOERUN_RETURN_IF_ERROR(
      WriteFileAtomically(root + "/" + kLatest, fs::path(final_dir).filename().string() + "\n"));
  if (keep > 0 && removed != nullptr) *removed = PruneCheckpoints(root, keep);
  return Status::Ok();
}

// This rank's part of the manifest from the layout of the shard it wrote.
void PiecesFromLayout(const std::string& file, int rank, const SafetensorsLayout& layout,
                      const std::map<std::string, const CheckpointSlice*>& by_stored,
                      CheckpointFile* file_entry, std::vector<CheckpointTensor>* written) {
  file_entry->set_name(file);
  file_entry->set_size(layout.file_size);
  file_entry->set_header_crc32c(layout.header_crc32c);
  file_entry->set_header_bytes(layout.header_bytes);
  file_entry->set_rank(rank);
  for (const SafetensorsLayout::Entry& e : layout.tensors) {
    const CheckpointSlice& s = *by_stored.at(e.name);
    CheckpointTensor t;
    t.set_name(s.name);
    t.set_dtype(DTypeName(s.local.dtype()));
    for (int64_t d : s.global_shape) t.add_shape(d);
    CheckpointPiece* piece = t.add_pieces();
    piece->set_file(file);
    piece->set_begin(e.begin);
    piece->set_end(e.end);
    piece->set_crc32c(e.crc32c);
    piece->set_writer_rank(rank);
    piece->set_stored_name(e.name);
    for (size_t d = 0; d < s.global_shape.size(); ++d) {
      piece->add_offset(d == 0 ? s.row_begin : 0);
      piece->add_shape(d == 0 ? RowEnd(s) - s.row_begin : s.global_shape[d]);
    }
    written->push_back(std::move(t));
  }
}

// Writes `slices` as one shard file (safetensors, global names) with its layout.
Status WriteShardFile(const std::string& path, int rank, int world, int64_t step,
                      const std::vector<const CheckpointSlice*>& slices, CheckpointFile* file_entry,
                      std::vector<CheckpointTensor>* written) {
  SafetensorsWriter writer;
  std::map<std::string, const CheckpointSlice*> by_stored;
  for (const CheckpointSlice* s : slices) {
    const std::string stored = IsWhole(*s) ? s->name
                                           : s->name + ":rows_" + std::to_string(s->row_begin) +
                                                 "_" + std::to_string(RowEnd(*s));
    writer.Add(stored, s->local);
    by_stored[stored] = s;
  }
  writer.SetMetadata("format", "moerun checkpoint shard");
  writer.SetMetadata("step", std::to_string(step));
  writer.SetMetadata("rank", std::to_string(rank));
  writer.SetMetadata("world_size", std::to_string(world));
  SafetensorsLayout layout;
  MOERUN_RETURN_IF_ERROR(writer.Write(path, &layout, /*atomic=*/false));
  PiecesFromLayout(fs::path(path).filename().string(), rank, layout, by_stored, file_entry,
                   written);
  return Status::Ok();
}

}  // namespace

std::vector<CheckpointSlice> SnapshotSlices(const std::vector<CheckpointSlice>& slices) {
  std::vector<CheckpointSlice> out = slices;
  for (CheckpointSlice& s : out) s.local = s.local.Clone();
  return out;
}

Status PrepareSave(Communicator& comm, const std::string& root, const CheckpointManifest& manifest,
                   std::vector<CheckpointSlice> slices, const SaveOptions& options,
                   PendingSave* pending) {
  *pending = PendingSave();
  pending->start_s = NowSeconds();
  pending->root = root;
  pending->final_dir = root + "/" + CheckpointDirName(manifest.step());
  pending->tmp_dir = pending->final_dir + ".tmp";
  pending->manifest = manifest;
  pending->options = options;
  pending->plan = PlanSave(comm, slices);
  pending->slices = std::move(slices);
  Status s;
  if (comm.rank() == 0) {
    std::error_code ec;
    fs::create_directories(root, ec);
    if (ec) {
      s = Status::Error("cannot create checkpoint directory " + root + ": " + ec.message());
    } else {
      fs::remove_all(pending->tmp_dir, ec);
      if (!fs::create_directory(pending->tmp_dir, ec) || ec) {
        s = Status::Error("cannot create " + pending->tmp_dir + ": " +
                          (ec ? ec.message() : "it already exists"));
      }
    }
  }
  s = AgreeOnStatus(comm, s);
  if (!s.ok()) return s;
  // Free space: the shard plus its header, before writing anything.
  if (!pending->plan.file.empty()) {
    s = CheckFreeSpace(pending->tmp_dir, root, pending->plan.local_bytes,
                       pending->plan.mine.size());
  }
  s = AgreeOnStatus(comm, s);
  if (!s.ok() && comm.rank() == 0) {
    std::error_code ec;
    fs::remove_all(pending->tmp_dir, ec);
  }
  return s;
}

void WriteShard(PendingSave* p) {
  p->write_status = Status::Ok();
  p->written.clear();
  if (p->plan.file.empty()) return;
  int rank = 0, world = 0;
  std::sscanf(p->plan.file.c_str(), "shard-%d-of-%d", &rank, &world);
  std::vector<const CheckpointSlice*> mine;
  for (int i : p->plan.mine) mine.push_back(&p->slices[i]);
  const std::string path = p->tmp_dir + "/" + p->plan.file;
  p->write_status =
      WriteShardFile(path, rank, world, p->manifest.step(), mine, &p->file, &p->written);
  if (!p->write_status.ok()) return;
  if (p->options.pause_after_shard_s > 0) {
    LOG(WARNING) << "test hook: pid " << ::getpid() << " wrote " << path << ", pausing "
                 << p->options.pause_after_shard_s << " s before the commit";
    std::this_thread::sleep_for(std::chrono::duration<double>(p->options.pause_after_shard_s));
  }
}

Status CommitSave(Communicator& comm, PendingSave* p, SaveResult* result) {
  Status s = AgreeOnStatus(comm, p->write_status);
  auto cleanup = [&] {
    if (comm.rank() == 0) {
      std::error_code ec;
      fs::remove_all(p->tmp_dir, ec);
    }
  };
  if (!s.ok()) {
    comm.Barrier();  // every rank is done with the directory before it goes
    cleanup();
    return Status::Error("checkpoint of step " + std::to_string(p->manifest.step()) +
                         " not saved: " + s.message());
  }
  CheckpointManifest part;
  if (!p->plan.file.empty()) *part.add_files() = p->file;
  for (const CheckpointTensor& t : p->written) *part.add_tensors() = t;
  std::string bytes;
  part.SerializeToString(&bytes);
  const std::vector<std::string> parts = AllGatherStrings(comm, bytes);
  Status commit;
  std::vector<std::string> removed;
  if (comm.rank() == 0) {
    CheckpointManifest m = p->manifest;
    m.set_world_size(comm.size());
    commit = CommitDirectory(p->root, p->tmp_dir, p->final_dir, MergeParts(m, parts),
                             p->options.keep, &removed);
    if (!commit.ok()) cleanup();
  }
  s = AgreeOnStatus(comm, commit);
  if (!s.ok()) {
    return Status::Error("checkpoint of step " + std::to_string(p->manifest.step()) +
                         " not committed: " + s.message());
  }
  if (result != nullptr) {
    result->path = p->final_dir;
    result->step = p->manifest.step();
    result->local_bytes = p->plan.local_bytes;
    result->total_bytes = p->plan.total_bytes;
    result->seconds = NowSeconds() - p->start_s;
    result->removed = removed;
  }
  return Status::Ok();
}

Status SaveCheckpoint(Communicator& comm, const std::string& root,
                      const CheckpointManifest& manifest,
                      const std::vector<CheckpointSlice>& slices, const SaveOptions& options,
                      SaveResult* result) {
  PendingSave pending;
  MOERUN_RETURN_IF_ERROR(PrepareSave(comm, root, manifest, slices, options, &pending));
  WriteShard(&pending);
  return CommitSave(comm, &pending, result);
}

Status WriteCheckpointOffline(const std::string& root, const CheckpointManifest& state,
                              int world_size, const std::vector<OfflineTensor>& tensors,
                              const std::function<StatusOr<Tensor>(const std::string&)>& load,
                              SaveResult* result) {
  const double start = NowSeconds();
  const std::string final_dir = root + "/" + CheckpointDirName(state.step());
  const std::string tmp_dir = final_dir + ".tmp";
  std::error_code ec;
  fs::create_directories(root, ec);
  fs::remove_all(tmp_dir, ec);
  if (!fs::create_directory(tmp_dir, ec) || ec) {
    return Status::Error("cannot create " + tmp_dir + ": " + (ec ? ec.message() : "exists"));
  }
  std::vector<std::string> parts;
  uint64_t total = 0;
  Status s;
  for (int q = 0; q < world_size && s.ok(); ++q) {
    std::vector<CheckpointSlice> slices;
    for (const OfflineTensor& t : tensors) {
      if (t.writer != q) continue;
      auto value = load(t.name);
      if (!value.ok()) {
        s = value.status();
        break;
      }
      if (value->shape() != t.shape || value->dtype() != t.dtype) {
        s = Status::Error("tensor '" + t.name + "' is " + value->ShapeString() + ", expected " +
                          ShapeText(t.shape) + " " + DTypeName(t.dtype));
        break;
      }
      slices.push_back({t.name, t.shape, 0, -1, value->Contiguous()});
      total += value->nbytes();
    }
    if (!s.ok() || slices.empty()) continue;
    std::vector<const CheckpointSlice*> ptrs;
    for (const CheckpointSlice& sl : slices) ptrs.push_back(&sl);
    CheckpointManifest part;
    std::vector<CheckpointTensor> written;
    s = WriteShardFile(tmp_dir + "/" + ShardFileName(q, world_size), q, world_size, state.step(),
                       ptrs, part.add_files(), &written);
    for (CheckpointTensor& t : written) *part.add_tensors() = std::move(t);
    std::string bytes;
    part.SerializeToString(&bytes);
    parts.push_back(bytes);
  }
  CheckpointManifest m = state;
  m.set_world_size(world_size);
  if (s.ok()) s = CommitDirectory(root, tmp_dir, final_dir, MergeParts(m, parts), 0, nullptr);
  if (!s.ok()) {
    fs::remove_all(tmp_dir, ec);
    return s;
  }
  if (result != nullptr) {
    result->path = final_dir;
    result->step = state.step();
    result->local_bytes = result->total_bytes = total;
    result->seconds = NowSeconds() - start;
  }
  return Status::Ok();
}

AsyncCheckpointer::AsyncCheckpointer(Communicator& comm, std::string root, SaveOptions options)
    : comm_(comm), root_(std::move(root)), options_(options) {}

AsyncCheckpointer::~AsyncCheckpointer() {
  if (worker_.joinable()) worker_.join();
}

Status AsyncCheckpointer::Start(const CheckpointManifest& manifest,
                                const std::vector<CheckpointSlice>& slices) {
  if (busy()) {
    std::vector<SaveResult> keep;
    Status s = Finish(&keep);
    completed_.insert(completed_.end(), keep.begin(), keep.end());
    MOERUN_RETURN_IF_ERROR(s);
  }
  if (!planned_) {
    plan_ = PlanSave(comm_, slices);
    planned_ = true;
  }
  pending_ = PendingSave();
  pending_.start_s = NowSeconds();
  pending_.root = root_;
  pending_.final_dir = root_ + "/" + CheckpointDirName(manifest.step());
  pending_.tmp_dir = pending_.final_dir + ".tmp";
  pending_.manifest = manifest;
  pending_.options = options_;
  pending_.plan = plan_;
  // The snapshot: into the buffers of the last one when the layout is the same (no new
  // pages to fault in), else fresh copies.
  bool reuse = snapshot_.size() == slices.size();
  for (size_t i = 0; reuse && i < slices.size(); ++i) {
    reuse = snapshot_[i].name == slices[i].name &&
            snapshot_[i].local.shape() == slices[i].local.shape() &&
            snapshot_[i].local.dtype() == slices[i].local.dtype();
  }
  if (reuse) {
    for (size_t i = 0; i < slices.size(); ++i) snapshot_[i].local.CopyFrom(slices[i].local);
  } else {
    snapshot_ = SnapshotSlices(slices);
  }
  pending_.slices = snapshot_;  // shares the snapshot's storage
  stage_ = Stage::kWriting;
  worker_done_ = false;
  worker_ = std::thread([this] {
    PendingSave& p = pending_;
    std::error_code ec;
    fs::create_directories(p.tmp_dir, ec);  // every rank: idempotent, no collective
    if (ec) {
      p.write_status = Status::Error("cannot create " + p.tmp_dir + ": " + ec.message());
    } else if (!p.plan.file.empty()) {
      p.write_status = CheckFreeSpace(p.tmp_dir, p.root, p.plan.local_bytes, p.plan.mine.size());
      if (p.write_status.ok()) WriteShard(&p);
    }
    worker_done_ = true;
  });
  return Status::Ok();
}

void AsyncCheckpointer::Drain(std::vector<SaveResult>* done) {
  if (done != nullptr) done->insert(done->end(), completed_.begin(), completed_.end());
  completed_.clear();
}

Status AsyncCheckpointer::Poll(std::vector<SaveResult>* done) {
  int32_t not_ready = local_ready() ? 0 : 1;
  comm_.AllReduce(&not_ready, 1, DType::kI32, ReduceOp::kMax);
  return Poll(not_ready == 0, done);
}

Status AsyncCheckpointer::Poll(bool all_ready, std::vector<SaveResult>* done) {
  Status s = Advance(all_ready);
  Drain(done);
  return s;
}

Status AsyncCheckpointer::Finish(std::vector<SaveResult>* done) {
  Status s;
  while (busy() && s.ok()) {
    if (worker_.joinable()) worker_.join();
    int32_t not_ready = local_ready() ? 0 : 1;
    comm_.AllReduce(&not_ready, 1, DType::kI32, ReduceOp::kMax);
    s = Advance(not_ready == 0);
  }
  Drain(done);
  return s;
}

Status AsyncCheckpointer::Advance(bool all_ready) {
  if (!busy() || !all_ready) return Status::Ok();
  if (worker_.joinable()) worker_.join();
  PendingSave& p = pending_;
  if (stage_ == Stage::kWriting) {
    Status s = AgreeOnStatus(comm_, p.write_status);
    if (!s.ok()) {
      comm_.Barrier();
      std::error_code ec;
      if (comm_.rank() == 0) fs::remove_all(p.tmp_dir, ec);
      stage_ = Stage::kIdle;
      return Status::Error("checkpoint of step " + std::to_string(p.manifest.step()) +
                           " not saved: " + s.message());
    }
    CheckpointManifest part;
    if (!p.plan.file.empty()) *part.add_files() = p.file;
    for (const CheckpointTensor& t : p.written) *part.add_tensors() = t;
    std::string bytes;
    part.SerializeToString(&bytes);
    const std::vector<std::string> parts = AllGatherStrings(comm_, bytes);
    stage_ = Stage::kCommitting;
    worker_done_ = comm_.rank() != 0;  // only rank 0 has commit work
    if (comm_.rank() == 0) {
      CheckpointManifest m = p.manifest;
      m.set_world_size(comm_.size());
      m = MergeParts(m, parts);
      worker_ = std::thread([this, m] {
        removed_.clear();
        commit_status_ = CommitDirectory(pending_.root, pending_.tmp_dir, pending_.final_dir, m,
                                         pending_.options.keep, &removed_);
        if (!commit_status_.ok()) {
          std::error_code ec;
          fs::remove_all(pending_.tmp_dir, ec);
        }
        worker_done_ = true;
      });
    }
    return Status::Ok();
  }
  // Committing, and rank 0 is done.
  Status s = AgreeOnStatus(comm_, comm_.rank() == 0 ? commit_status_ : Status::Ok());
  stage_ = Stage::kIdle;
  if (!s.ok()) {
    return Status::Error("checkpoint of step " + std::to_string(p.manifest.step()) +
                         " not committed: " + s.message());
  }
  SaveResult r;
  r.path = p.final_dir;
  r.step = p.manifest.step();
  r.local_bytes = p.plan.local_bytes;
  r.total_bytes = p.plan.total_bytes;
  r.seconds = NowSeconds() - p.start_s;
  r.removed = removed_;
  completed_.push_back(r);
  return Status::Ok();
}

StatusOr<std::string> LatestCheckpoint(const std::string& root) {
  const std::string latest = root + "/" + kLatest;
  std::ifstream in(latest);
  if (!in) return std::string();
  std::string name;
  std::getline(in, name);
  const std::string dir = root + "/" + name;
  if (name.empty() || !fs::exists(dir + "/" + kManifest)) {
    return Status::Error(latest + " names '" + name +
                         "', which is not a committed checkpoint (no manifest.pb); pass "
                         "--resume with a checkpoint directory, or --resume never");
  }
  return dir;
}

StatusOr<std::string> ResolveCheckpoint(const std::string& path) {
  std::error_code ec;
  if (fs::exists(path + "/" + kManifest, ec)) return path;
  if (!fs::exists(path, ec)) return Status::Error(path + ": no such checkpoint directory");
  if (fs::exists(path + "/" + kLatest, ec)) return LatestCheckpoint(path);
  if (fs::is_directory(path, ec)) {
    return Status::Error(path +
                         ": not a checkpoint (no manifest.pb: never committed, or an "
                         "unfinished save) and no LATEST file");
  }
  return Status::Error(path + ": not a checkpoint directory");
}

StatusOr<CheckpointManifest> ReadManifest(const std::string& dir) {
  const std::string path = dir + "/" + kManifest;
  std::ifstream in(path, std::ios::binary);
  if (!in) return Status::Error(path + ": cannot read the manifest: " + Errno());
  std::stringstream buf;
  buf << in.rdbuf();
  CheckpointManifest m;
  if (!m.ParseFromString(buf.str())) {
    return Status::Error(path + ": not a valid checkpoint manifest (corrupt?)");
  }
  if (m.format_version() > 1) {
    return Status::Error(path + ": checkpoint format " + std::to_string(m.format_version()) +
                         " was written by a newer moerun (this one reads format 1)");
  }
  std::map<std::string, bool> files;
  for (const CheckpointFile& f : m.files()) files[f.name()] = true;
  for (const CheckpointTensor& t : m.tensors()) {
    DType dtype;
    if (!ParseDType(t.dtype(), &dtype)) {
      return Status::Error(path + ": tensor '" + t.name() + "': unknown dtype '" + t.dtype() + "'");
    }
    const Shape shape(t.shape().begin(), t.shape().end());
    for (const CheckpointPiece& p : t.pieces()) {
      const Shape ps(p.shape().begin(), p.shape().end());
      if (!files.count(p.file()) || p.end() < p.begin() ||
          p.end() - p.begin() != NumElements(ps) * DTypeSize(dtype) ||
          p.offset_size() != static_cast<int>(shape.size()) || ps.size() != shape.size()) {
        return Status::Error(path + ": tensor '" + t.name() + "': inconsistent piece in " +
                             p.file());
      }
    }
  }
  return m;
}

Status LoadSlices(const std::string& dir, const CheckpointManifest& m,
                  std::vector<CheckpointSlice>* slices) {
  std::map<std::string, const CheckpointTensor*> by_name;
  for (const CheckpointTensor& t : m.tensors()) by_name[t.name()] = &t;
  FileSet files(dir, m);
  std::vector<char> buffer;
  // Pieces that are exactly a slice's rows are read straight into place, with one preadv
  // per run of adjacent pieces of a file; the others through a buffer.
  struct Direct {
    const CheckpointPiece* piece;
    const std::string* tensor;
    char* dst;
  };
  std::map<std::string, std::vector<Direct>> direct;
  for (CheckpointSlice& s : *slices) {
    auto it = by_name.find(s.name);
    if (it == by_name.end()) {
      return Status::Error(dir + ": no tensor '" + s.name + "' in the checkpoint (it holds " +
                           std::to_string(m.tensors_size()) +
                           " tensors; was it written by another model or config?)");
    }
    const CheckpointTensor& t = *it->second;
    const Shape shape(t.shape().begin(), t.shape().end());
    if (t.dtype() != DTypeName(s.local.dtype())) {
      return Status::Error(dir + ": tensor '" + s.name + "' is " + t.dtype() +
                           " in the checkpoint, " + DTypeName(s.local.dtype()) + " here");
    }
    if (shape != s.global_shape) {
      return Status::Error(dir + ": tensor '" + s.name + "' has shape " + ShapeText(shape) +
                           " in the checkpoint, " + ShapeText(s.global_shape) +
                           " here (another model?)");
    }
    CHECK(s.local.is_contiguous() && s.local.device() == Device::kCPU);
    const int64_t rb = s.row_begin, re = RowEnd(s);
    const uint64_t row_bytes = RowBytes(shape, DTypeSize(s.local.dtype()));
    char* out = static_cast<char*>(s.local.raw_data());
    int64_t covered = 0;
    for (const CheckpointPiece& p : t.pieces()) {
      const int64_t pb = shape.empty() ? 0 : p.offset(0);
      const int64_t pe = shape.empty() ? 1 : pb + p.shape(0);
      const int64_t lo = std::max(rb, pb), hi = std::min(re, pe);
      if (lo >= hi) continue;
      if (pb == rb && pe == re) {
        direct[p.file()].push_back({&p, &s.name, out});
      } else {
        buffer.resize(p.end() - p.begin());
        MOERUN_RETURN_IF_ERROR(ReadPiece(files, s.name, p, buffer.data()));
        std::memcpy(out + (lo - rb) * row_bytes, buffer.data() + (lo - pb) * row_bytes,
                    (hi - lo) * row_bytes);
      }
      covered += hi - lo;
    }
    if (covered != re - rb) {
      return Status::Error(dir + ": tensor '" + s.name + "': the checkpoint's pieces cover " +
                           std::to_string(covered) + " of the " + std::to_string(re - rb) +
                           " rows needed");
    }
  }
  for (auto& [file, reads] : direct) {
    std::sort(reads.begin(), reads.end(),
              [](const Direct& a, const Direct& b) { return a.piece->begin() < b.piece->begin(); });
    auto fd = files.Open(file);
    if (!fd.ok())
      return Status::Error(fd.status().message() + " (tensor '" + *reads[0].tensor + "')");
    for (size_t i = 0; i < reads.size();) {
      size_t j = i + 1;
      while (j < reads.size() && j - i < 512 &&
             reads[j].piece->begin() == reads[j - 1].piece->end()) {
        ++j;
      }
      std::vector<struct iovec> iov;
      uint64_t want = 0;
      for (size_t k = i; k < j; ++k) {
        const uint64_t n = reads[k].piece->end() - reads[k].piece->begin();
        iov.push_back({reads[k].dst, n});
        want += n;
      }
      ssize_t got;
      do {
        got = ::preadv(*fd, iov.data(), static_cast<int>(iov.size()),
                       static_cast<off_t>(reads[i].piece->begin()));
      } while (got < 0 && errno == EINTR);
      for (size_t k = i; k < j; ++k) {
        const Direct& d = reads[k];
        if (got != static_cast<ssize_t>(want)) {  // short or failed: piece by piece, precisely
          MOERUN_RETURN_IF_ERROR(ReadPiece(files, *d.tensor, *d.piece, d.dst));
          continue;
        }
        MOERUN_RETURN_IF_ERROR(CheckPiece(files.PathOf(file), *d.tensor, *d.piece, d.dst));
      }
      i = j;
    }
  }
  return Status::Ok();
}

StatusOr<Tensor> LoadTensor(const std::string& dir, const CheckpointManifest& m,
                            const std::string& name) {
  for (const CheckpointTensor& t : m.tensors()) {
    if (t.name() != name) continue;
    DType dtype;
    CHECK(ParseDType(t.dtype(), &dtype));
    std::vector<CheckpointSlice> one(1);
    one[0].name = name;
    one[0].global_shape.assign(t.shape().begin(), t.shape().end());
    one[0].local = Tensor::Empty(one[0].global_shape, dtype);
    MOERUN_RETURN_IF_ERROR(LoadSlices(dir, m, &one));
    return one[0].local;
  }
  return Status::Error(dir + ": no tensor '" + name + "' in the checkpoint");
}

Status VerifyCheckpoint(const std::string& dir, const CheckpointManifest& m) {
  FileSet files(dir, m);
  std::vector<char> buf;
  for (const CheckpointFile& f : m.files()) {
    auto fd = files.Open(f.name());
    if (!fd.ok()) return fd.status();
    buf.resize(f.header_bytes());
    MOERUN_RETURN_IF_ERROR(PreadAll(*fd, files.PathOf(f.name()), 0, buf.data(), buf.size()));
    if (Crc32c(buf.data(), buf.size()) != f.header_crc32c()) {
      return Status::Error(files.PathOf(f.name()) +
                           ": the safetensors header's checksum does not match the manifest "
                           "(the file is corrupt)");
    }
  }
  for (const CheckpointTensor& t : m.tensors()) {
    int64_t next = 0;
    const int64_t rows = t.shape_size() == 0 ? 1 : t.shape(0);
    for (const CheckpointPiece& p : t.pieces()) {
      const int64_t pb = t.shape_size() == 0 ? 0 : p.offset(0);
      if (pb != next) {
        return Status::Error(dir + ": tensor '" + t.name() +
                             "': pieces do not tile the tensor (a "
                             "gap or overlap at row " +
                             std::to_string(next) + ")");
      }
      next = pb + (t.shape_size() == 0 ? 1 : p.shape(0));
      buf.resize(p.end() - p.begin());
      MOERUN_RETURN_IF_ERROR(ReadPiece(files, t.name(), p, buf.data()));
    }
    if (next != rows) {
      return Status::Error(dir + ": tensor '" + t.name() + "': pieces cover " +
                           std::to_string(next) + " of " + std::to_string(rows) + " rows");
    }
  }
  return Status::Ok();
}

namespace {
// Committed or not, every step_* entry of root with its step number.
std::vector<std::pair<int64_t, std::string>> StepEntries(const std::string& root) {
  std::vector<std::pair<int64_t, std::string>> out;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(root, ec)) {
    const std::string name = e.path().filename().string();
    long long step = 0;
    if (name.rfind("step_", 0) == 0 && std::sscanf(name.c_str(), "step_%lld", &step) == 1) {
      out.push_back({step, name});
    }
  }
  std::sort(out.begin(), out.end());
  return out;
}
}  // namespace

std::vector<std::string> RemoveUncommitted(const std::string& root) {
  std::vector<std::string> removed;
  std::error_code ec;
  for (const auto& [step, name] : StepEntries(root)) {
    const std::string path = root + "/" + name;
    const bool tmp = name.size() > 4 && (name.compare(name.size() - 4, 4, ".tmp") == 0 ||
                                         name.find(".old") != std::string::npos);
    if (tmp || !fs::exists(path + "/" + kManifest, ec)) {
      fs::remove_all(path, ec);
      removed.push_back(name);
    }
  }
  return removed;
}

std::vector<std::string> ListCheckpoints(const std::string& root) {
  std::vector<std::string> out;
  std::error_code ec;
  for (const auto& [step, name] : StepEntries(root)) {
    if (name == CheckpointDirName(step) && fs::exists(root + "/" + name + "/" + kManifest, ec)) {
      out.push_back(name);
    }
  }
  return out;
}

std::vector<std::string> PruneCheckpoints(const std::string& root, int keep) {
  std::vector<std::string> removed;
  if (keep <= 0) return removed;
  const std::vector<std::string> all = ListCheckpoints(root);
  std::string latest;
  std::ifstream in(root + "/" + kLatest);
  if (in) std::getline(in, latest);
  std::error_code ec;
  for (size_t i = 0; i + keep < all.size(); ++i) {
    if (all[i] == latest) continue;
    fs::remove_all(root + "/" + all[i], ec);
    removed.push_back(all[i]);
  }
  return removed;
}

}  // namespace moerun
