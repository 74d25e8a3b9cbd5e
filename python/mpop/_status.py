"""Status views: the text tables of print_status(), the HTML tables a notebook shows for an
app and its status(), and the live view run() shows when display=True (redrawn in place
on a terminal, updated in place in a notebook)."""

from __future__ import annotations

import html
import sys
import time
from typing import Any

__all__ = ["format_status", "format_status_html", "Status", "LiveView"]

CONFIG_KEYS = ["workers", "queue_slots", "slot_class", "worker_batch_size", "start_method",
               "max_retries", "task_timeout", "max_tasks_per_worker", "debug", "max_performance",
               "segment", "running"]
QUEUE_KEYS = ["capacity", "queued", "backlog", "submitted", "finished", "in_flight",
              "results_pending", "pool_used_bytes", "crashes", "retries", "timeouts",
              "queue_wait_p50_s", "queue_wait_p99_s", "run_time_p50_s", "run_time_p99_s"]
WORKER_HEADER = ["id", "pid", "state", "completed", "failed", "restarts", "busy_s", "idle_s", "running"]


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


def _worker_rows(status: dict) -> list[list[str]]:
    rows = []
    for w in status["workers"]:
        running = "-"
        if w.get("running_tsk_id") is not None:
            running = f"task {w['running_tsk_id']} ({_fmt(w.get('running_for_s'))}s)"
        rows.append([_fmt(w["id"]), _fmt(w["pid"]), w["state"], _fmt(w["completed"]),
                     _fmt(w["failed"]), _fmt(w["restarts"]), f"{w['busy_s']:.3f}",
                     f"{w['idle_s']:.3f}", running])
    return rows


def _pairs(status: dict, config: bool, queue: bool) -> list[tuple[str, list[tuple[str, str]]]]:
    """The key/value sections: (title, [(key, shown value)])."""
    out = []
    if config:
        c = status["config"]
        out.append(("mpop config", [(k, _fmt(c.get(k))) for k in CONFIG_KEYS]))
    if queue:
        q = status["queue"]
        out.append(("mpop queue", [(k, _fmt(q.get(k))) for k in QUEUE_KEYS if k in q]))
    return out


def format_status(status: dict, config: bool = True, queue: bool = True, workers: bool = True) -> str:
    """status() as text tables (print_status)."""
    parts = [title + "\n" + "\n".join(f"  {k:<22}{v}" for k, v in pairs)
             for title, pairs in _pairs(status, config, queue)]
    if workers:
        rows = _worker_rows(status)
        parts.append("mpop workers\n" + (_table(rows, WORKER_HEADER) if rows else "  (none started)"))
    return "\n\n".join(parts)


def _html_table(title: str, header: list[str] | None, rows: list[list[str]]) -> str:
    e = html.escape
    head = "<tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><caption style='text-align:left'><b>{e(title)}</b></caption>{head}{body}</table>"


def format_status_html(status: dict, config: bool = True, queue: bool = True, workers: bool = True) -> str:
    """status() as HTML tables (a notebook's view of an app, its status and its live view)."""
    parts = [_html_table(title, None, [[k, v] for k, v in pairs]) for title, pairs in _pairs(status, config, queue)]
    if workers:
        rows = _worker_rows(status) or [["(none started)"] + [""] * (len(WORKER_HEADER) - 1)]
        parts.append(_html_table("mpop workers", WORKER_HEADER, rows))
    return "<div class='mpop-status'>" + "".join(parts) + "</div>"


class Status(dict):
    """What MpopApi.status() returns: a plain dict of the snapshot, which a notebook shows
    as HTML tables."""

    def _repr_html_(self) -> str:
        """The snapshot as HTML tables: settings, queue counts, one row per worker."""
        return format_status_html(self)


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
        status = self.app.status()
        text = format_status(status, config=False)
        if self.handle is not None:
            self.handle.update({"text/plain": text, "text/html": format_status_html(status, config=False)}, raw=True)
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
