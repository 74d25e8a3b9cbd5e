"""Large float64 matrices made by pinned workers and written to disk by the owner, without
pickling them; one worker killed mid-run; the same job timed against multiprocessing.Pool.

Each task makes one matrix (seeded noise, smoothed by a few diffusion steps), 64 MiB by
default. The worker returns it as a numpy array: mpop copies it once into the shared
argument pool and the owner receives a view over that block, which it writes straight to
a .npy file (no pickle, no copy out). The workers are pinned to CPUs (`cpu_affinity`).

In the first run one worker is killed (`kill_worker`) while it makes a matrix; the
supervisor starts a replacement on the same CPU, which makes that matrix again
(`TaskResult.attempts` is 2). Every file is created with O_EXCL, so a matrix written twice
would fail, and every file is checked against the same matrix made by
multiprocessing.Pool. Then the same job (no kill) runs on mpop and on a forked
multiprocessing.Pool of as many pinned workers, which pickles each matrix through a pipe,
side by side; the ratio of their speeds is printed.

    python examples/matrix_writer.py [--count 16] [--mb 64] [--workers N] [--steps 2]
                                     [--out DIR] [--rounds 3]
"""

from __future__ import annotations

import argparse
import hashlib
import math
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

import mpop


def make_matrix(index: int, side: int, steps: int) -> np.ndarray:
    """Matrix `index`: standard normal noise seeded by `index`, smoothed by `steps`
    diffusion steps (each cell averaged with its four neighbours, wrapping at the edges).
    The same arguments give the same bytes in any process."""
    m = np.random.default_rng(index).standard_normal((side, side))
    for _ in range(steps):
        m = (m + np.roll(m, 1, 0) + np.roll(m, -1, 0) + np.roll(m, 1, 1) + np.roll(m, -1, 1)) / 5
    return m


def matrix_path(out: Path, index: int) -> Path:
    return out / f"matrix_{index:04d}.npy"


def write_matrix(out: Path, index: int, m: np.ndarray) -> None:
    """Writes `m` as a .npy file; mode "xb" (O_EXCL): a second write of one matrix raises
    FileExistsError. np.save writes a contiguous array's buffer as it is, with no copy."""
    with open(matrix_path(out, index), "xb") as f:
        np.save(f, m, allow_pickle=False)


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


# -- mpop ---------------------------------------------------------------------------------


def pool_bytes_for(matrix_bytes: int, window: int) -> int:
    """An argument pool in which `window` results fit in the quarter that results handed
    out as views may hold (past it they would arrive as copies), with room to spare for a
    block's rounding."""
    per = matrix_bytes + (1 << 20)
    return max(64 << 20, 4 * window * per)


def run_mpop(app: mpop.MpopApi, count: int, side: int, steps: int, out: Path, window: int,
             kill: bool = False) -> dict:
    """Makes `count` matrices on `app`, at most `window` tasks outstanding, and writes each
    as its result comes. With `kill`, once a first matrix is back (so that a task's length
    is known), kills a worker in the middle of its matrix (kill_one_worker). Returns what
    happened: writes per index, results received as views, the kill, attempts per index."""
    writes = {i: 0 for i in range(count)}
    views = 0
    attempts: dict[int, int] = {}
    killed = None
    nxt = 0
    while nxt < min(window, count):
        app.enqueue(make_matrix, args=(nxt, side, steps), tsk_id=nxt)
        nxt += 1
    for r in app.results():
        m = r.get()  # the matrix, or the task's exception
        views += not m.flags.owndata  # a view over the pool block the worker wrote
        write_matrix(out, r.tsk_id, m)
        writes[r.tsk_id] += 1
        attempts[r.tsk_id] = r.attempts
        run_time_s = r.run_time_s or 0.0
        del m, r  # the last view of the block: it goes back to the pool
        if nxt < count:
            app.enqueue(make_matrix, args=(nxt, side, steps), tsk_id=nxt)
            nxt += 1
        if kill and killed is None:
            killed = kill_one_worker(app, typical_s=max(run_time_s, 0.01))
    return {"writes": writes, "views": views, "attempts": attempts, "killed": killed}


