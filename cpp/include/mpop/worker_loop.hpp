// The worker loop: claim a range of tasks from the ring into this worker's local queue (its
// record in shared memory), run each through the Runner, publish each result into the
// result ring, and sleep on the ring's futex when idle. Generic over the Runner so that the
// same loop runs Python handlers (bindings) and C++ ones (tests).
#pragma once

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#ifndef MPOP_IDLE_SPIN_NS
#define MPOP_IDLE_SPIN_NS 50000
#endif

#include "mpop/codec.hpp"
#include "mpop/fault.hpp"
#include "mpop/segment.hpp"

#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif

namespace mpop {

// Whether the owner process is still alive, immune to pid reuse: a pidfd checked against
// the start time recorded in the segment header. A persistent pool's workers (an
// orphan_timeout in the header) count an owner that died as alive for that long: a new
// supervisor process that takes the segment over meanwhile (a new owner pid and start
// time in the header) is watched from then on.
class OwnerWatch {
 public:
  explicit OwnerWatch(const SegmentHeader& h) : h_(h) {
    if (!watch_current()) dead_ = h_.config.orphan_timeout_ns == 0;
    if (fd_ < 0 && !dead_) orphan_since_ = monotonic_ns();
  }
  ~OwnerWatch() {
    if (fd_ >= 0) close(fd_);
  }
  OwnerWatch(const OwnerWatch&) = delete;
  OwnerWatch& operator=(const OwnerWatch&) = delete;

  bool alive() {
    if (dead_) return false;
    if (fd_ >= 0) {
      pollfd p{fd_, POLLIN, 0};
      if (poll(&p, 1, 0) <= 0) return true;  // a pidfd turns readable when its process exits
      close(fd_);
      fd_ = -1;
      if (h_.config.orphan_timeout_ns == 0) {
        dead_ = true;
        return false;
      }
      orphan_since_ = monotonic_ns();
    }
    if (watch_current()) return true;  // a new supervisor took over
    if (monotonic_ns() - orphan_since_ > h_.config.orphan_timeout_ns) dead_ = true;
    return !dead_;
  }

 private:
  // Opens a pidfd on the owner the header names now, if that is a live process other
  // than the one watched before.
  bool watch_current() {
    auto& h = const_cast<SegmentHeader&>(h_);
    const int32_t pid = std::atomic_ref<int32_t>(h.owner_pid).load(std::memory_order_acquire);
    const uint64_t start = std::atomic_ref<uint64_t>(h.owner_start_time).load(std::memory_order_acquire);
    if (pid == watched_pid_ && start == watched_start_) return false;
    const int fd = static_cast<int>(syscall(SYS_pidfd_open, pid, 0));
    if (fd < 0) return false;
    if (Segment::process_start_time(pid) != start) {
      close(fd);
      return false;
    }
    fd_ = fd;
    watched_pid_ = pid;
    watched_start_ = start;
    return true;
  }

  const SegmentHeader& h_;
  int fd_ = -1;
  bool dead_ = false;
  int64_t orphan_since_ = 0;
  int32_t watched_pid_ = 0;
  uint64_t watched_start_ = 0;
};

// A process's own resident memory: its RSS less the pages it shares with other processes
// (the app's segment, shared libraries, mapped files), read from /proc/self/statm.
class ResidentMemory {
 public:
  ResidentMemory() : fd_(open("/proc/self/statm", O_RDONLY | O_CLOEXEC)), page_(sysconf(_SC_PAGESIZE)) {}
  ~ResidentMemory() {
    if (fd_ >= 0) close(fd_);
  }
  ResidentMemory(const ResidentMemory&) = delete;
  ResidentMemory& operator=(const ResidentMemory&) = delete;

  // 0 when it cannot be read.
  uint64_t bytes() const {
    char buf[160];
    ssize_t n = fd_ >= 0 ? pread(fd_, buf, sizeof buf - 1, 0) : -1;
    if (n <= 0) return 0;
    buf[n] = '\0';
    unsigned long long size = 0, resident = 0, shared = 0;
    if (std::sscanf(buf, "%llu %llu %llu", &size, &resident, &shared) != 3 || shared > resident) return 0;
    return (resident - shared) * static_cast<uint64_t>(page_);
  }

