"""Worker lifecycle (API.md "Worker lifecycle", docs/api.md "Worker lifecycle"): initializer
and initargs, worker_state, worker_exit and exit_results(), max_worker_memory, kill_task(),
hook validation, and the Executor's ProcessPoolExecutor signature.

Handlers, initializers and exit hooks are module-level functions: workers import them by
reference (the owner's sys.path, which holds this directory, reaches every worker)."""

from __future__ import annotations

import concurrent.futures as cf
import inspect
import multiprocessing
import os
import threading
import time
from pathlib import Path

import pytest

import mpop
from mpop._errors import RemoteTraceback
from _helpers import leak_check, wait_until

METHODS = ["spawn", "fork", "forkserver"]
TIMEOUT = 60  # "finishes at all" bound, never a performance expectation


@pytest.fixture(autouse=True)
def _no_leaks():
    with leak_check():
        yield


# -- handlers and hooks (module level: workers import them) ------------------------------------

# Set in a worker by its initializer: (pid that ran it, its argument, calls in this process).
_INIT_PID: int | None = None
_INIT_ARG = None
_INIT_CALLS = 0


def record_init(log_path: str, arg) -> None:
    """An initializer: remembers that it ran in this process, and appends the pid to a file
    the test reads (one line per initializer call, across every worker process)."""
    global _INIT_PID, _INIT_ARG, _INIT_CALLS
    _INIT_PID, _INIT_ARG = os.getpid(), arg
    _INIT_CALLS += 1
    with open(log_path, "a") as f:
        f.write(f"{os.getpid()}\n")


def init_seen(x=None):
    """A task reporting this worker's pid and what its initializer left."""
    return os.getpid(), _INIT_PID, _INIT_ARG, _INIT_CALLS, x


def init_seen_slow(x, seconds=0.05):
    time.sleep(seconds)
    return init_seen(x)


def init_pids(log_path) -> list[int]:
    return [int(line) for line in Path(log_path).read_text().split()]


def bad_init(msg):
    raise ValueError(f"init exploded: {msg}")


def first_init_fails(marker: str) -> None:
    """The first worker to get here raises; the others are still in their initializer (a
    long sleep) when the failure is seen, so that the app's stop kills them mid-start."""
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        time.sleep(30)
        return
    raise ValueError("init exploded: first")


def add(a, b=0):
    return a + b


def getpid(_=None):
    return os.getpid()


def slow(x, seconds):
    time.sleep(seconds)
    return x


def count_state(x, worker_state):
    worker_state["n"] = worker_state.get("n", 0) + 1
    return os.getpid(), worker_state["n"], worker_state.get("tag"), x


def count_state_kwonly(x, *, worker_state):
    return count_state(x, worker_state)


def slot_count_state(slot, worker_state):
    worker_state["n"] = worker_state.get("n", 0) + 1
    return mpop.TaskResult(success=True, value=(int(slot.args[0]), worker_state["n"]))


def init_state(tag, worker_state):
    worker_state["tag"] = tag


def state_first(worker_state, x):  # worker_state before a positional task parameter
    return x


def echo_ordinary(x, worker_state):
    return x, worker_state


def exit_report():
    return "bye", os.getpid()


def exit_state(worker_state):
    return os.getpid(), dict(worker_state)


def exit_raises():
    raise RuntimeError(f"exit boom in {os.getpid()}")


def pid_and_count(x, worker_state):
    worker_state["n"] = worker_state.get("n", 0) + 1
    return os.getpid(), x


def hog(i, *, worker_state, nbytes=20_000_000, seconds=0.05):
    """Keeps ~20 MB (pages touched) in the worker's state, then pauses a little so that the
    worker's memory readings (every 100 ms or 64 tasks) see it grow."""
    worker_state.setdefault("blobs", []).append(bytearray(b"\x5a") * nbytes)
    time.sleep(seconds)
    return i


