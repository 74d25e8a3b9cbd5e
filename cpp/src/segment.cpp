// Segment creation (exclusive, 0600, random name), attachment with layout checks, and
// removal, over Boost.Interprocess shared_memory_object and mapped_region.
#include "mpop/segment.hpp"

#include <sys/random.h>
#include <unistd.h>

#include <boost/interprocess/mapped_region.hpp>
#include <boost/interprocess/shared_memory_object.hpp>
#include <algorithm>
#include <cstddef>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>
#include <stdexcept>

namespace bip = boost::interprocess;

namespace mpop {

namespace {

std::string random_hex64() {
  uint64_t r = 0;
  if (getrandom(&r, sizeof r, 0) != static_cast<ssize_t>(sizeof r))
    throw std::runtime_error("mpop: getrandom() failed");
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(r));
  return buf;
}

struct Geometry {
  uint64_t registry_off, ring_off, workers_off, results_off, pool_off, clients_off, total;
  uint32_t task_stride, worker_stride, entry_stride, client_stride;
};

Geometry geometry(const SegmentConfig& c) {
  Geometry g{};
  g.task_stride = TaskRing::stride_for_body(task_body_bytes(c.slot));
  g.entry_stride = WorkerTable::entry_stride_for(c.slot);
  g.worker_stride = WorkerTable::stride_for(c.slot, c.batch_size);
  uint64_t off = round_up(sizeof(SegmentHeader), 4096);
  g.registry_off = off;
  off = round_up(off + c.registry_bytes, 4096);
  g.ring_off = off;
  off = round_up(off + TaskRing::bytes_needed(c.queue_slots, g.task_stride), 4096);
  g.workers_off = off;
  off = round_up(off + uint64_t{c.max_workers} * g.worker_stride, 4096);
  g.results_off = off;
  off = round_up(off + TaskRing::bytes_needed(c.result_slots, kResultStride), 4096);
  g.pool_off = off;
  off = round_up(off + ArgPool::bytes_needed(c.pool_bytes), 4096);
  g.clients_off = off;
  g.client_stride = c.max_clients == 0 ? 0 : static_cast<uint32_t>(round_up(
      round_up(sizeof(ClientRecord), kCacheLine) + 2 * TaskRing::bytes_needed(c.client_slots, kResultStride), 4096));
  off += uint64_t{c.max_clients} * g.client_stride;
  g.total = off;
  return g;
}

}  // namespace

uint64_t Segment::process_start_time(int pid) {
  std::ifstream f("/proc/" + std::to_string(pid) + "/stat");
  if (!f) return 0;
  std::string line;
  std::getline(f, line);
  // Field 22 (starttime) follows the command name, which is in parentheses and may contain
  // spaces: count fields from the last ')'.
  auto close = line.rfind(')');
  if (close == std::string::npos) return 0;
  std::istringstream rest(line.substr(close + 2));
  std::string field;
  for (int i = 3; i <= 22; ++i) {
    if (!(rest >> field)) return 0;
  }
  return std::stoull(field);
}

