// ArgPool: a shared-memory arena for argument and result streams too large for a slot.
//
// Units of 256 bytes, each with a 16-bit owner tag; four tags share one atomic word.
// Allocation is one CAS on one word (blocks of up to four units) or one CAS per word for a
// run of whole words, so there is no lock a dead process can hold. The tag says who holds a
// unit: the owner process's producer (kArgTag), a result handed to the owner (kResultTag), or
// a worker (worker_tag(id)) between taking a block and handing it on. A worker killed at any
// instruction therefore leaves only units tagged with its own id, which the supervisor gives
// back with reclaim(): nothing leaks, and nobody waits on a dead allocator.
//
// Placement is address-ordered first fit: a block goes to the lowest room that fits, so a
// long run reuses the units it just freed and every process touches only as many pages of
// the pool as it ever holds at once (next fit walked the whole arena, and a few million
// tasks later each process had all of it resident).
#pragma once

#include <atomic>
#include <bit>
#include <cstdint>

#include "mpop/futex.hpp"
#include "mpop/task_ring.hpp"

namespace mpop {

struct alignas(kCacheLine) PoolControl {
  uint64_t units = 0;      // number of allocation units
  uint64_t words = 0;      // tag words (units / 4)
  uint64_t data_off = 0;   // from the start of the pool region
  std::atomic<uint64_t> hint{0};       // no word below it has a free unit (a lower bound)
  std::atomic<uint64_t> arg_units{0};  // units held by kArgTag blocks (the producer's cap)
  // Allocators asleep for room. Blocks are freed when the owner drains their results, so
  // an owner waiting for a run of results must drain what it has while this is nonzero
  // (else it and they wait on each other until a timeout).
  std::atomic<uint32_t> starving{0};
  alignas(kCacheLine) EventCount freed;  // producers waiting for room sleep here
};

class ArgPool {
 public:
  struct NoNudge {
    void operator()() const {}
  };

  static constexpr uint64_t kUnit = 256;
  static constexpr uint64_t kLanes = 4;  // unit tags per word
  // Capacity is a whole number of these (64 units), so geometry stays cache-line aligned.
  static constexpr uint64_t kGranule = 64;

  static constexpr uint16_t kFreeTag = 0;
  static constexpr uint16_t kArgTag = 0xFFFF;     // the owner's producer: queued arguments
  static constexpr uint16_t kResultTag = 0xFFFE;  // a result, or pinned arguments, handed on
  static constexpr uint32_t kMaxWorkers = 0xFFFD;
  static constexpr uint16_t worker_tag(uint32_t id) { return static_cast<uint16_t>(id + 1); }

  static uint64_t bytes_needed(uint64_t data_bytes) {
    uint64_t units = round_up(data_bytes, kUnit * kGranule) / kUnit;
    return round_up(sizeof(PoolControl), kCacheLine) + round_up(units * 2, kCacheLine) +
           units * kUnit;
  }

  ArgPool() = default;
  static ArgPool create(void* mem, uint64_t data_bytes) {
    auto* ctl = new (mem) PoolControl();
    ctl->units = round_up(data_bytes, kUnit * kGranule) / kUnit;
    ctl->words = ctl->units / kLanes;
    ctl->data_off = round_up(sizeof(PoolControl), kCacheLine) + round_up(ctl->units * 2, kCacheLine);
    ArgPool pool(mem);
    for (uint64_t w = 0; w < ctl->words; ++w) new (&pool.tags_[w]) std::atomic<uint64_t>(0);
    return pool;
  }
  static ArgPool attach(void* mem) { return ArgPool(mem); }

  bool valid() const { return ctl_ != nullptr && ctl_->units > 0; }
  uint64_t capacity_bytes() const { return ctl_ ? ctl_->units * kUnit : 0; }
  PoolControl& control() const { return *ctl_; }

  // Bytes held by any owner. A scan of the tags (tens of microseconds for the default
  // 64 MiB): for statistics and tests, not for hot paths.
  uint64_t used_bytes() const { return count_units([](uint16_t t) { return t != kFreeTag; }) * kUnit; }
  // Bytes held under one tag, e.g. a worker's (also a scan).
  uint64_t bytes_tagged(uint16_t tag) const {
    return count_units([tag](uint16_t t) { return t == tag; }) * kUnit;
  }
  // Bytes of queued arguments (kArgTag); exact and cheap.
  uint64_t arg_bytes() const { return ctl_->arg_units.load(std::memory_order_relaxed) * kUnit; }

