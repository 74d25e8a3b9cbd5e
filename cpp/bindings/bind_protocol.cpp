// The protocol between the native core and the Python package, defined once (in the
// native headers) and bound here: the routes of results, the statuses a task ends with,
// and the record of a result as the collector hands it to Python (ResultRecord).
#include "bindings.hpp"

#include <structseq.h>

#include "mpop/result_ring.hpp"
#include "mpop/segment.hpp"
#include "mpop/slot_layout.hpp"

namespace mpop::bindings {

namespace {

PyStructSequence_Field record_fields[] = {
    {const_cast<char*>("seq"), const_cast<char*>("the task's unique internal number")},
    {const_cast<char*>("tsk_id"), const_cast<char*>("the task's label")},
    {const_cast<char*>("fn_id"), const_cast<char*>("the handler's id")},
    {const_cast<char*>("worker_id"), const_cast<char*>("the worker that ran it (or died running it)")},
    {const_cast<char*>("attempts"), const_cast<char*>("runs charged to it")},
    {const_cast<char*>("status"), const_cast<char*>("how it ended (RESULT_STATUS)")},
    {const_cast<char*>("value"), const_cast<char*>("the value, the packed error, or None")},
    {const_cast<char*>("queue_wait_s"), const_cast<char*>("seconds from enqueue to start, or None")},
    {const_cast<char*>("run_time_s"), const_cast<char*>("seconds it ran, or None (not timed)")},
    {const_cast<char*>("route"), const_cast<char*>("where it goes (ROUTE_*)")},
    {nullptr, nullptr}};

PyStructSequence_Desc record_desc = {
    const_cast<char*>("mpop._core.ResultRecord"),
    const_cast<char*>("One task's result as the collector hands it on (private)."), record_fields, 10};

PyTypeObject* g_record_type = nullptr;

}  // namespace

py::object make_result_record(const ResultHeader& h, uint8_t status, const py::object& value) {
  py::object rec = py::reinterpret_steal<py::object>(PyStructSequence_New(g_record_type));
  if (!rec) throw py::error_already_set();
  // Timings only for a task that ran with the clock on (start_ns set), as TaskResult has them.
  PyObject* wait_s = Py_None;
  PyObject* run_s = Py_None;
  if (h.start_ns) {
    run_s = PyFloat_FromDouble(run_time_s(h));
    wait_s = h.enqueue_ns ? PyFloat_FromDouble(queue_wait_s(h)) : Py_None;
  }
  if (wait_s == Py_None) Py_INCREF(Py_None);
  if (run_s == Py_None) Py_INCREF(Py_None);
  PyObject* items[] = {PyLong_FromUnsignedLongLong(h.seq),  PyLong_FromUnsignedLong(h.tsk_id),
                       PyLong_FromUnsignedLong(h.fn_id),    PyLong_FromUnsignedLong(h.worker_id),
                       PyLong_FromUnsignedLong(h.attempts), PyLong_FromUnsignedLong(status),
                       value.inc_ref().ptr(),               wait_s,
                       run_s,                               PyLong_FromUnsignedLong(h.route)};
  bool ok = true;
  for (Py_ssize_t i = 0; i < 10; ++i) {
    ok = ok && items[i] != nullptr;
    PyStructSequence_SET_ITEM(rec.ptr(), i, items[i]);  // steals; a null one stays null
  }
  if (!ok) throw py::error_already_set();
  return rec;
}

void register_protocol(py::module_& m) {
  g_record_type = PyStructSequence_NewType(&record_desc);
  if (g_record_type == nullptr) throw py::error_already_set();
  Py_INCREF(g_record_type);  // for the life of the process
  m.attr("ResultRecord") = py::reinterpret_borrow<py::object>(reinterpret_cast<PyObject*>(g_record_type));
  m.attr("ROUTE_PLAIN") = static_cast<uint32_t>(kRoutePlain);
  m.attr("ROUTE_FUTURE") = static_cast<uint32_t>(kRouteFuture);
  m.attr("FIRST_MAP_ROUTE") = static_cast<uint32_t>(kFirstMapRoute);
  m.attr("FIRST_SIDE_ROUTE") = static_cast<uint32_t>(kFirstSideRoute);
  m.attr("ROUTE_STDOUT") = static_cast<uint32_t>(kRouteStdout);
  m.attr("ROUTE_STDERR") = static_cast<uint32_t>(kRouteStderr);
  m.attr("ROUTE_LOG") = static_cast<uint32_t>(kRouteLog);
  m.attr("ROUTE_EXIT") = static_cast<uint32_t>(kRouteExit);
  py::dict status;
  status["OK"] = static_cast<int>(ResultStatus::kOk);
  status["ERROR"] = static_cast<int>(ResultStatus::kError);
  status["CRASHED"] = static_cast<int>(ResultStatus::kCrashed);
  status["TIMEOUT"] = static_cast<int>(ResultStatus::kTimeout);
  status["CANCELLED"] = static_cast<int>(ResultStatus::kCancelled);
  m.attr("RESULT_STATUS") = status;
  py::dict client_state;  // a client record's state: the low bits of its lease
  client_state["FREE"] = static_cast<int>(ClientState::kFree);
  client_state["ATTACHED"] = static_cast<int>(ClientState::kAttached);
  client_state["GONE"] = static_cast<int>(ClientState::kGone);
  client_state["CLAIMING"] = static_cast<int>(ClientState::kClaiming);
  m.attr("CLIENT_STATE") = client_state;
  m.def("lease_state", [](uint32_t lease) { return static_cast<int>(lease_state(lease)); }, py::arg("lease"),
        "The client state a client record's lease holds.");
}

}  // namespace mpop::bindings