def kill_one_worker(app: mpop.MpopApi, typical_s: float, patience_s: float = 30.0) -> dict | None:
    """Kills a worker between a quarter and half-way through making a matrix (one takes
    about `typical_s`), so that the kill lands in the middle of the work. Returns {worker,
    pid, tsk_id, after_s, typical_s}, or None when no task was caught running before the
    work ran out."""
    deadline = time.monotonic() + patience_s
    while time.monotonic() < deadline:
        status = app.status()
        for w in status["workers"]:
            if (w["state"] == "busy" and w.get("running_tsk_id") is not None
                    and typical_s / 4 <= w["running_for_s"] < typical_s / 2 and app.kill_worker(w["id"])):
                return {"worker": w["id"], "pid": w["pid"], "tsk_id": w["running_tsk_id"],
                        "after_s": w["running_for_s"], "typical_s": typical_s}
        if status["queue"]["in_flight"] == 0:
            return None
        time.sleep(min(0.002, typical_s / 20))
    return None


# -- multiprocessing.Pool -----------------------------------------------------------------


def _pin_pool_worker(counter, cpus: list[int]) -> None:
    """Pool initializer: pins each worker to the next CPU, as mpop's cpu_affinity does."""
    with counter.get_lock():
        i = counter.value
        counter.value += 1
    os.sched_setaffinity(0, {cpus[i % len(cpus)]})


def _indexed_matrix(job: tuple[int, int, int]) -> tuple[int, np.ndarray]:
    index, side, steps = job
    return index, make_matrix(index, side, steps)


def run_pool(pool, count: int, side: int, steps: int, out: Path) -> None:
    """The same job on a multiprocessing.Pool: each matrix pickled back through a pipe."""
    jobs = [(i, side, steps) for i in range(count)]
    for i, m in pool.imap_unordered(_indexed_matrix, jobs):
        write_matrix(out, i, m)


# -- the run ------------------------------------------------------------------------------


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {text!r}")
    return n


