// Supervisor thread: spawn, pidfd watch, crash recovery of local queues, claim windows and
// publication windows, task_timeout, respawn, scale and stop.
#include "mpop/supervisor.hpp"

#include "mpop/fault.hpp"

#include <poll.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <stdexcept>

#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif

namespace mpop {

Supervisor::Supervisor(Segment& seg, SupervisorOptions opts)
    : seg_(seg), opts_(std::move(opts)) {
  children_.resize(seg_.workers().count);
}

Supervisor::~Supervisor() {
  if (process_.inherited()) abandon_inherited_thread(thread_);
  if (thread_.joinable()) stop(false, 0);
  if (event_fd_ >= 0) close(event_fd_);
}

void Supervisor::wake() {
  uint64_t one = 1;
  if (event_fd_ >= 0) {
    ssize_t rc = write(event_fd_, &one, sizeof one);
    (void)rc;
  }
}

void Supervisor::set_error(const std::string& e) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (error_.empty()) error_ = e;
}

std::string Supervisor::last_error() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return error_;
}

void Supervisor::start() {
  if (thread_.joinable()) return;
  if (opts_.workers < 1 || opts_.workers > children_.size())
    throw std::invalid_argument("worker count out of range");
  if (event_fd_ < 0) event_fd_ = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  {
    std::lock_guard<std::mutex> lock(mutex_);
    error_.clear();
    started_ = false;
  }
  quit_.store(false);
  loop_done_ = false;
  target_.store(opts_.workers);
  for (auto& c : children_) c = Child{};
  thread_ = std::thread([this] {
    loop();
    std::lock_guard<std::mutex> lock(mutex_);
    loop_done_ = true;
    loop_done_cv_.notify_all();
  });
  std::unique_lock<std::mutex> lock(mutex_);
  started_cv_.wait(lock, [this] { return started_; });
  if (!error_.empty()) {
    std::string e = error_;
    lock.unlock();
    stop(false, 0);
    throw std::runtime_error(e);
  }
}

void Supervisor::stop(bool graceful, int64_t timeout_ns) {
  if (!thread_.joinable()) return;
  begin_stop(graceful, timeout_ns);
  thread_.join();
}

void Supervisor::begin_stop(bool graceful, int64_t timeout_ns) {
  if (!thread_.joinable()) return;
  graceful_.store(graceful);
  stop_deadline_ns_.store(monotonic_ns() + (timeout_ns > 0 ? timeout_ns : 0));
  quit_.store(true, std::memory_order_release);
  wake();
}

bool Supervisor::wait_stopped(int64_t deadline_ns) {
  if (!thread_.joinable()) return true;
  {
    std::unique_lock<std::mutex> lock(mutex_);
    auto done = [this] { return loop_done_; };
    if (deadline_ns < 0) {
      loop_done_cv_.wait(lock, done);
    } else {
      int64_t left = deadline_ns - monotonic_ns();
      if (left <= 0 ? !done() : !loop_done_cv_.wait_for(lock, std::chrono::nanoseconds(left), done))
        return false;
    }
  }
  thread_.join();
  return true;
}

void Supervisor::scale(uint32_t n) {
  if (n < 1 || n > children_.size()) throw std::invalid_argument("worker count out of range");
  target_.store(n);
  {
    std::lock_guard<std::mutex> lock(mutex_);
    scale_pending_ = true;
  }
  wake();
}

bool Supervisor::kill_task(uint64_t seq) {
  if (seq == 0) return false;
  for (uint32_t id = 0; id < children_.size(); ++id) {
    const WorkerRecord& rec = seg_.workers().record(id);
    if (rec.running_since_ns.load(std::memory_order_acquire) != 0 &&
        rec.running_seq.load(std::memory_order_acquire) == seq) {
      {
        std::lock_guard<std::mutex> lock(mutex_);
        task_kills_.emplace_back(id, seq);
      }
      wake();
      return true;
    }
  }
  return false;
}

bool Supervisor::kill_worker(uint32_t id) {
  if (id >= children_.size()) return false;
  auto st = static_cast<WorkerState>(seg_.workers().record(id).state.load());
  if (st != WorkerState::kIdle && st != WorkerState::kBusy && st != WorkerState::kStarting)
    return false;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    kill_requests_.push_back(id);
  }
  wake();
  return true;
}

uint32_t Supervisor::live_workers() const {
  uint32_t n = 0;
  for (uint32_t i = 0; i < seg_.workers().count; ++i) {
    auto st = static_cast<WorkerState>(seg_.workers().record(i).state.load());
    if (st == WorkerState::kStarting || st == WorkerState::kIdle || st == WorkerState::kBusy) ++n;
  }
  return n;
}

