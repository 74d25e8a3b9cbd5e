// TaskRing: a bounded MPMC ring of fixed-stride cells in shared memory (Vyukov sequence
// words), where a consumer claims a whole range of published cells with one CAS.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <thread>

#include "mpop/futex.hpp"

// For readers that look at memory another process may be rewriting and validate what they
// read afterwards (seqlock style): ThreadSanitizer cannot see the validation.
#if defined(__SANITIZE_THREAD__)
#define MPOP_VALIDATED_READS __attribute__((no_sanitize("thread")))
#else
#define MPOP_VALIDATED_READS
#endif

namespace mpop {

constexpr uint32_t kCacheLine = 64;

constexpr uint64_t round_up(uint64_t n, uint64_t to) { return (n + to - 1) / to * to; }
constexpr bool is_power_of_two(uint64_t n) { return n >= 1 && (n & (n - 1)) == 0; }

// What a consumer advertises while it holds claimed-but-unreleased cells. It lives in the
// consumer's own record so that a supervisor can tell, after the consumer dies, which cells
// it may have held (see DESIGN.md, "A crash-exact protocol").
struct alignas(kCacheLine) ClaimState {
  std::atomic<uint32_t> in_claim{0};
  uint32_t count{0};             // cells in the claim being copied (try_push: 0 until the
                                 // CAS has reserved them, so a dead producer's window tells
                                 // whether the cells at `head` were ever its own)
  std::atomic<uint64_t> epoch{0};  // bumped after each completed claim
  uint64_t head{0};              // first position of the claim being copied
};

// The push windows of one producer process whose threads push at the same time (a
// persistent pool's client): each push raises a window of its own, taken from the set
// for the length of the push.
constexpr uint32_t kWindowsPerProducer = 4;
struct WindowSet {
  ClaimState w[kWindowsPerProducer];
  alignas(kCacheLine) std::atomic<uint32_t> taken[kWindowsPerProducer] = {};

  uint32_t take() {
    static thread_local uint32_t hint = 0;
    for (;;) {
      for (uint32_t k = 0; k < kWindowsPerProducer; ++k) {
        const uint32_t i = (hint + k) % kWindowsPerProducer;
        if (!taken[i].load(std::memory_order_relaxed) && !taken[i].exchange(1, std::memory_order_acquire)) {
          hint = i;
          return i;
        }
      }
      std::this_thread::yield();
    }
  }
  void give_back(uint32_t i) { taken[i].store(0, std::memory_order_release); }
};

// Points inside claim_range / try_push where a fault-injection hook is called (tests kill
// a worker at each of them to prove recovery exact).
enum class RingPoint { kClaimBeforeCas, kClaimAfterCas, kClaimMidCopy, kClaimBeforeRelease,
                       kPushReserved, kPushBeforeCas, kPushPublished };
struct NoHook {
  void operator()(RingPoint) const {}
};
// Whether a cell must be claimed on its own (never batched with others).
struct NeverAlone {
  bool operator()(const uint8_t*) const { return false; }
};

struct alignas(kCacheLine) RingControl {
  alignas(kCacheLine) std::atomic<uint64_t> enqueue_pos;
  alignas(kCacheLine) std::atomic<uint64_t> dequeue_pos;
  alignas(kCacheLine) EventCount not_empty;  // consumers sleep here
  // The consumer (its id + 1) spinning for cells before it sleeps, 0 = none: while one
  // spins, producers skip the wake-up (it will see their cells), and consumers that find
  // more than they claim wake the next sleeper. One spinner at a time, so that idle
  // consumers do not crowd producers off a small machine's cores.
  std::atomic<uint32_t> spinner{0};
  // A ring with one consumer (the result ring) may ask to be woken only once the cells up
  // to position wake_at - 1 are published (wait_published_n), sparing producers a futex
  // wake per push and itself a wake-up per result. 0 = wake on every push.
  std::atomic<uint64_t> wake_at{0};
  alignas(kCacheLine) EventCount not_full;   // producers sleep here
  alignas(kCacheLine) uint32_t capacity;
  uint32_t stride;
  uint64_t mask;
};

// A non-owning view over [RingControl | capacity cells of `stride` bytes]. Each cell starts
// with its 64-bit sequence word; the body (stride - 8 bytes) is opaque to the ring.
class TaskRing {
 public:
  static constexpr uint32_t kSeqBytes = 8;