def main(argv: Iterable[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=positive_int, default=16, help="matrices (default: 16)")
    p.add_argument("--mb", type=positive_int, default=64,
                   help="MiB of each matrix at least; square, float64 (default: 64)")
    p.add_argument("--workers", type=positive_int, default=len(os.sched_getaffinity(0)),
                   help="workers of each pool (default: the CPUs this process may use)")
    p.add_argument("--steps", type=int, default=2, help="diffusion steps per matrix (default: 2)")
    p.add_argument("--out", type=Path, help="keep the matrices of the first run here "
                   "(default: a temporary directory, removed at the end)")
    p.add_argument("--rounds", type=positive_int, default=3,
                   help="rounds of the side-by-side comparison; the best of each side counts (default: 3; "
                        "on a shared machine one round can miss the difference)")
    args = p.parse_args(None if argv is None else list(argv))
    if args.steps < 0:
        p.error(f"argument --steps: must be an int >= 0, got {args.steps}")
    if args.count <= args.workers:
        p.error(f"argument --count: must be more than --workers ({args.workers}): a worker is killed "
                f"while it makes a matrix started after the first came back, got {args.count}")
    if args.out is not None and args.out.exists() and any(args.out.iterdir()):
        p.error(f"argument --out: {str(args.out)!r} exists and is not empty")

    side = math.isqrt(args.mb * (1 << 20) // 8 - 1) + 1  # side * side * 8 >= mb MiB
    matrix_bytes = side * side * 8
    cpus = sorted(os.sched_getaffinity(0))
    window = 2 * args.workers  # tasks outstanding: each worker has its next matrix queued
    print(f"{args.count} matrices of {side} x {side} float64 ({matrix_bytes / (1 << 20):.1f} MiB each), "
          f"{args.workers} workers pinned to CPUs {[cpus[i % len(cpus)] for i in range(args.workers)]}",
          flush=True)

    scratch = Path(tempfile.mkdtemp(prefix="matrix_writer-"))
    try:
        out = fresh(args.out) if args.out is not None else fresh(scratch / "first")
        # The Pool first: its workers are forked, better from a process without the app's threads.
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(args.workers, initializer=_pin_pool_worker, initargs=(ctx.Value("i", 0), cpus)) as pool, \
             mpop.MpopApi(workers=args.workers, cpu_affinity=True, worker_batch_size=1,
                          pool_bytes=pool_bytes_for(matrix_bytes, window), auto_terminate=False) as app:
            # Warm: workers started, numpy imported, every pool page mapped.
            run_mpop(app, min(window, args.count), side, 0, fresh(scratch / "warm"), window)
            run_pool(pool, min(2 * args.workers, args.count), side, 0, fresh(scratch / "warm"))

            # 1. mpop, one worker killed while it makes a matrix.
            t_kill = time.perf_counter()
            got = run_mpop(app, args.count, side, args.steps, out, window, kill=True)
            t_kill = time.perf_counter() - t_kill
            workers = app.status()["workers"]
            # Seen from outside: each live worker's CPU set, the replacement's included.
            pinned = {w["id"]: sorted(os.sched_getaffinity(w["pid"])) for w in workers if w["live"]}

            # 2. The same job, no kill, side by side with multiprocessing.Pool.
            t_mpop, t_pool = [], []
            for r in range(args.rounds):
                sides = [("mpop", lambda: run_mpop(app, args.count, side, args.steps, fresh(scratch / "mpop"), window)),
                         ("pool", lambda: run_pool(pool, args.count, side, args.steps, fresh(scratch / "pool")))]
                for name, fn in sides[r % 2:] + sides[:r % 2]:  # alternate which side goes first
                    (t_mpop if name == "mpop" else t_pool).append(timed(fn))
            reference = scratch / "pool"  # the last Pool run's files
            same = sum(file_digest(matrix_path(out, i)) == file_digest(matrix_path(reference, i))
                       for i in range(args.count))

        killed = got["killed"]
        once = all(n == 1 for n in got["writes"].values())
        print(f"written: {sum(got['writes'].values())} files, each once: {once}; "
              f"received as views of the pool, not copies: {got['views']}/{args.count}; "
              f"identical to multiprocessing.Pool's: {same}/{args.count}")
        if killed is None:
            print("killed: none (no matrix was being made when the first results came back)")
        else:
            redone = got["attempts"].get(killed["tsk_id"])
            print(f"killed worker {killed['worker']} (pid {killed['pid']}) {killed['after_s']:.3f} s into "
                  f"matrix {killed['tsk_id']} (one takes about {killed['typical_s']:.3f} s); "
                  f"that matrix's attempts: {redone}")
        each = ", ".join(f"worker {w['id']}: {w['restarts']}" for w in workers)
        print(f"worker restarts: {sum(w['restarts'] for w in workers)} ({each})")
        print("CPUs of the live workers (os.sched_getaffinity): "
              + ", ".join(f"worker {i}: {cpus}" for i, cpus in pinned.items()))
        print(f"mpop with one worker killed: {t_kill:.2f} s")
        best_m, best_p = min(t_mpop), min(t_pool)
        print(f"same job, no kill, best of {args.rounds}: mpop {best_m:.2f} s, multiprocessing.Pool "
              f"{best_p:.2f} s: mpop ran at {best_p / best_m:.2f}x the speed of multiprocessing.Pool")
        ok = (once and same == args.count and got["views"] == args.count and killed is not None
              and got["attempts"][killed["tsk_id"]] == 2)
        return 0 if ok else 1
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
