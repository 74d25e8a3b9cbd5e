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
from _helpers import leak_check

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
