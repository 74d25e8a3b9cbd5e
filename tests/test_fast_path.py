"""The native enqueue/submit path (_core.FastPath) and the native settling of results
(Collector.settle): the same outcomes as the Python path, the fall-backs that keep its
errors, and the garbage-collector bookkeeping of the objects they make."""

from __future__ import annotations

import concurrent.futures as cf
import gc
import os
import threading
import time
import weakref

import pytest

from mpop import MpopApi, ShutdownError, TaskResult
from _helpers import leak_check

SHM = "/dev/shm"


@pytest.fixture(autouse=True)
def _no_leaks():
    with leak_check():
        yield


def add(a: int, b: int = 1) -> int:
    return a + b


def same(x):
    return x


def two(a, b):
    return a * b


def takes_slot(slot):
    return slot.args[0]


def _result_fields(r: TaskResult) -> tuple:
    return (r.success, r.value, r.error, r.tsk_id, r.fn_id, r.worker_id is not None, r.attempts)


@pytest.fixture
def app():
    a = MpopApi(workers=2, auto_terminate=False)
    try:
        yield a
    finally:
        a.shutdown()


def test_the_native_path_is_armed_only_while_workers_run(app):
    app.enqueue(add, args=(1,))  # creates the runtime; workers not started
    fast = app._lifecycle.runtime.fast
    assert not fast.armed
    app.start()
    assert fast.armed
    assert app.run().values() == [2]
    app._lifecycle.stop_workers()
    assert not fast.armed
    # Python path again: the task waits in the backlog, submit() restarts the workers.
    app.enqueue(add, args=(2,))
    assert app.submit(add, 5).result(timeout=60) == 6
    assert fast.armed
    assert app.run().values() == [3]
    app.shutdown()
    assert not fast.armed


def test_native_and_python_enqueue_give_equal_results():
    slow = MpopApi(workers=2, auto_terminate=False, debug=True, display=False)  # every result via _deliver
    fast = MpopApi(workers=2, auto_terminate=False)
    try:
        for a in (slow, fast):
            a.start()
            for i in range(50):
                a.enqueue(add, args=(i,))
                a.enqueue(add, args=(i, 10))
        rs, rf = slow.run(), fast.run()
        assert fast._lifecycle.runtime.router._native_settle is not None and slow._lifecycle.runtime.router._native_settle is None
        assert [_result_fields(r) for r in rs.results] == [_result_fields(r) for r in rf.results]
        assert all(type(r) is TaskResult for r in rf.results)
        assert [r.seq for r in rf.results] == sorted(r.seq for r in rf.results)
        assert all(r.queue_wait_s is not None and r.run_time_s is not None for r in rf.results)
        assert rf.stats["tasks"] == 100 and rf.stats["failed"] == 0 and rf.stats["retries"] == 0
        assert sum(rf.stats["per_worker"].values()) == 100
    finally:
        slow.shutdown()
        fast.shutdown()


def test_labels_come_from_one_counter_on_both_paths(app):
    app.start()
    app.enqueue(add, args=(1,))            # native
    app.enqueue(add, args=[2])             # a list: the Python path
    app.enqueue(add, kwargs={"a": 3})      # keywords: the Python path
    app.enqueue(add, args=(4,), tsk_id=500)
    app.enqueue(add, args=(5,))            # native again
    ids = [r.tsk_id for r in app.run().results]
    assert ids == [1, 2, 3, 500, 4]


def test_the_native_path_falls_back_with_the_python_paths_errors(app):
    app.start()
    with pytest.raises(TypeError, match="cannot take these arguments"):
        app.enqueue(two, args=(1,))
    with pytest.raises(TypeError, match="cannot take these arguments"):
        app.submit(two, 1, 2, 3)
    with pytest.raises(TypeError, match="cannot be serialised"):
        app.enqueue(same, args=(threading.Lock(),))
    with pytest.raises(TypeError, match="cannot be serialised"):
        app.submit(same, threading.Lock())
    with pytest.raises(TypeError, match="slot.args"):
        app.enqueue(takes_slot, args=("text",))
    assert app.submit(two, 3, b=4).result(timeout=60) == 12      # keywords: Python path
    assert app.submit(lambda x: x * 2, 21).result(timeout=60) == 42  # auto-registered
    app.enqueue(takes_slot, args=(7,))
    app.enqueue(two, args=(6, 7))
    assert app.run().values() == [7, 42]
    app.shutdown()
    with pytest.raises(ShutdownError):
        app.enqueue(add, args=(1,))
    with pytest.raises(ShutdownError):
        app.submit(add, 1)


def test_futures_pushed_through_a_full_ring_all_settle():
    # A push that waits for room gives up the GIL: a result may come in before the
    # future is registered (kept as an early result). None may be lost.
    with MpopApi(workers=2, auto_terminate=False, queue_slots=8) as app:
        app.start()
        futs = [app.submit(add, i) for i in range(3000)]
        assert [f.result(timeout=60) for f in futs] == [i + 1 for i in range(3000)]
        assert not app._lifecycle.runtime.router.futures and not app._lifecycle.runtime.router.early


