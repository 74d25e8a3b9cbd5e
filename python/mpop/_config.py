"""Config: an app's settings, validated once and frozen.

Every bad value is collected and raised together in one ConfigError that names each
parameter and its accepted range."""

from __future__ import annotations

import dataclasses
import math
import os
import types
from dataclasses import dataclass
from typing import Any

from ._errors import ConfigError
from ._slots import is_slot_class, slot_layout

__all__ = ["Config", "available_cpus", "is_int", "START_METHODS"]

START_METHODS = ("spawn", "fork", "forkserver")


def available_cpus() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def is_int(v: Any) -> bool:
    """An int that is not a bool."""
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class Config:
    """What an app was configured with (see MpopApi for each parameter's meaning)."""

    workers: int
    queue_slots: int
    slot_class: type
    worker_batch_size: int
    display: bool
    auto_terminate: bool
    debug: bool
    debug_delay: float
    handler_module: str | None
    start_method: str
    max_retries: int
    task_timeout: float | None
    max_tasks_per_worker: int | None
    cpu_affinity: tuple[int, ...] | None
    name: str
    max_performance: bool
    pool_bytes: int
    registry_bytes: int
    scale_limit: int
    initializer: Any = None  # Callable | None
    initargs: tuple = ()
    worker_state: bool = False
    worker_exit: Any = None  # Callable | None
    max_worker_memory: int | None = None  # bytes
    persistent: bool = False
    orphan_timeout: float = 60.0

    @property
    def layout(self) -> dict:
        """The slot class's field layout, as the native queue sees it."""
        return slot_layout(self.slot_class)

    def client_settings(self) -> dict:
        """What mpop.attach needs to make a handle on this (persistent) pool: the MpopApi
        arguments that shape the segment and the client's side, the slot class by module
        and qualified name."""
        return {"name": self.name, "workers": self.workers, "queue_slots": self.queue_slots,
                "slot_class": (self.slot_class.__module__, self.slot_class.__qualname__),
                "worker_batch_size": self.worker_batch_size, "handler_module": self.handler_module,
                "max_retries": self.max_retries, "task_timeout": self.task_timeout,
                "max_tasks_per_worker": self.max_tasks_per_worker, "worker_state": self.worker_state,
                "pool_bytes": self.pool_bytes, "registry_bytes": self.registry_bytes,
                "scale_limit": self.scale_limit, "max_worker_memory": self.max_worker_memory,
                "orphan_timeout": self.orphan_timeout}

    def as_dict(self) -> dict:
        """The settings as plain values (the slot class by name), as status() shows them."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["slot_class"] = self.slot_class.__name__
        for hook in ("initializer", "worker_exit"):
            f = d[hook]
            d[hook] = None if f is None else getattr(f, "__qualname__", None) or repr(f)
        d["cpu_affinity"] = list(self.cpu_affinity) if self.cpu_affinity is not None else None
        return d

    @classmethod
    def build(cls, *, workers: int | None, queue_slots: int, slot_class: type, worker_batch_size: int,
              display: bool, auto_terminate: bool, debug: bool, debug_delay: float,
              handler_module: str | types.ModuleType | None, start_method: str, max_retries: int,
              task_timeout: float | None, max_tasks_per_worker: int | None,
              cpu_affinity: bool | list[int], name: str | None, max_performance: bool,
              pool_bytes: int, registry_bytes: int, scale_limit: int | None,
              initializer: Any = None, initargs: Any = (), worker_state: bool = False,
              worker_exit: Any = None, max_worker_memory: int | str | None = None,
              persistent: bool = False, orphan_timeout: float = 60.0) -> Config:
        """Validates every argument; raises ConfigError listing each bad one."""
        problems: list[str] = []
        bad = problems.append
        if workers is None:
            workers = available_cpus()
        elif not is_int(workers) or not 1 <= workers <= 1024:
            bad(f"workers must be an int from 1 to 1024 (or None for the CPUs this process may use), "
                f"got {workers!r}")
        if not is_int(queue_slots) or queue_slots < 2 or queue_slots & (queue_slots - 1):
            bad(f"queue_slots must be a power of 2 and >= 2, got {queue_slots!r}")
        elif queue_slots > 1 << 24:
            bad(f"queue_slots must be at most {1 << 24}, got {queue_slots!r}")
        if not is_slot_class(slot_class):
            bad(f"slot_class must be a ctypes.Structure subclass with tsk_id, fn_id and args, got {slot_class!r}")
        else:
            try:
                slot_layout(slot_class)
            except ValueError as e:
                bad(str(e))
        if not is_int(worker_batch_size) or worker_batch_size < 1:
            bad(f"worker_batch_size must be an int >= 1, got {worker_batch_size!r}")
        for pname, v in (("display", display), ("auto_terminate", auto_terminate), ("debug", debug),
                         ("max_performance", max_performance), ("worker_state", worker_state),
                         ("persistent", persistent)):
            if not isinstance(v, bool):
                bad(f"{pname} must be True or False, got {v!r}")
        if (not isinstance(debug_delay, (int, float)) or isinstance(debug_delay, bool)
                or not math.isfinite(debug_delay) or debug_delay < 0):
            bad(f"debug_delay must be a finite number of seconds >= 0, got {debug_delay!r}")
        if start_method not in START_METHODS:
            bad(f"start_method must be one of {', '.join(map(repr, START_METHODS))}, got {start_method!r}")
        if not is_int(max_retries) or max_retries < 0:
            bad(f"max_retries must be an int >= 0, got {max_retries!r}")
        elif max_retries > 1000:
            bad(f"max_retries must be at most 1000, got {max_retries!r}")
        task_timeout = _check_timeout(task_timeout, bad)
        if max_tasks_per_worker is not None and (not is_int(max_tasks_per_worker) or max_tasks_per_worker < 1):
            bad(f"max_tasks_per_worker must be an int >= 1 or None, got {max_tasks_per_worker!r}")
        cpus = _check_affinity(cpu_affinity, bad)
        if name is not None and (not isinstance(name, str) or not name or len(name) > 64
                                 or not all(c.isalnum() or c in "_-." for c in name)):
            bad(f"name must be 1-64 characters of letters, digits, '_', '-' or '.', got {name!r}")
        if not is_int(pool_bytes) or pool_bytes < 1 << 16:
            bad(f"pool_bytes must be an int >= 65536, got {pool_bytes!r}")
        if not is_int(registry_bytes) or registry_bytes < 1 << 16:
            bad(f"registry_bytes must be an int >= 65536, got {registry_bytes!r}")
        if handler_module is not None and not isinstance(handler_module, (str, types.ModuleType)):
            bad(f"handler_module must be a module name or module, got {handler_module!r}")
        if scale_limit is not None and (not is_int(scale_limit) or scale_limit < 1 or scale_limit > 1024):
            bad(f"scale_limit must be an int from 1 to 1024 or None, got {scale_limit!r}")
        elif scale_limit is not None and is_int(workers) and scale_limit < workers:
            bad(f"scale_limit ({scale_limit}) must be >= workers ({workers})")
        for pname, v in (("initializer", initializer), ("worker_exit", worker_exit)):
            if v is not None and not callable(v):
                bad(f"{pname} must be a callable or None, got {v!r}")
        if not isinstance(initargs, (tuple, list)):
            bad(f"initargs must be a tuple, got {initargs!r}")
        memory = _check_memory(max_worker_memory, bad)
        if persistent is True:
            if name is None:
                bad("persistent=True needs a name= (the pool's address)")
            if start_method != "spawn":
                bad(f"a persistent pool starts its workers with start_method='spawn', got {start_method!r}")
        if (not isinstance(orphan_timeout, (int, float)) or isinstance(orphan_timeout, bool)
                or not math.isfinite(orphan_timeout) or orphan_timeout <= 0):
            bad(f"orphan_timeout must be a number of seconds > 0, got {orphan_timeout!r}")
        if problems:
            raise ConfigError("invalid MpopApi configuration:\n  - " + "\n  - ".join(problems))
        return cls(
            workers=workers, queue_slots=queue_slots, slot_class=slot_class,
            worker_batch_size=worker_batch_size, display=display, auto_terminate=auto_terminate,
            debug=debug, debug_delay=float(debug_delay),
            handler_module=getattr(handler_module, "__name__", handler_module), start_method=start_method,
            max_retries=max_retries, task_timeout=task_timeout, max_tasks_per_worker=max_tasks_per_worker,
            cpu_affinity=cpus, name=name or "mpop", max_performance=max_performance, pool_bytes=pool_bytes,
            registry_bytes=registry_bytes,
            scale_limit=scale_limit or max(workers, 2 * available_cpus(), 8),
            initializer=initializer, initargs=tuple(initargs), worker_state=worker_state,
            worker_exit=worker_exit, max_worker_memory=memory, persistent=persistent,
            orphan_timeout=float(orphan_timeout))


def _check_timeout(task_timeout: Any, bad) -> float | None:
    if task_timeout is None:
        return None
    if (not isinstance(task_timeout, (int, float)) or isinstance(task_timeout, bool)
            or math.isnan(task_timeout) or task_timeout <= 0):
        bad(f"task_timeout must be a number of seconds > 0 (or None / inf for no limit), got {task_timeout!r}")
        return None
    return None if math.isinf(task_timeout) else task_timeout


def _check_affinity(cpu_affinity: Any, bad) -> tuple[int, ...] | None:
    if cpu_affinity is True:
        return tuple(sorted(os.sched_getaffinity(0)))
    if isinstance(cpu_affinity, (list, tuple)):
        allowed = os.sched_getaffinity(0)
        if not cpu_affinity or not all(is_int(c) and c in allowed for c in cpu_affinity):
            bad(f"cpu_affinity must be True/False or a non-empty list of CPU ids from {sorted(allowed)}, "
                f"got {cpu_affinity!r}")
            return None
        return tuple(cpu_affinity)
    if cpu_affinity is not False:
        bad(f"cpu_affinity must be True, False or a list of CPU ids, got {cpu_affinity!r}")
    return None


_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(v: Any) -> int | None:
    """An int of bytes, or a string such as "512MB" (decimal units: 1 MB = 10**6 bytes) or
    "2GiB" (binary units); None when it is neither."""
    if is_int(v):
        return v
    if not isinstance(v, str):
        return None
    text = v.strip().lower().replace(" ", "").replace("_", "")
    number = text.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = text[len(number):] or "b"
    try:
        value = float(number)
    except ValueError:
        return None
    if unit not in _UNITS or not math.isfinite(value):
        return None
    return int(value * _UNITS[unit])


def _check_memory(v: Any, bad) -> int | None:
    if v is None:
        return None
    n = parse_bytes(v)
    if n is None or n < 1 << 20:
        bad(f"max_worker_memory must be a number of bytes of at least 1 MiB, as an int or a string "
            f"such as '512MB' or '2GiB' (or None), got {v!r}")
        return None
    return n