void Supervisor::spawn(uint32_t id) {
  Child& c = children_[id];
  WorkerRecord& rec = seg_.workers().record(id);
  c.gen += 1;
  c.stopping = false;
  c.active = true;
  rec.stop_request.store(0);
  rec.timed_out_seq.store(0);
  rec.killed_seq.store(0);
  rec.kill_request.store(0);
  // The local queue stays: what the last process left there (pending, or settled with a
  // result to post), the new one runs first.
  releasing_.erase(std::remove(releasing_.begin(), releasing_.end(), id), releasing_.end());
  rec.running_since_ns.store(0);
  rec.claim.in_claim.store(0);
  rec.publish.in_claim.store(0);
  // The last process's pooled result block, if any, was freed or handed on when it died:
  // the new one starts without, or its own death (before its first result) frees it again.
  rec.result_ref.store(0);
  rec.start_error[0] = '\0';
  rec.pid.store(0);
  rec.start_time.store(0);
  rec.generation.store(c.gen);
  rec.life.store(life_word(c.gen, 0), std::memory_order_release);
  rec.state.store(static_cast<uint32_t>(WorkerState::kStarting), std::memory_order_release);
  pid_t pid = opts_.spawn ? opts_.spawn(id, c.gen) : -1;
  if (pid <= 0) {
    counters_.spawn_failures.fetch_add(1);
    rec.state.store(static_cast<uint32_t>(WorkerState::kDead));
    c.active = false;
    set_error("mpop: could not start worker " + std::to_string(id) + ": " + std::strerror(errno));
    return;
  }
  maybe_fault(seg_.header(), FaultStep::kSupervisorSpawned);
  c.pid = pid;
  c.pidfd = static_cast<int>(syscall(SYS_pidfd_open, pid, 0));
  const uint64_t start = Segment::process_start_time(pid);
  c.start_time = c.pidfd < 0 ? start : 0;
  claim_life(rec, c.gen, static_cast<uint32_t>(pid), start);  // or the worker did already
  rec.pid.store(static_cast<int32_t>(pid), std::memory_order_relaxed);
}

bool Supervisor::still_ours(const Child& c) const {
  return c.start_time != 0 && Segment::process_start_time(c.pid) == c.start_time;
}

void Supervisor::signal_child(const Child& c, int sig) {
  if (c.pid <= 0) return;
  // Our own unreaped child keeps its pid; another process's child without a pidfd may be
  // gone and its pid reused: signal it only while it is still the process we spawned.
  if (c.pidfd < 0 && !opts_.children_are_ours && !still_ours(c)) return;
  kill(c.pid, sig);
}

std::vector<std::pair<uint32_t, uint64_t>> Supervisor::claim_snapshot(uint32_t except,
                                                                      bool publish) const {
  std::vector<std::pair<uint32_t, uint64_t>> snap;
  for (uint32_t i = 0; i < children_.size(); ++i) {
    if (i == except || children_[i].pid <= 0) continue;
    const ClaimState& cs = publish ? seg_.workers().record(i).publish : seg_.workers().record(i).claim;
    if (cs.in_claim.load(std::memory_order_seq_cst))
      snap.emplace_back(i, cs.epoch.load(std::memory_order_seq_cst));
  }
  return snap;
}

bool Supervisor::snapshot_passed(const std::vector<std::pair<uint32_t, uint64_t>>& snap,
                                 bool publish) const {
  for (auto [i, epoch] : snap) {
    if (children_[i].pid <= 0) continue;  // died since: its own recovery covers it
    const ClaimState& cs = publish ? seg_.workers().record(i).publish : seg_.workers().record(i).claim;
    if (cs.in_claim.load(std::memory_order_seq_cst) && cs.epoch.load(std::memory_order_seq_cst) == epoch)
      return false;
  }
  return true;
}

void Supervisor::settle(uint32_t id, uint32_t j, const TaskHeader& th, ResultStatus status) {
  LocalEntry& e = seg_.workers().entry(id, j);
  std::memcpy(seg_.workers().entry_body(id, j), &th, sizeof th);
  e.settled = static_cast<uint32_t>(status);
  e.state.store(static_cast<uint32_t>(LocalState::kSettled), std::memory_order_seq_cst);
}

