"""Errors: a handler's exception comes back as itself with the worker's traceback as
__cause__, enqueue-time errors (unknown id, bad arguments, unserialisable arguments), use
after shutdown, TaskResult failures and RunResult's failure reporting."""

import os
import threading

import pytest

import mpop
from _helpers import app_factory, app_fixture, no_leaks_fixture

PREFIX = f"mpop-err{os.getpid()}"
TIMEOUT = 120  # a safety net against hangs, never a performance expectation


no_leaks = no_leaks_fixture(PREFIX)
make_app = app_factory(PREFIX)
app = app_fixture(make_app)


# -- handlers and exceptions (module level: importable in workers) ---------------------------

class CustomError(Exception):
    def __init__(self, msg, code=0):
        super().__init__(msg)
        self.code = code

    def __reduce__(self):
        return (CustomError, (self.args[0], self.code))


class UnpicklableError(Exception):
    """Cannot be pickled: it holds a lock."""

    def __init__(self, msg):
        super().__init__(msg)
        self.lock = threading.Lock()


class NoRebuildError(Exception):
    """Pickles, but cannot be rebuilt: __init__ needs two arguments, args holds one."""

    def __init__(self, a, b):
        super().__init__(f"{a} and {b}")


def fails_with_value_error(x):
    if x == 3:
        raise ValueError(f"bad value {x}")
    return x * 10


def raise_custom(code):
    raise CustomError("custom failure", code=code)


def raise_unpicklable(text):
    raise UnpicklableError(text)


def raise_no_rebuild():
    raise NoRebuildError("left", "right")


def raise_chained():
    try:
        {}["missing"]
    except KeyError as e:
        raise RuntimeError("outer problem") from e


def deeply_nested_failure(depth):
    if depth == 0:
        raise ZeroDivisionError("bottom of the stack")
    return deeply_nested_failure(depth - 1)


def ok(x):
    return x


def add(a, b=1):
    return a + b


def kw_only(a, *, flag):
    return (a, flag)


def return_task_result(kind):
    if kind == "ok":
        return mpop.TaskResult(success=True, value=7)
    if kind == "error":
        return mpop.TaskResult(success=False, error=LookupError("told to fail"))
    if kind == "no-error":
        return mpop.TaskResult(success=False, value="half done")
    raise AssertionError(kind)


def return_unpicklable(kind):
    if kind == "lock":
        return threading.Lock()
    if kind == "generator":
        return (i for i in range(3))
    if kind == "lambda":
        return lambda: 1
    return kind


def big_bytes(n):
    return b"x" * n


def raise_big_message(n):
    raise ValueError("m" * n)


def raise_keyboard_interrupt():
    raise KeyboardInterrupt("from the handler")


def exit_in_handler(code):
    raise SystemExit(code)


# -- a handler's exception ---------------------------------------------------------------------

def test_handler_exception_comes_back_as_itself_with_traceback(app):
    for i in range(6):
        app.enqueue(fails_with_value_error, args=(i,))
    res = app.run(timeout=TIMEOUT)
    bad = res.results[3]
    assert bad.success is False
    assert type(bad.error) is ValueError
    assert str(bad.error) == "bad value 3"
    cause = bad.error.__cause__
    assert cause is not None
    text = str(cause)
    assert "Traceback" in text
    assert "fails_with_value_error" in text
    assert "ValueError: bad value 3" in text
    assert bad.value is None
    with pytest.raises(ValueError, match="bad value 3"):
        bad.get()


def test_rest_of_the_run_is_unaffected(app):
    for i in range(10):
        app.enqueue(fails_with_value_error, args=(i,))
    res = app.run(timeout=TIMEOUT)
    assert len(res) == 10
    for i, r in enumerate(res.results):
        if i == 3:
            continue
        assert r.success is True and r.error is None and r.value == i * 10
    assert [r.tsk_id for r in res.failures] == [res.results[3].tsk_id]


