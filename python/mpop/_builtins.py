"""The built-in handlers every app registers under reserved fn_ids: the public ones
(ProcTaskFnID) and the runtime's own, which workers run: a map() chunk (run_chunk) and a
call of a function sent with its task (call_by_value). Also the other reserved ids."""

from __future__ import annotations

import enum
import functools
import inspect
import itertools
import pickle
import time
from typing import Any, Callable

from ._pickling import pack_error

__all__ = ["ProcTaskFnID", "BUILTIN_HANDLERS", "RESERVED_MAX", "MAP_CHUNK_ID", "CALL_BY_VALUE_ID",
           "BOOT_FN_ID", "STATE_PARAM", "run_chunk", "call_by_value", "fix_chunk", "set_resolver",
           "set_worker_state", "with_state"]


class ProcTaskFnID(enum.IntEnum):
    """Reserved fn_ids of the built-in handlers."""

    TERMINATE = 0x0001
    INCREMENT = 0x0002
    ADD = 0x0003
    MULTIPLY = 0x0004


def increment(x: int, step: int = 1) -> int:
    return x + step


def add(a, b):
    return a + b


def multiply(a, b):
    return a * b


BUILTIN_HANDLERS = {
    ProcTaskFnID.INCREMENT: increment,
    ProcTaskFnID.ADD: add,
    ProcTaskFnID.MULTIPLY: multiply,
}
RESERVED_MAX = 0x0FFF  # ids below 0x1000 belong to the runtime (TERMINATE is only reserved)
MAP_CHUNK_ID = 0x0FF0  # internal: runs a chunk of a map() (run_chunk)
CALL_BY_VALUE_ID = 0x0FF1  # internal: calls a function that travels with its task (call_by_value)
BOOT_FN_ID = 0xFFFFFFFF  # the registry log's record of how a worker sets itself up


# -- the runtime's own handlers, run in workers -----------------------------------------------

# How run_chunk finds a handler by fn_id: the worker's registry reader (set at its start).
_resolve: Callable[[int], Any] | None = None


def set_resolver(resolve: Callable[[int], Any]) -> None:
    """Called by the worker at its start: `resolve(fn_id)` -> (handler, slot class or None)."""
    global _resolve
    _resolve = resolve


STATE_PARAM = "worker_state"  # the parameter a worker fills in itself (worker_state=True)

# The worker's own state (the app has worker_state=True), or None.
_state: dict | None = None


def set_worker_state(state: dict | None) -> None:
    """Called by the worker at its start when the app has worker_state=True."""
    global _state
    _state = state


def with_state(fn: Callable) -> Callable:
    """`fn` as the worker calls it: with the worker's state bound to its ``worker_state``
    parameter when the app has worker_state=True and `fn` declares one; else `fn` itself,
    at no cost per call."""
    if _state is None:
        return fn
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return fn
    return functools.partial(fn, worker_state=_state) if STATE_PARAM in params else fn

# Functions that travel with their tasks (see call_by_value), by their pickled form: the
# same lambda or closure sent again is unpickled once. Bounded in entries and bytes.
_BY_VALUE: dict[bytes, object] = {}
_BY_VALUE_MAX = 256
_BY_VALUE_MAX_BYTES = 32 << 20
_by_value_bytes = 0


def load_by_value(blob: bytes):
    """The function pickled in `blob` (cloudpickle), from this worker's cache."""
    global _by_value_bytes
    fn = _BY_VALUE.get(blob)
    if fn is None:
        import cloudpickle  # noqa: F401  (reducers its payload needs)

        fn = with_state(pickle.loads(blob))
        while _BY_VALUE and (len(_BY_VALUE) >= _BY_VALUE_MAX
                             or _by_value_bytes + len(blob) > _BY_VALUE_MAX_BYTES):
            oldest = next(iter(_BY_VALUE))  # first in, first out
            del _BY_VALUE[oldest]
            _by_value_bytes -= len(oldest)
        _BY_VALUE[blob] = fn
        _by_value_bytes += len(blob)
    return fn


def call_by_value(blob: bytes, /, *args, **kwargs):
    """Calls a function that is not registered: one the owner sends with each task (a
    lambda, a closure, a partial, a bound method), so that such functions never pile up in
    the app's handler registry."""
    return load_by_value(blob)(*args, **kwargs)


def _chunk_callable(fn_id: int, call: tuple | None):
    """What a map() chunk calls on each item: the handler under `fn_id` (or the function
    sent by value), with the arguments and keywords `call` binds first (a partial's)."""
    if fn_id == CALL_BY_VALUE_ID:
        args, kwargs = call
        fn, slot_class, args = load_by_value(args[0]), None, args[1:]
    else:
        entry = _resolve(fn_id) if _resolve is not None else None
        if entry is None:
            from ._errors import RegistryError

            raise RegistryError(f"no handler is registered under fn_id {fn_id:#x} in worker")
        fn, slot_class = entry
        args, kwargs = call or ((), None)
    if args or kwargs:
        fn = functools.partial(fn, *args, **(kwargs or {}))
    return fn, slot_class


def run_chunk(fn_id: int, call: tuple | None, star: bool, items: list | None, *spread) -> tuple:
    """A chunk of a map(): calls the handler registered under `fn_id` on each item, after
    the arguments `call` binds first (None, or (args, kwargs): a partial's, and for a
    function sent by value its pickle).

    The items come as one list, or (items None) as separate arguments, so that each array
    among them travels natively (zero-copy) rather than inside the list's pickle.

    Returns (values, elapsed_ns, error): the values computed before the first failure, the
    time spent (the owner sizes later chunks from it), and the packed failure or None.
    TaskResults among the values are unwrapped by fix_chunk, on the way out."""
    fn, slot_class = _chunk_callable(fn_id, call)
    if items is None:
        items = spread

    out: list = []
    append = out.append
    t0 = time.perf_counter_ns()
    try:
        if slot_class is not None:  # slot mode: each item's ints go to slot.args
            for x in items:
                slot = slot_class()
                slot.fn_id = fn_id
                for i, v in enumerate(x if star else (x,)):
                    slot.args[i] = v
                append(unwrap_result(fn(slot)))
        else:
            # The loop runs in C; extend() keeps what was appended before a failure.
            out.extend(itertools.starmap(fn, items) if star else map(fn, items))
    except Exception as e:
        return out, time.perf_counter_ns() - t0, pack_error(e)
    return out, time.perf_counter_ns() - t0, None


def fix_chunk(result: tuple) -> tuple:
    """A map() chunk's result, with each TaskResult a handler returned replaced by its
    value; a failed one ends the chunk's values there, as if the handler had raised its
    error. The worker loop calls this only for a chunk it cannot encode natively, which is
    the only kind that can hold a TaskResult, so plain chunks never pay for the search."""
    from ._results import TaskResult

    values, elapsed, error = result
    if TaskResult not in map(type, values):
        return result
    out = []
    for r in values:
        try:
            out.append(unwrap_result(r))
        except Exception as e:
            return out, elapsed, pack_error(e)
    return out, elapsed, error


def unwrap_result(r):
    """A handler's return value, unwrapping a TaskResult (raising its error): for map()
    chunks here, and for single tasks by the native worker loop."""
    from ._results import TaskResult

    if not isinstance(r, TaskResult):
        return r
    if not r.success:
        from ._errors import MpopError

        raise r.error if r.error is not None else MpopError(
            f"handler returned TaskResult(success=False) with value {r.value!r}")
    return r.value
