"""Shutdown: the context manager, shutdown(wait=/cancel_pending=), use after shutdown, apps
dropped without shutdown (even killed), and wait()/results() with timeouts."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import mpop
from mpop import MpopApi, ProcTaskFnID
from _helpers import SHM, SPAWNED, env_with_pythonpath, leak_check, pid_alive, run_python, wait_until

TIMEOUT = 60


@pytest.fixture(autouse=True)
def _no_leaks():
    with leak_check():
        yield


def slow(seconds: float, value: int) -> int:
    time.sleep(seconds)
    return value


def add(a: int, b: int) -> int:
    return a + b


def worker_pids(app) -> list[int]:
    return [w["pid"] for w in app.status()["workers"] if w["pid"]]


def busy_task_running(app) -> bool:
    return any(w["state"] == "busy" for w in app.status()["workers"])


# -- context manager and shutdown() -----------------------------------------------------------


def test_context_manager_releases_segment_and_workers():
    with MpopApi(workers=2, auto_terminate=False) as app:
        assert list(app.map(add, range(10), range(10))) == [2 * i for i in range(10)]
        name = app.segment_name
        assert name and (SHM / name).exists()
        assert wait_until(lambda: len([p for p in worker_pids(app) if pid_alive(p)]) == 2)
        pids = worker_pids(app)
    assert not (SHM / name).exists()
    for pid in pids:
        assert not pid_alive(pid), pid
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # reaped too, not left as a zombie
    assert app.segment_name is None


def test_context_manager_with_exception_inside_still_cleans_up():
    with pytest.raises(RuntimeError, match="user error"):
        with MpopApi(workers=1, auto_terminate=False) as app:
            app.submit(add, 1, 2).result(timeout=TIMEOUT)
            name = app.segment_name
            raise RuntimeError("user error")
    assert not (SHM / name).exists()


def test_shutdown_wait_finishes_queued_work():
    app = MpopApi(workers=2, auto_terminate=False)
    futs = [app.submit(slow, 0.01, i) for i in range(60)]
    for i in range(20):
        app.enqueue(add, args=(i, 1))
    app.shutdown(wait=True)
    assert all(f.done() for f in futs)
    assert not any(f.cancelled() for f in futs)
    assert [f.result() for f in futs] == list(range(60))


def test_shutdown_cancel_pending_cancels_unstarted_futures():
    app = MpopApi(workers=1, worker_batch_size=1, auto_terminate=False)
    try:
        futs = [app.submit(slow, 0.5, i) for i in range(10)]
        assert wait_until(lambda: busy_task_running(app), TIMEOUT)
    finally:
        app.shutdown(wait=True, cancel_pending=True)
    assert all(f.done() for f in futs)
    cancelled = [f.cancelled() for f in futs]
    assert cancelled[-1] and sum(cancelled) >= 7, cancelled
    for f in futs:
        if not f.cancelled():
            assert f.result() in range(10)  # what had started ran to the end (wait=True)


def test_shutdown_cancel_pending_includes_claimed_but_unstarted_tasks():
    # With the default batch size the worker claims every task at once; none but the first
    # has started, so cancel_pending must cancel them rather than run them all.
    app = MpopApi(workers=1, auto_terminate=False)
    try:
        futs = [app.submit(slow, 0.3, i) for i in range(8)]
        assert wait_until(lambda: busy_task_running(app), TIMEOUT)
    finally:
        app.shutdown(wait=True, cancel_pending=True)
    assert all(f.done() for f in futs)
    assert futs[-1].cancelled(), [f._state for f in futs]


def test_shutdown_without_wait_ends_every_future():
    app = MpopApi(workers=1, auto_terminate=False)
    futs = [app.submit(slow, 0.5, i) for i in range(6)]
    assert wait_until(lambda: busy_task_running(app), TIMEOUT)
    app.shutdown(wait=False)
    assert all(f.done() for f in futs)
    for f in futs:
        if not f.cancelled() and f.exception() is not None:
            assert isinstance(f.exception(), mpop.ShutdownError)


def test_shutdown_twice_and_close_alias():
    app = MpopApi(workers=1)
    assert app.submit(add, 1, 1).result(timeout=TIMEOUT) == 2
    app.shutdown()
    app.shutdown()
    app.close()
    never_started = MpopApi(workers=1)
    never_started.shutdown()
    never_started.shutdown()


def test_use_after_shutdown_raises_shutdown_error():
    app = MpopApi(workers=1)
    app.enqueue(fn_id=ProcTaskFnID.INCREMENT, args=(1,))
    assert app.run().values() == [2]
    app.shutdown()
    calls = [
        lambda: app.enqueue(fn_id=ProcTaskFnID.INCREMENT, args=(1,)),
        lambda: app.enqueue_many([(ProcTaskFnID.INCREMENT, 1)]),
        lambda: app.submit(add, 1, 2),
        lambda: app.map(add, [1], [2]),
        lambda: app.run(),
        lambda: app.start(),
        lambda: app.register(lambda: 0),
        lambda: app.scale(2),
        lambda: app.__enter__(),  # `with app:` on an app that was shut down
    ]
    for call in calls:
        with pytest.raises(mpop.ShutdownError):
            call()
    assert issubclass(mpop.ShutdownError, RuntimeError)


# -- wait() and results() ---------------------------------------------------------------------


def test_wait_timeout_then_complete():
    with MpopApi(workers=1, auto_terminate=False) as app:
        assert app.wait(timeout=0.1) is True  # nothing enqueued
        app.enqueue(slow, args=(1.0, 3), tsk_id=1)
        app.enqueue(fn_id=ProcTaskFnID.INCREMENT, args=(4,), tsk_id=2)
        assert app.wait(timeout=0.05) is False
        assert app.wait(timeout=TIMEOUT) is True
        got = sorted((r.tsk_id, r.value) for r in app.results(timeout=TIMEOUT))
        assert got == [(1, 3), (2, 5)]
        assert list(app.results(timeout=1)) == []  # each result is handed out once


def test_results_timeout_and_streaming():
    with MpopApi(workers=1, auto_terminate=False) as app:
        app.enqueue(fn_id=ProcTaskFnID.INCREMENT, args=(0,), tsk_id=0)
        app.enqueue(slow, args=(1.5, 9), tsk_id=1)
        seen = []
        with pytest.raises(TimeoutError):
            for r in app.results(timeout=0.5):
                seen.append((r.tsk_id, r.value))
        assert seen == [(0, 1)]  # the quick one arrived before the timeout
        rest = [(r.tsk_id, r.value) for r in app.results(timeout=TIMEOUT)]
        assert rest == [(1, 9)]


def test_wait_starts_workers_for_enqueued_tasks():
    with MpopApi(workers=1) as app:
        app.enqueue(fn_id=ProcTaskFnID.ADD, args=(2, 2))
        assert app.wait(timeout=TIMEOUT) is True
        assert [r.value for r in app.results(timeout=TIMEOUT)] == [4]


# -- apps dropped without shutdown ------------------------------------------------------------

DROPPED = r"""
import json, sys, time
import mpop

