"""run(): the RunResult it returns, enqueue_callback, auto_terminate, timeout and progress."""

from __future__ import annotations

import json
import re
import time

import pytest

from mpop import MpopApi, ProcTaskFnID, RunResult, TaskResult
from _helpers import leak_check, pid_alive, run_python, wait_until


@pytest.fixture(autouse=True)
def _no_leaks():
    with leak_check():
        yield


def jittery(x: int) -> int:
    # Uneven task lengths so that completion order differs from enqueue order.
    if x % 7 == 0:
        time.sleep(0.01)
    return x * 2


def fails_on_three(x: int) -> int:
    if x == 3:
        raise ValueError(f"bad item {x}")
    return x


def sleepy(seconds: float, value: int) -> int:
    time.sleep(seconds)
    return value


LIVE = ("idle", "busy")


def test_results_in_enqueue_order_with_labels_and_seqs():
    labels = [1000 - i for i in range(200)]  # deliberately decreasing user labels
    with MpopApi(workers=2) as app:
        for i, label in enumerate(labels):
            app.enqueue(jittery, args=(i,), tsk_id=label)
        result = app.run()
    assert isinstance(result, RunResult)
    assert all(isinstance(r, TaskResult) for r in result.results)
    assert [r.tsk_id for r in result.results] == labels
    seqs = [r.seq for r in result.results]
    assert seqs == sorted(seqs) and len(set(seqs)) == 200
    assert result.values() == [2 * i for i in range(200)]
    assert all(r.success and r.error is None and r.attempts >= 1 for r in result.results)
    assert {r.worker_id for r in result.results} <= {0, 1}
    assert len(result) == 200


def test_default_tsk_ids_increase():
    with MpopApi(workers=1) as app:
        for i in range(5):
            app.enqueue(fn_id=ProcTaskFnID.ADD, args=(i, i))
        result = app.run()
    ids = [r.tsk_id for r in result.results]
    assert ids == sorted(ids) and len(set(ids)) == 5
    assert result.values() == [0, 2, 4, 6, 8]


def test_by_tsk_id_failures_values_and_exit_code():
    with MpopApi(workers=2) as app:
        for i in range(6):
            app.enqueue(fails_on_three, args=(i,), tsk_id=10 + i)
        result = app.run()
    assert result.exit_code == 1
    assert [r.tsk_id for r in result.failures] == [13]
    failure = result.failures[0]
    assert failure.success is False
    assert isinstance(failure.error, ValueError) and "bad item 3" in str(failure.error)
    with pytest.raises(ValueError, match="bad item 3"):
        failure.get()
    with pytest.raises(ValueError, match="bad item 3"):
        result.values()
    by = result.by_tsk_id
    assert set(by) == {10, 11, 12, 13, 14, 15}
    assert by[14].value == 4 and by[14].get() == 4 and by[14].success
    assert result.stats["tasks"] == 6


def test_exit_code_zero_and_stats():
    with MpopApi(workers=2) as app:
        for i in range(50):
            app.enqueue(fn_id=ProcTaskFnID.MULTIPLY, args=(i, 3))
        result = app.run()
        worker_ids = {w["id"] for w in app.status()["workers"]}
    assert result.exit_code == 0
    stats = result.stats
    for key in ("tasks", "elapsed_s", "tasks_per_s", "per_worker", "retries", "crashes"):
        assert key in stats, key
    assert stats["tasks"] == 50
    assert stats["elapsed_s"] > 0
    assert stats["tasks_per_s"] == pytest.approx(50 / stats["elapsed_s"])
    assert sum(stats["per_worker"].values()) == 50
    assert set(stats["per_worker"]) <= worker_ids
    assert stats["retries"] == 0 and stats["crashes"] == 0


def test_empty_run_returns_empty_result():
    with MpopApi(workers=1) as app:
        result = app.run()
        assert result.results == [] and result.values() == [] and result.exit_code == 0
        assert result.stats["tasks"] == 0


def test_second_run_returns_only_its_own_tasks():
    with MpopApi(workers=2) as app:
        for i in range(10):
            app.enqueue(fn_id=ProcTaskFnID.INCREMENT, args=(i,))
        first = app.run()
        for i in range(5):
            app.enqueue(fn_id=ProcTaskFnID.INCREMENT, args=(100 + i,))
        second = app.run()
    assert first.values() == [i + 1 for i in range(10)]
    assert second.values() == [101 + i for i in range(5)]
    assert second.stats["tasks"] == 5


