"""enqueue / enqueue_many: naming the handler, arguments, tsk_id and seq, the backlog before
run(), a full ring while running, several producer threads, and argument/result types."""

import copy
import dataclasses
import enum
import fractions
import math
import os
import threading
import time
from collections import OrderedDict

import pytest

import mpop
from _helpers import app_factory, app_fixture, no_leaks_fixture

PREFIX = f"mpop-enq{os.getpid()}"
TIMEOUT = 300  # a safety net against hangs, never a performance expectation


no_leaks = no_leaks_fixture(PREFIX)
make_app = app_factory(PREFIX)
app = app_fixture(make_app)


def _poll(cond, what):
    """Waits for a condition another process brings about (safety limit only)."""
    deadline = time.monotonic() + TIMEOUT
    while not cond():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.005)


# -- handlers (module level: importable in workers) ------------------------------------------

def add(a, b=0, *, c=0):
    return a + b + c


def echo(x):
    return x


def _types_of(v):
    """v's type names, nested through lists and tuples."""
    if isinstance(v, (list, tuple)):
        return (type(v).__name__, [_types_of(x) for x in v])
    return type(v).__name__


def echo_nested_types(x):
    return _types_of(x)


def echo_typed(x):
    return (type(x).__name__, x)


def echo_all(*args, **kwargs):
    return (args, kwargs)


def size_of(i, blob):
    return (i, len(blob))


def make_bytes(n):
    return bytes(i % 251 for i in range(n))


def make_str(n):
    return "".join(chr(0x41 + i % 26) if i % 3 else "é" for i in range(n))


def wait_for_file(path, value=None):
    while not os.path.exists(path):
        time.sleep(0.005)
    return value


@dataclasses.dataclass
class Point:
    x: int
    y: float
    label: str = ""


class Color(enum.Enum):
    RED = 1
    GREEN = 2


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


class Tagged:
    def __init__(self, tag, payload):
        self.tag = tag
        self.payload = payload

    def __eq__(self, other):
        return type(other) is Tagged and (self.tag, self.payload) == (other.tag, other.payload)


def make_value(kind):
    """Values built inside the worker, to check result types."""
    return {
        "int": 7,
        "neg": -7,
        "big": 2**64 + 1,
        "negbig": -(2**100),
        "float": 2.5,
        "inf": float("inf"),
        "true": True,
        "false": False,
        "none": None,
        "str": "hé ✓ 日本",
        "bigstr": "x" * (1 << 20),
        "bytes": b"\x00\x01\xff",
        "bigbytes": bytes(range(256)) * (4 << 12),
        "tuple": (1, "a", (2.0, None)),
        "list": [1, [2, [3]]],
        "dict": {"a": 1, 2: [3]},
        "set": {1, 2, 3},
        "point": Point(1, 2.0, "p"),
        "tagged": Tagged("t", {"k": (1, 2)}),
        "level": Level.HIGH,
        "color": Color.GREEN,
        "fraction": fractions.Fraction(1, 3),
        "bytearray": bytearray(b"abc"),
        "surrogate": os.fsdecode(b"caf\xe9.txt"),
    }[kind]


# -- naming the handler ------------------------------------------------------------------------

def test_enqueue_by_function_with_positional_args(app):
    assert app.enqueue(add, args=(1, 2)) is True
    assert app.enqueue(add, args=[3, 4]) is True  # any iterable
    assert app.enqueue(add, args=(5,)) is True
    assert app.run(timeout=TIMEOUT).values() == [3, 7, 5]


def test_enqueue_with_kwargs_dict(app):
    app.enqueue(add, args=(1,), kwargs={"b": 10, "c": 100})
    app.enqueue(add, kwargs={"a": 2, "b": 3})
    assert app.run(timeout=TIMEOUT).values() == [111, 5]


