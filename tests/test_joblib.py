"""mpop.joblib: joblib.Parallel, and scikit-learn's n_jobs, on mpop workers. Results and
order, generators, exceptions as themselves, aborting a call, thread limits in the workers,
nested Parallel calls, n_jobs, and one app per backend instance, shut down when the
instance is discarded or the interpreter exits."""

from __future__ import annotations

import gc
import os
import time

import joblib
import numpy as np
import pytest
from joblib import Parallel, delayed, parallel_config
from joblib.parallel import get_active_backend

import mpop
import mpop.joblib
from mpop.joblib import MpopBackend
from _helpers import leak_check, pid_alive, run_python, wait_until

THREAD_VARS = ["OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS",
               "VECLIB_MAXIMUM_THREADS", "NUMBA_NUM_THREADS", "NUMEXPR_NUM_THREADS"]

mpop.joblib.register_backend()


@pytest.fixture(autouse=True)
def _no_leaks():
    with leak_check():
        yield


@pytest.fixture(scope="module")
def backend():
    """One backend (so one app) for the tests that only need a working one."""
    with leak_check():
        b = MpopBackend()
        try:
            with parallel_config(backend=b, n_jobs=2):
                Parallel()(delayed(square)(i) for i in range(4))  # the app is up before any test's leak check
            yield b
        finally:
            b.terminate_app()


def square(x: int) -> int:
    return x * x


def add(a: int, b: int = 0) -> int:
    return a + b


def pid(_: object = None) -> int:
    return os.getpid()


def nap(s: float) -> float:
    time.sleep(s)
    return s


class OddError(Exception):
    """An exception of this module's own."""


def fail_on(x: int, bad: int = 3) -> int:
    if x == bad:
        raise OddError(f"item {x} is odd one out")
    return x


def fail_first_or_sleep(x: int) -> int:
    if x == 0:
        raise KeyError("first item failed")
    time.sleep(60)
    return x


def set_marker(value: str) -> None:
    os.environ["MPOP_TEST_MARKER"] = value


def marker(_: object = None) -> tuple:
    return os.environ.get("MPOP_TEST_MARKER"), os.environ.get("OMP_NUM_THREADS")


def thread_settings(_: object = None) -> dict:
    import numpy  # loaded here, in the worker (spawn) or inherited (fork)
    from threadpoolctl import threadpool_info

    blas = [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]
    return {"env": {v: os.environ.get(v) for v in THREAD_VARS}, "blas": blas, "numpy": numpy.__name__}


def inner_parallel(k: int) -> tuple:
    backend, n_jobs = get_active_backend()
    out = Parallel(n_jobs=2)(delayed(square)(i) for i in range(k))
    return type(backend).__name__, out


def twice_nested(k: int) -> tuple:
    return Parallel(n_jobs=2)(delayed(inner_parallel)(j) for j in range(k))


# -- results ---------------------------------------------------------------------------------


def test_import_mpop_does_not_import_joblib():
    proc = run_python(["-c", "import sys, mpop; assert 'joblib' not in sys.modules, 'joblib'; "
                             "assert 'mpop.joblib' not in sys.modules, 'mpop.joblib'; print('ok')"])
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr


def test_parallel_returns_results_in_order(backend):
    with parallel_config(backend=backend, n_jobs=2):
        assert Parallel()(delayed(square)(i) for i in range(2000)) == [i * i for i in range(2000)]
        assert Parallel()(delayed(add)(i, b=10) for i in range(5)) == [10, 11, 12, 13, 14]


def test_parallel_runs_in_the_apps_workers(backend):
    with parallel_config(backend=backend, n_jobs=2):
        pids = set(Parallel(batch_size=1)(delayed(pid)(i) for i in range(50)))
    workers = {w["pid"] for w in backend.app.status()["workers"]}
    assert pids <= workers and os.getpid() not in pids


