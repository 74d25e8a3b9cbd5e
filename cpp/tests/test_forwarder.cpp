// Forwarder: a persistent pool's result path, from the result ring to the clients'
// mailboxes. Covered here: routing by seq (a client's results reach its mailboxes only, a
// plain-route result its plain mailbox with a kAck in the live one, which a tracking
// collector counts as completed), duplicates (a task that ran twice) dropped with their
// pooled value blocks freed, argument blocks freed by the forwarder, results outside every
// client's seq space dropped, side-message pieces routed to their task's client (or the
// first attached one), a full mailbox waited for without losing anything, the client
// record's complete_below and forwarded, and Producer(seg, client) seqs carrying on across
// producers of one client record. Single-threaded tests drive the forwarder with pump(0);
// the full-mailbox ones run its thread (start/stop), including the batch stop() leaves in
// the result ring when a mailbox stays full (for the next forwarder, which replays it). The
// forwarder's own death at each step of a batch is injected in a child process: the next
// forwarder voids the cells it reserved and replays its batch, and the client drops the
// copies it had (each result once, each block freed once).
#include <dirent.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <iterator>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "mpop/collector.hpp"
#include "mpop/forwarder.hpp"
#include "mpop/producer.hpp"
#include "test_support.hpp"

namespace mpop {
namespace {

constexpr uint32_t kClients = 3;
constexpr uint32_t kMailboxSlots = 8;
constexpr uint32_t kResultSlots = 64;

SegmentConfig config() {
  SegmentConfig c = test::basic_config(32, 3);
  c.result_slots = kResultSlots;
  c.batch_size = 16;
  c.max_clients = kClients;
  c.client_slots = kMailboxSlots;
  return c;
}

// The k-th seq of client c's space (k >= 1: a client record's first seq is base + 1).
uint64_t seq_of(uint32_t c, uint64_t k) { return client_seq_base(c) + k; }

// A result record as a worker (or the supervisor) publishes it.
ResultHeader result(uint64_t seq, uint32_t route = kRouteFuture) {
  ResultHeader h;
  h.seq = seq;
  h.route = route;
  h.status = ResultStatus::kOk;
  h.tsk_id = static_cast<uint32_t>(seq & 0xFFFF);
  h.fn_id = 7;
  return h;
}

// A record in the segment's result ring: the header, then `inline_data` (h.inline_len is
// set from it).
void publish(Segment& seg, ResultHeader h, const std::string& inline_data = "") {
  h.inline_len = static_cast<uint16_t>(inline_data.size());
  uint32_t n = seg.results().try_push(1, [&](uint32_t, void* body) {
    auto* b = static_cast<uint8_t*>(body);
    std::memset(b, 0, kResultStride - TaskRing::kSeqBytes);
    std::memcpy(b, &h, sizeof h);
    if (!inline_data.empty()) std::memcpy(b + sizeof h, inline_data.data(), inline_data.size());
  });
  ASSERT_EQ(n, 1u) << "the result ring is full";
}

// A record as taken out of a mailbox.
struct Record {
  ResultHeader h;
  std::string data;  // its inline bytes
};

// Takes every record out of a mailbox (as a client's collector would).
std::vector<Record> take_all(TaskRing mb) {
  std::vector<Record> out;
  while (mb.claim_range(mb.capacity(), nullptr, [&](uint32_t, const uint8_t* body) {
    Record r;
    std::memcpy(&r.h, body, sizeof r.h);
    r.data.assign(reinterpret_cast<const char*>(body + sizeof r.h), r.h.inline_len);
    out.push_back(r);
  }) != 0) {
  }
  return out;
}

void set_state(Segment& seg, uint32_t c, ClientState st) {
  seg.client(c).lease.store(make_lease(1, st), std::memory_order_release);
}
void attach_client(Segment& seg, uint32_t c) { set_state(seg, c, ClientState::kAttached); }

using test::eventually;

class ForwarderTest : public ::testing::Test {
 protected:
  // Unique per test process, so that parallel ctest runs never see each other's segments.
  std::string prefix = "mpoptest" + std::to_string(getpid());
  std::unique_ptr<Segment> seg = Segment::create(prefix, config());

  void TearDown() override {
    seg.reset();
    std::vector<std::string> left = test::remove_leftover_segments(prefix);
    EXPECT_TRUE(left.empty()) << "left in /dev/shm: " << left.front();
  }