def test_enqueue_with_handler_keyword_arguments(app):
    app.enqueue(add, args=(1,), b=20)
    app.enqueue(add, args=(1,), c=300)
    app.enqueue(add, a=4, b=5, c=6)
    app.enqueue(add, args=(1,), kwargs={"b": 2}, c=3)  # both forms combine
    assert app.run(timeout=TIMEOUT).values() == [21, 301, 15, 6]


def test_enqueue_by_fn_id_keyword(app):
    fid = app.register(add, fn_id=0xB000)
    app.enqueue(fn_id=fid, args=(2, 3))
    app.enqueue(fn_id=0xB000, args=(4,), b=1)
    res = app.run(timeout=TIMEOUT)
    assert res.values() == [5, 5]
    assert {r.fn_id for r in res.results} == {0xB000}


def test_enqueue_by_fn_id_positional(app):
    app.register(add, fn_id=0xB000)
    app.enqueue(0xB000, args=(2, 3))
    assert app.run(timeout=TIMEOUT).values() == [5]


def test_enqueue_by_proc_task_fn_id(app):
    P = mpop.ProcTaskFnID
    app.enqueue(P.INCREMENT, args=(1,))
    app.enqueue(fn_id=P.ADD, args=(1, 2))
    app.enqueue(P.MULTIPLY, args=(3, 4))
    app.enqueue(P.INCREMENT, args=(1,), step=9)
    res = app.run(timeout=TIMEOUT)
    assert res.values() == [2, 3, 12, 10]
    assert [r.fn_id for r in res.results] == [int(P.INCREMENT), int(P.ADD), int(P.MULTIPLY), int(P.INCREMENT)]


def test_enqueue_fn_and_fn_id_together_is_an_error(app):
    app.register(add, fn_id=0xB000)
    with pytest.raises(TypeError):
        app.enqueue(add, fn_id=0xB000, args=(1,))


def test_enqueue_without_handler_is_an_error(app):
    with pytest.raises(TypeError):
        app.enqueue(args=(1,))


# -- tsk_id and seq ----------------------------------------------------------------------------

def test_default_tsk_id_is_an_increasing_counter(app):
    for i in range(10):
        app.enqueue(echo, args=(i,))
    res = app.run(timeout=TIMEOUT)
    tsk_ids = [r.tsk_id for r in res.results]
    assert tsk_ids == sorted(tsk_ids)
    assert len(set(tsk_ids)) == 10
    assert tsk_ids == list(range(tsk_ids[0], tsk_ids[0] + 10))
    assert res.values() == list(range(10))


def test_explicit_tsk_id_is_carried_and_seq_is_unique(app):
    labels = [500, 7, 7, 0, 2**32 - 1, 7]
    for i, t in enumerate(labels):
        app.enqueue(echo, args=(i,), tsk_id=t)
    res = app.run(timeout=TIMEOUT)
    assert [r.tsk_id for r in res.results] == labels  # enqueue order, labels as given
    assert res.values() == list(range(len(labels)))
    seqs = [r.seq for r in res.results]
    assert all(isinstance(s, int) for s in seqs)
    assert len(set(seqs)) == len(seqs)
    assert seqs == sorted(seqs)
    assert res.by_tsk_id[500].value == 0
    assert res.by_tsk_id[0].value == 3


def test_default_and_explicit_tsk_ids_mix(app):
    app.enqueue(echo, args=("a",))
    app.enqueue(echo, args=("b",), tsk_id=1000)
    app.enqueue(echo, args=("c",))
    res = app.run(timeout=TIMEOUT)
    assert res.results[1].tsk_id == 1000
    assert res.results[0].tsk_id != res.results[2].tsk_id
    assert res.values() == ["a", "b", "c"]


def test_seq_stays_unique_across_runs(app):
    for i in range(5):
        app.enqueue(echo, args=(i,))
    first = app.run(timeout=TIMEOUT)
    for i in range(5):
        app.enqueue(echo, args=(i,))
    second = app.run(timeout=TIMEOUT)
    seqs = [r.seq for r in first.results + second.results]
    assert len(set(seqs)) == 10
    assert len(second) == 5  # the second run returns only its own tasks


