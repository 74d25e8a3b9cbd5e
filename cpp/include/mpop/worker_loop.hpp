// The worker loop: claim a range of tasks from the ring into this worker's local queue (its
// record in shared memory), run each through the Runner, publish each result into the
// result ring, and sleep on the ring's futex when idle. Generic over the Runner so that the
// same loop runs Python handlers (bindings) and C++ ones (tests).
#pragma once

#include <poll.h>
#include <signal.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#ifndef MPOP_IDLE_SPIN_NS
#define MPOP_IDLE_SPIN_NS 50000
#endif

#include "mpop/codec.hpp"
#include "mpop/segment.hpp"

#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif

namespace mpop {

// Whether the owner process is still alive, immune to pid reuse: a pidfd opened once and
// checked against the start time recorded in the segment header.
class OwnerWatch {
 public:
  explicit OwnerWatch(const SegmentHeader& h) {
    fd_ = static_cast<int>(syscall(SYS_pidfd_open, h.owner_pid, 0));
    if (fd_ < 0 || Segment::process_start_time(h.owner_pid) != h.owner_start_time) dead_ = true;
  }
  ~OwnerWatch() {
    if (fd_ >= 0) close(fd_);
  }
  OwnerWatch(const OwnerWatch&) = delete;
  OwnerWatch& operator=(const OwnerWatch&) = delete;

  bool alive() {
    if (dead_) return false;
    pollfd p{fd_, POLLIN, 0};
    if (poll(&p, 1, 0) > 0) dead_ = true;  // a pidfd turns readable when its process exits
    return !dead_;
  }