 private:
  int fd_;
  long page_;
};

// What a Runner is given for one task. `slot` is the worker's private copy (meta filled in).
struct TaskRun {
  uint32_t worker_id;
  uint32_t fn_id;
  uint32_t tsk_id;
  const TaskHeader* header;
  uint8_t* slot;
  const uint8_t* stream;  // kPacked / kPooled argument stream, else null
  uint32_t stream_len;
};

inline FaultStep fault_for(RingPoint p) {
  switch (p) {
    case RingPoint::kClaimBeforeCas: return FaultStep::kClaimBeforeCas;
    case RingPoint::kClaimAfterCas: return FaultStep::kClaimAfterCas;
    case RingPoint::kClaimMidCopy: return FaultStep::kClaimMidCopy;
    case RingPoint::kClaimBeforeRelease: return FaultStep::kClaimBeforeRelease;
    case RingPoint::kPushReserved: return FaultStep::kPublishReserved;
    case RingPoint::kPushBeforeCas: return FaultStep::kPublishBeforeCas;
    case RingPoint::kPushPublished: return FaultStep::kPublishedBeforeEpoch;
  }
  return FaultStep::kNone;
}

constexpr int64_t kResultWaitNs = 10'000'000'000;
// How long a worker that ran out of tasks keeps looking before it sleeps: a task that comes
// within it starts without a wake-up, and its producer pays no futex syscall. (Idle, a
// worker wakes every 250 ms, so this costs it 0.02% of a core.)
constexpr int64_t kIdleSpinNs = MPOP_IDLE_SPIN_NS;
// With max_worker_memory, a worker reads its memory after every kMemoryCheckTasks tasks,
// or after a task once kMemoryCheckNs have passed since the last reading: one system call
// per 64 fast tasks, and one per task for tasks of 100 ms or more.
constexpr uint32_t kMemoryCheckTasks = 64;
constexpr int64_t kMemoryCheckNs = 100'000'000;

enum class WorkerExit { kShutdown, kStopRequested, kRecycled, kOwnerDied, kInterrupted };

inline const char* to_string(WorkerExit e) {
  switch (e) {
    case WorkerExit::kShutdown: return "shutdown";
    case WorkerExit::kStopRequested: return "stop requested";
    case WorkerExit::kRecycled: return "recycled";
    case WorkerExit::kOwnerDied: return "owner died";
    case WorkerExit::kInterrupted: return "interrupted";
  }
  return "?";
}

// Runner requirements:
//   ResultStatus run(const TaskRun&, std::vector<uint8_t>& value)  -- value: codec stream
//   ResultStatus fail(const std::string& why, std::vector<uint8_t>& value) -- an error value
//   void before_sleep(); void after_sleep();   -- e.g. release / re-take the GIL
//   bool interrupted();                         -- leave the loop now
// and optionally:
//   const std::vector<ExternalPiece>* value_pieces();  -- data `value` leaves in place
//   bool args_pinned();       -- the handler kept a view of its pooled arguments
//   void after_publish();     -- the result is out: let go of what it was copied from
//   void on_idle();           -- nothing to run: about to sleep (between publications)
//
// One worker's life in the loop, in named steps: claim a range into the local queue, then
// for each of its tasks start it, run it, publish its result and mark it done; sleep when
// there is nothing to claim. The steps run in the order run() gives; each one's memory
// orders and fault points are part of the protocol the supervisor's recovery relies on.
// They are public so that a test can take one step at a time (test_worker_loop.cpp).
template <class Runner>
class WorkerSession {
 public:
  WorkerSession(Segment& seg, uint32_t id, Runner& runner)
      : seg_(seg),
        cfg_(seg.config()),
        hdr_(seg.header()),
        tasks_(seg.tasks()),
        results_(seg.results()),
        pool_(seg.pool()),
        id_(id),
        tag_(ArgPool::worker_tag(id)),
        table_(seg.workers()),
        rec_(table_.record(id)),
        owner_(hdr_),
        runner_(runner),
        body_bytes_(task_body_bytes(cfg_.slot)),
        timing_(cfg_.max_performance == 0),
        has_meta_(cfg_.slot.meta_len >= sizeof(TaskMeta)) {
    value_.reserve(4096);
    if (cfg_.max_worker_memory) memory_.emplace();
  }
  WorkerSession(const WorkerSession&) = delete;
  WorkerSession& operator=(const WorkerSession&) = delete;

