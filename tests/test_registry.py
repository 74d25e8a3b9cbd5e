"""Handler registration: @app.task, register, register_handlers, list_functions, validate,
reserved and duplicate ids/names, built-ins, late registration and self-registration."""

import functools
import os
import sys
import textwrap
import threading
import uuid

import pytest

import mpop
from _helpers import app_factory, app_fixture, no_leaks_fixture

PREFIX = f"mpop-reg{os.getpid()}"
TIMEOUT = 120  # a safety net against hangs, never a performance expectation


no_leaks = no_leaks_fixture(PREFIX)
make_app = app_factory(PREFIX)
app = app_fixture(make_app)


@pytest.fixture
def handler_module(tmp_path, monkeypatch):
    """A fresh importable module with a HANDLERS dict; returns its name."""
    name = f"mpop_test_handlers_{uuid.uuid4().hex[:12]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent("""
        def triple(x):
            return 3 * x

        def greet(who, punct="!"):
            return "hello " + who + punct

        HANDLERS = {0xC001: triple, 0xC002: greet}
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    import sys

    sys.modules.pop(name, None)


# Module-level handlers (importable by reference in workers).

def double(x):
    return 2 * x


def add3(a, b, c=0):
    return a + b + c


def negate(x):
    return -x


def square(x):
    return x * x


def concat(a, b):
    return f"{a}|{b}"


def by_id(app, fn_id):
    for d in app.list_functions():
        if d["fn_id"] == fn_id:
            return d
    raise AssertionError(f"fn_id {fn_id:#x} not in list_functions()")


def run_values(app, tasks):
    """Enqueue (fn, args, kwargs) tasks and return the run's values in order."""
    for fn, args, kwargs in tasks:
        app.enqueue(fn, args=args, kwargs=kwargs)
    return app.run(timeout=TIMEOUT).values()


# -- @app.task ---------------------------------------------------------------------------------

def test_task_decorator_without_fn_id_assigns_from_0x1000(app):
    @app.task
    def first(x):
        return x

    @app.task
    def second(x):
        return x

    assert callable(first) and first(5) == 5  # the decorator returns the function itself
    ids = {d["name"]: d["fn_id"] for d in app.list_functions() if not d["builtin"]}
    assert sorted(ids.values()) == [0x1000, 0x1001]
    assert ids[first.__qualname__] == 0x1000
    assert ids[second.__qualname__] == 0x1001


def test_task_decorator_with_fn_id(app):
    @app.task(fn_id=0xB000)
    def add(a: int, b: int = 1) -> int:
        return a + b

    assert add(2) == 3
    d = by_id(app, 0xB000)
    assert d["name"] == add.__qualname__
    assert d["builtin"] is False
    assert app.enqueue(fn_id=0xB000, args=(40, 2))
    assert app.enqueue(add, args=(1,))
    assert app.run(timeout=TIMEOUT).values() == [42, 2]


def test_task_decorator_with_empty_parentheses(app):
    @app.task()
    def f(x):
        return x + 100

    assert by_id(app, 0x1000)["name"] == f.__qualname__


def test_task_decorator_with_name(app):
    @app.task(name="my_custom_name")
    def f(x):
        return x

    names = [d["name"] for d in app.list_functions()]
    assert "my_custom_name" in names


def test_auto_ids_skip_explicitly_taken_ids(app):
    assert app.register(double, fn_id=0x1000) == 0x1000
    assert app.register(negate, fn_id=0x1001) == 0x1001
    assert app.register(square) == 0x1002
    assert app.register(concat) == 0x1003


# -- register / register_handlers --------------------------------------------------------------

def test_register_returns_fn_id_and_handler_runs(app):
    fid = app.register(double)
    assert fid >= 0x1000
    fid2 = app.register(add3, fn_id=0xB123)
    assert fid2 == 0xB123
    assert run_values(app, [(fid, (21,), None), (0xB123, (1, 2), {"c": 3}), (double, (5,), None)]) == [42, 6, 10]


def test_register_with_name(app):
    app.register(double, name="twice")
    assert any(d["name"] == "twice" for d in app.list_functions())