 private:
  int fd_ = -1;
  bool dead_ = false;
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

// The steps of the worker protocol at which a test can make a worker die (SIGKILL).
enum class FaultStep : uint32_t {
  kNone = 0,
  kClaimBeforeCas = 1,      // claim window raised, dequeue CAS not yet done
  kClaimAfterCas = 2,       // cells claimed, nothing copied
  kClaimMidCopy = 3,        // part of the claim copied into the local queue
  kClaimBeforeRelease = 4,  // all copied, ring cells not yet released
  kBeforeRun = 5,           // task marked running, handler not called
  kAfterRun = 6,            // handler returned, result not published
  kPublishReserved = 7,     // result cell reserved, not written
  kAfterPublish = 8,        // result published, task not marked done
  kIdle = 9,                // about to sleep with nothing to do
  kResultPooled = 10,       // a pooled result block allocated and written, not published
  kPublishBeforeCas = 11,   // publication window raised, result cell not yet reserved
  kResultAllocated = 12,    // a pooled result block taken (tagged), not yet recorded
  kPublishedBeforeEpoch = 13,  // result cell published, publication window not yet closed
};

// Kills this process if the segment's fault switch names `step` and this is the
// countdown's last hit. One relaxed load when no fault is armed.
inline void maybe_fault(SegmentHeader& hdr, FaultStep step) {
  if (hdr.fault_step.load(std::memory_order_relaxed) != static_cast<uint32_t>(step)) return;
  if (hdr.fault_countdown.fetch_sub(1, std::memory_order_acq_rel) == 1) {
    hdr.fault_step.store(0, std::memory_order_release);
    kill(getpid(), SIGKILL);
    for (;;) pause();
  }
}

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
template <class Runner>
WorkerExit run_worker(Segment& seg, uint32_t id, Runner& runner) {
  const SegmentConfig& cfg = seg.config();
  SegmentHeader& hdr = seg.header();
  TaskRing& tasks = seg.tasks();
  TaskRing& results = seg.results();
  ArgPool& pool = seg.pool();
  const uint16_t tag = ArgPool::worker_tag(id);  // blocks we take are ours until handed on
  const WorkerTable& table = seg.workers();
  WorkerRecord& rec = table.record(id);
  OwnerWatch owner(hdr);
  const uint32_t body_bytes = task_body_bytes(cfg.slot);
  const bool timing = cfg.max_performance == 0;
  const bool has_meta = cfg.slot.meta_len >= sizeof(TaskMeta);
  std::vector<uint8_t> value;
  value.reserve(4096);
  auto ring_hook = [&hdr](RingPoint p) { maybe_fault(hdr, fault_for(p)); };
  auto claim_alone = [](const uint8_t* body) {
    uint32_t flags;
    std::memcpy(&flags, body + offsetof(TaskHeader, flags), sizeof flags);
    return (flags & kClaimAlone) != 0;
  };

  auto stop_now = [&] {
    return hdr.shutdown.load(std::memory_order_acquire) != 0 ||
           rec.stop_request.load(std::memory_order_acquire) != 0;
  };
  auto exit_with = [&](WorkerExit e) {
    rec.state.store(static_cast<uint32_t>(e == WorkerExit::kOwnerDied ? WorkerState::kExited
                                                                      : WorkerState::kExiting),
                    std::memory_order_release);
    return e;
  };

  rec.pid.store(static_cast<int32_t>(getpid()), std::memory_order_relaxed);
  rec.tasks_this_life.store(0, std::memory_order_relaxed);
  rec.state.store(static_cast<uint32_t>(WorkerState::kIdle), std::memory_order_release);
  int64_t idle_since = monotonic_ns();

  for (;;) {
    if (hdr.shutdown.load(std::memory_order_acquire)) return exit_with(WorkerExit::kShutdown);
    if (rec.stop_request.load(std::memory_order_acquire))
      return exit_with(WorkerExit::kStopRequested);
    if (runner.interrupted()) return exit_with(WorkerExit::kInterrupted);
    uint32_t want = cfg.batch_size;
    if (cfg.max_tasks_per_worker) {
      uint64_t done = rec.tasks_this_life.load(std::memory_order_relaxed);
      if (done >= cfg.max_tasks_per_worker) return exit_with(WorkerExit::kRecycled);
      if (cfg.max_tasks_per_worker - done < want)
        want = static_cast<uint32_t>(cfg.max_tasks_per_worker - done);
    }

    // Claim a range and copy it into the local queue. local_count is published with each
    // copied entry, before the ring cells are released, so that every task is always in
    // the ring, in the local queue, or both (recovery handles both).
    uint32_t k = tasks.claim_range(want, &rec.claim, [&](uint32_t i, const uint8_t* body) {
      LocalEntry& e = table.entry(id, i);
      std::memcpy(table.entry_body(id, i), body, body_bytes);
      e.state.store(static_cast<uint32_t>(LocalState::kPending), std::memory_order_relaxed);
      rec.local_next.store(0, std::memory_order_relaxed);
      rec.local_count.store(i + 1, std::memory_order_release);
    }, ring_hook, claim_alone);

    if (k == 0) {
      if (!owner.alive()) return exit_with(WorkerExit::kOwnerDied);
      maybe_fault(hdr, FaultStep::kIdle);
      runner.before_sleep();
      // One idle worker at a time spins before sleeping; the others sleep at once.
      tasks.spin_then_wait(id + 1, kIdleSpinNs, monotonic_ns() + 250'000'000, stop_now);
      runner.after_sleep();
      continue;
    }
    rec.claims.fetch_add(1, std::memory_order_relaxed);
    tasks.wake_if_more();
    int64_t now = timing ? monotonic_ns() : 0;
    if (timing) rec.idle_ns.fetch_add(static_cast<uint64_t>(now - idle_since), std::memory_order_relaxed);
    rec.state.store(static_cast<uint32_t>(WorkerState::kBusy), std::memory_order_relaxed);

    for (uint32_t j = 0; j < k; ++j) {
      LocalEntry& e = table.entry(id, j);
      uint8_t* body = table.entry_body(id, j);
      TaskHeader th;
      std::memcpy(&th, body, sizeof th);
      uint8_t* slot = body + sizeof th;
      const SlotLayout& L = cfg.slot;
      uint32_t fn_id = read_uint(slot + L.fn_id_off, L.fn_id_size);
      uint32_t tsk_id = read_uint(slot + L.tsk_id_off, L.tsk_id_size);

      if (cfg.debug_delay_ns > 0) {
        runner.before_sleep();
        timespec ts{static_cast<time_t>(cfg.debug_delay_ns / 1000000000),
                    static_cast<long>(cfg.debug_delay_ns % 1000000000)};
        nanosleep(&ts, nullptr);
        runner.after_sleep();
      }
      // The start time is kept even with max_performance: task_timeout depends on it.
      const int64_t began = monotonic_ns();
      int64_t start = timing ? began : 0;
      rec.running_seq.store(th.seq, std::memory_order_relaxed);
      rec.running_fn.store(fn_id, std::memory_order_relaxed);
      rec.running_tsk.store(tsk_id, std::memory_order_relaxed);
      rec.running_since_ns.store(began, std::memory_order_relaxed);
      // seq_cst, before the look at the owner's cancellations (CancelTable::take).
      e.state.store(static_cast<uint32_t>(LocalState::kRunning), std::memory_order_seq_cst);
      if (has_meta) {
        TaskMeta m{th.enqueue_ns, start, 0, static_cast<uint16_t>(th.attempts + 1),
                   static_cast<uint16_t>(id), 0};
        std::memcpy(slot + L.meta_off, &m, sizeof m);
      }

      const uint8_t* stream = nullptr;
      if (th.encoding == ArgEncoding::kPacked) stream = slot + L.arg_area_off();
      if (th.encoding == ArgEncoding::kPooled) stream = pool.data(th.pool_ref);
      TaskRun run{id, fn_id, tsk_id, &th, slot, stream, th.stream_len};
      value.clear();
      maybe_fault(hdr, FaultStep::kBeforeRun);
      ResultStatus status = ResultStatus::kCancelled;
      const bool ran = th.seq >= hdr.cancel_below.load(std::memory_order_relaxed) && !hdr.cancels.take(th.seq);
      if (ran) status = runner.run(run, value);
      maybe_fault(hdr, FaultStep::kAfterRun);
      int64_t end = timing ? monotonic_ns() : 0;
      // Pieces of the value the runner left in place (an array's data), copied below
      // straight to where the value goes.
      const std::vector<ExternalPiece>* pieces = nullptr;
      if constexpr (requires { runner.value_pieces(); }) {
        if (ran) pieces = runner.value_pieces();
      }
      size_t vlen = value.size();
      if (pieces) for (const ExternalPiece& x : *pieces) vlen += x.len;
      auto copy_value = [&](uint8_t* dst, size_t n) {
        if (pieces && !pieces->empty()) gather(value.data(), value.size(), *pieces, dst);
        else if (n) std::memcpy(dst, value.data(), n);
      };
      // Arguments the handler kept a view of (an array) stay ours until it lets go: the
      // collector must not free them, and our death must.
      bool pinned = false;
      if constexpr (requires { runner.args_pinned(); }) {
        pinned = ran && th.encoding == ArgEncoding::kPooled && runner.args_pinned();
      }
      if (pinned) pool.retag(th.pool_ref, th.stream_len, tag);

      ResultHeader r;
      r.seq = th.seq;
      r.arg_ref = th.encoding == ArgEncoding::kPooled && !pinned ? th.pool_ref : 0;
      r.arg_len = th.encoding == ArgEncoding::kPooled && !pinned ? th.stream_len : 0;
      r.tsk_id = tsk_id;
      r.fn_id = fn_id;
      r.worker_id = static_cast<uint16_t>(id);
      r.status = status;
      r.attempts = static_cast<uint16_t>(th.attempts + 1);
      r.enqueue_ns = th.enqueue_ns;
      r.route = th.route;
      r.start_ns = start;
      r.end_ns = end;
      rec.result_ref.store(0, std::memory_order_relaxed);
      rec.result_epoch.store(rec.publish.epoch.load(std::memory_order_relaxed), std::memory_order_relaxed);
      rec.result_seq.store(th.seq, std::memory_order_release);
      if (vlen > kResultInlineBytes) {
        // A result too large for the pool fails its task; one that does not find room
        // within kResultWaitNs (every worker blocked on large results while queued tasks'
        // arguments hold the rest) fails too, instead of waiting for ever.
        uint64_t off = 0;
        std::string why;
        if (vlen > pool.capacity_bytes()) {
          why = "the result takes " + std::to_string(vlen) + " bytes encoded, more than the whole argument pool (" +
                std::to_string(pool.capacity_bytes()) + " bytes); pass a larger pool_bytes to MpopApi";
        } else {
          off = pool.alloc(vlen, monotonic_ns() + kResultWaitNs,
                           [&] { return !owner.alive() || hdr.shutdown.load() != 0; }, UINT64_MAX, tag,
                           [&] { results.wake_consumers(); });
          if (!off && (!owner.alive() || hdr.shutdown.load() != 0)) return exit_with(WorkerExit::kOwnerDied);
          if (!off)
            why = "the result takes " + std::to_string(vlen) + " bytes encoded and found no room in the argument pool (" +
                  std::to_string(pool.used_bytes()) + " of " + std::to_string(pool.capacity_bytes()) +
                  " bytes in use) for 10 s; pass a larger pool_bytes to MpopApi";
        }
        if (off) {
          maybe_fault(hdr, FaultStep::kResultAllocated);
          rec.result_len.store(static_cast<uint32_t>(vlen), std::memory_order_relaxed);
          rec.result_ref.store(off, std::memory_order_release);
          copy_value(pool.data(off), vlen);
          // Handed on: from here the supervisor tracks it through result_ref, and a death
          // no longer leaves it tagged as ours.
          pool.retag(off, vlen, ArgPool::kResultTag);
          r.value_encoding = ValueEncoding::kPooled;
          r.value_ref = off;
          r.value_len = static_cast<uint32_t>(vlen);
          maybe_fault(hdr, FaultStep::kResultPooled);
        } else {
          // The error itself must be placed: inline, or in the pool if there is room now;
          // failing both, a message short enough to go inline.
          value.clear();
          pieces = nullptr;
          r.status = status = runner.fail(why, value);
          vlen = value.size();
          uint64_t eoff = value.size() > kResultInlineBytes ? pool.try_alloc(value.size(), UINT64_MAX, tag) : 0;
          if (eoff) {
            rec.result_len.store(static_cast<uint32_t>(value.size()), std::memory_order_relaxed);
            rec.result_ref.store(eoff, std::memory_order_release);
            std::memcpy(pool.data(eoff), value.data(), value.size());
            pool.retag(eoff, value.size(), ArgPool::kResultTag);
            r.value_encoding = ValueEncoding::kPooled;
            r.value_ref = eoff;
            r.value_len = static_cast<uint32_t>(value.size());
          } else if (value.size() > kResultInlineBytes) {
            value.clear();
            runner.fail("result too large for the argument pool; raise pool_bytes", value);
            if (value.size() > kResultInlineBytes) value.clear();
            vlen = value.size();
          }
        }
      }
      if (r.value_encoding != ValueEncoding::kPooled) {
        r.value_encoding = ValueEncoding::kInline;
        r.inline_len = static_cast<uint16_t>(vlen);
      }
      auto fill = [&](uint32_t, void* out) {
        auto* o = static_cast<uint8_t*>(out);
        std::memcpy(o, &r, sizeof r);
        if (r.inline_len) copy_value(o + sizeof r, r.inline_len);
      };
      while (results.try_push(1, fill, &rec.publish, ring_hook) == 0) {
        if (!owner.alive()) return exit_with(WorkerExit::kOwnerDied);
        runner.before_sleep();
        wait_until(
            results.control().not_full, [&] { return results.has_room(); },
            monotonic_ns() + 250'000'000);
        runner.after_sleep();
      }

      maybe_fault(hdr, FaultStep::kAfterPublish);
      if constexpr (requires { runner.after_publish(); }) runner.after_publish();
      e.state.store(static_cast<uint32_t>(LocalState::kDone), std::memory_order_release);
      rec.local_next.store(j + 1, std::memory_order_release);
      rec.running_since_ns.store(0, std::memory_order_relaxed);
      if (status == ResultStatus::kOk)
        rec.completed.fetch_add(1, std::memory_order_relaxed);
      else if (status != ResultStatus::kCancelled)
        rec.failed.fetch_add(1, std::memory_order_relaxed);
      rec.tasks_this_life.fetch_add(1, std::memory_order_relaxed);
      if (timing) rec.busy_ns.fetch_add(static_cast<uint64_t>(end - start), std::memory_order_relaxed);
    }
    rec.local_count.store(0, std::memory_order_release);
    rec.state.store(static_cast<uint32_t>(WorkerState::kIdle), std::memory_order_relaxed);
    idle_since = timing ? monotonic_ns() : 0;
  }
}

}  // namespace mpop