  WorkerExit run() {
    announce();
    uint32_t want = 0;
    if (auto why = must_leave(want)) return exit_with(*why);
    // First what the last process in this record left in its local queue (it died or was
    // recycled; the supervisor left those tasks there, one it was running made pending
    // again with one more attempt, or settled with the result to post), as a claim of its
    // own.
    if (auto why = run_local_queue(std::min(rec_.local_count.load(std::memory_order_acquire), table_.batch), true))
      return exit_with(*why);
    for (;;) {
      if (auto why = must_leave(want)) return exit_with(*why);
      const uint32_t k = claim_into_local_queue(want);
      if (k == 0) {
        if (!sleep_while_idle()) return exit_with(WorkerExit::kOwnerDied);
        continue;
      }
      if (auto why = run_local_queue(k, false)) return exit_with(*why);
    }
  }

  // Runs entries [0, k) of the local queue (`left_over`: only those left to run, and posts
  // the results the supervisor settled); a reason to leave before the end, if one comes.
  std::optional<WorkerExit> run_local_queue(uint32_t k, bool left_over) {
    auto state = [&](uint32_t j) { return static_cast<LocalState>(table_.entry(id_, j).state.load(std::memory_order_acquire)); };
    if (left_over) {
      bool any = false;
      for (uint32_t j = 0; j < k && !any; ++j) any = left_to_run(state(j)) || state(j) == LocalState::kSettled;
      if (!any) {
        rec_.local_count.store(0, std::memory_order_release);
        return std::nullopt;
      }
    }
    begin_batch();
    for (uint32_t j = 0; j < k; ++j) {
      if (left_over && state(j) == LocalState::kSettled) {
        Task t = settled_task(j);
        if (!publish(t)) return WorkerExit::kOwnerDied;
        mark_done(t);
        continue;
      }
      if (left_over && !left_to_run(state(j))) continue;
      if (is_void_task(table_.entry_body(id_, j))) {  // a dead producer's filler: no task
        table_.entry(id_, j).state.store(static_cast<uint32_t>(LocalState::kDone), std::memory_order_release);
        continue;
      }
      Task t = start_task(j);
      run_task(t);
      if (!publish(t)) return WorkerExit::kOwnerDied;
      mark_done(t);
      // Over max_worker_memory: recycled now. The tasks of this claim that have not
      // started stay in the local queue, for the replacement (or, if there is none, the
      // supervisor hands them back to the ring).
      if (over_memory_cap()) return WorkerExit::kRecycled;
    }
    end_batch();
    return std::nullopt;
  }

  // ---- the steps ----------------------------------------------------------------------

  // A task of the local queue on its way through start_task, run_task, publish, mark_done.
  struct Task {
    uint32_t index;  // its entry in the local queue
    LocalEntry* entry;
    TaskHeader th;
    uint8_t* slot;  // the worker's private copy (meta filled in)
    uint32_t fn_id;
    uint32_t tsk_id;
    int64_t start;  // 0 when not timing
    int64_t end;
    bool ran;  // false: cancelled before it started
    ResultStatus status;
    bool settled;  // its result was decided by the supervisor (it was run and counted before)
  };

  // The result of a task on its way into the result ring.
  struct Outgoing {
    ResultHeader r;
    // Pieces of the value the runner left in place (an array's data), copied straight to
    // where the value goes; null when the whole value is in value_.
    const std::vector<ExternalPiece>* pieces;
    size_t vlen;  // the encoded value's length, pieces included
  };

  // The worker announces itself: its pid, a new life's task count, and idle.
  void announce() {
    rec_.pid.store(static_cast<int32_t>(getpid()), std::memory_order_relaxed);
    rec_.tasks_this_life.store(0, std::memory_order_relaxed);
    rec_.state.store(static_cast<uint32_t>(WorkerState::kIdle), std::memory_order_release);
    idle_since_ = monotonic_ns();
    last_memory_check_ns_ = idle_since_;
  }

  // Whether the worker's own memory is past max_worker_memory, read at most as often as
  // kMemoryCheckTasks and kMemoryCheckNs allow (no system call per fast task).
  bool over_memory_cap() {
    if (!memory_) return false;
    const int64_t now = monotonic_ns();
    if (++tasks_since_memory_check_ < kMemoryCheckTasks && now - last_memory_check_ns_ < kMemoryCheckNs)
      return false;
    tasks_since_memory_check_ = 0;
    last_memory_check_ns_ = now;
    return memory_->bytes() > cfg_.max_worker_memory;
  }