  static uint64_t bytes_needed(uint32_t capacity, uint32_t stride) {
    return round_up(sizeof(RingControl), kCacheLine) + uint64_t{capacity} * stride;
  }
  static uint32_t stride_for_body(uint32_t body_bytes) {
    return static_cast<uint32_t>(round_up(kSeqBytes + body_bytes, kCacheLine));
  }

  TaskRing() = default;

  // Lays out a fresh ring in `mem` (zeroed or not). `initial_pos` lets tests start the
  // counters anywhere, e.g. just below 2^32.
  static TaskRing create(void* mem, uint32_t capacity, uint32_t stride, uint64_t initial_pos = 0) {
    if (!is_power_of_two(capacity) || capacity < 2)
      throw std::invalid_argument("TaskRing capacity must be a power of 2 and >= 2");
    if (stride % kCacheLine != 0 || stride <= kSeqBytes)
      throw std::invalid_argument("TaskRing stride must be a positive multiple of 64");
    auto* ctl = new (mem) RingControl();
    ctl->capacity = capacity;
    ctl->stride = stride;
    ctl->mask = capacity - 1;
    TaskRing ring(mem);
    for (uint64_t i = 0; i < capacity; ++i) {
      uint64_t pos = initial_pos + i;
      new (ring.cell(pos)) std::atomic<uint64_t>(pos);
    }
    ctl->enqueue_pos.store(initial_pos, std::memory_order_relaxed);
    ctl->dequeue_pos.store(initial_pos, std::memory_order_relaxed);
    std::atomic_thread_fence(std::memory_order_release);
    return ring;
  }
  static TaskRing attach(void* mem) { return TaskRing(mem); }

  uint32_t capacity() const { return ctl_->capacity; }
  uint32_t stride() const { return ctl_->stride; }
  uint32_t body_bytes() const { return ctl_->stride - kSeqBytes; }
  RingControl& control() const { return *ctl_; }

  // Tasks published and not yet claimed (a snapshot).
  uint64_t size() const {
    uint64_t d = ctl_->dequeue_pos.load(std::memory_order_acquire);
    uint64_t e = ctl_->enqueue_pos.load(std::memory_order_acquire);
    return static_cast<int64_t>(e - d) > 0 ? e - d : 0;  // wrap-safe, like the hot path
  }

  // ---- producer side -------------------------------------------------------------------

  // Reserves up to `max` consecutive free cells with one CAS, calls fill(i, body) for each,
  // publishes them and wakes sleeping consumers. Returns how many were pushed (0 = full).
  // `window` (may be null) is raised from before the CAS until the cells are published, so
  // that a producer that can die (a worker publishing a result) leaves a trace of what it
  // reserved.
  template <class Fill, class Hook = NoHook>
  uint32_t try_push(uint32_t max, Fill&& fill, ClaimState* window = nullptr, Hook&& hook = {}) {
    if (max == 0) return 0;
    if (max > ctl_->capacity) max = ctl_->capacity;
    uint64_t pos = ctl_->enqueue_pos.load(std::memory_order_relaxed);
    uint32_t k = 0;
    for (;;) {
      k = 0;
      while (k < max) {
        uint64_t s = seq(pos + k).load(std::memory_order_acquire);
        if (s != pos + k) break;
        ++k;
      }
      if (k == 0) {
        uint64_t s = seq(pos).load(std::memory_order_acquire);
        if (static_cast<int64_t>(s - pos) < 0) return 0;  // full: previous lap unreleased
        pos = ctl_->enqueue_pos.load(std::memory_order_relaxed);
        continue;
      }
      if (window) {
        window->head = pos;
        window->count = 0;
        window->in_claim.store(1, std::memory_order_seq_cst);
      }
      hook(RingPoint::kPushBeforeCas);
      // seq_cst with a window: whoever reads the new enqueue_pos sees the window raised.
      if (ctl_->enqueue_pos.compare_exchange_weak(pos, pos + k, window ? std::memory_order_seq_cst : std::memory_order_relaxed))
        break;
      if (window) window->in_claim.store(0, std::memory_order_relaxed);
    }
    if (window) window->count = k;
    hook(RingPoint::kPushReserved);
    for (uint32_t i = 0; i < k; ++i) fill(i, body(pos + i));
    for (uint32_t i = 0; i < k; ++i) seq(pos + i).store(pos + i + 1, std::memory_order_release);
    hook(RingPoint::kPushPublished);
    if (window) {
      window->epoch.fetch_add(1, std::memory_order_release);
      window->in_claim.store(0, std::memory_order_release);
    }
    wake_for_push(pos + k, k);
    return k;
  }

