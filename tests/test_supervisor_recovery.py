"""Supervisor recovery of persistent pools: when the supervisor process dies (SIGKILL), the
workers run on; a new supervisor (started by a handle that notices, by mpop.attach, or by
`python -m mpop supervise NAME`) adopts the live ones by pid and start time, recovers those
that died meanwhile, and every task ends with exactly one result. With no supervisor back
within orphan_timeout, the workers exit and the last one out removes the segment."""

from __future__ import annotations

import contextlib
import os
import signal
import textwrap
import time

import pytest

import mpop
from _helpers import REPO, leak_check, pid_alive, pool_name_fixture, run_python, wait_until

TIMEOUT = 60.0


@pytest.fixture(autouse=True)
def _no_leaks():
    with leak_check():
        yield


name = pool_name_fixture("mpop-rtest")


def nap(i, delay=0.01):
    time.sleep(delay)
    return i


def all_idle(app, n: int) -> bool:
    workers = app.status()["workers"]
    return len(workers) == n and all(w["state"] == "idle" and w["pid"] for w in workers)


def worker_pids(app) -> list[int]:
    return [w["pid"] for w in app.status()["workers"]]


def kill_supervisor(app) -> int:
    pid = app.status()["supervisor"]["pid"]
    os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: not pid_alive(pid), 10)
    return pid


def test_orphan_timeout_must_be_a_positive_number():
    for bad in (0, -1, float("nan"), "60", True):
        with pytest.raises(mpop.ConfigError, match="orphan_timeout must be a number of seconds > 0"):
            mpop.MpopApi(name="x", persistent=True, orphan_timeout=bad)


def test_workers_outlive_their_supervisor_and_a_new_one_adopts_them(name):
    app = mpop.MpopApi(name=name, persistent=True, workers=2)
    app.start()
    try:
        assert wait_until(lambda: all_idle(app, 2), 20)
        pids = worker_pids(app)
        for i in range(300):
            app.enqueue(nap, args=(i,), tsk_id=i)
        futures = [app.submit(nap, 1000 + i) for i in range(50)]
        old = kill_supervisor(app)
        time.sleep(0.3)
        assert all(pid_alive(p) for p in pids)  # they ran on meanwhile
        # This handle notices and starts a new supervisor, which adopts the same processes.
        assert [f.result(timeout=TIMEOUT) for f in futures] == [1000 + i for i in range(50)]
        got = sorted(r.tsk_id for r in app.results(timeout=TIMEOUT))
        assert got == list(range(300))
        st = app.status()
        assert st["supervisor"]["alive"] and st["supervisor"]["pid"] != old
        assert worker_pids(app) == pids
        assert app.submit(nap, 7).result(timeout=TIMEOUT) == 7
    finally:
        app.shutdown()


def test_a_worker_that_dies_while_no_supervisor_watches_is_recovered(name):
    app = mpop.MpopApi(name=name, persistent=True, workers=2)
    app.start()
    try:
        assert wait_until(lambda: all_idle(app, 2), 20)
        futures = [app.submit(nap, i, 0.05) for i in range(40)]
        assert wait_until(lambda: any(w["running_seq"] for w in app.status()["workers"]), 10)
        kill_supervisor(app)
        busy = next(w for w in app.status()["workers"] if w["running_seq"])
        os.kill(busy["pid"], signal.SIGKILL)  # with a task running and more in its local queue
        assert wait_until(lambda: not pid_alive(busy["pid"]), 10)
        out = run_python(["-m", "mpop", "supervise", name])
        assert out.returncode == 0, out.stderr
        assert "a new supervisor process took over" in out.stdout
        assert [f.result(timeout=TIMEOUT) for f in futures] == list(range(40))
        replaced = next(w for w in app.status()["workers"] if w["id"] == busy["id"])
        assert replaced["pid"] != busy["pid"] and replaced["generation"] == busy["generation"] + 1
    finally:
        app.shutdown()


def test_attach_starts_a_new_supervisor_for_a_pool_whose_supervisor_and_creator_died(tmp_path, name):
    script = tmp_path / "creator.py"
    script.write_text(textwrap.dedent(f"""
        import os, signal, sys, time
        sys.path.insert(0, {str(REPO / "tests")!r})
        import mpop
        from test_supervisor_recovery import nap
        app = mpop.MpopApi(name={name!r}, persistent=True, workers=2)
        app.start()
        for i in range(200):
            app.enqueue(nap, args=(i,), tsk_id=i)
        # (while the workers may still be starting)
        os.kill(app.status()["supervisor"]["pid"], signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)
    """))
    proc = run_python([str(script)])
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    b = mpop.attach(name, timeout=10)
    try:
        got = [r.tsk_id for r in b.results(timeout=TIMEOUT)]
        assert sorted(got) == list(range(200))
    finally:
        b.shutdown()