def test_failure_carries_identity_fields(app):
    fid = app.register(fails_with_value_error, fn_id=0xBEEF)
    app.enqueue(fn_id=fid, args=(3,), tsk_id=4242)
    r = app.run(timeout=TIMEOUT).results[0]
    assert (r.success, r.tsk_id, r.fn_id) == (False, 4242, 0xBEEF)
    assert r.seq is not None
    assert r.attempts == 1
    assert r.worker_id is not None


def test_custom_exception_keeps_its_attributes(app):
    app.enqueue(raise_custom, args=(17,))
    err = app.run(timeout=TIMEOUT).results[0].error
    assert type(err) is CustomError
    assert err.code == 17
    assert str(err) == "custom failure"
    assert "raise_custom" in str(err.__cause__)


def test_chained_exception_traceback_shows_both(app):
    app.enqueue(raise_chained)
    err = app.run(timeout=TIMEOUT).results[0].error
    assert type(err) is RuntimeError and str(err) == "outer problem"
    tb = str(err.__cause__)
    assert "KeyError" in tb and "missing" in tb
    assert "raise_chained" in tb


def test_traceback_shows_the_whole_handler_stack(app):
    app.enqueue(deeply_nested_failure, args=(5,))
    err = app.run(timeout=TIMEOUT).results[0].error
    assert type(err) is ZeroDivisionError
    assert str(err.__cause__).count("deeply_nested_failure") >= 6


def test_unpicklable_exception_becomes_mpop_error_with_its_text(app):
    app.enqueue(raise_unpicklable, args=("the lock text",))
    app.enqueue(ok, args=(1,))
    res = app.run(timeout=TIMEOUT)
    err = res.results[0].error
    assert isinstance(err, mpop.MpopError)
    assert "the lock text" in str(err)
    assert "UnpicklableError" in str(err)
    assert err.__cause__ is not None
    assert "raise_unpicklable" in str(err.__cause__)
    assert res.results[1].value == 1


def test_exception_that_cannot_be_rebuilt_becomes_mpop_error(app):
    app.enqueue(raise_no_rebuild)
    err = app.run(timeout=TIMEOUT).results[0].error
    assert isinstance(err, mpop.MpopError)
    assert "left and right" in str(err)
    assert "NoRebuildError" in str(err)


def test_exception_class_defined_in_a_closure_arrives_as_itself(app):
    # pickle cannot send a class that no module holds; cloudpickle sends it by value.
    def local_raiser(x):
        class LocalError(Exception):
            pass

        raise LocalError(f"local {x}")

    app.enqueue(local_raiser, args=(5,))
    err = app.run(timeout=TIMEOUT).results[0].error
    assert type(err).__name__ == "LocalError" and str(err) == "local 5"
    assert "LocalError: local 5" in str(err.__cause__)


def test_system_exit_in_handler_is_that_tasks_error(app):
    app.enqueue(exit_in_handler, args=(3,))
    for i in range(5):
        app.enqueue(ok, args=(i,))
    res = app.run(timeout=TIMEOUT)
    assert res.results[0].success is False
    assert isinstance(res.results[0].error, SystemExit)
    assert [r.value for r in res.results[1:]] == [0, 1, 2, 3, 4]


def test_a_returned_lambda_comes_back_by_value(app):
    app.enqueue(return_unpicklable, args=("lambda",))
    (res,) = app.run(timeout=TIMEOUT).results
    assert res.success and callable(res.value)


@pytest.mark.parametrize("kind", ["lock", "generator"])
def test_unpicklable_return_value_fails_only_that_task(app, kind):
    app.enqueue(return_unpicklable, args=(kind,))
    app.enqueue(return_unpicklable, args=("fine",))
    res = app.run(timeout=TIMEOUT)
    bad, good = res.results
    assert bad.success is False
    assert isinstance(bad.error, Exception)
    assert good.success is True and good.value == "fine"
    assert res.stats.get("crashes", 0) == 0


