"""ResultRouter: the owner's result path. Drains the native collector in batches and
delivers each result to where its task came from: a future (submit), a map() call, or the
plain results of enqueue()d tasks (results(), wait(), run()), and each side message
(worker output, log records, worker_exit values) to the owner's end of it (_output.py);
runs the background thread that keeps results moving when no caller drains them."""

from __future__ import annotations

import collections
import enum
import itertools
import logging
import pickle
import threading
import time
from concurrent.futures import CancelledError, Future, InvalidStateError
from typing import Any, Callable

from ._core import (FIRST_MAP_ROUTE, FIRST_SIDE_ROUTE, RESULT_STATUS, ROUTE_EXIT, ROUTE_FUTURE, ROUTE_PLAIN,
                    ResultRecord)
from ._errors import MpopError, RemoteTraceback, ShutdownError, TaskTimeoutError, WorkerCrashedError
from ._futures import future_class
from ._results import TaskResult

__all__ = ["ResultRouter", "ResultStatus", "ResultRecord", "ROUTE_PLAIN", "ROUTE_FUTURE", "MapState",
           "unpack_error"]

log = logging.getLogger("mpop")

# How a task ended, as the native core defines it (result_ring.hpp). Routes (where a
# result goes: ROUTE_PLAIN, ROUTE_FUTURE, and from FIRST_MAP_ROUTE up one per map() call)
# and the fields of a ResultRecord are defined there too.
ResultStatus = enum.IntEnum("ResultStatus", RESULT_STATUS)
OK, ERROR, CRASHED, TIMEOUT, CANCELLED_STATUS = (ResultStatus.OK, ResultStatus.ERROR, ResultStatus.CRASHED,
                                                 ResultStatus.TIMEOUT, ResultStatus.CANCELLED)


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


class MapState:
    """Results of one map() call, keyed by the item's index (carried as tsk_id)."""

    __slots__ = ("results", "closed", "received", "sent", "touched")

    def __init__(self) -> None:
        self.results: dict[int, tuple[int, Any]] = {}
        self.closed = False
        self.received = 0
        self.sent = 0  # chunks pushed
        self.touched = time.monotonic()  # when the caller last drove the iterator


