"""MpopApi: the public entry point, a facade over the parts that do the work.

A task's path: MpopApi.enqueue/submit/map -> Submitter (_submit.py) or MapRun (_map.py),
which resolve its handler in the Registry (_registry.py) -> the native producer and task
ring -> a worker (_worker.py, the native worker loop) -> the result ring -> the native
collector -> ResultRouter (_router.py) -> a future (_futures.py), a map() call, or the
TaskResults of run()/results() (_run.py, _results.py). Config (_config.py) holds the
settings; Runtime and Lifecycle (_runtime.py) own the segment, the supervisor and the
workers."""

from __future__ import annotations

import importlib
import itertools
import logging
import os
import contextlib
import html
import pickle
import sys
import threading
import time
import types
import weakref
from concurrent.futures import Future
from typing import Any, AsyncIterator, Callable, Coroutine, Iterable, Iterator

from ._builtins import MAP_CHUNK_ID
from ._config import Config, is_int
from ._errors import ConfigError, MpopError, RegistryError
from ._hooks import pack as pack_hooks
from ._map import ChunkFeed, MapIterator, MapRun, known_length
from ._registry import Handler, Registry
from ._results import RunResult, TaskResult
from ._run import RunLoop, progress_bar, results_as_they_come, wait_all
from ._runtime import Lifecycle, weakly, finalize
from ._slots import TaskSlot196_cargs
from ._status import Status, format_status_html
from ._submit import Submitter

__all__ = ["MpopApi", "Mpop"]

log = logging.getLogger("mpop")

# Every live app's lifecycle in this process, so that a fork() child can disown the apps
# it inherits.
_LIFECYCLES: weakref.WeakSet = weakref.WeakSet()

# The segment of a running persistent pool that the MpopApi made in this thread attaches to
# instead of creating one (mpop.attach makes its handle inside `attaching`).
_attach_to = threading.local()


@contextlib.contextmanager
def attaching(segment: str) -> Iterator[None]:
    _attach_to.segment = segment
    try:
        yield
    finally:
        _attach_to.segment = None


def _after_fork_in_child() -> None:
    for lifecycle in list(_LIFECYCLES):
        lifecycle.disown()


os.register_at_fork(after_in_child=_after_fork_in_child)


