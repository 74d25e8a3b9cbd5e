// ArgPool: blocks of every size from one byte to many tag words, a full pool, blocking
// allocation woken by a free, many threads allocating and freeing without overlap or leak,
// owner tags, and reclaiming what a dead owner held.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <deque>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "mpop/arg_pool.hpp"
#include "test_support.hpp"

namespace mpop {
namespace {

using test::scaled;
using test::SharedMemory;
using test::SplitMix;

constexpr uint64_t kUnit = ArgPool::kUnit;
constexpr uint64_t kWord = ArgPool::kGranule * kUnit;  // the capacity granule (16 KiB)

struct PoolFixture {
  explicit PoolFixture(uint64_t data_bytes)
      : mem(ArgPool::bytes_needed(data_bytes)), pool(ArgPool::create(mem.get(), data_bytes)) {}
  SharedMemory mem;
  ArgPool pool;

  // Whether [off, off + bytes) lies inside the data area.
  bool in_bounds(uint64_t off, uint64_t bytes) const {
    uint64_t data = pool.control().data_off;
    return off >= data && off + bytes <= data + pool.capacity_bytes() &&
           off + bytes <= ArgPool::bytes_needed(pool.capacity_bytes());
  }
};

void fill_pattern(uint8_t* p, uint64_t n, uint64_t key) {
  for (uint64_t i = 0; i < n; ++i) p[i] = static_cast<uint8_t>(test::mix(key, i / 8) >> (i % 8));
}
bool has_pattern(const uint8_t* p, uint64_t n, uint64_t key) {
  for (uint64_t i = 0; i < n; ++i)
    if (p[i] != static_cast<uint8_t>(test::mix(key, i / 8) >> (i % 8))) return false;
  return true;
}

TEST(ArgPool, GeometryRoundsUpToWholeGranules) {
  PoolFixture f(1);
  EXPECT_TRUE(f.pool.valid());
  EXPECT_EQ(f.pool.capacity_bytes(), kWord);
  EXPECT_EQ(f.pool.used_bytes(), 0u);
  PoolFixture g(3 * kWord + 1);
  EXPECT_EQ(g.pool.capacity_bytes(), 4 * kWord);
  EXPECT_EQ(g.pool.control().data_off % 64, 0u);
  EXPECT_FALSE(ArgPool().valid());
  EXPECT_EQ(ArgPool().capacity_bytes(), 0u);
  EXPECT_EQ(ArgPool().try_alloc(1), 0u);
}

TEST(ArgPool, AllocatesAndFreesEverySize) {
  PoolFixture f(8 * kWord);
  const uint64_t cap = f.pool.capacity_bytes();
  std::vector<uint64_t> sizes = {
      1,         2,     255,       256,           257,           511,         512,     1000, 4096,
      kWord - 1, kWord, kWord + 1, 2 * kWord - 7, 3 * kWord + 5, cap - kWord, cap - 1, cap};
  for (uint64_t n = 1; n <= 70; ++n) sizes.push_back(n * kUnit - 1);  // 1 .. 70 units
  for (uint64_t bytes : sizes) {
    SCOPED_TRACE(bytes);
    uint64_t off = f.pool.try_alloc(bytes);
    ASSERT_NE(off, 0u);
    EXPECT_TRUE(f.in_bounds(off, bytes));
    EXPECT_EQ((off - f.pool.control().data_off) % kUnit, 0u);
    uint64_t units = (bytes + kUnit - 1) / kUnit;
    uint64_t charged = units <= ArgPool::kLanes ? units * kUnit : (units + 3) / 4 * 4 * kUnit;
    EXPECT_EQ(f.pool.used_bytes(), charged);
    EXPECT_EQ(f.pool.arg_bytes(), charged);
    EXPECT_EQ(f.pool.tag_of(off), ArgPool::kArgTag);
    fill_pattern(f.pool.data(off), bytes, bytes);
    EXPECT_TRUE(has_pattern(f.pool.data(off), bytes, bytes));
    f.pool.free(off, bytes);
    EXPECT_EQ(f.pool.used_bytes(), 0u);
  }
}

TEST(ArgPool, RejectsZeroAndMoreThanCapacity) {
  PoolFixture f(2 * kWord);
  EXPECT_EQ(f.pool.try_alloc(0), 0u);
  EXPECT_EQ(f.pool.try_alloc(f.pool.capacity_bytes() + 1), 0u);
  EXPECT_EQ(f.pool.used_bytes(), 0u);
  f.pool.free(0, 100);  // no-ops
  uint64_t off = f.pool.try_alloc(1);
  f.pool.free(off, 0);
  EXPECT_EQ(f.pool.used_bytes(), kUnit);
  f.pool.free(off, 1);
  EXPECT_EQ(f.pool.used_bytes(), 0u);
}

// One-unit blocks fill every unit exactly once; then the pool is full until a free.
TEST(ArgPool, FullPoolRefusesUntilAFreeMakesRoom) {
  PoolFixture f(4 * kWord);
  const uint64_t units = f.pool.capacity_bytes() / kUnit;
  std::vector<uint64_t> offs;
  for (;;) {
    uint64_t off = f.pool.try_alloc(kUnit);
    if (!off) break;
    offs.push_back(off);
    ASSERT_LE(offs.size(), units);
  }
  EXPECT_EQ(offs.size(), units);
  EXPECT_EQ(f.pool.used_bytes(), f.pool.capacity_bytes());
  std::sort(offs.begin(), offs.end());
  for (size_t i = 0; i < offs.size(); ++i)
    EXPECT_EQ(offs[i], f.pool.control().data_off + i * kUnit);
  EXPECT_EQ(f.pool.try_alloc(1), 0u);
  EXPECT_EQ(f.pool.try_alloc(2 * kUnit), 0u);

  f.pool.free(offs[77], kUnit);
  EXPECT_EQ(f.pool.try_alloc(2 * kUnit), 0u);  // one free unit is not two
  EXPECT_EQ(f.pool.try_alloc(kUnit), offs[77]);
  EXPECT_EQ(f.pool.try_alloc(1), 0u);

  // Freeing 64 units in a row makes room for a 64-unit block, and only there.
  for (size_t i = 128; i < 192; ++i) f.pool.free(offs[i], kUnit);
  EXPECT_EQ(f.pool.try_alloc(kWord + 1), 0u);
  EXPECT_EQ(f.pool.try_alloc(kWord), offs[128]);
  for (size_t i = 0; i < offs.size(); ++i)
    if (i < 128 || i >= 192) f.pool.free(offs[i], kUnit);
  f.pool.free(offs[128], kWord);
  EXPECT_EQ(f.pool.used_bytes(), 0u);

  // The whole pool as one block, then nothing else fits.
  uint64_t all = f.pool.try_alloc(f.pool.capacity_bytes());
  ASSERT_NE(all, 0u);
  EXPECT_EQ(f.pool.try_alloc(1), 0u);
  f.pool.free(all, f.pool.capacity_bytes());
  EXPECT_EQ(f.pool.used_bytes(), 0u);
}

// Every block carries its owner's tag; only arguments (kArgTag) count against the
// producer's cap, and a retag moves a block between owners without freeing it.
TEST(ArgPool, TagsSayWhoHoldsABlockAndOnlyArgumentsAreCapped) {
  PoolFixture f(4 * kWord);
  const uint16_t w3 = ArgPool::worker_tag(3);
  uint64_t arg = f.pool.try_alloc(3 * kUnit);
  uint64_t small = f.pool.try_alloc(100, UINT64_MAX, w3);
  uint64_t big = f.pool.try_alloc(2 * kWord + 1, UINT64_MAX, w3);
  ASSERT_TRUE(arg && small && big);
  EXPECT_EQ(f.pool.tag_of(arg), ArgPool::kArgTag);
  EXPECT_EQ(f.pool.tag_of(small), w3);
  EXPECT_EQ(f.pool.tag_of(big), w3);
  EXPECT_EQ(f.pool.arg_bytes(), 3 * kUnit);
  EXPECT_EQ(f.pool.bytes_tagged(w3), kUnit + ArgPool::span_units(2 * kWord + 1) * kUnit);
  // The cap counts arguments only: worker blocks do not stop the producer.
  const uint64_t cap = 4 * kUnit;
  EXPECT_NE(f.pool.try_alloc(kUnit, cap), 0u);
  EXPECT_EQ(f.pool.try_alloc(kUnit, cap), 0u);
  EXPECT_EQ(f.pool.arg_bytes(), 4 * kUnit);

  f.pool.retag(big, 2 * kWord + 1, ArgPool::kResultTag);
  EXPECT_EQ(f.pool.tag_of(big), ArgPool::kResultTag);
  f.pool.retag(arg, 3 * kUnit, ArgPool::kResultTag);  // e.g. arguments pinned by a handler
  EXPECT_EQ(f.pool.arg_bytes(), kUnit);
  f.pool.retag(arg, 3 * kUnit, ArgPool::kArgTag);
  EXPECT_EQ(f.pool.arg_bytes(), 4 * kUnit);
  EXPECT_EQ(f.pool.bytes_tagged(w3), kUnit);
}

// What a dead owner held (whole blocks, and the words of a run it was halfway through
// taking) comes back with reclaim(); nobody else's blocks are touched.
TEST(ArgPool, ReclaimFreesExactlyTheDeadOwnersUnits) {
  PoolFixture f(8 * kWord);
  const uint16_t dead = ArgPool::worker_tag(0), alive = ArgPool::worker_tag(1);
  std::vector<std::pair<uint64_t, uint64_t>> keep;
  for (uint64_t bytes : {1ul, 300ul, 1000ul, 5 * kUnit, kWord + 3}) {
    uint64_t a = f.pool.try_alloc(bytes);
    uint64_t d = f.pool.try_alloc(bytes, UINT64_MAX, dead);
    uint64_t o = f.pool.try_alloc(bytes, UINT64_MAX, alive);
    ASSERT_TRUE(a && d && o);
    fill_pattern(f.pool.data(a), bytes, a);
    fill_pattern(f.pool.data(o), bytes, o);
    keep.emplace_back(a, bytes);
    keep.emplace_back(o, bytes);
  }
  uint64_t held = f.pool.bytes_tagged(dead);
  EXPECT_GT(held, 0u);
  uint64_t before = f.pool.used_bytes();
  EXPECT_EQ(f.pool.reclaim(dead), held);
  EXPECT_EQ(f.pool.bytes_tagged(dead), 0u);
  EXPECT_EQ(f.pool.used_bytes(), before - held);
  EXPECT_EQ(f.pool.reclaim(dead), 0u);
  EXPECT_EQ(f.pool.reclaim(ArgPool::kArgTag), 0u);  // refused: the owner's tags are never swept
  for (auto& [off, bytes] : keep) {
    EXPECT_TRUE(has_pattern(f.pool.data(off), bytes, off));
    f.pool.free(off, bytes);
  }
  EXPECT_EQ(f.pool.used_bytes(), 0u);
  EXPECT_EQ(f.pool.arg_bytes(), 0u);
  uint64_t all = f.pool.try_alloc(f.pool.capacity_bytes());
  EXPECT_NE(all, 0u);
  f.pool.free(all, f.pool.capacity_bytes());
}

// A deterministic mix of sizes until the pool is full: blocks never overlap, and content
// written into each survives the others.
TEST(ArgPool, MixedSizesNeverOverlap) {
  PoolFixture f(16 * kWord);
  SplitMix rng{42};
  std::vector<std::pair<uint64_t, uint64_t>> blocks;  // (off, bytes)
  int misses = 0;
  while (misses < 50) {
    uint64_t bytes = rng.below(4) == 0 ? 1 + rng.below(3 * kWord) : 1 + rng.below(20 * kUnit);
    uint64_t off = f.pool.try_alloc(bytes);
    if (!off) {
      ++misses;
      continue;
    }
    ASSERT_TRUE(f.in_bounds(off, bytes));
    fill_pattern(f.pool.data(off), bytes, off);
    blocks.emplace_back(off, bytes);
  }
  std::sort(blocks.begin(), blocks.end());
  for (size_t i = 1; i < blocks.size(); ++i)
    EXPECT_LE(blocks[i - 1].first + blocks[i - 1].second, blocks[i].first);
  for (auto& [off, bytes] : blocks) {
    EXPECT_TRUE(has_pattern(f.pool.data(off), bytes, off));
    f.pool.free(off, bytes);
  }
  EXPECT_EQ(f.pool.used_bytes(), 0u);
}

TEST(ArgPool, BlockingAllocSleepsUntilAnotherThreadFrees) {
  PoolFixture f(kWord);
  uint64_t all = f.pool.try_alloc(kWord);
  ASSERT_NE(all, 0u);
  std::atomic<uint64_t> got{~uint64_t{0}};
  std::thread waiter([&] {
    got.store(f.pool.alloc(3 * kUnit, monotonic_ns() + 30'000'000'000, [] { return false; }));
  });
  // Asleep on the pool's eventcount, not returned.
  int64_t deadline = monotonic_ns() + 10'000'000'000;
  while (f.pool.control().freed.waiters.load() == 0 && monotonic_ns() < deadline)
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  ASSERT_EQ(f.pool.control().freed.waiters.load(), 1u);
  EXPECT_EQ(got.load(), ~uint64_t{0});
  f.pool.free(all, kWord);
  waiter.join();
  EXPECT_EQ(got.load(), all);
  f.pool.free(got.load(), 3 * kUnit);
  EXPECT_EQ(f.pool.used_bytes(), 0u);
}

// An allocator about to sleep for room counts itself as starving and nudges (the owner's
// result consumer, which must then drain: blocks come back only as results are drained).
TEST(ArgPool, ASleepingAllocatorCountsAsStarvingAndNudgesFirst) {
  PoolFixture f(kWord);
  uint64_t all = f.pool.try_alloc(kWord);
  ASSERT_NE(all, 0u);
  EXPECT_EQ(f.pool.starving(), 0u);
  std::atomic<int> nudges{0};
  std::atomic<uint32_t> starving_at_nudge{0};
  std::atomic<uint64_t> got{~uint64_t{0}};
  std::thread waiter([&] {
    got.store(f.pool.alloc(3 * kUnit, monotonic_ns() + 30'000'000'000, [] { return false; }, UINT64_MAX,
                           ArgPool::kArgTag, [&] {
                             starving_at_nudge.store(f.pool.starving());
                             nudges.fetch_add(1);
                           }));
  });
  // The waiter registers on the eventcount (prepare_wait) before it counts itself starving
  // and nudges: wait for the nudge, not only for the registration.
  int64_t deadline = monotonic_ns() + 10'000'000'000;
  while (nudges.load() == 0 && monotonic_ns() < deadline)
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  ASSERT_EQ(f.pool.control().freed.waiters.load(), 1u);
  EXPECT_GE(nudges.load(), 1);
  EXPECT_EQ(starving_at_nudge.load(), 1u);  // counted before the nudge: the consumer sees it
  EXPECT_EQ(f.pool.starving(), 1u);
  f.pool.free(all, kWord);
  waiter.join();
  EXPECT_EQ(got.load(), all);
  EXPECT_EQ(f.pool.starving(), 0u);
  // Room at once: no sleep, no nudge.
  int before = nudges.load();
  uint64_t more = f.pool.alloc(kUnit, -1, [] { return false; }, UINT64_MAX, ArgPool::kArgTag,
                               [&] { nudges.fetch_add(1); });
  EXPECT_NE(more, 0u);
  EXPECT_EQ(nudges.load(), before);
  f.pool.free(more, kUnit);
  f.pool.free(got.load(), 3 * kUnit);
}

TEST(ArgPool, BlockingAllocGivesUpAtTheDeadlineOrWhenCancelled) {
  PoolFixture f(kWord);
  uint64_t all = f.pool.try_alloc(kWord);
  int64_t t0 = monotonic_ns();
  EXPECT_EQ(f.pool.alloc(1, t0 + 30'000'000, [] { return false; }), 0u);
  EXPECT_GE(monotonic_ns() - t0, 30'000'000);
  EXPECT_EQ(f.pool.alloc(1, -1, [] { return true; }), 0u);

  std::atomic<bool> cancel{false};
  std::atomic<uint64_t> got{1};
  std::thread waiter([&] {
    got.store(f.pool.alloc(1, monotonic_ns() + 30'000'000'000, [&] { return cancel.load(); }));
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  cancel.store(true);
  f.pool.control().freed.notify_all();
  waiter.join();
  EXPECT_EQ(got.load(), 0u);
  f.pool.free(all, kWord);
  EXPECT_EQ(f.pool.used_bytes(), 0u);
}

// Threads allocate blocks of 1 byte .. 3 words, own every unit of them in a side table (a
// second owner of a unit is an overlap), write and later verify their content, and free them.
// The pool is small, so allocations often wait for another thread's free.
TEST(ArgPool, ConcurrentThreadsNeverOverlapAndLeakNothing) {
  PoolFixture f(8 * kWord);
  const uint64_t units = f.pool.capacity_bytes() / kUnit;
  std::vector<std::atomic<uint32_t>> owner(units);
  for (auto& o : owner) o.store(0);
  std::atomic<uint64_t> overlaps{0}, corrupt{0}, waits{0};
  const uint64_t per_thread = scaled(20'000, 500);
  const int kThreads = 4;

  auto first_unit = [&](uint64_t off) { return (off - f.pool.control().data_off) / kUnit; };
  auto unit_span = [](uint64_t bytes) {
    return ArgPool::span_units(bytes);
  };

  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      SplitMix rng{static_cast<uint64_t>(t) + 11};
      std::deque<std::pair<uint64_t, uint64_t>> held;
      auto release = [&](std::pair<uint64_t, uint64_t> b) {
        auto [off, bytes] = b;
        if (!has_pattern(f.pool.data(off), bytes, off ^ static_cast<uint64_t>(t)))
          corrupt.fetch_add(1);
        uint64_t u0 = first_unit(off);
        for (uint64_t u = u0; u < u0 + unit_span(bytes); ++u) owner[u].store(0);
        f.pool.free(off, bytes);
      };
      for (uint64_t i = 0; i < per_thread; ++i) {
        uint64_t r = rng.below(16);
        uint64_t bytes = r == 0  ? 1 + rng.below(3 * kWord)
                         : r < 4 ? 1 + rng.below(kWord)
                                 : 1 + rng.below(8 * kUnit);
        if (held.size() >= 3) {
          release(held.front());
          held.pop_front();
        }
        uint64_t off = f.pool.try_alloc(bytes);
        while (!off) {
          // Wait a little for another thread's free; give back what we hold if that is not
          // enough, so that threads holding blocks cannot wait on each other forever.
          waits.fetch_add(1);
          off = f.pool.alloc(bytes, monotonic_ns() + 2'000'000, [] { return false; });
          if (!off && !held.empty()) {
            release(held.front());
            held.pop_front();
          }
        }
        uint64_t u0 = first_unit(off);
        for (uint64_t u = u0; u < u0 + unit_span(bytes); ++u) {
          uint32_t expected = 0;
          if (!owner[u].compare_exchange_strong(expected, static_cast<uint32_t>(t) + 1))
            overlaps.fetch_add(1);
        }
        fill_pattern(f.pool.data(off), bytes, off ^ static_cast<uint64_t>(t));
        held.emplace_back(off, bytes);
      }
      while (!held.empty()) {
        release(held.front());
        held.pop_front();
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(overlaps.load(), 0u);
  EXPECT_EQ(corrupt.load(), 0u);
  EXPECT_EQ(f.pool.used_bytes(), 0u);
  // Every unit is free again: the whole pool is one block.
  uint64_t all = f.pool.try_alloc(f.pool.capacity_bytes());
  EXPECT_NE(all, 0u) << "a unit was left tagged";
  f.pool.free(all, f.pool.capacity_bytes());
  RecordProperty("waits_for_room", std::to_string(waits.load()));
}

// Placement is first fit by address: room that was freed is taken again before room never
// used, for blocks within one word and for blocks of whole words.
TEST(ArgPool, FreedRoomIsReusedBeforeFreshRoom) {
  PoolFixture f(8 * kWord);
  const uint64_t base = f.pool.control().data_off;
  std::vector<uint64_t> offs;
  for (int i = 0; i < 64; ++i) offs.push_back(f.pool.try_alloc(kUnit));  // word 0, full
  EXPECT_EQ(offs.back(), base + 63 * kUnit);
  uint64_t next = f.pool.try_alloc(kUnit);
  EXPECT_EQ(next, base + kWord);  // word 0 is full: word 1
  for (uint64_t off : offs) f.pool.free(off, kUnit);
  f.pool.free(next, kUnit);
  EXPECT_EQ(f.pool.try_alloc(3 * kUnit), base);  // not after the blocks just freed
  f.pool.free(base, 3 * kUnit);

  uint64_t big = f.pool.try_alloc(2 * kWord);
  EXPECT_EQ(big, base);
  uint64_t small = f.pool.try_alloc(kUnit);
  EXPECT_EQ(small, base + 2 * kWord);
  f.pool.free(big, 2 * kWord);
  EXPECT_EQ(f.pool.try_alloc(kWord + 1), base);  // the freed words, not the ones past `small`
  const uint64_t after = base + ArgPool::span_units(kWord + 1) * kUnit;
  EXPECT_EQ(f.pool.try_alloc(kUnit), after);  // the rest of the freed room, still below `small`
  f.pool.free(base, kWord + 1);
  f.pool.free(small, kUnit);
  f.pool.free(after, kUnit);
  EXPECT_EQ(f.pool.used_bytes(), 0u);
}

// How far into the pool a stream of blocks reaches: the end of the highest unit it used.
struct Reach {
  std::atomic<uint64_t> end{0};
  void note(uint64_t off, uint64_t bytes) {
    uint64_t e = off + bytes, cur = end.load();
    while (e > cur && !end.compare_exchange_weak(cur, e)) {
    }
  }
};

// A long stream that holds a few blocks at a time (as map() does with its chunks) stays in
// the low end of a large pool, so the pages it touches stay few however long it runs. Next
// fit, which moved on after every block, walked the whole pool.
TEST(ArgPool, ALongStreamStaysInTheLowEndOfThePool) {
  PoolFixture f(256 * kWord);  // 4 MiB
  const uint64_t base = f.pool.control().data_off;
  SplitMix rng{5};
  std::deque<std::pair<uint64_t, uint64_t>> held;
  Reach reach;
  for (uint64_t i = 0; i < scaled(200'000, 5'000); ++i) {
    uint64_t bytes = rng.below(8) == 0 ? kWord + 1 + rng.below(kWord) : 1 + rng.below(8 * kUnit);
    uint64_t off = f.pool.try_alloc(bytes);
    ASSERT_NE(off, 0u);
    reach.note(off, bytes);
    held.emplace_back(off, bytes);
    if (held.size() > 8) {
      f.pool.free(held.front().first, held.front().second);
      held.pop_front();
    }
  }
  for (auto& [off, bytes] : held) f.pool.free(off, bytes);
  EXPECT_EQ(f.pool.used_bytes(), 0u);
  // At most 9 blocks are held at once, each within 2 words: 18 words, and some room for
  // fragmentation.
  EXPECT_LE(reach.end.load() - base, 32 * kWord);
  RecordProperty("reach_words", std::to_string((reach.end.load() - base + kWord - 1) / kWord));
}

// The same with threads allocating and freeing at once: a word freed while another thread
// moves the hint past it must not be skipped for good, or blocks would creep upwards.
TEST(ArgPool, ConcurrentStreamsStayInTheLowEndOfThePool) {
  PoolFixture f(256 * kWord);
  const uint64_t base = f.pool.control().data_off;
  Reach reach;
  std::atomic<uint64_t> misses{0};
  const int kThreads = 4;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      SplitMix rng{static_cast<uint64_t>(t) + 21};
      std::deque<std::pair<uint64_t, uint64_t>> held;
      for (uint64_t i = 0; i < scaled(100'000, 2'000); ++i) {
        uint64_t bytes =
            rng.below(16) == 0 ? kWord + 1 + rng.below(kWord) : 1 + rng.below(8 * kUnit);
        uint64_t off = f.pool.try_alloc(bytes);
        if (!off) {  // never with this much room
          misses.fetch_add(1);
          continue;
        }
        reach.note(off, bytes);
        held.emplace_back(off, bytes);
        if (held.size() > 4) {
          f.pool.free(held.front().first, held.front().second);
          held.pop_front();
        }
      }
      for (auto& [off, bytes] : held) f.pool.free(off, bytes);
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(misses.load(), 0u);
  EXPECT_EQ(f.pool.used_bytes(), 0u);
  // 4 threads x 5 blocks x at most 2 words held at once: 40 words, and room for
  // fragmentation and for words that are only probed, by threads preempted in the middle
  // of a probe too (4 threads on 2 cores reached 89 words once). Blocks that crept upwards
  // for good would reach the end of the pool (256 words).
  EXPECT_LE(reach.end.load() - base, 128 * kWord);
  RecordProperty("reach_words", std::to_string((reach.end.load() - base + kWord - 1) / kWord));
}

// The pool lives in shared memory: a block allocated by one process is seen, and freed, by
// another.
TEST(ArgPool, BlocksCrossProcesses) {
  PoolFixture f(2 * kWord);
  uint64_t off = f.pool.try_alloc(1000);
  fill_pattern(f.pool.data(off), 1000, 7);
  pid_t child = test::fork_child([&] {
    if (!has_pattern(f.pool.data(off), 1000, 7)) return 2;
    f.pool.free(off, 1000);
    uint64_t big = f.pool.try_alloc(2 * kWord);
    if (!big) return 3;
    f.pool.free(big, 2 * kWord);
    return 0;
  });
  EXPECT_EQ(test::wait_child(child, 30'000), 0);
  EXPECT_EQ(f.pool.used_bytes(), 0u);
}

}  // namespace
}  // namespace mpop
