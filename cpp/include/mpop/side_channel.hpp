// SideChannel: what a worker sends its owner besides the results of tasks: the text its
// handlers write to sys.stdout and sys.stderr, its logging records, and what worker_exit
// returns. A message goes into the result ring as records of a side route (slot_layout.hpp)
// whose seq is the task the worker runs or last ran (0: none; a persistent pool's forwarder
// sends the message to that task's client), each carrying up to kResultInlineBytes of it inline; the collector puts the
// pieces of a message together again (SideAssembler) and counts none of them as a task's
// result.
#pragma once

#include <cstdint>
#include <cstring>
#include <unordered_map>
#include <vector>

#include "mpop/segment.hpp"
#include "mpop/worker_loop.hpp"

namespace mpop {

// How a side record says where it is in its message: ResultHeader::tsk_id is the piece's
// index, and ResultHeader::fn_id has kSideLastPiece set on the last piece.
constexpr uint32_t kSideLastPiece = 1;

class SideChannel {
 public:
  SideChannel(Segment& seg, uint32_t id)
      : hdr_(seg.header()),
        results_(seg.results()),
        rec_(seg.workers().record(id)),
        owner_(seg.header()),
        id_(id) {}
  SideChannel(const SideChannel&) = delete;
  SideChannel& operator=(const SideChannel&) = delete;

  // Sends `len` bytes on `route` (one of the side routes), one piece per ring cell, each
  // pushed through the worker's publication window so that a death in the middle leaves
  // nothing the supervisor cannot recover. Waits for room while the owner lives; false:
  // the owner died (what was not sent is lost with it). Called between the tasks' own
  // publications (from a handler, or before and after the worker loop), never during one.
  bool send(uint32_t route, const uint8_t* data, size_t len) {
    // The last task's pooled result block, recorded in result_ref, was handed to the
    // collector when it was published: a death in this window must not free it again.
    rec_.result_ref.store(0, std::memory_order_relaxed);
    const uint64_t running = rec_.running_seq.load(std::memory_order_relaxed);
    const uint64_t task = rec_.running_since_ns.load(std::memory_order_relaxed) && running
                              ? running : rec_.result_seq.load(std::memory_order_relaxed);
    uint32_t index = 0;
    size_t done = 0;
    do {
      const size_t n = std::min<size_t>(len - done, kResultInlineBytes);
      ResultHeader r;
      r.route = route;
      r.seq = task;
      r.worker_id = static_cast<uint16_t>(id_);
      r.tsk_id = index;
      r.fn_id = done + n == len ? kSideLastPiece : 0;
      r.inline_len = static_cast<uint16_t>(n);
      auto fill = [&](uint32_t, void* dst) {
        auto* o = static_cast<uint8_t*>(dst);
        std::memcpy(o, &r, sizeof r);
        if (n) std::memcpy(o + sizeof r, data + done, n);
      };
      while (results_.try_push(1, fill, &rec_.publish, [this](RingPoint p) { maybe_fault(hdr_, fault_for(p)); }) ==
             0) {
        if (!owner_.alive()) return false;
        wait_until(
            results_.control().not_full, [&] { return results_.has_room(); }, monotonic_ns() + 250'000'000);
      }
      done += n;
      ++index;
    } while (done < len);
    return true;
  }

 private:
  SegmentHeader& hdr_;
  TaskRing& results_;
  WorkerRecord& rec_;
  OwnerWatch owner_;
  const uint32_t id_;
};

// The owner's side: pieces of side messages, per worker and route, until the last one.
class SideAssembler {
 public:
  // Adds one piece; when it completes its message, calls done(data, len) with all of it.
  // A piece 0 starts a message afresh (what a worker that died in the middle of one left
  // is dropped).
  template <class Done>
  void add(const ResultHeader& h, const uint8_t* value, uint32_t len, Done&& done) {
    const bool last = (h.fn_id & kSideLastPiece) != 0;
    if (h.tsk_id == 0 && last) {  // the usual case: a message in one piece
      if (!partial_.empty()) partial_.erase(key(h));  // what a dead predecessor left half sent
      done(value, len);
      return;
    }
    std::vector<uint8_t>& buf = partial_[key(h)];
    if (h.tsk_id == 0) buf.clear();
    buf.insert(buf.end(), value, value + len);
    if (last) {
      std::vector<uint8_t> whole;
      whole.swap(buf);
      partial_.erase(key(h));
      done(whole.data(), static_cast<uint32_t>(whole.size()));
    }
  }

 private:
  static uint64_t key(const ResultHeader& h) { return uint64_t{h.worker_id} << 32 | h.route; }
  std::unordered_map<uint64_t, std::vector<uint8_t>> partial_;
};

}  // namespace mpop