  // Why the worker must leave before its next claim, if it must; else sets `want` to how
  // many tasks that claim may take (fewer near max_tasks_per_worker).
  std::optional<WorkerExit> must_leave(uint32_t& want) {
    if (hdr_.shutdown.load(std::memory_order_acquire)) return WorkerExit::kShutdown;
    if (rec_.stop_request.load(std::memory_order_acquire)) return WorkerExit::kStopRequested;
    if (runner_.interrupted()) return WorkerExit::kInterrupted;
    want = cfg_.batch_size;
    if (cfg_.max_tasks_per_worker) {
      uint64_t done = rec_.tasks_this_life.load(std::memory_order_relaxed);
      if (done >= cfg_.max_tasks_per_worker) return WorkerExit::kRecycled;
      if (cfg_.max_tasks_per_worker - done < want)
        want = static_cast<uint32_t>(cfg_.max_tasks_per_worker - done);
    }
    return std::nullopt;
  }

  WorkerExit exit_with(WorkerExit e) {
    rec_.state.store(static_cast<uint32_t>(e == WorkerExit::kOwnerDied ? WorkerState::kExited
                                                                       : WorkerState::kExiting),
                     std::memory_order_release);
    return e;
  }

  // Claim a range and copy it into the local queue. local_count is published with each
  // copied entry, before the ring cells are released, so that every task is always in
  // the ring, in the local queue, or both (recovery handles both).
  uint32_t claim_into_local_queue(uint32_t want) {
    auto claim_alone = [](const uint8_t* body) {
      uint32_t flags;
      std::memcpy(&flags, body + offsetof(TaskHeader, flags), sizeof flags);
      return (flags & kClaimAlone) != 0;
    };
    return tasks_.claim_range(
        want, &rec_.claim,
        [&](uint32_t i, const uint8_t* body) {
          LocalEntry& e = table_.entry(id_, i);
          std::memcpy(table_.entry_body(id_, i), body, body_bytes_);
          e.state.store(static_cast<uint32_t>(LocalState::kPending), std::memory_order_relaxed);
          rec_.local_next.store(0, std::memory_order_relaxed);
          rec_.local_count.store(i + 1, std::memory_order_release);
        },
        ring_hook(), claim_alone);
  }

  // Nothing claimed: sleep until a task comes or 250 ms pass. False: the owner died.
  bool sleep_while_idle() {
    if (!owner_.alive()) return false;
    maybe_fault(hdr_, FaultStep::kIdle);
    if constexpr (requires { runner_.on_idle(); }) runner_.on_idle();
    runner_.before_sleep();
    // One idle worker at a time spins before sleeping; the others sleep at once.
    tasks_.spin_then_wait(id_ + 1, kIdleSpinNs, monotonic_ns() + 250'000'000,
                          [this] { return stop_now(); });
    runner_.after_sleep();
    return true;
  }

  void begin_batch() {
    rec_.claims.fetch_add(1, std::memory_order_relaxed);
    tasks_.wake_if_more();
    int64_t now = timing_ ? monotonic_ns() : 0;
    if (timing_)
      rec_.idle_ns.fetch_add(static_cast<uint64_t>(now - idle_since_), std::memory_order_relaxed);
    rec_.state.store(static_cast<uint32_t>(WorkerState::kBusy), std::memory_order_relaxed);
  }

  void end_batch() {
    rec_.local_count.store(0, std::memory_order_release);
    rec_.state.store(static_cast<uint32_t>(WorkerState::kIdle), std::memory_order_relaxed);
    idle_since_ = timing_ ? monotonic_ns() : 0;
  }

  // Entry `j` of the local queue as a Task: its header, slot and ids.
  Task task_at(uint32_t j) {
    Task t{};
    t.index = j;
    t.entry = &table_.entry(id_, j);
    uint8_t* body = table_.entry_body(id_, j);
    std::memcpy(&t.th, body, sizeof t.th);
    t.slot = body + sizeof t.th;
    t.fn_id = read_uint(t.slot + cfg_.slot.fn_id_off, cfg_.slot.fn_id_size);
    t.tsk_id = read_uint(t.slot + cfg_.slot.tsk_id_off, cfg_.slot.tsk_id_size);
    return t;
  }