@pytest.mark.parametrize("bad", [-1, 2**32, 1.0, "3"])
def test_bad_tsk_id(app, bad):
    with pytest.raises((ValueError, TypeError)):
        app.enqueue(echo, args=(1,), tsk_id=bad)


# -- the backlog before run() ------------------------------------------------------------------

def test_backlog_before_run_never_blocks_and_keeps_order():
    n = 5000
    with make_app(workers=2, queue_slots=64) as app:
        for i in range(n):
            # blocking=False would return False if the call had to wait for room
            assert app.enqueue(add, args=(i, 1), blocking=False) is True
        q = app.status()["queue"]
        assert q["submitted"] == n
        assert q["backlog"] + q["queued"] == n
        res = app.run(timeout=TIMEOUT)
    assert len(res) == n
    assert res.exit_code == 0
    assert res.values() == [i + 1 for i in range(n)]
    seqs = [r.seq for r in res.results]
    assert seqs == sorted(seqs)


def test_backlog_with_timeout_zero_never_raises():
    with make_app(queue_slots=2) as app:
        for i in range(100):
            assert app.enqueue(echo, args=(i,), timeout=0) is True
        assert app.run(timeout=TIMEOUT).values() == list(range(100))


def test_backlog_of_pooled_arguments():
    blob = b"z" * 4096  # does not fit a slot: travels through the argument pool
    with make_app(queue_slots=4) as app:
        for i in range(300):
            app.enqueue(echo_all, args=(i, blob), blocking=False)
        res = app.run(timeout=TIMEOUT)
    assert [v[0][0] for v in res.values()] == list(range(300))
    assert all(v[0][1] == blob for v in res.values())


def test_1_800_000_increment_tasks_before_run():
    n = 1_800_000
    inc = mpop.ProcTaskFnID.INCREMENT
    with make_app(workers=2) as app:
        for i in range(n):
            app.enqueue(inc, args=(i,))
        res = app.run(timeout=TIMEOUT)
        assert len(res) == n
        assert res.exit_code == 0
        bad = [k for k, r in enumerate(res.results) if r.value != k + 1]
        assert bad == [], f"{len(bad)} wrong values, first at index {bad[0]}"
        assert len({r.seq for r in res.results}) == n


# -- a full ring while running -----------------------------------------------------------------

def _fill_ring(app, path):
    """With one worker stuck on a task, fills the ring; returns how many enqueues fit."""
    app.start()
    app.enqueue(wait_for_file, args=(path,))
    _poll(lambda: app.status()["queue"]["claimed_total"] >= 1, "the worker to claim the first task")
    fitted = 0
    while app.enqueue(wait_for_file, args=(path, fitted), blocking=False):
        fitted += 1
        assert fitted <= 64, "the ring never filled up"
    return fitted


def test_full_ring_non_blocking_returns_false(tmp_path):
    flag = tmp_path / "go"
    with make_app(queue_slots=2, worker_batch_size=1, auto_terminate=False) as app:
        fitted = _fill_ring(app, str(flag))
        assert fitted == 2
        assert app.enqueue(wait_for_file, args=(str(flag),), blocking=False) is False
        flag.touch()
        res = app.run(timeout=TIMEOUT)
        # the refused task was not queued: 1 + fitted tasks ran, each exactly once
        assert len(res) == 1 + fitted
        assert res.values() == [None, 0, 1]


def test_full_ring_blocking_with_timeout_raises_queue_full(tmp_path):
    flag = tmp_path / "go"
    with make_app(queue_slots=2, worker_batch_size=1, auto_terminate=False) as app:
        _fill_ring(app, str(flag))
        with pytest.raises(mpop.QueueFull) as info:
            app.enqueue(wait_for_file, args=(str(flag),), timeout=0.05)
        assert isinstance(info.value, mpop.MpopError)
        with pytest.raises(mpop.QueueFull):
            app.enqueue(wait_for_file, args=(str(flag),), timeout=0)
        flag.touch()
        res = app.run(timeout=TIMEOUT)
        assert len(res) == 3