  // try_push through a window of `windows` (none when null).
  template <class Fill, class Hook = NoHook>
  uint32_t try_push_from(WindowSet* windows, uint32_t max, Fill&& fill, Hook&& hook = {}) {
    if (!windows) return try_push(max, fill);
    const uint32_t i = windows->take();
    const uint32_t n = try_push(max, fill, &windows->w[i], hook);
    windows->give_back(i);
    return n;
  }

  // Pushes exactly one cell (through a window of `windows`, if given), sleeping while the
  // ring is full. Returns false when the deadline (monotonic ns, < 0 = none) passed or
  // `cancelled()` became true.
  template <class Fill, class Cancelled, class Hook = NoHook>
  bool push(Fill&& fill, int64_t deadline_ns, Cancelled&& cancelled, WindowSet* windows = nullptr, Hook&& hook = {}) {
    for (;;) {
      if (try_push_from(windows, 1, fill, hook) == 1) return true;
      if (cancelled()) return false;
      bool room = wait_until(
          ctl_->not_full, [&] { return has_room() || cancelled(); }, deadline_ns);
      if (!room) return false;
    }
  }

  bool has_room() const {
    uint64_t pos = ctl_->enqueue_pos.load(std::memory_order_relaxed);
    return seq(pos).load(std::memory_order_acquire) == pos;
  }
  bool has_published() const {
    uint64_t pos = ctl_->dequeue_pos.load(std::memory_order_relaxed);
    return seq(pos).load(std::memory_order_acquire) == pos + 1;
  }
  bool published(uint64_t pos) const { return seq(pos).load(std::memory_order_acquire) == pos + 1; }
  // How many cells from the head are published without a gap, counting at most `n`.
  uint32_t published_run(uint32_t n) const {
    uint64_t head = ctl_->dequeue_pos.load(std::memory_order_acquire);
    uint32_t k = 0;
    while (k < n && published(head + k)) ++k;
    return k;
  }

  // ---- consumer side -------------------------------------------------------------------

  // Claims up to `max` consecutive published cells with one CAS on the dequeue counter,
  // hands each body to sink(i, body) (the copy into the consumer's local queue), then
  // releases them to producers. `claim` (may be null) is raised around the claim window.
  // Returns the number claimed (0 = nothing published).
  // `alone(body)` marks cells that are claimed by themselves: a range stops before one,
  // and a range that starts with one is that cell alone.
  template <class Sink, class Hook = NoHook, class Alone = NeverAlone>
  uint32_t claim_range(uint32_t max, ClaimState* claim, Sink&& sink, Hook&& hook = {},
                       Alone&& alone = {}) {
    if (max == 0) return 0;
    if (max > ctl_->capacity) max = ctl_->capacity;
    if (claim) claim->in_claim.store(1, std::memory_order_seq_cst);
    uint64_t head = ctl_->dequeue_pos.load(std::memory_order_acquire);
    uint32_t k = 0;
    for (;;) {
      k = 0;
      while (k < max) {
        uint64_t s = seq(head + k).load(std::memory_order_acquire);
        if (s != head + k + 1) break;
        const auto* b = static_cast<const uint8_t*>(body(head + k));
        if (k > 0 && alone(b)) break;
        ++k;
        if (k == 1 && alone(b)) break;
      }
      if (k == 0) {
        uint64_t s = seq(head).load(std::memory_order_acquire);
        if (static_cast<int64_t>(s - (head + 1)) < 0) {  // nothing published at head
          if (claim) claim->in_claim.store(0, std::memory_order_release);
          return 0;
        }
        head = ctl_->dequeue_pos.load(std::memory_order_acquire);
        continue;
      }
      if (claim) {
        claim->head = head;
        claim->count = k;
        std::atomic_thread_fence(std::memory_order_seq_cst);
      }
      hook(RingPoint::kClaimBeforeCas);
      // seq_cst: an observer that saw the cells unclaimed (find_unclaimed) is ordered
      // before this claim, and so before what the consumer does with them (CancelTable).
      if (ctl_->dequeue_pos.compare_exchange_weak(head, head + k, std::memory_order_seq_cst))
        break;
    }
    hook(RingPoint::kClaimAfterCas);
    for (uint32_t i = 0; i < k; ++i) {
      sink(i, static_cast<const uint8_t*>(body(head + i)));
      if (i == 0 && k > 1) hook(RingPoint::kClaimMidCopy);
    }
    hook(RingPoint::kClaimBeforeRelease);
    release(head, k);
    if (claim) {
      claim->epoch.fetch_add(1, std::memory_order_release);
      claim->in_claim.store(0, std::memory_order_release);
    }
    return k;
  }