def add(a, b):
    return a + b

mode = sys.argv[1]
app = mpop.MpopApi(workers=2, auto_terminate=False)
assert list(app.map(add, range(5), range(5))) == [0, 2, 4, 6, 8]
while len([w for w in app.status()["workers"] if w["state"] in ("idle", "busy")]) < 2:
    time.sleep(0.01)
info = {"segment": app.segment_name, "pids": [w["pid"] for w in app.status()["workers"]]}
print(json.dumps(info), flush=True)
if mode == "global":
    pass                      # interpreter exit with the app still referenced
elif mode == "del":
    del app                   # dropped: garbage collected
    time.sleep(0.5)
elif mode == "exit":
    sys.exit(0)
elif mode == "busy":
    for i in range(100):      # work still queued at exit
        app.enqueue(add, args=(i, 1))
elif mode == "sleep":
    time.sleep(120)           # waits to be killed
"""


def _segment_and_pids(stdout: str) -> tuple[str, list[int]]:
    info = json.loads(stdout.strip().splitlines()[0])
    return info["segment"], info["pids"]


@pytest.mark.parametrize("mode", ["global", "del", "exit", "busy"])
def test_app_dropped_without_shutdown_leaves_nothing(tmp_path, mode):
    script = tmp_path / "dropped.py"
    script.write_text(DROPPED)
    proc = run_python([str(script), mode])
    assert proc.returncode == 0, proc.stderr
    name, pids = _segment_and_pids(proc.stdout)
    assert len(pids) == 2
    assert wait_until(lambda: not any(pid_alive(p) for p in pids)), [p for p in pids if pid_alive(p)]
    assert wait_until(lambda: not (SHM / name).exists()), name
    assert "Traceback" not in proc.stderr, proc.stderr


def test_killed_owner_leaves_nothing(tmp_path):
    script = tmp_path / "dropped.py"
    script.write_text(DROPPED)
    with subprocess.Popen([sys.executable, str(script), "sleep"], env=env_with_pythonpath(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        SPAWNED.add(proc.pid)
        try:
            line = proc.stdout.readline()
            name, pids = _segment_and_pids(line)
            assert (SHM / name).exists()
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    # The workers notice their owner died, leave, and the last one out removes the segment.
    assert wait_until(lambda: not any(pid_alive(p) for p in pids), 20), [p for p in pids if pid_alive(p)]
    assert wait_until(lambda: not (SHM / name).exists(), 20), name


# -- what an app leaves in its own process ------------------------------------------------------


def _mapped_segments() -> list[str]:
    """mpop segments this process still maps (an unlinked one shows as '(deleted)')."""
    with open("/proc/self/maps") as f:
        return [line.split()[-2] if line.rstrip().endswith("(deleted)") else line.split()[-1]
                for line in f if "/dev/shm/" in line and "mpop" in line]


def _native_refs(app) -> list:
    """Weak references to an app's native objects (the segment holds the mapping)."""
    import weakref

    rt = app._lifecycle.runtime
    return [weakref.ref(rt.segment), weakref.ref(rt.producer), weakref.ref(rt.collector)]


