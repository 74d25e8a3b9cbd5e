// Producer: the pre-start backlog keeps submission order and its feeder moves everything
// through a small ring as a consumer drains it; a full ring makes a non-blocking submit
// return kFull; close() and shutdown unblock and refuse submits.
#include <dirent.h>
#include <gtest/gtest.h>

#include <atomic>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "mpop/producer.hpp"
#include "test_support.hpp"

namespace mpop {
namespace {

using test::eventually;
using test::scaled;

constexpr uint32_t kSlotSize = 32;

SegmentConfig config(uint32_t queue_slots) {
  SegmentConfig c = test::basic_config(kSlotSize, 3);
  c.queue_slots = queue_slots;
  c.batch_size = 16;
  return c;
}

// The task with index i: its slot says i, a varying number of its bytes matter, and every
// fifth carries a pooled stream of varying length.
struct TaskFactory {
  std::vector<uint8_t> slot = std::vector<uint8_t>(kSlotSize);
  std::vector<uint8_t> stream;

  static uint32_t slot_used(uint64_t i) { return static_cast<uint32_t>(8 + i % 25); }
  static bool pooled(uint64_t i) { return i % 5 == 3; }
  static uint32_t stream_len(uint64_t i) { return static_cast<uint32_t>(1 + (i * 37) % 1500); }
  static uint8_t stream_byte(uint64_t i, uint32_t j) { return static_cast<uint8_t>(i * 7 + j); }

  TaskDraft make(uint64_t i) {
    std::fill(slot.begin(), slot.end(), 0);
    uint32_t used = slot_used(i);
    for (uint32_t j = 0; j < used; ++j) slot[j] = static_cast<uint8_t>(i + j);
    uint32_t id = static_cast<uint32_t>(i);
    std::memcpy(slot.data(), &id, 4);
    TaskDraft d;
    d.slot = slot.data();
    d.slot_used = used;
    if (pooled(i)) {
      stream.resize(stream_len(i));
      for (uint32_t j = 0; j < stream.size(); ++j) stream[j] = stream_byte(i, j);
      d.header.encoding = ArgEncoding::kPooled;
      d.header.stream_len = stream_len(i);
      d.stream = stream.data();
      d.stream_len = stream_len(i);
    }
    return d;
  }
};

// Checks one claimed task body against the factory, in order; frees its pooled stream.
struct OrderChecker {
  ArgPool pool;
  uint64_t next = 0;
  uint64_t errors = 0;

  void operator()(const uint8_t* body) {
    TaskHeader h;
    std::memcpy(&h, body, sizeof h);
    const uint8_t* slot = body + sizeof h;
    uint32_t id;
    std::memcpy(&id, slot, 4);
    uint64_t i = next++;
    bool ok = h.seq == i + 1 && id == static_cast<uint32_t>(i);
    uint32_t used = TaskFactory::slot_used(i);
    for (uint32_t j = 4; j < kSlotSize; ++j)
      ok = ok && slot[j] == (j < used ? static_cast<uint8_t>(i + j) : 0);
    if (TaskFactory::pooled(i)) {
      ok = ok && h.encoding == ArgEncoding::kPooled && h.pool_ref != 0 &&
           h.stream_len == TaskFactory::stream_len(i);
      if (h.pool_ref) {
        const uint8_t* s = pool.data(h.pool_ref);
        for (uint32_t j = 0; ok && j < h.stream_len; ++j)
          ok = s[j] == TaskFactory::stream_byte(i, j);
        pool.free(h.pool_ref, h.stream_len);
      }
    } else {
      ok = ok && h.pool_ref == 0;
    }
    if (!ok && errors++ < 5)
      ADD_FAILURE() << "task " << i << " arrived wrong (seq " << h.seq << ")";
  }
};

class ProducerTest : public ::testing::Test {
 protected:
  std::string prefix = "mpoptest" + std::to_string(getpid());

