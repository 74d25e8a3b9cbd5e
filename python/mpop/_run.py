"""run(): start the workers, feed them, call the caller's enqueue callback between polls,
and collect every enqueue()d task's result; Ctrl-C stops cleanly and returns what finished."""

from __future__ import annotations

import operator
import time
from typing import Any, Callable, Iterator

from ._results import RunResult, TaskResult
from ._runtime import Lifecycle, Runtime
from ._stats import run_stats

__all__ = ["RunLoop", "progress_bar", "wait_all", "results_as_they_come"]

_SEQ = operator.attrgetter("seq")


def progress_bar(progress: bool, total: int | None):
    """A tqdm bar (notebook-aware) when `progress`, else None."""
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="task", desc="mpop")


def _started(lifecycle: Lifecycle) -> Runtime | None:
    """The runtime, its workers started if tasks wait for them; None before first use."""
    lifecycle.check_owner()
    rt = lifecycle.runtime
    if rt is not None and rt.producer.submitted != rt.router.finished and not rt.running:
        rt = lifecycle.start()
    return rt


def wait_all(lifecycle: Lifecycle, timeout: float | None) -> bool:
    """MpopApi.wait: until every task enqueued so far has a result; False on timeout."""
    rt = _started(lifecycle)
    if rt is None:
        return True
    target, count = rt.producer.last_seq, rt.producer.submitted
    r = rt.router
    deadline = None if timeout is None else time.monotonic() + timeout
    return r.help_until(lambda: r.complete_below > target, deadline, rt.check_workers,
                        want=lambda: count - r.finished)


def results_as_they_come(lifecycle: Lifecycle, timeout: float | None) -> Iterator[TaskResult]:
    """MpopApi.results: each enqueue()d task's TaskResult as it finishes."""
    rt = _started(lifecycle)
    if rt is None:
        return
    r = rt.router
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        while r.plain:
            yield r.plain.popleft()
        # A persistent pool's client keeps its results in shared memory until they are
        # handed out: one at a time from there.
        if r.pull_plain(1):
            continue
        target = rt.producer.last_seq
        if r.complete_below > target and not r.plain and not r.plain_pending() and rt.adopted_settled():
            return
        # (the results of adopted clients, still to come, are waited for too)
        if not r.help_until(lambda: bool(r.plain) or r.plain_pending() or
                            (r.complete_below > target and rt.adopted_settled()), deadline, rt.check_workers):
            raise TimeoutError("results() timed out")


class RunLoop:
    """One run() call (see MpopApi.run)."""

    def __init__(self, lifecycle: Lifecycle, enqueue_callback: Callable[[], Any] | None,
                 progress: bool, timeout: float | None, view_of: Callable[[], Any] | None) -> None:
        """`view_of()`: a live status view to update while waiting, or None."""
        self.lifecycle = lifecycle
        self.callback = enqueue_callback
        self.active = enqueue_callback is not None  # the callback is still called
        self.timeout = timeout
        self.started = time.monotonic()
        self.deadline = None if timeout is None else self.started + timeout
        self.bar = progress_bar(progress, None)
        self.view = view_of() if view_of is not None else None

    def run(self, auto_terminate: bool) -> RunResult:
        rt = self.lifecycle.start()
        first_finished = rt.router.finished
        interrupted = False
        try:
            while not self._step(rt, first_finished):
                pass
        except KeyboardInterrupt:
            interrupted = True
            self._interrupt(rt)
        finally:
            if self.bar is not None:
                self.bar.close()
            if self.view is not None:
                self.view.close()
        results = rt.router.take_plain()
        results.sort(key=_SEQ)
        stats = run_stats(results, time.monotonic() - self.started, rt.counters())
        if auto_terminate and not interrupted:
            self.lifecycle.stop_workers(graceful=True)
        return RunResult(results=results, stats=stats, interrupted=interrupted)

    def _step(self, rt: Runtime, first_finished: int) -> bool:
        """One turn: the callback, the display, then a poll for results. True when done."""
        r = rt.router
        added = self._call_back(rt) if self.active else 0
        rt.check_workers()
        if self.bar is not None:
            self.bar.total = rt.producer.submitted - first_finished
            self.bar.n = r.finished - first_finished
            self.bar.refresh()
        if self.view is not None:
            self.view.update()
        target, count = rt.producer.last_seq, rt.producer.submitted
        if not self.active and r.complete_below > target:
            return True
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise TimeoutError(f"run() timed out after {self.timeout}s with "
                               f"{count - r.finished} task(s) unfinished")
        # Between callback calls, poll for results: briefly while the callback keeps adding
        # work, up to 10 ms when it added none (no busy spinning).
        wait = (0.0 if added else 0.01) if self.active else 0.1
        r.help_until(lambda: r.complete_below > target, time.monotonic() + wait, None,
                     want=lambda: count - r.finished)
        return False

    def _call_back(self, rt: Runtime) -> int:
        """Calls the enqueue callback once; returns how many tasks it added."""
        before = rt.producer.submitted
        try:
            if self.callback() is False:
                self.active = False
        except StopIteration:
            self.active = False
        return rt.producer.submitted - before

    def _interrupt(self, rt: Runtime) -> None:
        """Ctrl-C: cancel what has not started, kill the workers, collect the cancellations."""
        rt.cancel_pending()
        self.lifecycle.stop_workers(graceful=False)
        end = rt.producer.last_seq
        r = rt.router
        r.help_until(lambda: r.complete_below > end, time.monotonic() + 5.0, None)