bool Supervisor::try_post_settled(uint32_t id, uint32_t j) {
  LocalEntry& e = seg_.workers().entry(id, j);
  const uint8_t* body = seg_.workers().entry_body(id, j);
  TaskHeader h;
  std::memcpy(&h, body, sizeof h);
  ResultHeader r = result_without_value(h, body + sizeof h, seg_.config().slot, static_cast<ResultStatus>(e.settled));
  r.worker_id = static_cast<uint16_t>(id);
  if (seg_.results().try_push(1, [&](uint32_t, void* out) { std::memcpy(out, &r, sizeof r); },
                             &seg_.header().supervisor_post) == 0)
    return false;
  e.state.store(static_cast<uint32_t>(LocalState::kDone), std::memory_order_seq_cst);
  return true;
}

void Supervisor::on_exit(uint32_t id, bool crashed, int exit) {
  Child& c = children_[id];
  WorkerRecord& rec = seg_.workers().record(id);
  if (c.pidfd >= 0) close(c.pidfd);
  c.pidfd = -1;
  c.pid = -1;
  auto state = static_cast<WorkerState>(rec.state.load());

  if (state == WorkerState::kStarting) {
    on_start_death(id, exit);
    return;
  }
  c.start_deaths = 0;

  if (crashed || rec.timed_out_seq.load() || rec.killed_seq.load()) {
    on_crash(id);
    return;
  }

  // A worker recycled for its memory left in the middle of a claim: the tasks it had not
  // started stay in its local queue for its replacement (uncharged), or go back to the
  // ring when none comes.
  const bool resume = still_wanted(c) && id < target_.load();
  recover_local_queue(id, what_it_published(rec), false);
  rec.state.store(static_cast<uint32_t>(WorkerState::kExited));
  // A worker that left by itself while still wanted was recycled (max_tasks_per_worker,
  // max_worker_memory).
  if (resume) {
    rec.recycled.fetch_add(1);
    spawn(id);
  } else {
    release_local_queue(id);
    c.active = false;
  }
}

bool Supervisor::still_wanted(const Child& c) const {
  return c.active && !c.stopping && !quit_.load();
}

void Supervisor::on_start_death(uint32_t id, int exit) {
  Child& c = children_[id];
  WorkerRecord& rec = seg_.workers().record(id);
  // Died before taking work. If it said why, or left by itself with an error, respawning
  // would fail the same way: report it. If it was killed, start a replacement, unless
  // that keeps happening.
  std::string why(rec.start_error, strnlen(rec.start_error, sizeof rec.start_error));
  // It may have died sending output (its initializer's, say): void a cell it reserved.
  const Publication pub = what_it_published(rec);
  if (pub.in_window && rec.publish.head < seg_.results().enqueue_pos())
    publish_recoveries_.push_back({id, rec.publish.head, claim_snapshot(id, true), false});
  bool failed = !why.empty() || (exit >= 0 && WIFEXITED(exit) && WEXITSTATUS(exit) != 0);
  if (failed || ++c.start_deaths >= 5) {
    set_error("mpop: worker " + std::to_string(id) + " failed to start" +
              (why.empty() ? std::string(" (no error recorded; see its stderr)") : ":\n" + why));
    release_local_queue(id);  // what a predecessor left for it: to the others
    rec.state.store(static_cast<uint32_t>(WorkerState::kDead));
    c.active = false;
    return;
  }
  rec.state.store(static_cast<uint32_t>(WorkerState::kDead));
  if (still_wanted(c)) {
    rec.restarts.fetch_add(1);  // a replacement: one that is not started is not counted
    spawn(id);
  } else {
    c.active = false;
  }
}

void Supervisor::on_crash(uint32_t id) {
  Child& c = children_[id];
  WorkerRecord& rec = seg_.workers().record(id);
  counters_.crashes.fetch_add(1);
  // Killed by a non-graceful stop: nothing it held will run again.
  const bool cancel = quit_.load() && !graceful_.load() && c.stopping;
  c.resume = !cancel && still_wanted(c);
  const Publication pub = what_it_published(rec);
  // An unpublished pooled block is freed (one inside its publication window: see
  // recover_windows).
  if (!pub.published && !pub.in_window) free_result_block(rec);
  seg_.tasks().clear_spinner(id + 1);  // it died spinning for work: let another spin
  recover_local_queue(id, pub, cancel);
  recover_windows(id, pub);
  if (c.recoveries == 0) finish_recovery(id);
}

