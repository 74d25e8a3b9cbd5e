// SlotLayout: where a user's slot struct keeps tsk_id, fn_id, args, c_args and meta; and
// TaskHeader: the runtime's own per-task fields that travel beside the slot in a ring cell.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

namespace mpop {

// Offsets and sizes of the fields of a slot class (a ctypes.Structure), computed by the
// Python layer and checked against the segment header by every worker.
struct SlotLayout {
  uint32_t size = 0;
  uint32_t tsk_id_off = 0, tsk_id_size = 0;
  uint32_t fn_id_off = 0, fn_id_size = 0;
  uint32_t args_off = 0, args_count = 0;  // int64 array
  uint32_t cargs_off = 0, cargs_len = 0;  // char array, len 0 = absent
  uint32_t meta_off = 0, meta_len = 0;    // uint8 array, len 0 = absent
  uint32_t reserved = 0;

  // The contiguous bytes an encoded argument stream may use inside the slot: args, plus
  // c_args when it directly follows args.
  uint32_t arg_area_off() const { return args_off; }
  uint32_t arg_area_len() const {
    uint32_t n = args_count * 8;
    if (cargs_len && cargs_off == args_off + n) n += cargs_len;
    return n;
  }
  bool operator==(const SlotLayout& o) const { return std::memcmp(this, &o, sizeof o) == 0; }
};

// How a task's arguments are stored.
enum class ArgEncoding : uint8_t {
  kSlotInts = 0,  // `nargs` int64 in slot.args; c_args raw. What slot-mode handlers read.
  kPacked = 1,    // a codec stream of `stream_len` bytes in the slot's arg area
  kPooled = 2,    // a codec stream of `stream_len` bytes in the argument pool at `pool_ref`
};

struct TaskHeader {
  uint64_t seq = 0;         // unique internal task number, the key of its result
  uint64_t pool_ref = 0;    // argument pool offset of a pooled stream (0 = none)
  uint32_t stream_len = 0;  // bytes of the encoded stream (kPacked / kPooled)
  uint16_t attempts = 0;    // runs already charged against max_retries
  ArgEncoding encoding = ArgEncoding::kSlotInts;
  uint8_t nargs = 0;        // positional ints (kSlotInts)
  int64_t enqueue_ns = 0;   // monotonic clock at enqueue (0 when max_performance)
  uint32_t route = 0;       // where the owner delivers the result (echoed in ResultHeader)
  uint32_t flags = 0;       // TaskFlags
};

// Where the owner delivers a task's result (TaskHeader::route, echoed in ResultHeader).
enum Route : uint32_t {
  kRoutePlain = 0,     // an enqueue()d task: a TaskResult for results() and run()
  kRouteFuture = 1,    // a submit()ted task: its future
  kFirstMapRoute = 2,  // a map() call's chunks: each call a route of its own from here up
  // Records a worker publishes that are not the result of a task (seq 0): from here up.
  kFirstSideRoute = 0xFFFF0000,
  kRouteStdout = kFirstSideRoute + 1,  // text a handler wrote to sys.stdout
  kRouteStderr = kFirstSideRoute + 2,  // ... to sys.stderr
  kRouteLog = kFirstSideRoute + 3,     // a logging record
  kRouteExit = kFirstSideRoute + 4,    // what worker_exit returned as the worker retired
};

enum TaskFlags : uint32_t {
  kClaimAlone = 1,  // a long task (e.g. a chunk of map()): never claimed in a batch
  // No task: filler for a cell a producer that died reserved and never wrote
  // (Segment::void_abandoned_push). Whoever takes one drops it (seq 0, no result).
  kTaskVoid = 2,
};
inline bool is_void_task(const uint8_t* body) {
  uint32_t flags;
  std::memcpy(&flags, body + offsetof(TaskHeader, flags), sizeof flags);
  return flags & kTaskVoid;
}
static_assert(sizeof(TaskHeader) == 40);

// What the runtime writes into a slot's `meta` bytes when the slot class has room (>= 32):
// read by slot-mode handlers as `slot.meta` and by the collector for per-task stats.
struct TaskMeta {
  int64_t enqueue_ns;
  int64_t start_ns;
  int64_t end_ns;
  uint16_t attempts;
  uint16_t worker_id;
  uint32_t reserved;
};
static_assert(sizeof(TaskMeta) == 32);

// A task body as stored in ring cells, local queues and the backlog.
inline uint32_t task_body_bytes(const SlotLayout& l) { return sizeof(TaskHeader) + l.size; }

inline uint32_t read_uint(const uint8_t* p, uint32_t size) {
  if (size == 8) {
    uint64_t v;
    std::memcpy(&v, p, 8);
    return static_cast<uint32_t>(v);
  }
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}
inline void write_uint(uint8_t* p, uint32_t size, uint32_t value) {
  if (size == 8) {
    uint64_t v = value;
    std::memcpy(p, &v, 8);
  } else {
    std::memcpy(p, &value, 4);
  }
}

}  // namespace mpop
