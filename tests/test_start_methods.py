"""Every start method (spawn, fork, forkserver) runs handlers defined in a __main__ script,
lambdas and closures, and imports handler_module= in the workers."""

from __future__ import annotations

import builtins
import os
import sys
import textwrap
import uuid

import pytest

import mpop
from mpop import MpopApi
from _helpers import leak_check, run_python

METHODS = ["spawn", "fork", "forkserver"]
TIMEOUT = 60


@pytest.fixture(autouse=True)
def _no_leaks():
    with leak_check():
        yield


MAIN_SCRIPT = r"""
import sys
import mpop

def triple(x):
    return 3 * x

class Scaler:
    def __init__(self, k):
        self.k = k
    def __call__(self, x):
        return self.k * x

def slot_handler(slot):
    return mpop.TaskResult(success=True, value=slot.args[0] + 1000)

def main(method):
    offset = 7
    with mpop.MpopApi(workers=2, start_method=method, auto_terminate=False) as app:
        print("map", list(app.map(triple, range(5))))
        print("submit", app.submit(triple, 7).result(timeout=60))
        print("lambda", list(app.map(lambda x: x + offset, range(3))))
        print("callable", app.submit(Scaler(5), 3).result(timeout=60))
        app.register_handlers(handlers_dict={0xB000: slot_handler})
        for i in range(3):
            app.enqueue(fn_id=0xB000, args=(i,), tsk_id=i)
        print("run", app.run().values())
        print("pid-differs", app.submit(__import__("os").getpid).result(timeout=60) != __import__("os").getpid())
"""

EXPECTED = [
    "map [0, 3, 6, 9, 12]",
    "submit 21",
    "lambda [7, 8, 9]",
    "callable 15",
    "run [1000, 1001, 1002]",
    "pid-differs True",
]


