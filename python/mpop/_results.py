"""TaskResult (one task's outcome) and RunResult (what run() returns)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ._core import LazyTracked

__all__ = ["TaskResult", "RunResult"]


def _with_slots(cls: type) -> type:
    """A dataclass rebuilt with one slot per field and a ``__weakref__`` slot, as
    ``dataclass(slots=True, weakref_slot=True)`` makes it from Python 3.11 (those flags do
    not exist on 3.9). The native collector writes results straight into these slots."""
    names = tuple(f.name for f in dataclasses.fields(cls))
    namespace = {k: v for k, v in cls.__dict__.items() if k not in names and k not in ("__dict__", "__weakref__")}
    namespace["__slots__"] = (*names, "__weakref__")
    slotted = type(cls)(cls.__name__, cls.__bases__, namespace)
    slotted.__qualname__ = cls.__qualname__
    return slotted


@_with_slots
@dataclass
class TaskResult(LazyTracked):
    """The outcome of one task.

    Fields:

    - success: True when the handler returned normally.
    - value: the handler's return value (None on failure).
    - error: the task's exception (the handler's own, WorkerCrashedError,
      TaskTimeoutError, MpopError, concurrent.futures.CancelledError), or None.
    - tsk_id: the task's label (enqueue()'s `tsk_id`, or the app's counter).
    - seq: the task's unique number, assigned when it was queued.
    - fn_id: the handler's fn_id (0x0FF1, the built-in that calls it, for a function sent
      with its task: a lambda, a closure, a bound method).
    - worker_id: the worker that ran it (for a crash or a timeout, the worker that died;
      for a cancelled task, the worker that held it, or 0).
    - attempts: runs charged to the task (1 normally, more after crashes; 0 when it was
      cancelled before a worker claimed it).
    - queue_wait_s: seconds from enqueue to start (None with max_performance, or when it
      never started).
    - run_time_s: seconds the handler ran (None with max_performance, or when it never
      started).

    Handlers may return one: ``TaskResult(success=True, value=v)`` delivers v,
    ``TaskResult(success=False, error=e)`` delivers e, and the other fields are ignored;
    the runtime fills in the identifying fields of the ones it delivers. A slots class:
    the owner makes one per enqueue()d task, natively (see Collector.settle), so it stays
    small and cheap to build, and one holding only atomic values is not tracked by the
    garbage collector until a field is set (LazyTracked)."""

    success: bool = True
    value: Any = None
    error: BaseException | None = None
    tsk_id: int | None = None
    seq: int | None = None
    fn_id: int | None = None
    worker_id: int | None = None
    attempts: int = 0
    queue_wait_s: float | None = None
    run_time_s: float | None = None

    def get(self) -> Any:
        """The value, or raise the task's error."""
        if self.error is not None:
            raise self.error
        if not self.success:
            from ._errors import MpopError

            raise MpopError(f"task {self.tsk_id} failed with value {self.value!r}")
        return self.value


@dataclass
class RunResult:
    """What ``run()`` returns: every result of the run, in enqueue order, and its stats.

    - results: the TaskResult of every task the run collected, in enqueue order.
    - stats: a dict with tasks, failed, elapsed_s, tasks_per_s, per_worker (worker id ->
      tasks), retries, crashes and, when the tasks were timed (not with max_performance),
      queue_wait_p50_s, queue_wait_p99_s, run_time_p50_s and run_time_p99_s.
    - interrupted: True when Ctrl-C (KeyboardInterrupt) ended the run: the tasks no
      worker had started were cancelled (their results carry CancelledError), the
      workers were stopped, and `results` holds what came back; exit_code is then 1."""

    results: list[TaskResult] = field(default_factory=list)
    stats: dict = field(default_factory=dict)
    interrupted: bool = False

    def values(self) -> list[Any]:
        """Values in enqueue order; raises the first failure."""
        return [r.get() for r in self.results]

    @property
    def by_tsk_id(self) -> dict[int, TaskResult]:
        """The results by label (tsk_id); of several with one label, the last."""
        return {r.tsk_id: r for r in self.results}

    @property
    def failures(self) -> list[TaskResult]:
        """The results that failed, in enqueue order."""
        return [r for r in self.results if not r.success]

    @property
    def exit_code(self) -> int:
        """0 when the run was not interrupted and every task succeeded, else 1."""
        return 0 if not self.interrupted and all(r.success for r in self.results) else 1

    def __len__(self) -> int:
        return len(self.results)

    def __repr__(self) -> str:
        return (f"RunResult(tasks={len(self.results)}, failures={len(self.failures)}, "
                f"elapsed_s={self.stats.get('elapsed_s', 0):.3f})")
