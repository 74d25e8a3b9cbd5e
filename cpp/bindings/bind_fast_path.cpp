// FastPath: app.enqueue(fn, args=...) and app.submit(fn, *args) in one native call.
//
// The Python methods spend most of a trivial task's cost on their own bookkeeping (resolve
// the handler, check the arguments, take a label, push, register the future): about 2 us,
// of which the push is 0.4. For the common call (a registered function with positional
// arguments whose count it accepts, workers running) this type does the same steps in C:
// it is a plain CPython type, not pybind11, because pybind11's argument dispatch alone
// costs as much as the push. Anything else returns None and the caller takes the Python
// path, which then raises whatever error is due.
#include "bindings.hpp"  // first: Python.h before structmember.h
#include <structmember.h>

#include <vector>

namespace mpop::bindings {

namespace {


struct FastHandler {
  uint32_t fn_id;
  Py_ssize_t min_pos;
  Py_ssize_t max_pos;
};

struct FastPathObject {
  PyObject_HEAD
  PyObject* producer;    // the Producer (keeps `prod` alive)
  PyProducer* prod;
  PyObject* handlers;    // fn -> index into `table` (registered, written, argument-mode)
  std::vector<FastHandler>* table;
  PyObject* labels;      // the app's tsk_id counter (an iterator of ints)
  PyObject* futures;     // the router's seq -> future dict
  PyObject* early;       // the router's results that came before their future
  PyObject* reg;         // the router's register_future(seq, future)
  PyObject* future_cls;  // the app's future class (called with no arguments)
  PyObject* check;       // raises if the workers failed, while a push waits for room
  uint64_t label_mask;
  char armed;            // workers running and the result thread started
};

// Every reference a FastPath holds, for the garbage collector's traverse and clear.
constexpr PyObject* FastPathObject::*kFastRefs[] = {
    &FastPathObject::producer, &FastPathObject::handlers, &FastPathObject::labels, &FastPathObject::futures,
    &FastPathObject::early,    &FastPathObject::reg,      &FastPathObject::future_cls, &FastPathObject::check};

int fast_traverse(PyObject* o, visitproc visit, void* arg) {
  auto* self = reinterpret_cast<FastPathObject*>(o);
  Py_VISIT(Py_TYPE(o));
  for (auto ref : kFastRefs) Py_VISIT(self->*ref);
  return 0;
}

int fast_clear(PyObject* o) {
  auto* self = reinterpret_cast<FastPathObject*>(o);
  self->armed = 0;
  self->prod = nullptr;
  for (auto ref : kFastRefs) Py_CLEAR(self->*ref);
  return 0;
}

void fast_dealloc(PyObject* o) {
  PyTypeObject* tp = Py_TYPE(o);
  PyObject_GC_UnTrack(o);
  fast_clear(o);
  delete reinterpret_cast<FastPathObject*>(o)->table;
  tp->tp_free(o);
  Py_DECREF(tp);
}

// Pushes fn(*args) on `route`. Returns the task's seq; 0 when the fast path does not apply
// (no Python error set: the caller takes the Python path); -1 with a Python error set
// (KeyboardInterrupt or the workers' failure while waiting for room).
long long fast_push(FastPathObject* self, PyObject* fn, PyObject* args, uint32_t route) {
  if (!self->armed || !PyTuple_CheckExact(args)) return 0;
  PyObject* idx = PyDict_GetItemWithError(self->handlers, fn);  // borrowed
  if (idx == nullptr) {
    PyErr_Clear();  // unknown, or unhashable: resolve() deals with it
    return 0;
  }
  const FastHandler& h = (*self->table)[PyLong_AsSsize_t(idx)];
  Py_ssize_t n = PyTuple_GET_SIZE(args);
  if (n < h.min_pos || n > h.max_pos) return 0;  // the Python path raises the TypeError
  PyObject* label_obj = PyIter_Next(self->labels);
  if (label_obj == nullptr) return PyErr_Occurred() ? -1 : 0;
  uint64_t label = PyLong_AsUnsignedLongLongMask(label_obj) & self->label_mask;
  Py_DECREF(label_obj);
  bool encoded = false;
  try {
    py::handle check = self->check ? self->check : Py_None;
    uint64_t seq = enqueue_positional(*self->prod, h.fn_id, static_cast<uint32_t>(label),
                                      py::reinterpret_borrow<py::tuple>(args), route,
                                      py::reinterpret_borrow<py::object>(check), &encoded);
    return static_cast<long long>(seq);
  } catch (py::error_already_set& e) {
    // An argument that cannot be encoded: the Python path tries again and names it. Once
    // encoded, an error comes from waiting for room (a signal handler, check()): the
    // caller's to see.
    if (!encoded) return 0;
    e.restore();
    return -1;
  } catch (...) {
    return 0;  // closed, too large, oversized: the Python path raises the right error
  }
}

// enqueue(fn, args) -> True, or None when the Python path must take the call.
PyObject* fast_enqueue(PyObject* o, PyObject* const* argv, Py_ssize_t argc) {
  if (argc != 2) {
    PyErr_SetString(PyExc_TypeError, "FastPath.enqueue(fn, args)");
    return nullptr;
  }
  auto* self = reinterpret_cast<FastPathObject*>(o);
  long long seq = fast_push(self, argv[0], argv[1], kRoutePlain);
  if (seq < 0) return nullptr;
  if (seq == 0) Py_RETURN_NONE;
  Py_RETURN_TRUE;
}

// submit(fn, args) -> the task's future, registered under its seq; or None (see enqueue).
// A push that had to wait for room gave up the GIL, so the result may have come in before
// the registration (the router then keeps it in `early`): register_future settles it.
PyObject* fast_submit(PyObject* o, PyObject* const* argv, Py_ssize_t argc) {
  if (argc != 2) {
    PyErr_SetString(PyExc_TypeError, "FastPath.submit(fn, args)");
    return nullptr;
  }
  auto* self = reinterpret_cast<FastPathObject*>(o);
  if (!self->armed || self->futures == nullptr) Py_RETURN_NONE;  // armed only once bound
  PyObject* fut = PyObject_CallNoArgs(self->future_cls);
  if (fut == nullptr) return nullptr;
  // A new future refers to nothing but its class: the garbage collector need not walk the
  // hundreds of thousands a caller may hold (it took more time than the rest of submit).
  // Its class is a FutureCore: setting an attribute (a callback, a waiter, an exception)
  // tracks it again, and so does a value that is not atomic (future_finish).
  if (PyObject_GC_IsTracked(fut)) PyObject_GC_UnTrack(fut);
  long long seq = fast_push(self, argv[0], argv[1], kRouteFuture);
  if (seq <= 0) {
    Py_DECREF(fut);
    if (seq < 0) return nullptr;
    Py_RETURN_NONE;
  }
  PyObject* key = PyLong_FromUnsignedLongLong(static_cast<unsigned long long>(seq));
  if (key != nullptr && PyDict_GET_SIZE(self->early) > 0) {
    PyObject* r = PyObject_CallFunctionObjArgs(self->reg, key, fut, nullptr);
    Py_DECREF(key);
    if (r == nullptr) {
      Py_DECREF(fut);
      return nullptr;
    }
    Py_DECREF(r);
    return fut;
  }
  if (key == nullptr || PyDict_SetItem(self->futures, key, fut) < 0) {
    // The task is queued and nothing could be registered (out of memory): its result will
    // be dropped as an early one. Report the failure rather than hand out a dead future.
    Py_XDECREF(key);
    Py_DECREF(fut);
    return nullptr;
  }
  Py_DECREF(key);
  return fut;
}

// add(fn, fn_id, min_pos, max_pos): `fn` may take the fast path (max_pos < 0: any number).
PyObject* fast_add(PyObject* o, PyObject* const* argv, Py_ssize_t argc) {
  auto* self = reinterpret_cast<FastPathObject*>(o);
  if (argc != 4) {
    PyErr_SetString(PyExc_TypeError, "FastPath.add(fn, fn_id, min_pos, max_pos)");
    return nullptr;
  }
  if (self->handlers == nullptr) {
    PyErr_SetString(PyExc_RuntimeError, "mpop: FastPath.add after release()");
    return nullptr;
  }
  unsigned long fn_id = PyLong_AsUnsignedLong(argv[1]);
  Py_ssize_t lo = PyLong_AsSsize_t(argv[2]);
  Py_ssize_t hi = PyLong_AsSsize_t(argv[3]);
  if (PyErr_Occurred()) return nullptr;
  PyObject* idx = PyLong_FromSize_t(self->table->size());
  if (idx == nullptr) return nullptr;
  int rc = PyDict_SetItem(self->handlers, argv[0], idx);
  Py_DECREF(idx);
  if (rc < 0) return nullptr;
  self->table->push_back(FastHandler{static_cast<uint32_t>(fn_id), lo, hi < 0 ? PY_SSIZE_T_MAX : hi});
  Py_RETURN_NONE;
}

// bind(futures, early, register_future, future_cls, check): what submit() and a waiting
// push need.
PyObject* fast_bind(PyObject* o, PyObject* const* argv, Py_ssize_t argc) {
  auto* self = reinterpret_cast<FastPathObject*>(o);
  if (argc != 5 || !PyDict_Check(argv[0]) || !PyDict_Check(argv[1])) {
    PyErr_SetString(PyExc_TypeError, "FastPath.bind(futures: dict, early: dict, register_future, future_cls, check)");
    return nullptr;
  }
  PyObject** fields[] = {&self->futures, &self->early, &self->reg, &self->future_cls, &self->check};
  for (int i = 0; i < 5; ++i) {
    Py_INCREF(argv[i]);
    Py_XSETREF(*fields[i], argv[i]);
  }
  Py_RETURN_NONE;
}

// discard(fn): calls of `fn` no longer take the fast path (its handler was replaced).
PyObject* fast_discard(PyObject* o, PyObject* const* argv, Py_ssize_t argc) {
  auto* self = reinterpret_cast<FastPathObject*>(o);
  if (argc != 1) {
    PyErr_SetString(PyExc_TypeError, "FastPath.discard(fn)");
    return nullptr;
  }
  if (self->handlers != nullptr && PyDict_Contains(self->handlers, argv[0]) == 1 &&
      PyDict_DelItem(self->handlers, argv[0]) < 0)
    return nullptr;
  PyErr_Clear();  // an unhashable fn was never added
  Py_RETURN_NONE;
}

// release(): disarms and drops every reference (the app's shutdown), so that nothing the
// fast path held keeps the router or the producer alive.
PyObject* fast_release(PyObject* o, PyObject* const*, Py_ssize_t) {
  fast_clear(o);
  Py_RETURN_NONE;
}

PyMethodDef fast_methods[] = {
    {"enqueue", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(fast_enqueue)), METH_FASTCALL,
     "enqueue(fn, args) -> True, or None when the Python path must take the call"},
    {"submit", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(fast_submit)), METH_FASTCALL,
     "submit(fn, args) -> a registered future, or None when the Python path must take the call"},
    {"add", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(fast_add)), METH_FASTCALL,
     "add(fn, fn_id, min_pos, max_pos): lets calls of fn take the fast path"},
    {"bind", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(fast_bind)), METH_FASTCALL,
     "bind(futures, early, register_future, future_cls, check)"},
    {"discard", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(fast_discard)), METH_FASTCALL,
     "discard(fn): calls of fn take the Python path again"},
    {"release", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(fast_release)), METH_FASTCALL,
     "release(): disarms the fast path and drops every reference it holds"},
    {nullptr, nullptr, 0, nullptr}};

