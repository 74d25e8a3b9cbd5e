"""The owner's result path: drains the native collector in batches and delivers each result
to where its task came from: a Future (submit), a map() call, or the plain results of
enqueue()d tasks (results(), wait(), run())."""

from __future__ import annotations

import collections
import logging
import pickle
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable

from ._errors import MpopError, RemoteTraceback, TaskTimeoutError, WorkerCrashedError
from ._results import TaskResult

__all__ = ["Dispatcher", "ROUTE_PLAIN", "ROUTE_FUTURE", "MapState", "MpopFuture"]

log = logging.getLogger("mpop")

ROUTE_PLAIN = 0
ROUTE_FUTURE = 1

OK, ERROR, CRASHED, TIMEOUT, CANCELLED = range(5)


def unpack_error(value: Any) -> BaseException:
    """The exception a worker sent, with its traceback attached as __cause__."""
    if isinstance(value, BaseException):  # could not even be decoded here
        return value
    try:
        packed = pickle.loads(value)
    except Exception as e:  # pragma: no cover - defensive
        return MpopError(f"a handler failed and its error could not be decoded: {e!r}")
    if packed[0] is not None:
        exc, tb = packed
    else:
        _, tb, type_name, text = packed
        exc = MpopError(f"{type_name}: {text} (the original exception could not be pickled)")
    exc.__cause__ = RemoteTraceback(tb)
    return exc


