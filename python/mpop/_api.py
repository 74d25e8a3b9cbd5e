"""MpopApi: the public entry point. Validates configuration, registers handlers, enqueues
tasks through the native producer, runs the supervisor, and hands results back."""

from __future__ import annotations

import collections
import functools
import importlib
import itertools
import logging
import math
import operator
import os
import pickle
import sys
import threading
import time
import types
import weakref
from concurrent.futures import Future
from typing import Any, Callable, Iterable, Iterator

from . import _core
from ._builtins import MAP_CHUNK_ID
from ._dispatch import ROUTE_FUTURE, ROUTE_PLAIN, Dispatcher, MapState, unpack_error
from ._errors import ConfigError, MpopError, QueueFull, RegistryError, ShutdownError
from ._registry import Handler, Registry
from ._results import RunResult, TaskResult, _percentile
from ._slots import TaskSlot196_cargs, is_slot_class, slot_layout
from ._worker import BOOT_FN_ID

__all__ = ["MpopApi", "Mpop"]

log = logging.getLogger("mpop")

_START_METHODS = ("spawn", "fork", "forkserver")
_MAX_TSK_ID = 0xFFFFFFFF
_UNSERIALISABLE = (pickle.PicklingError, TypeError, AttributeError)
_SEQ, _SUCCESS, _ATTEMPTS, _WORKER_ID, _RUN_TIME, _QUEUE_WAIT = map(operator.attrgetter, (
    "seq", "success", "attempts", "worker_id", "run_time_s", "queue_wait_s"))


def _available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _known_length(iterables: tuple) -> int | None:
    """How many items map() will draw from `iterables` (zipped: the shortest), or None when
    one of them has no length (a generator, an iterator). Only a hint for sizing chunks."""
    try:
        return min(len(it) for it in iterables)
    except (TypeError, ValueError, OverflowError):  # unsized, or a length len() cannot give
        return None


class _Runtime:
    """The native objects of one app, owned apart from the app so that a finalizer can
    release them at garbage collection or interpreter exit without keeping the app alive."""

    def __init__(self, segment, producer, collector) -> None:
        self.segment = segment
        self.producer = producer
        self.collector = collector
        self.supervisor = None
        self.forkserver = None
        self.dispatcher: Dispatcher | None = None
        self.fast = None  # _core.FastPath: armed while the workers run
        self.written: set[int] = set()  # fn_ids whose handlers are in this segment's registry
        self.closed = False
        self.inherited = False  # a fork() child's copy of its parent's runtime (see abandon)

    def stop_workers(self, graceful: bool, timeout: float = 10.0) -> None:
        if self.fast is not None:
            self.fast.armed = False  # calls take the Python path, which restarts workers
        sup, self.supervisor = self.supervisor, None
        if sup is not None:
            sup.stop(graceful, timeout)

    def abandon(self) -> None:
        """In a fork() child: this runtime is the parent's. The child never stops, closes or
        drains it (the native objects' destructors leave it alone too); calls raise."""
        self.inherited = True
        if self.fast is not None:
            self.fast.armed = False
        if self.dispatcher is not None:
            self.dispatcher.inherited = True

    def close(self) -> None:
        if self.closed or self.inherited:
            return
        self.closed = True
        if self.fast is not None:
            self.fast.armed = False
        # First the result thread: at interpreter exit a daemon thread still inside native
        # code would be killed while retaking the GIL, which aborts the process.
        if self.dispatcher is not None:
            self.dispatcher.stop_background()
            # No future stays pending (it would also keep the dispatcher alive: an untracked
            # one's class refers to it, see MpopFuture).
            self.dispatcher.fail_all(lambda: ShutdownError("the app was shut down before this task finished"))
        self.producer.close()
        self.segment.set_shutdown()
        try:
            self.stop_workers(graceful=False, timeout=2.0)
        finally:  # even after a Ctrl-C there (the workers are gone by then)
            self._release()

    def _release(self) -> None:
        if self.forkserver is not None:
            self.forkserver.close()
        self.segment.leave()
        # Let go of every Python object the native ones hold (the dispatcher's futures dict,
        # future class and bound methods), so that nothing keeps the dispatcher, and through
        # it the unlinked segment's mapping, alive after shutdown: futures the caller keeps
        # refer to the dispatcher through their class.
        if self.dispatcher is not None:
            self.dispatcher.release()
        else:
            self.collector.unbind_settle()
        if self.fast is not None:
            self.fast.release()


_cleaned = False


def _cleanup_dead_owners_once() -> None:
    """The first app of a process removes segments left by owners that died (API.md: "the
    next start cleans up after a dead owner")."""
    global _cleaned
    if _cleaned:
        return
    _cleaned = True
    try:
        from ._cleanup import remove_dead_segments

        remove_dead_segments()
    except Exception as e:  # never let housekeeping stop an app from starting
        log.debug("cleanup of dead owners' segments failed: %r", e)


def _finalize(runtime_ref: list) -> None:
    if runtime_ref and runtime_ref[0] is not None:
        runtime_ref[0].close()


# Every live app of this process, so that a fork() child can disown the ones it inherits.
_APPS: weakref.WeakSet = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for app in list(_APPS):
        app._disown()


os.register_at_fork(after_in_child=_after_fork_in_child)


class MapIterator(itertools.chain):
    """What map() returns: an iterator over the values, flattened from each chunk's list in C
    (a generator yielding item by item cost more per item than the whole trip through a
    worker). ``close()`` abandons the map, like a generator's."""

    def close(self) -> None:
        self._chunks.close()


