// Collector: the owner's side of the result ring. Copies result records out in batches,
// keeps exactly the first result of every task (a task may run twice after a crash), and
// frees the argument-pool blocks a task and its result used.
#pragma once

#include <algorithm>
#include <atomic>
#include <bit>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "mpop/segment.hpp"
#include "mpop/side_channel.hpp"

namespace mpop {

// Which task seqs have their final result. Seqs below `base` all do; a bit per seq above,
// in a circular bitmap that grows only when the spread of seqs in flight does, so the
// steady state allocates nothing. Used by the one draining thread only.
class CompletionWindow {
 public:
  explicit CompletionWindow(uint64_t base = 1) : base_(base), words_(64, 0) {}

  // Marks `seq` complete; returns false if it already was.
  bool mark(uint64_t seq) {
    if (seq < base_) return false;
    uint64_t idx = seq - base_;
    while (idx / 64 >= words_.size()) grow();
    uint64_t& w = word(idx / 64);
    uint64_t bit = uint64_t{1} << (idx % 64);
    if (w & bit) return false;
    w |= bit;
    while (words_[head_] == ~uint64_t{0}) {
      words_[head_] = 0;
      head_ = (head_ + 1) & (words_.size() - 1);
      base_ += 64;
    }
    return true;
  }
  bool contains(uint64_t seq) const {
    if (seq < base_) return true;
    uint64_t idx = seq - base_;
    if (idx / 64 >= words_.size()) return false;
    return (word(idx / 64) >> (idx % 64)) & 1;
  }
  uint64_t base() const { return base_; }
  // The lowest seq without its final result (every seq below it has one).
  uint64_t first_incomplete() const {
    for (uint64_t i = 0; i < words_.size(); ++i) {
      uint64_t w = word(i);
      if (w != ~uint64_t{0}) return base_ + 64 * i + static_cast<uint64_t>(std::countr_one(w));
    }
    return base_ + 64 * words_.size();
  }
  size_t capacity_words() const { return words_.size(); }

 private:
  uint64_t& word(uint64_t i) { return words_[(head_ + i) & (words_.size() - 1)]; }
  const uint64_t& word(uint64_t i) const { return words_[(head_ + i) & (words_.size() - 1)]; }
  void grow() {
    std::vector<uint64_t> bigger(words_.size() * 2, 0);
    for (size_t i = 0; i < words_.size(); ++i) bigger[i] = word(i);
    words_.swap(bigger);
    head_ = 0;
  }

  uint64_t base_;  // the first seq (seqs start at 1, or above a client's seq base)
  size_t head_ = 0;    // index of the word holding seq `base_`
  std::vector<uint64_t> words_;  // power-of-2 size
};

class Collector {
 public:
  explicit Collector(Segment& seg) : seg_(seg), ring_(seg.results()), pool_(seg.pool()) {}
  // A client's collector over one of its mailboxes (Segment::live_mailbox/plain_mailbox),
  // whose seqs start above `seq_base`. The forwarder already dropped duplicates; a
  // collector that does not `track` completion (a plain mailbox's, an adopted client's)
  // delivers every record and counts none. `first_seq`: the first seq its handle issues.
  Collector(Segment& seg, TaskRing ring, uint64_t first_seq, bool track)
      : seg_(seg), ring_(ring), pool_(seg.pool()), track_(track), window_(first_seq), history_(kHistory, 0) {}

