"""The owner's result path: drains the native collector in batches and delivers each result
to where its task came from: a Future (submit), a map() call, or the plain results of
enqueue()d tasks (results(), wait(), run())."""

from __future__ import annotations

import collections
import logging
import pickle
import threading
import time
from concurrent.futures import CancelledError, Future, InvalidStateError
from concurrent.futures._base import CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED, PENDING, RUNNING
from typing import Any, Callable

from ._core import LazyTracked
from ._errors import MpopError, RemoteTraceback, ShutdownError, TaskTimeoutError, WorkerCrashedError
from ._results import TaskResult

__all__ = ["Dispatcher", "ROUTE_PLAIN", "ROUTE_FUTURE", "MapState", "MpopFuture"]

log = logging.getLogger("mpop")

ROUTE_PLAIN = 0
ROUTE_FUTURE = 1

OK, ERROR, CRASHED, TIMEOUT, CANCELLED_STATUS = range(5)
_CANCELLED_STATES = (CANCELLED, CANCELLED_AND_NOTIFIED)
_DONE_STATES = (CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED)


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


class MpopFuture(LazyTracked, Future):
    """A concurrent.futures.Future that costs one object until somebody needs more.

    Future.__init__ builds a Condition (an RLock, a deque, five bound methods) and two
    lists for every instance; at a few hundred thousand futures in flight, creating them
    and the garbage collector walking them took more of the owner's time than the tasks.
    Here the state lives in class defaults until it changes, the lock is one RLock shared
    by the app's futures (concurrent.futures.wait and as_completed only acquire and
    release `_condition`, and an RLock lets them take it once per future), and the waiter
    and callback lists are made on first use. A future from the native submit() path
    starts untracked by the garbage collector, which then never walks the futures a caller
    holds; it is tracked again once it holds anything that could refer back to it
    (LazyTracked).

    Blocking waits (result(), exception()) never sleep on `_condition`: they drain results
    in the waiting thread (Dispatcher.help_until), so a round trip costs no hand-off
    through the background thread. Each app uses its own subclass, made by its
    Dispatcher, which sets `_dispatcher` and `_condition`."""

    _state = PENDING
    _result = None
    _exception = None
    _dispatcher: "Dispatcher"
    _condition: threading.Condition

    __init__ = object.__init__  # nothing per instance until needed (see above)

    # The lists are set as attributes (not put in __dict__): that tracks a future that
    # submit() left untracked by the garbage collector (LazyTracked), since a waiter or a
    # callback may refer back to it.
    def _list(self, name: str) -> list:
        lst = self.__dict__.get(name)
        if lst is None:
            with self._condition:
                lst = self.__dict__.get(name)
                if lst is None:
                    lst = []
                    setattr(self, name, lst)
        return lst

    @property
    def _waiters(self) -> list:
        return self._list("_w")

    @property
    def _done_callbacks(self) -> list:
        return self._list("_cbs")

    def _invoke_callbacks(self) -> None:
        if "_cbs" in self.__dict__:
            super()._invoke_callbacks()

    def cancelled(self) -> bool:
        return self._state in _CANCELLED_STATES

    def running(self) -> bool:
        return self._state == RUNNING

    def done(self) -> bool:
        return self._state in _DONE_STATES

    def cancel(self) -> bool:
        """Cancels the task if it has not started: True means it never runs (its worker
        skips it), False that it may have started, as concurrent.futures means it. A task
        still being claimed by a worker, or being moved after its worker died, cannot be
        cancelled either."""
        with self._condition:
            if self._state in (RUNNING, FINISHED):
                return False
            if self._state in _CANCELLED_STATES:
                return True
        if not self._dispatcher.try_cancel(self):
            return False
        self._set_cancelled()
        return True

    def _set_cancelled(self) -> None:
        """Ends the future as cancelled, notifying its waiters and callbacks at once."""
        with self._condition:
            if self._state != PENDING:
                return
            self._state = CANCELLED_AND_NOTIFIED
            for waiter in self.__dict__.get("_w", ()):
                waiter.add_cancelled(self)
            self._condition.notify_all()
        self._invoke_callbacks()

    def _help(self, timeout: float | None) -> None:
        if self._state not in _DONE_STATES:
            deadline = None if timeout is None else time.monotonic() + timeout
            self._dispatcher.help_until(self.done, deadline, spin=True)

    def result(self, timeout: float | None = None) -> Any:
        self._help(timeout)
        state = self._state
        if state == FINISHED:
            if self._exception is not None:
                try:
                    raise self._exception
                finally:
                    self = None  # noqa: PLW0642 - break the cycle through the traceback
            return self._result
        if state in _CANCELLED_STATES:
            raise CancelledError()
        raise TimeoutError()

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self._help(timeout)
        state = self._state
        if state == FINISHED:
            return self._exception
        if state in _CANCELLED_STATES:
            raise CancelledError()
        raise TimeoutError()

    def _set_value(self, value: Any) -> None:
        """set_result(value) for a result that came in (a pending future: a cancelled one's
        task never runs, see cancel())."""
        with self._condition:
            state = self._state
            if state != PENDING:
                raise InvalidStateError(f"{state}: {self!r}")
            self._result = value
            self._state = FINISHED
            for waiter in self.__dict__.get("_w", ()):
                waiter.add_result(self)
        if "_cbs" in self.__dict__:
            self._invoke_callbacks()

    def set_running_or_notify_cancel(self) -> bool:
        # cancel() notifies at once (the state is never left at CANCELLED).
        with self._condition:
            if self._state in _CANCELLED_STATES:
                return False
            if self._state == PENDING:
                self._state = RUNNING
                return True
        raise RuntimeError(f"Future in unexpected state: {self._state}")

    def set_result(self, result: Any) -> None:
        with self._condition:
            if self._state in _DONE_STATES:
                raise InvalidStateError(f"{self._state}: {self!r}")
            self._result = result
            self._state = FINISHED
            for waiter in self.__dict__.get("_w", ()):
                waiter.add_result(self)
        self._invoke_callbacks()

    def set_exception(self, exception: BaseException) -> None:
        with self._condition:
            if self._state in _DONE_STATES:
                raise InvalidStateError(f"{self._state}: {self!r}")
            self._exception = exception
            self._state = FINISHED
            for waiter in self.__dict__.get("_w", ()):
                waiter.add_exception(self)
        self._invoke_callbacks()


