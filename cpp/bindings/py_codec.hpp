// Python <-> codec stream conversion shared by the producer, worker and collector bindings.
#pragma once

#include <pybind11/pybind11.h>

#include <memory>
#include <vector>

#include "mpop/codec.hpp"
#include "mpop/segment.hpp"

namespace mpop::py_codec {

namespace py = pybind11;

// A task's pooled argument block as seen by the zero-copy arrays made over it. Normally the
// collector frees the block once the task's result is out; if a view outlives the handler
// call, the worker marks the lease `pinned` and the block is freed here, when the last
// view goes.
struct BlockLease {
  std::shared_ptr<Segment> seg;
  uint64_t off = 0;
  uint64_t len = 0;
  bool pinned = false;
  bool writable = false;                    // views may write (a result the owner now owns)
  std::shared_ptr<std::atomic<uint64_t>> budget;  // bytes pinned this way, given back on free
  ~BlockLease() {
    if (!pinned) return;
    seg->pool().free(off, len);
    if (budget) budget->fetch_sub(len, std::memory_order_relaxed);
  }
};

// Appends one value: scalars, str, bytes and numpy arrays natively (an array's data as an
// external piece when the writer takes pieces: the caller keeps `obj` alive until gather);
// anything else pickled (protocol 5). `keep` holds temporaries the pieces point into.
void encode_value(py::handle obj, StreamWriter& w, std::vector<py::object>* keep = nullptr);
// encode_value's native path alone: writes `obj` and returns true if it is made only of
// the types encoded natively, else writes nothing and returns false.
bool encode_native(py::handle obj, StreamWriter& w, std::vector<py::object>* keep = nullptr);
// Encodes positional args (a tuple) and keyword args (a dict or None) as one stream.
void encode_call(py::handle args, py::handle kwargs, StreamWriter& w, std::vector<py::object>* keep = nullptr);
// With a `lease`, arrays are views over the stream's own memory (a pool block), each holding
// the lease: read-only for a handler's arguments, writable for a result the owner took over
// (`writable`). With an empty lease (a stream in a slot), read-only copies. Without, arrays
// are copies the caller may keep and change.
py::object decode_item(const Item& it, const std::shared_ptr<BlockLease>* lease = nullptr);
// Decodes a stream written by encode_call into (args tuple, kwargs dict or None).
std::pair<py::tuple, py::object> decode_call(const uint8_t* p, size_t n,
                                             const std::shared_ptr<BlockLease>* lease = nullptr);
// Decodes a single value written by encode_value; with a lease, arrays in it are views over
// the block (see decode_item), else copies.
py::object decode_value(const uint8_t* p, size_t n, const std::shared_ptr<BlockLease>* lease = nullptr);

// Registers the read-only buffer type that views over shared memory use.
void register_codec(py::module_& m);

}  // namespace mpop::py_codec