  // Waits until the deadline (monotonic ns; < 0 = forever, 0 = don't wait) for a result,
  // then hands every first result of a task, up to `max`, to sink(const ResultHeader&,
  // const uint8_t* value, uint32_t value_len). Blocks are freed after the sink returns,
  // except a pooled value block when the sink returns true: the sink has taken it over
  // (an array result handed out as a view over it) and frees it itself.
  // Only one thread may drain at a time (the Python result router holds a lock for that).
  template <class Sink, class Stop>
  size_t drain(size_t max, int64_t deadline_ns, Sink&& sink, Stop&& stop) {
    if (deadline_ns != 0 && !ring_.has_published())
      ring_.wait_published_n(1, deadline_ns, stop);
    size_t delivered = 0;
    size_t side_pieces = 0;  // bounded too: a worker that writes without end cannot keep us here
    while (delivered + side_pieces / 16 < max) {
      uint32_t want = static_cast<uint32_t>(std::min<size_t>(max - delivered, 256));
      buffer_.resize(size_t{want} * kResultStride);
      uint32_t k = ring_.claim_range(want, nullptr, [&](uint32_t i, const uint8_t* body) {
        std::memcpy(buffer_.data() + size_t{i} * kResultStride, body, result_record_bytes(body));
      });
      if (k == 0) break;
      for (uint32_t i = 0; i < k; ++i) {
        const uint8_t* rec = buffer_.data() + size_t{i} * kResultStride;
        ResultHeader h;
        std::memcpy(&h, rec, sizeof h);
        if (!history_.empty() && h.status != ResultStatus::kVoid && !first_time(h, rec))
          continue;  // a replayed copy of a record it had: that one's blocks, not its own
        if (h.route >= kFirstSideRoute && h.status != ResultStatus::kVoid) {
          // A piece of a side message (worker output, a log record, an exit value): the
          // whole message, once in, goes to the sink as raw bytes, counted as neither a
          // result nor a task that ended.
          side_.add(h, rec + sizeof h, h.inline_len, [&](const uint8_t* data, uint32_t len) {
            sink(static_cast<const ResultHeader&>(h), data, len);
          });
          ++side_pieces;
          continue;
        }
        if (h.status == ResultStatus::kAck) {  // its result waits in the plain mailbox
          if (track_ && window_.mark(h.seq)) {
            count_completed();
            ++delivered;  // counted (the caller learns that tasks completed), not handed on
          }
          continue;
        }
        if (h.status != ResultStatus::kVoid && (!track_ || window_.mark(h.seq))) {
          const uint8_t* value = rec + sizeof h;
          uint32_t len = h.inline_len;
          if (h.value_encoding == ValueEncoding::kPooled) {
            value = pool_.data(h.value_ref);
            len = h.value_len;
          }
          count_completed();  // before the sink, which may throw: the window has it already
          bool kept = false;
          if constexpr (std::is_same_v<decltype(sink(h, value, len)), bool>)
            kept = sink(static_cast<const ResultHeader&>(h), value, len);
          else
            sink(static_cast<const ResultHeader&>(h), value, len);
          ++delivered;
          if (h.arg_ref) pool_.free(h.arg_ref, h.arg_len);
          if (kept) continue;
        }
        if (h.value_encoding == ValueEncoding::kPooled && h.value_ref)
          pool_.free(h.value_ref, h.value_len);
      }
    }
    return delivered;
  }

  TaskRing& ring() { return ring_; }

  // Whether `seq` has had its final result. Only from the draining thread.
  bool is_complete(uint64_t seq) const { return window_.contains(seq); }
  // The lowest seq without its final result. Only from the draining thread.
  uint64_t first_incomplete() const { return window_.first_incomplete(); }
  // Records that `seq` ended without a result through the ring (a task cancelled before a
  // worker took it); a result for it that still comes is then dropped as a duplicate.
  bool mark_complete(uint64_t seq) {
    if (!window_.mark(seq)) return false;
    count_completed();
    return true;
  }
  // How many tasks have had their final result: counted here, with the drain itself, so
  // that the count stays exact whatever interrupts the caller between drains (a
  // KeyboardInterrupt in the owner's Python code, say). Any thread may read it.
  uint64_t completed() const { return completed_.load(std::memory_order_relaxed); }

 private:
  Segment& seg_;
  TaskRing ring_;
  ArgPool pool_;
  // A mailbox collector remembers a fingerprint of each of the last kHistory records it
  // read: a record the forwarder replayed after its predecessor died (kRecordReplayed) is
  // dropped when it is among them. The original is at most a batch or two before it in the
  // mailbox (the dead forwarder's pushes after it, and its void fillers).
  static constexpr size_t kHistory = 1024;
  static uint64_t fingerprint(ResultHeader h, const uint8_t* rec) {
    h.flags = 0;
    uint64_t words[sizeof h / 8 + 1];
    std::memcpy(words, &h, sizeof h);
    std::memcpy(&words[sizeof h / 8], rec + sizeof h, 8);  // (the cell has room after the header)
    uint64_t x = 0x9E3779B97F4A7C15ull;
    for (uint64_t w : words) x = (x ^ w) * 0xBF58476D1CE4E5B9ull, x ^= x >> 31;
    return x | 1;  // never 0, the empty entry
  }
  bool first_time(const ResultHeader& h, const uint8_t* rec) {
    const uint64_t fp = fingerprint(h, rec);
    if ((h.flags & kRecordReplayed) && std::find(history_.begin(), history_.end(), fp) != history_.end())
      return false;
    history_[history_next_] = fp;
    history_next_ = (history_next_ + 1) % kHistory;
    return true;
  }

  // Only the draining thread writes it (no read-modify-write needed); any thread reads.
  void count_completed() { completed_.store(completed_.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed); }

  bool track_ = true;
  std::vector<uint8_t> buffer_;
  CompletionWindow window_;
  std::vector<uint64_t> history_;  // mailbox collectors only (see first_time)
  size_t history_next_ = 0;
  SideAssembler side_;
  std::atomic<uint64_t> completed_{0};
};

}  // namespace mpop
