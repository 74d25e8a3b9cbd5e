// TaskRing: exact delivery under many producer and consumer threads and processes, a full
// ring, a ring of two, every batch size, counters crossing 2^32 and 2^64, blocking and
// waking, and recovery from a consumer or producer that died inside its window.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cstring>
#include <memory>
#include <new>
#include <thread>
#include <vector>

#include "mpop/task_ring.hpp"
#include "test_support.hpp"

namespace mpop {
namespace {

using test::kScale;
using test::mix;
using test::scaled;
using test::SharedMemory;
using test::SplitMix;

// What the tests put in a cell: who pushed it, its number, and a checksum of both.
struct Msg {
  uint32_t producer;
  uint32_t reserved;
  uint64_t seq;
  uint64_t check;
};

Msg make_msg(uint32_t producer, uint64_t seq) { return Msg{producer, 0, seq, mix(producer, seq)}; }
void write_msg(void* body, const Msg& m) { std::memcpy(body, &m, sizeof m); }
Msg read_msg(const uint8_t* body) {
  Msg m;
  std::memcpy(&m, body, sizeof m);
  return m;
}

const uint32_t kStride = TaskRing::stride_for_body(sizeof(Msg));
constexpr uint64_t k2To32 = uint64_t{1} << 32;
const auto kNever = [] { return false; };

// A ring in its own shared mapping, usable across fork().
struct RingFixture {
  RingFixture(uint32_t capacity, uint64_t initial_pos = 0, size_t extra = 0)
      : mem(TaskRing::bytes_needed(capacity, kStride) + extra),
        ring(TaskRing::create(mem.get(), capacity, kStride, initial_pos)),
        extra_at(TaskRing::bytes_needed(capacity, kStride)) {}
  SharedMemory mem;
  TaskRing ring;
  size_t extra_at;
};

// Pushes single values (producer 0, seq = value) and claims them back.
uint32_t push_values(TaskRing& ring, uint64_t first, uint32_t n, ClaimState* window = nullptr) {
  return ring.try_push(
      n, [&](uint32_t i, void* body) { write_msg(body, make_msg(0, first + i)); }, window);
}
std::vector<uint64_t> claim_values(TaskRing& ring, uint32_t max, ClaimState* claim = nullptr) {
  std::vector<uint64_t> out;
  ring.claim_range(max, claim, [&](uint32_t i, const uint8_t* body) {
    EXPECT_EQ(i, out.size());
    Msg m = read_msg(body);
    EXPECT_EQ(m.check, mix(m.producer, m.seq));
    out.push_back(m.seq);
  });
  return out;
}

using test::eventually;

TEST(TaskRingGeometry, RejectsCapacityNotAPowerOfTwoOrBelowTwo) {
  alignas(64) static uint8_t mem[1 << 16];
  for (uint32_t cap : {0u, 1u, 3u, 6u, 12u, 100u})
    EXPECT_THROW(TaskRing::create(mem, cap, kStride), std::invalid_argument) << cap;
  for (uint32_t stride : {0u, 8u, 32u, 100u, 65u})
    EXPECT_THROW(TaskRing::create(mem, 8, stride), std::invalid_argument) << stride;
  EXPECT_NO_THROW(TaskRing::create(mem, 2, 64));
}

TEST(TaskRingGeometry, StrideRoundsBodyPlusSequenceWordToCacheLines) {
  EXPECT_EQ(TaskRing::stride_for_body(1), 64u);
  EXPECT_EQ(TaskRing::stride_for_body(56), 64u);
  EXPECT_EQ(TaskRing::stride_for_body(57), 128u);
  EXPECT_EQ(TaskRing::bytes_needed(8, 64) % 64, 0u);
  EXPECT_GE(TaskRing::bytes_needed(8, 64), sizeof(RingControl) + 8 * 64);
  RingFixture f(16);
  EXPECT_EQ(f.ring.capacity(), 16u);
  EXPECT_EQ(f.ring.stride(), kStride);
  EXPECT_EQ(f.ring.body_bytes(), kStride - TaskRing::kSeqBytes);
}

TEST(TaskRing, ZeroMaxPushesAndClaimsNothing) {
  RingFixture f(4);
  EXPECT_EQ(push_values(f.ring, 0, 0), 0u);
  EXPECT_EQ(push_values(f.ring, 0, 1), 1u);
  EXPECT_TRUE(claim_values(f.ring, 0).empty());
  EXPECT_EQ(claim_values(f.ring, 1), std::vector<uint64_t>{0});
}

// ---- single-threaded exactness at several starting positions ------------------------------

class TaskRingAt : public ::testing::TestWithParam<uint64_t> {};

INSTANTIATE_TEST_SUITE_P(Positions, TaskRingAt,
                         ::testing::Values(uint64_t{0}, k2To32 - 37, k2To32 - 1, ~uint64_t{0} - 36),
                         [](const ::testing::TestParamInfo<uint64_t>& p) {
                           switch (p.index) {
                             case 0:
                               return std::string("Zero");
                             case 1:
                               return std::string("Below2To32");
                             case 2:
                               return std::string("At2To32Minus1");
                             default:
                               return std::string("Below2To64");
                           }
                         });

// The single consumer's peek and consume: peeked cells stay in the ring (a second peek
// sees them again, producers find no room in them) until consume takes them.
TEST_P(TaskRingAt, PeekLeavesCellsUntilConsumeTakesThem) {
  RingFixture f(8, GetParam());
  ASSERT_EQ(push_values(f.ring, 100, 5), 5u);
  for (int twice = 0; twice < 2; ++twice) {
    std::vector<uint64_t> seen;
    uint64_t head = 0;
    EXPECT_EQ(f.ring.peek_range(3, head, [&](uint32_t, const uint8_t* b) { seen.push_back(read_msg(b).seq); }), 3u);
    EXPECT_EQ(head, GetParam());
    EXPECT_EQ(seen, (std::vector<uint64_t>{100, 101, 102}));
  }
  EXPECT_EQ(push_values(f.ring, 200, 8), 3u);  // the 5 peeked-or-queued cells are not free
  uint64_t head = 0;
  EXPECT_EQ(f.ring.peek_range(8, head, [](uint32_t, const uint8_t*) {}), 8u);
  f.ring.consume(head, 2);
  EXPECT_EQ(claim_values(f.ring, 8), (std::vector<uint64_t>{102, 103, 104, 200, 201, 202}));
  EXPECT_EQ(push_values(f.ring, 300, 8), 8u);  // all released
}

// A producer that died after reserving cells: publish_abandoned fills exactly those (the
// published ones before and after them stay as they are), and the consumer reads on.
TEST_P(TaskRingAt, PublishAbandonedFillsOnlyTheDeadProducersReservedCells) {
  RingFixture f(8, GetParam());
  ASSERT_EQ(push_values(f.ring, 1, 2), 2u);
  // A producer that reserved 3 cells and died before writing them: the reservation alone.
  f.ring.control().enqueue_pos.fetch_add(3);
  EXPECT_EQ(claim_values(f.ring, 8), (std::vector<uint64_t>{1, 2}));
  EXPECT_TRUE(claim_values(f.ring, 8).empty());  // stuck at the reserved cells
  EXPECT_EQ(f.ring.publish_abandoned([](void* b) { write_msg(b, make_msg(9, 0)); }), 3u);
  EXPECT_EQ(f.ring.publish_abandoned([](void* b) { write_msg(b, make_msg(9, 0)); }), 0u);
  ASSERT_EQ(push_values(f.ring, 50, 1), 1u);
  EXPECT_EQ(claim_values(f.ring, 8), (std::vector<uint64_t>{0, 0, 0, 50}));
}

TEST_P(TaskRingAt, FillsToExactlyCapacityThenDrainsInOrder) {
  for (uint32_t cap : {2u, 8u, 64u}) {
    SCOPED_TRACE(cap);
    RingFixture f(cap, GetParam());
    TaskRing& r = f.ring;
    for (uint64_t lap = 0; lap < 3; ++lap) {
      uint64_t base = lap * cap;
      EXPECT_FALSE(r.has_published());
      for (uint32_t i = 0; i < cap; ++i) {
        EXPECT_TRUE(r.has_room());
        ASSERT_EQ(push_values(r, base + i, 1), 1u);
        EXPECT_EQ(r.size(), i + 1u);
      }
      // Capacity + 1: no room, whatever the batch asked for.
      EXPECT_FALSE(r.has_room());
      EXPECT_EQ(push_values(r, 999, 1), 0u);
      EXPECT_EQ(push_values(r, 999, cap + 3), 0u);
      EXPECT_EQ(r.size(), cap);
      EXPECT_TRUE(r.has_published());
      for (uint32_t i = 0; i < cap; ++i)
        ASSERT_EQ(claim_values(r, 1), std::vector<uint64_t>{base + i});
      EXPECT_TRUE(claim_values(r, cap).empty());
      EXPECT_EQ(r.size(), 0u);
      EXPECT_EQ(r.enqueue_pos() - GetParam(), base + cap);
      EXPECT_EQ(r.dequeue_pos() - GetParam(), base + cap);
    }
    // One call fills the whole ring and one call drains it.
    EXPECT_EQ(push_values(f.ring, 7000, cap + 3), cap);
    std::vector<uint64_t> all = claim_values(f.ring, cap + 3);
    ASSERT_EQ(all.size(), cap);
    for (uint32_t i = 0; i < cap; ++i) EXPECT_EQ(all[i], 7000 + i);
  }
}

// Every batch size from 1 to capacity + 3, for pushes and claims, against an exact model of
// what a single thread must see: min(batch, room) pushed, min(batch, published) claimed.
TEST_P(TaskRingAt, EveryBatchSizePushesAndClaimsExactlyWhatFits) {
  for (uint32_t cap : {2u, 4u, 8u, 16u}) {
    for (uint32_t b = 1; b <= cap + 3; ++b) {
      SCOPED_TRACE(::testing::Message() << "capacity " << cap << " batch " << b);
      RingFixture f(cap, GetParam());
      TaskRing& r = f.ring;
      ClaimState window, claim;
      const uint64_t total = 5 * cap + 3;
      uint64_t pushed = 0, claimed = 0, claims = 0, pushes = 0;
      while (claimed < total) {
        while (pushed < total) {
          uint32_t want = static_cast<uint32_t>(std::min<uint64_t>(b, total - pushed));
          uint64_t room = cap - (pushed - claimed);
          uint32_t expect = static_cast<uint32_t>(std::min<uint64_t>({want, cap, room}));
          uint32_t got = push_values(r, pushed, want, &window);
          ASSERT_EQ(got, expect);
          if (got == 0) break;
          ++pushes;
          EXPECT_EQ(window.head - GetParam(), pushed);
          EXPECT_EQ(window.count, got);
          EXPECT_EQ(window.in_claim.load(), 0u);
          EXPECT_EQ(window.epoch.load(), pushes);
          pushed += got;
        }
        uint64_t avail = pushed - claimed;
        std::vector<uint64_t> got = claim_values(r, b, &claim);
        ASSERT_EQ(got.size(), std::min<uint64_t>({b, cap, avail}));
        ++claims;
        EXPECT_EQ(claim.head - GetParam(), claimed);
        EXPECT_EQ(claim.count, got.size());
        EXPECT_EQ(claim.in_claim.load(), 0u);
        EXPECT_EQ(claim.epoch.load(), claims);
        for (uint64_t v : got) ASSERT_EQ(v, claimed++);
      }
      EXPECT_TRUE(claim_values(r, b, &claim).empty());
      EXPECT_EQ(claim.in_claim.load(), 0u);
      EXPECT_EQ(claim.epoch.load(), claims);  // an empty claim is no claim
      EXPECT_EQ(r.dequeue_pos() - GetParam(), total);
    }
  }
}

TEST(TaskRing, CountersCross2To32WithoutTruncation) {
  const uint64_t start = k2To32 - 5;
  RingFixture f(8, start);
  ClaimState claim;
  for (uint64_t i = 0; i < 20; ++i) {
    ASSERT_EQ(push_values(f.ring, i, 1), 1u);
    ASSERT_EQ(claim_values(f.ring, 3, &claim), std::vector<uint64_t>{i});
    EXPECT_EQ(claim.head, start + i);
  }
  EXPECT_EQ(f.ring.enqueue_pos(), k2To32 + 15);
  EXPECT_EQ(f.ring.dequeue_pos(), k2To32 + 15);
  // A batch that straddles the boundary within one claim.
  RingFixture g(8, k2To32 - 3);
  ASSERT_EQ(push_values(g.ring, 0, 6), 6u);
  EXPECT_EQ(claim_values(g.ring, 6, &claim), (std::vector<uint64_t>{0, 1, 2, 3, 4, 5}));
  EXPECT_EQ(claim.head, k2To32 - 3);
  EXPECT_EQ(g.ring.dequeue_pos(), k2To32 + 3);
}

TEST(TaskRing, CountersWrapPast2To64OnTheHotPath) {
  const uint64_t start = ~uint64_t{0} - 2;  // 2^64 - 3
  RingFixture f(4, start);
  ASSERT_EQ(push_values(f.ring, 0, 4), 4u);  // positions 2^64-3 .. 0
  EXPECT_EQ(push_values(f.ring, 9, 1), 0u);  // full across the wrap
  EXPECT_EQ(f.ring.enqueue_pos(), 1u);
  EXPECT_EQ(claim_values(f.ring, 2), (std::vector<uint64_t>{0, 1}));
  ASSERT_EQ(push_values(f.ring, 4, 4), 2u);
  EXPECT_EQ(claim_values(f.ring, 8), (std::vector<uint64_t>{2, 3, 4, 5}));
  EXPECT_EQ(f.ring.dequeue_pos(), 3u);
}

// ---- blocking and waking -------------------------------------------------------------------

TEST(TaskRing, BlockingPushSleepsOnAFullRingAndWakesWhenAConsumerReleases) {
  RingFixture f(4);
  ASSERT_EQ(push_values(f.ring, 0, 4), 4u);
  std::atomic<int> result{-1};
  std::thread producer([&] {
    bool ok = f.ring.push([](uint32_t, void* body) { write_msg(body, make_msg(0, 100)); },
                          monotonic_ns() + 30'000'000'000, kNever);
    result.store(ok ? 1 : 0);
  });
  // The producer is asleep on the eventcount, not returned.
  ASSERT_TRUE(eventually([&] { return f.ring.control().not_full.waiters.load() == 1; }));
  EXPECT_EQ(result.load(), -1);
  EXPECT_EQ(claim_values(f.ring, 1), std::vector<uint64_t>{0});
  producer.join();
  EXPECT_EQ(result.load(), 1);
  EXPECT_EQ(claim_values(f.ring, 8), (std::vector<uint64_t>{1, 2, 3, 100}));
}

TEST(TaskRing, BlockingPushGivesUpAtTheDeadlineOrWhenCancelled) {
  RingFixture f(2);
  ASSERT_EQ(push_values(f.ring, 0, 2), 2u);
  auto fill = [](uint32_t, void* body) { write_msg(body, make_msg(0, 5)); };
  int64_t t0 = monotonic_ns();
  EXPECT_FALSE(f.ring.push(fill, t0 + 20'000'000, kNever));
  EXPECT_GE(monotonic_ns() - t0, 20'000'000);

  std::atomic<bool> cancel{false};
  std::atomic<int> result{-1};
  std::thread producer([&] {
    bool ok = f.ring.push(fill, monotonic_ns() + 30'000'000'000, [&] { return cancel.load(); });
    result.store(ok ? 1 : 0);
  });
  ASSERT_TRUE(eventually([&] { return f.ring.control().not_full.waiters.load() == 1; }));
  cancel.store(true);
  f.ring.wake_producers();
  producer.join();
  EXPECT_EQ(result.load(), 0);
  EXPECT_EQ(f.ring.size(), 2u);
}

TEST(TaskRing, WaitPublishedWakesOnPublishTimesOutAndStops) {
  RingFixture f(8);
  int64_t t0 = monotonic_ns();
  EXPECT_FALSE(f.ring.wait_published(t0 + 20'000'000, kNever));
  EXPECT_GE(monotonic_ns() - t0, 20'000'000);
  EXPECT_TRUE(f.ring.wait_published(-1, [] { return true; }));  // stop() holds at once

  std::atomic<int> result{-1};
  std::thread consumer([&] {
    bool ok = f.ring.wait_published(monotonic_ns() + 30'000'000'000, kNever);
    result.store(ok && f.ring.has_published() ? 1 : 0);
  });
  ASSERT_TRUE(eventually([&] { return f.ring.control().not_empty.waiters.load() == 1; }));
  EXPECT_EQ(result.load(), -1);
  ASSERT_EQ(push_values(f.ring, 42, 1), 1u);
  consumer.join();
  EXPECT_EQ(result.load(), 1);
  EXPECT_EQ(f.ring.control().not_empty.waiters.load(), 0u);
}

// The single consumer's wait for a run of n cells: producers skip the futex wake until
// the push that completes the run, then wake it once.
TEST(TaskRing, WaitPublishedNWakesOnceForTheWholeRun) {
  for (uint64_t start : {uint64_t{0}, ~uint64_t{0} - 2}) {  // and across 2^64
    SCOPED_TRACE(start);
    RingFixture f(16, start);
    int64_t t0 = monotonic_ns();
    EXPECT_FALSE(f.ring.wait_published_n(3, t0 + 20'000'000, kNever, 0));
    EXPECT_GE(monotonic_ns() - t0, 20'000'000);
    EXPECT_TRUE(f.ring.wait_published_n(3, -1, [] { return true; }, 0));  // stop() at once

    std::atomic<int> result{-1};
    std::thread consumer([&] {
      bool ok = f.ring.wait_published_n(4, monotonic_ns() + 30'000'000'000, kNever, 0);
      result.store(ok && f.ring.published_run(4) == 4 ? 1 : 0);
    });
    ASSERT_TRUE(eventually([&] { return f.ring.control().not_empty.waiters.load() == 1; }));
    EXPECT_EQ(f.ring.control().wake_at.load(), start + 4);
    const uint32_t epoch = f.ring.control().not_empty.epoch.load();
    for (uint64_t v = 0; v < 3; ++v) ASSERT_EQ(push_values(f.ring, v, 1), 1u);
    EXPECT_EQ(f.ring.control().not_empty.epoch.load(), epoch);  // no wake-up issued yet
    EXPECT_EQ(result.load(), -1);
    ASSERT_EQ(push_values(f.ring, 3, 1), 1u);
    consumer.join();
    EXPECT_EQ(result.load(), 1);
    EXPECT_EQ(claim_values(f.ring, 16), (std::vector<uint64_t>{0, 1, 2, 3}));
  }
}

// Producers publish out of order: the push that completes the run can come before an
// earlier cell's. The consumer then waits for that gap, and the late cell wakes it.
TEST(TaskRing, WaitPublishedNWaitsForAGapLeftOutOfOrder) {
  RingFixture f(16);
  std::atomic<int> release{0};
  // Producer A reserves cell 0 and stops inside its window until released.
  std::thread slow([&] {
    f.ring.try_push(
        1, [](uint32_t, void* body) { write_msg(body, make_msg(1, 0)); }, nullptr,
        [&](RingPoint p) {
          if (p == RingPoint::kPushReserved)
            while (!release.load()) std::this_thread::sleep_for(std::chrono::microseconds(100));
        });
  });
  ASSERT_TRUE(eventually([&] { return f.ring.control().enqueue_pos.load() == 1; }));

  std::atomic<int> result{-1};
  std::thread consumer([&] {
    bool ok = f.ring.wait_published_n(2, monotonic_ns() + 30'000'000'000, kNever, 0);
    result.store(ok && f.ring.published_run(2) == 2 ? 1 : 0);
  });
  ASSERT_TRUE(eventually([&] { return f.ring.control().not_empty.waiters.load() == 1; }));
  EXPECT_EQ(f.ring.control().wake_at.load(), 2u);
  // Producer B publishes cell 1, completing the run's end first: the consumer wakes,
  // finds cell 0 missing, and goes back to sleep waiting for cell 0 alone.
  ASSERT_EQ(push_values(f.ring, 1, 1), 1u);
  ASSERT_TRUE(eventually([&] { return f.ring.control().wake_at.load() == 1; }));
  ASSERT_TRUE(eventually([&] { return f.ring.control().not_empty.waiters.load() == 1; }));
  EXPECT_EQ(result.load(), -1);
  release.store(1);
  slow.join();
  consumer.join();
  EXPECT_EQ(result.load(), 1);

  // The same gap already there when the wait begins: it waits for cell 2 alone.
  ASSERT_EQ(claim_values(f.ring, 16).size(), 2u);
  release.store(0);
  std::thread slow2([&] {
    f.ring.try_push(
        1, [](uint32_t, void* body) { write_msg(body, make_msg(1, 2)); }, nullptr,
        [&](RingPoint p) {
          if (p == RingPoint::kPushReserved)
            while (!release.load()) std::this_thread::sleep_for(std::chrono::microseconds(100));
        });
  });
  ASSERT_TRUE(eventually([&] { return f.ring.control().enqueue_pos.load() == 3; }));
  ASSERT_EQ(push_values(f.ring, 3, 2), 2u);  // cells 3 and 4
  result.store(-1);
  std::thread consumer2([&] {
    bool ok = f.ring.wait_published_n(3, monotonic_ns() + 30'000'000'000, kNever, 0);
    result.store(ok && f.ring.published_run(3) == 3 ? 1 : 0);
  });
  ASSERT_TRUE(eventually([&] { return f.ring.control().not_empty.waiters.load() == 1; }));
  EXPECT_EQ(f.ring.control().wake_at.load(), 3u);
  release.store(1);
  slow2.join();
  consumer2.join();
  EXPECT_EQ(result.load(), 1);
}

// Several producers pushing batches of every size while the one consumer waits for runs
// of random length: every value arrives, and no wait ever ends by its deadline (a skipped
// wake-up would leave the consumer asleep until then).
TEST(TaskRing, WaitPublishedNLosesNoWakeUpUnderManyProducers) {
  for (uint64_t start : {uint64_t{0}, ~uint64_t{0} - 1000}) {
    SCOPED_TRACE(start);
    RingFixture f(64, start);
    constexpr uint32_t kProducers = 4;
    const uint64_t per = scaled(20'000);
    std::vector<std::thread> producers;
    for (uint32_t p = 0; p < kProducers; ++p) {
      producers.emplace_back([&, p] {
        SplitMix rng(p + 1);
        uint64_t next = 0;
        while (next < per) {
          uint32_t want = static_cast<uint32_t>(std::min<uint64_t>(1 + rng.next() % 8, per - next));
          uint32_t k = f.ring.try_push(want, [&](uint32_t i, void* body) {
            write_msg(body, make_msg(p, next + i));
          });
          if (k == 0) std::this_thread::yield();
          next += k;
        }
      });
    }
    SplitMix rng(99);
    std::vector<uint64_t> seen(kProducers, 0);
    uint64_t total = 0, timeouts = 0;
    while (total < kProducers * per) {
      uint32_t n = static_cast<uint32_t>(std::min<uint64_t>(1 + rng.next() % 32, kProducers * per - total));
      if (!f.ring.wait_published_n(n, monotonic_ns() + 20'000'000'000, kNever, 0)) ++timeouts;
      f.ring.claim_range(64, nullptr, [&](uint32_t, const uint8_t* body) {
        Msg m = read_msg(body);
        EXPECT_EQ(m.check, mix(m.producer, m.seq));
        EXPECT_EQ(m.seq, seen[m.producer]);  // each producer's values in order
        seen[m.producer] = m.seq + 1;
        ++total;
      });
    }
    for (auto& t : producers) t.join();
    EXPECT_EQ(timeouts, 0u);
    EXPECT_EQ(total, kProducers * per);
  }
}

// While a consumer spins, producers skip the wake-up; a consumer that claims part of what
// was pushed wakes a sleeper for the rest, and clearing a dead spinner wakes everyone.
TEST(TaskRing, SleepersAreWokenWhenASpinnerLeavesCellsOrDies) {
  RingFixture f(16);
  auto push_n = [&](uint32_t n) {
    ASSERT_EQ(f.ring.try_push(n, [](uint32_t, void* b) { std::memset(b, 0, 8); }), n);
  };
  auto sleeper = [&](std::atomic<int>& woke) {
    return std::thread([&] {
      f.ring.wait_published(monotonic_ns() + 20'000'000'000, kNever, /*spin=*/0);
      woke.store(1);
    });
  };
  auto asleep = [&] {
    int64_t until = monotonic_ns() + 5'000'000'000;
    while (f.ring.control().not_empty.waiters.load() == 0 && monotonic_ns() < until)
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    return f.ring.control().not_empty.waiters.load() == 1;
  };
  auto woken = [](std::atomic<int>& woke) {
    int64_t until = monotonic_ns() + 10'000'000'000;
    while (!woke.load() && monotonic_ns() < until) std::this_thread::sleep_for(std::chrono::microseconds(200));
    return woke.load() == 1;
  };

  std::atomic<int> woke{0};
  std::thread a = sleeper(woke);
  ASSERT_TRUE(asleep());
  f.ring.control().spinner.store(7);  // someone spins: the push does not wake the sleeper
  push_n(3);
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  EXPECT_EQ(woke.load(), 0);
  ASSERT_EQ(f.ring.claim_range(1, nullptr, [](uint32_t, const uint8_t*) {}), 1u);  // the spinner
  f.ring.control().spinner.store(0);
  f.ring.wake_if_more();  // two are left: the sleeper is woken for them
  EXPECT_TRUE(woken(woke));
  a.join();
  ASSERT_EQ(f.ring.claim_range(16, nullptr, [](uint32_t, const uint8_t*) {}), 2u);

  woke.store(0);
  std::thread b = sleeper(woke);
  ASSERT_TRUE(asleep());
  f.ring.control().spinner.store(9);  // a spinner that dies before it sees the push
  push_n(1);
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  EXPECT_EQ(woke.load(), 0);
  f.ring.clear_spinner(8);  // not the spinner: nothing happens
  EXPECT_EQ(f.ring.control().spinner.load(), 9u);
  f.ring.clear_spinner(9);  // the supervisor's recovery
  EXPECT_TRUE(woken(woke));
  b.join();
  EXPECT_EQ(f.ring.control().spinner.load(), 0u);
}

// A consumer that finds no other spinner spins, sees a push without a wake-up, and gives
// the spinner role back; a second one at the same time sleeps instead.
TEST(TaskRing, OneSpinnerAtATime) {
  RingFixture f(16);
  std::atomic<uint32_t> seen_spinner{0};
  std::thread spinner([&] {
    EXPECT_TRUE(f.ring.spin_then_wait(3, 5'000'000'000, monotonic_ns() + 20'000'000'000, kNever));
  });
  int64_t until = monotonic_ns() + 5'000'000'000;
  while (f.ring.control().spinner.load() == 0 && monotonic_ns() < until) std::this_thread::yield();
  seen_spinner.store(f.ring.control().spinner.load());
  EXPECT_EQ(seen_spinner.load(), 3u);
  // A second consumer does not spin while the first does: it sleeps (and times out).
  int64_t t0 = monotonic_ns();
  EXPECT_FALSE(f.ring.spin_then_wait(4, 5'000'000'000, t0 + 20'000'000, kNever));
  EXPECT_LT(monotonic_ns() - t0, 2'000'000'000);
  ASSERT_EQ(f.ring.try_push(1, [](uint32_t, void* b) { std::memset(b, 0, 8); }), 1u);
  spinner.join();
  EXPECT_EQ(f.ring.control().spinner.load(), 0u);
}

// The futex is process-shared: a consumer process asleep in wait_published is woken by a push
// from another process, and a producer process asleep in push() by a release.
TEST(TaskRing, WakeUpsCrossProcesses) {
  RingFixture f(2);
  pid_t consumer = test::fork_child([&] {
    if (!f.ring.wait_published(monotonic_ns() + 20'000'000'000, kNever, /*spin=*/0)) return 2;
    std::vector<uint64_t> got = claim_values(f.ring, 4);
    return got == std::vector<uint64_t>{42} ? 0 : 3;
  });
  ASSERT_TRUE(eventually([&] { return f.ring.control().not_empty.waiters.load() == 1; }));
  ASSERT_EQ(push_values(f.ring, 42, 1), 1u);
  EXPECT_EQ(test::wait_child(consumer, 30'000), 0);

  ASSERT_EQ(push_values(f.ring, 1, 2), 2u);
  pid_t producer = test::fork_child([&] {
    bool ok = f.ring.push([](uint32_t, void* body) { write_msg(body, make_msg(0, 3)); },
                          monotonic_ns() + 20'000'000'000, kNever);
    return ok ? 0 : 2;
  });
  ASSERT_TRUE(eventually([&] { return f.ring.control().not_full.waiters.load() == 1; }));
  EXPECT_EQ(claim_values(f.ring, 1), std::vector<uint64_t>{1});
  EXPECT_EQ(test::wait_child(producer, 30'000), 0);
  EXPECT_EQ(claim_values(f.ring, 4), (std::vector<uint64_t>{2, 3}));
}

// ---- many producers and consumers ----------------------------------------------------------

// Shared bookkeeping of a run: a seen-bit per (producer, seq), and error counters. Lives in
// shared memory for the process runs.
struct Ledger {
  std::atomic<uint64_t> consumed{0};
  std::atomic<uint64_t> duplicates{0};
  std::atomic<uint64_t> corrupt{0};
  std::atomic<uint64_t> out_of_order{0};
  std::atomic<uint64_t> failures{0};
  std::atomic<uint64_t> check_sum{0};
  uint64_t words = 0;

  static size_t bytes(uint64_t values) { return sizeof(Ledger) + (values / 64 + 1) * 8; }
  static Ledger* create(void* mem, uint64_t values) {
    auto* l = new (mem) Ledger();
    l->words = values / 64 + 1;
    for (uint64_t i = 0; i < l->words; ++i) new (&l->seen()[i]) std::atomic<uint64_t>(0);
    return l;
  }
  // The seen-bits follow the ledger.
  std::atomic<uint64_t>* seen() { return reinterpret_cast<std::atomic<uint64_t>*>(this + 1); }
};

struct Workload {
  uint32_t capacity;
  uint32_t producers;
  uint32_t consumers;
  uint64_t per_producer;
  uint64_t initial_pos;
};

// One producer: its values in order, in batches of 1 .. capacity+3, falling back to a
// blocking push of one value when the ring is full.
bool produce(TaskRing& ring, uint32_t id, const Workload& w, int64_t deadline) {
  SplitMix rng{id * 7919ULL + 1};
  uint64_t next = 0;
  while (next < w.per_producer) {
    uint32_t batch = static_cast<uint32_t>(1 + rng.below(w.capacity + 3));
    uint32_t n = static_cast<uint32_t>(std::min<uint64_t>(batch, w.per_producer - next));
    uint32_t pushed =
        ring.try_push(n, [&](uint32_t i, void* body) { write_msg(body, make_msg(id, next + i)); });
    if (pushed == 0) {
      bool ok = ring.push([&](uint32_t, void* body) { write_msg(body, make_msg(id, next)); },
                          deadline, kNever);
      if (!ok) return false;
      pushed = 1;
    }
    next += pushed;
  }
  return true;
}

// One consumer: claims ranges of 1 .. capacity+3, checks each value and marks it seen; sleeps
// in wait_published when the ring is empty. Per producer, the values it sees must increase.
bool consume(TaskRing& ring, uint32_t id, const Workload& w, Ledger& ledger, int64_t deadline) {
  const uint64_t total = uint64_t{w.producers} * w.per_producer;
  std::vector<int64_t> last(w.producers, -1);
  SplitMix rng{id * 104729ULL + 3};
  ClaimState claim;
  uint64_t sum = 0;
  for (;;) {
    uint32_t max = static_cast<uint32_t>(1 + rng.below(w.capacity + 3));
    uint32_t k = ring.claim_range(max, &claim, [&](uint32_t, const uint8_t* body) {
      Msg m = read_msg(body);
      if (m.producer >= w.producers || m.seq >= w.per_producer ||
          m.check != mix(m.producer, m.seq)) {
        ledger.corrupt.fetch_add(1);
        return;
      }
      uint64_t bit = m.producer * w.per_producer + m.seq;
      uint64_t mask = uint64_t{1} << (bit % 64);
      if (ledger.seen()[bit / 64].fetch_or(mask, std::memory_order_relaxed) & mask)
        ledger.duplicates.fetch_add(1);
      if (static_cast<int64_t>(m.seq) <= last[m.producer]) ledger.out_of_order.fetch_add(1);
      last[m.producer] = static_cast<int64_t>(m.seq);
      sum += m.check;
    });
    if (k > 0) {
      ring.wake_if_more();  // as workers do: producers skip wake-ups while one spins
      if (ledger.consumed.fetch_add(k) + k >= total) ring.wake_consumers();
      continue;
    }
    if (ledger.consumed.load() >= total) break;
    if (monotonic_ns() > deadline) return false;
    auto done = [&] { return ledger.consumed.load() >= total; };
    const int64_t until = std::min(deadline, monotonic_ns() + 50'000'000);
    if (id % 2)
      ring.spin_then_wait(id + 1, 20'000, until, done);  // half of them spin, like idle workers
    else
      ring.wait_published(until, done);
  }
  ledger.check_sum.fetch_add(sum);
  return true;
}

void expect_exactly_once(Ledger& ledger, const Workload& w) {
  const uint64_t total = uint64_t{w.producers} * w.per_producer;
  EXPECT_EQ(ledger.consumed.load(), total);
  EXPECT_EQ(ledger.duplicates.load(), 0u);
  EXPECT_EQ(ledger.corrupt.load(), 0u);
  EXPECT_EQ(ledger.out_of_order.load(), 0u);
  EXPECT_EQ(ledger.failures.load(), 0u);
  uint64_t seen = 0;
  for (uint64_t i = 0; i < ledger.words; ++i) seen += std::popcount(ledger.seen()[i].load());
  EXPECT_EQ(seen, total) << "values lost";
  uint64_t sum = 0;
  for (uint32_t p = 0; p < w.producers; ++p)
    for (uint64_t s = 0; s < w.per_producer; ++s) sum += mix(p, s);
  EXPECT_EQ(ledger.check_sum.load(), sum);
}

std::string workload_name(const ::testing::TestParamInfo<Workload>& p) {
  const Workload& w = p.param;
  return "Cap" + std::to_string(w.capacity) + "_" + std::to_string(w.producers) + "P" +
         std::to_string(w.consumers) + "C_" + std::to_string(w.per_producer) + "Each" +
         (w.initial_pos == 0              ? ""
          : w.initial_pos < (k2To32 << 1) ? "_Near2To32"
                                          : "_Near2To64");
}

class TaskRingThreads : public ::testing::TestWithParam<Workload> {};

TEST_P(TaskRingThreads, EveryValueExactlyOnce) {
  const Workload w = GetParam();
  RingFixture f(w.capacity, w.initial_pos, Ledger::bytes(uint64_t{w.producers} * w.per_producer));
  Ledger* ledger =
      Ledger::create(f.mem.at<void>(f.extra_at), uint64_t{w.producers} * w.per_producer);
  const int64_t deadline = monotonic_ns() + 100'000'000'000;
  std::vector<std::thread> threads;
  for (uint32_t c = 0; c < w.consumers; ++c)
    threads.emplace_back([&, c] {
      if (!consume(f.ring, c, w, *ledger, deadline)) ledger->failures.fetch_add(1);
    });
  for (uint32_t p = 0; p < w.producers; ++p)
    threads.emplace_back([&, p] {
      if (!produce(f.ring, p, w, deadline)) {
        ledger->failures.fetch_add(1);
        ledger->consumed.store(~uint64_t{0} >> 1);  // let the consumers stop
        f.ring.wake_consumers();
      }
    });
  for (auto& t : threads) t.join();
  expect_exactly_once(*ledger, w);
  EXPECT_EQ(f.ring.size(), 0u);
  EXPECT_FALSE(f.ring.has_published());
}

INSTANTIATE_TEST_SUITE_P(
    Workloads, TaskRingThreads,
    ::testing::Values(Workload{64, 4, 4, scaled(500'000, 2000), 0},
                      Workload{2, 2, 2, scaled(100'000, 1000), 0},
                      Workload{8, 3, 1, scaled(200'000, 1000), k2To32 - 250'000},
                      Workload{1024, 1, 3, scaled(1'000'000, 5000), 0},
                      Workload{16, 2, 2, scaled(200'000, 1000), ~uint64_t{0} - 150'000}),
    workload_name);

class TaskRingProcesses : public ::testing::TestWithParam<Workload> {};

TEST_P(TaskRingProcesses, EveryValueExactlyOnce) {
  const Workload w = GetParam();
  RingFixture f(w.capacity, w.initial_pos, Ledger::bytes(uint64_t{w.producers} * w.per_producer));
  Ledger* ledger =
      Ledger::create(f.mem.at<void>(f.extra_at), uint64_t{w.producers} * w.per_producer);
  const int64_t deadline = monotonic_ns() + 100'000'000'000;
  std::vector<pid_t> pids;
  for (uint32_t c = 0; c < w.consumers; ++c)
    pids.push_back(
        test::fork_child([&, c] { return consume(f.ring, c, w, *ledger, deadline) ? 0 : 1; }));
  for (uint32_t p = 0; p < w.producers; ++p)
    pids.push_back(test::fork_child([&, p] { return produce(f.ring, p, w, deadline) ? 0 : 1; }));
  std::vector<int> codes = test::wait_children(pids, 110'000);
  for (size_t i = 0; i < codes.size(); ++i) EXPECT_EQ(codes[i], 0) << "child " << i;
  expect_exactly_once(*ledger, w);
  EXPECT_EQ(f.ring.size(), 0u);
  EXPECT_FALSE(f.ring.has_published());
}

INSTANTIATE_TEST_SUITE_P(
    Workloads, TaskRingProcesses,
    ::testing::Values(Workload{256, 2, 2, scaled(1'000'000, 5000), 0},
                      Workload{2, 2, 2, scaled(50'000, 500), 0},
                      Workload{64, 3, 3, scaled(100'000, 1000), k2To32 - 150'000},
                      Workload{32, 2, 2, scaled(100'000, 1000), ~uint64_t{0} - 80'000}),
    workload_name);

// ---- crash windows -------------------------------------------------------------------------

// Layout of the shared area of the crash tests: the dead process's ClaimState, then the
// "local queue" it copied into.
struct CrashArea {
  ClaimState state;
  std::atomic<uint32_t> copied{0};
  Msg local[64];
};

class TaskRingCrash : public ::testing::TestWithParam<uint64_t> {};

INSTANTIATE_TEST_SUITE_P(
    Positions, TaskRingCrash, ::testing::Values(uint64_t{0}, k2To32 - 2, ~uint64_t{0} - 127),
    [](const ::testing::TestParamInfo<uint64_t>& p) {
      return std::string(p.index == 0 ? "Zero" : p.index == 1 ? "Across2To32" : "Below2To64");
    });

// Where a consumer process dies: at one of the ring's fault-injection points, or inside its
// own sink right after copying cell `after_copy`.
struct ConsumerDeath {
  const char* name;
  bool at_hook;
  RingPoint point;
  uint32_t after_copy;
  bool claimed;     // whether the dequeue counter had moved past its cells
  uint32_t copied;  // cells it copied before dying
};

const ConsumerDeath kConsumerDeaths[] = {
    {"before the CAS", true, RingPoint::kClaimBeforeCas, 0, false, 0},
    {"right after the CAS", true, RingPoint::kClaimAfterCas, 0, true, 0},
    {"in the middle of the copy", true, RingPoint::kClaimMidCopy, 0, true, 1},
    {"before the release", true, RingPoint::kClaimBeforeRelease, 0, true, 4},
    {"in its sink after copy 0", false, RingPoint::kClaimAfterCas, 0, true, 1},
    {"in its sink after copy 2", false, RingPoint::kClaimAfterCas, 2, true, 3},
    {"in its sink after the last copy", false, RingPoint::kClaimAfterCas, 3, true, 4},
};

// A consumer process dies at every point of its claim window: if it had claimed, its cells
// stay claimed-but-unreleased, producers stop at them, and recover_unreleased hands back
// exactly those cells, after which the ring works on; if it had not, nothing is lost.
TEST_P(TaskRingCrash, ConsumerKilledInsideClaimWindowIsRecoveredExactly) {
  const uint64_t start = GetParam();
  for (const ConsumerDeath& death : kConsumerDeaths) {
    SCOPED_TRACE(death.name);
    RingFixture f(16, start, sizeof(CrashArea));
    auto* area = new (f.mem.at<void>(f.extra_at)) CrashArea();
    ASSERT_EQ(push_values(f.ring, 0, 10), 10u);

    pid_t child = test::fork_child([&] {
      f.ring.claim_range(
          4, &area->state,
          [&](uint32_t i, const uint8_t* body) {
            area->local[i] = read_msg(body);
            area->copied.fetch_add(1);
            if (!death.at_hook && i == death.after_copy) _exit(0);
          },
          [&](RingPoint p) {
            if (death.at_hook && p == death.point) _exit(0);
          });
      return 1;  // not reached
    });
    ASSERT_EQ(test::wait_child(child, 30'000), 0);
    EXPECT_EQ(area->copied.load(), death.copied);
    EXPECT_EQ(area->state.in_claim.load(), 1u);  // the supervisor sees it died in a window
    EXPECT_EQ(area->state.head, start);
    EXPECT_EQ(area->state.count, 4u);
    EXPECT_EQ(area->state.epoch.load(), 0u);
    const uint64_t below = f.ring.dequeue_pos();

    if (!death.claimed) {
      EXPECT_EQ(below, start);
      EXPECT_EQ(f.ring.recover_unreleased(below, [](uint64_t, const uint8_t*) {}), 0u);
      std::vector<uint64_t> all = claim_values(f.ring, 16);
      EXPECT_EQ(all, (std::vector<uint64_t>{0, 1, 2, 3, 4, 5, 6, 7, 8, 9}));
      continue;
    }
    EXPECT_EQ(below, start + 4);
    for (uint64_t i = 0; i < 4; ++i) EXPECT_TRUE(f.ring.is_unreleased(start + i)) << i;
    EXPECT_FALSE(f.ring.is_unreleased(start + 4));  // published, not claimed

    // The dead claim holds cells the next lap needs: only 6 more fit.
    EXPECT_EQ(push_values(f.ring, 10, 16), 6u);
    EXPECT_EQ(push_values(f.ring, 99, 1), 0u);

    // A live consumer's completed claim since the death is not touched by recovery.
    EXPECT_EQ(claim_values(f.ring, 2), (std::vector<uint64_t>{4, 5}));

    std::vector<std::pair<uint64_t, uint64_t>> recovered;
    uint32_t n = f.ring.recover_unreleased(below, [&](uint64_t pos, const uint8_t* body) {
      recovered.emplace_back(pos, read_msg(body).seq);
    });
    ASSERT_EQ(n, 4u);
    std::sort(recovered.begin(), recovered.end(),
              [&](auto& a, auto& b) { return a.first - start < b.first - start; });
    for (uint64_t i = 0; i < 4; ++i) {
      EXPECT_EQ(recovered[i].first, start + i);
      EXPECT_EQ(recovered[i].second, i);
      EXPECT_FALSE(f.ring.is_unreleased(start + i));
    }
    EXPECT_EQ(f.ring.recover_unreleased(f.ring.dequeue_pos(), [](uint64_t, const uint8_t*) {}), 0u);

    // The ring works on: the released cells take new values, and everything drains in order.
    EXPECT_EQ(push_values(f.ring, 16, 16), 6u);  // 4 recovered cells + 2 claimed above
    std::vector<uint64_t> rest = claim_values(f.ring, 64);
    std::vector<uint64_t> want;
    for (uint64_t v = 6; v < 22; ++v) want.push_back(v);
    EXPECT_EQ(rest, want);
    EXPECT_EQ(f.ring.size(), 0u);
  }
}

// recover_unreleased leaves alone the cells a live consumer is still copying: only those
// claimed below the dequeue counter read when the death was seen are recovered.
TEST_P(TaskRingCrash, RecoveryIgnoresClaimsMadeAfterTheDeath) {
  const uint64_t start = GetParam();
  RingFixture f(8, start, sizeof(CrashArea) * 2);
  auto* dead = new (f.mem.at<void>(f.extra_at)) CrashArea();
  auto* live = new (f.mem.at<void>(f.extra_at + sizeof(CrashArea))) CrashArea();
  ASSERT_EQ(push_values(f.ring, 0, 6), 6u);
  pid_t child = test::fork_child([&] {
    f.ring.claim_range(2, &dead->state, [&](uint32_t, const uint8_t*) { _exit(0); });
    return 1;
  });
  ASSERT_EQ(test::wait_child(child, 30'000), 0);
  const uint64_t below = f.ring.dequeue_pos();
  // A live consumer (here, this thread) is in the middle of its own claim of 2 and 3 while
  // the supervisor recovers: its cells must not be handed out twice.
  uint32_t n = 0;
  f.ring.claim_range(2, &live->state, [&](uint32_t i, const uint8_t*) {
    if (i == 0) {
      n = f.ring.recover_unreleased(
          below, [&](uint64_t pos, const uint8_t*) { EXPECT_LT(pos - start, 2u); });
    }
  });
  EXPECT_EQ(n, 2u);
  EXPECT_EQ(claim_values(f.ring, 8), (std::vector<uint64_t>{4, 5}));
}

void producer_died_after_reserving(uint64_t start, bool at_hook);

// A producer process reserves cells and dies before publishing them: consumers stop at the
// first reserved cell; whoever recovers publishes filler on the dead producer's behalf and
// the values behind it flow again.
TEST_P(TaskRingCrash, ProducerDiedAfterReservingIsPublishedOnItsBehalf) {
  for (bool at_hook : {true, false}) {
    SCOPED_TRACE(at_hook ? "died at kPushReserved" : "died in the middle of its fill");
    producer_died_after_reserving(GetParam(), at_hook);
  }
}

void producer_died_after_reserving(uint64_t start, bool at_hook) {
  RingFixture f(8, start, sizeof(CrashArea));
  auto* area = new (f.mem.at<void>(f.extra_at)) CrashArea();
  ASSERT_EQ(push_values(f.ring, 0, 2), 2u);
  pid_t child = test::fork_child([&] {
    f.ring.try_push(
        3,
        [&](uint32_t i, void* body) {
          write_msg(body, make_msg(0, 2 + i));
          if (i == 1) _exit(0);
        },
        &area->state,
        [&](RingPoint p) {
          if (at_hook && p == RingPoint::kPushReserved) _exit(0);
        });
    return 1;
  });
  ASSERT_EQ(test::wait_child(child, 30'000), 0);
  EXPECT_EQ(area->state.in_claim.load(), 1u);
  EXPECT_EQ(area->state.head, start + 2);
  EXPECT_EQ(area->state.count, 3u);
  for (uint64_t i = 0; i < 3; ++i) EXPECT_TRUE(f.ring.is_reserved_unpublished(start + 2 + i));
  EXPECT_FALSE(f.ring.is_reserved_unpublished(start + 1));  // published
  EXPECT_FALSE(f.ring.is_reserved_unpublished(start + 5));  // not reserved yet

  ASSERT_EQ(push_values(f.ring, 5, 2), 2u);  // live producers go on behind the hole
  EXPECT_EQ(claim_values(f.ring, 8), (std::vector<uint64_t>{0, 1}));
  EXPECT_TRUE(claim_values(f.ring, 8).empty());  // stopped at the reserved cell
  EXPECT_FALSE(f.ring.has_published());

  for (uint64_t i = 0; i < 3; ++i)
    f.ring.publish_reserved(area->state.head + i,
                            [&](void* body) { write_msg(body, make_msg(0, 100 + i)); });
  for (uint64_t i = 0; i < 3; ++i) EXPECT_FALSE(f.ring.is_reserved_unpublished(start + 2 + i));
  EXPECT_EQ(claim_values(f.ring, 8), (std::vector<uint64_t>{100, 101, 102, 5, 6}));
  EXPECT_EQ(f.ring.size(), 0u);
  EXPECT_EQ(push_values(f.ring, 7, 8), 8u);  // every cell free again
}

}  // namespace
}  // namespace mpop