void Supervisor::finish_recovery(uint32_t id) {
  Child& c = children_[id];
  WorkerRecord& rec = seg_.workers().record(id);
  // Last, what is still tagged with its id: a block it took but had not yet recorded in
  // result_ref, or the words of a run it was halfway through taking. (Everything it
  // recorded and handed on was retagged first, so none of the above is freed twice.)
  if (uint64_t bytes = seg_.pool().reclaim(ArgPool::worker_tag(id))) {
    counters_.pool_reclaimed_bytes.fetch_add(bytes);
  }
  rec.restarts.fetch_add(1);
  rec.running_since_ns.store(0);
  const bool replace = c.resume && still_wanted(c);
  if (!replace) release_local_queue(id);
  rec.state.store(static_cast<uint32_t>(WorkerState::kDead));
  maybe_fault(seg_.header(), FaultStep::kSupervisorRecovered);
  if (replace) spawn(id);  // it runs what is pending in the local queue first
  else c.active = false;
}

void Supervisor::release_local_queue(uint32_t id) {
  if (!try_release(id) && std::find(releasing_.begin(), releasing_.end(), id) == releasing_.end())
    releasing_.push_back(id);
}

bool Supervisor::try_release(uint32_t id) {
  const WorkerTable& table = seg_.workers();
  const uint32_t body_bytes = task_body_bytes(seg_.config().slot);
  const uint32_t n = std::min(table.record(id).local_count.load(std::memory_order_acquire), table.batch);
  for (uint32_t j = 0; j < n; ++j) {
    LocalEntry& e = table.entry(id, j);
    const auto st = static_cast<LocalState>(e.state.load(std::memory_order_acquire));
    if (st == LocalState::kSettled) {
      if (!try_post_settled(id, j)) return false;
      continue;
    }
    if (!left_to_run(st)) continue;
    // Not pending there while it is pushed (seq_cst): an owner that still saw it pending
    // is ordered before the worker that takes it from the ring (CancelTable).
    e.state.store(static_cast<uint32_t>(LocalState::kReleasing), std::memory_order_seq_cst);
    const uint8_t* body = table.entry_body(id, j);
    if (seg_.tasks().try_push(1, [&](uint32_t, void* out) { std::memcpy(out, body, body_bytes); },
                              &seg_.header().supervisor_push) == 0) {
      e.state.store(static_cast<uint32_t>(LocalState::kPending), std::memory_order_seq_cst);
      return false;
    }
    e.state.store(static_cast<uint32_t>(LocalState::kDone), std::memory_order_seq_cst);
  }
  table.record(id).local_count.store(0, std::memory_order_release);
  return true;
}

void Supervisor::release_waiting() {
  releasing_.erase(std::remove_if(releasing_.begin(), releasing_.end(), [&](uint32_t id) { return try_release(id); }),
                   releasing_.end());
}

void Supervisor::free_result_block(WorkerRecord& rec) {
  if (const uint64_t ref = rec.result_ref.exchange(0)) seg_.pool().free(ref, rec.result_len.load());
}

Supervisor::Publication Supervisor::what_it_published(const WorkerRecord& rec) const {
  // Did it publish the result of the task it was running? Then that task is done, even
  // though the worker died before marking it so. Published means: the window's epoch
  // moved past the one recorded with the result, or it died inside the window after its
  // cell was reserved (count set) and published (no longer reserved-unpublished). Missing
  // the second case re-ran a task whose result was out, and the re-run read arguments the
  // collector had already freed.
  Publication pub;
  pub.result_seq = rec.result_seq.load(std::memory_order_acquire);
  pub.in_window = rec.publish.in_claim.load(std::memory_order_seq_cst) != 0;
  pub.window_out = pub.in_window && rec.publish.count != 0 &&
                   rec.publish.head < seg_.results().enqueue_pos() &&
                   !seg_.results().is_reserved_unpublished(rec.publish.head);
  pub.published = pub.window_out || rec.publish.epoch.load(std::memory_order_acquire) >
                                        rec.result_epoch.load(std::memory_order_acquire);
  return pub;
}

void Supervisor::recover_local_queue(uint32_t id, const Publication& pub, bool cancel) {
  const WorkerTable& table = seg_.workers();
  const uint32_t n = std::min(table.record(id).local_count.load(std::memory_order_acquire), table.batch);
  for (uint32_t j = 0; j < n; ++j) {
    recover_local_entry(id, j, pub, cancel);
    if (j == 0) maybe_fault(seg_.header(), FaultStep::kSupervisorRecovering);
  }
}