  size_t live_size(uint32_t c) const { return seg->live_mailbox(c).size(); }
  size_t plain_size(uint32_t c) const { return seg->plain_mailbox(c).size(); }
  // A pooled block as a worker's result (or a producer's arguments) would hold it.
  uint64_t pooled(uint64_t bytes, uint16_t tag = ArgPool::kResultTag) {
    uint64_t off = seg->pool().try_alloc(bytes, UINT64_MAX, tag);
    EXPECT_NE(off, 0u);
    return off;
  }
  // `h` with its value in a pooled block of `bytes` (a new one unless `block` is given).
  ResultHeader with_value(ResultHeader h, uint32_t bytes, uint64_t block = 0) {
    h.value_encoding = ValueEncoding::kPooled;
    h.value_ref = block ? block : pooled(bytes);
    h.value_len = bytes;
    return h;
  }
};

// ---- routing by seq ------------------------------------------------------------------------

TEST_F(ForwarderTest, ResultGoesToItsClientsLiveMailboxOnly) {
  for (uint32_t c = 0; c < kClients; ++c) attach_client(*seg, c);
  Forwarder fw(*seg);
  ResultHeader h = result(seq_of(1, 5));
  h.worker_id = 3;
  h.attempts = 1;
  publish(*seg, h, "hello");

  EXPECT_EQ(fw.pump(0), 1u);
  EXPECT_EQ(fw.forwarded(), 1u);
  EXPECT_EQ(fw.dropped(), 0u);
  EXPECT_EQ(seg->results().size(), 0u);

  std::vector<Record> got = take_all(seg->live_mailbox(1));
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got[0].h.seq, seq_of(1, 5));
  EXPECT_EQ(got[0].h.status, ResultStatus::kOk);
  EXPECT_EQ(got[0].h.route, kRouteFuture);
  EXPECT_EQ(got[0].h.tsk_id, h.tsk_id);
  EXPECT_EQ(got[0].h.fn_id, 7u);
  EXPECT_EQ(got[0].h.worker_id, 3u);
  EXPECT_EQ(got[0].h.attempts, 1u);
  EXPECT_EQ(got[0].data, "hello");
  EXPECT_EQ(plain_size(1), 0u);
  for (uint32_t c : {0u, 2u}) {
    EXPECT_EQ(live_size(c), 0u) << c;
    EXPECT_EQ(plain_size(c), 0u) << c;
  }
}

TEST_F(ForwarderTest, ResultsOfSeveralClientsInOneBatchAreSplitByClient) {
  Forwarder fw(*seg);
  // Interleaved, as workers would publish them; each client's own order is kept.
  for (uint64_t k = 1; k <= 4; ++k)
    for (uint32_t c = 0; c < kClients; ++c) publish(*seg, result(seq_of(c, k)), std::to_string(c));
  EXPECT_EQ(fw.pump(0), 4u * kClients);
  EXPECT_EQ(fw.forwarded(), 4u * kClients);
  for (uint32_t c = 0; c < kClients; ++c) {
    std::vector<Record> got = take_all(seg->live_mailbox(c));
    ASSERT_EQ(got.size(), 4u) << c;
    for (uint64_t k = 1; k <= 4; ++k) {
      EXPECT_EQ(got[k - 1].h.seq, seq_of(c, k));
      EXPECT_EQ(got[k - 1].data, std::to_string(c));
    }
  }
}

TEST_F(ForwarderTest, PlainResultGoesToThePlainMailboxAndItsAckToTheLiveOne) {
  attach_client(*seg, 0);
  Forwarder fw(*seg);
  const uint64_t s = seq_of(0, 1);
  const uint64_t value = pooled(600);
  publish(*seg, with_value(result(s, kRoutePlain), 600, value));
  EXPECT_EQ(fw.pump(0), 1u);
  EXPECT_EQ(fw.forwarded(), 1u);  // one result, though two records
  EXPECT_EQ(seg->client(0).forwarded.load(), 1u);

  // The result, whole, in the plain mailbox; its value block is the client's to free.
  std::vector<Record> plain = take_all(seg->plain_mailbox(0));
  ASSERT_EQ(plain.size(), 1u);
  EXPECT_EQ(plain[0].h.seq, s);
  EXPECT_EQ(plain[0].h.status, ResultStatus::kOk);
  EXPECT_EQ(plain[0].h.route, kRoutePlain);
  EXPECT_EQ(plain[0].h.value_encoding, ValueEncoding::kPooled);
  EXPECT_EQ(plain[0].h.value_ref, value);
  EXPECT_EQ(plain[0].h.value_len, 600u);
  EXPECT_NE(seg->pool().tag_of(value), ArgPool::kFreeTag);

  // The live mailbox holds its acknowledgement (AckRecordCarriesNoValue looks at it),
  // which the client's tracking collector counts as the task's completion.
  ASSERT_EQ(live_size(0), 1u);
  Collector col(*seg, seg->live_mailbox(0), seq_of(0, 1), /*track=*/true);
  size_t sunk = 0;
  size_t got = col.drain(16, 0, [&](const ResultHeader&, const uint8_t*, uint32_t) { ++sunk; },
                         [] { return false; });
  EXPECT_EQ(got, 1u);   // counted as a completed task...
  EXPECT_EQ(sunk, 0u);  // ...but not handed on: its result waits in the plain mailbox
  EXPECT_EQ(col.completed(), 1u);
  EXPECT_TRUE(col.is_complete(s));
  EXPECT_EQ(col.first_incomplete(), s + 1);
  EXPECT_EQ(live_size(0), 0u);
  EXPECT_NE(seg->pool().tag_of(value), ArgPool::kFreeTag);  // an ack frees nothing
  seg->pool().free(value, 600);
  EXPECT_EQ(seg->pool().used_bytes(), 0u);
}

TEST_F(ForwarderTest, AckRecordCarriesNoValue) {
  Forwarder fw(*seg);
  const uint64_t value = pooled(1000);
  ResultHeader h = with_value(result(seq_of(2, 9), kRoutePlain), 1000, value);
  h.worker_id = 4;
  publish(*seg, h);
  ResultHeader inl = result(seq_of(2, 10), kRoutePlain);
  publish(*seg, inl, "inline value");
  EXPECT_EQ(fw.pump(0), 2u);

  std::vector<Record> plain = take_all(seg->plain_mailbox(2));
  ASSERT_EQ(plain.size(), 2u);
  EXPECT_EQ(plain[1].data, "inline value");
  std::vector<Record> live = take_all(seg->live_mailbox(2));
  ASSERT_EQ(live.size(), 2u);
  for (size_t i = 0; i < 2; ++i) {
    const ResultHeader& a = live[i].h;
    EXPECT_EQ(a.seq, seq_of(2, 9 + i));
    EXPECT_EQ(a.status, ResultStatus::kAck);
    EXPECT_EQ(a.route, kRoutePlain);
    EXPECT_EQ(a.value_encoding, ValueEncoding::kInline);
    EXPECT_EQ(a.value_ref, 0u);
    EXPECT_EQ(a.value_len, 0u);
    EXPECT_EQ(a.inline_len, 0u);
    EXPECT_EQ(a.arg_ref, 0u);
    EXPECT_TRUE(live[i].data.empty());
  }
  EXPECT_EQ(live[0].h.worker_id, 4u);
  seg->pool().free(value, 1000);
}

TEST_F(ForwarderTest, UntrackedCollectorOverThePlainMailboxDeliversTheResult) {
  Forwarder fw(*seg);
  publish(*seg, result(seq_of(0, 3), kRoutePlain), "abc");
  EXPECT_EQ(fw.pump(0), 1u);
  Collector plain(*seg, seg->plain_mailbox(0), seq_of(0, 1), /*track=*/false);
  std::vector<std::string> values;
  size_t got = plain.drain(
      16, 0,
      [&](const ResultHeader& h, const uint8_t* v, uint32_t len) {
        EXPECT_EQ(h.seq, seq_of(0, 3));
        values.emplace_back(reinterpret_cast<const char*>(v), len);
      },
      [] { return false; });
  EXPECT_EQ(got, 1u);
  ASSERT_EQ(values.size(), 1u);
  EXPECT_EQ(values[0], "abc");
  EXPECT_EQ(plain.completed(), 1u);
}

// ---- duplicates and pool blocks ------------------------------------------------------------

TEST_F(ForwarderTest, SecondResultOfATaskIsDroppedAndItsPooledValueFreed) {
  Forwarder fw(*seg);
  const uint64_t s = seq_of(0, 1);
  const uint64_t first = pooled(700);
  publish(*seg, with_value(result(s), 700, first));
  EXPECT_EQ(fw.pump(0), 1u);
  const uint64_t used_after_first = seg->pool().used_bytes();

  // The task ran again (its worker died after publishing): a second result, another block.
  const uint64_t second = pooled(2000);
  EXPECT_GT(seg->pool().used_bytes(), used_after_first);
  ResultHeader rerun = with_value(result(s), 2000, second);
  rerun.attempts = 1;
  publish(*seg, rerun);
  EXPECT_EQ(fw.pump(0), 1u);  // taken from the ring...
  EXPECT_EQ(fw.forwarded(), 1u);  // ...but not forwarded
  EXPECT_EQ(seg->client(0).forwarded.load(), 1u);
  EXPECT_EQ(seg->pool().used_bytes(), used_after_first);  // the duplicate's block is freed
  EXPECT_EQ(seg->pool().tag_of(second), ArgPool::kFreeTag);
  EXPECT_NE(seg->pool().tag_of(first), ArgPool::kFreeTag);  // the client's to free

  std::vector<Record> got = take_all(seg->live_mailbox(0));
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got[0].h.value_ref, first);
  EXPECT_EQ(got[0].h.attempts, 0u);
  seg->pool().free(first, 700);
  EXPECT_EQ(seg->pool().used_bytes(), 0u);
}

