"""MpopFuture: the concurrent.futures.Future of a submit()ted task, one object each.

Its result is delivered by the result router (mpop._router), natively for a plain value;
result() and exception() drain results in the waiting thread rather than sleeping on a
condition, cancel() asks the native cancel table (Segment::request_cancel), and `await`
in an asyncio event loop waits without blocking it."""

from __future__ import annotations

import threading
import time
from concurrent.futures import CancelledError, Future, InvalidStateError
from concurrent.futures._base import CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED, PENDING, RUNNING
from typing import TYPE_CHECKING, Any, Generator

from ._core import FutureCore

if TYPE_CHECKING:
    from ._router import ResultRouter

__all__ = ["MpopFuture", "future_class"]

_CANCELLED_STATES = (CANCELLED, CANCELLED_AND_NOTIFIED)
_DONE_STATES = (CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED)

FutureCore.set_states(PENDING, FINISHED)  # what a new future starts as, and ends as


class MpopFuture(FutureCore, Future):
    """A concurrent.futures.Future that costs one object until somebody needs more.

    Future.__init__ builds a Condition (an RLock, a deque, five bound methods) and two
    lists for every instance; at a few hundred thousand futures in flight, creating them
    and the garbage collector walking them took more of the owner's time than the tasks.
    Here the state, the value, and the waiter and callback lists (made on first use) are
    fields of the native base FutureCore, which also sets a value (`_finish`, the one code
    that does, whether the collector settles a future natively or deliver() does); the
    lock is one RLock shared by the app's futures (concurrent.futures.wait and
    as_completed only acquire and release `_condition`, and an RLock lets them take it
    once per future). A future from the native submit() path starts untracked by the
    garbage collector, which then never walks the futures a caller holds; it is tracked
    again once it holds anything that could refer back to it.

    Blocking waits (result(), exception()) never sleep on `_condition`: they drain results
    in the waiting thread (ResultRouter.help_until), so a round trip costs no hand-off
    through the background thread. Each app uses its own subclass, made by its
    ResultRouter (future_class), which sets `_router` and `_condition`."""

    _exception = None
    _router: ResultRouter
    _condition: threading.Condition

    __init__ = object.__init__  # nothing per instance until needed (see above)

    # Setting _w or _cbs tracks a future that submit() left untracked by the garbage
    # collector, since a waiter or a callback may refer back to it. Only the background
    # thread delivers to a future nobody waits on in result(): it is told (future_watched).
    @property
    def _waiters(self) -> list:
        if self._w is None:
            with self._condition:
                if self._w is None:
                    self._w = []
            self._router.future_watched()
        return self._w

    @property
    def _done_callbacks(self) -> list:
        if self._cbs is None:
            with self._condition:
                if self._cbs is None:
                    self._cbs = []
            self._router.future_watched()
        return self._cbs

    def _invoke_callbacks(self) -> None:
        if self._cbs is not None:
            super()._invoke_callbacks()

    def cancelled(self) -> bool:
        """Whether the future was cancelled (its task never runs)."""
        return self._state in _CANCELLED_STATES

    def running(self) -> bool:
        """Always False: a task's start is not reported to its future."""
        return self._state == RUNNING

    def done(self) -> bool:
        """Whether the future has a result, an exception, or was cancelled."""
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
        if not self._router.try_cancel(self):
            return False
        self.deliver_cancelled()
        return True

    def deliver_cancelled(self) -> None:
        """Ends the future as cancelled, notifying its waiters and callbacks at once."""
        with self._condition:
            if self._state != PENDING:
                return
            self._state = CANCELLED_AND_NOTIFIED
            for waiter in self._w or ():
                waiter.add_cancelled(self)
            self._condition.notify_all()
        self._invoke_callbacks()

    def _help(self, timeout: float | None) -> None:
        if self._state not in _DONE_STATES:
            deadline = None if timeout is None else time.monotonic() + timeout
            r = self._router
            r.help_until(self.done, deadline, r.check, spin=True)

    def result(self, timeout: float | None = None) -> Any:
        """The task's value, waiting up to `timeout` seconds (None: for ever). Raises the
        task's exception (the handler's own, WorkerCrashedError, TaskTimeoutError,
        ShutdownError), CancelledError, or TimeoutError when the time runs out."""
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
        """The task's exception or None, waiting up to `timeout` seconds. Raises
        CancelledError, or TimeoutError when the time runs out."""
        self._help(timeout)
        state = self._state
        if state == FINISHED:
            return self._exception
        if state in _CANCELLED_STATES:
            raise CancelledError()
        raise TimeoutError()

    def __await__(self) -> Generator[Any, None, Any]:
        """``await future`` in a running asyncio event loop: the task's value, or its
        exception raised, as result() gives them, without blocking the loop or using a
        thread: when the result thread settles the future, it wakes the loop
        (asyncio.wrap_future, through loop.call_soon_threadsafe). Cancelling the awaiting
        asyncio task cancels the future (a task that has not started never runs; one that
        has runs to its end, unseen; MpopApi.kill_task stops it). Raises RuntimeError
        outside a running asyncio event loop."""
        if not self.done():
            import asyncio

            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                raise RuntimeError("an mpop future can be awaited only in a running asyncio event loop; "
                                   "elsewhere call its result()") from None
            yield from asyncio.wrap_future(self, loop=loop).__await__()
        return self.result()

    def set_running_or_notify_cancel(self) -> bool:
        """concurrent.futures' executor hook: False for a cancelled future, else marks it
        running and returns True."""
        # cancel() notifies at once (the state is never left at CANCELLED).
        with self._condition:
            if self._state in _CANCELLED_STATES:
                return False
            if self._state == PENDING:
                self._state = RUNNING
                return True
        raise RuntimeError(f"Future in unexpected state: {self._state}")

    def set_result(self, result: Any) -> None:
        """Settles the future with `result` (its task's own result then does not count).
        Raises InvalidStateError if it is done."""
        with self._condition:
            if self._state in _DONE_STATES:
                raise InvalidStateError(f"{self._state}: {self!r}")
            self._finish(result)
            for waiter in self._w or ():
                waiter.add_result(self)
        self._invoke_callbacks()

    # How the router hands a task's value to a future it did not settle natively (one
    # waited on, or with callbacks).
    deliver = set_result

    def set_exception(self, exception: BaseException) -> None:
        """Settles the future with `exception`. Raises InvalidStateError if it is done."""
        with self._condition:
            if self._state in _DONE_STATES:
                raise InvalidStateError(f"{self._state}: {self!r}")
            self._exception = exception
            self._state = FINISHED
            for waiter in self._w or ():
                waiter.add_exception(self)
        self._invoke_callbacks()


def future_class(router: ResultRouter, cond: threading.Condition) -> type[MpopFuture]:
    """The future class of one app: its futures share `router` and the lock of `cond`."""
    return type("MpopFuture", (MpopFuture,), {
        "__module__": __name__, "__qualname__": "MpopFuture", "_router": router, "_condition": cond})
