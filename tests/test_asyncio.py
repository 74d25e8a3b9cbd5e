"""asyncio: `await app.submit(...)`, `await app.asubmit(...)` and `app.amap(...)` in a running event loop, without
blocking the loop (a ticker coroutine keeps running while tasks do) and without a thread
per await; exceptions, cancellation, order, and amap's bounded read-ahead."""

from __future__ import annotations

import asyncio
import os
import threading
import time

import numpy as np
import pytest

import mpop
from mpop import MpopApi
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
        a.start()
        try:
            yield a
        finally:
            a.shutdown()


def square(x: int) -> int:
    return x * x


def nap(s: float) -> float:
    time.sleep(s)
    return s


def nap_then(x: int, s: float) -> int:
    time.sleep(s)
    return x


def boom_at(x: int, bad: int = 5) -> int:
    if x == bad:
        raise ValueError(f"bad item {x}")
    return x


def die_at(x: int) -> int:
    if x == 3:
        os._exit(1)
    return x


def touch(path: str, s: float) -> str:
    with open(path, "w"):
        pass
    time.sleep(s)
    return path


def wait_for_file(path: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.005)


def array_total(a) -> float:
    return float(a.sum())


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, TIMEOUT))


class Ticker:
    """A coroutine that counts its turns of the event loop while something else runs."""

    def __init__(self, step: float = 0.005) -> None:
        self.step = step
        self.ticks = 0
        self.task: asyncio.Task | None = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.step)
            self.ticks += 1

    def __enter__(self) -> Ticker:
        self.task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc) -> None:
        self.task.cancel()


# -- await ---------------------------------------------------------------------------------------


def test_await_a_future(app):
    async def main():
        return await app.submit(square, 7), await app.submit(square, x=8)

    assert run(main()) == (49, 64)


def test_await_many_futures_at_once_without_a_thread_each(app):
    threads = []

    async def main():
        futs = [app.submit(nap_then, i, 0.0005 * (i % 3)) for i in range(2000)]
        gathered = asyncio.gather(*futs)
        await asyncio.sleep(0.01)
        threads.append(threading.active_count())  # every await is pending or done by now
        return await gathered

    before = threading.active_count()
    assert run(main()) == list(range(2000))
    assert threads[0] <= before + 1, "awaiting futures started threads"  # + asyncio's own at most


def test_awaiting_keeps_the_loop_running(app):
    async def main():
        with Ticker() as ticker:
            values = await asyncio.gather(*(app.submit(nap, 0.15) for _ in range(4)))
        return values, ticker.ticks

    values, ticks = run(main())
    assert values == [0.15] * 4
    # 0.3 s of tasks on 2 workers with a 5 ms ticker: dozens of turns. A blocked loop
    # (result() called in it) would give none until the end.
    assert ticks >= 5


def test_await_a_done_future_returns_at_once(app):
    fut = app.submit(square, 3)
    assert fut.result(TIMEOUT) == 9

    async def main():
        return await fut

    assert run(main()) == 9


@pytest.mark.parametrize("how", ["submit", "asubmit"])
def test_await_raises_the_handlers_exception_with_the_worker_traceback(app, how):
    async def main():
        await getattr(app, how)(boom_at, 5)

    with pytest.raises(ValueError, match="bad item 5") as info:
        run(main())
    assert "boom_at" in str(info.value.__cause__)


def test_await_outside_an_event_loop_says_so(app):
    fut = app.submit(nap, 0.2)
    with pytest.raises(RuntimeError, match="running asyncio event loop"):
        next(fut.__await__())
    assert fut.result(TIMEOUT) == 0.2


def test_cancelling_the_awaiting_task_cancels_a_task_that_has_not_started():
    with MpopApi(workers=1, worker_batch_size=1, auto_terminate=False) as app:
        app.start()
        blocker = app.submit(nap, 0.5)
        queued = app.submit(square, 4)

        async def main():
            waiting = asyncio.ensure_future(queued)
            await asyncio.sleep(0.05)
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting

        run(main())
        assert queued.cancelled()  # it never runs
        assert blocker.result(TIMEOUT) == 0.5
        assert app.submit(square, 5).result(TIMEOUT) == 25  # the app carries on


