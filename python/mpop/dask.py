"""mpop on a Dask distributed cluster: DaskPool puts an mpop app inside every Dask worker
and feeds it map() items in batches, one Dask task per batch, so that fine-grained work
spreads over hosts at mpop's per-item cost instead of Dask's per-task cost.

    from mpop.dask import DaskPool
    with DaskPool(client, workers=4) as pool:
        squares = list(pool.map(pow, range(10**6), [2] * 10**6))

Needs ``pip install mpop[dask]`` (distributed); ``import mpop`` alone does not load it."""

from __future__ import annotations

import collections
import contextlib
import inspect
import itertools
import pickle
import threading
import uuid
import weakref
from concurrent.futures import CancelledError, Future
from typing import Any, Iterable, Iterator

import cloudpickle

try:
    import distributed
except ImportError as e:  # pragma: no cover - only without the extra
    raise ImportError("mpop.dask needs Dask distributed: pip install 'mpop[dask]'") from e

from ._api import MpopApi
from ._config import Config, is_int
from ._dask_worker import PoolPlugin, run_batch, run_call
from ._errors import ConfigError, MpopError, ShutdownError
from ._map import MapIterator, known_length
from ._pickling import dumps
from ._router import unpack_error

__all__ = ["DaskPool", "BatchSizer"]


