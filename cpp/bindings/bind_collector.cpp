// Collector bindings: drains the result ring into Python tuples in batches; the wait for
// the first result happens without the GIL.
#include "bindings.hpp"
#include "mpop/collector.hpp"
#include "py_codec.hpp"

namespace mpop::bindings {

namespace {

// How long the owner keeps looking for a result before it sleeps (see kIdleSpinNs).
#ifndef MPOP_RESULT_SPIN_NS
#define MPOP_RESULT_SPIN_NS 15000
#endif
constexpr int64_t kResultSpinNs = MPOP_RESULT_SPIN_NS;

class PyCollector {
 public:
  explicit PyCollector(SegmentPtr seg) : seg_(std::move(seg)), col_(*seg_) {}

  // [(seq, tsk_id, fn_id, worker_id, attempts, status, value, enqueue_ns, start_ns, end_ns,
  //   route)]
  // status: 0 ok, 1 error (value: bytes of the pickled error, or the exception raised while
  // decoding), 2 crashed, 3 timeout, 4 cancelled.
  //
  // The wait (up to `timeout`) is for `want` results, or fewer if they come out of order:
  // a caller that needs many (run(), wait()) sleeps through the rest instead of waking
  // for each. `spin` polls for kResultSpinNs before sleeping, for a caller that waits for
  // one result and wants it with the least latency (future.result()); it costs CPU the
  // workers could use, so the others do not spin.
  py::list drain(size_t max, const py::object& timeout, uint32_t want, bool spin) {
    int64_t deadline = deadline_from_timeout(timeout);
    uint32_t epoch = interrupts_.load();
    auto stop = [&] { return interrupts_.load() != epoch; };
    // At most half the ring: the workers keep room to publish while this thread drains.
    want = std::clamp<uint32_t>(want, 1, seg_->results().capacity() / 2);
    if (deadline != 0 && seg_->results().published_run(want) < want) {
      py::gil_scoped_release nogil;
      seg_->results().wait_published_n(want, deadline, stop, spin ? 64 : 0, spin ? kResultSpinNs : 0);
    }
    py::list out;
    const uint64_t pin_limit = seg_->pool().capacity_bytes() / 4;
    col_.drain(max, 0, [&](const ResultHeader& h, const uint8_t* value, uint32_t len) {
      py::object v = py::none();
      auto status = static_cast<uint8_t>(h.status);
      // An array in a pooled result becomes a view over its block (no copy out), as long as
      // the results held that way stay within a quarter of the pool; past that, a copy, so
      // results a caller keeps never starve the workers of room.
      std::shared_ptr<py_codec::BlockLease> lease;
      if (h.value_encoding == ValueEncoding::kPooled && h.status == ResultStatus::kOk &&
          pinned_->load(std::memory_order_relaxed) + h.value_len <= pin_limit)
        lease = std::make_shared<py_codec::BlockLease>(
            py_codec::BlockLease{seg_, h.value_ref, h.value_len, false, true, pinned_});
      if (len) {
        try {
          v = py_codec::decode_value(value, len, lease ? &lease : nullptr);
        } catch (py::error_already_set& e) {
          v = e.value();
          status = static_cast<uint8_t>(ResultStatus::kError);
        }
      }
      out.append(py::make_tuple(h.seq, h.tsk_id, h.fn_id, h.worker_id, h.attempts, status, v,
                                h.enqueue_ns, h.start_ns, h.end_ns, h.route));
      if (!lease || lease.use_count() == 1) return false;  // no view made: freed as usual
      pinned_->fetch_add(h.value_len, std::memory_order_relaxed);
      lease->pinned = true;  // the last view frees the block
      return true;
    }, stop);
    return out;
  }

  // Wakes a drain() that is waiting, from any thread.
  void interrupt() {
    interrupts_.fetch_add(1);
    seg_->results().wake_consumers();
  }

  // Results published and not yet drained (a snapshot; no waiting, no syscall).
  uint64_t pending() const { return seg_->results().size(); }

  Collector& native() { return col_; }

 private:
  SegmentPtr seg_;
  Collector col_;
  // Bytes of result blocks held by array views handed out (shared with their leases).
  std::shared_ptr<std::atomic<uint64_t>> pinned_ = std::make_shared<std::atomic<uint64_t>>(0);
  std::atomic<uint32_t> interrupts_{0};
};

}  // namespace

void register_collector(py::module_& m) {
  py::class_<PyCollector>(m, "Collector")
      .def(py::init<SegmentPtr>())
      .def("drain", &PyCollector::drain, py::arg("max") = 4096, py::arg("timeout") = py::none(),
           py::arg("want") = 1, py::arg("spin") = false)
      .def("interrupt", &PyCollector::interrupt)
      .def_property_readonly("pending", [](PyCollector& c) { return c.pending(); })
      .def("is_complete", [](PyCollector& c, uint64_t seq) { return c.native().is_complete(seq); });
}

}  // namespace mpop::bindings
