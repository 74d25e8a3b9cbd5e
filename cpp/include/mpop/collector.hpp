// Collector: the owner's side of the result ring. Copies result records out in batches,
// keeps exactly the first result of every task (a task may run twice after a crash), and
// frees the argument-pool blocks a task and its result used.
#pragma once

#include <cstdint>
#include <cstring>
#include <deque>
#include <mutex>
#include <vector>

#include "mpop/segment.hpp"

namespace mpop {

// Which task seqs have their final result. Seqs below `base` all do; a bit per seq above.
// Memory is proportional to the spread of seqs in flight, not to the number of tasks run.
class CompletionWindow {
 public:
  // Marks `seq` complete; returns false if it already was.
  bool mark(uint64_t seq) {
    if (seq < base_) return false;
    uint64_t idx = seq - base_;
    while (idx / 64 >= words_.size()) words_.push_back(0);
    uint64_t& w = words_[idx / 64];
    uint64_t bit = uint64_t{1} << (idx % 64);
    if (w & bit) return false;
    w |= bit;
    while (!words_.empty() && words_.front() == ~uint64_t{0}) {
      words_.pop_front();
      base_ += 64;
    }
    return true;
  }
  bool contains(uint64_t seq) const {
    if (seq < base_) return true;
    uint64_t idx = seq - base_;
    if (idx / 64 >= words_.size()) return false;
    return (words_[idx / 64] >> (idx % 64)) & 1;
  }
  uint64_t base() const { return base_; }

 private:
  uint64_t base_ = 1;  // seqs start at 1
  std::deque<uint64_t> words_;
};

class Collector {
 public:
  explicit Collector(Segment& seg) : seg_(seg), ring_(seg.results()), pool_(seg.pool()) {}

  // Waits until the deadline (monotonic ns; < 0 = forever, 0 = don't wait) for a result,
  // then hands every first result of a task, up to `max`, to sink(const ResultHeader&,
  // const uint8_t* value, uint32_t value_len). Blocks are freed after the sink returns.
  // Only one thread may drain at a time.
  template <class Sink, class Stop>
  size_t drain(size_t max, int64_t deadline_ns, Sink&& sink, Stop&& stop) {
    if (deadline_ns != 0 && !ring_.has_published())
      ring_.wait_published(deadline_ns, stop);
    size_t delivered = 0;
    while (delivered < max) {
      uint32_t want = static_cast<uint32_t>(std::min<size_t>(max - delivered, 256));
      buffer_.resize(size_t{want} * kResultStride);
      uint32_t k = ring_.claim_range(want, nullptr, [&](uint32_t i, const uint8_t* body) {
        std::memcpy(buffer_.data() + size_t{i} * kResultStride, body, kResultStride - 8);
      });
      if (k == 0) break;
      first_.resize(k);
      {
        std::lock_guard<std::mutex> lock(window_mutex_);  // once per batch, not per task
        for (uint32_t i = 0; i < k; ++i) {
          ResultHeader h;
          std::memcpy(&h, buffer_.data() + size_t{i} * kResultStride, sizeof h);
          first_[i] = h.status != ResultStatus::kVoid && window_.mark(h.seq);
        }
      }
      for (uint32_t i = 0; i < k; ++i) {
        const uint8_t* rec = buffer_.data() + size_t{i} * kResultStride;
        ResultHeader h;
        std::memcpy(&h, rec, sizeof h);
        if (first_[i]) {
          const uint8_t* value = rec + sizeof h;
          uint32_t len = h.inline_len;
          if (h.value_encoding == ValueEncoding::kPooled) {
            value = pool_.data(h.value_ref);
            len = h.value_len;
          }
          sink(static_cast<const ResultHeader&>(h), value, len);
          ++delivered;
          if (h.arg_ref) pool_.free(h.arg_ref, h.arg_len);
        }
        if (h.value_encoding == ValueEncoding::kPooled && h.value_ref)
          pool_.free(h.value_ref, h.value_len);
      }
    }
    return delivered;
  }

  bool is_complete(uint64_t seq) {
    std::lock_guard<std::mutex> lock(window_mutex_);
    return window_.contains(seq);
  }

 private:
  Segment& seg_;
  TaskRing ring_;
  ArgPool pool_;
  std::vector<uint8_t> buffer_;
  std::vector<uint8_t> first_;
  std::mutex window_mutex_;  // shared with the supervisor, which asks is_complete()
  CompletionWindow window_;
};

}  // namespace mpop