class BatchSizer:
    """How many items the next batch of a DaskPool.map takes (a pure object: it sees only
    counts and timings).

    A batch is one Dask task, which costs milliseconds of the scheduler's and the
    worker's time whatever it holds: batches are sized to take a Dask worker's mpop app
    about 100 ms (TARGET_NS), from a running average of the time per item that the
    batches measured there. Until the first batch is back, nothing is known of an item's
    cost: batches of 16 (or `batch_size`). When the input's length is known, no batch takes
    more than a 1/(2 x slots) share of what is left (so the hosts finish together), but
    none is cut below about 50 ms of work (FLOOR_NS). No batch holds more than
    `max_items` items, nor (once an item's pickled size is known) more than MAX_BYTES."""

    TARGET_NS = 100_000_000
    FLOOR_NS = 50_000_000
    FIRST = 16
    MAX_BYTES = 64 << 20

    def __init__(self, slots: int, total: int | None, batch_size: int | None, max_items: int) -> None:
        """`slots`: batches the cluster runs at once (its Dask threads); `total`: the
        input's length if known; `batch_size`: a fixed size (no adapting); `max_items`:
        the most items in one batch."""
        self.slots = max(1, slots)
        self.total = total
        self.fixed = batch_size
        self.cap = max(1, max_items)
        self.size = min(batch_size or self.FIRST, self.cap)
        self.per_item_ns: float | None = None
        self.avg_ns = self.avg_items = 0.0
        self.taken = 0  # items handed out so far

    def next_size(self, room: int) -> int:
        """Items for the next batch, with `room` items left in the in-flight window."""
        size = self.size
        if self.fixed is None and self.total is not None and self.per_item_ns is not None:
            left = self.total - self.taken
            guided = -(-left // (2 * self.slots))
            floor = int(self.FLOOR_NS / max(self.per_item_ns, 1.0))
            size = min(size, max(guided, floor))
        return max(1, min(size, room))

    def took(self, n: int) -> None:
        """`n` items went out in a batch."""
        self.taken += n

    def learn(self, items: int, elapsed_ns: int) -> None:
        """A batch of `items` took a Dask worker's app `elapsed_ns`."""
        if self.fixed is not None or not items:
            return
        # Running averages of time and items apart, so that big batches weigh more than
        # small ones, whose time is mostly the fixed cost of a batch.
        if self.per_item_ns is None:
            self.avg_ns, self.avg_items = float(elapsed_ns), float(items)
        else:
            self.avg_ns = 0.5 * self.avg_ns + 0.5 * elapsed_ns
            self.avg_items = 0.5 * self.avg_items + 0.5 * items
        self.per_item_ns = self.avg_ns / self.avg_items
        self.size = int(min(self.cap, max(1, self.TARGET_NS / max(self.per_item_ns, 1.0))))

    def learn_bytes(self, items: int, nbytes: int) -> None:
        """A batch of `items` pickled to `nbytes`: keeps batches under MAX_BYTES."""
        if items:
            self.cap = max(1, min(self.cap, int(self.MAX_BYTES * items / max(nbytes, 1))))
            self.size = min(self.size, self.cap)


def _check_options(options: dict) -> None:
    """Raises what MpopApi(**options) would (TypeError, ConfigError), without making an
    app here, and ConfigError for what makes no sense inside a Dask worker."""
    try:
        bound = inspect.signature(MpopApi.__init__).bind(None, **options)
    except TypeError as e:
        raise TypeError(f"DaskPool: {e} (the options are MpopApi's)") from None
    for name in ("persistent", "display"):
        if options.get(name):
            raise ConfigError(f"DaskPool: {name}=True is not supported: each Dask worker's app lives "
                              f"and dies with that worker, and nobody watches it run")
    bound.apply_defaults()
    Config.build(**{k: v for k, v in bound.arguments.items() if k != "self"})


def _check_call(fn: Any, args: tuple, kwargs: dict) -> None:
    """Raises TypeError here, before anything is sent, for a call `fn` cannot take."""
    if not callable(fn):
        return  # an fn_id or a handler name: the workers' apps resolve it
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    try:
        sig.bind(*args, **kwargs)
    except TypeError as e:
        name = getattr(fn, "__qualname__", repr(fn))
        raise TypeError(f"{name} cannot take these arguments: {e}") from None


class DaskPool:
    """An mpop app inside every worker of a Dask distributed cluster, fed in batches.

    ``DaskPool(client, **options)`` registers a Dask WorkerPlugin (``client.register_plugin``)
    that starts ``MpopApi(**options)`` in every Dask worker, those the cluster has and those
    that join or replace a lost one later. `options` are MpopApi's constructor parameters
    (``workers=`` counts processes per Dask worker; None: the CPUs that worker may use;
    ``auto_terminate`` defaults to False), validated here before anything is sent.

    - map(fn, *iterables): items travel in batches, one Dask task each, sized from the
      measured cost of an item; results come back one object per batch.
    - submit(fn, *args, **kwargs): one call, one Dask task, a concurrent.futures.Future.
    - close() (or leaving a `with` block) stops every app on the cluster.

    Raises TypeError for a client that is not a synchronous distributed.Client or an
    unknown option; ConfigError for a bad option, for persistent=True or display=True, and
    when a Dask worker is daemonic (the message names distributed.worker.daemon and says
    how to change it); MpopError (WorkerInitError...) when a worker's app cannot start.
    The plugin is unregistered again when construction fails."""

    def __init__(self, client: distributed.Client, **options: Any) -> None:
        if not isinstance(client, distributed.Client):
            raise TypeError(f"DaskPool needs a distributed.Client, got {client!r}")
        if client.asynchronous:
            raise TypeError("DaskPool needs a synchronous distributed.Client (asynchronous=False)")
        _check_options(options)
        self.client = client
        self.options = dict(options)
        self.name = f"mpop-dask-{uuid.uuid4().hex[:12]}"
        self._lock = threading.Lock()
        self._closed = False
        self._calls: set = set()  # Dask futures of submit() calls not settled yet
        self._maps: weakref.WeakSet = weakref.WeakSet()  # map runs not finished yet
        try:
            client.register_plugin(PoolPlugin(self.name, self.options), name=self.name)
        except BaseException:
            with contextlib.suppress(Exception):  # the error to raise is the registration's
                self._unregister()
            raise

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<DaskPool {self.name} {state} on {self.client.scheduler.address}>"

    @property
    def closed(self) -> bool:
        """Whether close() was called."""
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise ShutdownError(f"the DaskPool {self.name} is closed")

    def map(self, fn: Any, *iterables: Iterable, ordered: bool = True, batch_size: int | None = None,
            max_in_flight: int | None = None) -> Iterator[Any]:
        """Yields ``fn(*items)`` for items drawn from the iterables (zipped, as map()
        does; in order unless ``ordered=False``), computed by the mpop apps of the Dask
        workers. Items travel in batches, one Dask task each, sized by the measured cost of
        an item (see BatchSizer; or `batch_size` items each). At most `max_in_flight` items
        (default 2**20) are read ahead, so any input runs in flat memory; each batch's
        results come back as one pickled object.

        A handler's exception, or the input's own, is raised in its item's place, after
        the values before it (ordered: of every earlier item; unordered: of its batch);
        the batches still out are then cancelled. A batch whose Dask worker is lost is run
        again by Dask elsewhere, so every item's value is yielded exactly once (its items
        may run twice). The returned iterator's ``close()`` abandons the map (its batches
        are cancelled); its ``batch_sizes`` lists the size of each batch sent so far.

        Raises TypeError without iterables or for items `fn` cannot take (checked on the
        first item), ValueError for a bad batch_size or max_in_flight, ShutdownError after
        close() (also from the iterator, for a map that close() interrupted)."""
        self._check_open()
        if not iterables:
            raise TypeError("map() needs at least one iterable")
        for pname, v in (("batch_size", batch_size), ("max_in_flight", max_in_flight)):
            if v is not None and (not is_int(v) or v < 1):
                raise ValueError(f"{pname} must be an int >= 1 or None, got {v!r}")
        run = _MapRun(self, fn, iterables, ordered, batch_size, max_in_flight or 1 << 20)
        with self._lock:
            self._check_open()
            self._maps.add(run)
        it = BatchIterator.over(run.batches())
        it.batch_sizes = run.sizes
        return it

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Future:
        """Runs ``fn(*args, **kwargs)`` in the mpop app of a Dask worker (one Dask task)
        and returns a concurrent.futures.Future of its value. The future's exception is
        the handler's own (the mpop worker's traceback as __cause__), or what Dask raised
        for the task (e.g. distributed's KilledWorker), or ShutdownError when
        close(wait=False) cancelled it. The task is on the cluster from the start: the
        future's cancel() returns False.

        Raises TypeError for arguments `fn` cannot take or that cannot be pickled,
        ShutdownError after close()."""
        self._check_open()
        _check_call(fn, args, kwargs)
        try:
            call = dumps((args, kwargs))
        except Exception as e:
            raise TypeError(f"an argument of this call cannot be pickled: {e}") from e
        fut: Future = Future()
        fut.set_running_or_notify_cancel()
        with self._lock:
            self._check_open()
            task = self.client.submit(run_call, self.name, _function_blob(fn), call, pure=False)
            self._calls.add(task)
        task.add_done_callback(lambda t: self._settle(fut, t))
        return fut

    def _settle(self, fut: Future, task: Any) -> None:
        """Sets `fut` from its finished Dask task (in Dask's callback thread)."""
        with self._lock:
            self._calls.discard(task)
        try:
            ok, value = pickle.loads(task.result())
        except CancelledError:
            fut.set_exception(ShutdownError(f"the DaskPool {self.name} was closed before this call finished"))
        except BaseException as e:
            fut.set_exception(e)
        else:
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(unpack_error(value))

    def close(self, wait: bool = True) -> None:
        """Stops the pool: maps still running are interrupted (their batches cancelled;
        their iterators raise ShutdownError), submit() calls are waited for (`wait`) or
        cancelled (their futures get ShutdownError), and the plugin is unregistered, which
        shuts down the mpop app of every Dask worker. Idempotent. Close the pool before its
        client: a closed client cannot reach the workers."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            maps, calls = list(self._maps), list(self._calls)
        for run in maps:
            run.abandon()
        if calls:
            if wait:
                distributed.wait(calls)
            else:
                self.client.cancel(calls)
        self._unregister()

    def _unregister(self) -> None:
        if self.client.status not in ("running", "connecting", "newly-created"):
            return
        try:
            self.client.unregister_worker_plugin(self.name)
        except ValueError:  # never registered (construction failed before the scheduler had it)
            pass

    def __enter__(self) -> DaskPool:
        """Returns the pool; raises ShutdownError if it was closed."""
        self._check_open()
        return self

    def __exit__(self, *exc: Any) -> None:
        """close(), without waiting for submit() calls when the block raised."""
        self.close(wait=exc[0] is None)


class BatchIterator(MapIterator):
    """What DaskPool.map returns: the values, flattened from each batch's list; close()
    abandons the map; `batch_sizes` lists the size of each batch sent so far."""

    batch_sizes: list[int]


def _function_blob(fn: Any) -> bytes:
    """`fn` pickled for the Dask workers: importable functions by reference, others by
    value (cloudpickle). The workers unpickle each distinct blob once."""
    try:
        return cloudpickle.dumps(fn, protocol=5)
    except Exception as e:
        raise TypeError(f"{fn!r} cannot be sent to the Dask workers: {e}") from e


class _MapRun:
    """One DaskPool.map call: reads the input as batches are needed, keeps a bounded window
    of batches (Dask futures) in flight, and yields each batch's values (in order, or as
    they come)."""

    def __init__(self, pool: DaskPool, fn: Any, iterables: tuple, ordered: bool, batch_size: int | None,
                 max_in_flight: int) -> None:
        self.pool, self.client, self.ordered = pool, pool.client, ordered
        self.fn_blob = _function_blob(fn)
        self.fn = fn
        self.single = len(iterables) == 1
        self.source: Iterator = iter(iterables[0]) if self.single else zip(*iterables)
        # A range travels as sub-ranges (a few bytes a batch): no list to build or pickle.
        self.span = iterables[0] if self.single and type(iterables[0]) is range else None
        slots = sum(self.client.nthreads().values())
        self.window = max(4, 2 * slots)  # batches in flight: two per Dask thread
        self.items_limit = max_in_flight
        self.sizer = BatchSizer(slots, known_length(iterables), batch_size, max(1, max_in_flight // self.window))
        self.sizes: list[int] = []
        self.inflight: collections.deque = collections.deque()  # (Dask future, items), in send order
        self.out = 0  # items in flight
        self.completed = distributed.as_completed() if not ordered else None
        self.exhausted = False
        self.checked = False
        self.source_error: Exception | None = None
        self.abandoned = False
        self.lock = threading.Lock()  # `inflight` and `abandoned`: close() may come from another thread

    def batches(self) -> Iterator[list]:
        """Yields the values of each batch, as a list, in the order map() returns them."""
        try:
            while True:
                self._check_running()  # close() may have taken batches that were out
                self._fill()
                if not self.inflight:
                    if self.source_error is not None:
                        raise self.source_error
                    return
                values, error = self._next_result()
                yield values
                if error is not None:
                    raise unpack_error(error)
        finally:
            self.abandon()

    def abandon(self) -> None:
        """Cancels the batches still out (the map ended, was closed, or its pool closes)."""
        with self.lock:
            self.abandoned = True
            futures = [f for f, _ in self.inflight]
            self.inflight.clear()
        if futures and self.client.status == "running":
            self.client.cancel(futures)

    def _fill(self) -> None:
        """Sends batches while the window has room and the input has items."""
        sizer = self.sizer
        while not self.exhausted and len(self.inflight) < self.window and self.out < self.items_limit:
            n = sizer.next_size(self.items_limit - self.out)
            if self.span is not None:
                payload: Any = self.span[sizer.taken:sizer.taken + n]
                count = len(payload)
                if count and not self.checked:
                    self._check_first(payload)
            else:
                items = self._read(n)
                count = len(items)
                if count and not self.checked:
                    self._check_first(items)
                columns = [items] if self.single else [list(c) for c in zip(*items)]
                try:
                    payload = dumps(columns)
                except Exception as e:
                    raise TypeError(f"an item of this map cannot be pickled: {e}") from e
                if count:
                    sizer.learn_bytes(count, len(payload))
            if not count:
                self.exhausted = True
                return
            with self.lock:
                self._check_running()
                fut = self.client.submit(run_batch, self.pool.name, self.fn_blob, payload, pure=False)
                self.inflight.append((fut, count))
            if self.completed is not None:
                self.completed.add(fut)
            self.sizes.append(count)
            self.out += count
            sizer.took(count)

    def _check_running(self) -> None:
        if self.abandoned:
            raise ShutdownError(f"the DaskPool {self.pool.name} was closed while this map ran")

    def _read(self, n: int) -> list:
        """The next `n` items (fewer at the end). extend() keeps the items read before the
        input raised: they go out, and the error is raised in their place, after them."""
        items: list = []
        try:
            items.extend(itertools.islice(self.source, n))
        except Exception as e:
            self.source_error, self.source, self.exhausted = e, iter(()), True
        return items

    def _check_first(self, items: Any) -> None:
        self.checked = True
        _check_call(self.fn, (items[0],) if self.single else tuple(items[0]), {})

    def _next_result(self) -> tuple[list, Any]:
        """The next batch's (values, packed error or None), waiting for it."""
        if self.ordered:
            with self.lock:
                self._check_running()
                fut, n = self.inflight.popleft()
        else:
            while True:
                fut = next(self.completed, None)  # None: every batch was cancelled
                with self.lock:
                    self._check_running()
                    if fut is None:  # pragma: no cover - defensive: batches out, none to wait for
                        raise MpopError("DaskPool.map lost track of its batches")
                    n = next((k for f, k in self.inflight if f is fut), None)
                    if n is not None:
                        self.inflight.remove((fut, n))
                        break
        self.out -= n
        try:
            blob = fut.result()
        except CancelledError:
            raise ShutdownError(f"the DaskPool {self.pool.name} was closed while this map ran") from None
        values, elapsed_ns, error = pickle.loads(blob)
        self.sizer.learn(len(values), elapsed_ns)
        return values, error
