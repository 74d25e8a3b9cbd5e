// mpop._core: the private native module. Each area registers itself from its own file.
#include "bindings.hpp"
#include "py_codec.hpp"

PYBIND11_MODULE(_core, m) {
  m.doc() = "mpop's native core (private: use the mpop package)";
  m.attr("LAYOUT_VERSION") = mpop::kLayoutVersion;
  m.attr("SEGMENT_MAGIC") = mpop::kSegmentMagic;
  mpop::py_codec::register_codec(m);
  mpop::bindings::register_segment(m);
  mpop::bindings::register_producer(m);
  mpop::bindings::register_fast_path(m);
  mpop::bindings::register_lazy_tracked(m);
  mpop::bindings::register_future_core(m);
  mpop::bindings::register_protocol(m);
  mpop::bindings::register_collector(m);
  mpop::bindings::register_worker(m);
  mpop::bindings::register_supervisor(m);
}