TEST_F(ForwarderTest, DuplicateInTheSameBatchIsDroppedToo) {
  Forwarder fw(*seg);
  const uint64_t s = seq_of(1, 2);
  const uint64_t dup = pooled(300);
  publish(*seg, result(s, kRoutePlain), "first");
  publish(*seg, with_value(result(s, kRoutePlain), 300, dup));
  EXPECT_EQ(fw.pump(0), 2u);
  EXPECT_EQ(fw.forwarded(), 1u);
  std::vector<Record> plain = take_all(seg->plain_mailbox(1));
  ASSERT_EQ(plain.size(), 1u);
  EXPECT_EQ(plain[0].data, "first");
  EXPECT_EQ(take_all(seg->live_mailbox(1)).size(), 1u);  // one ack
  EXPECT_EQ(seg->pool().used_bytes(), 0u);
}

// Both results of a task that ran twice name its one argument block, which the first one's
// forwarding freed: the duplicate must not free it again (by then it may be someone else's).
TEST_F(ForwarderTest, DuplicateDoesNotFreeTheArgumentBlockAgain) {
  Forwarder fw(*seg);
  const uint64_t args = pooled(900, ArgPool::kArgTag);
  ResultHeader h = result(seq_of(0, 1));
  h.arg_ref = args;
  h.arg_len = 900;
  publish(*seg, h);
  EXPECT_EQ(fw.pump(0), 1u);
  EXPECT_EQ(seg->pool().used_bytes(), 0u);

  const uint64_t reused = pooled(900, ArgPool::kArgTag);  // the next task's arguments
  ASSERT_EQ(reused, args);  // the same place (an empty pool hands out its first block)
  publish(*seg, h);         // the duplicate
  EXPECT_EQ(fw.pump(0), 1u);
  EXPECT_EQ(fw.forwarded(), 1u);
  EXPECT_EQ(seg->pool().tag_of(reused), ArgPool::kArgTag);
  EXPECT_EQ(seg->pool().used_bytes(), 4 * ArgPool::kUnit);  // 900 bytes: 4 units
  seg->pool().free(reused, 900);
}

