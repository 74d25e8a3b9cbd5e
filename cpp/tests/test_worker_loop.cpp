// The worker loop's steps, one at a time, in this process: a WorkerSession claims tasks into
// its local queue, decides when to leave, starts and runs a task (or skips one the owner
// cancelled), publishes its result (inline, through the pool, or as an error when it is too
// large for the pool) and marks it done. The supervisor suite covers the loop as a whole,
// in worker processes that die at each step.
#include <dirent.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstring>
#include <string>
#include <vector>

#include "mpop/collector.hpp"
#include "mpop/producer.hpp"
#include "mpop/worker_loop.hpp"
#include "test_support.hpp"

namespace mpop {
namespace {

constexpr uint32_t kFn = 7;

// tsk_id, fn_id, four int64 args, and room for TaskMeta.
SegmentConfig config() {
  SegmentConfig c;
  c.slot.size = 72;
  c.slot.tsk_id_off = 0;
  c.slot.tsk_id_size = 4;
  c.slot.fn_id_off = 4;
  c.slot.fn_id_size = 4;
  c.slot.args_off = 8;
  c.slot.args_count = 4;
  c.slot.meta_off = 40;
  c.slot.meta_len = 32;
  c.queue_slots = 64;
  c.result_slots = 64;
  c.max_workers = 1;
  c.batch_size = 4;
  c.pool_bytes = 1 << 16;
  c.registry_bytes = 4096;
  return c;
}

// Returns 2x + 1 for the argument x, or `blob_len` bytes when that is set; records its calls.
struct StepRunner {
  int calls = 0;
  size_t blob_len = 0;
  bool interrupt = false;
  std::vector<std::string> failures;
  std::vector<uint8_t> blob;

  ResultStatus run(const TaskRun& t, std::vector<uint8_t>& value) {
    ++calls;
    StreamWriter w(value);
    if (blob_len) {
      blob.assign(blob_len, 0x5a);
      w.blob(Tag::kBytes, blob.data(), blob.size());
    } else {
      int64_t x;
      std::memcpy(&x, t.slot + 8, sizeof x);
      w.integer(2 * x + 1);
    }
    return ResultStatus::kOk;
  }
  ResultStatus fail(const std::string& why, std::vector<uint8_t>& value) {
    failures.push_back(why);
    StreamWriter w(value);
    w.blob(Tag::kStr, why.data(), why.size());
    return ResultStatus::kError;
  }
  void before_sleep() {}
  void after_sleep() {}
  bool interrupted() { return interrupt; }
};

using Session = WorkerSession<StepRunner>;

// A result as the collector hands it over, its value copied out.
struct Got {
  ResultHeader h;
  std::vector<uint8_t> value;
};

class WorkerSessionTest : public ::testing::Test {
 protected:
  // Unique per test process, so that parallel ctest runs never see each other's segments.
  std::string prefix = "mpoptest" + std::to_string(getpid());
  SegmentConfig cfg = config();
  std::unique_ptr<Segment> seg;
  std::unique_ptr<Producer> producer;
  std::unique_ptr<Collector> collector;

  void make() {
    seg = Segment::create(prefix, cfg);
    producer = std::make_unique<Producer>(*seg);
    producer->start_feeding();
    collector = std::make_unique<Collector>(*seg);
  }

  void TearDown() override {
    collector.reset();
    producer.reset();
    seg.reset();
    std::vector<std::string> left;
    if (DIR* d = opendir("/dev/shm")) {
      while (dirent* e = readdir(d))
        if (std::strncmp(e->d_name, prefix.c_str(), prefix.size()) == 0) left.push_back(e->d_name);
      closedir(d);
    }
    for (auto& n : left) Segment::remove(n);
    EXPECT_TRUE(left.empty()) << "left in /dev/shm: " << left.front();
  }

  WorkerRecord& rec() { return seg->workers().record(0); }

  // Pushes tasks x = 0..n-1 (tsk_id x, one int argument); returns their seqs.
  std::vector<uint64_t> submit(int n) {
    std::vector<uint64_t> seqs;
    std::vector<uint8_t> slot(cfg.slot.size, 0);
    for (int i = 0; i < n; ++i) {
      uint32_t tsk = static_cast<uint32_t>(i), fn = kFn;
      int64_t x = i;
      std::memcpy(slot.data(), &tsk, 4);
      std::memcpy(slot.data() + 4, &fn, 4);
      std::memcpy(slot.data() + 8, &x, 8);
      TaskDraft d;
      d.header.encoding = ArgEncoding::kSlotInts;
      d.header.nargs = 1;
      d.slot = slot.data();
      d.slot_used = 16;
      EXPECT_EQ(producer->submit(d, false, 0), PushOutcome::kRing);
      seqs.push_back(d.header.seq);
    }
    return seqs;
  }