def test_return_as_generator_yields_lazily_in_order(backend):
    with parallel_config(backend=backend, n_jobs=2):
        gen = Parallel(return_as="generator")(delayed(square)(i) for i in range(100))
        assert not isinstance(gen, list)
        assert next(gen) == 0
        assert list(gen) == [i * i for i in range(1, 100)]


@pytest.mark.skipif(tuple(map(int, joblib.__version__.split(".")[:2])) < (1, 4),
                    reason="generator_unordered came with joblib 1.4")
def test_return_as_generator_unordered(backend):
    with parallel_config(backend=backend, n_jobs=2):
        out = list(Parallel(return_as="generator_unordered", batch_size=1)(
            delayed(nap)(s) for s in (0.3, 0.0, 0.0, 0.0)))
    assert sorted(out) == [0.0, 0.0, 0.0, 0.3] and out[-1] == 0.3


def test_functions_defined_in_a_test_or_a_lambda_travel(backend):
    offset = 5
    with parallel_config(backend=backend, n_jobs=2):
        assert Parallel()(delayed(lambda x: x + offset)(i) for i in range(3)) == [5, 6, 7]


# -- exceptions ----------------------------------------------------------------------------


def test_an_exception_is_raised_as_itself_with_the_worker_traceback(backend):
    with parallel_config(backend=backend, n_jobs=2):
        with pytest.raises(OddError, match="item 3 is odd one out") as info:
            Parallel()(delayed(fail_on)(i) for i in range(10))
    assert type(info.value) is OddError
    assert "fail_on" in str(info.value.__cause__)


def test_a_generator_raises_the_exception_as_itself(backend):
    got = []
    with parallel_config(backend=backend, n_jobs=2):
        with pytest.raises(OddError, match="item 3"):
            for v in Parallel(return_as="generator", batch_size=1)(delayed(fail_on)(i) for i in range(10)):
                got.append(v)
    # joblib raises as soon as it learns of the error: some of the values before it at most.
    assert got == [0, 1, 2][:len(got)]


def test_an_error_aborts_the_call_and_stops_its_running_batches():
    b = MpopBackend()
    try:
        with parallel_config(backend=b, n_jobs=2):
            with pytest.raises(KeyError, match="first item failed"):
                Parallel(batch_size=1)(delayed(fail_first_or_sleep)(i) for i in range(4))
            # The batch that sleeps for a minute was stopped: its worker was replaced, and
            # the next call has both workers.
            assert wait_until(lambda: sum(w["restarts"] for w in b.app.status()["workers"]) >= 1)
            assert Parallel()(delayed(square)(i) for i in range(10)) == [i * i for i in range(10)]
    finally:
        b.terminate_app()


def test_closing_a_generator_early_stops_its_running_batches():
    b = MpopBackend()
    try:
        with parallel_config(backend=b, n_jobs=2):
            gen = Parallel(return_as="generator", batch_size=1)(delayed(nap)(s) for s in (0.0, 60, 60, 60))
            assert next(gen) == 0.0
            with pytest.warns(UserWarning, match="cancelled"):  # joblib's own word on it
                gen.close()  # joblib aborts the call: the two naps running are stopped
            assert wait_until(lambda: sum(w["restarts"] for w in b.app.status()["workers"]) >= 1)
            assert Parallel()(delayed(square)(i) for i in range(4)) == [0, 1, 4, 9]
    finally:
        b.terminate_app()


# -- the app ---------------------------------------------------------------------------------


def test_one_app_serves_every_call_of_a_configuration():
    with parallel_config(backend="mpop", n_jobs=2):
        backend, _ = get_active_backend()
        first = set(Parallel(batch_size=1)(delayed(pid)(i) for i in range(20)))
        app = backend.app
        second = set(Parallel(batch_size=1)(delayed(pid)(i) for i in range(20)))
        assert backend.app is app
        workers = {w["pid"] for w in app.status()["workers"]}
        assert first | second <= workers
        # Another n_jobs replaces the app; the first is shut down.
        Parallel(n_jobs=3)(delayed(pid)(i) for i in range(6))
        assert backend.app is not app and backend.app.config["workers"] == 3
        assert app.segment_name is None
        assert wait_until(lambda: not any(pid_alive(p) for p in workers))
        backend.terminate_app()


