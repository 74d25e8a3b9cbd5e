"""numpy arrays without pickle: arguments arrive as read-only views over the shared argument
pool (no copy in the worker), results come back as ordinary arrays, a view a handler keeps
pins its block until it lets go, and whatever a dead worker pinned comes back."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

import mpop
from _helpers import no_leaks_fixture

PREFIX = f"mpop-np{os.getpid()}"
TIMEOUT = 300  # a safety net against hangs, never a performance expectation

no_leaks = no_leaks_fixture(PREFIX)


def make_app(**kw) -> mpop.MpopApi:
    kw.setdefault("workers", 1)
    kw.setdefault("name", PREFIX)
    kw.setdefault("auto_terminate", False)
    return mpop.MpopApi(**kw)


def buffer_owner(a: np.ndarray) -> str:
    """The type name of whatever finally holds the array's memory."""
    while isinstance(a, np.ndarray) and a.base is not None:
        a = a.base
    if isinstance(a, memoryview):
        a = a.obj
    return type(a).__name__


def describe(a):
    return (a.shape, a.dtype.str, a.flags.writeable, buffer_owner(a), a.tobytes())


def describe_kw(*, a):
    return describe(a)


def array_sum(a):
    return float(a.sum())


def echo(a):
    return a


def plus_one(a):
    return a + 1


class Tagged(np.ndarray):
    pass


def type_name(a):
    return type(a).__name__


_kept: list = []


def keep_view(a):
    _kept.append(a[::2])  # a view: the whole block must stay
    return len(_kept)


def kept_sums():
    return [float(k.sum()) for k in _kept]


def drop_kept():
    _kept.clear()
    return 0


def die(_):
    os._exit(3)


def pool_used(app) -> int:
    return app.status()["queue"]["pool_used_bytes"]


def wait_pool_empty(app) -> int:
    deadline = time.monotonic() + 10
    while pool_used(app) and time.monotonic() < deadline:
        time.sleep(0.02)
    return pool_used(app)


BIG = 20_000  # elements: large enough to go through the pool, not the slot

ARRAYS = {
    "float64": np.arange(BIG, dtype=np.float64) / 7,
    "big-endian-int32-3d": np.arange(BIG, dtype=">i4").reshape(10, 40, 50),
    "bool": np.arange(BIG) % 3 == 0,
    "complex128": np.arange(BIG) * (1 + 2j),
    "datetime64": np.datetime64("2020-01-01") + np.arange(BIG),
    "unicode": np.array([f"item{i}" for i in range(3000)]),
    "non-contiguous": np.arange(2 * BIG, dtype=np.int64)[::2],
    "fortran-order": np.asfortranarray(np.arange(BIG, dtype=np.float32).reshape(100, 200)),
    "small-inline": np.arange(5, dtype=np.int8),
    "zero-d": np.array(3.5),
    "empty": np.zeros((3, 0)),
}


@pytest.mark.parametrize("name", list(ARRAYS))
def test_array_argument_arrives_read_only_with_dtype_shape_and_values(name):
    x = ARRAYS[name]
    with make_app() as app:
        shape, dtype, writeable, _owner, data = app.submit(describe, x).result(timeout=TIMEOUT)
        assert shape == x.shape
        assert dtype == x.dtype.str
        assert writeable is False
        assert data == x.tobytes()
        assert app.submit(describe_kw, a=x).result(timeout=TIMEOUT)[4] == x.tobytes()
        assert wait_pool_empty(app) == 0


def test_a_large_array_argument_is_a_view_over_the_pool_not_a_copy():
    x = np.random.default_rng(1).random(1_000_000)  # 8 MB
    with make_app() as app:
        _shape, _dtype, writeable, owner, _data = app.submit(describe, x).result(timeout=TIMEOUT)
        assert owner == "SharedBuffer"  # mpop._core's window on the pool block
        assert writeable is False
        assert app.submit(array_sum, x).result(timeout=TIMEOUT) == pytest.approx(float(x.sum()))


def test_a_small_array_in_the_slot_is_a_read_only_copy():
    with make_app() as app:
        _shape, _dtype, writeable, owner, _data = app.submit(describe, np.arange(3)).result(timeout=TIMEOUT)
        assert writeable is False
        assert owner != "SharedBuffer"


