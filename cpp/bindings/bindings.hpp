// Declarations shared by the binding files: one register_* per area (boost-histogram style).
#pragma once

#include <pybind11/pybind11.h>

#include <memory>

#include "mpop/segment.hpp"

namespace mpop::bindings {

namespace py = pybind11;

void register_segment(py::module_& m);
void register_producer(py::module_& m);
void register_fast_path(py::module_& m);
void register_worker(py::module_& m);
void register_lazy_tracked(py::module_& m);
void register_future_core(py::module_& m);
void register_protocol(py::module_& m);
void register_collector(py::module_& m);
void register_supervisor(py::module_& m);

using SegmentPtr = std::shared_ptr<Segment>;

// mpop._core.Producer's native side (bind_producer.cpp), as FastPath (bind_fast_path.cpp)
// uses it: the object behind a Producer, and its enqueue of fn(*args) that blocks until
// there is room (see PyProducer::enqueue; `encoded` turns true once the arguments are).
class PyProducer;
PyProducer* producer_of(const py::object& producer);
uint64_t enqueue_positional(PyProducer& p, uint32_t fn_id, uint32_t tsk_id, const py::tuple& args,
                            uint32_t route, const py::object& check, bool* encoded);

// The futures' native base (bind_future.cpp). future_finish sets a future's value and the
// FINISHED state, the only code that does (the caller holds the future's lock);
// future_finish_if_quiet does so only for a pending future that nobody waits on and that
// has no callbacks (those need Python code), and says whether it did.
bool is_future_core(PyObject* o);
void future_finish(PyObject* fut, PyObject* value);
bool future_finish_if_quiet(PyObject* fut, PyObject* value);

// Seconds a task ran, and waited from its enqueue to its start (0 when the enqueue time was
// not taken): the one place these are worked out from a result's clock readings.
inline double run_time_s(const ResultHeader& h) {
  return static_cast<double>(static_cast<int64_t>(h.end_ns) - static_cast<int64_t>(h.start_ns)) / 1e9;
}
inline double queue_wait_s(const ResultHeader& h) {
  return h.enqueue_ns ? static_cast<double>(static_cast<int64_t>(h.start_ns) - static_cast<int64_t>(h.enqueue_ns)) / 1e9
                      : 0.0;
}

// A result record as Python sees it (bind_protocol.cpp): a ResultRecord struct sequence
// with the header's fields by name, the decoded value and the status it ended with.
py::object make_result_record(const ResultHeader& h, uint8_t status, const py::object& value);

inline int64_t deadline_from_timeout(const py::object& timeout) {
  if (timeout.is_none()) return -1;
  double t = timeout.cast<double>();
  if (t <= 0) return 0;
  return monotonic_ns() + static_cast<int64_t>(t * 1e9);
}

}  // namespace mpop::bindings
