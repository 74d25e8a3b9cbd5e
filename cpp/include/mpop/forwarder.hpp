// Forwarder: a persistent pool's result path. Its supervisor process is the one consumer
// of the result ring; the forwarder copies each task's first result into the mailboxes of
// the client that submitted it (the client is in the seq: client_of_seq), so that several
// client processes share one pool and each receives only its own results. It keeps
// exactly the first result of every task (a task may run twice after a crash) in a
// completion window per client, and records what it forwarded in the client's record.
// A full mailbox makes it wait, and so the workers behind it: nothing is dropped. Records
// are staged per mailbox and pushed a batch at a time (one reservation and one wake-up per
// mailbox per batch), plain mailboxes before live ones, so that a client never sees the
// acknowledgement of a result before the result.
//
// Its own death loses nothing: it takes a batch from the result ring only once the batch
// is in the mailboxes (the ring's one consumer reads it in place first, and records the
// batch's end in the header), and frees blocks only after that. A new forwarder publishes
// as void fillers the mailbox cells the dead one had reserved and not written, and
// forwards the dead one's batch again with each copy marked kRecordReplayed: a client
// drops a replayed record it already had (Collector), so each reaches it once.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <thread>
#include <utility>
#include <vector>

#include "mpop/collector.hpp"
#include "mpop/fault.hpp"
#include "mpop/segment.hpp"

namespace mpop {

class Forwarder {
 public:
  explicit Forwarder(Segment& seg)
      : seg_(seg), ring_(seg.results()), pool_(seg.pool()), staged_(2 * size_t{seg.client_count()}),
        counts_(seg.client_count(), 0) {
    windows_.reserve(seg.client_count());
    for (uint32_t i = 0; i < seg.client_count(); ++i)
      windows_.emplace_back(seg.client(i).complete_below.load(std::memory_order_acquire));
    take_over_from_dead_forwarder();
  }
  ~Forwarder() { stop(); }
  Forwarder(const Forwarder&) = delete;
  Forwarder& operator=(const Forwarder&) = delete;

  void start() {
    if (!thread_.joinable()) thread_ = std::thread([this] { loop(); });
  }
  // Stops the thread, then moves what is left (a mailbox still full is not waited for: the
  // batch that did not fit stays in the result ring, for the next forwarder to replay).
  void stop() {
    stop_.store(true, std::memory_order_release);
    ring_.wake_consumers();
    if (thread_.joinable()) {
      thread_.join();
      while (pump(0) != 0) {
      }
    }
  }
  // Moves what is published now, waiting up to `deadline_ns` (monotonic) for the first
  // record; returns how many records it took from the result ring. One thread at a time.
  size_t pump(int64_t deadline_ns) {
    auto stopping = [this] { return stop_.load(std::memory_order_acquire); };
    if (deadline_ns != 0 && !ring_.has_published()) ring_.wait_published_n(1, deadline_ns, stopping);
    size_t taken = 0;
    if (left_) return 0;  // (it would take the batch it left for a dup of itself)
    buffer_.resize(size_t{kBatch} * kResultStride);
    SegmentHeader& hdr = seg_.header();
    for (;;) {
      uint64_t head = 0;
      uint32_t k = ring_.peek_range(kBatch, head, [&](uint32_t i, const uint8_t* body) {
        std::memcpy(buffer_.data() + size_t{i} * kResultStride, body, result_record_bytes(body));
      });
      if (k == 0) return taken;
      hdr.forward_end.store(head + k, std::memory_order_seq_cst);  // before any mailbox has it
      maybe_fault(hdr, FaultStep::kForwarderRead);
      for (uint32_t i = 0; i < k; ++i)
        route(buffer_.data() + size_t{i} * kResultStride, static_cast<int64_t>(replay_below_ - (head + i)) > 0);
      if (!flush()) {  // stopped with a mailbox full: the batch stays for the next forwarder
        frees_.clear();
        left_ = true;
        return taken;
      }
      maybe_fault(hdr, FaultStep::kForwarderPushed);
      ring_.consume(head, k);
      for (const auto& [ref, len] : frees_) pool_.free(ref, len);  // only now: see the top
      frees_.clear();
      record_forwarded();
      taken += k;
      if (k < kBatch || stopping()) return taken;
    }
  }
  uint64_t forwarded() const { return forwarded_.load(std::memory_order_relaxed); }
  uint64_t dropped() const { return dropped_.load(std::memory_order_relaxed); }

 private:
  static constexpr uint32_t kBatch = 256;
  static constexpr int64_t kWaitNs = 100'000'000;

