"""What handlers print and log reaches the owner: print()/sys.stdout/sys.stderr go to the
owner's sys.stdout/sys.stderr of the moment (here pytest's capsys), batched in the worker;
logging records are handled by the owner's logger of the same name with record.worker_id
set, the worker's levels following the owner's at start().

The handlers live at module level (workers import this module by reference, through the
owner's sys.path) or are closures (they travel by value). Waits poll with a generous bound;
nothing asserts a duration."""

from __future__ import annotations

import collections
import logging
import os
import re
import sys
import threading
import time
from pathlib import Path

import pytest

import mpop
from mpop import MpopApi
from mpop._core import ROUTE_LOG, ROUTE_STDERR, ROUTE_STDOUT
from _helpers import leak_check, wait_until

METHODS = ["spawn", "fork", "forkserver"]
TIMEOUT = 60
ARRIVAL = 20.0  # how long output may take to arrive (a bound, not a threshold)


@pytest.fixture(autouse=True)
def _no_leaks():
    with leak_check():
        yield


# -- reading what arrived without racing the thread that writes ------------------------------


def peek_out() -> str:
    """What capsys holds on stdout so far, left in place (readouterr() would truncate the
    buffer while mpop's result thread may be writing to it)."""
    return sys.stdout.getvalue()


def peek_err() -> str:
    return sys.stderr.getvalue()


def arrives(pred, timeout: float = ARRIVAL) -> bool:
    return wait_until(pred, timeout, 0.02)


# -- handlers -----------------------------------------------------------------------------------


def chatty(i):
    """One task's text in several writes: it must arrive whole."""
    sys.stdout.write(f"<task {i}|")
    for k in range(5):
        print(k, end="|")
    sys.stdout.write(f"end {i}>\n")
    sys.stderr.write(f"[err {i}]\n")
    return i


def expected_block(i) -> str:
    return f"<task {i}|0|1|2|3|4|end {i}>\n"


def init_prints(tag):
    print(f"init says {tag} in {os.getpid()}")
    sys.stderr.write(f"init err {tag}\n")


def many_lines(n):
    for i in range(n):
        print(f"line {i}")
    return n


def last_words(path):
    print("last words before the kill", flush=True)
    Path(path).write_text("printed")
    time.sleep(120)
    return "not killed"


def hello(tag):
    print(f"hello {tag}")
    return os.getpid()


def odd_text():
    sys.stdout.buffer.write(b"bytes-out \xe2\x9c\x93 done\n")
    sys.stdout.buffer.write(b"bad \xff byte\n")
    sys.stdout.buffer.flush()
    print("h\u00e9llo w\u00f6rld \u2713 \u65e5\u672c\u8a9e \U0001f389")
    print("lone a\ud800b")
    sys.stderr.write("err \u00fc \udcff end\n")
    sys.stderr.buffer.write("stderr bytes \u00df\n".encode())
    return os.getpid()


def print_later(tag):
    def later():
        time.sleep(0.3)
        print(f"thread says {tag}")  # no flush: the worker is idle by now
        sys.stderr.write(f"thread err {tag}\n")
        logging.getLogger("mpoptest.thread").warning("thread logged %s", tag)

    threading.Thread(target=later, daemon=True).start()
    return os.getpid()


def logs(n):
    log = logging.getLogger("mpoptest.x")
    log.warning("n=%d", n)
    try:
        raise ValueError(f"boom {n}")
    except ValueError:
        log.exception("failed with %s", n)
    return os.getpid()


def logs_levels(tag):
    log = logging.getLogger("mpoptest.x")
    log.debug("debug %s", tag)
    log.info("info %s", tag)
    log.warning("warning %s", tag)
    log.error("error %s", tag)
    return tag


def logs_once(tag):
    logging.getLogger("mpoptest.x").warning("once %s", tag)
    return tag


class Collect(logging.Handler):
    """An owner-side handler that keeps the records it handles."""

    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def messages(self) -> list[str]:
        return [r.getMessage() for r in list(self.records)]