def test_result_larger_than_the_pool_fails_with_a_clear_error():
    with make_app(pool_bytes=1 << 20) as app:
        app.enqueue(big_bytes, args=(2 << 20,))
        app.enqueue(big_bytes, args=(10,))
        res = app.run(timeout=TIMEOUT)
    bad, good = res.results
    assert good.success and good.value == b"x" * 10
    assert bad.success is False
    assert isinstance(bad.error, mpop.MpopError)
    assert "pool_bytes" in str(bad.error), str(bad.error)


def test_argument_larger_than_the_pool_raises_at_enqueue():
    with make_app(pool_bytes=1 << 20) as app:
        with pytest.raises(ValueError, match="pool_bytes"):
            app.enqueue(ok, args=(b"y" * (2 << 20),))
        app.enqueue(ok, args=(b"y" * 1000,))
        assert app.run(timeout=TIMEOUT).values() == [b"y" * 1000]


def test_big_error_message_comes_back_whole(app):
    app.enqueue(raise_big_message, args=(200_000,))
    err = app.run(timeout=TIMEOUT).results[0].error
    assert type(err) is ValueError
    assert str(err) == "m" * 200_000
    assert "raise_big_message" in str(err.__cause__)


def test_deep_recursion_traceback(app):
    app.enqueue(deeply_nested_failure, args=(400,))
    app.enqueue(ok, args=(1,))
    res = app.run(timeout=TIMEOUT)
    err = res.results[0].error
    assert type(err) is ZeroDivisionError
    assert "deeply_nested_failure" in str(err.__cause__)
    assert res.results[1].value == 1


def test_keyboard_interrupt_raised_by_a_handler_is_that_tasks_error(app):
    app.enqueue(raise_keyboard_interrupt)
    for i in range(3):
        app.enqueue(ok, args=(i,))
    res = app.run(timeout=TIMEOUT)
    assert res.results[0].success is False
    assert isinstance(res.results[0].error, KeyboardInterrupt)
    assert [r.value for r in res.results[1:]] == [0, 1, 2]


def test_handler_exception_through_submit(app):
    fut = app.submit(fails_with_value_error, 3)
    with pytest.raises(ValueError, match="bad value 3") as info:
        fut.result(timeout=TIMEOUT)
    assert "fails_with_value_error" in str(info.value.__cause__)


# -- errors raised at enqueue ------------------------------------------------------------------

@pytest.mark.parametrize("how", ["fn", "fn_id"])
def test_unknown_fn_id_raises_registry_error_at_enqueue(app, how):
    kw = {"fn_id": 0x7777} if how == "fn_id" else {}
    with pytest.raises(mpop.RegistryError) as info:
        app.enqueue(*([0x7777] if how == "fn" else []), args=(1,), **kw)
    assert isinstance(info.value, KeyError)
    assert "0x7777" in str(info.value).lower()
    assert app.status()["queue"]["submitted"] == 0


def test_unknown_fn_id_in_enqueue_many_and_submit(app):
    with pytest.raises(mpop.RegistryError):
        app.enqueue_many([(0x7778, 1)])
    with pytest.raises(mpop.RegistryError):
        app.submit(0x7779, 1)


def test_too_many_arguments_raise_type_error_naming_the_handler(app):
    with pytest.raises(TypeError) as info:
        app.enqueue(add, args=(1, 2, 3))
    assert "add" in str(info.value)
    assert app.status()["queue"]["submitted"] == 0


def test_too_few_arguments_raise_type_error(app):
    with pytest.raises(TypeError, match="add"):
        app.enqueue(add)


def test_unexpected_keyword_raises_type_error(app):
    with pytest.raises(TypeError, match="add"):
        app.enqueue(add, args=(1,), nope=2)
    with pytest.raises(TypeError, match="add"):
        app.enqueue(add, args=(1,), kwargs={"nope": 2})


def test_missing_keyword_only_argument_raises_type_error(app):
    with pytest.raises(TypeError, match="kw_only"):
        app.enqueue(kw_only, args=(1,))
    assert app.enqueue(kw_only, args=(1,), flag=True)
    assert app.run(timeout=TIMEOUT).values() == [(1, True)]