  // For a ring with one consumer: hands the run of published cells at the head (at most
  // `max`) to sink(i, body) without taking them, and sets `head` to the first one's
  // position; consume(head, k) takes them later. A consumer that dies in between leaves
  // them in the ring for the next one.
  template <class Sink>
  uint32_t peek_range(uint32_t max, uint64_t& head, Sink&& sink) {
    head = ctl_->dequeue_pos.load(std::memory_order_acquire);
    if (max > ctl_->capacity) max = ctl_->capacity;
    uint32_t k = 0;
    while (k < max && seq(head + k).load(std::memory_order_acquire) == head + k + 1) {
      sink(k, static_cast<const uint8_t*>(body(head + k)));
      ++k;
    }
    return k;
  }
  // Takes cells [head, head+k) that peek_range showed (the one consumer only).
  void consume(uint64_t head, uint32_t k) {
    ctl_->dequeue_pos.store(head + k, std::memory_order_seq_cst);
    release(head, k);
  }
  // For a ring with one producer that died: publishes each cell it had reserved and not
  // published, `fill` writing its body (a filler its consumer skips); returns how many.
  template <class Fill>
  uint32_t publish_abandoned(Fill&& fill) {
    uint32_t n = 0;
    const uint64_t end = ctl_->enqueue_pos.load(std::memory_order_acquire);
    for (uint64_t pos = ctl_->dequeue_pos.load(std::memory_order_acquire); pos != end; ++pos) {
      if (seq(pos).load(std::memory_order_acquire) == pos) {
        publish_reserved(pos, fill);
        ++n;
      }
    }
    return n;
  }

  // Returns claimed cells [head, head+k) to producers.
  void release(uint64_t head, uint32_t k) {
    for (uint32_t i = 0; i < k; ++i)
      seq(head + i).store(head + i + ctl_->capacity, std::memory_order_release);
    ctl_->not_full.notify(static_cast<int>(k));
  }

  // Sleeps until a cell is published or the deadline passes (monotonic ns, < 0 = none) or
  // `stop()` holds. Spins `spin` rounds first.
  template <class Stop>
  bool wait_published(int64_t deadline_ns, Stop&& stop, int spin = 64, int64_t spin_ns = 0) {
    return wait_until(
        ctl_->not_empty, [&] { return has_published() || stop(); }, deadline_ns, spin, spin_ns);
  }