def mark_and_sleep(marker_dir: str, i, seconds):
    """Appends a line to `i`.started when it starts, writes `i`.done when it ends."""
    d = Path(marker_dir)
    with open(d / f"{i}.started", "a") as f:
        f.write(f"{os.getpid()}\n")
    time.sleep(seconds)
    (d / f"{i}.done").write_text("done")
    return i


def started(marker_dir, i) -> int:
    p = Path(marker_dir) / f"{i}.started"
    return len(p.read_text().split()) if p.exists() else 0


def workers_of(app) -> list[dict]:
    return app.status()["workers"]


# -- 1. initializer / initargs ------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_initializer_runs_in_every_worker_before_its_first_task(tmp_path, method):
    log = str(tmp_path / "init.log")
    with mpop.MpopApi(workers=2, start_method=method, auto_terminate=False, worker_batch_size=1,
                      initializer=record_init, initargs=(log, ("cfg", method))) as app:
        futs = [app.submit(init_seen_slow, i) for i in range(12)]
        got = [f.result(timeout=TIMEOUT) for f in futs]
        worker_pids = {w["pid"] for w in workers_of(app)}
    for pid, init_pid, arg, calls, x in got:
        assert init_pid == pid, "a task ran in a worker whose initializer had not run"
        assert arg == ("cfg", method)
        assert calls == 1
    assert [g[4] for g in got] == list(range(12))
    pids = init_pids(log)
    assert sorted(pids) == sorted(set(pids)), f"an initializer ran twice in one process: {pids}"
    assert set(pids) == worker_pids  # every worker (the two of them) ran it, nothing else did
    assert {g[0] for g in got} <= set(pids)


@pytest.mark.parametrize("method", METHODS)
def test_initializer_runs_again_in_a_replacement_after_kill_worker(tmp_path, method):
    log = str(tmp_path / "init.log")
    with mpop.MpopApi(workers=1, start_method=method, auto_terminate=False,
                      initializer=record_init, initargs=(log, 42)) as app:
        pid1, init1, arg1, calls1, _ = app.submit(init_seen).result(timeout=TIMEOUT)
        assert (init1, arg1, calls1) == (pid1, 42, 1)
        assert app.kill_worker(0)
        assert wait_until(lambda: workers_of(app)[0]["pid"] != pid1
                          and workers_of(app)[0]["state"] in ("idle", "busy"), TIMEOUT)
        pid2, init2, arg2, calls2, _ = app.submit(init_seen).result(timeout=TIMEOUT)
        assert pid2 != pid1
        assert (init2, arg2, calls2) == (pid2, 42, 1)
        assert workers_of(app)[0]["restarts"] == 1
    assert init_pids(log) == [pid1, pid2]


@pytest.mark.parametrize("method", METHODS)
def test_initializer_runs_again_in_a_recycled_worker(tmp_path, method):
    log = str(tmp_path / "init.log")
    with mpop.MpopApi(workers=1, start_method=method, auto_terminate=False, max_tasks_per_worker=2,
                      initializer=record_init, initargs=(log, "r")) as app:
        got = [app.submit(init_seen, i).result(timeout=TIMEOUT) for i in range(6)]
        w = workers_of(app)[0]
        assert w["recycled"] >= 2 and w["restarts"] == 0, f"{w}"
    task_pids = [g[0] for g in got]
    assert len(set(task_pids)) == 3, task_pids  # two tasks per process
    for pid, init_pid, arg, calls, _ in got:
        assert (init_pid, arg, calls) == (pid, "r", 1)
    pids = init_pids(log)
    assert len(pids) == len(set(pids))
    assert set(task_pids) <= set(pids)
    assert pids[:3] == list(dict.fromkeys(task_pids))


# -- 2. an initializer that raises ----------------------------------------------------------------


def _check_init_error(exc: BaseException) -> None:
    assert isinstance(exc, mpop.WorkerInitError)
    assert isinstance(exc, mpop.MpopError)
    assert "ValueError" in str(exc), str(exc)
    assert "init exploded: kaboom" in str(exc), str(exc)
    cause = exc.__cause__
    assert isinstance(cause, RemoteTraceback), repr(cause)
    assert "init exploded: kaboom" in str(cause)
    assert "bad_init" in str(cause)  # the initializer's own frame
    assert "ValueError" in str(cause)