def test_cancelling_the_awaiting_task_lets_a_running_task_finish():
    with MpopApi(workers=1, auto_terminate=False) as app:
        app.start()
        running = app.submit(nap, 0.3)

        async def main():
            waiting = asyncio.ensure_future(running)
            await asyncio.sleep(0.1)  # the task has started
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting

        run(main())
        assert running.result(TIMEOUT) == 0.3  # as concurrent.futures.Future.cancel() means


def test_executor_futures_can_be_awaited():
    with mpop.Executor(max_workers=1) as ex:
        async def main():
            return await ex.submit(square, 6)

        assert run(main()) == 36


# -- amap --------------------------------------------------------------------------------------


def test_amap_yields_in_order(app):
    async def main():
        return [v async for v in app.amap(square, range(3000))]

    assert run(main()) == [x * x for x in range(3000)]


def test_amap_several_iterables(app):
    async def main():
        return [v async for v in app.amap(pow, [2, 3, 4], [5, 2, 1, 9])]

    assert run(main()) == [32, 9, 4]


def test_amap_unordered_yields_as_chunks_finish(app):
    # Chunks of one item, the first one slow: unordered, it comes last.
    async def main():
        ordered = [v async for v in app.amap(nap_then, range(6), [0.3] + [0.0] * 5, chunksize=1)]
        unordered = [v async for v in app.amap(nap_then, range(6), [0.3] + [0.0] * 5, chunksize=1,
                                               ordered=False)]
        return ordered, unordered

    ordered, unordered = run(main())
    assert ordered == list(range(6))
    assert sorted(unordered) == list(range(6))
    assert unordered[-1] == 0


def test_amap_keeps_the_loop_running(app):
    async def main():
        with Ticker() as ticker:
            values = [v async for v in app.amap(nap, [0.05] * 8, chunksize=1)]
        return values, ticker.ticks

    values, ticks = run(main())
    assert values == [0.05] * 8
    assert ticks >= 5


def test_amap_raises_for_its_own_item_after_the_values_before_it(app):
    async def main():
        got = []
        with pytest.raises(ValueError, match="bad item 5") as info:
            async for v in app.amap(boom_at, range(10), chunksize=3):
                got.append(v)
        return got, info.value

    got, exc = run(main())
    assert got == [0, 1, 2, 3, 4]
    assert "boom_at" in str(exc.__cause__)


def test_amap_raises_the_inputs_own_error_in_its_place(app):
    def items():
        yield 1
        yield 2
        raise KeyError("input broke")

    async def main():
        got = []
        with pytest.raises(KeyError, match="input broke"):
            async for v in app.amap(square, items()):
                got.append(v)
        return got

    assert run(main()) == [1, 4]


def test_amap_raises_a_crash_for_its_own_chunk():
    with MpopApi(workers=1, max_retries=0, auto_terminate=False) as app:
        async def main():
            got = []
            with pytest.raises(mpop.WorkerCrashedError):
                async for v in app.amap(die_at, range(8), chunksize=1):
                    got.append(v)
            return got

        assert run(main()) == [0, 1, 2]
        assert app.submit(square, 2).result(TIMEOUT) == 4  # a replacement worker carries on


def test_amap_with_a_slow_consumer_reads_ahead_a_bounded_number_of_items(app):
    read = 0

    def items():
        nonlocal read
        for i in range(200):
            read += 1
            yield i

    async def main():
        ahead = []
        got = []
        async for v in app.amap(square, items(), max_in_flight=8, chunksize=2):
            got.append(v)
            ahead.append(read - len(got))
            await asyncio.sleep(0.001)  # slower than the workers
        return got, ahead

    got, ahead = run(main())
    assert got == [x * x for x in range(200)]
    # max_in_flight items in flight, plus the chunk being handed out and one read but not
    # yet sent: never the whole input.
    assert max(ahead) <= 8 + 2 + 2, max(ahead)


def test_amap_waits_for_room_in_a_full_ring_without_blocking_the_loop():
    with MpopApi(workers=1, queue_slots=2, worker_batch_size=1, auto_terminate=False) as app:
        for _ in range(6):
            app.enqueue(nap, args=(0.1,))  # the ring stays full of these for 0.6 s
        app.start()

        async def main():
            with Ticker() as ticker:
                values = [v async for v in app.amap(square, range(40), chunksize=4)]
            return values, ticker.ticks

        values, ticks = run(main())
        assert values == [x * x for x in range(40)]
        assert ticks >= 5
        assert app.wait(TIMEOUT)


# -- asubmit -------------------------------------------------------------------------------------


