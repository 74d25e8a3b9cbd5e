// Producer: seq assignment, ring pushes, the pre-start backlog and its feeder thread.
#include "mpop/producer.hpp"

#include <chrono>
#include <cstring>

namespace mpop {

Producer::Producer(Segment& seg)
    : seg_(seg), ring_(seg.tasks()), pool_(seg.pool()), slot_size_(seg.config().slot.size),
      consumer_ring_(seg.results()) {}

Producer::Producer(Segment& seg, uint32_t client) : Producer(seg) {
  if (client >= seg.client_count())
    throw std::invalid_argument("mpop: client " + std::to_string(client) + " is out of range");
  next_seq_ = &seg.client(client).next_seq;
  windows_ = &seg.client(client).push;
  first_seq_ = next_seq_->load(std::memory_order_acquire);
  consumer_ring_ = seg.live_mailbox(client);
}

Producer::~Producer() {
  if (process_.inherited()) {
    abandon_inherited_thread(feeder_);
    return;
  }
  close();
  if (feeder_.joinable()) feeder_.join();
}

bool Producer::cancelled() const {
  return closed_.load(std::memory_order_acquire) ||
         seg_.header().shutdown.load(std::memory_order_acquire) != 0;
}

PushOutcome Producer::submit(TaskDraft& draft, bool blocking, int64_t deadline_ns) {
  if (cancelled()) return PushOutcome::kClosed;
  if (draft.header.encoding == ArgEncoding::kPooled && draft.stream_len > pool_.producer_cap_bytes())
    return PushOutcome::kTooLarge;
  if (!direct_.load(std::memory_order_acquire)) {
    std::unique_lock<std::mutex> lock(backlog_mutex_);
    if (!started_) {
      draft.header.seq = next_seq_->fetch_add(1, std::memory_order_relaxed);
      append_backlog(draft);
      return PushOutcome::kBacklog;
    }
    // Running, but the feeder is still moving the backlog: the queue is full for us.
    if (!blocking) return PushOutcome::kFull;
    auto ready = [this] { return direct_.load(std::memory_order_acquire) || cancelled(); };
    if (deadline_ns < 0) {
      backlog_cv_.wait(lock, ready);
    } else {
      int64_t left = deadline_ns - monotonic_ns();
      if (left <= 0 || !backlog_cv_.wait_for(lock, std::chrono::nanoseconds(left), ready))
        return PushOutcome::kFull;
    }
    if (cancelled()) return PushOutcome::kClosed;
  }
  return push_now(draft, blocking, deadline_ns);
}

PushOutcome Producer::push_now(TaskDraft& d, bool blocking, int64_t deadline_ns) {
  auto stop = [this] { return cancelled(); };
  if (d.header.encoding == ArgEncoding::kPooled) {
    const uint64_t cap = pool_.producer_cap_bytes();
    auto nudge = [this] { consumer_ring_.wake_consumers(); };
    uint64_t off = blocking ? pool_.alloc(d.stream_len, deadline_ns, stop, cap, ArgPool::kArgTag, nudge)
                            : pool_.try_alloc(d.stream_len, cap);
    if (!off) return cancelled() ? PushOutcome::kClosed : PushOutcome::kFull;
    d.copy_stream(pool_.data(off));
    d.header.pool_ref = off;
  }
  // The seq is taken only once the cell is ours, so a failed attempt leaves no gap.
  auto fill = [&](uint32_t, void* body) {
    auto* b = static_cast<uint8_t*>(body);
    d.header.seq = next_seq_->fetch_add(1, std::memory_order_relaxed);
    std::memcpy(b, &d.header, sizeof d.header);
    std::memcpy(b + sizeof d.header, d.slot, slot_size_);
  };
  bool ok = blocking ? ring_.push(fill, deadline_ns, stop, windows_, fault_hook())
                     : ring_.try_push_from(windows_, 1, fill, fault_hook()) == 1;
  if (!ok) {
    if (d.header.pool_ref) pool_.free(d.header.pool_ref, d.stream_len);
    d.header.pool_ref = 0;
    return cancelled() ? PushOutcome::kClosed : PushOutcome::kFull;
  }
  // A cell claimed alone (a map chunk) is not taken along by the consumer already on its
  // way to an earlier cell, for whom the push may have skipped the wake (wake_for_push):
  // wake another now rather than once that one has claimed.
  if (d.header.flags & kClaimAlone) ring_.wake_if_more();
  return PushOutcome::kRing;
}

void Producer::append_backlog(const TaskDraft& d) {
  uint32_t stream_len = d.header.encoding == ArgEncoding::kPooled ? d.stream_len : 0;
  size_t need = 8 + sizeof(TaskHeader) + d.slot_used + stream_len;
  if (chunks_.empty() || chunks_.back()->bytes.size() + need > chunks_.back()->bytes.capacity()) {
    auto c = std::make_unique<Chunk>();
    c->bytes.reserve(need > kChunkBytes ? need : kChunkBytes);
    chunks_.push_back(std::move(c));
  }
  auto& b = chunks_.back()->bytes;
  size_t at = b.size();
  b.resize(at + need);
  uint8_t* p = b.data() + at;
  std::memcpy(p, &d.slot_used, 4);
  std::memcpy(p + 4, &stream_len, 4);
  std::memcpy(p + 8, &d.header, sizeof d.header);
  std::memcpy(p + 8 + sizeof d.header, d.slot, d.slot_used);
  if (stream_len) d.copy_stream(p + 8 + sizeof d.header + d.slot_used);
  backlog_count_.fetch_add(1, std::memory_order_release);
}

void Producer::start_feeding() {
  std::lock_guard<std::mutex> lock(backlog_mutex_);
  started_ = true;
  if (feeding_ || direct_.load()) return;
  if (feeder_.joinable()) feeder_.join();
  if (backlog_count_.load() == 0) {
    direct_.store(true, std::memory_order_release);
    return;
  }
  feeding_ = true;
  feeder_ = std::thread([this] { feed_loop(); });
}

bool Producer::pause_feeding() {
  std::lock_guard<std::mutex> lock(backlog_mutex_);
  if (feeding_ || backlog_count_.load() != 0) return false;
  started_ = false;
  direct_.store(false, std::memory_order_release);
  return true;
}

void Producer::close() {
  closed_.store(true, std::memory_order_release);
  {
    std::lock_guard<std::mutex> lock(backlog_mutex_);
    backlog_cv_.notify_all();
  }
  ring_.wake_producers();
  if (pool_.valid()) pool_.control().freed.notify_all();
}

// Moves backlog entries into the ring in order, batch by batch, sleeping while the ring or
// the pool is full. When the backlog runs dry, new tasks go straight to the ring.
void Producer::feed_loop() {
  std::vector<uint8_t> staging;
  for (;;) {
    std::unique_lock<std::mutex> lock(backlog_mutex_);
    while (!chunks_.empty() && chunks_.front()->read >= chunks_.front()->bytes.size()) {
      if (chunks_.size() == 1) {
        chunks_.front()->bytes.clear();
        chunks_.front()->read = 0;
        break;
      }
      chunks_.pop_front();
    }
    if (backlog_count_.load() == 0 || cancelled()) {
      if (!cancelled()) direct_.store(true, std::memory_order_release);
      feeding_ = false;
      backlog_cv_.notify_all();  // producers waiting for the backlog to drain
      return;
    }
    Chunk& c = *chunks_.front();
    const uint8_t* p = c.bytes.data() + c.read;
    uint32_t slot_used, stream_len;
    std::memcpy(&slot_used, p, 4);
    std::memcpy(&stream_len, p + 4, 4);
    TaskHeader h;
    std::memcpy(&h, p + 8, sizeof h);
    const uint8_t* slot = p + 8 + sizeof h;
    size_t entry = 8 + sizeof h + slot_used + stream_len;

    if (h.encoding == ArgEncoding::kPooled) {
      uint64_t off = pool_.try_alloc(stream_len, pool_.producer_cap_bytes());
      if (!off) {
        lock.unlock();
        // Sleep until something is freed (or briefly, since a free too small for us also
        // wakes us), then look again.
        uint32_t key = pool_.control().freed.prepare_wait();
        if (!cancelled()) {
          pool_.control().starving.fetch_add(1, std::memory_order_seq_cst);
          consumer_ring_.wake_consumers();  // see PoolControl::starving
          pool_.control().freed.commit_wait(key, 20'000'000);
          pool_.control().starving.fetch_sub(1, std::memory_order_relaxed);
        } else {
          pool_.control().freed.cancel_wait();
        }
        continue;
      }
      std::memcpy(pool_.data(off), slot + slot_used, stream_len);
      h.pool_ref = off;
    }
    uint32_t pushed = ring_.try_push_from(
        windows_, 1,
        [&](uint32_t, void* body) {
          auto* b = static_cast<uint8_t*>(body);
          std::memcpy(b, &h, sizeof h);
          std::memcpy(b + sizeof h, slot, slot_used);
          std::memset(b + sizeof h + slot_used, 0, slot_size_ - slot_used);
        },
        fault_hook());
    if (pushed) {
      c.read += entry;
      backlog_count_.fetch_sub(1, std::memory_order_release);
      continue;
    }
    if (h.pool_ref) pool_.free(h.pool_ref, stream_len);
    lock.unlock();
    wait_until(
        ring_.control().not_full, [&] { return ring_.has_room() || cancelled(); },
        monotonic_ns() + 100'000'000);
  }
}

}  // namespace mpop