@pytest.mark.parametrize("entry", ["submit", "run", "wait"])
@pytest.mark.parametrize("method", METHODS)
def test_initializer_that_raises(method, entry):
    app = mpop.MpopApi(workers=2, start_method=method, auto_terminate=False,
                       initializer=bad_init, initargs=("kaboom",))
    futs = []
    try:
        with pytest.raises(mpop.WorkerInitError) as ei:
            if entry == "submit":
                futs.append(app.submit(add, 1, 2))  # may raise here already
                futs[0].result(timeout=TIMEOUT)
            elif entry == "run":
                app.enqueue(add, args=(1, 2))
                app.run(timeout=TIMEOUT)
            else:
                app.enqueue(add, args=(1, 2))
                app.wait(timeout=TIMEOUT)
        _check_init_error(ei.value)
        # No respawn loop: the workers that failed are not restarted.
        time.sleep(0.5)
        for w in workers_of(app):
            assert w["restarts"] == 0, f"{w}"
            assert w["generation"] <= 1, f"{w}"
            assert w["completed"] == 0, f"{w}"
    finally:
        app.shutdown()
    for f in futs:
        assert f.done()


def test_initializer_error_seen_while_the_workers_start_keeps_its_traceback():
    # Under fork the workers fail within Supervisor.start() more often than not with
    # several of them: the WorkerInitError raised from there must carry the traceback too.
    for _ in range(10):
        app = mpop.MpopApi(workers=4, start_method="fork", auto_terminate=False,
                           initializer=bad_init, initargs=("kaboom",))
        try:
            with pytest.raises(mpop.WorkerInitError) as ei:
                app.submit(add, 1, 2).result(timeout=TIMEOUT)
            _check_init_error(ei.value)
        finally:
            app.shutdown()


@pytest.mark.parametrize("method", METHODS)
def test_initializer_error_does_not_count_stopped_siblings_as_restarts(tmp_path, method):
    # One worker's initializer raises while the other's is still running: stopping the
    # workers kills that one during its start. Nothing is replaced, so no worker counts a
    # restart (status()["workers"]: restarts are replacements) and each started once.
    app = mpop.MpopApi(workers=2, start_method=method, auto_terminate=False,
                       initializer=first_init_fails, initargs=(str(tmp_path / "first"),))
    try:
        with pytest.raises(mpop.WorkerInitError, match="init exploded: first"):
            app.submit(add, 1, 2).result(timeout=TIMEOUT)
        time.sleep(0.5)
        ws = workers_of(app)
        assert len(ws) == 2
        for w in ws:
            assert w["generation"] == 1, f"{w}"
            assert w["restarts"] == 0, f"{w}"
    finally:
        app.shutdown()


# -- 3. worker_state -----------------------------------------------------------------------------


