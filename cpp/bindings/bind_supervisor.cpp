// Supervisor bindings and the three ways to start a worker: "spawn" (fork + exec of a fresh
// interpreter, done natively), "fork" (a fork of this interpreter that runs the worker
// entry), "forkserver" (through multiprocessing's forkserver, from a Python callable).
#include <signal.h>
#include <sys/prctl.h>
#include <unistd.h>

#include <pybind11/stl.h>

#include "bindings.hpp"
#include "mpop/forwarder.hpp"
#include "mpop/supervisor.hpp"

namespace mpop::bindings {

namespace {

// In a child just forked from `parent`: it gets SIGTERM when that parent (the thread that
// forked it) dies. False if the parent died before the signal was armed (the child must
// then exit). Async-signal-safe.
bool die_with_parent(pid_t parent) {
  prctl(PR_SET_PDEATHSIG, SIGTERM);
  return getppid() == parent;
}

// fork + exec with the parent-death signal set in between (only async-signal-safe calls
// after fork), unless the workers must outlive this process (a persistent pool's). The argv
// gets the worker id and generation appended.
pid_t spawn_exec(const std::vector<std::string>& argv_base, const std::vector<std::string>& env,
                 uint32_t id, uint32_t gen, bool tie_to_parent) {
  std::vector<std::string> argv = argv_base;
  argv.push_back(std::to_string(id));
  argv.push_back(std::to_string(gen));
  std::vector<char*> av, ev;
  for (auto& a : argv) av.push_back(const_cast<char*>(a.c_str()));
  av.push_back(nullptr);
  for (auto& e : env) ev.push_back(const_cast<char*>(e.c_str()));
  ev.push_back(nullptr);
  pid_t parent = getpid();
  pid_t pid = fork();
  if (pid == 0) {
    if (tie_to_parent && !die_with_parent(parent)) _exit(1);
    sigset_t all;
    sigemptyset(&all);
    sigprocmask(SIG_SETMASK, &all, nullptr);
    execve(av[0], av.data(), ev.data());
    _exit(127);
  }
  return pid;
}

// Forks this interpreter from the supervisor thread (which holds the GIL for the fork) and
// runs `entry(id, gen)` in the child, which never returns into the parent's code.
pid_t spawn_fork(const py::object& entry, uint32_t id, uint32_t gen) {
  py::gil_scoped_acquire gil;
  pid_t parent = getpid();
  PyOS_BeforeFork();
  pid_t pid = fork();
  if (pid == 0) {
    PyOS_AfterFork_Child();
    if (!die_with_parent(parent)) _exit(1);
    int code = 0;
    try {
      code = entry(id, gen).cast<int>();
    } catch (py::error_already_set& e) {
      e.discard_as_unraisable("mpop worker");
      code = 1;
    }
    _exit(code);
  }
  PyOS_AfterFork_Parent();
  return pid;
}

class PySupervisor {
 public:
  PySupervisor(SegmentPtr seg, uint32_t workers, uint32_t max_retries,
               double task_timeout, const std::string& method, std::vector<std::string> argv,
               std::vector<std::string> env, py::object entry, bool persistent)
      : seg_(std::move(seg)), entry_(std::move(entry)) {
    SupervisorOptions o;
    o.adopt = persistent;
    o.workers = workers;
    o.max_retries = max_retries;
    o.task_timeout_ns = static_cast<int64_t>(task_timeout * 1e9);
    if (persistent && method != "spawn") throw py::value_error("a persistent pool's workers are spawned");
    if (method == "spawn") {
      o.spawn = [argv = std::move(argv), env = std::move(env), persistent](uint32_t id, uint32_t gen) {
        return spawn_exec(argv, env, id, gen, !persistent);
      };
    } else if (method == "fork") {
      o.spawn = [this](uint32_t id, uint32_t gen) { return spawn_fork(entry_, id, gen); };
    } else if (method == "forkserver") {
      o.children_are_ours = false;
      o.spawn = [this](uint32_t id, uint32_t gen) -> pid_t {
        py::gil_scoped_acquire gil;
        try {
          return entry_(id, gen).cast<pid_t>();
        } catch (py::error_already_set& e) {
          e.discard_as_unraisable("mpop forkserver spawn");
          return -1;
        }
      };
    } else {
      throw py::value_error("unknown start method " + method);
    }
    sup_ = std::make_unique<Supervisor>(*seg_, std::move(o));
  }

