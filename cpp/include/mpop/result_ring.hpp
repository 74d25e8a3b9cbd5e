// ResultRing: where workers (and the supervisor, for tasks it ends) publish one record per
// finished task; the owner's collector drains it. It is a TaskRing with ResultHeader bodies.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "mpop/slot_layout.hpp"
#include "mpop/task_ring.hpp"

namespace mpop {

enum class ResultStatus : uint8_t {
  kOk = 0,         // value is the handler's return value
  kError = 1,      // value is a pickled (exception, traceback text) pair
  kCrashed = 2,    // the worker died running it too often: WorkerCrashedError
  kTimeout = 3,    // it ran past task_timeout: TaskTimeoutError
  kCancelled = 4,  // shutdown(cancel_pending=True) removed it before it ran
  kVoid = 5,       // filler for a publication a dead worker reserved but never wrote
  kAck = 6,        // in a client's live mailbox: the task's result went to its plain mailbox
};

enum class ValueEncoding : uint8_t {
  kInline = 0,  // a codec stream of `inline_len` bytes right after the header
  kPooled = 1,  // a codec stream of `value_len` bytes in the argument pool at `value_ref`
};

struct ResultHeader {
  uint64_t seq = 0;
  uint64_t arg_ref = 0;    // the task's pooled arguments, freed by the collector
  uint64_t value_ref = 0;  // pooled value, freed by the collector after decoding
  uint32_t value_len = 0;
  uint32_t tsk_id = 0;
  uint32_t fn_id = 0;
  uint16_t worker_id = 0;
  ResultStatus status = ResultStatus::kOk;
  ValueEncoding value_encoding = ValueEncoding::kInline;
  uint16_t attempts = 0;
  uint16_t inline_len = 0;
  uint32_t arg_len = 0;
  int64_t enqueue_ns = 0;
  int64_t start_ns = 0;
  int64_t end_ns = 0;
  uint32_t route = 0;  // copied from the task: which owner-side consumer gets it
  uint32_t flags = 0;  // kRecordReplayed
};
// ResultHeader::flags: a copy a persistent pool's new forwarder put in a mailbox again,
// from the batch its predecessor died forwarding; the client drops it if it had the
// record already (see Collector's replay check).
constexpr uint32_t kRecordReplayed = 1;
static_assert(sizeof(ResultHeader) == 80);

constexpr uint32_t kResultStride = 256;
constexpr uint32_t kResultInlineBytes = kResultStride - TaskRing::kSeqBytes - sizeof(ResultHeader);

// The result of a task that ends without running (again): `status`, no value, its pooled
// arguments for the collector to free, its attempts as counted in `h`.
inline ResultHeader result_without_value(const TaskHeader& h, const uint8_t* slot, const SlotLayout& L,
                                         ResultStatus status) {
  ResultHeader r;
  r.seq = h.seq;
  r.arg_ref = h.encoding == ArgEncoding::kPooled ? h.pool_ref : 0;
  r.arg_len = h.encoding == ArgEncoding::kPooled ? h.stream_len : 0;
  r.tsk_id = read_uint(slot + L.tsk_id_off, L.tsk_id_size);
  r.fn_id = read_uint(slot + L.fn_id_off, L.fn_id_size);
  r.status = status;
  r.attempts = h.attempts;
  r.enqueue_ns = h.enqueue_ns;
  r.route = h.route;
  r.end_ns = monotonic_ns();
  return r;
}

// The bytes of the result record at `rec` that carry anything: its header and its inline
// value, and at least 8 bytes after the header (a mailbox collector's fingerprint reads
// them). Copying only these, not the whole cell, is most of the cost of moving a small
// result.
inline uint32_t result_record_bytes(const uint8_t* rec) {
  uint16_t inline_len;
  std::memcpy(&inline_len, rec + offsetof(ResultHeader, inline_len), sizeof inline_len);
  const uint32_t used = sizeof(ResultHeader) + std::max<uint32_t>(inline_len, 8);
  return std::min<uint32_t>(used, kResultStride - TaskRing::kSeqBytes);
}

}  // namespace mpop
