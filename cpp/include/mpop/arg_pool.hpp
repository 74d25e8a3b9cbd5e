// ArgPool: a shared-memory arena for argument and result streams too large for a slot.
// Units of 256 bytes tracked by a bitmap of atomic words; allocation is a CAS on one word
// (or a run of whole words for large blocks), so there is no lock a dead process can hold.
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
  uint64_t words = 0;      // bitmap words (units / 64)
  uint64_t data_off = 0;   // from the start of the pool region
  std::atomic<uint64_t> hint{0};       // no word below it has a free unit (a lower bound)
  std::atomic<uint64_t> used_units{0};
  alignas(kCacheLine) EventCount freed;  // producers waiting for room sleep here
};

class ArgPool {
 public:
  static constexpr uint64_t kUnit = 256;

  static uint64_t bytes_needed(uint64_t data_bytes) {
    uint64_t units = round_up(data_bytes, kUnit * 64) / kUnit;
    return round_up(sizeof(PoolControl), kCacheLine) + round_up(units / 8, kCacheLine) +
           units * kUnit;
  }

  ArgPool() = default;
  static ArgPool create(void* mem, uint64_t data_bytes) {
    auto* ctl = new (mem) PoolControl();
    ctl->units = round_up(data_bytes, kUnit * 64) / kUnit;
    ctl->words = ctl->units / 64;
    ctl->data_off = round_up(sizeof(PoolControl), kCacheLine) + round_up(ctl->units / 8, kCacheLine);
    ArgPool pool(mem);
    for (uint64_t w = 0; w < ctl->words; ++w) new (&pool.bitmap_[w]) std::atomic<uint64_t>(0);
    return pool;
  }
  static ArgPool attach(void* mem) { return ArgPool(mem); }

  bool valid() const { return ctl_ != nullptr && ctl_->units > 0; }
  uint64_t capacity_bytes() const { return ctl_ ? ctl_->units * kUnit : 0; }
  uint64_t used_bytes() const { return ctl_->used_units.load(std::memory_order_relaxed) * kUnit; }
  PoolControl& control() const { return *ctl_; }

  // Arguments of queued tasks may fill only this much of the pool, so that results always
  // find room and the tasks holding those arguments can finish.
  uint64_t producer_cap_bytes() const { return capacity_bytes() / 4 * 3; }

  // Returns the offset of a block of at least `bytes` (0 = no room now), keeping the pool's
  // use at or below `cap_bytes`. Offsets are from the pool region's start and never 0.
  uint64_t try_alloc(uint64_t bytes, uint64_t cap_bytes = UINT64_MAX) {
    if (!valid() || bytes == 0) return 0;
    uint64_t n = (bytes + kUnit - 1) / kUnit;
    if (n > ctl_->units) return 0;
    if (cap_bytes != UINT64_MAX &&
        (ctl_->used_units.load(std::memory_order_relaxed) + n) * kUnit > cap_bytes)
      return 0;
    uint64_t start = first_free_word();
    uint64_t off = n <= 64 ? alloc_in_word(n, start) : alloc_words((n + 63) / 64, start);
    if (off) ctl_->used_units.fetch_add(n <= 64 ? n : (n + 63) / 64 * 64, std::memory_order_relaxed);
    return off;
  }

  // Allocates, sleeping while the pool is full, until the deadline (monotonic ns, < 0 =
  // none) or `cancelled()`. Returns 0 on timeout.
  template <class Cancelled>
  uint64_t alloc(uint64_t bytes, int64_t deadline_ns, Cancelled&& cancelled,
                 uint64_t cap_bytes = UINT64_MAX) {
    for (;;) {
      uint64_t off = try_alloc(bytes, cap_bytes);
      if (off || cancelled()) return off;
      uint32_t key = ctl_->freed.prepare_wait();
      off = try_alloc(bytes, cap_bytes);
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
      ctl_->freed.commit_wait(key, timeout);
    }
  }