def test_worker_state_is_per_worker_and_kept_across_tasks():
    with mpop.MpopApi(workers=1, auto_terminate=False, worker_state=True,
                      initializer=init_state, initargs=("from-init",)) as app:
        # submit
        got = [app.submit(count_state, i).result(timeout=TIMEOUT) for i in range(5)]
        pid = got[0][0]
        assert [g[1] for g in got] == [1, 2, 3, 4, 5]
        assert all(g[0] == pid and g[2] == "from-init" for g in got)
        assert [g[3] for g in got] == list(range(5))
        # keyword-only worker_state
        assert app.submit(count_state_kwonly, "k").result(timeout=TIMEOUT)[1:] == (6, "from-init", "k")
        # enqueue + run
        for i in range(4):
            app.enqueue(count_state, args=(i,))
        vals = app.run(timeout=TIMEOUT).values()
        assert [v[1] for v in vals] == [7, 8, 9, 10]
        assert [v[3] for v in vals] == list(range(4))
        # map, in chunks
        out = list(app.map(count_state, range(40), chunksize=8, timeout=TIMEOUT))
        assert [v[3] for v in out] == list(range(40))
        assert [v[1] for v in out] == list(range(11, 51))
        # a lambda and a closure, sent by value
        offset = 1000
        v = app.submit(lambda x, worker_state: (worker_state.setdefault("n", 0), x + offset), 5).result(
            timeout=TIMEOUT)
        assert v == (50, 1005)

        def closure(x, worker_state):
            worker_state["n"] += 1
            return worker_state["n"], worker_state["tag"], x + offset

        assert app.submit(closure, 1).result(timeout=TIMEOUT) == (51, "from-init", 1001)
        assert list(app.map(closure, [2, 3], timeout=TIMEOUT)) == [(52, "from-init", 1002),
                                                                   (53, "from-init", 1003)]
        # handlers without the parameter: as before
        assert app.submit(add, 2, 3).result(timeout=TIMEOUT) == 5
        assert app.submit(lambda a: a * 2, 4).result(timeout=TIMEOUT) == 8
        # still the same process, same dict
        assert app.submit(count_state, "z").result(timeout=TIMEOUT)[:3] == (pid, 54, "from-init")


def test_worker_state_in_slot_mode_handlers():
    with mpop.MpopApi(workers=1, auto_terminate=False, worker_state=True) as app:
        fn_id = app.register(slot_count_state)
        assert [f["mode"] for f in app.list_functions() if f["fn_id"] == fn_id] == ["slot"]
        for i in range(5):
            app.enqueue(fn_id=fn_id, args=(10 + i,))
        assert app.run(timeout=TIMEOUT).values() == [(10 + i, 1 + i) for i in range(5)]
        assert list(app.map(slot_count_state, [20, 21, 22], chunksize=2, timeout=TIMEOUT)) == [
            (20, 6), (21, 7), (22, 8)]


def test_worker_state_is_separate_per_worker():
    with mpop.MpopApi(workers=2, auto_terminate=False, worker_state=True, worker_batch_size=1) as app:
        futs = [app.submit(count_state, i) for i in range(20)]
        got = [f.result(timeout=TIMEOUT) for f in futs]
    by_pid: dict[int, list[int]] = {}
    for pid, n, _, _ in got:
        by_pid.setdefault(pid, []).append(n)
    for pid, ns in by_pid.items():  # each worker counts its own tasks, from 1, without gaps
        assert sorted(ns) == list(range(1, len(ns) + 1)), (pid, ns)


def test_worker_state_positional_before_task_params_is_refused():
    with mpop.MpopApi(workers=1, worker_state=True) as app:
        with pytest.raises(mpop.RegistryError):
            app.register(state_first)
        with pytest.raises(mpop.RegistryError):
            app.task(state_first)
        assert all(f["name"] != "state_first" for f in app.list_functions())


@pytest.mark.parametrize("kw", [{"worker_state": False}, {}])
def test_without_worker_state_a_parameter_of_that_name_is_ordinary(kw):
    with mpop.MpopApi(workers=1, auto_terminate=False, initializer=init_state, initargs=("x",), **kw) as app:
        # an initializer declaring worker_state is called with it only when worker_state=True
        with pytest.raises(mpop.WorkerInitError, match="worker_state"):
            app.submit(add, 1, 1).result(timeout=TIMEOUT)
    with mpop.MpopApi(workers=1, auto_terminate=False, **kw) as app:
        app.register(state_first)  # no RegistryError: an ordinary parameter
        assert app.submit(echo_ordinary, 1, "mine").result(timeout=TIMEOUT) == (1, "mine")
        assert app.submit(echo_ordinary, 2, worker_state=[3]).result(timeout=TIMEOUT) == (2, [3])
        assert app.submit(state_first, "s", 9).result(timeout=TIMEOUT) == 9
        with pytest.raises(TypeError):  # a required argument, not filled in by the worker
            app.submit(echo_ordinary, 1)


# -- 4. worker_exit and exit_results() ----------------------------------------------------------


