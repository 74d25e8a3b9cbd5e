"""examples/shared_pool_server.py: asyncio TCP servers in several processes feeding one
persistent pool through mpop.attach; a server SIGKILLed with jobs outstanding, whose results
reach the replacement server that attaches next, each job recorded exactly once."""

from __future__ import annotations

import importlib
import os
import re
import select
import signal
import subprocess
import sys
import uuid

import pytest

from _helpers import EXAMPLES, SHM, env_with_pythonpath, leak_check, run_python, wait_until

SCRIPT = EXAMPLES / "shared_pool_server.py"


@pytest.fixture(autouse=True)
def _no_leaks():
    with leak_check():
        yield


@pytest.fixture
def pool():
    """A pool name; the pool is stopped afterwards if a test left it running."""
    name = f"mpop-{uuid.uuid4().hex[:12]}"
    yield name
    from mpop._persistent import find_pools, stop_pool

    if find_pools(name):
        stop_pool(name, graceful=False, timeout=5)


@pytest.fixture(scope="module")
def example():
    sys.path.insert(0, str(EXAMPLES))
    try:
        yield importlib.import_module("shared_pool_server")
    finally:
        sys.path.remove(str(EXAMPLES))
        sys.modules.pop("shared_pool_server", None)


def leftovers(pool: str) -> list[str]:
    """/dev/shm entries and processes (supervisor, workers) of the pool that are still there.
    (The supervisor runs in a session of its own: leak_check does not see it.)"""
    found = [f"/dev/shm/{n}" for n in os.listdir(SHM) if n.startswith(pool)]
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if pool.encode() in f.read():
                    found.append(f"process {pid}")
        except OSError:
            pass
    return found


def test_the_demo_gives_every_job_exactly_one_result_across_a_killed_server(pool):
    proc = run_python([str(SCRIPT), "demo", "--pool", pool], timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert f"pool {pool}: 2 workers" in out
    assert "sent 300 jobs: 300 accepted (150 to server 1, 150 to server 2)" in out
    killed = re.search(r"SIGKILLed server 2 with (\d+) of its 150 jobs unfinished", out)
    assert killed and int(killed[1]) > 0, out
    m = re.search(r"results: 300 of 300 jobs in [\d.]+ s, 300 correct, 300 recorded "
                  r"\((\d+) by the replacement server\)", out)
    assert m, out
    assert int(m[1]) == int(killed[1]), out  # what server 2 left came through its replacement
    assert "servers stopped (exit status 0 and 0)" in out
    assert "OK: every job has exactly one correct result" in out
    assert wait_until(lambda: not leftovers(pool)), leftovers(pool)


def test_a_pool_started_by_mpop_serve_takes_jobs_from_a_server(pool, example, tmp_path):
    # the handler module is importable from the current directory: examples/
    started = run_python(["-m", "mpop", "serve", pool, "--workers", "1",
                          "--handler-module", "shared_pool_server"], cwd=EXAMPLES)
    assert started.returncode == 0, started.stderr
    command = [sys.executable, str(SCRIPT), "serve", "--pool", pool, "--port", "0", "--store", str(tmp_path)]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env_with_pythonpath())
    try:
        assert select.select([server.stdout], [], [], 60)[0], "the server did not start"
        port = int(server.stdout.readline().rsplit(":", 1)[1])
        conn = example.Connection(port)
        try:
            assert conn.ask("JOB 7 1000") == ["ACCEPTED", "7"]
            assert conn.ask("JOB x 1")[0] == "ERROR"
            assert wait_until(lambda: conn.ask("GET 7")[0] == "RESULT", 30)
            assert conn.ask("GET 7") == ["RESULT", "7", str(example.expected(1000)), str(server.pid)]
            assert conn.ask("GET 8") == ["PENDING", "8"]
        finally:
            conn.close()
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        server.stdout.close()
    stopped = run_python(["-m", "mpop", "shutdown", pool])
    assert stopped.returncode == 0, stopped.stderr
    assert not leftovers(pool)


def test_a_result_recorded_twice_fails_loudly_and_keeps_the_first(example, tmp_path):
    example.record(str(tmp_path), 5, "25 100")
    with pytest.raises(RuntimeError, match="job 5 has a result already: recorded twice"):
        example.record(str(tmp_path), 5, "26 200")
    assert example.lookup(str(tmp_path), 5) == "25 100"
    assert example.lookup(str(tmp_path), 6) is None
    assert os.listdir(tmp_path) == ["5"]  # no temporary file left