@pytest.mark.parametrize("method", METHODS)
def test_handlers_defined_in_main_script(tmp_path, method):
    script = tmp_path / "main_handlers.py"
    script.write_text(MAIN_SCRIPT + '\nif __name__ == "__main__":\n    main(sys.argv[1])\n')
    proc = run_python([str(script), method], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == EXPECTED, proc.stdout + proc.stderr


@pytest.mark.parametrize("method", METHODS)
def test_handlers_in_main_script_without_main_guard(tmp_path, method):
    # Prototype-style scripts have no `if __name__ == "__main__"` guard; workers must not
    # re-run the script.
    script = tmp_path / "unguarded.py"
    script.write_text(MAIN_SCRIPT + "\nmain(sys.argv[1])\n")
    proc = run_python([str(script), method], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == EXPECTED, proc.stdout + proc.stderr


def make_adder(k):
    def adder(x):
        return x + k

    return adder


@pytest.mark.parametrize("method", METHODS)
def test_lambdas_and_closures(method):
    factor = 3
    table = {"a": 10, "b": 20}
    with MpopApi(workers=2, start_method=method, auto_terminate=False) as app:
        assert list(app.map(lambda x: x * factor, range(6))) == [x * 3 for x in range(6)]
        assert app.submit(make_adder(100), 5).result(timeout=TIMEOUT) == 105
        assert app.submit(lambda key: table[key], "b").result(timeout=TIMEOUT) == 20
        for i in range(4):
            app.enqueue(make_adder(i), args=(i,), tsk_id=i)  # four different closures
        assert sorted(r.value for r in app.run().results) == [0, 2, 4, 6]
        fid = app.register(lambda s: s.upper(), name=f"upper-{method}")
        assert app.submit(fid, "abc").result(timeout=TIMEOUT) == "ABC"


@pytest.fixture
def handler_module(tmp_path, monkeypatch):
    """A fresh module on sys.path (only through sys.path, not PYTHONPATH) whose import
    leaves a mark in the importing interpreter."""
    uid = uuid.uuid4().hex[:12]
    name = f"mpop_hm_{uid}"
    mark = f"_mpop_hm_mark_{uid}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(f"""
        import builtins, os
        IMPORTED_BY = os.getpid()
        setattr(builtins, {mark!r}, "imported in %d" % IMPORTED_BY)

        def whoami(x):
            return (x, IMPORTED_BY, os.getpid())

        HANDLERS = {{0xB123: whoami}}
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name, mark
    sys.modules.pop(name, None)
    if hasattr(builtins, mark):
        delattr(builtins, mark)


@pytest.mark.parametrize("method", METHODS)
def test_handler_module_imported_in_workers(handler_module, method):
    name, mark = handler_module
    with MpopApi(workers=2, start_method=method, handler_module=name, auto_terminate=False) as app:
        # A handler defined here, that only reads what the module's import left behind:
        # run first, so nothing but handler_module= can have imported the module there.
        def read_mark(_):
            import builtins as b
            import os as o

            return getattr(b, mark, None), o.getpid()

        values = list(app.map(read_mark, range(8)))
        for text, pid in values:
            assert pid != os.getpid()
            assert text is not None and text.startswith("imported in "), values
            if method == "spawn":
                assert text == f"imported in {pid}", values
            elif method == "forkserver":  # imported by the fork server or the worker itself
                assert text != f"imported in {os.getpid()}", values
            # (a forked worker may simply inherit the owner's import)
        # The module's HANDLERS were registered and run in the workers.
        assert 0xB123 in {f["fn_id"] for f in app.list_functions()}
        app.enqueue(fn_id=0xB123, args=(5,), tsk_id=1)
        (res,) = app.run().results
        x, imported_by, pid = res.value
        assert x == 5 and pid != os.getpid()
        if method == "spawn":
            assert imported_by == pid
        elif method == "forkserver":
            assert imported_by != os.getpid()


@pytest.mark.parametrize("method", METHODS)
def test_function_from_module_reachable_only_through_sys_path(handler_module, method):
    # A handler pickled by reference to a module the workers can only find through the
    # owner's sys.path (as pytest's rootdir insertion does for test modules).
    name, _ = handler_module
    module = __import__(name)
    with MpopApi(workers=1, start_method=method) as app:
        for i in range(3):
            app.enqueue(module.whoami, args=(i,), tsk_id=i)
        result = app.run()
        assert [r.value[0] for r in result.results] == [0, 1, 2], result.failures


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_handler_module_failing_in_workers_raises_instead_of_hanging(tmp_path, monkeypatch, method):
    # The module imports in the owner (registration) but raises in every worker: start-up
    # fails, and the caller must hear of it, even from an enqueue blocked on a full ring.
    name = f"mpop_badhm_{uuid.uuid4().hex[:12]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(f"""
        import os
        if os.getpid() != {os.getpid()}:
            raise ImportError("this module cannot load in a worker")
        HANDLERS = {{}}
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        app = MpopApi(workers=1, queue_slots=2, worker_batch_size=1, start_method=method,
                      handler_module=name, auto_terminate=False)
        try:
            with pytest.raises(mpop.MpopError) as info:
                app.start()
                for i in range(10):  # a bounded wait, so that a hang shows up as QueueFull
                    app.enqueue(fn_id=mpop.ProcTaskFnID.ADD, args=(i, 1), timeout=8)
                app.run(timeout=8)
            assert not isinstance(info.value, mpop.QueueFull), info.value
            assert "cannot load in a worker" in str(info.value)
        finally:
            app.shutdown(wait=False)
    finally:
        sys.modules.pop(name, None)


OUTPUT_SCRIPT = r"""
import os, sys, time
import mpop

def hello(i):
    print("hello from a worker", i, flush=True)
    return i

def shout(n):
    sys.stdout.write("x" * n + "\n")  # more than a pipe holds: must not block
    sys.stdout.flush()
    return n

def raw(i):
    # Straight to file descriptor 1, past Python's sys.stdout: the process's own standard
    # output (never a pipe of the fork server's, whose replies are pids).
    os.write(1, f"raw from a worker {i}\n".encode() * 2000)
    return i

def sleepy(s):
    time.sleep(s)
    return s

if __name__ == "__main__":
    with mpop.MpopApi(workers=1, start_method=sys.argv[1], auto_terminate=False,
                      task_timeout=2) as app:
        assert app.submit(hello, 1).result(timeout=60) == 1
        assert app.submit(shout, 200_000).result(timeout=60) == 200_000
        assert app.submit(raw, 1).result(timeout=60) == 1
        old = app.status()["workers"][0]["pid"]
        app.kill_worker(0)
        deadline = time.monotonic() + 60
        while app.status()["workers"][0]["pid"] in (old, 0) and time.monotonic() < deadline:
            time.sleep(0.01)
        # The replacement prints, and the supervisor knows its real pid: it can time out
        # its task and kill it by id.
        new = app.status()["workers"][0]["pid"]
        assert new != old and new > 0, (old, new)
        assert app.submit(hello, 2).result(timeout=60) == 2
        assert app.submit(raw, 2).result(timeout=60) == 2
        assert app.status()["workers"][0]["pid"] == new
        try:
            app.submit(sleepy, 30).result(timeout=60)
            raise SystemExit("task_timeout did not stop the task")
        except mpop.TaskTimeoutError:
            pass
        assert app.submit(hello, 3).result(timeout=60) == 3
    print("done", flush=True)
"""


@pytest.mark.parametrize("method", METHODS)
def test_handler_output_reaches_the_owners_stdout(tmp_path, method):
    script = tmp_path / "output.py"
    script.write_text(OUTPUT_SCRIPT)
    proc = run_python([str(script), method], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr
    lines = proc.stdout.splitlines()
    for i in (1, 2, 3):
        assert f"hello from a worker {i}" in lines, proc.stdout[-2000:]
    assert "x" * 200_000 in lines
    for i in (1, 2):
        assert lines.count(f"raw from a worker {i}") == 2000, proc.stdout[-2000:]
    assert lines[-1] == "done"


MAIN_TYPES_SCRIPT = r"""
import sys
from dataclasses import dataclass
import mpop

@dataclass
class Point:
    x: int
    y: int

class MainError(Exception):
    pass

def make(x):
    return Point(x, x + 1)

def norm(p):
    return p.x + p.y

def boom(x):
    raise MainError(f"bad {x}")

if __name__ == "__main__":
    with mpop.MpopApi(workers=1, start_method=sys.argv[1]) as app:
        p = app.submit(make, 1).result(timeout=60)
        assert type(p) is Point and p == Point(1, 2), p          # the owner's own class
        assert app.submit(norm, Point(2, 3)).result(timeout=60) == 5
        assert list(app.map(norm, [Point(i, i) for i in range(5)])) == [0, 2, 4, 6, 8]
        try:
            app.submit(boom, 7).result(timeout=60)
        except MainError as e:
            assert type(e) is MainError and str(e) == "bad 7"
            assert "MainError: bad 7" in str(e.__cause__)   # the worker's traceback
        app.enqueue(make, args=(5,))
        (r,) = app.run().results
        assert type(r.value) is Point and r.value == Point(5, 6)
    print("ok")
"""


@pytest.mark.parametrize("method", METHODS)
def test_classes_and_exceptions_defined_in_main(tmp_path, method):
    # Returned, passed and raised: under spawn and forkserver the worker's __main__ is not
    # the script, so these travel by value and come back as the script's own classes.
    script = tmp_path / "main_types.py"
    script.write_text(MAIN_TYPES_SCRIPT)
    proc = run_python([str(script), method], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines() == ["ok"], proc.stdout + proc.stderr