def test_register_handlers_dict(app):
    ids = app.register_handlers(handlers_dict={0xB001: double, 0xB002: negate})
    assert ids == [0xB001, 0xB002]
    assert by_id(app, 0xB001)["name"] == "double"
    assert by_id(app, 0xB002)["name"] == "negate"
    assert run_values(app, [(0xB001, (4,), None), (0xB002, (4,), None)]) == [8, -4]


def test_register_handlers_module_by_name(app, handler_module):
    ids = app.register_handlers(module=handler_module)
    assert sorted(ids) == [0xC001, 0xC002]
    assert by_id(app, 0xC001)["name"] == "triple"
    assert by_id(app, 0xC001)["module"] == handler_module
    assert run_values(app, [(0xC001, (5,), None), (0xC002, ("mpop",), {"punct": "?"})]) == [15, "hello mpop?"]


def test_register_handlers_module_object(app, handler_module):
    import importlib

    mod = importlib.import_module(handler_module)
    ids = app.register_handlers(module=mod)
    assert sorted(ids) == [0xC001, 0xC002]
    assert run_values(app, [(mod.triple, (7,), None)]) == [21]


def test_register_handlers_module_and_dict_together(app, handler_module):
    ids = app.register_handlers(module=handler_module, handlers_dict={0xB001: double})
    assert sorted(ids) == [0xB001, 0xC001, 0xC002]


def test_handler_module_constructor_parameter(handler_module):
    with make_app(handler_module=handler_module) as app:
        assert {0xC001, 0xC002} <= {d["fn_id"] for d in app.list_functions()}
        app.enqueue(fn_id=0xC001, args=(2,))
        app.enqueue(fn_id=0xC002, args=("w",))
        assert app.run(timeout=TIMEOUT).values() == [6, "hello w!"]


