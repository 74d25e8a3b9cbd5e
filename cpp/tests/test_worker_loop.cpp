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
#include "mpop/side_channel.hpp"
#include "mpop/worker_loop.hpp"
#include "test_support.hpp"

namespace mpop {
namespace {

constexpr uint32_t kFn = 7;

// tsk_id, fn_id, four int64 args, and room for TaskMeta.
SegmentConfig config() {
  SegmentConfig c = test::basic_config(72, 4);
  c.slot.meta_off = 40;
  c.slot.meta_len = 32;
  c.batch_size = 4;
  c.pool_bytes = 1 << 16;
  return c;
}

// Returns 2x + 1 for the argument x, or `blob_len` bytes when that is set; records its calls.
struct StepRunner {
  int calls = 0;
  size_t blob_len = 0;
  bool interrupt = false;
  int interrupt_after = 0;  // > 0: leave the loop (interrupted) once this many tasks ran
  std::vector<std::string> failures;
  std::vector<uint8_t> blob;

  ResultStatus run(const TaskRun& t, std::vector<uint8_t>& value) {
    ++calls;
    if (interrupt_after && calls >= interrupt_after) interrupt = true;
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
    std::vector<std::string> left = test::remove_leftover_segments(prefix);
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


// ---- max_worker_memory ---------------------------------------------------------------------

// The worker reads its memory at most every kMemoryCheckTasks tasks (or kMemoryCheckNs):
// with a cap of 1 byte every reading is over it; without a cap, or with one it stays
// under, none is.
TEST_F(WorkerSessionTest, TheMemoryCapIsReadEveryFewTasksAndOnlyWhenSet) {
  for (uint64_t cap : {uint64_t{0}, uint64_t{1} << 50}) {
    cfg.max_worker_memory = cap;
    make();
    StepRunner runner;
    Session s(*seg, 0, runner);
    s.announce();
    for (uint32_t i = 0; i < 3 * kMemoryCheckTasks; ++i) ASSERT_FALSE(s.over_memory_cap()) << "cap " << cap;
    collector.reset();
    producer.reset();
    seg.reset();
  }
  cfg.max_worker_memory = 1;
  make();
  StepRunner runner;
  Session s(*seg, 0, runner);
  s.announce();
  for (int round = 0; round < 3; ++round) {
    uint32_t calls = 1;
    while (!s.over_memory_cap() && calls <= kMemoryCheckTasks) ++calls;
    EXPECT_LE(calls, kMemoryCheckTasks) << "round " << round;
  }
}

// Over the cap, the loop leaves (recycled) right after the task whose reading was over it,
// its result out; the rest of its claim stays pending in the local queue for the supervisor
// to hand back, and the ring keeps what it did not claim.
TEST_F(WorkerSessionTest, OverTheMemoryCapTheLoopLeavesMidClaimWithTheRestPending) {
  static_assert(kMemoryCheckTasks % 3 == 1);
  cfg.max_worker_memory = 1;
  cfg.batch_size = 3;
  cfg.queue_slots = 128;
  cfg.result_slots = 128;
  make();
  const int n = 100;
  std::vector<uint64_t> seqs = submit(n);
  StepRunner runner;
  runner.interrupt_after = n;  // a loop that never leaves for its memory ends all the same
  Session s(*seg, 0, runner);
  EXPECT_EQ(s.run(), WorkerExit::kRecycled);
  EXPECT_EQ(rec().state.load(), static_cast<uint32_t>(WorkerState::kExiting));

  const uint64_t done = rec().tasks_this_life.load();
  ASSERT_GE(done, 1u);
  ASSERT_LE(done, kMemoryCheckTasks);
  EXPECT_EQ(static_cast<uint64_t>(runner.calls), done);
  std::vector<Got> got;
  for (std::vector<Got> more = drain(); !more.empty(); more = drain()) got.insert(got.end(), more.begin(), more.end());
  ASSERT_EQ(got.size(), done);
  for (size_t i = 0; i < got.size(); ++i) EXPECT_EQ(got[i].h.seq, seqs[i]) << "result " << i;

  const uint32_t count = rec().local_count.load(), next = rec().local_next.load();
  EXPECT_EQ(count, 3u);  // the claim it was in the middle of, not closed
  EXPECT_EQ(next, (done - 1) % 3 + 1);
  for (uint32_t j = 0; j < count; ++j) {
    TaskHeader th;
    std::memcpy(&th, seg->workers().entry_body(0, j), sizeof th);
    EXPECT_EQ(th.seq, seqs[done - next + j]) << "entry " << j;
    EXPECT_EQ(state_of(seg->workers(), j), j < next ? LocalState::kDone : LocalState::kPending) << "entry " << j;
  }
  EXPECT_EQ(seg->tasks().size(), static_cast<uint64_t>(n) - (done - next + count));
  // Read after kMemoryCheckTasks tasks (unless kMemoryCheckNs passed first): mid-claim.
  if (done == kMemoryCheckTasks) {
    EXPECT_EQ(count - next, 2u);
  }
}

// ---- the side channel: worker output, log records and exit values -----------------------

// The bytes of side message `k` (any length): a pattern that shows a piece out of place.
std::vector<uint8_t> side_bytes(uint32_t k, size_t len) {
  std::vector<uint8_t> out(len);
  for (size_t j = 0; j < len; ++j) out[j] = static_cast<uint8_t>(k * 31 + j * 7 + j / 251 + 1);
  return out;
}

// What drain() handed to its sink, in order: a task's result or a whole side message.
struct Event {
  bool side;
  uint32_t route;     // side: the side route
  uint16_t worker;
  uint64_t seq;       // result: the task's seq
  uint32_t tsk_id;    // result: the task's tsk_id
  ResultStatus status;
  std::vector<uint8_t> bytes;  // side: the message; result: the value
};

std::string show(const Event& e) {
  if (e.side)
    return "side(route " + std::to_string(e.route - kFirstSideRoute) + ", worker " + std::to_string(e.worker) +
           ", " + std::to_string(e.bytes.size()) + " bytes)";
  return "result(tsk " + std::to_string(e.tsk_id) + ", seq " + std::to_string(e.seq) + ", status " +
         std::to_string(static_cast<int>(e.status)) + ")";
}

// Drains into `out` with `max` per call until the ring is empty (a call may take only
// pieces of a message and hand nothing on); returns how many results the drains reported.
size_t drain_events(Segment& seg, Collector& c, size_t max, std::vector<Event>& out) {
  size_t delivered = 0;
  for (int calls = 0; seg.results().has_published() && calls < 10000; ++calls) {
    delivered += c.drain(
        max, 0,
        [&](const ResultHeader& h, const uint8_t* v, uint32_t len) {
          out.push_back(Event{h.route >= kFirstSideRoute, h.route, h.worker_id, h.seq, h.tsk_id, h.status,
                              std::vector<uint8_t>(v, v + len)});
        },
        [] { return false; });
  }
  return delivered;
}

// (Its seq is the task the worker runs or ran last: what a persistent pool's forwarder
// routes it by; see SideChannelCarriesTheTaskSeq.)
bool is_side_event(const Event& e, uint32_t route, const std::vector<uint8_t>& bytes) {
  return e.side && e.route == route && e.worker == 0 && e.bytes == bytes;
}

bool is_result_event(const Event& e, uint32_t tsk_id, uint64_t seq) {
  if (e.side || e.tsk_id != tsk_id || e.seq != seq || e.status != ResultStatus::kOk) return false;
  StreamReader r(e.bytes.data(), static_cast<uint32_t>(e.bytes.size()));
  Item it = r.item();
  return it.tag == Tag::kInt && it.i == 2 * static_cast<int64_t>(tsk_id) + 1;
}

TEST_F(WorkerSessionTest, SideChannelCarriesTheTaskSeq) {
  make();
  SideChannel side(*seg, 0);
  WorkerRecord& rec = seg->workers().record(0);
  const uint8_t byte = 7;
  auto sent_seq = [&] {
    uint64_t seq = ~uint64_t{0};
    EXPECT_TRUE(side.send(kRouteStdout, &byte, 1));
    seg->results().claim_range(1, nullptr, [&](uint32_t, const uint8_t* body) {
      ResultHeader h;
      std::memcpy(&h, body, sizeof h);
      seq = h.seq;
    });
    return seq;
  };
  EXPECT_EQ(sent_seq(), 0u);  // no task yet
  rec.running_seq.store(41);
  rec.running_since_ns.store(monotonic_ns());
  EXPECT_EQ(sent_seq(), 41u);  // the task it runs
  rec.running_since_ns.store(0);
  rec.result_seq.store(42);
  EXPECT_EQ(sent_seq(), 42u);  // between tasks: the one whose result it published last
}

TEST_F(WorkerSessionTest, ASideMessageGoesOutAsNumberedPiecesOfAtMostTheInlineBytes) {
  make();
  SideChannel side(*seg, 0);
  const std::vector<uint8_t> msg = side_bytes(1, 5000);
  ASSERT_TRUE(side.send(kRouteStderr, msg.data(), msg.size()));
  ASSERT_TRUE(side.send(kRouteLog, nullptr, 0));

  // The raw records in the result ring, as the collector would copy them out.
  std::vector<std::vector<uint8_t>> recs;
  seg->results().claim_range(64, nullptr, [&](uint32_t, const uint8_t* body) {
    recs.emplace_back(body, body + kResultStride - 8);
  });
  const size_t pieces = (msg.size() + kResultInlineBytes - 1) / kResultInlineBytes;
  ASSERT_GT(pieces, 5u);
  ASSERT_EQ(recs.size(), pieces + 1);
  std::vector<uint8_t> joined;
  for (size_t k = 0; k < pieces; ++k) {
    ResultHeader h;
    std::memcpy(&h, recs[k].data(), sizeof h);
    EXPECT_EQ(h.seq, 0u) << "piece " << k;
    EXPECT_EQ(h.route, static_cast<uint32_t>(kRouteStderr)) << "piece " << k;
    EXPECT_EQ(h.worker_id, 0u) << "piece " << k;
    EXPECT_EQ(h.tsk_id, k) << "piece " << k;
    EXPECT_EQ(h.fn_id & kSideLastPiece, k + 1 == pieces ? kSideLastPiece : 0u) << "piece " << k;
    EXPECT_EQ(h.status, ResultStatus::kOk) << "piece " << k;
    EXPECT_EQ(h.value_encoding, ValueEncoding::kInline) << "piece " << k;
    const size_t want = k + 1 == pieces ? msg.size() - k * kResultInlineBytes : kResultInlineBytes;
    ASSERT_EQ(h.inline_len, want) << "piece " << k;
    joined.insert(joined.end(), recs[k].data() + sizeof h, recs[k].data() + sizeof h + h.inline_len);
  }
  EXPECT_EQ(joined, msg);
  // An empty message is one empty last piece.
  ResultHeader h;
  std::memcpy(&h, recs.back().data(), sizeof h);
  EXPECT_EQ(h.route, static_cast<uint32_t>(kRouteLog));
  EXPECT_EQ(h.tsk_id, 0u);
  EXPECT_EQ(h.fn_id & kSideLastPiece, kSideLastPiece);
  EXPECT_EQ(h.inline_len, 0u);
  EXPECT_EQ(seg->pool().used_bytes(), 0u);  // side pieces never use the pool
}

// Side messages sent between a worker's publications (as a handler's output is) come out
// of drain() whole and in the order they were sent, among the tasks' results, which are
// counted exactly; no piece of them counts as a result. Drained in one go, or a record at
// a time (the pieces of a message then span many drains).
class SideChannelDrainTest : public WorkerSessionTest, public ::testing::WithParamInterface<size_t> {};

TEST_P(SideChannelDrainTest, MessagesArriveWholeAndInOrderAmongUncountedResults) {
  make();
  std::vector<uint64_t> seqs = submit(2);
  StepRunner runner;
  Session s(*seg, 0, runner);
  SideChannel side(*seg, 0);
  s.announce();
  ASSERT_EQ(s.claim_into_local_queue(4), 2u);
  s.begin_batch();

  const std::vector<uint8_t> a = side_bytes(1, 5000);                   // 30 pieces
  const std::vector<uint8_t> b;                                         // empty
  const std::vector<uint8_t> c = side_bytes(3, 100);                    // one piece
  const std::vector<uint8_t> d = side_bytes(4, kResultInlineBytes);     // exactly one piece
  const std::vector<uint8_t> e = side_bytes(5, kResultInlineBytes + 1); // one byte over
  const std::vector<uint8_t> f = side_bytes(6, 2 * kResultInlineBytes); // exactly two
  auto send = [&](uint32_t route, const std::vector<uint8_t>& m) {
    ASSERT_TRUE(side.send(route, m.data(), m.size()));
  };
  auto task = [&](uint32_t j) {
    Session::Task t = s.start_task(j);
    s.run_task(t);
    ASSERT_TRUE(s.publish(t));
    s.mark_done(t);
  };
  send(kRouteStdout, a);
  task(0);
  send(kRouteStderr, b);
  send(kRouteLog, c);
  send(kRouteStdout, d);
  send(kRouteStdout, e);
  task(1);
  s.end_batch();
  send(kRouteExit, f);  // as a worker_exit value, after the loop

  std::vector<Event> got;
  EXPECT_EQ(drain_events(*seg, *collector, GetParam(), got), 2u);
  std::string all;
  for (const Event& ev : got) all += show(ev) + "\n";
  ASSERT_EQ(got.size(), 8u) << all;
  EXPECT_TRUE(is_side_event(got[0], kRouteStdout, a)) << all;
  EXPECT_TRUE(is_result_event(got[1], 0, seqs[0])) << all;
  EXPECT_TRUE(is_side_event(got[2], kRouteStderr, b)) << all;
  EXPECT_TRUE(is_side_event(got[3], kRouteLog, c)) << all;
  EXPECT_TRUE(is_side_event(got[4], kRouteStdout, d)) << all;
  EXPECT_TRUE(is_side_event(got[5], kRouteStdout, e)) << all;
  EXPECT_TRUE(is_result_event(got[6], 1, seqs[1])) << all;
  EXPECT_TRUE(is_side_event(got[7], kRouteExit, f)) << all;

  EXPECT_EQ(collector->completed(), 2u);
  EXPECT_EQ(collector->first_incomplete(), seqs[1] + 1);
  EXPECT_TRUE(collector->is_complete(seqs[0]));
  EXPECT_TRUE(collector->is_complete(seqs[1]));
  EXPECT_FALSE(collector->is_complete(seqs[1] + 1));
  EXPECT_EQ(rec().completed.load(), 2u);
  EXPECT_EQ(seg->results().size(), 0u);
  EXPECT_EQ(seg->pool().used_bytes(), 0u);
}

INSTANTIATE_TEST_SUITE_P(DrainSizes, SideChannelDrainTest, ::testing::Values(size_t{64}, size_t{1}),
                         [](const ::testing::TestParamInfo<size_t>& i) {
                           return i.param == 1 ? std::string("ARecordAtATime") : std::string("InOneGo");
                         });

// A worker that died in the middle of a message left its first pieces in the ring (and the
// supervisor a void record for the cell it had reserved): the next message of that worker
// and route starts afresh at its piece 0, and the half message is never delivered.
TEST_F(WorkerSessionTest, TheHalfMessageOfADeadWorkerIsDroppedWhenItsSuccessorSends) {
  make();
  auto push_raw = [&](uint32_t route, uint32_t piece, bool last, const std::vector<uint8_t>& data,
                      ResultStatus status = ResultStatus::kOk) {
    ResultHeader r;
    r.route = route;
    r.worker_id = 0;
    r.tsk_id = piece;
    r.fn_id = last ? kSideLastPiece : 0;
    r.status = status;
    r.inline_len = static_cast<uint16_t>(data.size());
    ASSERT_EQ(seg->results().try_push(1, [&](uint32_t, void* dst) {
      std::memcpy(dst, &r, sizeof r);
      if (!data.empty()) std::memcpy(static_cast<uint8_t*>(dst) + sizeof r, data.data(), data.size());
    }), 1u);
  };
  const std::vector<uint8_t> half = side_bytes(9, kResultInlineBytes);
  push_raw(kRouteStdout, 0, false, half);
  push_raw(kRouteStdout, 1, false, half);
  push_raw(0, 0, false, {}, ResultStatus::kVoid);  // the cell it reserved, voided
  // Its successor in the same record: a two-piece message on the same route, then a
  // one-piece one.
  SideChannel side(*seg, 0);
  const std::vector<uint8_t> whole = side_bytes(10, kResultInlineBytes + 50);
  const std::vector<uint8_t> small = side_bytes(11, 7);
  ASSERT_TRUE(side.send(kRouteStdout, whole.data(), whole.size()));
  ASSERT_TRUE(side.send(kRouteStdout, small.data(), small.size()));

  std::vector<Event> got;
  EXPECT_EQ(drain_events(*seg, *collector, 64, got), 0u);
  ASSERT_EQ(got.size(), 2u);
  EXPECT_TRUE(is_side_event(got[0], kRouteStdout, whole)) << show(got[0]);
  EXPECT_TRUE(is_side_event(got[1], kRouteStdout, small)) << show(got[1]);
  EXPECT_EQ(collector->completed(), 0u);
  EXPECT_EQ(collector->first_incomplete(), 1u);
}

TEST(SideAssembler, PutsPiecesTogetherPerWorkerAndRouteAndRestartsAtPieceZero) {
  SideAssembler asm_;
  std::vector<std::pair<uint64_t, std::string>> done;  // (worker << 32 | route, message)
  auto add = [&](uint16_t worker, uint32_t route, uint32_t piece, bool last, const std::string& text) {
    ResultHeader h;
    h.worker_id = worker;
    h.route = route;
    h.tsk_id = piece;
    h.fn_id = last ? kSideLastPiece : 0;
    asm_.add(h, reinterpret_cast<const uint8_t*>(text.data()), static_cast<uint32_t>(text.size()),
             [&](const uint8_t* d, uint32_t n) {
               done.emplace_back(uint64_t{worker} << 32 | route, std::string(reinterpret_cast<const char*>(d), n));
             });
  };
  auto key = [](uint16_t worker, uint32_t route) { return uint64_t{worker} << 32 | route; };

  add(0, kRouteStdout, 0, false, "ab");
  add(0, kRouteStdout, 1, false, "cd");
  EXPECT_TRUE(done.empty());
  // Worker 0 died there; its successor starts a message on the same route.
  add(0, kRouteStdout, 0, false, "XY");
  // Other workers and routes in between do not mix in.
  add(1, kRouteStdout, 0, false, "11");
  add(0, kRouteStderr, 0, true, "e");
  add(0, kRouteLog, 0, false, "L");
  ASSERT_EQ(done.size(), 1u);
  EXPECT_EQ(done[0], std::make_pair(key(0, kRouteStderr), std::string("e")));
  add(0, kRouteStdout, 1, false, "Z");
  add(1, kRouteStdout, 1, true, "22");
  add(0, kRouteStdout, 2, true, "!");
  add(0, kRouteLog, 1, true, "og");
  ASSERT_EQ(done.size(), 4u);
  EXPECT_EQ(done[1], std::make_pair(key(1, kRouteStdout), std::string("1122")));
  EXPECT_EQ(done[2], std::make_pair(key(0, kRouteStdout), std::string("XYZ!")));
  EXPECT_EQ(done[3], std::make_pair(key(0, kRouteLog), std::string("Log")));
  // A finished message leaves nothing behind: the next one starts empty.
  add(0, kRouteStdout, 0, false, "n");
  add(0, kRouteStdout, 1, true, "ew");
  ASSERT_EQ(done.size(), 5u);
  EXPECT_EQ(done[4], std::make_pair(key(0, kRouteStdout), std::string("new")));
  // Empty pieces and an empty message.
  add(2, kRouteExit, 0, true, "");
  add(2, kRouteExit, 0, false, "");
  add(2, kRouteExit, 1, true, "");
  ASSERT_EQ(done.size(), 7u);
  EXPECT_EQ(done[5], std::make_pair(key(2, kRouteExit), std::string()));
  EXPECT_EQ(done[6], std::make_pair(key(2, kRouteExit), std::string()));
}

// The runner of a forked worker: every task first writes side message `tsk_id` (lengths
// from empty to many pieces, on the output routes in turn), then returns 2x + 1.
size_t forked_message_len(uint32_t i) {
  static const size_t kLens[] = {5000, 0, 1, kResultInlineBytes, kResultInlineBytes + 1, 777, 3 * kResultInlineBytes};
  return kLens[i % (sizeof kLens / sizeof kLens[0])];
}
uint32_t forked_message_route(uint32_t i) { return kRouteStdout + i % 3; }

struct SideRunner : StepRunner {
  SideChannel* side = nullptr;
  bool ok = true;
  ResultStatus run(const TaskRun& t, std::vector<uint8_t>& value) {
    const std::vector<uint8_t> m = side_bytes(t.tsk_id, forked_message_len(t.tsk_id));
    ok = side->send(forked_message_route(t.tsk_id), m.data(), m.size()) && ok;
    return StepRunner::run(t, value);
  }
};

// A worker process runs the real loop and writes a message from every task through a
// result ring smaller than its longest message (so that sending waits for the owner to
// drain), then an exit value: the owner gets every message whole, each just before its
// task's result, and counts exactly the tasks.
TEST_F(WorkerSessionTest, AForkedWorkersMessagesComeWholeAndInOrderThroughASmallRing) {
  cfg.result_slots = 16;
  cfg.queue_slots = 64;
  make();
  ASSERT_LT(cfg.result_slots * kResultInlineBytes, 5000u);
  const uint32_t n = 48;
  std::vector<uint64_t> seqs = submit(static_cast<int>(n));
  const std::string name = seg->name();
  pid_t child = test::fork_child([&] {
    auto ws = Segment::attach(name);
    SideChannel side(*ws, 0);
    SideRunner runner;
    runner.side = &side;
    WorkerExit e = run_worker(*ws, 0, runner);
    if (e != WorkerExit::kShutdown || !runner.ok) return 2;
    const std::string bye = "bye";
    if (!side.send(kRouteExit, reinterpret_cast<const uint8_t*>(bye.data()), bye.size())) return 3;
    ws->leave();
    return 0;
  });

  std::vector<Event> got;
  size_t results = 0;
  bool shut = false, bye = false;
  const int64_t deadline = monotonic_ns() + 60'000'000'000;
  while (!bye && monotonic_ns() < deadline) {
    collector->drain(
        64, monotonic_ns() + 20'000'000,
        [&](const ResultHeader& h, const uint8_t* v, uint32_t len) {
          Event ev{h.route >= kFirstSideRoute, h.route, h.worker_id, h.seq, h.tsk_id, h.status,
                   std::vector<uint8_t>(v, v + len)};
          if (!ev.side) ++results;
          if (ev.side && ev.route == kRouteExit) bye = true;
          got.push_back(std::move(ev));
        },
        [] { return false; });
    if (results == n && !shut) {
      shut = true;
      seg->header().shutdown.store(1, std::memory_order_release);
      seg->tasks().wake_consumers();
    }
  }
  EXPECT_EQ(test::wait_child(child, 30'000), 0);
  ASSERT_TRUE(bye) << results << " results, " << got.size() << " events";

  // One worker takes the tasks in order: message i, result i, ..., then its exit value.
  ASSERT_EQ(got.size(), 2 * n + 1);
  for (uint32_t i = 0; i < n; ++i) {
    const std::vector<uint8_t> m = side_bytes(i, forked_message_len(i));
    EXPECT_TRUE(is_side_event(got[2 * i], forked_message_route(i), m)) << "task " << i << ": " << show(got[2 * i]);
    EXPECT_TRUE(is_result_event(got[2 * i + 1], i, seqs[i])) << "task " << i << ": " << show(got[2 * i + 1]);
  }
  const std::vector<uint8_t> bye_bytes{'b', 'y', 'e'};
  EXPECT_TRUE(is_side_event(got.back(), kRouteExit, bye_bytes)) << show(got.back());
  EXPECT_EQ(collector->completed(), n);
  EXPECT_EQ(collector->first_incomplete(), seqs.back() + 1);
  EXPECT_EQ(rec().completed.load(), n);
  EXPECT_EQ(seg->results().size(), 0u);
}

}  // namespace
}  // namespace mpop
