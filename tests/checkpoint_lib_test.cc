// The checkpoint library (runtime/checkpoint.h) under mpirun -np 1, 2, 4: CRC-32C against
// RFC 3720's vectors, the save plan (each piece once, writers balanced, experts by their
// owner), row-sliced tensors loaded by overlap on any slicing, errors that name the tensor,
// a failed write on one rank, leftovers and pruning.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>

#include "runtime/checkpoint.h"
#include "runtime/crc32c.h"
#include "tests/mpi_test_main.h"

namespace moerun {
namespace {

namespace fs = std::filesystem;
using testing::World;

// A directory all ranks share (made by rank 0), removed at the end.
class SharedDir {
 public:
  SharedDir() : path_(testing::SharedTempDir("moerun-ckpt")) {}
  ~SharedDir() {
    World().Barrier();
    if (World().rank() == 0) fs::remove_all(path_);
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

TEST(Crc32c, Rfc3720Vectors) {
  EXPECT_EQ(Crc32c("123456789", 9), 0xE3069283u);
  unsigned char zeros[32] = {0}, ones[32], inc[32];
  for (int i = 0; i < 32; ++i) {
    ones[i] = 0xFF;
    inc[i] = static_cast<unsigned char>(i);
  }
  EXPECT_EQ(Crc32c(zeros, 32), 0x8A9136AAu);
  EXPECT_EQ(Crc32c(ones, 32), 0x62A8AB43u);
  EXPECT_EQ(Crc32c(inc, 32), 0x46DD794Eu);
  EXPECT_EQ(Crc32cPortable(0, "123456789", 9), 0xE3069283u);
}

TEST(Crc32c, FastEqualsPortableAndExtends) {
  std::mt19937 rng(7);
  std::vector<unsigned char> buf(80000);  // several 24 KiB stripes of the fast path
  for (auto& b : buf) b = static_cast<unsigned char>(rng());
  for (size_t start : {0, 1, 3, 7}) {
    for (size_t n : {0, 1, 7, 8, 9, 63, 64, 767, 768, 769, 1000, 1536, 4993, 24575, 24576, 24577,
                     49160, 79990}) {
      EXPECT_EQ(Crc32c(buf.data() + start, n), Crc32cPortable(0, buf.data() + start, n));
    }
  }
  for (size_t cut : {0, 1, 5, 8, 2500, 30001, 80000}) {
    EXPECT_EQ(Crc32cExtend(Crc32c(buf.data(), cut), buf.data() + cut, buf.size() - cut),
              Crc32c(buf.data(), buf.size()));
    EXPECT_EQ(
        Crc32cPortable(Crc32cPortable(0, buf.data(), cut), buf.data() + cut, buf.size() - cut),
        Crc32c(buf.data(), buf.size()));
  }
}

// Element (row, col) of global tensor `name`: a value no other element shares.
float Value(int tensor, int64_t row, int64_t col) {
  return static_cast<float>(tensor * 10000 + row * 100 + col);
}

Tensor Rows(int tensor, int64_t begin, int64_t end, int64_t cols) {
  Tensor t = Tensor::Empty({end - begin, cols});
  for (int64_t r = begin; r < end; ++r) {
    for (int64_t c = 0; c < cols; ++c)
      t.data<float>()[(r - begin) * cols + c] = Value(tensor, r, c);
  }
  return t;
}

// Rank r holds: dense tensors d0..d5 (every rank), its own "expert" tensor e<r>, and rows
// [r*R/P, (r+1)*R/P) of the row-sharded tensor "w" [R, 3].
constexpr int64_t kRows = 8;
std::vector<CheckpointSlice> MySlices() {
  const int p = World().size(), r = World().rank();
  std::vector<CheckpointSlice> s;
  for (int i = 0; i < 6; ++i) {
    const int64_t rows = 1 + i * 3;
    s.push_back({"d" + std::to_string(i), {rows, 4}, 0, -1, Rows(i, 0, rows, 4)});
  }
  s.push_back({"e" + std::to_string(r), {5, 2}, 0, -1, Rows(100 + r, 0, 5, 2)});
  const int64_t b = r * kRows / p, e = (r + 1) * kRows / p;
  s.push_back({"w", {kRows, 3}, b, e, Rows(99, b, e, 3)});
  return s;
}

CheckpointManifest State(int64_t step) {
  CheckpointManifest m;
  m.set_step(step);
  m.set_config("model { name: \"lib_test\" }");
  return m;
}

TEST(Checkpoint, PlanWritesEachPieceOnceAndBalances) {
  const std::vector<CheckpointSlice> slices = MySlices();
  const SavePlan plan = PlanSave(World(), slices);
  // Every rank writes its own expert and its own rows of w (it is their only holder).
  int64_t mine = 0, own = 0;
  for (int i : plan.mine) {
    ++mine;
    if (slices[i].name[0] == 'e' || slices[i].name == "w") ++own;
  }
  EXPECT_EQ(own, 2);
  World().AllReduce(&mine, 1, DType::kI64, ReduceOp::kSum);
  EXPECT_EQ(mine, 6 + 2 * World().size());  // 6 dense pieces once + P experts + P row pieces
  // Balance: no rank writes more than the least-loaded one plus the largest piece.
  int64_t bytes = static_cast<int64_t>(plan.local_bytes), hi = bytes, lo = bytes;
  World().AllReduce(&hi, 1, DType::kI64, ReduceOp::kMax);
  World().AllReduce(&lo, 1, DType::kI64, ReduceOp::kMin);
  EXPECT_LE(hi - lo, 16 * 4 * 4);
  EXPECT_EQ(plan.file.empty(), plan.mine.empty());
}

TEST(Checkpoint, SaveThenLoadAnySlicing) {
  SharedDir dir;
  const std::string root = dir.path() + "/ck";
  SaveResult r;
  Status s = SaveCheckpoint(World(), root, State(7), MySlices(), SaveOptions{}, &r);
  ASSERT_TRUE(s.ok()) << s.message();
  EXPECT_EQ(r.path, root + "/step_00000007");
  auto latest = LatestCheckpoint(root);
  ASSERT_TRUE(latest.ok());
  EXPECT_EQ(*latest, r.path);
  auto m = ReadManifest(r.path);
  ASSERT_TRUE(m.ok()) << m.status().message();
  EXPECT_EQ(m->step(), 7);
  EXPECT_EQ(m->world_size(), World().size());
  EXPECT_EQ(m->tensors_size(), 6 + World().size() + 1);
  ASSERT_TRUE(VerifyCheckpoint(r.path, *m).ok());
  // Every rank reads every tensor whole (a reshard to one rank), then w in odd slices that
  // cross the stored pieces.
  std::vector<CheckpointSlice> all;
  for (int i = 0; i < 6; ++i) {
    const int64_t rows = 1 + i * 3;
    all.push_back({"d" + std::to_string(i), {rows, 4}, 0, -1, Tensor::Zeros({rows, 4})});
  }
  for (int e = 0; e < World().size(); ++e) {
    all.push_back({"e" + std::to_string(e), {5, 2}, 0, -1, Tensor::Zeros({5, 2})});
  }
  all.push_back({"w", {kRows, 3}, 0, -1, Tensor::Zeros({kRows, 3})});
  all.push_back({"w", {kRows, 3}, 1, 7, Tensor::Zeros({6, 3})});
  all.push_back({"w", {kRows, 3}, 5, 6, Tensor::Zeros({1, 3})});
  s = LoadSlices(r.path, *m, &all);
  ASSERT_TRUE(s.ok()) << s.message();
  for (const CheckpointSlice& sl : all) {
    const int id = sl.name[0] == 'd'   ? std::stoi(sl.name.substr(1))
                   : sl.name[0] == 'e' ? 100 + std::stoi(sl.name.substr(1))
                                       : 99;
    const int64_t end = sl.row_end < 0 ? sl.global_shape[0] : sl.row_end;
    const Tensor want = Rows(id, sl.row_begin, end, sl.global_shape[1]);
    ASSERT_EQ(std::memcmp(want.raw_data(), sl.local.raw_data(), want.nbytes()), 0) << sl.name;
  }
  // The same through LoadTensor.
  auto w = LoadTensor(r.path, *m, "w");
  ASSERT_TRUE(w.ok());
  EXPECT_EQ(w->data<float>()[7 * 3 + 2], Value(99, 7, 2));
}

TEST(Checkpoint, LoadErrorsNameTheTensor) {
  SharedDir dir;
  const std::string root = dir.path() + "/ck";
  SaveResult r;
  ASSERT_TRUE(SaveCheckpoint(World(), root, State(1), MySlices(), SaveOptions{}, &r).ok());
  auto m = ReadManifest(r.path);
  ASSERT_TRUE(m.ok());
  std::vector<CheckpointSlice> one = {{"d2", {7, 4}, 0, -1, Tensor::Zeros({7, 4}, DType::kBF16)}};
  Status s = LoadSlices(r.path, *m, &one);
  EXPECT_NE(s.message().find("tensor 'd2' is F32 in the checkpoint, BF16 here"), std::string::npos)
      << s.message();
  one = {{"d2", {8, 4}, 0, -1, Tensor::Zeros({8, 4})}};
  s = LoadSlices(r.path, *m, &one);
  EXPECT_NE(s.message().find("tensor 'd2' has shape [7, 4] in the checkpoint, [8, 4] here"),
            std::string::npos)
      << s.message();
  one = {{"nope", {1}, 0, -1, Tensor::Zeros({1})}};
  s = LoadSlices(r.path, *m, &one);
  EXPECT_NE(s.message().find("no tensor 'nope'"), std::string::npos) << s.message();
}

TEST(Checkpoint, AFailedWriteOnOneRankCommitsNothing) {
  SharedDir dir;
  const std::string root = dir.path() + "/ck";
  ASSERT_TRUE(SaveCheckpoint(World(), root, State(1), MySlices(), SaveOptions{}, nullptr).ok());
  PendingSave p;
  ASSERT_TRUE(PrepareSave(World(), root, State(2), MySlices(), SaveOptions{}, &p).ok());
  WriteShard(&p);
  const int last = World().size() - 1;
  if (World().rank() == last) p.write_status = Status::Error("disk on fire");
  Status s = CommitSave(World(), &p, nullptr);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("disk on fire"), std::string::npos);
  if (World().size() > 1) {
    EXPECT_NE(s.message().find("rank " + std::to_string(last)), std::string::npos) << s.message();
  }
  World().Barrier();
  EXPECT_FALSE(fs::exists(root + "/step_00000002.tmp"));
  EXPECT_FALSE(fs::exists(root + "/step_00000002"));
  auto latest = LatestCheckpoint(root);
  ASSERT_TRUE(latest.ok());
  EXPECT_EQ(*latest, root + "/step_00000001");
}

TEST(Checkpoint, LeftoversPruningAndResolve) {
  SharedDir dir;
  const std::string root = dir.path() + "/ck";
  for (int step : {1, 2, 3, 4}) {
    ASSERT_TRUE(
        SaveCheckpoint(World(), root, State(step), MySlices(), SaveOptions{2}, nullptr).ok());
  }
  World().Barrier();
  if (World().rank() == 0) {
    EXPECT_EQ(ListCheckpoints(root), (std::vector<std::string>{"step_00000003", "step_00000004"}));
    fs::create_directories(root + "/step_00000005.tmp");
    fs::create_directories(root + "/step_00000006");  // no manifest: never committed
    EXPECT_EQ(RemoveUncommitted(root),
              (std::vector<std::string>{"step_00000005.tmp", "step_00000006"}));
    EXPECT_EQ(ListCheckpoints(root).size(), 2u);
    auto resolved = ResolveCheckpoint(root);
    ASSERT_TRUE(resolved.ok());
    EXPECT_EQ(*resolved, root + "/step_00000004");
    fs::create_directories(root + "/empty");
    EXPECT_NE(ResolveCheckpoint(root + "/empty").status().message().find("no manifest.pb"),
              std::string::npos);
    std::ofstream(root + "/LATEST") << "step_00000009\n";
    EXPECT_NE(LatestCheckpoint(root).status().message().find("not a committed checkpoint"),
              std::string::npos);
  }
}

TEST(Checkpoint, AssignWritersPrefersTheLeastLoadedHolder) {
  // Pieces of 10, 8, 5, 5 bytes, all held by ranks 0 and 1: 10 -> 0, 8 -> 1, 5 -> 1, 5 -> 0.
  const std::vector<int> w = AssignWriters({5, 10, 5, 8}, {{0, 1}, {0, 1}, {0, 1}, {0, 1}}, 2);
  EXPECT_EQ(w, (std::vector<int>{1, 0, 0, 1}));
  // A piece with one holder always goes to it.
  EXPECT_EQ(AssignWriters({100, 1}, {{1}, {0, 1}}, 2), (std::vector<int>{1, 0}));
}

TEST(Checkpoint, AsyncSavesTheSnapshotTakenAtStart) {
  SharedDir dir;
  const std::string root = dir.path() + "/ck";
  std::vector<CheckpointSlice> live = MySlices();
  AsyncCheckpointer background(World(), root, SaveOptions{});
  std::vector<SaveResult> done;
  for (int step : {3, 4}) {
    ASSERT_TRUE(background.Start(State(step), live).ok());
    // Training goes on and changes the live tensors: the save must not see it.
    for (CheckpointSlice& s : live) s.local.Fill(-1.0f);
    for (int i = 0; i < 1000 && background.busy(); ++i) ASSERT_TRUE(background.Poll(&done).ok());
    live = MySlices();
  }
  ASSERT_TRUE(background.Finish(&done).ok());
  ASSERT_EQ(done.size(), 2u);
  EXPECT_EQ(done[1].path, root + "/step_00000004");
  auto m = ReadManifest(done[1].path);
  ASSERT_TRUE(m.ok());
  std::vector<CheckpointSlice> back = MySlices();
  for (CheckpointSlice& s : back) s.local.SetZero();
  ASSERT_TRUE(LoadSlices(done[1].path, *m, &back).ok());
  const std::vector<CheckpointSlice> want = MySlices();
  for (size_t i = 0; i < want.size(); ++i) {
    EXPECT_EQ(
        std::memcmp(want[i].local.raw_data(), back[i].local.raw_data(), want[i].local.nbytes()), 0)
        << want[i].name;
  }
  auto latest = LatestCheckpoint(root);
  ASSERT_TRUE(latest.ok());
  EXPECT_EQ(*latest, root + "/step_00000004");
}

}  // namespace
}  // namespace moerun