def test_builtin_with_wrong_arguments_raises_type_error(app):
    with pytest.raises(TypeError, match="INCREMENT"):
        app.enqueue(mpop.ProcTaskFnID.INCREMENT, args=(1, 2, 3))
    with pytest.raises(TypeError, match="ADD"):
        app.enqueue(mpop.ProcTaskFnID.ADD, args=(1,))


def test_wrong_arguments_through_submit_and_enqueue_many(app):
    with pytest.raises(TypeError, match="add"):
        app.submit(add, 1, 2, 3)
    with pytest.raises(TypeError, match="add"):
        app.enqueue_many([(add, 1, 2, 3)])


def _unserialisable_values():
    return [
        pytest.param(threading.Lock(), id="lock"),
        pytest.param((x for x in range(3)), id="generator"),
        pytest.param([1, threading.Lock()], id="lock-in-list"),
        pytest.param({"k": threading.Lock()}, id="lock-in-dict"),
    ]


def call_it(f, *args):
    return f(*args)


def test_lambdas_and_closures_as_arguments_travel_by_value(app):
    # pickle cannot send them; cloudpickle does (as it does for handlers).
    k = 10
    app.start()
    assert app.submit(call_it, lambda x: x + k, 1).result(timeout=TIMEOUT) == 11
    assert app.submit(call_it, {"f": lambda: 5}["f"]).result(timeout=TIMEOUT) == 5


@pytest.mark.parametrize("value", _unserialisable_values())
def test_unserialisable_argument_raises_type_error_at_enqueue(app, value):
    with pytest.raises(TypeError):
        app.enqueue(ok, args=(value,))
    with pytest.raises(TypeError):
        app.enqueue(ok, kwargs={"x": value})
    # nothing was queued, and the app still works
    app.enqueue(ok, args=("fine",))
    res = app.run(timeout=TIMEOUT)
    assert res.values() == ["fine"]


def test_an_argument_nested_too_deeply_raises_type_error(app):
    deep: list = []
    for _ in range(5000):
        deep = [deep]
    with pytest.raises(TypeError, match="nested too deeply"):
        app.enqueue(ok, args=(deep,))
    app.start()
    with pytest.raises(TypeError, match="nested too deeply"):
        app.enqueue(ok, args=(deep,))  # the native path while running
    with pytest.raises(TypeError, match="nested too deeply"):
        app.submit(ok, deep)
    assert app.submit(ok, 5).result(timeout=TIMEOUT) == 5


def test_unserialisable_argument_while_running(app):
    app.start()
    with pytest.raises(TypeError):
        app.enqueue(ok, args=(threading.Lock(),))
    with pytest.raises(TypeError):
        app.submit(ok, threading.Lock())
    assert app.submit(ok, 5).result(timeout=TIMEOUT) == 5


def test_unserialisable_argument_message_names_the_handler(app):
    with pytest.raises(TypeError) as info:
        app.enqueue(ok, args=(threading.Lock(),))
    assert "ok" in str(info.value)


# -- use after shutdown ------------------------------------------------------------------------

def _calls_after_shutdown():
    return {
        "enqueue": lambda a: a.enqueue(ok, args=(1,)),
        "enqueue_many": lambda a: a.enqueue_many([(ok, 1)]),
        "submit": lambda a: a.submit(ok, 1),
        "map": lambda a: list(a.map(ok, [1, 2])),
        "run": lambda a: a.run(),
        "start": lambda a: a.start(),
        "register": lambda a: a.register(add),
        "register_handlers": lambda a: a.register_handlers(handlers_dict={0xB000: add}),
        "scale": lambda a: a.scale(1),
    }


@pytest.mark.parametrize("call", list(_calls_after_shutdown()))
@pytest.mark.parametrize("used", [False, True], ids=["unused", "used"])
def test_use_after_shutdown_raises_shutdown_error(call, used):
    a = make_app()
    if used:
        a.enqueue(ok, args=(1,))
        assert a.run(timeout=TIMEOUT).values() == [1]
    a.shutdown()
    with pytest.raises(mpop.ShutdownError) as info:
        _calls_after_shutdown()[call](a)
    assert isinstance(info.value, RuntimeError)
    assert isinstance(info.value, mpop.MpopError)


