"""The worker process entry: attach the segment, set up the interpreter as the owner asked
(sys.path, handler_module, CPU pinning), then run the native worker loop."""

from __future__ import annotations

import os
import pickle
import signal
import sys
import traceback

BOOT_FN_ID = 0xFFFFFFFF


def pack_error(exc: BaseException) -> bytes:
    """A handler's exception as bytes: the exception itself when it survives pickling, and
    always the worker's formatted traceback."""
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        data = pickle.dumps((exc, tb), protocol=5)
        pickle.loads(data)
        return data
    except Exception:
        return pickle.dumps((None, tb, type(exc).__qualname__, str(exc)), protocol=5)


class _Resolver:
    """fn_id -> (callable, slot class or None), read from the segment's registry log."""

    def __init__(self, segment):
        self.segment = segment
        self.offset = 0
        self.table: dict[int, tuple] = {}
        self.boot: dict = {}

    def refresh(self) -> None:
        import cloudpickle  # noqa: F401  (registers reducers cloudpickle payloads may need)

        entries, self.offset = self.segment.read_registry(self.offset)
        for fn_id, blob in entries:
            if fn_id == BOOT_FN_ID:
                self.boot = pickle.loads(blob)
            else:
                self.table[fn_id] = pickle.loads(blob)

    def resolve(self, fn_id: int):
        if fn_id not in self.table:
            self.refresh()
        return self.table.get(fn_id)


def _prepare(resolver: _Resolver, worker_id: int) -> None:
    boot = resolver.boot
    for p in reversed(boot.get("sys_path", [])):
        if p not in sys.path:
            sys.path.insert(0, p)
    cpus = boot.get("cpu_affinity")
    if cpus:
        os.sched_setaffinity(0, {cpus[worker_id % len(cpus)]})
    if boot.get("debug"):
        import logging

        logging.basicConfig(level=logging.DEBUG, format=f"[mpop worker {worker_id}] %(message)s")
    module = boot.get("handler_module")
    if module:
        __import__(module)


def run(name: str, worker_id: int, generation: int) -> int:
    from . import _core
    from ._results import TaskResult

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the owner's to handle
    segment = _core.Segment.attach(name)
    _core.arm_worker_exit(segment)
    resolver = _Resolver(segment)
    try:
        resolver.refresh()
        _prepare(resolver, worker_id)
        resolver.refresh()  # handlers registered while this worker started
    except BaseException:
        segment.set_start_error(worker_id, traceback.format_exc()[-1000:])
        _core.leave_segment(segment, not _core.owner_alive(segment))
        return 3
    reason = _core.worker_loop(segment, worker_id, resolver.resolve, pack_error, TaskResult)
    _core.leave_segment(segment, reason == "owner died")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m mpop._worker SEGMENT WORKER_ID GENERATION`` (spawn start method)."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 3:
        print("usage: python -m mpop._worker SEGMENT WORKER_ID GENERATION", file=sys.stderr)
        return 2
    return run(argv[0], int(argv[1]), int(argv[2]))


def forked_main(name: str, worker_id: int, generation: int) -> int:
    """Entry of a worker forked from the owner (fork start method)."""
    try:
        return run(name, worker_id, generation)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


_FORKSERVER_PROCS: dict = {}


def _forkserver_target(name: str, worker_id: int, generation: int) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: follow the forkserver out
    os._exit(run(name, worker_id, generation))


def forkserver_spawn(name: str, worker_id: int, generation: int) -> int:
    """Starts a worker through multiprocessing's forkserver; returns its pid."""
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    p = ctx.Process(target=_forkserver_target, args=(name, worker_id, generation), daemon=True,
                    name=f"mpop-worker-{worker_id}")
    p.start()
    _FORKSERVER_PROCS[(name, worker_id)] = p
    return p.pid


if __name__ == "__main__":
    sys.exit(main())