def test_array_results_come_back_as_writable_arrays():
    x = np.arange(100_000, dtype=np.int16).reshape(100, 1000)
    with make_app(workers=2) as app:
        r = app.submit(plus_one, x).result(timeout=TIMEOUT)
        assert isinstance(r, np.ndarray) and r.dtype == x.dtype and r.shape == x.shape
        assert np.array_equal(r, x + 1)
        assert r.flags.writeable
        back = app.submit(echo, x).result(timeout=TIMEOUT)  # the argument view itself, returned
        assert np.array_equal(back, x) and back.flags.writeable
        assert list(app.map(array_sum, [x, x * 2, x * 3])) == [float(x.sum()), float((x * 2).sum()),
                                                              float((x * 3).sum())]
        del r, back  # result arrays are views over their pool blocks until dropped
        assert wait_pool_empty(app) == 0


def test_arrays_numpy_cannot_describe_by_dtype_string_are_pickled():
    objects = np.array([1, "two", None], dtype=object)
    records = np.zeros(3, dtype=[("a", "<i4"), ("b", "<f8")])
    with make_app() as app:
        assert list(app.submit(echo, objects).result(timeout=TIMEOUT)) == [1, "two", None]
        back = app.submit(echo, records).result(timeout=TIMEOUT)
        assert back.dtype.names == ("a", "b")
        assert app.submit(type_name, np.arange(4).view(Tagged)).result(timeout=TIMEOUT) == "Tagged"


def test_a_view_kept_by_a_handler_pins_its_block_until_released():
    arrays = [np.full(100_000, float(i)) for i in range(6)]
    with make_app(workers=1) as app:
        assert app.submit(keep_view, arrays[0]).result(timeout=TIMEOUT) == 1
        # Later tasks reuse the pool; the kept view's block is not among what they get.
        for a in arrays[1:]:
            assert app.submit(array_sum, a).result(timeout=TIMEOUT) == float(a.sum())
        assert app.submit(kept_sums).result(timeout=TIMEOUT) == [0.0]
        assert app.submit(keep_view, arrays[3]).result(timeout=TIMEOUT) == 2
        assert app.submit(kept_sums).result(timeout=TIMEOUT) == [0.0, 3.0 * 50_000]
        assert pool_used(app) >= 2 * arrays[0].nbytes
        app.submit(drop_kept).result(timeout=TIMEOUT)
        app.submit(array_sum, np.arange(3.0)).result(timeout=TIMEOUT)  # the next task lets go
        assert wait_pool_empty(app) == 0


def test_blocks_a_dead_worker_pinned_come_back():
    x = np.ones(200_000)
    with make_app(workers=1, max_retries=0) as app:
        assert app.submit(keep_view, x).result(timeout=TIMEOUT) == 1
        assert pool_used(app) >= x.nbytes
        with pytest.raises(mpop.WorkerCrashedError):
            app.submit(die, 0).result(timeout=TIMEOUT)
        assert wait_pool_empty(app) == 0
        assert app.status()["queue"]["pool_reclaimed_bytes"] >= x.nbytes
        assert app.submit(array_sum, x).result(timeout=TIMEOUT) == float(x.sum())


def test_an_array_larger_than_the_pool_is_refused_at_enqueue_naming_sizes():
    with make_app(pool_bytes=1 << 20) as app:
        with pytest.raises(ValueError, match=r"arguments take \d+ bytes encoded, more than queued arguments may use"):
            app.submit(array_sum, np.zeros(1 << 20))


def twice(a):
    return a * 2


def owners(arrays):
    return [(buffer_owner(a), a.flags.writeable) for a in arrays]


def test_an_array_result_is_a_writable_view_over_its_block_until_dropped():
    import gc

    x = np.arange(1_000_000.0)  # 8 MB
    with make_app(workers=2) as app:
        r = app.submit(twice, x).result(timeout=TIMEOUT)
        assert buffer_owner(r) == "SharedBuffer" and r.flags.writeable  # no copy out
        assert np.array_equal(r, 2 * x)
        assert pool_used(app) >= r.nbytes  # the block is the result's until it goes
        r[0] = -1.0
        del r
        gc.collect()
        assert wait_pool_empty(app) == 0


