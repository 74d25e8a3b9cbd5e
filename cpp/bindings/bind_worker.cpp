// The worker entry: runs the native worker loop with a Runner that calls Python handlers
// (argument mode or slot mode) under the GIL and encodes their results.
#include <poll.h>
#include <signal.h>
#include <sys/mman.h>

#include <cstring>
#include <unordered_map>

#include "bindings.hpp"
#include "mpop/side_channel.hpp"
#include "mpop/worker_loop.hpp"
#include "py_codec.hpp"

namespace mpop::bindings {

namespace {

// State for the SIGTERM handler (the parent-death signal): it leaves the segment (removing
// it if this is the last process out and the owner is gone) and exits at once.
SegmentHeader* g_header = nullptr;
char g_shm_path[200];
int g_owner_pidfd = -1;

void on_sigterm(int) {
  if (g_header) {
    // The parent-death signal comes while the owner is still exiting, before its pidfd
    // turns readable: give it a moment (poll is async-signal-safe).
    bool owner_dead = true;
    if (g_owner_pidfd >= 0) {
      pollfd p{g_owner_pidfd, POLLIN, 0};
      owner_dead = poll(&p, 1, 1000) > 0;
    }
    if (owner_dead && g_header->owner_released.exchange(1) == 0)
      g_header->attached.fetch_sub(1);
    if (g_header->attached.fetch_sub(1) == 1) shm_unlink(g_shm_path);
  }
  _exit(0);
}

// A worker's SideChannel, with its segment kept alive, and whether output waits in a
// stream's buffer (mpop._output): the runner has it sent after the task that wrote it.
struct PySideChannel {
  PySideChannel(SegmentPtr s, uint32_t id) : seg(std::move(s)), channel(*seg, id) {}
  SegmentPtr seg;
  SideChannel channel;
  bool pending = false;
};

struct Handler {
  py::object fn;
  py::object slot_cls;  // set for slot-mode handlers
};

class PyRunner {
 public:
  PyRunner(SegmentPtr seg, py::object resolve, py::object pack_error, py::object task_result,
           int64_t chunk_fn_id, py::object fix_chunk, PySideChannel* side, py::object flush_output)
      : side_(side),
        flush_output_(std::move(flush_output)),
        seg_(*seg),
        seg_ptr_(std::move(seg)),
        resolve_(std::move(resolve)),
        pack_error_(std::move(pack_error)),
        task_result_(std::move(task_result)),
        chunk_fn_id_(chunk_fn_id),
        fix_chunk_(std::move(fix_chunk)) {}

  ResultStatus run(const TaskRun& t, std::vector<uint8_t>& value) {
    after_publish();
    if (t.header && t.header->encoding == ArgEncoding::kPooled)
      lease_ = std::make_shared<py_codec::BlockLease>(
          py_codec::BlockLease{seg_ptr_, t.header->pool_ref, t.stream_len, false, false, nullptr});
    ResultStatus status = run_handler(t, value);
    // What the task printed goes out before its result (and so reaches the owner first).
    if (side_ && side_->pending) flush_side();
    if (status != ResultStatus::kOk) {
      value_pieces_.clear();
      last_ret_ = py::object();
    }
    // A zero-copy array (or a view of one) outlived the call: its block stays until the
    // last such view is gone, and the worker loop keeps the collector from freeing it.
    if (lease_ && lease_.use_count() > 1) pinned_ = lease_->pinned = true;
    return status;
  }
  ResultStatus fail(const std::string& why, std::vector<uint8_t>& value) {
    py::object err = py::module_::import("mpop._errors").attr("MpopError")(why);
    return error(err, value);
  }
  void before_sleep() { saved_ = PyEval_SaveThread(); }
  // Output other threads of the worker wrote while it had no task goes out before it sleeps
  // (only this thread sends: see mpop._output).
  void on_idle() {
    if (side_ && side_->pending) flush_side();
  }
  void after_sleep() {
    PyEval_RestoreThread(saved_);
    saved_ = nullptr;
  }
  bool interrupted() { return PyErr_CheckSignals() != 0; }
  const std::vector<ExternalPiece>* value_pieces() const { return &value_pieces_; }
  // The result has been copied out and the arguments settled: drop our hold on both (this
  // frees a pinned block whose views are all gone, e.g. one the handler returned).
  void after_publish() {
    value_pieces_.clear();
    keep_.clear();
    last_ret_ = py::object();
    pinned_ = false;
    lease_.reset();
  }
  bool args_pinned() const { return pinned_; }

 private:
  void flush_side() {
    side_->pending = false;
    try {
      flush_output_();
    } catch (py::error_already_set& e) {
      e.discard_as_unraisable("mpop: sending a worker's output to its owner");
    }
  }

