"""examples/ingest_server.py: the ingest server acknowledges each packet once, with its seq,
timestamp and the worker's result, on both backends; its load client and bench check every
acknowledgement and report; the client's checks catch a server that loses, repeats or
garbles acknowledgements. Small and short: nothing here asserts a rate or a latency."""

from __future__ import annotations

import contextlib
import json
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from typing import Iterator

import pytest

from _helpers import EXAMPLES, SPAWNED, env_with_pythonpath, leak_check, run_python

SCRIPT = EXAMPLES / "ingest_server.py"
TIMEOUT = 60  # "finishes at all"
HEADER = struct.Struct("<IIQq")  # client_id, crc, seq, send_ns
READINGS = struct.Struct("<10f")
ACK = struct.Struct("<IIQqd")  # client_id, status, seq, send_ns, mean


@pytest.fixture(autouse=True)
def _no_leaks():
    with leak_check():
        yield


def packet(client_id: int, seq: int, send_ns: int, readings: list[float], crc: int | None = None) -> bytes:
    payload = READINGS.pack(*readings)
    return HEADER.pack(client_id, zlib.crc32(payload) if crc is None else crc, seq, send_ns) + payload


def read_exactly(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


@contextlib.contextmanager
def serving(*options: str) -> Iterator[tuple[subprocess.Popen, int]]:
    """The example's server on a free port with `options`: (its process, the port). Killed
    on the way out if the test did not stop it."""
    server = subprocess.Popen([sys.executable, str(SCRIPT), "serve", "--port", "0", *options],
                              stdout=subprocess.PIPE, text=True, env=env_with_pythonpath())
    SPAWNED.add(server.pid)
    try:
        assert select.select([server.stdout], [], [], TIMEOUT)[0], "the server did not start"
        line = server.stdout.readline()
        assert line.startswith("serving on 127.0.0.1:"), line
        yield server, int(line.split()[2].rsplit(":", 1)[1])
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        server.stdout.close()


@pytest.mark.parametrize("backend", ["mpop", "ppe"])
def test_the_server_acks_every_packet_with_its_seq_timestamp_and_result(backend):
    with serving("--workers", "1", "--backend", backend) as (server, port):
        readings = [[float(i + j) for j in range(10)] for i in range(4)]
        good = [packet(7, seq, 1_000 + seq, readings[seq]) for seq in range(3)]
        bad = packet(7, 3, 1_003, readings[3], crc=12345)  # a crc that does not match
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as conn:
            conn.sendall(good[0] + good[1] + good[2][:10])  # a packet cut in two writes
            time.sleep(0.05)
            conn.sendall(good[2][10:] + bad)
            data = read_exactly(conn, 4 * ACK.size)
            assert len(data) == 4 * ACK.size, data
            acks = list(ACK.iter_unpack(data))
            conn.settimeout(0.3)
            with pytest.raises(socket.timeout):
                conn.recv(1)  # nothing more: one acknowledgement a packet
        assert sorted(acks, key=lambda a: a[2]) == [
            (7, 0, 0, 1_000, sum(readings[0]) / 10),
            (7, 0, 1, 1_001, sum(readings[1]) / 10),
            (7, 0, 2, 1_002, sum(readings[2]) / 10),
            (7, 1, 3, 1_003, 0.0),  # status 1: bad crc
        ]
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=TIMEOUT) == 0
        assert "served 4 packets" in server.stdout.read()


def reports(stdout: str) -> dict:
    """The bench's JSON lines, by backend."""
    out = {}
    for line in stdout.splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            out[r["backend"]] = r
    return out


@pytest.mark.parametrize("dispatch, backends", [("tick", "mpop,ppe"), ("packet", "mpop"), ("await", "ppe")])
def test_the_bench_acks_every_packet_once_and_prints_the_table(dispatch, backends):
    proc = run_python([str(SCRIPT), "bench", "--clients", "2", "--rate", "1000", "--seconds", "1",
                       "--drain", "20", "--workers", "1", "--dispatch", dispatch, "--backends", backends,
                       "--json"], timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = reports(proc.stdout)
    assert sorted(got) == sorted(backends.split(","))
    for backend, r in got.items():
        assert (r["sent"], r["acked"], r["lost"], r["duplicates"], r["wrong"]) == (2000, 2000, 0, 0, 0), backend
        assert r["p50_ms"] <= r["p99_ms"] <= r["p999_ms"] <= r["max_ms"]
        assert "served 2000 packets" in r["server"]
    assert f"2 clients x 1000 packets/s for 1 s, dispatch {dispatch}" in proc.stdout
    table = proc.stdout[proc.stdout.rindex("latency p50 ms") - 300:]
    for row in ("latency p99 ms", "latency p99.9 ms", "latency max ms", "lost / dup / wrong", "load average"):
        assert row in table
    if "ppe" in backends:
        assert "ProcessPoolExecutor" in table


def faulty_server(listener: socket.socket) -> None:
    """Acks one connection's packets, but never seq 0, seq 1 twice and seq 2 with another
    send_ns."""
    conn, _ = listener.accept()
    with conn:
        rest = b""
        while data := conn.recv(65536):
            data = rest + data
            n = len(data) - len(data) % 64
            rest = data[n:]
            out = []
            for off in range(0, n, 64):
                cid, _, seq, send_ns = HEADER.unpack_from(data, off)
                mean = sum(READINGS.unpack_from(data, off + HEADER.size)) / 10
                if seq == 0:
                    continue
                ack = ACK.pack(cid, 0, seq, send_ns + (seq == 2), mean)
                out.append(ack * (2 if seq == 1 else 1))
            conn.sendall(b"".join(out))


def test_the_load_client_reports_lost_repeated_and_wrong_acknowledgements():
    with socket.create_server(("127.0.0.1", 0)) as listener:
        t = threading.Thread(target=faulty_server, args=(listener,), daemon=True)
        t.start()
        proc = run_python([str(SCRIPT), "load", "--port", str(listener.getsockname()[1]), "--clients", "1",
                           "--rate", "200", "--seconds", "0.5", "--drain", "0.5"], timeout=TIMEOUT)
        t.join(TIMEOUT)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "sent 100 " in proc.stdout and "acked 98 " in proc.stdout
    assert "lost 2, duplicates 1, wrong 1" in proc.stdout


def test_a_server_far_behind_its_clients_still_stops_on_sigterm():
    """--dispatch await wakes the loop once per result through its self-pipe: a signal
    passed to the loop the same way (loop.add_signal_handler) was lost once the pipe was
    full, and the server ignored SIGTERM. Overloaded here: 4 clients x 20 kHz."""
    with serving("--dispatch", "await") as (server, port):
        load = run_python([str(SCRIPT), "load", "--port", str(port), "--rate", "20000", "--seconds", "1.5",
                           "--drain", "0"], timeout=TIMEOUT)
        assert "4 clients x 20000 packets/s" in load.stdout, load.stdout + load.stderr
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=TIMEOUT) == 0
        assert "served " in server.stdout.read()
