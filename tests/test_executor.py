"""mpop.Executor as a concurrent.futures.Executor."""

from __future__ import annotations

import concurrent.futures as cf
import os
import time

import pytest

import mpop
from _helpers import leak_check, pid_alive, wait_until

TIMEOUT = 60


@pytest.fixture(autouse=True)
def _no_leaks():
    with leak_check():
        yield


def add(a: int, b: int = 0) -> int:
    return a + b


def slow(x: int, seconds: float = 0.3) -> int:
    time.sleep(seconds)
    return x


def crash_on(x: int, bad: int) -> int:
    if x == bad:
        os._exit(3)
    return x


def test_is_a_concurrent_futures_executor():
    with mpop.Executor(max_workers=2) as ex:
        assert isinstance(ex, cf.Executor)
        fut = ex.submit(add, 2, b=3)
        assert isinstance(fut, cf.Future)
        assert fut.result(timeout=TIMEOUT) == 5
        assert ex.app.status()["config"]["workers"] == 2


def test_map_with_chunksize_and_timeout():
    with mpop.Executor(max_workers=2) as ex:
        assert list(ex.map(add, range(50), range(50), chunksize=4, timeout=TIMEOUT)) == [2 * i for i in range(50)]
        assert list(ex.map(add, range(10))) == list(range(10))
        assert list(ex.map(add, [])) == []
        with pytest.raises(ValueError):
            ex.map(add, range(3), chunksize=0)


def test_map_timeout_expires():
    ex = mpop.Executor(max_workers=1)
    try:
        it = ex.map(slow, [0, 1, 2], [2.0, 2.0, 2.0], timeout=0.2)
        with pytest.raises(TimeoutError):
            list(it)
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


def test_map_timeout_cancels_what_has_not_started():
    # Executor.map cancels the rest when its timeout expires: those calls never run.
    with mpop.Executor(max_workers=1, worker_batch_size=1) as ex:
        it = ex.map(slow, range(6), [0.3] * 6, timeout=0.45)
        with pytest.raises(TimeoutError):
            list(it)
        assert ex.app.wait(timeout=TIMEOUT)
        done = ex.app.status()["workers"][0]["completed"]
        assert done <= 3, done  # the first two and the one running at the timeout, at most


def test_map_starts_work_before_iteration():
    # Like concurrent.futures: the calls are submitted when map() is called.
    with mpop.Executor(max_workers=1) as ex:
        it = ex.map(add, range(20), range(20))
        assert wait_until(lambda: ex.app.status()["queue"]["submitted"] >= 1, TIMEOUT)
        assert list(it) == [2 * i for i in range(20)]


def test_wait_and_as_completed():
    with mpop.Executor(max_workers=2) as ex:
        futs = [ex.submit(slow, i, 0.01 * (i % 3)) for i in range(20)]
        done, not_done = cf.wait(futs, timeout=TIMEOUT)
        assert not not_done and len(done) == 20
        futs = {ex.submit(add, i, 1): i for i in range(20)}
        got = {futs[f]: f.result() for f in cf.as_completed(futs, timeout=TIMEOUT)}
        assert got == {i: i + 1 for i in range(20)}


def test_shutdown_cancel_futures():
    ex = mpop.Executor(max_workers=1, worker_batch_size=1)
    futs = [ex.submit(slow, i, 0.5) for i in range(10)]
    assert wait_until(lambda: any(w["state"] == "busy" for w in ex.app.status()["workers"]), TIMEOUT)
    ex.shutdown(wait=True, cancel_futures=True)
    assert all(f.done() for f in futs)
    cancelled = [f.cancelled() for f in futs]
    assert cancelled[-1] and sum(cancelled) >= 7, cancelled
    with pytest.raises(RuntimeError):
        ex.submit(add, 1)


def test_shutdown_wait_finishes_everything():
    ex = mpop.Executor(max_workers=2)
    futs = [ex.submit(slow, i, 0.02) for i in range(30)]
    ex.shutdown(wait=True)
    assert [f.result(timeout=0) for f in futs] == list(range(30))


def test_context_manager_shuts_down():
    with mpop.Executor(max_workers=2) as ex:
        assert ex.submit(add, 1, 1).result(timeout=TIMEOUT) == 2
        pids = [w["pid"] for w in ex.app.status()["workers"]]
    assert not any(pid_alive(p) for p in pids)
    with pytest.raises(RuntimeError):  # like every concurrent.futures executor
        ex.submit(add, 1)
    with pytest.raises(mpop.ShutdownError):
        ex.submit(add, 1)


def test_crashed_worker_fails_only_its_task():
    with mpop.Executor(max_workers=2, max_retries=0) as ex:
        futs = [ex.submit(crash_on, i, 3) for i in range(10)]
        for i, f in enumerate(futs):
            if i == 3:
                assert isinstance(f.exception(timeout=TIMEOUT), mpop.WorkerCrashedError)
            else:
                assert f.result(timeout=TIMEOUT) == i
        # The executor keeps working.
        assert ex.submit(add, 20, 1).result(timeout=TIMEOUT) == 21


def test_exceptions_propagate():
    with mpop.Executor(max_workers=1) as ex:
        fut = ex.submit(int, "not a number")
        with pytest.raises(ValueError):
            fut.result(timeout=TIMEOUT)