TEST_F(ForwarderTest, ArgumentBlockIsFreedAndTheForwardedCopyHasNoArgRef) {
  Forwarder fw(*seg);
  const uint64_t args_f = pooled(1500, ArgPool::kArgTag);
  const uint64_t args_p = pooled(400, ArgPool::kArgTag);
  const uint64_t value = pooled(800);
  EXPECT_GT(seg->pool().arg_bytes(), 0u);

  ResultHeader f = result(seq_of(0, 1), kRouteFuture);
  f.arg_ref = args_f;
  f.arg_len = 1500;
  publish(*seg, with_value(f, 800, value));
  ResultHeader p = result(seq_of(0, 2), kRoutePlain);
  p.arg_ref = args_p;
  p.arg_len = 400;
  publish(*seg, p, "x");
  EXPECT_EQ(fw.pump(0), 2u);

  EXPECT_EQ(seg->pool().tag_of(args_f), ArgPool::kFreeTag);
  EXPECT_EQ(seg->pool().tag_of(args_p), ArgPool::kFreeTag);
  EXPECT_EQ(seg->pool().arg_bytes(), 0u);
  EXPECT_NE(seg->pool().tag_of(value), ArgPool::kFreeTag);  // the value stays, for the client

  std::vector<Record> live = take_all(seg->live_mailbox(0));
  std::vector<Record> plain = take_all(seg->plain_mailbox(0));
  ASSERT_EQ(live.size(), 2u);  // the future's result and the plain one's ack
  ASSERT_EQ(plain.size(), 1u);
  for (const Record& r : live) {
    EXPECT_EQ(r.h.arg_ref, 0u) << r.h.seq;
    EXPECT_EQ(r.h.arg_len, 0u) << r.h.seq;
  }
  EXPECT_EQ(plain[0].h.arg_ref, 0u);
  EXPECT_EQ(plain[0].h.arg_len, 0u);
  EXPECT_EQ(live[0].h.value_ref, value);
  EXPECT_EQ(live[0].h.value_len, 800u);
  seg->pool().free(value, 800);  // as the client does once it decoded the value
  EXPECT_EQ(seg->pool().used_bytes(), 0u);
}

// ---- what belongs to no client -------------------------------------------------------------

TEST_F(ForwarderTest, ResultOutsideEveryClientsSeqSpaceIsDroppedAndItsBlocksFreed) {
  for (uint32_t c = 0; c < kClients; ++c) attach_client(*seg, c);
  Forwarder fw(*seg);
  const uint64_t stray[] = {
      0,                                // no task
      5,                                // the creator's own (in-process) space
      client_seq_base(0) - 1,           // just below client 0's space
      client_seq_base(kClients) + 1,    // a client index == max_clients
      client_seq_base(kClients + 100),  // far above
  };
  for (uint64_t s : stray) {
    ResultHeader h = result(s, s % 2 ? kRoutePlain : kRouteFuture);
    h.arg_ref = pooled(700, ArgPool::kArgTag);
    h.arg_len = 700;
    publish(*seg, with_value(h, 300));
  }
  EXPECT_GT(seg->pool().used_bytes(), 0u);
  const size_t n = std::size(stray);
  EXPECT_EQ(fw.pump(0), n);
  EXPECT_EQ(fw.forwarded(), 0u);
  EXPECT_EQ(fw.dropped(), n);
  EXPECT_EQ(seg->pool().used_bytes(), 0u);
  EXPECT_EQ(seg->pool().arg_bytes(), 0u);
  for (uint32_t c = 0; c < kClients; ++c) {
    EXPECT_EQ(live_size(c), 0u) << c;
    EXPECT_EQ(plain_size(c), 0u) << c;
    EXPECT_EQ(seg->client(c).forwarded.load(), 0u) << c;
    EXPECT_EQ(seg->client(c).complete_below.load(), seq_of(c, 1)) << c;
  }

  // A client's result after them still goes through.
  publish(*seg, result(seq_of(0, 1)));
  EXPECT_EQ(fw.pump(0), 1u);
  EXPECT_EQ(fw.forwarded(), 1u);
  EXPECT_EQ(fw.dropped(), n);
}

TEST_F(ForwarderTest, VoidFillerIsSkippedAndItsValueFreed) {
  Forwarder fw(*seg);
  ResultHeader v = result(seq_of(0, 1));
  v.status = ResultStatus::kVoid;
  publish(*seg, with_value(v, 500));
  EXPECT_EQ(fw.pump(0), 1u);
  EXPECT_EQ(fw.forwarded(), 0u);
  EXPECT_EQ(seg->pool().used_bytes(), 0u);
  EXPECT_EQ(live_size(0), 0u);
  // It marked nothing: the task's real result still goes through.
  publish(*seg, result(seq_of(0, 1)));
  EXPECT_EQ(fw.pump(0), 1u);
  EXPECT_EQ(fw.forwarded(), 1u);
  EXPECT_EQ(live_size(0), 1u);
}

// ---- side messages -------------------------------------------------------------------------

// A side-message piece as SideChannel::send writes it.
ResultHeader side_piece(uint64_t task_seq, uint32_t route, uint32_t index, bool last, uint16_t worker) {
  ResultHeader h;
  h.seq = task_seq;
  h.route = route;
  h.tsk_id = index;
  h.fn_id = last ? kSideLastPiece : 0;
  h.worker_id = worker;
  return h;
}

TEST_F(ForwarderTest, SideMessageGoesToItsTasksClientWhenAttached) {
  for (uint32_t c = 0; c < kClients; ++c) attach_client(*seg, c);
  Forwarder fw(*seg);
  const uint64_t task = seq_of(1, 7);
  publish(*seg, side_piece(task, kRouteStdout, 0, false, 2), "hello, ");
  publish(*seg, side_piece(task, kRouteStdout, 1, true, 2), "world\n");
  EXPECT_EQ(fw.pump(0), 2u);
  EXPECT_EQ(fw.forwarded(), 0u);  // not a result of a task
  EXPECT_EQ(fw.dropped(), 0u);
  EXPECT_EQ(seg->client(1).forwarded.load(), 0u);
  EXPECT_EQ(seg->client(1).complete_below.load(), seq_of(1, 1));  // completes nothing
  EXPECT_EQ(live_size(0), 0u);
  EXPECT_EQ(live_size(2), 0u);
  EXPECT_EQ(plain_size(1), 0u);

  // The client's collector puts the message together.
  Collector col(*seg, seg->live_mailbox(1), seq_of(1, 1), true);
  std::string text;
  uint32_t route = 0;
  col.drain(
      16, 0,
      [&](const ResultHeader& h, const uint8_t* v, uint32_t len) {
        route = h.route;
        text.assign(reinterpret_cast<const char*>(v), len);
      },
      [] { return false; });
  EXPECT_EQ(route, kRouteStdout);
  EXPECT_EQ(text, "hello, world\n");
  EXPECT_EQ(col.completed(), 0u);
  EXPECT_EQ(col.first_incomplete(), seq_of(1, 1));
}

