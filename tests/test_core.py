"""The raw bindings of mpop._core, tested in one place (the public API is tested elsewhere):
Segment create/attach/remove and layout checks, Producer, Collector, the registry log and
queue_status."""

from __future__ import annotations

import os
import threading
import time
import uuid

import pytest

from mpop import TaskResult, _core
from mpop._slots import TaskSlot128, TaskSlot196_cargs, slot_layout
from mpop._pickling import pack_error
from _helpers import SHM, leak_check

QUEUE_STATUS_KEYS = {"capacity", "queued", "enqueued_total", "claimed_total", "results_pending",
                     "pool_bytes", "pool_used_bytes", "slot_stride"}


@pytest.fixture(autouse=True)
def _no_leaks():
    with leak_check():
        yield


def make_segment(queue_slots=64, slot=TaskSlot196_cargs, prefix="mpoptest", **kw):
    return _core.Segment.create(prefix, slot_layout(slot), queue_slots, 64, 2, 4, 1 << 16, 1 << 16, **kw)


@pytest.fixture
def seg():
    s = make_segment()
    yield s
    s.set_shutdown()
    s.leave()
    assert not (SHM / s.name).exists()


def wait_for(pred, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def add(a, b):
    return a + b


def boom(a, b):
    raise ValueError(f"boom {a}")


@pytest.fixture
def worker_thread(seg):
    """The native worker loop on a thread of this process, with a fixed handler table."""
    handlers = {0x1000: (add, None), 0x1001: (boom, None)}
    out = {}

    def loop():
        out["reason"] = _core.worker_loop(seg, 0, handlers.get, pack_error, TaskResult)

    t = threading.Thread(target=loop, daemon=True)
    yield t
    seg.set_shutdown()
    if t.is_alive() or t.ident is not None:
        t.join(20)
        assert not t.is_alive()
        assert out.get("reason") == "shutdown"


# -- Segment ----------------------------------------------------------------------------------


def test_layout_version():
    assert isinstance(_core.LAYOUT_VERSION, int) and _core.LAYOUT_VERSION >= 1
    assert issubclass(_core.LayoutMismatch, RuntimeError)


def test_segment_create_attach_leave():
    s = make_segment(queue_slots=128)
    try:
        assert s.name.startswith("mpoptest")
        assert (SHM / s.name).exists()
        assert s.queue_slots == 128 and s.max_workers == 2
        assert s.owner_pid == os.getpid()
        assert s.task_stride % 64 == 0 and s.task_stride >= 196
        assert s.size >= 128 * s.task_stride
        assert s.attached == 1
        assert s.shutdown is False
        other = _core.Segment.attach(s.name)
        assert other.name == s.name and other.queue_slots == 128 and other.task_stride == s.task_stride
        assert s.attached == 2
        assert other.leave() == 1
        assert (SHM / s.name).exists()  # the owner is still attached
        s.set_shutdown()
        assert s.shutdown is True
    finally:
        s.leave()
    assert not (SHM / s.name).exists()


def test_segment_names_are_unique():
    a, b = make_segment(), make_segment()
    try:
        assert a.name != b.name
    finally:
        a.leave()
        b.leave()


def test_stride_follows_the_slot_class():
    small = make_segment(slot=TaskSlot128)
    try:
        assert small.task_stride % 64 == 0 and small.task_stride >= 128
    finally:
        small.leave()


def test_segment_remove():
    s = make_segment()
    try:
        assert _core.Segment.remove(s.name) is True
        assert not (SHM / s.name).exists()
        assert _core.Segment.remove(s.name) is False
    finally:
        s.leave()


def test_attach_unknown_name_raises():
    with pytest.raises(RuntimeError):
        _core.Segment.attach(f"mpoptest_missing_{uuid.uuid4().hex}")


@pytest.mark.parametrize("size", [16, 1 << 16])
def test_attach_foreign_segment_raises_layout_mismatch(size):
    name = f"mpoptest_foreign_{uuid.uuid4().hex[:12]}"
    path = SHM / name
    path.write_bytes(b"\xab" * size)
    try:
        with pytest.raises(_core.LayoutMismatch, match=name):
            _core.Segment.attach(name)
        assert path.exists()  # a mismatched segment is refused, not removed
    finally:
        path.unlink()


def test_create_rejects_bad_queue_slots():
    with pytest.raises((ValueError, RuntimeError)):
        make_segment(queue_slots=100)


# -- registry log -----------------------------------------------------------------------------


def test_registry_round_trip(seg):
    assert seg.read_registry(0) == ([], 0)
    seg.write_registry(0x1234, b"abc")
    seg.write_registry(0x1235, b"")
    seg.write_registry(0xFFFFFFFF, bytes(range(256)))
    entries, offset = seg.read_registry(0)
    assert entries == [(0x1234, b"abc"), (0x1235, b""), (0xFFFFFFFF, bytes(range(256)))]
    assert seg.read_registry(offset) == ([], offset)
    # Reading on from an offset sees only what came after it.
    seg.write_registry(0x2000, b"later")
    assert seg.read_registry(offset) == ([(0x2000, b"later")], offset + 8 + 5)
    # Another attachment reads the same log.
    other = _core.Segment.attach(seg.name)
    try:
        assert other.read_registry(0)[0][-1] == (0x2000, b"later")
    finally:
        other.leave()


def test_registry_full_raises(seg):
    with pytest.raises(ValueError, match="registry"):
        seg.write_registry(0x1000, b"x" * (1 << 17))


# -- Producer ---------------------------------------------------------------------------------


def test_queue_status_keys(seg):
    q = seg.queue_status()
    assert QUEUE_STATUS_KEYS <= set(q)
    assert q["capacity"] == 64 and q["queued"] == 0 and q["slot_stride"] == seg.task_stride
    assert q["pool_bytes"] >= 1 << 16 and q["pool_used_bytes"] == 0


def test_producer_enqueue_returns_increasing_seqs(seg):
    p = _core.Producer(seg)
    seqs = [p.enqueue(0x1000, i, (i, 1)) for i in range(5)]
    assert seqs == sorted(seqs) and len(set(seqs)) == 5 and seqs[0] >= 1
    assert p.submitted == 5
    # Before feeding starts everything waits in the backlog, none in the ring.
    assert p.backlog == 5 and seg.queue_status()["queued"] == 0
    p.start_feeding()
    assert wait_for(lambda: p.backlog == 0 and seg.queue_status()["queued"] == 5)
    assert seg.queue_status()["enqueued_total"] == 5
    more = p.enqueue(0x1000, 9, ("text", b"bytes", 1.5))  # non-int arguments travel encoded
    assert more > seqs[-1]
    p.close()


def test_producer_backlog_never_fills_before_feeding(seg):
    p = _core.Producer(seg)
    seqs = [p.enqueue(0x1000, i, (i, 0), blocking=False) for i in range(500)]  # ring holds 64
    assert all(seqs) and p.backlog == 500
    cancelled = p.cancel_queued()
    assert [c[0] for c in cancelled] == seqs
    assert [c[1] for c in cancelled] == list(range(500))
    assert {c[2] for c in cancelled} == {0x1000}
    assert p.backlog == 0
    p.close()


def test_producer_full_ring_nonblocking_and_timeout(seg):
    p = _core.Producer(seg)
    p.start_feeding()
    for i in range(64):
        assert p.enqueue(0x1000, i, (i, 0), blocking=False)
    assert wait_for(lambda: seg.queue_status()["queued"] == 64)
    assert p.enqueue(0x1000, 99, (0, 0), blocking=False) == 0
    assert p.enqueue(0x1000, 99, (0, 0), blocking=True, timeout=0.05) == 0
    cancelled = p.cancel_queued()
    assert len(cancelled) == 64 and seg.queue_status()["queued"] == 0
    assert p.enqueue(0x1000, 100, (0, 0), blocking=False) > 0
    p.close()


def test_producer_closed_raises(seg):
    p = _core.Producer(seg)
    p.close()
    assert p.closed
    with pytest.raises(RuntimeError):
        p.enqueue(0x1000, 0, (1, 2))


def test_producer_oversized_c_args(seg):
    p = _core.Producer(seg)
    try:
        with pytest.raises(ValueError):
            p.enqueue(0x1000, 0, (1,), c_args=b"x" * 1000)
    finally:
        p.close()


# -- Collector --------------------------------------------------------------------------------


def test_collector_drain_empty(seg):
    c = _core.Collector(seg)
    assert c.drain(10, 0) == []
    assert c.drain(10, 0.01) == []


def test_collector_interrupt_wakes_waiting_drain(seg):
    c = _core.Collector(seg)
    got = {}
    t = threading.Thread(target=lambda: got.setdefault("batch", c.drain(10, None)), daemon=True)
    t.start()
    time.sleep(0.1)
    c.interrupt()
    t.join(20)
    assert not t.is_alive() and got["batch"] == []


def test_producer_to_collector_through_a_worker_loop(seg, worker_thread):
    p = _core.Producer(seg)
    c = _core.Collector(seg)
    seqs = [p.enqueue(0x1000, 100 + i, (i, 10)) for i in range(6)]
    bad = p.enqueue(0x1001, 7, (3, 0))
    p.start_feeding()
    worker_thread.start()
    records = []
    deadline = time.monotonic() + 30
    while len(records) < 7 and time.monotonic() < deadline:
        records += c.drain(100, 0.2)
    by_seq = {r.seq: r for r in records}
    assert set(by_seq) == set(seqs) | {bad}
    for i, s in enumerate(seqs):
        r = by_seq[s]
        assert (r.tsk_id, r.fn_id, r.worker_id, r.attempts, r.status, r.value, r.route) == \
            (100 + i, 0x1000, 0, 1, _core.RESULT_STATUS["OK"], i + 10, _core.ROUTE_PLAIN)
        assert r.queue_wait_s >= 0 and r.run_time_s >= 0
        assert c.is_complete(s)
    err = by_seq[bad]
    assert err.status == _core.RESULT_STATUS["ERROR"] and isinstance(err.value, bytes)  # the pickled error
    assert c.drain(10, 0) == []
    w = seg.worker_status(0)
    assert w["completed"] == 6 and w["failed"] == 1
    p.close()


def test_the_stub_names_everything_the_native_module_has():
    # python/mpop/_core.pyi is what editors and type checkers see of the native module.
    import ast
    from pathlib import Path

    stub = ast.parse((Path(_core.__file__).parent / "_core.pyi").read_text())
    declared: dict[str, set] = {}
    for node in stub.body:
        if isinstance(node, ast.ClassDef):
            declared[node.name] = {n.name if isinstance(n, ast.FunctionDef) else n.target.id
                                   for n in node.body if isinstance(n, (ast.FunctionDef, ast.AnnAssign))}
        elif isinstance(node, ast.FunctionDef):
            declared[node.name] = set()
        elif isinstance(node, ast.AnnAssign):
            declared[node.target.id] = set()
    native = {n for n in dir(_core) if not n.startswith("__")}
    assert native == set(declared), (native ^ set(declared))
    for name in native:
        obj = getattr(_core, name)
        if isinstance(obj, type) and not issubclass(obj, BaseException) and name != "ResultRecord":
            members = {m for m in vars(obj) if not m.startswith("__") and m != "_pybind11_conduit_v1_"}
            assert members <= declared[name], (name, members - declared[name])
