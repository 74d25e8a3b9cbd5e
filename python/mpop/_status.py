"""Status views: the text tables of print_status() and the live view run() shows when
display=True (redrawn in place on a terminal, updated in place in a notebook)."""

from __future__ import annotations

import sys
import time
from typing import Any

__all__ = ["format_status", "LiveView"]


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) if rows else len(header[i])
              for i in range(len(header))]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(out)


def format_status(status: dict, config: bool = True, queue: bool = True, workers: bool = True) -> str:
    parts = []
    if config:
        c = status["config"]
        keys = ["workers", "queue_slots", "slot_class", "worker_batch_size", "start_method",
                "max_retries", "task_timeout", "max_tasks_per_worker", "debug", "max_performance",
                "segment", "running"]
        parts.append("mpop config\n" + "\n".join(f"  {k:<22}{_fmt(c.get(k))}" for k in keys))
    if queue:
        q = status["queue"]
        keys = ["capacity", "queued", "backlog", "submitted", "finished", "in_flight",
                "results_pending", "pool_used_bytes", "crashes", "retries", "timeouts",
                "queue_wait_p50_s", "queue_wait_p99_s", "run_time_p50_s", "run_time_p99_s"]
        parts.append("mpop queue\n" + "\n".join(f"  {k:<22}{_fmt(q.get(k))}" for k in keys if k in q))
    if workers:
        ws = status["workers"]
        header = ["id", "pid", "state", "completed", "failed", "restarts", "busy_s", "idle_s", "running"]
        rows = []
        for w in ws:
            running = "-"
            if w.get("running_tsk_id") is not None:
                running = f"task {w['running_tsk_id']} ({_fmt(w.get('running_for_s'))}s)"
            rows.append([_fmt(w["id"]), _fmt(w["pid"]), w["state"], _fmt(w["completed"]),
                         _fmt(w["failed"]), _fmt(w["restarts"]), f"{w['busy_s']:.3f}",
                         f"{w['idle_s']:.3f}", running])
        parts.append("mpop workers\n" + (_table(rows, header) if rows else "  (none started)"))
    return "\n\n".join(parts)


def _in_notebook() -> bool:
    try:
        from IPython import get_ipython  # type: ignore

        shell = get_ipython()
        return shell is not None and shell.__class__.__name__ == "ZMQInteractiveShell"
    except Exception:
        return False


class LiveView:
    """Redraws the status of an app at most every `interval` seconds."""

    def __init__(self, app: Any, interval: float = 0.5, stream=None) -> None:
        self.app = app
        self.interval = interval
        self.stream = stream or sys.stdout
        self.last = 0.0
        self.lines = 0
        self.handle = None
        if _in_notebook():
            from IPython.display import display  # type: ignore

            self.handle = display({"text/plain": "mpop starting"}, raw=True, display_id=True)

    def update(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < self.interval:
            return
        self.last = now
        text = format_status(self.app.status(), config=False)
        if self.handle is not None:
            self.handle.update({"text/plain": text}, raw=True)
        elif self.stream.isatty():
            if self.lines:
                self.stream.write(f"\x1b[{self.lines}F\x1b[J")
            self.stream.write(text + "\n")
            self.lines = text.count("\n") + 1
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        self.update(force=True)