  void free(uint64_t off, uint64_t bytes) {
    if (!off || !bytes) return;
    uint64_t n = (bytes + kUnit - 1) / kUnit;
    uint64_t unit = (off - ctl_->data_off) / kUnit;
    // seq_cst, then the hint: see first_free_word().
    if (n <= 64) {
      uint64_t mask = (n == 64 ? ~uint64_t{0} : ((uint64_t{1} << n) - 1)) << (unit % 64);
      bitmap_[unit / 64].fetch_and(~mask, std::memory_order_seq_cst);
      ctl_->used_units.fetch_sub(n, std::memory_order_relaxed);
    } else {
      uint64_t words = (n + 63) / 64;
      for (uint64_t w = 0; w < words; ++w)
        bitmap_[unit / 64 + w].store(0, std::memory_order_seq_cst);
      ctl_->used_units.fetch_sub(words * 64, std::memory_order_relaxed);
    }
    lower_hint(unit / 64);
    ctl_->freed.notify_all();
  }

  uint8_t* data(uint64_t off) const { return base_ + off; }

 private:
  explicit ArgPool(void* mem)
      : ctl_(static_cast<PoolControl*>(mem)),
        bitmap_(reinterpret_cast<std::atomic<uint64_t>*>(static_cast<uint8_t*>(mem) +
                                                          round_up(sizeof(PoolControl), kCacheLine))),
        base_(static_cast<uint8_t*>(mem)) {}

  uint64_t offset_of_unit(uint64_t unit) const { return ctl_->data_off + unit * kUnit; }

  // The lowest word that may have a free unit, where a search starts; moves the hint past
  // words found full. The hint is only a place to start (a search still wraps around the
  // whole bitmap), but a hint left above free units would send blocks ever higher, so a
  // word freed while the hint passes it must not be skipped. Both sides are seq_cst: a free
  // clears its bits, then lowers the hint; we raise the hint, then look at the word again.
  // Either we see the bits cleared, or the free sees the raised hint, and the hint comes
  // back down.
  uint64_t first_free_word() {
    uint64_t h = ctl_->hint.load(std::memory_order_seq_cst);
    while (h < ctl_->words && bitmap_[h].load(std::memory_order_relaxed) == ~uint64_t{0}) {
      if (!ctl_->hint.compare_exchange_weak(h, h + 1, std::memory_order_seq_cst))
        continue;  // h now holds the current hint
      if (bitmap_[h].load(std::memory_order_seq_cst) != ~uint64_t{0}) {
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

  uint64_t alloc_in_word(uint64_t n, uint64_t start) {
    uint64_t mask_n = n == 64 ? ~uint64_t{0} : ((uint64_t{1} << n) - 1);
    for (uint64_t i = 0; i < ctl_->words; ++i) {
      uint64_t w = (start + i) % ctl_->words;
      uint64_t v = bitmap_[w].load(std::memory_order_relaxed);
      while (static_cast<uint64_t>(std::popcount(~v)) >= n) {
        // Bits b of `runs` mark a run of n free units starting at b within this word.
        uint64_t runs = ~v;
        for (uint64_t s = 1; s < n && runs; ++s) runs &= (~v) >> s;
        if (!runs) break;
        int b = std::countr_zero(runs);
        uint64_t mask = mask_n << b;
        if (bitmap_[w].compare_exchange_weak(v, v | mask, std::memory_order_acquire,
                                             std::memory_order_relaxed))
          return offset_of_unit(w * 64 + static_cast<uint64_t>(b));
      }
    }
    return 0;
  }

  uint64_t alloc_words(uint64_t k, uint64_t start) {
    if (k > ctl_->words) return 0;
    uint64_t first = start > ctl_->words - k ? 0 : start;
    for (uint64_t tries = 0; tries <= ctl_->words; ++tries) {
      if (first > ctl_->words - k) first = 0;
      uint64_t got = 0;
      for (; got < k; ++got) {
        uint64_t expected = 0;
        if (!bitmap_[first + got].compare_exchange_strong(expected, ~uint64_t{0},
                                                          std::memory_order_acquire))
          break;
      }
      if (got == k) return offset_of_unit(first * 64);
      // Words taken only to probe are free again: like a free, clear them, then the hint.
      for (uint64_t j = 0; j < got; ++j) bitmap_[first + j].store(0, std::memory_order_seq_cst);
      if (got) lower_hint(first);
      first += got + 1;
    }
    return 0;
  }

  PoolControl* ctl_ = nullptr;
  std::atomic<uint64_t>* bitmap_ = nullptr;
  uint8_t* base_ = nullptr;
};

}  // namespace mpop
