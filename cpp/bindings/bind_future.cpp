// FutureCore: the native base of mpop's futures, and the one way a future gets its value.
//
// A future's state, value, waiters and callbacks are fields of this type (exposed to Python
// as the attributes concurrent.futures reads: _state, _result, _w, _cbs). future_finish()
// is the only code that sets a value: the collector calls it for a plain result nobody
// waits on (no Python code runs), MpopFuture.deliver calls it (as _finish) before it
// notifies waiters and callbacks. Instances may start untracked by the garbage collector
// (the fast path leaves a new future untracked): setting an attribute, or a value that is
// not atomic, tracks them again.
#include "bindings.hpp"

#include <structmember.h>

namespace mpop::bindings {

namespace {

struct FutureCoreObject {
  PyObject_HEAD
  PyObject* state;      // concurrent.futures' state: PENDING, FINISHED, ...
  PyObject* result;     // the value, once FINISHED
  PyObject* waiters;    // concurrent.futures.wait()'s waiters, or NULL
  PyObject* callbacks;  // done callbacks, or NULL
};

// concurrent.futures' PENDING and FINISHED (set_states, called once at import).
PyObject* g_pending = nullptr;
PyObject* g_finished = nullptr;

PyObject* newref(PyObject* o) {
  Py_INCREF(o);
  return o;
}

// Values that cannot refer to anything (so a holder of only these joins no cycle).
bool atomic(PyObject* v) {
  return v == Py_None || PyLong_CheckExact(v) || PyFloat_CheckExact(v) || PyUnicode_CheckExact(v) ||
         PyBytes_CheckExact(v) || PyBool_Check(v);
}

PyObject* core_new(PyTypeObject* type, PyObject*, PyObject*) {
  PyObject* self = type->tp_alloc(type, 0);
  if (self == nullptr) return nullptr;
  auto* f = reinterpret_cast<FutureCoreObject*>(self);
  f->state = newref(g_pending ? g_pending : Py_None);
  return self;
}

int core_traverse(PyObject* self, visitproc visit, void* arg) {
  auto* f = reinterpret_cast<FutureCoreObject*>(self);
  Py_VISIT(Py_TYPE(self));
  Py_VISIT(f->state);
  Py_VISIT(f->result);
  Py_VISIT(f->waiters);
  Py_VISIT(f->callbacks);
  return 0;
}

int core_clear(PyObject* self) {
  auto* f = reinterpret_cast<FutureCoreObject*>(self);
  Py_CLEAR(f->state);
  Py_CLEAR(f->result);
  Py_CLEAR(f->waiters);
  Py_CLEAR(f->callbacks);
  return 0;
}

void core_dealloc(PyObject* self) {
  PyTypeObject* tp = Py_TYPE(self);
  PyObject_GC_UnTrack(self);
  core_clear(self);
  tp->tp_free(self);
  Py_DECREF(tp);
}

int core_setattro(PyObject* self, PyObject* name, PyObject* value) {
  if (PyObject_GenericSetAttr(self, name, value) < 0) return -1;
  if (!PyObject_GC_IsTracked(self)) PyObject_GC_Track(self);
  return 0;
}

// _finish(value): see future_finish. The caller holds the future's lock.
PyObject* core_finish(PyObject* self, PyObject* value) {
  future_finish(self, value);
  Py_RETURN_NONE;
}

// set_states(PENDING, FINISHED): concurrent.futures' state objects.
PyObject* core_set_states(PyObject*, PyObject* const* argv, Py_ssize_t argc) {
  if (argc != 2) {
    PyErr_SetString(PyExc_TypeError, "FutureCore.set_states(PENDING, FINISHED)");
    return nullptr;
  }
  Py_XSETREF(g_pending, newref(argv[0]));
  Py_XSETREF(g_finished, newref(argv[1]));
  Py_RETURN_NONE;
}

PyMemberDef core_members[] = {
    {"_state", T_OBJECT, offsetof(FutureCoreObject, state), 0, "concurrent.futures' state"},
    {"_result", T_OBJECT, offsetof(FutureCoreObject, result), 0, "the value, once finished"},
    {"_w", T_OBJECT, offsetof(FutureCoreObject, waiters), 0, "concurrent.futures.wait()'s waiters, or None"},
    {"_cbs", T_OBJECT, offsetof(FutureCoreObject, callbacks), 0, "done callbacks, or None"},
    {nullptr, 0, 0, 0, nullptr}};

PyMethodDef core_methods[] = {
    {"_finish", core_finish, METH_O,
     "_finish(value): sets the value and the FINISHED state (the caller holds the lock and "
     "notifies waiters and callbacks)"},
    {"set_states", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(core_set_states)),
     METH_FASTCALL | METH_STATIC, "set_states(PENDING, FINISHED): concurrent.futures' states (once)"},
    {nullptr, nullptr, 0, nullptr}};

PyType_Slot core_slots[] = {
    {Py_tp_new, reinterpret_cast<void*>(core_new)},
    {Py_tp_dealloc, reinterpret_cast<void*>(core_dealloc)},
    {Py_tp_traverse, reinterpret_cast<void*>(core_traverse)},
    {Py_tp_clear, reinterpret_cast<void*>(core_clear)},
    {Py_tp_setattro, reinterpret_cast<void*>(core_setattro)},
    {Py_tp_members, core_members},
    {Py_tp_methods, core_methods},
    {Py_tp_doc, const_cast<char*>("The native base of mpop's futures (private).")},
    {0, nullptr}};

PyType_Spec core_spec = {"mpop._core.FutureCore", sizeof(FutureCoreObject), 0,
                         Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC, core_slots};

PyTypeObject* g_core_type = nullptr;

}  // namespace

bool is_future_core(PyObject* o) { return g_core_type != nullptr && PyObject_TypeCheck(o, g_core_type); }

void future_finish(PyObject* fut, PyObject* value) {
  auto* f = reinterpret_cast<FutureCoreObject*>(fut);
  Py_XSETREF(f->result, newref(value));
  Py_XSETREF(f->state, newref(g_finished));
  if (!atomic(value) && !PyObject_GC_IsTracked(fut)) PyObject_GC_Track(fut);
}

bool future_finish_if_quiet(PyObject* fut, PyObject* value) {
  auto* f = reinterpret_cast<FutureCoreObject*>(fut);
  if (f->state != g_pending || f->waiters != nullptr || f->callbacks != nullptr) return false;
  future_finish(fut, value);
  return true;
}

void register_future_core(py::module_& m) {
  PyObject* type = PyType_FromSpec(&core_spec);
  if (type == nullptr) throw py::error_already_set();
  g_core_type = reinterpret_cast<PyTypeObject*>(type);
  Py_INCREF(type);  // g_core_type: for the life of the process
  m.attr("FutureCore") = py::reinterpret_steal<py::object>(type);
}

}  // namespace mpop::bindings
