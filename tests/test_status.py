"""status(), print_status(), scale() and kill_worker()."""

from __future__ import annotations

import time

import pytest

import mpop
from mpop import MpopApi, ProcTaskFnID
from _helpers import leak_check, pid_alive, wait_until

TIMEOUT = 60
WORKER_KEYS = {"id", "pid", "state", "completed", "failed", "restarts", "busy_s", "idle_s"}
LIVE = ("idle", "busy")


@pytest.fixture(autouse=True)
def _no_leaks():
    with leak_check():
        yield


def fails_if_odd(x: int) -> int:
    if x % 2:
        raise ValueError(x)
    return x


def slow(x: int) -> int:
    time.sleep(0.05)
    return x


def live(app) -> list[dict]:
    return [w for w in app.status()["workers"] if w["state"] in LIVE]


def test_status_keys_before_and_after_start():
    with MpopApi(workers=2, auto_terminate=False) as app:
        st = app.status()
        assert set(st) >= {"config", "queue", "workers"}
        assert st["config"]["workers"] == 2
        assert st["config"]["queue_slots"] == 4096
        assert st["workers"] == []
        assert isinstance(st["queue"], dict)
        app.start()
        assert wait_until(lambda: len(live(app)) == 2, TIMEOUT), app.status()["workers"]
        workers = app.status()["workers"]
        assert sorted(w["id"] for w in workers) == [0, 1]
        for w in workers:
            assert WORKER_KEYS <= set(w), set(w)
            assert isinstance(w["pid"], int) and pid_alive(w["pid"])
            assert isinstance(w["busy_s"], float) and isinstance(w["idle_s"], float)
            assert w["completed"] == w["failed"] == w["restarts"] == 0
        assert len({w["pid"] for w in workers}) == 2


def test_queue_counts():
    with MpopApi(workers=1) as app:
        for i in range(7):
            app.enqueue(fn_id=ProcTaskFnID.INCREMENT, args=(i,))
        q = app.status()["queue"]
        assert q["submitted"] == 7 and q["finished"] == 0
        app.run()
        q = app.status()["queue"]
        assert q["submitted"] == 7 and q["finished"] == 7 and q["in_flight"] == 0


def test_counters_persist_after_workers_stop():
    with MpopApi(workers=2) as app:  # auto_terminate: run() stops the workers
        for i in range(20):
            app.enqueue(fails_if_odd, args=(i,))
        result = app.run()
        assert len(result.failures) == 10
        workers = app.status()["workers"]
        assert all(w["state"] not in LIVE for w in workers), workers
        # "completed" counts the tasks that succeeded, "failed" the others.
        assert sum(w["completed"] for w in workers) == 10
        assert sum(w["failed"] for w in workers) == 10
        assert sum(w["busy_s"] for w in workers) > 0
        # Still there on the next run, and added to.
        for i in range(4):
            app.enqueue(fails_if_odd, args=(2 * i,))
        app.run()
        workers = app.status()["workers"]
        assert sum(w["completed"] for w in workers) == 14
        assert sum(w["failed"] for w in workers) == 10


# -- print_status -----------------------------------------------------------------------------


SECTIONS = {"config": "mpop config", "queue": "mpop queue", "workers": "mpop workers"}


@pytest.mark.parametrize("flags", [
    dict(config=True, queue=True, workers=True),
    dict(config=False, queue=True, workers=True),
    dict(config=True, queue=False, workers=True),
    dict(config=True, queue=True, workers=False),
    dict(config=False, queue=False, workers=True),
])
def test_print_status_sections(capsys, flags):
    with MpopApi(workers=1, auto_terminate=False) as app:
        assert app.submit(ProcTaskFnID.ADD, 1, 2).result(timeout=TIMEOUT) == 3
        app.print_status(**flags)
        out, err = capsys.readouterr()
    assert err == ""
    for key, title in SECTIONS.items():
        assert (title in out) == flags[key], (key, out)
    if flags["workers"]:
        assert "pid" in out and "completed" in out


def test_print_status_defaults_and_before_start(capsys):
    app = MpopApi(workers=2, queue_slots=128)
    try:
        app.print_status()
        out = capsys.readouterr().out
    finally:
        app.shutdown()
    assert all(title in out for title in SECTIONS.values())
    assert "128" in out  # the configured queue size is shown


def test_print_status_shows_worker_rows(capsys):
    with MpopApi(workers=2, auto_terminate=False) as app:
        app.start()
        assert wait_until(lambda: len(live(app)) == 2, TIMEOUT)
        pids = [w["pid"] for w in app.status()["workers"]]
        app.print_status(config=False, queue=False)
        out = capsys.readouterr().out
    for pid in pids:
        assert str(pid) in out


# -- scale and kill_worker --------------------------------------------------------------------