  void loop() {
    while (!stop_.load(std::memory_order_acquire)) pump(monotonic_ns() + kWaitNs);
  }

  // After a forwarder died (nothing to do for a pool's first): the mailbox cells it had
  // reserved and not written become void fillers, so that their clients read on; the
  // result-ring records of its last batch (still in the ring) are forwarded again, replayed.
  void take_over_from_dead_forwarder() {
    for (uint32_t c = 0; c < seg_.client_count(); ++c) {
      for (TaskRing mb : {seg_.live_mailbox(c), seg_.plain_mailbox(c)}) {
        mb.publish_abandoned([](void* body) {
          ResultHeader r;
          r.status = ResultStatus::kVoid;
          std::memcpy(body, &r, sizeof r);
        });
      }
    }
    const uint64_t end = seg_.header().forward_end.load(std::memory_order_acquire);
    const uint64_t head = ring_.dequeue_pos();
    replay_below_ = static_cast<int64_t>(end - head) > 0 ? end : head;
  }

  // Whether client c's mailboxes are read: by it, or by the client that adopted it.
  bool read(uint32_t c) const {
    const ClientRecord& r = seg_.client(c);
    const ClientState st = lease_state(r.lease.load(std::memory_order_acquire));
    if (st == ClientState::kAttached) return true;
    const uint32_t a = r.adopter.load(std::memory_order_acquire);
    return st == ClientState::kGone && a != 0 && a - 1 < seg_.client_count() && attached(a - 1);
  }

  bool attached(uint32_t c) const {
    return lease_state(seg_.client(c).lease.load(std::memory_order_acquire)) == ClientState::kAttached;
  }

  // Blocks are freed once their batch is taken from the result ring (a new forwarder may
  // read the records again until then).
  void free_later(uint64_t ref, uint32_t len) { frees_.emplace_back(ref, len); }
  void free_value(const ResultHeader& h) {
    if (h.value_encoding == ValueEncoding::kPooled && h.value_ref) free_later(h.value_ref, h.value_len);
  }

  // `rec`: a record of buffer_ (marked in place). `replayed`: it may be in a mailbox
  // already (see the top).
  void route(uint8_t* rec, bool replayed) {
    ResultHeader h;
    std::memcpy(&h, rec, sizeof h);
    if (replayed) {
      h.flags |= kRecordReplayed;
      std::memcpy(rec, &h, sizeof h);
    }
    const uint32_t n = seg_.client_count();
    if (h.status == ResultStatus::kVoid) {
      free_value(h);
      return;
    }
    if (h.route >= kFirstSideRoute) {  // a piece of a side message: to its task's client
      int64_t c = client_of_seq(h.seq);
      if (h.seq == 0 || c < 0 || c >= n || !read(static_cast<uint32_t>(c))) {
        c = -1;
        for (uint32_t i = 0; i < n && c < 0; ++i)
          if (attached(i)) c = i;
      }
      if (c < 0)
        dropped_.fetch_add(1);
      else
        stage(static_cast<uint32_t>(c), false, rec);
      return;
    }
    const int64_t c = client_of_seq(h.seq);
    if (c < 0 || c >= n) {  // not a client's seq: nobody to give it to
      free_value(h);
      if (h.arg_ref) free_later(h.arg_ref, h.arg_len);
      dropped_.fetch_add(1);
      return;
    }
    if (!windows_[c].mark(h.seq)) {  // a second result of a task that ran again
      free_value(h);
      return;
    }
    // The copy the client gets: its task's argument block is freed here, its value block
    // (if pooled) by the client once decoded.
    alignas(8) uint8_t out[kResultStride - 8];
    std::memcpy(out, rec, result_record_bytes(rec));
    ResultHeader o = h;
    o.arg_ref = 0;
    o.arg_len = 0;
    std::memcpy(out, &o, sizeof o);
    const auto client = static_cast<uint32_t>(c);
    if (h.route == kRoutePlain) {
      stage(client, true, out);
      ResultHeader ack = o;
      ack.status = ResultStatus::kAck;
      ack.value_encoding = ValueEncoding::kInline;
      ack.value_ref = 0;
      ack.value_len = 0;
      ack.inline_len = 0;
      alignas(8) uint8_t a[sizeof ack + 8] = {};
      std::memcpy(a, &ack, sizeof ack);
      stage(client, false, a);
    } else {
      stage(client, false, out);
    }
    if (h.arg_ref) free_later(h.arg_ref, h.arg_len);
    if (counts_[client]++ == 0) touched_.push_back(client);
  }