class ResultRouter:
    """Delivers one app's results (see the module's docstring)."""

    TIMING_WINDOW = 10_000  # results whose timings status() summarises

    def __init__(self, collector, names: Callable[[int], str], *, max_retries: int,
                 task_timeout: float | None, keep_timings: bool = True, debug: bool = False,
                 submitted: Callable[[], int] = int) -> None:
        """`collector`: the native Collector; `names(fn_id)`: a handler's name for error
        messages; `submitted()`: how many tasks were submitted so far."""
        self._submitted = submitted
        self._collector = collector
        # Where side messages go (an _output.OwnerSide), and what a waiting caller calls to
        # learn that the workers cannot run (Runtime.check_workers): both set by the runtime.
        self.side = None
        self.check: Callable[[], None] | None = None
        self._next_check = 0.0  # when the background thread next calls check
        # Worker output the background thread drained, held back a moment for a caller's
        # thread to write: under Jupyter, text goes to the cell of the thread that writes
        # it, and the background thread belongs to the cell that started the app.
        # (due, route, worker_id, data), in order; touched under the drain lock only.
        self._deferred: collections.deque = collections.deque()
        self._bg_ident = 0
        self._names = names
        self._max_retries = max_retries
        self._task_timeout = task_timeout
        # One thread drains at a time. Reentrant: a done callback, called while its thread
        # drains, may cancel or wait for another future.
        self._drain_lock = threading.RLock()
        self.cond = threading.Condition(threading.Lock())  # notified after every batch
        self._finished_at_release = 0  # see finished
        # Every task with a seq below this has its final result (or was cancelled): what a
        # caller waits on to know that the tasks it enqueued are done, whatever other
        # threads submit meanwhile. Updated by the draining thread after each batch.
        self.complete_below = collector.first_incomplete
        self.plain: collections.deque[TaskResult] = collections.deque()
        # A persistent pool's client: collectors over the mailboxes whose results stay in
        # shared memory until results() or run() takes them (its plain mailbox, and both
        # mailboxes of each client it adopted), as (collector, adopted client or None).
        self._plain_sources: list[tuple[Any, int | None, Callable[[], bool] | None]] = []
        self._plain_lock = threading.Lock()
        self.futures: dict[int, Future] = {}
        self.early: dict[int, tuple] = {}  # future results that beat their registration
        self.maps: dict[int, MapState] = {}
        self._routes = itertools.count(FIRST_MAP_ROUTE)
        # Seqs of futures cancelled before their task ran (see try_cancel): their records,
        # when the workers skip them, are only acknowledged.
        self._cancelled: set[int] = set()
        self._seq_by_future: dict[int, int] = {}  # id(future) -> seq, rebuilt on a miss
        # (queue_wait_s, run_time_s) of the latest results of every kind, for status(): a
        # window, so that an app that only submits never grows it without bound.
        self.timings: collections.deque[tuple[float, float]] = collections.deque(maxlen=self.TIMING_WINDOW)
        self.keep_timings = keep_timings
        self.debug = debug
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        # A fork() child's copy of its parent's router: the results are the parent's.
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
        self._stepping_aside = False  # the background thread waits on _bg_wake
        self._bg_pumping = False  # the background thread holds the drain lock
        self._pump_want = 0  # results the draining thread waits for (0: not waiting)
        self._pump_depth = 0  # pumps under way in the draining thread (a callback may nest one)
        # This app's futures: their class carries the router and the one lock they share.
        cond = threading.Condition(threading.RLock())
        self.future_cls = future_class(self, cond)
        # Results that need no Python code (ok values of futures and of enqueue()d tasks)
        # are settled by the collector itself (Collector.settle); the rest come back here.
        # With debug, every result goes through _deliver, which logs it.
        self._native_settle = None
        if not self.debug and hasattr(collector, "bind_settle"):
            collector.bind_settle(self.futures, cond.acquire, cond.release,
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
        if not n and not batch:
            if self._deferred:
                self._flush_deferred(everything=threading.get_ident() != self._bg_ident)
            return 0
        # These results left the ring: the rest are delivered even if the delivery of one
        # raises (a Ctrl-C in this thread, say); the first exception is raised after.
        interrupted: BaseException | None = None
        self._pump_depth += 1
        try:
            for fut, value in slow_futures:  # waited on or with callbacks
                try:
                    self._set_future(fut, value)
                except BaseException as e:
                    interrupted = interrupted or e
            for rec in batch:  # what the collector did not settle itself: see _deliver
                try:
                    self._deliver(rec)
                except BaseException as e:
                    interrupted = interrupted or e
        finally:
            self._pump_depth -= 1
        if self._deferred:
            self._flush_deferred(everything=threading.get_ident() != self._bg_ident)
        # Only the outermost pump says what is complete: a done callback may pump again
        # (the drain lock is reentrant) while the outer batch is still being delivered.
        if not self._pump_depth:
            self.complete_below = self._collector.first_incomplete
        with self.cond:
            self.cond.notify_all()
        if interrupted is not None:
            raise interrupted
        return n or len(batch)

    def _flush_deferred(self, everything: bool) -> None:
        """Writes the held-back output: all of it, or what waited its moment (under the
        drain lock)."""
        now = time.monotonic()
        while self._deferred and (everything or self._deferred[0][0] <= now):
            _, route, worker_id, data = self._deferred.popleft()
            if self.side is not None:
                self.side.deliver(route, worker_id, data)

    def drain_rest(self) -> None:
        """Delivers whatever is in the result ring now (after the workers stopped: their
        last output and worker_exit values)."""
        if self._collector is None or self.inherited:
            return
        self._lock_drain()
        try:
            while self.pump(0, 1):
                pass
        finally:
            self._drain_lock.release()

    @staticmethod
    def _set_future(fut: Future, value: Any) -> None:
        try:
            fut.deliver(value)
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
            first = True
            while not done():
                if self._collector is None:
                    raise ShutdownError("the app was shut down")
                if check is not None and not first:  # a round trip that is answered at once pays nothing
                    check()
                first = False
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

    def future_watched(self) -> None:
        """A future got its first callback or waiter (an await, concurrent.futures.wait):
        only the background thread delivers to those, so it stops stepping aside. Without
        this, a future submitted after the last blocking wait had ended with no other
        future in flight waited for the step-aside poll (50 ms) before anything drained
        its result. While callers still wait in help_until, the last to leave wakes it
        (the future is registered by then), so it is not woken only to step aside again."""
        if self._stepping_aside and not self._helpers:
            self._bg_wake.set()

    def ensure_background(self) -> None:
        """Starts the background thread if it is not running."""
        if self._thread is None:
            self.start_background()

    # -- a persistent pool's client: results kept in shared memory until handed out -------

    def add_plain_source(self, collector, adopted: int | None = None,
                         held: Callable[[], bool] | None = None) -> None:
        """Adds a mailbox whose records go to results() when taken (see pull_plain); of the
        client `adopted` (while `held()`), or this handle's own plain mailbox."""
        with self._plain_lock:
            self._plain_sources.append((collector, adopted, held))

    def drop_plain_sources(self, adopted: int) -> None:
        """Forgets the mailboxes of adopted client `adopted` (all handed out)."""
        with self._plain_lock:
            self._plain_sources = [s for s in self._plain_sources if s[1] != adopted]

    def plain_pending(self) -> bool:
        """Whether a mailbox of pull_plain's holds a record."""
        return any(c.has_published and (held is None or held()) for c, _, held in self._plain_sources)

    def pull_plain(self, limit: int) -> int:
        """Moves up to `limit` results from the mailboxes into `plain` (as TaskResults,
        whatever their route: an adopted client's futures and map chunks have nobody else to
        go to); side messages go where they always do. Returns how many results."""
        if not self._plain_sources:
            return 0
        n = 0
        with self._plain_lock:
            for collector, _, held in self._plain_sources:
                if held is not None and not collector.has_published:
                    continue
                if held is not None and not held():  # another client has the record now
                    continue
                while n < limit:
                    batch = collector.drain(limit - n, 0)
                    if not batch:
                        break
                    for rec in batch:
                        if rec.route >= FIRST_SIDE_ROUTE:
                            if self.side is not None:
                                self.side.deliver(rec.route, rec.worker_id, rec.value)
                        else:
                            if self.keep_timings and rec.run_time_s is not None:
                                self.timings.append((rec.queue_wait_s or 0.0, rec.run_time_s))
                            self._deliver_plain(rec)
                            n += 1
                if n >= limit:
                    break
        return n

    def take_plain(self) -> list[TaskResult]:
        """Takes every result of an enqueue()d task delivered so far (and, for a persistent
        pool's client, every one waiting in its mailboxes)."""
        while self.pull_plain(4096):
            pass
        if self._drain_lock.acquire(blocking=False):
            try:  # nobody appends meanwhile: take them in one step
                out = list(self.plain)
                self.plain.clear()
                return out
            finally:
                self._drain_lock.release()
        out = []
        while self.plain:
            out.append(self.plain.popleft())
        return out

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
        self._bg_ident = threading.get_ident()
        while not self._stop.is_set():
            try:
                self._background_step()
            except Exception:  # never let one bad record end result delivery for the app
                log.exception("mpop: error while delivering results (continuing)")
                self._stop.wait(0.01)

    _STEP_ASIDE_POLL_S = 0.05  # see _background_step
    _futures_sparse = False  # futures' results come far apart: one at a time (see there)
    _CHECK_EVERY_S = 0.25  # how often it checks the workers while futures wait
    _IDLE_WAKE_S = 1.0  # the longest it sleeps with nothing in flight
    _DEFER_S = 0.2  # how long drained output waits for a caller's thread (see _deferred)

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
            self._stepping_aside = True
            self._bg_wake.wait(self._STEP_ASIDE_POLL_S)
            self._stepping_aside = False
            self._bg_wake.clear()
            return
        if not self._drain_lock.acquire(timeout=0.05):
            return
        self._bg_pumping = True  # before looking at _helpers: see help_until
        try:
            if self._helpers:
                return
            pending = len(self.futures)
            if pending and self.check is not None and time.monotonic() >= self._next_check:
                # Futures nobody waits on in a blocking call learn of workers that cannot
                # run (an initializer that raised) here: check_workers fails them.
                self._next_check = time.monotonic() + self._CHECK_EVERY_S
                try:
                    self.check()
                except MpopError:
                    pass
                pending = len(self.futures)
            if pending:
                # Futures nobody waits on in a blocking call (callbacks, wait(),
                # as_completed, await): a lone one's result at once; with many in flight,
                # while results come densely, in runs of up to 256 or every 2 ms, so that
                # neither this thread nor the workers pay a wake-up per result. Once a
                # 2 ms wait brings two results or fewer, they come sparsely (the tasks
                # are long): each is then waited for alone and delivered at once, until
                # one wake-up finds three or more in. A wake-up per result costs little
                # beside a long task, while holding each result up to 2 ms delayed the
                # callbacks that feed the workers more (joblib's), and a 2 ms poll for the
                # whole of a long task took a share of a core the workers need.
                if pending == 1 or self._futures_sparse:
                    n = self.pump(0.05, 1)
                    self._futures_sparse = n < 3
                else:
                    n = self.pump(0.002, min(pending, 256))
                    self._futures_sparse = n <= 2
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
            # Nothing in flight: sleep in the native wait until a result comes in (so an
            # idle app costs next to no CPU and a push needs no wake-up call of its own).
            # Callers and stop_background() interrupt it. It wakes once a second all the
            # same: a future submitted meanwhile whose workers cannot start sends nothing
            # that would wake it, and is failed by the check above.
            self._idle = True
            wake = self._IDLE_WAKE_S
            if self._deferred:  # held-back output is due soon
                wake = min(wake, max(0.0, self._deferred[0][0] - time.monotonic()))
            try:
                self.pump(wake, epoch=epoch)
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

    def open_map(self) -> tuple[int, MapState]:
        """A route of its own for a map() call, and the state its results arrive in."""
        route, state = next(self._routes), MapState()
        self.maps[route] = state
        return route, state

    def close_map(self, route: int, state: MapState) -> None:
        """A map() ended (finished, failed or abandoned). The background thread stepped aside
        for it: it is woken only if something is left for it to drain (this map's chunks
        still in flight, other tasks, futures); otherwise a wake-up would only cost it, and
        a core the workers need, tens of microseconds."""
        state.closed = True
        self.maps.pop(route, None)
        if self.futures or self._submitted() != self.finished:
            self._bg_wake.set()

    def release(self) -> None:
        """After shutdown (background thread stopped, every future settled): drops the
        native collector and what is left to deliver, so that futures a caller keeps, which
        refer to this router through their class, keep nothing else alive. A thread
        still draining (a map, a wait in another thread) is interrupted first, and raises
        ShutdownError at its next drain."""
        self._lock_drain()
        try:
            self._flush_deferred(everything=True)
            self._finished_at_release = self._collector.completed
            self._collector.unbind_settle()
            self._collector = self._native_settle = None
            self.check = None
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
                f"while running it, {attempts} time(s); max_retries={self._max_retries}")
        if status == TIMEOUT:
            return TaskTimeoutError(
                f"task {tsk_id} ({self._names(fn_id)}) ran longer than task_timeout="
                f"{self._task_timeout}s; its worker (id {worker_id}) was killed")
        from concurrent.futures import CancelledError

        return CancelledError(f"task {tsk_id} was cancelled before it ran")

    def _deliver(self, rec: ResultRecord) -> None:
        """Hands on one record the collector did not settle itself."""
        if rec.route >= FIRST_SIDE_ROUTE:
            if self.side is None:
                return
            if rec.route != ROUTE_EXIT and threading.get_ident() == self._bg_ident:
                self._deferred.append((time.monotonic() + self._DEFER_S, rec.route, rec.worker_id, rec.value))
            else:
                self._flush_deferred(everything=True)  # what came before goes out first
                self.side.deliver(rec.route, rec.worker_id, rec.value)
            return
        if self.keep_timings and rec.run_time_s is not None:
            self.timings.append((rec.queue_wait_s or 0.0, rec.run_time_s))
        if self.debug and rec.route != ROUTE_PLAIN:
            what = "map chunk" if rec.route >= FIRST_MAP_ROUTE else "task"
            log.debug("%s %s %s on worker %s -> %s", what, rec.tsk_id, self._names(rec.fn_id), rec.worker_id,
                      ResultStatus(rec.status).name.lower())
        if rec.route >= FIRST_MAP_ROUTE:
            self._deliver_chunk(rec)
        elif rec.route == ROUTE_FUTURE:
            self._deliver_to_future(rec)
        else:
            self._deliver_plain(rec)

    def _error_of(self, rec: ResultRecord) -> BaseException | None:
        if rec.status == OK:
            return None
        return self._error_for(rec.status, rec.value, rec.tsk_id, rec.fn_id, rec.worker_id, rec.attempts)

    def _deliver_chunk(self, rec: ResultRecord) -> None:
        state = self.maps.get(rec.route)
        if state is not None and not state.closed:
            state.results[rec.tsk_id] = (rec.status, rec.value if rec.status == OK else self._error_of(rec))
            state.received += 1

    def _deliver_to_future(self, rec: ResultRecord) -> None:
        seq = rec.seq
        if seq in self._cancelled:  # its future was cancelled already (try_cancel)
            self._cancelled.discard(seq)
            self._collector.release_cancel(seq)
            return
        fut = self.futures.pop(seq, None)
        if fut is None:
            # The result beat register_future (the submitting thread lost the GIL between
            # its push and the registration). No lock: each dict operation is atomic, and
            # whichever side pops the record from `early` settles.
            self.early[seq] = rec
            fut = self.futures.pop(seq, None)
            if fut is None or self.early.pop(seq, None) is None:
                return
        self._settle(fut, rec)

    def _deliver_plain(self, rec: ResultRecord) -> None:
        ok = rec.status == OK
        error = self._error_of(rec)
        r = TaskResult(success=ok, value=rec.value if ok else None, error=error, tsk_id=rec.tsk_id,
                       seq=rec.seq, fn_id=rec.fn_id, worker_id=rec.worker_id, attempts=rec.attempts,
                       queue_wait_s=rec.queue_wait_s, run_time_s=rec.run_time_s)
        if self.debug:
            log.debug("task %s %s on worker %s -> %s", rec.tsk_id, self._names(rec.fn_id), rec.worker_id,
                      repr(r.value) if ok else f"{type(error).__name__}: {error}")
        self.plain.append(r)

    def _settle(self, fut: Future, rec: ResultRecord) -> None:
        try:
            self._settle_one(fut, rec)
        except (InvalidStateError, RuntimeError):  # the user settled it (set_result): theirs stands
            log.debug("result of an already settled future dropped: %r", fut)

    def _settle_one(self, fut: Future, rec: ResultRecord) -> None:
        if rec.status == CANCELLED_STATUS:  # shutdown(cancel_pending=True) took it off the queue
            fut.deliver_cancelled()
        elif rec.status == OK:
            fut.deliver(rec.value)
        else:
            fut.set_exception(self._error_of(rec))

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

    def try_kill(self, fut: Future, kill: Callable[[int], bool], wait_s: float = 30.0) -> bool:
        """Stops `fut`'s task: cancelled if it has not started, else its worker is killed
        (`kill(seq)`, the supervisor's kill_task) and the supervisor posts the task's end as
        cancelled. True when the future ends cancelled; False when it finished first."""
        seq = self._seq_of(fut)
        if seq is None:
            return False
        deadline = time.monotonic() + 1.0
        while True:
            if self.try_cancel(fut):
                fut.deliver_cancelled()
                return True
            if fut.done():
                return fut.cancelled()
            if kill(seq):
                break
            if time.monotonic() > deadline:  # neither queued nor running: it ended meanwhile
                return fut.cancelled()
            time.sleep(0.001)  # being claimed, or moved after a death: it will run or be queued
        self.help_until(fut.done, time.monotonic() + wait_s, self.check)
        return fut.cancelled()

    def deliver_cancellation(self, seq: int, tsk_id: int, fn_id: int, route: int) -> None:
        """Delivers a cancellation for a task removed from the queue before it ran."""
        self._lock_drain()
        try:
            self._deliver(ResultRecord((seq, tsk_id, fn_id, 0, 0, CANCELLED_STATUS, None, None, None, route)))
            self._collector.mark_complete(seq)
            self.complete_below = self._collector.first_incomplete
        finally:
            self._drain_lock.release()
        with self.cond:
            self.cond.notify_all()