void Supervisor::recover_local_entry(uint32_t id, uint32_t j, const Publication& pub, bool cancel) {
  const WorkerTable& table = seg_.workers();
  LocalEntry& e = table.entry(id, j);
  auto st = static_cast<LocalState>(e.state.load(std::memory_order_acquire));
  uint8_t* body = table.entry_body(id, j);
  TaskHeader th;
  std::memcpy(&th, body, sizeof th);
  // Arguments it had pinned (a handler kept an array view) belong to the task again,
  // unless its result is out: then they were the dead worker's alone, and go below.
  const bool result_out = st == LocalState::kRunning && pub.published && pub.result_seq == th.seq;
  if (th.encoding == ArgEncoding::kPooled && !result_out &&
      (st == LocalState::kPending || st == LocalState::kRunning) &&
      seg_.pool().tag_of(th.pool_ref) == ArgPool::worker_tag(id))
    seg_.pool().retag(th.pool_ref, th.stream_len, ArgPool::kArgTag);
  // Each outcome is written to the entry after what it sends out (a result posted, the
  // task pushed back): a new supervisor that redoes this recovery finds the entry settled,
  // or sends it again (a second result of a task is dropped by whoever collects results).
  if (left_to_run(st)) {
    if (cancel) settle(id, j, th, ResultStatus::kCancelled);
    // else: it stays pending, for the replacement or for release_local_queue
  } else if (st == LocalState::kRunning) {
    if (result_out) {
      e.state.store(static_cast<uint32_t>(LocalState::kDone), std::memory_order_seq_cst);
      return;
    }
    settle_interrupted_task(id, j, th, body, cancel);
  }
}

void Supervisor::settle_interrupted_task(uint32_t id, uint32_t j, TaskHeader th, uint8_t* body, bool cancel) {
  const WorkerRecord& rec = seg_.workers().record(id);
  LocalEntry& e = seg_.workers().entry(id, j);
  auto finish = [&](ResultStatus status) { settle(id, j, th, status); };
  // To run again (pending in the local queue: the replacement's, or the ring's through
  // release_local_queue).
  auto again = [&](bool charged) {
    if (charged) std::memcpy(body, &th, sizeof th);
    e.state.store(static_cast<uint32_t>(LocalState::kPending), std::memory_order_seq_cst);
  };
  // Killed by kill_task: that task ends cancelled. Had the worker moved on to another task
  // before the signal came, that one is not charged for a death it did not cause.
  const uint64_t killed_seq = rec.killed_seq.load(), timed_out_seq = rec.timed_out_seq.load();
  if (killed_seq && !cancel) {
    if (killed_seq == th.seq) finish(ResultStatus::kCancelled);
    else again(false);
    return;
  }
  th.attempts += 1;
  if (cancel) {
    finish(ResultStatus::kCancelled);
  } else if (timed_out_seq && timed_out_seq == th.seq) {
    counters_.timeouts.fetch_add(1);
    finish(ResultStatus::kTimeout);
  } else if (th.attempts > opts_.max_retries) {
    counters_.crashed_tasks.fetch_add(1);
    finish(ResultStatus::kCrashed);
  } else {
    counters_.retries.fetch_add(1);
    again(true);
  }
}

void Supervisor::recover_windows(uint32_t id, const Publication& pub) {
  Child& c = children_[id];
  WorkerRecord& rec = seg_.workers().record(id);
  if (rec.claim.in_claim.load(std::memory_order_seq_cst)) {
    // The dequeue counter at the death, kept in the record: a new supervisor that redoes
    // this recovers the same cells, never ones another worker claimed since.
    uint64_t below = rec.recover_below.load();
    if (below == 0) {
      below = seg_.tasks().dequeue_pos() + 1;
      rec.recover_below.store(below);
    }
    ring_recoveries_.push_back({id, below - 1, claim_snapshot(id, false)});
    ++c.recoveries;
  }
  if (pub.in_window && rec.publish.head < seg_.results().enqueue_pos()) {
    // A published cell (window_out) carries its result: the collector frees that block.
    // Otherwise the block is freed by the recovery: its cell is voided, or it never got
    // one (another worker took that position while it was in its window).
    if (pub.window_out) rec.result_ref.store(0);
    publish_recoveries_.push_back({id, rec.publish.head, claim_snapshot(id, true), true});
    ++c.recoveries;
  } else if (pub.in_window) {
    free_result_block(rec);  // never reserved a cell
    rec.publish.in_claim.store(0);
  }
}

void Supervisor::check_timeouts() {
  if (opts_.task_timeout_ns <= 0) return;
  int64_t now = monotonic_ns();
  for (uint32_t i = 0; i < children_.size(); ++i) {
    Child& c = children_[i];
    WorkerRecord& rec = seg_.workers().record(i);
    if (c.pid <= 0 || rec.timed_out_seq.load()) continue;
    uint64_t seq = rec.running_seq.load(std::memory_order_acquire);
    int64_t since = rec.running_since_ns.load(std::memory_order_acquire);
    if (since > 1 && now - since > opts_.task_timeout_ns &&
        rec.running_seq.load(std::memory_order_acquire) == seq &&
        rec.running_since_ns.load(std::memory_order_acquire) == since) {
      rec.timed_out_seq.store(seq);
      signal_child(c, SIGKILL);
      maybe_fault(seg_.header(), FaultStep::kSupervisorKilledWorker);
    }
  }
}

