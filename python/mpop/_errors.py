"""The exceptions mpop raises (all derive from MpopError)."""

from __future__ import annotations

__all__ = [
    "MpopError",
    "ConfigError",
    "RegistryError",
    "QueueFull",
    "WorkerCrashedError",
    "TaskTimeoutError",
    "ShutdownError",
    "WorkerInitError",
    "RemoteTraceback",
]


class MpopError(Exception):
    """Base class of every mpop error."""


class ConfigError(MpopError, ValueError):
    """A constructor argument or configuration is invalid."""


class RegistryError(MpopError, KeyError):
    """An fn_id or handler name is unknown, reserved or already taken."""

    def __str__(self) -> str:  # KeyError quotes its argument; we want the plain message
        return str(self.args[0]) if self.args else ""


class QueueFull(MpopError):
    """The task ring stayed full past the enqueue timeout."""


class WorkerCrashedError(MpopError):
    """The worker running the task died, and the task used up its retries."""


class TaskTimeoutError(MpopError, TimeoutError):
    """The task ran longer than task_timeout; its worker was killed."""


class ShutdownError(MpopError, RuntimeError):
    """The app was shut down."""


class WorkerInitError(MpopError):
    """A worker's initializer raised; the worker's formatted traceback is its __cause__."""


class RemoteTraceback(Exception):
    """Carries a worker's formatted traceback as the ``__cause__`` of a handler's error."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb
