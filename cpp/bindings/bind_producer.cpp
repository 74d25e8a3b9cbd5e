// Producer bindings: turns (fn_id, tsk_id, args, kwargs, c_args) into a slot plus, when
// needed, a codec stream, and hands it to the native Producer. The GIL is dropped only when
// the call has to wait for room.
#include <pybind11/stl.h>

#include <chrono>
#include <cstring>
#include <thread>
#include <vector>

#include "bindings.hpp"
#include "mpop/producer.hpp"
#include "py_codec.hpp"

namespace mpop::bindings {

class PyProducer {
 public:
  explicit PyProducer(SegmentPtr seg) : seg_(std::move(seg)), prod_(*seg_) {}
  PyProducer(SegmentPtr seg, uint32_t client) : seg_(std::move(seg)), prod_(*seg_, client), client_(client) {}

  // Returns the task's seq; 0 when there was no room (non-blocking, or the timeout
  // passed); raises RuntimeError once closed and ValueError for an oversized argument.
  // While it waits for room it calls `check()` (if given) every 100 ms, so the caller can
  // give up on a condition only it knows about, by raising.
  uint64_t enqueue(uint32_t fn_id, uint32_t tsk_id, const py::tuple& args, const py::object& kwargs,
                   const py::object& c_args, bool slot_mode, bool blocking, const py::object& timeout,
                   uint32_t route, bool claim_alone, const py::object& check, bool* encoded = nullptr) {
    std::vector<py::object> keep;  // contiguous copies of arrays that were not, until submitted
    TaskDraft d;
    d.header.route = route;
    d.header.flags = claim_alone ? uint32_t{kClaimAlone} : uint32_t{0};
    d.header.enqueue_ns = seg_->config().max_performance ? 0 : monotonic_ns();
    encode(d, keep, fn_id, tsk_id, args, kwargs, c_args, slot_mode);
    if (encoded) *encoded = true;  // errors from here on come from waiting for room
    return seq_or_raise(push(d, blocking, timeout, check), d);
  }

  // Removes every task not yet claimed by a worker (backlog and ring); returns
  // [(seq, tsk_id, fn_id, route)] so the caller can cancel their futures.
  // `only_own`: a persistent pool's client cancels only its own tasks, through its cancel
  // horizon (ClientRecord::cancel_below): the workers end those they take cancelled, and
  // the ring is left as it is (taking the other clients' tasks out to push them back would
  // lose them if this process died meanwhile). Those of its backlog are posted as
  // cancelled into the result ring, so that they reach it through the pool's forwarder like
  // every other result (and the forwarder knows they ended); only those are returned.
  py::list cancel_queued(bool only_own) {
    const SlotLayout& L = seg_->config().slot;
    py::list out;
    auto note = [&](const TaskHeader& h, const uint8_t* slot) {
      const uint32_t tsk = read_uint(slot + L.tsk_id_off, L.tsk_id_size);
      const uint32_t fn = read_uint(slot + L.fn_id_off, L.fn_id_size);
      if (!only_own) {
        out.append(py::make_tuple(h.seq, tsk, fn, h.route));
        return;
      }
      const ResultHeader r = result_without_value(h, slot, L, ResultStatus::kCancelled);  // the forwarder frees its arguments
      WindowSet* post = client_ >= 0 ? &seg_->client(static_cast<uint32_t>(client_)).post : nullptr;
      while (seg_->results().try_push_from(post, 1, [&](uint32_t, void* dst) { std::memcpy(dst, &r, sizeof r); }) == 0)
        std::this_thread::sleep_for(std::chrono::microseconds(100));
      out.append(py::make_tuple(h.seq, tsk, fn, h.route));
    };
    prod_.drop_backlog(note);
    if (only_own) {
      if (client_ < 0) throw std::logic_error("cancel_queued(only_own=True) needs a client's producer");
      std::atomic<uint64_t>& horizon = seg_->client(static_cast<uint32_t>(client_)).cancel_below;
      const uint64_t below = prod_.last_seq() + 1;
      for (uint64_t cur = horizon.load(); cur < below && !horizon.compare_exchange_weak(cur, below);) {
      }
      return out;
    }
    for (;;) {
      uint32_t k = seg_->tasks().claim_range(64, nullptr, [&](uint32_t, const uint8_t* body) {
        if (is_void_task(body)) return;
        TaskHeader h;
        std::memcpy(&h, body, sizeof h);
        note(h, body + sizeof h);
        if (h.encoding == ArgEncoding::kPooled) seg_->pool().free(h.pool_ref, h.stream_len);
      });
      if (k == 0) break;
    }
    return out;
  }

  Producer& native() { return prod_; }