@pytest.mark.parametrize("ending", ["shutdown", "with", "dropped"])
def test_an_app_that_ends_releases_its_memory_at_once(ending):
    # Without a garbage collection: nothing of the app may sit in a reference cycle that
    # runs through a native object (the collector and the fast path hold the dispatcher's
    # dict, future class and bound methods).
    import gc

    before = _mapped_segments()
    gc.disable()
    try:
        app = MpopApi(workers=1, auto_terminate=False, pool_bytes=1 << 20)
        kept = app.submit(add, 1, 2)  # a future the caller keeps after the end
        assert kept.result(timeout=TIMEOUT) == 3
        list(app.map(add, range(10), range(10)))
        refs = _native_refs(app)
        if ending == "shutdown":
            app.shutdown()
        elif ending == "with":
            with app:
                pass
        del app
        assert [r() for r in refs] == [None, None, None]
        assert _mapped_segments() == before
        assert kept.result() == 3
    finally:
        gc.enable()


def test_many_apps_leave_no_mappings_behind():
    before = _mapped_segments()
    for i in range(30):
        app = MpopApi(workers=1, start_method="fork", pool_bytes=1 << 20)
        assert app.submit(add, i, 1).result(timeout=TIMEOUT) == i + 1
        if i % 2:
            app.shutdown()
        del app
    assert _mapped_segments() == before


CTRL_C_IN_SHUTDOWN = r"""
import json, os, signal, threading, time
import mpop

signal.signal(signal.SIGINT, signal.default_int_handler)

def forever(x):
    time.sleep(300)
    return x

app = mpop.MpopApi(workers=1, auto_terminate=False)
pids = []
interrupted_at = None
try:
    with app:
        for i in range(3):
            app.submit(forever, i)
        while not pids:  # the first task is running
            pids = [w["pid"] for w in app.status()["workers"] if w["state"] == "busy"]
            time.sleep(0.01)
        sent = time.monotonic()
        threading.Timer(0.5, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
    # leaving the block: shutdown(wait=True) waits for the three tasks
except KeyboardInterrupt:
    interrupted_at = time.monotonic() - sent
print(json.dumps({"after": interrupted_at, "pids": pids, "segment_gone": app.segment_name is None}))
"""


def test_ctrl_c_during_shutdown_stops_at_once(tmp_path):
    # shutdown(wait=True) honours Ctrl-C: it stops the workers at once and raises, instead
    # of waiting out its 10 s graceful stop.
    script = tmp_path / "ctrl_c_shutdown.py"
    script.write_text(CTRL_C_IN_SHUTDOWN)
    proc = run_python([str(script)], timeout=60)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["after"] is not None and info["after"] < 5, info
    assert info["segment_gone"]
    assert info["pids"] and not any(pid_alive(p) for p in info["pids"])


def test_a_map_in_another_thread_ends_cleanly_at_shutdown():
    import threading

    app = MpopApi(workers=2, auto_terminate=False)
    errors: list = []

    def consume():
        try:
            for _ in app.map(slow, [0.05] * 1000, range(1000), chunksize=1):
                pass
        except BaseException as e:  # noqa: BLE001 - what it ends with is the point
            errors.append(e)

    t = threading.Thread(target=consume)
    t.start()
    assert wait_until(lambda: app.status()["queue"]["finished"] > 4)
    app.shutdown(wait=False)
    t.join(TIMEOUT)
    assert not t.is_alive()
    # An mpop error or a cancellation, never a crash of the dispatcher's internals.
    assert len(errors) == 1 and isinstance(errors[0], (mpop.MpopError, cf.CancelledError)), errors
