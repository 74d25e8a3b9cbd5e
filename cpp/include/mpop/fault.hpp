// Test-only fault injection: the segment header's fault switch (fault_step,
// fault_countdown) names a protocol step; the process that reaches it the countdown-th
// time SIGKILLs itself. Tests use it to check that every death the protocols allow is
// recovered from exactly.
#pragma once

#include <signal.h>
#include <unistd.h>

#include <cstdint>

#include "mpop/segment.hpp"

namespace mpop {

// The steps of the worker and supervisor protocols at which a test can make the process
// that reaches them die (SIGKILL).
enum class FaultStep : uint32_t {
  kNone = 0,
  kClaimBeforeCas = 1,      // claim window raised, dequeue CAS not yet done
  kClaimAfterCas = 2,       // cells claimed, nothing copied
  kClaimMidCopy = 3,        // part of the claim copied into the local queue
  kClaimBeforeRelease = 4,  // all copied, ring cells not yet released
  kBeforeRun = 5,           // task marked running, handler not called
  kAfterRun = 6,            // handler returned, result not published
  kPublishReserved = 7,     // result cell reserved, not written
  kAfterPublish = 8,        // result published, task not marked done
  kIdle = 9,                // about to sleep with nothing to do
  kResultPooled = 10,       // a pooled result block allocated and written, not published
  kPublishBeforeCas = 11,   // publication window raised, result cell not yet reserved
  kResultAllocated = 12,    // a pooled result block taken (tagged), not yet recorded
  kPublishedBeforeEpoch = 13,  // result cell published, publication window not yet closed
  // A persistent pool's supervisor process (the numbers are part of the tests' API):
  kSupervisorSpawned = 20,   // a worker started, its pid not yet in its record
  kSupervisorTookOver = 21,  // the segment's owner is this process, no worker adopted yet
  kSupervisorAdopting = 22,  // between adopting one live worker and the next
  kForwarderRead = 23,       // a batch read from the result ring, nothing in mailboxes yet
  kForwarderMidPush = 24,    // a mailbox's cells for the batch reserved, not written
  kForwarderPushed = 25,     // the batch in mailboxes, not yet taken from the result ring
  kSupervisorRecovering = 26,  // a dead worker's local queue half recovered
  kSupervisorRecovered = 27,   // a dead worker recovered, its replacement not started
  kSupervisorKilledWorker = 28,  // a worker signalled for task_timeout or kill_task, its death not yet seen
  // A persistent pool's client:
  kClientPushReserved = 29,  // a task's cell in the task ring reserved, not written
};

// Kills this process if the segment's fault switch names `step` and this is the
// countdown's last hit. One relaxed load when no fault is armed.
inline void maybe_fault(SegmentHeader& hdr, FaultStep step) {
  if (hdr.fault_step.load(std::memory_order_relaxed) != static_cast<uint32_t>(step)) return;
  if (hdr.fault_countdown.fetch_sub(1, std::memory_order_acq_rel) == 1) {
    hdr.fault_step.store(0, std::memory_order_release);
    kill(getpid(), SIGKILL);
    for (;;) pause();
  }
}

}  // namespace mpop