  // Entry `j` of the local queue becomes the running task: the supervisor's view of it
  // (running_*, the entry's state) and its meta.
  Task start_task(uint32_t j) {
    Task t = task_at(j);
    const SlotLayout& L = cfg_.slot;
    if (cfg_.debug_delay_ns > 0) debug_delay();
    // The start time is kept even with max_performance: task_timeout depends on it.
    const int64_t began = monotonic_ns();
    t.start = timing_ ? began : 0;
    rec_.running_seq.store(t.th.seq, std::memory_order_relaxed);
    rec_.running_fn.store(t.fn_id, std::memory_order_relaxed);
    rec_.running_tsk.store(t.tsk_id, std::memory_order_relaxed);
    rec_.running_since_ns.store(began, std::memory_order_relaxed);
    // seq_cst, before the look at the owner's cancellations (CancelTable::take).
    t.entry->state.store(static_cast<uint32_t>(LocalState::kRunning), std::memory_order_seq_cst);
    if (has_meta_) {
      TaskMeta m{t.th.enqueue_ns, t.start, 0, static_cast<uint16_t>(t.th.attempts + 1),
                 static_cast<uint16_t>(id_), 0};
      std::memcpy(t.slot + L.meta_off, &m, sizeof m);
    }
    return t;
  }

  // Entry `j`, settled by the supervisor after its last worker died: only its result (the
  // status the supervisor decided, no value) is posted.
  Task settled_task(uint32_t j) {
    Task t = task_at(j);
    t.status = static_cast<ResultStatus>(t.entry->settled);
    t.settled = true;
    value_.clear();
    return t;
  }

  // Runs the task through the Runner, unless the owner cancelled it (then its status stays
  // kCancelled and the runner never sees it).
  void run_task(Task& t) {
    const SlotLayout& L = cfg_.slot;
    const uint8_t* stream = nullptr;
    if (t.th.encoding == ArgEncoding::kPacked) stream = t.slot + L.arg_area_off();
    if (t.th.encoding == ArgEncoding::kPooled) stream = pool_.data(t.th.pool_ref);
    TaskRun run{id_, t.fn_id, t.tsk_id, &t.th, t.slot, stream, t.th.stream_len};
    value_.clear();
    maybe_fault(hdr_, FaultStep::kBeforeRun);
    t.status = ResultStatus::kCancelled;
    t.ran = !seg_.cancelled_by_horizon(t.th.seq) &&
            !hdr_.cancels.take(t.th.seq);
    if (t.ran) t.status = runner_.run(run, value_);
    maybe_fault(hdr_, FaultStep::kAfterRun);
    t.end = timing_ ? monotonic_ns() : 0;
  }

  // Publishes the task's result into the result ring: recorded first (so that the
  // supervisor can tell whether it got out), a large value placed in the pool, then the
  // push, waiting for room. False: the owner died.
  bool publish(Task& t) {
    Outgoing out = result_of(t);
    rec_.result_ref.store(0, std::memory_order_relaxed);
    rec_.result_epoch.store(rec_.publish.epoch.load(std::memory_order_relaxed),
                            std::memory_order_relaxed);
    rec_.result_seq.store(t.th.seq, std::memory_order_release);
    if (out.vlen > kResultInlineBytes && !place_large_value(t, out)) return false;
    if (out.r.value_encoding != ValueEncoding::kPooled) {
      out.r.value_encoding = ValueEncoding::kInline;
      out.r.inline_len = static_cast<uint16_t>(out.vlen);
    }
    return push_result(out);
  }