def test_full_ring_blocking_enqueue_waits_for_room(tmp_path):
    flag = tmp_path / "go"
    with make_app(queue_slots=2, worker_batch_size=1, auto_terminate=False) as app:
        fitted = _fill_ring(app, str(flag))
        outcome = []

        def producer():
            try:
                outcome.append(app.enqueue(wait_for_file, args=(str(flag), "late")))
            except BaseException as e:  # pragma: no cover - reported below
                outcome.append(e)

        t = threading.Thread(target=producer)
        t.start()
        t.join(0.3)
        assert t.is_alive() and outcome == [], "a full ring must block the caller"
        flag.touch()
        t.join(TIMEOUT)
        assert outcome == [True]
        res = app.run(timeout=TIMEOUT)
        assert len(res) == 2 + fitted
        assert res.values()[-1] == "late"


@pytest.fixture
def ctrl_c_as_in_a_terminal():
    """SIGINT raises KeyboardInterrupt, even when the suite was started in the background (a
    shell starts background jobs with SIGINT ignored, and Python then keeps it ignored)."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_blocked_enqueue_is_interruptible_by_ctrl_c(tmp_path, ctrl_c_as_in_a_terminal):
    import signal

    flag = tmp_path / "go"
    with make_app(queue_slots=2, worker_batch_size=1, auto_terminate=False) as app:
        _fill_ring(app, str(flag))
        ctrl_c = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))
        safety = threading.Timer(5, flag.touch)  # makes room in any case, so the test ends
        caught = False
        ring_was_full = None
        ctrl_c.start()
        safety.start()
        try:
            try:
                app.enqueue(wait_for_file, args=(str(flag),))  # the ring is full: blocks
            finally:
                ring_was_full = not flag.exists()
            for _ in range(100):  # let a pending KeyboardInterrupt fire inside this block
                time.sleep(0.001)
        except KeyboardInterrupt:
            caught = True
        finally:
            ctrl_c.join()
            safety.cancel()
            flag.touch()
        assert caught
        assert ring_was_full, "Ctrl-C was only seen once the ring had room again"
        app.run(timeout=TIMEOUT)


# -- enqueue_many ------------------------------------------------------------------------------

def test_enqueue_many_tuples_and_dicts(app):
    fid = app.register(add, fn_id=0xB000)
    tasks = [
        (add, 1, 2),
        (fid, 3, 4),
        (mpop.ProcTaskFnID.MULTIPLY, 5, 6),
        (echo, "x"),
        {"fn": add, "args": (10,), "kwargs": {"b": 1}},
        {"fn": add, "args": (10,), "c": 5},
        {"fn_id": fid, "args": (100, 1)},
        {"fn_id": int(mpop.ProcTaskFnID.INCREMENT), "args": (7,)},
        {"fn": echo, "args": (None,), "tsk_id": 999},
    ]
    snapshot = copy.deepcopy(tasks)
    assert app.enqueue_many(tasks) == len(tasks)
    assert tasks == snapshot
    for a, b in zip(tasks, snapshot):
        assert type(a) is type(b)
    res = app.run(timeout=TIMEOUT)
    assert res.values() == [3, 7, 30, "x", 11, 15, 101, 8, None]
    assert res.results[-1].tsk_id == 999


def test_enqueue_many_accepts_a_generator(app):
    n = app.enqueue_many((add, i, i) for i in range(50))
    assert n == 50
    assert app.run(timeout=TIMEOUT).values() == [2 * i for i in range(50)]


def test_enqueue_many_does_not_mutate_nested_args(app):
    kwargs = {"b": 2}
    args = (1,)
    task = {"fn": add, "args": args, "kwargs": kwargs}
    app.enqueue_many([task, task])
    assert task == {"fn": add, "args": (1,), "kwargs": {"b": 2}}
    assert task["kwargs"] is kwargs and kwargs == {"b": 2}
    assert app.run(timeout=TIMEOUT).values() == [3, 3]


def test_enqueue_many_rejects_other_items(app):
    with pytest.raises(TypeError):
        app.enqueue_many([42])


# -- several producer threads ------------------------------------------------------------------

THREADS, PER_THREAD = 4, 2000


def _produce_from_threads(app, timeout=None):
    """Four threads enqueue PER_THREAD tasks each at once, labelled 0..N-1; returns errors."""
    barrier = threading.Barrier(THREADS)
    errors = []

    def produce(k):
        try:
            barrier.wait()
            for i in range(PER_THREAD):
                label = k * PER_THREAD + i
                app.enqueue(add, args=(label, 0), tsk_id=label, timeout=timeout)
        except BaseException as e:  # reported by the caller
            errors.append(e)

    threads = [threading.Thread(target=produce, args=(k,)) for k in range(THREADS)]
    for t in threads:
        t.start()
    return threads, errors


def _check_threaded_results(results):
    total = THREADS * PER_THREAD
    assert len(results) == total
    labels = [r.tsk_id for r in results]
    assert sorted(labels) == list(range(total)), "each task must arrive exactly once"
    assert all(r.success and r.value == r.tsk_id for r in results)
    assert len({r.seq for r in results}) == total
    # each producer's tasks keep their order (results are in enqueue order)
    by_seq = [r.tsk_id for r in sorted(results, key=lambda r: r.seq)]
    for k in range(THREADS):
        mine = [t for t in by_seq if k * PER_THREAD <= t < (k + 1) * PER_THREAD]
        assert mine == sorted(mine)


def test_enqueue_from_several_threads_before_start():
    with make_app(workers=2, queue_slots=64) as app:
        app.register(add)
        threads, errors = _produce_from_threads(app)
        for t in threads:
            t.join()
        assert errors == []
        res = app.run(timeout=TIMEOUT)
    _check_threaded_results(res.results)


def test_enqueue_from_several_threads_while_collecting():
    total = THREADS * PER_THREAD
    with make_app(workers=2, queue_slots=64, auto_terminate=False) as app:
        app.register(add)
        app.start()
        threads, errors = _produce_from_threads(app)
        got = []
        deadline = time.monotonic() + TIMEOUT
        while len(got) < total and not errors and time.monotonic() < deadline:
            got.extend(app.results(timeout=TIMEOUT))
        for t in threads:
            t.join()
        assert errors == []
    _check_threaded_results(got)


def test_enqueue_from_several_threads_while_running_then_run():
    # Producers fill the ring faster than one run() call collects; a blocking enqueue must
    # still make progress while the workers are running (nobody is inside run() yet).
    with make_app(workers=2, queue_slots=64, auto_terminate=False) as app:
        app.register(add)
        app.start()
        threads, errors = _produce_from_threads(app, timeout=30)  # safety net only
        for t in threads:
            t.join()
        assert errors == [], f"producers failed: {errors[:1]}"
        res = app.run(timeout=TIMEOUT)
    _check_threaded_results(res.results)


def test_blocking_enqueue_while_running_more_tasks_than_the_rings_hold():
    # start(), then enqueue far more tasks than the task and result rings hold, then run():
    # the blocking enqueue must wait only until the workers make room.
    n = 5000
    with make_app(workers=1, queue_slots=64, auto_terminate=False) as app:
        app.start()
        for i in range(n):
            app.enqueue(add, args=(i, 1), timeout=30)  # QueueFull = no room ever came
        res = app.run(timeout=TIMEOUT)
    assert res.values() == [i + 1 for i in range(n)]


# -- argument and result types -----------------------------------------------------------------

ARG_CASES = {
    "ints": [0, 1, -1, 2**31, 2**63 - 1, -(2**63), 2**63, 2**64, -(2**63) - 1, 2**200, -(3**150)],
    "floats": [0.0, -0.0, 1.5, -2.25, 1e308, 5e-324, float("inf"), float("-inf")],
    "bools": [True, False],
    "none": [None],
    "strs": ["", "a", "hello world", "héllo wörld ✓ 日本語 🎉", "\x00inside\x00", "é" * 50,
             "x" * (1 << 20)],
    "bytes": [b"", b"\x00", b"abc", bytes(range(256)), b"\xff" * 91, b"\xfe" * 92, b"q" * (5 << 20)],
    "containers": [(), (1, "a", 2.5), ((1, 2), (3, (4,))), [1, [2, [3]]], {"a": 1, 2: (3,)},
                   {1, 2, 3}, frozenset({"x"}), OrderedDict(a=1, b=2), bytearray(b"\x00\x01"),
                   list(range(10000)),
                   # Encoded natively while every item is plain; pickled whole otherwise
                   # (a big int, an object, a lone surrogate, a subclass, too deep).
                   [None, True, 7, -2.5, "s", b"b", (1, [2.0, ("x",)])], [1, 2**64], [1, fractions.Fraction(1, 3)],
                   ("ok", "\udcff"), [[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]], [OrderedDict(a=1)], [[], ()]],
    "objects": [Point(1, 2.5, "p"), Tagged("t", [1, {"k": b"v"}]), Color.RED, Level.HIGH,
                fractions.Fraction(2, 7), complex(1, -2), range(3, 9, 2)],
}


def _same(a, b):
    if isinstance(a, float) and isinstance(b, float):
        return (a == b and math.copysign(1, a) == math.copysign(1, b)) or (math.isnan(a) and math.isnan(b))
    return a == b


@pytest.mark.parametrize("category", list(ARG_CASES))
def test_argument_types_round_trip(category):
    values = ARG_CASES[category]
    with make_app() as app:
        for v in values:
            app.enqueue(echo_typed, args=(v,))
        for v in values:  # as a keyword argument, too
            app.enqueue(echo_typed, kwargs={"x": v})
        for v in values:  # beside other arguments
            app.enqueue(echo_all, args=(1, v, "z"), k=v)
        res = app.run(timeout=TIMEOUT)
    assert res.exit_code == 0, [r.error for r in res.failures]
    out = res.values()
    n = len(values)
    for i, v in enumerate(values):
        for got in (out[i], out[n + i]):
            assert got[0] == type(v).__name__, f"{v!r:.60} arrived as a {got[0]}"
            assert _same(got[1], v), f"{v!r:.60} arrived as {got[1]!r:.60}"
        args, kwargs = out[2 * n + i]
        assert args[0] == 1 and args[2] == "z"
        assert type(args[1]) is type(v) and _same(args[1], v)
        assert type(kwargs["k"]) is type(v) and _same(kwargs["k"], v)


def test_nan_round_trips():
    with make_app() as app:
        app.enqueue(echo, args=(float("nan"),))
        v = app.run(timeout=TIMEOUT).values()[0]
    assert isinstance(v, float) and math.isnan(v)


def test_bool_is_not_delivered_as_int():
    with make_app() as app:
        app.enqueue(echo_typed, args=(True,))
        app.enqueue(echo_typed, args=(False,))
        app.enqueue(echo_typed, args=(1,))
        out = app.run(timeout=TIMEOUT).values()
    assert out == [("bool", True), ("bool", False), ("int", 1)]
    assert out[0][1] is True and out[1][1] is False


def test_int_subclass_is_not_flattened():
    with make_app() as app:
        app.enqueue(echo, args=(Level.LOW,))
        app.enqueue(echo, args=(Level.LOW, ), tsk_id=5)
        out = app.run(timeout=TIMEOUT).values()
    assert all(type(v) is Level and v is Level.LOW for v in out)


def test_several_int_arguments_fill_and_overflow_the_slot():
    # the default slot holds 5 int64 arguments; more, or bigger, must still arrive intact
    with make_app() as app:
        for n in (0, 1, 5, 6, 20):
            app.enqueue(echo_all, args=tuple(range(-n, n * 3, 3))[:n] if n else ())
        app.enqueue(echo_all, args=(2**63, 1, 2, 3, 4))
        app.enqueue(echo_all, args=(1, 2, 3, 4, -(2**63) - 1))
        out = app.run(timeout=TIMEOUT).values()
    expect = [(tuple(range(-n, n * 3, 3))[:n] if n else (), {}) for n in (0, 1, 5, 6, 20)]
    expect += [((2**63, 1, 2, 3, 4), {}), ((1, 2, 3, 4, -(2**63) - 1), {})]
    assert out == expect


RESULT_KINDS = ["int", "neg", "big", "negbig", "float", "inf", "true", "false", "none", "str", "bigstr",
                "bytes", "bigbytes", "tuple", "list", "dict", "set", "point", "tagged", "level", "color",
                "fraction", "bytearray"]


def test_result_types():
    with make_app() as app:
        for kind in RESULT_KINDS:
            app.enqueue(make_value, args=(kind,))
        out = app.run(timeout=TIMEOUT).values()
    for kind, got in zip(RESULT_KINDS, out):
        want = make_value(kind)
        assert type(got) is type(want), f"{kind}: got a {type(got).__name__}"
        assert got == want, f"{kind}: got {got!r:.60}"
    assert out[RESULT_KINDS.index("true")] is True
    assert out[RESULT_KINDS.index("false")] is False
    assert out[RESULT_KINDS.index("none")] is None


def test_large_arguments_in_flight_with_small_results():
    # 40 x 3 MB of arguments through a 16 MiB pool; results are small
    blob = b"\xcd" * (3 << 20)
    with make_app(queue_slots=8, pool_bytes=16 << 20) as app:
        for i in range(40):
            app.enqueue(size_of, args=(i,), blob=blob)
        res = app.run(timeout=60)  # safety net only
    assert res.exit_code == 0, [r.error for r in res.failures]
    assert res.values() == [(i, len(blob)) for i in range(40)]


def test_large_arguments_and_results_through_submit():
    blob = os.urandom(3 << 20)
    text = "ü" * (1 << 20)
    with make_app() as app:
        assert app.submit(echo, blob).result(timeout=TIMEOUT) == blob
        assert app.submit(echo, text).result(timeout=TIMEOUT) == text


@pytest.mark.parametrize("queue_slots", [8, 4096])
def test_many_large_arguments_in_flight_recycle_the_pool(queue_slots):
    # 40 tasks x 3 MB of arguments (and as much of results) pass through the default
    # 64 MiB argument pool: the pool must be recycled, not exhausted.
    blob = b"\xab" * (3 << 20)
    with make_app(queue_slots=queue_slots) as app:
        for i in range(40):
            app.enqueue(echo_all, args=(i, blob))
        res = app.run(timeout=60)  # safety net only: a healthy run takes well under a second
    assert res.exit_code == 0, [r.error for r in res.failures]
    out = res.values()
    assert [v[0][0] for v in out] == list(range(40))
    assert all(v[0][1] == blob for v in out)


def test_argument_sizes_across_the_inline_and_pool_boundary():
    # every length from empty to well past the slot's argument area
    with make_app() as app:
        for n in range(0, 400):
            app.enqueue(echo, args=(make_bytes(n),))
            app.enqueue(echo, args=(make_str(n),))
        res = app.run(timeout=TIMEOUT)
    assert res.exit_code == 0, [r.error for r in res.failures][:3]
    out = res.values()
    for n in range(0, 400):
        assert out[2 * n] == make_bytes(n), f"bytes of length {n}"
        assert out[2 * n + 1] == make_str(n), f"str of length {n}"


def test_result_sizes_across_the_inline_and_pool_boundary():
    sizes = list(range(0, 600)) + [4096, 65536, 1 << 20]
    with make_app(workers=2) as app:
        for n in sizes:
            app.enqueue(make_bytes, args=(n,))
            app.enqueue(make_str, args=(n,))
        res = app.run(timeout=TIMEOUT)
    assert res.exit_code == 0, [r.error for r in res.failures][:3]
    out = res.values()
    for k, n in enumerate(sizes):
        assert out[2 * k] == make_bytes(n), f"bytes result of length {n}"
        assert out[2 * k + 1] == make_str(n), f"str result of length {n}"


def test_str_with_lone_surrogate_round_trips():
    # a valid (and picklable) Python str that is not valid UTF-8
    # e.g. a file name that is not UTF-8, as os.listdir() returns it
    values = [os.fsdecode(b"caf\xe9.txt"), "\ud800", "x" * 200 + "\ud83d"]
    with make_app() as app:
        for v in values:
            app.enqueue(echo, args=(v,))
        app.enqueue(make_value, args=("str",))
        res = app.run(timeout=TIMEOUT)
    assert res.values()[:3] == values


def test_numpy_arrays_round_trip():
    np = pytest.importorskip("numpy")
    arrays = [
        np.arange(10, dtype=np.int64),
        np.linspace(0, 1, 7, dtype=np.float32),
        np.zeros((3, 4, 5), dtype=np.uint8),
        np.array([[1 + 2j, 3 - 4j]], dtype=np.complex128),
        np.arange(24).reshape(4, 6)[:, ::2],       # not contiguous
        np.asfortranarray(np.arange(12.0).reshape(3, 4)),
        np.array(3.5),                             # 0-d
        np.array(["ab", "cde"]),
        np.arange(1 << 20, dtype=np.float64),      # 8 MiB
        np.array([], dtype=np.int16),
    ]
    with make_app() as app:
        for a in arrays:
            app.enqueue(echo, args=(a,))
        res = app.run(timeout=TIMEOUT)
    assert res.exit_code == 0, [r.error for r in res.failures][:3]
    for a, got in zip(arrays, res.values()):
        assert isinstance(got, np.ndarray)
        assert got.dtype == a.dtype and got.shape == a.shape
        assert np.array_equal(got, a)


def test_str_result_with_lone_surrogate():
    with make_app() as app:
        app.enqueue(make_value, args=("surrogate",))
        app.enqueue(make_value, args=("int",))
        res = app.run(timeout=TIMEOUT)
    assert res.results[0].error is None, repr(res.results[0].error)
    assert res.values() == [os.fsdecode(b"caf\xe9.txt"), 7]


class Items(list):
    pass


def test_plain_lists_and_tuples_keep_their_types_and_contents():
    # The native container encoding must give back exactly what pickle would.
    cases = [[1, "a", (2, [3, b"x"])], ((),), Items([1, 2]), (Items([3]), [Items()])]
    with make_app() as app:
        for v in cases:
            got = app.submit(echo_nested_types, v).result(timeout=TIMEOUT)
            assert got == _types_of(v) and app.submit(echo, v).result(timeout=TIMEOUT) == v



def test_idle_result_thread_sleeps_until_a_result_wakes_it(app):
    """With nothing in flight the background result thread blocks in the native wait
    without a timeout (an idle app costs no CPU); the next task's result wakes it, and it
    drains that result though no caller waits for it."""
    a = app
    a.start()
    assert a.enqueue(add, args=(1, 2))
    assert a.wait(timeout=TIMEOUT)
    d = a._lifecycle.runtime.router
    _poll(lambda: d._idle, "the result thread to go idle")
    before = d.finished
    assert a.enqueue(add, args=(3, 4))
    _poll(lambda: d.finished == before + 1, "the background thread to drain the new result")
    assert [r.value for r in a.results(timeout=TIMEOUT)][-1] == 7