  // A record for client c's plain or live mailbox, pushed by the next flush().
  void stage(uint32_t c, bool plain, const uint8_t* rec) {
    constexpr uint32_t kRec = kResultStride - 8;
    Staged& s = staged_[2 * size_t{c} + (plain ? 0 : 1)];
    if (s.count == 0) staged_order_.push_back(2 * c + (plain ? 0 : 1));
    const size_t at = size_t{s.count++} * kRec;
    if (s.bytes.size() < at + kRec) s.bytes.resize(at + kRec);  // (kept: a batch's high-water mark)
    std::memcpy(s.bytes.data() + at, rec, result_record_bytes(rec));
  }

  // Pushes what route() staged (plain mailboxes first). False if stop() made it give some
  // up.
  bool flush() {
    bool whole = true;
    for (int pass = 0; pass < 2; ++pass) {
      for (uint32_t m : staged_order_) {
        if (static_cast<int>(m % 2) != pass) continue;
        Staged& s = staged_[m];
        const uint32_t c = m / 2;
        const uint32_t pushed = push(pass == 0 ? seg_.plain_mailbox(c) : seg_.live_mailbox(c), s);
        for (uint32_t k = pushed; k < s.count; ++k) give_up(s.bytes.data() + size_t{k} * (kResultStride - 8));
        whole = whole && pushed == s.count;
        s.count = 0;
      }
    }
    staged_order_.clear();
    return whole;
  }

  // Records in each client's record what the batch just taken from the ring forwarded.
  // (Only then: a new forwarder starts its windows from complete_below, and must not take
  // a replayed record for a second result of its task.)
  void record_forwarded() {
    for (uint32_t c : touched_) {
      ClientRecord& cr = seg_.client(c);
      cr.complete_below.store(windows_[c].first_incomplete(), std::memory_order_release);
      cr.forwarded.fetch_add(counts_[c], std::memory_order_relaxed);
      forwarded_.fetch_add(counts_[c], std::memory_order_relaxed);
      counts_[c] = 0;
    }
    touched_.clear();
  }

  // A staged record that stop() left out of a mailbox that stayed full: counted in
  // dropped(); its original stays in the result ring (see pump).
  void give_up(const uint8_t* rec) {
    ResultHeader h;
    std::memcpy(&h, rec, sizeof h);
    if (h.status == ResultStatus::kAck) return;  // its result went to the plain mailbox
    dropped_.fetch_add(1);
  }

  struct Staged {
    std::vector<uint8_t> bytes;  // records of kResultStride - 8 bytes (the first `count`)
    uint32_t count = 0;
  };

  // Pushes a mailbox's staged records in as few reservations as room allows, waiting for
  // room; returns how many went in (fewer only if stopped meanwhile).
  uint32_t push(TaskRing mb, const Staged& s) {
    constexpr uint32_t kRec = kResultStride - 8;
    uint32_t done = 0;
    while (done < s.count) {
      const uint32_t n = mb.try_push(
          s.count - done,
          [&](uint32_t i, void* dst) {
            const uint8_t* rec = s.bytes.data() + size_t{done + i} * kRec;
            std::memcpy(dst, rec, result_record_bytes(rec));
          },
          nullptr, [this](RingPoint p) {
            if (p == RingPoint::kPushReserved) maybe_fault(seg_.header(), FaultStep::kForwarderMidPush);
          });
      done += n;
      if (n) continue;
      if (stop_.load(std::memory_order_acquire)) break;
      wait_until(mb.control().not_full, [&] { return mb.has_room() || stop_.load(std::memory_order_acquire); },
                 monotonic_ns() + kWaitNs);
    }
    return done;
  }

  Segment& seg_;
  TaskRing ring_;
  ArgPool pool_;
  std::vector<CompletionWindow> windows_;
  std::vector<uint8_t> buffer_;
  std::vector<Staged> staged_;         // per mailbox: 2 * client (plain), 2 * client + 1 (live)
  std::vector<uint32_t> staged_order_;  // mailboxes with staged records
  std::vector<uint64_t> counts_;        // per client: results forwarded in this batch
  std::vector<uint32_t> touched_;       // clients with such results
  std::vector<std::pair<uint64_t, uint32_t>> frees_;  // blocks to free once the batch is taken
  uint64_t replay_below_ = 0;  // result-ring positions below this: the dead forwarder's batch
  bool left_ = false;          // stop() left a batch in the ring: forward nothing more
  std::atomic<bool> stop_{false};
  std::atomic<uint64_t> forwarded_{0};
  std::atomic<uint64_t> dropped_{0};
  std::thread thread_;
};

}  // namespace mpop