void Supervisor::run_recoveries() {
  const WorkerTable& table = seg_.workers();
  const uint32_t body_bytes = task_body_bytes(seg_.config().slot);
  std::vector<uint32_t> finished;
  for (auto it = ring_recoveries_.begin(); it != ring_recoveries_.end();) {
    if (!snapshot_passed(it->wait, false)) {
      ++it;
      continue;
    }
    const uint32_t id = it->worker;
    WorkerRecord& rec = table.record(id);
    // The cells it claimed and had not copied join its local queue as pending tasks; one
    // it had copied (or that an earlier, interrupted recovery did) is only released.
    seg_.tasks().recover_unreleased(it->below, [&](uint64_t, const uint8_t* body) {
      if (is_void_task(body)) return;  // a dead producer's filler: nothing to run
      TaskHeader th;
      std::memcpy(&th, body, sizeof th);
      const uint32_t n = std::min(rec.local_count.load(std::memory_order_acquire), table.batch);
      for (uint32_t j = 0; j < n; ++j) {
        TaskHeader lh;
        std::memcpy(&lh, table.entry_body(id, j), sizeof lh);
        if (lh.seq == th.seq) return;
      }
      if (n >= table.batch) {  // cannot happen: a claim is at most a batch, and these are its rest
        set_error("mpop: internal error: no room in worker " + std::to_string(id) +
                  "'s local queue for recovered task " + std::to_string(th.seq));
      } else {
        std::memcpy(table.entry_body(id, n), body, body_bytes);
        table.entry(id, n).state.store(static_cast<uint32_t>(LocalState::kPending), std::memory_order_relaxed);
        rec.local_count.store(n + 1, std::memory_order_release);
      }
      counters_.recovered_from_ring.fetch_add(1);
    });
    rec.claim.in_claim.store(0);
    rec.recover_below.store(0);
    finished.push_back(id);
    it = ring_recoveries_.erase(it);
  }
  for (auto it = publish_recoveries_.begin(); it != publish_recoveries_.end();) {
    if (!snapshot_passed(it->wait, true)) {
      ++it;
      continue;
    }
    if (seg_.results().is_reserved_unpublished(it->pos)) {
      seg_.results().publish_reserved(it->pos, [](void* body) {
        ResultHeader r;
        r.status = ResultStatus::kVoid;
        std::memcpy(body, &r, sizeof r);
      });
    }
    if (it->of_crash) {
      WorkerRecord& rec = table.record(it->worker);
      free_result_block(rec);
      rec.publish.in_claim.store(0);
      finished.push_back(it->worker);
    }
    it = publish_recoveries_.erase(it);
  }
  for (uint32_t id : finished)
    if (--children_[id].recoveries == 0) finish_recovery(id);
}

void Supervisor::start_workers() {
  const uint32_t n = target_.load();
  if (!opts_.adopt) {
    for (uint32_t i = 0; i < n; ++i) spawn(i);
    return;
  }
  // A push the last supervisor died in the middle of: its cell gets a filler.
  seg_.void_abandoned_push(seg_.header().supervisor_push, false);
  seg_.void_abandoned_push(seg_.header().supervisor_post, true);
  // The live ones first: the recovery of a dead one looks at the others' claim windows.
  std::vector<uint32_t> dead;
  for (uint32_t i = 0; i < n; ++i) {
    if (!adopt(i)) dead.push_back(i);
    else maybe_fault(seg_.header(), FaultStep::kSupervisorAdopting);
  }
  for (uint32_t i : dead) {
    Child& c = children_[i];
    WorkerRecord& rec = seg_.workers().record(i);
    c.gen = rec.generation.load();
    const auto st = static_cast<WorkerState>(rec.state.load());
    if (holds_process(st)) {
      // It died while no supervisor watched: recovered and replaced as a crash is (or as a
      // clean exit, if it was leaving).
      c.active = true;
      c.pid = 0;
      on_exit(i, st != WorkerState::kExiting, -1);
    } else {
      spawn(i);
    }
  }
  // Past the target: a record a predecessor was handing back to the rings when it died.
  for (uint32_t i = n; i < children_.size(); ++i)
    if (!holds_process(static_cast<WorkerState>(seg_.workers().record(i).state.load()))) release_local_queue(i);
}