TEST_F(ForwarderTest, SideMessageWithoutATaskGoesToTheFirstAttachedClient) {
  attach_client(*seg, 1);
  attach_client(*seg, 2);
  Forwarder fw(*seg);
  publish(*seg, side_piece(0, kRouteLog, 0, true, 0), "log record");
  EXPECT_EQ(fw.pump(0), 1u);
  EXPECT_EQ(live_size(0), 0u);  // free: nobody reads it
  std::vector<Record> got = take_all(seg->live_mailbox(1));
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got[0].h.route, kRouteLog);
  EXPECT_EQ(got[0].data, "log record");
  EXPECT_EQ(live_size(2), 0u);
  EXPECT_EQ(fw.dropped(), 0u);
}

TEST_F(ForwarderTest, SideMessageOfAnUnreadClientsTaskGoesToTheFirstAttachedClient) {
  attach_client(*seg, 2);
  set_state(*seg, 1, ClientState::kGone);  // gone, and no one adopted it
  Forwarder fw(*seg);
  publish(*seg, side_piece(seq_of(0, 3), kRouteStderr, 0, true, 0), "of a free client's task");
  publish(*seg, side_piece(seq_of(1, 3), kRouteStderr, 0, true, 0), "of a gone client's task");
  publish(*seg, side_piece(5, kRouteStderr, 0, true, 0), "of the creator's task");
  publish(*seg, side_piece(client_seq_base(kClients) + 1, kRouteExit, 0, true, 0), "no such client");
  EXPECT_EQ(fw.pump(0), 4u);
  EXPECT_EQ(live_size(0), 0u);
  EXPECT_EQ(live_size(1), 0u);
  std::vector<Record> got = take_all(seg->live_mailbox(2));
  ASSERT_EQ(got.size(), 4u);
  EXPECT_EQ(got[0].data, "of a free client's task");
  EXPECT_EQ(got[3].data, "no such client");
  EXPECT_EQ(fw.dropped(), 0u);
}

TEST_F(ForwarderTest, SideMessageOfAGoneClientsTaskGoesToItsMailboxWhenAdopted) {
  attach_client(*seg, 0);
  attach_client(*seg, 2);
  set_state(*seg, 1, ClientState::kGone);
  seg->client(1).adopter.store(2 + 1);  // client 2 reads client 1's mailboxes
  Forwarder fw(*seg);
  publish(*seg, side_piece(seq_of(1, 4), kRouteStdout, 0, true, 0), "adopted");
  EXPECT_EQ(fw.pump(0), 1u);
  EXPECT_EQ(live_size(1), 1u);
  EXPECT_EQ(live_size(0), 0u);
  EXPECT_EQ(live_size(2), 0u);
}

TEST_F(ForwarderTest, SideMessageWithNoAttachedClientIsDropped) {
  set_state(*seg, 1, ClientState::kGone);
  Forwarder fw(*seg);
  publish(*seg, side_piece(seq_of(0, 1), kRouteStdout, 0, true, 0), "nobody");
  publish(*seg, side_piece(0, kRouteLog, 0, true, 0), "listens");
  EXPECT_EQ(fw.pump(0), 2u);
  EXPECT_EQ(fw.dropped(), 2u);
  EXPECT_EQ(fw.forwarded(), 0u);
  for (uint32_t c = 0; c < kClients; ++c) {
    EXPECT_EQ(live_size(c), 0u) << c;
    EXPECT_EQ(plain_size(c), 0u) << c;
  }
}

// ---- a full mailbox ------------------------------------------------------------------------