  PySideChannel* side_;
  py::object flush_output_;
  Handler* lookup(uint32_t fn_id) {
    // A handler registered again replaces what was loaded: start over from the log.
    uint64_t epoch = seg_.header().registry_epoch.load(std::memory_order_acquire);
    if (epoch != registry_epoch_) {
      handlers_.clear();
      registry_epoch_ = epoch;
    }
    auto it = handlers_.find(fn_id);
    if (it != handlers_.end()) return &it->second;
    py::object r = resolve_(fn_id);  // reads new registry entries; None if still unknown
    if (r.is_none()) return nullptr;
    auto pair = r.cast<py::tuple>();
    Handler h{pair[0], pair[1]};
    return &handlers_.emplace(fn_id, std::move(h)).first->second;
  }

  ResultStatus error(py::handle exc, std::vector<uint8_t>& value) {
    py::bytes blob = pack_error_(exc);
    StreamWriter w(value);
    std::string_view b = blob;
    w.blob(Tag::kBytes, b.data(), b.size());
    return ResultStatus::kError;
  }

  ResultStatus run_handler(const TaskRun& t, std::vector<uint8_t>& value) {
    const SlotLayout& L = seg_.config().slot;
    try {
      Handler* h = lookup(t.fn_id);
      if (!h) {
        py::object err = py::module_::import("mpop._errors").attr("RegistryError")(
            "no handler is registered under fn_id " + std::to_string(t.fn_id) + " in worker");
        return error(err, value);
      }
      py::object ret;
      if (!h->slot_cls.is_none()) {
        py::object mv = py::reinterpret_steal<py::object>(
            PyMemoryView_FromMemory(reinterpret_cast<char*>(t.slot), L.size, PyBUF_READ));
        ret = h->fn(h->slot_cls.attr("from_buffer_copy")(mv));
      } else if (t.header->encoding == ArgEncoding::kSlotInts) {
        uint8_t n = t.header->nargs;
        PyObject* tuple = PyTuple_New(n);
        for (uint8_t i = 0; i < n; ++i) {
          int64_t v;
          std::memcpy(&v, t.slot + L.args_off + 8 * i, 8);
          PyTuple_SET_ITEM(tuple, i, PyLong_FromLongLong(v));
        }
        PyObject* r = PyObject_Call(h->fn.ptr(), tuple, nullptr);
        Py_DECREF(tuple);
        if (!r) throw py::error_already_set();
        ret = py::reinterpret_steal<py::object>(r);
      } else {
        // Arrays in a pooled stream arrive as read-only views over the pool (no copy).
        auto [args, kwargs] = py_codec::decode_call(t.stream, t.stream_len, &lease_);
        PyObject* r = PyObject_Call(h->fn.ptr(), args.ptr(), kwargs.is_none() ? nullptr : kwargs.ptr());
        if (!r) throw py::error_already_set();
        ret = py::reinterpret_steal<py::object>(r);
      }
      // A TaskResult the handler returned: its value, or its error raised (mpop._builtins).
      if (PyObject_TypeCheck(ret.ptr(), reinterpret_cast<PyTypeObject*>(task_result_.ptr()))) {
        static py::object* unwrap = new py::object(py::module_::import("mpop._builtins").attr("unwrap_result"));
        ret = (*unwrap)(ret);
      }
      // An array result's data is copied once, by the worker loop, straight to its place.
      StreamWriter w(value, &value_pieces_);
      // A map() chunk whose values are all plain (the common case) cannot hold a
      // TaskResult; only one that would be pickled goes through fix_chunk first, which
      // unwraps TaskResults the handler returned. No per-item check on the fast path.
      if (t.fn_id == chunk_fn_id_ && !fix_chunk_.is_none()) {
        if (py_codec::encode_native(ret, w, &keep_)) {
          last_ret_ = std::move(ret);
          return ResultStatus::kOk;
        }
        ret = fix_chunk_(ret);
      }
      py_codec::encode_value(ret, w, &keep_);
      last_ret_ = std::move(ret);
      return ResultStatus::kOk;
    } catch (py::error_already_set& e) {
      // SystemExit and KeyboardInterrupt raised by a handler are that task's error too.
      py::object exc = e.value();
      PyObject* tb = PyException_GetTraceback(exc.ptr());  // new reference or null
      if (tb == nullptr && e.trace()) PyException_SetTraceback(exc.ptr(), e.trace().ptr());
      Py_XDECREF(tb);
      return error(exc, value);
    }
  }

