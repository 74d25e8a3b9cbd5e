// Segment: exclusive creation with mode 0600 and a random name, attachment that checks magic,
// version and geometry, and removal that leaves nothing in /dev/shm.
#include <dirent.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cctype>
#include <climits>
#include <cstdio>
#include <cstring>
#include <string>
#include <atomic>
#include <memory>
#include <thread>
#include <vector>

#include "mpop/segment.hpp"
#include "test_support.hpp"

namespace mpop {
namespace {

SegmentConfig small_config() {
  SegmentConfig c;
  c.slot.size = 64;
  c.slot.tsk_id_off = 0;
  c.slot.tsk_id_size = 4;
  c.slot.fn_id_off = 4;
  c.slot.fn_id_size = 4;
  c.slot.args_off = 8;
  c.slot.args_count = 4;
  c.slot.cargs_off = 40;
  c.slot.cargs_len = 24;
  c.queue_slots = 64;
  c.result_slots = 32;
  c.max_workers = 3;
  c.batch_size = 8;
  c.pool_bytes = 1 << 20;
  c.registry_bytes = 64 << 10;
  return c;
}

std::string shm_path(const std::string& name) { return "/dev/shm/" + name; }
bool shm_exists(const std::string& name) {
  struct stat st;
  return stat(shm_path(name).c_str(), &st) == 0;
}

// Names in /dev/shm that start with `prefix`.
// Copies a segment's bytes to a new shared-memory object, so that a test can corrupt the copy.
std::string copy_segment(const std::string& from, const std::string& to, size_t bytes) {
  int in = open(shm_path(from).c_str(), O_RDONLY);
  int out = open(shm_path(to).c_str(), O_RDWR | O_CREAT | O_EXCL, 0600);
  EXPECT_GE(in, 0);
  EXPECT_GE(out, 0);
  std::vector<char> buf(bytes);
  EXPECT_EQ(pread(in, buf.data(), bytes, 0), static_cast<ssize_t>(bytes));
  EXPECT_EQ(pwrite(out, buf.data(), bytes, 0), static_cast<ssize_t>(bytes));
  close(in);
  close(out);
  return to;
}
template <class T>
void poke(const std::string& name, size_t offset, T value) {
  int fd = open(shm_path(name).c_str(), O_RDWR);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(pwrite(fd, &value, sizeof value, static_cast<off_t>(offset)),
            static_cast<ssize_t>(sizeof value));
  close(fd);
}

class SegmentTest : public ::testing::Test {
 protected:
  // Unique per test process, so that parallel ctest runs never see each other's segments.
  std::string prefix = "mpoptest" + std::to_string(getpid());