def test_use_after_context_manager_exit():
    with make_app() as a:
        a.enqueue(ok, args=(1,))
        a.run(timeout=TIMEOUT)
    with pytest.raises(mpop.ShutdownError):
        a.enqueue(ok, args=(2,))


def test_shutdown_twice_is_harmless(app):
    app.enqueue(ok, args=(1,))
    app.run(timeout=TIMEOUT)
    app.shutdown()
    app.shutdown()


# -- TaskResult returned by a handler ----------------------------------------------------------

def test_task_result_success_returned_by_handler(app):
    app.enqueue(return_task_result, args=("ok",))
    r = app.run(timeout=TIMEOUT).results[0]
    assert r.success is True and r.value == 7 and r.error is None


def test_task_result_failure_with_error_returned_by_handler(app):
    app.enqueue(return_task_result, args=("error",))
    app.enqueue(ok, args=(2,))
    res = app.run(timeout=TIMEOUT)
    r = res.results[0]
    assert r.success is False
    assert type(r.error) is LookupError
    assert str(r.error) == "told to fail"
    with pytest.raises(LookupError, match="told to fail"):
        r.get()
    assert res.exit_code == 1
    assert res.results[1].value == 2


def test_task_result_failure_without_error_returned_by_handler(app):
    app.enqueue(return_task_result, args=("no-error",))
    r = app.run(timeout=TIMEOUT).results[0]
    assert r.success is False
    assert isinstance(r.error, mpop.MpopError)
    assert "half done" in str(r.error)
    with pytest.raises(mpop.MpopError):
        r.get()


def test_task_result_failure_through_submit(app):
    with pytest.raises(LookupError, match="told to fail"):
        app.submit(return_task_result, "error").result(timeout=TIMEOUT)
    assert app.submit(return_task_result, "ok").result(timeout=TIMEOUT) == 7


# -- RunResult failure reporting ---------------------------------------------------------------

def test_run_result_all_ok(app):
    for i in range(4):
        app.enqueue(ok, args=(i,))
    res = app.run(timeout=TIMEOUT)
    assert res.exit_code == 0
    assert res.failures == []
    assert res.values() == [0, 1, 2, 3]


def test_run_result_with_failures(app):
    app.enqueue(ok, args=(0,))
    app.enqueue(raise_custom, args=(1,))
    app.enqueue(ok, args=(2,))
    app.enqueue(fails_with_value_error, args=(3,))
    app.enqueue(ok, args=(4,))
    res = app.run(timeout=TIMEOUT)
    assert res.exit_code == 1
    assert len(res.failures) == 2
    assert [type(r.error) for r in res.failures] == [CustomError, ValueError]
    assert all(not r.success for r in res.failures)
    with pytest.raises(CustomError):  # the first failure in enqueue order
        res.values()
    assert res.stats["tasks"] == 5
    assert [r.value for r in res.results if r.success] == [0, 2, 4]


def test_exit_code_is_back_to_zero_on_the_next_clean_run(app):
    app.enqueue(fails_with_value_error, args=(3,))
    assert app.run(timeout=TIMEOUT).exit_code == 1
    app.enqueue(ok, args=(1,))
    res = app.run(timeout=TIMEOUT)
    assert res.exit_code == 0 and res.failures == []


def test_many_failures_do_not_break_the_workers():
    with make_app(workers=2) as app:
        for i in range(400):
            app.enqueue(fails_with_value_error, args=(3 if i % 2 else i,))
        res = app.run(timeout=TIMEOUT)
    assert len(res.failures) == 200
    assert all(type(r.error) is ValueError for r in res.failures)
    assert [r.value for r in res.results[::2]] == [i * 10 for i in range(0, 400, 2)]
