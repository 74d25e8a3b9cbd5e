// Supervisor, end to end with C++ workers and no Python: the supervisor spawns this very
// executable (fork + exec of /proc/self/exe with --mpop-worker, handled by main() below),
// which attaches the segment and runs the native worker loop with a C++ Runner. The tests
// kill workers at every step of the worker protocol, at random, on purpose (a poison task)
// and for running too long, and stop the pool gracefully or not, and check each time that
// every task ends with exactly one final result, with the right value or status, that the
// supervisor's counters tell what happened, and that the argument pool, the processes and
// /dev/shm are left as they were.
#include <dirent.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <fstream>
#include <functional>
#include <iostream>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "mpop/codec.hpp"
#include "mpop/collector.hpp"
#include "mpop/producer.hpp"
#include "mpop/side_channel.hpp"
#include "mpop/supervisor.hpp"
#include "mpop/worker_loop.hpp"
#include "test_support.hpp"

namespace mpop {
namespace {

using test::scaled;

constexpr int64_t kMs = 1'000'000;
constexpr int64_t kSec = 1'000'000'000;
// Waits for things that involve spawning a process: generous under sanitizers.
constexpr int64_t kPatienceNs = 30 * kSec;

// ---- the tasks ----------------------------------------------------------------------------

// The slot of these tests: tsk_id, fn_id, four int64 args, and room for TaskMeta.
SlotLayout test_layout() {
  SlotLayout L;
  L.size = 72;
  L.tsk_id_off = 0;
  L.tsk_id_size = 4;
  L.fn_id_off = 4;
  L.fn_id_size = 4;
  L.args_off = 8;
  L.args_count = 4;
  L.meta_off = 40;
  L.meta_len = 32;
  return L;
}

// What a worker does with a task. Every task has an integer x and a delay (args[0] and
// args[1], or the first two items of its pooled argument stream).
enum Fn : uint32_t {
  kCompute = 1,  // returns the integer 2x + 1
  kBig = 2,      // returns a bytes blob too large to go inline (it goes through the pool)
  kPoison = 3,   // kills its worker (SIGKILL), every time it runs
};

struct Task {
  uint32_t fn = kCompute;
  int64_t x = 0;
  int64_t delay_us = 0;  // < 200: spin that long; else sleep
  bool pooled = false;   // arguments as a codec stream in the argument pool
};

uint32_t big_len(int64_t x) { return kResultInlineBytes + 100 + static_cast<uint32_t>(x % 900); }
uint8_t big_byte(int64_t x, uint32_t j) { return static_cast<uint8_t>(x * 131 + j * 7 + 3); }
uint32_t pad_len(int64_t x) { return 200 + static_cast<uint32_t>(x % 300); }
uint8_t pad_byte(int64_t x, uint32_t j) { return static_cast<uint8_t>(x * 17 + j); }

void delay(int64_t us) {
  if (us <= 0) return;
  if (us < 200) {
    int64_t until = monotonic_ns() + us * 1000;
    while (monotonic_ns() < until) cpu_relax();
    return;
  }
  std::this_thread::sleep_for(std::chrono::microseconds(us));
}

// The C++ Runner that the worker processes run (see run_worker's requirements).
class TestRunner {
 public:
  explicit TestRunner(Segment& seg) : L_(seg.config().slot) {}

  ResultStatus run(const TaskRun& t, std::vector<uint8_t>& value) {
    int64_t x = 0, delay_us = 0;
    if (t.header->encoding == ArgEncoding::kSlotInts) {
      if (t.header->nargs != 2) return fail("expected 2 slot args", value);
      std::memcpy(&x, t.slot + L_.args_off, 8);
      std::memcpy(&delay_us, t.slot + L_.args_off + 8, 8);
    } else {
      if (!t.stream) return fail("no argument stream", value);
      try {
        StreamReader r(t.stream, t.stream_len);
        uint8_t npos = 0, nkw = 0;
        r.counts(npos, nkw);
        if (npos != 3 || nkw != 0) return fail("bad counts", value);
        Item a = r.item(), b = r.item(), pad = r.item();
        if (a.tag != Tag::kInt || b.tag != Tag::kInt || pad.tag != Tag::kBytes || !r.done())
          return fail("bad items", value);
        x = a.i;
        delay_us = b.i;
        if (pad.len != pad_len(x)) return fail("bad padding length", value);
        for (uint32_t j = 0; j < pad.len; ++j)
          if (pad.data[j] != pad_byte(x, j)) return fail("corrupt padding", value);
      } catch (const std::exception& e) {
        return fail(e.what(), value);
      }
    }
    delay(delay_us);
    StreamWriter w(value);
    switch (t.fn_id) {
      case kCompute:
        w.integer(2 * x + 1);
        return ResultStatus::kOk;
      case kBig: {
        blob_.resize(big_len(x));
        for (uint32_t j = 0; j < blob_.size(); ++j) blob_[j] = big_byte(x, j);
        w.blob(Tag::kBytes, blob_.data(), blob_.size());
        return ResultStatus::kOk;
      }
      case kPoison:
        raise(SIGKILL);
        for (;;) pause();
      default:
        return fail("unknown fn_id " + std::to_string(t.fn_id), value);
    }
  }
  ResultStatus fail(const std::string& why, std::vector<uint8_t>& value) {
    StreamWriter w(value);
    w.blob(Tag::kStr, why.data(), why.size());
    return ResultStatus::kError;
  }
  void before_sleep() {}
  void after_sleep() {}
  bool interrupted() { return false; }

 private:
  SlotLayout L_;
  std::vector<uint8_t> blob_;
};

// What a worker that says hello (PoolSetup::hello_bytes) writes to its stdout side route
// before its loop, and what one that says goodbye sends as its exit value after it.
uint8_t hello_byte(uint32_t id, uint32_t j) { return static_cast<uint8_t>(id * 59 + j * 13 + j / 256 + 5); }
std::string goodbye_text(uint32_t id, uint32_t gen, WorkerExit e) {
  return std::to_string(id) + "/" + std::to_string(gen) + " " + to_string(e);
}

// The worker process: `<exe> --mpop-worker <segment> <id> [<hello bytes> <goodbye 0|1>]`.
[[noreturn]] void worker_main(int argc, char** argv) {
  if (argc < 4) _exit(2);
  try {
    auto seg = Segment::attach(argv[2]);
    uint32_t id = static_cast<uint32_t>(std::stoul(argv[3]));
    const uint32_t hello = argc >= 6 ? static_cast<uint32_t>(std::stoul(argv[4])) : 0;
    const bool goodbye = argc >= 6 && std::strcmp(argv[5], "1") == 0;
    if (hello) {  // as an initializer's output: before the loop, still starting
      std::vector<uint8_t> msg(hello);
      for (uint32_t j = 0; j < hello; ++j) msg[j] = hello_byte(id, j);
      SideChannel side(*seg, id);
      if (!side.send(kRouteStdout, msg.data(), msg.size())) _exit(4);
    }
    TestRunner runner(*seg);
    WorkerExit e = run_worker(*seg, id, runner);
    if (goodbye && e != WorkerExit::kOwnerDied) {  // as worker_exit's value
      std::string bye = goodbye_text(id, seg->workers().record(id).generation.load(), e);
      SideChannel side(*seg, id);
      side.send(kRouteExit, reinterpret_cast<const uint8_t*>(bye.data()), bye.size());
    }
    seg->leave(e == WorkerExit::kOwnerDied);
  } catch (...) {
    _exit(3);
  }
  _exit(0);  // no GoogleTest or sanitizer teardown in a worker
}

// Checks a result value against its task; returns what is wrong, or "".
std::string check_value(const Task& t, const uint8_t* v, uint32_t len) {
  try {
    StreamReader r(v, len);
    Item it = r.item();
    if (!r.done()) return "trailing bytes";
    if (t.fn == kCompute) {
      if (it.tag != Tag::kInt) return "not an int";
      if (it.i != 2 * t.x + 1)
        return "value " + std::to_string(it.i) + ", expected " + std::to_string(2 * t.x + 1);
      return "";
    }
    if (t.fn == kBig) {
      if (it.tag != Tag::kBytes) return "not bytes";
      if (it.len != big_len(t.x)) return "blob of " + std::to_string(it.len) + " bytes";
      for (uint32_t j = 0; j < it.len; ++j)
        if (it.data[j] != big_byte(t.x, j)) return "corrupt blob at byte " + std::to_string(j);
      return "";
    }
    return "a value for fn " + std::to_string(t.fn);
  } catch (const std::exception& e) {
    return e.what();
  }
}

// The tasks of a run and what came back for each (indexed by tsk_id).
struct Book {
  std::vector<Task> tasks;
  std::vector<std::atomic<uint64_t>> seq;  // set by the submitting thread
  std::vector<uint32_t> count;
  std::vector<ResultHeader> first;
  std::vector<std::string> problem;
  std::vector<size_t> order;  // position of the first result in the collection order
  size_t received = 0;
  std::atomic<size_t> progress{0};
  std::vector<std::string> strays;
  // Whole side messages (worker output, exit values), in the order they came.
  struct Side {
    uint32_t route;
    uint16_t worker;
    std::string data;
  };
  std::vector<Side> side;

  explicit Book(std::vector<Task> t)
      : tasks(std::move(t)),
        seq(tasks.size()),
        count(tasks.size(), 0),
        first(tasks.size()),
        problem(tasks.size()),
        order(tasks.size(), SIZE_MAX) {}
  size_t size() const { return tasks.size(); }

