"""A worker's life as the app configures it: `initializer` before its first task, the
`worker_state` dict its handlers share, and `worker_exit` when it retires.

The owner packs the hooks once (pack, at MpopApi construction, so that one that cannot be
sent fails there); a worker runs them (WorkerLife). An initializer that raises ends the
worker before it takes work, with its traceback in the worker's record; the supervisor
then reports the worker as failed to start instead of respawning it, and the owner raises
WorkerInitError (startup_error)."""

from __future__ import annotations

import pickle
import traceback
from typing import Any

from ._builtins import set_worker_state, with_state
from ._core import WORKER_EXIT
from ._config import Config
from ._errors import ConfigError, MpopError, RemoteTraceback, WorkerInitError

__all__ = ["pack", "WorkerLife", "startup_error", "clip", "INIT_FAILED", "RETIRING"]

INIT_FAILED = "mpop: the initializer raised"  # first line of such a worker's start error

# How a worker loop ends when the worker retires (worker_exit runs): stopped by shutdown()
# or the end of an auto-terminated run(), by scale() down, or recycled.
RETIRING = frozenset(WORKER_EXIT[k] for k in ("SHUTDOWN", "STOP_REQUESTED", "RECYCLED"))


def pack(config: Config) -> bytes | None:
    """The app's hooks as bytes for its workers (None: it has none). Raises ConfigError
    for a hook (or initargs) that cannot be sent to the workers."""
    if config.initializer is None and config.worker_exit is None and not config.worker_state:
        return None
    from ._pickling import dumps

    hooks = {"initializer": config.initializer, "initargs": config.initargs,
             "worker_exit": config.worker_exit, "worker_state": config.worker_state}
    try:
        return dumps(hooks)
    except Exception as e:
        raise ConfigError(f"initializer, initargs or worker_exit cannot be sent to the workers: {e!r}") from e


class WorkerLife:
    """The hooks in a worker."""

    NO_EXIT = object()  # what end() returns without a worker_exit: nothing to send

    def __init__(self, blob: bytes | None) -> None:
        self.hooks: dict = {}
        self.blob = blob
        self.state: dict | None = None

    def begin(self) -> str | None:
        """Before the first task: the state, then the initializer. Returns the start error
        to record when the initializer raised (or the hooks could not be loaded)."""
        try:
            if self.blob is not None:
                import cloudpickle  # noqa: F401  (reducers the hooks may need)

                self.hooks = pickle.loads(self.blob)
            if self.hooks.get("worker_state"):
                self.state = {}
                set_worker_state(self.state)
            init = self.hooks.get("initializer")
            if init is not None:
                with_state(init)(*self.hooks.get("initargs", ()))
        except BaseException as e:
            # From the hook's own frames on (not this one), and its end when it is long; in
            # bytes, so that the worker record's 4 KiB hold it whole.
            tb = "".join(traceback.format_exception(type(e), e, e.__traceback__.tb_next))
            summary = traceback.format_exception_only(type(e), e)[-1].strip()
            return f"{INIT_FAILED}\n{clip(summary, 300, tail=False)}\n{clip(tb, 3000)}"
        return None

    def end(self) -> Any:
        """When the worker retires: (True, what worker_exit returned) or (False, the
        exception it raised); NO_EXIT without a worker_exit."""
        fn = self.hooks.get("worker_exit")
        if fn is None:
            return self.NO_EXIT
        try:
            return True, (fn(self.state) if self.hooks.get("worker_state") else fn())
        except BaseException as e:  # SystemExit too: the worker still leaves in order
            return False, e


def clip(text: str, limit: int, tail: bool = True) -> str:
    """`text` cut to at most `limit` bytes of UTF-8 (its end, or its start), whole
    characters only."""
    data = text.encode("utf-8", "backslashreplace")
    if len(data) <= limit:
        return text
    return (data[-limit:] if tail else data[:limit]).decode("utf-8", "ignore")


def startup_error(err: str) -> MpopError:
    """The error the owner raises for the supervisor's `err` (see the module's docstring):
    WorkerInitError, with the worker's traceback as its __cause__, for an initializer that
    raised; else MpopError."""
    head, sep, why = err.partition(":\n")
    if not sep or not why.startswith(INIT_FAILED + "\n"):
        return MpopError(err)
    _, summary, tb = why.split("\n", 2)
    worker = head.removeprefix("mpop: ").removesuffix(" failed to start")
    exc = WorkerInitError(f"the initializer failed in {worker}: {summary}")
    exc.__cause__ = RemoteTraceback(tb)
    return exc
