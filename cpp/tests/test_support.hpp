// Shared helpers of the native test suites: workload scaling for sanitizer builds, memory
// shared across fork(), and child processes that cannot outlive or hang the test.
#pragma once

#include <dirent.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "mpop/futex.hpp"
#include "mpop/segment.hpp"

#ifndef MPOP_TEST_SCALE
#define MPOP_TEST_SCALE 1
#endif

namespace mpop::test {

// Sanitizer builds divide the big workloads by MPOP_TEST_SCALE (set by cpp/tests/CMakeLists.txt)
// so that every build of the suite finishes in minutes on a 2-core machine.
constexpr uint64_t kScale = MPOP_TEST_SCALE;
constexpr uint64_t scaled(uint64_t n, uint64_t at_least = 1) {
  return n / kScale > at_least ? n / kScale : at_least;
}

// A MAP_SHARED anonymous mapping: memory that fork()ed children share with the parent, as a
// segment shares memory between the owner and its workers.
class SharedMemory {
 public:
  explicit SharedMemory(size_t bytes) : bytes_(bytes) {
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw std::runtime_error("mmap failed");
    mem_ = p;
  }
  ~SharedMemory() { munmap(mem_, bytes_); }
  SharedMemory(const SharedMemory&) = delete;
  SharedMemory& operator=(const SharedMemory&) = delete;

  void* get() const { return mem_; }
  template <class T>
  T* at(size_t offset) const {
    return reinterpret_cast<T*>(static_cast<uint8_t*>(mem_) + offset);
  }

 private:
  void* mem_ = nullptr;
  size_t bytes_ = 0;
};

// Runs `body` in a forked child that exits with body's return value through _exit (no
// GoogleTest or sanitizer teardown in the child). The child dies with the test process.
inline pid_t fork_child(const std::function<int()>& body) {
  pid_t parent = getpid();
  pid_t pid = fork();
  if (pid < 0) throw std::runtime_error("fork failed");
  if (pid == 0) {
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != parent) _exit(97);
    int rc = 98;
    try {
      rc = body();
    } catch (...) {
      rc = 99;
    }
    _exit(rc);
  }
  return pid;
}

// Waits for every child until `timeout_ms`; kills the stragglers. Returns each child's exit
// code, or -signal if it was killed (-9 when it timed out).
inline std::vector<int> wait_children(const std::vector<pid_t>& pids, int64_t timeout_ms) {
  std::vector<int> codes(pids.size(), -1000);
  std::vector<bool> done(pids.size(), false);
  size_t left = pids.size();
  int64_t deadline = monotonic_ns() + timeout_ms * 1000000;
  while (left > 0) {
    bool progress = false;
    for (size_t i = 0; i < pids.size(); ++i) {
      if (done[i]) continue;
      int status = 0;
      pid_t r = waitpid(pids[i], &status, WNOHANG);
      if (r == pids[i]) {
        done[i] = true;
        --left;
        progress = true;
        codes[i] = WIFEXITED(status) ? WEXITSTATUS(status) : -WTERMSIG(status);
      }
    }
    if (left == 0) break;
    if (monotonic_ns() > deadline) {
      for (size_t i = 0; i < pids.size(); ++i) {
        if (done[i]) continue;
        kill(pids[i], SIGKILL);
        int status = 0;
        waitpid(pids[i], &status, 0);
        codes[i] = -SIGKILL;
      }
      break;
    }
    if (!progress) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return codes;
}

inline int wait_child(pid_t pid, int64_t timeout_ms) { return wait_children({pid}, timeout_ms)[0]; }

// Deterministic pseudo-random numbers (splitmix64), so that every run does the same work.
struct SplitMix {
  uint64_t state;
  uint64_t next() {
    uint64_t z = (state += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
  }
  uint64_t below(uint64_t n) { return next() % n; }
};

// The names in /dev/shm that start with `prefix`.
inline std::vector<std::string> shm_names(const std::string& prefix) {
  std::vector<std::string> out;
  if (DIR* d = opendir("/dev/shm")) {
    while (dirent* e = readdir(d))
      if (std::strncmp(e->d_name, prefix.c_str(), prefix.size()) == 0) out.push_back(e->d_name);
    closedir(d);
  }
  return out;
}

// For a fixture's TearDown: removes the segments a test left under `prefix` and returns
// their names (the test then fails: nothing may be left behind).
inline std::vector<std::string> remove_leftover_segments(const std::string& prefix) {
  std::vector<std::string> left = shm_names(prefix);
  for (auto& n : left) Segment::remove(n);
  return left;
}

// A segment configuration with the slot every suite uses (tsk_id at 0, fn_id at 4, 4 bytes
// each, `args` int64 arguments from 8), one worker, 64-cell rings, a 1 MiB argument pool.
inline SegmentConfig basic_config(uint32_t slot_size, uint32_t args) {
  SegmentConfig c;
  c.slot.size = slot_size;
  c.slot.tsk_id_off = 0;
  c.slot.tsk_id_size = 4;
  c.slot.fn_id_off = 4;
  c.slot.fn_id_size = 4;
  c.slot.args_off = 8;
  c.slot.args_count = args;
  c.queue_slots = 64;
  c.result_slots = 64;
  c.max_workers = 1;
  c.pool_bytes = 1 << 20;
  c.registry_bytes = 4096;
  return c;
}

// Polls `cond` every `step` until it holds or `timeout_ns` pass (a generous bound that
// only a bug reaches); returns whether it held.
template <class Cond>
bool eventually(Cond&& cond, int64_t timeout_ns = 10'000'000'000,
                std::chrono::microseconds step = std::chrono::microseconds(200)) {
  const int64_t deadline = monotonic_ns() + timeout_ns;
  for (;;) {
    if (cond()) return true;
    if (monotonic_ns() > deadline) return false;
    std::this_thread::sleep_for(step);
  }
}

inline uint64_t mix(uint64_t a, uint64_t b) { return SplitMix{a * 0x100000001b3ULL ^ b}.next(); }

}  // namespace mpop::test