  void TearDown() override {
    std::vector<std::string> left = test::remove_leftover_segments(prefix);
    EXPECT_TRUE(left.empty()) << "left in /dev/shm: " << left.front();
  }

};

TEST_F(ProducerTest, BacklogKeepsOrderAndFeedsEverythingThroughASmallRing) {
  auto seg = Segment::create(prefix, config(64));
  TaskRing& ring = seg->tasks();
  const uint64_t total = scaled(200'000, 4000);
  const uint64_t before_start = total * 3 / 4;
  Producer producer(*seg);
  TaskFactory factory;

  for (uint64_t i = 0; i < before_start; ++i) {
    TaskDraft d = factory.make(i);
    ASSERT_EQ(producer.submit(d, /*blocking=*/true, -1), PushOutcome::kBacklog);
    ASSERT_EQ(d.header.seq, i + 1);
  }
  EXPECT_EQ(producer.backlog_size(), before_start);
  EXPECT_EQ(producer.submitted(), before_start);
  EXPECT_EQ(ring.size(), 0u);  // nothing reaches the ring before feeding starts
  EXPECT_EQ(seg->pool().used_bytes(), 0u);

  OrderChecker check{seg->pool()};
  std::thread consumer([&] {
    int64_t deadline = monotonic_ns() + 100'000'000'000;
    while (check.next < total && monotonic_ns() < deadline) {
      uint32_t k =
          ring.claim_range(16, nullptr, [&](uint32_t, const uint8_t* body) { check(body); });
      if (k == 0) ring.wait_published(monotonic_ns() + 20'000'000, [] { return false; });
    }
  });
  producer.start_feeding();
  // Tasks submitted while the feeder works still arrive after everything before them.
  uint64_t to_ring = 0;
  for (uint64_t i = before_start; i < total; ++i) {
    TaskDraft d = factory.make(i);
    PushOutcome out = producer.submit(d, true, -1);
    ASSERT_TRUE(out == PushOutcome::kBacklog || out == PushOutcome::kRing) << static_cast<int>(out);
    to_ring += out == PushOutcome::kRing;
  }
  consumer.join();
  EXPECT_EQ(check.next, total);
  EXPECT_EQ(check.errors, 0u);
  EXPECT_EQ(producer.backlog_size(), 0u);
  EXPECT_EQ(producer.submitted(), total);
  EXPECT_EQ(ring.size(), 0u);
  EXPECT_EQ(seg->pool().used_bytes(), 0u);
  RecordProperty("submitted_straight_to_ring", std::to_string(to_ring));
}

TEST_F(ProducerTest, NonBlockingSubmitReturnsFullOnAFullRing) {
  auto seg = Segment::create(prefix, config(64));
  Producer producer(*seg);
  producer.start_feeding();  // empty backlog: tasks go straight to the ring
  TaskFactory factory;
  for (uint64_t i = 0; i < 64; ++i) {
    TaskDraft d = factory.make(i);
    ASSERT_EQ(producer.submit(d, /*blocking=*/false, -1), PushOutcome::kRing) << i;
  }
  EXPECT_EQ(seg->tasks().size(), 64u);
  uint64_t used = seg->pool().used_bytes();
  for (uint64_t i = 64; i < 70; ++i) {
    TaskDraft d = factory.make(i);
    EXPECT_EQ(producer.submit(d, false, -1), PushOutcome::kFull) << i;
    EXPECT_EQ(d.header.pool_ref, 0u);  // a pooled stream is given back
  }
  EXPECT_EQ(seg->pool().used_bytes(), used);
  EXPECT_EQ(seg->tasks().size(), 64u);

  // A blocking submit with a deadline gives up as full too.
  TaskDraft late = factory.make(70);
  int64_t t0 = monotonic_ns();
  EXPECT_EQ(producer.submit(late, true, t0 + 20'000'000), PushOutcome::kFull);
  EXPECT_GE(monotonic_ns() - t0, 20'000'000);

  // One claimed task makes room for one more.
  OrderChecker check{seg->pool()};
  ASSERT_EQ(seg->tasks().claim_range(1, nullptr, [&](uint32_t, const uint8_t* b) { check(b); }),
            1u);
  TaskDraft d = factory.make(64);
  EXPECT_EQ(producer.submit(d, false, -1), PushOutcome::kRing);
  EXPECT_EQ(check.errors, 0u);
  // Refused submits took no task number: numbering has no gaps.
  EXPECT_EQ(d.header.seq, 65u);
  EXPECT_EQ(producer.submitted(), 65u);
}

TEST_F(ProducerTest, PooledStreamsLargerThanThePoolAreRefused) {
  auto seg = Segment::create(prefix, config(64));
  Producer producer(*seg);
  producer.start_feeding();
  std::vector<uint8_t> slot(kSlotSize), big(seg->pool().capacity_bytes() + 1);
  TaskDraft d;
  d.slot = slot.data();
  d.slot_used = kSlotSize;
  d.header.encoding = ArgEncoding::kPooled;
  d.stream = big.data();
  d.stream_len = static_cast<uint32_t>(big.size());
  EXPECT_EQ(producer.submit(d, true, -1), PushOutcome::kTooLarge);
  EXPECT_EQ(seg->tasks().size(), 0u);
  EXPECT_EQ(seg->pool().used_bytes(), 0u);
}

TEST_F(ProducerTest, CloseUnblocksASubmitBlockedOnAFullRing) {
  auto seg = Segment::create(prefix, config(4));
  Producer producer(*seg);
  producer.start_feeding();
  TaskFactory factory;
  for (uint64_t i = 0; i < 4; ++i) {
    TaskDraft d = factory.make(i * 5);  // not pooled
    ASSERT_EQ(producer.submit(d, false, -1), PushOutcome::kRing);
  }
  std::atomic<int> outcome{-1};
  std::thread blocked([&] {
    TaskFactory f;
    TaskDraft d = f.make(5);
    outcome.store(static_cast<int>(producer.submit(d, /*blocking=*/true, -1)));
  });
  ASSERT_TRUE(eventually([&] { return seg->tasks().control().not_full.waiters.load() == 1; }));
  EXPECT_EQ(outcome.load(), -1);
  producer.close();
  blocked.join();
  EXPECT_EQ(outcome.load(), static_cast<int>(PushOutcome::kClosed));
  EXPECT_TRUE(producer.closed());
  EXPECT_EQ(producer.submitted(), 4u);
  TaskDraft d = factory.make(6);
  EXPECT_EQ(producer.submit(d, true, -1), PushOutcome::kClosed);
  EXPECT_EQ(seg->tasks().size(), 4u);
}

TEST_F(ProducerTest, CloseUnblocksASubmitBlockedOnAFullPool) {
  auto seg = Segment::create(prefix, config(64));
  Producer producer(*seg);
  producer.start_feeding();
  ArgPool& pool = seg->pool();
  uint64_t all = pool.try_alloc(pool.capacity_bytes());
  ASSERT_NE(all, 0u);
  std::atomic<int> outcome{-1};
  std::thread blocked([&] {
    TaskFactory f;
    TaskDraft d = f.make(3);  // pooled
    outcome.store(static_cast<int>(producer.submit(d, true, -1)));
  });
  ASSERT_TRUE(eventually([&] { return pool.control().freed.waiters.load() == 1; }));
  EXPECT_EQ(outcome.load(), -1);
  producer.close();
  blocked.join();
  EXPECT_EQ(outcome.load(), static_cast<int>(PushOutcome::kClosed));
  EXPECT_EQ(seg->tasks().size(), 0u);
  pool.free(all, pool.capacity_bytes());
  EXPECT_EQ(pool.used_bytes(), 0u);
}

TEST_F(ProducerTest, ShutdownFlagRefusesSubmits) {
  auto seg = Segment::create(prefix, config(64));
  Producer producer(*seg);
  TaskFactory factory;
  TaskDraft d = factory.make(0);
  EXPECT_EQ(producer.submit(d, true, -1), PushOutcome::kBacklog);
  seg->header().shutdown.store(1);
  d = factory.make(1);
  EXPECT_EQ(producer.submit(d, true, -1), PushOutcome::kClosed);
  EXPECT_EQ(producer.submitted(), 1u);
}

TEST_F(ProducerTest, DropBacklogHandsBackEveryQueuedTaskInOrder) {
  auto seg = Segment::create(prefix, config(64));
  Producer producer(*seg);
  TaskFactory factory;
  for (uint64_t i = 0; i < 10; ++i) {
    TaskDraft d = factory.make(i);
    ASSERT_EQ(producer.submit(d, true, -1), PushOutcome::kBacklog);
  }
  EXPECT_FALSE(producer.pause_feeding());  // the backlog is not empty
  std::vector<uint64_t> seqs;
  uint64_t n = producer.drop_backlog([&](const TaskHeader& h, const uint8_t* slot) {
    uint32_t id;
    std::memcpy(&id, slot, 4);
    EXPECT_EQ(id + 1, h.seq);
    seqs.push_back(h.seq);
  });
  EXPECT_EQ(n, 10u);
  EXPECT_EQ(seqs, (std::vector<uint64_t>{1, 2, 3, 4, 5, 6, 7, 8, 9, 10}));
  EXPECT_EQ(producer.backlog_size(), 0u);
  EXPECT_EQ(seg->pool().used_bytes(), 0u);  // backlog streams never touched the pool
  producer.start_feeding();
  EXPECT_EQ(seg->tasks().size(), 0u);
}

TEST_F(ProducerTest, PauseSendsTasksBackToTheBacklogAndStartFeedsThem) {
  auto seg = Segment::create(prefix, config(64));
  Producer producer(*seg);
  producer.start_feeding();
  TaskFactory factory;
  OrderChecker check{seg->pool()};
  auto drain = [&] {
    return seg->tasks().claim_range(64, nullptr, [&](uint32_t, const uint8_t* b) { check(b); });
  };
  TaskDraft d = factory.make(0);
  EXPECT_EQ(producer.submit(d, true, -1), PushOutcome::kRing);
  EXPECT_EQ(drain(), 1u);
  EXPECT_TRUE(producer.pause_feeding());
  for (uint64_t i = 1; i < 20; ++i) {
    d = factory.make(i);
    EXPECT_EQ(producer.submit(d, true, -1), PushOutcome::kBacklog);
  }
  EXPECT_EQ(seg->tasks().size(), 0u);
  producer.start_feeding();
  ASSERT_TRUE(eventually([&] { return seg->tasks().size() == 19; }));
  EXPECT_EQ(drain(), 19u);
  EXPECT_EQ(check.next, 20u);
  EXPECT_EQ(check.errors, 0u);
  EXPECT_TRUE(eventually([&] { return producer.backlog_size() == 0; }));
}

// Destroying a producer whose feeder is asleep on a full ring returns promptly.
TEST_F(ProducerTest, DestructionStopsAFeederWaitingForRoom) {
  auto seg = Segment::create(prefix, config(8));
  {
    Producer producer(*seg);
    TaskFactory factory;
    for (uint64_t i = 0; i < 100; ++i) {
      TaskDraft d = factory.make(i);
      ASSERT_EQ(producer.submit(d, true, -1), PushOutcome::kBacklog);
    }
    producer.start_feeding();
    ASSERT_TRUE(eventually([&] { return seg->tasks().size() == 8; }));
    EXPECT_EQ(producer.backlog_size(), 92u);
  }
  EXPECT_EQ(seg->tasks().size(), 8u);
}

}  // namespace
}  // namespace mpop