TEST_F(ForwarderTest, FullLiveMailboxMakesItWaitAndLosesNothing) {
  attach_client(*seg, 0);
  Forwarder fw(*seg);
  const uint64_t total = kMailboxSlots + 40;
  for (uint64_t k = 1; k <= kMailboxSlots; ++k) publish(*seg, result(seq_of(0, k)), std::to_string(k));
  EXPECT_EQ(fw.pump(0), kMailboxSlots);
  ASSERT_EQ(live_size(0), kMailboxSlots);  // full

  for (uint64_t k = kMailboxSlots + 1; k <= total; ++k) publish(*seg, result(seq_of(0, k)), std::to_string(k));
  fw.start();
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  EXPECT_EQ(fw.dropped(), 0u);  // it waits for room: nothing dropped...
  EXPECT_EQ(live_size(0), kMailboxSlots);
  EXPECT_EQ(fw.forwarded(), kMailboxSlots);  // ...and nothing more forwarded meanwhile
  EXPECT_EQ(seg->client(0).complete_below.load(), seq_of(0, kMailboxSlots + 1));

  // The client drains its mailbox: every result comes, once, in order.
  Collector col(*seg, seg->live_mailbox(0), seq_of(0, 1), true);
  std::vector<uint64_t> seqs;
  std::vector<std::string> values;
  const int64_t deadline = monotonic_ns() + 10'000'000'000;
  while (col.completed() < total && monotonic_ns() < deadline) {
    col.drain(
        16, monotonic_ns() + 20'000'000,
        [&](const ResultHeader& h, const uint8_t* v, uint32_t len) {
          seqs.push_back(h.seq);
          values.emplace_back(reinterpret_cast<const char*>(v), len);
        },
        [] { return false; });
  }
  ASSERT_EQ(seqs.size(), total);
  for (uint64_t k = 1; k <= total; ++k) {
    EXPECT_EQ(seqs[k - 1], seq_of(0, k));
    EXPECT_EQ(values[k - 1], std::to_string(k));
  }
  EXPECT_EQ(col.first_incomplete(), seq_of(0, total + 1));
  EXPECT_TRUE(eventually([&] { return fw.forwarded() == total; }));
  EXPECT_TRUE(eventually([&] { return seg->client(0).complete_below.load() == seq_of(0, total + 1); }));
  EXPECT_EQ(seg->client(0).forwarded.load(), total);

  const int64_t t0 = monotonic_ns();
  fw.stop();
  EXPECT_LT(monotonic_ns() - t0, 2'000'000'000) << "stop() took too long";
  EXPECT_EQ(fw.dropped(), 0u);
  EXPECT_EQ(live_size(0), 0u);
}

TEST_F(ForwarderTest, FullPlainMailboxMakesItWaitAndLosesNothing) {
  attach_client(*seg, 0);
  Forwarder fw(*seg);
  const uint64_t total = 3 * kMailboxSlots;
  fw.start();
  for (uint64_t k = 1; k <= total; ++k) publish(*seg, result(seq_of(0, k), kRoutePlain), std::to_string(k));

  // The client reads its live mailbox (acks) and, now and then, its plain one.
  Collector live(*seg, seg->live_mailbox(0), seq_of(0, 1), true);
  Collector plain(*seg, seg->plain_mailbox(0), seq_of(0, 1), false);
  std::vector<uint64_t> seqs;
  const int64_t deadline = monotonic_ns() + 10'000'000'000;
  while ((seqs.size() < total || live.completed() < total) && monotonic_ns() < deadline) {
    live.drain(64, monotonic_ns() + 5'000'000, [](const ResultHeader&, const uint8_t*, uint32_t) {},
               [] { return false; });
    EXPECT_LE(live.completed(), seqs.size() + plain.ring().size());  // never an ack before its result
    plain.drain(
        3, 0, [&](const ResultHeader& h, const uint8_t*, uint32_t) { seqs.push_back(h.seq); },
        [] { return false; });
  }
  ASSERT_EQ(seqs.size(), total);
  for (uint64_t k = 1; k <= total; ++k) EXPECT_EQ(seqs[k - 1], seq_of(0, k));
  EXPECT_EQ(live.completed(), total);
  fw.stop();
  EXPECT_EQ(fw.dropped(), 0u);
  EXPECT_EQ(fw.forwarded(), total);
}

TEST_F(ForwarderTest, StopReturnsPromptlyWhileAMailboxStaysFull) {
  attach_client(*seg, 0);
  Forwarder fw(*seg);
  const uint64_t extra = 10;
  for (uint64_t k = 1; k <= kMailboxSlots + extra; ++k) publish(*seg, result(seq_of(0, k)));
  fw.start();
  ASSERT_TRUE(eventually([&] { return live_size(0) == kMailboxSlots; }));
  std::this_thread::sleep_for(std::chrono::milliseconds(20));  // let it block on the full mailbox
  const int64_t t0 = monotonic_ns();
  fw.stop();
  EXPECT_LT(monotonic_ns() - t0, 2'000'000'000) << "stop() took too long";
  // What did not fit is given up (stop() does not wait for a mailbox) and counted; the
  // batch stays in the result ring for the next forwarder.
  EXPECT_EQ(fw.dropped(), extra);
  EXPECT_EQ(live_size(0), kMailboxSlots);
  EXPECT_EQ(seg->results().size(), kMailboxSlots + extra);
}

// A batch stop() could not put in a full mailbox whole is neither counted as forwarded nor
// complete, and its blocks stay its own: it is still in the result ring, and the next
// forwarder delivers what was missing once (the rest it replays, and the client drops
// those copies).
TEST_F(ForwarderTest, ResultsGivenUpAtStopWaitInTheRingForTheNextForwarder) {
  attach_client(*seg, 0);
  Forwarder fw(*seg);
  const uint64_t extra = 10;
  for (uint64_t k = 1; k <= kMailboxSlots + extra; ++k) {
    publish(*seg, with_value(result(seq_of(0, k)), 256));
  }
  fw.start();
  ASSERT_TRUE(eventually([&] { return live_size(0) == kMailboxSlots; }));
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  fw.stop();
  EXPECT_EQ(fw.dropped(), extra);
  EXPECT_EQ(fw.forwarded(), 0u);
  EXPECT_EQ(seg->client(0).forwarded.load(), 0u);
  EXPECT_EQ(seg->client(0).complete_below.load(), seq_of(0, 1));  // as the segment began
  // The client reads its mailbox; then a new forwarder takes over.
  Collector live(*seg, seg->live_mailbox(0), seq_of(0, 1), /*track=*/true);
  std::vector<uint64_t> seqs;
  auto sink = [&](const ResultHeader& h, const uint8_t*, uint32_t) { seqs.push_back(h.seq); };
  live.drain(1000, 0, sink, [] { return false; });
  EXPECT_EQ(seqs.size(), kMailboxSlots);
  Forwarder next(*seg);  // (the replayed batch is larger than the mailbox: its thread waits)
  next.start();
  EXPECT_TRUE(eventually([&] {
    live.drain(1000, 0, sink, [] { return false; });
    return seqs.size() >= kMailboxSlots + extra && seg->results().size() == 0;
  }));
  next.stop();
  live.drain(1000, 0, sink, [] { return false; });
  ASSERT_EQ(seqs.size(), kMailboxSlots + extra);
  for (uint64_t k = 1; k <= kMailboxSlots + extra; ++k) EXPECT_EQ(seqs[k - 1], seq_of(0, k));
  EXPECT_EQ(seg->results().size(), 0u);
  EXPECT_EQ(seg->pool().used_bytes(), 0u);  // each value freed once, by the client
}

// ---- the client record ---------------------------------------------------------------------

TEST_F(ForwarderTest, ClientRecordCompleteBelowAndForwardedFollowTheForwarding) {
  Forwarder fw(*seg);
  ClientRecord& r = seg->client(0);
  EXPECT_EQ(r.complete_below.load(), seq_of(0, 1));
  EXPECT_EQ(r.forwarded.load(), 0u);

  publish(*seg, result(seq_of(0, 1)));
  publish(*seg, result(seq_of(0, 2), kRoutePlain));
  publish(*seg, result(seq_of(0, 4)));  // out of order: 3 is still running
  EXPECT_EQ(fw.pump(0), 3u);
  EXPECT_EQ(r.complete_below.load(), seq_of(0, 3));
  EXPECT_EQ(r.forwarded.load(), 3u);  // a plain result counts once (its ack is no result)

  publish(*seg, result(seq_of(0, 3)));
  EXPECT_EQ(fw.pump(0), 1u);
  EXPECT_EQ(r.complete_below.load(), seq_of(0, 5));
  EXPECT_EQ(r.forwarded.load(), 4u);

  publish(*seg, result(seq_of(0, 2)));  // a duplicate changes nothing
  EXPECT_EQ(fw.pump(0), 1u);
  EXPECT_EQ(r.complete_below.load(), seq_of(0, 5));
  EXPECT_EQ(r.forwarded.load(), 4u);

  // Results far ahead of the first incomplete seq (more than one bitmap word, and past the
  // window's initial size) leave complete_below at that seq until it comes.
  auto forward = [&](uint64_t k) {
    publish(*seg, result(seq_of(0, k)));
    EXPECT_EQ(fw.pump(0), 1u);
    take_all(seg->live_mailbox(0));  // the client keeps up
  };
  forward(5 + 10'000);
  for (uint64_t k = 200; k > 5; --k) forward(k);
  EXPECT_EQ(r.complete_below.load(), seq_of(0, 5));
  EXPECT_EQ(r.forwarded.load(), 4u + 1 + 195);
  forward(5);
  EXPECT_EQ(r.complete_below.load(), seq_of(0, 201));
  EXPECT_EQ(fw.forwarded(), r.forwarded.load());

  // Other clients' records are untouched.
  for (uint32_t c = 1; c < kClients; ++c) {
    EXPECT_EQ(seg->client(c).complete_below.load(), seq_of(c, 1)) << c;
    EXPECT_EQ(seg->client(c).forwarded.load(), 0u) << c;
  }
}

TEST_F(ForwarderTest, NewForwarderStartsFromTheRecordedCompletionPoint) {
  {
    Forwarder first(*seg);
    for (uint64_t k = 1; k <= 3; ++k) publish(*seg, result(seq_of(1, k)));
    EXPECT_EQ(first.pump(0), 3u);
  }
  EXPECT_EQ(seg->client(1).complete_below.load(), seq_of(1, 4));
  take_all(seg->live_mailbox(1));

  // A supervisor that took the pool over: a result of a task the first one forwarded (it
  // ran again) is a duplicate; the next one goes through.
  Forwarder second(*seg);
  const uint64_t dup_value = pooled(500);
  publish(*seg, with_value(result(seq_of(1, 2)), 500, dup_value));
  publish(*seg, result(seq_of(1, 4)));
  EXPECT_EQ(second.pump(0), 2u);
  EXPECT_EQ(second.forwarded(), 1u);
  EXPECT_EQ(seg->pool().used_bytes(), 0u);
  std::vector<Record> got = take_all(seg->live_mailbox(1));
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got[0].h.seq, seq_of(1, 4));
  EXPECT_EQ(seg->client(1).complete_below.load(), seq_of(1, 5));
  EXPECT_EQ(seg->client(1).forwarded.load(), 4u);
}

// ---- Producer(seg, client) -----------------------------------------------------------------

TaskDraft draft(std::vector<uint8_t>& slot) {
  TaskDraft d;
  d.slot = slot.data();
  d.slot_used = 8;
  return d;
}

TEST_F(ForwarderTest, ClientProducersTakeSeqsFromTheClientRecordInTurn) {
  std::vector<uint8_t> slot(32, 0);
  uint64_t last = 0;
  {
    Producer p(*seg, 0);
    EXPECT_EQ(p.first_seq(), seq_of(0, 1));
    EXPECT_EQ(p.submitted(), 0u);
    EXPECT_EQ(p.last_seq(), p.first_seq() - 1);
    p.start_feeding();  // empty backlog: straight to the ring
    for (uint64_t k = 1; k <= 3; ++k) {
      TaskDraft d = draft(slot);
      ASSERT_EQ(p.submit(d, false, -1), PushOutcome::kRing);
      EXPECT_EQ(d.header.seq, seq_of(0, k));
      EXPECT_EQ(client_of_seq(d.header.seq), 0);
    }
    EXPECT_EQ(p.submitted(), 3u);
    EXPECT_EQ(p.last_seq(), seq_of(0, 3));
    EXPECT_EQ(seg->client(0).next_seq.load(), seq_of(0, 4));
    last = p.last_seq();
  }

  // The next handle on the record carries on where the first stopped.
  Producer q(*seg, 0);
  EXPECT_EQ(q.first_seq(), last + 1);
  EXPECT_EQ(q.submitted(), 0u);
  TaskDraft d = draft(slot);  // before feeding starts: to the backlog, numbered all the same
  ASSERT_EQ(q.submit(d, false, -1), PushOutcome::kBacklog);
  EXPECT_EQ(d.header.seq, last + 1);
  EXPECT_EQ(q.submitted(), 1u);
  EXPECT_EQ(q.last_seq(), last + 1);

  // Another client's producer has its own space.
  Producer other(*seg, 2);
  EXPECT_EQ(other.first_seq(), seq_of(2, 1));
  other.start_feeding();
  TaskDraft e = draft(slot);
  ASSERT_EQ(other.submit(e, false, -1), PushOutcome::kRing);
  EXPECT_EQ(e.header.seq, seq_of(2, 1));
  EXPECT_EQ(client_of_seq(e.header.seq), 2);
  EXPECT_EQ(seg->client(0).next_seq.load(), last + 2);

  // The tasks in the ring carry those seqs.
  std::vector<uint64_t> in_ring;
  seg->tasks().claim_range(64, nullptr, [&](uint32_t, const uint8_t* body) {
    TaskHeader h;
    std::memcpy(&h, body, sizeof h);
    in_ring.push_back(h.seq);
  });
  EXPECT_EQ(in_ring, (std::vector<uint64_t>{seq_of(0, 1), seq_of(0, 2), seq_of(0, 3), seq_of(2, 1)}));

  EXPECT_THROW({ Producer bad(*seg, kClients); }, std::invalid_argument);
}

// ---- the forwarder's own death ---------------------------------------------------------------

// A forwarder killed at each step of a batch (in a child process, by the fault switch):
// the next forwarder makes the client's mailboxes whole, every result reaches the client
// exactly once (replayed copies of what it had are dropped), and every block is freed once.
struct DeathPoint {
  FaultStep step;
  uint32_t countdown;
};

class ForwarderDeathTest : public ForwarderTest, public ::testing::WithParamInterface<DeathPoint> {};

TEST_P(ForwarderDeathTest, TheNextForwarderDeliversEachResultOnceAndFreesEachBlockOnce) {
  attach_client(*seg, 0);
  constexpr uint64_t kResults = 6;  // 3 plain, 3 future: 6 records in the live mailbox, 3 plain
  for (uint64_t k = 1; k <= kResults; ++k) {
    ResultHeader h = with_value(result(seq_of(0, k), k % 2 ? kRoutePlain : kRouteFuture), 100);
    h.arg_len = 64;
    h.arg_ref = pooled(64, ArgPool::kArgTag);
    publish(*seg, h);
  }
  const pid_t child = fork();
  if (child == 0) {
    seg->header().fault_countdown.store(GetParam().countdown);
    seg->header().fault_step.store(static_cast<uint32_t>(GetParam().step));
    Forwarder dying(*seg);
    dying.pump(0);
    _exit(0);  // the fault did not fire
  }
  int status = 0;
  ASSERT_EQ(waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL) << "the forwarder did not die";
  EXPECT_EQ(seg->results().size(), kResults);  // the batch is still in the ring

  Collector live(*seg, seg->live_mailbox(0), seq_of(0, 1), /*track=*/true);
  Collector plain(*seg, seg->plain_mailbox(0), seq_of(0, 1), /*track=*/false);
  std::vector<uint64_t> got;
  auto sink = [&](const ResultHeader& h, const uint8_t*, uint32_t) { got.push_back(h.seq); };
  auto read = [&] {
    plain.drain(100, 0, sink, [] { return false; });
    live.drain(100, 0, sink, [] { return false; });
  };
  read();  // what the dead one put in (before the new one replays it)
  Forwarder next(*seg);  // (its thread: the void fillers take room until the client reads on)
  next.start();
  EXPECT_TRUE(eventually([&] {
    read();
    return got.size() >= kResults && seg->results().size() == 0;
  }));
  next.stop();
  read();
  std::sort(got.begin(), got.end());
  std::vector<uint64_t> want;
  for (uint64_t k = 1; k <= kResults; ++k) want.push_back(seq_of(0, k));
  EXPECT_EQ(got, want);
  EXPECT_EQ(live.first_incomplete(), seq_of(0, kResults + 1));
  EXPECT_EQ(seg->results().size(), 0u);
  EXPECT_EQ(live_size(0), 0u);
  EXPECT_EQ(plain_size(0), 0u);
  EXPECT_EQ(seg->pool().used_bytes(), 0u);  // arguments by the forwarder, values by the client
}

INSTANTIATE_TEST_SUITE_P(Steps, ForwarderDeathTest,
                         ::testing::Values(DeathPoint{FaultStep::kForwarderRead, 1},
                                           DeathPoint{FaultStep::kForwarderMidPush, 1},
                                           DeathPoint{FaultStep::kForwarderMidPush, 2},
                                           DeathPoint{FaultStep::kForwarderPushed, 1}),
                         [](const ::testing::TestParamInfo<DeathPoint>& p) {
                           return std::string(p.param.step == FaultStep::kForwarderRead     ? "AfterRead"
                                              : p.param.step == FaultStep::kForwarderPushed ? "AfterPush"
                                              : p.param.countdown == 1                      ? "MidFirstPush"
                                                                                            : "MidSecondPush");
                         });

}  // namespace
}  // namespace mpop