def test_scale_grows_and_shrinks():
    with MpopApi(workers=1, auto_terminate=False) as app:
        app.start()
        assert wait_until(lambda: len(live(app)) == 1, TIMEOUT)
        app.scale(2)
        assert wait_until(lambda: len(live(app)) == 2, TIMEOUT), app.status()["workers"]
        assert app.status()["config"]["workers"] == 2
        assert list(app.map(slow, range(20))) == list(range(20))
        app.scale(1)
        assert wait_until(lambda: len(live(app)) == 1, TIMEOUT), app.status()["workers"]
        assert app.status()["config"]["workers"] == 1
        assert list(app.map(slow, range(5))) == list(range(5))
        assert len(live(app)) == 1


def test_scale_before_start_sets_worker_count():
    with MpopApi(workers=1, auto_terminate=False) as app:
        app.scale(2)
        app.start()
        assert wait_until(lambda: len(live(app)) == 2, TIMEOUT), app.status()["workers"]


def test_scale_rejects_bad_values():
    import mpop

    with MpopApi(workers=1) as app:
        for bad in (0, -1, 1.5, "2"):
            with pytest.raises(mpop.ConfigError):
                app.scale(bad)


def test_kill_worker_is_replaced_and_work_continues():
    with MpopApi(workers=2, auto_terminate=False) as app:
        app.start()
        assert wait_until(lambda: len(live(app)) == 2, TIMEOUT)
        before = {w["id"]: w for w in app.status()["workers"]}
        victim = before[0]
        assert app.kill_worker(0) is True
        assert wait_until(lambda: not pid_alive(victim["pid"]), TIMEOUT)

        def replaced():
            ws = live(app)
            return len(ws) == 2 and victim["pid"] not in {w["pid"] for w in ws}

        assert wait_until(replaced, TIMEOUT), app.status()["workers"]
        restarts = sum(w["restarts"] for w in app.status()["workers"])
        assert restarts >= 1
        assert list(app.map(slow, range(20))) == list(range(20))
        assert app.submit(ProcTaskFnID.ADD, 2, 3).result(timeout=TIMEOUT) == 5


def test_kill_worker_unknown_id():
    with MpopApi(workers=1, auto_terminate=False) as app:
        assert app.kill_worker(0) is False  # nothing started yet
        app.start()
        assert wait_until(lambda: len(live(app)) == 1, TIMEOUT)
        assert app.kill_worker(57) is False


def sleep_ms(ms: int) -> int:
    time.sleep(ms / 1000)
    return ms


def test_run_stats_give_percentiles_of_the_runs_own_tasks():
    with MpopApi(workers=2) as app:
        list(app.map(sleep_ms, [1] * 20))  # other routes do not enter the run's figures
        for ms in [5] * 18 + [60, 60]:
            app.enqueue(sleep_ms, args=(ms,))
        stats = app.run().stats
        assert stats["tasks"] == 20
        assert 0.004 <= stats["run_time_p50_s"] < 0.06 <= stats["run_time_p99_s"]
        assert 0 <= stats["queue_wait_p50_s"] <= stats["queue_wait_p99_s"]


def test_status_percentiles_cover_a_bounded_window_of_recent_tasks(monkeypatch):
    from mpop import _router

    monkeypatch.setattr(_router.ResultRouter, "TIMING_WINDOW", 50)
    with MpopApi(workers=2) as app:
        for f in [app.submit(sleep_ms, 0) for _ in range(200)]:
            f.result(timeout=TIMEOUT)
        assert len(app._lifecycle.runtime.router.timings) == 50  # a server that only submits stays flat
        q = app.status()["queue"]
        assert 0 <= q["queue_wait_p50_s"] <= q["queue_wait_p99_s"]
        assert 0 <= q["run_time_p50_s"] <= q["run_time_p99_s"]
        busy = sum(w["busy_s"] for w in app.status()["workers"])
        assert busy > 0


def test_an_app_and_its_status_render_as_html_tables_in_a_notebook():
    with mpop.MpopApi(workers=2, auto_terminate=False) as app:
        assert app.submit(abs, -3).result(timeout=30) == 3
        status = app.status()
        assert isinstance(status, dict) and set(status) >= {"config", "queue", "workers"}
        page = status._repr_html_()
        assert page.count("<table>") == 3
        for title in ("mpop config", "mpop queue", "mpop workers"):
            assert title in page
        for w in status["workers"]:
            assert f"<td>{w['pid']}</td>" in page
        head = app._repr_html_()
        assert head.startswith("<p><code>&lt;MpopApi workers=2 running") and head.count("<table>") == 3


def test_status_html_escapes_what_it_shows():
    from mpop._status import format_status_html

    status = {"config": {"slot_class": "<b>x</b>"}, "queue": {}, "workers": []}
    page = format_status_html(status)
    assert "&lt;b&gt;x&lt;/b&gt;" in page and "<b>x</b>" not in page
    assert "(none started)" in page
