"""examples/matrix_writer.py: float64 matrices made by pinned workers, received as views of
the argument pool (no pickle) and written to disk; one worker killed mid-run and its matrix
made again; the same job against multiprocessing.Pool, as a printed ratio. Run small."""

from __future__ import annotations

import importlib
import os
import re
import sys

import numpy as np
import pytest

from _helpers import EXAMPLES, leak_check, run_python

SCRIPT = str(EXAMPLES / "matrix_writer.py")
COUNT, MB, STEPS = 8, 4, 8  # a matrix takes a worker tens of ms: room to kill it mid-way


@pytest.fixture(autouse=True)
def _no_leaks():
    with leak_check():
        yield


@pytest.fixture(scope="module")
def example():
    sys.path.insert(0, str(EXAMPLES))
    try:
        yield importlib.import_module("matrix_writer")
    finally:
        sys.path.remove(str(EXAMPLES))
        sys.modules.pop("matrix_writer", None)


def test_matrices_are_written_once_each_and_right_after_a_worker_is_killed(example, tmp_path):
    out = tmp_path / "matrices"
    proc = run_python([SCRIPT, "--count", str(COUNT), "--mb", str(MB), "--steps", str(STEPS),
                       "--workers", "2", "--rounds", "1", "--out", str(out)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = proc.stdout
    assert f"{COUNT} matrices of 725 x 725 float64 (4.0 MiB each), 2 workers pinned to CPUs" in text
    assert (f"written: {COUNT} files, each once: True; received as views of the pool, not copies: "
            f"{COUNT}/{COUNT}; identical to multiprocessing.Pool's: {COUNT}/{COUNT}") in text

    # One worker was killed while it made a matrix; that matrix ran twice; one restart.
    m = re.search(r"killed worker (\d+) \(pid \d+\) [\d.]+ s into matrix (\d+) .*; that matrix's attempts: (\d+)",
                  text)
    assert m, text
    killed = int(m[1])
    assert int(m[3]) == 2, text
    restarts = dict(re.findall(r"worker (\d+): (\d+)", text.split("worker restarts: ", 1)[1].splitlines()[0]))
    assert restarts == {"0": "0", "1": "0", str(killed): "1"}, text

    # Pinned, the replacement too: worker i on the i-th CPU this process may use.
    cpus = sorted(os.sched_getaffinity(0))
    assert (f"CPUs of the live workers (os.sched_getaffinity): worker 0: [{cpus[0]}], "
            f"worker 1: [{cpus[1 % len(cpus)]}]") in text

    ratio = re.search(r"^same job, no kill, best of 1: mpop [\d.]+ s, multiprocessing.Pool [\d.]+ s: "
                      r"mpop ran at ([\d.]+)x the speed of multiprocessing.Pool$", text, re.M)
    assert ratio and float(ratio[1]) > 0, text

    # What is on disk, checked here against matrices made in this process.
    files = sorted(p.name for p in out.iterdir())
    assert files == [f"matrix_{i:04d}.npy" for i in range(COUNT)]
    for i in range(COUNT):
        got = np.load(out / files[i])
        assert got.dtype == np.float64 and got.shape == (725, 725)
        assert np.array_equal(got, example.make_matrix(i, 725, STEPS)), files[i]


def test_make_matrix_is_deterministic_and_smoothed(example):
    a, b = example.make_matrix(3, 64, 2), example.make_matrix(3, 64, 2)
    assert np.array_equal(a, b) and not np.array_equal(a, example.make_matrix(4, 64, 2))
    # Smoothing averages neighbours: the spread shrinks with each step.
    assert example.make_matrix(3, 64, 2).std() < example.make_matrix(3, 64, 0).std() < 1.5


def test_a_matrix_written_twice_fails(example, tmp_path):
    example.write_matrix(tmp_path, 0, np.zeros((2, 2)))
    with pytest.raises(FileExistsError):
        example.write_matrix(tmp_path, 0, np.ones((2, 2)))
    assert np.array_equal(np.load(tmp_path / "matrix_0000.npy"), np.zeros((2, 2)))


@pytest.mark.parametrize("args, message", [
    (["--count", "0"], "argument --count: must be an int >= 1, got '0'"),
    (["--mb", "x"], "argument --mb: must be an int >= 1, got 'x'"),
    (["--steps", "-1"], "argument --steps: must be an int >= 0, got -1"),
    (["--count", "2", "--workers", "2"], "argument --count: must be more than --workers (2)"),
])
def test_bad_arguments_are_usage_errors(args, message):
    proc = run_python([SCRIPT, *args])
    assert proc.returncode == 2 and f"error: {message}" in proc.stderr, proc.stderr


def test_out_must_be_new_or_empty(tmp_path):
    (tmp_path / "x").write_text("")
    proc = run_python([SCRIPT, "--out", str(tmp_path)])
    assert proc.returncode == 2 and "exists and is not empty" in proc.stderr, proc.stderr
