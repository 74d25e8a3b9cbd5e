// Segment: the one shared-memory segment of an app (created 0600 with a random name by the
// owner, attached by workers) and its header, which fixes the layout of everything in it:
// [header | registry log | task ring | worker records | result ring | argument pool |
//  client records with their mailboxes (persistent pools only)].
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "mpop/arg_pool.hpp"
#include "mpop/cancel_table.hpp"
#include "mpop/process_owned.hpp"
#include "mpop/result_ring.hpp"
#include "mpop/slot_layout.hpp"
#include "mpop/task_ring.hpp"
#include "mpop/worker_record.hpp"

namespace mpop {

constexpr uint64_t kSegmentMagic = 0x31504f504d5f5f00ULL;  // "\0__MPOP1"
constexpr uint32_t kLayoutVersion = 9;

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
  // Client processes that may be attached at once (a persistent pool's; 0 = the creator
  // drains the result ring itself), and the cells of each client's two mailboxes.
  uint32_t max_clients = 0;
  uint32_t client_slots = 0;
  // A persistent pool's workers outlive its supervisor process this long, waiting for a new
  // one to adopt them (0: they leave as soon as the owner dies).
  int64_t orphan_timeout_ns = 0;
};

// One attached client of a persistent pool (its handle in some process) and, after it, its
// two mailboxes: rings of result records (kResultStride) that the supervisor process
// fills from the result ring (Forwarder). `live` gets the results of submitted tasks and
// map chunks, side messages, and an acknowledgement (kAck) for each result put in `plain`,
// which holds the results of enqueue()d tasks until results() or run() hands them out.
// A client's task seqs are its own: kClientSeqBits bits above base(index).
enum class ClientState : uint32_t {
  kFree = 0,      // nobody's
  kAttached = 1,  // a live handle uses it (pid, start_time)
  kGone = 2,      // its handle detached or its process died: the next attach adopts it
  kClaiming = 3,  // being taken: pid and start_time not yet written
};
// ClientRecord::lease: the state in its low 2 bits, above them a count of the handles that
// took the record, so that one compare-and-swap on it acts on the record as it was read
// (a reaper that found a dead handle never frees the record a new handle took meanwhile).
inline ClientState lease_state(uint32_t lease) { return static_cast<ClientState>(lease & 3); }
inline uint32_t lease_generation(uint32_t lease) { return lease >> 2; }
inline uint32_t make_lease(uint32_t generation, ClientState s) { return generation << 2 | static_cast<uint32_t>(s); }

constexpr uint32_t kClientSeqBits = 40;
inline uint64_t client_seq_base(uint32_t index) { return uint64_t{index + 1} << kClientSeqBits; }
// The client a task seq belongs to, or -1 for a seq of the creator's own (in-process) space.
inline int64_t client_of_seq(uint64_t seq) { return static_cast<int64_t>(seq >> kClientSeqBits) - 1; }

struct alignas(kCacheLine) ClientRecord {
  std::atomic<uint32_t> lease{0};  // state and generation (see make_lease)
  std::atomic<int32_t> pid{0};
  std::atomic<uint64_t> start_time{0};  // /proc start time of pid
  // The client (index + 1) that took over this gone one's results, 0 = none.
  std::atomic<uint32_t> adopter{0};
  // The producer's seq counter: the last seq issued is next_seq - 1. It carries on across
  // the handles that take the record in turn, so that no seq is ever issued twice.
  alignas(kCacheLine) std::atomic<uint64_t> next_seq{0};
  // Written by the forwarder: every seq below this has its result in a mailbox.
  alignas(kCacheLine) std::atomic<uint64_t> complete_below{0};
  std::atomic<uint64_t> forwarded{0};  // results put in this client's mailboxes
  // Its tasks with a seq below this that have not started are cancelled by the worker that
  // takes them (the client's cancel_queued: its own tasks only, the ring left as it is).
  std::atomic<uint64_t> cancel_below{0};
  // The client's pushes into the task ring (its tasks) and the result ring (the ends of
  // tasks it cancelled before they were queued): a client killed in the middle of one
  // leaves a trace of the cell it reserved (see Segment::void_abandoned_push).
  WindowSet push;
  WindowSet post;
};