@pytest.mark.parametrize(("source", "cause"), [
    ("import mpop_no_such_module_here\n", ImportError),
    ("def broken(:\n", SyntaxError),
    ("raise RuntimeError('cannot start here')\n", RuntimeError),
    ("X = 1\n", mpop.RegistryError),  # no HANDLERS
])
def test_a_handler_module_that_fails_raises_config_error(tmp_path, monkeypatch, source, cause):
    name = f"mpop_test_badmod_{uuid.uuid4().hex[:12]}"
    (tmp_path / f"{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        with pytest.raises(mpop.ConfigError, match=name) as info:
            make_app(handler_module=name)
        assert isinstance(info.value.__cause__, cause)
    finally:
        sys.modules.pop(name, None)


def test_register_handlers_needs_an_argument(app):
    with pytest.raises(TypeError):
        app.register_handlers()


def test_register_handlers_module_without_handlers_dict(app, tmp_path, monkeypatch):
    name = f"mpop_test_nohandlers_{uuid.uuid4().hex[:12]}"
    (tmp_path / f"{name}.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        with pytest.raises(mpop.RegistryError, match="HANDLERS"):
            app.register_handlers(module=name)
    finally:
        import sys

        sys.modules.pop(name, None)


def test_register_not_callable(app):
    with pytest.raises(mpop.RegistryError):
        app.register(42)


@pytest.mark.parametrize("bad", ["0xB000", 1.5, 2**32, 2**40])
def test_register_bad_fn_id(app, bad):
    with pytest.raises(mpop.RegistryError):
        app.register(double, fn_id=bad)


# -- list_functions ----------------------------------------------------------------------------

def test_list_functions_contains_builtins(app):
    fns = {d["fn_id"]: d for d in app.list_functions()}
    for member in (mpop.ProcTaskFnID.INCREMENT, mpop.ProcTaskFnID.ADD, mpop.ProcTaskFnID.MULTIPLY):
        assert int(member) in fns
        assert fns[int(member)]["name"] == member.name
        assert fns[int(member)]["builtin"] is True
    assert all(d["fn_id"] < 0x1000 for d in fns.values())


def test_list_functions_describes_user_handlers(app):
    app.register(add3, fn_id=0xB000)

    def slot_handler(slot):
        return slot.args[0]

    app.register(slot_handler, fn_id=0xB001)
    d = by_id(app, 0xB000)
    assert d["name"] == "add3"
    assert d["mode"] == "args"
    assert d["builtin"] is False
    assert d["module"] == __name__
    assert "a" in d["signature"] and "c=0" in d["signature"]
    assert by_id(app, 0xB001)["mode"] == "slot"
    # every entry is a plain dict with these keys
    for entry in app.list_functions():
        assert {"fn_id", "name"} <= set(entry)


def test_list_functions_is_sorted_and_unique(app):
    app.register(double, fn_id=0xB010)
    app.register(negate, fn_id=0xB002)
    ids = [d["fn_id"] for d in app.list_functions()]
    assert ids == sorted(ids)
    assert len(ids) == len(set(ids))


# -- validate ----------------------------------------------------------------------------------

def test_validate_ok(app):
    app.register(double)
    app.register(lambda x: x + 1)
    factor = 3
    app.register(lambda x: x * factor)
    assert app.validate() is None


class _BrokenOnLoad:
    """A callable that pickles but cannot be unpickled."""

    def __call__(self, x):
        return x

    def __reduce__(self):
        return (_fail_on_load, ())


def _fail_on_load():
    raise RuntimeError("cannot rebuild this handler")


def test_validate_lists_every_problem(app):
    lock = threading.Lock()

    def holds_lock(x):
        with lock:
            return x

    app.register(holds_lock, name="holds_lock")
    app.register(_BrokenOnLoad(), name="broken_on_load")
    app.register(double)
    with pytest.raises((mpop.RegistryError, mpop.ConfigError)) as info:
        app.validate()
    msg = str(info.value)
    assert "holds_lock" in msg
    assert "broken_on_load" in msg
    assert "'double'" not in msg


def test_validate_reports_a_handler_module_that_cannot_be_imported(tmp_path, monkeypatch):
    import importlib
    import sys

    name = f"mpop_test_vanishing_{uuid.uuid4().hex[:12]}"
    path = tmp_path / f"{name}.py"
    path.write_text("def one(x):\n    return 1\n\nHANDLERS = {0xC0DE: one}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    app = make_app(handler_module=name)
    try:
        app.validate()
        path.unlink()
        sys.modules.pop(name, None)
        importlib.invalidate_caches()
        with pytest.raises((mpop.ConfigError, mpop.RegistryError)) as info:
            app.validate()
        assert "handler_module" in str(info.value) and name in str(info.value)
    finally:
        app.shutdown()
        sys.modules.pop(name, None)


# -- reserved, duplicate -----------------------------------------------------------------------

@pytest.mark.parametrize("member", list(mpop.ProcTaskFnID), ids=lambda m: m.name)
def test_reserved_proc_task_ids(app, member):
    with pytest.raises(mpop.RegistryError) as info:
        app.register(double, fn_id=int(member))
    assert isinstance(info.value, KeyError)
    assert "reserved" in str(info.value)
    with pytest.raises(mpop.RegistryError):
        app.register(double, fn_id=member)


@pytest.mark.parametrize("fn_id", [0, 5, 0x100, 0x0FFF])
def test_ids_below_0x1000_are_reserved(app, fn_id):
    with pytest.raises(mpop.RegistryError, match="reserved"):
        app.register(double, fn_id=fn_id)


def test_reserved_id_through_decorator_and_dict(app):
    with pytest.raises(mpop.RegistryError):
        @app.task(fn_id=int(mpop.ProcTaskFnID.ADD))
        def f(a, b):
            return a

    with pytest.raises(mpop.RegistryError):
        app.register_handlers(handlers_dict={0x10: double})
    assert all(d["fn_id"] != 0x10 for d in app.list_functions())


def test_reserved_id_does_not_replace_builtin(app):
    with pytest.raises(mpop.RegistryError):
        app.register(negate, fn_id=int(mpop.ProcTaskFnID.INCREMENT))
    app.enqueue(mpop.ProcTaskFnID.INCREMENT, args=(1,))
    assert app.run(timeout=TIMEOUT).values() == [2]


def test_duplicate_fn_id(app):
    app.register(double, fn_id=0xB000)
    with pytest.raises(mpop.RegistryError) as info:
        app.register(negate, fn_id=0xB000)
    assert isinstance(info.value, KeyError)
    assert "0xb000" in str(info.value).lower()
    assert by_id(app, 0xB000)["name"] == "double"  # the first registration stays


def test_duplicate_name(app):
    app.register(double, name="worker_fn")
    with pytest.raises(mpop.RegistryError) as info:
        app.register(negate, name="worker_fn")
    assert isinstance(info.value, KeyError)
    assert "worker_fn" in str(info.value)


def test_name_of_a_builtin_is_taken(app):
    with pytest.raises(mpop.RegistryError):
        app.register(double, name="INCREMENT")


def test_duplicate_name_via_decorator(app):
    @app.task(name="same")
    def a(x):
        return x

    with pytest.raises(mpop.RegistryError):
        @app.task(name="same")
        def b(x):
            return x


def test_same_qualname_from_different_places_is_not_a_duplicate(app):
    def make(k):
        def handler(x):
            return x + k

        return handler

    h1, h2 = make(1), make(100)
    id1, id2 = app.register(h1), app.register(h2)
    assert id1 != id2
    assert run_values(app, [(h1, (1,), None), (h2, (1,), None)]) == [2, 101]


# -- built-ins in workers ----------------------------------------------------------------------

def test_builtins_run_in_workers():
    P = mpop.ProcTaskFnID
    with make_app(workers=2) as app:
        values = run_values(app, [
            (P.INCREMENT, (41,), None),
            (P.INCREMENT, (10,), {"step": 5}),
            (P.INCREMENT, (-1,), None),
            (P.ADD, (2, 3), None),
            (P.ADD, (2.5, 0.25), None),
            (P.ADD, ("ab", "cd"), None),
            (P.MULTIPLY, (6, 7), None),
            (P.MULTIPLY, ("ab", 3), None),
            (P.MULTIPLY, (2**40, 2**40), None),
            (int(P.ADD), (1, 1), None),
        ])
    assert values == [42, 15, 0, 5, 2.75, "abcd", 42, "ababab", 2**80, 2]


def test_builtins_by_fn_id_keyword(app):
    app.enqueue(fn_id=mpop.ProcTaskFnID.MULTIPLY, args=(3, 4))
    app.enqueue(fn_id=int(mpop.ProcTaskFnID.INCREMENT), args=(3,), kwargs={"step": 4})
    res = app.run(timeout=TIMEOUT)
    assert res.values() == [12, 7]
    assert [r.fn_id for r in res.results] == [int(mpop.ProcTaskFnID.MULTIPLY), int(mpop.ProcTaskFnID.INCREMENT)]


def test_builtins_through_submit_and_map(app):
    assert app.submit(mpop.ProcTaskFnID.ADD, 20, 22).result(timeout=TIMEOUT) == 42
    assert list(app.map(mpop.ProcTaskFnID.INCREMENT, range(5))) == [1, 2, 3, 4, 5]


# -- registration after start ------------------------------------------------------------------

def test_register_after_start_reaches_running_workers():
    with make_app(workers=2, auto_terminate=False) as app:
        app.start()
        # the workers are up and have resolved a first handler
        assert app.submit(double, 4).result(timeout=TIMEOUT) == 8
        fid = app.register(square)
        assert app.submit(square, 9).result(timeout=TIMEOUT) == 81

        def late_closure(x, k=7):
            return x * k

        app.register(late_closure, fn_id=0xB777)
        for i in range(20):
            app.enqueue(fn_id=0xB777, args=(i,))
        res = app.run(timeout=TIMEOUT)
        assert res.values() == [i * 7 for i in range(20)]
        assert fid in {d["fn_id"] for d in app.list_functions()}


def test_register_after_an_auto_terminated_run(app):
    app.enqueue(double, args=(1,))
    assert app.run(timeout=TIMEOUT).values() == [2]
    app.register(negate, fn_id=0xB500)
    app.enqueue(fn_id=0xB500, args=(3,))
    assert app.run(timeout=TIMEOUT).values() == [-3]


# -- self-registration -------------------------------------------------------------------------

def test_unregistered_function_registers_itself_on_enqueue(app):
    assert not any(d["name"] == "square" for d in app.list_functions())
    app.enqueue(square, args=(3,))
    app.enqueue(square, args=(4,))
    entries = [d for d in app.list_functions() if d["name"] == "square"]
    assert len(entries) == 1, "the same function must register only once"
    assert entries[0]["fn_id"] >= 0x1000
    res = app.run(timeout=TIMEOUT)
    assert res.values() == [9, 16]
    assert {r.fn_id for r in res.results} == {entries[0]["fn_id"]}


def test_unregistered_function_registers_itself_on_submit(app):
    fut = app.submit(negate, 5)
    assert fut.result(timeout=TIMEOUT) == -5
    entries = [d for d in app.list_functions() if d["name"] == "negate"]
    assert len(entries) == 1
    assert app.submit(negate, 6).result(timeout=TIMEOUT) == -6
    assert len([d for d in app.list_functions() if d["name"] == "negate"]) == 1


def test_registered_function_is_not_registered_again(app):
    fid = app.register(double, fn_id=0xB321)
    before = len(app.list_functions())
    app.enqueue(double, args=(2,))
    assert len(app.list_functions()) == before
    res = app.run(timeout=TIMEOUT)
    assert res.results[0].fn_id == fid
    assert res.values() == [4]


def test_lambdas_and_closures_run_without_being_registered(app):
    offset = 1000
    closure = lambda x: x + offset  # noqa: E731
    before = app.list_functions()
    app.enqueue(closure, args=(1,))
    app.enqueue(lambda s: s.upper(), args=("abc",))
    assert app.run(timeout=TIMEOUT).values() == [1001, "ABC"]
    assert app.list_functions() == before


def add_three(a, b, c):
    return a + 10 * b + 100 * c


def test_functions_made_at_run_time_do_not_pile_up_in_the_registry():
    # Distinct partials, closures and bound methods, far more than the registry holds:
    # they travel with their tasks, and nothing accumulates for the app's life.
    class Scaler:
        def __init__(self, k):
            self.k = k

        def scale(self, x):
            return self.k * x

    with make_app(workers=1, auto_terminate=False, registry_bytes=1 << 16) as app:
        futs = []
        for i in range(3000):
            futs.append(app.submit(functools.partial(add_three, i), 1, c=2))
            futs.append(app.submit(lambda x, i=i: x + i, 1))
            futs.append(app.submit(Scaler(i).scale, 2))
        values = [f.result(timeout=TIMEOUT) for f in futs]
        assert values == [v for i in range(3000) for v in (i + 10 + 200, 1 + i, 2 * i)]
        assert list(app.map(functools.partial(add_three, c=1), range(5), range(5))) == \
            [a + 10 * a + 100 for a in range(5)]
        # Only the module-level function the partials wrap is registered.
        assert [d["name"] for d in app.list_functions() if not d["builtin"]] == ["add_three"]
        # A closure over 5 MB travels through the argument pool (the registry holds 64 KB),
        # and the app carries on.
        big = bytes(5_000_000)
        assert app.submit(lambda: len(big)).result(timeout=TIMEOUT) == 5_000_000
        assert app.submit(abs, -3).result(timeout=TIMEOUT) == 3


def test_a_bound_method_is_pickled_once_however_often_it_is_submitted(app):
    class Counter:
        def __init__(self):
            self.base = 100

        def add(self, x):
            return self.base + x

    c = Counter()
    futs = [app.submit(c.add, i) for i in range(50)]  # a new bound method object each time
    assert [f.result(timeout=TIMEOUT) for f in futs] == [100 + i for i in range(50)]
    assert len(app._registry._by_value) == 1


def test_a_function_sent_by_value_may_take_any_keyword(app):
    assert app.submit(lambda blob, x=0: (blob, x), blob=1, x=2).result(timeout=TIMEOUT) == (1, 2)


def test_a_partial_is_checked_against_its_function(app):
    with pytest.raises(TypeError, match="add_three"):
        app.submit(functools.partial(add_three, 1, 2), 3, 4)
    with pytest.raises(TypeError, match="add_three"):
        app.enqueue(functools.partial(add_three, 1), args=(2,), c=3, d=4)


def test_registration_from_several_threads_gets_distinct_ids(app):
    funcs = []
    for i in range(40):
        def f(x, i=i):
            return x + i

        f.__qualname__ = f"threaded_{i}"
        funcs.append(f)
    ids = []
    lock = threading.Lock()

    def worker(chunk):
        for fn in chunk:
            fid = app.register(fn)
            with lock:
                ids.append(fid)

    threads = [threading.Thread(target=worker, args=(funcs[k::4],)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(ids) == 40 and len(set(ids)) == 40
    assert all(i >= 0x1000 for i in ids)


def _module_level(k):
    def handler(x):
        return x * 1000 + k

    handler.__qualname__ = handler.__name__ = f"concurrent_{k}"
    return handler


# 32 functions this module holds under their names: importable, so they register once.
for _k in range(32):
    globals()[f"concurrent_{_k}"] = _module_level(_k)


def test_self_registration_from_several_threads_while_running():
    fns = [globals()[f"concurrent_{k}"] for k in range(32)]
    errors = []
    with make_app(workers=2, auto_terminate=False) as app:
        app.start()

        def produce(t):
            try:
                for i in range(100):
                    app.enqueue(fns[(t * 7 + i) % 32], args=(i,), tsk_id=t * 1000 + i)
            except BaseException as e:  # reported below
                errors.append(e)

        threads = [threading.Thread(target=produce, args=(t,)) for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        res = app.run(timeout=TIMEOUT)
        user = [d for d in app.list_functions() if not d["builtin"]]
    assert len(user) == 32, "each function registers exactly once"
    assert len({d["fn_id"] for d in user}) == 32
    assert len(res) == 400 and res.exit_code == 0
    for r in res.results:
        t, i = divmod(r.tsk_id, 1000)
        assert r.value == i * 1000 + (t * 7 + i) % 32



def test_a_start_failed_by_an_unsendable_handler_can_be_retried():
    # The handlers written into the failed start's segment must be written again into the
    # next one (they were once remembered app-wide and then never sent), and the failed
    # segment must not stay behind.
    box = [threading.Lock()]

    def uses_a_lock(x):  # travels by value, with its closure: a lock cannot
        return (box[0], x)

    app = make_app(workers=2, auto_terminate=False)
    app.register(triple_local)
    app.register(uses_a_lock)
    with pytest.raises(mpop.RegistryError, match="cannot be sent to workers"):
        app.start()
    try:
        assert app.segment_name is None and not [n for n in os.listdir("/dev/shm") if n.startswith(PREFIX)]
        box[0] = None
        app.start()
        assert app.submit(triple_local, 3).result(timeout=TIMEOUT) == 9
        app.enqueue(uses_a_lock, args=(1,))
        assert app.run(timeout=TIMEOUT).values() == [(None, 1)]
    finally:
        app.shutdown()


def triple_local(x):
    return 3 * x


@pytest.mark.parametrize("method", ["spawn", "fork", "forkserver"])
def test_registering_a_handler_again_under_its_id_replaces_it(method):
    # A notebook cell with @app.task(fn_id=...) run again: the new function serves the
    # tasks enqueued from then on, through every path (fast path, fn_id, map chunks).
    with make_app(workers=2, start_method=method, auto_terminate=False) as app:
        @app.task(fn_id=0xB0A0)
        def cell(x):
            return ("first", x)

        assert app.submit(cell, 1).result(timeout=TIMEOUT) == ("first", 1)
        assert list(app.map(cell, range(3))) == [("first", i) for i in range(3)]
        old = cell

        @app.task(fn_id=0xB0A0)
        def cell(x):  # noqa: F811 - the cell run again
            return ("second", x)

        assert app.submit(cell, 2).result(timeout=TIMEOUT) == ("second", 2)
        assert app.submit(0xB0A0, 3).result(timeout=TIMEOUT) == ("second", 3)
        assert list(app.map(cell, range(3))) == [("second", i) for i in range(3)]
        app.enqueue(fn_id=0xB0A0, args=(4,))
        assert app.run(timeout=TIMEOUT).values() == [("second", 4)]
        assert [d["fn_id"] for d in app.list_functions() if d["name"].endswith("cell")] == [0xB0A0]
        # The replaced function object is no handler of the app any more: it travels by
        # value like any function made at run time, and still runs its own code.
        assert app.submit(old, 5).result(timeout=TIMEOUT) == ("first", 5)


def test_another_handler_under_a_taken_id_still_raises(app):
    @app.task(fn_id=0xB0A1)
    def one(x):
        return x

    def two(x):
        return x

    with pytest.raises(mpop.RegistryError, match=r"0xb0a1 is already registered to '.*\.one'"):
        app.register(two, fn_id=0xB0A1)
    with pytest.raises(mpop.RegistryError, match="already registered"):
        app.register(two, fn_id=0xB0A1, name="two")
