"""Pickling of arguments, results and errors that the native codec does not encode itself.

Values travel with `pickle`, and with cloudpickle where pickle cannot send them: lambdas,
closures, and what a script defines in ``__main__``. A class (or function) of the owner's
``__main__`` pickles by reference to ``__main__``, which a spawned or fork-served worker
does not have (its ``__main__`` is not the script, and importing the script there would
run it); and a class that reached a worker by value, inside a handler, cannot be found by
reference there either. cloudpickle sends those by value, and gives each such class back
as the very class it came from, so the owner gets its own ``Point`` and its own
``MainError`` back. A lock, a generator or an open socket cannot be sent either way."""

from __future__ import annotations

import pickle
import traceback
from typing import Any

import cloudpickle

__all__ = ["dumps", "dumps_by_value", "pack_error"]


def dumps_by_value(obj: Any, error: BaseException | None = None) -> bytes:
    """`obj` pickled by cloudpickle. If that fails too, raises `error` (plain pickle's own
    error, which names what cannot be sent) when given."""
    try:
        return cloudpickle.dumps(obj, protocol=5)
    except Exception:
        if error is not None:
            raise error from None
        raise


def dumps(obj: Any) -> bytes:
    """`obj` as bytes for another mpop process, as the native codec pickles values."""
    try:
        data = pickle.dumps(obj, protocol=5)
    except Exception as e:
        return dumps_by_value(obj, e)
    return dumps_by_value(obj) if b"__main__" in data else data


def pack_error(exc: BaseException, tb: str | None = None) -> bytes:
    """A handler's exception as bytes: the exception itself when it survives pickling, and
    always the worker's formatted traceback (`tb`, or else the exception's own)."""
    if tb is None:
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        data = dumps((exc, tb))
        pickle.loads(data)
        return data
    except Exception:
        return pickle.dumps((None, tb, type(exc).__qualname__, str(exc)), protocol=5)
