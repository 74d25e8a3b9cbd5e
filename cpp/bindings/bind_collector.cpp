// Collector bindings: drains the result ring into Python tuples in batches; the wait for
// the first result happens without the GIL.
#include "bindings.hpp"  // first: Python.h before structmember.h
#include <structmember.h>

#include "mpop/collector.hpp"
#include "py_codec.hpp"

namespace mpop::bindings {

namespace {

// How long the owner keeps looking for a result before it sleeps (see kIdleSpinNs).
#ifndef MPOP_RESULT_SPIN_NS
#define MPOP_RESULT_SPIN_NS 15000
#endif
constexpr int64_t kResultSpinNs = MPOP_RESULT_SPIN_NS;

class PyCollector {
 public:
  explicit PyCollector(SegmentPtr seg) : seg_(std::move(seg)), col_(*seg_) {}
  // Over client `client`'s live or plain mailbox (Collector's mailbox constructor).
  PyCollector(SegmentPtr seg, uint32_t client, bool plain, bool track, uint64_t first_seq)
      : seg_(std::move(seg)), col_(*seg_, mailbox(*seg_, client, plain), first_seq, track) {}

  // [ResultRecord] (make_result_record). For status kError the value is the bytes of the
  // pickled error, or the exception raised while decoding the value.
  //
  // The wait (up to `timeout`) is for `want` results, or fewer if they come out of order:
  // a caller that needs many (run(), wait()) sleeps through the rest instead of waking
  // for each. `spin` polls for kResultSpinNs before sleeping, for a caller that waits for
  // one result and wants it with the least latency (future.result()); it costs CPU the
  // workers could use, so the others do not spin.
  py::list drain(size_t max, const py::object& timeout, uint32_t want, bool spin, const py::object& epoch) {
    wait_for(timeout, want, spin, epoch);
    py::list out;
    drain_into([&](const ResultHeader& h, uint8_t status, py::object& v) {
      out.append(make_result_record(h, status, v));
    }, max);
    return out;
  }

  // settle(): where the results that need no Python code go. `futures` is the router's
  // seq -> future dict; a future (a FutureCore) that nobody waits on and that has no
  // callbacks gets its value through future_finish, while its shared lock is held
  // (`acquire`, `release`). A plain (enqueue()d) task's value becomes a `result_cls`
  // (TaskResult) passed to `plain_append`. `timings_append` (or None) receives
  // (queue_wait_s, run_time_s).
  void bind_settle(py::dict futures, py::object acquire, py::object release, py::object result_cls,
                   py::object plain_append, py::object timings_append) {
    if (!PyType_Check(result_cls.ptr())) throw py::type_error("bind_settle: result_cls must be a class");
    s_ = std::make_shared<Settle>();
    s_->futures = std::move(futures);
    s_->acquire = std::move(acquire);
    s_->release = std::move(release);
    s_->result_cls = std::move(result_cls);
    // Where each field of a result lives in the instance (its slot's offset).
    const char* fields[kResultFields] = {"success", "value", "error", "tsk_id", "seq", "fn_id", "worker_id",
                                         "attempts", "queue_wait_s", "run_time_s"};
    auto* tp = reinterpret_cast<PyTypeObject*>(s_->result_cls.ptr());
    for (int i = 0; i < kResultFields; ++i) {
      PyObject* descr = PyDict_GetItemString(tp->tp_dict, fields[i]);  // borrowed
      if (descr == nullptr || Py_TYPE(descr) != &PyMemberDescr_Type)
        throw py::type_error(std::string("bind_settle: result_cls has no slot ") + fields[i]);
      PyMemberDef* m = reinterpret_cast<PyMemberDescrObject*>(descr)->d_member;
      if (m->type != T_OBJECT_EX || m->offset < static_cast<Py_ssize_t>(sizeof(PyObject)) ||
          m->offset + static_cast<Py_ssize_t>(sizeof(PyObject*)) > tp->tp_basicsize)
        throw py::type_error(std::string("bind_settle: unexpected slot ") + fields[i]);
      s_->offsets[i] = m->offset;
    }
    s_->plain_append = std::move(plain_append);
    s_->timings_append = std::move(timings_append);
  }

