"""Several server processes feeding one persistent pool, and a server killed mid-work.

A persistent pool (``MpopApi(name=..., persistent=True)``) has its supervisor in a process
of its own, so it outlives the process that created it. Any process attaches to it by name
with ``mpop.attach(name)``. Here each attached process is a small asyncio TCP server:

    JOB <id> <n>   ->  ACCEPTED <id>        queues sum_of_squares(n) as task <id>
    GET <id>       ->  RESULT <id> <value> <pid of the server that recorded it>
                       or PENDING <id>

Each server is one client of the pool: it receives only the results of its own tasks. A
background thread takes them from ``app.results()`` and writes each to a shared store (a
directory, one file per job) that every server reads. When a server dies, even by
SIGKILL, its results wait in the pool's shared memory, and the next server to attach
receives them: every job gets exactly one result. (results() hands each result out once:
one that a server has taken but not yet written dies with it.)

The demo (the default) does it all on 127.0.0.1 in a temporary directory: starts a pool,
starts 2 servers, sends them 300 jobs, SIGKILLs one while its jobs are still queued,
starts a replacement, waits for every result, checks them, and stops everything:

    python examples/shared_pool_server.py

By hand (a server started with --port 0 picks a free port and prints it):

    python examples/shared_pool_server.py start-pool --pool mypool --workers 2
    python examples/shared_pool_server.py serve --pool mypool --port 8701 --store /tmp/jobs &
    python examples/shared_pool_server.py serve --pool mypool --port 8702 --store /tmp/jobs &
    printf 'JOB 1 100000\\n' | nc -q1 127.0.0.1 8701
    printf 'GET 1\\n' | nc -q1 127.0.0.1 8702
    kill %1 %2                               # SIGTERM: a server detaches and exits
    python -m mpop shutdown mypool

(``cd examples && python -m mpop serve mypool --handler-module shared_pool_server`` starts
the same pool as start-pool.)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import mpop

HOST = "127.0.0.1"
SUM_OF_SQUARES = 0xA000  # the handler's fn_id in the pool
TIMEOUT = 60.0  # the longest any one step of the demo may take, in seconds


# -- the work ---------------------------------------------------------------------------------


def sum_of_squares(n: int) -> int:
    """The CPU task: 0*0 + 1*1 + ... + (n-1)*(n-1)."""
    return sum(i * i for i in range(n))


# The pool imports this module by name in its workers (and in each process that attaches)
# and registers these handlers: every client calls them by fn_id.
HANDLERS = {SUM_OF_SQUARES: sum_of_squares}


def start_pool(pool: str, workers: int) -> None:
    """Starts the persistent pool and lets go of it: it runs on after this process exits."""
    app = mpop.MpopApi(name=pool, persistent=True, workers=workers, handler_module="shared_pool_server")
    app.start()
    app.detach()


def stop_pool(pool: str) -> None:
    """Stops the pool once nothing is queued or running; returns once it is gone."""
    subprocess.run([sys.executable, "-m", "mpop", "shutdown", pool, "--timeout", "30"],
                   check=True, timeout=TIMEOUT, stdout=subprocess.DEVNULL)


# -- the result store: one file per job, shared by every server -------------------------------


def record(store: str, job_id: int, text: str) -> None:
    """Writes `text` to the file `store/<job_id>`, all at once and only once."""
    temp = os.path.join(store, f".{job_id}.{os.getpid()}.tmp")
    with open(temp, "w") as f:
        f.write(text)
    try:
        os.link(temp, os.path.join(store, str(job_id)))  # like os.rename, but never replaces
    except FileExistsError:
        raise RuntimeError(f"job {job_id} has a result already: recorded twice") from None
    finally:
        os.unlink(temp)


def lookup(store: str, job_id: int) -> str | None:
    """The recorded text of a job, or None while it has none."""
    try:
        with open(os.path.join(store, str(job_id))) as f:
            return f.read()
    except FileNotFoundError:
        return None


def collect_results(app: mpop.MpopApi, store: str, stop: threading.Event) -> None:
    """The server's background thread: records each result as it comes, its own tasks' and
    those of a dead server it took over, until `stop` is set."""
    while not stop.is_set():
        try:
            for r in app.results(timeout=0.5):  # ends when no task is outstanding
                value = r.value if r.success else f"error:{type(r.error).__name__}"
                record(store, r.tsk_id, f"{value} {os.getpid()}")
        except TimeoutError:
            pass  # tasks still running: ask again
        stop.wait(0.05)


# -- the server -------------------------------------------------------------------------------


def answer(line: str, app: mpop.MpopApi, store: str) -> str:
    """The reply to one request line."""
    words = line.split()
    if len(words) == 3 and words[0] == "JOB" and words[1].isdecimal() and words[2].isdecimal():
        job_id, n = int(words[1]), int(words[2])
        try:  # blocking=False: never hold up the event loop (False when the ring is full)
            queued = app.enqueue(SUM_OF_SQUARES, args=(n,), tsk_id=job_id, blocking=False)
        except ValueError as e:  # a job id over 4294967295
            return f"ERROR {e}"
        return f"ACCEPTED {job_id}" if queued else f"BUSY {job_id}"
    if len(words) == 2 and words[0] == "GET" and words[1].isdecimal():
        found = lookup(store, int(words[1]))
        return f"RESULT {words[1]} {found}" if found else f"PENDING {words[1]}"
    return "ERROR expected JOB <id> <n> or GET <id>"


async def handle_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                            app: mpop.MpopApi, store: str) -> None:
    try:
        while True:
            line = await reader.readline()
            if not line:
                break
            writer.write((answer(line.decode(errors="replace"), app, store) + "\n").encode())
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def run_server(app: mpop.MpopApi, port: int, store: str) -> None:
    """Serves until SIGTERM or SIGINT; raises what the result thread raised, if it failed."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stopping.set)
    loop.add_signal_handler(signal.SIGINT, stopping.set)
    server = await asyncio.start_server(lambda r, w: handle_connection(r, w, app, store), HOST, port)
    print(f"listening on {HOST}:{server.sockets[0].getsockname()[1]}", flush=True)
    stop_collecting = threading.Event()
    collector = loop.run_in_executor(None, collect_results, app, store, stop_collecting)
    async with server:
        await asyncio.wait([collector, asyncio.ensure_future(stopping.wait())],
                           return_when=asyncio.FIRST_COMPLETED)
    stop_collecting.set()
    await collector  # raises the result thread's error, if any


