// WorkerRecord: one worker's page in the shared segment: who it is, what it claimed (its
// local queue), what it is running and since when, and its counters. The supervisor reads
// it to show status and to recover exactly what a dead worker held.
#pragma once

#include <atomic>
#include <cstdint>

#include "mpop/slot_layout.hpp"
#include "mpop/task_ring.hpp"

namespace mpop {

enum class WorkerState : uint32_t {
  kEmpty = 0,     // never started
  kStarting = 1,  // spawned, importing handlers
  kIdle = 2,      // waiting for tasks
  kBusy = 3,      // running a task
  kExiting = 4,   // leaving on request (shutdown, scale down, recycling)
  kExited = 5,    // left cleanly
  kDead = 6,      // died; the supervisor recovered its tasks
};

// Whether a record in state `s` is held by a process (from its start until it leaves or is
// found dead).
constexpr bool holds_process(WorkerState s) {
  return s == WorkerState::kStarting || s == WorkerState::kIdle || s == WorkerState::kBusy || s == WorkerState::kExiting;
}

// A local-queue entry's state. The supervisor settles a dead worker's entries in place
// (see Supervisor::recover_local_queue): kSettled holds a task whose result (its status in
// LocalEntry::settled) is decided but not yet in the result ring; kReleasing one it is
// pushing back to the task ring. Whoever sends either on marks it kDone after the push, so
// a death in between sends it again (the collectors keep the first result of a task).
enum class LocalState : uint32_t { kFree = 0, kPending = 1, kRunning = 2, kDone = 3, kSettled = 4, kReleasing = 5 };

// What a worker runs, or posts, of the local queue a dead predecessor left (kReleasing:
// the supervisor that was handing it back to the ring died, it was not sent).
constexpr bool left_to_run(LocalState s) { return s == LocalState::kPending || s == LocalState::kReleasing; }

// The part of a local-queue entry before the task body.
struct alignas(8) LocalEntry {
  std::atomic<uint32_t> state;
  uint32_t settled;  // kSettled: the ResultStatus its result carries
};

struct alignas(kCacheLine) WorkerRecord {
  std::atomic<uint32_t> state{0};
  std::atomic<int32_t> pid{0};
  std::atomic<uint32_t> generation{0};  // bumped on every (re)spawn in this record
  std::atomic<uint32_t> stop_request{0};  // 1 = finish the local queue, then exit
  std::atomic<uint32_t> restarts{0};  // replacements after a crash, a kill or a timeout
  std::atomic<uint32_t> recycled{0};  // replacements by max_tasks_per_worker or max_worker_memory
  uint32_t id = 0;
  // /proc start time of pid: with it, a new supervisor of a persistent pool knows the
  // process it finds is still the worker (not a reuse of its pid).
  std::atomic<uint64_t> start_time{0};
  // Which process holds this record: generation << 32 | pid (see life_word). The
  // supervisor sets it to (generation, 0) before it starts a process; the pid is then
  // filled in once, by whichever comes first: the supervisor once the spawn returns, or
  // the process itself at start (claim_life). A new supervisor that finds (generation, 0)
  // fences it (pid kFencedPid) before it replaces the worker: a process started by a
  // supervisor that died before it learnt the pid then finds it may not run, and leaves.
  // start_time is 0 until a side that filled in the pid writes it (just after).
  std::atomic<uint64_t> life{0};

  ClaimState claim;  // the claim window on the task ring
  // A dead worker's claim window under recovery: the ring's dequeue counter at the death,
  // plus one (0 = none), so that a new supervisor recovers the same cells.
  std::atomic<uint64_t> recover_below{0};
  // The task the supervisor killed this worker for (0 = none), set before the signal: its
  // death then ends that task timed out or cancelled, even for a new supervisor.
  std::atomic<uint64_t> timed_out_seq{0};  // running past task_timeout
  std::atomic<uint64_t> killed_seq{0};     // kill_task
  // A persistent pool's client asks the supervisor process to kill_task this worker's
  // running task: its seq (0 = none); the supervisor takes it on its next round.
  std::atomic<uint64_t> kill_request{0};