  // Lets go of everything bind_settle gave it (at shutdown, and for the garbage collector:
  // the router holds this collector, and this collector holds the router's dict,
  // future class and bound methods, a cycle only the collector's traverse and clear let
  // the garbage collector see and break).
  void unbind_settle() { s_.reset(); }

  int traverse(visitproc visit, void* arg) const {
    if (!s_) return 0;
    for (const py::object* o : {&s_->futures, &s_->acquire, &s_->release, &s_->result_cls, &s_->plain_append,
                                &s_->timings_append})
      Py_VISIT(o->ptr());
    return 0;
  }

  // drain() that settles what it can itself (see bind_settle): returns (delivered, records
  // for the router's delivery, [(future, value)] for MpopFuture.deliver). Records of
  // failures, map chunks, and futures it cannot settle go back to Python.
  py::tuple settle(size_t max, const py::object& timeout, uint32_t want, bool spin, const py::object& epoch) {
    if (!s_) throw std::logic_error("mpop: Collector.settle before bind_settle");
    std::shared_ptr<Settle> keep = s_;  // unbind_settle() may run while this waits
    Settle& S = *keep;
    wait_for(timeout, want, spin, epoch);
    py::list slow, slow_futs;
    std::vector<std::pair<py::object, py::object>> ready;  // (future, value), settled below
    const bool timed = !S.timings_append.is_none();
    size_t n = drain_into([&](const ResultHeader& h, uint8_t status, py::object& v) {
      if (status == static_cast<uint8_t>(ResultStatus::kOk) && h.route == kRoutePlain) {
        py::object wait_s = py::none(), run_s = py::none();
        if (h.start_ns) {
          run_s = py::float_(run_time_s(h));
          if (h.enqueue_ns) wait_s = py::float_(queue_wait_s(h));
          if (timed) S.timings_append(py::make_tuple(queue_wait_s(h), run_s));
        }
        S.plain_append(make_result(S, h, v, wait_s, run_s));
        return;
      }
      if (status == static_cast<uint8_t>(ResultStatus::kOk) && h.route == kRouteFuture) {
        py::int_ key(h.seq);
        PyObject* fut = PyDict_GetItemWithError(S.futures.ptr(), key.ptr());
        if (fut == nullptr && PyErr_Occurred()) throw py::error_already_set();
        if (fut != nullptr) {
          py::object f = py::reinterpret_borrow<py::object>(fut);
          if (PyDict_DelItem(S.futures.ptr(), key.ptr()) < 0) throw py::error_already_set();
          if (timed && h.start_ns) S.timings_append(py::make_tuple(queue_wait_s(h), run_time_s(h)));
          if (is_future_core(fut))
            ready.emplace_back(std::move(f), v);
          else
            slow_futs.append(py::make_tuple(f, v));
          return;
        }
        // Not registered (yet): the router keeps it as an early result.
      }
      slow.append(make_result_record(h, status, v));
    }, max);
    if (!ready.empty()) {
      S.acquire();
      for (auto& [f, v] : ready)  // waited on, with callbacks, or settled by the user: deliver
        if (!future_finish_if_quiet(f.ptr(), v.ptr())) slow_futs.append(py::make_tuple(f, v));
      S.release();
    }
    return py::make_tuple(n, slow, slow_futs);
  }

  // Interrupts so far (see wait_for's `since`).
  uint32_t epoch() const { return interrupts_.load(); }

  // Wakes a drain() that is waiting, from any thread.
  void interrupt() {
    interrupts_.fetch_add(1);
    col_.ring().wake_consumers();
  }

  Collector& native() { return col_; }
  Segment& segment() { return *seg_; }

 private:
  static TaskRing mailbox(Segment& seg, uint32_t client, bool plain) {
    if (client >= seg.client_count())
      throw py::value_error("mpop: client " + std::to_string(client) + " is out of range (the pool has " +
                            std::to_string(seg.client_count()) + " client records)");
    return plain ? seg.plain_mailbox(client) : seg.live_mailbox(client);
  }

  static constexpr int kResultFields = 10;

  struct Settle {
    py::object futures, acquire, release, result_cls, plain_append, timings_append;
    Py_ssize_t offsets[kResultFields] = {};
  };