  // The result's header and value as the runner left them; settles who owns arguments
  // the handler kept a view of.
  Outgoing result_of(const Task& t) {
    Outgoing out{};
    if constexpr (requires { runner_.value_pieces(); }) {
      if (t.ran) out.pieces = runner_.value_pieces();
    }
    out.vlen = value_.size();
    if (out.pieces)
      for (const ExternalPiece& x : *out.pieces) out.vlen += x.len;
    // Arguments the handler kept a view of (an array) stay ours until it lets go: the
    // collector must not free them, and our death must.
    bool pinned = false;
    if constexpr (requires { runner_.args_pinned(); }) {
      pinned = t.ran && t.th.encoding == ArgEncoding::kPooled && runner_.args_pinned();
    }
    if (pinned) pool_.retag(t.th.pool_ref, t.th.stream_len, tag_);

    ResultHeader& r = out.r;
    r.seq = t.th.seq;
    r.arg_ref = t.th.encoding == ArgEncoding::kPooled && !pinned ? t.th.pool_ref : 0;
    r.arg_len = t.th.encoding == ArgEncoding::kPooled && !pinned ? t.th.stream_len : 0;
    r.tsk_id = t.tsk_id;
    r.fn_id = t.fn_id;
    r.worker_id = static_cast<uint16_t>(id_);
    r.status = t.status;
    r.attempts = static_cast<uint16_t>(t.settled ? t.th.attempts : t.th.attempts + 1);
    r.enqueue_ns = t.th.enqueue_ns;
    r.route = t.th.route;
    r.start_ns = t.start;
    r.end_ns = t.end;
    return out;
  }

  // A value too large to go inline goes to the pool. A result too large for the pool
  // fails its task; one that does not find room within kResultWaitNs (every worker
  // blocked on large results while queued tasks' arguments hold the rest) fails too,
  // instead of waiting for ever. False: the owner died (or shut down) while it waited.
  bool place_large_value(Task& t, Outgoing& out) {
    const size_t vlen = out.vlen;
    uint64_t off = 0;
    std::string why;
    if (vlen > pool_.capacity_bytes()) {
      why = "the result takes " + std::to_string(vlen) +
            " bytes encoded, more than the whole argument pool (" +
            std::to_string(pool_.capacity_bytes()) + " bytes); pass a larger pool_bytes to MpopApi";
    } else {
      off = pool_.alloc(
          vlen, monotonic_ns() + kResultWaitNs,
          [&] { return !owner_.alive() || hdr_.shutdown.load() != 0; }, UINT64_MAX, tag_,
          [&] { results_.wake_consumers(); });
      if (!off && (!owner_.alive() || hdr_.shutdown.load() != 0)) return false;
      if (!off)
        why = "the result takes " + std::to_string(vlen) +
              " bytes encoded and found no room in the argument pool (" +
              std::to_string(pool_.used_bytes()) + " of " + std::to_string(pool_.capacity_bytes()) +
              " bytes in use) for 10 s; pass a larger pool_bytes to MpopApi";
    }
    if (off)
      place_in_pool(out, off);
    else
      place_error(t, out, why);
    return true;
  }

  // The value goes into the pool block `off`, recorded in result_ref before it is
  // written, so that a death from here on frees it.
  void place_in_pool(Outgoing& out, uint64_t off) {
    maybe_fault(hdr_, FaultStep::kResultAllocated);
    rec_.result_len.store(static_cast<uint32_t>(out.vlen), std::memory_order_relaxed);
    rec_.result_ref.store(off, std::memory_order_release);
    copy_value(out, pool_.data(off), out.vlen);
    // Handed on: from here the supervisor tracks it through result_ref, and a death
    // no longer leaves it tagged as ours.
    pool_.retag(off, out.vlen, ArgPool::kResultTag);
    out.r.value_encoding = ValueEncoding::kPooled;
    out.r.value_ref = off;
    out.r.value_len = static_cast<uint32_t>(out.vlen);
    maybe_fault(hdr_, FaultStep::kResultPooled);
  }

  // The task fails with `why` instead. The error itself must be placed: inline, or in the
  // pool if there is room now; failing both, a message short enough to go inline.
  void place_error(Task& t, Outgoing& out, const std::string& why) {
    value_.clear();
    out.pieces = nullptr;
    out.r.status = t.status = runner_.fail(why, value_);
    out.vlen = value_.size();
    uint64_t eoff =
        value_.size() > kResultInlineBytes ? pool_.try_alloc(value_.size(), UINT64_MAX, tag_) : 0;
    if (eoff) {
      rec_.result_len.store(static_cast<uint32_t>(value_.size()), std::memory_order_relaxed);
      rec_.result_ref.store(eoff, std::memory_order_release);
      std::memcpy(pool_.data(eoff), value_.data(), value_.size());
      pool_.retag(eoff, value_.size(), ArgPool::kResultTag);
      out.r.value_encoding = ValueEncoding::kPooled;
      out.r.value_ref = eoff;
      out.r.value_len = static_cast<uint32_t>(value_.size());
    } else if (value_.size() > kResultInlineBytes) {
      value_.clear();
      runner_.fail("result too large for the argument pool; raise pool_bytes", value_);
      if (value_.size() > kResultInlineBytes) value_.clear();
      out.vlen = value_.size();
    }
  }