bool Supervisor::adopt(uint32_t id) {
  Child& c = children_[id];
  WorkerRecord& rec = seg_.workers().record(id);
  const auto st = static_cast<WorkerState>(rec.state.load());
  if (!holds_process(st)) return false;
  uint64_t life = rec.life.load(std::memory_order_acquire);
  // Started by a supervisor that died before it (or the process) filled in the pid: fence
  // the record, so that such a process, if it runs, finds it may not and leaves.
  if (life_pid(life) == 0 &&
      rec.life.compare_exchange_strong(life, life_word(life_generation(life), kFencedPid), std::memory_order_acq_rel))
    return false;
  const uint32_t p = life_pid(life);
  if (p == 0 || p == kFencedPid || p > static_cast<uint32_t>(INT32_MAX)) return false;
  const auto pid = static_cast<pid_t>(p);
  const int fd = static_cast<int>(syscall(SYS_pidfd_open, pid, 0));
  if (fd < 0) return false;
  // The side that filled in the pid writes the start time just after: wait for it while
  // the process lives.
  uint64_t start = rec.start_time.load(std::memory_order_acquire);
  for (int i = 0; start == 0 && i < 1000; ++i) {
    pollfd pf{fd, POLLIN, 0};
    if (poll(&pf, 1, 1) > 0) break;  // it exited
    start = rec.start_time.load(std::memory_order_acquire);
  }
  if (start == 0 || Segment::process_start_time(pid) != start) {  // gone, or its pid reused
    close(fd);
    return false;
  }
  rec.pid.store(pid, std::memory_order_relaxed);
  c.pid = pid;
  c.pidfd = fd;
  c.start_time = 0;
  c.gen = rec.generation.load();
  c.active = true;
  c.stopping = false;
  counters_.adopted.fetch_add(1);
  return true;
}

void Supervisor::loop() {
  start_workers();
  {
    std::lock_guard<std::mutex> lock(mutex_);
    started_ = true;
  }
  started_cv_.notify_all();

  bool asked_to_stop = false;
  for (;;) {
    bool quitting = quit_.load(std::memory_order_acquire);
    if (quitting && !carry_out_stop(asked_to_stop)) break;
    poll_children(quitting);
    apply_commands(quitting);
    reap_watched();
    reap_unwatched();
    check_timeouts();
    run_recoveries();
    release_waiting();
  }
  finish_after_stop();
}

bool Supervisor::carry_out_stop(bool& asked_to_stop) {
  if (!asked_to_stop) {
    asked_to_stop = true;
    for (uint32_t i = 0; i < children_.size(); ++i) {
      if (children_[i].pid <= 0) continue;
      children_[i].stopping = true;
      seg_.workers().record(i).stop_request.store(1, std::memory_order_release);
      if (!graceful_.load()) signal_child(children_[i], SIGKILL);
    }
    seg_.tasks().wake_consumers();
  }
  bool any_alive = false;
  for (auto& c : children_) any_alive |= c.pid > 0;
  if (!any_alive) return false;
  if (monotonic_ns() > stop_deadline_ns_.load()) {
    for (auto& c : children_) signal_child(c, SIGKILL);
    // A worker we cannot watch (no pidfd) that still looks alive 2 s after its SIGKILL:
    // stop() must end all the same (a safety net; reap_unwatched already takes a pid
    // that shows another start time for a worker gone).
    if (monotonic_ns() > stop_deadline_ns_.load() + 2'000'000'000) {
      for (uint32_t id = 0; id < children_.size(); ++id)
        if (children_[id].pid > 0 && children_[id].pidfd < 0) on_exit(id, true, -1);
    }
  }
  return true;
}

void Supervisor::poll_children(bool quitting) {
  poll_fds_.clear();
  poll_ids_.clear();
  poll_fds_.push_back({event_fd_, POLLIN, 0});
  for (uint32_t i = 0; i < children_.size(); ++i) {
    if (children_[i].pid > 0 && children_[i].pidfd >= 0) {
      poll_fds_.push_back({children_[i].pidfd, POLLIN, 0});
      poll_ids_.push_back(i);
    }
  }
  bool unwatched = false;  // a worker without a pidfd: looked at every 10 ms instead
  for (auto& c : children_) unwatched |= c.pid > 0 && c.pidfd < 0;
  bool busy = quitting || unwatched || opts_.task_timeout_ns > 0 || !ring_recoveries_.empty() ||
              !publish_recoveries_.empty() || !releasing_.empty();
  int timeout_ms = busy ? 10 : 250;
  poll(poll_fds_.data(), poll_fds_.size(), timeout_ms);
  if (poll_fds_[0].revents & POLLIN) {
    uint64_t v;
    ssize_t rc = read(event_fd_, &v, sizeof v);
    (void)rc;
  }
}