class MpopApi:
    """Runs Python tasks across worker processes through a shared-memory task ring.

    See the package documentation for every parameter; each bad value raises ConfigError
    naming the parameter and the accepted range."""

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
    ) -> None:
        problems = []

        def bad(msg: str) -> None:
            problems.append(msg)

        if workers is None:
            workers = _available_cpus()
        elif not _is_int(workers) or not 1 <= workers <= 1024:
            bad(f"workers must be an int from 1 to 1024 (or None for the CPUs this process may use), "
                f"got {workers!r}")
        if not _is_int(queue_slots) or queue_slots < 2 or queue_slots & (queue_slots - 1):
            bad(f"queue_slots must be a power of 2 and >= 2, got {queue_slots!r}")
        elif queue_slots > 1 << 24:
            bad(f"queue_slots must be at most {1 << 24}, got {queue_slots!r}")
        layout = None
        if not is_slot_class(slot_class):
            bad(f"slot_class must be a ctypes.Structure subclass with tsk_id, fn_id and args, got {slot_class!r}")
        else:
            try:
                layout = slot_layout(slot_class)
            except ValueError as e:
                bad(str(e))
        if not _is_int(worker_batch_size) or worker_batch_size < 1:
            bad(f"worker_batch_size must be an int >= 1, got {worker_batch_size!r}")
        for pname, v in (("display", display), ("auto_terminate", auto_terminate), ("debug", debug),
                         ("max_performance", max_performance)):
            if not isinstance(v, bool):
                bad(f"{pname} must be True or False, got {v!r}")
        if (not isinstance(debug_delay, (int, float)) or isinstance(debug_delay, bool)
                or not math.isfinite(debug_delay) or debug_delay < 0):
            bad(f"debug_delay must be a finite number of seconds >= 0, got {debug_delay!r}")
        if start_method not in _START_METHODS:
            bad(f"start_method must be one of {', '.join(map(repr, _START_METHODS))}, got {start_method!r}")
        if not _is_int(max_retries) or max_retries < 0:
            bad(f"max_retries must be an int >= 0, got {max_retries!r}")
        elif max_retries > 1000:
            bad(f"max_retries must be at most 1000, got {max_retries!r}")
        if task_timeout is not None and (not isinstance(task_timeout, (int, float)) or isinstance(task_timeout, bool)
                                         or math.isnan(task_timeout) or task_timeout <= 0):
            bad(f"task_timeout must be a number of seconds > 0 (or None / inf for no limit), got {task_timeout!r}")
        elif task_timeout is not None and math.isinf(task_timeout):
            task_timeout = None
        if max_tasks_per_worker is not None and (not _is_int(max_tasks_per_worker) or max_tasks_per_worker < 1):
            bad(f"max_tasks_per_worker must be an int >= 1 or None, got {max_tasks_per_worker!r}")
        cpus: list[int] | None = None
        if cpu_affinity is True:
            cpus = sorted(os.sched_getaffinity(0))
        elif isinstance(cpu_affinity, (list, tuple)):
            allowed = os.sched_getaffinity(0)
            if not cpu_affinity or not all(_is_int(c) and c in allowed for c in cpu_affinity):
                bad(f"cpu_affinity must be True/False or a non-empty list of CPU ids from {sorted(allowed)}, "
                    f"got {cpu_affinity!r}")
            else:
                cpus = list(cpu_affinity)
        elif cpu_affinity is not False:
            bad(f"cpu_affinity must be True, False or a list of CPU ids, got {cpu_affinity!r}")
        if name is not None and (not isinstance(name, str) or not name or len(name) > 64
                                 or not all(c.isalnum() or c in "_-." for c in name)):
            bad(f"name must be 1-64 characters of letters, digits, '_', '-' or '.', got {name!r}")
        if not _is_int(pool_bytes) or pool_bytes < 1 << 16:
            bad(f"pool_bytes must be an int >= 65536, got {pool_bytes!r}")
        if not _is_int(registry_bytes) or registry_bytes < 1 << 16:
            bad(f"registry_bytes must be an int >= 65536, got {registry_bytes!r}")
        if handler_module is not None and not isinstance(handler_module, (str, types.ModuleType)):
            bad(f"handler_module must be a module name or module, got {handler_module!r}")
        if scale_limit is not None and (not _is_int(scale_limit) or scale_limit < 1 or scale_limit > 1024):
            bad(f"scale_limit must be an int from 1 to 1024 or None, got {scale_limit!r}")
        elif scale_limit is not None and _is_int(workers) and scale_limit < workers:
            bad(f"scale_limit ({scale_limit}) must be >= workers ({workers})")
        if problems:
            raise ConfigError("invalid MpopApi configuration:\n  - " + "\n  - ".join(problems))

        self._config = {
            "workers": workers,
            "queue_slots": queue_slots,
            "slot_class": slot_class.__name__,
            "worker_batch_size": worker_batch_size,
            "display": display,
            "auto_terminate": auto_terminate,
            "debug": debug,
            "debug_delay": float(debug_delay),
            "handler_module": getattr(handler_module, "__name__", handler_module),
            "start_method": start_method,
            "max_retries": max_retries,
            "task_timeout": task_timeout,
            "max_tasks_per_worker": max_tasks_per_worker,
            "cpu_affinity": cpus,
            "name": name or "mpop",
            "max_performance": max_performance,
            "pool_bytes": pool_bytes,
            "registry_bytes": registry_bytes,
            "scale_limit": scale_limit or max(workers, 2 * _available_cpus(), 8),
        }
        self._slot_class = slot_class
        self._layout = layout
        self._lock = threading.RLock()
        self._runtime: _Runtime | None = None
        self._runtime_ref: list = [None]
        self._dispatcher: Dispatcher | None = None
        self._shutdown = False
        self._tsk_ids = itertools.count(1)
        self._routes = itertools.count(2)
        self._run_started: float | None = None
        if debug and not max_performance:
            self._enable_debug_logging()
        # The registry calls back into the app weakly: an app nobody refers to any more is
        # freed (and its finalizer stops its workers) at once, not at the next collection.
        app_ref = weakref.ref(self)

        def on_register(h: Handler, replaces: Handler | None) -> None:
            app = app_ref()
            if app is not None:
                app._on_register(h, replaces)

        self._registry = Registry(slot_class, on_register=on_register)
        self._owner_pid = os.getpid()
        self._inherited = False  # see _disown
        self._finalizer = weakref.finalize(self, _finalize, self._runtime_ref)
        _APPS.add(self)
        if handler_module is not None:
            try:
                self.register_handlers(module=handler_module)
            except ImportError as e:
                raise ConfigError(f"handler_module {self._config['handler_module']!r} cannot be "
                                  f"imported: {e}") from e
            except RegistryError as e:
                raise ConfigError(f"handler_module {self._config['handler_module']!r}: {e}") from e

    # -- configuration helpers --------------------------------------------------------------

    @staticmethod
    def _enable_debug_logging() -> None:
        # debug=True promises a log line per task: make sure one reaches the user even when
        # logging was never configured (the prototype dropped them when display was off).
        if not log.hasHandlers():  # neither ours nor an ancestor's (e.g. basicConfig)
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("[mpop] %(message)s"))
            log.addHandler(handler)
        log.setLevel(logging.DEBUG)

    @property
    def config(self) -> dict:
        return dict(self._config)

    @property
    def segment_name(self) -> str | None:
        return self._runtime.segment.name if self._runtime is not None else None

    def __repr__(self) -> str:
        state = "shut down" if self._shutdown else ("running" if self._running() else "idle")
        return f"<MpopApi workers={self._config['workers']} {state} segment={self.segment_name}>"

    # -- handlers ---------------------------------------------------------------------------

    def task(self, fn: Callable | None = None, *, fn_id: int | None = None, name: str | None = None):
        """Decorator registering a handler: ``@app.task`` or ``@app.task(fn_id=0xB000)``."""

        def deco(f: Callable) -> Callable:
            self.register(f, fn_id=fn_id, name=name)
            return f

        return deco(fn) if fn is not None else deco

    def register(self, fn: Callable, fn_id: int | None = None, name: str | None = None) -> int:
        """Registers `fn` under `fn_id` (auto-assigned from 0x1000 when None)."""
        self._check_open()
        return self._registry.register(fn, fn_id=fn_id, name=name)

    def register_handlers(self, module: str | types.ModuleType | None = None,
                          handlers_dict: dict | None = None) -> list[int]:
        """Registers a module's ``HANDLERS`` dict and/or a dict ``{fn_id: fn}``."""
        self._check_open()
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
        return [h.describe() for h in self._registry.handlers()]

    def validate(self) -> None:
        """Checks every registered handler can travel to a worker; raises listing each problem."""
        handler_problems, config_problems = [], []
        for h in self._registry.handlers():
            try:
                pickle.loads(h.spec())
            except Exception as e:
                handler_problems.append(f"handler {h.name!r} (fn_id {h.fn_id:#x}) cannot be sent to workers: {e!r}")
        mod = self._config["handler_module"]
        if mod:
            try:
                importlib.import_module(mod)
            except Exception as e:
                config_problems.append(f"handler_module {mod!r} cannot be imported: {e!r}")
        problems = config_problems + handler_problems
        if problems:
            kind = RegistryError if handler_problems else ConfigError
            raise kind("invalid app:\n  - " + "\n  - ".join(problems))

    def _on_register(self, h: Handler, replaces: Handler | None = None) -> None:
        rt = self._runtime
        if rt is None:
            return
        if replaces is not None:
            # The new record first, then the epoch: a worker that sees the epoch move drops
            # what it loaded and reads the log again, and every task enqueued after this
            # call is claimed after the bump. Only then may calls take the fast path.
            rt.fast.discard(replaces.fn)
            rt.written.discard(h.fn_id)
            self._write_handler(h, rt, arm=False)
            rt.segment.bump_registry_epoch()
            self._arm_fast_path(h, rt)
            return
        self._write_handler(h, rt)

    def _write_handler(self, h: Handler, rt: _Runtime | None = None, arm: bool = True) -> None:
        rt = rt or self._runtime
        if h.fn_id in rt.written:
            return
        try:
            blob = h.spec()
        except Exception as e:
            raise RegistryError(f"handler {h.name!r} cannot be sent to workers: {e!r}") from e
        try:
            rt.segment.write_registry(h.fn_id, blob)
        except ValueError as e:
            raise RegistryError(str(e).removeprefix("mpop: ")) from None
        rt.written.add(h.fn_id)
        if arm:
            self._arm_fast_path(h, rt)

    def _arm_fast_path(self, h: Handler, rt: _Runtime) -> None:
        # Calls of the function itself may now take the native path, which does what
        # resolve() and check_args() do for them: the argument count is all it checks.
        if not h.slot_mode and not h.needs_kw and self._registry.resolves_directly(h):
            rt.fast.add(h.fn, h.fn_id, h.min_pos, -1 if h.max_pos == float("inf") else int(h.max_pos))

    def _handler_name(self, fn_id: int) -> str:
        h = self._registry.get(fn_id)
        return h.name if h is not None else f"fn_id {fn_id:#x}"

    # -- runtime ----------------------------------------------------------------------------

    def _check_open(self) -> None:
        self._check_owner()
        if self._shutdown:
            raise ShutdownError("this MpopApi was shut down; create a new one")

    def _check_owner(self) -> None:
        if self._inherited:
            raise MpopError(f"this MpopApi belongs to process {self._owner_pid}; process {os.getpid()} "
                            f"inherited it through fork() and cannot use it: create a new MpopApi here")

    def _disown(self) -> None:
        """Called in a fork() child for every app it inherited: the parent's workers, segment
        and results stay the parent's. Every call raises MpopError from now on, except
        shutdown(), which only marks this copy shut down (a `with` block may end in the
        child), and nothing is released at the child's exit."""
        self._inherited = True
        rt = self._runtime
        if rt is not None:
            rt.abandon()
    def _ensure_runtime(self) -> _Runtime:
        rt = self._runtime
        if rt is not None:
            return rt
        with self._lock:
            if self._runtime is not None:
                return self._runtime
            self._check_open()
            c = self._config
            result_slots = max(c["queue_slots"], 1024)
            _cleanup_dead_owners_once()
            seg = _core.Segment.create(
                c["name"], self._layout, c["queue_slots"], result_slots, c["scale_limit"],
                # a claim never takes more than the ring holds: size local queues to match
                min(c["worker_batch_size"], c["queue_slots"]), c["pool_bytes"], c["registry_bytes"], debug=c["debug"],
                debug_delay=c["debug_delay"], max_performance=c["max_performance"],
                max_tasks_per_worker=c["max_tasks_per_worker"] or 0)
            rt = _Runtime(seg, _core.Producer(seg), _core.Collector(seg))
            boot = {
                "sys_path": [p for p in sys.path if p],
                "handler_module": c["handler_module"],
                "cpu_affinity": c["cpu_affinity"],
                "debug": c["debug"],
            }
            seg.write_registry(BOOT_FN_ID, pickle.dumps(boot, protocol=5))
            # The runtime refers to the app only weakly, so that dropping the app lets its
            # finalizer release the runtime (a strong reference would keep both alive).
            app = weakref.ref(self)

            def names(fn_id: int) -> str:
                a = app()
                return a._handler_name(fn_id) if a is not None else f"fn_id {fn_id:#x}"

            def check_workers() -> None:
                a = app()
                if a is not None:
                    a._check_workers()

            # The producer's count, not a closure over the runtime: nothing the dispatcher
            # holds may lead back to the runtime (see _Runtime.close).
            submitted = functools.partial(getattr, rt.producer, "submitted")
            d = rt.dispatcher = Dispatcher(rt.collector, names, c, submitted)
            rt.fast = _core.fast_path(rt.producer, self._tsk_ids, _MAX_TSK_ID)
            rt.fast.bind(d.futures, d.early, d.register_future, d.future_cls, check_workers)
            try:
                for h in self._registry.handlers(internal=True):
                    self._write_handler(h, rt)
            except BaseException:
                rt.close()  # e.g. a handler that cannot be pickled: the next call starts afresh
                raise
            # Published last: a thread that finds _runtime set (without the lock) finds the
            # dispatcher and the handlers in place too.
            self._dispatcher = d
            self._runtime_ref[0] = rt
            self._runtime = rt
            return rt

    def _running(self) -> bool:
        rt = self._runtime
        return rt is not None and rt.supervisor is not None and rt.supervisor.running

    def _worker_command(self) -> tuple[list[str], list[str]]:
        pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        code = ("import sys; sys.path.insert(0, sys.argv[1]); from mpop._worker import main; "
                "sys.exit(main(sys.argv[2:]))")
        argv = [sys.executable, "-c", code, pkg_parent, self._runtime.segment.name]
        env = [f"{k}={v}" for k, v in os.environ.items()]
        return argv, env

    def start(self) -> None:
        """Starts the workers (non-blocking, idempotent) and begins feeding the backlog."""
        self._check_open()
        rt = self._ensure_runtime()
        with self._lock:
            if self._running():
                return
            c = self._config
            argv, env = self._worker_command()
            from . import _worker

            entry = None
            if c["start_method"] == "fork":
                entry = functools.partial(_worker.forked_main, rt.segment.name)
            elif c["start_method"] == "forkserver":
                if rt.forkserver is None:
                    rt.forkserver = _worker.ForkServer(rt.segment.name, argv[:-1])
                entry = rt.forkserver.spawn
            sup = _core.Supervisor(rt.segment, c["workers"], c["max_retries"],
                                   float(c["task_timeout"] or 0.0), c["start_method"], argv, env, entry)
            try:
                sup.start()
            except RuntimeError as e:
                raise MpopError(str(e)) from None
            rt.supervisor = sup
            rt.producer.start_feeding()
            self._dispatcher.start_background()
            rt.fast.armed = True
            if self._run_started is None:
                self._run_started = time.monotonic()

    def _check_workers(self) -> None:
        rt = self._runtime
        sup = rt.supervisor if rt is not None else None
        if sup is not None and sup.last_error:
            err = sup.last_error
            self._stop_workers(graceful=False)
            raise MpopError(err)

    def _stop_workers(self, graceful: bool = True) -> None:
        rt = self._runtime
        if rt is None:
            return
        with self._lock:
            rt.stop_workers(graceful)
            rt.producer.pause_feeding()

    # -- enqueue ----------------------------------------------------------------------------

    def _push(self, h: Handler, tsk_id: int, args: tuple, kwargs: dict | None, c_args: Any,
              blocking: bool, timeout: float | None, route: int, claim_alone: bool = False) -> int:
        rt = self._runtime or self._ensure_runtime()
        if h.fn_id not in rt.written:
            self._write_handler(h, rt)
        try:
            return rt.producer.enqueue(h.fn_id, tsk_id, args, kwargs, c_args, h.slot_mode, blocking,
                                       timeout, route, claim_alone, self._check_workers)
        except RecursionError as e:  # a RuntimeError, but a fault of the argument, not the app
            raise TypeError(f"an argument of task {tsk_id} for {h.name!r} cannot be serialised: "
                            f"it is nested too deeply ({e})") from None
        except _UNSERIALISABLE as e:
            if isinstance(e, TypeError) and str(e).startswith("mpop:"):
                raise TypeError(str(e)[6:]) from None
            raise TypeError(f"an argument of task {tsk_id} for {h.name!r} cannot be serialised: {e}") from e
        except ValueError as e:
            msg = str(e)
            raise ValueError(msg[6:] if msg.startswith("mpop: ") else msg) from None
        except RuntimeError as e:
            if self._shutdown:
                raise ShutdownError("this MpopApi was shut down") from None
            raise MpopError(str(e)) from None

    def _label(self, tsk_id: Any) -> int:
        if tsk_id is None:
            return next(self._tsk_ids) & _MAX_TSK_ID
        if not _is_int(tsk_id) or not 0 <= tsk_id <= _MAX_TSK_ID:
            raise ValueError(f"tsk_id must be an int from 0 to {_MAX_TSK_ID}, got {tsk_id!r}")
        return tsk_id

    def enqueue(self, fn: Any = None, *, fn_id: int | None = None, args: Iterable = (),
                kwargs: dict | None = None, tsk_id: int | None = None, c_args: bytes | None = None,
                blocking: bool = True, timeout: float | None = None, **handler_kwargs: Any) -> bool:
        """Queues one task. Returns True, or False when ``blocking=False`` and the ring is
        full; raises QueueFull when a blocking enqueue times out."""
        if (fn_id is None and kwargs is None and tsk_id is None and c_args is None and blocking is True
                and timeout is None and not handler_kwargs):
            # The usual call, enqueue(fn, args=(...)): one native step while the workers run
            # (FastPath); None when it does not apply, and the steps below run instead.
            rt = self._runtime
            if rt is not None and rt.fast.enqueue(fn, args):
                return True
        self._check_open()
        h = self._registry.resolve(fn, fn_id)
        if handler_kwargs:
            kwargs = {**(kwargs or {}), **handler_kwargs}
        args = tuple(args)
        h.check_args(args, kwargs)
        if c_args is not None:
            if not isinstance(c_args, (bytes, bytearray, memoryview)):
                raise TypeError(f"c_args must be bytes, got {type(c_args).__name__}")
            c_args = bytes(c_args)
        label = self._label(tsk_id)
        args, kwargs = h.call_args(args, kwargs)
        seq = self._push(h, label, args, kwargs, c_args, blocking, timeout, ROUTE_PLAIN)
        if seq:
            return True
        if not blocking:
            return False
        raise QueueFull(f"the task ring ({self._config['queue_slots']} slots) stayed full for {timeout}s")

    def enqueue_many(self, tasks: Iterable) -> int:
        """Queues tasks given as ``(fn_or_id, *args)`` tuples or dicts ``{"fn": ..}`` /
        ``{"fn_id": .., "args": (..)}``. Returns how many were queued."""
        n = 0
        for t in tasks:
            if isinstance(t, dict):
                spec = dict(t)
                fn = spec.pop("fn", None)
                self.enqueue(fn, **spec)
            elif isinstance(t, (tuple, list)) and t:
                self.enqueue(t[0], args=tuple(t[1:]))
            else:
                raise TypeError(f"enqueue_many takes tuples (fn, *args) or dicts, got {t!r}")
            n += 1
        return n

    # -- futures and map --------------------------------------------------------------------

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Future:
        """Queues ``fn(*args, **kwargs)`` and returns a concurrent.futures.Future."""
        rt = self._runtime
        if rt is not None and not kwargs:
            fut = rt.fast.submit(fn, args)  # the native path, as in enqueue()
            if fut is not None:
                return fut
        self._check_open()
        h = self._registry.resolve(fn)
        h.check_args(args, kwargs)
        if not self._running():
            self.start()
        fut = self._dispatcher.future_cls()
        args, kwargs = h.call_args(args, kwargs or None)
        seq = self._push(h, self._label(None), args, kwargs, None, True, None, ROUTE_FUTURE)
        d = self._dispatcher
        d.register_future(seq, fut)
        if d._thread is None:
            d.start_background()
        return fut

    def map(self, fn: Any, *iterables: Iterable, ordered: bool = True, progress: bool = False,
            timeout: float | None = None, max_in_flight: int | None = None,
            chunksize: int | None = None) -> Iterator[Any]:
        """Yields ``fn(*items)`` for items drawn from the iterables (in order unless
        ``ordered=False``).

        Items travel in chunks: the first are small (two a worker, until one is back),
        later ones are sized so that each takes a worker about 20 ms (5 ms for an input of
        unknown length, such as a generator), and, when the length is known, no chunk more
        than a share of what is left (or pass `chunksize`). At most `max_in_flight`
        items (default 4 x queue_slots, or 64 x queue_slots for a range, whose items are not
        built until they run) and 8 chunks a worker are in flight, so any input length runs
        in flat memory."""
        self._check_open()
        if not iterables:
            raise TypeError("map() needs at least one iterable")
        if chunksize is not None and (not _is_int(chunksize) or chunksize < 1):
            raise ValueError(f"chunksize must be an int >= 1 or None, got {chunksize!r}")
        if max_in_flight is not None and (not _is_int(max_in_flight) or max_in_flight < 1):
            raise ValueError(f"max_in_flight must be an int >= 1 or None, got {max_in_flight!r}")
        h = self._registry.resolve(fn)
        self.start()
        chunks = self._map_iter(h, iterables, ordered, progress, timeout, max_in_flight, chunksize)
        it = MapIterator.from_iterable(chunks)
        it._chunks = chunks
        return it

    # Worker time per chunk once the cost of an item is known. Each chunk costs this thread
    # (a push, its share of a wake-up, settling) and its worker (claim, result) tens of
    # microseconds; at 5 ms, the owner used 1-1.4 us of CPU per medium item, on the cores
    # the workers need, and 0.5 us at 20 ms. Guided tail chunks keep the finish even.
    _CHUNK_TARGET_NS = 20_000_000
    # An input of unknown length (a generator) cannot be guided: its last chunk may leave
    # the other workers idle for as long as it takes, so its chunks stay at 5 ms.
    _CHUNK_TARGET_UNSIZED_NS = 5_000_000
    _CHUNK_FLOOR_NS = 200_000  # the least worker time a guided chunk is cut to
    _CHUNK_MAX = 16384
    _SPREAD_MAX = 250  # a task carries at most 255 positional arguments

    def _map_iter(self, h: Handler, iterables: tuple, ordered: bool, progress: bool,
                  timeout: float | None, max_in_flight: int | None,
                  chunksize: int | None) -> Iterator[list]:
        """Yields the values of each chunk, as a list, in the order map() returns them."""
        d = self._dispatcher
        runner = self._registry.get(MAP_CHUNK_ID)
        route = next(self._routes)
        state = MapState()
        d.maps[route] = state
        single = len(iterables) == 1
        source = iter(iterables[0]) if single else zip(*iterables)
        deadline = None if timeout is None else time.monotonic() + timeout
        bar = self._progress_bar(progress, None)
        # Up to eight chunks per worker in flight: when this thread and the workers share
        # the cores, it is off its core for milliseconds at a time, and each worker must
        # have work queued for that long (with two a worker, a core sat idle 20% of the time
        # in list(map(inc, range(10**6)))).
        chunks_limit = max(8 * self._config["workers"], 4)
        # Until the first chunk is back, nothing is known of an item's cost: two small
        # chunks a worker, not the whole window (the rest go out sized from that timing).
        probe_limit = 2 * self._config["workers"]
        # A range travels as sub-ranges (a few bytes a chunk): no list to build or pickle.
        span = iterables[0] if single and type(iterables[0]) is range else None
        # With the length known (a range, a list, any sized input), chunks are guided (see
        # below); a generator's end comes unannounced, so its chunks stay small instead.
        total = _known_length(iterables)
        target_ns = self._CHUNK_TARGET_NS if total is not None else self._CHUNK_TARGET_UNSIZED_NS
        # Read ahead at most max_in_flight items, so memory stays flat for any input length.
        # Default: four rings' worth, or sixty-four for a range, whose items cost nothing
        # until they run: trivial items then go in chunks of 16k (1-2 ms of work), up to
        # eight a worker.
        items_limit = max_in_flight or (64 if span is not None else 4) * self._config["queue_slots"]
        # Chunks of at most half a worker's share of that window. With max_tasks_per_worker
        # or task_timeout, every item stays one task.
        size_cap = max(1, min(self._CHUNK_MAX, items_limit // (2 * self._config["workers"])))
        if self._config["max_tasks_per_worker"] or self._config["task_timeout"]:
            size_cap = 1  # recycling counts items, and a time limit applies to one item
        size = min(chunksize or 16, size_cap)
        # What each chunk's runner binds before an item: a partial's arguments, a function
        # sent by value (see Registry.resolve).
        call = (h.sends, h.binds_kw) if h.bound else None
        spread = False  # items as separate arguments (arrays): at most _SPREAD_MAX a chunk
        taken = 0  # items sent so far
        per_item_ns: float | None = None
        sizes: dict[int, int] = {}  # chunk index -> items, while in flight
        out = 0  # items in flight: the sum of `sizes`
        done = 0  # chunks returned; state.sent counts those sent
        exhausted = checked = False
        source_error: Exception | None = None  # what the input raised, once reached
        try:
            while True:
                state.touched = time.monotonic()  # the background thread leaves us alone
                limit = chunks_limit if per_item_ns is not None or chunksize else probe_limit
                while not exhausted and state.sent - done < limit and out < items_limit:
                    room = items_limit - out
                    if chunksize is None and total is not None:
                        # Guided: no chunk takes more than a share of what is left, so the
                        # workers finish together instead of one waiting on a last big chunk.
                        # Not below 0.2 ms of work, though: at the end, a chunk smaller than
                        # that costs more in its trip through this thread than it saves.
                        left = total - taken
                        floor = 1 if per_item_ns is None else int(self._CHUNK_FLOOR_NS / max(per_item_ns, 1.0))
                        room = min(room, max(1, floor, -(-left // (2 * self._config["workers"]))))
                    if span is not None:
                        items = span[taken:taken + min(size, room)]
                    else:
                        # extend() keeps the items read before the input raised: they go
                        # out, and the error is raised in their place, after their values.
                        items = []
                        try:
                            items.extend(itertools.islice(source, min(size, room)))
                        except Exception as e:
                            source_error, source = e, iter(())
                    if not items:
                        exhausted = True
                        break
                    if not checked:
                        h.check_args((items[0],) if single else tuple(items[0]), None)
                        checked = True
                        # numpy arrays go as arguments of their own, so that they travel
                        # through the pool without pickling and reach the handler as views.
                        spread = single and type(items[0]).__name__ == "ndarray"
                        if spread:
                            # A chunk's arrays take at most an eighth of the pool.
                            fit = self._config["pool_bytes"] // (8 * max(1, items[0].nbytes))
                            size_cap = max(1, min(size_cap, self._SPREAD_MAX, fit))
                            size = min(size, size_cap)
                            if len(items) > size:
                                source = itertools.chain(items[size:], source)
                                items = items[:size]
                    args = (h.fn_id, call, False, None, *items) if spread else (h.fn_id, call, not single, items)
                    key = state.sent & _MAX_TSK_ID
                    self._push_chunk(runner, key, args, route, state, deadline)
                    sizes[key] = len(items)
                    out += len(items)
                    taken += len(items)
                    state.sent += 1
                if done == state.sent and exhausted:
                    if source_error is not None:
                        raise source_error
                    return
                if ordered:
                    key = done & _MAX_TSK_ID
                    if key not in state.results:
                        self._wait_map(state, ordered, done, deadline, size)
                    status, value = state.results.pop(key)
                else:
                    if not state.results:
                        self._wait_map(state, ordered, done, deadline, size)
                    key, (status, value) = state.results.popitem()
                done += 1
                n = sizes.pop(key, 0)
                out -= n
                if status != 0:
                    raise value
                values, elapsed_ns, error = value
                if chunksize is None and values:
                    sample = elapsed_ns / len(values)
                    per_item_ns = sample if per_item_ns is None else 0.5 * per_item_ns + 0.5 * sample
                    size = int(min(size_cap, max(1, target_ns / max(per_item_ns, 1.0))))
                if bar is not None:
                    bar.update(len(values) + (1 if error is not None else 0))
                # One chunk at a time, then the window is topped up again: the caller's work
                # on a backlog of results takes milliseconds, and the workers would sit idle
                # for want of chunks if it went through all of them first.
                yield values
                if error is not None:
                    raise unpack_error(error)
                if len(values) != n:  # pragma: no cover - defensive
                    raise MpopError(f"map() chunk returned {len(values)} values for {n} items")
        finally:
            d.close_map(route, state)
            if bar is not None:
                bar.close()

    def _push_chunk(self, runner: Handler, key: int, args: tuple, route: int, state: MapState,
                    deadline: float | None) -> None:
        """Pushes one chunk of a map(), waiting for room if there is none.

        A chunk's pooled arguments are freed when its result is drained. While this map's
        own chunks hold the room, this thread drains them itself, one result at a time,
        and tries again: a push blocked in the native wait would leave the draining to the
        background thread, which steps aside while a map is driven (a 50 ms turn), and
        50 arrays of 8 MB went at half the speed of submit(). With none of its chunks in
        flight, the room is held by other tasks: the native wait, while the background
        thread drains those."""
        while not self._push(runner, key, args, None, None, False, None, route, True):
            received = state.received
            if state.sent == received:
                self._push(runner, key, args, None, None, True, None, route, True)
                return
            if not self._dispatcher.help_until(lambda: state.received != received, deadline,
                                               self._check_workers):
                raise TimeoutError("map() timed out waiting for room for its next chunk")

    _WAIT_RUN_ITEMS = 16384  # at most this many items' worth of chunks woken for at once

    def _wait_map(self, state: MapState, ordered: bool, done: int, deadline: float | None,
                  size: int) -> None:
        key = done & _MAX_TSK_ID
        ready = (lambda: key in state.results) if ordered else (lambda: bool(state.results))
        # Woken once per run of chunks, not per chunk (each wake-up costs this thread tens of
        # microseconds, on a core the workers need): up to half the chunks still to come
        # back (never more than will come: the wait would sit out its step), but no more
        # than about 16k items, whose values are all decoded before the first is returned
        # (with more, they left the cache first and the trivial map ran 10% slower).
        run = self._WAIT_RUN_ITEMS // size

        def want() -> int:
            return max(1, min((state.sent - state.received) // 2, run))

        if not self._dispatcher.help_until(ready, deadline, self._check_workers, want=want):
            raise TimeoutError("map() timed out waiting for results")

    # -- waiting and results ----------------------------------------------------------------

    def _outstanding(self) -> int:
        rt = self._runtime
        if rt is None or self._dispatcher is None:
            return 0
        return rt.producer.submitted - self._dispatcher.finished

    def wait(self, timeout: float | None = None) -> bool:
        """Blocks until every task enqueued so far has a result. Returns False on timeout."""
        self._check_owner()
        if self._runtime is None:
            return True
        if self._outstanding() and not self._running():
            self.start()
        target = self._runtime.producer.submitted
        deadline = None if timeout is None else time.monotonic() + timeout
        d = self._dispatcher
        return d.help_until(lambda: d.complete_below > target, deadline, self._check_workers,
                            want=lambda: target - d.finished)

    def results(self, timeout: float | None = None) -> Iterator[TaskResult]:
        """Yields the TaskResult of each enqueue()d task as it finishes, until every task
        enqueued so far is done (or `timeout` passes: TimeoutError)."""
        self._check_owner()
        if self._runtime is None:
            return
        if self._outstanding() and not self._running():
            self.start()
        d = self._dispatcher
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            while d.plain:
                yield d.plain.popleft()
            target = self._runtime.producer.submitted
            if d.complete_below > target and not d.plain:
                return
            if not d.help_until(lambda: bool(d.plain) or d.complete_below > target, deadline, self._check_workers):
                raise TimeoutError("results() timed out")

    # -- run --------------------------------------------------------------------------------

    def _progress_bar(self, progress: bool, total: int | None):
        if not progress:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, unit="task", desc="mpop")

    def run(self, enqueue_callback: Callable[[], Any] | None = None, progress: bool = False,
            timeout: float | None = None) -> RunResult:
        """Starts the workers, feeds the backlog, calls `enqueue_callback` until it returns
        False (or raises StopIteration), and returns once every task has a result."""
        self._check_open()
        rt = self._ensure_runtime()
        d = self._dispatcher
        started = time.monotonic()
        first_finished = d.finished
        self.start()
        deadline = None if timeout is None else started + timeout
        bar = self._progress_bar(progress, None)
        view = None
        if self._config["display"]:
            from ._status import LiveView

            view = LiveView(self)
        interrupted = False
        callback_active = enqueue_callback is not None
        try:
            while True:
                added = 0
                if callback_active:
                    before = rt.producer.submitted
                    try:
                        if enqueue_callback() is False:
                            callback_active = False
                    except StopIteration:
                        callback_active = False
                    added = rt.producer.submitted - before
                self._check_workers()
                if bar is not None:
                    bar.total = rt.producer.submitted - first_finished
                    bar.n = d.finished - first_finished
                    bar.refresh()
                if view is not None:
                    view.update()
                target = rt.producer.submitted
                if not callback_active and d.complete_below > target:
                    break
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"run() timed out after {timeout}s with "
                                       f"{target - d.finished} task(s) unfinished")
                # Between callback calls, poll for results: briefly while the callback keeps
                # adding work, up to 10 ms when it added none (no busy spinning).
                wait = (0.0 if added else 0.01) if callback_active else 0.1
                d.help_until(lambda: d.complete_below > target, time.monotonic() + wait, None,
                             want=lambda: target - d.finished)
        except KeyboardInterrupt:
            interrupted = True
            self._cancel_pending()
            self._stop_workers(graceful=False)
            # The stopped workers' tasks come back cancelled: collect them too.
            end = rt.producer.submitted
            d.help_until(lambda: d.complete_below > end, time.monotonic() + 5.0, None)
        finally:
            if bar is not None:
                bar.close()
            if view is not None:
                view.close()
        results = self._take_plain()
        results.sort(key=_SEQ)
        stats = self._stats(results, time.monotonic() - started)
        if self._config["auto_terminate"] and not interrupted:
            self._stop_workers(graceful=True)
        return RunResult(results=results, stats=stats, interrupted=interrupted)

    def _take_plain(self) -> list[TaskResult]:
        d = self._dispatcher
        if d._drain_lock.acquire(blocking=False):
            try:  # nobody appends meanwhile: take them in one step
                out = list(d.plain)
                d.plain.clear()
                return out
            finally:
                d._drain_lock.release()
        out = []
        while d.plain:
            out.append(d.plain.popleft())
        return out

    def _stats(self, results: list[TaskResult], elapsed: float) -> dict:
        # Iterations in C (map, attrgetter, Counter): run() returns after this, per task.
        sup_counters = self._runtime.supervisor.counters() if self._runtime.supervisor else {}
        attempts = list(map(_ATTEMPTS, results))
        stats = {
            "tasks": len(results),
            "failed": list(map(_SUCCESS, results)).count(False),
            "elapsed_s": elapsed,
            "tasks_per_s": len(results) / elapsed if elapsed > 0 else 0.0,
            "per_worker": dict(collections.Counter(map(_WORKER_ID, results))),
            "retries": sum(attempts) - len(attempts) + attempts.count(0),  # sum of max(0, a - 1)
            "crashes": sup_counters.get("crashes", 0),
        }
        # Percentiles of this run's own tasks (each result carries its timings).
        runs = list(map(_RUN_TIME, results))
        if runs.count(None) < len(runs):
            waits = sorted(w for w in map(_QUEUE_WAIT, results) if w is not None)
            runs = sorted(r for r in runs if r is not None)
            stats.update(queue_wait_p50_s=_percentile(waits, 0.5), queue_wait_p99_s=_percentile(waits, 0.99),
                         run_time_p50_s=_percentile(runs, 0.5), run_time_p99_s=_percentile(runs, 0.99))
        return stats

    # -- shutdown ---------------------------------------------------------------------------

    def _cancel_pending(self) -> int:
        rt = self._runtime
        if rt is None:
            return 0
        # Tasks already in workers' local queues but not started are cancelled there.
        rt.segment.cancel_below(rt.producer.submitted + 1)
        cancelled = rt.producer.cancel_queued()
        for seq, tsk_id, fn_id, route in cancelled:
            self._dispatcher.cancel(seq, tsk_id, fn_id, route)
        return len(cancelled)

    def shutdown(self, wait: bool = True, cancel_pending: bool = False) -> None:
        """Stops the app: finishes queued work (wait=True), or cancels what has not started
        (cancel_pending=True), then stops the workers and releases the shared memory."""
        if self._shutdown:
            return
        if self._inherited:  # a fork() child's copy: the parent's to stop, not ours
            self._shutdown = True
            return
        rt = self._runtime
        graceful = wait
        try:
            if rt is not None:
                if cancel_pending:
                    self._cancel_pending()
                if wait and self._outstanding() > 0:
                    try:
                        self.wait()
                    except MpopError:
                        # Workers cannot run (e.g. they fail to start): end what is left.
                        self._cancel_pending()
        except BaseException:
            graceful = False  # a Ctrl-C while waiting: stop now, without waiting for tasks
            raise
        finally:
            self._shutdown = True
            if rt is not None:
                rt.fast.armed = False
                self._dispatcher.stop_background()
                try:
                    # A Ctrl-C during a graceful stop kills the workers, then is raised.
                    rt.stop_workers(graceful=graceful, timeout=10.0 if graceful else 2.0)
                finally:
                    self._dispatcher.fail_all(lambda: ShutdownError("the app was shut down before this task finished"))
                    rt.close()
                    self._runtime = None
                    self._runtime_ref[0] = None

    close = shutdown

    def __enter__(self) -> MpopApi:
        self._check_open()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown(wait=exc[0] is None, cancel_pending=exc[0] is not None)

    # -- status and administration ----------------------------------------------------------

    def status(self) -> dict:
        """A snapshot: {"config": .., "queue": .., "workers": [..]}."""
        self._check_owner()
        rt = self._runtime
        queue: dict = {"capacity": self._config["queue_slots"], "queued": 0, "backlog": 0,
                       "submitted": 0, "finished": 0, "in_flight": 0}
        workers: list = []
        if rt is not None:
            queue.update(rt.segment.queue_status())
            queue["backlog"] = rt.producer.backlog
            queue["submitted"] = rt.producer.submitted
            queue["finished"] = self._dispatcher.finished
            queue["in_flight"] = queue["submitted"] - queue["finished"]
            workers = rt.segment.workers_status()
            if rt.supervisor is not None:
                queue.update(rt.supervisor.counters())
            timings = list(self._dispatcher.timings)  # the latest results, of every kind
            if timings:
                waits = sorted(t[0] for t in timings)
                runs = sorted(t[1] for t in timings)
                queue.update(queue_wait_p50_s=_percentile(waits, 0.5), queue_wait_p99_s=_percentile(waits, 0.99),
                             run_time_p50_s=_percentile(runs, 0.5), run_time_p99_s=_percentile(runs, 0.99))
        config = dict(self._config)
        config["segment"] = self.segment_name
        config["running"] = self._running()
        return {"config": config, "queue": queue, "workers": workers}

    def print_status(self, config: bool = True, queue: bool = True, workers: bool = True) -> None:
        from ._status import format_status

        print(format_status(self.status(), config=config, queue=queue, workers=workers), flush=True)

    def scale(self, n: int) -> None:
        """Grows or shrinks the live worker set to `n`."""
        self._check_open()
        if not _is_int(n) or not 1 <= n <= self._config["scale_limit"]:
            raise ConfigError(f"scale(n) needs an int from 1 to scale_limit={self._config['scale_limit']}, got {n!r}")
        self._config["workers"] = n
        rt = self._runtime
        if rt is not None and rt.supervisor is not None:
            rt.supervisor.scale(n)

    def kill_worker(self, worker_id: int) -> bool:
        """SIGKILLs one worker (administration and testing); the supervisor recovers its
        tasks and starts a replacement. Returns False if no such live worker."""
        self._check_owner()
        rt = self._runtime
        if rt is None or rt.supervisor is None:
            return False
        return rt.supervisor.kill_worker(worker_id)


Mpop = MpopApi