# -- enqueue_callback --------------------------------------------------------------------------


def test_enqueue_callback_until_false():
    calls = []

    def callback():
        calls.append(len(calls))
        if len(calls) == 5:
            return False
        for j in range(4):
            app.enqueue(fn_id=ProcTaskFnID.ADD, args=(len(calls), j), tsk_id=len(calls) * 10 + j)
        return True

    with MpopApi(workers=2) as app:
        result = app.run(enqueue_callback=callback)
    assert len(calls) == 5  # never called again after it returned False
    assert sorted(r.tsk_id for r in result.results) == sorted(n * 10 + j for n in range(1, 5) for j in range(4))
    assert all(r.value == r.tsk_id // 10 + r.tsk_id % 10 for r in result.results)


def test_enqueue_callback_stop_iteration():
    source = iter(range(30))
    calls = {"n": 0}

    def callback():
        calls["n"] += 1
        x = next(source)  # raises StopIteration once the source is spent
        app.enqueue(fn_id=ProcTaskFnID.INCREMENT, args=(x,), tsk_id=x)

    with MpopApi(workers=2) as app:
        result = app.run(enqueue_callback=callback)
    assert calls["n"] == 31
    assert result.values() == [x + 1 for x in range(30)]


def test_enqueue_callback_returning_none_keeps_being_called():
    calls = {"n": 0}

    def callback():
        calls["n"] += 1
        if calls["n"] >= 50:
            return False
        return None

    with MpopApi(workers=1) as app:
        app.enqueue(fn_id=ProcTaskFnID.INCREMENT, args=(1,))
        result = app.run(enqueue_callback=callback)
    assert calls["n"] == 50
    assert result.values() == [2]


# -- auto_terminate ----------------------------------------------------------------------------


def test_auto_terminate_true_stops_workers_and_app_is_reusable():
    with MpopApi(workers=2, auto_terminate=True) as app:
        for i in range(20):
            app.enqueue(fn_id=ProcTaskFnID.INCREMENT, args=(i,))
        assert app.run().values() == [i + 1 for i in range(20)]
        st = app.status()
        assert st["config"]["running"] is False
        assert len(st["workers"]) == 2
        assert all(w["state"] not in LIVE for w in st["workers"]), st["workers"]
        pids = [w["pid"] for w in st["workers"]]
        assert wait_until(lambda: not any(pid_alive(p) for p in pids))
        # Reusable: enqueue and run again.
        for i in range(20):
            app.enqueue(fn_id=ProcTaskFnID.ADD, args=(i, 100))
        assert app.run().values() == [i + 100 for i in range(20)]
        assert app.status()["config"]["running"] is False
        # submit() and map() restart the workers too.
        assert list(app.map(abs, [-1, -2])) == [1, 2]


def test_auto_terminate_false_keeps_workers():
    with MpopApi(workers=2, auto_terminate=False) as app:
        for i in range(20):
            app.enqueue(fn_id=ProcTaskFnID.INCREMENT, args=(i,))
        assert app.run().values() == [i + 1 for i in range(20)]
        assert app.status()["config"]["running"] is True
        # A worker that got no task may still be starting; both must come up and stay.
        assert wait_until(lambda: [w["state"] in LIVE for w in app.status()["workers"]] == [True, True]), \
            app.status()["workers"]
        pids = [w["pid"] for w in app.status()["workers"]]
        assert all(pid_alive(p) for p in pids)
        for i in range(5):
            app.enqueue(fn_id=ProcTaskFnID.INCREMENT, args=(i,))
        assert app.run().values() == [1, 2, 3, 4, 5]
        # The same processes served the second run.
        assert [w["pid"] for w in app.status()["workers"]] == pids
    assert not any(pid_alive(p) for p in pids)


# -- timeout -----------------------------------------------------------------------------------


def test_run_timeout_then_later_run_collects():
    with MpopApi(workers=1) as app:
        app.enqueue(sleepy, args=(1.5, 42), tsk_id=7)
        with pytest.raises(TimeoutError):
            app.run(timeout=0.2)
        result = app.run()
        assert [(r.tsk_id, r.value) for r in result.results] == [(7, 42)]


def test_run_timeout_then_wait_and_results_collect():
    with MpopApi(workers=1, auto_terminate=False) as app:
        app.enqueue(sleepy, args=(1.0, 5), tsk_id=1)
        app.enqueue(fn_id=ProcTaskFnID.INCREMENT, args=(9,), tsk_id=2)
        with pytest.raises(TimeoutError):
            app.run(timeout=0.1)
        assert app.wait(timeout=60) is True
        got = {r.tsk_id: r.value for r in app.results(timeout=60)}
        assert got == {1: 5, 2: 10}


# -- progress ----------------------------------------------------------------------------------


def test_progress_bar(capsys):
    with MpopApi(workers=2) as app:
        for i in range(40):
            app.enqueue(fn_id=ProcTaskFnID.INCREMENT, args=(i,))
        result = app.run(progress=True)
    assert result.values() == [i + 1 for i in range(40)]
    err = capsys.readouterr().err
    assert "mpop" in err
    assert re.search(r"\b40/40\b", err), err


# -- Ctrl-C ------------------------------------------------------------------------------------

CTRL_C = r"""
import json, os, signal, sys, threading, time
import mpop

# Ctrl-C as in a terminal, even when the suite was started in the background (a shell
# starts background jobs with SIGINT ignored, and Python then keeps it ignored).
signal.signal(signal.SIGINT, signal.default_int_handler)

def slow(x):
    time.sleep(60)
    return x

mode = sys.argv[1]
app = mpop.MpopApi(workers=1, queue_slots=2, worker_batch_size=1)
pids = []

def note_pids():
    while not pids:
        pids.extend(w["pid"] for w in app.status()["workers"] if w["state"] == "busy")
        time.sleep(0.01)
    os.kill(os.getpid(), signal.SIGINT)   # what Ctrl-C sends

threading.Thread(target=note_pids, daemon=True).start()
if mode == "waiting":
    for i in range(4):
        app.enqueue(slow, args=(i,))
    result = app.run()
else:  # "blocked-enqueue": the callback blocks on a full ring when Ctrl-C comes
    n = iter(range(100))
    result = app.run(enqueue_callback=lambda: app.enqueue(slow, args=(next(n),)))
print(json.dumps({"interrupted": result.interrupted, "exit_code": result.exit_code,
                  "done": len(result.results), "pids": pids}), flush=True)
app.shutdown()
"""


@pytest.mark.parametrize("mode", ["waiting", "blocked-enqueue"])
def test_ctrl_c_stops_run_cleanly(tmp_path, mode):
    script = tmp_path / "ctrl_c.py"
    script.write_text(CTRL_C)
    # The tasks sleep 60 s: only a run() that reacts to Ctrl-C finishes within the limit.
    proc = run_python([str(script), mode], timeout=25)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["interrupted"] is True and info["exit_code"] == 1
    assert info["pids"] and not any(pid_alive(p) for p in info["pids"])


CTRL_C_COUNTS = r"""
import json, os, signal, threading, time
import mpop

signal.signal(signal.SIGINT, signal.default_int_handler)

def short(x):
    time.sleep(0.002)
    return x

out = []
for attempt in range(3):
    app = mpop.MpopApi(workers=2, auto_terminate=False)
    for i in range(3000):
        app.enqueue(short, args=(i,))
    threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
    result = app.run()
    waited = app.wait(timeout=30)
    q = app.status()["queue"]
    out.append({"interrupted": result.interrupted, "results": len(result.results), "waited": waited,
                "submitted": q["submitted"], "finished": q["finished"], "in_flight": q["in_flight"]})
    app.shutdown()
print(json.dumps(out), flush=True)
"""


def test_counts_stay_exact_after_a_ctrl_c(tmp_path):
    # Ctrl-C lands anywhere in the owner's result handling; the count of finished tasks
    # (status, wait(), in_flight) must stay exact, and every task has its one result.
    script = tmp_path / "ctrl_c_counts.py"
    script.write_text(CTRL_C_COUNTS)
    proc = run_python([str(script)], timeout=120)
    assert proc.returncode == 0, proc.stderr
    for run in json.loads(proc.stdout.strip().splitlines()[-1]):
        assert run["interrupted"] and run["waited"], run
        assert run["submitted"] == run["finished"] == run["results"] == 3000, run
        assert run["in_flight"] == 0, run