# The supervisor's protocol steps a test can make it die at (FaultStep in fault.hpp).
SPAWNED, TOOK_OVER, ADOPTING = 20, 21, 22
FORWARD_READ, FORWARD_MID_PUSH, FORWARD_PUSHED = 23, 24, 25
RECOVERING, RECOVERED, KILLED_WORKER = 26, 27, 28


def processes_of(name: str) -> list[int]:
    """Live processes whose command line names the pool: its supervisor and its workers."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if name.encode() in f.read() and pid_alive(int(entry)):
                        found.append(int(entry))
            except OSError:
                pass
    return found


def settled(app, name: str, n: int) -> bool:
    """n idle workers, a live supervisor, and no other process of the pool."""
    st = app.status()
    return (all_idle(app, n) and st["supervisor"]["alive"]
            and sorted(processes_of(name)) == sorted([st["supervisor"]["pid"], *worker_pids(app)]))


@contextlib.contextmanager
def idle_pool(name: str, workers: int = 2, **options):
    """A persistent pool with its workers idle, and its segment; shut down after."""
    app = mpop.MpopApi(name=name, persistent=True, workers=workers, **options)
    app.start()
    try:
        assert wait_until(lambda: all_idle(app, workers), 20)
        yield app, app._lifecycle.runtime.segment
    finally:
        app.shutdown()


def queue_work(app, n: int, delay: float) -> list:
    """n enqueued tasks (tsk_id 0..n-1) and n submitted ones (values 1000..); their futures."""
    for i in range(n):
        app.enqueue(nap, args=(i, delay), tsk_id=i)
    return [app.submit(nap, 1000 + i, delay) for i in range(n)]


def assert_each_result_once(app, futures: list, n: int) -> None:
    assert [f.result(timeout=TIMEOUT) for f in futures] == [1000 + i for i in range(n)]
    assert sorted(r.tsk_id for r in app.results(timeout=TIMEOUT)) == list(range(n))


def test_a_supervisor_killed_between_starting_a_worker_and_recording_it(name):
    with idle_pool(name) as (app, segment):
        victim = worker_pids(app)[0]
        futures = queue_work(app, 100, 0.01)
        segment.inject_fault(SPAWNED, 1)
        os.kill(victim, signal.SIGKILL)  # the supervisor starts a replacement and dies
        assert wait_until(lambda: not segment.fault_pending, 20), "the armed fault never fired"
        # The handle notices and starts a new supervisor; the process the dead one started
        # either filled in its record itself (and is adopted) or finds it given up (and leaves).
        assert_each_result_once(app, futures, 100)
        assert wait_until(lambda: settled(app, name, 2), 20), (app.status(), processes_of(name))
        assert app.submit(nap, 7).result(timeout=TIMEOUT) == 7


@pytest.mark.parametrize("step", [TOOK_OVER, ADOPTING], ids=["took-over", "adopting"])
def test_a_new_supervisor_killed_while_it_takes_over(name, step):
    with idle_pool(name) as (app, segment):
        pids = worker_pids(app)
        futures = queue_work(app, 200, 0.01)
        segment.inject_fault(step, 1)
        kill_supervisor(app)
        # The next supervisor dies at `step`; the one after it finishes the takeover.
        assert_each_result_once(app, futures, 200)
        assert not segment.fault_pending, "the armed fault never fired"
        assert wait_until(lambda: settled(app, name, 2), 20), (app.status(), processes_of(name))
        assert worker_pids(app) == pids  # adopted, not replaced


@pytest.mark.parametrize("step", [FORWARD_READ, FORWARD_MID_PUSH, FORWARD_PUSHED],
                         ids=["after-read", "mid-push", "after-push"])
def test_a_supervisor_killed_while_it_forwards_results(name, step):
    with idle_pool(name) as (app, segment):
        first = app.status()["supervisor"]["pid"]
        segment.inject_fault(step, 7)  # a few batches in
        futures = queue_work(app, 400, 0.001)
        # The forwarder dies with a batch half forwarded; the next supervisor's forwarder
        # finishes it, and each result reaches this handle once.
        assert_each_result_once(app, futures, 400)
        assert not segment.fault_pending, "the armed fault never fired"
        assert not pid_alive(first) and app.status()["supervisor"]["pid"] != first
        assert wait_until(lambda: settled(app, name, 2), 20), (app.status(), processes_of(name))
        assert app.submit(nap, 7).result(timeout=TIMEOUT) == 7


@pytest.mark.parametrize("step", [RECOVERING, RECOVERED], ids=["mid-recovery", "before-replacement"])
def test_a_supervisor_killed_while_it_recovers_a_dead_worker(name, step):
    with idle_pool(name, worker_batch_size=8) as (app, segment):
        first = app.status()["supervisor"]["pid"]
        futures = queue_work(app, 150, 0.02)
        # A worker with a task running and more claimed behind it in its local queue.
        assert wait_until(lambda: any(w["running_seq"] and w["local_queue"] > 2 for w in app.status()["workers"]), 20)
        victim = next(w for w in app.status()["workers"] if w["running_seq"] and w["local_queue"] > 2)
        segment.inject_fault(step, 1)
        os.kill(victim["pid"], signal.SIGKILL)
        # The supervisor dies recovering it; the next one finishes the recovery from the
        # worker's record, and the replacement runs what the dead worker left.
        assert_each_result_once(app, futures, 150)
        assert not segment.fault_pending, "the armed fault never fired"
        assert not pid_alive(first)
        assert wait_until(lambda: settled(app, name, 2), 20), (app.status(), processes_of(name))
        replaced = next(w for w in app.status()["workers"] if w["id"] == victim["id"])
        assert replaced["pid"] != victim["pid"]
        assert app.submit(nap, 7).result(timeout=TIMEOUT) == 7


def mark_and_sleep(path: str, delay: float) -> int:
    with open(path, "a") as f:
        f.write("run\n")
    time.sleep(delay)
    return 1


def runs_of(path) -> int:
    return path.read_text().count("run") if path.exists() else 0


@pytest.mark.parametrize("step", [KILLED_WORKER, RECOVERING], ids=["after-the-kill", "after-settling"])
def test_a_supervisor_killed_while_it_times_a_task_out(tmp_path, name, step):
    # after-the-kill: it signals the worker and dies before it sees the death; the next one
    # still ends that task timed out (the record says which task the kill was for), not
    # retried. after-settling: it decides the task timed out in the dead worker's local
    # queue and dies before the result is out; the replacement posts it.
    marker = tmp_path / "runs"
    with idle_pool(name, workers=1, task_timeout=0.5, worker_batch_size=1) as (app, segment):
        first = app.status()["supervisor"]["pid"]
        segment.inject_fault(step, 1)
        slow = app.submit(mark_and_sleep, str(marker), 30.0)
        with pytest.raises(mpop.TaskTimeoutError):
            slow.result(timeout=TIMEOUT)
        assert not segment.fault_pending, "the armed fault never fired"
        assert not pid_alive(first)
        assert runs_of(marker) == 1
        assert app.submit(nap, 7).result(timeout=TIMEOUT) == 7
        assert wait_until(lambda: settled(app, name, 1), 20), (app.status(), processes_of(name))


def test_supervise_says_so_when_the_supervisor_is_alive_and_fails_for_an_unknown_pool(name):
    app = mpop.MpopApi(name=name, persistent=True, workers=1)
    app.start()
    try:
        out = run_python(["-m", "mpop", "supervise", name])
        assert out.returncode == 0 and "has a live supervisor already" in out.stdout
    finally:
        app.shutdown()
    out = run_python(["-m", "mpop", "supervise", name])
    assert out.returncode == 1 and f"no persistent pool named {name!r}" in out.stderr


def test_with_no_supervisor_back_in_time_the_workers_leave_and_remove_the_pool(name):
    app = mpop.MpopApi(name=name, persistent=True, workers=2, orphan_timeout=1.0)
    app.start()
    assert wait_until(lambda: all_idle(app, 2), 20)
    segment, pids = app.segment_name, worker_pids(app)
    supervisor = app.status()["supervisor"]["pid"]
    app.detach()
    os.kill(supervisor, signal.SIGKILL)
    time.sleep(0.3)
    assert all(pid_alive(p) for p in pids)
    # cleanup leaves a pool whose workers wait for a new supervisor alone
    out = run_python(["-m", "mpop", "cleanup"])
    assert out.returncode == 0, out.stderr
    assert os.path.exists(f"/dev/shm/{segment}")
    assert wait_until(lambda: not any(pid_alive(p) for p in pids), 10)
    assert wait_until(lambda: not os.path.exists(f"/dev/shm/{segment}"), 10)
    with pytest.raises(mpop.MpopError, match="no live persistent pool"):
        mpop.attach(name)
