// Declarations shared by the binding files: one register_* per area (boost-histogram style).
#pragma once

#include <pybind11/pybind11.h>

#include <memory>

#include "mpop/segment.hpp"

namespace mpop::bindings {

namespace py = pybind11;

void register_segment(py::module_& m);
void register_producer(py::module_& m);
void register_worker(py::module_& m);
void register_collector(py::module_& m);
void register_supervisor(py::module_& m);

using SegmentPtr = std::shared_ptr<Segment>;

inline int64_t deadline_from_timeout(const py::object& timeout) {
  if (timeout.is_none()) return -1;
  double t = timeout.cast<double>();
  if (t <= 0) return 0;
  return monotonic_ns() + static_cast<int64_t>(t * 1e9);
}

}  // namespace mpop::bindings