def test_result_views_are_capped_at_a_quarter_of_the_pool_then_copies():
    import gc

    x = np.arange(1_000_000.0)  # 8 MB; the default 64 MiB pool holds two as views
    with make_app(workers=2) as app:
        results = list(app.map(twice, [x] * 6))  # kept: must not starve the workers
        assert all(np.array_equal(r, 2 * x) for r in results)
        kinds = [buffer_owner(r) for r in results]
        assert 1 <= kinds.count("SharedBuffer") <= 2
        assert pool_used(app) <= app.status()["queue"]["pool_bytes"] // 4 + 4096
        assert app.submit(array_sum, x).result(timeout=TIMEOUT) == float(x.sum())
        del results
        gc.collect()
        assert wait_pool_empty(app) == 0


def _push_log(app, monkeypatch) -> list[tuple[bool, bool]]:
    """From now on, each push the app makes (submit's fast path aside) as (blocking, pushed)."""
    from mpop._submit import Submitter

    pushes = []
    push = Submitter.push

    def spy(self, h, tsk_id, args, kwargs, c_args=None, blocking=True, *rest, **kw):
        ok = push(self, h, tsk_id, args, kwargs, c_args, blocking, *rest, **kw)
        pushes.append((blocking, bool(ok)))
        return ok

    monkeypatch.setattr(Submitter, "push", spy)
    return pushes


def slow_sum(a):
    time.sleep(0.005)
    return float(a.sum())


def test_a_map_whose_arrays_fill_the_pool_drains_for_itself_while_it_waits_for_room(monkeypatch):
    # A chunk's pooled arguments are freed only when its result is drained. A map whose own
    # chunks fill the pool must drain them itself before it pushes again: the background
    # thread steps aside while a map is driven, so a push left waiting on it for room lost
    # up to one of its turns each time (50 arrays of 8 MB ran at half submit()'s speed).
    arrays = [np.full(50_000, float(i)) for i in range(40)]  # 400 kB each; 3 fit in the pool
    with make_app(workers=2, pool_bytes=2 << 20) as app:
        pushes = _push_log(app, monkeypatch)
        assert list(app.map(slow_sum, arrays, timeout=TIMEOUT)) == [float(a.sum()) for a in arrays]
        assert (False, False) in pushes  # the pool was full at times...
        assert not [p for p in pushes if p[0]]  # ...and the map never waited in the native push
        assert wait_pool_empty(app) == 0


def sleepy_sum(a):
    time.sleep(0.1)  # long enough that the map comes while the pool is full
    return float(a.sum())


def test_a_map_waits_natively_for_room_other_tasks_hold(monkeypatch):
    # With none of its own chunks in flight, the room is held by other work (futures the
    # background thread drains): the map then waits for it in the native push.
    arrays = [np.full(50_000, float(i)) for i in range(6)]
    with make_app(workers=1, pool_bytes=2 << 20) as app:
        app.submit(array_sum, arrays[0]).result(timeout=TIMEOUT)  # workers up
        futures = [app.submit(sleepy_sum, a) for a in arrays[:3]]  # the pool is full
        pushes = _push_log(app, monkeypatch)
        assert list(app.map(array_sum, arrays, timeout=TIMEOUT)) == [float(a.sum()) for a in arrays]
        assert pushes[:2] == [(False, False), (True, True)]
        assert [f.result(timeout=TIMEOUT) for f in futures] == [float(a.sum()) for a in arrays[:3]]
        assert wait_pool_empty(app) == 0


def slow_first(a):
    time.sleep(0.5)
    return float(a[0])


def test_a_map_waiting_for_pool_room_keeps_its_timeout():
    # 3 fit in the pool; until the first chunk is back, 4 go out (two a worker)
    arrays = [np.full(50_000, float(i)) for i in range(8)]
    with make_app(workers=2, pool_bytes=2 << 20) as app:
        with pytest.raises(TimeoutError, match="room for its next chunk"):
            list(app.map(slow_first, arrays, timeout=0.2))
        assert app.wait(timeout=TIMEOUT)
        assert list(app.map(array_sum, arrays[:2], timeout=TIMEOUT)) == [0.0, 50_000.0]
        assert wait_pool_empty(app) == 0


def test_lists_of_arrays_travel_natively_both_ways():
    x = np.arange(50_000.0)
    with make_app() as app:
        got = app.submit(owners, [x, x[::2], np.arange(3)]).result(timeout=TIMEOUT)
        assert got == [("SharedBuffer", False)] * 3
        back = app.submit(echo, [x, (x[:10], "tag")]).result(timeout=TIMEOUT)
        assert np.array_equal(back[0], x) and np.array_equal(back[1][0], x[:10]) and back[1][1] == "tag"
        assert type(back) is list and type(back[1]) is tuple
