"""submit(): concurrent.futures.Future objects that work with the standard tools (wait,
as_completed, asyncio.wrap_future, done callbacks) and carry handler exceptions."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import threading
import time

import pytest

import mpop
from mpop import MpopApi, ProcTaskFnID
from _helpers import leak_check, wait_until

TIMEOUT = 60  # "finishes at all"


@pytest.fixture(autouse=True)
def _no_leaks():
    with leak_check():
        yield


@pytest.fixture(scope="module")
def app():
    with leak_check():
        a = MpopApi(workers=2, auto_terminate=False)
        a.start()  # before any test's own leak check: the app outlives single tests
        try:
            yield a
        finally:
            a.shutdown()


def add(a: int, b: int = 1) -> int:
    return a + b


def boom(x: int) -> int:
    raise ValueError(f"boom {x}")


class Unpicklable(Exception):
    def __reduce__(self):
        raise TypeError("cannot pickle this exception")


def raises_unpicklable(x: int) -> int:
    raise Unpicklable(f"odd {x}")


def slow_square(x: int) -> int:
    time.sleep(0.02 * (x % 3))
    return x * x


def test_submit_returns_a_future(app):
    fut = app.submit(add, 1, b=2)
    assert isinstance(fut, cf.Future)
    assert fut.result(timeout=TIMEOUT) == 3
    assert fut.done() and not fut.cancelled() and fut.exception() is None


def test_submit_builtin_by_id_and_default_argument(app):
    assert app.submit(ProcTaskFnID.MULTIPLY, 6, 7).result(timeout=TIMEOUT) == 42
    assert app.submit(add, 10).result(timeout=TIMEOUT) == 11


def test_concurrent_futures_wait(app):
    futs = [app.submit(slow_square, i) for i in range(30)]
    done, not_done = cf.wait(futs, timeout=TIMEOUT)
    assert not not_done and len(done) == 30
    assert [f.result() for f in futs] == [i * i for i in range(30)]


def test_concurrent_futures_wait_first_completed(app):
    futs = [app.submit(slow_square, i) for i in range(10)]
    done, _ = cf.wait(futs, timeout=TIMEOUT, return_when=cf.FIRST_COMPLETED)
    assert done
    assert cf.wait(futs, timeout=TIMEOUT).not_done == set()


def test_as_completed(app):
    futs = {app.submit(slow_square, i): i for i in range(40)}
    seen = {}
    for fut in cf.as_completed(futs, timeout=TIMEOUT):
        seen[futs[fut]] = fut.result()
    assert seen == {i: i * i for i in range(40)}


def test_asyncio_wrap_future(app):
    async def main():
        futs = [asyncio.wrap_future(app.submit(add, i, b=i)) for i in range(25)]
        return await asyncio.wait_for(asyncio.gather(*futs), TIMEOUT)

    assert asyncio.run(main()) == [2 * i for i in range(25)]


def test_add_done_callback_without_blocking_call(app):
    got = []
    all_done = threading.Event()

    def callback(fut):
        got.append(fut.result())
        if len(got) == 10:
            all_done.set()

    futs = [app.submit(add, i, 100) for i in range(10)]
    for f in futs:
        f.add_done_callback(callback)
    # Nobody calls result(): the callbacks alone must fire.
    assert all_done.wait(TIMEOUT)
    assert sorted(got) == [100 + i for i in range(10)]


def test_handler_exception_via_future(app):
    fut = app.submit(boom, 7)
    exc = fut.exception(timeout=TIMEOUT)
    assert isinstance(exc, ValueError)
    assert str(exc) == "boom 7"
    # The worker's traceback travels as __cause__, as concurrent.futures does.
    assert exc.__cause__ is not None
    tb = str(exc.__cause__)
    assert "Traceback (most recent call last)" in tb and ", in boom" in tb, tb
    with pytest.raises(ValueError, match="boom 7"):
        fut.result()


def test_unpicklable_exception_becomes_mpop_error(app):
    exc = app.submit(raises_unpicklable, 3).exception(timeout=TIMEOUT)
    assert isinstance(exc, mpop.MpopError)
    assert "odd 3" in str(exc)


def test_failures_do_not_disturb_other_futures(app):
    futs = [app.submit(boom if i % 4 == 0 else add, i) for i in range(20)]
    for i, f in enumerate(futs):
        if i % 4 == 0:
            assert isinstance(f.exception(timeout=TIMEOUT), ValueError)
        else:
            assert f.result(timeout=TIMEOUT) == i + 1


def test_many_futures_all_resolve(app):
    futs = [app.submit(ProcTaskFnID.ADD, i, 1) for i in range(5000)]
    done, not_done = cf.wait(futs, timeout=TIMEOUT)
    assert not not_done
    assert sum(f.result() for f in futs) == sum(range(1, 5001))


def test_submit_from_several_threads(app):
    def produce(k):
        return [app.submit(add, k * 1000 + i, 0) for i in range(200)]

    with cf.ThreadPoolExecutor(4) as pool:
        batches = list(pool.map(produce, range(4)))
    for k, futs in enumerate(batches):
        assert [f.result(timeout=TIMEOUT) for f in futs] == [k * 1000 + i for i in range(200)]


def test_submit_rejects_bad_arguments_at_once(app):
    with pytest.raises(TypeError):
        app.submit(add, 1, 2, 3)


def test_submit_starts_workers_by_itself():
    with MpopApi(workers=1) as a:
        assert a.status()["config"]["running"] is False
        assert a.submit(add, 2, 3).result(timeout=TIMEOUT) == 5


def nap(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


@pytest.mark.parametrize("watch", ["callback", "await", "wait"])
def test_a_watched_future_after_a_blocking_wait_is_delivered_at_once(watch, monkeypatch):
    """After a blocking result() that left nothing in flight, the background thread is
    stepping aside (its wait: _STEP_ASIDE_POLL_S, an hour here). A future submitted then
    and watched (a done callback, an await, concurrent.futures.wait) wakes it: its result
    is delivered without waiting for that poll to end."""
    with MpopApi(workers=1, auto_terminate=False) as one:
        first = one.submit(nap, 0.3)
        router = one._lifecycle.runtime.router
        monkeypatch.setattr(router, "_STEP_ASIDE_POLL_S", 3600.0)
        assert first.result(TIMEOUT) == 0.3  # a helper: the thread steps aside
        assert wait_until(lambda: router._stepping_aside, TIMEOUT)
        fut = one.submit(add, 1, 2)
        if watch == "callback":
            delivered = threading.Event()
            fut.add_done_callback(lambda f: delivered.set())
            assert delivered.wait(TIMEOUT)
        elif watch == "await":
            async def main():
                return await asyncio.wait_for(fut, TIMEOUT)

            assert asyncio.run(main()) == 3
        else:
            done, _ = cf.wait([fut], timeout=TIMEOUT)
            assert done == {fut}
        assert fut.result(0) == 3


def test_cancel_a_queued_future():
    with MpopApi(workers=1) as one:
        busy = one.submit(nap, 0.3)  # the only worker sleeps; the next task waits behind it
        fut = one.submit(add, 1, 2)
        seen = []
        fut.add_done_callback(lambda f: seen.append(f.cancelled()))
        waiting = threading.Thread(target=lambda: seen.append(len(cf.wait([fut], timeout=TIMEOUT).done)))
        waiting.start()
        assert fut.cancel() is True
        assert fut.cancelled() and fut.done() and not fut.running()
        assert fut.cancel() is True  # again: still cancelled
        with pytest.raises(cf.CancelledError):
            fut.result(timeout=TIMEOUT)
        with pytest.raises(cf.CancelledError):
            fut.exception(timeout=TIMEOUT)
        # Cancelled is done: the concurrent.futures.wait() above ends at once.
        waiting.join(TIMEOUT)
        assert not waiting.is_alive()
        assert seen == [True, 1]
        assert busy.result(timeout=TIMEOUT) == 0.3
        assert one.wait(timeout=TIMEOUT)
        assert one.status()["workers"][0]["completed"] == 1  # the cancelled task never ran


def test_cancel_is_true_only_for_tasks_that_never_run():
    # As concurrent.futures means it: False for the running task, True for the queued
    # ones, and a True means the task never runs.
    with MpopApi(workers=1, worker_batch_size=1) as one:
        futs = [one.submit(nap, 0.3) for _ in range(6)]
        assert wait_until(lambda: one.status()["workers"][0]["state"] == "busy")
        time.sleep(0.15)
        cancelled = [f.cancel() for f in futs]
        assert cancelled[0] is False and cancelled[2:] == [True] * 4, cancelled
        ran = cancelled.count(False)
        for f, c in zip(futs, cancelled):
            if c:
                assert f.cancelled() and f.done()
            else:
                assert f.result(timeout=TIMEOUT) == 0.3
        assert one.wait(timeout=TIMEOUT)
        assert one.status()["workers"][0]["completed"] == ran


def _mark(path: str, i: int) -> int:
    with open(f"{path}/{i}", "w"):
        pass
    time.sleep(0.0005)
    return i


def test_cancelled_tasks_never_run_under_load(tmp_path):
    # Cancels land while tasks are in the ring, in local queues, being claimed and running:
    # every True is a task that never ran, every False one that returns its value.
    with MpopApi(workers=2, worker_batch_size=8, auto_terminate=False) as app:
        futs = [app.submit(_mark, str(tmp_path), i) for i in range(3000)]
        cancelled = {i: futs[i].cancel() for i in range(0, 3000, 3)}
        assert app.wait(timeout=TIMEOUT)
        ran = {int(p.name) for p in tmp_path.iterdir()}
        for i, f in enumerate(futs):
            if cancelled.get(i):
                assert i not in ran and f.cancelled(), i
            else:
                assert f.result(timeout=TIMEOUT) == i and i in ran, i
        assert sum(cancelled.values()) > 0  # the ring still held tasks to cancel
        q = app.status()["queue"]
        assert q["in_flight"] == 0 and q["submitted"] == q["finished"] == 3000
        assert app.submit(add, 1, 2).result(timeout=TIMEOUT) == 3  # the app carries on


def test_a_finished_future_cannot_be_cancelled_or_set_again(app):
    fut = app.submit(add, 4, 5)
    assert fut.result(timeout=TIMEOUT) == 9
    assert fut.cancel() is False and not fut.cancelled()
    with pytest.raises(cf.InvalidStateError):
        fut.set_result(0)
    with pytest.raises(cf.InvalidStateError):
        fut.set_exception(ValueError())
    with pytest.raises(RuntimeError):
        fut.set_running_or_notify_cancel()
    assert "state=finished returned int" in repr(fut)
    late = []
    fut.add_done_callback(late.append)  # already done: called at once
    assert late == [fut]


def test_result_times_out_on_a_pending_future(app):
    fut = app.submit(nap, 0.5)
    with pytest.raises(TimeoutError):
        fut.result(timeout=0.01)
    with pytest.raises(TimeoutError):
        fut.exception(timeout=0)
    assert "state=pending" in repr(fut) or "state=running" in repr(fut)
    assert fut.result(timeout=TIMEOUT) == 0.5


def test_futures_of_two_apps_do_not_share_a_lock_or_dispatcher(app):
    with MpopApi(workers=1) as other:
        a, b = app.submit(add, 1), other.submit(add, 2)
        assert type(a) is not type(b) and isinstance(a, cf.Future) and isinstance(b, cf.Future)
        assert a._condition is not b._condition
        assert (a.result(timeout=TIMEOUT), b.result(timeout=TIMEOUT)) == (2, 3)


class _NoResults:
    """A collector with nothing to drain, for driving a Dispatcher by hand."""

    pending = 0
    completed = 0
    first_incomplete = 1

    def drain(self, max, timeout=None, want=1, spin=False, epoch=None):
        return []

    def interrupt(self):
        pass

    def request_cancel(self, seq):  # no worker ever takes a task here
        return True

    def release_cancel(self, seq):
        pass


def _dispatcher():
    from mpop._router import ResultRouter

    return ResultRouter(_NoResults(), str, max_retries=1, task_timeout=None)


def _record(seq: int, value):
    from mpop._core import ROUTE_FUTURE, ResultRecord

    # (seq, tsk_id, fn_id, worker_id, attempts, status, value, queue_wait_s, run_time_s, route)
    return ResultRecord((seq, seq, 0x10, 0, 1, 0, value, None, None, ROUTE_FUTURE))


def test_a_result_that_beats_its_future_registration_settles_it_once():
    from mpop._router import ROUTE_FUTURE

    d = _dispatcher()
    calls = []
    # The result first (the submitting thread lost the GIL between push and register).
    fut = d.future_cls()
    fut.add_done_callback(calls.append)
    d._deliver(_record(7, "early"))
    assert d.early and not fut.done()
    d.register_future(7, fut)
    assert fut.result(timeout=0) == "early" and calls == [fut]
    assert not d.early and not d.futures
    # The usual order: registered, then delivered.
    fut2 = d.future_cls()
    d.register_future(8, fut2)
    d._deliver(_record(8, "late"))
    assert fut2.result(timeout=0) == "late" and not d.futures and not d.early
    assert _record(8, 0).route == ROUTE_FUTURE


def test_fail_all_ends_every_waiting_future():
    d = _dispatcher()
    futs = [d.future_cls() for _ in range(5)]
    for i, f in enumerate(futs):
        d.register_future(i + 1, f)
    futs[0].cancel()
    waiter = threading.Thread(target=lambda: cf.wait(futs, timeout=TIMEOUT))
    waiter.start()
    d.fail_all(lambda: mpop.ShutdownError("gone"))
    waiter.join(TIMEOUT)
    assert not waiter.is_alive()  # the cancelled one notified too
    assert futs[0].cancelled()
    for f in futs[1:]:
        with pytest.raises(mpop.ShutdownError):
            f.result(timeout=0)
    assert not d.futures