  // Arguments of queued tasks may fill only this much of the pool, so that results always
  // find room and the tasks holding those arguments can finish.
  uint64_t producer_cap_bytes() const { return capacity_bytes() / 4 * 3; }

  // Units a block of `bytes` occupies: whole words once it needs more than one.
  static uint64_t span_units(uint64_t bytes) {
    uint64_t n = (bytes + kUnit - 1) / kUnit;
    return n <= kLanes ? n : round_up(n, kLanes);
  }

  // Returns the offset of a block of at least `bytes` tagged `tag` (0 = no room now).
  // `cap_bytes` bounds the kArgTag total after this block. Offsets are from the pool
  // region's start and never 0.
  uint64_t try_alloc(uint64_t bytes, uint64_t cap_bytes = UINT64_MAX, uint16_t tag = kArgTag) {
    if (!valid() || bytes == 0 || tag == kFreeTag) return 0;
    uint64_t n = (bytes + kUnit - 1) / kUnit;
    if (n > ctl_->units) return 0;
    if (cap_bytes != UINT64_MAX &&
        (ctl_->arg_units.load(std::memory_order_relaxed) + span_units(bytes)) * kUnit > cap_bytes)
      return 0;
    uint64_t start = first_free_word();
    uint64_t off = n <= kLanes ? alloc_in_word(n, start, tag) : alloc_words(n / kLanes + (n % kLanes != 0), start, tag);
    if (off && tag == kArgTag) ctl_->arg_units.fetch_add(span_units(bytes), std::memory_order_relaxed);
    return off;
  }

  // Allocates, sleeping while the pool is full, until the deadline (monotonic ns, < 0 =
  // none) or `cancelled()`. Returns 0 on timeout.
  // Before each sleep it counts itself in `starving` and calls nudge() (which should wake
  // the owner's result consumer: see PoolControl::starving).
  template <class Cancelled, class Nudge = NoNudge>
  uint64_t alloc(uint64_t bytes, int64_t deadline_ns, Cancelled&& cancelled,
                 uint64_t cap_bytes = UINT64_MAX, uint16_t tag = kArgTag, Nudge&& nudge = Nudge{}) {
    for (;;) {
      uint64_t off = try_alloc(bytes, cap_bytes, tag);
      if (off || cancelled()) return off;
      uint32_t key = ctl_->freed.prepare_wait();
      off = try_alloc(bytes, cap_bytes, tag);
      if (off || cancelled()) {
        ctl_->freed.cancel_wait();
        return off;
      }
      int64_t timeout = -1;
      if (deadline_ns >= 0) {
        timeout = deadline_ns - monotonic_ns();
        if (timeout <= 0) {
          ctl_->freed.cancel_wait();
          return 0;
        }
      }
      // Bounded sleeps: a free of a block smaller than ours notifies too, and fragmentation
      // can make a wake-up useless, so re-check now and then rather than trusting wake-ups.
      if (timeout < 0 || timeout > 50'000'000) timeout = 50'000'000;
      ctl_->starving.fetch_add(1, std::memory_order_seq_cst);
      nudge();
      ctl_->freed.commit_wait(key, timeout);
      ctl_->starving.fetch_sub(1, std::memory_order_relaxed);
    }
  }

  uint32_t starving() const { return ctl_->starving.load(std::memory_order_seq_cst); }

  void free(uint64_t off, uint64_t bytes) {
    if (!off || !bytes) return;
    uint16_t old = set_tag(off, bytes, kFreeTag);  // seq_cst, then the hint: see first_free_word()
    if (old == kArgTag) ctl_->arg_units.fetch_sub(span_units(bytes), std::memory_order_relaxed);
    lower_hint((off - ctl_->data_off) / kUnit / kLanes);
    ctl_->freed.notify_all();
  }

  // Hands a block on to another owner (the caller holds it: nobody else writes its tags).
  void retag(uint64_t off, uint64_t bytes, uint16_t tag) {
    if (!off || !bytes || tag == kFreeTag) return;
    uint16_t old = set_tag(off, bytes, tag);
    if (old == kArgTag && tag != kArgTag)
      ctl_->arg_units.fetch_sub(span_units(bytes), std::memory_order_relaxed);
    else if (old != kArgTag && tag == kArgTag)
      ctl_->arg_units.fetch_add(span_units(bytes), std::memory_order_relaxed);
  }