  // What the collector hands on: a task's result, or a whole side message.
  void on_record(const ResultHeader& h, const uint8_t* v, uint32_t len) {
    if (h.route >= kFirstSideRoute) {
      side.push_back({h.route, h.worker_id, std::string(reinterpret_cast<const char*>(v), len)});
      // Its seq names the task the worker ran last (0: none yet): one of ours.
      if (h.seq != 0 && std::find(seq.begin(), seq.end(), h.seq) == seq.end())
        strays.push_back("a side message with the seq of no task: " + std::to_string(h.seq));
      return;
    }
    on_result(h, v, len);
  }
  void on_result(const ResultHeader& h, const uint8_t* v, uint32_t len) {
    if (h.tsk_id >= tasks.size()) {
      strays.push_back("result for unknown tsk_id " + std::to_string(h.tsk_id));
      return;
    }
    uint32_t i = h.tsk_id;
    if (++count[i] > 1) return;
    first[i] = h;
    order[i] = received++;
    progress.store(received, std::memory_order_relaxed);
    if (h.fn_id != tasks[i].fn) problem[i] = "fn_id " + std::to_string(h.fn_id);
    else if (h.status == ResultStatus::kOk) problem[i] = check_value(tasks[i], v, len);
    else if (h.status == ResultStatus::kError)
      problem[i] = "error: " + std::string(reinterpret_cast<const char*>(v), len);
  }
};

// Under TSan no task takes its arguments from the pool. A pool block that a producer thread
// filled with arguments, and that a worker process later reuses for a result, is ordered
// between the producer's write and the collector's read only through that other process,
// which TSan cannot see: it would report the read as a race. The plain and ASan builds
// cover pooled arguments.
#if defined(__SANITIZE_THREAD__)
constexpr bool kPooledArgs = false;
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
constexpr bool kPooledArgs = false;
#else
constexpr bool kPooledArgs = true;
#endif
#else
constexpr bool kPooledArgs = true;
#endif

std::vector<Task> mixed_tasks(size_t n, int64_t delay_us, size_t big_every, size_t pooled_every) {
  std::vector<Task> out(n);
  for (size_t i = 0; i < n; ++i) {
    Task& t = out[i];
    t.x = static_cast<int64_t>(i) * 3 + 1;
    t.delay_us = delay_us;
    if (big_every && i % big_every == big_every - 1) t.fn = kBig;
    if (kPooledArgs && pooled_every && i % pooled_every == pooled_every / 2) t.pooled = true;
  }
  return out;
}

// ---- the pool under test --------------------------------------------------------------------

struct PoolSetup {
  uint32_t workers = 2;
  uint32_t max_retries = 1;
  int64_t task_timeout_ns = 0;
  uint32_t batch = 16;
  uint32_t queue_slots = 1024;
  uint32_t result_slots = 1024;
  uint64_t pool_bytes = 8ull << 20;
  uint64_t max_tasks_per_worker = 0;
  uint64_t max_worker_memory = 0;
  uint32_t hello_bytes = 0;  // each worker writes this many bytes to stdout before its loop
  bool goodbye = false;      // each worker sends an exit value (goodbye_text) after its loop
};

// A segment, its producer, collector and supervisor, and a thread that submits a Book.
class Pool {
 public:
  Pool(const std::string& prefix, const PoolSetup& s) {
    SegmentConfig c;
    c.slot = test_layout();
    c.queue_slots = s.queue_slots;
    c.result_slots = s.result_slots;
    c.max_workers = s.workers;
    c.batch_size = s.batch;
    c.pool_bytes = s.pool_bytes;
    c.registry_bytes = 4096;
    c.max_tasks_per_worker = s.max_tasks_per_worker;
    c.max_worker_memory = s.max_worker_memory;
    seg_ = Segment::create(prefix, c);
    hello_ = std::to_string(s.hello_bytes);
    goodbye_ = std::string(1, s.goodbye ? '1' : '0');
    name_ = seg_->name();
    producer_ = std::make_unique<Producer>(*seg_);
    collector_ = std::make_unique<Collector>(*seg_);
    SupervisorOptions o;
    o.workers = s.workers;
    o.max_retries = s.max_retries;
    o.task_timeout_ns = s.task_timeout_ns;
    o.spawn = [this](uint32_t id, uint32_t) { return spawn(id); };
    sup_ = std::make_unique<Supervisor>(*seg_, std::move(o));
  }
  ~Pool() {
    producer_->close();
    if (submitter_.joinable()) submitter_.join();
    sup_->stop(false, 0);
    sup_.reset();
    collector_.reset();
    producer_.reset();
    seg_.reset();
  }
  Pool(const Pool&) = delete;
  Pool& operator=(const Pool&) = delete;

  Segment& seg() { return *seg_; }
  Producer& producer() { return *producer_; }
  Supervisor& sup() { return *sup_; }
  Collector& collector() { return *collector_; }
  const SupervisorCounters& counters() { return sup_->counters(); }
  WorkerRecord& record(uint32_t id) { return seg_->workers().record(id); }
  uint32_t worker_count() const { return seg_->workers().count; }

  // Starts the workers and lets queued tasks flow.
  void start() {
    producer_->start_feeding();
    sup_->start();
  }

  // Submits task `i` of the book; returns its seq (0 if refused).
  uint64_t submit(Book& b, uint32_t i, bool blocking = true) {
    const SlotLayout& L = seg_->config().slot;
    const Task& t = b.tasks[i];
    slot_.assign(L.size, 0);
    write_uint(slot_.data() + L.tsk_id_off, L.tsk_id_size, i);
    write_uint(slot_.data() + L.fn_id_off, L.fn_id_size, t.fn);
    TaskDraft d;
    d.header.enqueue_ns = monotonic_ns();
    d.slot = slot_.data();
    if (!t.pooled) {
      d.header.encoding = ArgEncoding::kSlotInts;
      d.header.nargs = 2;
      std::memcpy(slot_.data() + L.args_off, &t.x, 8);
      std::memcpy(slot_.data() + L.args_off + 8, &t.delay_us, 8);
      d.slot_used = L.args_off + 16;
    } else {
      StreamWriter w(stream_);
      w.counts(3, 0);
      w.integer(t.x);
      w.integer(t.delay_us);
      pad_.resize(pad_len(t.x));
      for (uint32_t j = 0; j < pad_.size(); ++j) pad_[j] = pad_byte(t.x, j);
      w.blob(Tag::kBytes, pad_.data(), pad_.size());
      d.header.encoding = ArgEncoding::kPooled;
      d.header.stream_len = static_cast<uint32_t>(stream_.size());
      d.stream = stream_.data();
      d.stream_len = static_cast<uint32_t>(stream_.size());
      d.slot_used = 8;
    }
    PushOutcome out = producer_->submit(d, blocking, -1);
    if (out != PushOutcome::kRing && out != PushOutcome::kBacklog) return 0;
    b.seq[i] = d.header.seq;
    return d.header.seq;
  }
  // Submits tasks [from, to) of the book on this thread.
  bool submit_range(Book& b, size_t from, size_t to) {
    for (size_t i = from; i < to; ++i)
      if (!submit(b, static_cast<uint32_t>(i))) return false;
    return true;
  }
  // Submits the whole book from a thread (blocking pushes, as a user thread would).
  void submit_async(Book& b) {
    submitter_ = std::thread([this, &b] { submitted_ok_ = submit_range(b, 0, b.size()); });
  }
  bool join_submitter() {
    if (submitter_.joinable()) submitter_.join();
    return submitted_ok_;
  }

  // Drains results into the book until it holds `want` first results or the deadline.
  bool collect(Book& b, size_t want, int64_t timeout_ns = 30 * kSec) {
    int64_t deadline = monotonic_ns() + timeout_ns;
    while (b.received < want && monotonic_ns() < deadline) {
      collector_->drain(4096, monotonic_ns() + 20 * kMs,
                        [&](const ResultHeader& h, const uint8_t* v, uint32_t len) { b.on_record(h, v, len); },
                        [] { return false; });
    }
    return b.received >= want;
  }
  // Drains whatever comes within `quiet_ns` of the last result.
  void collect_rest(Book& b, int64_t quiet_ns = 200 * kMs) {
    int64_t until = monotonic_ns() + quiet_ns;
    while (monotonic_ns() < until) {
      size_t n = collector_->drain(
          4096, monotonic_ns() + 10 * kMs,
          [&](const ResultHeader& h, const uint8_t* v, uint32_t len) { b.on_record(h, v, len); },
          [] { return false; });
      if (n) until = monotonic_ns() + quiet_ns;
    }
  }

  std::vector<pid_t> spawned() {
    std::lock_guard<std::mutex> lock(mutex_);
    return spawned_;
  }
  uint64_t sum_restarts() {
    uint64_t n = 0;
    for (uint32_t i = 0; i < worker_count(); ++i) n += record(i).restarts.load();
    return n;
  }
  uint64_t sum_recycled() {
    uint64_t n = 0;
    for (uint32_t i = 0; i < worker_count(); ++i) n += record(i).recycled.load();
    return n;
  }

 private:
  // SupervisorOptions::spawn: fork + exec of this executable as a worker. Only
  // async-signal-safe calls between fork and exec: the parent has other threads.
  pid_t spawn(uint32_t id) {
    std::string ids = std::to_string(id);
    const char* argv[] = {"/proc/self/exe", "--mpop-worker", name_.c_str(), ids.c_str(),
                          hello_.c_str(), goodbye_.c_str(), nullptr};
    pid_t parent = getpid();
    pid_t pid = fork();
    if (pid == 0) {
      prctl(PR_SET_PDEATHSIG, SIGKILL);  // dies with the supervisor thread, so with the test
      if (getppid() != parent) _exit(1);
      sigset_t none;
      sigemptyset(&none);
      sigprocmask(SIG_SETMASK, &none, nullptr);
      execv(argv[0], const_cast<char* const*>(argv));
      _exit(127);
    }
    if (pid > 0) {
      std::lock_guard<std::mutex> lock(mutex_);
      spawned_.push_back(pid);
    }
    return pid;
  }