@pytest.fixture
def mpoptest_logger():
    """The owner's "mpoptest" logger with a collecting handler; its level and handlers are
    put back afterwards."""
    lg = logging.getLogger("mpoptest")
    old_level, old_handlers, old_prop = lg.level, list(lg.handlers), lg.propagate
    h = Collect()
    lg.addHandler(h)
    try:
        yield lg, h
    finally:
        lg.removeHandler(h)
        for x in list(lg.handlers):
            if x not in old_handlers:
                lg.removeHandler(x)
                x.close()
        lg.setLevel(old_level)
        lg.propagate = old_prop


def worker_ids(app) -> set[int]:
    return {w["id"] for w in app.status()["workers"]}


# -- 1. print and the std streams reach capsys ---------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_handler_output_reaches_the_owners_sys_stdout_and_stderr(capsys, method):
    submit_ids = list(range(4))
    run_ids = list(range(100, 104))
    map_ids = list(range(200, 220))
    everything = submit_ids + run_ids + map_ids
    with MpopApi(workers=2, start_method=method, auto_terminate=False,
                 initializer=init_prints, initargs=(method,)) as app:
        futs = [app.submit(chatty, i) for i in submit_ids]
        assert [f.result(timeout=TIMEOUT) for f in futs] == submit_ids
        for i in run_ids:
            app.enqueue(chatty, args=(i,), tsk_id=i)
        assert sorted(app.run(timeout=TIMEOUT).values()) == run_ids
        assert list(app.map(chatty, map_ids, chunksize=3)) == map_ids
        assert arrives(lambda: all(expected_block(i) in peek_out() for i in everything)
                       and all(f"[err {i}]\n" in peek_err() for i in everything)
                       and peek_out().count("init says") >= 2), (peek_out(), peek_err())
    captured = capsys.readouterr()
    out, err = captured.out, captured.err
    # Each task's text arrived whole (its writes contiguous, nothing else in between), once.
    for i in everything:
        assert out.count(expected_block(i)) == 1, out
        assert err.count(f"[err {i}]\n") == 1, err
    assert out.count("<task ") == len(everything), out
    # What the initializer printed, once per worker, on the right streams.
    init_lines = [line for line in out.splitlines() if line.startswith("init says ")]
    assert len(init_lines) == 2, out
    assert all(line.startswith(f"init says {method} in ") for line in init_lines), init_lines
    assert len({line.rsplit(" ", 1)[1] for line in init_lines}) == 2, init_lines  # two workers
    assert str(os.getpid()) not in {line.rsplit(" ", 1)[1] for line in init_lines}
    assert err.count(f"init err {method}\n") == 2, err
    # Nothing of stderr on stdout and the other way round.
    assert "[err" not in out and "<task" not in err


def test_output_of_a_closure_and_a_lambda(capsys):
    prefix = "closure"

    def closure(x):
        print(f"{prefix} {x}")
        return x

    with MpopApi(workers=1) as app:
        assert app.submit(closure, 1).result(timeout=TIMEOUT) == 1
        assert app.submit(lambda: print("from a lambda") or 2).result(timeout=TIMEOUT) == 2
        assert arrives(lambda: "closure 1\n" in peek_out() and "from a lambda\n" in peek_out()), peek_out()
    out = capsys.readouterr().out
    assert out.count("closure 1\n") == 1 and out.count("from a lambda\n") == 1, out


# -- 2. batching ----------------------------------------------------------------------------------


def test_many_short_lines_travel_in_few_messages(capsys):
    n = 20_000
    with MpopApi(workers=1, auto_terminate=False) as app:
        side = app._lifecycle.side
        calls: collections.Counter = collections.Counter()
        original = side.deliver

        def counting(route, worker_id, data):
            calls[route] += 1
            return original(route, worker_id, data)

        side.deliver = counting
        assert app.submit(many_lines, n).result(timeout=TIMEOUT) == n
        assert arrives(lambda: f"line {n - 1}\n" in peek_out()), peek_out()[-500:]
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines == [f"line {i}" for i in range(n)], (len(lines), lines[:3], lines[-3:])
    assert 1 <= calls[ROUTE_STDOUT] < 100, calls
    assert calls[ROUTE_STDERR] == 0 and calls[ROUTE_LOG] == 0, calls


def ticks_until(path):
    """Prints without flush, pauses, prints again, then waits for the owner to have seen
    the first line (it gives up after a while, so that a test that fails ends)."""
    print("tick 1")
    time.sleep(0.3)
    print("tick 2")  # 0.1 s or more after the waiting "tick 1": both go out now
    deadline = time.monotonic() + 30
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)
    print("tick 3")
    return os.path.exists(path)


