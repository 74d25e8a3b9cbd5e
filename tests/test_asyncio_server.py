"""examples/asyncio_server.py: an asyncio TCP server on 127.0.0.1 that hands each request to
the pool with ``await app.submit``; its demo, and the server on a free port answering a
client, then stopped by SIGTERM with nothing left behind."""

from __future__ import annotations

import select
import signal
import socket
import subprocess
import sys

import pytest

from _helpers import EXAMPLES, SPAWNED, env_with_pythonpath, leak_check, run_python

SCRIPT = EXAMPLES / "asyncio_server.py"
TIMEOUT = 60  # "finishes at all"


@pytest.fixture(autouse=True)
def _no_leaks():
    with leak_check():
        yield


def expected(n: int) -> int:
    return sum(i * i for i in range(n))


def test_the_demo_serves_many_connections_at_once():
    proc = run_python([str(SCRIPT), "--demo"], timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1000 requests on 20 connections, 0 wrong answers" in proc.stdout
    assert "a bad request: ERROR ValueError: n must be >= 0, got -1" in proc.stdout


def test_the_server_answers_on_a_free_port_and_stops_on_sigterm():
    server = subprocess.Popen([sys.executable, str(SCRIPT), "--port", "0", "--workers", "1"],
                              stdout=subprocess.PIPE, text=True, env=env_with_pythonpath())
    SPAWNED.add(server.pid)
    try:
        assert select.select([server.stdout], [], [], TIMEOUT)[0], "the server did not start"
        line = server.stdout.readline()
        assert line.startswith("serving on 127.0.0.1:"), line
        port = int(line.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as conn:
            conn.sendall(b"1000\n10\nfoo\n-3\n0\n")
            answers = _read_lines(conn, 5)
        assert answers == [str(expected(1000)), str(expected(10)),
                           "ERROR ValueError: invalid literal for int() with base 10: b'foo\\n'",
                           "ERROR ValueError: n must be >= 0, got -3", "0"]
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=TIMEOUT) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        server.stdout.close()


def _read_lines(conn: socket.socket, n: int) -> list[str]:
    data = b""
    while data.count(b"\n") < n:
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
    return data.decode().splitlines()