  std::vector<Got> drain() {
    std::vector<Got> out;
    collector->drain(
        64, 0,
        [&](const ResultHeader& h, const uint8_t* v, uint32_t len) {
          out.push_back({h, std::vector<uint8_t>(v, v + len)});
        },
        [] { return false; });
    return out;
  }

  static LocalState state_of(const WorkerTable& t, uint32_t j) {
    return static_cast<LocalState>(t.entry(0, j).state.load());
  }
};

TEST_F(WorkerSessionTest, ClaimCopiesUpToWantTasksIntoTheLocalQueue) {
  make();
  std::vector<uint64_t> seqs = submit(5);
  StepRunner runner;
  Session s(*seg, 0, runner);
  s.announce();
  ASSERT_EQ(s.claim_into_local_queue(3), 3u);
  EXPECT_EQ(rec().local_count.load(), 3u);
  EXPECT_EQ(rec().local_next.load(), 0u);
  for (uint32_t j = 0; j < 3; ++j) {
    EXPECT_EQ(state_of(seg->workers(), j), LocalState::kPending);
    TaskHeader th;
    std::memcpy(&th, seg->workers().entry_body(0, j), sizeof th);
    EXPECT_EQ(th.seq, seqs[j]);
  }
  EXPECT_EQ(seg->tasks().size(), 2u);  // the rest stay in the ring
  EXPECT_EQ(s.claim_into_local_queue(4), 2u);
  EXPECT_EQ(s.claim_into_local_queue(4), 0u);
}

TEST_F(WorkerSessionTest, MustLeaveForShutdownStopInterruptAndRecyclingInThatOrder) {
  cfg.max_tasks_per_worker = 5;
  make();
  StepRunner runner;
  Session s(*seg, 0, runner);
  s.announce();
  EXPECT_EQ(rec().state.load(), static_cast<uint32_t>(WorkerState::kIdle));
  uint32_t want = 0;
  EXPECT_FALSE(s.must_leave(want));
  EXPECT_EQ(want, cfg.batch_size);
  rec().tasks_this_life.store(3);
  EXPECT_FALSE(s.must_leave(want));
  EXPECT_EQ(want, 2u);  // no claim past max_tasks_per_worker
  rec().tasks_this_life.store(5);
  EXPECT_EQ(s.must_leave(want), WorkerExit::kRecycled);
  runner.interrupt = true;
  EXPECT_EQ(s.must_leave(want), WorkerExit::kInterrupted);
  rec().stop_request.store(1);
  EXPECT_EQ(s.must_leave(want), WorkerExit::kStopRequested);
  seg->header().shutdown.store(1);
  EXPECT_EQ(s.must_leave(want), WorkerExit::kShutdown);

  EXPECT_EQ(s.exit_with(WorkerExit::kShutdown), WorkerExit::kShutdown);
  EXPECT_EQ(rec().state.load(), static_cast<uint32_t>(WorkerState::kExiting));
  EXPECT_EQ(s.exit_with(WorkerExit::kOwnerDied), WorkerExit::kOwnerDied);
  EXPECT_EQ(rec().state.load(), static_cast<uint32_t>(WorkerState::kExited));
}

TEST_F(WorkerSessionTest, ATaskStartsRunsIsPublishedAndIsMarkedDone) {
  make();
  std::vector<uint64_t> seqs = submit(1);
  StepRunner runner;
  Session s(*seg, 0, runner);
  s.announce();
  ASSERT_EQ(s.claim_into_local_queue(4), 1u);
  s.begin_batch();
  EXPECT_EQ(rec().state.load(), static_cast<uint32_t>(WorkerState::kBusy));

  Session::Task t = s.start_task(0);
  EXPECT_EQ(state_of(seg->workers(), 0), LocalState::kRunning);
  EXPECT_EQ(rec().running_seq.load(), seqs[0]);
  EXPECT_EQ(rec().running_fn.load(), kFn);
  EXPECT_GT(rec().running_since_ns.load(), 0);
  TaskMeta m;
  std::memcpy(&m, t.slot + cfg.slot.meta_off, sizeof m);
  EXPECT_EQ(m.attempts, 1u);
  EXPECT_EQ(m.worker_id, 0u);

  s.run_task(t);
  EXPECT_EQ(runner.calls, 1);
  EXPECT_TRUE(t.ran);
  EXPECT_EQ(t.status, ResultStatus::kOk);

  ASSERT_TRUE(s.publish(t));
  EXPECT_EQ(rec().result_seq.load(), seqs[0]);
  std::vector<Got> got = drain();
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got[0].h.seq, seqs[0]);
  EXPECT_EQ(got[0].h.status, ResultStatus::kOk);
  EXPECT_EQ(got[0].h.value_encoding, ValueEncoding::kInline);
  EXPECT_EQ(got[0].h.attempts, 1u);
  StreamReader r(got[0].value.data(), static_cast<uint32_t>(got[0].value.size()));
  Item it = r.item();
  EXPECT_EQ(it.tag, Tag::kInt);
  EXPECT_EQ(it.i, 1);