def test_asubmit_gives_the_value(app):
    async def main():
        return await app.asubmit(square, 7), await app.asubmit(nap_then, x=3, s=0.0)

    assert run(main()) == (49, 3)


def test_asubmit_checks_its_arguments_at_the_call(app):
    with pytest.raises(TypeError):
        app.asubmit(square, 1, 2)  # square takes one argument
    with pytest.raises(TypeError, match="cannot be serialised"):
        run(app.asubmit(square, threading.Lock()))  # found when it is sent
    after = MpopApi(workers=1)
    after.shutdown()
    with pytest.raises(mpop.ShutdownError):
        after.asubmit(square, 1)


def test_asubmit_waits_for_room_in_a_full_ring_without_blocking_the_loop(tmp_path):
    """The ring (2 slots) is full of tasks that wait for a file: asubmit() waits in the
    loop, which keeps running; submit() would block it until the file appears."""
    gate = tmp_path / "gate"
    with MpopApi(workers=1, queue_slots=2, worker_batch_size=1, auto_terminate=False) as app:
        app.start()
        for _ in range(3):  # one running, two in the ring
            app.enqueue(wait_for_file, args=(str(gate),))

        async def main():
            with Ticker() as ticker:
                pending = asyncio.ensure_future(app.asubmit(square, 9))
                await asyncio.sleep(0.3)
                waited = not pending.done()
                ticks_while_full = ticker.ticks
                gate.touch()
                value = await pending
            return waited, ticks_while_full, value

        waited, ticks, value = run(main())
        assert waited and value == 81
        assert ticks >= 5  # the loop ran while the ring was full (0.3 s of 5 ms turns)
        assert app.wait(TIMEOUT)


def test_cancelling_asubmit_while_it_waits_for_room_sends_nothing(tmp_path):
    gate = tmp_path / "gate"
    with MpopApi(workers=1, queue_slots=2, worker_batch_size=1, auto_terminate=False) as app:
        app.start()
        for _ in range(3):
            app.enqueue(wait_for_file, args=(str(gate),))

        async def main():
            pending = asyncio.ensure_future(app.asubmit(touch, str(tmp_path / "sent"), 0.0))
            await asyncio.sleep(0.1)
            pending.cancel()
            with pytest.raises(asyncio.CancelledError):
                await pending

        run(main())
        gate.touch()
        assert app.wait(TIMEOUT)
        assert not (tmp_path / "sent").exists()


def test_leaving_amap_early_cancels_the_chunks_not_started(tmp_path):
    with MpopApi(workers=1, auto_terminate=False) as app:
        app.start()

        async def main():
            it = app.amap(touch, [str(tmp_path / f"{i}") for i in range(12)], [0.1] * 12, chunksize=1)
            async for _ in it:
                break
            await it.aclose()

        run(main())
        assert app.wait(TIMEOUT)
        # The first item, and the one the worker had started meanwhile at most: the rest of
        # the window (eight chunks) was cancelled.
        assert len(os.listdir(tmp_path)) <= 3


def test_cancelling_the_task_that_iterates_amap_cancels_its_chunks(tmp_path):
    with MpopApi(workers=1, auto_terminate=False) as app:
        app.start()

        async def consume():
            async for _ in app.amap(touch, [str(tmp_path / f"{i}") for i in range(12)], [0.1] * 12,
                                    chunksize=1):
                pass

        async def main():
            task = asyncio.ensure_future(consume())
            await asyncio.sleep(0.15)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        run(main())
        assert app.wait(TIMEOUT)
        assert len(os.listdir(tmp_path)) <= 4


def test_amap_sends_numpy_arrays(app):
    arrays = [np.full(1000, i, dtype=np.float64) for i in range(5)]

    async def main():
        return [v async for v in app.amap(array_total, arrays)]

    assert run(main()) == [1000.0 * i for i in range(5)]


def test_amap_checks_its_arguments_at_the_call(app):
    with pytest.raises(TypeError, match="at least one iterable"):
        app.amap(square)
    with pytest.raises(ValueError, match="chunksize"):
        app.amap(square, range(3), chunksize=0)
    with pytest.raises(ValueError, match="max_in_flight"):
        app.amap(square, range(3), max_in_flight=0)


def test_amap_after_shutdown_raises():
    app = MpopApi(workers=1)
    app.shutdown()
    with pytest.raises(mpop.ShutdownError):
        app.amap(square, range(3))
