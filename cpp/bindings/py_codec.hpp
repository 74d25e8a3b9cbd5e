// Python <-> codec stream conversion shared by the producer, worker and collector bindings.
#pragma once

#include <pybind11/pybind11.h>

#include <vector>

#include "mpop/codec.hpp"

namespace mpop::py_codec {

namespace py = pybind11;

// Appends one value: scalars, str and bytes natively; anything else pickled (protocol 5).
void encode_value(py::handle obj, StreamWriter& w);
// Encodes positional args (a tuple) and keyword args (a dict or None) as one stream.
void encode_call(py::handle args, py::handle kwargs, StreamWriter& w);
py::object decode_item(const Item& it);
// Decodes a stream written by encode_call into (args tuple, kwargs dict or None).
std::pair<py::tuple, py::object> decode_call(const uint8_t* p, size_t n);
// Decodes a single value written by encode_value.
py::object decode_value(const uint8_t* p, size_t n);

}  // namespace mpop::py_codec
