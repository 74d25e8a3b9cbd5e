// Supervisor: a native thread in the owner process that spawns the workers (so that their
// parent-death signal is tied to a thread that lives as long as the app), watches them with
// pidfds, recovers exactly what a dead worker held, enforces task_timeout, respawns, and
// applies scale() and stop().
#pragma once

#include <poll.h>
#include <sys/types.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "mpop/segment.hpp"

namespace mpop {

struct SupervisorOptions {
  uint32_t workers = 1;
  uint32_t max_retries = 1;
  int64_t task_timeout_ns = 0;  // 0 = none
  // How to start worker `id` (generation `gen`); returns its pid or -1. Runs on the
  // supervisor thread. Set by the bindings per start method.
  std::function<pid_t(uint32_t id, uint32_t gen)> spawn;
  bool children_are_ours = true;  // false when another process (a forkserver) reaps them
  // A new supervisor of a persistent pool: the workers its records name that still run
  // (same pid and start time) are adopted, those that died meanwhile are recovered and
  // replaced, instead of starting every worker afresh.
  bool adopt = false;
};

struct SupervisorCounters {
  std::atomic<uint64_t> crashes{0};
  std::atomic<uint64_t> retries{0};
  std::atomic<uint64_t> timeouts{0};
  std::atomic<uint64_t> crashed_tasks{0};
  std::atomic<uint64_t> recovered_from_ring{0};
  std::atomic<uint64_t> spawn_failures{0};
  std::atomic<uint64_t> pool_reclaimed_bytes{0};  // pool blocks a dead worker held untracked
  std::atomic<uint64_t> adopted{0};  // live workers a new supervisor took over
};

class Supervisor {
 public:
  Supervisor(Segment& seg, SupervisorOptions opts);
  ~Supervisor();
  Supervisor(const Supervisor&) = delete;
  Supervisor& operator=(const Supervisor&) = delete;

  // Starts the thread and spawns the workers from it; returns once they are spawned
  // (not necessarily ready). Throws if a worker could not be spawned.
  void start();
  // Asks every worker to leave after its local queue (graceful) or kills them; waits up to
  // timeout_ns for them to exit, kills stragglers, and ends the thread.
  void stop(bool graceful, int64_t timeout_ns);
  // stop() in two steps, for a caller that must stay responsive while it waits: the
  // request (called again with graceful = false, it kills what is left at once), then the
  // wait until the monotonic deadline (< 0 = none); true once the thread has ended.
  void begin_stop(bool graceful, int64_t timeout_ns);
  bool wait_stopped(int64_t deadline_ns);
  void scale(uint32_t n);
  bool kill_worker(uint32_t id);
  // Kills the worker running task `seq`, which then ends cancelled (not retried), and
  // starts a replacement. False when no worker runs it now.
  bool kill_task(uint64_t seq);
  bool running() const { return thread_.joinable(); }
  uint32_t live_workers() const;
  const SupervisorCounters& counters() const { return counters_; }
  std::string last_error() const;

 private:
  struct Child {
    pid_t pid = -1;
    int pidfd = -1;
    // Without a pidfd, the /proc start time seen at spawn: the process is still ours only
    // while its pid shows that same start time (0: it was already gone).
    uint64_t start_time = 0;
    bool active = false;      // part of the target set
    bool stopping = false;    // asked to stop; its exit is not a crash
    uint32_t gen = 0;
    uint32_t start_deaths = 0;   // consecutive deaths before reaching the loop
    bool resume = false;         // its replacement runs what it left in its local queue
    uint32_t recoveries = 0;     // its window recoveries still waiting (run_recoveries)
  };
  struct PendingRingRecovery {
    uint32_t worker;
    uint64_t below;                                  // dequeue counter at the death
    std::vector<std::pair<uint32_t, uint64_t>> wait;  // live workers and their claim epochs then
  };
  struct PendingPublishRecovery {
    uint32_t worker;
    uint64_t pos;
    std::vector<std::pair<uint32_t, uint64_t>> wait;
    bool of_crash = true;  // part of on_crash's recovery (else of a death during start-up:
                           // only the cell is voided, the record is a new process's by then)
  };

  // What a dead worker had published of the task it was running (see what_it_published).
  struct Publication {
    uint64_t result_seq = 0;  // the task its last recorded result is for
    bool in_window = false;   // it died inside its publication window
    bool window_out = false;  // and its cell there was already published
    bool published = false;   // the result of result_seq is out
  };

  // The thread: spawn, then each round the steps below, in this order, until a stop finds
  // every worker gone.
  void loop();
  // Asks every worker to stop (once), kills them all past the stop's deadline; false once
  // every worker is gone.
  bool carry_out_stop(bool& asked_to_stop);
  // Waits (10 ms when there is work pending or a stop under way, else 250 ms) for a
  // child's pidfd or a command's wake-up.
  void poll_children(bool quitting);
  // kill_worker requests and scale().
  void apply_commands(bool quitting);
  // The children whose pidfd turned readable in poll_children, and those without one.
  void reap_watched();
  void reap_unwatched();
  void finish_after_stop();