class MapState:
    """Results of one map() call, keyed by the item's index (carried as tsk_id)."""

    __slots__ = ("results", "closed", "received", "sent", "touched")

    def __init__(self) -> None:
        self.results: dict[int, tuple[int, Any]] = {}
        self.closed = False
        self.received = 0
        self.sent = 0  # chunks pushed
        self.touched = time.monotonic()  # when the caller last drove the iterator


class Dispatcher:
    TIMING_WINDOW = 10_000  # results whose timings status() summarises

    def __init__(self, collector, names: Callable[[int], str], config: dict,
                 submitted: Callable[[], int] = lambda: 0) -> None:
        self._submitted = submitted
        self._collector = collector
        self._names = names
        self._config = config
        # One thread drains at a time. Reentrant: a done callback, called while its thread
        # drains, may cancel or wait for another future.
        self._drain_lock = threading.RLock()
        self.cond = threading.Condition(threading.Lock())  # notified after every batch
        self._finished_at_release = 0  # see finished
        # Every task with a seq below this has its final result (or was cancelled): what a
        # caller waits on to know that the tasks it enqueued are done, whatever other
        # threads submit meanwhile. Updated by the draining thread after each batch.
        self.complete_below = 1
        self.plain: collections.deque[TaskResult] = collections.deque()
        self.futures: dict[int, Future] = {}
        self.early: dict[int, tuple] = {}  # future results that beat their registration
        self.maps: dict[int, MapState] = {}
        # Seqs of futures cancelled before their task ran (see try_cancel): their records,
        # when the workers skip them, are only acknowledged.
        self._cancelled: set[int] = set()
        self._seq_by_future: dict[int, int] = {}  # id(future) -> seq, rebuilt on a miss
        # (queue_wait_s, run_time_s) of the latest results of every kind, for status(): a
        # window, so that an app that only submits never grows it without bound.
        self.timings: collections.deque[tuple[float, float]] = collections.deque(maxlen=self.TIMING_WINDOW)
        self.keep_timings = not config.get("max_performance", False)
        self.debug = config.get("debug", False) and not config.get("max_performance", False)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        # A fork() child's copy of its parent's dispatcher: the results are the parent's.
        self.inherited = False
        self._idle = False  # the background thread sleeps: nothing in flight
        # Callers blocked in help_until (future.result(), map, run...), under `cond`. While
        # there are any, the background thread leaves draining to them: a result then goes
        # straight to the thread that waits for it, with no hand-off between threads.
        self._helpers = 0
        # What the background thread waits on while it leaves draining to others. Not
        # `cond`: that one is notified after every batch, and each notification would have
        # the background thread take the GIL from the thread that drains.
        self._bg_wake = threading.Event()
        self._bg_pumping = False  # the background thread holds the drain lock
        self._pump_want = 0  # results the draining thread waits for (0: not waiting)
        self._pump_depth = 0  # pumps under way in the draining thread (a callback may nest one)
        # This app's futures: their class carries the dispatcher and the one lock they share.
        cond = threading.Condition(threading.RLock())
        self.future_cls = type("MpopFuture", (MpopFuture,), {
            "__module__": __name__, "__qualname__": "MpopFuture",
            "_dispatcher": self, "_condition": cond})
        # Results that need no Python code (ok values of futures and of enqueue()d tasks)
        # are settled by the collector itself (Collector.settle); the rest come back here.
        # With debug, every result goes through _deliver, which logs it.
        self._native_settle = None
        if not self.debug and hasattr(collector, "bind_settle"):
            collector.bind_settle(self.futures, self.future_cls, PENDING, FINISHED, cond.acquire, cond.release,
                                  TaskResult, self.plain.append,
                                  self.timings.append if self.keep_timings else None)
            self._native_settle = collector.settle

    # -- draining ---------------------------------------------------------------------------

    def pump(self, timeout: float | None, want: int = 1, spin: bool = False, epoch: int | None = None) -> int:
        """Drains one batch, first waiting up to `timeout` for `want` results (spinning
        briefly first if `spin`). Caller must hold the drain lock."""
        if self._collector is None:
            raise ShutdownError("the app was shut down")
        self._pump_want = want  # see help_until
        try:
            if self._native_settle is not None:
                n, batch, slow_futures = self._native_settle(4096, timeout, want, spin, epoch)
            else:
                batch = self._collector.drain(4096, timeout, want, spin, epoch)
                n, slow_futures = len(batch), ()
        finally:
            self._pump_want = 0
        if not n:
            return 0
        # These results left the ring: the rest are delivered even if the delivery of one
        # raises (a Ctrl-C in this thread, say); the first exception is raised after.
        interrupted: BaseException | None = None
        self._pump_depth += 1
        try:
            for item in (*slow_futures, *batch) if slow_futures or batch else ():
                try:
                    if len(item) == 2:  # a future waited on or with callbacks
                        self._set_future(*item)
                    else:  # a record the collector did not settle itself: see _deliver
                        self._deliver(item)
                except BaseException as e:
                    if interrupted is None:
                        interrupted = e
        finally:
            self._pump_depth -= 1
        # Only the outermost pump says what is complete: a done callback may pump again
        # (the drain lock is reentrant) while the outer batch is still being delivered.
        if not self._pump_depth:
            self.complete_below = self._collector.first_incomplete
        with self.cond:
            self.cond.notify_all()
        if interrupted is not None:
            raise interrupted
        return n

    @staticmethod
    def _set_future(fut: Future, value: Any) -> None:
        try:
            fut._set_value(value)
        except InvalidStateError:  # the user settled it (set_result): theirs stands
            log.debug("result of an already settled future dropped: %r", fut)

    @property
    def finished(self) -> int:
        """Tasks that have had their final result (of every kind: a count, not which),
        counted natively with the drain, so that it stays exact whatever interrupts this
        thread between a drain and the delivery that follows it."""
        c = self._collector
        return c.completed if c is not None else self._finished_at_release

    def help_until(self, done: Callable[[], bool], deadline: float | None,
                   check: Callable[[], None] | None = None, want: Callable[[], int] | None = None,
                   spin: bool = False) -> bool:
        """Drains (or waits for whoever drains) until `done()` or the deadline.

        `want()` is how many results `done()` needs at least (default 1): the native wait
        sleeps until that many are in rather than waking for each. `spin` is for a caller
        that waits for one result and wants it with the least latency."""
        if done():
            return True
        if self.inherited:
            raise MpopError("this result belongs to the process that created the MpopApi; a fork() "
                            "child cannot wait for it")
        with self.cond:
            self._helpers += 1
        try:
            while not done():
                if self._collector is None:
                    raise ShutdownError("the app was shut down")
                if check is not None:
                    check()
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return done()
                step = 0.05 if remaining is None else min(remaining, 0.05)
                if self._drain_lock.acquire(blocking=False):
                    try:
                        self.pump(step, 1 if want is None else max(1, want()), spin)
                    finally:
                        self._drain_lock.release()
                else:
                    # Another caller drains, or the background thread: that one is told to
                    # step aside (it looks at _helpers before every wait of its own), and
                    # so is a caller that waits for a run of results (run(), wait()): the
                    # result this one needs may already be in, and is drained with the rest.
                    if self._bg_pumping or self._pump_want > 1:
                        self._collector.interrupt()
                        step = min(step, 0.001)
                    with self.cond:
                        if not done():
                            self.cond.wait(step)
            return True
        finally:
            with self.cond:
                self._helpers -= 1
                last = not self._helpers
            if last and self.futures:
                self._bg_wake.set()  # futures nobody waits on are the background thread's again

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
        while not self._stop.is_set():
            try:
                self._background_step()
            except Exception:  # never let one bad record end result delivery for the app
                log.exception("mpop: error while delivering results (continuing)")
                self._stop.wait(0.01)

    _STEP_ASIDE_POLL_S = 0.05  # see _background_step

    def _background_step(self) -> None:
        """One turn of the background thread: drains what no caller drains."""
        # Read before looking at _stop: an interrupt from stop_background() after this
        # ends the wait below even if it came before the wait began.
        epoch = self._collector.epoch
        if self._stop.is_set():
            return
        if self._helpers or (not self.futures and self._maps_driven()):
            # A caller waits in help_until and drains for itself, or every task in flight
            # is a chunk of a map() whose caller is working through it (and drains when it
            # needs the next chunk): taking the results from under it would only add
            # hand-offs of the GIL between the two threads. Whoever hands results back to
            # this thread sets _bg_wake (the last helper leaving, a map closing with chunks
            # still in flight); the timeout only bounds how long it takes to notice a map
            # whose caller stopped iterating. Each turn costs this thread about 75 us of
            # CPU on the cores the workers need: every 10 ms, that was 0.8% of a core for
            # the whole of every long map.
            self._bg_wake.wait(self._STEP_ASIDE_POLL_S)
            self._bg_wake.clear()
            return
        if not self._drain_lock.acquire(timeout=0.05):
            return
        self._bg_pumping = True  # before looking at _helpers: see help_until
        try:
            if self._helpers:
                return
            pending = len(self.futures)
            if pending:
                # Futures nobody waits on in a blocking call (callbacks, wait(),
                # as_completed): a lone one's result at once; with many in flight, in runs
                # of up to 256 or every 2 ms, so that neither this thread nor the workers
                # pay a wake-up per result.
                self.pump(0.05 if pending == 1 else 0.002, min(pending, 256))
                return
            outstanding = self._submitted() - self.finished
            if outstanding > 0:
                # Plain tasks in flight and the caller busy enqueuing (callers that block
                # in run, map or wait drain for themselves): drain once results for all of
                # them are in, or half the result ring, or 5 ms have passed. The workers
                # pay one wake-up per batch, and a producer waiting for room in a full
                # task ring waits for one batch, not for a poll.
                self.pump(0.005, outstanding)
                return
            # Nothing in flight: sleep in the native wait, without a timeout, until a result
            # comes in (so an idle app costs no CPU and a push needs no wake-up call of its
            # own). Callers and stop_background() interrupt it.
            self._idle = True
            try:
                self.pump(None, epoch=epoch)
            finally:
                self._idle = False
        finally:
            self._bg_pumping = False
            self._drain_lock.release()

    def _maps_driven(self) -> bool:
        """Whether every task in flight is a chunk of an open map() whose caller drove its
        iterator in the last 10 ms."""
        maps = list(self.maps.values())
        if not maps:
            return False
        now = time.monotonic()
        in_flight = 0
        for state in maps:
            if state.closed or now - state.touched > 0.01:
                return False
            in_flight += state.sent - state.received
        return self._submitted() - self.finished <= in_flight

    def close_map(self, route: int, state: MapState) -> None:
        """A map() ended (finished, failed or abandoned). The background thread stepped aside
        for it: it is woken only if something is left for it to drain (this map's chunks
        still in flight, other tasks, futures); otherwise a wake-up would only cost it, and
        a core the workers need, tens of microseconds."""
        state.closed = True
        self.maps.pop(route, None)
        if self.futures or self._submitted() != self.finished:
            self._bg_wake.set()

    def wake_helpers(self) -> None:
        """Makes callers blocked in help_until look at their condition again now."""
        self._collector.interrupt()
        with self.cond:
            self.cond.notify_all()

    def release(self) -> None:
        """After shutdown (background thread stopped, every future settled): drops the
        native collector and what is left to deliver, so that futures a caller keeps, which
        refer to this dispatcher through their class, keep nothing else alive. A thread
        still draining (a map, a wait in another thread) is interrupted first, and raises
        ShutdownError at its next drain."""
        self._lock_drain()
        try:
            self._finished_at_release = self._collector.completed
            self._collector.unbind_settle()
            self._collector = self._native_settle = None
            self._submitted = int  # 0: the producer (and its segment) is let go too
            self.futures.clear()
            self.early.clear()
            self.maps.clear()
            self.plain.clear()
        finally:
            self._drain_lock.release()

    def stop_background(self) -> None:
        self._stop.set()
        self._bg_wake.set()
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
            if seq in self._cancelled:  # its future was cancelled already (try_cancel)
                self._cancelled.discard(seq)
                self._collector.release_cancel(seq)
                return
            fut = self.futures.pop(seq, None)
            if fut is None:
                # The result beat register_future (the submitting thread lost the GIL
                # between its push and the registration). No lock: each dict operation is
                # atomic, and whichever side pops the record from `early` settles.
                self.early[seq] = rec
                fut = self.futures.pop(seq, None)
                if fut is None or self.early.pop(seq, None) is None:
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
        try:
            self._settle_one(fut, rec)
        except (InvalidStateError, RuntimeError):  # the user settled it (set_result): theirs stands
            log.debug("result of an already settled future dropped: %r", fut)

    def _settle_one(self, fut: Future, rec: tuple) -> None:
        seq, tsk_id, fn_id, worker_id, attempts, status, value = rec[:7]
        if status == CANCELLED_STATUS:  # shutdown(cancel_pending=True) took it off the queue
            fut._set_cancelled()
        elif status == OK:
            fut._set_value(value)
        else:
            fut.set_exception(self._error_for(status, value, tsk_id, fn_id, worker_id, attempts))

    def register_future(self, seq: int, fut: Future) -> None:
        self.futures[seq] = fut
        if self.early:  # see _deliver
            rec = self.early.pop(seq, None)
            if rec is not None:
                self.futures.pop(seq, None)
                self._settle(fut, rec)
                return

    def fail_all(self, exc_factory: Callable[[], BaseException]) -> None:
        """Ends every future still waiting (used at shutdown)."""
        while self.futures:
            try:
                _, fut = self.futures.popitem()
            except KeyError:  # emptied meanwhile by the draining thread
                break
            if fut.set_running_or_notify_cancel():
                fut.set_exception(exc_factory())

    def _lock_drain(self) -> None:
        # The drainer may be asleep in a wait (the background thread, idle, has no
        # timeout): interrupt it until the lock is ours.
        while not self._drain_lock.acquire(timeout=0.001):
            self._collector.interrupt()

    def _seq_of(self, fut: Future) -> int | None:
        seq = self._seq_by_future.get(id(fut))
        if seq is None or self.futures.get(seq) is not fut:
            self._seq_by_future = {id(f): s for s, f in list(self.futures.items())}
            seq = self._seq_by_future.get(id(fut))
        return seq

    def try_cancel(self, fut: Future) -> bool:
        """Cancels `fut`'s task if it has not started; True means it never runs. The
        decision is native (Segment::request_cancel); under the drain lock, so that the
        future's record cannot be delivered meanwhile."""
        if self._collector is None or self.inherited:
            return False
        seq = self._seq_of(fut)
        if seq is None:
            return False
        self._lock_drain()
        try:
            if (self._collector is None or self.futures.get(seq) is not fut
                    or not self._collector.request_cancel(seq)):
                return False
            del self.futures[seq]
            self._seq_by_future.pop(id(fut), None)
            self._cancelled.add(seq)
            return True
        finally:
            self._drain_lock.release()

    def cancel(self, seq: int, tsk_id: int, fn_id: int, route: int) -> None:
        """Delivers a cancellation for a task removed from the queue before it ran."""
        self._lock_drain()
        try:
            self._deliver((seq, tsk_id, fn_id, 0, 0, CANCELLED_STATUS, None, 0, 0, 0, route))
            self._collector.mark_complete(seq)
            self.complete_below = self._collector.first_incomplete
        finally:
            self._drain_lock.release()
        with self.cond:
            self.cond.notify_all()