  // The local queue: `local_count` entries copied from the ring by the last claim; entries
  // before `local_next` are done or running.
  alignas(kCacheLine) std::atomic<uint32_t> local_count{0};
  std::atomic<uint32_t> local_next{0};
  std::atomic<uint64_t> running_seq{0};
  std::atomic<int64_t> running_since_ns{0};  // 0 = not running a task
  std::atomic<uint32_t> running_fn{0};
  std::atomic<uint32_t> running_tsk{0};

  // The publication window on the result ring (same idea as ClaimState).
  ClaimState publish;
  // The result being published: its task, publish.epoch before the push, and its pooled
  // value block (0 = inline). After a death the supervisor can tell a published result
  // (epoch moved on) from an unpublished one, and free an unpublished block.
  alignas(kCacheLine) std::atomic<uint64_t> result_seq{0};
  std::atomic<uint64_t> result_epoch{0};
  std::atomic<uint64_t> result_ref{0};
  std::atomic<uint32_t> result_len{0};

  alignas(kCacheLine) std::atomic<uint64_t> completed{0};
  std::atomic<uint64_t> failed{0};
  std::atomic<uint64_t> busy_ns{0};
  std::atomic<uint64_t> idle_ns{0};
  std::atomic<uint64_t> tasks_this_life{0};
  std::atomic<uint64_t> claims{0};

  // Why the last process in this record could not start (set by the worker before it
  // exits), so the owner can raise it instead of respawning forever.
  alignas(kCacheLine) char start_error[4096] = {};
};

// The pid of a record given up by a new supervisor (see WorkerRecord::life).
constexpr uint32_t kFencedPid = 0xFFFFFFFFu;

constexpr uint64_t life_word(uint32_t generation, uint32_t pid) { return uint64_t{generation} << 32 | pid; }
constexpr uint32_t life_generation(uint64_t life) { return static_cast<uint32_t>(life >> 32); }
constexpr uint32_t life_pid(uint64_t life) { return static_cast<uint32_t>(life); }

// Fills in the pid of life (generation, 0), then the record's start time: the supervisor
// after a spawn, or the process itself at start. True if the record is `pid`'s (also
// when the other side filled it in first); false if it was fenced or has moved on to a
// later generation: the process must then leave without touching the record.
inline bool claim_life(WorkerRecord& rec, uint32_t generation, uint32_t pid, uint64_t start_time) {
  uint64_t expected = life_word(generation, 0);
  if (!rec.life.compare_exchange_strong(expected, life_word(generation, pid), std::memory_order_acq_rel) &&
      expected != life_word(generation, pid))
    return false;
  rec.start_time.store(start_time, std::memory_order_release);
  return true;
}

// Geometry of the records region: `count` records of `stride` bytes, each followed by its
// local queue of `batch` entries of `entry_stride` bytes.
struct WorkerTable {
  uint8_t* base = nullptr;
  uint32_t count = 0;
  uint32_t stride = 0;
  uint32_t batch = 0;
  uint32_t entry_stride = 0;

  static uint32_t entry_stride_for(const SlotLayout& l) {
    return static_cast<uint32_t>(round_up(sizeof(LocalEntry) + task_body_bytes(l), 64));
  }
  static uint32_t stride_for(const SlotLayout& l, uint32_t batch) {
    return static_cast<uint32_t>(round_up(sizeof(WorkerRecord), kCacheLine) +
                                 uint64_t{batch} * entry_stride_for(l));
  }

  WorkerRecord& record(uint32_t i) const {
    return *reinterpret_cast<WorkerRecord*>(base + uint64_t{i} * stride);
  }
  LocalEntry& entry(uint32_t worker, uint32_t j) const {
    return *reinterpret_cast<LocalEntry*>(base + uint64_t{worker} * stride +
                                          round_up(sizeof(WorkerRecord), kCacheLine) +
                                          uint64_t{j} * entry_stride);
  }
  uint8_t* entry_body(uint32_t worker, uint32_t j) const {
    return reinterpret_cast<uint8_t*>(&entry(worker, j)) + sizeof(LocalEntry);
  }
};

}  // namespace mpop