def test_exit_results_after_shutdown():
    app = mpop.MpopApi(workers=2, auto_terminate=False, worker_exit=exit_report)
    assert app.exit_results() == []
    assert sorted(app.map(add, range(10), timeout=TIMEOUT)) == list(range(10))
    pids = {w["pid"] for w in workers_of(app)}
    assert app.exit_results() == []  # nobody retired yet
    app.shutdown()
    res = app.exit_results()
    assert len(res) == 2, res
    assert {r[1] for r in res} == pids and all(r[0] == "bye" for r in res)
    assert app.exit_results() == res  # kept


def test_exit_results_after_auto_terminated_run():
    app = mpop.MpopApi(workers=2, worker_exit=exit_report)
    try:
        for i in range(6):
            app.enqueue(add, args=(i, 1))
        assert app.run(timeout=TIMEOUT).values() == [i + 1 for i in range(6)]
        pids = {w["pid"] for w in workers_of(app)}
        res = app.exit_results()
        assert len(res) == 2 and {r[1] for r in res} == pids, (res, pids)
        # a second run starts new workers; they retire too
        app.enqueue(add, args=(1, 1))
        assert app.run(timeout=TIMEOUT).values() == [2]
        res2 = app.exit_results()
        assert len(res2) == 4 and res2[:2] == res, res2
    finally:
        app.shutdown()
    assert len(app.exit_results()) == 4  # shutdown had no workers left to retire


def test_exit_results_after_scale_down():
    app = mpop.MpopApi(workers=2, auto_terminate=False, worker_exit=exit_report)
    try:
        app.start()
        assert wait_until(lambda: len(workers_of(app)) == 2
                          and all(w["state"] == "idle" for w in workers_of(app)), TIMEOUT)
        pid_of = {w["id"]: w["pid"] for w in workers_of(app)}
        app.scale(1)
        assert wait_until(lambda: len(app.exit_results()) == 1, TIMEOUT)
        assert app.exit_results() == [("bye", pid_of[1])]  # the retired worker's value
        assert app.submit(add, 1, 1).result(timeout=TIMEOUT) == 2
    finally:
        app.shutdown()
    assert app.exit_results() == [("bye", pid_of[1]), ("bye", pid_of[0])]


def test_exit_results_after_recycling_with_worker_state():
    app = mpop.MpopApi(workers=1, auto_terminate=False, max_tasks_per_worker=3, worker_state=True,
                       worker_exit=exit_state)
    try:
        got = [app.submit(pid_and_count, i).result(timeout=TIMEOUT) for i in range(7)]
    finally:
        app.shutdown()
    task_pids = list(dict.fromkeys(p for p, _ in got))
    assert len(task_pids) == 3, got  # 3 + 3 + 1 tasks
    res = app.exit_results()
    # two recycled workers, then the last one at shutdown, in retirement order
    assert res == [(task_pids[0], {"n": 3}), (task_pids[1], {"n": 3}), (task_pids[2], {"n": 1})], res


def test_exception_in_worker_exit_is_reported():
    app = mpop.MpopApi(workers=1, auto_terminate=False, worker_exit=exit_raises)
    try:
        pid = app.submit(getpid).result(timeout=TIMEOUT)
    finally:
        app.shutdown()
    res = app.exit_results()
    assert len(res) == 1, res
    err = res[0]
    assert isinstance(err, RuntimeError), repr(err)
    assert str(err) == f"exit boom in {pid}"
    assert isinstance(err.__cause__, RemoteTraceback), repr(err.__cause__)
    assert "exit boom" in str(err.__cause__) and "exit_raises" in str(err.__cause__)


def test_killed_workers_do_not_retire():
    app = mpop.MpopApi(workers=1, auto_terminate=False, worker_exit=exit_report)
    try:
        pid1 = app.submit(getpid).result(timeout=TIMEOUT)
        assert app.kill_worker(0)
        assert wait_until(lambda: workers_of(app)[0]["pid"] != pid1
                          and workers_of(app)[0]["state"] in ("idle", "busy"), TIMEOUT)
        pid2 = app.submit(getpid).result(timeout=TIMEOUT)
        assert pid2 != pid1
        assert app.exit_results() == []
    finally:
        app.shutdown()
    assert app.exit_results() == [("bye", pid2)]


