"""os.fork() in a process that owns an app: the child leaves the parent's app alone (on a
normal exit too) and gets a clear MpopError if it uses it; the parent's app keeps working,
under every start method."""

from __future__ import annotations

import textwrap

import pytest

from _helpers import leak_check, run_python

METHODS = ["spawn", "fork", "forkserver"]


@pytest.fixture(autouse=True)
def _no_leaks():
    with leak_check():
        yield


SCRIPT = r"""
import os, sys
import mpop

def square(x):
    return x * x

def in_child(app, pending):
    # Every way of using the inherited app raises MpopError naming fork(); none touches
    # the parent's workers, segment or results.
    calls = {
        "submit": lambda: app.submit(square, 5),
        "enqueue": lambda: app.enqueue(square, args=(5,)),
        "map": lambda: list(app.map(square, range(3))),
        "wait": lambda: app.wait(),
        "results": lambda: list(app.results()),
        "status": lambda: app.status(),
        "run": lambda: app.run(),
        "scale": lambda: app.scale(1),
        "kill_worker": lambda: app.kill_worker(0),
        "future": lambda: pending.result(timeout=5),
    }
    for name, call in calls.items():
        try:
            call()
            print(f"child {name}: no error", flush=True)
        except mpop.MpopError as e:
            assert "fork()" in str(e), (name, str(e))
        except Exception as e:
            print(f"child {name}: {type(e).__name__}: {e}", flush=True)
    # Leaving a `with` block the parent entered (or calling shutdown) stops nothing of the
    # parent's.
    app.__exit__(None, None, None)
    app.shutdown()
    # An app of its own works in the child.
    with mpop.MpopApi(workers=1, start_method="spawn") as own:
        assert own.submit(square, 9).result(timeout=60) == 81
    print("child ok", flush=True)

def main(method):
    app = mpop.MpopApi(workers=2, start_method=method, auto_terminate=False)
    app.start()
    assert app.submit(square, 3).result(timeout=60) == 9
    pids = sorted(w["pid"] for w in app.status()["workers"])

    # 1. A child that exits normally (atexit handlers, finalizers) without using the app.
    child = os.fork()
    if child == 0:
        sys.exit(0)
    assert os.waitpid(child, 0)[1] == 0

    # 2. A child that tries to use the app, while the parent has a task in flight.
    slow = app.submit(__import__("time").sleep, 0.5)
    child = os.fork()
    if child == 0:
        try:
            in_child(app, slow)
        except BaseException:
            import traceback
            traceback.print_exc()
            os._exit(1)
        sys.exit(0)
    assert os.waitpid(child, 0)[1] == 0
    assert slow.result(timeout=60) is None  # the parent still gets its own result

    # The parent's app carries on, with the same workers.
    assert app.submit(square, 4).result(timeout=60) == 16
    assert list(app.map(square, range(100))) == [x * x for x in range(100)]
    status = app.status()
    assert sorted(w["pid"] for w in status["workers"]) == pids, status["workers"]
    assert all(w["restarts"] == 0 for w in status["workers"])
    app.shutdown()
    print("parent ok", flush=True)

if __name__ == "__main__":
    main(sys.argv[1])
"""


@pytest.mark.parametrize("method", METHODS)
def test_a_forked_child_leaves_the_parents_app_alone(tmp_path, method):
    script = tmp_path / "forker.py"
    script.write_text(textwrap.dedent(SCRIPT))
    r = run_python([str(script), method], cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "child ok" in r.stdout and "parent ok" in r.stdout, r.stdout + r.stderr
    assert "no error" not in r.stdout, r.stdout
    # No worker of the parent died or failed to start (they would print errors).
    assert "Error" not in r.stderr, r.stderr