  std::unique_ptr<Segment> seg_;
  std::string name_;
  std::string hello_, goodbye_;  // the workers' extra arguments
  std::unique_ptr<Producer> producer_;
  std::unique_ptr<Collector> collector_;
  std::unique_ptr<Supervisor> sup_;
  std::vector<uint8_t> slot_, stream_, pad_;
  std::thread submitter_;
  bool submitted_ok_ = false;
  std::mutex mutex_;
  std::vector<pid_t> spawned_;
};

template <class Cond>
bool eventually(Cond&& cond, int64_t timeout_ns = kPatienceNs) {
  return test::eventually(cond, timeout_ns, std::chrono::milliseconds(1));
}

// How the results of a book went, for the assertions.
struct Tally {
  size_t ok = 0, missing = 0, duplicated = 0, wrong = 0;
  std::map<int, size_t> by_status;
  std::map<uint32_t, size_t> by_attempts;
  uint64_t charged = 0;  // sum of (attempts - 1) over final results
  std::string first_problem;
};

Tally tally(const Book& b) {
  Tally t;
  std::set<uint64_t> seqs;
  for (size_t i = 0; i < b.size(); ++i) {
    auto note = [&](const std::string& what) {
      if (t.first_problem.empty()) t.first_problem = "task " + std::to_string(i) + ": " + what;
    };
    if (b.count[i] == 0) {
      ++t.missing;
      note("no result");
      continue;
    }
    if (b.count[i] > 1) {
      ++t.duplicated;
      note(std::to_string(b.count[i]) + " results");
    }
    const ResultHeader& h = b.first[i];
    t.by_status[static_cast<int>(h.status)]++;
    t.by_attempts[h.attempts]++;
    if (h.attempts > 0) t.charged += h.attempts - 1u;
    if (!b.problem[i].empty()) {
      ++t.wrong;
      note(b.problem[i]);
    } else if (b.seq[i] != 0 && h.seq != b.seq[i]) {
      ++t.wrong;
      note("seq " + std::to_string(h.seq) + ", submitted as " + std::to_string(b.seq[i]));
    } else if (!seqs.insert(h.seq).second) {
      ++t.wrong;
      note("seq " + std::to_string(h.seq) + " seen twice");
    } else if (h.status == ResultStatus::kOk) {
      ++t.ok;
    }
  }
  if (!b.strays.empty() && t.first_problem.empty()) t.first_problem = b.strays.front();
  return t;
}

std::string describe(const Tally& t, Pool& p) {
  std::ostringstream o;
  o << "ok=" << t.ok << " missing=" << t.missing << " duplicated=" << t.duplicated << " wrong=" << t.wrong
    << " statuses={";
  for (auto [s, n] : t.by_status) o << s << ":" << n << " ";
  o << "} attempts={";
  for (auto [a, n] : t.by_attempts) o << a << ":" << n << " ";
  const SupervisorCounters& c = p.counters();
  o << "} crashes=" << c.crashes << " retries=" << c.retries << " timeouts=" << c.timeouts
    << " crashed_tasks=" << c.crashed_tasks << " recovered_from_ring=" << c.recovered_from_ring
    << " spawn_failures=" << c.spawn_failures << " error='" << p.sup().last_error() << "'"
    << " ring=" << p.seg().tasks().size() << " backlog=" << p.producer().backlog_size()
    << " pool_used=" << p.seg().pool().used_bytes() << " first problem: " << t.first_problem;
  return o.str();
}

// Every task once, kOk, with its value.
#define EXPECT_ALL_OK(book, pool)                                       \
  do {                                                                  \
    Tally t_ = tally(book);                                             \
    EXPECT_EQ(t_.ok, (book).size()) << describe(t_, pool);              \
    EXPECT_TRUE((book).strays.empty()) << (book).strays.front();        \
  } while (0)

// ---- processes and /dev/shm ------------------------------------------------------------------

// Our child processes (live or zombie), from /proc.
std::vector<pid_t> my_children() {
  std::vector<pid_t> out;
  pid_t me = getpid();
  if (DIR* d = opendir("/proc")) {
    while (dirent* e = readdir(d)) {
      char* end = nullptr;
      long pid = std::strtol(e->d_name, &end, 10);
      if (pid <= 0 || *end) continue;
      std::ifstream f("/proc/" + std::string(e->d_name) + "/stat");
      std::string line;
      if (!std::getline(f, line)) continue;
      auto close = line.rfind(')');
      if (close == std::string::npos) continue;
      std::istringstream rest(line.substr(close + 2));
      std::string state;
      long ppid = 0;
      rest >> state >> ppid;
      if (ppid == me) out.push_back(static_cast<pid_t>(pid));
    }
    closedir(d);
  }
  return out;
}

class SupervisorTest : public ::testing::Test {
 protected:
  // Unique per test process, so that parallel ctest runs never see each other's segments.
  std::string prefix = "mpopsv" + std::to_string(getpid());

