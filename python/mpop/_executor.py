"""mpop.Executor: a concurrent.futures.Executor over an MpopApi."""

from __future__ import annotations

import concurrent.futures
import time
from typing import Any, Callable, Iterable, Iterator

from ._api import MpopApi
from ._errors import ConfigError

__all__ = ["Executor"]


class Executor(concurrent.futures.Executor):
    """``concurrent.futures`` executor running tasks on mpop workers, with
    ProcessPoolExecutor's signature.

    `max_workers`: worker processes (None: the CPUs this process may use); `mp_context`: a
    multiprocessing context or a start method name ("spawn", "fork", "forkserver"; None:
    spawn), whose start method the workers use; `initializer(*initargs)` runs in each
    worker before its first task; `max_tasks_per_child`: recycle a worker after that many
    tasks (MpopApi's max_tasks_per_worker); `options`: any other MpopApi parameter
    (auto_terminate defaults to False). The workers start at construction. A crashed worker
    fails only the task it was running (WorkerCrashedError); the executor keeps working."""

    def __init__(self, max_workers: int | None = None, mp_context: Any = None,
                 initializer: Callable[..., Any] | None = None, initargs: tuple = (), *,
                 max_tasks_per_child: int | None = None, **options: Any) -> None:
        options.setdefault("auto_terminate", False)
        if mp_context is not None:
            if "start_method" in options:
                raise ConfigError("give mp_context or start_method, not both")
            options["start_method"] = _start_method(mp_context)
        if max_tasks_per_child is not None:
            if options.get("max_tasks_per_worker") is not None:
                raise ConfigError("give max_tasks_per_child or max_tasks_per_worker, not both")
            options["max_tasks_per_worker"] = max_tasks_per_child
        self._app = MpopApi(workers=max_workers, initializer=initializer, initargs=initargs, **options)
        self._app.start()

    @property
    def app(self) -> MpopApi:
        """The MpopApi underneath (status, scaling, ...)."""
        return self._app

    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        """Schedules ``fn(*args, **kwargs)``; returns a Future (see MpopApi.submit).

        Raises ShutdownError after shutdown() (a RuntimeError, as concurrent.futures
        raises); TypeError for arguments `fn` cannot take or that cannot be serialised;
        ValueError for arguments larger than the argument pool allows; RegistryError for
        an unknown fn_id or handler name; MpopError when the workers cannot be started.
        The future's exception is the handler's own, WorkerCrashedError,
        TaskTimeoutError, MpopError when the workers cannot run (WorkerInitError when an
        initializer raised), or ShutdownError when the executor is shut down with
        wait=False first."""
        return self._app.submit(fn, *args, **kwargs)

    def map(self, fn: Callable, *iterables: Iterable, timeout: float | None = None,
            chunksize: int = 1) -> Iterator[Any]:
        """``fn(*items)`` for items drawn from the `iterables`, like concurrent.futures:
        every call is submitted now, results come in order, and `timeout` counts from this
        call (TimeoutError; the calls that have not started are cancelled). `chunksize` is
        accepted for compatibility; workers already claim tasks in batches
        (worker_batch_size).

        Raises ValueError for a chunksize below 1, and at the call what submit() raises
        for any item. The iterator raises each call's exception in its place (see
        submit()), and TimeoutError once `timeout` has passed."""
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
        that have not started (`cancel_futures`); see MpopApi.shutdown. Idempotent.

        Raises nothing of its own: if the workers cannot run, the pending calls are
        cancelled instead of waited for. A KeyboardInterrupt while it waits stops the
        workers at once and is raised."""
        self._app.shutdown(wait=wait, cancel_pending=cancel_futures)


def _start_method(mp_context: Any) -> str:
    """The start method of `mp_context`: a multiprocessing context or a method's name."""
    if isinstance(mp_context, str):
        return mp_context
    get = getattr(mp_context, "get_start_method", None)
    if get is None:
        raise ConfigError(f"mp_context must be a multiprocessing context or a start method name, "
                          f"got {mp_context!r}")
    return get()