  // The single consumer's wait for `n` cells (at most the capacity) published from the
  // head, or stop(), or the deadline. It publishes the position it needs in wake_at, so
  // producers wake it once, for the push that completes the run, instead of for every
  // push. Cells can be published out of order (producers race); when a later cell is
  // already in, the wait is for the first gap instead, so the wake-up that fills it is
  // never skipped. Only for rings with one consumer: the head must not move meanwhile.
  template <class Stop>
  bool wait_published_n(uint32_t n, int64_t deadline_ns, Stop&& stop, int spin = 64, int64_t spin_ns = 0) {
    n = std::clamp<uint32_t>(n, 1, ctl_->capacity);
    auto ready = [&] { return published_run(n) >= n || stop(); };
    for (int i = 0; i < spin; ++i) {
      if (ready()) return true;
      cpu_relax();
    }
    if (spin_for(ready, spin_ns)) return true;
    for (;;) {
      const uint64_t head = ctl_->dequeue_pos.load(std::memory_order_acquire);
      uint32_t have = 0;
      while (have < n && published(head + have)) ++have;
      if (have >= n || stop()) return true;
      const uint64_t target = published(head + n - 1) ? head + have + 1 : head + n;
      // seq_cst store, then the re-check below: a producer either sees this target or
      // published before it, and then the re-check sees its cell.
      ctl_->wake_at.store(target, std::memory_order_seq_cst);
      uint32_t key = ctl_->not_empty.prepare_wait();
      if (stop()) {
        ctl_->not_empty.cancel_wait();
        return true;
      }
      if (published(target - 1)) {  // the push we would wait for came in: look again
        ctl_->not_empty.cancel_wait();
        continue;
      }
      int64_t timeout = -1;
      if (deadline_ns >= 0) {
        timeout = deadline_ns - monotonic_ns();
        if (timeout <= 0) {
          ctl_->not_empty.cancel_wait();
          return ready();
        }
      }
      ctl_->not_empty.commit_wait(key, timeout);
    }
  }

  // A consumer's wait for cells: if no other consumer is spinning, spin up to `spin_ns` as
  // the spinner `who` (nonzero), then sleep like wait_published. A dead spinner must be
  // cleared with clear_spinner(who), or producers would stop waking the others.
  template <class Stop>
  bool spin_then_wait(uint32_t who, int64_t spin_ns, int64_t deadline_ns, Stop&& stop) {
    uint32_t none = 0;
    if (spin_ns > 0 && ctl_->spinner.compare_exchange_strong(none, who, std::memory_order_seq_cst)) {
      const bool ready = spin_for([&] { return has_published() || stop(); }, spin_ns);
      // seq_cst, then the re-check inside wait_until: a producer that saw us spinning
      // published before this store, so we see its cell.
      ctl_->spinner.store(0, std::memory_order_seq_cst);
      if (ready) return true;
    }
    return wait_published(deadline_ns, stop, 0);
  }
  void clear_spinner(uint32_t who) {
    if (ctl_->spinner.compare_exchange_strong(who, 0, std::memory_order_seq_cst)) wake_consumers();
  }
  // After a claim: if cells are left, a consumer that slept through a push (skipped because
  // someone spun) is woken to take them.
  void wake_if_more() {
    if (has_published()) ctl_->not_empty.notify(1);
  }
  void wake_consumers() { ctl_->not_empty.notify_all(); }
  // After publishing cells up to position end - 1: wakes sleepers, unless a consumer spins
  // (it will see the cells) or the single consumer waits for a later position (wake_at).
  // In a ring without wake_at (the task ring), also when a cell before ours is still
  // unclaimed: a consumer is already on its way to it (woken for it, spinning, or busy and
  // coming back, since none sleeps while cells are in), and it takes ours too or, leaving
  // some, wakes another (wake_if_more). Without this, every push while a woken consumer
  // was still getting up made a futex call of its own: nearly half of the owner's pushes.
  void wake_for_push(uint64_t end, uint32_t k) {
    std::atomic_thread_fence(std::memory_order_seq_cst);
    if (ctl_->spinner.load(std::memory_order_relaxed) != 0) return;
    const uint64_t at = ctl_->wake_at.load(std::memory_order_relaxed);
    if (at != 0 && static_cast<int64_t>(end - at) < 0) return;
    if (at == 0 && static_cast<int64_t>(end - k - ctl_->dequeue_pos.load(std::memory_order_seq_cst)) > 0) return;
    ctl_->not_empty.notify(static_cast<int>(k));
  }
  void wake_producers() { ctl_->not_full.notify_all(); }

  // ---- an observer (neither producer nor consumer) ---------------------------------------