std::unique_ptr<Segment> Segment::create(const std::string& prefix, const SegmentConfig& cfg) {
  if (!is_power_of_two(cfg.queue_slots) || cfg.queue_slots < 2)
    throw std::invalid_argument("queue_slots must be a power of 2 >= 2");
  if (!is_power_of_two(cfg.result_slots) || cfg.result_slots < 2)
    throw std::invalid_argument("result_slots must be a power of 2 >= 2");
  if (cfg.max_workers < 1 || cfg.batch_size < 1)
    throw std::invalid_argument("max_workers and batch_size must be >= 1");
  if (cfg.max_workers > ArgPool::kMaxWorkers)
    throw std::invalid_argument("max_workers must be <= " + std::to_string(ArgPool::kMaxWorkers));
  if (cfg.max_clients && (!is_power_of_two(cfg.client_slots) || cfg.client_slots < 2))
    throw std::invalid_argument("client_slots must be a power of 2 >= 2");
  if (cfg.max_clients > 4096) throw std::invalid_argument("max_clients must be <= 4096");
  Geometry g = geometry(cfg);

  std::unique_ptr<Segment> seg(new Segment());
  bip::permissions perm;
  perm.set_permissions(0600);
  std::unique_ptr<bip::shared_memory_object> shm;
  for (int attempt = 0; attempt < 8 && !shm; ++attempt) {
    std::string name = prefix + "_" + random_hex64();
    try {
      shm = std::make_unique<bip::shared_memory_object>(bip::create_only, name.c_str(),
                                                         bip::read_write, perm);
      seg->name_ = name;
    } catch (const bip::interprocess_exception& e) {
      if (e.get_error_code() != bip::already_exists_error) throw;
    }
  }
  if (!shm) throw std::runtime_error("mpop: could not create a unique shared-memory segment");
  try {
    shm->truncate(static_cast<bip::offset_t>(g.total));
    auto* region = new bip::mapped_region(*shm, bip::read_write);
    seg->region_.reset(region, [](void* p) { delete static_cast<bip::mapped_region*>(p); });
  } catch (...) {
    bip::shared_memory_object::remove(seg->name_.c_str());
    throw;
  }
  seg->base_ = static_cast<uint8_t*>(static_cast<bip::mapped_region*>(seg->region_.get())->get_address());
  seg->size_ = g.total;

  // The magic goes in last (below): until then another process that opens the segment
  // (`python -m mpop cleanup`, or any app's start-up sweep) sees no mpop segment yet, never
  // a half-written header (an owner_pid without its start time looks like a dead owner).
  auto* h = new (seg->base_) SegmentHeader();
  h->magic = 0;
  h->layout_version = kLayoutVersion;
  h->task_stride = g.task_stride;
  h->config = cfg;
  h->registry_off = g.registry_off;
  h->ring_off = g.ring_off;
  h->workers_off = g.workers_off;
  h->results_off = g.results_off;
  h->pool_off = g.pool_off;
  h->clients_off = g.clients_off;
  h->client_stride = g.client_stride;
  h->total_bytes = g.total;
  h->worker_stride = g.worker_stride;
  h->entry_stride = g.entry_stride;
  h->owner_pid = static_cast<int32_t>(getpid());
  h->owner_start_time = process_start_time(getpid());
  std::snprintf(h->name, sizeof h->name, "%s", seg->name_.c_str());
  h->attached.store(1, std::memory_order_relaxed);
  seg->header_ = h;

  TaskRing::create(seg->base_ + g.ring_off, cfg.queue_slots, g.task_stride);
  TaskRing::create(seg->base_ + g.results_off, cfg.result_slots, kResultStride);
  ArgPool::create(seg->base_ + g.pool_off, cfg.pool_bytes);
  for (uint32_t i = 0; i < cfg.max_clients; ++i) {
    auto* rec = new (seg->base_ + g.clients_off + uint64_t{i} * g.client_stride) ClientRecord();
    rec->next_seq.store(client_seq_base(i) + 1, std::memory_order_relaxed);
    rec->complete_below.store(client_seq_base(i) + 1, std::memory_order_relaxed);
    TaskRing::create(seg->mailbox_mem(i, 0), cfg.client_slots, kResultStride);
    TaskRing::create(seg->mailbox_mem(i, 1), cfg.client_slots, kResultStride);
  }
  for (uint32_t i = 0; i < cfg.max_workers; ++i) {
    auto* rec = new (seg->base_ + g.workers_off + uint64_t{i} * g.worker_stride) WorkerRecord();
    rec->id = i;
  }
  seg->bind_views();
  seg->unlink_on_close_ = true;
  std::atomic_ref<uint64_t>(h->magic).store(kSegmentMagic, std::memory_order_release);
  return seg;
}