def test_submit_from_many_threads_all_settle(app):
    app.start()
    out: dict[int, list] = {}

    def worker(k: int) -> None:
        futs = [app.submit(add, k * 1000 + i) for i in range(500)]
        out[k] = [f.result(timeout=60) for f in futs]

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert out == {k: [k * 1000 + i + 1 for i in range(500)] for k in range(4)}


def test_results_of_atomic_values_are_not_walked_by_the_garbage_collector(app):
    app.start()
    app.register(same)
    app.enqueue(same, args=(5,))
    app.enqueue(same, args=("text",))
    app.enqueue(same, args=([1, 2],))
    r_int, r_str, r_list = app.run().results
    assert not gc.is_tracked(r_int) and not gc.is_tracked(r_str)
    assert gc.is_tracked(r_list)  # holds a container
    r_int.value = r_int            # a field set: tracked again, so this cycle is collectable
    assert gc.is_tracked(r_int)
    ref = weakref.ref(r_int)
    del r_int
    gc.collect()
    assert ref() is None


def test_futures_are_tracked_once_they_can_be_part_of_a_cycle(app):
    app.start()
    app.register(same)  # registered and written: its calls take the native path
    app.register(two)
    f_int = app.submit(same, 1)
    assert not gc.is_tracked(f_int)
    assert f_int.result(timeout=60) == 1 and not gc.is_tracked(f_int)
    f_list = app.submit(same, [1])
    assert f_list.result(timeout=60) == [1] and gc.is_tracked(f_list)
    f_cb = app.submit(same, 2)
    f_cb.add_done_callback(lambda f, keep=f_cb: None)  # a cycle: future -> callback -> future
    assert gc.is_tracked(f_cb)
    assert f_cb.result(timeout=60) == 2
    ref = weakref.ref(f_cb)
    del f_cb
    gc.collect()
    assert ref() is None
    f_err = app.submit(two, "a", "b")  # fails in the worker: settled with an exception
    with pytest.raises(TypeError):
        f_err.result(timeout=60)
    assert gc.is_tracked(f_err)


def test_waiters_and_callbacks_still_see_natively_submitted_futures(app):
    app.start()
    futs = [app.submit(add, i) for i in range(200)]
    seen = []
    futs[-1].add_done_callback(lambda f: seen.append(f.result()))
    done, not_done = cf.wait(futs, timeout=60)
    assert len(done) == 200 and not not_done
    assert sorted(f.result() for f in cf.as_completed(futs, timeout=60)) == [i + 1 for i in range(200)]
    assert seen == [200]


def test_a_dropped_app_is_released_by_the_garbage_collector():
    app = MpopApi(workers=2, auto_terminate=False)
    assert app.submit(add, 1).result(timeout=60) == 2
    pending = app.submit(add, 2)  # a future the app still holds when it is dropped
    app.enqueue(add, args=(1,))
    name = app.segment_name
    assert os.path.exists(os.path.join(SHM, name))
    del app
    gc.collect()
    assert not os.path.exists(os.path.join(SHM, name))
    assert pending.done()


def gated(path: str) -> int:
    while not os.path.exists(path):
        time.sleep(0.005)
    return 1


def test_wait_and_run_are_not_ended_by_other_threads_results(tmp_path):
    # finished counts results of every kind: wait() must wait for its own tasks, not for
    # as many results as there were tasks. Two workers hold the gated tasks, a third runs
    # the other thread's.
    gate = str(tmp_path / "open")
    app = MpopApi(workers=3, worker_batch_size=1, auto_terminate=False)
    app.start()
    app.enqueue(gated, args=(gate,))
    app.enqueue(gated, args=(gate,))
    returned = threading.Event()
    t = threading.Thread(target=lambda: (app.wait(), returned.set()))
    t.start()
    try:
        assert [app.submit(add, i).result(timeout=60) for i in range(5)] == [1, 2, 3, 4, 5]
        assert not returned.wait(0.5)  # its two tasks are still blocked on the gate
    finally:
        open(gate, "w").close()
    t.join(60)
    try:
        assert returned.is_set()
        assert [r.value for r in app.run().results] == [1, 1]
    finally:
        app.shutdown()


def test_a_future_the_user_settled_does_not_stop_result_delivery(app):
    app.start()
    app.register(gated)
    f = app.submit(add, 1)
    try:
        f.set_result("mine")  # before the worker's result arrives (or after: either way)
    except cf.InvalidStateError:
        pass
    assert f.result() in ("mine", 2)
    futs = [app.submit(add, i) for i in range(100)]
    fired = threading.Event()
    futs[-1].add_done_callback(lambda _: fired.set())  # needs the result thread
    assert fired.wait(60)
    assert [g.result(timeout=60) for g in futs] == [i + 1 for i in range(100)]
    assert app._lifecycle.runtime.router._thread.is_alive()