PyMemberDef fast_members[] = {
    {"armed", T_BOOL, offsetof(FastPathObject, armed), 0, "calls may take the fast path"},
    {nullptr, 0, 0, 0, nullptr}};

PyType_Slot fast_slots[] = {
    {Py_tp_dealloc, reinterpret_cast<void*>(fast_dealloc)},
    {Py_tp_traverse, reinterpret_cast<void*>(fast_traverse)},
    {Py_tp_clear, reinterpret_cast<void*>(fast_clear)},
    {Py_tp_methods, fast_methods},
    {Py_tp_members, fast_members},
    {Py_tp_doc, const_cast<char*>("The native enqueue/submit path of one app (private).")},
    {0, nullptr}};

PyType_Spec fast_spec = {"mpop._core.FastPath", sizeof(FastPathObject), 0,
                         Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC, fast_slots};

}  // namespace

void register_fast_path(py::module_& m) {
  PyObject* fast_type = PyType_FromSpec(&fast_spec);
  if (fast_type == nullptr) throw py::error_already_set();
  m.attr("FastPath") = py::reinterpret_steal<py::object>(fast_type);
  // FastPath(producer, labels, label_mask): made here, since it needs the Producer's object.
  m.def("fast_path", [fast_type](py::object producer, py::object labels, uint64_t label_mask) {
    PyProducer* prod = producer_of(producer);
    auto* tp = reinterpret_cast<PyTypeObject*>(fast_type);
    auto* self = PyObject_GC_New(FastPathObject, tp);
    if (self == nullptr) throw py::error_already_set();
    self->producer = producer.release().ptr();
    self->prod = prod;
    self->handlers = PyDict_New();
    self->table = new std::vector<FastHandler>();
    self->labels = labels.release().ptr();
    self->futures = self->early = self->reg = self->future_cls = self->check = nullptr;
    self->label_mask = label_mask;
    self->armed = 0;
    PyObject_GC_Track(self);
    auto obj = py::reinterpret_steal<py::object>(reinterpret_cast<PyObject*>(self));
    if (self->handlers == nullptr) throw py::error_already_set();
    return obj;
  }, py::arg("producer"), py::arg("labels"), py::arg("label_mask"));
}

}  // namespace mpop::bindings