class MpopApi:
    """Runs Python tasks across worker processes through a shared-memory task ring.

    Parameters (every bad value raises ConfigError naming the parameter and its range):

    - workers: worker processes, 1-1024 (None: the CPUs this process may use).
    - queue_slots: capacity of the task ring, a power of 2 >= 2 (at most 2**24).
    - slot_class: the ctypes.Structure of a slot (tsk_id, fn_id, args[, c_args][, meta]).
    - worker_batch_size: most tasks a worker claims in one step (never more than the ring).
    - display: a live status view while run() blocks (terminal or notebook).
    - auto_terminate: run() stops the workers once every task is done.
    - debug, debug_delay: log every task; sleep debug_delay seconds before each.
    - handler_module: a module (or its name) whose HANDLERS dict is registered, and which
      every worker imports.
    - start_method: "spawn" (fresh interpreters), "fork" or "forkserver".
    - max_retries: re-runs of a task whose worker died while running it (0-1000).
    - task_timeout: seconds; a task past it is killed with its worker (TaskTimeoutError).
    - max_tasks_per_worker: recycle a worker after this many tasks.
    - cpu_affinity: True pins worker i to CPU i (mod n); or a list of CPU ids.
    - name: the prefix of the shared-memory segment's name.
    - max_performance: skip optional per-task work (timestamps, per-task stats, debug logs).
    - pool_bytes: size of the shared argument pool (>= 65536).
    - registry_bytes: size of the segment's handler log (>= 65536).
    - scale_limit: the most workers scale() may ask for (default: max(workers, 2 x CPUs, 8)).
    - initializer, initargs: ``initializer(*initargs)`` runs in every worker (first start,
      respawn, recycling) before its first task; if it raises, the first call to observe
      it raises WorkerInitError with the worker's traceback as __cause__.
    - worker_state: True gives each worker a dict of its own, passed to every handler (and
      initializer) that declares a ``worker_state`` parameter, kept across its tasks.
    - worker_exit: runs in a worker when it retires (shutdown, the end of an auto-terminated
      run, scale() down, recycling): ``worker_exit(worker_state)`` with worker_state, else
      ``worker_exit()``; what it returns is collected by exit_results().
    - max_worker_memory: bytes, or a string such as "512MB" (decimal) or "2GiB" (binary): a
      worker whose private resident memory exceeds it after a task is recycled.

    - persistent: True runs the supervisor in a process of its own (name= is required, and
      is the pool's address): the workers, their queued tasks and their results outlive
      this process, even its SIGKILL; detach() lets go of the pool, shutdown() stops it.
    - orphan_timeout: seconds a persistent pool's workers wait, after its supervisor process
      died, for a new one to adopt them (mpop.attach or python -m mpop supervise starts it);
      then they exit and the last one out removes the pool.

    What handlers print and log reaches the owner: sys.stdout and sys.stderr text goes to
    the owner's streams, logging records to the owner's logger of the same name (with
    ``record.worker_id``), at the levels the owner's logging has at start().

    Shared memory is allocated at first use and released by shutdown(), by leaving a
    `with` block, when the app is garbage-collected, at interpreter exit, and, when the
    process is killed, by the workers or the next app that starts."""

    def __init__(
        self,
        workers: int | None = None,
        queue_slots: int = 4096,
        slot_class: type = TaskSlot196_cargs,
        worker_batch_size: int = 16,
        display: bool = False,
        auto_terminate: bool = True,
        debug: bool = False,
        debug_delay: float = 0.0,
        handler_module: str | types.ModuleType | None = None,
        start_method: str = "spawn",
        max_retries: int = 1,
        task_timeout: float | None = None,
        max_tasks_per_worker: int | None = None,
        cpu_affinity: bool | list[int] = False,
        name: str | None = None,
        max_performance: bool = False,
        *,
        pool_bytes: int = 64 << 20,
        registry_bytes: int = 4 << 20,
        scale_limit: int | None = None,
        initializer: Callable[..., Any] | None = None,
        initargs: tuple = (),
        worker_state: bool = False,
        worker_exit: Callable[..., Any] | None = None,
        max_worker_memory: int | str | None = None,
        persistent: bool = False,
        orphan_timeout: float = 60.0,
    ) -> None:
        self._config = Config.build(
            workers=workers, queue_slots=queue_slots, slot_class=slot_class, worker_batch_size=worker_batch_size,
            display=display, auto_terminate=auto_terminate, debug=debug, debug_delay=debug_delay,
            handler_module=handler_module, start_method=start_method, max_retries=max_retries,
            task_timeout=task_timeout, max_tasks_per_worker=max_tasks_per_worker, cpu_affinity=cpu_affinity,
            name=name, max_performance=max_performance, pool_bytes=pool_bytes, registry_bytes=registry_bytes,
            scale_limit=scale_limit, initializer=initializer, initargs=initargs, worker_state=worker_state,
            worker_exit=worker_exit, max_worker_memory=max_worker_memory, persistent=persistent,
            orphan_timeout=orphan_timeout)
        hooks = pack_hooks(self._config)
        if debug and not max_performance:
            _enable_debug_logging()
        # The registry calls back into the app weakly: an app nobody refers to any more is
        # freed (and its finalizer stops its workers) at once, not at the next collection.
        self._registry = Registry(slot_class, on_register=weakly(self._on_register), worker_state=worker_state)
        labels = itertools.count(1)  # tsk_id labels, shared by the native fast path
        self._lifecycle = Lifecycle(self._config, self._registry, labels, hooks,
                                    attach_to=getattr(_attach_to, "segment", None))
        self._submitter = Submitter(self._config, self._registry, self._lifecycle, labels)
        self._finalizer = weakref.finalize(self, finalize, self._lifecycle.runtime_ref)
        _LIFECYCLES.add(self._lifecycle)
        if handler_module is not None:
            self._register_handler_module(handler_module)

    def _register_handler_module(self, module: str | types.ModuleType) -> None:
        name = self._config.handler_module
        try:
            self.register_handlers(module=module)
        except RegistryError as e:
            raise ConfigError(f"handler_module {name!r}: {e}") from e
        except Exception as e:  # ImportError, or whatever the module raised while imported
            raise ConfigError(f"handler_module {name!r} cannot be imported: {type(e).__name__}: {e}") from e

    @property
    def config(self) -> dict:
        """The app's settings as a dict (`workers` is the live target after scale())."""
        d = self._config.as_dict()
        d["workers"] = self._lifecycle.workers
        return d

    @property
    def segment_name(self) -> str | None:
        """The name of the app's shared-memory segment (None before first use and after
        shutdown): what `python -m mpop status NAME` takes."""
        rt = self._lifecycle.runtime
        return rt.segment.name if rt is not None else None

    def __repr__(self) -> str:
        lc = self._lifecycle
        state = "shut down" if lc.shut_down else ("running" if lc.running else "idle")
        return f"<MpopApi workers={lc.workers} {state} segment={self.segment_name}>"

    def _repr_html_(self) -> str:
        """The app in a notebook: its repr over its status as HTML tables (settings,
        queue counts, one row per worker)."""
        return f"<p><code>{html.escape(repr(self))}</code></p>" + format_status_html(self.status())

    # -- handlers ---------------------------------------------------------------------------

    def task(self, fn: Callable | None = None, *, fn_id: int | None = None, name: str | None = None):
        """Decorator registering a handler: ``@app.task`` or ``@app.task(fn_id=0xB000)``;
        `fn_id` and `name` as for register(). Returns the function unchanged; raises as
        register() does."""

        def deco(f: Callable) -> Callable:
            self.register(f, fn_id=fn_id, name=name)
            return f

        return deco(fn) if fn is not None else deco

    def register(self, fn: Callable, fn_id: int | None = None, name: str | None = None) -> int:
        """Registers `fn` under `fn_id` (None: the next free id from 0x1000) and `name`
        (None: its qualified name) and returns the fn_id. The same name registered again
        under its fn_id replaces the handler for every task that starts from then on.

        Raises RegistryError for a reserved, taken or out-of-range id, a taken name, a
        slot class of another layout, or a handler that cannot be sent to the workers;
        ShutdownError after shutdown()."""
        self._lifecycle.check_open()
        return self._registry.register(fn, fn_id=fn_id, name=name)

    def register_handlers(self, module: str | types.ModuleType | None = None,
                          handlers_dict: dict | None = None) -> list[int]:
        """Registers a module's ``HANDLERS`` dict (`module`: the module or its name) and/or
        `handlers_dict`, a dict ``{fn_id: fn}``; returns the fn_ids. Raises TypeError without either,
        ImportError for a module that cannot be imported, RegistryError for a module
        without HANDLERS or a registration that fails."""
        self._lifecycle.check_open()
        if module is None and handlers_dict is None:
            raise TypeError("register_handlers needs a module or a handlers_dict")
        ids = []
        if module is not None:
            mod = importlib.import_module(module) if isinstance(module, str) else module
            table = getattr(mod, "HANDLERS", None)
            if not isinstance(table, dict):
                raise RegistryError(f"module {mod.__name__!r} has no HANDLERS dict")
            ids += [self.register(fn, fn_id=int(k)) for k, fn in table.items()]
        if handlers_dict is not None:
            if not isinstance(handlers_dict, dict):
                raise TypeError(f"handlers_dict must be a dict of fn_id -> callable, got {handlers_dict!r}")
            ids += [self.register(fn, fn_id=int(k)) for k, fn in handlers_dict.items()]
        return ids

    def list_functions(self) -> list[dict]:
        """One dict per registered handler (built-ins included, the runtime's own not):
        fn_id, name, mode ("args" or "slot"), builtin, signature, module."""
        return [h.describe() for h in self._registry.handlers()]

    def validate(self) -> None:
        """Checks that every handler can be sent to the workers and that handler_module
        imports. Raises RegistryError (or ConfigError when only the module fails) listing
        every problem."""
        handler_problems = self._registry.problems()
        config_problems = []
        mod = self._config.handler_module
        if mod:
            try:
                importlib.import_module(mod)
            except Exception as e:
                config_problems.append(f"handler_module {mod!r} cannot be imported: {e!r}")
        problems = config_problems + handler_problems
        if problems:
            kind = RegistryError if handler_problems else ConfigError
            raise kind("invalid app:\n  - " + "\n  - ".join(problems))

    def _on_register(self, h: Handler, replaces: Handler | None) -> None:
        rt = self._lifecycle.runtime
        if rt is None:
            return
        if replaces is not None:
            rt.replace_handler(h, replaces)
        else:
            rt.write_handler(h)

    # -- tasks ------------------------------------------------------------------------------

    def start(self) -> None:
        """Starts the workers (non-blocking, idempotent) and the feeding of the backlog.
        Raises MpopError when a worker cannot be spawned, ShutdownError after shutdown()."""
        self._lifecycle.start()

    def enqueue(self, fn: Any = None, *, fn_id: int | None = None, args: Iterable = (),
                kwargs: dict | None = None, tsk_id: int | None = None, c_args: bytes | None = None,
                blocking: bool = True, timeout: float | None = None, **handler_kwargs: Any) -> bool:
        """Queues one task: `fn` (a function, an fn_id or a handler name; or `fn_id=`) with
        `args`, `kwargs` and `handler_kwargs`, labelled `tsk_id` (default: a counter).
        `c_args`: bytes for the slot's c_args field. Returns True, or False when
        `blocking=False` and the ring is full. Before start() it never blocks (a backlog).

        Raises QueueFull when a blocking enqueue waits past `timeout`; RegistryError for an
        unknown fn_id; TypeError for arguments the handler cannot take or that cannot be
        serialised; ValueError for a bad tsk_id or arguments larger than the pool;
        ShutdownError after shutdown()."""
        if (fn_id is None and kwargs is None and tsk_id is None and c_args is None and blocking is True
                and timeout is None and not handler_kwargs):
            # The usual call, enqueue(fn, args=(...)): one native step while the workers run
            # (FastPath); None when it does not apply, and the steps below run instead.
            rt = self._lifecycle.runtime
            if rt is not None and rt.fast.enqueue(fn, args):
                return True
        if handler_kwargs:
            kwargs = {**(kwargs or {}), **handler_kwargs}
        return self._submitter.enqueue(fn, fn_id, args, kwargs, tsk_id, c_args, blocking, timeout)

    def enqueue_many(self, tasks: Iterable) -> int:
        """Queues tasks given as ``(fn_or_id, *args)`` tuples or dicts of enqueue()'s
        keywords (``{"fn": ..}`` or ``{"fn_id": .., "args": (..)}``), without changing
        them; returns how many were queued. Raises TypeError for anything else, and what
        enqueue() raises."""
        return self._submitter.enqueue_many(tasks, self.enqueue)

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Future:
        """Queues ``fn(*args, **kwargs)`` (starting the workers if needed) and returns a
        concurrent.futures.Future, which may also be awaited in a running asyncio event
        loop (``await app.submit(fn, x)``, see MpopFuture.__await__). Raises at
        the call as enqueue() does. cancel() on the future returns True only for a task
        that will never run."""
        rt = self._lifecycle.runtime
        if rt is not None and not kwargs:
            fut = rt.fast.submit(fn, args)  # the native path, as in enqueue()
            if fut is not None:
                return fut
        return self._submitter.submit(fn, args, kwargs)

    def map(self, fn: Any, *iterables: Iterable, ordered: bool = True, progress: bool = False,
            timeout: float | None = None, max_in_flight: int | None = None,
            chunksize: int | None = None) -> Iterator[Any]:
        """Yields ``fn(*items)`` for items drawn from the iterables (in order unless
        ``ordered=False``), in chunks sized by the measured cost of an item (see
        mpop._map.ChunkSizer; or `chunksize`). At most `max_in_flight` items (default 4 x
        queue_slots, 64 x for a range) are read ahead, so any input runs in flat memory.
        `progress` shows a tqdm bar; `timeout` counts from the call (TimeoutError).

        A handler's exception, or the input's own, is raised in its item's place, after
        the values before it. Raises TypeError without iterables or for items the handler
        cannot take, ValueError for a bad chunksize or max_in_flight, ShutdownError after
        shutdown()."""
        feed = self._feed("map", fn, iterables, chunksize, max_in_flight)
        rt = self._lifecycle.start()
        run = MapRun(feed, router=rt.router, push=self._submitter.push, runner=self._registry.get(MAP_CHUNK_ID),
                     check=rt.check_workers, ordered=ordered, timeout=timeout,
                     progress_bar=progress_bar(progress, known_length(iterables)))
        return MapIterator.over(run.chunks())

    def amap(self, fn: Any, *iterables: Iterable, ordered: bool = True, max_in_flight: int | None = None,
             chunksize: int | None = None) -> AsyncIterator[Any]:
        """An async iterator of ``fn(*items)`` for asyncio code (``async for v in
        app.amap(fn, xs)``): map()'s chunks, order (``ordered=False``: as chunks finish),
        bounded read-ahead (`max_in_flight`, `chunksize`) and errors (a handler's exception,
        or the input's own, raised in its item's place, after the values before it),
        without ever blocking the event loop: each chunk is a future whose completion wakes
        the loop, and a ring full of other tasks is waited for in the loop. Leaving the
        loop early (break, aclose(), a cancelled task) cancels the chunks not yet started.

        Raises (at the call) TypeError without iterables, ValueError for a bad chunksize
        or max_in_flight, ShutdownError after shutdown(); the iterator raises TypeError
        for items the handler cannot take and RuntimeError outside a running event loop."""
        return self._submitter.amap(self._feed("amap", fn, iterables, chunksize, max_in_flight), ordered)

    def asubmit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Coroutine[Any, Any, Any]:
        """``value = await app.asubmit(fn, *args, **kwargs)`` in a running asyncio event
        loop: submit() that never blocks the loop. While the task ring is full, it waits
        for room in the loop (asyncio.sleep, 0.5 ms growing to 20 ms) instead of in the
        ring; then it awaits the task's future: the value, or the handler's exception
        raised as itself (result()'s). Cancelling the awaiting task before the task is sent
        sends nothing; after, it cancels the future (see MpopFuture.__await__). Tasks that
        wait for room are sent in no particular order.

        Raises at the call what submit() raises for a bad handler or arguments, and
        ShutdownError after shutdown(); the coroutine raises ShutdownError if the app is
        shut down while it waits for room."""
        return self._submitter.asubmit(fn, args, kwargs)

    def _feed(self, what: str, fn: Any, iterables: tuple, chunksize: Any, max_in_flight: Any) -> ChunkFeed:
        """map()'s and amap()'s input, checked, as it will be read into chunks."""
        self._lifecycle.check_open()
        if not iterables:
            raise TypeError(f"{what}() needs at least one iterable")
        c = self._config
        return ChunkFeed(self._registry.resolve(fn), iterables, workers=self._lifecycle.workers,
                         queue_slots=c.queue_slots, pool_bytes=c.pool_bytes,
                         one_item_each=bool(c.max_tasks_per_worker or c.task_timeout),
                         max_in_flight=max_in_flight, chunksize=chunksize)

    # -- results ----------------------------------------------------------------------------

    def wait(self, timeout: float | None = None) -> bool:
        """Blocks until every task enqueued so far has a result (starting the workers if
        tasks wait for them). Returns False when `timeout` passes first; True at once
        after shutdown().

        Raises MpopError when the workers cannot run (a worker cannot be spawned, or
        every attempt to start one failed; WorkerInitError when an initializer raised)
        or when called in a fork() child that inherited the app; ShutdownError when
        another thread shuts the app down while it waits."""
        return wait_all(self._lifecycle, timeout)

    def results(self, timeout: float | None = None) -> Iterator[TaskResult]:
        """Yields the TaskResult of each enqueue()d task as it finishes, until every task
        enqueued so far is done. Raises TimeoutError when `timeout` passes first."""
        return results_as_they_come(self._lifecycle, timeout)

    def run(self, enqueue_callback: Callable[[], Any] | None = None, progress: bool = False,
            timeout: float | None = None) -> RunResult:
        """Starts the workers, feeds the backlog, calls `enqueue_callback()` between polls
        until it returns False or raises StopIteration, and returns a RunResult once every
        task enqueued so far has a result (with auto_terminate, the workers then stop).
        `progress` shows a tqdm bar. Ctrl-C cancels what has not started and returns what
        finished (RunResult.interrupted). Raises TimeoutError past `timeout` (the tasks
        keep running), MpopError when the workers cannot run, ShutdownError after
        shutdown()."""
        self._lifecycle.check_open()
        view = self._live_view if self._config.display else None
        loop = RunLoop(self._lifecycle, enqueue_callback, progress, timeout, view)
        return loop.run(self._config.auto_terminate and not self._config.persistent)

    def _live_view(self):
        from ._status import LiveView

        return LiveView(self)

    # -- the end ----------------------------------------------------------------------------

    def shutdown(self, wait: bool = True, cancel_pending: bool = False) -> None:
        """Stops the app for good: first cancels every task no worker has started
        (`cancel_pending`), waits for the queued tasks (`wait`; if the workers cannot run,
        they are cancelled instead), then stops the workers and releases the shared memory.
        Futures still pending get ShutdownError. A Ctrl-C meanwhile stops the workers at
        once and is raised. Idempotent; also called close()."""
        self._lifecycle.shutdown(wait, cancel_pending, self.wait)

    close = shutdown

    def detach(self) -> None:
        """Lets go of a persistent pool without stopping it: its workers run on with the
        tasks queued so far (this handle's futures still pending fail with ShutdownError);
        `python -m mpop shutdown NAME` stops it later. The handle cannot be used afterwards.
        Raises MpopError for a pool that is not persistent."""
        self._lifecycle.detach()

    def __enter__(self) -> MpopApi:
        """Returns the app; raises ShutdownError if it was shut down."""
        self._lifecycle.check_open()
        return self

    def __exit__(self, *exc: Any) -> None:
        """shutdown(wait=True), or shutdown(wait=False, cancel_pending=True) when the block
        raised."""
        self.shutdown(wait=exc[0] is None, cancel_pending=exc[0] is not None)

    # -- status and administration ----------------------------------------------------------

    def status(self) -> dict:
        """A snapshot: {"config": settings plus "segment" and "running", "queue": counts,
        the supervisor's counters and timing percentiles, "workers": one dict per worker
        (id, pid, state, completed, failed, restarts, recycled, busy_s, idle_s, running
        task)}."""
        return Status(self._lifecycle.status(self.config))

    def print_status(self, config: bool = True, queue: bool = True, workers: bool = True) -> None:
        """Prints status() as tables to standard output: the settings (`config`), the
        queue's counts (`queue`) and one row per worker (`workers`)."""
        from ._status import format_status

        print(format_status(self.status(), config=config, queue=queue, workers=workers), flush=True)

    def scale(self, n: int) -> None:
        """Grows or shrinks the live worker set to `n` (1 to scale_limit). Raises
        ConfigError for another n, ShutdownError after shutdown()."""
        lc = self._lifecycle
        lc.check_open()
        limit = self._config.scale_limit
        if not is_int(n) or not 1 <= n <= limit:
            raise ConfigError(f"scale(n) needs an int from 1 to scale_limit={limit}, got {n!r}")
        lc.workers = n
        if lc.runtime is not None:
            lc.runtime.scale(n)

    def kill_worker(self, worker_id: int) -> bool:
        """SIGKILLs the worker `worker_id` (an id of status()["workers"]), for
        administration and testing: the supervisor recovers its tasks and starts a
        replacement. Returns False if there is no such live worker."""
        self._lifecycle.check_owner()
        rt = self._lifecycle.runtime
        return rt is not None and rt.kill_worker(worker_id)

    def kill_task(self, future: Future) -> bool:
        """Stops the task behind `future` (one of this app's submit() futures): a queued
        task is taken off the queue; a running one's worker is killed and replaced, and
        the other tasks it held run elsewhere, uncharged. Returns True when the future
        ends cancelled; False for a future that is already finished (or finishes first)
        or is not this app's. (future.cancel() stops queued tasks only.)"""
        self._lifecycle.check_owner()
        rt = self._lifecycle.runtime
        if rt is None or not isinstance(future, rt.router.future_cls) or future.done():
            return False
        return rt.router.try_kill(future, rt.kill_task)

    def exit_results(self) -> list:
        """What worker_exit returned in each worker that retired so far, in the order they
        retired (an exception worker_exit raised is in its place, with the worker's
        traceback as its __cause__). Workers killed (a crash, kill_worker, kill_task,
        task_timeout, shutdown(wait=False)) do not retire."""
        rt = self._lifecycle.runtime
        if rt is not None and not self._lifecycle.inherited:
            rt.router.drain_rest()
        return list(self._lifecycle.exit_results)


Mpop = MpopApi


def _enable_debug_logging() -> None:
    # debug=True promises a log line per task: make sure one reaches the user even when
    # logging was never configured.
    if not log.hasHandlers():  # neither ours nor an ancestor's (e.g. basicConfig)
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[mpop] %(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.DEBUG)