  void TearDown() override {
    std::vector<pid_t> kids = my_children();
    for (pid_t k : kids) {
      kill(k, SIGKILL);
      waitpid(k, nullptr, 0);
    }
    EXPECT_TRUE(kids.empty()) << kids.size() << " worker process(es) outlived the supervisor";
    std::vector<std::string> left = test::remove_leftover_segments(prefix);
    EXPECT_TRUE(left.empty()) << "left in /dev/shm: " << left.front();
  }
};

// ---- 1. a plain run --------------------------------------------------------------------------

// The collector's completion window: which seqs have their final result, and the lowest
// that has not (what wait() and run() wait on), across words, out of order, with growth.
TEST(CompletionWindow, FirstIncompleteIsTheLowestSeqWithoutItsResult) {
  CompletionWindow w;
  EXPECT_EQ(w.first_incomplete(), 1u);
  EXPECT_TRUE(w.mark(2));
  EXPECT_EQ(w.first_incomplete(), 1u);
  EXPECT_TRUE(w.mark(1));
  EXPECT_EQ(w.first_incomplete(), 3u);
  EXPECT_FALSE(w.mark(2));  // a duplicate
  // Out of order over many words, including ones far ahead (the window grows).
  std::vector<uint64_t> seqs;
  for (uint64_t s = 3; s < 5000; ++s) seqs.push_back(s);
  test::SplitMix rng{7};
  for (size_t i = seqs.size(); i > 1; --i) std::swap(seqs[i - 1], seqs[rng.next() % i]);
  uint64_t lowest_missing = 3;
  std::vector<bool> done(5001, false);
  for (uint64_t s : seqs) {
    EXPECT_TRUE(w.mark(s));
    done[s] = true;
    while (lowest_missing < 5000 && done[lowest_missing]) ++lowest_missing;
    ASSERT_EQ(w.first_incomplete(), lowest_missing) << "after marking " << s;
  }
  EXPECT_EQ(w.first_incomplete(), 5000u);
  EXPECT_TRUE(w.contains(4999));
  EXPECT_FALSE(w.contains(5000));
}

TEST_F(SupervisorTest, PlainRunDeliversEveryResultOnce) {
  Pool p(prefix, PoolSetup{});
  Book b(mixed_tasks(scaled(50000), 0, 97, 31));
  p.start();
  p.submit_async(b);
  ASSERT_TRUE(p.collect(b, b.size())) << describe(tally(b), p);
  ASSERT_TRUE(p.join_submitter());
  EXPECT_ALL_OK(b, p);
  Tally t = tally(b);
  EXPECT_EQ(t.by_attempts[1], b.size());
  EXPECT_EQ(p.counters().crashes.load(), 0u);
  EXPECT_EQ(p.counters().spawn_failures.load(), 0u);
  // Both workers ran tasks, and between them exactly the book. (A worker counts a task
  // after its result is out: the last count may come after the collector has the result.)
  uint64_t completed = 0;
  EXPECT_TRUE(eventually([&] {
    completed = p.record(0).completed.load() + p.record(1).completed.load();
    return completed >= b.size();
  }));
  EXPECT_EQ(completed, b.size());
  EXPECT_TRUE(eventually([&] { return p.seg().pool().used_bytes() == 0; }))
      << p.seg().pool().used_bytes() << " pool bytes still in use";
  p.sup().stop(true, 10 * kSec);
  EXPECT_EQ(p.counters().crashes.load(), 0u);
  EXPECT_EQ(p.sup().live_workers(), 0u);
}

// ---- 2. a fault at every step of the worker protocol -----------------------------------------

struct FaultCase {
  FaultStep step;
  const char* name;
  uint32_t countdown;  // the n-th time any worker reaches the step
  bool charges;        // the running task is charged an attempt (so runs twice)
  bool from_ring;      // tasks come back from unreleased ring cells
  uint32_t rounds = 1;  // how many times in a row the fault is armed during the run
};

const FaultCase kFaultCases[] = {
    {FaultStep::kClaimBeforeCas, "ClaimBeforeCas", 3, false, false},
    {FaultStep::kClaimAfterCas, "ClaimAfterCas", 3, false, true},
    {FaultStep::kClaimMidCopy, "ClaimMidCopy", 3, false, true},
    {FaultStep::kClaimBeforeRelease, "ClaimBeforeRelease", 3, false, false},
    {FaultStep::kBeforeRun, "BeforeRun", 50, true, false},
    {FaultStep::kAfterRun, "AfterRun", 50, true, false},
    {FaultStep::kPublishReserved, "PublishReserved", 50, true, false},
    {FaultStep::kAfterPublish, "AfterPublish", 50, false, false},
    {FaultStep::kIdle, "Idle", 1, false, false},
    {FaultStep::kResultPooled, "ResultPooled", 10, true, false},
    // Whether the other worker took the cell before the supervisor looked is luck: four
    // rounds make it all but certain that one of them covers that case.
    {FaultStep::kPublishBeforeCas, "PublishBeforeCas", 50, true, false, 4},
    {FaultStep::kResultAllocated, "ResultAllocated", 10, true, false},
    // The result is out: the task must not run again (it would read freed arguments).
    {FaultStep::kPublishedBeforeEpoch, "PublishedBeforeEpoch", 50, false, false},
};

void arm(Segment& seg, FaultStep step, uint32_t countdown) {
  seg.header().fault_countdown.store(countdown, std::memory_order_relaxed);
  seg.header().fault_step.store(static_cast<uint32_t>(step), std::memory_order_release);
}

class FaultTest : public SupervisorTest, public ::testing::WithParamInterface<FaultCase> {};

TEST_P(FaultTest, RecoversExactlyWhatTheDeadWorkerHeld) {
  const FaultCase& fc = GetParam();
  Pool p(prefix, PoolSetup{});
  // A few microseconds per task keep the ring full, so that claims take whole batches.
  // Every third result goes through the pool (every one when the fault is in the
  // publication, so that the dead worker holds a pool block), and every eleventh task's
  // arguments. (Dying before the CAS of its publication, a worker usually sees the other
  // one take that cell before the supervisor looks: its block is then referenced by no
  // cell at all.)
  const bool publishing = fc.step == FaultStep::kPublishReserved || fc.step == FaultStep::kPublishBeforeCas ||
                          fc.step == FaultStep::kResultAllocated;
  size_t big_every = publishing ? 1 : 3;
  Book b(mixed_tasks(scaled(4000, 600), 5, big_every, 11));
  uint64_t pool_before = p.seg().pool().used_bytes();
  const uint32_t rounds = fc.rounds;
  arm(p.seg(), fc.step, fc.countdown);
  // Re-arms the fault as soon as it fired, for the later rounds.
  std::atomic<bool> stop_rearm{false};
  std::thread rearm([&] {
    for (uint32_t r = 1; r < rounds; ++r) {
      while (!stop_rearm.load() && p.seg().header().fault_step.load() != 0)
        std::this_thread::sleep_for(std::chrono::microseconds(100));
      if (stop_rearm.load()) return;
      arm(p.seg(), fc.step, fc.countdown);
    }
  });
  struct JoinOnExit {
    std::atomic<bool>& stop;
    std::thread& t;
    ~JoinOnExit() {
      stop.store(true);
      if (t.joinable()) t.join();
    }
  } join_rearm{stop_rearm, rearm};
  p.start();
  p.submit_async(b);
  ASSERT_TRUE(p.collect(b, b.size())) << describe(tally(b), p);
  ASSERT_TRUE(p.join_submitter());
  // The fault fired (an idle worker may only get there now) and its crash was handled.
  ASSERT_TRUE(eventually([&] {
    return p.counters().crashes.load() == rounds && p.seg().header().fault_step.load() == 0;
  })) << "the fault fired " << p.counters().crashes.load() << " of " << rounds << " times";

  EXPECT_ALL_OK(b, p);
  Tally t = tally(b);
  const SupervisorCounters& c = p.counters();
  EXPECT_EQ(c.crashes.load(), rounds);
  EXPECT_EQ(c.crashed_tasks.load(), 0u);
  EXPECT_EQ(c.timeouts.load(), 0u);
  // Only a task that was running (and had not published its result) is charged.
  EXPECT_EQ(c.retries.load(), fc.charges ? rounds : 0u);
  EXPECT_EQ(t.charged, c.retries.load());
  EXPECT_EQ(t.by_attempts[2], fc.charges ? rounds : 0u);
  if (fc.from_ring) {
    EXPECT_GT(c.recovered_from_ring.load(), 0u);
  } else {
    EXPECT_EQ(c.recovered_from_ring.load(), 0u);
  }
  // The supervisor counts the crash first and the restart last in its handling of it.
  EXPECT_TRUE(eventually([&] { return p.sum_restarts() >= rounds; }));
  EXPECT_EQ(p.sum_restarts(), rounds);
  // Whatever the dead worker held in the pool was reclaimed (or handed on) exactly once.
  EXPECT_TRUE(eventually([&] { return p.seg().pool().used_bytes() == pool_before; }, 5 * kSec))
      << p.seg().pool().used_bytes() << " pool bytes in use, " << pool_before << " before";
  // The replacement is up and the pool still works.
  ASSERT_TRUE(eventually([&] { return p.sup().live_workers() == 2; }));
  Book more(mixed_tasks(200, 0, 3, 11));
  ASSERT_TRUE(p.submit_range(more, 0, more.size()));
  ASSERT_TRUE(p.collect(more, more.size())) << describe(tally(more), p);
  EXPECT_ALL_OK(more, p);
  p.sup().stop(true, 10 * kSec);
  EXPECT_EQ(p.counters().crashes.load(), rounds);
  EXPECT_EQ(p.seg().pool().used_bytes(), pool_before);
}

INSTANTIATE_TEST_SUITE_P(EveryStep, FaultTest, ::testing::ValuesIn(kFaultCases),
                         [](const ::testing::TestParamInfo<FaultCase>& i) { return std::string(i.param.name); });

// A second crash in the same worker record, before the replacement has published anything,
// must not free the first one's result block again.
class CrashAfterCrashTest : public SupervisorTest, public ::testing::WithParamInterface<FaultCase> {};

TEST_P(CrashAfterCrashTest, FreesTheDeadWorkersResultBlockOnce) {
  const FaultCase& fc = GetParam();
  PoolSetup s;
  s.workers = 1;
  s.max_retries = 0;  // the crashed task ends there: the replacement has nothing to run
  Pool p(prefix, s);
  Book b({Task{kBig, 7, 0, false}});
  arm(p.seg(), fc.step, 1);
  p.start();
  ASSERT_TRUE(p.submit_range(b, 0, 1));
  ASSERT_TRUE(p.collect(b, 1)) << describe(tally(b), p);
  EXPECT_EQ(b.first[0].status, ResultStatus::kCrashed);
  EXPECT_EQ(b.first[0].attempts, 1u);
  ASSERT_TRUE(eventually([&] { return p.seg().pool().used_bytes() == 0; }, 5 * kSec))
      << p.seg().pool().used_bytes();
  // Kill the replacement while it idles.
  ASSERT_TRUE(eventually([&] {
    return p.record(0).generation.load() == 2 &&
           p.record(0).state.load() == static_cast<uint32_t>(WorkerState::kIdle);
  }));
  ASSERT_TRUE(p.sup().kill_worker(0));
  ASSERT_TRUE(eventually([&] { return p.counters().crashes.load() == 2; }));
  ASSERT_TRUE(eventually([&] { return p.sup().live_workers() == 1; }));
  EXPECT_EQ(p.seg().pool().used_bytes(), 0u);
  // The pool is sound: big results keep flowing through it.
  Book more(mixed_tasks(300, 0, 1, 5));
  ASSERT_TRUE(p.submit_range(more, 0, more.size()));
  ASSERT_TRUE(p.collect(more, more.size())) << describe(tally(more), p);
  EXPECT_ALL_OK(more, p);
  EXPECT_TRUE(eventually([&] { return p.seg().pool().used_bytes() == 0; }, 5 * kSec))
      << p.seg().pool().used_bytes();
  p.sup().stop(true, 10 * kSec);
}

const FaultCase kResultFaults[] = {
    {FaultStep::kPublishReserved, "PublishReserved", 1, true, false},
    {FaultStep::kResultPooled, "ResultPooled", 1, true, false},
    {FaultStep::kPublishBeforeCas, "PublishBeforeCas", 1, true, false},
    {FaultStep::kResultAllocated, "ResultAllocated", 1, true, false},
};
INSTANTIATE_TEST_SUITE_P(PooledResult, CrashAfterCrashTest, ::testing::ValuesIn(kResultFaults),
                         [](const ::testing::TestParamInfo<FaultCase>& i) { return std::string(i.param.name); });

// ---- 3. max_retries ---------------------------------------------------------------------------

TEST_F(SupervisorTest, PoisonTaskIsRetriedThenFailedAndItsNeighboursAreNotCharged) {
  PoolSetup s;
  s.workers = 1;
  s.max_retries = 2;
  Pool p(prefix, s);
  constexpr size_t kN = 200, kPoisonAt = 5;
  Book b(mixed_tasks(kN, 0, 0, 0));
  b.tasks[kPoisonAt].fn = kPoison;
  // Everything is in the ring before the worker starts, so that its first claim is a whole
  // batch: tasks 0..15, with 6..15 claimed but not started when the poison kills it.
  ASSERT_TRUE(p.submit_range(b, 0, kN));
  p.producer().start_feeding();
  ASSERT_TRUE(eventually([&] { return p.producer().backlog_size() == 0; }));
  ASSERT_EQ(p.seg().tasks().size(), kN);
  p.sup().start();
  ASSERT_TRUE(p.collect(b, kN)) << describe(tally(b), p);

  Tally t = tally(b);
  EXPECT_EQ(t.ok, kN - 1) << describe(t, p);
  EXPECT_EQ(b.count[kPoisonAt], 1u);
  EXPECT_EQ(b.first[kPoisonAt].status, ResultStatus::kCrashed);
  EXPECT_EQ(b.first[kPoisonAt].attempts, 3u);  // max_retries + 1 runs
  EXPECT_EQ(t.by_attempts[1], kN - 1) << describe(t, p);
  const SupervisorCounters& c = p.counters();
  EXPECT_EQ(c.crashes.load(), 3u);
  EXPECT_EQ(c.retries.load(), 2u);
  EXPECT_EQ(c.crashed_tasks.load(), 1u);
  // Tasks 6..15 stayed in the local queue, uncharged, and the replacement ran them (after
  // the poison's last run) before it claimed task 16.
  for (size_t i = kPoisonAt + 1; i < 16; ++i) {
    EXPECT_LT(b.order[i], b.order[16]) << "task " << i << " was not left to the replacement";
    EXPECT_EQ(b.first[i].attempts, 1u) << "task " << i;
  }
  EXPECT_EQ(p.sum_restarts(), 3u);
  p.sup().stop(true, 10 * kSec);
}

// ---- 4. task_timeout --------------------------------------------------------------------------

TEST_F(SupervisorTest, TaskTimeoutKillsTheTaskAndReplacesTheWorker) {
  PoolSetup s;
  s.task_timeout_ns = 300 * kMs;
  Pool p(prefix, s);
  constexpr size_t kN = 400, kSlowAt = 10;
  Book b(mixed_tasks(kN, 0, 7, 13));
  b.tasks[kSlowAt].delay_us = 120'000'000;  // two minutes: only the timeout ends it
  p.start();
  int64_t t0 = monotonic_ns();
  p.submit_async(b);
  ASSERT_TRUE(p.collect(b, kN, 60 * kSec)) << describe(tally(b), p);
  int64_t took = monotonic_ns() - t0;
  ASSERT_TRUE(p.join_submitter());

  Tally t = tally(b);
  EXPECT_EQ(t.ok, kN - 1) << describe(t, p);
  EXPECT_EQ(b.first[kSlowAt].status, ResultStatus::kTimeout);
  EXPECT_EQ(b.first[kSlowAt].attempts, 1u);
  EXPECT_EQ(t.by_attempts[1], kN) << describe(t, p);
  EXPECT_GE(took, 300 * kMs);
  const SupervisorCounters& c = p.counters();
  EXPECT_EQ(c.timeouts.load(), 1u);
  EXPECT_EQ(c.crashes.load(), 1u);
  EXPECT_EQ(c.retries.load(), 0u);
  EXPECT_EQ(c.crashed_tasks.load(), 0u);
  // The worker that ran it was replaced (a new generation in its record).
  uint32_t replaced = 0;
  for (uint32_t i = 0; i < 2; ++i)
    if (p.record(i).restarts.load() == 1 && p.record(i).generation.load() == 2) ++replaced;
  EXPECT_EQ(replaced, 1u);
  ASSERT_TRUE(eventually([&] { return p.sup().live_workers() == 2; }));
  p.sup().stop(true, 10 * kSec);
  EXPECT_EQ(p.counters().crashes.load(), 1u);
  EXPECT_EQ(p.seg().pool().used_bytes(), 0u);
}

// ---- 5. random SIGKILLs -----------------------------------------------------------------------

TEST_F(SupervisorTest, RandomKillsLoseAndDuplicateNothing) {
  PoolSetup s;
  s.workers = 3;
  s.max_retries = 1000;  // a task may be hit more than once; it must still succeed
  Pool p(prefix, s);
  // Inline results only: a worker killed between allocating a pooled result block and
  // recording it in its record (a few instructions) leaks that block, which no recovery can
  // see. The fault tests cover pooled results at every step; pooled arguments are here.
  Book b(mixed_tasks(scaled(100000), 10, 0, 13));
  std::atomic<bool> done{false};
  std::atomic<uint64_t> kills{0};
  std::string killer_error;
  p.start();
  p.submit_async(b);
  std::thread killer([&] {
    test::SplitMix rng{42};
    while (!done.load()) {
      std::this_thread::sleep_for(std::chrono::microseconds(2000 + rng.below(15000)));
      uint32_t id = static_cast<uint32_t>(rng.below(p.worker_count()));
      WorkerRecord& rec = p.record(id);
      uint32_t gen = rec.generation.load();
      auto st = static_cast<WorkerState>(rec.state.load());
      pid_t pid = rec.pid.load();
      if ((st != WorkerState::kIdle && st != WorkerState::kBusy) || pid <= 0) continue;
      if (kill(pid, SIGKILL) != 0) continue;
      kills.fetch_add(1);
      // One kill at a time: wait for the replacement, so that every kill is one crash.
      int64_t deadline = monotonic_ns() + kPatienceNs;
      while (rec.generation.load() == gen && monotonic_ns() < deadline)
        std::this_thread::sleep_for(std::chrono::microseconds(200));
      if (rec.generation.load() == gen) {
        killer_error = "worker " + std::to_string(id) + " was not replaced";
        return;
      }
    }
  });
  bool all = p.collect(b, b.size());
  done.store(true);
  killer.join();
  ASSERT_TRUE(all) << describe(tally(b), p);
  ASSERT_TRUE(p.join_submitter());
  ASSERT_TRUE(killer_error.empty()) << killer_error;

  EXPECT_ALL_OK(b, p);
  Tally t = tally(b);
  const SupervisorCounters& c = p.counters();
  ASSERT_TRUE(eventually([&] { return c.crashes.load() == kills.load(); }))
      << c.crashes.load() << " crashes for " << kills.load() << " kills";
  EXPECT_GE(kills.load(), 3u) << "the run was too short to test anything";
  EXPECT_EQ(p.sum_restarts(), kills.load());
  EXPECT_EQ(c.crashed_tasks.load(), 0u);
  // Every charge but one per kill at most; and a task whose final result shows a charge was
  // charged. (A worker killed between publishing a result and bumping its publication epoch
  // looks as if it had not published: its task is charged and runs again, and the collector
  // keeps the first result, which DESIGN.md allows. So charges may exceed what results show.)
  EXPECT_LE(t.charged, c.retries.load()) << describe(t, p);
  EXPECT_LE(c.retries.load(), kills.load());
  EXPECT_TRUE(eventually([&] { return p.seg().pool().used_bytes() == 0; }, 5 * kSec))
      << p.seg().pool().used_bytes() << " pool bytes still in use";
  ASSERT_TRUE(eventually([&] { return p.sup().live_workers() == 3; }));
  p.sup().stop(true, 10 * kSec);
  std::cout << "[          ] " << kills.load() << " workers killed, " << c.retries.load()
            << " tasks charged, " << c.recovered_from_ring.load() << " recovered from the ring\n";
}

// ---- recycling (max_tasks_per_worker) ------------------------------------------------------

TEST_F(SupervisorTest, RecycledWorkersAreReplacedWithoutCountingCrashes) {
  PoolSetup s;
  s.max_tasks_per_worker = 100;
  Pool p(prefix, s);
  Book b(mixed_tasks(scaled(3000, 1000), 0, 9, 17));
  p.start();
  p.submit_async(b);
  ASSERT_TRUE(p.collect(b, b.size())) << describe(tally(b), p);
  ASSERT_TRUE(p.join_submitter());
  EXPECT_ALL_OK(b, p);
  EXPECT_EQ(tally(b).by_attempts[1], b.size());
  // Each life ran at most 100 tasks, so there were at least size/100 lives in all.
  uint64_t lives = p.record(0).generation.load() + p.record(1).generation.load();
  EXPECT_GE(lives, b.size() / 100);
  EXPECT_EQ(p.counters().crashes.load(), 0u);
  EXPECT_EQ(p.sum_restarts(), 0u);
  p.sup().stop(true, 10 * kSec);
  EXPECT_EQ(p.counters().crashes.load(), 0u);
  EXPECT_EQ(p.seg().pool().used_bytes(), 0u);
}

// ---- recycling (max_worker_memory) ---------------------------------------------------------

// The side messages of a book on `route`, as strings.
std::vector<std::string> side_on(const Book& b, uint32_t route) {
  std::vector<std::string> out;
  for (const Book::Side& m : b.side)
    if (m.route == route) out.push_back(m.data);
  return out;
}

// The goodbyes a worker's lives sent, in order: each of lives 1..gen-1 was recycled, and the
// last one left for the stop (or was recycled as it came, and not replaced).
void expect_goodbyes(const Book& b, uint32_t id, uint32_t gen) {
  std::vector<std::string> got;
  const std::string mine = std::to_string(id) + "/";
  for (const Book::Side& m : b.side)
    if (m.route == kRouteExit && m.worker == id) got.push_back(m.data);
  ASSERT_EQ(got.size(), gen) << "worker " << id;
  for (uint32_t g = 1; g <= gen; ++g) {
    const std::string& m = got[g - 1];
    if (g < gen || m == goodbye_text(id, g, WorkerExit::kRecycled)) {
      EXPECT_EQ(m, goodbye_text(id, g, WorkerExit::kRecycled)) << "worker " << id << " life " << g;
    } else {
      EXPECT_EQ(m, goodbye_text(id, g, WorkerExit::kStopRequested)) << "worker " << id << " life " << g;
    }
  }
}

// A cap of 1 byte: every reading of a worker's memory is over it, so each life ends at its
// first reading, after kMemoryCheckTasks tasks (or sooner, once kMemoryCheckNs passed): in
// the middle of a claim of 10. The tasks of that claim it had not started stay in its
// local queue, uncharged, for its replacement, which counts as recycled, not as a restart.
TEST_F(SupervisorTest, AWorkerOverItsMemoryCapIsRecycledMidClaimAndItsReplacementRunsTheRest) {
  static_assert(kMemoryCheckTasks % 10 != 0, "a life must end in the middle of a claim");
  PoolSetup s;
  s.workers = 1;
  s.batch = 10;
  s.queue_slots = 4096;
  s.max_worker_memory = 1;
  s.goodbye = true;
  Pool p(prefix, s);
  const size_t n = scaled(2000, 500);
  Book b(mixed_tasks(n, 0, 7, 11));
  // Everything is in the ring before the worker starts, so that every claim takes 10 tasks
  // and one worker's results come in seq order, but for tasks handed back.
  ASSERT_TRUE(p.submit_range(b, 0, n));
  p.producer().start_feeding();
  ASSERT_TRUE(eventually([&] { return p.producer().backlog_size() == 0; }));
  ASSERT_EQ(p.seg().tasks().size(), n);
  p.sup().start();
  ASSERT_TRUE(p.collect(b, n, 90 * kSec)) << describe(tally(b), p);

  EXPECT_ALL_OK(b, p);
  Tally t = tally(b);
  EXPECT_EQ(t.by_attempts[1], n) << describe(t, p);  // nothing charged
  EXPECT_EQ(p.collector().completed(), n);
  const SupervisorCounters& c = p.counters();
  EXPECT_EQ(c.crashes.load(), 0u);
  EXPECT_EQ(c.retries.load(), 0u);
  EXPECT_EQ(c.crashed_tasks.load(), 0u);
  EXPECT_EQ(c.recovered_from_ring.load(), 0u);
  WorkerRecord& rec = p.record(0);
  EXPECT_EQ(rec.restarts.load(), 0u);
  // Each life ran at most kMemoryCheckTasks tasks.
  EXPECT_GE(rec.recycled.load(), n / kMemoryCheckTasks - 1);
  // The replacement ran what its predecessor left before it claimed more: every result in
  // seq order.
  size_t out_of_order = 0;
  for (size_t i = 0; i + 1 < n; ++i) out_of_order += b.order[i] > b.order[i + 1];
  EXPECT_EQ(out_of_order, 0u);
  EXPECT_TRUE(eventually([&] { return p.seg().pool().used_bytes() == 0; }, 5 * kSec))
      << p.seg().pool().used_bytes() << " pool bytes still in use";

  p.sup().stop(true, 10 * kSec);
  p.collect_rest(b);
  EXPECT_EQ(c.crashes.load(), 0u);
  const uint32_t gen = rec.generation.load();
  EXPECT_EQ(rec.recycled.load(), gen - 1u);
  EXPECT_EQ(rec.restarts.load(), 0u);
  EXPECT_EQ(rec.completed.load(), n);  // (counted after the result is out: exact once stopped)
  // Every life left through the loop's exit, and its exit value reached the owner.
  expect_goodbyes(b, 0, gen);
  EXPECT_EQ(p.collector().completed(), n);  // the side messages counted for nothing
  EXPECT_TRUE(b.strays.empty()) << b.strays.front();
  std::cout << "[          ] " << gen << " lives, " << out_of_order << " results out of order\n";
}

// The same with three workers fed while they run, through a ring smaller than the work, each
// life writing some output before its loop: no task lost, repeated or charged.
TEST_F(SupervisorTest, RecyclingForMemoryUnderLoadLosesAndChargesNothing) {
  PoolSetup s;
  s.workers = 3;
  s.batch = 7;
  s.queue_slots = 512;
  s.max_worker_memory = 1;
  s.hello_bytes = 2 * kResultInlineBytes + 10;  // three pieces
  s.goodbye = true;
  Pool p(prefix, s);
  Book b(mixed_tasks(scaled(6000, 1500), 20, 9, 13));
  p.start();
  p.submit_async(b);
  ASSERT_TRUE(p.collect(b, b.size(), 90 * kSec)) << describe(tally(b), p);
  ASSERT_TRUE(p.join_submitter());
  EXPECT_ALL_OK(b, p);
  Tally t = tally(b);
  EXPECT_EQ(t.by_attempts[1], b.size()) << describe(t, p);
  EXPECT_EQ(p.collector().completed(), b.size());
  const SupervisorCounters& c = p.counters();
  EXPECT_EQ(c.crashes.load(), 0u);
  EXPECT_EQ(c.retries.load(), 0u);
  EXPECT_EQ(c.crashed_tasks.load(), 0u);
  EXPECT_EQ(p.sum_restarts(), 0u);
  EXPECT_GE(p.sum_recycled(), b.size() / kMemoryCheckTasks - 3);
  EXPECT_TRUE(eventually([&] { return p.seg().pool().used_bytes() == 0; }, 5 * kSec))
      << p.seg().pool().used_bytes() << " pool bytes still in use";

  p.sup().stop(true, 10 * kSec);
  p.collect_rest(b);
  EXPECT_EQ(c.crashes.load(), 0u);
  EXPECT_EQ(p.sum_restarts(), 0u);
  uint64_t lives = 0;
  for (uint32_t id = 0; id < 3; ++id) {
    const uint32_t gen = p.record(id).generation.load();
    lives += gen;
    EXPECT_EQ(p.record(id).recycled.load(), gen - 1u) << "worker " << id;
    expect_goodbyes(b, id, gen);
  }
  // Every life's output came whole.
  std::vector<std::string> hellos = side_on(b, kRouteStdout);
  EXPECT_EQ(hellos.size(), lives);
  size_t bad = 0;
  for (const Book::Side& m : b.side) {
    if (m.route != kRouteStdout) continue;
    std::string want(s.hello_bytes, '\0');
    for (uint32_t j = 0; j < s.hello_bytes; ++j) want[j] = static_cast<char>(hello_byte(m.worker, j));
    bad += m.data != want;
  }
  EXPECT_EQ(bad, 0u);
  EXPECT_EQ(p.collector().completed(), b.size());
  EXPECT_TRUE(b.strays.empty()) << b.strays.front();
  std::cout << "[          ] " << lives << " lives\n";
}

// ---- kill_task ---------------------------------------------------------------------------------

// kill_task(seq) kills the worker running that task: the task ends cancelled and is not run
// again; the rest of that worker's claim goes back to the ring uncharged; a seq that no
// worker runs (queued, claimed and waiting, done, unknown) kills nothing.
TEST_F(SupervisorTest, KillTaskCancelsTheRunningTaskAndLeavesTheRestOfItsClaimToTheReplacement) {
  PoolSetup s;
  s.workers = 1;
  s.batch = 16;
  s.goodbye = true;
  Pool p(prefix, s);
  constexpr size_t kN = 200, kSlowAt = 3;
  Book b(mixed_tasks(kN, 0, 7, 11));
  b.tasks[kSlowAt].delay_us = 120'000'000;  // two minutes: only the kill ends it
  // Everything in the ring before the worker starts: its first claim is tasks 0..15.
  ASSERT_TRUE(p.submit_range(b, 0, kN));
  p.producer().start_feeding();
  ASSERT_TRUE(eventually([&] { return p.producer().backlog_size() == 0; }));
  ASSERT_EQ(p.seg().tasks().size(), kN);
  EXPECT_FALSE(p.sup().kill_task(b.seq[kSlowAt]));  // no worker yet
  p.sup().start();
  WorkerRecord& rec = p.record(0);
  const uint64_t slow = b.seq[kSlowAt];
  ASSERT_TRUE(eventually([&] { return rec.running_since_ns.load() != 0 && rec.running_seq.load() == slow; }));
  ASSERT_TRUE(p.collect(b, kSlowAt)) << describe(tally(b), p);
  EXPECT_EQ(rec.local_count.load(), 16u);

  EXPECT_FALSE(p.sup().kill_task(0));
  EXPECT_FALSE(p.sup().kill_task(b.seq[0]));            // done
  EXPECT_FALSE(p.sup().kill_task(b.seq[kSlowAt + 1]));  // claimed, waiting in the local queue
  EXPECT_FALSE(p.sup().kill_task(b.seq[kN - 1]));       // in the ring
  EXPECT_FALSE(p.sup().kill_task(b.seq[kN - 1] + 1000));  // no such task
  ASSERT_TRUE(p.sup().kill_task(slow));
  ASSERT_TRUE(p.collect(b, kN, 60 * kSec)) << describe(tally(b), p);
  p.collect_rest(b);

  Tally t = tally(b);
  EXPECT_EQ(t.ok, kN - 1) << describe(t, p);
  EXPECT_EQ(t.missing + t.duplicated + t.wrong, 0u) << describe(t, p);
  EXPECT_EQ(b.count[kSlowAt], 1u);
  EXPECT_EQ(b.first[kSlowAt].status, ResultStatus::kCancelled);
  EXPECT_EQ(b.first[kSlowAt].seq, slow);
  EXPECT_LE(b.first[kSlowAt].attempts, 1u);  // not charged a retry
  for (size_t i = 0; i < kN; ++i)
    if (i != kSlowAt) {
      EXPECT_EQ(b.first[i].attempts, 1u) << "task " << i;
    }
  // Tasks 4..15 waited in the killed worker's local queue: its replacement ran them,
  // uncharged, before it claimed task 16.
  for (size_t i = kSlowAt + 1; i < 16; ++i) {
    EXPECT_LT(b.order[i], b.order[16]) << "task " << i << " was not left to the replacement";
  }
  EXPECT_EQ(p.collector().completed(), kN);
  const SupervisorCounters& c = p.counters();
  EXPECT_EQ(c.crashes.load(), 1u);
  EXPECT_EQ(c.retries.load(), 0u);
  EXPECT_EQ(c.timeouts.load(), 0u);
  EXPECT_EQ(c.crashed_tasks.load(), 0u);
  EXPECT_EQ(rec.restarts.load(), 1u);
  EXPECT_EQ(rec.recycled.load(), 0u);
  EXPECT_EQ(rec.generation.load(), 2u);
  EXPECT_FALSE(p.sup().kill_task(slow));  // over
  ASSERT_TRUE(eventually([&] { return p.sup().live_workers() == 1; }));
  EXPECT_TRUE(eventually([&] { return p.seg().pool().used_bytes() == 0; }, 5 * kSec))
      << p.seg().pool().used_bytes() << " pool bytes still in use";
  p.sup().stop(true, 10 * kSec);
  p.collect_rest(b);
  EXPECT_EQ(c.crashes.load(), 1u);
  // Only the replacement left through its loop (the killed one sent nothing).
  EXPECT_EQ(side_on(b, kRouteExit), std::vector<std::string>{goodbye_text(0, 2, WorkerExit::kStopRequested)});
  EXPECT_EQ(b.count[kSlowAt], 1u);
}

// The end of a killed task is decided while the result ring is full: it waits in the dead
// worker's local queue (settled, in shared memory, where a new supervisor finds it), and
// the replacement posts it before it runs the rest of the claim.
TEST_F(SupervisorTest, AResultDecidedWhileTheResultRingIsFullWaitsInTheLocalQueue) {
  PoolSetup s;
  s.workers = 1;
  s.batch = 16;
  s.result_slots = 64;
  Pool p(prefix, s);
  constexpr size_t kN = 40, kSlowAt = 3;
  Book b(mixed_tasks(kN, 0, 7, 11));
  b.tasks[kSlowAt].delay_us = 120'000'000;  // two minutes: only the kill ends it
  ASSERT_TRUE(p.submit_range(b, 0, kN));
  p.producer().start_feeding();
  ASSERT_TRUE(eventually([&] { return p.producer().backlog_size() == 0; }));
  p.sup().start();
  WorkerRecord& rec = p.record(0);
  const uint64_t slow = b.seq[kSlowAt];
  ASSERT_TRUE(eventually([&] { return rec.running_since_ns.load() != 0 && rec.running_seq.load() == slow; }));
  // Void records fill the result ring behind the first results: no room for another.
  ResultHeader filler;
  filler.status = ResultStatus::kVoid;
  while (p.seg().results().try_push(1, [&](uint32_t, void* out) { std::memcpy(out, &filler, sizeof filler); }) == 1) {
  }
  ASSERT_TRUE(p.sup().kill_task(slow));
  ASSERT_TRUE(eventually([&] { return rec.generation.load() == 2 && rec.pid.load() > 0; }));
  const LocalEntry& e = p.seg().workers().entry(0, kSlowAt);
  EXPECT_EQ(e.state.load(), static_cast<uint32_t>(LocalState::kSettled));
  EXPECT_EQ(e.settled, static_cast<uint32_t>(ResultStatus::kCancelled));
  ASSERT_TRUE(p.collect(b, kN, 60 * kSec)) << describe(tally(b), p);
  p.collect_rest(b);

  Tally t = tally(b);
  EXPECT_EQ(t.ok, kN - 1) << describe(t, p);
  EXPECT_EQ(t.missing + t.duplicated + t.wrong, 0u) << describe(t, p);
  EXPECT_EQ(b.count[kSlowAt], 1u);
  EXPECT_EQ(b.first[kSlowAt].status, ResultStatus::kCancelled);
  EXPECT_EQ(b.first[kSlowAt].attempts, 0u);  // it never finished a run
  EXPECT_EQ(b.first[kSlowAt].worker_id, 0u);
  for (size_t i = kSlowAt + 1; i < 16; ++i) {
    EXPECT_LT(b.order[kSlowAt], b.order[i]) << "task " << i;
  }
  EXPECT_EQ(p.counters().crashes.load(), 1u);
  EXPECT_EQ(p.counters().retries.load(), 0u);
  p.sup().stop(true, 10 * kSec);
  EXPECT_TRUE(eventually([&] { return p.seg().pool().used_bytes() == 0; }, 5 * kSec));
}

// kill_task with several workers and tasks that each take a while: the killed task alone
// ends cancelled, whichever worker ran it, and nothing else is charged or lost.
TEST_F(SupervisorTest, KillTaskAmongSeveralWorkersEndsOnlyThatTask) {
  PoolSetup s;
  s.workers = 3;
  s.batch = 4;
  Pool p(prefix, s);
  constexpr size_t kN = 600, kSlowAt = 100;
  Book b(mixed_tasks(kN, 300, 7, 11));
  b.tasks[kSlowAt].delay_us = 120'000'000;
  p.start();
  p.submit_async(b);
  ASSERT_TRUE(eventually([&] { return b.seq[kSlowAt].load() != 0; }));
  const uint64_t slow = b.seq[kSlowAt];
  // Collect while waiting for a worker to start it.
  uint32_t runner_id = UINT32_MAX;
  int64_t deadline = monotonic_ns() + kPatienceNs;
  while (runner_id == UINT32_MAX && monotonic_ns() < deadline) {
    p.collect(b, b.received + 1, 10 * kMs);
    for (uint32_t id = 0; id < 3; ++id)
      if (p.record(id).running_since_ns.load() != 0 && p.record(id).running_seq.load() == slow) runner_id = id;
  }
  ASSERT_NE(runner_id, UINT32_MAX) << "no worker started the slow task";
  ASSERT_TRUE(p.sup().kill_task(slow));
  ASSERT_TRUE(p.collect(b, kN, 60 * kSec)) << describe(tally(b), p);
  ASSERT_TRUE(p.join_submitter());
  p.collect_rest(b);
  Tally t = tally(b);
  EXPECT_EQ(t.ok, kN - 1) << describe(t, p);
  EXPECT_EQ(t.missing + t.duplicated + t.wrong, 0u) << describe(t, p);
  EXPECT_EQ(b.first[kSlowAt].status, ResultStatus::kCancelled);
  EXPECT_EQ(t.by_attempts[1], kN - 1) << describe(t, p);
  const SupervisorCounters& c = p.counters();
  EXPECT_EQ(c.crashes.load(), 1u);
  EXPECT_EQ(c.retries.load(), 0u);
  EXPECT_EQ(c.crashed_tasks.load(), 0u);
  EXPECT_EQ(p.record(runner_id).restarts.load(), 1u);
  EXPECT_EQ(p.sum_restarts(), 1u);
  EXPECT_EQ(p.collector().completed(), kN);
  ASSERT_TRUE(eventually([&] { return p.sup().live_workers() == 3; }));
  p.sup().stop(true, 10 * kSec);
  EXPECT_EQ(p.seg().pool().used_bytes(), 0u);
}

// ---- output before the loop ----------------------------------------------------------------------

// A worker that dies while it writes output before its loop (an initializer's print, say)
// leaves a result cell reserved and never written. The supervisor voids it, so the owner's
// collector gets past it; the dead worker's half message never reaches the owner, and its
// replacement's message does, whole.
TEST_F(SupervisorTest, AWorkerThatDiesMidMessageBeforeItsLoopLeavesTheResultRingUsable) {
  PoolSetup s;
  s.workers = 1;
  s.hello_bytes = 5000;  // 30 pieces
  s.goodbye = true;
  Pool p(prefix, s);
  ASSERT_GT(s.hello_bytes, 10 * kResultInlineBytes);
  arm(p.seg(), FaultStep::kPublishReserved, 10);  // dies with its 10th piece's cell reserved
  Book b(mixed_tasks(300, 0, 7, 11));
  p.start();
  p.submit_async(b);
  ASSERT_TRUE(p.collect(b, b.size(), 60 * kSec)) << describe(tally(b), p);
  ASSERT_TRUE(p.join_submitter());
  EXPECT_ALL_OK(b, p);
  EXPECT_EQ(p.seg().header().fault_step.load(), 0u) << "the fault did not fire";
  EXPECT_EQ(p.record(0).generation.load(), 2u);
  EXPECT_EQ(p.record(0).restarts.load(), 1u);
  EXPECT_TRUE(p.sup().last_error().empty()) << p.sup().last_error();
  EXPECT_EQ(p.collector().completed(), b.size());
  p.sup().stop(true, 10 * kSec);
  p.collect_rest(b);

  std::string hello(s.hello_bytes, '\0');
  for (uint32_t j = 0; j < s.hello_bytes; ++j) hello[j] = static_cast<char>(hello_byte(0, j));
  std::vector<std::string> out = side_on(b, kRouteStdout);
  ASSERT_EQ(out.size(), 1u);
  EXPECT_EQ(out[0].size(), hello.size());
  EXPECT_TRUE(out[0] == hello) << "the message is not the replacement's whole message";
  EXPECT_EQ(side_on(b, kRouteExit), std::vector<std::string>{goodbye_text(0, 2, WorkerExit::kStopRequested)});
  EXPECT_EQ(b.side.size(), 2u);
  EXPECT_EQ(p.seg().pool().used_bytes(), 0u);
}

// ---- 6. stop ----------------------------------------------------------------------------------

// A fork server's child can die and be reaped by the fork server before the supervisor
// opens its pidfd (a worker whose start-up fails at once). The supervisor must still see it
// go: here every "worker" is a process already reaped when spawn() returns its pid.
TEST_F(SupervisorTest, AWorkerGoneBeforeItsPidfdOpensIsStillSeenToExit) {
  SegmentConfig c;
  c.slot = test_layout();
  c.queue_slots = 64;
  c.result_slots = 64;
  c.max_workers = 1;
  c.batch_size = 4;
  c.pool_bytes = 1u << 20;
  c.registry_bytes = 4096;
  std::unique_ptr<Segment> seg = Segment::create(prefix, c);
  std::vector<pid_t> spawned;
  SupervisorOptions o;
  o.workers = 1;
  o.children_are_ours = false;
  o.spawn = [&](uint32_t, uint32_t) {
    pid_t pid = fork();
    if (pid == 0) _exit(0);
    waitpid(pid, nullptr, 0);  // gone, and reaped, before pidfd_open
    spawned.push_back(pid);
    return pid;
  };
  Supervisor sup(*seg, std::move(o));
  sup.start();
  // Each death during start-up without a recorded error is retried, up to 5 deaths.
  ASSERT_TRUE(eventually([&] { return !sup.last_error().empty(); })) << spawned.size() << " spawned";
  EXPECT_NE(sup.last_error().find("worker 0 failed to start"), std::string::npos) << sup.last_error();
  EXPECT_EQ(spawned.size(), 5u);
  EXPECT_EQ(seg->workers().record(0).state.load(), static_cast<uint32_t>(WorkerState::kDead));
  sup.stop(false, kSec);  // returns: no worker is left to wait for
  EXPECT_FALSE(sup.running());
}

TEST_F(SupervisorTest, GracefulStopAfterTheWorkLeavesNoChild) {
  Pool p(prefix, PoolSetup{});
  Book b(mixed_tasks(2000, 0, 5, 7));
  p.start();
  ASSERT_TRUE(p.submit_range(b, 0, b.size()));
  ASSERT_TRUE(p.collect(b, b.size())) << describe(tally(b), p);
  EXPECT_ALL_OK(b, p);
  ASSERT_TRUE(eventually([&] { return p.sup().live_workers() == 2; }));
  std::vector<pid_t> pids = p.spawned();
  ASSERT_EQ(pids.size(), 2u);
  p.sup().stop(true, 10 * kSec);
  EXPECT_FALSE(p.sup().running());
  EXPECT_EQ(p.sup().live_workers(), 0u);
  EXPECT_EQ(p.counters().crashes.load(), 0u);
  for (uint32_t i = 0; i < 2; ++i)
    EXPECT_EQ(p.record(i).state.load(), static_cast<uint32_t>(WorkerState::kExited));
  // Reaped, not merely dead: no such process (not even a zombie).
  for (pid_t pid : pids) {
    errno = 0;
    EXPECT_EQ(kill(pid, 0), -1) << "worker " << pid << " is still there";
    EXPECT_EQ(errno, ESRCH);
  }
  EXPECT_TRUE(my_children().empty());
  EXPECT_EQ(p.seg().pool().used_bytes(), 0u);
}

// The owner's cancellations (future.cancel()) race with claims, runs and worker deaths: a
// cancellation reported done is a task that never runs (its one result is kCancelled, or
// kCrashed when its worker died before it got to the task and the retries ran out), and
// a refused one is a task that runs. With `kill`, workers die just before running a task
// every few hundred tasks.
void check_cancels(const std::string& prefix, bool kill) {
  const size_t n = scaled(6000, 2000);
  PoolSetup s;
  s.batch = 8;
  s.max_retries = 3;
  Pool p(prefix, s);
  Book b(mixed_tasks(n, 40, 0, 7));
  p.start();
  p.submit_async(b);
  std::atomic<bool> stop{false};
  std::thread killer([&] {
    while (kill && !stop.load()) {
      if (p.seg().header().fault_step.load() == 0) arm(p.seg(), FaultStep::kBeforeRun, 300);
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
  });
  bool collected = false;
  std::thread collector([&] { collected = p.collect(b, n, 120 * kSec); });
  std::vector<int> verdict(n, -1);  // 1: cancelled, 0: refused
  for (size_t i = 0; i < n; i += 3) {
    while (b.seq[i].load() == 0) std::this_thread::yield();
    verdict[i] = p.seg().request_cancel(b.seq[i]) ? 1 : 0;
  }
  collector.join();
  stop = true;
  killer.join();
  ASSERT_TRUE(p.join_submitter());
  ASSERT_TRUE(collected) << describe(tally(b), p);
  p.collect_rest(b);
  size_t cancelled = 0, refused = 0;
  for (size_t i = 0; i < n; ++i) {
    ASSERT_EQ(b.count[i], 1u) << "task " << i;
    ResultStatus st = b.first[i].status;
    if (verdict[i] == 1) {
      ++cancelled;
      EXPECT_TRUE(st == ResultStatus::kCancelled || st == ResultStatus::kCrashed) << "task " << i << " ran";
      p.seg().header().cancels.release(b.seq[i]);
    } else {
      refused += verdict[i] == 0;
      EXPECT_NE(st, ResultStatus::kCancelled) << "task " << i;
      if (!kill) {
        EXPECT_EQ(st, ResultStatus::kOk) << "task " << i;
      }
    }
  }
  EXPECT_GT(cancelled, 0u);
  EXPECT_EQ(p.seg().header().cancels.requests.load(), 0u);
  if (kill) {
    EXPECT_GT(p.counters().crashes.load(), 0u);
  }
}

TEST_F(SupervisorTest, CancelledTasksNeverRunAndRefusedOnesDo) { check_cancels(prefix, false); }
TEST_F(SupervisorTest, CancelsStayExactWhileWorkersDie) { check_cancels(prefix, true); }

// A graceful stop waited for in slices (as the bindings do, to look at signals between
// them) can be turned into a hard one: the workers are killed at once, their running tasks
// end as cancelled, and the thread ends.
TEST_F(SupervisorTest, AGracefulStopCanBeMadeHardWhileItWaits) {
  Pool p(prefix, PoolSetup{});
  Book b(mixed_tasks(8, 2'000'000, 5, 7));  // 2 s a task
  p.start();
  ASSERT_TRUE(p.submit_range(b, 0, b.size()));
  ASSERT_TRUE(eventually([&] {
    return p.record(0).state.load() == static_cast<uint32_t>(WorkerState::kBusy) ||
           p.record(1).state.load() == static_cast<uint32_t>(WorkerState::kBusy);
  }));
  p.sup().begin_stop(true, 30 * kSec);
  EXPECT_FALSE(p.sup().wait_stopped(monotonic_ns() + 100'000'000));  // still finishing tasks
  EXPECT_TRUE(p.sup().running());
  p.sup().begin_stop(false, 0);
  EXPECT_TRUE(p.sup().wait_stopped(monotonic_ns() + 10 * kSec));
  EXPECT_FALSE(p.sup().running());
  EXPECT_EQ(p.sup().live_workers(), 0u);
  EXPECT_TRUE(my_children().empty());
  // The running tasks were killed, not finished: none has a result but a cancellation.
  p.collect_rest(b);
  for (size_t i = 0; i < b.size(); ++i)
    if (b.count[i]) {
      EXPECT_EQ(b.first[i].status, ResultStatus::kCancelled) << "task " << i;
    }
}

// Stops while tasks are queued (in the backlog and a full ring, or in a ring with room)
// and in the workers' local queues: a graceful stop finishes what workers claimed; a hard one
// cancels it, and cancelled means a kCancelled result, not back in the ring. Either way every
// task has exactly one result or is still queued, never both, never neither.
struct StopCase {
  bool graceful;
  bool backlog;  // more tasks than ring slots: the rest wait in the producer's backlog
};

class StopTest : public SupervisorTest, public ::testing::WithParamInterface<StopCase> {};

TEST_P(StopTest, LosesNoTask) {
  const bool graceful = GetParam().graceful;
  const size_t n = scaled(3000, 1500);
  PoolSetup s;
  s.queue_slots = GetParam().backlog ? 1024 : 4096;
  Pool p(prefix, s);
  // 400 us per task: claimed batches take a while, so the stop finds them in progress.
  Book b(mixed_tasks(n, 400, 5, 7));
  ASSERT_TRUE(p.submit_range(b, 0, n));  // into the backlog; the feeder fills the ring
  p.start();
  ASSERT_TRUE(p.collect(b, 100)) << describe(tally(b), p);
  p.producer().close();
  p.sup().stop(graceful, 10 * kSec);
  EXPECT_EQ(p.sup().live_workers(), 0u);
  p.collect_rest(b);

  // What is still queued: the backlog, then the ring.
  std::vector<uint32_t> queued(n, 0);
  std::vector<std::string> odd;
  const SlotLayout& L = p.seg().config().slot;
  auto note = [&](const TaskHeader& h, const uint8_t* slot) {
    uint32_t i = read_uint(slot + L.tsk_id_off, L.tsk_id_size);
    if (i >= n || h.seq != b.seq[i]) odd.push_back("queued task " + std::to_string(i));
    else ++queued[i];
  };
  uint64_t in_backlog = p.producer().drop_backlog(note);
  uint64_t in_ring = 0;
  for (;;) {
    uint32_t k = p.seg().tasks().claim_range(64, nullptr, [&](uint32_t, const uint8_t* body) {
      TaskHeader h;
      std::memcpy(&h, body, sizeof h);
      note(h, body + sizeof h);
      if (h.encoding == ArgEncoding::kPooled) p.seg().pool().free(h.pool_ref, h.stream_len);
    });
    if (k == 0) break;
    in_ring += k;
  }
  EXPECT_TRUE(odd.empty()) << odd.front();

  size_t finished = 0, cancelled = 0, lost = 0, both = 0, bad = 0;
  std::string first_bad;
  for (size_t i = 0; i < n; ++i) {
    if (b.count[i] > 1 || queued[i] > 1 || (b.count[i] && queued[i])) {
      ++both;
      continue;
    }
    if (!b.count[i] && !queued[i]) {
      ++lost;
      continue;
    }
    if (!b.count[i]) continue;
    ResultStatus st = b.first[i].status;
    if (st == ResultStatus::kOk && b.problem[i].empty()) ++finished;
    else if (st == ResultStatus::kCancelled && !graceful) ++cancelled;
    else if (++bad == 1) first_bad = "task " + std::to_string(i) + " status " + std::to_string(int(st)) + " " + b.problem[i];
  }
  EXPECT_EQ(lost, 0u);
  EXPECT_EQ(both, 0u);
  EXPECT_EQ(bad, 0u) << first_bad;
  EXPECT_EQ(finished + cancelled + in_backlog + in_ring, n)
      << "finished " << finished << " cancelled " << cancelled << " backlog " << in_backlog << " ring " << in_ring;
  EXPECT_GT(in_backlog + in_ring, 0u) << "the stop came too late to find queued tasks";
  if (GetParam().backlog) {
    EXPECT_GT(in_backlog, 0u);
  } else {
    EXPECT_EQ(in_backlog, 0u);
  }
  // Killing the workers is a crash each for a hard stop (a worker still starting up, as
  // under a sanitizer, dies before it could hold anything and is not one); nothing is
  // charged or retried.
  if (graceful) {
    EXPECT_EQ(p.counters().crashes.load(), 0u);
  } else {
    EXPECT_LE(p.counters().crashes.load(), 2u);
  }
  EXPECT_EQ(p.counters().retries.load(), 0u);
  EXPECT_EQ(p.counters().crashed_tasks.load(), 0u);
  if (!graceful) {
    EXPECT_GT(cancelled, 0u) << "no claimed task was cancelled";
  }
  EXPECT_EQ(p.seg().pool().used_bytes(), 0u);
  std::cout << "[          ] finished " << finished << ", cancelled " << cancelled << ", backlog "
            << in_backlog << ", ring " << in_ring << "\n";
}

const StopCase kStopCases[] = {{true, true}, {true, false}, {false, true}, {false, false}};
INSTANTIATE_TEST_SUITE_P(Kinds, StopTest, ::testing::ValuesIn(kStopCases),
                         [](const ::testing::TestParamInfo<StopCase>& i) {
                           return std::string(i.param.graceful ? "Graceful" : "Hard") +
                                  (i.param.backlog ? "WithBacklog" : "RingOnly");
                         });

}  // namespace
}  // namespace mpop

// The same executable is the test and the worker the tests spawn.
int main(int argc, char** argv) {
  if (argc >= 2 && std::strcmp(argv[1], "--mpop-worker") == 0) mpop::worker_main(argc, argv);
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