class MpopFuture(Future):
    """A Future whose blocking waits drain results in the waiting thread, so a round trip
    costs no hand-off through the background thread."""

    _dispatcher: "Dispatcher"

    def _help(self, timeout: float | None) -> None:
        if not self.done():
            deadline = None if timeout is None else time.monotonic() + timeout
            self._dispatcher.help_until(self.done, deadline)

    def result(self, timeout: float | None = None) -> Any:
        self._help(timeout)
        return super().result(timeout=0 if self.done() else timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self._help(timeout)
        return super().exception(timeout=0 if self.done() else timeout)


class MapState:
    """Results of one map() call, keyed by the item's index (carried as tsk_id)."""

    __slots__ = ("results", "closed", "received")

    def __init__(self) -> None:
        self.results: dict[int, tuple[int, Any]] = {}
        self.closed = False
        self.received = 0


class Dispatcher:
    TIMING_WINDOW = 10_000  # results whose timings status() summarises

    def __init__(self, collector, names: Callable[[int], str], config: dict,
                 submitted: Callable[[], int] = lambda: 0) -> None:
        self._submitted = submitted
        self._collector = collector
        self._names = names
        self._config = config
        self._drain_lock = threading.Lock()  # one thread drains at a time
        self._route_lock = threading.Lock()  # futures <-> early results
        self.cond = threading.Condition(threading.Lock())  # notified after every batch
        self.finished = 0
        self.plain: collections.deque[TaskResult] = collections.deque()
        self.futures: dict[int, Future] = {}
        self.early: dict[int, tuple] = {}  # future results that beat their registration
        self.maps: dict[int, MapState] = {}
        # (queue_wait_s, run_time_s) of the latest results of every kind, for status(): a
        # window, so that an app that only submits never grows it without bound.
        self.timings: collections.deque[tuple[float, float]] = collections.deque(maxlen=self.TIMING_WINDOW)
        self.keep_timings = not config.get("max_performance", False)
        self.debug = config.get("debug", False) and not config.get("max_performance", False)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._work = threading.Event()  # wakes the background thread
        self._sleeping = False  # the background thread waits on _work (set it only then)
        # Callers blocked in help_until (future.result(), map, run...), under `cond`. While
        # there are any, the background thread leaves draining to them: a result then goes
        # straight to the thread that waits for it, with no hand-off between threads.
        self._helpers = 0
        self._bg_pumping = False  # the background thread holds the drain lock

    # -- draining ---------------------------------------------------------------------------

    def pump(self, timeout: float | None) -> int:
        """Drains one batch (waiting up to `timeout` for the first result). Caller must
        hold the drain lock."""
        batch = self._collector.drain(4096, timeout)
        if not batch:
            return 0
        for rec in batch:
            self._deliver(rec)
        with self.cond:
            self.finished += len(batch)
            self.cond.notify_all()
        return len(batch)

    def help_until(self, done: Callable[[], bool], deadline: float | None,
                   check: Callable[[], None] | None = None) -> bool:
        """Drains (or waits for whoever drains) until `done()` or the deadline."""
        if done():
            return True
        with self.cond:
            self._helpers += 1
        try:
            while not done():
                if check is not None:
                    check()
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return done()
                step = 0.05 if remaining is None else min(remaining, 0.05)
                if self._drain_lock.acquire(blocking=False):
                    try:
                        self.pump(step)
                    finally:
                        self._drain_lock.release()
                else:
                    # Another caller drains, or the background thread: that one is told to
                    # step aside (it looks at _helpers before every wait of its own).
                    if self._bg_pumping:
                        self._collector.interrupt()
                        step = min(step, 0.001)
                    with self.cond:
                        if not done():
                            self.cond.wait(step)
            return True
        finally:
            with self.cond:
                self._helpers -= 1

    def start_background(self) -> None:
        """A thread that keeps results moving when no caller drains them: for futures nobody
        waits on in a blocking call (callbacks, asyncio.wrap_future, concurrent.futures.wait),
        and for enqueue()d tasks while the caller is busy enqueuing (otherwise the result
        ring fills, workers stall, and a blocking enqueue would wait for ever)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run_background, name="mpop-results", daemon=True)
        self._thread.start()

    def _run_background(self) -> None:
        while True:
            if self._stop.is_set():
                return
            if self.futures:
                if self._helpers:
                    # A caller waits for a result and drains for itself.
                    with self.cond:
                        if self._helpers:
                            self.cond.wait(0.01)
                    continue
                if self._drain_lock.acquire(timeout=0.05):
                    self._bg_pumping = True  # before looking at _helpers: see help_until
                    try:
                        if not self._helpers:
                            self.pump(0.05)
                    finally:
                        self._bg_pumping = False
                        self._drain_lock.release()
                continue
            if self._submitted() <= self.finished:
                # Nothing in flight. A new future wakes us at once (_sleeping goes up before
                # the re-check, so its producer either sees it or we see the future); plain
                # tasks need no hurry, so we look again every 10 ms instead of costing every
                # enqueue a wake-up.
                self._sleeping = True
                self._work.clear()
                if not self.futures and not self._stop.is_set():
                    self._work.wait(0.01)
                self._sleeping = False
                continue
            # Tasks in flight and no future: callers that block (run, map, wait) drain for
            # themselves; step in only when results sit undrained. A snapshot read, so the
            # workers never pay a wake-up for this thread.
            if self._stop.wait(0.005):
                return
            if self._collector.pending and self._drain_lock.acquire(blocking=False):
                try:
                    self.pump(0)
                finally:
                    self._drain_lock.release()

    def stop_background(self) -> None:
        self._stop.set()
        self._work.set()
        self._collector.interrupt()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    # -- delivery ---------------------------------------------------------------------------

    def _error_for(self, status: int, value: Any, tsk_id: int, fn_id: int, worker_id: int,
                   attempts: int) -> BaseException:
        if status == ERROR:
            return unpack_error(value)
        if status == CRASHED:
            return WorkerCrashedError(
                f"task {tsk_id} ({self._names(fn_id)}) failed: its worker (id {worker_id}) died "
                f"while running it, {attempts} time(s); max_retries={self._config['max_retries']}")
        if status == TIMEOUT:
            return TaskTimeoutError(
                f"task {tsk_id} ({self._names(fn_id)}) ran longer than task_timeout="
                f"{self._config['task_timeout']}s; its worker (id {worker_id}) was killed")
        from concurrent.futures import CancelledError

        return CancelledError(f"task {tsk_id} was cancelled before it ran")

    def _deliver(self, rec: tuple) -> None:
        seq, tsk_id, fn_id, worker_id, attempts, status, value, enq, start, end, route = rec
        if self.keep_timings and start:
            self.timings.append(((start - enq) / 1e9 if enq else 0.0, (end - start) / 1e9))
        if self.debug and route != ROUTE_PLAIN:
            what = "map chunk" if route >= 2 else "task"
            log.debug("%s %s %s on worker %s -> %s", what, tsk_id, self._names(fn_id), worker_id,
                      "ok" if status == OK else ("error", "crashed", "timed out", "cancelled")[status - 1])
        if route >= 2:
            state = self.maps.get(route)
            if state is not None and not state.closed:
                state.results[tsk_id] = (status, value if status == OK else
                                         self._error_for(status, value, tsk_id, fn_id, worker_id, attempts))
                state.received += 1
            return
        if route == ROUTE_FUTURE:
            with self._route_lock:
                fut = self.futures.pop(seq, None)
                if fut is None:
                    self.early[seq] = rec
                    return
            self._settle(fut, rec)
            return
        error = None if status == OK else self._error_for(status, value, tsk_id, fn_id, worker_id, attempts)
        r = TaskResult(success=status == OK, value=value if status == OK else None, error=error,
                       tsk_id=tsk_id, seq=seq, fn_id=fn_id, worker_id=worker_id, attempts=attempts,
                       queue_wait_s=(start - enq) / 1e9 if enq and start else None,
                       run_time_s=(end - start) / 1e9 if start else None)
        if self.debug:
            log.debug("task %s %s on worker %s -> %s", tsk_id, self._names(fn_id), worker_id,
                      repr(r.value) if r.success else f"{type(error).__name__}: {error}")
        self.plain.append(r)

    def _settle(self, fut: Future, rec: tuple) -> None:
        seq, tsk_id, fn_id, worker_id, attempts, status, value = rec[:7]
        if status == CANCELLED:
            fut.cancel()
            return
        if not fut.set_running_or_notify_cancel():
            return  # the user cancelled it; the task ran anyway
        if status == OK:
            fut.set_result(value)
        else:
            fut.set_exception(self._error_for(status, value, tsk_id, fn_id, worker_id, attempts))

    def register_future(self, seq: int, fut: Future) -> None:
        with self._route_lock:
            rec = self.early.pop(seq, None)
            if rec is None:
                self.futures[seq] = fut
        if rec is not None:
            self._settle(fut, rec)
        elif self._sleeping:
            self._work.set()

    def fail_all(self, exc_factory: Callable[[], BaseException]) -> None:
        """Ends every future still waiting (used at shutdown)."""
        with self._route_lock:
            futures, self.futures = self.futures, {}
        for fut in futures.values():
            if fut.set_running_or_notify_cancel():
                fut.set_exception(exc_factory())

    def cancel(self, seq: int, tsk_id: int, fn_id: int, route: int) -> None:
        """Delivers a cancellation for a task removed from the queue before it ran."""
        with self._drain_lock:
            self._deliver((seq, tsk_id, fn_id, 0, 0, CANCELLED, None, 0, 0, 0, route))
        with self.cond:
            self.finished += 1
            self.cond.notify_all()
