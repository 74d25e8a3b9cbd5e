// Python <-> codec conversion. Exact types only (subclasses of int/str/... are pickled so
// that they come back as themselves).
#include "py_codec.hpp"

#include <Python.h>

namespace mpop::py_codec {

namespace {
py::object& pickle_dumps() {
  static py::object* f = new py::object(py::module_::import("pickle").attr("dumps"));
  return *f;
}
py::object& pickle_loads() {
  static py::object* f = new py::object(py::module_::import("pickle").attr("loads"));
  return *f;
}
}  // namespace

void encode_value(py::handle obj, StreamWriter& w) {
  PyObject* o = obj.ptr();
  if (o == Py_None) return w.none();
  if (o == Py_True) return w.boolean(true);
  if (o == Py_False) return w.boolean(false);
  if (PyLong_CheckExact(o)) {
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
    if (!overflow) return w.integer(static_cast<int64_t>(v));
  } else if (PyFloat_CheckExact(o)) {
    return w.real(PyFloat_AS_DOUBLE(o));
  } else if (PyUnicode_CheckExact(o)) {
    Py_ssize_t n = 0;
    const char* s = PyUnicode_AsUTF8AndSize(o, &n);
    if (s) return w.blob(Tag::kStr, s, static_cast<size_t>(n));
    PyErr_Clear();  // lone surrogates (e.g. undecodable file names) are not UTF-8: pickle it
  } else if (PyBytes_CheckExact(o)) {
    return w.blob(Tag::kBytes, PyBytes_AS_STRING(o), static_cast<size_t>(PyBytes_GET_SIZE(o)));
  }
  py::bytes pickled = pickle_dumps()(obj, 5);
  char* data = nullptr;
  Py_ssize_t n = 0;
  PyBytes_AsStringAndSize(pickled.ptr(), &data, &n);
  w.blob(Tag::kPickle, data, static_cast<size_t>(n));
}

void encode_call(py::handle args, py::handle kwargs, StreamWriter& w) {
  Py_ssize_t npos = PyTuple_GET_SIZE(args.ptr());
  Py_ssize_t nkw = kwargs.is_none() ? 0 : PyDict_GET_SIZE(kwargs.ptr());
  if (npos > 255 || nkw > 255) throw py::type_error("mpop: at most 255 positional and 255 keyword arguments");
  w.counts(static_cast<uint8_t>(npos), static_cast<uint8_t>(nkw));
  for (Py_ssize_t i = 0; i < npos; ++i) encode_value(PyTuple_GET_ITEM(args.ptr(), i), w);
  if (nkw) {
    PyObject *key, *value;
    Py_ssize_t pos = 0;
    while (PyDict_Next(kwargs.ptr(), &pos, &key, &value)) {
      Py_ssize_t n = 0;
      const char* s = PyUnicode_AsUTF8AndSize(key, &n);
      if (!s) throw py::error_already_set();
      w.keyword(std::string_view(s, static_cast<size_t>(n)));
      encode_value(value, w);
    }
  }
}

py::object decode_item(const Item& it) {
  switch (it.tag) {
    case Tag::kNone: return py::none();
    case Tag::kTrue: return py::bool_(true);
    case Tag::kFalse: return py::bool_(false);
    case Tag::kInt: return py::reinterpret_steal<py::object>(PyLong_FromLongLong(it.i));
    case Tag::kFloat: return py::reinterpret_steal<py::object>(PyFloat_FromDouble(it.f));
    case Tag::kStr: {
      PyObject* s = PyUnicode_DecodeUTF8(reinterpret_cast<const char*>(it.data), it.len, "strict");
      if (!s) throw py::error_already_set();
      return py::reinterpret_steal<py::object>(s);
    }
    case Tag::kBytes:
      return py::reinterpret_steal<py::object>(
          PyBytes_FromStringAndSize(reinterpret_cast<const char*>(it.data), it.len));
    case Tag::kPickle: {
      py::object mv = py::reinterpret_steal<py::object>(PyMemoryView_FromMemory(
          reinterpret_cast<char*>(const_cast<uint8_t*>(it.data)), it.len, PyBUF_READ));
      return pickle_loads()(mv);
    }
  }
  throw std::runtime_error("mpop: corrupt stream");
}

std::pair<py::tuple, py::object> decode_call(const uint8_t* p, size_t n) {
  StreamReader r(p, n);
  uint8_t npos = 0, nkw = 0;
  r.counts(npos, nkw);
  py::tuple args(npos);
  for (uint8_t i = 0; i < npos; ++i) {
    py::object v = decode_item(r.item());
    PyTuple_SET_ITEM(args.ptr(), i, v.release().ptr());
  }
  py::object kwargs = py::none();
  if (nkw) {
    py::dict d;
    for (uint8_t i = 0; i < nkw; ++i) {
      std::string_view k = r.keyword();
      d[py::str(k.data(), k.size())] = decode_item(r.item());
    }
    kwargs = d;
  }
  return {args, kwargs};
}

py::object decode_value(const uint8_t* p, size_t n) {
  StreamReader r(p, n);
  return decode_item(r.item());
}

}  // namespace mpop::py_codec