def test_shutdown_without_wait_gives_no_exit_results():
    app = mpop.MpopApi(workers=2, auto_terminate=False, worker_exit=exit_report)
    try:
        assert app.submit(add, 1, 1).result(timeout=TIMEOUT) == 2
    finally:
        app.shutdown(wait=False)
    assert app.exit_results() == []


# -- 5. max_worker_memory ------------------------------------------------------------------------


def test_max_worker_memory_recycles_without_failing_tasks():
    with mpop.MpopApi(workers=1, auto_terminate=False, worker_state=True, max_worker_memory="100MB") as app:
        assert app.config["max_worker_memory"] == 100_000_000
        futs = [app.submit(hog, i) for i in range(16)]
        assert [f.result(timeout=TIMEOUT) for f in futs] == list(range(16))
        st = app.status()
        w = st["workers"][0]
        assert w["recycled"] >= 1, f"{w}"
        assert w["restarts"] == 0, f"{w}"
        assert w["failed"] == 0, f"{w}"
        assert w["completed"] == 16, f"{w}"
        assert st["queue"]["retries"] == 0, st["queue"]
        assert st["queue"]["crashes"] == 0, st["queue"]


@pytest.mark.parametrize("bad", ["12 parsecs", 0, 1000, -5, "0.5MiB", "MB", 1.5e9, True])
def test_max_worker_memory_bad_values(bad):
    with pytest.raises(mpop.ConfigError, match="max_worker_memory"):
        mpop.MpopApi(workers=1, max_worker_memory=bad)


@pytest.mark.parametrize("value, expected", [
    ("150MB", 150_000_000), ("1GiB", 2**30), ("512MiB", 512 * 2**20), ("2GB", 2_000_000_000),
    (2**20, 2**20), (None, None),
])
def test_max_worker_memory_units(value, expected):
    app = mpop.MpopApi(workers=1, max_worker_memory=value)
    assert app.config["max_worker_memory"] == expected
    app.shutdown()


# -- 6. kill_task ---------------------------------------------------------------------------------


def test_kill_task_running(tmp_path):
    d = str(tmp_path)
    with mpop.MpopApi(workers=2, auto_terminate=False, worker_batch_size=1) as app:
        futs = [app.submit(mark_and_sleep, d, i, 0.6) for i in range(6)]
        target = futs[1]
        assert wait_until(lambda: started(d, 1) == 1, TIMEOUT)
        assert not target.done()
        assert target.cancel() is False  # concurrent.futures meaning: running tasks only
        assert not target.cancelled()
        assert app.kill_task(target) is True
        assert target.done() and target.cancelled()
        with pytest.raises(cf.CancelledError):
            target.result(timeout=0)
        others = [f for i, f in enumerate(futs) if i != 1]
        assert [f.result(timeout=TIMEOUT) for f in others] == [0, 2, 3, 4, 5]
        assert not (tmp_path / "1.done").exists()
        assert started(d, 1) == 1  # not re-run
        assert all(started(d, i) == 1 for i in (0, 2, 3, 4, 5))
        # the killed worker was replaced, and the app keeps working
        assert wait_until(lambda: sum(w["restarts"] for w in workers_of(app)) == 1, TIMEOUT)
        assert app.submit(add, 2, 2).result(timeout=TIMEOUT) == 4
        assert app.kill_task(target) is False  # already done


def test_kill_task_queued_never_runs(tmp_path):
    d = str(tmp_path)
    with mpop.MpopApi(workers=1, auto_terminate=False, worker_batch_size=1) as app:
        blocker = app.submit(mark_and_sleep, d, "blocker", 0.8)
        assert wait_until(lambda: started(d, "blocker") == 1, TIMEOUT)
        target = app.submit(mark_and_sleep, d, "target", 0.0)
        after = app.submit(add, 3, 4)
        assert app.kill_task(target) is True
        assert target.cancelled()
        assert blocker.result(timeout=TIMEOUT) == "blocker"
        assert after.result(timeout=TIMEOUT) == 7
        assert app.wait(timeout=TIMEOUT)
        assert started(d, "target") == 0  # it never ran
        assert started(d, "blocker") == 1
        w = workers_of(app)[0]
        assert w["restarts"] == 0, w  # nothing was killed for a queued task