  s.mark_done(t);
  EXPECT_EQ(state_of(seg->workers(), 0), LocalState::kDone);
  EXPECT_EQ(rec().local_next.load(), 1u);
  EXPECT_EQ(rec().running_since_ns.load(), 0);
  EXPECT_EQ(rec().completed.load(), 1u);
  EXPECT_EQ(rec().failed.load(), 0u);
  EXPECT_EQ(rec().tasks_this_life.load(), 1u);
  s.end_batch();
  EXPECT_EQ(rec().local_count.load(), 0u);
  EXPECT_EQ(rec().state.load(), static_cast<uint32_t>(WorkerState::kIdle));
}

TEST_F(WorkerSessionTest, ATaskTheOwnerCancelledNeverReachesTheRunner) {
  make();
  std::vector<uint64_t> seqs = submit(1);
  StepRunner runner;
  Session s(*seg, 0, runner);
  s.announce();
  ASSERT_EQ(s.claim_into_local_queue(4), 1u);
  ASSERT_TRUE(seg->request_cancel(seqs[0]));  // pending in the local queue: never runs

  Session::Task t = s.start_task(0);
  s.run_task(t);
  EXPECT_EQ(runner.calls, 0);
  EXPECT_FALSE(t.ran);
  EXPECT_EQ(t.status, ResultStatus::kCancelled);
  ASSERT_TRUE(s.publish(t));
  s.mark_done(t);
  std::vector<Got> got = drain();
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got[0].h.status, ResultStatus::kCancelled);
  EXPECT_EQ(rec().completed.load(), 0u);
  EXPECT_EQ(rec().failed.load(), 0u);
  EXPECT_EQ(rec().tasks_this_life.load(), 1u);
  seg->header().cancels.release(seqs[0]);
}

TEST_F(WorkerSessionTest, AValueTooLargeToGoInlineIsHandedOnThroughThePool) {
  make();
  submit(1);
  StepRunner runner;
  runner.blob_len = kResultInlineBytes + 500;
  Session s(*seg, 0, runner);
  s.announce();
  ASSERT_EQ(s.claim_into_local_queue(4), 1u);
  Session::Task t = s.start_task(0);
  s.run_task(t);
  ASSERT_TRUE(s.publish(t));
  const uint64_t ref = rec().result_ref.load();
  ASSERT_NE(ref, 0u);
  // Handed on: no longer the worker's (its death would not free it again).
  EXPECT_EQ(seg->pool().tag_of(ref), ArgPool::kResultTag);
  s.mark_done(t);

  std::vector<Got> got = drain();
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got[0].h.status, ResultStatus::kOk);
  EXPECT_EQ(got[0].h.value_encoding, ValueEncoding::kPooled);
  EXPECT_EQ(got[0].h.value_ref, ref);
  StreamReader r(got[0].value.data(), static_cast<uint32_t>(got[0].value.size()));
  Item it = r.item();
  EXPECT_EQ(it.tag, Tag::kBytes);
  EXPECT_EQ(it.len, runner.blob_len);
  EXPECT_EQ(seg->pool().used_bytes(), 0u);  // the collector freed the block
}

TEST_F(WorkerSessionTest, AValueLargerThanThePoolFailsItsTaskWithAnInlineError) {
  make();
  submit(1);
  StepRunner runner;
  runner.blob_len = 2 * cfg.pool_bytes;
  Session s(*seg, 0, runner);
  s.announce();
  ASSERT_EQ(s.claim_into_local_queue(4), 1u);
  Session::Task t = s.start_task(0);
  s.run_task(t);
  ASSERT_TRUE(s.publish(t));
  EXPECT_EQ(t.status, ResultStatus::kError);
  ASSERT_EQ(runner.failures.size(), 1u);
  EXPECT_NE(runner.failures[0].find("more than the whole argument pool"), std::string::npos)
      << runner.failures[0];
  s.mark_done(t);
  EXPECT_EQ(rec().failed.load(), 1u);
  EXPECT_EQ(rec().completed.load(), 0u);

  std::vector<Got> got = drain();
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got[0].h.status, ResultStatus::kError);
  EXPECT_EQ(got[0].h.value_encoding, ValueEncoding::kInline);
  StreamReader r(got[0].value.data(), static_cast<uint32_t>(got[0].value.size()));
  Item it = r.item();
  ASSERT_EQ(it.tag, Tag::kStr);
  EXPECT_EQ(std::string(reinterpret_cast<const char*>(it.data), it.len), runner.failures[0]);
  EXPECT_EQ(seg->pool().used_bytes(), 0u);
}

}  // namespace
}  // namespace mpop
