// CancelTable: the owner's requests that a queued task never run (future.cancel()), in the
// segment header. Whether a task runs or stays cancelled is decided by one compare-and-swap
// on its cell, by the worker that is about to run it or by the owner withdrawing the
// request, so a cancellation the owner reports as done is one no worker ever runs.
//
// The owner reports it done only with evidence that the task had not started when its
// request was already visible (Segment::request_cancel): the task was still unclaimed in
// the ring, or pending in a worker's local queue. A worker marks a task running (seq_cst)
// before it looks at `requests` (seq_cst), and the owner raises `requests` before it looks
// for the task, so a worker that starts the task after the owner saw it waiting sees the
// request, and takes it instead of running the task.
#pragma once

#include <atomic>
#include <cstdint>

namespace mpop {

struct CancelTable {
  static constexpr uint32_t kCells = 1024;
  static constexpr uint64_t kAsked = 1;  // cell = seq << 2 | state
  static constexpr uint64_t kTaken = 2;

  // Cells in use: a worker reads only this while no cancellation is pending.
  alignas(64) std::atomic<uint32_t> requests{0};
  alignas(64) std::atomic<uint64_t> cells[kCells] = {};

  static_assert(std::atomic<uint64_t>::is_always_lock_free);

  // Worker, at a task's start, after marking it running: true when it must not run.
  bool take(uint64_t seq) {
    if (requests.load(std::memory_order_seq_cst) == 0) return false;
    std::atomic<uint64_t>& c = cells[seq % kCells];
    uint64_t v = c.load(std::memory_order_seq_cst);
    if (v == (seq << 2 | kTaken)) return true;  // taken by a worker that died after
    uint64_t asked = seq << 2 | kAsked;
    return v == asked && c.compare_exchange_strong(asked, seq << 2 | kTaken, std::memory_order_seq_cst);
  }

  // Owner: asks for `seq`; false when the cell is in use by another request.
  bool ask(uint64_t seq) {
    uint64_t empty = 0;
    if (!cells[seq % kCells].compare_exchange_strong(empty, seq << 2 | kAsked, std::memory_order_seq_cst))
      return false;
    requests.fetch_add(1, std::memory_order_seq_cst);
    return true;
  }

  // Owner: withdraws a request. False when a worker took it meanwhile: then the task
  // will not run after all, and the request stays until release().
  bool withdraw(uint64_t seq) {
    uint64_t asked = seq << 2 | kAsked;
    if (!cells[seq % kCells].compare_exchange_strong(asked, 0, std::memory_order_seq_cst)) return false;
    requests.fetch_sub(1, std::memory_order_seq_cst);
    return true;
  }

  // Owner, once the cancelled task's final result is in: frees its cell.
  void release(uint64_t seq) {
    std::atomic<uint64_t>& c = cells[seq % kCells];
    uint64_t v = c.load(std::memory_order_acquire);
    if ((v >> 2) != seq || v == 0) return;
    c.store(0, std::memory_order_release);
    requests.fetch_sub(1, std::memory_order_seq_cst);
  }
};

}  // namespace mpop
