"""An asyncio TCP ingest server that hands every fixed-size packet to a worker process and
acknowledges it when the worker's result is back; a paced load client; a benchmark of the
same server on mpop and on concurrent.futures.ProcessPoolExecutor, side by side.

Protocol (little-endian), client -> server, 64 bytes a packet:

    client_id u32, crc u32 (zlib.crc32 of the payload), seq u64, send_ns i64,
    payload: 10 readings, float32

server -> client, 32 bytes an acknowledgement, in the order the results come back:

    client_id u32, status u32 (0 ok, 1 the crc did not match), seq u64, send_ns i64
    (both echoed), mean f64 (the mean of the readings, computed in the worker; 0 if bad)

The event loop only reads, batches, submits and writes; the work runs in a worker, and a
finished task's completion callback (in the pool's result thread) queues it for the loop,
waking the loop once for all the completions that arrive before it runs. How packets
become tasks (--dispatch):

    tick    all the packets that arrived in one event-loop iteration, from every
            connection, are one task (the default)
    packet  one task per packet
    await   one task per packet, each in its own asyncio task doing
            ``await asyncio.wrap_future(pool.submit(...))`` (the plain idiom)

Commands (127.0.0.1 only):

    python examples/ingest_server.py serve --port 8770 [--backend mpop|ppe] [--dispatch tick]
    python examples/ingest_server.py load --port 8770 --clients 4 --rate 10000 --seconds 5
    python examples/ingest_server.py bench --clients 4 --rate 10000 --seconds 5

`load` paces each connection at --rate packets/s (the packets due are written once per
event-loop tick, about 1 ms), then waits up to --drain seconds for the last acknowledgements, checks
every one (exactly once, the right seq, send_ns and mean) and prints the sustained rate,
the end-to-end latency (send_ns -> acknowledgement read) percentiles, and how many packets
were lost (not acknowledged by the end of --drain), duplicated or wrong; it exits with 1 if
any was. `bench` starts the server on a
free port with each backend in turn, runs `load` against it, and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import concurrent.futures as cf
import json
import multiprocessing
import os
import re
import select
import signal
import struct
import subprocess
import sys
import time
import zlib
from array import array
from typing import Callable

import mpop

HOST = "127.0.0.1"
# Formats as strings: mpop sends a handler defined in __main__ to its workers by value
# (cloudpickle), with the globals it uses, and a struct.Struct cannot be pickled.
HEADER_FORMAT = "<IIQq"  # client_id, crc, seq, send_ns
READINGS_FORMAT = "<10f"
ACK_FORMAT = "<IIQqd"  # client_id, status, seq, send_ns, mean
HEADER, READINGS, ACK = (struct.Struct(f) for f in (HEADER_FORMAT, READINGS_FORMAT, ACK_FORMAT))
HEADER_SIZE = HEADER.size  # 24
PACKET_SIZE = HEADER.size + READINGS.size  # 64
ACK_SIZE = ACK.size  # 32
OK, BAD_CRC = 0, 1
BACKENDS = ("mpop", "ppe")
DISPATCHES = ("tick", "packet", "await")
START_TIMEOUT = 60.0  # the longest a server may take to start, in seconds


# -- the work (in a worker process) ------------------------------------------------------------


def ack_packets(blob: bytes) -> bytes:
    """Checks each 64-byte packet of `blob` (its crc), reduces its readings to their mean,
    and returns the acknowledgements, 32 bytes each, in the packets' order."""
    n = len(blob) // PACKET_SIZE
    out = bytearray(n * ACK_SIZE)
    view = memoryview(blob)
    for i in range(n):
        off = i * PACKET_SIZE
        client_id, crc, seq, send_ns = struct.unpack_from(HEADER_FORMAT, blob, off)
        payload = view[off + HEADER_SIZE:off + PACKET_SIZE]
        if zlib.crc32(payload) == crc:
            status, mean = OK, sum(struct.unpack(READINGS_FORMAT, payload)) / 10
        else:
            status, mean = BAD_CRC, 0.0
        struct.pack_into(ACK_FORMAT, out, i * ACK_SIZE, client_id, status, seq, send_ns, mean)
    return bytes(out)


# -- the pools ------------------------------------------------------------------------------------