  // Waits up to `timeout` for `want` results (see drain()).
  // An interrupt() after `since` (an earlier `epoch` reading; None: now) ends the wait: a
  // caller that checked its own stop flag after reading the epoch misses no interrupt.
  void wait_for(const py::object& timeout, uint32_t want, bool spin, const py::object& since) {
    int64_t deadline = deadline_from_timeout(timeout);
    uint32_t epoch = since.is_none() ? interrupts_.load() : since.cast<uint32_t>();
    // Also stop when somebody waits for room in the pool and results are in: draining them
    // frees their blocks (see PoolControl::starving).
    auto stop = [&] {
      return interrupts_.load() != epoch || (seg_->pool().starving() != 0 && col_.ring().has_published());
    };
    // At most half the ring: the workers keep room to publish while this thread drains.
    want = std::clamp<uint32_t>(want, 1, col_.ring().capacity() / 2);
    if (deadline != 0 && col_.ring().published_run(want) < want) {
      py::gil_scoped_release nogil;
      col_.ring().wait_published_n(want, deadline, stop, spin ? 64 : 0, spin ? kResultSpinNs : 0);
    }
  }

  // Hands up to `max` results already published to sink(header, status, value), decoded.
  template <class Sink>
  size_t drain_into(Sink&& sink, size_t max = 4096) {
    uint32_t epoch = interrupts_.load();
    auto stop = [&] { return interrupts_.load() != epoch; };
    const uint64_t pin_limit = seg_->pool().capacity_bytes() / 4;
    return col_.drain(max, 0, [&](const ResultHeader& h, const uint8_t* value, uint32_t len) {
      py::object v = py::none();
      auto status = static_cast<uint8_t>(h.status);
      if (h.route >= kFirstSideRoute) {  // a side message: its bytes as they came
        v = py::bytes(reinterpret_cast<const char*>(value), len);
        sink(h, status, v);
        return false;
      }
      // An array in a pooled result becomes a view over its block (no copy out), as long as
      // the results held that way stay within a quarter of the pool; past that, a copy, so
      // results a caller keeps never starve the workers of room.
      std::shared_ptr<py_codec::BlockLease> lease;
      if (h.value_encoding == ValueEncoding::kPooled && h.status == ResultStatus::kOk &&
          pinned_->load(std::memory_order_relaxed) + h.value_len <= pin_limit)
        lease = std::make_shared<py_codec::BlockLease>(
            py_codec::BlockLease{seg_, h.value_ref, h.value_len, false, true, pinned_});
      if (len) {
        try {
          v = py_codec::decode_value(value, len, lease ? &lease : nullptr);
        } catch (py::error_already_set& e) {
          v = e.value();
          status = static_cast<uint8_t>(ResultStatus::kError);
        }
      }
      sink(h, status, v);
      if (!lease || lease.use_count() == 1) return false;  // no view made: freed as usual
      pinned_->fetch_add(h.value_len, std::memory_order_relaxed);
      lease->pinned = true;  // the last view frees the block
      return true;
    }, stop);
  }

  // Values that cannot refer to anything (so a holder of only these joins no cycle).
  static bool atomic(PyObject* v) {
    return v == Py_None || PyLong_CheckExact(v) || PyFloat_CheckExact(v) || PyUnicode_CheckExact(v) ||
           PyBytes_CheckExact(v) || PyBool_Check(v);
  }

