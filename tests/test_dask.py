"""mpop.dask.DaskPool: an mpop app inside every Dask worker, fed in batches. Each behaviour
runs on a LocalCluster and on a real `dask scheduler` with two `dask worker` processes
started here on 127.0.0.1; losing a worker process (SIGKILL) mid-map, workers joining
later, closing, and daemonic workers are checked too. Every cluster is torn down by its
fixture, which then checks that no Dask or mpop process and no shared memory is left."""

from __future__ import annotations

import collections
import concurrent.futures as cf
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cloudpickle
import pytest

distributed = pytest.importorskip("distributed")  # the `dask` extra (part of `test`)
dask = pytest.importorskip("dask")
psutil = pytest.importorskip("psutil")  # a dependency of distributed

import mpop  # noqa: E402
from mpop._errors import RemoteTraceback  # noqa: E402
from mpop.dask import BatchSizer, DaskPool  # noqa: E402

from _helpers import env_with_pythonpath, run_python, shm_entries, wait_until  # noqa: E402

TESTS = Path(__file__).resolve().parent
PREFIX = "mpop-dasktest"  # the segments of every app these tests start are named PREFIX_...
STARTUP_TIMEOUT = 60
NOT_DAEMONIC = {"distributed.worker.daemon": False}

# Every mpop worker process seen in a Dask worker, checked gone at the end of the module.
SEEN_MPOP_PIDS: set[int] = set()


# -- handlers (importable: the Dask workers and their mpop workers import this module) -------


def inc(x):
    return x + 1


def slow_inc(x):
    time.sleep(0.001)
    return x + 1


def fail_at(x, bad=57):
    if x == bad:
        raise ValueError(f"item {x} is bad")
    return x * 10


def add(a, b=0, *, c=0):
    return a + b + c


# -- functions run inside the Dask workers (client.run) ---------------------------------------


def _mpop_children() -> list[int]:
    """Pids of the mpop worker processes of this Dask worker process."""
    me = psutil.Process()
    out = []
    for p in me.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "mpop._worker" in " ".join(p.cmdline()):
                out.append(p.pid)
    return out


def _app_of(name: str, dask_worker=None) -> dict | None:
    """The state of pool `name`'s app in this Dask worker."""
    plugin = dask_worker.plugins.get(name)
    if plugin is None:
        return None
    app = plugin.app
    return {"running": app is not None, "segment": app.segment_name if app else None,
            "completed": sum(w["completed"] for w in app.status()["workers"]) if app else 0}


def _plugins_on_scheduler(dask_scheduler=None) -> list[str]:
    return sorted(dask_scheduler.worker_plugins)


def mpop_pids(client) -> dict[str, list[int]]:
    pids = client.run(_mpop_children)
    for v in pids.values():
        SEEN_MPOP_PIDS.update(v)
    return pids


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def our_segments() -> set[str]:
    return shm_entries(PREFIX)


# -- clusters ---------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def nothing_left_behind():
    """After every cluster of the module is down: no mpop worker and no segment of ours."""
    before = our_segments()
    yield
    assert wait_until(lambda: not any(alive(p) for p in SEEN_MPOP_PIDS), 15), \
        f"mpop workers left running: {sorted(p for p in SEEN_MPOP_PIDS if alive(p))}"
    assert wait_until(lambda: not (our_segments() - before), 15), \
        f"segments left in /dev/shm: {sorted(our_segments() - before)}"


