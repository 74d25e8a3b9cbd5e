// Python <-> codec conversion. Exact types only (subclasses of int/str/... are pickled so
// that they come back as themselves).
#include "py_codec.hpp"

#include <Python.h>

#include <string_view>

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
// mpop._pickling.dumps_by_value(obj, error): cloudpickle, or pickle's own error (see there).
py::object& pickle_by_value() {
  static py::object* f = new py::object(py::module_::import("mpop._pickling").attr("dumps_by_value"));
  return *f;
}

// pickle.dumps(obj), unless it fails or refers to __main__ (which a worker's __main__ does
// not hold): then cloudpickle, by value (see mpop._pickling).
py::bytes pickle_value(py::handle obj) {
  py::object pickled;
  try {
    pickled = pickle_dumps()(obj, 5);
  } catch (py::error_already_set& e) {
    if (!e.matches(PyExc_Exception)) throw;  // KeyboardInterrupt and the like
    return pickle_by_value()(obj, e.value());
  }
  char* data = nullptr;
  Py_ssize_t n = 0;
  if (PyBytes_AsStringAndSize(pickled.ptr(), &data, &n) < 0) throw py::error_already_set();
  if (std::string_view(data, static_cast<size_t>(n)).find("__main__") != std::string_view::npos)
    return pickle_by_value()(obj);
  return pickled;
}

// A read-only buffer over memory someone else owns (a pool block): what a zero-copy array
// argument's data hangs from. Its reference count tells whether any view still uses it.
struct SharedBuffer {
  const uint8_t* data;
  size_t len;
  std::shared_ptr<BlockLease> lease;
  bool writable() const { return lease && lease->writable; }
};

// numpy is imported only once an array is seen, so that mpop does not depend on it.
struct Numpy {
  py::object ndarray, frombuffer, ascontiguousarray, dtype;
};
Numpy& numpy() {
  static Numpy* np = [] {
    py::module_ m = py::module_::import("numpy");
    return new Numpy{m.attr("ndarray"), m.attr("frombuffer"), m.attr("ascontiguousarray"), m.attr("dtype")};
  }();
  return *np;
}

// Exactly numpy.ndarray (subclasses are pickled, so they come back as themselves), without
// importing numpy to find out.
bool is_plain_ndarray(PyObject* o) { return std::strcmp(Py_TYPE(o)->tp_name, "numpy.ndarray") == 0; }

// Encodes an array natively if its dtype round-trips through dtype.str (no objects, no
// named fields); returns false to have it pickled.
bool encode_array(py::handle arr, StreamWriter& w, std::vector<py::object>* keep) {
  py::object dt = arr.attr("dtype");
  if (dt.attr("hasobject").cast<bool>() || !dt.attr("names").is_none() || !dt.attr("subdtype").is_none() ||
      dt.attr("itemsize").cast<size_t>() == 0)
    return false;
  py::object a = py::reinterpret_borrow<py::object>(arr);
  bool copied = false;
  if (!a.attr("flags").attr("c_contiguous").cast<bool>()) {
    a = numpy().ascontiguousarray(a);
    copied = true;
    if (keep) keep->push_back(a);
  }
  py::tuple shape = a.attr("shape");
  if (shape.size() > 64) return false;
  int64_t dims[64];
  for (size_t i = 0; i < shape.size(); ++i) dims[i] = shape[i].cast<int64_t>();
  std::string dtype = dt.attr("str").cast<std::string>();
  size_t nbytes = a.attr("nbytes").cast<size_t>();
  py::tuple data = a.attr("__array_interface__")["data"];
  auto* ptr = reinterpret_cast<const void*>(data[0].cast<uintptr_t>());
  // A temporary copy nobody keeps must be copied into the stream now.
  w.array(dtype, dims, static_cast<uint8_t>(shape.size()), ptr, nbytes, /*in_place=*/!copied || keep);
  return true;
}
}  // namespace

