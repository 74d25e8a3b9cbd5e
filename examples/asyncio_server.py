"""An asyncio TCP server that hands each request to an mpop pool with ``await app.submit``.

Protocol, one request per line:

    <n>        ->  <sum of i*i for i < n>      (computed in a worker process)
    anything else, or n < 0  ->  ERROR <exception type>: <message>

The event loop only reads, writes and awaits: each request's work runs in a worker, and
its completion wakes the loop (no thread per request). Many connections, each with many
requests, are served at once.

    python examples/asyncio_server.py --port 8765        # serve until Ctrl-C or SIGTERM
    printf '1000\\n10\\n' | nc -q1 127.0.0.1 8765

    python examples/asyncio_server.py --demo             # serve on a free port, run 20
                                                         # clients against it, check, stop
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

import mpop

HOST = "127.0.0.1"


def sum_of_squares(n: int) -> int:
    """The work behind one request (it runs in a worker process)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return sum(i * i for i in range(n))


async def handle(app: mpop.MpopApi, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Serves one connection: each line's answer in its turn."""
    try:
        while line := await reader.readline():
            try:
                answer = str(await app.submit(sum_of_squares, int(line)))
            except Exception as e:  # the handler's own exception, re-raised here
                answer = f"ERROR {type(e).__name__}: {e}"
            writer.write(answer.encode() + b"\n")
            await writer.drain()
    finally:
        writer.close()


async def serve(app: mpop.MpopApi, port: int, stop: asyncio.Event) -> None:
    """Serves on HOST:`port` (0: a free one, printed) until `stop` is set."""
    server = await asyncio.start_server(lambda r, w: handle(app, r, w), HOST, port)
    print(f"serving on {HOST}:{server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await stop.wait()


async def client(port: int, numbers: list[int]) -> list[str]:
    """Sends `numbers` on one connection, one line each, and reads the answers."""
    reader, writer = await asyncio.open_connection(HOST, port)
    writer.write(b"".join(f"{n}\n".encode() for n in numbers))
    await writer.drain()
    answers = [(await reader.readline()).decode().strip() for _ in numbers]
    writer.close()
    await writer.wait_closed()
    return answers


async def demo(app: mpop.MpopApi) -> int:
    """Serves on a free port, runs 20 clients of 50 requests each against it at once, checks
    every answer, and stops."""
    server = await asyncio.start_server(lambda r, w: handle(app, r, w), HOST, 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        batches = [[(c * 50 + i) * 10 for i in range(50)] for c in range(20)]
        answers = await asyncio.gather(*(client(port, b) for b in batches))
        bad = await client(port, [-1])
    wrong = sum(a != str(sum_of_squares(n)) for b, ans in zip(batches, answers) for n, a in zip(b, ans))
    print(f"{sum(map(len, answers))} requests on 20 connections, {wrong} wrong answers")
    print(f"a bad request: {bad[0]}")
    return 1 if wrong else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=8765, help="port on 127.0.0.1 (0: a free one)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--demo", action="store_true", help="serve, run clients against it, check, stop")
    args = p.parse_args(argv)
    with mpop.MpopApi(workers=args.workers, auto_terminate=False) as app:
        app.start()
        if args.demo:
            return asyncio.run(demo(app))

        async def run() -> None:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            await serve(app, args.port, stop)

        asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