def serve(pool: str, port: int, store: str) -> None:
    """One server process: a client of the pool for as long as it runs."""
    os.makedirs(store, exist_ok=True)
    app = mpop.attach(pool, timeout=30)
    try:
        asyncio.run(run_server(app, port, store))
    finally:
        app.detach()  # results still due go to the next server that attaches


# -- the demo ---------------------------------------------------------------------------------


def start_server(pool: str, store: str) -> tuple[subprocess.Popen, int]:
    """Starts a server process on a free port; returns it and its port once it listens."""
    command = [sys.executable, __file__, "serve", "--pool", pool, "--port", "0", "--store", store]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    ready, _, _ = select.select([proc.stdout], [], [], TIMEOUT)
    line = proc.stdout.readline() if ready else ""
    if not line.startswith("listening on "):
        proc.kill()
        proc.wait()
        raise RuntimeError(f"server did not start (it said {line!r})")
    return proc, int(line.rsplit(":", 1)[1])


class Connection:
    """A demo client's connection to one server: one request, one reply."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=TIMEOUT)
        self.file = self.sock.makefile("rw", encoding="ascii", newline="\n")

    def ask(self, request: str) -> list[str]:
        self.file.write(request + "\n")
        self.file.flush()
        reply = self.file.readline().split()
        if not reply:
            raise ConnectionError(f"no reply to {request!r}")
        return reply

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def send_jobs(port: int, jobs: dict[int, int]) -> int:
    """Sends JOB requests to the server on `port`; returns how many it accepted."""
    conn = Connection(port)
    try:
        return sum(conn.ask(f"JOB {job_id} {n}")[0] == "ACCEPTED" for job_id, n in jobs.items())
    finally:
        conn.close()


def poll_results(ports: list[int], job_ids: list[int]) -> dict[int, tuple[str, int]]:
    """GETs every job from the servers in turn until all have a result (or TIMEOUT passes);
    returns {job_id: (value, pid of the server that recorded it)}."""
    conns = [Connection(p) for p in ports]
    results: dict[int, tuple[str, int]] = {}
    deadline = time.monotonic() + TIMEOUT
    try:
        while len(results) < len(job_ids) and time.monotonic() < deadline:
            for i, job_id in enumerate(j for j in job_ids if j not in results):
                reply = conns[i % len(conns)].ask(f"GET {job_id}")
                if reply[0] == "RESULT":
                    results[job_id] = (reply[2], int(reply[3]))
            time.sleep(0.1)
    finally:
        for c in conns:
            c.close()
    return results


def stop_server(proc: subprocess.Popen) -> int:
    """SIGTERM, then the server's exit status (0 when it stopped cleanly)."""
    proc.terminate()
    try:
        return proc.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return -signal.SIGKILL


