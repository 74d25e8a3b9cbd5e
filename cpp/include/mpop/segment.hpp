// Segment: the one shared-memory segment of an app (created 0600 with a random name by the
// owner, attached by workers) and its header, which fixes the layout of everything in it:
// [header | registry log | task ring | worker records | result ring | argument pool].
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>

#include "mpop/arg_pool.hpp"
#include "mpop/cancel_table.hpp"
#include "mpop/process_owned.hpp"
#include "mpop/result_ring.hpp"
#include "mpop/slot_layout.hpp"
#include "mpop/task_ring.hpp"
#include "mpop/worker_record.hpp"

namespace mpop {

constexpr uint64_t kSegmentMagic = 0x31504f504d5f5f00ULL;  // "\0__MPOP1"
constexpr uint32_t kLayoutVersion = 5;

// What the owner asks for; everything else is derived.
struct SegmentConfig {
  SlotLayout slot;
  uint32_t queue_slots = 4096;
  uint32_t result_slots = 4096;
  uint32_t max_workers = 1;
  uint32_t batch_size = 16;
  uint64_t pool_bytes = 64ull << 20;
  uint64_t registry_bytes = 4ull << 20;
  // Behaviour flags the workers read.
  uint32_t debug = 0;
  uint32_t max_performance = 0;
  int64_t debug_delay_ns = 0;
  uint64_t max_tasks_per_worker = 0;  // 0 = unlimited
  // A worker whose resident memory exceeds this after a task is recycled (0 = no cap).
  uint64_t max_worker_memory = 0;
};

struct alignas(kCacheLine) SegmentHeader {
  uint64_t magic;
  uint32_t layout_version;
  uint32_t task_stride;
  SegmentConfig config;
  uint64_t registry_off, ring_off, workers_off, results_off, pool_off, total_bytes;
  uint32_t worker_stride, entry_stride;
  int32_t owner_pid;
  uint32_t supervised;  // 1: a persistent pool's supervisor process owns it (take_ownership)
  uint64_t owner_start_time;  // /proc start time: a pid-reuse-proof identity of the owner
  char name[128];

  alignas(kCacheLine) std::atomic<uint32_t> shutdown{0};   // workers leave when set
  std::atomic<uint32_t> attached{0};                        // processes mapping the segment
  std::atomic<uint32_t> owner_released{0};  // the owner's attachment was dropped (by it, or
                                            // by a worker that found the owner dead)
  std::atomic<uint64_t> registry_len{0};                    // bytes of registry log written
  // Bumped after a handler was registered again under its fn_id (a later record in the
  // log replaces an earlier one): workers then drop the handlers they loaded.
  std::atomic<uint64_t> registry_epoch{0};
  // Tasks with a seq below this that have not started are cancelled by the worker that
  // holds them (shutdown(cancel_pending=True) reaches into local queues this way).
  std::atomic<uint64_t> cancel_below{0};

  // Queued tasks the owner cancelled (future.cancel()).
  alignas(kCacheLine) CancelTable cancels;

  // Test-only fault injection: the next worker to reach step `fault_step` for the
  // `fault_countdown`-th time SIGKILLs itself (see FaultStep in worker_loop.hpp).
  alignas(kCacheLine) std::atomic<uint32_t> fault_step{0};
  std::atomic<uint32_t> fault_countdown{0};
};

// Thrown when a process attaches to a segment that is not an mpop segment of this layout.
struct LayoutMismatch : std::runtime_error {
  using std::runtime_error::runtime_error;
};

class Segment {
 public:
  // Creates a new segment exclusively (mode 0600). `prefix` starts the name; 64 random bits
  // follow it.
  static std::unique_ptr<Segment> create(const std::string& prefix, const SegmentConfig& cfg);
  // Maps an existing segment and checks its magic, layout version and geometry.
  static std::unique_ptr<Segment> attach(const std::string& name);
  static bool remove(const std::string& name);

  ~Segment();
  Segment(const Segment&) = delete;
  Segment& operator=(const Segment&) = delete;

  const std::string& name() const { return name_; }
  SegmentHeader& header() const { return *header_; }
  const SegmentConfig& config() const { return header_->config; }
  uint8_t* base() const { return base_; }
  uint64_t size() const { return size_; }

  TaskRing& tasks() { return tasks_; }
  TaskRing& results() { return results_; }
  ArgPool& pool() { return pool_; }
  const WorkerTable& workers() const { return workers_; }
  uint8_t* registry() const { return base_ + header_->registry_off; }

  // Marks the segment for removal by the last process out (see leave()).
  void set_unlink_on_close(bool v) { unlink_on_close_ = v; }
  // Drops this process's attachment; returns the number still attached. A worker passes
  // owner_dead when the owner died without leaving, and drops the owner's share too, so
  // that the last process out removes the segment. In a fork() child of the process that
  // mapped it, it only forgets the mapping: the attachment is the parent's.
  uint32_t leave(bool owner_dead = false);

  static uint64_t process_start_time(int pid);  // 0 if the process does not exist

  // The owner's cancellation of the task `seq`: true when it will never run (its final
  // result comes as kCancelled), false when it may have started or could not be found
  // waiting (still being claimed, being recovered after a crash) or its CancelTable cell
  // is in use. A true result must be followed by cancels.release(seq) once the task's
  // final result is in. From the owner's process only.
  bool request_cancel(uint64_t seq);
  // Whether `seq` is seen waiting: unclaimed in the task ring, or pending in a local queue.
  bool task_waiting(uint64_t seq) const;

 private:
  Segment() = default;
  void bind_views();

  std::string name_;
  uint8_t* base_ = nullptr;
  uint64_t size_ = 0;
  SegmentHeader* header_ = nullptr;
  TaskRing tasks_;
  TaskRing results_;
  ArgPool pool_;
  WorkerTable workers_;
  std::shared_ptr<void> region_;  // the Boost mapped_region
  bool left_ = false;
  bool unlink_on_close_ = false;
  ProcessOwned process_;
};

}  // namespace mpop