std::unique_ptr<Segment> Segment::attach(const std::string& name) {
  std::unique_ptr<Segment> seg(new Segment());
  seg->name_ = name;
  bip::shared_memory_object shm(bip::open_only, name.c_str(), bip::read_write);
  bip::offset_t size = 0;
  shm.get_size(size);
  if (size < static_cast<bip::offset_t>(sizeof(SegmentHeader)))
    throw LayoutMismatch("mpop: segment '" + name + "' is too small to be an mpop segment");
  auto* region = new bip::mapped_region(shm, bip::read_write);
  seg->region_.reset(region, [](void* p) { delete static_cast<bip::mapped_region*>(p); });
  seg->base_ = static_cast<uint8_t*>(region->get_address());
  seg->size_ = static_cast<uint64_t>(size);
  auto* h = reinterpret_cast<SegmentHeader*>(seg->base_);
  if (std::atomic_ref<uint64_t>(h->magic).load(std::memory_order_acquire) != kSegmentMagic)
    throw LayoutMismatch("mpop: segment '" + name +
                         "' has a bad magic number: not an mpop segment (or one still being created)");
  if (h->layout_version != kLayoutVersion)
    throw LayoutMismatch("mpop: segment '" + name + "' has layout version " +
                         std::to_string(h->layout_version) + ", this build expects " +
                         std::to_string(kLayoutVersion));
  Geometry g = geometry(h->config);
  auto mismatch = [&](const char* what, uint64_t has, uint64_t implied) {
    return LayoutMismatch("mpop: segment '" + name + "' has " + what + " " + std::to_string(has) +
                          " but its configuration implies " + std::to_string(implied) +
                          " in this build: refusing a mismatched layout");
  };
  if (g.task_stride != h->task_stride) throw mismatch("slot stride", h->task_stride, g.task_stride);
  if (g.worker_stride != h->worker_stride) throw mismatch("worker record stride", h->worker_stride, g.worker_stride);
  if (g.client_stride != h->client_stride) throw mismatch("client record stride", h->client_stride, g.client_stride);
  if (g.total != h->total_bytes) throw mismatch("size", h->total_bytes, g.total);
  if (g.total > seg->size_) throw mismatch("mapped size", seg->size_, g.total);
  seg->header_ = h;
  h->attached.fetch_add(1, std::memory_order_acq_rel);
  seg->bind_views();
  return seg;
}

void Segment::bind_views() {
  auto* h = header_;
  tasks_ = TaskRing::attach(base_ + h->ring_off);
  results_ = TaskRing::attach(base_ + h->results_off);
  pool_ = ArgPool::attach(base_ + h->pool_off);
  workers_.base = base_ + h->workers_off;
  workers_.count = h->config.max_workers;
  workers_.stride = h->worker_stride;
  workers_.batch = h->config.batch_size;
  workers_.entry_stride = h->entry_stride;
}

bool Segment::remove(const std::string& name) {
  return bip::shared_memory_object::remove(name.c_str());
}

uint32_t Segment::leave(bool owner_dead) {
  if (left_ || !header_) return 0;
  left_ = true;
  if (process_.inherited()) return header_->attached.load(std::memory_order_acquire);
  if ((unlink_on_close_ || owner_dead) && header_->owner_released.exchange(1) == 0 && owner_dead)
    header_->attached.fetch_sub(1, std::memory_order_acq_rel);
  uint32_t left = header_->attached.fetch_sub(1, std::memory_order_acq_rel) - 1;
  if (unlink_on_close_ || left == 0) remove(name_);
  return left;
}

Segment::~Segment() { leave(); }

bool Segment::request_cancel(uint64_t seq) {
  CancelTable& t = header_->cancels;
  if (!t.ask(seq)) return false;
  if (task_waiting(seq)) return true;
  return !t.withdraw(seq);  // a worker may have taken it meanwhile: then it is cancelled
}

namespace {
// The seq of the task body at `body` (the TaskHeader comes first), read atomically: the
// body may be rewritten while an observer reads it.
MPOP_VALIDATED_READS uint64_t body_seq(const uint8_t* body) {
  uint64_t s;
  std::memcpy(&s, body + offsetof(TaskHeader, seq), sizeof s);
  return s;
}
}  // namespace