def test_text_of_a_long_task_arrives_while_it_runs(capsys, tmp_path):
    seen = tmp_path / "seen"
    with MpopApi(workers=1, auto_terminate=False) as app:
        fut = app.submit(ticks_until, str(seen))
        # The task is still running (it waits for `seen`), yet its first lines are here.
        # The line goes out whole: print() writes "tick 2" and its "\n" apart, and the
        # newline is what sends.
        assert arrives(lambda: "tick 1\ntick 2\n" in peek_out()), peek_out()
        assert not fut.done()
        seen.write_text("seen")
        assert fut.result(timeout=TIMEOUT) is True
        assert arrives(lambda: "tick 3\n" in peek_out()), peek_out()
    assert capsys.readouterr().out == "tick 1\ntick 2\ntick 3\n"


# -- 3. a flushed line survives the kill -------------------------------------------------------------


@pytest.mark.parametrize("how", ["kill_task", "kill_worker"])
def test_a_line_flushed_before_the_worker_is_killed_arrives(capsys, tmp_path, how):
    marker = tmp_path / "printed"
    # max_retries=0: a task whose worker is killed is not run again.
    with MpopApi(workers=1, auto_terminate=False, max_retries=0) as app:
        fut = app.submit(last_words, str(marker))
        # The handler writes the marker after its flushed print: kill at once, without
        # waiting for the line to arrive first.
        assert wait_until(marker.exists, TIMEOUT), "the handler did not run"
        if how == "kill_task":
            assert app.kill_task(fut) is True
            assert fut.cancelled()
        else:
            (wid,) = worker_ids(app)
            assert app.kill_worker(wid) is True
            with pytest.raises(mpop.WorkerCrashedError):
                fut.result(timeout=TIMEOUT)
        assert arrives(lambda: "last words before the kill\n" in peek_out()), peek_out()
        # The replacement's output arrives too.
        assert app.submit(hello, "after the kill").result(timeout=TIMEOUT) > 0
        assert arrives(lambda: "hello after the kill\n" in peek_out()), peek_out()
    out = capsys.readouterr().out
    assert out.count("last words before the kill\n") == 1, out
    assert out.count("hello after the kill\n") == 1, out


# -- 4. logging ----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_worker_log_records_reach_the_owners_logger(caplog, method):
    caplog.set_level(logging.WARNING)  # the root's level (what the owner has by default)
    with MpopApi(workers=1, start_method=method, auto_terminate=False) as app:
        pid = app.submit(logs, 5).result(timeout=TIMEOUT)
        ids = worker_ids(app)

        def ours():
            return [r for r in list(caplog.records) if r.name == "mpoptest.x"]

        assert arrives(lambda: len(ours()) >= 2), caplog.records
    records = ours()
    assert len(records) == 2, [r.getMessage() for r in records]
    warning, error = records
    assert pid != os.getpid()
    assert warning.getMessage() == "n=5" and warning.levelno == logging.WARNING
    assert warning.levelname == "WARNING"
    assert getattr(warning, "worker_id", None) in ids, (getattr(warning, "worker_id", None), ids)
    assert warning.process == pid
    assert warning.args is None
    assert error.getMessage() == "failed with 5" and error.levelno == logging.ERROR
    assert getattr(error, "worker_id", None) in ids
    assert error.exc_text and "Traceback (most recent call last)" in error.exc_text, error.exc_text
    assert "ValueError: boom 5" in error.exc_text and "in logs" in error.exc_text, error.exc_text
    # The owner's handlers format it as one of its own (caplog's text has the traceback).
    assert "ValueError: boom 5" in caplog.text


@pytest.mark.parametrize("level", [logging.ERROR, logging.DEBUG])
def test_worker_log_levels_follow_the_owner_at_start(mpoptest_logger, level):
    lg, collect = mpoptest_logger
    lg.setLevel(level)
    # spawn: a fresh interpreter, whose only logging configuration is what the owner sends.
    with MpopApi(workers=1, start_method="spawn", auto_terminate=False) as app:
        assert app.submit(logs_levels, "a").result(timeout=TIMEOUT) == "a"
        assert arrives(lambda: "error a" in collect.messages()), collect.messages()
    got = collect.messages()
    if level == logging.ERROR:
        assert got == ["error a"], got
    else:
        assert got == ["debug a", "info a", "warning a", "error a"], got
    assert all(r.name == "mpoptest.x" for r in collect.records)