def test_the_app_is_shut_down_when_its_backend_is_discarded():
    with parallel_config(backend="mpop", n_jobs=2):
        backend, _ = get_active_backend()
        Parallel()(delayed(square)(i) for i in range(10))
        app = backend.app
        workers = {w["pid"] for w in app.status()["workers"]}
    del backend
    gc.collect()
    assert app.segment_name is None
    assert wait_until(lambda: not any(pid_alive(p) for p in workers))


def test_parallel_with_the_backend_by_name_leaves_nothing_behind():
    assert Parallel(n_jobs=2, backend="mpop")(delayed(square)(i) for i in range(10)) == [i * i for i in range(10)]
    gc.collect()  # the leak check then finds no worker and no segment


def test_the_app_is_shut_down_at_interpreter_exit():
    code = ("import os, mpop.joblib\n"
            "from joblib import Parallel, delayed, parallel_config\n"
            "mpop.joblib.register_backend()\n"
            "cfg = parallel_config(backend='mpop', n_jobs=2)\n"
            "cfg.__enter__()\n"
            "print(sorted(set(Parallel(batch_size=1)(delayed(os.getpid)() for i in range(20)))))\n")
    proc = run_python(["-c", code])
    assert proc.returncode == 0, proc.stderr
    pids = eval(proc.stdout.strip())
    assert pids and wait_until(lambda: not any(pid_alive(p) for p in pids))
    # ...and its segment: the leak check (the script is one of the processes it watches).


def test_n_jobs_minus_one_and_none_mean_the_cpus_this_process_may_use():
    cpus = len(os.sched_getaffinity(0))
    b = MpopBackend()
    assert b.effective_n_jobs(-1) == cpus
    assert b.effective_n_jobs(None) == cpus
    assert b.effective_n_jobs(-cpus - 5) == 1
    with pytest.raises(ValueError, match="n_jobs == 0"):
        b.effective_n_jobs(0)
    try:
        with parallel_config(backend=b):  # no n_jobs anywhere: every CPU
            Parallel()(delayed(square)(i) for i in range(4))
        assert b.app.config["workers"] == cpus
    finally:
        b.terminate_app()


def test_n_jobs_one_runs_in_this_process_without_an_app():
    b = MpopBackend()
    with parallel_config(backend=b, n_jobs=1):
        assert Parallel()(delayed(pid)(i) for i in range(3)) == [os.getpid()] * 3
    assert b.app is None


def test_mpop_options_go_to_the_app_and_bad_ones_say_so():
    b = MpopBackend(max_tasks_per_worker=2)
    try:
        with parallel_config(backend=b, n_jobs=2):
            Parallel(batch_size=1)(delayed(square)(i) for i in range(8))
        assert b.app.config["max_tasks_per_worker"] == 2
    finally:
        b.terminate_app()
    with parallel_config(backend="mpop", n_jobs=2, queue_slots=3):
        with pytest.raises(mpop.ConfigError, match="queue_slots"):
            Parallel()(delayed(square)(i) for i in range(3))
    with pytest.raises(mpop.ConfigError, match="n_jobs"):
        MpopBackend(workers=2)


def test_a_users_initializer_runs_after_the_thread_limits():
    with parallel_config(backend="mpop", n_jobs=2, inner_max_num_threads=1, initializer=set_marker,
                         initargs=("set",)):
        backend, _ = get_active_backend()
        got = set(Parallel(batch_size=1)(delayed(marker)(i) for i in range(4)))
        backend.terminate_app()
    assert got == {("set", "1")}