bool Segment::request_kill(uint64_t seq) {
  for (uint32_t i = 0; i < workers_.count; ++i) {
    WorkerRecord& r = workers_.record(i);
    if (r.running_since_ns.load(std::memory_order_acquire) == 0 || r.running_seq.load(std::memory_order_acquire) != seq)
      continue;
    uint64_t none = 0;
    return r.kill_request.compare_exchange_strong(none, seq) || none == seq;
  }
  return false;
}

MPOP_VALIDATED_READS bool Segment::task_waiting(uint64_t seq) const {
  if (tasks_.find_unclaimed([&](const uint8_t* body) { return body_seq(body) == seq; })) return true;
  // Pending in a local queue: entries are read between two looks at the worker's claim
  // window (no claim rewrote them meanwhile), and a match counts once its state is still
  // pending after its body was read.
  for (uint32_t i = 0; i < workers_.count; ++i) {
    WorkerRecord& r = workers_.record(i);
    for (int attempt = 0; attempt < 1000; ++attempt) {
      const uint64_t epoch = r.claim.epoch.load(std::memory_order_seq_cst);
      if (r.claim.in_claim.load(std::memory_order_seq_cst) != 0) {
        cpu_relax();
        continue;
      }
      bool found = false;
      const uint32_t n = std::min(r.local_count.load(std::memory_order_acquire), workers_.batch);
      for (uint32_t j = 0; j < n && !found; ++j) {
        LocalEntry& e = workers_.entry(i, j);
        if (e.state.load(std::memory_order_seq_cst) != static_cast<uint32_t>(LocalState::kPending)) continue;
        const bool same = body_seq(workers_.entry_body(i, j)) == seq;
        std::atomic_thread_fence(std::memory_order_acquire);  // the body read before the re-check
        found = same && e.state.load(std::memory_order_seq_cst) == static_cast<uint32_t>(LocalState::kPending);
      }
      std::atomic_thread_fence(std::memory_order_acquire);
      if (r.claim.in_claim.load(std::memory_order_seq_cst) == 0 &&
          r.claim.epoch.load(std::memory_order_seq_cst) == epoch) {
        if (found) return true;
        break;
      }
    }
  }
  return false;
}

}  // namespace mpop

namespace mpop {

std::vector<const ClaimState*> Segment::push_windows(bool result_ring) const {
  std::vector<const ClaimState*> all;
  const SegmentHeader& h = *header_;
  all.push_back(result_ring ? &h.supervisor_post : &h.supervisor_push);
  for (uint32_t i = 0; i < client_count(); ++i)
    for (const ClaimState& w : (result_ring ? client(i).post : client(i).push).w) all.push_back(&w);
  if (result_ring)
    for (uint32_t i = 0; i < workers_.count; ++i) all.push_back(&workers_.record(i).publish);
  return all;
}

void Segment::void_abandoned_push(ClaimState& w, bool result_ring) {
  if (!w.in_claim.load(std::memory_order_seq_cst)) return;
  TaskRing& ring = result_ring ? results_ : tasks_;
  const uint64_t head = w.head;
  const bool reserved = w.count != 0;  // its CAS took the cell (else: maybe, maybe not)
  // A cell at `head` reserved before this look was reserved by a producer inside its
  // window (raised before its CAS): the dead one, or one whose window shows `head` until
  // it has published the cell.
  const uint64_t end = ring.enqueue_pos();
  std::atomic_thread_fence(std::memory_order_seq_cst);
  bool theirs = false;
  if (!reserved) {
    for (const ClaimState* other : push_windows(result_ring))
      theirs |= other != &w && other->in_claim.load(std::memory_order_seq_cst) && other->head == head;
  }
  if (head < end && !theirs && ring.is_reserved_unpublished(head)) {
    ring.publish_reserved(head, [&](void* body) {
      std::memset(body, 0, ring.body_bytes());
      if (result_ring) {
        ResultHeader r;
        r.status = ResultStatus::kVoid;
        std::memcpy(body, &r, sizeof r);
      } else {
        TaskHeader t;
        t.flags = kTaskVoid;
        std::memcpy(body, &t, sizeof t);
      }
    });
  }
  w.in_claim.store(0, std::memory_order_seq_cst);
}

}  // namespace mpop
