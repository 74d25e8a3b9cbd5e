"""mpop: fast, crash-safe multiprocessing for Python over a shared-memory task ring.

    import mpop
    with mpop.MpopApi(workers=4) as app:
        print(list(app.map(pow, range(10), range(10))))
"""

from __future__ import annotations

try:
    from . import _core  # noqa: F401
except ImportError as e:  # pragma: no cover - only without a build
    raise ImportError(
        "mpop's native module mpop._core is not built or does not match this Python "
        f"({e}). Install mpop with `pip install .` from a source checkout (it needs a C++20 "
        "compiler; Boost comes from the cmeel-boost wheel), or run `make test` in the repository."
    ) from e

from ._api import Mpop, MpopApi
from ._builtins import ProcTaskFnID
from ._errors import (
    ConfigError,
    MpopError,
    QueueFull,
    RegistryError,
    ShutdownError,
    TaskTimeoutError,
    WorkerCrashedError,
    WorkerInitError,
)
from ._executor import Executor
from ._persistent import attach
from ._results import RunResult, TaskResult
from ._slots import Slot, TaskSlot128, TaskSlot128_cargs, TaskSlot196, TaskSlot196_cargs

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "MpopApi",
    "Mpop",
    "Executor",
    "attach",
    "TaskResult",
    "RunResult",
    "ProcTaskFnID",
    "Slot",
    "TaskSlot128",
    "TaskSlot128_cargs",
    "TaskSlot196",
    "TaskSlot196_cargs",
    "MpopError",
    "ConfigError",
    "RegistryError",
    "QueueFull",
    "WorkerCrashedError",
    "TaskTimeoutError",
    "ShutdownError",
    "WorkerInitError",
]