 private:
  // The buffers a draft points into, reused by every call on this thread.
  struct Scratch {
    std::vector<uint8_t> slot;
    std::vector<uint8_t> stream;
    std::vector<ExternalPiece> pieces;
  };
  static Scratch& scratch() {
    thread_local Scratch s;
    return s;
  }

  // Encodes the call into the draft's slot: its ids, then the arguments as int64s in
  // slot.args when they all fit, else as a codec stream (packed into the slot, or left for
  // the pool), then c_args.
  void encode(TaskDraft& d, std::vector<py::object>& keep, uint32_t fn_id, uint32_t tsk_id,
              const py::tuple& args, const py::object& kwargs, const py::object& c_args,
              bool slot_mode) {
    const SlotLayout& L = seg_->config().slot;
    std::vector<uint8_t>& slot = scratch().slot;
    slot.assign(L.size, 0);
    write_uint(slot.data() + L.fn_id_off, L.fn_id_size, fn_id);
    write_uint(slot.data() + L.tsk_id_off, L.tsk_id_size, tsk_id);
    uint32_t used = std::max(L.fn_id_off + L.fn_id_size, L.tsk_id_off + L.tsk_id_size);

    Py_ssize_t npos = PyTuple_GET_SIZE(args.ptr());
    bool has_kw = !kwargs.is_none() && PyDict_GET_SIZE(kwargs.ptr()) > 0;
    if (!has_kw && npos <= static_cast<Py_ssize_t>(L.args_count) && pack_ints(slot, args)) {
      d.header.encoding = ArgEncoding::kSlotInts;
      d.header.nargs = static_cast<uint8_t>(npos);
      used = std::max(used, L.args_off + 8 * static_cast<uint32_t>(npos));
    } else if (slot_mode) {
      throw py::type_error("mpop: a slot-mode handler receives int64 arguments in slot.args only (at most " +
                           std::to_string(L.args_count) + ", no keywords)");
    } else {
      used = std::max(used, pack_stream(d, keep, args, kwargs));
    }
    if (!c_args.is_none()) used = std::max(used, pack_c_args(d, c_args));
    d.slot = slot.data();
    d.slot_used = std::max(used, L.size < used ? L.size : used);
  }

  // Writes each positional argument into slot.args as an int64; false (with some perhaps
  // written) at the first that is not an int or does not fit.
  bool pack_ints(std::vector<uint8_t>& slot, const py::tuple& args) {
    const SlotLayout& L = seg_->config().slot;
    Py_ssize_t npos = PyTuple_GET_SIZE(args.ptr());
    for (Py_ssize_t i = 0; i < npos; ++i) {
      PyObject* o = PyTuple_GET_ITEM(args.ptr(), i);
      if (!PyLong_CheckExact(o)) return false;
      int overflow = 0;
      long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
      if (overflow) return false;
      int64_t v64 = v;
      std::memcpy(slot.data() + L.args_off + 8 * i, &v64, 8);
    }
    return true;
  }

  // Encodes (args, kwargs) as a codec stream: into the slot's argument area if it fits,
  // else for the pool (the draft points at the stream). Returns the slot bytes used.
  uint32_t pack_stream(TaskDraft& d, std::vector<py::object>& keep, const py::tuple& args,
                       const py::object& kwargs) {
    const SlotLayout& L = seg_->config().slot;
    Scratch& s = scratch();
    uint32_t used = 0;
    std::memset(s.slot.data() + L.args_off, 0, 8 * L.args_count);
    // Arrays' data stay where they are (args keeps them alive) until copied into place.
    StreamWriter w(s.stream, &s.pieces);
    py_codec::encode_call(args, kwargs, w, &keep);
    const size_t total = w.size();
    if (total <= L.arg_area_len()) {
      d.header.encoding = ArgEncoding::kPacked;
      w.gather_to(s.slot.data() + L.arg_area_off());
      used = L.arg_area_off() + static_cast<uint32_t>(total);
    } else {
      if (total > UINT32_MAX) throw py::value_error("mpop: arguments larger than 4 GiB");
      d.header.encoding = ArgEncoding::kPooled;
      d.stream = s.stream.data();
      d.stream_len = static_cast<uint32_t>(total);
      d.pieces = &s.pieces;
    }
    d.header.stream_len = static_cast<uint32_t>(total);
    return used;
  }

  // Copies c_args into the slot's c_args field; returns the slot bytes used.
  uint32_t pack_c_args(const TaskDraft& d, const py::object& c_args) {
    const SlotLayout& L = seg_->config().slot;
    if (L.cargs_len == 0) throw py::value_error("mpop: this slot class has no c_args field");
    if (d.header.encoding != ArgEncoding::kSlotInts)
      throw py::type_error("mpop: c_args can only be combined with int arguments that fit slot.args");
    std::string_view b = c_args.cast<py::bytes>();
    if (b.size() > L.cargs_len)
      throw py::value_error("mpop: c_args is " + std::to_string(b.size()) +
                            " bytes; this slot class holds at most " + std::to_string(L.cargs_len));
    std::memcpy(scratch().slot.data() + L.cargs_off, b.data(), b.size());
    return L.cargs_off + static_cast<uint32_t>(b.size());
  }

  // Submits the draft; when there is no room and the caller blocks, waits for room
  // without the GIL in slices, checking for signals (Ctrl-C) and `check` between them.
  PushOutcome push(TaskDraft& d, bool blocking, const py::object& timeout, const py::object& check) {
    PushOutcome out = prod_.submit(d, false, 0);
    if (out != PushOutcome::kFull || !blocking) return out;
    int64_t deadline = deadline_from_timeout(timeout);
    while (out == PushOutcome::kFull && deadline != 0) {
      int64_t slice = monotonic_ns() + 100'000'000;
      bool last = deadline >= 0 && deadline <= slice;
      {
        py::gil_scoped_release nogil;
        out = prod_.submit(d, true, last ? deadline : slice);
      }
      if (last) break;
      if (out == PushOutcome::kFull && PyErr_CheckSignals() != 0) throw py::error_already_set();
      if (out == PushOutcome::kFull && !check.is_none()) check();  // e.g. workers failed to start
    }
    return out;
  }

  // What enqueue() returns or raises for the push's outcome.
  uint64_t seq_or_raise(PushOutcome out, const TaskDraft& d) {
    switch (out) {
      case PushOutcome::kRing:
      case PushOutcome::kBacklog:
        return d.header.seq;
      case PushOutcome::kFull:
        return 0;
      case PushOutcome::kTooLarge:
        throw py::value_error("mpop: the task's arguments take " + std::to_string(d.stream_len) +
                              " bytes encoded, more than queued arguments may use of the argument pool (" +
                              std::to_string(seg_->pool().producer_cap_bytes()) + " of " +
                              std::to_string(seg_->pool().capacity_bytes()) +
                              " bytes; a quarter stays free for results); pass a larger pool_bytes to MpopApi");
      case PushOutcome::kClosed:
        break;
    }
    throw std::runtime_error("mpop: the queue is closed");
  }

  SegmentPtr seg_;
  Producer prod_;
  int64_t client_ = -1;  // the client record the producer pushes for, -1 = the owner's own
};

PyProducer* producer_of(const py::object& producer) { return producer.cast<PyProducer*>(); }

uint64_t enqueue_positional(PyProducer& p, uint32_t fn_id, uint32_t tsk_id, const py::tuple& args,
                            uint32_t route, const py::object& check, bool* encoded) {
  return p.enqueue(fn_id, tsk_id, args, py::none(), py::none(), false, true, py::none(), route,
                   false, check, encoded);
}

void register_producer(py::module_& m) {
  py::class_<PyProducer>(m, "Producer")
      .def(py::init<SegmentPtr>(), py::keep_alive<1, 2>())
      .def(py::init<SegmentPtr, uint32_t>(), py::keep_alive<1, 2>(), py::arg("segment"), py::arg("client"))
      .def("enqueue",
           [](PyProducer& p, uint32_t fn_id, uint32_t tsk_id, const py::tuple& args, const py::object& kwargs,
              const py::object& c_args, bool slot_mode, bool blocking, const py::object& timeout, uint32_t route,
              bool claim_alone, const py::object& check) {
             return p.enqueue(fn_id, tsk_id, args, kwargs, c_args, slot_mode, blocking, timeout, route,
                              claim_alone, check);
           },
           py::arg("fn_id"), py::arg("tsk_id"), py::arg("args"),
           py::arg("kwargs") = py::none(), py::arg("c_args") = py::none(),
           py::arg("slot_mode") = false, py::arg("blocking") = true, py::arg("timeout") = py::none(),
           py::arg("route") = static_cast<uint32_t>(kRoutePlain), py::arg("claim_alone") = false, py::arg("check") = py::none())
      .def("start_feeding", [](PyProducer& p) { p.native().start_feeding(); })
      .def("pause_feeding", [](PyProducer& p) { return p.native().pause_feeding(); })
      .def("close", [](PyProducer& p) { p.native().close(); })
      .def_property_readonly("closed", [](PyProducer& p) { return p.native().closed(); })
      .def_property_readonly("backlog", [](PyProducer& p) { return p.native().backlog_size(); })
      .def_property_readonly("submitted", [](PyProducer& p) { return p.native().submitted(); })
      .def_property_readonly("last_seq", [](PyProducer& p) { return p.native().last_seq(); })
      .def_property_readonly("first_seq", [](PyProducer& p) { return p.native().first_seq(); })
      .def("cancel_queued", &PyProducer::cancel_queued, py::arg("only_own") = false);
}

}  // namespace mpop::bindings