  // A TaskResult for an ok plain task. TaskResult is a slots dataclass: its fields are
  // written straight into their slots (offsets found by bind_settle), as its __init__
  // would set them, without that Python frame and its ten stores, the largest cost of a
  // result (tests compare the two).
  static py::object make_result(const Settle& S, const ResultHeader& h, const py::object& v,
                                const py::object& wait_s, const py::object& run_s) {
    auto* tp = reinterpret_cast<PyTypeObject*>(S.result_cls.ptr());
    PyObject* r = tp->tp_alloc(tp, 0);
    if (r == nullptr) throw py::error_already_set();
    PyObject* vals[kResultFields] = {Py_True, v.ptr(), Py_None, PyLong_FromUnsignedLong(h.tsk_id),
                                     PyLong_FromUnsignedLongLong(h.seq), PyLong_FromUnsignedLong(h.fn_id),
                                     PyLong_FromUnsignedLong(h.worker_id), PyLong_FromUnsignedLong(h.attempts),
                                     wait_s.ptr(), run_s.ptr()};
    for (int i : {0, 1, 2, 8, 9}) Py_INCREF(vals[i]);  // the others are new references
    bool ok = true;
    for (int i = 0; i < kResultFields; ++i) {
      ok = ok && vals[i] != nullptr;
      *reinterpret_cast<PyObject**>(reinterpret_cast<char*>(r) + S.offsets[i]) = vals[i];
    }
    py::object out = py::reinterpret_steal<py::object>(r);  // frees whatever was set on failure
    if (!ok) throw py::error_already_set();
    // A result holding only atomic values cannot be part of a reference cycle, so the
    // garbage collector need not walk it (CPython untracks such tuples and dicts too).
    // With hundreds of thousands of results kept, walking them took a third of the owner's
    // time. Setting a field tracks it again (LazyTracked's setattro).
    if (atomic(v.ptr())) PyObject_GC_UnTrack(r);
    return out;
  }

  SegmentPtr seg_;
  Collector col_;
  std::shared_ptr<Settle> s_;  // shared: a settle() under way keeps it (see unbind_settle)
  // Bytes of result blocks held by array views handed out (shared with their leases).
  std::shared_ptr<std::atomic<uint64_t>> pinned_ = std::make_shared<std::atomic<uint64_t>>(0);
  std::atomic<uint32_t> interrupts_{0};
};

}  // namespace

void register_collector(py::module_& m) {
  py::class_<PyCollector>(m, "Collector", py::custom_type_setup([](PyHeapTypeObject* heap_type) {
                             auto* type = &heap_type->ht_type;
                             type->tp_flags |= Py_TPFLAGS_HAVE_GC;
                             type->tp_traverse = [](PyObject* self, visitproc visit, void* arg) {
                               Py_VISIT(Py_TYPE(self));
                               if (!py::detail::is_holder_constructed(self)) return 0;
                               return py::cast<PyCollector&>(py::handle(self)).traverse(visit, arg);
                             };
                             type->tp_clear = [](PyObject* self) {
                               if (py::detail::is_holder_constructed(self))
                                 py::cast<PyCollector&>(py::handle(self)).unbind_settle();
                               return 0;
                             };
                           }))
      .def(py::init<SegmentPtr>())
      .def(py::init<SegmentPtr, uint32_t, bool, bool, uint64_t>(), py::arg("segment"), py::arg("client"),
           py::arg("plain") = false, py::arg("track") = true, py::arg("first_seq") = 1)
      .def_property_readonly("has_published", [](PyCollector& c) { return c.native().ring().has_published(); })
      .def("drain", &PyCollector::drain, py::arg("max") = 4096, py::arg("timeout") = py::none(),
           py::arg("want") = 1, py::arg("spin") = false, py::arg("epoch") = py::none())
      .def("bind_settle", &PyCollector::bind_settle)
      .def("unbind_settle", &PyCollector::unbind_settle)
      .def("settle", &PyCollector::settle, py::arg("max") = 4096, py::arg("timeout") = py::none(),
           py::arg("want") = 1, py::arg("spin") = false, py::arg("epoch") = py::none())
      .def("interrupt", &PyCollector::interrupt)
      .def_property_readonly("epoch", [](PyCollector& c) { return c.epoch(); })
      .def("is_complete", [](PyCollector& c, uint64_t seq) { return c.native().is_complete(seq); })
      .def_property_readonly("first_incomplete", [](PyCollector& c) { return c.native().first_incomplete(); })
      .def_property_readonly("completed", [](PyCollector& c) { return c.native().completed(); })
      .def("request_cancel",  // see Segment::request_cancel
           [](PyCollector& c, uint64_t seq) {
             py::gil_scoped_release nogil;
             return c.segment().request_cancel(seq);
           })
      .def("release_cancel", [](PyCollector& c, uint64_t seq) { c.segment().header().cancels.release(seq); })
      .def("mark_complete", [](PyCollector& c, uint64_t seq) { return c.native().mark_complete(seq); });
}

}  // namespace mpop::bindings
