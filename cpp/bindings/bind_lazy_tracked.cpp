// LazyTracked: the base of classes whose instances the native code leaves untracked by the
// garbage collector while they hold only atomic values (TaskResult, the futures of
// submit()). Setting an attribute tracks the instance again, as CPython does for a dict
// given a container; code that changes one another way must track it itself.
#include "bindings.hpp"

namespace mpop::bindings {

namespace {

int lazy_tracked_setattro(PyObject* self, PyObject* name, PyObject* value) {
  if (PyObject_GenericSetAttr(self, name, value) < 0) return -1;
  if (PyType_IS_GC(Py_TYPE(self)) && !PyObject_GC_IsTracked(self)) PyObject_GC_Track(self);
  return 0;
}

PyType_Slot lazy_tracked_slots[] = {
    {Py_tp_setattro, reinterpret_cast<void*>(lazy_tracked_setattro)},
    {Py_tp_doc, const_cast<char*>("Base of classes whose instances may start untracked by the GC (private).")},
    {0, nullptr}};

PyType_Spec lazy_tracked_spec = {"mpop._core.LazyTracked", sizeof(PyObject), 0,
                                 Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE, lazy_tracked_slots};

}  // namespace

void register_lazy_tracked(py::module_& m) {
  PyObject* base = PyType_FromSpec(&lazy_tracked_spec);
  if (base == nullptr) throw py::error_already_set();
  m.attr("LazyTracked") = py::reinterpret_steal<py::object>(base);
}

}  // namespace mpop::bindings
