"""examples/stateful_reader.py: workers that open a reader once in their initializer and
keep it in worker_state, a coordinator thread that hands chunks back in order, and reads
that fall back to the calling thread once the pool is gone."""

from __future__ import annotations

import importlib
import re
import sys

import numpy as np
import pytest

from _helpers import EXAMPLES, leak_check, run_python


@pytest.fixture(autouse=True)
def _no_leaks():
    with leak_check():
        yield


@pytest.fixture(scope="module")
def example():
    # Imported as a module the workers can import too (they get the owner's sys.path).
    sys.path.insert(0, str(EXAMPLES))
    try:
        yield importlib.import_module("stateful_reader")
    finally:
        sys.path.remove(str(EXAMPLES))
        sys.modules.pop("stateful_reader", None)


@pytest.fixture
def npy(tmp_path):
    data = np.arange(40_000, dtype=np.float64).reshape(10_000, 4)
    path = tmp_path / "data.npy"
    np.save(path, data)
    return str(path), data


def test_the_example_runs_and_falls_back_after_shutdown():
    proc = run_python([str(EXAMPLES / "stateful_reader.py"), "--rows", "200000", "--chunk", "10000"])
    assert proc.returncode == 0, proc.stderr
    assert "20 chunks of 10000 rows, in order and identical: True" in proc.stdout
    m = re.search(r"read by workers: (\d+), by the calling thread after shutdown: (\d+)", proc.stdout)
    assert m and int(m[1]) + int(m[2]) == 20 and int(m[2]) > 0, proc.stdout


def test_each_worker_opens_the_file_once_and_serves_reads_in_order(example, npy):
    path, data = npy
    reader = example.ChunkReader(path, workers=2)
    ranges = [(s, s + 500) for s in range(0, 10_000, 500)]
    try:
        got = list(reader.chunks(ranges))
    finally:
        exits = reader.close()
    assert np.array_equal(np.concatenate(got), data)
    assert reader.by_workers == len(ranges) and reader.by_caller == 0
    # worker_exit saw one worker_state per worker, and the reads it counted add up.
    assert len(exits) == 2 and len({pid for pid, _ in exits}) == 2
    assert sum(n for _, n in exits) == len(ranges)


def test_reads_fall_back_to_the_calling_thread_when_the_pool_is_gone(example, npy):
    path, data = npy
    reader = example.ChunkReader(path, workers=1)
    reader.close()
    got = list(reader.chunks([(0, 100), (100, 5000), (5000, 10_000)]))
    assert np.array_equal(np.concatenate(got), data)
    assert reader.by_workers == 0 and reader.by_caller == 3
