"""What a worker prints and logs, on its way to the owner.

In a worker, sys.stdout and sys.stderr become WorkerStreams and the root logger's only
handler a LogShipper. What they are given waits in the worker's Outbox and goes out through
the native SideChannel (side_channel.hpp) as side messages in the result ring: when 8 KB
are waiting, when a line (or log record) ends 0.1 s or more after the first write still
waiting, on
flush(), after each task and before the worker sleeps. So a hot loop of print() costs no
system call per line, and a line flushed before the worker is killed has already left.
Only the worker's main thread sends (it alone publishes into the ring between tasks);
what other threads write waits for its next send.

In the owner, OwnerSide hands each message on: text to the owner's current sys.stdout or
sys.stderr (a notebook cell's, under Jupyter), a log record to the owner's logger of the
same name, with `record.worker_id` set, and a worker_exit value to the app's exit
results."""

from __future__ import annotations

import io
import logging
import os
import pickle
import sys
import threading
import time
from typing import Any

from ._core import ROUTE_EXIT, ROUTE_LOG, ROUTE_STDERR, ROUTE_STDOUT

__all__ = ["Outbox", "WorkerStream", "LogShipper", "install", "log_levels", "OwnerSide", "pack_exit"]


class Outbox:
    """A worker's messages waiting to be sent (see the module's docstring)."""

    SEND_BYTES = 8192  # waiting text that is sent at once
    SEND_DELAY_S = 0.1  # a write this long after the first waiting one sends
    # What other threads may pile up while the main thread runs a long task; past it their
    # text goes straight to the process's own file descriptors instead.
    THREAD_LIMIT_BYTES = 4 << 20

    def __init__(self, side) -> None:
        self.side = side
        self.items: list[tuple[int, Any]] = []  # (route, str | log record dict)
        self.size = 0
        self.first = 0.0  # when the oldest waiting item came
        self.lock = threading.RLock()  # a signal handler may print while put() holds it
        self.main = threading.get_ident()
        self.fds = {ROUTE_STDOUT: 1, ROUTE_STDERR: 2}
        self.closed = False  # the worker left its segment: writes go to its own descriptors

    def put(self, route: int, item: Any, nbytes: int) -> None:
        """Adds one item. Past the delay, a write that ends a line sends (print() writes
        its text and its newline apart: the line goes out whole)."""
        now = time.monotonic()
        with self.lock:
            if self.closed:
                self.items.append((route, item))
                self._spill()
                return
            if not self.items:
                self.first = now
                self.side.mark_pending()  # the worker loop sends it after the task
            self.items.append((route, item))
            self.size += nbytes
            due = self.size >= self.SEND_BYTES or (
                now - self.first >= self.SEND_DELAY_S and (route == ROUTE_LOG or item.endswith("\n")))
        if due:
            if threading.get_ident() == self.main:
                self.flush()
            elif self.size > self.THREAD_LIMIT_BYTES:
                self._spill()

    def flush(self) -> None:
        """Sends what waits (in the main thread; elsewhere the main thread sends it)."""
        if threading.get_ident() != self.main or not self.items:
            return
        with self.lock:
            items, self.items, self.size = self.items, [], 0
        for route, payload in _messages(items):
            self.side.send(route, payload)

    def close(self) -> None:
        """Sends what waits; what is written after (at interpreter exit, say) goes to the
        process's own file descriptors."""
        self.flush()
        self.closed = True

    def after_fork_in_child(self) -> None:
        """A handler forked: the child is not the worker, and must never publish into the
        worker's ring. It writes to its own descriptors (what its parent had waiting stays
        the parent's to send)."""
        self.lock = threading.RLock()  # another thread may have held it at the fork
        self.items, self.size = [], 0
        self.closed = True

    def _spill(self) -> None:
        with self.lock:
            items, self.items, self.size = self.items, [], 0
        for route, payload in _messages(items):
            if route in self.fds:
                os.write(self.fds[route], payload)
            else:
                for d in pickle.loads(payload):
                    os.write(2, f"{d['levelname']}:{d['name']}:{d['msg']}\n".encode("utf-8", "replace"))


def _messages(items: list[tuple[int, Any]]):
    """Items in order as (route, payload) messages: a run of one stream's text as one
    message, a run of log records as one pickled list."""
    i = 0
    while i < len(items):
        route = items[i][0]
        j = i
        while j < len(items) and items[j][0] == route:
            j += 1
        run = [item for _, item in items[i:j]]
        if route == ROUTE_LOG:
            yield route, pickle.dumps(run, protocol=5)
        else:
            yield route, "".join(run).encode("utf-8", "backslashreplace")
        i = j


class _BytesOut:
    """A WorkerStream's ``buffer``: bytes written to it go out as text (UTF-8)."""

    def __init__(self, stream: WorkerStream) -> None:
        self._stream = stream

    def write(self, b: Any) -> int:
        data = bytes(b)
        self._stream.write(data.decode("utf-8", "replace"))
        return len(data)

    def flush(self) -> None:
        self._stream.flush()

    def writable(self) -> bool:
        return True