def test_kill_task_on_finished_or_foreign_futures():
    with mpop.MpopApi(workers=1, auto_terminate=False, worker_batch_size=1) as app, \
            mpop.MpopApi(workers=1, auto_terminate=False, worker_batch_size=1) as other:
        done = app.submit(add, 1, 2)
        assert done.result(timeout=TIMEOUT) == 3
        assert app.kill_task(done) is False
        assert not done.cancelled() and done.result() == 3

        foreign = other.submit(slow, "theirs", 0.5)
        assert app.kill_task(foreign) is False
        assert foreign.result(timeout=TIMEOUT) == "theirs"

        plain = cf.Future()
        assert app.kill_task(plain) is False
        assert not plain.done()
        plain.set_result(1)
        assert app.kill_task(plain) is False

        assert workers_of(app)[0]["restarts"] == 0
        assert workers_of(other)[0]["restarts"] == 0


# -- 7. Executor signature -------------------------------------------------------------------------


def test_executor_signature_matches_process_pool_executor():
    sig = inspect.signature(mpop.Executor)
    params = list(sig.parameters.values())
    P = inspect.Parameter
    expected = [("max_workers", P.POSITIONAL_OR_KEYWORD, None), ("mp_context", P.POSITIONAL_OR_KEYWORD, None),
                ("initializer", P.POSITIONAL_OR_KEYWORD, None), ("initargs", P.POSITIONAL_OR_KEYWORD, ()),
                ("max_tasks_per_child", P.KEYWORD_ONLY, None)]
    assert [(p.name, p.kind, p.default) for p in params[:5]] == expected
    assert len(params) == 6 and params[5].kind is P.VAR_KEYWORD
    ppe = inspect.signature(cf.ProcessPoolExecutor).parameters
    for name, p in ppe.items():  # every ProcessPoolExecutor parameter, same kind and default
        assert name in sig.parameters, name
        q = sig.parameters[name]
        assert (q.kind, q.default) == (p.kind, p.default), name


def test_executor_mp_context_object_and_name(tmp_path):
    log = str(tmp_path / "init.log")
    with mpop.Executor(1, multiprocessing.get_context("fork"), record_init, (log, "ex")) as ex:
        assert ex.app.config["start_method"] == "fork"
        pid, init_pid, arg, calls, _ = ex.submit(init_seen).result(timeout=TIMEOUT)
        assert (init_pid, arg, calls) == (pid, "ex", 1) and pid != os.getpid()
    with mpop.Executor(max_workers=1, mp_context="forkserver") as ex:
        assert ex.app.config["start_method"] == "forkserver"
        assert list(ex.map(add, [1, 2], [10, 20], timeout=TIMEOUT)) == [11, 22]
    with mpop.Executor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as ex:
        assert ex.app.config["start_method"] == "spawn"
        assert ex.submit(add, 1, 1).result(timeout=TIMEOUT) == 2


def test_executor_initializer_and_max_tasks_per_child(tmp_path):
    log = str(tmp_path / "init.log")
    with mpop.Executor(max_workers=1, initializer=record_init, initargs=(log, 7),
                       max_tasks_per_child=2) as ex:
        assert ex.app.config["max_tasks_per_worker"] == 2
        got = [ex.submit(init_seen, i).result(timeout=TIMEOUT) for i in range(4)]
    assert all((g[1], g[2], g[3]) == (g[0], 7, 1) for g in got)
    task_pids = list(dict.fromkeys(g[0] for g in got))
    assert len(task_pids) == 2, got
    assert init_pids(log) == task_pids