class Pool:
    """The worker pool behind the server: submit(fn, arg) -> concurrent.futures.Future."""

    def __init__(self, backend: str, workers: int, queue_slots: int) -> None:
        if backend == "mpop":
            self.app = mpop.MpopApi(workers=workers, auto_terminate=False, queue_slots=queue_slots)
            self.app.start()
            self.submit = self.app.submit
        elif backend == "ppe":
            # Fresh interpreters, as mpop's default start method: the same workers on both.
            self.app = cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
            self.submit = self.app.submit
        else:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        self.backend = backend
        # The workers started and answering before the first packet comes, not during the
        # first measured second.
        try:
            for f in [self.submit(ack_packets, b"") for _ in range(4 * workers)]:
                f.result(timeout=START_TIMEOUT)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.backend == "mpop":
            self.app.shutdown(wait=True, cancel_pending=True)
        else:
            self.app.shutdown(wait=True, cancel_futures=True)


# -- the server -----------------------------------------------------------------------------------


class IngestServer:
    """Turns the packets of every connection into tasks (see --dispatch) and writes each
    task's acknowledgements back to the connections its packets came from.

    At most `max_in_flight` packets are in the pool at once: past it the server stops
    reading from every connection (TCP then holds the clients back) until half have come
    back, so that a pool slower than the clients cannot make memory grow without bound
    and submit() never waits for room in mpop's ring (queue_slots > max_in_flight)."""

    def __init__(self, pool: Pool, dispatch: str, max_in_flight: int) -> None:
        if dispatch not in DISPATCHES:
            raise ValueError(f"dispatch must be one of {', '.join(DISPATCHES)}, got {dispatch!r}")
        self.loop = asyncio.get_running_loop()
        self.submit = pool.submit
        self.dispatch = dispatch
        self.max_in_flight = max_in_flight
        self.connections: set[IngestConnection] = set()
        self.pending: list[tuple[IngestConnection, bytes]] = []  # this tick's packets (tick)
        self.completed: collections.deque = collections.deque()  # (future, parts), any thread
        self.wake_scheduled = False
        self.acking: set[asyncio.Task] = set()  # await: the loop keeps only weak references
        self.in_flight = 0
        self.paused = False
        self.packets = self.tasks = 0
        self.errors = 0

    def connection(self) -> IngestConnection:
        return IngestConnection(self)

    def take(self, conn: IngestConnection, packets: bytes) -> None:
        """Packets read from `conn` (a multiple of 64 bytes)."""
        n = len(packets) // PACKET_SIZE
        self.packets += n
        self.in_flight += n
        if self.dispatch == "tick":
            if not self.pending:
                self.loop.call_soon(self.flush)  # after every read of this iteration
            self.pending.append((conn, packets))
        elif self.dispatch == "packet":
            for off in range(0, len(packets), PACKET_SIZE):
                self.send(packets[off:off + PACKET_SIZE], [(conn, 1)])
        else:
            for off in range(0, len(packets), PACKET_SIZE):
                task = self.loop.create_task(self.ack_one(conn, packets[off:off + PACKET_SIZE]))
                self.acking.add(task)
                task.add_done_callback(self.acking.discard)
        if self.in_flight > self.max_in_flight and not self.paused:
            self.paused = True
            for c in self.connections:
                c.transport.pause_reading()

    def flush(self) -> None:
        """tick: all the packets of this iteration as one task."""
        parts, self.pending = self.pending, []
        self.send(b"".join(p for _, p in parts), [(c, len(p) // PACKET_SIZE) for c, p in parts])

    def send(self, blob: bytes, parts: list[tuple[IngestConnection, int]]) -> None:
        fut = self.submit(ack_packets, blob)
        self.tasks += 1
        fut.add_done_callback(lambda f: self.on_done(f, parts))

    def on_done(self, fut: cf.Future, parts: list) -> None:
        """A task's completion, in the pool's result thread: queued for the loop, which is
        woken only if no wake-up is on its way already."""
        self.completed.append((fut, parts))
        if not self.wake_scheduled:
            self.wake_scheduled = True
            try:
                self.loop.call_soon_threadsafe(self.deliver)
            except RuntimeError:  # the loop is closed: the server has stopped
                pass

    def deliver(self) -> None:
        """In the loop: writes the acknowledgements of every task completed so far."""
        self.wake_scheduled = False  # before draining: a completion queued from now wakes us again
        completed = self.completed
        while completed:
            fut, parts = completed.popleft()
            try:
                acks = fut.result()
            except Exception as e:  # the worker failed: the packets stay unacknowledged
                self.errors += 1
                print(f"ingest server: a task failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
                acks = None
            off = 0
            for conn, n in parts:
                if acks is not None:
                    conn.write(acks[off:off + n * ACK_SIZE] if len(parts) > 1 else acks)
                off += n * ACK_SIZE
                self.in_flight -= n
        self.maybe_resume()

    async def ack_one(self, conn: IngestConnection, packet: bytes) -> None:
        """await: one packet, awaited in its own asyncio task."""
        self.tasks += 1
        try:
            conn.write(await asyncio.wrap_future(self.submit(ack_packets, packet)))
        except Exception as e:
            self.errors += 1
            print(f"ingest server: a task failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        finally:
            self.in_flight -= 1
            self.maybe_resume()

    def maybe_resume(self) -> None:
        if self.paused and self.in_flight <= self.max_in_flight // 2:
            self.paused = False
            for c in self.connections:
                c.transport.resume_reading()


class IngestConnection(asyncio.Protocol):
    """One client: cuts the byte stream into packets and writes acknowledgements back."""

    def __init__(self, server: IngestServer) -> None:
        self.server = server
        self.rest = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.connections.add(self)
        if self.server.paused:
            transport.pause_reading()  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if self.rest:
            data = self.rest + data
        n = len(data) - len(data) % PACKET_SIZE
        self.rest = data[n:]
        if n:
            self.server.take(self, data if n == len(data) else data[:n])

    def write(self, acks: bytes) -> None:
        if not self.transport.is_closing():  # a client gone: its late acknowledgements are dropped
            self.transport.write(acks)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)


async def serve(pool: Pool, port: int, dispatch: str, max_in_flight: int, stop: asyncio.Event) -> IngestServer:
    """Serves on HOST:`port` (0: a free one, printed) until `stop` is set."""
    ingest = IngestServer(pool, dispatch, max_in_flight)
    server = await asyncio.get_running_loop().create_server(ingest.connection, HOST, port)
    print(f"serving on {HOST}:{server.sockets[0].getsockname()[1]} "
          f"(backend {pool.backend}, dispatch {dispatch})", flush=True)
    async with server:
        await stop.wait()
        server.close()
        for c in list(ingest.connections):
            c.transport.close()
    return ingest


def run_server(args: argparse.Namespace) -> int:
    if args.max_in_flight < 1:
        raise SystemExit("--max-in-flight must be at least 1")
    queue_slots = 1 << max(12, (2 * args.max_in_flight - 1).bit_length())  # room for every packet in flight
    pool = Pool(args.backend, args.workers, queue_slots)
    try:
        async def main() -> IngestServer:
            # Not loop.add_signal_handler(): it passes the signal to the loop through the
            # loop's self-pipe, which every call_soon_threadsafe() also writes to, and a
            # signal that finds the pipe full is lost (--dispatch await writes once per
            # packet: a server behind its clients ignored SIGTERM). A plain handler marks
            # the signal, and the loop looks for the mark every 0.1 s.
            signals: list[int] = []
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda signum, frame: signals.append(signum))
            stop = asyncio.Event()

            async def watch() -> None:
                while not signals:
                    await asyncio.sleep(0.1)
                stop.set()

            watcher = asyncio.get_running_loop().create_task(watch())
            try:
                return await serve(pool, args.port, args.dispatch, args.max_in_flight, stop)
            finally:
                watcher.cancel()

        ingest = asyncio.run(main())
    finally:
        pool.close()
    print(f"served {ingest.packets} packets in {ingest.tasks} tasks "
          f"({ingest.packets / max(ingest.tasks, 1):.1f} packets a task), {ingest.errors} failed tasks", flush=True)
    return 1 if ingest.errors else 0


# -- the load client --------------------------------------------------------------------------------

# The payloads a client cycles through (seq % 64), with their crc and mean: packets cost a
# header's packing each, and every acknowledgement can be checked.
PAYLOADS = [READINGS.pack(*(float((k * 7 + j * 3) % 50) - 10.0 for j in range(10))) for k in range(64)]
PAYLOAD_CRC = [zlib.crc32(p) for p in PAYLOADS]
PAYLOAD_MEAN = [sum(READINGS.unpack(p)) / 10 for p in PAYLOADS]


class LoadConnection(asyncio.Protocol):
    """One client connection: the packets it sent (their send_ns by seq) and the checks of
    the acknowledgements it read."""

    def __init__(self, client_id: int, total: int) -> None:
        self.client_id = client_id
        self.send_ns = array("q", bytes(8 * total))  # by seq, 0 = not sent
        self.acked = bytearray(total)
        self.sent = 0
        self.n_acked = self.duplicates = self.wrong = 0
        self.latency_ns = array("q")
        self.last_ack_ns = 0
        self.rest = b""
        self.transport: asyncio.Transport | None = None
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send_due(self, upto: int, now_ns: int) -> None:
        """Writes packets sent..upto-1, all stamped `now_ns`, in one write."""
        cid, packets = self.client_id, []
        for seq in range(self.sent, upto):
            k = seq & 63
            packets.append(HEADER.pack(cid, PAYLOAD_CRC[k], seq, now_ns) + PAYLOADS[k])
            self.send_ns[seq] = now_ns
        self.sent = upto
        self.transport.write(b"".join(packets))

    def data_received(self, data: bytes) -> None:
        now = time.monotonic_ns()
        if self.rest:
            data = self.rest + data
        n = len(data) - len(data) % ACK_SIZE
        self.rest = data[n:]
        for client_id, status, seq, send_ns, mean in ACK.iter_unpack(memoryview(data)[:n]):
            if (client_id != self.client_id or status != OK or seq >= self.sent
                    or send_ns != self.send_ns[seq] or mean != PAYLOAD_MEAN[seq & 63]):
                self.wrong += 1
            elif self.acked[seq]:
                self.duplicates += 1
            else:
                self.acked[seq] = 1
                self.n_acked += 1
                self.latency_ns.append(now - send_ns)
        self.last_ack_ns = now

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(exc)


def percentile(sorted_values: list, q: float) -> float:
    """The `q`-quantile (0..1) of sorted values, nearest rank."""
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, max(0, int(q * len(sorted_values) + 0.5) - 1))]


async def load(port: int, clients: int, rate: float, seconds: float, drain: float, late_ms: float,
               tick: float = 0.0005) -> dict:
    """Opens `clients` connections to HOST:`port`, sends `rate` packets/s on each for
    `seconds`, waits up to `drain` seconds for the last acknowledgements; returns the
    report. A packet is late when it is written more than `late_ms` after its scheduled
    time (start + seq / rate); its latency counts from when it was written."""
    if clients < 1 or rate <= 0 or seconds <= 0 or drain < 0:
        raise ValueError("clients must be >= 1, rate and seconds > 0, drain >= 0")
    loop = asyncio.get_running_loop()
    total = int(rate * seconds)
    conns = []
    for cid in range(clients):
        _, conn = await loop.create_connection(lambda cid=cid: LoadConnection(cid, total), HOST, port)
        conns.append(conn)
    period_ns = 1e9 / rate
    late_ns = late_ms * 1e6
    late = 0
    max_lag_ns = 0.0
    t0 = time.monotonic_ns()
    sent = 0
    while sent < total:
        for c in conns:
            if c.closed.done():
                raise ConnectionError(f"the server closed connection {c.client_id} after {sent} packets")
        now = time.monotonic_ns()
        upto = min(total, int((now - t0) / period_ns) + 1)
        if upto > sent:
            # packets sent..upto-1 were due at t0 + seq * period; those due before
            # now - late_ns are late
            lag_first = now - (t0 + sent * period_ns)
            max_lag_ns = max(max_lag_ns, lag_first)
            late_upto = min(upto, int((now - late_ns - t0) / period_ns) + 1)
            late += clients * max(0, late_upto - sent)
            for c in conns:
                c.send_due(upto, now)
            sent = upto
        await asyncio.sleep(tick)
    send_s = (time.monotonic_ns() - t0) / 1e9
    deadline = time.monotonic() + drain
    while sum(c.n_acked for c in conns) < total * clients and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    elapsed_s = (time.monotonic_ns() - t0) / 1e9
    for c in conns:
        c.transport.close()
    await asyncio.gather(*(c.closed for c in conns))

    lat = sorted(v for c in conns for v in c.latency_ns)
    acked = sum(c.n_acked for c in conns)
    ms = lambda q: percentile(lat, q) / 1e6  # noqa: E731
    return {
        "clients": clients, "rate_per_client": rate, "seconds": seconds,
        "sent": total * clients, "acked": acked, "lost": total * clients - acked,
        "duplicates": sum(c.duplicates for c in conns), "wrong": sum(c.wrong for c in conns),
        "late_sends": late, "max_send_lag_ms": max_lag_ns / 1e6,
        "send_rate": total * clients / send_s,
        "ack_rate": acked / max((max(c.last_ack_ns for c in conns) - t0) / 1e9, send_s),
        "elapsed_s": elapsed_s,
        "p50_ms": ms(0.50), "p99_ms": ms(0.99), "p999_ms": ms(0.999), "max_ms": lat[-1] / 1e6 if lat else float("nan"),
        "loadavg": os.getloadavg(),
    }


def print_report(r: dict) -> None:
    print(f"{r['clients']} clients x {r['rate_per_client']:g} packets/s for {r['seconds']:g} s: "
          f"sent {r['sent']} ({r['send_rate']:.0f}/s, {r['late_sends']} late, "
          f"max send lag {r['max_send_lag_ms']:.2f} ms), acked {r['acked']} ({r['ack_rate']:.0f}/s)")
    print(f"latency ms: p50 {r['p50_ms']:.3f}  p99 {r['p99_ms']:.3f}  p99.9 {r['p999_ms']:.3f}  max {r['max_ms']:.3f}")
    print(f"lost {r['lost']}, duplicates {r['duplicates']}, wrong {r['wrong']}; "
          f"load average {r['loadavg'][0]:.2f} {r['loadavg'][1]:.2f} {r['loadavg'][2]:.2f}", flush=True)


def faulty(r: dict) -> bool:
    return bool(r["lost"] or r["duplicates"] or r["wrong"])


def run_load(args: argparse.Namespace) -> int:
    r = asyncio.run(load(args.port, args.clients, args.rate, args.seconds, args.drain, args.late_ms))
    print_report(r)
    if args.json:
        print(json.dumps(r), flush=True)
    return 1 if faulty(r) else 0


# -- the benchmark ------------------------------------------------------------------------------------


def start_server(backend: str, dispatch: str, workers: int, max_in_flight: int) -> tuple[subprocess.Popen, int]:
    """This script's server in a process of its own on a free port; (process, port)."""
    proc = subprocess.Popen([sys.executable, __file__, "serve", "--port", "0", "--backend", backend,
                             "--dispatch", dispatch, "--workers", str(workers),
                             "--max-in-flight", str(max_in_flight)], stdout=subprocess.PIPE, text=True)
    if not select.select([proc.stdout], [], [], START_TIMEOUT)[0]:
        stop_server(proc)
        raise RuntimeError(f"the {backend} server did not start in {START_TIMEOUT:g} s")
    line = proc.stdout.readline()
    if not line.startswith("serving on "):
        stop_server(proc)
        raise RuntimeError(f"the {backend} server did not start: {line!r} (exit status {proc.returncode})")
    return proc, int(line.split()[2].rsplit(":", 1)[1])


def stop_server(proc: subprocess.Popen) -> str:
    """SIGTERM, then what the server printed as it stopped."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=START_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise RuntimeError("the server did not stop on SIGTERM; killed") from None
    if proc.returncode:
        raise RuntimeError(f"the server exited with status {proc.returncode}: {out.strip()}")
    return out.strip()


ROWS: list[tuple[str, Callable[[dict], str]]] = [
    ("sent (late)", lambda r: f"{r['sent']} ({r['late_sends']})"),
    ("send rate /s", lambda r: f"{r['send_rate']:.0f}"),
    ("ack rate /s", lambda r: f"{r['ack_rate']:.0f}"),
    ("latency p50 ms", lambda r: f"{r['p50_ms']:.3f}"),
    ("latency p99 ms", lambda r: f"{r['p99_ms']:.3f}"),
    ("latency p99.9 ms", lambda r: f"{r['p999_ms']:.3f}"),
    ("latency max ms", lambda r: f"{r['max_ms']:.3f}"),
    ("lost / dup / wrong", lambda r: f"{r['lost']} / {r['duplicates']} / {r['wrong']}"),
    ("packets a task", lambda r: next(iter(re.findall(r"\(([\d.]+) packets a task\)", r["server"])), "?")),
    ("load average 1m", lambda r: f"{r['loadavg'][0]:.2f}"),
]


def run_bench(args: argparse.Namespace) -> int:
    backends = args.backends.split(",")
    for b in backends:
        if b not in BACKENDS:
            raise SystemExit(f"--backends: unknown backend {b!r}; choose from {', '.join(BACKENDS)}")
    print(f"ingest bench: {args.clients} clients x {args.rate:g} packets/s for {args.seconds:g} s, "
          f"dispatch {args.dispatch}, {args.workers} workers, {os.cpu_count()} CPUs", flush=True)
    reports = {}
    for b in backends:
        proc, port = start_server(b, args.dispatch, args.workers, args.max_in_flight)
        try:
            r = asyncio.run(load(port, args.clients, args.rate, args.seconds, args.drain, args.late_ms))
        finally:
            out = stop_server(proc)
        r["server"] = out.splitlines()[-1] if out else ""
        reports[b] = r
        print(f"\n[{b}] {r['server']}")
        print_report(r)
        if args.json:
            print(json.dumps({"backend": b, **r}), flush=True)
    names = {"mpop": "mpop", "ppe": "ProcessPoolExecutor"}
    width = max(len(n) for n, _ in ROWS)
    cols = [max(len(names[b]), *(len(f(reports[b])) for _, f in ROWS)) for b in backends]
    print("\n" + " " * width + "  " + "  ".join(names[b].rjust(w) for b, w in zip(backends, cols)))
    for name, f in ROWS:
        print(name.ljust(width) + "  " + "  ".join(f(reports[b]).rjust(w) for b, w in zip(backends, cols)))
    return 1 if any(faulty(r) for r in reports.values()) else 0


# -- command line ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    def server_options(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--dispatch", choices=DISPATCHES, default="tick",
                        help="tick: one task per event-loop iteration; packet: one per packet; "
                             "await: one per packet, each awaited in its own asyncio task")
        sp.add_argument("--workers", type=int, default=2)
        sp.add_argument("--max-in-flight", type=int, default=8192,
                        help="packets in the pool at most; past it the server stops reading")

    def load_options(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--clients", type=int, default=4, help="connections")
        sp.add_argument("--rate", type=float, default=10_000, help="packets/s on each connection")
        sp.add_argument("--seconds", type=float, default=5.0, help="how long to send")
        sp.add_argument("--drain", type=float, default=3.0, help="seconds to wait for the last acks")
        sp.add_argument("--late-ms", type=float, default=2.0,
                        help="a packet written more than this after its scheduled time is late")
        sp.add_argument("--json", action="store_true", help="also print each report as a JSON line")

    sp = sub.add_parser("serve", help="serve on 127.0.0.1 until SIGINT/SIGTERM")
    sp.add_argument("--port", type=int, default=8770, help="port on 127.0.0.1 (0: a free one)")
    sp.add_argument("--backend", choices=BACKENDS, default="mpop")
    server_options(sp)
    sp = sub.add_parser("load", help="run the paced load client against a server")
    sp.add_argument("--port", type=int, required=True)
    load_options(sp)
    sp = sub.add_parser("bench", help="the server on each backend in turn under the same load")
    sp.add_argument("--backends", default="mpop,ppe", help="comma-separated, in the order run")
    server_options(sp)
    load_options(sp)
    args = p.parse_args(argv)
    if getattr(args, "workers", 1) < 1:
        p.error("--workers must be at least 1")
    try:
        return {"serve": run_server, "load": run_load, "bench": run_bench}[args.command](args)
    except (OSError, RuntimeError, ValueError) as e:  # refused, reset, a server that failed
        print(f"ingest_server {args.command}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
