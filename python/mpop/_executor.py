"""mpop.Executor: a concurrent.futures.Executor over an MpopApi."""

from __future__ import annotations

import concurrent.futures
import itertools
import time
from typing import Any, Callable, Iterable, Iterator

from ._api import MpopApi

__all__ = ["Executor"]


class Executor(concurrent.futures.Executor):
    """``concurrent.futures`` executor running tasks on mpop workers.

    A crashed worker fails only the task it was running (WorkerCrashedError); the executor
    keeps working."""

    def __init__(self, max_workers: int | None = None, **options: Any) -> None:
        options.setdefault("auto_terminate", False)
        self._app = MpopApi(workers=max_workers, **options)
        self._app.start()

    @property
    def app(self) -> MpopApi:
        return self._app

    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        return self._app.submit(fn, *args, **kwargs)

    def map(self, fn: Callable, *iterables: Iterable, timeout: float | None = None,
            chunksize: int = 1) -> Iterator[Any]:
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1")
        it = self._app.map(fn, *iterables, timeout=timeout)
        # Like concurrent.futures: the work starts now, results are pulled lazily.
        first = list(itertools.islice(it, 0))
        del first
        return it

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._app.shutdown(wait=wait, cancel_pending=cancel_futures)