  uint16_t tag_of(uint64_t off) const {
    uint64_t unit = (off - ctl_->data_off) / kUnit;
    return lane(tags_[unit / kLanes].load(std::memory_order_acquire), unit % kLanes);
  }

  // Frees every unit tagged `tag`: what a dead worker held. Nobody else may hold that tag
  // while this runs (the worker is dead and not yet replaced). Returns the bytes freed.
  uint64_t reclaim(uint16_t tag) {
    if (!valid() || tag == kFreeTag || tag == kArgTag || tag == kResultTag) return 0;
    uint64_t freed = 0, lowest = UINT64_MAX;
    for (uint64_t w = 0; w < ctl_->words; ++w) {
      uint64_t v = tags_[w].load(std::memory_order_acquire);
      if (v == 0) continue;
      uint64_t mask = 0;
      for (uint64_t l = 0; l < kLanes; ++l)
        if (lane(v, l) == tag) mask |= uint64_t{0xFFFF} << (16 * l);
      if (!mask) continue;
      tags_[w].fetch_and(~mask, std::memory_order_seq_cst);
      freed += static_cast<uint64_t>(std::popcount(mask)) / 16;
      if (lowest == UINT64_MAX) lowest = w;
    }
    if (freed) {
      lower_hint(lowest);
      ctl_->freed.notify_all();
    }
    return freed * kUnit;
  }

  uint8_t* data(uint64_t off) const { return base_ + off; }

 private:
  explicit ArgPool(void* mem)
      : ctl_(static_cast<PoolControl*>(mem)),
        tags_(reinterpret_cast<std::atomic<uint64_t>*>(static_cast<uint8_t*>(mem) +
                                                        round_up(sizeof(PoolControl), kCacheLine))),
        base_(static_cast<uint8_t*>(mem)) {}

  static uint16_t lane(uint64_t v, uint64_t l) { return static_cast<uint16_t>(v >> (16 * l)); }
  static uint64_t pattern(uint16_t tag) { return uint64_t{tag} * 0x0001000100010001ULL; }
  uint64_t offset_of_unit(uint64_t unit) const { return ctl_->data_off + unit * kUnit; }

  template <class Pred>
  uint64_t count_units(Pred&& pred) const {
    if (!valid()) return 0;
    uint64_t n = 0;
    for (uint64_t w = 0; w < ctl_->words; ++w) {
      uint64_t v = tags_[w].load(std::memory_order_relaxed);
      if (v == 0) continue;
      for (uint64_t l = 0; l < kLanes; ++l) n += pred(lane(v, l)) ? 1 : 0;
    }
    return n;
  }

  // Sets the tags of a block the caller holds; returns the tag its first unit had.
  uint16_t set_tag(uint64_t off, uint64_t bytes, uint16_t tag) {
    uint64_t n = (bytes + kUnit - 1) / kUnit;
    uint64_t unit = (off - ctl_->data_off) / kUnit;
    if (n <= kLanes) {
      uint64_t shift = 16 * (unit % kLanes);
      uint64_t mask = (n == kLanes ? ~uint64_t{0} : ((uint64_t{1} << (16 * n)) - 1)) << shift;
      std::atomic<uint64_t>& word = tags_[unit / kLanes];
      uint64_t v = word.load(std::memory_order_relaxed);
      while (!word.compare_exchange_weak(v, (v & ~mask) | (pattern(tag) & mask),
                                         std::memory_order_seq_cst, std::memory_order_relaxed)) {
      }
      return lane(v, unit % kLanes);
    }
    uint64_t first = unit / kLanes, k = (n + kLanes - 1) / kLanes;
    uint16_t old = lane(tags_[first].load(std::memory_order_relaxed), 0);
    for (uint64_t w = 0; w < k; ++w) tags_[first + w].store(pattern(tag), std::memory_order_seq_cst);
    return old;
  }

  static bool full(uint64_t v) {
    for (uint64_t l = 0; l < kLanes; ++l)
      if (lane(v, l) == kFreeTag) return false;
    return true;
  }