class WorkerStream(io.TextIOBase):
    """sys.stdout or sys.stderr in a worker: text for the owner's stream of that name."""

    def __init__(self, outbox: Outbox, route: int, original: Any) -> None:
        super().__init__()
        self._outbox = outbox
        self._route = route
        self._original = original
        self.buffer = _BytesOut(self)

    @property
    def encoding(self) -> str:
        return "utf-8"

    @property
    def errors(self) -> str:
        return "backslashreplace"

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    @property
    def line_buffering(self) -> bool:
        return False

    def reconfigure(self, **options: Any) -> None:
        """Accepted for compatibility (``sys.stdout.reconfigure(line_buffering=True)``):
        the text is always UTF-8, and sent as the module's docstring says."""

    def fileno(self) -> int:
        # The process's own descriptor (faulthandler, subprocess): what is written there
        # goes where the worker's inherited stream goes, not through the owner.
        if self._original is None:
            raise io.UnsupportedOperation("fileno")
        return self._original.fileno()

    def write(self, s: str) -> int:
        if not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        if s:
            self._outbox.put(self._route, s, len(s))
        return len(s)

    def flush(self) -> None:
        self._outbox.flush()


class LogShipper(logging.Handler):
    """The root logger's handler in a worker: each record goes to the owner as a dict
    (its message formatted here, its exception as text, unpicklable arguments merged)."""

    def __init__(self, outbox: Outbox, worker_id: int) -> None:
        super().__init__(logging.NOTSET)
        self._outbox = outbox
        self._worker_id = worker_id

    def emit(self, record: logging.LogRecord) -> None:
        try:
            d = dict(record.__dict__)
            d["msg"] = record.getMessage()
            d["args"] = None
            if record.exc_info:
                d["exc_text"] = record.exc_text or logging.Formatter().formatException(record.exc_info)
            d["exc_info"] = None
            d["worker_id"] = self._worker_id
            for k, v in list(d.items()):  # extras that cannot travel travel as their repr
                try:
                    pickle.dumps(v, protocol=5)
                except Exception:
                    d[k] = repr(v)
            self._outbox.put(ROUTE_LOG, d, len(d["msg"]) + 200)
        except Exception:
            self.handleError(record)


def install(side, worker_id: int, levels: dict | None) -> Outbox:
    """In a worker, at its start: its output and logging go to the owner from now on.
    `levels`: the owner's logging levels (log_levels())."""
    outbox = Outbox(side)
    os.register_at_fork(after_in_child=outbox.after_fork_in_child)
    sys.stdout = WorkerStream(outbox, ROUTE_STDOUT, sys.__stdout__)
    sys.stderr = WorkerStream(outbox, ROUTE_STDERR, sys.__stderr__)
    # Every record ends at the root's shipper: the owner's handlers handle it (a forked
    # worker's copies of them would handle it a second time).
    root = logging.getLogger()
    for lg in [root, *logging.Logger.manager.loggerDict.values()]:
        if isinstance(lg, logging.Logger):
            for h in list(lg.handlers):
                lg.removeHandler(h)
            lg.propagate = True
    root.addHandler(LogShipper(outbox, worker_id))
    if levels:
        root.setLevel(levels.get("root", logging.WARNING))
        for name, level in levels.get("loggers", {}).items():
            logging.getLogger(name).setLevel(level)
        logging.disable(levels.get("disable", logging.NOTSET))
    return outbox


def log_levels() -> dict:
    """The owner's logging levels, as its workers take them at start()."""
    manager = logging.Logger.manager
    loggers = {name: lg.level for name, lg in list(manager.loggerDict.items())
               if isinstance(lg, logging.Logger) and lg.level != logging.NOTSET}
    return {"root": logging.getLogger().level, "loggers": loggers, "disable": manager.disable}


def pack_exit(returned: bool, value: Any) -> bytes:
    """What worker_exit returned (`returned`) or the exception it raised (with its
    traceback), as the owner's exit results get it."""
    from ._pickling import dumps, pack_error

    if not returned:
        return b"E" + pack_error(value)
    try:
        return b"V" + dumps(value)
    except Exception as e:
        return b"E" + pack_error(TypeError(f"worker_exit returned a value that cannot be sent to the owner: {e!r}"))


class OwnerSide:
    """The owner's end (see the module's docstring); `exit_results` outlives runtimes."""

    def __init__(self, exit_results: list) -> None:
        self.exit_results = exit_results

    def deliver(self, route: int, worker_id: int, data: bytes) -> None:
        """Hands one message on. A failure here (the owner's sys.stdout closed, a log
        record that cannot be rebuilt) is reported, never raised into whatever call
        happened to drain the results."""
        try:
            self._deliver(route, worker_id, data)
        except Exception:
            import traceback

            stream = sys.__stderr__
            if stream is not None:
                stream.write(f"mpop: could not hand on a message of worker {worker_id}:\n"
                             + traceback.format_exc())

    def _deliver(self, route: int, worker_id: int, data: bytes) -> None:
        if route == ROUTE_STDOUT:
            _write(sys.stdout, data)
        elif route == ROUTE_STDERR:
            _write(sys.stderr, data)
        elif route == ROUTE_LOG:
            for d in pickle.loads(data):
                record = logging.makeLogRecord(d)
                logger = logging.getLogger() if record.name == "root" else logging.getLogger(record.name)
                logger.handle(record)
        elif route == ROUTE_EXIT:
            self.exit_results.append(_unpack_exit(data))


def _write(stream: Any, data: bytes) -> None:
    if stream is None:
        return
    stream.write(data.decode("utf-8", "replace"))
    stream.flush()


def _unpack_exit(data: bytes) -> Any:
    if data[:1] == b"V":
        try:
            return pickle.loads(data[1:])
        except Exception as e:
            return e
    from ._router import unpack_error

    return unpack_error(data[1:])

