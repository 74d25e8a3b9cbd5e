"""Worker death at every step of the protocol costs nothing but the task it was running.

Each test arms the native fault switch so that exactly one worker SIGKILLs itself at one
step, runs work through it, and checks every task ended with exactly one correct result."""

from __future__ import annotations

import os
import random
import signal
import threading
import time

import pytest

import mpop
from mpop._workloads import light

STEPS = {
    1: "claim window raised, dequeue CAS not done",
    2: "cells claimed, nothing copied",
    3: "claim partly copied into the local queue",
    4: "claim copied, ring cells not released",
    5: "task marked running, handler not called",
    6: "handler returned, result not published",
    7: "result cell reserved, not written",
    8: "result published, task not marked done",
    9: "idle, about to sleep",
    10: "pooled result block written, not published",
    11: "publication window raised, result cell not reserved",
    12: "pooled result block taken, not yet recorded",
    13: "result published, publication window not closed",
}


def big(x: int) -> str:
    return "x" * 1000 + str(x)


def pid_of(_: int) -> int:
    return os.getpid()


@pytest.mark.parametrize("step", sorted(STEPS), ids=lambda s: STEPS[s].split(",")[0].replace(" ", "-"))
def test_worker_killed_at_each_step_loses_nothing(step):
    fn = big if step in (10, 11, 12, 13) else light
    with mpop.MpopApi(workers=2, auto_terminate=False, max_retries=1) as app:
        app.start()
        assert list(app.map(light, range(50))) == [light(i) for i in range(50)]  # both warm
        seg = app._lifecycle.runtime.segment
        seg.inject_fault(step, 3)
        if step == 9:
            deadline = time.monotonic() + 10
            while seg.fault_pending and time.monotonic() < deadline:
                time.sleep(0.05)
        # enqueue()d tasks, so that workers claim ranges of several (map() sends chunks
        # that are claimed alone).
        n = 5000
        for i in range(n):
            app.enqueue(fn, args=(i,))
        values = app.run().values()
        assert values == [fn(i) for i in range(n)]
        assert not seg.fault_pending, "the armed fault never fired"
        status = app.status()
        assert status["queue"]["crashes"] == 1
        assert sum(w["restarts"] for w in status["workers"]) == 1
        # A replacement was started and works.
        assert len(set(app.map(pid_of, range(200)))) >= 1
        assert status["queue"]["in_flight"] == 0
        # Whatever the dead worker held in the argument pool came back.
        assert status["queue"]["pool_used_bytes"] == 0


def test_claim_window_death_recovers_claimed_cells_from_the_ring():
    with mpop.MpopApi(workers=2, auto_terminate=False, worker_batch_size=16) as app:
        app.start()
        list(app.map(light, range(50)))
        app._lifecycle.runtime.segment.inject_fault(2, 2)  # dies holding a whole claimed range
        for i in range(3000):
            app.enqueue(light, args=(i,))
        assert app.run().values() == [light(i) for i in range(3000)]
        assert app.status()["queue"]["recovered_from_ring"] >= 1


def test_running_task_is_charged_pending_tasks_are_not():
    # A worker dies before running a task: that task is charged one attempt (retried),
    # the tasks it had claimed but not started go back uncharged.
    with mpop.MpopApi(workers=1, auto_terminate=False, worker_batch_size=8, max_retries=1) as app:
        app.start()
        list(app.map(light, range(10)))
        app._lifecycle.runtime.segment.inject_fault(5, 1)
        for i in range(8):
            app.enqueue(light, args=(i,), tsk_id=i)
        result = app.run()
        assert [r.value for r in result.results] == [light(i) for i in range(8)]
        attempts = sorted(r.attempts for r in result.results)
        assert attempts == [1] * 7 + [2]
        assert result.stats["retries"] == 1


def test_stress_random_sigkills_during_a_long_run():
    # A kill every 30 ms against chunks of about 20 ms: a chunk may be killed several times
    # in a row (more often on a loaded machine), so the retries are ample; what is checked
    # is that every item comes back exactly once.
    n = 200_000
    kills = 0
    with mpop.MpopApi(workers=2, auto_terminate=False, max_retries=50, start_method="fork") as app:
        app.start()
        stop = threading.Event()

        def killer():
            nonlocal kills
            rng = random.Random(1)
            while not stop.wait(0.03):
                live = [w for w in app.status()["workers"] if w["state"] in ("idle", "busy")]
                if live:
                    try:
                        os.kill(rng.choice(live)["pid"], signal.SIGKILL)
                        kills += 1
                    except ProcessLookupError:
                        pass

        t = threading.Thread(target=killer)
        t.start()
        try:
            values = list(app.map(light, range(n)))
        finally:
            stop.set()
            t.join()
        assert values == [light(i) for i in range(n)]
        q = app.status()["queue"]
        assert q["finished"] == q["submitted"]
    assert kills >= 10


def test_poison_task_fails_alone_and_the_app_keeps_serving():
    def poison(x):
        if x == 3:
            os._exit(7)
        return x * 2

    with mpop.MpopApi(workers=2, max_retries=2, auto_terminate=False) as app:
        futs = [app.submit(poison, i) for i in range(8)]
        for i, f in enumerate(futs):
            if i == 3:
                with pytest.raises(mpop.WorkerCrashedError, match="died while running it, 3 time"):
                    f.result(timeout=60)
            else:
                assert f.result(timeout=60) == i * 2
        assert app.submit(poison, 10).result(timeout=60) == 20
        assert app.status()["queue"]["crashes"] == 3


def test_task_timeout_kills_the_worker_and_fails_only_that_task():
    def slow(x):
        time.sleep(x)
        return x

    with mpop.MpopApi(workers=2, task_timeout=0.5, auto_terminate=False) as app:
        slow_f = app.submit(slow, 30)
        quick = [app.submit(slow, 0.01) for _ in range(10)]
        with pytest.raises(mpop.TaskTimeoutError, match="task_timeout=0.5"):
            slow_f.result(timeout=60)
        assert isinstance(slow_f.exception(), TimeoutError)
        assert [f.result(timeout=60) for f in quick] == [0.01] * 10
        assert app.status()["queue"]["timeouts"] == 1
        assert app.submit(slow, 0).result(timeout=60) == 0  # a replacement serves


def test_max_tasks_per_worker_recycles_without_losing_tasks():
    with mpop.MpopApi(workers=2, max_tasks_per_worker=25) as app:
        pids = list(app.map(pid_of, range(400)))
        assert len(pids) == 400
        assert len(set(pids)) >= 400 // 25
        assert app.status()["queue"]["crashes"] == 0


def test_kill_worker_admin_call():
    with mpop.MpopApi(workers=2, auto_terminate=False) as app:
        app.start()
        list(app.map(light, range(20)))
        before = {w["id"]: w["pid"] for w in app.status()["workers"]}
        assert app.kill_worker(0)
        assert not app.kill_worker(99)
        assert list(app.map(light, range(2000))) == [light(i) for i in range(2000)]
        after = {w["id"]: w["pid"] for w in app.status()["workers"]}
        assert after[0] != before[0]