  ~PySupervisor() {
    py::gil_scoped_release nogil;  // the thread may need the GIL to finish a fork
    sup_.reset();
  }

  Supervisor& native() { return *sup_; }
  SegmentPtr seg_;

 private:
  py::object entry_;
  std::unique_ptr<Supervisor> sup_;
};

}  // namespace

void register_supervisor(py::module_& m) {
  // The fork server (mpop._worker) arms the same parent-death signal for itself and the
  // workers it forks.
  m.def("die_with_parent", [](int parent) { return die_with_parent(static_cast<pid_t>(parent)); });
  // A persistent pool's result path, run by its supervisor process (forwarder.hpp).
  struct PyForwarder {
    SegmentPtr seg;
    Forwarder fw;
    explicit PyForwarder(SegmentPtr s) : seg(std::move(s)), fw(*seg) {}
  };
  py::class_<PyForwarder>(m, "Forwarder")
      .def(py::init([](SegmentPtr seg) {
             if (seg->client_count() == 0)
               throw py::value_error("mpop: this segment has no client records (not a persistent pool's)");
             return std::make_unique<PyForwarder>(std::move(seg));
           }),
           py::arg("segment"))
      .def("start", [](PyForwarder& f) { f.fw.start(); })
      .def("stop",
           [](PyForwarder& f) {
             py::gil_scoped_release nogil;
             f.fw.stop();
           })
      .def_property_readonly("forwarded", [](PyForwarder& f) { return f.fw.forwarded(); })
      .def_property_readonly("dropped", [](PyForwarder& f) { return f.fw.dropped(); });
  py::class_<PySupervisor>(m, "Supervisor")
      .def(py::init<SegmentPtr, uint32_t, uint32_t, double, const std::string&,
                    std::vector<std::string>, std::vector<std::string>, py::object, bool>(),
           py::arg("segment"), py::arg("workers"), py::arg("max_retries"),
           py::arg("task_timeout"), py::arg("start_method"), py::arg("argv"), py::arg("env"),
           py::arg("entry") = py::none(), py::arg("persistent") = false)
      .def("start",
           [](PySupervisor& s) {
             py::gil_scoped_release nogil;
             s.native().start();
           })
      // Waits in slices, looking at signals between them: a Ctrl-C during a graceful stop
      // kills the workers at once and is raised once they are gone.
      .def("stop",
           [](PySupervisor& s, bool graceful, double timeout) {
             Supervisor& sup = s.native();
             sup.begin_stop(graceful, static_cast<int64_t>(timeout * 1e9));
             for (;;) {
               {
                 py::gil_scoped_release nogil;
                 if (sup.wait_stopped(monotonic_ns() + 50'000'000)) return;
               }
               if (PyErr_CheckSignals() != 0) {
                 py::error_already_set interrupt;
                 sup.begin_stop(false, 0);
                 {
                   py::gil_scoped_release nogil;
                   sup.wait_stopped(-1);
                 }
                 throw interrupt;
               }
             }
           },
           py::arg("graceful") = true, py::arg("timeout") = 10.0)
      .def("scale", [](PySupervisor& s, uint32_t n) { s.native().scale(n); })
      .def("kill_worker", [](PySupervisor& s, uint32_t id) { return s.native().kill_worker(id); })
      .def("kill_task", [](PySupervisor& s, uint64_t seq) { return s.native().kill_task(seq); })
      .def_property_readonly("running", [](PySupervisor& s) { return s.native().running(); })
      .def_property_readonly("last_error",
                             [](PySupervisor& s) {
                               // A worker's start error may have been cut in the middle of a character.
                               std::string e = s.native().last_error();
                               return py::bytes(e).attr("decode")("utf-8", "replace");
                             })
      .def("counters", [](PySupervisor& s) {
        const auto& c = s.native().counters();
        py::dict d;
        d["crashes"] = c.crashes.load();
        d["retries"] = c.retries.load();
        d["timeouts"] = c.timeouts.load();
        d["crashed_tasks"] = c.crashed_tasks.load();
        d["recovered_from_ring"] = c.recovered_from_ring.load();
        d["spawn_failures"] = c.spawn_failures.load();
        d["pool_reclaimed_bytes"] = c.pool_reclaimed_bytes.load();
        d["adopted"] = c.adopted.load();
        return d;
      });
}

}  // namespace mpop::bindings
