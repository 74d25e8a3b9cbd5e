// Process-shared waiting: raw futex calls and an eventcount that lives in shared memory.
// Idle workers, blocked producers and the collector sleep here instead of polling.
#pragma once

#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdint>
#include <ctime>

namespace mpop {

static_assert(std::atomic<uint32_t>::is_always_lock_free);
static_assert(std::atomic<uint64_t>::is_always_lock_free);
static_assert(sizeof(std::atomic<uint32_t>) == sizeof(uint32_t));

// Sleeps while *word == expected. No FUTEX_PRIVATE_FLAG: the word is in memory shared between
// processes, and a private futex would never be woken from another process.
// timeout_ns < 0 waits without limit. Returns false on timeout.
inline bool futex_wait(std::atomic<uint32_t>* word, uint32_t expected, int64_t timeout_ns) {
  timespec ts{};
  timespec* tsp = nullptr;
  if (timeout_ns >= 0) {
    ts.tv_sec = static_cast<time_t>(timeout_ns / 1000000000);
    ts.tv_nsec = static_cast<long>(timeout_ns % 1000000000);
    tsp = &ts;
  }
  long rc = syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAIT, expected, tsp,
                    nullptr, 0);
  return !(rc == -1 && errno == ETIMEDOUT);
}

inline void futex_wake(std::atomic<uint32_t>* word, int count) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAKE, count, nullptr, nullptr, 0);
}

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield" ::: "memory");
#endif
}

inline int64_t monotonic_ns() {
  timespec ts{};
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}

// An eventcount: a waiter registers, re-checks its condition, then sleeps on the epoch word;
// a notifier changes state, then wakes only if someone registered. The seq_cst pair
// (waiters.fetch_add / fence + waiters.load) guarantees that either the notifier sees the
// waiter or the waiter sees the new state, so no wake-up is lost and an uncontended notify
// is one load. A waiter killed while asleep leaves `waiters` high, which costs notifiers a
// syscall but never a lost wake-up.
struct EventCount {
  std::atomic<uint32_t> epoch{0};
  std::atomic<uint32_t> waiters{0};

  uint32_t prepare_wait() {
    waiters.fetch_add(1, std::memory_order_seq_cst);
    return epoch.load(std::memory_order_seq_cst);
  }
  void cancel_wait() { waiters.fetch_sub(1, std::memory_order_relaxed); }
  // Returns false on timeout.
  bool commit_wait(uint32_t key, int64_t timeout_ns) {
    bool woke = futex_wait(&epoch, key, timeout_ns);
    waiters.fetch_sub(1, std::memory_order_relaxed);
    return woke;
  }
  void notify(int count) {
    std::atomic_thread_fence(std::memory_order_seq_cst);
    if (waiters.load(std::memory_order_relaxed) != 0) {
      epoch.fetch_add(1, std::memory_order_seq_cst);
      futex_wake(&epoch, count);
    }
  }
  void notify_all() { notify(INT32_MAX); }
};
static_assert(sizeof(EventCount) == 8);

// Polls `ready` with a pause between looks until it holds or `spin_ns` have passed (the
// clock is read every 32 looks). Returns whether it held.
template <class Ready>
bool spin_for(Ready&& ready, int64_t spin_ns) {
  if (spin_ns <= 0) return false;
  const int64_t until = monotonic_ns() + spin_ns;
  do {
    for (int i = 0; i < 32; ++i) {
      if (ready()) return true;
      cpu_relax();
    }
  } while (monotonic_ns() < until);
  return false;
}

// Spins on `ready` (`spin` pauses, then until `spin_ns` have passed), then sleeps on `ec`
// until it holds or the deadline passes. deadline_ns < 0 means no deadline. Returns whether
// `ready()` held. Spinning a little costs a waiter a few microseconds of CPU; sleeping costs
// the notifier a futex syscall and the waiter a scheduler wake-up, tens of microseconds on a
// busy machine.
template <class Ready>
bool wait_until(EventCount& ec, Ready&& ready, int64_t deadline_ns, int spin = 64, int64_t spin_ns = 0) {
  for (int i = 0; i < spin; ++i) {
    if (ready()) return true;
    cpu_relax();
  }
  if (spin_for(ready, spin_ns)) return true;
  for (;;) {
    uint32_t key = ec.prepare_wait();
    if (ready()) {
      ec.cancel_wait();
      return true;
    }
    int64_t timeout = -1;
    if (deadline_ns >= 0) {
      timeout = deadline_ns - monotonic_ns();
      if (timeout <= 0) {
        ec.cancel_wait();
        return ready();
      }
    }
    ec.commit_wait(key, timeout);
  }
}

}  // namespace mpop