def test_log_levels_are_the_owners_of_the_moment_of_start(mpoptest_logger):
    lg, collect = mpoptest_logger
    lg.setLevel(logging.ERROR)
    app = MpopApi(workers=1, start_method="spawn", auto_terminate=False)
    try:
        lg.setLevel(logging.DEBUG)  # changed after the app was made, before start()
        app.start()
        lg.setLevel(logging.ERROR)  # changed after start(): the workers keep DEBUG
        assert app.submit(logs_levels, "b").result(timeout=TIMEOUT) == "b"
        assert arrives(lambda: "error b" in collect.messages()), collect.messages()
    finally:
        app.shutdown()
    assert collect.messages() == ["debug b", "info b", "warning b", "error b"]


def test_a_handler_attached_before_a_fork_handles_each_record_once(mpoptest_logger, tmp_path):
    lg, collect = mpoptest_logger
    path = tmp_path / "log.txt"
    # A file handler the forked worker inherits (same open file): if the worker's copy
    # also emitted, the record would be in the file twice.
    fh = logging.FileHandler(path, mode="a")
    fh.setFormatter(logging.Formatter("%(process)d %(name)s %(message)s"))
    lg.addHandler(fh)
    with MpopApi(workers=1, start_method="fork", auto_terminate=False) as app:
        assert app.submit(logs_once, "t1").result(timeout=TIMEOUT) == "t1"
        assert app.submit(logs_once, "t2").result(timeout=TIMEOUT) == "t2"
        assert arrives(lambda: "once t2" in collect.messages()), collect.messages()
    fh.flush()
    assert collect.messages() == ["once t1", "once t2"]
    text = path.read_text()
    assert text.count("once t1") == 1 and text.count("once t2") == 1, text


# -- 5. bytes, non-ASCII text, lone surrogates ---------------------------------------------------


@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_bytes_unicode_and_lone_surrogates(capsys, method):
    with MpopApi(workers=1, start_method=method, auto_terminate=False) as app:
        pid = app.submit(odd_text).result(timeout=TIMEOUT)
        assert arrives(lambda: "err \u00fc" in peek_err() and "lone a" in peek_out()
                       and "stderr bytes" in peek_err()), (peek_out(), peek_err())
        # The worker did not die of it: the same process runs the next task.
        assert app.submit(hello, "again").result(timeout=TIMEOUT) == pid
        assert app.status()["workers"][0]["restarts"] == 0
        assert arrives(lambda: "hello again\n" in peek_out()), peek_out()
    captured = capsys.readouterr()
    out, err = captured.out, captured.err
    assert "bytes-out \u2713 done\n" in out, out
    assert re.search("bad .{1,4} byte\n", out), out  # invalid UTF-8, replaced
    assert "h\u00e9llo w\u00f6rld \u2713 \u65e5\u672c\u8a9e \U0001f389\n" in out, out
    assert re.search(r"lone a(\\ud800|\ufffd|\?)b\n", out), out
    assert re.search(r"err \u00fc (\\udcff|\ufffd|\?) end\n", err), err
    assert "stderr bytes \u00df\n" in err, err


# -- 6. other threads of the worker ----------------------------------------------------------------


def test_text_a_worker_thread_writes_after_its_task_arrives(capsys, caplog):
    caplog.set_level(logging.WARNING)
    with MpopApi(workers=1, auto_terminate=False) as app:
        pid = app.submit(print_later, "late").result(timeout=TIMEOUT)
        # The worker is idle from now on: nothing else makes it send.
        assert arrives(lambda: "thread says late\n" in peek_out()
                       and "thread err late\n" in peek_err()), (peek_out(), peek_err())
        assert arrives(lambda: any(r.name == "mpoptest.thread" for r in list(caplog.records)))
        assert app.status()["workers"][0]["pid"] == pid
    (rec,) = [r for r in caplog.records if r.name == "mpoptest.thread"]
    assert rec.getMessage() == "thread logged late"
    captured = capsys.readouterr()
    assert captured.out.count("thread says late\n") == 1, captured.out


