"""The Dask worker's side of mpop.dask: a WorkerPlugin that owns one MpopApi in each Dask
worker process, and the two functions Dask runs there as tasks (a batch of map() items, one
submit() call), each returning its results as one pickled object.

Imported by mpop.dask (and, through the tasks it pickles by reference, by every Dask
worker); it imports distributed, so plain ``import mpop`` never loads it."""

from __future__ import annotations

import asyncio
import collections
import functools
import multiprocessing
import pickle
import threading
import time
from typing import Any

from distributed import WorkerPlugin, get_worker

from ._api import MpopApi
from ._builtins import ProcTaskFnID
from ._errors import ConfigError, MpopError, RemoteTraceback, ShutdownError
from ._pickling import dumps, pack_error as pack_worker_error

__all__ = ["PoolPlugin", "run_batch", "run_call", "DAEMONIC_MESSAGE"]

DAEMONIC_MESSAGE = (
    "this Dask worker runs as a daemonic process (the config distributed.worker.daemon is True, "
    "the default for workers started by a Nanny, as LocalCluster and `dask worker` do), and a "
    "daemonic process must not have child processes (Python's multiprocessing rule: its parent "
    "ends it without letting it clean up), which an mpop app's workers are. Set "
    "distributed.worker.daemon to False where the workers are started, and keep it so while the "
    "cluster runs (the Nanny reads it again when it restarts a worker): "
    "dask.config.set({'distributed.worker.daemon': False}) before LocalCluster(...), or "
    "DASK_DISTRIBUTED__WORKER__DAEMON=False in the environment of `dask worker` "
    "(or start it with --no-nanny)")


def pack_error(exc: BaseException) -> bytes:
    """A handler's exception as bytes, with the traceback of the mpop worker that ran it
    (its __cause__) when there is one."""
    cause = exc.__cause__
    return pack_worker_error(exc, cause.tb if isinstance(cause, RemoteTraceback) else None)


class PoolPlugin(WorkerPlugin):
    """One DaskPool's presence in a Dask worker: setup() starts an MpopApi with the pool's
    options (in every worker the cluster has or gets later), teardown() shuts it down (when
    the pool is closed, or the Dask worker closes).

    A worker where the app cannot start keeps the error, and every batch sent there raises
    it; at DaskPool(...) it is raised to the caller (register_plugin reports it)."""

    FUNCTIONS_KEPT = 64  # handlers unpickled once per worker, the most recent ones

    def __init__(self, name: str, options: dict) -> None:
        self.name = name
        self.options = options
        self.app: MpopApi | None = None
        self.error: BaseException | None = None
        self.functions: collections.OrderedDict = collections.OrderedDict()
        self.lock = threading.Lock()

    def __getstate__(self) -> dict:
        return {"name": self.name, "options": self.options}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["name"], state["options"])

    async def setup(self, worker: Any) -> None:
        """Starts the app off the worker's event loop (spawning processes takes a while)."""
        await asyncio.get_running_loop().run_in_executor(None, self.start)

    def start(self) -> None:
        """Creates and starts this worker's app and runs one task through it. Raises
        ConfigError in a daemonic process, and what MpopApi raises (an initializer's
        WorkerInitError included)."""
        try:
            if multiprocessing.current_process().daemon:
                raise ConfigError(DAEMONIC_MESSAGE)
            app = MpopApi(**{"auto_terminate": False, **self.options})
            try:
                app.start()
                # One task through every step: a worker that cannot start (its initializer
                # raised) fails DaskPool(...) here, not the first batch later.
                app.submit(ProcTaskFnID.INCREMENT, 0).result()
            except BaseException:
                app.shutdown(wait=False, cancel_pending=True)
                raise
            self.app = app
        except BaseException as e:
            self.error = e
            raise

    async def teardown(self, worker: Any) -> None:
        """Stops the app at once: the pool is closed, or the Dask worker is going away."""
        app, self.app = self.app, None
        self.error = ShutdownError(f"the DaskPool {self.name} was closed")
        if app is not None:
            stop = functools.partial(app.shutdown, wait=False, cancel_pending=True)
            await asyncio.get_running_loop().run_in_executor(None, stop)

    def ready_app(self) -> MpopApi:
        """The running app; raises the error that keeps it from running."""
        app, error = self.app, self.error
        if app is not None:
            return app
        if error is None or isinstance(error, ShutdownError):
            raise ShutdownError(f"the DaskPool {self.name} was closed")
        raise MpopError(f"the mpop app of this Dask worker could not start: {type(error).__name__}: "
                        f"{error}") from error

    def function(self, blob: bytes) -> Any:
        """The handler pickled in `blob`, unpickled once: the same object for every batch,
        so the app registers it once."""
        with self.lock:
            fn = self.functions.get(blob)
            if fn is not None:
                self.functions.move_to_end(blob)
                return fn
        fn = pickle.loads(blob)
        with self.lock:
            fn = self.functions.setdefault(blob, fn)
            while len(self.functions) > self.FUNCTIONS_KEPT:
                self.functions.popitem(last=False)
        return fn


def _plugin(name: str) -> PoolPlugin:
    worker = get_worker()
    plugin = worker.plugins.get(name)
    if not isinstance(plugin, PoolPlugin):
        raise ShutdownError(f"the DaskPool {name} is closed (Dask worker {worker.address} has no app for it)")
    return plugin


def run_batch(name: str, fn_blob: bytes, items: Any) -> bytes:
    """A Dask task: one batch of a DaskPool.map through this worker's app. `items` is a
    range (a batch of a map over one range) or the pickled list of the batch's columns,
    one list per iterable. Returns ``(values, elapsed_ns, error)`` pickled as one object:
    the values of the items before the first that raised, and that item's packed error
    (None when every item succeeded)."""
    plugin = _plugin(name)
    app = plugin.ready_app()
    fn = plugin.function(fn_blob)
    columns = [items] if isinstance(items, range) else pickle.loads(items)
    values: list = []
    error = None
    t0 = time.perf_counter_ns()
    try:
        # extend() keeps the values that came before an item that raised.
        values.extend(app.map(fn, *columns))
    except ShutdownError:
        if plugin.app is not app:  # the pool was closed meanwhile: not the item's fault
            raise
        error = pack_error(ShutdownError(f"the DaskPool {name}'s app was shut down"))
    except Exception as e:
        error = pack_error(e)
    return dumps((values, time.perf_counter_ns() - t0, error))


def run_call(name: str, fn_blob: bytes, call: bytes) -> bytes:
    """A Dask task: one DaskPool.submit call, ``fn(*args, **kwargs)`` with `call` the
    pickled (args, kwargs). Returns ``(True, value)`` or ``(False, packed error)`` pickled."""
    plugin = _plugin(name)
    app = plugin.ready_app()
    fn = plugin.function(fn_blob)
    args, kwargs = pickle.loads(call)
    try:
        return dumps((True, app.submit(fn, *args, **kwargs).result()))
    except ShutdownError:
        if plugin.app is not app:
            raise
        return dumps((False, pack_error(ShutdownError(f"the DaskPool {name}'s app was shut down"))))
    except Exception as e:
        return dumps((False, pack_error(e)))
