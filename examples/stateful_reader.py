"""A reader that each worker opens once: chunks of a large .npy file, read in order.

Each worker's initializer opens the file with ``np.load(mmap_mode="r")`` and keeps the
memory map in its ``worker_state``; every read after that is a slice of it, with no file
opened per task. The caller asks for chunks by row range; a coordinator thread submits
them a few ahead and hands the results back in order. When the pool is shut down (or was
never there), the reads fall back to the calling thread, which opens the file itself.

    python examples/stateful_reader.py [--rows N] [--chunk N] [--workers N]
"""

from __future__ import annotations

import argparse
import collections
import os
import queue
import tempfile
import threading
from concurrent.futures import CancelledError
from typing import Iterable, Iterator

import numpy as np

import mpop


def open_reader(path: str, worker_state: dict) -> None:
    """The initializer: once per worker process."""
    worker_state["array"] = np.load(path, mmap_mode="r")
    worker_state["reads"] = 0


def read_rows(start: int, stop: int, worker_state: dict) -> np.ndarray:
    """A task: rows [start, stop) of the worker's open file, copied out of the mapping."""
    worker_state["reads"] += 1
    return np.array(worker_state["array"][start:stop])


def reads_done(worker_state: dict) -> tuple[int, int]:
    """worker_exit: how many reads this worker served."""
    return os.getpid(), worker_state["reads"]


class ChunkReader:
    """Reads row ranges of one .npy file through a pool of workers that each hold it open,
    in the order asked, `read_ahead` ranges in flight at most."""

    def __init__(self, path: str, workers: int = 2, read_ahead: int = 4) -> None:
        self.path = path
        self.read_ahead = read_ahead
        self.app: mpop.MpopApi | None = mpop.MpopApi(
            workers=workers, auto_terminate=False, initializer=open_reader, initargs=(path,),
            worker_state=True, worker_exit=reads_done)
        self.local: np.ndarray | None = None  # the calling thread's own map, once needed
        self.by_workers = 0
        self.by_caller = 0

    def chunks(self, ranges: Iterable[tuple[int, int]]) -> Iterator[np.ndarray]:
        """The rows of each (start, stop) range, in order."""
        out: queue.Queue = queue.Queue(maxsize=self.read_ahead)
        coordinator = threading.Thread(target=self._coordinate, args=(iter(ranges), out), daemon=True)
        coordinator.start()
        while True:
            kind, value = out.get()
            if kind == "chunk":
                self.by_workers += 1
                yield value
            elif kind == "here":  # the pool is gone: this thread reads it
                self.by_caller += 1
                yield self._read_here(*value)
            elif kind == "error":
                raise value
            else:
                return

    def _coordinate(self, ranges: Iterator[tuple[int, int]], out: queue.Queue) -> None:
        pending: collections.deque = collections.deque()
        try:
            for start, stop in ranges:
                pending.append((start, stop, self._submit(start, stop)))
                if len(pending) >= self.read_ahead:
                    self._hand_on(pending.popleft(), out)
            while pending:
                self._hand_on(pending.popleft(), out)
            out.put(("end", None))
        except BaseException as e:  # the caller raises it in its own thread
            out.put(("error", e))

    def _submit(self, start: int, stop: int):
        app = self.app
        if app is None:
            return None
        try:
            return app.submit(read_rows, start, stop)
        except mpop.ShutdownError:
            return None

    def _hand_on(self, item: tuple, out: queue.Queue) -> None:
        start, stop, fut = item
        if fut is not None:
            try:
                out.put(("chunk", fut.result()))
                return
            except (mpop.ShutdownError, mpop.WorkerCrashedError, CancelledError):
                pass  # read it here instead
        out.put(("here", (start, stop)))

    def _read_here(self, start: int, stop: int) -> np.ndarray:
        if self.local is None:
            self.local = np.load(self.path, mmap_mode="r")
        return np.array(self.local[start:stop])

    def close(self) -> list:
        """Shuts the pool down; later reads happen in the calling thread. Returns what
        each worker's worker_exit returned (pid, reads served)."""
        app, self.app = self.app, None
        if app is None:
            return []
        app.shutdown()
        return app.exit_results()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--chunk", type=int, default=50_000)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "data.npy")
        data = np.random.default_rng(0).random((args.rows, 4))
        np.save(path, data)
        ranges = [(s, min(s + args.chunk, args.rows)) for s in range(0, args.rows, args.chunk)]
        half = len(ranges) // 2

        reader = ChunkReader(path, workers=args.workers)
        got = []
        for i, chunk in enumerate(reader.chunks(ranges)):
            got.append(chunk)
            if i == half:
                exits = reader.close()  # the rest is read in this thread
        same = np.array_equal(np.concatenate(got), data)
        served = sum(n for _, n in exits)
        print(f"{len(ranges)} chunks of {args.chunk} rows, in order and identical: {same}")
        print(f"workers that held the file open: {len(exits)}; reads they served: {served}")
        print(f"read by workers: {reader.by_workers}, by the calling thread after shutdown: {reader.by_caller}")
        ok = same and reader.by_caller > 0 and served >= reader.by_workers
        return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