  void spawn(uint32_t id);
  // adopt: takes over the live worker of record `id` (true), or leaves it to on_exit.
  bool adopt(uint32_t id);
  void start_workers();
  // exit: the wait status, or -1 when unknown (not our child).
  void on_exit(uint32_t id, bool crashed, int exit);
  // on_exit's cases: a worker that died before it took work, and one that crashed (or was
  // killed for task_timeout) and whose tasks, claim and publication window are recovered.
  void on_start_death(uint32_t id, int exit);
  void on_crash(uint32_t id);
  // Still part of the target set, and no stop under way: a dead worker gets a successor.
  bool still_wanted(const Child& c) const;
  Publication what_it_published(const WorkerRecord& rec) const;
  // Settles each task of a dead (or recycled) worker's local queue in place: the ones to
  // run again stay pending there, the others kSettled with their result's status; its
  // replacement runs and posts them, or, when none comes, release_local_queue sends them
  // on. Every step leaves the record so that a new supervisor can redo the recovery from
  // it; nothing waits in the supervisor's memory.
  void recover_local_queue(uint32_t id, const Publication& pub, bool cancel);
  void recover_local_entry(uint32_t id, uint32_t j, const Publication& pub, bool cancel);
  // A task the dead worker was running and whose result is not out: cancelled, timed out,
  // crashed for good, or to run again with one more attempt.
  void settle_interrupted_task(uint32_t id, uint32_t j, TaskHeader th, uint8_t* body, bool cancel);
  // The recoveries of its claim window (ring cells claimed, not released: into its local
  // queue) and publication window (a result cell reserved, not published: voided), run by
  // run_recoveries once every worker that was inside such a window at the death has left
  // it. The windows stay raised in the record until then.
  void recover_windows(uint32_t id, const Publication& pub);
  // The end of a dead worker's recovery: its replacement, or its pending tasks to the ring.
  void finish_recovery(uint32_t id);
  // A record that gets no replacement: its pending tasks go back to the task ring and its
  // settled results to the result ring, straight from the local queue, each marked done
  // after its push. What finds no room waits there (releasing_), retried every round.
  void release_local_queue(uint32_t id);
  bool try_release(uint32_t id);
  void release_waiting();
  // The entry's decided result: kSettled with `status` (attempts as in th).
  void settle(uint32_t id, uint32_t j, const TaskHeader& th, ResultStatus status);
  bool try_post_settled(uint32_t id, uint32_t j);
  // Frees the pooled result block a dead worker recorded (once: the record forgets it first).
  void free_result_block(WorkerRecord& rec);
  // Whether a child without a pidfd that another process reaps is still the process we
  // spawned (its pid not reused since), and a signal that reaches only that process.
  bool still_ours(const Child& c) const;
  void signal_child(const Child& c, int sig);
  void check_timeouts();
  void run_recoveries();
  std::vector<std::pair<uint32_t, uint64_t>> claim_snapshot(uint32_t except, bool publish) const;
  bool snapshot_passed(const std::vector<std::pair<uint32_t, uint64_t>>& snap, bool publish) const;
  void wake();
  void set_error(const std::string& e);

  Segment& seg_;
  SupervisorOptions opts_;
  SupervisorCounters counters_;
  std::vector<Child> children_;
  std::atomic<uint32_t> target_{0};
  std::atomic<bool> quit_{false};
  std::atomic<bool> graceful_{true};
  std::atomic<int64_t> stop_deadline_ns_{0};
  int event_fd_ = -1;
  std::thread thread_;
  ProcessOwned process_;  // in a fork() child, the destructor leaves the parent's workers alone

  mutable std::mutex mutex_;  // commands and errors from other threads
  std::deque<uint32_t> kill_requests_;
  std::deque<std::pair<uint32_t, uint64_t>> task_kills_;  // kill_task: (worker, seq)
  bool scale_pending_ = false;
  bool started_ = false;
  std::condition_variable started_cv_;  // start() waits on the first spawn round
  bool loop_done_ = false;              // guarded by mutex_: the thread has left loop()
  std::condition_variable loop_done_cv_;
  std::string error_;
  std::atomic<int> spawned_round_{0};

  std::vector<uint32_t> releasing_;  // records whose local queue waits for ring room
  std::vector<PendingRingRecovery> ring_recoveries_;
  std::vector<PendingPublishRecovery> publish_recoveries_;
  std::vector<pollfd> poll_fds_;    // poll_children's: the eventfd, then each watched pidfd
  std::vector<uint32_t> poll_ids_;  // the worker of each pidfd in poll_fds_[1..]
};

}  // namespace mpop