# -- the rest of a worker's life: failing tasks, a failing initializer, worker_exit -----------------


def prints_then_raises(x):
    print(f"about to fail {x}")
    logging.getLogger("mpoptest.x").error("logged before failing %s", x)
    raise RuntimeError(f"failed {x}")


def init_prints_then_fails():
    print("init printed before failing")
    raise RuntimeError("the initializer failed")


def exit_prints():
    print(f"worker_exit says bye from {os.getpid()}")
    return "bye"


def test_text_of_a_failing_task_arrives(capsys, caplog):
    caplog.set_level(logging.WARNING)
    with MpopApi(workers=1, auto_terminate=False) as app:
        with pytest.raises(RuntimeError, match="failed 7"):
            app.submit(prints_then_raises, 7).result(timeout=TIMEOUT)
        app.enqueue(prints_then_raises, args=(8,))
        (failure,) = app.run(timeout=TIMEOUT).failures
        assert arrives(lambda: "about to fail 7\n" in peek_out() and "about to fail 8\n" in peek_out()), peek_out()
        assert arrives(lambda: len([r for r in list(caplog.records) if r.name == "mpoptest.x"]) == 2)
    assert [r.getMessage() for r in caplog.records if r.name == "mpoptest.x"] == [
        "logged before failing 7", "logged before failing 8"]
    out = capsys.readouterr().out
    assert out.count("about to fail 7\n") == 1 and out.count("about to fail 8\n") == 1, out


def test_what_a_failing_initializer_printed_arrives(capsys):
    app = MpopApi(workers=1, initializer=init_prints_then_fails)
    try:
        with pytest.raises(mpop.WorkerInitError, match="the initializer failed"):
            app.submit(hello, "never").result(timeout=TIMEOUT)  # may raise at submit already
        assert arrives(lambda: "init printed before failing\n" in peek_out()), peek_out()
    finally:
        app.shutdown()
    assert "init printed before failing\n" in capsys.readouterr().out


@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_what_worker_exit_prints_arrives(capsys, method):
    app = MpopApi(workers=2, start_method=method, worker_exit=exit_prints, auto_terminate=False)
    try:
        assert list(app.map(hello, ["a", "b"])) != []
    finally:
        app.shutdown()
    assert app.exit_results() == ["bye", "bye"]
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("worker_exit says bye from ")]
    assert len(lines) == 2, out
    assert "hello a\n" in out and "hello b\n" in out, out


def forks_and_prints(tag):
    pid = os.fork()
    if pid == 0:  # the child is not the worker: its text goes to its own descriptors
        print(f"child of {tag}", flush=True)
        os._exit(0)
    os.waitpid(pid, 0)
    print(f"parent {tag}", flush=True)
    return tag


def test_a_handler_that_forks_keeps_the_workers_output_channel_intact(capsys):
    with MpopApi(workers=1) as app:
        assert [app.submit(forks_and_prints, i).result(timeout=TIMEOUT) for i in range(3)] == [0, 1, 2]
        assert app.submit(hello, "after").result(timeout=TIMEOUT) is not None
        assert app.status()["workers"][0]["restarts"] == 0
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if line.startswith("parent")] == ["parent 0", "parent 1", "parent 2"]
    assert "child of" not in out  # not through the owner


def reconfigures():
    sys.stdout.reconfigure(line_buffering=True)
    print("after reconfigure", sys.stdout.line_buffering)
    return True


def test_reconfigure_of_a_workers_stdout_is_accepted(capsys):
    with MpopApi(workers=1) as app:
        assert app.submit(reconfigures).result(timeout=TIMEOUT) is True
    assert capsys.readouterr().out == "after reconfigure False\n"


class BrokenStream:
    def write(self, text):
        raise OSError("the owner's stream is closed")

    def flush(self):
        pass


def test_a_failing_owner_stream_never_fails_a_result(monkeypatch):
    with MpopApi(workers=1) as app:
        monkeypatch.setattr(sys, "stdout", BrokenStream())
        assert app.submit(hello, "x").result(timeout=TIMEOUT) is not None
        monkeypatch.undo()