  Segment& seg_;
  SegmentPtr seg_ptr_;
  std::shared_ptr<py_codec::BlockLease> lease_;  // the running task's pooled arguments
  bool pinned_ = false;
  std::vector<ExternalPiece> value_pieces_;  // the last result's data left in place...
  std::vector<py::object> keep_;             // ...in these objects
  py::object last_ret_;
  py::object resolve_, pack_error_, task_result_;
  int64_t chunk_fn_id_;   // the map() chunk runner's fn_id, or -1
  py::object fix_chunk_;  // its results' fix-up (see run_handler), or None
  std::unordered_map<uint32_t, Handler> handlers_;
  uint64_t registry_epoch_ = 0;
  PyThreadState* saved_ = nullptr;
};

}  // namespace

void register_worker(py::module_& m) {
  m.def(
      "worker_loop",
      [](SegmentPtr seg, uint32_t id, py::object resolve, py::object pack_error,
         py::object task_result, int64_t chunk_fn_id, py::object fix_chunk, PySideChannel* side,
         py::object flush_output) {
        if (id >= seg->workers().count) throw py::value_error("worker id out of range");
        if (side && flush_output.is_none()) throw py::value_error("worker_loop: a side channel needs flush_output");
        PyRunner runner(seg, std::move(resolve), std::move(pack_error), std::move(task_result),
                        chunk_fn_id, std::move(fix_chunk), side, std::move(flush_output));
        WorkerExit e = run_worker(*seg, id, runner);
        if (PyErr_Occurred()) throw py::error_already_set();
        return std::string(to_string(e));
      },
      py::arg("segment"), py::arg("worker_id"), py::arg("resolve"), py::arg("pack_error"),
      py::arg("task_result"), py::arg("chunk_fn_id") = -1, py::arg("fix_chunk") = py::none(),
      py::arg("side") = nullptr, py::arg("flush_output") = py::none());

  // What a worker sends its owner besides results (side_channel.hpp).
  py::class_<PySideChannel>(m, "SideChannel")
      .def(py::init([](SegmentPtr seg, uint32_t id) {
             if (id >= seg->workers().count) throw py::value_error("worker id out of range");
             return std::make_unique<PySideChannel>(std::move(seg), id);
           }),
           py::arg("segment"), py::arg("worker_id"))
      .def(
          "send",
          [](PySideChannel& s, uint32_t route, const py::bytes& data) {
            if (route < kFirstSideRoute) throw py::value_error("SideChannel.send: not a side route");
            std::string_view b = data;  // the bytes object is immutable and held by the caller
            py::gil_scoped_release nogil;
            return s.channel.send(route, reinterpret_cast<const uint8_t*>(b.data()), b.size());
          },
          py::arg("route"), py::arg("data"))
      .def("mark_pending", [](PySideChannel& s) { s.pending = true; });

  // Called by a worker right after it attaches: on SIGTERM (the parent-death signal) leave
  // the segment, remove it if this is the last process out, and exit at once, even inside
  // a long handler.
  m.def("arm_worker_exit", [](SegmentPtr seg) {
    g_header = &seg->header();
    std::snprintf(g_shm_path, sizeof g_shm_path, "%s", seg->name().c_str());
    g_owner_pidfd = static_cast<int>(syscall(SYS_pidfd_open, seg->header().owner_pid, 0));
    struct sigaction sa{};
    sa.sa_handler = on_sigterm;
    sigaction(SIGTERM, &sa, nullptr);
  });

  // Whether the process the header names as owner runs now (an orphaned persistent pool's
  // workers wait for a new one; this says whether there is one).
  m.def("owner_alive", [](SegmentPtr seg) {
    SegmentHeader& h = seg->header();
    const int32_t pid = std::atomic_ref<int32_t>(h.owner_pid).load(std::memory_order_acquire);
    const uint64_t start = std::atomic_ref<uint64_t>(h.owner_start_time).load(std::memory_order_acquire);
    const int fd = static_cast<int>(syscall(SYS_pidfd_open, pid, 0));
    if (fd < 0) return false;
    pollfd p{fd, POLLIN, 0};
    const bool exited = poll(&p, 1, 0) > 0;
    close(fd);
    return !exited && Segment::process_start_time(pid) == start;
  });
  // Why a worker loop returns: the strings worker_loop() returns, by name.
  py::dict exits;
  exits["SHUTDOWN"] = to_string(WorkerExit::kShutdown);
  exits["STOP_REQUESTED"] = to_string(WorkerExit::kStopRequested);
  exits["RECYCLED"] = to_string(WorkerExit::kRecycled);
  exits["OWNER_DIED"] = to_string(WorkerExit::kOwnerDied);
  exits["INTERRUPTED"] = to_string(WorkerExit::kInterrupted);
  m.attr("WORKER_EXIT") = exits;
  m.def("leave_segment", [](SegmentPtr seg, bool owner_dead) { return seg->leave(owner_dead); });
  // Called by a worker process first thing: whether worker record `worker_id` is this
  // process's for `generation` (it fills in its pid if the supervisor has not yet). False:
  // the supervisor that started it died before it knew the pid and a new one gave the
  // record up (or moved on); the process must leave without touching it.
  m.def(
      "claim_worker",
      [](SegmentPtr seg, uint32_t worker_id, uint32_t generation) {
        if (worker_id >= seg->workers().count) throw py::value_error("no such worker record");
        const pid_t me = getpid();
        return claim_life(seg->workers().record(worker_id), generation, static_cast<uint32_t>(me),
                          Segment::process_start_time(me));
      },
      py::arg("segment"), py::arg("worker_id"), py::arg("generation"));
}

}  // namespace mpop::bindings
