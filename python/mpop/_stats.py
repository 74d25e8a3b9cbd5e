"""Stats: what run() reports about its tasks, and the timings status() summarises."""

from __future__ import annotations

import collections
import math
import operator
from typing import Iterable

from ._results import TaskResult

__all__ = ["run_stats", "timing_percentiles", "percentile"]

_SUCCESS, _ATTEMPTS, _WORKER_ID, _RUN_TIME, _QUEUE_WAIT = map(operator.attrgetter, (
    "success", "attempts", "worker_id", "run_time_s", "queue_wait_s"))


def percentile(sorted_values: list[float], q: float) -> float | None:
    """The `q` quantile (0..1) of sorted values, interpolated; None for no values."""
    if not sorted_values:
        return None
    k = (len(sorted_values) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


def timing_percentiles(waits: Iterable[float], runs: Iterable[float]) -> dict:
    """queue_wait_p50_s, queue_wait_p99_s, run_time_p50_s and run_time_p99_s."""
    waits, runs = sorted(waits), sorted(runs)
    return {"queue_wait_p50_s": percentile(waits, 0.5), "queue_wait_p99_s": percentile(waits, 0.99),
            "run_time_p50_s": percentile(runs, 0.5), "run_time_p99_s": percentile(runs, 0.99)}


def run_stats(results: list[TaskResult], elapsed: float, counters: dict) -> dict:
    """RunResult.stats for `results` (the supervisor's `counters` give the crashes)."""
    # Iterations in C (map, attrgetter, Counter): run() returns after this, per task.
    attempts = list(map(_ATTEMPTS, results))
    stats = {
        "tasks": len(results),
        "failed": list(map(_SUCCESS, results)).count(False),
        "elapsed_s": elapsed,
        "tasks_per_s": len(results) / elapsed if elapsed > 0 else 0.0,
        "per_worker": dict(collections.Counter(map(_WORKER_ID, results))),
        "retries": sum(attempts) - len(attempts) + attempts.count(0),  # sum of max(0, a - 1)
        "crashes": counters.get("crashes", 0),
    }
    # Percentiles of this run's own tasks (each result carries its timings).
    runs = list(map(_RUN_TIME, results))
    if runs.count(None) < len(runs):
        stats.update(timing_percentiles((w for w in map(_QUEUE_WAIT, results) if w is not None),
                                        (r for r in runs if r is not None)))
    return stats