namespace {
constexpr int kMaxNesting = 16;


// Writes `o` natively if it is None, a bool, an int64, a float, a str, bytes, a numpy
// array, or an exact list/tuple of those (nested up to kMaxNesting); returns false, having
// written nothing, for anything else (which is then pickled whole).
bool encode_plain(PyObject* o, StreamWriter& w, int depth, std::vector<py::object>* keep) {
  if (o == Py_None) return w.none(), true;
  if (o == Py_True) return w.boolean(true), true;
  if (o == Py_False) return w.boolean(false), true;
  if (PyLong_CheckExact(o)) {
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
    if (overflow) return false;
    w.integer(static_cast<int64_t>(v));
    return true;
  }
  if (PyFloat_CheckExact(o)) return w.real(PyFloat_AS_DOUBLE(o)), true;
  if (PyUnicode_CheckExact(o)) {
    Py_ssize_t n = 0;
    const char* s = PyUnicode_AsUTF8AndSize(o, &n);
    if (!s) {
      PyErr_Clear();
      return false;
    }
    w.blob(Tag::kStr, s, static_cast<size_t>(n));
    return true;
  }
  if (PyBytes_CheckExact(o)) {
    w.blob(Tag::kBytes, PyBytes_AS_STRING(o), static_cast<size_t>(PyBytes_GET_SIZE(o)));
    return true;
  }
  if (is_plain_ndarray(o)) return encode_array(o, w, keep);
  const bool list = PyList_CheckExact(o), tuple = PyTuple_CheckExact(o);
  if ((!list && !tuple) || depth >= kMaxNesting) return false;
  Py_ssize_t n = list ? PyList_GET_SIZE(o) : PyTuple_GET_SIZE(o);
  if (n > static_cast<Py_ssize_t>(UINT32_MAX)) return false;
  const StreamWriter::Mark at = w.mark();
  w.container(list ? Tag::kList : Tag::kTuple, static_cast<uint32_t>(n));
  w.reserve(9 * static_cast<size_t>(n));  // as many ints or floats
  for (Py_ssize_t i = 0; i < n; ++i) {
    // A list may change under us only if an item's conversion ran Python code; none does.
    PyObject* item = list ? PyList_GET_ITEM(o, i) : PyTuple_GET_ITEM(o, i);
    if (!encode_plain(item, w, depth + 1, keep)) {
      w.rewind(at);
      return false;
    }
  }
  return true;
}
}  // namespace

bool encode_native(py::handle obj, StreamWriter& w, std::vector<py::object>* keep) {
  return encode_plain(obj.ptr(), w, 0, keep);
}

void encode_value(py::handle obj, StreamWriter& w, std::vector<py::object>* keep) {
  // Scalars, arrays, and lists and tuples of those (a map() chunk's items and results, say)
  // natively: several times cheaper than pickling them, both ways.
  if (encode_plain(obj.ptr(), w, 0, keep)) return;
  py::bytes pickled = pickle_value(obj);
  char* data = nullptr;
  Py_ssize_t n = 0;
  PyBytes_AsStringAndSize(pickled.ptr(), &data, &n);
  w.blob(Tag::kPickle, data, static_cast<size_t>(n));
}

void encode_call(py::handle args, py::handle kwargs, StreamWriter& w, std::vector<py::object>* keep) {
  Py_ssize_t npos = PyTuple_GET_SIZE(args.ptr());
  Py_ssize_t nkw = kwargs.is_none() ? 0 : PyDict_GET_SIZE(kwargs.ptr());
  if (npos > 255 || nkw > 255) throw py::type_error("mpop: at most 255 positional and 255 keyword arguments");
  w.counts(static_cast<uint8_t>(npos), static_cast<uint8_t>(nkw));
  for (Py_ssize_t i = 0; i < npos; ++i) encode_value(PyTuple_GET_ITEM(args.ptr(), i), w, keep);
  if (nkw) {
    PyObject *key, *value;
    Py_ssize_t pos = 0;
    while (PyDict_Next(kwargs.ptr(), &pos, &key, &value)) {
      Py_ssize_t n = 0;
      const char* s = PyUnicode_AsUTF8AndSize(key, &n);
      if (!s) throw py::error_already_set();
      w.keyword(std::string_view(s, static_cast<size_t>(n)));
      encode_value(value, w, keep);
    }
  }
}