def expected(n: int) -> int:
    return (n - 1) * n * (2 * n - 1) // 6


def demo(pool: str, jobs: int, workers: int) -> int:
    started = time.monotonic()
    tmp = tempfile.mkdtemp(prefix="shared_pool_server-")
    store = os.path.join(tmp, "results")
    servers: list[subprocess.Popen] = []
    pool_started = False
    try:
        start_pool(pool, workers)
        pool_started = True
        print(f"pool {pool}: {workers} workers")
        (keeper, port1), (victim, port2) = start_server(pool, store), start_server(pool, store)
        servers += [keeper, victim]
        print(f"server 1 (pid {keeper.pid}) on port {port1}, server 2 (pid {victim.pid}) on port {port2}")

        # Job sizes vary from 200,000 to 400,000 (a few ms of CPU each).
        sizes = {job_id: 200_000 + (job_id * 7919) % 200_000 for job_id in range(1, jobs + 1)}
        first, second = dict(list(sizes.items())[:jobs // 2]), dict(list(sizes.items())[jobs // 2:])
        # Server 2's jobs go in last, so they are all still queued when it is killed (none
        # of its results is half-way through being written).
        accepted = send_jobs(port1, first) + send_jobs(port2, second)
        print(f"sent {jobs} jobs: {accepted} accepted "
              f"({len(first)} to server 1, {len(second)} to server 2)")

        victim.kill()
        victim.wait()
        unfinished = sum(lookup(store, job_id) is None for job_id in second)
        print(f"SIGKILLed server 2 with {unfinished} of its {len(second)} jobs unfinished")
        replacement, port3 = start_server(pool, store)
        servers.append(replacement)
        print(f"replacement server 3 (pid {replacement.pid}) on port {port3} attached to the pool")

        results = poll_results([port1, port3], list(sizes))
        correct = sum(results.get(job_id, (None,))[0] == str(expected(n)) for job_id, n in sizes.items())
        by_replacement = sum(pid == replacement.pid for _, pid in results.values())
        files = [f for f in os.listdir(store) if not f.startswith(".")]
        print(f"results: {len(results)} of {jobs} jobs in {time.monotonic() - started:.1f} s, "
              f"{correct} correct, {len(files)} recorded ({by_replacement} by the replacement server)")

        statuses = [stop_server(keeper), stop_server(replacement)]
        print(f"servers stopped (exit status {statuses[0]} and {statuses[1]})")
        stop_pool(pool)
        pool_started = False
        print("pool stopped")
        ok = accepted == jobs == correct == len(files) and statuses == [0, 0]
        print("OK: every job has exactly one correct result" if ok else "FAILED")
        return 0 if ok else 1
    finally:
        for proc in servers:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if pool_started:
            stop_pool(pool)
        shutil.rmtree(tmp)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command")
    d = commands.add_parser("demo", help="run everything on 127.0.0.1 and check it (the default)")
    d.add_argument("--pool", default=f"mpop-{secrets.token_hex(6)}")
    d.add_argument("--jobs", type=int, default=300)
    d.add_argument("--workers", type=int, default=2)
    p = commands.add_parser("start-pool", help="start the persistent pool")
    p.add_argument("--pool", required=True)
    p.add_argument("--workers", type=int, default=2)
    s = commands.add_parser("serve", help="run one server process")
    s.add_argument("--pool", required=True)
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--store", required=True, help="the shared result directory")
    args = parser.parse_args(argv)

    if args.command == "start-pool":
        start_pool(args.pool, args.workers)
        print(f"pool {args.pool!r} started; stop it with: python -m mpop shutdown {args.pool}")
        return 0
    if args.command == "serve":
        serve(args.pool, args.port, args.store)
        return 0
    if args.command is None:
        args = parser.parse_args(["demo"])
    return demo(args.pool, args.jobs, args.workers)


if __name__ == "__main__":
    sys.exit(main())