struct alignas(kCacheLine) SegmentHeader {
  uint64_t magic;
  uint32_t layout_version;
  uint32_t task_stride;
  SegmentConfig config;
  uint64_t registry_off, ring_off, workers_off, results_off, pool_off, clients_off, total_bytes;
  uint32_t worker_stride, entry_stride, client_stride, reserved1;
  int32_t owner_pid;
  uint32_t supervised;  // 1: a persistent pool's supervisor process owns it (take_ownership)
  uint64_t owner_start_time;  // /proc start time: a pid-reuse-proof identity of the owner
  char name[128];

  alignas(kCacheLine) std::atomic<uint32_t> shutdown{0};   // workers leave when set
  std::atomic<uint32_t> attached{0};                        // processes mapping the segment
  std::atomic<uint32_t> owner_released{0};  // the owner's attachment was dropped (by it, or
                                            // by a worker that found the owner dead)
  std::atomic<uint64_t> registry_len{0};                    // bytes of registry log written
  std::atomic<uint64_t> registry_reserved{0};  // bytes claimed by writers (>= registry_len)
  // Bumped after a handler was registered again under its fn_id (a later record in the
  // log replaces an earlier one): workers then drop the handlers they loaded.
  std::atomic<uint64_t> registry_epoch{0};
  // Tasks with a seq below this that have not started are cancelled by the worker that
  // holds them (shutdown(cancel_pending=True) reaches into local queues this way).
  std::atomic<uint64_t> cancel_below{0};
  // A persistent pool's forwarder: the end of the batch of result-ring positions it is
  // putting in mailboxes (it takes them from the ring only after). A new forwarder that
  // finds the ring's head below this forwards those again, marked kRecordReplayed.
  std::atomic<uint64_t> forward_end{0};

  // Queued tasks the owner cancelled (future.cancel()).
  alignas(kCacheLine) CancelTable cancels;

  // A persistent pool's supervisor's pushes: tasks back into the task ring and results it
  // decided into the result ring (see Supervisor::release_local_queue). A new supervisor
  // voids the cell its predecessor reserved and never wrote.
  ClaimState supervisor_push;
  ClaimState supervisor_post;

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
  uint32_t client_count() const { return header_->config.max_clients; }
  ClientRecord& client(uint32_t i) const {
    return *reinterpret_cast<ClientRecord*>(base_ + header_->clients_off + uint64_t{i} * header_->client_stride);
  }
  // Client i's mailboxes (see ClientRecord).
  TaskRing live_mailbox(uint32_t i) const { return TaskRing::attach(mailbox_mem(i, 0)); }
  TaskRing plain_mailbox(uint32_t i) const { return TaskRing::attach(mailbox_mem(i, 1)); }
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
  // A persistent pool's client's kill_task: asks the supervisor process (through the
  // record of the worker running `seq`) to kill that worker and end the task cancelled.
  // False when no worker runs it now.
  bool request_kill(uint64_t seq);

  // A producer that can die pushes through a window (ClaimState: a client's push and post,
  // a worker's publish, the supervisor's push and post). After its death, its window `w`
  // tells which cell it may have reserved and not written: that cell, still reserved and
  // unwritten, gets a filler (a void task, or a kVoid result) so that the ring's consumers
  // move past it, unless the dead one may have died before its reservation and another
  // producer's raised window shows the same cell (then it is that one's: it publishes it,
  // or its own recovery does). The window is lowered after.
  void void_abandoned_push(ClaimState& w, bool result_ring);
  // Whether client i's tasks below its cancel horizon, or below the pool's, include `seq`.
  bool cancelled_by_horizon(uint64_t seq) const {
    if (seq < header_->cancel_below.load(std::memory_order_relaxed)) return true;
    const int64_t c = client_of_seq(seq);
    return c >= 0 && c < client_count() && seq < client(static_cast<uint32_t>(c)).cancel_below.load(std::memory_order_relaxed);
  }

 private:
  Segment() = default;
  void bind_views();
  // The windows of every producer of the task ring (result_ring false) or the result ring.
  std::vector<const ClaimState*> push_windows(bool result_ring) const;
  uint8_t* mailbox_mem(uint32_t i, uint32_t which) const {
    return reinterpret_cast<uint8_t*>(&client(i)) + round_up(sizeof(ClientRecord), kCacheLine) +
           which * TaskRing::bytes_needed(header_->config.client_slots, kResultStride);
  }

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