def test_a_batch_too_large_for_the_pool_names_pool_bytes():
    with parallel_config(backend="mpop", n_jobs=2, pool_bytes=1 << 16):
        with pytest.raises(ValueError, match="pool_bytes"):
            Parallel()(delayed(len)(b"x" * 1_000_000) for _ in range(2))


def test_register_backend_under_another_name():
    mpop.joblib.register_backend("mpop-too")
    with parallel_config(backend="mpop-too", n_jobs=2):
        backend, _ = get_active_backend()
        assert isinstance(backend, MpopBackend)
        assert Parallel()(delayed(square)(i) for i in range(3)) == [0, 1, 4]
        backend.terminate_app()
    with pytest.raises(TypeError, match="non-empty string"):
        mpop.joblib.register_backend("")


# -- threads in the workers ------------------------------------------------------------------


@pytest.mark.parametrize("start_method", ["spawn", "fork"])
def test_workers_limit_blas_and_openmp_threads_as_joblib_does(start_method):
    # fork: the worker inherits this process's numpy, its BLAS already loaded with as many
    # threads as CPUs; threadpoolctl limits it. spawn: the variables are set before the
    # worker loads numpy.
    with parallel_config(backend="mpop", n_jobs=2, inner_max_num_threads=1, start_method=start_method):
        backend, _ = get_active_backend()
        settings = Parallel(batch_size=1)(delayed(thread_settings)(i) for i in range(2))
        backend.terminate_app()
    for s in settings:
        assert s["env"] == {v: "1" for v in THREAD_VARS}
        assert s["blas"] and set(s["blas"]) == {1}, s


def test_the_default_thread_limit_is_joblibs():
    from joblib.externals.loky import cpu_count

    default = str(max(cpu_count() // 2, 1))
    with parallel_config(backend="mpop", n_jobs=2):
        backend, _ = get_active_backend()
        settings = Parallel(batch_size=1)(delayed(thread_settings)(i) for i in range(2))
        backend.terminate_app()
    for s in settings:
        assert s["env"] == {v: os.environ.get(v, default) for v in THREAD_VARS}


def test_nested_parallel_uses_threads_then_runs_sequentially(backend):
    with parallel_config(backend=backend, n_jobs=2):
        outer = Parallel()(delayed(inner_parallel)(k) for k in range(3))
        assert outer == [("ThreadingBackend", [i * i for i in range(k)]) for k in range(3)]
        twice = Parallel()(delayed(twice_nested)(k) for k in range(1, 3))
    assert twice == [[("SequentialBackend", [i * i for i in range(j)]) for j in range(k)] for k in range(1, 3)]


# -- scikit-learn -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data():
    from sklearn.datasets import make_classification

    return make_classification(n_samples=300, n_features=8, random_state=0)


def test_cross_val_score_under_the_backend(backend, data):
    from sklearn.model_selection import cross_val_score
    from sklearn.tree import DecisionTreeClassifier

    X, y = data
    expected = cross_val_score(DecisionTreeClassifier(random_state=0), X, y, cv=4, n_jobs=1)
    with parallel_config(backend=backend):
        got = cross_val_score(DecisionTreeClassifier(random_state=0), X, y, cv=4, n_jobs=2)
    np.testing.assert_array_equal(got, expected)


def test_grid_search_under_the_backend(backend, data):
    from sklearn.model_selection import GridSearchCV
    from sklearn.tree import DecisionTreeClassifier

    X, y = data
    grid = {"max_depth": [2, 4, 8], "min_samples_leaf": [1, 5]}

    def search(n_jobs):
        return GridSearchCV(DecisionTreeClassifier(random_state=0), grid, cv=3, n_jobs=n_jobs).fit(X, y)

    expected = search(1)
    before = backend.app.status()["queue"]
    with parallel_config(backend=backend):
        got = search(2)
    assert got.best_params_ == expected.best_params_
    np.testing.assert_array_equal(got.cv_results_["mean_test_score"], expected.cv_results_["mean_test_score"])
    assert backend.app.status()["queue"] != before  # the fits ran as the app's tasks