  void TearDown() override {
    std::vector<std::string> left = test::remove_leftover_segments(prefix);
    EXPECT_TRUE(left.empty()) << "left in /dev/shm: " << left.front();
  }
};

TEST_F(SegmentTest, CreatesAPrivateSegmentWithARandomName) {
  auto seg = Segment::create(prefix, small_config());
  const std::string& name = seg->name();
  ASSERT_EQ(name.rfind(prefix + "_", 0), 0u) << name;
  std::string suffix = name.substr(prefix.size() + 1);
  EXPECT_GE(suffix.size(), 16u);
  for (char c : suffix) EXPECT_TRUE(std::isxdigit(static_cast<unsigned char>(c))) << name;

  struct stat st;
  ASSERT_EQ(stat(shm_path(name).c_str(), &st), 0);
  EXPECT_TRUE(S_ISREG(st.st_mode));
  EXPECT_EQ(st.st_mode & 07777, 0600u);
  EXPECT_EQ(st.st_uid, getuid());
  EXPECT_EQ(static_cast<uint64_t>(st.st_size), seg->size());

  auto other = Segment::create(prefix, small_config());
  EXPECT_NE(other->name(), name);
  EXPECT_EQ(test::shm_names(prefix).size(), 2u);
}

TEST_F(SegmentTest, HeaderDescribesTheLayout) {
  SegmentConfig cfg = small_config();
  auto seg = Segment::create(prefix, cfg);
  const SegmentHeader& h = seg->header();
  EXPECT_EQ(h.magic, kSegmentMagic);
  EXPECT_EQ(h.layout_version, kLayoutVersion);
  EXPECT_EQ(h.owner_pid, getpid());
  EXPECT_NE(h.owner_start_time, 0u);
  EXPECT_EQ(h.owner_start_time, Segment::process_start_time(getpid()));
  EXPECT_EQ(std::string(h.name), seg->name());
  EXPECT_EQ(h.attached.load(), 1u);
  EXPECT_EQ(h.shutdown.load(), 0u);
  EXPECT_EQ(h.total_bytes, seg->size());
  EXPECT_TRUE(seg->config().slot == cfg.slot);

  // Regions are page-aligned, in order, and inside the segment.
  std::vector<uint64_t> offs = {h.registry_off, h.ring_off, h.workers_off,
                                h.results_off,  h.pool_off, h.total_bytes};
  for (size_t i = 0; i < offs.size(); ++i) {
    EXPECT_EQ(offs[i] % 4096, 0u) << i;
    if (i) {
      EXPECT_GT(offs[i], offs[i - 1]) << i;
    }
  }
  EXPECT_GE(h.registry_off, sizeof(SegmentHeader));
  EXPECT_GE(h.ring_off - h.registry_off, cfg.registry_bytes);

  EXPECT_EQ(seg->tasks().capacity(), cfg.queue_slots);
  EXPECT_EQ(seg->tasks().stride(), TaskRing::stride_for_body(task_body_bytes(cfg.slot)));
  EXPECT_EQ(h.task_stride, seg->tasks().stride());
  EXPECT_EQ(seg->results().capacity(), cfg.result_slots);
  EXPECT_EQ(seg->results().stride(), kResultStride);
  EXPECT_TRUE(seg->pool().valid());
  EXPECT_GE(seg->pool().capacity_bytes(), cfg.pool_bytes);
  EXPECT_EQ(seg->pool().used_bytes(), 0u);
  EXPECT_EQ(seg->workers().count, cfg.max_workers);
  for (uint32_t i = 0; i < cfg.max_workers; ++i) EXPECT_EQ(seg->workers().record(i).id, i);
  EXPECT_EQ(seg->registry(), seg->base() + h.registry_off);
}

TEST_F(SegmentTest, RejectsBadConfigurations) {
  SegmentConfig c = small_config();
  c.queue_slots = 48;
  EXPECT_THROW(Segment::create(prefix, c), std::invalid_argument);
  c = small_config();
  c.queue_slots = 1;
  EXPECT_THROW(Segment::create(prefix, c), std::invalid_argument);
  c = small_config();
  c.result_slots = 0;
  EXPECT_THROW(Segment::create(prefix, c), std::invalid_argument);
  c = small_config();
  c.max_workers = 0;
  EXPECT_THROW(Segment::create(prefix, c), std::invalid_argument);
  c = small_config();
  c.batch_size = 0;
  EXPECT_THROW(Segment::create(prefix, c), std::invalid_argument);
}

TEST_F(SegmentTest, AttachSharesTheSameMemory) {
  auto owner = Segment::create(prefix, small_config());
  auto peer = Segment::attach(owner->name());
  EXPECT_EQ(owner->header().attached.load(), 2u);
  EXPECT_NE(peer->base(), owner->base());  // a second mapping of the same object
  EXPECT_EQ(peer->size(), owner->size());
  EXPECT_TRUE(peer->config().slot == owner->config().slot);

  uint32_t body = owner->tasks().body_bytes();
  ASSERT_EQ(owner->tasks().try_push(1, [&](uint32_t, void* b) { std::memset(b, 0xAB, body); }), 1u);
  uint32_t seen = 0;
  peer->tasks().claim_range(4, nullptr, [&](uint32_t, const uint8_t* b) {
    for (uint32_t i = 0; i < body; ++i) seen += b[i] == 0xAB;
  });
  EXPECT_EQ(seen, body);
  uint64_t off = peer->pool().try_alloc(300);
  EXPECT_EQ(owner->pool().used_bytes(), 2 * ArgPool::kUnit);
  owner->pool().free(off, 300);
}

TEST_F(SegmentTest, AnotherProcessAttachesAndLeaves) {
  auto owner = Segment::create(prefix, small_config());
  owner->set_unlink_on_close(false);
  std::string name = owner->name();
  pid_t child = test::fork_child([&] {
    auto seg = Segment::attach(name);
    if (seg->header().owner_pid != getppid()) return 2;
    uint32_t n = seg->tasks().try_push(1, [](uint32_t, void* b) { std::memcpy(b, "hi", 3); });
    if (n != 1) return 3;
    return seg->leave() == 1 ? 0 : 4;  // the owner is still attached: nothing removed
  });
  EXPECT_EQ(test::wait_child(child, 30'000), 0);
  EXPECT_EQ(owner->header().attached.load(), 1u);
  EXPECT_TRUE(shm_exists(name));
  std::string got;
  owner->tasks().claim_range(
      1, nullptr, [&](uint32_t, const uint8_t* b) { got = reinterpret_cast<const char*>(b); });
  EXPECT_EQ(got, "hi");
  EXPECT_EQ(owner->leave(), 0u);  // last one out removes it
  EXPECT_FALSE(shm_exists(name));
}

TEST_F(SegmentTest, AttachRefusesWhatIsNotThisLayout) {
  auto owner = Segment::create(prefix, small_config());
  const size_t size = owner->size();
  auto attach_copy = [&](const std::string& copy) {
    try {
      Segment::attach(copy);
    } catch (const LayoutMismatch& e) {
      Segment::remove(copy);
      return std::string("mismatch: ") + e.what();
    } catch (...) {
      Segment::remove(copy);
      return std::string("other exception");
    }
    Segment::remove(copy);
    return std::string("attached");
  };

  // An intact copy attaches.
  EXPECT_EQ(attach_copy(copy_segment(owner->name(), prefix + "_copy", size)), "attached");

  std::string c = copy_segment(owner->name(), prefix + "_copy", size);
  poke<uint64_t>(c, offsetof(SegmentHeader, magic), kSegmentMagic ^ 1);
  EXPECT_NE(attach_copy(c).find("mismatch: "), std::string::npos);

  c = copy_segment(owner->name(), prefix + "_copy", size);
  poke<uint32_t>(c, offsetof(SegmentHeader, layout_version), kLayoutVersion + 1);
  std::string why = attach_copy(c);
  EXPECT_NE(why.find("mismatch: "), std::string::npos);
  EXPECT_NE(why.find("layout version"), std::string::npos) << why;

  c = copy_segment(owner->name(), prefix + "_copy", size);
  poke<uint32_t>(c, offsetof(SegmentHeader, task_stride), owner->header().task_stride + 64);
  EXPECT_NE(attach_copy(c).find("mismatch: "), std::string::npos);

  c = copy_segment(owner->name(), prefix + "_copy", size);
  SlotLayout bigger = owner->config().slot;
  bigger.size += 64;  // a worker built for another slot class
  poke<SlotLayout>(c, offsetof(SegmentHeader, config) + offsetof(SegmentConfig, slot), bigger);
  EXPECT_NE(attach_copy(c).find("mismatch: "), std::string::npos);

  // Shorter than its header says, and shorter than a header.
  c = copy_segment(owner->name(), prefix + "_copy", size);
  ASSERT_EQ(truncate(shm_path(c).c_str(), static_cast<off_t>(size / 2)), 0);
  EXPECT_NE(attach_copy(c).find("mismatch: "), std::string::npos);
  c = copy_segment(owner->name(), prefix + "_copy", 100);
  EXPECT_NE(attach_copy(c).find("mismatch: "), std::string::npos);

  EXPECT_EQ(owner->header().attached.load(), 1u);  // refused attaches left no trace
  EXPECT_ANY_THROW(Segment::attach(prefix + "_does_not_exist"));
}

TEST_F(SegmentTest, OwnerRemovesItOnLeaveAndDestruction) {
  std::string name;
  {
    auto seg = Segment::create(prefix, small_config());
    name = seg->name();
    EXPECT_TRUE(shm_exists(name));
  }
  EXPECT_FALSE(shm_exists(name));

  auto seg = Segment::create(prefix, small_config());
  name = seg->name();
  auto peer = Segment::attach(name);
  // The owner unlinks the name at once; the peer's mapping stays valid.
  EXPECT_EQ(seg->leave(), 1u);
  EXPECT_FALSE(shm_exists(name));
  EXPECT_EQ(seg->leave(), 0u);  // a second leave does nothing
  EXPECT_EQ(peer->header().attached.load(), 1u);
  EXPECT_EQ(peer->leave(), 0u);
  EXPECT_FALSE(Segment::remove(name));
  EXPECT_TRUE(test::shm_names(prefix).empty());
}

TEST_F(SegmentTest, LastPeerOutRemovesItWhenTheOwnerKeepsIt) {
  auto owner = Segment::create(prefix, small_config());
  owner->set_unlink_on_close(false);
  std::string name = owner->name();
  auto a = Segment::attach(name);
  auto b = Segment::attach(name);
  EXPECT_EQ(owner->leave(), 2u);
  EXPECT_EQ(a->leave(), 1u);
  EXPECT_TRUE(shm_exists(name));
  b.reset();  // destruction leaves
  EXPECT_FALSE(shm_exists(name));
}

// An owner that dies without leaving keeps its share of `attached`; the worker that finds it
// dead drops that share with its own, so that the last one out still removes the segment.
TEST_F(SegmentTest, WorkerLeavingForADeadOwnerRemovesTheSegment) {
  test::SharedMemory shared(256);
  char* name_out = shared.at<char>(0);
  pid_t owner = test::fork_child([&] {
    auto seg = Segment::create(prefix, small_config());
    std::snprintf(name_out, 256, "%s", seg->name().c_str());
    _exit(0);  // dies holding its attachment: no leave(), no unlink
    return 1;
  });
  ASSERT_EQ(test::wait_child(owner, 30'000), 0);
  std::string name = name_out;
  ASSERT_TRUE(shm_exists(name));

  auto a = Segment::attach(name);
  auto b = Segment::attach(name);
  EXPECT_EQ(a->header().attached.load(), 3u);
  EXPECT_EQ(a->leave(/*owner_dead=*/true), 1u);  // its share and the owner's
  EXPECT_EQ(a->header().owner_released.load(), 1u);
  EXPECT_TRUE(shm_exists(name));
  EXPECT_EQ(b->leave(/*owner_dead=*/true), 0u);  // the owner's share is dropped only once
  EXPECT_FALSE(shm_exists(name));
}

TEST_F(SegmentTest, WorkerLeavingAfterTheOwnerLeftDropsOnlyItsOwnShare) {
  auto owner = Segment::create(prefix, small_config());
  std::string name = owner->name();
  auto a = Segment::attach(name);
  auto b = Segment::attach(name);
  EXPECT_EQ(owner->leave(), 2u);  // unlinks the name; a and b keep their mappings
  EXPECT_FALSE(shm_exists(name));
  EXPECT_EQ(a->header().owner_released.load(), 1u);
  EXPECT_EQ(a->leave(/*owner_dead=*/true), 1u);
  EXPECT_EQ(b->leave(), 0u);
}

TEST(SegmentProcess, StartTimeIdentifiesLiveProcessesOnly) {
  uint64_t mine = Segment::process_start_time(getpid());
  EXPECT_GT(mine, 0u);
  EXPECT_EQ(Segment::process_start_time(getpid()), mine);
  EXPECT_EQ(Segment::process_start_time(INT_MAX), 0u);
  pid_t child = test::fork_child([] { return 0; });
  ASSERT_EQ(test::wait_child(child, 30'000), 0);
  EXPECT_EQ(Segment::process_start_time(child), 0u);  // reaped
}

// WorkerRecord::life: the pid of a (generation, 0) record is filled in once, by the
// supervisor after a spawn or by the process at its start, whichever comes first; a
// record a new supervisor fenced, or one that moved on, is no stale process's.
TEST(WorkerLife, EitherSideFillsInThePidAndTheOtherAgrees) {
  auto rec = std::make_unique<WorkerRecord>();
  rec->life.store(life_word(3, 0));
  EXPECT_TRUE(claim_life(*rec, 3, 4242, 777));  // the process, first
  EXPECT_TRUE(claim_life(*rec, 3, 4242, 777));  // the supervisor, after its spawn returned
  EXPECT_EQ(rec->life.load(), life_word(3, 4242));
  EXPECT_EQ(rec->start_time.load(), 777u);
  EXPECT_FALSE(claim_life(*rec, 3, 5000, 888));  // another process of that generation
  EXPECT_EQ(rec->start_time.load(), 777u);
}

TEST(WorkerLife, AFencedOrNewerRecordIsNotAStaleProcesss) {
  auto rec = std::make_unique<WorkerRecord>();
  rec->life.store(life_word(3, kFencedPid));
  EXPECT_FALSE(claim_life(*rec, 3, 4242, 777));
  EXPECT_EQ(rec->start_time.load(), 0u);  // untouched
  rec->life.store(life_word(4, 0));        // the replacement's generation
  EXPECT_FALSE(claim_life(*rec, 3, 4242, 777));
  EXPECT_EQ(rec->life.load(), life_word(4, 0));
  EXPECT_TRUE(claim_life(*rec, 4, 4343, 999));
  EXPECT_EQ(life_generation(rec->life.load()), 4u);
  EXPECT_EQ(life_pid(rec->life.load()), 4343u);
}

TEST(WorkerLife, ConcurrentClaimsOfOneProcessBothSucceed) {
  for (int round = 0; round < 200; ++round) {
    auto rec = std::make_unique<WorkerRecord>();
    rec->life.store(life_word(1, 0));
    std::atomic<int> ok{0};
    std::thread a([&] { ok += claim_life(*rec, 1, 77, 5); });
    std::thread b([&] { ok += claim_life(*rec, 1, 77, 5); });
    a.join();
    b.join();
    EXPECT_EQ(ok.load(), 2);
    EXPECT_EQ(rec->life.load(), life_word(1, 77));
  }
}

// ---- a producer that died in the middle of a push --------------------------------------------

// A push stopped at `at` (as a producer killed there): the exception leaves the ring and
// the window as the death would.
struct Died {};
void push_and_die(TaskRing& ring, ClaimState& w, RingPoint at, uint64_t seq) {
  try {
    ring.try_push(
        1,
        [&](uint32_t, void* body) {
          TaskHeader h;
          h.seq = seq;
          std::memcpy(body, &h, sizeof h);
        },
        &w, [&](RingPoint p) {
          if (p == at) throw Died{};
        });
  } catch (Died&) {
    return;
  }
  FAIL() << "the push did not reach its fault point";
}

uint64_t push_one(TaskRing& ring, ClaimState& w, uint64_t seq) {
  return ring.try_push(1, [&](uint32_t, void* body) {
    TaskHeader h;
    h.seq = seq;
    std::memcpy(body, &h, sizeof h);
  }, &w);
}

std::vector<uint64_t> claim_seqs(TaskRing& ring, bool* saw_void = nullptr) {
  std::vector<uint64_t> out;
  ring.claim_range(64, nullptr, [&](uint32_t, const uint8_t* body) {
    TaskHeader h;
    std::memcpy(&h, body, sizeof h);
    if (is_void_task(body)) {
      if (saw_void) *saw_void = true;
      return;
    }
    out.push_back(h.seq);
  });
  return out;
}

SegmentConfig config_with_clients() {
  SegmentConfig c = small_config();
  c.max_clients = 2;
  c.client_slots = 16;
  return c;
}

TEST_F(SegmentTest, TheCellOfAProducerThatDiedAfterReservingItGetsAVoidTask) {
  auto seg = Segment::create(prefix, config_with_clients());
  TaskRing& ring = seg->tasks();
  ClaimState& dead = seg->client(0).push.w[0];
  push_and_die(ring, dead, RingPoint::kPushReserved, 7);
  ASSERT_EQ(push_one(ring, seg->client(1).push.w[0], 8), 1u);  // a live client pushes behind it
  EXPECT_TRUE(claim_seqs(ring).empty());  // the consumers wait at the dead one's cell
  seg->void_abandoned_push(dead, false);
  EXPECT_EQ(dead.in_claim.load(), 0u);
  bool saw_void = false;
  EXPECT_EQ(claim_seqs(ring, &saw_void), std::vector<uint64_t>{8});
  EXPECT_TRUE(saw_void);
  seg->void_abandoned_push(dead, false);  // again: nothing more
  EXPECT_TRUE(claim_seqs(ring).empty());
}

TEST_F(SegmentTest, AProducerThatDiedBeforeReservingLeavesTheCellToWhoeverReservedIt) {
  auto seg = Segment::create(prefix, config_with_clients());
  TaskRing& ring = seg->tasks();
  ClaimState& early = seg->client(0).push.w[0];
  push_and_die(ring, early, RingPoint::kPushBeforeCas, 5);  // window raised, no cell
  ClaimState& other = seg->client(1).push.w[0];
  push_and_die(ring, other, RingPoint::kPushReserved, 6);  // took the same cell, mid-write
  ASSERT_EQ(early.head, other.head);
  seg->void_abandoned_push(early, false);
  EXPECT_EQ(early.in_claim.load(), 0u);
  EXPECT_TRUE(ring.is_reserved_unpublished(other.head)) << "another producer's cell was voided";
  seg->void_abandoned_push(other, false);  // that one died too: now the cell is voided
  bool saw_void = false;
  EXPECT_TRUE(claim_seqs(ring, &saw_void).empty());
  EXPECT_TRUE(saw_void);

  // Died before reserving, and nobody took the cell since: nothing to fill.
  ClaimState& lone = seg->client(0).push.w[1];
  push_and_die(ring, lone, RingPoint::kPushBeforeCas, 9);
  const uint64_t end = ring.enqueue_pos();
  seg->void_abandoned_push(lone, false);
  EXPECT_EQ(lone.in_claim.load(), 0u);
  EXPECT_EQ(ring.enqueue_pos(), end);
  ASSERT_EQ(push_one(ring, seg->client(1).push.w[0], 10), 1u);
  EXPECT_EQ(claim_seqs(ring), std::vector<uint64_t>{10});
}

TEST_F(SegmentTest, AResultCellADeadProducerReservedGetsAVoidResult) {
  auto seg = Segment::create(prefix, config_with_clients());
  TaskRing& ring = seg->results();
  ClaimState& dead = seg->header().supervisor_post;
  try {
    ring.try_push(1, [](uint32_t, void*) {}, &dead, [](RingPoint p) {
      if (p == RingPoint::kPushReserved) throw Died{};
    });
  } catch (Died&) {
  }
  const uint64_t head = dead.head;
  ASSERT_TRUE(ring.is_reserved_unpublished(head));
  seg->void_abandoned_push(dead, true);
  uint32_t got = 0;
  ring.claim_range(8, nullptr, [&](uint32_t, const uint8_t* body) {
    ResultHeader r;
    std::memcpy(&r, body, sizeof r);
    EXPECT_EQ(r.status, ResultStatus::kVoid);
    ++got;
  });
  EXPECT_EQ(got, 1u);
}

TEST(WindowSet, EachConcurrentPushHasAWindowOfItsOwn) {
  auto set = std::make_unique<WindowSet>();
  std::atomic<int> inside{0}, most{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&] {
      for (int round = 0; round < 2000; ++round) {
        const uint32_t i = set->take();
        EXPECT_EQ(set->w[i].in_claim.exchange(1), 0u) << "window " << i << " taken twice";
        const int now = ++inside;
        for (int m = most.load(); now > m && !most.compare_exchange_weak(m, now);) {
        }
        --inside;
        set->w[i].in_claim.store(0);
        set->give_back(i);
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_LE(most.load(), static_cast<int>(kWindowsPerProducer));
}

}  // namespace
}  // namespace mpop