void Supervisor::apply_commands(bool quitting) {
  std::deque<uint32_t> kills;
  std::deque<std::pair<uint32_t, uint64_t>> task_kills;
  bool rescale = false;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    kills.swap(kill_requests_);
    task_kills.swap(task_kills_);
    rescale = scale_pending_;
    scale_pending_ = false;
  }
  for (uint32_t id : kills) signal_child(children_[id], SIGKILL);
  // A persistent pool's clients ask through the records (Segment::request_kill).
  for (uint32_t id = 0; id < children_.size(); ++id)
    if (const uint64_t seq = seg_.workers().record(id).kill_request.exchange(0)) task_kills.emplace_back(id, seq);
  for (auto [id, seq] : task_kills) {
    // Only while it still runs that task (as check_timeouts does).
    Child& c = children_[id];
    WorkerRecord& rec = seg_.workers().record(id);
    if (c.pid <= 0 || rec.killed_seq.load() || rec.running_since_ns.load(std::memory_order_acquire) == 0 ||
        rec.running_seq.load(std::memory_order_acquire) != seq)
      continue;
    rec.killed_seq.store(seq);
    signal_child(c, SIGKILL);
    maybe_fault(seg_.header(), FaultStep::kSupervisorKilledWorker);
  }
  if (rescale && !quitting) {
    uint32_t n = target_.load();
    for (uint32_t i = 0; i < children_.size(); ++i) {
      Child& c = children_[i];
      if (i < n && !c.active && c.pid <= 0) spawn(i);
      if (i >= n && c.active && c.pid > 0) {
        c.stopping = true;
        seg_.workers().record(i).stop_request.store(1, std::memory_order_release);
      }
    }
    seg_.tasks().wake_consumers();
  }
}

void Supervisor::reap_watched() {
  for (size_t k = 1; k < poll_fds_.size(); ++k) {
    if (!(poll_fds_[k].revents & (POLLIN | POLLHUP | POLLERR))) continue;
    uint32_t id = poll_ids_[k - 1];
    Child& c = children_[id];
    int status = -1;
    if (opts_.children_are_ours) {
      pid_t r = waitpid(c.pid, &status, WNOHANG);
      if (r == 0) continue;  // not yet reapable
    }
    // Only a worker that announced it was leaving exited cleanly; any other exit while it
    // held (or could hold) tasks is a crash.
    auto st = static_cast<WorkerState>(seg_.workers().record(id).state.load());
    bool crashed = !(st == WorkerState::kExiting || st == WorkerState::kExited);
    on_exit(id, crashed, status);
  }
}

// A worker whose pidfd could not be opened: a fork server's child that died and was
// reaped before pidfd_open (a worker that fails at once), or a kernel without pidfd.
// Our own children are still reapable; another process's are gone once their pid no
// longer shows the start time seen at spawn (gone, or reused by another process).
void Supervisor::reap_unwatched() {
  for (uint32_t id = 0; id < children_.size(); ++id) {
    Child& c = children_[id];
    if (c.pid <= 0 || c.pidfd >= 0) continue;
    int status = -1;
    if (opts_.children_are_ours) {
      if (waitpid(c.pid, &status, WNOHANG) == 0) continue;
    } else if (still_ours(c)) {
      continue;
    }
    auto st = static_cast<WorkerState>(seg_.workers().record(id).state.load());
    on_exit(id, !(st == WorkerState::kExiting || st == WorkerState::kExited), status);
  }
}

// Every worker is gone: finish the recoveries that waited for them, then end what can
// no longer run.
void Supervisor::finish_after_stop() {
  for (auto& r : ring_recoveries_) r.wait.clear();
  for (auto& r : publish_recoveries_) r.wait.clear();
  run_recoveries();
  // Tasks left in a record whose replacement never came: cancelled, and every settled
  // result sent while the result ring has room.
  const WorkerTable& table = seg_.workers();
  for (uint32_t i = 0; i < children_.size(); ++i) {
    const uint32_t n = std::min(table.record(i).local_count.load(std::memory_order_acquire), table.batch);
    for (uint32_t j = 0; j < n; ++j) {
      if (!left_to_run(static_cast<LocalState>(table.entry(i, j).state.load()))) continue;
      TaskHeader th;
      std::memcpy(&th, table.entry_body(i, j), sizeof th);
      settle(i, j, th, ResultStatus::kCancelled);
    }
    try_release(i);
  }
  releasing_.clear();
}

}  // namespace mpop