def test_executor_both_names_of_one_setting():
    with pytest.raises(mpop.ConfigError):
        mpop.Executor(max_workers=1, mp_context="fork", start_method="spawn")
    with pytest.raises(mpop.ConfigError):
        mpop.Executor(max_workers=1, mp_context=multiprocessing.get_context("fork"), start_method="fork")
    with pytest.raises(mpop.ConfigError):
        mpop.Executor(max_workers=1, max_tasks_per_child=2, max_tasks_per_worker=3)


# -- 8. bad hooks --------------------------------------------------------------------------------


def test_hooks_that_are_not_callable():
    with pytest.raises(mpop.ConfigError, match="initializer"):
        mpop.MpopApi(workers=1, initializer=5)
    with pytest.raises(mpop.ConfigError, match="initializer"):
        mpop.MpopApi(workers=1, initializer="record_init")
    with pytest.raises(mpop.ConfigError, match="worker_exit"):
        mpop.MpopApi(workers=1, worker_exit=object())
    with pytest.raises(mpop.ConfigError, match="initializer"):
        mpop.Executor(max_workers=1, initializer=5)


@pytest.mark.parametrize("initargs", [5, "ab", None, {"a": 1}])
def test_initargs_not_a_tuple(initargs):
    with pytest.raises(mpop.ConfigError, match="initargs"):
        mpop.MpopApi(workers=1, initializer=record_init, initargs=initargs)


def test_hooks_that_cannot_be_pickled():
    lock = threading.Lock()

    def init_with_lock():
        with lock:
            pass

    def exit_with_lock():
        return lock.locked()

    with pytest.raises(mpop.ConfigError):
        mpop.MpopApi(workers=1, initializer=init_with_lock)
    with pytest.raises(mpop.ConfigError):
        mpop.MpopApi(workers=1, worker_exit=exit_with_lock)
    with pytest.raises(mpop.ConfigError):
        mpop.MpopApi(workers=1, initializer=record_init, initargs=("x", lock))
    with pytest.raises(mpop.ConfigError):
        mpop.Executor(max_workers=1, initializer=init_with_lock)


# -- failures every waiter sees, and hooks that end oddly ------------------------------------


def test_every_waiter_sees_an_initializer_failure():
    app = mpop.MpopApi(workers=1, initializer=bad_init, initargs=("boom",))
    try:
        futs = [app.submit(add, i) for i in range(3)]
        # concurrent.futures.wait drains and checks nothing itself: the futures end anyway.
        done, not_done = cf.wait(futs, timeout=60)
        assert not not_done
        for f in futs:
            with pytest.raises(mpop.WorkerInitError, match="ValueError: init exploded: boom"):
                f.result(timeout=60)
    finally:
        app.shutdown()


def non_ascii_init():
    raise ValueError("データ" * 600)  # far past the worker record's 4 KiB, in multi-byte characters


def test_a_long_non_ascii_initializer_error_arrives_as_worker_init_error():
    app = mpop.MpopApi(workers=1, initializer=non_ascii_init)
    try:
        with pytest.raises(mpop.WorkerInitError, match="ValueError: データ") as info:
            app.submit(add, 1).result(timeout=60)
        assert "データ" in str(info.value.__cause__)
    finally:
        app.shutdown()


def exit_returns_an_exception():
    return KeyError("returned, not raised")


def exit_calls_sys_exit():
    raise SystemExit(7)


def test_worker_exit_returning_an_exception_or_calling_sys_exit():
    with mpop.MpopApi(workers=1, worker_exit=exit_returns_an_exception) as app:
        app.submit(add, 1).result(timeout=60)
    (value,) = app.exit_results()
    assert isinstance(value, KeyError) and value.__cause__ is None  # a value like any other
    with mpop.MpopApi(workers=1, worker_exit=exit_calls_sys_exit) as app:
        app.submit(add, 1).result(timeout=60)
    (value,) = app.exit_results()
    assert isinstance(value, SystemExit) and value.code == 7
    assert isinstance(value.__cause__, RemoteTraceback)
