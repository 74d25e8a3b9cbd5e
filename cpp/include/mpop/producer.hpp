// Producer: the owner's side of the task ring. Gives each task its unique seq, pushes it
// into the ring (pooled streams into the argument pool first), or, before the workers run,
// appends it to an in-process backlog that a feeder thread moves into the ring in order.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "mpop/codec.hpp"
#include "mpop/fault.hpp"
#include "mpop/segment.hpp"

namespace mpop {

// A task as the caller built it: the header (seq is assigned here), the full slot bytes,
// and for ArgEncoding::kPooled the stream to copy into the pool: `stream` with `pieces`
// (large data the caller keeps alive, e.g. an array's) spliced in, stream_len bytes in all.
struct TaskDraft {
  TaskHeader header;
  const uint8_t* slot = nullptr;
  uint32_t slot_used = 0;  // bytes of `slot` that matter (the rest is zero)
  const uint8_t* stream = nullptr;
  uint32_t stream_len = 0;
  const std::vector<ExternalPiece>* pieces = nullptr;

  void copy_stream(uint8_t* dst) const {
    if (!pieces || pieces->empty()) {
      std::memcpy(dst, stream, stream_len);
      return;
    }
    size_t external = 0;
    for (const ExternalPiece& x : *pieces) external += x.len;
    gather(stream, stream_len - external, *pieces, dst);
  }
};

enum class PushOutcome { kRing, kBacklog, kFull, kClosed, kTooLarge };

class Producer {
 public:
  explicit Producer(Segment& seg);
  // A persistent pool's client `client`: its seqs come from the client record's counter,
  // and the pool's allocators it starves are nudged through its live mailbox.
  Producer(Segment& seg, uint32_t client);
  ~Producer();
  Producer(const Producer&) = delete;
  Producer& operator=(const Producer&) = delete;

  // Delivers the task and sets draft.header.seq (only when it was accepted). Before the
  // workers start it always goes to the backlog. Once they run, it waits (if `blocking`,
  // until `deadline_ns`, monotonic, < 0 = forever) for the backlog to drain and the ring
  // to have room, exactly as for a full ring.
  PushOutcome submit(TaskDraft& draft, bool blocking, int64_t deadline_ns);

  // Starts moving the backlog into the ring and sending new tasks straight to the ring.
  void start_feeding();
  // Sends new tasks to the backlog again (the workers are about to stop). The backlog and
  // ring must be empty; returns false if not.
  bool pause_feeding();
  // Fails every blocked and future submit (shutdown).
  void close();
  bool closed() const { return closed_.load(std::memory_order_acquire); }

  uint64_t backlog_size() const { return backlog_count_.load(std::memory_order_acquire); }
  // Tasks this producer gave a seq, and the last seq it gave (first_seq() - 1: none yet).
  uint64_t submitted() const { return last_seq() + 1 - first_seq_; }
  uint64_t last_seq() const { return next_seq_->load(std::memory_order_relaxed) - 1; }
  uint64_t first_seq() const { return first_seq_; }
  // Removes every task still in the backlog, calling sink(const TaskHeader&) for each.
  template <class Sink>
  uint64_t drop_backlog(Sink&& sink);

 private:
  struct Chunk {
    std::vector<uint8_t> bytes;
    size_t read = 0;
  };
  static constexpr size_t kChunkBytes = 4 << 20;

  PushOutcome push_now(TaskDraft& draft, bool blocking, int64_t deadline_ns);
  void append_backlog(const TaskDraft& draft);
  void feed_loop();
  bool cancelled() const;
  // A client dies here when a test arms kClientPushReserved (see fault.hpp).
  auto fault_hook() {
    return [this](RingPoint p) {
      if (p == RingPoint::kPushReserved) maybe_fault(seg_.header(), FaultStep::kClientPushReserved);
    };
  }

  Segment& seg_;
  TaskRing ring_;
  ArgPool pool_;
  uint32_t slot_size_;
  std::atomic<uint64_t> own_seq_{1};
  std::atomic<uint64_t>* next_seq_ = &own_seq_;  // own_seq_, or a client record's
  WindowSet* windows_ = nullptr;  // a client's push windows (it can die mid-push)
  uint64_t first_seq_ = 1;
  TaskRing consumer_ring_;  // the ring whose consumer frees results' pool blocks
  std::atomic<bool> closed_{false};

  // Backlog: entries [u32 slot_used | u32 stream_len | TaskHeader | slot bytes | stream].
  std::mutex backlog_mutex_;
  std::condition_variable backlog_cv_;
  std::deque<std::unique_ptr<Chunk>> chunks_;
  std::atomic<uint64_t> backlog_count_{0};
  std::atomic<bool> direct_{false};  // true: tasks go straight to the ring
  bool feeding_ = false;             // guarded by backlog_mutex_
  bool started_ = false;             // guarded by backlog_mutex_: workers are taking tasks
  std::thread feeder_;
  ProcessOwned process_;  // in a fork() child, the destructor leaves the parent's ring alone
};

template <class Sink>
uint64_t Producer::drop_backlog(Sink&& sink) {
  std::lock_guard<std::mutex> lock(backlog_mutex_);
  uint64_t n = 0;
  for (auto& c : chunks_) {
    while (c->read < c->bytes.size()) {
      const uint8_t* p = c->bytes.data() + c->read;
      uint32_t slot_used, stream_len;
      std::memcpy(&slot_used, p, 4);
      std::memcpy(&stream_len, p + 4, 4);
      TaskHeader h;
      std::memcpy(&h, p + 8, sizeof h);
      sink(static_cast<const TaskHeader&>(h), p + 8 + sizeof h);
      c->read += 8 + sizeof h + slot_used + stream_len;
      ++n;
    }
  }
  chunks_.clear();
  backlog_count_.store(0, std::memory_order_release);
  return n;
}

}  // namespace mpop