  // Whether a published cell that no consumer has claimed satisfies match(body). A match
  // counts only if the cell was still published and unclaimed after match() read it (the
  // body may be rewritten meanwhile: match must only read). The last look at the dequeue
  // counter is seq_cst, so that a consumer claiming the cell after it is ordered after
  // this call (see CancelTable).
  template <class Match>
  MPOP_VALIDATED_READS bool find_unclaimed(Match&& match) const {
    const uint64_t head = ctl_->dequeue_pos.load(std::memory_order_seq_cst);
    const uint64_t tail = ctl_->enqueue_pos.load(std::memory_order_acquire);
    for (uint64_t pos = head; static_cast<int64_t>(tail - pos) > 0; ++pos) {
      if (seq(pos).load(std::memory_order_acquire) != pos + 1) continue;
      bool matched = match(static_cast<const uint8_t*>(body(pos)));
      std::atomic_thread_fence(std::memory_order_acquire);
      if (matched && seq(pos).load(std::memory_order_relaxed) == pos + 1 &&
          static_cast<int64_t>(pos - ctl_->dequeue_pos.load(std::memory_order_seq_cst)) >= 0)
        return true;
    }
    return false;
  }

  // ---- recovery (caller guarantees no live consumer is inside a claim window) ------------

  // Visits every cell at a position below `below` that was claimed (behind the dequeue
  // counter) but never released: only a consumer that died inside its claim window leaves
  // one. Pass the dequeue counter read when the death was seen, so that claims made since
  // by live consumers are never touched. sink(pos, body) must copy the body; the cell is
  // then released.
  template <class Sink>
  uint32_t recover_unreleased(uint64_t below, Sink&& sink) {
    uint32_t n = 0;
    for (uint64_t i = 0; i < ctl_->capacity; ++i) {
      auto* cell = cell_at_index(i);
      uint64_t s = reinterpret_cast<std::atomic<uint64_t>*>(cell)->load(std::memory_order_acquire);
      uint64_t pos = s - 1;
      bool published_state = ((pos & ctl_->mask) == i);
      if (published_state && pos < below &&
          pos < ctl_->dequeue_pos.load(std::memory_order_acquire)) {
        sink(pos, static_cast<const uint8_t*>(body(pos)));
        seq(pos).store(pos + ctl_->capacity, std::memory_order_release);
        ++n;
      }
    }
    if (n) ctl_->not_full.notify_all();
    return n;
  }
  uint64_t dequeue_pos() const { return ctl_->dequeue_pos.load(std::memory_order_acquire); }
  uint64_t enqueue_pos() const { return ctl_->enqueue_pos.load(std::memory_order_acquire); }

  // Whether the cell for `pos` was reserved by a producer that never published it.
  bool is_reserved_unpublished(uint64_t pos) const {
    return seq(pos).load(std::memory_order_acquire) == pos &&
           pos < ctl_->enqueue_pos.load(std::memory_order_acquire);
  }
  // Publishes a reserved cell on behalf of a dead producer, with `fill` writing its body.
  template <class Fill>
  void publish_reserved(uint64_t pos, Fill&& fill) {
    fill(body(pos));
    seq(pos).store(pos + 1, std::memory_order_release);
    ctl_->not_empty.notify_all();
  }

  // Whether the cell for `pos` still holds a published-but-unreleased task.
  bool is_unreleased(uint64_t pos) const {
    return seq(pos).load(std::memory_order_acquire) == pos + 1 &&
           pos < ctl_->dequeue_pos.load(std::memory_order_acquire);
  }

 private:
  explicit TaskRing(void* mem)
      : ctl_(static_cast<RingControl*>(mem)),
        cells_(static_cast<uint8_t*>(mem) + round_up(sizeof(RingControl), kCacheLine)) {}

  uint8_t* cell_at_index(uint64_t i) const { return cells_ + i * ctl_->stride; }
  uint8_t* cell(uint64_t pos) const { return cell_at_index(pos & ctl_->mask); }
  std::atomic<uint64_t>& seq(uint64_t pos) const {
    return *reinterpret_cast<std::atomic<uint64_t>*>(cell(pos));
  }
  void* body(uint64_t pos) const { return cell(pos) + kSeqBytes; }

  RingControl* ctl_ = nullptr;
  uint8_t* cells_ = nullptr;
};

}  // namespace mpop