  // Pushes the result into the result ring, through the publication window, waiting for
  // room while the owner lives. False: the owner died.
  bool push_result(const Outgoing& out) {
    auto fill = [&](uint32_t, void* dst) {
      auto* o = static_cast<uint8_t*>(dst);
      std::memcpy(o, &out.r, sizeof out.r);
      if (out.r.inline_len) copy_value(out, o + sizeof out.r, out.r.inline_len);
    };
    while (results_.try_push(1, fill, &rec_.publish, ring_hook()) == 0) {
      if (!owner_.alive()) return false;
      runner_.before_sleep();
      wait_until(
          results_.control().not_full, [&] { return results_.has_room(); },
          monotonic_ns() + 250'000'000);
      runner_.after_sleep();
    }
    return true;
  }

  // The result is out: the task is done in the local queue, and counted.
  void mark_done(const Task& t) {
    maybe_fault(hdr_, FaultStep::kAfterPublish);
    if constexpr (requires { runner_.after_publish(); }) runner_.after_publish();
    t.entry->state.store(static_cast<uint32_t>(LocalState::kDone), std::memory_order_release);
    rec_.local_next.store(t.index + 1, std::memory_order_release);
    if (t.settled) return;  // counted by the supervisor
    rec_.running_since_ns.store(0, std::memory_order_relaxed);
    if (t.status == ResultStatus::kOk)
      rec_.completed.fetch_add(1, std::memory_order_relaxed);
    else if (t.status != ResultStatus::kCancelled)
      rec_.failed.fetch_add(1, std::memory_order_relaxed);
    rec_.tasks_this_life.fetch_add(1, std::memory_order_relaxed);
    if (timing_)
      rec_.busy_ns.fetch_add(static_cast<uint64_t>(t.end - t.start), std::memory_order_relaxed);
  }

 private:
  // The fault points inside the rings' claim and push.
  auto ring_hook() {
    return [this](RingPoint p) { maybe_fault(hdr_, fault_for(p)); };
  }

  bool stop_now() const {
    return hdr_.shutdown.load(std::memory_order_acquire) != 0 ||
           rec_.stop_request.load(std::memory_order_acquire) != 0;
  }

  // cfg.debug_delay_ns before each task, without holding what before_sleep releases.
  void debug_delay() {
    runner_.before_sleep();
    timespec ts{static_cast<time_t>(cfg_.debug_delay_ns / 1000000000),
                static_cast<long>(cfg_.debug_delay_ns % 1000000000)};
    nanosleep(&ts, nullptr);
    runner_.after_sleep();
  }

  // Copies the first n bytes of the value to dst: value_ with the pieces left in place
  // gathered into it, or value_ alone.
  void copy_value(const Outgoing& out, uint8_t* dst, size_t n) const {
    if (out.pieces && !out.pieces->empty())
      gather(value_.data(), value_.size(), *out.pieces, dst);
    else if (n)
      std::memcpy(dst, value_.data(), n);
  }

  Segment& seg_;
  const SegmentConfig& cfg_;
  SegmentHeader& hdr_;
  TaskRing& tasks_;
  TaskRing& results_;
  ArgPool& pool_;
  const uint32_t id_;
  const uint16_t tag_;  // blocks we take are ours until handed on
  const WorkerTable& table_;
  WorkerRecord& rec_;
  OwnerWatch owner_;
  Runner& runner_;
  const uint32_t body_bytes_;
  const bool timing_;
  const bool has_meta_;
  std::vector<uint8_t> value_;  // the running task's encoded value
  int64_t idle_since_ = 0;
  std::optional<ResidentMemory> memory_;  // with max_worker_memory only
  uint32_t tasks_since_memory_check_ = 0;
  int64_t last_memory_check_ns_ = 0;
};

template <class Runner>
WorkerExit run_worker(Segment& seg, uint32_t id, Runner& runner) {
  return WorkerSession<Runner>(seg, id, runner).run();
}

}  // namespace mpop
