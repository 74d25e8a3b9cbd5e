"""mpop.dask.DaskPool against Dask's own ways to map 100,000 fine-grained items on a
LocalCluster of 2 worker processes (pytest-benchmark; issue #19's goals: >= 100x client.map,
faster than dask.bag with its default partitioning). Each pair shares a name in the closing
ratio table, where the Dask side stands in the "stdlib" column."""

from __future__ import annotations

import pytest

from mpop._workloads import inc

distributed = pytest.importorskip("distributed")  # the `dask` extra
dask = pytest.importorskip("dask")
import dask.bag as db  # noqa: E402

from mpop.dask import DaskPool  # noqa: E402

N = 100_000
N_TASKS = 5_000  # client.map: one task per item costs the same per item at any count
EXPECTED = sum(inc(i) for i in range(N))


@pytest.fixture(scope="module")
def client():
    with dask.config.set({"distributed.worker.daemon": False}), \
            distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                                     silence_logs=40) as cluster, \
            distributed.Client(cluster) as c:
        c.gather(c.map(inc, range(100), pure=False))  # warm
        yield c


@pytest.fixture(scope="module")
def dask_pool(client):
    with DaskPool(client, workers=1, max_performance=True) as p:
        list(p.map(inc, range(10_000)))  # warm: apps started, handler loaded everywhere
        yield p


def test_dask_map_vs_client_map_mpop(benchmark, dask_pool, record):
    benchmark.pedantic(lambda: sum(dask_pool.map(inc, range(N))), rounds=3, warmup_rounds=1)
    record("dask 100k x+1: client.map", "mpop", benchmark)


def test_dask_map_vs_client_map_dask(benchmark, client, record):
    benchmark.pedantic(lambda: client.gather(client.map(inc, range(N_TASKS), pure=False)), rounds=2,
                       warmup_rounds=0)
    record("dask 100k x+1: client.map", "stdlib", benchmark, scale=N / N_TASKS)


def test_dask_map_vs_bag_mpop(benchmark, dask_pool, record):
    benchmark.pedantic(lambda: sum(dask_pool.map(inc, range(N))), rounds=3, warmup_rounds=1)
    record("dask 100k x+1: dask.bag default", "mpop", benchmark)


def test_dask_map_vs_bag_dask(benchmark, client, record):
    bag = db.from_sequence(range(N)).map(inc)
    assert bag.sum().compute() == EXPECTED
    benchmark.pedantic(lambda: bag.sum().compute(), rounds=2, warmup_rounds=0)
    record("dask 100k x+1: dask.bag default", "stdlib", benchmark)
