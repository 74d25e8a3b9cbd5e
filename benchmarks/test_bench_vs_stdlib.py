"""mpop and multiprocessing.Pool timed side by side on the same workloads (pytest-benchmark).

Each pair shares a name in the closing ratio table; the goals are issue #4's."""

from __future__ import annotations

import numpy as np
import pytest

from mpop._workloads import array_sum, inc, medium


def test_map_trivial_mpop(benchmark, app, record):
    benchmark.pedantic(lambda: list(app.map(inc, range(200_000))), rounds=3, warmup_rounds=1)
    record("map 200k x+1", "mpop", benchmark)


def test_map_trivial_pool(benchmark, pool, record):
    benchmark.pedantic(lambda: pool.map(inc, range(200_000)), rounds=3, warmup_rounds=1)
    record("map 200k x+1", "stdlib", benchmark)


def test_submit_collect_mpop(benchmark, app, record):
    def run():
        for f in [app.submit(inc, i) for i in range(5_000)]:
            f.result()

    benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    record("submit+result 5k x+1", "mpop", benchmark)


def test_submit_collect_pool(benchmark, pool, record):
    def run():
        for r in [pool.apply_async(inc, (i,)) for i in range(5_000)]:
            r.get()

    benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    record("submit+result 5k x+1", "stdlib", benchmark)


def test_round_trip_mpop(benchmark, app, record):
    benchmark.pedantic(lambda: app.submit(inc, 1).result(), rounds=500, warmup_rounds=20)
    record("round trip of one task", "mpop", benchmark)


def test_round_trip_pool(benchmark, pool, record):
    benchmark.pedantic(lambda: pool.apply_async(inc, (1,)).get(), rounds=500, warmup_rounds=20)
    record("round trip of one task", "stdlib", benchmark)


def test_cpu_bound_mpop(benchmark, app, record):
    benchmark.pedantic(lambda: list(app.map(medium, range(1000))), rounds=3, warmup_rounds=1)
    record("medium x 1000", "mpop", benchmark)


def test_cpu_bound_pool(benchmark, pool, record):
    benchmark.pedantic(lambda: pool.map(medium, range(1000)), rounds=3, warmup_rounds=1)
    record("medium x 1000", "stdlib", benchmark)


@pytest.fixture(scope="module")
def arrays():
    """50 float64 arrays of 8 MB each (four distinct ones, repeated)."""
    distinct = [np.random.default_rng(i).random(1_000_000) for i in range(4)]
    return [distinct[i % 4] for i in range(50)]


def test_numpy_8mb_mpop(benchmark, app, record, arrays):
    benchmark.pedantic(lambda: list(app.map(array_sum, arrays)), rounds=5, warmup_rounds=1)
    record("50 x 8 MB array sum (map)", "mpop", benchmark)


def test_numpy_8mb_pool(benchmark, pool, record, arrays):
    benchmark.pedantic(lambda: pool.map(array_sum, arrays), rounds=5, warmup_rounds=1)
    record("50 x 8 MB array sum (map)", "stdlib", benchmark)