@pytest.fixture(scope="module")
def local_client():
    """A LocalCluster of two worker processes (one thread each), not daemonic for as long as
    it runs: its Nanny reads the setting again whenever it restarts a worker."""
    with dask.config.set(NOT_DAEMONIC):
        cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                           dashboard_address=":0", host="127.0.0.1")
        client = distributed.Client(cluster)
        pids = list(client.run(os.getpid).values())
        try:
            yield client
        finally:
            mpop_pids(client)
            client.close()
            cluster.close()
    assert wait_until(lambda: not any(alive(p) for p in pids), 15)


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM each process group, then SIGKILL what is left after 15 s."""
    for p in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=15)


@pytest.fixture(scope="module")
def cli_client():
    """A real cluster: `dask scheduler` and two `dask worker` processes (each under its
    Nanny, made not daemonic through the environment), on 127.0.0.1 with ports the system
    picks; every process in a session of its own, stopped with its group."""
    tmp = tempfile.mkdtemp(prefix="mpop-dask-")
    sched_file = os.path.join(tmp, "scheduler.json")
    env = env_with_pythonpath(DASK_DISTRIBUTED__WORKER__DAEMON="False")
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env["PYTHONPATH"]])
    dask_cli = [sys.executable, "-m", "dask"]
    log = open(os.path.join(tmp, "cluster.log"), "w")
    procs = [subprocess.Popen(dask_cli + ["scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                                          "--scheduler-file", sched_file],
                              env=env, cwd=tmp, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)]
    client = None
    try:
        assert wait_until(lambda: os.path.exists(sched_file) and os.path.getsize(sched_file) > 0,
                          STARTUP_TIMEOUT, 0.1), "dask scheduler did not start"
        for _ in range(2):
            procs.append(subprocess.Popen(
                dask_cli + ["worker", "--scheduler-file", sched_file, "--nthreads", "1", "--no-dashboard",
                            "--host", "127.0.0.1"],
                env=env, cwd=tmp, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        with open(sched_file) as f:
            assert json.load(f)["address"].startswith("tcp://127.0.0.1:")
        client = distributed.Client(scheduler_file=sched_file, timeout=STARTUP_TIMEOUT)
        client.wait_for_workers(2, timeout=STARTUP_TIMEOUT)
        pids = list(client.run(os.getpid).values())
        yield client
        mpop_pids(client)
    finally:
        if client is not None:
            client.close()
        _stop(procs[1:])
        _stop(procs[:1])
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)
    assert wait_until(lambda: not any(alive(p) for p in pids), 15)


@pytest.fixture(scope="module", params=["LocalCluster", "dask-cli"])
def client(request):
    return request.getfixturevalue("local_client" if request.param == "LocalCluster" else "cli_client")


@pytest.fixture(scope="module")
def pool(client):
    with DaskPool(client, workers=1, name=PREFIX) as p:
        yield p


# -- the pure batch sizer -----------------------------------------------------------------------


def test_batch_sizer_aims_at_100ms_of_measured_work_per_batch():
    s = BatchSizer(slots=2, total=None, batch_size=None, max_items=1 << 20)
    assert s.next_size(10**9) == BatchSizer.FIRST  # nothing known yet: small batches
    s.learn(16, 16 * 1_000_000)  # 1 ms an item
    assert s.next_size(10**9) == 100
    s.learn(100, 100 * 10_000)  # time and items averaged apart: the bigger batch weighs more
    assert s.next_size(10**9) == int(100e6 / ((16e6 + 1e6) / (16 + 100)))  # 682, not 1/0.5/(1e6+1e4)
    for _ in range(20):
        s.learn(10_000, 10_000 * 100)  # 0.1 us an item
    assert s.next_size(10**9) == pytest.approx(1_000_000, rel=0.01)
    assert s.next_size(500) == 500  # never beyond the room in the window


def test_batch_sizer_splits_the_end_of_a_known_length_but_not_below_50ms():
    s = BatchSizer(slots=2, total=10_000, batch_size=None, max_items=1 << 20)
    s.learn(100, 100 * 1_000_000)  # 1 ms an item: 100 a batch
    assert s.next_size(10**9) == 100
    s = BatchSizer(slots=2, total=1_000_000, batch_size=None, max_items=1 << 20)
    s.learn(1000, 1000 * 1000)  # 1 us an item: 100k make 100 ms
    assert s.next_size(10**9) == 100_000
    s.took(800_000)
    assert s.next_size(10**9) == 50_000  # a quarter of what is left: 2 x slots shares
    s.took(150_000)
    assert s.next_size(10**9) == 50_000  # 50 ms worth, though a quarter of the rest is 12.5k


def test_batch_sizer_keeps_a_fixed_size_and_a_byte_cap():
    s = BatchSizer(slots=1, total=None, batch_size=7, max_items=100)
    s.learn(7, 7 * 10**9)
    assert s.next_size(1000) == 7
    s = BatchSizer(slots=1, total=None, batch_size=None, max_items=1 << 20)
    s.learn(16, 16)
    s.learn_bytes(16, 16 << 20)  # 1 MiB an item
    assert s.next_size(10**9) == BatchSizer.MAX_BYTES >> 20


# -- packaging -------------------------------------------------------------------------------------


def test_import_mpop_does_not_import_distributed():
    done = run_python(["-c", "import sys, mpop; print(sorted(m for m in ('dask', 'distributed') "
                             "if m in sys.modules))"])
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# -- map -----------------------------------------------------------------------------------------


def test_map_over_a_range_in_order_in_batches(pool):
    it = pool.map(inc, range(100_000))
    assert list(it) == list(range(1, 100_001))
    assert sum(it.batch_sizes) == 100_000
    assert it.batch_sizes[0] == BatchSizer.FIRST
    assert len(it.batch_sizes) < 200  # one Dask task per batch, not per item


def test_map_over_a_list_unordered_yields_each_value_once(pool):
    items = list(range(20_000))
    got = list(pool.map(inc, items, ordered=False, batch_size=1000))
    assert collections.Counter(got) == collections.Counter(x + 1 for x in items)


def test_map_takes_several_iterables_and_stops_at_the_shortest(pool):
    got = list(pool.map(add, range(5000), (2 * x for x in range(10_000)), batch_size=300))
    assert got == [3 * x for x in range(5000)]
    assert list(pool.map(pow, [2, 3], [10, 2], ordered=False)) in ([1024, 9], [9, 1024])


def test_map_sends_functions_made_at_run_time(pool):
    k = 7
    assert list(pool.map(lambda x: x * k, range(50))) == [x * k for x in range(50)]


def test_map_reads_its_input_in_bounded_memory(pool):
    drawn = itertools.count()

    def endless():
        while True:
            yield next(drawn)

    it = pool.map(inc, endless(), max_in_flight=2000)
    assert list(itertools.islice(it, 5000)) == list(range(1, 5001))
    it.close()
    assert next(drawn) <= 5000 + 2000 + 1  # at most max_in_flight items read ahead
    assert max(it.batch_sizes) <= 2000


def test_a_handlers_exception_is_raised_for_its_item_after_the_items_before_it(pool):
    got = []
    with pytest.raises(ValueError, match="item 57 is bad") as info:
        for v in pool.map(fail_at, range(200), batch_size=10):
            got.append(v)
    assert got == [x * 10 for x in range(57)]
    cause = info.value.__cause__
    assert isinstance(cause, RemoteTraceback) and "fail_at" in str(cause) and "ValueError" in str(cause)


def test_unordered_the_exception_comes_after_its_batchs_values(pool):
    got = []
    with pytest.raises(ValueError, match="item 57 is bad"):
        for v in pool.map(fail_at, range(200), ordered=False, batch_size=10):
            got.append(v)
    assert set(range(50, 57)) <= {v // 10 for v in got}  # its batch's items before it
    assert 57 not in {v // 10 for v in got} and all(v % 10 == 0 for v in got)


def test_the_inputs_own_exception_comes_after_the_items_before_it(pool):
    def items():
        yield from range(30)
        raise KeyError("input broke")

    got = []
    with pytest.raises(KeyError, match="input broke"):
        for v in pool.map(inc, items()):
            got.append(v)
    assert got == list(range(1, 31))


def test_map_checks_its_call_before_sending(pool):
    with pytest.raises(TypeError, match="needs at least one iterable"):
        pool.map(inc)
    with pytest.raises(ValueError, match="batch_size"):
        pool.map(inc, range(3), batch_size=0)
    with pytest.raises(TypeError, match="inc cannot take these arguments"):
        list(pool.map(inc, range(3), range(3)))


# -- submit --------------------------------------------------------------------------------------


def test_submit_returns_a_concurrent_future(pool):
    futs = [pool.submit(add, i, 1, c=i) for i in range(20)]
    assert all(isinstance(f, cf.Future) for f in futs)
    done, _ = cf.wait(futs, timeout=60)
    assert len(done) == 20
    assert sorted(f.result() for f in cf.as_completed(futs)) == sorted(2 * i + 1 for i in range(20))
    assert futs[0].cancel() is False  # already on the cluster


def test_submit_delivers_the_handlers_exception(pool):
    fut = pool.submit(fail_at, 57)
    with pytest.raises(ValueError, match="item 57 is bad"):
        fut.result(timeout=60)
    assert isinstance(fut.exception().__cause__, RemoteTraceback)
    with pytest.raises(TypeError, match="cannot take these arguments"):
        pool.submit(inc, 1, 2)


# -- lifecycle -------------------------------------------------------------------------------------


def test_bad_options_raise_before_anything_is_registered(client):
    before = client.run_on_scheduler(_plugins_on_scheduler)
    with pytest.raises(mpop.ConfigError, match="workers"):
        DaskPool(client, workers=0)
    with pytest.raises(TypeError, match="no_such_option"):
        DaskPool(client, no_such_option=1)
    with pytest.raises(mpop.ConfigError, match="persistent"):
        DaskPool(client, persistent=True, name="x")
    with pytest.raises(TypeError, match="distributed.Client"):
        DaskPool("tcp://127.0.0.1:8786")
    assert client.run_on_scheduler(_plugins_on_scheduler) == before


def test_close_stops_every_app_and_interrupts_a_running_map(client):
    before = {w: set(p) for w, p in mpop_pids(client).items()}  # other pools' workers
    pool = DaskPool(client, workers=2, name=PREFIX)
    assert list(pool.map(inc, range(100))) == list(range(1, 101))
    apps = client.run(_app_of, pool.name)
    assert len(apps) == 2 and all(a["running"] for a in apps.values())
    mine = {w: set(p) - before.get(w, set()) for w, p in mpop_pids(client).items()}
    assert all(len(p) == 2 for p in mine.values())
    it = pool.map(slow_inc, range(100_000), batch_size=50)
    unordered = pool.map(slow_inc, range(100_000), batch_size=50, ordered=False)
    all_sent = pool.map(slow_inc, range(400), batch_size=100)  # its 4 batches go out at once
    assert next(it) == 1 and next(unordered) >= 1 and next(all_sent) == 1
    fut = pool.submit(slow_inc, 1)
    pool.close()
    assert fut.result(timeout=30) == 2  # close() waits for submitted calls
    for interrupted in (it, unordered, all_sent):  # none ends as if it were complete
        with pytest.raises(mpop.ShutdownError, match="closed"):
            list(interrupted)
    with pytest.raises(mpop.ShutdownError):
        pool.map(inc, range(3))
    with pytest.raises(mpop.ShutdownError):
        pool.submit(inc, 1)
    pool.close()  # idempotent
    assert all(a is None for a in client.run(_app_of, pool.name).values())
    assert pool.name not in client.run_on_scheduler(_plugins_on_scheduler)
    assert wait_until(lambda: not any(alive(p) for pids in mine.values() for p in pids), 15)
    assert all(not os.path.exists(f"/dev/shm/{a['segment']}") for a in apps.values())


def test_workers_that_join_later_get_an_app(local_client):
    cluster = local_client.cluster
    with DaskPool(local_client, workers=1, name=PREFIX) as pool:
        cluster.scale(3)
        local_client.wait_for_workers(3, timeout=STARTUP_TIMEOUT)
        apps = local_client.run(_app_of, pool.name)
        assert len(apps) == 3 and all(a["running"] for a in apps.values())
        assert list(pool.map(inc, range(3000), batch_size=100)) == list(range(1, 3001))
        mpop_pids(local_client)
        cluster.scale(2)
        assert wait_until(lambda: len(local_client.scheduler_info()["workers"]) == 2, STARTUP_TIMEOUT)


def test_a_lost_worker_process_loses_no_item_and_leaves_no_mpop_process(client):
    with DaskPool(client, workers=2, name=PREFIX) as pool:
        workers = client.run(os.getpid)
        apps = client.run(_app_of, pool.name)
        children = mpop_pids(client)
        it = pool.map(slow_inc, range(6000), batch_size=100)
        got = list(itertools.islice(it, 300))
        victim = next(iter(workers))
        os.kill(workers[victim], signal.SIGKILL)
        got += list(it)
        assert got == list(range(1, 6001))  # every item once, in order
        # The killed worker's mpop processes exited with it, and its segment is gone.
        assert children[victim], "the victim had no mpop workers"
        assert wait_until(lambda: not any(alive(p) for p in children[victim]), 15), \
            f"orphaned mpop workers: {[p for p in children[victim] if alive(p)]}"
        assert wait_until(lambda: not os.path.exists(f"/dev/shm/{apps[victim]['segment']}"), 15)
        # Its replacement has an app of this pool, which runs work.
        client.wait_for_workers(2, timeout=STARTUP_TIMEOUT)
        assert wait_until(lambda: len(client.run(_app_of, pool.name)) == 2, STARTUP_TIMEOUT)
        assert all(a["running"] for a in client.run(_app_of, pool.name).values())
        assert workers[victim] not in client.run(os.getpid).values()
        assert sorted(pool.map(inc, range(1000), ordered=False, batch_size=10)) == list(range(1, 1001))
        mpop_pids(client)


def test_daemonic_workers_raise_config_error_naming_the_setting():
    with dask.config.set({"distributed.worker.daemon": True}):
        with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                      dashboard_address=":0", host="127.0.0.1") as cluster, \
                distributed.Client(cluster) as client:
            t0 = time.monotonic()
            with pytest.raises(mpop.ConfigError, match=r"distributed\.worker\.daemon") as info:
                DaskPool(client, workers=1, name=PREFIX)
            assert time.monotonic() - t0 < 30  # an answer, not a hang
            assert "dask.config.set({'distributed.worker.daemon': False})" in str(info.value)
            assert "DASK_DISTRIBUTED__WORKER__DAEMON=False" in str(info.value)
            assert not [p for p in client.run_on_scheduler(_plugins_on_scheduler) if p.startswith("mpop-dask-")]
            assert client.run(_mpop_children) and not any(client.run(_mpop_children).values())


# -- the worker's side, without a cluster -----------------------------------------------------


def raise_in_init():
    raise RuntimeError("no database here")


def test_the_plugin_owns_one_app_and_refuses_work_once_torn_down():
    import asyncio

    from mpop._dask_worker import PoolPlugin

    plugin = PoolPlugin("mpop-dask-unit", {"workers": 1, "name": PREFIX})
    plugin.start()
    app = plugin.ready_app()
    assert app.config["workers"] == 1 and app.config["auto_terminate"] is False
    blob = cloudpickle.dumps(lambda x: x * 3)  # by value: each unpickling makes a new function
    fn = plugin.function(blob)
    assert fn(2) == 6 and plugin.function(bytes(bytearray(blob))) is fn  # unpickled once, then kept
    asyncio.run(plugin.teardown(worker=None))
    with pytest.raises(mpop.ShutdownError, match="closed"):
        plugin.ready_app()


def test_a_worker_whose_initializer_raises_fails_the_pool_at_once():
    from mpop._dask_worker import PoolPlugin

    plugin = PoolPlugin("mpop-dask-unit", {"workers": 1, "name": PREFIX, "initializer": raise_in_init})
    with pytest.raises(mpop.WorkerInitError):
        plugin.start()
    with pytest.raises(mpop.MpopError, match="could not start.*WorkerInitError") as info:
        plugin.ready_app()  # what a batch sent to such a worker raises
    assert isinstance(info.value.__cause__, mpop.WorkerInitError)


def test_dask_pool_raises_a_workers_initializer_error(local_client):
    before = local_client.run_on_scheduler(_plugins_on_scheduler)
    with pytest.raises(mpop.WorkerInitError):
        DaskPool(local_client, workers=1, name=PREFIX, initializer=raise_in_init)
    assert local_client.run_on_scheduler(_plugins_on_scheduler) == before
