"""Persistent pools (MpopApi(persistent=True, name=...)): the supervisor in a process of its
own, so that the workers and their queued tasks outlive the process that created the pool,
even its SIGKILL; detach(); the shutdown and status commands; one live pool per
name; nothing left behind once the pool is stopped."""

from __future__ import annotations

import os
import signal
import sys
import textwrap
import time

import pytest

import mpop
from _helpers import REPO, leak_check, pid_alive, pool_name_fixture, run_python, wait_until
from mpop._core import Segment

TIMEOUT = 60.0


@pytest.fixture(autouse=True)
def _no_leaks():
    with leak_check():
        yield


name = pool_name_fixture("mpop-ptest")


def write_marker(i, path):
    time.sleep(0.02)
    with open(os.path.join(path, f"done{i}"), "w") as f:
        f.write(str(os.getpid()))
    return i


def pool_processes(segment: str) -> set[int]:
    """The supervisor process and the workers of a live pool, from its segment."""
    seg = Segment.attach(segment)
    try:
        return {seg.owner_pid} | {w["pid"] for w in seg.workers_status() if w["pid"]}
    finally:
        seg.leave()


def mpop_cli(*args: str):
    return run_python(["-m", "mpop", *args])


def test_tasks_queued_by_a_creator_killed_with_sigkill_still_run(tmp_path, name):
    done = tmp_path / "done"
    done.mkdir()
    script = tmp_path / "creator.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(REPO / "tests")!r})
        import mpop
        from test_persistent import write_marker
        app = mpop.MpopApi(name={name!r}, persistent=True, workers=2)
        app.start()
        assert app.submit(write_marker, -1, {str(done)!r}).result() == -1
        for i in range(60):
            app.enqueue(write_marker, args=(i, {str(done)!r}))
        print(app.segment_name, app.status()["supervisor"]["pid"], flush=True)
        os.kill(os.getpid(), 9)
    """))
    proc = run_python([str(script)])
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    segment, supervisor = proc.stdout.split()
    # The creator is gone; its pool runs every task it queued.
    assert wait_until(lambda: len(os.listdir(done)) == 61, TIMEOUT), sorted(os.listdir(done))
    assert pid_alive(int(supervisor))
    procs = pool_processes(segment)

    status = mpop_cli("status", name, "--once")
    assert status.returncode == 0, status.stderr
    assert f"supervisor process pid {supervisor}, alive" in status.stdout

    stop = mpop_cli("shutdown", name)
    assert stop.returncode == 0, stop.stderr
    assert f"stopped persistent pool {name!r}" in stop.stdout
    assert wait_until(lambda: not any(pid_alive(p) for p in procs), TIMEOUT)
    assert not os.path.exists(f"/dev/shm/{segment}")


def test_cleanup_keeps_a_live_pool_whose_creator_is_gone(tmp_path, name):
    script = tmp_path / "creator.py"
    script.write_text(textwrap.dedent(f"""
        import mpop
        app = mpop.MpopApi(name={name!r}, persistent=True, workers=1)
        app.start()
        print(app.segment_name, flush=True)
        app.detach()
    """))
    proc = run_python([str(script)])
    assert proc.returncode == 0, proc.stderr
    segment = proc.stdout.strip()
    try:
        cleanup = mpop_cli("cleanup")
        assert f"removed {segment}" not in cleanup.stdout
        assert os.path.exists(f"/dev/shm/{segment}")
    finally:
        procs = pool_processes(segment)
        assert mpop_cli("shutdown", name).returncode == 0
    assert wait_until(lambda: not any(pid_alive(p) for p in procs), TIMEOUT)
    assert not os.path.exists(f"/dev/shm/{segment}")


def test_shutdown_of_a_pool_that_is_not_there(name):
    missing = mpop_cli("shutdown", name)
    assert missing.returncode == 1 and f"no live persistent pool named {name!r}" in missing.stderr


def test_the_whole_api_in_the_creator_and_a_with_block_stops_the_pool(name):
    with mpop.MpopApi(name=name, persistent=True, workers=2) as app:
        assert app.submit(pow, 2, 10).result(timeout=TIMEOUT) == 1024
        assert list(app.map(abs, range(-5, 5))) == [5, 4, 3, 2, 1, 0, 1, 2, 3, 4]
        for i in range(20):
            app.enqueue(pow, args=(i, 2))
        assert sorted(app.run().values()) == [i * i for i in range(20)]
        status = app.status()
        sup = status["supervisor"]
        assert sup["alive"] and sup["pid"] != os.getpid()
        assert app.status()["supervisor"]["alive"]  # run() does not stop a persistent pool
        segment = app.segment_name
        procs = pool_processes(segment)
    assert wait_until(lambda: not any(pid_alive(p) for p in procs), TIMEOUT)
    assert not os.path.exists(f"/dev/shm/{segment}")


def test_a_second_pool_under_a_live_name_is_refused(name):
    with mpop.MpopApi(name=name, persistent=True, workers=1) as app:
        app.start()
        other = mpop.MpopApi(name=name, persistent=True, workers=1)
        with pytest.raises(mpop.ConfigError, match=f"a persistent pool named '{name}' is already running"):
            other.start()
        other.shutdown()
        # An in-process app may use the same name prefix.
        with mpop.MpopApi(name=name, workers=1) as plain:
            assert plain.submit(pow, 3, 2).result(timeout=TIMEOUT) == 9


@pytest.mark.parametrize("kw, text", [
    ({}, "persistent=True needs a name="),
    ({"name": "x", "start_method": "fork"}, "a persistent pool starts its workers with start_method='spawn'"),
    ({"name": "x", "persistent": "yes"}, "persistent must be True or False"),
])
def test_bad_persistent_settings(kw, text):
    kw.setdefault("persistent", True)
    with pytest.raises(mpop.ConfigError, match=text):
        mpop.MpopApi(**kw)


def test_detach_leaves_the_pool_running_and_the_handle_unusable(tmp_path, name):
    app = mpop.MpopApi(name=name, persistent=True, workers=1)
    for i in range(10):
        app.enqueue(write_marker, args=(i, str(tmp_path)))
    app.start()
    segment, pid = app.segment_name, app.status()["supervisor"]["pid"]
    app.detach()
    with pytest.raises(mpop.ShutdownError, match="detached"):
        app.submit(pow, 2, 2)
    app.shutdown()  # a no-op on a detached handle
    assert wait_until(lambda: len(os.listdir(tmp_path)) == 10, TIMEOUT)
    assert pid_alive(pid)
    from mpop._persistent import stop_pool

    procs = pool_processes(segment)
    assert stop_pool(name) == segment
    assert wait_until(lambda: not any(pid_alive(p) for p in procs), TIMEOUT)
    assert not os.path.exists(f"/dev/shm/{segment}")


def test_detach_is_for_persistent_pools():
    with mpop.MpopApi(workers=1) as app:
        with pytest.raises(mpop.MpopError, match="detach\\(\\) is for persistent pools"):
            app.detach()


def failing_init():
    raise RuntimeError("no database")


def test_a_failing_initializer_in_a_persistent_pool(name):
    app = mpop.MpopApi(name=name, persistent=True, workers=1, initializer=failing_init)
    with pytest.raises(mpop.WorkerInitError, match="RuntimeError: no database") as info:
        app.submit(pow, 2, 2).result(timeout=TIMEOUT)
    assert "no database" in str(info.value.__cause__)
    app.shutdown()


def test_kill_worker_is_repaired_by_the_supervisor_process(name):
    with mpop.MpopApi(name=name, persistent=True, workers=1, auto_terminate=False) as app:
        first = app.submit(os.getpid).result(timeout=TIMEOUT)
        assert app.kill_worker(0)
        assert wait_until(lambda: app.status()["workers"][0]["restarts"] == 1, TIMEOUT)
        assert app.submit(os.getpid).result(timeout=TIMEOUT) != first
        with pytest.raises(mpop.MpopError, match="scale\\(\\) of a persistent pool is not supported yet"):
            app.scale(2)


def test_a_creator_that_exits_without_shutdown_leaves_its_pool_running(tmp_path, name):
    script = tmp_path / "creator.py"
    script.write_text(textwrap.dedent(f"""
        import mpop
        app = mpop.MpopApi(name={name!r}, persistent=True, workers=1)
        print(app.submit(pow, 2, 5).result(), app.segment_name, flush=True)
    """))  # no detach(), no shutdown(): the handle detaches at interpreter exit
    proc = run_python([str(script)])
    assert proc.returncode == 0, proc.stderr
    value, segment = proc.stdout.split()
    assert value == "32"
    from mpop._persistent import find_pools, stop_pool

    assert find_pools(name) == [segment]
    procs = pool_processes(segment)
    stop_pool(name)
    assert wait_until(lambda: not any(pid_alive(p) for p in procs), TIMEOUT)
    assert not os.path.exists(f"/dev/shm/{segment}")


def test_kill_task_stops_a_queued_task_of_a_persistent_pool(tmp_path, name):
    with mpop.MpopApi(name=name, persistent=True, workers=1, worker_batch_size=1) as app:
        app.start()
        running = app.submit(write_marker, "first", str(tmp_path))
        blocker = app.submit(time.sleep, 0.5)
        queued = app.submit(write_marker, "never", str(tmp_path))
        assert app.kill_task(queued) and queued.cancelled()
        assert running.result(timeout=TIMEOUT) == "first"
        assert blocker.result(timeout=TIMEOUT) is None
    assert sorted(os.listdir(tmp_path)) == ["donefirst"]


def test_shutdown_by_name_leaves_a_creator_that_has_not_started_its_pool_alone(name):
    app = mpop.MpopApi(name=name, persistent=True, workers=1)
    try:
        app.enqueue(pow, args=(2, 3))  # the segment exists; no supervisor process took it over
        missing = mpop_cli("shutdown", name)
        assert missing.returncode == 1 and "no live persistent pool" in missing.stderr
        assert app.run().values() == [8]  # still here, and now started
    finally:
        app.shutdown()
