"""mpop.Executor: a concurrent.futures.Executor over an MpopApi."""

from __future__ import annotations

import concurrent.futures
import time
from typing import Any, Callable, Iterable, Iterator

from ._api import MpopApi

__all__ = ["Executor"]


class Executor(concurrent.futures.Executor):
    """``concurrent.futures`` executor running tasks on mpop workers.

    `max_workers`: worker processes (None: the CPUs this process may use); `options`: any
    other MpopApi parameter (auto_terminate defaults to False). The workers start at
    construction. A crashed worker fails only the task it was running
    (WorkerCrashedError); the executor keeps working."""

    def __init__(self, max_workers: int | None = None, **options: Any) -> None:
        options.setdefault("auto_terminate", False)
        self._app = MpopApi(workers=max_workers, **options)
        self._app.start()

    @property
    def app(self) -> MpopApi:
        """The MpopApi underneath (status, scaling, ...)."""
        return self._app

    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        """Schedules ``fn(*args, **kwargs)``; returns a Future (see MpopApi.submit)."""
        return self._app.submit(fn, *args, **kwargs)

    def map(self, fn: Callable, *iterables: Iterable, timeout: float | None = None,
            chunksize: int = 1) -> Iterator[Any]:
        """``fn(*items)`` for items drawn from the `iterables`, like concurrent.futures:
        every call is submitted now, results come in order, and `timeout` counts from this
        call (TimeoutError; the calls that have not started are cancelled). `chunksize` is
        accepted for compatibility; workers already claim tasks in batches
        (worker_batch_size)."""
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1")
        deadline = None if timeout is None else time.monotonic() + timeout
        futures = [self._app.submit(fn, *args) for args in zip(*iterables)]

        def results() -> Iterator[Any]:
            try:
                for fut in futures:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        raise concurrent.futures.TimeoutError()
                    yield fut.result(left)
            finally:
                for fut in futures:
                    fut.cancel()

        return results()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stops the executor: waits for the pending calls (`wait`), or first cancels those
        that have not started (`cancel_futures`); see MpopApi.shutdown."""
        self._app.shutdown(wait=wait, cancel_pending=cancel_futures)
