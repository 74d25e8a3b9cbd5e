// Segment bindings: create/attach/remove, the registry log, shutdown flag and a status
// snapshot of the rings, pool and worker records.
#include <pybind11/stl.h>

#include <unistd.h>

#include <atomic>
#include <cstring>
#include <thread>

#include "bindings.hpp"
#include "mpop/fault.hpp"

namespace mpop::bindings {

namespace {

SlotLayout layout_from(const py::dict& d) {
  SlotLayout l;
  l.size = d["size"].cast<uint32_t>();
  l.tsk_id_off = d["tsk_id_off"].cast<uint32_t>();
  l.tsk_id_size = d["tsk_id_size"].cast<uint32_t>();
  l.fn_id_off = d["fn_id_off"].cast<uint32_t>();
  l.fn_id_size = d["fn_id_size"].cast<uint32_t>();
  l.args_off = d["args_off"].cast<uint32_t>();
  l.args_count = d["args_count"].cast<uint32_t>();
  l.cargs_off = d["cargs_off"].cast<uint32_t>();
  l.cargs_len = d["cargs_len"].cast<uint32_t>();
  l.meta_off = d["meta_off"].cast<uint32_t>();
  l.meta_len = d["meta_len"].cast<uint32_t>();
  return l;
}

const char* state_name(uint32_t s) {
  switch (static_cast<WorkerState>(s)) {
    case WorkerState::kEmpty: return "new";
    case WorkerState::kStarting: return "starting";
    case WorkerState::kIdle: return "idle";
    case WorkerState::kBusy: return "busy";
    case WorkerState::kExiting: return "exiting";
    case WorkerState::kExited: return "stopped";
    case WorkerState::kDead: return "dead";
  }
  return "?";
}

// Registry log entries: [u32 fn_id | u32 len | len bytes], appended by the owner, or by
// any client of a persistent pool: a writer reserves its bytes (registry_reserved), writes
// them, then waits for the writers before it to publish theirs (registry_len), so readers
// see whole entries in order.
void write_registry(Segment& s, uint32_t fn_id, const py::bytes& blob) {
  std::string_view b = blob;
  SegmentHeader& h = s.header();
  const uint64_t need = 8 + b.size();
  uint64_t at = h.registry_reserved.load(std::memory_order_relaxed);
  do {
    if (at + need > h.config.registry_bytes)
      throw py::value_error("mpop: the handler registry area is full (" +
                            std::to_string(h.config.registry_bytes) +
                            " bytes); pass a larger registry_bytes to MpopApi");
  } while (!h.registry_reserved.compare_exchange_weak(at, at + need, std::memory_order_acq_rel));
  uint8_t* p = s.registry() + at;
  uint32_t len = static_cast<uint32_t>(b.size());
  std::memcpy(p, &fn_id, 4);
  std::memcpy(p + 4, &len, 4);
  std::memcpy(p + 8, b.data(), b.size());
  const int64_t deadline = monotonic_ns() + 10'000'000'000;
  uint64_t expected = at;
  while (!h.registry_len.compare_exchange_weak(expected, at + need, std::memory_order_release)) {
    expected = at;
    if (monotonic_ns() > deadline)
      throw std::runtime_error("mpop: another client of the pool died while it wrote to the handler registry");
    std::this_thread::yield();
  }
}

py::tuple read_registry(Segment& s, uint64_t from) {
  uint64_t end = s.header().registry_len.load(std::memory_order_acquire);
  py::list out;
  uint64_t at = from;
  while (at + 8 <= end) {
    uint32_t fn_id, len;
    std::memcpy(&fn_id, s.registry() + at, 4);
    std::memcpy(&len, s.registry() + at + 4, 4);
    out.append(py::make_tuple(fn_id, py::bytes(reinterpret_cast<const char*>(s.registry() + at + 8), len)));
    at += 8 + len;
  }
  return py::make_tuple(out, at);
}

ClientRecord& client_at(Segment& s, uint32_t i) {
  if (i >= s.client_count())
    throw py::index_error("mpop: client " + std::to_string(i) + " is out of range (" +
                          std::to_string(s.client_count()) + " client records)");
  return s.client(i);
}

py::dict client_info(Segment& s, uint32_t i) {
  ClientRecord& r = client_at(s, i);
  py::dict d;
  d["index"] = i;
  const uint32_t lease = r.lease.load();
  d["lease"] = lease;
  d["state"] = static_cast<uint32_t>(lease_state(lease));
  d["pid"] = r.pid.load();
  d["start_time"] = r.start_time.load();
  d["adopter"] = static_cast<int64_t>(r.adopter.load()) - 1;  // -1: none
  d["generation"] = lease_generation(lease);
  d["last_seq"] = r.next_seq.load() - 1;
  d["complete_below"] = r.complete_below.load();
  d["forwarded"] = r.forwarded.load();
  d["live_pending"] = s.live_mailbox(i).size();
  d["plain_pending"] = s.plain_mailbox(i).size();
  d["seq_base"] = client_seq_base(i);
  return d;
}

py::dict worker_status(Segment& s, uint32_t i) {
  WorkerRecord& r = s.workers().record(i);
  py::dict d;
  d["id"] = i;
  d["pid"] = r.pid.load();
  d["start_time"] = r.start_time.load();
  const uint32_t state = r.state.load();
  d["state"] = state_name(state);
  d["live"] = holds_process(static_cast<WorkerState>(state));
  d["completed"] = r.completed.load();
  d["failed"] = r.failed.load();
  d["restarts"] = r.restarts.load();
  d["recycled"] = r.recycled.load();
  d["busy_s"] = static_cast<double>(r.busy_ns.load()) / 1e9;
  d["idle_s"] = static_cast<double>(r.idle_ns.load()) / 1e9;
  d["claims"] = r.claims.load();
  int64_t since = r.running_since_ns.load();
  d["running_seq"] = since ? py::object(py::int_(r.running_seq.load())) : py::object(py::none());
  d["running_fn_id"] = since ? py::object(py::int_(r.running_fn.load())) : py::object(py::none());
  d["running_tsk_id"] = since ? py::object(py::int_(r.running_tsk.load())) : py::object(py::none());
  d["running_for_s"] = since > 1 ? py::float_(static_cast<double>(monotonic_ns() - since) / 1e9)
                                 : py::object(py::none());
  d["local_queue"] = r.local_count.load() > r.local_next.load() ? r.local_count.load() - r.local_next.load() : 0u;
  d["generation"] = r.generation.load();
  // Why its last process could not start, if it said (decoded leniently: it may have been
  // cut in the middle of a character).
  const char* err = r.start_error;
  py::bytes raw(err, strnlen(err, sizeof r.start_error));
  d["start_error"] = raw.attr("decode")("utf-8", "replace");
  return d;
}

}  // namespace

void register_segment(py::module_& m) {
  py::register_exception<LayoutMismatch>(m, "LayoutMismatch", PyExc_RuntimeError);

  py::class_<Segment, SegmentPtr>(m, "Segment")
      .def_static(
          "create",
          [](const std::string& prefix, const py::dict& slot, uint32_t queue_slots,
             uint32_t result_slots, uint32_t max_workers, uint32_t batch_size, uint64_t pool_bytes,
             uint64_t registry_bytes, bool debug, double debug_delay, bool max_performance,
             uint64_t max_tasks_per_worker, uint64_t max_worker_memory, uint32_t max_clients,
             uint32_t client_slots, double orphan_timeout) {
            SegmentConfig c;
            c.slot = layout_from(slot);
            c.queue_slots = queue_slots;
            c.result_slots = result_slots;
            c.max_workers = max_workers;
            c.batch_size = batch_size;
            c.pool_bytes = pool_bytes;
            c.registry_bytes = registry_bytes;
            c.debug = debug;
            c.debug_delay_ns = static_cast<int64_t>(debug_delay * 1e9);
            c.max_performance = max_performance;
            c.max_tasks_per_worker = max_tasks_per_worker;
            c.max_worker_memory = max_worker_memory;
            c.max_clients = max_clients;
            c.client_slots = client_slots;
            c.orphan_timeout_ns = static_cast<int64_t>(orphan_timeout * 1e9);
            return SegmentPtr(Segment::create(prefix, c));
          },
          py::arg("prefix"), py::arg("slot"), py::arg("queue_slots"), py::arg("result_slots"),
          py::arg("max_workers"), py::arg("batch_size"), py::arg("pool_bytes"),
          py::arg("registry_bytes"), py::arg("debug") = false, py::arg("debug_delay") = 0.0,
          py::arg("max_performance") = false, py::arg("max_tasks_per_worker") = 0,
          py::arg("max_worker_memory") = 0, py::arg("max_clients") = 0, py::arg("client_slots") = 0,
          py::arg("orphan_timeout") = 0.0)
      .def_static("attach", [](const std::string& name) { return SegmentPtr(Segment::attach(name)); })
      .def_static("remove", &Segment::remove)
      .def_static("process_start_time", &Segment::process_start_time)
      .def_property_readonly("name", &Segment::name)
      .def_property_readonly("size", &Segment::size)
      .def_property_readonly(
          "owner_pid",
          [](Segment& s) { return std::atomic_ref<int32_t>(s.header().owner_pid).load(std::memory_order_acquire); })
      .def_property_readonly("owner_start_time",
                             [](Segment& s) {
                               return std::atomic_ref<uint64_t>(s.header().owner_start_time)
                                   .load(std::memory_order_relaxed);
                             })
      .def_property_readonly("max_workers", [](Segment& s) { return s.config().max_workers; })
      .def_property_readonly("queue_slots", [](Segment& s) { return s.config().queue_slots; })
      .def_property_readonly("task_stride", [](Segment& s) { return s.header().task_stride; })
      .def_property_readonly("debug", [](Segment& s) { return s.config().debug != 0; })
      .def_property_readonly("attached", [](Segment& s) { return s.header().attached.load(); })
      .def("leave", &Segment::leave, py::arg("owner_dead") = false)
      // A persistent pool's supervisor process becomes the segment's owner before it starts
      // any worker: workers watch it, not the process that created the pool, and it removes
      // the segment when it leaves.
      // -- a persistent pool's client records (segment.hpp, ClientRecord) --
      .def_property_readonly("client_count", &Segment::client_count)
      .def("client_info", &client_info, py::arg("index"))
      .def("client_lease", [](Segment& s, uint32_t i) { return client_at(s, i).lease.load(); }, py::arg("index"))
      .def("claim_client",  // takes record `index`, free under lease `expect`, for this process
           [](Segment& s, uint32_t i, uint32_t expect) {
             ClientRecord& r = client_at(s, i);
             if (lease_state(expect) != ClientState::kFree) return false;
             const uint32_t gen = (expect >> 2) + 1;
             if (!r.lease.compare_exchange_strong(expect, make_lease(gen, ClientState::kClaiming))) return false;
             r.adopter.store(0);
             for (auto& t : r.push.taken) t.store(0);  // (a dead client may have held one)
             for (auto& t : r.post.taken) t.store(0);
             r.start_time.store(Segment::process_start_time(getpid()));
             r.pid.store(static_cast<int32_t>(getpid()));
             r.lease.store(make_lease(gen, ClientState::kAttached));
             return true;
           }, py::arg("index"), py::arg("expect"))
      .def("request_kill", &Segment::request_kill, py::arg("seq"))  // see segment.hpp
      .def("release_client",  // record `index`, held under lease `expect`, becomes gone or free
           [](Segment& s, uint32_t i, uint32_t expect, bool gone) {
             ClientRecord& r = client_at(s, i);
             const uint32_t after = make_lease(expect >> 2, gone ? ClientState::kGone : ClientState::kFree);
             const int32_t pid = r.pid.load();
             bool done = false;
             if (lease_state(expect) == ClientState::kAttached &&
                 (pid <= 0 || Segment::process_start_time(pid) != r.start_time.load())) {
               // A dead client's push it was in the middle of: its cell gets a filler, so
               // that the workers (task ring) and the forwarder (result ring) move past it.
               // The record is held (claiming) meanwhile: one reaper does it.
               done = r.lease.compare_exchange_strong(expect, make_lease(expect >> 2, ClientState::kClaiming));
               if (done) {
                 for (ClaimState& w : r.push.w) s.void_abandoned_push(w, false);
                 for (ClaimState& w : r.post.w) s.void_abandoned_push(w, true);
                 r.lease.store(after);
               }
             } else {
               done = r.lease.compare_exchange_strong(expect, after);
             }
             s.results().wake_consumers();  // the forwarder re-reads who reads what
             return done;
           }, py::arg("index"), py::arg("expect"), py::arg("gone"))
      .def("adopt_client",  // client `by` takes over gone client `index` (whose adopter was `expect`)
           [](Segment& s, uint32_t i, uint32_t by, uint32_t expect) {
             ClientRecord& r = client_at(s, i);
             if (lease_state(r.lease.load()) != ClientState::kGone) return false;
             return r.adopter.compare_exchange_strong(expect, by + 1);
           }, py::arg("index"), py::arg("by"), py::arg("expect"))
      .def("take_ownership",
           [](Segment& s) {
             SegmentHeader& h = s.header();
             const pid_t me = getpid();
             const uint64_t start = Segment::process_start_time(me);
             // Start time, then pid, then the flag: a reader that sees the flag (acquire)
             // sees both, and one that reads the pair meanwhile sees the creator's start
             // time with at most the new pid, which looks dead, never alive and wrong.
             std::atomic_ref<uint64_t>(h.owner_start_time).store(start, std::memory_order_relaxed);
             std::atomic_ref<int32_t>(h.owner_pid).store(static_cast<int32_t>(me), std::memory_order_release);
             std::atomic_ref<uint32_t>(h.supervised).store(1, std::memory_order_release);
             s.set_unlink_on_close(true);
           })
      // A new supervisor process of a persistent pool whose supervisor `dead_pid` died: takes
      // the segment over unless another one did first (false).
      .def("take_over",
           [](Segment& s, int32_t dead_pid) {
             SegmentHeader& h = s.header();
             const pid_t me = getpid();
             if (!std::atomic_ref<int32_t>(h.owner_pid).compare_exchange_strong(dead_pid, static_cast<int32_t>(me),
                                                                               std::memory_order_acq_rel))
               return false;
             // Until the start time is ours too, the pair names no live process: readers
             // see a dead owner for that moment, never a wrong live one.
             std::atomic_ref<uint64_t>(h.owner_start_time).store(Segment::process_start_time(me),
                                                                 std::memory_order_release);
             s.set_unlink_on_close(true);
             maybe_fault(h, FaultStep::kSupervisorTookOver);
             return true;
           }, py::arg("dead_pid"))
      .def_property_readonly("orphan_timeout", [](Segment& s) { return s.config().orphan_timeout_ns / 1e9; })
      .def_property_readonly("supervised",
                             [](Segment& s) {
                               return std::atomic_ref<uint32_t>(s.header().supervised).load(
                                          std::memory_order_acquire) != 0;
                             })
      // Whether this process's leave() removes the segment (its creator's does, until a
      // persistent pool's supervisor process takes it over).
      .def("set_unlink_on_close", &Segment::set_unlink_on_close, py::arg("value"))
      .def("set_shutdown",
           [](Segment& s) {
             s.header().shutdown.store(1, std::memory_order_release);
             s.tasks().wake_consumers();
             s.tasks().wake_producers();
           })
      .def_property_readonly("shutdown", [](Segment& s) { return s.header().shutdown.load() != 0; })
      .def("cancel_below",
           [](Segment& s, uint64_t seq) {
             uint64_t cur = s.header().cancel_below.load();
             while (cur < seq && !s.header().cancel_below.compare_exchange_weak(cur, seq)) {
             }
           })
      .def("write_registry", &write_registry)
      .def_property_readonly("registry_epoch",
                             [](Segment& s) { return s.header().registry_epoch.load(std::memory_order_acquire); })
      .def("bump_registry_epoch",
           [](Segment& s) { s.header().registry_epoch.fetch_add(1, std::memory_order_release); })
      .def("read_registry", &read_registry, py::arg("offset") = 0)
      .def("set_start_error",
           [](Segment& s, uint32_t id, const std::string& text) {
             if (id >= s.workers().count) return;
             auto& rec = s.workers().record(id);
             std::snprintf(rec.start_error, sizeof rec.start_error, "%s", text.c_str());
           })
      .def("queue_status",
           [](Segment& s) {
             py::dict d;
             d["capacity"] = s.config().queue_slots;
             d["queued"] = s.tasks().size();
             d["enqueued_total"] = s.tasks().enqueue_pos();
             d["claimed_total"] = s.tasks().dequeue_pos();
             d["results_pending"] = s.results().size();
             d["pool_bytes"] = s.pool().capacity_bytes();
             d["pool_used_bytes"] = s.pool().used_bytes();
             d["slot_stride"] = s.header().task_stride;
             return d;
           })
      .def(
          "inject_fault",
          [](Segment& s, uint32_t step, uint32_t after) {
            // Test-only: the `after`-th time any worker reaches `step`, it SIGKILLs itself.
            s.header().fault_countdown.store(after, std::memory_order_relaxed);
            s.header().fault_step.store(step, std::memory_order_release);
          },
          py::arg("step"), py::arg("after") = 1)
      .def_property_readonly("fault_pending", [](Segment& s) { return s.header().fault_step.load() != 0; })
      .def("worker_status", &worker_status)
      .def("workers_status", [](Segment& s) {
        py::list out;
        for (uint32_t i = 0; i < s.workers().count; ++i) {
          if (s.workers().record(i).state.load() == static_cast<uint32_t>(WorkerState::kEmpty)) continue;
          out.append(worker_status(s, i));
        }
        return out;
      });
}

}  // namespace mpop::bindings
