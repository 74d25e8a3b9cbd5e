"""Handlers registered on every app under the reserved ProcTaskFnID ids."""

from __future__ import annotations

import enum

__all__ = ["ProcTaskFnID", "BUILTIN_HANDLERS"]


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


def terminate() -> None:
    """Internal: kept reserved so that no user handler can take the id."""
    return None


BUILTIN_HANDLERS = {
    ProcTaskFnID.TERMINATE: terminate,
    ProcTaskFnID.INCREMENT: increment,
    ProcTaskFnID.ADD: add,
    ProcTaskFnID.MULTIPLY: multiply,
}
RESERVED_MAX = 0x0FFF  # ids below 0x1000 belong to the runtime
MAP_CHUNK_ID = 0x0FF0  # internal: runs a chunk of a map() (mpop._worker.run_chunk)
# internal: calls a function that travels with its task (mpop._worker.call_by_value)
CALL_BY_VALUE_ID = 0x0FF1
