// Google Benchmark of the task ring's hot path: try_push + claim_range of batches of 1..64
// slots, with one and several threads, reported as time per slot moved through the ring.
#include <benchmark/benchmark.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <thread>

#include "mpop/slot_layout.hpp"
#include "mpop/task_ring.hpp"

namespace {

constexpr uint32_t kCapacity = 1024;
// A realistic cell: the runtime's task header plus a 64-byte user slot.
const uint32_t kStride = mpop::TaskRing::stride_for_body(sizeof(mpop::TaskHeader) + 64);

void* g_mem = nullptr;
mpop::TaskRing g_ring;

// Each benchmark run starts from a fresh, empty ring shared by all its threads.
void make_ring(const benchmark::State&) {
  size_t bytes = mpop::round_up(mpop::TaskRing::bytes_needed(kCapacity, kStride), 4096);
  g_mem = std::aligned_alloc(4096, bytes);
  std::memset(g_mem, 0, bytes);
  g_ring = mpop::TaskRing::create(g_mem, kCapacity, kStride);
}
void free_ring(const benchmark::State&) {
  std::free(g_mem);
  g_mem = nullptr;
}

void report(benchmark::State& state, uint64_t slots) {
  state.SetItemsProcessed(static_cast<int64_t>(slots));
  // An inverted rate of slots per second: seconds per slot, shown as e.g. "12.3ns".
  state.counters["per_slot"] = benchmark::Counter(
      static_cast<double>(slots), benchmark::Counter::kIsRate | benchmark::Counter::kInvert);
}

// Every thread pushes a batch and claims a batch (its own or another thread's).
void BM_PushClaim(benchmark::State& state) {
  const auto batch = static_cast<uint32_t>(state.range(0));
  uint64_t value = static_cast<uint64_t>(state.thread_index()) << 40;
  uint64_t slots = 0, sum = 0;
  for (auto _ : state) {
    value += g_ring.try_push(batch, [&](uint32_t i, void* body) {
      uint64_t v = value + i;
      std::memcpy(body, &v, sizeof v);
    });
    slots += g_ring.claim_range(batch, nullptr, [&](uint32_t, const uint8_t* body) {
      uint64_t v;
      std::memcpy(&v, body, sizeof v);
      sum += v;
    });
  }
  benchmark::DoNotOptimize(sum);
  report(state, slots);
}

// The producer/worker split of an app: a background thread keeps pushing batches while the
// benchmark threads (the workers) only claim; each iteration is one non-empty claim.
std::atomic<bool> g_stop{false};
std::thread g_producer;

void start_producer(const benchmark::State& state) {
  make_ring(state);
  g_stop.store(false);
  const auto batch = static_cast<uint32_t>(state.range(0));
  g_producer = std::thread([batch] {
    uint64_t value = 0;
    while (!g_stop.load(std::memory_order_relaxed)) {
      uint32_t n = g_ring.try_push(batch, [&](uint32_t i, void* body) {
        uint64_t v = value + i;
        std::memcpy(body, &v, sizeof v);
      });
      if (n == 0) mpop::cpu_relax();
      value += n;
    }
  });
}
void stop_producer(const benchmark::State& state) {
  g_stop.store(true);
  g_producer.join();
  free_ring(state);
}

void BM_ClaimFromProducerThread(benchmark::State& state) {
  const auto batch = static_cast<uint32_t>(state.range(0));
  uint64_t slots = 0, sum = 0;
  mpop::ClaimState claim;  // workers advertise their claim window
  auto sink = [&](uint32_t, const uint8_t* body) {
    uint64_t v;
    std::memcpy(&v, body, sizeof v);
    sum += v;
  };
  for (auto _ : state) {
    uint32_t k;
    while ((k = g_ring.claim_range(batch, &claim, sink)) == 0) mpop::cpu_relax();
    slots += k;
  }
  benchmark::DoNotOptimize(sum);
  report(state, slots);
}

void batch_sizes(benchmark::internal::Benchmark* b) {
  for (int64_t batch : {1, 2, 3, 4, 8, 16, 32, 64}) b->Arg(batch);
}

BENCHMARK(BM_PushClaim)
    ->Apply(batch_sizes)
    ->Setup(make_ring)
    ->Teardown(free_ring)
    ->Threads(1)
    ->Threads(2)
    ->Threads(4)
    ->UseRealTime();
BENCHMARK(BM_ClaimFromProducerThread)
    ->Apply(batch_sizes)
    ->Setup(start_producer)
    ->Teardown(stop_producer)
    ->Threads(1)
    ->Threads(2)
    ->UseRealTime();

}  // namespace

BENCHMARK_MAIN();