py::object decode_item(const Item& it, const std::shared_ptr<BlockLease>* lease) {
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
    case Tag::kList:
    case Tag::kTuple:
      break;  // decode_next reads their items
    case Tag::kArray: {
      Numpy& np = numpy();
      py::tuple shape(it.ndim);
      for (uint8_t i = 0; i < it.ndim; ++i) {
        int64_t d;
        std::memcpy(&d, it.shape + 8 * i, 8);
        PyTuple_SET_ITEM(shape.ptr(), i, PyLong_FromLongLong(d));
      }
      py::object dtype = np.dtype(py::str(it.dtype.data(), it.dtype.size()));
      if (lease && *lease && it.len) {
        // No copy: a read-only array over the pool block, holding the block's lease.
        py::object owner = py::cast(SharedBuffer{it.data, it.len, *lease});
        return np.frombuffer(owner, dtype).attr("reshape")(shape);
      }
      py::object a = np.ndarray(shape, dtype);
      py::dict iface = a.attr("__array_interface__");
      auto* dst = reinterpret_cast<void*>(py::tuple(iface["data"])[0].cast<uintptr_t>());
      if (it.len) std::memcpy(dst, it.data, it.len);
      if (lease && !(*lease && (*lease)->writable))
        a.attr("setflags")(py::arg("write") = false);  // arguments are read-only alike
      return a;
    }
  }
  throw std::runtime_error("mpop: corrupt stream");
}

namespace {
// Reads the next item, with the items of a list or tuple.
py::object decode_next(StreamReader& r, const std::shared_ptr<BlockLease>* lease, int depth = 0) {
  Item it = r.item();
  if (it.tag != Tag::kList && it.tag != Tag::kTuple) return decode_item(it, lease);
  if (depth >= kMaxNesting || it.len > r.remaining())  // each item takes at least a byte
    throw std::runtime_error("mpop: corrupt stream (container)");
  const bool list = it.tag == Tag::kList;
  PyObject* c = list ? PyList_New(it.len) : PyTuple_New(it.len);
  if (!c) throw py::error_already_set();
  py::object out = py::reinterpret_steal<py::object>(c);
  for (uint32_t i = 0; i < it.len; ++i) {
    int64_t iv;
    PyObject* v;
    if (r.next_int(iv)) {
      v = PyLong_FromLongLong(iv);
      if (!v) throw py::error_already_set();
    } else {
      v = decode_next(r, lease, depth + 1).release().ptr();
    }
    if (list)
      PyList_SET_ITEM(c, i, v);
    else
      PyTuple_SET_ITEM(c, i, v);
  }
  return out;
}
}  // namespace

std::pair<py::tuple, py::object> decode_call(const uint8_t* p, size_t n,
                                             const std::shared_ptr<BlockLease>* lease) {
  StreamReader r(p, n);
  uint8_t npos = 0, nkw = 0;
  r.counts(npos, nkw);
  py::tuple args(npos);
  for (uint8_t i = 0; i < npos; ++i) {
    py::object v = decode_next(r, lease);
    PyTuple_SET_ITEM(args.ptr(), i, v.release().ptr());
  }
  py::object kwargs = py::none();
  if (nkw) {
    py::dict d;
    for (uint8_t i = 0; i < nkw; ++i) {
      std::string_view k = r.keyword();
      d[py::str(k.data(), k.size())] = decode_next(r, lease);
    }
    kwargs = d;
  }
  return {args, kwargs};
}

py::object decode_value(const uint8_t* p, size_t n, const std::shared_ptr<BlockLease>* lease) {
  StreamReader r(p, n);
  return decode_next(r, lease);
}

void register_codec(py::module_& m) {
  py::class_<SharedBuffer>(m, "SharedBuffer", py::buffer_protocol(),
                           "A read-only window on shared memory (the data of a zero-copy array).")
      .def_buffer([](SharedBuffer& b) {
        return py::buffer_info(const_cast<uint8_t*>(b.data), 1, "B", 1, {static_cast<py::ssize_t>(b.len)}, {1},
                               /*readonly=*/!b.writable());
      })
      .def("__len__", [](const SharedBuffer& b) { return b.len; });
}

}  // namespace mpop::py_codec