  // The lowest word that may have a free unit, where a search starts; moves the hint past
  // words found full. The hint is only a place to start (a search still wraps around the
  // whole pool), but a hint left above free units would send blocks ever higher, so a word
  // freed while the hint passes it must not be skipped. Both sides are seq_cst: a free
  // clears its tags, then lowers the hint; we raise the hint, then look at the word again.
  // Either we see the tags cleared, or the free sees the raised hint and brings it down.
  uint64_t first_free_word() {
    uint64_t h = ctl_->hint.load(std::memory_order_seq_cst);
    while (h < ctl_->words && full(tags_[h].load(std::memory_order_relaxed))) {
      if (!ctl_->hint.compare_exchange_weak(h, h + 1, std::memory_order_seq_cst))
        continue;  // h now holds the current hint
      if (!full(tags_[h].load(std::memory_order_seq_cst))) {
        lower_hint(h);
        return h;
      }
      ++h;
    }
    return h < ctl_->words ? h : 0;
  }

  void lower_hint(uint64_t word) {
    uint64_t h = ctl_->hint.load(std::memory_order_seq_cst);
    while (word < h && !ctl_->hint.compare_exchange_weak(h, word, std::memory_order_seq_cst)) {
    }
  }

  uint64_t alloc_in_word(uint64_t n, uint64_t start, uint16_t tag) {
    const uint64_t mask_n = n == kLanes ? ~uint64_t{0} : ((uint64_t{1} << (16 * n)) - 1);
    for (uint64_t i = 0; i < ctl_->words; ++i) {
      uint64_t w = (start + i) % ctl_->words;
      uint64_t v = tags_[w].load(std::memory_order_relaxed);
      for (;;) {
        // Bit l of `runs` marks a run of n free lanes starting at lane l.
        uint64_t free_lanes = 0;
        for (uint64_t l = 0; l < kLanes; ++l) free_lanes |= uint64_t{lane(v, l) == kFreeTag} << l;
        uint64_t runs = free_lanes & ((uint64_t{1} << (kLanes - n + 1)) - 1);
        for (uint64_t s = 1; s < n && runs; ++s) runs &= free_lanes >> s;
        if (!runs) break;
        int b = std::countr_zero(runs);
        uint64_t mask = mask_n << (16 * b);
        uint64_t want = v | (pattern(tag) & mask);
        if (tags_[w].compare_exchange_weak(v, want, std::memory_order_acquire,
                                           std::memory_order_relaxed))
          return offset_of_unit(w * kLanes + static_cast<uint64_t>(b));
      }
    }
    return 0;
  }

  // A run of k whole free words: found by loads, then taken by one CAS per word, in order.
  // A word lost to another allocator gives back the ones taken and moves past it. A
  // process dying halfway leaves words tagged with its tag only: reclaim() frees them.
  uint64_t alloc_words(uint64_t k, uint64_t start, uint16_t tag) {
    const uint64_t words = ctl_->words;
    if (k > words) return 0;
    const uint64_t full = pattern(tag);
    uint64_t first = start > words - k ? 0 : start;
    uint64_t scanned = 0;
    while (scanned <= words + k) {
      if (first > words - k) {
        scanned += words - first;
        first = 0;
        continue;
      }
      // Find k free words from `first` by loads.
      uint64_t run = 0;
      while (run < k && tags_[first + run].load(std::memory_order_relaxed) == 0) ++run;
      if (run < k) {
        scanned += run + 1;
        first += run + 1;
        continue;
      }
      uint64_t got = 0;
      for (; got < k; ++got) {
        uint64_t expected = 0;
        if (!tags_[first + got].compare_exchange_strong(expected, full, std::memory_order_acquire,
                                                        std::memory_order_relaxed))
          break;
      }
      if (got == k) return offset_of_unit(first * kLanes);
      // Words taken only to probe are free again: like a free, clear them, then the hint.
      for (uint64_t j = 0; j < got; ++j) tags_[first + j].store(0, std::memory_order_seq_cst);
      if (got) lower_hint(first);
      scanned += got + 1;
      first += got + 1;
    }
    return 0;
  }

  PoolControl* ctl_ = nullptr;
  std::atomic<uint64_t>* tags_ = nullptr;
  uint8_t* base_ = nullptr;
};

}  // namespace mpop
